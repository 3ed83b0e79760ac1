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
struct moe_optim_scalars; /* core/optim_update.h */

struct moe_backend_ops {
    const char *name;
    moe_status_t (*context_init)(moe_context_t *ctx);
    void (*context_fini)(moe_context_t *ctx);

    /* alloc, free, memset_zero, copy, sync (backend/memory.h) */
    moe_memory_ops_t mem;

    /* optional (NULL: nothing to do): the backend's per-layer state in s->impl, made once the
     * layer's config, parameters and host arrays exist, and released before the layer is freed.
     * layer_init may refuse a config the backend cannot serve (NOT_SUPPORTED). */
    moe_status_t (*layer_init)(moe_context_t *ctx, moe_layer_state_t *s);
    void (*layer_fini)(moe_context_t *ctx, moe_layer_state_t *s);

    /* *num_bad = count of NaN/Inf among n floats of x (host value on return) */
    moe_status_t (*count_nonfinite)(moe_context_t *ctx, const void *x, int64_t n,
                                    int64_t *num_bad, void *stream);
    /* optional: the same for n values of x stored in dtype (used instead when not NULL) */
    moe_status_t (*count_nonfinite_typed)(moe_context_t *ctx, const void *x, moe_dtype_t dtype,
                                          int64_t n, int64_t *num_bad, void *stream);

    /* forward ops, in call order */
    moe_status_t (*gate_fwd)(moe_context_t *ctx, moe_layer_state_t *s, void *stream);
    moe_status_t (*route)(moe_context_t *ctx, moe_layer_state_t *s, void *stream);
    moe_status_t (*permute)(moe_context_t *ctx, moe_layer_state_t *s, void *stream);
    moe_status_t (*ffn_fwd)(moe_context_t *ctx, moe_layer_state_t *s, void *stream);
    moe_status_t (*combine_fwd)(moe_context_t *ctx, moe_layer_state_t *s, void *y, void *stream);

    /* backward ops, in call order */
    moe_status_t (*combine_bwd)(moe_context_t *ctx, moe_layer_state_t *s, const void *dy,
                                void *stream);
    moe_status_t (*ffn_bwd)(moe_context_t *ctx, moe_layer_state_t *s, void *stream);
    moe_status_t (*unpermute_bwd)(moe_context_t *ctx, moe_layer_state_t *s, void *dx,
                                  void *stream);
    moe_status_t (*gate_bwd)(moe_context_t *ctx, moe_layer_state_t *s, void *dx, void *stream);

    /* optional (NULL: no optimizer on this backend): one optimizer step over n f32 elements in
     * backend memory, the per-element bodies of core/optim_update.h; adam selects Adam/AdamW,
     * else SGD (m is the momentum buffer, or NULL; v unused) */
    moe_status_t (*optim_update)(moe_context_t *ctx, int adam, float *w, const float *g, float *m,
                                 float *v, int64_t n, const struct moe_optim_scalars *c,
                                 void *stream);
};

extern const moe_backend_ops_t moe_cpu_backend;
#ifdef MOE_WITH_CUDA
extern const moe_backend_ops_t moe_cuda_backend;
#endif

#ifdef __cplusplus
}
#endif

#endif
