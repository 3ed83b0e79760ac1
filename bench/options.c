/* options.c - the command line of moe_bench: --help text and option parsing into bench_opts_t. */
#include <getopt.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "bench.h"
#include "core/dtype.h"

static void usage(FILE *f) {
    fprintf(f,
"usage: moe_bench [options]\n"
"Times one MoE layer of libmoe, forward or forward+backward, over a sweep of token counts.\n"
"\n"
"layer\n"
"  -t, --tokens N           tokens per call and rank (sets -b and -e; default 1024)\n"
"  -d, --d-model N          D (default 256)\n"
"  -F, --d-ff N             F, hidden width of each expert (default 512)\n"
"  -E, --experts N          E (default 8)\n"
"  -k, --top-k N            K experts per token (default 2)\n"
"      --dtype T            f32 | bf16 | f16 (default f32; the CPU backend has f32 only)\n"
"      --activation A       relu | gelu | silu | swiglu (default gelu)\n"
"      --gate G             softmax-of-topk | topk-of-softmax (default softmax-of-topk)\n"
"      --renormalize        topk-of-softmax: renormalise the K kept probabilities\n"
"      --noisy              noisy top-k gating (training forwards)\n"
"      --capacity-factor C  capacity C*T*K/E per expert; 0 = dropless (default 0)\n"
"      --priority P         position | score: who claims capacity first (default position)\n"
"      --no-bias            experts without b1, b2\n"
"      --preset NAME        a model family's routed experts (moe_layer_config_preset,\n"
"                           docs/presets.md): mixtral | qwen2-moe | qwen3-moe | deepseek-v3\n"
"                           (or deepseek) | switch | olmoe; other options given override it\n"
"workload\n"
"      --routing R          learned (the layer's own router; default) | uniform | zipf:S |\n"
"                           hot:FRACTION (share of assignments on expert 0) | rank-skew[:S]\n"
"                           (share S, default 0.9, of rank r's assignments on the experts of\n"
"                           rank r+1 mod P) | zero-rank (rank 0 has no tokens); the last two\n"
"                           need several ranks\n"
"      --replay FILE        time a recorded routing trace (docs/trace.md): iteration i forces\n"
"                           step i mod steps, its tokens split evenly over the ranks; E, K,\n"
"                           activation, gate and capacity come from the trace\n"
"      --seed N             inputs and routing targets (default 1); the layer keeps its own\n"
"run\n"
"      --backend B          cpu | cuda (default cuda when a CUDA context can be created)\n"
"      --device N           CUDA device ordinal (default 0; under mpirun: the local rank)\n"
"      --placement WHAT     expert placement over the ranks: contiguous (default), auto\n"
"                           (planned from one untimed forward's counts at each size, with\n"
"                           --redundant R extra slots) or a placement FILE (moe_trace plan)\n"
"      --redundant R        replica slots --placement auto may use (default 0)\n"
"      --local-ranks P      P expert-parallel ranks as threads of this process (local\n"
"                           communicator; CPU or CUDA). Under mpirun every process is a rank\n"
"                           (MPI communicator on CPU, NCCL with --backend cuda)\n"
"      --chunks C           cfg.num_chunks: all-to-all / expert pipeline depth (default 2)\n"
"      --link-bw GB/s       link bandwidth for the model column (default: the raw all-to-all\n"
"                           measured in the same run)\n"
"      --model-table        print the model's predictions for 8, 64, 512 H100s at the mixtral\n"
"                           and deepseek presets (docs/scaling.md; -t tokens per GPU, default\n"
"                           4096; --link-bw the inter-node GB/s, default 48) and exit\n"
"      --mode M             fwd | fwd-bwd (default fwd-bwd)\n"
"  -w, --warmup N           untimed iterations per size (default 2)\n"
"  -n, --iters N            timed iterations per size (default 5)\n"
"  -b, --min-tokens N       first size of the sweep\n"
"  -e, --max-tokens N       last size of the sweep\n"
"  -f, --step-factor X      multiply the size by X each step (default 2)\n"
"      --threads N          OpenMP and OpenBLAS threads (default: their own defaults)\n"
"  -c, --check              compare y, dx, every gradient and the routing with a float64\n"
"                           per-token computation from the layer's parameters (tolerance of\n"
"                           max|ref| by dtype: f32 1e-4, f16 5e-3, bf16 3e-2; with gating\n"
"                           noise y and the expert gradients only; several ranks: dropless,\n"
"                           no noise); exit 1 on a mismatch. MOE_BENCH_CHECK_PERTURB=NAME\n"
"                           (y dx dWg dW1 db1 dW2 db2) moves one value of NAME first: the\n"
"                           check must then fail\n"
"      --json FILE          write the results as JSON\n"
"      --trace FILE         write the timed calls as a Chrome/Perfetto trace (JSON)\n"
"  -h, --help               this text\n"
"\n"
"exit status: 0 ok, 1 failure or --check mismatch, 2 bad usage, 3 not supported here\n"
"\n"
"examples\n"
"  moe_bench                                    small default, finishes in seconds\n"
"  moe_bench -b 512 -e 8192 -f 2 --check        sweep 512..8192 tokens, checked\n"
"  moe_bench -t 4096 -d 512 -F 2048 --threads 2 --routing zipf:1.2 --json out.json\n"
"  moe_bench --preset mixtral -t 2048 --dtype bf16 --backend cuda\n"
"  moe_bench --local-ranks 4 -E 16 --check      expert parallel over 4 threads, checked\n"
"  mpirun -np 4 moe_bench -t 2048               one rank per process\n"
"  moe_bench --replay run.trace --local-ranks 2 the recorded routing on 2 ranks\n");
}

enum {
    OPT_DTYPE = 256, OPT_ACT, OPT_GATE, OPT_RENORM, OPT_NOISY, OPT_CAP, OPT_PRIO, OPT_NOBIAS,
    OPT_PRESET, OPT_ROUTING, OPT_SEED, OPT_BACKEND, OPT_DEVICE, OPT_MODE, OPT_THREADS, OPT_JSON,
    OPT_TRACE, OPT_LOCAL_RANKS, OPT_REPLAY, OPT_LINK_BW, OPT_MODEL_TABLE, OPT_CHUNKS,
    OPT_PLACEMENT, OPT_REDUNDANT
};

static const struct option long_opts[] = {
    {"tokens", required_argument, 0, 't'},     {"d-model", required_argument, 0, 'd'},
    {"d-ff", required_argument, 0, 'F'},       {"experts", required_argument, 0, 'E'},
    {"top-k", required_argument, 0, 'k'},      {"dtype", required_argument, 0, OPT_DTYPE},
    {"activation", required_argument, 0, OPT_ACT}, {"gate", required_argument, 0, OPT_GATE},
    {"renormalize", no_argument, 0, OPT_RENORM}, {"noisy", no_argument, 0, OPT_NOISY},
    {"capacity-factor", required_argument, 0, OPT_CAP},
    {"priority", required_argument, 0, OPT_PRIO}, {"no-bias", no_argument, 0, OPT_NOBIAS},
    {"preset", required_argument, 0, OPT_PRESET}, {"routing", required_argument, 0, OPT_ROUTING},
    {"seed", required_argument, 0, OPT_SEED},   {"backend", required_argument, 0, OPT_BACKEND},
    {"device", required_argument, 0, OPT_DEVICE}, {"mode", required_argument, 0, OPT_MODE},
    {"warmup", required_argument, 0, 'w'},     {"iters", required_argument, 0, 'n'},
    {"min-tokens", required_argument, 0, 'b'}, {"max-tokens", required_argument, 0, 'e'},
    {"step-factor", required_argument, 0, 'f'}, {"threads", required_argument, 0, OPT_THREADS},
    {"check", no_argument, 0, 'c'},            {"json", required_argument, 0, OPT_JSON},
    {"trace", required_argument, 0, OPT_TRACE}, {"help", no_argument, 0, 'h'},
    {"local-ranks", required_argument, 0, OPT_LOCAL_RANKS},
    {"replay", required_argument, 0, OPT_REPLAY}, {"link-bw", required_argument, 0, OPT_LINK_BW},
    {"model-table", no_argument, 0, OPT_MODEL_TABLE},
    {"chunks", required_argument, 0, OPT_CHUNKS},
    {"placement", required_argument, 0, OPT_PLACEMENT},
    {"redundant", required_argument, 0, OPT_REDUNDANT},
    {0, 0, 0, 0}};
static const char *short_opts = "t:d:F:E:k:w:n:b:e:f:ch";

/* integer in [lo, hi] or a message and -1 */
static int parse_i64(const char *name, const char *s, int64_t lo, int64_t hi, int64_t *out) {
    char *end = NULL;
    long long v = strtoll(s, &end, 10);
    if (end == s || *end || v < lo || v > hi) {
        fprintf(stderr, "moe_bench: %s needs an integer in [%lld, %lld], got '%s'\n", name,
                (long long)lo, (long long)hi, s);
        return -1;
    }
    *out = v;
    return 0;
}

static int parse_choice(const char *name, const char *s, const char *const *names, int n,
                        int *out) {
    for (int i = 0; i < n; ++i)
        if (strcmp(s, names[i]) == 0) {
            *out = i;
            return 0;
        }
    fprintf(stderr, "moe_bench: %s '%s' is not one of:", name, s);
    for (int i = 0; i < n; ++i) fprintf(stderr, " %s", names[i]);
    fputc('\n', stderr);
    return -1;
}

/* defaults of the tool (not the library's: a small layer that runs in seconds) */
static void set_defaults(bench_opts_t *o) {
    memset(o, 0, sizeof *o);
    o->cfg = moe_layer_config_default();
    o->cfg.d_model = 256, o->cfg.d_ff = 512, o->cfg.num_experts = 8, o->cfg.top_k = 2;
    o->cfg.activation = MOE_ACTIVATION_GELU;
    o->cfg.renormalize = 0;
    o->warmup = 2, o->iters = 5, o->mode = BENCH_MODE_FWD_BWD;
    o->min_tokens = o->max_tokens = 1024, o->step_factor = 2.0;
    o->seed = 1;
    bench_routing_parse("learned", &o->routing);
}

/* first pass: the preset, so that every other option overrides it in any order */
static int parse_preset(int argc, char **argv, bench_opts_t *o) {
    int c;
    opterr = 0;
    while ((c = getopt_long(argc, argv, short_opts, long_opts, NULL)) != -1) {
        if (c != OPT_PRESET) continue;
        /* the library's presets (docs/presets.md); "deepseek" is the older name of deepseek-v3 */
        const char *name = strcmp(optarg, "deepseek") == 0 ? "deepseek-v3" : optarg;
        if (moe_layer_config_preset(name, &o->cfg) != MOE_STATUS_SUCCESS) {
            fprintf(stderr, "moe_bench: --preset: %s\n", moe_last_error());
            return -1;
        }
        o->preset = optarg;
    }
    optind = 0; /* glibc: full re-initialisation */
    opterr = 1;
    return 0;
}

/* the layer's options: 0 taken, -1 bad value, 1 not a layer option */
static int parse_layer_option(int c, bench_opts_t *o) {
    const char *const dtype_names[3] = {moe_dtype_name(MOE_DTYPE_F32),
                                        moe_dtype_name(MOE_DTYPE_BF16),
                                        moe_dtype_name(MOE_DTYPE_F16)};
    int64_t v = 0;
    int ch = 0;
    switch (c) {
    case 't':
        if (parse_i64("--tokens", optarg, 1, (int64_t)1 << 30, &v)) return -1;
        o->min_tokens = o->max_tokens = v;
        o->tokens_given = 1;
        break;
    case 'd':
        if (parse_i64("--d-model", optarg, 1, 1 << 20, &o->cfg.d_model)) return -1;
        o->dims_given[0] = 1;
        break;
    case 'F':
        if (parse_i64("--d-ff", optarg, 1, 1 << 22, &o->cfg.d_ff)) return -1;
        o->dims_given[1] = 1;
        break;
    case 'E':
        if (parse_i64("--experts", optarg, 1, 65536, &o->cfg.num_experts)) return -1;
        break;
    case 'k':
        if (parse_i64("--top-k", optarg, 1, 65536, &o->cfg.top_k)) return -1;
        break;
    case OPT_DTYPE:
        if (parse_choice("--dtype", optarg, dtype_names, 3, &ch)) return -1;
        o->cfg.dtype = (moe_dtype_t)ch;
        break;
    case OPT_ACT:
        if (parse_choice("--activation", optarg, tool_activation_names, 4, &ch)) return -1;
        o->cfg.activation = (moe_activation_t)ch;
        break;
    case OPT_GATE:
        if (parse_choice("--gate", optarg, tool_gate_names, 2, &ch)) return -1;
        o->cfg.gate = (moe_gate_t)ch;
        break;
    case OPT_RENORM: o->cfg.renormalize = 1; break;
    case OPT_NOISY: o->cfg.noisy_gating = 1; break;
    case OPT_CAP: {
        char *end = NULL;
        o->cfg.capacity_factor = strtod(optarg, &end);
        if (end == optarg || *end || !isfinite(o->cfg.capacity_factor) ||
            o->cfg.capacity_factor < 0) {
            fprintf(stderr, "moe_bench: --capacity-factor needs a number >= 0, got '%s'\n",
                    optarg);
            return -1;
        }
        o->cap_given = 1;
        break;
    }
    case OPT_PRIO:
        if (parse_choice("--priority", optarg, tool_priority_names, 2, &ch)) return -1;
        o->cfg.priority = (moe_priority_t)ch;
        break;
    case OPT_NOBIAS: o->cfg.expert_bias = 0; break;
    case OPT_CHUNKS:
        if (parse_i64("--chunks", optarg, 1, MOE_MAX_CHUNKS, &o->cfg.num_chunks)) return -1;
        break;
    default: return 1;
    }
    return 0;
}

/* the run's options: 0 taken, -1 bad value, 1 help printed, 2 unknown */
static int parse_run_option(int c, bench_opts_t *o, int *b_given, int *e_given) {
    int64_t v = 0;
    int ch = 0;
    switch (c) {
    case OPT_PRESET: break; /* first pass */
    case OPT_ROUTING:
        if (bench_routing_parse(optarg, &o->routing)) return -1;
        break;
    case OPT_SEED: {
        char *end = NULL;
        o->seed = strtoull(optarg, &end, 0);
        if (end == optarg || *end) {
            fprintf(stderr, "moe_bench: --seed needs an unsigned integer, got '%s'\n", optarg);
            return -1;
        }
        break;
    }
    case OPT_BACKEND: {
        static const char *names[] = {"cpu", "cuda"};
        if (parse_choice("--backend", optarg, names, 2, &ch)) return -1;
        o->backend = (moe_backend_t)ch;
        o->backend_given = 1;
        break;
    }
    case OPT_DEVICE:
        if (parse_i64("--device", optarg, 0, 1024, &v)) return -1;
        o->device = (int)v;
        break;
    case OPT_MODE: {
        static const char *names[] = {"fwd", "fwd-bwd"};
        if (parse_choice("--mode", optarg, names, 2, &ch)) return -1;
        o->mode = (bench_mode_t)ch;
        break;
    }
    case 'w':
        if (parse_i64("--warmup", optarg, 0, 1000000, &v)) return -1;
        o->warmup = (int)v;
        break;
    case 'n':
        if (parse_i64("--iters", optarg, 1, 1000000, &v)) return -1;
        o->iters = (int)v;
        break;
    case 'b':
        if (parse_i64("--min-tokens", optarg, 1, (int64_t)1 << 30, &o->min_tokens)) return -1;
        *b_given = 1, o->tokens_given = 1;
        break;
    case 'e':
        if (parse_i64("--max-tokens", optarg, 1, (int64_t)1 << 30, &o->max_tokens)) return -1;
        *e_given = 1;
        break;
    case 'f': {
        char *end = NULL;
        o->step_factor = strtod(optarg, &end);
        if (end == optarg || *end || !(o->step_factor > 1.0 && o->step_factor < 1e6)) {
            fprintf(stderr, "moe_bench: --step-factor needs a number > 1, got '%s'\n", optarg);
            return -1;
        }
        break;
    }
    case OPT_THREADS:
        if (parse_i64("--threads", optarg, 1, 4096, &v)) return -1;
        o->threads = (int)v;
        break;
    case 'c': o->check = 1; break;
    case OPT_JSON: o->json_path = optarg; break;
    case OPT_TRACE: o->trace_path = optarg; break;
    case OPT_LOCAL_RANKS:
        if (parse_i64("--local-ranks", optarg, 1, 1024, &v)) return -1;
        o->local_ranks = (int)v;
        break;
    case OPT_REPLAY: o->replay_path = optarg; break;
    case OPT_PLACEMENT: o->placement = optarg; break;
    case OPT_REDUNDANT:
        if (parse_i64("--redundant", optarg, 0, 1 << 20, &v)) return -1;
        o->redundant = v;
        break;
    case OPT_LINK_BW: {
        char *end = NULL;
        o->link_bw = strtod(optarg, &end);
        if (end == optarg || *end || !(o->link_bw > 0 && o->link_bw < 1e6)) {
            fprintf(stderr, "moe_bench: --link-bw needs GB/s > 0, got '%s'\n", optarg);
            return -1;
        }
        break;
    }
    case OPT_MODEL_TABLE: o->model_table = 1; break;
    case 'h': usage(stdout); return 1;
    default: return 2;
    }
    return 0;
}

/* 0 ok, 1 help printed, -1 usage error */
int bench_parse_args(int argc, char **argv, bench_opts_t *o) {
    set_defaults(o);
    if (parse_preset(argc, argv, o)) return -1;
    int c, b_given = 0, e_given = 0;
    while ((c = getopt_long(argc, argv, short_opts, long_opts, NULL)) != -1) {
        int r = parse_layer_option(c, o);
        if (r == 1) r = parse_run_option(c, o, &b_given, &e_given);
        if (r == 1) return 1;
        if (r == 2) fprintf(stderr, "moe_bench: try --help\n");
        if (r != 0) return -1;
    }
    if (optind < argc) {
        fprintf(stderr, "moe_bench: unexpected argument '%s' (try --help)\n", argv[optind]);
        return -1;
    }
    if (b_given && !e_given && o->max_tokens < o->min_tokens) o->max_tokens = o->min_tokens;
    if (e_given && !b_given && o->min_tokens > o->max_tokens) o->min_tokens = o->max_tokens;
    if (o->min_tokens > o->max_tokens) {
        fprintf(stderr, "moe_bench: --min-tokens %lld > --max-tokens %lld\n",
                (long long)o->min_tokens, (long long)o->max_tokens);
        return -1;
    }
    if (o->cfg.top_k > o->cfg.num_experts && !o->replay_path) {
        fprintf(stderr, "moe_bench: --top-k %lld > --experts %lld\n", (long long)o->cfg.top_k,
                (long long)o->cfg.num_experts);
        return -1;
    }
    o->cfg.seed = moe_layer_config_default().seed; /* the layer's init: independent of --seed */
    return 0;
}
