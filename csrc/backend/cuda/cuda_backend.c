/* cuda_backend.c - host side of the CUDA backend: device memory, streams, the cuBLAS handle and
 * the launches of every op of moe_backend_ops_t (kernels in kernels/, one .cu per op family).
 *
 * Contract kept with the scheduler: a forward synchronises the caller's stream once for the
 * routing (after the gate: the per-expert sums and counts come back to the host mirrors, and
 * the expert GEMM sizes are known from then on), besides the NaN/Inf check of x that
 * count_nonfinite answers on the host. Everything else is enqueued on the caller's stream. */
#include <stdlib.h>
#include <string.h>

#include "backend/backend.h"
#include "context.h"
#include "core/check_cuda.h"
#include "core/dtype.h"
#include "core/status.h"
#include "kernels/kernels.h"

_Static_assert(MOE_DTYPE_F32 == 0 && MOE_DTYPE_BF16 == 1 && MOE_DTYPE_F16 == 2,
               "kernels/common.cuh mirrors the moe_dtype_t values");
_Static_assert(MOE_PRIORITY_SCORE == 1, "kernels/permute.cu tests priority == 1");

typedef struct cu_context {
    cublasHandle_t blas;
    unsigned long long *count_d; /* count_nonfinite's result, device */
    unsigned long long *count_h; /* and its pinned host mirror */
    int grouped_gemm;            /* MOE_CUDA_GEMM=grouped: one cuBLAS grouped call per GEMM */
} cu_context_t;

/* per-layer device state beside the layer's own buffers */
typedef struct cu_layer {
    int64_t cap_tokens;          /* tokens the T-sized scratch below holds */
    float *gate_scr;             /* (T, max(3E + K1, 4E + K)) per-token scratch of the gate */
    double *part;                /* (nblk, 3E + 1) block partials */
    int64_t *cnt_part;           /* (nblk, E) */
    int32_t *keys_in, *keys_out; /* (T K) slot assignment sort */
    int32_t *vals_in, *vals_out;
    float *fkeys_in, *fkeys_out;
    void *cub_temp;
    size_t cub_bytes;
    float *x32, *dx32; /* (T, D) f32 copies of x / the router's share of dx (16-bit dtypes) */
    /* E-sized, made once */
    float *w32;         /* (2, D, E) f32 copies of Wg, Wn: the router runs in f32 (16-bit dtypes) */
    float *dw32;        /* (D, E) router weight gradient before it is added in the dtype */
    double *red;        /* (3E + 1) device totals */
    int64_t *counts_d;  /* (E) */
    int64_t *claim_d;   /* (E) */
    int64_t *offsets_d; /* (E + 1) */
    int64_t *ffn_off_d; /* (E_local + 1) the expert ops' row offsets, relative to their first row */
    int64_t *ffn_off_h; /* pinned (E_local + 1) staging of ffn_off_d */
    float *coefs_d;     /* (3E) aux-loss coefficients for gate_bwd */
    void **gemm_ptrs;   /* (3 E_local) pointer arrays of the grouped GEMM */
    double *red_h;      /* pinned (3E + 1) */
    int64_t *counts_h;  /* pinned (E) */
} cu_layer_t;

static cu_context_t *cu_ctx(moe_context_t *ctx) { return (cu_context_t *)ctx->impl; }

/* every op starts here: the context's device, and cuBLAS on the caller's stream */
static moe_status_t cu_enter(moe_context_t *ctx, void *stream) {
    MOE_CUDA_CHECK(cudaSetDevice(ctx->device));
    if (ctx->impl) MOE_CUBLAS_CHECK(cublasSetStream(cu_ctx(ctx)->blas, (cudaStream_t)stream));
    return MOE_STATUS_SUCCESS;
}

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
                 L->vals_out, L->fkeys_in,  L->fkeys_out, L->cub_temp, L->x32,      L->dx32};
    for (size_t i = 0; i < sizeof p / sizeof p[0]; ++i) cudaFree(p[i]);
    L->gate_scr = NULL, L->part = NULL, L->cnt_part = NULL;
    L->keys_in = L->keys_out = L->vals_in = L->vals_out = NULL;
    L->fkeys_in = L->fkeys_out = NULL;
    L->cub_temp = NULL;
    L->cub_bytes = 0;
    L->x32 = L->dx32 = NULL;
    L->cap_tokens = 0;
}

static void cu_layer_fini(moe_context_t *ctx, moe_layer_state_t *s) {
    cu_layer_t *L = (cu_layer_t *)s->impl;
    if (!L) return;
    (void)cudaSetDevice(ctx->device);
    cu_free_tokens(L);
    cudaFree(L->red), cudaFree(L->counts_d), cudaFree(L->claim_d), cudaFree(L->offsets_d);
    cudaFree(L->coefs_d), cudaFree(L->gemm_ptrs), cudaFree(L->w32), cudaFree(L->dw32);
    cudaFreeHost(L->red_h), cudaFreeHost(L->counts_h);
    cudaFree(L->ffn_off_d), cudaFreeHost(L->ffn_off_h);
    free(L);
    s->impl = NULL;
}

#define MOE_CU_ALLOC(ptr, count)                                                          \
    MOE_CUDA_CHECK(cudaMalloc((void **)&(ptr), (size_t)(count) * sizeof(*(ptr))))

static moe_status_t cu_layer_alloc_experts(cu_layer_t *L, const moe_layer_state_t *s) {
    const int64_t E = s->E;
    MOE_CU_ALLOC(L->red, 3 * E + 1);
    MOE_CU_ALLOC(L->counts_d, E);
    MOE_CU_ALLOC(L->claim_d, E);
    MOE_CU_ALLOC(L->offsets_d, E + 1);
    MOE_CU_ALLOC(L->ffn_off_d, s->E_local + 1);
    MOE_CUDA_CHECK(cudaMallocHost((void **)&L->ffn_off_h, (size_t)(s->E_local + 1) * sizeof(int64_t)));
    MOE_CU_ALLOC(L->coefs_d, 3 * E);
    MOE_CU_ALLOC(L->gemm_ptrs, 3 * s->E_local);
    if (s->cfg.dtype != MOE_DTYPE_F32) {
        MOE_CU_ALLOC(L->w32, 2 * s->D * E);
        MOE_CU_ALLOC(L->dw32, s->D * E);
    }
    MOE_CUDA_CHECK(cudaMallocHost((void **)&L->red_h, (size_t)(3 * E + 1) * sizeof(double)));
    MOE_CUDA_CHECK(cudaMallocHost((void **)&L->counts_h, (size_t)E * sizeof(int64_t)));
    return MOE_STATUS_SUCCESS;
}

static moe_status_t cu_layer_init(moe_context_t *ctx, moe_layer_state_t *s) {
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

static moe_status_t cu_alloc_tokens(cu_layer_t *L, const moe_layer_state_t *s, int64_t T) {
    const int64_t E = s->E, K = s->K, n = T * K;
    const int64_t nblk = moe_k_gate_num_blocks(T);
    int64_t per = 3 * E + s->K1 > 4 * E + K ? 3 * E + s->K1 : 4 * E + K;
    MOE_CU_ALLOC(L->gate_scr, T * per);
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
static moe_status_t cu_reserve(moe_layer_state_t *s, int64_t T) {
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

/* ---------------------------------------------------------------------------------------------
 * gate and routing
 * ------------------------------------------------------------------------------------------- */

/* The router runs in f32 whatever the storage: with a 16-bit dtype, x and the router weights
 * are widened into f32 scratch first (exactly: every 16-bit value is an f32 value). */
static moe_status_t cu_router_f32(moe_layer_state_t *s, const void **x, const void **wg,
                                  const void **wn, cudaStream_t st) {
    cu_layer_t *L = (cu_layer_t *)s->impl;
    const int dt = (int)s->cfg.dtype;
    if (s->cfg.dtype == MOE_DTYPE_F32) return MOE_STATUS_SUCCESS;
    const int64_t DE = s->D * s->E;
    if (x) {
        MOE_CUDA_CHECK(moe_k_to_f32(s->x, dt, s->T * s->D, L->x32, st));
        *x = L->x32;
    }
    MOE_CUDA_CHECK(moe_k_to_f32(s->param[MOE_PARAM_ROUTER_WEIGHT], dt, DE, L->w32, st));
    *wg = L->w32;
    if (s->param[MOE_PARAM_NOISE_WEIGHT]) {
        MOE_CUDA_CHECK(moe_k_to_f32(s->param[MOE_PARAM_NOISE_WEIGHT], dt, DE, L->w32 + DE, st));
        *wn = L->w32 + DE;
    }
    return MOE_STATUS_SUCCESS;
}

static moe_status_t cu_gate_fwd(moe_context_t *ctx, moe_layer_state_t *s, void *stream) {
    cu_context_t *c = cu_ctx(ctx);
    cu_layer_t *L = (cu_layer_t *)s->impl;
    cudaStream_t st = (cudaStream_t)stream;
    const int64_t T = s->T, D = s->D, E = s->E;
    MOE_CHECK(cu_enter(ctx, stream));
    MOE_CHECK(cu_reserve(s, T));
    const void *x = s->x, *wg = s->param[MOE_PARAM_ROUTER_WEIGHT];
    const void *wn = s->param[MOE_PARAM_NOISE_WEIGHT];
    MOE_CHECK(cu_router_f32(s, &x, &wg, &wn, st));
    MOE_CUBLAS_CHECK(moe_k_gemm(c->blas, 0, 0, T, E, D, x, D, wg, E, 0.0f, s->logits, E,
                                MOE_DTYPE_F32, 1));
    if (s->noisy_now)
        MOE_CUBLAS_CHECK(moe_k_gemm(c->blas, 0, 0, T, E, D, x, D, wn, E, 0.0f, s->noise_raw, E,
                                    MOE_DTYPE_F32, 1));
    moe_k_gate_args_t a;
    memset(&a, 0, sizeof a);
    a.T = T, a.E = E, a.K = s->K, a.K1 = s->K1;
    a.noisy = s->noisy_now, a.gate_mode = (int)s->cfg.gate, a.renormalize = s->cfg.renormalize;
    a.seed = s->cfg.seed, a.call = s->call, a.rank = (uint32_t)s->rank;
    a.logits = s->logits, a.noise_raw = s->noise_raw, a.eps = s->eps, a.h = s->h;
    a.score_bias = s->score_bias;
    a.lse = s->lse, a.idx = s->idx, a.gate = s->gate;
    a.scr = L->gate_scr, a.part = L->part, a.cnt_part = L->cnt_part;
    a.red = L->red, a.counts = L->counts_d;
    MOE_CUDA_CHECK(moe_k_gate_fwd(&a, st));
    MOE_CUDA_CHECK(cudaMemcpyAsync(L->red_h, L->red, (size_t)(3 * E + 1) * sizeof(double),
                                   cudaMemcpyDeviceToHost, st));
    MOE_CUDA_CHECK(cudaMemcpyAsync(L->counts_h, L->counts_d, (size_t)E * sizeof(int64_t),
                                   cudaMemcpyDeviceToHost, st));
    /* the one routing sync of a forward: GEMM sizes and the aux losses need these on the host */
    MOE_CUDA_CHECK(cudaStreamSynchronize(st));
    for (int64_t e = 0; e < E; ++e) {
        s->prob_sum_h[e] = L->red_h[e];
        s->importance_h[e] = L->red_h[E + e];
        s->load_h[e] = L->red_h[2 * E + e];
        s->counts_h[e] = L->counts_h[e];
    }
    s->z_sum = L->red_h[3 * E];
    return MOE_STATUS_SUCCESS;
}

static moe_status_t cu_route(moe_context_t *ctx, moe_layer_state_t *s, void *stream) {
    cu_layer_t *L = (cu_layer_t *)s->impl;
    cudaStream_t st = (cudaStream_t)stream;
    const int64_t E = s->E;
    MOE_CHECK(cu_enter(ctx, stream));
    /* kept rows per expert follow from the claims alone (router_host.c's rule): no sync */
    s->offsets_h[0] = 0;
    for (int64_t e = 0; e < E; ++e) {
        int64_t claimed = s->counts_h[e];
        int64_t kept = s->capacity >= 0 && claimed > s->capacity ? s->capacity : claimed;
        s->dropped_h[e] = claimed - kept;
        s->offsets_h[e + 1] = s->offsets_h[e] + kept;
    }
    s->num_rows = s->offsets_h[E];
    /* pageable source: staged before the call returns. The claims are uploaded too: the host
     * counts are the truth (the gate pass's, or forced routing's for a replay) */
    MOE_CUDA_CHECK(cudaMemcpyAsync(L->offsets_d, s->offsets_h, (size_t)(E + 1) * sizeof(int64_t),
                                   cudaMemcpyHostToDevice, st));
    MOE_CUDA_CHECK(cudaMemcpyAsync(L->counts_d, s->counts_h, (size_t)E * sizeof(int64_t),
                                   cudaMemcpyHostToDevice, st));
    moe_k_route_args_t a;
    memset(&a, 0, sizeof a);
    a.T = s->T, a.K = s->K, a.K1 = s->K1, a.E = E, a.capacity = s->capacity;
    a.priority = (int)s->cfg.priority;
    a.idx = s->idx, a.gate = s->gate, a.counts = L->counts_d, a.offsets = L->offsets_d;
    a.row = s->row;
    a.keys_in = L->keys_in, a.keys_out = L->keys_out, a.vals_in = L->vals_in;
    a.vals_out = L->vals_out, a.fkeys_in = L->fkeys_in, a.fkeys_out = L->fkeys_out;
    a.claim_start = L->claim_d, a.temp = L->cub_temp, a.temp_bytes = L->cub_bytes;
    MOE_CUDA_CHECK(moe_k_route(&a, st));
    return MOE_STATUS_SUCCESS;
}

static moe_status_t cu_permute(moe_context_t *ctx, moe_layer_state_t *s, void *stream) {
    MOE_CHECK(cu_enter(ctx, stream));
    MOE_CUDA_CHECK(moe_k_permute(s->x, s->row, s->T, s->K, s->D, (int)s->cfg.dtype, s->xp,
                                 (cudaStream_t)stream));
    return MOE_STATUS_SUCCESS;
}

/* ---------------------------------------------------------------------------------------------
 * experts
 * ------------------------------------------------------------------------------------------- */

/* One GEMM per local expert over its rows: C_e = op(A_e) op(B_e) (+ beta C_e), row-major.
 * The per-expert operands are base + rows*stride (row operands) or + le*size (weights); `which`
 * says for A, B, C whether it is a row operand (1) or a weight (0). */
typedef struct {
    int ta, tb;
    int64_t m_rows, n, k; /* m (or k when k_rows) is the expert's row count when < 0 */
    const void *A;
    int64_t lda, a_rows_stride, a_w_size; /* row operand: +r0*a_rows_stride; weight: +le*size */
    const void *B;
    int64_t ldb, b_rows_stride, b_w_size;
    void *C;
    int64_t ldc, c_rows_stride, c_w_size;
    float beta;
    int c_f32; /* C is f32 (else the layer's dtype) */
} cu_gemm_plan_t;

static moe_status_t cu_expert_gemms(moe_context_t *ctx, const moe_layer_state_t *s,
                                    const cu_gemm_plan_t *p, cudaStream_t st) {
    cu_context_t *c = cu_ctx(ctx);
    cu_layer_t *L = (cu_layer_t *)s->impl;
    const int dt = (int)s->cfg.dtype;
    const size_t esz = moe_dtype_size(s->cfg.dtype);
    enum { MAXG = 1024 };
    int gm[MAXG], gn[MAXG], gk[MAXG], glda[MAXG], gldb[MAXG], gldc[MAXG];
    const void *gA[MAXG], *gB[MAXG];
    void *gC[MAXG];
    int count = 0;
    /* cuBLAS 13.1's grouped call refuses 16-bit A/B with an f32 C (measured on H100): those
     * GEMMs stay a loop in grouped mode too */
    const int grouped = c->grouped_gemm && s->E_local <= MAXG &&
                        !(p->c_f32 && s->cfg.dtype != MOE_DTYPE_F32);
    for (int64_t le = 0; le < s->E_local; ++le) {
        int64_t e = s->expert_begin + le;
        /* offsets_h are absolute rows of the buffers (expert side with expert parallelism) */
        int64_t r0 = s->offsets_h[e], rows = s->offsets_h[e + 1] - s->offsets_h[e];
        if (rows == 0) continue;
        int64_t m = p->m_rows < 0 ? rows : p->m_rows, n = p->n, k = p->k < 0 ? rows : p->k;
        const char *A = (const char *)p->A +
                        (size_t)(p->a_rows_stride ? r0 * p->a_rows_stride : le * p->a_w_size) * esz;
        const char *B = (const char *)p->B +
                        (size_t)(p->b_rows_stride ? r0 * p->b_rows_stride : le * p->b_w_size) * esz;
        char *C = (char *)p->C + (size_t)(p->c_rows_stride ? r0 * p->c_rows_stride
                                                           : le * p->c_w_size) *
                                     (p->c_f32 ? sizeof(float) : esz);
        if (!grouped) {
            MOE_CUBLAS_CHECK(moe_k_gemm(c->blas, p->ta, p->tb, m, n, k, A, p->lda, B, p->ldb,
                                        p->beta, C, p->ldc, dt, p->c_f32));
            continue;
        }
        gm[count] = (int)m, gn[count] = (int)n, gk[count] = (int)k;
        gA[count] = A, gB[count] = B, gC[count] = C;
        glda[count] = (int)p->lda, gldb[count] = (int)p->ldb, gldc[count] = (int)p->ldc;
        ++count;
    }
    if (grouped && count)
        MOE_CUBLAS_CHECK(moe_k_gemm_grouped(c->blas, p->ta, p->tb, count, gm, gn, gk, gA, glda,
                                            gB, gldb, p->beta, gC, gldc, dt, p->c_f32,
                                            L->gemm_ptrs, st));
    return MOE_STATUS_SUCCESS;
}

/* The expert ops work on rows [R0, R0 + N) of the expert-side buffers, where R0 and the
 * per-expert starts come from s->offsets_h: the whole local range on one rank, or one pipeline
 * chunk of experts with expert parallelism (the scheduler's view). The elementwise kernels get
 * base pointers at R0 and offsets relative to it, uploaded here; the GEMMs read offsets_h. */
typedef struct {
    int64_t R0, N;
    const int64_t *off; /* device (E_local + 1), relative to R0 */
} cu_rows_t;

static moe_status_t cu_expert_rows(moe_layer_state_t *s, cudaStream_t st, cu_rows_t *r) {
    cu_layer_t *L = (cu_layer_t *)s->impl;
    const int64_t b = s->expert_begin;
    r->R0 = s->offsets_h[b];
    r->N = s->offsets_h[b + s->E_local] - r->R0;
    if (!s->expert_side) { /* the route's offsets, already on the device (R0 = 0) */
        r->off = L->offsets_d + b;
        return MOE_STATUS_SUCCESS;
    }
    r->off = L->ffn_off_d;
    if (r->N == 0) return MOE_STATUS_SUCCESS;
    /* the previous upload must be consumed before the staging is rewritten */
    MOE_CUDA_CHECK(cudaStreamSynchronize(st));
    for (int64_t le = 0; le <= s->E_local; ++le) L->ffn_off_h[le] = s->offsets_h[b + le] - r->R0;
    MOE_CUDA_CHECK(cudaMemcpyAsync(L->ffn_off_d, L->ffn_off_h,
                                   (size_t)(s->E_local + 1) * sizeof(int64_t),
                                   cudaMemcpyHostToDevice, st));
    return MOE_STATUS_SUCCESS;
}

/* row r of a buffer with `width` elements of `esz` bytes per row */
static void *cu_row(void *base, int64_t r, int64_t width, size_t esz) {
    return (char *)base + (size_t)(r * width) * esz;
}

static moe_status_t cu_ffn_fwd(moe_context_t *ctx, moe_layer_state_t *s, void *stream) {
    cudaStream_t st = (cudaStream_t)stream;
    const int64_t D = s->D, F = s->F, F2 = s->F2;
    const int dt = (int)s->cfg.dtype, act = (int)s->cfg.activation;
    const size_t v = moe_dtype_size(s->cfg.dtype), f = sizeof(float);
    MOE_CHECK(cu_enter(ctx, stream));
    cu_rows_t r;
    MOE_CHECK(cu_expert_rows(s, st, &r));
    if (r.N == 0) return MOE_STATUS_SUCCESS;
    const void *B1 = s->param[MOE_PARAM_B1], *B2 = s->param[MOE_PARAM_B2];
    void *hpre = cu_row(s->hpre, r.R0, F2, f), *actv = cu_row(s->act, r.R0, F, v);
    void *yp = cu_row(s->yp, r.R0, D, v);
    /* H = X W1 (+ b1): bias rows first, then the GEMM adds onto them, as the CPU backend */
    if (B1) MOE_CUDA_CHECK(moe_k_fill_bias(hpre, 1, r.N, F2, B1, r.off, s->E_local, dt, st));
    cu_gemm_plan_t p1 = {0, 0, -1, F2, D, s->xp, D, D, 0, s->param[MOE_PARAM_W1], F2, 0, D * F2,
                         s->hpre, F2, F2, 0, B1 ? 1.0f : 0.0f, 1};
    MOE_CHECK(cu_expert_gemms(ctx, s, &p1, st));
    MOE_CUDA_CHECK(moe_k_act_fwd(hpre, actv, r.N, F, act, dt, st));
    if (B2) MOE_CUDA_CHECK(moe_k_fill_bias(yp, 0, r.N, D, B2, r.off, s->E_local, dt, st));
    cu_gemm_plan_t p2 = {0, 0, -1, D, F, s->act, F, F, 0, s->param[MOE_PARAM_W2], D, 0, F * D,
                         s->yp, D, D, 0, B2 ? 1.0f : 0.0f, 0};
    MOE_CHECK(cu_expert_gemms(ctx, s, &p2, st));
    return MOE_STATUS_SUCCESS;
}

static moe_status_t cu_ffn_bwd(moe_context_t *ctx, moe_layer_state_t *s, void *stream) {
    cudaStream_t st = (cudaStream_t)stream;
    const int64_t D = s->D, F = s->F, F2 = s->F2;
    const int dt = (int)s->cfg.dtype, act = (int)s->cfg.activation;
    const size_t v = moe_dtype_size(s->cfg.dtype), f = sizeof(float);
    MOE_CHECK(cu_enter(ctx, stream));
    cu_rows_t r;
    MOE_CHECK(cu_expert_rows(s, st, &r));
    if (r.N == 0) return MOE_STATUS_SUCCESS;
    void *dW1 = s->grad[MOE_PARAM_W1], *dB1 = s->grad[MOE_PARAM_B1];
    void *dW2 = s->grad[MOE_PARAM_W2], *dB2 = s->grad[MOE_PARAM_B2];
    /* dA = dY W2^T */
    cu_gemm_plan_t a = {0, 1, -1, F, D, s->dyp, D, D, 0, s->param[MOE_PARAM_W2], D, 0, F * D,
                        s->dact, F, F, 0, 0.0f, 1};
    MOE_CHECK(cu_expert_gemms(ctx, s, &a, st));
    /* dW2 += A^T dY */
    cu_gemm_plan_t w2 = {1, 0, F, D, -1, s->act, F, F, 0, s->dyp, D, D, 0,
                         dW2, D, 0, F * D, 1.0f, 0};
    MOE_CHECK(cu_expert_gemms(ctx, s, &w2, st));
    if (dB2)
        MOE_CUDA_CHECK(moe_k_colsum_add(dB2, cu_row(s->dyp, r.R0, D, v), D, r.off, s->E_local,
                                        dt, st));
    MOE_CUDA_CHECK(moe_k_act_bwd(cu_row(s->hpre, r.R0, F2, f), cu_row(s->dact, r.R0, F, f),
                                 cu_row(s->dhpre, r.R0, F2, v), r.N, F, act, dt, st));
    /* dW1 += X^T dH */
    cu_gemm_plan_t w1 = {1, 0, D, F2, -1, s->xp, D, D, 0, s->dhpre, F2, F2, 0,
                         dW1, F2, 0, D * F2, 1.0f, 0};
    MOE_CHECK(cu_expert_gemms(ctx, s, &w1, st));
    if (dB1)
        MOE_CUDA_CHECK(moe_k_colsum_add(dB1, cu_row(s->dhpre, r.R0, F2, v), F2, r.off,
                                        s->E_local, dt, st));
    /* dX = dH W1^T */
    cu_gemm_plan_t x = {0, 1, -1, D, F2, s->dhpre, F2, F2, 0, s->param[MOE_PARAM_W1], F2, 0,
                        D * F2, s->dxp, D, D, 0, 0.0f, 0};
    MOE_CHECK(cu_expert_gemms(ctx, s, &x, st));
    return MOE_STATUS_SUCCESS;
}

/* ---------------------------------------------------------------------------------------------
 * combine, un-permute, gate backward
 * ------------------------------------------------------------------------------------------- */

static moe_status_t cu_combine_fwd(moe_context_t *ctx, moe_layer_state_t *s, void *y,
                                   void *stream) {
    MOE_CHECK(cu_enter(ctx, stream));
    MOE_CUDA_CHECK(moe_k_combine_fwd(s->yp, s->row, s->gate, s->T, s->K, s->D, (int)s->cfg.dtype,
                                     y, (cudaStream_t)stream));
    return MOE_STATUS_SUCCESS;
}

static moe_status_t cu_combine_bwd(moe_context_t *ctx, moe_layer_state_t *s, const void *dy,
                                   void *stream) {
    MOE_CHECK(cu_enter(ctx, stream));
    MOE_CUDA_CHECK(moe_k_combine_bwd(dy, s->yp, s->row, s->gate, s->T, s->K, s->D,
                                     (int)s->cfg.dtype, s->dyp, s->dg, (cudaStream_t)stream));
    return MOE_STATUS_SUCCESS;
}

static moe_status_t cu_unpermute_bwd(moe_context_t *ctx, moe_layer_state_t *s, void *dx,
                                     void *stream) {
    MOE_CHECK(cu_enter(ctx, stream));
    MOE_CUDA_CHECK(moe_k_unpermute(s->dxp, s->row, s->T, s->K, s->D, (int)s->cfg.dtype, dx,
                                   (cudaStream_t)stream));
    return MOE_STATUS_SUCCESS;
}

static moe_status_t cu_gate_bwd(moe_context_t *ctx, moe_layer_state_t *s, void *dx,
                                void *stream) {
    cu_context_t *c = cu_ctx(ctx);
    cu_layer_t *L = (cu_layer_t *)s->impl;
    cudaStream_t st = (cudaStream_t)stream;
    const int64_t T = s->T, D = s->D, E = s->E;
    MOE_CHECK(cu_enter(ctx, stream));
    MOE_CHECK(cu_reserve(s, T));
    /* the host's aux-loss coefficients (router_host.c); pageable sources are staged at once */
    const size_t eb = (size_t)E * sizeof(float);
    MOE_CUDA_CHECK(cudaMemcpyAsync(L->coefs_d, s->coefs.switch_f, eb, cudaMemcpyHostToDevice, st));
    MOE_CUDA_CHECK(cudaMemcpyAsync(L->coefs_d + E, s->coefs.imp, eb, cudaMemcpyHostToDevice, st));
    MOE_CUDA_CHECK(
        cudaMemcpyAsync(L->coefs_d + 2 * E, s->coefs.load, eb, cudaMemcpyHostToDevice, st));
    moe_k_gate_bwd_args_t a;
    memset(&a, 0, sizeof a);
    a.T = T, a.E = E, a.K = s->K, a.K1 = s->K1;
    a.noisy = s->noisy_now, a.gate_mode = (int)s->cfg.gate, a.renormalize = s->cfg.renormalize;
    a.any_logit = s->coefs.any_logit;
    a.logits = s->logits, a.noise_raw = s->noise_raw, a.eps = s->eps, a.h = s->h;
    a.lse = s->lse, a.gate = s->gate, a.dg = s->dg, a.idx = s->idx;
    a.coefs = L->coefs_d, a.z_scale = s->coefs.z_scale;
    a.scr = L->gate_scr, a.dlogits = s->dlogits, a.dnoise = s->dnoise;
    MOE_CUDA_CHECK(moe_k_gate_bwd(&a, st));
    if (s->cfg.dtype == MOE_DTYPE_F32) {
        const int dt = MOE_DTYPE_F32;
        MOE_CUBLAS_CHECK(moe_k_gemm(c->blas, 1, 0, D, E, T, s->x, D, s->dlogits, E, 1.0f,
                                    s->grad[MOE_PARAM_ROUTER_WEIGHT], E, dt, 0));
        MOE_CUBLAS_CHECK(moe_k_gemm(c->blas, 0, 1, T, D, E, s->dlogits, E,
                                    s->param[MOE_PARAM_ROUTER_WEIGHT], E, 1.0f, dx, D, dt, 0));
        if (s->noisy_now) {
            MOE_CUBLAS_CHECK(moe_k_gemm(c->blas, 1, 0, D, E, T, s->x, D, s->dnoise, E, 1.0f,
                                        s->grad[MOE_PARAM_NOISE_WEIGHT], E, dt, 0));
            MOE_CUBLAS_CHECK(moe_k_gemm(c->blas, 0, 1, T, D, E, s->dnoise, E,
                                        s->param[MOE_PARAM_NOISE_WEIGHT], E, 1.0f, dx, D, dt, 0));
        }
        return MOE_STATUS_SUCCESS;
    }
    /* 16-bit storage: the router GEMMs in f32 on the forward's widened x, each result added
     * into its 16-bit destination with one rounding */
    const int dt = (int)s->cfg.dtype, f32 = MOE_DTYPE_F32;
    const void *wg = NULL, *wn = NULL;
    MOE_CHECK(cu_router_f32(s, NULL, &wg, &wn, st));
    MOE_CUBLAS_CHECK(moe_k_gemm(c->blas, 1, 0, D, E, T, L->x32, D, s->dlogits, E, 0.0f, L->dw32,
                                E, f32, 1));
    MOE_CUDA_CHECK(moe_k_add_f32(s->grad[MOE_PARAM_ROUTER_WEIGHT], dt, L->dw32, D * E, st));
    MOE_CUBLAS_CHECK(moe_k_gemm(c->blas, 0, 1, T, D, E, s->dlogits, E, wg, E, 0.0f, L->dx32, D,
                                f32, 1));
    if (s->noisy_now) {
        MOE_CUBLAS_CHECK(moe_k_gemm(c->blas, 1, 0, D, E, T, L->x32, D, s->dnoise, E, 0.0f,
                                    L->dw32, E, f32, 1));
        MOE_CUDA_CHECK(moe_k_add_f32(s->grad[MOE_PARAM_NOISE_WEIGHT], dt, L->dw32, D * E, st));
        MOE_CUBLAS_CHECK(moe_k_gemm(c->blas, 0, 1, T, D, E, s->dnoise, E, wn, E, 1.0f, L->dx32,
                                    D, f32, 1));
    }
    MOE_CUDA_CHECK(moe_k_add_f32(dx, dt, L->dx32, T * D, st));
    return MOE_STATUS_SUCCESS;
}

static moe_status_t cu_optim_update(moe_context_t *ctx, int adam, float *w, const float *g,
                                    float *m, float *v, int64_t n,
                                    const struct moe_optim_scalars *c, void *stream) {
    MOE_CHECK(cu_enter(ctx, stream));
    MOE_CUDA_CHECK(moe_k_optim_update(adam, w, g, m, v, n, c, (cudaStream_t)stream));
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
    .optim_update = cu_optim_update,
};
