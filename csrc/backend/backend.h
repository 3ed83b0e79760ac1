/* backend.h - the backend interface: memory, streams and the ops of one MoE layer.
 *
 * A backend fills a static const moe_backend_ops_t. Every op reads and writes the buffers of a
 * moe_layer_state_t, which the layer owns and allocates through the same backend. The scheduler
 * (csrc/scheduler.c) is the only caller of the ops and the only place that knows their order.
 *
 * Shapes (T tokens of the last forward, K1 = min(K + 1, E), N = T*K rows at most):
 *   x (T, D)  logits, noise_raw, eps, h (T, E)  lse (T)  idx (T, K1)  gate, row (T, K)
 *   xp, yp (N, D)  hpre (N, F2)  act (N, F)   with F2 = 2F for SWIGLU, else F. */
#ifndef MOE_BACKEND_BACKEND_H
#define MOE_BACKEND_BACKEND_H

#include <stdint.h>

#include "moe/moe.h"

#ifdef __cplusplus
extern "C" {
#endif

#define MOE_CONTEXT_MAGIC 0x4D4F4543u /* "MOEC" */
#define MOE_LAYER_MAGIC 0x4D4F454Cu   /* "MOEL" */

typedef struct moe_backend_ops moe_backend_ops_t;
struct moe_optim_scalars; /* core/optim_update.h */

struct moe_context {
    uint32_t magic;
    moe_backend_t backend;
    int device;
    const moe_backend_ops_t *ops;
    void *impl; /* the backend's own state (cuBLAS handle, ...) */
    moe_comm_t *comm;
    int rank, world;
    int64_t num_layers;
};

typedef enum moe_copy_kind {
    MOE_COPY_H2D = 0, /* host -> backend memory */
    MOE_COPY_D2H = 1, /* backend memory -> host */
    MOE_COPY_D2D = 2  /* within backend memory */
} moe_copy_kind_t;

/* per-expert coefficient vectors of the aux-loss gradients (host, filled by router.c) */
typedef struct moe_aux_coefs {
    float *switch_f; /* (E) switch_coef * E / T * f_e */
    float *imp;      /* (E) importance_coef * dCV2/dImp_e */
    float *load;     /* (E) load_coef * dCV2/dload_e */
    float z_scale;   /* z_coef * 2 / T */
    int any_logit;   /* switch or z active: logits get a gradient of their own */
} moe_aux_coefs_t;

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

struct moe_backend_ops {
    const char *name;
    moe_status_t (*context_init)(moe_context_t *ctx);
    void (*context_fini)(moe_context_t *ctx);

    moe_status_t (*alloc)(moe_context_t *ctx, void **ptr, size_t bytes);
    void (*free)(moe_context_t *ctx, void *ptr);
    moe_status_t (*memset_zero)(moe_context_t *ctx, void *ptr, size_t bytes, void *stream);
    moe_status_t (*copy)(moe_context_t *ctx, void *dst, const void *src, size_t bytes,
                         moe_copy_kind_t kind, void *stream);
    moe_status_t (*sync)(moe_context_t *ctx, void *stream);

    /* optional (NULL: nothing to do): the backend's per-layer state in s->impl, made once the
     * layer's config, parameters and host arrays exist, and released before the layer is freed.
     * layer_init may refuse a config the backend cannot serve (NOT_SUPPORTED). */
    moe_status_t (*layer_init)(moe_context_t *ctx, moe_layer_state_t *s);
    void (*layer_fini)(moe_context_t *ctx, moe_layer_state_t *s);

    /* *num_bad = count of NaN/Inf among n floats of x (host value on return) */
    moe_status_t (*count_nonfinite)(moe_context_t *ctx, const void *x, int64_t n,
                                    int64_t *num_bad, void *stream);
    /* optional: the same for n values of x stored in dtype (used instead when not NULL) */
    moe_status_t (*count_nonfinite_typed)(moe_context_t *ctx, const void *x, moe_dtype_t dtype,
                                          int64_t n, int64_t *num_bad, void *stream);

    /* forward ops, in call order */
    moe_status_t (*gate_fwd)(moe_context_t *ctx, moe_layer_state_t *s, void *stream);
    moe_status_t (*route)(moe_context_t *ctx, moe_layer_state_t *s, void *stream);
    moe_status_t (*permute)(moe_context_t *ctx, moe_layer_state_t *s, void *stream);
    moe_status_t (*ffn_fwd)(moe_context_t *ctx, moe_layer_state_t *s, void *stream);
    moe_status_t (*combine_fwd)(moe_context_t *ctx, moe_layer_state_t *s, void *y, void *stream);

    /* backward ops, in call order */
    moe_status_t (*combine_bwd)(moe_context_t *ctx, moe_layer_state_t *s, const void *dy,
                                void *stream);
    moe_status_t (*ffn_bwd)(moe_context_t *ctx, moe_layer_state_t *s, void *stream);
    moe_status_t (*unpermute_bwd)(moe_context_t *ctx, moe_layer_state_t *s, void *dx,
                                  void *stream);
    moe_status_t (*gate_bwd)(moe_context_t *ctx, moe_layer_state_t *s, void *dx, void *stream);

    /* optional (NULL: no optimizer on this backend): one optimizer step over n f32 elements in
     * backend memory, the per-element bodies of core/optim_update.h; adam selects Adam/AdamW,
     * else SGD (m is the momentum buffer, or NULL; v unused) */
    moe_status_t (*optim_update)(moe_context_t *ctx, int adam, float *w, const float *g, float *m,
                                 float *v, int64_t n, const struct moe_optim_scalars *c,
                                 void *stream);
};

extern const moe_backend_ops_t moe_cpu_backend;
#ifdef MOE_WITH_CUDA
extern const moe_backend_ops_t moe_cuda_backend;
#endif

#ifdef __cplusplus
}
#endif

#endif
