// test_shared_experts.cc - shared experts (always active, optionally behind a per-token sigmoid
// gate): config validation, parameters, the CPU layer against the float64 reference for a
// Qwen2-MoE-shaped and a DeepSeek-shaped layer, finite differences of the reference, and expert
// parallelism on the local communicator against one rank.
#include <gtest/gtest.h>

#include <cstring>
#include <string>
#include <thread>

#include "ep_common.h"
#include "reference/reference.h"
#include "test_util.h"

using moeref::Forward;
using moeref::Model;

namespace {

// ---- validation ------------------------------------------------------------------------------

struct BadField {
    const char *field;
    void (*set)(moe_layer_config_t *);
};

TEST(SharedExperts, ValidationNamesTheField) {
    const BadField bad[] = {
        {"num_shared_experts", [](moe_layer_config_t *c) { c->num_shared_experts = -1; }},
        {"num_shared_experts", [](moe_layer_config_t *c) { c->num_shared_experts = 5000; }},
        {"shared_d_ff", [](moe_layer_config_t *c) { c->num_shared_experts = 1, c->shared_d_ff = -3; }},
        {"shared_d_ff", [](moe_layer_config_t *c) { c->shared_d_ff = 16; }},  // S = 0
        {"shared_expert_gate", [](moe_layer_config_t *c) { c->shared_expert_gate = 1; }},  // S = 0
        {"shared_expert_gate",
         [](moe_layer_config_t *c) { c->num_shared_experts = 1, c->shared_expert_gate = 2; }},
    };
    moe_context_t *ctx = nullptr;
    ASSERT_EQ(moe_context_create(&ctx, MOE_BACKEND_CPU, 0, nullptr), MOE_STATUS_SUCCESS);
    for (const BadField &b : bad) {
        moe_layer_config_t cfg = moetest::small_config();
        b.set(&cfg);
        moe_layer_t *layer = reinterpret_cast<moe_layer_t *>(0x1);
        EXPECT_EQ(moe_layer_create(&layer, ctx, &cfg), MOE_STATUS_INVALID_ARGUMENT) << b.field;
        EXPECT_EQ(layer, nullptr);
        EXPECT_NE(std::string(moe_last_error()).find(std::string("cfg->") + b.field),
                  std::string::npos)
            << moe_last_error();
    }
    EXPECT_EQ(moe_context_destroy(ctx), MOE_STATUS_SUCCESS);  // nothing was left behind
}

TEST(SharedExperts, ParametersFollowTheConfig) {
    const int64_t D = 8, F = 16;
    for (int swiglu = 0; swiglu < 2; ++swiglu)
        for (int bias = 0; bias < 2; ++bias)
            for (int gated = 0; gated < 2; ++gated) {
                moe_layer_config_t cfg = moetest::small_config(D, F, 4, 2);
                cfg.activation = swiglu ? MOE_ACTIVATION_SWIGLU : MOE_ACTIVATION_GELU;
                cfg.expert_bias = bias;
                cfg.num_shared_experts = 3;
                cfg.shared_d_ff = 10;
                cfg.shared_expert_gate = gated;
                moetest::Layer L(cfg);
                ASSERT_EQ(L.status, MOE_STATUS_SUCCESS) << moe_last_error();
                const int64_t F2 = swiglu ? 20 : 10;
                const int64_t want[5] = {3 * D * F2, bias ? 3 * F2 : 0, 3 * 10 * D,
                                         bias ? 3 * D : 0, gated ? D : 0};
                for (int i = 0; i < 5; ++i) {
                    void *v = nullptr, *g = nullptr;
                    int64_t n = -1;
                    ASSERT_EQ(moe_layer_param(L, (moe_param_t)(MOE_PARAM_SHARED_W1 + i), &v, &g,
                                              &n),
                              MOE_STATUS_SUCCESS);
                    EXPECT_EQ(n, want[i]) << "param " << MOE_PARAM_SHARED_W1 + i;
                    EXPECT_EQ(v == nullptr, want[i] == 0);
                    if (n > 0) {  // initialised (nonzero, within the bound), gradient zero
                        auto val = moetest::param_value(L, (moe_param_t)(MOE_PARAM_SHARED_W1 + i));
                        auto grd = moetest::param_grad(L, (moe_param_t)(MOE_PARAM_SHARED_W1 + i));
                        double mx = 0;
                        for (float a : val) mx = std::max(mx, (double)std::fabs(a));
                        EXPECT_GT(mx, 0.0);
                        EXPECT_LE(mx, 1.0 / std::sqrt(i >= 2 && i <= 3 ? 10.0 : (double)D));
                        for (float a : grd) EXPECT_EQ(a, 0.0f);
                    }
                }
            }
    // no shared experts: every SHARED_* parameter is off
    moetest::Layer L(moetest::small_config());
    for (int p = MOE_PARAM_SHARED_W1; p <= MOE_PARAM_SHARED_GATE; ++p) {
        void *v = reinterpret_cast<void *>(0x1);
        int64_t n = -1;
        ASSERT_EQ(moe_layer_param(L, (moe_param_t)p, &v, nullptr, &n), MOE_STATUS_SUCCESS);
        EXPECT_EQ(v, nullptr);
        EXPECT_EQ(n, 0);
    }
}

// ---- the layer against the float64 reference ---------------------------------------------------

struct Shape {
    const char *name;
    int64_t T, D, F, E, K, S, Fs;
    moe_activation_t act;
    moe_gate_t gate;
    int renorm, bias, gated;
    double capacity;
};

void PrintTo(const Shape &c, std::ostream *os) { *os << c.name; }

const Shape kShapes[] = {
    // Qwen2-MoE: SwiGLU experts without biases, top-k of the softmax without renormalisation,
    // one shared expert 4x as wide as a routed one behind a sigmoid gate
    {"qwen2_moe", 61, 16, 8, 8, 4, 1, 32, MOE_ACTIVATION_SWIGLU, MOE_GATE_TOPK_OF_SOFTMAX, 0, 0, 1,
     0.0},
    // DeepSeek (V2 style gates): 2 ungated shared experts of the routed width, renormalised gates
    {"deepseek_2_shared", 57, 16, 8, 16, 4, 2, 0, MOE_ACTIVATION_SWIGLU, MOE_GATE_TOPK_OF_SOFTMAX,
     1, 0, 0, 0.0},
    // biases, GELU, capacity drops (a dropped token still gets its shared experts), 3 gated
    {"gelu_bias_cap_3_gated", 50, 12, 10, 4, 2, 3, 6, MOE_ACTIVATION_GELU,
     MOE_GATE_SOFTMAX_OF_TOPK, 1, 1, 1, 0.5},
    {"relu_bias_k1_ungated", 40, 8, 12, 4, 1, 1, 0, MOE_ACTIVATION_RELU, MOE_GATE_SOFTMAX_OF_TOPK,
     1, 1, 0, 0.0},
};

moe_layer_config_t shape_config(const Shape &c) {
    moe_layer_config_t cfg = moetest::small_config(c.D, c.F, c.E, c.K);
    cfg.activation = c.act;
    cfg.gate = c.gate;
    cfg.renormalize = c.renorm;
    cfg.expert_bias = c.bias;
    cfg.capacity_factor = c.capacity;
    cfg.num_shared_experts = c.S;
    cfg.shared_d_ff = c.Fs;
    cfg.shared_expert_gate = c.gated;
    cfg.switch_loss_coef = 0.02;
    cfg.z_loss_coef = 0.001;
    cfg.seed = 4242;
    return cfg;
}

// a router with logits of std ~2 (few near-ties) and a shared gate far from 1/2
void shape_params(moe_layer_t *l, const Shape &c) {
    const float a = 6.0f / std::sqrt((float)c.D);
    moetest::set_param(l, MOE_PARAM_ROUTER_WEIGHT, moetest::uniform(c.D * c.E, 31, -a, a));
    if (c.gated)
        moetest::set_param(l, MOE_PARAM_SHARED_GATE, moetest::uniform(c.D, 32, -a, a));
}

class SharedVsReference : public ::testing::TestWithParam<Shape> {};

TEST_P(SharedVsReference, ForwardBackwardMatch) {
    const Shape &c = GetParam();
    moetest::Layer L(shape_config(c));
    ASSERT_EQ(L.status, MOE_STATUS_SUCCESS) << moe_last_error();
    shape_params(L, c);
    auto x = moetest::uniform(c.T * c.D, 33);
    // check_against_reference compares y, routing, stats, dx and every parameter gradient
    // (the SHARED_* ones included)
    Forward f = moetest::check_against_reference(L, x, c.T, 1, 0);
    ASSERT_EQ((int64_t)f.shared_out.size(), c.T * c.D);
    // the shared experts carry real weight in y, and the gate varies over tokens
    double shared = 0, total = 0, gmin = 1, gmax = 0;
    for (int64_t i = 0; i < c.T * c.D; ++i) {
        shared = std::max(shared, std::fabs(f.shared_gate[i / c.D] * f.shared_out[i]));
        total = std::max(total, std::fabs(f.y[i]));
    }
    for (double g : f.shared_gate) gmin = std::min(gmin, g), gmax = std::max(gmax, g);
    EXPECT_GT(shared, 0.1 * total);
    if (c.gated) {
        EXPECT_LT(gmin, 0.3);
        EXPECT_GT(gmax, 0.7);
    } else {
        EXPECT_EQ(gmin, 1.0);
    }
    if (c.capacity > 0) {
        EXPECT_GT(f.num_dropped, 0);
    }
}

// dx may alias dy: the shared experts read dy before dx is written
TEST_P(SharedVsReference, BackwardInPlace) {
    const Shape &c = GetParam();
    moetest::Layer A(shape_config(c)), B(shape_config(c));
    shape_params(A, c);
    shape_params(B, c);
    auto x = moetest::uniform(c.T * c.D, 34), dy = moetest::uniform(c.T * c.D, 35);
    std::vector<float> y(x.size()), dx(x.size()), buf = dy;
    ASSERT_EQ(moe_layer_forward(A, x.data(), y.data(), c.T, 1, nullptr), MOE_STATUS_SUCCESS);
    ASSERT_EQ(moe_layer_forward(B, x.data(), y.data(), c.T, 1, nullptr), MOE_STATUS_SUCCESS);
    ASSERT_EQ(moe_layer_backward(A, dy.data(), dx.data(), nullptr), MOE_STATUS_SUCCESS);
    ASSERT_EQ(moe_layer_backward(B, buf.data(), buf.data(), nullptr), MOE_STATUS_SUCCESS);
    EXPECT_EQ(dx, buf);
    for (int p = 0; p < MOE_PARAM_COUNT; ++p)
        EXPECT_EQ(moetest::param_grad(A, (moe_param_t)p), moetest::param_grad(B, (moe_param_t)p));
}

INSTANTIATE_TEST_SUITE_P(Shapes, SharedVsReference, ::testing::ValuesIn(kShapes),
                         [](const ::testing::TestParamInfo<Shape> &i) {
                             return std::string(i.param.name);
                         });

// a token-free forward and backward are valid with shared experts too (a rank with no tokens)
TEST(SharedExperts, ZeroTokens) {
    moetest::Layer L(shape_config(kShapes[0]));
    ASSERT_EQ(moe_layer_forward(L, nullptr, nullptr, 0, 1, nullptr), MOE_STATUS_SUCCESS);
    ASSERT_EQ(moe_layer_backward(L, nullptr, nullptr, nullptr), MOE_STATUS_SUCCESS);
    for (float g : moetest::param_grad(L, MOE_PARAM_SHARED_W1)) EXPECT_EQ(g, 0.0f);
}

// ---- finite differences of the reference's shared-expert backward ------------------------------

TEST(SharedExperts, ReferenceBackwardMatchesCentralDifferences) {
    for (const Shape &c0 : kShapes) {
        Shape c = c0;
        c.T = 7, c.D = 5, c.F = 4;
        if (c.Fs) c.Fs = 3;
        moetest::Layer L(shape_config(c));
        ASSERT_EQ(L.status, MOE_STATUS_SUCCESS) << moe_last_error();
        shape_params(L, c);
        Model m = Model::from_layer(L);
        std::vector<double> x = moetest::to_double(moetest::uniform(c.T * c.D, 36));
        std::vector<double> dy = moetest::to_double(moetest::uniform(c.T * c.D, 37));
        Forward base = m.forward(x, c.T, true, 0);
        moeref::Grads g = m.backward(base, x, dy);
        const double h = 1e-6;
        int checked = 0, expected = 0;
        for (int p = MOE_PARAM_SHARED_W1; p <= MOE_PARAM_SHARED_GATE; ++p)
            expected += (int)m.param[p].size();
        for (int p = 0; p <= MOE_PARAM_COUNT; ++p) {
            std::vector<double> &theta = p < MOE_PARAM_COUNT ? m.param[p] : x;
            const std::vector<double> &an = p < MOE_PARAM_COUNT ? g.param[p] : g.dx;
            ASSERT_EQ(theta.size(), an.size());
            double max_an = 0, max_err = 0;
            for (size_t i = 0; i < theta.size(); ++i) {
                double keep = theta[i];
                theta[i] = keep + h;
                Forward fp = m.forward(x, c.T, true, 0);
                theta[i] = keep - h;
                Forward fm = m.forward(x, c.T, true, 0);
                theta[i] = keep;
                if (fp.idx != base.idx || fm.idx != base.idx || fp.kept != base.kept ||
                    fm.kept != base.kept)
                    continue;  // routing flipped within +-h: piecewise constant there
                double fd = (Model::total_loss(fp, dy) - Model::total_loss(fm, dy)) / (2 * h);
                max_an = std::max(max_an, std::fabs(an[i]));
                max_err = std::max(max_err, std::fabs(fd - an[i]));
                if (p >= MOE_PARAM_SHARED_W1 && p <= MOE_PARAM_SHARED_GATE) ++checked;
            }
            // the tolerance of test_gradcheck.cc: FD truncation ~1e-12, rounding ~1e-9
            EXPECT_LE(max_err, 1e-6 * max_an + 1e-8)
                << c.name << " " << (p < MOE_PARAM_COUNT ? moetest::param_name(p) : "x");
        }
        EXPECT_GT(expected, 20) << c.name;
        EXPECT_GE(checked, expected - 2) << c.name << ": coordinates whose routing flipped";
    }
}

// ---- expert parallelism: shared experts replicated, each rank on its own tokens ----------------

TEST(SharedExperts, ExpertParallelMatchesOneRank) {
    for (int P : {1, 2, 4}) {
        moe_layer_config_t cfg = ep::small_config(8, 2);
        cfg.num_shared_experts = 2;
        cfg.shared_d_ff = 6;
        cfg.shared_expert_gate = 1;
        cfg.activation = MOE_ACTIVATION_SWIGLU;
        cfg.switch_loss_coef = 0.1;
        const int64_t T = 67, D = cfg.d_model;
        auto x = ep::make_tokens(T, D, 41), dy = ep::make_tokens(T, D, 42);
        auto begin = ep::split(T, P, P == 4 ? 1 : -1);  // with 4 ranks one has no tokens
        auto none = [](moe_layer_t *) {};
        ep::Result ref = ep::run_rank(nullptr, cfg, x.data(), dy.data(), T, none);
        ASSERT_EQ(ref.status, MOE_STATUS_SUCCESS) << ref.error;

        std::vector<moe_comm_t *> comms((size_t)P);
        ASSERT_EQ(moe_comm_create_local(comms.data(), P), MOE_STATUS_SUCCESS);
        std::vector<ep::Result> out((size_t)P);
        std::vector<std::vector<float>> reduced((size_t)P);
        std::vector<std::thread> th;
        for (int r = 0; r < P; ++r)
            th.emplace_back([&, r] {
                int64_t b = begin[(size_t)r], n = begin[(size_t)r + 1] - b;
                out[(size_t)r] = ep::run_rank(comms[(size_t)r], cfg, x.data() + b * D,
                                              dy.data() + b * D, n, none);
            });
        for (auto &t : th) t.join();
        for (auto *cm : comms) EXPECT_EQ(moe_comm_destroy(cm), MOE_STATUS_SUCCESS);

        for (int r = 0; r < P; ++r) {
            const ep::Result &R = out[(size_t)r];
            ASSERT_EQ(R.status, MOE_STATUS_SUCCESS) << R.error;
            int64_t b = begin[(size_t)r], n = (begin[(size_t)r + 1] - b) * D;
            if (n > 0) {
                EXPECT_LE(ep::rel_err(R.y.data(), ref.y.data() + b * D, n), 1e-5) << P << " " << r;
                EXPECT_LE(ep::rel_err(R.dx.data(), ref.dx.data() + b * D, n), 1e-5);
            }
        }
        // the replicated shared parameters: every rank holds all of them, and the ranks'
        // gradients (each from its own tokens) add up to the single-rank gradient
        for (int p = MOE_PARAM_SHARED_W1; p <= MOE_PARAM_SHARED_GATE; ++p) {
            if (ref.grad[p].empty()) continue;
            std::vector<float> sum(ref.grad[p].size(), 0.0f);
            for (int r = 0; r < P; ++r) {
                ASSERT_EQ(out[(size_t)r].grad[p].size(), sum.size()) << "param " << p;
                for (size_t i = 0; i < sum.size(); ++i) sum[i] += out[(size_t)r].grad[p][i];
            }
            EXPECT_LE(ep::rel_err(sum.data(), ref.grad[p].data(), (int64_t)sum.size()), 1e-5)
                << P << " ranks, " << moetest::param_name(p);
        }
    }
}

// moe_layer_allreduce_router_grads sums the shared experts' gradients too, so that after it
// every rank holds the single-rank gradient of every replicated parameter
TEST(SharedExperts, AllreduceSumsTheReplicatedParameters) {
    const int P = 3;
    moe_layer_config_t cfg = ep::small_config(6, 2);
    cfg.num_shared_experts = 1;
    cfg.shared_expert_gate = 1;
    const int64_t T = 50, D = cfg.d_model;
    auto x = ep::make_tokens(T, D, 51), dy = ep::make_tokens(T, D, 52);
    auto begin = ep::split(T, P);
    ep::Result ref =
        ep::run_rank(nullptr, cfg, x.data(), dy.data(), T, [](moe_layer_t *) {});
    ASSERT_EQ(ref.status, MOE_STATUS_SUCCESS) << ref.error;
    std::vector<moe_comm_t *> comms((size_t)P);
    ASSERT_EQ(moe_comm_create_local(comms.data(), P), MOE_STATUS_SUCCESS);
    std::vector<std::vector<float>> grads((size_t)P * MOE_PARAM_COUNT);
    std::vector<moe_status_t> st((size_t)P, MOE_STATUS_INTERNAL_ERROR);
    std::vector<std::thread> th;
    for (int r = 0; r < P; ++r)
        th.emplace_back([&, r] {
            moe_context_t *ctx = nullptr;
            moe_layer_t *l = nullptr;
            int64_t b = begin[(size_t)r], n = begin[(size_t)r + 1] - b;
            std::vector<float> y((size_t)(n * D)), dx((size_t)(n * D));
            moe_status_t s = moe_context_create(&ctx, MOE_BACKEND_CPU, 0, comms[(size_t)r]);
            if (!s) s = moe_layer_create(&l, ctx, &cfg);
            if (!s) s = moe_layer_forward(l, x.data() + b * D, y.data(), n, 1, nullptr);
            if (!s) s = moe_layer_backward(l, dy.data() + b * D, dx.data(), nullptr);
            if (!s) s = moe_layer_allreduce_router_grads(l, nullptr);
            for (int p = 0; p < MOE_PARAM_COUNT && !s; ++p)
                grads[(size_t)(r * MOE_PARAM_COUNT + p)] = moetest::param_grad(l, (moe_param_t)p);
            st[(size_t)r] = s;
            moe_layer_destroy(l);
            moe_context_destroy(ctx);
        });
    for (auto &t : th) t.join();
    for (auto *cm : comms) EXPECT_EQ(moe_comm_destroy(cm), MOE_STATUS_SUCCESS);
    for (int r = 0; r < P; ++r) {
        ASSERT_EQ(st[(size_t)r], MOE_STATUS_SUCCESS) << "rank " << r;
        for (int p : {(int)MOE_PARAM_ROUTER_WEIGHT, (int)MOE_PARAM_SHARED_W1,
                      (int)MOE_PARAM_SHARED_B1, (int)MOE_PARAM_SHARED_W2, (int)MOE_PARAM_SHARED_B2,
                      (int)MOE_PARAM_SHARED_GATE}) {
            const auto &g = grads[(size_t)(r * MOE_PARAM_COUNT + p)];
            ASSERT_EQ(g.size(), ref.grad[p].size()) << moetest::param_name(p);
            ASSERT_FALSE(g.empty());
            EXPECT_LE(ep::rel_err(g.data(), ref.grad[p].data(), (int64_t)g.size()), 1e-5)
                << "rank " << r << " " << moetest::param_name(p);
        }
    }
}

// the optimizer updates the shared parameters with the others (it walks every parameter)
TEST(SharedExperts, OptimizerStepsSharedParameters) {
    auto x = moetest::uniform(20 * 16, 61), dy = moetest::uniform(20 * 16, 62);
    std::vector<float> y(x.size()), dx(x.size());
    moe_optimizer_config_t oc = moe_optimizer_config_default(MOE_OPTIMIZER_SGD);
    oc.momentum = 0.0;
    oc.lr = 0.5;
    moe_optimizer_t *opt = nullptr;
    // SGD without momentum: every value moves by exactly -lr * grad
    moetest::Layer M(shape_config(kShapes[0]));
    ASSERT_EQ(moe_layer_forward(M, x.data(), y.data(), 20, 1, nullptr), MOE_STATUS_SUCCESS);
    ASSERT_EQ(moe_layer_backward(M, dy.data(), dx.data(), nullptr), MOE_STATUS_SUCCESS);
    ASSERT_EQ(moe_optimizer_create(&opt, M, &oc), MOE_STATUS_SUCCESS);
    std::vector<float> before[MOE_PARAM_COUNT], grad[MOE_PARAM_COUNT];
    for (int p = MOE_PARAM_SHARED_W1; p <= MOE_PARAM_SHARED_GATE; ++p) {
        before[p] = moetest::param_value(M, (moe_param_t)p);
        grad[p] = moetest::param_grad(M, (moe_param_t)p);
    }
    ASSERT_EQ(moe_optimizer_step(opt, nullptr), MOE_STATUS_SUCCESS);
    for (int p = MOE_PARAM_SHARED_W1; p <= MOE_PARAM_SHARED_GATE; ++p) {
        auto after = moetest::param_value(M, (moe_param_t)p);
        double gmax = 0;
        for (size_t i = 0; i < after.size(); ++i) {
            EXPECT_EQ(after[i], before[p][i] - 0.5f * grad[p][i]) << moetest::param_name(p);
            gmax = std::max(gmax, (double)std::fabs(grad[p][i]));
        }
        if (!after.empty()) {
            EXPECT_GT(gmax, 0.0) << moetest::param_name(p);
        }
    }
    moe_optimizer_destroy(opt);
}

}  // namespace

// ---- whole model-family layers: the presets' routing with their shared experts ----------------

// A DeepSeek-V3-shaped layer (sigmoid scores with a selection bias, 8 groups of which a token
// keeps 4 by top-2 sums, renormalised gates times 2.5, one ungated shared expert) and a
// Qwen-MoE-shaped one (softmax top-k without renormalisation, one gated shared expert 4x as
// wide), at small sizes, forward and backward against the float64 reference.
TEST(SharedExperts, ModelFamilyLayersMatchReference) {
    struct Family {
        const char *preset;
        int64_t S, Fs;
        int gated;
    } fams[] = {{"deepseek-v3", 1, 0, 0}, {"qwen2-moe", 1, 32, 1}};
    for (const Family &fm : fams) {
        SCOPED_TRACE(fm.preset);
        moe_layer_config_t cfg = moe_layer_config_default();
        ASSERT_EQ(moe_layer_config_preset(fm.preset, &cfg), MOE_STATUS_SUCCESS) << moe_last_error();
        cfg.d_model = 16, cfg.d_ff = 8;
        cfg.num_experts = 16;
        cfg.top_k = 4;
        if (cfg.num_groups > 1) cfg.num_groups = 8, cfg.topk_group = 4;
        cfg.num_shared_experts = fm.S;
        cfg.shared_d_ff = fm.Fs;
        cfg.shared_expert_gate = fm.gated;
        cfg.seed = 77;
        moetest::Layer L(cfg);
        ASSERT_EQ(L.status, MOE_STATUS_SUCCESS) << moe_last_error();
        const float a = 6.0f / std::sqrt((float)cfg.d_model);
        moetest::set_param(L, MOE_PARAM_ROUTER_WEIGHT,
                           moetest::uniform(cfg.d_model * cfg.num_experts, 41, -a, a));
        if (fm.gated)
            moetest::set_param(L, MOE_PARAM_SHARED_GATE, moetest::uniform(cfg.d_model, 42, -a, a));
        if (cfg.score_func == MOE_SCORE_SIGMOID) {
            std::vector<float> b = moetest::uniform(cfg.num_experts, 43, -0.2f, 0.2f);
            ASSERT_EQ(moe_layer_set_score_bias(L, b.data()), MOE_STATUS_SUCCESS);
        }
        auto x = moetest::uniform(40 * cfg.d_model, 44);
        Forward f = moetest::check_against_reference(L, x, 40, 1, 0);
        ASSERT_EQ((int64_t)f.shared_out.size(), 40 * cfg.d_model);
        // the family's routing is what ran: DeepSeek-V3's gates sum to the scaling factor and a
        // token's experts lie in at most topk_group groups; Qwen's softmax gates sum below 1
        for (int64_t t = 0; t < 40; ++t) {
            double sum = 0;
            std::vector<int> groups(8, 0);
            for (int64_t j = 0; j < cfg.top_k; ++j) {
                sum += f.gate[t * cfg.top_k + j];
                groups[f.idx[t * cfg.top_k + j] / 2] = 1;
            }
            if (cfg.score_func == MOE_SCORE_SIGMOID) {
                EXPECT_NEAR(sum, 2.5, 1e-9);
                EXPECT_LE(groups[0] + groups[1] + groups[2] + groups[3] + groups[4] + groups[5] +
                              groups[6] + groups[7],
                          4);
            } else {
                EXPECT_LT(sum, 1.0);
            }
        }
    }
}
