/* optim.c - the CPU optimizer step (the twin of kernels/optim.cu): the per-element bodies of
 * core/optim_update.h over n f32 elements, threads over elements. */
#include "backend/backend.h"
#include "backend/cpu/cpu.h"
#include "core/optim_update.h"
#include "core/status.h"

moe_status_t moe__cpu_optim_update(moe_context_t *ctx, int adam, float *w, const float *g,
                                   float *m, float *v, int64_t n_,
                                   const struct moe_optim_scalars *c, void *stream) {
    (void)ctx, (void)stream;
    const long long n = (long long)n_;
    /* element-wise: any thread split gives the same bits */
    if (adam) {
#pragma omp parallel for schedule(static) if (n > 65536)
        for (long long i = 0; i < n; ++i) moe_adam_update(w, g, m, v, i, c);
    } else {
#pragma omp parallel for schedule(static) if (n > 65536)
        for (long long i = 0; i < n; ++i) moe_sgd_update(w, g, m, i, c);
    }
    return MOE_STATUS_SUCCESS;
}
