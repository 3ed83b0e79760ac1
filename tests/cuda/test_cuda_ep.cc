// test_cuda_ep.cc - the CUDA backend beyond the single-rank layer, each against the CPU layer on
// the same tokens and parameters: expert parallelism with P ranks as threads on one GPU (the
// local communicator; NCCL refuses two ranks on a device) and one NCCL rank; the balancing
// strategies; the optimizer's update loop; forced (replayed) routing.
//
// x and the router weights are small dyadic numbers, so the logits are exact on both backends
// and the routing agrees bit for bit; outputs and gradients are compared by max-norm relative
// error against 1e-5 (f32; sums of a few hundred terms in another order).
#include <gtest/gtest.h>

#include <cuda_runtime.h>
#ifdef MOE_TEST_NCCL
#include <nccl.h>
#endif

#include <cmath>
#include <cstring>
#include <string>
#include <thread>
#include <vector>

#include "gpu_test.h"
#include "moe/moe.h"

namespace {

constexpr double kTol = 1e-5;

double rel_err(const float *a, const float *b, size_t n) {
    double num = 0.0, den = 0.0;
    for (size_t i = 0; i < n; ++i) {
        if (!std::isfinite(a[i])) return INFINITY;
        num = std::fmax(num, std::fabs((double)a[i] - (double)b[i]));
        den = std::fmax(den, std::fabs((double)b[i]));
    }
    return den > 0.0 ? num / den : num;
}

float dyadic(uint32_t i, uint32_t salt) {
    uint32_t h = i * 2654435761u ^ salt * 97u;
    h ^= h >> 13;
    return (float)((int)(h % 33u) - 16) / 16.0f;
}

moe_layer_config_t config(int64_t E, int64_t K) {
    moe_layer_config_t c = moe_layer_config_default();
    c.d_model = 24;
    c.d_ff = 40;
    c.num_experts = E;
    c.top_k = K;
    c.activation = MOE_ACTIVATION_SWIGLU;
    c.switch_loss_coef = 0.1;
    c.seed = 5;
    return c;
}

struct Reference {
    std::vector<float> y, dx, grad[MOE_PARAM_COUNT], param[MOE_PARAM_COUNT];
};

// the single-rank CPU layer on all tokens; its parameters are what every GPU rank gets
Reference reference(const moe_layer_config_t &cfg, const std::vector<float> &x,
                    const std::vector<float> &dy, int64_t T,
                    const std::vector<float> &bias = {}) {
    Reference r;
    moe_context_t *ctx = nullptr;
    moe_layer_t *layer = nullptr;
    EXPECT_EQ(moe_context_create(&ctx, MOE_BACKEND_CPU, 0, nullptr), 0);
    EXPECT_EQ(moe_layer_create(&layer, ctx, &cfg), 0) << moe_last_error();
    float *wg = nullptr;
    int64_t n = 0;
    moe_layer_param(layer, MOE_PARAM_ROUTER_WEIGHT, (void **)&wg, nullptr, &n);
    for (int64_t i = 0; i < n; ++i) wg[i] = dyadic((uint32_t)i, 3) / 4.0f;
    if (!bias.empty()) {
        EXPECT_EQ(moe_layer_set_score_bias(layer, bias.data()), 0) << moe_last_error();
    }
    r.y.resize(x.size());
    r.dx.resize(x.size());
    EXPECT_EQ(moe_layer_forward(layer, x.data(), r.y.data(), T, 1, nullptr), 0);
    EXPECT_EQ(moe_layer_backward(layer, dy.data(), r.dx.data(), nullptr), 0);
    for (int p = 0; p < MOE_PARAM_COUNT; ++p) {
        void *v = nullptr, *g = nullptr;
        moe_layer_param(layer, (moe_param_t)p, &v, &g, &n);
        r.param[p].assign((float *)v, (float *)v + n);
        r.grad[p].assign((float *)g, (float *)g + n);
    }
    moe_layer_destroy(layer);
    moe_context_destroy(ctx);
    return r;
}

struct RankOut {
    std::string error;
    std::vector<float> y, dx, grad[MOE_PARAM_COUNT];
};

#define RK(call)                                                                               \
    do {                                                                                       \
        moe_status_t st_ = (call);                                                             \
        if (st_ != MOE_STATUS_SUCCESS) {                                                       \
            out.error = std::string(#call) + ": " + moe_last_error();                         \
            goto done;                                                                         \
        }                                                                                      \
    } while (0)

// one rank on the GPU: its experts' parameters from the reference, its tokens [b, b + Tr)
void gpu_rank(moe_comm_t *comm, const moe_layer_config_t &cfg, const Reference &ref,
              const std::vector<float> &x, const std::vector<float> &dy, int64_t b, int64_t Tr,
              int rank, int P, RankOut &out, const std::vector<float> &bias = {}) {
    const int64_t D = cfg.d_model;
    moe_context_t *ctx = nullptr;
    moe_layer_t *layer = nullptr;
    float *dxb = nullptr, *dyb = nullptr, *dbuf = nullptr, *ddx = nullptr;
    size_t bytes = (size_t)(Tr * D) * sizeof(float);
    cudaSetDevice(0);
    RK(moe_context_create(&ctx, MOE_BACKEND_CUDA, 0, comm));
    RK(moe_layer_create(&layer, ctx, &cfg));
    for (int p = 0; p < MOE_PARAM_COUNT; ++p) {
        void *v = nullptr;
        int64_t n = 0;
        RK(moe_layer_param(layer, (moe_param_t)p, &v, nullptr, &n));
        if (n == 0) continue;
        bool replicated = p == MOE_PARAM_ROUTER_WEIGHT || p == MOE_PARAM_NOISE_WEIGHT;
        const float *src = ref.param[p].data() + (replicated ? 0 : (size_t)rank * (size_t)n);
        if ((size_t)n * (replicated ? 1 : (size_t)P) != ref.param[p].size()) {
            out.error = "parameter sizes disagree";
            goto done;
        }
        cudaMemcpy(v, src, (size_t)n * sizeof(float), cudaMemcpyHostToDevice);
    }
    if (!bias.empty()) RK(moe_layer_set_score_bias(layer, bias.data()));
    cudaMalloc(&dxb, bytes + 4), cudaMalloc(&dyb, bytes + 4);
    cudaMalloc(&dbuf, bytes + 4), cudaMalloc(&ddx, bytes + 4);
    cudaMemcpy(dxb, x.data() + b * D, bytes, cudaMemcpyHostToDevice);
    cudaMemcpy(dyb, dy.data() + b * D, bytes, cudaMemcpyHostToDevice);
    RK(moe_layer_forward(layer, dxb, dbuf, Tr, 1, nullptr));
    RK(moe_layer_backward(layer, dyb, ddx, nullptr));
    cudaDeviceSynchronize();
    out.y.resize((size_t)(Tr * D));
    out.dx.resize((size_t)(Tr * D));
    cudaMemcpy(out.y.data(), dbuf, bytes, cudaMemcpyDeviceToHost);
    cudaMemcpy(out.dx.data(), ddx, bytes, cudaMemcpyDeviceToHost);
    for (int p = 0; p < MOE_PARAM_COUNT; ++p) {
        void *g = nullptr;
        int64_t n = 0;
        RK(moe_layer_param(layer, (moe_param_t)p, nullptr, &g, &n));
        out.grad[p].resize((size_t)n);
        if (n) cudaMemcpy(out.grad[p].data(), g, (size_t)n * sizeof(float), cudaMemcpyDeviceToHost);
    }
done:
    moe_layer_destroy(layer);
    moe_context_destroy(ctx);
    cudaFree(dxb), cudaFree(dyb), cudaFree(dbuf), cudaFree(ddx);
}

void compare(const moe_layer_config_t &cfg, const Reference &ref, const RankOut &o, int64_t b,
             int64_t Tr, int rank, int P) {
    ASSERT_TRUE(o.error.empty()) << "rank " << rank << ": " << o.error;
    const size_t D = (size_t)cfg.d_model;
    if (Tr > 0) {
        EXPECT_LE(rel_err(o.y.data(), ref.y.data() + (size_t)b * D, (size_t)Tr * D), kTol)
            << "y, rank " << rank;
        EXPECT_LE(rel_err(o.dx.data(), ref.dx.data() + (size_t)b * D, (size_t)Tr * D), kTol)
            << "dx, rank " << rank;
    }
    for (int p = MOE_PARAM_W1; p < MOE_PARAM_COUNT; ++p) {
        size_t n = o.grad[p].size();
        if (n == 0) continue;
        ASSERT_EQ(n * (size_t)P, ref.grad[p].size());
        EXPECT_LE(rel_err(o.grad[p].data(), ref.grad[p].data() + (size_t)rank * n, n), kTol)
            << "grad of param " << p << ", rank " << rank;
    }
}

std::vector<float> tokens(int64_t T, int64_t D, uint32_t salt) {
    std::vector<float> x((size_t)(T * D));
    for (size_t i = 0; i < x.size(); ++i) x[i] = dyadic((uint32_t)i, salt);
    return x;
}

class CudaEpLocal : public ::testing::TestWithParam<int> {};

TEST_P(CudaEpLocal, RanksOnOneGpuMatchSingleRankCpu) {
    REQUIRE_GPU();
    const int P = GetParam();
    const int64_t T = 157, E = 8;
    moe_layer_config_t cfg = config(E, 2);
    auto x = tokens(T, cfg.d_model, 1), dy = tokens(T, cfg.d_model, 2);
    Reference ref = reference(cfg, x, dy, T);
    std::vector<moe_comm_t *> comms((size_t)P);
    ASSERT_EQ(moe_comm_create_local(comms.data(), P), 0);
    std::vector<RankOut> out((size_t)P);
    std::vector<int64_t> begin((size_t)P + 1);
    for (int r = 0; r <= P; ++r) begin[(size_t)r] = T * r / P;
    begin[1] = begin[0];  // rank 0 has no tokens: it still serves its experts
    std::vector<std::thread> th;
    for (int r = 0; r < P; ++r)
        th.emplace_back([&, r] {
            gpu_rank(comms[(size_t)r], cfg, ref, x, dy, begin[(size_t)r],
                     begin[(size_t)r + 1] - begin[(size_t)r], r, P, out[(size_t)r]);
        });
    for (auto &t : th) t.join();
    for (int r = 0; r < P; ++r)
        compare(cfg, ref, out[(size_t)r], begin[(size_t)r], begin[(size_t)r + 1] - begin[(size_t)r],
                r, P);
    for (auto *c : comms) EXPECT_EQ(moe_comm_destroy(c), 0);
}

INSTANTIATE_TEST_SUITE_P(Ranks, CudaEpLocal, ::testing::Values(2, 4, 8));

// Placement and replication through the CUDA backend: 3 local ranks on one GPU, 8 experts,
// rank 0 without experts, experts 0 and 1 replicated; each rank's experts get the reference's
// parameters of their global experts; y, dx and the expert gradients (replicas summed) must
// equal the single-rank CPU layer's.
TEST(CudaEpPlacement, ReplicatedPlacementMatchesSingleRankCpu) {
    REQUIRE_GPU();
    const int P = 3;
    const int64_t T = 131, E = 8;
    moe_layer_config_t cfg = config(E, 2);
    auto x = tokens(T, cfg.d_model, 4), dy = tokens(T, cfg.d_model, 5);
    Reference ref = reference(cfg, x, dy, T);
    const std::vector<int64_t> num = {0, 5, 5};
    const std::vector<int32_t> ex = {0, 1, 2, 3, 4, 0, 1, 5, 6, 7};
    const int64_t k0[P] = {0, 0, 5};
    const int64_t D = cfg.d_model, F2 = 2 * cfg.d_ff;
    const int64_t per[MOE_PARAM_COUNT] = {0, 0, D * F2, F2, cfg.d_ff * D, D};
    std::vector<moe_comm_t *> comms((size_t)P);
    ASSERT_EQ(moe_comm_create_local(comms.data(), P), 0);
    std::vector<RankOut> out((size_t)P);
    std::vector<std::thread> th;
    for (int r = 0; r < P; ++r)
        th.emplace_back([&, r] {
            RankOut &o = out[(size_t)r];
            RankOut &out = o;  // for RK
            int64_t b = T * r / P, Tr = T * (r + 1) / P - b;
            size_t bytes = (size_t)(Tr * D) * sizeof(float);
            moe_context_t *ctx = nullptr;
            moe_layer_t *layer = nullptr;
            float *dxb = nullptr, *dyb = nullptr, *dbuf = nullptr, *ddx = nullptr;
            cudaSetDevice(0);
            RK(moe_context_create(&ctx, MOE_BACKEND_CUDA, 0, comms[(size_t)r]));
            RK(moe_layer_create(&layer, ctx, &cfg));
            RK(moe_layer_set_placement(layer, num.data(), ex.data(), nullptr));
            for (int p = 0; p < MOE_PARAM_COUNT; ++p) {
                void *v = nullptr;
                int64_t n = 0;
                RK(moe_layer_param(layer, (moe_param_t)p, &v, nullptr, &n));
                if (n == 0) continue;
                if (p == MOE_PARAM_ROUTER_WEIGHT || p == MOE_PARAM_NOISE_WEIGHT) {
                    cudaMemcpy(v, ref.param[p].data(), (size_t)n * sizeof(float),
                               cudaMemcpyHostToDevice);
                    continue;
                }
                for (int64_t le = 0; le < num[(size_t)r]; ++le)
                    cudaMemcpy((float *)v + le * per[p],
                               ref.param[p].data() + ex[(size_t)(k0[r] + le)] * per[p],
                               (size_t)per[p] * sizeof(float), cudaMemcpyHostToDevice);
            }
            cudaMalloc(&dxb, bytes + 4), cudaMalloc(&dyb, bytes + 4);
            cudaMalloc(&dbuf, bytes + 4), cudaMalloc(&ddx, bytes + 4);
            cudaMemcpy(dxb, x.data() + b * D, bytes, cudaMemcpyHostToDevice);
            cudaMemcpy(dyb, dy.data() + b * D, bytes, cudaMemcpyHostToDevice);
            RK(moe_layer_forward(layer, dxb, dbuf, Tr, 1, nullptr));
            RK(moe_layer_backward(layer, dyb, ddx, nullptr));
            RK(moe_layer_reduce_replica_grads(layer, nullptr));
            cudaDeviceSynchronize();
            o.y.resize((size_t)(Tr * D));
            o.dx.resize((size_t)(Tr * D));
            cudaMemcpy(o.y.data(), dbuf, bytes, cudaMemcpyDeviceToHost);
            cudaMemcpy(o.dx.data(), ddx, bytes, cudaMemcpyDeviceToHost);
            for (int p = 0; p < MOE_PARAM_COUNT; ++p) {
                void *g = nullptr;
                int64_t n = 0;
                RK(moe_layer_param(layer, (moe_param_t)p, nullptr, &g, &n));
                o.grad[p].resize((size_t)n);
                if (n)
                    cudaMemcpy(o.grad[p].data(), g, (size_t)n * sizeof(float),
                               cudaMemcpyDeviceToHost);
            }
        done:
            moe_layer_destroy(layer);
            moe_context_destroy(ctx);
            cudaFree(dxb), cudaFree(dyb), cudaFree(dbuf), cudaFree(ddx);
        });
    for (auto &t : th) t.join();
    for (auto *c : comms) EXPECT_EQ(moe_comm_destroy(c), 0);
    for (int r = 0; r < P; ++r) {
        const RankOut &o = out[(size_t)r];
        ASSERT_TRUE(o.error.empty()) << "rank " << r << ": " << o.error;
        int64_t b = T * r / P, Tr = T * (r + 1) / P - b;
        const size_t Dz = (size_t)D;
        if (Tr > 0) {
            EXPECT_LE(rel_err(o.y.data(), ref.y.data() + (size_t)b * Dz, (size_t)Tr * Dz), kTol);
            EXPECT_LE(rel_err(o.dx.data(), ref.dx.data() + (size_t)b * Dz, (size_t)Tr * Dz), kTol);
        }
        for (int p = MOE_PARAM_W1; p < MOE_PARAM_COUNT; ++p) {
            ASSERT_EQ(o.grad[p].size(), (size_t)(num[(size_t)r] * per[p]));
            for (int64_t le = 0; le < num[(size_t)r]; ++le)
                EXPECT_LE(rel_err(o.grad[p].data() + le * per[p],
                                  ref.grad[p].data() + ex[(size_t)(k0[r] + le)] * per[p],
                                  (size_t)per[p]),
                          kTol)
                    << "param " << p << ", slot " << le << ", rank " << r;
        }
    }
}

#ifdef MOE_TEST_NCCL
TEST(CudaEpNccl, OneRankThroughNccl) {
    REQUIRE_GPU();
    const int64_t T = 64;
    moe_layer_config_t cfg = config(4, 2);
    auto x = tokens(T, cfg.d_model, 7), dy = tokens(T, cfg.d_model, 8);
    Reference ref = reference(cfg, x, dy, T);
    ncclComm_t nc;
    int dev = 0;
    ASSERT_EQ(ncclCommInitAll(&nc, 1, &dev), ncclSuccess);
    moe_comm_t *comm = nullptr;
    ASSERT_EQ(moe_comm_create_nccl_from(&comm, &nc), MOE_STATUS_SUCCESS) << moe_last_error();
    EXPECT_EQ(moe_comm_size(comm), 1);
    RankOut out;
    gpu_rank(comm, cfg, ref, x, dy, 0, T, 0, 1, out);
    compare(cfg, ref, out, 0, T, 0, 1);
    EXPECT_EQ(moe_comm_barrier(comm), MOE_STATUS_SUCCESS) << moe_last_error();
    EXPECT_EQ(moe_comm_destroy(comm), MOE_STATUS_SUCCESS);
    ncclCommDestroy(nc);
}
#endif

// balancing strategies on the GPU against the CPU layer (one rank)
TEST(CudaBalancing, ExpertChoiceMatchesCpu) {
    REQUIRE_GPU();
    const int64_t T = 77;
    moe_layer_config_t cfg = config(8, 2);
    cfg.router = MOE_ROUTER_EXPERT_CHOICE;
    cfg.capacity_factor = 1.25;
    auto x = tokens(T, cfg.d_model, 11), dy = tokens(T, cfg.d_model, 12);
    Reference ref = reference(cfg, x, dy, T);
    RankOut out;
    gpu_rank(nullptr, cfg, ref, x, dy, 0, T, 0, 1, out);
    compare(cfg, ref, out, 0, T, 0, 1);
    ASSERT_EQ(out.grad[MOE_PARAM_ROUTER_WEIGHT].size(), ref.grad[MOE_PARAM_ROUTER_WEIGHT].size());
    EXPECT_LE(rel_err(out.grad[MOE_PARAM_ROUTER_WEIGHT].data(),
                      ref.grad[MOE_PARAM_ROUTER_WEIGHT].data(), out.grad[0].size()),
              kTol);
}

TEST(CudaBalancing, LossFreeBiasMatchesCpu) {
    REQUIRE_GPU();
    const int64_t T = 90;
    moe_layer_config_t cfg = config(8, 2);
    cfg.bias_update_rate = 0.01;
    std::vector<float> bias(8);
    for (int e = 0; e < 8; ++e) bias[(size_t)e] = (float)(e % 3) * 0.25f - 0.25f;
    auto x = tokens(T, cfg.d_model, 13), dy = tokens(T, cfg.d_model, 14);
    Reference ref = reference(cfg, x, dy, T, bias);
    RankOut out;
    gpu_rank(nullptr, cfg, ref, x, dy, 0, T, 0, 1, out, bias);
    compare(cfg, ref, out, 0, T, 0, 1);
}

// the optimizer step on the GPU runs the same per-element bodies as the CPU loop, compiled
// without FMA contraction: parameters and moments agree bit for bit after several steps
TEST(CudaOptimizer, StepsMatchTheCpuLoopBitwise) {
    REQUIRE_GPU();
    for (moe_optimizer_kind_t kind : {MOE_OPTIMIZER_SGD, MOE_OPTIMIZER_ADAM, MOE_OPTIMIZER_ADAMW}) {
        SCOPED_TRACE((int)kind);
        moe_layer_config_t cfg = config(4, 2);
        moe_context_t *cctx = nullptr, *gctx = nullptr;
        moe_layer_t *cl = nullptr, *gl = nullptr;
        ASSERT_EQ(moe_context_create(&cctx, MOE_BACKEND_CPU, 0, nullptr), 0);
        ASSERT_EQ(moe_context_create(&gctx, MOE_BACKEND_CUDA, 0, nullptr), 0) << moe_last_error();
        ASSERT_EQ(moe_layer_create(&cl, cctx, &cfg), 0);
        ASSERT_EQ(moe_layer_create(&gl, gctx, &cfg), 0) << moe_last_error();
        moe_optimizer_config_t oc = moe_optimizer_config_default(kind);
        oc.weight_decay = 0.01;
        if (kind == MOE_OPTIMIZER_SGD) oc.nesterov = 1;
        moe_optimizer_t *co = nullptr, *go = nullptr;
        ASSERT_EQ(moe_optimizer_create(&co, cl, &oc), 0) << moe_last_error();
        ASSERT_EQ(moe_optimizer_create(&go, gl, &oc), 0) << moe_last_error();
        for (int step = 0; step < 3; ++step) {
            // the same parameters (first step) and gradients on both sides
            for (int p = 0; p < MOE_PARAM_COUNT; ++p) {
                void *cv = nullptr, *cg = nullptr, *gv = nullptr, *gg = nullptr;
                int64_t n = 0;
                moe_layer_param(cl, (moe_param_t)p, &cv, &cg, &n);
                moe_layer_param(gl, (moe_param_t)p, &gv, &gg, nullptr);
                if (n == 0) continue;
                float *g = (float *)cg;
                for (int64_t i = 0; i < n; ++i)
                    g[i] = dyadic((uint32_t)(i + 977 * step), (uint32_t)p) / 8.0f;
                if (step == 0) {
                    ASSERT_EQ(cudaMemcpy(gv, cv, (size_t)n * 4, cudaMemcpyHostToDevice), 0);
                }
                ASSERT_EQ(cudaMemcpy(gg, cg, (size_t)n * 4, cudaMemcpyHostToDevice), 0);
            }
            ASSERT_EQ(moe_optimizer_step(co, nullptr), 0) << moe_last_error();
            ASSERT_EQ(moe_optimizer_step(go, nullptr), 0) << moe_last_error();
        }
        ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
        for (int p = 0; p < MOE_PARAM_COUNT; ++p) {
            void *cv = nullptr, *gv = nullptr;
            int64_t n = 0;
            moe_layer_param(cl, (moe_param_t)p, &cv, nullptr, &n);
            moe_layer_param(gl, (moe_param_t)p, &gv, nullptr, nullptr);
            std::vector<float> got((size_t)n);
            if (n) {
                ASSERT_EQ(cudaMemcpy(got.data(), gv, (size_t)n * 4, cudaMemcpyDeviceToHost), 0);
            }
            EXPECT_EQ(0, std::memcmp(got.data(), cv, (size_t)n * 4)) << "parameter " << p;
        }
        moe_optimizer_destroy(co), moe_optimizer_destroy(go);
        moe_layer_destroy(cl), moe_layer_destroy(gl);
        moe_context_destroy(cctx), moe_context_destroy(gctx);
    }
}

// replayed routing (moe_layer_force_routing) on the GPU: the same forced assignments, capacity
// drops and output as the CPU layer with the same parameters
TEST(CudaTrace, ForcedRoutingMatchesCpu) {
    REQUIRE_GPU();
    const int64_t T = 150, E = 8, K = 2;
    moe_layer_config_t cfg = config(E, K);
    cfg.capacity_factor = 0.75;  // drops, decided by score order
    cfg.priority = MOE_PRIORITY_SCORE;
    auto x = tokens(T, cfg.d_model, 21);
    std::vector<int32_t> idx((size_t)(T * K));
    std::vector<float> gate((size_t)(T * K));
    for (int64_t t = 0; t < T; ++t) {  // skewed on purpose: expert 0 is over capacity
        idx[(size_t)(t * K)] = (int32_t)(t % 3 == 0 ? 0 : t % E);
        idx[(size_t)(t * K + 1)] = (int32_t)((idx[(size_t)(t * K)] + 1 + t % 5) % E);
        gate[(size_t)(t * K)] = 0.5f + (float)(t % 7) / 16.0f;
        gate[(size_t)(t * K + 1)] = 1.0f - gate[(size_t)(t * K)];
    }
    moe_context_t *cctx = nullptr, *gctx = nullptr;
    moe_layer_t *cl = nullptr, *gl = nullptr;
    ASSERT_EQ(moe_context_create(&cctx, MOE_BACKEND_CPU, 0, nullptr), 0);
    ASSERT_EQ(moe_context_create(&gctx, MOE_BACKEND_CUDA, 0, nullptr), 0) << moe_last_error();
    ASSERT_EQ(moe_layer_create(&cl, cctx, &cfg), 0);
    ASSERT_EQ(moe_layer_create(&gl, gctx, &cfg), 0) << moe_last_error();
    for (int p = 0; p < MOE_PARAM_COUNT; ++p) {
        void *cv = nullptr, *gv = nullptr;
        int64_t n = 0;
        moe_layer_param(cl, (moe_param_t)p, &cv, nullptr, &n);
        moe_layer_param(gl, (moe_param_t)p, &gv, nullptr, nullptr);
        if (n) {
            ASSERT_EQ(cudaMemcpy(gv, cv, (size_t)n * 4, cudaMemcpyHostToDevice), 0);
        }
    }
    const size_t bytes = x.size() * sizeof(float);
    std::vector<float> yc(x.size()), yg(x.size());
    float *dx_ = nullptr, *dy_ = nullptr;
    ASSERT_EQ(cudaMalloc(&dx_, bytes), 0);
    ASSERT_EQ(cudaMalloc(&dy_, bytes), 0);
    ASSERT_EQ(cudaMemcpy(dx_, x.data(), bytes, cudaMemcpyHostToDevice), 0);
    ASSERT_EQ(moe_layer_force_routing(cl, idx.data(), gate.data(), T), 0);
    ASSERT_EQ(moe_layer_force_routing(gl, idx.data(), gate.data(), T), 0);
    ASSERT_EQ(moe_layer_forward(cl, x.data(), yc.data(), T, 1, nullptr), 0) << moe_last_error();
    ASSERT_EQ(moe_layer_forward(gl, dx_, dy_, T, 1, nullptr), 0) << moe_last_error();
    ASSERT_EQ(cudaMemcpy(yg.data(), dy_, bytes, cudaMemcpyDeviceToHost), 0);
    std::vector<int32_t> ic((size_t)(T * K)), ig((size_t)(T * K)), kc((size_t)(T * K)),
        kg((size_t)(T * K));
    ASSERT_EQ(moe_layer_routing(cl, ic.data(), nullptr, kc.data()), 0);
    ASSERT_EQ(moe_layer_routing(gl, ig.data(), nullptr, kg.data()), 0);
    EXPECT_EQ(ic, idx);
    EXPECT_EQ(ig, idx);
    EXPECT_EQ(kg, kc);
    int64_t dropped = 0;
    for (int32_t k : kc) dropped += !k;
    EXPECT_GT(dropped, 0) << "the case must exercise capacity";
    EXPECT_LE(rel_err(yg.data(), yc.data(), yc.size()), kTol);
    cudaFree(dx_), cudaFree(dy_);
    moe_layer_destroy(cl), moe_layer_destroy(gl);
    moe_context_destroy(cctx), moe_context_destroy(gctx);
}

TEST(CudaEpNccl, NullCommunicatorIsRefused) {
    // no GPU needed: refused before anything touches a device
    moe_comm_t *comm = nullptr;
    moe_status_t st = moe_comm_create_nccl_from(&comm, nullptr);
    EXPECT_TRUE(st == MOE_STATUS_INVALID_ARGUMENT || st == MOE_STATUS_NOT_SUPPORTED) << st;
    EXPECT_EQ(comm, nullptr);
}

}  // namespace
