/* gate.cu - the fused gate pass and its backward, one thread per token, over the shared MOE_HD
 * routing bodies of router/router.h (the CPU backend runs the same code per token).
 *
 * The router GEMMs (x Wg, x Wn) run before, through cuBLAS. Per-expert sums over tokens are
 * taken per block of MOE_K_GATE_BLOCK tokens in f64 in token order, then summed block by block
 * in a second kernel: fixed order, no float atomics, the same grouping as the CPU backend. */
#include <stdlib.h>
#include <string.h>

#include "kernels/common.cuh"
#include "kernels/kernels.h"

#include "core/philox.h"
#include "router/router.h"
#include "router/select.h"

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

/* the per-token options of the routing extensions from a launcher's fields */
__device__ __forceinline__ moe_router_opts_t route_opts(const moe_k_route_ext_t &x, int gate_mode,
                                                        int renormalize) {
    moe_router_opts_t o;
    o.active = x.active, o.sigmoid = x.sigmoid, o.gate_mode = gate_mode;
    o.renormalize = renormalize, o.num_groups = x.num_groups, o.topk_group = x.topk_group;
    o.group_max = x.group_max, o.scale = x.scale, o.avail = x.avail;
    return o;
}

__global__ void __launch_bounds__(MOE_K_GATE_BLOCK) gate_fwd_kernel(moe_k_gate_args_t a) {
    const int E = (int)a.E, K = (int)a.K, K1 = (int)a.K1;
    const moe_router_opts_t opts = route_opts(a.ext, a.gate_mode, a.renormalize);
    const int G = opts.active ? opts.num_groups : 0;
    const int64_t stride = 3 * a.E + a.K1 + 2 * G;
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
        int32_t *idx = a.idx + t * a.K1;
        float lse;
        if (opts.active) {
            /* routing extensions, the CPU backend's bodies (never noisy: refused by the layer) */
            float *gsc = val + K1, *keep = gsc + G;
            lse = moe_router_aux_probs(lg, E, &opts, p);
            if (G > 1) moe_router_groups(h, a.score_bias, &opts, E, K, gsc, keep);
            moe_router_topk_opts(h, a.score_bias, &opts, G > 1 ? keep : (const float *)0, E, K1,
                                 idx, val);
            moe_router_gates_opts(h, E, idx, K, &opts, a.gate + t * a.K);
        } else {
            lse = moe_router_softmax(lg, E, p);
            moe_router_topk_biased(h, a.score_bias, E, K1, idx, val);
            moe_router_gates(h, E, idx, K, a.gate_mode, a.renormalize, a.gate + t * a.K);
        }
        a.lse[t] = lse;
        zs[threadIdx.x] = (double)lse * (double)lse;
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

/* ---- forward, warp-cooperative fast path ---------------------------------------------------------
 *
 * One warp per token (E <= 256, K + 1 <= 16): lane l holds experts l, l + 32, ... in registers.
 * The per-element math is the shared bodies' (moe_softplus, moe_gating_noise, moe_normal_cdf, the
 * gate formula of moe_router_gates); what is warp-cooperative is the row max / sum and the top-k,
 * a warp argmax per rank ordered (value desc, expert asc) exactly as moe_router_topk, so the
 * selected experts equal the per-thread path's on equal scores. Per-expert sums are kept per lane
 * in f64 over the warp's tokens in order, then summed over the block's warps in order. */

#define MOE_K_GATE_WARPS 4   /* warps per block */
#define MOE_K_GATE_WTOK 4    /* tokens per warp: a block sums 16 tokens */
#define MOE_K_GATE_MAXK1 16  /* K + 1 bound of the fast path */

__device__ __forceinline__ void warp_argmax(float &v, int &e) {
    for (int o = 16; o > 0; o >>= 1) {
        float v2 = __shfl_xor_sync(0xffffffffu, v, o);
        int e2 = __shfl_xor_sync(0xffffffffu, e, o);
        if (v2 > v || (v2 == v && e2 < e)) v = v2, e = e2;
    }
}

__device__ __forceinline__ float warp_max(float v) {
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

__device__ __forceinline__ float warp_sum(float v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

template <int EPL>
__global__ void __launch_bounds__(32 * MOE_K_GATE_WARPS) gate_fwd_warp_kernel(moe_k_gate_args_t a) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int E = (int)a.E, K = (int)a.K, K1 = (int)a.K1;
    double accp[EPL], acci[EPL], accl[EPL], accz = 0.0;
    int cnt[EPL];
#pragma unroll
    for (int q = 0; q < EPL; ++q) accp[q] = acci[q] = accl[q] = 0.0, cnt[q] = 0;
    const int64_t tb = (int64_t)blockIdx.x * (MOE_K_GATE_WARPS * MOE_K_GATE_WTOK);
    for (int i = 0; i < MOE_K_GATE_WTOK; ++i) {
        const int64_t t = tb + warp * MOE_K_GATE_WTOK + i;
        if (t >= a.T) break; /* uniform over the warp */
        float lg[EPL], h[EPL], sg[EPL];
        bool taken[EPL];
#pragma unroll
        for (int q = 0; q < EPL; ++q) {
            const int e = lane + 32 * q;
            taken[q] = false;
            lg[q] = e < E ? a.logits[t * a.E + e] : -INFINITY;
            h[q] = lg[q];
            sg[q] = 1.0f;
            if (a.noisy && e < E) {
                sg[q] = moe_softplus(a.noise_raw[t * a.E + e]);
                float ep = moe_gating_noise(a.seed, a.call, a.rank, t, e);
                h[q] = lg[q] + ep * sg[q];
                a.eps[t * a.E + e] = ep;
                a.h[t * a.E + e] = h[q];
            }
        }
        /* softmax of the clean logits: prob sums and lse */
        float m = -INFINITY;
#pragma unroll
        for (int q = 0; q < EPL; ++q) m = fmaxf(m, lg[q]);
        m = warp_max(m);
        float z = 0.0f, ex[EPL];
#pragma unroll
        for (int q = 0; q < EPL; ++q) {
            ex[q] = lane + 32 * q < E ? expf(lg[q] - m) : 0.0f;
            z += ex[q];
        }
        z = warp_sum(z);
        const float inv = 1.0f / z, lse = m + logf(z);
#pragma unroll
        for (int q = 0; q < EPL; ++q) accp[q] += (double)(ex[q] * inv);
        if (lane == 0) {
            a.lse[t] = lse;
            accz += (double)lse * (double)lse;
        }
        /* top K1 of h: rank j's winner is the best not yet taken */
        float selv[MOE_K_GATE_MAXK1], thr_sel = 0.0f, thr_out = 0.0f; /* h at ranks K, K-1 */
        int sele[MOE_K_GATE_MAXK1];
#pragma unroll
        for (int j = 0; j < MOE_K_GATE_MAXK1; ++j) {
            if (j >= K1) break;
            float v = -INFINITY;
            int e = 0x7fffffff;
#pragma unroll
            for (int q = 0; q < EPL; ++q) {
                int eq = lane + 32 * q;
                if (eq < E && !taken[q] && (h[q] > v || (h[q] == v && eq < e))) v = h[q], e = eq;
            }
            warp_argmax(v, e);
            selv[j] = v, sele[j] = e;
            if (j == K) thr_sel = v;
            if (j == K - 1) thr_out = v;
#pragma unroll
            for (int q = 0; q < EPL; ++q)
                if (lane + 32 * q == e) taken[q] = true;
            if (lane == 0) a.idx[t * a.K1 + j] = e;
        }
        /* gates: the formula of moe_router_gates, with m = the best score */
        const float mh = selv[0];
        float sel = 0.0f, myw = 0.0f;
#pragma unroll
        for (int j = 0; j < MOE_K_GATE_MAXK1; ++j) {
            if (j >= K) break;
            float w = expf(selv[j] - mh);
            sel += w;
            if (lane == j) myw = w;
        }
        float zg = sel;
        if (a.gate_mode == MOE_ROUTER_TOPK_OF_SOFTMAX && !a.renormalize) {
            float zl = 0.0f;
#pragma unroll
            for (int q = 0; q < EPL; ++q)
                if (lane + 32 * q < E) zl += expf(h[q] - mh);
            zg = warp_sum(zl);
        }
        const float ginv = 1.0f / zg;
        const float myg = myw * ginv;
        if (lane < K) a.gate[t * a.K + lane] = myg;
        /* importance and counts: the owner lane of each selected expert */
#pragma unroll
        for (int j = 0; j < MOE_K_GATE_MAXK1; ++j) {
            if (j >= K) break;
            float g = __shfl_sync(0xffffffffu, myg, j);
#pragma unroll
            for (int q = 0; q < EPL; ++q)
                if (lane + 32 * q == sele[j]) acci[q] += (double)g, ++cnt[q];
        }
        /* Shazeer's load: the threshold is the K-th best leaving e out */
        if (a.noisy) {
#pragma unroll
            for (int q = 0; q < EPL; ++q) {
                const int e = lane + 32 * q;
                if (e >= E) continue;
                bool selected = false;
#pragma unroll
                for (int j = 0; j < MOE_K_GATE_MAXK1; ++j)
                    if (j < K && sele[j] == e) selected = true;
                const bool none = selected && K >= E; /* K = E: no threshold, P = 1 */
                const float thr = selected ? thr_sel : thr_out;
                accl[q] += none ? 1.0 : (double)moe_normal_cdf((lg[q] - thr) / sg[q]);
            }
        }
    }
    /* the block's sums: warps in order, in f64 */
    __shared__ double sh[MOE_K_GATE_WARPS][3][32 * EPL];
    __shared__ int shc[MOE_K_GATE_WARPS][32 * EPL];
    __shared__ double shz[MOE_K_GATE_WARPS];
#pragma unroll
    for (int q = 0; q < EPL; ++q) {
        sh[warp][0][lane + 32 * q] = accp[q];
        sh[warp][1][lane + 32 * q] = acci[q];
        sh[warp][2][lane + 32 * q] = accl[q];
        shc[warp][lane + 32 * q] = cnt[q];
    }
    if (lane == 0) shz[warp] = accz;
    __syncthreads();
    double *pp = a.part + (int64_t)blockIdx.x * (3 * a.E + 1);
    int64_t *pc = a.cnt_part + (int64_t)blockIdx.x * a.E;
    for (int e = threadIdx.x; e < E; e += blockDim.x) {
        double sp = 0.0, si = 0.0, sl = 0.0;
        int64_t c = 0;
        for (int w = 0; w < MOE_K_GATE_WARPS; ++w) {
            sp += sh[w][0][e], si += sh[w][1][e], sl += sh[w][2][e];
            c += shc[w][e];
        }
        pp[e] = sp, pp[a.E + e] = si, pp[2 * a.E + e] = sl, pc[e] = c;
    }
    if (threadIdx.x == 0) {
        double zz = 0.0;
        for (int w = 0; w < MOE_K_GATE_WARPS; ++w) zz += shz[w];
        pp[3 * a.E] = zz;
    }
}

/* totals over blocks: one block per expert (the last one sums z); each thread sums a fixed
 * stride of blocks in order, then a fixed tree: deterministic */
__global__ void __launch_bounds__(128) gate_reduce_kernel(moe_k_gate_args_t a, int64_t nblk) {
    const int64_t e = blockIdx.x, stride = 3 * a.E + 1;
    __shared__ double s[4][128];
    __shared__ long long sc[128];
    double sp = 0.0, si = 0.0, sl = 0.0, sz = 0.0;
    long long c = 0;
    for (int64_t b = threadIdx.x; b < nblk; b += blockDim.x) {
        const double *pp = a.part + b * stride;
        if (e == a.E) {
            sz += pp[3 * a.E];
            continue;
        }
        sp += pp[e], si += pp[a.E + e], sl += pp[2 * a.E + e];
        c += a.cnt_part[b * a.E + e];
    }
    s[0][threadIdx.x] = sp, s[1][threadIdx.x] = si, s[2][threadIdx.x] = sl, s[3][threadIdx.x] = sz;
    sc[threadIdx.x] = c;
    __syncthreads();
    for (int h = 64; h > 0; h >>= 1) {
        if ((int)threadIdx.x < h) {
            for (int k = 0; k < 4; ++k) s[k][threadIdx.x] += s[k][threadIdx.x + h];
            sc[threadIdx.x] += sc[threadIdx.x + h];
        }
        __syncthreads();
    }
    if (threadIdx.x != 0) return;
    if (e == a.E) {
        a.red[3 * a.E] = s[3][0];
        return;
    }
    a.red[e] = s[0][0];
    a.red[a.E + e] = s[1][0];
    a.red[2 * a.E + e] = a.noisy ? s[2][0] : (double)sc[0]; /* without noise load = count */
    a.counts[e] = sc[0];
}

static int gate_use_warp(const moe_k_gate_args_t *a) {
    static int forced = -1; /* MOE_CUDA_GATE=thread forces the per-thread path (for tests) */
    if (forced < 0) {
        const char *v = getenv("MOE_CUDA_GATE");
        forced = v && strcmp(v, "thread") == 0;
    }
    /* a selection bias (loss-free balancing) takes the per-thread path, whose top-k applies it */
    /* so do the routing extensions (sigmoid, groups, availability, scaling) */
    return !forced && a->E <= 256 && a->K1 <= MOE_K_GATE_MAXK1 && a->score_bias == NULL &&
           !a->ext.active;
}

extern "C" int64_t moe_k_gate_num_blocks(int64_t T) {
    const int64_t tpb = MOE_K_GATE_WARPS * MOE_K_GATE_WTOK; /* the smaller of the two paths */
    return (T + tpb - 1) / tpb;
}

extern "C" cudaError_t moe_k_gate_fwd(const moe_k_gate_args_t *a, cudaStream_t stream) {
    int64_t nblk;
    if (gate_use_warp(a)) {
        const int64_t tpb = MOE_K_GATE_WARPS * MOE_K_GATE_WTOK;
        nblk = (a->T + tpb - 1) / tpb;
        const int epl = (int)((a->E + 31) / 32);
        const unsigned th = 32 * MOE_K_GATE_WARPS;
        if (epl <= 1)
            gate_fwd_warp_kernel<1><<<(unsigned)nblk, th, 0, stream>>>(*a);
        else if (epl <= 2)
            gate_fwd_warp_kernel<2><<<(unsigned)nblk, th, 0, stream>>>(*a);
        else if (epl <= 4)
            gate_fwd_warp_kernel<4><<<(unsigned)nblk, th, 0, stream>>>(*a);
        else
            gate_fwd_warp_kernel<8><<<(unsigned)nblk, th, 0, stream>>>(*a);
    } else {
        nblk = (a->T + MOE_K_GATE_BLOCK - 1) / MOE_K_GATE_BLOCK;
        gate_fwd_kernel<<<(unsigned)nblk, MOE_K_GATE_BLOCK, 0, stream>>>(*a);
    }
    cudaError_t e = cudaGetLastError();
    if (e != cudaSuccess) return e;
    gate_reduce_kernel<<<(unsigned)(a->E + 1), 128, 0, stream>>>(*a, nblk);
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
    float *dl = a.dlogits + t * a.E;
    if (a.ext.active) {
        /* routing extensions: never noisy; sigma is scratch */
        const moe_router_opts_t opts = route_opts(a.ext, a.gate_mode, a.renormalize);
        moe_router_gates_opts_bwd(h, E, idx, K, &opts, a.gate + t * a.K, dg, dh);
        for (int e = 0; e < E; ++e) dl[e] = dh[e];
        if (a.any_logit)
            moe_router_aux_bwd(lg, E, &opts, switch_f, a.z_scale, a.lse[t], p, sigma, dl);
        return;
    }
    moe_router_gates_bwd(h, E, idx, K, a.gate_mode, a.renormalize, a.gate + t * a.K, dg, dh);
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
