/* mixture.h - what the files of train_mixture share: its options, the mixture problem and its
 * data (mixture_data.c), the model of one libmoe layer and a readout (mixture_model.c). */
#ifndef MOE_EXAMPLE_MIXTURE_H
#define MOE_EXAMPLE_MIXTURE_H

#include <stdint.h>
#include <stdio.h>

#include "moe/moe.h"

#define CHECK(call)                                                                     \
    do {                                                                                \
        moe_status_t st_ = (call);                                                      \
        if (st_ != MOE_STATUS_SUCCESS) {                                                \
            fprintf(stderr, "error: %s failed: %s\n  %s\n", #call, moe_status_string(st_), \
                    moe_last_error());                                                  \
            return 1;                                                                   \
        }                                                                               \
    } while (0)

/* ---- options (mixture_options.c) ---- */

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

extern const char *const strategy_names[];
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
    int rebalance_every, redundant; /* under mpirun: moe_layer_rebalance every N steps with R
                                       replica slots (0: never) */
} options_t;

int parse(int argc, char **argv, options_t *o);

/* ---- the data: R regimes, each a cluster of inputs with its own teacher (mixture_data.c) ---- */

typedef struct { unsigned long long s; } rng_t;

unsigned long long rng_next(rng_t *r);
double rng_uniform(rng_t *r);
double rng_normal(rng_t *r);

typedef struct {
    int R, D, O, H;
    float *mu; /* (R, D) regime centres */
    float *U;  /* (R, H, D) */
    float *c;  /* (R, H) */
    float *V;  /* (R, O, H) */
    double centre_norm;
} problem_t;

int problem_init(problem_t *p, const options_t *o, rng_t *rng);
void problem_free(problem_t *p);
void sample(const problem_t *p, rng_t *rng, int T, float *x, float *y, int *regime);

typedef struct {
    float *x, *y;
    int *regime;
    int T;
} batch_t;

int batch_alloc(batch_t *b, const problem_t *p, int T);
void batch_free(batch_t *b);

/* ---- ranks and the model (mixture_model.c) ---- */

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

void sum_over_ranks_d(const options_t *o, double *v, int n);
void sum_over_ranks_f(const options_t *o, float *v, int64_t n);
void shard(const options_t *o, int T, int *lo, int *hi);
int model_create(model_t *m, const char *name, moe_context_t *ctx, const options_t *o,
                        int E, int K, int F, int expert_parallel, rng_t *rng);
int model_reserve(model_t *m, moe_backend_t b, int T);
void model_free(model_t *m, moe_backend_t b);
double model_forward(model_t *m, moe_backend_t b, const float *x, const float *y, int T,
                            int training);
int model_backward_step(model_t *m, moe_backend_t b, const float *y, int T, int T_all,
                               const options_t *o);

#endif /* MOE_EXAMPLE_MIXTURE_H */
