// test_ep_mpi.cc - expert parallelism between MPI processes (launched by ctest through mpiexec
// with 1..4 ranks): each rank's outputs, dx and expert gradients equal the single-rank layer's
// on the same tokens, which every rank computes itself.
#include <gtest/gtest.h>
#include <mpi.h>

#include "ep_common.h"
#include "ep_mpi.h"

namespace {

using ep::Result;

constexpr double kTol = 1e-5;  // f32; sums of one expert's rows in a different order

using ep::world_rank;
using ep::world_size;

struct Comm {
    moe_comm_t *c = nullptr;
    Comm() { EXPECT_EQ(moe_comm_create_mpi(&c, nullptr), MOE_STATUS_SUCCESS) << moe_last_error(); }
    ~Comm() { EXPECT_EQ(moe_comm_destroy(c), MOE_STATUS_SUCCESS); }
};

void check_dropless(int zero_rank, int64_t E_per_rank, int64_t K, int64_t T) {
    const int P = world_size(), r = world_rank();
    moe_layer_config_t cfg = ep::small_config(E_per_rank * P, K);
    cfg.switch_loss_coef = 0.1;
    cfg.z_loss_coef = 0.01;
    cfg.activation = MOE_ACTIVATION_SWIGLU;
    const int64_t D = cfg.d_model;
    auto x = ep::make_tokens(T, D, 5), dy = ep::make_tokens(T, D, 6);
    auto begin = ep::split(T, P, zero_rank < P ? zero_rank : -1);
    Result ref = ep::run_rank(nullptr, cfg, x.data(), dy.data(), T, [](moe_layer_t *) {});
    ASSERT_EQ(ref.status, MOE_STATUS_SUCCESS) << ref.error;

    Comm comm;
    int64_t b = begin[(size_t)r], Tr = begin[(size_t)r + 1] - b;
    Result R = ep::run_rank(comm.c, cfg, x.data() + b * D, dy.data() + b * D, Tr,
                            [](moe_layer_t *) {});
    ASSERT_EQ(R.status, MOE_STATUS_SUCCESS) << "rank " << r << ": " << R.error;
    if (Tr > 0) {
        EXPECT_LE(ep::rel_err(R.y.data(), ref.y.data() + b * D, Tr * D), kTol);
        EXPECT_LE(ep::rel_err(R.dx.data(), ref.dx.data() + b * D, Tr * D), kTol);
    }
    const int64_t El = E_per_rank, F2 = 2 * cfg.d_ff;
    const int64_t per[MOE_PARAM_COUNT] = {0, 0, D * F2, F2, cfg.d_ff * D, D};
    for (int p = MOE_PARAM_W1; p < MOE_PARAM_COUNT; ++p)
        EXPECT_LE(ep::rel_err(R.grad[p].data(), ref.grad[p].data() + r * El * per[p],
                              El * per[p]),
                  kTol)
            << "param " << p << " rank " << r;
    EXPECT_EQ(R.stats.num_tokens, T);
    EXPECT_EQ(R.tokens_per_expert, ref.tokens_per_expert);
}

TEST(EpMpi, DroplessMatchesSingleRank) { check_dropless(-1, 2, 2, 53); }
TEST(EpMpi, RankWithNoTokens) { check_dropless(1, 1, 1, 31); }
TEST(EpMpi, TopKEqualsExperts) { check_dropless(-1, 1, 1, 17); }

// Placements on any world size (np 3 runs 8 experts on 3 ranks): the default uneven split,
// rank 0 without experts and expert 0 replicated on every other rank, and every expert on
// every rank; each rank's y, dx and expert gradients (replicas summed) equal the single-rank
// layer's.
void check_placement(const ep::Placement &pl, int64_t E, int64_t T) {
    const int P = world_size(), r = world_rank();
    moe_layer_config_t cfg = ep::small_config(E, 2);
    cfg.switch_loss_coef = 0.1;
    const int64_t D = cfg.d_model;
    auto x = ep::make_tokens(T, D, 15), dy = ep::make_tokens(T, D, 16);
    auto begin = ep::split(T, P);
    Result ref = ep::run_rank(nullptr, cfg, x.data(), dy.data(), T, [](moe_layer_t *) {});
    ASSERT_EQ(ref.status, MOE_STATUS_SUCCESS) << ref.error;
    Comm comm;
    int64_t b = begin[(size_t)r], Tr = begin[(size_t)r + 1] - b;
    Result R = ep::run_rank_placed(comm.c, cfg, x.data() + b * D, dy.data() + b * D, Tr, pl);
    ASSERT_EQ(R.status, MOE_STATUS_SUCCESS) << "rank " << r << ": " << R.error;
    if (Tr > 0) {
        EXPECT_LE(ep::rel_err(R.y.data(), ref.y.data() + b * D, Tr * D), kTol);
        EXPECT_LE(ep::rel_err(R.dx.data(), ref.dx.data() + b * D, Tr * D), kTol);
    }
    const int64_t per[MOE_PARAM_COUNT] = {0, 0, D * cfg.d_ff, cfg.d_ff, cfg.d_ff * D, D};
    int64_t El = (r + 1) * E / P - r * E / P, k0 = r * E / P;
    std::vector<int32_t> mine;
    if (pl.num_local.empty()) {
        for (int64_t e = k0; e < k0 + El; ++e) mine.push_back((int32_t)e);
    } else {
        mine.assign(pl.experts.begin() + pl.begin(r),
                    pl.experts.begin() + pl.begin(r) + pl.num_local[(size_t)r]);
    }
    for (int p = MOE_PARAM_W1; p < MOE_PARAM_COUNT; ++p) {
        ASSERT_EQ(R.grad[p].size(), mine.size() * (size_t)per[p]);
        for (size_t le = 0; le < mine.size(); ++le)
            EXPECT_LE(ep::rel_err(R.grad[p].data() + le * per[p],
                                  ref.grad[p].data() + mine[le] * per[p], per[p]),
                      kTol)
                << "param " << p << " expert " << mine[le] << " rank " << r;
    }
}

TEST(EpMpi, DefaultPlacementAnyExpertCount) { check_placement({}, 8, 57); }

TEST(EpMpi, ReplicatedPlacementWithAnEmptyRank) {
    const int P = world_size();
    if (P < 2) GTEST_SKIP() << "needs 2 ranks";
    const int64_t E = 8;
    std::vector<std::vector<int32_t>> ranks((size_t)P);
    for (int q = 1; q < P; ++q) {
        for (int64_t e = (q - 1) * E / (P - 1); e < q * E / (P - 1); ++e)
            ranks[(size_t)q].push_back((int32_t)e);
        if (ranks[(size_t)q].empty() || ranks[(size_t)q][0] != 0)
            ranks[(size_t)q].insert(ranks[(size_t)q].begin(), 0);
    }
    check_placement(ep::placement(ranks), E, 61);
}

TEST(EpMpi, EveryExpertOnEveryRank) {
    const int P = world_size();
    std::vector<std::vector<int32_t>> ranks((size_t)P, {0, 1, 2, 3, 4});
    check_placement(ep::placement(ranks), 5, 44);
}

TEST(EpMpi, RouterGradientAllReduce) {
    const int P = world_size(), r = world_rank();
    moe_layer_config_t cfg = ep::small_config(2 * P, 2);
    const int64_t D = cfg.d_model, T = 40;
    auto x = ep::make_tokens(T, D, 8), dy = ep::make_tokens(T, D, 9);
    auto begin = ep::split(T, P);
    Result ref = ep::run_rank(nullptr, cfg, x.data(), dy.data(), T, [](moe_layer_t *) {});
    Comm comm;
    moe_context_t *ctx = nullptr;
    moe_layer_t *layer = nullptr;
    ASSERT_EQ(moe_context_create(&ctx, MOE_BACKEND_CPU, 0, comm.c), MOE_STATUS_SUCCESS);
    ASSERT_EQ(moe_layer_create(&layer, ctx, &cfg), MOE_STATUS_SUCCESS) << moe_last_error();
    int64_t b = begin[(size_t)r], Tr = begin[(size_t)r + 1] - b;
    std::vector<float> y((size_t)(Tr * D)), dx((size_t)(Tr * D));
    ASSERT_EQ(moe_layer_forward(layer, x.data() + b * D, y.data(), Tr, 1, nullptr), 0);
    ASSERT_EQ(moe_layer_backward(layer, dy.data() + b * D, dx.data(), nullptr), 0);
    ASSERT_EQ(moe_layer_allreduce_router_grads(layer, nullptr), MOE_STATUS_SUCCESS)
        << moe_last_error();
    float *g = nullptr;
    int64_t n = 0;
    moe_layer_param(layer, MOE_PARAM_ROUTER_WEIGHT, nullptr, (void **)&g, &n);
    EXPECT_LE(ep::rel_err(g, ref.grad[MOE_PARAM_ROUTER_WEIGHT].data(), n), kTol);
    EXPECT_EQ(moe_layer_destroy(layer), MOE_STATUS_SUCCESS);
    EXPECT_EQ(moe_context_destroy(ctx), MOE_STATUS_SUCCESS);
}

TEST(EpMpi, ConfigMismatchIsRefusedOnEveryRank) {
    if (world_size() < 2) GTEST_SKIP() << "needs 2 ranks";
    moe_layer_config_t cfg = ep::small_config(2 * world_size(), 1);
    if (world_rank() == world_size() - 1) cfg.seed = 999;  // the odd one out
    Comm comm;
    moe_context_t *ctx = nullptr;
    moe_layer_t *layer = nullptr;
    ASSERT_EQ(moe_context_create(&ctx, MOE_BACKEND_CPU, 0, comm.c), MOE_STATUS_SUCCESS);
    EXPECT_EQ(moe_layer_create(&layer, ctx, &cfg), MOE_STATUS_INVALID_ARGUMENT);
    EXPECT_NE(std::string(moe_last_error()).find("differs"), std::string::npos);
    EXPECT_EQ(layer, nullptr);
    EXPECT_EQ(moe_context_destroy(ctx), MOE_STATUS_SUCCESS);
}

TEST(EpMpi, WrongBackendIsRefused) {
    Comm comm;
    moe_context_t *ctx = nullptr;
    moe_status_t st = moe_context_create(&ctx, MOE_BACKEND_CUDA, 0, comm.c);
    EXPECT_EQ(st, MOE_STATUS_NOT_SUPPORTED);
    EXPECT_EQ(ctx, nullptr);
}

}  // namespace

int main(int argc, char **argv) { return ep::mpi_test_main(argc, argv); }
