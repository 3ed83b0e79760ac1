/* check_cuda.h - the CHECK family of the CUDA runtime and cuBLAS: a failing call becomes a
 * moe_status_t carrying the call's text, the library's error name and file:line. Never aborts.
 *
 * Statuses: an allocation failure is MOE_STATUS_ALLOC_FAILED, every other failure
 * MOE_STATUS_BACKEND_ERROR (include/moe/moe.h). */
#ifndef MOE_CORE_CHECK_CUDA_H
#define MOE_CORE_CHECK_CUDA_H

#include <cublas_v2.h>
#include <cuda_runtime_api.h>

#include "core/status.h"

static inline moe_status_t moe__cuda_error(cudaError_t e, const char *call, const char *func,
                                           const char *file, int line) {
    (void)cudaGetLastError(); /* clear a non-sticky error: the handle stays usable */
    return moe__error(e == cudaErrorMemoryAllocation ? MOE_STATUS_ALLOC_FAILED
                                                     : MOE_STATUS_BACKEND_ERROR,
                      func, file, line, "%s failed: %s (%s)", call, cudaGetErrorName(e),
                      cudaGetErrorString(e));
}

static inline moe_status_t moe__cublas_error(cublasStatus_t s, const char *call,
                                             const char *func, const char *file, int line) {
    return moe__error(s == CUBLAS_STATUS_ALLOC_FAILED ? MOE_STATUS_ALLOC_FAILED
                                                      : MOE_STATUS_BACKEND_ERROR,
                      func, file, line, "%s failed: %s (%s)", call, cublasGetStatusName(s),
                      cublasGetStatusString(s));
}

#define MOE_CUDA_CHECK(call)                                                                  \
    do {                                                                                      \
        cudaError_t moe_cu_err_ = (call);                                                     \
        if (moe_cu_err_ != cudaSuccess)                                                       \
            return moe__cuda_error(moe_cu_err_, #call, __func__, __FILE__, __LINE__);         \
    } while (0)

#define MOE_CUDA_CHECK_GOTO(call, st, label)                                                  \
    do {                                                                                      \
        cudaError_t moe_cu_err_ = (call);                                                     \
        if (moe_cu_err_ != cudaSuccess) {                                                     \
            (st) = moe__cuda_error(moe_cu_err_, #call, __func__, __FILE__, __LINE__);         \
            goto label;                                                                       \
        }                                                                                     \
    } while (0)

/* for an error already in hand (a polled stream) */
#define MOE_CUDA_ERR(err, what) moe__cuda_error((err), (what), __func__, __FILE__, __LINE__)

#define MOE_CUBLAS_CHECK(call)                                                                \
    do {                                                                                      \
        cublasStatus_t moe_cb_st_ = (call);                                                   \
        if (moe_cb_st_ != CUBLAS_STATUS_SUCCESS)                                              \
            return moe__cublas_error(moe_cb_st_, #call, __func__, __FILE__, __LINE__);        \
    } while (0)

#endif
