/* train_mixture.c - a host training loop on the classic mixture-of-experts problem.
 *
 * The data come from R generating processes: a token belongs to regime r, its input is drawn
 * around the regime's centre, x = mu_r + n (n ~ N(0, I)), and its target is the regime's own
 * random teacher network, y = V_r tanh(U_r x + c_r). The model is one libmoe layer followed by a
 * linear readout written here in plain C, pred = MoE(x) Wh + bh, trained on the mean squared error
 * with the library's optimizer for the layer and the same Adam, done by hand, for the readout.
 *
 * The same binary then trains a dense baseline with the same active parameters per token: one
 * feed-forward network of width K*F (an MoE layer with E = 1, K = 1), same data, steps and lr.
 * At the end it prints both held-out losses and, for the MoE, which experts each regime's
 * tokens went to: the experts specialise, one regime each.
 *
 * Load-balancing experiments: --strategy picks how the router is kept balanced (aux losses,
 * loss-free bias, expert choice), --capacity-factor the expert capacity, --csv FILE writes the
 * per-expert load, imbalance, drops and aux losses of every logged step (columns in
 * docs/load-balancing.md) and --trace FILE records the routing of every training forward.
 *
 * Under mpirun (built with MPI) every process is one rank of an expert-parallel layer: each
 * rank draws its own shard of every batch, holds its experts (contiguous; --rebalance-every
 * re-places them from the running load), and the replicated weights (router,
 * noise network, readout) get their gradients summed over ranks before each step; the dense
 * baseline, one expert that cannot be split, is trained data-parallel. Rank 0 prints.
 *
 * This file trains, evaluates and reports; mixture_options.c holds the command line,
 * mixture_data.c the problem and mixture_model.c the layer with its readout (mixture.h).
 *
 * usage: train_mixture [--steps N] [--seed S] [--backend cpu|cuda] [--check] [--help] ... */
#define _POSIX_C_SOURCE 199309L

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "core/clock.h"
#include "moe/moe.h"
#include "mixture.h"
#include "tool_util.h"

#ifdef MOE_EXAMPLE_WITH_MPI
#include <mpi.h>
#endif

/* ---------------------------------------------------------------------------------------------
 * training and evaluation
 * ------------------------------------------------------------------------------------------- */



/* the balancing record of one logged step, global over ranks (the CSV columns) */
typedef struct {
    int64_t *tokens, *dropped; /* (E) moe_layer_stats: routed before capacity, dropped */
    float *bias;               /* (E) loss-free selection bias */
    int32_t *kept;             /* (T, W) this rank's kept flags */
} logbuf_t;

static void csv_header(FILE *f, int E, int P) {
    fprintf(f, "step,loss,tokens");
    for (int e = 0; e < E; ++e) fprintf(f, ",load_%d", e);
    for (int e = 0; e < E; ++e) fprintf(f, ",routed_%d", e);
    fprintf(f, ",imbalance,imbalance_routed,dropped_frac,unrouted_frac,switch_loss,"
               "importance_loss,load_loss,z_loss,aux_loss");
    for (int e = 0; e < E; ++e) fprintf(f, ",bias_%d", e);
    fprintf(f, ",rank_imbalance");
    for (int q = 0; q < P; ++q) fprintf(f, ",rank_rows_%d", q);
    fprintf(f, ",step_ms\n");
}

/* one progress line (and CSV row) of the layer's last training forward; loss is the mean
 * training MSE since the previous one, step_ms this rank's mean wall time of a training step
 * (forward, backward, optimizer) since then. Every rank calls it (it sums over ranks). */
static int log_step(model_t *m, const options_t *o, logbuf_t *lb, int s, double loss,
                    double step_ms, int T, FILE *csv) {
    moe_routing_stats_t st;
    CHECK(moe_layer_stats(m->layer, &st, lb->tokens, lb->dropped));
    const int E = m->E;
    const int64_t W = moe_layer_routing_width(m->layer);
    /* tokens of this rank that no expert processes: every choice dropped (token choice) or
     * picked by no expert (expert choice) */
    double unrouted = 0.0;
    if (T > 0) {
        CHECK(moe_layer_routing(m->layer, NULL, NULL, lb->kept));
        for (int t = 0; t < T; ++t) {
            int any = 0;
            for (int64_t j = 0; j < W; ++j) any |= lb->kept[(int64_t)t * W + j];
            unrouted += any ? 0.0 : 1.0;
        }
    }
    sum_over_ranks_d(o, &unrouted, 1);
    /* per-rank load of an expert-parallel layer: rows each rank's experts received (one
     * rank: all rows); and the step time of the slowest rank */
    double rank_imb = 0.0;
    double *rr = calloc((size_t)o->world * 2, sizeof(double)), *ms = rr + o->world;
    if (!rr) return 1;
    rr[o->rank] = (double)st.rows_received;
    ms[o->rank] = step_ms;
    sum_over_ranks_d(o, rr, 2 * o->world);
    double mx = 0.0, sum = 0.0;
    for (int q = 0; q < o->world; ++q) {
        mx = rr[q] > mx ? rr[q] : mx, sum += rr[q];
        step_ms = ms[q] > step_ms ? ms[q] : step_ms;
    }
    if (m->expert_parallel && o->world > 1) rank_imb = sum > 0.0 ? mx / (sum / o->world) : 0.0;
    CHECK(moe_layer_score_bias(m->layer, lb->bias));
    if (!m->expert_parallel && o->world > 1) {
        /* a replicated layer's counts are this rank's own (aux losses too): add them up */
        double c[3] = {(double)st.num_tokens, (double)st.num_assignments,
                       (double)st.num_dropped};
        sum_over_ranks_d(o, c, 3);
        st.num_tokens = (int64_t)c[0], st.num_assignments = (int64_t)c[1];
        st.num_dropped = (int64_t)c[2];
        for (int e = 0; e < E; ++e) {
            double v[2] = {(double)lb->tokens[e], (double)lb->dropped[e]};
            sum_over_ranks_d(o, v, 2);
            lb->tokens[e] = (int64_t)v[0], lb->dropped[e] = (int64_t)v[1];
        }
    }
    if (o->rank != 0) {
        free(rr);
        return 0;
    }

    /* load: assignments the experts compute, after capacity (for expert choice every expert
     * fills its C slots, so the load is flat by construction) */
    double total = 0.0, peak = 0.0;
    for (int e = 0; e < E; ++e) {
        double l = (double)(lb->tokens[e] - lb->dropped[e]);
        total += l;
        peak = l > peak ? l : peak;
    }
    double imbalance = total > 0.0 ? peak / (total / E) : 0.0;
    double unrouted_frac = st.num_tokens > 0 ? unrouted / (double)st.num_tokens : 0.0;
    /* token choice: assignments dropped by capacity over T*K; expert choice has no drops of a
     * wanted assignment, its counterpart is the token that no expert picked */
    double dropped_frac = o->router == MOE_ROUTER_EXPERT_CHOICE
                              ? unrouted_frac
                              : (st.num_assignments > 0
                                     ? (double)st.num_dropped / (double)st.num_assignments
                                     : 0.0);
    printf("step %5d  loss %.5f  load/expert", s, loss);
    for (int e = 0; e < E; ++e) printf(" %4lld", (long long)(lb->tokens[e] - lb->dropped[e]));
    printf("  imbalance %.3f  dropped %.3f  switch %.3f  z %.3f  aux %.5f", imbalance,
           dropped_frac, st.switch_loss, st.z_loss, st.aux_loss);
    if (rank_imb > 0.0) printf("  rank load %.3f", rank_imb);
    printf("  step %.2f ms\n", step_ms);
    if (csv) {
        fprintf(csv, "%d,%.6g,%lld", s, loss, (long long)st.num_tokens);
        for (int e = 0; e < E; ++e)
            fprintf(csv, ",%lld", (long long)(lb->tokens[e] - lb->dropped[e]));
        for (int e = 0; e < E; ++e) fprintf(csv, ",%lld", (long long)lb->tokens[e]);
        fprintf(csv, ",%.6g,%.6g,%.6g,%.6g,%.6g,%.6g,%.6g,%.6g,%.6g", imbalance, st.imbalance,
                dropped_frac, unrouted_frac, st.switch_loss, st.importance_loss, st.load_loss,
                st.z_loss, st.aux_loss);
        for (int e = 0; e < E; ++e) fprintf(csv, ",%.6g", lb->bias[e]);
        /* one rank (or a replicated layer): 1 by definition */
        fprintf(csv, ",%.6g", rank_imb > 0.0 ? rank_imb : 1.0);
        for (int q = 0; q < o->world; ++q) fprintf(csv, ",%.0f", rr[q]);
        fprintf(csv, ",%.6g\n", step_ms);
    }
    free(rr);
    return 0;
}

/* trains m for o->steps on fresh batches of o->batch tokens over all ranks (the data seed is
 * the same for every model, so the MoE and the dense baseline see the same tokens); writes the
 * CSV rows when csv is given; returns the held-out MSE, or -1. Each rank trains on its own
 * shard of every batch: every rank draws the batch from the one stream and keeps its slice, so a
 * run on P ranks sees exactly the tokens of the one-process run (drawing is cheap here; a real
 * loader would read only its shard). */
static double train(model_t *m, const problem_t *p, const options_t *o, const batch_t *eval,
                    FILE *csv) {
    rng_t rng = {o->seed * 1000003ull + 5ull};
    int lo, hi;
    shard(o, o->batch, &lo, &hi);
    const int T = hi - lo;
    batch_t bt;
    if (batch_alloc(&bt, p, o->batch)) return -1.0;
    const float *x = bt.x + (size_t)lo * p->D, *y = bt.y + (size_t)lo * p->O;
    logbuf_t lb = {calloc((size_t)m->E, sizeof(int64_t)), calloc((size_t)m->E, sizeof(int64_t)),
                   calloc((size_t)m->E, sizeof(float)),
                   calloc((size_t)(T > 0 ? T : 1) * (size_t)m->E, sizeof(int32_t))};
    double result = -1.0;
    if (!lb.tokens || !lb.dropped || !lb.bias || !lb.kept) goto done;
    if (csv && o->rank == 0) csv_header(csv, m->E, o->world);
    double run = 0.0, t0 = moe_now_s(), step_s = 0.0;
    int nrun = 0;
    if (o->rank == 0) printf("\n== %s: E=%d K=%d ==\n", m->name, m->E, m->K);
    for (int s = 1; s <= o->steps; ++s) {
        sample(p, &rng, o->batch, bt.x, bt.y, bt.regime);
        /* step time: the layer's forward and backward, the gradient sums and the optimizer
         * (not the sampling, which every rank does for the whole batch, nor a re-placement) */
        double ts = moe_now_s();
        double se = model_forward(m, o->backend, x, y, T, 1);
        if (se < 0.0 || model_backward_step(m, o->backend, y, T, o->batch, o)) goto done;
        step_s += moe_now_s() - ts;
        sum_over_ranks_d(o, &se, 1);
        run += se / ((double)o->batch * m->O), ++nrun;
        if (s % o->log_every == 0 || s == o->steps) {
            if (log_step(m, o, &lb, s, run / nrun, 1e3 * step_s / nrun, T, csv)) goto done;
            run = 0.0, nrun = 0, step_s = 0.0;
        }
        if (m->expert_parallel && o->world > 1 && o->rebalance_every > 0 &&
            s % o->rebalance_every == 0 && s < o->steps) {
            /* after the log (its stats need the last forward); every rank holds the same
             * global load: the same plan everywhere, and the experts move with their Adam
             * moments */
            double before = 0.0, after = 0.0;
            moe_status_t st = moe_layer_rebalance(m->layer, o->redundant, m->opt, &before, &after);
            if (st != MOE_STATUS_SUCCESS) {
                fprintf(stderr, "error: moe_layer_rebalance: %s\n", moe_last_error());
                goto done;
            }
            if (o->rank == 0)
                printf("  step %d: re-placed the experts, rank load max/mean %.3f -> %.3f "
                       "planned\n", s, before, after);
        }
    }
    if (o->trace_path) moe_layer_trace_close(m->layer); /* the training forwards only */
    double secs = moe_now_s() - t0;
    shard(o, eval->T, &lo, &hi);
    double ev = model_forward(m, o->backend, eval->x + (size_t)lo * p->D,
                              eval->y + (size_t)lo * p->O, hi - lo, 0);
    if (ev < 0.0) goto done;
    sum_over_ranks_d(o, &ev, 1);
    result = ev / ((double)eval->T * m->O);
    if (o->rank == 0)
        printf("%s: held-out MSE %.5f after %d steps (%.1f s)\n", m->name, result, o->steps,
               secs);
done:
    batch_free(&bt), free(lb.tokens), free(lb.dropped), free(lb.bias), free(lb.kept);
    return result;
}

/* regime x expert table of the last (held-out) forward, over all ranks; returns the mean over
 * regimes of the largest fraction of the regime's processed assignments that one expert took
 * (1.0 = every regime goes to one expert) */
static double specialisation(model_t *m, const options_t *o, const batch_t *eval, int R) {
    int lo, hi;
    shard(o, eval->T, &lo, &hi);
    const int T = hi - lo, E = m->E;
    const int64_t W = moe_layer_routing_width(m->layer);
    int32_t *idx = malloc(sizeof(int32_t) * (size_t)(T > 0 ? T : 1) * (size_t)W);
    int32_t *kept = malloc(sizeof(int32_t) * (size_t)(T > 0 ? T : 1) * (size_t)W);
    double *frac = calloc((size_t)(R * E), sizeof(double));
    double *count = calloc((size_t)R, sizeof(double));
    double purity = 0.0;
    if (!idx || !kept || !frac || !count ||
        (T > 0 && moe_layer_routing(m->layer, idx, NULL, kept) != MOE_STATUS_SUCCESS)) {
        fprintf(stderr, "error: routing table: %s\n", moe_last_error());
        purity = -1.0;
        goto done;
    }
    for (int t = 0; t < T; ++t) {
        int r = eval->regime[lo + t];
        for (int64_t j = 0; j < W; ++j)
            if (kept[t * W + j]) frac[r * E + idx[t * W + j]] += 1.0, count[r] += 1.0;
    }
    sum_over_ranks_d(o, frac, R * E);
    sum_over_ranks_d(o, count, R);
    if (o->rank == 0)
        printf("\nfraction of each regime's processed held-out assignments that each expert "
               "took:\n  regime ");
    for (int e = 0; e < E && o->rank == 0; ++e) printf("  exp%-3d", e);
    if (o->rank == 0) printf("\n");
    for (int r = 0; r < R; ++r) {
        double best = 0.0;
        if (o->rank == 0) printf("  %6d ", r);
        for (int e = 0; e < E; ++e) {
            double f = count[r] > 0.0 ? frac[r * E + e] / count[r] : 0.0;
            best = f > best ? f : best;
            if (o->rank == 0) printf("  %5.3f ", f);
        }
        if (o->rank == 0) printf("\n");
        purity += best / R;
    }
    if (o->rank == 0)
        printf("  specialisation (mean over regimes of the largest fraction): %.3f\n", purity);
done:
    free(idx), free(kept), free(frac), free(count);
    return purity;
}

static int run(options_t *o, moe_comm_t *comm);

int main(int argc, char **argv) {
    options_t o;
    int rc = parse(argc, argv, &o);
    if (rc) return rc;
    moe_comm_t *comm = NULL;
#ifdef MOE_EXAMPLE_WITH_MPI
    int mpi = tool_under_mpi();
    if (mpi) {
        MPI_Init(&argc, &argv);
        CHECK(moe_comm_create_mpi(&comm, NULL));
        o.rank = moe_comm_rank(comm);
        o.world = moe_comm_size(comm);
    }
#else
    if (tool_under_mpi())
        fprintf(stderr, "note: train_mixture was built without MPI: every process trains "
                        "alone\n");
#endif
    rc = run(&o, comm);
#ifdef MOE_EXAMPLE_WITH_MPI
    /* a rank that failed cannot leave its peers waiting in a collective */
    if (rc == 1 && o.world > 1) MPI_Abort(MPI_COMM_WORLD, 1);
    moe_comm_destroy(comm);
    if (mpi) MPI_Finalize();
#endif
    return rc == 3 ? 1 : rc;
}

/* the options that the number of ranks rules out: 0, or 2 with a message */
static int check_ranks(const options_t *o) {
    if (o->world > 1 && o->backend != MOE_BACKEND_CPU) {
        fprintf(stderr, "error: expert parallelism over MPI needs --backend cpu\n");
        return 2;
    }
    if (o->expect_ranks > 0 && o->world != o->expect_ranks) {
        fprintf(stderr, "error: running on %d rank%s, --expect-ranks %d\n", o->world,
                o->world == 1 ? "" : "s", o->expect_ranks);
        return 2;
    }
    return 0;
}

/* held-out MSE of predicting the mean target: the scale the losses are read against */
static double mean_predictor_mse(const batch_t *eval, int O) {
    double var = 0.0, mean[64] = {0};
    for (int t = 0; t < eval->T; ++t)
        for (int k = 0; k < O && k < 64; ++k) mean[k] += eval->y[t * O + k] / eval->T;
    for (int t = 0; t < eval->T; ++t)
        for (int k = 0; k < O && k < 64; ++k) {
            double e = eval->y[t * O + k] - mean[k];
            var += e * e / ((double)eval->T * O);
        }
    return var;
}

/* what is trained, printed by rank 0 */
static void print_setup(const options_t *o, const problem_t *p, double var) {
    const char *noise = o->noisy ? "noisy top-k" : "top-k";
    if (o->router == MOE_ROUTER_EXPERT_CHOICE)
        noise = o->noisy ? "noisy expert choice" : "expert choice";
    if (o->rank != 0) return;
    printf("train_mixture: %d regimes, D=%d, targets %d-dim from per-regime tanh teachers "
           "(width %d)\n", p->R, p->D, p->O, p->H);
    printf("  MoE E=%d K=%d F=%d (%s) vs dense F=%d (same active parameters per token), %s, "
           "lr %g, %d steps x %d tokens, seed %llu, backend %s\n",
           o->experts, o->top_k, o->d_ff, noise, o->top_k * o->d_ff,
           o->sgd ? "SGD momentum 0.9" : "Adam", o->lr, o->steps, o->batch, o->seed,
           o->backend == MOE_BACKEND_CPU ? "cpu" : "cuda");
    printf("  balancing: strategy %s, capacity factor %g%s, switch %g, importance %g, "
           "load %g, z %g, bias rate %g\n", strategy_names[o->strategy], o->capacity_factor,
           o->capacity_factor > 0.0 || o->router == MOE_ROUTER_EXPERT_CHOICE ? "" : " (dropless)",
           o->switch_coef, o->importance_coef, o->load_coef, o->z_coef, o->bias_rate);
    if (o->world > 1)
        printf("  %d ranks (expert parallel over MPI): %d to %d experts (contiguous) and "
               "%d-token shards each%s\n",
               o->world, o->experts / o->world, (o->experts + o->world - 1) / o->world,
               o->batch / o->world,
               o->rebalance_every > 0 ? "; experts re-placed from the running load" : "");
    printf("  held-out MSE of predicting the mean: %.5f\n", var);
}

/* the final losses (rank 0) and --check; 0, or 3 when the check failed */
static int report(const options_t *o, double moe_loss, double dense_loss, double var,
                  double purity) {
    if (o->rank == 0) {
        if (o->dense)
            printf("\nfinal held-out MSE: moe %.5f  dense %.5f  (mean predictor %.5f); moe/dense "
                   "%.3f; specialisation %.3f\n", moe_loss, dense_loss, var,
                   moe_loss / dense_loss, purity);
        else
            printf("\nfinal held-out MSE: moe %.5f  (mean predictor %.5f); specialisation %.3f\n",
                   moe_loss, var, purity);
        /* one machine-readable line for scripts (scripts/lb-experiment) */
        printf("result strategy=%s capacity_factor=%g eval_mse=%.6f dense_mse=%.6f "
               "specialisation=%.4f ranks=%d rebalance_every=%d redundant=%d\n",
               strategy_names[o->strategy], o->capacity_factor, moe_loss, dense_loss, purity,
               o->world, o->world > 1 ? o->rebalance_every : 0, o->redundant);
    }
    if (o->check) {
        int ok = moe_loss < o->check_threshold && (!o->dense || moe_loss < dense_loss);
        if (o->rank == 0) {
            if (o->dense)
                printf("check: moe %.5f < threshold %.5f and < dense %.5f: %s\n", moe_loss,
                       o->check_threshold, dense_loss, ok ? "PASS" : "FAIL");
            else
                printf("check: moe %.5f < threshold %.5f: %s\n", moe_loss, o->check_threshold,
                       ok ? "PASS" : "FAIL");
        }
        return ok ? 0 : 3; /* 3: the check failed (main exits 1), not an error */
    }
    return 0;
}

static int run(options_t *o_, moe_comm_t *comm) {
    const options_t o = *o_;
    int rc = check_ranks(&o);
    if (rc) return rc;
    rng_t rng = {o.seed};
    problem_t p;
    if (problem_init(&p, &o, &rng)) return 1;
    batch_t eval;
    if (batch_alloc(&eval, &p, o.eval_tokens)) return 1;
    rng_t erng = {o.seed * 31337ull + 3ull};
    sample(&p, &erng, eval.T, eval.x, eval.y, eval.regime);
    double var = mean_predictor_mse(&eval, p.O);
    print_setup(&o, &p, var);

    /* the MoE spans the ranks; the dense baseline (one expert) is replicated on each */
    moe_context_t *ctx = NULL, *ctx_dense = NULL;
    CHECK(moe_context_create(&ctx, o.backend, 0, comm));
    CHECK(moe_context_create(&ctx_dense, o.backend, 0, NULL));
    model_t moe, dense;
    rng_t hrng = {o.seed * 4099ull + 11ull};
    if (model_create(&moe, "moe", ctx, &o, o.experts, o.top_k, o.d_ff, 1, &hrng)) return 1;
    hrng.s = o.seed * 4099ull + 11ull; /* the same readout init for both */
    if (model_create(&dense, "dense", ctx_dense, &o, 1, 1, o.top_k * o.d_ff, 0, &hrng)) return 1;
    if (o.trace_path) {
        char path[4096];
        if (o.world > 1) snprintf(path, sizeof path, "%s.rank%d", o.trace_path, o.rank);
        else snprintf(path, sizeof path, "%s", o.trace_path);
        CHECK(moe_layer_trace_open(moe.layer, path, 0));
    }
    FILE *csv = NULL;
    if (o.csv_path && o.rank == 0 && !(csv = fopen(o.csv_path, "w"))) {
        fprintf(stderr, "error: cannot write %s\n", o.csv_path);
        return 1;
    }

    double moe_loss = train(&moe, &p, &o, &eval, csv);
    if (csv && fclose(csv)) {
        fprintf(stderr, "error: writing %s\n", o.csv_path);
        return 1;
    }
    if (moe_loss < 0.0) return 1;
    double purity = specialisation(&moe, &o, &eval, p.R);
    if (purity < 0.0) return 1;
    double dense_loss = NAN; /* printed as nan with --no-dense */
    if (o.dense && (dense_loss = train(&dense, &p, &o, &eval, NULL)) < 0.0) return 1;

    rc = report(&o, moe_loss, dense_loss, var, purity);
    model_free(&moe, o.backend);
    model_free(&dense, o.backend);
    CHECK(moe_context_destroy(ctx));
    CHECK(moe_context_destroy(ctx_dense));
    batch_free(&eval);
    problem_free(&p);
    return rc;
}

