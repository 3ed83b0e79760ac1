// test_optim.cc - moe_optimizer_*: SGD / Adam / AdamW updates against hand-computed values and a
// float64 transcription of the formulas in moe.h, and every bad input.
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <vector>

#include "moe/moe.h"

namespace {

// a small layer with every parameter present (noise weights, biases)
struct Fixture {
    moe_context_t *ctx = nullptr;
    moe_layer_t *layer = nullptr;
    explicit Fixture(int noisy = 1, int bias = 1) {
        EXPECT_EQ(moe_context_create(&ctx, MOE_BACKEND_CPU, 0, nullptr), MOE_STATUS_SUCCESS);
        moe_layer_config_t cfg = moe_layer_config_default();
        cfg.d_model = 6;
        cfg.d_ff = 5;
        cfg.num_experts = 3;
        cfg.top_k = 2;
        cfg.noisy_gating = noisy;
        cfg.expert_bias = bias;
        EXPECT_EQ(moe_layer_create(&layer, ctx, &cfg), MOE_STATUS_SUCCESS) << moe_last_error();
    }
    ~Fixture() {
        EXPECT_EQ(moe_layer_destroy(layer), MOE_STATUS_SUCCESS);
        EXPECT_EQ(moe_context_destroy(ctx), MOE_STATUS_SUCCESS);
    }
    // every present parameter: value pointer, grad pointer, numel
    struct P { float *w, *g; int64_t n; };
    std::vector<P> params() {
        std::vector<P> v;
        for (int p = 0; p < MOE_PARAM_COUNT; ++p) {
            void *w = nullptr, *g = nullptr;
            int64_t n = 0;
            EXPECT_EQ(moe_layer_param(layer, (moe_param_t)p, &w, &g, &n), MOE_STATUS_SUCCESS);
            if (n) v.push_back({(float *)w, (float *)g, n});
        }
        return v;
    }
    void fill(float w, float g) {
        for (auto &p : params())
            for (int64_t i = 0; i < p.n; ++i) p.w[i] = w, p.g[i] = g;
    }
};

moe_optimizer_t *make(Fixture &f, moe_optimizer_config_t c) {
    moe_optimizer_t *o = nullptr;
    EXPECT_EQ(moe_optimizer_create(&o, f.layer, &c), MOE_STATUS_SUCCESS) << moe_last_error();
    return o;
}

// steps a constant gradient and checks every element of every parameter against want[step];
// 1e-6 absolute: f32 arithmetic on values of order 1 over three steps
void expect_trajectory(moe_optimizer_config_t c, float g, const std::vector<double> &want) {
    Fixture f;
    f.fill(1.0f, g);
    moe_optimizer_t *o = make(f, c);
    for (size_t s = 0; s < want.size(); ++s) {
        ASSERT_EQ(moe_optimizer_step(o, nullptr), MOE_STATUS_SUCCESS) << moe_last_error();
        for (auto &p : f.params())
            for (int64_t i = 0; i < p.n; ++i) {
                ASSERT_NEAR(p.w[i], want[s], 1e-6) << "step " << s + 1 << " element " << i;
                ASSERT_EQ(p.g[i], g) << "the step must not touch the gradient";
            }
    }
    int64_t steps = -1;
    EXPECT_EQ(moe_optimizer_get_config(o, nullptr, &steps), MOE_STATUS_SUCCESS);
    EXPECT_EQ(steps, (int64_t)want.size());
    EXPECT_EQ(moe_optimizer_destroy(o), MOE_STATUS_SUCCESS);
}

moe_optimizer_config_t sgd(double lr, double momentum, int nesterov, double wd) {
    moe_optimizer_config_t c = moe_optimizer_config_default(MOE_OPTIMIZER_SGD);
    c.lr = lr, c.momentum = momentum, c.nesterov = nesterov, c.weight_decay = wd;
    return c;
}

moe_optimizer_config_t adam(moe_optimizer_kind_t k, double lr, double wd) {
    moe_optimizer_config_t c = moe_optimizer_config_default(k);
    c.lr = lr, c.weight_decay = wd;
    return c;
}

}  // namespace

// p0 = 1, g = 0.5 every step, lr 0.1; the expected values are worked out by hand:
TEST(Optim, SgdPlain) {
    // p -= 0.1 * 0.5
    expect_trajectory(sgd(0.1, 0.0, 0, 0.0), 0.5f, {0.95, 0.90, 0.85});
}

TEST(Optim, SgdMomentum) {
    // b = 0.5, 0.95, 1.355  ->  p = 0.95, 0.855, 0.7195
    expect_trajectory(sgd(0.1, 0.9, 0, 0.0), 0.5f, {0.95, 0.855, 0.7195});
}

TEST(Optim, SgdNesterov) {
    // b = 0.5, 0.95; d = 0.5 + 0.9 b = 0.95, 1.355  ->  p = 0.905, 0.7695
    expect_trajectory(sgd(0.1, 0.9, 1, 0.0), 0.5f, {0.905, 0.7695});
}

TEST(Optim, SgdWeightDecay) {
    // d = 0.5 + 0.1 p: 0.6 -> p = 0.94; 0.594 -> p = 0.8806
    expect_trajectory(sgd(0.1, 0.0, 0, 0.1), 0.5f, {0.94, 0.8806});
}

TEST(Optim, AdamConstantGradientMovesLrPerStep) {
    // with a constant gradient the bias-corrected m/sqrt(v) is exactly 1: p drops by lr
    // (minus the eps term, 1e-8 relative)
    expect_trajectory(adam(MOE_OPTIMIZER_ADAM, 0.1, 0.0), 0.5f, {0.9, 0.8, 0.7});
}

TEST(Optim, AdamWDecoupledDecay) {
    // p = p (1 - 0.1*0.1) - 0.1: 0.89, then 0.89*0.99 - 0.1 = 0.7811
    expect_trajectory(adam(MOE_OPTIMIZER_ADAMW, 0.1, 0.1), 0.5f, {0.89, 0.7811});
}

TEST(Optim, AdamL2FoldsIntoGradient) {
    // ADAM with weight decay: g' = g + wd p; step 1 is still exactly -lr (sign of g' only)
    expect_trajectory(adam(MOE_OPTIMIZER_ADAM, 0.1, 0.1), 0.5f, {0.9});
}

// random values and gradients changing every step, against a float64 transcription of moe.h
TEST(Optim, MatchesFloat64Reference) {
    const moe_optimizer_kind_t kinds[] = {MOE_OPTIMIZER_SGD, MOE_OPTIMIZER_ADAM,
                                          MOE_OPTIMIZER_ADAMW};
    for (moe_optimizer_kind_t kind : kinds) {
        for (int nesterov = 0; nesterov < (kind == MOE_OPTIMIZER_SGD ? 2 : 1); ++nesterov) {
            Fixture f;
            moe_optimizer_config_t c = moe_optimizer_config_default(kind);
            c.lr = 0.05, c.weight_decay = 0.03, c.nesterov = nesterov, c.beta2 = 0.99;
            moe_optimizer_t *o = make(f, c);
            auto ps = f.params();
            size_t total = 0;
            for (auto &p : ps) total += (size_t)p.n;
            std::vector<double> w(total), m(total, 0.0), v(total, 0.0);
            uint32_t r = 7u;
            auto rnd = [&r]() {
                r = r * 1664525u + 1013904223u;
                return (double)(r >> 8) / 16777216.0 - 0.5;
            };
            size_t k = 0;
            for (auto &p : ps)
                for (int64_t i = 0; i < p.n; ++i) w[k++] = p.w[i];
            for (int step = 1; step <= 4; ++step) {
                k = 0;
                for (auto &p : ps)
                    for (int64_t i = 0; i < p.n; ++i, ++k) {
                        p.g[i] = (float)rnd();
                        double g = p.g[i], wd = c.weight_decay;
                        if (kind == MOE_OPTIMIZER_SGD) {
                            double d = g + wd * w[k];
                            m[k] = step == 1 ? d : c.momentum * m[k] + d;
                            d = nesterov ? d + c.momentum * m[k] : m[k];
                            w[k] -= c.lr * d;
                        } else {
                            if (kind == MOE_OPTIMIZER_ADAMW) w[k] -= c.lr * wd * w[k];
                            else g += wd * w[k];
                            m[k] = c.beta1 * m[k] + (1 - c.beta1) * g;
                            v[k] = c.beta2 * v[k] + (1 - c.beta2) * g * g;
                            double mh = m[k] / (1 - std::pow(c.beta1, step));
                            double vh = v[k] / (1 - std::pow(c.beta2, step));
                            w[k] -= c.lr * mh / (std::sqrt(vh) + c.eps);
                        }
                    }
                ASSERT_EQ(moe_optimizer_step(o, nullptr), MOE_STATUS_SUCCESS) << moe_last_error();
                k = 0;
                // 2e-6: a few f32 roundings of values below 1 per step
                for (auto &p : ps)
                    for (int64_t i = 0; i < p.n; ++i, ++k)
                        ASSERT_NEAR(p.w[i], w[k], 2e-6)
                            << "kind " << kind << " nesterov " << nesterov << " step " << step;
            }
            EXPECT_EQ(moe_optimizer_destroy(o), MOE_STATUS_SUCCESS);
        }
    }
}

TEST(Optim, SkipsParametersTheConfigTurnsOff) {
    Fixture f(/*noisy=*/0, /*bias=*/0);
    f.fill(1.0f, 0.5f);
    moe_optimizer_t *o = make(f, sgd(0.1, 0.0, 0, 0.0));
    ASSERT_EQ(moe_optimizer_step(o, nullptr), MOE_STATUS_SUCCESS) << moe_last_error();
    for (auto &p : f.params()) EXPECT_NEAR(p.w[0], 0.95, 1e-7);
    EXPECT_EQ(moe_optimizer_destroy(o), MOE_STATUS_SUCCESS);
}

TEST(Optim, SetLr) {
    Fixture f;
    f.fill(1.0f, 0.5f);
    moe_optimizer_t *o = make(f, sgd(0.1, 0.0, 0, 0.0));
    ASSERT_EQ(moe_optimizer_set_lr(o, 0.2), MOE_STATUS_SUCCESS);
    ASSERT_EQ(moe_optimizer_step(o, nullptr), MOE_STATUS_SUCCESS);
    EXPECT_NEAR(f.params()[0].w[0], 0.9, 1e-7);
    moe_optimizer_config_t c;
    ASSERT_EQ(moe_optimizer_get_config(o, &c, nullptr), MOE_STATUS_SUCCESS);
    EXPECT_EQ(c.lr, 0.2);
    EXPECT_EQ(moe_optimizer_set_lr(o, -1.0), MOE_STATUS_INVALID_ARGUMENT);
    EXPECT_EQ(moe_optimizer_set_lr(o, NAN), MOE_STATUS_INVALID_ARGUMENT);
    EXPECT_EQ(moe_optimizer_set_lr(nullptr, 0.1), MOE_STATUS_INVALID_ARGUMENT);
    EXPECT_EQ(moe_optimizer_destroy(o), MOE_STATUS_SUCCESS);
}

TEST(Optim, NonFiniteGradientUpdatesNothing) {
    Fixture f;
    f.fill(1.0f, 0.5f);
    moe_optimizer_t *o = make(f, adam(MOE_OPTIMIZER_ADAM, 0.1, 0.0));
    auto ps = f.params();
    ps.back().g[1] = NAN;
    EXPECT_EQ(moe_optimizer_step(o, nullptr), MOE_STATUS_NUMERIC_ERROR);
    EXPECT_NE(std::strstr(moe_last_error(), "NaN/Inf"), nullptr) << moe_last_error();
    for (auto &p : ps)
        for (int64_t i = 0; i < p.n; ++i) ASSERT_EQ(p.w[i], 1.0f);
    int64_t steps = -1;
    EXPECT_EQ(moe_optimizer_get_config(o, nullptr, &steps), MOE_STATUS_SUCCESS);
    EXPECT_EQ(steps, 0);
    // the optimizer stays usable: a clean gradient gives the exact first Adam step
    ps.back().g[1] = 0.5f;
    ASSERT_EQ(moe_optimizer_step(o, nullptr), MOE_STATUS_SUCCESS) << moe_last_error();
    EXPECT_NEAR(ps[0].w[0], 0.9, 1e-6);
    EXPECT_EQ(moe_optimizer_destroy(o), MOE_STATUS_SUCCESS);
}

TEST(Optim, BadInput) {
    Fixture f;
    moe_optimizer_t *o = (moe_optimizer_t *)0x1;
    moe_optimizer_config_t good = moe_optimizer_config_default(MOE_OPTIMIZER_ADAM);
    EXPECT_EQ(moe_optimizer_create(nullptr, f.layer, &good), MOE_STATUS_INVALID_ARGUMENT);
    EXPECT_EQ(moe_optimizer_create(&o, nullptr, &good), MOE_STATUS_INVALID_ARGUMENT);
    EXPECT_EQ(o, nullptr) << "*opt is cleared on failure";
    EXPECT_EQ(moe_optimizer_create(&o, f.layer, nullptr), MOE_STATUS_INVALID_ARGUMENT);
    int junk[64] = {0};
    EXPECT_EQ(moe_optimizer_create(&o, (moe_layer_t *)junk, &good), MOE_STATUS_INVALID_ARGUMENT);

    struct Case { const char *field; void (*edit)(moe_optimizer_config_t &); };
    const Case cases[] = {
        {"struct_size", [](moe_optimizer_config_t &c) { c.struct_size = 8; }},
        {"kind", [](moe_optimizer_config_t &c) { c.kind = (moe_optimizer_kind_t)7; }},
        {"lr", [](moe_optimizer_config_t &c) { c.lr = -1e-3; }},
        {"lr", [](moe_optimizer_config_t &c) { c.lr = INFINITY; }},
        {"weight_decay", [](moe_optimizer_config_t &c) { c.weight_decay = -1; }},
        {"beta1", [](moe_optimizer_config_t &c) { c.beta1 = 1.0; }},
        {"beta2", [](moe_optimizer_config_t &c) { c.beta2 = -0.1; }},
        {"eps", [](moe_optimizer_config_t &c) { c.eps = 0.0; }},
        {"momentum", [](moe_optimizer_config_t &c) {
             c.kind = MOE_OPTIMIZER_SGD, c.momentum = 1.0; }},
        {"nesterov", [](moe_optimizer_config_t &c) {
             c.kind = MOE_OPTIMIZER_SGD, c.momentum = 0.0, c.nesterov = 1; }},
    };
    for (const Case &k : cases) {
        moe_optimizer_config_t c = good;
        k.edit(c);
        o = (moe_optimizer_t *)0x1;
        EXPECT_EQ(moe_optimizer_create(&o, f.layer, &c), MOE_STATUS_INVALID_ARGUMENT) << k.field;
        EXPECT_EQ(o, nullptr);
        EXPECT_NE(std::strstr(moe_last_error(), k.field), nullptr)
            << k.field << ": " << moe_last_error();
    }
    EXPECT_EQ(moe_optimizer_step(nullptr, nullptr), MOE_STATUS_INVALID_ARGUMENT);
    EXPECT_EQ(moe_optimizer_get_config(nullptr, nullptr, nullptr), MOE_STATUS_INVALID_ARGUMENT);
    EXPECT_EQ(moe_optimizer_destroy(nullptr), MOE_STATUS_SUCCESS);
    EXPECT_EQ(moe_optimizer_destroy((moe_optimizer_t *)junk), MOE_STATUS_INVALID_ARGUMENT);
    // after all of that the layer and a fresh optimizer work
    o = make(f, good);
    EXPECT_EQ(moe_optimizer_step(o, nullptr), MOE_STATUS_SUCCESS) << moe_last_error();
    EXPECT_EQ(moe_optimizer_destroy(o), MOE_STATUS_SUCCESS);
}

// The CUDA update loop is tested against this CPU one in tests/cuda/test_cuda_ep.cc
// (CudaOptimizer.*).
