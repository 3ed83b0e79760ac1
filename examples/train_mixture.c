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
 * usage: train_mixture [--steps N] [--seed S] [--backend cpu|cuda] [--check] [--help] ... */
#define _POSIX_C_SOURCE 199309L

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "moe/moe.h"

#ifdef MOE_EXAMPLE_WITH_CUDA
#include <cuda_runtime_api.h>
#endif

#define CHECK(call)                                                                     \
    do {                                                                                \
        moe_status_t st_ = (call);                                                      \
        if (st_ != MOE_STATUS_SUCCESS) {                                                \
            fprintf(stderr, "error: %s failed: %s\n  %s\n", #call, moe_status_string(st_), \
                    moe_last_error());                                                  \
            return 1;                                                                   \
        }                                                                               \
    } while (0)

/* ---------------------------------------------------------------------------------------------
 * options
 * ------------------------------------------------------------------------------------------- */

typedef struct {
    int steps, batch, log_every, eval_tokens;
    unsigned long long seed;
    moe_backend_t backend;
    int check;
    double check_threshold; /* --check: MoE eval loss must be below this and the dense one */
    int regimes, experts, top_k, d_model, d_ff, d_out, teacher_width;
    double lr, capacity_factor, switch_coef, z_coef;
    int sgd, noisy;
} options_t;

static void usage(FILE *f, const char *argv0) {
    fprintf(f,
            "usage: %s [options]\n"
            "  --steps N            training steps for each model (default 2000)\n"
            "  --seed S             data, teachers and parameter init (default 1)\n"
            "  --backend cpu|cuda   libmoe backend (default cpu)\n"
            "  --check              exit 1 unless the MoE's held-out loss is below the threshold\n"
            "                       and below the dense baseline's\n"
            "  --threshold X        the --check threshold on the MoE's held-out MSE (default 0.08)\n"
            "  --batch N            tokens per step (default 256)\n"
            "  --log-every N        progress line every N steps (default steps/10)\n"
            "  --regimes R          generating processes (default 4)\n"
            "  --experts E          experts (default 4)\n"
            "  --top-k K            experts per token (default 1)\n"
            "  --d-model D --d-ff F --d-out O   sizes (default 16, 32, 4)\n"
            "  --lr X               learning rate (default 1e-2)\n"
            "  --sgd                SGD with momentum 0.9 instead of Adam\n"
            "  --no-noise           plain top-k gating instead of Shazeer's noisy top-k\n"
            "  --capacity-factor X  expert capacity (default 0: dropless)\n"
            "  --switch-coef X --z-coef X   aux loss coefficients (default 1e-2, 1e-3)\n",
            argv0);
}

static int parse(int argc, char **argv, options_t *o) {
    *o = (options_t){.steps = 2000, .batch = 256, .log_every = 0, .eval_tokens = 4096,
                     .seed = 1, .backend = MOE_BACKEND_CPU, .check = 0, .check_threshold = 0.08,
                     .regimes = 4, .experts = 4, .top_k = 1, .d_model = 16, .d_ff = 32,
                     .d_out = 4, .teacher_width = 16, .lr = 1e-2, .capacity_factor = 0.0,
                     .switch_coef = 1e-2, .z_coef = 1e-3, .sgd = 0, .noisy = 1};
    for (int i = 1; i < argc; ++i) {
        const char *a = argv[i];
        const char *v = i + 1 < argc ? argv[i + 1] : NULL;
#define INT_OPT(name, field) \
    if (!strcmp(a, name) && v) { o->field = atoi(v); ++i; continue; }
#define DBL_OPT(name, field) \
    if (!strcmp(a, name) && v) { o->field = atof(v); ++i; continue; }
        INT_OPT("--steps", steps)
        INT_OPT("--batch", batch)
        INT_OPT("--log-every", log_every)
        INT_OPT("--regimes", regimes)
        INT_OPT("--experts", experts)
        INT_OPT("--top-k", top_k)
        INT_OPT("--d-model", d_model)
        INT_OPT("--d-ff", d_ff)
        INT_OPT("--d-out", d_out)
        DBL_OPT("--lr", lr)
        DBL_OPT("--threshold", check_threshold)
        DBL_OPT("--capacity-factor", capacity_factor)
        DBL_OPT("--switch-coef", switch_coef)
        DBL_OPT("--z-coef", z_coef)
#undef INT_OPT
#undef DBL_OPT
        if (!strcmp(a, "--seed") && v) { o->seed = strtoull(v, NULL, 10); ++i; continue; }
        if (!strcmp(a, "--check")) { o->check = 1; continue; }
        if (!strcmp(a, "--sgd")) { o->sgd = 1; continue; }
        if (!strcmp(a, "--no-noise")) { o->noisy = 0; continue; }
        if (!strcmp(a, "--backend") && v) {
            if (!strcmp(v, "cpu")) o->backend = MOE_BACKEND_CPU;
            else if (!strcmp(v, "cuda")) o->backend = MOE_BACKEND_CUDA;
            else { fprintf(stderr, "--backend must be cpu or cuda, not '%s'\n", v); return 2; }
            ++i;
            continue;
        }
        if (!strcmp(a, "--help") || !strcmp(a, "-h")) { usage(stdout, argv[0]); exit(0); }
        fprintf(stderr, "unknown or incomplete option '%s'\n", a);
        usage(stderr, argv[0]);
        return 2;
    }
    if (o->steps < 1 || o->batch < 1 || o->regimes < 1 || o->experts < 1 || o->top_k < 1 ||
        o->top_k > o->experts || o->d_model < 1 || o->d_ff < 1 || o->d_out < 1 ||
        !(o->lr > 0)) {
        fprintf(stderr, "options out of range (steps, batch, sizes >= 1, top-k <= experts, "
                        "lr > 0)\n");
        return 2;
    }
    if (o->log_every <= 0) o->log_every = o->steps >= 10 ? o->steps / 10 : 1;
    return 0;
}

/* ---------------------------------------------------------------------------------------------
 * the data: R regimes, each a cluster of inputs with its own teacher network
 * ------------------------------------------------------------------------------------------- */

typedef struct { unsigned long long s; } rng_t;

static unsigned long long rng_next(rng_t *r) { /* splitmix64 */
    unsigned long long z = (r->s += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}
static double rng_uniform(rng_t *r) { return ((double)(rng_next(r) >> 11) + 0.5) / 9007199254740992.0; }
static double rng_normal(rng_t *r) {
    return sqrt(-2.0 * log(rng_uniform(r))) * cos(6.283185307179586 * rng_uniform(r));
}

typedef struct {
    int R, D, O, H;
    float *mu; /* (R, D) regime centres */
    float *U;  /* (R, H, D) */
    float *c;  /* (R, H) */
    float *V;  /* (R, O, H) */
    double centre_norm;
} problem_t;

static int problem_init(problem_t *p, const options_t *o, rng_t *rng) {
    p->R = o->regimes, p->D = o->d_model, p->O = o->d_out, p->H = o->teacher_width;
    p->centre_norm = 4.0; /* centres this far apart relative to the unit noise: separable */
    p->mu = malloc(sizeof(float) * (size_t)(p->R * p->D));
    p->U = malloc(sizeof(float) * (size_t)(p->R * p->H * p->D));
    p->c = malloc(sizeof(float) * (size_t)(p->R * p->H));
    p->V = malloc(sizeof(float) * (size_t)(p->R * p->O * p->H));
    if (!p->mu || !p->U || !p->c || !p->V) return 1;
    for (int r = 0; r < p->R; ++r) {
        double n2 = 0.0;
        for (int d = 0; d < p->D; ++d) {
            double v = rng_normal(rng);
            p->mu[r * p->D + d] = (float)v;
            n2 += v * v;
        }
        for (int d = 0; d < p->D; ++d)
            p->mu[r * p->D + d] = (float)(p->mu[r * p->D + d] * p->centre_norm / sqrt(n2));
    }
    /* teacher: unit-variance pre-activations for the noise around the centre, outputs of
     * order 1; each regime's map is unrelated to the others' */
    for (int i = 0; i < p->R * p->H * p->D; ++i) p->U[i] = (float)(rng_normal(rng) * 1.5 / sqrt(p->D));
    for (int i = 0; i < p->R * p->H; ++i) p->c[i] = (float)rng_normal(rng);
    for (int i = 0; i < p->R * p->O * p->H; ++i) p->V[i] = (float)(rng_normal(rng) / sqrt(p->H));
    return 0;
}

static void problem_free(problem_t *p) { free(p->mu), free(p->U), free(p->c), free(p->V); }

/* T tokens: x (T, D), y (T, O), regime (T) */
static void sample(const problem_t *p, rng_t *rng, int T, float *x, float *y, int *regime) {
    for (int t = 0; t < T; ++t) {
        int r = (int)(rng_next(rng) % (unsigned long long)p->R);
        regime[t] = r;
        float *xt = x + (size_t)t * p->D;
        for (int d = 0; d < p->D; ++d) xt[d] = p->mu[r * p->D + d] + (float)rng_normal(rng);
        for (int o = 0; o < p->O; ++o) y[(size_t)t * p->O + o] = 0.0f;
        for (int h = 0; h < p->H; ++h) {
            /* the teacher looks at the offset from its centre, so regimes do not share a map */
            double a = p->c[r * p->H + h];
            for (int d = 0; d < p->D; ++d)
                a += p->U[(r * p->H + h) * p->D + d] * (xt[d] - p->mu[r * p->D + d]);
            double th = tanh(a);
            for (int o = 0; o < p->O; ++o)
                y[(size_t)t * p->O + o] += (float)(p->V[(r * p->O + o) * p->H + h] * th);
        }
    }
}

/* ---------------------------------------------------------------------------------------------
 * backend memory for x, y, dy, dx: host arrays on the CPU backend, device buffers on CUDA
 * ------------------------------------------------------------------------------------------- */

static int dev_alloc(moe_backend_t b, void **p, size_t bytes) {
#ifdef MOE_EXAMPLE_WITH_CUDA
    if (b == MOE_BACKEND_CUDA) return cudaMalloc(p, bytes) != cudaSuccess;
#endif
    (void)b;
    *p = malloc(bytes);
    return *p == NULL;
}
static void dev_free(moe_backend_t b, void *p) {
#ifdef MOE_EXAMPLE_WITH_CUDA
    if (b == MOE_BACKEND_CUDA) { cudaFree(p); return; }
#endif
    (void)b;
    free(p);
}
/* to_dev: host -> backend memory; otherwise backend -> host. Complete on return. */
static int dev_copy(moe_backend_t b, void *dst, const void *src, size_t bytes, int to_dev) {
#ifdef MOE_EXAMPLE_WITH_CUDA
    if (b == MOE_BACKEND_CUDA)
        return cudaMemcpy(dst, src, bytes, to_dev ? cudaMemcpyHostToDevice
                                                  : cudaMemcpyDeviceToHost) != cudaSuccess;
#endif
    (void)b, (void)to_dev;
    memcpy(dst, src, bytes);
    return 0;
}

/* ---------------------------------------------------------------------------------------------
 * the model: one libmoe layer and a linear readout (host, plain C, its own Adam)
 * ------------------------------------------------------------------------------------------- */

typedef struct {
    const char *name;
    moe_layer_t *layer;
    moe_optimizer_t *opt;
    int D, O, E, K;
    float *Wh, *bh;           /* (D, O), (O) readout */
    float *gWh, *gbh;         /* their gradients */
    float *mW, *vW, *mb, *vb; /* readout Adam moments (SGD: mW, mb are momentum) */
    long long head_steps;
    void *x_d, *h_d, *dh_d, *dx_d; /* backend buffers (T, D) */
    float *h, *dh, *pred;          /* host (T, D), (T, D), (T, O) */
    int cap;                       /* tokens the buffers hold */
} model_t;

static int model_create(model_t *m, const char *name, moe_context_t *ctx, const options_t *o,
                        int E, int K, int F, rng_t *rng) {
    memset(m, 0, sizeof *m);
    m->name = name;
    m->D = o->d_model, m->O = o->d_out, m->E = E, m->K = K;
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
    cfg.noisy_gating = E > 1 ? o->noisy : 0;
    cfg.capacity_factor = o->capacity_factor;
    cfg.switch_loss_coef = E > 1 ? o->switch_coef : 0.0;
    cfg.z_loss_coef = E > 1 ? o->z_coef : 0.0;
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

static int model_reserve(model_t *m, moe_backend_t b, int T) {
    if (T <= m->cap) return 0;
    size_t bytes = sizeof(float) * (size_t)T * (size_t)m->D;
    dev_free(b, m->x_d), dev_free(b, m->h_d), dev_free(b, m->dh_d), dev_free(b, m->dx_d);
    free(m->h), free(m->dh), free(m->pred);
    m->h = malloc(bytes), m->dh = malloc(bytes);
    m->pred = malloc(sizeof(float) * (size_t)T * (size_t)m->O);
    if (dev_alloc(b, &m->x_d, bytes) || dev_alloc(b, &m->h_d, bytes) ||
        dev_alloc(b, &m->dh_d, bytes) || dev_alloc(b, &m->dx_d, bytes) || !m->h || !m->dh ||
        !m->pred) {
        fprintf(stderr, "error: buffers for %d tokens\n", T);
        return 1;
    }
    m->cap = T;
    return 0;
}

static void model_free(model_t *m, moe_backend_t b) {
    moe_optimizer_destroy(m->opt);
    moe_layer_destroy(m->layer);
    dev_free(b, m->x_d), dev_free(b, m->h_d), dev_free(b, m->dh_d), dev_free(b, m->dx_d);
    free(m->h), free(m->dh), free(m->pred);
    free(m->Wh), free(m->gWh), free(m->mW), free(m->vW);
    free(m->bh), free(m->gbh), free(m->mb), free(m->vb);
}

/* forward of the whole model on T tokens; returns the MSE against y (or -1 on error) */
static double model_forward(model_t *m, moe_backend_t b, const float *x, const float *y, int T,
                            int training) {
    size_t bytes = sizeof(float) * (size_t)T * (size_t)m->D;
    if (model_reserve(m, b, T) || dev_copy(b, m->x_d, x, bytes, 1)) return -1.0;
    moe_status_t st = moe_layer_forward(m->layer, m->x_d, m->h_d, T, training, NULL);
    if (st != MOE_STATUS_SUCCESS) {
        fprintf(stderr, "error: moe_layer_forward: %s\n  %s\n", moe_status_string(st),
                moe_last_error());
        return -1.0;
    }
    if (dev_copy(b, m->h, m->h_d, bytes, 0)) return -1.0;
    double se = 0.0;
    for (int t = 0; t < T; ++t)
        for (int o = 0; o < m->O; ++o) {
            double a = m->bh[o];
            for (int d = 0; d < m->D; ++d) a += (double)m->h[t * m->D + d] * m->Wh[d * m->O + o];
            m->pred[t * m->O + o] = (float)a;
            double e = a - y[t * m->O + o];
            se += e * e;
        }
    return se / ((double)T * m->O);
}

/* backward of the MSE through the readout and the layer, then one optimizer step of both */
static int model_backward_step(model_t *m, moe_backend_t b, const float *y, int T,
                               const options_t *o) {
    const int D = m->D, O = m->O;
    const float scale = 2.0f / ((float)T * (float)O); /* d mean((pred - y)^2) / d pred */
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
    if (dev_copy(b, m->dh_d, m->dh, sizeof(float) * (size_t)T * (size_t)D, 1)) return 1;
    CHECK(moe_layer_zero_grad(m->layer, NULL));
    CHECK(moe_layer_backward(m->layer, m->dh_d, m->dx_d, NULL));
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

/* ---------------------------------------------------------------------------------------------
 * training and evaluation
 * ------------------------------------------------------------------------------------------- */

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

typedef struct {
    float *x, *y;
    int *regime;
    int T;
} batch_t;

static int batch_alloc(batch_t *b, const problem_t *p, int T) {
    b->T = T;
    b->x = malloc(sizeof(float) * (size_t)T * (size_t)p->D);
    b->y = malloc(sizeof(float) * (size_t)T * (size_t)p->O);
    b->regime = malloc(sizeof(int) * (size_t)T);
    return !b->x || !b->y || !b->regime;
}
static void batch_free(batch_t *b) { free(b->x), free(b->y), free(b->regime); }

/* trains m for o->steps on fresh batches (the data seed is the same for every model, so the
 * MoE and the dense baseline see the same tokens); returns the held-out MSE, or -1 */
static double train(model_t *m, const problem_t *p, const options_t *o, const batch_t *eval) {
    rng_t rng = {o->seed * 1000003ull + 5ull};
    batch_t bt;
    if (batch_alloc(&bt, p, o->batch)) return -1.0;
    int64_t *tpe = calloc((size_t)m->E, sizeof(int64_t));
    double run = 0.0, t0 = now_s();
    int nrun = 0;
    printf("\n== %s: E=%d K=%d ==\n", m->name, m->E, m->K);
    for (int s = 1; s <= o->steps; ++s) {
        sample(p, &rng, o->batch, bt.x, bt.y, bt.regime);
        double loss = model_forward(m, o->backend, bt.x, bt.y, o->batch, 1);
        if (loss < 0.0 || model_backward_step(m, o->backend, bt.y, o->batch, o)) {
            batch_free(&bt), free(tpe);
            return -1.0;
        }
        run += loss, ++nrun;
        if (s % o->log_every == 0 || s == o->steps) {
            moe_routing_stats_t st;
            if (moe_layer_stats(m->layer, &st, tpe, NULL) != MOE_STATUS_SUCCESS) break;
            printf("step %5d  loss %.5f  tokens/expert", s, run / nrun);
            for (int e = 0; e < m->E; ++e) printf(" %4lld", (long long)tpe[e]);
            printf("  dropped %lld  switch %.3f  z %.3f  aux %.5f\n", (long long)st.num_dropped,
                   st.switch_loss, st.z_loss, st.aux_loss);
            run = 0.0, nrun = 0;
        }
    }
    double secs = now_s() - t0;
    double ev = model_forward(m, o->backend, eval->x, eval->y, eval->T, 0);
    printf("%s: held-out MSE %.5f after %d steps (%.1f s)\n", m->name, ev, o->steps,
           secs);
    batch_free(&bt), free(tpe);
    return ev;
}

/* regime x expert table of the last (held-out) forward; returns the mean over regimes of the
 * largest fraction (1.0 = every regime goes to one expert) */
static double specialisation(model_t *m, const batch_t *eval, int R) {
    const int T = eval->T, K = m->K, E = m->E;
    int32_t *idx = malloc(sizeof(int32_t) * (size_t)T * (size_t)K);
    int32_t *kept = malloc(sizeof(int32_t) * (size_t)T * (size_t)K);
    double *frac = calloc((size_t)(R * E), sizeof(double));
    int *count = calloc((size_t)R, sizeof(int));
    double purity = 0.0;
    if (!idx || !kept || !frac || !count ||
        moe_layer_routing(m->layer, idx, NULL, kept) != MOE_STATUS_SUCCESS) {
        fprintf(stderr, "error: routing table: %s\n", moe_last_error());
        purity = -1.0;
        goto done;
    }
    for (int t = 0; t < T; ++t) {
        int r = eval->regime[t];
        count[r]++;
        for (int j = 0; j < K; ++j)
            if (kept[t * K + j]) frac[r * E + idx[t * K + j]] += 1.0 / K;
    }
    printf("\nfraction of each regime's held-out tokens routed to each expert (K=%d choices "
           "count 1/K each):\n  regime ", K);
    for (int e = 0; e < E; ++e) printf("  exp%-3d", e);
    printf("\n");
    for (int r = 0; r < R; ++r) {
        double best = 0.0;
        printf("  %6d ", r);
        for (int e = 0; e < E; ++e) {
            double f = count[r] ? frac[r * E + e] / count[r] : 0.0;
            best = f > best ? f : best;
            printf("  %5.3f ", f);
        }
        printf("\n");
        purity += best / R;
    }
    printf("  specialisation (mean over regimes of the largest fraction): %.3f\n", purity);
done:
    free(idx), free(kept), free(frac), free(count);
    return purity;
}

int main(int argc, char **argv) {
    options_t o;
    int rc = parse(argc, argv, &o);
    if (rc) return rc;
    rng_t rng = {o.seed};
    problem_t p;
    if (problem_init(&p, &o, &rng)) return 1;
    batch_t eval;
    if (batch_alloc(&eval, &p, o.eval_tokens)) return 1;
    rng_t erng = {o.seed * 31337ull + 3ull};
    sample(&p, &erng, eval.T, eval.x, eval.y, eval.regime);
    double var = 0.0, mean[64] = {0};
    for (int t = 0; t < eval.T; ++t)
        for (int k = 0; k < p.O && k < 64; ++k) mean[k] += eval.y[t * p.O + k] / eval.T;
    for (int t = 0; t < eval.T; ++t)
        for (int k = 0; k < p.O && k < 64; ++k) {
            double e = eval.y[t * p.O + k] - mean[k];
            var += e * e / ((double)eval.T * p.O);
        }

    printf("train_mixture: %d regimes, D=%d, targets %d-dim from per-regime tanh teachers "
           "(width %d)\n", p.R, p.D, p.O, p.H);
    printf("  MoE E=%d K=%d F=%d (%s) vs dense F=%d (same active parameters per token), %s, lr %g, "
           "%d steps x %d tokens, seed %llu, backend %s\n",
           o.experts, o.top_k, o.d_ff, o.noisy ? "noisy top-k" : "top-k", o.top_k * o.d_ff, o.sgd ? "SGD momentum 0.9" : "Adam",
           o.lr, o.steps, o.batch, o.seed, o.backend == MOE_BACKEND_CPU ? "cpu" : "cuda");
    printf("  held-out MSE of predicting the mean: %.5f\n", var);

    moe_context_t *ctx = NULL;
    CHECK(moe_context_create(&ctx, o.backend, 0, NULL));
    model_t moe, dense;
    rng_t hrng = {o.seed * 4099ull + 11ull};
    if (model_create(&moe, "moe", ctx, &o, o.experts, o.top_k, o.d_ff, &hrng)) return 1;
    hrng.s = o.seed * 4099ull + 11ull; /* the same readout init for both */
    if (model_create(&dense, "dense", ctx, &o, 1, 1, o.top_k * o.d_ff, &hrng)) return 1;

    double moe_loss = train(&moe, &p, &o, &eval);
    if (moe_loss < 0.0) return 1;
    double purity = specialisation(&moe, &eval, p.R);
    double dense_loss = train(&dense, &p, &o, &eval);
    if (dense_loss < 0.0) return 1;

    printf("\nfinal held-out MSE: moe %.5f  dense %.5f  (mean predictor %.5f); moe/dense %.3f; "
           "specialisation %.3f\n", moe_loss, dense_loss, var, moe_loss / dense_loss, purity);
    rc = 0;
    if (o.check) {
        int ok = moe_loss < o.check_threshold && moe_loss < dense_loss;
        printf("check: moe %.5f < threshold %.5f and < dense %.5f: %s\n", moe_loss,
               o.check_threshold, dense_loss, ok ? "PASS" : "FAIL");
        rc = ok ? 0 : 1;
    }
    model_free(&moe, o.backend);
    model_free(&dense, o.backend);
    CHECK(moe_context_destroy(ctx));
    batch_free(&eval);
    problem_free(&p);
    return rc;
}
