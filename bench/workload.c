/* workload.c - the workloads of moe_bench: routing distributions, the inputs that make the
 * layer's own router follow them, and what each rank feeds the layer at one size.
 *
 * The router weight is left as the layer initialised it. Each token instead gets, on top of
 * uniform noise, a strong component along the (normalised) router columns of K target experts
 * drawn from the distribution, so its logits favour exactly those experts. With x noise of
 * standard deviation 1/sqrt(3) per element, a component of strength s along the unit column
 * u_e raises logit e by s·|w_e| while the noise moves every logit by about |w_e|/sqrt(3): the
 * strengths below (8 for the best target down to 4 for the K-th) keep a margin of about seven
 * noise standard deviations, so the top-k picks the targets unless D is tiny (the cross terms
 * <u_e, w_f> grow like 1/sqrt(D)) or the gating noise is on. Every run reports the imbalance
 * it achieved, taken from moe_layer_stats. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "bench.h"

#define BENCH_STRENGTH_FIRST 8.0 /* component along the best target's column */
#define BENCH_STRENGTH_LAST 4.0  /* ... along the K-th target's column */

static uint64_t splitmix64(uint64_t *s) {
    uint64_t z = (*s += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

/* uniform in [0, 1) with 53 bits */
static double rand01(uint64_t *s) { return (double)(splitmix64(s) >> 11) * 0x1.0p-53; }

int bench_routing_parse(const char *text, bench_routing_t *r) {
    memset(r, 0, sizeof *r);
    snprintf(r->text, sizeof r->text, "%s", text);
    char *end = NULL;
    if (strcmp(text, "learned") == 0) {
        r->kind = BENCH_ROUTING_LEARNED;
    } else if (strcmp(text, "uniform") == 0) {
        r->kind = BENCH_ROUTING_UNIFORM;
    } else if (strncmp(text, "zipf:", 5) == 0) {
        r->kind = BENCH_ROUTING_ZIPF;
        r->param = strtod(text + 5, &end);
        if (end == text + 5 || *end || !(r->param >= 0.0 && r->param <= 100.0)) {
            fprintf(stderr, "moe_bench: --routing zipf:S needs 0 <= S <= 100, got '%s'\n", text);
            return -1;
        }
    } else if (strncmp(text, "hot:", 4) == 0) {
        r->kind = BENCH_ROUTING_HOT;
        r->param = strtod(text + 4, &end);
        if (end == text + 4 || *end || !(r->param >= 0.0 && r->param <= 1.0)) {
            fprintf(stderr, "moe_bench: --routing hot:FRACTION needs 0 <= FRACTION <= 1, got '%s'\n",
                    text);
            return -1;
        }
    } else if (strncmp(text, "rank-skew", 9) == 0 && (text[9] == 0 || text[9] == ':')) {
        r->kind = BENCH_ROUTING_RANK_SKEW;
        r->param = 0.9;
        if (text[9] == ':') {
            r->param = strtod(text + 10, &end);
            if (end == text + 10 || *end || !(r->param >= 0.0 && r->param <= 1.0)) {
                fprintf(stderr,
                        "moe_bench: --routing rank-skew:SHARE needs 0 <= SHARE <= 1, got '%s'\n",
                        text);
                return -1;
            }
        }
    } else if (strcmp(text, "zero-rank") == 0) {
        r->kind = BENCH_ROUTING_ZERO_RANK;
    } else {
        fprintf(stderr,
                "moe_bench: --routing '%s' is not one of uniform, zipf:S, hot:FRACTION, learned, "
                "rank-skew, zero-rank\n",
                text);
        return -1;
    }
    return 0;
}

void bench_routing_probs(const bench_routing_t *r, int64_t E, int rank, int ranks, double *p) {
    double sum = 0.0;
    /* rank-skew: the experts of rank (rank + 1) mod P share `param`, the rest the remainder */
    const int64_t El = ranks > 0 ? E / ranks : E,
                  first = ((rank + 1) % (ranks > 0 ? ranks : 1)) * El;
    for (int64_t e = 0; e < E; ++e) {
        switch (r->kind) {
        case BENCH_ROUTING_RANK_SKEW:
            if (El == E) p[e] = 1.0;
            else p[e] = e >= first && e < first + El ? r->param / (double)El
                                                     : (1.0 - r->param) / (double)(E - El);
            break;
        case BENCH_ROUTING_ZIPF: p[e] = pow((double)(e + 1), -r->param); break;
        case BENCH_ROUTING_HOT:
            p[e] = E == 1 ? 1.0 : (e == 0 ? r->param : (1.0 - r->param) / (double)(E - 1));
            break;
        default: p[e] = 1.0; break;
        }
        sum += p[e];
    }
    for (int64_t e = 0; e < E; ++e) p[e] /= sum;
}

void bench_fill_uniform(float *v, int64_t n, uint64_t seed, float scale) {
    uint64_t s = seed * 0xD1B54A32D192ED03ull + 0x8CB92BA72F3D8DD7ull;
    for (int64_t i = 0; i < n; ++i) v[i] = scale * (float)(2.0 * rand01(&s) - 1.0);
}

int bench_make_input(const bench_routing_t *r, const float *wg, int64_t T, int64_t D, int64_t E,
                     int64_t K, int rank, int ranks, uint64_t seed, float *x) {
    bench_fill_uniform(x, T * D, seed, 1.0f);
    if (r->kind == BENCH_ROUTING_LEARNED || r->kind == BENCH_ROUTING_ZERO_RANK) return 0;

    double *p = malloc((size_t)E * sizeof(double));
    double *inv_norm = malloc((size_t)E * sizeof(double));
    unsigned char *taken = malloc((size_t)E);
    if (!p || !inv_norm || !taken) {
        free(p), free(inv_norm), free(taken);
        fprintf(stderr, "moe_bench: out of host memory for the routing workload\n");
        return -1;
    }
    bench_routing_probs(r, E, rank, ranks, p);
    for (int64_t e = 0; e < E; ++e) {
        double n2 = 0.0;
        for (int64_t d = 0; d < D; ++d) n2 += (double)wg[d * E + e] * wg[d * E + e];
        inv_norm[e] = n2 > 0.0 ? 1.0 / sqrt(n2) : 0.0;
    }
    uint64_t s = seed * 0x9E3779B97F4A7C15ull + 0x5EED;
    for (int64_t t = 0; t < T; ++t) {
        memset(taken, 0, (size_t)E);
        double left = 1.0; /* probability mass of the experts not yet drawn for this token */
        int modified = 0;  /* p was patched for zero-probability experts */
        for (int64_t j = 0; j < K; ++j) {
            /* draw one expert among those not taken, proportional to p */
            double u = rand01(&s) * left, acc = 0.0;
            int64_t pick = -1, last = -1;
            for (int64_t e = 0; e < E; ++e) {
                if (taken[e]) continue;
                last = e;
                acc += p[e];
                if (u < acc) {
                    pick = e;
                    break;
                }
            }
            if (pick < 0) pick = last; /* rounding at the end of the walk */
            if (pick < 0) break;
            taken[pick] = 1;
            left -= p[pick];
            if (left < 0.0) left = 0.0;
            if (left == 0.0) { /* only zero-probability experts remain: draw among them evenly */
                for (int64_t e = 0; e < E; ++e) left += taken[e] ? 0.0 : 1e-300;
                for (int64_t e = 0; e < E; ++e) p[e] = taken[e] ? p[e] : 1e-300;
                modified = 1;
            }
            double strength = K == 1 ? BENCH_STRENGTH_FIRST
                                     : BENCH_STRENGTH_FIRST - (BENCH_STRENGTH_FIRST -
                                                               BENCH_STRENGTH_LAST) *
                                                                  (double)j / (double)(K - 1);
            float a = (float)(strength * inv_norm[pick]);
            float *xt = x + t * D;
            for (int64_t d = 0; d < D; ++d) xt[d] += a * wg[d * E + pick];
        }
        if (modified) bench_routing_probs(r, E, rank, ranks, p);
    }
    free(p), free(inv_norm), free(taken);
    return 0;
}

/* ---- what one rank feeds the layer at one size -------------------------------------------- */

static uint64_t rank_seed(uint64_t seed, int q) { return seed + 0x9E3779B97F4Aull * (uint64_t)q; }

int64_t bench_rank_tokens(const bench_opts_t *o, const bench_replay_t *rp, int64_t T,
                          int64_t step, int q, int P, int64_t *begin) {
    if (rp) {
        int64_t Ts = rp->tokens[step % rp->num_steps], b = Ts * q / P;
        if (begin) *begin = b;
        return Ts * (q + 1) / P - b;
    }
    if (begin) *begin = 0;
    if (o->routing.kind == BENCH_ROUTING_ZERO_RANK && q == 0) return 0;
    return T;
}

static int64_t rank_tokens_max(const bench_opts_t *o, const bench_replay_t *rp, int64_t T, int q,
                               int P) {
    if (!rp) return bench_rank_tokens(o, rp, T, 0, q, P, NULL);
    int64_t m = 0;
    for (int64_t s = 0; s < rp->num_steps; ++s) {
        int64_t n = bench_rank_tokens(o, rp, T, s, q, P, NULL);
        m = n > m ? n : m;
    }
    return m;
}

int bench_make_workload(const bench_opts_t *o, const bench_replay_t *rp, const float *wg,
                        int64_t T, int q, int P, bench_workload_t *wl) {
    const moe_layer_config_t *c = &o->cfg;
    const int64_t n = rank_tokens_max(o, rp, T, q, P), D = c->d_model;
    wl->tokens_max = n;
    wl->x = malloc((size_t)(n * D + 1) * 4), wl->dy = malloc((size_t)(n * D + 1) * 4);
    if (!wl->x || !wl->dy) return -1;
    bench_routing_t plain;
    bench_routing_parse("learned", &plain);
    if (bench_make_input(rp ? &plain : &o->routing, wg, n, D, c->num_experts, c->top_k, q, P,
                         rank_seed(o->seed, q), wl->x) != 0)
        return -1;
    bench_fill_uniform(wl->dy, n * D, rank_seed(o->seed, q) + 0x5151, 1.0f / (float)D);
    return 0;
}

void bench_free_workload(bench_workload_t *wl) { free(wl->x), free(wl->dy), wl->x = wl->dy = NULL; }
