/* soak.c - the soak driver of scripts/soak.sh: N forward + backward iterations (training, noisy
 * gating, capacity drops, the aux losses, an optimizer step every 10) with token counts that
 * change every iteration and include 0 and 1, on 1 rank or on P local ranks (threads). The whole
 * sequence runs twice on fresh layers: the two runs must give bitwise the same outputs (a hash of
 * every y, dx and final parameter per rank), and the resident memory must not grow after the
 * warm-up (the first tenth of the first run).
 *   moe_soak [--iters N] [--ranks P] [--max-growth-kib K]
 * Prints one line of figures; exit 0 when both hold, 1 otherwise. */
#define _POSIX_C_SOURCE 200809L

#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "moe/moe.h"

#define D 16
#define MAX_T 96

typedef struct {
    int rank, ranks, iters, run;
    moe_comm_t *comm;
    uint64_t hash;
    int failed;
    char error[512];
} rank_arg_t;

static long rss_kib(void) {
    long pages = 0, rss = 0;
    FILE *f = fopen("/proc/self/statm", "r");
    if (!f) return -1;
    if (fscanf(f, "%ld %ld", &pages, &rss) != 2) rss = -1;
    fclose(f);
    return rss < 0 ? -1 : rss * (sysconf(_SC_PAGESIZE) / 1024);
}

static uint64_t fnv(uint64_t h, const void *p, size_t n) {
    const unsigned char *b = (const unsigned char *)p;
    for (size_t i = 0; i < n; ++i) h = (h ^ b[i]) * 1099511628211ull;
    return h;
}

/* tokens of this rank at iteration i: 0 and 1 recur, the rest varies in [2, MAX_T) */
static int64_t tokens(int i, int rank) {
    int k = (i + 3 * rank) % 50;
    if (k == 0) return 0;
    if (k == 1) return 1;
    return 2 + (int64_t)(((unsigned)i * 7919u + (unsigned)rank * 104729u) % (MAX_T - 2));
}

static volatile long g_rss_warm = -1, g_rss_peak = -1;

#define CHECK(call)                                                                           \
    do {                                                                                      \
        moe_status_t st_ = (call);                                                            \
        if (st_ != MOE_STATUS_SUCCESS) {                                                      \
            snprintf(a->error, sizeof a->error, "%s: %s", #call, moe_last_error());           \
            a->failed = 1;                                                                    \
            goto done;                                                                        \
        }                                                                                     \
    } while (0)

static void *run_rank(void *p) {
    rank_arg_t *a = (rank_arg_t *)p;
    static float x[4][MAX_T * D], y[4][MAX_T * D], dx[4][MAX_T * D];
    float *xr = x[a->rank], *yr = y[a->rank], *dxr = dx[a->rank];
    moe_context_t *ctx = NULL;
    moe_layer_t *layer = NULL;
    moe_optimizer_t *opt = NULL;
    uint64_t h = 1469598103934665603ull;
    moe_layer_config_t c = moe_layer_config_default();
    c.d_model = D, c.d_ff = 24, c.num_experts = 8, c.top_k = 2;
    c.noisy_gating = 1, c.capacity_factor = 1.25, c.switch_loss_coef = 1e-2;
    c.z_loss_coef = 1e-3, c.seed = 77;
    moe_optimizer_config_t oc = moe_optimizer_config_default(MOE_OPTIMIZER_ADAMW);
    CHECK(moe_context_create(&ctx, MOE_BACKEND_CPU, 0, a->comm));
    CHECK(moe_layer_create(&layer, ctx, &c));
    CHECK(moe_optimizer_create(&opt, layer, &oc));
    for (int i = 0; i < a->iters; ++i) {
        int64_t T = tokens(i, a->rank);
        for (int64_t j = 0; j < T * D; ++j)
            xr[j] = (float)((uint32_t)((j + 1) * 2654435761u + (uint32_t)i * 40503u) % 2001) /
                        1000.0f - 1.0f;
        CHECK(moe_layer_forward(layer, T ? xr : NULL, T ? yr : NULL, T, 1, NULL));
        CHECK(moe_layer_backward(layer, T ? yr : NULL, T ? dxr : NULL, NULL));
        h = fnv(h, yr, (size_t)T * D * sizeof(float));
        h = fnv(h, dxr, (size_t)T * D * sizeof(float));
        if (i % 10 == 9) {
            CHECK(moe_optimizer_step(opt, NULL));
            CHECK(moe_layer_zero_grad(layer, NULL));
        }
        if (a->rank == 0 && a->run == 0) {
            long r = rss_kib();
            if (i == a->iters / 10) g_rss_warm = r;
            if (i > a->iters / 10 && r > g_rss_peak) g_rss_peak = r;
        }
    }
    for (int q = 0; q < MOE_PARAM_COUNT; ++q) {
        void *v = NULL;
        int64_t n = 0;
        CHECK(moe_layer_param(layer, (moe_param_t)q, &v, NULL, &n));
        if (v) h = fnv(h, v, (size_t)n * sizeof(float));
    }
done:
    a->hash = h;
    moe_optimizer_destroy(opt);
    moe_layer_destroy(layer);
    moe_context_destroy(ctx);
    return NULL;
}

static int run_all(int iters, int ranks, int run, uint64_t *hash) {
    moe_comm_t *comms[4] = {0};
    rank_arg_t args[4];
    pthread_t th[4];
    if (ranks > 1 && moe_comm_create_local(comms, ranks) != MOE_STATUS_SUCCESS) {
        fprintf(stderr, "moe_soak: %s\n", moe_last_error());
        return 1;
    }
    for (int r = 0; r < ranks; ++r) {
        memset(&args[r], 0, sizeof args[r]);
        args[r] = (rank_arg_t){.rank = r, .ranks = ranks, .iters = iters, .run = run,
                               .comm = comms[r]};
        pthread_create(&th[r], NULL, run_rank, &args[r]);
    }
    int rc = 0;
    for (int r = 0; r < ranks; ++r) {
        pthread_join(th[r], NULL);
        if (args[r].failed) {
            fprintf(stderr, "moe_soak: run %d rank %d: %s\n", run, r, args[r].error);
            rc = 1;
        }
        hash[r] = args[r].hash;
    }
    for (int r = 0; r < ranks && ranks > 1; ++r) moe_comm_destroy(comms[r]);
    return rc;
}

int main(int argc, char **argv) {
    int iters = 10000, ranks = 1;
    long max_growth = 1024;
    for (int i = 1; i + 1 < argc; i += 2) {
        if (!strcmp(argv[i], "--iters")) iters = atoi(argv[i + 1]);
        else if (!strcmp(argv[i], "--ranks")) ranks = atoi(argv[i + 1]);
        else if (!strcmp(argv[i], "--max-growth-kib")) max_growth = atol(argv[i + 1]);
        else {
            fprintf(stderr, "usage: moe_soak [--iters N] [--ranks 1..4] [--max-growth-kib K]\n");
            return 2;
        }
    }
    if (iters < 10 || ranks < 1 || ranks > 4) {
        fprintf(stderr, "moe_soak: --iters >= 10, --ranks in [1, 4]\n");
        return 2;
    }
    uint64_t h0[4] = {0}, h1[4] = {0};
    if (run_all(iters, ranks, 0, h0) || run_all(iters, ranks, 1, h1)) return 1;
    int same = memcmp(h0, h1, sizeof h0) == 0;
    long growth = g_rss_peak - g_rss_warm;
    int flat = g_rss_warm > 0 && growth <= max_growth;
    printf("soak: %d iterations x 2 runs, %d rank%s, tokens 0..%d per rank: rss after warm-up "
           "%ld KiB, peak later %ld KiB (growth %ld KiB, limit %ld): %s; outputs %s "
           "(hash %016llx)\n",
           iters, ranks, ranks > 1 ? "s" : "", MAX_T - 1, g_rss_warm, g_rss_peak, growth,
           max_growth, flat ? "flat" : "GROWS", same ? "bitwise repeatable" : "DIFFER",
           (unsigned long long)h0[0]);
    return flat && same ? 0 : 1;
}
