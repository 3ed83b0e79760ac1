/* gate.cu - the fused gate pass and its backward, one thread per token, over the shared MOE_HD
 * routing bodies of router/router.h (the CPU backend runs the same code per token).
 *
 * The router GEMMs (x Wg, x Wn) run before, through cuBLAS. Per-expert sums over tokens are
 * taken per block of MOE_K_GATE_BLOCK tokens in f64 in token order, then summed block by block
 * in a second kernel: fixed order, no float atomics, the same grouping as the CPU backend. */
#include "kernels/common.cuh"
#include "kernels/kernels.h"

#include "core/philox.h"
#include "router/router.h"

/* ---- NaN/Inf count -------------------------------------------------------------------------- */

template <typename S>
__global__ void count_nonfinite_kernel(const S *x, int64_t n, unsigned long long *count) {
    unsigned long long bad = 0;
    for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n;
         i += (int64_t)gridDim.x * blockDim.x)
        bad += !isfinite(moe_ld(x + i));
    for (int o = 16; o > 0; o >>= 1) bad += __shfl_down_sync(0xffffffffu, bad, o);
    if ((threadIdx.x & 31) == 0 && bad) atomicAdd(count, bad); /* integers: order-free */
}

extern "C" cudaError_t moe_k_count_nonfinite(const void *x, int dtype, int64_t n,
                                             unsigned long long *count, cudaStream_t stream) {
    cudaError_t e = cudaMemsetAsync(count, 0, sizeof *count, stream);
    if (e != cudaSuccess) return e;
    unsigned blocks = moe_k_blocks(n, 256);
    if (blocks > 4096) blocks = 4096;
    MOE_K_DISPATCH(dtype, count_nonfinite_kernel<scalar_t>
                   <<<blocks, 256, 0, stream>>>((const scalar_t *)x, n, count));
    return cudaGetLastError();
}

/* ---- forward -------------------------------------------------------------------------------- */

__global__ void __launch_bounds__(MOE_K_GATE_BLOCK) gate_fwd_kernel(moe_k_gate_args_t a) {
    const int E = (int)a.E, K = (int)a.K, K1 = (int)a.K1;
    const int64_t stride = 3 * a.E + a.K1;
    const int64_t t0 = (int64_t)blockIdx.x * MOE_K_GATE_BLOCK;
    const int64_t t = t0 + threadIdx.x;
    __shared__ double zs[MOE_K_GATE_BLOCK];
    zs[threadIdx.x] = 0.0;
    if (t < a.T) {
        const float *lg = a.logits + t * a.E;
        const float *h = lg;
        float *p = a.scr + t * stride, *sigma = p + a.E, *phi = p + 2 * a.E, *val = p + 3 * a.E;
        if (a.noisy) {
            float *hr = a.h + t * a.E, *er = a.eps + t * a.E;
            const float *raw = a.noise_raw + t * a.E;
            for (int e = 0; e < E; ++e) {
                sigma[e] = moe_softplus(raw[e]);
                er[e] = moe_gating_noise(a.seed, a.call, a.rank, t, e);
                hr[e] = lg[e] + er[e] * sigma[e];
            }
            h = hr;
        }
        float lse = moe_router_softmax(lg, E, p);
        a.lse[t] = lse;
        zs[threadIdx.x] = (double)lse * (double)lse;
        int32_t *idx = a.idx + t * a.K1;
        moe_router_topk_biased(h, a.score_bias, E, K1, idx, val);
        moe_router_gates(h, E, idx, K, a.gate_mode, a.renormalize, a.gate + t * a.K);
        if (a.noisy) moe_router_load_fwd(lg, h, sigma, idx, K, E, phi);
    }
    __syncthreads(); /* the block's per-token rows are in global memory: sum them per expert */
    const int64_t t1 = t0 + MOE_K_GATE_BLOCK < a.T ? t0 + MOE_K_GATE_BLOCK : a.T;
    double *pp = a.part + (int64_t)blockIdx.x * (3 * a.E + 1);
    int64_t *pc = a.cnt_part + (int64_t)blockIdx.x * a.E;
    for (int e = threadIdx.x; e < E; e += MOE_K_GATE_BLOCK) {
        double sp = 0.0, si = 0.0, sl = 0.0;
        int64_t c = 0;
        for (int64_t u = t0; u < t1; ++u) {
            const float *row = a.scr + u * stride;
            sp += row[e];
            if (a.noisy) sl += row[2 * a.E + e];
            const int32_t *idx = a.idx + u * a.K1;
            for (int j = 0; j < K; ++j)
                if (idx[j] == e) {
                    si += a.gate[u * a.K + j];
                    ++c;
                }
        }
        pp[e] = sp;
        pp[a.E + e] = si;
        pp[2 * a.E + e] = sl;
        pc[e] = c;
    }
    if (threadIdx.x == 0) {
        double z = 0.0;
        for (int64_t u = 0; u < t1 - t0; ++u) z += zs[u];
        pp[3 * a.E] = z;
    }
}

/* totals over blocks, in block order; one thread per expert (and the z sum) */
__global__ void gate_reduce_kernel(moe_k_gate_args_t a, int64_t nblk) {
    const int64_t stride = 3 * a.E + 1;
    for (int64_t e = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; e <= a.E;
         e += (int64_t)gridDim.x * blockDim.x) {
        if (e == a.E) {
            double z = 0.0;
            for (int64_t b = 0; b < nblk; ++b) z += a.part[b * stride + 3 * a.E];
            a.red[3 * a.E] = z;
            continue;
        }
        double sp = 0.0, si = 0.0, sl = 0.0;
        int64_t c = 0;
        for (int64_t b = 0; b < nblk; ++b) {
            const double *pp = a.part + b * stride;
            sp += pp[e];
            si += pp[a.E + e];
            sl += pp[2 * a.E + e];
            c += a.cnt_part[b * a.E + e];
        }
        a.red[e] = sp;
        a.red[a.E + e] = si;
        a.red[2 * a.E + e] = a.noisy ? sl : (double)c; /* without noise load = count */
        a.counts[e] = c;
    }
}

extern "C" cudaError_t moe_k_gate_fwd(const moe_k_gate_args_t *a, cudaStream_t stream) {
    const int64_t nblk = (a->T + MOE_K_GATE_BLOCK - 1) / MOE_K_GATE_BLOCK;
    gate_fwd_kernel<<<(unsigned)nblk, MOE_K_GATE_BLOCK, 0, stream>>>(*a);
    cudaError_t e = cudaGetLastError();
    if (e != cudaSuccess) return e;
    gate_reduce_kernel<<<moe_k_blocks(a->E + 1, 128), 128, 0, stream>>>(*a, nblk);
    return cudaGetLastError();
}

/* ---- backward ------------------------------------------------------------------------------- */

__global__ void gate_bwd_kernel(moe_k_gate_bwd_args_t a) {
    const int64_t t = blockIdx.x * (int64_t)blockDim.x + threadIdx.x;
    if (t >= a.T) return;
    const int E = (int)a.E, K = (int)a.K;
    const float *switch_f = a.coefs, *imp = a.coefs + a.E, *load = a.coefs + 2 * a.E;
    float *dh = a.scr + t * (4 * a.E + a.K), *p = dh + a.E, *sigma = dh + 2 * a.E;
    float *dsig = dh + 3 * a.E, *dg = dh + 4 * a.E;
    const float *lg = a.logits + t * a.E;
    const float *h = a.noisy ? a.h + t * a.E : lg;
    const int32_t *idx = a.idx + t * a.K1;
    for (int j = 0; j < K; ++j) dg[j] = a.dg[t * a.K + j] + imp[idx[j]];
    moe_router_gates_bwd(h, E, idx, K, a.gate_mode, a.renormalize, a.gate + t * a.K, dg, dh);
    float *dl = a.dlogits + t * a.E;
    for (int e = 0; e < E; ++e) dl[e] = dh[e];
    if (a.any_logit) {
        moe_router_softmax(lg, E, p);
        float fp = 0.0f;
        for (int e = 0; e < E; ++e) fp += switch_f[e] * p[e];
        float zs = a.z_scale * a.lse[t];
        for (int e = 0; e < E; ++e) dl[e] += p[e] * (switch_f[e] - fp) + zs * p[e];
    }
    if (a.noisy) {
        const float *raw = a.noise_raw + t * a.E, *eps = a.eps + t * a.E;
        for (int e = 0; e < E; ++e) {
            sigma[e] = moe_softplus(raw[e]);
            dsig[e] = dh[e] * eps[e];
        }
        moe_router_load_bwd(lg, h, sigma, eps, idx, K, E, load, dl, dsig);
        float *dn = a.dnoise + t * a.E;
        for (int e = 0; e < E; ++e) dn[e] = dsig[e] * moe_sigmoid(raw[e]);
    }
}

extern "C" cudaError_t moe_k_gate_bwd(const moe_k_gate_bwd_args_t *a, cudaStream_t stream) {
    gate_bwd_kernel<<<moe_k_blocks(a->T, 128), 128, 0, stream>>>(*a);
    return cudaGetLastError();
}
