/* context.c - moe_context_*: one backend on one device. */
#include <stdlib.h>

#include "backend/backend.h"
#include "comm/comm.h"
#include "context.h"
#include "core/status.h"

moe_status_t moe_context_create(moe_context_t **ctx, moe_backend_t backend, int device,
                                moe_comm_t *comm) {
    MOE_ARG(ctx != NULL, "ctx is NULL");
    *ctx = NULL;
    const moe_backend_ops_t *ops = NULL;
    switch (backend) {
    case MOE_BACKEND_CPU: ops = &moe_cpu_backend; break;
    case MOE_BACKEND_CUDA:
#ifdef MOE_WITH_CUDA
        ops = &moe_cuda_backend;
        break;
#else
        return MOE_ERR(MOE_STATUS_NOT_SUPPORTED,
                       "backend MOE_BACKEND_CUDA: this libmoe was built without CUDA");
#endif
    default: return MOE_ERR(MOE_STATUS_INVALID_ARGUMENT, "backend %d is not a moe_backend_t",
                            (int)backend);
    }
    MOE_ARG(device >= 0, "device %d is negative", device);
    if (comm != NULL) {
        MOE_ARG(comm->magic == MOE_COMM_MAGIC, "comm is not a live moe_comm_t");
        if (comm->kind == MOE_COMM_KIND_MPI && backend != MOE_BACKEND_CPU)
            return MOE_ERR(MOE_STATUS_NOT_SUPPORTED,
                           "an MPI communicator moves host buffers: use MOE_BACKEND_CPU (NCCL "
                           "for CUDA)");
        if (comm->kind == MOE_COMM_KIND_NCCL && backend != MOE_BACKEND_CUDA)
            return MOE_ERR(MOE_STATUS_NOT_SUPPORTED,
                           "an NCCL communicator needs MOE_BACKEND_CUDA");
    }
    moe_context_t *c = (moe_context_t *)calloc(1, sizeof *c);
    if (!c) return MOE_ERR(MOE_STATUS_ALLOC_FAILED, "context");
    c->magic = MOE_CONTEXT_MAGIC;
    c->backend = backend;
    c->device = device;
    c->ops = ops;
    c->mem = (moe_memory_t){.ops = &ops->mem, .ctx = c};
    c->comm = comm;
    c->rank = comm ? comm->rank : 0;
    c->world = comm ? comm->size : 1;
    moe_status_t st = ops->context_init(c);
    if (st != MOE_STATUS_SUCCESS) {
        free(c);
        return st;
    }
    if (comm) comm->num_contexts++;
    *ctx = c;
    return MOE_STATUS_SUCCESS;
}

moe_status_t moe_context_destroy(moe_context_t *ctx) {
    if (!ctx) return MOE_STATUS_SUCCESS;
    MOE_ARG(ctx->magic == MOE_CONTEXT_MAGIC, "ctx is not a live moe_context_t");
    MOE_ARG(ctx->num_layers == 0, "ctx still has %lld layers: destroy them first",
            (long long)ctx->num_layers);
    ctx->ops->context_fini(ctx);
    if (ctx->comm) ctx->comm->num_contexts--;
    ctx->magic = 0;
    free(ctx);
    return MOE_STATUS_SUCCESS;
}

moe_backend_t moe_context_backend(const moe_context_t *ctx) {
    return ctx && ctx->magic == MOE_CONTEXT_MAGIC ? ctx->backend : MOE_BACKEND_CPU;
}
