/* layer.c - moe_layer_*: parameters, gradients, buffers and stats (the config: config.c). */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "backend/backend.h"
#include "buffers.h"
#include "collective.h"
#include "comm/comm.h"
#include "config.h"
#include "core/dtype.h"
#include "core/philox.h"
#include "core/status.h"
#include "handle.h"
#include "router/hier.h"
#include "placement.h"
#include "scheduler.h"


/* ---------------------------------------------------------------------------------------------
 * parameters: layout, init rule (docs/semantics.md), allocation
 * ------------------------------------------------------------------------------------------- */

_Static_assert(MOE_PARAM_SHARED_B1 == MOE_PARAM_SHARED_W1 + 1 &&
                   MOE_PARAM_SHARED_W2 == MOE_PARAM_SHARED_W1 + 2 &&
                   MOE_PARAM_SHARED_B2 == MOE_PARAM_SHARED_W1 + 3 &&
                   MOE_PARAM_SHARED_GATE == MOE_PARAM_SHARED_W1 + 4 &&
                   MOE_PARAM_SHARED_GATE + 1 == MOE_PARAM_COUNT,
               "the SHARED_* parameter ids are one contiguous block and the last ids: tests "
               "rely on the block, init_param_host on 'p >= MOE_PARAM_SHARED_W1' (a block of "
               "ids after it must update both)");

/* Fills host f32 values of parameter p. Element i of an expert tensor is indexed globally,
 * (global expert of local slot le) * per_expert + offset, so every placement initialises the
 * same way and replicas start equal. */
static void init_param_host(const moe_layer_t *L, moe_param_t p, float *v) {
    const moe_layer_state_t *s = &L->s;
    uint64_t seed = s->cfg.seed;
    int64_t n = s->numel[p];
    int64_t per_expert = s->E_local ? n / s->E_local : 0;
    float bound;
    switch (p) {
    case MOE_PARAM_ROUTER_WEIGHT: bound = 1.0f / sqrtf((float)s->D); break;
    case MOE_PARAM_NOISE_WEIGHT: bound = 0.0f; break; /* zero, as Shazeer et al. */
    case MOE_PARAM_W1:
    case MOE_PARAM_B1:
    case MOE_PARAM_SECONDARY_ROUTER_WEIGHT: bound = 1.0f / sqrtf((float)s->D); break;
    case MOE_PARAM_SHARED_W1:
    case MOE_PARAM_SHARED_B1:
    case MOE_PARAM_SHARED_GATE: bound = 1.0f / sqrtf((float)s->D); break;
    case MOE_PARAM_SHARED_W2:
    case MOE_PARAM_SHARED_B2: bound = 1.0f / sqrtf((float)moe_shared_d_ff(&s->cfg)); break;
    default: bound = 1.0f / sqrtf((float)s->F); break; /* W2, B2 */
    }
    /* replicated parameters are the same on every rank: indexed by their own element; an
     * expert's by its global expert (the placement's) */
    int replicated = p == MOE_PARAM_ROUTER_WEIGHT || p == MOE_PARAM_NOISE_WEIGHT ||
                     p == MOE_PARAM_SECONDARY_ROUTER_WEIGHT || p >= MOE_PARAM_SHARED_W1;
    for (int64_t i = 0; i < n; ++i) {
        int64_t g = replicated ? i
                               : moe__placement_expert(L, i / per_expert) * per_expert +
                                     i % per_expert;
        v[i] = bound == 0.0f ? 0.0f : moe_init_uniform(seed, (uint32_t)p, (uint64_t)g, bound);
    }
}

static void free_params(moe_layer_t *L) {
    const moe_backend_ops_t *ops = L->ctx->ops;
    for (int p = 0; p < MOE_PARAM_COUNT; ++p) {
        ops->mem.free(L->ctx, L->s.param[p]);
        ops->mem.free(L->ctx, L->s.grad[p]);
        L->s.param[p] = L->s.grad[p] = NULL;
    }
}

static moe_status_t alloc_params(moe_layer_t *L) {
    moe_layer_state_t *s = &L->s;
    moe_context_t *ctx = L->ctx;
    const moe_backend_ops_t *ops = ctx->ops;
    size_t esz = moe_dtype_size(s->cfg.dtype);
    /* hierarchical routing: the primary router (D, G) and the G secondary (D, E / G) */
    s->numel[MOE_PARAM_ROUTER_WEIGHT] = s->G ? s->D * s->G : s->D * s->E;
    s->numel[MOE_PARAM_SECONDARY_ROUTER_WEIGHT] = s->G ? s->D * s->E : 0;
    s->numel[MOE_PARAM_NOISE_WEIGHT] = s->cfg.noisy_gating ? s->D * s->E : 0;
    s->numel[MOE_PARAM_W1] = s->E_local * s->D * s->F2;
    s->numel[MOE_PARAM_B1] = s->cfg.expert_bias ? s->E_local * s->F2 : 0;
    s->numel[MOE_PARAM_W2] = s->E_local * s->F * s->D;
    s->numel[MOE_PARAM_B2] = s->cfg.expert_bias ? s->E_local * s->D : 0;
    {
        const int64_t S = s->cfg.num_shared_experts;
        const int64_t Fs = moe_shared_d_ff(&s->cfg), Fs2 = moe_shared_d_ff2(&s->cfg);
        const int bias = s->cfg.expert_bias && S > 0;
        s->numel[MOE_PARAM_SHARED_W1] = S * s->D * Fs2;
        s->numel[MOE_PARAM_SHARED_B1] = bias ? S * Fs2 : 0;
        s->numel[MOE_PARAM_SHARED_W2] = S * Fs * s->D;
        s->numel[MOE_PARAM_SHARED_B2] = bias ? S * s->D : 0;
        s->numel[MOE_PARAM_SHARED_GATE] = S > 0 && s->cfg.shared_expert_gate ? s->D : 0;
    }
    int64_t maxn = 0;
    for (int p = 0; p < MOE_PARAM_COUNT; ++p) maxn = s->numel[p] > maxn ? s->numel[p] : maxn;
    float *host = (float *)malloc((size_t)maxn * sizeof(float));
    uint16_t *host16 = esz == 2 ? (uint16_t *)malloc((size_t)maxn * 2) : NULL;
    if (!host || (esz == 2 && !host16)) {
        free(host), free(host16);
        return MOE_ERR(MOE_STATUS_ALLOC_FAILED, "host staging for %lld parameter values",
                       (long long)maxn);
    }
    moe_status_t st = MOE_STATUS_SUCCESS;
    for (int p = 0; p < MOE_PARAM_COUNT && st == MOE_STATUS_SUCCESS; ++p) {
        size_t bytes = (size_t)s->numel[p] * esz;
        if (bytes == 0) continue;
        MOE_CHECK_GOTO(ops->mem.alloc(ctx, &s->param[p], bytes), st, done);
        MOE_CHECK_GOTO(ops->mem.alloc(ctx, &s->grad[p], bytes), st, done);
        MOE_CHECK_GOTO(ops->mem.memset_zero(ctx, s->grad[p], bytes, NULL), st, done);
        init_param_host(L, (moe_param_t)p, host);
        const void *src = host;
        if (esz == 2) {
            for (int64_t i = 0; i < s->numel[p]; ++i)
                host16[i] = s->cfg.dtype == MOE_DTYPE_BF16 ? moe_f32_to_bf16(host[i])
                                                           : moe_f32_to_f16(host[i]);
            src = host16;
        }
        MOE_CHECK_GOTO(ops->mem.copy(ctx, s->param[p], src, bytes, MOE_COPY_H2D, NULL), st, done);
    }
    st = ops->mem.sync(ctx, NULL);
done:
    free(host), free(host16);
    if (st != MOE_STATUS_SUCCESS) free_params(L);
    return st;
}

/* ---------------------------------------------------------------------------------------------
 * public API
 * ------------------------------------------------------------------------------------------- */

/* collective: every rank of the communicator must create the layer with the same config */
static moe_status_t check_same_config(moe_context_t *ctx, const moe_layer_config_t *cfg) {
    if (ctx->world == 1) return MOE_STATUS_SUCCESS;
    uint64_t *all = (uint64_t *)malloc((size_t)ctx->world * sizeof(uint64_t));
    if (!all) {
        /* the peers are in the all-gather already: they must not wait for this rank */
        moe_status_t st = MOE_ERR(MOE_STATUS_ALLOC_FAILED, "config check");
        moe__comm_abort(ctx->comm, st);
        return st;
    }
    moe_status_t st = moe__comm_allgather_u64(ctx->comm, moe__config_hash(cfg), all);
    for (int q = 0; q < ctx->world && st == MOE_STATUS_SUCCESS; ++q)
        if (all[q] != all[ctx->rank])
            st = MOE_ERR(MOE_STATUS_INVALID_ARGUMENT,
                         "rank %d: the layer config differs from rank %d's (every rank must "
                         "pass the same moe_layer_config_t)",
                         ctx->rank, q);
    free(all);
    return st;
}

static void free_host_arrays(moe_layer_t *L) {
    moe_layer_state_t *s = &L->s;
    moe_exchange_t *x = &L->ex;
    free(x->send_counts), free(x->recv_counts), free(x->ex_offsets);
    free(x->chunk_offsets), free(x->chunk_plan), free(L->score_bias_h);
    free(s->offsets_h), free(s->counts_h), free(s->dropped_h);
    free(s->prob_sum_h), free(s->importance_h), free(s->load_h);
    free(s->coefs.switch_f), free(s->coefs.imp), free(s->coefs.load);
    free(L->expert_mask_h), free(L->avail_h);
    free(s->hier_sums_h), free(s->hier_coefs.c);
    moe__placement_free(&L->pl);
    free(L->pl.load_acc);
    L->pl.load_acc = NULL;
}

/* what moe_layer_create checks before anything is allocated */
static moe_status_t create_checks(const moe_context_t *ctx, const moe_layer_config_t *cfg) {
    MOE_ARG(cfg != NULL, "cfg is NULL");
    MOE_CHECK(moe__config_validate(cfg, ctx->backend));
    if (cfg->router == MOE_ROUTER_HIERARCHICAL &&
        (!ctx->ops->gate_hier_fwd || !ctx->ops->gate_hier_bwd))
        return MOE_ERR(MOE_STATUS_NOT_SUPPORTED,
                       "cfg->router MOE_ROUTER_HIERARCHICAL: the %s backend has no hierarchical "
                       "gate",
                       ctx->ops->name);
    if (cfg->num_shared_experts > 0 && !ctx->ops->shared_fwd)
        return MOE_ERR(MOE_STATUS_NOT_SUPPORTED,
                       "cfg->num_shared_experts: the %s backend has no shared-expert ops",
                       ctx->ops->name);
    return MOE_STATUS_SUCCESS;
}

/* this rank's layer: every allocation, nothing collective; *layer stays NULL on failure */
static moe_status_t create_local(moe_layer_t **layer, moe_context_t *ctx,
                                 const moe_layer_config_t *cfg) {
    moe_layer_t *L = (moe_layer_t *)calloc(1, sizeof *L);
    if (!L) return MOE_ERR(MOE_STATUS_ALLOC_FAILED, "layer handle");
    L->ctx = ctx;
    moe_layer_state_t *s = &L->s;
    s->cfg = *cfg;
    s->D = cfg->d_model;
    s->F = cfg->d_ff;
    s->F2 = cfg->activation == MOE_ACTIVATION_SWIGLU ? 2 * cfg->d_ff : cfg->d_ff;
    s->E = cfg->num_experts;
    s->K = cfg->top_k;
    if (cfg->router == MOE_ROUTER_EXPERT_CHOICE) {
        /* every (token, expert) pair is a candidate assignment, ranked per expert by score */
        s->K = cfg->num_experts;
        s->cfg.gate = MOE_GATE_TOPK_OF_SOFTMAX;
        s->cfg.renormalize = 0;
        s->cfg.priority = MOE_PRIORITY_SCORE;
    }
    if (cfg->router == MOE_ROUTER_HIERARCHICAL) {
        s->G = cfg->num_groups;
        s->k1 = cfg->topk_group;
        s->k2 = cfg->top_k / cfg->topk_group;
    }
    s->K1 = s->K < s->E ? s->K + 1 : s->E;
    s->rank = ctx->rank;
    s->capacity = -1;

    size_t E = (size_t)s->E;
    s->offsets_h = (int64_t *)calloc(E + 1, sizeof(int64_t));
    s->counts_h = (int64_t *)calloc(E, sizeof(int64_t));
    s->dropped_h = (int64_t *)calloc(E, sizeof(int64_t));
    s->prob_sum_h = (double *)calloc(E, sizeof(double));
    s->importance_h = (double *)calloc(E, sizeof(double));
    s->load_h = (double *)calloc(E, sizeof(double));
    s->coefs.switch_f = (float *)calloc(E, sizeof(float));
    s->coefs.imp = (float *)calloc(E, sizeof(float));
    s->coefs.load = (float *)calloc(E, sizeof(float));
    size_t P = (size_t)ctx->world;
    moe_exchange_t *x = &L->ex;
    /* (P, E_max) each; E_max <= E for every placement */
    x->send_counts = (int64_t *)calloc(P * E, sizeof(int64_t));
    x->recv_counts = (int64_t *)calloc(P * E, sizeof(int64_t));
    x->ex_offsets = (int64_t *)calloc(E + 1, sizeof(int64_t));
    L->score_bias_h = (float *)calloc(E, sizeof(float));
    x->chunk_offsets = (int64_t *)calloc(E + 1, sizeof(int64_t));
    x->chunk_plan = (int64_t *)calloc(4 * P * MOE_MAX_CHUNKS, sizeof(int64_t));
    if (s->G) {
        s->hier_sums_h = (double *)calloc((size_t)MOE_HIER_NSUMS(s->G, s->E), sizeof(double));
        s->hier_coefs.c = (float *)calloc((size_t)MOE_HIER_NCOEFS(s->G, s->E), sizeof(float));
    }
    L->expert_mask_h = (uint8_t *)malloc(E);
    L->avail_h = (uint8_t *)malloc(E);
    if (L->expert_mask_h) memset(L->expert_mask_h, 1, E);
    if (L->avail_h) memset(L->avail_h, 1, E);
    L->avail_all = 1;
    L->num_available = s->E;
    if (!L->expert_mask_h || !L->avail_h || !s->offsets_h || !s->counts_h || !s->dropped_h ||
        !s->prob_sum_h || !s->importance_h ||
        !s->load_h || !s->coefs.switch_f || !s->coefs.imp || !s->coefs.load ||
        !x->send_counts || !x->recv_counts || !x->ex_offsets || !x->chunk_offsets ||
        !x->chunk_plan || !L->score_bias_h ||
        (s->G && (!s->hier_sums_h || !s->hier_coefs.c))) {
        free_host_arrays(L);
        free(L);
        return MOE_ERR(MOE_STATUS_ALLOC_FAILED, "per-expert host arrays for %zu experts", E);
    }
    /* the default placement: E_local, the slots, the chunk count */
    moe_status_t st = moe__placement_init_default(L);
    if (st != MOE_STATUS_SUCCESS) {
        free_host_arrays(L);
        free(L);
        return st;
    }
    st = alloc_params(L);
    if (st == MOE_STATUS_SUCCESS && cfg->bias_update_rate > 0.0) {
        st = ctx->ops->mem.alloc(ctx, (void **)&s->score_bias, E * sizeof(float));
        if (st == MOE_STATUS_SUCCESS)
            st = ctx->ops->mem.memset_zero(ctx, s->score_bias, E * sizeof(float), NULL);
        if (st != MOE_STATUS_SUCCESS) {
            ctx->ops->mem.free(ctx, s->score_bias);
            s->score_bias = NULL;
            free_params(L);
        }
    }
    if (st == MOE_STATUS_SUCCESS) {
        st = ctx->ops->mem.alloc(ctx, (void **)&L->avail_d, E);
        if (st != MOE_STATUS_SUCCESS) {
            ctx->ops->mem.free(ctx, s->score_bias);
            s->score_bias = NULL;
            free_params(L);
        }
    }
    if (st != MOE_STATUS_SUCCESS) {
        free_host_arrays(L);
        free(L);
        return st;
    }
    if (ctx->ops->layer_init) {
        moe_backend_layer_t bl = moe__backend_layer(s);
        st = ctx->ops->layer_init(ctx, &bl);
        s->impl = bl.impl;
        if (st != MOE_STATUS_SUCCESS) {
            ctx->ops->mem.free(ctx, s->score_bias);
            ctx->ops->mem.free(ctx, L->avail_d);
            free_params(L);
            free_host_arrays(L);
            free(L);
            return st;
        }
    }
    L->magic = MOE_LAYER_MAGIC;
    ctx->num_layers++;
    *layer = L;
    return MOE_STATUS_SUCCESS;
}

moe_status_t moe_layer_create(moe_layer_t **layer, moe_context_t *ctx,
                              const moe_layer_config_t *cfg) {
    MOE_ARG(layer != NULL, "layer is NULL");
    *layer = NULL;
    /* a rank without a context cannot reach its peers (they wait for their timeout) */
    MOE_ARG(ctx != NULL && ctx->magic == MOE_CONTEXT_MAGIC, "ctx is %s",
            ctx == NULL ? "NULL" : "not a live moe_context_t");
    moe_status_t st = create_checks(ctx, cfg);
    if (ctx->world > 1) {
        /* a rank whose checks failed ends the call on every rank; then the configs compare */
        st = moe__comm_agree(ctx->comm, MOE_CALL_LAYER_CREATE, 0, st);
        if (st == MOE_STATUS_SUCCESS) st = check_same_config(ctx, cfg);
    }
    MOE_CHECK(st);
    /* the layer's agreement key: the communicator's step count, the same on every rank */
    const uint64_t key = ctx->comm ? ctx->comm->seq : 0;
    moe_layer_t *L = NULL;
    st = create_local(&L, ctx, cfg);
    if (ctx->world > 1) {
        /* all or none: a rank whose allocations failed would never join the layer's calls */
        moe_status_t all = moe__comm_agree(ctx->comm, MOE_CALL_LAYER_CREATED, key, st);
        if (all != MOE_STATUS_SUCCESS && L) {
            moe_layer_destroy(L);
            L = NULL;
        }
        st = all;
    }
    MOE_CHECK(st);
    L->agree_key = key;
    *layer = L;
    return MOE_STATUS_SUCCESS;
}

moe_status_t moe_layer_destroy(moe_layer_t *layer) {
    if (!layer) return MOE_STATUS_SUCCESS;
    MOE_LAYER_ARG(layer);
    MOE_ARG(layer->num_optimizers == 0,
            "the layer still has %lld optimizers: destroy them first (nothing was freed)",
            (long long)layer->num_optimizers);
    moe_layer_trace_close(layer);
    free(layer->forced_idx), free(layer->forced_gate);
    if (layer->ctx->ops->layer_fini) {
        moe_backend_layer_t bl = moe__backend_layer(&layer->s);
        layer->ctx->ops->layer_fini(layer->ctx, &bl);
        layer->s.impl = NULL;
    }
    moe__buffers_free(layer);
    free_params(layer);
    layer->ctx->ops->mem.free(layer->ctx, layer->s.score_bias);
    layer->ctx->ops->mem.free(layer->ctx, layer->avail_d);
    free_host_arrays(layer);
    layer->ctx->num_layers--;
    layer->magic = 0;
    free(layer);
    return MOE_STATUS_SUCCESS;
}

moe_status_t moe_layer_get_config(const moe_layer_t *layer, moe_layer_config_t *cfg) {
    MOE_LAYER_ARG(layer);
    MOE_ARG(cfg != NULL, "cfg is NULL");
    *cfg = layer->s.cfg;
    return MOE_STATUS_SUCCESS;
}

moe_status_t moe_layer_param(moe_layer_t *layer, moe_param_t which, void **value, void **grad,
                             int64_t *numel) {
    MOE_LAYER_ARG(layer);
    MOE_ARG(which >= MOE_PARAM_ROUTER_WEIGHT && which < MOE_PARAM_COUNT,
            "which %d is not a moe_param_t", (int)which);
    if (value) *value = layer->s.param[which];
    if (grad) *grad = layer->s.grad[which];
    if (numel) *numel = layer->s.numel[which];
    return MOE_STATUS_SUCCESS;
}

/* ---- forward and backward: each rank's checks, the agreement step, then the call ---- */

/* a failing forward (either kind) drops pending forced routing (moe.h), so no later forward
 * inherits it; returns st */
static moe_status_t drop_forced_on_failure(moe_layer_t *layer, moe_status_t st) {
    if (st != MOE_STATUS_SUCCESS && layer->forced_idx) {
        free(layer->forced_idx), free(layer->forced_gate);
        layer->forced_idx = NULL, layer->forced_gate = NULL;
        layer->forced_T = 0;
    }
    return st;
}

static moe_status_t experts_out_supported(const moe_layer_t *layer) {
    if (layer->s.cfg.num_shared_experts > 0)
        return MOE_ERR(MOE_STATUS_NOT_SUPPORTED,
                       "per-expert outputs of a layer with cfg->num_shared_experts = %lld: the "
                       "shared experts have no place in the per-assignment rows",
                       (long long)layer->s.cfg.num_shared_experts);
    if (!layer->ctx->ops->experts_out_fwd || !layer->ctx->ops->experts_out_bwd)
        return MOE_ERR(MOE_STATUS_NOT_SUPPORTED, "the %s backend has no per-expert outputs",
                       layer->ctx->ops->name);
    return MOE_STATUS_SUCCESS;
}

/* y is y (moe_layer_forward) or y_experts (gate != NULL: moe_layer_forward_experts) */
static moe_status_t forward_checks(moe_layer_t *layer, const void *x, const void *y,
                                   const float *gate, int experts_out, int64_t num_tokens) {
    if (experts_out) MOE_CHECK(experts_out_supported(layer));
    MOE_ARG(num_tokens >= 0, "num_tokens %lld is negative", (long long)num_tokens);
    MOE_ARG(x != NULL || num_tokens == 0, "x is NULL");
    MOE_ARG(y != NULL || num_tokens == 0, experts_out ? "y_experts is NULL" : "y is NULL");
    MOE_ARG(!experts_out || gate != NULL || num_tokens == 0, "gate is NULL");
    MOE_ARG(num_tokens <= INT32_MAX / layer->s.K,
            "num_tokens x top_k = %lld x %lld exceeds the 2^31 rows one call can route",
            (long long)num_tokens, (long long)layer->s.K);
    return MOE_STATUS_SUCCESS;
}

static moe_status_t layer_forward(moe_layer_t *layer, const void *x, void *y, float *gate,
                                  int experts_out, int64_t num_tokens, int training,
                                  void *stream) {
    moe_status_t st = forward_checks(layer, x, y, gate, experts_out, num_tokens);
    /* x's values, forced routing, the buffers: nothing of the last forward changes yet */
    if (st == MOE_STATUS_SUCCESS)
        st = moe__scheduler_forward_prepare(layer, x, num_tokens, training, stream);
    /* every rank must route with the same training flag (noise, dropout, bias updates) */
    MOE_CHECK(moe__layer_agree(layer,
                               experts_out ? MOE_CALL_FORWARD_EXPERTS : MOE_CALL_FORWARD,
                               training != 0, st));
    st = experts_out ? moe__scheduler_forward_experts(layer, x, y, gate, num_tokens, training,
                                                      stream)
                     : moe__scheduler_forward(layer, x, y, num_tokens, training, stream);
    return moe__layer_finish(layer, st);
}

moe_status_t moe_layer_forward(moe_layer_t *layer, const void *x, void *y, int64_t num_tokens,
                               int training, void *stream) {
    MOE_LAYER_ARG(layer);
    return drop_forced_on_failure(
        layer, layer_forward(layer, x, y, NULL, 0, num_tokens, training, stream));
}

moe_status_t moe_layer_forward_experts(moe_layer_t *layer, const void *x, void *y_experts,
                                       float *gate, int64_t num_tokens, int training,
                                       void *stream) {
    MOE_LAYER_ARG(layer);
    return drop_forced_on_failure(
        layer, layer_forward(layer, x, y_experts, gate, 1, num_tokens, training, stream));
}

static moe_status_t backward_checks(moe_layer_t *layer, const void *dy, const float *dgate,
                                    const void *dx, int experts_out) {
    if (experts_out) MOE_CHECK(experts_out_supported(layer));
    MOE_ARG(dy != NULL || layer->s.T == 0, experts_out ? "dy_experts is NULL" : "dy is NULL");
    MOE_ARG(!experts_out || dgate != NULL || layer->s.T == 0, "dgate is NULL");
    MOE_ARG(dx != NULL || layer->s.T == 0, "dx is NULL");
    MOE_ARG(layer->s.have_forward, experts_out
                                       ? "no successful forward to differentiate: call "
                                         "moe_layer_forward_experts first"
                                       : "no successful forward to differentiate: call "
                                         "moe_layer_forward first");
    return MOE_STATUS_SUCCESS;
}

static moe_status_t layer_backward(moe_layer_t *layer, const void *dy, const float *dgate,
                                   void *dx, int experts_out, void *stream) {
    moe_status_t st = backward_checks(layer, dy, dgate, dx, experts_out);
    /* NaN/Inf in dy: nothing is accumulated on any rank */
    if (st == MOE_STATUS_SUCCESS) st = moe__scheduler_backward_prepare(layer, dy, experts_out, stream);
    MOE_CHECK(moe__layer_agree(layer,
                               experts_out ? MOE_CALL_BACKWARD_EXPERTS : MOE_CALL_BACKWARD, 0,
                               st));
    st = experts_out ? moe__scheduler_backward_experts(layer, dy, dgate, dx, stream)
                     : moe__scheduler_backward(layer, dy, dx, stream);
    return moe__layer_finish(layer, st);
}

moe_status_t moe_layer_backward(moe_layer_t *layer, const void *dy, void *dx, void *stream) {
    MOE_LAYER_ARG(layer);
    return layer_backward(layer, dy, NULL, dx, 0, stream);
}

moe_status_t moe_layer_backward_experts(moe_layer_t *layer, const void *dy_experts,
                                        const float *dgate, void *dx, void *stream) {
    MOE_LAYER_ARG(layer);
    return layer_backward(layer, dy_experts, dgate, dx, 1, stream);
}

moe_status_t moe_layer_zero_grad(moe_layer_t *layer, void *stream) {
    MOE_LAYER_ARG(layer);
    size_t esz = moe_dtype_size(layer->s.cfg.dtype);
    for (int p = 0; p < MOE_PARAM_COUNT; ++p)
        if (layer->s.grad[p])
            MOE_CHECK(layer->ctx->ops->mem.memset_zero(layer->ctx, layer->s.grad[p],
                                                       (size_t)layer->s.numel[p] * esz, stream));
    return MOE_STATUS_SUCCESS;
}

moe_status_t moe_layer_stats(moe_layer_t *layer, moe_routing_stats_t *stats,
                             int64_t *tokens_per_expert, int64_t *dropped_per_expert) {
    MOE_LAYER_ARG(layer);
    MOE_ARG(layer->s.have_forward, "no successful forward yet");
    if (stats) *stats = layer->s.stats;
    size_t bytes = (size_t)layer->s.E * sizeof(int64_t);
    if (tokens_per_expert) memcpy(tokens_per_expert, layer->s.counts_h, bytes);
    if (dropped_per_expert) memcpy(dropped_per_expert, layer->s.dropped_h, bytes);
    return MOE_STATUS_SUCCESS;
}

moe_status_t moe_layer_routing(moe_layer_t *layer, int32_t *expert_index, float *gate,
                               int32_t *kept) {
    MOE_LAYER_ARG(layer);
    MOE_ARG(layer->s.have_forward, "no successful forward yet");
    return moe__buffers_read_routing(layer, expert_index, gate, kept);
}

moe_status_t moe_layer_allreduce_router_grads(moe_layer_t *layer, void *stream) {
    MOE_LAYER_ARG(layer);
    moe_context_t *ctx = layer->ctx;
    if (ctx->world == 1) return MOE_STATUS_SUCCESS;
    moe_status_t st =
        layer->s.cfg.dtype == MOE_DTYPE_F32
            ? MOE_STATUS_SUCCESS
            : MOE_ERR(MOE_STATUS_INVALID_ARGUMENT, "router gradient all-reduce needs f32 storage");
    MOE_CHECK(moe__layer_agree(layer, MOE_CALL_ALLREDUCE_ROUTER_GRADS, 0, st));
    /* the replicated parameters: the routers', and the shared experts' */
    const moe_param_t which[] = {MOE_PARAM_ROUTER_WEIGHT, MOE_PARAM_NOISE_WEIGHT,
                                 MOE_PARAM_SECONDARY_ROUTER_WEIGHT,
                                 MOE_PARAM_SHARED_W1,     MOE_PARAM_SHARED_B1,
                                 MOE_PARAM_SHARED_W2,     MOE_PARAM_SHARED_B2,
                                 MOE_PARAM_SHARED_GATE};
    for (size_t i = 0; i < sizeof which / sizeof which[0] && st == MOE_STATUS_SUCCESS; ++i)
        if (layer->s.grad[which[i]])
            st = moe__comm_allreduce_f32(ctx->comm, &ctx->mem, (float *)layer->s.grad[which[i]],
                                         layer->s.numel[which[i]], stream);
    return moe__layer_finish(layer, st);
}

moe_status_t moe_layer_set_profiling(moe_layer_t *layer, int enable) {
    MOE_LAYER_ARG(layer);
    layer->profiling = enable != 0;
    memset(layer->phase_s, 0, sizeof layer->phase_s);
    return MOE_STATUS_SUCCESS;
}

moe_status_t moe_layer_phase_times(const moe_layer_t *layer, double *seconds) {
    MOE_LAYER_ARG(layer);
    MOE_ARG(seconds != NULL, "seconds is NULL");
    memcpy(seconds, layer->phase_s, sizeof layer->phase_s);
    return MOE_STATUS_SUCCESS;
}

const char *moe_phase_name(moe_phase_t phase) {
    static const char *names[MOE_PHASE_COUNT] = {
        "gate",         "route",        "permute",     "dispatch",   "experts",
        "return",       "combine",      "bwd_combine", "bwd_dispatch", "bwd_experts",
        "bwd_return",   "bwd_unpermute", "bwd_gate"};
    return phase >= 0 && phase < MOE_PHASE_COUNT ? names[phase] : "unknown";
}

int64_t moe_layer_routing_width(const moe_layer_t *layer) {
    return layer && layer->magic == MOE_LAYER_MAGIC ? layer->s.K : 0;
}

moe_status_t moe_layer_score_bias(const moe_layer_t *layer, float *bias) {
    MOE_LAYER_ARG(layer);
    MOE_ARG(bias != NULL, "bias is NULL");
    memcpy(bias, layer->score_bias_h, (size_t)layer->s.E * sizeof(float));
    return MOE_STATUS_SUCCESS;
}

moe_status_t moe_layer_set_score_bias(moe_layer_t *layer, const float *bias) {
    MOE_LAYER_ARG(layer);
    MOE_ARG(bias != NULL, "bias is NULL");
    for (int64_t e = 0; e < layer->s.E; ++e)
        MOE_ARG(isfinite(bias[e]), "bias[%lld] is not finite", (long long)e);
    MOE_ARG(layer->s.score_bias != NULL,
            "the layer has no selection bias: create it with cfg.bias_update_rate > 0");
    memcpy(layer->score_bias_h, bias, (size_t)layer->s.E * sizeof(float));
    moe_context_t *ctx = layer->ctx;
    MOE_CHECK(ctx->ops->mem.copy(ctx, layer->s.score_bias, bias, (size_t)layer->s.E * sizeof(float),
                                 MOE_COPY_H2D, NULL));
    return ctx->ops->mem.sync(ctx, NULL);
}

/* ---------------------------------------------------------------------------------------------
 * expert availability (routing extensions)
 * ------------------------------------------------------------------------------------------- */

static moe_status_t mask_checks(const moe_layer_t *layer, int64_t n) {
    const int64_t E = layer->s.E;
    MOE_ARG(n >= layer->s.K, "mask leaves %lld experts available, fewer than top_k = %lld",
            (long long)n, (long long)layer->s.K);
    MOE_ARG(n == E || !layer->s.cfg.noisy_gating,
            "mask: an expert mask is not defined with noisy_gating (Shazeer's load estimator)");
    MOE_ARG(n == E || layer->s.cfg.router == MOE_ROUTER_TOKEN_CHOICE,
            "mask: an expert mask applies to token choice only");
    return MOE_STATUS_SUCCESS;
}

moe_status_t moe_layer_set_expert_mask(moe_layer_t *layer, const uint8_t *mask) {
    MOE_LAYER_ARG(layer);
    const int64_t E = layer->s.E;
    int64_t n = 0;
    uint64_t h = 1469598103934665603ull;
    for (int64_t e = 0; e < E; ++e) {
        uint8_t v = mask ? (mask[e] != 0) : 1;
        n += v;
        h = (h ^ v) * 1099511628211ull;
    }
    MOE_CHECK(moe__layer_agree(layer, MOE_CALL_SET_EXPERT_MASK, 0, mask_checks(layer, n)));
    moe_context_t *ctx = layer->ctx;
    if (ctx->world > 1) {
        /* collective: every rank must route with the same experts */
        uint64_t *all = (uint64_t *)malloc((size_t)ctx->world * sizeof(uint64_t));
        if (!all) return moe__layer_finish(layer, MOE_ERR(MOE_STATUS_ALLOC_FAILED, "mask check"));
        moe_status_t st = moe__layer_finish(layer, moe__comm_allgather_u64(ctx->comm, h, all));
        /* every rank reads the same hashes: a mismatch ends the call on every rank */
        for (int q = 0; q < ctx->world && st == MOE_STATUS_SUCCESS; ++q)
            if (all[q] != all[ctx->rank])
                st = MOE_ERR(MOE_STATUS_INVALID_ARGUMENT,
                             "mask: rank %d's expert mask differs from rank %d's (every rank "
                             "must pass the same mask)",
                             ctx->rank, q);
        free(all);
        MOE_CHECK(st);
    }
    for (int64_t e = 0; e < E; ++e) layer->expert_mask_h[e] = mask ? (mask[e] != 0) : 1;
    return MOE_STATUS_SUCCESS;
}

moe_status_t moe_layer_expert_mask(const moe_layer_t *layer, uint8_t *mask) {
    MOE_LAYER_ARG(layer);
    MOE_ARG(mask != NULL, "mask is NULL");
    memcpy(mask, layer->expert_mask_h, (size_t)layer->s.E);
    return MOE_STATUS_SUCCESS;
}

moe_status_t moe_layer_expert_availability(const moe_layer_t *layer, uint8_t *available,
                                           int64_t *num_available) {
    MOE_LAYER_ARG(layer);
    MOE_ARG(layer->s.have_forward, "no successful forward yet");
    if (available) memcpy(available, layer->avail_h, (size_t)layer->s.E);
    if (num_available) *num_available = layer->num_available;
    return MOE_STATUS_SUCCESS;
}
