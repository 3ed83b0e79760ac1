/* world.c - the ranks of one moe_bench run and the few collectives the tool itself needs
 * (barrier, gathers, the raw all-to-all ceiling): one rank, ranks as threads of this process
 * (--local-ranks, beside moe_comm_create_local), or MPI processes (under mpirun).
 *
 * The library's own collectives go through moe_comm_t; these are only for the tool's timing and
 * reporting, so they stay out of the timed calls. */
#define _POSIX_C_SOURCE 200809L

#include <pthread.h>
#include <stdlib.h>
#include <string.h>

#ifdef MOE_BENCH_MPI
#include <mpi.h>
#endif

#include "bench.h"
#include "core/clock.h"

/* what the threads of a local world share: a reusable barrier that a failing rank can break,
 * and one slot per rank for the gathers */
struct bench_local_shared {
    pthread_mutex_t mu;
    pthread_cond_t cv;
    int size, arrived, aborted;
    unsigned long generation;
    const void **ptr; /* (size) each rank's block of the current gather */
    size_t *bytes;    /* (size) its length */
};

bench_local_shared_t *bench_local_shared_create(int size) {
    bench_local_shared_t *s = calloc(1, sizeof *s);
    if (!s) return NULL;
    s->ptr = calloc((size_t)size, sizeof *s->ptr);
    s->bytes = calloc((size_t)size, sizeof *s->bytes);
    if (!s->ptr || !s->bytes) {
        free(s->ptr), free(s->bytes), free(s);
        return NULL;
    }
    pthread_mutex_init(&s->mu, NULL);
    pthread_cond_init(&s->cv, NULL);
    s->size = size;
    return s;
}

void bench_local_shared_destroy(bench_local_shared_t *s) {
    if (!s) return;
    pthread_mutex_destroy(&s->mu);
    pthread_cond_destroy(&s->cv);
    free(s->ptr), free(s->bytes), free(s);
}

void bench_world_abort(bench_world_t *w) {
    if (w->kind != BENCH_WORLD_LOCAL) return;
    pthread_mutex_lock(&w->sh->mu);
    w->sh->aborted = 1;
    pthread_cond_broadcast(&w->sh->cv);
    pthread_mutex_unlock(&w->sh->mu);
}

int bench_world_barrier(bench_world_t *w) {
    if (w->kind == BENCH_WORLD_SELF) return 0;
#ifdef MOE_BENCH_MPI
    if (w->kind == BENCH_WORLD_MPI) return MPI_Barrier(MPI_COMM_WORLD) == MPI_SUCCESS ? 0 : -1;
#endif
    bench_local_shared_t *s = w->sh;
    pthread_mutex_lock(&s->mu);
    unsigned long gen = s->generation;
    if (++s->arrived == s->size) {
        s->arrived = 0;
        s->generation++;
        pthread_cond_broadcast(&s->cv);
    } else {
        while (gen == s->generation && !s->aborted) pthread_cond_wait(&s->cv, &s->mu);
    }
    int rc = s->aborted ? -1 : 0;
    pthread_mutex_unlock(&s->mu);
    return rc;
}

int bench_world_allgather_f64(bench_world_t *w, const double *mine, int n, double *all) {
    if (w->kind == BENCH_WORLD_SELF) {
        memcpy(all, mine, (size_t)n * sizeof(double));
        return 0;
    }
#ifdef MOE_BENCH_MPI
    if (w->kind == BENCH_WORLD_MPI)
        return MPI_Allgather(mine, n, MPI_DOUBLE, all, n, MPI_DOUBLE, MPI_COMM_WORLD) ==
                       MPI_SUCCESS
                   ? 0
                   : -1;
#endif
    bench_local_shared_t *s = w->sh;
    s->ptr[w->rank] = mine;
    if (bench_world_barrier(w)) return -1;
    for (int q = 0; q < w->size; ++q)
        memcpy(all + (size_t)q * n, s->ptr[q], (size_t)n * sizeof(double));
    return bench_world_barrier(w);
}

int bench_world_gatherv(bench_world_t *w, const void *mine, size_t bytes, void *all,
                        const size_t *bytes_each) {
    if (w->kind == BENCH_WORLD_SELF) {
        if (bytes) memcpy(all, mine, bytes);
        return 0;
    }
#ifdef MOE_BENCH_MPI
    if (w->kind == BENCH_WORLD_MPI) {
        int *cnt = NULL, *dis = NULL;
        if (w->rank == 0) {
            cnt = malloc((size_t)w->size * sizeof(int)),
            dis = malloc((size_t)w->size * sizeof(int));
            if (!cnt || !dis) {
                free(cnt), free(dis);
                return -1;
            }
            size_t off = 0;
            for (int q = 0; q < w->size; ++q) {
                cnt[q] = (int)bytes_each[q], dis[q] = (int)off;
                off += bytes_each[q];
            }
        }
        int rc = MPI_Gatherv(mine, (int)bytes, MPI_BYTE, all, cnt, dis, MPI_BYTE, 0,
                             MPI_COMM_WORLD);
        free(cnt), free(dis);
        return rc == MPI_SUCCESS ? 0 : -1;
    }
#endif
    (void)bytes_each;
    bench_local_shared_t *s = w->sh;
    s->ptr[w->rank] = mine, s->bytes[w->rank] = bytes;
    if (bench_world_barrier(w)) return -1;
    if (w->rank == 0) {
        size_t off = 0;
        for (int q = 0; q < w->size; ++q) {
            if (s->bytes[q]) memcpy((char *)all + off, s->ptr[q], s->bytes[q]);
            off += s->bytes[q];
        }
    }
    return bench_world_barrier(w);
}

/* the raw exchange of `bytes` per rank in equal pieces to every rank (itself included), all
 * ranks at once: MPI_Alltoall between processes; between threads of one process a memcpy of
 * the same bytes per rank (what the local communicator's exchange costs at best: one copy).
 * Returns this rank's median seconds over reps (one extra warm-up), -1 on failure. */
double bench_world_alltoall_time(bench_world_t *w, size_t bytes, int reps, int on_device,
                                 int (*copy)(void *dst, const void *src, size_t bytes, void *ctx),
                                 void *(*alloc)(size_t bytes, void *ctx),
                                 void (*release)(void *p, void *ctx), void *ctx, double *t_each) {
    size_t piece = bytes / (size_t)w->size;
    if (piece == 0) piece = 1;
    size_t total = piece * (size_t)w->size;
    double res = -1.0;
    void *a = NULL, *b = NULL;
    int mpi = 0;
#ifdef MOE_BENCH_MPI
    mpi = w->kind == BENCH_WORLD_MPI && !on_device;
#endif
    (void)on_device;
    if (mpi) {
        a = malloc(total), b = malloc(total);
        if (a && b) memset(a, 1, total), memset(b, 0, total);
    } else {
        a = alloc(total, ctx), b = alloc(total, ctx);
    }
    int ok = a && b;
    for (int r = 0; r <= reps; ++r) {
        /* every rank takes part in every barrier, also after a local failure */
        if (bench_world_barrier(w)) ok = 0;
        double t0 = moe_now_s();
        if (ok) {
#ifdef MOE_BENCH_MPI
            if (mpi)
                ok = MPI_Alltoall(a, (int)piece, MPI_BYTE, b, (int)piece, MPI_BYTE,
                                  MPI_COMM_WORLD) == MPI_SUCCESS;
            else
#endif
                ok = copy(b, a, total, ctx) == 0;
        }
        double t1 = moe_now_s();
        if (r > 0) t_each[r - 1] = t1 - t0;
    }
    if (bench_world_barrier(w)) ok = 0;
    if (ok) {
        /* median */
        for (int i = 1; i < reps; ++i)
            for (int j = i; j > 0 && t_each[j - 1] > t_each[j]; --j) {
                double t = t_each[j];
                t_each[j] = t_each[j - 1], t_each[j - 1] = t;
            }
        res = reps % 2 ? t_each[reps / 2] : 0.5 * (t_each[reps / 2 - 1] + t_each[reps / 2]);
    }
    if (mpi) {
        free(a), free(b);
    } else {
        if (a) release(a, ctx);
        if (b) release(b, ctx);
    }
    return res;
}
