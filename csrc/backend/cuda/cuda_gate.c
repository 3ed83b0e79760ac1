/* cuda_gate.c - the CUDA backend's gate ops: the router GEMMs around the per-token gate kernels
 * (kernels/gate.cu, kernels/gate_hier.cu), forward and backward, flat and hierarchical. The
 * token scratch is already sized for the call (cuda_backend.c's table entries reserve it). */
#include <string.h>

#include "backend/cuda/cuda_gate.h"
#include "backend/cuda/cuda_state.h"
#include "core/dtype.h"
#include "core/status.h"
#include "kernels/kernels.h"
#include "router/hier.h"

/* ---------------------------------------------------------------------------------------------
 * gate and routing
 * ------------------------------------------------------------------------------------------- */

/* The router runs in f32 whatever the storage: with a 16-bit dtype, x (T tokens, when given)
 * and the router weights are widened into f32 scratch first (exactly: every 16-bit value is an
 * f32 value). The f32 pointers replace *x, *wg, *wn. */
static moe_status_t cu_router_f32(const moe_backend_layer_t *l, int64_t T, const void **x,
                                  const void **wg, const void **wn, cudaStream_t st) {
    cu_layer_t *L = (cu_layer_t *)l->impl;
    const int dt = (int)l->cfg.dtype;
    if (l->cfg.dtype == MOE_DTYPE_F32) return MOE_STATUS_SUCCESS;
    const int64_t DE = l->D * l->E;
    if (x) {
        MOE_CUDA_CHECK(moe_k_to_f32(*x, dt, T * l->D, L->x32, st));
        *x = L->x32;
    }
    MOE_CUDA_CHECK(moe_k_to_f32(*wg, dt, DE, L->w32, st));
    *wg = L->w32;
    if (*wn) {
        MOE_CUDA_CHECK(moe_k_to_f32(*wn, dt, DE, L->w32 + DE, st));
        *wn = L->w32 + DE;
    }
    return MOE_STATUS_SUCCESS;
}

/* the routing extensions' options (router/select.h) as the gate kernels take them */
static moe_k_route_ext_t cu_route_ext(const moe_layer_config_t *cfg, const uint8_t *avail) {
    const moe_router_opts_t o = moe_router_opts_make(cfg, avail);
    return (moe_k_route_ext_t){.active = o.active,
                               .sigmoid = o.sigmoid,
                               .num_groups = o.num_groups,
                               .topk_group = o.topk_group,
                               .group_max = o.group_max,
                               .scale = o.scale,
                               .avail = o.avail};
}

moe_status_t moe__cu_gate_fwd(moe_context_t *ctx, const moe_gate_fwd_args_t *g, void *stream) {
    cu_context_t *c = cu_ctx(ctx);
    const moe_backend_layer_t *l = g->layer;
    cu_layer_t *L = (cu_layer_t *)l->impl;
    cudaStream_t st = (cudaStream_t)stream;
    const int64_t T = g->T, D = l->D, E = l->E;
    MOE_CHECK(cu_enter(ctx, stream));
    const void *x = g->x, *wg = g->w_router, *wn = g->w_noise;
    MOE_CHECK(cu_router_f32(l, T, &x, &wg, &wn, st));
    MOE_CUBLAS_CHECK(moe_k_gemm(c->blas, 0, 0, T, E, D, x, D, wg, E, 0.0f, g->logits, E,
                                MOE_DTYPE_F32, 1));
    if (g->noisy)
        MOE_CUBLAS_CHECK(moe_k_gemm(c->blas, 0, 0, T, E, D, x, D, wn, E, 0.0f, g->noise_raw, E,
                                    MOE_DTYPE_F32, 1));
    const moe_k_gate_args_t a = {.T = T,
                                 .E = E,
                                 .K = l->K,
                                 .K1 = l->K1,
                                 .noisy = g->noisy,
                                 .gate_mode = (int)l->cfg.gate,
                                 .renormalize = l->cfg.renormalize,
                                 .seed = l->cfg.seed,
                                 .call = g->call,
                                 .rank = (uint32_t)l->rank,
                                 .logits = g->logits,
                                 .score_bias = g->score_bias,
                                 .noise_raw = g->noise_raw,
                                 .eps = g->eps,
                                 .h = g->h,
                                 .lse = g->lse,
                                 .idx = g->idx,
                                 .gate = g->gate,
                                 .scr = L->gate_scr,
                                 .part = L->part,
                                 .cnt_part = L->cnt_part,
                                 .red = L->red,
                                 .counts = L->counts_d,
                                 .ext = cu_route_ext(&l->cfg, g->avail)};
    MOE_CUDA_CHECK(moe_k_gate_fwd(&a, st));
    MOE_CUDA_CHECK(cudaMemcpyAsync(L->red_h, L->red, (size_t)(3 * E + 1) * sizeof(double),
                                   cudaMemcpyDeviceToHost, st));
    MOE_CUDA_CHECK(cudaMemcpyAsync(L->counts_h, L->counts_d, (size_t)E * sizeof(int64_t),
                                   cudaMemcpyDeviceToHost, st));
    /* the one routing sync of a forward: GEMM sizes and the aux losses need these on the host */
    MOE_CUDA_CHECK(cudaStreamSynchronize(st));
    const moe_router_sums_t *sums = &g->sums;
    for (int64_t e = 0; e < E; ++e) {
        sums->prob_sum[e] = L->red_h[e];
        sums->importance[e] = L->red_h[E + e];
        sums->load[e] = L->red_h[2 * E + e];
        sums->counts[e] = L->counts_h[e];
    }
    *sums->z_sum = L->red_h[3 * E];
    return MOE_STATUS_SUCCESS;
}

/* the router GEMMs of the backward in f32 storage: weight gradients and dx added in place */
static moe_status_t cu_router_bwd_f32(cublasHandle_t blas, const moe_gate_bwd_args_t *a) {
    const int64_t T = a->T, D = a->layer->D, E = a->layer->E;
    const int dt = MOE_DTYPE_F32;
    MOE_CUBLAS_CHECK(moe_k_gemm(blas, 1, 0, D, E, T, a->x, D, a->dlogits, E, 1.0f, a->dw_router,
                                E, dt, 0));
    MOE_CUBLAS_CHECK(moe_k_gemm(blas, 0, 1, T, D, E, a->dlogits, E, a->w_router, E, 1.0f, a->dx,
                                D, dt, 0));
    if (a->noisy) {
        MOE_CUBLAS_CHECK(moe_k_gemm(blas, 1, 0, D, E, T, a->x, D, a->dnoise, E, 1.0f,
                                    a->dw_noise, E, dt, 0));
        MOE_CUBLAS_CHECK(moe_k_gemm(blas, 0, 1, T, D, E, a->dnoise, E, a->w_noise, E, 1.0f,
                                    a->dx, D, dt, 0));
    }
    return MOE_STATUS_SUCCESS;
}

/* 16-bit storage: the router GEMMs in f32 on the forward's widened x, each result added into
 * its 16-bit destination with one rounding */
static moe_status_t cu_router_bwd_16(cublasHandle_t blas, const moe_gate_bwd_args_t *a,
                                     cudaStream_t st) {
    const moe_backend_layer_t *l = a->layer;
    cu_layer_t *L = (cu_layer_t *)l->impl;
    const int64_t T = a->T, D = l->D, E = l->E;
    const int dt = (int)l->cfg.dtype, f32 = MOE_DTYPE_F32;
    const void *wg = a->w_router, *wn = a->w_noise;
    MOE_CHECK(cu_router_f32(l, T, NULL, &wg, &wn, st));
    MOE_CUBLAS_CHECK(moe_k_gemm(blas, 1, 0, D, E, T, L->x32, D, a->dlogits, E, 0.0f, L->dw32, E,
                                f32, 1));
    MOE_CUDA_CHECK(moe_k_add_f32(a->dw_router, dt, L->dw32, D * E, st));
    MOE_CUBLAS_CHECK(moe_k_gemm(blas, 0, 1, T, D, E, a->dlogits, E, wg, E, 0.0f, L->dx32, D, f32,
                                1));
    if (a->noisy) {
        MOE_CUBLAS_CHECK(moe_k_gemm(blas, 1, 0, D, E, T, L->x32, D, a->dnoise, E, 0.0f, L->dw32,
                                    E, f32, 1));
        MOE_CUDA_CHECK(moe_k_add_f32(a->dw_noise, dt, L->dw32, D * E, st));
        MOE_CUBLAS_CHECK(moe_k_gemm(blas, 0, 1, T, D, E, a->dnoise, E, wn, E, 1.0f, L->dx32, D,
                                    f32, 1));
    }
    MOE_CUDA_CHECK(moe_k_add_f32(a->dx, dt, L->dx32, T * D, st));
    return MOE_STATUS_SUCCESS;
}

moe_status_t moe__cu_gate_bwd(moe_context_t *ctx, const moe_gate_bwd_args_t *g, void *stream) {
    cu_context_t *c = cu_ctx(ctx);
    const moe_backend_layer_t *l = g->layer;
    cu_layer_t *L = (cu_layer_t *)l->impl;
    cudaStream_t st = (cudaStream_t)stream;
    const int64_t T = g->T, E = l->E;
    MOE_CHECK(cu_enter(ctx, stream));
    /* the host's aux-loss coefficients (router_host.c); pageable sources are staged at once */
    const size_t eb = (size_t)E * sizeof(float);
    const moe_aux_coefs_t *k = g->coefs;
    MOE_CUDA_CHECK(cudaMemcpyAsync(L->coefs_d, k->switch_f, eb, cudaMemcpyHostToDevice, st));
    MOE_CUDA_CHECK(cudaMemcpyAsync(L->coefs_d + E, k->imp, eb, cudaMemcpyHostToDevice, st));
    MOE_CUDA_CHECK(cudaMemcpyAsync(L->coefs_d + 2 * E, k->load, eb, cudaMemcpyHostToDevice, st));
    const moe_k_gate_bwd_args_t a = {.T = T,
                                     .E = E,
                                     .K = l->K,
                                     .K1 = l->K1,
                                     .noisy = g->noisy,
                                     .gate_mode = (int)l->cfg.gate,
                                     .renormalize = l->cfg.renormalize,
                                     .any_logit = k->any_logit,
                                     .logits = g->logits,
                                     .noise_raw = g->noise_raw,
                                     .eps = g->eps,
                                     .h = g->h,
                                     .lse = g->lse,
                                     .gate = g->gate,
                                     .dg = g->dgate,
                                     .idx = g->idx,
                                     .coefs = L->coefs_d,
                                     .z_scale = k->z_scale,
                                     .scr = L->gate_scr,
                                     .dlogits = g->dlogits,
                                     .dnoise = g->dnoise,
                                     .ext = cu_route_ext(&l->cfg, g->avail)};
    MOE_CUDA_CHECK(moe_k_gate_bwd(&a, st));
    if (l->cfg.dtype == MOE_DTYPE_F32) return cu_router_bwd_f32(c->blas, g);
    return cu_router_bwd_16(c->blas, g, st);
}

/* ---------------------------------------------------------------------------------------------
 * hierarchical gating (kernels/gate_hier.cu): the router GEMMs of both levels around the
 * per-token kernels. The routers run in f32 whatever the storage: with a 16-bit dtype x, Wp and
 * Ws are widened into f32 scratch first (x32; w32 holds Wp at 0 and Ws at D E), and the
 * gradients are added into their 16-bit destinations with one rounding, as the flat router's.
 * ------------------------------------------------------------------------------------------- */

/* the f32 routers (and x, when given): *x, *wp, *ws replaced by f32 pointers */
static moe_status_t cu_hier_router_f32(const moe_backend_layer_t *l, int64_t T, const void **x,
                                       const void **wp, const void **ws, cudaStream_t st) {
    cu_layer_t *L = (cu_layer_t *)l->impl;
    const int dt = (int)l->cfg.dtype;
    if (l->cfg.dtype == MOE_DTYPE_F32) return MOE_STATUS_SUCCESS;
    const int64_t DE = l->D * l->E;
    if (x) {
        MOE_CUDA_CHECK(moe_k_to_f32(*x, dt, T * l->D, L->x32, st));
        *x = L->x32;
    }
    MOE_CUDA_CHECK(moe_k_to_f32(*wp, dt, l->D * l->cfg.num_groups, L->w32, st));
    *wp = L->w32;
    MOE_CUDA_CHECK(moe_k_to_f32(*ws, dt, DE, L->w32 + DE, st));
    *ws = L->w32 + DE;
    return MOE_STATUS_SUCCESS;
}

moe_status_t moe__cu_gate_hier_fwd(moe_context_t *ctx, const moe_gate_hier_fwd_args_t *g,
                                     void *stream) {
    cu_context_t *c = cu_ctx(ctx);
    const moe_backend_layer_t *l = g->layer;
    cu_layer_t *L = (cu_layer_t *)l->impl;
    cudaStream_t st = (cudaStream_t)stream;
    const int64_t T = g->T, D = l->D, E = l->E, G = g->G, Eg = E / G;
    const int dt = MOE_DTYPE_F32;
    MOE_CHECK(cu_enter(ctx, stream));
    const void *x = g->x, *wp = g->w_primary, *wsv = g->w_secondary;
    MOE_CHECK(cu_hier_router_f32(l, T, &x, &wp, &wsv, st));
    const float *ws = (const float *)wsv;
    MOE_CUBLAS_CHECK(moe_k_gemm(c->blas, 0, 0, T, G, D, x, D, wp, G, 0.0f, g->logits1, G, dt, 1));
    for (int64_t q = 0; q < G; ++q)
        MOE_CUBLAS_CHECK(moe_k_gemm(c->blas, 0, 0, T, Eg, D, x, D, ws + q * D * Eg, Eg, 0.0f,
                                    g->logits + q * Eg, E, dt, 1));
    const moe_k_gate_hier_args_t a = {.T = T,
                                      .E = E,
                                      .K = l->K,
                                      .K1 = l->K1,
                                      .G = G,
                                      .k1 = g->k1,
                                      .k2 = g->k2,
                                      .gate_mode = (int)l->cfg.gate,
                                      .renormalize = l->cfg.renormalize,
                                      .logits1 = g->logits1,
                                      .logits = g->logits,
                                      .lse = g->lse,
                                      .grp = g->grp,
                                      .g1 = g->g1,
                                      .g2 = g->g2,
                                      .idx = g->idx,
                                      .gate = g->gate,
                                      .scr = L->gate_scr,
                                      .part = L->hier_part,
                                      .cnt_part = L->hier_cnt,
                                      .red = L->hier_red,
                                      .counts = L->counts_d};
    MOE_CUDA_CHECK(moe_k_gate_hier_fwd(&a, st));
    const size_t nb = (size_t)MOE_HIER_NSUMS(G, E) * sizeof(double);
    MOE_CUDA_CHECK(cudaMemcpyAsync(L->hier_red_h, L->hier_red, nb, cudaMemcpyDeviceToHost, st));
    MOE_CUDA_CHECK(cudaMemcpyAsync(L->counts_h, L->counts_d, (size_t)E * sizeof(int64_t),
                                   cudaMemcpyDeviceToHost, st));
    /* the one routing sync of a forward, as the flat gate's */
    MOE_CUDA_CHECK(cudaStreamSynchronize(st));
    memcpy(g->sums, L->hier_red_h, nb);
    memcpy(g->counts, L->counts_h, (size_t)E * sizeof(int64_t));
    return MOE_STATUS_SUCCESS;
}

/* 16-bit storage: the router GEMMs of the backward in f32 on the forward's widened x (x32), each
 * result added into its 16-bit destination with one rounding */
static moe_status_t cu_hier_router_bwd_16(cublasHandle_t blas, const moe_gate_hier_bwd_args_t *g,
                                          cudaStream_t st) {
    const moe_backend_layer_t *l = g->layer;
    cu_layer_t *L = (cu_layer_t *)l->impl;
    const int64_t T = g->T, D = l->D, E = l->E, G = g->G, Eg = E / G;
    const int dt = (int)l->cfg.dtype, f32 = MOE_DTYPE_F32;
    const void *wp = g->w_primary, *wsv = g->w_secondary;
    MOE_CHECK(cu_hier_router_f32(l, T, NULL, &wp, &wsv, st));
    const float *ws = (const float *)wsv;
    MOE_CUBLAS_CHECK(moe_k_gemm(blas, 1, 0, D, G, T, L->x32, D, g->dlogits1, G, 0.0f, L->dw32, G,
                                f32, 1));
    MOE_CUDA_CHECK(moe_k_add_f32(g->dw_primary, dt, L->dw32, D * G, st));
    MOE_CUBLAS_CHECK(moe_k_gemm(blas, 0, 1, T, D, G, g->dlogits1, G, wp, G, 0.0f, L->dx32, D, f32,
                                1));
    for (int64_t q = 0; q < G; ++q) {
        const float *dl = g->dlogits + q * Eg;
        MOE_CUBLAS_CHECK(moe_k_gemm(blas, 1, 0, D, Eg, T, L->x32, D, dl, E, 0.0f,
                                    L->dw32 + q * D * Eg, Eg, f32, 1));
        MOE_CUBLAS_CHECK(moe_k_gemm(blas, 0, 1, T, D, Eg, dl, E, ws + q * D * Eg, Eg, 1.0f,
                                    L->dx32, D, f32, 1));
    }
    MOE_CUDA_CHECK(moe_k_add_f32(g->dw_secondary, dt, L->dw32, D * E, st));
    MOE_CUDA_CHECK(moe_k_add_f32(g->dx, dt, L->dx32, T * D, st));
    return MOE_STATUS_SUCCESS;
}

moe_status_t moe__cu_gate_hier_bwd(moe_context_t *ctx, const moe_gate_hier_bwd_args_t *g,
                                     void *stream) {
    cu_context_t *c = cu_ctx(ctx);
    const moe_backend_layer_t *l = g->layer;
    cu_layer_t *L = (cu_layer_t *)l->impl;
    cudaStream_t st = (cudaStream_t)stream;
    const int64_t T = g->T, D = l->D, E = l->E, G = g->G, Eg = E / G;
    const int dt = MOE_DTYPE_F32;
    MOE_CHECK(cu_enter(ctx, stream));
    const moe_hier_coefs_t *k = g->coefs;
    MOE_CUDA_CHECK(cudaMemcpyAsync(L->hier_coefs_d, k->c,
                                   (size_t)MOE_HIER_NCOEFS(G, E) * sizeof(float),
                                   cudaMemcpyHostToDevice, st));
    const moe_k_gate_hier_bwd_args_t a = {.T = T,
                                          .E = E,
                                          .K = l->K,
                                          .K1 = l->K1,
                                          .G = G,
                                          .k1 = g->k1,
                                          .k2 = g->k2,
                                          .gate_mode = (int)l->cfg.gate,
                                          .renormalize = l->cfg.renormalize,
                                          .any_logit = k->any_logit,
                                          .logits1 = g->logits1,
                                          .logits = g->logits,
                                          .g1 = g->g1,
                                          .g2 = g->g2,
                                          .dg = g->dgate,
                                          .grp = g->grp,
                                          .idx = g->idx,
                                          .coefs = L->hier_coefs_d,
                                          .z1_scale = k->z1_scale,
                                          .z2_scale = k->z2_scale,
                                          .scr = L->gate_scr,
                                          .scr_stride = cu_gate_scr_per(l),
                                          .dlogits1 = g->dlogits1,
                                          .dlogits = g->dlogits};
    MOE_CUDA_CHECK(moe_k_gate_hier_bwd(&a, st));
    if (l->cfg.dtype != MOE_DTYPE_F32) return cu_hier_router_bwd_16(c->blas, g, st);
    const float *ws = (const float *)g->w_secondary;
    float *dws = (float *)g->dw_secondary;
    MOE_CUBLAS_CHECK(moe_k_gemm(c->blas, 1, 0, D, G, T, g->x, D, g->dlogits1, G, 1.0f,
                                g->dw_primary, G, dt, 0));
    MOE_CUBLAS_CHECK(moe_k_gemm(c->blas, 0, 1, T, D, G, g->dlogits1, G, g->w_primary, G, 1.0f,
                                g->dx, D, dt, 0));
    for (int64_t q = 0; q < G; ++q) {
        const float *dl = g->dlogits + q * Eg;
        MOE_CUBLAS_CHECK(moe_k_gemm(c->blas, 1, 0, D, Eg, T, g->x, D, dl, E, 1.0f,
                                    dws + q * D * Eg, Eg, dt, 0));
        MOE_CUBLAS_CHECK(moe_k_gemm(c->blas, 0, 1, T, D, Eg, dl, E, ws + q * D * Eg, Eg, 1.0f,
                                    g->dx, D, dt, 0));
    }
    return MOE_STATUS_SUCCESS;
}
