/* check_nccl.h - the CHECK family of NCCL: a failing call becomes MOE_STATUS_COMM_ERROR with
 * the call's text, NCCL's error string and file:line. ncclInProgress (a non-blocking
 * communicator still working) is not a failure. Never aborts. */
#ifndef MOE_CORE_CHECK_NCCL_H
#define MOE_CORE_CHECK_NCCL_H

#include <nccl.h>

#include "core/status.h"

static inline int moe__nccl_ok(ncclResult_t r) { return r == ncclSuccess || r == ncclInProgress; }

static inline moe_status_t moe__nccl_error(ncclResult_t r, const char *call, const char *func,
                                           const char *file, int line) {
    return moe__error(MOE_STATUS_COMM_ERROR, func, file, line, "%s failed: %s", call,
                      ncclGetErrorString(r));
}

#define MOE_NCCL_CHECK(call)                                                                  \
    do {                                                                                      \
        ncclResult_t moe_nccl_r_ = (call);                                                    \
        if (!moe__nccl_ok(moe_nccl_r_))                                                       \
            return moe__nccl_error(moe_nccl_r_, #call, __func__, __FILE__, __LINE__);         \
    } while (0)

/* for a result already in hand (an NCCL call made through a function pointer) */
#define MOE_NCCL_ERR(result, what) moe__nccl_error((result), (what), __func__, __FILE__, __LINE__)

#endif
