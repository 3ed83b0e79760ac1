// test_routing_ext.cc - the routing extensions (docs/semantics.md "Routing extensions"): sigmoid
// scores, the selection bias on them, the routed scaling factor, group-limited gating, expert
// masks and expert dropout, at small and at large E / K. The CPU layer against the float64
// reference (forward, routing, stats, backward), the reference against finite differences,
// validation of every field, node-limited routing over local ranks.
#include <gtest/gtest.h>

#include <cstring>
#include <set>
#include <string>
#include <thread>

#include "reference/reference.h"
#include "test_util.h"

using moeref::Forward;
using moeref::Model;

namespace {

struct ExtCase {
    const char *name;
    int64_t E, K;
    moe_score_func_t score;
    int renorm;
    moe_gate_t gate;
    double scale;
    int64_t G, topk_group;
    moe_group_score_t gscore;
    double dropout;
    int mask;  // 1: every 5th expert (from 1) masked out
    int bias;  // 1: a random selection bias (bias_update_rate > 0)
    double capacity;
    double sw, imp, z;
};

void PrintTo(const ExtCase &c, std::ostream *os) { *os << c.name; }

moe_layer_config_t ext_config(const ExtCase &c, int64_t D, int64_t F) {
    moe_layer_config_t cfg = moetest::small_config(D, F, c.E, c.K);
    cfg.activation = MOE_ACTIVATION_SILU;
    cfg.score_func = c.score;
    cfg.renormalize = c.renorm;
    cfg.gate = c.gate;
    cfg.routed_scaling_factor = c.scale;
    cfg.num_groups = c.G;
    cfg.topk_group = c.topk_group;
    cfg.group_score = c.gscore;
    cfg.expert_dropout = c.dropout;
    cfg.capacity_factor = c.capacity;
    cfg.bias_update_rate = c.bias ? 1e-3 : 0.0;
    cfg.switch_loss_coef = c.sw;
    cfg.importance_loss_coef = c.imp;
    cfg.z_loss_coef = c.z;
    return cfg;
}

std::vector<uint8_t> case_mask(const ExtCase &c) {
    std::vector<uint8_t> m((size_t)c.E, 1);
    if (c.mask)
        for (int64_t e = 1; e < c.E; e += 5) m[(size_t)e] = 0;
    return m;
}

// the router weights (logits of std ~ a sqrt(D/3)), the selection bias and the mask of a case
void setup_layer(moe_layer_t *l, const ExtCase &c, int64_t D, uint64_t seed, float a) {
    moetest::set_param(l, MOE_PARAM_ROUTER_WEIGHT, moetest::uniform(D * c.E, seed, -a, a));
    if (c.bias) {
        // sigmoid scores live in (0, 1): a bias of the same order changes the selection
        const float b = c.score == MOE_SCORE_SIGMOID ? 0.3f : 1.0f;
        std::vector<float> bias = moetest::uniform(c.E, seed + 1, -b, b);
        ASSERT_EQ(moe_layer_set_score_bias(l, bias.data()), MOE_STATUS_SUCCESS);
    }
    if (c.mask) {
        std::vector<uint8_t> m = case_mask(c);
        ASSERT_EQ(moe_layer_set_expert_mask(l, m.data()), MOE_STATUS_SUCCESS) << moe_last_error();
    }
}

// One training (or inference) forward + backward against the reference, drop_call = the
// number of earlier training forwards. Picks an input without near-ties (up to 8 tries).
void check_call(moe_layer_t *l, int64_t T, int training, uint64_t drop_call, uint64_t xseed) {
    Model m = Model::from_layer(l);
    m.drop_call = drop_call;
    const int64_t D = m.D, E = m.E, K = m.K;
    std::vector<float> x;
    Forward f;
    int tries = 0;
    for (; tries < 8; ++tries) {
        x = moetest::uniform(T * D, xseed + 7919ull * tries);
        f = m.forward(moetest::to_double(x), T, training != 0, 0);
        if (f.num_fragile == 0) break;
    }
    ASSERT_LT(tries, 8) << "no input without near-ties";
    moetest::LibRun r;
    moetest::library_forward(l, x, T, training, D, E, K, &r);
    moetest::compare_forward(r, f, K, m.cfg);
    std::vector<uint8_t> avail((size_t)E, 7);
    int64_t na = -1;
    ASSERT_EQ(moe_layer_expert_availability(l, avail.data(), &na), MOE_STATUS_SUCCESS);
    EXPECT_EQ(avail, f.avail) << "availability";
    EXPECT_EQ(na, f.num_available);
    for (int64_t i = 0; i < T * K; ++i) ASSERT_TRUE(f.avail[(size_t)r.idx[(size_t)i]]);
    ASSERT_EQ(moe_layer_zero_grad(l, nullptr), MOE_STATUS_SUCCESS);
    std::vector<float> dy = moetest::uniform(T * D, xseed + 3), dx(T * D, NAN);
    ASSERT_EQ(moe_layer_backward(l, dy.data(), dx.data(), nullptr), MOE_STATUS_SUCCESS)
        << moe_last_error();
    moeref::Grads g = m.backward(f, moetest::to_double(x), moetest::to_double(dy));
    EXPECT_LE(moetest::rel_err(dx, g.dx), moetest::kTolTensor) << "dx";
    for (int p = 0; p < MOE_PARAM_COUNT; ++p)
        EXPECT_LE(moetest::rel_err(moetest::param_grad(l, (moe_param_t)p), g.param[p]),
                  moetest::kTolTensor)
            << "d" << moetest::param_name(p);
}

const ExtCase kCases[] = {
    // name, E, K, score, renorm, gate, scale, G, topk_group, gscore, dropout, mask, bias, cap,
    // sw, imp, z
    {"sigmoid", 8, 2, MOE_SCORE_SIGMOID, 0, MOE_GATE_SOFTMAX_OF_TOPK, 1.0, 0, 0,
     MOE_GROUP_SCORE_TOP2_SUM, 0, 0, 0, 0, 0.3, 0.2, 0.1},
    {"sigmoid_renorm_scaled", 8, 3, MOE_SCORE_SIGMOID, 1, MOE_GATE_SOFTMAX_OF_TOPK, 2.5, 0, 0,
     MOE_GROUP_SCORE_TOP2_SUM, 0, 0, 0, 0, 0.3, 0.2, 0.1},
    {"sigmoid_bias", 8, 2, MOE_SCORE_SIGMOID, 1, MOE_GATE_SOFTMAX_OF_TOPK, 1.0, 0, 0,
     MOE_GROUP_SCORE_TOP2_SUM, 0, 0, 1, 0, 0.3, 0.2, 0.1},
    {"softmax_topk_scaled", 8, 2, MOE_SCORE_SOFTMAX, 1, MOE_GATE_SOFTMAX_OF_TOPK, 16.0, 0, 0,
     MOE_GROUP_SCORE_TOP2_SUM, 0, 0, 0, 0, 0.3, 0.2, 0.1},
    {"softmax_raw_scaled", 8, 2, MOE_SCORE_SOFTMAX, 0, MOE_GATE_TOPK_OF_SOFTMAX, 0.5, 0, 0,
     MOE_GROUP_SCORE_TOP2_SUM, 0, 0, 0, 0, 0.3, 0.2, 0.1},
    {"groups_top2_sigmoid", 16, 4, MOE_SCORE_SIGMOID, 1, MOE_GATE_SOFTMAX_OF_TOPK, 1.0, 4, 2,
     MOE_GROUP_SCORE_TOP2_SUM, 0, 0, 0, 0, 0.3, 0.2, 0.1},
    {"groups_max_softmax_raw", 16, 3, MOE_SCORE_SOFTMAX, 0, MOE_GATE_TOPK_OF_SOFTMAX, 1.0, 8, 3,
     MOE_GROUP_SCORE_MAX, 0, 0, 0, 0, 0.3, 0.2, 0.1},
    {"groups_one_kept", 16, 2, MOE_SCORE_SOFTMAX, 1, MOE_GATE_SOFTMAX_OF_TOPK, 1.0, 4, 1,
     MOE_GROUP_SCORE_TOP2_SUM, 0, 0, 0, 1.0, 0.3, 0.2, 0.1},
    {"mask_softmax_raw", 16, 2, MOE_SCORE_SOFTMAX, 0, MOE_GATE_TOPK_OF_SOFTMAX, 1.0, 0, 0,
     MOE_GROUP_SCORE_TOP2_SUM, 0, 1, 0, 0, 0.3, 0.2, 0.1},
    {"mask_sigmoid_groups", 16, 4, MOE_SCORE_SIGMOID, 1, MOE_GATE_SOFTMAX_OF_TOPK, 1.0, 4, 1,
     MOE_GROUP_SCORE_TOP2_SUM, 0, 1, 0, 0, 0.3, 0.2, 0.1},
    {"dropout_softmax", 16, 2, MOE_SCORE_SOFTMAX, 1, MOE_GATE_TOPK_OF_SOFTMAX, 1.0, 0, 0,
     MOE_GROUP_SCORE_TOP2_SUM, 0.4, 0, 0, 0, 0.3, 0.2, 0.1},
    {"dropout_mask_groups", 16, 3, MOE_SCORE_SIGMOID, 1, MOE_GATE_SOFTMAX_OF_TOPK, 1.0, 4, 2,
     MOE_GROUP_SCORE_TOP2_SUM, 0.5, 1, 0, 0, 0.3, 0.2, 0.1},
    {"dropout_heavy", 8, 3, MOE_SCORE_SOFTMAX, 0, MOE_GATE_TOPK_OF_SOFTMAX, 1.0, 0, 0,
     MOE_GROUP_SCORE_TOP2_SUM, 0.95, 0, 0, 0, 0.3, 0.2, 0.1},
    // DeepSeek-V3's routing at a small size: sigmoid, bias, groups of top-2 sums, scaling
    {"deepseek_v3_shaped", 32, 4, MOE_SCORE_SIGMOID, 1, MOE_GATE_SOFTMAX_OF_TOPK, 2.5, 8, 4,
     MOE_GROUP_SCORE_TOP2_SUM, 0, 0, 1, 0, 0.01, 0.0, 0.001},
};

class ExtVsReference : public ::testing::TestWithParam<ExtCase> {};

TEST_P(ExtVsReference, ForwardBackwardMatch) {
    const ExtCase &c = GetParam();
    const int64_t D = 8, F = 12, T = 61;
    moe_layer_config_t cfg = ext_config(c, D, F);
    moetest::Layer L(cfg);
    ASSERT_EQ(L.status, MOE_STATUS_SUCCESS) << moe_last_error();
    setup_layer(L, c, D, 100 + (uint64_t)c.E * 7 + (uint64_t)c.K, 4.0f / std::sqrt((float)D));
    {
        SCOPED_TRACE("training call 0");
        check_call(L, T, 1, 0, 11);
    }
    {
        SCOPED_TRACE("inference");
        check_call(L, T, 0, 1, 12);
    }
    {
        SCOPED_TRACE("training call 1");
        check_call(L, T, 1, 1, 13);
    }
}

INSTANTIATE_TEST_SUITE_P(Ext, ExtVsReference, ::testing::ValuesIn(kCases),
                         [](const ::testing::TestParamInfo<ExtCase> &i) {
                             return std::string(i.param.name);
                         });

// Finite differences of the reference's analytic backward for the new options.
class ExtGradCheck : public ::testing::TestWithParam<ExtCase> {};

TEST_P(ExtGradCheck, ReferenceBackwardMatchesCentralDifferences) {
    const ExtCase &c = GetParam();
    const int64_t D = 5, F = 4, T = 9;
    moe_layer_config_t cfg = ext_config(c, D, F);
    moetest::Layer L(cfg);
    ASSERT_EQ(L.status, MOE_STATUS_SUCCESS) << moe_last_error();
    setup_layer(L, c, D, 6, 1.0f);
    Model m = Model::from_layer(L);
    m.drop_call = 2;
    std::vector<double> x = moetest::to_double(moetest::uniform(T * D, 7));
    std::vector<double> dy = moetest::to_double(moetest::uniform(T * D, 8));
    Forward base = m.forward(x, T, true, 0);
    moeref::Grads g = m.backward(base, x, dy);
    ASSERT_GT(base.aux_loss, 0.0);
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
            Forward fp = m.forward(x, T, true, 0);
            theta[i] = keep - h;
            Forward fm = m.forward(x, T, true, 0);
            theta[i] = keep;
            if (fp.idx != base.idx || fm.idx != base.idx || fp.kept != base.kept ||
                fm.kept != base.kept) {
                ++skipped;
                continue;
            }
            double fd = (Model::total_loss(fp, dy) - Model::total_loss(fm, dy)) / (2 * h);
            max_an = std::max(max_an, std::fabs(an[i]));
            max_err = std::max(max_err, std::fabs(fd - an[i]));
            ++checked;
        }
        // as test_gradcheck.cc: FD truncation ~1e-12, rounding ~1e-9
        EXPECT_LE(max_err, 1e-6 * max_an + 1e-8)
            << (p < MOE_PARAM_COUNT ? moetest::param_name(p) : "x") << " max|grad| " << max_an;
    }
    EXPECT_LE(skipped, 2) << "coordinates whose routing flipped within +-h";
    EXPECT_GT(checked, 50);
}

INSTANTIATE_TEST_SUITE_P(Ext, ExtGradCheck, ::testing::ValuesIn(kCases),
                         [](const ::testing::TestParamInfo<ExtCase> &i) {
                             return std::string(i.param.name);
                         });

// ---- validation --------------------------------------------------------------------------------

void expect_invalid(const moe_layer_config_t &cfg, const char *field) {
    moe_context_t *ctx = nullptr;
    ASSERT_EQ(moe_context_create(&ctx, MOE_BACKEND_CPU, 0, nullptr), MOE_STATUS_SUCCESS);
    moe_layer_t *l = nullptr;
    EXPECT_EQ(moe_layer_create(&l, ctx, &cfg), MOE_STATUS_INVALID_ARGUMENT) << field;
    EXPECT_NE(std::string(moe_last_error()).find(field), std::string::npos)
        << "message: " << moe_last_error();
    EXPECT_EQ(l, nullptr);
    moe_context_destroy(ctx);
}

TEST(ExtValidation, EveryFieldIsChecked) {
    const moe_layer_config_t ok = moetest::small_config(8, 8, 16, 4);
    moe_layer_config_t c = ok;
    c.score_func = (moe_score_func_t)2;
    expect_invalid(c, "cfg->score_func");
    for (double v : {0.0, -1.0, (double)NAN, (double)INFINITY}) {
        c = ok;
        c.routed_scaling_factor = v;
        expect_invalid(c, "cfg->routed_scaling_factor");
    }
    for (int64_t g : {-1, 3, 17}) {  // negative, not dividing 16, more than E
        c = ok;
        c.num_groups = g;
        c.topk_group = 1;
        expect_invalid(c, "cfg->num_groups");
    }
    for (int64_t k : {0, 5}) {
        c = ok;
        c.num_groups = 4;
        c.topk_group = k;
        expect_invalid(c, "cfg->topk_group");
    }
    c = ok;
    c.num_groups = 8;  // groups of 2: one group holds fewer than K = 4
    c.topk_group = 1;
    expect_invalid(c, "cfg->topk_group");
    c = ok;
    c.num_groups = 4;
    c.topk_group = 2;
    c.group_score = (moe_group_score_t)5;
    expect_invalid(c, "cfg->group_score");
    for (double p : {-0.1, 1.0, (double)NAN}) {
        c = ok;
        c.expert_dropout = p;
        expect_invalid(c, "cfg->expert_dropout");
    }
    c = ok;
    c.score_func = MOE_SCORE_SIGMOID;
    c.noisy_gating = 1;
    expect_invalid(c, "cfg->noisy_gating");
    c = ok;
    c.expert_dropout = 0.1;
    c.router = MOE_ROUTER_EXPERT_CHOICE;
    expect_invalid(c, "cfg->router");
    // the good configs are accepted
    c = ok;
    c.score_func = MOE_SCORE_SIGMOID;
    c.num_groups = 4;
    c.topk_group = 1;
    c.expert_dropout = 0.5;
    c.routed_scaling_factor = 2.5;
    moetest::Layer L(c);
    EXPECT_EQ(L.status, MOE_STATUS_SUCCESS) << moe_last_error();
    moe_layer_config_t back{};
    ASSERT_EQ(moe_layer_get_config(L, &back), MOE_STATUS_SUCCESS);
    EXPECT_EQ(back.num_groups, 4);
    EXPECT_EQ(back.topk_group, 1);
    EXPECT_EQ(back.routed_scaling_factor, 2.5);
}

TEST(ExtMask, MaskedExpertsReceiveNothingAndBadMasksChangeNothing) {
    moe_layer_config_t cfg = moetest::small_config(8, 8, 8, 3);
    moetest::Layer L(cfg);
    ASSERT_EQ(L.status, MOE_STATUS_SUCCESS);
    uint8_t all[8], got[8];
    ASSERT_EQ(moe_layer_expert_mask(L, all), MOE_STATUS_SUCCESS);
    for (uint8_t v : all) EXPECT_EQ(v, 1);
    uint8_t before_fwd[8];
    EXPECT_EQ(moe_layer_expert_availability(L, before_fwd, nullptr), MOE_STATUS_INVALID_ARGUMENT);
    const uint8_t mask[8] = {1, 0, 1, 1, 0, 1, 0, 1};
    ASSERT_EQ(moe_layer_set_expert_mask(L, mask), MOE_STATUS_SUCCESS);
    const uint8_t too_few[8] = {0, 0, 1, 0, 0, 1, 0, 0};  // 2 < K = 3
    EXPECT_EQ(moe_layer_set_expert_mask(L, too_few), MOE_STATUS_INVALID_ARGUMENT);
    EXPECT_NE(std::string(moe_last_error()).find("mask"), std::string::npos);
    ASSERT_EQ(moe_layer_expert_mask(L, got), MOE_STATUS_SUCCESS);
    EXPECT_EQ(std::memcmp(got, mask, 8), 0) << "a refused mask changes nothing";
    const int64_t T = 200;
    moetest::LibRun r;
    moetest::library_forward(L, moetest::uniform(T * 8, 4), T, 1, 8, 8, 3, &r);
    for (int e : {1, 4, 6}) EXPECT_EQ(r.counts[(size_t)e], 0) << "expert " << e;
    for (int32_t e : r.idx) EXPECT_TRUE(mask[e]) << "routed to masked expert " << e;
    int64_t n = 0;
    ASSERT_EQ(moe_layer_expert_availability(L, got, &n), MOE_STATUS_SUCCESS);
    EXPECT_EQ(std::memcmp(got, mask, 8), 0);
    EXPECT_EQ(n, 5);
    // NULL restores every expert
    ASSERT_EQ(moe_layer_set_expert_mask(L, nullptr), MOE_STATUS_SUCCESS);
    moetest::library_forward(L, moetest::uniform(T * 8, 4), T, 1, 8, 8, 3, &r);
    EXPECT_GT(r.counts[1] + r.counts[4] + r.counts[6], 0);
    // a noisy layer refuses a mask
    cfg.noisy_gating = 1;
    moetest::Layer N(cfg);
    ASSERT_EQ(N.status, MOE_STATUS_SUCCESS);
    EXPECT_EQ(moe_layer_set_expert_mask(N, mask), MOE_STATUS_INVALID_ARGUMENT);
    // forced routing onto a masked expert is refused
    ASSERT_EQ(moe_layer_set_expert_mask(L, mask), MOE_STATUS_SUCCESS);
    std::vector<int32_t> fi(3 * 2, 0);
    fi[1] = 2, fi[2] = 3, fi[3] = 5, fi[4] = 7, fi[5] = 4;  // token 1 picks expert 4: masked
    std::vector<float> fg(6, 0.3f), x = moetest::uniform(2 * 8, 9), y(2 * 8);
    ASSERT_EQ(moe_layer_force_routing(L, fi.data(), fg.data(), 2), MOE_STATUS_SUCCESS);
    EXPECT_EQ(moe_layer_forward(L, x.data(), y.data(), 2, 1, nullptr),
              MOE_STATUS_INVALID_ARGUMENT);
}

// Dropout: reproducible (a pure function of seed, training-call counter and expert), only in
// training, never below K available, and dropping each expert with probability p.
TEST(ExtDropout, ReproducibleTrainingOnlyAtLeastK) {
    moe_layer_config_t cfg = moetest::small_config(4, 4, 16, 3);
    cfg.expert_dropout = 0.6;
    moetest::Layer A(cfg), B(cfg);
    ASSERT_EQ(A.status, MOE_STATUS_SUCCESS);
    ASSERT_EQ(B.status, MOE_STATUS_SUCCESS);
    const int64_t T = 5;
    std::vector<float> x = moetest::uniform(T * 4, 1), y(T * 4);
    int64_t dropped = 0, draws = 0, distinct_min = 0;
    std::set<std::vector<uint8_t>> seen;
    for (int call = 0; call < 200; ++call) {
        uint8_t a[16], b[16];
        int64_t na = 0, nb = 0;
        ASSERT_EQ(moe_layer_forward(A, x.data(), y.data(), T, 1, nullptr), MOE_STATUS_SUCCESS);
        ASSERT_EQ(moe_layer_forward(B, x.data(), y.data(), T, 1, nullptr), MOE_STATUS_SUCCESS);
        ASSERT_EQ(moe_layer_expert_availability(A, a, &na), MOE_STATUS_SUCCESS);
        ASSERT_EQ(moe_layer_expert_availability(B, b, &nb), MOE_STATUS_SUCCESS);
        ASSERT_EQ(std::memcmp(a, b, 16), 0) << "call " << call;
        ASSERT_GE(na, 3);
        distinct_min += na == 3;
        if (na > 3) {  // draws the at-least-K rule did not touch
            for (uint8_t v : a) dropped += !v;
            draws += 16;
        }
        seen.insert(std::vector<uint8_t>(a, a + 16));
        if (call % 50 == 0) {  // an inference forward in between: all available, no counter step
            ASSERT_EQ(moe_layer_forward(B, x.data(), y.data(), T, 0, nullptr), MOE_STATUS_SUCCESS);
            ASSERT_EQ(moe_layer_expert_availability(B, b, &nb), MOE_STATUS_SUCCESS);
            EXPECT_EQ(nb, 16);
        }
    }
    EXPECT_GT(seen.size(), 150u) << "fresh draws per call";
    // these draws are conditioned on more than K available, which biases the rate down a little
    // (P(<= 3 of 16 kept) = 0.065 at p = 0.6); a wide band still catches a wrong rate or rule
    ASSERT_GT(draws, 0);
    const double rate = (double)dropped / (double)draws;
    EXPECT_GT(rate, 0.5);
    EXPECT_LT(rate, 0.65);
    EXPECT_GT(distinct_min, 0) << "the at-least-K rule should have been needed sometimes";
}

// ---- expert parallelism: node-limited routing over local ranks --------------------------------

struct RankRun {
    std::vector<float> y;
    std::vector<int32_t> idx;
    std::vector<uint8_t> avail;
    std::string err;
};

std::vector<RankRun> run_local(const moe_layer_config_t &cfg, int P, const std::vector<float> &x,
                               int64_t T_per_rank, const std::vector<float> &wg) {
    std::vector<moe_comm_t *> comms((size_t)P);
    std::vector<RankRun> out((size_t)P);
    if (moe_comm_create_local(comms.data(), P) != MOE_STATUS_SUCCESS) {
        out[0].err = moe_last_error();
        return out;
    }
    const int64_t D = cfg.d_model, K = cfg.top_k;
    std::vector<std::thread> th;
    for (int r = 0; r < P; ++r)
        th.emplace_back([&, r] {
            RankRun &o = out[(size_t)r];
            moe_context_t *ctx = nullptr;
            moe_layer_t *layer = nullptr;
            if (moe_context_create(&ctx, MOE_BACKEND_CPU, 0, comms[(size_t)r]) ||
                moe_layer_create(&layer, ctx, &cfg)) {
                o.err = moe_last_error();
            } else {
                void *w = nullptr;
                moe_layer_param(layer, MOE_PARAM_ROUTER_WEIGHT, &w, nullptr, nullptr);
                std::memcpy(w, wg.data(), wg.size() * sizeof(float));
                o.y.assign((size_t)(T_per_rank * D), 0.0f);
                o.idx.assign((size_t)(T_per_rank * K), -1);
                o.avail.assign((size_t)cfg.num_experts, 0);
                if (moe_layer_forward(layer, x.data() + r * T_per_rank * D, o.y.data(),
                                      T_per_rank, 1, nullptr) ||
                    moe_layer_routing(layer, o.idx.data(), nullptr, nullptr) ||
                    moe_layer_expert_availability(layer, o.avail.data(), nullptr))
                    o.err = moe_last_error();
            }
            moe_layer_destroy(layer);
            moe_context_destroy(ctx);
        });
    for (auto &t : th) t.join();
    for (auto *c : comms) moe_comm_destroy(c);
    return out;
}

// With G = P groups (group g = rank g's experts) and topk_group = m, each token's rows go to at
// most m ranks; the same layer without groups sends some tokens to more (so the check can fail).
// The expert-parallel output equals the one-rank layer's.
TEST(ExtNodeLimited, EveryTokenReachesAtMostTopkGroupRanks) {
    const int P = 4;
    const int64_t E = 16, K = 4, D = 8, Tr = 40, m = 2;
    moe_layer_config_t cfg = moetest::small_config(D, 8, E, K);
    cfg.score_func = MOE_SCORE_SIGMOID;
    cfg.num_groups = P;
    cfg.topk_group = m;
    cfg.expert_dropout = 0.3;  // the draw is the same on every rank
    const std::vector<float> x = moetest::uniform(P * Tr * D, 21);
    const std::vector<float> wg = moetest::uniform(D * E, 22, -1.5f, 1.5f);
    std::vector<RankRun> runs = run_local(cfg, P, x, Tr, wg);
    // the one-rank layer over all tokens
    moetest::Layer one(cfg);
    ASSERT_EQ(one.status, MOE_STATUS_SUCCESS);
    moetest::set_param(one, MOE_PARAM_ROUTER_WEIGHT, wg);
    std::vector<float> y1((size_t)(P * Tr * D));
    ASSERT_EQ(moe_layer_forward(one, x.data(), y1.data(), P * Tr, 1, nullptr), MOE_STATUS_SUCCESS);
    std::vector<uint8_t> avail1((size_t)E);
    ASSERT_EQ(moe_layer_expert_availability(one, avail1.data(), nullptr), MOE_STATUS_SUCCESS);
    for (int r = 0; r < P; ++r) {
        const RankRun &o = runs[(size_t)r];
        ASSERT_TRUE(o.err.empty()) << "rank " << r << ": " << o.err;
        EXPECT_EQ(o.avail, avail1) << "rank " << r << ": the dropout draw must not depend on it";
        for (int64_t t = 0; t < Tr; ++t) {
            std::set<int> ranks;
            for (int64_t j = 0; j < K; ++j) ranks.insert(o.idx[(size_t)(t * K + j)] / (E / P));
            EXPECT_LE((int64_t)ranks.size(), m) << "rank " << r << " token " << t;
        }
        std::vector<double> ref(y1.begin() + r * Tr * D, y1.begin() + (r + 1) * Tr * D);
        EXPECT_LE(moetest::rel_err(o.y, ref), 1e-5) << "rank " << r;
    }
    cfg.num_groups = 0;
    std::vector<RankRun> free_runs = run_local(cfg, P, x, Tr, wg);
    int64_t wider = 0;
    for (const RankRun &o : free_runs) {
        ASSERT_TRUE(o.err.empty()) << o.err;
        for (int64_t t = 0; t < Tr; ++t) {
            std::set<int> ranks;
            for (int64_t j = 0; j < K; ++j) ranks.insert(o.idx[(size_t)(t * K + j)] / (E / P));
            wider += (int64_t)ranks.size() > m;
        }
    }
    EXPECT_GT(wider, 0) << "without groups some token should reach more than m ranks";
}

TEST(ExtMask, RanksMustAgreeOnTheMask) {
    const int P = 2;
    moe_layer_config_t cfg = moetest::small_config(4, 4, 4, 1);
    std::vector<moe_comm_t *> comms((size_t)P);
    ASSERT_EQ(moe_comm_create_local(comms.data(), P), MOE_STATUS_SUCCESS);
    moe_status_t st[2] = {MOE_STATUS_SUCCESS, MOE_STATUS_SUCCESS};
    uint8_t after[2][4];
    std::vector<std::thread> th;
    for (int r = 0; r < P; ++r)
        th.emplace_back([&, r] {
            moe_context_t *ctx = nullptr;
            moe_layer_t *layer = nullptr;
            if (moe_context_create(&ctx, MOE_BACKEND_CPU, 0, comms[(size_t)r]) ||
                moe_layer_create(&layer, ctx, &cfg)) {
                st[r] = MOE_STATUS_INTERNAL_ERROR;
            } else {
                uint8_t mask[4] = {1, 1, 1, 1};
                mask[r] = 0;  // each rank masks a different expert
                st[r] = moe_layer_set_expert_mask(layer, mask);
                moe_layer_expert_mask(layer, after[r]);
            }
            moe_layer_destroy(layer);
            moe_context_destroy(ctx);
        });
    for (auto &t : th) t.join();
    for (int r = 0; r < P; ++r) {
        EXPECT_EQ(st[r], MOE_STATUS_INVALID_ARGUMENT) << "rank " << r;
        for (int e = 0; e < 4; ++e) EXPECT_EQ(after[r][e], 1) << "rank " << r;
    }
    for (auto *c : comms) moe_comm_destroy(c);
}

// ---- scale: thousands of experts, K = 32 ------------------------------------------------------

TEST(ExtScale, E4096K32MatchesReference) {
    const int64_t D = 4, F = 4, T = 6, E = 4096, K = 32;
    for (int variant = 0; variant < 3; ++variant) {
        SCOPED_TRACE(variant == 0 ? "softmax" : variant == 1 ? "sigmoid groups" : "dropout mask");
        moe_layer_config_t cfg = moetest::small_config(D, F, E, K);
        cfg.switch_loss_coef = 0.01;
        cfg.importance_loss_coef = 0.01;
        cfg.z_loss_coef = 0.001;
        ExtCase c{"scale", E, K, MOE_SCORE_SOFTMAX, 1, MOE_GATE_TOPK_OF_SOFTMAX, 1.0, 0, 0,
                  MOE_GROUP_SCORE_TOP2_SUM, 0, 0, 0, 0, 0.01, 0.01, 0.001};
        if (variant == 1) {
            c.score = MOE_SCORE_SIGMOID;
            c.G = 64;
            c.topk_group = 8;
            c.scale = 2.5;
            c.bias = 1;
        }
        if (variant == 2) {
            c.dropout = 0.5;
            c.mask = 1;
        }
        cfg = ext_config(c, D, F);
        moetest::Layer L(cfg);
        ASSERT_EQ(L.status, MOE_STATUS_SUCCESS) << moe_last_error();
        setup_layer(L, c, D, 40 + variant, 3.0f);
        check_call(L, T, 1, 0, 50 + variant);
    }
}

}  // namespace

namespace {

// ---- presets ------------------------------------------------------------------------------------

TEST(ExtPresets, EveryPresetRunsAgainstTheReferenceAndUnknownNamesAreListed) {
    const char *names[] = {"mixtral", "qwen2-moe", "qwen3-moe", "deepseek-v3", "switch", "olmoe"};
    for (const char *n : names) {
        SCOPED_TRACE(n);
        moe_layer_config_t cfg{};
        ASSERT_EQ(moe_layer_config_preset(n, &cfg), MOE_STATUS_SUCCESS) << moe_last_error();
        EXPECT_EQ(cfg.struct_size, sizeof cfg);
        EXPECT_GE(cfg.d_model, 768);
        // the family's routing at a test size: D and F shrink, E, K and the rest stay
        cfg.d_model = 6;
        cfg.d_ff = 4;
        moetest::Layer L(cfg);
        ASSERT_EQ(L.status, MOE_STATUS_SUCCESS) << moe_last_error();
        moetest::set_param(L, MOE_PARAM_ROUTER_WEIGHT,
                           moetest::uniform(6 * cfg.num_experts, 5, -1.5f, 1.5f));
        check_call(L, 24, 1, 0, 70);
    }
    moe_layer_config_t deepseek{};
    ASSERT_EQ(moe_layer_config_preset("deepseek-v3", &deepseek), MOE_STATUS_SUCCESS);
    EXPECT_EQ(deepseek.score_func, MOE_SCORE_SIGMOID);
    EXPECT_EQ(deepseek.num_groups, 8);
    EXPECT_EQ(deepseek.topk_group, 4);
    EXPECT_EQ(deepseek.routed_scaling_factor, 2.5);
    moe_layer_config_t c = moe_layer_config_default(), before = c;
    EXPECT_EQ(moe_layer_config_preset("gpt-5", &c), MOE_STATUS_INVALID_ARGUMENT);
    EXPECT_NE(std::string(moe_last_error()).find("deepseek-v3"), std::string::npos)
        << moe_last_error();
    EXPECT_EQ(c.d_model, before.d_model) << "an unknown name changes nothing";
    EXPECT_EQ(c.num_experts, before.num_experts);
    EXPECT_EQ(c.score_func, before.score_func);
    EXPECT_EQ(moe_layer_config_preset(nullptr, &c), MOE_STATUS_INVALID_ARGUMENT);
    EXPECT_EQ(moe_layer_config_preset("mixtral", nullptr), MOE_STATUS_INVALID_ARGUMENT);
}

}  // namespace

namespace {

// Loss-free balancing with a mask: an unavailable expert's bias stays, the others move towards
// the mean load over the available experts (docs/semantics.md "Bias update").
TEST(ExtMask, BiasOfUnavailableExpertStaysAndMeanIsOverAvailable) {
    moe_layer_config_t cfg = moetest::small_config(8, 8, 4, 1);
    cfg.score_func = MOE_SCORE_SIGMOID;
    cfg.bias_update_rate = 0.25;
    moetest::Layer L(cfg);
    ASSERT_EQ(L.status, MOE_STATUS_SUCCESS);
    const uint8_t mask[4] = {1, 1, 0, 1};
    ASSERT_EQ(moe_layer_set_expert_mask(L, mask), MOE_STATUS_SUCCESS);
    const int64_t T = 30;
    moetest::LibRun r;
    moetest::library_forward(L, moetest::uniform(T * 8, 17), T, 1, 8, 4, 1, &r);
    std::vector<float> b(4);
    ASSERT_EQ(moe_layer_score_bias(L, b.data()), MOE_STATUS_SUCCESS);
    EXPECT_EQ(b[2], 0.0f) << "the masked expert's bias must not move";
    const double mean = (double)T / 3.0;  // 30 assignments over the 3 available experts
    for (int e : {0, 1, 3}) {
        const double c = (double)r.counts[(size_t)e];
        const float want = c < mean ? 0.25f : (c > mean ? -0.25f : 0.0f);
        EXPECT_EQ(b[(size_t)e], want) << "expert " << e << " count " << c;
    }
    EXPECT_EQ(moe_layer_expert_availability(nullptr, nullptr, nullptr),
              MOE_STATUS_INVALID_ARGUMENT);
    EXPECT_EQ(moe_layer_set_expert_mask(nullptr, mask), MOE_STATUS_INVALID_ARGUMENT);
    EXPECT_EQ(moe_layer_expert_mask(L, nullptr), MOE_STATUS_INVALID_ARGUMENT);
}

}  // namespace
