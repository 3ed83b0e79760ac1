/* comm_mpi.c - MPI transport for the CPU backend (host buffers), any number of processes.
 *
 * Every collective is the non-blocking MPI-3 form polled with MPI_Test until the communicator's
 * timeout, so a peer that never joins ends in MOE_STATUS_COMM_ERROR instead of a silent hang
 * (a peer that dies is reported by the MPI runtime, which names its rank).
 *
 * A second duplicate carries notices: a rank that leaves a call it cannot finish (ops->abort)
 * sends each peer one, and every wait polls for them beside its request, so a peer waiting in a
 * collective the failed rank will never join returns COMM_ERROR at once. The abandoned request
 * stays pending; the communicator is broken from then on. */
#define _POSIX_C_SOURCE 200809L

#include <mpi.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "comm/comm.h"
#include "core/check_mpi.h"
#include "core/clock.h"
#include "core/status.h"

typedef struct {
    MPI_Comm comm;   /* our duplicate, errors returned instead of fatal */
    MPI_Comm notice; /* a second one: the notices of ranks that left a call */
    struct mpi_sent *sent; /* the notices this rank sent, until destroy */
} mpi_impl_t;

/* one notice: who left, with which status and why (a fixed-size message) */
typedef struct {
    int32_t rank, status;
    char why[248];
} mpi_notice_t;

/* what must outlive the notice sends: the message and one request per peer */
struct mpi_sent {
    mpi_notice_t msg;
    MPI_Request req[];
};

#define MOE_NOTICE_TAG 77

/* a peer's notice, if one came: COMM_ERROR naming it */
static moe_status_t poll_notice(const moe_comm_t *c) {
    mpi_impl_t *m = (mpi_impl_t *)c->impl;
    int flag = 0;
    MPI_Status ms;
    MOE_MPI_CHECK(MPI_Iprobe(MPI_ANY_SOURCE, MOE_NOTICE_TAG, m->notice, &flag, &ms));
    if (!flag) return MOE_STATUS_SUCCESS;
    mpi_notice_t n;
    MOE_MPI_CHECK(MPI_Recv(&n, (int)sizeof n, MPI_BYTE, ms.MPI_SOURCE, MOE_NOTICE_TAG, m->notice,
                           MPI_STATUS_IGNORE));
    n.why[sizeof n.why - 1] = '\0';
    return MOE_ERR(MOE_STATUS_COMM_ERROR,
                   "rank %d: rank %d left a collective call it could not finish (%s: %s); the "
                   "communicator is unusable",
                   c->rank, (int)n.rank, moe_status_string((moe_status_t)n.status), n.why);
}

static void mpi_abort_call(moe_comm_t *c, moe_status_t status, const char *why) {
    mpi_impl_t *m = (mpi_impl_t *)c->impl;
    if (m->sent) return;
    m->sent = (struct mpi_sent *)malloc(sizeof *m->sent + (size_t)c->size * sizeof(MPI_Request));
    if (!m->sent) return; /* the peers then wait for their timeout */
    mpi_notice_t *n = &m->sent->msg;
    memset(n, 0, sizeof *n);
    n->rank = c->rank;
    n->status = (int32_t)status;
    snprintf(n->why, sizeof n->why, "%s", why ? why : "");
    for (int q = 0; q < c->size; ++q) {
        m->sent->req[q] = MPI_REQUEST_NULL;
        if (q != c->rank)
            MPI_Isend(n, (int)sizeof *n, MPI_BYTE, q, MOE_NOTICE_TAG, m->notice, &m->sent->req[q]);
    }
}

/* waits for req, at most the communicator's timeout, or until a peer's notice comes */
static moe_status_t mpi_wait(const moe_comm_t *c, MPI_Request *req, const char *what) {
    double t0 = moe_now_s();
    struct timespec nap = {0, 20000}; /* 20 us between polls */
    for (long spins = 0;; ++spins) {
        int done = 0;
        MOE_MPI_CHECK(MPI_Test(req, &done, MPI_STATUS_IGNORE));
        if (done) return MOE_STATUS_SUCCESS;
        if ((spins & 63) == 0) MOE_CHECK(poll_notice(c));
        if (spins > 1000) nanosleep(&nap, NULL);
        if (moe_now_s() - t0 > c->timeout_s) {
            /* the request stays pending: the communicator is unusable from here on */
            return MOE_ERR(MOE_STATUS_COMM_ERROR,
                           "rank %d waited %.1f s in %s: a peer rank never joined (mismatched "
                           "calls or a hung process)",
                           c->rank, c->timeout_s, what);
        }
    }
}

#define MPI_COMM_OF(c) (((mpi_impl_t *)(c)->impl)->comm)

/* Every collective works on buffers of its own (staged in and out): a collective that is
 * abandoned (timeout, a peer's notice, a failed wait) stays pending inside MPI, which may still
 * write into its receive buffer when a peer's data arrive later, so that buffer must never be
 * the caller's (freed with its layer) and is never freed while the request is pending: it is
 * left to the process (the communicator is broken, and a program ends soon after). */

static moe_status_t mpi_alltoall_i64(moe_comm_t *c, const int64_t *send, int64_t *recv,
                                     int64_t n) {
    const size_t bytes = (size_t)c->size * (size_t)n * sizeof(int64_t);
    int64_t *stage = (int64_t *)malloc(bytes ? 2 * bytes : 1);
    if (!stage) return MOE_ERR(MOE_STATUS_ALLOC_FAILED, "all-to-all staging");
    int64_t *sb = stage, *rb = stage + (size_t)c->size * (size_t)n;
    if (bytes) memcpy(sb, send, bytes);
    MPI_Request req;
    int rc = MPI_Ialltoall(sb, (int)n, MPI_INT64_T, rb, (int)n, MPI_INT64_T, MPI_COMM_OF(c), &req);
    if (rc != MPI_SUCCESS) {
        free(stage);
        return moe__mpi_error(rc, "MPI_Ialltoall", __func__, __FILE__, __LINE__);
    }
    moe_status_t st = mpi_wait(c, &req, "MPI_Ialltoall");
    if (st != MOE_STATUS_SUCCESS) return st; /* stage stays with the pending request */
    if (bytes) memcpy(recv, rb, bytes);
    free(stage);
    return MOE_STATUS_SUCCESS;
}

/* in-place sum of n values of type t (size esz) */
static moe_status_t allreduce(moe_comm_t *c, void *buf, int64_t n, MPI_Datatype t, size_t esz) {
    const size_t bytes = (size_t)n * esz;
    void *stage = malloc(bytes ? bytes : 1);
    if (!stage) return MOE_ERR(MOE_STATUS_ALLOC_FAILED, "all-reduce staging");
    if (bytes) memcpy(stage, buf, bytes);
    MPI_Request req;
    int rc = MPI_Iallreduce(MPI_IN_PLACE, stage, (int)n, t, MPI_SUM, MPI_COMM_OF(c), &req);
    if (rc != MPI_SUCCESS) {
        free(stage);
        return moe__mpi_error(rc, "MPI_Iallreduce", __func__, __FILE__, __LINE__);
    }
    moe_status_t st = mpi_wait(c, &req, "MPI_Iallreduce");
    if (st != MOE_STATUS_SUCCESS) return st;
    if (bytes) memcpy(buf, stage, bytes);
    free(stage);
    return MOE_STATUS_SUCCESS;
}

static moe_status_t mpi_allreduce_f64(moe_comm_t *c, double *buf, int64_t n) {
    return allreduce(c, buf, n, MPI_DOUBLE, sizeof(double));
}

static moe_status_t mpi_allgather_u64(moe_comm_t *c, uint64_t v, uint64_t *all) {
    uint64_t *stage = (uint64_t *)malloc((size_t)(c->size + 1) * sizeof(uint64_t));
    if (!stage) return MOE_ERR(MOE_STATUS_ALLOC_FAILED, "all-gather staging");
    stage[0] = v;
    MPI_Request req;
    int rc = MPI_Iallgather(stage, 1, MPI_UINT64_T, stage + 1, 1, MPI_UINT64_T, MPI_COMM_OF(c),
                            &req);
    if (rc != MPI_SUCCESS) {
        free(stage);
        return moe__mpi_error(rc, "MPI_Iallgather", __func__, __FILE__, __LINE__);
    }
    moe_status_t st = mpi_wait(c, &req, "MPI_Iallgather");
    if (st != MOE_STATUS_SUCCESS) return st;
    memcpy(all, stage + 1, (size_t)c->size * sizeof(uint64_t));
    free(stage);
    return MOE_STATUS_SUCCESS;
}

/* one pending all-to-allv: the request and what must live until it completes (the counts, the
 * staged rows both ways, where the received rows go) */
typedef struct {
    MPI_Request req;
    MPI_Datatype row;
    void *recv;            /* the caller's receive buffer, filled at the wait */
    size_t row_bytes;
    char *sbuf, *rbuf;     /* staged rows, send and receive */
    int64_t rows_in;       /* rows received in all */
    int P;
    int64_t *recv_at;      /* (P) the caller's receive offset of each peer's rows */
    int counts[];          /* send counts, send displs, recv counts, recv displs: 4P ints */
} mpi_pending_t;

static moe_status_t mpi_ialltoallv_rows(moe_comm_t *c, const moe_memory_t *mem, const void *send,
                                        const int64_t *send_rows, const int64_t *send_off,
                                        void *recv, const int64_t *recv_rows,
                                        const int64_t *recv_off, size_t row_bytes, void *stream,
                                        void **req) {
    (void)mem, (void)stream;
    int P = c->size;
    *req = NULL;
    mpi_pending_t *p = (mpi_pending_t *)calloc(1, sizeof *p + (size_t)(4 * P) * sizeof(int));
    if (!p) return MOE_ERR(MOE_STATUS_ALLOC_FAILED, "alltoallv request");
    p->P = P;
    int *sc = p->counts, *sd = sc + P, *rcn = sc + 2 * P, *rd = sc + 3 * P;
    /* staged packed, peer after peer; the received rows go to recv_off at the wait */
    int64_t out = 0, in = 0;
    for (int q = 0; q < P; ++q) {
        sc[q] = (int)send_rows[q];
        sd[q] = (int)out;
        out += send_rows[q];
        rcn[q] = (int)recv_rows[q];
        rd[q] = (int)in;
        in += recv_rows[q];
    }
    p->recv = recv;
    p->row_bytes = row_bytes;
    p->rows_in = in;
    p->sbuf = (char *)malloc(out ? (size_t)out * row_bytes : 1);
    p->rbuf = (char *)malloc(in ? (size_t)in * row_bytes : 1);
    p->recv_at = (int64_t *)malloc((size_t)P * sizeof(int64_t));
    moe_status_t st = MOE_STATUS_SUCCESS;
    if (!p->sbuf || !p->rbuf || !p->recv_at) {
        st = MOE_ERR(MOE_STATUS_ALLOC_FAILED, "alltoallv staging of %lld + %lld rows",
                     (long long)out, (long long)in);
        goto no_type;
    }
    for (int q = 0; q < P; ++q)
        if (send_rows[q])
            memcpy(p->sbuf + (size_t)sd[q] * row_bytes,
                   (const char *)send + (size_t)send_off[q] * row_bytes,
                   (size_t)send_rows[q] * row_bytes);
    /* where each peer's rows land in the caller's buffer, for the wait */
    for (int q = 0; q < P; ++q) p->recv_at[q] = recv_off[q];
    MOE_MPI_CHECK_GOTO(MPI_Type_contiguous((int)row_bytes, MPI_BYTE, &p->row), st, no_type);
    MOE_MPI_CHECK_GOTO(MPI_Type_commit(&p->row), st, typed);
    MOE_MPI_CHECK_GOTO(MPI_Ialltoallv(p->sbuf, sc, sd, p->row, p->rbuf, rcn, rd, p->row,
                                      MPI_COMM_OF(c), &p->req),
                       st, typed);
    *req = p;
    return MOE_STATUS_SUCCESS;
typed:
    MPI_Type_free(&p->row);
no_type:
    free(p->sbuf), free(p->rbuf), free(p->recv_at), free(p);
    return st;
}

static moe_status_t mpi_wait_pending(moe_comm_t *c, void *req) {
    mpi_pending_t *p = (mpi_pending_t *)req;
    moe_status_t st = mpi_wait(c, &p->req, "MPI_Ialltoallv");
    /* a request still pending keeps its buffers: leave them to MPI rather than free them */
    if (st != MOE_STATUS_SUCCESS) return st;
    const int *rcn = p->counts + 2 * p->P, *rd = p->counts + 3 * p->P;
    for (int q = 0; q < p->P; ++q)
        if (rcn[q])
            memcpy((char *)p->recv + (size_t)p->recv_at[q] * p->row_bytes,
                   p->rbuf + (size_t)rd[q] * p->row_bytes, (size_t)rcn[q] * p->row_bytes);
    MPI_Type_free(&p->row);
    free(p->sbuf), free(p->rbuf), free(p->recv_at), free(p);
    return MOE_STATUS_SUCCESS;
}

static moe_status_t mpi_alltoallv_rows(moe_comm_t *c, const moe_memory_t *mem, const void *send,
                                       const int64_t *send_rows, const int64_t *send_off,
                                       void *recv, const int64_t *recv_rows,
                                       const int64_t *recv_off, size_t row_bytes, void *stream) {
    void *req = NULL;
    MOE_CHECK(mpi_ialltoallv_rows(c, mem, send, send_rows, send_off, recv, recv_rows, recv_off,
                                  row_bytes, stream, &req));
    return mpi_wait_pending(c, req);
}

static moe_status_t mpi_allreduce_f32(moe_comm_t *c, const moe_memory_t *mem, float *buf, int64_t n,
                                      void *stream) {
    (void)mem, (void)stream;
    return allreduce(c, buf, n, MPI_FLOAT, sizeof(float));
}

static moe_status_t mpi_barrier(moe_comm_t *c) {
    MPI_Request req;
    MOE_MPI_CHECK(MPI_Ibarrier(MPI_COMM_OF(c), &req));
    return mpi_wait(c, &req, "MPI_Ibarrier");
}
static void mpi_destroy(moe_comm_t *c) {
    mpi_impl_t *m = (mpi_impl_t *)c->impl;
    int finalized = 0;
    MPI_Finalized(&finalized);
    if (!finalized && !c->broken) {
        MPI_Comm_free(&m->comm);
        MPI_Comm_free(&m->notice);
    }
    if (m->sent) {
        /* a small notice is buffered at once; one still in flight keeps its memory */
        int done = finalized;
        if (!finalized) MPI_Testall(c->size, m->sent->req, &done, MPI_STATUSES_IGNORE);
        if (done) free(m->sent);
    }
    free(m);
}

static const moe_comm_ops_t mpi_ops = {
    .name = "mpi",
    .alltoall_i64 = mpi_alltoall_i64,
    .allreduce_f64 = mpi_allreduce_f64,
    .allgather_u64 = mpi_allgather_u64,
    .alltoallv_rows = mpi_alltoallv_rows,
    .ialltoallv_rows = mpi_ialltoallv_rows,
    .wait = mpi_wait_pending,
    .allreduce_f32 = mpi_allreduce_f32,
    .barrier = mpi_barrier,
    .abort = mpi_abort_call,
    .destroy = mpi_destroy,
};

moe_status_t moe_comm_create_mpi(moe_comm_t **comm, const void *mpi_comm) {
    MOE_ARG(comm != NULL, "comm is NULL");
    *comm = NULL;
    int inited = 0;
    MPI_Initialized(&inited);
    MOE_ARG(inited, "MPI is not initialised: call MPI_Init first");
    MPI_Comm base = mpi_comm ? *(const MPI_Comm *)mpi_comm : MPI_COMM_WORLD;
    mpi_impl_t *m = (mpi_impl_t *)calloc(1, sizeof *m);
    if (!m) return MOE_ERR(MOE_STATUS_ALLOC_FAILED, "MPI communicator");
    moe_status_t st = MOE_STATUS_SUCCESS;
    MOE_MPI_CHECK_GOTO(MPI_Comm_dup(base, &m->comm), st, fail);
    MPI_Comm_set_errhandler(m->comm, MPI_ERRORS_RETURN);
    MOE_MPI_CHECK_GOTO(MPI_Comm_dup(m->comm, &m->notice), st, dup_fail);
    MPI_Comm_set_errhandler(m->notice, MPI_ERRORS_RETURN);
    int rank = 0, size = 1;
    MPI_Comm_rank(m->comm, &rank);
    MPI_Comm_size(m->comm, &size);
    st = moe__comm_alloc(comm, MOE_COMM_KIND_MPI, rank, size, &mpi_ops, m);
    if (st == MOE_STATUS_SUCCESS) return st;
    MPI_Comm_free(&m->notice);
dup_fail:
    MPI_Comm_free(&m->comm);
fail:
    free(m);
    return st;
}
