// test_util.h - small helpers shared by the test files: a layer that cleans up after itself,
// deterministic random inputs, parameter access and tolerance comparisons.
#ifndef MOE_TESTS_TEST_UTIL_H
#define MOE_TESTS_TEST_UTIL_H

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <random>
#include <string>
#include <vector>

#include "moe/moe.h"
#include "reference/reference.h"

namespace moetest {

// A CPU context and one layer on it, destroyed in the right order.
struct Layer {
    moe_context_t *ctx = nullptr;
    moe_layer_t *layer = nullptr;
    moe_status_t status = MOE_STATUS_SUCCESS;
    explicit Layer(const moe_layer_config_t &cfg) {
        status = moe_context_create(&ctx, MOE_BACKEND_CPU, 0, nullptr);
        if (status == MOE_STATUS_SUCCESS) status = moe_layer_create(&layer, ctx, &cfg);
    }
    ~Layer() {
        moe_layer_destroy(layer);
        moe_context_destroy(ctx);
    }
    Layer(const Layer &) = delete;
    Layer &operator=(const Layer &) = delete;
    operator moe_layer_t *() const { return layer; }
};

inline moe_layer_config_t small_config(int64_t D = 8, int64_t F = 16, int64_t E = 4,
                                       int64_t K = 2) {
    moe_layer_config_t c = moe_layer_config_default();
    c.d_model = D;
    c.d_ff = F;
    c.num_experts = E;
    c.top_k = K;
    return c;
}

inline std::vector<float> uniform(size_t n, uint64_t seed, float lo = -1.0f, float hi = 1.0f) {
    std::mt19937_64 rng(seed);
    std::uniform_real_distribution<float> u(lo, hi);
    std::vector<float> v(n);
    for (auto &a : v) a = u(rng);
    return v;
}

inline std::vector<double> to_double(const std::vector<float> &v) {
    return std::vector<double>(v.begin(), v.end());
}

inline std::vector<float> param_value(moe_layer_t *l, moe_param_t p) {
    void *v = nullptr;
    int64_t n = 0;
    moe_layer_param(l, p, &v, nullptr, &n);
    return std::vector<float>((const float *)v, (const float *)v + n);
}

inline std::vector<float> param_grad(moe_layer_t *l, moe_param_t p) {
    void *g = nullptr;
    int64_t n = 0;
    moe_layer_param(l, p, nullptr, &g, &n);
    return std::vector<float>((const float *)g, (const float *)g + n);
}

inline void set_param(moe_layer_t *l, moe_param_t p, const std::vector<float> &vals) {
    void *v = nullptr;
    int64_t n = 0;
    moe_layer_param(l, p, &v, nullptr, &n);
    ASSERT_EQ((size_t)n, vals.size());
    std::copy(vals.begin(), vals.end(), (float *)v);
}

// max |a - b| / max(max |b|, floor): the relative error by max-norm.
template <class A>
double rel_err(const std::vector<A> &a, const std::vector<double> &b, double floor = 1e-6) {
    double num = 0, den = floor;
    for (size_t i = 0; i < b.size(); ++i) {
        num = std::max(num, std::fabs((double)a[i] - b[i]));
        den = std::max(den, std::fabs(b[i]));
    }
    return a.size() == b.size() ? num / den : INFINITY;
}

// |a - b| <= rtol * max(|b|, 1) for scalars (losses are O(1) or smaller)
inline double scalar_err(double a, double b) { return std::fabs(a - b) / std::max(1.0, std::fabs(b)); }

inline const char *param_name(int p) {
    static const char *n[] = {"Wg", "Wn", "W1", "b1", "W2", "b2",
                              "sW1", "sb1", "sW2", "sb2", "wsg"};
    return p >= 0 && p < (int)(sizeof n / sizeof n[0]) ? n[p] : "param";
}

// Tolerances (f32 library vs f64 reference), relative error by max-norm over a tensor:
//  - y, dx and parameter gradients: 1e-4. Each value is a chain of f32 dot products of at most
//    D + 2F <= 120 terms (GEMM, gate softmax, activation), rounding ~n u = 120 x 6e-8 ~ 7e-6 of
//    the magnitudes involved; the aux-loss terms add CV^2 and 1/sigma factors that can amplify
//    cancellation a few times. 1e-4 is ~10x the worst we expect and far below any real bug
//    (a wrong term is O(1e-2..1) relative).
//  - gate weights: 1e-5 absolute (values in [0, 1], f32 softmax over <= 16 scores).
//  - losses: 1e-5 relative to max(1, |value|): double sums of f32 per-token terms.
//  - routing indices, kept flags, counts, drops: exact.
constexpr double kTolTensor = 1e-4, kTolGate = 1e-5, kTolLoss = 1e-5;

struct LibRun {
    std::vector<float> y, gate;
    std::vector<int32_t> idx, kept;
    std::vector<int64_t> counts, dropped;
    moe_routing_stats_t st{};
};

inline void library_forward(moe_layer_t *l, const std::vector<float> &x, int64_t T, int training,
                     int64_t D, int64_t E, int64_t K, LibRun *r) {
    r->y.assign(T * D, NAN);
    ASSERT_EQ(moe_layer_forward(l, x.data(), r->y.data(), T, training, nullptr),
              MOE_STATUS_SUCCESS)
        << moe_last_error();
    r->idx.assign(T * K, -1);
    r->kept.assign(T * K, -1);
    r->gate.assign(T * K, NAN);
    r->counts.assign(E, -1);
    r->dropped.assign(E, -1);
    ASSERT_EQ(moe_layer_routing(l, r->idx.data(), r->gate.data(), r->kept.data()),
              MOE_STATUS_SUCCESS);
    ASSERT_EQ(moe_layer_stats(l, &r->st, r->counts.data(), r->dropped.data()),
              MOE_STATUS_SUCCESS);
}

inline void compare_forward(const LibRun &r, const moeref::Forward &f, int64_t K, const moe_layer_config_t &cfg) {
    EXPECT_EQ(r.idx, f.idx) << "expert indices";
    EXPECT_EQ(r.kept, f.kept) << "kept flags";
    double gerr = 0;
    for (size_t i = 0; i < f.gate.size(); ++i)
        gerr = std::max(gerr, std::fabs((double)r.gate[i] - f.gate[i]));
    EXPECT_LE(gerr, kTolGate) << "gate weights";
    EXPECT_LE(moetest::rel_err(r.y, f.y), kTolTensor) << "y";
    EXPECT_EQ(r.counts, f.counts) << "tokens_per_expert";
    EXPECT_EQ(r.dropped, f.dropped) << "dropped_per_expert";
    EXPECT_EQ(r.st.num_tokens, f.T);
    EXPECT_EQ(r.st.num_assignments, f.T * K);
    EXPECT_EQ(r.st.num_dropped, f.num_dropped);
    EXPECT_LE(moetest::scalar_err(r.st.switch_loss, f.switch_loss), kTolLoss) << "switch";
    EXPECT_LE(moetest::scalar_err(r.st.importance_loss, f.importance_loss), kTolLoss) << "imp";
    EXPECT_LE(moetest::scalar_err(r.st.load_loss, f.load_loss), kTolLoss) << "load";
    EXPECT_LE(moetest::scalar_err(r.st.z_loss, f.z_loss), kTolLoss) << "z";
    EXPECT_LE(moetest::scalar_err(r.st.aux_loss, f.aux_loss), kTolLoss) << "aux";
    EXPECT_NEAR(r.st.imbalance, f.imbalance, 1e-12) << "imbalance";
    (void)cfg;
}


// Forward (training) + backward of a library layer from zero gradients against the reference
// with noise counter `call`; every output, stat and gradient compared. Returns the reference
// forward (for further checks by the caller). The input must have no routing near-tie; with
// *skipped given, a near-tie instead runs the library forward only (keeping its noise counter in
// step), compares nothing and increments *skipped.
inline moeref::Forward check_against_reference(moe_layer_t *l, const std::vector<float> &x,
                                               int64_t T, int training, uint64_t call,
                                               int *skipped = nullptr, uint64_t dy_seed = 5) {
    moeref::Model m = moeref::Model::from_layer(l);
    const int64_t D = m.D, E = m.E, K = m.K;
    moeref::Forward f = m.forward(to_double(x), T, training != 0, call);
    LibRun r;
    library_forward(l, x, T, training, D, E, K, &r);
    if (f.num_fragile > 0 && skipped) {
        ++*skipped;
        return f;
    }
    EXPECT_EQ(f.num_fragile, 0) << "input has a routing near-tie: pick another";
    compare_forward(r, f, K, m.cfg);
    EXPECT_EQ(moe_layer_zero_grad(l, nullptr), MOE_STATUS_SUCCESS);
    std::vector<float> dy = uniform(T * D, dy_seed), dx(T * D, NAN);
    EXPECT_EQ(moe_layer_backward(l, dy.data(), dx.data(), nullptr), MOE_STATUS_SUCCESS)
        << moe_last_error();
    moeref::Grads g = m.backward(f, to_double(x), to_double(dy));
    EXPECT_LE(rel_err(dx, g.dx), kTolTensor) << "dx";
    for (int p = 0; p < MOE_PARAM_COUNT; ++p)
        EXPECT_LE(rel_err(param_grad(l, (moe_param_t)p), g.param[p]), kTolTensor)
            << "d" << param_name(p);
    return f;
}

}  // namespace moetest

#endif
