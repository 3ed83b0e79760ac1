/* placement.c - moe_bench --placement auto|contiguous|FILE and --redundant R: the layer's
 * placement for a run, and the rank load a contiguous placement would have had under the same
 * routing (the table's rimb(c) column beside rimbal, the measured one). */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "bench.h"

static int status_rc(moe_status_t st, const char *what) {
    if (st == MOE_STATUS_SUCCESS) return BENCH_EXIT_OK;
    fprintf(stderr, "moe_bench: %s failed: %s\n  %s\n", what, moe_status_string(st),
            moe_last_error());
    return st == MOE_STATUS_NOT_SUPPORTED ? BENCH_EXIT_NOT_SUPPORTED : BENCH_EXIT_FAIL;
}

int bench_placement_from_file(const bench_opts_t *o, moe_layer_t *layer, int P) {
    tool_placement_t pl;
    if (tool_placement_read(o->placement, &pl)) return BENCH_EXIT_USAGE;
    int rc = BENCH_EXIT_OK;
    if (pl.ranks != P || pl.num_experts != o->cfg.num_experts) {
        fprintf(stderr, "moe_bench: %s places %lld experts on %d ranks; this run has %lld on %d\n",
                o->placement, (long long)pl.num_experts, pl.ranks,
                (long long)o->cfg.num_experts, P);
        rc = BENCH_EXIT_USAGE;
    } else {
        rc = status_rc(moe_layer_set_placement(layer, pl.num_local, pl.experts, NULL),
                       "moe_layer_set_placement");
    }
    tool_placement_free(&pl);
    return rc;
}

/* max/mean rank load of placement (num, ex) under the last forward's global counts */
static int imbalance_of(moe_layer_t *layer, int64_t E, int P, const int64_t *num,
                        const int32_t *ex, double *imb) {
    int64_t *tpe = malloc((size_t)E * sizeof(int64_t));
    double *load = malloc((size_t)E * sizeof(double));
    int rc = tpe && load ? BENCH_EXIT_OK : BENCH_EXIT_FAIL;
    if (rc == BENCH_EXIT_OK)
        rc = status_rc(moe_layer_stats(layer, NULL, tpe, NULL), "moe_layer_stats");
    if (rc == BENCH_EXIT_OK) {
        for (int64_t e = 0; e < E; ++e) load[e] = (double)tpe[e];
        rc = status_rc(moe_placement_imbalance(load, E, P, num, ex, imb),
                       "moe_placement_imbalance");
    }
    free(tpe), free(load);
    return rc;
}

int bench_contiguous_imbalance(moe_layer_t *layer, int64_t E, int P, double *imb) {
    int64_t *num = malloc((size_t)P * sizeof(int64_t));
    int32_t *ex = malloc((size_t)E * sizeof(int32_t));
    int rc = num && ex ? BENCH_EXIT_OK : BENCH_EXIT_FAIL;
    if (rc == BENCH_EXIT_OK) {
        for (int q = 0; q < P; ++q) num[q] = (q + 1) * E / P - q * E / P;
        for (int64_t e = 0; e < E; ++e) ex[e] = (int32_t)e;
        rc = imbalance_of(layer, E, P, num, ex, imb);
    }
    free(num), free(ex);
    return rc;
}

int bench_placement_auto(const bench_opts_t *o, moe_layer_t *layer, int P, int print) {
    const int64_t E = o->cfg.num_experts;
    int64_t *tpe = malloc((size_t)E * sizeof(int64_t)), *num = malloc((size_t)P * 8);
    double *load = malloc((size_t)E * sizeof(double));
    int32_t *ex = malloc((size_t)(E + o->redundant) * sizeof(int32_t));
    int rc = tpe && num && load && ex ? BENCH_EXIT_OK : BENCH_EXIT_FAIL;
    double planned = 0.0, before = 0.0;
    if (rc == BENCH_EXIT_OK)
        rc = status_rc(moe_layer_stats(layer, NULL, tpe, NULL), "moe_layer_stats");
    if (rc == BENCH_EXIT_OK) {
        for (int64_t e = 0; e < E; ++e) load[e] = (double)tpe[e];
        rc = status_rc(moe_plan_placement(load, E, P, o->redundant, num, ex, &planned),
                       "moe_plan_placement");
    }
    if (rc == BENCH_EXIT_OK) rc = bench_contiguous_imbalance(layer, E, P, &before);
    if (rc == BENCH_EXIT_OK)
        rc = status_rc(moe_layer_set_placement(layer, num, ex, NULL), "moe_layer_set_placement");
    if (rc == BENCH_EXIT_OK && print) {
        int64_t S = 0;
        for (int q = 0; q < P; ++q) S += num[q];
        printf("# placement auto (%lld slots, %lld redundant allowed), planned from one forward: "
               "rank load max/mean %.3f contiguous -> %.3f planned\n",
               (long long)S, (long long)o->redundant, before, planned);
    }
    free(tpe), free(num), free(load), free(ex);
    return rc;
}
