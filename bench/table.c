/* table.c - what moe_bench prints: the header, one row per size (filled from every rank's
 * gathered numbers), and the footer with the check, the phase table and the ranks. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "bench.h"
#include "core/dtype.h"

void bench_print_header(const bench_opts_t *o, const char *backend_text, const char *world_text,
                        int ranks, int omp_threads, int blas_thr) {
    const moe_layer_config_t *c = &o->cfg;
    int major, minor, patch;
    moe_get_version(&major, &minor, &patch);
    printf("# moe_bench: libmoe %d.%d.%d  backend %s  ranks %d%s%s%s\n", major, minor, patch,
           backend_text, ranks, world_text, o->preset ? "  preset " : "",
           o->preset ? o->preset : "");
    printf("#  layer    D %lld  F %lld  E %lld  K %lld  activation %s  dtype %s  bias %s\n",
           (long long)c->d_model, (long long)c->d_ff, (long long)c->num_experts,
           (long long)c->top_k, tool_activation_names[c->activation], moe_dtype_name(c->dtype),
           c->expert_bias ? "yes" : "no");
    char cap[48];
    if (c->capacity_factor > 0)
        snprintf(cap, sizeof cap, "capacity factor %.3g (%s priority)", c->capacity_factor,
                 tool_priority_names[c->priority]);
    else
        snprintf(cap, sizeof cap, "dropless");
    printf("#  gate     %s%s  noisy %s  %s\n", tool_gate_names[c->gate],
           c->gate == MOE_GATE_TOPK_OF_SOFTMAX ? (c->renormalize ? " (renormalized)" : "") : "",
           c->noisy_gating ? "yes" : "no", cap);
    printf("#  run      mode %s  routing %s  seed %llu  warmup %d  iters %d  check %s\n",
           o->mode == BENCH_MODE_FWD ? "fwd" : "fwd-bwd",
           o->replay_path ? "replay" : o->routing.text, (unsigned long long)o->seed, o->warmup,
           o->iters, o->check ? "on" : "off");
    if (o->replay_path) printf("#  replay   %s: each iteration one recorded step, its tokens split "
                               "over the ranks, routing forced\n", o->replay_path);
    if (blas_thr > 0)
        printf("#  threads  OpenMP %d%s  OpenBLAS %d\n", omp_threads, ranks > 1 ? " per rank" : "",
               blas_thr);
    else
        printf("#  threads  OpenMP %d  BLAS (not OpenBLAS: unknown)\n", omp_threads);
    printf("#  TFLOP/s  expert GEMMs only: 2*M*D*%s + 2*M*F*D per forward%s, M = kept "
           "assignments (all ranks)\n",
           c->activation == MOE_ACTIVATION_SWIGLU ? "2F" : "F",
           o->mode == BENCH_MODE_FWD_BWD ? ", x3 for forward+backward" : "");
    printf("#  roofline gemm = dense sgemm of the same FLOPs, gemm%% = gemm / total; mcpy = "
           "memcpy of the activation bytes\n");
    if (ranks > 1) {
        int64_t El = c->num_experts / ranks,
                ch = c->num_chunks ? c->num_chunks : MOE_DEFAULT_CHUNKS;
        printf("#  ranks    tokens = per rank; times = slowest rank per iteration; tokens/s over "
               "all ranks; %lld experts per rank (contiguous), %lld chunk%s\n",
               (long long)El, (long long)(ch < El ? ch : El), (ch < El ? ch : El) > 1 ? "s" : "");
        printf("#  placement %s%s; rimbal = max/mean rows received per rank (measured), "
               "rimb(c) = the same for the contiguous placement under the same routing "
               "(modelled from the counts)\n",
               o->placement ? o->placement : "contiguous",
               o->placement && strcmp(o->placement, "auto") == 0 ? " (--redundant slots)" : "");
        printf("#  a2a      dispatch + return phases (profiled pass); algbw = all-to-alls x "
               "rows sent x D x %zu B / a2a; busbw = algbw (P-1)/P;\n"
               "#           ceil = raw all-to-all of the same bytes (%s); model = "
               "bench/model.c at %s\n",
               moe_dtype_size(c->dtype),
               strstr(world_text, "NCCL") ? "none under NCCL: give --link-bw"
               : strstr(world_text, "MPI") ? "MPI_Alltoall" : "memcpy per rank",
               o->link_bw > 0 ? "--link-bw" : "the ceiling's bandwidth");
    }
    printf("#\n");
    printf("# %10s %10s %10s %10s %12s %8s %10s %6s %9s %7s %7s %9s %7s %7s %9s %9s %7s %8s "
           "%7s\n",
           "tokens", "fwd(ms)", "bwd(ms)", "total(ms)", "tokens/s", "TFLOP/s", "gemm(ms)",
           "gemm%", "mcpy(ms)", "imbal", "rimbal", "a2a(ms)", "algbw", "busbw", "ceil(ms)",
           "model(ms)", "rimb(c)", "dropped", "#wrong");
}

void bench_finish_row(const bench_opts_t *o, int P, int ng, const double *gall, double *tf,
                      double sent_mean, double act_bytes, bench_row_t *r) {
    const moe_layer_config_t *c = &o->cfg;
    const int64_t D = c->d_model, E = c->num_experts;
    const size_t es = moe_dtype_size(c->dtype);
    const int fwd_bwd = o->mode == BENCH_MODE_FWD_BWD;
    double *tbw = tf + o->iters, *tt = tf + 2 * o->iters;
    /* per iteration the slowest rank: a collective call ends when its last rank does */
    for (int i = 0; i < 3 * o->iters; ++i)
        for (int q = 1; q < P; ++q) tf[i] = fmax(tf[i], gall[(size_t)q * ng + i]);
    r->fwd = bench_summarize(tf, o->iters), r->total = bench_summarize(tt, o->iters);
    if (fwd_bwd) r->bwd = bench_summarize(tbw, o->iters);
    double tok = 0, rmax = 0, rsum = 0;
    r->gemm_s = r->mcpy_s = r->ceil_s = -1.0;
    r->rank_rows = malloc((size_t)P * 3 * sizeof(int64_t));
    r->rank_remote = malloc((size_t)P * sizeof(double));
    if (!r->rank_remote) free(r->rank_rows), r->rank_rows = NULL;
    for (int q = 0; q < P; ++q) {
        const double *g = gall + (size_t)q * ng;
        const double *s3 = g + 3 * o->iters, *pq = s3 + BENCH_G_STATS;
        tok += s3[0];
        rsum += s3[2], rmax = fmax(rmax, s3[2]);
        r->rows_sent_max = fmax(r->rows_sent_max, s3[1]);
        r->rows_recv_max = fmax(r->rows_recv_max, s3[2]);
        r->rows_sent_mean += s3[1] / P, r->rows_recv_mean += s3[2] / P;
        if (r->rank_rows) {
            for (int j = 0; j < 3; ++j) r->rank_rows[q * 3 + j] = llround(s3[j]);
            r->rank_remote[q] = s3[3];
        }
        for (int p = 0; p < MOE_PHASE_COUNT; ++p) r->phase_s[p] = fmax(r->phase_s[p], pq[p]);
        double a2a_q = pq[MOE_PHASE_DISPATCH] + pq[MOE_PHASE_RETURN] +
                       pq[MOE_PHASE_BWD_DISPATCH] + pq[MOE_PHASE_BWD_RETURN];
        r->a2a_s = fmax(r->a2a_s, a2a_q);
        r->gemm_s = fmax(r->gemm_s, g[ng - 3]);
        r->mcpy_s = fmax(r->mcpy_s, g[ng - 2]);
        r->ceil_s = fmax(r->ceil_s, g[ng - 1]);
    }
    r->rank_imbalance = rsum > 0 ? rmax / (rsum / P) : 0.0;
    r->tokens_per_s = tok / r->total.mean;
    r->tflops = r->flops / r->total.mean * 1e-12;
    r->act_bytes = act_bytes;
    if (P > 1) {
        const int n_a2a = fwd_bwd ? 4 : 2;
        r->a2a_bytes = sent_mean * D * es;
        r->algbw = r->a2a_s > 0 ? n_a2a * r->a2a_bytes / r->a2a_s * 1e-9 : 0.0;
        r->busbw = r->algbw * (P - 1) / P;
        double ceil_bw = r->ceil_s > 0 ? r->a2a_bytes / r->ceil_s : 0.0;
        if (r->ceil_s > 0) r->ceil_s *= n_a2a;
        double bw = o->link_bw > 0 ? o->link_bw * 1e9 : ceil_bw;
        /* the model from this run's own local phases and the link bandwidth */
        bench_model_in_t mi = {0};
        mi.fwd_bwd = fwd_bwd;
        mi.t_local_fwd = r->phase_s[MOE_PHASE_GATE] + r->phase_s[MOE_PHASE_ROUTE] +
                         r->phase_s[MOE_PHASE_PERMUTE] + r->phase_s[MOE_PHASE_COMBINE];
        mi.t_local_bwd = r->phase_s[MOE_PHASE_BWD_COMBINE] +
                         r->phase_s[MOE_PHASE_BWD_UNPERMUTE] + r->phase_s[MOE_PHASE_BWD_GATE];
        mi.t_experts_fwd = r->phase_s[MOE_PHASE_EXPERTS];
        mi.t_experts_bwd = r->phase_s[MOE_PHASE_BWD_EXPERTS];
        mi.t_net_fwd = mi.t_net_bwd = bw > 0 ? 2 * r->a2a_bytes / bw : 0.0;
        int64_t El = E / P, ch = c->num_chunks ? c->num_chunks : MOE_DEFAULT_CHUNKS;
        r->model_s = bw > 0 ? bench_model_layer_time(&mi, (int)(ch < El ? ch : El)) : -1.0;
    } else {
        r->ceil_s = r->model_s = -1.0;
    }
}

void bench_print_row(const bench_opts_t *o, const bench_row_t *r) {
    const int P = r->ranks, fwd_bwd = o->mode == BENCH_MODE_FWD_BWD;
    const int64_t T = r->tokens;
    char gemm[16] = "-", gpct[16] = "-", mcpy[16] = "-", wrong[24] = "N/A", bwd[16] = "-";
    char rimb[16] = "-", a2a[16] = "-", alg[16] = "-", bus[16] = "-", ceil_[16] = "-",
         model[16] = "-", rimbc[16] = "-";
    if (r->gemm_s >= 0) {
        snprintf(gemm, sizeof gemm, "%.3f", 1e3 * r->gemm_s);
        snprintf(gpct, sizeof gpct, "%.1f", 100.0 * r->gemm_s / r->total.mean);
    }
    if (r->mcpy_s >= 0) snprintf(mcpy, sizeof mcpy, "%.3f", 1e3 * r->mcpy_s);
    if (r->wrong >= 0) snprintf(wrong, sizeof wrong, "%lld", (long long)r->wrong);
    if (fwd_bwd) snprintf(bwd, sizeof bwd, "%.3f", 1e3 * r->bwd.mean);
    if (P > 1) {
        snprintf(rimb, sizeof rimb, "%.3f", r->rank_imbalance);
        snprintf(rimbc, sizeof rimbc, "%.3f", r->rank_imbalance_contig);
        snprintf(a2a, sizeof a2a, "%.3f", 1e3 * r->a2a_s);
        snprintf(alg, sizeof alg, "%.2f", r->algbw);
        snprintf(bus, sizeof bus, "%.2f", r->busbw);
        if (r->ceil_s > 0) snprintf(ceil_, sizeof ceil_, "%.3f", 1e3 * r->ceil_s);
        if (r->model_s > 0) snprintf(model, sizeof model, "%.3f", 1e3 * r->model_s);
    }
    printf("  %10lld %10.3f %10s %10.3f %12.0f %8.4g %10s %6s %9s %7.3f %7s %9s %7s %7s "
           "%9s %9s %7s %8lld %7s\n",
           (long long)T, 1e3 * r->fwd.mean, bwd, 1e3 * r->total.mean, r->tokens_per_s,
           r->tflops, gemm, gpct, mcpy, r->imbalance, rimb, a2a, alg, bus, ceil_, model,
           rimbc, (long long)r->dropped, wrong);
    fflush(stdout);
}

int bench_print_summary(const bench_opts_t *o, int P, const bench_row_t *rows, int nrows,
                        int nprof, int64_t total_wrong, int64_t total_checked, double worst) {
    const int fwd_bwd = o->mode == BENCH_MODE_FWD_BWD;
    int check_failed = 0;
    double sum_tps = 0.0, sum_tf = 0.0, sum_bus = 0.0;
    for (int i = 0; i < nrows; ++i)
        sum_tps += rows[i].tokens_per_s, sum_tf += rows[i].tflops, sum_bus += rows[i].busbw;
    printf("# Average tokens/s : %.0f\n", nrows ? sum_tps / nrows : 0.0);
    printf("# Average TFLOP/s  : %.4g\n", nrows ? sum_tf / nrows : 0.0);
    if (P > 1) printf("# Avg bus bandwidth: %.3f GB/s (all-to-all phases)\n",
                      nrows ? sum_bus / nrows : 0.0);
    if (o->check) {
        printf("# Check            : %lld wrong of %lld compared (vs a float64 per-token "
               "reference from the layer's parameters, worst %.3g of max|ref|) %s\n",
               (long long)total_wrong, (long long)total_checked, worst,
               total_wrong ? "FAILED" : "OK");
        if (total_wrong) check_failed = 1;
    } else {
        printf("# Check            : not run (use --check)\n");
    }
    printf("# Times are means over %d iterations; --json has medians, minima and maxima.\n",
           o->iters);
    /* the library's phases, from the profiled pass */
    printf("#\n# Phases (comment lines: the table above is the only data; ms per call, profiled "
           "pass of %d iteration%s after the timed ones: the library waits after every phase; "
           "max over ranks)\n# %10s", nprof,
           nprof > 1 ? "s" : "", "tokens");
    int last = fwd_bwd ? MOE_PHASE_COUNT : MOE_PHASE_BWD_COMBINE;
    for (int p = 0; p < last; ++p) printf(" %*s", p < MOE_PHASE_BWD_COMBINE ? 8 : 13,
                                          moe_phase_name((moe_phase_t)p));
    printf("\n");
    for (int i = 0; i < nrows; ++i) {
        printf("# %10lld", (long long)rows[i].tokens);
        for (int p = 0; p < last; ++p)
            printf(" %*.3f", p < MOE_PHASE_BWD_COMBINE ? 8 : 13, 1e3 * rows[i].phase_s[p]);
        printf("\n");
    }
    if (P > 1 && nrows > 0 && rows[nrows - 1].rank_rows) {
        const bench_row_t *r = &rows[nrows - 1];
        printf("#\n# Ranks at %lld tokens (per iteration): rows sent / received "
               "(moe_routing_stats_t), remote%% = kept assignments to other ranks' experts\n"
               "# %6s %10s %10s %10s %8s\n",
               (long long)r->tokens, "rank", "tokens", "sent", "received", "remote%");
        for (int q = 0; q < P; ++q)
            printf("# %6d %10lld %10lld %10lld %8.1f\n", q, (long long)r->rank_rows[q * 3],
                   (long long)r->rank_rows[q * 3 + 1], (long long)r->rank_rows[q * 3 + 2],
                   100.0 * r->rank_remote[q]);
    }
    fflush(stdout);
    return check_failed;
}
