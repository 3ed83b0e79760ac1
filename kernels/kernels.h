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

/* ---- gate_hier.cu: hierarchical gating (router/hier.h) ---------------------------------------
 * G groups of E / G experts, k1 groups and k2 experts per group per token, K = k1 k2. */

typedef struct moe_k_gate_hier_args {
    int64_t T, E, K, K1, G, k1, k2;
    int gate_mode, renormalize;
    const float *logits1; /* (T, G) primary logits */
    const float *logits;  /* (T, E) secondary logits of every group */
    float *lse;           /* (T) out: logsumexp of the primary logits */
    int32_t *grp;         /* (T, k1) out */
    float *g1;            /* (T, k1) out */
    float *g2;            /* (T, K) out */
    int32_t *idx;         /* (T, K1) out; column K is -1 */
    float *gate;          /* (T, K) out */
    float *scr;           /* (T, moe_k_gate_hier_scratch) per-token scratch */
    double *part;         /* (nblk, MOE_HIER_NSUMS(G, E)) block partials */
    int64_t *cnt_part;    /* (nblk, E) block partial counts */
    double *red;          /* (MOE_HIER_NSUMS(G, E)) totals */
    int64_t *counts;      /* (E) assignments per expert */
} moe_k_gate_hier_args_t;

/* blocks of token partials for T tokens (rows of part / cnt_part) */
int64_t moe_k_gate_hier_num_blocks(int64_t T);
/* floats of per-token scratch the forward and the backward need */
int64_t moe_k_gate_hier_scratch(int64_t E, int64_t K, int64_t G, int64_t k1, int64_t k2);

/* Two-level top-k, gates and the sums of both levels after the router GEMMs. */
cudaError_t moe_k_gate_hier_fwd(const moe_k_gate_hier_args_t *a, cudaStream_t stream);

typedef struct moe_k_gate_hier_bwd_args {
    int64_t T, E, K, K1, G, k1, k2;
    int gate_mode, renormalize, any_logit;
    const float *logits1, *logits, *g1, *g2, *dg; /* forward state, dg (T, K) */
    const int32_t *grp, *idx;
    const float *coefs; /* (MOE_HIER_NCOEFS(G, E)) device */
    float z1_scale, z2_scale;
    float *scr;         /* (T, scr_stride) */
    int64_t scr_stride; /* >= moe_k_gate_hier_scratch */
    float *dlogits1;    /* (T, G) out */
    float *dlogits;     /* (T, E) out */
} moe_k_gate_hier_bwd_args_t;

/* Backward per token: both levels' gates, switch, z and importance terms. */
cudaError_t moe_k_gate_hier_bwd(const moe_k_gate_hier_bwd_args_t *a, cudaStream_t stream);

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

/* ---- shared.cu: the shared experts (S of them, every token through each) ------------------- */

/* rows of C (N, n): bias (n, dtype) or 0; C in f32 when c_f32, else in dtype */
cudaError_t moe_k_rows_bias(void *C, int c_f32, int64_t N, int64_t n, const void *bias,
                            int dtype, cudaStream_t stream);

/* dB (n) += column sums of A (N, n), rows in order */
cudaError_t moe_k_rows_colsum_add(void *dB, const void *A, int64_t N, int64_t n, int dtype,
                                  cudaStream_t stream);

/* dst (n) += src (n), both in dtype */
cudaError_t moe_k_rows_add(void *dst, const void *src, int64_t n, int dtype,
                           cudaStream_t stream);

/* gate[t] = sigmoid(x[t] . w_gate) (1 when w_gate is NULL); y[t] += gate[t] sum_s ys[s, t]
 * (s order). x, y (T, D), ys (S, T, D), w_gate (D) in dtype */
cudaError_t moe_k_shared_fwd(const void *x, const void *w_gate, const void *ys, int64_t S,
                             int64_t T, int64_t D, int dtype, float *gate, void *y,
                             cudaStream_t stream);

/* dys[t] = gate[t] dy[t];  dlogit[t] = <dy[t], sum_s ys[s, t]> gate (1 - gate) (0 ungated) */
cudaError_t moe_k_shared_combine_bwd(const void *dy, const void *ys, const float *gate,
                                     int64_t S, int64_t T, int64_t D, int gated, int dtype,
                                     void *dys, float *dlogit, cudaStream_t stream);

/* dw_gate (D) += sum_t dlogit[t] x[t] (token order);  dx[t] += dlogit[t] w_gate */
cudaError_t moe_k_shared_gate_bwd(const void *x, const void *w_gate, const float *dlogit,
                                  int64_t T, int64_t D, int dtype, void *dw_gate, void *dx,
                                  cudaStream_t stream);

/* ---- experts_out.cu: per-expert outputs (unfused combine) ---------------------------------- */

/* ye[t, j] = row >= 0 ? yp[row[t, j]] : 0;  ge[t, j] = row >= 0 ? gate[t, j] : 0 */
cudaError_t moe_k_experts_out_fwd(const void *yp, const int32_t *row, const float *gate,
                                  int64_t T, int64_t K, int64_t D, int dtype, void *ye, float *ge,
                                  cudaStream_t stream);

/* dyp[row[t, j]] = dye[t, j];  dg[t, j] = row >= 0 ? dge[t, j] : 0 */
cudaError_t moe_k_experts_out_bwd(const void *dye, const float *dge, const int32_t *row,
                                  int64_t T, int64_t K, int64_t D, int dtype, void *dyp,
                                  float *dg, cudaStream_t stream);

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
