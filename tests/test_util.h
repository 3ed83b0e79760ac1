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
    static const char *n[] = {"Wg", "Wn", "W1", "b1", "W2", "b2"};
    return n[p];
}

}  // namespace moetest

#endif
