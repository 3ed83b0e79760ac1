// test_cuda_hier.cc - hierarchical gating (router MOE_ROUTER_HIERARCHICAL) on the CUDA backend
// against the CPU backend: the same config and parameters (the CPU layer's, copied to the
// device), the same x, forward and backward, every output compared.
//
// x and both routers' weights are small dyadic numbers, so the logits of both levels are exact
// in f32 whatever the summation order: the chosen groups and experts, kept flags and counts must
// agree exactly. Float tensors are compared by max-norm relative error against 1e-5 (f32
// storage: a few ulps after sums of a few hundred terms; libm and CUDA's expf differ by up to
// 2 ulp), the losses of both levels against 1e-6 relative (f64 sums of f32 terms).
#include <gtest/gtest.h>

#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <random>
#include <vector>

#include "gpu_test.h"
#include "moe/moe.h"

namespace {

#define CK(call) ASSERT_EQ((call), MOE_STATUS_SUCCESS) << #call << ": " << moe_last_error()

double rel_err(const std::vector<float> &gpu, const std::vector<float> &cpu) {
    double num = 0.0, den = 0.0;
    for (size_t i = 0; i < cpu.size(); ++i) {
        if (!std::isfinite(gpu[i])) return INFINITY;
        num = std::max(num, (double)std::fabs(gpu[i] - cpu[i]));
        den = std::max(den, (double)std::fabs(cpu[i]));
    }
    return den > 0.0 ? num / den : num;
}

// multiples of 1/64 in [-lo, lo]
std::vector<float> dyadic(size_t n, uint32_t seed, int lo) {
    std::mt19937 rng(seed);
    std::vector<float> v(n);
    for (auto &a : v) a = (float)((int)(rng() % (2 * lo + 1)) - lo) / 64.0f;
    return v;
}

struct Side {
    moe_context_t *ctx = nullptr;
    moe_layer_t *layer = nullptr;
    ~Side() {
        moe_layer_destroy(layer);
        moe_context_destroy(ctx);
    }
};

struct Out {
    std::vector<float> y, dx, gate;
    std::vector<int32_t> idx, kept;
    std::vector<int64_t> counts;
    std::vector<float> grad[MOE_PARAM_COUNT];
    moe_routing_stats_t st{};
};

struct HierCase {
    const char *name;
    int64_t T, E, G, k1, k2;
    moe_gate_t gate;
    int renorm;
    double capacity;
    moe_priority_t prio;
};

class CudaHier : public ::testing::TestWithParam<HierCase> {};

TEST_P(CudaHier, MatchesCpuBackend) {
    REQUIRE_GPU();
    const HierCase &c = GetParam();
    const int64_t D = 32, F = 48, T = c.T, K = c.k1 * c.k2;
    moe_layer_config_t cfg = moe_layer_config_default();
    cfg.d_model = D;
    cfg.d_ff = F;
    cfg.num_experts = c.E;
    cfg.top_k = K;
    cfg.router = MOE_ROUTER_HIERARCHICAL;
    cfg.num_groups = c.G;
    cfg.topk_group = c.k1;
    cfg.gate = c.gate;
    cfg.renormalize = c.renorm;
    cfg.capacity_factor = c.capacity;
    cfg.priority = c.prio;
    cfg.activation = MOE_ACTIVATION_SILU;
    cfg.switch_loss_coef = 0.05;
    cfg.importance_loss_coef = 0.04;
    cfg.load_loss_coef = 0.03;
    cfg.z_loss_coef = 0.002;
    Side cpu, gpu;
    CK(moe_context_create(&cpu.ctx, MOE_BACKEND_CPU, 0, nullptr));
    CK(moe_layer_create(&cpu.layer, cpu.ctx, &cfg));
    CK(moe_context_create(&gpu.ctx, MOE_BACKEND_CUDA, 0, nullptr));
    CK(moe_layer_create(&gpu.layer, gpu.ctx, &cfg));
    // dyadic router weights (exact logits), then every parameter of the CPU layer to the GPU
    for (int p : {(int)MOE_PARAM_ROUTER_WEIGHT, (int)MOE_PARAM_SECONDARY_ROUTER_WEIGHT}) {
        void *v = nullptr;
        int64_t n = 0;
        CK(moe_layer_param(cpu.layer, (moe_param_t)p, &v, nullptr, &n));
        std::vector<float> w = dyadic((size_t)n, 100 + p, 48);
        std::copy(w.begin(), w.end(), (float *)v);
    }
    for (int p = 0; p < MOE_PARAM_COUNT; ++p) {
        void *hv = nullptr, *dv = nullptr;
        int64_t n = 0, m = 0;
        CK(moe_layer_param(cpu.layer, (moe_param_t)p, &hv, nullptr, &n));
        CK(moe_layer_param(gpu.layer, (moe_param_t)p, &dv, nullptr, &m));
        ASSERT_EQ(n, m) << "param " << p;
        if (n) {
            ASSERT_EQ(cudaMemcpy(dv, hv, (size_t)n * 4, cudaMemcpyHostToDevice), cudaSuccess);
        }
    }
    std::vector<float> x = dyadic((size_t)(T * D), 7, 32), dy = dyadic((size_t)(T * D), 8, 64);
    float *xd = nullptr, *yd = nullptr, *dyd = nullptr, *dxd = nullptr;
    const size_t bytes = (size_t)(T * D) * 4;
    ASSERT_EQ(cudaMalloc((void **)&xd, bytes), cudaSuccess);
    ASSERT_EQ(cudaMalloc((void **)&yd, bytes), cudaSuccess);
    ASSERT_EQ(cudaMalloc((void **)&dyd, bytes), cudaSuccess);
    ASSERT_EQ(cudaMalloc((void **)&dxd, bytes), cudaSuccess);
    cudaMemcpy(xd, x.data(), bytes, cudaMemcpyHostToDevice);
    cudaMemcpy(dyd, dy.data(), bytes, cudaMemcpyHostToDevice);

    Out o[2];
    for (int side = 0; side < 2; ++side) {
        moe_layer_t *l = side ? gpu.layer : cpu.layer;
        Out &r = o[side];
        r.y.assign(T * D, 0.0f);
        r.dx.assign(T * D, 0.0f);
        if (side) {
            CK(moe_layer_forward(l, xd, yd, T, 1, nullptr));
            CK(moe_layer_backward(l, dyd, dxd, nullptr));
            ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
            cudaMemcpy(r.y.data(), yd, bytes, cudaMemcpyDeviceToHost);
            cudaMemcpy(r.dx.data(), dxd, bytes, cudaMemcpyDeviceToHost);
        } else {
            CK(moe_layer_forward(l, x.data(), r.y.data(), T, 1, nullptr));
            CK(moe_layer_backward(l, dy.data(), r.dx.data(), nullptr));
        }
        r.idx.assign(T * K, -1);
        r.kept.assign(T * K, -1);
        r.gate.assign(T * K, NAN);
        r.counts.assign(c.E, -1);
        CK(moe_layer_routing(l, r.idx.data(), r.gate.data(), r.kept.data()));
        CK(moe_layer_stats(l, &r.st, r.counts.data(), nullptr));
        for (int p = 0; p < MOE_PARAM_COUNT; ++p) {
            void *g = nullptr;
            int64_t n = 0;
            CK(moe_layer_param(l, (moe_param_t)p, nullptr, &g, &n));
            r.grad[p].assign((size_t)n, 0.0f);
            if (!n) continue;
            if (side)
                cudaMemcpy(r.grad[p].data(), g, (size_t)n * 4, cudaMemcpyDeviceToHost);
            else
                std::copy((float *)g, (float *)g + n, r.grad[p].begin());
        }
    }
    cudaFree(xd), cudaFree(yd), cudaFree(dyd), cudaFree(dxd);
    const Out &C = o[0], &Gp = o[1];
    EXPECT_EQ(Gp.idx, C.idx);
    EXPECT_EQ(Gp.kept, C.kept);
    EXPECT_EQ(Gp.counts, C.counts);
    EXPECT_LE(rel_err(Gp.gate, C.gate), 1e-5);
    EXPECT_LE(rel_err(Gp.y, C.y), 1e-5);
    EXPECT_LE(rel_err(Gp.dx, C.dx), 1e-5);
    for (int p = 0; p < MOE_PARAM_COUNT; ++p)
        EXPECT_LE(rel_err(Gp.grad[p], C.grad[p]), 1e-5) << "gradient of param " << p;
    EXPECT_GT(std::fabs(C.grad[MOE_PARAM_SECONDARY_ROUTER_WEIGHT][0]) +
                  std::fabs(C.grad[MOE_PARAM_ROUTER_WEIGHT][0]),
              0.0f);
    auto near = [](double a, double b) { return std::fabs(a - b) <= 1e-6 * std::max(1.0, std::fabs(b)); };
    for (int l = 0; l < 2; ++l) {
        EXPECT_TRUE(near(Gp.st.level_switch_loss[l], C.st.level_switch_loss[l])) << l;
        EXPECT_TRUE(near(Gp.st.level_importance_loss[l], C.st.level_importance_loss[l])) << l;
        EXPECT_TRUE(near(Gp.st.level_load_loss[l], C.st.level_load_loss[l])) << l;
        EXPECT_TRUE(near(Gp.st.level_z_loss[l], C.st.level_z_loss[l])) << l;
    }
    EXPECT_TRUE(near(Gp.st.aux_loss, C.st.aux_loss));
    EXPECT_EQ(Gp.st.num_dropped, C.st.num_dropped);
}

INSTANTIATE_TEST_SUITE_P(
    Grid, CudaHier,
    ::testing::Values(
        HierCase{"g4_k2x2_sotk", 300, 16, 4, 2, 2, MOE_GATE_SOFTMAX_OF_TOPK, 1, 0.0,
                 MOE_PRIORITY_POSITION},
        HierCase{"g8_k3x2_tkos_cap", 700, 64, 8, 3, 2, MOE_GATE_TOPK_OF_SOFTMAX, 0, 1.0,
                 MOE_PRIORITY_SCORE},
        HierCase{"g1_k1x4_tkosR", 129, 12, 1, 1, 4, MOE_GATE_TOPK_OF_SOFTMAX, 1, 0.5,
                 MOE_PRIORITY_POSITION},
        HierCase{"g16_k4x1_e16", 513, 16, 16, 4, 1, MOE_GATE_SOFTMAX_OF_TOPK, 1, 0.0,
                 MOE_PRIORITY_POSITION}),
    [](const ::testing::TestParamInfo<HierCase> &i) { return std::string(i.param.name); });

// 16-bit storage is refused on the CUDA backend for hierarchical routing, naming the field
TEST(CudaHierConfig, SixteenBitIsNotSupported) {
    REQUIRE_GPU();
    moe_layer_config_t cfg = moe_layer_config_default();
    cfg.d_model = 16, cfg.d_ff = 16, cfg.num_experts = 8, cfg.top_k = 2;
    cfg.router = MOE_ROUTER_HIERARCHICAL;
    cfg.num_groups = 4, cfg.topk_group = 2;
    cfg.dtype = MOE_DTYPE_BF16;
    Side s;
    CK(moe_context_create(&s.ctx, MOE_BACKEND_CUDA, 0, nullptr));
    EXPECT_EQ(moe_layer_create(&s.layer, s.ctx, &cfg), MOE_STATUS_NOT_SUPPORTED);
    EXPECT_NE(std::string(moe_last_error()).find("dtype"), std::string::npos);
}

}  // namespace
