/* buffers.c - the layer's buffers: the per-token ones grown to the largest T seen, the
 * expert-side ones to the most rows received, each list all or nothing; and the routing read
 * back to the host for moe_layer_routing and traces. */
#include <stdlib.h>
#include <string.h>

#include "backend/backend.h"
#include "buffers.h"
#include "core/dtype.h"
#include "core/status.h"
#include "handle.h"

/* ---------------------------------------------------------------------------------------------
 * growth: every buffer of a list for the new count, or none
 * ------------------------------------------------------------------------------------------- */

typedef struct {
    void **slot; /* where the pointer lives in the state */
    int64_t per_token; /* bytes per token */
} moe__buf_t;

/* Rows that are GEMM operands or the user's rows (x, xp, act, yp and their gradients) are
 * stored in the layer's dtype; the routing state and the GEMM outputs that only feed elementwise
 * kernels (hpre, dact) stay f32. With f32 storage every buffer is f32. */
static int list_buffers(moe_layer_state_t *s, moe__buf_t *b) {
    const int64_t D = s->D, E = s->E, K = s->K, f = sizeof(float);
    const int64_t v = (int64_t)moe_dtype_size(s->cfg.dtype);
    const int noisy = s->cfg.noisy_gating;
    int n = 0;
#define MOE_BUF(ptr, bytes) (b[n].slot = (void **)&s->ptr, b[n].per_token = (bytes), ++n)
    MOE_BUF(x, D * v);
    MOE_BUF(logits, E * f);
    MOE_BUF(noise_raw, noisy ? E * f : 0);
    MOE_BUF(eps, noisy ? E * f : 0);
    MOE_BUF(h, noisy ? E * f : 0);
    MOE_BUF(dnoise, noisy ? E * f : 0);
    MOE_BUF(lse, f);
    MOE_BUF(idx, s->K1 * (int64_t)sizeof(int32_t));
    MOE_BUF(row, K * (int64_t)sizeof(int32_t));
    MOE_BUF(gate, K * f);
    MOE_BUF(dg, K * f);
    MOE_BUF(dlogits, E * f);
    MOE_BUF(xp, K * D * v);
    MOE_BUF(yp, K * D * v);
    MOE_BUF(dyp, K * D * v);
    MOE_BUF(dxp, K * D * v);
    /* hierarchical gating (G = 0 otherwise) */
    MOE_BUF(h_logits1, s->G * f);
    MOE_BUF(h_dlogits1, s->G * f);
    MOE_BUF(h_grp, s->G ? s->k1 * (int64_t)sizeof(int32_t) : 0);
    MOE_BUF(h_g1, s->G ? s->k1 * f : 0);
    MOE_BUF(h_g2, s->G ? K * f : 0);
    /* shared experts: every token passes through each of the S */
    const int64_t S = s->cfg.num_shared_experts;
    const int64_t Fs = S ? moe_shared_d_ff(&s->cfg) : 0, Fs2 = S ? moe_shared_d_ff2(&s->cfg) : 0;
    MOE_BUF(sh_hpre, S * Fs2 * f);
    MOE_BUF(sh_act, S * Fs * v);
    MOE_BUF(sh_ys, S * D * v);
    MOE_BUF(sh_gate, S ? f : 0);
    MOE_BUF(sh_dys, S ? D * v : 0);
    MOE_BUF(sh_dact, Fs * f);
    MOE_BUF(sh_dhpre, Fs2 * v);
    MOE_BUF(sh_dxs, S ? D * v : 0);
    MOE_BUF(sh_dlogit, S ? f : 0);
    MOE_BUF(sendp, s->pack_rows ? K * D * v : 0); /* a placement that needs packing */
#undef MOE_BUF
    return n;
}

/* expert-side buffers, per row the local experts process */
static int list_row_buffers(moe_layer_t *L, moe__buf_t *b) {
    moe_layer_state_t *s = &L->s;
    const int64_t D = s->D, F = s->F, F2 = s->F2, f = sizeof(float);
    const int64_t v = (int64_t)moe_dtype_size(s->cfg.dtype);
    const int ep = L->ctx->world > 1;
    int n = 0;
#define MOE_BUF(ptr, bytes) (b[n].slot = (void **)&(ptr), b[n].per_token = (bytes), ++n)
    MOE_BUF(s->hpre, F2 * f);
    MOE_BUF(s->dhpre, F2 * v);
    MOE_BUF(s->act, F * v);
    MOE_BUF(s->dact, F * f);
    MOE_BUF(L->ex_wire, ep ? D * v : 0);
    MOE_BUF(L->ex_x, ep ? D * v : 0);
    MOE_BUF(L->ex_y, ep ? D * v : 0);
    MOE_BUF(L->ex_dy, ep ? D * v : 0);
    MOE_BUF(L->ex_dx, ep ? D * v : 0);
#undef MOE_BUF
    return n;
}

#define MOE_MAX_BUFS 48 /* per list; list_buffers holds 25 */

static void free_list(moe_layer_t *L, moe__buf_t *b, int n) {
    for (int i = 0; i < n; ++i) {
        L->ctx->ops->mem.free(L->ctx, *b[i].slot);
        *b[i].slot = NULL;
    }
}

void moe__buffers_free(moe_layer_t *L) {
    moe__buf_t b[MOE_MAX_BUFS];
    free_list(L, b, list_buffers(&L->s, b));
    L->s.cap_tokens = 0;
    free_list(L, b, list_row_buffers(L, b));
    L->cap_rows = 0;
}

/* allocates every buffer of the list for `count` tokens or rows, all or nothing */
static moe_status_t grow_list(moe_layer_t *L, moe__buf_t *b, int n, int64_t count,
                              int64_t have, const char *what) {
    void *fresh[MOE_MAX_BUFS] = {0};
    for (int i = 0; i < n; ++i) {
        if (b[i].per_token == 0) continue;
        moe_status_t st = MOE_STATUS_SUCCESS;
        if (b[i].per_token > INT64_MAX / count)
            st = MOE_ERR(MOE_STATUS_INVALID_ARGUMENT, "%lld %s is too many", (long long)count,
                         what);
        else
            st = L->ctx->ops->mem.alloc(L->ctx, &fresh[i], (size_t)(b[i].per_token * count));
        if (st != MOE_STATUS_SUCCESS) {
            for (int k = 0; k < i; ++k) L->ctx->ops->mem.free(L->ctx, fresh[k]);
            if (st == MOE_STATUS_INVALID_ARGUMENT) return st;
            return MOE_ERR(MOE_STATUS_ALLOC_FAILED,
                           "buffers for %lld %s: %s (the layer keeps its buffers for %lld)",
                           (long long)count, what, moe_status_string(st), (long long)have);
        }
    }
    free_list(L, b, n);
    for (int i = 0; i < n; ++i) *b[i].slot = fresh[i];
    return MOE_STATUS_SUCCESS;
}

moe_status_t moe__buffers_reserve_tokens(moe_layer_t *L, int64_t T) {
    if (T <= L->s.cap_tokens) return MOE_STATUS_SUCCESS;
    moe__buf_t b[MOE_MAX_BUFS];
    MOE_CHECK(grow_list(L, b, list_buffers(&L->s, b), T, L->s.cap_tokens, "tokens"));
    L->s.cap_tokens = T;
    return MOE_STATUS_SUCCESS;
}

moe_status_t moe__buffers_reserve_rows(moe_layer_t *L, int64_t rows) {
    if (rows <= L->cap_rows) return MOE_STATUS_SUCCESS;
    moe__buf_t b[MOE_MAX_BUFS];
    MOE_CHECK(grow_list(L, b, list_row_buffers(L, b), rows, L->cap_rows, "expert rows"));
    L->cap_rows = rows;
    return MOE_STATUS_SUCCESS;
}

/* ---------------------------------------------------------------------------------------------
 * routing read-back
 * ------------------------------------------------------------------------------------------- */

moe_status_t moe__buffers_read_routing(moe_layer_t *layer, int32_t *expert_index, float *gate,
                                       int32_t *kept) {
    moe_layer_state_t *s = &layer->s;
    moe_context_t *ctx = layer->ctx;
    const int64_t T = s->T, K = s->K;
    if (T == 0) return MOE_STATUS_SUCCESS;
    int32_t *idx1 = (int32_t *)malloc((size_t)(T * s->K1) * sizeof(int32_t));
    int32_t *rows = (int32_t *)malloc((size_t)(T * K) * sizeof(int32_t));
    if (!idx1 || !rows) {
        free(idx1), free(rows);
        return MOE_ERR(MOE_STATUS_ALLOC_FAILED, "routing staging for %lld tokens", (long long)T);
    }
    moe_status_t st;
    MOE_CHECK_GOTO(ctx->ops->mem.copy(ctx, idx1, s->idx, (size_t)(T * s->K1) * sizeof(int32_t),
                                      MOE_COPY_D2H, NULL),
                   st, done);
    MOE_CHECK_GOTO(ctx->ops->mem.copy(ctx, rows, s->row, (size_t)(T * K) * sizeof(int32_t),
                                      MOE_COPY_D2H, NULL),
                   st, done);
    if (gate)
        MOE_CHECK_GOTO(ctx->ops->mem.copy(ctx, gate, s->gate, (size_t)(T * K) * sizeof(float),
                                          MOE_COPY_D2H, NULL),
                       st, done);
    MOE_CHECK_GOTO(ctx->ops->mem.sync(ctx, NULL), st, done);
    for (int64_t t = 0; t < T; ++t)
        for (int64_t j = 0; j < K; ++j) {
            if (expert_index) expert_index[t * K + j] = idx1[t * s->K1 + j];
            if (kept) kept[t * K + j] = rows[t * K + j] >= 0;
        }
done:
    free(idx1), free(rows);
    return st;
}
