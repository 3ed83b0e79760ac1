/* optim.h - what placement.c needs of an optimizer (optim.c): its layer and its moment buffers,
 * which move with the experts when the placement changes. */
#ifndef MOE_OPTIM_H
#define MOE_OPTIM_H

#include "moe/moe.h"

#ifdef __cplusplus
extern "C" {
#endif

/* the layer the optimizer updates */
moe_layer_t *moe__optimizer_layer(const moe_optimizer_t *opt);
/* moment buffers per parameter: 0 (SGD without momentum), 1 (SGD momentum), 2 (Adam) */
int moe__optimizer_num_moments(const moe_optimizer_t *opt);
/* where the pointer to moment `which` (0 or 1) of parameter p lives */
void **moe__optimizer_moment(moe_optimizer_t *opt, int p, int which);

#ifdef __cplusplus
}
#endif

#endif
