// test_balancing.cc - load-balancing strategies against their formulas: auxiliary-loss-free
// bias balancing (selection bias and its update rule) and expert-choice routing.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <numeric>
#include <string>
#include <vector>

#include "ep_common.h"

namespace {

struct Layer {
    moe_context_t *ctx = nullptr;
    moe_layer_t *layer = nullptr;
    moe_layer_config_t cfg;
    explicit Layer(const moe_layer_config_t &c) : cfg(c) {
        EXPECT_EQ(moe_context_create(&ctx, MOE_BACKEND_CPU, 0, nullptr), MOE_STATUS_SUCCESS);
        EXPECT_EQ(moe_layer_create(&layer, ctx, &cfg), MOE_STATUS_SUCCESS) << moe_last_error();
        moe_layer_get_config(layer, &cfg);
    }
    ~Layer() {
        moe_layer_destroy(layer);
        moe_context_destroy(ctx);
    }
    std::vector<float> param(moe_param_t p) {
        float *v = nullptr;
        int64_t n = 0;
        moe_layer_param(layer, p, (void **)&v, nullptr, &n);
        return std::vector<float>(v, v + n);
    }
};

// logits in double: x (T, D) . Wg (D, E)
std::vector<double> logits(const std::vector<float> &x, const std::vector<float> &wg, int64_t T,
                           int64_t D, int64_t E) {
    std::vector<double> l((size_t)(T * E), 0.0);
    for (int64_t t = 0; t < T; ++t)
        for (int64_t d = 0; d < D; ++d)
            for (int64_t e = 0; e < E; ++e)
                l[(size_t)(t * E + e)] += (double)x[(size_t)(t * D + d)] * wg[(size_t)(d * E + e)];
    return l;
}

// ---- auxiliary-loss-free balancing --------------------------------------------------------------

moe_layer_config_t bias_config(double rate) {
    moe_layer_config_t c = ep::small_config(8, 2);
    c.bias_update_rate = rate;
    return c;
}

TEST(LossFreeBias, UpdateFollowsTheSignRule) {
    Layer L(bias_config(0.01));
    const int64_t T = 97, D = L.cfg.d_model, E = 8;
    std::vector<float> bias(E, 1.0f);
    ASSERT_EQ(moe_layer_score_bias(L.layer, bias.data()), MOE_STATUS_SUCCESS);
    for (float b : bias) EXPECT_EQ(b, 0.0f);
    std::vector<double> expect(E, 0.0);
    for (int step = 0; step < 3; ++step) {
        auto x = ep::make_tokens(T, D, 40u + (uint32_t)step);
        std::vector<float> y(x.size());
        ASSERT_EQ(moe_layer_forward(L.layer, x.data(), y.data(), T, 1, nullptr), 0);
        std::vector<int64_t> counts(E);
        ASSERT_EQ(moe_layer_stats(L.layer, nullptr, counts.data(), nullptr), 0);
        double mean = (double)std::accumulate(counts.begin(), counts.end(), (int64_t)0) / E;
        for (int64_t e = 0; e < E; ++e)
            expect[(size_t)e] += counts[(size_t)e] < mean ? 0.01 : (counts[(size_t)e] > mean ? -0.01 : 0.0);
        ASSERT_EQ(moe_layer_score_bias(L.layer, bias.data()), 0);
        for (int64_t e = 0; e < E; ++e) EXPECT_NEAR(bias[(size_t)e], expect[(size_t)e], 1e-6);
    }
    // inference forwards leave the bias alone
    auto x = ep::make_tokens(T, D, 1);
    std::vector<float> y(x.size()), before = bias;
    ASSERT_EQ(moe_layer_forward(L.layer, x.data(), y.data(), T, 0, nullptr), 0);
    ASSERT_EQ(moe_layer_score_bias(L.layer, bias.data()), 0);
    EXPECT_EQ(bias, before);
}

TEST(LossFreeBias, BiasSelectsButGatesUseTheScores) {
    Layer L(bias_config(1e-3));
    const int64_t T = 40, D = L.cfg.d_model, E = 8, K = 2;
    std::vector<float> bias(E, 0.0f);
    bias[5] = 100.0f;  // every token must pick expert 5 first
    ASSERT_EQ(moe_layer_set_score_bias(L.layer, bias.data()), MOE_STATUS_SUCCESS);
    auto x = ep::make_tokens(T, D, 3);
    std::vector<float> y(x.size());
    ASSERT_EQ(moe_layer_forward(L.layer, x.data(), y.data(), T, 0, nullptr), 0);
    std::vector<int32_t> idx((size_t)(T * K));
    std::vector<float> gate((size_t)(T * K));
    ASSERT_EQ(moe_layer_routing(L.layer, idx.data(), gate.data(), nullptr), 0);
    auto l = logits(x, L.param(MOE_PARAM_ROUTER_WEIGHT), T, D, E);
    for (int64_t t = 0; t < T; ++t) {
        EXPECT_EQ(idx[(size_t)(t * K)], 5) << "token " << t;
        // softmax over the two selected *unbiased* logits
        double a = l[(size_t)(t * E + idx[(size_t)(t * K)])];
        double b = l[(size_t)(t * E + idx[(size_t)(t * K + 1)])];
        double g0 = 1.0 / (1.0 + std::exp(b - a));
        EXPECT_NEAR(gate[(size_t)(t * K)], g0, 1e-5) << "token " << t;
        // the second choice is the best of the rest by plain score
        int32_t best = -1;
        for (int32_t e = 0; e < E; ++e)
            if (e != 5 && (best < 0 || l[(size_t)(t * E + e)] > l[(size_t)(t * E + best)])) best = e;
        EXPECT_EQ(idx[(size_t)(t * K + 1)], best) << "token " << t;
    }
}

TEST(LossFreeBias, EvensOutASkewedRouter) {
    // a router that prefers expert 0 strongly: the bias must pull the load towards the mean
    auto run = [](double rate) {
        Layer L(bias_config(rate));
        const int64_t T = 256, D = L.cfg.d_model, E = 8;
        float *wg = nullptr;
        moe_layer_param(L.layer, MOE_PARAM_ROUTER_WEIGHT, (void **)&wg, nullptr, nullptr);
        for (int64_t d = 0; d < D; ++d) wg[d * E + 0] += 0.4f;
        double imb = 0.0;
        for (int step = 0; step < 60; ++step) {
            auto x = ep::make_tokens(T, D, 100u + (uint32_t)step);
            for (int64_t i = 0; i < T * D; ++i) x[(size_t)i] = std::fabs(x[(size_t)i]);
            std::vector<float> y(x.size());
            EXPECT_EQ(moe_layer_forward(L.layer, x.data(), y.data(), T, 1, nullptr), 0);
            moe_routing_stats_t st;
            moe_layer_stats(L.layer, &st, nullptr, nullptr);
            imb = st.imbalance;
        }
        return imb;
    };
    double without = run(0.0), with = run(0.05);
    EXPECT_GT(without, 2.0) << "the skew must be real for the test to mean anything";
    EXPECT_LT(with, 1.5);
    EXPECT_LT(with, without);
}

TEST(LossFreeBias, BadInput) {
    moe_layer_config_t c = bias_config(-1.0);
    moe_context_t *ctx = nullptr;
    moe_layer_t *layer = nullptr;
    ASSERT_EQ(moe_context_create(&ctx, MOE_BACKEND_CPU, 0, nullptr), 0);
    EXPECT_EQ(moe_layer_create(&layer, ctx, &c), MOE_STATUS_INVALID_ARGUMENT);
    c = bias_config(0.1);
    c.noisy_gating = 1;
    EXPECT_EQ(moe_layer_create(&layer, ctx, &c), MOE_STATUS_INVALID_ARGUMENT);
    EXPECT_NE(std::string(moe_last_error()).find("noisy"), std::string::npos);
    c = bias_config(0.1);
    c.router = MOE_ROUTER_EXPERT_CHOICE;
    EXPECT_EQ(moe_layer_create(&layer, ctx, &c), MOE_STATUS_INVALID_ARGUMENT);
    c = bias_config(0.0);
    ASSERT_EQ(moe_layer_create(&layer, ctx, &c), 0);
    std::vector<float> b(8, 0.0f);
    EXPECT_EQ(moe_layer_set_score_bias(layer, b.data()), MOE_STATUS_INVALID_ARGUMENT);
    EXPECT_EQ(moe_layer_score_bias(layer, nullptr), MOE_STATUS_INVALID_ARGUMENT);
    moe_layer_destroy(layer);
    moe_context_destroy(ctx);
}

// ---- expert choice ------------------------------------------------------------------------------

moe_layer_config_t ec_config(double cf) {
    moe_layer_config_t c = ep::small_config(6, 2);
    c.router = MOE_ROUTER_EXPERT_CHOICE;
    c.capacity_factor = cf;
    c.activation = MOE_ACTIVATION_GELU;
    return c;
}

TEST(ExpertChoice, EachExpertTakesItsTopCTokens) {
    for (double cf : {0.0, 0.5, 1.0, 2.0}) {
        SCOPED_TRACE(cf);
        Layer L(ec_config(cf));
        const int64_t T = 53, D = L.cfg.d_model, E = 6, K = 2;
        EXPECT_EQ(moe_layer_routing_width(L.layer), E);
        EXPECT_EQ(L.cfg.gate, MOE_GATE_TOPK_OF_SOFTMAX);  // implied, and reported
        auto x = ep::make_tokens(T, D, 9);
        std::vector<float> y(x.size());
        ASSERT_EQ(moe_layer_forward(L.layer, x.data(), y.data(), T, 1, nullptr), 0);
        std::vector<int32_t> idx((size_t)(T * E)), kept((size_t)(T * E));
        std::vector<float> gate((size_t)(T * E));
        ASSERT_EQ(moe_layer_routing(L.layer, idx.data(), gate.data(), kept.data()), 0);
        // scores p = softmax of the logits over E
        auto l = logits(x, L.param(MOE_PARAM_ROUTER_WEIGHT), T, D, E);
        std::vector<double> p(l.size());
        for (int64_t t = 0; t < T; ++t) {
            double m = *std::max_element(l.begin() + t * E, l.begin() + (t + 1) * E), z = 0.0;
            for (int64_t e = 0; e < E; ++e) z += std::exp(l[(size_t)(t * E + e)] - m);
            for (int64_t e = 0; e < E; ++e)
                p[(size_t)(t * E + e)] = std::exp(l[(size_t)(t * E + e)] - m) / z;
        }
        const int64_t C = std::min<int64_t>(T, (int64_t)std::ceil((cf > 0 ? cf : 1.0) * T * K / E));
        std::vector<float> fy(x.size(), 0.0f);
        for (int64_t e = 0; e < E; ++e) {
            double kept_min = 2.0, dropped_max = -1.0;
            int64_t n = 0;
            for (int64_t t = 0; t < T; ++t)
                for (int64_t j = 0; j < E; ++j) {
                    if (idx[(size_t)(t * E + j)] != e) continue;
                    double pe = p[(size_t)(t * E + e)];
                    EXPECT_NEAR(gate[(size_t)(t * E + j)], pe, 1e-5);
                    if (kept[(size_t)(t * E + j)]) {
                        ++n;
                        kept_min = std::min(kept_min, pe);
                    } else {
                        dropped_max = std::max(dropped_max, pe);
                    }
                }
            EXPECT_EQ(n, C) << "expert " << e << " keeps exactly C tokens";
            EXPECT_GE(kept_min + 1e-6, dropped_max) << "expert " << e << " keeps its best tokens";
        }
        moe_routing_stats_t st;
        ASSERT_EQ(moe_layer_stats(L.layer, &st, nullptr, nullptr), 0);
        EXPECT_EQ(st.num_assignments - st.num_dropped, C * E);
    }
}

// y against a direct evaluation: y_t = sum over experts that chose t of p[t, e] FFN_e(x_t)
TEST(ExpertChoice, OutputIsTheChosenExpertsWeightedSum) {
    Layer L(ec_config(1.0));
    const int64_t T = 31, D = L.cfg.d_model, F = L.cfg.d_ff, E = 6;
    auto x = ep::make_tokens(T, D, 17);
    std::vector<float> y(x.size());
    ASSERT_EQ(moe_layer_forward(L.layer, x.data(), y.data(), T, 1, nullptr), 0);
    std::vector<int32_t> idx((size_t)(T * E)), kept((size_t)(T * E));
    std::vector<float> gate((size_t)(T * E));
    ASSERT_EQ(moe_layer_routing(L.layer, idx.data(), gate.data(), kept.data()), 0);
    auto w1 = L.param(MOE_PARAM_W1), b1 = L.param(MOE_PARAM_B1);
    auto w2 = L.param(MOE_PARAM_W2), b2 = L.param(MOE_PARAM_B2);
    double num = 0.0, den = 0.0;
    for (int64_t t = 0; t < T; ++t) {
        std::vector<double> out((size_t)D, 0.0);
        for (int64_t j = 0; j < E; ++j) {
            if (!kept[(size_t)(t * E + j)]) continue;
            int64_t e = idx[(size_t)(t * E + j)];
            std::vector<double> h((size_t)F);
            for (int64_t f = 0; f < F; ++f) {
                double a = b1[(size_t)(e * F + f)];
                for (int64_t d = 0; d < D; ++d)
                    a += (double)x[(size_t)(t * D + d)] * w1[(size_t)((e * D + d) * F + f)];
                h[(size_t)f] = 0.5 * a * (1.0 + std::erf(a / std::sqrt(2.0)));
            }
            for (int64_t d = 0; d < D; ++d) {
                double a = b2[(size_t)(e * D + d)];
                for (int64_t f = 0; f < F; ++f) a += h[(size_t)f] * w2[(size_t)((e * F + f) * D + d)];
                out[(size_t)d] += gate[(size_t)(t * E + j)] * a;
            }
        }
        for (int64_t d = 0; d < D; ++d) {
            num = std::max(num, std::fabs(out[(size_t)d] - y[(size_t)(t * D + d)]));
            den = std::max(den, std::fabs(out[(size_t)d]));
        }
    }
    EXPECT_LE(num / den, 1e-5);  // f32 against f64 over sums of ~60 terms
}

// the router gradient of expert choice by central differences of the library's own loss
TEST(ExpertChoice, RouterGradientMatchesFiniteDifferences) {
    Layer L(ec_config(1.0));
    const int64_t T = 29, D = L.cfg.d_model, E = 6;
    auto x = ep::make_tokens(T, D, 23), dy = ep::make_tokens(T, D, 24);
    std::vector<float> y(x.size()), dx(x.size());
    ASSERT_EQ(moe_layer_forward(L.layer, x.data(), y.data(), T, 1, nullptr), 0);
    ASSERT_EQ(moe_layer_backward(L.layer, dy.data(), dx.data(), nullptr), 0);
    float *wg = nullptr, *gwg = nullptr;
    moe_layer_param(L.layer, MOE_PARAM_ROUTER_WEIGHT, (void **)&wg, (void **)&gwg, nullptr);
    std::vector<float> grad(gwg, gwg + D * E);
    std::vector<int32_t> kept0((size_t)(T * E)), kept1((size_t)(T * E));
    moe_layer_routing(L.layer, nullptr, nullptr, kept0.data());
    auto loss = [&]() {
        EXPECT_EQ(moe_layer_forward(L.layer, x.data(), y.data(), T, 1, nullptr), 0);
        double s = 0.0;
        for (size_t i = 0; i < y.size(); ++i) s += (double)dy[i] * y[i];
        return s;
    };
    const float h = 2e-3f;
    int checked = 0;
    for (int64_t i = 0; i < D * E; ++i) {
        float keep = wg[i];
        wg[i] = keep + h;
        double up = loss();
        moe_layer_routing(L.layer, nullptr, nullptr, kept1.data());
        bool same = kept1 == kept0;
        wg[i] = keep - h;
        double dn = loss();
        moe_layer_routing(L.layer, nullptr, nullptr, kept1.data());
        same = same && kept1 == kept0;
        wg[i] = keep;
        if (!same) continue;  // a selection flipped inside the step: not differentiable there
        double fd = (up - dn) / (2.0 * h);
        EXPECT_NEAR(grad[(size_t)i], fd, 2e-3 + 2e-2 * std::fabs(fd)) << "Wg[" << i << "]";
        ++checked;
    }
    EXPECT_GE(checked, 20);
}

}  // namespace
