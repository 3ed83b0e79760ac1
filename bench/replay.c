/* replay.c - a routing trace (docs/trace.md, include/moe/trace_format.h) for moe_bench --replay:
 * per recorded step the tokens' expert indices and gate weights, which the ranks split and force
 * with moe_layer_force_routing. The file is read and checked by the shared reader
 * (trace_read.c); the per-expert counts of the records are dropped: the replayed forward
 * recomputes them. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "bench.h"
#include "trace_read.h"

void bench_replay_free(bench_replay_t *r) {
    for (int64_t i = 0; i < r->num_steps; ++i) free(r->index[i]), free(r->gate_w[i]);
    free(r->index), free(r->gate_w), free(r->tokens);
    memset(r, 0, sizeof *r);
}

int bench_replay_read(const char *path, bench_replay_t *r) {
    memset(r, 0, sizeof *r);
    trace_file_t t;
    char err[512];
    if (trace_file_read(path, &t, err, sizeof err) != 0) {
        fprintf(stderr, "moe_bench: --replay: '%s': %s\n", path, err);
        return -1;
    }
    if (t.n == 0) {
        fprintf(stderr, "moe_bench: --replay: '%s' holds no records\n", path);
        trace_file_free(&t);
        return -1;
    }
    const moe_trace_header_t *h = &t.h;
    r->num_experts = h->num_experts, r->top_k = h->top_k, r->d_model = h->d_model;
    r->d_ff = h->d_ff, r->width = h->routing_width, r->router = h->router;
    r->activation = h->activation, r->gate = h->gate, r->priority = h->priority;
    r->world = h->world, r->capacity_factor = h->capacity_factor;
    r->tokens = malloc((size_t)t.n * sizeof *r->tokens);
    r->index = calloc((size_t)t.n, sizeof *r->index);
    r->gate_w = calloc((size_t)t.n, sizeof *r->gate_w);
    if (!r->tokens || !r->index || !r->gate_w) {
        fprintf(stderr, "moe_bench: --replay: out of host memory\n");
        free(r->tokens), free(r->index), free(r->gate_w);
        memset(r, 0, sizeof *r);
        trace_file_free(&t);
        return -1;
    }
    /* the index and gate arrays move over; the rest of each record is freed with the file */
    r->num_steps = t.n;
    for (int64_t i = 0; i < t.n; ++i) {
        r->tokens[i] = t.rec[i].r.num_tokens;
        r->index[i] = t.rec[i].idx, r->gate_w[i] = t.rec[i].gate;
        t.rec[i].idx = NULL, t.rec[i].gate = NULL;
    }
    trace_file_free(&t);
    return 0;
}
