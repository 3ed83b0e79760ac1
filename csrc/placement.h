/* placement.h - which rank holds which experts (placement.c): the default contiguous split,
 * the tables the scheduler reads, and the per-forward split of this rank's rows over replicas.
 * The public calls (moe_layer_set_placement, moe_layer_reduce_replica_grads, ...) are in
 * moe.h. */
#ifndef MOE_PLACEMENT_H
#define MOE_PLACEMENT_H

#include "handle.h"

#ifdef __cplusplus
extern "C" {
#endif

/* the default placement of a new layer: rank q holds experts [floor(q E / P), floor((q+1) E / P));
 * sets the layer's E_local, expert_begin and chunk count */
moe_status_t moe__placement_init_default(moe_layer_t *layer);

void moe__placement_free(moe_placement_t *pl);

/* global index of the expert held in local slot le of this rank */
static inline int64_t moe__placement_expert(const moe_layer_t *L, int64_t le) {
    return L->ctx->world == 1 ? le : (int64_t)L->pl.slot_expert[L->pl.rank_begin[L->s.rank] + le];
}

/* this rank's rows of the last route for every slot: pl.piece_off / piece_rows from the route's
 * expert-major offsets (E + 1). The rows of expert e (n of them, in route order) are cut into m
 * near-equal consecutive parts, m its replica count: part i is rows [floor(i n / m),
 * floor((i + 1) n / m)); part i goes to replica (i + rank) mod m, replicas in rank order. */
void moe__placement_split(moe_layer_t *layer, const int64_t *offsets);

#ifdef __cplusplus
}
#endif

#endif
