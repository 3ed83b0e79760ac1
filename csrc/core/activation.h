/* activation.h - expert activations and their derivatives, one body for host and device. */
#ifndef MOE_CORE_ACTIVATION_H
#define MOE_CORE_ACTIVATION_H

#include <math.h>

#include "core/hd.h"

/* values of moe_activation_t */
#define MOE_ACT_RELU 0
#define MOE_ACT_GELU 1
#define MOE_ACT_SILU 2
#define MOE_ACT_SWIGLU 3
#define MOE_ACT_IDENTITY 4

static inline MOE_HD float moe_act_sigmoid(float x) { return 1.0f / (1.0f + expf(-x)); }

/* y = act(x) for the elementwise activations (not SWIGLU) */
static inline MOE_HD float moe_act_fwd(int act, float x) {
    switch (act) {
    case MOE_ACT_RELU: return x > 0.0f ? x : 0.0f;
    case MOE_ACT_GELU: return 0.5f * x * (1.0f + erff(x * 0.7071067811865476f));
    case MOE_ACT_IDENTITY: return x;
    default: return x * moe_act_sigmoid(x); /* SILU */
    }
}

/* d act(x) / dx for the elementwise activations */
static inline MOE_HD float moe_act_grad(int act, float x) {
    switch (act) {
    case MOE_ACT_RELU: return x > 0.0f ? 1.0f : 0.0f;
    case MOE_ACT_GELU:
        return 0.5f * (1.0f + erff(x * 0.7071067811865476f)) +
               x * 0.3989422804014327f * expf(-0.5f * x * x);
    case MOE_ACT_IDENTITY: return 1.0f;
    default: {
        float s = moe_act_sigmoid(x);
        return s * (1.0f + x * (1.0f - s));
    }
    }
}

/* SWIGLU: a = silu(g) * u */
static inline MOE_HD float moe_swiglu_fwd(float g, float u) { return g * moe_act_sigmoid(g) * u; }

/* SWIGLU backward: da -> (dg, du) */
static inline MOE_HD void moe_swiglu_bwd(float g, float u, float da, float *dg, float *du) {
    float s = moe_act_sigmoid(g);
    *dg = da * u * s * (1.0f + g * (1.0f - s));
    *du = da * g * s;
}

#endif
