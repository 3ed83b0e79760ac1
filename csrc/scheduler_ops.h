/* scheduler_ops.h - one call per token-side backend op with its arguments taken from the layer
 * (scheduler_ops.c); scheduler.c decides when each runs. */
#ifndef MOE_SCHEDULER_OPS_H
#define MOE_SCHEDULER_OPS_H

#include "handle.h"
#include "state.h"

#ifdef __cplusplus
extern "C" {
#endif

moe_status_t moe__op_gate_hier_fwd(moe_layer_t *L, const moe_backend_layer_t *bl, void *stream);
moe_status_t moe__op_gate_hier_bwd(moe_layer_t *L, const moe_backend_layer_t *bl, void *dx,
                                  void *stream);
moe_status_t moe__op_gate_fwd(moe_layer_t *L, const moe_backend_layer_t *bl, void *stream);
moe_status_t moe__op_route(moe_layer_t *L, const moe_backend_layer_t *bl, void *stream);
moe_status_t moe__op_permute(moe_layer_t *L, const moe_backend_layer_t *bl, void *stream);
moe_status_t moe__op_combine_fwd(moe_layer_t *L, const moe_backend_layer_t *bl, void *y,
                                void *stream);
moe_status_t moe__op_combine_bwd(moe_layer_t *L, const moe_backend_layer_t *bl, const void *dy,
                                void *stream);
moe_status_t moe__op_unpermute_bwd(moe_layer_t *L, const moe_backend_layer_t *bl, void *dx,
                                  void *stream);
moe_status_t moe__op_gate_bwd(moe_layer_t *L, const moe_backend_layer_t *bl, void *dx,
                             void *stream);
moe_status_t moe__op_shared_fwd(moe_layer_t *L, const moe_backend_layer_t *bl, void *y,
                               void *stream);
moe_status_t moe__op_shared_combine_bwd(moe_layer_t *L, const moe_backend_layer_t *bl,
                                       const void *dy, void *stream);
moe_status_t moe__op_shared_bwd(moe_layer_t *L, const moe_backend_layer_t *bl, void *dx,
                               void *stream);
moe_status_t moe__op_experts_out_fwd(moe_layer_t *L, const moe_backend_layer_t *bl, void *ye,
                                    float *ge, void *stream);
moe_status_t moe__op_experts_out_bwd(moe_layer_t *L, const moe_backend_layer_t *bl,
                                    const void *dye, const float *dge, void *stream);

#ifdef __cplusplus
}
#endif

#endif
