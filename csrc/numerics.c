/* numerics.c - non-finite results of finite inputs, reported: y after a forward, dx and the
 * parameter gradients after a backward (the numeric-check block of moe.h), and NaN/Inf in dy on
 * entry to backward. Each check is one count_nonfinite op of the backend (a host wait on CUDA,
 * which is why the output checks can be turned off). */
#include "numerics.h"

#include "backend/backend.h"
#include "comm/comm.h"
#include "core/dtype.h"
#include "core/status.h"

static moe_status_t count(moe_layer_t *L, const void *v, int64_t n, int64_t *bad, void *stream) {
    moe_context_t *ctx = L->ctx;
    *bad = 0;
    if (n <= 0 || v == NULL) return MOE_STATUS_SUCCESS;
    if (ctx->ops->count_nonfinite_typed)
        return ctx->ops->count_nonfinite_typed(ctx, v, L->s.cfg.dtype, n, bad, stream);
    return ctx->ops->count_nonfinite(ctx, v, n, bad, stream);
}

moe_status_t moe__numerics_check_dy(moe_layer_t *L, const void *dy, int64_t n, void *stream) {
    int64_t bad = 0;
    /* with peers, the backward's agreement step then ends the call on every rank */
    MOE_CHECK(count(L, dy, n, &bad, stream));
    if (bad)
        return MOE_ERR(MOE_STATUS_NUMERIC_ERROR,
                       "dy holds %lld NaN/Inf values: nothing was accumulated", (long long)bad);
    return MOE_STATUS_SUCCESS;
}

moe_status_t moe__numerics_check_forward(moe_layer_t *L, const void *y, int64_t n,
                                         void *stream) {
    if (L->skip_numeric_checks) return MOE_STATUS_SUCCESS;
    int64_t bad = 0;
    MOE_CHECK(count(L, y, n, &bad, stream));
    if (bad)
        return MOE_ERR(MOE_STATUS_NUMERIC_ERROR,
                       "%s holds %lld NaN/Inf values although x is finite (parameters too large "
                       "or non-finite, or x near the f32 range): the forward ran to the end",
                       n == L->s.T * L->s.D ? "y" : "y_experts", (long long)bad);
    return MOE_STATUS_SUCCESS;
}

moe_status_t moe__numerics_check_backward(moe_layer_t *L, const void *dx, void *stream) {
    if (L->skip_numeric_checks) return MOE_STATUS_SUCCESS;
    int64_t bad = 0;
    MOE_CHECK(count(L, dx, L->s.T * L->s.D, &bad, stream));
    if (bad)
        return MOE_ERR(MOE_STATUS_NUMERIC_ERROR,
                       "dx holds %lld NaN/Inf values although dy is finite: the backward ran to "
                       "the end", (long long)bad);
    static const char *names[] = {"router_weight", "noise_weight", "w1", "b1", "w2", "b2",
                                  "secondary_router_weight", "shared_w1", "shared_b1",
                                  "shared_w2", "shared_b2", "shared_gate"};
    _Static_assert(sizeof names / sizeof names[0] == MOE_PARAM_COUNT, "a name per parameter");
    for (int p = 0; p < MOE_PARAM_COUNT; ++p) {
        MOE_CHECK(count(L, L->s.grad[p], L->s.numel[p], &bad, stream));
        if (bad)
            return MOE_ERR(MOE_STATUS_NUMERIC_ERROR,
                           "the gradient of %s holds %lld NaN/Inf values after this backward "
                           "(accumulated: zero it or skip the step)", names[p], (long long)bad);
    }
    return MOE_STATUS_SUCCESS;
}

moe_status_t moe_layer_set_check_numerics(moe_layer_t *layer, int enable) {
    MOE_LAYER_ARG(layer);
    layer->skip_numeric_checks = enable == 0;
    return MOE_STATUS_SUCCESS;
}
