/* permute.c - the CPU slot assignment, permute and un-permute (the twin of kernels/permute.cu):
 * slot assignment is the shared host rule of router/router_host.c; rows move by token. */

#include <stdlib.h>
#include <string.h>

#include "backend/backend.h"
#include "backend/cpu/cpu.h"
#include "core/status.h"
#include "router/router_host.h"

moe_status_t moe__cpu_route(moe_context_t *ctx, const moe_route_args_t *a, void *stream) {
    (void)ctx, (void)stream;
    const moe_backend_layer_t *l = a->layer;
    int64_t *order = NULL;
    if (l->cfg.priority == MOE_PRIORITY_SCORE && a->capacity >= 0) {
        order = (int64_t *)malloc((size_t)(a->T * l->K) * sizeof(int64_t));
        if (!order) return MOE_ERR(MOE_STATUS_ALLOC_FAILED, "slot order scratch");
    }
    *a->num_rows = moe_router_assign_slots(a->idx, l->K1, a->gate, a->T, l->K, l->E, a->capacity,
                                           (int)l->cfg.priority, a->row, a->offsets, a->dropped,
                                           order);
    free(order);
    return MOE_STATUS_SUCCESS;
}

moe_status_t moe__cpu_permute(moe_context_t *ctx, const moe_permute_args_t *a, void *stream) {
    (void)ctx, (void)stream;
    const int64_t T = a->T, K = a->layer->K, D = a->layer->D;
    const float *x = (const float *)a->x;
    float *xp = (float *)a->xp;
#pragma omp parallel for schedule(static) MOE_PAR(T * K * D)
    for (int64_t t = 0; t < T; ++t)
        for (int64_t j = 0; j < K; ++j) {
            int32_t r = a->row[t * K + j];
            if (r >= 0) memcpy(xp + (int64_t)r * D, x + t * D, (size_t)D * sizeof(float));
        }
    return MOE_STATUS_SUCCESS;
}

moe_status_t moe__cpu_unpermute_bwd(moe_context_t *ctx, const moe_unpermute_bwd_args_t *a,
                                    void *stream) {
    (void)ctx, (void)stream;
    const int64_t T = a->T, K = a->layer->K, D = a->layer->D;
    const float *dxp = (const float *)a->dxp;
    float *dx = (float *)a->dx;
#pragma omp parallel for schedule(static) MOE_PAR(T * K * D)
    for (int64_t t = 0; t < T; ++t) {
        float *o = dx + t * D;
        memset(o, 0, (size_t)D * sizeof(float));
        for (int64_t j = 0; j < K; ++j) {
            int32_t r = a->row[t * K + j];
            if (r < 0) continue;
            const float *src = dxp + (int64_t)r * D;
            for (int64_t d = 0; d < D; ++d) o[d] += src[d];
        }
    }
    return MOE_STATUS_SUCCESS;
}
