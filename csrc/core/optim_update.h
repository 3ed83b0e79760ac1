/* optim_update.h - the per-element update of each optimizer, shared by the CPU loop and a CUDA
 * kernel (formulas in include/moe/moe.h, "Optimizer"). Scalars that depend on the step only
 * (bias corrections, step sizes) are computed once on the host in double and passed in. */
#ifndef MOE_CORE_OPTIM_UPDATE_H
#define MOE_CORE_OPTIM_UPDATE_H

#include <math.h>

#include "core/hd.h"

/* scalars of one step, the same for every element */
typedef struct moe_optim_scalars {
    float lr;           /* learning rate */
    float weight_decay; /* L2 (SGD, ADAM) or decoupled (ADAMW) */
    float momentum;     /* SGD */
    int nesterov;       /* SGD */
    int first;          /* SGD: first step, the momentum buffer starts as the gradient */
    float beta1, beta2; /* ADAM */
    float omb1, omb2;   /* ADAM: 1 - beta1, 1 - beta2 rounded from double (1 - 0.999f is off
                           by 1e-5 relative, which would bias every step) */
    float step_size;    /* ADAM: lr / (1 - beta1^t) */
    float inv_sqrt_bc2; /* ADAM: 1 / sqrt(1 - beta2^t) */
    float eps;          /* ADAM */
    int decoupled;      /* ADAMW: p -= lr*wd*p before the moments */
} moe_optim_scalars_t;

/* SGD on element i; buf is NULL without momentum */
static inline MOE_HD void moe_sgd_update(float *p, const float *g, float *buf, long long i,
                                         const moe_optim_scalars_t *c) {
    float d = g[i] + c->weight_decay * p[i];
    if (buf) {
        float b = c->first ? d : c->momentum * buf[i] + d;
        buf[i] = b;
        d = c->nesterov ? d + c->momentum * b : b;
    }
    p[i] -= c->lr * d;
}

/* Adam / AdamW on element i */
static inline MOE_HD void moe_adam_update(float *p, const float *g, float *m, float *v,
                                          long long i, const moe_optim_scalars_t *c) {
    float pi = p[i];
    float gi = g[i];
    if (c->decoupled)
        pi -= c->lr * c->weight_decay * pi;
    else
        gi += c->weight_decay * pi;
    float mi = c->beta1 * m[i] + c->omb1 * gi;
    float vi = c->beta2 * v[i] + c->omb2 * gi * gi;
    m[i] = mi;
    v[i] = vi;
    p[i] = pi - c->step_size * mi / (sqrtf(vi) * c->inv_sqrt_bc2 + c->eps);
}

#endif
