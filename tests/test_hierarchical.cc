// test_hierarchical.cc - hierarchical gating (router MOE_ROUTER_HIERARCHICAL): config checks,
// parameter shapes, the CPU layer against the float64 reference (outputs, routing, both levels'
// losses, dx and every gradient, with and without capacity), finite differences of the
// reference's backward of both levels, the one-group case against the flat router, and expert
// parallelism over local ranks against one rank.
#include <gtest/gtest.h>

#include <cstring>
#include <sstream>
#include <thread>

#include "ep_common.h"
#include "reference/reference.h"
#include "test_util.h"

using moeref::Forward;
using moeref::Model;

namespace {

moe_layer_config_t hier_config(int64_t D, int64_t F, int64_t E, int64_t G, int64_t k1,
                               int64_t k2) {
    moe_layer_config_t c = moetest::small_config(D, F, E, k1 * k2);
    c.router = MOE_ROUTER_HIERARCHICAL;
    c.num_groups = G;
    c.topk_group = k1;
    return c;
}

moe_status_t create_status(const moe_layer_config_t &cfg, std::string *msg) {
    moetest::Layer L(cfg);
    *msg = L.status == MOE_STATUS_SUCCESS ? "" : moe_last_error();
    return L.status;
}

// ---- config checks ------------------------------------------------------------------------

TEST(HierConfig, BadGroupsAreRejectedNamingTheField) {
    struct Bad {
        int64_t E, G, k1, K;
        moe_status_t want;
        const char *field;
    } bad[] = {
        {8, 3, 1, 2, MOE_STATUS_INVALID_ARGUMENT, "num_groups"},   // 3 does not divide 8
        {8, 0, 1, 2, MOE_STATUS_INVALID_ARGUMENT, "num_groups"},   // no groups
        {8, 16, 1, 2, MOE_STATUS_INVALID_ARGUMENT, "num_groups"},  // more groups than experts
        {8, -2, 1, 2, MOE_STATUS_INVALID_ARGUMENT, "num_groups"},
        {8, 4, 0, 2, MOE_STATUS_INVALID_ARGUMENT, "topk_group"},
        {8, 4, 5, 5, MOE_STATUS_INVALID_ARGUMENT, "topk_group"},  // k1 > G
        {8, 4, 2, 3, MOE_STATUS_INVALID_ARGUMENT, "top_k"},       // 3 not divisible by 2
        {8, 4, 1, 3, MOE_STATUS_INVALID_ARGUMENT, "top_k"},       // k2 = 3 > E/G = 2
    };
    for (const Bad &b : bad) {
        moe_layer_config_t c = moetest::small_config(8, 16, b.E, b.K);
        c.router = MOE_ROUTER_HIERARCHICAL;
        c.num_groups = b.G;
        c.topk_group = b.k1;
        std::string msg;
        EXPECT_EQ(create_status(c, &msg), b.want) << "G " << b.G << " k1 " << b.k1;
        EXPECT_NE(msg.find(b.field), std::string::npos) << msg;
    }
}

TEST(HierConfig, UnsupportedCombinationsSayWhich) {
    std::string msg;
    moe_layer_config_t c = hier_config(8, 16, 8, 4, 2, 1);
    c.noisy_gating = 1;
    EXPECT_EQ(create_status(c, &msg), MOE_STATUS_NOT_SUPPORTED);
    EXPECT_NE(msg.find("noisy_gating"), std::string::npos) << msg;
    c = hier_config(8, 16, 8, 4, 2, 1);
    c.bias_update_rate = 0.01;
    EXPECT_EQ(create_status(c, &msg), MOE_STATUS_NOT_SUPPORTED);
    EXPECT_NE(msg.find("bias_update_rate"), std::string::npos) << msg;
    // groups without the hierarchical router are group-limited token choice: their own checks
    c = moetest::small_config(8, 16, 8, 2);
    c.num_groups = 3;
    c.topk_group = 2;
    EXPECT_EQ(create_status(c, &msg), MOE_STATUS_INVALID_ARGUMENT);
    EXPECT_NE(msg.find("num_groups"), std::string::npos) << msg;
    c.num_groups = 4;
    EXPECT_EQ(create_status(c, &msg), MOE_STATUS_SUCCESS) << msg;
    // one group is no group
    c.num_groups = 1;
    EXPECT_EQ(create_status(c, &msg), MOE_STATUS_SUCCESS) << msg;
}

TEST(HierConfig, ParameterShapesAndInit) {
    const int64_t D = 6, E = 12, G = 3;
    moetest::Layer L(hier_config(D, 10, E, G, 2, 2));
    ASSERT_EQ(L.status, MOE_STATUS_SUCCESS) << moe_last_error();
    void *v = nullptr, *g = nullptr;
    int64_t n = 0;
    ASSERT_EQ(moe_layer_param(L, MOE_PARAM_ROUTER_WEIGHT, &v, &g, &n), MOE_STATUS_SUCCESS);
    EXPECT_EQ(n, D * G);
    ASSERT_EQ(moe_layer_param(L, MOE_PARAM_SECONDARY_ROUTER_WEIGHT, &v, &g, &n),
              MOE_STATUS_SUCCESS);
    EXPECT_EQ(n, G * D * (E / G));
    ASSERT_NE(v, nullptr);
    ASSERT_NE(g, nullptr);
    // U(-1/sqrt(D), 1/sqrt(D)), not all equal, gradient zero
    std::vector<float> w = moetest::param_value(L, MOE_PARAM_SECONDARY_ROUTER_WEIGHT);
    float lo = 1e9f, hi = -1e9f;
    for (float a : w) lo = std::min(lo, a), hi = std::max(hi, a);
    EXPECT_LE(hi, 1.0f / std::sqrt((float)D));
    EXPECT_GE(lo, -1.0f / std::sqrt((float)D));
    EXPECT_LT(lo, hi);
    for (float a : moetest::param_grad(L, MOE_PARAM_SECONDARY_ROUTER_WEIGHT)) EXPECT_EQ(a, 0.0f);
    // the flat router has no secondary routers
    moetest::Layer F(moetest::small_config(D, 10, E, 2));
    ASSERT_EQ(moe_layer_param(F, MOE_PARAM_SECONDARY_ROUTER_WEIGHT, &v, &g, &n),
              MOE_STATUS_SUCCESS);
    EXPECT_EQ(v, nullptr);
    EXPECT_EQ(n, 0);
    // forced routing is refused, the layer stays usable
    std::vector<int32_t> idx(4, 0);
    std::vector<float> gt(4, 0.5f);
    EXPECT_EQ(moe_layer_force_routing(L, idx.data(), gt.data(), 1), MOE_STATUS_NOT_SUPPORTED);
}

// ---- the layer against the float64 reference ---------------------------------------------

struct HierCase {
    int id;
    int64_t T, D, F, E, G, k1, k2;
    moe_activation_t act;
    moe_gate_t gate;
    int renorm;
    double capacity;
    moe_priority_t prio;
};

std::string case_name(const HierCase &c) {
    std::ostringstream o;
    o << "c" << c.id << "_E" << c.E << "G" << c.G << "_k" << c.k1 << "x" << c.k2
      << (c.gate == MOE_GATE_SOFTMAX_OF_TOPK ? "_sotk" : "_tkos") << (c.renorm ? "R" : "")
      << "_cap" << (int)(c.capacity * 10) << (c.prio == MOE_PRIORITY_SCORE ? "S" : "P");
    return o.str();
}

void PrintTo(const HierCase &c, std::ostream *os) { *os << case_name(c); }

void expect_level_losses(const moe_routing_stats_t &st, const Forward &f) {
    for (int l = 0; l < 2; ++l) {
        EXPECT_LE(moetest::scalar_err(st.level_switch_loss[l], f.level_switch[l]),
                  moetest::kTolLoss)
            << "switch level " << l;
        EXPECT_LE(moetest::scalar_err(st.level_importance_loss[l], f.level_importance[l]),
                  moetest::kTolLoss)
            << "importance level " << l;
        EXPECT_LE(moetest::scalar_err(st.level_load_loss[l], f.level_load[l]), moetest::kTolLoss)
            << "load level " << l;
        EXPECT_LE(moetest::scalar_err(st.level_z_loss[l], f.level_z[l]), moetest::kTolLoss)
            << "z level " << l;
    }
}

class HierVsReference : public ::testing::TestWithParam<HierCase> {};

TEST_P(HierVsReference, ForwardBackwardMatch) {
    const HierCase &c = GetParam();
    moe_layer_config_t cfg = hier_config(c.D, c.F, c.E, c.G, c.k1, c.k2);
    cfg.activation = c.act;
    cfg.gate = c.gate;
    cfg.renormalize = c.renorm;
    cfg.capacity_factor = c.capacity;
    cfg.priority = c.prio;
    cfg.switch_loss_coef = 0.05;
    cfg.importance_loss_coef = 0.04;
    cfg.load_loss_coef = 0.03;
    cfg.z_loss_coef = 0.002;
    cfg.seed = 500 + (uint64_t)c.id;
    moetest::Layer L(cfg);
    ASSERT_EQ(L.status, MOE_STATUS_SUCCESS) << moe_last_error();
    // routers with logits of std ~2, where near-ties are rare
    const float a = 6.0f / std::sqrt((float)c.D);
    moetest::set_param(L, MOE_PARAM_ROUTER_WEIGHT,
                       moetest::uniform(c.D * c.G, 21 + c.id, -a, a));
    moetest::set_param(L, MOE_PARAM_SECONDARY_ROUTER_WEIGHT,
                       moetest::uniform(c.D * c.E, 22 + c.id, -a, a));
    Model m = Model::from_layer(L);
    std::vector<float> x;
    Forward f;
    int tries = 0;
    for (; tries < 6; ++tries) {
        x = moetest::uniform(c.T * c.D, 7000003ull * c.id + tries);
        f = m.forward(moetest::to_double(x), c.T, true, 0);
        if (f.num_fragile == 0) break;
    }
    ASSERT_LT(tries, 6) << "no input without near-ties";
    if (c.capacity > 0 && c.capacity < 1) {
        EXPECT_GT(f.num_dropped, 0) << "capacity < 1 should drop";
    }
    EXPECT_GT(f.level_switch[1], 0.0);
    f = moetest::check_against_reference(L, x, c.T, 1, 0, nullptr, 91 + c.id);
    moe_routing_stats_t st{};
    ASSERT_EQ(moe_layer_stats(L, &st, nullptr, nullptr), MOE_STATUS_SUCCESS);
    expect_level_losses(st, f);
    // a token's experts lie in its chosen groups, k2 per group, and its gates are products
    std::vector<int32_t> idx(c.T * c.k1 * c.k2);
    ASSERT_EQ(moe_layer_routing(L, idx.data(), nullptr, nullptr), MOE_STATUS_SUCCESS);
    const int64_t Eg = c.E / c.G, K = c.k1 * c.k2;
    for (int64_t t = 0; t < c.T; ++t)
        for (int64_t j = 0; j < K; ++j)
            EXPECT_EQ(idx[t * K + j] / Eg, f.grp[t * c.k1 + j / c.k2]) << "token " << t;
}

std::vector<HierCase> make_cases() {
    // (E, G, k1, k2): every level shape, including one group (k1 = 1 of G = 1), one expert per
    // group (Eg = 1), all groups (k1 = G) and all experts of a group (k2 = Eg)
    const int64_t shapes[][4] = {{8, 4, 2, 1}, {8, 2, 1, 2}, {12, 3, 2, 2}, {16, 4, 2, 2},
                                 {16, 4, 4, 1}, {6, 1, 1, 2}, {8, 8, 2, 1}, {12, 4, 1, 3},
                                 {32, 8, 3, 2}};
    const double caps[] = {0.0, 0.5, 1.0, 2.0};
    std::vector<HierCase> v;
    std::mt19937 rng(20261202);
    for (size_t s = 0; s < sizeof shapes / sizeof shapes[0]; ++s)
        for (int q = 0; q < 2; ++q) {
            HierCase c{};
            c.id = (int)v.size();
            c.E = shapes[s][0], c.G = shapes[s][1], c.k1 = shapes[s][2], c.k2 = shapes[s][3];
            c.T = 40 + (int64_t)(rng() % 90);
            c.D = 8 + 8 * (int64_t)(rng() % 2);
            c.F = 16;
            c.act = (moe_activation_t)((s + q) % 4);
            c.gate = (moe_gate_t)((s + q) % 2);
            c.renorm = (int)((s / 2 + q) % 2);
            c.capacity = caps[(s + 2 * q) % 4];
            c.prio = (moe_priority_t)(q % 2);
            v.push_back(c);
        }
    return v;
}

INSTANTIATE_TEST_SUITE_P(Grid, HierVsReference, ::testing::ValuesIn(make_cases()),
                         [](const ::testing::TestParamInfo<HierCase> &i) {
                             return case_name(i.param);
                         });

// an inference forward after a training one routes the same way (no noise) and differentiates
TEST(HierLayer, InferenceAndRepeatedCalls) {
    moe_layer_config_t cfg = hier_config(8, 16, 12, 3, 2, 2);
    cfg.switch_loss_coef = 0.1;
    cfg.importance_loss_coef = 0.1;
    moetest::Layer L(cfg);
    ASSERT_EQ(L.status, MOE_STATUS_SUCCESS);
    moetest::set_param(L, MOE_PARAM_ROUTER_WEIGHT, moetest::uniform(8 * 3, 3, -2.0f, 2.0f));
    moetest::set_param(L, MOE_PARAM_SECONDARY_ROUTER_WEIGHT,
                       moetest::uniform(8 * 12, 4, -2.0f, 2.0f));
    std::vector<float> x = moetest::uniform(50 * 8, 5);
    int skipped = 0;
    moetest::check_against_reference(L, x, 50, 1, 0, &skipped);
    moetest::check_against_reference(L, x, 50, 0, 0, &skipped);
    std::vector<float> x2 = moetest::uniform(31 * 8, 6);  // fewer tokens: buffers are reused
    moetest::check_against_reference(L, x2, 31, 1, 0, &skipped);
    EXPECT_EQ(skipped, 0);
    // no tokens at all
    ASSERT_EQ(moe_layer_forward(L, nullptr, nullptr, 0, 1, nullptr), MOE_STATUS_SUCCESS);
    moe_routing_stats_t st{};
    ASSERT_EQ(moe_layer_stats(L, &st, nullptr, nullptr), MOE_STATUS_SUCCESS);
    EXPECT_EQ(st.num_tokens, 0);
    EXPECT_EQ(st.level_switch_loss[1], 0.0);
    EXPECT_EQ(moe_layer_backward(L, nullptr, nullptr, nullptr), MOE_STATUS_SUCCESS);
}

// One group chosen of one: the primary gate is 1 and the secondary router is a flat router
// over all E experts, so the layer equals the flat token-choice layer with Wg = Ws, and the
// secondary level's losses equal the flat ones (switch and importance coefs on; the z-loss
// coef is off, because the primary level's z-loss has a gradient of its own).
TEST(HierLayer, OneGroupEqualsFlatRouter) {
    const int64_t D = 8, E = 8, K = 2, T = 70;
    for (int gate = 0; gate < 2; ++gate) {
        moe_layer_config_t hc = hier_config(D, 16, E, 1, 1, K), fc = moetest::small_config(D, 16, E, K);
        for (moe_layer_config_t *c : {&hc, &fc}) {
            c->gate = (moe_gate_t)gate;
            c->renormalize = 0;
            c->switch_loss_coef = 0.2;
            c->importance_loss_coef = 0.3;
            c->seed = 9;
        }
        moetest::Layer H(hc), Fl(fc);
        ASSERT_EQ(H.status, MOE_STATUS_SUCCESS) << moe_last_error();
        ASSERT_EQ(Fl.status, MOE_STATUS_SUCCESS);
        std::vector<float> w = moetest::uniform(D * E, 13, -1.5f, 1.5f);
        moetest::set_param(H, MOE_PARAM_SECONDARY_ROUTER_WEIGHT, w);
        moetest::set_param(Fl, MOE_PARAM_ROUTER_WEIGHT, w);
        for (int p = MOE_PARAM_W1; p <= MOE_PARAM_B2; ++p)
            moetest::set_param(H, (moe_param_t)p, moetest::param_value(Fl, (moe_param_t)p));
        std::vector<float> x = moetest::uniform(T * D, 14), dy = moetest::uniform(T * D, 15);
        moetest::LibRun rh, rf;
        moetest::library_forward(H, x, T, 1, D, E, K, &rh);
        moetest::library_forward(Fl, x, T, 1, D, E, K, &rf);
        EXPECT_EQ(rh.idx, rf.idx);
        EXPECT_EQ(rh.counts, rf.counts);
        for (size_t i = 0; i < rh.gate.size(); ++i) EXPECT_NEAR(rh.gate[i], rf.gate[i], 1e-6);
        EXPECT_LE(moetest::rel_err(rh.y, moetest::to_double(rf.y)), 1e-6);
        EXPECT_NEAR(rh.st.level_switch_loss[1], rf.st.switch_loss, 1e-6);
        EXPECT_NEAR(rh.st.level_importance_loss[1], rf.st.importance_loss, 1e-6);
        EXPECT_NEAR(rh.st.level_load_loss[1], rf.st.load_loss, 1e-6);
        EXPECT_NEAR(rh.st.level_z_loss[1], rf.st.z_loss, 1e-5);
        EXPECT_NEAR(rh.st.level_switch_loss[0], 1.0, 1e-12);  // one group takes every token
        EXPECT_EQ(rh.st.level_importance_loss[0], 0.0);
        std::vector<float> dxh(T * D), dxf(T * D);
        ASSERT_EQ(moe_layer_backward(H, dy.data(), dxh.data(), nullptr), MOE_STATUS_SUCCESS);
        ASSERT_EQ(moe_layer_backward(Fl, dy.data(), dxf.data(), nullptr), MOE_STATUS_SUCCESS);
        EXPECT_LE(moetest::rel_err(dxh, moetest::to_double(dxf)), 1e-5);
        EXPECT_LE(moetest::rel_err(moetest::param_grad(H, MOE_PARAM_SECONDARY_ROUTER_WEIGHT),
                                   moetest::to_double(moetest::param_grad(Fl, MOE_PARAM_ROUTER_WEIGHT))),
                  1e-5);
        for (float g : moetest::param_grad(H, MOE_PARAM_ROUTER_WEIGHT)) EXPECT_EQ(g, 0.0f);
    }
}

// the same forward and backward twice on fresh layers: bitwise identical results (fixed orders)
TEST(HierLayer, Deterministic) {
    moe_layer_config_t cfg = hier_config(16, 24, 32, 8, 3, 2);
    cfg.capacity_factor = 1.0;
    cfg.priority = MOE_PRIORITY_SCORE;
    cfg.switch_loss_coef = 0.1;
    cfg.importance_loss_coef = 0.1;
    cfg.z_loss_coef = 0.01;
    const int64_t T = 700, D = 16;  // several reduction blocks of 256 tokens
    std::vector<float> x = moetest::uniform(T * D, 31), dy = moetest::uniform(T * D, 32);
    std::vector<float> y[2], dx[2], gws[2], gwp[2];
    moe_routing_stats_t st[2];
    for (int run = 0; run < 2; ++run) {
        moetest::Layer L(cfg);
        ASSERT_EQ(L.status, MOE_STATUS_SUCCESS);
        y[run].assign(T * D, 0.0f);
        dx[run].assign(T * D, 0.0f);
        ASSERT_EQ(moe_layer_forward(L, x.data(), y[run].data(), T, 1, nullptr), MOE_STATUS_SUCCESS);
        ASSERT_EQ(moe_layer_backward(L, dy.data(), dx[run].data(), nullptr), MOE_STATUS_SUCCESS);
        ASSERT_EQ(moe_layer_stats(L, &st[run], nullptr, nullptr), MOE_STATUS_SUCCESS);
        gws[run] = moetest::param_grad(L, MOE_PARAM_SECONDARY_ROUTER_WEIGHT);
        gwp[run] = moetest::param_grad(L, MOE_PARAM_ROUTER_WEIGHT);
    }
    EXPECT_EQ(y[0], y[1]);
    EXPECT_EQ(dx[0], dx[1]);
    EXPECT_EQ(gws[0], gws[1]);
    EXPECT_EQ(gwp[0], gwp[1]);
    EXPECT_EQ(std::memcmp(st[0].level_switch_loss, st[1].level_switch_loss,
                          sizeof st[0].level_switch_loss), 0);
    EXPECT_EQ(st[0].aux_loss, st[1].aux_loss);
    EXPECT_GT(st[0].num_dropped, 0);
}

// ---- finite differences of the reference's backward --------------------------------------

struct GradCase {
    const char *name;
    int64_t E, G, k1, k2;
    moe_gate_t gate;
    int renorm;
    double capacity;
    double sw, imp, load, z;
    bool dy_zero;
};

void PrintTo(const GradCase &c, std::ostream *os) { *os << c.name; }

class HierGradCheck : public ::testing::TestWithParam<GradCase> {};

TEST_P(HierGradCheck, ReferenceBackwardMatchesCentralDifferences) {
    const GradCase &c = GetParam();
    const int64_t D = 5, F = 4, T = 10;
    moe_layer_config_t cfg = hier_config(D, F, c.E, c.G, c.k1, c.k2);
    cfg.gate = c.gate;
    cfg.renormalize = c.renorm;
    cfg.capacity_factor = c.capacity;
    cfg.switch_loss_coef = c.sw;
    cfg.importance_loss_coef = c.imp;
    cfg.load_loss_coef = c.load;
    cfg.z_loss_coef = c.z;
    cfg.seed = 123;
    moetest::Layer L(cfg);
    ASSERT_EQ(L.status, MOE_STATUS_SUCCESS) << moe_last_error();
    Model m = Model::from_layer(L);
    m.param[MOE_PARAM_ROUTER_WEIGHT] = moetest::to_double(moetest::uniform(D * c.G, 6, -1.0f, 1.0f));
    m.param[MOE_PARAM_SECONDARY_ROUTER_WEIGHT] =
        moetest::to_double(moetest::uniform(D * c.E, 16, -1.0f, 1.0f));
    std::vector<double> x = moetest::to_double(moetest::uniform(T * D, 7));
    std::vector<double> dy = moetest::to_double(moetest::uniform(T * D, 8));
    if (c.dy_zero) std::fill(dy.begin(), dy.end(), 0.0);
    Forward base = m.forward(x, T, true, 0);
    moeref::Grads g = m.backward(base, x, dy);
    ASSERT_GT(base.aux_loss, 0.0);
    const double h = 1e-6;
    int skipped = 0, checked = 0;
    double max_router = 0;  // both routers must receive a gradient
    for (int p = 0; p <= MOE_PARAM_COUNT; ++p) {
        std::vector<double> &theta = p < MOE_PARAM_COUNT ? m.param[p] : x;
        const std::vector<double> &an = p < MOE_PARAM_COUNT ? g.param[p] : g.dx;
        ASSERT_EQ(theta.size(), an.size());
        double max_an = 0, max_err = 0;
        for (size_t i = 0; i < theta.size(); ++i) {
            double keep = theta[i];
            theta[i] = keep + h;
            Forward fp = m.forward(x, T, true, 0);
            theta[i] = keep - h;
            Forward fm = m.forward(x, T, true, 0);
            theta[i] = keep;
            if (fp.idx != base.idx || fp.kept != base.kept || fm.idx != base.idx ||
                fm.kept != base.kept) {
                ++skipped;
                continue;
            }
            double fd = (Model::total_loss(fp, dy) - Model::total_loss(fm, dy)) / (2 * h);
            max_an = std::max(max_an, std::fabs(an[i]));
            max_err = std::max(max_err, std::fabs(fd - an[i]));
            ++checked;
        }
        // the tolerance of test_gradcheck.cc: FD truncation ~1e-12, rounding ~1e-9
        EXPECT_LE(max_err, 1e-6 * max_an + 1e-8)
            << (p < MOE_PARAM_COUNT ? moetest::param_name(p) : "x") << " max|grad| " << max_an;
        if (p == MOE_PARAM_ROUTER_WEIGHT || p == MOE_PARAM_SECONDARY_ROUTER_WEIGHT) {
            EXPECT_GT(max_an, 1e-6) << moetest::param_name(p) << " gets no gradient";
            max_router = std::max(max_router, max_an);
        }
    }
    EXPECT_LE(skipped, 2) << "coordinates whose routing flipped within +-h";
    EXPECT_GT(checked, 50);
}

const GradCase kGradCases[] = {
    // name, E, G, k1, k2, gate, renorm, capacity, sw, imp, load, z, dy_zero
    {"all_sotk", 8, 4, 2, 2, MOE_GATE_SOFTMAX_OF_TOPK, 1, 0.0, 0.3, 0.2, 0.4, 0.1, false},
    {"all_tkos_raw_cap", 8, 4, 2, 1, MOE_GATE_TOPK_OF_SOFTMAX, 0, 1.0, 0.3, 0.2, 0.4, 0.1, false},
    {"all_tkos_renorm", 12, 3, 2, 2, MOE_GATE_TOPK_OF_SOFTMAX, 1, 0.0, 0.3, 0.2, 0.4, 0.1, false},
    {"k1_eq_g", 6, 3, 3, 1, MOE_GATE_TOPK_OF_SOFTMAX, 0, 0.0, 0.3, 0.2, 0.4, 0.1, false},
    // each loss alone with dy = 0: only the losses of both levels drive the routers
    {"switch_only", 8, 4, 2, 1, MOE_GATE_SOFTMAX_OF_TOPK, 1, 0.0, 1.0, 0, 0, 0, true},
    {"switch_only_tkos", 12, 3, 1, 2, MOE_GATE_TOPK_OF_SOFTMAX, 0, 0.0, 1.0, 0, 0, 0, true},
    {"importance_only", 8, 4, 2, 2, MOE_GATE_SOFTMAX_OF_TOPK, 1, 0.0, 0, 1.0, 0, 0, true},
    {"importance_only_tkos", 8, 2, 1, 2, MOE_GATE_TOPK_OF_SOFTMAX, 0, 0.0, 0, 1.0, 0, 0, true},
    {"z_only", 8, 4, 2, 1, MOE_GATE_SOFTMAX_OF_TOPK, 1, 0.0, 0, 0, 0, 1.0, true},
};

INSTANTIATE_TEST_SUITE_P(Reference, HierGradCheck, ::testing::ValuesIn(kGradCases),
                         [](const ::testing::TestParamInfo<GradCase> &i) {
                             return std::string(i.param.name);
                         });

// ---- expert parallelism over local ranks ------------------------------------------------------

struct RankOut {
    ep::Result r;
    std::vector<float> ws_reduced;  // the secondary routers' gradient after the all-reduce
};

TEST(HierEp, LocalRanksMatchOneRank) {
    const int64_t E = 12, T = 83;
    for (int P : {2, 3, 4}) {
        if (E % P) continue;
        moe_layer_config_t cfg = ep::small_config(E, 4);
        cfg.router = MOE_ROUTER_HIERARCHICAL;
        cfg.num_groups = 3;
        cfg.topk_group = 2;
        cfg.switch_loss_coef = 0.1;  // global losses: dx must match with them on
        cfg.importance_loss_coef = 0.05;
        cfg.z_loss_coef = 0.01;
        const int64_t D = cfg.d_model;
        auto x = ep::make_tokens(T, D, 41), dy = ep::make_tokens(T, D, 42);
        auto begin = ep::split(T, P, P == 4 ? 1 : -1);  // with 4 ranks, rank 1 has no tokens
        auto none = [](moe_layer_t *) {};
        ep::Result ref = ep::run_rank(nullptr, cfg, x.data(), dy.data(), T, none);
        ASSERT_EQ(ref.status, MOE_STATUS_SUCCESS) << ref.error;

        std::vector<moe_comm_t *> comms((size_t)P);
        ASSERT_EQ(moe_comm_create_local(comms.data(), P), MOE_STATUS_SUCCESS);
        std::vector<RankOut> out((size_t)P);
        std::vector<std::thread> th;
        for (int r = 0; r < P; ++r)
            th.emplace_back([&, r] {
                int64_t b = begin[(size_t)r], Tr = begin[(size_t)r + 1] - b;
                out[(size_t)r].r = ep::run_rank(comms[(size_t)r], cfg, x.data() + b * D,
                                                dy.data() + b * D, Tr, none);
                // again with the router all-reduce: every rank then holds the sum
                moe_context_t *ctx = nullptr;
                moe_layer_t *l = nullptr;
                if (moe_context_create(&ctx, MOE_BACKEND_CPU, 0, comms[(size_t)r]) ||
                    moe_layer_create(&l, ctx, &cfg))
                    return;
                std::vector<float> y(Tr * D), dx(Tr * D);
                if (!moe_layer_forward(l, Tr ? x.data() + b * D : nullptr, Tr ? y.data() : nullptr,
                                       Tr, 1, nullptr) &&
                    !moe_layer_backward(l, Tr ? dy.data() + b * D : nullptr,
                                        Tr ? dx.data() : nullptr, nullptr) &&
                    !moe_layer_allreduce_router_grads(l, nullptr))
                    out[(size_t)r].ws_reduced =
                        moetest::param_grad(l, MOE_PARAM_SECONDARY_ROUTER_WEIGHT);
                moe_layer_destroy(l);
                moe_context_destroy(ctx);
            });
        for (auto &t : th) t.join();
        for (auto *c : comms) EXPECT_EQ(moe_comm_destroy(c), MOE_STATUS_SUCCESS);

        // f32 throughout; the ranks sum each expert's rows in another order: a few ulp
        const double tol = 1e-5;
        const int64_t El = E / P, F = cfg.d_ff;
        const int64_t per[] = {D * F, F, F * D, D};  // W1, B1, W2, B2 per expert
        std::vector<double> sum_wp(ref.grad[MOE_PARAM_ROUTER_WEIGHT].size(), 0.0);
        std::vector<double> sum_ws(ref.grad[MOE_PARAM_SECONDARY_ROUTER_WEIGHT].size(), 0.0);
        for (int r = 0; r < P; ++r) {
            const ep::Result &R = out[(size_t)r].r;
            ASSERT_EQ(R.status, MOE_STATUS_SUCCESS) << "rank " << r << ": " << R.error;
            int64_t b = begin[(size_t)r], n = (begin[(size_t)r + 1] - b) * D;
            if (n > 0) {
                EXPECT_LE(ep::rel_err(R.y.data(), ref.y.data() + b * D, n), tol) << "y " << r;
                EXPECT_LE(ep::rel_err(R.dx.data(), ref.dx.data() + b * D, n), tol) << "dx " << r;
            }
            for (int p = MOE_PARAM_W1; p <= MOE_PARAM_B2; ++p) {
                const int64_t q = per[p - MOE_PARAM_W1];
                ASSERT_EQ((int64_t)R.grad[p].size(), El * q);
                EXPECT_LE(ep::rel_err(R.grad[p].data(), ref.grad[p].data() + r * El * q, El * q),
                          tol)
                    << "param " << p << " rank " << r;
            }
            for (size_t i = 0; i < sum_wp.size(); ++i)
                sum_wp[i] += R.grad[MOE_PARAM_ROUTER_WEIGHT][i];
            for (size_t i = 0; i < sum_ws.size(); ++i)
                sum_ws[i] += R.grad[MOE_PARAM_SECONDARY_ROUTER_WEIGHT][i];
            EXPECT_EQ(R.stats.num_tokens, T);
            EXPECT_EQ(R.tokens_per_expert, ref.tokens_per_expert);
            for (int l = 0; l < 2; ++l) {
                EXPECT_NEAR(R.stats.level_switch_loss[l], ref.stats.level_switch_loss[l], 1e-6);
                EXPECT_NEAR(R.stats.level_importance_loss[l], ref.stats.level_importance_loss[l],
                            1e-6);
                EXPECT_NEAR(R.stats.level_z_loss[l], ref.stats.level_z_loss[l], 1e-5);
                EXPECT_NEAR(R.stats.level_load_loss[l], ref.stats.level_load_loss[l], 1e-9);
            }
            ASSERT_EQ(out[(size_t)r].ws_reduced.size(), sum_ws.size()) << "all-reduce rank " << r;
        }
        std::vector<float> fwp(sum_wp.begin(), sum_wp.end()), fws(sum_ws.begin(), sum_ws.end());
        const auto &rwp = ref.grad[MOE_PARAM_ROUTER_WEIGHT];
        const auto &rws = ref.grad[MOE_PARAM_SECONDARY_ROUTER_WEIGHT];
        EXPECT_LE(ep::rel_err(fwp.data(), rwp.data(), (int64_t)fwp.size()), tol) << "P " << P;
        EXPECT_LE(ep::rel_err(fws.data(), rws.data(), (int64_t)fws.size()), tol) << "P " << P;
        for (int r = 0; r < P; ++r)
            EXPECT_LE(ep::rel_err(out[(size_t)r].ws_reduced.data(), rws.data(),
                                  (int64_t)rws.size()),
                      tol)
                << "reduced secondary router gradient, rank " << r;
    }
}

}  // namespace
