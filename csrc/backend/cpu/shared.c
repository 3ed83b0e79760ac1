/* shared.c - the CPU shared experts (the twin of kernels/shared.cu): every token through each of
 * the S shared experts, an optional sigmoid gate per token, and their backward. Each shared
 * expert is the expert FFN of ffn.c run as one expert over all T rows. */

#include <math.h>
#include <string.h>

#include "backend/backend.h"
#include "backend/cpu/cpu.h"
#include "core/status.h"

/* the layer as ffn.c sees one shared expert: a single local expert of width Fs over rows
 * [0, T), whose offsets live in off */
static moe_backend_layer_t one_expert(const moe_backend_layer_t *l, int64_t T, int64_t off[2]) {
    moe_backend_layer_t v = *l;
    v.F = moe_shared_d_ff(&l->cfg);
    v.F2 = moe_shared_d_ff2(&l->cfg);
    v.E_local = 1;
    v.expert_begin = 0;
    off[0] = 0;
    off[1] = T;
    return v;
}

static const float *at(const void *p, int64_t i) { return p ? (const float *)p + i : NULL; }

moe_status_t moe__cpu_shared_fwd(moe_context_t *ctx, const moe_shared_fwd_args_t *a,
                                 void *stream) {
    const moe_backend_layer_t *l = a->layer;
    const int64_t T = a->T, D = l->D, S = l->cfg.num_shared_experts;
    int64_t off[2];
    const moe_backend_layer_t v = one_expert(l, T, off);
    const int64_t Fs = v.F, Fs2 = v.F2;
    for (int64_t s = 0; s < S; ++s) {
        const moe_ffn_fwd_args_t f = {.layer = &v,
                                      .rows = {.offsets = off, .route_offsets = 0},
                                      .w1 = at(a->w1, s * D * Fs2),
                                      .b1 = at(a->b1, s * Fs2),
                                      .w2 = at(a->w2, s * Fs * D),
                                      .b2 = at(a->b2, s * D),
                                      .x = a->x,
                                      .hpre = a->hpre + s * T * Fs2,
                                      .act = (float *)a->act + s * T * Fs,
                                      .y = (float *)a->ys + s * T * D};
        MOE_CHECK(moe__cpu_ffn_fwd(ctx, &f, stream));
    }
    const float *x = (const float *)a->x, *wg = (const float *)a->w_gate;
    const float *ys = (const float *)a->ys;
    float *y = (float *)a->y;
#pragma omp parallel for schedule(static) MOE_PAR(T * S * D)
    for (int64_t t = 0; t < T; ++t) {
        float g = 1.0f;
        if (wg) {
            float z = 0.0f; /* d order */
            for (int64_t d = 0; d < D; ++d) z += x[t * D + d] * wg[d];
            g = 1.0f / (1.0f + expf(-z));
        }
        a->gate[t] = g;
        for (int64_t d = 0; d < D; ++d) {
            float sum = 0.0f; /* s order */
            for (int64_t s = 0; s < S; ++s) sum += ys[(s * T + t) * D + d];
            y[t * D + d] += g * sum;
        }
    }
    return MOE_STATUS_SUCCESS;
}

moe_status_t moe__cpu_shared_combine_bwd(moe_context_t *ctx,
                                         const moe_shared_combine_bwd_args_t *a, void *stream) {
    (void)ctx, (void)stream;
    const moe_backend_layer_t *l = a->layer;
    const int64_t T = a->T, D = l->D, S = l->cfg.num_shared_experts;
    const float *dy = (const float *)a->dy, *ys = (const float *)a->ys;
    float *dys = (float *)a->dys;
#pragma omp parallel for schedule(static) MOE_PAR(T * S * D)
    for (int64_t t = 0; t < T; ++t) {
        const float g = a->gate[t];
        float dot = 0.0f;
        for (int64_t d = 0; d < D; ++d) {
            float sum = 0.0f;
            for (int64_t s = 0; s < S; ++s) sum += ys[(s * T + t) * D + d];
            dot += dy[t * D + d] * sum;
            dys[t * D + d] = g * dy[t * D + d];
        }
        a->dlogit[t] = a->gated ? dot * g * (1.0f - g) : 0.0f;
    }
    return MOE_STATUS_SUCCESS;
}

moe_status_t moe__cpu_shared_bwd(moe_context_t *ctx, const moe_shared_bwd_args_t *a,
                                 void *stream) {
    const moe_backend_layer_t *l = a->layer;
    const int64_t T = a->T, D = l->D, S = l->cfg.num_shared_experts;
    int64_t off[2];
    const moe_backend_layer_t v = one_expert(l, T, off);
    const int64_t Fs = v.F, Fs2 = v.F2;
    float *dx = (float *)a->dx;
    const float *dxs = (const float *)a->dxs;
    for (int64_t s = 0; s < S; ++s) {
        const moe_ffn_bwd_args_t f = {.layer = &v,
                                      .rows = {.offsets = off, .route_offsets = 0},
                                      .w1 = at(a->w1, s * D * Fs2),
                                      .w2 = at(a->w2, s * Fs * D),
                                      .dw1 = (float *)a->dw1 + s * D * Fs2,
                                      .db1 = a->db1 ? (float *)a->db1 + s * Fs2 : NULL,
                                      .dw2 = (float *)a->dw2 + s * Fs * D,
                                      .db2 = a->db2 ? (float *)a->db2 + s * D : NULL,
                                      .x = a->x,
                                      .hpre = a->hpre + s * T * Fs2,
                                      .act = (const float *)a->act + s * T * Fs,
                                      .dy = a->dys,
                                      .dact = a->dact,
                                      .dhpre = a->dhpre,
                                      .dx = a->dxs};
        MOE_CHECK(moe__cpu_ffn_bwd(ctx, &f, stream));
#pragma omp parallel for schedule(static) MOE_PAR(T * D)
        for (int64_t i = 0; i < T * D; ++i) dx[i] += dxs[i];
    }
    if (!a->dw_gate) return MOE_STATUS_SUCCESS;
    const float *x = (const float *)a->x, *wg = (const float *)a->w_gate;
    float *dwg = (float *)a->dw_gate;
    /* each column of x summed in token order: the same for any thread count */
#pragma omp parallel for schedule(static) MOE_PAR(T * D)
    for (int64_t d = 0; d < D; ++d) {
        float acc = 0.0f;
        for (int64_t t = 0; t < T; ++t) acc += a->dlogit[t] * x[t * D + d];
        dwg[d] += acc;
    }
#pragma omp parallel for schedule(static) MOE_PAR(T * D)
    for (int64_t t = 0; t < T; ++t)
        for (int64_t d = 0; d < D; ++d) dx[t * D + d] += a->dlogit[t] * wg[d];
    return MOE_STATUS_SUCCESS;
}
