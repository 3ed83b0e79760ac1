/* optim.c - moe_optimizer_*: SGD (momentum, Nesterov) and Adam/AdamW over one layer's parameters.
 *
 * The optimizer owns one or two moment buffers per parameter, allocated through the layer's
 * backend. The per-element math is in core/optim_update.h, shared by every backend's
 * optim_update op (backend/cpu/optim.c, the CUDA kernel in kernels/optim.cu). */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "backend/backend.h"
#include "core/optim_update.h"
#include "core/status.h"
#include "handle.h"
#include "optim.h"

#define MOE_OPTIMIZER_MAGIC 0x4D4F454Fu /* "MOEO" */

struct moe_optimizer {
    uint32_t magic;
    moe_layer_t *layer;
    moe_context_t *ctx; /* the layer's: frees the moments */
    moe_optimizer_config_t cfg;
    int64_t num_steps;
    void *m[MOE_PARAM_COUNT]; /* SGD: momentum buffer (NULL without momentum); ADAM: 1st moment */
    void *v[MOE_PARAM_COUNT]; /* ADAM: 2nd moment; SGD: NULL */
};

moe_optimizer_config_t moe_optimizer_config_default(moe_optimizer_kind_t kind) {
    moe_optimizer_config_t c;
    memset(&c, 0, sizeof c);
    c.struct_size = sizeof c;
    c.kind = kind;
    c.beta1 = 0.9;
    c.beta2 = 0.999;
    c.eps = 1e-8;
    if (kind == MOE_OPTIMIZER_ADAM || kind == MOE_OPTIMIZER_ADAMW) {
        c.lr = 1e-3;
        c.weight_decay = kind == MOE_OPTIMIZER_ADAMW ? 1e-2 : 0.0;
    } else {
        c.lr = 1e-2;
        c.momentum = 0.9;
    }
    return c;
}

static int is_adam(const moe_optimizer_config_t *c) {
    return c->kind == MOE_OPTIMIZER_ADAM || c->kind == MOE_OPTIMIZER_ADAMW;
}

static moe_status_t validate(const moe_optimizer_config_t *c) {
    MOE_ARG(c->struct_size == sizeof(moe_optimizer_config_t),
            "cfg->struct_size is %zu, expected %zu: start from moe_optimizer_config_default()",
            c->struct_size, sizeof(moe_optimizer_config_t));
    MOE_ARG(c->kind == MOE_OPTIMIZER_SGD || is_adam(c), "cfg->kind %d is not a "
            "moe_optimizer_kind_t", (int)c->kind);
    MOE_ARG(isfinite(c->lr) && c->lr >= 0.0, "cfg->lr %g must be finite and >= 0", c->lr);
    MOE_ARG(isfinite(c->weight_decay) && c->weight_decay >= 0.0,
            "cfg->weight_decay %g must be finite and >= 0", c->weight_decay);
    if (c->kind == MOE_OPTIMIZER_SGD) {
        MOE_ARG(c->momentum >= 0.0 && c->momentum < 1.0, "cfg->momentum %g is not in [0, 1)",
                c->momentum);
        MOE_ARG(!c->nesterov || c->momentum > 0.0, "cfg->nesterov needs cfg->momentum > 0");
    } else {
        MOE_ARG(c->beta1 >= 0.0 && c->beta1 < 1.0, "cfg->beta1 %g is not in [0, 1)", c->beta1);
        MOE_ARG(c->beta2 >= 0.0 && c->beta2 < 1.0, "cfg->beta2 %g is not in [0, 1)", c->beta2);
        MOE_ARG(isfinite(c->eps) && c->eps > 0.0, "cfg->eps %g must be finite and > 0", c->eps);
    }
    return MOE_STATUS_SUCCESS;
}

/* ---------------------------------------------------------------------------------------------
 * the update loop of each backend
 * ------------------------------------------------------------------------------------------- */

typedef moe_status_t (*update_fn_t)(const moe_optimizer_t *o, int p,
                                    const moe_optim_scalars_t *c, void *stream);

/* the backend's own update loop on its memory */
static moe_status_t backend_update(const moe_optimizer_t *o, int p, const moe_optim_scalars_t *c,
                                   void *stream) {
    const moe_layer_state_t *s = &o->layer->s;
    const moe_optim_args_t a = {.adam = is_adam(&o->cfg),
                                .w = (float *)s->param[p],
                                .g = (const float *)s->grad[p],
                                .m = (float *)o->m[p],
                                .v = (float *)o->v[p],
                                .n = s->numel[p],
                                .c = c};
    return o->ctx->ops->optim_update(o->ctx, &a, stream);
}

/* the backend's optim_update op (CPU loop or CUDA kernel), where it has one. f32 parameters
 * only: 16-bit parameters would need f32 master weights, which the optimizer does not keep. */
static moe_status_t update_fn(const moe_layer_t *layer, update_fn_t *fn) {
    *fn = NULL;
    if (layer->s.cfg.dtype != MOE_DTYPE_F32)
        return MOE_ERR(MOE_STATUS_NOT_SUPPORTED,
                       "the optimizer updates f32 parameters only (this layer stores %s: update "
                       "its parameters from moe_layer_param() with f32 master weights)",
                       layer->s.cfg.dtype == MOE_DTYPE_BF16 ? "bf16" : "f16");
    if (layer->ctx->ops->optim_update) {
        *fn = backend_update;
        return MOE_STATUS_SUCCESS;
    }
    return MOE_ERR(MOE_STATUS_NOT_SUPPORTED, "optimizer on backend '%s': it has no update loop",
                   layer->ctx->ops->name ? layer->ctx->ops->name : "?");
}

/* ---------------------------------------------------------------------------------------------
 * public API
 * ------------------------------------------------------------------------------------------- */

#define MOE_OPT_ARG(opt)                                                                      \
    MOE_ARG((opt) != NULL && (opt)->magic == MOE_OPTIMIZER_MAGIC, "opt is %s",                \
            (opt) == NULL ? "NULL" : "not a live moe_optimizer_t")

static void free_moments(moe_optimizer_t *o) {
    moe_context_t *ctx = o->ctx;
    for (int p = 0; p < MOE_PARAM_COUNT; ++p) {
        ctx->ops->mem.free(ctx, o->m[p]);
        ctx->ops->mem.free(ctx, o->v[p]);
        o->m[p] = o->v[p] = NULL;
    }
}

moe_status_t moe_optimizer_create(moe_optimizer_t **opt, moe_layer_t *layer,
                                  const moe_optimizer_config_t *cfg) {
    MOE_ARG(opt != NULL, "opt is NULL");
    *opt = NULL;
    MOE_LAYER_ARG(layer);
    MOE_ARG(cfg != NULL, "cfg is NULL");
    MOE_CHECK(validate(cfg));
    update_fn_t fn;
    MOE_CHECK(update_fn(layer, &fn));

    moe_optimizer_t *o = (moe_optimizer_t *)calloc(1, sizeof *o);
    if (!o) return MOE_ERR(MOE_STATUS_ALLOC_FAILED, "optimizer handle");
    o->layer = layer;
    o->ctx = layer->ctx;
    o->cfg = *cfg;
    moe_context_t *ctx = layer->ctx;
    int nbuf = is_adam(cfg) ? 2 : cfg->momentum > 0.0 ? 1 : 0;
    moe_status_t st = MOE_STATUS_SUCCESS;
    for (int p = 0; p < MOE_PARAM_COUNT; ++p) {
        size_t bytes = (size_t)layer->s.numel[p] * sizeof(float);
        if (!layer->s.param[p] || bytes == 0) continue;
        for (int b = 0; b < nbuf; ++b) {
            void **slot = b == 0 ? &o->m[p] : &o->v[p];
            MOE_CHECK_GOTO(ctx->ops->mem.alloc(ctx, slot, bytes), st, fail);
            MOE_CHECK_GOTO(ctx->ops->mem.memset_zero(ctx, *slot, bytes, NULL), st, fail);
        }
    }
    MOE_CHECK_GOTO(ctx->ops->mem.sync(ctx, NULL), st, fail);
    o->magic = MOE_OPTIMIZER_MAGIC;
    layer->num_optimizers++; /* the layer now refuses to be destroyed before this optimizer */
    *opt = o;
    return MOE_STATUS_SUCCESS;
fail:
    free_moments(o);
    free(o);
    return st;
}

moe_status_t moe_optimizer_step(moe_optimizer_t *opt, void *stream) {
    MOE_OPT_ARG(opt);
    /* the layer outlives the optimizer: moe_layer_destroy refuses while one points at it */
    moe_layer_t *layer = opt->layer;
    update_fn_t fn;
    MOE_CHECK(update_fn(layer, &fn));
    moe_context_t *ctx = layer->ctx;
    const moe_layer_state_t *s = &layer->s;

    /* a non-finite gradient would poison the parameters and the moments for good: refuse the
     * whole step before touching anything */
    for (int p = 0; p < MOE_PARAM_COUNT; ++p) {
        if (!s->param[p] || s->numel[p] == 0) continue;
        int64_t bad = 0;
        MOE_CHECK(ctx->ops->count_nonfinite(ctx, s->grad[p], s->numel[p], &bad, stream));
        if (bad)
            return MOE_ERR(MOE_STATUS_NUMERIC_ERROR,
                           "the gradient of parameter %d holds %lld NaN/Inf values: nothing "
                           "was updated", p, (long long)bad);
    }

    const moe_optimizer_config_t *c = &opt->cfg;
    const double t = (double)(opt->num_steps + 1);
    moe_optim_scalars_t sc;
    memset(&sc, 0, sizeof sc);
    sc.lr = (float)c->lr;
    sc.weight_decay = (float)c->weight_decay;
    sc.momentum = (float)c->momentum;
    sc.nesterov = c->nesterov;
    sc.first = opt->num_steps == 0;
    sc.beta1 = (float)c->beta1;
    sc.beta2 = (float)c->beta2;
    sc.omb1 = (float)(1.0 - c->beta1);
    sc.omb2 = (float)(1.0 - c->beta2);
    sc.eps = (float)c->eps;
    sc.decoupled = c->kind == MOE_OPTIMIZER_ADAMW;
    if (is_adam(c)) {
        sc.step_size = (float)(c->lr / (1.0 - pow(c->beta1, t)));
        sc.inv_sqrt_bc2 = (float)(1.0 / sqrt(1.0 - pow(c->beta2, t)));
    }
    for (int p = 0; p < MOE_PARAM_COUNT; ++p)
        if (s->param[p] && s->numel[p] > 0) MOE_CHECK(fn(opt, p, &sc, stream));
    opt->num_steps++;
    return MOE_STATUS_SUCCESS;
}

moe_status_t moe_optimizer_set_lr(moe_optimizer_t *opt, double lr) {
    MOE_OPT_ARG(opt);
    MOE_ARG(isfinite(lr) && lr >= 0.0, "lr %g must be finite and >= 0", lr);
    opt->cfg.lr = lr;
    return MOE_STATUS_SUCCESS;
}

moe_status_t moe_optimizer_get_config(const moe_optimizer_t *opt, moe_optimizer_config_t *cfg,
                                      int64_t *num_steps) {
    MOE_OPT_ARG(opt);
    if (cfg) *cfg = opt->cfg;
    if (num_steps) *num_steps = opt->num_steps;
    return MOE_STATUS_SUCCESS;
}

moe_status_t moe_optimizer_destroy(moe_optimizer_t *opt) {
    if (!opt) return MOE_STATUS_SUCCESS;
    MOE_OPT_ARG(opt);
    free_moments(opt);
    opt->layer->num_optimizers--;
    opt->magic = 0;
    free(opt);
    return MOE_STATUS_SUCCESS;
}

/* ---------------------------------------------------------------------------------------------
 * for placement.c: the moments move with the experts
 * ------------------------------------------------------------------------------------------- */

moe_layer_t *moe__optimizer_layer(const moe_optimizer_t *opt) {
    return opt && opt->magic == MOE_OPTIMIZER_MAGIC ? opt->layer : NULL;
}

int moe__optimizer_num_moments(const moe_optimizer_t *opt) {
    return is_adam(&opt->cfg) ? 2 : opt->cfg.momentum > 0.0 ? 1 : 0;
}

void **moe__optimizer_moment(moe_optimizer_t *opt, int p, int which) {
    return which == 0 ? &opt->m[p] : &opt->v[p];
}
