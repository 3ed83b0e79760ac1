/* check_io.h - the CHECK family of file I/O (stdio): a failed open, write or close becomes
 * MOE_STATUS_IO_ERROR with the caller's message, the system's reason (errno) and file:line.
 * An I/O failure is never reported as an invalid argument. Never aborts. */
#ifndef MOE_CORE_CHECK_IO_H
#define MOE_CORE_CHECK_IO_H

#include <errno.h>

#include "core/status.h"

#define MOE_IO_ERR(...) moe__io_error(errno, __func__, __FILE__, __LINE__, __VA_ARGS__)

/* ok: the I/O call's success as a condition; the rest is the message */
#define MOE_IO_CHECK(ok, ...)                                                                 \
    do {                                                                                      \
        if (!(ok)) return MOE_IO_ERR(__VA_ARGS__);                                            \
    } while (0)

#define MOE_IO_CHECK_GOTO(ok, st, label, ...)                                                 \
    do {                                                                                      \
        if (!(ok)) {                                                                          \
            (st) = MOE_IO_ERR(__VA_ARGS__);                                                   \
            goto label;                                                                       \
        }                                                                                     \
    } while (0)

#endif
