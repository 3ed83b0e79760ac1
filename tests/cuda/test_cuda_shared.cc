// test_cuda_shared.cc - the CUDA shared experts against the CPU backend: a CPU and a CUDA layer
// with the same parameters (the CPU layer's, copied to the device) and the same x; y, dx and
// every parameter gradient compared by max-norm relative error. The router weights and x are
// small dyadic numbers, so the logits (and the chosen experts) agree exactly; the rest are f32
// sums of at most a few hundred terms, whose order differs between cuBLAS and OpenBLAS: 1e-5
// (as test_cuda_layer.cc) for f32 storage, 2e-2 for bf16 (x.W1, act, y and the gradients are
// rounded to 8 mantissa bits between stages, a few roundings deep).
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
    int64_t T, D, F, E, K, S, Fs;
    moe_activation_t act;
    int bias, gated;
    moe_dtype_t dtype;
    double tol;
};

void PrintTo(const Case &c, std::ostream *os) { *os << c.name; }

const Case kCases[] = {
    {"qwen2_moe_f32", 301, 20, 12, 8, 4, 1, 48, MOE_ACTIVATION_SWIGLU, 0, 1, MOE_DTYPE_F32, 1e-5},
    {"deepseek_2_shared_f32", 257, 16, 8, 16, 4, 2, 0, MOE_ACTIVATION_SWIGLU, 0, 0, MOE_DTYPE_F32,
     1e-5},
    {"gelu_bias_3_gated_f32", 37, 13, 9, 4, 2, 3, 7, MOE_ACTIVATION_GELU, 1, 1, MOE_DTYPE_F32,
     1e-5},
    {"qwen2_moe_bf16", 129, 24, 16, 8, 2, 1, 32, MOE_ACTIVATION_SWIGLU, 0, 1, MOE_DTYPE_BF16,
     2e-2},
};

// bf16 of an f32 (round to nearest even) and back: the CPU layer gets the GPU layer's values
float bf16_round(float f) {
    uint32_t u;
    std::memcpy(&u, &f, 4);
    u = (u + 0x7FFFu + ((u >> 16) & 1u)) & 0xFFFF0000u;
    std::memcpy(&f, &u, 4);
    return f;
}

void to_storage(const std::vector<float> &v, moe_dtype_t dt, std::vector<uint16_t> *out) {
    out->resize(v.size());
    for (size_t i = 0; i < v.size(); ++i) {
        uint32_t u;
        float f = bf16_round(v[i]);
        std::memcpy(&u, &f, 4);
        (*out)[i] = (uint16_t)(u >> 16);
    }
    (void)dt;
}

std::vector<float> from_device(const void *p, size_t n, moe_dtype_t dt) {
    std::vector<float> v(n);
    if (!n) return v;
    if (dt == MOE_DTYPE_F32) {
        EXPECT_EQ(cudaMemcpy(v.data(), p, n * 4, cudaMemcpyDeviceToHost), cudaSuccess);
        return v;
    }
    std::vector<uint16_t> h(n);
    EXPECT_EQ(cudaMemcpy(h.data(), p, n * 2, cudaMemcpyDeviceToHost), cudaSuccess);
    for (size_t i = 0; i < n; ++i) {
        uint32_t u = (uint32_t)h[i] << 16;
        std::memcpy(&v[i], &u, 4);
    }
    return v;
}

void *to_device(const std::vector<float> &v, moe_dtype_t dt, void *dst) {
    if (dt == MOE_DTYPE_F32) {
        EXPECT_EQ(cudaMemcpy(dst, v.data(), v.size() * 4, cudaMemcpyHostToDevice), cudaSuccess);
    } else {
        std::vector<uint16_t> h;
        to_storage(v, dt, &h);
        EXPECT_EQ(cudaMemcpy(dst, h.data(), h.size() * 2, cudaMemcpyHostToDevice), cudaSuccess);
    }
    return dst;
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

std::vector<float> dyadic(size_t n, int lim, float den, std::mt19937 &rng) {
    std::uniform_int_distribution<int> u(-lim, lim);
    std::vector<float> v(n);
    for (auto &x : v) x = (float)u(rng) / den;
    return v;
}

class CudaShared : public testing::TestWithParam<Case> {};

TEST_P(CudaShared, MatchesCpuBackend) {
    REQUIRE_GPU();
    const Case c = GetParam();
    moe_layer_config_t cfg = moe_layer_config_default();
    cfg.d_model = c.D, cfg.d_ff = c.F, cfg.num_experts = c.E, cfg.top_k = c.K;
    cfg.activation = c.act, cfg.expert_bias = c.bias;
    cfg.gate = MOE_GATE_TOPK_OF_SOFTMAX, cfg.renormalize = 0;
    cfg.num_shared_experts = c.S, cfg.shared_d_ff = c.Fs, cfg.shared_expert_gate = c.gated;
    cfg.switch_loss_coef = 0.01;
    cfg.seed = 91;
    moe_layer_config_t gcfg = cfg;
    gcfg.dtype = c.dtype;
    moe_context_t *cpu = nullptr, *gpu = nullptr;
    moe_layer_t *lc = nullptr, *lg = nullptr;
    CK(moe_context_create(&cpu, MOE_BACKEND_CPU, 0, nullptr));
    CK(moe_context_create(&gpu, MOE_BACKEND_CUDA, 0, nullptr));
    CK(moe_layer_create(&lc, cpu, &cfg));
    CK(moe_layer_create(&lg, gpu, &gcfg));
    std::mt19937 rng(5);
    // the same parameters on both: the CPU layer's (rounded to the GPU dtype), the router dyadic
    for (int w = 0; w < MOE_PARAM_COUNT; ++w) {
        void *vc = nullptr, *vg = nullptr;
        int64_t n = 0, ng = 0;
        CK(moe_layer_param(lc, (moe_param_t)w, &vc, nullptr, &n));
        CK(moe_layer_param(lg, (moe_param_t)w, &vg, nullptr, &ng));
        ASSERT_EQ(n, ng) << "param " << w;
        if (!n) continue;
        float *f = (float *)vc;
        if (w == MOE_PARAM_ROUTER_WEIGHT) {
            auto v = dyadic((size_t)n, 64, 256.0f, rng);
            std::memcpy(f, v.data(), (size_t)n * 4);
        }
        if (w == MOE_PARAM_SHARED_GATE)  // a gate far from 1/2 on some tokens
            for (int64_t i = 0; i < n; ++i) f[i] *= 8.0f;
        if (c.dtype != MOE_DTYPE_F32)
            for (int64_t i = 0; i < n; ++i) f[i] = bf16_round(f[i]);
        to_device(std::vector<float>(f, f + n), c.dtype, vg);
    }
    const size_t TD = (size_t)(c.T * c.D), esz = c.dtype == MOE_DTYPE_F32 ? 4 : 2;
    std::vector<float> x = dyadic(TD, 64, 64.0f, rng), dy = dyadic(TD, 100, 128.0f, rng);
    std::vector<float> yc(TD), dxc(TD);
    void *xg = nullptr, *yg = nullptr, *dyg = nullptr, *dxg = nullptr;
    ASSERT_EQ(cudaMalloc(&xg, TD * esz), cudaSuccess);
    ASSERT_EQ(cudaMalloc(&yg, TD * esz), cudaSuccess);
    ASSERT_EQ(cudaMalloc(&dyg, TD * esz), cudaSuccess);
    ASSERT_EQ(cudaMalloc(&dxg, TD * esz), cudaSuccess);
    to_device(x, c.dtype, xg);
    to_device(dy, c.dtype, dyg);
    CK(moe_layer_forward(lc, x.data(), yc.data(), c.T, 1, nullptr));
    CK(moe_layer_forward(lg, xg, yg, c.T, 1, nullptr));
    CK(moe_layer_backward(lc, dy.data(), dxc.data(), nullptr));
    CK(moe_layer_backward(lg, dyg, dxg, nullptr));
    ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
    EXPECT_LE(rel_err(from_device(yg, TD, c.dtype), yc), c.tol) << "y";
    EXPECT_LE(rel_err(from_device(dxg, TD, c.dtype), dxc), c.tol) << "dx";
    for (int w = 0; w < MOE_PARAM_COUNT; ++w) {
        void *gc = nullptr, *gg = nullptr;
        int64_t n = 0;
        CK(moe_layer_param(lc, (moe_param_t)w, nullptr, &gc, &n));
        CK(moe_layer_param(lg, (moe_param_t)w, nullptr, &gg, nullptr));
        if (!n) continue;
        std::vector<float> g((float *)gc, (float *)gc + n);
        EXPECT_LE(rel_err(from_device(gg, (size_t)n, c.dtype), g), c.tol) << "grad of param " << w;
    }
    cudaFree(xg), cudaFree(yg), cudaFree(dyg), cudaFree(dxg);
    moe_layer_destroy(lc), moe_layer_destroy(lg);
    moe_context_destroy(cpu), moe_context_destroy(gpu);
}

INSTANTIATE_TEST_SUITE_P(Shapes, CudaShared, testing::ValuesIn(kCases),
                         [](const testing::TestParamInfo<Case> &i) {
                             return std::string(i.param.name);
                         });

}  // namespace
