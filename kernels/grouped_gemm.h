/* grouped_gemm.h - one grouped GEMM over all local experts, with the per-expert problem sizes read
 * from device memory (CUTLASS ptr-array kernels, sm_90a), callable from C.
 *
 * The row operands are expert-major buffers: expert g owns rows [offsets[g], offsets[g + 1]).
 * A small kernel turns those device offsets into CUTLASS's per-group shapes, pointers and strides,
 * so nothing is read back to the host and the call can be captured in a CUDA graph. Experts with
 * no rows are valid groups (no tiles; a weight gradient is left as it is). Arithmetic is f32 on
 * 16-bit operands (bf16 or f16); no split-K, so every output element is written by one tile and
 * the result does not depend on the launch (deterministic). Built only with the CUTLASS headers
 * (MOE_WITH_CUTLASS) for sm_90a. */
#ifndef MOE_KERNELS_GROUPED_GEMM_H
#define MOE_KERNELS_GROUPED_GEMM_H

#include <stddef.h>
#include <stdint.h>

#include <cuda_runtime_api.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef enum moe_k_gg_kind {
    /* C_g (m_g, N) = A_g (m_g, K) W_g (K, N) [+ C_g]: forward H = X W1, Y = A W2 */
    MOE_K_GG_ROWS_W = 0,
    /* C_g (m_g, N) = A_g (m_g, K) W_g^T, W_g stored (N, K) [+ C_g]: dA = dY W2^T, dX = dH W1^T */
    MOE_K_GG_ROWS_WT = 1,
    /* C_g (M, N) += A_g^T B_g, A_g (m_g, M) and B_g (m_g, N) rows: dW1 = X^T dH, dW2 = A^T dY */
    MOE_K_GG_WGRAD = 2
} moe_k_gg_kind_t;

typedef struct moe_k_grouped_gemm_args {
    int kind;               /* moe_k_gg_kind_t */
    int dtype;              /* moe_dtype_t of A and B: MOE_DTYPE_BF16 or MOE_DTYPE_F16 */
    int c_f32;              /* C is f32 (else dtype) */
    int beta_one;           /* 1: C += A B (C holds bias rows or gradients); 0: C = A B */
    int64_t num_groups;     /* local experts */
    const int64_t *offsets; /* device (num_groups + 1): group g's first row, relative to A/B/C */
    int64_t M, N, K;        /* ROWS_*: N, K fixed (M = m_g, M ignored); WGRAD: M, N (K = m_g) */
    const void *A;          /* ROWS_*: rows (., K); WGRAD: rows (., M) */
    const void *B;          /* ROWS_W: weights (G, K, N); ROWS_WT: (G, N, K); WGRAD: rows (., N) */
    void *C;                /* ROWS_*: rows (., N); WGRAD: weights (G, M, N) */
    void *scratch;          /* device, at least moe_k_grouped_gemm_scratch_bytes(num_groups) */
    size_t scratch_bytes;   /* its size */
} moe_k_grouped_gemm_args_t;

/* 1 when this build has the CUTLASS kernels and the current device runs them (sm_90) */
int moe_k_grouped_gemm_available(void);

/* 1 when the shapes meet the kernels' alignment (16-byte rows: every fixed dimension a multiple
 * of 8 elements; a multiple of 4 more for f32 C is implied) */
int moe_k_grouped_gemm_fits(int64_t M, int64_t N, int64_t K, int kind);

/* device scratch one call needs for num_groups groups (per-group arrays + CUTLASS workspace), for
 * the current device; 0 when the kernels are not available */
size_t moe_k_grouped_gemm_scratch_bytes(int64_t num_groups);

/* enqueues the setup kernel and the grouped GEMM on stream; cudaErrorNotSupported when the
 * kernels are not available or the shapes do not fit */
cudaError_t moe_k_grouped_gemm(const moe_k_grouped_gemm_args_t *a, cudaStream_t stream);

/* per-dtype halves (grouped_gemm_bf16.cu, grouped_gemm_f16.cu), called by the functions above */
cudaError_t moe_k_grouped_gemm_bf16(const moe_k_grouped_gemm_args_t *a, cudaStream_t stream);
cudaError_t moe_k_grouped_gemm_f16(const moe_k_grouped_gemm_args_t *a, cudaStream_t stream);
size_t moe_k_grouped_gemm_workspace_bf16(int64_t num_groups, int device);
size_t moe_k_grouped_gemm_workspace_f16(int64_t num_groups, int device);

#ifdef __cplusplus
}
#endif

#endif
