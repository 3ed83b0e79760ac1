// test_edge.cc - edge cases of one layer: degenerate routing, tiny capacity, changing token
// counts, repeated backward, zero_grad and aliasing of inputs and outputs.
#include <gtest/gtest.h>

#include <memory>

#include "test_util.h"

using namespace moetest;

namespace {

// A layer whose router is steered through feature 0: x[:, 0] = 1 and Wg[0, e] = bias[e].
struct Steered {
    moe_layer_config_t cfg;
    std::unique_ptr<Layer> L;
    std::vector<float> x;
    Steered(moe_layer_config_t c, int64_t T, const std::vector<float> &bias, uint64_t seed = 3)
        : cfg(c), L(new Layer(c)) {
        const int64_t D = c.d_model, E = c.num_experts;
        std::vector<float> wg = uniform(D * E, seed, -2.0f / std::sqrt((float)D),
                                        2.0f / std::sqrt((float)D));
        for (int64_t e = 0; e < E; ++e) wg[e] = bias[e];
        set_param(*L, MOE_PARAM_ROUTER_WEIGHT, wg);
        x = uniform(T * D, seed + 1);
        for (int64_t t = 0; t < T; ++t) x[t * D] = 1.0f;
    }
};

TEST(Edge, OneToken) {
    moe_layer_config_t c = small_config(8, 16, 4, 2);
    c.capacity_factor = 1.0;  // C = ceil(1 * 1 * 2 / 4) = 1: both choices fit
    c.switch_loss_coef = c.importance_loss_coef = c.z_loss_coef = 0.1;
    Layer L(c);
    ASSERT_EQ(L.status, MOE_STATUS_SUCCESS);
    moeref::Forward f = check_against_reference(L, uniform(8, 1), 1, 1, 0);
    EXPECT_EQ(f.num_dropped, 0);
}

TEST(Edge, ExpertWithNoToken) {
    moe_layer_config_t c = small_config(8, 16, 4, 2);
    c.switch_loss_coef = c.importance_loss_coef = c.load_loss_coef = c.z_loss_coef = 0.1;
    c.noisy_gating = 1;
    Steered s(c, 50, {0.0f, 0.0f, -100.0f, 0.0f});
    ASSERT_EQ(s.L->status, MOE_STATUS_SUCCESS);
    moeref::Forward f = check_against_reference(*s.L, s.x, 50, 1, 0);
    EXPECT_EQ(f.counts[2], 0);
    // expert 2 saw no row: its weights get exactly zero gradient
    std::vector<float> dw1 = param_grad(*s.L, MOE_PARAM_W1), dw2 = param_grad(*s.L, MOE_PARAM_W2);
    for (int64_t i = 2 * 8 * 16; i < 3 * 8 * 16; ++i) {
        ASSERT_EQ(dw1[i], 0.0f);
        ASSERT_EQ(dw2[i], 0.0f);
    }
    int64_t counts[4];
    ASSERT_EQ(moe_layer_stats(*s.L, nullptr, counts, nullptr), MOE_STATUS_SUCCESS);
    EXPECT_EQ(counts[2], 0);
}

TEST(Edge, AllTokensToOneExpert) {
    for (double cap : {0.0, 1.0}) {
        moe_layer_config_t c = small_config(8, 16, 4, 1);
        c.capacity_factor = cap;
        c.switch_loss_coef = c.importance_loss_coef = c.z_loss_coef = 0.1;
        const int64_t T = 40;
        Steered s(c, T, {0.0f, 100.0f, 0.0f, 0.0f});
        ASSERT_EQ(s.L->status, MOE_STATUS_SUCCESS);
        moeref::Forward f = check_against_reference(*s.L, s.x, T, 1, 0);
        EXPECT_EQ(f.counts[1], T);
        EXPECT_EQ(f.num_dropped, cap > 0 ? T - 10 : 0);  // C = ceil(40 / 4) = 10
        moe_routing_stats_t st;
        ASSERT_EQ(moe_layer_stats(*s.L, &st, nullptr, nullptr), MOE_STATUS_SUCCESS);
        EXPECT_DOUBLE_EQ(st.imbalance, 4.0);
    }
}

TEST(Edge, KEqualsE) {
    for (int noisy : {0, 1}) {
        moe_layer_config_t c = small_config(8, 16, 4, 4);
        c.capacity_factor = 1.0;  // C = T: nothing can drop
        c.noisy_gating = noisy;
        c.gate = MOE_GATE_TOPK_OF_SOFTMAX;
        c.renormalize = 0;
        c.switch_loss_coef = c.importance_loss_coef = c.load_loss_coef = c.z_loss_coef = 0.1;
        Layer L(c);
        ASSERT_EQ(L.status, MOE_STATUS_SUCCESS);
        set_param(L, MOE_PARAM_ROUTER_WEIGHT, uniform(32, 9, -2.0f, 2.0f));
        moeref::Forward f = check_against_reference(L, uniform(30 * 8, 4), 30, 1, 0);
        EXPECT_EQ(f.num_dropped, 0);
    }
}

TEST(Edge, CapacitySoSmallMostAreDropped) {
    for (moe_priority_t prio : {MOE_PRIORITY_POSITION, MOE_PRIORITY_SCORE}) {
        moe_layer_config_t c = small_config(8, 16, 4, 2);
        c.capacity_factor = 0.01;  // C = ceil(0.01 * 60 * 2 / 4) = 1
        c.priority = prio;
        c.switch_loss_coef = c.importance_loss_coef = c.z_loss_coef = 0.1;
        Layer L(c);
        ASSERT_EQ(L.status, MOE_STATUS_SUCCESS);
        set_param(L, MOE_PARAM_ROUTER_WEIGHT, uniform(32, 9, -2.0f, 2.0f));
        std::vector<float> x = uniform(60 * 8, 6);
        moeref::Forward f = check_against_reference(L, x, 60, 1, 0);
        EXPECT_GE(f.num_dropped, 120 - 4);
        // a token whose choices were all dropped gets y = 0 exactly
        LibRun r;
        library_forward(L, x, 60, 1, 8, 4, 2, &r);
        int empty = 0;
        for (int64_t t = 0; t < 60; ++t)
            if (!r.kept[t * 2] && !r.kept[t * 2 + 1]) {
                ++empty;
                for (int64_t d = 0; d < 8; ++d) ASSERT_EQ(r.y[t * 8 + d], 0.0f);
            }
        EXPECT_GT(empty, 50);
    }
}

// a finite but huge capacity factor is no limit: the capacity is clamped to T * K before it is
// converted to an integer (the conversion itself overflowed before, undefined behaviour), and
// the layer computes what the dropless layer computes
TEST(Edge, HugeCapacityFactorIsDropless) {
    moe_layer_config_t c = small_config(8, 16, 4, 2);
    Layer dropless(c);
    c.capacity_factor = 1e300;
    Layer huge(c);
    ASSERT_EQ(huge.status, MOE_STATUS_SUCCESS);
    std::vector<float> x = uniform(30 * 8, 4);
    LibRun a, b;
    library_forward(dropless, x, 30, 1, 8, 4, 2, &a);
    library_forward(huge, x, 30, 1, 8, 4, 2, &b);
    EXPECT_EQ(b.st.num_dropped, 0);
    EXPECT_EQ(a.y, b.y);
    EXPECT_EQ(a.counts, b.counts);
}

TEST(Edge, TokenCountGrowsAndShrinks) {
    moe_layer_config_t c = small_config(8, 16, 4, 2);
    c.noisy_gating = 1;
    c.capacity_factor = 1.0;
    c.switch_loss_coef = c.importance_loss_coef = c.load_loss_coef = c.z_loss_coef = 0.1;
    Layer L(c);
    ASSERT_EQ(L.status, MOE_STATUS_SUCCESS);
    set_param(L, MOE_PARAM_ROUTER_WEIGHT, uniform(32, 9, -2.0f, 2.0f));
    set_param(L, MOE_PARAM_NOISE_WEIGHT, uniform(32, 10, -0.5f, 0.5f));
    uint64_t call = 0;
    for (int64_t T : {10, 150, 7, 300, 1, 64}) {
        SCOPED_TRACE(T);
        check_against_reference(L, uniform(T * 8, 100 + T), T, 1, call++);
    }
}

TEST(Edge, BackwardTwiceAccumulatesAndZeroGradResets) {
    moe_layer_config_t c = small_config(8, 16, 4, 2);
    c.noisy_gating = 1;
    c.switch_loss_coef = c.importance_loss_coef = c.load_loss_coef = c.z_loss_coef = 0.1;
    Layer L(c);
    ASSERT_EQ(L.status, MOE_STATUS_SUCCESS);
    set_param(L, MOE_PARAM_NOISE_WEIGHT, uniform(32, 10, -0.5f, 0.5f));
    const int64_t T = 33;
    std::vector<float> x = uniform(T * 8, 1), y(T * 8), dy = uniform(T * 8, 2);
    std::vector<float> dx1(T * 8), dx2(T * 8), dx3(T * 8);
    ASSERT_EQ(moe_layer_forward(L, x.data(), y.data(), T, 1, nullptr), MOE_STATUS_SUCCESS);
    ASSERT_EQ(moe_layer_backward(L, dy.data(), dx1.data(), nullptr), MOE_STATUS_SUCCESS);
    std::vector<float> g1[MOE_PARAM_COUNT];
    for (int p = 0; p < MOE_PARAM_COUNT; ++p) g1[p] = param_grad(L, (moe_param_t)p);
    ASSERT_EQ(moe_layer_backward(L, dy.data(), dx2.data(), nullptr), MOE_STATUS_SUCCESS);
    EXPECT_EQ(dx1, dx2);
    for (int p = 0; p < MOE_PARAM_COUNT; ++p) {
        std::vector<float> g2 = param_grad(L, (moe_param_t)p);
        // the second backward computes the same values and adds them: g + g = 2g exactly in f32
        for (size_t i = 0; i < g2.size(); ++i) ASSERT_EQ(g2[i], 2.0f * g1[p][i]) << param_name(p);
    }
    ASSERT_EQ(moe_layer_zero_grad(L, nullptr), MOE_STATUS_SUCCESS);
    for (int p = 0; p < MOE_PARAM_COUNT; ++p)
        for (float v : param_grad(L, (moe_param_t)p)) ASSERT_EQ(v, 0.0f) << param_name(p);
    ASSERT_EQ(moe_layer_backward(L, dy.data(), dx3.data(), nullptr), MOE_STATUS_SUCCESS);
    EXPECT_EQ(dx1, dx3);
    for (int p = 0; p < MOE_PARAM_COUNT; ++p) EXPECT_EQ(param_grad(L, (moe_param_t)p), g1[p]);
}

TEST(Edge, InPlaceForwardAndBackward) {
    moe_layer_config_t c = small_config(8, 16, 4, 2);
    c.switch_loss_coef = c.z_loss_coef = 0.1;
    Layer A(c), B(c);
    ASSERT_EQ(A.status, MOE_STATUS_SUCCESS);
    ASSERT_EQ(B.status, MOE_STATUS_SUCCESS);
    const int64_t T = 45;
    std::vector<float> x = uniform(T * 8, 1), y(T * 8), dy = uniform(T * 8, 2), dx(T * 8);
    ASSERT_EQ(moe_layer_forward(A, x.data(), y.data(), T, 1, nullptr), MOE_STATUS_SUCCESS);
    ASSERT_EQ(moe_layer_backward(A, dy.data(), dx.data(), nullptr), MOE_STATUS_SUCCESS);
    std::vector<float> buf = x;  // y overwrites x
    ASSERT_EQ(moe_layer_forward(B, buf.data(), buf.data(), T, 1, nullptr), MOE_STATUS_SUCCESS);
    EXPECT_EQ(buf, y);
    buf = dy;  // dx overwrites dy
    ASSERT_EQ(moe_layer_backward(B, buf.data(), buf.data(), nullptr), MOE_STATUS_SUCCESS);
    EXPECT_EQ(buf, dx);
    for (int p = 0; p < MOE_PARAM_COUNT; ++p)
        EXPECT_EQ(param_grad(A, (moe_param_t)p), param_grad(B, (moe_param_t)p)) << param_name(p);
}

}  // namespace
