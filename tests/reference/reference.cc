// reference.cc - the float64 MoE layer of docs/semantics.md: forward and analytic backward.
#include "reference/reference.h"

#include <algorithm>
#include <cmath>
#include <functional>
#include <numeric>

#include "core/philox.h"  // only the noise stream eps (moe_gating_noise)

namespace moeref {
namespace {

double sigmoid(double v) { return 1.0 / (1.0 + std::exp(-v)); }
double softplus(double v) { return v > 30.0 ? v : std::log1p(std::exp(v)); }
double norm_cdf(double z) { return 0.5 * std::erfc(-z / std::sqrt(2.0)); }
double norm_pdf(double z) { return std::exp(-0.5 * z * z) / std::sqrt(2.0 * M_PI); }

double act_fwd(int act, double v) {
    switch (act) {
    case MOE_ACTIVATION_RELU: return v > 0 ? v : 0.0;
    case MOE_ACTIVATION_GELU: return 0.5 * v * (1.0 + std::erf(v / std::sqrt(2.0)));
    case MOE_ACTIVATION_IDENTITY: return v;
    default: return v * sigmoid(v);  // SILU (and the gate half of SWIGLU)
    }
}

double act_grad(int act, double v) {
    switch (act) {
    case MOE_ACTIVATION_RELU: return v > 0 ? 1.0 : 0.0;
    case MOE_ACTIVATION_GELU:
        return 0.5 * (1.0 + std::erf(v / std::sqrt(2.0))) + v * norm_pdf(v);
    case MOE_ACTIVATION_IDENTITY: return 1.0;
    default: {
        double s = sigmoid(v);
        return s + v * s * (1.0 - s);
    }
    }
}

// One expert on one token: pre-activation H (F2), activation A (F), output (D).
struct ExpertPass {
    std::vector<double> H, A, out;
};

}  // namespace

double cv2(const std::vector<double> &v, std::vector<double> *grad) {
    const double n = (double)v.size();
    double mean = 0;
    for (double a : v) mean += a;
    mean /= n;
    double var = 0;
    for (double a : v) var += (a - mean) * (a - mean);
    var /= n;
    const double den = mean * mean + 1e-10;
    if (grad) {
        grad->resize(v.size());
        for (size_t i = 0; i < v.size(); ++i) {
            double dvar = 2.0 * (v[i] - mean) / n, dden = 2.0 * mean / n;
            (*grad)[i] = dvar / den - var * dden / (den * den);
        }
    }
    return var / den;
}

Model Model::from_layer(moe_layer_t *layer) {
    Model m;
    moe_layer_get_config(layer, &m.cfg);
    m.D = m.cfg.d_model;
    m.F = m.cfg.d_ff;
    m.F2 = m.cfg.activation == MOE_ACTIVATION_SWIGLU ? 2 * m.F : m.F;
    m.E = m.cfg.num_experts;
    m.K = m.cfg.top_k;
    for (int p = 0; p < MOE_PARAM_COUNT; ++p) {
        void *v = nullptr;
        int64_t n = 0;
        moe_layer_param(layer, (moe_param_t)p, &v, nullptr, &n);
        const float *f = (const float *)v;
        m.param[p].assign(f, f + n);
    }
    if (m.cfg.bias_update_rate > 0) {
        std::vector<float> b(m.E);
        moe_layer_score_bias(layer, b.data());
        m.score_bias.assign(b.begin(), b.end());
    }
    m.mask.assign(m.E, 1);
    moe_layer_expert_mask(layer, m.mask.data());
    return m;
}

double Model::total_loss(const Forward &f, const std::vector<double> &dy) {
    double s = 0;
    for (size_t i = 0; i < dy.size(); ++i) s += dy[i] * f.y[i];
    return s + f.aux_loss;
}

static ExpertPass expert_fwd(const Model &m, int64_t e, const double *x) {
    const int64_t D = m.D, F = m.F, F2 = m.F2;
    const std::vector<double> &W1 = m.param[MOE_PARAM_W1], &B1 = m.param[MOE_PARAM_B1];
    const std::vector<double> &W2 = m.param[MOE_PARAM_W2], &B2 = m.param[MOE_PARAM_B2];
    ExpertPass r;
    r.H.assign(F2, 0.0);
    for (int64_t c = 0; c < F2; ++c) {
        double s = B1.empty() ? 0.0 : B1[e * F2 + c];
        for (int64_t d = 0; d < D; ++d) s += x[d] * W1[(e * D + d) * F2 + c];
        r.H[c] = s;
    }
    r.A.assign(F, 0.0);
    for (int64_t c = 0; c < F; ++c)
        r.A[c] = m.cfg.activation == MOE_ACTIVATION_SWIGLU
                     ? act_fwd(MOE_ACTIVATION_SILU, r.H[c]) * r.H[F + c]
                     : act_fwd(m.cfg.activation, r.H[c]);
    r.out.assign(D, 0.0);
    for (int64_t d = 0; d < D; ++d) {
        double s = B2.empty() ? 0.0 : B2[e * D + d];
        for (int64_t c = 0; c < F; ++c) s += r.A[c] * W2[(e * F + c) * D + d];
        r.out[d] = s;
    }
    return r;
}

// ---- shared experts: every token through each of the S, y += g_s(x) * sum_s FFN_s(x) ----

static int64_t shared_width(const Model &m) {
    return m.cfg.shared_d_ff > 0 ? m.cfg.shared_d_ff : m.F;
}

// shared expert s on one token (as expert_fwd, with the SHARED_* parameters and width Fs)
static ExpertPass shared_expert_fwd(const Model &m, int64_t s, const double *x) {
    const int64_t D = m.D, F = shared_width(m);
    const int64_t F2 = m.cfg.activation == MOE_ACTIVATION_SWIGLU ? 2 * F : F;
    const std::vector<double> &W1 = m.param[MOE_PARAM_SHARED_W1];
    const std::vector<double> &B1 = m.param[MOE_PARAM_SHARED_B1];
    const std::vector<double> &W2 = m.param[MOE_PARAM_SHARED_W2];
    const std::vector<double> &B2 = m.param[MOE_PARAM_SHARED_B2];
    ExpertPass r;
    r.H.assign(F2, 0.0);
    for (int64_t c = 0; c < F2; ++c) {
        double v = B1.empty() ? 0.0 : B1[s * F2 + c];
        for (int64_t d = 0; d < D; ++d) v += x[d] * W1[(s * D + d) * F2 + c];
        r.H[c] = v;
    }
    r.A.assign(F, 0.0);
    for (int64_t c = 0; c < F; ++c)
        r.A[c] = m.cfg.activation == MOE_ACTIVATION_SWIGLU
                     ? act_fwd(MOE_ACTIVATION_SILU, r.H[c]) * r.H[F + c]
                     : act_fwd(m.cfg.activation, r.H[c]);
    r.out.assign(D, 0.0);
    for (int64_t d = 0; d < D; ++d) {
        double v = B2.empty() ? 0.0 : B2[s * D + d];
        for (int64_t c = 0; c < F; ++c) v += r.A[c] * W2[(s * F + c) * D + d];
        r.out[d] = v;
    }
    return r;
}

// adds g_s * sum_s FFN_s(x) to f.y and keeps the sum and the gate for backward
static void shared_forward(const Model &m, const std::vector<double> &x, Forward &f) {
    const int64_t S = m.cfg.num_shared_experts, T = f.T, D = m.D;
    if (S <= 0) return;
    const std::vector<double> &wg = m.param[MOE_PARAM_SHARED_GATE];
    f.shared_out.assign(T * D, 0.0);
    f.shared_gate.assign(T, 1.0);
    for (int64_t t = 0; t < T; ++t) {
        for (int64_t s = 0; s < S; ++s) {
            ExpertPass r = shared_expert_fwd(m, s, &x[t * D]);
            for (int64_t d = 0; d < D; ++d) f.shared_out[t * D + d] += r.out[d];
        }
        if (m.cfg.shared_expert_gate) {
            double z = 0;
            for (int64_t d = 0; d < D; ++d) z += x[t * D + d] * wg[d];
            f.shared_gate[t] = sigmoid(z);
        }
        for (int64_t d = 0; d < D; ++d) f.y[t * D + d] += f.shared_gate[t] * f.shared_out[t * D + d];
    }
}

// gradients of the shared experts and their gate, added into g
static void shared_backward(const Model &m, const Forward &f, const std::vector<double> &x,
                            const std::vector<double> &dy, Grads &g) {
    const int64_t S = m.cfg.num_shared_experts, T = f.T, D = m.D, F = shared_width(m);
    if (S <= 0) return;
    const bool swiglu = m.cfg.activation == MOE_ACTIVATION_SWIGLU;
    const int64_t F2 = swiglu ? 2 * F : F;
    const std::vector<double> &W1 = m.param[MOE_PARAM_SHARED_W1];
    const std::vector<double> &W2 = m.param[MOE_PARAM_SHARED_W2];
    const std::vector<double> &wg = m.param[MOE_PARAM_SHARED_GATE];
    std::vector<double> &dW1 = g.param[MOE_PARAM_SHARED_W1], &dB1 = g.param[MOE_PARAM_SHARED_B1];
    std::vector<double> &dW2 = g.param[MOE_PARAM_SHARED_W2], &dB2 = g.param[MOE_PARAM_SHARED_B2];
    std::vector<double> &dwg = g.param[MOE_PARAM_SHARED_GATE];
    for (int64_t t = 0; t < T; ++t) {
        const double *xt = &x[t * D], *dyt = &dy[t * D];
        const double gs = f.shared_gate[t];
        if (m.cfg.shared_expert_gate) {
            // y += sigmoid(z) * out:  dz = <dy, out> sigmoid'(z)
            double dot = 0;
            for (int64_t d = 0; d < D; ++d) dot += dyt[d] * f.shared_out[t * D + d];
            double dz = dot * gs * (1.0 - gs);
            for (int64_t d = 0; d < D; ++d) {
                dwg[d] += dz * xt[d];
                g.dx[t * D + d] += dz * wg[d];
            }
        }
        for (int64_t s = 0; s < S; ++s) {
            ExpertPass r = shared_expert_fwd(m, s, xt);
            std::vector<double> dout(D), dA(F, 0.0), dH(F2, 0.0);
            for (int64_t d = 0; d < D; ++d) dout[d] = gs * dyt[d];
            if (!dB2.empty())
                for (int64_t d = 0; d < D; ++d) dB2[s * D + d] += dout[d];
            for (int64_t c = 0; c < F; ++c)
                for (int64_t d = 0; d < D; ++d) {
                    dW2[(s * F + c) * D + d] += r.A[c] * dout[d];
                    dA[c] += W2[(s * F + c) * D + d] * dout[d];
                }
            for (int64_t c = 0; c < F; ++c) {
                if (swiglu) {
                    double G = r.H[c], U = r.H[F + c];
                    dH[c] = dA[c] * U * act_grad(MOE_ACTIVATION_SILU, G);
                    dH[F + c] = dA[c] * act_fwd(MOE_ACTIVATION_SILU, G);
                } else {
                    dH[c] = dA[c] * act_grad(m.cfg.activation, r.H[c]);
                }
            }
            if (!dB1.empty())
                for (int64_t c = 0; c < F2; ++c) dB1[s * F2 + c] += dH[c];
            for (int64_t d = 0; d < D; ++d)
                for (int64_t c = 0; c < F2; ++c) {
                    dW1[(s * D + d) * F2 + c] += xt[d] * dH[c];
                    g.dx[t * D + d] += W1[(s * D + d) * F2 + c] * dH[c];
                }
        }
    }
}

// the capacity walk and the combine, given the routing f.idx and gates f.gate
void Model::route_combine(Forward &f, const std::vector<double> &x, double tol) const {
    const int64_t T = f.T;
    // capacity walk
    f.counts.assign(E, 0);
    f.dropped.assign(E, 0);
    f.kept.assign(T * K, 1);
    f.capacity = cfg.capacity_factor > 0
                     ? (int64_t)std::ceil(cfg.capacity_factor * (double)T * (double)K / (double)E)
                     : -1;
    std::vector<int64_t> walk(T * K);  // positions p = j T + t
    std::iota(walk.begin(), walk.end(), 0);
    auto g_of = [&](int64_t p) { return f.gate[(p % T) * K + p / T]; };
    if (f.capacity >= 0 && cfg.priority == MOE_PRIORITY_SCORE)
        std::stable_sort(walk.begin(), walk.end(),
                         [&](int64_t a, int64_t b) { return g_of(a) > g_of(b); });
    std::vector<int64_t> slots(E, 0);
    std::vector<std::vector<int64_t>> claims(E);
    for (int64_t p : walk) {
        int64_t t = p % T, j = p / T;
        int32_t e = f.idx[t * K + j];
        f.counts[e]++;
        claims[e].push_back(p);
        if (f.capacity >= 0 && slots[e]++ >= f.capacity) {
            f.kept[t * K + j] = 0;
            f.dropped[e]++;
            f.num_dropped++;
        }
    }
    // SCORE: the claims just inside and just outside the capacity must not be a near-tie
    if (f.capacity >= 0 && cfg.priority == MOE_PRIORITY_SCORE)
        for (int64_t e = 0; e < E; ++e) {
            int64_t C = f.capacity;
            if (C >= 1 && (int64_t)claims[e].size() > C) {
                double gap = g_of(claims[e][C - 1]) - g_of(claims[e][C]);
                if (gap != 0.0 && gap < tol) f.num_fragile++;
            }
        }

    // combine (and the per-expert outputs it sums)
    f.y.assign(T * D, 0.0);
    f.y_experts.assign(T * K * D, 0.0);
    f.gate_out.assign(T * K, 0.0);
    for (int64_t t = 0; t < T; ++t)
        for (int64_t j = 0; j < K; ++j) {
            if (!f.kept[t * K + j]) continue;
            ExpertPass r = expert_fwd(*this, f.idx[t * K + j], &x[t * D]);
            for (int64_t d = 0; d < D; ++d) f.y[t * D + d] += f.gate[t * K + j] * r.out[d];
            for (int64_t d = 0; d < D; ++d) f.y_experts[(t * K + j) * D + d] = r.out[d];
            f.gate_out[t * K + j] = f.gate[t * K + j];
        }
}

Forward Model::forward(const std::vector<double> &x, int64_t T, bool training, uint64_t call,
                       double tol) const {
    if (cfg.router == MOE_ROUTER_HIERARCHICAL) return forward_hier(x, T, tol);
    Forward f;
    f.T = T;
    f.noisy = cfg.noisy_gating && training;
    const std::vector<double> &Wg = param[MOE_PARAM_ROUTER_WEIGHT];
    const std::vector<double> &Wn = param[MOE_PARAM_NOISE_WEIGHT];
    f.logits.assign(T * E, 0.0);
    f.p.assign(T * E, 0.0);
    f.lse.assign(T, 0.0);
    f.order.assign(T * E, 0);
    f.idx.assign(T * K, 0);
    f.gate.assign(T * K, 0.0);
    if (f.noisy) {
        f.raw.assign(T * E, 0.0);
        f.sigma.assign(T * E, 0.0);
        f.eps.assign(T * E, 0.0);
    }
    for (int64_t t = 0; t < T; ++t)
        for (int64_t e = 0; e < E; ++e) {
            double s = 0, r = 0;
            for (int64_t d = 0; d < D; ++d) {
                s += x[t * D + d] * Wg[d * E + e];
                if (f.noisy) r += x[t * D + d] * Wn[d * E + e];
            }
            f.logits[t * E + e] = s;
            if (f.noisy) {
                f.raw[t * E + e] = r;
                f.sigma[t * E + e] = softplus(r);
                f.eps[t * E + e] = (double)moe_gating_noise(cfg.seed, call, 0, t, e);
            }
        }
    f.h = f.logits;
    if (f.noisy)
        for (int64_t i = 0; i < T * E; ++i) f.h[i] += f.eps[i] * f.sigma[i];

    // expert availability: the mask, and in training the dropout draw (u_e < p drops e; the
    // dropped ones with the largest u_e come back while fewer than K are available)
    f.avail.assign(E, 1);
    if (!mask.empty()) f.avail = mask;
    const double pdrop = training ? cfg.expert_dropout : 0.0;
    std::vector<double> u(E, 2.0);
    if (pdrop > 0)
        for (int64_t e = 0; e < E; ++e) {
            moe_philox_out_t r = moe_philox4x32((uint32_t)e, 0u, (uint32_t)drop_call,
                                                0x44524F50u ^ (uint32_t)(drop_call >> 32),
                                                cfg.seed);
            u[e] = ((double)(r.v[0] >> 8) + 0.5) / 16777216.0;
        }
    std::vector<uint8_t> mk = f.avail;
    for (int64_t e = 0; e < E; ++e)
        if (u[e] < pdrop) f.avail[e] = 0;
    f.num_available = std::count(f.avail.begin(), f.avail.end(), 1);
    while (f.num_available < K) {
        int64_t best = -1;
        for (int64_t e = 0; e < E; ++e)
            if (mk[e] && !f.avail[e] && (best < 0 || u[e] > u[best])) best = e;
        f.avail[best] = 1;
        f.num_available++;
    }
    const bool sig = cfg.score_func == MOE_SCORE_SIGMOID;
    const double scale = cfg.routed_scaling_factor;
    const int64_t G = cfg.num_groups > 1 ? cfg.num_groups : 1, gsz = E / G;

    // top-k, gates, softmax of the clean logits
    for (int64_t t = 0; t < T; ++t) {
        const double *h = &f.h[t * E];
        std::vector<double> sel(E);
        for (int64_t e = 0; e < E; ++e)
            sel[e] = (sig ? sigmoid(h[e]) : h[e]) + (score_bias.empty() ? 0.0 : score_bias[e]);
        std::vector<uint8_t> cand = f.avail;
        if (G > 1) {
            // group score over the available experts: the best, or the sum of the best two
            std::vector<double> gs(G);
            std::vector<int64_t> na(G, 0);
            for (int64_t g = 0; g < G; ++g) {
                std::vector<double> v;
                for (int64_t e = g * gsz; e < (g + 1) * gsz; ++e)
                    if (f.avail[e]) v.push_back(sel[e]);
                std::sort(v.begin(), v.end(), std::greater<double>());
                na[g] = (int64_t)v.size();
                gs[g] = v.empty() ? -INFINITY
                                  : (cfg.group_score == MOE_GROUP_SCORE_MAX || v.size() == 1
                                         ? v[0]
                                         : v[0] + v[1]);
            }
            std::vector<int64_t> gord(G);
            std::iota(gord.begin(), gord.end(), 0);
            std::stable_sort(gord.begin(), gord.end(),
                             [&](int64_t a, int64_t b) { return gs[a] > gs[b]; });
            std::vector<uint8_t> keep(G, 0);
            int64_t kept = 0, have = 0;
            while (kept < G && (kept < cfg.topk_group || have < K)) {
                keep[gord[kept]] = 1;
                have += na[gord[kept]];
                ++kept;
            }
            // the last kept group against the first dropped one
            if (kept < G && std::isfinite(gs[gord[kept]]) &&
                gs[gord[kept - 1]] - gs[gord[kept]] < tol * (1.0 + std::fabs(gs[gord[kept]])))
                f.num_fragile++;
            for (int64_t e = 0; e < E; ++e) cand[e] = cand[e] && keep[e / gsz];
        }
        int32_t *ord = &f.order[t * E];
        std::iota(ord, ord + E, 0);
        std::stable_sort(ord, ord + E, [&](int32_t a, int32_t b) {
            if (cand[a] != cand[b]) return cand[a] > cand[b];
            return sel[a] > sel[b];
        });
        const int64_t ncand = std::count(cand.begin(), cand.end(), 1);
        // near-ties that decide the chosen set (K-th vs K+1-th) or the order among the K
        int64_t last = K < ncand ? K : K - 1;
        for (int64_t j = 0; j < last; ++j) {
            double gap = sel[ord[j]] - sel[ord[j + 1]];
            if (gap < tol * (1.0 + std::fabs(sel[ord[j]]))) {
                f.num_fragile++;
                break;
            }
        }
        for (int64_t j = 0; j < K; ++j) f.idx[t * K + j] = ord[j];
        if (sig) {
            double z = 0;
            for (int64_t j = 0; j < K; ++j) z += sigmoid(h[ord[j]]);
            double d = cfg.renormalize ? z + 1e-20 : 1.0;
            for (int64_t j = 0; j < K; ++j) f.gate[t * K + j] = scale * sigmoid(h[ord[j]]) / d;
        } else if (cfg.gate == MOE_GATE_SOFTMAX_OF_TOPK || cfg.renormalize) {
            double mx = h[ord[0]];
            for (int64_t j = 1; j < K; ++j) mx = std::max(mx, h[ord[j]]);
            double z = 0;
            for (int64_t j = 0; j < K; ++j) z += std::exp(h[ord[j]] - mx);
            for (int64_t j = 0; j < K; ++j)
                f.gate[t * K + j] = scale * std::exp(h[ord[j]] - mx) / z;
        } else {
            double mx = -INFINITY, z = 0;
            for (int64_t e = 0; e < E; ++e)
                if (f.avail[e]) mx = std::max(mx, h[e]);
            for (int64_t e = 0; e < E; ++e)
                if (f.avail[e]) z += std::exp(h[e] - mx);
            for (int64_t j = 0; j < K; ++j)
                f.gate[t * K + j] = scale * std::exp(h[ord[j]] - mx) / z;
        }
        // the aux losses' probabilities over the available experts: softmax, or normalised
        // sigmoid scores; lse over the available experts
        const double *lg = &f.logits[t * E];
        double lm = -INFINITY, z = 0, zs = 0;
        for (int64_t e = 0; e < E; ++e)
            if (f.avail[e]) lm = std::max(lm, lg[e]);
        for (int64_t e = 0; e < E; ++e)
            if (f.avail[e]) {
                z += std::exp(lg[e] - lm);
                zs += sigmoid(lg[e]);
            }
        for (int64_t e = 0; e < E; ++e)
            f.p[t * E + e] = !f.avail[e] ? 0.0
                             : sig       ? sigmoid(lg[e]) / zs
                                         : std::exp(lg[e] - lm) / z;
        f.lse[t] = lm + std::log(z);
    }

    route_combine(f, x, tol);

    shared_forward(*this, x, f);

    // losses
    double sw = 0;
    for (int64_t e = 0; e < E; ++e) {
        double fe = (double)f.counts[e] / (double)(T * K), Pe = 0;
        for (int64_t t = 0; t < T; ++t) Pe += f.p[t * E + e];
        sw += fe * Pe / (double)T;
    }
    f.switch_loss = (double)E * sw;
    f.importance.assign(E, 0.0);
    for (int64_t t = 0; t < T; ++t)
        for (int64_t j = 0; j < K; ++j) f.importance[f.idx[t * K + j]] += f.gate[t * K + j];
    f.importance_loss = cv2(f.importance, nullptr);
    f.load.assign(E, 0.0);
    if (f.noisy) {
        for (int64_t t = 0; t < T; ++t) {
            const int32_t *ord = &f.order[t * E];
            for (int64_t e = 0; e < E; ++e) {
                bool sel = std::find(ord, ord + K, (int32_t)e) != ord + K;
                if (sel && K == E) {
                    f.load[e] += 1.0;
                    continue;
                }
                double thr = f.h[t * E + (sel ? ord[K] : ord[K - 1])];
                f.load[e] += norm_cdf((f.logits[t * E + e] - thr) / f.sigma[t * E + e]);
            }
        }
    } else {
        for (int64_t e = 0; e < E; ++e) f.load[e] = (double)f.counts[e];
    }
    f.load_loss = cv2(f.load, nullptr);
    double zs = 0;
    for (int64_t t = 0; t < T; ++t) zs += f.lse[t] * f.lse[t];
    f.z_loss = zs / (double)T;
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

Grads Model::backward(const Forward &f, const std::vector<double> &x,
                      const std::vector<double> &dy) const {
    return backward_impl(f, x, &dy, nullptr, nullptr);
}

Grads Model::backward_experts(const Forward &f, const std::vector<double> &x,
                              const std::vector<double> &dye,
                              const std::vector<double> &dge) const {
    return backward_impl(f, x, nullptr, &dye, &dge);
}

double Model::total_loss_experts(const Forward &f, const std::vector<double> &dye,
                                 const std::vector<double> &dge) {
    double s = 0;
    for (size_t i = 0; i < dye.size(); ++i) s += dye[i] * f.y_experts[i];
    for (size_t i = 0; i < dge.size(); ++i) s += dge[i] * f.gate_out[i];
    return s + f.aux_loss;
}

Grads Model::backward_impl(const Forward &f, const std::vector<double> &x,
                           const std::vector<double> *dyp, const std::vector<double> *dye,
                           const std::vector<double> *dge) const {
    const int64_t T = f.T;
    static const std::vector<double> none;
    const std::vector<double> &dy = dyp ? *dyp : none;
    Grads g;
    for (int p = 0; p < MOE_PARAM_COUNT; ++p) g.param[p].assign(param[p].size(), 0.0);
    g.dx.assign(T * D, 0.0);
    std::vector<double> &dW1 = g.param[MOE_PARAM_W1], &dB1 = g.param[MOE_PARAM_B1];
    std::vector<double> &dW2 = g.param[MOE_PARAM_W2], &dB2 = g.param[MOE_PARAM_B2];
    const std::vector<double> &W1 = param[MOE_PARAM_W1], &W2 = param[MOE_PARAM_W2];

    // d loss / d gate, and the expert backward
    std::vector<double> dgate(T * K, 0.0);
    for (int64_t t = 0; t < T; ++t)
        for (int64_t j = 0; j < K; ++j) {
            if (!f.kept[t * K + j]) continue;
            int64_t e = f.idx[t * K + j];
            double gj = f.gate[t * K + j];
            const double *xt = &x[t * D];
            ExpertPass r = expert_fwd(*this, e, xt);
            std::vector<double> dout(D), dA(F, 0.0), dH(F2, 0.0);
            if (dye) {  // per-expert outputs: their gradients given directly
                dgate[t * K + j] += (*dge)[t * K + j];
                for (int64_t d = 0; d < D; ++d) dout[d] = (*dye)[(t * K + j) * D + d];
            } else {
                const double *dyt = &dy[t * D];
                for (int64_t d = 0; d < D; ++d) dgate[t * K + j] += dyt[d] * r.out[d];
                for (int64_t d = 0; d < D; ++d) dout[d] = gj * dyt[d];
            }
            if (!dB2.empty())
                for (int64_t d = 0; d < D; ++d) dB2[e * D + d] += dout[d];
            for (int64_t c = 0; c < F; ++c)
                for (int64_t d = 0; d < D; ++d) {
                    dW2[(e * F + c) * D + d] += r.A[c] * dout[d];
                    dA[c] += W2[(e * F + c) * D + d] * dout[d];
                }
            for (int64_t c = 0; c < F; ++c) {
                if (cfg.activation == MOE_ACTIVATION_SWIGLU) {
                    double G = r.H[c], U = r.H[F + c];
                    dH[c] = dA[c] * U * act_grad(MOE_ACTIVATION_SILU, G);
                    dH[F + c] = dA[c] * act_fwd(MOE_ACTIVATION_SILU, G);
                } else {
                    dH[c] = dA[c] * act_grad(cfg.activation, r.H[c]);
                }
            }
            if (!dB1.empty())
                for (int64_t c = 0; c < F2; ++c) dB1[e * F2 + c] += dH[c];
            for (int64_t d = 0; d < D; ++d)
                for (int64_t c = 0; c < F2; ++c) {
                    dW1[(e * D + d) * F2 + c] += xt[d] * dH[c];
                    g.dx[t * D + d] += W1[(e * D + d) * F2 + c] * dH[c];
                }
        }

    if (cfg.router == MOE_ROUTER_HIERARCHICAL) {  // both levels' gates and losses
        backward_hier(f, x, dgate, &g);
        return g;
    }

    // importance loss: Imp_e = sum of gates routed to e (dropped ones too)
    if (cfg.importance_loss_coef != 0) {
        std::vector<double> gi;
        cv2(f.importance, &gi);
        for (int64_t t = 0; t < T; ++t)
            for (int64_t j = 0; j < K; ++j)
                dgate[t * K + j] += cfg.importance_loss_coef * gi[f.idx[t * K + j]];
    }

    // gates -> scores h (gates carry the routed scaling factor c)
    const double c = cfg.routed_scaling_factor;
    const bool sig = cfg.score_func == MOE_SCORE_SIGMOID;
    std::vector<double> dh(T * E, 0.0);
    for (int64_t t = 0; t < T; ++t) {
        const double *h = &f.h[t * E];
        double *dht = &dh[t * E];
        if (sig) {
            // g_j = c s_j / Z, Z = sum_i s_i + 1e-20 (renormalize) or 1; s = sigmoid(h)
            double z = 0;
            for (int64_t j = 0; j < K; ++j) z += sigmoid(h[f.idx[t * K + j]]);
            const double Z = cfg.renormalize ? z + 1e-20 : 1.0;
            for (int64_t i = 0; i < K; ++i) {
                int64_t a = f.idx[t * K + i];
                double si = sigmoid(h[a]), ds = 0;
                for (int64_t j = 0; j < K; ++j) {
                    double sj = sigmoid(h[f.idx[t * K + j]]);
                    double dgj_dsi = cfg.renormalize ? c * ((i == j ? 1.0 : 0.0) / Z - sj / (Z * Z))
                                                     : (i == j ? c : 0.0);
                    ds += dgate[t * K + j] * dgj_dsi;
                }
                dht[a] += ds * si * (1.0 - si);
            }
        } else if (cfg.gate == MOE_GATE_SOFTMAX_OF_TOPK || cfg.renormalize) {
            // g_j = c exp(h_{idx_j}) / sum_i exp(h_{idx_i})
            for (int64_t j = 0; j < K; ++j)
                for (int64_t i = 0; i < K; ++i) {
                    double gj = f.gate[t * K + j], gi = f.gate[t * K + i] / c;
                    double dgj_dhi = gj * ((i == j ? 1.0 : 0.0) - gi);
                    dht[f.idx[t * K + i]] += dgate[t * K + j] * dgj_dhi;
                }
        } else {
            // g_j = c p_{idx_j}, p = softmax(h) over the available experts
            double mx = -INFINITY, z = 0;
            for (int64_t e = 0; e < E; ++e)
                if (f.avail[e]) mx = std::max(mx, h[e]);
            std::vector<double> ph(E, 0.0);
            for (int64_t e = 0; e < E; ++e)
                if (f.avail[e]) z += std::exp(h[e] - mx);
            for (int64_t e = 0; e < E; ++e)
                if (f.avail[e]) ph[e] = std::exp(h[e] - mx) / z;
            for (int64_t j = 0; j < K; ++j) {
                int64_t a = f.idx[t * K + j];
                for (int64_t e = 0; e < E; ++e)
                    dht[e] += dgate[t * K + j] * c * ph[a] * ((a == e ? 1.0 : 0.0) - ph[e]);
            }
        }
    }

    // scores -> logits and sigma
    std::vector<double> dlogits = dh, dsigma(T * E, 0.0);
    if (f.noisy)
        for (int64_t i = 0; i < T * E; ++i) dsigma[i] = dh[i] * f.eps[i];
    for (int64_t t = 0; t < T; ++t) {
        const double *p = &f.p[t * E];
        const double *lg = &f.logits[t * E];
        // softmax of the logits over the available experts (= p with softmax scores)
        std::vector<double> q(E, 0.0);
        for (int64_t e = 0; e < E; ++e)
            if (f.avail[e]) q[e] = std::exp(lg[e] - f.lse[t]);
        double S = 0;  // sum of the available sigmoid scores
        for (int64_t e = 0; e < E; ++e)
            if (f.avail[e]) S += sigmoid(lg[e]);
        if (cfg.switch_loss_coef != 0) {
            // switch = E sum_e f_e (1/T) sum_t p_te, f constant
            for (int64_t e = 0; e < E; ++e) {
                if (!f.avail[e]) continue;
                const double se = sigmoid(lg[e]);
                for (int64_t k = 0; k < E; ++k) {
                    if (!f.avail[k] || f.counts[k] == 0) continue;
                    double fk = (double)f.counts[k] / (double)(T * K);
                    // softmax: p_k (d_ke - p_e); normalised sigmoid: s_e (1 - s_e) / S (d_ke - p_k)
                    double dpk_dle = sig ? se * (1.0 - se) / S * ((k == e ? 1.0 : 0.0) - p[k])
                                         : p[k] * ((k == e ? 1.0 : 0.0) - p[e]);
                    dlogits[t * E + e] += cfg.switch_loss_coef * (double)E / (double)T * fk *
                                          dpk_dle;
                }
            }
        }
        if (cfg.z_loss_coef != 0)
            for (int64_t e = 0; e < E; ++e)
                dlogits[t * E + e] += cfg.z_loss_coef * 2.0 * f.lse[t] / (double)T * q[e];
    }
    if (f.noisy && cfg.load_loss_coef != 0) {
        std::vector<double> gl;
        cv2(f.load, &gl);
        for (int64_t t = 0; t < T; ++t) {
            const int32_t *ord = &f.order[t * E];
            for (int64_t e = 0; e < E; ++e) {
                bool sel = std::find(ord, ord + K, (int32_t)e) != ord + K;
                if (sel && K == E) continue;
                int64_t m = sel ? ord[K] : ord[K - 1];
                double sig = f.sigma[t * E + e];
                double z = (f.logits[t * E + e] - f.h[t * E + m]) / sig;
                double c = cfg.load_loss_coef * gl[e] * norm_pdf(z);  // d/dz
                dlogits[t * E + e] += c / sig;
                dsigma[t * E + e] += -c * z / sig;
                // h_m = logits_m + eps_m sigma_m
                dlogits[t * E + m] += -c / sig;
                dsigma[t * E + m] += -c / sig * f.eps[t * E + m];
            }
        }
    }

    // logits = x Wg;  raw = x Wn, sigma = softplus(raw)
    std::vector<double> &dWg = g.param[MOE_PARAM_ROUTER_WEIGHT];
    std::vector<double> &dWn = g.param[MOE_PARAM_NOISE_WEIGHT];
    const std::vector<double> &Wg = param[MOE_PARAM_ROUTER_WEIGHT];
    const std::vector<double> &Wn = param[MOE_PARAM_NOISE_WEIGHT];
    for (int64_t t = 0; t < T; ++t)
        for (int64_t e = 0; e < E; ++e) {
            double dl = dlogits[t * E + e];
            double dr = f.noisy ? dsigma[t * E + e] * sigmoid(f.raw[t * E + e]) : 0.0;
            for (int64_t d = 0; d < D; ++d) {
                dWg[d * E + e] += x[t * D + d] * dl;
                g.dx[t * D + d] += Wg[d * E + e] * dl;
                if (f.noisy) {
                    dWn[d * E + e] += x[t * D + d] * dr;
                    g.dx[t * D + d] += Wn[d * E + e] * dr;
                }
            }
        }
    if (!dye) shared_backward(*this, f, x, dy, g);
    return g;
}

}  // namespace moeref
