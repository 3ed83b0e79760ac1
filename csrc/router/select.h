/* select.h - the per-token bodies of the routing extensions, for every backend (host and
 * device): sigmoid scores, group-limited selection, expert availability and the routed scaling
 * factor, with their gate and aux-loss backward. Formulas: docs/semantics.md "Routing
 * extensions". A layer that uses none of them runs router.h's bodies unchanged. */
#ifndef MOE_ROUTER_SELECT_H
#define MOE_ROUTER_SELECT_H

#include <math.h>
#include <stdint.h>

#include "core/hd.h"
#include "router/router.h"

/* what the per-token bodies need of the config (moe.h's enum values) and of this call */
typedef struct moe_router_opts {
    int active;           /* any of the options below differs from plain softmax routing */
    int sigmoid;          /* score function: 1 sigmoid, 0 softmax */
    int gate_mode;        /* moe_gate_t, softmax scores only */
    int renormalize;
    int num_groups;       /* G > 1: group-limited selection, else 0 */
    int topk_group;
    int group_max;        /* group score: 1 the best score, 0 the sum of the 2 best */
    float scale;          /* routed scaling factor */
    const uint8_t *avail; /* (E) 1 available, 0 not; NULL: every expert available */
} moe_router_opts_t;

static inline MOE_HD int moe_router_avail(const moe_router_opts_t *o, int e) {
    return o->avail == (const uint8_t *)0 || o->avail[e] != 0;
}

/* selection score of expert e: the score (h or sigmoid(h)) plus the balancing bias */
static inline MOE_HD float moe_router_sel(const float *h, const float *bias,
                                          const moe_router_opts_t *o, int e) {
    float s = o->sigmoid ? moe_sigmoid(h[e]) : h[e];
    return bias ? s + bias[e] : s;
}

/* Group-limited gating: keep[g] = 1 for the groups token may use. Groups are ranked by their
 * score over their available experts (the best selection score, or the sum of the best two; a
 * group with one available expert scores that one, one with none -inf), best first, ties to the
 * lower group; the best topk_group are kept, and further groups in rank order while the kept
 * groups hold fewer than K available experts. gsc: G floats of scratch. */
static inline MOE_HD void moe_router_groups(const float *h, const float *bias,
                                            const moe_router_opts_t *o, int E, int K,
                                            float *gsc, float *keep) {
    const int G = o->num_groups, n = E / G;
    for (int g = 0; g < G; ++g) {
        float b1 = -INFINITY, b2 = -INFINITY;
        int na = 0;
        for (int e = g * n; e < (g + 1) * n; ++e) {
            if (!moe_router_avail(o, e)) continue;
            float v = moe_router_sel(h, bias, o, e);
            ++na;
            if (v > b1) b2 = b1, b1 = v;
            else if (v > b2) b2 = v;
        }
        gsc[g] = na == 0 ? -INFINITY : (o->group_max || na == 1 ? b1 : b1 + b2);
        keep[g] = (float)na; /* available experts, until the group is ranked */
    }
    int kept = 0, have = 0;
    while (kept < G && (kept < o->topk_group || have < K)) {
        int best = -1;
        for (int g = 0; g < G; ++g) {
            if (keep[g] < 0.0f) continue; /* already kept */
            if (best < 0 || gsc[g] > gsc[best]) best = g;
        }
        have += (int)keep[best];
        keep[best] = -1.0f;
        ++kept;
    }
    for (int g = 0; g < G; ++g) keep[g] = keep[g] < 0.0f ? 1.0f : 0.0f;
}

/* Top n of the selection scores over the candidates (available, in a kept group when keep is
 * given), best first, ties to the lower expert index. Entries past the candidates get -1. */
static inline MOE_HD void moe_router_topk_opts(const float *h, const float *bias,
                                               const moe_router_opts_t *o, const float *keep,
                                               int E, int n, int32_t *idx, float *val) {
    const int gs = o->num_groups > 1 ? E / o->num_groups : E;
    int filled = 0;
    for (int e = 0; e < E; ++e) {
        if (!moe_router_avail(o, e) || (keep && keep[e / gs] == 0.0f)) continue;
        float v = moe_router_sel(h, bias, o, e);
        if (filled == n && !(v > val[n - 1])) continue;
        int p = filled < n ? filled++ : n - 1;
        while (p > 0 && v > val[p - 1]) {
            val[p] = val[p - 1];
            idx[p] = idx[p - 1];
            --p;
        }
        val[p] = v;
        idx[p] = e;
    }
    for (int j = filled; j < n; ++j) idx[j] = -1, val[j] = -INFINITY;
}

/* the largest h over the available experts */
static inline MOE_HD float moe_router_max_avail(const float *h, int E,
                                                const moe_router_opts_t *o) {
    float m = -INFINITY;
    for (int e = 0; e < E; ++e)
        if (moe_router_avail(o, e) && h[e] > m) m = h[e];
    return m;
}

/* Gate weights of the selected experts: sigmoid: g_j = s_j (/ (sum_i s_i + 1e-20) with
 * renormalize); softmax: softmax over the K selected (SOFTMAX_OF_TOPK or renormalize), else
 * the softmax over the available experts at idx_j; then g_j *= scale. */
static inline MOE_HD void moe_router_gates_opts(const float *h, int E, const int32_t *idx, int K,
                                                const moe_router_opts_t *o, float *g) {
    if (o->sigmoid) {
        float z = 0.0f;
        for (int j = 0; j < K; ++j) {
            g[j] = moe_sigmoid(h[idx[j]]);
            z += g[j];
        }
        const float f = o->renormalize ? o->scale / (z + 1e-20f) : o->scale;
        for (int j = 0; j < K; ++j) g[j] *= f;
        return;
    }
    const int all = o->gate_mode == MOE_ROUTER_TOPK_OF_SOFTMAX && !o->renormalize;
    float m = h[idx[0]];
    for (int j = 1; j < K; ++j) m = h[idx[j]] > m ? h[idx[j]] : m;
    if (all) m = moe_router_max_avail(h, E, o);
    float z = 0.0f;
    for (int j = 0; j < K; ++j) {
        g[j] = expf(h[idx[j]] - m);
        z += g[j];
    }
    if (all) {
        z = 0.0f;
        for (int e = 0; e < E; ++e)
            if (moe_router_avail(o, e)) z += expf(h[e] - m);
    }
    const float f = o->scale / z;
    for (int j = 0; j < K; ++j) g[j] *= f;
}

/* Backward of moe_router_gates_opts: dh[0..E) = d(sum_j dg_j g_j)/dh, g the forward's gates. */
static inline MOE_HD void moe_router_gates_opts_bwd(const float *h, int E, const int32_t *idx,
                                                    int K, const moe_router_opts_t *o,
                                                    const float *g, const float *dg, float *dh) {
    for (int e = 0; e < E; ++e) dh[e] = 0.0f;
    if (o->sigmoid) {
        /* g_j = c s_j / Z (Z = sum s + 1e-20, or Z = 1 without renormalize) */
        float z = 0.0f, sd = 0.0f;
        for (int j = 0; j < K; ++j) {
            float s = moe_sigmoid(h[idx[j]]);
            z += s;
            sd += dg[j] * s;
        }
        z = o->renormalize ? z + 1e-20f : 1.0f;
        for (int j = 0; j < K; ++j) {
            float s = moe_sigmoid(h[idx[j]]);
            float ds = o->renormalize ? o->scale * (dg[j] / z - sd / (z * z)) : o->scale * dg[j];
            dh[idx[j]] = ds * s * (1.0f - s);
        }
        return;
    }
    /* g_j = c q_j with q a softmax: dh = q_j (c dg_j - sum_i q_i c dg_i), sum_i q_i c dg_i =
     * sum_i g_i dg_i */
    float sum = 0.0f;
    for (int j = 0; j < K; ++j) sum += g[j] * dg[j];
    const float inv_c = 1.0f / o->scale;
    if (o->gate_mode == MOE_ROUTER_SOFTMAX_OF_TOPK || o->renormalize) {
        for (int j = 0; j < K; ++j) dh[idx[j]] = g[j] * inv_c * (o->scale * dg[j] - sum);
        return;
    }
    float m = moe_router_max_avail(h, E, o), z = 0.0f;
    for (int e = 0; e < E; ++e)
        if (moe_router_avail(o, e)) z += expf(h[e] - m);
    const float inv = 1.0f / z;
    for (int e = 0; e < E; ++e)
        if (moe_router_avail(o, e)) dh[e] = -expf(h[e] - m) * inv * sum;
    for (int j = 0; j < K; ++j) dh[idx[j]] += g[j] * dg[j];
}

/* The per-token probabilities of the aux losses from the clean logits, over the available
 * experts (0 for the others): p = softmax(logits) with softmax scores, p = sigmoid(logits)
 * normalised to sum 1 with sigmoid scores (DeepSeek-V3's sequence-wise balance loss). Returns
 * the logsumexp of the logits over the available experts (the z-loss's). */
static inline MOE_HD float moe_router_aux_probs(const float *lg, int E,
                                                const moe_router_opts_t *o, float *p) {
    const float m = moe_router_max_avail(lg, E, o);
    float z = 0.0f, s = 0.0f;
    for (int e = 0; e < E; ++e) {
        if (!moe_router_avail(o, e)) {
            p[e] = 0.0f;
            continue;
        }
        z += expf(lg[e] - m);
        p[e] = o->sigmoid ? moe_sigmoid(lg[e]) : expf(lg[e] - m);
        s += p[e];
    }
    const float inv = 1.0f / s;
    for (int e = 0; e < E; ++e) p[e] *= inv;
    return m + logf(z);
}

/* Backward of the switch and z terms for one token: adds to dl (E) the gradient of
 * sum_e switch_f[e] p_e (switch_f: router_host.c's per-expert switch coefficients) and of the
 * z-loss (z_scale * lse times the softmax over the available experts). p, q: E floats of
 * scratch. */
static inline MOE_HD void moe_router_aux_bwd(const float *lg, int E, const moe_router_opts_t *o,
                                             const float *switch_f, float z_scale, float lse,
                                             float *p, float *q, float *dl) {
    moe_router_aux_probs(lg, E, o, p);
    float fp = 0.0f;
    for (int e = 0; e < E; ++e) fp += switch_f[e] * p[e];
    /* softmax over the available experts, for the z-loss (q = p with softmax scores) */
    if (o->sigmoid) {
        moe_router_opts_t so = *o;
        so.sigmoid = 0;
        moe_router_aux_probs(lg, E, &so, q);
    } else {
        for (int e = 0; e < E; ++e) q[e] = p[e];
    }
    const float zs = z_scale * lse;
    for (int e = 0; e < E; ++e) {
        /* softmax: dp_k/dl_e = p_k (d_ke - p_e); normalised sigmoid: s'_e / S (d_ke - p_k) */
        float sw = o->sigmoid ? p[e] * (1.0f - moe_sigmoid(lg[e])) * (switch_f[e] - fp)
                              : p[e] * (switch_f[e] - fp);
        dl[e] += sw + zs * q[e];
    }
}

#endif
