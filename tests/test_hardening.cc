// test_hardening.cc - what careless or hostile use must not break: handle lifetimes (an
// optimizer never reads a destroyed layer), cancelling and dropping forced routing, non-finite
// results of finite inputs reported as NUMERIC_ERROR, and a trace that cannot be written.
#include <gtest/gtest.h>

#include <cfloat>
#include <cmath>
#include <cstring>
#include <vector>

#include "moe/moe.h"
#include "test_util.h"

namespace {

using moetest::small_config;
using moetest::uniform;

bool all_finite(const std::vector<float> &v) {
    for (float a : v)
        if (!std::isfinite(a)) return false;
    return true;
}

}  // namespace

// --- handle lifetimes -------------------------------------------------------------------------

TEST(Lifetime, LayerRefusesDestroyWhileAnOptimizerPointsAtIt) {
    moe_context_t *ctx = nullptr;
    moe_layer_t *layer = nullptr;
    ASSERT_EQ(moe_context_create(&ctx, MOE_BACKEND_CPU, 0, nullptr), MOE_STATUS_SUCCESS);
    moe_layer_config_t cfg = small_config();
    ASSERT_EQ(moe_layer_create(&layer, ctx, &cfg), MOE_STATUS_SUCCESS);
    moe_optimizer_config_t oc = moe_optimizer_config_default(MOE_OPTIMIZER_ADAM);
    moe_optimizer_t *a = nullptr, *b = nullptr;
    ASSERT_EQ(moe_optimizer_create(&a, layer, &oc), MOE_STATUS_SUCCESS);
    ASSERT_EQ(moe_optimizer_create(&b, layer, &oc), MOE_STATUS_SUCCESS);
    // before the fix the layer was freed here and the optimizer's step read the freed handle
    EXPECT_EQ(moe_layer_destroy(layer), MOE_STATUS_INVALID_ARGUMENT);
    EXPECT_NE(std::strstr(moe_last_error(), "optimizer"), nullptr) << moe_last_error();
    // nothing was freed: the layer and both optimizers still work
    std::vector<float> x = uniform(5 * 8, 1), y(5 * 8);
    ASSERT_EQ(moe_layer_forward(layer, x.data(), y.data(), 5, 1, nullptr), MOE_STATUS_SUCCESS);
    ASSERT_EQ(moe_layer_backward(layer, y.data(), x.data(), nullptr), MOE_STATUS_SUCCESS);
    EXPECT_EQ(moe_optimizer_step(a, nullptr), MOE_STATUS_SUCCESS) << moe_last_error();
    EXPECT_EQ(moe_optimizer_destroy(a), MOE_STATUS_SUCCESS);
    EXPECT_EQ(moe_layer_destroy(layer), MOE_STATUS_INVALID_ARGUMENT) << "one optimizer is left";
    EXPECT_EQ(moe_optimizer_step(b, nullptr), MOE_STATUS_SUCCESS) << moe_last_error();
    EXPECT_EQ(moe_optimizer_destroy(b), MOE_STATUS_SUCCESS);
    // the context still refuses while the layer lives, then everything goes in order
    EXPECT_EQ(moe_context_destroy(ctx), MOE_STATUS_INVALID_ARGUMENT);
    EXPECT_EQ(moe_layer_destroy(layer), MOE_STATUS_SUCCESS);
    EXPECT_EQ(moe_context_destroy(ctx), MOE_STATUS_SUCCESS);
}

TEST(Lifetime, FailedOptimizerCreateDoesNotPinTheLayer) {
    moe_context_t *ctx = nullptr;
    moe_layer_t *layer = nullptr;
    ASSERT_EQ(moe_context_create(&ctx, MOE_BACKEND_CPU, 0, nullptr), MOE_STATUS_SUCCESS);
    moe_layer_config_t cfg = small_config();
    ASSERT_EQ(moe_layer_create(&layer, ctx, &cfg), MOE_STATUS_SUCCESS);
    moe_optimizer_config_t oc = moe_optimizer_config_default(MOE_OPTIMIZER_ADAM);
    oc.lr = -1.0;
    moe_optimizer_t *o = nullptr;
    EXPECT_EQ(moe_optimizer_create(&o, layer, &oc), MOE_STATUS_INVALID_ARGUMENT);
    EXPECT_EQ(moe_layer_destroy(layer), MOE_STATUS_SUCCESS);
    EXPECT_EQ(moe_context_destroy(ctx), MOE_STATUS_SUCCESS);
}

// --- forced routing: cancelled, and dropped by a failing forward ------------------------------

namespace {

// forces every token of a 4-expert, top-2 layer to experts {3, 2} with gates 0.5 each
void force_32(moe_layer_t *l, int64_t T) {
    std::vector<int32_t> idx(T * 2);
    std::vector<float> g(T * 2, 0.5f);
    for (int64_t t = 0; t < T; ++t) idx[2 * t] = 3, idx[2 * t + 1] = 2;
    ASSERT_EQ(moe_layer_force_routing(l, idx.data(), g.data(), T), MOE_STATUS_SUCCESS)
        << moe_last_error();
}

// routing of the last forward of T tokens equals the router's own (what a fresh twin layer does)
void expect_router_choice(moe_layer_t *l, int64_t T, const std::vector<float> &x) {
    moetest::Layer twin(small_config());
    std::vector<float> y(T * 8);
    ASSERT_EQ(moe_layer_forward(twin, x.data(), y.data(), T, 0, nullptr), MOE_STATUS_SUCCESS);
    std::vector<int32_t> a(T * 2), b(T * 2);
    ASSERT_EQ(moe_layer_routing(l, a.data(), nullptr, nullptr), MOE_STATUS_SUCCESS);
    ASSERT_EQ(moe_layer_routing(twin, b.data(), nullptr, nullptr), MOE_STATUS_SUCCESS);
    EXPECT_EQ(a, b);
}

}  // namespace

TEST(ForcedRouting, CancelledWithNullArrays) {
    moetest::Layer l(small_config());
    ASSERT_EQ(l.status, MOE_STATUS_SUCCESS);
    const int64_t T = 6;
    std::vector<float> x = uniform(T * 8, 3), y(T * 8);
    EXPECT_EQ(moe_layer_force_routing(l, nullptr, nullptr, 0), MOE_STATUS_SUCCESS)
        << "cancelling with nothing pending";
    force_32(l, T);
    ASSERT_EQ(moe_layer_force_routing(l, nullptr, nullptr, 0), MOE_STATUS_SUCCESS);
    // a forward of another token count now succeeds (it failed while the routing was pending)
    ASSERT_EQ(moe_layer_forward(l, x.data(), y.data(), T - 1, 0, nullptr), MOE_STATUS_SUCCESS)
        << moe_last_error();
    ASSERT_EQ(moe_layer_forward(l, x.data(), y.data(), T, 0, nullptr), MOE_STATUS_SUCCESS);
    expect_router_choice(l, T, x);
    // NULL arrays with tokens stay an argument error
    EXPECT_EQ(moe_layer_force_routing(l, nullptr, nullptr, 3), MOE_STATUS_INVALID_ARGUMENT);
}

TEST(ForcedRouting, DroppedByAFailingForward) {
    moetest::Layer l(small_config());
    ASSERT_EQ(l.status, MOE_STATUS_SUCCESS);
    const int64_t T = 6;
    std::vector<float> x = uniform(T * 8, 4), y(T * 8);
    // a forward with another token count fails and drops the routing: before the fix it stayed
    // pending and every later forward failed
    force_32(l, T);
    EXPECT_EQ(moe_layer_forward(l, x.data(), y.data(), T - 2, 0, nullptr),
              MOE_STATUS_INVALID_ARGUMENT);
    ASSERT_EQ(moe_layer_forward(l, x.data(), y.data(), T - 2, 0, nullptr), MOE_STATUS_SUCCESS)
        << moe_last_error();
    ASSERT_EQ(moe_layer_forward(l, x.data(), y.data(), T, 0, nullptr), MOE_STATUS_SUCCESS);
    expect_router_choice(l, T, x);
    // NaN in x (NUMERIC_ERROR) drops it too
    force_32(l, T);
    std::vector<float> bad = x;
    bad[5] = NAN;
    EXPECT_EQ(moe_layer_forward(l, bad.data(), y.data(), T, 0, nullptr), MOE_STATUS_NUMERIC_ERROR);
    ASSERT_EQ(moe_layer_forward(l, x.data(), y.data(), T, 0, nullptr), MOE_STATUS_SUCCESS);
    expect_router_choice(l, T, x);
    // and an argument error of the forward itself (y NULL)
    force_32(l, T);
    EXPECT_EQ(moe_layer_forward(l, x.data(), nullptr, T, 0, nullptr), MOE_STATUS_INVALID_ARGUMENT);
    ASSERT_EQ(moe_layer_forward(l, x.data(), y.data(), T, 0, nullptr), MOE_STATUS_SUCCESS);
    expect_router_choice(l, T, x);
    // a failing per-expert-outputs forward (ye NULL) drops it as well
    force_32(l, T);
    std::vector<float> ge(T * 2);
    EXPECT_EQ(moe_layer_forward_experts(l, x.data(), nullptr, ge.data(), T, 0, nullptr),
              MOE_STATUS_INVALID_ARGUMENT);
    ASSERT_EQ(moe_layer_forward(l, x.data(), y.data(), T, 0, nullptr), MOE_STATUS_SUCCESS);
    expect_router_choice(l, T, x);
    // a forced routing that is used still works as before
    force_32(l, T);
    ASSERT_EQ(moe_layer_forward(l, x.data(), y.data(), T, 0, nullptr), MOE_STATUS_SUCCESS);
    std::vector<int32_t> idx(T * 2);
    ASSERT_EQ(moe_layer_routing(l, idx.data(), nullptr, nullptr), MOE_STATUS_SUCCESS);
    for (int64_t t = 0; t < T; ++t) EXPECT_EQ(idx[2 * t], 3);
}

// --- numerics: non-finite results of finite inputs --------------------------------------------

namespace {

struct NumFixture {
    moetest::Layer l{small_config()};
    static constexpr int64_t T = 7, D = 8;
    std::vector<float> x = uniform(T * D, 11), y = std::vector<float>(T * D),
                       dx = std::vector<float>(T * D);
    moe_status_t fwd() { return moe_layer_forward(l, x.data(), y.data(), T, 1, nullptr); }
    moe_status_t bwd(const std::vector<float> &dy) {
        return moe_layer_backward(l, dy.data(), dx.data(), nullptr);
    }
};

}  // namespace

TEST(Numerics, FiniteXNearFltMaxIsReported) {
    NumFixture f;
    for (auto &v : f.x) v = v > 0 ? FLT_MAX * 0.9f : -FLT_MAX * 0.9f;
    EXPECT_EQ(f.fwd(), MOE_STATUS_NUMERIC_ERROR);
    EXPECT_NE(std::strstr(moe_last_error(), "y holds"), nullptr) << moe_last_error();
    EXPECT_FALSE(all_finite(f.y));
    // opting out gives the old behaviour: SUCCESS with the non-finite y
    ASSERT_EQ(moe_layer_set_check_numerics(f.l, 0), MOE_STATUS_SUCCESS);
    EXPECT_EQ(f.fwd(), MOE_STATUS_SUCCESS);
    EXPECT_FALSE(all_finite(f.y));
    ASSERT_EQ(moe_layer_set_check_numerics(f.l, 1), MOE_STATUS_SUCCESS);
    EXPECT_EQ(moe_layer_set_check_numerics(nullptr, 1), MOE_STATUS_INVALID_ARGUMENT);
}

TEST(Numerics, PerExpertOutputsAreCheckedToo) {
    NumFixture f;
    const int64_t W = moe_layer_routing_width(f.l);
    std::vector<float> ye((size_t)(f.T * W * f.D)), ge((size_t)(f.T * W)), dx(f.T * f.D);
    ASSERT_EQ(moe_layer_forward_experts(f.l, f.x.data(), ye.data(), ge.data(), f.T, 1, nullptr),
              MOE_STATUS_SUCCESS)
        << moe_last_error();
    // NaN in the gradient of the per-expert rows: refused, as NaN in dy
    std::vector<float> dye(ye.size(), 0.5f), dge(ge.size(), 0.0f);
    dye[3] = NAN;
    EXPECT_EQ(moe_layer_backward_experts(f.l, dye.data(), dge.data(), dx.data(), nullptr),
              MOE_STATUS_NUMERIC_ERROR);
    // finite x near FLT_MAX: the per-expert rows overflow and the forward says so
    for (auto &v : f.x) v = v > 0 ? FLT_MAX * 0.9f : -FLT_MAX * 0.9f;
    EXPECT_EQ(moe_layer_forward_experts(f.l, f.x.data(), ye.data(), ge.data(), f.T, 1, nullptr),
              MOE_STATUS_NUMERIC_ERROR);
    EXPECT_NE(std::strstr(moe_last_error(), "y_experts holds"), nullptr) << moe_last_error();
    EXPECT_FALSE(all_finite(ye));
}

TEST(Numerics, HugeRouterWeightsAreReported) {
    NumFixture f;
    void *w = nullptr;
    int64_t n = 0;
    ASSERT_EQ(moe_layer_param(f.l, MOE_PARAM_ROUTER_WEIGHT, &w, nullptr, &n), MOE_STATUS_SUCCESS);
    for (int64_t i = 0; i < n; ++i) ((float *)w)[i] *= 1e30f;
    moe_status_t st = f.fwd();
    // either the router's scores overflow (reported) or the result is finite (SUCCESS); never
    // SUCCESS with a non-finite y
    if (st == MOE_STATUS_SUCCESS) EXPECT_TRUE(all_finite(f.y));
    else EXPECT_EQ(st, MOE_STATUS_NUMERIC_ERROR) << moe_last_error();
    for (int64_t i = 0; i < n; ++i) ((float *)w)[i] = 3e38f;
    EXPECT_EQ(f.fwd(), MOE_STATUS_NUMERIC_ERROR);
}

TEST(Numerics, NanWrittenIntoAWeightIsReportedAndTheLayerRecovers) {
    NumFixture f;
    ASSERT_EQ(f.fwd(), MOE_STATUS_SUCCESS);
    std::vector<float> y_good = f.y;
    void *w = nullptr;
    int64_t n = 0;
    ASSERT_EQ(moe_layer_param(f.l, MOE_PARAM_W2, &w, nullptr, &n), MOE_STATUS_SUCCESS);
    std::vector<float> saved((float *)w, (float *)w + n);
    for (int64_t i = 0; i < n; ++i) ((float *)w)[i] = NAN;
    EXPECT_EQ(f.fwd(), MOE_STATUS_NUMERIC_ERROR);
    // a backward may follow the reported forward; its own check reports the gradients
    EXPECT_EQ(f.bwd(f.x), MOE_STATUS_NUMERIC_ERROR) << moe_last_error();
    std::copy(saved.begin(), saved.end(), (float *)w);
    ASSERT_EQ(moe_layer_zero_grad(f.l, nullptr), MOE_STATUS_SUCCESS);
    ASSERT_EQ(f.fwd(), MOE_STATUS_SUCCESS);
    EXPECT_EQ(f.y, y_good) << "the layer is bitwise as before once the weight is restored";
    EXPECT_EQ(f.bwd(f.x), MOE_STATUS_SUCCESS) << moe_last_error();
}

TEST(Numerics, NanInDyIsRefusedBeforeAnythingAccumulates) {
    NumFixture f;
    ASSERT_EQ(f.fwd(), MOE_STATUS_SUCCESS);
    std::vector<float> g0 = moetest::param_grad(f.l, MOE_PARAM_W1);
    std::vector<float> dy = f.x;
    dy[3] = NAN;
    EXPECT_EQ(f.bwd(dy), MOE_STATUS_NUMERIC_ERROR);
    EXPECT_NE(std::strstr(moe_last_error(), "dy holds"), nullptr) << moe_last_error();
    EXPECT_EQ(moetest::param_grad(f.l, MOE_PARAM_W1), g0) << "nothing was accumulated";
    dy[3] = INFINITY;
    EXPECT_EQ(f.bwd(dy), MOE_STATUS_NUMERIC_ERROR);
    EXPECT_EQ(f.bwd(f.x), MOE_STATUS_SUCCESS) << moe_last_error();
}

TEST(Numerics, HugeFiniteDyOverflowingTheGradientsIsReported) {
    NumFixture f;
    ASSERT_EQ(f.fwd(), MOE_STATUS_SUCCESS);
    std::vector<float> dy(f.T * f.D, 3e38f);
    EXPECT_EQ(f.bwd(dy), MOE_STATUS_NUMERIC_ERROR);
    EXPECT_NE(std::strstr(moe_last_error(), "NaN/Inf"), nullptr) << moe_last_error();
    ASSERT_EQ(moe_layer_set_check_numerics(f.l, 0), MOE_STATUS_SUCCESS);
    EXPECT_EQ(f.bwd(dy), MOE_STATUS_SUCCESS);
}

TEST(Numerics, LossCoefficientsAndBiasRateAreBounded) {
    const char *fields[] = {"switch_loss_coef", "importance_loss_coef", "load_loss_coef",
                            "z_loss_coef", "bias_update_rate"};
    for (int i = 0; i < 5; ++i) {
        moe_layer_config_t c = small_config();
        double *v[] = {&c.switch_loss_coef, &c.importance_loss_coef, &c.load_loss_coef,
                       &c.z_loss_coef, &c.bias_update_rate};
        *v[i] = 1e308;
        moetest::Layer l(c);
        EXPECT_EQ(l.status, MOE_STATUS_INVALID_ARGUMENT) << fields[i];
        EXPECT_NE(std::strstr(moe_last_error(), fields[i]), nullptr) << moe_last_error();
        *v[i] = MOE_MAX_LOSS_COEF;
        moetest::Layer ok(c);
        EXPECT_EQ(ok.status, MOE_STATUS_SUCCESS) << fields[i] << ": " << moe_last_error();
    }
}
