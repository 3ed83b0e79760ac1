/* ceilings.c - what moe_bench measures beside the layer in the same run: a dense sgemm of the
 * same FLOPs, a memcpy of the activation bytes and the raw all-to-all; the statistics of timed
 * phases; and the OpenMP / OpenBLAS thread counts. */
#define _GNU_SOURCE /* RTLD_DEFAULT */

#include <cblas.h>
#include <dlfcn.h>
#include <omp.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "bench.h"
#include "core/clock.h"

/* ---- statistics ---- */

static int cmp_double(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

bench_times_t bench_summarize(const double *v, int n) {
    bench_times_t t = {0, 0, 0, 0};
    if (n <= 0) return t;
    double *s = malloc((size_t)n * sizeof(double));
    if (!s) return t;
    memcpy(s, v, (size_t)n * sizeof(double));
    qsort(s, (size_t)n, sizeof(double), cmp_double);
    double sum = 0.0;
    for (int i = 0; i < n; ++i) sum += s[i];
    t.mean = sum / n;
    t.median = n % 2 ? s[n / 2] : 0.5 * (s[n / 2 - 1] + s[n / 2]);
    t.min = s[0], t.max = s[n - 1];
    free(s);
    return t;
}

/* ---- threads: OpenMP for the CPU backend's loops, OpenBLAS for its GEMMs ---- */

typedef void (*blas_set_threads_fn)(int);
typedef int (*blas_get_threads_fn)(void);

void bench_set_threads(int n) {
    omp_set_num_threads(n);
    /* looked up at run time: the symbol exists in OpenBLAS only, not in other BLAS builds */
    blas_set_threads_fn set = (blas_set_threads_fn)(uintptr_t)dlsym(RTLD_DEFAULT,
                                                                     "openblas_set_num_threads");
    if (set) set(n);
}

int bench_blas_threads(void) {
    blas_get_threads_fn get = (blas_get_threads_fn)(uintptr_t)dlsym(RTLD_DEFAULT,
                                                                     "openblas_get_num_threads");
    return get ? get() : -1;
}

void bench_rank_threads(const bench_opts_t *o, int ranks) {
    if (o->threads > 0) {
        omp_set_num_threads(o->threads);
    } else if (ranks > 1) {
        /* ranks as threads share the cores: one share each unless --threads says otherwise */
        long ncpu = sysconf(_SC_NPROCESSORS_ONLN);
        int t = (int)(ncpu / ranks);
        omp_set_num_threads(t > 0 ? t : 1);
    }
}

static int copy_cb(void *dst, const void *src, size_t bytes, void *ctx) {
    const tool_mem_t *m = ctx;
    return tool_mem_copy(m, dst, src, bytes, TOOL_COPY_WITHIN) || tool_mem_sync(m);
}
static void *alloc_cb(size_t bytes, void *ctx) {
    void *p = tool_mem_alloc(ctx, bytes);
    if (p && !((tool_mem_t *)ctx)->gpu) memset(p, 1, bytes);
    return p;
}
static void free_cb(void *p, void *ctx) { tool_mem_free(ctx, p); }

double bench_alltoall_ceiling(bench_world_t *w, const tool_mem_t *m, size_t bytes, int reps,
                              double *t_each) {
#ifdef MOE_BENCH_NCCL
    if (w->kind == BENCH_WORLD_MPI && m->gpu) return bench_nccl_alltoall_time(bytes, reps, t_each);
#endif
    return bench_world_alltoall_time(w, bytes, reps, m->gpu, copy_cb, alloc_cb, free_cb,
                                     (void *)m, t_each);
}

/* ---- ceilings ---- */

double bench_dense_gemm_time(int64_t M, int64_t D, int64_t F, int64_t F2, int bwd, int reps,
                             int64_t tokens, bench_trace_buf_t *tb) {
    size_t wide = (size_t)(D > F2 ? D : F2);
    float *X = malloc((size_t)M * D * 4), *H = malloc((size_t)M * wide * 4);
    float *Y = malloc((size_t)M * D * 4), *W1 = malloc((size_t)D * F2 * 4);
    float *W2 = malloc((size_t)F * D * 4), *G1 = malloc((size_t)D * F2 * 4);
    float *G2 = malloc((size_t)F * D * 4), *dX = malloc((size_t)M * D * 4);
    double best = -1.0;
    double *t = malloc((size_t)(reps + 1) * sizeof(double));
    if (!X || !H || !Y || !W1 || !W2 || !G1 || !G2 || !dX || !t) goto out;
    bench_fill_uniform(X, M * D, 11, 1.0f), bench_fill_uniform(Y, M * D, 12, 1.0f);
    bench_fill_uniform(W1, D * F2, 13, 0.05f), bench_fill_uniform(W2, F * D, 14, 0.05f);
    memset(H, 0, (size_t)M * wide * 4), memset(G1, 0, (size_t)D * F2 * 4);
    memset(G2, 0, (size_t)F * D * 4), memset(dX, 0, (size_t)M * D * 4);
    const int mi = (int)M, di = (int)D, fi = (int)F, f2i = (int)F2;
    for (int r = 0; r <= reps; ++r) { /* r = 0 is the warm-up */
        double t0 = moe_now_s();
        /* forward: H = X W1 (M, F2); Y = A W2 (M, D), with A the first F columns' worth of H */
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, mi, f2i, di, 1.0f, X, di, W1, f2i,
                    0.0f, H, f2i);
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, mi, di, fi, 1.0f, H, fi, W2, di,
                    0.0f, Y, di);
        if (bwd) {
            /* dA = dY W2^T (M, F); dW2 += A^T dY (F, D); dW1 += X^T dH (D, F2); dX = dH W1^T */
            cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, mi, fi, di, 1.0f, Y, di, W2, di,
                        0.0f, H, fi);
            cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, fi, di, mi, 1.0f, H, fi, Y, di,
                        1.0f, G2, di);
            cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, di, f2i, mi, 1.0f, X, di, H, f2i,
                        1.0f, G1, f2i);
            cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, mi, di, f2i, 1.0f, H, f2i, W1,
                        f2i, 0.0f, dX, di);
        }
        double t1 = moe_now_s();
        t[r] = t1 - t0;
        if (r > 0) bench_trace_add(tb, 3, tokens, r - 1, t0, t1);
    }
    best = bench_summarize(t + 1, reps).median;
out:
    free(X), free(H), free(Y), free(W1), free(W2), free(G1), free(G2), free(dX), free(t);
    return best;
}

double bench_memcpy_time(const tool_mem_t *m, size_t bytes, int reps, int64_t tokens,
                         bench_trace_buf_t *tb) {
    void *a = tool_mem_alloc(m, bytes), *b = tool_mem_alloc(m, bytes);
    double *t = malloc((size_t)(reps + 1) * sizeof(double));
    double res = -1.0;
    if (!a || !b || !t) goto out;
    if (!m->gpu) memset(a, 1, bytes), memset(b, 0, bytes); /* fault the pages in */
    for (int r = 0; r <= reps; ++r) {
        double t0 = moe_now_s();
        if (tool_mem_copy(m, b, a, bytes, TOOL_COPY_WITHIN) != 0 || tool_mem_sync(m) != 0) goto out;
        double t1 = moe_now_s();
        t[r] = t1 - t0;
        if (r > 0) bench_trace_add(tb, 4, tokens, r - 1, t0, t1);
    }
    res = bench_summarize(t + 1, reps).median;
out:
    tool_mem_free(m, a), tool_mem_free(m, b), free(t);
    return res;
}
