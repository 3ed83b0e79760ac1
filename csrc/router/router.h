/* router.h - the per-token routing math, written once for every backend (host and device).
 *
 * Called from the CPU loops in csrc/backend/cpu/ and from the CUDA kernels in kernels/.
 * One token's row is E contiguous floats. Formulas: docs/semantics.md. */
#ifndef MOE_ROUTER_ROUTER_H
#define MOE_ROUTER_ROUTER_H

#include <math.h>
#include <stdint.h>

#include "core/hd.h"

/* gate orders: the values of moe_gate_t */
#define MOE_ROUTER_SOFTMAX_OF_TOPK 0
#define MOE_ROUTER_TOPK_OF_SOFTMAX 1

static inline MOE_HD float moe_softplus(float x) {
    /* log(1 + e^x) without overflow */
    return x > 20.0f ? x : log1pf(expf(x));
}

static inline MOE_HD float moe_sigmoid(float x) { return 1.0f / (1.0f + expf(-x)); }

static inline MOE_HD float moe_normal_pdf(float z) {
    return 0.3989422804014327f * expf(-0.5f * z * z);
}

static inline MOE_HD float moe_normal_cdf(float z) { return 0.5f * erfcf(-z * 0.7071067811865476f); }

/* Top n of h + bias (n <= E; bias may be NULL), best first, ties to the lower expert index.
 * idx/val hold n entries; val gets the biased scores. */
static inline MOE_HD void moe_router_topk_biased(const float *h, const float *bias, int E, int n,
                                                 int32_t *idx, float *val) {
    int filled = 0;
    for (int e = 0; e < E; ++e) {
        float v = bias ? h[e] + bias[e] : h[e];
        if (filled == n && !(v > val[n - 1])) continue;
        int p = filled < n ? filled++ : n - 1;
        /* strictly greater moves ahead: an equal value keeps the lower index in front */
        while (p > 0 && v > val[p - 1]) {
            val[p] = val[p - 1];
            idx[p] = idx[p - 1];
            --p;
        }
        val[p] = v;
        idx[p] = e;
    }
}

/* Top n of h, best first, ties to the lower expert index. */
static inline MOE_HD void moe_router_topk(const float *h, int E, int n, int32_t *idx, float *val) {
    moe_router_topk_biased(h, (const float *)0, E, n, idx, val);
}

/* the largest h over the selected experts, or over all E */
static inline MOE_HD float moe_router_max(const float *h, int E, const int32_t *idx, int K,
                                          int all) {
    float m = h[idx[0]];
    if (all) {
        for (int e = 0; e < E; ++e) m = h[e] > m ? h[e] : m;
    } else {
        for (int j = 1; j < K; ++j) m = h[idx[j]] > m ? h[idx[j]] : m;
    }
    return m;
}

/* Gate weights g[0..K) of the selected experts idx (without a selection bias idx[0] holds the
 * row max; with one, the max is searched). */
static inline MOE_HD void moe_router_gates(const float *h, int E, const int32_t *idx, int K,
                                           int gate, int renormalize, float *g) {
    const int all = gate == MOE_ROUTER_TOPK_OF_SOFTMAX && !renormalize;
    float m = moe_router_max(h, E, idx, K, all);
    float sel = 0.0f;
    for (int j = 0; j < K; ++j) {
        g[j] = expf(h[idx[j]] - m);
        sel += g[j];
    }
    float z = sel;
    if (gate == MOE_ROUTER_TOPK_OF_SOFTMAX && !renormalize) {
        z = 0.0f;
        for (int e = 0; e < E; ++e) z += expf(h[e] - m);
    }
    float inv = 1.0f / z;
    for (int j = 0; j < K; ++j) g[j] *= inv;
}

/* Backward of moe_router_gates: dh[0..E) = d(sum_j dg_j g_j)/dh. g are the forward's gates. */
static inline MOE_HD void moe_router_gates_bwd(const float *h, int E, const int32_t *idx, int K,
                                               int gate, int renormalize, const float *g,
                                               const float *dg, float *dh) {
    for (int e = 0; e < E; ++e) dh[e] = 0.0f;
    float s = 0.0f;
    for (int j = 0; j < K; ++j) s += g[j] * dg[j];
    if (gate == MOE_ROUTER_SOFTMAX_OF_TOPK || renormalize) {
        /* both are a softmax over the K selected scores: the E-wide normaliser cancels */
        for (int j = 0; j < K; ++j) dh[idx[j]] = g[j] * (dg[j] - s);
        return;
    }
    /* g_j = p_{idx_j}, p = softmax over E: dh_e = p_e (dp_e - sum_i p_i dp_i) */
    float m = moe_router_max(h, E, idx, K, 1), z = 0.0f;
    for (int e = 0; e < E; ++e) z += expf(h[e] - m);
    float inv = 1.0f / z;
    for (int e = 0; e < E; ++e) dh[e] = -expf(h[e] - m) * inv * s;
    for (int j = 0; j < K; ++j) dh[idx[j]] += g[j] * dg[j];
}

/* Softmax of one logits row into p (may be NULL); returns logsumexp. */
static inline MOE_HD float moe_router_softmax(const float *x, int E, float *p) {
    float m = x[0];
    for (int e = 1; e < E; ++e) m = x[e] > m ? x[e] : m;
    float z = 0.0f;
    for (int e = 0; e < E; ++e) z += expf(x[e] - m);
    if (p) {
        float inv = 1.0f / z;
        for (int e = 0; e < E; ++e) p[e] = expf(x[e] - m) * inv;
    }
    return m + logf(z);
}

static inline MOE_HD int moe_router_selected(const int32_t *idx, int K, int e) {
    for (int j = 0; j < K; ++j)
        if (idx[j] == e) return 1;
    return 0;
}

/* Expert whose noisy score is the threshold of expert e in Shazeer's load estimator: the K-th
 * largest of h leaving e out. idx holds the top min(K+1, E) of h. -1 when there is none (K = E
 * and e selected): then P(e in top-K) = 1. */
static inline MOE_HD int moe_router_threshold_expert(const int32_t *idx, int K, int E, int e) {
    if (moe_router_selected(idx, K, e)) return K < E ? idx[K] : -1;
    return idx[K - 1];
}

/* Shazeer's P(e stays in the top K under fresh noise) for every e of one token:
 * phi[e] = Phi((logits_e - h_thr) / sigma_e). */
static inline MOE_HD void moe_router_load_fwd(const float *logits, const float *h,
                                              const float *sigma, const int32_t *idx, int K,
                                              int E, float *phi) {
    for (int e = 0; e < E; ++e) {
        int m = moe_router_threshold_expert(idx, K, E, e);
        phi[e] = m < 0 ? 1.0f : moe_normal_cdf((logits[e] - h[m]) / sigma[e]);
    }
}

/* Backward of the load estimator for one token: c[e] = dLoss/dload_e. Accumulates into
 * dlogits (E) and dsigma (E); the threshold h_m = logits_m + eps_m sigma_m gets its share. */
static inline MOE_HD void moe_router_load_bwd(const float *logits, const float *h,
                                              const float *sigma, const float *eps,
                                              const int32_t *idx, int K, int E, const float *c,
                                              float *dlogits, float *dsigma) {
    for (int e = 0; e < E; ++e) {
        int m = moe_router_threshold_expert(idx, K, E, e);
        if (m < 0 || c[e] == 0.0f) continue;
        float z = (logits[e] - h[m]) / sigma[e];
        float a = c[e] * moe_normal_pdf(z) / sigma[e]; /* dLoss / d(logits_e - h_m) */
        dlogits[e] += a;
        dsigma[e] -= a * z;
        dlogits[m] -= a;
        dsigma[m] -= a * eps[m];
    }
}

#endif
