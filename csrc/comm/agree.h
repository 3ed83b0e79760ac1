/* agree.h - the agreement step that opens every collective call (agree.c; moe.h,
 * "Agreement"). */
#ifndef MOE_COMM_AGREE_H
#define MOE_COMM_AGREE_H

#include <stdint.h>

#include "comm/comm.h"

#ifdef __cplusplus
extern "C" {
#endif

/* Every collective call of the public API opens with one: each rank all-gathers one word (the
 * call, a hash of the agreement count and of `key`, this rank's own status), so a call that
 * failed its own checks on one rank, or ranks that are in different calls, end the call on
 * every rank before any data moves. */
typedef enum moe_call {
    MOE_CALL_LAYER_CREATE = 1,
    MOE_CALL_LAYER_CREATED, /* the end of moe_layer_create: did every rank allocate */
    MOE_CALL_FORWARD,
    MOE_CALL_FORWARD_EXPERTS,
    MOE_CALL_BACKWARD,
    MOE_CALL_BACKWARD_EXPERTS,
    MOE_CALL_ALLREDUCE_ROUTER_GRADS,
    MOE_CALL_SET_EXPERT_MASK,
    MOE_CALL_SET_PLACEMENT,
    MOE_CALL_PLACEMENT_ALLOCATED, /* moe_layer_set_placement: did every rank allocate */
    MOE_CALL_REDUCE_REPLICA_GRADS,
    MOE_CALL_REBALANCE,
    MOE_CALL_COUNT
} moe_call_t;

/* the public name of a call ("moe_layer_forward") */
const char *moe__call_name(moe_call_t call);

/* Collective. local: this rank's status so far (its message is kept when it failed); key: what
 * must be equal on every rank besides the call (the layer, per-call flags). Returns local when
 * it failed; COMM_ERROR when the ranks are in different calls (named) or the step itself failed;
 * otherwise the status of the lowest rank whose checks failed, with a message naming it (that
 * rank's own message says why); SUCCESS when every rank may go on. Only the step's own
 * failure breaks the communicator: the others leave it in step. */
moe_status_t moe__comm_agree(moe_comm_t *c, moe_call_t call, uint64_t key, moe_status_t local);

#ifdef __cplusplus
}
#endif

#endif
