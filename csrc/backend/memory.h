/* memory.h - the memory interface of a backend: where buffers live and how bytes move between
 * them. Everything a communicator may see of a backend. */
#ifndef MOE_BACKEND_MEMORY_H
#define MOE_BACKEND_MEMORY_H

#include <stddef.h>

#include "moe/moe.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef enum moe_copy_kind {
    MOE_COPY_H2D = 0, /* host -> backend memory */
    MOE_COPY_D2H = 1, /* backend memory -> host */
    MOE_COPY_D2D = 2  /* within backend memory */
} moe_copy_kind_t;

/* Every call acts in the memory of the context's backend (host memory for the CPU backend,
 * the context's device for CUDA) and enqueues on `stream` where the backend has streams. */
typedef struct moe_memory_ops {
    moe_status_t (*alloc)(moe_context_t *ctx, void **ptr, size_t bytes);
    void (*free)(moe_context_t *ctx, void *ptr);
    moe_status_t (*memset_zero)(moe_context_t *ctx, void *ptr, size_t bytes, void *stream);
    moe_status_t (*copy)(moe_context_t *ctx, void *dst, const void *src, size_t bytes,
                         moe_copy_kind_t kind, void *stream);
    /* waits until everything enqueued on stream is done */
    moe_status_t (*sync)(moe_context_t *ctx, void *stream);
} moe_memory_ops_t;

/* one backend's memory as a communicator sees it: the calls and the context they act in */
typedef struct moe_memory {
    const moe_memory_ops_t *ops;
    moe_context_t *ctx;
} moe_memory_t;

static inline moe_status_t moe_memory_copy(const moe_memory_t *m, void *dst, const void *src,
                                           size_t bytes, moe_copy_kind_t kind, void *stream) {
    return m->ops->copy(m->ctx, dst, src, bytes, kind, stream);
}

static inline moe_status_t moe_memory_sync(const moe_memory_t *m, void *stream) {
    return m->ops->sync(m->ctx, stream);
}

#ifdef __cplusplus
}
#endif

#endif
