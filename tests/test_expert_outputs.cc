// test_expert_outputs.cc - per-expert outputs (moe_layer_forward_experts / _backward_experts):
// the CPU layer against the float64 reference, finite differences of the reference, the
// equivalence with the fused path, argument checks, expert choice and expert parallelism.
#include <gtest/gtest.h>

#include <string>
#include <thread>

#include "ep_common.h"
#include "reference/reference.h"
#include "test_util.h"

using moeref::Forward;
using moeref::Model;

namespace {

struct Case {
    const char *name;
    int64_t T, D, F, E, K;
    moe_activation_t act;
    moe_gate_t gate;
    int renorm, noisy, bias;
    double capacity;
};

void PrintTo(const Case &c, std::ostream *os) { *os << c.name; }

const Case kCases[] = {
    {"gelu_k2_dropless", 53, 12, 16, 4, 2, MOE_ACTIVATION_GELU, MOE_GATE_SOFTMAX_OF_TOPK, 1, 0, 1,
     0.0},
    {"swiglu_k2_cap_drops_noisy", 60, 8, 8, 4, 2, MOE_ACTIVATION_SWIGLU, MOE_GATE_TOPK_OF_SOFTMAX,
     0, 1, 0, 0.5},
    // the classic mixture: a softmax over all experts, every expert on every token
    {"identity_softmax_all_experts", 41, 6, 10, 4, 4, MOE_ACTIVATION_IDENTITY,
     MOE_GATE_TOPK_OF_SOFTMAX,
     0, 0, 1, 0.0},
    {"silu_k1", 37, 10, 12, 8, 1, MOE_ACTIVATION_SILU, MOE_GATE_TOPK_OF_SOFTMAX, 0, 0, 1, 0.0},
};

moe_layer_config_t config_of(const Case &c) {
    moe_layer_config_t cfg = moetest::small_config(c.D, c.F, c.E, c.K);
    cfg.activation = c.act;
    cfg.gate = c.gate;
    cfg.renormalize = c.renorm;
    cfg.noisy_gating = c.noisy;
    cfg.expert_bias = c.bias;
    cfg.capacity_factor = c.capacity;
    cfg.switch_loss_coef = 0.05;
    cfg.importance_loss_coef = 0.03;
    cfg.load_loss_coef = c.noisy ? 0.02 : 0.0;
    cfg.z_loss_coef = 0.002;
    cfg.seed = 515;
    return cfg;
}

void shape_router(moe_layer_t *l, const Case &c) {
    const float a = 6.0f / std::sqrt((float)c.D);
    moetest::set_param(l, MOE_PARAM_ROUTER_WEIGHT, moetest::uniform(c.D * c.E, 71, -a, a));
    if (c.noisy) {
        const float b = 2.0f / std::sqrt((float)c.D);
        moetest::set_param(l, MOE_PARAM_NOISE_WEIGHT, moetest::uniform(c.D * c.E, 72, -b, b));
    }
}

class ExpertOutputs : public ::testing::TestWithParam<Case> {};

TEST_P(ExpertOutputs, MatchReference) {
    const Case &c = GetParam();
    moetest::Layer L(config_of(c));
    ASSERT_EQ(L.status, MOE_STATUS_SUCCESS) << moe_last_error();
    shape_router(L, c);
    const int64_t T = c.T, D = c.D, K = c.K;
    auto x = moetest::uniform(T * D, 73);
    Model m = Model::from_layer(L);
    Forward f = m.forward(moetest::to_double(x), T, true, 0);
    ASSERT_EQ(f.num_fragile, 0) << "input has a routing near-tie";
    std::vector<float> ye(T * K * D, NAN), ge(T * K, NAN);
    ASSERT_EQ(moe_layer_forward_experts(L, x.data(), ye.data(), ge.data(), T, 1, nullptr),
              MOE_STATUS_SUCCESS)
        << moe_last_error();
    std::vector<int32_t> idx(T * K), kept(T * K);
    ASSERT_EQ(moe_layer_routing(L, idx.data(), nullptr, kept.data()), MOE_STATUS_SUCCESS);
    EXPECT_EQ(idx, f.idx);
    EXPECT_EQ(kept, f.kept);
    int64_t dropped = 0;
    for (int64_t i = 0; i < T * K; ++i)
        if (!kept[i]) {
            ++dropped;
            EXPECT_EQ(ge[i], 0.0f) << "a dropped assignment's gate is 0";
            for (int64_t d = 0; d < D; ++d) EXPECT_EQ(ye[i * D + d], 0.0f);
        }
    if (c.capacity > 0) {
        EXPECT_GT(dropped, 0);
    }
    EXPECT_LE(moetest::rel_err(ye, f.y_experts), moetest::kTolTensor) << "y_experts";
    double gerr = 0;
    for (int64_t i = 0; i < T * K; ++i) gerr = std::max(gerr, std::fabs(ge[i] - f.gate_out[i]));
    EXPECT_LE(gerr, moetest::kTolGate) << "gate";
    moe_routing_stats_t st{};
    ASSERT_EQ(moe_layer_stats(L, &st, nullptr, nullptr), MOE_STATUS_SUCCESS);
    EXPECT_LE(moetest::scalar_err(st.aux_loss, f.aux_loss), moetest::kTolLoss);

    auto dye = moetest::uniform(T * K * D, 74), dge = moetest::uniform(T * K, 75);
    std::vector<float> dx(T * D, NAN);
    ASSERT_EQ(moe_layer_backward_experts(L, dye.data(), dge.data(), dx.data(), nullptr),
              MOE_STATUS_SUCCESS)
        << moe_last_error();
    moeref::Grads g =
        m.backward_experts(f, moetest::to_double(x), moetest::to_double(dye), moetest::to_double(dge));
    EXPECT_LE(moetest::rel_err(dx, g.dx), moetest::kTolTensor) << "dx";
    for (int p = 0; p < MOE_PARAM_COUNT; ++p)
        EXPECT_LE(moetest::rel_err(moetest::param_grad(L, (moe_param_t)p), g.param[p]),
                  moetest::kTolTensor)
            << "d" << moetest::param_name(p);
}

// sum_j gate y_experts is the fused forward's y, and the backward from g dy and <dy, y_experts>
// is the fused backward from dy
TEST_P(ExpertOutputs, EquivalentToTheFusedPath) {
    const Case &c = GetParam();
    moetest::Layer A(config_of(c)), B(config_of(c));
    shape_router(A, c);
    shape_router(B, c);
    const int64_t T = c.T, D = c.D, K = c.K;
    auto x = moetest::uniform(T * D, 76), dy = moetest::uniform(T * D, 77);
    std::vector<float> y(T * D), ye(T * K * D), ge(T * K), dxa(T * D), dxb(T * D);
    ASSERT_EQ(moe_layer_forward(A, x.data(), y.data(), T, 1, nullptr), MOE_STATUS_SUCCESS);
    ASSERT_EQ(moe_layer_forward_experts(B, x.data(), ye.data(), ge.data(), T, 1, nullptr),
              MOE_STATUS_SUCCESS);
    std::vector<double> ysum(T * D, 0.0), dye(T * K * D), dge(T * K, 0.0);
    for (int64_t t = 0; t < T; ++t)
        for (int64_t j = 0; j < K; ++j)
            for (int64_t d = 0; d < D; ++d) {
                const int64_t i = (t * K + j) * D + d;
                ysum[t * D + d] += (double)ge[t * K + j] * ye[i];
                dye[i] = (double)ge[t * K + j] * dy[t * D + d];
                dge[t * K + j] += (double)dy[t * D + d] * ye[i];
            }
    // f32 sums of K terms on both sides: a few ulp
    EXPECT_LE(moetest::rel_err(y, ysum), 1e-6);
    std::vector<float> dyef(dye.begin(), dye.end()), dgef(dge.begin(), dge.end());
    ASSERT_EQ(moe_layer_backward(A, dy.data(), dxa.data(), nullptr), MOE_STATUS_SUCCESS);
    ASSERT_EQ(moe_layer_backward_experts(B, dyef.data(), dgef.data(), dxb.data(), nullptr),
              MOE_STATUS_SUCCESS);
    // dgate differs by the order of a D-term f32 dot product: 1e-5 relative
    EXPECT_LE(moetest::rel_err(dxb, moetest::to_double(dxa)), 1e-5) << "dx";
    for (int p = 0; p < MOE_PARAM_COUNT; ++p)
        EXPECT_LE(moetest::rel_err(moetest::param_grad(B, (moe_param_t)p),
                                   moetest::to_double(moetest::param_grad(A, (moe_param_t)p))),
                  1e-5)
            << "d" << moetest::param_name(p);
}

INSTANTIATE_TEST_SUITE_P(Cases, ExpertOutputs, ::testing::ValuesIn(kCases),
                         [](const ::testing::TestParamInfo<Case> &i) {
                             return std::string(i.param.name);
                         });

TEST(ExpertOutputsReference, BackwardMatchesCentralDifferences) {
    for (const Case &c0 : kCases) {
        Case c = c0;
        c.T = 9, c.D = 5, c.F = 4;
        moetest::Layer L(config_of(c));
        ASSERT_EQ(L.status, MOE_STATUS_SUCCESS);
        shape_router(L, c);
        Model m = Model::from_layer(L);
        const int64_t K = c.K;
        std::vector<double> x = moetest::to_double(moetest::uniform(c.T * c.D, 78));
        std::vector<double> dye = moetest::to_double(moetest::uniform(c.T * K * c.D, 79));
        std::vector<double> dge = moetest::to_double(moetest::uniform(c.T * K, 80));
        Forward base = m.forward(x, c.T, true, 3);
        moeref::Grads g = m.backward_experts(base, x, dye, dge);
        const double h = 1e-6;
        int skipped = 0, checked = 0;
        for (int p = 0; p <= MOE_PARAM_COUNT; ++p) {
            std::vector<double> &theta = p < MOE_PARAM_COUNT ? m.param[p] : x;
            const std::vector<double> &an = p < MOE_PARAM_COUNT ? g.param[p] : g.dx;
            ASSERT_EQ(theta.size(), an.size());
            double max_an = 0, max_err = 0;
            for (size_t i = 0; i < theta.size(); ++i) {
                double keep = theta[i];
                theta[i] = keep + h;
                Forward fp = m.forward(x, c.T, true, 3);
                theta[i] = keep - h;
                Forward fm = m.forward(x, c.T, true, 3);
                theta[i] = keep;
                if (fp.idx != base.idx || fm.idx != base.idx || fp.kept != base.kept ||
                    fm.kept != base.kept) {
                    ++skipped;
                    continue;
                }
                double fd = (Model::total_loss_experts(fp, dye, dge) -
                             Model::total_loss_experts(fm, dye, dge)) /
                            (2 * h);
                max_an = std::max(max_an, std::fabs(an[i]));
                max_err = std::max(max_err, std::fabs(fd - an[i]));
                ++checked;
            }
            // the tolerance of test_gradcheck.cc
            EXPECT_LE(max_err, 1e-6 * max_an + 1e-8)
                << c.name << " " << (p < MOE_PARAM_COUNT ? moetest::param_name(p) : "x");
        }
        EXPECT_LE(skipped, 2) << c.name;
        EXPECT_GT(checked, 50) << c.name;
    }
}

TEST(ExpertOutputsApi, ArgumentsAreChecked) {
    moetest::Layer L(moetest::small_config(8, 16, 4, 2));
    std::vector<float> x(3 * 8, 0.5f), ye(3 * 2 * 8), ge(3 * 2), dx(3 * 8);
    EXPECT_EQ(moe_layer_backward_experts(L, ye.data(), ge.data(), dx.data(), nullptr),
              MOE_STATUS_INVALID_ARGUMENT);  // no forward yet
    EXPECT_EQ(moe_layer_forward_experts(nullptr, x.data(), ye.data(), ge.data(), 3, 1, nullptr),
              MOE_STATUS_INVALID_ARGUMENT);
    EXPECT_EQ(moe_layer_forward_experts(L, x.data(), nullptr, ge.data(), 3, 1, nullptr),
              MOE_STATUS_INVALID_ARGUMENT);
    EXPECT_NE(std::string(moe_last_error()).find("y_experts"), std::string::npos);
    EXPECT_EQ(moe_layer_forward_experts(L, x.data(), ye.data(), nullptr, 3, 1, nullptr),
              MOE_STATUS_INVALID_ARGUMENT);
    EXPECT_NE(std::string(moe_last_error()).find("gate"), std::string::npos);
    EXPECT_EQ(moe_layer_forward_experts(L, x.data(), ye.data(), ge.data(), -1, 1, nullptr),
              MOE_STATUS_INVALID_ARGUMENT);
    x[5] = NAN;
    EXPECT_EQ(moe_layer_forward_experts(L, x.data(), ye.data(), ge.data(), 3, 1, nullptr),
              MOE_STATUS_NUMERIC_ERROR);
    x[5] = 0.5f;
    ASSERT_EQ(moe_layer_forward_experts(L, x.data(), ye.data(), ge.data(), 3, 1, nullptr),
              MOE_STATUS_SUCCESS);
    EXPECT_EQ(moe_layer_backward_experts(L, nullptr, ge.data(), dx.data(), nullptr),
              MOE_STATUS_INVALID_ARGUMENT);
    EXPECT_EQ(moe_layer_backward_experts(L, ye.data(), nullptr, dx.data(), nullptr),
              MOE_STATUS_INVALID_ARGUMENT);
    EXPECT_EQ(moe_layer_backward_experts(L, ye.data(), ge.data(), nullptr, nullptr),
              MOE_STATUS_INVALID_ARGUMENT);
    EXPECT_EQ(moe_layer_backward_experts(L, ye.data(), ge.data(), dx.data(), nullptr),
              MOE_STATUS_SUCCESS);
    // zero tokens
    EXPECT_EQ(moe_layer_forward_experts(L, nullptr, nullptr, nullptr, 0, 1, nullptr),
              MOE_STATUS_SUCCESS);
    EXPECT_EQ(moe_layer_backward_experts(L, nullptr, nullptr, nullptr, nullptr),
              MOE_STATUS_SUCCESS);
    // shared experts have no per-assignment row
    moe_layer_config_t cfg = moetest::small_config(8, 16, 4, 2);
    cfg.num_shared_experts = 1;
    moetest::Layer S(cfg);
    ASSERT_EQ(S.status, MOE_STATUS_SUCCESS);
    EXPECT_EQ(moe_layer_forward_experts(S, x.data(), ye.data(), ge.data(), 3, 1, nullptr),
              MOE_STATUS_NOT_SUPPORTED);
    EXPECT_NE(std::string(moe_last_error()).find("num_shared_experts"), std::string::npos);
}

// expert choice: W = E entries per token, zero where the expert did not choose the token
TEST(ExpertOutputsApi, ExpertChoiceRowsSumToTheFusedOutput) {
    moe_layer_config_t cfg = moetest::small_config(8, 12, 4, 2);
    cfg.router = MOE_ROUTER_EXPERT_CHOICE;
    moetest::Layer A(cfg), B(cfg);
    const int64_t T = 30, D = 8, W = moe_layer_routing_width(B);
    ASSERT_EQ(W, 4);
    auto x = moetest::uniform(T * D, 81);
    std::vector<float> y(T * D), ye(T * W * D), ge(T * W);
    ASSERT_EQ(moe_layer_forward(A, x.data(), y.data(), T, 1, nullptr), MOE_STATUS_SUCCESS);
    ASSERT_EQ(moe_layer_forward_experts(B, x.data(), ye.data(), ge.data(), T, 1, nullptr),
              MOE_STATUS_SUCCESS);
    std::vector<int32_t> kept(T * W);
    ASSERT_EQ(moe_layer_routing(B, nullptr, nullptr, kept.data()), MOE_STATUS_SUCCESS);
    std::vector<double> ysum(T * D, 0.0);
    int64_t zeros = 0;
    for (int64_t i = 0; i < T * W; ++i) {
        zeros += !kept[i];
        if (!kept[i]) {
            EXPECT_EQ(ge[i], 0.0f);
        }
        for (int64_t d = 0; d < D; ++d) ysum[(i / W) * D + d] += (double)ge[i] * ye[i * D + d];
    }
    EXPECT_GT(zeros, 0);
    EXPECT_LE(moetest::rel_err(y, ysum), 1e-6);
}

// expert parallelism: each rank's rows equal the single-rank layer's rows of its tokens
TEST(ExpertOutputsEp, LocalRanksMatchOneRank) {
    const int P = 2;
    moe_layer_config_t cfg = ep::small_config(4, 2);
    cfg.switch_loss_coef = 0.1;
    const int64_t T = 45, D = cfg.d_model, K = 2;
    auto x = ep::make_tokens(T, D, 91), dye = ep::make_tokens(T * K, D, 92);
    auto dge = ep::make_tokens(T, K, 93);
    auto begin = ep::split(T, P);
    struct Out {
        moe_status_t st = MOE_STATUS_INTERNAL_ERROR;
        std::vector<float> ye, ge, dx, dw1;
    };
    auto run = [&](moe_comm_t *comm, int64_t b, int64_t n, Out *o) {
        moe_context_t *ctx = nullptr;
        moe_layer_t *l = nullptr;
        o->ye.assign(n * K * D, 0), o->ge.assign(n * K, 0), o->dx.assign(n * D, 0);
        moe_status_t s = moe_context_create(&ctx, MOE_BACKEND_CPU, 0, comm);
        if (!s) s = moe_layer_create(&l, ctx, &cfg);
        if (!s)
            s = moe_layer_forward_experts(l, x.data() + b * D, o->ye.data(), o->ge.data(), n, 1,
                                          nullptr);
        if (!s)
            s = moe_layer_backward_experts(l, dye.data() + b * K * D, dge.data() + b * K,
                                           o->dx.data(), nullptr);
        if (!s) o->dw1 = moetest::param_grad(l, MOE_PARAM_W1);
        o->st = s;
        moe_layer_destroy(l);
        moe_context_destroy(ctx);
    };
    Out ref;
    run(nullptr, 0, T, &ref);
    ASSERT_EQ(ref.st, MOE_STATUS_SUCCESS) << moe_last_error();
    std::vector<moe_comm_t *> comms(P);
    ASSERT_EQ(moe_comm_create_local(comms.data(), P), MOE_STATUS_SUCCESS);
    std::vector<Out> out(P);
    std::vector<std::thread> th;
    for (int r = 0; r < P; ++r)
        th.emplace_back([&, r] { run(comms[r], begin[r], begin[r + 1] - begin[r], &out[r]); });
    for (auto &t : th) t.join();
    for (auto *c : comms) EXPECT_EQ(moe_comm_destroy(c), MOE_STATUS_SUCCESS);
    const int64_t El = 2, per = D * cfg.d_ff;
    for (int r = 0; r < P; ++r) {
        ASSERT_EQ(out[r].st, MOE_STATUS_SUCCESS);
        int64_t b = begin[r], n = begin[r + 1] - b;
        EXPECT_LE(ep::rel_err(out[r].ye.data(), ref.ye.data() + b * K * D, n * K * D), 1e-5);
        EXPECT_LE(ep::rel_err(out[r].ge.data(), ref.ge.data() + b * K, n * K), 1e-6);
        EXPECT_LE(ep::rel_err(out[r].dx.data(), ref.dx.data() + b * D, n * D), 1e-5);
        EXPECT_LE(ep::rel_err(out[r].dw1.data(), ref.dw1.data() + r * El * per, El * per), 1e-5);
    }
}

}  // namespace
