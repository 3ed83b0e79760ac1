/* trace.c - routing traces: the writer behind moe_layer_trace_open, and forced routing for
 * replay (moe_layer_force_routing). */
#define _POSIX_C_SOURCE 200809L

#include <math.h>
#include <stdio.h>
#include <unistd.h>
#include <stdlib.h>
#include <string.h>

#include "backend/backend.h"
#include "core/check_io.h"
#include "core/status.h"
#include "buffers.h"
#include "handle.h"
#include "moe/trace_format.h"
#include "router/router.h"
#include "trace.h"

moe_status_t moe_layer_trace_open(moe_layer_t *layer, const char *path, uint32_t layer_id) {
    MOE_LAYER_ARG(layer);
    MOE_ARG(path != NULL, "path is NULL");
    MOE_CHECK(moe_layer_trace_close(layer));
    FILE *f = fopen(path, "wb");
    MOE_IO_CHECK(f != NULL, "cannot open trace file '%s'", path);
    /* unbuffered: each record goes to the file in the forward that made it, so a write that
     * fails (full disk) fails that forward, never a later one that happens to flush */
    setvbuf(f, NULL, _IONBF, 0);
    const moe_layer_config_t *c = &layer->s.cfg;
    moe_trace_header_t h;
    memset(&h, 0, sizeof h);
    memcpy(h.magic, MOE_TRACE_MAGIC, 8);
    h.version = MOE_TRACE_VERSION;
    h.header_bytes = (uint32_t)sizeof h;
    h.num_experts = c->num_experts;
    h.top_k = c->top_k;
    h.d_model = c->d_model;
    h.d_ff = c->d_ff;
    h.activation = (int32_t)c->activation;
    h.gate = (int32_t)c->gate;
    h.priority = (int32_t)c->priority;
    h.world = layer->ctx->world;
    h.rank = layer->ctx->rank;
    h.layer_id = layer_id;
    h.capacity_factor = c->capacity_factor;
    h.router = (int32_t)c->router;
    h.routing_width = layer->s.K;
    if (fwrite(&h, sizeof h, 1, f) != 1) {
        moe_status_t st = MOE_IO_ERR("cannot write trace header to '%s'", path);
        fclose(f);
        return st;
    }
    layer->trace = f;
    layer->trace_layer_id = layer_id;
    layer->trace_step = 0;
    return MOE_STATUS_SUCCESS;
}

moe_status_t moe_layer_trace_close(moe_layer_t *layer) {
    MOE_LAYER_ARG(layer);
    if (!layer->trace) return MOE_STATUS_SUCCESS;
    int ok = fclose(layer->trace) == 0;
    layer->trace = NULL;
    MOE_IO_CHECK(ok, "closing the trace file failed");
    return MOE_STATUS_SUCCESS;
}

/* One record in one buffer, written with one fwrite. A write that fails loses this record
 * only: the file is cut back to where the record began (where the file system allows), so the
 * file stays a valid trace of the records written so far and later records can follow (their
 * step numbers show the gap). */
moe_status_t moe__trace_write(moe_layer_t *L) {
    moe_layer_state_t *s = &L->s;
    const int64_t T = s->T, K = s->K, E = s->E;
    const size_t n = (size_t)(T * K);
    moe_trace_record_t r = {MOE_TRACE_RECORD_MAGIC, L->trace_layer_id, L->trace_step, T, K};
    const size_t bytes = sizeof r + n * (sizeof(int32_t) + sizeof(float) + 1) +
                         2 * (size_t)E * sizeof(int64_t);
    char *buf = (char *)malloc(bytes);
    int32_t *kept = (int32_t *)malloc((n + 1) * sizeof(int32_t));
    moe_status_t st = MOE_STATUS_SUCCESS;
    if (!buf || !kept) st = MOE_ERR(MOE_STATUS_ALLOC_FAILED, "trace record of %zu bytes", bytes);
    char *idx = buf ? buf + sizeof r : NULL, *gate = idx ? idx + n * sizeof(int32_t) : NULL;
    char *kept8 = gate ? gate + n * sizeof(float) : NULL;
    if (st == MOE_STATUS_SUCCESS)
        st = moe__buffers_read_routing(L, (int32_t *)(void *)idx, (float *)(void *)gate, kept);
    if (st == MOE_STATUS_SUCCESS) {
        memcpy(buf, &r, sizeof r);
        for (size_t i = 0; i < n; ++i) kept8[i] = (char)(uint8_t)kept[i];
        char *tail = kept8 + n;
        memcpy(tail, s->counts_h, (size_t)E * sizeof(int64_t));
        memcpy(tail + (size_t)E * sizeof(int64_t), s->dropped_h, (size_t)E * sizeof(int64_t));
        FILE *f = (FILE *)L->trace;
        long pos = ftell(f);
        if (fwrite(buf, 1, bytes, f) != bytes) {
            st = MOE_IO_ERR("writing trace record %lld (%zu bytes) failed: the record is lost",
                            (long long)L->trace_step, bytes);
            clearerr(f);
            if (pos >= 0) {
                if (ftruncate(fileno(f), (off_t)pos) != 0) { /* e.g. not a regular file */
                }
                fseek(f, pos, SEEK_SET);
            }
        }
    }
    free(buf), free(kept);
    L->trace_step++;
    return st;
}

moe_status_t moe_layer_force_routing(moe_layer_t *layer, const int32_t *expert_index,
                                     const float *gate, int64_t num_tokens) {
    MOE_LAYER_ARG(layer);
    if (expert_index == NULL && gate == NULL && num_tokens == 0) {
        /* cancel: the next forward routes normally */
        free(layer->forced_idx), free(layer->forced_gate);
        layer->forced_idx = NULL, layer->forced_gate = NULL;
        layer->forced_T = 0;
        return MOE_STATUS_SUCCESS;
    }
    MOE_ARG(num_tokens >= 0, "num_tokens %lld is negative", (long long)num_tokens);
    MOE_ARG(num_tokens == 0 || (expert_index != NULL && gate != NULL),
            "expert_index and gate must not be NULL");
    if (layer->s.G) /* the two levels' sums would not follow from a forced assignment */
        return MOE_ERR(MOE_STATUS_NOT_SUPPORTED,
                       "forced routing: not available for router = MOE_ROUTER_HIERARCHICAL");
    const int64_t K = layer->s.K, E = layer->s.E, n = num_tokens * K;
    for (int64_t t = 0; t < num_tokens; ++t)
        for (int64_t j = 0; j < K; ++j) {
            int32_t e = expert_index[t * K + j];
            MOE_ARG(e >= 0 && e < E, "expert_index[%lld][%lld] = %d is not in [0, %lld)",
                    (long long)t, (long long)j, e, (long long)E);
            for (int64_t i = 0; i < j; ++i)
                MOE_ARG(expert_index[t * K + i] != e, "token %lld names expert %d twice",
                        (long long)t, e);
            MOE_ARG(isfinite(gate[t * K + j]), "gate[%lld][%lld] is not finite", (long long)t,
                    (long long)j);
        }
    int32_t *idx = (int32_t *)malloc((size_t)(n + 1) * sizeof(int32_t));
    float *g = (float *)malloc((size_t)(n + 1) * sizeof(float));
    if (!idx || !g) {
        free(idx), free(g);
        return MOE_ERR(MOE_STATUS_ALLOC_FAILED, "forced routing of %lld tokens",
                       (long long)num_tokens);
    }
    if (n) {
        memcpy(idx, expert_index, (size_t)n * sizeof(int32_t));
        memcpy(g, gate, (size_t)n * sizeof(float));
    }
    free(layer->forced_idx), free(layer->forced_gate);
    layer->forced_idx = idx;
    layer->forced_gate = g;
    layer->forced_T = num_tokens;
    return MOE_STATUS_SUCCESS;
}

/* Puts the forced routing into the state in place of the router's choice (after the gate
 * pass, before slot assignment), with the per-expert sums that follow from it. */
moe_status_t moe__apply_forced_routing(moe_layer_t *L, void *stream) {
    moe_layer_state_t *s = &L->s;
    moe_context_t *ctx = L->ctx;
    const int64_t T = s->T, K = s->K, K1 = s->K1, E = s->E;
    int32_t *idx1 = (int32_t *)malloc((size_t)(T * K1 + 1) * sizeof(int32_t));
    if (!idx1) return MOE_ERR(MOE_STATUS_ALLOC_FAILED, "forced routing staging");
    for (int64_t e = 0; e < E; ++e) {
        s->counts_h[e] = 0;
        s->importance_h[e] = 0.0;
    }
    for (int64_t t = 0; t < T; ++t) {
        const int32_t *src = L->forced_idx + t * K;
        for (int64_t j = 0; j < K; ++j) {
            idx1[t * K1 + j] = src[j];
            s->counts_h[src[j]]++;
            s->importance_h[src[j]] += L->forced_gate[t * K + j];
        }
        if (K1 > K) { /* the load estimator's threshold slot: the first expert not chosen */
            int32_t e = 0;
            while (moe_router_selected(src, (int)K, e)) ++e;
            idx1[t * K1 + K] = e;
        }
    }
    for (int64_t e = 0; e < E; ++e) s->load_h[e] = (double)s->counts_h[e];
    moe_status_t st = ctx->ops->mem.copy(ctx, s->idx, idx1, (size_t)(T * K1) * sizeof(int32_t),
                                         MOE_COPY_H2D, stream);
    if (st == MOE_STATUS_SUCCESS)
        st = ctx->ops->mem.copy(ctx, s->gate, L->forced_gate, (size_t)(T * K) * sizeof(float),
                                MOE_COPY_H2D, stream);
    if (st == MOE_STATUS_SUCCESS) st = ctx->ops->mem.sync(ctx, stream);
    free(idx1);
    return st;
}
