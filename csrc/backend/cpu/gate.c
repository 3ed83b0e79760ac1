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

moe_status_t moe__cpu_gate_fwd(moe_context_t *ctx, moe_layer_state_t *s, void *stream) {
    (void)ctx, (void)stream;
    const int64_t T = s->T, D = s->D, E = s->E, K = s->K, K1 = s->K1;
    const int noisy = s->noisy_now;
    const int gate_mode = (int)s->cfg.gate, renorm = s->cfg.renormalize;
    moe__cpu_sgemm(0, 0, T, E, D, s->x, D, (const float *)s->param[MOE_PARAM_ROUTER_WEIGHT], E, 0.0f,
          s->logits, E);
    if (noisy)
        moe__cpu_sgemm(0, 0, T, E, D, s->x, D, (const float *)s->param[MOE_PARAM_NOISE_WEIGHT], E, 0.0f,
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

/* ---------------------------------------------------------------------------------------------
 * gate backward: gates, aux losses and the noise network, then the router GEMMs
 * ------------------------------------------------------------------------------------------- */

moe_status_t moe__cpu_gate_bwd(moe_context_t *ctx, moe_layer_state_t *s, void *dx_,
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
    moe__cpu_sgemm(1, 0, D, E, T, s->x, D, s->dlogits, E, 1.0f, (float *)s->grad[MOE_PARAM_ROUTER_WEIGHT],
          E);
    moe__cpu_sgemm(0, 1, T, D, E, s->dlogits, E, (const float *)s->param[MOE_PARAM_ROUTER_WEIGHT], E, 1.0f,
          dx, D);
    if (noisy) {
        moe__cpu_sgemm(1, 0, D, E, T, s->x, D, s->dnoise, E, 1.0f,
              (float *)s->grad[MOE_PARAM_NOISE_WEIGHT], E);
        moe__cpu_sgemm(0, 1, T, D, E, s->dnoise, E, (const float *)s->param[MOE_PARAM_NOISE_WEIGHT], E,
              1.0f, dx, D);
    }
    return MOE_STATUS_SUCCESS;
}
