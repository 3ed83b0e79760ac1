/* gate_hier.c - the CPU gate of hierarchical gating (the twin of kernels/gate_hier.cu): the
 * router GEMMs of both levels, the per-token two-level top-k and gates of router/hier.h with
 * the per-group and per-expert sums behind both levels' aux losses, and the backward. */
#define _POSIX_C_SOURCE 200112L

#include <stdlib.h>
#include <string.h>

#include "backend/backend.h"
#include "backend/cpu/cpu.h"
#include "core/status.h"
#include "router/hier.h"

/* logits1 = x Wp (T, G); logits[:, g block] = x Ws_g (T, Eg) for every group */
static void router_gemms(const moe_gate_hier_fwd_args_t *a) {
    const moe_backend_layer_t *l = a->layer;
    const int64_t T = a->T, D = l->D, E = l->E, G = a->G, Eg = E / G;
    const float *x = (const float *)a->x, *ws = (const float *)a->w_secondary;
    moe__cpu_sgemm(0, 0, T, G, D, x, D, (const float *)a->w_primary, G, 0.0f, a->logits1, G);
    for (int64_t g = 0; g < G; ++g)
        moe__cpu_sgemm(0, 0, T, Eg, D, x, D, ws + g * D * Eg, Eg, 0.0f, a->logits + g * Eg, E);
}

moe_status_t moe__cpu_gate_hier_fwd(moe_context_t *ctx, const moe_gate_hier_fwd_args_t *a,
                                    void *stream) {
    (void)ctx, (void)stream;
    const moe_backend_layer_t *l = a->layer;
    const int64_t T = a->T, E = l->E, K = l->K, K1 = l->K1;
    const int64_t G = a->G, k1 = a->k1, k2 = a->k2, Eg = E / G;
    const int gate_mode = (int)l->cfg.gate, renorm = l->cfg.renormalize;
    router_gemms(a);

    const int64_t nblk = (T + MOE_CPU_BLOCK - 1) / MOE_CPU_BLOCK;
    const int64_t stride = MOE_HIER_NSUMS(G, E);
    double *part = (double *)calloc((size_t)(nblk * stride), sizeof(double));
    int64_t *cnt = (int64_t *)calloc((size_t)(nblk * E), sizeof(int64_t));
    if (!part || !cnt) {
        free(part), free(cnt);
        return MOE_ERR(MOE_STATUS_ALLOC_FAILED, "gate scratch for %lld tokens", (long long)T);
    }
    const int64_t nval = k1 > k2 ? k1 : k2;
    int failed = 0;
#pragma omp parallel reduction(| : failed) MOE_PAR(T * E * 8)
    {
        /* per-thread rows: p1 (G), p2 (E), lse2 (k1), top-k values */
        float *scr = (float *)malloc((size_t)(G + E + k1 + nval) * sizeof(float));
        if (!scr) failed = 1;
#pragma omp for schedule(static)
        for (int64_t b = 0; b < nblk; ++b) {
            if (!scr) continue;
            float *p1 = scr, *p2 = scr + G, *lse2 = scr + G + E, *val = lse2 + k1;
            double *pp = part + b * stride;
            double *prob1 = pp + MOE_HIER_PROB1(G, E), *imp1 = pp + MOE_HIER_IMP1(G, E);
            double *n1 = pp + MOE_HIER_N1(G, E), *prob2 = pp + MOE_HIER_PROB2(G, E);
            double *imp2 = pp + MOE_HIER_IMP2(G, E);
            int64_t *pc = cnt + b * E;
            int64_t t1 = (b + 1) * MOE_CPU_BLOCK < T ? (b + 1) * MOE_CPU_BLOCK : T;
            for (int64_t t = b * MOE_CPU_BLOCK; t < t1; ++t) {
                const float *l1 = a->logits1 + t * G, *l2 = a->logits + t * E;
                int32_t *grp = a->grp + t * k1, *idx = a->idx + t * K1;
                float *g1 = a->g1 + t * k1, *g2 = a->g2 + t * K;
                moe_hier_fwd(l1, l2, (int)G, (int)Eg, (int)k1, (int)k2, gate_mode, renorm, grp,
                             g1, idx, g2, a->gate + t * K, val);
                if (K1 > K) idx[K] = -1;
                float lse1;
                moe_hier_terms(l1, l2, (int)G, (int)Eg, (int)k1, grp, p1, &lse1, p2, lse2);
                a->lse[t] = lse1;
                pp[MOE_HIER_Z1(G, E)] += (double)lse1 * (double)lse1;
                for (int64_t g = 0; g < G; ++g) prob1[g] += p1[g];
                for (int64_t j1 = 0; j1 < k1; ++j1) {
                    const int64_t off = (int64_t)grp[j1] * Eg;
                    imp1[grp[j1]] += g1[j1];
                    n1[grp[j1]] += 1.0;
                    for (int64_t e = 0; e < Eg; ++e) prob2[off + e] += p2[off + e];
                    pp[MOE_HIER_Z2(G, E)] += (double)lse2[j1] * (double)lse2[j1];
                }
                for (int64_t j = 0; j < K; ++j) {
                    imp2[idx[j]] += g2[j];
                    pc[idx[j]] += 1;
                }
            }
        }
        free(scr);
    }
    if (failed) {
        free(part), free(cnt);
        return MOE_ERR(MOE_STATUS_ALLOC_FAILED, "gate thread scratch");
    }
    memset(a->sums, 0, (size_t)stride * sizeof(double));
    memset(a->counts, 0, (size_t)E * sizeof(int64_t));
    for (int64_t b = 0; b < nblk; ++b) {
        for (int64_t i = 0; i < stride; ++i) a->sums[i] += part[b * stride + i];
        for (int64_t e = 0; e < E; ++e) a->counts[e] += cnt[b * E + e];
    }
    free(part), free(cnt);
    return MOE_STATUS_SUCCESS;
}

moe_status_t moe__cpu_gate_hier_bwd(moe_context_t *ctx, const moe_gate_hier_bwd_args_t *a,
                                    void *stream) {
    (void)ctx, (void)stream;
    const moe_backend_layer_t *l = a->layer;
    const int64_t T = a->T, D = l->D, E = l->E, K = l->K, K1 = l->K1;
    const int64_t G = a->G, k1 = a->k1, k2 = a->k2, Eg = E / G;
    const int gate_mode = (int)l->cfg.gate, renorm = l->cfg.renormalize;
    const moe_hier_coefs_t *c = a->coefs;
    const int64_t nscr = k1 + K + (G > Eg ? G : Eg);
    int failed = 0;
#pragma omp parallel reduction(| : failed) MOE_PAR(T * E * 8)
    {
        float *scr = (float *)malloc((size_t)nscr * sizeof(float));
        if (!scr) failed = 1;
#pragma omp for schedule(static)
        for (int64_t t = 0; t < T; ++t) {
            if (!scr) continue;
            moe_hier_bwd(a->logits1 + t * G, a->logits + t * E, (int)G, (int)Eg, (int)k1,
                         (int)k2, gate_mode, renorm, a->grp + t * k1, a->g1 + t * k1,
                         a->idx + t * K1, a->g2 + t * K, a->dgate + t * K, c->c, (int)E,
                         c->z1_scale, c->z2_scale, c->any_logit, a->dlogits1 + t * G,
                         a->dlogits + t * E, scr);
        }
        free(scr);
    }
    if (failed) return MOE_ERR(MOE_STATUS_ALLOC_FAILED, "gate backward thread scratch");
    const float *x = (const float *)a->x, *wp = (const float *)a->w_primary;
    const float *ws = (const float *)a->w_secondary;
    float *dx = (float *)a->dx, *dws = (float *)a->dw_secondary;
    moe__cpu_sgemm(1, 0, D, G, T, x, D, a->dlogits1, G, 1.0f, (float *)a->dw_primary, G);
    moe__cpu_sgemm(0, 1, T, D, G, a->dlogits1, G, wp, G, 1.0f, dx, D);
    for (int64_t g = 0; g < G; ++g) {
        const float *dl = a->dlogits + g * Eg;
        moe__cpu_sgemm(1, 0, D, Eg, T, x, D, dl, E, 1.0f, dws + g * D * Eg, Eg);
        moe__cpu_sgemm(0, 1, T, D, Eg, dl, E, ws + g * D * Eg, Eg, 1.0f, dx, D);
    }
    return MOE_STATUS_SUCCESS;
}
