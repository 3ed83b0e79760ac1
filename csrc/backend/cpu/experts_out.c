/* experts_out.c - the CPU per-expert outputs (the twin of kernels/experts_out.cu): the combine
 * left undone. Forward scatters each kept assignment's output row and gate into (T, K) order,
 * zeros for dropped ones; backward gathers the caller's gradients back into route order. */

#include <string.h>

#include "backend/backend.h"
#include "backend/cpu/cpu.h"
#include "core/status.h"

moe_status_t moe__cpu_experts_out_fwd(moe_context_t *ctx, const moe_experts_out_fwd_args_t *a,
                                      void *stream) {
    (void)ctx, (void)stream;
    const int64_t T = a->T, K = a->layer->K, D = a->layer->D;
    const float *yp = (const float *)a->yp;
    float *ye = (float *)a->ye;
#pragma omp parallel for schedule(static) MOE_PAR(T * K * D)
    for (int64_t i = 0; i < T * K; ++i) {
        int32_t r = a->row[i];
        if (r < 0) {
            memset(ye + i * D, 0, (size_t)D * sizeof(float));
            a->ge[i] = 0.0f;
        } else {
            memcpy(ye + i * D, yp + (int64_t)r * D, (size_t)D * sizeof(float));
            a->ge[i] = a->gate[i];
        }
    }
    return MOE_STATUS_SUCCESS;
}

moe_status_t moe__cpu_experts_out_bwd(moe_context_t *ctx, const moe_experts_out_bwd_args_t *a,
                                      void *stream) {
    (void)ctx, (void)stream;
    const int64_t T = a->T, K = a->layer->K, D = a->layer->D;
    const float *dye = (const float *)a->dye;
    float *dyp = (float *)a->dyp;
#pragma omp parallel for schedule(static) MOE_PAR(T * K * D)
    for (int64_t i = 0; i < T * K; ++i) {
        int32_t r = a->row[i];
        if (r >= 0) memcpy(dyp + (int64_t)r * D, dye + i * D, (size_t)D * sizeof(float));
        a->dgate[i] = r >= 0 ? a->dge[i] : 0.0f;
    }
    return MOE_STATUS_SUCCESS;
}
