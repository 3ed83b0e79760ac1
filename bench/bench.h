/* bench.h - what the files of moe_bench share: the run options, one row of results, and the
 * functions of its files: options.c (command line), workload.c (inputs and token counts),
 * run.c (the run of one rank), ceilings.c (same-run ceilings, threads), check.c and check_ref.c
 * (--check), table.c (the printed table), report.c (JSON and trace files), world.c (ranks),
 * model.c (the performance model), replay.c (routing traces); main is in moe_bench.c.
 *
 * Letters as in moe.h: T tokens, D d_model, F d_ff, F2 = 2F for swiglu else F, E experts,
 * K top_k, M kept assignments (rows that went through an expert). */
#ifndef MOE_BENCH_H
#define MOE_BENCH_H

#include <stdint.h>
#include <stdio.h>

#include "moe/moe.h"
#include "tool_util.h"

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
    const char *placement;   /* --placement: NULL or "contiguous", "auto", or a file */
    int64_t redundant;       /* --redundant R: extra slots for --placement auto */
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
    double rank_imbalance_contig;    /* the same for the contiguous placement under the same
                                        routing (modelled from the counts), mean over iters */
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

/* ---- replay.c: a routing trace read for --replay (format: include/moe/trace_format.h) -------------- */

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

/* ---- options.c ----------------------------------------------------------------------------- */

/* 0 ok, 1 help printed, -1 usage error (message on stderr) */
int bench_parse_args(int argc, char **argv, bench_opts_t *o);

/* ---- workload.c: what one rank feeds the layer ----------------------------------------------- */

typedef struct bench_workload {
    int64_t tokens_max; /* rows of x held (replay: the largest slice over the steps) */
    float *x, *dy;      /* (tokens_max, D) f32 host */
} bench_workload_t;

/* tokens of rank q of P at size T (replay: at this step) and, when begin is given, the first
 * global token index of its slice */
int64_t bench_rank_tokens(const bench_opts_t *o, const bench_replay_t *rp, int64_t T,
                          int64_t step, int q, int P, int64_t *begin);
/* x and dy of rank q: reproducible from (seed, q), so any rank can rebuild another's; 0 on
 * success (free with bench_free_workload either way) */
int bench_make_workload(const bench_opts_t *o, const bench_replay_t *rp, const float *wg,
                        int64_t T, int q, int P, bench_workload_t *wl);
void bench_free_workload(bench_workload_t *wl);

/* ---- report.c: the trace buffer of one rank -------------------------------------------------- */

typedef struct bench_trace_buf {
    bench_event_t *ev;
    int64_t n, cap;
    int on;    /* --trace given */
    int pid;   /* this rank */
    double t0; /* start of the run: timestamps are relative to it */
} bench_trace_buf_t;

/* one event on track tid (see bench_event_t); a full buffer that cannot grow drops it */
void bench_trace_add(bench_trace_buf_t *tb, int tid, int64_t tokens, int iter, double t_begin,
                     double t_end);

/* ---- run.c: the run of one rank ----------------------------------------------------------- */

/* rank 0's results, handed to main for the JSON and trace files */
typedef struct bench_out {
    bench_row_t *rows;
    int nrows;
    int check_failed; /* the run went through and --check found wrong elements */
    bench_trace_buf_t tb;
} bench_out_t;

typedef struct bench_rank_arg {
    const bench_opts_t *o;
    const bench_replay_t *rp; /* NULL without --replay */
    bench_world_t w;
    moe_comm_t *comm;
    const char *backend_text;
    double t0;        /* start of the run (trace timestamps) */
    bench_out_t *out; /* written by rank 0 only */
    int rc;           /* exit code of this rank */
} bench_rank_arg_t;

/* every rank runs it: a thread per local rank, a process per MPI rank, or main for one rank */
void *bench_run_rank(void *arg);

/* one training forward (with the replayed routing of `step` forced first) and, when bwd, one
 * backward; the times of the start, the end of the forward and the end of the backward when t
 * is given */
moe_status_t bench_step_layer(const bench_rank_arg_t *a, moe_layer_t *layer, const tool_mem_t *m,
                              int64_t T, int64_t step, void *x_dev, void *y_dev, void *dy_dev,
                              void *dx_dev, int bwd, double *t);

/* ---- ceilings.c: same-run ceilings, statistics, threads ------------------------------------ */

bench_times_t bench_summarize(const double *v, int n);
/* median time of the expert GEMMs done densely: M rows through one (D, F2) and one (F, D)
 * matrix; forward+backward adds the four backward GEMMs. -1 if memory is short. */
double bench_dense_gemm_time(int64_t M, int64_t D, int64_t F, int64_t F2, int bwd, int reps,
                             int64_t tokens, bench_trace_buf_t *tb);
/* median time of a backend-to-backend copy of `bytes`; -1 on failure */
double bench_memcpy_time(const tool_mem_t *m, size_t bytes, int reps, int64_t tokens,
                         bench_trace_buf_t *tb);
/* the raw all-to-all of `bytes` per rank in backend memory, reps times (t_each: reps doubles) */
double bench_alltoall_ceiling(bench_world_t *w, const tool_mem_t *m, size_t bytes, int reps,
                              double *t_each);
#ifdef MOE_BENCH_NCCL
/* nccl_ceiling.c: under mpirun with --backend cuda, one grouped ncclSend/ncclRecv all-to-all of
 * `bytes` per rank on a communicator of the tool's own; median seconds over reps, -1 on failure
 * (collective over MPI_COMM_WORLD) */
double bench_nccl_alltoall_time(size_t bytes, int reps, double *t_each);
#endif
/* OpenMP and OpenBLAS threads for the whole process (--threads) */
void bench_set_threads(int n);
/* OpenBLAS's thread count, -1 when the BLAS is not OpenBLAS */
int bench_blas_threads(void);
/* OpenMP threads of one rank: --threads, or a share of the cores per local rank */
void bench_rank_threads(const bench_opts_t *o, int ranks);

/* ---- check.c, check_ref.c: --check ---------------------------------------------------------- */

typedef struct bench_check_acc {
    int64_t wrong, checked;
    double worst; /* largest error relative to the tensor's largest reference magnitude */
} bench_check_acc_t;

/* collective: one training forward + backward of every rank's tokens from zeroed gradients,
 * gathered at rank 0 and compared there with the float64 reference (check_ref.c); BENCH_EXIT_OK
 * when the comparison ran (acc says how it went) */
int bench_check(const bench_rank_arg_t *a, const tool_mem_t *m, moe_layer_t *layer,
                const float *wg, int64_t T, void *x_dev, void *dy_dev, void *y_dev, void *dx_dev,
                bench_check_acc_t *acc);

/* what the float64 reference reads: one rank's tokens, the parameters of all E experts (global
 * order) and the routing that rank's layer reported */
typedef struct bench_ref_in {
    int64_t T, D, F, E, W;
    int act, gate_type, renormalize; /* moe_activation_t, moe_gate_t, cfg.renormalize */
    int check_routing;  /* recompute the top-K choice and gates (token choice, no noise, not
                           forced) */
    int check_capacity; /* kept = min(assigned, capacity) per expert (token choice) */
    int router_grads;   /* add the router's backward to dWg and dx (no noise, not forced) */
    double capacity_factor;
    double tie_eps;  /* scores closer than this count as tied: their order is not checked */
    double gate_tol; /* absolute tolerance of a gate weight */
    const float *x, *dy;         /* (T, D), as the layer saw them */
    const float *wg;             /* (D, E) */
    const float *w1, *b1;        /* (E, D, F2), (E, F2); b1 NULL without expert bias */
    const float *w2, *b2;        /* (E, F, D), (E, D); b2 NULL without expert bias */
    const int32_t *idx, *kept;   /* (T, W) */
    const float *gate;           /* (T, W) */
} bench_ref_in_t;

typedef struct bench_ref_out {
    double *y, *dx;              /* (T, D), zeroed by the caller */
    double *dwg;                 /* (D, E), accumulated over calls */
    double *dw1, *db1, *dw2, *db2; /* expert gradients, accumulated; db* NULL without bias */
    int64_t route_wrong, route_checked, route_skipped;
} bench_ref_out_t;

/* 0 on success, -1 out of memory */
int bench_ref_layer(const bench_ref_in_t *in, bench_ref_out_t *out);

/* ---- table.c: the printed table -------------------------------------------------------------- */

void bench_print_header(const bench_opts_t *o, const char *backend_text, const char *world_text,
                        int ranks, int omp_threads, int blas_thr);
/* per-rank results of one size, gathered: [ fwd[iters] bwd[iters] tot[iters] | tokens sent recv
 * remote | phases | gemm mcpy a2a ] */
enum { BENCH_G_STATS = 4, BENCH_G_CEIL = 3 };
static inline int bench_gather_width(int iters) {
    return 3 * iters + BENCH_G_STATS + MOE_PHASE_COUNT + BENCH_G_CEIL;
}
/* rank 0: one row of the table from every rank's gathered numbers gall (P x ng); tf is rank 0's
 * own times, overwritten with the slowest rank's */
void bench_finish_row(const bench_opts_t *o, int P, int ng, const double *gall, double *tf,
                      double sent_mean, double act_bytes, bench_row_t *r);
void bench_print_row(const bench_opts_t *o, const bench_row_t *r);
/* the footer, the phase table and the ranks of the last size; 1 if --check failed */
int bench_print_summary(const bench_opts_t *o, int P, const bench_row_t *rows, int nrows,
                        int nprof, int64_t total_wrong, int64_t total_checked, double worst);

/* ---- placement.c: --placement, --redundant ---------------------------------------------- */

/* --placement FILE on the new layer (collective) */
int bench_placement_from_file(const bench_opts_t *o, moe_layer_t *layer, int P);
/* --placement auto: a plan from the last forward's counts, set on the layer (collective) */
int bench_placement_auto(const bench_opts_t *o, moe_layer_t *layer, int P, int print);
/* max / mean rank load of the contiguous placement under the last forward's counts */
int bench_contiguous_imbalance(moe_layer_t *layer, int64_t E, int P, double *imb);

/* ---- model.c: --model-table ------------------------------------------------------------------ */

void bench_model_table(const bench_opts_t *o);

#endif /* MOE_BENCH_H */
