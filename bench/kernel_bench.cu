// kernel_bench.cu - each libmoe CUDA kernel next to a same-run ceiling: a device-to-device copy of
// the same bytes (memory-bound kernels) or a dense cuBLAS GEMM of the same FLOPs (expert GEMMs).
//
// Times are medians over samples of several back-to-back launches between CUDA events, after a
// warm-up. Bytes are the fewest the kernel must move (each input read once, each output written
// once); copy bandwidth counts read + write. Prints a markdown table (stdout); the exit status
// says whether every target was met (see usage()).
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include "kernels/kernels.h"

#define CK(call)                                                                             \
    do {                                                                                     \
        cudaError_t e_ = (call);                                                             \
        if (e_ != cudaSuccess) {                                                             \
            std::fprintf(stderr, "%s failed: %s (%s:%d)\n", #call, cudaGetErrorString(e_),   \
                         __FILE__, __LINE__);                                                \
            std::exit(1);                                                                    \
        }                                                                                    \
    } while (0)
#define CB(call)                                                                             \
    do {                                                                                     \
        cublasStatus_t s_ = (call);                                                          \
        if (s_ != CUBLAS_STATUS_SUCCESS) {                                                   \
            std::fprintf(stderr, "%s failed: %s (%s:%d)\n", #call, cublasGetStatusName(s_),  \
                         __FILE__, __LINE__);                                                \
            std::exit(1);                                                                    \
        }                                                                                    \
    } while (0)

static cudaStream_t g_stream;

// median seconds per call of fn, timed in samples of `inner` calls
static double time_it(const std::function<void()> &fn, int inner, int samples = 15) {
    for (int i = 0; i < 3; ++i) fn();
    CK(cudaStreamSynchronize(g_stream));
    cudaEvent_t a, b;
    CK(cudaEventCreate(&a));
    CK(cudaEventCreate(&b));
    std::vector<double> t;
    for (int s = 0; s < samples; ++s) {
        CK(cudaEventRecord(a, g_stream));
        for (int i = 0; i < inner; ++i) fn();
        CK(cudaEventRecord(b, g_stream));
        CK(cudaEventSynchronize(b));
        float ms = 0;
        CK(cudaEventElapsedTime(&ms, a, b));
        t.push_back(ms * 1e-3 / inner);
    }
    CK(cudaGetLastError());
    cudaEventDestroy(a), cudaEventDestroy(b);
    std::sort(t.begin(), t.end());
    return t[t.size() / 2];
}

static void *dalloc(size_t bytes) {
    void *p = nullptr;
    CK(cudaMalloc(&p, bytes));
    return p;
}

// random bf16 / f32 values in [-1, 1] (never zeros: they can run faster than real data)
__global__ void fill_kernel(void *p, int64_t n, int bf16, uint32_t seed) {
    for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n;
         i += (int64_t)gridDim.x * blockDim.x) {
        uint32_t h = (uint32_t)i * 2654435761u ^ seed;
        h ^= h >> 15, h *= 2246822519u, h ^= h >> 13;
        float v = (float)(h & 0xFFFFFF) / 8388608.0f - 1.0f;
        if (bf16)
            ((__nv_bfloat16 *)p)[i] = __float2bfloat16(v);
        else
            ((float *)p)[i] = v;
    }
}
static void fill(void *p, int64_t n, int bf16, uint32_t seed) {
    fill_kernel<<<1024, 256, 0, g_stream>>>(p, n, bf16, seed);
    CK(cudaGetLastError());
}

struct Row {
    std::string kernel, shape, metric;
    double us, achieved, ceiling, target;
};
static std::vector<Row> g_rows;

static double copy_bw(size_t bytes, void *a, void *b) {
    double t = time_it([&] { CK(cudaMemcpyAsync(b, a, bytes, cudaMemcpyDeviceToDevice, g_stream)); }, 5);
    return 2.0 * bytes / t / 1e9;
}

static void bench_rows() {
    const int64_t T = 16384, D = 4096, K = 2, E = 8, N = T * K;
    const size_t es = 2; // bf16
    void *x = dalloc(T * D * es), *xp = dalloc(N * D * es), *y = dalloc(T * D * es);
    // scratch for the copy ceilings and combine_bwd's dyp: the largest byte count below
    const size_t big_bytes = (size_t)(T * D + 2 * N * D) * es;
    void *big = dalloc(big_bytes);
    float *gate = (float *)dalloc(N * 4), *dg = (float *)dalloc(N * 4);
    int32_t *row = (int32_t *)dalloc(N * 4);
    fill(x, T * D, 1, 1), fill(xp, N * D, 1, 2), fill(gate, N, 0, 3);
    // balanced routing: token t's j-th choice goes to expert (t + j) % E; rows expert-major
    std::vector<int32_t> rh(N);
    std::vector<int64_t> next(E);
    for (int64_t e = 0; e < E; ++e) next[e] = e * (N / E);
    for (int64_t t = 0; t < T; ++t)
        for (int64_t j = 0; j < K; ++j) rh[t * K + j] = (int32_t)next[(t + j) % E]++;
    CK(cudaMemcpy(row, rh.data(), N * 4, cudaMemcpyHostToDevice));
    char shape[128];
    std::snprintf(shape, sizeof shape, "bf16 T=%lld D=%lld K=%lld E=%lld", (long long)T,
                  (long long)D, (long long)K, (long long)E);

    // permute: read x once, write N rows
    double bytes = (double)(T * D + N * D) * es;
    double ceil_bw = copy_bw((size_t)(bytes / 2), big, (char *)big + (size_t)(bytes / 2));
    double t = time_it([&] { CK(moe_k_permute(x, row, T, K, D, 1, xp, g_stream)); }, 5);
    g_rows.push_back({"permute", shape, "GB/s", t * 1e6, bytes / t / 1e9, ceil_bw, 0.85});
    // combine: read N rows, write y
    t = time_it([&] { CK(moe_k_combine_fwd(xp, row, gate, T, K, D, 1, y, g_stream)); }, 5);
    g_rows.push_back({"combine_fwd (unpermute+combine)", shape, "GB/s", t * 1e6,
                      bytes / t / 1e9, ceil_bw, 0.80});
    t = time_it([&] { CK(moe_k_unpermute(xp, row, T, K, D, 1, y, g_stream)); }, 5);
    g_rows.push_back({"unpermute (dx = sum of rows)", shape, "GB/s", t * 1e6, bytes / t / 1e9,
                      ceil_bw, 0.80});
    // combine backward: read dy, yp; write dyp (+ dg)
    double bbytes = (double)(T * D + 2 * N * D) * es;
    double ceil_b = copy_bw((size_t)(bbytes / 2), big, (char *)big + (size_t)(bbytes / 2));
    t = time_it([&] {
        CK(moe_k_combine_bwd(y, xp, row, gate, T, K, D, 1, big, dg, g_stream));
    }, 5);
    g_rows.push_back({"combine_bwd", shape, "GB/s", t * 1e6, bbytes / t / 1e9, ceil_b, 0.0});
    cudaFree(x), cudaFree(xp), cudaFree(y), cudaFree(big), cudaFree(gate), cudaFree(dg), cudaFree(row);
}

static void bench_gate(int noisy) {
    const int64_t T = 16384, E = 64, K = 8, K1 = 9;
    const int64_t nblk = moe_k_gate_num_blocks(T);
    moe_k_gate_args_t a{};
    a.T = T, a.E = E, a.K = K, a.K1 = K1, a.noisy = noisy, a.gate_mode = 0, a.renormalize = 1;
    a.seed = 1, a.call = 0, a.rank = 0;
    float *logits = (float *)dalloc(T * E * 4), *raw = (float *)dalloc(T * E * 4);
    fill(logits, T * E, 0, 7), fill(raw, T * E, 0, 8);
    a.logits = logits, a.noise_raw = raw;
    a.eps = (float *)dalloc(T * E * 4), a.h = (float *)dalloc(T * E * 4);
    a.lse = (float *)dalloc(T * 4), a.idx = (int32_t *)dalloc(T * K1 * 4);
    a.gate = (float *)dalloc(T * K * 4), a.scr = (float *)dalloc(T * (3 * E + K1) * 4);
    a.part = (double *)dalloc(nblk * (3 * E + 1) * 8), a.cnt_part = (int64_t *)dalloc(nblk * E * 8);
    a.red = (double *)dalloc((3 * E + 1) * 8), a.counts = (int64_t *)dalloc(E * 8);
    double t = time_it([&] { CK(moe_k_gate_fwd(&a, g_stream)); }, 20);
    double bytes = (double)T * E * 4 * (noisy ? 2 : 1) + T * (K1 * 4 + K * 4 + 4);
    g_rows.push_back({noisy ? "gate_fwd (noisy, fused)" : "gate_fwd (fused)",
                      "f32 T=16384 E=64 K=8", "us (target <= 8)", t * 1e6, bytes / t / 1e9, 0, 8});
    // slot assignment of the same routing (CUB radix sort + scan)
    const int64_t n = T * K;
    moe_k_route_args_t r{};
    r.T = T, r.K = K, r.K1 = K1, r.E = E, r.capacity = -1, r.priority = 0;
    r.idx = a.idx, r.gate = a.gate, r.counts = a.counts;
    int64_t *off = (int64_t *)dalloc((E + 1) * 8);
    std::vector<int64_t> counts(E);
    CK(cudaMemcpy(counts.data(), a.counts, E * 8, cudaMemcpyDeviceToHost));
    std::vector<int64_t> oh(E + 1, 0);
    for (int64_t e = 0; e < E; ++e) oh[e + 1] = oh[e] + counts[e];
    CK(cudaMemcpy(off, oh.data(), (E + 1) * 8, cudaMemcpyHostToDevice));
    r.offsets = off, r.row = (int32_t *)dalloc(n * 4);
    r.keys_in = (int32_t *)dalloc(n * 4), r.keys_out = (int32_t *)dalloc(n * 4);
    r.vals_in = (int32_t *)dalloc(n * 4), r.vals_out = (int32_t *)dalloc(n * 4);
    r.fkeys_in = (float *)dalloc(n * 4), r.fkeys_out = (float *)dalloc(n * 4);
    r.claim_start = (int64_t *)dalloc(E * 8);
    CK(moe_k_route_temp_bytes(n, E, &r.temp_bytes));
    r.temp = dalloc(r.temp_bytes + 1);
    if (!noisy) {
        t = time_it([&] { CK(moe_k_route(&r, g_stream)); }, 10);
        g_rows.push_back({"route (position, CUB)", "T=16384 E=64 K=8", "us", t * 1e6, 0, 0, 0});
        r.capacity = T * K / E, r.priority = 1;
        t = time_it([&] { CK(moe_k_route(&r, g_stream)); }, 10);
        g_rows.push_back({"route (score, CUB)", "T=16384 E=64 K=8", "us", t * 1e6, 0, 0, 0});
    }
}

// expert GEMMs of one FFN direction (H = X W1) over balanced routing, loop vs grouped, vs a
// dense GEMM of equal FLOPs
static void bench_gemm(cublasHandle_t h, int64_t E, int64_t D, int64_t F, int64_t K,
                       double target) {
    const int64_t T = 16384, N = T * K, rows = N / E;
    void *X = dalloc(N * D * 2), *W = dalloc(E * D * F * 2), *H = dalloc(N * F * 2);
    void **ptrs = (void **)dalloc(3 * E * sizeof(void *));
    fill(X, N * D, 1, 11), fill(W, E * D * F, 1, 12);
    const double flops = 2.0 * N * D * F;
    double td = time_it([&] { CB(moe_k_gemm(h, 0, 0, N, F, D, X, D, W, F, 0.0f, H, F, 1, 0)); }, 1, 7);
    double dense = flops / td / 1e12;
    double tl = time_it([&] {
        for (int64_t e = 0; e < E; ++e)
            CB(moe_k_gemm(h, 0, 0, rows, F, D, (char *)X + e * rows * D * 2, D,
                          (char *)W + e * D * F * 2, F, 0.0f, (char *)H + e * rows * F * 2, F, 1, 0));
    }, 1, 7);
    std::vector<int> m(E, (int)rows), n(E, (int)F), k(E, (int)D), lda(E, (int)D), ldb(E, (int)F),
        ldc(E, (int)F);
    std::vector<const void *> A(E), B(E);
    std::vector<void *> C(E);
    for (int64_t e = 0; e < E; ++e) {
        A[e] = (char *)X + e * rows * D * 2;
        B[e] = (char *)W + e * D * F * 2;
        C[e] = (char *)H + e * rows * F * 2;
    }
    double tg = time_it([&] {
        CB(moe_k_gemm_grouped(h, 0, 0, (int)E, m.data(), n.data(), k.data(), A.data(), lda.data(),
                              B.data(), ldb.data(), 0.0f, C.data(), ldc.data(), 1, 0, ptrs, g_stream));
    }, 1, 7);
    // equal rows per expert (balanced routing, or capacity-saturated experts): one strided
    // batched call is possible too; the library does not use it yet
    const float one = 1.0f, zero = 0.0f;
    double tsb = time_it([&] {
        CB(cublasGemmStridedBatchedEx(h, CUBLAS_OP_N, CUBLAS_OP_N, (int)F, (int)rows, (int)D, &one,
                                      W, CUDA_R_16BF, (int)F, D * F, X, CUDA_R_16BF, (int)D,
                                      rows * D, &zero, H, CUDA_R_16BF, (int)F, rows * F, (int)E,
                                      CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
    }, 1, 7);
    char shape[128];
    std::snprintf(shape, sizeof shape, "bf16 E=%lld %lld->%lld K=%lld T=%lld", (long long)E,
                  (long long)D, (long long)F, (long long)K, (long long)T);
    g_rows.push_back({"expert GEMM, loop of cublasGemmEx", shape, "TFLOP/s", tl * 1e6,
                      flops / tl / 1e12, dense, target});
    g_rows.push_back({"expert GEMM, cublasGemmGroupedBatchedEx", shape, "TFLOP/s", tg * 1e6,
                      flops / tg / 1e12, dense, target});
    g_rows.push_back({"expert GEMM, cublasGemmStridedBatchedEx (equal rows)", shape, "TFLOP/s",
                      tsb * 1e6, flops / tsb / 1e12, dense, target});
    cudaFree(X), cudaFree(W), cudaFree(H), cudaFree(ptrs);
}

enum { KB_EXIT_OK = 0, KB_EXIT_ERROR = 1, KB_EXIT_USAGE = 2, KB_EXIT_MISSED = 4 };

static void usage(FILE *f) {
    std::fprintf(f,
                 "usage: moe_kernel_bench [-h | --help]\n"
                 "Times each libmoe CUDA kernel next to a same-run ceiling (D2D copy of the same\n"
                 "bytes, or a dense cuBLAS GEMM of the same FLOPs) and prints a markdown table.\n"
                 "The last line counts the targets: 'targets: N of M met' or 'targets: K of M\n"
                 "MISSED: names'.\n"
                 "\n"
                 "exit status: 0 every target met (or no GPU: nothing measured), 1 a CUDA or\n"
                 "cuBLAS error, 2 bad usage, 4 at least one target missed\n"
                 "\n"
                 "MOE_KERNEL_BENCH_TARGET_SCALE=X tightens every target X times (ratio targets\n"
                 "times X, time targets over X; default 1): a huge X makes every target missed,\n"
                 "which the tests use to see the exit status 4\n");
}

static double target_scale() {
    const char *v = std::getenv("MOE_KERNEL_BENCH_TARGET_SCALE");
    double x = v ? std::atof(v) : 1.0;
    return x > 0 ? x : 1.0;
}

// 1 when row r has a target and missed it; 0 met; -1 no target
static int missed(const Row &r) {
    static const double x = target_scale();
    if (r.metric.rfind("us (", 0) == 0) return r.us <= r.target / x ? 0 : 1;
    if (r.target > 0) return r.ceiling > 0 && r.achieved / r.ceiling >= r.target * x ? 0 : 1;
    return -1;
}

// the table of every row; returns the exit status (KB_EXIT_MISSED when a target was missed)
static int print_table(const cudaDeviceProp &prop) {
    std::printf("## libmoe kernel benchmark on %s (%d SMs)\n\n", prop.name,
                prop.multiProcessorCount);
    std::printf("| kernel | shape | time (us) | achieved | unit | ceiling (same run) | ratio | target |\n");
    std::printf("|---|---|---:|---:|---|---:|---:|---|\n");
    int targets = 0, nmissed = 0;
    std::string names;
    for (const Row &r : g_rows) {
        char ratio[32] = "-", target[48] = "-", ceil[32] = "-", ach[32] = "-";
        if (r.ceiling > 0) std::snprintf(ratio, sizeof ratio, "%.2f", r.achieved / r.ceiling);
        if (r.ceiling > 0) std::snprintf(ceil, sizeof ceil, "%.1f", r.ceiling);
        if (r.achieved > 0) std::snprintf(ach, sizeof ach, "%.1f", r.achieved);
        const int m = missed(r);
        if (r.metric.rfind("us (", 0) == 0)
            std::snprintf(target, sizeof target, "<= %.0f us: %s", r.target, m ? "MISSED" : "met");
        else if (r.target > 0)
            std::snprintf(target, sizeof target, ">= %.2f: %s", r.target, m ? "MISSED" : "met");
        if (m >= 0) ++targets;
        if (m > 0) {
            names += (nmissed ? ", " : "") + r.kernel + " (" + r.shape + ")";
            ++nmissed;
        }
        std::printf("| %s | %s | %.1f | %s | %s | %s | %s | %s |\n", r.kernel.c_str(),
                    r.shape.c_str(), r.us, ach, r.metric.rfind("us", 0) == 0 ? "GB/s" : r.metric.c_str(),
                    ceil, ratio, target);
    }
    std::printf("\nceilings: GB/s rows = cudaMemcpy D2D of the same bytes (read + write counted);"
                " TFLOP/s rows = one dense cuBLAS bf16 GEMM of the same FLOPs.\n");
    if (nmissed) {
        std::printf("targets: %d of %d MISSED: %s\n", nmissed, targets, names.c_str());
        return KB_EXIT_MISSED;
    }
    std::printf("targets: %d of %d met\n", targets, targets);
    return KB_EXIT_OK;
}

int main(int argc, char **argv) {
    for (int i = 1; i < argc; ++i) {
        if (!std::strcmp(argv[i], "-h") || !std::strcmp(argv[i], "--help")) {
            usage(stdout);
            return KB_EXIT_OK;
        }
        std::fprintf(stderr, "moe_kernel_bench: unknown argument '%s'\n", argv[i]);
        usage(stderr);
        return KB_EXIT_USAGE;
    }
    int dev = 0;
    cudaDeviceProp prop;
    if (cudaGetDeviceCount(&dev) != cudaSuccess || dev == 0) {
        std::printf("kernel_bench: no GPU, nothing to measure\n");
        return 0;
    }
    CK(cudaGetDeviceProperties(&prop, 0));
    CK(cudaStreamCreate(&g_stream));
    cublasHandle_t h;
    CB(cublasCreate(&h));
    CB(cublasSetStream(h, g_stream));
    bench_rows();
    bench_gate(0);
    bench_gate(1);
    bench_gemm(h, 8, 4096, 14336, 2, 0.95);
    bench_gemm(h, 32, 7168, 2048, 8, 0.80);
    const int rc = print_table(prop);
    cublasDestroy(h);
    return rc;
}
