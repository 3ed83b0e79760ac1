// test_cuda_expert_outputs.cc - per-expert outputs (moe_layer_forward_experts /
// moe_layer_backward_experts) on the CUDA backend against the CPU backend: the same parameters,
// a dyadic router and x (equal logits, so the same routing and drops on both), then y_experts,
// gate, dx and every parameter gradient by max-norm relative error against 1e-5 (f32 storage:
// the rows are copies, the rest are the expert GEMMs of test_cuda_layer.cc's bound).
#include <gtest/gtest.h>

#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "gpu_test.h"
#include "moe/moe.h"

namespace {

#define CK(call) ASSERT_EQ((call), MOE_STATUS_SUCCESS) << #call << ": " << moe_last_error()

struct Case {
    const char *name;
    int64_t T, D, F, E, K;
    double capacity;
    moe_router_type_t router;
};

void PrintTo(const Case &c, std::ostream *os) { *os << c.name; }

const Case kCases[] = {
    {"k2_e8_dropless", 301, 20, 24, 8, 2, 0.0, MOE_ROUTER_TOKEN_CHOICE},
    {"k2_e4_capacity_drops", 257, 16, 8, 4, 2, 0.6, MOE_ROUTER_TOKEN_CHOICE},
    {"softmax_over_all_4", 129, 12, 9, 4, 4, 0.0, MOE_ROUTER_TOKEN_CHOICE},
    {"expert_choice_e8", 200, 16, 12, 8, 2, 1.0, MOE_ROUTER_EXPERT_CHOICE},
};

std::vector<float> dyadic(size_t n, int lim, float den, std::mt19937 &rng) {
    std::uniform_int_distribution<int> u(-lim, lim);
    std::vector<float> v(n);
    for (auto &x : v) x = (float)u(rng) / den;
    return v;
}

double rel_err(const std::vector<float> &gpu, const std::vector<float> &cpu) {
    double num = 0.0, den = 0.0;
    for (size_t i = 0; i < cpu.size(); ++i) {
        if (!std::isfinite(gpu[i])) return INFINITY;
        num = std::max(num, (double)std::fabs(gpu[i] - cpu[i]));
        den = std::max(den, (double)std::fabs(cpu[i]));
    }
    return den > 0.0 ? num / den : num;
}

std::vector<float> d2h(const void *p, size_t n) {
    std::vector<float> v(n);
    if (n) {
        EXPECT_EQ(cudaMemcpy(v.data(), p, n * 4, cudaMemcpyDeviceToHost), cudaSuccess);
    }
    return v;
}

void *h2d(const std::vector<float> &v) {
    void *p = nullptr;
    EXPECT_EQ(cudaMalloc(&p, v.size() * 4 + 4), cudaSuccess);
    EXPECT_EQ(cudaMemcpy(p, v.data(), v.size() * 4, cudaMemcpyHostToDevice), cudaSuccess);
    return p;
}

class CudaExpertOutputs : public testing::TestWithParam<Case> {};

TEST_P(CudaExpertOutputs, MatchCpuBackend) {
    REQUIRE_GPU();
    const Case c = GetParam();
    moe_layer_config_t cfg = moe_layer_config_default();
    cfg.d_model = c.D, cfg.d_ff = c.F, cfg.num_experts = c.E, cfg.top_k = c.K;
    cfg.gate = MOE_GATE_TOPK_OF_SOFTMAX, cfg.renormalize = 0;
    cfg.capacity_factor = c.capacity, cfg.router = c.router;
    cfg.switch_loss_coef = 0.01, cfg.z_loss_coef = 0.001;
    cfg.seed = 17;
    moe_context_t *cpu = nullptr, *gpu = nullptr;
    moe_layer_t *lc = nullptr, *lg = nullptr;
    CK(moe_context_create(&cpu, MOE_BACKEND_CPU, 0, nullptr));
    CK(moe_context_create(&gpu, MOE_BACKEND_CUDA, 0, nullptr));
    CK(moe_layer_create(&lc, cpu, &cfg));
    CK(moe_layer_create(&lg, gpu, &cfg));
    std::mt19937 rng(3);
    for (int w = 0; w < MOE_PARAM_COUNT; ++w) {
        void *vc = nullptr, *vg = nullptr;
        int64_t n = 0;
        CK(moe_layer_param(lc, (moe_param_t)w, &vc, nullptr, &n));
        CK(moe_layer_param(lg, (moe_param_t)w, &vg, nullptr, nullptr));
        if (!n) continue;
        if (w == MOE_PARAM_ROUTER_WEIGHT) {
            auto v = dyadic((size_t)n, 64, 256.0f, rng);
            std::memcpy(vc, v.data(), (size_t)n * 4);
        }
        ASSERT_EQ(cudaMemcpy(vg, vc, (size_t)n * 4, cudaMemcpyHostToDevice), cudaSuccess);
    }
    const int64_t W = moe_layer_routing_width(lc), T = c.T, D = c.D;
    ASSERT_EQ(W, moe_layer_routing_width(lg));
    auto x = dyadic((size_t)(T * D), 64, 64.0f, rng);
    auto dye = dyadic((size_t)(T * W * D), 100, 128.0f, rng);
    auto dge = dyadic((size_t)(T * W), 100, 128.0f, rng);
    std::vector<float> ye(T * W * D), ge(T * W), dx(T * D);
    void *xg = h2d(x), *dyeg = h2d(dye), *dgeg = h2d(dge);
    void *yeg = h2d(ye), *geg = h2d(ge), *dxg = h2d(dx);
    CK(moe_layer_forward_experts(lc, x.data(), ye.data(), ge.data(), T, 1, nullptr));
    CK(moe_layer_forward_experts(lg, xg, yeg, (float *)geg, T, 1, nullptr));
    CK(moe_layer_backward_experts(lc, dye.data(), dge.data(), dx.data(), nullptr));
    CK(moe_layer_backward_experts(lg, dyeg, (const float *)dgeg, dxg, nullptr));
    ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
    std::vector<int32_t> kc(T * W), kg(T * W);
    CK(moe_layer_routing(lc, nullptr, nullptr, kc.data()));
    CK(moe_layer_routing(lg, nullptr, nullptr, kg.data()));
    EXPECT_EQ(kc, kg) << "kept flags";
    EXPECT_LE(rel_err(d2h(yeg, ye.size()), ye), 1e-5) << "y_experts";
    EXPECT_LE(rel_err(d2h(geg, ge.size()), ge), 1e-5) << "gate";
    EXPECT_LE(rel_err(d2h(dxg, dx.size()), dx), 1e-5) << "dx";
    for (int w = 0; w < MOE_PARAM_COUNT; ++w) {
        void *gc = nullptr, *gg = nullptr;
        int64_t n = 0;
        CK(moe_layer_param(lc, (moe_param_t)w, nullptr, &gc, &n));
        CK(moe_layer_param(lg, (moe_param_t)w, nullptr, &gg, nullptr));
        if (!n) continue;
        std::vector<float> g((float *)gc, (float *)gc + n);
        EXPECT_LE(rel_err(d2h(gg, (size_t)n), g), 1e-5) << "grad of param " << w;
    }
    for (void *p : {xg, dyeg, dgeg, yeg, geg, dxg}) cudaFree(p);
    moe_layer_destroy(lc), moe_layer_destroy(lg);
    moe_context_destroy(cpu), moe_context_destroy(gpu);
}

INSTANTIATE_TEST_SUITE_P(Cases, CudaExpertOutputs, testing::ValuesIn(kCases),
                         [](const testing::TestParamInfo<Case> &i) {
                             return std::string(i.param.name);
                         });

}  // namespace
