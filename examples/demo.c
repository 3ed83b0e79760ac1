/* demo.c - one MoE layer, forward + backward on the CPU backend, and a report of what it did.
 * Under mpirun (built with MPI) every process is one rank of an expert-parallel layer: E/P
 * experts each, its own tokens, rows exchanged by all-to-all; rank 0 prints per-rank traffic
 * and phase times. */
#define _POSIX_C_SOURCE 199309L

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "core/clock.h"
#include "moe/moe.h"
#include "tool_util.h"

#ifdef MOE_DEMO_MPI
#include <mpi.h>
#endif

#define CHECK(call)                                                                   \
    do {                                                                              \
        moe_status_t st_ = (call);                                                    \
        if (st_ != MOE_STATUS_SUCCESS) {                                              \
            fprintf(stderr, "%s failed: %s\n  %s\n", #call, moe_status_string(st_),   \
                    moe_last_error());                                                \
            return 1;                                                                 \
        }                                                                             \
    } while (0)

int main(int argc, char **argv) {
    int64_t T = 2048;
    if (argc > 1) T = atoll(argv[1]);
    if (T < 1) {
        fprintf(stderr, "usage: %s [num_tokens per rank]\n", argv[0]);
        return 2;
    }
    int rank = 0, world = 1;
    moe_comm_t *comm = NULL;
#ifdef MOE_DEMO_MPI
    if (tool_under_mpi()) {
        MPI_Init(&argc, &argv);
        CHECK(moe_comm_create_mpi(&comm, NULL));
        rank = moe_comm_rank(comm);
        world = moe_comm_size(comm);
    }
#else
    if (tool_under_mpi())
        fprintf(stderr, "note: this demo was built without MPI: one rank each\n");
#endif
    moe_layer_config_t cfg = moe_layer_config_default();
    cfg.d_model = 256;
    cfg.d_ff = 1024;
    cfg.num_experts = 8;
    cfg.top_k = 2;
    cfg.noisy_gating = 1;
    cfg.capacity_factor = 1.25;
    cfg.switch_loss_coef = 1e-2;
    cfg.importance_loss_coef = 1e-2;
    cfg.load_loss_coef = 1e-2;
    cfg.z_loss_coef = 1e-3;

    if (cfg.num_experts % world) cfg.num_experts = world * ((cfg.num_experts + world - 1) / world);
    int major, minor, patch;
    moe_get_version(&major, &minor, &patch);
    if (rank == 0) {
        printf("libmoe %d.%d.%d demo: one MoE layer on the CPU backend, %d rank%s%s\n", major,
               minor, patch, world, world > 1 ? "s" : "",
               world > 1 ? " (expert parallel over MPI)" : "");
        printf("  shapes   T=%lld tokens%s  D=%lld  F=%lld  E=%lld  K=%lld  act=%s  f32\n",
               (long long)T, world > 1 ? " per rank" : "", (long long)cfg.d_model,
               (long long)cfg.d_ff, (long long)cfg.num_experts, (long long)cfg.top_k,
               tool_activation_names[cfg.activation]);
        printf("  routing  noisy top-k, softmax over the top-k, capacity factor %.2f (position "
               "priority)\n", cfg.capacity_factor);
    }

    moe_context_t *ctx = NULL;
    moe_layer_t *layer = NULL;
    CHECK(moe_context_create(&ctx, MOE_BACKEND_CPU, 0, comm));
    CHECK(moe_layer_create(&layer, ctx, &cfg));
    CHECK(moe_layer_set_profiling(layer, 1));

    size_t n = (size_t)(T * cfg.d_model);
    float *x = malloc(n * sizeof(float)), *y = malloc(n * sizeof(float));
    float *dy = malloc(n * sizeof(float)), *dx = malloc(n * sizeof(float));
    if (!x || !y || !dy || !dx) {
        fprintf(stderr, "out of host memory\n");
        return 1;
    }
    /* inputs: a fixed pseudo-random pattern (the library's own RNG is for its parameters) */
    uint32_t r = 12345u + 7919u * (uint32_t)rank;
    for (size_t i = 0; i < n; ++i) {
        r = r * 1664525u + 1013904223u;
        x[i] = ((float)(r >> 8) / 16777216.0f - 0.5f) * 2.0f;
        dy[i] = 1.0f / (float)cfg.d_model;
    }

    CHECK(moe_layer_forward(layer, x, y, T, 1, NULL)); /* warm-up: buffers and threads */
    CHECK(moe_layer_backward(layer, dy, dx, NULL));
    CHECK(moe_layer_zero_grad(layer, NULL));
    double t0 = moe_now_s();
    CHECK(moe_layer_forward(layer, x, y, T, 1, NULL));
    double t1 = moe_now_s();
    CHECK(moe_layer_backward(layer, dy, dx, NULL));
    double t2 = moe_now_s();

    moe_routing_stats_t st;
    int64_t *tpe = malloc((size_t)cfg.num_experts * sizeof(int64_t));
    int64_t *dpe = malloc((size_t)cfg.num_experts * sizeof(int64_t));
    CHECK(moe_layer_stats(layer, &st, tpe, dpe));

    double phase[MOE_PHASE_COUNT];
    CHECK(moe_layer_phase_times(layer, phase));
    double row[4 + MOE_PHASE_COUNT] = {(double)st.rows_sent, (double)st.rows_received, t1 - t0,
                                       t2 - t1};
    for (int p = 0; p < MOE_PHASE_COUNT; ++p) row[4 + p] = phase[p];
    double *all = NULL;
    if (rank == 0) all = malloc(sizeof row * (size_t)world);
#ifdef MOE_DEMO_MPI
    if (comm)
        MPI_Gather(row, 4 + MOE_PHASE_COUNT, MPI_DOUBLE, all, 4 + MOE_PHASE_COUNT, MPI_DOUBLE, 0,
                   MPI_COMM_WORLD);
    else
#endif
        if (all) memcpy(all, row, sizeof row);

    if (rank == 0) {
        double flops_fwd = 2.0 * 2.0 * (double)cfg.d_model * (double)cfg.d_ff *
                           (double)(st.num_assignments - st.num_dropped);
        printf("  time     forward %.2f ms (%.0f tokens/s, %.1f GFLOP/s in the experts), "
               "backward %.2f ms\n",
               1e3 * (t1 - t0), (double)st.num_tokens / (t1 - t0),
               1e-9 * flops_fwd / (t1 - t0), 1e3 * (t2 - t1));
        printf("  experts  tokens routed (dropped):");
        for (int64_t e = 0; e < cfg.num_experts; ++e)
            printf(" %lld(%lld)", (long long)tpe[e], (long long)dpe[e]);
        printf("\n  dropped  %lld of %lld assignments (%.1f%%), imbalance max/mean %.3f\n",
               (long long)st.num_dropped, (long long)st.num_assignments,
               100.0 * (double)st.num_dropped / (double)st.num_assignments, st.imbalance);
        printf("  losses   switch %.4f  importance %.4f  load %.4f  z %.4f  (aux total %.5f)\n",
               st.switch_loss, st.importance_loss, st.load_loss, st.z_loss, st.aux_loss);
        printf("  phases   (ms, profiled: the stream waits after each phase)\n  %4s %9s %9s",
               "rank", "rows_out", "rows_in");
        for (int p = 0; p < MOE_PHASE_COUNT; ++p) printf(" %*s", p < 7 ? 8 : 13,
                                                         moe_phase_name((moe_phase_t)p));
        printf("\n");
        for (int q = 0; q < world; ++q) {
            const double *v = all + (size_t)q * (4 + MOE_PHASE_COUNT);
            printf("  %4d %9.0f %9.0f", q, v[0], v[1]);
            for (int p = 0; p < MOE_PHASE_COUNT; ++p) printf(" %*.2f", p < 7 ? 8 : 13,
                                                             1e3 * v[4 + p]);
            printf("\n");
        }
    }
    free(all);

    double ysum = 0.0, dxsum = 0.0, gsum = 0.0;
    for (size_t i = 0; i < n; ++i) ysum += fabs(y[i]), dxsum += fabs(dx[i]);
    float *g1 = NULL;
    int64_t n1 = 0;
    CHECK(moe_layer_param(layer, MOE_PARAM_W1, NULL, (void **)&g1, &n1));
    for (int64_t i = 0; i < n1; ++i) gsum += fabs(g1[i]);
    if (rank == 0)
        printf("  outputs  rank 0: mean|y| %.5f  mean|dx| %.6f  mean|dW1| %.3e\n",
               ysum / (double)n, dxsum / (double)n, gsum / (double)n1);

    free(tpe), free(dpe), free(x), free(y), free(dy), free(dx);
    CHECK(moe_layer_destroy(layer));
    CHECK(moe_context_destroy(ctx));
    CHECK(moe_comm_destroy(comm));
#ifdef MOE_DEMO_MPI
    if (comm || tool_under_mpi()) MPI_Finalize();
#endif
    return 0;
}
