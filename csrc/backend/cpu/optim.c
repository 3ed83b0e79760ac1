/* optim.c - the CPU optimizer step (the twin of kernels/optim.cu): the per-element bodies of
 * core/optim_update.h over n f32 elements, threads over elements. */
#include "backend/backend.h"
#include "backend/cpu/cpu.h"
#include "core/optim_update.h"
#include "core/status.h"

moe_status_t moe__cpu_optim_update(moe_context_t *ctx, const moe_optim_args_t *a, void *stream) {
    (void)ctx, (void)stream;
    float *w = a->w, *m = a->m, *v = a->v;
    const float *g = a->g;
    const moe_optim_scalars_t *c = a->c;
    const long long n = (long long)a->n;
    /* element-wise: any thread split gives the same bits */
    if (a->adam) {
#pragma omp parallel for schedule(static) if (n > 65536)
        for (long long i = 0; i < n; ++i) moe_adam_update(w, g, m, v, i, c);
    } else {
#pragma omp parallel for schedule(static) if (n > 65536)
        for (long long i = 0; i < n; ++i) moe_sgd_update(w, g, m, i, c);
    }
    return MOE_STATUS_SUCCESS;
}
