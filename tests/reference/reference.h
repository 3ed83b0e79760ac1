// reference.h - a naive float64 model of one MoE layer, transcribed from docs/semantics.md.
//
// Independent of the library's implementation: plain loops per token and per choice, every sum in
// double. Only the gating noise eps is taken from core/philox.h (the same f32 values the library
// draws), because the spec defines it as a bit-exact stream. Used by every comparison test and
// checked itself by finite differences (test_gradcheck.cc).
#ifndef MOE_TESTS_REFERENCE_H
#define MOE_TESTS_REFERENCE_H

#include <cstdint>
#include <vector>

#include "moe/moe.h"

namespace moeref {

// Result of one forward: outputs, routing, stats and the intermediates backward needs.
struct Forward {
    int64_t T = 0;
    bool noisy = false;                 // noise on for this call (noisy_gating && training)
    std::vector<double> y;              // (T, D)
    std::vector<int32_t> idx;           // (T, K) chosen experts, best first
    std::vector<double> gate;           // (T, K)
    std::vector<int32_t> kept;          // (T, K) 1 kept, 0 dropped
    std::vector<int64_t> counts;        // (E) assignments before dropping
    std::vector<int64_t> dropped;       // (E)
    int64_t num_dropped = 0;
    int64_t capacity = -1;              // -1 dropless
    double switch_loss = 0, importance_loss = 0, load_loss = 0, z_loss = 0, aux_loss = 0;
    double imbalance = 0;
    // decisions that a f32 evaluation could take differently (near-ties): top-k order or set,
    // SCORE order at a capacity boundary. The comparison tests retry another input if any.
    int64_t num_fragile = 0;
    // intermediates
    std::vector<double> logits, raw, sigma, eps, h;  // (T, E); raw/sigma/eps only when noisy
    std::vector<double> p;                           // (T, E) softmax of the clean logits
    std::vector<double> lse;                         // (T)
    std::vector<double> importance, load;            // (E)
    std::vector<int32_t> order;                      // (T, E) experts sorted by h, best first
    // routing extensions
    std::vector<uint8_t> avail;                      // (E) expert availability of this call
    int64_t num_available = 0;
    // hierarchical routing (reference_hier.cc): logits holds the secondary logits of every
    // group, lse the primary logsumexp
    std::vector<double> logits1;              // (T, G) primary logits
    std::vector<int32_t> grp;                 // (T, k1) chosen groups, best first
    std::vector<double> g1, g2;               // (T, k1) primary gates, (T, K) secondary gates
    std::vector<double> n1, imp1, imp2;       // (G) tokens per group, (G), (E) importances
    double level_switch[2] = {0, 0}, level_importance[2] = {0, 0};
    double level_load[2] = {0, 0}, level_z[2] = {0, 0};
    // shared experts (cfg.num_shared_experts > 0): sum_s FFN_s(x) (T, D) and the gate (T)
    std::vector<double> shared_out, shared_gate;
    // per-expert outputs (moe_layer_forward_experts): FFN_{idx_j}(x[t]) (T, K, D) and g[t, j]
    // (T, K), zero rows and gates for dropped assignments
    std::vector<double> y_experts, gate_out;
};

struct Grads {
    std::vector<double> param[MOE_PARAM_COUNT];  // same shapes as the parameters (empty if off)
    std::vector<double> dx;                      // (T, D)
};

// The layer's config and a double copy of its parameters.
struct Model {
    moe_layer_config_t cfg{};
    int64_t D = 0, F = 0, F2 = 0, E = 0, K = 0;
    std::vector<double> param[MOE_PARAM_COUNT];
    // routing extensions: the selection bias (E, empty = 0), the user's expert mask (E, empty =
    // all available) and the dropout counter (earlier training forwards of the layer)
    std::vector<double> score_bias;
    std::vector<uint8_t> mask;
    uint64_t drop_call = 0;

    // Copies config and parameters out of a (CPU) library layer (and its selection bias and
    // expert mask).
    static Model from_layer(moe_layer_t *layer);
    // Loss the backward differentiates: sum(dy * y) + aux_loss.
    static double total_loss(const Forward &f, const std::vector<double> &dy);

    // call: the noise counter (the number of earlier noisy training forwards of the layer).
    // tol: half-width of the near-tie band used for num_fragile (absolute, on h and on gates).
    Forward forward(const std::vector<double> &x, int64_t T, bool training, uint64_t call,
                    double tol = 2e-5) const;
    Grads backward(const Forward &f, const std::vector<double> &x,
                   const std::vector<double> &dy) const;

    // the capacity walk and the combine from f.idx and f.gate (shared by the routers)
    void route_combine(Forward &f, const std::vector<double> &x, double tol) const;
    // hierarchical routing (reference_hier.cc): forward, and the backward of both gate levels
    // and their losses from dgate (the gradient of the product gates)
    Forward forward_hier(const std::vector<double> &x, int64_t T, double tol) const;
    void backward_hier(const Forward &f, const std::vector<double> &x,
                       std::vector<double> &dgate, Grads *g) const;
    // Backward from the gradients of the per-expert outputs, dye (T, K, D) and dge (T, K): of
    // sum(dye * y_experts) + sum(dge * gate_out) + aux_loss (no shared experts).
    Grads backward_experts(const Forward &f, const std::vector<double> &x,
                           const std::vector<double> &dye, const std::vector<double> &dge) const;
    static double total_loss_experts(const Forward &f, const std::vector<double> &dye,
                                     const std::vector<double> &dge);
    // both: dye null for the fused backward
    Grads backward_impl(const Forward &f, const std::vector<double> &x,
                        const std::vector<double> *dy, const std::vector<double> *dye,
                        const std::vector<double> *dge) const;
};

// CV^2 of v (population variance over mean^2 + 1e-10) and its gradient (may be null).
double cv2(const std::vector<double> &v, std::vector<double> *grad);

}  // namespace moeref

#endif
