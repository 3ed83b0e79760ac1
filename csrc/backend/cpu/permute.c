/* permute.c - the CPU slot assignment, permute and un-permute (the twin of kernels/permute.cu):
 * slot assignment is the shared host rule of router/router_host.c; rows move by token. */

#include <stdlib.h>
#include <string.h>

#include "backend/backend.h"
#include "backend/cpu/cpu.h"
#include "core/status.h"
#include "router/router_host.h"

moe_status_t moe__cpu_route(moe_context_t *ctx, moe_layer_state_t *s, void *stream) {
    (void)ctx, (void)stream;
    int64_t *order = NULL;
    if (s->cfg.priority == MOE_PRIORITY_SCORE && s->capacity >= 0) {
        order = (int64_t *)malloc((size_t)(s->T * s->K) * sizeof(int64_t));
        if (!order) return MOE_ERR(MOE_STATUS_ALLOC_FAILED, "slot order scratch");
    }
    s->num_rows = moe_router_assign_slots(s->idx, s->K1, s->gate, s->T, s->K, s->E, s->capacity,
                                          (int)s->cfg.priority, s->row, s->offsets_h,
                                          s->dropped_h, order);
    free(order);
    return MOE_STATUS_SUCCESS;
}

moe_status_t moe__cpu_permute(moe_context_t *ctx, moe_layer_state_t *s, void *stream) {
    (void)ctx, (void)stream;
    const int64_t T = s->T, K = s->K, D = s->D;
#pragma omp parallel for schedule(static) MOE_PAR(T * K * D)
    for (int64_t t = 0; t < T; ++t)
        for (int64_t j = 0; j < K; ++j) {
            int32_t r = s->row[t * K + j];
            if (r >= 0) memcpy(s->xp + (int64_t)r * D, s->x + t * D, (size_t)D * sizeof(float));
        }
    return MOE_STATUS_SUCCESS;
}


moe_status_t moe__cpu_unpermute_bwd(moe_context_t *ctx, moe_layer_state_t *s, void *dx_,
                                      void *stream) {
    (void)ctx, (void)stream;
    const int64_t T = s->T, K = s->K, D = s->D;
    float *dx = (float *)dx_;
#pragma omp parallel for schedule(static) MOE_PAR(T * K * D)
    for (int64_t t = 0; t < T; ++t) {
        float *o = dx + t * D;
        memset(o, 0, (size_t)D * sizeof(float));
        for (int64_t j = 0; j < K; ++j) {
            int32_t r = s->row[t * K + j];
            if (r < 0) continue;
            const float *src = s->dxp + (int64_t)r * D;
            for (int64_t d = 0; d < D; ++d) o[d] += src[d];
        }
    }
    return MOE_STATUS_SUCCESS;
}
