/* demo.c - one MoE layer, forward + backward on the CPU backend, and a report of what it did. */
#define _POSIX_C_SOURCE 199309L

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "moe/moe.h"

#define CHECK(call)                                                                   \
    do {                                                                              \
        moe_status_t st_ = (call);                                                    \
        if (st_ != MOE_STATUS_SUCCESS) {                                              \
            fprintf(stderr, "%s failed: %s\n  %s\n", #call, moe_status_string(st_),   \
                    moe_last_error());                                                \
            return 1;                                                                 \
        }                                                                             \
    } while (0)

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

static const char *act_name[] = {"relu", "gelu", "silu", "swiglu"};

int main(int argc, char **argv) {
    int64_t T = 2048;
    if (argc > 1) T = atoll(argv[1]);
    if (T < 1) {
        fprintf(stderr, "usage: %s [num_tokens]\n", argv[0]);
        return 2;
    }
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

    int major, minor, patch;
    moe_get_version(&major, &minor, &patch);
    printf("libmoe %d.%d.%d demo: one MoE layer on the CPU backend\n", major, minor, patch);
    printf("  shapes   T=%lld tokens  D=%lld  F=%lld  E=%lld  K=%lld  act=%s  f32\n",
           (long long)T, (long long)cfg.d_model, (long long)cfg.d_ff,
           (long long)cfg.num_experts, (long long)cfg.top_k, act_name[cfg.activation]);
    printf("  routing  noisy top-k, softmax over the top-k, capacity factor %.2f (position "
           "priority)\n", cfg.capacity_factor);

    moe_context_t *ctx = NULL;
    moe_layer_t *layer = NULL;
    CHECK(moe_context_create(&ctx, MOE_BACKEND_CPU, 0, NULL));
    CHECK(moe_layer_create(&layer, ctx, &cfg));

    size_t n = (size_t)(T * cfg.d_model);
    float *x = malloc(n * sizeof(float)), *y = malloc(n * sizeof(float));
    float *dy = malloc(n * sizeof(float)), *dx = malloc(n * sizeof(float));
    if (!x || !y || !dy || !dx) {
        fprintf(stderr, "out of host memory\n");
        return 1;
    }
    /* inputs: a fixed pseudo-random pattern (the library's own RNG is for its parameters) */
    uint32_t r = 12345u;
    for (size_t i = 0; i < n; ++i) {
        r = r * 1664525u + 1013904223u;
        x[i] = ((float)(r >> 8) / 16777216.0f - 0.5f) * 2.0f;
        dy[i] = 1.0f / (float)cfg.d_model;
    }

    CHECK(moe_layer_forward(layer, x, y, T, 1, NULL)); /* warm-up: buffers and threads */
    CHECK(moe_layer_backward(layer, dy, dx, NULL));
    CHECK(moe_layer_zero_grad(layer, NULL));
    double t0 = now_s();
    CHECK(moe_layer_forward(layer, x, y, T, 1, NULL));
    double t1 = now_s();
    CHECK(moe_layer_backward(layer, dy, dx, NULL));
    double t2 = now_s();

    moe_routing_stats_t st;
    int64_t *tpe = malloc((size_t)cfg.num_experts * sizeof(int64_t));
    int64_t *dpe = malloc((size_t)cfg.num_experts * sizeof(int64_t));
    CHECK(moe_layer_stats(layer, &st, tpe, dpe));

    double flops_fwd = 2.0 * 2.0 * (double)cfg.d_model * (double)cfg.d_ff *
                       (double)(st.num_assignments - st.num_dropped);
    printf("  time     forward %.2f ms (%.0f tokens/s, %.1f GFLOP/s in the experts), "
           "backward %.2f ms\n",
           1e3 * (t1 - t0), (double)T / (t1 - t0), 1e-9 * flops_fwd / (t1 - t0), 1e3 * (t2 - t1));
    printf("  experts  tokens routed (dropped):");
    for (int64_t e = 0; e < cfg.num_experts; ++e)
        printf(" %lld(%lld)", (long long)tpe[e], (long long)dpe[e]);
    printf("\n  dropped  %lld of %lld assignments (%.1f%%), imbalance max/mean %.3f\n",
           (long long)st.num_dropped, (long long)st.num_assignments,
           100.0 * (double)st.num_dropped / (double)st.num_assignments, st.imbalance);
    printf("  losses   switch %.4f  importance %.4f  load %.4f  z %.4f  (aux total %.5f)\n",
           st.switch_loss, st.importance_loss, st.load_loss, st.z_loss, st.aux_loss);

    double ysum = 0.0, dxsum = 0.0, gsum = 0.0;
    for (size_t i = 0; i < n; ++i) ysum += fabs(y[i]), dxsum += fabs(dx[i]);
    float *g1 = NULL;
    int64_t n1 = 0;
    CHECK(moe_layer_param(layer, MOE_PARAM_W1, NULL, (void **)&g1, &n1));
    for (int64_t i = 0; i < n1; ++i) gsum += fabs(g1[i]);
    printf("  outputs  mean|y| %.5f  mean|dx| %.6f  mean|dW1| %.3e\n", ysum / (double)n,
           dxsum / (double)n, gsum / (double)n1);

    free(tpe), free(dpe), free(x), free(y), free(dy), free(dx);
    CHECK(moe_layer_destroy(layer));
    CHECK(moe_context_destroy(ctx));
    return 0;
}
