/* clock.h - the monotonic wall clock every timer of the library, the tools and the examples
 * reads (seconds as a double). Header-only, so tools include it without linking anything; a
 * file that includes it defines _POSIX_C_SOURCE >= 199309L (or _GNU_SOURCE) first. */
#ifndef MOE_CORE_CLOCK_H
#define MOE_CORE_CLOCK_H

#include <time.h>

static inline double moe_now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

#endif
