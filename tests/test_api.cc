// test_api.cc - the public API's contract on bad input: every function with NULL pointers, out of
// range sizes and enums, calls out of order, NaN/Inf input and allocation failure. Each failing
// call must return its status, leave a message naming the argument, and leave the handles usable.
#include <gtest/gtest.h>

#include <cstdio>

#include <cstring>
#include <limits>
#include <string>
#include <thread>

#include "test_util.h"

using namespace moetest;

// The allocation-failure test asks for tens of GiB: under AddressSanitizer that must return NULL
// (as plain malloc does) instead of aborting the process.
extern "C" const char *__asan_default_options() { return "allocator_may_return_null=1"; }

namespace {

// The last error names `what` (an argument or field) and carries file:line.
::testing::AssertionResult error_mentions(const char *what) {
    std::string m = moe_last_error();
    if (m.empty()) return ::testing::AssertionFailure() << "moe_last_error() is empty";
    if (m.find(what) == std::string::npos)
        return ::testing::AssertionFailure() << "'" << m << "' does not mention '" << what << "'";
    if (m.find(".c:") == std::string::npos)
        return ::testing::AssertionFailure() << "'" << m << "' has no file:line";
    return ::testing::AssertionSuccess();
}

// A valid forward + backward: the handle still works after a failed call.
void expect_usable(moe_layer_t *l, int64_t T = 5) {
    moe_layer_config_t c;
    ASSERT_EQ(moe_layer_get_config(l, &c), MOE_STATUS_SUCCESS);
    std::vector<float> x = uniform(T * c.d_model, 42), y(T * c.d_model), dx(T * c.d_model);
    ASSERT_EQ(moe_layer_forward(l, x.data(), y.data(), T, 1, nullptr), MOE_STATUS_SUCCESS)
        << moe_last_error();
    ASSERT_EQ(moe_layer_backward(l, y.data(), dx.data(), nullptr), MOE_STATUS_SUCCESS)
        << moe_last_error();
    for (float v : y) ASSERT_TRUE(std::isfinite(v));
}

TEST(ApiStatus, StringsAndVersion) {
    const std::pair<moe_status_t, const char *> names[] = {
        {MOE_STATUS_SUCCESS, "MOE_STATUS_SUCCESS"},
        {MOE_STATUS_INVALID_ARGUMENT, "MOE_STATUS_INVALID_ARGUMENT"},
        {MOE_STATUS_NOT_SUPPORTED, "MOE_STATUS_NOT_SUPPORTED"},
        {MOE_STATUS_ALLOC_FAILED, "MOE_STATUS_ALLOC_FAILED"},
        {MOE_STATUS_NUMERIC_ERROR, "MOE_STATUS_NUMERIC_ERROR"},
        {MOE_STATUS_BACKEND_ERROR, "MOE_STATUS_BACKEND_ERROR"},
        {MOE_STATUS_COMM_ERROR, "MOE_STATUS_COMM_ERROR"},
        {MOE_STATUS_INTERNAL_ERROR, "MOE_STATUS_INTERNAL_ERROR"},
        {MOE_STATUS_IO_ERROR, "MOE_STATUS_IO_ERROR"}};
    for (auto &n : names) EXPECT_STREQ(moe_status_string(n.first), n.second);
    EXPECT_STREQ(moe_status_string((moe_status_t)9), "MOE_STATUS_UNKNOWN");
    EXPECT_STREQ(moe_status_string((moe_status_t)-1), "MOE_STATUS_UNKNOWN");
    int ma = -1, mi = -1, pa = -1;
    moe_get_version(&ma, &mi, &pa);
    EXPECT_EQ(ma, MOE_VERSION_MAJOR);
    EXPECT_EQ(mi, MOE_VERSION_MINOR);
    EXPECT_EQ(pa, MOE_VERSION_PATCH);
    moe_get_version(nullptr, nullptr, nullptr);
    moe_get_version(&ma, nullptr, nullptr);
}

TEST(ApiConfig, DefaultsAreAsDocumented) {
    moe_layer_config_t c = moe_layer_config_default();
    EXPECT_EQ(c.struct_size, sizeof(moe_layer_config_t));
    EXPECT_EQ(c.d_model, 512);
    EXPECT_EQ(c.d_ff, 2048);
    EXPECT_EQ(c.num_experts, 8);
    EXPECT_EQ(c.top_k, 2);
    EXPECT_EQ(c.activation, MOE_ACTIVATION_GELU);
    EXPECT_EQ(c.dtype, MOE_DTYPE_F32);
    EXPECT_EQ(c.gate, MOE_GATE_SOFTMAX_OF_TOPK);
    EXPECT_EQ(c.renormalize, 1);
    EXPECT_EQ(c.noisy_gating, 0);
    EXPECT_EQ(c.capacity_factor, 0.0);
    EXPECT_EQ(c.priority, MOE_PRIORITY_POSITION);
    EXPECT_EQ(c.switch_loss_coef, 0.0);
    EXPECT_EQ(c.importance_loss_coef, 0.0);
    EXPECT_EQ(c.load_loss_coef, 0.0);
    EXPECT_EQ(c.z_loss_coef, 0.0);
    EXPECT_EQ(c.expert_bias, 1);
    EXPECT_EQ(c.seed, 1234u);
}

TEST(ApiStatus, LastErrorIsThreadLocal) {
    moe_context_t *ctx = nullptr;
    ASSERT_EQ(moe_context_create(nullptr, MOE_BACKEND_CPU, 0, nullptr),
              MOE_STATUS_INVALID_ARGUMENT);
    std::string here = moe_last_error();
    EXPECT_FALSE(here.empty());
    std::string there = "unset";
    std::thread th([&] { there = moe_last_error(); });
    th.join();
    EXPECT_EQ(there, "") << "a fresh thread has no error";
    EXPECT_EQ(here, moe_last_error());
    (void)ctx;
}

TEST(ApiContext, BadArguments) {
    moe_context_t *ctx = reinterpret_cast<moe_context_t *>(0x1);
    EXPECT_EQ(moe_context_create(nullptr, MOE_BACKEND_CPU, 0, nullptr),
              MOE_STATUS_INVALID_ARGUMENT);
    EXPECT_TRUE(error_mentions("ctx"));
    EXPECT_EQ(moe_context_create(&ctx, (moe_backend_t)7, 0, nullptr), MOE_STATUS_INVALID_ARGUMENT);
    EXPECT_TRUE(error_mentions("backend"));
    EXPECT_EQ(ctx, nullptr);
    EXPECT_EQ(moe_context_create(&ctx, MOE_BACKEND_CPU, -1, nullptr), MOE_STATUS_INVALID_ARGUMENT);
    EXPECT_TRUE(error_mentions("device"));
    EXPECT_EQ(ctx, nullptr);
    EXPECT_EQ(moe_context_destroy(nullptr), MOE_STATUS_SUCCESS);
    EXPECT_EQ(moe_context_backend(nullptr), MOE_BACKEND_CPU);
}

TEST(ApiContext, CudaWithoutCudaIsNotSupported) {
    moe_context_t *ctx = nullptr;
    moe_status_t st = moe_context_create(&ctx, MOE_BACKEND_CUDA, 0, nullptr);
    if (st == MOE_STATUS_SUCCESS) {
        EXPECT_EQ(moe_context_backend(ctx), MOE_BACKEND_CUDA);
        EXPECT_EQ(moe_context_destroy(ctx), MOE_STATUS_SUCCESS);
        GTEST_SKIP() << "a CUDA device is present: nothing to refuse";
    }
    EXPECT_EQ(st, MOE_STATUS_NOT_SUPPORTED);
    EXPECT_TRUE(error_mentions("CUDA"));
    EXPECT_EQ(ctx, nullptr);
}

TEST(ApiContext, DestroyWithLiveLayerRefusesAndKeepsWorking) {
    moe_context_t *ctx = nullptr;
    moe_layer_t *layer = nullptr;
    ASSERT_EQ(moe_context_create(&ctx, MOE_BACKEND_CPU, 0, nullptr), MOE_STATUS_SUCCESS);
    EXPECT_EQ(moe_context_backend(ctx), MOE_BACKEND_CPU);
    moe_layer_config_t c = small_config();
    ASSERT_EQ(moe_layer_create(&layer, ctx, &c), MOE_STATUS_SUCCESS);
    EXPECT_EQ(moe_context_destroy(ctx), MOE_STATUS_INVALID_ARGUMENT);
    EXPECT_TRUE(error_mentions("layer"));
    expect_usable(layer);
    moe_layer_t *second = nullptr;
    ASSERT_EQ(moe_layer_create(&second, ctx, &c), MOE_STATUS_SUCCESS) << moe_last_error();
    expect_usable(second);
    EXPECT_EQ(moe_layer_destroy(second), MOE_STATUS_SUCCESS);
    EXPECT_EQ(moe_layer_destroy(layer), MOE_STATUS_SUCCESS);
    EXPECT_EQ(moe_context_destroy(ctx), MOE_STATUS_SUCCESS);
}

class ApiLayer : public ::testing::Test {
  protected:
    void SetUp() override {
        ASSERT_EQ(moe_context_create(&ctx, MOE_BACKEND_CPU, 0, nullptr), MOE_STATUS_SUCCESS);
        cfg = small_config(8, 16, 4, 2);
        ASSERT_EQ(moe_layer_create(&layer, ctx, &cfg), MOE_STATUS_SUCCESS);
    }
    void TearDown() override {
        EXPECT_EQ(moe_layer_destroy(layer), MOE_STATUS_SUCCESS);
        EXPECT_EQ(moe_context_destroy(ctx), MOE_STATUS_SUCCESS);
    }
    moe_context_t *ctx = nullptr;
    moe_layer_t *layer = nullptr;
    moe_layer_config_t cfg{};
};

TEST_F(ApiLayer, CreateRejectsEveryBadField) {
    struct Bad {
        const char *field;
        void (*mutate)(moe_layer_config_t *);
        moe_status_t want;
    };
    const Bad bad[] = {
        {"struct_size", [](moe_layer_config_t *c) { c->struct_size = 8; }, MOE_STATUS_INVALID_ARGUMENT},
        {"struct_size", [](moe_layer_config_t *c) { c->struct_size += 8; }, MOE_STATUS_INVALID_ARGUMENT},
        {"d_model", [](moe_layer_config_t *c) { c->d_model = 0; }, MOE_STATUS_INVALID_ARGUMENT},
        {"d_model", [](moe_layer_config_t *c) { c->d_model = -3; }, MOE_STATUS_INVALID_ARGUMENT},
        {"d_ff", [](moe_layer_config_t *c) { c->d_ff = 0; }, MOE_STATUS_INVALID_ARGUMENT},
        {"d_ff", [](moe_layer_config_t *c) { c->d_ff = -1; }, MOE_STATUS_INVALID_ARGUMENT},
        {"num_experts", [](moe_layer_config_t *c) { c->num_experts = 0; }, MOE_STATUS_INVALID_ARGUMENT},
        {"num_experts", [](moe_layer_config_t *c) { c->num_experts = -4; }, MOE_STATUS_INVALID_ARGUMENT},
        {"top_k", [](moe_layer_config_t *c) { c->top_k = 0; }, MOE_STATUS_INVALID_ARGUMENT},
        {"top_k", [](moe_layer_config_t *c) { c->top_k = -1; }, MOE_STATUS_INVALID_ARGUMENT},
        {"top_k", [](moe_layer_config_t *c) { c->top_k = c->num_experts + 1; }, MOE_STATUS_INVALID_ARGUMENT},
        {"activation", [](moe_layer_config_t *c) { c->activation = (moe_activation_t)5; }, MOE_STATUS_INVALID_ARGUMENT},
        {"activation", [](moe_layer_config_t *c) { c->activation = (moe_activation_t)-1; }, MOE_STATUS_INVALID_ARGUMENT},
        {"dtype", [](moe_layer_config_t *c) { c->dtype = (moe_dtype_t)3; }, MOE_STATUS_INVALID_ARGUMENT},
        {"dtype", [](moe_layer_config_t *c) { c->dtype = MOE_DTYPE_BF16; }, MOE_STATUS_NOT_SUPPORTED},
        {"dtype", [](moe_layer_config_t *c) { c->dtype = MOE_DTYPE_F16; }, MOE_STATUS_NOT_SUPPORTED},
        {"gate", [](moe_layer_config_t *c) { c->gate = (moe_gate_t)2; }, MOE_STATUS_INVALID_ARGUMENT},
        {"priority", [](moe_layer_config_t *c) { c->priority = (moe_priority_t)2; }, MOE_STATUS_INVALID_ARGUMENT},
        {"capacity_factor", [](moe_layer_config_t *c) { c->capacity_factor = NAN; }, MOE_STATUS_INVALID_ARGUMENT},
        {"capacity_factor", [](moe_layer_config_t *c) { c->capacity_factor = INFINITY; }, MOE_STATUS_INVALID_ARGUMENT},
        {"switch_loss_coef", [](moe_layer_config_t *c) { c->switch_loss_coef = -1; }, MOE_STATUS_INVALID_ARGUMENT},
        {"switch_loss_coef", [](moe_layer_config_t *c) { c->switch_loss_coef = NAN; }, MOE_STATUS_INVALID_ARGUMENT},
        {"importance_loss_coef", [](moe_layer_config_t *c) { c->importance_loss_coef = -1; }, MOE_STATUS_INVALID_ARGUMENT},
        {"load_loss_coef", [](moe_layer_config_t *c) { c->load_loss_coef = INFINITY; }, MOE_STATUS_INVALID_ARGUMENT},
        {"z_loss_coef", [](moe_layer_config_t *c) { c->z_loss_coef = -0.5; }, MOE_STATUS_INVALID_ARGUMENT},
    };
    for (const Bad &b : bad) {
        SCOPED_TRACE(b.field);
        moe_layer_config_t c = small_config(8, 16, 4, 2);
        b.mutate(&c);
        moe_layer_t *l = reinterpret_cast<moe_layer_t *>(0x1);
        EXPECT_EQ(moe_layer_create(&l, ctx, &c), b.want);
        EXPECT_TRUE(error_mentions(b.field));
        EXPECT_EQ(l, nullptr);
    }
    moe_layer_t *l = nullptr;
    EXPECT_EQ(moe_layer_create(nullptr, ctx, &cfg), MOE_STATUS_INVALID_ARGUMENT);
    EXPECT_TRUE(error_mentions("layer"));
    EXPECT_EQ(moe_layer_create(&l, nullptr, &cfg), MOE_STATUS_INVALID_ARGUMENT);
    EXPECT_TRUE(error_mentions("ctx"));
    EXPECT_EQ(moe_layer_create(&l, ctx, nullptr), MOE_STATUS_INVALID_ARGUMENT);
    EXPECT_TRUE(error_mentions("cfg"));
    // the context still serves layers, and no failed create left a layer counted on it
    expect_usable(layer);
    ASSERT_EQ(moe_layer_create(&l, ctx, &cfg), MOE_STATUS_SUCCESS);
    EXPECT_EQ(moe_layer_destroy(l), MOE_STATUS_SUCCESS);
}

TEST_F(ApiLayer, QueriesRejectBadArguments) {
    EXPECT_EQ(moe_layer_destroy(nullptr), MOE_STATUS_SUCCESS);
    moe_layer_config_t c;
    EXPECT_EQ(moe_layer_get_config(nullptr, &c), MOE_STATUS_INVALID_ARGUMENT);
    EXPECT_TRUE(error_mentions("layer"));
    EXPECT_EQ(moe_layer_get_config(layer, nullptr), MOE_STATUS_INVALID_ARGUMENT);
    EXPECT_TRUE(error_mentions("cfg"));
    ASSERT_EQ(moe_layer_get_config(layer, &c), MOE_STATUS_SUCCESS);
    EXPECT_EQ(0, std::memcmp(&c, &cfg, sizeof c));

    void *v = nullptr, *g = nullptr;
    int64_t n = -1;
    EXPECT_EQ(moe_layer_param(nullptr, MOE_PARAM_W1, &v, &g, &n), MOE_STATUS_INVALID_ARGUMENT);
    EXPECT_TRUE(error_mentions("layer"));
    EXPECT_EQ(moe_layer_param(layer, (moe_param_t)-1, &v, &g, &n), MOE_STATUS_INVALID_ARGUMENT);
    EXPECT_TRUE(error_mentions("which"));
    EXPECT_EQ(moe_layer_param(layer, MOE_PARAM_COUNT, &v, &g, &n), MOE_STATUS_INVALID_ARGUMENT);
    EXPECT_TRUE(error_mentions("which"));
    EXPECT_EQ(moe_layer_param(layer, MOE_PARAM_W1, nullptr, nullptr, nullptr), MOE_STATUS_SUCCESS);
    // a parameter the config turns off: NULL, NULL, 0
    v = g = reinterpret_cast<void *>(0x1);
    EXPECT_EQ(moe_layer_param(layer, MOE_PARAM_NOISE_WEIGHT, &v, &g, &n), MOE_STATUS_SUCCESS);
    EXPECT_EQ(v, nullptr);
    EXPECT_EQ(g, nullptr);
    EXPECT_EQ(n, 0);
    EXPECT_EQ(moe_layer_zero_grad(nullptr, nullptr), MOE_STATUS_INVALID_ARGUMENT);
    EXPECT_TRUE(error_mentions("layer"));
    expect_usable(layer);
}

TEST_F(ApiLayer, NoBiasParamsAreOff) {
    moe_layer_config_t c = small_config(8, 16, 4, 2);
    c.expert_bias = 0;
    Layer L(c);
    ASSERT_EQ(L.status, MOE_STATUS_SUCCESS);
    for (moe_param_t p : {MOE_PARAM_B1, MOE_PARAM_B2}) {
        void *v = reinterpret_cast<void *>(0x1), *g = v;
        int64_t n = -1;
        EXPECT_EQ(moe_layer_param(L, p, &v, &g, &n), MOE_STATUS_SUCCESS);
        EXPECT_EQ(v, nullptr);
        EXPECT_EQ(g, nullptr);
        EXPECT_EQ(n, 0);
    }
    expect_usable(L);
}

TEST_F(ApiLayer, OutOfOrderCalls) {
    std::vector<float> buf(8 * 5);
    moe_routing_stats_t st;
    int32_t idx[10];
    EXPECT_EQ(moe_layer_backward(layer, buf.data(), buf.data(), nullptr),
              MOE_STATUS_INVALID_ARGUMENT);
    EXPECT_TRUE(error_mentions("forward"));
    EXPECT_EQ(moe_layer_stats(layer, &st, nullptr, nullptr), MOE_STATUS_INVALID_ARGUMENT);
    EXPECT_TRUE(error_mentions("forward"));
    EXPECT_EQ(moe_layer_routing(layer, idx, nullptr, nullptr), MOE_STATUS_INVALID_ARGUMENT);
    EXPECT_TRUE(error_mentions("forward"));
    EXPECT_EQ(moe_layer_stats(nullptr, &st, nullptr, nullptr), MOE_STATUS_INVALID_ARGUMENT);
    EXPECT_TRUE(error_mentions("layer"));
    EXPECT_EQ(moe_layer_routing(nullptr, idx, nullptr, nullptr), MOE_STATUS_INVALID_ARGUMENT);
    EXPECT_TRUE(error_mentions("layer"));
    expect_usable(layer);
    // after a forward every pointer of stats/routing may be NULL
    EXPECT_EQ(moe_layer_stats(layer, nullptr, nullptr, nullptr), MOE_STATUS_SUCCESS);
    EXPECT_EQ(moe_layer_routing(layer, nullptr, nullptr, nullptr), MOE_STATUS_SUCCESS);
}

TEST_F(ApiLayer, ForwardAndBackwardRejectBadArguments) {
    const int64_t T = 5;
    std::vector<float> x = uniform(T * 8, 1), y(T * 8), dx(T * 8);
    EXPECT_EQ(moe_layer_forward(nullptr, x.data(), y.data(), T, 1, nullptr),
              MOE_STATUS_INVALID_ARGUMENT);
    EXPECT_TRUE(error_mentions("layer"));
    EXPECT_EQ(moe_layer_forward(layer, nullptr, y.data(), T, 1, nullptr),
              MOE_STATUS_INVALID_ARGUMENT);
    EXPECT_TRUE(error_mentions("x"));
    EXPECT_EQ(moe_layer_forward(layer, x.data(), nullptr, T, 1, nullptr),
              MOE_STATUS_INVALID_ARGUMENT);
    EXPECT_TRUE(error_mentions("y"));
    for (int64_t bad : {(int64_t)-1, std::numeric_limits<int64_t>::min(),
                        std::numeric_limits<int64_t>::max(), (int64_t)INT32_MAX / 2 + 1}) {
        SCOPED_TRACE(bad);
        EXPECT_EQ(moe_layer_forward(layer, x.data(), y.data(), bad, 1, nullptr),
                  MOE_STATUS_INVALID_ARGUMENT);
        EXPECT_TRUE(error_mentions("num_tokens"));
    }
    expect_usable(layer);
    // zero tokens is a valid call (a rank of an expert-parallel layer may have none): x and y
    // may be NULL, and backward then writes nothing
    EXPECT_EQ(moe_layer_forward(layer, nullptr, nullptr, 0, 1, nullptr), MOE_STATUS_SUCCESS)
        << moe_last_error();
    EXPECT_EQ(moe_layer_backward(layer, nullptr, nullptr, nullptr), MOE_STATUS_SUCCESS)
        << moe_last_error();
    moe_routing_stats_t st;
    EXPECT_EQ(moe_layer_stats(layer, &st, nullptr, nullptr), MOE_STATUS_SUCCESS);
    EXPECT_EQ(st.num_tokens, 0);
    EXPECT_EQ(st.aux_loss, 0.0);
    expect_usable(layer);
    EXPECT_EQ(moe_layer_backward(nullptr, y.data(), dx.data(), nullptr),
              MOE_STATUS_INVALID_ARGUMENT);
    EXPECT_TRUE(error_mentions("layer"));
    EXPECT_EQ(moe_layer_backward(layer, nullptr, dx.data(), nullptr), MOE_STATUS_INVALID_ARGUMENT);
    EXPECT_TRUE(error_mentions("dy"));
    EXPECT_EQ(moe_layer_backward(layer, y.data(), nullptr, nullptr), MOE_STATUS_INVALID_ARGUMENT);
    EXPECT_TRUE(error_mentions("dx"));
    expect_usable(layer);
}

// NaN/Inf in x: NUMERIC_ERROR, y untouched, nothing routed. "A failed call leaves every handle
// usable" and backward is "of the last successful forward", so stats, routing and backward
// still describe the forward before the failed one.
void numeric_error_keeps_last_forward(int64_t T_bad) {
    moe_layer_config_t c = small_config(8, 16, 4, 2);
    c.switch_loss_coef = 0.1;
    Layer L(c);
    ASSERT_EQ(L.status, MOE_STATUS_SUCCESS);
    const int64_t T = 12;
    std::vector<float> x = uniform(T * 8, 1), y(T * 8), dy = uniform(T * 8, 2), dx0(T * 8);
    ASSERT_EQ(moe_layer_forward(L, x.data(), y.data(), T, 1, nullptr), MOE_STATUS_SUCCESS);
    moe_routing_stats_t st0;
    std::vector<int64_t> cnt0(4);
    std::vector<int32_t> idx0(T * 2), kept0(T * 2);
    std::vector<float> g0(T * 2);
    ASSERT_EQ(moe_layer_stats(L, &st0, cnt0.data(), nullptr), MOE_STATUS_SUCCESS);
    ASSERT_EQ(moe_layer_routing(L, idx0.data(), g0.data(), kept0.data()), MOE_STATUS_SUCCESS);
    ASSERT_EQ(moe_layer_backward(L, dy.data(), dx0.data(), nullptr), MOE_STATUS_SUCCESS);

    for (float bad : {NAN, INFINITY, -INFINITY}) {
        std::vector<float> xb = uniform(T_bad * 8, 3), yb(T_bad * 8, 12345.0f);
        xb[T_bad * 8 / 2 + 1] = bad;
        EXPECT_EQ(moe_layer_forward(L, xb.data(), yb.data(), T_bad, 1, nullptr),
                  MOE_STATUS_NUMERIC_ERROR);
        EXPECT_TRUE(error_mentions("NaN"));
        for (float v : yb) ASSERT_EQ(v, 12345.0f) << "y must be untouched";
        moe_routing_stats_t st;
        std::vector<int64_t> cnt(4);
        std::vector<int32_t> idx(T * 2), kept(T * 2);
        std::vector<float> g(T * 2);
        ASSERT_EQ(moe_layer_stats(L, &st, cnt.data(), nullptr), MOE_STATUS_SUCCESS);
        EXPECT_EQ(st.num_tokens, T);
        EXPECT_EQ(st.aux_loss, st0.aux_loss);
        EXPECT_EQ(cnt, cnt0);
        ASSERT_EQ(moe_layer_routing(L, idx.data(), g.data(), kept.data()), MOE_STATUS_SUCCESS);
        EXPECT_EQ(idx, idx0);
        EXPECT_EQ(kept, kept0);
        EXPECT_EQ(g, g0);
        std::vector<float> dx(T * 8);
        ASSERT_EQ(moe_layer_backward(L, dy.data(), dx.data(), nullptr), MOE_STATUS_SUCCESS);
        EXPECT_EQ(dx, dx0) << "backward must still be that of the last successful forward";
    }
    expect_usable(L);
}

TEST(ApiNumeric, NanInfSameBatchKeepsLastForward) { numeric_error_keeps_last_forward(12); }
TEST(ApiNumeric, NanInfSmallerBatchKeepsLastForward) { numeric_error_keeps_last_forward(3); }
// A failed forward with more tokens than any before must not lose the last successful one.
TEST(ApiNumeric, NanInfLargerBatchKeepsLastForward) { numeric_error_keeps_last_forward(500); }

// Allocation failure: buffers for T tokens that no malloc can give. x itself is T x D floats of
// calloc'd (untouched, lazily mapped) memory; the per-token buffers of K copies are K times that.
// With D = 2^18, K = E = 64 and T = 4096: x is 4 GiB, each expert-major buffer 256 GiB, more than
// the RAM + swap of any machine this runs on, which the overcommit heuristic refuses.
// With vm.overcommit_memory = 1 ("always") the kernel grants any allocation and kills the process
// when the pages are touched: ALLOC_FAILED cannot happen there, and the test would only be killed.
static bool overcommit_always() {
    FILE *f = std::fopen("/proc/sys/vm/overcommit_memory", "r");
    int mode = 0;
    if (f) {
        if (std::fscanf(f, "%d", &mode) != 1) mode = 0;
        std::fclose(f);
    }
    return mode == 1;
}

TEST(ApiAlloc, HugeBatchFailsCleanlyAndKeepsLayer) {
    if (overcommit_always())
        GTEST_SKIP() << "vm.overcommit_memory is 1: allocations never fail on this machine";
    // K = E = 64: the expert-major buffers want 64 MiB per token, 256 GiB for 4096 tokens, more
    // than any machine this runs on has (a 64 GiB request can succeed on a big GPU host)
    moe_layer_config_t c = small_config(1 << 18, 1, 64, 64);
    c.expert_bias = 0;
    Layer L(c);
    ASSERT_EQ(L.status, MOE_STATUS_SUCCESS) << moe_last_error();
    const int64_t D = (int64_t)1 << 18;
    // one successful small forward first: the failed one must leave it intact
    const int64_t T0 = 2;
    std::vector<float> x0 = uniform(T0 * D, 1), y0(T0 * D), dx0(T0 * D);
    ASSERT_EQ(moe_layer_forward(L, x0.data(), y0.data(), T0, 1, nullptr), MOE_STATUS_SUCCESS);
    std::vector<int32_t> idx0(T0 * 64), idx1(T0 * 64);
    std::vector<float> g0(T0 * 64), g1(T0 * 64);
    ASSERT_EQ(moe_layer_routing(L, idx0.data(), g0.data(), nullptr), MOE_STATUS_SUCCESS);
    const int64_t T = 4096;
    float *xb = (float *)calloc((size_t)(T * D), sizeof(float));
    float *yb = (float *)calloc((size_t)(T * D), sizeof(float));
    if (!xb || !yb) {
        free(xb), free(yb);
        GTEST_SKIP() << "cannot even reserve x and y of " << T << " x 2^18 floats here";
    }
    moe_status_t st = moe_layer_forward(L, xb, yb, T, 1, nullptr);
    std::string msg = moe_last_error();
    free(xb), free(yb);
    ASSERT_EQ(st, MOE_STATUS_ALLOC_FAILED) << "expected the 256 GiB buffers to fail; " << msg;
    EXPECT_NE(msg.find("4096 tokens"), std::string::npos) << msg;
    // the layer keeps its buffers and its last forward
    moe_routing_stats_t s;
    ASSERT_EQ(moe_layer_stats(L, &s, nullptr, nullptr), MOE_STATUS_SUCCESS);
    EXPECT_EQ(s.num_tokens, T0);
    ASSERT_EQ(moe_layer_routing(L, idx1.data(), g1.data(), nullptr), MOE_STATUS_SUCCESS);
    EXPECT_EQ(idx0, idx1);
    EXPECT_EQ(g0, g1);
    ASSERT_EQ(moe_layer_backward(L, y0.data(), dx0.data(), nullptr), MOE_STATUS_SUCCESS);
    ASSERT_EQ(moe_layer_forward(L, x0.data(), y0.data(), T0, 1, nullptr), MOE_STATUS_SUCCESS);
}

}  // namespace
