// ep_faults.h - shared by the fault tests of expert parallelism (local threads and MPI
// processes): the layer they use and the training sequence whose comm calls fail in turn.
#pragma once

#include <gtest/gtest.h>

#include <chrono>
#include <string>
#include <vector>

#include "ep_common.h"
#include "moe/moe.h"

namespace ep {

inline double now_s() {
    return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch())
        .count();
}

inline moe_layer_config_t config() {
    moe_layer_config_t c = small_config(6, 2);
    c.bias_update_rate = 0.01;  // loss-free balancing: one more thing that must stay in step
    return c;
}

// The sequence one rank runs: create, a replicated placement, two training steps (forward,
// backward, router all-reduce, replica sum, AdamW step), a mask, a rebalance, an inference
// forward whose y lands in out, a barrier; stops at the first error, which it returns. Every handle is
// destroyed whatever happened.
inline moe_status_t sequence(int r, int P, moe_comm_t *comm, std::vector<float> &buf) {
    moe_layer_config_t cfg = config();
    const int64_t T = 5 + r, D = cfg.d_model;
    std::vector<float> x = ep::make_tokens(T, D, 9 + r), y(x.size()), dx(x.size());
    moe_context_t *ctx = nullptr;
    moe_layer_t *layer = nullptr;
    moe_optimizer_t *opt = nullptr;
    moe_status_t st = moe_context_create(&ctx, MOE_BACKEND_CPU, 0, comm);
    if (st == MOE_STATUS_SUCCESS) st = moe_layer_create(&layer, ctx, &cfg);
    if (st == MOE_STATUS_SUCCESS) {
        moe_optimizer_config_t oc = moe_optimizer_config_default(MOE_OPTIMIZER_ADAMW);
        st = moe_optimizer_create(&opt, layer, &oc);
    }
    // a replicated placement: expert 0 on every rank, the rest split
    std::vector<int64_t> num(P, 0);
    std::vector<int32_t> ex;
    for (int q = 0; q < P; ++q) {
        const size_t before = ex.size();
        ex.push_back(0);
        for (int32_t e = 1; e < 6; ++e)
            if ((e - 1) % P == q) ex.push_back(e);
        num[q] = (int64_t)(ex.size() - before);
    }
    if (st == MOE_STATUS_SUCCESS) st = moe_layer_set_placement(layer, num.data(), ex.data(), opt);
    for (int step = 0; step < 2 && st == MOE_STATUS_SUCCESS; ++step) {
        st = moe_layer_zero_grad(layer, nullptr);
        if (st == MOE_STATUS_SUCCESS) st = moe_layer_forward(layer, x.data(), y.data(), T, 1, nullptr);
        if (st == MOE_STATUS_SUCCESS) st = moe_layer_backward(layer, y.data(), dx.data(), nullptr);
        if (st == MOE_STATUS_SUCCESS) st = moe_layer_allreduce_router_grads(layer, nullptr);
        if (st == MOE_STATUS_SUCCESS) st = moe_layer_reduce_replica_grads(layer, nullptr);
        if (st == MOE_STATUS_SUCCESS) st = moe_optimizer_step(opt, nullptr);
    }
    std::vector<uint8_t> mask(6, 1);
    if (st == MOE_STATUS_SUCCESS) st = moe_layer_set_expert_mask(layer, mask.data());
    if (st == MOE_STATUS_SUCCESS) st = moe_layer_rebalance(layer, 1, opt, nullptr, nullptr);
    if (st == MOE_STATUS_SUCCESS) st = moe_layer_forward(layer, x.data(), y.data(), T, 0, nullptr);
    // a last collective: a fault in the wait of an exchange the faulty rank had posted leaves
    // the peers with their data (their call succeeds); they learn of it at the next collective
    if (st == MOE_STATUS_SUCCESS) st = moe_comm_barrier(comm);
    if (st == MOE_STATUS_SUCCESS) buf = y;
    moe_status_t ret = st;
    std::string msg = moe_last_error();
    EXPECT_EQ(moe_optimizer_destroy(opt), MOE_STATUS_SUCCESS);
    EXPECT_EQ(moe_layer_destroy(layer), MOE_STATUS_SUCCESS);
    EXPECT_EQ(moe_context_destroy(ctx), MOE_STATUS_SUCCESS);
    if (ret != MOE_STATUS_SUCCESS) {
        EXPECT_FALSE(msg.empty());
    }
    return ret;
}

}  // namespace ep
