// test_gradcheck.cc - central finite differences of the float64 reference: the analytic backward
// (expert FFN, gates, every aux loss, the noise network) against d(sum dy*y + aux_loss)/dtheta.
#include <gtest/gtest.h>

#include "reference/reference.h"
#include "test_util.h"

using moeref::Forward;
using moeref::Model;

namespace {

struct GradCase {
    const char *name;
    moe_activation_t act;
    moe_gate_t gate;
    int renorm, noisy, bias;
    int64_t E, K;
    double capacity;
    moe_priority_t prio;
    double sw, imp, load, z;
    bool dy_zero;  // check the aux-loss gradient alone
};

void PrintTo(const GradCase &c, std::ostream *os) { *os << c.name; }

class GradCheck : public ::testing::TestWithParam<GradCase> {};

bool same_routing(const Forward &a, const Forward &b) {
    return a.idx == b.idx && a.kept == b.kept;
}

TEST_P(GradCheck, ReferenceBackwardMatchesCentralDifferences) {
    const GradCase &c = GetParam();
    const int64_t D = 5, F = 4, T = 9;
    moe_layer_config_t cfg = moetest::small_config(D, F, c.E, c.K);
    cfg.activation = c.act;
    cfg.gate = c.gate;
    cfg.renormalize = c.renorm;
    cfg.noisy_gating = c.noisy;
    cfg.expert_bias = c.bias;
    cfg.capacity_factor = c.capacity;
    cfg.priority = c.prio;
    cfg.switch_loss_coef = c.sw;
    cfg.importance_loss_coef = c.imp;
    cfg.load_loss_coef = c.load;
    cfg.z_loss_coef = c.z;
    cfg.seed = 99;
    moetest::Layer L(cfg);
    ASSERT_EQ(L.status, MOE_STATUS_SUCCESS) << moe_last_error();
    Model m = Model::from_layer(L);
    // Wn starts at 0: give the noise network something to differentiate; scale Wg up so the
    // router is not flat
    if (c.noisy) m.param[MOE_PARAM_NOISE_WEIGHT] = moetest::to_double(moetest::uniform(D * c.E, 5, -0.6f, 0.6f));
    m.param[MOE_PARAM_ROUTER_WEIGHT] = moetest::to_double(moetest::uniform(D * c.E, 6, -1.0f, 1.0f));
    std::vector<double> x = moetest::to_double(moetest::uniform(T * D, 7));
    std::vector<double> dy = moetest::to_double(moetest::uniform(T * D, 8));
    if (c.dy_zero) std::fill(dy.begin(), dy.end(), 0.0);
    const uint64_t call = 3;  // any fixed counter: the noise is a constant of the loss

    Forward base = m.forward(x, T, true, call);
    moeref::Grads g = m.backward(base, x, dy);
    if (c.noisy) {
        ASSERT_TRUE(base.noisy);
    }
    ASSERT_GT(base.aux_loss, 0.0);

    const double h = 1e-6;
    int skipped = 0, checked = 0;
    // one entry per differentiable tensor: the parameters, then x
    for (int p = 0; p <= MOE_PARAM_COUNT; ++p) {
        std::vector<double> &theta = p < MOE_PARAM_COUNT ? m.param[p] : x;
        const std::vector<double> &an = p < MOE_PARAM_COUNT ? g.param[p] : g.dx;
        ASSERT_EQ(theta.size(), an.size());
        double max_an = 0, max_err = 0;
        for (size_t i = 0; i < theta.size(); ++i) {
            double keep = theta[i];
            theta[i] = keep + h;
            Forward fp = m.forward(x, T, true, call);
            theta[i] = keep - h;
            Forward fm = m.forward(x, T, true, call);
            theta[i] = keep;
            // routing must not flip inside [-h, h] (top-k and capacity are piecewise constant)
            if (!same_routing(fp, base) || !same_routing(fm, base)) {
                ++skipped;
                continue;
            }
            double fd = (Model::total_loss(fp, dy) - Model::total_loss(fm, dy)) / (2 * h);
            max_an = std::max(max_an, std::fabs(an[i]));
            max_err = std::max(max_err, std::fabs(fd - an[i]));
            ++checked;
        }
        // FD error: truncation ~h^2 |f'''| ~1e-12, rounding ~1e-16 |L| / h ~1e-9; the analytic
        // value is exact to ~1e-14. 1e-6 relative (floor 1e-8) leaves ample margin and still
        // catches a missing factor or a dropped term.
        EXPECT_LE(max_err, 1e-6 * max_an + 1e-8)
            << (p < MOE_PARAM_COUNT ? moetest::param_name(p) : "x") << " max|grad| " << max_an;
    }
    EXPECT_LE(skipped, 2) << "coordinates whose routing flipped within +-h";
    EXPECT_GT(checked, 50);
}

const GradCase kGradCases[] = {
    // name, act, gate, renorm, noisy, bias, E, K, capacity, prio, sw, imp, load, z, dy_zero
    {"gelu_topk_noisy_all", MOE_ACTIVATION_GELU, MOE_GATE_SOFTMAX_OF_TOPK, 1, 1, 1, 4, 2, 0.0,
     MOE_PRIORITY_POSITION, 0.3, 0.2, 0.4, 0.1, false},
    {"swiglu_softmax_raw_noisy_cap", MOE_ACTIVATION_SWIGLU, MOE_GATE_TOPK_OF_SOFTMAX, 0, 1, 1, 4, 2,
     1.0, MOE_PRIORITY_SCORE, 0.3, 0.2, 0.4, 0.1, false},
    {"silu_softmax_renorm_cap_half", MOE_ACTIVATION_SILU, MOE_GATE_TOPK_OF_SOFTMAX, 1, 0, 0, 4, 2,
     0.5, MOE_PRIORITY_POSITION, 0.3, 0.2, 0.4, 0.1, false},
    {"relu_k_eq_e_noisy", MOE_ACTIVATION_RELU, MOE_GATE_TOPK_OF_SOFTMAX, 0, 1, 1, 4, 4, 0.0,
     MOE_PRIORITY_POSITION, 0.3, 0.2, 0.4, 0.1, false},
    {"gelu_k1_noisy", MOE_ACTIVATION_GELU, MOE_GATE_TOPK_OF_SOFTMAX, 0, 1, 1, 4, 1, 0.0,
     MOE_PRIORITY_POSITION, 0.3, 0.2, 0.4, 0.1, false},
    {"silu_k3_e6_noisy_cap2", MOE_ACTIVATION_SILU, MOE_GATE_SOFTMAX_OF_TOPK, 1, 1, 0, 6, 3, 2.0,
     MOE_PRIORITY_SCORE, 0.3, 0.2, 0.4, 0.1, false},
    // each aux loss alone, with dy = 0 so nothing hides it
    {"switch_only", MOE_ACTIVATION_GELU, MOE_GATE_SOFTMAX_OF_TOPK, 1, 1, 1, 4, 2, 0.0,
     MOE_PRIORITY_POSITION, 1.0, 0, 0, 0, true},
    {"importance_only", MOE_ACTIVATION_GELU, MOE_GATE_SOFTMAX_OF_TOPK, 1, 1, 1, 4, 2, 0.0,
     MOE_PRIORITY_POSITION, 0, 1.0, 0, 0, true},
    {"importance_only_raw_softmax", MOE_ACTIVATION_GELU, MOE_GATE_TOPK_OF_SOFTMAX, 0, 1, 1, 4, 2,
     0.0, MOE_PRIORITY_POSITION, 0, 1.0, 0, 0, true},
    {"load_only", MOE_ACTIVATION_GELU, MOE_GATE_SOFTMAX_OF_TOPK, 1, 1, 1, 4, 2, 0.0,
     MOE_PRIORITY_POSITION, 0, 0, 1.0, 0, true},
    {"load_only_k1", MOE_ACTIVATION_GELU, MOE_GATE_SOFTMAX_OF_TOPK, 1, 1, 1, 4, 1, 0.0,
     MOE_PRIORITY_POSITION, 0, 0, 1.0, 0, true},
    {"z_only", MOE_ACTIVATION_GELU, MOE_GATE_SOFTMAX_OF_TOPK, 1, 0, 1, 4, 2, 0.0,
     MOE_PRIORITY_POSITION, 0, 0, 0, 1.0, true},
};

INSTANTIATE_TEST_SUITE_P(Reference, GradCheck, ::testing::ValuesIn(kGradCases),
                         [](const ::testing::TestParamInfo<GradCase> &i) {
                             return std::string(i.param.name);
                         });

}  // namespace
