/* trace.h - the scheduler's side of routing traces (trace.c): the record of a forward, and
 * forced routing put in place of the router's choice. */
#ifndef MOE_TRACE_H
#define MOE_TRACE_H

#include "handle.h"

#ifdef __cplusplus
extern "C" {
#endif

/* appends the last forward's record to the open trace (MOE_STATUS_IO_ERROR when it fails) */
moe_status_t moe__trace_write(moe_layer_t *layer);
/* the forced routing of layer->forced_* into the state, after the gate and before the route */
moe_status_t moe__apply_forced_routing(moe_layer_t *layer, void *stream);

#ifdef __cplusplus
}
#endif

#endif
