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
    BENCH_ROUTING_RANK_SKEW,   /* rank r's tokens: share `param` on the experts of rank r+1 mod P */
    BENCH_ROUTING_ZERO_RANK    /* rank 0 has no tokens; the others learned routing */
} bench_routing_kind_t;

typedef struct bench_routing {
    bench_routing_kind_t kind;
    double param; /* s of zipf, fraction of hot, share of rank-skew */
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
    int local_ranks;         /* --local-ranks P: ranks as threads (0: not given) */
    const char *replay_path; /* --replay FILE */
    double link_bw;          /* --link-bw GB/s for the model; 0 = the same-run ceiling */
    int model_table;         /* --model-table: print the many-GPU predictions and exit */
    int tokens_given;        /* -t or -b given (--model-table: else 4096 tokens per GPU) */
    int cap_given;           /* --capacity-factor given (replay keeps it over the trace's) */
    int dims_given[2];       /* -d, -F given (replay keeps them over the trace's) */
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
    /* expert parallelism (ranks > 1; zero otherwise) */
    int ranks;
    double phase_s[MOE_PHASE_COUNT]; /* profiled pass: mean per call, max over ranks */
    double rank_imbalance;           /* max / mean rows received per rank */
    double rows_sent_mean, rows_recv_mean; /* per rank and iteration */
    double rows_sent_max, rows_recv_max;
    double a2a_bytes; /* bytes one rank sends per all-to-all: mean rows sent x D x dtype size */
    double a2a_s;     /* dispatch + return phases (all of them in fwd-bwd), max over ranks */
    double algbw, busbw; /* GB/s */
    double ceil_s;       /* raw all-to-all of the same bytes, as many times; < 0 if none */
    double model_s;      /* bench_model_layer_time at the layer's chunk count */
    int64_t *rank_rows;  /* (ranks, 3): tokens, rows sent, rows received per iteration */
    double *rank_remote; /* (ranks) share of kept assignments sent to other ranks */
} bench_row_t;

/* one complete ("X") event of the trace; the name follows from the track */
typedef struct bench_event {
    int pid;          /* rank */
    int tid;          /* track: 1 forward, 2 backward, 3 dense sgemm, 4 memcpy, 5 all-to-all
                         ceiling, BENCH_TID_PHASE + p the library's phase p (profiled pass) */
    int64_t tokens;
    int iter;
    double ts_us, dur_us;
} bench_event_t;

#define BENCH_TID_PHASE 10

/* ---- world.c: the ranks of one run ---------------------------------------------------------- */

typedef enum { BENCH_WORLD_SELF = 0, BENCH_WORLD_LOCAL, BENCH_WORLD_MPI } bench_world_kind_t;
typedef struct bench_local_shared bench_local_shared_t;
typedef struct bench_world {
    bench_world_kind_t kind;
    int rank, size;
    bench_local_shared_t *sh; /* LOCAL only */
} bench_world_t;

bench_local_shared_t *bench_local_shared_create(int size);
void bench_local_shared_destroy(bench_local_shared_t *s);
/* a failing thread breaks the local barrier so that its peers stop waiting in the tool */
void bench_world_abort(bench_world_t *w);
int bench_world_barrier(bench_world_t *w);
/* n doubles from every rank, in rank order, on every rank */
int bench_world_allgather_f64(bench_world_t *w, const double *mine, int n, double *all);
/* byte blocks at rank 0 in rank order; bytes_each (rank 0 only) the length of each */
int bench_world_gatherv(bench_world_t *w, const void *mine, size_t bytes, void *all,
                        const size_t *bytes_each);
double bench_world_alltoall_time(bench_world_t *w, size_t bytes, int reps, int on_device,
                                 int (*copy)(void *dst, const void *src, size_t bytes, void *ctx),
                                 void *(*alloc)(size_t bytes, void *ctx),
                                 void (*release)(void *p, void *ctx), void *ctx, double *t_each);

/* ---- model.c: the performance model (docs/scaling.md) -------------------------------------- */

typedef struct bench_model_link {
    int ranks_per_node;         /* GPUs behind one fast link domain (NVLink: 8) */
    double bw_intra, bw_inter;  /* bytes/s per GPU and direction: NVLink, the NIC */
    double latency_s;           /* per peer of one all-to-all */
} bench_model_link_t;

typedef struct bench_model_in {
    double t_local_fwd, t_local_bwd;     /* gate, route, permute, combine (and backward twins) */
    double t_experts_fwd, t_experts_bwd; /* expert GEMMs */
    double t_net_fwd, t_net_bwd;         /* dispatch + return all-to-alls */
    int fwd_bwd;
} bench_model_in_t;

typedef struct bench_model_shape {
    int64_t tokens, d_model, d_ff, experts, top_k; /* tokens per GPU */
    int swiglu, elem_bytes;
} bench_model_shape_t;

double bench_model_a2a_time(const bench_model_link_t *l, double bytes, int ranks);
double bench_model_pipeline(double t_net, double t_experts, int chunks);
double bench_model_layer_time(const bench_model_in_t *m, int chunks);
/* smallest chunk count within `tolerance` of full overlap (max_chunks when none is) */
int bench_model_hiding_chunks(const bench_model_in_t *m, int max_chunks, double tolerance);
void bench_model_h100(const bench_model_shape_t *s, double gemm_tflops, double *t_local_fwd,
                      double *t_local_bwd, double *t_experts_fwd, double *t_experts_bwd,
                      double *a2a_bytes);

/* ---- replay.c: a routing trace read for --replay (format: csrc/trace_format.h) -------------- */

typedef struct bench_replay {
    int64_t num_experts, top_k, d_model, d_ff;
    int64_t width; /* entries per token: top_k, or num_experts for expert choice */
    int activation, gate, priority, world, router;
    double capacity_factor;
    int64_t num_steps;
    int64_t *tokens;  /* (num_steps) global tokens of each step (as recorded by one rank) */
    int32_t **index;  /* (num_steps) -> (tokens, width) */
    float **gate_w;   /* (num_steps) -> (tokens, width) */
} bench_replay_t;

int bench_replay_read(const char *path, bench_replay_t *r);
void bench_replay_free(bench_replay_t *r);

/* ---- workload.c ---------------------------------------------------------------------------- */

/* parses "uniform", "zipf:S", "hot:FRACTION", "learned", "rank-skew[:...]", "zero-rank";
 * 0 on success, -1 with a message on stderr otherwise */
int bench_routing_parse(const char *text, bench_routing_t *r);

/* probability of each expert under r for rank `rank` of `ranks` (E entries, sum 1); learned
 * gives the uniform vector */
void bench_routing_probs(const bench_routing_t *r, int64_t E, int rank, int ranks, double *p);

/* fills x (T, D) reproducibly from seed: uniform in (-1, 1), plus for every shaped workload a
 * strong component along the router columns of K target experts per token, drawn without
 * replacement from the routing distribution (best target strongest). wg is the router weight
 * (D, E) as f32 on the host. */
int bench_make_input(const bench_routing_t *r, const float *wg, int64_t T, int64_t D, int64_t E,
                     int64_t K, int rank, int ranks, uint64_t seed, float *x);

/* uniform (-1, 1) values from seed */
void bench_fill_uniform(float *v, int64_t n, uint64_t seed, float scale);

/* ---- report.c ------------------------------------------------------------------------------ */

int bench_write_json(const char *path, const bench_opts_t *o, const char *backend_text,
                     int ranks, int omp_threads, int blas_threads, const bench_row_t *rows,
                     int nrows, int check_ok);
int bench_write_trace(const char *path, const bench_event_t *ev, int64_t nev, int ranks);

#endif /* MOE_BENCH_H */
