/* state.h - what the backend ops see of a layer: its shape, and per op one argument struct
 * naming the buffers that op reads and writes (as kernels/kernels.h does for the launchers).
 * The scheduler (csrc/scheduler.c) fills them from the layer's buffers; a backend never sees
 * the layer handle.
 *
 * Buffers are in backend memory unless marked host. Rows hold values of cfg.dtype (f32 on the
 * CPU backend); routing state and the f32 scratch stay f32. Letters: T tokens of this call,
 * E experts, K per token, K1 = min(K + 1, E), D d_model, F d_ff, F2 = 2F for SWIGLU (else F),
 * N rows of the expert-major buffers (at most T*K on the route side). */
#ifndef MOE_STATE_H
#define MOE_STATE_H

#include <stdint.h>

#include "moe/moe.h"
#include "router/hier_host.h"
#include "router/router_host.h"

#ifdef __cplusplus
extern "C" {
#endif

/* the layer as a backend sees it: shape, effective config (expert choice rewrites gate,
 * renormalize and priority) and the backend's own per-layer state */
typedef struct moe_backend_layer {
    moe_layer_config_t cfg;
    int64_t D, F, F2, E, K, K1;
    int64_t E_local, expert_begin; /* this rank's experts: [expert_begin, expert_begin + E_local) */
    int rank;
    void *impl; /* made by layer_init (NULL without one) */
} moe_backend_layer_t;

/* gate_fwd: router GEMMs, gating noise, top-k, gates, lse and the per-expert sums */
typedef struct moe_gate_fwd_args {
    const moe_backend_layer_t *layer;
    int64_t T;
    int noisy;                      /* draw gating noise (noisy gating while training) */
    uint64_t call;                  /* the layer's noisy-forward counter: keys the noise */
    const void *x;                  /* (T, D) */
    const void *w_router, *w_noise; /* (D, E) each; w_noise NULL without noisy gating */
    const float *score_bias;        /* (E) selection bias of loss-free balancing, or NULL */
    float *logits;                  /* (T, E) out */
    float *noise_raw, *eps, *h;     /* (T, E) out when noisy: x Wn, the noise, noisy scores */
    float *lse;                     /* (T) out */
    int32_t *idx;                   /* (T, K1) out: chosen experts, then the load threshold */
    float *gate;                    /* (T, K) out */
    moe_router_sums_t sums;         /* host out: the per-expert sums of this rank */
    /* routing extensions (router/select.h) */
    const uint8_t *avail;           /* (E) expert availability of this call, or NULL: all */
} moe_gate_fwd_args_t;

/* route: slot assignment of the T*K assignments (router_host.h's rule) */
typedef struct moe_route_args {
    const moe_backend_layer_t *layer;
    int64_t T;
    int64_t capacity;      /* per expert, or -1 when dropless */
    const int32_t *idx;    /* (T, K1) */
    const float *gate;     /* (T, K) */
    const int64_t *counts; /* host (E): claims per expert (the gate's, or forced routing's) */
    int32_t *row;          /* (T, K) out: row in the expert-major buffer, or -1 when dropped */
    int64_t *offsets;      /* host (E + 1) out: start row of each expert's kept rows */
    int64_t *dropped;      /* host (E) out */
    int64_t *num_rows;     /* host out: kept rows */
} moe_route_args_t;

/* permute: xp[row[t, j]] = x[t] for every kept (t, j) */
typedef struct moe_permute_args {
    const moe_backend_layer_t *layer;
    int64_t T;
    const void *x;      /* (T, D) */
    const int32_t *row; /* (T, K) */
    void *xp;           /* (N, D) out: the permuted rows */
} moe_permute_args_t;

/* The rows the expert ops work on: expert e of this rank owns rows [offsets[e], offsets[e + 1])
 * of the row buffers below. With one rank they are the route's rows (route_offsets: the
 * backend's device copy of the route's offsets is current); with expert parallelism the
 * expert side's received rows of one pipeline chunk (the other local experts empty). */
typedef struct moe_expert_rows {
    const int64_t *offsets; /* host (E + 1) */
    int route_offsets;
} moe_expert_rows_t;

/* ffn_fwd: H = X W1 (+ b1), A = act(H), Y = A W2 (+ b2) per local expert */
typedef struct moe_ffn_fwd_args {
    const moe_backend_layer_t *layer;
    moe_expert_rows_t rows;
    const void *w1, *b1; /* (E_local, D, F2), (E_local, F2) or NULL */
    const void *w2, *b2; /* (E_local, F, D), (E_local, D) or NULL */
    const void *x;       /* (N, D) the experts' input rows */
    float *hpre;         /* (N, F2) out, f32: kept for backward */
    void *act;           /* (N, F) out: kept for backward */
    void *y;             /* (N, D) out: the experts' output rows */
} moe_ffn_fwd_args_t;

/* ffn_bwd: dX from dY, weight and bias gradients added into dw1..db2 */
typedef struct moe_ffn_bwd_args {
    const moe_backend_layer_t *layer;
    moe_expert_rows_t rows;
    const void *w1, *w2;     /* as moe_ffn_fwd_args_t */
    void *dw1, *db1;         /* gradients (accumulated), db1 NULL without biases */
    void *dw2, *db2;
    const void *x;           /* (N, D) the forward's input rows */
    const float *hpre;       /* (N, F2) the forward's */
    const void *act;         /* (N, F) the forward's */
    const void *dy;          /* (N, D) gradient of the output rows */
    float *dact;             /* (N, F) scratch, f32 */
    void *dhpre;             /* (N, F2) scratch */
    void *dx;                /* (N, D) out: gradient of the input rows */
} moe_ffn_bwd_args_t;

/* combine_fwd: y[t] = sum_j kept(t, j) gate[t, j] yp[row[t, j]], in j order */
typedef struct moe_combine_fwd_args {
    const moe_backend_layer_t *layer;
    int64_t T;
    const void *yp;     /* (N, D) the experts' output rows, route order */
    const int32_t *row; /* (T, K) */
    const float *gate;  /* (T, K) */
    void *y;            /* (T, D) out */
} moe_combine_fwd_args_t;

/* combine_bwd: dyp[row] = gate dy[t];  dgate[t, j] = <dy[t], yp[row]> (0 when dropped) */
typedef struct moe_combine_bwd_args {
    const moe_backend_layer_t *layer;
    int64_t T;
    const void *dy;     /* (T, D) */
    const void *yp;     /* (N, D) the forward's output rows */
    const int32_t *row; /* (T, K) */
    const float *gate;  /* (T, K) */
    void *dyp;          /* (N, D) out: gradient of the output rows, route order */
    float *dgate;       /* (T, K) out */
} moe_combine_bwd_args_t;

/* unpermute_bwd: dx[t] = sum_j dxp[row[t, j]] in j order (0 when all dropped) */
typedef struct moe_unpermute_bwd_args {
    const moe_backend_layer_t *layer;
    int64_t T;
    const void *dxp;    /* (N, D) gradient of the input rows, route order */
    const int32_t *row; /* (T, K) */
    void *dx;           /* (T, D) out */
} moe_unpermute_bwd_args_t;

/* gate_bwd: gates, aux losses and the noise network, then the router GEMMs; the router's share
 * of dx is added to what unpermute_bwd wrote */
typedef struct moe_gate_bwd_args {
    const moe_backend_layer_t *layer;
    int64_t T;
    int noisy;                      /* the forward drew gating noise */
    const void *x;                  /* (T, D) the forward's input */
    const void *w_router, *w_noise; /* (D, E) */
    const float *logits, *noise_raw, *eps, *h, *lse; /* the forward's, as moe_gate_fwd_args_t */
    const int32_t *idx;             /* (T, K1) */
    const float *gate;              /* (T, K) */
    const float *dgate;             /* (T, K) from combine_bwd */
    const moe_aux_coefs_t *coefs;   /* host: the aux-loss gradient coefficients */
    float *dlogits, *dnoise;        /* (T, E) scratch: gradients of x Wg and x Wn */
    void *dw_router, *dw_noise;     /* (D, E) gradients (accumulated) */
    void *dx;                       /* (T, D) accumulated */
    /* routing extensions (router/select.h) */
    const uint8_t *avail;           /* (E) the forward's expert availability, or NULL: all */
} moe_gate_bwd_args_t;

/* ---- hierarchical gating (router MOE_ROUTER_HIERARCHICAL; router/hier.h, hier_host.h) ----
 * G groups of E / G experts, k1 groups and k2 experts per group per token, K = k1 k2. */

/* gate_hier_fwd: the router GEMMs of both levels, the two-level top-k, gates and the sums */
typedef struct moe_gate_hier_fwd_args {
    const moe_backend_layer_t *layer;
    int64_t T, G, k1, k2;
    const void *x;           /* (T, D) */
    const void *w_primary;   /* (D, G) */
    const void *w_secondary; /* (G, D, E / G) */
    float *logits1;          /* (T, G) out: primary logits */
    float *logits;           /* (T, E) out: every group's secondary logits */
    float *lse;              /* (T) out: logsumexp of the primary logits */
    int32_t *grp;            /* (T, k1) out: chosen groups, best first */
    float *g1;               /* (T, k1) out: their primary gates */
    float *g2;               /* (T, K) out: the secondary gates of the chosen experts */
    int32_t *idx;            /* (T, K1) out: chosen experts (group-major); column K is -1 */
    float *gate;             /* (T, K) out: g1 g2 */
    int64_t *counts;         /* host (E) out: assignments per expert */
    double *sums;            /* host (MOE_HIER_NSUMS(G, E)) out: this rank's sums */
} moe_gate_hier_fwd_args_t;

/* gate_hier_bwd: both levels' gates and aux losses, then the router GEMMs; the routers' share
 * of dx is added to what unpermute_bwd wrote */
typedef struct moe_gate_hier_bwd_args {
    const moe_backend_layer_t *layer;
    int64_t T, G, k1, k2;
    const void *x;                       /* (T, D) the forward's input */
    const void *w_primary, *w_secondary; /* as moe_gate_hier_fwd_args_t */
    const float *logits1, *logits;       /* the forward's */
    const int32_t *grp, *idx;            /* (T, k1), (T, K1) */
    const float *g1, *g2;                /* (T, k1), (T, K) */
    const float *dgate;                  /* (T, K) from combine_bwd */
    const moe_hier_coefs_t *coefs;       /* host: the aux-loss gradient coefficients */
    float *dlogits1, *dlogits;           /* (T, G), (T, E) scratch */
    void *dw_primary, *dw_secondary;     /* gradients (accumulated) */
    void *dx;                            /* (T, D) accumulated */
} moe_gate_hier_bwd_args_t;
/* ---- shared experts (cfg.num_shared_experts = S > 0): every token through each of them ----
 * Letters: S shared experts, Fs = moe_shared_d_ff(cfg), Fs2 = 2 Fs for SWIGLU (else Fs). They
 * read only x and their own (replicated) parameters, never the routing or the exchange. */

static inline int64_t moe_shared_d_ff(const moe_layer_config_t *c) {
    return c->shared_d_ff > 0 ? c->shared_d_ff : c->d_ff;
}

static inline int64_t moe_shared_d_ff2(const moe_layer_config_t *c) {
    return c->activation == MOE_ACTIVATION_SWIGLU ? 2 * moe_shared_d_ff(c) : moe_shared_d_ff(c);
}

/* shared_fwd: ys_s = FFN_s(x) for every s, gate[t] = sigmoid(x[t] . w_gate) (1 without the
 * gate), then y[t] += gate[t] * sum_s ys_s[t] (summed in s order) */
typedef struct moe_shared_fwd_args {
    const moe_backend_layer_t *layer;
    int64_t T;
    const void *x;        /* (T, D) */
    const void *w1, *b1;  /* (S, D, Fs2), (S, Fs2) or NULL */
    const void *w2, *b2;  /* (S, Fs, D), (S, D) or NULL */
    const void *w_gate;   /* (D) or NULL: ungated */
    float *hpre;          /* (S, T, Fs2) out, f32: kept for backward */
    void *act;            /* (S, T, Fs) out: kept for backward */
    void *ys;             /* (S, T, D) out: each shared expert's output rows */
    float *gate;          /* (T) out */
    void *y;              /* (T, D) accumulated */
} moe_shared_fwd_args_t;

/* shared_combine_bwd: dys[t] = gate[t] dy[t];  dlogit[t] = <dy[t], sum_s ys_s[t]> gate (1 - gate)
 * (0 without the gate). Runs while dy is intact (dx may alias dy). */
typedef struct moe_shared_combine_bwd_args {
    const moe_backend_layer_t *layer;
    int64_t T;
    int gated;
    const void *dy;    /* (T, D) */
    const void *ys;    /* (S, T, D) the forward's */
    const float *gate; /* (T) the forward's */
    void *dys;         /* (T, D) out: gradient of every shared expert's output rows */
    float *dlogit;     /* (T) out: gradient of x . w_gate */
} moe_shared_combine_bwd_args_t;

/* shared_bwd: each shared expert's backward from dys (weight gradients accumulated, its dX
 * added into dx in s order), then the gate: dw_gate += sum_t dlogit[t] x[t] (t order),
 * dx[t] += dlogit[t] w_gate */
typedef struct moe_shared_bwd_args {
    const moe_backend_layer_t *layer;
    int64_t T;
    const void *x;                /* (T, D) the forward's input */
    const void *w1, *w2, *w_gate; /* as moe_shared_fwd_args_t */
    void *dw1, *db1, *dw2, *db2;  /* gradients (accumulated), db1/db2 NULL without biases */
    void *dw_gate;                /* (D) accumulated, or NULL without the gate */
    const float *hpre;            /* (S, T, Fs2) the forward's */
    const void *act;              /* (S, T, Fs) the forward's */
    const void *dys;              /* (T, D) from shared_combine_bwd */
    const float *dlogit;          /* (T) from shared_combine_bwd */
    float *dact;                  /* (T, Fs) scratch, f32 */
    void *dhpre;                  /* (T, Fs2) scratch */
    void *dxs;                    /* (T, D) scratch: one shared expert's dX */
    void *dx;                     /* (T, D) accumulated */
} moe_shared_bwd_args_t;

/* ---- per-expert outputs (unfused combine, moe_layer_forward_experts) ---- */

/* experts_out_fwd: ye[t, j] = kept ? yp[row[t, j]] : 0;  ge[t, j] = kept ? gate[t, j] : 0 */
typedef struct moe_experts_out_fwd_args {
    const moe_backend_layer_t *layer;
    int64_t T;
    const void *yp;     /* (N, D) the experts' output rows, route order */
    const int32_t *row; /* (T, K) */
    const float *gate;  /* (T, K) */
    void *ye;           /* (T, K, D) out */
    float *ge;          /* (T, K) out */
} moe_experts_out_fwd_args_t;

/* experts_out_bwd: dyp[row[t, j]] = dye[t, j];  dgate[t, j] = kept ? dge[t, j] : 0 */
typedef struct moe_experts_out_bwd_args {
    const moe_backend_layer_t *layer;
    int64_t T;
    const void *dye;    /* (T, K, D) */
    const float *dge;   /* (T, K) */
    const int32_t *row; /* (T, K) */
    void *dyp;          /* (N, D) out: gradient of the output rows, route order */
    float *dgate;       /* (T, K) out */
} moe_experts_out_bwd_args_t;

struct moe_optim_scalars; /* core/optim_update.h */

/* optim_update: one optimizer step over n f32 elements (core/optim_update.h's bodies) */
typedef struct moe_optim_args {
    int adam;     /* Adam/AdamW, else SGD */
    float *w;     /* (n) parameters, updated */
    const float *g; /* (n) gradient */
    float *m, *v; /* (n) moments: SGD momentum (or NULL) and unused v; Adam's first and second */
    int64_t n;
    const struct moe_optim_scalars *c;
} moe_optim_args_t;

#ifdef __cplusplus
}
#endif

#endif
