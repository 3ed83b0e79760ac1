/* replay.c - reads a routing trace (docs/trace.md, include/moe/trace_format.h) for moe_bench --replay:
 * per recorded step the tokens' expert indices and gate weights, which the ranks split and force
 * with moe_layer_force_routing. The per-expert counts of the records are skipped: the replayed
 * forward recomputes them. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "bench.h"
#include "moe/trace_format.h"

void bench_replay_free(bench_replay_t *r) {
    for (int64_t i = 0; i < r->num_steps; ++i) free(r->index[i]), free(r->gate_w[i]);
    free(r->index), free(r->gate_w), free(r->tokens);
    memset(r, 0, sizeof *r);
}

int bench_replay_read(const char *path, bench_replay_t *r) {
    memset(r, 0, sizeof *r);
    FILE *f = fopen(path, "rb");
    if (!f) {
        fprintf(stderr, "moe_bench: --replay: cannot open '%s'\n", path);
        return -1;
    }
    moe_trace_header_t h;
    if (fread(&h, sizeof h, 1, f) != 1 || memcmp(h.magic, MOE_TRACE_MAGIC, 8) != 0) {
        fprintf(stderr, "moe_bench: --replay: '%s' is not a libmoe routing trace\n", path);
        fclose(f);
        return -1;
    }
    if (h.version != MOE_TRACE_VERSION || h.header_bytes != sizeof h || h.num_experts < 1 ||
        h.top_k < 1 || h.top_k > h.num_experts || h.routing_width < 1 ||
        h.routing_width > h.num_experts) {
        fprintf(stderr, "moe_bench: --replay: '%s' has trace version %u (this tool reads %u) or a "
                        "damaged header\n", path, h.version, MOE_TRACE_VERSION);
        fclose(f);
        return -1;
    }
    r->num_experts = h.num_experts, r->top_k = h.top_k, r->d_model = h.d_model, r->d_ff = h.d_ff;
    r->width = h.routing_width, r->router = h.router;
    r->activation = h.activation, r->gate = h.gate, r->priority = h.priority, r->world = h.world;
    r->capacity_factor = h.capacity_factor;
    int64_t cap = 0;
    const size_t skip_counts = 2 * (size_t)h.num_experts * sizeof(int64_t);
    for (;;) {
        moe_trace_record_t rec;
        if (fread(&rec, sizeof rec, 1, f) != 1) break;
        if (rec.magic != MOE_TRACE_RECORD_MAGIC || rec.num_tokens < 0 || rec.width != h.routing_width) {
            fprintf(stderr, "moe_bench: --replay: record %lld of '%s' is damaged\n",
                    (long long)r->num_steps, path);
            goto fail;
        }
        if (r->num_steps == cap) {
            cap = cap ? 2 * cap : 16;
            int64_t *t = realloc(r->tokens, (size_t)cap * sizeof *t);
            if (t) r->tokens = t;
            int32_t **ix = realloc(r->index, (size_t)cap * sizeof *ix);
            if (ix) r->index = ix;
            float **g = realloc(r->gate_w, (size_t)cap * sizeof *g);
            if (g) r->gate_w = g;
            if (!t || !ix || !g) goto oom;
        }
        const size_t n = (size_t)(rec.num_tokens * rec.width);
        int32_t *idx = malloc((n + 1) * sizeof *idx);
        float *gw = malloc((n + 1) * sizeof *gw);
        r->index[r->num_steps] = idx, r->gate_w[r->num_steps] = gw;
        r->tokens[r->num_steps] = rec.num_tokens;
        r->num_steps++;
        if (!idx || !gw) goto oom;
        if (fread(idx, sizeof *idx, n, f) != n || fread(gw, sizeof *gw, n, f) != n ||
            fseek(f, (long)(n + skip_counts), SEEK_CUR) != 0) {
            fprintf(stderr, "moe_bench: --replay: record %lld of '%s' is truncated\n",
                    (long long)r->num_steps - 1, path);
            goto fail;
        }
        for (size_t i = 0; i < n; ++i)
            if (idx[i] < 0 || idx[i] >= h.num_experts) {
                fprintf(stderr, "moe_bench: --replay: record %lld of '%s' names expert %d\n",
                        (long long)r->num_steps - 1, path, idx[i]);
                goto fail;
            }
    }
    fclose(f);
    if (r->num_steps == 0) {
        fprintf(stderr, "moe_bench: --replay: '%s' holds no records\n", path);
        return -1;
    }
    return 0;
oom:
    fprintf(stderr, "moe_bench: --replay: out of host memory\n");
fail:
    fclose(f);
    bench_replay_free(r);
    return -1;
}
