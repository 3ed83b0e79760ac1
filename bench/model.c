/* model.c - the performance model of one expert-parallel MoE layer (docs/scaling.md): local
 * phases, all-to-all over the link hierarchy, and the chunked pipeline that overlaps them.
 *
 * The pipeline with C chunks: each chunk's dispatch (d/C), expert GEMMs (x/C) and return (r/C)
 * run in order, chunk c+1's exchange overlapping chunk c's experts. Dispatch and return share
 * the links, so the network is one resource of time n = d + r and the experts another of time
 * x; C items through two stages take (n + x)/C + (C - 1)/C * max(n, x). C = 1 is the plain
 * sum; C -> inf only the larger one remains. */
#include <math.h>
#include <stdio.h>

#include "bench.h"

double bench_model_a2a_time(const bench_model_link_t *l, double bytes, int ranks) {
    if (ranks <= 1 || bytes <= 0) return 0.0;
    const int node = l->ranks_per_node < ranks ? l->ranks_per_node : ranks;
    /* equal pieces to every rank: 1/P stays home, (node-1)/P cross NVLink, the rest the NIC */
    const double f_intra = (double)(node - 1) / ranks, f_inter = (double)(ranks - node) / ranks;
    double t_intra = l->bw_intra > 0 ? bytes * f_intra / l->bw_intra : 0.0;
    double t_inter = l->bw_inter > 0 ? bytes * f_inter / l->bw_inter : 0.0;
    return fmax(t_intra, t_inter) + l->latency_s * (ranks - 1);
}

double bench_model_pipeline(double t_net, double t_experts, int chunks) {
    if (chunks < 1) chunks = 1;
    return (t_net + t_experts) / chunks + (double)(chunks - 1) / chunks * fmax(t_net, t_experts);
}

double bench_model_layer_time(const bench_model_in_t *m, int chunks) {
    double t = m->t_local_fwd + bench_model_pipeline(m->t_net_fwd, m->t_experts_fwd, chunks);
    if (m->fwd_bwd)
        t += m->t_local_bwd + bench_model_pipeline(m->t_net_bwd, m->t_experts_bwd, chunks);
    return t;
}

int bench_model_hiding_chunks(const bench_model_in_t *m, int max_chunks, double tolerance) {
    double floor_t = m->t_local_fwd + fmax(m->t_net_fwd, m->t_experts_fwd);
    if (m->fwd_bwd) floor_t += m->t_local_bwd + fmax(m->t_net_bwd, m->t_experts_bwd);
    for (int c = 1; c <= max_chunks; ++c)
        if (bench_model_layer_time(m, c) <= floor_t * (1.0 + tolerance)) return c;
    return max_chunks;
}

/* ---- one H100, bf16: the local phases from the kernel benchmark of docs/gpu-results.md
 * (branch cuda, run 2, H100 80GB HBM3), scaled by bytes or FLOPs ------------------------------ */

#define H100_COPY_BW 2.8e12      /* permute measured at 2808 GB/s (read + write counted) */
#define H100_UNPERMUTE_BW 1.0e12 /* backward un-permute measured at 1015 GB/s (scalar kernel) */
#define H100_GATE_S_PER_TOKEN (56.7e-6 / 16384) /* fused gate, f32 T 16384 E 64 K 8: 56.7 us */
#define H100_ROUTE_S_PER_TOKEN (42.9e-6 / 16384) /* route, CUB sort + scan, same shape */
#define H100_ROUTER_TFLOPS 300e12 /* the (T, D) x (D, E) router GEMM: narrow, assumed */

void bench_model_h100(const bench_model_shape_t *s, double gemm_tflops, double *t_local_fwd,
                      double *t_local_bwd, double *t_experts_fwd, double *t_experts_bwd,
                      double *a2a_bytes) {
    const double T = (double)s->tokens, D = (double)s->d_model, F = (double)s->d_ff;
    const double F2 = s->swiglu ? 2 * F : F, K = (double)s->top_k, E = (double)s->experts;
    const double es = (double)s->elem_bytes, rows = T * K; /* rows this GPU sends = receives */
    const double gate = 2 * T * D * E / H100_ROUTER_TFLOPS + T * H100_GATE_S_PER_TOKEN;
    const double route = T * H100_ROUTE_S_PER_TOKEN;
    const double permute = 2 * rows * D * es / H100_COPY_BW; /* gather: read + write a row */
    const double combine = (rows + T) * D * es / H100_COPY_BW;
    *t_local_fwd = gate + route + permute + combine;
    /* backward: dgate + per-row dY (combine_bwd: as the forward combine, plus dY rows written),
     * un-permute of dx at the measured scalar-kernel rate, router GEMMs twice */
    *t_local_bwd = (2 * rows + T) * D * es / H100_COPY_BW +
                   (rows + T) * D * es / H100_UNPERMUTE_BW +
                   2 * (2 * T * D * E / H100_ROUTER_TFLOPS);
    const double flops = 2 * rows * D * F2 + 2 * rows * F * D;
    *t_experts_fwd = flops / gemm_tflops;
    *t_experts_bwd = 2 * flops / gemm_tflops;
    *a2a_bytes = rows * D * es;
}

/* ============================================================================================
 * --model-table: the model's predictions for many GPUs (docs/scaling.md)
 * ========================================================================================== */

void bench_model_table(const bench_opts_t *o) {
    static const struct {
        const char *name;
        int64_t D, F, E, K;
        double tflops; /* H100 bf16 expert GEMM rate measured at this preset's shape */
    } presets[] = {{"mixtral", 4096, 14336, 8, 2, 671e12},
                   {"deepseek", 7168, 2048, 256, 8, 709e12}};
    const int gpus[] = {8, 64, 512};
    const int64_t T = o->tokens_given ? o->min_tokens : 4096;
    bench_model_link_t link = {8, 450e9, 48e9, 0.0};
    if (o->link_bw > 0) link.bw_inter = o->link_bw * 1e9;
    printf("# moe_bench --model-table: one MoE layer, bf16, %lld tokens per GPU, forward%s\n",
           (long long)T, o->mode == BENCH_MODE_FWD_BWD ? " + backward" : " only");
    printf("#  local phases and expert GEMM rates: H100 kernel benchmark (docs/gpu-results.md, "
           "branch cuda run 2)\n");
    printf("#  links: NVLink 4 %.0f GB/s per GPU within a node of %d, InfiniBand NDR %.0f GB/s "
           "per GPU across nodes\n", link.bw_intra * 1e-9, link.ranks_per_node,
           link.bw_inter * 1e-9);
    printf("#  ep = expert-parallel group (E must be divisible by it: ep = min(GPUs, E)); the "
           "other GPUs are data-parallel replicas\n#\n");
    printf("# %8s %5s %4s %7s %9s %9s %9s %9s %9s %9s %9s %7s\n", "preset", "GPUs", "ep",
           "E/rank", "local", "experts", "a2a", "C=1", "C=chunks", "overlap", "tok/s/GPU",
           "chunks");
    for (size_t i = 0; i < sizeof presets / sizeof presets[0]; ++i)
        for (size_t j = 0; j < sizeof gpus / sizeof gpus[0]; ++j) {
            int ep = gpus[j] < presets[i].E ? gpus[j] : (int)presets[i].E;
            bench_model_shape_t sh = {T, presets[i].D, presets[i].F, presets[i].E, presets[i].K, 1,
                                      2};
            bench_model_in_t m = {0};
            double bytes;
            bench_model_h100(&sh, presets[i].tflops, &m.t_local_fwd, &m.t_local_bwd,
                             &m.t_experts_fwd, &m.t_experts_bwd, &bytes);
            m.fwd_bwd = o->mode == BENCH_MODE_FWD_BWD;
            m.t_net_fwd = m.t_net_bwd = 2 * bench_model_a2a_time(&link, bytes, ep);
            int64_t El = presets[i].E / ep;
            int maxc = (int)(El < MOE_MAX_CHUNKS ? El : MOE_MAX_CHUNKS);
            int hide = bench_model_hiding_chunks(&m, maxc, 0.05);
            double t1 = bench_model_layer_time(&m, 1), tc = bench_model_layer_time(&m, hide);
            double floor_t = bench_model_layer_time(&m, 1 << 20);
            double loc = m.t_local_fwd + (m.fwd_bwd ? m.t_local_bwd : 0);
            double ex = m.t_experts_fwd + (m.fwd_bwd ? m.t_experts_bwd : 0);
            double net = m.t_net_fwd + (m.fwd_bwd ? m.t_net_bwd : 0);
            printf("  %8s %5d %4d %7lld %9.3f %9.3f %9.3f %9.3f %9.3f %9.3f %9.0f %7d\n",
                   presets[i].name, gpus[j], ep, (long long)El, 1e3 * loc, 1e3 * ex, 1e3 * net,
                   1e3 * t1, 1e3 * tc, 1e3 * floor_t, (double)T / tc, hide);
        }
    printf("# times in ms per layer call and GPU; C=1 no pipelining; C=chunks at the chunk count "
           "within 5%% of full overlap (capped at E/rank); overlap = infinitely many chunks\n");
}
