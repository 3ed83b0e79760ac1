/* dtype.h - storage types: element sizes and host conversions (round to nearest even). */
#ifndef MOE_CORE_DTYPE_H
#define MOE_CORE_DTYPE_H

#include <stdint.h>
#include <string.h>

#include "moe/moe.h"

static inline size_t moe_dtype_size(moe_dtype_t t) { return t == MOE_DTYPE_F32 ? 4 : 2; }

static inline const char *moe_dtype_name(moe_dtype_t t) {
    return t == MOE_DTYPE_F32 ? "f32" : (t == MOE_DTYPE_BF16 ? "bf16" : "f16");
}

static inline uint16_t moe_f32_to_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7FFFFFFFu) > 0x7F800000u) return (uint16_t)((u >> 16) | 0x40u); /* quiet NaN */
    u += 0x7FFFu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

static inline float moe_bf16_to_f32(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

#endif
