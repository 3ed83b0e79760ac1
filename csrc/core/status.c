/* status.c - status names, the thread-local last-error message, the library version. */
#include "core/status.h"

#include <stdarg.h>
#include <stdio.h>
#include <string.h>

static _Thread_local char moe_tls_error[1024];

const char *moe_status_string(moe_status_t status) {
    switch (status) {
    case MOE_STATUS_SUCCESS: return "MOE_STATUS_SUCCESS";
    case MOE_STATUS_INVALID_ARGUMENT: return "MOE_STATUS_INVALID_ARGUMENT";
    case MOE_STATUS_NOT_SUPPORTED: return "MOE_STATUS_NOT_SUPPORTED";
    case MOE_STATUS_ALLOC_FAILED: return "MOE_STATUS_ALLOC_FAILED";
    case MOE_STATUS_NUMERIC_ERROR: return "MOE_STATUS_NUMERIC_ERROR";
    case MOE_STATUS_BACKEND_ERROR: return "MOE_STATUS_BACKEND_ERROR";
    case MOE_STATUS_COMM_ERROR: return "MOE_STATUS_COMM_ERROR";
    case MOE_STATUS_INTERNAL_ERROR: return "MOE_STATUS_INTERNAL_ERROR";
    case MOE_STATUS_IO_ERROR: return "MOE_STATUS_IO_ERROR";
    }
    return "MOE_STATUS_UNKNOWN";
}

const char *moe_last_error(void) { return moe_tls_error; }

moe_status_t moe__error(moe_status_t status, const char *func, const char *file, int line,
                        const char *fmt, ...) {
    /* keep the path from the project root on: "csrc/layer.c", not the build machine's */
    const char *rel = strstr(file, "csrc/");
    if (!rel) rel = strstr(file, "kernels/");
    if (!rel) rel = file;
    int n = snprintf(moe_tls_error, sizeof moe_tls_error, "%s: ", func);
    if (n < 0 || (size_t)n >= sizeof moe_tls_error) return status;
    va_list ap;
    va_start(ap, fmt);
    int m = vsnprintf(moe_tls_error + n, sizeof moe_tls_error - (size_t)n, fmt, ap);
    va_end(ap);
    if (m < 0) return status;
    size_t used = strlen(moe_tls_error);
    snprintf(moe_tls_error + used, sizeof moe_tls_error - used, " [%s] (%s:%d)",
             moe_status_string(status), rel, line);
    return status;
}

void moe__error_restore(const char *message) {
    snprintf(moe_tls_error, sizeof moe_tls_error, "%s", message);
}

moe_status_t moe__io_error(int err, const char *func, const char *file, int line,
                           const char *fmt, ...) {
    char what[768];
    va_list ap;
    va_start(ap, fmt);
    int m = vsnprintf(what, sizeof what, fmt, ap);
    va_end(ap);
    if (m < 0) what[0] = '\0';
    return moe__error(MOE_STATUS_IO_ERROR, func, file, line, "%s: %s", what,
                      err ? strerror(err) : "unknown reason");
}

void moe_get_version(int *major, int *minor, int *patch) {
    if (major) *major = MOE_VERSION_MAJOR;
    if (minor) *minor = MOE_VERSION_MINOR;
    if (patch) *patch = MOE_VERSION_PATCH;
}
