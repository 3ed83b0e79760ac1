// grouped_gemm.cu - the C entry points of the grouped expert GEMMs: availability, shape fit,
// scratch size, and the dispatch to the bf16 / f16 halves (which hold the CUTLASS kernels)
#include "kernels/grouped_gemm.h"

#include "kernels/common.cuh"

extern "C" int moe_k_grouped_gemm_available(void) {
    int device = 0, major = 0, minor = 0;
    if (cudaGetDevice(&device) != cudaSuccess) return 0;
    if (cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device) != cudaSuccess ||
        cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device) != cudaSuccess)
        return 0;
    // the kernels are built for sm_90a only, which runs on compute capability 9.0 alone
    return major == 9 && minor == 0;
}

extern "C" int moe_k_grouped_gemm_fits(int64_t M, int64_t N, int64_t K, int kind) {
    // TMA needs 16-byte aligned rows and group bases: 8 elements of a 16-bit type. Shapes are
    // int in CUTLASS's problem shape.
    const int64_t lim = (int64_t)1 << 30;
    if (kind == MOE_K_GG_WGRAD) return M > 0 && N > 0 && M % 8 == 0 && N % 8 == 0 && M < lim && N < lim;
    return N > 0 && K > 0 && N % 8 == 0 && K % 8 == 0 && N < lim && K < lim;
}

extern "C" size_t moe_k_grouped_gemm_scratch_bytes(int64_t num_groups) {
    int device = 0;
    if (num_groups <= 0 || !moe_k_grouped_gemm_available() || cudaGetDevice(&device) != cudaSuccess)
        return 0;
    size_t a = moe_k_grouped_gemm_workspace_bf16(num_groups, device);
    size_t b = moe_k_grouped_gemm_workspace_f16(num_groups, device);
    return a > b ? a : b;
}

extern "C" cudaError_t moe_k_grouped_gemm(const moe_k_grouped_gemm_args_t *a,
                                          cudaStream_t stream) {
    if (!a || a->num_groups < 0 || !a->offsets) return cudaErrorInvalidValue;
    if (!moe_k_grouped_gemm_fits(a->M, a->N, a->K, a->kind)) return cudaErrorNotSupported;
    if (a->dtype == MOE_K_BF16) return moe_k_grouped_gemm_bf16(a, stream);
    if (a->dtype == MOE_K_F16) return moe_k_grouped_gemm_f16(a, stream);
    return cudaErrorNotSupported;
}
