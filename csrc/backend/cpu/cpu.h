/* cpu.h - the CPU backend's ops, one file per op family as kernels/ (gate.c, permute.c,
 * combine.c, ffn.c, shared.c, experts_out.c, optim.c),
 * gathered into moe_cpu_backend by cpu_backend.c; and the helpers
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
moe_status_t moe__cpu_gate_fwd(moe_context_t *ctx, const moe_gate_fwd_args_t *a, void *stream);
moe_status_t moe__cpu_gate_bwd(moe_context_t *ctx, const moe_gate_bwd_args_t *a, void *stream);
/* permute.c */
moe_status_t moe__cpu_route(moe_context_t *ctx, const moe_route_args_t *a, void *stream);
moe_status_t moe__cpu_permute(moe_context_t *ctx, const moe_permute_args_t *a, void *stream);
moe_status_t moe__cpu_unpermute_bwd(moe_context_t *ctx, const moe_unpermute_bwd_args_t *a,
                                    void *stream);
/* combine.c */
moe_status_t moe__cpu_combine_fwd(moe_context_t *ctx, const moe_combine_fwd_args_t *a,
                                  void *stream);
moe_status_t moe__cpu_combine_bwd(moe_context_t *ctx, const moe_combine_bwd_args_t *a,
                                  void *stream);
/* ffn.c */
moe_status_t moe__cpu_ffn_fwd(moe_context_t *ctx, const moe_ffn_fwd_args_t *a, void *stream);
moe_status_t moe__cpu_ffn_bwd(moe_context_t *ctx, const moe_ffn_bwd_args_t *a, void *stream);
/* gate_hier.c: hierarchical gating */
moe_status_t moe__cpu_gate_hier_fwd(moe_context_t *ctx, const moe_gate_hier_fwd_args_t *a,
                                    void *stream);
moe_status_t moe__cpu_gate_hier_bwd(moe_context_t *ctx, const moe_gate_hier_bwd_args_t *a,
                                    void *stream);
/* shared.c */
moe_status_t moe__cpu_shared_fwd(moe_context_t *ctx, const moe_shared_fwd_args_t *a,
                                 void *stream);
moe_status_t moe__cpu_shared_combine_bwd(moe_context_t *ctx,
                                         const moe_shared_combine_bwd_args_t *a, void *stream);
moe_status_t moe__cpu_shared_bwd(moe_context_t *ctx, const moe_shared_bwd_args_t *a,
                                 void *stream);
/* experts_out.c */
moe_status_t moe__cpu_experts_out_fwd(moe_context_t *ctx, const moe_experts_out_fwd_args_t *a,
                                      void *stream);
moe_status_t moe__cpu_experts_out_bwd(moe_context_t *ctx, const moe_experts_out_bwd_args_t *a,
                                      void *stream);
/* optim.c */
moe_status_t moe__cpu_optim_update(moe_context_t *ctx, const moe_optim_args_t *a, void *stream);

#endif
