/* cuda_shared.h - the CUDA shared experts (cuda_shared.c): called by cuda_backend.c's table
 * entries with the context's cuBLAS handle, already bound to the caller's stream. */
#ifndef MOE_BACKEND_CUDA_CUDA_SHARED_H
#define MOE_BACKEND_CUDA_CUDA_SHARED_H

#include <cublas_v2.h>
#include <cuda_runtime_api.h>

#include "state.h"

#ifdef __cplusplus
extern "C" {
#endif

moe_status_t moe__cu_shared_fwd(cublasHandle_t blas, const moe_shared_fwd_args_t *a,
                                cudaStream_t stream);
moe_status_t moe__cu_shared_combine_bwd(const moe_shared_combine_bwd_args_t *a,
                                        cudaStream_t stream);
moe_status_t moe__cu_shared_bwd(cublasHandle_t blas, const moe_shared_bwd_args_t *a,
                                cudaStream_t stream);

#ifdef __cplusplus
}
#endif

#endif
