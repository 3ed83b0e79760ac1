/* combine.cu - y[t] = sum_j kept g[t, j] yp[row[t, j]] (j order, no atomics) and its backward:
 * dyp[row] = g dy[t] and dg[t, j] = <dy[t], yp[row]>. One block per token; rows move in 16-byte
 * vectors when D allows. With gate == NULL the same kernel is the un-permute of dx (a plain
 * sum: 1.0f * v is exact, so the result is the sum's). */
#include "kernels/common.cuh"
#include "kernels/kernels.h"

/* V consecutive storage values <-> floats; V = 1 is the scalar path */
template <typename S, int V> struct vio {
    static __device__ __forceinline__ void load(const S *p, float *f) {
        if (V == 1) {
            f[0] = moe_ld(p);
            return;
        }
        uint4 u = *(const uint4 *)p;
        const S *s = (const S *)&u;
#pragma unroll
        for (int i = 0; i < V; ++i) f[i] = moe_ld(s + i);
    }
    static __device__ __forceinline__ void store(S *p, const float *f) {
        if (V == 1) {
            moe_st(p, f[0]);
            return;
        }
        uint4 u;
        S *s = (S *)&u;
#pragma unroll
        for (int i = 0; i < V; ++i) moe_st(s + i, f[i]);
        *(uint4 *)p = u;
    }
};

template <typename S, int V>
__global__ void combine_fwd_kernel(const S *yp, const int32_t *row, const float *gate, int64_t K,
                                   int64_t D, S *y) {
    const int64_t t = blockIdx.x;
    for (int64_t i = threadIdx.x; i < D / V; i += blockDim.x) {
        float acc[V];
#pragma unroll
        for (int v = 0; v < V; ++v) acc[v] = 0.0f;
        for (int64_t j = 0; j < K; ++j) { /* j order: deterministic */
            int32_t r = row[t * K + j];
            if (r < 0) continue;
            float g = gate ? gate[t * K + j] : 1.0f, val[V]; /* no gates: a plain sum */
            vio<S, V>::load(yp + (int64_t)r * D + i * V, val);
#pragma unroll
            for (int v = 0; v < V; ++v) acc[v] += g * val[v];
        }
        vio<S, V>::store(y + t * D + i * V, acc);
    }
}

static int can_vec(int64_t D, int V, const void *a, const void *b) {
    return D % V == 0 && (uintptr_t)a % 16 == 0 && (uintptr_t)b % 16 == 0;
}

extern "C" cudaError_t moe_k_combine_fwd(const void *yp, const int32_t *row, const float *gate,
                                         int64_t T, int64_t K, int64_t D, int dtype, void *y,
                                         cudaStream_t stream) {
    MOE_K_DISPATCH(dtype, {
        constexpr int V = moe_vec<scalar_t>::n;
        if (can_vec(D, V, yp, y))
            combine_fwd_kernel<scalar_t, V><<<(unsigned)T, 256, 0, stream>>>(
                (const scalar_t *)yp, row, gate, K, D, (scalar_t *)y);
        else
            combine_fwd_kernel<scalar_t, 1><<<(unsigned)T, 256, 0, stream>>>(
                (const scalar_t *)yp, row, gate, K, D, (scalar_t *)y);
    });
    return cudaGetLastError();
}

/* deterministic block sum of 256 threads: a fixed shuffle tree, then warps in order */
__device__ __forceinline__ float block_sum_256(float v, float *sh) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_down_sync(0xffffffffu, v, o);
    if ((threadIdx.x & 31) == 0) sh[threadIdx.x >> 5] = v;
    __syncthreads();
    float s = 0.0f;
    if (threadIdx.x == 0)
        for (int w = 0; w < 8; ++w) s += sh[w];
    __syncthreads();
    return s;
}

template <typename S, int V>
__global__ void __launch_bounds__(256)
    combine_bwd_kernel(const S *dy, const S *yp, const int32_t *row, const float *gate, int64_t K,
                       int64_t D, S *dyp, float *dg) {
    __shared__ float sh[8];
    const int64_t t = blockIdx.x;
    for (int64_t j = 0; j < K; ++j) {
        int32_t r = row[t * K + j];
        if (r < 0) { /* uniform over the block */
            if (threadIdx.x == 0) dg[t * K + j] = 0.0f;
            continue;
        }
        float g = gate[t * K + j], dot = 0.0f;
        for (int64_t i = threadIdx.x; i < D / V; i += blockDim.x) {
            float a[V], b[V], o[V];
            vio<S, V>::load(dy + t * D + i * V, a);
            vio<S, V>::load(yp + (int64_t)r * D + i * V, b);
#pragma unroll
            for (int v = 0; v < V; ++v) {
                dot += a[v] * b[v];
                o[v] = g * a[v];
            }
            vio<S, V>::store(dyp + (int64_t)r * D + i * V, o);
        }
        float s = block_sum_256(dot, sh);
        if (threadIdx.x == 0) dg[t * K + j] = s;
    }
}

extern "C" cudaError_t moe_k_combine_bwd(const void *dy, const void *yp, const int32_t *row,
                                         const float *gate, int64_t T, int64_t K, int64_t D,
                                         int dtype, void *dyp, float *dg, cudaStream_t stream) {
    MOE_K_DISPATCH(dtype, {
        constexpr int V = moe_vec<scalar_t>::n;
        if (can_vec(D, V, dy, yp))
            combine_bwd_kernel<scalar_t, V><<<(unsigned)T, 256, 0, stream>>>(
                (const scalar_t *)dy, (const scalar_t *)yp, row, gate, K, D, (scalar_t *)dyp, dg);
        else
            combine_bwd_kernel<scalar_t, 1><<<(unsigned)T, 256, 0, stream>>>(
                (const scalar_t *)dy, (const scalar_t *)yp, row, gate, K, D, (scalar_t *)dyp, dg);
    });
    return cudaGetLastError();
}
