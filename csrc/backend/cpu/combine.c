/* combine.c - the CPU combine and its backward (the twin of kernels/combine.cu): each token sums
 * its kept rows in j order, so the result does not depend on threads. */

#include <string.h>

#include "backend/backend.h"
#include "backend/cpu/cpu.h"
#include "core/status.h"

moe_status_t moe__cpu_combine_fwd(moe_context_t *ctx, const moe_combine_fwd_args_t *a,
                                  void *stream) {
    (void)ctx, (void)stream;
    const int64_t T = a->T, K = a->layer->K, D = a->layer->D;
    const float *yp = (const float *)a->yp;
    float *y = (float *)a->y;
#pragma omp parallel for schedule(static) MOE_PAR(T * K * D)
    for (int64_t t = 0; t < T; ++t) {
        float *yt = y + t * D;
        memset(yt, 0, (size_t)D * sizeof(float));
        for (int64_t j = 0; j < K; ++j) { /* j order: deterministic */
            int32_t r = a->row[t * K + j];
            if (r < 0) continue;
            float g = a->gate[t * K + j];
            const float *src = yp + (int64_t)r * D;
            for (int64_t d = 0; d < D; ++d) yt[d] += g * src[d];
        }
    }
    return MOE_STATUS_SUCCESS;
}

moe_status_t moe__cpu_combine_bwd(moe_context_t *ctx, const moe_combine_bwd_args_t *a,
                                  void *stream) {
    (void)ctx, (void)stream;
    const int64_t T = a->T, K = a->layer->K, D = a->layer->D;
    const float *dy = (const float *)a->dy, *yp = (const float *)a->yp;
    float *dyp = (float *)a->dyp;
#pragma omp parallel for schedule(static) MOE_PAR(T * K * D)
    for (int64_t t = 0; t < T; ++t) {
        const float *dyt = dy + t * D;
        for (int64_t j = 0; j < K; ++j) {
            int32_t r = a->row[t * K + j];
            float dg = 0.0f;
            if (r >= 0) {
                float g = a->gate[t * K + j];
                const float *yr = yp + (int64_t)r * D;
                float *dr = dyp + (int64_t)r * D;
                for (int64_t d = 0; d < D; ++d) {
                    dg += dyt[d] * yr[d];
                    dr[d] = g * dyt[d];
                }
            }
            a->dgate[t * K + j] = dg;
        }
    }
    return MOE_STATUS_SUCCESS;
}
