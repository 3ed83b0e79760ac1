// ep_common.h - shared harness of the expert-parallel tests (local threads and MPI processes):
// one rank's run of the layer and its comparison with the single-rank layer on the same tokens.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

#include "moe/moe.h"

namespace ep {

// deterministic tokens of the whole batch: token t's values depend on (seed, t) only
inline std::vector<float> make_tokens(int64_t T, int64_t D, uint32_t seed) {
    std::vector<float> x((size_t)(T * D));
    for (int64_t i = 0; i < T * D; ++i) {
        uint32_t h = (uint32_t)i * 2654435761u ^ seed * 40503u;
        h ^= h >> 15;
        h *= 2246822519u;
        h ^= h >> 13;
        x[(size_t)i] = ((float)(h >> 8) / 16777216.0f - 0.5f) * 2.0f;
    }
    return x;
}

// token split over P ranks: uneven on purpose; rank `zero_rank` (if >= 0) gets none
inline std::vector<int64_t> split(int64_t T, int P, int zero_rank = -1) {
    std::vector<int64_t> w(P);
    int64_t sum = 0;
    for (int r = 0; r < P; ++r) {
        w[r] = (r == zero_rank) ? 0 : (r + 2);
        sum += w[r];
    }
    std::vector<int64_t> begin(P + 1, 0);
    for (int r = 0; r < P; ++r) begin[r + 1] = begin[r] + (sum ? T * w[r] / sum : 0);
    begin[P] = T;
    if (zero_rank >= 1 && zero_rank == P - 1) begin[(size_t)zero_rank] = T;  // last rank empty
    return begin;
}

struct Result {
    moe_status_t status = MOE_STATUS_SUCCESS;
    std::string error;
    std::vector<float> y, dx;
    std::vector<float> grad[MOE_PARAM_COUNT];
    std::vector<int32_t> kept;
    moe_routing_stats_t stats{};
    std::vector<int64_t> tokens_per_expert, dropped_per_expert;
};

inline std::vector<float> host_copy(const void *p, int64_t n) {
    std::vector<float> v((size_t)n);
    if (n) std::memcpy(v.data(), p, (size_t)n * sizeof(float));
    return v;
}

// runs forward + backward of one rank (comm may be NULL for the single-rank reference);
// x and dy hold this rank's tokens; `setup` may change parameters before the run
template <class Setup>
Result run_rank(moe_comm_t *comm, const moe_layer_config_t &cfg, const float *x, const float *dy,
                int64_t T, Setup setup) {
    Result r;
    moe_context_t *ctx = nullptr;
    moe_layer_t *layer = nullptr;
    auto fail = [&](moe_status_t st) {
        r.status = st;
        r.error = moe_last_error();
        return r;
    };
    moe_status_t st = moe_context_create(&ctx, MOE_BACKEND_CPU, 0, comm);
    if (st) return fail(st);
    st = moe_layer_create(&layer, ctx, &cfg);
    if (st) {
        fail(st);
        moe_context_destroy(ctx);
        return r;
    }
    setup(layer);
    int64_t D = cfg.d_model;
    r.y.assign((size_t)(T * D), 0.0f);
    r.dx.assign((size_t)(T * D), 0.0f);
    st = moe_layer_forward(layer, T ? x : nullptr, T ? r.y.data() : nullptr, T, 1, nullptr);
    if (!st) st = moe_layer_backward(layer, T ? dy : nullptr, T ? r.dx.data() : nullptr, nullptr);
    if (!st) {
        r.tokens_per_expert.resize((size_t)cfg.num_experts);
        r.dropped_per_expert.resize((size_t)cfg.num_experts);
        st = moe_layer_stats(layer, &r.stats, r.tokens_per_expert.data(),
                             r.dropped_per_expert.data());
    }
    if (!st) {
        r.kept.resize((size_t)(T * cfg.top_k));
        st = moe_layer_routing(layer, nullptr, nullptr, r.kept.data());
    }
    if (!st)
        for (int p = 0; p < MOE_PARAM_COUNT; ++p) {
            void *g = nullptr;
            int64_t n = 0;
            moe_layer_param(layer, (moe_param_t)p, nullptr, &g, &n);
            r.grad[p] = host_copy(g, n);
        }
    if (st) fail(st);
    moe_layer_destroy(layer);
    moe_context_destroy(ctx);
    return r;
}

// A placement as moe_layer_set_placement takes it: experts per rank, then the lists.
struct Placement {
    std::vector<int64_t> num_local;
    std::vector<int32_t> experts;
    // first slot of rank q
    int64_t begin(int q) const {
        int64_t b = 0;
        for (int i = 0; i < q; ++i) b += num_local[(size_t)i];
        return b;
    }
};

inline Placement placement(const std::vector<std::vector<int32_t>> &ranks) {
    Placement p;
    for (const auto &r : ranks) {
        p.num_local.push_back((int64_t)r.size());
        p.experts.insert(p.experts.end(), r.begin(), r.end());
    }
    return p;
}

// forward + backward of one rank on a layer with placement pl (empty: the default), the
// replicas' gradients summed; grads in the rank's slot order
inline Result run_rank_placed(moe_comm_t *comm, const moe_layer_config_t &cfg, const float *x,
                              const float *dy, int64_t T, const Placement &pl) {
    Result r;
    moe_context_t *ctx = nullptr;
    moe_layer_t *layer = nullptr;
    moe_status_t st = moe_context_create(&ctx, MOE_BACKEND_CPU, 0, comm);
    if (!st) st = moe_layer_create(&layer, ctx, &cfg);
    if (!st && !pl.num_local.empty())
        st = moe_layer_set_placement(layer, pl.num_local.data(), pl.experts.data(), nullptr);
    const int64_t D = cfg.d_model;
    r.y.assign((size_t)(T * D), 0.0f);
    r.dx.assign((size_t)(T * D), 0.0f);
    if (!st) st = moe_layer_forward(layer, T ? x : nullptr, T ? r.y.data() : nullptr, T, 1, nullptr);
    if (!st) st = moe_layer_backward(layer, T ? dy : nullptr, T ? r.dx.data() : nullptr, nullptr);
    if (!st) st = moe_layer_reduce_replica_grads(layer, nullptr);
    if (!st) st = moe_layer_stats(layer, &r.stats, nullptr, nullptr);
    if (!st)
        for (int p = 0; p < MOE_PARAM_COUNT; ++p) {
            void *g = nullptr;
            int64_t n = 0;
            moe_layer_param(layer, (moe_param_t)p, nullptr, &g, &n);
            r.grad[p] = host_copy(g, n);
        }
    if (st) {
        r.status = st;
        r.error = moe_last_error();
    }
    moe_layer_destroy(layer);
    moe_context_destroy(ctx);
    return r;
}

// max |a - b| / max(max |b|, tiny) over the ranges
inline double rel_err(const float *a, const float *b, int64_t n) {
    double num = 0.0, den = 1e-30;
    for (int64_t i = 0; i < n; ++i) {
        num = std::fmax(num, std::fabs((double)a[i] - (double)b[i]));
        den = std::fmax(den, std::fabs((double)b[i]));
    }
    return num / den;
}

inline moe_layer_config_t small_config(int64_t E, int64_t K) {
    moe_layer_config_t c = moe_layer_config_default();
    c.d_model = 12;
    c.d_ff = 20;
    c.num_experts = E;
    c.top_k = K;
    c.seed = 77;
    return c;
}

}  // namespace ep
