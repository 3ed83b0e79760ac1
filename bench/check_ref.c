/* check_ref.c - the float64 reference of --check: one MoE layer computed token by token from the
 * layer's own parameters and its reported routing, with plain loops and no library code, and
 * the router's own choice recomputed to check that routing (check.c compares the results).
 *
 * Letters as in bench.h: T tokens, D d_model, F d_ff, F2 = 2F for swiglu else F, E experts,
 * W routing width (top_k; E for expert choice). */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "bench.h"

static double sigmoid(double x) { return 1.0 / (1.0 + exp(-x)); }

/* a = act(h) for one row: h (F2), a (F) */
static void act_fwd(int act, int64_t F, const double *h, double *a) {
    for (int64_t f = 0; f < F; ++f) {
        double x = h[f];
        switch (act) {
        case MOE_ACTIVATION_RELU: a[f] = x > 0 ? x : 0; break;
        case MOE_ACTIVATION_GELU: a[f] = 0.5 * x * (1.0 + erf(x / sqrt(2.0))); break;
        case MOE_ACTIVATION_SILU: a[f] = x * sigmoid(x); break;
        default: a[f] = x * sigmoid(x) * h[F + f]; /* swiglu: [gate | up] */
        }
    }
}

/* dh (F2) from da (F) at h (F2) */
static void act_bwd(int act, int64_t F, const double *h, const double *da, double *dh) {
    for (int64_t f = 0; f < F; ++f) {
        double x = h[f], s = sigmoid(x);
        switch (act) {
        case MOE_ACTIVATION_RELU: dh[f] = x > 0 ? da[f] : 0; break;
        case MOE_ACTIVATION_GELU:
            dh[f] = da[f] * (0.5 * (1.0 + erf(x / sqrt(2.0))) +
                             x * exp(-0.5 * x * x) * 0.3989422804014327); /* 1 / sqrt(2 pi) */
            break;
        case MOE_ACTIVATION_SILU: dh[f] = da[f] * s * (1.0 + x * (1.0 - s)); break;
        default:
            dh[f] = da[f] * h[F + f] * s * (1.0 + x * (1.0 - s));
            dh[F + f] = da[f] * x * s;
        }
    }
}

/* one kept assignment of token t to expert e with gate g: y_t += g FFN_e(x_t), the expert
 * gradients and dx_t's expert path; returns dg = <dy_t, FFN_e(x_t)>. s: scratch (2 F2 + 2 F) */
static double expert_row(const bench_ref_in_t *in, bench_ref_out_t *out, int64_t t, int64_t e,
                         double g, double *s) {
    const int64_t D = in->D, F = in->F, F2 = in->act == MOE_ACTIVATION_SWIGLU ? 2 * F : F;
    const float *x = in->x + t * D, *dy = in->dy + t * D;
    const float *w1 = in->w1 + e * D * F2, *w2 = in->w2 + e * F * D;
    double *h = s, *dh = s + F2, *a = s + 2 * F2, *da = a + F;
    for (int64_t c = 0; c < F2; ++c) h[c] = in->b1 ? in->b1[e * F2 + c] : 0.0;
    for (int64_t d = 0; d < D; ++d)
        for (int64_t c = 0; c < F2; ++c) h[c] += (double)x[d] * w1[d * F2 + c];
    act_fwd(in->act, F, h, a);
    double dg = 0.0;
    for (int64_t d = 0; d < D; ++d) {
        double o = in->b2 ? in->b2[e * D + d] : 0.0;
        for (int64_t f = 0; f < F; ++f) o += a[f] * w2[f * D + d];
        out->y[t * D + d] += g * o;
        dg += (double)dy[d] * o;
    }
    /* backward of g * FFN_e: the row's output gradient is g dy_t */
    for (int64_t f = 0; f < F; ++f) {
        double acc = 0.0;
        for (int64_t d = 0; d < D; ++d) {
            double dyr = g * dy[d];
            acc += w2[f * D + d] * dyr;
            out->dw2[(e * F + f) * D + d] += a[f] * dyr;
        }
        da[f] = acc;
    }
    if (out->db2)
        for (int64_t d = 0; d < D; ++d) out->db2[e * D + d] += g * dy[d];
    act_bwd(in->act, F, h, da, dh);
    if (out->db1)
        for (int64_t c = 0; c < F2; ++c) out->db1[e * F2 + c] += dh[c];
    for (int64_t d = 0; d < D; ++d) {
        double acc = 0.0;
        for (int64_t c = 0; c < F2; ++c) {
            acc += w1[d * F2 + c] * dh[c];
            out->dw1[(e * D + d) * F2 + c] += (double)x[d] * dh[c];
        }
        out->dx[t * D + d] += acc;
    }
    return dg;
}

/* logits l = x_t Wg (E) */
static void logits(const bench_ref_in_t *in, int64_t t, double *l) {
    const int64_t D = in->D, E = in->E;
    for (int64_t e = 0; e < E; ++e) l[e] = 0.0;
    for (int64_t d = 0; d < D; ++d)
        for (int64_t e = 0; e < E; ++e) l[e] += (double)in->x[t * D + d] * in->wg[d * E + e];
}

/* softmax over E of l into p */
static void softmax(const double *l, int64_t E, double *p) {
    double m = l[0], z = 0.0;
    for (int64_t e = 1; e < E; ++e) m = l[e] > m ? l[e] : m;
    for (int64_t e = 0; e < E; ++e) z += p[e] = exp(l[e] - m);
    for (int64_t e = 0; e < E; ++e) p[e] /= z;
}

/* the K + 1 best experts by score, best first, ties to the lower expert id */
static void top_order(const double *l, int64_t E, int64_t n, int *order, char *taken) {
    memset(taken, 0, (size_t)E);
    for (int64_t i = 0; i < n; ++i) {
        int best = -1;
        for (int64_t e = 0; e < E; ++e)
            if (!taken[e] && (best < 0 || l[e] > l[best])) best = (int)e;
        order[i] = best, taken[best] = 1;
    }
}

/* the router's choice for token t recomputed from its logits l (E) and probabilities p (E):
 * the reported experts and gates must match, unless two of the K + 1 best scores are within
 * tie_eps (1 + max|l|) (then either order is right and the token is skipped) */
static void check_choice(const bench_ref_in_t *in, bench_ref_out_t *out, int64_t t,
                         const double *l, const double *p, int *order, char *taken) {
    const int64_t E = in->E, K = in->W, n = K < E ? K + 1 : K;
    double lmax = 0.0;
    for (int64_t e = 0; e < E; ++e) lmax = fmax(lmax, fabs(l[e]));
    top_order(l, E, n, order, taken);
    for (int64_t i = 0; i + 1 < n; ++i)
        if (l[order[i]] - l[order[i + 1]] < in->tie_eps * (1.0 + lmax)) {
            out->route_skipped++;
            return;
        }
    /* gates: softmax over the K selected (softmax-of-topk, or renormalised), else p itself */
    const int over_k = in->gate_type == MOE_GATE_SOFTMAX_OF_TOPK || in->renormalize;
    double z = 0.0;
    for (int64_t j = 0; j < K; ++j) z += over_k ? exp(l[order[j]] - l[order[0]]) : 0.0;
    for (int64_t j = 0; j < K; ++j) {
        double g = over_k ? exp(l[order[j]] - l[order[0]]) / z : p[order[j]];
        out->route_wrong += in->idx[t * K + j] != order[j];
        out->route_wrong += !(fabs((double)in->gate[t * K + j] - g) <= in->gate_tol);
        out->route_checked += 2;
    }
}

/* kept flags: with capacity C = ceil(cf T K / E) every expert keeps min(assigned, C) of its
 * assignments whatever the priority order; dropless keeps all (token choice only) */
static void check_capacity(const bench_ref_in_t *in, bench_ref_out_t *out, int64_t *count) {
    const int64_t E = in->E, n = in->T * in->W;
    const double C = in->capacity_factor > 0
                         ? ceil(in->capacity_factor * (double)in->T * (double)in->W / (double)E)
                         : INFINITY;
    memset(count, 0, (size_t)(2 * E) * sizeof *count);
    for (int64_t i = 0; i < n; ++i)
        if (in->idx[i] >= 0 && in->idx[i] < E)
            count[in->idx[i]]++, count[E + in->idx[i]] += in->kept[i] != 0;
    for (int64_t e = 0; e < E; ++e) {
        double want = (double)count[e] < C ? (double)count[e] : C;
        out->route_wrong += (double)count[E + e] != want;
        out->route_checked++;
    }
}

/* the router's backward for token t: dl (E) from the gates g and dg of its K assignments, then
 * dWg += x_t^T dl and dx_t += Wg dl */
static void router_bwd(const bench_ref_in_t *in, bench_ref_out_t *out, int64_t t, const double *p,
                       const double *dg, double *dl) {
    const int64_t D = in->D, E = in->E, K = in->W;
    const int32_t *ix = in->idx + t * K;
    const float *g = in->gate + t * K;
    for (int64_t e = 0; e < E; ++e) dl[e] = 0.0;
    if (in->gate_type == MOE_GATE_SOFTMAX_OF_TOPK || in->renormalize) {
        double s = 0.0; /* a softmax over the K selected: dl_j = g_j (dg_j - sum_i g_i dg_i) */
        for (int64_t j = 0; j < K; ++j) s += (double)g[j] * dg[j];
        for (int64_t j = 0; j < K; ++j)
            if (ix[j] >= 0) dl[ix[j]] += (double)g[j] * (dg[j] - s);
    } else {
        double s = 0.0; /* g_j = p_{e_j}, p = softmax over E: dl_e = p_e (dp_e - sum_i p_i dp_i) */
        for (int64_t j = 0; j < K; ++j)
            if (ix[j] >= 0) s += p[ix[j]] * dg[j];
        for (int64_t e = 0; e < E; ++e) dl[e] = -p[e] * s;
        for (int64_t j = 0; j < K; ++j)
            if (ix[j] >= 0) dl[ix[j]] += p[ix[j]] * dg[j];
    }
    for (int64_t d = 0; d < D; ++d) {
        double acc = 0.0;
        for (int64_t e = 0; e < E; ++e) {
            acc += in->wg[d * E + e] * dl[e];
            out->dwg[d * E + e] += (double)in->x[t * D + d] * dl[e];
        }
        out->dx[t * D + d] += acc;
    }
}

int bench_ref_layer(const bench_ref_in_t *in, bench_ref_out_t *out) {
    const int64_t E = in->E, W = in->W, F = in->F;
    const int64_t F2 = in->act == MOE_ACTIVATION_SWIGLU ? 2 * F : F;
    double *s = malloc((size_t)(2 * F2 + 2 * F + 4 * E + W + 1) * sizeof *s);
    int *order = malloc((size_t)(E + 1) * sizeof *order);
    char *taken = malloc((size_t)E + 1);
    int64_t *count = malloc((size_t)(2 * E) * sizeof *count);
    if (!s || !order || !taken || !count) {
        free(s), free(order), free(taken), free(count);
        return -1;
    }
    double *l = s + 2 * F2 + 2 * F, *p = l + E, *dl = p + E, *dg = dl + E;
    for (int64_t t = 0; t < in->T; ++t) {
        const int32_t *ix = in->idx + t * W;
        for (int64_t j = 0; j < W; ++j) {
            dg[j] = 0.0; /* a dropped assignment adds nothing and gets no gradient */
            if (ix[j] >= 0 && in->kept[t * W + j])
                dg[j] = expert_row(in, out, t, ix[j], (double)in->gate[t * W + j], s);
        }
        if (in->check_routing || in->router_grads) {
            logits(in, t, l);
            softmax(l, E, p);
        }
        if (in->check_routing) check_choice(in, out, t, l, p, order, taken);
        if (in->router_grads) router_bwd(in, out, t, p, dg, dl);
    }
    if (in->check_capacity) check_capacity(in, out, count);
    free(s), free(order), free(taken), free(count);
    return 0;
}
