/* trace_read.c - the checked reader of routing traces (trace_read.h). */
#define _POSIX_C_SOURCE 200809L

#include "trace_read.h"

#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

static int fail(char *err, size_t n, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    if (err && n) vsnprintf(err, n, fmt, ap);
    va_end(ap);
    return -1;
}

void trace_file_free(trace_file_t *t) {
    for (int64_t i = 0; i < t->n; ++i) {
        trace_record_t *r = &t->rec[i];
        free(r->idx), free(r->gate), free(r->kept), free(r->counts), free(r->dropped);
    }
    free(t->rec);
    memset(t, 0, sizeof *t);
}

static int check_header(const moe_trace_header_t *h, char *err, size_t n) {
    if (memcmp(h->magic, MOE_TRACE_MAGIC, 8) != 0)
        return fail(err, n, "not a libmoe routing trace (magic)");
    if (h->version != MOE_TRACE_VERSION)
        return fail(err, n, "trace version %u; this reader reads version %u", h->version,
                    MOE_TRACE_VERSION);
    if (h->header_bytes != sizeof *h)
        return fail(err, n, "header_bytes %u is not %zu", h->header_bytes, sizeof *h);
    if (h->num_experts < 1 || h->num_experts > 65536)
        return fail(err, n, "num_experts %lld is not in [1, 65536]", (long long)h->num_experts);
    if (h->top_k < 1 || h->top_k > h->num_experts)
        return fail(err, n, "top_k %lld is not in [1, num_experts]", (long long)h->top_k);
    if (h->d_model < 1 || h->d_model > (1 << 20) || h->d_ff < 1 || h->d_ff > (1 << 22))
        return fail(err, n, "d_model %lld or d_ff %lld out of range", (long long)h->d_model,
                    (long long)h->d_ff);
    if (h->activation < MOE_ACTIVATION_RELU || h->activation > MOE_ACTIVATION_SWIGLU ||
        (h->gate != MOE_GATE_SOFTMAX_OF_TOPK && h->gate != MOE_GATE_TOPK_OF_SOFTMAX) ||
        (h->priority != MOE_PRIORITY_POSITION && h->priority != MOE_PRIORITY_SCORE))
        return fail(err, n, "activation %d, gate %d or priority %d is not a value of its enum",
                    h->activation, h->gate, h->priority);
    if (h->router != MOE_ROUTER_TOKEN_CHOICE && h->router != MOE_ROUTER_EXPERT_CHOICE)
        return fail(err, n, "router %d is not a moe_router_type_t", h->router);
    int64_t want_w = h->router == MOE_ROUTER_EXPERT_CHOICE ? h->num_experts : h->top_k;
    if (h->routing_width != want_w)
        return fail(err, n, "routing_width %lld, expected %lld for this router and top_k",
                    (long long)h->routing_width, (long long)want_w);
    if (h->world < 1 || h->rank < 0 || h->rank >= h->world)
        return fail(err, n, "rank %d of world %d", h->rank, h->world);
    if (!isfinite(h->capacity_factor)) return fail(err, n, "capacity_factor is not finite");
    if (h->reserved != 0) return fail(err, n, "reserved field is %d, not 0", h->reserved);
    return 0;
}

/* checks the body of record i already read into r */
static int check_body(const moe_trace_header_t *h, const trace_record_t *r, int64_t i,
                      int64_t *stamp, int64_t *stamp_next, char *err, size_t n) {
    const int64_t T = r->r.num_tokens, W = r->r.width, E = h->num_experts;
    for (int64_t t = 0; t < T; ++t) {
        const int64_t s = ++*stamp_next;
        for (int64_t j = 0; j < W; ++j) {
            const int64_t k = t * W + j;
            const int32_t e = r->idx[k];
            if (e < 0 || e >= E)
                return fail(err, n, "record %lld token %lld names expert %d (E = %lld)",
                            (long long)i, (long long)t, e, (long long)E);
            if (stamp[e] == s)
                return fail(err, n, "record %lld token %lld names expert %d twice",
                            (long long)i, (long long)t, e);
            stamp[e] = s;
            if (!isfinite(r->gate[k]))
                return fail(err, n, "record %lld: gate of token %lld is not finite",
                            (long long)i, (long long)t);
            if (r->kept[k] > 1)
                return fail(err, n, "record %lld: kept flag %u is not 0 or 1", (long long)i,
                            r->kept[k]);
        }
    }
    for (int64_t e = 0; e < E; ++e)
        if (r->counts[e] < 0 || r->counts[e] > INT64_MAX / E || r->dropped[e] < 0 ||
            r->dropped[e] > r->counts[e])
            return fail(err, n, "record %lld: expert %lld has count %lld, dropped %lld",
                        (long long)i, (long long)e, (long long)r->counts[e],
                        (long long)r->dropped[e]);
    return 0;
}

static int read_all(FILE *f, void *p, size_t size, size_t count) {
    return count == 0 || fread(p, size, count, f) == count;
}

int trace_file_read(const char *path, trace_file_t *t, char *err, size_t err_len) {
    memset(t, 0, sizeof *t);
    FILE *f = fopen(path, "rb");
    if (!f) return fail(err, err_len, "cannot open '%s'", path);
    struct stat sb;
    if (fstat(fileno(f), &sb) != 0 || !S_ISREG(sb.st_mode)) {
        fclose(f);
        return fail(err, err_len, "'%s' is not a regular file", path);
    }
    const int64_t size = (int64_t)sb.st_size;
    int64_t pos = (int64_t)sizeof(moe_trace_header_t);
    int rc = 0;
    int64_t *stamp = NULL, stamp_next = 0, cap = 0, last_step = -1;
    if (size < pos || fread(&t->h, sizeof t->h, 1, f) != 1) {
        rc = fail(err, err_len, "'%s' is shorter than a trace header", path);
        goto done;
    }
    if (check_header(&t->h, err, err_len) != 0) {
        rc = -1;
        goto done;
    }
    const int64_t E = t->h.num_experts, W = t->h.routing_width;
    const int64_t tail = 2 * E * (int64_t)sizeof(int64_t); /* counts and drops */
    stamp = (int64_t *)calloc((size_t)E, sizeof *stamp);
    if (!stamp) {
        rc = fail(err, err_len, "out of host memory");
        goto done;
    }
    while (pos < size) {
        const int64_t left = size - pos;
        trace_record_t r;
        memset(&r, 0, sizeof r);
        if (left < (int64_t)sizeof r.r) {
            rc = fail(err, err_len, "%lld bytes after record %lld: cut inside a record header",
                      (long long)left, (long long)t->n);
            goto done;
        }
        if (fread(&r.r, sizeof r.r, 1, f) != 1) {
            rc = fail(err, err_len, "read error at record %lld", (long long)t->n);
            goto done;
        }
        const int64_t body_left = left - (int64_t)sizeof r.r;
        if (r.r.magic != MOE_TRACE_RECORD_MAGIC || r.r.layer_id != t->h.layer_id) {
            rc = fail(err, err_len, "record %lld: bad magic or layer id (damaged, or bytes "
                      "after the last record)", (long long)t->n);
            goto done;
        }
        if (r.r.width != W || r.r.num_tokens < 0 || r.r.step <= last_step) {
            rc = fail(err, err_len, "record %lld: width %lld (header %lld), tokens %lld or step "
                      "%lld (after %lld) out of range", (long long)t->n, (long long)r.r.width,
                      (long long)W, (long long)r.r.num_tokens, (long long)r.r.step,
                      (long long)last_step);
            goto done;
        }
        /* T * W * 9 + tail <= body_left, without forming the product first */
        if (body_left < tail || r.r.num_tokens > (body_left - tail) / (9 * W)) {
            rc = fail(err, err_len, "record %lld claims %lld tokens, more than the %lld bytes "
                      "left in the file hold (cut inside the record, or damaged)",
                      (long long)t->n, (long long)r.r.num_tokens, (long long)body_left);
            goto done;
        }
        const size_t n = (size_t)(r.r.num_tokens * W);
        r.idx = (int32_t *)malloc((n + 1) * sizeof(int32_t));
        r.gate = (float *)malloc((n + 1) * sizeof(float));
        r.kept = (uint8_t *)malloc(n + 1);
        r.counts = (int64_t *)malloc((size_t)E * sizeof(int64_t));
        r.dropped = (int64_t *)malloc((size_t)E * sizeof(int64_t));
        if (t->n == cap) {
            int64_t c2 = cap ? 2 * cap : 16;
            trace_record_t *g = (trace_record_t *)realloc(t->rec, (size_t)c2 * sizeof *g);
            if (g) t->rec = g, cap = c2;
        }
        int ok = r.idx && r.gate && r.kept && r.counts && r.dropped && t->n < cap;
        if (!ok) {
            free(r.idx), free(r.gate), free(r.kept), free(r.counts), free(r.dropped);
            rc = fail(err, err_len, "out of host memory at record %lld", (long long)t->n);
            goto done;
        }
        t->rec[t->n++] = r;
        if (!read_all(f, r.idx, sizeof(int32_t), n) || !read_all(f, r.gate, sizeof(float), n) ||
            !read_all(f, r.kept, 1, n) || !read_all(f, r.counts, sizeof(int64_t), (size_t)E) ||
            !read_all(f, r.dropped, sizeof(int64_t), (size_t)E)) {
            rc = fail(err, err_len, "read error in record %lld", (long long)t->n - 1);
            goto done;
        }
        if (check_body(&t->h, &r, t->n - 1, stamp, &stamp_next, err, err_len) != 0) {
            rc = -1;
            goto done;
        }
        pos += (int64_t)sizeof r.r + 9 * (int64_t)n + tail;
        last_step = r.r.step;
    }
done:
    free(stamp);
    fclose(f);
    if (rc != 0) trace_file_free(t);
    return rc;
}

int trace_file_check_layer(const trace_file_t *t, const moe_layer_t *layer, char *err,
                           size_t err_len) {
    moe_layer_config_t c;
    if (moe_layer_get_config(layer, &c) != MOE_STATUS_SUCCESS)
        return fail(err, err_len, "%s", moe_last_error());
    const int64_t w = moe_layer_routing_width(layer);
    if (c.num_experts != t->h.num_experts || w != t->h.routing_width)
        return fail(err, err_len, "the trace has E %lld and routing width %lld, the layer E "
                    "%lld and width %lld", (long long)t->h.num_experts,
                    (long long)t->h.routing_width, (long long)c.num_experts, (long long)w);
    return 0;
}
