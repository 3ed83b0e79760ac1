/* bench.h - what the files of moe_bench share: the run options, one row of results, and the
 * helpers for workloads (workload.c) and reports (report.c).
 *
 * Letters as in moe.h: T tokens, D d_model, F d_ff, F2 = 2F for swiglu else F, E experts,
 * K top_k, M kept assignments (rows that went through an expert). */
#ifndef MOE_BENCH_H
#define MOE_BENCH_H

#include <stdint.h>
#include <stdio.h>

#include "moe/moe.h"

/* exit codes of moe_bench */
enum { BENCH_EXIT_OK = 0, BENCH_EXIT_FAIL = 1, BENCH_EXIT_USAGE = 2, BENCH_EXIT_NOT_SUPPORTED = 3 };

typedef enum bench_routing_kind {
    BENCH_ROUTING_LEARNED = 0, /* the layer's own init, inputs uniform in (-1, 1) */
    BENCH_ROUTING_UNIFORM,     /* target experts drawn uniformly */
    BENCH_ROUTING_ZIPF,        /* p_e proportional to 1 / (e + 1)^s: expert 0 hottest */
    BENCH_ROUTING_HOT,         /* p_0 = fraction, the others share the rest evenly */
    BENCH_ROUTING_RANK_SKEW,   /* accepted, NOT_SUPPORTED until expert parallelism */
    BENCH_ROUTING_ZERO_RANK    /* accepted, NOT_SUPPORTED until expert parallelism */
} bench_routing_kind_t;

typedef struct bench_routing {
    bench_routing_kind_t kind;
    double param; /* s of zipf, fraction of hot */
    char text[64];
} bench_routing_t;

typedef enum bench_mode { BENCH_MODE_FWD = 0, BENCH_MODE_FWD_BWD = 1 } bench_mode_t;

typedef struct bench_opts {
    moe_layer_config_t cfg;
    moe_backend_t backend;
    int backend_given;
    int device;
    int warmup, iters;
    bench_mode_t mode;
    int64_t min_tokens, max_tokens;
    double step_factor;
    int check;
    const char *json_path, *trace_path;
    uint64_t seed;
    int threads; /* 0: leave the OpenMP / OpenBLAS defaults */
    bench_routing_t routing;
    const char *preset;
} bench_opts_t;

/* statistics of one timed phase over the iterations, in seconds */
typedef struct bench_times {
    double mean, median, min, max;
} bench_times_t;

/* one row of the table */
typedef struct bench_row {
    int64_t tokens;
    bench_times_t fwd, bwd, total; /* bwd is all zero in fwd mode */
    double tokens_per_s;           /* tokens / mean total */
    double flops;                  /* expert FLOPs of one iteration (fwd, or fwd + bwd) */
    double tflops;                 /* flops / mean total / 1e12 */
    double gemm_s;                 /* dense sgemm of the same FLOPs (median), < 0 if not measured */
    double mcpy_s;                 /* memcpy of the activation bytes (median), < 0 if not measured */
    double act_bytes;              /* activation bytes that memcpy moved */
    double imbalance;              /* max / mean tokens per expert, from moe_layer_stats */
    int64_t assignments, dropped;
    int64_t wrong;   /* elements outside tolerance, -1 if not checked */
    int64_t checked; /* elements compared */
} bench_row_t;

/* one complete ("X") event of the trace */
typedef struct bench_event {
    const char *name; /* static string */
    int tid;          /* track: 1 forward, 2 backward, 3 dense sgemm, 4 memcpy */
    int64_t tokens;
    int iter;
    double ts_us, dur_us;
} bench_event_t;

/* ---- workload.c ---------------------------------------------------------------------------- */

/* parses "uniform", "zipf:S", "hot:FRACTION", "learned", "rank-skew[:...]", "zero-rank";
 * 0 on success, -1 with a message on stderr otherwise */
int bench_routing_parse(const char *text, bench_routing_t *r);

/* probability of each expert under r (E entries, sum 1); learned gives the uniform vector */
void bench_routing_probs(const bench_routing_t *r, int64_t E, double *p);

/* fills x (T, D) reproducibly from seed: uniform in (-1, 1), plus for every shaped workload a
 * strong component along the router columns of K target experts per token, drawn without
 * replacement from the routing distribution (best target strongest). wg is the router weight
 * (D, E) as f32 on the host. */
int bench_make_input(const bench_routing_t *r, const float *wg, int64_t T, int64_t D, int64_t E,
                     int64_t K, uint64_t seed, float *x);

/* uniform (-1, 1) values from seed */
void bench_fill_uniform(float *v, int64_t n, uint64_t seed, float scale);

/* ---- report.c ------------------------------------------------------------------------------ */

int bench_write_json(const char *path, const bench_opts_t *o, const char *backend_text,
                     int omp_threads, int blas_threads, const bench_row_t *rows, int nrows,
                     int check_ok);
int bench_write_trace(const char *path, const bench_event_t *ev, int64_t nev);

#endif /* MOE_BENCH_H */
