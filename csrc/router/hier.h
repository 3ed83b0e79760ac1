/* hier.h - the per-token math of hierarchical gating (Shazeer et al. 2017, appendix B), written
 * once for every backend (host and device): the CPU loop of csrc/backend/cpu/gate_hier.c and
 * the kernels of kernels/gate_hier.cu call these bodies.
 *
 * Letters: G groups of Eg = E / G consecutive experts, k1 groups and k2 experts per group per
 * token, K = k1 k2. One token's primary logits l1 are G floats; its secondary logits l2 are E
 * floats, group g's at [g Eg, (g + 1) Eg). Choice j = j1 k2 + j2 is the j2-th expert of the
 * j1-th group. Formulas: docs/semantics.md, "Hierarchical gating". */
#ifndef MOE_ROUTER_HIER_H
#define MOE_ROUTER_HIER_H

#include <math.h>
#include <stdint.h>

#include "core/hd.h"
#include "router/router.h"

/* Layout of the per-expert and per-group sums of one gate pass (doubles; summed over ranks):
 *   prob1 (G)  sum_t softmax(l1_t)_g          imp1 (G)  sum of the primary gates of g
 *   n1 (G)     tokens that chose g            z1 (1)    sum_t lse(l1_t)^2
 *   prob2 (E)  sum over the tokens that chose e's group of softmax(l2_t, group)_e
 *   imp2 (E)   sum of the secondary gates of e    z2 (1)  sum over (t, chosen g) of lse^2
 * The per-expert assignment counts go to the flat gate's counts. */
#define MOE_HIER_PROB1(G, E) 0
#define MOE_HIER_IMP1(G, E) (G)
#define MOE_HIER_N1(G, E) (2 * (G))
#define MOE_HIER_Z1(G, E) (3 * (G))
#define MOE_HIER_PROB2(G, E) (3 * (G) + 1)
#define MOE_HIER_IMP2(G, E) (3 * (G) + 1 + (E))
#define MOE_HIER_Z2(G, E) (3 * (G) + 1 + 2 * (E))
#define MOE_HIER_NSUMS(G, E) (3 * (G) + 2 * (E) + 2)

/* Layout of the gradient coefficients (floats, from the host, hier_host.c):
 *   sw1 (G)  switch coefficient of p1_g      imp1 (G)  d importance loss / d Imp1_g
 *   sw2 (E)  switch coefficient of p2_e      imp2 (E)  d importance loss / d Imp2_e */
#define MOE_HIER_C_SW1(G, E) 0
#define MOE_HIER_C_IMP1(G, E) (G)
#define MOE_HIER_C_SW2(G, E) (2 * (G))
#define MOE_HIER_C_IMP2(G, E) (2 * (G) + (E))
#define MOE_HIER_NCOEFS(G, E) (2 * (G) + 2 * (E))

/* Gate weights of one level: h holds n scores, idx the K selected (local indices idx[j] - off,
 * best first). The gate orders of moe_gate_t, as moe_router_gates. */
static inline MOE_HD void moe_hier_gates(const float *h, int n, const int32_t *idx, int off,
                                         int K, int gate, int renormalize, float *g) {
    const int all = gate == MOE_ROUTER_TOPK_OF_SOFTMAX && !renormalize;
    float m = h[idx[0] - off];
    if (all)
        for (int e = 0; e < n; ++e) m = h[e] > m ? h[e] : m;
    float sel = 0.0f;
    for (int j = 0; j < K; ++j) {
        g[j] = expf(h[idx[j] - off] - m);
        sel += g[j];
    }
    float z = sel;
    if (all) {
        z = 0.0f;
        for (int e = 0; e < n; ++e) z += expf(h[e] - m);
    }
    const float inv = 1.0f / z;
    for (int j = 0; j < K; ++j) g[j] *= inv;
}

/* Backward of moe_hier_gates: dh[0..n) = d(sum_j dg_j g_j)/dh (overwritten). */
static inline MOE_HD void moe_hier_gates_bwd(const float *h, int n, const int32_t *idx, int off,
                                             int K, int gate, int renormalize, const float *g,
                                             const float *dg, float *dh) {
    for (int e = 0; e < n; ++e) dh[e] = 0.0f;
    float s = 0.0f;
    for (int j = 0; j < K; ++j) s += g[j] * dg[j];
    if (gate == MOE_ROUTER_SOFTMAX_OF_TOPK || renormalize) {
        /* a softmax over the K selected scores */
        for (int j = 0; j < K; ++j) dh[idx[j] - off] = g[j] * (dg[j] - s);
        return;
    }
    /* g_j = p_{idx_j}, p = softmax over all n: dh_e = p_e (dp_e - sum_i p_i dp_i) */
    float m = h[0], z = 0.0f;
    for (int e = 1; e < n; ++e) m = h[e] > m ? h[e] : m;
    for (int e = 0; e < n; ++e) z += expf(h[e] - m);
    const float inv = 1.0f / z;
    for (int e = 0; e < n; ++e) dh[e] = -expf(h[e] - m) * inv * s;
    for (int j = 0; j < K; ++j) dh[idx[j] - off] += g[j] * dg[j];
}

/* Forward of one token: the k1 best groups grp (ties to the lower group) with their primary
 * gates g1, then in each chosen group the k2 best experts (global ids into idx, group-major)
 * with their secondary gates g2; gate = g1 g2 per choice. val: scratch of max(k1, k2). */
static inline MOE_HD void moe_hier_fwd(const float *l1, const float *l2, int G, int Eg, int k1,
                                       int k2, int gate_mode, int renormalize, int32_t *grp,
                                       float *g1, int32_t *idx, float *g2, float *gate,
                                       float *val) {
    moe_router_topk(l1, G, k1, grp, val);
    moe_hier_gates(l1, G, grp, 0, k1, gate_mode, renormalize, g1);
    for (int j1 = 0; j1 < k1; ++j1) {
        const int g = grp[j1], off = g * Eg;
        int32_t *ix = idx + j1 * k2;
        moe_router_topk(l2 + off, Eg, k2, ix, val);
        for (int j2 = 0; j2 < k2; ++j2) ix[j2] += off;
        moe_hier_gates(l2 + off, Eg, ix, off, k2, gate_mode, renormalize, g2 + j1 * k2);
        for (int j2 = 0; j2 < k2; ++j2) gate[j1 * k2 + j2] = g1[j1] * g2[j1 * k2 + j2];
    }
}

/* The loss terms of one token after moe_hier_fwd: p1 (G) = softmax(l1), *lse1; for each chosen
 * group its softmax into p2 at the group's place (E; the other groups' entries are left as they
 * are) and lse2 (k1) its logsumexp. */
static inline MOE_HD void moe_hier_terms(const float *l1, const float *l2, int G, int Eg, int k1,
                                         const int32_t *grp, float *p1, float *lse1, float *p2,
                                         float *lse2) {
    *lse1 = moe_router_softmax(l1, G, p1);
    for (int j1 = 0; j1 < k1; ++j1) {
        const int off = grp[j1] * Eg;
        lse2[j1] = moe_router_softmax(l2 + off, Eg, p2 + off);
    }
}

/* Backward of one token. dgate (K) from the combine; c the coefficients (MOE_HIER_C_*),
 * z1_scale / z2_scale the z-loss factors, any_logit: a switch or z coefficient is nonzero.
 * Writes dl1 (G) and dl2 (E; zero outside the chosen groups). scr: k1 + K + max(G, Eg). */
static inline MOE_HD void moe_hier_bwd(const float *l1, const float *l2, int G, int Eg, int k1,
                                       int k2, int gate_mode, int renormalize,
                                       const int32_t *grp, const float *g1, const int32_t *idx,
                                       const float *g2, const float *dgate, const float *c,
                                       int E, float z1_scale, float z2_scale, int any_logit,
                                       float *dl1, float *dl2, float *scr) {
    const int K = k1 * k2;
    float *dg1 = scr, *dg2 = scr + k1, *p = scr + k1 + K;
    const float *sw1 = c + MOE_HIER_C_SW1(G, E), *imp1 = c + MOE_HIER_C_IMP1(G, E);
    const float *sw2 = c + MOE_HIER_C_SW2(G, E), *imp2 = c + MOE_HIER_C_IMP2(G, E);
    /* gate = g1 g2: the product rule, plus the importance terms of each level */
    for (int j1 = 0; j1 < k1; ++j1) {
        float s = 0.0f;
        for (int j2 = 0; j2 < k2; ++j2) {
            const int j = j1 * k2 + j2;
            s += dgate[j] * g2[j];
            dg2[j] = dgate[j] * g1[j1] + imp2[idx[j]];
        }
        dg1[j1] = s + imp1[grp[j1]];
    }
    moe_hier_gates_bwd(l1, G, grp, 0, k1, gate_mode, renormalize, g1, dg1, dl1);
    if (any_logit) {
        const float lse = moe_router_softmax(l1, G, p);
        float fp = 0.0f;
        for (int g = 0; g < G; ++g) fp += sw1[g] * p[g];
        const float zs = z1_scale * lse;
        for (int g = 0; g < G; ++g) dl1[g] += p[g] * (sw1[g] - fp) + zs * p[g];
    }
    for (int e = 0; e < E; ++e) dl2[e] = 0.0f;
    for (int j1 = 0; j1 < k1; ++j1) {
        const int off = grp[j1] * Eg;
        moe_hier_gates_bwd(l2 + off, Eg, idx + j1 * k2, off, k2, gate_mode, renormalize,
                           g2 + j1 * k2, dg2 + j1 * k2, dl2 + off);
        if (any_logit) {
            const float lse = moe_router_softmax(l2 + off, Eg, p);
            float fp = 0.0f;
            for (int e = 0; e < Eg; ++e) fp += sw2[off + e] * p[e];
            const float zs = z2_scale * lse;
            for (int e = 0; e < Eg; ++e) dl2[off + e] += p[e] * (sw2[off + e] - fp) + zs * p[e];
        }
    }
}

#endif
