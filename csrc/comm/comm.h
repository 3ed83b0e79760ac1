/* comm.h - the communicator interface: what the scheduler needs to move rows between ranks.
 *
 * Host-side collectives (counts, stats, config check) take host arrays. Row collectives take
 * buffers in the memory of the context's backend and enqueue on `stream` where the transport
 * can (NCCL); the CPU transports complete before returning. */
#ifndef MOE_COMM_COMM_H
#define MOE_COMM_COMM_H

#include <stddef.h>
#include <stdint.h>

#include "backend/memory.h"

#ifdef __cplusplus
extern "C" {
#endif

#define MOE_COMM_MAGIC 0x4D4F434Du /* "MOCM" */

typedef enum moe_comm_kind {
    MOE_COMM_KIND_LOCAL = 0,
    MOE_COMM_KIND_MPI = 1,
    MOE_COMM_KIND_NCCL = 2
} moe_comm_kind_t;

typedef struct moe_comm_ops {
    const char *name;
    /* recv[src * n + i] = send_of_src[rank * n + i] for i < n (host int64) */
    moe_status_t (*alltoall_i64)(moe_comm_t *c, const int64_t *send, int64_t *recv, int64_t n);
    /* in-place sum over ranks of n host doubles */
    moe_status_t (*allreduce_f64)(moe_comm_t *c, double *buf, int64_t n);
    /* all[q] = v of rank q */
    moe_status_t (*allgather_u64)(moe_comm_t *c, uint64_t v, uint64_t *all);
    /* rows: send rows [send_off[q], send_off[q] + send_rows[q]) go to rank q and arrive at
     * recv row recv_off[src] there; row_bytes per row; backend memory */
    moe_status_t (*alltoallv_rows)(moe_comm_t *c, const moe_memory_t *mem, const void *send,
                                   const int64_t *send_rows, const int64_t *send_off, void *recv,
                                   const int64_t *recv_rows, const int64_t *recv_off,
                                   size_t row_bytes, void *stream);
    /* non-blocking form of alltoallv_rows: *req is waited for with wait(); the count and offset
     * arrays must stay untouched until then. A transport may complete it at once (req NULL). */
    moe_status_t (*ialltoallv_rows)(moe_comm_t *c, const moe_memory_t *mem, const void *send,
                                    const int64_t *send_rows, const int64_t *send_off, void *recv,
                                    const int64_t *recv_rows, const int64_t *recv_off,
                                    size_t row_bytes, void *stream, void **req);
    moe_status_t (*wait)(moe_comm_t *c, void *req);
    /* in-place sum over ranks of n f32 in backend memory */
    moe_status_t (*allreduce_f32)(moe_comm_t *c, const moe_memory_t *mem, float *buf, int64_t n,
                                  void *stream);
    moe_status_t (*barrier)(moe_comm_t *c);
    /* this rank leaves a collective call it cannot finish: tell the peers, so a peer waiting in
     * a collective returns COMM_ERROR at once instead of at its timeout (why: this rank's
     * message). NULL: the transport cannot (the peers wait for their timeout). */
    void (*abort)(moe_comm_t *c, moe_status_t status, const char *why);
    void (*destroy)(moe_comm_t *c);
} moe_comm_ops_t;

struct moe_comm {
    uint32_t magic;
    moe_comm_kind_t kind;
    int rank, size;
    double timeout_s;
    int broken; /* a collective failed: every later call refuses */
    int num_contexts;
    uint64_t seq;    /* agreement steps made: the same on every rank while the ranks are in step */
    int64_t calls;   /* checked collective calls made (what the fault hook counts) */
    int64_t fail_at; /* test hook: the checked call of that number fails (0: none) */
    const moe_comm_ops_t *ops;
    void *impl;
};

/* allocates a handle with the common fields set (timeout from MOE_COMM_TIMEOUT_S or 300 s) */
moe_status_t moe__comm_alloc(moe_comm_t **out, moe_comm_kind_t kind, int rank, int size,
                             const moe_comm_ops_t *ops, void *impl);

/* collectives as the scheduler calls them: check the handle, mark it broken on failure */
moe_status_t moe__comm_alltoall_i64(moe_comm_t *c, const int64_t *send, int64_t *recv, int64_t n);
moe_status_t moe__comm_allreduce_f64(moe_comm_t *c, double *buf, int64_t n);
moe_status_t moe__comm_allgather_u64(moe_comm_t *c, uint64_t v, uint64_t *all);
moe_status_t moe__comm_alltoallv_rows(moe_comm_t *c, const moe_memory_t *mem, const void *send,
                                      const int64_t *send_rows, const int64_t *send_off,
                                      void *recv, const int64_t *recv_rows,
                                      const int64_t *recv_off, size_t row_bytes, void *stream);
moe_status_t moe__comm_ialltoallv_rows(moe_comm_t *c, const moe_memory_t *mem, const void *send,
                                       const int64_t *send_rows, const int64_t *send_off,
                                       void *recv, const int64_t *recv_rows,
                                       const int64_t *recv_off, size_t row_bytes, void *stream,
                                       void **req);
moe_status_t moe__comm_wait(moe_comm_t *c, void *req);
moe_status_t moe__comm_allreduce_f32(moe_comm_t *c, const moe_memory_t *mem, float *buf, int64_t n,
                                     void *stream);

/* This rank cannot finish the collective call it is in (a local failure after the call's
 * agreement step, while peers may wait in one of its collectives): marks the communicator
 * broken and tells the peers (ops->abort), whose waits then end in COMM_ERROR. Keeps the
 * calling thread's last error. Nothing happens when the communicator is broken already. */
void moe__comm_abort(moe_comm_t *c, moe_status_t status);

/* Test hook (fault injection, tests/test_ep_faults.cc): the n-th checked collective call of c
 * from now (agreement steps included) fails with COMM_ERROR as a transport failure would, and
 * tells the peers; n <= 0 turns it off. Not part of the public API. */
void moe__comm_fail_call(moe_comm_t *c, int64_t n);

#ifdef __cplusplus
}
#endif

#endif
