/* kernels.h - the CUDA kernels' host launchers, callable from C (csrc/backend/cuda/).
 *
 * Every launcher enqueues on `stream` and returns the first CUDA error it meets (a launch error
 * included); cuBLAS wrappers return a cublasStatus_t. Shapes use the letters of moe.h; N is the
 * number of rows of the expert-major buffers. `dtype` is a moe_dtype_t value: the storage type of
 * the row buffers (x, xp, yp, y, ...); arithmetic is always f32. */
#ifndef MOE_KERNELS_KERNELS_H
#define MOE_KERNELS_KERNELS_H

#include <stddef.h>
#include <stdint.h>

#include <cublas_v2.h>
#include <cuda_runtime_api.h>

#ifdef __cplusplus
extern "C" {
#endif

/* tokens per block of the per-thread gate kernel (the CPU backend's reduction blocks); the
 * warp-cooperative path sums blocks of 16 tokens */
#define MOE_K_GATE_BLOCK 256

/* ---- gate.cu ------------------------------------------------------------------------------ */

/* *count (device) = number of NaN/Inf among n values of x (dtype) */
cudaError_t moe_k_count_nonfinite(const void *x, int dtype, int64_t n,
                                  unsigned long long *count, cudaStream_t stream);

/* the routing extensions' options (router/select.h's moe_router_opts_t; gate_mode and
 * renormalize are the args' own) */
typedef struct moe_k_route_ext {
    int active, sigmoid, num_groups, topk_group, group_max;
    float scale;
    const uint8_t *avail; /* (E) expert availability, or NULL: all */
} moe_k_route_ext_t;

typedef struct moe_k_gate_args {
    int64_t T, E, K, K1;
    int noisy, gate_mode, renormalize;
    uint64_t seed, call;
    uint32_t rank;
    const float *logits;    /* (T, E) */
    const float *score_bias; /* (E) selection bias of loss-free balancing, or NULL */
    const float *noise_raw; /* (T, E) x Wn, when noisy */
    float *eps, *h;         /* (T, E) written when noisy */
    float *lse;             /* (T) */
    int32_t *idx;           /* (T, K1) */
    float *gate;            /* (T, K) */
    float *scr;             /* (T, 3E + K1) per-token scratch: p, sigma, phi, top values */
    double *part;           /* (nblk, 3E + 1) block partials: prob, importance, load, z */
    int64_t *cnt_part;      /* (nblk, E) block partial counts */
    double *red;            /* (3E + 1) totals: prob, importance, load, z */
    int64_t *counts;        /* (E) assignments per expert before dropping */
    /* routing extensions (router/select.h's moe_router_opts_t, field by field): when
     * ext.active the per-thread path runs the extended bodies and scr rows are
     * 3E + K1 + 2G wide (G = ext.num_groups) */
    moe_k_route_ext_t ext;
} moe_k_gate_args_t;

/* Blocks of token partials the gate pass may write for T tokens: size of part / cnt_part. */
int64_t moe_k_gate_num_blocks(int64_t T);

/* Gate pass after the router GEMMs: noise, softplus, top-k, gates, lse and the per-expert sums
 * (block partials of MOE_K_GATE_BLOCK tokens, then a fixed-order sum over blocks). */
cudaError_t moe_k_gate_fwd(const moe_k_gate_args_t *a, cudaStream_t stream);

typedef struct moe_k_gate_bwd_args {
    int64_t T, E, K, K1;
    int noisy, gate_mode, renormalize, any_logit;
    const float *logits, *noise_raw, *eps, *h, *lse, *gate, *dg; /* forward state, dg (T, K) */
    const int32_t *idx;
    const float *coefs; /* (3E) device: switch_f, imp, load */
    float z_scale;
    float *scr;      /* (T, 4E + K) */
    float *dlogits;  /* (T, E) out */
    float *dnoise;   /* (T, E) out, when noisy: gradient of x Wn */
    moe_k_route_ext_t ext; /* routing extensions, as moe_k_gate_args_t */
} moe_k_gate_bwd_args_t;

/* Gate backward per token: gates, switch / z / importance / load terms and the noise network. */
cudaError_t moe_k_gate_bwd(const moe_k_gate_bwd_args_t *a, cudaStream_t stream);

/* ---- permute.cu --------------------------------------------------------------------------- */

typedef struct moe_k_route_args {
    int64_t T, K, K1, E, capacity; /* capacity < 0: dropless */
    int priority;                  /* moe_priority_t */
    const int32_t *idx;            /* (T, K1) */
    const float *gate;             /* (T, K) */
    const int64_t *counts;         /* (E) claims per expert (the gate's counts) */
    const int64_t *offsets;        /* (E + 1) start row of each expert's kept rows */
    int32_t *row;                  /* (T, K) out: row in the expert-major buffer or -1 */
    /* scratch, T*K each: */
    int32_t *keys_in, *keys_out, *vals_in, *vals_out;
    float *fkeys_in, *fkeys_out;
    int64_t *claim_start; /* (E) */
    void *temp;           /* CUB temporary storage */
    size_t temp_bytes;
} moe_k_route_args_t;

/* CUB temporary storage that moe_k_route needs for T*K assignments and E experts */
cudaError_t moe_k_route_temp_bytes(int64_t n, int64_t E, size_t *bytes);

/* Slot assignment reproducing moe_router_assign_slots (router_host.c) exactly. */
cudaError_t moe_k_route(const moe_k_route_args_t *a, cudaStream_t stream);

/* xp[row[t, j]] = x[t] for every kept (t, j) */
cudaError_t moe_k_permute(const void *x, const int32_t *row, int64_t T, int64_t K, int64_t D,
                          int dtype, void *xp, cudaStream_t stream);

/* dx[t] = sum_j dxp[row[t, j]] in j order (0 when all dropped) */
cudaError_t moe_k_unpermute(const void *dxp, const int32_t *row, int64_t T, int64_t K,
                            int64_t D, int dtype, void *dx, cudaStream_t stream);

/* ---- combine.cu --------------------------------------------------------------------------- */

/* y[t] = sum_j kept(t, j) g[t, j] yp[row[t, j]] in j order (gate NULL: g = 1) */
cudaError_t moe_k_combine_fwd(const void *yp, const int32_t *row, const float *gate, int64_t T,
                              int64_t K, int64_t D, int dtype, void *y, cudaStream_t stream);

/* dyp[row] = g dy[t];  dg[t, j] = <dy[t], yp[row]> (0 when dropped) */
cudaError_t moe_k_combine_bwd(const void *dy, const void *yp, const int32_t *row,
                              const float *gate, int64_t T, int64_t K, int64_t D, int dtype,
                              void *dyp, float *dg, cudaStream_t stream);

/* ---- ffn.cu ------------------------------------------------------------------------------- */

/* Row-major C (m, n) = alpha op(A) op(B) + beta C, f32 compute (no TF32); A, B, C in dtype
 * (C may be f32 when c_f32). Mirrors the CPU backend's sgemm(). */
cublasStatus_t moe_k_gemm(cublasHandle_t h, int ta, int tb, int64_t m, int64_t n, int64_t k,
                          const void *A, int64_t lda, const void *B, int64_t ldb, float beta,
                          void *C, int64_t ldc, int dtype, int c_f32);

/* One group of per-expert GEMMs in one cuBLAS call (cublasGemmGroupedBatchedEx):
 * for g < count, C_g (m_g, n_g) = op(A_g) op(B_g) + beta C_g, row-major, one group per expert.
 * ptrs_dev: device scratch of 3 * count pointers (uploaded from a pageable host copy). */
cublasStatus_t moe_k_gemm_grouped(cublasHandle_t h, int ta, int tb, int count,
                                  const int *m, const int *n, const int *k,
                                  const void *const *A, const int *lda, const void *const *B,
                                  const int *ldb, float beta, void *const *C, const int *ldc,
                                  int dtype, int c_f32, void **ptrs_dev, cudaStream_t stream);

/* rows of C (N, n): C[r] = bias[expert of r] (offsets (E_local + 1) device, local rows) or 0.
 * bias in dtype; C in f32 when c_f32, else in dtype. */
cudaError_t moe_k_fill_bias(void *C, int c_f32, int64_t N, int64_t n, const void *bias,
                            const int64_t *offsets, int64_t E_local, int dtype,
                            cudaStream_t stream);

/* A (N, F, dtype) = act(H) with H (N, F2, f32); SWIGLU: A = silu(H[:, :F]) * H[:, F:] */
cudaError_t moe_k_act_fwd(const float *H, void *A, int64_t N, int64_t F, int act, int dtype,
                          cudaStream_t stream);

/* dH (N, F2, dtype) from dA (N, F, f32) and H (f32) */
cudaError_t moe_k_act_bwd(const float *H, const float *dA, void *dH, int64_t N, int64_t F,
                          int act, int dtype, cudaStream_t stream);

/* dst (n, f32) = src (n, dtype) */
cudaError_t moe_k_to_f32(const void *src, int dtype, int64_t n, float *dst, cudaStream_t stream);

/* dst (n, dtype) += src (n, f32), one rounding */
cudaError_t moe_k_add_f32(void *dst, int dtype, const float *src, int64_t n,
                          cudaStream_t stream);

/* dB[le] (n) += column sums of rows [offsets[le], offsets[le+1]) of A (N, n), rows in order */
cudaError_t moe_k_colsum_add(void *dB, const void *A, int64_t n, const int64_t *offsets,
                             int64_t E_local, int dtype, cudaStream_t stream);

/* ---- optimizer ------------------------------------------------------------------------------ */

struct moe_optim_scalars;

/* one optimizer step over n f32 elements (core/optim_update.h): Adam/AdamW when adam, else SGD
 * (m = momentum buffer or NULL) */
cudaError_t moe_k_optim_update(int adam, float *w, const float *g, float *m, float *v, int64_t n,
                               const struct moe_optim_scalars *c, cudaStream_t stream);

#ifdef __cplusplus
}
#endif

#endif
