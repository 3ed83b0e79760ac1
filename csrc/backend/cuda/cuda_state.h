/* cuda_state.h - what the files of the CUDA backend share: the context's and the layer's
 * device state, and the entry step of every op. */
#ifndef MOE_BACKEND_CUDA_CUDA_STATE_H
#define MOE_BACKEND_CUDA_CUDA_STATE_H

#include <cublas_v2.h>
#include <cuda_runtime_api.h>

#include "context.h"
#include "core/check_cuda.h"
#include "kernels/kernels.h"
#include "state.h"

#ifdef __cplusplus
extern "C" {
#endif

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
    /* hierarchical gating (router HIERARCHICAL only, else NULL) */
    double *hier_part;    /* (nblk, MOE_HIER_NSUMS) block partials, token-sized */
    int64_t *hier_cnt;    /* (nblk, E) block partial counts, token-sized */
    double *hier_red;     /* (MOE_HIER_NSUMS) device totals */
    double *hier_red_h;   /* pinned (MOE_HIER_NSUMS) */
    float *hier_coefs_d;  /* (MOE_HIER_NCOEFS) aux-loss coefficients */
} cu_layer_t;

static inline cu_context_t *cu_ctx(moe_context_t *ctx) { return (cu_context_t *)ctx->impl; }

/* every op starts here: the context's device, and cuBLAS on the caller's stream */
static inline moe_status_t cu_enter(moe_context_t *ctx, void *stream) {
    MOE_CUDA_CHECK(cudaSetDevice(ctx->device));
    if (ctx->impl) MOE_CUBLAS_CHECK(cublasSetStream(cu_ctx(ctx)->blas, (cudaStream_t)stream));
    return MOE_STATUS_SUCCESS;
}

/* the router width of the per-token gate scratch: the flat gate's, or hierarchical gating's */
static inline int64_t cu_gate_scr_per(const moe_backend_layer_t *s) {
    const int64_t E = s->E, K = s->K;
    /* the forward's rows hold 2G more floats with group-limited gating (routing extensions) */
    const int64_t G2 = s->cfg.router != MOE_ROUTER_HIERARCHICAL && s->cfg.num_groups > 1
                           ? 2 * s->cfg.num_groups
                           : 0;
    int64_t per = 3 * E + s->K1 + G2 > 4 * E + K ? 3 * E + s->K1 + G2 : 4 * E + K;
    if (s->cfg.router == MOE_ROUTER_HIERARCHICAL) {
        const int64_t G = s->cfg.num_groups, k1 = s->cfg.topk_group;
        int64_t h = moe_k_gate_hier_scratch(E, K, G, k1, K / k1);
        per = h > per ? h : per;
    }
    return per;
}

#ifdef __cplusplus
}
#endif

#endif
