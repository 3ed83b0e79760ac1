/* backend.h - the backend interface: memory, streams and the ops of one MoE layer.
 *
 * A backend fills a static const moe_backend_ops_t. The ops read and write what state.h
 * describes; the scheduler (csrc/scheduler.c) is the only caller of the ops and the only place
 * that knows their order. */
#ifndef MOE_BACKEND_BACKEND_H
#define MOE_BACKEND_BACKEND_H

#include <stdint.h>

#include "backend/memory.h"
#include "moe/moe.h"
#include "state.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef struct moe_backend_ops moe_backend_ops_t;

struct moe_backend_ops {
    const char *name;
    moe_status_t (*context_init)(moe_context_t *ctx);
    void (*context_fini)(moe_context_t *ctx);

    /* alloc, free, memset_zero, copy, sync (backend/memory.h) */
    moe_memory_ops_t mem;

    /* optional (NULL: nothing to do): the backend's per-layer state in layer->impl, made once
     * the layer's config, parameters and host arrays exist, and released before the layer is
     * freed. layer_init may refuse a config the backend cannot serve (NOT_SUPPORTED). */
    moe_status_t (*layer_init)(moe_context_t *ctx, moe_backend_layer_t *layer);
    void (*layer_fini)(moe_context_t *ctx, moe_backend_layer_t *layer);

    /* *num_bad = count of NaN/Inf among n floats of x (host value on return) */
    moe_status_t (*count_nonfinite)(moe_context_t *ctx, const void *x, int64_t n,
                                    int64_t *num_bad, void *stream);
    /* optional: the same for n values of x stored in dtype (used instead when not NULL) */
    moe_status_t (*count_nonfinite_typed)(moe_context_t *ctx, const void *x, moe_dtype_t dtype,
                                          int64_t n, int64_t *num_bad, void *stream);

    /* forward ops, in call order; each reads and writes what its argument struct names */
    moe_status_t (*gate_fwd)(moe_context_t *ctx, const moe_gate_fwd_args_t *a, void *stream);
    moe_status_t (*route)(moe_context_t *ctx, const moe_route_args_t *a, void *stream);
    moe_status_t (*permute)(moe_context_t *ctx, const moe_permute_args_t *a, void *stream);
    moe_status_t (*ffn_fwd)(moe_context_t *ctx, const moe_ffn_fwd_args_t *a, void *stream);
    moe_status_t (*combine_fwd)(moe_context_t *ctx, const moe_combine_fwd_args_t *a,
                                void *stream);

    /* backward ops, in call order */
    moe_status_t (*combine_bwd)(moe_context_t *ctx, const moe_combine_bwd_args_t *a,
                                void *stream);
    moe_status_t (*ffn_bwd)(moe_context_t *ctx, const moe_ffn_bwd_args_t *a, void *stream);
    moe_status_t (*unpermute_bwd)(moe_context_t *ctx, const moe_unpermute_bwd_args_t *a,
                                  void *stream);
    moe_status_t (*gate_bwd)(moe_context_t *ctx, const moe_gate_bwd_args_t *a, void *stream);

    /* optional (NULL: MOE_ROUTER_HIERARCHICAL is NOT_SUPPORTED on this backend): the gate ops of
     * hierarchical gating, called in place of gate_fwd / gate_bwd */
    moe_status_t (*gate_hier_fwd)(moe_context_t *ctx, const moe_gate_hier_fwd_args_t *a,
                                  void *stream);
    moe_status_t (*gate_hier_bwd)(moe_context_t *ctx, const moe_gate_hier_bwd_args_t *a,
                                  void *stream);
    /* shared experts (state.h): forward after combine_fwd; shared_combine_bwd after
     * combine_bwd (dy still intact), shared_bwd after gate_bwd. Optional: a backend without them
     * refuses layers with shared experts (NOT_SUPPORTED at moe_layer_create). */
    moe_status_t (*shared_fwd)(moe_context_t *ctx, const moe_shared_fwd_args_t *a, void *stream);
    moe_status_t (*shared_combine_bwd)(moe_context_t *ctx, const moe_shared_combine_bwd_args_t *a,
                                       void *stream);
    moe_status_t (*shared_bwd)(moe_context_t *ctx, const moe_shared_bwd_args_t *a, void *stream);

    /* per-expert outputs (state.h): in place of combine_fwd / combine_bwd for
     * moe_layer_forward_experts / moe_layer_backward_experts. Optional (NULL: NOT_SUPPORTED). */
    moe_status_t (*experts_out_fwd)(moe_context_t *ctx, const moe_experts_out_fwd_args_t *a,
                                    void *stream);
    moe_status_t (*experts_out_bwd)(moe_context_t *ctx, const moe_experts_out_bwd_args_t *a,
                                    void *stream);

    /* optional (NULL: no optimizer on this backend): one optimizer step in backend memory */
    moe_status_t (*optim_update)(moe_context_t *ctx, const moe_optim_args_t *a, void *stream);
};

extern const moe_backend_ops_t moe_cpu_backend;
#ifdef MOE_WITH_CUDA
extern const moe_backend_ops_t moe_cuda_backend;
#endif

#ifdef __cplusplus
}
#endif

#endif
