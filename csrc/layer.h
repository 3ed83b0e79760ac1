/* layer.h - the layer handle (internal): owner of parameters, gradients and buffers. */
#ifndef MOE_LAYER_H
#define MOE_LAYER_H

#include "backend/backend.h"

#ifdef __cplusplus
extern "C" {
#endif

struct moe_layer {
    uint32_t magic;
    moe_context_t *ctx;
    moe_layer_state_t s;
};

/* grows the per-token buffers to hold T tokens; on failure the layer is unchanged */
moe_status_t moe__layer_reserve(moe_layer_t *layer, int64_t T);

/* the plan of one forward / backward call (scheduler.c) */
moe_status_t moe__scheduler_forward(moe_layer_t *layer, const void *x, void *y, int64_t T,
                                    int training, void *stream);
moe_status_t moe__scheduler_backward(moe_layer_t *layer, const void *dy, void *dx, void *stream);

#ifdef __cplusplus
}
#endif

#endif
