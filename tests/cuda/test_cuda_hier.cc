// test_cuda_hier.cc - hierarchical gating (router MOE_ROUTER_HIERARCHICAL) on the CUDA backend
// against the CPU backend: the same config and parameters (the CPU layer's, copied to the
// device), the same x, forward and backward, every output compared.
//
// x and both routers' weights are small dyadic numbers, so the logits of both levels are exact
// in f32 whatever the summation order: the chosen groups and experts, kept flags and counts must
// agree exactly. Float tensors are compared by max-norm relative error against 1e-5 for f32
// storage (a few ulps after sums of a few hundred terms; libm and CUDA's expf differ by up to
// 2 ulp), the losses of both levels against 1e-6 relative (f64 sums of f32 terms). With bf16 /
// f16 storage the CPU layer gets the same 16-bit values widened to f32 (the dyadic values are
// exact in both), and tensors are compared against 1e-2, as in test_cuda_layer.cc: the GPU
// rounds the expert rows and the gradients to 8 or 11 mantissa bits between stages.
#include <gtest/gtest.h>

#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <random>
#include <vector>

#include "core/dtype.h"
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

// n f32 values to device storage of dtype, and back
std::vector<uint16_t> to16(const float *v, size_t n, moe_dtype_t dt) {
    std::vector<uint16_t> h(n);
    for (size_t i = 0; i < n; ++i)
        h[i] = dt == MOE_DTYPE_BF16 ? moe_f32_to_bf16(v[i]) : moe_f32_to_f16(v[i]);
    return h;
}

float from16(uint16_t h, moe_dtype_t dt) {
    return dt == MOE_DTYPE_BF16 ? moe_bf16_to_f32(h) : moe_f16_to_f32(h);
}

void upload(void *dev, const float *v, size_t n, moe_dtype_t dt) {
    if (dt == MOE_DTYPE_F32) {
        EXPECT_EQ(cudaMemcpy(dev, v, n * 4, cudaMemcpyHostToDevice), cudaSuccess);
        return;
    }
    std::vector<uint16_t> h = to16(v, n, dt);
    EXPECT_EQ(cudaMemcpy(dev, h.data(), n * 2, cudaMemcpyHostToDevice), cudaSuccess);
}

std::vector<float> download(const void *dev, size_t n, moe_dtype_t dt) {
    std::vector<float> v(n);
    if (dt == MOE_DTYPE_F32) {
        EXPECT_EQ(cudaMemcpy(v.data(), dev, n * 4, cudaMemcpyDeviceToHost), cudaSuccess);
        return v;
    }
    std::vector<uint16_t> h(n);
    EXPECT_EQ(cudaMemcpy(h.data(), dev, n * 2, cudaMemcpyDeviceToHost), cudaSuccess);
    for (size_t i = 0; i < n; ++i) v[i] = from16(h[i], dt);
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
    moe_dtype_t dtype;
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
    const moe_dtype_t dt = c.dtype;
    const double tol = dt == MOE_DTYPE_F32 ? 1e-5 : 1e-2;
    Side cpu, gpu;
    CK(moe_context_create(&cpu.ctx, MOE_BACKEND_CPU, 0, nullptr));
    CK(moe_layer_create(&cpu.layer, cpu.ctx, &cfg));
    moe_layer_config_t gcfg = cfg;
    gcfg.dtype = dt;
    CK(moe_context_create(&gpu.ctx, MOE_BACKEND_CUDA, 0, nullptr));
    CK(moe_layer_create(&gpu.layer, gpu.ctx, &gcfg));
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
        if (!n) continue;
        float *h = (float *)hv;
        if (dt != MOE_DTYPE_F32) /* the CPU layer gets the 16-bit values */
            for (int64_t i = 0; i < n; ++i) h[i] = from16(to16(h + i, 1, dt)[0], dt);
        upload(dv, h, (size_t)n, dt);
    }
    std::vector<float> x = dyadic((size_t)(T * D), 7, 32), dy = dyadic((size_t)(T * D), 8, 64);
    float *xd = nullptr, *yd = nullptr, *dyd = nullptr, *dxd = nullptr;
    const size_t bytes = (size_t)(T * D) * moe_dtype_size(dt);
    ASSERT_EQ(cudaMalloc((void **)&xd, bytes), cudaSuccess);
    ASSERT_EQ(cudaMalloc((void **)&yd, bytes), cudaSuccess);
    ASSERT_EQ(cudaMalloc((void **)&dyd, bytes), cudaSuccess);
    ASSERT_EQ(cudaMalloc((void **)&dxd, bytes), cudaSuccess);
    upload(xd, x.data(), x.size(), dt);
    upload(dyd, dy.data(), dy.size(), dt);

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
            r.y = download(yd, (size_t)(T * D), dt);
            r.dx = download(dxd, (size_t)(T * D), dt);
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
                r.grad[p] = download(g, (size_t)n, dt);
            else
                std::copy((float *)g, (float *)g + n, r.grad[p].begin());
        }
    }
    cudaFree(xd), cudaFree(yd), cudaFree(dyd), cudaFree(dxd);
    const Out &C = o[0], &Gp = o[1];
    EXPECT_EQ(Gp.idx, C.idx);
    EXPECT_EQ(Gp.kept, C.kept);
    EXPECT_EQ(Gp.counts, C.counts);
    EXPECT_LE(rel_err(Gp.gate, C.gate), 1e-5);  // the routers run in f32 on equal values
    EXPECT_LE(rel_err(Gp.y, C.y), tol);
    EXPECT_LE(rel_err(Gp.dx, C.dx), tol);
    for (int p = 0; p < MOE_PARAM_COUNT; ++p)
        EXPECT_LE(rel_err(Gp.grad[p], C.grad[p]), tol) << "gradient of param " << p;
    EXPECT_GT(std::fabs(C.grad[MOE_PARAM_SECONDARY_ROUTER_WEIGHT][0]) +
                  std::fabs(C.grad[MOE_PARAM_ROUTER_WEIGHT][0]),
              0.0f);
    auto near = [](double a, double b) {
        return std::fabs(a - b) <= 1e-6 * std::max(1.0, std::fabs(b));
    };
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
                 MOE_PRIORITY_POSITION, MOE_DTYPE_F32},
        HierCase{"g8_k3x2_tkos_cap", 700, 64, 8, 3, 2, MOE_GATE_TOPK_OF_SOFTMAX, 0, 1.0,
                 MOE_PRIORITY_SCORE, MOE_DTYPE_F32},
        HierCase{"g1_k1x4_tkosR", 129, 12, 1, 1, 4, MOE_GATE_TOPK_OF_SOFTMAX, 1, 0.5,
                 MOE_PRIORITY_POSITION, MOE_DTYPE_F32},
        HierCase{"g16_k4x1_e16", 513, 16, 16, 4, 1, MOE_GATE_SOFTMAX_OF_TOPK, 1, 0.0,
                 MOE_PRIORITY_POSITION, MOE_DTYPE_F32},
        HierCase{"g4_k2x2_bf16", 300, 16, 4, 2, 2, MOE_GATE_SOFTMAX_OF_TOPK, 1, 0.0,
                 MOE_PRIORITY_POSITION, MOE_DTYPE_BF16},
        HierCase{"g8_k2x2_f16_cap", 400, 32, 8, 2, 2, MOE_GATE_TOPK_OF_SOFTMAX, 1, 1.0,
                 MOE_PRIORITY_SCORE, MOE_DTYPE_F16}),
    [](const ::testing::TestParamInfo<HierCase> &i) { return std::string(i.param.name); });

}  // namespace
