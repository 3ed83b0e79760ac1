/* cuda_shared.c - host side of the CUDA shared experts: each of the S shared experts is the
 * expert FFN over all T rows as four cuBLAS GEMMs (f32 compute, moe_k_gemm as the routed
 * experts), the activation kernels of ffn.cu between them, and kernels/shared.cu for the bias
 * rows, the gate and the sum into y. Everything is enqueued on the caller's stream; nothing
 * here waits for the host or reads the routing. */
#include "backend/cuda/cuda_shared.h"

#include "core/check_cuda.h"
#include "core/dtype.h"
#include "core/status.h"
#include "kernels/kernels.h"

/* element i of a tensor in storage of esz bytes per element */
static void *el(const void *p, int64_t i, size_t esz) {
    return p ? (char *)p + (size_t)i * esz : NULL;
}

moe_status_t moe__cu_shared_fwd(cublasHandle_t blas, const moe_shared_fwd_args_t *a,
                                cudaStream_t st) {
    const moe_backend_layer_t *l = a->layer;
    const int64_t T = a->T, D = l->D, S = l->cfg.num_shared_experts;
    const int64_t Fs = moe_shared_d_ff(&l->cfg), Fs2 = moe_shared_d_ff2(&l->cfg);
    const int dt = (int)l->cfg.dtype, act = (int)l->cfg.activation;
    const size_t v = moe_dtype_size(l->cfg.dtype);
    if (T == 0) return MOE_STATUS_SUCCESS;
    for (int64_t s = 0; s < S; ++s) {
        float *hpre = a->hpre + s * T * Fs2;
        void *actv = el(a->act, s * T * Fs, v), *ys = el(a->ys, s * T * D, v);
        const void *b1 = el(a->b1, s * Fs2, v), *b2 = el(a->b2, s * D, v);
        /* H = X W1 (+ b1): bias rows first, the GEMM adds onto them */
        if (b1) MOE_CUDA_CHECK(moe_k_rows_bias(hpre, 1, T, Fs2, b1, dt, st));
        MOE_CUBLAS_CHECK(moe_k_gemm(blas, 0, 0, T, Fs2, D, a->x, D, el(a->w1, s * D * Fs2, v),
                                    Fs2, b1 ? 1.0f : 0.0f, hpre, Fs2, dt, 1));
        MOE_CUDA_CHECK(moe_k_act_fwd(hpre, actv, T, Fs, act, dt, st));
        /* Y = A W2 (+ b2) */
        if (b2) MOE_CUDA_CHECK(moe_k_rows_bias(ys, 0, T, D, b2, dt, st));
        MOE_CUBLAS_CHECK(moe_k_gemm(blas, 0, 0, T, D, Fs, actv, Fs, el(a->w2, s * Fs * D, v), D,
                                    b2 ? 1.0f : 0.0f, ys, D, dt, 0));
    }
    MOE_CUDA_CHECK(moe_k_shared_fwd(a->x, a->w_gate, a->ys, S, T, D, dt, a->gate, a->y, st));
    return MOE_STATUS_SUCCESS;
}

moe_status_t moe__cu_shared_combine_bwd(const moe_shared_combine_bwd_args_t *a,
                                        cudaStream_t st) {
    const moe_backend_layer_t *l = a->layer;
    MOE_CUDA_CHECK(moe_k_shared_combine_bwd(a->dy, a->ys, a->gate, l->cfg.num_shared_experts,
                                            a->T, l->D, a->gated, (int)l->cfg.dtype, a->dys,
                                            a->dlogit, st));
    return MOE_STATUS_SUCCESS;
}

moe_status_t moe__cu_shared_bwd(cublasHandle_t blas, const moe_shared_bwd_args_t *a,
                                cudaStream_t st) {
    const moe_backend_layer_t *l = a->layer;
    const int64_t T = a->T, D = l->D, S = l->cfg.num_shared_experts;
    const int64_t Fs = moe_shared_d_ff(&l->cfg), Fs2 = moe_shared_d_ff2(&l->cfg);
    const int dt = (int)l->cfg.dtype, act = (int)l->cfg.activation;
    const size_t v = moe_dtype_size(l->cfg.dtype);
    if (T == 0) return MOE_STATUS_SUCCESS;
    for (int64_t s = 0; s < S; ++s) {
        const float *hpre = a->hpre + s * T * Fs2;
        const void *actv = el(a->act, s * T * Fs, v);
        const void *w1 = el(a->w1, s * D * Fs2, v), *w2 = el(a->w2, s * Fs * D, v);
        /* dA = dY W2^T;  dW2 += A^T dY;  db2 += colsum dY */
        MOE_CUBLAS_CHECK(moe_k_gemm(blas, 0, 1, T, Fs, D, a->dys, D, w2, D, 0.0f, a->dact, Fs,
                                    dt, 1));
        MOE_CUBLAS_CHECK(moe_k_gemm(blas, 1, 0, Fs, D, T, actv, Fs, a->dys, D, 1.0f,
                                    el(a->dw2, s * Fs * D, v), D, dt, 0));
        if (a->db2)
            MOE_CUDA_CHECK(moe_k_rows_colsum_add(el(a->db2, s * D, v), a->dys, T, D, dt, st));
        MOE_CUDA_CHECK(moe_k_act_bwd(hpre, a->dact, a->dhpre, T, Fs, act, dt, st));
        /* dW1 += X^T dH;  db1 += colsum dH;  dX = dH W1^T, added into dx */
        MOE_CUBLAS_CHECK(moe_k_gemm(blas, 1, 0, D, Fs2, T, a->x, D, a->dhpre, Fs2, 1.0f,
                                    el(a->dw1, s * D * Fs2, v), Fs2, dt, 0));
        if (a->db1)
            MOE_CUDA_CHECK(
                moe_k_rows_colsum_add(el(a->db1, s * Fs2, v), a->dhpre, T, Fs2, dt, st));
        MOE_CUBLAS_CHECK(moe_k_gemm(blas, 0, 1, T, D, Fs2, a->dhpre, Fs2, w1, Fs2, 0.0f, a->dxs,
                                    D, dt, 0));
        MOE_CUDA_CHECK(moe_k_rows_add(a->dx, a->dxs, T * D, dt, st));
    }
    if (a->dw_gate)
        MOE_CUDA_CHECK(moe_k_shared_gate_bwd(a->x, a->w_gate, a->dlogit, T, D, (int)l->cfg.dtype,
                                             a->dw_gate, a->dx, st));
    return MOE_STATUS_SUCCESS;
}
