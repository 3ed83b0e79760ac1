/* check_mpi.h - the CHECK family of MPI: a failing call (on a communicator whose error handler
 * returns) becomes MOE_STATUS_COMM_ERROR with the call's text, MPI's error string and
 * file:line. Never aborts. */
#ifndef MOE_CORE_CHECK_MPI_H
#define MOE_CORE_CHECK_MPI_H

#include <mpi.h>

#include "core/status.h"

static inline moe_status_t moe__mpi_error(int rc, const char *call, const char *func,
                                          const char *file, int line) {
    char msg[MPI_MAX_ERROR_STRING];
    int len = 0;
    if (MPI_Error_string(rc, msg, &len) != MPI_SUCCESS || len < 0) len = 0;
    msg[len < MPI_MAX_ERROR_STRING ? len : MPI_MAX_ERROR_STRING - 1] = '\0';
    return moe__error(MOE_STATUS_COMM_ERROR, func, file, line, "%s failed: %s (code %d)", call,
                      msg, rc);
}

#define MOE_MPI_CHECK(call)                                                                   \
    do {                                                                                      \
        int moe_mpi_rc_ = (call);                                                             \
        if (moe_mpi_rc_ != MPI_SUCCESS)                                                       \
            return moe__mpi_error(moe_mpi_rc_, #call, __func__, __FILE__, __LINE__);          \
    } while (0)

#define MOE_MPI_CHECK_GOTO(call, st, label)                                                   \
    do {                                                                                      \
        int moe_mpi_rc_ = (call);                                                             \
        if (moe_mpi_rc_ != MPI_SUCCESS) {                                                     \
            (st) = moe__mpi_error(moe_mpi_rc_, #call, __func__, __FILE__, __LINE__);          \
            goto label;                                                                       \
        }                                                                                     \
    } while (0)

#endif
