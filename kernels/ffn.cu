/* ffn.cu - the expert FFNs' pieces around the GEMMs: row-major cuBLAS wrappers (one GEMM, or
 * all experts in one grouped call), bias rows, the activations (core/activation.h, the bodies
 * the CPU backend runs) and their backward, and per-expert bias gradients. */
#include "kernels/common.cuh"
#include "kernels/kernels.h"

#include "core/activation.h"

static cudaDataType_t cuda_type(int dtype) {
    return dtype == MOE_K_BF16 ? CUDA_R_16BF : (dtype == MOE_K_F16 ? CUDA_R_16F : CUDA_R_32F);
}

/* row-major C = op(A) op(B) is column-major C^T = op(B)^T op(A)^T: swap the operands */
extern "C" cublasStatus_t moe_k_gemm(cublasHandle_t h, int ta, int tb, int64_t m, int64_t n,
                                     int64_t k, const void *A, int64_t lda, const void *B,
                                     int64_t ldb, float beta, void *C, int64_t ldc, int dtype,
                                     int c_f32) {
    if (m == 0 || n == 0) return CUBLAS_STATUS_SUCCESS;
    const float alpha = 1.0f;
    cudaDataType_t t = cuda_type(dtype), tc = c_f32 ? CUDA_R_32F : t;
    return cublasGemmEx_64(h, tb ? CUBLAS_OP_T : CUBLAS_OP_N, ta ? CUBLAS_OP_T : CUBLAS_OP_N, n,
                           m, k, &alpha, B, t, ldb, A, t, lda, &beta, C, tc, ldc,
                           CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT);
}

#define MOE_K_MAX_GROUPS 1024

extern "C" cublasStatus_t moe_k_gemm_grouped(cublasHandle_t h, int ta, int tb, int count,
                                             const int *m, const int *n, const int *k,
                                             const void *const *A, const int *lda,
                                             const void *const *B, const int *ldb, float beta,
                                             void *const *C, const int *ldc, int dtype,
                                             int c_f32, void **ptrs_dev, cudaStream_t stream) {
    if (count <= 0) return CUBLAS_STATUS_SUCCESS;
    if (count > MOE_K_MAX_GROUPS) return CUBLAS_STATUS_INVALID_VALUE;
    /* column-major view: group g computes C_g^T (n, m) = op(B_g)^T op(A_g)^T */
    static thread_local cublasOperation_t opa[MOE_K_MAX_GROUPS], opb[MOE_K_MAX_GROUPS];
    static thread_local int gm[MOE_K_MAX_GROUPS], gn[MOE_K_MAX_GROUPS], gs[MOE_K_MAX_GROUPS];
    static thread_local float al[MOE_K_MAX_GROUPS], be[MOE_K_MAX_GROUPS];
    static thread_local const void *hp[3 * MOE_K_MAX_GROUPS];
    for (int g = 0; g < count; ++g) {
        opa[g] = tb ? CUBLAS_OP_T : CUBLAS_OP_N;
        opb[g] = ta ? CUBLAS_OP_T : CUBLAS_OP_N;
        gm[g] = n[g];
        gn[g] = m[g];
        gs[g] = 1;
        al[g] = 1.0f;
        be[g] = beta;
        hp[g] = B[g];
        hp[count + g] = A[g];
        hp[2 * count + g] = C[g];
    }
    /* pageable source: staged before the call returns, so hp may be reused at once */
    if (cudaMemcpyAsync(ptrs_dev, hp, 3 * (size_t)count * sizeof(void *),
                        cudaMemcpyHostToDevice, stream) != cudaSuccess)
        return CUBLAS_STATUS_EXECUTION_FAILED;
    cudaDataType_t t = cuda_type(dtype), tc = c_f32 ? CUDA_R_32F : t;
    return cublasGemmGroupedBatchedEx(h, opa, opb, gm, gn, k, al, (const void *const *)ptrs_dev,
                                      t, ldb, (const void *const *)(ptrs_dev + count), t, lda,
                                      be, (void *const *)(ptrs_dev + 2 * count), tc, ldc, count,
                                      gs, CUBLAS_COMPUTE_32F);
}

/* the local expert owning row r: the last le with offsets[le] <= r */
__device__ __forceinline__ int64_t expert_of(const int64_t *offsets, int64_t E_local, int64_t r) {
    int64_t lo = 0, hi = E_local;
    while (hi - lo > 1) {
        int64_t mid = (lo + hi) / 2;
        if (offsets[mid] <= r) lo = mid;
        else hi = mid;
    }
    return lo;
}

template <typename SC, typename SB>
__global__ void fill_bias_kernel(SC *C, int64_t n, const SB *bias, const int64_t *offsets,
                                 int64_t E_local) {
    const int64_t r = blockIdx.x;
    const SB *b = bias ? bias + expert_of(offsets, E_local, r) * n : nullptr;
    for (int64_t c = threadIdx.x; c < n; c += blockDim.x)
        moe_st(C + r * n + c, b ? moe_ld(b + c) : 0.0f);
}

extern "C" cudaError_t moe_k_fill_bias(void *C, int c_f32, int64_t N, int64_t n,
                                       const void *bias, const int64_t *offsets, int64_t E_local,
                                       int dtype, cudaStream_t stream) {
    if (N == 0) return cudaSuccess;
    MOE_K_DISPATCH(dtype, {
        if (c_f32)
            fill_bias_kernel<float, scalar_t><<<(unsigned)N, 256, 0, stream>>>(
                (float *)C, n, (const scalar_t *)bias, offsets, E_local);
        else
            fill_bias_kernel<scalar_t, scalar_t><<<(unsigned)N, 256, 0, stream>>>(
                (scalar_t *)C, n, (const scalar_t *)bias, offsets, E_local);
    });
    return cudaGetLastError();
}

template <typename S>
__global__ void act_fwd_kernel(const float *H, S *A, int64_t N, int64_t F, int act) {
    const int64_t n = N * F;
    for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n;
         i += (int64_t)gridDim.x * blockDim.x) {
        if (act == MOE_ACT_SWIGLU) {
            int64_t r = i / F, f = i % F;
            moe_st(A + i, moe_swiglu_fwd(H[r * 2 * F + f], H[r * 2 * F + F + f]));
        } else {
            moe_st(A + i, moe_act_fwd(act, H[i]));
        }
    }
}

static unsigned grid_for(int64_t n) {
    unsigned b = moe_k_blocks(n, 256);
    return b > 65536u ? 65536u : b;
}

extern "C" cudaError_t moe_k_act_fwd(const float *H, void *A, int64_t N, int64_t F, int act,
                                     int dtype, cudaStream_t stream) {
    if (N == 0) return cudaSuccess;
    MOE_K_DISPATCH(dtype, act_fwd_kernel<scalar_t><<<grid_for(N * F), 256, 0, stream>>>(
                              H, (scalar_t *)A, N, F, act));
    return cudaGetLastError();
}

template <typename S>
__global__ void act_bwd_kernel(const float *H, const float *dA, S *dH, int64_t N, int64_t F,
                               int act) {
    const int64_t n = N * F;
    for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n;
         i += (int64_t)gridDim.x * blockDim.x) {
        if (act == MOE_ACT_SWIGLU) {
            int64_t r = i / F, f = i % F;
            float dg, du;
            moe_swiglu_bwd(H[r * 2 * F + f], H[r * 2 * F + F + f], dA[i], &dg, &du);
            moe_st(dH + r * 2 * F + f, dg);
            moe_st(dH + r * 2 * F + F + f, du);
        } else {
            moe_st(dH + i, dA[i] * moe_act_grad(act, H[i]));
        }
    }
}

extern "C" cudaError_t moe_k_act_bwd(const float *H, const float *dA, void *dH, int64_t N,
                                     int64_t F, int act, int dtype, cudaStream_t stream) {
    if (N == 0) return cudaSuccess;
    MOE_K_DISPATCH(dtype, act_bwd_kernel<scalar_t><<<grid_for(N * F), 256, 0, stream>>>(
                              H, dA, (scalar_t *)dH, N, F, act));
    return cudaGetLastError();
}

template <typename S> __global__ void to_f32_kernel(const S *src, int64_t n, float *dst) {
    for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n;
         i += (int64_t)gridDim.x * blockDim.x)
        dst[i] = moe_ld(src + i);
}

extern "C" cudaError_t moe_k_to_f32(const void *src, int dtype, int64_t n, float *dst,
                                    cudaStream_t stream) {
    if (n == 0) return cudaSuccess;
    MOE_K_DISPATCH(dtype, to_f32_kernel<scalar_t><<<grid_for(n), 256, 0, stream>>>(
                              (const scalar_t *)src, n, dst));
    return cudaGetLastError();
}

template <typename S> __global__ void add_f32_kernel(S *dst, const float *src, int64_t n) {
    for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n;
         i += (int64_t)gridDim.x * blockDim.x)
        moe_st(dst + i, moe_ld(dst + i) + src[i]);
}

extern "C" cudaError_t moe_k_add_f32(void *dst, int dtype, const float *src, int64_t n,
                                     cudaStream_t stream) {
    if (n == 0) return cudaSuccess;
    MOE_K_DISPATCH(dtype, add_f32_kernel<scalar_t><<<grid_for(n), 256, 0, stream>>>(
                              (scalar_t *)dst, src, n));
    return cudaGetLastError();
}

/* one thread per (expert, column), rows in order: the CPU backend's add_colsum */
template <typename S>
__global__ void colsum_add_kernel(S *dB, const S *A, int64_t n, const int64_t *offsets) {
    const int64_t le = blockIdx.x;
    const int64_t c = blockIdx.y * (int64_t)blockDim.x + threadIdx.x;
    if (c >= n) return;
    float acc = 0.0f;
    for (int64_t r = offsets[le]; r < offsets[le + 1]; ++r) acc += moe_ld(A + r * n + c);
    moe_st(dB + le * n + c, moe_ld(dB + le * n + c) + acc);
}

extern "C" cudaError_t moe_k_colsum_add(void *dB, const void *A, int64_t n,
                                        const int64_t *offsets, int64_t E_local, int dtype,
                                        cudaStream_t stream) {
    if (E_local == 0 || n == 0) return cudaSuccess;
    dim3 grid((unsigned)E_local, moe_k_blocks(n, 256));
    MOE_K_DISPATCH(dtype, colsum_add_kernel<scalar_t><<<grid, 256, 0, stream>>>(
                              (scalar_t *)dB, (const scalar_t *)A, n, offsets));
    return cudaGetLastError();
}
