/* cpu.h - the CPU backend's ops, one file per op family as kernels/ (gate.c, permute.c,
 * combine.c, ffn.c, optim.c), gathered into moe_cpu_backend by cpu_backend.c; and the helpers
 * the families share.
 *
 * Reductions over tokens go through fixed blocks of MOE_CPU_BLOCK tokens summed in block order,
 * and no float is ever accumulated by two threads: results are the same run to run, and every
 * routing decision is the same for any thread count (the GEMMs' last bits follow OpenBLAS's
 * per-thread-count blocking). */
#ifndef MOE_BACKEND_CPU_CPU_H
#define MOE_BACKEND_CPU_CPU_H

#include <stdint.h>

#include "backend/backend.h"

#define MOE_CPU_BLOCK 256 /* tokens per reduction block */

/* Loops with less work than this many elements run on the calling thread: waking the OpenMP
 * team costs more than it saves, and on a loaded machine a descheduled worker stalls the call. */
#define MOE_CPU_MIN_PARALLEL ((int64_t)1 << 15)
#define MOE_PAR(work) if ((int64_t)(work) >= MOE_CPU_MIN_PARALLEL)

/* ffn.c: C (m, n) = A (m, k) . B (k, n) + beta C, all row-major; transposes as flagged */
void moe__cpu_sgemm(int ta, int tb, int64_t m, int64_t n, int64_t k, const float *A, int64_t lda,
                    const float *B, int64_t ldb, float beta, float *C, int64_t ldc);

/* gate.c */
moe_status_t moe__cpu_count_nonfinite(moe_context_t *ctx, const void *x, int64_t n,
                                      int64_t *num_bad, void *stream);
moe_status_t moe__cpu_gate_fwd(moe_context_t *ctx, moe_layer_state_t *s, void *stream);
moe_status_t moe__cpu_gate_bwd(moe_context_t *ctx, moe_layer_state_t *s, void *dx, void *stream);
/* permute.c */
moe_status_t moe__cpu_route(moe_context_t *ctx, moe_layer_state_t *s, void *stream);
moe_status_t moe__cpu_permute(moe_context_t *ctx, moe_layer_state_t *s, void *stream);
moe_status_t moe__cpu_unpermute_bwd(moe_context_t *ctx, moe_layer_state_t *s, void *dx,
                                    void *stream);
/* combine.c */
moe_status_t moe__cpu_combine_fwd(moe_context_t *ctx, moe_layer_state_t *s, void *y,
                                  void *stream);
moe_status_t moe__cpu_combine_bwd(moe_context_t *ctx, moe_layer_state_t *s, const void *dy,
                                  void *stream);
/* ffn.c */
moe_status_t moe__cpu_ffn_fwd(moe_context_t *ctx, moe_layer_state_t *s, void *stream);
moe_status_t moe__cpu_ffn_bwd(moe_context_t *ctx, moe_layer_state_t *s, void *stream);
/* optim.c */
moe_status_t moe__cpu_optim_update(moe_context_t *ctx, int adam, float *w, const float *g,
                                   float *m, float *v, int64_t n,
                                   const struct moe_optim_scalars *c, void *stream);

#endif
