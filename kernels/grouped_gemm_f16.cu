// grouped_gemm_f16.cu - the f16 half of the CUTLASS grouped expert GEMMs (grouped_gemm.cuh)
#include "kernels/grouped_gemm.cuh"

extern "C" cudaError_t moe_k_grouped_gemm_f16(const moe_k_grouped_gemm_args_t *a,
                                              cudaStream_t stream) {
    return moe_gg::launch<cutlass::half_t>(a, stream);
}

extern "C" size_t moe_k_grouped_gemm_workspace_f16(int64_t num_groups, int device) {
    return moe_gg::max_workspace<cutlass::half_t>(num_groups, device);
}
