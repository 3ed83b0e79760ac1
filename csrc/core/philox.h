/* philox.h - Philox4x32-10 counter-based RNG (Salmon et al., SC'11), host and device.
 *
 * Every random number in libmoe is a pure function of (key, counter): the gating noise of
 * (seed, forward call, rank, token, expert) and the initial value of (seed, parameter, element).
 * So results do not depend on threads, chunking or backend. */
#ifndef MOE_CORE_PHILOX_H
#define MOE_CORE_PHILOX_H

#include <math.h>
#include <stdint.h>

#include "core/hd.h"

typedef struct moe_philox_out {
    uint32_t v[4];
} moe_philox_out_t;

static inline MOE_HD uint32_t moe__mulhilo32(uint32_t a, uint32_t b, uint32_t *hi) {
    uint64_t p = (uint64_t)a * (uint64_t)b;
    *hi = (uint32_t)(p >> 32);
    return (uint32_t)p;
}

/* the 10-round Philox4x32 bijection of counter c under key k */
static inline MOE_HD moe_philox_out_t moe_philox4x32(uint32_t c0, uint32_t c1, uint32_t c2,
                                                     uint32_t c3, uint64_t key) {
    uint32_t k0 = (uint32_t)key, k1 = (uint32_t)(key >> 32);
    for (int r = 0; r < 10; ++r) {
        uint32_t hi0, hi1;
        uint32_t lo0 = moe__mulhilo32(0xD2511F53u, c0, &hi0);
        uint32_t lo1 = moe__mulhilo32(0xCD9E8D57u, c2, &hi1);
        uint32_t n0 = hi1 ^ c1 ^ k0;
        uint32_t n2 = hi0 ^ c3 ^ k1;
        c0 = n0;
        c1 = lo1;
        c2 = n2;
        c3 = lo0;
        k0 += 0x9E3779B9u;
        k1 += 0xBB67AE85u;
    }
    moe_philox_out_t o;
    o.v[0] = c0;
    o.v[1] = c1;
    o.v[2] = c2;
    o.v[3] = c3;
    return o;
}

/* uniform in the open interval (0, 1): ((u >> 8) + 0.5) / 2^24, exact in double (a float cannot
 * hold the half-step above 1/2) */
static inline MOE_HD double moe_u01(uint32_t u) {
    return ((double)(u >> 8) + 0.5) * (1.0 / 16777216.0);
}

/* counter tag of the gating noise stream */
#define MOE_PHILOX_TAG_NOISE 0x4E4F4953u /* "NOIS" */
/* counter tag of the parameter-init stream */
#define MOE_PHILOX_TAG_INIT 0x494E4954u /* "INIT" */

/* Standard normal for the gating noise of (call, rank, token, expert). Box-Muller on the first
 * two uniforms of one Philox block, in double so host and device agree to the last float bit
 * up to libm's ulp differences. */
static inline MOE_HD float moe_gating_noise(uint64_t seed, uint64_t call, uint32_t rank,
                                            int64_t token, int64_t expert) {
    moe_philox_out_t o = moe_philox4x32((uint32_t)expert, (uint32_t)token,
                                        (uint32_t)call ^ (rank << 24),
                                        MOE_PHILOX_TAG_NOISE ^ (uint32_t)(call >> 32), seed);
    double u1 = moe_u01(o.v[0]);
    double u2 = moe_u01(o.v[1]);
    double r = sqrt(-2.0 * log(u1));
    return (float)(r * cos(6.283185307179586 * u2));
}

/* Uniform in (-bound, bound) for element `index` of parameter `param` (see docs/semantics.md). */
static inline MOE_HD float moe_init_uniform(uint64_t seed, uint32_t param, uint64_t index,
                                            float bound) {
    moe_philox_out_t o = moe_philox4x32((uint32_t)index, (uint32_t)(index >> 32), param,
                                        MOE_PHILOX_TAG_INIT, seed);
    return (float)((2.0 * moe_u01(o.v[0]) - 1.0) * (double)bound);
}

#endif
