/* fuzz_input.h - reading a fuzzer's bytes as bounded values: every read succeeds (zeros once the
 * bytes run out), so any input is a valid program for a target. */
#ifndef MOE_FUZZ_INPUT_H
#define MOE_FUZZ_INPUT_H

#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

typedef struct {
    const uint8_t *p;
    size_t n;
} fz_t;

static inline uint8_t fz_u8(fz_t *f) {
    if (f->n == 0) return 0;
    f->n--;
    return *f->p++;
}

static inline uint32_t fz_u32(fz_t *f) {
    uint32_t v = 0;
    for (int i = 0; i < 4; ++i) v |= (uint32_t)fz_u8(f) << (8 * i);
    return v;
}

/* an integer in [lo, hi] */
static inline int64_t fz_range(fz_t *f, int64_t lo, int64_t hi) {
    uint64_t span = (uint64_t)(hi - lo) + 1;
    return lo + (int64_t)(fz_u32(f) % span);
}

/* a float that is usually ordinary, sometimes an edge value (NaN, +-Inf, huge, tiny, -0) */
static inline float fz_float(fz_t *f) {
    uint8_t k = fz_u8(f);
    static const float edge[8] = {0.0f, -0.0f, 1e30f, -1e30f, 3.4e38f, 1e-40f, INFINITY, NAN};
    if (k >= 248) return edge[k - 248];
    return ((float)(int8_t)fz_u8(f)) / 32.0f;
}

/* a double from a table of meaningful values for a coefficient or factor */
static inline double fz_coef(fz_t *f) {
    static const double v[12] = {0.0, 1e-2, 0.5, 1.0, 1.25, 2.0, -1.0, 1e300, 1e308, 1e-300,
                                 INFINITY, NAN};
    return v[fz_u8(f) % 12];
}

#endif
