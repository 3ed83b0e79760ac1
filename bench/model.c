/* model.c - the performance model of one expert-parallel MoE layer (docs/scaling.md): local
 * phases, all-to-all over the link hierarchy, and the chunked pipeline that overlaps them.
 *
 * The pipeline with C chunks: each chunk's dispatch (d/C), expert GEMMs (x/C) and return (r/C)
 * run in order, chunk c+1's exchange overlapping chunk c's experts. Dispatch and return share
 * the links, so the network is one resource of time n = d + r and the experts another of time
 * x; C items through two stages take (n + x)/C + (C - 1)/C * max(n, x). C = 1 is the plain
 * sum; C -> inf only the larger one remains. */
#include <math.h>

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
