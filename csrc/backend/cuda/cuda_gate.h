/* cuda_gate.h - the CUDA backend's gate ops (cuda_gate.c), entries of its op table. */
#ifndef MOE_BACKEND_CUDA_CUDA_GATE_H
#define MOE_BACKEND_CUDA_CUDA_GATE_H

#include "state.h"

#ifdef __cplusplus
extern "C" {
#endif

moe_status_t moe__cu_gate_fwd(moe_context_t *ctx, const moe_gate_fwd_args_t *g, void *stream);
moe_status_t moe__cu_gate_bwd(moe_context_t *ctx, const moe_gate_bwd_args_t *g, void *stream);
moe_status_t moe__cu_gate_hier_fwd(moe_context_t *ctx, const moe_gate_hier_fwd_args_t *g,
                                   void *stream);
moe_status_t moe__cu_gate_hier_bwd(moe_context_t *ctx, const moe_gate_hier_bwd_args_t *g,
                                   void *stream);

#ifdef __cplusplus
}
#endif

#endif
