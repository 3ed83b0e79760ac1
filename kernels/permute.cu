/* permute.cu - slot assignment (capacity, both priorities), the gather into the expert-major
 * buffer, and its transpose: the sum of each token's rows back into dx.
 *
 * Slot assignment reproduces moe_router_assign_slots (router/router_host.c) exactly, with CUB:
 * the T*K assignments are listed in position order (p = j*T + t); SCORE priority first sorts
 * them by gate weight descending (a stable radix sort keeps position order among equal
 * weights); a stable radix sort by expert then lists each expert's claims in walk order, so an
 * assignment's slot is its rank inside its expert's segment. */
#include <cub/device/device_radix_sort.cuh>
#include <cub/device/device_scan.cuh>

#include "kernels/common.cuh"
#include "kernels/kernels.h"

static int expert_bits(int64_t E) {
    int b = 1;
    while (((int64_t)1 << b) < E) ++b;
    return b;
}

extern "C" cudaError_t moe_k_route_temp_bytes(int64_t n, int64_t E, size_t *bytes) {
    size_t a = 0, b = 0, c = 0;
    cudaError_t e = cub::DeviceRadixSort::SortPairs(nullptr, a, (const int32_t *)nullptr,
                                                    (int32_t *)nullptr, (const int32_t *)nullptr,
                                                    (int32_t *)nullptr, n, 0, expert_bits(E));
    if (e != cudaSuccess) return e;
    e = cub::DeviceRadixSort::SortPairsDescending(nullptr, b, (const float *)nullptr,
                                                  (float *)nullptr, (const int32_t *)nullptr,
                                                  (int32_t *)nullptr, n);
    if (e != cudaSuccess) return e;
    e = cub::DeviceScan::ExclusiveSum(nullptr, c, (const int64_t *)nullptr, (int64_t *)nullptr,
                                      E);
    if (e != cudaSuccess) return e;
    *bytes = a > b ? a : b;
    *bytes = *bytes > c ? *bytes : c;
    return cudaSuccess;
}

/* position order: key = expert, value = p; SCORE: fkey = gate weight */
__global__ void route_keys_kernel(moe_k_route_args_t a, int score) {
    const int64_t n = a.T * a.K;
    for (int64_t p = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; p < n;
         p += (int64_t)gridDim.x * blockDim.x) {
        int64_t t = p % a.T, j = p / a.T;
        a.vals_in[p] = (int32_t)p;
        if (score)
            a.fkeys_in[p] = a.gate[t * a.K + j];
        else
            a.keys_in[p] = a.idx[t * a.K1 + j];
    }
}

/* after the score sort: the walk order is vals_out; key each by its expert */
__global__ void route_rekey_kernel(moe_k_route_args_t a) {
    const int64_t n = a.T * a.K;
    for (int64_t q = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; q < n;
         q += (int64_t)gridDim.x * blockDim.x) {
        int64_t p = a.vals_out[q];
        int64_t t = p % a.T, j = p / a.T;
        a.vals_in[q] = (int32_t)p;
        a.keys_in[q] = a.idx[t * a.K1 + j];
    }
}

/* the i-th entry of the expert-sorted walk: slot = i - (claims on lower experts) */
__global__ void route_rows_kernel(moe_k_route_args_t a) {
    const int64_t n = a.T * a.K;
    for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n;
         i += (int64_t)gridDim.x * blockDim.x) {
        int32_t e = a.keys_out[i];
        int64_t p = a.vals_out[i];
        int64_t t = p % a.T, j = p / a.T;
        int64_t slot = i - a.claim_start[e];
        a.row[t * a.K + j] =
            (a.capacity >= 0 && slot >= a.capacity) ? -1 : (int32_t)(a.offsets[e] + slot);
    }
}

extern "C" cudaError_t moe_k_route(const moe_k_route_args_t *a, cudaStream_t stream) {
    const int64_t n = a->T * a->K;
    const int score = a->priority == 1 && a->capacity >= 0; /* MOE_PRIORITY_SCORE */
    unsigned blocks = moe_k_blocks(n, 256);
    if (blocks > 8192) blocks = 8192;
    route_keys_kernel<<<blocks, 256, 0, stream>>>(*a, score);
    cudaError_t e = cudaGetLastError();
    if (e != cudaSuccess) return e;
    size_t bytes = a->temp_bytes;
    if (score) {
        e = cub::DeviceRadixSort::SortPairsDescending(a->temp, bytes, a->fkeys_in, a->fkeys_out,
                                                      a->vals_in, a->vals_out, n, 0, 32, stream);
        if (e != cudaSuccess) return e;
        route_rekey_kernel<<<blocks, 256, 0, stream>>>(*a);
        if ((e = cudaGetLastError()) != cudaSuccess) return e;
    }
    bytes = a->temp_bytes;
    e = cub::DeviceRadixSort::SortPairs(a->temp, bytes, a->keys_in, a->keys_out, a->vals_in,
                                        a->vals_out, n, 0, expert_bits(a->E), stream);
    if (e != cudaSuccess) return e;
    bytes = a->temp_bytes;
    e = cub::DeviceScan::ExclusiveSum(a->temp, bytes, a->counts, a->claim_start, a->E, stream);
    if (e != cudaSuccess) return e;
    route_rows_kernel<<<blocks, 256, 0, stream>>>(*a);
    return cudaGetLastError();
}

/* ---- row movement --------------------------------------------------------------------------- */

/* one block per token: x[t] is read once, 16 bytes per thread when rows allow, and written to
 * every kept row of t */
template <typename V>
__global__ void permute_kernel(const V *x, const int32_t *row, int64_t T, int64_t K,
                               int64_t nv, V *xp) {
    const int64_t t = blockIdx.x;
    const V *src = x + t * nv;
    const int32_t *rt = row + t * K;
    for (int64_t i = threadIdx.x; i < nv; i += blockDim.x) {
        const V v = src[i];
        for (int64_t j = 0; j < K; ++j) {
            const int32_t r = rt[j];
            if (r >= 0) xp[(int64_t)r * nv + i] = v;
        }
    }
    (void)T;
}

extern "C" cudaError_t moe_k_permute(const void *x, const int32_t *row, int64_t T, int64_t K,
                                     int64_t D, int dtype, void *xp, cudaStream_t stream) {
    const int64_t bytes = D * (dtype == MOE_K_F32 ? 4 : 2);
    const int aligned = ((uintptr_t)x % 16 == 0) && ((uintptr_t)xp % 16 == 0);
    if (aligned && bytes % 16 == 0)
        permute_kernel<uint4><<<(unsigned)T, 256, 0, stream>>>((const uint4 *)x, row, T, K,
                                                                bytes / 16, (uint4 *)xp);
    else if (bytes % 4 == 0)
        permute_kernel<uint32_t><<<(unsigned)T, 128, 0, stream>>>((const uint32_t *)x, row, T, K,
                                                                   bytes / 4, (uint32_t *)xp);
    else
        permute_kernel<uint16_t><<<(unsigned)T, 128, 0, stream>>>((const uint16_t *)x, row, T, K,
                                                                   bytes / 2, (uint16_t *)xp);
    return cudaGetLastError();
}

/* dx[t] = sum_j dxp[row[t, j]], f32 accumulation in j order: combine.cu's vectorised kernel
 * with no gates */
extern "C" cudaError_t moe_k_unpermute(const void *dxp, const int32_t *row, int64_t T,
                                       int64_t K, int64_t D, int dtype, void *dx,
                                       cudaStream_t stream) {
    return moe_k_combine_fwd(dxp, row, NULL, T, K, D, dtype, dx, stream);
}
