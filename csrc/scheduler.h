/* scheduler.h - the plan of one forward / backward call (scheduler.c), called by layer.c. */
#ifndef MOE_SCHEDULER_H
#define MOE_SCHEDULER_H

#include "handle.h"

#ifdef __cplusplus
extern "C" {
#endif

/* the forward's checks of this rank, before its agreement step (layer.c): forced routing, finite
 * x, buffers for T tokens; changes nothing of the last forward */
moe_status_t moe__scheduler_forward_prepare(moe_layer_t *layer, const void *x, int64_t T,
                                            int training, void *stream);
/* the backward's: finite dy (or dy_experts) */
moe_status_t moe__scheduler_backward_prepare(moe_layer_t *layer, const void *dy, int experts_out,
                                             void *stream);
moe_status_t moe__scheduler_forward(moe_layer_t *layer, const void *x, void *y, int64_t T,
                                    int training, void *stream);
moe_status_t moe__scheduler_backward(moe_layer_t *layer, const void *dy, void *dx, void *stream);
/* the same with per-expert outputs (moe_layer_forward_experts / moe_layer_backward_experts) */
moe_status_t moe__scheduler_forward_experts(moe_layer_t *layer, const void *x, void *y_experts,
                                            float *gate, int64_t T, int training, void *stream);
moe_status_t moe__scheduler_backward_experts(moe_layer_t *layer, const void *dy_experts,
                                             const float *dgate, void *dx, void *stream);

#ifdef __cplusplus
}
#endif

#endif
