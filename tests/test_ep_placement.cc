// test_ep_placement.cc - expert placement and replication over the local (threads)
// communicator: any E on any P, uneven and replicated placements, ranks without experts; every
// rank's y, dx and expert gradients (replicas summed) equal the single-rank layer's; the
// placement's validation; the planner; moving experts (with their optimizer moments) between
// ranks in the middle of training.
#include <gtest/gtest.h>

#include <thread>

#include "ep_common.h"

namespace {

using ep::Placement;
using ep::Result;

// f32: a replicated expert's gradient is a sum of per-replica GEMMs, the single-rank one a
// single GEMM over the same rows: sums of O(100) terms in another order, a few ulp apart
constexpr double kTol = 1e-5;

std::vector<float> tokens(int64_t T, int64_t D, uint32_t seed) {
    auto x = ep::make_tokens(T, D, seed);
    for (int64_t t = 0; t < T; ++t) x[(size_t)(t * D + D - 1)] = 1.0f;
    return x;
}

std::vector<Result> run_local(int P, const moe_layer_config_t &cfg, const std::vector<float> &x,
                              const std::vector<float> &dy, const std::vector<int64_t> &begin,
                              const Placement &pl) {
    std::vector<moe_comm_t *> comms((size_t)P);
    EXPECT_EQ(moe_comm_create_local(comms.data(), P), MOE_STATUS_SUCCESS) << moe_last_error();
    std::vector<Result> out((size_t)P);
    std::vector<std::thread> th;
    const int64_t D = cfg.d_model;
    for (int r = 0; r < P; ++r)
        th.emplace_back([&, r] {
            int64_t b = begin[(size_t)r], T = begin[(size_t)r + 1] - b;
            out[(size_t)r] = ep::run_rank_placed(comms[(size_t)r], cfg, x.data() + b * D,
                                                 dy.data() + b * D, T, pl);
        });
    for (auto &t : th) t.join();
    for (auto *cm : comms) EXPECT_EQ(moe_comm_destroy(cm), MOE_STATUS_SUCCESS);
    return out;
}

// the default placement of moe.h as a Placement
Placement contiguous(int P, int64_t E) {
    std::vector<std::vector<int32_t>> r((size_t)P);
    for (int q = 0; q < P; ++q)
        for (int64_t e = q * E / P; e < (q + 1) * E / P; ++e) r[(size_t)q].push_back((int32_t)e);
    return ep::placement(r);
}

struct Case {
    const char *name;
    int P;
    int64_t E, K, T;
    std::vector<std::vector<int32_t>> ranks;  // empty: the default placement
    bool hot;                                 // every token's first choice is expert 0
};

void PrintTo(const Case &c, std::ostream *os) { *os << c.name; }

class EpPlacement : public ::testing::TestWithParam<Case> {};

TEST_P(EpPlacement, MatchesSingleRank) {
    const Case &c = GetParam();
    moe_layer_config_t cfg = ep::small_config(c.E, c.K);
    cfg.switch_loss_coef = 0.1;
    cfg.z_loss_coef = 0.01;
    const int64_t D = cfg.d_model, T = c.T, E = c.E;
    auto x = tokens(T, D, 41), dy = ep::make_tokens(T, D, 42);
    auto begin = ep::split(T, c.P);
    const Placement given = c.ranks.empty() ? Placement{} : ep::placement(c.ranks);
    const Placement pl = c.ranks.empty() ? contiguous(c.P, E) : given;

    if (c.hot) {
        // every token leans hard towards the router column of expert 0: x += 40 * wg[:, 0]
        std::vector<float> wg((size_t)(D * E));
        moe_context_t *ctx = nullptr;
        moe_layer_t *l = nullptr;
        ASSERT_EQ(moe_context_create(&ctx, MOE_BACKEND_CPU, 0, nullptr), 0);
        ASSERT_EQ(moe_layer_create(&l, ctx, &cfg), 0);
        float *w = nullptr;
        moe_layer_param(l, MOE_PARAM_ROUTER_WEIGHT, (void **)&w, nullptr, nullptr);
        std::memcpy(wg.data(), w, wg.size() * sizeof(float));
        moe_layer_destroy(l);
        moe_context_destroy(ctx);
        for (int64_t t = 0; t < T; ++t)
            for (int64_t d = 0; d < D; ++d) x[(size_t)(t * D + d)] += 40.0f * wg[(size_t)(d * E)];
    }
    Result ref = ep::run_rank(nullptr, cfg, x.data(), dy.data(), T, [](moe_layer_t *) {});
    ASSERT_EQ(ref.status, MOE_STATUS_SUCCESS) << ref.error;
    if (c.hot) {
        EXPECT_GT(ref.tokens_per_expert[0], T * 9 / 10) << "expert 0 is not hot";
    }
    auto ranks = run_local(c.P, cfg, x, dy, begin, given);

    const int64_t F2 = cfg.d_ff;
    const int64_t per[MOE_PARAM_COUNT] = {0, 0, D * F2, F2, cfg.d_ff * D, D};
    std::vector<double> router_sum(ref.grad[MOE_PARAM_ROUTER_WEIGHT].size(), 0.0);
    int64_t rows = 0;
    for (int r = 0; r < c.P; ++r) {
        const Result &R = ranks[(size_t)r];
        ASSERT_EQ(R.status, MOE_STATUS_SUCCESS) << "rank " << r << ": " << R.error;
        int64_t b = begin[(size_t)r], n = (begin[(size_t)r + 1] - b) * D;
        if (n > 0) {
            EXPECT_LE(ep::rel_err(R.y.data(), ref.y.data() + b * D, n), kTol) << "y rank " << r;
            EXPECT_LE(ep::rel_err(R.dx.data(), ref.dx.data() + b * D, n), kTol)
                << "dx rank " << r;
        }
        const int64_t El = pl.num_local[(size_t)r], k0 = pl.begin(r);
        for (int p = MOE_PARAM_W1; p < MOE_PARAM_COUNT; ++p) {
            ASSERT_EQ((int64_t)R.grad[p].size(), El * per[p]) << "param " << p << " rank " << r;
            for (int64_t le = 0; le < El; ++le) {
                int64_t e = pl.experts[(size_t)(k0 + le)];
                EXPECT_LE(ep::rel_err(R.grad[p].data() + le * per[p],
                                      ref.grad[p].data() + e * per[p], per[p]),
                          kTol)
                    << "grad of param " << p << ", expert " << e << " on rank " << r;
            }
        }
        for (size_t i = 0; i < router_sum.size(); ++i)
            router_sum[i] += R.grad[MOE_PARAM_ROUTER_WEIGHT][i];
        rows += R.stats.rows_received;
    }
    EXPECT_EQ(rows, ref.stats.rows_received) << "every kept row went to exactly one slot";
    // the rows each rank received follow moe.h's split rule: source r cuts its n rows of an
    // expert with m holders into parts [floor(i n / m), floor((i + 1) n / m)), part i to holder
    // (i + r) mod m
    std::vector<int64_t> expect((size_t)c.P, 0);
    for (int src = 0; src < c.P; ++src) {
        int64_t b = begin[(size_t)src], Tr = begin[(size_t)src + 1] - b;
        if (Tr == 0) continue;
        Result one = ep::run_rank(nullptr, cfg, x.data() + b * D, dy.data() + b * D, Tr,
                                  [](moe_layer_t *) {});
        ASSERT_EQ(one.status, MOE_STATUS_SUCCESS) << one.error;
        for (int64_t e = 0; e < E; ++e) {
            std::vector<int> holders;
            for (int q = 0; q < c.P; ++q)
                for (int64_t i = 0; i < pl.num_local[(size_t)q]; ++i)
                    if (pl.experts[(size_t)(pl.begin(q) + i)] == e) holders.push_back(q);
            const int64_t m = (int64_t)holders.size(), n = one.tokens_per_expert[(size_t)e];
            for (int64_t i = 0; i < m; ++i)
                expect[(size_t)holders[(size_t)((i + src) % m)]] +=
                    (i + 1) * n / m - i * n / m;
        }
    }
    for (int q = 0; q < c.P; ++q)
        EXPECT_EQ(ranks[(size_t)q].stats.rows_received, expect[(size_t)q]) << "rank " << q;
    // replicas hold bitwise equal gradients
    for (int r = 0; r < c.P; ++r)
        for (int q = r + 1; q < c.P; ++q)
            for (int64_t i = 0; i < pl.num_local[(size_t)r]; ++i)
                for (int64_t j = 0; j < pl.num_local[(size_t)q]; ++j) {
                    int32_t e = pl.experts[(size_t)(pl.begin(r) + i)];
                    if (e != pl.experts[(size_t)(pl.begin(q) + j)]) continue;
                    for (int p = MOE_PARAM_W1; p < MOE_PARAM_COUNT; ++p) {
                        if (per[p] == 0) continue;  // not an expert parameter, or turned off
                        EXPECT_EQ(0, std::memcmp(ranks[(size_t)r].grad[p].data() + i * per[p],
                                                 ranks[(size_t)q].grad[p].data() + j * per[p],
                                                 (size_t)per[p] * sizeof(float)))
                            << "replicas of expert " << e << " on ranks " << r << ", " << q;
                    }
                }
    std::vector<float> sum(router_sum.begin(), router_sum.end());
    EXPECT_LE(ep::rel_err(sum.data(), ref.grad[MOE_PARAM_ROUTER_WEIGHT].data(),
                          (int64_t)sum.size()),
              kTol);
}

INSTANTIATE_TEST_SUITE_P(
    Placements, EpPlacement,
    ::testing::Values(
        Case{"E8_P3_default_uneven", 3, 8, 2, 61, {}, false},
        Case{"E2_P3_default_rank_without_expert", 3, 2, 1, 40, {}, false},
        Case{"E1_P2_default", 2, 1, 1, 30, {}, false},
        Case{"E8_P3_uneven", 3, 8, 2, 59, {{0, 1, 2, 3, 4}, {5}, {6, 7}}, false},
        Case{"E8_P3_scattered", 3, 8, 2, 59, {{1, 6}, {0, 3, 5, 7}, {2, 4}}, false},
        Case{"E8_P3_replicated", 3, 8, 2, 77, {{0, 1, 2}, {0, 3, 4, 5}, {0, 1, 6, 7}}, false},
        Case{"E8_P3_empty_rank", 3, 8, 2, 50, {{}, {0, 1, 2, 3}, {4, 5, 6, 7}}, false},
        Case{"E8_P4_replicated_empty", 4, 8, 2, 83,
             {{0, 1, 2, 3, 4, 5, 6, 7}, {}, {0, 2}, {0}}, false},
        Case{"E4_P4_hot_replicated_everywhere", 4, 4, 2, 90, {{0, 1}, {0, 2}, {0, 3}, {0}},
             true},
        Case{"E6_P2_all_on_both", 2, 6, 3, 47, {{0, 1, 2, 3, 4, 5}, {0, 1, 2, 3, 4, 5}}, false}));

// the chunk count changes no number with a packing, replicated placement either
TEST(EpPlacementChunks, ChunkCountsGiveIdenticalResults) {
    const int P = 3;
    const int64_t T = 70, D = 12;
    auto x = tokens(T, D, 51), dy = ep::make_tokens(T, D, 52);
    auto begin = ep::split(T, P);
    Placement pl = ep::placement({{0, 5, 6}, {0, 1, 2, 7}, {1, 3, 4}});
    std::vector<Result> first;
    for (int64_t chunks = 1; chunks <= 4; ++chunks) {
        moe_layer_config_t cfg = ep::small_config(8, 2);
        cfg.num_chunks = chunks;
        auto ranks = run_local(P, cfg, x, dy, begin, pl);
        for (int r = 0; r < P; ++r) ASSERT_EQ(ranks[(size_t)r].status, 0) << ranks[(size_t)r].error;
        if (chunks == 1) {
            first = ranks;
            continue;
        }
        for (int r = 0; r < P; ++r) {
            EXPECT_EQ(first[(size_t)r].y, ranks[(size_t)r].y) << chunks << " chunks";
            EXPECT_EQ(first[(size_t)r].dx, ranks[(size_t)r].dx) << chunks << " chunks";
            for (int p = 0; p < MOE_PARAM_COUNT; ++p)
                EXPECT_EQ(first[(size_t)r].grad[p], ranks[(size_t)r].grad[p]) << "param " << p;
        }
    }
}

// a placement is validated before anything changes; with one rank the only placement is every
// expert once
TEST(EpPlacementErrors, InvalidPlacementsAreRefused) {
    moe_context_t *ctx = nullptr;
    ASSERT_EQ(moe_context_create(&ctx, MOE_BACKEND_CPU, 0, nullptr), MOE_STATUS_SUCCESS);
    moe_layer_config_t cfg = ep::small_config(4, 2);
    moe_layer_t *layer = nullptr;
    ASSERT_EQ(moe_layer_create(&layer, ctx, &cfg), MOE_STATUS_SUCCESS);
    struct Bad {
        int64_t n;
        std::vector<int32_t> ex;
        const char *says;
    } bad[] = {{3, {0, 1, 2}, "expert 3 is held by no rank"},
               {4, {0, 1, 1, 3}, "after expert 1"},
               {4, {0, 2, 1, 3}, "after expert 2"},
               {4, {0, 1, 2, 4}, "not an expert id"},
               {5, {0, 1, 2, 3, 3}, "num_local[0] = 5"},
               {-1, {0}, "num_local[0] = -1"}};
    for (const auto &b : bad) {
        EXPECT_EQ(moe_layer_set_placement(layer, &b.n, b.ex.data(), nullptr),
                  MOE_STATUS_INVALID_ARGUMENT)
            << b.says;
        EXPECT_NE(std::string(moe_last_error()).find(b.says), std::string::npos)
            << moe_last_error();
    }
    int64_t n = 4, slots = 0, got = 0;
    std::vector<int32_t> ex = {0, 1, 2, 3};
    EXPECT_EQ(moe_layer_set_placement(layer, nullptr, ex.data(), nullptr),
              MOE_STATUS_INVALID_ARGUMENT);
    EXPECT_EQ(moe_layer_set_placement(layer, &n, nullptr, nullptr), MOE_STATUS_INVALID_ARGUMENT);
    EXPECT_EQ(moe_layer_set_placement(layer, &n, ex.data(), nullptr), MOE_STATUS_SUCCESS)
        << moe_last_error();
    std::vector<int32_t> back(4, -1);
    EXPECT_EQ(moe_layer_get_placement(layer, &got, back.data(), &slots), MOE_STATUS_SUCCESS);
    EXPECT_EQ(slots, 4);
    EXPECT_EQ(got, 4);
    EXPECT_EQ(back, ex);
    moe_layer_destroy(layer);
    moe_context_destroy(ctx);
}

// the planner: valid placements, replicas where the load is, the bound of list scheduling
TEST(EpPlacementPlanner, PlansAreValidAndBalanced) {
    const int64_t E = 64;
    const int P = 8;
    std::vector<double> load((size_t)E);
    for (int64_t e = 0; e < E; ++e) load[(size_t)e] = 1e6 / std::pow((double)(e + 1), 1.2);
    for (int64_t R : {0, 8, 24}) {
        std::vector<int64_t> num((size_t)P);
        std::vector<int32_t> ex((size_t)(E + R));
        double planned = 0.0, measured = 0.0;
        ASSERT_EQ(moe_plan_placement(load.data(), E, P, R, num.data(), ex.data(), &planned),
                  MOE_STATUS_SUCCESS)
            << moe_last_error();
        ASSERT_EQ(moe_placement_imbalance(load.data(), E, P, num.data(), ex.data(), &measured),
                  MOE_STATUS_SUCCESS)
            << moe_last_error();
        EXPECT_NEAR(planned, measured, 1e-9);
        int64_t S = 0;
        for (int q = 0; q < P; ++q) {
            EXPECT_LE(num[(size_t)q], (E + R + P - 1) / P) << "slot cap, R " << R;
            S += num[(size_t)q];
        }
        EXPECT_LE(S, E + R) << "at most E + R slots";
        EXPECT_GE(S, E);
        // replication decreases the bottleneck; R = 0 cannot beat the hottest expert
        const double total = [&] {
            double t = 0;
            for (double v : load) t += v;
            return t;
        }();
        const double floor0 = load[0] / (total / P);
        if (R == 0) {
            EXPECT_GE(planned, floor0 - 1e-9);
        }
        if (R == 8) {
            EXPECT_LE(planned, 1.10) << "the target of docs/expert-parallel.md";
        }
        std::printf("zipf 1.2, E %lld, P %d, R %lld: planned max/mean %.4f\n", (long long)E, P,
                    (long long)R, planned);
    }
    // uniform loads on a divisible shape: perfectly balanced
    std::vector<double> flat(16, 5.0);
    std::vector<int64_t> num(4);
    std::vector<int32_t> ex(16);
    double imb = 0.0;
    ASSERT_EQ(moe_plan_placement(flat.data(), 16, 4, 0, num.data(), ex.data(), &imb), 0);
    EXPECT_DOUBLE_EQ(imb, 1.0);
    // bad input
    EXPECT_EQ(moe_plan_placement(flat.data(), 16, 4, 16 * 3 + 1, num.data(), ex.data(), &imb),
              MOE_STATUS_INVALID_ARGUMENT);
    flat[3] = -1.0;
    EXPECT_EQ(moe_plan_placement(flat.data(), 16, 4, 0, num.data(), ex.data(), &imb),
              MOE_STATUS_INVALID_ARGUMENT);
    EXPECT_NE(std::string(moe_last_error()).find("load[3]"), std::string::npos);
}

// Moving experts in the middle of training: two Adam steps on the default placement, then
// moe_layer_rebalance (which plans from the running load and moves weights, gradients and both
// moments, replicas included), then two more steps. Every rank's experts equal the single-rank
// layer's after the same four steps on the same tokens.
TEST(EpPlacementOnline, RebalanceMovesExpertsAndMoments) {
    const int P = 3;
    const int64_t T = 66, E = 6, D = 12, steps = 4;
    moe_layer_config_t cfg = ep::small_config(E, 2);
    auto begin = ep::split(T, P);
    std::vector<std::vector<float>> xs, dys;
    for (int64_t i = 0; i < steps; ++i) {
        xs.push_back(tokens(T, D, 60 + (uint32_t)i));
        dys.push_back(ep::make_tokens(T, D, 70 + (uint32_t)i));
    }
    const moe_optimizer_config_t ocfg = moe_optimizer_config_default(MOE_OPTIMIZER_ADAM);
    // one training loop; comm NULL: the single-rank reference
    struct Out {
        std::string error;
        std::vector<float> param[MOE_PARAM_COUNT];
        std::vector<int32_t> experts;
        double before = 0, after = 0;
    };
    auto train = [&](moe_comm_t *comm, int r, int nranks, Out &o) {
        moe_context_t *ctx = nullptr;
        moe_layer_t *layer = nullptr;
        moe_optimizer_t *opt = nullptr;
        moe_status_t st = moe_context_create(&ctx, MOE_BACKEND_CPU, 0, comm);
        if (!st) st = moe_layer_create(&layer, ctx, &cfg);
        if (!st) st = moe_optimizer_create(&opt, layer, &ocfg);
        int64_t b = nranks == 1 ? 0 : begin[(size_t)r];
        int64_t Tr = nranks == 1 ? T : begin[(size_t)r + 1] - b;
        std::vector<float> y((size_t)(Tr * D) + 1), dx((size_t)(Tr * D) + 1);
        for (int64_t i = 0; i < steps && !st; ++i) {
            if (i == 2 && nranks > 1) st = moe_layer_rebalance(layer, 2, opt, &o.before, &o.after);
            if (!st) st = moe_layer_zero_grad(layer, nullptr);
            if (!st)
                st = moe_layer_forward(layer, xs[(size_t)i].data() + b * D, y.data(), Tr, 1,
                                       nullptr);
            if (!st) st = moe_layer_backward(layer, dys[(size_t)i].data() + b * D, dx.data(), nullptr);
            if (!st) st = moe_layer_allreduce_router_grads(layer, nullptr);
            if (!st) st = moe_layer_reduce_replica_grads(layer, nullptr);
            if (!st) st = moe_optimizer_step(opt, nullptr);
        }
        for (int p = 0; p < MOE_PARAM_COUNT && !st; ++p) {
            void *v = nullptr;
            int64_t n = 0;
            moe_layer_param(layer, (moe_param_t)p, &v, nullptr, &n);
            o.param[p] = ep::host_copy(v, n);
        }
        int64_t S = 0;
        std::vector<int64_t> num((size_t)nranks);
        if (!st) st = moe_layer_get_placement(layer, num.data(), nullptr, &S);
        std::vector<int32_t> all((size_t)S);
        if (!st) st = moe_layer_get_placement(layer, nullptr, all.data(), nullptr);
        int64_t k0 = 0;
        for (int q = 0; q < r; ++q) k0 += num[(size_t)q];
        if (!st) o.experts.assign(all.begin() + k0, all.begin() + k0 + num[(size_t)r]);
        if (st) o.error = moe_last_error();
        moe_optimizer_destroy(opt);
        moe_layer_destroy(layer);
        moe_context_destroy(ctx);
    };
    Out ref;
    train(nullptr, 0, 1, ref);
    ASSERT_TRUE(ref.error.empty()) << ref.error;
    std::vector<moe_comm_t *> comms((size_t)P);
    ASSERT_EQ(moe_comm_create_local(comms.data(), P), MOE_STATUS_SUCCESS);
    std::vector<Out> out((size_t)P);
    std::vector<std::thread> th;
    for (int r = 0; r < P; ++r) th.emplace_back([&, r] { train(comms[(size_t)r], r, P, out[(size_t)r]); });
    for (auto &t : th) t.join();
    for (auto *cm : comms) EXPECT_EQ(moe_comm_destroy(cm), MOE_STATUS_SUCCESS);
    const int64_t per[MOE_PARAM_COUNT] = {0, 0, D * cfg.d_ff, cfg.d_ff, cfg.d_ff * D, D};
    int64_t slots = 0;
    for (int r = 0; r < P; ++r) {
        const Out &o = out[(size_t)r];
        ASSERT_TRUE(o.error.empty()) << "rank " << r << ": " << o.error;
        slots += (int64_t)o.experts.size();
        EXPECT_LE(o.after, o.before + 1e-12) << "the plan is no worse than the default";
        EXPECT_LE(ep::rel_err(o.param[MOE_PARAM_ROUTER_WEIGHT].data(),
                              ref.param[MOE_PARAM_ROUTER_WEIGHT].data(), D * E),
                  kTol);
        for (int p = MOE_PARAM_W1; p < MOE_PARAM_COUNT; ++p) {
            ASSERT_EQ(o.param[p].size(), o.experts.size() * (size_t)per[p]);
            for (size_t le = 0; le < o.experts.size(); ++le)
                EXPECT_LE(ep::rel_err(o.param[p].data() + le * per[p],
                                      ref.param[p].data() + o.experts[le] * per[p], per[p]),
                          1e-4)  // Adam divides by sqrt(v): a few ulp of the gradient grow
                    << "param " << p << ", expert " << o.experts[le] << ", rank " << r;
        }
    }
    EXPECT_LE(slots, E + 2) << "at most two redundant slots";
}

}  // namespace
