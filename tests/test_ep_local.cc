// test_ep_local.cc - expert parallelism over the local (threads) communicator: every rank's
// outputs, dx and expert gradients equal the single-rank layer's on the same tokens.
#include <gtest/gtest.h>

#include <thread>

#include "ep_common.h"

namespace {

using ep::Result;

// Tolerance: f32 throughout; the ranks sum each expert's rows in (source rank, position) order
// and the single-rank layer in position order, so sums of O(100) terms differ by a few ulp.
constexpr double kTol = 1e-5;

struct Case {
    int P;
    int64_t E, K, T;
    int zero_rank;       // a rank with no tokens (-1: none)
    int route;           // 0 learned, 1 one expert never chosen, 2 every token to expert 0
    double capacity;     // <= 0 dropless
};

// Router shaping through a constant last feature of x (set to 1 by tokens()).
void shape_router(moe_layer_t *layer, const moe_layer_config_t &cfg, int route) {
    if (route == 0) return;
    float *wg = nullptr;
    moe_layer_param(layer, MOE_PARAM_ROUTER_WEIGHT, (void **)&wg, nullptr, nullptr);
    int64_t D = cfg.d_model, E = cfg.num_experts;
    if (route == 1) wg[(D - 1) * E + (E - 1)] = -100.0f;
    if (route == 2) wg[(D - 1) * E + 0] = 100.0f;
}

std::vector<float> tokens(int64_t T, int64_t D, uint32_t seed) {
    auto x = ep::make_tokens(T, D, seed);
    for (int64_t t = 0; t < T; ++t) x[(size_t)(t * D + D - 1)] = 1.0f;
    return x;
}

std::vector<Result> run_local(const Case &c, const moe_layer_config_t &cfg,
                              const std::vector<float> &x, const std::vector<float> &dy,
                              const std::vector<int64_t> &begin, bool allreduce = false) {
    std::vector<moe_comm_t *> comms((size_t)c.P);
    EXPECT_EQ(moe_comm_create_local(comms.data(), c.P), MOE_STATUS_SUCCESS) << moe_last_error();
    std::vector<Result> out((size_t)c.P);
    std::vector<std::thread> th;
    const int64_t D = cfg.d_model;
    for (int r = 0; r < c.P; ++r)
        th.emplace_back([&, r] {
            int64_t b = begin[(size_t)r], T = begin[(size_t)r + 1] - b;
            out[(size_t)r] = ep::run_rank(comms[(size_t)r], cfg, x.data() + b * D,
                                          dy.data() + b * D, T, [&](moe_layer_t *l) {
                                              shape_router(l, cfg, c.route);
                                          });
            (void)allreduce;
        });
    for (auto &t : th) t.join();
    for (auto *cm : comms) EXPECT_EQ(moe_comm_destroy(cm), MOE_STATUS_SUCCESS);
    return out;
}

void PrintTo(const Case &c, std::ostream *os) {
    *os << "P" << c.P << "_E" << c.E << "_K" << c.K << "_T" << c.T << "_zero" << c.zero_rank
        << "_route" << c.route;
}

class EpLocal : public ::testing::TestWithParam<Case> {};

TEST_P(EpLocal, DroplessMatchesSingleRank) {
    const Case c = GetParam();
    moe_layer_config_t cfg = ep::small_config(c.E, c.K);
    cfg.switch_loss_coef = 0.1;  // losses are global: dx must match with them on
    cfg.importance_loss_coef = 0.05;
    cfg.z_loss_coef = 0.01;
    const int64_t D = cfg.d_model, T = c.T;
    auto x = tokens(T, D, 11), dy = ep::make_tokens(T, D, 12);
    auto begin = ep::split(T, c.P, c.zero_rank);

    Result ref = ep::run_rank(nullptr, cfg, x.data(), dy.data(), T, [&](moe_layer_t *l) {
        shape_router(l, cfg, c.route);
    });
    ASSERT_EQ(ref.status, MOE_STATUS_SUCCESS) << ref.error;
    auto ranks = run_local(c, cfg, x, dy, begin);

    const int64_t El = c.E / c.P;
    const int64_t F2 = cfg.activation == MOE_ACTIVATION_SWIGLU ? 2 * cfg.d_ff : cfg.d_ff;
    const int64_t per[MOE_PARAM_COUNT] = {0, 0, D * F2, F2, cfg.d_ff * D, D};
    std::vector<double> router_sum(ref.grad[MOE_PARAM_ROUTER_WEIGHT].size(), 0.0);
    for (int r = 0; r < c.P; ++r) {
        const Result &R = ranks[(size_t)r];
        ASSERT_EQ(R.status, MOE_STATUS_SUCCESS) << "rank " << r << ": " << R.error;
        int64_t b = begin[(size_t)r], n = (begin[(size_t)r + 1] - b) * D;
        if (n > 0) {
            EXPECT_LE(ep::rel_err(R.y.data(), ref.y.data() + b * D, n), kTol) << "y rank " << r;
            EXPECT_LE(ep::rel_err(R.dx.data(), ref.dx.data() + b * D, n), kTol)
                << "dx rank " << r;
        }
        for (int p = MOE_PARAM_W1; p < MOE_PARAM_COUNT; ++p) {
            if (per[p] == 0 || ref.grad[p].empty()) continue;
            ASSERT_EQ((int64_t)R.grad[p].size(), El * per[p]);
            EXPECT_LE(ep::rel_err(R.grad[p].data(), ref.grad[p].data() + r * El * per[p],
                                  El * per[p]),
                      kTol)
                << "grad of param " << p << " on rank " << r;
        }
        for (size_t i = 0; i < router_sum.size(); ++i)
            router_sum[i] += R.grad[MOE_PARAM_ROUTER_WEIGHT][i];
        // global stats on every rank
        EXPECT_EQ(R.stats.num_tokens, T);
        EXPECT_EQ(R.stats.num_dropped, 0);
        EXPECT_EQ(R.tokens_per_expert, ref.tokens_per_expert);
        EXPECT_NEAR(R.stats.switch_loss, ref.stats.switch_loss, 1e-9 + 1e-6 * ref.stats.switch_loss);
        EXPECT_NEAR(R.stats.z_loss, ref.stats.z_loss, 1e-6 * ref.stats.z_loss + 1e-9);
        EXPECT_NEAR(R.stats.importance_loss, ref.stats.importance_loss,
                    1e-5 * ref.stats.importance_loss + 1e-9);
    }
    // the router gradient is replicated work: the ranks' parts add up to the single-rank one
    std::vector<float> sum(router_sum.begin(), router_sum.end());
    EXPECT_LE(ep::rel_err(sum.data(), ref.grad[MOE_PARAM_ROUTER_WEIGHT].data(),
                          (int64_t)sum.size()),
              kTol);
}

TEST_P(EpLocal, CapacityDropsPerSourceRank) {
    Case c = GetParam();
    moe_layer_config_t cfg = ep::small_config(c.E, c.K);
    cfg.capacity_factor = 1.0;
    cfg.priority = MOE_PRIORITY_SCORE;
    const int64_t D = cfg.d_model, T = c.T;
    auto x = tokens(T, D, 21), dy = ep::make_tokens(T, D, 22);
    auto begin = ep::split(T, c.P, c.zero_rank);
    auto ranks = run_local(c, cfg, x, dy, begin);
    int64_t dropped = 0;
    std::vector<int64_t> tpe((size_t)c.E, 0);
    for (int r = 0; r < c.P; ++r) {
        int64_t b = begin[(size_t)r], Tr = begin[(size_t)r + 1] - b;
        // the single-rank layer on this rank's tokens alone decides the same drops
        Result one = ep::run_rank(nullptr, cfg, x.data() + b * D, dy.data() + b * D, Tr,
                                  [&](moe_layer_t *l) { shape_router(l, cfg, c.route); });
        ASSERT_EQ(one.status, MOE_STATUS_SUCCESS) << one.error;
        const Result &R = ranks[(size_t)r];
        ASSERT_EQ(R.status, MOE_STATUS_SUCCESS) << "rank " << r << ": " << R.error;
        EXPECT_EQ(R.kept, one.kept) << "rank " << r;
        if (Tr > 0) {
            EXPECT_LE(ep::rel_err(R.y.data(), one.y.data(), Tr * D), kTol);
        }
        dropped += one.stats.num_dropped;
        for (int64_t e = 0; e < c.E; ++e) tpe[(size_t)e] += one.tokens_per_expert[(size_t)e];
    }
    for (int r = 0; r < c.P; ++r) {
        EXPECT_EQ(ranks[(size_t)r].stats.num_dropped, dropped) << "global total on rank " << r;
        EXPECT_EQ(ranks[(size_t)r].tokens_per_expert, tpe);
    }
}

INSTANTIATE_TEST_SUITE_P(
    Grid, EpLocal,
    ::testing::Values(Case{1, 4, 2, 40, -1, 0, 0}, Case{2, 4, 2, 57, -1, 0, 0},
                      Case{3, 6, 2, 61, -1, 0, 0}, Case{4, 8, 1, 73, -1, 0, 0},
                      Case{4, 8, 4, 50, 2, 0, 0},   // a rank with no tokens
                      Case{2, 4, 2, 45, -1, 1, 0},  // an expert nobody routes to
                      Case{4, 4, 1, 64, -1, 2, 0},  // every token to expert 0
                      Case{8, 16, 2, 99, 0, 0, 0}, Case{8, 8, 2, 33, 7, 0, 0}));

// Each expert's rows are complete within one chunk, so the chunk count changes only how the
// exchanges and the experts' GEMMs are interleaved, never a number: results are bitwise identical.
TEST(EpLocalChunks, ChunkCountsGiveIdenticalResults) {
    const Case c{2, 8, 2, 71, -1, 0, 0};
    const int64_t D = 12;
    auto x = tokens(c.T, D, 31), dy = ep::make_tokens(c.T, D, 32);
    auto begin = ep::split(c.T, c.P);
    std::vector<Result> first;
    for (int64_t chunks = 1; chunks <= 4; ++chunks) {
        moe_layer_config_t cfg = ep::small_config(c.E, c.K);
        cfg.num_chunks = chunks;
        cfg.switch_loss_coef = 0.1;
        auto ranks = run_local(c, cfg, x, dy, begin);
        for (int r = 0; r < c.P; ++r) ASSERT_EQ(ranks[(size_t)r].status, 0) << ranks[(size_t)r].error;
        if (chunks == 1) {
            first = ranks;
            continue;
        }
        for (int r = 0; r < c.P; ++r) {
            const Result &a = first[(size_t)r], &b = ranks[(size_t)r];
            EXPECT_EQ(a.y, b.y) << chunks << " chunks, rank " << r;
            EXPECT_EQ(a.dx, b.dx) << chunks << " chunks, rank " << r;
            for (int p = 0; p < MOE_PARAM_COUNT; ++p)
                EXPECT_EQ(a.grad[p], b.grad[p]) << "param " << p << ", " << chunks << " chunks";
        }
    }
}

// Loss-free balancing with experts spread over ranks: every rank updates its (replicated)
// selection bias from the global counts, so the ranks agree with each other and with the
// single-rank layer on the concatenated tokens, step after step.
TEST(EpLocalBalancing, SelectionBiasStaysReplicated) {
    const int P = 2;
    const int64_t T = 90, E = 8, D = 12;
    moe_layer_config_t cfg = ep::small_config(E, 2);
    cfg.bias_update_rate = 0.05;
    auto begin = ep::split(T, P);
    std::vector<std::vector<float>> xs;
    for (int step = 0; step < 4; ++step) xs.push_back(tokens(T, D, 50u + (uint32_t)step));
    // the single-rank layer
    std::vector<std::vector<float>> ref_bias;
    {
        moe_context_t *ctx = nullptr;
        moe_layer_t *layer = nullptr;
        ASSERT_EQ(moe_context_create(&ctx, MOE_BACKEND_CPU, 0, nullptr), 0);
        ASSERT_EQ(moe_layer_create(&layer, ctx, &cfg), 0);
        for (auto &x : xs) {
            std::vector<float> y(x.size()), b((size_t)E);
            ASSERT_EQ(moe_layer_forward(layer, x.data(), y.data(), T, 1, nullptr), 0);
            moe_layer_score_bias(layer, b.data());
            ref_bias.push_back(b);
        }
        moe_layer_destroy(layer);
        moe_context_destroy(ctx);
    }
    EXPECT_NE(ref_bias.back(), std::vector<float>((size_t)E, 0.0f)) << "the bias must move";
    std::vector<moe_comm_t *> comms((size_t)P);
    ASSERT_EQ(moe_comm_create_local(comms.data(), P), 0);
    std::vector<std::vector<std::vector<float>>> got((size_t)P);
    std::vector<std::string> err((size_t)P);
    std::vector<std::thread> th;
    for (int r = 0; r < P; ++r)
        th.emplace_back([&, r] {
            moe_context_t *ctx = nullptr;
            moe_layer_t *layer = nullptr;
            if (moe_context_create(&ctx, MOE_BACKEND_CPU, 0, comms[(size_t)r]) ||
                moe_layer_create(&layer, ctx, &cfg)) {
                err[(size_t)r] = moe_last_error();
            } else {
                int64_t b = begin[(size_t)r], n = begin[(size_t)r + 1] - b;
                for (auto &x : xs) {
                    std::vector<float> y((size_t)(n * D)), bias((size_t)E);
                    if (moe_layer_forward(layer, x.data() + b * D, y.data(), n, 1, nullptr)) {
                        err[(size_t)r] = moe_last_error();
                        break;
                    }
                    moe_layer_score_bias(layer, bias.data());
                    got[(size_t)r].push_back(bias);
                }
            }
            moe_layer_destroy(layer);
            moe_context_destroy(ctx);
        });
    for (auto &t : th) t.join();
    for (int r = 0; r < P; ++r) {
        ASSERT_TRUE(err[(size_t)r].empty()) << "rank " << r << ": " << err[(size_t)r];
        EXPECT_EQ(got[(size_t)r], ref_bias) << "rank " << r;
    }
    for (auto *c : comms) EXPECT_EQ(moe_comm_destroy(c), 0);
}

TEST(EpLocalErrors, ConfigMismatchNamesTheRank) {
    moe_comm_t *comms[2];
    ASSERT_EQ(moe_comm_create_local(comms, 2), MOE_STATUS_SUCCESS);
    moe_status_t st[2];
    std::string msg[2];
    std::vector<std::thread> th;
    for (int r = 0; r < 2; ++r)
        th.emplace_back([&, r] {
            moe_layer_config_t cfg = ep::small_config(4, r == 0 ? 1 : 2);
            moe_context_t *ctx = nullptr;
            moe_layer_t *layer = nullptr;
            moe_context_create(&ctx, MOE_BACKEND_CPU, 0, comms[r]);
            st[r] = moe_layer_create(&layer, ctx, &cfg);
            msg[r] = moe_last_error();
            moe_layer_destroy(layer);
            moe_context_destroy(ctx);
        });
    for (auto &t : th) t.join();
    EXPECT_EQ(st[0], MOE_STATUS_INVALID_ARGUMENT);
    EXPECT_EQ(st[1], MOE_STATUS_INVALID_ARGUMENT);
    EXPECT_NE(msg[0].find("rank 1"), std::string::npos) << msg[0];
    EXPECT_NE(msg[1].find("rank 0"), std::string::npos) << msg[1];
    for (auto *c : comms) EXPECT_EQ(moe_comm_destroy(c), MOE_STATUS_SUCCESS);
}

TEST(EpLocalErrors, MissingPeerTimesOutNamingTheRank) {
    moe_comm_t *comms[2];
    ASSERT_EQ(moe_comm_create_local(comms, 2), MOE_STATUS_SUCCESS);
    moe_layer_config_t cfg = ep::small_config(4, 2);
    moe_context_t *ctx[2] = {nullptr, nullptr};
    moe_layer_t *layer[2] = {nullptr, nullptr};
    std::vector<std::thread> th;
    for (int r = 0; r < 2; ++r)
        th.emplace_back([&, r] {
            ASSERT_EQ(moe_context_create(&ctx[r], MOE_BACKEND_CPU, 0, comms[r]), 0);
            ASSERT_EQ(moe_layer_create(&layer[r], ctx[r], &cfg), 0) << moe_last_error();
        });
    for (auto &t : th) t.join();
    ASSERT_EQ(moe_comm_set_timeout(comms[0], 0.3), MOE_STATUS_SUCCESS);
    auto x = ep::make_tokens(10, cfg.d_model, 3);
    std::vector<float> y(x.size());
    // rank 1 never calls forward: rank 0 must come back with a COMM_ERROR naming rank 1
    moe_status_t st = moe_layer_forward(layer[0], x.data(), y.data(), 10, 1, nullptr);
    EXPECT_EQ(st, MOE_STATUS_COMM_ERROR);
    EXPECT_NE(std::string(moe_last_error()).find("never arrived: 1"), std::string::npos)
        << moe_last_error();
    // and the communicator stays refused afterwards, with a clear message
    EXPECT_EQ(moe_comm_barrier(comms[0]), MOE_STATUS_COMM_ERROR);
    for (int r = 0; r < 2; ++r) {
        EXPECT_EQ(moe_layer_destroy(layer[r]), MOE_STATUS_SUCCESS);
        EXPECT_EQ(moe_context_destroy(ctx[r]), MOE_STATUS_SUCCESS);
        EXPECT_EQ(moe_comm_destroy(comms[r]), MOE_STATUS_SUCCESS);
    }
}

TEST(EpLocalErrors, BadArguments) {
    EXPECT_EQ(moe_comm_create_local(nullptr, 2), MOE_STATUS_INVALID_ARGUMENT);
    moe_comm_t *c[1];
    EXPECT_EQ(moe_comm_create_local(c, 0), MOE_STATUS_INVALID_ARGUMENT);
    EXPECT_EQ(moe_comm_rank(nullptr), -1);
    EXPECT_EQ(moe_comm_size(nullptr), -1);
    EXPECT_EQ(moe_comm_barrier(nullptr), MOE_STATUS_INVALID_ARGUMENT);
    EXPECT_EQ(moe_comm_destroy(nullptr), MOE_STATUS_SUCCESS);
    // (experts need not divide over the ranks: test_ep_placement.cc)
    moe_comm_t *two[2];
    ASSERT_EQ(moe_comm_create_local(two, 2), MOE_STATUS_SUCCESS);
    moe_context_t *ctx = nullptr;
    ASSERT_EQ(moe_context_create(&ctx, MOE_BACKEND_CPU, 0, two[0]), MOE_STATUS_SUCCESS);
    // a communicator in use cannot be destroyed
    EXPECT_EQ(moe_comm_destroy(two[0]), MOE_STATUS_INVALID_ARGUMENT);
    EXPECT_EQ(moe_context_destroy(ctx), MOE_STATUS_SUCCESS);
    for (auto *cm : two) EXPECT_EQ(moe_comm_destroy(cm), MOE_STATUS_SUCCESS);
#ifndef MOE_TEST_HAVE_MPI
    moe_comm_t *m = nullptr;
    EXPECT_EQ(moe_comm_create_mpi(&m, nullptr), MOE_STATUS_NOT_SUPPORTED);
#endif
}

}  // namespace
