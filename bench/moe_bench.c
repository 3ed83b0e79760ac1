/* moe_bench.c - throughput of one MoE layer, forward and forward+backward, over a sweep of token
 * counts, printed as an nccl-tests style table (see docs/bench.md).
 *
 * It links against the public API only (include/moe/moe.h): times are taken around
 * moe_layer_forward / moe_layer_backward from the outside, with the stream synchronised on CUDA.
 * Beside each row it measures, in the same run, two ceilings: a dense sgemm of the same FLOPs
 * (CPU: the OpenBLAS the library uses) and a memcpy of the activation bytes. */
#define _GNU_SOURCE /* RTLD_DEFAULT */

#include <cblas.h>
#include <dlfcn.h>
#include <getopt.h>
#include <math.h>
#include <omp.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#ifdef MOE_BENCH_CUDA
#include <cuda_runtime_api.h>
#endif
#ifdef MOE_BENCH_MPI
#include <mpi.h>
#endif

#include "bench.h"

static const char *act_names[] = {"relu", "gelu", "silu", "swiglu"};
static const char *dtype_names[] = {"f32", "bf16", "f16"};
static const char *gate_names[] = {"softmax-of-topk", "topk-of-softmax"};
static const char *priority_names[] = {"position", "score"};

static double g_t0; /* start of the run: trace timestamps are relative to it */

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

#define MOE_TRY(call)                                                                     \
    do {                                                                                  \
        moe_status_t st_ = (call);                                                        \
        if (st_ != MOE_STATUS_SUCCESS) {                                                  \
            fprintf(stderr, "moe_bench: %s failed: %s\n  %s\n", #call,                    \
                    moe_status_string(st_), moe_last_error());                            \
            rc = st_ == MOE_STATUS_NOT_SUPPORTED ? BENCH_EXIT_NOT_SUPPORTED : BENCH_EXIT_FAIL; \
            goto done;                                                                    \
        }                                                                                 \
    } while (0)

/* ============================================================================================
 * memory on the benchmarked backend (host for CPU, device for CUDA) and dtype conversion
 * ========================================================================================== */

static size_t dtype_size(moe_dtype_t t) { return t == MOE_DTYPE_F32 ? 4 : 2; }

static uint16_t f32_to_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40); /* quiet NaN */
    u += 0x7fffu + ((u >> 16) & 1u); /* round to nearest even */
    return (uint16_t)(u >> 16);
}

static float bf16_to_f32(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static uint16_t f32_to_f16(float f) {
    uint32_t x;
    memcpy(&x, &f, 4);
    uint32_t sign = (x >> 16) & 0x8000u, mant = x & 0x7fffffu;
    int32_t bexp = (int32_t)((x >> 23) & 0xffu);
    if (bexp == 0xff) return (uint16_t)(sign | 0x7c00u | (mant ? 0x200u : 0u));
    int32_t exp = bexp - 127 + 15;
    if (exp >= 31) return (uint16_t)(sign | 0x7c00u);
    if (exp <= 0) { /* subnormal half or zero */
        if (exp < -10) return (uint16_t)sign;
        mant |= 0x800000u;
        uint32_t shift = (uint32_t)(14 - exp), h = mant >> shift;
        uint32_t rem = mant & ((1u << shift) - 1u), half = 1u << (shift - 1u);
        if (rem > half || (rem == half && (h & 1u))) h++;
        return (uint16_t)(sign | h);
    }
    uint32_t h = ((uint32_t)exp << 10) | (mant >> 13), rem = mant & 0x1fffu;
    if (rem > 0x1000u || (rem == 0x1000u && (h & 1u))) h++; /* a carry rounds up to inf */
    return (uint16_t)(sign | h);
}

static float f16_to_f32(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16, exp = (h >> 10) & 0x1fu, mant = h & 0x3ffu;
    float f;
    if (exp == 0) {
        f = ldexpf((float)mant, -24);
        return sign ? -f : f;
    }
    uint32_t x = exp == 31 ? (sign | 0x7f800000u | (mant << 13))
                           : (sign | ((exp - 15 + 127) << 23) | (mant << 13));
    memcpy(&f, &x, 4);
    return f;
}

/* f32 host values -> storage of dtype (host) */
static void to_dtype(moe_dtype_t t, const float *src, void *dst, int64_t n) {
    if (t == MOE_DTYPE_F32) {
        memcpy(dst, src, (size_t)n * 4);
        return;
    }
    uint16_t *d = (uint16_t *)dst;
    for (int64_t i = 0; i < n; ++i) d[i] = t == MOE_DTYPE_BF16 ? f32_to_bf16(src[i]) : f32_to_f16(src[i]);
}

static void from_dtype(moe_dtype_t t, const void *src, float *dst, int64_t n) {
    if (t == MOE_DTYPE_F32) {
        memcpy(dst, src, (size_t)n * 4);
        return;
    }
    const uint16_t *s = (const uint16_t *)src;
    for (int64_t i = 0; i < n; ++i) dst[i] = t == MOE_DTYPE_BF16 ? bf16_to_f32(s[i]) : f16_to_f32(s[i]);
}

typedef struct mem {
    int gpu; /* 1: device memory through the CUDA runtime */
} mem_t;

static void *mem_alloc(const mem_t *m, size_t bytes) {
#ifdef MOE_BENCH_CUDA
    if (m->gpu) {
        void *p = NULL;
        return cudaMalloc(&p, bytes ? bytes : 1) == cudaSuccess ? p : NULL;
    }
#endif
    (void)m;
    return malloc(bytes ? bytes : 1);
}

static void mem_free(const mem_t *m, void *p) {
    if (!p) return;
#ifdef MOE_BENCH_CUDA
    if (m->gpu) {
        cudaFree(p);
        return;
    }
#endif
    (void)m;
    free(p);
}

/* kind: 0 host->backend, 1 backend->host, 2 backend->backend; 0 on success */
static int mem_copy(const mem_t *m, void *dst, const void *src, size_t bytes, int kind) {
#ifdef MOE_BENCH_CUDA
    if (m->gpu) {
        enum cudaMemcpyKind k = kind == 0   ? cudaMemcpyHostToDevice
                                : kind == 1 ? cudaMemcpyDeviceToHost
                                            : cudaMemcpyDeviceToDevice;
        return cudaMemcpy(dst, src, bytes, k) == cudaSuccess ? 0 : -1;
    }
#endif
    (void)m, (void)kind;
    memcpy(dst, src, bytes);
    return 0;
}

static int mem_sync(const mem_t *m) {
#ifdef MOE_BENCH_CUDA
    if (m->gpu) return cudaDeviceSynchronize() == cudaSuccess ? 0 : -1;
#endif
    (void)m;
    return 0;
}

/* a backend array of n elements of dtype -> f32 host array (malloc'd), NULL on failure */
static float *fetch_f32(const mem_t *m, moe_dtype_t t, const void *src, int64_t n) {
    size_t bytes = (size_t)n * dtype_size(t);
    void *raw = malloc(bytes ? bytes : 1);
    float *out = malloc((size_t)(n ? n : 1) * sizeof(float));
    if (!raw || !out || mem_copy(m, raw, src, bytes, 1) != 0) {
        free(raw), free(out);
        return NULL;
    }
    from_dtype(t, raw, out, n);
    free(raw);
    return out;
}

/* ============================================================================================
 * threads: OpenMP for the CPU backend's loops, OpenBLAS for its GEMMs
 * ========================================================================================== */

typedef void (*blas_set_threads_fn)(int);
typedef int (*blas_get_threads_fn)(void);

static void set_threads(int n) {
    omp_set_num_threads(n);
    /* looked up at run time: the symbol exists in OpenBLAS only, not in other BLAS builds */
    blas_set_threads_fn set = (blas_set_threads_fn)(uintptr_t)dlsym(RTLD_DEFAULT,
                                                                     "openblas_set_num_threads");
    if (set) set(n);
}

static int blas_threads(void) {
    blas_get_threads_fn get = (blas_get_threads_fn)(uintptr_t)dlsym(RTLD_DEFAULT,
                                                                     "openblas_get_num_threads");
    return get ? get() : -1;
}

/* ============================================================================================
 * command line
 * ========================================================================================== */

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
"      --preset NAME        mixtral (D 4096, F 14336, E 8, K 2, swiglu) or deepseek (D 7168,\n"
"                           F 2048, E 256, K 8, swiglu); other options given override it\n"
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
"  -c, --check              compare outputs, dx and every gradient with a CPU layer holding\n"
"                           the same parameters (CPU vs CPU: bitwise); with several ranks\n"
"                           a single-rank CPU layer over all ranks' tokens (dropless, no\n"
"                           noise; 1e-5 of max|ref|); exit 1 on a mismatch\n"
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
    OPT_TRACE, OPT_LOCAL_RANKS, OPT_REPLAY, OPT_LINK_BW, OPT_MODEL_TABLE, OPT_CHUNKS
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

/* 0 ok, 1 help printed, -1 usage error */
static int parse_args(int argc, char **argv, bench_opts_t *o) {
    memset(o, 0, sizeof *o);
    o->cfg = moe_layer_config_default();
    o->cfg.d_model = 256, o->cfg.d_ff = 512, o->cfg.num_experts = 8, o->cfg.top_k = 2;
    o->cfg.activation = MOE_ACTIVATION_GELU;
    o->cfg.renormalize = 0;
    o->warmup = 2, o->iters = 5, o->mode = BENCH_MODE_FWD_BWD;
    o->min_tokens = o->max_tokens = 1024, o->step_factor = 2.0;
    o->seed = 1;
    bench_routing_parse("learned", &o->routing);

    /* first pass: the preset, so that every other option overrides it in any order */
    int c;
    opterr = 0;
    while ((c = getopt_long(argc, argv, short_opts, long_opts, NULL)) != -1) {
        if (c != OPT_PRESET) continue;
        if (strcmp(optarg, "mixtral") == 0) {
            o->cfg.d_model = 4096, o->cfg.d_ff = 14336, o->cfg.num_experts = 8, o->cfg.top_k = 2;
        } else if (strcmp(optarg, "deepseek") == 0) {
            o->cfg.d_model = 7168, o->cfg.d_ff = 2048, o->cfg.num_experts = 256, o->cfg.top_k = 8;
        } else {
            fprintf(stderr, "moe_bench: --preset '%s' is not one of: mixtral deepseek\n", optarg);
            return -1;
        }
        o->cfg.activation = MOE_ACTIVATION_SWIGLU;
        o->preset = optarg;
    }
    optind = 0; /* glibc: full re-initialisation */
    opterr = 1;
    int64_t v = 0, b_given = 0, e_given = 0;
    while ((c = getopt_long(argc, argv, short_opts, long_opts, NULL)) != -1) {
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
            if (parse_choice("--activation", optarg, act_names, 4, &ch)) return -1;
            o->cfg.activation = (moe_activation_t)ch;
            break;
        case OPT_GATE:
            if (parse_choice("--gate", optarg, gate_names, 2, &ch)) return -1;
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
            if (parse_choice("--priority", optarg, priority_names, 2, &ch)) return -1;
            o->cfg.priority = (moe_priority_t)ch;
            break;
        case OPT_NOBIAS: o->cfg.expert_bias = 0; break;
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
            b_given = 1, o->tokens_given = 1;
            break;
        case 'e':
            if (parse_i64("--max-tokens", optarg, 1, (int64_t)1 << 30, &o->max_tokens)) return -1;
            e_given = 1;
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
        case OPT_CHUNKS:
            if (parse_i64("--chunks", optarg, 1, MOE_MAX_CHUNKS, &o->cfg.num_chunks)) return -1;
            break;
        case 'h': usage(stdout); return 1;
        default: fprintf(stderr, "moe_bench: try --help\n"); return -1;
        }
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

/* ============================================================================================
 * timing helpers
 * ========================================================================================== */

static int cmp_double(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

static bench_times_t summarize(const double *v, int n) {
    bench_times_t t = {0, 0, 0, 0};
    if (n <= 0) return t;
    double *s = malloc((size_t)n * sizeof(double));
    if (!s) return t;
    memcpy(s, v, (size_t)n * sizeof(double));
    qsort(s, (size_t)n, sizeof(double), cmp_double);
    double sum = 0.0;
    for (int i = 0; i < n; ++i) sum += s[i];
    t.mean = sum / n;
    t.median = n % 2 ? s[n / 2] : 0.5 * (s[n / 2 - 1] + s[n / 2]);
    t.min = s[0], t.max = s[n - 1];
    free(s);
    return t;
}

typedef struct trace_buf {
    bench_event_t *ev;
    int64_t n, cap;
    int on;
    int pid; /* this rank */
} trace_buf_t;

static void trace_add(trace_buf_t *tb, const char *name, int tid, int64_t tokens, int iter,
                      double t_begin, double t_end) {
    (void)name; /* the writer names events by their track */
    if (!tb->on) return;
    if (tb->n == tb->cap) {
        int64_t cap = tb->cap ? 2 * tb->cap : 256;
        bench_event_t *ev = realloc(tb->ev, (size_t)cap * sizeof *ev);
        if (!ev) return; /* a trace without this event beats no benchmark */
        tb->ev = ev, tb->cap = cap;
    }
    bench_event_t *e = &tb->ev[tb->n++];
    e->pid = tb->pid, e->tid = tid, e->tokens = tokens, e->iter = iter;
    e->ts_us = 1e6 * (t_begin - g_t0), e->dur_us = 1e6 * (t_end - t_begin);
}

/* ============================================================================================
 * roofline: a dense sgemm of the same FLOPs, and a memcpy of the activation bytes
 * ========================================================================================== */

/* median time of the expert GEMMs done densely: M rows through one (D, F2) and one (F, D)
 * matrix; forward+backward adds the four backward GEMMs. -1 if memory is short. */
static double dense_gemm_time(int64_t M, int64_t D, int64_t F, int64_t F2, int bwd, int reps,
                              int64_t tokens, trace_buf_t *tb) {
    size_t wide = (size_t)(D > F2 ? D : F2);
    float *X = malloc((size_t)M * D * 4), *H = malloc((size_t)M * wide * 4);
    float *Y = malloc((size_t)M * D * 4), *W1 = malloc((size_t)D * F2 * 4);
    float *W2 = malloc((size_t)F * D * 4), *G1 = malloc((size_t)D * F2 * 4);
    float *G2 = malloc((size_t)F * D * 4), *dX = malloc((size_t)M * D * 4);
    double best = -1.0;
    double *t = malloc((size_t)(reps + 1) * sizeof(double));
    if (!X || !H || !Y || !W1 || !W2 || !G1 || !G2 || !dX || !t) goto out;
    bench_fill_uniform(X, M * D, 11, 1.0f), bench_fill_uniform(Y, M * D, 12, 1.0f);
    bench_fill_uniform(W1, D * F2, 13, 0.05f), bench_fill_uniform(W2, F * D, 14, 0.05f);
    memset(H, 0, (size_t)M * wide * 4), memset(G1, 0, (size_t)D * F2 * 4);
    memset(G2, 0, (size_t)F * D * 4), memset(dX, 0, (size_t)M * D * 4);
    const int mi = (int)M, di = (int)D, fi = (int)F, f2i = (int)F2;
    for (int r = 0; r <= reps; ++r) { /* r = 0 is the warm-up */
        double t0 = now_s();
        /* forward: H = X W1 (M, F2); Y = A W2 (M, D), with A the first F columns' worth of H */
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, mi, f2i, di, 1.0f, X, di, W1, f2i,
                    0.0f, H, f2i);
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, mi, di, fi, 1.0f, H, fi, W2, di,
                    0.0f, Y, di);
        if (bwd) {
            /* dA = dY W2^T (M, F); dW2 += A^T dY (F, D); dW1 += X^T dH (D, F2); dX = dH W1^T */
            cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, mi, fi, di, 1.0f, Y, di, W2, di,
                        0.0f, H, fi);
            cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, fi, di, mi, 1.0f, H, fi, Y, di,
                        1.0f, G2, di);
            cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, di, f2i, mi, 1.0f, X, di, H, f2i,
                        1.0f, G1, f2i);
            cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, mi, di, f2i, 1.0f, H, f2i, W1,
                        f2i, 0.0f, dX, di);
        }
        double t1 = now_s();
        t[r] = t1 - t0;
        if (r > 0) trace_add(tb, "dense sgemm", 3, tokens, r - 1, t0, t1);
    }
    best = summarize(t + 1, reps).median;
out:
    free(X), free(H), free(Y), free(W1), free(W2), free(G1), free(G2), free(dX), free(t);
    return best;
}

static double memcpy_time(const mem_t *m, size_t bytes, int reps, int64_t tokens,
                          trace_buf_t *tb) {
    void *a = mem_alloc(m, bytes), *b = mem_alloc(m, bytes);
    double *t = malloc((size_t)(reps + 1) * sizeof(double));
    double res = -1.0;
    if (!a || !b || !t) goto out;
    if (!m->gpu) memset(a, 1, bytes), memset(b, 0, bytes); /* fault the pages in */
    for (int r = 0; r <= reps; ++r) {
        double t0 = now_s();
        if (mem_copy(m, b, a, bytes, 2) != 0 || mem_sync(m) != 0) goto out;
        double t1 = now_s();
        t[r] = t1 - t0;
        if (r > 0) trace_add(tb, "memcpy", 4, tokens, r - 1, t0, t1);
    }
    res = summarize(t + 1, reps).median;
out:
    mem_free(m, a), mem_free(m, b), free(t);
    return res;
}

/* ============================================================================================
 * --check: the benchmarked layer against a CPU layer with the same parameters
 * ========================================================================================== */

typedef struct check_acc {
    int64_t wrong, checked;
    double worst; /* largest error relative to the tensor's largest reference magnitude */
} check_acc_t;

/* bitwise when tol == 0; else |a - b| <= tol * max|ref| (a per-tensor scale: gradients of
 * different tensors differ by orders of magnitude, and elements near 0 carry no meaning) */
static void compare(check_acc_t *acc, const char *what, const float *got, const float *ref,
                    int64_t n, double tol) {
    double scale = 0.0;
    for (int64_t i = 0; i < n; ++i) scale = fmax(scale, fabs((double)ref[i]));
    int64_t wrong = 0;
    for (int64_t i = 0; i < n; ++i) {
        int bad;
        if (tol == 0.0)
            bad = memcmp(&got[i], &ref[i], sizeof(float)) != 0;
        else
            bad = !(fabs((double)got[i] - (double)ref[i]) <= tol * scale);
        if (bad) {
            if (wrong == 0 && acc->wrong < 10)
                fprintf(stderr, "# check: %s[%lld] = %.9g, reference %.9g\n", what, (long long)i,
                        got[i], ref[i]);
            ++wrong;
        }
        if (scale > 0) acc->worst = fmax(acc->worst, fabs((double)got[i] - ref[i]) / scale);
    }
    acc->wrong += wrong, acc->checked += n;
}

/* tolerance by storage dtype, as a fraction of the tensor's largest magnitude: f32 GEMMs in a
 * different blocking differ by a few ulps times sqrt(depth) (1e-4 covers depth 14336);
 * f16 rounds inputs, weights and outputs to 11 bits (2^-11 ~ 5e-4, times a few roundings);
 * bf16 to 8 bits (2^-8 ~ 4e-3, times a few roundings) */
static double check_tolerance(moe_backend_t backend, moe_dtype_t t) {
    if (backend == MOE_BACKEND_CPU) return 0.0;
    return t == MOE_DTYPE_F32 ? 1e-4 : t == MOE_DTYPE_F16 ? 5e-3 : 3e-2;
}

/* Copies every parameter of A into R (a CPU f32 layer), runs one training forward + backward
 * on both from zeroed gradients, and compares y, dx, every gradient and the routing. */
static int run_check(const mem_t *m, moe_layer_t *A, moe_layer_t *R, const moe_layer_config_t *cfg,
                     moe_backend_t backend, int64_t T, const float *x, const float *dy,
                     void *x_dev, void *dy_dev, void *y_dev, void *dx_dev, check_acc_t *acc) {
    /* routing arrays are routing-width wide: top_k, or E for expert choice */
    const int64_t D = cfg->d_model, K = moe_layer_routing_width(A);
    const moe_dtype_t dt = cfg->dtype;
    const double tol = check_tolerance(backend, dt);
    int rc = BENCH_EXIT_OK;
    float *yr = malloc((size_t)(T * D) * 4), *dxr = malloc((size_t)(T * D) * 4);
    float *ya = NULL, *dxa = NULL, *ga = NULL;
    int32_t *ia = malloc((size_t)(T * K) * 4), *ir = malloc((size_t)(T * K) * 4);
    if (!yr || !dxr || !ia || !ir) {
        fprintf(stderr, "moe_bench: out of host memory for --check\n");
        rc = BENCH_EXIT_FAIL;
        goto done;
    }
    for (int p = 0; p < MOE_PARAM_COUNT; ++p) {
        void *va = NULL, *vr = NULL;
        int64_t na = 0, nr = 0;
        MOE_TRY(moe_layer_param(A, (moe_param_t)p, &va, NULL, &na));
        MOE_TRY(moe_layer_param(R, (moe_param_t)p, &vr, NULL, &nr));
        if (na != nr) {
            fprintf(stderr, "moe_bench: --check: parameter %d has %lld vs %lld elements\n", p,
                    (long long)na, (long long)nr);
            rc = BENCH_EXIT_FAIL;
            goto done;
        }
        if (!na) continue;
        float *v = fetch_f32(m, dt, va, na);
        if (!v) {
            fprintf(stderr, "moe_bench: --check: cannot read parameter %d\n", p);
            rc = BENCH_EXIT_FAIL;
            goto done;
        }
        memcpy(vr, v, (size_t)na * 4);
        free(v);
    }
    MOE_TRY(moe_layer_zero_grad(A, NULL));
    MOE_TRY(moe_layer_zero_grad(R, NULL));
    MOE_TRY(moe_layer_forward(A, x_dev, y_dev, T, 1, NULL));
    MOE_TRY(moe_layer_backward(A, dy_dev, dx_dev, NULL));
    /* the reference sees exactly what A saw: x and dy rounded to the storage dtype */
    float *xr = malloc((size_t)(T * D) * 4), *dyr = malloc((size_t)(T * D) * 4);
    void *raw = malloc((size_t)(T * D) * dtype_size(dt));
    if (!xr || !dyr || !raw) {
        free(xr), free(dyr), free(raw);
        fprintf(stderr, "moe_bench: out of host memory for --check\n");
        rc = BENCH_EXIT_FAIL;
        goto done;
    }
    to_dtype(dt, x, raw, T * D), from_dtype(dt, raw, xr, T * D);
    to_dtype(dt, dy, raw, T * D), from_dtype(dt, raw, dyr, T * D);
    free(raw);
    moe_status_t st = moe_layer_forward(R, xr, yr, T, 1, NULL);
    if (st == MOE_STATUS_SUCCESS) st = moe_layer_backward(R, dyr, dxr, NULL);
    free(xr), free(dyr);
    MOE_TRY(st);

    ya = fetch_f32(m, dt, y_dev, T * D), dxa = fetch_f32(m, dt, dx_dev, T * D);
    if (!ya || !dxa) {
        fprintf(stderr, "moe_bench: --check: cannot read y / dx back\n");
        rc = BENCH_EXIT_FAIL;
        goto done;
    }
    compare(acc, "y", ya, yr, T * D, tol);
    compare(acc, "dx", dxa, dxr, T * D, tol);
    static const char *pname[] = {"dWg", "dWn", "dW1", "db1", "dW2", "db2"};
    for (int p = 0; p < MOE_PARAM_COUNT; ++p) {
        void *gA = NULL, *gR = NULL;
        int64_t n = 0;
        MOE_TRY(moe_layer_param(A, (moe_param_t)p, NULL, &gA, &n));
        MOE_TRY(moe_layer_param(R, (moe_param_t)p, NULL, &gR, NULL));
        if (!n) continue;
        ga = fetch_f32(m, dt, gA, n);
        if (!ga) {
            fprintf(stderr, "moe_bench: --check: cannot read gradient %s\n", pname[p]);
            rc = BENCH_EXIT_FAIL;
            goto done;
        }
        compare(acc, pname[p], ga, (const float *)gR, n, tol);
        free(ga), ga = NULL;
    }
    /* routing: the experts chosen must agree exactly (a tie broken differently shows here) */
    MOE_TRY(moe_layer_routing(A, ia, NULL, NULL));
    MOE_TRY(moe_layer_routing(R, ir, NULL, NULL));
    int64_t bad = 0;
    for (int64_t i = 0; i < T * K; ++i) bad += ia[i] != ir[i];
    if (bad) fprintf(stderr, "# check: %lld routing choices differ\n", (long long)bad);
    acc->wrong += bad, acc->checked += T * K;
done:
    free(yr), free(dxr), free(ya), free(dxa), free(ga), free(ia), free(ir);
    return rc;
}

/* ============================================================================================
 * --check with expert parallelism: every rank's y, dx and expert gradients against one
 * single-rank CPU layer over all ranks' tokens (dropless, noise off: the layers then compute
 * the same numbers, docs/expert-parallel.md)
 * ========================================================================================== */

/* what one rank feeds the layer at one size: its tokens, and where they start globally */
typedef struct workload {
    int64_t tokens_max; /* rows of x held (replay: the largest slice over the steps) */
    float *x, *dy;      /* (tokens_max, D) f32 host */
} workload_t;

typedef struct rank_arg {
    const bench_opts_t *o;
    const bench_replay_t *rp;
    bench_world_t w;
    moe_comm_t *comm;
    const char *backend_text;
    int rc;
} rank_arg_t;

static uint64_t rank_seed(uint64_t seed, int q) { return seed + 0x9E3779B97F4Aull * (uint64_t)q; }

/* tokens of rank q at this size (replay: at this step) and the first global token index */
static int64_t rank_tokens(const bench_opts_t *o, const bench_replay_t *rp, int64_t T, int64_t step,
                           int q, int P, int64_t *begin) {
    if (rp) {
        int64_t Ts = rp->tokens[step % rp->num_steps], b = Ts * q / P;
        if (begin) *begin = b;
        return Ts * (q + 1) / P - b;
    }
    if (begin) *begin = 0;
    if (o->routing.kind == BENCH_ROUTING_ZERO_RANK && q == 0) return 0;
    return T;
}

static int64_t rank_tokens_max(const bench_opts_t *o, const bench_replay_t *rp, int64_t T, int q,
                               int P) {
    if (!rp) return rank_tokens(o, rp, T, 0, q, P, NULL);
    int64_t m = 0;
    for (int64_t s = 0; s < rp->num_steps; ++s) {
        int64_t n = rank_tokens(o, rp, T, s, q, P, NULL);
        m = n > m ? n : m;
    }
    return m;
}

/* x and dy of rank q: reproducible from (seed, q), so any rank can rebuild another's */
static int make_workload(const bench_opts_t *o, const bench_replay_t *rp, const float *wg,
                         int64_t T, int q, int P, workload_t *wl) {
    const moe_layer_config_t *c = &o->cfg;
    const int64_t n = rank_tokens_max(o, rp, T, q, P), D = c->d_model;
    wl->tokens_max = n;
    wl->x = malloc((size_t)(n * D + 1) * 4), wl->dy = malloc((size_t)(n * D + 1) * 4);
    if (!wl->x || !wl->dy) return -1;
    bench_routing_t plain;
    bench_routing_parse("learned", &plain);
    if (bench_make_input(rp ? &plain : &o->routing, wg, n, D, c->num_experts, c->top_k, q, P,
                         rank_seed(o->seed, q), wl->x) != 0)
        return -1;
    bench_fill_uniform(wl->dy, n * D, rank_seed(o->seed, q) + 0x5151, 1.0f / (float)D);
    return 0;
}

static void free_workload(workload_t *wl) { free(wl->x), free(wl->dy), wl->x = wl->dy = NULL; }

/* one training forward (with the replayed routing of `step` forced first) and, in fwd-bwd mode,
 * one backward; times of both when t is given */
static moe_status_t step_layer(const rank_arg_t *a, moe_layer_t *layer, const mem_t *m,
                               int64_t T, int64_t step, void *x_dev, void *y_dev, void *dy_dev,
                               void *dx_dev, int bwd, double *t) {
    int64_t b = 0, n = rank_tokens(a->o, a->rp, T, step, a->w.rank, a->w.size, &b);
    moe_status_t st;
    if (a->rp) {
        int64_t s = step % a->rp->num_steps;
        st = moe_layer_force_routing(layer, a->rp->index[s] + b * a->rp->width,
                                     a->rp->gate_w[s] + b * a->rp->width, n);
        if (st != MOE_STATUS_SUCCESS) return st;
    }
    double t0 = now_s();
    st = moe_layer_forward(layer, n ? x_dev : NULL, n ? y_dev : NULL, n, 1, NULL);
    if (st != MOE_STATUS_SUCCESS) return st;
    if (mem_sync(m) != 0) return MOE_STATUS_BACKEND_ERROR;
    double t1 = now_s(), t2 = t1;
    if (bwd) {
        st = moe_layer_backward(layer, n ? dy_dev : NULL, n ? dx_dev : NULL, NULL);
        if (st != MOE_STATUS_SUCCESS) return st;
        if (mem_sync(m) != 0) return MOE_STATUS_BACKEND_ERROR;
        t2 = now_s();
    }
    if (t) t[0] = t0, t[1] = t1, t[2] = t2;
    return MOE_STATUS_SUCCESS;
}

/* gathers n f32 values of a backend array from every rank at rank 0 (rank_n: each rank's n,
 * known at rank 0); *out malloc'd on rank 0 */
static int gather_f32(const rank_arg_t *a, const mem_t *m, const void *src, int64_t n,
                      const int64_t *rank_n, float **out) {
    bench_world_t *w = (bench_world_t *)&a->w;
    float *mine = n ? fetch_f32(m, a->o->cfg.dtype, src, n) : malloc(4);
    size_t *each = NULL;
    int rc = mine ? 0 : -1;
    *out = NULL;
    if (w->rank == 0) {
        int64_t tot = 0;
        each = malloc((size_t)w->size * sizeof *each);
        for (int q = 0; q < w->size; ++q) tot += rank_n[q];
        *out = malloc((size_t)(tot + 1) * 4);
        if (!each || !*out) rc = -1;
        for (int q = 0; each && q < w->size; ++q) each[q] = (size_t)rank_n[q] * 4;
    }
    /* every rank joins the gather even after a local failure (a short block) */
    if (bench_world_gatherv(w, mine, mine ? (size_t)n * 4 : 0, *out, each) != 0) rc = -1;
    free(mine), free(each);
    return rc;
}

/* as MOE_TRY, for the part after the collectives: straight to the end */
#define TRY_OUT(call)                                                                     \
    do {                                                                                  \
        moe_status_t st_ = (call);                                                        \
        if (st_ != MOE_STATUS_SUCCESS) {                                                  \
            fprintf(stderr, "moe_bench: %s failed: %s\n  %s\n", #call,                    \
                    moe_status_string(st_), moe_last_error());                            \
            rc = BENCH_EXIT_FAIL;                                                         \
            goto out;                                                                     \
        }                                                                                 \
    } while (0)

static int run_check_ep(const rank_arg_t *a, const mem_t *m, moe_layer_t *layer, const float *wg,
                        int64_t T, void *x_dev, void *dy_dev, void *y_dev, void *dx_dev,
                        check_acc_t *acc) {
    const bench_opts_t *o = a->o;
    const moe_layer_config_t *c = &o->cfg;
    const int P = a->w.size, me = a->w.rank;
    const int64_t D = c->d_model,
                  K = c->router == MOE_ROUTER_EXPERT_CHOICE ? c->num_experts : c->top_k;
    const double tol =
        a->o->backend == MOE_BACKEND_CPU ? 1e-5 : check_tolerance(o->backend, c->dtype);
    int rc = BENCH_EXIT_OK;
    moe_context_t *rctx = NULL;
    moe_layer_t *R = NULL;
    float *y_all = NULL, *dx_all = NULL, *g_all[MOE_PARAM_COUNT] = {0}, *xr = NULL, *dyr = NULL;
    float *yr = NULL, *dxr = NULL, *gr = NULL;
    int32_t *idx_all = NULL, *ir = NULL;
    int64_t *tok = calloc((size_t)P, sizeof *tok), *nk = calloc((size_t)P, sizeof *nk);
    int64_t *np_ = calloc((size_t)P, sizeof *np_);
    int32_t *ia = NULL;
    int64_t Tg = 0, n = rank_tokens(o, a->rp, T, 0, me, P, NULL);
    if (!tok || !nk || !np_) goto oom;
    for (int q = 0; q < P; ++q) tok[q] = rank_tokens(o, a->rp, T, 0, q, P, NULL), Tg += tok[q];

    /* the layer under test: one training forward + backward from zeroed gradients, router
     * gradients summed over ranks (the reference has all tokens) */
    MOE_TRY(moe_layer_zero_grad(layer, NULL));
    MOE_TRY(step_layer(a, layer, m, T, 0, x_dev, y_dev, dy_dev, dx_dev, 1, NULL));
    MOE_TRY(moe_layer_allreduce_router_grads(layer, NULL));
    for (int q = 0; q < P; ++q) nk[q] = tok[q] * D;
    if (gather_f32(a, m, y_dev, n * D, nk, &y_all) || gather_f32(a, m, dx_dev, n * D, nk, &dx_all))
        goto oom;
    for (int p = 0; p < MOE_PARAM_COUNT; ++p) {
        void *g = NULL;
        int64_t cnt = 0;
        MOE_TRY(moe_layer_param(layer, (moe_param_t)p, NULL, &g, &cnt));
        if (!cnt || p == MOE_PARAM_ROUTER_WEIGHT || p == MOE_PARAM_NOISE_WEIGHT) continue;
        for (int q = 0; q < P; ++q) np_[q] = cnt; /* E_local experts on every rank */
        if (gather_f32(a, m, g, cnt, np_, &g_all[p])) goto oom;
    }
    /* the experts chosen, exactly */
    ia = malloc((size_t)(n * K + 1) * 4);
    if (!ia) goto oom;
    if (n) MOE_TRY(moe_layer_routing(layer, ia, NULL, NULL));
    {
        size_t *each = NULL;
        if (me == 0) {
            idx_all = malloc((size_t)(Tg * K + 1) * 4);
            each = malloc((size_t)P * sizeof *each);
            for (int q = 0; each && q < P; ++q) each[q] = (size_t)(tok[q] * K) * 4;
        }
        int g = bench_world_gatherv((bench_world_t *)&a->w, ia, (size_t)(n * K) * 4, idx_all, each);
        free(each);
        if (g || (me == 0 && !idx_all)) goto oom;
    }
    if (me != 0) goto done;

    /* rank 0: the reference over the concatenated tokens, its experts' parameters copied from
     * the ranks that own them, the router's from rank 0 (replicated) */
    moe_layer_config_t rc_cfg = *c;
    rc_cfg.dtype = MOE_DTYPE_F32;
    MOE_TRY(moe_context_create(&rctx, MOE_BACKEND_CPU, 0, NULL));
    MOE_TRY(moe_layer_create(&R, rctx, &rc_cfg));
    for (int p = 0; p < MOE_PARAM_COUNT; ++p) {
        void *vr = NULL, *va = NULL;
        int64_t nr = 0, na = 0;
        MOE_TRY(moe_layer_param(R, (moe_param_t)p, &vr, NULL, &nr));
        MOE_TRY(moe_layer_param(layer, (moe_param_t)p, &va, NULL, &na));
        if (!nr) continue;
        if (p == MOE_PARAM_ROUTER_WEIGHT || p == MOE_PARAM_NOISE_WEIGHT) {
            float *v = fetch_f32(m, c->dtype, va, na);
            if (!v) goto oom;
            memcpy(vr, v, (size_t)nr * 4);
            free(v);
        }
    }
    /* the expert parameters' values are gathered after `done:` (every rank takes part) */
    xr = malloc((size_t)(Tg * D + 1) * 4), dyr = malloc((size_t)(Tg * D + 1) * 4);
    yr = malloc((size_t)(Tg * D + 1) * 4), dxr = malloc((size_t)(Tg * D + 1) * 4);
    if (!xr || !dyr || !yr || !dxr) goto oom;
    {
        int64_t off = 0;
        for (int q = 0; q < P; ++q) {
            workload_t wq = {0, NULL, NULL};
            if (make_workload(o, a->rp, wg, T, q, P, &wq) != 0) {
                free_workload(&wq);
                goto oom;
            }
            memcpy(xr + off * D, wq.x, (size_t)(tok[q] * D) * 4);
            memcpy(dyr + off * D, wq.dy, (size_t)(tok[q] * D) * 4);
            free_workload(&wq);
            off += tok[q];
        }
        /* what the ranks saw: rounded to the storage dtype */
        void *raw = malloc((size_t)(Tg * D + 1) * dtype_size(c->dtype));
        if (!raw) goto oom;
        to_dtype(c->dtype, xr, raw, Tg * D), from_dtype(c->dtype, raw, xr, Tg * D);
        to_dtype(c->dtype, dyr, raw, Tg * D), from_dtype(c->dtype, raw, dyr, Tg * D);
        free(raw);
    }
    rc = BENCH_EXIT_OK;
done:
    /* the expert parameter values: gathered by every rank (a collective), rank 0 keeps them */
    for (int p = MOE_PARAM_W1; p < MOE_PARAM_COUNT; ++p) {
        void *va = NULL;
        int64_t na = 0;
        if (moe_layer_param(layer, (moe_param_t)p, &va, NULL, &na) != MOE_STATUS_SUCCESS || !na)
            continue;
        for (int q = 0; q < P; ++q) np_[q] = na;
        float *vals = NULL;
        int g = gather_f32(a, m, va, na, np_, &vals);
        if (me == 0 && R && rc == BENCH_EXIT_OK) {
            void *vr = NULL;
            int64_t nr = 0;
            if (g || moe_layer_param(R, (moe_param_t)p, &vr, NULL, &nr) != MOE_STATUS_SUCCESS ||
                nr != na * P)
                rc = BENCH_EXIT_FAIL;
            else
                memcpy(vr, vals, (size_t)nr * 4);
        }
        free(vals);
    }
    if (me == 0 && R && rc == BENCH_EXIT_OK) {
        if (a->rp) {
            const int64_t s = 0;
            TRY_OUT(moe_layer_force_routing(R, a->rp->index[s], a->rp->gate_w[s], Tg));
        }
        moe_status_t st = moe_layer_forward(R, xr, yr, Tg, 1, NULL);
        if (st == MOE_STATUS_SUCCESS) st = moe_layer_backward(R, dyr, dxr, NULL);
        TRY_OUT(st);
        compare(acc, "y", y_all, yr, Tg * D, tol);
        compare(acc, "dx", dx_all, dxr, Tg * D, tol);
        static const char *pname[] = {"dWg", "dWn", "dW1", "db1", "dW2", "db2"};
        for (int p = 0; p < MOE_PARAM_COUNT; ++p) {
            void *gR = NULL, *gA = NULL;
            int64_t nr = 0, na = 0;
            TRY_OUT(moe_layer_param(R, (moe_param_t)p, NULL, &gR, &nr));
            if (!nr) continue;
            if (p == MOE_PARAM_ROUTER_WEIGHT || p == MOE_PARAM_NOISE_WEIGHT) {
                TRY_OUT(moe_layer_param(layer, (moe_param_t)p, NULL, &gA, &na));
                gr = fetch_f32(m, c->dtype, gA, na);
                if (!gr) goto out_oom;
                compare(acc, pname[p], gr, (const float *)gR, nr, tol);
                free(gr), gr = NULL;
            } else {
                compare(acc, pname[p], g_all[p], (const float *)gR, nr, tol);
            }
        }
        ir = malloc((size_t)(Tg * K + 1) * 4);
        if (!ir) goto out_oom;
        TRY_OUT(moe_layer_routing(R, ir, NULL, NULL));
        int64_t bad = 0;
        for (int64_t i = 0; i < Tg * K; ++i) bad += ir[i] != idx_all[i];
        if (bad) fprintf(stderr, "# check: %lld routing choices differ\n", (long long)bad);
        acc->wrong += bad, acc->checked += Tg * K;
    }
    goto out;
oom:
    fprintf(stderr, "moe_bench: rank %d: --check: out of host memory or a gather failed\n", me);
    rc = BENCH_EXIT_FAIL;
    goto done;
out_oom:
    fprintf(stderr, "moe_bench: --check: out of host memory\n");
    rc = BENCH_EXIT_FAIL;
out:
    moe_layer_destroy(R), moe_context_destroy(rctx);
    free(y_all), free(dx_all), free(xr), free(dyr), free(yr), free(dxr), free(gr);
    free(idx_all), free(ir), free(tok), free(nk), free(np_), free(ia);
    for (int p = 0; p < MOE_PARAM_COUNT; ++p) free(g_all[p]);
    return rc;
}

/* ============================================================================================
 * the run: every rank runs run_rank (a thread per local rank, a process per MPI rank, or just
 * main for one rank); rank 0 prints
 * ========================================================================================== */

static void print_header(const bench_opts_t *o, const char *backend_text, const char *world_text,
                         int ranks, int omp_threads, int blas_thr) {
    const moe_layer_config_t *c = &o->cfg;
    int major, minor, patch;
    moe_get_version(&major, &minor, &patch);
    printf("# moe_bench: libmoe %d.%d.%d  backend %s  ranks %d%s%s%s\n", major, minor, patch,
           backend_text, ranks, world_text, o->preset ? "  preset " : "",
           o->preset ? o->preset : "");
    printf("#  layer    D %lld  F %lld  E %lld  K %lld  activation %s  dtype %s  bias %s\n",
           (long long)c->d_model, (long long)c->d_ff, (long long)c->num_experts,
           (long long)c->top_k, act_names[c->activation], dtype_names[c->dtype],
           c->expert_bias ? "yes" : "no");
    char cap[48];
    if (c->capacity_factor > 0)
        snprintf(cap, sizeof cap, "capacity factor %.3g (%s priority)", c->capacity_factor,
                 priority_names[c->priority]);
    else
        snprintf(cap, sizeof cap, "dropless");
    printf("#  gate     %s%s  noisy %s  %s\n", gate_names[c->gate],
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
               "all ranks; %lld experts per rank, %lld chunk%s\n",
               (long long)El, (long long)(ch < El ? ch : El), (ch < El ? ch : El) > 1 ? "s" : "");
        printf("#  a2a      dispatch + return phases (profiled pass); algbw = all-to-alls x "
               "rows sent x D x %zu B / a2a; busbw = algbw (P-1)/P;\n"
               "#           ceil = raw all-to-all of the same bytes (%s); model = "
               "bench/model.c at %s\n",
               dtype_size(c->dtype),
               strstr(world_text, "NCCL") ? "none under NCCL: give --link-bw"
               : strstr(world_text, "MPI") ? "MPI_Alltoall" : "memcpy per rank",
               o->link_bw > 0 ? "--link-bw" : "the ceiling's bandwidth");
    }
    printf("#\n");
    printf("# %10s %10s %10s %10s %12s %8s %10s %6s %9s %7s %7s %9s %7s %7s %9s %9s %8s %7s\n",
           "tokens", "fwd(ms)", "bwd(ms)", "total(ms)", "tokens/s", "TFLOP/s", "gemm(ms)",
           "gemm%", "mcpy(ms)", "imbal", "rimbal", "a2a(ms)", "algbw", "busbw", "ceil(ms)",
           "model(ms)", "dropped", "#wrong");
}

/* per-rank results of one size, gathered: [ fwd[iters] bwd[iters] tot[iters] | tokens sent recv
 * | phases | gemm mcpy a2a ] */
enum { G_STATS = 4, G_CEIL = 3 };

typedef struct run_out {
    bench_row_t *rows;
    int nrows;
    int64_t total_wrong, total_checked;
    double worst;
    int check_failed; /* the run went through and --check found wrong elements */
    trace_buf_t tb;
} run_out_t;

static run_out_t g_out; /* rank 0's results (threads: written by rank 0 only) */

static void mem_threads(const bench_opts_t *o, int ranks) {
    if (o->threads > 0) {
        omp_set_num_threads(o->threads);
    } else if (ranks > 1) {
        /* ranks as threads share the cores: one share each unless --threads says otherwise */
        long ncpu = sysconf(_SC_NPROCESSORS_ONLN);
        int t = (int)(ncpu / ranks);
        omp_set_num_threads(t > 0 ? t : 1);
    }
}

static int copy_cb(void *dst, const void *src, size_t bytes, void *ctx) {
    const mem_t *m = ctx;
    return mem_copy(m, dst, src, bytes, 2) || mem_sync(m);
}
static void *alloc_cb(size_t bytes, void *ctx) {
    void *p = mem_alloc(ctx, bytes);
    if (p && !((mem_t *)ctx)->gpu) memset(p, 1, bytes);
    return p;
}
static void free_cb(void *p, void *ctx) { mem_free(ctx, p); }

/* rank 0: one row of the table from every rank's gathered numbers (layout of gv in run_rank) */
static void finish_row(const bench_opts_t *o, int P, int ng, const double *gall, double *tf,
                       double sent_mean, double act_bytes, bench_row_t *r) {
    const moe_layer_config_t *c = &o->cfg;
    const int64_t D = c->d_model, E = c->num_experts;
    const size_t es = dtype_size(c->dtype);
    const int fwd_bwd = o->mode == BENCH_MODE_FWD_BWD;
    double *tbw = tf + o->iters, *tt = tf + 2 * o->iters;
    /* per iteration the slowest rank: a collective call ends when its last rank does */
    for (int i = 0; i < 3 * o->iters; ++i)
        for (int q = 1; q < P; ++q) tf[i] = fmax(tf[i], gall[(size_t)q * ng + i]);
    r->fwd = summarize(tf, o->iters), r->total = summarize(tt, o->iters);
    if (fwd_bwd) r->bwd = summarize(tbw, o->iters);
    double tok = 0, rmax = 0, rsum = 0;
    r->gemm_s = r->mcpy_s = r->ceil_s = -1.0;
    r->rank_rows = malloc((size_t)P * 3 * sizeof(int64_t));
    r->rank_remote = malloc((size_t)P * sizeof(double));
    if (!r->rank_remote) free(r->rank_rows), r->rank_rows = NULL;
    for (int q = 0; q < P; ++q) {
        const double *g = gall + (size_t)q * ng;
        const double *s3 = g + 3 * o->iters, *pq = s3 + G_STATS;
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

static void print_row(const bench_opts_t *o, const bench_row_t *r) {
    const int P = r->ranks, fwd_bwd = o->mode == BENCH_MODE_FWD_BWD;
    const int64_t T = r->tokens;
    char gemm[16] = "-", gpct[16] = "-", mcpy[16] = "-", wrong[24] = "N/A", bwd[16] = "-";
    char rimb[16] = "-", a2a[16] = "-", alg[16] = "-", bus[16] = "-", ceil_[16] = "-",
         model[16] = "-";
    if (r->gemm_s >= 0) {
        snprintf(gemm, sizeof gemm, "%.3f", 1e3 * r->gemm_s);
        snprintf(gpct, sizeof gpct, "%.1f", 100.0 * r->gemm_s / r->total.mean);
    }
    if (r->mcpy_s >= 0) snprintf(mcpy, sizeof mcpy, "%.3f", 1e3 * r->mcpy_s);
    if (r->wrong >= 0) snprintf(wrong, sizeof wrong, "%lld", (long long)r->wrong);
    if (fwd_bwd) snprintf(bwd, sizeof bwd, "%.3f", 1e3 * r->bwd.mean);
    if (P > 1) {
        snprintf(rimb, sizeof rimb, "%.3f", r->rank_imbalance);
        snprintf(a2a, sizeof a2a, "%.3f", 1e3 * r->a2a_s);
        snprintf(alg, sizeof alg, "%.2f", r->algbw);
        snprintf(bus, sizeof bus, "%.2f", r->busbw);
        if (r->ceil_s > 0) snprintf(ceil_, sizeof ceil_, "%.3f", 1e3 * r->ceil_s);
        if (r->model_s > 0) snprintf(model, sizeof model, "%.3f", 1e3 * r->model_s);
    }
    printf("  %10lld %10.3f %10s %10.3f %12.0f %8.4g %10s %6s %9s %7.3f %7s %9s %7s %7s "
           "%9s %9s %8lld %7s\n",
           (long long)T, 1e3 * r->fwd.mean, bwd, 1e3 * r->total.mean, r->tokens_per_s,
           r->tflops, gemm, gpct, mcpy, r->imbalance, rimb, a2a, alg, bus, ceil_, model,
           (long long)r->dropped, wrong);
    fflush(stdout);
}

/* rank 0: the footer, the phase table and the ranks of the last size; 1 if --check failed */
static int print_summary(const bench_opts_t *o, int P, const bench_row_t *rows, int nrows,
                         int nprof, int64_t total_wrong, int64_t total_checked, double worst,
                         int replay) {
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
        printf("# Check            : %lld wrong of %lld compared (%s, worst %.3g of max|ref|) "
               "%s\n",
               (long long)total_wrong, (long long)total_checked,
               P > 1 || replay ? "vs a single-rank CPU layer over all ranks' tokens"
               : o->backend == MOE_BACKEND_CPU ? "bitwise vs a second CPU layer"
                                               : "vs the CPU backend",
               worst, total_wrong ? "FAILED" : "OK");
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

static void *run_rank(void *arg) {
    rank_arg_t *a = arg;
    const bench_opts_t *o = a->o;
    const int P = a->w.size, me = a->w.rank, fwd_bwd = o->mode == BENCH_MODE_FWD_BWD;
    bench_world_t *w = &a->w;
    int rc = BENCH_EXIT_OK;
    moe_context_t *ctx = NULL, *ref_ctx = NULL;
    moe_layer_t *layer = NULL, *ref = NULL;
    float *wg = NULL;
    void *x_dev = NULL, *y_dev = NULL, *dy_dev = NULL, *dx_dev = NULL, *stage = NULL;
    double *tf = NULL, *gv = NULL, *gall = NULL;
    workload_t wl = {0, NULL, NULL};
    trace_buf_t tb = {NULL, 0, 0, o->trace_path != NULL, me};
    mem_t mem = {o->backend == MOE_BACKEND_CUDA};
    bench_row_t *rows = NULL;
    int nrows = 0;
    int64_t total_wrong = 0, total_checked = 0;
    double worst = 0.0;
    int check_failed = 0; /* not a failure of the run: the collectives below still happen */
    const moe_layer_config_t *c = &o->cfg;
    const int64_t D = c->d_model, F = c->d_ff, E = c->num_experts;
    const int64_t F2 = c->activation == MOE_ACTIVATION_SWIGLU ? 2 * F : F;
    const size_t es = dtype_size(c->dtype);

    mem_threads(o, P);
#ifdef MOE_BENCH_CUDA
    if (mem.gpu) cudaSetDevice(o->device);
#endif
    MOE_TRY(moe_context_create(&ctx, o->backend, o->device, a->comm));
    MOE_TRY(moe_layer_create(&layer, ctx, &o->cfg));
    moe_layer_config_t ref_cfg = o->cfg;
    if (o->check && P == 1) {
        ref_cfg.dtype = MOE_DTYPE_F32;
        MOE_TRY(moe_context_create(&ref_ctx, MOE_BACKEND_CPU, 0, NULL));
        MOE_TRY(moe_layer_create(&ref, ref_ctx, &ref_cfg));
    }
    if (me == 0) {
        char wt[64] = "";
        if (P > 1)
            snprintf(wt, sizeof wt, " (%s)",
                     w->kind == BENCH_WORLD_MPI
                         ? (o->backend == MOE_BACKEND_CUDA ? "MPI + NCCL" : "MPI")
                         : "local: threads of one process");
        print_header(o, a->backend_text, wt, P, omp_get_max_threads(), blas_threads());
        fflush(stdout);
    }
    {
        void *wv = NULL;
        int64_t n = 0;
        MOE_TRY(moe_layer_param(layer, MOE_PARAM_ROUTER_WEIGHT, &wv, NULL, &n));
        wg = fetch_f32(&mem, c->dtype, wv, n);
        if (!wg) {
            fprintf(stderr, "moe_bench: cannot read the router weight\n");
            rc = BENCH_EXIT_FAIL;
            goto done;
        }
    }
    int nsizes = 0;
    if (a->rp) nsizes = 1;
    else
        for (double t = (double)o->min_tokens; t <= (double)o->max_tokens * (1 + 1e-9);
             t *= o->step_factor)
            ++nsizes;
    const int nprof = o->iters < 3 ? o->iters : 3; /* profiled iterations per size */
    const int ng = 3 * o->iters + G_STATS + MOE_PHASE_COUNT + G_CEIL;
    rows = calloc((size_t)nsizes, sizeof *rows);
    tf = malloc((size_t)(3 * o->iters + 3) * sizeof(double));
    gv = malloc((size_t)ng * sizeof(double)), gall = malloc((size_t)ng * P * sizeof(double));
    if (!rows || !tf || !gv || !gall) {
        fprintf(stderr, "moe_bench: out of host memory\n");
        rc = BENCH_EXIT_FAIL;
        goto done;
    }
    double *tbw = tf + o->iters, *tt = tf + 2 * o->iters;
    const int progress = me == 0 && isatty(STDERR_FILENO);
    double tsize = (double)o->min_tokens;
    if (a->rp) {
        int64_t sum = 0;
        for (int64_t s = 0; s < a->rp->num_steps; ++s) sum += a->rp->tokens[s];
        tsize = (double)sum / (double)a->rp->num_steps / P; /* mean tokens per rank and step */
    }
    int64_t step_base = 0; /* replay: the next recorded step to use */
    for (int si = 0; si < nsizes; ++si, tsize *= o->step_factor) {
        const int64_t T = (int64_t)llround(tsize);
        free_workload(&wl);
        mem_free(&mem, x_dev), mem_free(&mem, y_dev), mem_free(&mem, dy_dev);
        mem_free(&mem, dx_dev), free(stage);
        x_dev = y_dev = dy_dev = dx_dev = stage = NULL;
        if (make_workload(o, a->rp, wg, T, me, P, &wl) != 0) {
            fprintf(stderr, "moe_bench: rank %d: out of memory for %lld tokens\n", me,
                    (long long)T);
            rc = BENCH_EXIT_FAIL;
            goto done;
        }
        const size_t act = (size_t)(wl.tokens_max * D);
        stage = malloc(act * es + 1);
        x_dev = mem_alloc(&mem, act * es), y_dev = mem_alloc(&mem, act * es);
        dy_dev = mem_alloc(&mem, act * es), dx_dev = mem_alloc(&mem, act * es);
        if (!stage || !x_dev || !y_dev || !dy_dev || !dx_dev) {
            fprintf(stderr, "moe_bench: rank %d: out of memory for %lld tokens\n", me,
                    (long long)T);
            rc = BENCH_EXIT_FAIL;
            goto done;
        }
        to_dtype(c->dtype, wl.x, stage, wl.tokens_max * D);
        if (mem_copy(&mem, x_dev, stage, act * es, 0) != 0) goto copy_failed;
        to_dtype(c->dtype, wl.dy, stage, wl.tokens_max * D);
        if (mem_copy(&mem, dy_dev, stage, act * es, 0) != 0) goto copy_failed;

        bench_row_t *r = &rows[nrows];
        r->tokens = T, r->wrong = -1, r->ranks = P;
        if (o->check) {
            check_acc_t acc = {0, 0, 0.0};
            int crc;
            if (P == 1 && !a->rp) {
                if (c->noisy_gating) {
                    /* the gating noise is keyed by the layer's training-forward counter: start
                     * both layers from 0 again so that they draw the same noise */
                    moe_layer_destroy(layer), moe_layer_destroy(ref);
                    layer = NULL, ref = NULL;
                    MOE_TRY(moe_layer_create(&layer, ctx, &o->cfg));
                    MOE_TRY(moe_layer_create(&ref, ref_ctx, &ref_cfg));
                }
                crc = run_check(&mem, layer, ref, c, o->backend, T, wl.x, wl.dy, x_dev, dy_dev,
                                y_dev, dx_dev, &acc);
            } else {
                crc = run_check_ep(a, &mem, layer, wg, T, x_dev, dy_dev, y_dev, dx_dev, &acc);
            }
            if (crc != BENCH_EXIT_OK) {
                rc = crc;
                goto done;
            }
            r->wrong = acc.wrong, r->checked = acc.checked;
            total_wrong += acc.wrong, total_checked += acc.checked;
            worst = fmax(worst, acc.worst);
        }

        /* timed pass, profiling off: the numbers of the table */
        double st_tok = 0, st_sent = 0, st_recv = 0;
        for (int it = -o->warmup; it < o->iters; ++it) {
            if (progress)
                fprintf(stderr, "\r# size %d/%d: %lld tokens, %s %d/%d   ", si + 1, nsizes,
                        (long long)T, it < 0 ? "warm-up" : "iter",
                        it < 0 ? it + o->warmup + 1 : it + 1, it < 0 ? o->warmup : o->iters);
            double t[3];
            int64_t step = step_base++;
            if (bench_world_barrier(w)) goto peer_failed;
            MOE_TRY(step_layer(a, layer, &mem, T, step, x_dev, y_dev, dy_dev, dx_dev, fwd_bwd, t));
            if (it < 0) continue;
            tf[it] = t[1] - t[0], tbw[it] = t[2] - t[1], tt[it] = t[2] - t[0];
            trace_add(&tb, "forward", 1, T, it, t[0], t[1]);
            if (fwd_bwd) trace_add(&tb, "backward", 2, T, it, t[1], t[2]);
            moe_routing_stats_t st;
            MOE_TRY(moe_layer_stats(layer, &st, NULL, NULL));
            st_tok += (double)rank_tokens(o, a->rp, T, step, me, P, NULL);
            st_sent += (double)st.rows_sent, st_recv += (double)st.rows_received;
            r->imbalance += st.imbalance / o->iters;
            r->assignments = st.num_assignments, r->dropped = st.num_dropped;
            r->flops += (2.0 * (double)(st.num_assignments - st.num_dropped) * D * F2 +
                         2.0 * (double)(st.num_assignments - st.num_dropped) * F * D) *
                        (fwd_bwd ? 3.0 : 1.0) / o->iters;
        }
        if (progress) fprintf(stderr, "\r%60s\r", "");

        /* profiled pass: the library's phase times (it waits after every phase, so these calls
         * are slower than the timed ones and are not in the table's totals) */
        double ph[MOE_PHASE_COUNT] = {0};
        MOE_TRY(moe_layer_set_profiling(layer, 1));
        for (int it = 0; it < nprof; ++it) {
            double t[3], p[MOE_PHASE_COUNT];
            if (bench_world_barrier(w)) goto peer_failed;
            MOE_TRY(step_layer(a, layer, &mem, T, step_base++, x_dev, y_dev, dy_dev, dx_dev,
                               fwd_bwd, t));
            MOE_TRY(moe_layer_phase_times(layer, p));
            /* the phases ran one after another: lay them end to end from the call's start
             * (chunks interleave dispatch / experts / return; their sums are shown in plan
             * order) */
            double f0 = t[0], b0 = t[1];
            for (int q = 0; q < MOE_PHASE_COUNT; ++q) {
                ph[q] += p[q] / nprof;
                if (p[q] <= 0) continue;
                double *cur = q < MOE_PHASE_BWD_COMBINE ? &f0 : &b0;
                trace_add(&tb, moe_phase_name((moe_phase_t)q), BENCH_TID_PHASE + q, T, it, *cur,
                          *cur + p[q]);
                *cur += p[q];
            }
        }
        MOE_TRY(moe_layer_set_profiling(layer, 0));

        /* ceilings, same run, all ranks at once as the layer runs: dense GEMMs of this rank's
         * expert rows (CPU only), a memcpy of its activation bytes, the raw all-to-all */
        const double M_r = P > 1 ? st_recv / o->iters : (double)(r->assignments - r->dropped);
        const double T_r = st_tok / o->iters;
        const int reps = o->iters < 3 ? o->iters : 3;
        /* share of this rank's kept assignments (last forward) that leave for another rank */
        double remote = 0.0;
        {
            int64_t n = rank_tokens(o, a->rp, T, step_base - 1, me, P, NULL), kept_n = 0, out_n = 0;
            const int64_t W = moe_layer_routing_width(layer), El = E / P;
            int32_t *ix = malloc((size_t)(n * W + 1) * 4), *kp = malloc((size_t)(n * W + 1) * 4);
            if (!ix || !kp) {
                free(ix), free(kp);
                fprintf(stderr, "moe_bench: out of host memory\n");
                rc = BENCH_EXIT_FAIL;
                goto done;
            }
            moe_status_t rst = n ? moe_layer_routing(layer, ix, NULL, kp) : MOE_STATUS_SUCCESS;
            for (int64_t i = 0; rst == MOE_STATUS_SUCCESS && i < n * W; ++i)
                if (kp[i] && ix[i] >= 0) kept_n++, out_n += ix[i] / El != me;
            free(ix), free(kp);
            MOE_TRY(rst);
            remote = kept_n ? (double)out_n / (double)kept_n : 0.0;
        }
        double stats3[G_STATS] = {T_r, st_sent / o->iters, st_recv / o->iters, remote};
        double *all3 = gall;
        if (bench_world_barrier(w)) goto peer_failed;
        double gemm_s = o->backend == MOE_BACKEND_CPU ? dense_gemm_time((int64_t)llround(M_r), D, F,
                                                                        F2, fwd_bwd, reps, T, &tb)
                                                      : -1.0;
        const double act_bytes = (double)es * (2.0 * T_r * D + M_r * (2.0 * D + F2 + F)) *
                                 (fwd_bwd ? 2.0 : 1.0);
        if (bench_world_barrier(w)) goto peer_failed;
        double mcpy_s = memcpy_time(&mem, (size_t)act_bytes, reps, T, &tb);
        if (bench_world_allgather_f64(w, stats3, G_STATS, all3)) goto peer_failed;
        double sent_mean = 0;
        for (int q = 0; q < P; ++q) sent_mean += all3[q * G_STATS + 1] / P;
        double a2a_raw = -1.0;
        /* MPI + CUDA: the NCCL exchange is not reachable through the public API, and an MPI
         * all-to-all of host memory would be no ceiling for it: none (give --link-bw) */
        if (P > 1 && !(w->kind == BENCH_WORLD_MPI && mem.gpu)) {
            double t0 = now_s();
            a2a_raw =
                bench_world_alltoall_time(w, (size_t)(sent_mean * D * es), reps, mem.gpu, copy_cb,
                                          alloc_cb, free_cb, &mem, tf + 3 * o->iters);
            trace_add(&tb, "all-to-all (roofline)", 5, T, 0, t0, now_s());
        }
        /* everything to every rank; rank 0 fills the row */
        memcpy(gv, tf, (size_t)(3 * o->iters) * sizeof(double));
        memcpy(gv + 3 * o->iters, stats3, sizeof stats3);
        memcpy(gv + 3 * o->iters + G_STATS, ph, sizeof ph);
        gv[ng - 3] = gemm_s, gv[ng - 2] = mcpy_s, gv[ng - 1] = a2a_raw;
        if (bench_world_allgather_f64(w, gv, ng, gall)) goto peer_failed;
        if (me == 0) {
            finish_row(o, P, ng, gall, tf, sent_mean, act_bytes, r);
            print_row(o, r);
        }
        ++nrows;
    }
    if (me == 0)
        check_failed = print_summary(o, P, rows, nrows, nprof, total_wrong, total_checked,
                                     worst, a->rp != NULL);
    goto done;

peer_failed:
    fprintf(stderr, "moe_bench: rank %d: another rank failed\n", me);
    rc = BENCH_EXIT_FAIL;
    goto done;
copy_failed:
    fprintf(stderr, "moe_bench: a copy to or from the backend failed\n");
    rc = BENCH_EXIT_FAIL;
done:
    if (rc != BENCH_EXIT_OK) bench_world_abort(w);
    moe_layer_destroy(layer), moe_layer_destroy(ref);
    moe_context_destroy(ctx), moe_context_destroy(ref_ctx);
    free_workload(&wl);
    free(wg), free(stage), free(tf), free(gv), free(gall);
    mem_free(&mem, x_dev), mem_free(&mem, y_dev), mem_free(&mem, dy_dev), mem_free(&mem, dx_dev);
    /* the trace: every rank's events to rank 0 (a collective: only when every rank got here) */
    if (o->trace_path && rc == BENCH_EXIT_OK) {
        double n = (double)tb.n, *ns = malloc((size_t)P * sizeof(double));
        bench_event_t *all = NULL;
        size_t *each = NULL;
        if (ns && bench_world_allgather_f64(w, &n, 1, ns) == 0) {
            int64_t tot = 0;
            for (int q = 0; q < P; ++q) tot += (int64_t)ns[q];
            if (me == 0) {
                all = malloc((size_t)(tot + 1) * sizeof *all);
                each = malloc((size_t)P * sizeof *each);
                for (int q = 0; each && q < P; ++q) each[q] = (size_t)ns[q] * sizeof *all;
            }
            if (bench_world_gatherv(w, tb.ev, (size_t)tb.n * sizeof *tb.ev, all, each) == 0 &&
                me == 0) {
                free(tb.ev);
                tb.ev = all, tb.n = tot, all = NULL;
            }
        }
        free(ns), free(all), free(each);
    }
    if (rc == BENCH_EXIT_OK && check_failed) rc = BENCH_EXIT_FAIL;
    if (me == 0) {
        g_out.check_failed = check_failed;
        g_out.rows = rows, g_out.nrows = nrows, g_out.total_wrong = total_wrong;
        g_out.total_checked = total_checked, g_out.worst = worst, g_out.tb = tb;
    } else {
        for (int i = 0; i < nrows; ++i) free(rows[i].rank_rows), free(rows[i].rank_remote);
        free(rows), free(tb.ev);
    }
    a->rc = rc;
    return NULL;
}

/* ============================================================================================
 * --model-table: the model's predictions for many GPUs (docs/scaling.md)
 * ========================================================================================== */

static void model_table(const bench_opts_t *o) {
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

/* ============================================================================================
 * main: options, the world (one rank, local threads, or MPI), the backend, then run_rank
 * ========================================================================================== */

static int under_mpi(void) {
    return getenv("OMPI_COMM_WORLD_SIZE") || getenv("PMI_SIZE") || getenv("PMIX_RANK");
}

static int local_rank_env(void) {
    const char *v = getenv("OMPI_COMM_WORLD_LOCAL_RANK");
    if (!v) v = getenv("MPI_LOCALRANKID");
    if (!v) v = getenv("SLURM_LOCALID");
    return v ? atoi(v) : -1;
}

int main(int argc, char **argv) {
    g_t0 = now_s();
    bench_opts_t o;
    int pr = parse_args(argc, argv, &o);
    if (pr != 0) return pr > 0 ? BENCH_EXIT_OK : BENCH_EXIT_USAGE;
    if (o.model_table) {
        model_table(&o);
        return BENCH_EXIT_OK;
    }

    int rc = BENCH_EXIT_OK, mpi = 0, P = o.local_ranks > 0 ? o.local_ranks : 1, rank = 0;
    bench_replay_t rp;
    memset(&rp, 0, sizeof rp);
    moe_comm_t **comms = NULL;
    rank_arg_t *args = NULL;
    pthread_t *th = NULL;
    bench_local_shared_t *sh = NULL;
    const char *world_err = NULL;

    if (under_mpi()) {
#ifdef MOE_BENCH_MPI
        if (o.local_ranks > 1) {
            fprintf(stderr, "moe_bench: --local-ranks under mpirun: use one or the other\n");
            return BENCH_EXIT_USAGE;
        }
        MPI_Init(&argc, &argv);
        MPI_Comm_rank(MPI_COMM_WORLD, &rank);
        MPI_Comm_size(MPI_COMM_WORLD, &P);
        mpi = 1;
        g_t0 = now_s(); /* ranks on one machine share CLOCK_MONOTONIC; see the trace note */
#else
        fprintf(stderr, "moe_bench: started by mpirun but built without MPI: one rank each\n");
#endif
    }
    if (o.replay_path) {
        if (bench_replay_read(o.replay_path, &rp) != 0) {
            rc = BENCH_EXIT_USAGE;
            goto out;
        }
        moe_layer_config_t *c = &o.cfg;
        c->num_experts = rp.num_experts, c->top_k = rp.top_k;
        c->router = (moe_router_type_t)rp.router;
        c->activation = (moe_activation_t)rp.activation, c->gate = (moe_gate_t)rp.gate;
        c->priority = (moe_priority_t)rp.priority;
        if (!o.cap_given) c->capacity_factor = rp.capacity_factor;
        if (!o.dims_given[0] && rp.d_model > 0) c->d_model = rp.d_model;
        if (!o.dims_given[1] && rp.d_ff > 0) c->d_ff = rp.d_ff;
    }
    if (P > 1) {
        const moe_layer_config_t *c = &o.cfg;
        if (c->num_experts % P) world_err = "E must be divisible by the number of ranks";
        else if (o.check && (c->capacity_factor > 0 || c->noisy_gating ||
                             c->router == MOE_ROUTER_EXPERT_CHOICE))
            world_err = "--check on several ranks needs dropless token-choice routing without "
                        "gating noise (capacity, expert choice and noise are per source rank: no "
                        "single-rank reference)";
    } else if (o.routing.kind == BENCH_ROUTING_RANK_SKEW ||
               o.routing.kind == BENCH_ROUTING_ZERO_RANK) {
        printf("# moe_bench: routing %s: NOT_SUPPORTED on one rank (use --local-ranks P or "
               "mpirun). Nothing measured.\n", o.routing.text);
        rc = BENCH_EXIT_NOT_SUPPORTED;
        goto out;
    }
    if (world_err) {
        if (rank == 0) fprintf(stderr, "moe_bench: %s\n", world_err);
        rc = BENCH_EXIT_USAGE;
        goto out;
    }
    if (o.threads > 0) set_threads(o.threads);

    /* backend: the one asked for, else CUDA when a context can be created, else CPU */
    char backend_text[160];
    int device = o.device;
    if (mpi && o.backend_given && o.backend == MOE_BACKEND_CUDA) {
        int lr = local_rank_env();
        device = lr >= 0 ? lr : rank;
#ifdef MOE_BENCH_CUDA
        int n = 0;
        if (cudaGetDeviceCount(&n) == cudaSuccess && n > 0) device %= n;
#endif
        o.device = device;
    }
    {
        moe_context_t *probe = NULL;
        moe_status_t st = MOE_STATUS_SUCCESS;
        if (o.backend_given) {
            st = moe_context_create(&probe, o.backend, o.device, NULL);
        } else if (!mpi && moe_context_create(&probe, MOE_BACKEND_CUDA, o.device, NULL) ==
                               MOE_STATUS_SUCCESS) {
            o.backend = MOE_BACKEND_CUDA;
        } else {
            /* under mpirun CUDA is used only when asked for (--backend cuda: NCCL) */
            o.backend = MOE_BACKEND_CPU;
            st = moe_context_create(&probe, MOE_BACKEND_CPU, 0, NULL);
        }
        moe_context_destroy(probe);
        if (st != MOE_STATUS_SUCCESS) {
            fprintf(stderr, "moe_bench: moe_context_create failed: %s\n  %s\n",
                    moe_status_string(st), moe_last_error());
            rc = st == MOE_STATUS_NOT_SUPPORTED ? BENCH_EXIT_NOT_SUPPORTED : BENCH_EXIT_FAIL;
            goto out;
        }
    }
    snprintf(backend_text, sizeof backend_text, "%s",
             o.backend == MOE_BACKEND_CUDA ? "cuda"
             : o.backend_given             ? "cpu"
                                           : "cpu (no CUDA context)");
    if (o.backend == MOE_BACKEND_CUDA) {
#ifdef MOE_BENCH_CUDA
        struct cudaDeviceProp prop;
        const char *dev = "?";
        if (cudaGetDeviceProperties(&prop, o.device) == cudaSuccess) dev = prop.name;
        cudaSetDevice(o.device);
        snprintf(backend_text, sizeof backend_text, "cuda (device %d%s: %.100s)", o.device,
                 mpi ? " of rank 0" : "", dev);
#else
        fprintf(stderr, "moe_bench: built without the CUDA runtime: cannot feed a CUDA layer\n");
        rc = BENCH_EXIT_NOT_SUPPORTED;
        goto out;
#endif
    }

    comms = calloc((size_t)P, sizeof *comms);
    args = calloc((size_t)P, sizeof *args);
    th = calloc((size_t)P, sizeof *th);
    if (!comms || !args || !th) {
        rc = BENCH_EXIT_FAIL;
        goto out;
    }
    moe_status_t cst = MOE_STATUS_SUCCESS;
    if (mpi) {
#ifdef MOE_BENCH_MPI
        cst = o.backend == MOE_BACKEND_CUDA ? moe_comm_create_nccl(&comms[0], NULL)
                                            : moe_comm_create_mpi(&comms[0], NULL);
#endif
    } else if (P > 1) {
        cst = moe_comm_create_local(comms, P);
        sh = bench_local_shared_create(P);
        if (!sh) cst = MOE_STATUS_ALLOC_FAILED;
    }
    if (cst != MOE_STATUS_SUCCESS) {
        fprintf(stderr, "moe_bench: creating the communicator failed: %s\n  %s\n",
                moe_status_string(cst), moe_last_error());
        rc = cst == MOE_STATUS_NOT_SUPPORTED ? BENCH_EXIT_NOT_SUPPORTED : BENCH_EXIT_FAIL;
        goto out;
    }
    if (mpi || P == 1) {
        args[0] = (rank_arg_t){&o, o.replay_path ? &rp : NULL,
                               {mpi ? BENCH_WORLD_MPI : BENCH_WORLD_SELF, rank, P, NULL},
                               comms[0], backend_text, 0};
        run_rank(&args[0]);
        rc = args[0].rc;
    } else {
        for (int q = 0; q < P; ++q) {
            args[q] = (rank_arg_t){&o, o.replay_path ? &rp : NULL,
                                   {BENCH_WORLD_LOCAL, q, P, sh}, comms[q], backend_text, 0};
            pthread_create(&th[q], NULL, run_rank, &args[q]);
        }
        for (int q = 0; q < P; ++q) {
            pthread_join(th[q], NULL);
            if (args[q].rc != BENCH_EXIT_OK && (rc == BENCH_EXIT_OK || q == 0)) rc = args[q].rc;
        }
    }
    /* the outputs are written also when only --check failed: the JSON says "check": "FAILED" */
    if (rank == 0 && (rc == BENCH_EXIT_OK || (g_out.check_failed && g_out.rows))) {
        if (o.json_path &&
            bench_write_json(o.json_path, &o, backend_text, P, omp_get_max_threads(),
                             blas_threads(), g_out.rows, g_out.nrows, !g_out.check_failed) != 0)
            rc = BENCH_EXIT_FAIL;
        if (o.trace_path && bench_write_trace(o.trace_path, g_out.tb.ev, g_out.tb.n, P) != 0)
            rc = BENCH_EXIT_FAIL;
    }
out:
    for (int i = 0; i < g_out.nrows; ++i)
        free(g_out.rows[i].rank_rows), free(g_out.rows[i].rank_remote);
    free(g_out.rows), free(g_out.tb.ev);
    for (int q = 0; comms && q < P; ++q) moe_comm_destroy(comms[q]);
    free(comms), free(args), free(th);
    bench_local_shared_destroy(sh);
    bench_replay_free(&rp);
#ifdef MOE_BENCH_MPI
    if (mpi) {
        /* a failed rank ends the job: its peers may wait in a collective that never completes */
        if (rc != BENCH_EXIT_OK && rc != BENCH_EXIT_USAGE) MPI_Abort(MPI_COMM_WORLD, rc);
        MPI_Finalize();
    }
#endif
    return rc;
}
