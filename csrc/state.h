/* state.h - what the backend ops see of a layer: its shape, parameters and buffers. The layer
 * (csrc/layer.c) owns and allocates them through the same backend; the scheduler
 * (csrc/scheduler.c) is the only caller of the ops.
 *
 * Shapes (T tokens of the last forward, K1 = min(K + 1, E), N = T*K rows at most):
 *   x (T, D)  logits, noise_raw, eps, h (T, E)  lse (T)  idx (T, K1)  gate, row (T, K)
 *   xp, yp (N, D)  hpre (N, F2)  act (N, F)   with F2 = 2F for SWIGLU, else F. */
#ifndef MOE_STATE_H
#define MOE_STATE_H

#include <stdint.h>

#include "moe/moe.h"
#include "router/router_host.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef struct moe_layer_state {
    moe_layer_config_t cfg;
    int64_t D, F, F2, E, K, K1;
    int64_t E_local, expert_begin; /* this rank's experts: [expert_begin, expert_begin + E_local) */
    int rank;

    /* parameters and gradients in backend memory (NULL when turned off), element counts */
    void *param[MOE_PARAM_COUNT];
    void *grad[MOE_PARAM_COUNT];
    int64_t numel[MOE_PARAM_COUNT];

    /* forward state */
    int64_t cap_tokens;   /* tokens the buffers below hold */
    int64_t T;            /* tokens of the last forward */
    int64_t capacity;     /* C per expert, or -1 when dropless */
    uint64_t call;        /* forward calls so far: keys the gating noise */
    int noisy_now;        /* noisy_gating && training in the last forward */
    int have_forward;     /* a forward has succeeded */
    int64_t num_rows;     /* kept assignments = rows of xp */
    int expert_side;      /* set in the scheduler's expert-parallel view: xp..dxp and offsets_h
                             are the expert side's (received rows), not the route's */

    /* x, xp, act, yp, dyp, dhpre, dxp hold values of cfg.dtype (f32 on the CPU backend; the
     * CUDA backend reads them through void pointers when the dtype is 16-bit); the rest is f32 */
    float *score_bias; /* (E) selection bias of loss-free balancing, backend memory, or NULL */
    float *x, *logits, *noise_raw, *eps, *h, *lse;
    int32_t *idx, *row;
    float *gate;
    float *xp, *hpre, *act, *yp;
    /* backward scratch */
    float *dyp, *dact, *dhpre, *dxp, *dg, *dlogits, *dnoise;

    /* host mirrors: what the scheduler and moe_layer_stats read */
    int64_t *offsets_h;       /* (E + 1) start row of each expert in xp */
    int64_t *counts_h;        /* (E) assignments per expert before dropping */
    int64_t *dropped_h;       /* (E) dropped per expert */
    double *prob_sum_h;       /* (E) sum_t softmax(logits_t)_e */
    double *importance_h;     /* (E) sum_t gate weight of e */
    double *load_h;           /* (E) Shazeer's smooth load, or the count */
    double z_sum;             /* sum_t lse_t^2 */
    moe_aux_coefs_t coefs;
    moe_routing_stats_t stats;

    void *impl; /* the backend's own per-layer state (NULL for the CPU backend) */
} moe_layer_state_t;

#ifdef __cplusplus
}
#endif

#endif
