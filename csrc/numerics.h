/* numerics.h - the checks for non-finite values (numerics.c): of dy on entry to backward, and of
 * the outputs of a forward (y) and of a backward (dx and every parameter gradient). */
#ifndef MOE_NUMERICS_H
#define MOE_NUMERICS_H

#include "handle.h"

#ifdef __cplusplus
extern "C" {
#endif

/* NaN/Inf in dy: NUMERIC_ERROR before anything is accumulated. With expert parallelism the
 * count is summed over the ranks (one all-reduce), so every rank takes the same way out. */
moe_status_t moe__numerics_check_dy(moe_layer_t *layer, const void *dy, int64_t n, void *stream);
/* NaN/Inf in the forward's y (T, D): NUMERIC_ERROR; nothing is undone. Off with
 * moe_layer_set_check_numerics(layer, 0). */
moe_status_t moe__numerics_check_forward(moe_layer_t *layer, const void *y, int64_t n,
                                         void *stream);
/* NaN/Inf in the backward's dx (T, D) or any parameter gradient: NUMERIC_ERROR. */
moe_status_t moe__numerics_check_backward(moe_layer_t *layer, const void *dx, void *stream);

#ifdef __cplusplus
}
#endif

#endif
