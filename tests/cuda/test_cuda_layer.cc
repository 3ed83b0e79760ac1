// test_cuda_layer.cc - the CUDA backend against the CPU backend, op by op and as a whole layer.
//
// Both layers get the same parameters (the CPU layer's, copied to the device) and the same x.
// x and the router weights are small dyadic numbers, so x . Wg is exact in f32 on both sides
// whatever the summation order: the logits agree bit for bit, and so must the chosen experts,
// the slots, counts, offsets and kept flags. Every float tensor is then compared by max-norm
// relative error, max|gpu - cpu| / max|cpu|, against 1e-5 for f32 storage (a few ulps of f32
// after sums of a few hundred terms; libm and CUDA's expf/erff differ by up to 2 ulp). With
// bf16 / f16 storage the CPU layer gets the same 16-bit values widened to f32, and the bound is
// 1e-2: the GPU rounds x.W1, act, y and the gradients to 8 (bf16) or 11 (f16) mantissa bits
// between stages, a relative error of 2^-9 to 2^-12 per rounding, a few roundings deep.
#include <gtest/gtest.h>

#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "core/dtype.h"
#include "handle.h"
#include "gpu_test.h"
#include "moe/moe.h"

namespace {


#define CK(call) ASSERT_EQ((call), MOE_STATUS_SUCCESS) << #call << ": " << moe_last_error()
#define CU(call) ASSERT_EQ((call), cudaSuccess) << #call

template <typename V> std::vector<V> d2h(const void *p, size_t n) {
    std::vector<V> v(n);
    if (n) {
        EXPECT_EQ(cudaMemcpy(v.data(), p, n * sizeof(V), cudaMemcpyDeviceToHost), cudaSuccess);
    }
    return v;
}

template <typename V> std::vector<V> h2v(const void *p, size_t n) {
    std::vector<V> v(n);
    if (n) std::memcpy(v.data(), p, n * sizeof(V));
    return v;
}

double rel_err(const std::vector<float> &gpu, const std::vector<float> &cpu) {
    double num = 0.0, den = 0.0;
    for (size_t i = 0; i < cpu.size(); ++i) {
        if (!std::isfinite(gpu[i])) return INFINITY; // NaN never passes
        num = std::max(num, (double)std::fabs(gpu[i] - cpu[i]));
        den = std::max(den, (double)std::fabs(cpu[i]));
    }
    return den > 0.0 ? num / den : num;
}

struct Case {
    const char *name;
    int64_t T, D, F, E, K;
    moe_activation_t act;
    moe_gate_t gate;
    int renorm, noisy, bias;
    double cap;
    moe_priority_t prio;
    double coef; // every aux-loss coefficient
};

void PrintTo(const Case &c, std::ostream *os) { *os << c.name; }

std::string case_name(const testing::TestParamInfo<Case> &i) { return i.param.name; }

std::vector<Case> make_grid() {
    static const char *act_names[] = {"relu", "gelu", "silu", "swiglu"};
    static std::vector<std::string> names; // keeps the c_str()s alive
    std::vector<Case> cs;
    const int64_t KE[][2] = {{1, 1}, {1, 4}, {1, 16}, {2, 4}, {2, 16}, {4, 4}, {4, 16}};
    int i = 0;
    names.reserve(200);
    for (auto &ke : KE)
        for (int a = 0; a < 4; ++a, ++i) {
            Case c{};
            c.K = ke[0], c.E = ke[1];
            c.act = (moe_activation_t)a;
            c.T = (i % 3 == 0) ? 301 : (i % 3 == 1 ? 37 : 513); // not multiples of any block
            c.D = (i % 2) ? 20 : 13;                             // not multiples of 8
            c.F = (i % 2) ? 24 : 9;
            int g = i % 3;
            c.gate = g == 0 ? MOE_GATE_SOFTMAX_OF_TOPK : MOE_GATE_TOPK_OF_SOFTMAX;
            c.renorm = g != 2;
            int cap = (i / 3) % 3;
            c.cap = cap == 0 ? 0.0 : (cap == 1 ? 1.0 : 0.75);
            c.prio = cap == 2 ? MOE_PRIORITY_SCORE : MOE_PRIORITY_POSITION;
            c.noisy = (i / 2) % 2;
            c.bias = (i % 4) != 3;
            c.coef = (i % 5 == 4) ? 0.0 : 0.01;
            names.push_back("K" + std::to_string(c.K) + "_E" + std::to_string(c.E) + "_" +
                            act_names[a] + (c.noisy ? "_noisy" : "") +
                            (c.cap > 0 ? (c.prio == MOE_PRIORITY_SCORE ? "_capscore" : "_cappos")
                                       : "_dropless") +
                            (g == 0 ? "_softtopk" : (g == 1 ? "_topksoftrenorm" : "_topksoft")) +
                            (c.bias ? "_bias" : "") + "_T" + std::to_string(c.T) + "_D" +
                            std::to_string(c.D));
            c.name = names.back().c_str();
            cs.push_back(c);
        }
    // edge cases: one token; a score-priority capacity over many gate blocks; all dropped but one
    Case one{"T1_K2_E4", 1, 8, 16, 4, 2, MOE_ACTIVATION_GELU, MOE_GATE_SOFTMAX_OF_TOPK, 1, 1, 1,
             1.0, MOE_PRIORITY_SCORE, 0.01};
    Case big{"T2000_K2_E16_capscore", 2000, 24, 32, 16, 2, MOE_ACTIVATION_SWIGLU,
             MOE_GATE_TOPK_OF_SOFTMAX, 0, 1, 1, 0.5, MOE_PRIORITY_SCORE, 0.01};
    Case tight{"T300_K4_E16_cap_tiny", 300, 16, 8, 16, 4, MOE_ACTIVATION_RELU,
               MOE_GATE_SOFTMAX_OF_TOPK, 1, 0, 0, 0.01, MOE_PRIORITY_POSITION, 0.01};
    Case wide{"T64_K8_E64_D130", 64, 130, 40, 64, 8, MOE_ACTIVATION_SILU,
              MOE_GATE_TOPK_OF_SOFTMAX, 1, 1, 1, 1.25, MOE_PRIORITY_POSITION, 0.01};
    // beyond the warp gate's limits (E <= 256, K + 1 <= 16): the per-thread gate kernel
    Case many{"T50_K2_E300_threadgate", 50, 12, 16, 300, 2, MOE_ACTIVATION_GELU,
              MOE_GATE_TOPK_OF_SOFTMAX, 1, 1, 1, 2.0, MOE_PRIORITY_SCORE, 0.01};
    Case deep{"T40_K16_E32_threadgate", 40, 12, 8, 32, 16, MOE_ACTIVATION_RELU,
              MOE_GATE_SOFTMAX_OF_TOPK, 1, 1, 0, 0.0, MOE_PRIORITY_POSITION, 0.01};
    cs.push_back(one), cs.push_back(big), cs.push_back(tight), cs.push_back(wide);
    cs.push_back(many), cs.push_back(deep);
    return cs;
}

moe_layer_config_t config_of(const Case &c) {
    moe_layer_config_t cfg = moe_layer_config_default();
    cfg.d_model = c.D, cfg.d_ff = c.F, cfg.num_experts = c.E, cfg.top_k = c.K;
    cfg.activation = c.act, cfg.gate = c.gate, cfg.renormalize = c.renorm;
    cfg.noisy_gating = c.noisy, cfg.expert_bias = c.bias;
    cfg.capacity_factor = c.cap, cfg.priority = c.prio;
    cfg.switch_loss_coef = cfg.importance_loss_coef = cfg.load_loss_coef = c.coef;
    cfg.z_loss_coef = c.coef * 0.1;
    cfg.seed = 77;
    return cfg;
}

// dyadic values: k / den for integer k in [-lim, lim]
std::vector<float> dyadic(size_t n, int lim, float den, std::mt19937 &rng) {
    std::uniform_int_distribution<int> u(-lim, lim);
    std::vector<float> v(n);
    for (auto &x : v) x = (float)u(rng) / den;
    return v;
}

struct Pair {
    moe_context_t *cpu = nullptr, *gpu = nullptr;
    moe_layer_t *lc = nullptr, *lg = nullptr;
    ~Pair() {
        moe_layer_destroy(lc), moe_layer_destroy(lg);
        moe_context_destroy(cpu), moe_context_destroy(gpu);
    }
};

// copies every parameter of the CPU layer to the GPU layer, after making the router dyadic
void sync_params(Pair &p, std::mt19937 &rng) {
    for (int w = 0; w < MOE_PARAM_COUNT; ++w) {
        void *vc = nullptr, *vg = nullptr;
        int64_t n = 0, ng = 0;
        ASSERT_EQ(moe_layer_param(p.lc, (moe_param_t)w, &vc, nullptr, &n), MOE_STATUS_SUCCESS);
        ASSERT_EQ(moe_layer_param(p.lg, (moe_param_t)w, &vg, nullptr, &ng), MOE_STATUS_SUCCESS);
        ASSERT_EQ(n, ng);
        if (!n) continue;
        if (w == MOE_PARAM_ROUTER_WEIGHT || w == MOE_PARAM_NOISE_WEIGHT) {
            std::vector<float> v = dyadic((size_t)n, 64, 256.0f, rng);
            std::memcpy(vc, v.data(), (size_t)n * 4);
        }
        ASSERT_EQ(cudaMemcpy(vg, vc, (size_t)n * 4, cudaMemcpyHostToDevice), cudaSuccess);
    }
}

void expect_close(const char *what, const void *gpu_ptr, const void *cpu_ptr, size_t n,
                  double tol = 1e-5) {
    if (!n) return;
    auto g = d2h<float>(gpu_ptr, n);
    auto c = h2v<float>(cpu_ptr, n);
    EXPECT_LE(rel_err(g, c), tol) << what << " (" << n << " values)";
}

template <typename V>
void expect_equal(const char *what, const void *gpu_ptr, const void *cpu_ptr, size_t n) {
    if (!n) return;
    auto g = d2h<V>(gpu_ptr, n);
    auto c = h2v<V>(cpu_ptr, n);
    size_t bad = 0, first = 0;
    for (size_t i = 0; i < n; ++i)
        if (g[i] != c[i] && !bad++) first = i;
    EXPECT_EQ(bad, 0u) << what << ": " << bad << " of " << n << " differ, first at " << first
                       << " (gpu " << +g[first] << ", cpu " << +c[first] << ")";
}

class CudaLayer : public testing::TestWithParam<Case> {};

TEST_P(CudaLayer, MatchesCpuBackend) {
    REQUIRE_GPU();
    const Case c = GetParam();
    const moe_layer_config_t cfg = config_of(c);
    Pair p;
    CK(moe_context_create(&p.cpu, MOE_BACKEND_CPU, 0, nullptr));
    CK(moe_context_create(&p.gpu, MOE_BACKEND_CUDA, 0, nullptr));
    CK(moe_layer_create(&p.lc, p.cpu, &cfg));
    CK(moe_layer_create(&p.lg, p.gpu, &cfg));
    std::mt19937 rng(1000 + (unsigned)c.T * 7 + (unsigned)c.E);
    sync_params(p, rng);
    if (HasFatalFailure()) return;

    const int64_t T = c.T, D = c.D, E = c.E, K = c.K;
    const int64_t K1 = std::min(K + 1, E);
    std::vector<float> x = dyadic((size_t)(T * D), 8, 8.0f, rng);
    std::normal_distribution<float> nd(0.0f, 1.0f);
    std::vector<float> dy((size_t)(T * D));
    for (auto &v : dy) v = nd(rng);
    std::vector<float> y((size_t)(T * D)), dx((size_t)(T * D));
    float *xd, *yd, *dyd, *dxd;
    CU(cudaMalloc(&xd, x.size() * 4));
    CU(cudaMalloc(&yd, x.size() * 4));
    CU(cudaMalloc(&dyd, x.size() * 4));
    CU(cudaMalloc(&dxd, x.size() * 4));
    CU(cudaMemcpy(xd, x.data(), x.size() * 4, cudaMemcpyHostToDevice));
    CU(cudaMemcpy(dyd, dy.data(), dy.size() * 4, cudaMemcpyHostToDevice));
    CU(cudaMemset(yd, 0xFF, x.size() * 4)); // poison: every element must be written
    CU(cudaMemset(dxd, 0xFF, x.size() * 4));
    cudaStream_t stream;
    CU(cudaStreamCreate(&stream));

    // two training steps: the second forward draws fresh noise (call counter 1)
    for (int step = 0; step < 2; ++step) {
        SCOPED_TRACE("step " + std::to_string(step));
        CK(moe_layer_forward(p.lc, x.data(), y.data(), T, 1, nullptr));
        CK(moe_layer_forward(p.lg, xd, yd, T, 1, stream));
        CU(cudaStreamSynchronize(stream));
        const moe_layer_state_t &sc = p.lc->s, &sg = p.lg->s;

        // gate
        expect_equal<float>("logits (exact: dyadic inputs)", sg.logits, sc.logits, T * E);
        if (c.noisy) {
            expect_close("noise_raw", sg.noise_raw, sc.noise_raw, T * E);
            expect_close("eps", sg.eps, sc.eps, T * E);
            expect_close("h", sg.h, sc.h, T * E);
        }
        expect_equal<int32_t>("idx", sg.idx, sc.idx, T * K1);
        expect_close("gate", sg.gate, sc.gate, T * K);
        expect_close("lse", sg.lse, sc.lse, T);
        for (int64_t e = 0; e < E; ++e) {
            EXPECT_EQ(sg.counts_h[e], sc.counts_h[e]) << "counts expert " << e;
            EXPECT_EQ(sg.dropped_h[e], sc.dropped_h[e]) << "dropped expert " << e;
            EXPECT_NEAR(sg.prob_sum_h[e], sc.prob_sum_h[e], 1e-5 * T) << "prob sum " << e;
            EXPECT_NEAR(sg.importance_h[e], sc.importance_h[e], 1e-5 * T) << "importance " << e;
            EXPECT_NEAR(sg.load_h[e], sc.load_h[e], 1e-5 * T) << "load " << e;
        }
        for (int64_t e = 0; e <= E; ++e) EXPECT_EQ(sg.offsets_h[e], sc.offsets_h[e]) << e;
        EXPECT_NEAR(sg.z_sum, sc.z_sum, 1e-5 * std::fabs(sc.z_sum) + 1e-6);
        // route + permute
        EXPECT_EQ(sg.num_rows, sc.num_rows);
        expect_equal<int32_t>("row", sg.row, sc.row, T * K);
        const int64_t N = sc.num_rows;
        expect_equal<float>("xp", sg.xp, sc.xp, N * D);
        // experts + combine
        expect_close("hpre", sg.hpre, sc.hpre, N * sc.F2);
        expect_close("act", sg.act, sc.act, N * c.F);
        expect_close("yp", sg.yp, sc.yp, N * D);
        expect_close("y", yd, y.data(), T * D);
        moe_routing_stats_t stc, stg;
        CK(moe_layer_stats(p.lc, &stc, nullptr, nullptr));
        CK(moe_layer_stats(p.lg, &stg, nullptr, nullptr));
        EXPECT_EQ(stg.num_dropped, stc.num_dropped);
        EXPECT_NEAR(stg.aux_loss, stc.aux_loss, 1e-5 * std::fabs(stc.aux_loss) + 1e-9);
        EXPECT_NEAR(stg.switch_loss, stc.switch_loss, 1e-5 * std::fabs(stc.switch_loss) + 1e-9);
        EXPECT_NEAR(stg.importance_loss, stc.importance_loss,
                    1e-5 * std::fabs(stc.importance_loss) + 1e-9);
        EXPECT_NEAR(stg.load_loss, stc.load_loss, 1e-5 * std::fabs(stc.load_loss) + 1e-9);
        EXPECT_NEAR(stg.z_loss, stc.z_loss, 1e-5 * std::fabs(stc.z_loss) + 1e-9);

        // backward (gradients accumulate over both steps on both sides)
        CK(moe_layer_backward(p.lc, dy.data(), dx.data(), nullptr));
        CK(moe_layer_backward(p.lg, dyd, dxd, stream));
        CU(cudaStreamSynchronize(stream));
        expect_close("dyp", sg.dyp, sc.dyp, N * D);
        expect_close("dg", sg.dg, sc.dg, T * K);
        expect_close("dact", sg.dact, sc.dact, N * c.F);
        expect_close("dhpre", sg.dhpre, sc.dhpre, N * sc.F2);
        expect_close("dxp", sg.dxp, sc.dxp, N * D);
        expect_close("dlogits", sg.dlogits, sc.dlogits, T * E);
        if (c.noisy) expect_close("dnoise", sg.dnoise, sc.dnoise, T * E);
        expect_close("dx", dxd, dx.data(), T * D);
        static const char *pn[] = {"dWg", "dWn", "dW1", "db1", "dW2", "db2"};
        for (int w = 0; w < MOE_PARAM_COUNT; ++w)
            expect_close(pn[w], sg.grad[w], sc.grad[w], (size_t)sc.numel[w]);
        if (HasFailure()) break;
    }

    // routing as the user sees it
    std::vector<int32_t> ic(T * K), ig(T * K), kc(T * K), kg(T * K);
    std::vector<float> gc(T * K), gg(T * K);
    CK(moe_layer_routing(p.lc, ic.data(), gc.data(), kc.data()));
    CK(moe_layer_routing(p.lg, ig.data(), gg.data(), kg.data()));
    EXPECT_EQ(ig, ic);
    EXPECT_EQ(kg, kc);
    EXPECT_LE(rel_err(gg, gc), 1e-5);
    cudaStreamDestroy(stream);
    cudaFree(xd), cudaFree(yd), cudaFree(dyd), cudaFree(dxd);
}

INSTANTIATE_TEST_SUITE_P(Grid, CudaLayer, testing::ValuesIn(make_grid()), case_name);

// ---- 16-bit storage ---------------------------------------------------------------------------

float from16(uint16_t v, moe_dtype_t dt) {
    return dt == MOE_DTYPE_BF16 ? moe_bf16_to_f32(v) : moe_f16_to_f32(v);
}
uint16_t to16(float v, moe_dtype_t dt) {
    return dt == MOE_DTYPE_BF16 ? moe_f32_to_bf16(v) : moe_f32_to_f16(v);
}

// device values of dtype dt (16-bit) widened to f32
std::vector<float> d2f(const void *p, size_t n, moe_dtype_t dt) {
    auto raw = d2h<uint16_t>(p, n);
    std::vector<float> v(n);
    for (size_t i = 0; i < n; ++i) v[i] = from16(raw[i], dt);
    return v;
}

struct Case16 {
    Case c;
    moe_dtype_t dt;
};

void PrintTo(const Case16 &c, std::ostream *os) { *os << c.c.name; }

std::vector<Case16> make_grid16() {
    std::vector<Case> g = make_grid();
    std::vector<Case16> out;
    static std::vector<std::string> names;
    names.reserve(64);
    // every third case of the f32 grid (all activations, gate orders, capacities appear), twice
    for (size_t i = 0; i < g.size(); i += 3)
        for (moe_dtype_t dt : {MOE_DTYPE_BF16, MOE_DTYPE_F16}) {
            names.push_back(std::string(dt == MOE_DTYPE_BF16 ? "bf16_" : "f16_") + g[i].name);
            Case16 c{g[i], dt};
            c.c.name = names.back().c_str();
            out.push_back(c);
        }
    return out;
}

std::string case16_name(const testing::TestParamInfo<Case16> &i) { return i.param.c.name; }

class CudaLayer16 : public testing::TestWithParam<Case16> {};

TEST_P(CudaLayer16, MatchesCpuBackendOnWidenedValues) {
    REQUIRE_GPU();
    const Case c = GetParam().c;
    const moe_dtype_t dt = GetParam().dt;
    moe_layer_config_t cfg = config_of(c), cfg16 = cfg;
    cfg16.dtype = dt;
    Pair p;
    CK(moe_context_create(&p.cpu, MOE_BACKEND_CPU, 0, nullptr));
    CK(moe_context_create(&p.gpu, MOE_BACKEND_CUDA, 0, nullptr));
    CK(moe_layer_create(&p.lc, p.cpu, &cfg));
    CK(moe_layer_create(&p.lg, p.gpu, &cfg16));
    std::mt19937 rng(2000 + (unsigned)c.T);
    // parameters: the router dyadic (exact in 16 bits), the experts rounded to 16 bits; the CPU
    // layer holds the same values widened
    for (int w = 0; w < MOE_PARAM_COUNT; ++w) {
        void *vc = nullptr, *vg = nullptr;
        int64_t n = 0;
        CK(moe_layer_param(p.lc, (moe_param_t)w, &vc, nullptr, &n));
        CK(moe_layer_param(p.lg, (moe_param_t)w, &vg, nullptr, nullptr));
        if (!n) continue;
        float *f = (float *)vc;
        if (w == MOE_PARAM_ROUTER_WEIGHT || w == MOE_PARAM_NOISE_WEIGHT) {
            std::vector<float> v = dyadic((size_t)n, 64, 256.0f, rng);
            std::memcpy(f, v.data(), (size_t)n * 4);
        }
        std::vector<uint16_t> h((size_t)n);
        for (int64_t i = 0; i < n; ++i) {
            h[i] = to16(f[i], dt);
            f[i] = from16(h[i], dt);
        }
        CU(cudaMemcpy(vg, h.data(), (size_t)n * 2, cudaMemcpyHostToDevice));
    }
    const int64_t T = c.T, D = c.D, E = c.E, K = c.K, K1 = std::min(K + 1, E);
    std::vector<float> x = dyadic((size_t)(T * D), 8, 8.0f, rng), dy((size_t)(T * D));
    std::normal_distribution<float> nd(0.0f, 1.0f);
    std::vector<uint16_t> x16(x.size()), dy16(x.size());
    for (size_t i = 0; i < x.size(); ++i) {
        x16[i] = to16(x[i], dt);
        dy16[i] = to16(nd(rng), dt);
        dy[i] = from16(dy16[i], dt);
    }
    std::vector<float> y(x.size()), dx(x.size());
    void *xd, *yd, *dyd, *dxd;
    CU(cudaMalloc(&xd, x.size() * 2));
    CU(cudaMalloc(&yd, x.size() * 2));
    CU(cudaMalloc(&dyd, x.size() * 2));
    CU(cudaMalloc(&dxd, x.size() * 2));
    CU(cudaMemcpy(xd, x16.data(), x.size() * 2, cudaMemcpyHostToDevice));
    CU(cudaMemcpy(dyd, dy16.data(), x.size() * 2, cudaMemcpyHostToDevice));
    CU(cudaMemset(yd, 0xFF, x.size() * 2)); // NaN poison in both formats
    CU(cudaMemset(dxd, 0xFF, x.size() * 2));
    const double tol = 1e-2;
    for (int step = 0; step < 2; ++step) {
        SCOPED_TRACE("step " + std::to_string(step));
        CK(moe_layer_forward(p.lc, x.data(), y.data(), T, 1, nullptr));
        CK(moe_layer_forward(p.lg, xd, yd, T, 1, nullptr));
        CU(cudaDeviceSynchronize());
        const moe_layer_state_t &sc = p.lc->s, &sg = p.lg->s;
        // the router runs in f32 on exact widened values: routing identical to the CPU's
        expect_equal<float>("logits", sg.logits, sc.logits, T * E);
        expect_equal<int32_t>("idx", sg.idx, sc.idx, T * K1);
        expect_equal<int32_t>("row", sg.row, sc.row, T * K);
        for (int64_t e = 0; e <= E; ++e) EXPECT_EQ(sg.offsets_h[e], sc.offsets_h[e]) << e;
        expect_close("gate", sg.gate, sc.gate, T * K);
        const int64_t N = sc.num_rows;
        EXPECT_EQ(d2f(sg.xp, N * D, dt), h2v<float>(sc.xp, N * D)) << "xp";
        EXPECT_LE(rel_err(d2f(sg.yp, N * D, dt), h2v<float>(sc.yp, N * D)), tol) << "yp";
        EXPECT_LE(rel_err(d2f(yd, T * D, dt), y), tol) << "y";
        CK(moe_layer_backward(p.lc, dy.data(), dx.data(), nullptr));
        CK(moe_layer_backward(p.lg, dyd, dxd, nullptr));
        CU(cudaDeviceSynchronize());
        expect_close("dg", sg.dg, sc.dg, T * K, tol);
        expect_close("dlogits", sg.dlogits, sc.dlogits, T * E, tol);
        EXPECT_LE(rel_err(d2f(dxd, T * D, dt), dx), tol) << "dx";
        static const char *pn[] = {"dWg", "dWn", "dW1", "db1", "dW2", "db2"};
        for (int w = 0; w < MOE_PARAM_COUNT; ++w) {
            if (!sc.numel[w]) continue;
            EXPECT_LE(rel_err(d2f(sg.grad[w], sc.numel[w], dt), h2v<float>(sc.grad[w], sc.numel[w])),
                      tol)
                << pn[w];
        }
        if (HasFailure()) break;
    }
    cudaFree(xd), cudaFree(yd), cudaFree(dyd), cudaFree(dxd);
}

INSTANTIATE_TEST_SUITE_P(Grid16, CudaLayer16, testing::ValuesIn(make_grid16()), case16_name);

// same inputs, same stream: bitwise identical outputs and gradients (no float atomics)
TEST(CudaLayerDeterminism, RunToRun) {
    REQUIRE_GPU();
    moe_layer_config_t cfg = moe_layer_config_default();
    cfg.d_model = 64, cfg.d_ff = 96, cfg.num_experts = 8, cfg.top_k = 2;
    cfg.noisy_gating = 1, cfg.capacity_factor = 1.0, cfg.priority = MOE_PRIORITY_SCORE;
    cfg.switch_loss_coef = cfg.importance_loss_coef = cfg.load_loss_coef = 0.01;
    const int64_t T = 1000, n = T * cfg.d_model;
    std::vector<std::vector<float>> out;
    for (int run = 0; run < 2; ++run) {
        moe_context_t *ctx = nullptr;
        moe_layer_t *L = nullptr;
        CK(moe_context_create(&ctx, MOE_BACKEND_CUDA, 0, nullptr));
        CK(moe_layer_create(&L, ctx, &cfg));
        std::mt19937 rng(5);
        std::normal_distribution<float> nd;
        std::vector<float> x(n);
        for (auto &v : x) v = nd(rng);
        float *xd, *yd, *dxd;
        CU(cudaMalloc(&xd, n * 4));
        CU(cudaMalloc(&yd, n * 4));
        CU(cudaMalloc(&dxd, n * 4));
        CU(cudaMemcpy(xd, x.data(), n * 4, cudaMemcpyHostToDevice));
        CK(moe_layer_forward(L, xd, yd, T, 1, nullptr));
        CK(moe_layer_backward(L, yd, dxd, nullptr));
        std::vector<float> r = d2h<float>(yd, n), d = d2h<float>(dxd, n);
        r.insert(r.end(), d.begin(), d.end());
        void *g;
        int64_t gn;
        CK(moe_layer_param(L, MOE_PARAM_W1, nullptr, &g, &gn));
        d = d2h<float>(g, gn);
        r.insert(r.end(), d.begin(), d.end());
        CK(moe_layer_param(L, MOE_PARAM_ROUTER_WEIGHT, nullptr, &g, &gn));
        d = d2h<float>(g, gn);
        r.insert(r.end(), d.begin(), d.end());
        out.push_back(r);
        cudaFree(xd), cudaFree(yd), cudaFree(dxd);
        CK(moe_layer_destroy(L));
        CK(moe_context_destroy(ctx));
    }
    EXPECT_EQ(0, std::memcmp(out[0].data(), out[1].data(), out[0].size() * 4));
}

TEST(CudaLayerErrors, NonFiniteInputIsReported) {
    REQUIRE_GPU();
    moe_context_t *ctx = nullptr;
    moe_layer_t *L = nullptr;
    moe_layer_config_t cfg = moe_layer_config_default();
    cfg.d_model = 16, cfg.d_ff = 16, cfg.num_experts = 4;
    CK(moe_context_create(&ctx, MOE_BACKEND_CUDA, 0, nullptr));
    CK(moe_layer_create(&L, ctx, &cfg));
    std::vector<float> x(16 * 5, 0.25f);
    x[33] = NAN;
    float *xd, *yd;
    CU(cudaMalloc(&xd, x.size() * 4));
    CU(cudaMalloc(&yd, x.size() * 4));
    CU(cudaMemcpy(xd, x.data(), x.size() * 4, cudaMemcpyHostToDevice));
    EXPECT_EQ(moe_layer_forward(L, xd, yd, 5, 1, nullptr), MOE_STATUS_NUMERIC_ERROR);
    x[33] = 0.5f; // and the layer stays usable
    CU(cudaMemcpy(xd, x.data(), x.size() * 4, cudaMemcpyHostToDevice));
    CK(moe_layer_forward(L, xd, yd, 5, 1, nullptr));
    cudaFree(xd), cudaFree(yd);
    CK(moe_layer_destroy(L));
    CK(moe_context_destroy(ctx));
}

// without a GPU the CUDA backend says so clearly (this one runs on CPU-only machines)
TEST(CudaContext, NoDeviceIsNotSupported) {
    std::string why;
    if (gpu_present(&why)) GTEST_SKIP() << "a GPU is present";
    moe_context_t *ctx = nullptr;
    EXPECT_EQ(moe_context_create(&ctx, MOE_BACKEND_CUDA, 0, nullptr), MOE_STATUS_NOT_SUPPORTED);
    EXPECT_EQ(ctx, nullptr);
    EXPECT_NE(std::string(moe_last_error()).find("no usable CUDA device"), std::string::npos)
        << moe_last_error();
}

} // namespace

namespace {

// the host f16 conversions that stage 16-bit parameters (csrc/core/dtype.h); no GPU needed
TEST(Dtype16, HalfConversionRoundsToNearestEven) {
    auto bits = [](float f) { return moe_f32_to_f16(f); };
    EXPECT_EQ(bits(1.0f), 0x3C00);
    EXPECT_EQ(bits(-2.0f), 0xC000);
    EXPECT_EQ(bits(65504.0f), 0x7BFF);
    EXPECT_EQ(bits(65519.0f), 0x7BFF);
    EXPECT_EQ(bits(65520.0f), 0x7C00);                 // rounds to Inf
    EXPECT_EQ(bits(std::ldexp(1.0f, -24)), 0x0001);    // smallest subnormal
    EXPECT_EQ(bits(std::ldexp(1.0f, -25)), 0x0000);    // tie to even: zero
    EXPECT_EQ(bits(std::ldexp(1.5f, -25)), 0x0001);
    EXPECT_EQ(bits(std::ldexp(1.0f, -14)), 0x0400);    // smallest normal
    EXPECT_EQ(bits(1.0f + std::ldexp(1.0f, -11)), 0x3C00); // tie to even
    EXPECT_EQ(bits(1.0f + 3 * std::ldexp(1.0f, -11)), 0x3C02);
    EXPECT_EQ(bits(NAN) & 0x7C00, 0x7C00);
    for (uint32_t h = 0; h < 0x7C00; ++h) // every finite positive half survives a round trip
        ASSERT_EQ(moe_f32_to_f16(moe_f16_to_f32((uint16_t)h)), h) << h;
}

} // namespace
