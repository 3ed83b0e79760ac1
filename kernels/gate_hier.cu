/* gate_hier.cu - hierarchical gating on the GPU (the twin of csrc/backend/cpu/gate_hier.c): one
 * thread per token over the shared MOE_HD bodies of router/hier.h, the per-group and per-expert
 * sums of both levels per block of MOE_K_GATE_BLOCK tokens in f64 in token order, then summed
 * block by block in a second kernel (fixed order, no float atomics, the CPU's grouping), and the
 * per-token backward. The router GEMMs run before (forward) and after (backward) through cuBLAS
 * in csrc/backend/cuda/cuda_backend.c. */
#include "kernels/common.cuh"
#include "kernels/kernels.h"

#include "router/hier.h"

/* per-token scratch row of the forward: p1 (G), p2 (E), lse2 (k1), top-k values (max(k1, k2)) */
static __host__ __device__ int64_t fwd_stride(const moe_k_gate_hier_args_t &a) {
    return a.G + a.E + a.k1 + (a.k1 > a.k2 ? a.k1 : a.k2);
}

__global__ void __launch_bounds__(MOE_K_GATE_BLOCK) gate_hier_fwd_kernel(moe_k_gate_hier_args_t a) {
    const int G = (int)a.G, E = (int)a.E, K = (int)a.K, k1 = (int)a.k1, k2 = (int)a.k2;
    const int Eg = E / G;
    const int64_t stride = fwd_stride(a), ns = MOE_HIER_NSUMS(a.G, a.E);
    const int64_t t0 = (int64_t)blockIdx.x * MOE_K_GATE_BLOCK;
    const int64_t t = t0 + threadIdx.x;
    if (t < a.T) {
        float *p1 = a.scr + t * stride, *p2 = p1 + G, *lse2 = p2 + E, *val = lse2 + k1;
        const float *l1 = a.logits1 + t * a.G, *l2 = a.logits + t * a.E;
        int32_t *grp = a.grp + t * a.k1, *idx = a.idx + t * a.K1;
        moe_hier_fwd(l1, l2, G, Eg, k1, k2, a.gate_mode, a.renormalize, grp, a.g1 + t * a.k1,
                     idx, a.g2 + t * a.K, a.gate + t * a.K, val);
        if (a.K1 > a.K) idx[K] = -1;
        for (int e = 0; e < E; ++e) p2[e] = 0.0f; /* the groups not chosen add nothing */
        float lse1;
        moe_hier_terms(l1, l2, G, Eg, k1, grp, p1, &lse1, p2, lse2);
        a.lse[t] = lse1;
    }
    __syncthreads(); /* the block's rows are in global memory: sum them per column */
    const int64_t t1 = t0 + MOE_K_GATE_BLOCK < a.T ? t0 + MOE_K_GATE_BLOCK : a.T;
    double *pp = a.part + (int64_t)blockIdx.x * ns;
    int64_t *pc = a.cnt_part + (int64_t)blockIdx.x * a.E;
    for (int g = threadIdx.x; g < G; g += MOE_K_GATE_BLOCK) {
        double sp = 0.0, si = 0.0, sn = 0.0;
        for (int64_t u = t0; u < t1; ++u) {
            sp += a.scr[u * stride + g];
            for (int j1 = 0; j1 < k1; ++j1)
                if (a.grp[u * a.k1 + j1] == g) si += a.g1[u * a.k1 + j1], sn += 1.0;
        }
        pp[MOE_HIER_PROB1(a.G, a.E) + g] = sp;
        pp[MOE_HIER_IMP1(a.G, a.E) + g] = si;
        pp[MOE_HIER_N1(a.G, a.E) + g] = sn;
    }
    for (int e = threadIdx.x; e < E; e += MOE_K_GATE_BLOCK) {
        double sp = 0.0, si = 0.0;
        int64_t c = 0;
        for (int64_t u = t0; u < t1; ++u) {
            sp += a.scr[u * stride + G + e];
            for (int j = 0; j < K; ++j)
                if (a.idx[u * a.K1 + j] == e) si += a.g2[u * a.K + j], ++c;
        }
        pp[MOE_HIER_PROB2(a.G, a.E) + e] = sp;
        pp[MOE_HIER_IMP2(a.G, a.E) + e] = si;
        pc[e] = c;
    }
    if (threadIdx.x == 0) {
        double z1 = 0.0, z2 = 0.0;
        for (int64_t u = t0; u < t1; ++u) {
            z1 += (double)a.lse[u] * (double)a.lse[u];
            const float *lse2 = a.scr + u * stride + G + E;
            for (int j1 = 0; j1 < k1; ++j1) z2 += (double)lse2[j1] * (double)lse2[j1];
        }
        pp[MOE_HIER_Z1(a.G, a.E)] = z1;
        pp[MOE_HIER_Z2(a.G, a.E)] = z2;
    }
}

/* totals over blocks: one thread per sum (then per count), each summing the blocks in order */
__global__ void gate_hier_reduce_kernel(moe_k_gate_hier_args_t a, int64_t nblk) {
    const int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x;
    const int64_t ns = MOE_HIER_NSUMS(a.G, a.E);
    if (i < ns) {
        double s = 0.0;
        for (int64_t b = 0; b < nblk; ++b) s += a.part[b * ns + i];
        a.red[i] = s;
    } else if (i < ns + a.E) {
        const int64_t e = i - ns;
        int64_t c = 0;
        for (int64_t b = 0; b < nblk; ++b) c += a.cnt_part[b * a.E + e];
        a.counts[e] = c;
    }
}

extern "C" int64_t moe_k_gate_hier_num_blocks(int64_t T) {
    return (T + MOE_K_GATE_BLOCK - 1) / MOE_K_GATE_BLOCK;
}

extern "C" int64_t moe_k_gate_hier_scratch(int64_t E, int64_t K, int64_t G, int64_t k1,
                                           int64_t k2) {
    const int64_t fwd = G + E + k1 + (k1 > k2 ? k1 : k2);
    const int64_t bwd = k1 + K + (G > E / G ? G : E / G);
    return fwd > bwd ? fwd : bwd;
}

extern "C" cudaError_t moe_k_gate_hier_fwd(const moe_k_gate_hier_args_t *a, cudaStream_t stream) {
    const int64_t nblk = moe_k_gate_hier_num_blocks(a->T);
    gate_hier_fwd_kernel<<<(unsigned)nblk, MOE_K_GATE_BLOCK, 0, stream>>>(*a);
    cudaError_t e = cudaGetLastError();
    if (e != cudaSuccess) return e;
    const int64_t n = MOE_HIER_NSUMS(a->G, a->E) + a->E;
    gate_hier_reduce_kernel<<<moe_k_blocks(n, 128), 128, 0, stream>>>(*a, nblk);
    return cudaGetLastError();
}

__global__ void gate_hier_bwd_kernel(moe_k_gate_hier_bwd_args_t a) {
    const int64_t t = blockIdx.x * (int64_t)blockDim.x + threadIdx.x;
    if (t >= a.T) return;
    const int G = (int)a.G, E = (int)a.E, k1 = (int)a.k1, k2 = (int)a.k2;
    moe_hier_bwd(a.logits1 + t * a.G, a.logits + t * a.E, G, E / G, k1, k2, a.gate_mode,
                 a.renormalize, a.grp + t * a.k1, a.g1 + t * a.k1, a.idx + t * a.K1,
                 a.g2 + t * a.K, a.dg + t * a.K, a.coefs, E, a.z1_scale, a.z2_scale, a.any_logit,
                 a.dlogits1 + t * a.G, a.dlogits + t * a.E, a.scr + t * a.scr_stride);
}

extern "C" cudaError_t moe_k_gate_hier_bwd(const moe_k_gate_hier_bwd_args_t *a,
                                           cudaStream_t stream) {
    gate_hier_bwd_kernel<<<moe_k_blocks(a->T, 128), 128, 0, stream>>>(*a);
    return cudaGetLastError();
}
