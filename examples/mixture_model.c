/* mixture_model.c - the model of train_mixture: one libmoe layer and a linear readout in plain
 * C with its own Adam, forward and backward over this rank's tokens, and the sums over ranks
 * of an expert-parallel run. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "mixture.h"
#include "tool_util.h"

#ifdef MOE_EXAMPLE_WITH_MPI
#include <mpi.h>
#endif

/* ---------------------------------------------------------------------------------------------
 * ranks: sums over the processes of an expert-parallel run (no-ops on one rank)
 * ------------------------------------------------------------------------------------------- */

void sum_over_ranks_d(const options_t *o, double *v, int n) {
#ifdef MOE_EXAMPLE_WITH_MPI
    if (o->world > 1) MPI_Allreduce(MPI_IN_PLACE, v, n, MPI_DOUBLE, MPI_SUM, MPI_COMM_WORLD);
#endif
    (void)o, (void)v, (void)n;
}
void sum_over_ranks_f(const options_t *o, float *v, int64_t n) {
#ifdef MOE_EXAMPLE_WITH_MPI
    if (o->world > 1) MPI_Allreduce(MPI_IN_PLACE, v, (int)n, MPI_FLOAT, MPI_SUM, MPI_COMM_WORLD);
#endif
    (void)o, (void)v, (void)n;
}

/* this rank's share [*lo, *hi) of T tokens split as evenly as possible */
void shard(const options_t *o, int T, int *lo, int *hi) {
    int q = T / o->world, r = T % o->world;
    *lo = o->rank * q + (o->rank < r ? o->rank : r);
    *hi = *lo + q + (o->rank < r ? 1 : 0);
}

/* ---------------------------------------------------------------------------------------------
 * the model: one libmoe layer and a linear readout (host, plain C, its own Adam)
 * ------------------------------------------------------------------------------------------- */


int model_create(model_t *m, const char *name, moe_context_t *ctx, const options_t *o,
                        int E, int K, int F, int expert_parallel, rng_t *rng) {
    memset(m, 0, sizeof *m);
    m->name = name;
    m->D = o->d_model, m->O = o->d_out, m->E = E, m->K = K;
    m->expert_parallel = expert_parallel;
    moe_layer_config_t cfg = moe_layer_config_default();
    cfg.d_model = o->d_model;
    cfg.d_ff = F;
    cfg.num_experts = E;
    cfg.top_k = K;
    cfg.activation = MOE_ACTIVATION_GELU;
    /* Switch-style: top-k of the softmax over all experts, not renormalised, so even with K = 1
     * the gate weight carries a gradient back into the router */
    cfg.gate = MOE_GATE_TOPK_OF_SOFTMAX;
    cfg.renormalize = 0;
    /* noisy top-k (Shazeer et al.): with K = 1 the router only learns from the expert it
     * picked; the noise lets it try the others, without which a regime split over two experts
     * early on tends to stay split */
    int moe = E > 1; /* the dense baseline gets no routing options */
    cfg.noisy_gating = moe ? o->noisy : 0;
    cfg.capacity_factor = moe ? o->capacity_factor : 0.0;
    cfg.switch_loss_coef = moe ? o->switch_coef : 0.0;
    cfg.importance_loss_coef = moe ? o->importance_coef : 0.0;
    cfg.load_loss_coef = moe ? o->load_coef : 0.0;
    cfg.z_loss_coef = moe ? o->z_coef : 0.0;
    cfg.bias_update_rate = moe ? o->bias_rate : 0.0;
    cfg.router = moe ? o->router : MOE_ROUTER_TOKEN_CHOICE;
    cfg.seed = o->seed * 7919ull + 17ull;
    CHECK(moe_layer_create(&m->layer, ctx, &cfg));
    moe_optimizer_config_t oc = moe_optimizer_config_default(o->sgd ? MOE_OPTIMIZER_SGD
                                                                     : MOE_OPTIMIZER_ADAM);
    oc.lr = o->lr;
    CHECK(moe_optimizer_create(&m->opt, m->layer, &oc));
    size_t nw = (size_t)(m->D * m->O);
    m->Wh = calloc(nw, sizeof(float)), m->gWh = calloc(nw, sizeof(float));
    m->mW = calloc(nw, sizeof(float)), m->vW = calloc(nw, sizeof(float));
    m->bh = calloc((size_t)m->O, sizeof(float)), m->gbh = calloc((size_t)m->O, sizeof(float));
    m->mb = calloc((size_t)m->O, sizeof(float)), m->vb = calloc((size_t)m->O, sizeof(float));
    if (!m->Wh || !m->gWh || !m->mW || !m->vW || !m->bh || !m->gbh || !m->mb || !m->vb) {
        fprintf(stderr, "error: out of host memory\n");
        return 1;
    }
    for (size_t i = 0; i < nw; ++i) m->Wh[i] = (float)(rng_normal(rng) / sqrt(m->D));
    return 0;
}

int model_reserve(model_t *m, moe_backend_t b, int T) {
    if (T <= m->cap) return 0;
    size_t bytes = sizeof(float) * (size_t)T * (size_t)m->D;
    const tool_mem_t mem = {.gpu = b == MOE_BACKEND_CUDA};
    tool_mem_free(&mem, m->x_d), tool_mem_free(&mem, m->h_d);
    tool_mem_free(&mem, m->dh_d), tool_mem_free(&mem, m->dx_d);
    free(m->h), free(m->dh), free(m->pred);
    m->h = malloc(bytes), m->dh = malloc(bytes);
    m->pred = malloc(sizeof(float) * (size_t)T * (size_t)m->O);
    m->x_d = tool_mem_alloc(&mem, bytes), m->h_d = tool_mem_alloc(&mem, bytes);
    m->dh_d = tool_mem_alloc(&mem, bytes), m->dx_d = tool_mem_alloc(&mem, bytes);
    if (!m->x_d || !m->h_d || !m->dh_d || !m->dx_d || !m->h || !m->dh || !m->pred) {
        fprintf(stderr, "error: buffers for %d tokens\n", T);
        return 1;
    }
    m->cap = T;
    return 0;
}

void model_free(model_t *m, moe_backend_t b) {
    moe_optimizer_destroy(m->opt);
    moe_layer_destroy(m->layer);
    const tool_mem_t mem = {.gpu = b == MOE_BACKEND_CUDA};
    tool_mem_free(&mem, m->x_d), tool_mem_free(&mem, m->h_d);
    tool_mem_free(&mem, m->dh_d), tool_mem_free(&mem, m->dx_d);
    free(m->h), free(m->dh), free(m->pred);
    free(m->Wh), free(m->gWh), free(m->mW), free(m->vW);
    free(m->bh), free(m->gbh), free(m->mb), free(m->vb);
}

/* forward of the whole model on this rank's T tokens (collective when the layer spans the
 * ranks); returns the sum of squared errors against y (or -1 on error) */
double model_forward(model_t *m, moe_backend_t b, const float *x, const float *y, int T,
                            int training) {
    const tool_mem_t mem = {.gpu = b == MOE_BACKEND_CUDA};
    size_t bytes = sizeof(float) * (size_t)T * (size_t)m->D;
    if (model_reserve(m, b, T > 0 ? T : 1) ||
        tool_mem_copy(&mem, m->x_d, x, bytes, TOOL_COPY_TO_BACKEND))
        return -1.0;
    moe_status_t st = moe_layer_forward(m->layer, m->x_d, m->h_d, T, training, NULL);
    if (st != MOE_STATUS_SUCCESS) {
        fprintf(stderr, "error: moe_layer_forward: %s\n  %s\n", moe_status_string(st),
                moe_last_error());
        return -1.0;
    }
    if (tool_mem_copy(&mem, m->h, m->h_d, bytes, TOOL_COPY_TO_HOST)) return -1.0;
    double se = 0.0;
    for (int t = 0; t < T; ++t)
        for (int o = 0; o < m->O; ++o) {
            double a = m->bh[o];
            for (int d = 0; d < m->D; ++d) a += (double)m->h[t * m->D + d] * m->Wh[d * m->O + o];
            m->pred[t * m->O + o] = (float)a;
            double e = a - y[t * m->O + o];
            se += e * e;
        }
    return se;
}

/* sums the gradients of a layer every rank holds a full copy of (data parallel) */
static int sum_layer_grads(model_t *m, const options_t *o) {
    for (int p = 0; p < MOE_PARAM_COUNT; ++p) {
        float *g = NULL;
        int64_t n = 0;
        CHECK(moe_layer_param(m->layer, (moe_param_t)p, NULL, (void **)&g, &n));
        if (n > 0) sum_over_ranks_f(o, g, n);
    }
    return 0;
}

/* backward of the global batch's MSE (T_all tokens over all ranks, T of them here) through the
 * readout and the layer, the replicated weights' gradients summed over the ranks, then one
 * optimizer step of both */
int model_backward_step(model_t *m, moe_backend_t b, const float *y, int T, int T_all,
                               const options_t *o) {
    const int D = m->D, O = m->O;
    /* d mean((pred - y)^2) / d pred over the global batch: the per-rank gradients then add up
     * to the single-rank layer's, and the aux losses (global in the library) keep their weight */
    const float scale = 2.0f / ((float)T_all * (float)O);
    memset(m->gWh, 0, sizeof(float) * (size_t)(D * O));
    memset(m->gbh, 0, sizeof(float) * (size_t)O);
    for (int t = 0; t < T; ++t) {
        for (int d = 0; d < D; ++d) m->dh[t * D + d] = 0.0f;
        for (int k = 0; k < O; ++k) {
            float dp = scale * (m->pred[t * O + k] - y[t * O + k]);
            m->gbh[k] += dp;
            for (int d = 0; d < D; ++d) {
                m->gWh[d * O + k] += m->h[t * D + d] * dp;
                m->dh[t * D + d] += dp * m->Wh[d * O + k];
            }
        }
    }
    const tool_mem_t mem = {.gpu = b == MOE_BACKEND_CUDA};
    if (tool_mem_copy(&mem, m->dh_d, m->dh, sizeof(float) * (size_t)T * (size_t)D,
                      TOOL_COPY_TO_BACKEND))
        return 1;
    CHECK(moe_layer_zero_grad(m->layer, NULL));
    CHECK(moe_layer_backward(m->layer, m->dh_d, m->dx_d, NULL));
    if (o->world > 1) {
        /* experts are owned by one rank each; the router (and noise network) is replicated */
        if (m->expert_parallel) {
            CHECK(moe_layer_allreduce_router_grads(m->layer, NULL));
            /* replicated experts (after a re-placement): their rows' gradients summed */
            CHECK(moe_layer_reduce_replica_grads(m->layer, NULL));
        }
        else if (sum_layer_grads(m, o)) return 1;
        sum_over_ranks_f(o, m->gWh, (int64_t)D * O);
        sum_over_ranks_f(o, m->gbh, O);
    }
    CHECK(moe_optimizer_step(m->opt, NULL));
    /* the readout takes the same kind of step as the layer (formulas of moe.h) */
    m->head_steps++;
    const double b1 = 0.9, b2 = 0.999, eps = 1e-8, t = (double)m->head_steps;
    const double step = o->lr / (1.0 - pow(b1, t)), ibc2 = 1.0 / sqrt(1.0 - pow(b2, t));
    float *w[2] = {m->Wh, m->bh}, *g[2] = {m->gWh, m->gbh};
    float *mm[2] = {m->mW, m->mb}, *vv[2] = {m->vW, m->vb};
    int n[2] = {D * O, O};
    for (int p = 0; p < 2; ++p)
        for (int i = 0; i < n[p]; ++i) {
            if (o->sgd) {
                mm[p][i] = m->head_steps == 1 ? g[p][i] : 0.9f * mm[p][i] + g[p][i];
                w[p][i] -= (float)o->lr * mm[p][i];
            } else {
                mm[p][i] = (float)(b1 * mm[p][i] + (1 - b1) * g[p][i]);
                vv[p][i] = (float)(b2 * vv[p][i] + (1 - b2) * g[p][i] * g[p][i]);
                w[p][i] -= (float)(step * mm[p][i] / (sqrt(vv[p][i]) * ibc2 + eps));
            }
        }
    return 0;
}

