/* router_host.c - capacity, slot assignment and aux-loss finalisation (see router_host.h). */
#include "router/router_host.h"

#include "core/philox.h"
#include "core/status.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

int64_t moe_router_capacity(double capacity_factor, int64_t T, int64_t K, int64_t E) {
    if (!(capacity_factor > 0.0)) return -1;
    /* no expert can receive more than all T * K assignments, so a larger capacity is the same
     * limit; clamping before the conversion keeps a huge factor defined (T * K < 2^31) */
    double c = ceil(capacity_factor * (double)T * (double)K / (double)E);
    return c < (double)(T * K) ? (int64_t)c : T * K;
}

double moe_router_cv2(const double *v, int64_t n, double *grad) {
    double mean = 0.0;
    for (int64_t i = 0; i < n; ++i) mean += v[i];
    mean /= (double)n;
    double var = 0.0;
    for (int64_t i = 0; i < n; ++i) var += (v[i] - mean) * (v[i] - mean);
    var /= (double)n;
    double den = mean * mean + 1e-10;
    if (grad) {
        /* d var / dv_i = 2 (v_i - mean) / n;  d den / dv_i = 2 mean / n */
        for (int64_t i = 0; i < n; ++i)
            grad[i] = 2.0 * (v[i] - mean) / ((double)n * den) -
                      var * 2.0 * mean / ((double)n * den * den);
    }
    return var / den;
}

moe_status_t moe_router_finalize(const moe_layer_config_t *c, int64_t E, int64_t K, int noisy,
                                 const moe_router_sums_t *sums, int64_t T_total,
                                 moe_routing_stats_t *stats, moe_aux_coefs_t *coefs) {
    if (T_total == 0) {
        /* no token anywhere: every loss and coefficient is 0 */
        memset(stats, 0, sizeof *stats);
        memset(coefs->switch_f, 0, (size_t)E * sizeof(float));
        memset(coefs->imp, 0, (size_t)E * sizeof(float));
        memset(coefs->load, 0, (size_t)E * sizeof(float));
        coefs->z_scale = 0.0f;
        coefs->any_logit = 0;
        return MOE_STATUS_SUCCESS;
    }
    const double T = (double)T_total;
    double *grad = (double *)malloc((size_t)E * sizeof(double));
    if (!grad) return MOE_ERR(MOE_STATUS_ALLOC_FAILED, "%lld doubles", (long long)E);
    double sw = 0.0, maxc = 0.0, sumc = 0.0;
    for (int64_t e = 0; e < E; ++e) {
        double f = (double)sums->counts[e] / (T * (double)K);
        double P = sums->prob_sum[e] / T;
        sw += f * P;
        coefs->switch_f[e] = (float)(c->switch_loss_coef * (double)E / T * f);
        maxc = fmax(maxc, (double)sums->counts[e]);
        sumc += (double)sums->counts[e];
    }
    stats->switch_loss = (double)E * sw;

    stats->importance_loss = moe_router_cv2(sums->importance, E, grad);
    for (int64_t e = 0; e < E; ++e) coefs->imp[e] = (float)(c->importance_loss_coef * grad[e]);
    stats->load_loss = moe_router_cv2(sums->load, E, grad);
    for (int64_t e = 0; e < E; ++e)
        coefs->load[e] = noisy ? (float)(c->load_loss_coef * grad[e]) : 0.0f;
    free(grad);

    stats->z_loss = *sums->z_sum / T;
    coefs->z_scale = (float)(c->z_loss_coef * 2.0 / T);
    coefs->any_logit = c->switch_loss_coef != 0.0 || c->z_loss_coef != 0.0;

    stats->num_tokens = T_total;
    stats->num_assignments = T_total * K;
    stats->aux_loss = c->switch_loss_coef * stats->switch_loss +
                      c->importance_loss_coef * stats->importance_loss +
                      c->load_loss_coef * stats->load_loss + c->z_loss_coef * stats->z_loss;
    stats->imbalance = sumc > 0.0 ? maxc / (sumc / (double)E) : 0.0;
    return MOE_STATUS_SUCCESS;
}

/* SCORE order: gate weight descending, ties by position (j * T + t) ascending */
typedef struct {
    const float *gate;
    int64_t T, K;
} moe__score_ctx;

static _Thread_local moe__score_ctx moe__sc;

static int moe__cmp_score(const void *a, const void *b) {
    int64_t pa = *(const int64_t *)a, pb = *(const int64_t *)b;
    /* position p = j * T + t  ->  gate[t * K + j] */
    float ga = moe__sc.gate[(pa % moe__sc.T) * moe__sc.K + pa / moe__sc.T];
    float gb = moe__sc.gate[(pb % moe__sc.T) * moe__sc.K + pb / moe__sc.T];
    if (ga > gb) return -1;
    if (ga < gb) return 1;
    return pa < pb ? -1 : (pa > pb ? 1 : 0);
}

int64_t moe_router_assign_slots(const int32_t *idx, int64_t ldi, const float *gate, int64_t T,
                                int64_t K, int64_t E, int64_t capacity, int priority,
                                int32_t *row, int64_t *offsets, int64_t *dropped,
                                int64_t *order) {
    int64_t n = T * K;
    /* slots: offsets[e + 1] counts claims on e while walking the priority order */
    memset(offsets, 0, (size_t)(E + 1) * sizeof(int64_t));
    if (priority == MOE_PRIORITY_SCORE && capacity >= 0) {
        for (int64_t p = 0; p < n; ++p) order[p] = p;
        moe__sc.gate = gate;
        moe__sc.T = T;
        moe__sc.K = K;
        qsort(order, (size_t)n, sizeof(int64_t), moe__cmp_score);
    }
    for (int64_t q = 0; q < n; ++q) {
        int64_t p = (priority == MOE_PRIORITY_SCORE && capacity >= 0) ? order[q] : q;
        int64_t t = p % T, j = p / T;
        int32_t e = idx[t * ldi + j];
        row[t * K + j] = (int32_t)offsets[e + 1]++;
    }
    for (int64_t e = 0; e < E; ++e) {
        int64_t claimed = offsets[e + 1];
        int64_t kept = capacity >= 0 && claimed > capacity ? capacity : claimed;
        dropped[e] = claimed - kept;
        offsets[e + 1] = offsets[e] + kept;
    }
    for (int64_t t = 0; t < T; ++t)
        for (int64_t j = 0; j < K; ++j) {
            int32_t e = idx[t * ldi + j];
            int32_t slot = row[t * K + j];
            row[t * K + j] =
                (capacity >= 0 && slot >= capacity) ? -1 : (int32_t)(offsets[e] + slot);
        }
    return offsets[E];
}

/* ---------------------------------------------------------------------------------------------
 * routing extensions: per-token options, expert availability
 * ------------------------------------------------------------------------------------------- */

moe_router_opts_t moe_router_opts_make(const moe_layer_config_t *c, const uint8_t *avail) {
    moe_router_opts_t o;
    o.sigmoid = c->score_func == MOE_SCORE_SIGMOID;
    o.gate_mode = (int)c->gate;
    o.renormalize = c->renormalize;
    /* group-limited selection is token choice's (other routers use the groups their own way) */
    o.num_groups = c->router == MOE_ROUTER_TOKEN_CHOICE && c->num_groups > 1 ? (int)c->num_groups
                                                                             : 0;
    o.topk_group = o.num_groups ? (int)c->topk_group : 0;
    o.group_max = c->group_score == MOE_GROUP_SCORE_MAX;
    o.scale = (float)c->routed_scaling_factor;
    o.avail = avail;
    o.active = o.sigmoid || o.num_groups > 1 || avail != NULL || o.scale != 1.0f;
    return o;
}

#define MOE_PHILOX_TAG_DROP 0x44524F50u /* "DROP" */

static double drop_uniform(uint64_t seed, uint64_t call, int64_t e) {
    moe_philox_out_t r = moe_philox4x32((uint32_t)e, (uint32_t)((uint64_t)e >> 32), (uint32_t)call,
                                        MOE_PHILOX_TAG_DROP ^ (uint32_t)(call >> 32), seed);
    return moe_u01(r.v[0]);
}

int64_t moe_router_availability(const uint8_t *mask, int64_t E, int64_t K, double dropout,
                                uint64_t seed, uint64_t call, uint8_t *avail) {
    int64_t n = 0;
    for (int64_t e = 0; e < E; ++e) {
        avail[e] = mask[e] && !(dropout > 0.0 && drop_uniform(seed, call, e) < dropout);
        n += avail[e];
    }
    while (n < K) {
        /* bring back the dropped expert of the mask with the largest u (lower index on ties) */
        int64_t best = -1;
        double bu = -1.0;
        for (int64_t e = 0; e < E; ++e) {
            if (!mask[e] || avail[e]) continue;
            double u = drop_uniform(seed, call, e);
            if (u > bu) bu = u, best = e;
        }
        if (best < 0) break; /* the mask itself has fewer than K: refused by the layer */
        avail[best] = 1;
        ++n;
    }
    return n;
}
