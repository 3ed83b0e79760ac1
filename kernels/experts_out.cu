/* experts_out.cu - per-expert outputs (the twin of csrc/backend/cpu/experts_out.c): the combine
 * left undone. One block per assignment (t, j): its output row copied into (T, K) order with its
 * gate, zeros when dropped; backward copies the caller's gradient rows back into route order. */
#include "kernels/common.cuh"
#include "kernels/kernels.h"

namespace {

template <typename S>
__global__ void experts_out_fwd_kernel(const S *yp, const int32_t *row, const float *gate,
                                       int64_t D, S *ye, float *ge) {
    const int64_t i = blockIdx.x;
    const int32_t r = row[i];
    for (int64_t d = threadIdx.x; d < D; d += blockDim.x)
        if (r < 0) moe_st(ye + i * D + d, 0.0f);
        else ye[i * D + d] = yp[(int64_t)r * D + d];
    if (threadIdx.x == 0) ge[i] = r < 0 ? 0.0f : gate[i];
}

template <typename S>
__global__ void experts_out_bwd_kernel(const S *dye, const float *dge, const int32_t *row,
                                       int64_t D, S *dyp, float *dg) {
    const int64_t i = blockIdx.x;
    const int32_t r = row[i];
    if (r >= 0)
        for (int64_t d = threadIdx.x; d < D; d += blockDim.x)
            dyp[(int64_t)r * D + d] = dye[i * D + d];
    if (threadIdx.x == 0) dg[i] = r < 0 ? 0.0f : dge[i];
}

}  // namespace

extern "C" cudaError_t moe_k_experts_out_fwd(const void *yp, const int32_t *row,
                                             const float *gate, int64_t T, int64_t K, int64_t D,
                                             int dtype, void *ye, float *ge,
                                             cudaStream_t stream) {
    if (T * K == 0) return cudaSuccess;
    MOE_K_DISPATCH(dtype, experts_out_fwd_kernel<scalar_t><<<(unsigned)(T * K), 256, 0, stream>>>(
                              (const scalar_t *)yp, row, gate, D, (scalar_t *)ye, ge));
    return cudaGetLastError();
}

extern "C" cudaError_t moe_k_experts_out_bwd(const void *dye, const float *dge,
                                             const int32_t *row, int64_t T, int64_t K, int64_t D,
                                             int dtype, void *dyp, float *dg,
                                             cudaStream_t stream) {
    if (T * K == 0) return cudaSuccess;
    MOE_K_DISPATCH(dtype, experts_out_bwd_kernel<scalar_t><<<(unsigned)(T * K), 256, 0, stream>>>(
                              (const scalar_t *)dye, dge, row, D, (scalar_t *)dyp, dg));
    return cudaGetLastError();
}
