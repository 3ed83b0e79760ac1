/* agree.c - the agreement step that opens every collective call (moe.h, "Agreement").
 *
 * Each rank all-gathers one 64-bit word:
 *   bits  0..7   this rank's status so far (0: its own checks passed)
 *   bits  8..15  the call (moe_call_t)
 *   bits 16..63  48 bits of a hash of the agreement count and the caller's key (the layer, the
 *                call's flags)
 * Every rank reads the same words, so every rank takes the same way out: on with the call, out
 * with the failing rank's status, or out with COMM_ERROR when the calls differ. The step is one
 * all-gather of one word, the same collective whatever the call, so ranks that are in different
 * calls still match each other here and never exchange data of different shapes. */
#include <stdlib.h>
#include <string.h>

#include "comm/agree.h"
#include "core/status.h"

static const char *const call_names[MOE_CALL_COUNT] = {
    [MOE_CALL_LAYER_CREATE] = "moe_layer_create",
    [MOE_CALL_LAYER_CREATED] = "moe_layer_create (allocation)",
    [MOE_CALL_FORWARD] = "moe_layer_forward",
    [MOE_CALL_FORWARD_EXPERTS] = "moe_layer_forward_experts",
    [MOE_CALL_BACKWARD] = "moe_layer_backward",
    [MOE_CALL_BACKWARD_EXPERTS] = "moe_layer_backward_experts",
    [MOE_CALL_ALLREDUCE_ROUTER_GRADS] = "moe_layer_allreduce_router_grads",
    [MOE_CALL_SET_EXPERT_MASK] = "moe_layer_set_expert_mask",
    [MOE_CALL_SET_PLACEMENT] = "moe_layer_set_placement",
    [MOE_CALL_PLACEMENT_ALLOCATED] = "moe_layer_set_placement (allocation)",
    [MOE_CALL_REDUCE_REPLICA_GRADS] = "moe_layer_reduce_replica_grads",
    [MOE_CALL_REBALANCE] = "moe_layer_rebalance",
};

const char *moe__call_name(moe_call_t call) {
    return call > 0 && call < MOE_CALL_COUNT && call_names[call] ? call_names[call]
                                                                  : "an unknown call";
}

/* splitmix64's finaliser: every input bit reaches every output bit */
static uint64_t mix(uint64_t z) {
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

#define WORD_STATUS(w) ((moe_status_t)((w)&0xffu))
#define WORD_CALL(w) ((moe_call_t)(((w) >> 8) & 0xffu))
#define WORD_KEY(w) ((w) >> 16)

moe_status_t moe__comm_agree(moe_comm_t *c, moe_call_t call, uint64_t key, moe_status_t local) {
    /* this rank's message, if it failed, outlives the step's own calls */
    char saved[1024];
    if (local != MOE_STATUS_SUCCESS) {
        strncpy(saved, moe_last_error(), sizeof saved - 1);
        saved[sizeof saved - 1] = '\0';
    }
    const uint64_t mine = (uint64_t)((unsigned)local & 0xffu) | (uint64_t)(call & 0xff) << 8 |
                          (mix(mix(c->seq) ^ key) & 0xffffffffffffull) << 16;
    c->seq++;
    uint64_t one[1];
    uint64_t *all = c->size > 1 ? (uint64_t *)malloc((size_t)c->size * sizeof(uint64_t)) : one;
    moe_status_t st;
    if (!all) {
        /* no word, no step: the peers must not wait for this rank */
        st = MOE_ERR(MOE_STATUS_ALLOC_FAILED, "rank %d: the agreement step of %s", c->rank,
                     moe__call_name(call));
        moe__comm_abort(c, st);
    } else {
        st = moe__comm_allgather_u64(c, mine, all);
    }
    int first_bad = -1, other_call = -1;
    moe_status_t theirs = MOE_STATUS_SUCCESS;
    for (int q = 0; q < c->size && st == MOE_STATUS_SUCCESS; ++q) {
        if (WORD_CALL(all[q]) != call || WORD_KEY(all[q]) != WORD_KEY(mine)) {
            if (other_call < 0) other_call = q;
        } else if (WORD_STATUS(all[q]) != MOE_STATUS_SUCCESS && first_bad < 0) {
            first_bad = q;
            theirs = WORD_STATUS(all[q]);
        }
    }
    if (st == MOE_STATUS_SUCCESS && other_call >= 0) {
        const uint64_t w = all[other_call];
        st = WORD_CALL(w) != call
                 ? MOE_ERR(MOE_STATUS_COMM_ERROR,
                           "rank %d is in %s while rank %d is in %s: every rank must make the "
                           "same sequence of collective calls (nothing was exchanged)",
                           c->rank, moe__call_name(call), other_call,
                           moe__call_name(WORD_CALL(w)))
                 : MOE_ERR(MOE_STATUS_COMM_ERROR,
                           "rank %d and rank %d are both in %s but on different layers, with "
                           "different training flags, or out of step (a collective call one "
                           "of them skipped): nothing was exchanged",
                           c->rank, other_call, moe__call_name(call));
    }
    if (all != one) free(all);
    if (local != MOE_STATUS_SUCCESS) {
        /* the rank's own reason comes first, whatever the others said */
        moe__error_restore(saved);
        return local;
    }
    if (st != MOE_STATUS_SUCCESS || first_bad < 0) return st;
    /* a status outside the enum would be a bug of the sender: report it as such */
    if (theirs < MOE_STATUS_INVALID_ARGUMENT || theirs > MOE_STATUS_IO_ERROR)
        theirs = MOE_STATUS_INTERNAL_ERROR;
    return MOE_ERR(theirs,
                   "rank %d: rank %d failed its own checks in %s (%s; its moe_last_error() says "
                   "why): nothing ran on any rank",
                   c->rank, first_bad, moe__call_name(call), moe_status_string(theirs));
}
