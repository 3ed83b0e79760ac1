// test_trace.cc - routing traces round-trip: write -> read -> replay gives identical routing.
#include <gtest/gtest.h>

#include <cstdio>
#include <cstring>
#include <string>
#include <vector>

#include "ep_common.h"
#include "moe/trace_format.h"

namespace {

struct Step {
    int64_t T;
    std::vector<int32_t> idx, kept;
    std::vector<float> gate;
    std::vector<int64_t> counts, dropped;
};

moe_layer_config_t trace_config() {
    moe_layer_config_t c = ep::small_config(8, 2);
    c.capacity_factor = 1.0;  // some drops, so kept flags matter
    c.priority = MOE_PRIORITY_SCORE;
    c.noisy_gating = 1;
    return c;
}

// runs three training forwards with a trace open and returns what the layer reported
std::vector<Step> record(const std::string &path) {
    moe_context_t *ctx = nullptr;
    moe_layer_t *layer = nullptr;
    EXPECT_EQ(moe_context_create(&ctx, MOE_BACKEND_CPU, 0, nullptr), MOE_STATUS_SUCCESS);
    moe_layer_config_t cfg = trace_config();
    EXPECT_EQ(moe_layer_create(&layer, ctx, &cfg), MOE_STATUS_SUCCESS);
    EXPECT_EQ(moe_layer_trace_open(layer, path.c_str(), 7), MOE_STATUS_SUCCESS) << moe_last_error();
    std::vector<Step> steps;
    for (int64_t T : {37, 64, 5}) {
        auto x = ep::make_tokens(T, cfg.d_model, (uint32_t)T);
        std::vector<float> y(x.size());
        EXPECT_EQ(moe_layer_forward(layer, x.data(), y.data(), T, 1, nullptr), MOE_STATUS_SUCCESS);
        Step s;
        s.T = T;
        s.idx.resize((size_t)(T * 2));
        s.kept.resize((size_t)(T * 2));
        s.gate.resize((size_t)(T * 2));
        s.counts.resize(8);
        s.dropped.resize(8);
        EXPECT_EQ(moe_layer_routing(layer, s.idx.data(), s.gate.data(), s.kept.data()), 0);
        EXPECT_EQ(moe_layer_stats(layer, nullptr, s.counts.data(), s.dropped.data()), 0);
        steps.push_back(s);
    }
    EXPECT_EQ(moe_layer_trace_close(layer), MOE_STATUS_SUCCESS);
    moe_layer_destroy(layer);
    moe_context_destroy(ctx);
    return steps;
}

TEST(Trace, WriteReadReplayIdentical) {
    const std::string path = ::testing::TempDir() + "moe_roundtrip.trace";
    auto steps = record(path);

    // read back: the header and every record are what the layer reported
    FILE *f = std::fopen(path.c_str(), "rb");
    ASSERT_NE(f, nullptr);
    moe_trace_header_t h;
    ASSERT_EQ(std::fread(&h, sizeof h, 1, f), 1u);
    EXPECT_EQ(std::memcmp(h.magic, MOE_TRACE_MAGIC, 8), 0);
    EXPECT_EQ(h.version, MOE_TRACE_VERSION);
    EXPECT_EQ(h.num_experts, 8);
    EXPECT_EQ(h.top_k, 2);
    EXPECT_EQ(h.layer_id, 7u);
    for (size_t i = 0; i < steps.size(); ++i) {
        const Step &s = steps[i];
        moe_trace_record_t r;
        ASSERT_EQ(std::fread(&r, sizeof r, 1, f), 1u);
        EXPECT_EQ(r.magic, MOE_TRACE_RECORD_MAGIC);
        EXPECT_EQ(r.step, (int64_t)i);
        ASSERT_EQ(r.num_tokens, s.T);
        size_t n = (size_t)(s.T * 2);
        std::vector<int32_t> idx(n);
        std::vector<float> gate(n);
        std::vector<uint8_t> kept(n);
        std::vector<int64_t> counts(8), dropped(8);
        ASSERT_EQ(std::fread(idx.data(), 4, n, f), n);
        ASSERT_EQ(std::fread(gate.data(), 4, n, f), n);
        ASSERT_EQ(std::fread(kept.data(), 1, n, f), n);
        ASSERT_EQ(std::fread(counts.data(), 8, 8, f), 8u);
        ASSERT_EQ(std::fread(dropped.data(), 8, 8, f), 8u);
        EXPECT_EQ(idx, s.idx);
        EXPECT_EQ(gate, s.gate);
        for (size_t j = 0; j < n; ++j) EXPECT_EQ((int32_t)kept[j], s.kept[j]);
        EXPECT_EQ(counts, s.counts);
        EXPECT_EQ(dropped, s.dropped);
    }
    char extra;
    EXPECT_EQ(std::fread(&extra, 1, 1, f), 0u) << "trailing bytes after the last record";
    std::fclose(f);

    // replay on a layer with other weights: forced routing reproduces indices, gates and drops
    moe_context_t *ctx = nullptr;
    moe_layer_t *layer = nullptr;
    ASSERT_EQ(moe_context_create(&ctx, MOE_BACKEND_CPU, 0, nullptr), 0);
    moe_layer_config_t cfg = trace_config();
    cfg.seed = 4242;
    ASSERT_EQ(moe_layer_create(&layer, ctx, &cfg), 0);
    for (const Step &s : steps) {
        ASSERT_EQ(moe_layer_force_routing(layer, s.idx.data(), s.gate.data(), s.T), 0)
            << moe_last_error();
        auto x = ep::make_tokens(s.T, cfg.d_model, 99);
        std::vector<float> y(x.size()), dx(x.size());
        ASSERT_EQ(moe_layer_forward(layer, x.data(), y.data(), s.T, 1, nullptr), 0);
        ASSERT_EQ(moe_layer_backward(layer, y.data(), dx.data(), nullptr), 0);
        Step r;
        r.idx.resize(s.idx.size());
        r.kept.resize(s.kept.size());
        r.gate.resize(s.gate.size());
        r.counts.resize(8);
        r.dropped.resize(8);
        ASSERT_EQ(moe_layer_routing(layer, r.idx.data(), r.gate.data(), r.kept.data()), 0);
        ASSERT_EQ(moe_layer_stats(layer, nullptr, r.counts.data(), r.dropped.data()), 0);
        EXPECT_EQ(r.idx, s.idx);
        EXPECT_EQ(r.gate, s.gate);
        EXPECT_EQ(r.kept, s.kept);
        EXPECT_EQ(r.counts, s.counts);
        EXPECT_EQ(r.dropped, s.dropped);
    }
    // the forced routing is one-shot: the next forward routes by itself again
    auto x = ep::make_tokens(5, cfg.d_model, 5);
    std::vector<float> y(x.size());
    ASSERT_EQ(moe_layer_forward(layer, x.data(), y.data(), 5, 1, nullptr), 0);
    moe_layer_destroy(layer);
    moe_context_destroy(ctx);
}

TEST(Trace, BadInput) {
    moe_context_t *ctx = nullptr;
    moe_layer_t *layer = nullptr;
    ASSERT_EQ(moe_context_create(&ctx, MOE_BACKEND_CPU, 0, nullptr), 0);
    moe_layer_config_t cfg = trace_config();
    ASSERT_EQ(moe_layer_create(&layer, ctx, &cfg), 0);
    // a file that cannot be created is an I/O failure, not a bad argument
    EXPECT_EQ(moe_layer_trace_open(layer, "/nonexistent-dir/x.trace", 0), MOE_STATUS_IO_ERROR);
    EXPECT_NE(std::string(moe_last_error()).find("nonexistent-dir"), std::string::npos);
    EXPECT_EQ(moe_layer_trace_open(nullptr, "x", 0), MOE_STATUS_INVALID_ARGUMENT);
    EXPECT_EQ(moe_layer_trace_close(layer), MOE_STATUS_SUCCESS);  // none open: fine
    int32_t idx[4] = {0, 0, 1, 2};
    float gate[4] = {0.5f, 0.5f, 0.5f, 0.5f};
    EXPECT_EQ(moe_layer_force_routing(layer, idx, gate, 2), MOE_STATUS_INVALID_ARGUMENT);
    EXPECT_NE(std::string(moe_last_error()).find("twice"), std::string::npos);
    int32_t far[4] = {0, 9, 1, 2};
    EXPECT_EQ(moe_layer_force_routing(layer, far, gate, 2), MOE_STATUS_INVALID_ARGUMENT);
    int32_t good[4] = {0, 1, 1, 2};
    ASSERT_EQ(moe_layer_force_routing(layer, good, gate, 2), MOE_STATUS_SUCCESS);
    auto x = ep::make_tokens(3, cfg.d_model, 1);
    std::vector<float> y(x.size());
    // forced for 2 tokens, forward with 3: refused, and the layer still works after
    EXPECT_EQ(moe_layer_forward(layer, x.data(), y.data(), 3, 1, nullptr),
              MOE_STATUS_INVALID_ARGUMENT);
    EXPECT_EQ(moe_layer_forward(layer, x.data(), y.data(), 2, 1, nullptr), MOE_STATUS_SUCCESS);
    EXPECT_EQ(moe_layer_forward(layer, x.data(), y.data(), 3, 1, nullptr), MOE_STATUS_SUCCESS);
    moe_layer_destroy(layer);
    moe_context_destroy(ctx);
}

// writes the trace the moe_trace CLI tests read (ctest fixture)
TEST(Trace, WriteFixtureForTool) {
    const char *path = std::getenv("MOE_TRACE_FIXTURE");
    if (!path) GTEST_SKIP() << "MOE_TRACE_FIXTURE not set (only under ctest)";
    record(path);
}

}  // namespace
