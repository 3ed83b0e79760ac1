/* report.c - the machine-readable outputs of moe_bench: the results as JSON (--json), the
 * timed calls as a Chrome / Perfetto trace (--trace), and the event buffer each rank fills. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "bench.h"
#include "core/dtype.h"

/* JSON has no NaN/Inf: write null for them */
static void num(FILE *f, double v) {
    if (isfinite(v))
        fprintf(f, "%.9g", v);
    else
        fputs("null", f);
}

static void times(FILE *f, const char *name, const bench_times_t *t) {
    fprintf(f, "\"%s\": {\"mean_ms\": ", name);
    num(f, 1e3 * t->mean);
    fputs(", \"median_ms\": ", f);
    num(f, 1e3 * t->median);
    fputs(", \"min_ms\": ", f);
    num(f, 1e3 * t->min);
    fputs(", \"max_ms\": ", f);
    num(f, 1e3 * t->max);
    fputs("}", f);
}

/* strings we write are option values: escape quotes, backslashes and control characters */
static void str(FILE *f, const char *s) {
    fputc('"', f);
    for (; s && *s; ++s) {
        unsigned char c = (unsigned char)*s;
        if (c == '"' || c == '\\')
            fprintf(f, "\\%c", c);
        else if (c < 0x20)
            fprintf(f, "\\u%04x", c);
        else
            fputc(c, f);
    }
    fputc('"', f);
}

int bench_write_json(const char *path, const bench_opts_t *o, const char *backend_text,
                     int ranks, int omp_threads, int blas_threads, const bench_row_t *rows,
                     int nrows, int check_ok) {
    FILE *f = fopen(path, "w");
    if (!f) {
        fprintf(stderr, "moe_bench: cannot open --json file '%s'\n", path);
        return -1;
    }
    const moe_layer_config_t *c = &o->cfg;
    int major, minor, patch;
    moe_get_version(&major, &minor, &patch);
    fprintf(f, "{\n  \"tool\": \"moe_bench\",\n  \"libmoe_version\": \"%d.%d.%d\",\n", major, minor,
            patch);
    fputs("  \"backend\": ", f);
    str(f, backend_text);
    fprintf(f, ",\n  \"device\": %d,\n  \"ranks\": %d,\n", o->device, ranks);
    fprintf(f, "  \"omp_threads\": %d,\n  \"blas_threads\": %d,\n", omp_threads, blas_threads);
    fputs("  \"preset\": ", f);
    str(f, o->preset ? o->preset : "default");
    fprintf(f,
            ",\n  \"config\": {\"d_model\": %lld, \"d_ff\": %lld, \"experts\": %lld, "
            "\"top_k\": %lld, \"dtype\": \"%s\", \"activation\": \"%s\", \"gate\": \"%s\", "
            "\"renormalize\": %d, \"noisy\": %d, \"capacity_factor\": ",
            (long long)c->d_model, (long long)c->d_ff, (long long)c->num_experts,
            (long long)c->top_k, moe_dtype_name(c->dtype), tool_activation_names[c->activation],
            tool_gate_names[c->gate], c->renormalize, c->noisy_gating);
    num(f, c->capacity_factor);
    fprintf(f, ", \"priority\": \"%s\", \"expert_bias\": %d, \"seed\": %llu},\n",
            tool_priority_names[c->priority], c->expert_bias, (unsigned long long)o->seed);
    fputs("  \"routing\": ", f);
    str(f, o->replay_path ? "replay" : o->routing.text);
    if (o->replay_path) {
        fputs(",\n  \"replay\": ", f);
        str(f, o->replay_path);
    }
    fprintf(f, ",\n  \"num_chunks\": %lld", (long long)o->cfg.num_chunks);
    fprintf(f, ",\n  \"mode\": \"%s\",\n  \"warmup\": %d,\n  \"iters\": %d,\n",
            o->mode == BENCH_MODE_FWD ? "fwd" : "fwd-bwd", o->warmup, o->iters);
    fprintf(f, "  \"check\": %s,\n  \"results\": [", o->check ? (check_ok ? "\"OK\"" : "\"FAILED\"")
                                                              : "null");
    double sum_tps = 0.0, sum_tf = 0.0;
    for (int i = 0; i < nrows; ++i) {
        const bench_row_t *r = &rows[i];
        sum_tps += r->tokens_per_s, sum_tf += r->tflops;
        fprintf(f, "%s\n    {\"tokens\": %lld, ", i ? "," : "", (long long)r->tokens);
        times(f, "fwd", &r->fwd);
        fputs(", ", f);
        if (o->mode == BENCH_MODE_FWD_BWD) {
            times(f, "bwd", &r->bwd);
            fputs(", ", f);
        }
        times(f, "total", &r->total);
        fputs(", \"tokens_per_s\": ", f);
        num(f, r->tokens_per_s);
        fputs(", \"expert_flops\": ", f);
        num(f, r->flops);
        fputs(", \"tflops\": ", f);
        num(f, r->tflops);
        fputs(", \"dense_gemm_ms\": ", f);
        if (r->gemm_s >= 0) num(f, 1e3 * r->gemm_s); else fputs("null", f);
        fputs(", \"gemm_fraction\": ", f);
        if (r->gemm_s >= 0) num(f, r->gemm_s / r->total.mean); else fputs("null", f);
        fputs(", \"memcpy_ms\": ", f);
        if (r->mcpy_s >= 0) num(f, 1e3 * r->mcpy_s); else fputs("null", f);
        fputs(", \"activation_bytes\": ", f);
        num(f, r->act_bytes);
        fputs(", \"imbalance\": ", f);
        num(f, r->imbalance);
        fprintf(f, ", \"assignments\": %lld, \"dropped\": %lld, ", (long long)r->assignments,
                (long long)r->dropped);
        fputs("\"phases_ms\": {", f);
        for (int p = 0; p < MOE_PHASE_COUNT; ++p) {
            fprintf(f, "%s\"%s\": ", p ? ", " : "", moe_phase_name((moe_phase_t)p));
            num(f, 1e3 * r->phase_s[p]);
        }
        fputs("}, ", f);
        if (ranks > 1) {
            fputs("\"rank_imbalance\": ", f);
            num(f, r->rank_imbalance);
            fputs(", \"rows_sent_mean\": ", f);
            num(f, r->rows_sent_mean);
            fputs(", \"rows_received_mean\": ", f);
            num(f, r->rows_recv_mean);
            fputs(", \"rows_received_max\": ", f);
            num(f, r->rows_recv_max);
            fputs(", \"alltoall_bytes\": ", f);
            num(f, r->a2a_bytes);
            fputs(", \"alltoall_ms\": ", f);
            num(f, 1e3 * r->a2a_s);
            fputs(", \"algbw_gbps\": ", f);
            num(f, r->algbw);
            fputs(", \"busbw_gbps\": ", f);
            num(f, r->busbw);
            fputs(", \"alltoall_ceiling_ms\": ", f);
            if (r->ceil_s > 0) num(f, 1e3 * r->ceil_s); else fputs("null", f);
            fputs(", \"model_ms\": ", f);
            if (r->model_s > 0) num(f, 1e3 * r->model_s); else fputs("null", f);
            fputs(", \"ranks\": [", f);
            for (int q = 0; r->rank_rows && q < ranks; ++q)
                fprintf(f, "%s{\"rank\": %d, \"tokens\": %lld, \"rows_sent\": %lld, "
                           "\"rows_received\": %lld, \"remote_share\": %.6f}", q ? ", " : "", q,
                        (long long)r->rank_rows[3 * q], (long long)r->rank_rows[3 * q + 1],
                        (long long)r->rank_rows[3 * q + 2], r->rank_remote[q]);
            fputs("], ", f);
        }
        fputs("\"wrong\": ", f);
        if (r->wrong >= 0)
            fprintf(f, "%lld, \"checked\": %lld}", (long long)r->wrong, (long long)r->checked);
        else
            fputs("null, \"checked\": 0}", f);
    }
    fputs("\n  ],\n  \"average\": {\"tokens_per_s\": ", f);
    num(f, nrows ? sum_tps / nrows : 0.0);
    fputs(", \"tflops\": ", f);
    num(f, nrows ? sum_tf / nrows : 0.0);
    fputs("}\n}\n", f);
    int bad = ferror(f);
    if (fclose(f) != 0 || bad) {
        fprintf(stderr, "moe_bench: writing --json file '%s' failed\n", path);
        return -1;
    }
    return 0;
}

static const char *track_names[] = {"", "forward", "backward", "dense sgemm (roofline)",
                                    "memcpy (roofline)", "all-to-all (roofline)"};
static const char *event_names[] = {"", "forward", "backward", "dense sgemm", "memcpy",
                                    "all-to-all"};

static const char *track_name(int tid, int event) {
    if (tid >= BENCH_TID_PHASE) return moe_phase_name((moe_phase_t)(tid - BENCH_TID_PHASE));
    if (tid >= 1 && tid <= 5) return event ? event_names[tid] : track_names[tid];
    return "?";
}

int bench_write_trace(const char *path, const bench_event_t *ev, int64_t nev, int ranks) {
    FILE *f = fopen(path, "w");
    if (!f) {
        fprintf(stderr, "moe_bench: cannot open --trace file '%s'\n", path);
        return -1;
    }
    /* one process per rank (pid = rank), one thread track per timed thing and library phase
     * (tid); phase events come from the profiled pass */
    fputs("{\"displayTimeUnit\": \"ms\", \"traceEvents\": [\n", f);
    int first = 1;
    for (int q = 0; q < ranks; ++q) {
        fprintf(f, "%s  {\"name\": \"process_name\", \"ph\": \"M\", \"pid\": %d, \"tid\": 0, "
                   "\"args\": {\"name\": \"rank %d\"}}",
                first ? "" : ",\n", q, q);
        first = 0;
        for (int tid = 1; tid < BENCH_TID_PHASE + MOE_PHASE_COUNT; ++tid) {
            if (tid > 5 && tid < BENCH_TID_PHASE) continue;
            fprintf(f,
                    ",\n  {\"name\": \"thread_name\", \"ph\": \"M\", \"pid\": %d, \"tid\": %d, "
                    "\"args\": {\"name\": \"%s%s\"}},\n  {\"name\": \"thread_sort_index\", "
                    "\"ph\": \"M\", \"pid\": %d, \"tid\": %d, \"args\": {\"sort_index\": %d}}",
                    q, tid, tid >= BENCH_TID_PHASE ? "phase: " : "", track_name(tid, 0), q, tid,
                    tid);
        }
    }
    for (int64_t i = 0; i < nev; ++i)
        fprintf(f,
                ",\n  {\"name\": \"%s\", \"cat\": \"%s\", \"ph\": \"X\", \"ts\": %.3f, "
                "\"dur\": %.3f, \"pid\": %d, \"tid\": %d, \"args\": {\"tokens\": %lld, "
                "\"iter\": %d}}",
                track_name(ev[i].tid, 1), ev[i].tid >= BENCH_TID_PHASE ? "phase" : "moe",
                ev[i].ts_us, ev[i].dur_us, ev[i].pid, ev[i].tid, (long long)ev[i].tokens,
                ev[i].iter);
    fputs("\n]}\n", f);
    int bad = ferror(f);
    if (fclose(f) != 0 || bad) {
        fprintf(stderr, "moe_bench: writing --trace file '%s' failed\n", path);
        return -1;
    }
    return 0;
}

void bench_trace_add(bench_trace_buf_t *tb, int tid, int64_t tokens, int iter, double t_begin,
                     double t_end) {
    if (!tb->on) return;
    if (tb->n == tb->cap) {
        int64_t cap = tb->cap ? 2 * tb->cap : 256;
        bench_event_t *ev = realloc(tb->ev, (size_t)cap * sizeof *ev);
        if (!ev) return; /* a trace without this event beats no benchmark */
        tb->ev = ev, tb->cap = cap;
    }
    bench_event_t *e = &tb->ev[tb->n++];
    e->pid = tb->pid, e->tid = tid, e->tokens = tokens, e->iter = iter;
    e->ts_us = 1e6 * (t_begin - tb->t0), e->dur_us = 1e6 * (t_end - t_begin);
}
