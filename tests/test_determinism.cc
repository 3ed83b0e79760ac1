// test_determinism.cc - reproducibility: bitwise run to run (docs/semantics.md promises it); across
// OpenMP thread counts the same routing, drops and counts, and numbers equal to f32 rounding (the
// BLAS GEMMs block by thread count); two layers on two threads as each alone.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>

#include <omp.h>

#include <cstring>
#include <thread>

#include "test_util.h"

using namespace moetest;

namespace {

// Everything one forward + backward produces, as bytes.
struct Outcome {
    std::vector<float> y, dx, gate;
    std::vector<int32_t> idx, kept;
    std::vector<int64_t> counts, dropped;
    std::vector<float> grad[MOE_PARAM_COUNT];
    moe_routing_stats_t st{};
    bool operator==(const Outcome &o) const {
        for (int p = 0; p < MOE_PARAM_COUNT; ++p)
            if (grad[p].size() != o.grad[p].size() ||
                (!grad[p].empty() &&
                 std::memcmp(grad[p].data(), o.grad[p].data(), grad[p].size() * 4) != 0))
                return false;
        return same_bytes(y, o.y) && same_bytes(dx, o.dx) && same_bytes(gate, o.gate) &&
               idx == o.idx && kept == o.kept && counts == o.counts && dropped == o.dropped &&
               std::memcmp(&st, &o.st, sizeof st) == 0;
    }
    static bool same_bytes(const std::vector<float> &a, const std::vector<float> &b) {
        return a.size() == b.size() && std::memcmp(a.data(), b.data(), a.size() * 4) == 0;
    }
};

moe_layer_config_t det_config() {
    moe_layer_config_t c = small_config(24, 48, 16, 4);
    c.activation = MOE_ACTIVATION_SWIGLU;
    c.gate = MOE_GATE_TOPK_OF_SOFTMAX;
    c.renormalize = 0;
    c.noisy_gating = 1;
    c.capacity_factor = 1.0;
    c.priority = MOE_PRIORITY_SCORE;
    c.switch_loss_coef = c.importance_loss_coef = c.load_loss_coef = c.z_loss_coef = 0.05;
    c.seed = 777;
    return c;
}

// T = 520 spans three 256-token reduction blocks, so the block sums and the OpenMP split matter.
Outcome run_once(int64_t T = 520) {
    moe_layer_config_t c = det_config();
    Layer L(c);
    Outcome o;
    EXPECT_EQ(L.status, MOE_STATUS_SUCCESS);
    if (L.status != MOE_STATUS_SUCCESS) return o;
    const int64_t D = c.d_model, E = c.num_experts, K = c.top_k;
    set_param(L, MOE_PARAM_NOISE_WEIGHT, uniform(D * E, 5, -0.3f, 0.3f));
    std::vector<float> x = uniform(T * D, 1), dy = uniform(T * D, 2);
    o.y.assign(T * D, 0);
    o.dx.assign(T * D, 0);
    EXPECT_EQ(moe_layer_forward(L, x.data(), o.y.data(), T, 1, nullptr), MOE_STATUS_SUCCESS);
    EXPECT_EQ(moe_layer_backward(L, dy.data(), o.dx.data(), nullptr), MOE_STATUS_SUCCESS);
    o.idx.assign(T * K, 0);
    o.kept.assign(T * K, 0);
    o.gate.assign(T * K, 0);
    o.counts.assign(E, 0);
    o.dropped.assign(E, 0);
    EXPECT_EQ(moe_layer_routing(L, o.idx.data(), o.gate.data(), o.kept.data()), MOE_STATUS_SUCCESS);
    EXPECT_EQ(moe_layer_stats(L, &o.st, o.counts.data(), o.dropped.data()), MOE_STATUS_SUCCESS);
    for (int p = 0; p < MOE_PARAM_COUNT; ++p) o.grad[p] = param_grad(L, (moe_param_t)p);
    return o;
}

TEST(Determinism, RepeatRunsAreBitwiseEqual) {
    Outcome a = run_once(), b = run_once();
    EXPECT_TRUE(a == b);
    EXPECT_GT(a.st.num_dropped, 0);  // capacity and SCORE order are exercised
}

// The thread count changes no decision: per-token loops write disjoint rows and the per-expert
// sums go through fixed 256-token blocks, so routing, drops and counts are identical. The GEMMs
// are another matter: libmoe links OpenBLAS's OpenMP build, whose thread count is the OpenMP one,
// and its blocking (hence the last bits of every GEMM) depends on it. Numbers therefore agree to
// f32 rounding (max-norm relative 1e-5), and bitwise for a fixed thread count (test above).
TEST(Determinism, OneAndTwoThreadsAgree) {
    const int before = omp_get_max_threads();
    omp_set_num_threads(1);
    Outcome one = run_once();
    omp_set_num_threads(2);
    Outcome two = run_once();
    omp_set_num_threads(before);
    EXPECT_EQ(one.idx, two.idx);
    EXPECT_EQ(one.kept, two.kept);
    EXPECT_EQ(one.counts, two.counts);
    EXPECT_EQ(one.dropped, two.dropped);
    auto rel = [](const std::vector<float> &a, const std::vector<float> &b) {
        double num = 0.0, den = 1e-30;
        for (size_t i = 0; i < a.size(); ++i) {
            num = std::max(num, std::fabs((double)a[i] - (double)b[i]));
            den = std::max(den, std::fabs((double)b[i]));
        }
        return num / den;
    };
    EXPECT_LE(rel(one.y, two.y), 1e-5) << "y";
    EXPECT_LE(rel(one.gate, two.gate), 1e-5) << "gate";
    EXPECT_LE(rel(one.dx, two.dx), 1e-5) << "dx";
    for (int p = 0; p < MOE_PARAM_COUNT; ++p)
        EXPECT_LE(rel(one.grad[p], two.grad[p]), 1e-5) << param_name(p);
}

// Distinct handles may be used from distinct threads at once (moe.h): two layers driven from two
// threads give what each gives alone.
TEST(Determinism, TwoLayersOnTwoThreads) {
    Outcome serial = run_once(300);
    Outcome a, b;
    std::thread ta([&] { a = run_once(300); }), tb([&] { b = run_once(300); });
    ta.join();
    tb.join();
    EXPECT_TRUE(a == b);
    EXPECT_TRUE(a == serial);
}

}  // namespace
