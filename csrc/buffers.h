/* buffers.h - the layer's per-token and expert-side buffers (buffers.c): growth, release, and
 * the read-back of the routing that moe_layer_routing and traces need. */
#ifndef MOE_BUFFERS_H
#define MOE_BUFFERS_H

#include "handle.h"

#ifdef __cplusplus
extern "C" {
#endif

/* grows the per-token buffers to hold T tokens; on failure the layer is unchanged */
moe_status_t moe__buffers_reserve_tokens(moe_layer_t *layer, int64_t T);
/* grows the expert-side buffers to hold `rows` rows; on failure the layer is unchanged */
moe_status_t moe__buffers_reserve_rows(moe_layer_t *layer, int64_t rows);
/* releases every buffer (the layer's destroy) */
void moe__buffers_free(moe_layer_t *layer);

/* the last forward's routing on the host, each array (T, K) or NULL: expert indices, gate
 * weights, kept flags. Synchronises the backend. */
moe_status_t moe__buffers_read_routing(moe_layer_t *layer, int32_t *expert_index, float *gate,
                                       int32_t *kept);

#ifdef __cplusplus
}
#endif

#endif
