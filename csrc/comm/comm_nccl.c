/* comm_nccl.c - NCCL transport: one GPU per rank, device buffers, CUDA backend.
 *
 * Rows move with grouped ncclSend/ncclRecv on the caller's stream (ncclAllToAll handles equal
 * counts only). The host collectives (counts, stats, the config check) go through NCCL too, on
 * the communicator's own stream with a small device staging buffer, so a communicator made from
 * an existing ncclComm_t needs no MPI. Every wait polls with the communicator's timeout and
 * then aborts the NCCL communicator: a missing peer ends in MOE_STATUS_COMM_ERROR, not a hang. */
#define _POSIX_C_SOURCE 200809L

#include <cuda_runtime_api.h>
#include <nccl.h>
#include <stdlib.h>
#include <time.h>


#include "comm/comm.h"
#include "core/check_cuda.h"
#include "core/check_nccl.h"
#include "core/clock.h"
#include "core/status.h"

#ifdef MOE_WITH_MPI
#include "core/check_mpi.h"
#endif

typedef struct {
    ncclComm_t comm;
    int owned;           /* we created it (and destroy it) */
    cudaStream_t stream; /* host collectives */
    void *staging;       /* device scratch for host collectives */
    size_t staging_bytes;
} nccl_impl_t;

#define NCCL_OF(c) ((nccl_impl_t *)(c)->impl)

/* waits for stream with the communicator's timeout; on timeout or an NCCL async error, aborts */
static moe_status_t nccl_wait_stream(moe_comm_t *c, cudaStream_t stream, const char *what) {
    nccl_impl_t *m = NCCL_OF(c);
    double t0 = moe_now_s();
    struct timespec nap = {0, 50000};
    for (;;) {
        cudaError_t e = cudaStreamQuery(stream);
        if (e == cudaSuccess) return MOE_STATUS_SUCCESS;
        if (e != cudaErrorNotReady) return MOE_CUDA_ERR(e, what);
        ncclResult_t async = ncclSuccess;
        ncclCommGetAsyncError(m->comm, &async);
        if (!moe__nccl_ok(async)) {
            ncclCommAbort(m->comm);
            m->comm = NULL;
            return MOE_NCCL_ERR(async, what);
        }
        if (moe_now_s() - t0 > c->timeout_s) {
            ncclCommAbort(m->comm);
            m->comm = NULL;
            return MOE_ERR(MOE_STATUS_COMM_ERROR,
                           "rank %d waited %.1f s in %s: a peer rank never joined; the NCCL "
                           "communicator was aborted",
                           c->rank, c->timeout_s, what);
        }
        nanosleep(&nap, NULL);
    }
}

static moe_status_t staging(moe_comm_t *c, size_t bytes) {
    nccl_impl_t *m = NCCL_OF(c);
    if (bytes <= m->staging_bytes) return MOE_STATUS_SUCCESS;
    if (m->staging) cudaFree(m->staging);
    m->staging = NULL;
    m->staging_bytes = 0;
    MOE_CUDA_CHECK(cudaMalloc(&m->staging, bytes));
    m->staging_bytes = bytes;
    return MOE_STATUS_SUCCESS;
}

/* host collective through the staging buffer: in (in_bytes) -> device -> op -> out_bytes back */
static moe_status_t host_round_trip(moe_comm_t *c, const void *in, size_t in_bytes, void *out,
                                    size_t out_bytes, ncclResult_t (*op)(moe_comm_t *, void *,
                                                                         void *, void *),
                                    void *arg, const char *what) {
    nccl_impl_t *m = NCCL_OF(c);
    MOE_CHECK(staging(c, in_bytes + out_bytes));
    char *d_in = (char *)m->staging, *d_out = d_in + in_bytes;
    MOE_CUDA_CHECK(cudaMemcpyAsync(d_in, in, in_bytes, cudaMemcpyHostToDevice, m->stream));
    ncclResult_t r = op(c, d_in, d_out, arg);
    if (!moe__nccl_ok(r)) return MOE_NCCL_ERR(r, what);
    MOE_CUDA_CHECK(cudaMemcpyAsync(out, d_out, out_bytes, cudaMemcpyDeviceToHost, m->stream));
    return nccl_wait_stream(c, m->stream, what);
}

typedef struct {
    int64_t n;
} count_arg_t;

static ncclResult_t op_alltoall_i64(moe_comm_t *c, void *d_in, void *d_out, void *arg) {
    nccl_impl_t *m = NCCL_OF(c);
    int64_t n = ((count_arg_t *)arg)->n;
    ncclResult_t r = ncclGroupStart();
    for (int q = 0; q < c->size && r == ncclSuccess; ++q) {
        r = ncclSend((int64_t *)d_in + q * n, (size_t)n, ncclInt64, q, m->comm, m->stream);
        if (r == ncclSuccess)
            r = ncclRecv((int64_t *)d_out + q * n, (size_t)n, ncclInt64, q, m->comm, m->stream);
    }
    ncclResult_t e = ncclGroupEnd();
    return r != ncclSuccess ? r : e;
}

static moe_status_t nccl_alltoall_i64(moe_comm_t *c, const int64_t *send, int64_t *recv,
                                      int64_t n) {
    count_arg_t a = {n};
    size_t bytes = (size_t)(n * c->size) * sizeof(int64_t);
    return host_round_trip(c, send, bytes, recv, bytes, op_alltoall_i64, &a, "alltoall of counts");
}

static ncclResult_t op_allreduce_f64(moe_comm_t *c, void *d_in, void *d_out, void *arg) {
    nccl_impl_t *m = NCCL_OF(c);
    return ncclAllReduce(d_in, d_out, (size_t)((count_arg_t *)arg)->n, ncclFloat64, ncclSum,
                         m->comm, m->stream);
}

static moe_status_t nccl_allreduce_f64(moe_comm_t *c, double *buf, int64_t n) {
    count_arg_t a = {n};
    size_t bytes = (size_t)n * sizeof(double);
    return host_round_trip(c, buf, bytes, buf, bytes, op_allreduce_f64, &a, "allreduce of stats");
}

static ncclResult_t op_allgather_u64(moe_comm_t *c, void *d_in, void *d_out, void *arg) {
    (void)arg;
    nccl_impl_t *m = NCCL_OF(c);
    return ncclAllGather(d_in, d_out, 1, ncclUint64, m->comm, m->stream);
}

static moe_status_t nccl_allgather_u64(moe_comm_t *c, uint64_t v, uint64_t *all) {
    return host_round_trip(c, &v, sizeof v, all, (size_t)c->size * sizeof(uint64_t),
                           op_allgather_u64, NULL, "allgather");
}

static moe_status_t nccl_ialltoallv_rows(moe_comm_t *c, const moe_memory_t *mem, const void *send,
                                         const int64_t *send_rows, const int64_t *send_off,
                                         void *recv, const int64_t *recv_rows,
                                         const int64_t *recv_off, size_t row_bytes,
                                         void *stream, void **req) {
    (void)mem;
    nccl_impl_t *m = NCCL_OF(c);
    *req = NULL; /* stream-ordered: nothing to wait for on the host */
    MOE_NCCL_CHECK(ncclGroupStart());
    for (int q = 0; q < c->size; ++q) {
        if (send_rows[q] > 0)
            MOE_NCCL_CHECK(ncclSend((const char *)send + send_off[q] * row_bytes,
                                (size_t)send_rows[q] * row_bytes, ncclUint8, q, m->comm,
                                (cudaStream_t)stream));
        if (recv_rows[q] > 0)
            MOE_NCCL_CHECK(ncclRecv((char *)recv + recv_off[q] * row_bytes,
                                (size_t)recv_rows[q] * row_bytes, ncclUint8, q, m->comm,
                                (cudaStream_t)stream));
    }
    MOE_NCCL_CHECK(ncclGroupEnd());
    return MOE_STATUS_SUCCESS;
}

static moe_status_t nccl_alltoallv_rows(moe_comm_t *c, const moe_memory_t *mem, const void *send,
                                        const int64_t *send_rows, const int64_t *send_off,
                                        void *recv, const int64_t *recv_rows,
                                        const int64_t *recv_off, size_t row_bytes, void *stream) {
    void *req = NULL;
    return nccl_ialltoallv_rows(c, mem, send, send_rows, send_off, recv, recv_rows, recv_off,
                                row_bytes, stream, &req);
}

static moe_status_t nccl_wait(moe_comm_t *c, void *req) {
    (void)c, (void)req;
    return MOE_STATUS_SUCCESS;
}

static moe_status_t nccl_allreduce_f32(moe_comm_t *c, const moe_memory_t *mem, float *buf,
                                       int64_t n, void *stream) {
    (void)mem;
    MOE_NCCL_CHECK(ncclAllReduce(buf, buf, (size_t)n, ncclFloat32, ncclSum, NCCL_OF(c)->comm,
                             (cudaStream_t)stream));
    return MOE_STATUS_SUCCESS;
}

static ncclResult_t op_barrier(moe_comm_t *c, void *d_in, void *d_out, void *arg) {
    (void)arg;
    nccl_impl_t *m = NCCL_OF(c);
    return ncclAllReduce(d_in, d_out, 1, ncclInt32, ncclSum, m->comm, m->stream);
}

static moe_status_t nccl_barrier(moe_comm_t *c) {
    int32_t one = 1, sum = 0;
    return host_round_trip(c, &one, sizeof one, &sum, sizeof sum, op_barrier, NULL, "barrier");
}

static void nccl_destroy(moe_comm_t *c) {
    nccl_impl_t *m = NCCL_OF(c);
    if (m->owned && m->comm) ncclCommDestroy(m->comm);
    if (m->staging) cudaFree(m->staging);
    if (m->stream) cudaStreamDestroy(m->stream);
    free(m);
}

static const moe_comm_ops_t nccl_ops = {
    .name = "nccl",
    .alltoall_i64 = nccl_alltoall_i64,
    .allreduce_f64 = nccl_allreduce_f64,
    .allgather_u64 = nccl_allgather_u64,
    .alltoallv_rows = nccl_alltoallv_rows,
    .ialltoallv_rows = nccl_ialltoallv_rows,
    .wait = nccl_wait,
    .allreduce_f32 = nccl_allreduce_f32,
    .barrier = nccl_barrier,
    .destroy = nccl_destroy,
};

static moe_status_t wrap(moe_comm_t **comm, ncclComm_t nc, int owned) {
    int rank = 0, size = 1;
    MOE_NCCL_CHECK(ncclCommUserRank(nc, &rank));
    MOE_NCCL_CHECK(ncclCommCount(nc, &size));
    nccl_impl_t *m = (nccl_impl_t *)calloc(1, sizeof *m);
    if (!m) return MOE_ERR(MOE_STATUS_ALLOC_FAILED, "NCCL communicator");
    m->comm = nc;
    m->owned = owned;
    moe_status_t st = MOE_STATUS_SUCCESS;
    MOE_CUDA_CHECK_GOTO(cudaStreamCreateWithFlags(&m->stream, cudaStreamNonBlocking), st, fail);
    st = moe__comm_alloc(comm, MOE_COMM_KIND_NCCL, rank, size, &nccl_ops, m);
    if (st == MOE_STATUS_SUCCESS) return st;
    cudaStreamDestroy(m->stream);
fail:
    free(m);
    return st;
}

moe_status_t moe_comm_create_nccl_from(moe_comm_t **comm, const void *nccl_comm) {
    MOE_ARG(comm != NULL, "comm is NULL");
    *comm = NULL;
    MOE_ARG(nccl_comm != NULL, "nccl_comm is NULL");
    return wrap(comm, *(const ncclComm_t *)nccl_comm, 0);
}

#ifdef MOE_WITH_MPI
moe_status_t moe_comm_create_nccl(moe_comm_t **comm, const void *mpi_comm) {
    MOE_ARG(comm != NULL, "comm is NULL");
    *comm = NULL;
    int inited = 0;
    MPI_Initialized(&inited);
    MOE_ARG(inited, "MPI is not initialised: call MPI_Init first");
    MPI_Comm base = mpi_comm ? *(const MPI_Comm *)mpi_comm : MPI_COMM_WORLD;
    int rank = 0, size = 1;
    MPI_Comm_rank(base, &rank);
    MPI_Comm_size(base, &size);
    ncclUniqueId id;
    if (rank == 0) MOE_NCCL_CHECK(ncclGetUniqueId(&id));
    MOE_MPI_CHECK(MPI_Bcast(&id, (int)sizeof id, MPI_BYTE, 0, base));
    ncclComm_t nc;
    MOE_NCCL_CHECK(ncclCommInitRank(&nc, size, id, rank));
    moe_status_t st = wrap(comm, nc, 1);
    if (st != MOE_STATUS_SUCCESS) ncclCommDestroy(nc);
    return st;
}
#endif
