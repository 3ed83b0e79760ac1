/* moe_bench.c - throughput of one MoE layer, forward and forward+backward, over a sweep of token
 * counts, printed as an nccl-tests style table (see docs/bench.md). This file holds main: the
 * options, the world (one rank, local threads, or MPI), the backend, then every rank's run.
 *
 * It links against the public API only (include/moe/moe.h): times are taken around
 * moe_layer_forward / moe_layer_backward from the outside, with the stream synchronised on CUDA.
 * Beside each row it measures, in the same run, two ceilings: a dense sgemm of the same FLOPs
 * (CPU: the OpenBLAS the library uses) and a memcpy of the activation bytes. */
#include <omp.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#ifdef MOE_BENCH_CUDA
#include <cuda_runtime_api.h>
#endif
#ifdef MOE_BENCH_MPI
#include <mpi.h>
#endif

#include "bench.h"
#include "core/clock.h"

/* the process's part of the run */
typedef struct world_setup {
    int mpi;        /* started by mpirun and built with MPI: one rank per process */
    int rank, size; /* this process's rank (MPI) and the number of ranks */
    double t0;      /* start of the run: trace timestamps are relative to it */
} world_setup_t;

static int status_exit(moe_status_t st) {
    return st == MOE_STATUS_NOT_SUPPORTED ? BENCH_EXIT_NOT_SUPPORTED : BENCH_EXIT_FAIL;
}

/* under mpirun every process is one rank; 0 or BENCH_EXIT_USAGE */
static int init_world(int *argc, char ***argv, const bench_opts_t *o, world_setup_t *ws) {
    ws->size = o->local_ranks > 0 ? o->local_ranks : 1;
    if (!tool_under_mpi()) return 0;
#ifdef MOE_BENCH_MPI
    if (o->local_ranks > 1) {
        fprintf(stderr, "moe_bench: --local-ranks under mpirun: use one or the other\n");
        return BENCH_EXIT_USAGE;
    }
    MPI_Init(argc, argv);
    MPI_Comm_rank(MPI_COMM_WORLD, &ws->rank);
    MPI_Comm_size(MPI_COMM_WORLD, &ws->size);
    ws->mpi = 1;
    ws->t0 = moe_now_s(); /* ranks on one machine share CLOCK_MONOTONIC; see the trace note */
#else
    (void)argc, (void)argv;
    fprintf(stderr, "moe_bench: started by mpirun but built without MPI: one rank each\n");
#endif
    return 0;
}

/* --replay: the layer takes the trace's E, K, router, activation, gate and priority, and its
 * capacity and sizes unless given */
static int apply_replay(bench_opts_t *o, bench_replay_t *rp) {
    if (bench_replay_read(o->replay_path, rp) != 0) return BENCH_EXIT_USAGE;
    moe_layer_config_t *c = &o->cfg;
    c->num_experts = rp->num_experts, c->top_k = rp->top_k;
    c->router = (moe_router_type_t)rp->router;
    c->activation = (moe_activation_t)rp->activation, c->gate = (moe_gate_t)rp->gate;
    c->priority = (moe_priority_t)rp->priority;
    if (!o->cap_given) c->capacity_factor = rp->capacity_factor;
    if (!o->dims_given[0] && rp->d_model > 0) c->d_model = rp->d_model;
    if (!o->dims_given[1] && rp->d_ff > 0) c->d_ff = rp->d_ff;
    return 0;
}

/* what the number of ranks rules out; 0 when the run can go ahead */
static int check_world(const bench_opts_t *o, const world_setup_t *ws) {
    const moe_layer_config_t *c = &o->cfg;
    const char *err = NULL;
    if (ws->size > 1) {
        if (c->num_experts % ws->size) err = "E must be divisible by the number of ranks";
        else if (o->check && (c->capacity_factor > 0 || c->noisy_gating ||
                              c->router == MOE_ROUTER_EXPERT_CHOICE))
            err = "--check on several ranks needs dropless token-choice routing without "
                  "gating noise (capacity, expert choice and noise are per source rank: no "
                  "single-rank reference)";
    } else if (o->routing.kind == BENCH_ROUTING_RANK_SKEW ||
               o->routing.kind == BENCH_ROUTING_ZERO_RANK) {
        printf("# moe_bench: routing %s: NOT_SUPPORTED on one rank (use --local-ranks P or "
               "mpirun). Nothing measured.\n", o->routing.text);
        return BENCH_EXIT_NOT_SUPPORTED;
    }
    if (!err) return 0;
    if (ws->rank == 0) fprintf(stderr, "moe_bench: %s\n", err);
    return BENCH_EXIT_USAGE;
}

/* the backend: the one asked for, else CUDA when a context can be created, else CPU (under
 * mpirun CUDA only when asked for: NCCL); its description goes to the header */
static int pick_backend(bench_opts_t *o, const world_setup_t *ws, char *text, size_t len) {
    if (ws->mpi && o->backend_given && o->backend == MOE_BACKEND_CUDA) {
        int lr = tool_local_rank();
        o->device = lr >= 0 ? lr : ws->rank;
#ifdef MOE_BENCH_CUDA
        int n = 0;
        if (cudaGetDeviceCount(&n) == cudaSuccess && n > 0) o->device %= n;
#endif
    }
    moe_context_t *probe = NULL;
    moe_status_t st = MOE_STATUS_SUCCESS;
    if (o->backend_given) {
        st = moe_context_create(&probe, o->backend, o->device, NULL);
    } else if (!ws->mpi && moe_context_create(&probe, MOE_BACKEND_CUDA, o->device, NULL) ==
                               MOE_STATUS_SUCCESS) {
        o->backend = MOE_BACKEND_CUDA;
    } else {
        o->backend = MOE_BACKEND_CPU;
        st = moe_context_create(&probe, MOE_BACKEND_CPU, 0, NULL);
    }
    moe_context_destroy(probe);
    if (st != MOE_STATUS_SUCCESS) {
        fprintf(stderr, "moe_bench: moe_context_create failed: %s\n  %s\n",
                moe_status_string(st), moe_last_error());
        return status_exit(st);
    }
    snprintf(text, len, "%s", o->backend == MOE_BACKEND_CUDA ? "cuda"
                              : o->backend_given             ? "cpu"
                                                             : "cpu (no CUDA context)");
    if (o->backend != MOE_BACKEND_CUDA) return 0;
#ifdef MOE_BENCH_CUDA
    struct cudaDeviceProp prop;
    const char *dev = "?";
    if (cudaGetDeviceProperties(&prop, o->device) == cudaSuccess) dev = prop.name;
    cudaSetDevice(o->device);
    snprintf(text, len, "cuda (device %d%s: %.100s)", o->device, ws->mpi ? " of rank 0" : "",
             dev);
    return 0;
#else
    fprintf(stderr, "moe_bench: built without the CUDA runtime: cannot feed a CUDA layer\n");
    return BENCH_EXIT_NOT_SUPPORTED;
#endif
}

/* one communicator per local rank (MPI / NCCL: one for this process; one rank: none) */
static int create_comms(const bench_opts_t *o, const world_setup_t *ws, moe_comm_t **comms,
                        bench_local_shared_t **sh) {
    moe_status_t st = MOE_STATUS_SUCCESS;
    if (ws->mpi) {
#ifdef MOE_BENCH_MPI
        st = o->backend == MOE_BACKEND_CUDA ? moe_comm_create_nccl(&comms[0], NULL)
                                            : moe_comm_create_mpi(&comms[0], NULL);
#endif
    } else if (ws->size > 1) {
        st = moe_comm_create_local(comms, ws->size);
        *sh = bench_local_shared_create(ws->size);
        if (!*sh && st == MOE_STATUS_SUCCESS) st = MOE_STATUS_ALLOC_FAILED;
    }
    (void)o;
    if (st == MOE_STATUS_SUCCESS) return 0;
    fprintf(stderr, "moe_bench: creating the communicator failed: %s\n  %s\n",
            moe_status_string(st), moe_last_error());
    return status_exit(st);
}

/* every rank's run: this process's (MPI, one rank) or a thread per local rank */
static int run_ranks(const bench_opts_t *o, const bench_replay_t *rp, const world_setup_t *ws,
                     moe_comm_t **comms, bench_local_shared_t *sh, const char *backend_text,
                     bench_out_t *out) {
    const int P = ws->mpi ? 1 : ws->size;
    bench_rank_arg_t *args = calloc((size_t)P, sizeof *args);
    pthread_t *th = calloc((size_t)P, sizeof *th);
    int rc = BENCH_EXIT_OK, started = 0;
    if (!args || !th) rc = BENCH_EXIT_FAIL;
    for (int q = 0; rc == BENCH_EXIT_OK && q < P; ++q) {
        args[q] = (bench_rank_arg_t){
            .o = o, .rp = rp, .comm = comms[q], .backend_text = backend_text, .t0 = ws->t0,
            .out = out,
            .w = {.kind = ws->mpi ? BENCH_WORLD_MPI : P > 1 ? BENCH_WORLD_LOCAL : BENCH_WORLD_SELF,
                  .rank = ws->mpi ? ws->rank : q, .size = ws->size, .sh = ws->mpi ? NULL : sh}};
        if (P == 1) {
            bench_run_rank(&args[q]);
            started = 1;
        } else if (pthread_create(&th[q], NULL, bench_run_rank, &args[q]) == 0) {
            started = q + 1;
        } else {
            /* the ranks already running wait for this one: break their barriers */
            bench_world_abort(&args[q].w);
            rc = BENCH_EXIT_FAIL;
        }
    }
    /* every started rank is joined, whatever the others returned: its arguments and the
     * shared state are freed after this */
    for (int q = 0; q < started; ++q) {
        if (P > 1) pthread_join(th[q], NULL);
        if (args[q].rc != BENCH_EXIT_OK && (rc == BENCH_EXIT_OK || q == 0)) rc = args[q].rc;
    }
    free(args), free(th);
    return rc;
}

/* rank 0: --json and --trace, also when only --check failed (the JSON says "check": "FAILED") */
static int write_outputs(const bench_opts_t *o, int P, const char *backend_text,
                         const bench_out_t *out) {
    int rc = 0;
    if (o->json_path &&
        bench_write_json(o->json_path, o, backend_text, P, omp_get_max_threads(),
                         bench_blas_threads(), out->rows, out->nrows, !out->check_failed) != 0)
        rc = BENCH_EXIT_FAIL;
    if (o->trace_path && bench_write_trace(o->trace_path, out->tb.ev, out->tb.n, P) != 0)
        rc = BENCH_EXIT_FAIL;
    return rc;
}

int main(int argc, char **argv) {
    bench_opts_t o;
    int rc = bench_parse_args(argc, argv, &o);
    if (rc != 0) return rc > 0 ? BENCH_EXIT_OK : BENCH_EXIT_USAGE;
    if (o.model_table) {
        bench_model_table(&o);
        return BENCH_EXIT_OK;
    }
    world_setup_t ws = {.t0 = moe_now_s()};
    bench_replay_t rp;
    memset(&rp, 0, sizeof rp);
    bench_out_t out = {0};
    moe_comm_t **comms = NULL;
    bench_local_shared_t *sh = NULL;
    char backend_text[160];
    if ((rc = init_world(&argc, &argv, &o, &ws)) != 0) return rc;
    if (o.replay_path && (rc = apply_replay(&o, &rp)) != 0) goto out;
    if ((rc = check_world(&o, &ws)) != 0) goto out;
    if (o.threads > 0) bench_set_threads(o.threads);
    if ((rc = pick_backend(&o, &ws, backend_text, sizeof backend_text)) != 0) goto out;
    comms = calloc((size_t)ws.size, sizeof *comms);
    if (!comms) {
        rc = BENCH_EXIT_FAIL;
        goto out;
    }
    if ((rc = create_comms(&o, &ws, comms, &sh)) != 0) goto out;
    rc = run_ranks(&o, o.replay_path ? &rp : NULL, &ws, comms, sh, backend_text, &out);
    if (ws.rank == 0 && (rc == BENCH_EXIT_OK || (out.check_failed && out.rows))) {
        int wrc = write_outputs(&o, ws.size, backend_text, &out);
        if (wrc) rc = wrc;
    }
out:
    for (int i = 0; i < out.nrows; ++i) free(out.rows[i].rank_rows), free(out.rows[i].rank_remote);
    free(out.rows), free(out.tb.ev);
    for (int q = 0; comms && q < ws.size; ++q) moe_comm_destroy(comms[q]);
    free(comms);
    bench_local_shared_destroy(sh);
    bench_replay_free(&rp);
#ifdef MOE_BENCH_MPI
    if (ws.mpi) {
        /* a failed rank ends the job: its peers may wait in a collective that never completes */
        if (rc != BENCH_EXIT_OK && rc != BENCH_EXIT_USAGE) MPI_Abort(MPI_COMM_WORLD, rc);
        MPI_Finalize();
    }
#endif
    return rc;
}
