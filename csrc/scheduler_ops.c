/* scheduler_ops.c - the scheduler's calls of the token-side backend ops (gate, routing, permute,
 * combine, shared experts, per-expert outputs): each op's argument struct filled from the
 * layer's buffers. The order of the calls is scheduler.c's. */
#include "backend/backend.h"
#include "handle.h"
#include "router/hier.h"
#include "scheduler_ops.h"

/* ---------------------------------------------------------------------------------------------
 * the token-side ops: their arguments from the layer's buffers
 * ------------------------------------------------------------------------------------------- */

/* ---- hierarchical gating (MOE_ROUTER_HIERARCHICAL): its gate ops replace the flat ones ---- */

moe_status_t moe__op_gate_hier_fwd(moe_layer_t *L, const moe_backend_layer_t *bl, void *stream) {
    moe_layer_state_t *s = &L->s;
    const moe_gate_hier_fwd_args_t a = {.layer = bl,
                                        .T = s->T,
                                        .G = s->G,
                                        .k1 = s->k1,
                                        .k2 = s->k2,
                                        .x = s->x,
                                        .w_primary = s->param[MOE_PARAM_ROUTER_WEIGHT],
                                        .w_secondary = s->param[MOE_PARAM_SECONDARY_ROUTER_WEIGHT],
                                        .logits1 = s->h_logits1,
                                        .logits = s->logits,
                                        .lse = s->lse,
                                        .grp = s->h_grp,
                                        .g1 = s->h_g1,
                                        .g2 = s->h_g2,
                                        .idx = s->idx,
                                        .gate = s->gate,
                                        .counts = s->counts_h,
                                        .sums = s->hier_sums_h};
    for (int64_t e = 0; e < s->E; ++e) s->prob_sum_h[e] = s->importance_h[e] = s->load_h[e] = 0.0;
    s->z_sum = 0.0;
    return L->ctx->ops->gate_hier_fwd(L->ctx, &a, stream);
}

moe_status_t moe__op_gate_hier_bwd(moe_layer_t *L, const moe_backend_layer_t *bl, void *dx,
                                  void *stream) {
    moe_layer_state_t *s = &L->s;
    const moe_gate_hier_bwd_args_t a = {.layer = bl,
                                        .T = s->T,
                                        .G = s->G,
                                        .k1 = s->k1,
                                        .k2 = s->k2,
                                        .x = s->x,
                                        .w_primary = s->param[MOE_PARAM_ROUTER_WEIGHT],
                                        .w_secondary = s->param[MOE_PARAM_SECONDARY_ROUTER_WEIGHT],
                                        .logits1 = s->h_logits1,
                                        .logits = s->logits,
                                        .grp = s->h_grp,
                                        .idx = s->idx,
                                        .g1 = s->h_g1,
                                        .g2 = s->h_g2,
                                        .dgate = s->dg,
                                        .coefs = &s->hier_coefs,
                                        .dlogits1 = s->h_dlogits1,
                                        .dlogits = s->dlogits,
                                        .dw_primary = s->grad[MOE_PARAM_ROUTER_WEIGHT],
                                        .dw_secondary = s->grad[MOE_PARAM_SECONDARY_ROUTER_WEIGHT],
                                        .dx = dx};
    return L->ctx->ops->gate_hier_bwd(L->ctx, &a, stream);
}

moe_status_t moe__op_gate_fwd(moe_layer_t *L, const moe_backend_layer_t *bl, void *stream) {
    moe_layer_state_t *s = &L->s;
    if (s->G) return moe__op_gate_hier_fwd(L, bl, stream);
    const moe_gate_fwd_args_t a = {.layer = bl,
                                   .T = s->T,
                                   .noisy = s->noisy_now,
                                   .call = s->call,
                                   .x = s->x,
                                   .w_router = s->param[MOE_PARAM_ROUTER_WEIGHT],
                                   .w_noise = s->param[MOE_PARAM_NOISE_WEIGHT],
                                   .score_bias = s->score_bias,
                                   .logits = s->logits,
                                   .noise_raw = s->noise_raw,
                                   .eps = s->eps,
                                   .h = s->h,
                                   .lse = s->lse,
                                   .idx = s->idx,
                                   .gate = s->gate,
                                   .sums = {.counts = s->counts_h,
                                            .prob_sum = s->prob_sum_h,
                                            .importance = s->importance_h,
                                            .load = s->load_h,
                                            .z_sum = &s->z_sum},
                                   .avail = L->avail_all ? NULL : L->avail_d};
    return L->ctx->ops->gate_fwd(L->ctx, &a, stream);
}

moe_status_t moe__op_route(moe_layer_t *L, const moe_backend_layer_t *bl, void *stream) {
    moe_layer_state_t *s = &L->s;
    const moe_route_args_t a = {.layer = bl,
                                .T = s->T,
                                .capacity = s->capacity,
                                .idx = s->idx,
                                .gate = s->gate,
                                .counts = s->counts_h,
                                .row = s->row,
                                .offsets = s->offsets_h,
                                .dropped = s->dropped_h,
                                .num_rows = &s->num_rows};
    return L->ctx->ops->route(L->ctx, &a, stream);
}

moe_status_t moe__op_permute(moe_layer_t *L, const moe_backend_layer_t *bl, void *stream) {
    moe_layer_state_t *s = &L->s;
    const moe_permute_args_t a = {.layer = bl, .T = s->T, .x = s->x, .row = s->row, .xp = s->xp};
    return L->ctx->ops->permute(L->ctx, &a, stream);
}

moe_status_t moe__op_combine_fwd(moe_layer_t *L, const moe_backend_layer_t *bl, void *y,
                                void *stream) {
    moe_layer_state_t *s = &L->s;
    const moe_combine_fwd_args_t a = {
        .layer = bl, .T = s->T, .yp = s->yp, .row = s->row, .gate = s->gate, .y = y};
    return L->ctx->ops->combine_fwd(L->ctx, &a, stream);
}

moe_status_t moe__op_combine_bwd(moe_layer_t *L, const moe_backend_layer_t *bl, const void *dy,
                                void *stream) {
    moe_layer_state_t *s = &L->s;
    const moe_combine_bwd_args_t a = {.layer = bl,
                                      .T = s->T,
                                      .dy = dy,
                                      .yp = s->yp,
                                      .row = s->row,
                                      .gate = s->gate,
                                      .dyp = s->dyp,
                                      .dgate = s->dg};
    return L->ctx->ops->combine_bwd(L->ctx, &a, stream);
}

moe_status_t moe__op_unpermute_bwd(moe_layer_t *L, const moe_backend_layer_t *bl, void *dx,
                                  void *stream) {
    moe_layer_state_t *s = &L->s;
    const moe_unpermute_bwd_args_t a = {
        .layer = bl, .T = s->T, .dxp = s->dxp, .row = s->row, .dx = dx};
    return L->ctx->ops->unpermute_bwd(L->ctx, &a, stream);
}

moe_status_t moe__op_gate_bwd(moe_layer_t *L, const moe_backend_layer_t *bl, void *dx,
                             void *stream) {
    moe_layer_state_t *s = &L->s;
    if (s->G) return moe__op_gate_hier_bwd(L, bl, dx, stream);
    const moe_gate_bwd_args_t a = {.layer = bl,
                                   .T = s->T,
                                   .noisy = s->noisy_now,
                                   .x = s->x,
                                   .w_router = s->param[MOE_PARAM_ROUTER_WEIGHT],
                                   .w_noise = s->param[MOE_PARAM_NOISE_WEIGHT],
                                   .logits = s->logits,
                                   .noise_raw = s->noise_raw,
                                   .eps = s->eps,
                                   .h = s->h,
                                   .lse = s->lse,
                                   .idx = s->idx,
                                   .gate = s->gate,
                                   .dgate = s->dg,
                                   .coefs = &s->coefs,
                                   .dlogits = s->dlogits,
                                   .dnoise = s->dnoise,
                                   .dw_router = s->grad[MOE_PARAM_ROUTER_WEIGHT],
                                   .dw_noise = s->grad[MOE_PARAM_NOISE_WEIGHT],
                                   .dx = dx,
                                   .avail = L->avail_all ? NULL : L->avail_d};
    return L->ctx->ops->gate_bwd(L->ctx, &a, stream);
}

/* ---------------------------------------------------------------------------------------------
 * shared experts: every token of this rank through each of them. They read x and their own
 * replicated parameters only, never the routing or anything an exchange moves.
 * ------------------------------------------------------------------------------------------- */

moe_status_t moe__op_shared_fwd(moe_layer_t *L, const moe_backend_layer_t *bl, void *y,
                               void *stream) {
    moe_layer_state_t *s = &L->s;
    const moe_shared_fwd_args_t a = {.layer = bl,
                                     .T = s->T,
                                     .x = s->x,
                                     .w1 = s->param[MOE_PARAM_SHARED_W1],
                                     .b1 = s->param[MOE_PARAM_SHARED_B1],
                                     .w2 = s->param[MOE_PARAM_SHARED_W2],
                                     .b2 = s->param[MOE_PARAM_SHARED_B2],
                                     .w_gate = s->param[MOE_PARAM_SHARED_GATE],
                                     .hpre = s->sh_hpre,
                                     .act = s->sh_act,
                                     .ys = s->sh_ys,
                                     .gate = s->sh_gate,
                                     .y = y};
    return L->ctx->ops->shared_fwd(L->ctx, &a, stream);
}

moe_status_t moe__op_shared_combine_bwd(moe_layer_t *L, const moe_backend_layer_t *bl,
                                       const void *dy, void *stream) {
    moe_layer_state_t *s = &L->s;
    const moe_shared_combine_bwd_args_t a = {.layer = bl,
                                             .T = s->T,
                                             .gated = s->param[MOE_PARAM_SHARED_GATE] != NULL,
                                             .dy = dy,
                                             .ys = s->sh_ys,
                                             .gate = s->sh_gate,
                                             .dys = s->sh_dys,
                                             .dlogit = s->sh_dlogit};
    return L->ctx->ops->shared_combine_bwd(L->ctx, &a, stream);
}

moe_status_t moe__op_shared_bwd(moe_layer_t *L, const moe_backend_layer_t *bl, void *dx,
                               void *stream) {
    moe_layer_state_t *s = &L->s;
    const moe_shared_bwd_args_t a = {.layer = bl,
                                     .T = s->T,
                                     .x = s->x,
                                     .w1 = s->param[MOE_PARAM_SHARED_W1],
                                     .w2 = s->param[MOE_PARAM_SHARED_W2],
                                     .w_gate = s->param[MOE_PARAM_SHARED_GATE],
                                     .dw1 = s->grad[MOE_PARAM_SHARED_W1],
                                     .db1 = s->grad[MOE_PARAM_SHARED_B1],
                                     .dw2 = s->grad[MOE_PARAM_SHARED_W2],
                                     .db2 = s->grad[MOE_PARAM_SHARED_B2],
                                     .dw_gate = s->grad[MOE_PARAM_SHARED_GATE],
                                     .hpre = s->sh_hpre,
                                     .act = s->sh_act,
                                     .dys = s->sh_dys,
                                     .dlogit = s->sh_dlogit,
                                     .dact = s->sh_dact,
                                     .dhpre = s->sh_dhpre,
                                     .dxs = s->sh_dxs,
                                     .dx = dx};
    return L->ctx->ops->shared_bwd(L->ctx, &a, stream);
}

/* per-expert outputs: the combine left to the caller (moe_layer_forward_experts) */
moe_status_t moe__op_experts_out_fwd(moe_layer_t *L, const moe_backend_layer_t *bl, void *ye,
                                    float *ge, void *stream) {
    moe_layer_state_t *s = &L->s;
    const moe_experts_out_fwd_args_t a = {
        .layer = bl, .T = s->T, .yp = s->yp, .row = s->row, .gate = s->gate, .ye = ye, .ge = ge};
    return L->ctx->ops->experts_out_fwd(L->ctx, &a, stream);
}

moe_status_t moe__op_experts_out_bwd(moe_layer_t *L, const moe_backend_layer_t *bl,
                                    const void *dye, const float *dge, void *stream) {
    moe_layer_state_t *s = &L->s;
    const moe_experts_out_bwd_args_t a = {.layer = bl,
                                          .T = s->T,
                                          .dye = dye,
                                          .dge = dge,
                                          .row = s->row,
                                          .dyp = s->dyp,
                                          .dgate = s->dg};
    return L->ctx->ops->experts_out_bwd(L->ctx, &a, stream);
}
