/* check.c - --check: one training forward + backward of every rank's tokens from zeroed
 * gradients, gathered at rank 0 and compared there with a float64 per-token computation
 * (check_ref.c) from the layer's own parameters: the outputs y, dx and every gradient, and the
 * routing the layer reported (experts, gates and drops recomputed where the router's choice is
 * known: token choice, no noise, not forced).
 *
 * Tolerance, as a fraction of each tensor's largest reference magnitude (gradients of different
 * tensors differ by orders of magnitude, and elements near 0 carry no meaning): f32 sums of
 * depth n (D, F or the tokens of an expert) carry about sqrt(n) roundings of 2^-24 each, so
 * 1e-4 covers depths past 10^6; f16 rounds inputs, weights and stored activations to 11 bits
 * (2^-11 ~ 5e-4, times a few roundings: 5e-3); bf16 to 8 bits (2^-8 ~ 4e-3: 3e-2).
 *
 * MOE_BENCH_CHECK_PERTURB=NAME (y, dx, dWg, dW1, db1, dW2, db2) moves the first element of that
 * tensor by half its largest reference magnitude before the comparison: the check must then
 * fail (the tests use it to show that it can). */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "bench.h"

static double check_tolerance(moe_dtype_t t) {
    return t == MOE_DTYPE_F32 ? 1e-4 : t == MOE_DTYPE_F16 ? 5e-3 : 3e-2;
}

/* |got - ref| <= tol * max|ref| element by element */
static void compare(bench_check_acc_t *acc, const char *what, float *got, const double *ref,
                    int64_t n, double tol) {
    double scale = 0.0;
    for (int64_t i = 0; i < n; ++i) scale = fmax(scale, fabs(ref[i]));
    const char *perturb = getenv("MOE_BENCH_CHECK_PERTURB");
    if (perturb && n > 0 && strcmp(perturb, what) == 0) got[0] += (float)(0.5 * scale + 1e-3);
    int64_t wrong = 0;
    for (int64_t i = 0; i < n; ++i) {
        double err = fabs((double)got[i] - ref[i]);
        if (!(err <= tol * scale)) {
            if (wrong == 0 && acc->wrong < 10)
                fprintf(stderr, "# check: %s[%lld] = %.9g, reference %.9g\n", what, (long long)i,
                        got[i], ref[i]);
            ++wrong;
        }
        if (scale > 0) acc->worst = fmax(acc->worst, err / scale);
    }
    acc->wrong += wrong, acc->checked += n;
}

/* sizes of the layer's tensors on one rank */
typedef struct check_dims {
    int64_t D, E, W, P;
    int64_t np[MOE_PARAM_COUNT]; /* elements of each parameter on one rank */
    int64_t nexp;                /* floats of the expert block: values then gradients */
    int64_t *tok;                /* (P) tokens of each rank at step 0 */
    int64_t Tg;                  /* their sum */
} check_dims_t;

/* floats rank q sends: y, dx (tok D each), then expert index, gate, kept (tok W each) */
static int64_t row_floats(const check_dims_t *d, int q) {
    return d->tok[q] * (2 * d->D + 3 * d->W);
}

/* this rank's y, dx and routing, packed as floats (indices and flags are exact in f32) */
static int pack_rows(moe_layer_t *layer, const tool_mem_t *m, moe_dtype_t dt, int64_t n,
                     const check_dims_t *d, void *y_dev, void *dx_dev, float *out) {
    const int64_t nd = n * d->D, nw = n * d->W;
    if (!n) return 0;
    float *y = tool_fetch_f32(m, dt, y_dev, nd), *dx = tool_fetch_f32(m, dt, dx_dev, nd);
    int32_t *ix = malloc((size_t)nw * 4), *kp = malloc((size_t)nw * 4);
    int rc = -1;
    if (y && dx && ix && kp &&
        moe_layer_routing(layer, ix, out + 2 * nd + nw, kp) == MOE_STATUS_SUCCESS) {
        memcpy(out, y, (size_t)nd * 4), memcpy(out + nd, dx, (size_t)nd * 4);
        for (int64_t i = 0; i < nw; ++i) out[2 * nd + i] = (float)ix[i];
        for (int64_t i = 0; i < nw; ++i) out[2 * nd + 2 * nw + i] = (float)kp[i];
        rc = 0;
    }
    free(y), free(dx), free(ix), free(kp);
    return rc;
}

/* this rank's expert parameters W1 b1 W2 b2, then their gradients, as f32 */
static int pack_experts(moe_layer_t *layer, const tool_mem_t *m, moe_dtype_t dt,
                        const check_dims_t *d, float *out) {
    for (int g = 0; g < 2; ++g)
        for (int p = MOE_PARAM_W1; p < MOE_PARAM_COUNT; ++p) {
            void *v = NULL, *gr = NULL;
            if (!d->np[p]) continue;
            if (moe_layer_param(layer, (moe_param_t)p, &v, &gr, NULL) != MOE_STATUS_SUCCESS)
                return -1;
            float *f = tool_fetch_f32(m, dt, g ? gr : v, d->np[p]);
            if (!f) return -1;
            memcpy(out, f, (size_t)d->np[p] * 4);
            free(f);
            out += d->np[p];
        }
    return 0;
}

/* byte blocks of every rank at rank 0: sizes[q] floats each; *all malloc'd at rank 0 */
static int gather_floats(const bench_rank_arg_t *a, const float *mine, int64_t n,
                         const int64_t *sizes, float **all) {
    bench_world_t *w = (bench_world_t *)&a->w;
    size_t *each = NULL;
    int rc = 0;
    *all = NULL;
    if (w->rank == 0) {
        int64_t tot = 0;
        for (int q = 0; q < w->size; ++q) tot += sizes[q];
        *all = malloc((size_t)(tot + 1) * 4);
        each = malloc((size_t)w->size * sizeof *each);
        for (int q = 0; each && q < w->size; ++q) each[q] = (size_t)sizes[q] * 4;
        if (!*all || !each) rc = -1;
    }
    /* every rank joins the gather even after a local failure */
    if (bench_world_gatherv(w, mine, (size_t)n * 4, *all, each) != 0) rc = -1;
    free(each);
    return rc;
}

/* the gathered expert blocks, rank by rank [W1 b1 W2 b2 | dW1 db1 dW2 db2], as global tensors
 * in expert order (rank q owns the q-th contiguous range): v[0..3] values, v[4..7] gradients */
static int unpack_experts(const check_dims_t *d, const float *ex_all, float **v) {
    const int p0 = MOE_PARAM_W1;
    for (int i = 0; i < 8; ++i) {
        v[i] = NULL;
        if (d->np[p0 + i % 4] && !(v[i] = malloc((size_t)(d->np[p0 + i % 4] * d->P) * 4)))
            return -1;
    }
    for (int64_t q = 0; q < d->P; ++q) {
        const float *b = ex_all + q * d->nexp;
        for (int i = 0; i < 8; ++i) {
            const int64_t n = d->np[p0 + i % 4];
            if (n) memcpy(v[i] + q * n, b, (size_t)n * 4);
            b += n;
        }
    }
    return 0;
}

/* x and dy of every rank, concatenated and rounded to the layer's dtype: what the ranks saw */
static int all_inputs(const bench_rank_arg_t *a, const float *wg, int64_t T, const check_dims_t *d,
                      float *x, float *dy) {
    int64_t off = 0;
    for (int q = 0; q < d->P; ++q) {
        bench_workload_t wq = {0, NULL, NULL};
        int bad = bench_make_workload(a->o, a->rp, wg, T, q, (int)d->P, &wq) != 0;
        if (!bad) {
            memcpy(x + off * d->D, wq.x, (size_t)(d->tok[q] * d->D) * 4);
            memcpy(dy + off * d->D, wq.dy, (size_t)(d->tok[q] * d->D) * 4);
        }
        bench_free_workload(&wq);
        if (bad) return -1;
        off += d->tok[q];
    }
    moe_dtype_t dt = a->o->cfg.dtype;
    return tool_round_to_dtype(dt, x, d->Tg * d->D) || tool_round_to_dtype(dt, dy, d->Tg * d->D);
}

/* the float64 reference over every rank's tokens (each rank's own capacity and routing) */
typedef struct root_ref {
    float *x, *dy, *y, *dx, *gate;  /* (Tg, D) twice as seen, (Tg, D) twice as computed, (Tg, W) */
    int32_t *idx, *kept;            /* (Tg, W) */
    float *ev[8];                   /* expert values and gradients (unpack_experts) */
    double *ry, *rdx, *rdwg, *rdw[4];
} root_ref_t;

static void root_ref_free(root_ref_t *r) {
    free(r->x), free(r->dy), free(r->y), free(r->dx), free(r->gate), free(r->idx), free(r->kept);
    free(r->ry), free(r->rdx), free(r->rdwg);
    for (int i = 0; i < 8; ++i) free(r->ev[i]);
    for (int i = 0; i < 4; ++i) free(r->rdw[i]);
}

/* unpacks the gathered rows (pack_rows) of every rank */
static void unpack_rows(const check_dims_t *d, const float *rows_all, root_ref_t *r) {
    const float *b = rows_all;
    int64_t off = 0;
    for (int64_t q = 0; q < d->P; ++q) {
        const int64_t nd = d->tok[q] * d->D, nw = d->tok[q] * d->W;
        memcpy(r->y + off * d->D, b, (size_t)nd * 4);
        memcpy(r->dx + off * d->D, b + nd, (size_t)nd * 4);
        for (int64_t i = 0; i < nw; ++i) {
            r->idx[off * d->W + i] = (int32_t)b[2 * nd + i];
            r->gate[off * d->W + i] = b[2 * nd + nw + i];
            r->kept[off * d->W + i] = (int32_t)b[2 * nd + 2 * nw + i];
        }
        b += row_floats(d, (int)q), off += d->tok[q];
    }
}

/* The reference recomputes the router's choice and gradient for plain softmax routing without
 * aux losses; the routing extensions (sigmoid, groups, availability, scaling: a preset may set
 * them) and aux-loss terms are left to the library's own tests (tests/test_routing_ext.cc):
 * then the check compares y and the expert gradients given the reported routing only. */
static int plain_router(const moe_layer_config_t *c) {
    return c->score_func == MOE_SCORE_SOFTMAX && c->num_groups <= 1 &&
           c->expert_dropout == 0.0 && c->routed_scaling_factor == 1.0 &&
           c->switch_loss_coef == 0.0 && c->importance_loss_coef == 0.0 &&
           c->load_loss_coef == 0.0 && c->z_loss_coef == 0.0;
}

/* runs bench_ref_layer on each rank's block of tokens */
static int run_reference(const bench_rank_arg_t *a, const check_dims_t *d, const float *wg,
                         root_ref_t *r, bench_ref_out_t *out) {
    const moe_layer_config_t *c = &a->o->cfg;
    const int token = c->router == MOE_ROUTER_TOKEN_CHOICE;
    const double tol = check_tolerance(c->dtype);
    bench_ref_in_t in = {
        .D = d->D, .F = c->d_ff, .E = d->E, .W = d->W,
        .act = c->activation, .gate_type = c->gate, .renormalize = c->renormalize,
        .check_routing = token && !a->rp && !c->noisy_gating && !(c->bias_update_rate > 0) &&
                         plain_router(c),
        .check_capacity = token,
        .router_grads = token && !a->rp && !c->noisy_gating && plain_router(c),
        .capacity_factor = c->capacity_factor, .tie_eps = tol, .gate_tol = tol,
        .wg = wg, .w1 = r->ev[0], .b1 = r->ev[1], .w2 = r->ev[2], .b2 = r->ev[3],
    };
    int64_t off = 0;
    for (int64_t q = 0; q < d->P; ++q) {
        in.T = d->tok[q];
        in.x = r->x + off * d->D, in.dy = r->dy + off * d->D;
        in.idx = r->idx + off * d->W, in.kept = r->kept + off * d->W;
        in.gate = r->gate + off * d->W;
        out->y = r->ry + off * d->D, out->dx = r->rdx + off * d->D;
        if (bench_ref_layer(&in, out) != 0) return -1;
        off += d->tok[q];
    }
    return 0;
}

/* replay: the reported experts must be the forced ones of step 0 */
static void check_forced(const bench_rank_arg_t *a, const check_dims_t *d, const root_ref_t *r,
                         bench_check_acc_t *acc) {
    const int32_t *want = a->rp->index[0];
    int64_t bad = 0, n = d->Tg * d->W;
    for (int64_t i = 0; i < n; ++i) bad += r->idx[i] != want[i];
    if (bad) fprintf(stderr, "# check: %lld routing entries differ from the replayed ones\n",
                     (long long)bad);
    acc->wrong += bad, acc->checked += n;
}

/* rank 0: the reference, then every comparison */
static int check_at_root(const bench_rank_arg_t *a, moe_layer_t *layer, const tool_mem_t *m,
                         const float *wg, int64_t T, const check_dims_t *d, const float *rows_all,
                         const float *ex_all, bench_check_acc_t *acc) {
    const moe_layer_config_t *c = &a->o->cfg;
    const int64_t TD = d->Tg * d->D, TW = d->Tg * d->W, DE = d->D * d->E;
    const double tol = check_tolerance(c->dtype);
    static const char *ename[4] = {"dW1", "db1", "dW2", "db2"};
    root_ref_t r = {0};
    float *gwg = NULL;
    int rc = BENCH_EXIT_FAIL;
    r.x = malloc((size_t)(TD + 1) * 4), r.dy = malloc((size_t)(TD + 1) * 4);
    r.y = malloc((size_t)(TD + 1) * 4), r.dx = malloc((size_t)(TD + 1) * 4);
    r.gate = malloc((size_t)(TW + 1) * 4), r.idx = malloc((size_t)(TW + 1) * 4);
    r.kept = malloc((size_t)(TW + 1) * 4);
    r.ry = calloc((size_t)TD + 1, 8), r.rdx = calloc((size_t)TD + 1, 8);
    r.rdwg = calloc((size_t)DE + 1, 8);
    for (int i = 0; i < 4; ++i) r.rdw[i] = calloc((size_t)(d->np[MOE_PARAM_W1 + i] * d->P) + 1, 8);
    if (!r.x || !r.dy || !r.y || !r.dx || !r.gate || !r.idx || !r.kept || !r.ry || !r.rdx ||
        !r.rdwg || !r.rdw[0] || !r.rdw[1] || !r.rdw[2] || !r.rdw[3] ||
        unpack_experts(d, ex_all, r.ev) || all_inputs(a, wg, T, d, r.x, r.dy))
        goto done;
    unpack_rows(d, rows_all, &r);
    bench_ref_out_t out = {.dwg = r.rdwg,
                           .dw1 = r.rdw[0],
                           .db1 = d->np[MOE_PARAM_B1] ? r.rdw[1] : NULL,
                           .dw2 = r.rdw[2],
                           .db2 = d->np[MOE_PARAM_B2] ? r.rdw[3] : NULL};
    if (run_reference(a, d, wg, &r, &out) != 0) goto done;
    compare(acc, "y", r.y, r.ry, TD, tol);
    for (int i = 0; i < 4; ++i)
        if (r.ev[4 + i])
            compare(acc, ename[i], r.ev[4 + i], r.rdw[i], d->np[MOE_PARAM_W1 + i] * d->P, tol);
    /* gating noise reaches dx and the router's gradients through a draw this side cannot see */
    if (!c->noisy_gating && plain_router(c)) {
        void *g = NULL;
        if (moe_layer_param(layer, MOE_PARAM_ROUTER_WEIGHT, NULL, &g, NULL) != MOE_STATUS_SUCCESS ||
            !(gwg = tool_fetch_f32(m, c->dtype, g, DE)))
            goto done;
        compare(acc, "dx", r.dx, r.rdx, TD, tol);
        compare(acc, "dWg", gwg, r.rdwg, DE, tol);
    }
    if (out.route_wrong)
        fprintf(stderr, "# check: %lld routing checks differ from the recomputed router\n",
                (long long)out.route_wrong);
    acc->wrong += out.route_wrong, acc->checked += out.route_checked;
    if (a->rp) check_forced(a, d, &r, acc);
    rc = BENCH_EXIT_OK;
done:
    if (rc != BENCH_EXIT_OK) fprintf(stderr, "moe_bench: --check: out of host memory\n");
    root_ref_free(&r);
    free(gwg);
    return rc;
}

/* the layer under test: one training forward + backward from zeroed gradients, router
 * gradients summed over the ranks (the reference sees all tokens) */
static int check_step(const bench_rank_arg_t *a, const tool_mem_t *m, moe_layer_t *layer,
                      int64_t T, void *x_dev, void *dy_dev, void *y_dev, void *dx_dev) {
    moe_status_t st = moe_layer_zero_grad(layer, NULL);
    if (st == MOE_STATUS_SUCCESS)
        st = bench_step_layer(a, layer, m, T, 0, x_dev, y_dev, dy_dev, dx_dev, 1, NULL);
    if (st == MOE_STATUS_SUCCESS && a->w.size > 1)
        st = moe_layer_allreduce_router_grads(layer, NULL);
    if (st == MOE_STATUS_SUCCESS) return 0;
    fprintf(stderr, "moe_bench: --check: the training step failed: %s\n  %s\n",
            moe_status_string(st), moe_last_error());
    return -1;
}

int bench_check(const bench_rank_arg_t *a, const tool_mem_t *m, moe_layer_t *layer,
                const float *wg, int64_t T, void *x_dev, void *dy_dev, void *y_dev, void *dx_dev,
                bench_check_acc_t *acc) {
    const moe_layer_config_t *c = &a->o->cfg;
    const int P = a->w.size, me = a->w.rank;
    check_dims_t d = {.D = c->d_model, .E = c->num_experts, .W = moe_layer_routing_width(layer),
                      .P = P, .tok = calloc((size_t)P, sizeof(int64_t))};
    int64_t *rs = calloc((size_t)P, sizeof *rs), *es = calloc((size_t)P, sizeof *es);
    float *rows = NULL, *ex = NULL, *rows_all = NULL, *ex_all = NULL;
    double ok = d.tok && rs && es, *oks = malloc((size_t)P * sizeof *oks);
    for (int p = 0; p < MOE_PARAM_COUNT; ++p)
        if (moe_layer_param(layer, (moe_param_t)p, NULL, NULL, &d.np[p]) != MOE_STATUS_SUCCESS)
            ok = 0;
    for (int p = MOE_PARAM_W1; p < MOE_PARAM_COUNT; ++p) d.nexp += 2 * d.np[p];
    for (int q = 0; ok && q < P; ++q) {
        d.tok[q] = bench_rank_tokens(a->o, a->rp, T, 0, q, P, NULL), d.Tg += d.tok[q];
        rs[q] = row_floats(&d, q), es[q] = d.nexp;
    }
    if (ok && check_step(a, m, layer, T, x_dev, dy_dev, y_dev, dx_dev)) ok = 0;
    if (ok) {
        rows = calloc((size_t)rs[me] + 1, 4), ex = calloc((size_t)d.nexp + 1, 4);
        if (!rows || !ex || pack_rows(layer, m, c->dtype, d.tok[me], &d, y_dev, dx_dev, rows) ||
            pack_experts(layer, m, c->dtype, &d, ex))
            ok = 0;
    }
    /* every rank takes part in the collectives, whatever happened here */
    int bad = !oks || bench_world_allgather_f64((bench_world_t *)&a->w, &ok, 1, oks) != 0;
    for (int q = 0; !bad && q < P; ++q) bad = oks[q] == 0;
    bad |= gather_floats(a, rows, rows && ok ? rs[me] : 0, rs, &rows_all) != 0;
    bad |= gather_floats(a, ex, ex && ok ? d.nexp : 0, es, &ex_all) != 0;
    int rc = BENCH_EXIT_OK;
    if (bad) {
        fprintf(stderr, "moe_bench: rank %d: --check: a rank failed or ran out of memory\n", me);
        rc = BENCH_EXIT_FAIL;
    } else if (me == 0) {
        rc = check_at_root(a, layer, m, wg, T, &d, rows_all, ex_all, acc);
    }
    free(d.tok), free(rs), free(es), free(oks);
    free(rows), free(ex), free(rows_all), free(ex_all);
    return rc;
}
