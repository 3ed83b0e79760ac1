/* comm_local.c - R ranks as threads of one process: for tests, and for P ranks on one GPU where
 * NCCL cannot run two ranks on a device.
 *
 * Every collective is: publish this rank's pointers in its slot, wait at a barrier, read the
 * peers' slots, wait at a second barrier (so no peer reuses a buffer still being read). The
 * barrier waits at most the communicator's timeout and then names the ranks that never came.
 * Each slot also names its collective and size, checked by every rank after the first barrier:
 * ranks in different collectives all return COMM_ERROR instead of reading each other's
 * buffers. A rank that leaves a call it cannot finish (ops->abort) wakes every waiting peer. */
#define _POSIX_C_SOURCE 200809L

#include <errno.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "comm/comm.h"
#include "core/status.h"

enum { OP_ALLTOALL_I64 = 1, OP_ALLREDUCE_F64, OP_ALLGATHER_U64, OP_ALLTOALLV_ROWS, OP_BARRIER };
static const char *const op_names[] = {"", "alltoall_i64", "allreduce_f64", "allgather_u64",
                                       "alltoallv_rows", "barrier"};

typedef struct {
    int op;    /* the collective this rank is in */
    int64_t n; /* and its size (elements, or row bytes) */
    const void *send;
    const int64_t *send_rows, *send_off;
    const int64_t *i64;
    double *f64;
    float *f32;
    uint64_t u64;
} local_slot_t;

typedef struct {
    int size;
    int refs;
    pthread_mutex_t mu;
    pthread_cond_t cv;
    uint64_t generation;
    int arrived;
    int aborted;
    int abort_rank; /* the rank that left (timed out, or failed in a call) */
    moe_status_t abort_status;
    char abort_why[512];
    int *here; /* (size) rank arrived in the current generation */
    local_slot_t *slot;
    double *scratch_f64; /* shared reduction buffer */
    int64_t scratch_n;
} local_shared_t;

/* the error of a rank that finds the group aborted (called with the lock held, releases it) */
static moe_status_t aborted_error(moe_comm_t *c, local_shared_t *sh) {
    int who = sh->abort_rank;
    moe_status_t why_st = sh->abort_status;
    char why[512];
    memcpy(why, sh->abort_why, sizeof why);
    pthread_mutex_unlock(&sh->mu);
    return MOE_ERR(MOE_STATUS_COMM_ERROR,
                   "rank %d: rank %d left a collective call it could not finish (%s: %s); the "
                   "communicator is unusable",
                   c->rank, who, moe_status_string(why_st), why);
}

static moe_status_t local_barrier(moe_comm_t *c) {
    local_shared_t *sh = (local_shared_t *)c->impl;
    pthread_mutex_lock(&sh->mu);
    if (sh->aborted) return aborted_error(c, sh);
    uint64_t gen = sh->generation;
    sh->here[c->rank] = 1;
    if (++sh->arrived == sh->size) {
        sh->arrived = 0;
        memset(sh->here, 0, (size_t)sh->size * sizeof(int));
        sh->generation++;
        pthread_cond_broadcast(&sh->cv);
        pthread_mutex_unlock(&sh->mu);
        return MOE_STATUS_SUCCESS;
    }
    struct timespec dl;
    clock_gettime(CLOCK_REALTIME, &dl);
    double whole = (double)(time_t)c->timeout_s;
    dl.tv_sec += (time_t)whole;
    dl.tv_nsec += (long)((c->timeout_s - whole) * 1e9);
    if (dl.tv_nsec >= 1000000000L) dl.tv_sec += 1, dl.tv_nsec -= 1000000000L;
    int rc = 0;
    while (sh->generation == gen && !sh->aborted && rc != ETIMEDOUT)
        rc = pthread_cond_timedwait(&sh->cv, &sh->mu, &dl);
    if (sh->generation != gen) {
        pthread_mutex_unlock(&sh->mu);
        return MOE_STATUS_SUCCESS;
    }
    if (sh->aborted) return aborted_error(c, sh);
    char missing[256] = "";
    size_t used = 0;
    for (int q = 0; q < sh->size && used + 12 < sizeof missing; ++q)
        if (!sh->here[q]) used += (size_t)snprintf(missing + used, sizeof missing - used, " %d", q);
    sh->aborted = 1;
    sh->abort_rank = c->rank;
    sh->abort_status = MOE_STATUS_COMM_ERROR;
    snprintf(sh->abort_why, sizeof sh->abort_why, "it waited %.1f s for ranks%s", c->timeout_s,
             missing);
    pthread_cond_broadcast(&sh->cv);
    pthread_mutex_unlock(&sh->mu);
    return MOE_ERR(MOE_STATUS_COMM_ERROR,
                   "rank %d waited %.1f s in a collective; ranks that never arrived:%s",
                   c->rank, c->timeout_s, missing);
}

static void local_abort(moe_comm_t *c, moe_status_t status, const char *why) {
    local_shared_t *sh = (local_shared_t *)c->impl;
    pthread_mutex_lock(&sh->mu);
    if (!sh->aborted) {
        sh->aborted = 1;
        sh->abort_rank = c->rank;
        sh->abort_status = status;
        snprintf(sh->abort_why, sizeof sh->abort_why, "%s", why ? why : "");
    }
    pthread_cond_broadcast(&sh->cv);
    pthread_mutex_unlock(&sh->mu);
}

/* The first barrier of a collective, then the check that every rank is in this collective
 * with this size. Every rank reads every slot, so all of them see a mismatch and leave
 * together (after the second barrier, before anyone reads a peer's buffers). */
static moe_status_t enter(moe_comm_t *c, int op, int64_t n) {
    local_shared_t *sh = (local_shared_t *)c->impl;
    sh->slot[c->rank].op = op;
    sh->slot[c->rank].n = n;
    MOE_CHECK(local_barrier(c));
    for (int q = 0; q < sh->size; ++q) {
        if (sh->slot[q].op == op && sh->slot[q].n == n) continue;
        moe_status_t st = MOE_ERR(
            MOE_STATUS_COMM_ERROR,
            "rank %d is in collective %s of %lld while rank %d is in %s of %lld: the ranks' "
            "call sequences differ (nothing was exchanged)",
            c->rank, op_names[op], (long long)n, q, op_names[sh->slot[q].op],
            (long long)sh->slot[q].n);
        moe_status_t b = local_barrier(c);
        return b != MOE_STATUS_SUCCESS ? b : st;
    }
    return MOE_STATUS_SUCCESS;
}

static moe_status_t local_alltoall_i64(moe_comm_t *c, const int64_t *send, int64_t *recv,
                                       int64_t n) {
    local_shared_t *sh = (local_shared_t *)c->impl;
    sh->slot[c->rank].i64 = send;
    MOE_CHECK(enter(c, OP_ALLTOALL_I64, n));
    for (int q = 0; q < sh->size; ++q)
        memcpy(recv + (int64_t)q * n, sh->slot[q].i64 + (int64_t)c->rank * n,
               (size_t)n * sizeof(int64_t));
    return local_barrier(c);
}

static moe_status_t local_allreduce_f64(moe_comm_t *c, double *buf, int64_t n) {
    local_shared_t *sh = (local_shared_t *)c->impl;
    sh->slot[c->rank].f64 = buf;
    MOE_CHECK(enter(c, OP_ALLREDUCE_F64, n));
    /* rank 0 sums in rank order into the shared scratch; everyone copies it out */
    moe_status_t st = MOE_STATUS_SUCCESS;
    if (c->rank == 0) {
        if (sh->scratch_n < n) {
            free(sh->scratch_f64);
            sh->scratch_f64 = (double *)malloc((size_t)n * sizeof(double));
            sh->scratch_n = sh->scratch_f64 ? n : 0;
        }
        if (!sh->scratch_f64 && n > 0) {
            st = MOE_ERR(MOE_STATUS_ALLOC_FAILED, "reduction scratch");
        } else {
            for (int64_t i = 0; i < n; ++i) {
                double acc = 0.0;
                for (int q = 0; q < sh->size; ++q) acc += sh->slot[q].f64[i];
                sh->scratch_f64[i] = acc;
            }
        }
    }
    MOE_CHECK(local_barrier(c));
    if (sh->scratch_n >= n) memcpy(buf, sh->scratch_f64, (size_t)n * sizeof(double));
    MOE_CHECK(local_barrier(c));
    if (sh->scratch_n < n)
        return st != MOE_STATUS_SUCCESS ? st
                                        : MOE_ERR(MOE_STATUS_ALLOC_FAILED, "reduction scratch");
    return MOE_STATUS_SUCCESS;
}

static moe_status_t local_allgather_u64(moe_comm_t *c, uint64_t v, uint64_t *all) {
    local_shared_t *sh = (local_shared_t *)c->impl;
    sh->slot[c->rank].u64 = v;
    MOE_CHECK(enter(c, OP_ALLGATHER_U64, 1));
    for (int q = 0; q < sh->size; ++q) all[q] = sh->slot[q].u64;
    return local_barrier(c);
}

static moe_status_t local_alltoallv_rows(moe_comm_t *c, const moe_memory_t *mem, const void *send,
                                         const int64_t *send_rows, const int64_t *send_off,
                                         void *recv, const int64_t *recv_rows,
                                         const int64_t *recv_off, size_t row_bytes,
                                         void *stream) {
    local_shared_t *sh = (local_shared_t *)c->impl;
    const int me = c->rank;
    /* the send buffer must be complete before a peer reads it */
    MOE_CHECK(moe_memory_sync(mem, stream));
    sh->slot[me].send = send;
    sh->slot[me].send_rows = send_rows;
    sh->slot[me].send_off = send_off;
    MOE_CHECK(enter(c, OP_ALLTOALLV_ROWS, (int64_t)row_bytes));
    moe_status_t st = MOE_STATUS_SUCCESS;
    for (int q = 0; q < sh->size && st == MOE_STATUS_SUCCESS; ++q) {
        int64_t rows = sh->slot[q].send_rows[me];
        if (rows != recv_rows[q]) {
            st = MOE_ERR(MOE_STATUS_INTERNAL_ERROR,
                         "rank %d expected %lld rows from rank %d, which sends %lld", me,
                         (long long)recv_rows[q], q, (long long)rows);
            break;
        }
        if (rows == 0) continue;
        const char *src = (const char *)sh->slot[q].send + sh->slot[q].send_off[me] * row_bytes;
        char *dst = (char *)recv + recv_off[q] * row_bytes;
        st = moe_memory_copy(mem, dst, src, (size_t)rows * row_bytes, MOE_COPY_D2D, stream);
    }
    /* our reads of the peers' buffers must be done before they move on */
    moe_status_t st2 = moe_memory_sync(mem, stream);
    MOE_CHECK(local_barrier(c));
    return st != MOE_STATUS_SUCCESS ? st : st2;
}

/* threads in one process: the exchange is a copy, done at once */
static moe_status_t local_ialltoallv_rows(moe_comm_t *c, const moe_memory_t *mem, const void *send,
                                          const int64_t *send_rows, const int64_t *send_off,
                                          void *recv, const int64_t *recv_rows,
                                          const int64_t *recv_off, size_t row_bytes,
                                          void *stream, void **req) {
    *req = NULL;
    return local_alltoallv_rows(c, mem, send, send_rows, send_off, recv, recv_rows, recv_off,
                                row_bytes, stream);
}

static moe_status_t local_wait(moe_comm_t *c, void *req) {
    (void)c, (void)req;
    return MOE_STATUS_SUCCESS;
}

static moe_status_t local_allreduce_f32(moe_comm_t *c, const moe_memory_t *mem, float *buf,
                                        int64_t n, void *stream) {
    /* through host doubles: summed in rank order, the same on every rank */
    double *h = (double *)malloc((size_t)(n > 0 ? n : 1) * sizeof(double));
    float *f = (float *)malloc((size_t)(n > 0 ? n : 1) * sizeof(float));
    moe_status_t st = MOE_STATUS_SUCCESS;
    if (!h || !f) st = MOE_ERR(MOE_STATUS_ALLOC_FAILED, "allreduce staging of %lld", (long long)n);
    if (st == MOE_STATUS_SUCCESS)
        st = moe_memory_copy(mem, f, buf, (size_t)n * sizeof(float), MOE_COPY_D2H, stream);
    if (st == MOE_STATUS_SUCCESS) st = moe_memory_sync(mem, stream);
    if (st == MOE_STATUS_SUCCESS)
        for (int64_t i = 0; i < n; ++i) h[i] = f[i];
    /* every rank takes part in the collective even after a local failure */
    moe_status_t cs = local_allreduce_f64(c, h, n);
    if (st == MOE_STATUS_SUCCESS) st = cs;
    if (st == MOE_STATUS_SUCCESS) {
        for (int64_t i = 0; i < n; ++i) f[i] = (float)h[i];
        st = moe_memory_copy(mem, buf, f, (size_t)n * sizeof(float), MOE_COPY_H2D, stream);
        if (st == MOE_STATUS_SUCCESS) st = moe_memory_sync(mem, stream);
    }
    free(h), free(f);
    return st;
}

/* moe_comm_barrier: tagged like the others, so it never matches another collective's barrier */
static moe_status_t local_barrier_call(moe_comm_t *c) {
    MOE_CHECK(enter(c, OP_BARRIER, 0));
    return local_barrier(c);
}

static void local_destroy(moe_comm_t *c) {
    local_shared_t *sh = (local_shared_t *)c->impl;
    pthread_mutex_lock(&sh->mu);
    int last = --sh->refs == 0;
    pthread_mutex_unlock(&sh->mu);
    if (!last) return;
    pthread_mutex_destroy(&sh->mu);
    pthread_cond_destroy(&sh->cv);
    free(sh->here), free(sh->slot), free(sh->scratch_f64);
    free(sh);
}

static const moe_comm_ops_t local_ops = {
    .name = "local",
    .alltoall_i64 = local_alltoall_i64,
    .allreduce_f64 = local_allreduce_f64,
    .allgather_u64 = local_allgather_u64,
    .alltoallv_rows = local_alltoallv_rows,
    .ialltoallv_rows = local_ialltoallv_rows,
    .wait = local_wait,
    .allreduce_f32 = local_allreduce_f32,
    .barrier = local_barrier_call,
    .abort = local_abort,
    .destroy = local_destroy,
};

moe_status_t moe_comm_create_local(moe_comm_t **comms, int num_ranks) {
    MOE_ARG(comms != NULL, "comms is NULL");
    MOE_ARG(num_ranks >= 1 && num_ranks <= 1024, "num_ranks %d is not in [1, 1024]", num_ranks);
    for (int r = 0; r < num_ranks; ++r) comms[r] = NULL;
    local_shared_t *sh = (local_shared_t *)calloc(1, sizeof *sh);
    if (!sh) return MOE_ERR(MOE_STATUS_ALLOC_FAILED, "local communicator");
    sh->size = num_ranks;
    sh->here = (int *)calloc((size_t)num_ranks, sizeof(int));
    sh->slot = (local_slot_t *)calloc((size_t)num_ranks, sizeof(local_slot_t));
    if (!sh->here || !sh->slot) {
        free(sh->here), free(sh->slot), free(sh);
        return MOE_ERR(MOE_STATUS_ALLOC_FAILED, "local communicator slots");
    }
    pthread_mutex_init(&sh->mu, NULL);
    pthread_cond_init(&sh->cv, NULL);
    for (int r = 0; r < num_ranks; ++r) {
        moe_status_t st = moe__comm_alloc(&comms[r], MOE_COMM_KIND_LOCAL, r, num_ranks,
                                          &local_ops, sh);
        if (st != MOE_STATUS_SUCCESS) {
            for (int k = 0; k < r; ++k) free(comms[k]), comms[k] = NULL;
            pthread_mutex_destroy(&sh->mu);
            pthread_cond_destroy(&sh->cv);
            free(sh->here), free(sh->slot), free(sh);
            return st;
        }
        sh->refs++;
    }
    return MOE_STATUS_SUCCESS;
}
