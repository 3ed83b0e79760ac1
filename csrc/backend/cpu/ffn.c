/* ffn.c - the CPU expert FFNs (the twin of kernels/ffn.cu): one OpenBLAS sgemm per expert and
 * direction over its rows of the expert-major buffer, the activation between them, and the
 * bias gradients as column sums in row order. */

#include <cblas.h>
#include <string.h>

#include "backend/backend.h"
#include "backend/cpu/cpu.h"
#include "core/activation.h"
#include "core/status.h"

/* C (m, n) = A (m, k) . B (k, n) + beta C, all row-major; transposes as flagged */
void moe__cpu_sgemm(int ta, int tb, int64_t m, int64_t n, int64_t k, const float *A, int64_t lda,
                  const float *B, int64_t ldb, float beta, float *C, int64_t ldc) {
    if (m == 0 || n == 0) return;
    cblas_sgemm(CblasRowMajor, ta ? CblasTrans : CblasNoTrans, tb ? CblasTrans : CblasNoTrans,
                (blasint)m, (blasint)n, (blasint)k, 1.0f, A, (blasint)lda, B, (blasint)ldb, beta,
                C, (blasint)ldc);
}


/* ---------------------------------------------------------------------------------------------
 * experts: one GEMM per expert and direction over its rows of the expert-major buffer
 * ------------------------------------------------------------------------------------------- */

/* rows [r0, r1) of C (ld n) = broadcast bias row (n) or zero */
static void fill_rows(float *C, int64_t rows, int64_t n, const float *bias) {
#pragma omp parallel for schedule(static) MOE_PAR(rows * n)
    for (int64_t r = 0; r < rows; ++r) {
        if (bias)
            memcpy(C + r * n, bias, (size_t)n * sizeof(float));
        else
            memset(C + r * n, 0, (size_t)n * sizeof(float));
    }
}

/* out (n) += column sums of A (rows, n), each column summed in row order: threads take blocks
 * of columns and walk the rows, so every read is contiguous */
static void add_colsum(float *out, const float *A, int64_t rows, int64_t n) {
    enum { CB = 256 };
#pragma omp parallel for schedule(static) MOE_PAR(rows * n)
    for (int64_t c0 = 0; c0 < n; c0 += CB) {
        const int64_t w = n - c0 < CB ? n - c0 : CB;
        float acc[CB];
        for (int64_t c = 0; c < w; ++c) acc[c] = 0.0f;
        for (int64_t r = 0; r < rows; ++r) {
            const float *row = A + r * n + c0;
            for (int64_t c = 0; c < w; ++c) acc[c] += row[c];
        }
        for (int64_t c = 0; c < w; ++c) out[c0 + c] += acc[c];
    }
}

moe_status_t moe__cpu_ffn_fwd(moe_context_t *ctx, const moe_ffn_fwd_args_t *a, void *stream) {
    (void)ctx, (void)stream;
    const moe_backend_layer_t *l = a->layer;
    const int64_t D = l->D, F = l->F, F2 = l->F2;
    const int act = (int)l->cfg.activation;
    const int64_t *off = a->rows.offsets;
    const float *W1 = (const float *)a->w1, *B1 = (const float *)a->b1;
    const float *W2 = (const float *)a->w2, *B2 = (const float *)a->b2;
    const float *Xs = (const float *)a->x;
    float *Hs = a->hpre, *As = (float *)a->act, *Ys = (float *)a->y;
    for (int64_t le = 0; le < l->E_local; ++le) {
        int64_t e = l->expert_begin + le;
        int64_t r0 = off[e], n = off[e + 1] - r0;
        if (n == 0) continue;
        float *H = Hs + r0 * F2, *A = As + r0 * F, *Y = Ys + r0 * D;
        fill_rows(H, n, F2, B1 ? B1 + le * F2 : NULL);
        moe__cpu_sgemm(0, 0, n, F2, D, Xs + r0 * D, D, W1 + le * D * F2, F2, 1.0f, H, F2);
        if (act == MOE_ACT_SWIGLU) {
#pragma omp parallel for schedule(static) MOE_PAR(n * F)
            for (int64_t r = 0; r < n; ++r)
                for (int64_t f = 0; f < F; ++f)
                    A[r * F + f] = moe_swiglu_fwd(H[r * F2 + f], H[r * F2 + F + f]);
        } else {
#pragma omp parallel for schedule(static) MOE_PAR(n * F)
            for (int64_t i = 0; i < n * F; ++i) A[i] = moe_act_fwd(act, H[i]);
        }
        fill_rows(Y, n, D, B2 ? B2 + le * D : NULL);
        moe__cpu_sgemm(0, 0, n, D, F, A, F, W2 + le * F * D, D, 1.0f, Y, D);
    }
    return MOE_STATUS_SUCCESS;
}

moe_status_t moe__cpu_ffn_bwd(moe_context_t *ctx, const moe_ffn_bwd_args_t *a, void *stream) {
    (void)ctx, (void)stream;
    const moe_backend_layer_t *l = a->layer;
    const int64_t D = l->D, F = l->F, F2 = l->F2;
    const int act = (int)l->cfg.activation;
    const int64_t *off = a->rows.offsets;
    const float *W1 = (const float *)a->w1, *W2 = (const float *)a->w2;
    float *dW1 = (float *)a->dw1, *dB1 = (float *)a->db1;
    float *dW2 = (float *)a->dw2, *dB2 = (float *)a->db2;
    const float *Xs = (const float *)a->x, *Hs = a->hpre, *As = (const float *)a->act;
    const float *dYs = (const float *)a->dy;
    float *dAs = a->dact, *dHs = (float *)a->dhpre, *dXs = (float *)a->dx;
    for (int64_t le = 0; le < l->E_local; ++le) {
        int64_t e = l->expert_begin + le;
        int64_t r0 = off[e], n = off[e + 1] - r0;
        if (n == 0) continue;
        const float *X = Xs + r0 * D, *H = Hs + r0 * F2, *A = As + r0 * F;
        const float *dY = dYs + r0 * D;
        float *dA = dAs + r0 * F, *dH = dHs + r0 * F2, *dX = dXs + r0 * D;
        /* dA = dY W2^T;  dW2 += A^T dY;  db2 += colsum dY */
        moe__cpu_sgemm(0, 1, n, F, D, dY, D, W2 + le * F * D, D, 0.0f, dA, F);
        moe__cpu_sgemm(1, 0, F, D, n, A, F, dY, D, 1.0f, dW2 + le * F * D, D);
        if (dB2) add_colsum(dB2 + le * D, dY, n, D);
        if (act == MOE_ACT_SWIGLU) {
#pragma omp parallel for schedule(static) MOE_PAR(n * F)
            for (int64_t r = 0; r < n; ++r)
                for (int64_t f = 0; f < F; ++f)
                    moe_swiglu_bwd(H[r * F2 + f], H[r * F2 + F + f], dA[r * F + f],
                                   &dH[r * F2 + f], &dH[r * F2 + F + f]);
        } else {
#pragma omp parallel for schedule(static) MOE_PAR(n * F)
            for (int64_t i = 0; i < n * F; ++i) dH[i] = dA[i] * moe_act_grad(act, H[i]);
        }
        /* dW1 += X^T dH;  db1 += colsum dH;  dX = dH W1^T */
        moe__cpu_sgemm(1, 0, D, F2, n, X, D, dH, F2, 1.0f, dW1 + le * D * F2, F2);
        if (dB1) add_colsum(dB1 + le * F2, dH, n, F2);
        moe__cpu_sgemm(0, 1, n, D, F2, dH, F2, W1 + le * D * F2, F2, 0.0f, dX, D);
    }
    return MOE_STATUS_SUCCESS;
}
