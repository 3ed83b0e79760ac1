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
 * rank draws its own shard of every batch, owns E/P experts, and the replicated weights (router,
 * noise network, readout) get their gradients summed over ranks before each step; the dense
 * baseline, one expert that cannot be split, is trained data-parallel. Rank 0 prints.
 *
 * usage: train_mixture [--steps N] [--seed S] [--backend cpu|cuda] [--check] [--help] ... */
#define _POSIX_C_SOURCE 199309L

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "core/clock.h"
#include "moe/moe.h"
#include "tool_util.h"

#ifdef MOE_EXAMPLE_WITH_MPI
#include <mpi.h>
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

/* load-balancing strategies: which mechanism keeps the experts' loads even */
typedef enum {
    STRATEGY_DEFAULT = 0,   /* the example's own choice: noisy top-k, switch 1e-2, z 1e-3 */
    STRATEGY_NONE,          /* plain top-k, no aux loss, no bias */
    STRATEGY_SWITCH,        /* Switch Transformer loss (Fedus et al.) */
    STRATEGY_IMPORTANCE_LOAD, /* importance + load losses with noisy top-k (Shazeer et al.) */
    STRATEGY_Z_LOSS,        /* router z-loss only (Zoph et al., ST-MoE) */
    STRATEGY_LOSS_FREE,     /* auxiliary-loss-free selection bias (Wang et al., DeepSeek-V3) */
    STRATEGY_EXPERT_CHOICE  /* experts pick their top-C tokens (Zhou et al.) */
} strategy_t;

static const char *const strategy_names[] = {"default",   "none",      "switch",
                                             "importance-load", "z-loss", "loss-free",
                                             "expert-choice"};
#define NUM_STRATEGIES 7

typedef struct {
    int steps, batch, log_every, eval_tokens;
    unsigned long long seed;
    moe_backend_t backend;
    int check, dense;
    double check_threshold; /* --check: MoE eval loss must be below this and the dense one */
    int regimes, experts, top_k, d_model, d_ff, d_out, teacher_width;
    double lr, capacity_factor;
    strategy_t strategy;
    /* balancing knobs; < 0 (or noisy < 0) until resolved from the strategy, explicit options
     * override the strategy's values */
    double switch_coef, importance_coef, load_coef, z_coef, bias_rate;
    int noisy;
    moe_router_type_t router;
    int sgd;
    const char *csv_path, *trace_path;
    int expect_ranks; /* --expect-ranks: refuse to run on another number of ranks (tests) */
    int rank, world; /* this process's rank of the expert-parallel run (0 of 1 without MPI) */
} options_t;

static void usage(FILE *f, const char *argv0) {
    fprintf(f,
            "usage: %s [options]\n"
            "  --steps N            training steps for each model (default 2000)\n"
            "  --seed S             data, teachers and parameter init (default 1)\n"
            "  --backend cpu|cuda   libmoe backend (default cpu; expert parallelism needs cpu)\n"
            "  --check              exit 1 unless the MoE's held-out loss is below the threshold\n"
            "                       and below the dense baseline's\n"
            "  --threshold X        the --check threshold on the MoE's held-out MSE (default 0.08)\n"
            "  --expect-ranks N     exit 2 unless running on N ranks (tests of mpirun runs)\n"
            "  --no-dense           skip the dense baseline (--check then tests the threshold)\n"
            "  --batch N            tokens per step over all ranks (default 256)\n"
            "  --log-every N        progress line (and CSV row) every N steps (default steps/10)\n"
            "  --regimes R          generating processes (default 4)\n"
            "  --experts E          experts (default 4)\n"
            "  --top-k K            experts per token (default 1; expert choice: C = cf*T*K/E)\n"
            "  --d-model D --d-ff F --d-out O   sizes (default 16, 32, 4)\n"
            "  --lr X               learning rate (default 1e-2)\n"
            "  --sgd                SGD with momentum 0.9 instead of Adam\n"
            "  --strategy S         load balancing: none | switch | importance-load | z-loss |\n"
            "                       loss-free | expert-choice (default: noisy top-k with\n"
            "                       switch 1e-2 and z 1e-3)\n"
            "  --capacity-factor X  expert capacity (default 0: dropless; expert choice: 1)\n"
            "  --switch-coef X --importance-coef X --load-coef X --z-coef X   aux loss\n"
            "                       coefficients (override the strategy's: switch 1e-2,\n"
            "                       importance-load 1e-1 each, z-loss 1e-3)\n"
            "  --bias-rate X        loss-free bias update rate (loss-free default 1e-2)\n"
            "  --noise | --no-noise Shazeer's noisy top-k on or off (default: on for the\n"
            "                       default and importance-load strategies, off otherwise)\n"
            "  --csv FILE           one row per logged step: loss, per-expert load, imbalance,\n"
            "                       dropped fraction, aux losses (docs/load-balancing.md)\n"
            "  --trace FILE         routing trace of the MoE's training forwards (docs/trace.md;\n"
            "                       under mpirun each rank writes FILE.rank<r>)\n",
            argv0);
}

static int parse(int argc, char **argv, options_t *o) {
    *o = (options_t){.steps = 2000, .batch = 256, .log_every = 0, .eval_tokens = 4096,
                     .seed = 1, .backend = MOE_BACKEND_CPU, .check = 0, .dense = 1,
                     .check_threshold = 0.08, .regimes = 4, .experts = 4, .top_k = 1,
                     .d_model = 16, .d_ff = 32, .d_out = 4, .teacher_width = 16, .lr = 1e-2,
                     .capacity_factor = 0.0, .strategy = STRATEGY_DEFAULT,
                     .switch_coef = -1.0, .importance_coef = -1.0, .load_coef = -1.0,
                     .z_coef = -1.0, .bias_rate = -1.0, .noisy = -1,
                     .router = MOE_ROUTER_TOKEN_CHOICE, .sgd = 0, .rank = 0, .world = 1};
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
        INT_OPT("--expect-ranks", expect_ranks)
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
        DBL_OPT("--importance-coef", importance_coef)
        DBL_OPT("--load-coef", load_coef)
        DBL_OPT("--z-coef", z_coef)
        DBL_OPT("--bias-rate", bias_rate)
#undef INT_OPT
#undef DBL_OPT
        if (!strcmp(a, "--seed") && v) { o->seed = strtoull(v, NULL, 10); ++i; continue; }
        if (!strcmp(a, "--csv") && v) { o->csv_path = v; ++i; continue; }
        if (!strcmp(a, "--trace") && v) { o->trace_path = v; ++i; continue; }
        if (!strcmp(a, "--check")) { o->check = 1; continue; }
        if (!strcmp(a, "--no-dense")) { o->dense = 0; continue; }
        if (!strcmp(a, "--sgd")) { o->sgd = 1; continue; }
        if (!strcmp(a, "--noise")) { o->noisy = 1; continue; }
        if (!strcmp(a, "--no-noise")) { o->noisy = 0; continue; }
        if (!strcmp(a, "--strategy") && v) {
            int found = -1;
            for (int s = 1; s < NUM_STRATEGIES; ++s)
                if (!strcmp(v, strategy_names[s])) found = s;
            if (found < 0) {
                fprintf(stderr, "--strategy must be none, switch, importance-load, z-loss, "
                                "loss-free or expert-choice, not '%s'\n", v);
                return 2;
            }
            o->strategy = (strategy_t)found;
            ++i;
            continue;
        }
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

    /* the strategy's settings, then the explicit options on top */
    double sw = 0.0, imp = 0.0, ld = 0.0, z = 0.0, rate = 0.0;
    int noisy = 0;
    switch (o->strategy) {
    case STRATEGY_DEFAULT: sw = 1e-2, z = 1e-3, noisy = 1; break;
    case STRATEGY_NONE: break;
    case STRATEGY_SWITCH: sw = 1e-2; break;
    /* Shazeer et al. used w_importance = w_load = 0.1 */
    case STRATEGY_IMPORTANCE_LOAD: imp = 1e-1, ld = 1e-1, noisy = 1; break;
    case STRATEGY_Z_LOSS: z = 1e-3; break;
    case STRATEGY_LOSS_FREE: rate = 1e-2; break;
    case STRATEGY_EXPERT_CHOICE: o->router = MOE_ROUTER_EXPERT_CHOICE; break;
    }
    if (o->switch_coef < 0.0) o->switch_coef = sw;
    if (o->importance_coef < 0.0) o->importance_coef = imp;
    if (o->load_coef < 0.0) o->load_coef = ld;
    if (o->z_coef < 0.0) o->z_coef = z;
    if (o->bias_rate < 0.0) o->bias_rate = rate;
    if (o->noisy < 0) o->noisy = noisy;
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
 * ranks: sums over the processes of an expert-parallel run (no-ops on one rank)
 * ------------------------------------------------------------------------------------------- */

static void sum_over_ranks_d(const options_t *o, double *v, int n) {
#ifdef MOE_EXAMPLE_WITH_MPI
    if (o->world > 1) MPI_Allreduce(MPI_IN_PLACE, v, n, MPI_DOUBLE, MPI_SUM, MPI_COMM_WORLD);
#endif
    (void)o, (void)v, (void)n;
}
static void sum_over_ranks_f(const options_t *o, float *v, int64_t n) {
#ifdef MOE_EXAMPLE_WITH_MPI
    if (o->world > 1) MPI_Allreduce(MPI_IN_PLACE, v, (int)n, MPI_FLOAT, MPI_SUM, MPI_COMM_WORLD);
#endif
    (void)o, (void)v, (void)n;
}

/* this rank's share [*lo, *hi) of T tokens split as evenly as possible */
static void shard(const options_t *o, int T, int *lo, int *hi) {
    int q = T / o->world, r = T % o->world;
    *lo = o->rank * q + (o->rank < r ? o->rank : r);
    *hi = *lo + q + (o->rank < r ? 1 : 0);
}

/* ---------------------------------------------------------------------------------------------
 * the model: one libmoe layer and a linear readout (host, plain C, its own Adam)
 * ------------------------------------------------------------------------------------------- */

typedef struct {
    const char *name;
    moe_layer_t *layer;
    moe_optimizer_t *opt;
    int D, O, E, K;
    int expert_parallel;      /* the layer spans the ranks: sum the router gradients */
    float *Wh, *bh;           /* (D, O), (O) readout */
    float *gWh, *gbh;         /* their gradients */
    float *mW, *vW, *mb, *vb; /* readout Adam moments (SGD: mW, mb are momentum) */
    long long head_steps;
    void *x_d, *h_d, *dh_d, *dx_d; /* backend buffers (T, D) */
    float *h, *dh, *pred;          /* host (T, D), (T, D), (T, O) */
    int cap;                       /* tokens the buffers hold */
} model_t;

static int model_create(model_t *m, const char *name, moe_context_t *ctx, const options_t *o,
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

static int model_reserve(model_t *m, moe_backend_t b, int T) {
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

static void model_free(model_t *m, moe_backend_t b) {
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
static double model_forward(model_t *m, moe_backend_t b, const float *x, const float *y, int T,
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
static int model_backward_step(model_t *m, moe_backend_t b, const float *y, int T, int T_all,
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
        if (m->expert_parallel) CHECK(moe_layer_allreduce_router_grads(m->layer, NULL));
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

/* ---------------------------------------------------------------------------------------------
 * training and evaluation
 * ------------------------------------------------------------------------------------------- */

typedef struct {
    float *x, *y;
    int *regime;
    int T;
} batch_t;

static int batch_alloc(batch_t *b, const problem_t *p, int T) {
    b->T = T;
    b->x = malloc(sizeof(float) * (size_t)(T > 0 ? T : 1) * (size_t)p->D);
    b->y = malloc(sizeof(float) * (size_t)(T > 0 ? T : 1) * (size_t)p->O);
    b->regime = malloc(sizeof(int) * (size_t)(T > 0 ? T : 1));
    return !b->x || !b->y || !b->regime;
}
static void batch_free(batch_t *b) { free(b->x), free(b->y), free(b->regime); }

/* the balancing record of one logged step, global over ranks (the CSV columns) */
typedef struct {
    int64_t *tokens, *dropped; /* (E) moe_layer_stats: routed before capacity, dropped */
    float *bias;               /* (E) loss-free selection bias */
    int32_t *kept;             /* (T, W) this rank's kept flags */
} logbuf_t;

static void csv_header(FILE *f, int E) {
    fprintf(f, "step,loss,tokens");
    for (int e = 0; e < E; ++e) fprintf(f, ",load_%d", e);
    for (int e = 0; e < E; ++e) fprintf(f, ",routed_%d", e);
    fprintf(f, ",imbalance,imbalance_routed,dropped_frac,unrouted_frac,switch_loss,"
               "importance_loss,load_loss,z_loss,aux_loss");
    for (int e = 0; e < E; ++e) fprintf(f, ",bias_%d", e);
    fprintf(f, "\n");
}

/* one progress line (and CSV row) of the layer's last training forward; loss is the mean
 * training MSE since the previous one. Every rank calls it (it sums over ranks). */
static int log_step(model_t *m, const options_t *o, logbuf_t *lb, int s, double loss, int T,
                    FILE *csv) {
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
    if (o->rank != 0) return 0;

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
    printf("  imbalance %.3f  dropped %.3f  switch %.3f  z %.3f  aux %.5f\n", imbalance,
           dropped_frac, st.switch_loss, st.z_loss, st.aux_loss);
    if (csv) {
        fprintf(csv, "%d,%.6g,%lld", s, loss, (long long)st.num_tokens);
        for (int e = 0; e < E; ++e)
            fprintf(csv, ",%lld", (long long)(lb->tokens[e] - lb->dropped[e]));
        for (int e = 0; e < E; ++e) fprintf(csv, ",%lld", (long long)lb->tokens[e]);
        fprintf(csv, ",%.6g,%.6g,%.6g,%.6g,%.6g,%.6g,%.6g,%.6g,%.6g", imbalance, st.imbalance,
                dropped_frac, unrouted_frac, st.switch_loss, st.importance_loss, st.load_loss,
                st.z_loss, st.aux_loss);
        for (int e = 0; e < E; ++e) fprintf(csv, ",%.6g", lb->bias[e]);
        fprintf(csv, "\n");
    }
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
    if (csv && o->rank == 0) csv_header(csv, m->E);
    double run = 0.0, t0 = moe_now_s();
    int nrun = 0;
    if (o->rank == 0) printf("\n== %s: E=%d K=%d ==\n", m->name, m->E, m->K);
    for (int s = 1; s <= o->steps; ++s) {
        sample(p, &rng, o->batch, bt.x, bt.y, bt.regime);
        double se = model_forward(m, o->backend, x, y, T, 1);
        if (se < 0.0 || model_backward_step(m, o->backend, y, T, o->batch, o)) goto done;
        sum_over_ranks_d(o, &se, 1);
        run += se / ((double)o->batch * m->O), ++nrun;
        if (s % o->log_every == 0 || s == o->steps) {
            if (log_step(m, o, &lb, s, run / nrun, T, csv)) goto done;
            run = 0.0, nrun = 0;
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

static int run(options_t *o_, moe_comm_t *comm) {
    const options_t o = *o_;
    if (o.world > 1 && o.backend != MOE_BACKEND_CPU) {
        fprintf(stderr, "error: expert parallelism over MPI needs --backend cpu\n");
        return 2;
    }
    if (o.expect_ranks > 0 && o.world != o.expect_ranks) {
        fprintf(stderr, "error: running on %d rank%s, --expect-ranks %d\n", o.world,
                o.world == 1 ? "" : "s", o.expect_ranks);
        return 2;
    }
    if (o.experts % o.world) {
        fprintf(stderr, "error: %d experts cannot be split over %d ranks\n", o.experts, o.world);
        return 2;
    }
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

    const char *noise = o.noisy ? "noisy top-k" : "top-k";
    if (o.router == MOE_ROUTER_EXPERT_CHOICE)
        noise = o.noisy ? "noisy expert choice" : "expert choice";
    if (o.rank == 0) {
        printf("train_mixture: %d regimes, D=%d, targets %d-dim from per-regime tanh teachers "
               "(width %d)\n", p.R, p.D, p.O, p.H);
        printf("  MoE E=%d K=%d F=%d (%s) vs dense F=%d (same active parameters per token), %s, "
               "lr %g, %d steps x %d tokens, seed %llu, backend %s\n",
               o.experts, o.top_k, o.d_ff, noise, o.top_k * o.d_ff,
               o.sgd ? "SGD momentum 0.9" : "Adam", o.lr, o.steps, o.batch, o.seed,
               o.backend == MOE_BACKEND_CPU ? "cpu" : "cuda");
        printf("  balancing: strategy %s, capacity factor %g%s, switch %g, importance %g, "
               "load %g, z %g, bias rate %g\n", strategy_names[o.strategy], o.capacity_factor,
               o.capacity_factor > 0.0 || o.router == MOE_ROUTER_EXPERT_CHOICE ? "" : " (dropless)",
               o.switch_coef, o.importance_coef, o.load_coef, o.z_coef, o.bias_rate);
        if (o.world > 1)
            printf("  %d ranks (expert parallel over MPI): %d experts and %d-token shards each\n",
                   o.world, o.experts / o.world, o.batch / o.world);
        printf("  held-out MSE of predicting the mean: %.5f\n", var);
    }

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

    if (o.rank == 0) {
        if (o.dense)
            printf("\nfinal held-out MSE: moe %.5f  dense %.5f  (mean predictor %.5f); moe/dense "
                   "%.3f; specialisation %.3f\n", moe_loss, dense_loss, var,
                   moe_loss / dense_loss, purity);
        else
            printf("\nfinal held-out MSE: moe %.5f  (mean predictor %.5f); specialisation %.3f\n",
                   moe_loss, var, purity);
        /* one machine-readable line for scripts (scripts/lb-experiment) */
        printf("result strategy=%s capacity_factor=%g eval_mse=%.6f dense_mse=%.6f "
               "specialisation=%.4f\n", strategy_names[o.strategy], o.capacity_factor, moe_loss,
               dense_loss, purity);
    }
    int rc = 0;
    if (o.check) {
        int ok = moe_loss < o.check_threshold && (!o.dense || moe_loss < dense_loss);
        if (o.rank == 0) {
            if (o.dense)
                printf("check: moe %.5f < threshold %.5f and < dense %.5f: %s\n", moe_loss,
                       o.check_threshold, dense_loss, ok ? "PASS" : "FAIL");
            else
                printf("check: moe %.5f < threshold %.5f: %s\n", moe_loss, o.check_threshold,
                       ok ? "PASS" : "FAIL");
        }
        rc = ok ? 0 : 3; /* 3: the check failed (main exits 1), not an error */
    }
    model_free(&moe, o.backend);
    model_free(&dense, o.backend);
    CHECK(moe_context_destroy(ctx));
    CHECK(moe_context_destroy(ctx_dense));
    batch_free(&eval);
    problem_free(&p);
    return rc;
}
