/* gate.c - the CPU gate (the twin of kernels/gate.cu): the NaN/Inf count of an input, the gate
 * pass (logits, noise, top-k, gates and the per-expert sums behind the aux losses) and its
 * backward (gates, aux losses, the noise network, then the router GEMMs). Per-token bodies are
 * the router/ and core/ headers the CUDA kernels include too. */
#define _POSIX_C_SOURCE 200112L

#include <math.h>
#include <stdlib.h>

#include "backend/backend.h"
#include "backend/cpu/cpu.h"
#include "core/activation.h"
#include "core/philox.h"
#include "core/status.h"
#include "router/router.h"
#include "router/router_host.h"
#include "router/select.h"

moe_status_t moe__cpu_count_nonfinite(moe_context_t *ctx, const void *x, int64_t n,
                                        int64_t *num_bad, void *stream) {
    (void)ctx, (void)stream;
    const float *v = (const float *)x;
    int64_t bad = 0;
#pragma omp parallel for reduction(+ : bad) schedule(static) MOE_PAR(n)
    for (int64_t i = 0; i < n; ++i) bad += !isfinite(v[i]);
    *num_bad = bad;
    return MOE_STATUS_SUCCESS;
}


/* ---------------------------------------------------------------------------------------------
 * gate: logits, noise, top-k, gates and the per-expert sums behind the aux losses
 * ------------------------------------------------------------------------------------------- */

moe_status_t moe__cpu_gate_fwd(moe_context_t *ctx, const moe_gate_fwd_args_t *a, void *stream) {
    (void)ctx, (void)stream;
    const moe_backend_layer_t *l = a->layer;
    const int64_t T = a->T, D = l->D, E = l->E, K = l->K, K1 = l->K1;
    const int noisy = a->noisy;
    const int gate_mode = (int)l->cfg.gate, renorm = l->cfg.renormalize;
    const float *x = (const float *)a->x;
    const moe_router_sums_t *sums = &a->sums;
    const moe_router_opts_t o = moe_router_opts_make(&l->cfg, a->avail);
    const int64_t G = o.num_groups;
    moe__cpu_sgemm(0, 0, T, E, D, x, D, (const float *)a->w_router, E, 0.0f, a->logits, E);
    if (noisy)
        moe__cpu_sgemm(0, 0, T, E, D, x, D, (const float *)a->w_noise, E, 0.0f, a->noise_raw, E);

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
        /* per-thread rows: p, sigma, phi (E each), top-k values (K1), group scores and kept
         * flags (G each) */
        float *scr = (float *)malloc((size_t)(3 * E + K1 + 2 * G) * sizeof(float));
        if (!scr) failed = 1;
#pragma omp for schedule(static)
        for (int64_t b = 0; b < nblk; ++b) {
            if (!scr) continue;
            float *p = scr, *sigma = scr + E, *phi = scr + 2 * E, *val = scr + 3 * E;
            double *pp = part + b * stride, *pi = pp + E, *pl = pp + 2 * E, *pz = pp + 3 * E;
            int64_t *pc = cnt + b * E;
            int64_t t1 = (b + 1) * MOE_CPU_BLOCK < T ? (b + 1) * MOE_CPU_BLOCK : T;
            for (int64_t t = b * MOE_CPU_BLOCK; t < t1; ++t) {
                const float *lg = a->logits + t * E;
                const float *h = lg;
                if (noisy) {
                    float *hr = a->h + t * E, *er = a->eps + t * E;
                    const float *raw = a->noise_raw + t * E;
                    for (int64_t e = 0; e < E; ++e) {
                        sigma[e] = moe_softplus(raw[e]);
                        er[e] = moe_gating_noise(l->cfg.seed, a->call, (uint32_t)l->rank, t, e);
                        hr[e] = lg[e] + er[e] * sigma[e];
                    }
                    h = hr;
                }
                int32_t *idx = a->idx + t * K1;
                float *g = a->gate + t * K;
                float lse;
                if (o.active) {
                    /* routing extensions (no noise here: the layer refuses the combination) */
                    float *gsc = val + K1, *keep = gsc + G;
                    lse = moe_router_aux_probs(lg, (int)E, &o, p);
                    if (G > 1) moe_router_groups(h, a->score_bias, &o, (int)E, (int)K, gsc, keep);
                    moe_router_topk_opts(h, a->score_bias, &o, G > 1 ? keep : NULL, (int)E,
                                         (int)K1, idx, val);
                    moe_router_gates_opts(h, (int)E, idx, (int)K, &o, g);
                } else {
                    lse = moe_router_softmax(lg, (int)E, p);
                    moe_router_topk_biased(h, a->score_bias, (int)E, (int)K1, idx, val);
                    moe_router_gates(h, (int)E, idx, (int)K, gate_mode, renorm, g);
                }
                a->lse[t] = lse;
                *pz += (double)lse * (double)lse;
                for (int64_t e = 0; e < E; ++e) pp[e] += p[e];
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
        sums->counts[e] = 0;
        sums->prob_sum[e] = sums->importance[e] = sums->load[e] = 0.0;
    }
    *sums->z_sum = 0.0;
    for (int64_t b = 0; b < nblk; ++b) {
        const double *pp = part + b * stride;
        for (int64_t e = 0; e < E; ++e) {
            sums->prob_sum[e] += pp[e];
            sums->importance[e] += pp[E + e];
            sums->load[e] += pp[2 * E + e];
            sums->counts[e] += cnt[b * E + e];
        }
        *sums->z_sum += pp[3 * E];
    }
    if (!noisy)
        for (int64_t e = 0; e < E; ++e) sums->load[e] = (double)sums->counts[e];
    free(part), free(cnt);
    return MOE_STATUS_SUCCESS;
}

/* ---------------------------------------------------------------------------------------------
 * gate backward: gates, aux losses and the noise network, then the router GEMMs
 * ------------------------------------------------------------------------------------------- */

moe_status_t moe__cpu_gate_bwd(moe_context_t *ctx, const moe_gate_bwd_args_t *a, void *stream) {
    (void)ctx, (void)stream;
    const moe_backend_layer_t *l = a->layer;
    const int64_t T = a->T, D = l->D, E = l->E, K = l->K, K1 = l->K1;
    const int noisy = a->noisy;
    const int gate_mode = (int)l->cfg.gate, renorm = l->cfg.renormalize;
    const moe_aux_coefs_t *c = a->coefs;
    const moe_router_opts_t o = moe_router_opts_make(&l->cfg, a->avail);
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
            const float *lg = a->logits + t * E;
            const float *h = noisy ? a->h + t * E : lg;
            const int32_t *idx = a->idx + t * K1;
            for (int64_t j = 0; j < K; ++j) dg[j] = a->dgate[t * K + j] + c->imp[idx[j]];
            float *dl = a->dlogits + t * E;
            if (o.active) {
                /* routing extensions: no noise (refused by the layer); sigma is scratch */
                moe_router_gates_opts_bwd(h, (int)E, idx, (int)K, &o, a->gate + t * K, dg, dh);
                for (int64_t e = 0; e < E; ++e) dl[e] = dh[e];
                if (c->any_logit)
                    moe_router_aux_bwd(lg, (int)E, &o, c->switch_f, c->z_scale, a->lse[t], p,
                                       sigma, dl);
                continue;
            }
            moe_router_gates_bwd(h, (int)E, idx, (int)K, gate_mode, renorm, a->gate + t * K, dg,
                                 dh);
            /* dh is the gradient of the scores h; h = logits (+ eps sigma) */
            for (int64_t e = 0; e < E; ++e) dl[e] = dh[e];
            if (c->any_logit) {
                moe_router_softmax(lg, (int)E, p);
                float fp = 0.0f;
                for (int64_t e = 0; e < E; ++e) fp += c->switch_f[e] * p[e];
                float zs = c->z_scale * a->lse[t];
                for (int64_t e = 0; e < E; ++e) dl[e] += p[e] * (c->switch_f[e] - fp) + zs * p[e];
            }
            if (noisy) {
                const float *raw = a->noise_raw + t * E, *eps = a->eps + t * E;
                for (int64_t e = 0; e < E; ++e) {
                    sigma[e] = moe_softplus(raw[e]);
                    dsig[e] = dh[e] * eps[e];
                }
                moe_router_load_bwd(lg, h, sigma, eps, idx, (int)K, (int)E, c->load, dl, dsig);
                float *dn = a->dnoise + t * E;
                for (int64_t e = 0; e < E; ++e) dn[e] = dsig[e] * moe_sigmoid(raw[e]);
            }
        }
        free(scr);
    }
    if (failed) return MOE_ERR(MOE_STATUS_ALLOC_FAILED, "gate backward thread scratch");
    const float *x = (const float *)a->x;
    float *dx = (float *)a->dx;
    moe__cpu_sgemm(1, 0, D, E, T, x, D, a->dlogits, E, 1.0f, (float *)a->dw_router, E);
    moe__cpu_sgemm(0, 1, T, D, E, a->dlogits, E, (const float *)a->w_router, E, 1.0f, dx, D);
    if (noisy) {
        moe__cpu_sgemm(1, 0, D, E, T, x, D, a->dnoise, E, 1.0f, (float *)a->dw_noise, E);
        moe__cpu_sgemm(0, 1, T, D, E, a->dnoise, E, (const float *)a->w_noise, E, 1.0f, dx, D);
    }
    return MOE_STATUS_SUCCESS;
}
