/* collective.c - the agreement step and the end of a layer's collective calls. */
#include "collective.h"

#include "core/status.h"

moe_status_t moe__layer_agree(moe_layer_t *L, moe_call_t call, uint64_t flags,
                              moe_status_t local) {
    moe_context_t *ctx = L->ctx;
    if (ctx->world == 1) return local;
    /* the layer and the flags, mixed so that neither can cancel the other */
    uint64_t key = L->agree_key * 0x9e3779b97f4a7c15ull ^ (flags + 0x632be59bd9b4e019ull);
    moe_status_t st = moe__comm_agree(ctx->comm, call, key, local);
    L->exchange_open = st == MOE_STATUS_SUCCESS;
    return st;
}

moe_status_t moe__layer_finish(moe_layer_t *L, moe_status_t st) {
    if (st != MOE_STATUS_SUCCESS && L->exchange_open && L->ctx->world > 1)
        moe__comm_abort(L->ctx->comm, st);
    L->exchange_open = 0;
    return st;
}
