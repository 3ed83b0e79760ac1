/* comm.c - moe_comm_*: the public communicator calls and the checked collective wrappers. */
#include "comm/comm.h"

#include <math.h>
#include <stdlib.h>

#include "core/status.h"

moe_status_t moe__comm_alloc(moe_comm_t **out, moe_comm_kind_t kind, int rank, int size,
                             const moe_comm_ops_t *ops, void *impl) {
    moe_comm_t *c = (moe_comm_t *)calloc(1, sizeof *c);
    if (!c) return MOE_ERR(MOE_STATUS_ALLOC_FAILED, "communicator handle");
    c->magic = MOE_COMM_MAGIC;
    c->kind = kind;
    c->rank = rank;
    c->size = size;
    c->ops = ops;
    c->impl = impl;
    c->timeout_s = 300.0;
    const char *env = getenv("MOE_COMM_TIMEOUT_S");
    if (env) {
        double v = atof(env);
        if (v > 0.0) c->timeout_s = v;
    }
    *out = c;
    return MOE_STATUS_SUCCESS;
}

#define MOE_COMM_ARG(c)                                                                        \
    MOE_ARG((c) != NULL && (c)->magic == MOE_COMM_MAGIC, "comm is %s",                         \
            (c) == NULL ? "NULL" : "not a live moe_comm_t")

int moe_comm_rank(const moe_comm_t *comm) {
    return comm && comm->magic == MOE_COMM_MAGIC ? comm->rank : -1;
}

int moe_comm_size(const moe_comm_t *comm) {
    return comm && comm->magic == MOE_COMM_MAGIC ? comm->size : -1;
}

moe_status_t moe_comm_set_timeout(moe_comm_t *comm, double seconds) {
    MOE_COMM_ARG(comm);
    MOE_ARG(seconds > 0.0 && isfinite(seconds), "seconds %g must be finite and > 0", seconds);
    comm->timeout_s = seconds;
    return MOE_STATUS_SUCCESS;
}

static moe_status_t broken(const moe_comm_t *c) {
    return MOE_ERR(MOE_STATUS_COMM_ERROR,
                   "rank %d: the communicator failed in an earlier collective; destroy it",
                   c->rank);
}

moe_status_t moe_comm_destroy(moe_comm_t *comm) {
    if (!comm) return MOE_STATUS_SUCCESS;
    MOE_COMM_ARG(comm);
    MOE_ARG(comm->num_contexts == 0, "comm is still used by %d contexts: destroy them first",
            comm->num_contexts);
    comm->magic = 0;
    comm->ops->destroy(comm);
    free(comm);
    return MOE_STATUS_SUCCESS;
}

void moe__comm_abort(moe_comm_t *c, moe_status_t status) {
    if (!c || c->broken) return;
    c->broken = 1;
    if (c->ops->abort) c->ops->abort(c, status, moe_last_error());
}

void moe__comm_fail_call(moe_comm_t *c, int64_t n) {
    c->calls = 0;
    c->fail_at = n > 0 ? n : 0;
}

/* the fault hook's failure, as a transport's own would be */
static moe_status_t injected(moe_comm_t *c) {
    c->fail_at = 0;
    return MOE_ERR(MOE_STATUS_COMM_ERROR, "rank %d: collective call %lld failed (injected fault)",
                   c->rank, (long long)c->calls);
}

/* The checked wrappers the scheduler and layer call. A failed collective leaves this rank out
 * of step with its peers for good: the communicator is broken, and the peers are told (they
 * may be waiting in this very collective). */
#define MOE_COMM_CALL(c, call)                                                                 \
    do {                                                                                       \
        if ((c)->broken) return broken(c);                                                     \
        moe_status_t st_ = ++(c)->calls == (c)->fail_at ? injected(c) : (call);                \
        if (st_ != MOE_STATUS_SUCCESS) moe__comm_abort((c), st_);                              \
        return st_;                                                                            \
    } while (0)

moe_status_t moe_comm_barrier(moe_comm_t *comm) {
    MOE_COMM_ARG(comm);
    MOE_COMM_CALL(comm, comm->ops->barrier(comm));
}

moe_status_t moe__comm_alltoall_i64(moe_comm_t *c, const int64_t *send, int64_t *recv,
                                    int64_t n) {
    MOE_COMM_CALL(c, c->ops->alltoall_i64(c, send, recv, n));
}

moe_status_t moe__comm_allreduce_f64(moe_comm_t *c, double *buf, int64_t n) {
    MOE_COMM_CALL(c, c->ops->allreduce_f64(c, buf, n));
}

moe_status_t moe__comm_allgather_u64(moe_comm_t *c, uint64_t v, uint64_t *all) {
    MOE_COMM_CALL(c, c->ops->allgather_u64(c, v, all));
}

moe_status_t moe__comm_alltoallv_rows(moe_comm_t *c, const moe_memory_t *mem, const void *send,
                                      const int64_t *send_rows, const int64_t *send_off,
                                      void *recv, const int64_t *recv_rows,
                                      const int64_t *recv_off, size_t row_bytes, void *stream) {
    MOE_COMM_CALL(c, c->ops->alltoallv_rows(c, mem, send, send_rows, send_off, recv, recv_rows,
                                            recv_off, row_bytes, stream));
}

moe_status_t moe__comm_ialltoallv_rows(moe_comm_t *c, const moe_memory_t *mem, const void *send,
                                       const int64_t *send_rows, const int64_t *send_off,
                                       void *recv, const int64_t *recv_rows,
                                       const int64_t *recv_off, size_t row_bytes, void *stream,
                                       void **req) {
    *req = NULL;
    MOE_COMM_CALL(c, c->ops->ialltoallv_rows(c, mem, send, send_rows, send_off, recv, recv_rows,
                                             recv_off, row_bytes, stream, req));
}

moe_status_t moe__comm_wait(moe_comm_t *c, void *req) {
    if (!req) return MOE_STATUS_SUCCESS;
    MOE_COMM_CALL(c, c->ops->wait(c, req));
}

moe_status_t moe__comm_allreduce_f32(moe_comm_t *c, const moe_memory_t *mem, float *buf, int64_t n,
                                     void *stream) {
    MOE_COMM_CALL(c, c->ops->allreduce_f32(c, mem, buf, n, stream));
}

#ifndef MOE_WITH_MPI
moe_status_t moe_comm_create_mpi(moe_comm_t **comm, const void *mpi_comm) {
    (void)mpi_comm;
    if (comm) *comm = NULL;
    return MOE_ERR(MOE_STATUS_NOT_SUPPORTED, "this libmoe was built without MPI");
}
#endif

#if !defined(MOE_WITH_NCCL) || !defined(MOE_WITH_MPI)
moe_status_t moe_comm_create_nccl(moe_comm_t **comm, const void *mpi_comm) {
    (void)mpi_comm;
    if (comm) *comm = NULL;
    return MOE_ERR(MOE_STATUS_NOT_SUPPORTED,
                   "this libmoe was built without NCCL and MPI (both are needed to bootstrap)");
}
#endif

#ifndef MOE_WITH_NCCL
moe_status_t moe_comm_create_nccl_from(moe_comm_t **comm, const void *nccl_comm) {
    (void)nccl_comm;
    if (comm) *comm = NULL;
    return MOE_ERR(MOE_STATUS_NOT_SUPPORTED, "this libmoe was built without NCCL");
}
#endif
