/* nccl_ceiling.c - moe_bench's all-to-all ceiling under mpirun with --backend cuda: the bytes one
 * rank sends, in equal pieces to every rank (itself included), as one grouped ncclSend/ncclRecv
 * on device buffers, all ranks at once - what nccl-tests' alltoall_perf times. It runs on an
 * NCCL communicator of the tool's own (unique id broadcast over MPI_COMM_WORLD, the current CUDA
 * device), so the ceiling does not depend on the library's exchange it is compared with. */
#include <cuda_runtime.h>
#include <mpi.h>
#include <nccl.h>
#include <stdlib.h>

#include "bench.h"
#include "core/clock.h"

/* 1 on every rank when `mine` is 1 on every rank (the ranks stay in step after a local failure) */
static int all_ok(int mine) {
    int all = 0;
    if (MPI_Allreduce(&mine, &all, 1, MPI_INT, MPI_MIN, MPI_COMM_WORLD) != MPI_SUCCESS) return 0;
    return all;
}

double bench_nccl_alltoall_time(size_t bytes, int reps, double *t_each) {
    int rank = 0, size = 1;
    if (MPI_Comm_rank(MPI_COMM_WORLD, &rank) != MPI_SUCCESS ||
        MPI_Comm_size(MPI_COMM_WORLD, &size) != MPI_SUCCESS)
        return -1.0;
    size_t piece = bytes / (size_t)size;
    if (piece == 0) piece = 1;
    const size_t total = piece * (size_t)size;
    double res = -1.0;
    ncclUniqueId id;
    ncclComm_t comm = NULL;
    cudaStream_t stream = NULL;
    char *a = NULL, *b = NULL;
    int ok = rank != 0 || ncclGetUniqueId(&id) == ncclSuccess;
    if (!all_ok(ok)) return -1.0;
    if (MPI_Bcast(&id, (int)sizeof id, MPI_BYTE, 0, MPI_COMM_WORLD) != MPI_SUCCESS) return -1.0;
    ok = ncclCommInitRank(&comm, size, id, rank) == ncclSuccess;
    ok = ok && cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking) == cudaSuccess;
    ok = ok && cudaMalloc((void **)&a, total) == cudaSuccess;
    ok = ok && cudaMalloc((void **)&b, total) == cudaSuccess;
    ok = ok && cudaMemset(a, 1, total) == cudaSuccess && cudaMemset(b, 0, total) == cudaSuccess;
    ok = ok && cudaDeviceSynchronize() == cudaSuccess;
    if (!all_ok(ok)) goto out;
    for (int r = 0; r <= reps; ++r) { /* r = 0 is the warm-up */
        if (MPI_Barrier(MPI_COMM_WORLD) != MPI_SUCCESS) goto out;
        double t0 = moe_now_s();
        ok = ncclGroupStart() == ncclSuccess;
        for (int q = 0; ok && q < size; ++q)
            ok = ncclSend(a + (size_t)q * piece, piece, ncclChar, q, comm, stream) ==
                     ncclSuccess &&
                 ncclRecv(b + (size_t)q * piece, piece, ncclChar, q, comm, stream) == ncclSuccess;
        ok = ncclGroupEnd() == ncclSuccess && ok;
        ok = ok && cudaStreamSynchronize(stream) == cudaSuccess;
        double t1 = moe_now_s();
        if (!all_ok(ok)) goto out;
        if (r > 0) t_each[r - 1] = t1 - t0;
    }
    res = bench_summarize(t_each, reps).median;
out:
    if (a) cudaFree(a);
    if (b) cudaFree(b);
    if (stream) cudaStreamDestroy(stream);
    if (comm) ncclCommDestroy(comm);
    return res;
}
