/* cuda_backend.c - host side of the CUDA backend: device memory, streams, the cuBLAS handle and
 * the launches of every op of moe_backend_ops_t (kernels in kernels/, one .cu per op family).
 *
 * Contract kept with the scheduler: a forward synchronises the caller's stream once for the
 * routing (after the gate: the per-expert sums and counts come back to the host mirrors, and
 * the expert GEMM sizes are known from then on), besides the NaN/Inf check of x that
 * count_nonfinite answers on the host; with expert parallelism it also waits before each chunk's
 * expert ops, to upload that chunk's row offsets. Everything else is enqueued on the caller's
 * stream. */
#include <stdlib.h>
#include <string.h>

#include "backend/backend.h"
#include "backend/cuda/cuda_shared.h"
#include "context.h"
#include "core/check_cuda.h"
#include "core/dtype.h"
#include "core/status.h"
#include "kernels/kernels.h"
#include "router/hier.h"

_Static_assert(MOE_DTYPE_F32 == 0 && MOE_DTYPE_BF16 == 1 && MOE_DTYPE_F16 == 2,
               "kernels/common.cuh mirrors the moe_dtype_t values");
_Static_assert(MOE_PRIORITY_SCORE == 1, "kernels/permute.cu tests priority == 1");

#include "backend/cuda/cuda_state.h"
#include "backend/cuda/cuda_gate.h"

/* ---------------------------------------------------------------------------------------------
 * context, memory, streams
 * ------------------------------------------------------------------------------------------- */

static void cu_context_fini(moe_context_t *ctx) {
    cu_context_t *c = cu_ctx(ctx);
    if (!c) return;
    (void)cudaSetDevice(ctx->device);
    if (c->blas) cublasDestroy(c->blas);
    cudaFree(c->count_d);
    cudaFreeHost(c->count_h);
    free(c);
    ctx->impl = NULL;
}

static moe_status_t cu_context_init(moe_context_t *ctx) {
    int count = 0;
    cudaError_t e = cudaGetDeviceCount(&count);
    if (e != cudaSuccess || count == 0) {
        (void)cudaGetLastError();
        return MOE_ERR(MOE_STATUS_NOT_SUPPORTED,
                       "backend MOE_BACKEND_CUDA: no usable CUDA device (cudaGetDeviceCount: "
                       "%s, %d devices)",
                       e == cudaSuccess ? "cudaSuccess" : cudaGetErrorName(e), count);
    }
    if (ctx->device >= count)
        return MOE_ERR(MOE_STATUS_INVALID_ARGUMENT, "device %d: only %d CUDA devices present",
                       ctx->device, count);
    MOE_CUDA_CHECK(cudaSetDevice(ctx->device));
    cu_context_t *c = (cu_context_t *)calloc(1, sizeof *c);
    if (!c) return MOE_ERR(MOE_STATUS_ALLOC_FAILED, "CUDA context state");
    ctx->impl = c;
    const char *g = getenv("MOE_CUDA_GEMM");
    c->grouped_gemm = g && strcmp(g, "grouped") == 0;
    moe_status_t st = MOE_STATUS_SUCCESS;
    cublasStatus_t bs = cublasCreate(&c->blas);
    if (bs != CUBLAS_STATUS_SUCCESS) {
        c->blas = NULL;
        st = MOE_ERR(MOE_STATUS_BACKEND_ERROR, "cublasCreate failed: %s",
                     cublasGetStatusName(bs));
    } else if ((bs = cublasSetMathMode(c->blas, CUBLAS_DEFAULT_MATH)) != CUBLAS_STATUS_SUCCESS) {
        /* f32 stays f32: no TF32 */
        st = MOE_ERR(MOE_STATUS_BACKEND_ERROR, "cublasSetMathMode failed: %s",
                     cublasGetStatusName(bs));
    } else if (cudaMalloc((void **)&c->count_d, sizeof *c->count_d) != cudaSuccess ||
               cudaMallocHost((void **)&c->count_h, sizeof *c->count_h) != cudaSuccess) {
        (void)cudaGetLastError();
        st = MOE_ERR(MOE_STATUS_ALLOC_FAILED, "CUDA context scratch");
    }
    if (st != MOE_STATUS_SUCCESS) cu_context_fini(ctx);
    return st;
}

static moe_status_t cu_alloc(moe_context_t *ctx, void **ptr, size_t bytes) {
    *ptr = NULL;
    if (bytes == 0) return MOE_STATUS_SUCCESS;
    MOE_CUDA_CHECK(cudaSetDevice(ctx->device));
    cudaError_t e = cudaMalloc(ptr, bytes);
    if (e != cudaSuccess) {
        (void)cudaGetLastError();
        *ptr = NULL;
        return MOE_ERR(MOE_STATUS_ALLOC_FAILED, "cudaMalloc of %zu bytes failed: %s", bytes,
                       cudaGetErrorName(e));
    }
    return MOE_STATUS_SUCCESS;
}

static void cu_free(moe_context_t *ctx, void *ptr) {
    if (!ptr) return;
    (void)cudaSetDevice(ctx->device);
    cudaFree(ptr);
}

static moe_status_t cu_memset_zero(moe_context_t *ctx, void *ptr, size_t bytes, void *stream) {
    if (bytes == 0) return MOE_STATUS_SUCCESS;
    MOE_CHECK(cu_enter(ctx, stream));
    MOE_CUDA_CHECK(cudaMemsetAsync(ptr, 0, bytes, (cudaStream_t)stream));
    return MOE_STATUS_SUCCESS;
}

static moe_status_t cu_copy(moe_context_t *ctx, void *dst, const void *src, size_t bytes,
                            moe_copy_kind_t kind, void *stream) {
    if (bytes == 0 || dst == src) return MOE_STATUS_SUCCESS;
    MOE_CHECK(cu_enter(ctx, stream));
    enum cudaMemcpyKind k = kind == MOE_COPY_H2D   ? cudaMemcpyHostToDevice
                            : kind == MOE_COPY_D2H ? cudaMemcpyDeviceToHost
                                                   : cudaMemcpyDeviceToDevice;
    MOE_CUDA_CHECK(cudaMemcpyAsync(dst, src, bytes, k, (cudaStream_t)stream));
    return MOE_STATUS_SUCCESS;
}

static moe_status_t cu_sync(moe_context_t *ctx, void *stream) {
    MOE_CUDA_CHECK(cudaSetDevice(ctx->device));
    MOE_CUDA_CHECK(cudaStreamSynchronize((cudaStream_t)stream));
    return MOE_STATUS_SUCCESS;
}

static moe_status_t cu_count_nonfinite_typed(moe_context_t *ctx, const void *x,
                                             moe_dtype_t dtype, int64_t n, int64_t *num_bad,
                                             void *stream) {
    cu_context_t *c = cu_ctx(ctx);
    cudaStream_t st = (cudaStream_t)stream;
    MOE_CHECK(cu_enter(ctx, stream));
    MOE_CUDA_CHECK(moe_k_count_nonfinite(x, (int)dtype, n, c->count_d, st));
    MOE_CUDA_CHECK(cudaMemcpyAsync(c->count_h, c->count_d, sizeof *c->count_h,
                                   cudaMemcpyDeviceToHost, st));
    MOE_CUDA_CHECK(cudaStreamSynchronize(st));
    *num_bad = (int64_t)*c->count_h;
    return MOE_STATUS_SUCCESS;
}

static moe_status_t cu_count_nonfinite(moe_context_t *ctx, const void *x, int64_t n,
                                       int64_t *num_bad, void *stream) {
    return cu_count_nonfinite_typed(ctx, x, MOE_DTYPE_F32, n, num_bad, stream);
}

/* ---------------------------------------------------------------------------------------------
 * per-layer state
 * ------------------------------------------------------------------------------------------- */

static void cu_free_tokens(cu_layer_t *L) {
    void *p[] = {L->gate_scr, L->part,      L->cnt_part,  L->keys_in,  L->keys_out, L->vals_in,
                 L->vals_out, L->fkeys_in,  L->fkeys_out, L->cub_temp, L->x32,      L->dx32,
                 L->hier_part, L->hier_cnt};
    for (size_t i = 0; i < sizeof p / sizeof p[0]; ++i) cudaFree(p[i]);
    L->gate_scr = NULL, L->part = NULL, L->cnt_part = NULL;
    L->keys_in = L->keys_out = L->vals_in = L->vals_out = NULL;
    L->fkeys_in = L->fkeys_out = NULL;
    L->cub_temp = NULL;
    L->cub_bytes = 0;
    L->x32 = L->dx32 = NULL;
    L->hier_part = NULL, L->hier_cnt = NULL;
    L->cap_tokens = 0;
}

static void cu_layer_fini(moe_context_t *ctx, moe_backend_layer_t *s) {
    cu_layer_t *L = (cu_layer_t *)s->impl;
    if (!L) return;
    (void)cudaSetDevice(ctx->device);
    cu_free_tokens(L);
    cudaFree(L->red), cudaFree(L->counts_d), cudaFree(L->claim_d), cudaFree(L->offsets_d);
    cudaFree(L->coefs_d), cudaFree(L->gemm_ptrs), cudaFree(L->w32), cudaFree(L->dw32);
    cudaFreeHost(L->red_h), cudaFreeHost(L->counts_h);
    cudaFree(L->ffn_off_d), cudaFreeHost(L->ffn_off_h);
    cudaFree(L->hier_red), cudaFree(L->hier_coefs_d), cudaFreeHost(L->hier_red_h);
    free(L);
    s->impl = NULL;
}

#define MOE_CU_ALLOC(ptr, count)                                                          \
    MOE_CUDA_CHECK(cudaMalloc((void **)&(ptr), (size_t)(count) * sizeof(*(ptr))))

static moe_status_t cu_layer_alloc_experts(cu_layer_t *L, const moe_backend_layer_t *s) {
    const int64_t E = s->E;
    MOE_CU_ALLOC(L->red, 3 * E + 1);
    MOE_CU_ALLOC(L->counts_d, E);
    MOE_CU_ALLOC(L->claim_d, E);
    MOE_CU_ALLOC(L->offsets_d, E + 1);
    MOE_CU_ALLOC(L->ffn_off_d, s->E_local + 1);
    MOE_CUDA_CHECK(
        cudaMallocHost((void **)&L->ffn_off_h, (size_t)(s->E_local + 1) * sizeof(int64_t)));
    MOE_CU_ALLOC(L->coefs_d, 3 * E);
    MOE_CU_ALLOC(L->gemm_ptrs, 3 * s->E_local);
    if (s->cfg.dtype != MOE_DTYPE_F32) {
        MOE_CU_ALLOC(L->w32, 2 * s->D * E);
        MOE_CU_ALLOC(L->dw32, s->D * E);
    }
    MOE_CUDA_CHECK(cudaMallocHost((void **)&L->red_h, (size_t)(3 * E + 1) * sizeof(double)));
    MOE_CUDA_CHECK(cudaMallocHost((void **)&L->counts_h, (size_t)E * sizeof(int64_t)));
    if (s->cfg.router == MOE_ROUTER_HIERARCHICAL) {
        const int64_t G = s->cfg.num_groups;
        MOE_CU_ALLOC(L->hier_red, MOE_HIER_NSUMS(G, E));
        MOE_CU_ALLOC(L->hier_coefs_d, MOE_HIER_NCOEFS(G, E));
        MOE_CUDA_CHECK(cudaMallocHost((void **)&L->hier_red_h,
                                      (size_t)MOE_HIER_NSUMS(G, E) * sizeof(double)));
    }
    return MOE_STATUS_SUCCESS;
}

static moe_status_t cu_layer_init(moe_context_t *ctx, moe_backend_layer_t *s) {
    MOE_CUDA_CHECK(cudaSetDevice(ctx->device));
    cu_layer_t *L = (cu_layer_t *)calloc(1, sizeof *L);
    if (!L) return MOE_ERR(MOE_STATUS_ALLOC_FAILED, "CUDA layer state");
    s->impl = L;
    moe_status_t st = cu_layer_alloc_experts(L, s);
    if (st != MOE_STATUS_SUCCESS) {
        (void)cudaGetLastError();
        cu_layer_fini(ctx, s);
    }
    return st;
}

static moe_status_t cu_alloc_tokens(cu_layer_t *L, const moe_backend_layer_t *s, int64_t T) {
    const int64_t E = s->E, K = s->K, n = T * K;
    const int64_t nblk = moe_k_gate_num_blocks(T);
    const int64_t per = cu_gate_scr_per(s);
    MOE_CU_ALLOC(L->gate_scr, T * per);
    if (s->cfg.router == MOE_ROUTER_HIERARCHICAL) {
        const int64_t hb = moe_k_gate_hier_num_blocks(T);
        MOE_CU_ALLOC(L->hier_part, hb * MOE_HIER_NSUMS(s->cfg.num_groups, E));
        MOE_CU_ALLOC(L->hier_cnt, hb * E);
    }
    MOE_CU_ALLOC(L->part, nblk * (3 * E + 1));
    MOE_CU_ALLOC(L->cnt_part, nblk * E);
    MOE_CU_ALLOC(L->keys_in, n);
    MOE_CU_ALLOC(L->keys_out, n);
    MOE_CU_ALLOC(L->vals_in, n);
    MOE_CU_ALLOC(L->vals_out, n);
    MOE_CU_ALLOC(L->fkeys_in, n);
    MOE_CU_ALLOC(L->fkeys_out, n);
    if (s->cfg.dtype != MOE_DTYPE_F32) {
        MOE_CU_ALLOC(L->x32, T * s->D);
        MOE_CU_ALLOC(L->dx32, T * s->D);
    }
    size_t bytes = 0;
    MOE_CUDA_CHECK(moe_k_route_temp_bytes(n, E, &bytes));
    MOE_CUDA_CHECK(cudaMalloc(&L->cub_temp, bytes ? bytes : 1));
    L->cub_bytes = bytes;
    L->cap_tokens = T;
    return MOE_STATUS_SUCCESS;
}

/* grows the token-sized scratch to T tokens (frees first: the device may be short of memory) */
static moe_status_t cu_reserve(const moe_backend_layer_t *s, int64_t T) {
    cu_layer_t *L = (cu_layer_t *)s->impl;
    if (T <= L->cap_tokens) return MOE_STATUS_SUCCESS;
    cu_free_tokens(L);
    moe_status_t st = cu_alloc_tokens(L, s, T);
    if (st != MOE_STATUS_SUCCESS) {
        (void)cudaGetLastError();
        cu_free_tokens(L);
    }
    return st;
}

static moe_status_t cu_route(moe_context_t *ctx, const moe_route_args_t *r, void *stream) {
    const moe_backend_layer_t *l = r->layer;
    cu_layer_t *L = (cu_layer_t *)l->impl;
    cudaStream_t st = (cudaStream_t)stream;
    const int64_t E = l->E;
    MOE_CHECK(cu_enter(ctx, stream));
    /* kept rows per expert follow from the claims alone (router_host.c's rule): no sync */
    r->offsets[0] = 0;
    for (int64_t e = 0; e < E; ++e) {
        int64_t claimed = r->counts[e];
        int64_t kept = r->capacity >= 0 && claimed > r->capacity ? r->capacity : claimed;
        r->dropped[e] = claimed - kept;
        r->offsets[e + 1] = r->offsets[e] + kept;
    }
    *r->num_rows = r->offsets[E];
    /* pageable source: staged before the call returns. The claims are uploaded too: the host
     * counts are the truth (the gate pass's, or forced routing's for a replay) */
    MOE_CUDA_CHECK(cudaMemcpyAsync(L->offsets_d, r->offsets, (size_t)(E + 1) * sizeof(int64_t),
                                   cudaMemcpyHostToDevice, st));
    MOE_CUDA_CHECK(cudaMemcpyAsync(L->counts_d, r->counts, (size_t)E * sizeof(int64_t),
                                   cudaMemcpyHostToDevice, st));
    const moe_k_route_args_t a = {.T = r->T,
                                  .K = l->K,
                                  .K1 = l->K1,
                                  .E = E,
                                  .capacity = r->capacity,
                                  .priority = (int)l->cfg.priority,
                                  .idx = r->idx,
                                  .gate = r->gate,
                                  .counts = L->counts_d,
                                  .offsets = L->offsets_d,
                                  .row = r->row,
                                  .keys_in = L->keys_in,
                                  .keys_out = L->keys_out,
                                  .vals_in = L->vals_in,
                                  .vals_out = L->vals_out,
                                  .fkeys_in = L->fkeys_in,
                                  .fkeys_out = L->fkeys_out,
                                  .claim_start = L->claim_d,
                                  .temp = L->cub_temp,
                                  .temp_bytes = L->cub_bytes};
    MOE_CUDA_CHECK(moe_k_route(&a, st));
    return MOE_STATUS_SUCCESS;
}

static moe_status_t cu_permute(moe_context_t *ctx, const moe_permute_args_t *a, void *stream) {
    const moe_backend_layer_t *l = a->layer;
    MOE_CHECK(cu_enter(ctx, stream));
    MOE_CUDA_CHECK(moe_k_permute(a->x, a->row, a->T, l->K, l->D, (int)l->cfg.dtype, a->xp,
                                 (cudaStream_t)stream));
    return MOE_STATUS_SUCCESS;
}

/* ---------------------------------------------------------------------------------------------
 * experts
 * ------------------------------------------------------------------------------------------- */

/* One GEMM per local expert over its rows: C_e = op(A_e) op(B_e) (+ beta C_e), row-major.
 * Each operand is a row buffer (offset by the expert's first row times rows_stride) or the
 * experts' weights (offset by le times w_size): rows_stride != 0 marks a row operand. m (or k)
 * < 0 stands for the expert's row count. */
typedef struct {
    const void *ptr;
    int64_t ld;
    int64_t rows_stride; /* row operand: + r0 * rows_stride elements */
    int64_t w_size;      /* weight: + le * w_size elements */
} cu_operand_t;

typedef struct {
    int ta, tb;
    int64_t m, n, k;
    cu_operand_t A, B, C;
    float beta;
    int c_f32; /* C is f32 (else the layer's dtype) */
} cu_gemm_plan_t;

static const void *cu_operand_at(const cu_operand_t *o, int64_t r0, int64_t le, size_t esz) {
    return (const char *)o->ptr + (size_t)(o->rows_stride ? r0 * o->rows_stride : le * o->w_size) *
                                      esz;
}

static moe_status_t cu_expert_gemms(moe_context_t *ctx, const moe_backend_layer_t *l,
                                    const int64_t *offsets, const cu_gemm_plan_t *p,
                                    cudaStream_t st) {
    cu_context_t *c = cu_ctx(ctx);
    cu_layer_t *L = (cu_layer_t *)l->impl;
    const int dt = (int)l->cfg.dtype;
    const size_t esz = moe_dtype_size(l->cfg.dtype);
    enum { MAXG = 1024 };
    int gm[MAXG], gn[MAXG], gk[MAXG], glda[MAXG], gldb[MAXG], gldc[MAXG];
    const void *gA[MAXG], *gB[MAXG];
    void *gC[MAXG];
    int count = 0;
    /* cuBLAS 13.1's grouped call refuses 16-bit A/B with an f32 C (measured on H100): those
     * GEMMs stay a loop in grouped mode too */
    const int grouped = c->grouped_gemm && l->E_local <= MAXG &&
                        !(p->c_f32 && l->cfg.dtype != MOE_DTYPE_F32);
    for (int64_t le = 0; le < l->E_local; ++le) {
        int64_t e = l->expert_begin + le;
        /* offsets are absolute rows of the buffers (expert side with expert parallelism) */
        int64_t r0 = offsets[e], rows = offsets[e + 1] - offsets[e];
        if (rows == 0) continue;
        int64_t m = p->m < 0 ? rows : p->m, n = p->n, k = p->k < 0 ? rows : p->k;
        const void *A = cu_operand_at(&p->A, r0, le, esz);
        const void *B = cu_operand_at(&p->B, r0, le, esz);
        void *C = (void *)cu_operand_at(&p->C, r0, le, p->c_f32 ? sizeof(float) : esz);
        if (!grouped) {
            MOE_CUBLAS_CHECK(moe_k_gemm(c->blas, p->ta, p->tb, m, n, k, A, p->A.ld, B, p->B.ld,
                                        p->beta, C, p->C.ld, dt, p->c_f32));
            continue;
        }
        gm[count] = (int)m, gn[count] = (int)n, gk[count] = (int)k;
        gA[count] = A, gB[count] = B, gC[count] = C;
        glda[count] = (int)p->A.ld, gldb[count] = (int)p->B.ld, gldc[count] = (int)p->C.ld;
        ++count;
    }
    if (grouped && count)
        MOE_CUBLAS_CHECK(moe_k_gemm_grouped(c->blas, p->ta, p->tb, count, gm, gn, gk, gA, glda,
                                            gB, gldb, p->beta, gC, gldc, dt, p->c_f32,
                                            L->gemm_ptrs, st));
    return MOE_STATUS_SUCCESS;
}

/* a row operand of `width` elements per row, and the local experts' weights of `size` each */
static cu_operand_t cu_rows_of(const void *ptr, int64_t width) {
    return (cu_operand_t){.ptr = ptr, .ld = width, .rows_stride = width, .w_size = 0};
}

static cu_operand_t cu_weights_of(const void *ptr, int64_t ld, int64_t size) {
    return (cu_operand_t){.ptr = ptr, .ld = ld, .rows_stride = 0, .w_size = size};
}

/* The expert ops work on rows [R0, R0 + N) of the row buffers, where R0 and the per-expert
 * starts come from the rows' offsets: the whole local range on one rank, or one pipeline
 * chunk of experts with expert parallelism. The elementwise kernels get base pointers at R0
 * and offsets relative to it (the route's device offsets, or uploaded here); the GEMMs read
 * the host offsets. */
typedef struct {
    int64_t R0, N;
    const int64_t *off; /* device (E_local + 1), relative to R0 */
} cu_rows_t;

static moe_status_t cu_expert_rows(const moe_backend_layer_t *l, const moe_expert_rows_t *rows,
                                   cudaStream_t st, cu_rows_t *r) {
    cu_layer_t *L = (cu_layer_t *)l->impl;
    const int64_t b = l->expert_begin, *offsets = rows->offsets;
    r->R0 = offsets[b];
    r->N = offsets[b + l->E_local] - r->R0;
    if (rows->route_offsets) { /* the route's offsets, already on the device (R0 = 0) */
        r->off = L->offsets_d + b;
        return MOE_STATUS_SUCCESS;
    }
    r->off = L->ffn_off_d;
    if (r->N == 0) return MOE_STATUS_SUCCESS;
    /* the previous upload must be consumed before the staging is rewritten */
    MOE_CUDA_CHECK(cudaStreamSynchronize(st));
    for (int64_t le = 0; le <= l->E_local; ++le) L->ffn_off_h[le] = offsets[b + le] - r->R0;
    MOE_CUDA_CHECK(cudaMemcpyAsync(L->ffn_off_d, L->ffn_off_h,
                                   (size_t)(l->E_local + 1) * sizeof(int64_t),
                                   cudaMemcpyHostToDevice, st));
    return MOE_STATUS_SUCCESS;
}

/* row r of a buffer with `width` elements of `esz` bytes per row */
static void *cu_row(const void *base, int64_t r, int64_t width, size_t esz) {
    return (char *)base + (size_t)(r * width) * esz;
}

static moe_status_t cu_ffn_fwd(moe_context_t *ctx, const moe_ffn_fwd_args_t *a, void *stream) {
    const moe_backend_layer_t *l = a->layer;
    cudaStream_t st = (cudaStream_t)stream;
    const int64_t D = l->D, F = l->F, F2 = l->F2, El = l->E_local;
    const int dt = (int)l->cfg.dtype, act = (int)l->cfg.activation;
    const size_t v = moe_dtype_size(l->cfg.dtype), f = sizeof(float);
    MOE_CHECK(cu_enter(ctx, stream));
    cu_rows_t r;
    MOE_CHECK(cu_expert_rows(l, &a->rows, st, &r));
    if (r.N == 0) return MOE_STATUS_SUCCESS;
    const int64_t *offsets = a->rows.offsets;
    void *hpre = cu_row(a->hpre, r.R0, F2, f), *actv = cu_row(a->act, r.R0, F, v);
    void *y = cu_row(a->y, r.R0, D, v);
    /* H = X W1 (+ b1): bias rows first, then the GEMM adds onto them, as the CPU backend */
    if (a->b1) MOE_CUDA_CHECK(moe_k_fill_bias(hpre, 1, r.N, F2, a->b1, r.off, El, dt, st));
    const cu_gemm_plan_t h = {.ta = 0, .tb = 0, .m = -1, .n = F2, .k = D,
                              .A = cu_rows_of(a->x, D),
                              .B = cu_weights_of(a->w1, F2, D * F2),
                              .C = cu_rows_of(a->hpre, F2),
                              .beta = a->b1 ? 1.0f : 0.0f, .c_f32 = 1};
    MOE_CHECK(cu_expert_gemms(ctx, l, offsets, &h, st));
    MOE_CUDA_CHECK(moe_k_act_fwd(hpre, actv, r.N, F, act, dt, st));
    /* Y = A W2 (+ b2) */
    if (a->b2) MOE_CUDA_CHECK(moe_k_fill_bias(y, 0, r.N, D, a->b2, r.off, El, dt, st));
    const cu_gemm_plan_t o = {.ta = 0, .tb = 0, .m = -1, .n = D, .k = F,
                              .A = cu_rows_of(a->act, F),
                              .B = cu_weights_of(a->w2, D, F * D),
                              .C = cu_rows_of(a->y, D),
                              .beta = a->b2 ? 1.0f : 0.0f, .c_f32 = 0};
    MOE_CHECK(cu_expert_gemms(ctx, l, offsets, &o, st));
    return MOE_STATUS_SUCCESS;
}

static moe_status_t cu_ffn_bwd(moe_context_t *ctx, const moe_ffn_bwd_args_t *a, void *stream) {
    const moe_backend_layer_t *l = a->layer;
    cudaStream_t st = (cudaStream_t)stream;
    const int64_t D = l->D, F = l->F, F2 = l->F2, El = l->E_local;
    const int dt = (int)l->cfg.dtype, act = (int)l->cfg.activation;
    const size_t v = moe_dtype_size(l->cfg.dtype), f = sizeof(float);
    MOE_CHECK(cu_enter(ctx, stream));
    cu_rows_t r;
    MOE_CHECK(cu_expert_rows(l, &a->rows, st, &r));
    if (r.N == 0) return MOE_STATUS_SUCCESS;
    const int64_t *offsets = a->rows.offsets;
    /* dA = dY W2^T */
    const cu_gemm_plan_t da = {.ta = 0, .tb = 1, .m = -1, .n = F, .k = D,
                               .A = cu_rows_of(a->dy, D),
                               .B = cu_weights_of(a->w2, D, F * D),
                               .C = cu_rows_of(a->dact, F),
                               .beta = 0.0f, .c_f32 = 1};
    MOE_CHECK(cu_expert_gemms(ctx, l, offsets, &da, st));
    /* dW2 += A^T dY */
    const cu_gemm_plan_t dw2 = {.ta = 1, .tb = 0, .m = F, .n = D, .k = -1,
                                .A = cu_rows_of(a->act, F),
                                .B = cu_rows_of(a->dy, D),
                                .C = cu_weights_of(a->dw2, D, F * D),
                                .beta = 1.0f, .c_f32 = 0};
    MOE_CHECK(cu_expert_gemms(ctx, l, offsets, &dw2, st));
    if (a->db2)
        MOE_CUDA_CHECK(moe_k_colsum_add(a->db2, cu_row(a->dy, r.R0, D, v), D, r.off, El, dt, st));
    MOE_CUDA_CHECK(moe_k_act_bwd(cu_row(a->hpre, r.R0, F2, f), cu_row(a->dact, r.R0, F, f),
                                 cu_row(a->dhpre, r.R0, F2, v), r.N, F, act, dt, st));
    /* dW1 += X^T dH */
    const cu_gemm_plan_t dw1 = {.ta = 1, .tb = 0, .m = D, .n = F2, .k = -1,
                                .A = cu_rows_of(a->x, D),
                                .B = cu_rows_of(a->dhpre, F2),
                                .C = cu_weights_of(a->dw1, F2, D * F2),
                                .beta = 1.0f, .c_f32 = 0};
    MOE_CHECK(cu_expert_gemms(ctx, l, offsets, &dw1, st));
    if (a->db1)
        MOE_CUDA_CHECK(
            moe_k_colsum_add(a->db1, cu_row(a->dhpre, r.R0, F2, v), F2, r.off, El, dt, st));
    /* dX = dH W1^T */
    const cu_gemm_plan_t dx = {.ta = 0, .tb = 1, .m = -1, .n = D, .k = F2,
                               .A = cu_rows_of(a->dhpre, F2),
                               .B = cu_weights_of(a->w1, F2, D * F2),
                               .C = cu_rows_of(a->dx, D),
                               .beta = 0.0f, .c_f32 = 0};
    MOE_CHECK(cu_expert_gemms(ctx, l, offsets, &dx, st));
    return MOE_STATUS_SUCCESS;
}

/* ---------------------------------------------------------------------------------------------
 * combine, un-permute, gate backward
 * ------------------------------------------------------------------------------------------- */

static moe_status_t cu_combine_fwd(moe_context_t *ctx, const moe_combine_fwd_args_t *a,
                                   void *stream) {
    const moe_backend_layer_t *l = a->layer;
    MOE_CHECK(cu_enter(ctx, stream));
    MOE_CUDA_CHECK(moe_k_combine_fwd(a->yp, a->row, a->gate, a->T, l->K, l->D, (int)l->cfg.dtype,
                                     a->y, (cudaStream_t)stream));
    return MOE_STATUS_SUCCESS;
}

static moe_status_t cu_combine_bwd(moe_context_t *ctx, const moe_combine_bwd_args_t *a,
                                   void *stream) {
    const moe_backend_layer_t *l = a->layer;
    MOE_CHECK(cu_enter(ctx, stream));
    MOE_CUDA_CHECK(moe_k_combine_bwd(a->dy, a->yp, a->row, a->gate, a->T, l->K, l->D,
                                     (int)l->cfg.dtype, a->dyp, a->dgate, (cudaStream_t)stream));
    return MOE_STATUS_SUCCESS;
}

static moe_status_t cu_unpermute_bwd(moe_context_t *ctx, const moe_unpermute_bwd_args_t *a,
                                     void *stream) {
    const moe_backend_layer_t *l = a->layer;
    MOE_CHECK(cu_enter(ctx, stream));
    MOE_CUDA_CHECK(moe_k_unpermute(a->dxp, a->row, a->T, l->K, l->D, (int)l->cfg.dtype, a->dx,
                                   (cudaStream_t)stream));
    return MOE_STATUS_SUCCESS;
}

/* the gate ops (cuda_gate.c), with the token scratch grown to the call's tokens first */
static moe_status_t cu_gate_fwd(moe_context_t *ctx, const moe_gate_fwd_args_t *g, void *stream) {
    MOE_CHECK(cu_enter(ctx, stream));
    MOE_CHECK(cu_reserve(g->layer, g->T));
    return moe__cu_gate_fwd(ctx, g, stream);
}

static moe_status_t cu_gate_bwd(moe_context_t *ctx, const moe_gate_bwd_args_t *g, void *stream) {
    MOE_CHECK(cu_enter(ctx, stream));
    MOE_CHECK(cu_reserve(g->layer, g->T));
    return moe__cu_gate_bwd(ctx, g, stream);
}

static moe_status_t cu_gate_hier_fwd(moe_context_t *ctx, const moe_gate_hier_fwd_args_t *g,
                                     void *stream) {
    MOE_CHECK(cu_enter(ctx, stream));
    MOE_CHECK(cu_reserve(g->layer, g->T));
    return moe__cu_gate_hier_fwd(ctx, g, stream);
}

static moe_status_t cu_gate_hier_bwd(moe_context_t *ctx, const moe_gate_hier_bwd_args_t *g,
                                     void *stream) {
    MOE_CHECK(cu_enter(ctx, stream));
    MOE_CHECK(cu_reserve(g->layer, g->T));
    return moe__cu_gate_hier_bwd(ctx, g, stream);
}

/* shared experts: cuda_shared.c, with this context's cuBLAS handle on the caller's stream */
static moe_status_t cu_shared_fwd(moe_context_t *ctx, const moe_shared_fwd_args_t *a,
                                  void *stream) {
    MOE_CHECK(cu_enter(ctx, stream));
    return moe__cu_shared_fwd(cu_ctx(ctx)->blas, a, (cudaStream_t)stream);
}

static moe_status_t cu_shared_combine_bwd(moe_context_t *ctx,
                                          const moe_shared_combine_bwd_args_t *a, void *stream) {
    MOE_CHECK(cu_enter(ctx, stream));
    return moe__cu_shared_combine_bwd(a, (cudaStream_t)stream);
}

static moe_status_t cu_shared_bwd(moe_context_t *ctx, const moe_shared_bwd_args_t *a,
                                  void *stream) {
    MOE_CHECK(cu_enter(ctx, stream));
    return moe__cu_shared_bwd(cu_ctx(ctx)->blas, a, (cudaStream_t)stream);
}

/* per-expert outputs (kernels/experts_out.cu) */
static moe_status_t cu_experts_out_fwd(moe_context_t *ctx, const moe_experts_out_fwd_args_t *a,
                                       void *stream) {
    const moe_backend_layer_t *l = a->layer;
    MOE_CHECK(cu_enter(ctx, stream));
    MOE_CUDA_CHECK(moe_k_experts_out_fwd(a->yp, a->row, a->gate, a->T, l->K, l->D,
                                         (int)l->cfg.dtype, a->ye, a->ge, (cudaStream_t)stream));
    return MOE_STATUS_SUCCESS;
}

static moe_status_t cu_experts_out_bwd(moe_context_t *ctx, const moe_experts_out_bwd_args_t *a,
                                       void *stream) {
    const moe_backend_layer_t *l = a->layer;
    MOE_CHECK(cu_enter(ctx, stream));
    MOE_CUDA_CHECK(moe_k_experts_out_bwd(a->dye, a->dge, a->row, a->T, l->K, l->D,
                                         (int)l->cfg.dtype, a->dyp, a->dgate,
                                         (cudaStream_t)stream));
    return MOE_STATUS_SUCCESS;
}

static moe_status_t cu_optim_update(moe_context_t *ctx, const moe_optim_args_t *a, void *stream) {
    MOE_CHECK(cu_enter(ctx, stream));
    MOE_CUDA_CHECK(moe_k_optim_update(a->adam, a->w, a->g, a->m, a->v, a->n, a->c,
                                      (cudaStream_t)stream));
    return MOE_STATUS_SUCCESS;
}

const moe_backend_ops_t moe_cuda_backend = {
    .name = "cuda",
    .context_init = cu_context_init,
    .context_fini = cu_context_fini,
    .mem = {.alloc = cu_alloc,
            .free = cu_free,
            .memset_zero = cu_memset_zero,
            .copy = cu_copy,
            .sync = cu_sync},
    .layer_init = cu_layer_init,
    .layer_fini = cu_layer_fini,
    .count_nonfinite = cu_count_nonfinite,
    .count_nonfinite_typed = cu_count_nonfinite_typed,
    .gate_fwd = cu_gate_fwd,
    .route = cu_route,
    .permute = cu_permute,
    .ffn_fwd = cu_ffn_fwd,
    .combine_fwd = cu_combine_fwd,
    .combine_bwd = cu_combine_bwd,
    .ffn_bwd = cu_ffn_bwd,
    .unpermute_bwd = cu_unpermute_bwd,
    .gate_bwd = cu_gate_bwd,
    .shared_fwd = cu_shared_fwd,
    .shared_combine_bwd = cu_shared_combine_bwd,
    .shared_bwd = cu_shared_bwd,
    .experts_out_fwd = cu_experts_out_fwd,
    .experts_out_bwd = cu_experts_out_bwd,
    .optim_update = cu_optim_update,
    .gate_hier_fwd = cu_gate_hier_fwd,
    .gate_hier_bwd = cu_gate_hier_bwd,
};
