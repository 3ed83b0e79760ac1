// test_ep_mpi_faults.cc - expert parallelism out of step between MPI processes (ctest runs it
// through mpiexec with 2 and 3 ranks): an argument error on one rank ends the call on every
// rank at once, ranks in different calls get COMM_ERROR instead of an MPI abort, and an MPI
// communicator that fails its n-th call (the test hook moe__comm_fail_call) gives every rank an
// error within seconds, for every n of a training sequence. The communicator timeout is 60 s
// (MOE_COMM_TIMEOUT_S): a rank that waited for it would fail the bound.
#include <gtest/gtest.h>
#include <mpi.h>

#include <algorithm>
#include <cstdio>
#include <string>
#include <vector>

#include "comm/comm.h"
#include "ep_common.h"
#include "ep_mpi.h"
#include "ep_faults.h"
#include "moe/moe.h"

namespace {

constexpr double kBound = 10.0;

using ep::world_rank;
using ep::world_size;

// the slowest rank's time
double max_over_ranks(double t) {
    double m = t;
    MPI_Allreduce(&t, &m, 1, MPI_DOUBLE, MPI_MAX, MPI_COMM_WORLD);
    return m;
}

TEST(EpMpiFaults, OneRanksErrorOrOtherCallEndsTheCallEverywhere) {
    const int P = world_size(), me = world_rank(), bad = P - 1;
    if (P < 2) GTEST_SKIP() << "needs 2 or more ranks";
    moe_comm_t *comm = nullptr;
    ASSERT_EQ(moe_comm_create_mpi(&comm, nullptr), MOE_STATUS_SUCCESS) << moe_last_error();
    ASSERT_EQ(moe_comm_set_timeout(comm, 60.0), MOE_STATUS_SUCCESS);
    moe_context_t *ctx = nullptr;
    moe_layer_t *layer = nullptr;
    ASSERT_EQ(moe_context_create(&ctx, MOE_BACKEND_CPU, 0, comm), MOE_STATUS_SUCCESS);
    moe_layer_config_t cfg = ep::config();
    ASSERT_EQ(moe_layer_create(&layer, ctx, &cfg), MOE_STATUS_SUCCESS) << moe_last_error();
    const int64_t T = 6;
    std::vector<float> x = ep::make_tokens(T, cfg.d_model, 3 + me), y(x.size()), dx(x.size());

    // NULL x on the last rank
    double t0 = ep::now_s();
    moe_status_t st = moe_layer_forward(layer, me == bad ? nullptr : x.data(), y.data(), T, 1,
                                        nullptr);
    std::string msg = moe_last_error();
    EXPECT_LT(max_over_ranks(ep::now_s() - t0), kBound);
    EXPECT_EQ(st, MOE_STATUS_INVALID_ARGUMENT) << msg;
    if (me != bad) {
        EXPECT_NE(msg.find("rank " + std::to_string(bad) + " failed its own checks"),
                  std::string::npos)
            << msg;
    }
    // still in step: a good forward and backward
    EXPECT_EQ(moe_layer_forward(layer, x.data(), y.data(), T, 1, nullptr), 0) << moe_last_error();
    EXPECT_EQ(moe_layer_backward(layer, y.data(), dx.data(), nullptr), 0) << moe_last_error();

    // rank 0 calls backward again while the others go on to the next forward
    t0 = ep::now_s();
    st = me == 0 ? moe_layer_backward(layer, y.data(), dx.data(), nullptr)
                 : moe_layer_forward(layer, x.data(), y.data(), T, 1, nullptr);
    msg = moe_last_error();
    EXPECT_LT(max_over_ranks(ep::now_s() - t0), kBound);
    EXPECT_EQ(st, MOE_STATUS_COMM_ERROR) << msg;
    EXPECT_NE(msg.find("every rank must make the same sequence"), std::string::npos) << msg;
    EXPECT_EQ(moe_layer_forward(layer, x.data(), y.data(), T, 1, nullptr), 0) << moe_last_error();

    EXPECT_EQ(moe_layer_destroy(layer), MOE_STATUS_SUCCESS);
    EXPECT_EQ(moe_context_destroy(ctx), MOE_STATUS_SUCCESS);
    EXPECT_EQ(moe_comm_destroy(comm), MOE_STATUS_SUCCESS);
}

TEST(EpMpiFaults, CommFailingItsNthCallFailsEveryRankQuickly) {
    const int P = world_size(), me = world_rank();
    if (P < 2) GTEST_SKIP() << "needs 2 or more ranks";
    std::vector<float> ref;
    {
        moe_comm_t *comm = nullptr;
        ASSERT_EQ(moe_comm_create_mpi(&comm, nullptr), MOE_STATUS_SUCCESS);
        ASSERT_EQ(ep::sequence(me, P, comm, ref), MOE_STATUS_SUCCESS) << moe_last_error();
        EXPECT_EQ(moe_comm_destroy(comm), MOE_STATUS_SUCCESS);
    }
    int64_t total = 0;
    for (int faulty : {0, P - 1}) {
        double slowest = 0.0;
        for (int64_t n = 1;; ++n) {
            moe_comm_t *comm = nullptr;
            ASSERT_EQ(moe_comm_create_mpi(&comm, nullptr), MOE_STATUS_SUCCESS);
            ASSERT_EQ(moe_comm_set_timeout(comm, 60.0), MOE_STATUS_SUCCESS);
            if (me == faulty) moe__comm_fail_call(comm, n);
            std::vector<float> got;
            double t0 = ep::now_s();
            moe_status_t st = ep::sequence(me, P, comm, got);
            double t = max_over_ranks(ep::now_s() - t0);
            int fired = me == faulty && comm->fail_at == 0, any = 0;
            MPI_Allreduce(&fired, &any, 1, MPI_INT, MPI_MAX, MPI_COMM_WORLD);
            EXPECT_EQ(moe_comm_destroy(comm), MOE_STATUS_SUCCESS);
            if (!any) {
                EXPECT_EQ(st, MOE_STATUS_SUCCESS) << moe_last_error();
                EXPECT_EQ(got, ref);
                break;
            }
            total++;
            slowest = std::max(slowest, t);
            EXPECT_LT(t, kBound) << "fault at comm call " << n << " of rank " << faulty;
            EXPECT_NE(st, MOE_STATUS_SUCCESS)
                << "fault at comm call " << n << " of rank " << faulty
                << ": this rank finished as if nothing happened";
            int failed = ::testing::Test::HasFailure(), worst = 0;
            MPI_Allreduce(&failed, &worst, 1, MPI_INT, MPI_MAX, MPI_COMM_WORLD);
            if (worst) break;
        }
        if (me == 0)
            std::printf("[ sweep    ] %d MPI ranks, faulty rank %d: slowest run %.3f s\n", P,
                        faulty, slowest);
    }
    if (me == 0)
        std::printf("[ sweep    ] %d MPI ranks: %lld comm calls failed in turn\n", P,
                    (long long)total);
    EXPECT_GT(total, 20);
}

}  // namespace

int main(int argc, char **argv) { return ep::mpi_test_main(argc, argv); }
