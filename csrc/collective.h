/* collective.h - the frame of a layer's collective calls with expert parallelism (moe.h,
 * "Agreement"): the agreement step that opens each, and the end that tells the peers when a
 * rank leaves one it cannot finish. */
#ifndef MOE_COLLECTIVE_H
#define MOE_COLLECTIVE_H

#include <stdint.h>

#include "comm/agree.h"
#include "handle.h"

#ifdef __cplusplus
extern "C" {
#endif

/* The agreement step of a collective call of L: moe__comm_agree on L's communicator with the
 * layer's key and the call's flags (what must match on every rank, e.g. the training flag);
 * returns local itself with one rank. On SUCCESS the call's exchange is open. */
moe_status_t moe__layer_agree(moe_layer_t *L, moe_call_t call, uint64_t flags,
                              moe_status_t local);

/* The end of a collective call of L, with its status: a failure while the exchange is open
 * (peers may be waiting in one of the call's collectives) breaks the communicator and tells the
 * peers (moe__comm_abort). Closes the exchange; returns st. */
moe_status_t moe__layer_finish(moe_layer_t *L, moe_status_t st);

/* The call's last collective is done: a later local failure concerns this rank only. */
static inline void moe__layer_exchange_done(moe_layer_t *L) { L->exchange_open = 0; }

#ifdef __cplusplus
}
#endif

#endif
