/* run.c - the run of one rank of moe_bench: the layer, then per size of the sweep the buffers,
 * --check, the timed pass, the profiled pass and the ceilings, gathered so that rank 0 prints
 * the row. Every rank makes the same collective calls in the same order. */
#include <math.h>
#include <omp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#ifdef MOE_BENCH_CUDA
#include <cuda_runtime_api.h>
#endif

#include "bench.h"
#include "core/clock.h"
#include "core/dtype.h"

/* what one rank holds over the sweep */
typedef struct rank_state {
    bench_rank_arg_t *a;
    const bench_opts_t *o;
    bench_world_t *w;
    int P, me, fwd_bwd;
    int nprof; /* profiled iterations per size */
    int ng;    /* doubles each rank contributes per size (bench_gather_width) */
    tool_mem_t mem;
    moe_context_t *ctx;
    moe_layer_t *layer;
    float *wg; /* router weight (D, E), f32 host */
    bench_workload_t wl;
    void *x_dev, *y_dev, *dy_dev, *dx_dev; /* (tokens_max, D) in the layer's dtype */
    double *tf;         /* (3 iters + 3): forward, backward, total times, then a2a scratch */
    double *gv, *gall;  /* (ng) this rank's numbers, (P, ng) everybody's */
    bench_trace_buf_t tb;
    bench_row_t *rows;
    int nrows;
    int64_t total_wrong, total_checked, step_base; /* step_base: replay's next recorded step */
    double worst;
} rank_state_t;

/* counters of the timed pass, per rank */
typedef struct pass_stats {
    double tokens, sent, recv; /* sums over the timed iterations */
} pass_stats_t;

static int status_rc(moe_status_t st, const char *what) {
    if (st == MOE_STATUS_SUCCESS) return BENCH_EXIT_OK;
    fprintf(stderr, "moe_bench: %s failed: %s\n  %s\n", what, moe_status_string(st),
            moe_last_error());
    return st == MOE_STATUS_NOT_SUPPORTED ? BENCH_EXIT_NOT_SUPPORTED : BENCH_EXIT_FAIL;
}

#define TRY(call)                                      \
    do {                                               \
        int rc_ = status_rc((call), #call);            \
        if (rc_ != BENCH_EXIT_OK) return rc_;          \
    } while (0)

static int peer_failed(const rank_state_t *s) {
    fprintf(stderr, "moe_bench: rank %d: another rank failed\n", s->me);
    return BENCH_EXIT_FAIL;
}

#define BARRIER(s)                                             \
    do {                                                       \
        if (bench_world_barrier((s)->w)) return peer_failed(s); \
    } while (0)

moe_status_t bench_step_layer(const bench_rank_arg_t *a, moe_layer_t *layer, const tool_mem_t *m,
                              int64_t T, int64_t step, void *x_dev, void *y_dev, void *dy_dev,
                              void *dx_dev, int bwd, double *t) {
    int64_t b = 0, n = bench_rank_tokens(a->o, a->rp, T, step, a->w.rank, a->w.size, &b);
    moe_status_t st;
    if (a->rp) {
        /* the recorded rows are rp->width wide: the layer must read them at that width */
        if (moe_layer_routing_width(layer) != a->rp->width) {
            fprintf(stderr, "moe_bench: --replay: the trace's routing width %lld is not the "
                    "layer's %lld\n", (long long)a->rp->width,
                    (long long)moe_layer_routing_width(layer));
            return MOE_STATUS_INVALID_ARGUMENT;
        }
        int64_t s = step % a->rp->num_steps;
        st = moe_layer_force_routing(layer, a->rp->index[s] + b * a->rp->width,
                                     a->rp->gate_w[s] + b * a->rp->width, n);
        if (st != MOE_STATUS_SUCCESS) return st;
    }
    double t0 = moe_now_s();
    st = moe_layer_forward(layer, n ? x_dev : NULL, n ? y_dev : NULL, n, 1, NULL);
    if (st != MOE_STATUS_SUCCESS) return st;
    if (tool_mem_sync(m) != 0) return MOE_STATUS_BACKEND_ERROR;
    double t1 = moe_now_s(), t2 = t1;
    if (bwd) {
        st = moe_layer_backward(layer, n ? dy_dev : NULL, n ? dx_dev : NULL, NULL);
        if (st != MOE_STATUS_SUCCESS) return st;
        /* replicated experts: their gradients summed, as a training step must */
        st = moe_layer_reduce_replica_grads(layer, NULL);
        if (st != MOE_STATUS_SUCCESS) return st;
        if (tool_mem_sync(m) != 0) return MOE_STATUS_BACKEND_ERROR;
        t2 = moe_now_s();
    }
    if (t) t[0] = t0, t[1] = t1, t[2] = t2;
    return MOE_STATUS_SUCCESS;
}

/* the context, the layer, the header (rank 0) and the router weight as f32 */
static int rank_setup(rank_state_t *s) {
    const bench_opts_t *o = s->o;
    bench_rank_threads(o, s->P);
#ifdef MOE_BENCH_CUDA
    if (s->mem.gpu) cudaSetDevice(o->device);
#endif
    TRY(moe_context_create(&s->ctx, o->backend, o->device, s->a->comm));
    TRY(moe_layer_create(&s->layer, s->ctx, &o->cfg));
    const int placed = o->placement && strcmp(o->placement, "contiguous") != 0;
    if (placed && o->check) {
        fprintf(stderr, "moe_bench: --check compares the contiguous placement only; drop "
                        "--placement or --check\n");
        return BENCH_EXIT_USAGE;
    }
    if (placed && strcmp(o->placement, "auto") != 0) {
        int rc = bench_placement_from_file(o, s->layer, s->P);
        if (rc != BENCH_EXIT_OK) return rc;
    }
    if (s->me == 0) {
        char wt[64] = "";
        if (s->P > 1)
            snprintf(wt, sizeof wt, " (%s)",
                     s->w->kind == BENCH_WORLD_MPI
                         ? (o->backend == MOE_BACKEND_CUDA ? "MPI + NCCL" : "MPI")
                         : "local: threads of one process");
        bench_print_header(o, s->a->backend_text, wt, s->P, omp_get_max_threads(),
                           bench_blas_threads());
        fflush(stdout);
    }
    void *wv = NULL;
    int64_t n = 0;
    TRY(moe_layer_param(s->layer, MOE_PARAM_ROUTER_WEIGHT, &wv, NULL, &n));
    s->wg = tool_fetch_f32(&s->mem, o->cfg.dtype, wv, n);
    if (!s->wg) {
        fprintf(stderr, "moe_bench: cannot read the router weight\n");
        return BENCH_EXIT_FAIL;
    }
    return BENCH_EXIT_OK;
}

static void free_buffers(rank_state_t *s) {
    bench_free_workload(&s->wl);
    tool_mem_free(&s->mem, s->x_dev), tool_mem_free(&s->mem, s->y_dev);
    tool_mem_free(&s->mem, s->dy_dev), tool_mem_free(&s->mem, s->dx_dev);
    s->x_dev = s->y_dev = s->dy_dev = s->dx_dev = NULL;
}

/* this rank's x and dy at size T, in backend memory of the layer's dtype */
static int size_buffers(rank_state_t *s, int64_t T) {
    const moe_dtype_t dt = s->o->cfg.dtype;
    const size_t es = moe_dtype_size(dt);
    free_buffers(s);
    int bad = bench_make_workload(s->o, s->a->rp, s->wg, T, s->me, s->P, &s->wl) != 0;
    const int64_t n = s->wl.tokens_max * s->o->cfg.d_model;
    const size_t bytes = (size_t)n * es;
    void *stage = bad ? NULL : malloc(bytes + 1);
    if (stage) {
        s->x_dev = tool_mem_alloc(&s->mem, bytes), s->y_dev = tool_mem_alloc(&s->mem, bytes);
        s->dy_dev = tool_mem_alloc(&s->mem, bytes), s->dx_dev = tool_mem_alloc(&s->mem, bytes);
    }
    if (!stage || !s->x_dev || !s->y_dev || !s->dy_dev || !s->dx_dev) {
        free(stage);
        fprintf(stderr, "moe_bench: rank %d: out of memory for %lld tokens\n", s->me,
                (long long)T);
        return BENCH_EXIT_FAIL;
    }
    tool_to_dtype(dt, s->wl.x, stage, n);
    bad = tool_mem_copy(&s->mem, s->x_dev, stage, bytes, TOOL_COPY_TO_BACKEND) != 0;
    tool_to_dtype(dt, s->wl.dy, stage, n);
    bad = bad || tool_mem_copy(&s->mem, s->dy_dev, stage, bytes, TOOL_COPY_TO_BACKEND) != 0;
    free(stage);
    if (bad) {
        fprintf(stderr, "moe_bench: a copy to or from the backend failed\n");
        return BENCH_EXIT_FAIL;
    }
    return BENCH_EXIT_OK;
}

/* --check at size T (collective); the counts go to the row and the totals */
static int check_size(rank_state_t *s, int64_t T, bench_row_t *r) {
    bench_check_acc_t acc = {0, 0, 0.0};
    int rc = bench_check(s->a, &s->mem, s->layer, s->wg, T, s->x_dev, s->dy_dev, s->y_dev,
                         s->dx_dev, &acc);
    if (rc != BENCH_EXIT_OK) return rc;
    r->wrong = acc.wrong, r->checked = acc.checked;
    s->total_wrong += acc.wrong, s->total_checked += acc.checked;
    s->worst = fmax(s->worst, acc.worst);
    return BENCH_EXIT_OK;
}

/* warm-up and timed iterations, profiling off: the numbers of the table */
static int timed_pass(rank_state_t *s, int64_t T, int si, int nsizes, bench_row_t *r,
                      pass_stats_t *ps) {
    const bench_opts_t *o = s->o;
    const int64_t D = o->cfg.d_model, F = o->cfg.d_ff;
    const int64_t F2 = o->cfg.activation == MOE_ACTIVATION_SWIGLU ? 2 * F : F;
    const int progress = s->me == 0 && isatty(STDERR_FILENO);
    double *tbw = s->tf + o->iters, *tt = s->tf + 2 * o->iters;
    for (int it = -o->warmup; it < o->iters; ++it) {
        if (progress)
            fprintf(stderr, "\r# size %d/%d: %lld tokens, %s %d/%d   ", si + 1, nsizes,
                    (long long)T, it < 0 ? "warm-up" : "iter",
                    it < 0 ? it + o->warmup + 1 : it + 1, it < 0 ? o->warmup : o->iters);
        double t[3];
        int64_t step = s->step_base++;
        BARRIER(s);
        TRY(bench_step_layer(s->a, s->layer, &s->mem, T, step, s->x_dev, s->y_dev, s->dy_dev,
                             s->dx_dev, s->fwd_bwd, t));
        if (it < 0) continue;
        s->tf[it] = t[1] - t[0], tbw[it] = t[2] - t[1], tt[it] = t[2] - t[0];
        bench_trace_add(&s->tb, 1, T, it, t[0], t[1]);
        if (s->fwd_bwd) bench_trace_add(&s->tb, 2, T, it, t[1], t[2]);
        moe_routing_stats_t st;
        TRY(moe_layer_stats(s->layer, &st, NULL, NULL));
        ps->tokens += (double)bench_rank_tokens(o, s->a->rp, T, step, s->me, s->P, NULL);
        ps->sent += (double)st.rows_sent, ps->recv += (double)st.rows_received;
        const double kept = (double)(st.num_assignments - st.num_dropped);
        r->imbalance += st.imbalance / o->iters;
        if (s->P > 1) {
            double ic = 0.0;
            int rc = bench_contiguous_imbalance(s->layer, o->cfg.num_experts, s->P, &ic);
            if (rc != BENCH_EXIT_OK) return rc;
            r->rank_imbalance_contig += ic / o->iters;
        }
        r->assignments = st.num_assignments, r->dropped = st.num_dropped;
        r->flops += (2.0 * kept * D * F2 + 2.0 * kept * F * D) * (s->fwd_bwd ? 3.0 : 1.0) /
                    o->iters;
    }
    if (progress) fprintf(stderr, "\r%60s\r", "");
    return BENCH_EXIT_OK;
}

/* the library's phase times (it waits after every phase, so these calls are slower than the
 * timed ones and are not in the table's totals); ph: mean per call */
static int profiled_pass(rank_state_t *s, int64_t T, double *ph) {
    TRY(moe_layer_set_profiling(s->layer, 1));
    for (int it = 0; it < s->nprof; ++it) {
        double t[3], p[MOE_PHASE_COUNT];
        BARRIER(s);
        TRY(bench_step_layer(s->a, s->layer, &s->mem, T, s->step_base++, s->x_dev, s->y_dev,
                             s->dy_dev, s->dx_dev, s->fwd_bwd, t));
        TRY(moe_layer_phase_times(s->layer, p));
        /* the phases ran one after another: lay them end to end from the call's start (chunks
         * interleave dispatch / experts / return; their sums are shown in plan order) */
        double f0 = t[0], b0 = t[1];
        for (int q = 0; q < MOE_PHASE_COUNT; ++q) {
            ph[q] += p[q] / s->nprof;
            if (p[q] <= 0) continue;
            double *cur = q < MOE_PHASE_BWD_COMBINE ? &f0 : &b0;
            bench_trace_add(&s->tb, BENCH_TID_PHASE + q, T, it, *cur, *cur + p[q]);
            *cur += p[q];
        }
    }
    TRY(moe_layer_set_profiling(s->layer, 0));
    return BENCH_EXIT_OK;
}

/* share of this rank's kept assignments (last forward) that leave for another rank */
static int remote_share(rank_state_t *s, int64_t T, double *remote) {
    const int64_t n = bench_rank_tokens(s->o, s->a->rp, T, s->step_base - 1, s->me, s->P, NULL);
    const int64_t W = moe_layer_routing_width(s->layer), El = s->o->cfg.num_experts / s->P;
    int32_t *ix = malloc((size_t)(n * W + 1) * 4), *kp = malloc((size_t)(n * W + 1) * 4);
    if (!ix || !kp) {
        free(ix), free(kp);
        fprintf(stderr, "moe_bench: out of host memory\n");
        return BENCH_EXIT_FAIL;
    }
    int64_t kept_n = 0, out_n = 0;
    moe_status_t st = n ? moe_layer_routing(s->layer, ix, NULL, kp) : MOE_STATUS_SUCCESS;
    for (int64_t i = 0; st == MOE_STATUS_SUCCESS && i < n * W; ++i)
        if (kp[i] && ix[i] >= 0) kept_n++, out_n += ix[i] / El != s->me;
    free(ix), free(kp);
    TRY(st);
    *remote = kept_n ? (double)out_n / (double)kept_n : 0.0;
    return BENCH_EXIT_OK;
}

/* ceilings, same run, all ranks at once as the layer runs: dense GEMMs of this rank's expert
 * rows (CPU only), a memcpy of its activation bytes, the raw all-to-all; then everything to
 * every rank, and rank 0 fills and prints the row */
static int ceilings_and_row(rank_state_t *s, int64_t T, bench_row_t *r, const pass_stats_t *ps,
                            const double *ph, double remote) {
    const bench_opts_t *o = s->o;
    const int P = s->P, ng = s->ng, n3 = 3 * o->iters;
    const int64_t D = o->cfg.d_model, F = o->cfg.d_ff;
    const int64_t F2 = o->cfg.activation == MOE_ACTIVATION_SWIGLU ? 2 * F : F;
    const size_t es = moe_dtype_size(o->cfg.dtype);
    const double M_r = P > 1 ? ps->recv / o->iters : (double)(r->assignments - r->dropped);
    const double T_r = ps->tokens / o->iters;
    const int reps = o->iters < 3 ? o->iters : 3;
    double stats[BENCH_G_STATS] = {T_r, ps->sent / o->iters, ps->recv / o->iters, remote};
    BARRIER(s);
    double gemm_s = o->backend == MOE_BACKEND_CPU
                        ? bench_dense_gemm_time((int64_t)llround(M_r), D, F, F2, s->fwd_bwd,
                                                reps, T, &s->tb)
                        : -1.0;
    const double act_bytes =
        (double)es * (2.0 * T_r * D + M_r * (2.0 * D + F2 + F)) * (s->fwd_bwd ? 2.0 : 1.0);
    BARRIER(s);
    double mcpy_s = bench_memcpy_time(&s->mem, (size_t)act_bytes, reps, T, &s->tb);
    if (bench_world_allgather_f64(s->w, stats, BENCH_G_STATS, s->gall)) return peer_failed(s);
    double sent_mean = 0;
    for (int q = 0; q < P; ++q) sent_mean += s->gall[q * BENCH_G_STATS + 1] / P;
    double a2a_raw = -1.0;
    /* MPI + CUDA: an NCCL all-to-all of device memory on the tool's own communicator (an MPI
     * all-to-all of host memory would be no ceiling for the NCCL exchange); a build without
     * NCCL has none (give --link-bw) */
    int have_ceiling = 1;
#ifndef MOE_BENCH_NCCL
    have_ceiling = !(s->w->kind == BENCH_WORLD_MPI && s->mem.gpu);
#endif
    if (P > 1 && have_ceiling) {
        double t0 = moe_now_s();
        a2a_raw = bench_alltoall_ceiling(s->w, &s->mem, (size_t)(sent_mean * D * es), reps,
                                         s->tf + n3);
        bench_trace_add(&s->tb, 5, T, 0, t0, moe_now_s());
    }
    memcpy(s->gv, s->tf, (size_t)n3 * sizeof(double));
    memcpy(s->gv + n3, stats, sizeof stats);
    memcpy(s->gv + n3 + BENCH_G_STATS, ph, MOE_PHASE_COUNT * sizeof(double));
    s->gv[ng - 3] = gemm_s, s->gv[ng - 2] = mcpy_s, s->gv[ng - 1] = a2a_raw;
    if (bench_world_allgather_f64(s->w, s->gv, ng, s->gall)) return peer_failed(s);
    if (s->me == 0) {
        bench_finish_row(o, P, ng, s->gall, s->tf, sent_mean, act_bytes, r);
        bench_print_row(o, r);
    }
    return BENCH_EXIT_OK;
}

/* one size of the sweep: buffers, --check, timed pass, profiled pass, ceilings, the row */
static int run_size(rank_state_t *s, int64_t T, int si, int nsizes) {
    int rc = size_buffers(s, T);
    if (rc != BENCH_EXIT_OK) return rc;
    if (s->o->placement && strcmp(s->o->placement, "auto") == 0) {
        /* one untimed forward of this size's first step gives the counts to plan from */
        BARRIER(s);
        TRY(bench_step_layer(s->a, s->layer, &s->mem, T, s->step_base, s->x_dev, s->y_dev,
                             s->dy_dev, s->dx_dev, 0, NULL));
        if ((rc = bench_placement_auto(s->o, s->layer, s->P, s->me == 0)) != BENCH_EXIT_OK)
            return rc;
    }
    bench_row_t *r = &s->rows[s->nrows];
    r->tokens = T, r->wrong = -1, r->ranks = s->P;
    if (s->o->check && (rc = check_size(s, T, r)) != BENCH_EXIT_OK) return rc;
    pass_stats_t ps = {0, 0, 0};
    double ph[MOE_PHASE_COUNT] = {0}, remote = 0.0;
    if ((rc = timed_pass(s, T, si, nsizes, r, &ps)) != BENCH_EXIT_OK) return rc;
    if ((rc = profiled_pass(s, T, ph)) != BENCH_EXIT_OK) return rc;
    if ((rc = remote_share(s, T, &remote)) != BENCH_EXIT_OK) return rc;
    if ((rc = ceilings_and_row(s, T, r, &ps, ph, remote)) != BENCH_EXIT_OK) return rc;
    ++s->nrows;
    return BENCH_EXIT_OK;
}

/* the sizes of the sweep (replay: one, the mean tokens per rank and step) */
static int count_sizes(const bench_opts_t *o, const bench_replay_t *rp, int P, double *first) {
    int n = 0;
    *first = (double)o->min_tokens;
    if (rp) {
        int64_t sum = 0;
        for (int64_t st = 0; st < rp->num_steps; ++st) sum += rp->tokens[st];
        *first = (double)sum / (double)rp->num_steps / P;
        return 1;
    }
    for (double t = (double)o->min_tokens; t <= (double)o->max_tokens * (1 + 1e-9);
         t *= o->step_factor)
        ++n;
    return n;
}

static int run_sweep(rank_state_t *s) {
    const bench_opts_t *o = s->o;
    double tsize;
    const int nsizes = count_sizes(o, s->a->rp, s->P, &tsize);
    s->rows = calloc((size_t)nsizes, sizeof *s->rows);
    s->tf = malloc((size_t)(3 * o->iters + 3) * sizeof(double));
    s->gv = malloc((size_t)s->ng * sizeof(double));
    s->gall = malloc((size_t)s->ng * s->P * sizeof(double));
    if (!s->rows || !s->tf || !s->gv || !s->gall) {
        fprintf(stderr, "moe_bench: out of host memory\n");
        return BENCH_EXIT_FAIL;
    }
    for (int si = 0; si < nsizes; ++si, tsize *= o->step_factor) {
        int rc = run_size(s, (int64_t)llround(tsize), si, nsizes);
        if (rc != BENCH_EXIT_OK) return rc;
    }
    return BENCH_EXIT_OK;
}

/* the trace: every rank's events to rank 0 (a collective: only when every rank got here) */
static void gather_trace(rank_state_t *s) {
    const int P = s->P;
    double n = (double)s->tb.n, *ns = malloc((size_t)P * sizeof(double));
    bench_event_t *all = NULL;
    size_t *each = NULL;
    if (ns && bench_world_allgather_f64(s->w, &n, 1, ns) == 0) {
        int64_t tot = 0;
        for (int q = 0; q < P; ++q) tot += (int64_t)ns[q];
        if (s->me == 0) {
            all = malloc((size_t)(tot + 1) * sizeof *all);
            each = malloc((size_t)P * sizeof *each);
            for (int q = 0; each && q < P; ++q) each[q] = (size_t)ns[q] * sizeof *all;
        }
        if (bench_world_gatherv(s->w, s->tb.ev, (size_t)s->tb.n * sizeof *s->tb.ev, all, each) ==
                0 &&
            s->me == 0) {
            free(s->tb.ev);
            s->tb.ev = all, s->tb.n = tot, all = NULL;
        }
    }
    free(ns), free(all), free(each);
}

void *bench_run_rank(void *arg) {
    bench_rank_arg_t *a = arg;
    const bench_opts_t *o = a->o;
    rank_state_t s = {
        .a = a, .o = o, .w = &a->w, .P = a->w.size, .me = a->w.rank,
        .fwd_bwd = o->mode == BENCH_MODE_FWD_BWD,
        .nprof = o->iters < 3 ? o->iters : 3,
        .ng = bench_gather_width(o->iters),
        .mem = {.gpu = o->backend == MOE_BACKEND_CUDA},
        .tb = {.on = o->trace_path != NULL, .pid = a->w.rank, .t0 = a->t0},
    };
    int rc = rank_setup(&s), check_failed = 0;
    if (rc == BENCH_EXIT_OK) rc = run_sweep(&s);
    /* a --check mismatch is no failure of the run: the collectives below still happen */
    if (rc == BENCH_EXIT_OK && s.me == 0)
        check_failed = bench_print_summary(o, s.P, s.rows, s.nrows, s.nprof, s.total_wrong,
                                           s.total_checked, s.worst);
    if (rc != BENCH_EXIT_OK) bench_world_abort(s.w);
    moe_layer_destroy(s.layer), moe_context_destroy(s.ctx);
    free_buffers(&s);
    free(s.wg), free(s.tf), free(s.gv), free(s.gall);
    if (o->trace_path && rc == BENCH_EXIT_OK) gather_trace(&s);
    if (rc == BENCH_EXIT_OK && check_failed) rc = BENCH_EXIT_FAIL;
    if (s.me == 0) {
        *a->out = (bench_out_t){.rows = s.rows, .nrows = s.nrows, .check_failed = check_failed,
                                .tb = s.tb};
    } else {
        for (int i = 0; i < s.nrows; ++i) free(s.rows[i].rank_rows), free(s.rows[i].rank_remote);
        free(s.rows), free(s.tb.ev);
    }
    a->rc = rc;
    return NULL;
}
