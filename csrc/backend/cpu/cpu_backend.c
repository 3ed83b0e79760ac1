/* cpu_backend.c - the CPU backend: the reference every CUDA kernel is tested against. Host
 * memory, no streams, and the table of its ops (one file per op family, see cpu.h). */
#define _POSIX_C_SOURCE 200112L

#include <stdlib.h>
#include <string.h>

#include "backend/backend.h"
#include "backend/cpu/cpu.h"
#include "context.h"
#include "core/status.h"

static moe_status_t cpu_context_init(moe_context_t *ctx) {
    ctx->impl = NULL;
    return MOE_STATUS_SUCCESS;
}

static void cpu_context_fini(moe_context_t *ctx) { (void)ctx; }

static moe_status_t cpu_alloc(moe_context_t *ctx, void **ptr, size_t bytes) {
    (void)ctx;
    *ptr = NULL;
    if (bytes == 0) return MOE_STATUS_SUCCESS;
    if (posix_memalign(ptr, 64, bytes) != 0) {
        *ptr = NULL;
        return MOE_ERR(MOE_STATUS_ALLOC_FAILED, "host allocation of %zu bytes failed", bytes);
    }
    return MOE_STATUS_SUCCESS;
}

static void cpu_free(moe_context_t *ctx, void *ptr) {
    (void)ctx;
    free(ptr);
}

static moe_status_t cpu_memset_zero(moe_context_t *ctx, void *ptr, size_t bytes, void *stream) {
    (void)ctx, (void)stream;
    if (bytes) memset(ptr, 0, bytes);
    return MOE_STATUS_SUCCESS;
}

static moe_status_t cpu_copy(moe_context_t *ctx, void *dst, const void *src, size_t bytes,
                             moe_copy_kind_t kind, void *stream) {
    (void)ctx, (void)kind, (void)stream;
    if (bytes && dst != src) memcpy(dst, src, bytes);
    return MOE_STATUS_SUCCESS;
}

static moe_status_t cpu_sync(moe_context_t *ctx, void *stream) {
    (void)ctx, (void)stream;
    return MOE_STATUS_SUCCESS;
}

const moe_backend_ops_t moe_cpu_backend = {
    .name = "cpu",
    .context_init = cpu_context_init,
    .context_fini = cpu_context_fini,
    .mem = {.alloc = cpu_alloc,
            .free = cpu_free,
            .memset_zero = cpu_memset_zero,
            .copy = cpu_copy,
            .sync = cpu_sync},
    .count_nonfinite = moe__cpu_count_nonfinite,
    .gate_fwd = moe__cpu_gate_fwd,
    .route = moe__cpu_route,
    .permute = moe__cpu_permute,
    .ffn_fwd = moe__cpu_ffn_fwd,
    .combine_fwd = moe__cpu_combine_fwd,
    .combine_bwd = moe__cpu_combine_bwd,
    .ffn_bwd = moe__cpu_ffn_bwd,
    .unpermute_bwd = moe__cpu_unpermute_bwd,
    .gate_bwd = moe__cpu_gate_bwd,
    .shared_fwd = moe__cpu_shared_fwd,
    .shared_combine_bwd = moe__cpu_shared_combine_bwd,
    .shared_bwd = moe__cpu_shared_bwd,
    .experts_out_fwd = moe__cpu_experts_out_fwd,
    .experts_out_bwd = moe__cpu_experts_out_bwd,
    .optim_update = moe__cpu_optim_update,
    .gate_hier_fwd = moe__cpu_gate_hier_fwd,
    .gate_hier_bwd = moe__cpu_gate_hier_bwd,
};
