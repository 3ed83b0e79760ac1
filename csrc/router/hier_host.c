/* hier_host.c - both levels' aux losses of hierarchical gating and their gradient coefficients
 * (formulas: docs/semantics.md, "Hierarchical gating"). */
#include "router/hier_host.h"

#include <stdlib.h>
#include <string.h>

#include "core/status.h"
#include "router/hier.h"
#include "router/router_host.h"

moe_status_t moe_hier_finalize(const moe_layer_config_t *c, int64_t E, int64_t G, int64_t k1,
                               int64_t k2, const double *sums, const int64_t *counts,
                               int64_t T_total, moe_routing_stats_t *stats,
                               moe_hier_coefs_t *coefs) {
    const int64_t Eg = E / G, K = k1 * k2;
    memset(stats->level_switch_loss, 0, sizeof stats->level_switch_loss);
    memset(stats->level_importance_loss, 0, sizeof stats->level_importance_loss);
    memset(stats->level_load_loss, 0, sizeof stats->level_load_loss);
    memset(stats->level_z_loss, 0, sizeof stats->level_z_loss);
    memset(coefs->c, 0, (size_t)MOE_HIER_NCOEFS(G, E) * sizeof(float));
    coefs->z1_scale = coefs->z2_scale = 0.0f;
    coefs->any_logit = 0;
    if (T_total == 0) {
        stats->num_tokens = stats->num_assignments = 0;
        stats->switch_loss = stats->importance_loss = stats->load_loss = stats->z_loss = 0.0;
        stats->aux_loss = stats->imbalance = 0.0;
        return MOE_STATUS_SUCCESS;
    }
    const size_t n = (size_t)(E > G ? E : G);
    double *grad = (double *)malloc(n * sizeof(double));
    double *v = (double *)malloc(n * sizeof(double));
    if (!grad || !v) {
        free(grad), free(v);
        return MOE_ERR(MOE_STATUS_ALLOC_FAILED, "%zu doubles", 2 * n);
    }
    const double T = (double)T_total;
    const double *prob1 = sums + MOE_HIER_PROB1(G, E), *imp1 = sums + MOE_HIER_IMP1(G, E);
    const double *n1 = sums + MOE_HIER_N1(G, E), *prob2 = sums + MOE_HIER_PROB2(G, E);
    const double *imp2 = sums + MOE_HIER_IMP2(G, E);
    float *sw1 = coefs->c + MOE_HIER_C_SW1(G, E), *ci1 = coefs->c + MOE_HIER_C_IMP1(G, E);
    float *sw2 = coefs->c + MOE_HIER_C_SW2(G, E), *ci2 = coefs->c + MOE_HIER_C_IMP2(G, E);

    /* primary level: groups are the experts of a flat router with k1 choices */
    double s1 = 0.0;
    for (int64_t g = 0; g < G; ++g) {
        double f = n1[g] / (T * (double)k1);
        s1 += f * prob1[g] / T;
        sw1[g] = (float)(c->switch_loss_coef * (double)G / T * f);
    }
    stats->level_switch_loss[0] = (double)G * s1;
    stats->level_importance_loss[0] = moe_router_cv2(imp1, G, grad);
    for (int64_t g = 0; g < G; ++g) ci1[g] = (float)(c->importance_loss_coef * grad[g]);
    stats->level_load_loss[0] = moe_router_cv2(n1, G, NULL);
    stats->level_z_loss[0] = sums[MOE_HIER_Z1(G, E)] / T;

    /* secondary level: per group over its experts and the tokens that chose it, averaged
     * over the G groups (a group no token chose adds 0) */
    double s2 = 0.0, i2 = 0.0, l2 = 0.0;
    for (int64_t g = 0; g < G; ++g) {
        const int64_t o = g * Eg;
        const double ng = n1[g];
        if (ng > 0.0) {
            double sg = 0.0;
            for (int64_t e = 0; e < Eg; ++e) {
                double f = (double)counts[o + e] / (ng * (double)k2);
                sg += f * prob2[o + e] / ng;
                sw2[o + e] = (float)(c->switch_loss_coef * (double)Eg / (double)G * f / ng);
            }
            s2 += (double)Eg * sg;
        }
        i2 += moe_router_cv2(imp2 + o, Eg, grad);
        for (int64_t e = 0; e < Eg; ++e)
            ci2[o + e] = (float)(c->importance_loss_coef * grad[e] / (double)G);
        for (int64_t e = 0; e < Eg; ++e) v[e] = (double)counts[o + e];
        l2 += moe_router_cv2(v, Eg, NULL);
    }
    stats->level_switch_loss[1] = s2 / (double)G;
    stats->level_importance_loss[1] = i2 / (double)G;
    stats->level_load_loss[1] = l2 / (double)G;
    stats->level_z_loss[1] = sums[MOE_HIER_Z2(G, E)] / (T * (double)k1);
    free(grad), free(v);

    coefs->z1_scale = (float)(c->z_loss_coef * 2.0 / T);
    coefs->z2_scale = (float)(c->z_loss_coef * 2.0 / (T * (double)k1));
    coefs->any_logit = c->switch_loss_coef != 0.0 || c->z_loss_coef != 0.0;

    stats->switch_loss = stats->level_switch_loss[0] + stats->level_switch_loss[1];
    stats->importance_loss = stats->level_importance_loss[0] + stats->level_importance_loss[1];
    stats->load_loss = stats->level_load_loss[0] + stats->level_load_loss[1];
    stats->z_loss = stats->level_z_loss[0] + stats->level_z_loss[1];
    stats->num_tokens = T_total;
    stats->num_assignments = T_total * K;
    stats->aux_loss = c->switch_loss_coef * stats->switch_loss +
                      c->importance_loss_coef * stats->importance_loss +
                      c->load_loss_coef * stats->load_loss + c->z_loss_coef * stats->z_loss;
    double maxc = 0.0, sumc = 0.0;
    for (int64_t e = 0; e < E; ++e) {
        maxc = counts[e] > maxc ? (double)counts[e] : maxc;
        sumc += (double)counts[e];
    }
    stats->imbalance = sumc > 0.0 ? maxc / (sumc / (double)E) : 0.0;
    return MOE_STATUS_SUCCESS;
}
