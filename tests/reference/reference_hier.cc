// reference_hier.cc - hierarchical gating in float64 (docs/semantics.md, "Hierarchical gating"):
// the primary gate over G groups, each group's secondary gate over its E/G experts, the product
// gates, both levels' aux losses, and the analytic backward of all of it. Plain loops per token,
// full Jacobians, every sum in double; the capacity walk, combine and the expert backward are
// the flat reference's.
#include <algorithm>
#include <cmath>
#include <numeric>

#include "reference/reference.h"

namespace moeref {
namespace {

struct Shape {
    int64_t G, k1, k2, Eg;
};

Shape shape_of(const moe_layer_config_t &c) {
    Shape s;
    s.G = c.num_groups;
    s.k1 = c.topk_group;
    s.k2 = c.top_k / c.topk_group;
    s.Eg = c.num_experts / c.num_groups;
    return s;
}

// softmax of n values into p; returns logsumexp
double softmax(const double *v, int64_t n, double *p) {
    double m = *std::max_element(v, v + n), z = 0;
    for (int64_t i = 0; i < n; ++i) z += std::exp(v[i] - m);
    for (int64_t i = 0; i < n; ++i) p[i] = std::exp(v[i] - m) / z;
    return m + std::log(z);
}

// top k of h (n values) best first, ties to the lower index; counts a near-tie in *fragile
std::vector<int32_t> topk(const double *h, int64_t n, int64_t k, double tol, int64_t *fragile) {
    std::vector<int32_t> ord(n);
    std::iota(ord.begin(), ord.end(), 0);
    std::stable_sort(ord.begin(), ord.end(), [h](int32_t a, int32_t b) { return h[a] > h[b]; });
    int64_t last = k < n ? k : k - 1;
    for (int64_t j = 0; j < last; ++j)
        if (h[ord[j]] - h[ord[j + 1]] < tol * (1.0 + std::fabs(h[ord[j]]))) {
            ++*fragile;
            break;
        }
    ord.resize(k);
    return ord;
}

// gates of the k selected of h (n values), by the config's gate order
void gates(const moe_layer_config_t &c, const double *h, int64_t n, const int32_t *sel,
           int64_t k, double *g) {
    double mx = *std::max_element(h, h + n), z = 0;
    if (c.gate == MOE_GATE_SOFTMAX_OF_TOPK || c.renormalize)
        for (int64_t j = 0; j < k; ++j) z += std::exp(h[sel[j]] - mx);
    else
        for (int64_t e = 0; e < n; ++e) z += std::exp(h[e] - mx);
    for (int64_t j = 0; j < k; ++j) g[j] = std::exp(h[sel[j]] - mx) / z;
}

// dh (n) += d(sum_j dg_j g_j)/dh through the gate order, full Jacobian
void gates_bwd(const moe_layer_config_t &c, const double *h, int64_t n, const int32_t *sel,
               int64_t k, const double *g, const double *dg, double *dh) {
    if (c.gate == MOE_GATE_SOFTMAX_OF_TOPK || c.renormalize) {
        for (int64_t j = 0; j < k; ++j)
            for (int64_t i = 0; i < k; ++i)
                dh[sel[i]] += dg[j] * g[j] * ((i == j ? 1.0 : 0.0) - g[i]);
        return;
    }
    std::vector<double> p(n);
    softmax(h, n, p.data());
    for (int64_t j = 0; j < k; ++j)
        for (int64_t e = 0; e < n; ++e)
            dh[e] += dg[j] * p[sel[j]] * ((sel[j] == e ? 1.0 : 0.0) - p[e]);
}

}  // namespace

Forward Model::forward_hier(const std::vector<double> &x, int64_t T, double tol) const {
    const Shape s = shape_of(cfg);
    const int64_t G = s.G, k1 = s.k1, k2 = s.k2, Eg = s.Eg;
    const std::vector<double> &Wp = param[MOE_PARAM_ROUTER_WEIGHT];
    const std::vector<double> &Ws = param[MOE_PARAM_SECONDARY_ROUTER_WEIGHT];
    Forward f;
    f.T = T;
    f.logits1.assign(T * G, 0.0);
    f.logits.assign(T * E, 0.0);
    f.lse.assign(T, 0.0);
    f.grp.assign(T * k1, 0);
    f.g1.assign(T * k1, 0.0);
    f.g2.assign(T * K, 0.0);
    f.idx.assign(T * K, 0);
    f.gate.assign(T * K, 0.0);
    for (int64_t t = 0; t < T; ++t) {
        for (int64_t g = 0; g < G; ++g) {
            double v = 0;
            for (int64_t d = 0; d < D; ++d) v += x[t * D + d] * Wp[d * G + g];
            f.logits1[t * G + g] = v;
        }
        for (int64_t g = 0; g < G; ++g)
            for (int64_t e = 0; e < Eg; ++e) {
                double v = 0;
                for (int64_t d = 0; d < D; ++d) v += x[t * D + d] * Ws[(g * D + d) * Eg + e];
                f.logits[t * E + g * Eg + e] = v;
            }
    }
    f.h = f.logits;
    std::vector<double> p(std::max(G, Eg));
    for (int64_t t = 0; t < T; ++t) {
        const double *l1 = &f.logits1[t * G];
        std::vector<int32_t> grp = topk(l1, G, k1, tol, &f.num_fragile);
        gates(cfg, l1, G, grp.data(), k1, &f.g1[t * k1]);
        f.lse[t] = softmax(l1, G, p.data());
        for (int64_t j1 = 0; j1 < k1; ++j1) {
            const int64_t g = grp[j1];
            f.grp[t * k1 + j1] = (int32_t)g;
            const double *l2 = &f.logits[t * E + g * Eg];
            std::vector<int32_t> sel = topk(l2, Eg, k2, tol, &f.num_fragile);
            gates(cfg, l2, Eg, sel.data(), k2, &f.g2[t * K + j1 * k2]);
            for (int64_t j2 = 0; j2 < k2; ++j2) {
                const int64_t j = j1 * k2 + j2;
                f.idx[t * K + j] = (int32_t)(g * Eg + sel[j2]);
                f.gate[t * K + j] = f.g1[t * k1 + j1] * f.g2[t * K + j];
            }
        }
    }

    route_combine(f, x, tol);

    // primary level: the groups as the experts of a flat router with k1 choices
    f.n1.assign(G, 0.0);
    f.imp1.assign(G, 0.0);
    std::vector<double> P1(G, 0.0), prob2(E, 0.0);
    f.imp2.assign(E, 0.0);
    double z1 = 0, z2 = 0;
    for (int64_t t = 0; t < T; ++t) {
        softmax(&f.logits1[t * G], G, p.data());
        for (int64_t g = 0; g < G; ++g) P1[g] += p[g] / (double)T;
        z1 += f.lse[t] * f.lse[t];
        for (int64_t j1 = 0; j1 < k1; ++j1) {
            const int64_t g = f.grp[t * k1 + j1];
            f.n1[g] += 1.0;
            f.imp1[g] += f.g1[t * k1 + j1];
            double lse2 = softmax(&f.logits[t * E + g * Eg], Eg, p.data());
            for (int64_t e = 0; e < Eg; ++e) prob2[g * Eg + e] += p[e];
            z2 += lse2 * lse2;
        }
        for (int64_t j = 0; j < K; ++j) f.imp2[f.idx[t * K + j]] += f.g2[t * K + j];
    }
    double sw1 = 0;
    for (int64_t g = 0; g < G; ++g) sw1 += f.n1[g] / (double)(T * k1) * P1[g];
    f.level_switch[0] = (double)G * sw1;
    f.level_importance[0] = cv2(f.imp1, nullptr);
    f.level_load[0] = cv2(f.n1, nullptr);
    f.level_z[0] = z1 / (double)T;

    // secondary level: per group over its experts and the tokens that chose it, mean over groups
    double sw2 = 0, i2 = 0, ld2 = 0;
    for (int64_t g = 0; g < G; ++g) {
        const double n = f.n1[g];
        std::vector<double> imp(Eg), cnt(Eg);
        double sg = 0;
        for (int64_t e = 0; e < Eg; ++e) {
            imp[e] = f.imp2[g * Eg + e];
            cnt[e] = (double)f.counts[g * Eg + e];
            if (n > 0) sg += cnt[e] / (n * (double)k2) * prob2[g * Eg + e] / n;
        }
        sw2 += (double)Eg * sg;
        i2 += cv2(imp, nullptr);
        ld2 += cv2(cnt, nullptr);
    }
    f.level_switch[1] = sw2 / (double)G;
    f.level_importance[1] = i2 / (double)G;
    f.level_load[1] = ld2 / (double)G;
    f.level_z[1] = z2 / (double)(T * k1);

    f.switch_loss = f.level_switch[0] + f.level_switch[1];
    f.importance_loss = f.level_importance[0] + f.level_importance[1];
    f.load_loss = f.level_load[0] + f.level_load[1];
    f.z_loss = f.level_z[0] + f.level_z[1];
    f.aux_loss = cfg.switch_loss_coef * f.switch_loss +
                 cfg.importance_loss_coef * f.importance_loss + cfg.load_loss_coef * f.load_loss +
                 cfg.z_loss_coef * f.z_loss;
    double mx = 0, sum = 0;
    for (int64_t e = 0; e < E; ++e) {
        mx = std::max(mx, (double)f.counts[e]);
        sum += (double)f.counts[e];
    }
    f.imbalance = sum > 0 ? mx / (sum / (double)E) : 0.0;
    return f;
}

void Model::backward_hier(const Forward &f, const std::vector<double> &x,
                          std::vector<double> &dgate, Grads *gr) const {
    const Shape s = shape_of(cfg);
    const int64_t T = f.T, G = s.G, k1 = s.k1, k2 = s.k2, Eg = s.Eg;
    // importance losses of both levels: d/dg1 and d/dg2
    std::vector<double> gi1(G, 0.0), gi2(E, 0.0);
    if (cfg.importance_loss_coef != 0) {
        cv2(f.imp1, &gi1);
        for (int64_t g = 0; g < G; ++g) {
            std::vector<double> imp(f.imp2.begin() + g * Eg, f.imp2.begin() + (g + 1) * Eg), gg;
            cv2(imp, &gg);
            for (int64_t e = 0; e < Eg; ++e) gi2[g * Eg + e] = gg[e] / (double)G;
        }
    }
    std::vector<double> dl1(T * G, 0.0), dl2(T * E, 0.0), p(std::max(G, Eg));
    for (int64_t t = 0; t < T; ++t) {
        std::vector<double> dg1(k1, 0.0), dg2(K, 0.0);
        for (int64_t j1 = 0; j1 < k1; ++j1) {
            for (int64_t j2 = 0; j2 < k2; ++j2) {
                const int64_t j = j1 * k2 + j2;
                dg1[j1] += dgate[t * K + j] * f.g2[t * K + j];
                dg2[j] = dgate[t * K + j] * f.g1[t * k1 + j1] +
                         cfg.importance_loss_coef * gi2[f.idx[t * K + j]];
            }
            dg1[j1] += cfg.importance_loss_coef * gi1[f.grp[t * k1 + j1]];
        }
        const double *l1 = &f.logits1[t * G];
        gates_bwd(cfg, l1, G, &f.grp[t * k1], k1, &f.g1[t * k1], dg1.data(), &dl1[t * G]);
        // switch and z of the primary level
        softmax(l1, G, p.data());
        for (int64_t e = 0; e < G; ++e) {
            for (int64_t k = 0; k < G; ++k) {
                double fk = f.n1[k] / (double)(T * k1);
                dl1[t * G + e] += cfg.switch_loss_coef * (double)G / (double)T * fk * p[k] *
                                  ((k == e ? 1.0 : 0.0) - p[e]);
            }
            dl1[t * G + e] += cfg.z_loss_coef * 2.0 * f.lse[t] / (double)T * p[e];
        }
        for (int64_t j1 = 0; j1 < k1; ++j1) {
            const int64_t g = f.grp[t * k1 + j1];
            const double *l2 = &f.logits[t * E + g * Eg];
            double *d2 = &dl2[t * E + g * Eg];
            std::vector<int32_t> sel(k2);
            for (int64_t j2 = 0; j2 < k2; ++j2)
                sel[j2] = (int32_t)(f.idx[t * K + j1 * k2 + j2] - g * Eg);
            gates_bwd(cfg, l2, Eg, sel.data(), k2, &f.g2[t * K + j1 * k2], &dg2[j1 * k2], d2);
            // switch and z of the secondary level: group g, its n1[g] tokens
            const double n = f.n1[g];
            double lse2 = softmax(l2, Eg, p.data());
            for (int64_t e = 0; e < Eg; ++e) {
                for (int64_t k = 0; k < Eg; ++k) {
                    double fk = (double)f.counts[g * Eg + k] / (n * (double)k2);
                    d2[e] += cfg.switch_loss_coef * (double)Eg / (double)G * fk / n * p[k] *
                             ((k == e ? 1.0 : 0.0) - p[e]);
                }
                d2[e] += cfg.z_loss_coef * 2.0 * lse2 / (double)(T * k1) * p[e];
            }
        }
    }
    // l1 = x Wp;  l2_g = x Ws_g
    const std::vector<double> &Wp = param[MOE_PARAM_ROUTER_WEIGHT];
    const std::vector<double> &Ws = param[MOE_PARAM_SECONDARY_ROUTER_WEIGHT];
    std::vector<double> &dWp = gr->param[MOE_PARAM_ROUTER_WEIGHT];
    std::vector<double> &dWs = gr->param[MOE_PARAM_SECONDARY_ROUTER_WEIGHT];
    for (int64_t t = 0; t < T; ++t)
        for (int64_t d = 0; d < D; ++d) {
            const double xd = x[t * D + d];
            for (int64_t g = 0; g < G; ++g) {
                dWp[d * G + g] += xd * dl1[t * G + g];
                gr->dx[t * D + d] += Wp[d * G + g] * dl1[t * G + g];
                for (int64_t e = 0; e < Eg; ++e) {
                    const double v = dl2[t * E + g * Eg + e];
                    dWs[(g * D + d) * Eg + e] += xd * v;
                    gr->dx[t * D + d] += Ws[(g * D + d) * Eg + e] * v;
                }
            }
        }
}

}  // namespace moeref
