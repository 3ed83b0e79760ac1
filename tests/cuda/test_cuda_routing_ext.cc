// test_cuda_routing_ext.cc - the routing extensions on the CUDA backend against the CPU backend:
// sigmoid scores with a selection bias, the routed scaling factor, group-limited gating, expert
// masks and dropout, and E = 4096 / K = 32 (the per-thread gate kernel, which has no
// compile-time bound on E or K). Every test skips where no GPU is present.
//
// x, the router weights and the bias are dyadic, so the logits are exact in f32 on both sides:
// the selections must agree exactly; floats are compared by max-norm relative error against
// 1e-5 (f32 sums of a few hundred terms; CUDA's expf and libm's differ by up to 2 ulp).
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
#define CU(call) ASSERT_EQ((call), cudaSuccess) << #call

double rel_err(const std::vector<float> &gpu, const std::vector<float> &cpu) {
    double num = 0.0, den = 0.0;
    for (size_t i = 0; i < cpu.size(); ++i) {
        if (!std::isfinite(gpu[i])) return INFINITY;
        num = std::max(num, (double)std::fabs(gpu[i] - cpu[i]));
        den = std::max(den, (double)std::fabs(cpu[i]));
    }
    return den > 0.0 ? num / den : num;
}

std::vector<float> dyadic(size_t n, int lim, float den, std::mt19937 &rng) {
    std::uniform_int_distribution<int> u(-lim, lim);
    std::vector<float> v(n);
    for (auto &x : v) x = (float)u(rng) / den;
    return v;
}

struct ExtCase {
    const char *name;
    int64_t T, E, K;
    moe_score_func_t score;
    double scale;
    int64_t G, topk_group;
    moe_group_score_t gscore;
    moe_gate_t gate;
    int renorm, bias, mask;
    double dropout;
};

void PrintTo(const ExtCase &c, std::ostream *os) { *os << c.name; }

const ExtCase kCases[] = {
    {"sigmoid_bias_scaled", 100, 16, 4, MOE_SCORE_SIGMOID, 2.5, 0, 0, MOE_GROUP_SCORE_TOP2_SUM,
     MOE_GATE_SOFTMAX_OF_TOPK, 1, 1, 0, 0.0},
    {"deepseek_v3_shaped", 300, 64, 8, MOE_SCORE_SIGMOID, 2.5, 8, 4, MOE_GROUP_SCORE_TOP2_SUM,
     MOE_GATE_SOFTMAX_OF_TOPK, 1, 1, 0, 0.0},
    {"groups_max_softmax_raw", 200, 32, 3, MOE_SCORE_SOFTMAX, 1.0, 4, 2, MOE_GROUP_SCORE_MAX,
     MOE_GATE_TOPK_OF_SOFTMAX, 0, 0, 0, 0.0},
    {"mask_dropout", 200, 32, 4, MOE_SCORE_SOFTMAX, 1.0, 0, 0, MOE_GROUP_SCORE_TOP2_SUM,
     MOE_GATE_TOPK_OF_SOFTMAX, 1, 0, 1, 0.5},
    {"E4096_K32", 64, 4096, 32, MOE_SCORE_SOFTMAX, 1.0, 0, 0, MOE_GROUP_SCORE_TOP2_SUM,
     MOE_GATE_TOPK_OF_SOFTMAX, 1, 0, 0, 0.0},
    {"E4096_K32_sigmoid_groups_mask", 64, 4096, 32, MOE_SCORE_SIGMOID, 2.5, 64, 8,
     MOE_GROUP_SCORE_TOP2_SUM, MOE_GATE_SOFTMAX_OF_TOPK, 1, 1, 1, 0.3},
};

class CudaRoutingExt : public testing::TestWithParam<ExtCase> {};

TEST_P(CudaRoutingExt, MatchesCpuBackend) {
    REQUIRE_GPU();
    const ExtCase c = GetParam();
    const int64_t T = c.T, D = 16, F = 8, E = c.E, K = c.K;
    moe_layer_config_t cfg = moe_layer_config_default();
    cfg.d_model = D, cfg.d_ff = F, cfg.num_experts = E, cfg.top_k = K;
    cfg.activation = MOE_ACTIVATION_SWIGLU, cfg.expert_bias = 0;
    cfg.score_func = c.score, cfg.routed_scaling_factor = c.scale;
    cfg.num_groups = c.G, cfg.topk_group = c.topk_group, cfg.group_score = c.gscore;
    cfg.gate = c.gate, cfg.renormalize = c.renorm, cfg.expert_dropout = c.dropout;
    cfg.bias_update_rate = c.bias ? 1.0 / 1024 : 0.0;
    cfg.switch_loss_coef = 0.01, cfg.importance_loss_coef = 0.01, cfg.z_loss_coef = 0.001;
    moe_context_t *cpu = nullptr, *gpu = nullptr;
    moe_layer_t *lc = nullptr, *lg = nullptr;
    CK(moe_context_create(&cpu, MOE_BACKEND_CPU, 0, nullptr));
    CK(moe_context_create(&gpu, MOE_BACKEND_CUDA, 0, nullptr));
    CK(moe_layer_create(&lc, cpu, &cfg));
    CK(moe_layer_create(&lg, gpu, &cfg));
    std::mt19937 rng(7 + (unsigned)E);
    for (int w = 0; w < MOE_PARAM_COUNT; ++w) {
        void *vc = nullptr, *vg = nullptr;
        int64_t n = 0;
        CK(moe_layer_param(lc, (moe_param_t)w, &vc, nullptr, &n));
        CK(moe_layer_param(lg, (moe_param_t)w, &vg, nullptr, nullptr));
        if (!n) continue;
        if (w == MOE_PARAM_ROUTER_WEIGHT) {
            std::vector<float> v = dyadic((size_t)n, 64, 256.0f, rng);
            std::memcpy(vc, v.data(), (size_t)n * 4);
        }
        CU(cudaMemcpy(vg, vc, (size_t)n * 4, cudaMemcpyHostToDevice));
    }
    if (c.bias) {
        std::vector<float> b = dyadic((size_t)E, 32, 128.0f, rng);
        CK(moe_layer_set_score_bias(lc, b.data()));
        CK(moe_layer_set_score_bias(lg, b.data()));
    }
    if (c.mask) {
        std::vector<uint8_t> m((size_t)E, 1);
        for (int64_t e = 1; e < E; e += 7) m[(size_t)e] = 0;
        CK(moe_layer_set_expert_mask(lc, m.data()));
        CK(moe_layer_set_expert_mask(lg, m.data()));
    }
    std::vector<float> x = dyadic((size_t)(T * D), 8, 8.0f, rng), dy((size_t)(T * D));
    std::normal_distribution<float> nd(0.0f, 1.0f);
    for (auto &v : dy) v = nd(rng);
    std::vector<float> y((size_t)(T * D)), dx((size_t)(T * D)), yg(y.size()), dxg(y.size());
    float *xd, *yd, *dyd, *dxd;
    CU(cudaMalloc(&xd, x.size() * 4));
    CU(cudaMalloc(&yd, x.size() * 4));
    CU(cudaMalloc(&dyd, x.size() * 4));
    CU(cudaMalloc(&dxd, x.size() * 4));
    CU(cudaMemcpy(xd, x.data(), x.size() * 4, cudaMemcpyHostToDevice));
    CU(cudaMemcpy(dyd, dy.data(), dy.size() * 4, cudaMemcpyHostToDevice));
    for (int step = 0; step < 2; ++step) {  // the second draws fresh dropout, moves the bias
        SCOPED_TRACE("step " + std::to_string(step));
        CK(moe_layer_forward(lc, x.data(), y.data(), T, 1, nullptr));
        CK(moe_layer_forward(lg, xd, yd, T, 1, nullptr));
        CU(cudaDeviceSynchronize());
        std::vector<uint8_t> ac((size_t)E), ag((size_t)E);
        CK(moe_layer_expert_availability(lc, ac.data(), nullptr));
        CK(moe_layer_expert_availability(lg, ag.data(), nullptr));
        EXPECT_EQ(ag, ac) << "availability";
        std::vector<int32_t> ic(T * K), ig(T * K), kc(T * K), kg(T * K);
        std::vector<float> gc(T * K), gg(T * K);
        CK(moe_layer_routing(lc, ic.data(), gc.data(), kc.data()));
        CK(moe_layer_routing(lg, ig.data(), gg.data(), kg.data()));
        EXPECT_EQ(ig, ic) << "expert indices";
        EXPECT_EQ(kg, kc) << "kept";
        EXPECT_LE(rel_err(gg, gc), 1e-5) << "gates";
        for (int32_t e : ig) ASSERT_TRUE(ag[(size_t)e]) << "routed to unavailable " << e;
        moe_routing_stats_t sc, sg;
        std::vector<int64_t> tc((size_t)E), tg((size_t)E);
        CK(moe_layer_stats(lc, &sc, tc.data(), nullptr));
        CK(moe_layer_stats(lg, &sg, tg.data(), nullptr));
        EXPECT_EQ(tg, tc) << "tokens_per_expert";
        EXPECT_NEAR(sg.aux_loss, sc.aux_loss, 1e-5 * std::fabs(sc.aux_loss) + 1e-9);
        EXPECT_NEAR(sg.switch_loss, sc.switch_loss, 1e-5 * std::fabs(sc.switch_loss) + 1e-9);
        EXPECT_NEAR(sg.z_loss, sc.z_loss, 1e-5 * std::fabs(sc.z_loss) + 1e-9);
        CU(cudaMemcpy(yg.data(), yd, y.size() * 4, cudaMemcpyDeviceToHost));
        EXPECT_LE(rel_err(yg, y), 1e-5) << "y";
        CK(moe_layer_backward(lc, dy.data(), dx.data(), nullptr));
        CK(moe_layer_backward(lg, dyd, dxd, nullptr));
        CU(cudaDeviceSynchronize());
        CU(cudaMemcpy(dxg.data(), dxd, dx.size() * 4, cudaMemcpyDeviceToHost));
        EXPECT_LE(rel_err(dxg, dx), 1e-5) << "dx";
        for (int w = 0; w < MOE_PARAM_COUNT; ++w) {
            const std::string pn = "gradient of parameter " + std::to_string(w);
            void *gcp = nullptr, *ggp = nullptr;
            int64_t n = 0;
            CK(moe_layer_param(lc, (moe_param_t)w, nullptr, &gcp, &n));
            CK(moe_layer_param(lg, (moe_param_t)w, nullptr, &ggp, nullptr));
            if (!n) continue;
            std::vector<float> a((size_t)n), b((const float *)gcp, (const float *)gcp + n);
            CU(cudaMemcpy(a.data(), ggp, (size_t)n * 4, cudaMemcpyDeviceToHost));
            EXPECT_LE(rel_err(a, b), 1e-5) << pn;
        }
        if (HasFailure()) break;
    }
    cudaFree(xd), cudaFree(yd), cudaFree(dyd), cudaFree(dxd);
    moe_layer_destroy(lc), moe_layer_destroy(lg);
    moe_context_destroy(cpu), moe_context_destroy(gpu);
}

INSTANTIATE_TEST_SUITE_P(Ext, CudaRoutingExt, testing::ValuesIn(kCases),
                         [](const testing::TestParamInfo<ExtCase> &i) {
                             return std::string(i.param.name);
                         });

}  // namespace
