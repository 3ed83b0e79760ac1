/* moe_trace.c - summarise a routing trace, or replay it: time the recorded routing on any
 * backend and any number of ranks (local communicator threads), and check that the replayed
 * routing is the recorded one.
 *
 *   moe_trace summary FILE
 *   moe_trace replay FILE [--ranks P] [--backend cpu|cuda] [--iters N] [--d-model D]
 *                         [--d-ff F] [--check]
 *   moe_trace plan FILE --ranks P [--redundant R] [--output PATH]
 */
#define _POSIX_C_SOURCE 200809L

#include <getopt.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include "core/clock.h"
#include "tool_util.h"

#include "moe/moe.h"
#include "moe/trace_format.h"
#include "trace_read.h"

typedef trace_record_t record_t;
typedef trace_file_t trace_t;

static int read_trace(const char *path, trace_t *t) {
    char err[512];
    if (trace_file_read(path, t, err, sizeof err) != 0) {
        fprintf(stderr, "moe_trace: %s: %s\n", path, err);
        return 1;
    }
    return 0;
}

static int summary(const trace_t *t) {
    const int64_t E = t->h.num_experts;
    printf("# routing trace: E %lld  K %lld  D %lld  F %lld  capacity factor %.2f  written by rank "
           "%d of %d, layer %u\n",
           (long long)E, (long long)t->h.top_k, (long long)t->h.d_model, (long long)t->h.d_ff,
           t->h.capacity_factor, t->h.rank, t->h.world, t->h.layer_id);
    printf("# %6s %9s %9s %9s %10s\n", "step", "tokens", "dropped", "imbalance", "max_expert");
    int64_t *tot = calloc((size_t)E, sizeof(int64_t));
    if (!tot) return 1;
    int64_t tokens = 0, assignments = 0, dropped = 0;
    double imb_sum = 0.0;
    for (int64_t i = 0; i < t->n; ++i) {
        const record_t *r = &t->rec[i];
        int64_t sum = 0, mx = 0, arg = 0, dr = 0;
        for (int64_t e = 0; e < E; ++e) {
            sum += r->counts[e];
            dr += r->dropped[e];
            tot[e] += r->counts[e];
            if (r->counts[e] > mx) mx = r->counts[e], arg = e;
        }
        double imb = sum ? (double)mx / ((double)sum / (double)E) : 0.0;
        imb_sum += imb;
        tokens += r->r.num_tokens;
        assignments += sum;
        dropped += dr;
        printf("  %6lld %9lld %9lld %9.3f %10lld\n", (long long)r->r.step,
               (long long)r->r.num_tokens, (long long)dr, imb, (long long)arg);
    }
    printf("# steps %lld, tokens %lld, dropped %.2f%% of assignments, mean imbalance %.3f\n",
           (long long)t->n, (long long)tokens,
           assignments ? 100.0 * (double)dropped / (double)assignments : 0.0,
           t->n ? imb_sum / (double)t->n : 0.0);
    printf("# assignments per expert over all steps:");
    for (int64_t e = 0; e < E; ++e) printf(" %lld", (long long)tot[e]);
    printf("\n");
    free(tot);
    return 0;
}

/* ---------------------------------------------------------------------------------------------
 * replay
 * ------------------------------------------------------------------------------------------- */

typedef struct {
    const trace_t *t;
    moe_layer_config_t cfg;
    moe_backend_t backend;
    moe_comm_t *comm;
    int rank, ranks, iters, check;
    double seconds;   /* timed forward + backward over all steps */
    int64_t mismatch; /* replayed routing entries that differ from the record */
    int status;
    char error[512];
} replay_arg_t;

#define RCHECK(call)                                                                          \
    do {                                                                                      \
        moe_status_t st_ = (call);                                                            \
        if (st_ != MOE_STATUS_SUCCESS) {                                                      \
            snprintf(a->error, sizeof a->error, "%s: %s", #call, moe_last_error());           \
            a->status = (int)st_;                                                             \
            goto done;                                                                        \
        }                                                                                     \
    } while (0)

static void *replay_rank(void *p) {
    replay_arg_t *a = (replay_arg_t *)p;
    const trace_t *t = a->t;
    const int64_t K = t->h.routing_width, D = a->cfg.d_model;
    moe_context_t *ctx = NULL;
    moe_layer_t *layer = NULL;
    float *x = NULL, *y = NULL, *gate = NULL;
    int32_t *idx = NULL, *kept = NULL;
    int64_t maxT = 0;
    for (int64_t i = 0; i < t->n; ++i)
        if (t->rec[i].r.num_tokens > maxT) maxT = t->rec[i].r.num_tokens;
    size_t nx = (size_t)(maxT * D + 1), nk = (size_t)(maxT * K + 1);
    x = malloc(nx * sizeof(float)), y = malloc(nx * sizeof(float));
    gate = malloc(nk * sizeof(float)), idx = malloc(nk * sizeof(int32_t));
    kept = malloc(nk * sizeof(int32_t));
    if (!x || !y || !gate || !idx || !kept) {
        snprintf(a->error, sizeof a->error, "out of host memory");
        a->status = MOE_STATUS_ALLOC_FAILED;
        goto done;
    }
    for (size_t i = 0; i < nx; ++i) x[i] = (float)((i * 2654435761u) % 2001) / 1000.0f - 1.0f;
    if (a->backend == MOE_BACKEND_CUDA) {
        snprintf(a->error, sizeof a->error,
                 "replay on CUDA: host buffers only in this tool version (use moe_bench)");
        a->status = MOE_STATUS_NOT_SUPPORTED;
        goto done;
    }
    RCHECK(moe_context_create(&ctx, a->backend, 0, a->comm));
    RCHECK(moe_layer_create(&layer, ctx, &a->cfg));
    if (trace_file_check_layer(t, layer, a->error, sizeof a->error) != 0) {
        a->status = MOE_STATUS_INVALID_ARGUMENT;
        goto done;
    }
    for (int it = 0; it < a->iters + 1; ++it) { /* iteration 0 warms up */
        for (int64_t i = 0; i < t->n; ++i) {
            const record_t *r = &t->rec[i];
            int64_t T = r->r.num_tokens;
            int64_t b = T * a->rank / a->ranks, Tr = T * (a->rank + 1) / a->ranks - b;
            RCHECK(moe_layer_force_routing(layer, r->idx + b * K, r->gate + b * K, Tr));
            double t0 = moe_now_s();
            RCHECK(moe_layer_forward(layer, x, y, Tr, 1, NULL));
            RCHECK(moe_layer_backward(layer, y, y, NULL));
            if (it > 0) a->seconds += moe_now_s() - t0;
            if (a->check && it == 0) {
                RCHECK(moe_layer_routing(layer, idx, gate, kept));
                int same_split = a->ranks == t->h.world;
                for (int64_t j = 0; j < Tr * K; ++j)
                    a->mismatch += idx[j] != r->idx[b * K + j] || gate[j] != r->gate[b * K + j] ||
                                   (same_split && kept[j] != (int32_t)r->kept[b * K + j]);
            }
        }
    }
done:
    moe_layer_destroy(layer);
    moe_context_destroy(ctx);
    free(x), free(y), free(gate), free(idx), free(kept);
    return NULL;
}

static int replay(const trace_t *t, int argc, char **argv) {
    int ranks = 1, iters = 3, check = 0;
    int64_t D = t->h.d_model, F = t->h.d_ff;
    moe_backend_t backend = MOE_BACKEND_CPU;
    static const struct option opts[] = {{"ranks", required_argument, 0, 'p'},
                                         {"backend", required_argument, 0, 'b'},
                                         {"iters", required_argument, 0, 'n'},
                                         {"d-model", required_argument, 0, 'd'},
                                         {"d-ff", required_argument, 0, 'f'},
                                         {"check", no_argument, 0, 'c'},
                                         {0, 0, 0, 0}};
    int o;
    optind = 1;
    while ((o = getopt_long(argc, argv, "", opts, NULL)) != -1) {
        switch (o) {
        case 'p': ranks = atoi(optarg); break;
        case 'b': backend = strcmp(optarg, "cuda") == 0 ? MOE_BACKEND_CUDA : MOE_BACKEND_CPU; break;
        case 'n': iters = atoi(optarg); break;
        case 'd': D = atoll(optarg); break;
        case 'f': F = atoll(optarg); break;
        case 'c': check = 1; break;
        default: return 2;
        }
    }
    if (ranks < 1 || iters < 1 || D < 1 || F < 1 || t->h.num_experts % ranks) {
        fprintf(stderr, "moe_trace replay: --ranks must divide E = %lld; sizes must be >= 1\n",
                (long long)t->h.num_experts);
        return 2;
    }
    moe_layer_config_t cfg = moe_layer_config_default();
    cfg.d_model = D;
    cfg.d_ff = F;
    cfg.num_experts = t->h.num_experts;
    cfg.top_k = t->h.top_k;
    cfg.router = (moe_router_type_t)t->h.router;
    cfg.activation = (moe_activation_t)t->h.activation;
    cfg.gate = (moe_gate_t)t->h.gate;
    cfg.priority = (moe_priority_t)t->h.priority;
    cfg.capacity_factor = t->h.capacity_factor;

    moe_comm_t **comms = calloc((size_t)ranks, sizeof *comms);
    replay_arg_t *args = calloc((size_t)ranks, sizeof *args);
    pthread_t *th = calloc((size_t)ranks, sizeof *th);
    if (!comms || !args || !th) return 1;
    if (ranks > 1 && moe_comm_create_local(comms, ranks) != MOE_STATUS_SUCCESS) {
        fprintf(stderr, "moe_trace: %s\n", moe_last_error());
        return 1;
    }
    for (int r = 0; r < ranks; ++r) {
        args[r] = (replay_arg_t){t, cfg, backend, ranks > 1 ? comms[r] : NULL, r, ranks, iters,
                                 check, 0.0, 0, 0, ""};
        pthread_create(&th[r], NULL, replay_rank, &args[r]);
    }
    int rc = 0;
    double worst = 0.0;
    int64_t mismatch = 0, tokens = 0;
    for (int r = 0; r < ranks; ++r) {
        pthread_join(th[r], NULL);
        if (args[r].status) {
            fprintf(stderr, "moe_trace: rank %d: %s\n", r, args[r].error);
            rc = 1;
        }
        worst = args[r].seconds > worst ? args[r].seconds : worst;
        mismatch += args[r].mismatch;
    }
    for (int r = 0; r < ranks && ranks > 1; ++r) moe_comm_destroy(comms[r]);
    for (int64_t i = 0; i < t->n; ++i) tokens += t->rec[i].r.num_tokens;
    if (!rc) {
        printf("# replay: %lld steps, %lld tokens, E %lld K %lld D %lld F %lld, %d rank%s, %s\n",
               (long long)t->n, (long long)tokens, (long long)cfg.num_experts,
               (long long)cfg.top_k, (long long)D, (long long)F, ranks, ranks > 1 ? "s" : "",
               backend == MOE_BACKEND_CUDA ? "cuda" : "cpu");
        printf("  forward+backward %.3f ms per step, %.0f tokens/s\n",
               1e3 * worst / ((double)iters * (double)t->n),
               (double)tokens * (double)iters / worst);
        if (check)
            printf("  check %s: %lld routing entries differ from the record\n",
                   mismatch ? "FAILED" : "OK", (long long)mismatch);
        if (check && mismatch) rc = 1;
    }
    free(comms), free(args), free(th);
    return rc;
}

/* ---------------------------------------------------------------------------------------------
 * plan: a placement from the trace's per-expert counts (moe_plan_placement)
 * ------------------------------------------------------------------------------------------- */

static int plan(const trace_t *t, int argc, char **argv) {
    int ranks = 0;
    long long redundant = 0;
    const char *output = NULL;
    static const struct option opts[] = {{"ranks", required_argument, 0, 'r'},
                                          {"redundant", required_argument, 0, 'R'},
                                          {"output", required_argument, 0, 'o'},
                                          {0, 0, 0, 0}};
    optind = 1;
    int c;
    while ((c = getopt_long(argc, argv, "", opts, NULL)) != -1) {
        switch (c) {
        case 'r': ranks = atoi(optarg); break;
        case 'R': redundant = atoll(optarg); break;
        case 'o': output = optarg; break;
        default: return 2;
        }
    }
    const int64_t E = t->h.num_experts;
    if (ranks < 1) {
        fprintf(stderr, "moe_trace plan: --ranks P (>= 1) is required\n");
        return 2;
    }
    double *load = calloc((size_t)E, sizeof(double));
    int64_t *num = calloc((size_t)ranks, sizeof(int64_t)), *cnum = calloc((size_t)ranks, 8);
    int32_t *ex = calloc((size_t)(E + (redundant > 0 ? redundant : 0)), sizeof(int32_t));
    int32_t *cex = calloc((size_t)E, sizeof(int32_t));
    int rc = 1;
    if (!load || !num || !cnum || !ex || !cex) goto done;
    for (int64_t i = 0; i < t->n; ++i)
        for (int64_t e = 0; e < E; ++e) load[e] += (double)t->rec[i].counts[e];
    double before = 0.0, after = 0.0;
    for (int q = 0; q < ranks; ++q) cnum[q] = (q + 1) * E / ranks - q * E / ranks;
    for (int64_t e = 0; e < E; ++e) cex[e] = (int32_t)e;
    if (moe_placement_imbalance(load, E, ranks, cnum, cex, &before) ||
        moe_plan_placement(load, E, ranks, redundant, num, ex, &after)) {
        fprintf(stderr, "moe_trace plan: %s\n", moe_last_error());
        goto done;
    }
    FILE *f = output ? fopen(output, "w") : stdout;
    if (!f) {
        fprintf(stderr, "moe_trace plan: cannot create %s\n", output);
        goto done;
    }
    fprintf(f,
            "# planned from %lld steps: E %lld, %d ranks, %lld redundant slots; rank load "
            "max/mean %.4f contiguous -> %.4f planned\n",
            (long long)t->n, (long long)E, ranks, redundant, before, after);
    rc = tool_placement_write(f, E, ranks, num, ex) ? 1 : 0;
    if (output) {
        if (fclose(f)) rc = 1;
        printf("rank load max/mean: contiguous %.4f, planned %.4f (%d ranks, %lld redundant); "
               "placement written to %s\n",
               before, after, ranks, redundant, output);
    }
done:
    free(load), free(num), free(cnum), free(ex), free(cex);
    return rc;
}

static void usage(void) {
    fprintf(stderr,
            "usage: moe_trace summary FILE\n"
            "       moe_trace replay FILE [--ranks P] [--backend cpu|cuda] [--iters N]\n"
            "                             [--d-model D] [--d-ff F] [--check]\n"
            "       moe_trace plan FILE --ranks P [--redundant R] [--output PATH]\n"
            "Record a trace with moe_layer_trace_open(); replay times the recorded routing on P\n"
            "ranks (threads of this process) and --check verifies the replayed routing; plan\n"
            "writes a placement (moe_layer_set_placement, moe_bench --placement FILE) that\n"
            "balances the trace's per-expert load over P ranks with R replicas.\n"
            "example: moe_trace replay run.trace --ranks 4 --check\n");
}

int main(int argc, char **argv) {
    if (argc < 3) {
        usage();
        return 2;
    }
    trace_t t;
    if (read_trace(argv[2], &t)) return 1;
    int rc;
    if (strcmp(argv[1], "summary") == 0)
        rc = summary(&t);
    else if (strcmp(argv[1], "replay") == 0)
        rc = replay(&t, argc - 2, argv + 2);
    else if (strcmp(argv[1], "plan") == 0)
        rc = plan(&t, argc - 2, argv + 2);
    else {
        usage();
        rc = 2;
    }
    trace_file_free(&t);
    return rc;
}
