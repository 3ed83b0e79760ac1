/* consumer.c - a program outside the source tree that uses an installed libmoe: one layer,
 * forward and backward on the CPU backend. Built by tests/install/run.sh with find_package(moe)
 * and with pkg-config. */
#include <moe/moe.h>
#include <stdio.h>
#include <stdlib.h>

#define CHECK(call)                                                                 \
    do {                                                                            \
        if ((call) != MOE_STATUS_SUCCESS) {                                         \
            fprintf(stderr, "consumer: %s failed: %s\n", #call, moe_last_error()); \
            return 1;                                                               \
        }                                                                           \
    } while (0)

int main(void) {
    enum { T = 32, D = 16 };
    static float x[T * D], y[T * D], dx[T * D];
    for (int i = 0; i < T * D; i++)
        x[i] = (float)((i * 37) % 101) / 101.0f - 0.5f;
    int major, minor, patch;
    moe_get_version(&major, &minor, &patch);

    moe_context_t *ctx;
    moe_layer_t *layer;
    CHECK(moe_context_create(&ctx, MOE_BACKEND_CPU, 0, NULL));
    moe_layer_config_t cfg = moe_layer_config_default();
    cfg.d_model = D;
    cfg.d_ff = 32;
    cfg.num_experts = 4;
    cfg.top_k = 2;
    CHECK(moe_layer_create(&layer, ctx, &cfg));
    CHECK(moe_layer_forward(layer, x, y, T, 1, NULL));
    CHECK(moe_layer_backward(layer, y, dx, NULL)); /* loss = |y|^2 / 2 */
    moe_routing_stats_t st;
    CHECK(moe_layer_stats(layer, &st, NULL, NULL));
    double sum = 0;
    for (int i = 0; i < T * D; i++)
        sum += (double)y[i] * y[i];
    CHECK(moe_layer_destroy(layer));
    CHECK(moe_context_destroy(ctx));
    if (st.num_assignments != T * 2 || !(sum > 0)) {
        fprintf(stderr, "consumer: unexpected result (%lld assignments, |y|^2 %g)\n",
                (long long)st.num_assignments, sum);
        return 1;
    }
    printf("consumer: libmoe %d.%d.%d, %lld assignments, |y|^2 %.4f: OK\n", major, minor, patch,
           (long long)st.num_assignments, sum);
    return 0;
}
