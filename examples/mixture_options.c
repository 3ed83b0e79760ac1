/* mixture_options.c - the command line of train_mixture: --help text, parsing, and the
 * load-balancing strategy resolved into the layer's knobs. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "mixture.h"

const char *const strategy_names[] = {"default",   "none",      "switch",
                                             "importance-load", "z-loss", "loss-free",
                                             "expert-choice"};

/* ---------------------------------------------------------------------------------------------
 * options
 * ------------------------------------------------------------------------------------------- */




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
            "  --rebalance-every N  under mpirun: re-place the experts every N steps from the\n"
            "                       layer's running load (moe_layer_rebalance; default 0: never)\n"
            "  --redundant R        replica slots the re-placement may use (default 0)\n"
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

int parse(int argc, char **argv, options_t *o) {
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
        INT_OPT("--rebalance-every", rebalance_every)
        INT_OPT("--redundant", redundant)
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

