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

static moe_status_t mpi_alltoall_i64(moe_comm_t *c, const int64_t *send, int64_t *recv,
                                     int64_t n) {
    MPI_Request req;
    MOE_MPI_CHECK(MPI_Ialltoall(send, (int)n, MPI_INT64_T, recv, (int)n, MPI_INT64_T,
                                MPI_COMM_OF(c), &req));
    return mpi_wait(c, &req, "MPI_Ialltoall");
}

static moe_status_t mpi_allreduce_f64(moe_comm_t *c, double *buf, int64_t n) {
    MPI_Request req;
    MOE_MPI_CHECK(
        MPI_Iallreduce(MPI_IN_PLACE, buf, (int)n, MPI_DOUBLE, MPI_SUM, MPI_COMM_OF(c), &req));
    return mpi_wait(c, &req, "MPI_Iallreduce");
}

static moe_status_t mpi_allgather_u64(moe_comm_t *c, uint64_t v, uint64_t *all) {
    MPI_Request req;
    MOE_MPI_CHECK(MPI_Iallgather(&v, 1, MPI_UINT64_T, all, 1, MPI_UINT64_T, MPI_COMM_OF(c), &req));
    return mpi_wait(c, &req, "MPI_Iallgather");
}

/* one pending all-to-allv: the request and what must live until it completes */
typedef struct {
    MPI_Request req;
    MPI_Datatype row;
    int counts[]; /* send counts, send displs, recv counts, recv displs: 4P ints */
} mpi_pending_t;

static moe_status_t mpi_ialltoallv_rows(moe_comm_t *c, const moe_memory_t *mem, const void *send,
                                        const int64_t *send_rows, const int64_t *send_off,
                                        void *recv, const int64_t *recv_rows,
                                        const int64_t *recv_off, size_t row_bytes, void *stream,
                                        void **req) {
    (void)mem, (void)stream;
    int P = c->size;
    *req = NULL;
    mpi_pending_t *p = (mpi_pending_t *)malloc(sizeof *p + (size_t)(4 * P) * sizeof(int));
    if (!p) return MOE_ERR(MOE_STATUS_ALLOC_FAILED, "alltoallv request");
    int *sc = p->counts, *sd = sc + P, *rcn = sc + 2 * P, *rd = sc + 3 * P;
    for (int q = 0; q < P; ++q) {
        sc[q] = (int)send_rows[q];
        sd[q] = (int)send_off[q];
        rcn[q] = (int)recv_rows[q];
        rd[q] = (int)recv_off[q];
    }
    moe_status_t st = MOE_STATUS_SUCCESS;
    MOE_MPI_CHECK_GOTO(MPI_Type_contiguous((int)row_bytes, MPI_BYTE, &p->row), st, no_type);
    MOE_MPI_CHECK_GOTO(MPI_Type_commit(&p->row), st, typed);
    MOE_MPI_CHECK_GOTO(
        MPI_Ialltoallv(send, sc, sd, p->row, recv, rcn, rd, p->row, MPI_COMM_OF(c), &p->req), st,
        typed);
    *req = p;
    return MOE_STATUS_SUCCESS;
typed:
    MPI_Type_free(&p->row);
no_type:
    free(p);
    return st;
}

static moe_status_t mpi_wait_pending(moe_comm_t *c, void *req) {
    mpi_pending_t *p = (mpi_pending_t *)req;
    moe_status_t st = mpi_wait(c, &p->req, "MPI_Ialltoallv");
    if (st == MOE_STATUS_SUCCESS) {
        /* a request still pending keeps its buffers: leak it rather than free what MPI uses */
        MPI_Type_free(&p->row);
        free(p);
    }
    return st;
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
    MPI_Request req;
    MOE_MPI_CHECK(
        MPI_Iallreduce(MPI_IN_PLACE, buf, (int)n, MPI_FLOAT, MPI_SUM, MPI_COMM_OF(c), &req));
    return mpi_wait(c, &req, "MPI_Iallreduce");
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
