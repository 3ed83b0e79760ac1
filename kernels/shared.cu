/* shared.cu - the shared experts' pieces around their GEMMs (the twin of csrc/backend/cpu/
 * shared.c): bias rows, column sums and row adds over all T rows, the per-token sigmoid gate, the
 * sum of the S outputs into y, and their backward. One block per token where a token reduces;
 * every sum in a fixed order (no atomics). */
#include "kernels/common.cuh"
#include "kernels/kernels.h"

namespace {

constexpr int kThreads = 256;

/* deterministic sum over the 256 threads of a block: a fixed shuffle tree, then warps in order;
 * every thread gets the result */
__device__ __forceinline__ float shared_block_sum(float v, float *sh) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_down_sync(0xffffffffu, v, o);
    if ((threadIdx.x & 31) == 0) sh[threadIdx.x >> 5] = v;
    __syncthreads();
    if (threadIdx.x == 0) {
        float s = 0.0f;
        for (int w = 0; w < kThreads / 32; ++w) s += sh[w];
        sh[kThreads / 32] = s;
    }
    __syncthreads();
    float s = sh[kThreads / 32];
    __syncthreads();
    return s;
}

unsigned grid_of(int64_t n) {
    unsigned b = moe_k_blocks(n, kThreads);
    return b > 65536u ? 65536u : b;
}

template <typename SC, typename SB>
__global__ void rows_bias_kernel(SC *C, int64_t n, const SB *bias) {
    const int64_t r = blockIdx.x;
    for (int64_t c = threadIdx.x; c < n; c += blockDim.x)
        moe_st(C + r * n + c, bias ? moe_ld(bias + c) : 0.0f);
}

template <typename S> __global__ void rows_colsum_kernel(S *dB, const S *A, int64_t N, int64_t n) {
    const int64_t c = blockIdx.x * (int64_t)blockDim.x + threadIdx.x;
    if (c >= n) return;
    float acc = 0.0f;
    for (int64_t r = 0; r < N; ++r) acc += moe_ld(A + r * n + c); /* rows in order */
    moe_st(dB + c, moe_ld(dB + c) + acc);
}

template <typename S> __global__ void rows_add_kernel(S *dst, const S *src, int64_t n) {
    for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n;
         i += (int64_t)gridDim.x * blockDim.x)
        moe_st(dst + i, moe_ld(dst + i) + moe_ld(src + i));
}

template <typename S>
__global__ void __launch_bounds__(kThreads)
    shared_fwd_kernel(const S *x, const S *wg, const S *ys, int64_t nS, int64_t T, int64_t D,
                      float *gate, S *y) {
    __shared__ float sh[kThreads / 32 + 1];
    const int64_t t = blockIdx.x;
    float g = 1.0f;
    if (wg) {
        float z = 0.0f;
        for (int64_t d = threadIdx.x; d < D; d += blockDim.x) z += moe_ld(x + t * D + d) * moe_ld(wg + d);
        z = shared_block_sum(z, sh);
        g = 1.0f / (1.0f + expf(-z));
    }
    if (threadIdx.x == 0) gate[t] = g;
    for (int64_t d = threadIdx.x; d < D; d += blockDim.x) {
        float sum = 0.0f; /* s order */
        for (int64_t s = 0; s < nS; ++s) sum += moe_ld(ys + (s * T + t) * D + d);
        moe_st(y + t * D + d, moe_ld(y + t * D + d) + g * sum);
    }
}

template <typename S>
__global__ void __launch_bounds__(kThreads)
    shared_combine_bwd_kernel(const S *dy, const S *ys, const float *gate, int64_t nS, int64_t T,
                              int64_t D, int gated, S *dys, float *dlogit) {
    __shared__ float sh[kThreads / 32 + 1];
    const int64_t t = blockIdx.x;
    const float g = gate[t];
    float dot = 0.0f;
    for (int64_t d = threadIdx.x; d < D; d += blockDim.x) {
        float sum = 0.0f, v = moe_ld(dy + t * D + d);
        for (int64_t s = 0; s < nS; ++s) sum += moe_ld(ys + (s * T + t) * D + d);
        dot += v * sum;
        moe_st(dys + t * D + d, g * v);
    }
    dot = shared_block_sum(dot, sh);
    if (threadIdx.x == 0) dlogit[t] = gated ? dot * g * (1.0f - g) : 0.0f;
}

template <typename S>
__global__ void shared_gate_dw_kernel(const S *x, const float *dlogit, int64_t T, int64_t D,
                                      S *dwg) {
    const int64_t d = blockIdx.x * (int64_t)blockDim.x + threadIdx.x;
    if (d >= D) return;
    float acc = 0.0f;
    for (int64_t t = 0; t < T; ++t) acc += dlogit[t] * moe_ld(x + t * D + d); /* token order */
    moe_st(dwg + d, moe_ld(dwg + d) + acc);
}

template <typename S>
__global__ void shared_gate_dx_kernel(const S *wg, const float *dlogit, int64_t T, int64_t D,
                                      S *dx) {
    const int64_t n = T * D;
    for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n;
         i += (int64_t)gridDim.x * blockDim.x)
        moe_st(dx + i, moe_ld(dx + i) + dlogit[i / D] * moe_ld(wg + i % D));
}

}  // namespace

extern "C" cudaError_t moe_k_rows_bias(void *C, int c_f32, int64_t N, int64_t n,
                                       const void *bias, int dtype, cudaStream_t stream) {
    if (N == 0 || n == 0) return cudaSuccess;
    MOE_K_DISPATCH(dtype, {
        if (c_f32)
            rows_bias_kernel<float, scalar_t><<<(unsigned)N, kThreads, 0, stream>>>(
                (float *)C, n, (const scalar_t *)bias);
        else
            rows_bias_kernel<scalar_t, scalar_t><<<(unsigned)N, kThreads, 0, stream>>>(
                (scalar_t *)C, n, (const scalar_t *)bias);
    });
    return cudaGetLastError();
}

extern "C" cudaError_t moe_k_rows_colsum_add(void *dB, const void *A, int64_t N, int64_t n,
                                             int dtype, cudaStream_t stream) {
    if (N == 0 || n == 0) return cudaSuccess;
    MOE_K_DISPATCH(dtype, rows_colsum_kernel<scalar_t><<<moe_k_blocks(n, kThreads), kThreads, 0,
                                                         stream>>>(
                              (scalar_t *)dB, (const scalar_t *)A, N, n));
    return cudaGetLastError();
}

extern "C" cudaError_t moe_k_rows_add(void *dst, const void *src, int64_t n, int dtype,
                                      cudaStream_t stream) {
    if (n == 0) return cudaSuccess;
    MOE_K_DISPATCH(dtype, rows_add_kernel<scalar_t><<<grid_of(n), kThreads, 0, stream>>>(
                              (scalar_t *)dst, (const scalar_t *)src, n));
    return cudaGetLastError();
}

extern "C" cudaError_t moe_k_shared_fwd(const void *x, const void *w_gate, const void *ys,
                                        int64_t S, int64_t T, int64_t D, int dtype, float *gate,
                                        void *y, cudaStream_t stream) {
    if (T == 0) return cudaSuccess;
    MOE_K_DISPATCH(dtype, shared_fwd_kernel<scalar_t><<<(unsigned)T, kThreads, 0, stream>>>(
                              (const scalar_t *)x, (const scalar_t *)w_gate,
                              (const scalar_t *)ys, S, T, D, gate, (scalar_t *)y));
    return cudaGetLastError();
}

extern "C" cudaError_t moe_k_shared_combine_bwd(const void *dy, const void *ys, const float *gate,
                                                int64_t S, int64_t T, int64_t D, int gated,
                                                int dtype, void *dys, float *dlogit,
                                                cudaStream_t stream) {
    if (T == 0) return cudaSuccess;
    MOE_K_DISPATCH(dtype,
                   shared_combine_bwd_kernel<scalar_t><<<(unsigned)T, kThreads, 0, stream>>>(
                       (const scalar_t *)dy, (const scalar_t *)ys, gate, S, T, D, gated,
                       (scalar_t *)dys, dlogit));
    return cudaGetLastError();
}

extern "C" cudaError_t moe_k_shared_gate_bwd(const void *x, const void *w_gate,
                                             const float *dlogit, int64_t T, int64_t D,
                                             int dtype, void *dw_gate, void *dx,
                                             cudaStream_t stream) {
    if (T == 0) return cudaSuccess;
    MOE_K_DISPATCH(dtype, {
        shared_gate_dw_kernel<scalar_t><<<moe_k_blocks(D, kThreads), kThreads, 0, stream>>>(
            (const scalar_t *)x, dlogit, T, D, (scalar_t *)dw_gate);
        shared_gate_dx_kernel<scalar_t><<<grid_of(T * D), kThreads, 0, stream>>>(
            (const scalar_t *)w_gate, dlogit, T, D, (scalar_t *)dx);
    });
    return cudaGetLastError();
}
