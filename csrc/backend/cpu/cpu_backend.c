/* cpu_backend.c - the CPU backend: the reference every CUDA kernel is tested against.
 *
 * Per-token work (gate, combine, un-permute) runs under OpenMP over tokens; the expert FFNs are
 * one OpenBLAS sgemm per expert and direction over the expert-major buffer. Reductions over
 * tokens go through fixed blocks of MOE_CPU_BLOCK tokens summed in block order, and no float is
 * ever accumulated by two threads: results are the same run to run, and every routing decision
 * is the same for any thread count (the GEMMs' last bits follow OpenBLAS's per-thread-count
 * blocking). */
#define _POSIX_C_SOURCE 200112L

#include <cblas.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "backend/backend.h"
#include "context.h"
#include "core/activation.h"
#include "core/philox.h"
#include "core/status.h"
#include "router/router.h"
#include "router/router_host.h"

#define MOE_CPU_BLOCK 256 /* tokens per reduction block */

/* Loops with less work than this many elements run on the calling thread: waking the OpenMP
 * team costs more than it saves, and on a loaded machine a descheduled worker stalls the call. */
#define MOE_CPU_MIN_PARALLEL ((int64_t)1 << 15)
#define MOE_PAR(work) if ((int64_t)(work) >= MOE_CPU_MIN_PARALLEL)

static moe_status_t cpu_context_init(moe_context_t *ctx) {
    ctx->impl = NULL;
    return MOE_STATUS_SUCCESS;
}

static void cpu_context_fini(moe_context_t *ctx) { (void)ctx; }

static moe_status_t cpu_alloc(moe_context_t *ctx, void **ptr, size_t bytes) {
    (void)ctx;
    *ptr = NULL;
    if (bytes == 0) return MOE_STATUS_SUCCESS;
    if (posix_memalign(ptr, 64, bytes) != 0) {
        *ptr = NULL;
        return MOE_ERR(MOE_STATUS_ALLOC_FAILED, "host allocation of %zu bytes failed", bytes);
    }
    return MOE_STATUS_SUCCESS;
}

static void cpu_free(moe_context_t *ctx, void *ptr) {
    (void)ctx;
    free(ptr);
}

static moe_status_t cpu_memset_zero(moe_context_t *ctx, void *ptr, size_t bytes, void *stream) {
    (void)ctx, (void)stream;
    if (bytes) memset(ptr, 0, bytes);
    return MOE_STATUS_SUCCESS;
}

static moe_status_t cpu_copy(moe_context_t *ctx, void *dst, const void *src, size_t bytes,
                             moe_copy_kind_t kind, void *stream) {
    (void)ctx, (void)kind, (void)stream;
    if (bytes && dst != src) memcpy(dst, src, bytes);
    return MOE_STATUS_SUCCESS;
}

static moe_status_t cpu_sync(moe_context_t *ctx, void *stream) {
    (void)ctx, (void)stream;
    return MOE_STATUS_SUCCESS;
}

static moe_status_t cpu_count_nonfinite(moe_context_t *ctx, const void *x, int64_t n,
                                        int64_t *num_bad, void *stream) {
    (void)ctx, (void)stream;
    const float *v = (const float *)x;
    int64_t bad = 0;
#pragma omp parallel for reduction(+ : bad) schedule(static) MOE_PAR(n)
    for (int64_t i = 0; i < n; ++i) bad += !isfinite(v[i]);
    *num_bad = bad;
    return MOE_STATUS_SUCCESS;
}

/* C (m, n) = A (m, k) . B (k, n) + beta C, all row-major; transposes as flagged */
static void sgemm(int ta, int tb, int64_t m, int64_t n, int64_t k, const float *A, int64_t lda,
                  const float *B, int64_t ldb, float beta, float *C, int64_t ldc) {
    if (m == 0 || n == 0) return;
    cblas_sgemm(CblasRowMajor, ta ? CblasTrans : CblasNoTrans, tb ? CblasTrans : CblasNoTrans,
                (blasint)m, (blasint)n, (blasint)k, 1.0f, A, (blasint)lda, B, (blasint)ldb, beta,
                C, (blasint)ldc);
}

/* ---------------------------------------------------------------------------------------------
 * gate: logits, noise, top-k, gates and the per-expert sums behind the aux losses
 * ------------------------------------------------------------------------------------------- */

static moe_status_t cpu_gate_fwd(moe_context_t *ctx, moe_layer_state_t *s, void *stream) {
    (void)ctx, (void)stream;
    const int64_t T = s->T, D = s->D, E = s->E, K = s->K, K1 = s->K1;
    const int noisy = s->noisy_now;
    const int gate_mode = (int)s->cfg.gate, renorm = s->cfg.renormalize;
    sgemm(0, 0, T, E, D, s->x, D, (const float *)s->param[MOE_PARAM_ROUTER_WEIGHT], E, 0.0f,
          s->logits, E);
    if (noisy)
        sgemm(0, 0, T, E, D, s->x, D, (const float *)s->param[MOE_PARAM_NOISE_WEIGHT], E, 0.0f,
              s->noise_raw, E);

    /* per block: prob (E), importance (E), load (E), z (1) in doubles; counts (E) */
    const int64_t nblk = (T + MOE_CPU_BLOCK - 1) / MOE_CPU_BLOCK;
    const int64_t stride = 3 * E + 1;
    double *part = (double *)calloc((size_t)(nblk * stride), sizeof(double));
    int64_t *cnt = (int64_t *)calloc((size_t)(nblk * E), sizeof(int64_t));
    if (!part || !cnt) {
        free(part), free(cnt);
        return MOE_ERR(MOE_STATUS_ALLOC_FAILED, "gate scratch for %lld tokens", (long long)T);
    }
    int failed = 0;
#pragma omp parallel reduction(| : failed) MOE_PAR(T * E * 8)
    {
        /* per-thread rows: p, sigma, phi (E each), top-k values (K1) */
        float *scr = (float *)malloc((size_t)(3 * E + K1) * sizeof(float));
        if (!scr) failed = 1;
#pragma omp for schedule(static)
        for (int64_t b = 0; b < nblk; ++b) {
            if (!scr) continue;
            float *p = scr, *sigma = scr + E, *phi = scr + 2 * E, *val = scr + 3 * E;
            double *pp = part + b * stride, *pi = pp + E, *pl = pp + 2 * E, *pz = pp + 3 * E;
            int64_t *pc = cnt + b * E;
            int64_t t1 = (b + 1) * MOE_CPU_BLOCK < T ? (b + 1) * MOE_CPU_BLOCK : T;
            for (int64_t t = b * MOE_CPU_BLOCK; t < t1; ++t) {
                const float *lg = s->logits + t * E;
                const float *h = lg;
                if (noisy) {
                    float *hr = s->h + t * E, *er = s->eps + t * E;
                    const float *raw = s->noise_raw + t * E;
                    for (int64_t e = 0; e < E; ++e) {
                        sigma[e] = moe_softplus(raw[e]);
                        er[e] = moe_gating_noise(s->cfg.seed, s->call, (uint32_t)s->rank, t, e);
                        hr[e] = lg[e] + er[e] * sigma[e];
                    }
                    h = hr;
                }
                float lse = moe_router_softmax(lg, (int)E, p);
                s->lse[t] = lse;
                *pz += (double)lse * (double)lse;
                for (int64_t e = 0; e < E; ++e) pp[e] += p[e];
                int32_t *idx = s->idx + t * K1;
                float *g = s->gate + t * K;
                moe_router_topk_biased(h, s->score_bias, (int)E, (int)K1, idx, val);
                moe_router_gates(h, (int)E, idx, (int)K, gate_mode, renorm, g);
                for (int64_t j = 0; j < K; ++j) {
                    pi[idx[j]] += g[j];
                    pc[idx[j]] += 1;
                }
                if (noisy) {
                    moe_router_load_fwd(lg, h, sigma, idx, (int)K, (int)E, phi);
                    for (int64_t e = 0; e < E; ++e) pl[e] += phi[e];
                }
            }
        }
        free(scr);
    }
    if (failed) {
        free(part), free(cnt);
        return MOE_ERR(MOE_STATUS_ALLOC_FAILED, "gate thread scratch");
    }
    for (int64_t e = 0; e < E; ++e) {
        s->counts_h[e] = 0;
        s->prob_sum_h[e] = s->importance_h[e] = s->load_h[e] = 0.0;
    }
    s->z_sum = 0.0;
    for (int64_t b = 0; b < nblk; ++b) {
        const double *pp = part + b * stride;
        for (int64_t e = 0; e < E; ++e) {
            s->prob_sum_h[e] += pp[e];
            s->importance_h[e] += pp[E + e];
            s->load_h[e] += pp[2 * E + e];
            s->counts_h[e] += cnt[b * E + e];
        }
        s->z_sum += pp[3 * E];
    }
    if (!noisy)
        for (int64_t e = 0; e < E; ++e) s->load_h[e] = (double)s->counts_h[e];
    free(part), free(cnt);
    return MOE_STATUS_SUCCESS;
}

static moe_status_t cpu_route(moe_context_t *ctx, moe_layer_state_t *s, void *stream) {
    (void)ctx, (void)stream;
    int64_t *order = NULL;
    if (s->cfg.priority == MOE_PRIORITY_SCORE && s->capacity >= 0) {
        order = (int64_t *)malloc((size_t)(s->T * s->K) * sizeof(int64_t));
        if (!order) return MOE_ERR(MOE_STATUS_ALLOC_FAILED, "slot order scratch");
    }
    s->num_rows = moe_router_assign_slots(s->idx, s->K1, s->gate, s->T, s->K, s->E, s->capacity,
                                          (int)s->cfg.priority, s->row, s->offsets_h,
                                          s->dropped_h, order);
    free(order);
    return MOE_STATUS_SUCCESS;
}

/* ---------------------------------------------------------------------------------------------
 * permute / combine and their backward
 * ------------------------------------------------------------------------------------------- */

static moe_status_t cpu_permute(moe_context_t *ctx, moe_layer_state_t *s, void *stream) {
    (void)ctx, (void)stream;
    const int64_t T = s->T, K = s->K, D = s->D;
#pragma omp parallel for schedule(static) MOE_PAR(T * K * D)
    for (int64_t t = 0; t < T; ++t)
        for (int64_t j = 0; j < K; ++j) {
            int32_t r = s->row[t * K + j];
            if (r >= 0) memcpy(s->xp + (int64_t)r * D, s->x + t * D, (size_t)D * sizeof(float));
        }
    return MOE_STATUS_SUCCESS;
}

static moe_status_t cpu_combine_fwd(moe_context_t *ctx, moe_layer_state_t *s, void *y_,
                                    void *stream) {
    (void)ctx, (void)stream;
    const int64_t T = s->T, K = s->K, D = s->D;
    float *y = (float *)y_;
#pragma omp parallel for schedule(static) MOE_PAR(T * K * D)
    for (int64_t t = 0; t < T; ++t) {
        float *yt = y + t * D;
        memset(yt, 0, (size_t)D * sizeof(float));
        for (int64_t j = 0; j < K; ++j) { /* j order: deterministic */
            int32_t r = s->row[t * K + j];
            if (r < 0) continue;
            float g = s->gate[t * K + j];
            const float *src = s->yp + (int64_t)r * D;
            for (int64_t d = 0; d < D; ++d) yt[d] += g * src[d];
        }
    }
    return MOE_STATUS_SUCCESS;
}

static moe_status_t cpu_combine_bwd(moe_context_t *ctx, moe_layer_state_t *s, const void *dy_,
                                    void *stream) {
    (void)ctx, (void)stream;
    const int64_t T = s->T, K = s->K, D = s->D;
    const float *dy = (const float *)dy_;
#pragma omp parallel for schedule(static) MOE_PAR(T * K * D)
    for (int64_t t = 0; t < T; ++t) {
        const float *dyt = dy + t * D;
        for (int64_t j = 0; j < K; ++j) {
            int32_t r = s->row[t * K + j];
            float dg = 0.0f;
            if (r >= 0) {
                float g = s->gate[t * K + j];
                const float *yr = s->yp + (int64_t)r * D;
                float *dr = s->dyp + (int64_t)r * D;
                for (int64_t d = 0; d < D; ++d) {
                    dg += dyt[d] * yr[d];
                    dr[d] = g * dyt[d];
                }
            }
            s->dg[t * K + j] = dg;
        }
    }
    return MOE_STATUS_SUCCESS;
}

static moe_status_t cpu_unpermute_bwd(moe_context_t *ctx, moe_layer_state_t *s, void *dx_,
                                      void *stream) {
    (void)ctx, (void)stream;
    const int64_t T = s->T, K = s->K, D = s->D;
    float *dx = (float *)dx_;
#pragma omp parallel for schedule(static) MOE_PAR(T * K * D)
    for (int64_t t = 0; t < T; ++t) {
        float *o = dx + t * D;
        memset(o, 0, (size_t)D * sizeof(float));
        for (int64_t j = 0; j < K; ++j) {
            int32_t r = s->row[t * K + j];
            if (r < 0) continue;
            const float *src = s->dxp + (int64_t)r * D;
            for (int64_t d = 0; d < D; ++d) o[d] += src[d];
        }
    }
    return MOE_STATUS_SUCCESS;
}

/* ---------------------------------------------------------------------------------------------
 * experts: one GEMM per expert and direction over its rows of the expert-major buffer
 * ------------------------------------------------------------------------------------------- */

/* rows [r0, r1) of C (ld n) = broadcast bias row (n) or zero */
static void fill_rows(float *C, int64_t rows, int64_t n, const float *bias) {
#pragma omp parallel for schedule(static) MOE_PAR(rows * n)
    for (int64_t r = 0; r < rows; ++r) {
        if (bias)
            memcpy(C + r * n, bias, (size_t)n * sizeof(float));
        else
            memset(C + r * n, 0, (size_t)n * sizeof(float));
    }
}

/* out (n) += column sums of A (rows, n), each column summed in row order: threads take blocks
 * of columns and walk the rows, so every read is contiguous */
static void add_colsum(float *out, const float *A, int64_t rows, int64_t n) {
    enum { CB = 256 };
#pragma omp parallel for schedule(static) MOE_PAR(rows * n)
    for (int64_t c0 = 0; c0 < n; c0 += CB) {
        const int64_t w = n - c0 < CB ? n - c0 : CB;
        float acc[CB];
        for (int64_t c = 0; c < w; ++c) acc[c] = 0.0f;
        for (int64_t r = 0; r < rows; ++r) {
            const float *row = A + r * n + c0;
            for (int64_t c = 0; c < w; ++c) acc[c] += row[c];
        }
        for (int64_t c = 0; c < w; ++c) out[c0 + c] += acc[c];
    }
}

static moe_status_t cpu_ffn_fwd(moe_context_t *ctx, moe_layer_state_t *s, void *stream) {
    (void)ctx, (void)stream;
    const int64_t D = s->D, F = s->F, F2 = s->F2;
    const int act = (int)s->cfg.activation;
    const float *W1 = (const float *)s->param[MOE_PARAM_W1];
    const float *B1 = (const float *)s->param[MOE_PARAM_B1];
    const float *W2 = (const float *)s->param[MOE_PARAM_W2];
    const float *B2 = (const float *)s->param[MOE_PARAM_B2];
    for (int64_t le = 0; le < s->E_local; ++le) {
        int64_t e = s->expert_begin + le;
        int64_t r0 = s->offsets_h[e], n = s->offsets_h[e + 1] - r0;
        if (n == 0) continue;
        float *H = s->hpre + r0 * F2, *A = s->act + r0 * F, *Y = s->yp + r0 * D;
        fill_rows(H, n, F2, B1 ? B1 + le * F2 : NULL);
        sgemm(0, 0, n, F2, D, s->xp + r0 * D, D, W1 + le * D * F2, F2, 1.0f, H, F2);
        if (act == MOE_ACT_SWIGLU) {
#pragma omp parallel for schedule(static) MOE_PAR(n * F)
            for (int64_t r = 0; r < n; ++r)
                for (int64_t f = 0; f < F; ++f)
                    A[r * F + f] = moe_swiglu_fwd(H[r * F2 + f], H[r * F2 + F + f]);
        } else {
#pragma omp parallel for schedule(static) MOE_PAR(n * F)
            for (int64_t i = 0; i < n * F; ++i) A[i] = moe_act_fwd(act, H[i]);
        }
        fill_rows(Y, n, D, B2 ? B2 + le * D : NULL);
        sgemm(0, 0, n, D, F, A, F, W2 + le * F * D, D, 1.0f, Y, D);
    }
    return MOE_STATUS_SUCCESS;
}

static moe_status_t cpu_ffn_bwd(moe_context_t *ctx, moe_layer_state_t *s, void *stream) {
    (void)ctx, (void)stream;
    const int64_t D = s->D, F = s->F, F2 = s->F2;
    const int act = (int)s->cfg.activation;
    const float *W1 = (const float *)s->param[MOE_PARAM_W1];
    const float *W2 = (const float *)s->param[MOE_PARAM_W2];
    float *dW1 = (float *)s->grad[MOE_PARAM_W1], *dB1 = (float *)s->grad[MOE_PARAM_B1];
    float *dW2 = (float *)s->grad[MOE_PARAM_W2], *dB2 = (float *)s->grad[MOE_PARAM_B2];
    for (int64_t le = 0; le < s->E_local; ++le) {
        int64_t e = s->expert_begin + le;
        int64_t r0 = s->offsets_h[e], n = s->offsets_h[e + 1] - r0;
        if (n == 0) continue;
        const float *X = s->xp + r0 * D, *H = s->hpre + r0 * F2, *A = s->act + r0 * F;
        const float *dY = s->dyp + r0 * D;
        float *dA = s->dact + r0 * F, *dH = s->dhpre + r0 * F2, *dX = s->dxp + r0 * D;
        /* dA = dY W2^T;  dW2 += A^T dY;  db2 += colsum dY */
        sgemm(0, 1, n, F, D, dY, D, W2 + le * F * D, D, 0.0f, dA, F);
        sgemm(1, 0, F, D, n, A, F, dY, D, 1.0f, dW2 + le * F * D, D);
        if (dB2) add_colsum(dB2 + le * D, dY, n, D);
        if (act == MOE_ACT_SWIGLU) {
#pragma omp parallel for schedule(static) MOE_PAR(n * F)
            for (int64_t r = 0; r < n; ++r)
                for (int64_t f = 0; f < F; ++f)
                    moe_swiglu_bwd(H[r * F2 + f], H[r * F2 + F + f], dA[r * F + f],
                                   &dH[r * F2 + f], &dH[r * F2 + F + f]);
        } else {
#pragma omp parallel for schedule(static) MOE_PAR(n * F)
            for (int64_t i = 0; i < n * F; ++i) dH[i] = dA[i] * moe_act_grad(act, H[i]);
        }
        /* dW1 += X^T dH;  db1 += colsum dH;  dX = dH W1^T */
        sgemm(1, 0, D, F2, n, X, D, dH, F2, 1.0f, dW1 + le * D * F2, F2);
        if (dB1) add_colsum(dB1 + le * F2, dH, n, F2);
        sgemm(0, 1, n, D, F2, dH, F2, W1 + le * D * F2, F2, 0.0f, dX, D);
    }
    return MOE_STATUS_SUCCESS;
}

/* ---------------------------------------------------------------------------------------------
 * gate backward: gates, aux losses and the noise network, then the router GEMMs
 * ------------------------------------------------------------------------------------------- */

static moe_status_t cpu_gate_bwd(moe_context_t *ctx, moe_layer_state_t *s, void *dx_,
                                 void *stream) {
    (void)ctx, (void)stream;
    const int64_t T = s->T, D = s->D, E = s->E, K = s->K, K1 = s->K1;
    const int noisy = s->noisy_now;
    const int gate_mode = (int)s->cfg.gate, renorm = s->cfg.renormalize;
    const moe_aux_coefs_t *c = &s->coefs;
    int failed = 0;
#pragma omp parallel reduction(| : failed) MOE_PAR(T * E * 8)
    {
        float *scr = (float *)malloc((size_t)(4 * E + K) * sizeof(float));
        if (!scr) failed = 1;
#pragma omp for schedule(static)
        for (int64_t t = 0; t < T; ++t) {
            if (!scr) continue;
            float *dh = scr, *p = scr + E, *sigma = scr + 2 * E, *dsig = scr + 3 * E;
            float *dg = scr + 4 * E;
            const float *lg = s->logits + t * E;
            const float *h = noisy ? s->h + t * E : lg;
            const int32_t *idx = s->idx + t * K1;
            for (int64_t j = 0; j < K; ++j) dg[j] = s->dg[t * K + j] + c->imp[idx[j]];
            moe_router_gates_bwd(h, (int)E, idx, (int)K, gate_mode, renorm, s->gate + t * K, dg,
                                 dh);
            /* dh is the gradient of the scores h; h = logits (+ eps sigma) */
            float *dl = s->dlogits + t * E;
            for (int64_t e = 0; e < E; ++e) dl[e] = dh[e];
            if (c->any_logit) {
                moe_router_softmax(lg, (int)E, p);
                float fp = 0.0f;
                for (int64_t e = 0; e < E; ++e) fp += c->switch_f[e] * p[e];
                float zs = c->z_scale * s->lse[t];
                for (int64_t e = 0; e < E; ++e) dl[e] += p[e] * (c->switch_f[e] - fp) + zs * p[e];
            }
            if (noisy) {
                const float *raw = s->noise_raw + t * E, *eps = s->eps + t * E;
                for (int64_t e = 0; e < E; ++e) {
                    sigma[e] = moe_softplus(raw[e]);
                    dsig[e] = dh[e] * eps[e];
                }
                moe_router_load_bwd(lg, h, sigma, eps, idx, (int)K, (int)E, c->load, dl, dsig);
                float *dn = s->dnoise + t * E;
                for (int64_t e = 0; e < E; ++e) dn[e] = dsig[e] * moe_sigmoid(raw[e]);
            }
        }
        free(scr);
    }
    if (failed) return MOE_ERR(MOE_STATUS_ALLOC_FAILED, "gate backward thread scratch");
    float *dx = (float *)dx_;
    sgemm(1, 0, D, E, T, s->x, D, s->dlogits, E, 1.0f, (float *)s->grad[MOE_PARAM_ROUTER_WEIGHT],
          E);
    sgemm(0, 1, T, D, E, s->dlogits, E, (const float *)s->param[MOE_PARAM_ROUTER_WEIGHT], E, 1.0f,
          dx, D);
    if (noisy) {
        sgemm(1, 0, D, E, T, s->x, D, s->dnoise, E, 1.0f,
              (float *)s->grad[MOE_PARAM_NOISE_WEIGHT], E);
        sgemm(0, 1, T, D, E, s->dnoise, E, (const float *)s->param[MOE_PARAM_NOISE_WEIGHT], E,
              1.0f, dx, D);
    }
    return MOE_STATUS_SUCCESS;
}

const moe_backend_ops_t moe_cpu_backend = {
    .name = "cpu",
    .context_init = cpu_context_init,
    .context_fini = cpu_context_fini,
    .mem = {.alloc = cpu_alloc,
            .free = cpu_free,
            .memset_zero = cpu_memset_zero,
            .copy = cpu_copy,
            .sync = cpu_sync},
    .count_nonfinite = cpu_count_nonfinite,
    .gate_fwd = cpu_gate_fwd,
    .route = cpu_route,
    .permute = cpu_permute,
    .ffn_fwd = cpu_ffn_fwd,
    .combine_fwd = cpu_combine_fwd,
    .combine_bwd = cpu_combine_bwd,
    .ffn_bwd = cpu_ffn_bwd,
    .unpermute_bwd = cpu_unpermute_bwd,
    .gate_bwd = cpu_gate_bwd,
};
