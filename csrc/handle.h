/* handle.h - the layer handle (internal): what one moe_layer_t holds. The layer (layer.c) owns
 * it; the scheduler, buffers and traces work on it. Nothing here calls anything. */
#ifndef MOE_HANDLE_H
#define MOE_HANDLE_H

#include <stdint.h>

#include "context.h"
#include "core/status.h"
#include "moe/moe.h"
#include "state.h"

#ifdef __cplusplus
extern "C" {
#endif

#define MOE_LAYER_MAGIC 0x4D4F454Cu /* "MOEL" */

/* The layer's shape, parameters and buffers (the backend ops see them through state.h's
 * argument structs). Shapes (T tokens of the last forward, N = T*K rows at most):
 *   x (T, D)  logits, noise_raw, eps, h (T, E)  lse (T)  idx (T, K1)  gate, row (T, K)
 *   xp, yp (N, D)  hpre (N, F2)  act (N, F). */
typedef struct moe_layer_state {
    moe_layer_config_t cfg;
    int64_t D, F, F2, E, K, K1;
    int64_t E_local, expert_begin; /* this rank's experts: [expert_begin, expert_begin + E_local)
                                      with one rank; with P > 1 its E_local placement slots
                                      (moe_placement_t) and expert_begin 0 */
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

    /* x, xp, act, yp, dyp, dhpre, dxp hold values of cfg.dtype (f32 on the CPU backend; the
     * CUDA backend reads them through void pointers when the dtype is 16-bit); the rest is f32 */
    float *score_bias; /* (E) selection bias of loss-free balancing, backend memory, or NULL */
    float *x, *logits, *noise_raw, *eps, *h, *lse;
    int32_t *idx, *row;
    float *gate;
    float *xp, *hpre, *act, *yp;
    /* backward scratch */
    float *dyp, *dact, *dhpre, *dxp, *dg, *dlogits, *dnoise;
    /* expert parallelism with a placement whose destinations are not contiguous in xp: the
     * rows in send order [chunk][destination][slot] (N, D), else NULL (placement.c decides) */
    void *sendp;
    int pack_rows; /* sendp is needed (set by placement.c) */

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

    void *impl; /* the backend's own per-layer state (layer_init; NULL for the CPU backend) */

    /* hierarchical gating (router MOE_ROUTER_HIERARCHICAL; NULL and 0 for the other routers):
     * G groups, k1 and k2 choices per token; per-token buffers logits1, dlogits1 (T, G),
     * grp, g1 (T, k1), g2 (T, K); host sums and coefficients */
    int64_t G, k1, k2;
    float *h_logits1, *h_dlogits1, *h_g1, *h_g2;
    int32_t *h_grp;
    double *hier_sums_h; /* (MOE_HIER_NSUMS(G, E)) */
    moe_hier_coefs_t hier_coefs;
    /* shared experts (S = cfg.num_shared_experts > 0; NULL otherwise), per token: hpre
     * (S, T, Fs2) f32, act (S, T, Fs), ys (S, T, D), gate (T) f32; backward scratch dys (T, D),
     * dact (T, Fs) f32, dhpre (T, Fs2), dxs (T, D), dlogit (T) f32. Rows in cfg.dtype. */
    float *sh_hpre, *sh_gate, *sh_dact, *sh_dlogit;
    void *sh_act, *sh_ys, *sh_dys, *sh_dhpre, *sh_dxs;
} moe_layer_state_t;

/* Which rank holds which experts (placement.c). A slot is one (rank, expert) pair; slots are
 * numbered rank after rank, and each rank's experts ascend. An expert held by several ranks is
 * replicated: each source splits its rows of that expert over the replicas (the rule is in
 * moe__placement_split). Host arrays. */
typedef struct moe_placement {
    int P;
    int64_t E, S;          /* ranks, experts, slots (S >= E) */
    int64_t E_max;         /* most slots of one rank */
    int64_t *rank_begin;   /* (P + 1) rank q's slots are [rank_begin[q], rank_begin[q + 1]) */
    int32_t *slot_expert;  /* (S) the expert of each slot */
    int32_t *slot_rank;    /* (S) the rank of each slot */
    int64_t *rep_begin;    /* (E + 1) expert e's slots are rep_slot[rep_begin[e] ..] */
    int64_t *rep_slot;     /* (S) the slots of each expert, ascending (so by rank) */
    int replicated;        /* some expert has more than one slot */
    int contiguous;        /* no replicas and every rank's experts are one id range: the
                              expert-major buffer is already destination-major (no packing) */
    int64_t *piece_off, *piece_rows; /* (S) this rank's rows for each slot, in xp (a forward's) */
    double *load_acc;      /* (E) assignments per expert summed over forwards since the last
                              moe_layer_expert_load reset (global counts) */
} moe_placement_t;

/* the exchange plan of one forward with expert parallelism (host arrays) */
typedef struct moe_exchange {
    int64_t *send_counts; /* (P, E_max) kept rows this rank sends to each slot of each rank */
    int64_t *recv_counts; /* (P, E_max) rows each source rank sends to each local slot */
    int64_t *ex_offsets;           /* (E + 1) expert-side rows: entries of the local experts */
    int64_t rows;                  /* rows this rank's experts received */
    int64_t num_chunks;            /* pipeline chunks of local experts */
    int64_t *chunk_plan;           /* (MOE_MAX_CHUNKS, 4, P) send rows/off, recv rows/off */
    int64_t *chunk_offsets;        /* (E + 1) expert-side offsets of one chunk's experts */
} moe_exchange_t;

struct moe_layer {
    uint32_t magic;
    moe_context_t *ctx;
    moe_layer_state_t s;

    /* Expert side (P > 1 only): rows the local experts process, (rows, D) each, in expert
     * order [local expert][source rank]; ex_wire holds rows in exchange order
     * [chunk][source][expert] as they arrive and depart (forward: x in, y out; backward: dy
     * in, dx out). With P = 1 the experts work on the route's xp, yp, dyp, dxp. */
    int64_t cap_rows;
    void *ex_wire;
    void *ex_x;  /* the experts' input rows, kept for backward */
    void *ex_y;  /* the experts' output rows */
    void *ex_dy; /* gradient of the output rows */
    void *ex_dx; /* gradient of the input rows */
    moe_exchange_t ex;
    moe_placement_t pl; /* which rank holds which experts */

    float *score_bias_h; /* (E) host mirror of s.score_bias (loss-free balancing) */

    /* expert availability (routing extensions): the user's mask and the last forward's
     * availability (host, E each), its backend copy (E bytes), and the counter of training
     * forwards that keys the dropout draw */
    uint8_t *expert_mask_h;
    uint8_t *avail_h;
    uint8_t *avail_d;
    int avail_all;          /* the last forward had every expert available: ops get NULL */
    int64_t num_available;  /* available experts in the last forward */
    uint64_t train_calls;

    int profiling;
    double phase_s[MOE_PHASE_COUNT];

    /* routing trace (trace.c) */
    void *trace; /* FILE * */
    uint32_t trace_layer_id;
    int64_t trace_step;
    /* forced routing for the next forward, host (forced_T, K); forced_last: the last forward
     * used one (its backward gives the router no gradient) */
    int32_t *forced_idx;
    float *forced_gate;
    int64_t forced_T;
    int forced_last;

    /* handle lifetimes: optimizers created on this layer and not yet destroyed (optim.c);
     * moe_layer_destroy refuses while any is alive, so no optimizer reads a freed layer */
    int64_t num_optimizers;

    /* numeric checks of the outputs (numerics.c): 0 = on (the default), 1 = turned off by
     * moe_layer_set_check_numerics(layer, 0) */
    int skip_numeric_checks;

    /* expert parallelism (moe.h, "Agreement"): what this layer's agreement steps carry (the
     * same on every rank: set from the communicator's step count at creation), and whether a
     * collective call of it is between its agreement step and its last collective (a failure
     * there breaks the communicator for every rank, as the peers may be waiting) */
    uint64_t agree_key;
    int exchange_open;
};

/* the layer as the backend ops see it (state.h), made from the state at each call */
static inline moe_backend_layer_t moe__backend_layer(const moe_layer_state_t *s) {
    return (moe_backend_layer_t){.cfg = s->cfg,
                                 .D = s->D,
                                 .F = s->F,
                                 .F2 = s->F2,
                                 .E = s->E,
                                 .K = s->K,
                                 .K1 = s->K1,
                                 .E_local = s->E_local,
                                 .expert_begin = s->expert_begin,
                                 .rank = s->rank,
                                 .impl = s->impl};
}

/* argument check at the entry of a public moe_layer_* call */
#define MOE_LAYER_ARG(layer)                                                                  \
    MOE_ARG((layer) != NULL && (layer)->magic == MOE_LAYER_MAGIC, "layer is %s",              \
            (layer) == NULL ? "NULL" : "not a live moe_layer_t")

#ifdef __cplusplus
}
#endif

#endif
