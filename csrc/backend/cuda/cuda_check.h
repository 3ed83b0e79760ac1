/* cuda_check.h - one CHECK macro per library (CUDA runtime, cuBLAS): a failing call becomes a
 * moe_status_t carrying the call's text, the library's error name and file:line. Never aborts. */
#ifndef MOE_BACKEND_CUDA_CHECK_H
#define MOE_BACKEND_CUDA_CHECK_H

#include <cublas_v2.h>
#include <cuda_runtime_api.h>

#include "core/status.h"

#define MOE_CUDA_CHECK(call)                                                               \
    do {                                                                                   \
        cudaError_t moe_cu_err_ = (call);                                                  \
        if (moe_cu_err_ != cudaSuccess) {                                                  \
            (void)cudaGetLastError(); /* clear a non-sticky error: the handle stays usable */ \
            return MOE_ERR(moe_cu_err_ == cudaErrorMemoryAllocation                        \
                               ? MOE_STATUS_ALLOC_FAILED                                   \
                               : MOE_STATUS_BACKEND_ERROR,                                 \
                           "%s failed: %s (%s)", #call, cudaGetErrorName(moe_cu_err_),     \
                           cudaGetErrorString(moe_cu_err_));                               \
        }                                                                                  \
    } while (0)

#define MOE_CUBLAS_CHECK(call)                                                             \
    do {                                                                                   \
        cublasStatus_t moe_cb_st_ = (call);                                                \
        if (moe_cb_st_ != CUBLAS_STATUS_SUCCESS)                                           \
            return MOE_ERR(moe_cb_st_ == CUBLAS_STATUS_ALLOC_FAILED                        \
                               ? MOE_STATUS_ALLOC_FAILED                                   \
                               : MOE_STATUS_BACKEND_ERROR,                                 \
                           "%s failed: %s (%s)", #call, cublasGetStatusName(moe_cb_st_),   \
                           cublasGetStatusString(moe_cb_st_));                             \
    } while (0)

#endif
