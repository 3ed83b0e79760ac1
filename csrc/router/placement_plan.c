/* placement_plan.c - the placement planner (moe_plan_placement): from per-expert loads, P ranks
 * and R redundant slots, a placement that keeps the largest rank load small.
 *
 * 1. replicas: R times, the expert with the largest load per replica w_e / m_e (fewer than P
 *    replicas, ties to the lower id) gets one more replica (as DeepSeek's EPLB);
 * 2. packing: the S = E + R replicas, each of load w_e / m_e, in decreasing load (ties by expert
 *    id), each to the least loaded rank (ties to the lower rank) that has a free slot (at most
 *    ceil(S / P) per rank) and does not hold that expert yet: longest-processing-time list
 *    scheduling (Graham 1969);
 * 3. refinement: while some swap of one replica of the most loaded rank with one replica of
 *    another rank lowers the larger of the two ranks' loads, make the best such swap (bounded
 *    number of rounds). Swaps keep every rank's slot count.
 * 4. this for replica counts r = 0 .. R (at most 33 of them), the plan with the lowest max load
 *    kept: it uses E + r <= E + R slots.
 * Everything is in a fixed order, so every rank computes the same plan from the same loads. */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "core/status.h"
#include "moe/moe.h"

typedef struct {
    int32_t e;
    double w;
} item_t;

static int by_load_desc(const void *a, const void *b) {
    const item_t *x = (const item_t *)a, *y = (const item_t *)b;
    if (x->w != y->w) return x->w > y->w ? -1 : 1;
    return x->e < y->e ? -1 : (x->e > y->e);
}

static int by_int32(const void *a, const void *b) {
    int32_t x = *(const int32_t *)a, y = *(const int32_t *)b;
    return x < y ? -1 : (x > y);
}

/* one plan with exactly `redundant` replicas; *imbalance its max over mean rank load */
static moe_status_t plan_once(const double *load, int64_t E, int P, int64_t redundant,
                              int64_t *num_local, int32_t *experts, double *imbalance) {
    const int64_t S = E + redundant;
    const int64_t cap = (S + P - 1) / P;
    int64_t *m = (int64_t *)calloc((size_t)E, sizeof(int64_t));
    item_t *it = (item_t *)malloc((size_t)S * sizeof(item_t));
    int32_t *rank_of = (int32_t *)malloc((size_t)S * sizeof(int32_t));
    double *rl = (double *)calloc((size_t)P, sizeof(double));
    int64_t *cnt = (int64_t *)calloc((size_t)P, sizeof(int64_t));
    unsigned char *holds = (unsigned char *)calloc((size_t)P * (size_t)E, 1);
    if (!m || !it || !rank_of || !rl || !cnt || !holds) {
        free(m), free(it), free(rank_of), free(rl), free(cnt), free(holds);
        return MOE_ERR(MOE_STATUS_ALLOC_FAILED, "placement planner for %lld slots", (long long)S);
    }
    /* 1. replicas */
    for (int64_t e = 0; e < E; ++e) m[e] = 1;
    for (int64_t r = 0; r < redundant; ++r) {
        int64_t best = -1;
        for (int64_t e = 0; e < E; ++e)
            if (m[e] < P && (best < 0 || load[e] * (double)m[best] > load[best] * (double)m[e]))
                best = e;
        m[best]++;
    }
    /* 2. longest first, to the least loaded rank that can take it */
    int64_t n = 0;
    for (int64_t e = 0; e < E; ++e)
        for (int64_t j = 0; j < m[e]; ++j) it[n++] = (item_t){(int32_t)e, load[e] / (double)m[e]};
    qsort(it, (size_t)S, sizeof(item_t), by_load_desc);
    for (int64_t i = 0; i < S; ++i) {
        int best = -1;
        for (int pass = 0; pass < 2 && best < 0; ++pass) /* pass 1: the slot cap gives way */
            for (int q = 0; q < P; ++q)
                if (!holds[(size_t)q * E + it[i].e] && (pass || cnt[q] < cap) &&
                    (best < 0 || rl[q] < rl[best]))
                    best = q;
        rank_of[i] = best;
        holds[(size_t)best * E + it[i].e] = 1;
        rl[best] += it[i].w;
        cnt[best]++;
    }
    /* 3. swaps that lower the most loaded rank */
    for (int round = 0; round < 64 * P; ++round) {
        int a = 0;
        for (int q = 1; q < P; ++q)
            if (rl[q] > rl[a]) a = q;
        double best_gain = 0.0;
        int64_t bi = -1, bj = -1;
        for (int64_t i = 0; i < S; ++i) {
            if (rank_of[i] != a) continue;
            for (int64_t j = 0; j < S; ++j) {
                int b = rank_of[j];
                if (b == a || it[j].w >= it[i].w) continue;
                if (holds[(size_t)b * E + it[i].e] || holds[(size_t)a * E + it[j].e]) continue;
                double d = it[i].w - it[j].w;
                double worse = fmax(rl[a] - d, rl[b] + d);
                double gain = rl[a] - worse;
                if (gain > best_gain * (1.0 + 1e-12) + 1e-12 * rl[a]) {
                    best_gain = gain;
                    bi = i, bj = j;
                }
            }
        }
        if (bi < 0) break;
        int b = rank_of[bj];
        double d = it[bi].w - it[bj].w;
        holds[(size_t)a * E + it[bi].e] = 0, holds[(size_t)b * E + it[bj].e] = 0;
        holds[(size_t)a * E + it[bj].e] = 1, holds[(size_t)b * E + it[bi].e] = 1;
        rank_of[bi] = b, rank_of[bj] = a;
        rl[a] -= d, rl[b] += d;
    }
    /* the placement, rank after rank, each rank's experts ascending */
    int64_t at = 0;
    double total = 0.0, mx = 0.0;
    for (int q = 0; q < P; ++q) {
        int64_t begin = at;
        for (int64_t i = 0; i < S; ++i)
            if (rank_of[i] == q) experts[at++] = it[i].e;
        num_local[q] = at - begin;
        qsort(experts + begin, (size_t)num_local[q], sizeof(int32_t), by_int32);
        total += rl[q];
        mx = fmax(mx, rl[q]);
    }
    *imbalance = total > 0.0 ? mx / (total / (double)P) : 1.0;
    free(m), free(it), free(rank_of), free(rl), free(cnt), free(holds);
    return MOE_STATUS_SUCCESS;
}

moe_status_t moe_plan_placement(const double *load, int64_t E, int P, int64_t redundant,
                                int64_t *num_local, int32_t *experts, double *imbalance) {
    MOE_ARG(load != NULL, "load is NULL");
    MOE_ARG(num_local != NULL, "num_local is NULL");
    MOE_ARG(experts != NULL, "experts is NULL");
    MOE_ARG(E >= 1 && E <= 65536, "num_experts %lld is not in [1, 65536]", (long long)E);
    MOE_ARG(P >= 1 && P <= 65536, "ranks %d is not in [1, 65536]", P);
    MOE_ARG(redundant >= 0 && redundant <= (int64_t)(P - 1) * E,
            "redundant %lld is not in [0, (ranks - 1) x num_experts = %lld]", (long long)redundant,
            (long long)(P - 1) * E);
    for (int64_t e = 0; e < E; ++e)
        MOE_ARG(isfinite(load[e]) && load[e] >= 0.0, "load[%lld] = %g is not finite and >= 0",
                (long long)e, load[e]);
    /* greedy replication is not monotone in the replica count (a replica can crowd the
     * packing): plan with r = 0 .. redundant replicas (at most 33 counts, evenly spaced, r =
     * redundant included) and keep the lowest max load, ties to fewer replicas */
    int64_t *num = (int64_t *)malloc((size_t)P * sizeof(int64_t));
    int32_t *ex = (int32_t *)malloc((size_t)(E + redundant) * sizeof(int32_t));
    if (!num || !ex) {
        free(num), free(ex);
        return MOE_ERR(MOE_STATUS_ALLOC_FAILED, "placement planner");
    }
    const int64_t trials = redundant < 32 ? redundant : 32;
    double best = INFINITY;
    moe_status_t st = MOE_STATUS_SUCCESS;
    for (int64_t i = 0; i <= trials && st == MOE_STATUS_SUCCESS; ++i) {
        int64_t r = trials ? redundant * i / trials : 0;
        double imb = 0.0;
        st = plan_once(load, E, P, r, num, ex, &imb);
        if (st == MOE_STATUS_SUCCESS && imb < best * (1.0 - 1e-12)) {
            best = imb;
            memcpy(num_local, num, (size_t)P * sizeof(int64_t));
            memcpy(experts, ex, (size_t)(E + r) * sizeof(int32_t));
        }
    }
    free(num), free(ex);
    if (st == MOE_STATUS_SUCCESS && imbalance) *imbalance = best;
    return st;
}
