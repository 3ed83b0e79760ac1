// test_ep_faults.cc - expert parallelism out of step (moe.h, "Agreement"), on the local
// communicator: an argument error on one rank ends the call on every rank at once, ranks in
// different calls get COMM_ERROR before any data moves, and a communicator that fails its n-th
// call (the test hook moe__comm_fail_call) gives every rank an error within seconds, for every
// n. Each bound is far below the communicator timeout the tests set (60 s), which is what the
// peers waited for before the agreement step.
#include <gtest/gtest.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cmath>
#include <functional>
#include <string>
#include <thread>
#include <vector>

#include "comm/comm.h"
#include "ep_common.h"
#include "ep_faults.h"
#include "moe/moe.h"

namespace {

using ep::config;
using ep::now_s;
using ep::sequence;

constexpr double kTimeout = 60.0; // the communicator's: a peer that waits for it fails the bound
constexpr double kBound = 10.0;   // what every rank's error must come within (seconds)

// runs fn(r) on one thread per rank; returns the wall time until every thread returned
double on_ranks(int P, const std::function<void(int)> &fn) {
    double t0 = now_s();
    std::vector<std::thread> th;
    for (int r = 0; r < P; ++r) th.emplace_back(fn, r);
    for (auto &t : th) t.join();
    return now_s() - t0;
}

// P ranks as threads, each with its context and layer
struct Group {
    int P;
    std::vector<moe_comm_t *> comm;
    std::vector<moe_context_t *> ctx;
    std::vector<moe_layer_t *> layer;
    moe_layer_config_t cfg = config();
    int64_t T = 7;  // tokens per rank
    std::vector<float> x, y, dy, dx;

    explicit Group(int P_) : P(P_), comm(P_), ctx(P_), layer(P_) {
        EXPECT_EQ(moe_comm_create_local(comm.data(), P), MOE_STATUS_SUCCESS);
        for (auto *c : comm) moe_comm_set_timeout(c, kTimeout);
        x = ep::make_tokens(T * P, cfg.d_model, 5);
        dy = ep::make_tokens(T * P, cfg.d_model, 6);
        y.assign(x.size(), 0.0f);
        dx.assign(x.size(), 0.0f);
        on_ranks(P, [&](int r) {
            EXPECT_EQ(moe_context_create(&ctx[r], MOE_BACKEND_CPU, 0, comm[r]), 0);
            EXPECT_EQ(moe_layer_create(&layer[r], ctx[r], &cfg), 0) << moe_last_error();
        });
    }
    ~Group() {
        for (int r = 0; r < P; ++r) {
            EXPECT_EQ(moe_layer_destroy(layer[r]), MOE_STATUS_SUCCESS) << moe_last_error();
            EXPECT_EQ(moe_context_destroy(ctx[r]), MOE_STATUS_SUCCESS);
            EXPECT_EQ(moe_comm_destroy(comm[r]), MOE_STATUS_SUCCESS);
        }
    }
    float *xr(int r) { return x.data() + r * T * cfg.d_model; }
    float *yr(int r) { return y.data() + r * T * cfg.d_model; }
    float *dyr(int r) { return dy.data() + r * T * cfg.d_model; }
    float *dxr(int r) { return dx.data() + r * T * cfg.d_model; }
    moe_status_t forward(int r) { return moe_layer_forward(layer[r], xr(r), yr(r), T, 1, nullptr); }
    moe_status_t backward(int r) { return moe_layer_backward(layer[r], dyr(r), dxr(r), nullptr); }
    // a good step on every rank: the layers and the communicator are still usable
    void expect_usable(const char *after) {
        std::vector<moe_status_t> st(P);
        double t = on_ranks(P, [&](int r) {
            st[r] = forward(r);
            if (st[r] == MOE_STATUS_SUCCESS) st[r] = backward(r);
            if (st[r] == MOE_STATUS_SUCCESS)
                st[r] = moe_layer_allreduce_router_grads(layer[r], nullptr);
        });
        for (int r = 0; r < P; ++r) EXPECT_EQ(st[r], MOE_STATUS_SUCCESS) << after << ", rank " << r;
        EXPECT_LT(t, kBound) << after;
    }
};

struct Outcome {
    moe_status_t st = MOE_STATUS_SUCCESS;
    std::string msg;
};

// one call per rank, `bad` the rank whose call is wrong; every rank must fail with `want`
// within the bound, the bad rank with its own message, the others naming it
void expect_all_fail(Group &g, int bad, moe_status_t want, const char *what,
                     const std::function<moe_status_t(int)> &call) {
    std::vector<Outcome> out(g.P);
    double t = on_ranks(g.P, [&](int r) {
        out[r].st = call(r);
        out[r].msg = moe_last_error();
    });
    EXPECT_LT(t, kBound) << what << ": the peers waited (for the communicator timeout?)";
    for (int r = 0; r < g.P; ++r) {
        EXPECT_EQ(out[r].st, want) << what << ", rank " << r << ": " << out[r].msg;
        if (r != bad) {
            EXPECT_NE(out[r].msg.find("rank " + std::to_string(bad) + " failed its own checks"),
                      std::string::npos)
                << what << ", rank " << r << ": " << out[r].msg;
        }
    }
}

TEST(EpFaults, ArgumentErrorOnOneRankEndsTheCallEverywhere) {
    Group g(3);
    g.expect_usable("the start");
    expect_all_fail(g, 1, MOE_STATUS_INVALID_ARGUMENT, "NULL x on rank 1", [&](int r) {
        return moe_layer_forward(g.layer[r], r == 1 ? nullptr : g.xr(r), g.yr(r), g.T, 1,
                                 nullptr);
    });
    g.expect_usable("NULL x");
    expect_all_fail(g, 2, MOE_STATUS_INVALID_ARGUMENT, "forced routing for T + 1 on rank 2",
                    [&](int r) {
                        if (r == 2) {
                            std::vector<int32_t> idx((size_t)(g.T + 1) * 2);
                            for (size_t i = 0; i < idx.size(); ++i) idx[i] = (int32_t)(i % 6);
                            std::vector<float> gate(idx.size(), 0.5f);
                            EXPECT_EQ(moe_layer_force_routing(g.layer[r], idx.data(),
                                                              gate.data(), g.T + 1),
                                      MOE_STATUS_SUCCESS);
                        }
                        return g.forward(r);
                    });
    // the failed forward dropped rank 2's forced routing: the next forward routes normally
    g.expect_usable("forced routing for the wrong T");
    expect_all_fail(g, 0, MOE_STATUS_NUMERIC_ERROR, "NaN in x on rank 0", [&](int r) {
        std::vector<float> xx(g.xr(r), g.xr(r) + g.T * g.cfg.d_model);
        if (r == 0) xx[3] = NAN;
        return moe_layer_forward(g.layer[r], xx.data(), g.yr(r), g.T, 1, nullptr);
    });
    g.expect_usable("NaN in x");
    for (int r = 0; r < g.P; ++r) ASSERT_EQ(moe_layer_zero_grad(g.layer[r], nullptr), 0);
    std::vector<moe_status_t> fst(g.P);
    on_ranks(g.P, [&](int r) { fst[r] = g.forward(r); });
    for (auto s : fst) ASSERT_EQ(s, MOE_STATUS_SUCCESS);
    expect_all_fail(g, 1, MOE_STATUS_INVALID_ARGUMENT, "NULL dy on rank 1", [&](int r) {
        return moe_layer_backward(g.layer[r], r == 1 ? nullptr : g.dyr(r), g.dxr(r), nullptr);
    });
    expect_all_fail(g, 2, MOE_STATUS_NUMERIC_ERROR, "Inf in dy on rank 2", [&](int r) {
        std::vector<float> d(g.dyr(r), g.dyr(r) + g.T * g.cfg.d_model);
        if (r == 2) d[0] = INFINITY;
        return moe_layer_backward(g.layer[r], d.data(), g.dxr(r), nullptr);
    });
    g.expect_usable("bad dy");
    expect_all_fail(g, 1, MOE_STATUS_INVALID_ARGUMENT, "a mask leaving one expert on rank 1",
                    [&](int r) {
                        std::vector<uint8_t> m(6, 1);
                        if (r == 1) std::fill(m.begin() + 1, m.end(), 0);
                        return moe_layer_set_expert_mask(g.layer[r], m.data());
                    });
    expect_all_fail(g, 0, MOE_STATUS_INVALID_ARGUMENT, "an invalid placement on rank 0",
                    [&](int r) {
                        int64_t num[3] = {2, 2, 2};
                        int32_t ex[6] = {0, 1, 2, 3, 4, 5};
                        if (r == 0) ex[5] = 4;  // expert 5 placed nowhere, 4 twice on one rank
                        return moe_layer_set_placement(g.layer[r], num, ex, nullptr);
                    });
    expect_all_fail(g, 2, MOE_STATUS_INVALID_ARGUMENT, "a negative redundancy on rank 2",
                    [&](int r) {
                        return moe_layer_rebalance(g.layer[r], r == 2 ? -1 : 1, nullptr,
                                                   nullptr, nullptr);
                    });
    g.expect_usable("bad mask, placement and rebalance");
}

TEST(EpFaults, InvalidConfigOnOneRankFailsEveryCreate) {
    for (int variant = 0; variant < 2; ++variant) {
        const int P = 3, bad = variant == 0 ? 1 : 0;
        std::vector<moe_comm_t *> comm(P);
        ASSERT_EQ(moe_comm_create_local(comm.data(), P), MOE_STATUS_SUCCESS);
        for (auto *c : comm) moe_comm_set_timeout(c, kTimeout);
        std::vector<moe_context_t *> ctx(P);
        std::vector<moe_layer_t *> layer(P);
        std::vector<Outcome> out(P);
        const moe_status_t want =
            variant == 0 ? MOE_STATUS_INVALID_ARGUMENT : MOE_STATUS_NOT_SUPPORTED;
        double t = on_ranks(P, [&](int r) {
            ASSERT_EQ(moe_context_create(&ctx[r], MOE_BACKEND_CPU, 0, comm[r]), 0);
            moe_layer_config_t cfg = config();
            if (r == bad && variant == 0) cfg.d_model = 0;
            if (r == bad && variant == 1) cfg.dtype = MOE_DTYPE_BF16;  // the CPU backend: f32
            out[r].st = moe_layer_create(&layer[r], ctx[r], &cfg);
            out[r].msg = moe_last_error();
        });
        EXPECT_LT(t, kBound);
        for (int r = 0; r < P; ++r) {
            EXPECT_EQ(out[r].st, want) << "rank " << r << ": " << out[r].msg;
            EXPECT_EQ(layer[r], nullptr);
            if (r != bad) {
                EXPECT_NE(out[r].msg.find("rank " + std::to_string(bad)), std::string::npos)
                    << out[r].msg;
            }
        }
        // the communicator is still in step: a good create works on every rank
        t = on_ranks(P, [&](int r) {
            moe_layer_config_t cfg = config();
            EXPECT_EQ(moe_layer_create(&layer[r], ctx[r], &cfg), 0) << moe_last_error();
        });
        EXPECT_LT(t, kBound);
        for (int r = 0; r < P; ++r) {
            EXPECT_EQ(moe_layer_destroy(layer[r]), 0);
            EXPECT_EQ(moe_context_destroy(ctx[r]), 0);
            EXPECT_EQ(moe_comm_destroy(comm[r]), 0);
        }
    }
}

// ranks whose call sequences differ: COMM_ERROR on every rank, no exchange of mismatched
// buffers (the sanitizer build checks that nothing reads freed memory)
TEST(EpFaults, DifferentCallSequencesAreCommErrors) {
    Group g(2);
    g.expect_usable("the start");
    auto both = [&](const char *what, const std::function<moe_status_t(int)> &call) {
        std::vector<Outcome> out(2);
        double t = on_ranks(2, [&](int r) {
            out[r].st = call(r);
            out[r].msg = moe_last_error();
        });
        EXPECT_LT(t, kBound) << what;
        for (int r = 0; r < 2; ++r)
            EXPECT_EQ(out[r].st, MOE_STATUS_COMM_ERROR) << what << ", rank " << r << ": "
                                                        << out[r].msg;
        EXPECT_NE(out[0].msg.find("rank 1"), std::string::npos) << out[0].msg;
    };
    // rank 0 skips the forward and calls backward
    both("backward against forward",
         [&](int r) { return r == 0 ? g.backward(r) : g.forward(r); });
    g.expect_usable("backward against forward");
    // rank 1 calls backward twice: the second meets rank 0's next forward
    std::vector<moe_status_t> st(2);
    on_ranks(2, [&](int r) { st[r] = g.backward(r); });
    EXPECT_EQ(st[0], MOE_STATUS_SUCCESS);
    EXPECT_EQ(st[1], MOE_STATUS_SUCCESS);
    both("a second backward against a forward",
         [&](int r) { return r == 1 ? g.backward(r) : g.forward(r); });
    g.expect_usable("a second backward");
    // two layers on one communicator: rank 0 runs the first, rank 1 the second
    std::vector<moe_layer_t *> second(2);
    on_ranks(2, [&](int r) {
        moe_layer_config_t cfg = config();
        EXPECT_EQ(moe_layer_create(&second[r], g.ctx[r], &cfg), 0) << moe_last_error();
    });
    both("forwards of different layers", [&](int r) {
        return moe_layer_forward(r == 0 ? g.layer[r] : second[r], g.xr(r), g.yr(r), g.T, 1,
                                 nullptr);
    });
    // training on one rank, inference on the other: the bias updates would diverge
    both("training flags that differ", [&](int r) {
        return moe_layer_forward(g.layer[r], g.xr(r), g.yr(r), g.T, r == 0, nullptr);
    });
    for (auto *l : second) EXPECT_EQ(moe_layer_destroy(l), 0);
    g.expect_usable("different layers and flags");
    // a barrier against a forward: the local communicator refuses the mismatched collectives,
    // and a failed collective breaks the communicator for every rank
    both("a barrier against a forward",
         [&](int r) { return r == 0 ? moe_comm_barrier(g.comm[r]) : g.forward(r); });
    for (int r = 0; r < 2; ++r) EXPECT_EQ(moe_comm_barrier(g.comm[r]), MOE_STATUS_COMM_ERROR);
}

// every comm call of a training sequence fails in turn, on the first or the last rank
struct Sweep {
    int64_t failed = 0;   // runs in which the fault fired
    double slowest = 0.0; // the longest run with a fault (seconds)
};

Sweep sweep(int P, int faulty) {
    Sweep s;
    // the undisturbed run: its outputs, and the number of comm calls it makes
    std::vector<std::vector<float>> ref(P);
    {
        std::vector<moe_comm_t *> comm(P);
        EXPECT_EQ(moe_comm_create_local(comm.data(), P), MOE_STATUS_SUCCESS);
        std::vector<moe_status_t> st(P);
        on_ranks(P, [&](int r) { st[r] = sequence(r, P, comm[r], ref[r]); });
        for (int r = 0; r < P; ++r) EXPECT_EQ(st[r], MOE_STATUS_SUCCESS) << "rank " << r;
        for (auto *c : comm) moe_comm_destroy(c);
    }
    for (int64_t n = 1;; ++n) {
        std::vector<moe_comm_t *> comm(P);
        EXPECT_EQ(moe_comm_create_local(comm.data(), P), MOE_STATUS_SUCCESS);
        for (auto *c : comm) moe_comm_set_timeout(c, kTimeout);
        moe__comm_fail_call(comm[faulty], n);
        std::vector<moe_status_t> st(P);
        std::vector<std::vector<float>> got(P);
        double t = on_ranks(P, [&](int r) { st[r] = sequence(r, P, comm[r], got[r]); });
        const bool fired = comm[faulty]->fail_at == 0;
        for (auto *c : comm) EXPECT_EQ(moe_comm_destroy(c), MOE_STATUS_SUCCESS);
        if (!fired) {
            // past the last call: the run is the undisturbed one, bitwise
            for (int r = 0; r < P; ++r) {
                EXPECT_EQ(st[r], MOE_STATUS_SUCCESS);
                EXPECT_EQ(got[r], ref[r]) << "rank " << r;
            }
            break;
        }
        s.failed++;
        s.slowest = std::max(s.slowest, t);
        EXPECT_LT(t, kBound) << "fault at comm call " << n << " of rank " << faulty;
        for (int r = 0; r < P; ++r)
            EXPECT_NE(st[r], MOE_STATUS_SUCCESS)
                << "fault at comm call " << n << " of rank " << faulty << ": rank " << r
                << " finished as if nothing happened";
        if (::testing::Test::HasFailure()) break;
    }
    return s;
}

TEST(EpFaults, CommFailingItsNthCallFailsEveryRankQuickly) {
    int64_t total = 0;
    for (int P : {2, 3})
        for (int faulty : {0, P - 1}) {
            Sweep s = sweep(P, faulty);
            EXPECT_GT(s.failed, 10) << "the sequence makes more comm calls than that";
            total += s.failed;
            std::printf("[ sweep    ] P %d, faulty rank %d: %lld comm calls failed in turn, "
                        "slowest run %.3f s\n",
                        P, faulty, (long long)s.failed, s.slowest);
        }
    std::printf("[ sweep    ] %lld comm calls failed in all\n", (long long)total);
}

}  // namespace
