/* scheduler.c - the plan of one forward and one backward call: which backend ops run, in what
 * order, on which stream, and where the host waits.
 *
 * One rank: gate -> (host) loss finalisation -> slot assignment -> permute -> experts -> combine.
 * The host reads the per-expert counts after the gate (the expert GEMM sizes come from them),
 * so a forward synchronises the stream once, after the gate pass. */
#include <string.h>

#include "core/dtype.h"
#include "core/status.h"
#include "layer.h"
#include "router/router_host.h"

moe_status_t moe__scheduler_forward(moe_layer_t *L, const void *x, void *y, int64_t T,
                                    int training, void *stream) {
    moe_context_t *ctx = L->ctx;
    const moe_backend_ops_t *ops = ctx->ops;
    moe_layer_state_t *s = &L->s;

    MOE_CHECK(moe__layer_reserve(L, T));
    int64_t bad = 0;
    if (ops->count_nonfinite_typed)
        MOE_CHECK(ops->count_nonfinite_typed(ctx, x, s->cfg.dtype, T * s->D, &bad, stream));
    else
        MOE_CHECK(ops->count_nonfinite(ctx, x, T * s->D, &bad, stream));
    if (bad)
        return MOE_ERR(MOE_STATUS_NUMERIC_ERROR,
                       "x holds %lld NaN/Inf values among %lld tokens: nothing was routed",
                       (long long)bad, (long long)T);

    /* from here the previous forward's state is overwritten */
    s->have_forward = 0;
    s->T = T;
    s->noisy_now = s->cfg.noisy_gating && training;
    s->capacity = moe_router_capacity(s->cfg.capacity_factor, T, s->K, s->E);
    MOE_CHECK(ops->copy(ctx, s->x, x, (size_t)(T * s->D) * moe_dtype_size(s->cfg.dtype),
                        MOE_COPY_D2D, stream));
    MOE_CHECK(ops->gate_fwd(ctx, s, stream));
    if (s->noisy_now) s->call++;
    MOE_CHECK(moe_router_finalize(s));
    MOE_CHECK(ops->route(ctx, s, stream));
    int64_t dropped = 0;
    for (int64_t e = 0; e < s->E; ++e) dropped += s->dropped_h[e];
    s->stats.num_dropped = dropped;
    MOE_CHECK(ops->permute(ctx, s, stream));
    MOE_CHECK(ops->ffn_fwd(ctx, s, stream));
    MOE_CHECK(ops->combine_fwd(ctx, s, y, stream));
    s->have_forward = 1;
    return MOE_STATUS_SUCCESS;
}

moe_status_t moe__scheduler_backward(moe_layer_t *L, const void *dy, void *dx, void *stream) {
    moe_context_t *ctx = L->ctx;
    const moe_backend_ops_t *ops = ctx->ops;
    moe_layer_state_t *s = &L->s;
    /* dy is read in full by combine_bwd before dx is first written: dx may alias dy */
    MOE_CHECK(ops->combine_bwd(ctx, s, dy, stream));
    MOE_CHECK(ops->ffn_bwd(ctx, s, stream));
    MOE_CHECK(ops->unpermute_bwd(ctx, s, dx, stream));
    MOE_CHECK(ops->gate_bwd(ctx, s, dx, stream));
    return MOE_STATUS_SUCCESS;
}
