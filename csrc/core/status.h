/* status.h - how libmoe reports failure: a status code plus a thread-local message.
 *
 * MOE_ERR(status, fmt, ...) records "function: message (file:line)" for moe_last_error() and
 * evaluates to status. MOE_CHECK returns a failing status to the caller; MOE_CHECK_GOTO jumps to
 * one cleanup label. Nothing here exits, aborts or prints. */
#ifndef MOE_CORE_STATUS_H
#define MOE_CORE_STATUS_H

#include "moe/moe.h"

#if defined(__GNUC__)
#define MOE_PRINTF(a, b) __attribute__((format(printf, a, b)))
#else
#define MOE_PRINTF(a, b)
#endif

#ifdef __cplusplus
extern "C" {
#endif

moe_status_t moe__error(moe_status_t status, const char *func, const char *file, int line,
                        const char *fmt, ...) MOE_PRINTF(5, 6);

/* as moe__error with MOE_STATUS_IO_ERROR, the message followed by strerror(err) (the I/O CHECK
 * family of core/check_io.h) */
moe_status_t moe__io_error(int err, const char *func, const char *file, int line,
                           const char *fmt, ...) MOE_PRINTF(5, 6);

/* puts back a message saved from moe_last_error() (after calls that may have replaced it) */
void moe__error_restore(const char *message);

#ifdef __cplusplus
}
#endif

#define MOE_ERR(status, ...) moe__error((status), __func__, __FILE__, __LINE__, __VA_ARGS__)

#define MOE_CHECK(call)                                  \
    do {                                                 \
        moe_status_t moe_check_st_ = (call);             \
        if (moe_check_st_ != MOE_STATUS_SUCCESS)         \
            return moe_check_st_;                        \
    } while (0)

#define MOE_CHECK_GOTO(call, st, label)                  \
    do {                                                 \
        (st) = (call);                                   \
        if ((st) != MOE_STATUS_SUCCESS) goto label;      \
    } while (0)

/* argument check at an API entry: INVALID_ARGUMENT with the condition's message */
#define MOE_ARG(cond, ...)                                                  \
    do {                                                                    \
        if (!(cond)) return MOE_ERR(MOE_STATUS_INVALID_ARGUMENT, __VA_ARGS__); \
    } while (0)

#ifndef NDEBUG
#include <assert.h>
#define MOE_ASSERT(x) assert(x)
#else
#define MOE_ASSERT(x) ((void)0)
#endif

#endif
