/* fuzz_ep.c - libFuzzer target for expert parallelism on the local communicator: P ranks as
 * threads of one process, each with its own context and layer, against the single-rank layer on
 * the concatenation of every rank's tokens.
 * From the bytes: P in 1..4, a small dropless token-choice config (activations, gate modes,
 * sigmoid scores, group-limited gating, scaling, losses, chunks, shared experts, expert bias),
 * per-rank token counts (0 and 1 included), up to two placements (replicated experts, ranks
 * without experts; valid, or invalid the same way on every rank), an expert mask, a selection
 * bias, a forced routing, x and dy (finite, or one NaN/Inf on one rank).
 * What must hold for any input: no crash, hang, leak or sanitizer report; every rank returns
 * the status the contract names (INVALID_ARGUMENT for an invalid placement, NUMERIC_ERROR for a
 * non-finite x or dy on any rank, SUCCESS otherwise); a failed placement leaves the previous
 * one; then every rank's routing, per-expert counts, y, dx, the gradients of the experts it
 * holds (replicas summed) and the replicated gradients (all-reduced) equal the single-rank
 * layer's, and replicas hold bitwise equal gradients. A violation aborts. */
#include <math.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "fuzz_input.h"
#include "moe/moe.h"

/* P ranks, D d_model, F d_ff, E experts, Tr tokens per rank, TT all tokens */
#define FZ_MAX_P 4
#define FZ_MAX_D 8
#define FZ_MAX_F 8
#define FZ_MAX_E 8
#define FZ_MAX_TR 7
#define FZ_MAX_TT (FZ_MAX_P * FZ_MAX_TR)
#define FZ_MAX_SLOTS (FZ_MAX_P * FZ_MAX_E)
/* room for what an invalid num_local may claim: P entries of up to E + 2 */
#define FZ_EXPERTS_ROOM (FZ_MAX_P * (FZ_MAX_E + 2) + 8)
/* the largest parameter: W1 of a rank holding every expert, (E, D, 2F) */
#define FZ_MAX_NUMEL (FZ_MAX_E * FZ_MAX_D * 2 * FZ_MAX_F)
/* a collective that waits this long is a hang (under libFuzzer's -timeout of scripts/fuzz.sh) */
#define FZ_COMM_TIMEOUT_S 5.0
/* f32: the ranks run each expert's GEMMs on other row counts than the single-rank layer and a
 * replicated expert's gradient is summed from parts, so results differ by a few ulp of sums of
 * a few dozen terms; 1e-4 of the scale leaves a wide margin and still catches any wrong row */
#define FZ_TOL 1e-4
/* the smallest scale: x, dy, gates and weights are O(1) here, so a value that cancels to below
 * 1e-2 (a gradient that is zero in exact arithmetic, e.g. the switch loss's under a uniform
 * load) is rounding noise of O(1) terms and is held to FZ_TOL * FZ_MIN_SCALE absolutely */
#define FZ_MIN_SCALE 1e-2

typedef struct {
    int valid;
    int64_t num_local[FZ_MAX_P];
    int32_t experts[FZ_EXPERTS_ROOM];
    /* an invalid placement given by one rank only (-1: by every rank); the others pass the
     * valid placement it was made from */
    int only_rank;
    int64_t alt_num_local[FZ_MAX_P];
    int32_t alt_experts[FZ_EXPERTS_ROOM];
} fz_placement_t;

/* everything the bytes decide; shared read-only by the rank threads */
typedef struct {
    int P;
    moe_layer_config_t cfg;
    int training;
    int num_place;
    fz_placement_t place[2];
    int use_mask;
    uint8_t mask[FZ_MAX_E];
    int use_bias;
    float bias[FZ_MAX_E];
    int forced;
    int32_t fidx[FZ_MAX_TT * FZ_MAX_E]; /* (TT, K) */
    float fgate[FZ_MAX_TT * FZ_MAX_E];
    int64_t T[FZ_MAX_P], begin[FZ_MAX_P + 1], TT;
    float x[FZ_MAX_TT * FZ_MAX_D], dy[FZ_MAX_TT * FZ_MAX_D]; /* (TT, D) */
    int x_bad, dy_bad; /* the rank holding a non-finite value, or -1 */
    int x_null;        /* the rank (with tokens) that passes x = NULL, or -1 */
    moe_comm_t *comm[FZ_MAX_P];
} fz_spec_t;

/* what one rank (or the single-rank layer) returned */
typedef struct {
    const fz_spec_t *sp;
    int rank; /* -1: the single-rank layer on every token */
    moe_status_t st_ctx, st_create, st_place[2], st_mask, st_bias, st_force, st_fwd, st_bwd,
        st_rep, st_ar, st_routing, st_stats, st_getpl;
    char err[512];
    float y[FZ_MAX_TT * FZ_MAX_D], dx[FZ_MAX_TT * FZ_MAX_D];
    int32_t idx[FZ_MAX_TT * FZ_MAX_E];
    int64_t tpe[FZ_MAX_E];
    moe_routing_stats_t stats;
    float wg[FZ_MAX_D * FZ_MAX_E];
    float grad[MOE_PARAM_COUNT][FZ_MAX_NUMEL];
    int64_t numel[MOE_PARAM_COUNT];
    int64_t num_local[FZ_MAX_P], num_slots;
    int32_t experts[FZ_MAX_SLOTS];
} fz_rank_t;

#define FAIL(...)                                                                                  \
    do {                                                                                           \
        fprintf(stderr, "fuzz_ep: " __VA_ARGS__);                                                  \
        fprintf(stderr, "\n");                                                                     \
        abort();                                                                                   \
    } while (0)

static float fz_small(fz_t *f) { return (float)(int8_t)fz_u8(f) / 32.0f; }

/* ---- the bytes as a spec ---- */

static void fuzz_config(fz_t *f, fz_spec_t *sp) {
    moe_layer_config_t *c = &sp->cfg;
    *c = moe_layer_config_default();
    c->d_model = 1 + fz_u8(f) % FZ_MAX_D;
    c->d_ff = 1 + fz_u8(f) % FZ_MAX_F;
    c->num_experts = 1 + fz_u8(f) % FZ_MAX_E;
    const int64_t E = c->num_experts;
    c->top_k = 1 + fz_u8(f) % E;
    c->activation = (moe_activation_t)(fz_u8(f) % 5);
    c->gate = (moe_gate_t)(fz_u8(f) % 2);
    c->renormalize = fz_u8(f) & 1;
    c->score_func = fz_u8(f) % 4 == 3 ? MOE_SCORE_SIGMOID : MOE_SCORE_SOFTMAX;
    uint8_t g = fz_u8(f);
    if (g % 4 == 3) { /* group-limited gating: G > 1 dividing E */
        int64_t div[FZ_MAX_E], n = 0;
        for (int64_t d = 2; d <= E; ++d)
            if (E % d == 0) div[n++] = d;
        if (n > 0) {
            int64_t G = div[(g >> 2) % n], per = E / G;
            int64_t k1 = 1 + fz_u8(f) % G;
            if (k1 * per < c->top_k) k1 = (c->top_k + per - 1) / per;
            c->num_groups = G;
            c->topk_group = k1;
            c->group_score = (moe_group_score_t)((g >> 5) & 1);
        }
    }
    static const double scale[4] = {1.0, 1.0, 0.5, 2.5};
    c->routed_scaling_factor = scale[fz_u8(f) % 4];
    c->expert_bias = fz_u8(f) & 1;
    static const double coef[4] = {0.0, 0.01, 0.1, 1.0};
    uint8_t l = fz_u8(f);
    c->switch_loss_coef = coef[l & 3];
    c->importance_loss_coef = coef[(l >> 2) & 3];
    c->load_loss_coef = coef[(l >> 4) & 3];
    c->z_loss_coef = coef[(l >> 6) & 3];
    c->num_chunks = fz_u8(f) % 4;
    uint8_t s = fz_u8(f);
    if (s % 4 == 3) {
        c->num_shared_experts = 1 + (s >> 2) % 2;
        c->shared_d_ff = (s >> 3) % 4;
        c->shared_expert_gate = (s >> 5) & 1;
    }
    c->seed = fz_u32(f);
    c->capacity_factor = 0.0; /* dropless: the one mode where P ranks equal one rank */
    c->noisy_gating = 0;      /* deterministic routing, training or not */
    sp->training = fz_u8(f) & 1;
    if (fz_u8(f) % 4 == 3) { /* loss-free balancing: a selection bias, the same on every rank */
        c->bias_update_rate = 0.01;
        sp->use_bias = 1;
        for (int64_t e = 0; e < E; ++e) sp->bias[e] = (float)(int8_t)fz_u8(f) / 64.0f;
    }
}

/* a valid placement of E experts on P ranks: a subset per rank, then every expert nobody holds
 * to one rank; replicas and ranks without experts come out of the subsets */
static void valid_placement(fz_t *f, int P, int64_t E, fz_placement_t *pl) {
    uint8_t held[FZ_MAX_P][FZ_MAX_E];
    for (int q = 0; q < P; ++q) {
        uint8_t bits = fz_u8(f);
        for (int64_t e = 0; e < E; ++e) held[q][e] = (bits >> e) & 1;
    }
    for (int64_t e = 0; e < E; ++e) {
        int any = 0;
        for (int q = 0; q < P; ++q) any |= held[q][e];
        if (!any) held[fz_u8(f) % P][e] = 1;
    }
    int64_t at = 0;
    for (int q = 0; q < P; ++q) {
        pl->num_local[q] = 0;
        for (int64_t e = 0; e < E; ++e)
            if (held[q][e]) {
                pl->experts[at++] = (int32_t)e;
                pl->num_local[q]++;
            }
    }
    for (; at < FZ_EXPERTS_ROOM; ++at) pl->experts[at] = -7; /* what a bad count would read */
    pl->valid = 1;
}

/* a valid placement broken one way: a count out of [0, E], an id out of [0, E), a rank's list
 * not ascending, or an expert nobody holds */
static void invalid_placement(fz_t *f, int P, int64_t E, fz_placement_t *pl) {
    valid_placement(f, P, E, pl);
    pl->valid = 0;
    memcpy(pl->alt_num_local, pl->num_local, sizeof pl->num_local);
    memcpy(pl->alt_experts, pl->experts, sizeof pl->experts);
    uint8_t how = fz_u8(f);
    int q = (int)(fz_u8(f) % P);
    int64_t b = 0;
    for (int i = 0; i < q; ++i) b += pl->num_local[i];
    int64_t n = pl->num_local[q];
    switch (how % 4) {
    case 0: pl->num_local[q] = (how & 4) ? -1 - (how >> 3) % 2 : E + 1 + (how >> 3) % 2; return;
    case 2:
        if (n >= 2) { /* a repeat or a swap */
            int64_t i = (how >> 2) % (n - 1);
            if (how & 64)
                pl->experts[b + i + 1] = pl->experts[b + i];
            else {
                int32_t t = pl->experts[b + i];
                pl->experts[b + i] = pl->experts[b + i + 1], pl->experts[b + i + 1] = t;
            }
            return;
        }
        break; /* too short to disorder: drop an expert instead */
    case 3: break;
    case 1:
        if (n >= 1) {
            pl->experts[b + (how >> 2) % n] = (how & 128) ? (int32_t)E : -1;
            return;
        }
        break;
    }
    /* expert e held by nobody: remove it from every rank */
    int32_t e = (int32_t)((how >> 2) % E);
    int64_t at = 0, out = 0;
    for (int r = 0; r < P; ++r) {
        int64_t keep = 0;
        for (int64_t i = 0; i < pl->num_local[r]; ++i, ++at)
            if (pl->experts[at] != e) pl->experts[out++] = pl->experts[at], keep++;
        pl->num_local[r] = keep;
    }
    for (; out < FZ_EXPERTS_ROOM; ++out) pl->experts[out] = -7;
}

static void fuzz_spec(fz_t *f, fz_spec_t *sp) {
    memset(sp, 0, sizeof *sp);
    sp->P = 1 + fz_u8(f) % FZ_MAX_P;
    fuzz_config(f, sp);
    const moe_layer_config_t *c = &sp->cfg;
    const int64_t D = c->d_model, E = c->num_experts, K = c->top_k;
    static const int64_t counts[8] = {0, 1, 1, 2, 3, 4, 5, FZ_MAX_TR};
    sp->begin[0] = 0;
    for (int r = 0; r < sp->P; ++r) {
        sp->T[r] = counts[fz_u8(f) % 8];
        sp->begin[r + 1] = sp->begin[r] + sp->T[r];
    }
    sp->TT = sp->begin[sp->P];
    sp->num_place = fz_u8(f) % 3;
    for (int i = 0; i < sp->num_place; ++i) {
        sp->place[i].only_rank = -1;
        if (fz_u8(f) % 3 == 0)
            invalid_placement(f, sp->P, E, &sp->place[i]);
        else
            valid_placement(f, sp->P, E, &sp->place[i]);
    }
    sp->forced = fz_u8(f) % 4 == 3;
    if (sp->forced) { /* K distinct experts per token, gates of either sign */
        for (int64_t t = 0; t < sp->TT; ++t)
            for (int64_t j = 0; j < K; ++j) {
                int32_t e = (int32_t)(fz_u8(f) % E);
                for (int again = 1; again;) {
                    again = 0;
                    for (int64_t i = 0; i < j; ++i)
                        if (sp->fidx[t * K + i] == e) again = 1;
                    if (again) e = (int32_t)((e + 1) % E);
                }
                sp->fidx[t * K + j] = e;
                sp->fgate[t * K + j] = fz_small(f);
            }
    } else if (fz_u8(f) % 4 == 3) { /* an expert mask with at least K experts available */
        sp->use_mask = 1;
        uint8_t bits = fz_u8(f);
        int64_t n = 0;
        for (int64_t e = 0; e < E; ++e) n += sp->mask[e] = (bits >> e) & 1;
        for (int64_t e = 0; e < E && n < K; ++e)
            if (!sp->mask[e]) sp->mask[e] = 1, n++;
    }
    for (int64_t i = 0; i < sp->TT * D; ++i) sp->x[i] = fz_small(f);
    for (int64_t i = 0; i < sp->TT * D; ++i) sp->dy[i] = fz_small(f);
    /* one NaN or Inf in x or dy, on a rank that has tokens */
    static const float bad[3] = {NAN, INFINITY, -INFINITY};
    int *which[2] = {&sp->x_bad, &sp->dy_bad};
    float *arr[2] = {sp->x, sp->dy};
    for (int k = 0; k < 2; ++k) {
        *which[k] = -1;
        uint8_t u = fz_u8(f);
        if (u % 8 != 7 || sp->TT == 0) continue;
        int64_t t = fz_u8(f) % sp->TT, d = fz_u8(f) % D;
        arr[k][t * D + d] = bad[(u >> 3) % 3];
        for (int r = 0; r < sp->P; ++r)
            if (t >= sp->begin[r] && t < sp->begin[r + 1]) *which[k] = r;
    }
    /* arguments that differ over the ranks (moe.h, "Agreement"): one rank's invalid placement
     * against the others' valid one, or one rank's NULL x; the call fails on every rank */
    for (int i = 0; i < sp->num_place; ++i) {
        uint8_t u = fz_u8(f);
        if (!sp->place[i].valid && sp->P > 1 && u % 2) sp->place[i].only_rank = (u >> 1) % sp->P;
    }
    sp->x_null = -1;
    uint8_t u = fz_u8(f);
    if (sp->P > 1 && sp->x_bad < 0 && u % 8 == 7) {
        int r = (u >> 3) % sp->P;
        if (sp->T[r] > 0) sp->x_null = r;
    }
}

/* ---- one rank's run (also the single-rank layer's, rank -1) ---- */

static void note(fz_rank_t *R, moe_status_t st, const char *what) {
    if (st != MOE_STATUS_SUCCESS && R->err[0] == '\0')
        snprintf(R->err, sizeof R->err, "%s: %s: %s", what, moe_status_string(st),
                 moe_last_error());
}

static void run_layer(fz_rank_t *R, moe_layer_t *L) {
    const fz_spec_t *sp = R->sp;
    const int64_t D = sp->cfg.d_model, K = sp->cfg.top_k;
    const int one = R->rank < 0;
    const int64_t b = one ? 0 : sp->begin[R->rank];
    const int64_t T = one ? sp->TT : sp->T[R->rank];
    if (!one)
        for (int i = 0; i < sp->num_place; ++i) {
            const fz_placement_t *pl = &sp->place[i];
            const int alt = pl->only_rank >= 0 && pl->only_rank != R->rank;
            R->st_place[i] = moe_layer_set_placement(L, alt ? pl->alt_num_local : pl->num_local,
                                                     alt ? pl->alt_experts : pl->experts, NULL);
            note(R, R->st_place[i], "set_placement");
        }
    if (sp->use_mask) note(R, R->st_mask = moe_layer_set_expert_mask(L, sp->mask), "mask");
    if (sp->use_bias) note(R, R->st_bias = moe_layer_set_score_bias(L, sp->bias), "score bias");
    if (sp->forced)
        note(R, R->st_force = moe_layer_force_routing(L, sp->fidx + b * K, sp->fgate + b * K, T),
             "force_routing");
    /* a rank without tokens passes NULL, as moe.h allows */
    const int x_null = !one && R->rank == sp->x_null;
    R->st_fwd = moe_layer_forward(L, T && !x_null ? sp->x + b * D : NULL, T ? R->y : NULL, T,
                                  sp->training, NULL);
    note(R, R->st_fwd, "forward");
    if (R->st_fwd != MOE_STATUS_SUCCESS) return;
    note(R, R->st_routing = moe_layer_routing(L, R->idx, NULL, NULL), "routing");
    note(R, R->st_stats = moe_layer_stats(L, &R->stats, R->tpe, NULL), "stats");
    R->st_bwd = moe_layer_backward(L, T ? sp->dy + b * D : NULL, T ? R->dx : NULL, NULL);
    note(R, R->st_bwd, "backward");
    /* the reductions are collective: every rank calls them once its forward succeeded (after a
     * refused backward the gradients are zero and stay zero) */
    note(R, R->st_rep = moe_layer_reduce_replica_grads(L, NULL), "reduce_replica_grads");
    note(R, R->st_ar = moe_layer_allreduce_router_grads(L, NULL), "allreduce_router_grads");
    for (int p = 0; p < MOE_PARAM_COUNT; ++p) {
        void *v = NULL, *g = NULL;
        int64_t n = 0;
        moe_status_t st = moe_layer_param(L, (moe_param_t)p, &v, &g, &n);
        if (st != MOE_STATUS_SUCCESS || n < 0 || n > FZ_MAX_NUMEL || (n > 0 && (!v || !g)))
            FAIL("rank %d: moe_layer_param(%d) gave status %d, numel %lld", R->rank, p, (int)st,
                 (long long)n);
        R->numel[p] = n;
        if (n) memcpy(R->grad[p], g, (size_t)n * sizeof(float));
        if (p == MOE_PARAM_ROUTER_WEIGHT && n == D * sp->cfg.num_experts)
            memcpy(R->wg, v, (size_t)n * sizeof(float));
    }
    int64_t S = 0;
    note(R, R->st_getpl = moe_layer_get_placement(L, NULL, NULL, &S), "get_placement");
    if (S < 0 || S > FZ_MAX_SLOTS) FAIL("rank %d: %lld slots", R->rank, (long long)S);
    note(R, R->st_getpl = moe_layer_get_placement(L, R->num_local, R->experts, &R->num_slots),
         "get_placement");
}

static void *rank_main(void *arg) {
    fz_rank_t *R = (fz_rank_t *)arg;
    moe_context_t *ctx = NULL;
    moe_layer_t *L = NULL;
    moe_comm_t *comm = R->rank < 0 ? NULL : R->sp->comm[R->rank];
    note(R, R->st_ctx = moe_context_create(&ctx, MOE_BACKEND_CPU, 0, comm), "context_create");
    if (R->st_ctx == MOE_STATUS_SUCCESS) {
        note(R, R->st_create = moe_layer_create(&L, ctx, &R->sp->cfg), "layer_create");
        if (R->st_create == MOE_STATUS_SUCCESS) run_layer(R, L);
    }
    if (moe_layer_destroy(L) != MOE_STATUS_SUCCESS) FAIL("layer_destroy: %s", moe_last_error());
    if (moe_context_destroy(ctx) != MOE_STATUS_SUCCESS)
        FAIL("context_destroy: %s", moe_last_error());
    return NULL;
}

/* ---- comparison ---- */

static double max_abs(const float *v, int64_t n) {
    double m = 0.0;
    for (int64_t i = 0; i < n; ++i) m = fmax(m, fabs((double)v[i]));
    return m;
}

/* |a - b| <= FZ_TOL * scale elementwise; the index of the first violation or -1 */
static int64_t mismatch(const float *a, const float *b, int64_t n, double scale) {
    for (int64_t i = 0; i < n; ++i)
        if (!(fabs((double)a[i] - (double)b[i]) <= FZ_TOL * scale)) return i;
    return -1;
}

/* rows (n, w): each row against the reference's, scaled by the row's largest value (floored at
 * 1e-3 of the whole array's, so a row of near-zeros is held to the array's scale, and at
 * FZ_MIN_SCALE) */
static void compare_rows(const char *what, int rank, const float *a, const float *ref, int64_t n,
                         int64_t w, double whole) {
    for (int64_t t = 0; t < n; ++t) {
        double scale = fmax(fmax(max_abs(ref + t * w, w), 1e-3 * whole), FZ_MIN_SCALE);
        int64_t i = mismatch(a + t * w, ref + t * w, w, scale);
        if (i >= 0)
            FAIL("rank %d: %s row %lld [%lld] = %.9g, the single-rank layer's %.9g (scale %g)",
                 rank, what, (long long)t, (long long)i, a[t * w + i], ref[t * w + i], scale);
    }
}

/* per-expert entries of a parameter (0: not an expert parameter or turned off) */
static int64_t per_expert(const moe_layer_config_t *c, int p) {
    const int64_t D = c->d_model, F = c->d_ff;
    const int64_t F2 = c->activation == MOE_ACTIVATION_SWIGLU ? 2 * F : F;
    switch (p) {
    case MOE_PARAM_W1: return D * F2;
    case MOE_PARAM_B1: return c->expert_bias ? F2 : 0;
    case MOE_PARAM_W2: return F * D;
    case MOE_PARAM_B2: return c->expert_bias ? D : 0;
    default: return 0;
    }
}

/* the reference's selection keys of token t have two within rounding of each other: a rank may
 * then pick another expert without any bug (its x W_g was summed in another GEMM) */
static int near_tie(const fz_spec_t *sp, const fz_rank_t *ref, int64_t t) {
    const int64_t D = sp->cfg.d_model, E = sp->cfg.num_experts;
    double key[FZ_MAX_E], m = 0.0;
    for (int64_t e = 0; e < E; ++e) {
        double h = 0.0;
        for (int64_t d = 0; d < D; ++d) h += (double)sp->x[t * D + d] * ref->wg[d * E + e];
        if (sp->cfg.score_func == MOE_SCORE_SIGMOID) h = 1.0 / (1.0 + exp(-h));
        key[e] = h + (sp->use_bias ? sp->bias[e] : 0.0);
        m = fmax(m, fabs(key[e]));
    }
    for (int64_t i = 0; i < E; ++i)
        for (int64_t j = i + 1; j < E; ++j)
            if (fabs(key[i] - key[j]) <= 1e-4 * (1.0 + m)) return 1;
    return 0;
}

static void expect_status(const fz_rank_t *R, const char *what, moe_status_t got,
                          moe_status_t want) {
    if (got != want)
        FAIL("rank %d: %s returned %s, expected %s (first error: %s)", R->rank, what,
             moe_status_string(got), moe_status_string(want), R->err[0] ? R->err : "none");
}

/* returns 0 when the input is skipped (a near tie), 1 when compared */
static int compare(const fz_spec_t *sp, const fz_rank_t *ref, const fz_rank_t *ranks) {
    const moe_layer_config_t *c = &sp->cfg;
    const int64_t D = c->d_model, E = c->num_experts, K = c->top_k;
    const int P = sp->P;
    /* the placement each rank must hold: the last valid one, else the default contiguous one */
    fz_placement_t want;
    memset(&want, 0, sizeof want);
    {
        int64_t at = 0;
        for (int q = 0; q < P; ++q) {
            want.num_local[q] = (q + 1) * E / P - q * E / P;
            for (int64_t e = q * E / P; e < (q + 1) * E / P; ++e) want.experts[at++] = (int32_t)e;
        }
        for (int i = 0; i < sp->num_place; ++i)
            if (sp->place[i].valid) want = sp->place[i];
    }
    int64_t want_slots = 0, rank_begin[FZ_MAX_P + 1] = {0};
    for (int q = 0; q < P; ++q) want_slots += want.num_local[q], rank_begin[q + 1] = want_slots;

    const moe_status_t fwd_want =
        sp->x_bad >= 0 ? MOE_STATUS_NUMERIC_ERROR : MOE_STATUS_SUCCESS;
    const moe_status_t bwd_want =
        sp->dy_bad >= 0 ? MOE_STATUS_NUMERIC_ERROR : MOE_STATUS_SUCCESS;
    expect_status(ref, "forward", ref->st_fwd, fwd_want);
    /* one rank's NULL x: INVALID_ARGUMENT on every rank (the single-rank layer had x) */
    const moe_status_t rank_fwd_want = sp->x_null >= 0 ? MOE_STATUS_INVALID_ARGUMENT : fwd_want;
    for (int r = 0; r < P; ++r) {
        const fz_rank_t *R = &ranks[r];
        expect_status(R, "context_create", R->st_ctx, MOE_STATUS_SUCCESS);
        expect_status(R, "layer_create", R->st_create, MOE_STATUS_SUCCESS);
        for (int i = 0; i < sp->num_place; ++i)
            expect_status(R, "set_placement", R->st_place[i],
                          sp->place[i].valid ? MOE_STATUS_SUCCESS : MOE_STATUS_INVALID_ARGUMENT);
        expect_status(R, "set_expert_mask", R->st_mask, MOE_STATUS_SUCCESS);
        expect_status(R, "set_score_bias", R->st_bias, MOE_STATUS_SUCCESS);
        expect_status(R, "force_routing", R->st_force, MOE_STATUS_SUCCESS);
        expect_status(R, "forward", R->st_fwd, rank_fwd_want);
    }
    if (rank_fwd_want != MOE_STATUS_SUCCESS) return 1;
    expect_status(ref, "backward", ref->st_bwd, bwd_want);
    for (int r = -1; r < P; ++r) {
        const fz_rank_t *R = r < 0 ? ref : &ranks[r];
        expect_status(R, "routing", R->st_routing, MOE_STATUS_SUCCESS);
        expect_status(R, "stats", R->st_stats, MOE_STATUS_SUCCESS);
        expect_status(R, "backward", R->st_bwd, bwd_want);
        expect_status(R, "reduce_replica_grads", R->st_rep, MOE_STATUS_SUCCESS);
        expect_status(R, "allreduce_router_grads", R->st_ar, MOE_STATUS_SUCCESS);
        expect_status(R, "get_placement", R->st_getpl, MOE_STATUS_SUCCESS);
    }

    /* the routing of every token: any difference must come from a near tie (then skip) */
    for (int r = 0; r < P; ++r) {
        const fz_rank_t *R = &ranks[r];
        for (int64_t t = 0; t < sp->T[r]; ++t) {
            const int64_t g = sp->begin[r] + t;
            if (memcmp(R->idx + t * K, ref->idx + g * K, (size_t)K * sizeof(int32_t)) == 0)
                continue;
            if (!sp->forced && near_tie(sp, ref, g)) return 0;
            FAIL("rank %d: token %lld (global %lld) routed to expert %d first, the single-rank "
                 "layer to %d, without a near tie",
                 r, (long long)t, (long long)g, R->idx[t * K], ref->idx[g * K]);
        }
    }
    for (int r = 0; r < P; ++r) {
        const fz_rank_t *R = &ranks[r];
        /* the placement read back */
        if (R->num_slots != want_slots ||
            memcmp(R->num_local, want.num_local, (size_t)P * sizeof(int64_t)) != 0 ||
            memcmp(R->experts, want.experts, (size_t)want_slots * sizeof(int32_t)) != 0)
            FAIL("rank %d: the placement read back (%lld slots) is not the last valid one (%lld)",
                 r, (long long)R->num_slots, (long long)want_slots);
        /* global counts */
        if (R->stats.num_tokens != sp->TT)
            FAIL("rank %d: stats.num_tokens %lld, expected %lld", r,
                 (long long)R->stats.num_tokens, (long long)sp->TT);
        if (memcmp(R->tpe, ref->tpe, (size_t)E * sizeof(int64_t)) != 0)
            FAIL("rank %d: tokens_per_expert differ from the single-rank layer's", r);
        /* y and dx per token */
        const int64_t b = sp->begin[r], n = sp->T[r];
        compare_rows("y", r, R->y, ref->y + b * D, n, D, max_abs(ref->y, sp->TT * D));
        if (bwd_want == MOE_STATUS_SUCCESS)
            compare_rows("dx", r, R->dx, ref->dx + b * D, n, D, max_abs(ref->dx, sp->TT * D));
        /* gradients: the experts this rank holds (replicas summed), the replicated parameters
         * (all-reduced); all zero after a refused backward */
        for (int p = 0; p < MOE_PARAM_COUNT; ++p) {
            const int64_t per = per_expert(c, p);
            const int64_t want_n = per ? want.num_local[r] * per : ref->numel[p];
            if (p == MOE_PARAM_W1 || p == MOE_PARAM_W2 || p == MOE_PARAM_B1 ||
                p == MOE_PARAM_B2) {
                if (R->numel[p] != want_n)
                    FAIL("rank %d: param %d has %lld entries, expected %lld", r, p,
                         (long long)R->numel[p], (long long)want_n);
            } else if (R->numel[p] != ref->numel[p]) {
                FAIL("rank %d: param %d has %lld entries, the single-rank layer %lld", r, p,
                     (long long)R->numel[p], (long long)ref->numel[p]);
            }
            if (R->numel[p] == 0) continue;
            if (bwd_want != MOE_STATUS_SUCCESS) {
                if (max_abs(R->grad[p], R->numel[p]) != 0.0)
                    FAIL("rank %d: param %d has a gradient after a refused backward", r, p);
                continue;
            }
            const double whole = max_abs(ref->grad[p], ref->numel[p]);
            if (per) {
                for (int64_t le = 0; le < want.num_local[r]; ++le) {
                    const int32_t e = want.experts[rank_begin[r] + le];
                    compare_rows(p == MOE_PARAM_W1 ? "grad W1" : p == MOE_PARAM_W2 ? "grad W2"
                                                              : "grad b",
                                 r, R->grad[p] + le * per, ref->grad[p] + e * per, 1, per,
                                 whole);
                }
            } else {
                compare_rows("replicated grad", r, R->grad[p], ref->grad[p], 1, R->numel[p],
                             whole);
            }
        }
    }
    /* replicas hold bitwise equal gradients, and so do the all-reduced parameters */
    for (int r = 0; r < P; ++r)
        for (int q = r + 1; q < P; ++q) {
            for (int p = 0; p < MOE_PARAM_COUNT; ++p) {
                const int64_t per = per_expert(c, p);
                if (per == 0) {
                    if (ranks[r].numel[p] &&
                        memcmp(ranks[r].grad[p], ranks[q].grad[p],
                               (size_t)ranks[r].numel[p] * sizeof(float)) != 0)
                        FAIL("ranks %d and %d: all-reduced param %d differs", r, q, p);
                    continue;
                }
                for (int64_t i = 0; i < want.num_local[r]; ++i)
                    for (int64_t j = 0; j < want.num_local[q]; ++j)
                        if (want.experts[rank_begin[r] + i] == want.experts[rank_begin[q] + j] &&
                            memcmp(ranks[r].grad[p] + i * per, ranks[q].grad[p] + j * per,
                                   (size_t)per * sizeof(float)) != 0)
                            FAIL("ranks %d and %d: replicas of expert %d differ in param %d", r,
                                 q, want.experts[rank_begin[r] + i], p);
            }
        }
    return 1;
}

/* the spec in words (FZ_EP_VERBOSE=1), for reproducing a failing input */
static void describe(const fz_spec_t *sp) {
    const moe_layer_config_t *c = &sp->cfg;
    fprintf(stderr,
            "fuzz_ep input: P %d, D %lld, F %lld, E %lld, K %lld, activation %d, gate %d, "
            "renormalize %d, score_func %d, groups %lld/%lld (score %d), scaling %g, "
            "expert_bias %d, losses %g %g %g %g, chunks %lld, shared %lld (d_ff %lld, gate %d), "
            "seed %llu, training %d, selection bias %d, mask %d, forced %d, x_bad rank %d, "
            "dy_bad rank %d\n  tokens per rank:",
            sp->P, (long long)c->d_model, (long long)c->d_ff, (long long)c->num_experts,
            (long long)c->top_k, (int)c->activation, (int)c->gate, c->renormalize,
            (int)c->score_func, (long long)c->topk_group, (long long)c->num_groups,
            (int)c->group_score, c->routed_scaling_factor, c->expert_bias, c->switch_loss_coef,
            c->importance_loss_coef, c->load_loss_coef, c->z_loss_coef, (long long)c->num_chunks,
            (long long)c->num_shared_experts, (long long)c->shared_d_ff, c->shared_expert_gate,
            (unsigned long long)c->seed, sp->training, sp->use_bias, sp->use_mask, sp->forced,
            sp->x_bad, sp->dy_bad);
    for (int r = 0; r < sp->P; ++r) fprintf(stderr, " %lld", (long long)sp->T[r]);
    for (int i = 0; i < sp->num_place; ++i) {
        fprintf(stderr, "\n  placement %d (%s):", i, sp->place[i].valid ? "valid" : "invalid");
        int64_t at = 0;
        for (int q = 0; q < sp->P; ++q) {
            fprintf(stderr, " rank %d [%lld]{", q, (long long)sp->place[i].num_local[q]);
            for (int64_t k = 0; k < sp->place[i].num_local[q] && k <= FZ_MAX_E && at >= 0 &&
                                at < FZ_EXPERTS_ROOM;
                 ++k, ++at)
                fprintf(stderr, "%s%d", k ? " " : "", sp->place[i].experts[at]);
            fprintf(stderr, "}");
        }
    }
    fprintf(stderr, "\n");
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    fz_t f = {data, size};
    fz_spec_t *sp = (fz_spec_t *)calloc(1, sizeof *sp);
    fz_rank_t *ref = (fz_rank_t *)calloc(1, sizeof *ref);
    fz_rank_t *ranks = (fz_rank_t *)calloc(FZ_MAX_P, sizeof *ranks);
    if (!sp || !ref || !ranks) abort();
    fuzz_spec(&f, sp);
    if (getenv("FZ_EP_VERBOSE")) describe(sp);

    /* the single-rank layer on every token */
    ref->sp = sp;
    ref->rank = -1;
    rank_main(ref);
    if (ref->st_create != MOE_STATUS_SUCCESS) FAIL("the config was refused: %s", ref->err);

    if (moe_comm_create_local(sp->comm, sp->P) != MOE_STATUS_SUCCESS)
        FAIL("comm_create_local(%d): %s", sp->P, moe_last_error());
    for (int r = 0; r < sp->P; ++r) {
        if (moe_comm_rank(sp->comm[r]) != r || moe_comm_size(sp->comm[r]) != sp->P)
            FAIL("comm %d: rank %d of %d", r, moe_comm_rank(sp->comm[r]),
                 moe_comm_size(sp->comm[r]));
        if (moe_comm_set_timeout(sp->comm[r], FZ_COMM_TIMEOUT_S) != MOE_STATUS_SUCCESS)
            FAIL("comm_set_timeout: %s", moe_last_error());
    }
    pthread_t th[FZ_MAX_P];
    for (int r = 0; r < sp->P; ++r) {
        ranks[r].sp = sp;
        ranks[r].rank = r;
        if (pthread_create(&th[r], NULL, rank_main, &ranks[r]) != 0) abort();
    }
    for (int r = 0; r < sp->P; ++r) pthread_join(th[r], NULL);
    for (int r = 0; r < sp->P; ++r)
        if (moe_comm_destroy(sp->comm[r]) != MOE_STATUS_SUCCESS)
            FAIL("comm_destroy: %s", moe_last_error());

    compare(sp, ref, ranks);
    free(ranks);
    free(ref);
    free(sp);
    return 0;
}
