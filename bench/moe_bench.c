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
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#ifdef MOE_BENCH_CUDA
#include <cuda_runtime_api.h>
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
"  -t, --tokens N           tokens per call (sets -b and -e; default 1024)\n"
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
"                           hot:FRACTION (share of assignments on expert 0); rank-skew and\n"
"                           zero-rank need expert parallelism: NOT_SUPPORTED for now\n"
"      --seed N             inputs and routing targets (default 1); the layer keeps its own\n"
"run\n"
"      --backend B          cpu | cuda (default cuda when a CUDA context can be created)\n"
"      --device N           CUDA device ordinal (default 0)\n"
"      --mode M             fwd | fwd-bwd (default fwd-bwd)\n"
"  -w, --warmup N           untimed iterations per size (default 2)\n"
"  -n, --iters N            timed iterations per size (default 5)\n"
"  -b, --min-tokens N       first size of the sweep\n"
"  -e, --max-tokens N       last size of the sweep\n"
"  -f, --step-factor X      multiply the size by X each step (default 2)\n"
"      --threads N          OpenMP and OpenBLAS threads (default: their own defaults)\n"
"  -c, --check              compare outputs, dx and every gradient with a CPU layer holding\n"
"                           the same parameters (CPU vs CPU: bitwise); exit 1 on a mismatch\n"
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
"  moe_bench --preset mixtral -t 2048 --dtype bf16 --backend cuda\n");
}

enum {
    OPT_DTYPE = 256, OPT_ACT, OPT_GATE, OPT_RENORM, OPT_NOISY, OPT_CAP, OPT_PRIO, OPT_NOBIAS,
    OPT_PRESET, OPT_ROUTING, OPT_SEED, OPT_BACKEND, OPT_DEVICE, OPT_MODE, OPT_THREADS, OPT_JSON,
    OPT_TRACE
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
            break;
        case 'd':
            if (parse_i64("--d-model", optarg, 1, 1 << 20, &o->cfg.d_model)) return -1;
            break;
        case 'F':
            if (parse_i64("--d-ff", optarg, 1, 1 << 22, &o->cfg.d_ff)) return -1;
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
            b_given = 1;
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
    if (o->cfg.top_k > o->cfg.num_experts) {
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
} trace_buf_t;

static void trace_add(trace_buf_t *tb, const char *name, int tid, int64_t tokens, int iter,
                      double t_begin, double t_end) {
    if (!tb->on) return;
    if (tb->n == tb->cap) {
        int64_t cap = tb->cap ? 2 * tb->cap : 256;
        bench_event_t *ev = realloc(tb->ev, (size_t)cap * sizeof *ev);
        if (!ev) return; /* a trace without this event beats no benchmark */
        tb->ev = ev, tb->cap = cap;
    }
    bench_event_t *e = &tb->ev[tb->n++];
    e->name = name, e->tid = tid, e->tokens = tokens, e->iter = iter;
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
    const int64_t D = cfg->d_model, K = cfg->top_k;
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
 * the run
 * ========================================================================================== */

static void print_header(const bench_opts_t *o, const char *backend_text, int omp_threads,
                         int blas_thr) {
    const moe_layer_config_t *c = &o->cfg;
    int major, minor, patch;
    moe_get_version(&major, &minor, &patch);
    printf("# moe_bench: libmoe %d.%d.%d  backend %s  ranks 1%s%s\n", major, minor, patch,
           backend_text, o->preset ? "  preset " : "", o->preset ? o->preset : "");
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
           o->mode == BENCH_MODE_FWD ? "fwd" : "fwd-bwd", o->routing.text,
           (unsigned long long)o->seed, o->warmup, o->iters, o->check ? "on" : "off");
    if (blas_thr > 0)
        printf("#  threads  OpenMP %d  OpenBLAS %d\n", omp_threads, blas_thr);
    else
        printf("#  threads  OpenMP %d  BLAS (not OpenBLAS: unknown)\n", omp_threads);
    printf("#  TFLOP/s  expert GEMMs only: 2*M*D*%s + 2*M*F*D per forward%s, M = kept "
           "assignments\n",
           c->activation == MOE_ACTIVATION_SWIGLU ? "2F" : "F",
           o->mode == BENCH_MODE_FWD_BWD ? ", x3 for forward+backward" : "");
    printf("#  roofline gemm = dense sgemm of the same FLOPs, gemm%% = gemm / total; mcpy = "
           "memcpy of the activation bytes\n");
    printf("#\n");
    printf("# %10s %10s %10s %10s %12s %8s %10s %6s %9s %7s %8s %7s\n", "tokens", "fwd(ms)",
           "bwd(ms)", "total(ms)", "tokens/s", "TFLOP/s", "gemm(ms)", "gemm%", "mcpy(ms)",
           "imbal", "dropped", "#wrong");
}

int main(int argc, char **argv) {
    g_t0 = now_s();
    bench_opts_t o;
    int pr = parse_args(argc, argv, &o);
    if (pr != 0) return pr > 0 ? BENCH_EXIT_OK : BENCH_EXIT_USAGE;

    int rc = BENCH_EXIT_OK;
    moe_context_t *ctx = NULL, *ref_ctx = NULL;
    moe_layer_t *layer = NULL, *ref = NULL;
    bench_row_t *rows = NULL;
    int nrows = 0;
    trace_buf_t tb = {NULL, 0, 0, o.trace_path != NULL};
    float *x = NULL, *dy = NULL, *wg = NULL;
    void *x_dev = NULL, *y_dev = NULL, *dy_dev = NULL, *dx_dev = NULL, *stage = NULL;
    double *tf = NULL, *tbw = NULL, *tt = NULL;
    int64_t total_wrong = 0, total_checked = 0;
    double worst = 0.0;
    mem_t mem = {0};

    if (o.routing.kind == BENCH_ROUTING_RANK_SKEW || o.routing.kind == BENCH_ROUTING_ZERO_RANK) {
        printf("# moe_bench: routing %s: NOT_SUPPORTED (needs expert parallelism; ranks = 1). "
               "Nothing measured.\n",
               o.routing.text);
        return BENCH_EXIT_NOT_SUPPORTED;
    }
    if (o.threads > 0) set_threads(o.threads);

    /* backend: the one asked for, else CUDA when a context can be created, else CPU */
    char backend_text[160];
    if (o.backend_given) {
        MOE_TRY(moe_context_create(&ctx, o.backend, o.device, NULL));
        snprintf(backend_text, sizeof backend_text, "%s", o.backend == MOE_BACKEND_CUDA ? "cuda" : "cpu");
    } else if (moe_context_create(&ctx, MOE_BACKEND_CUDA, o.device, NULL) == MOE_STATUS_SUCCESS) {
        o.backend = MOE_BACKEND_CUDA;
        snprintf(backend_text, sizeof backend_text, "cuda");
    } else {
        o.backend = MOE_BACKEND_CPU;
        MOE_TRY(moe_context_create(&ctx, MOE_BACKEND_CPU, 0, NULL));
        snprintf(backend_text, sizeof backend_text, "cpu (no CUDA context)");
    }
    if (o.backend == MOE_BACKEND_CUDA) {
#ifdef MOE_BENCH_CUDA
        mem.gpu = 1;
        struct cudaDeviceProp prop;
        const char *dev = "?";
        if (cudaGetDeviceProperties(&prop, o.device) == cudaSuccess) dev = prop.name;
        cudaSetDevice(o.device);
        snprintf(backend_text, sizeof backend_text, "cuda (device %d: %.100s)", o.device, dev);
#else
        fprintf(stderr, "moe_bench: built without the CUDA runtime: cannot feed a CUDA layer\n");
        rc = BENCH_EXIT_NOT_SUPPORTED;
        goto done;
#endif
    }
    MOE_TRY(moe_layer_create(&layer, ctx, &o.cfg));
    moe_layer_config_t ref_cfg = o.cfg;
    if (o.check) {
        ref_cfg.dtype = MOE_DTYPE_F32;
        MOE_TRY(moe_context_create(&ref_ctx, MOE_BACKEND_CPU, 0, NULL));
        MOE_TRY(moe_layer_create(&ref, ref_ctx, &ref_cfg));
    }

    const int omp_threads = omp_get_max_threads(), blas_thr = blas_threads();
    print_header(&o, backend_text, omp_threads, blas_thr);
    fflush(stdout);

    const moe_layer_config_t *c = &o.cfg;
    const int64_t D = c->d_model, F = c->d_ff, E = c->num_experts, K = c->top_k;
    const int64_t F2 = c->activation == MOE_ACTIVATION_SWIGLU ? 2 * F : F;
    const size_t es = dtype_size(c->dtype);
    const int fwd_bwd = o.mode == BENCH_MODE_FWD_BWD;

    /* router weight as f32 on the host: the routing workloads aim at its columns */
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
    for (double t = (double)o.min_tokens; t <= (double)o.max_tokens * (1 + 1e-9); t *= o.step_factor)
        ++nsizes;
    rows = calloc((size_t)nsizes, sizeof *rows);
    tf = malloc((size_t)o.iters * sizeof(double));
    tbw = malloc((size_t)o.iters * sizeof(double));
    tt = malloc((size_t)o.iters * sizeof(double));
    if (!rows || !tf || !tbw || !tt) {
        fprintf(stderr, "moe_bench: out of host memory\n");
        rc = BENCH_EXIT_FAIL;
        goto done;
    }
    const int progress = isatty(STDERR_FILENO);
    double tsize = (double)o.min_tokens;
    for (int si = 0; si < nsizes; ++si, tsize *= o.step_factor) {
        const int64_t T = (int64_t)llround(tsize);
        const size_t act = (size_t)(T * D);
        free(x), free(dy);
        mem_free(&mem, x_dev), mem_free(&mem, y_dev), mem_free(&mem, dy_dev);
        mem_free(&mem, dx_dev), free(stage);
        x = malloc(act * 4), dy = malloc(act * 4), stage = malloc(act * es);
        x_dev = mem_alloc(&mem, act * es), y_dev = mem_alloc(&mem, act * es);
        dy_dev = mem_alloc(&mem, act * es), dx_dev = mem_alloc(&mem, act * es);
        if (!x || !dy || !stage || !x_dev || !y_dev || !dy_dev || !dx_dev) {
            fprintf(stderr, "moe_bench: out of memory for %lld tokens\n", (long long)T);
            rc = BENCH_EXIT_FAIL;
            goto done;
        }
        if (bench_make_input(&o.routing, wg, T, D, E, K, o.seed, x) != 0) {
            rc = BENCH_EXIT_FAIL;
            goto done;
        }
        bench_fill_uniform(dy, T * D, o.seed + 0x5151, 1.0f / (float)D);
        to_dtype(c->dtype, x, stage, T * D);
        if (mem_copy(&mem, x_dev, stage, act * es, 0) != 0) goto copy_failed;
        to_dtype(c->dtype, dy, stage, T * D);
        if (mem_copy(&mem, dy_dev, stage, act * es, 0) != 0) goto copy_failed;

        bench_row_t *r = &rows[nrows];
        r->tokens = T, r->wrong = -1;
        if (o.check) {
            if (c->noisy_gating) {
                /* the gating noise is keyed by the layer's training-forward counter: start both
                 * layers from 0 again so that they draw the same noise */
                moe_layer_destroy(layer), moe_layer_destroy(ref);
                layer = NULL, ref = NULL;
                MOE_TRY(moe_layer_create(&layer, ctx, &o.cfg));
                MOE_TRY(moe_layer_create(&ref, ref_ctx, &ref_cfg));
            }
            check_acc_t acc = {0, 0, 0.0};
            int crc = run_check(&mem, layer, ref, c, o.backend, T, x, dy, x_dev, dy_dev, y_dev,
                                dx_dev, &acc);
            if (crc != BENCH_EXIT_OK) {
                rc = crc;
                goto done;
            }
            r->wrong = acc.wrong, r->checked = acc.checked;
            total_wrong += acc.wrong, total_checked += acc.checked;
            worst = fmax(worst, acc.worst);
        }

        for (int it = -o.warmup; it < o.iters; ++it) {
            if (progress)
                fprintf(stderr, "\r# size %d/%d: %lld tokens, %s %d/%d   ", si + 1, nsizes,
                        (long long)T, it < 0 ? "warm-up" : "iter", it < 0 ? it + o.warmup + 1 : it + 1,
                        it < 0 ? o.warmup : o.iters);
            double t0 = now_s();
            MOE_TRY(moe_layer_forward(layer, x_dev, y_dev, T, 1, NULL));
            if (mem_sync(&mem) != 0) goto copy_failed;
            double t1 = now_s(), t2 = t1;
            if (fwd_bwd) {
                MOE_TRY(moe_layer_backward(layer, dy_dev, dx_dev, NULL));
                if (mem_sync(&mem) != 0) goto copy_failed;
                t2 = now_s();
            }
            if (it < 0) continue;
            tf[it] = t1 - t0, tbw[it] = t2 - t1, tt[it] = t2 - t0;
            trace_add(&tb, "forward", 1, T, it, t0, t1);
            if (fwd_bwd) trace_add(&tb, "backward", 2, T, it, t1, t2);
        }
        if (progress) fprintf(stderr, "\r%60s\r", "");
        r->fwd = summarize(tf, o.iters), r->total = summarize(tt, o.iters);
        if (fwd_bwd) r->bwd = summarize(tbw, o.iters);

        moe_routing_stats_t st;
        MOE_TRY(moe_layer_stats(layer, &st, NULL, NULL));
        r->imbalance = st.imbalance, r->assignments = st.num_assignments;
        r->dropped = st.num_dropped;
        const int64_t M = st.num_assignments - st.num_dropped;
        r->flops = (2.0 * (double)M * D * F2 + 2.0 * (double)M * F * D) * (fwd_bwd ? 3.0 : 1.0);
        r->tokens_per_s = (double)T / r->total.mean;
        r->tflops = r->flops / r->total.mean * 1e-12;

        /* ceilings, same run: dense GEMMs of the same FLOPs (CPU only), memcpy of the activation
         * bytes the layer must touch: x, y and per kept row its copies in, H, act(H), out
         * (forward); backward the same again */
        const int reps = o.iters < 3 ? o.iters : 3;
        r->gemm_s = o.backend == MOE_BACKEND_CPU ? dense_gemm_time(M, D, F, F2, fwd_bwd, reps, T, &tb)
                                                 : -1.0;
        r->act_bytes = (double)es * (2.0 * (double)T * D + (double)M * (2.0 * D + F2 + F)) *
                       (fwd_bwd ? 2.0 : 1.0);
        r->mcpy_s = memcpy_time(&mem, (size_t)r->act_bytes, reps, T, &tb);

        char gemm[16] = "-", gpct[16] = "-", mcpy[16] = "-", wrong[24] = "N/A", bwd[16] = "-";
        if (r->gemm_s >= 0) {
            snprintf(gemm, sizeof gemm, "%.3f", 1e3 * r->gemm_s);
            snprintf(gpct, sizeof gpct, "%.1f", 100.0 * r->gemm_s / r->total.mean);
        }
        if (r->mcpy_s >= 0) snprintf(mcpy, sizeof mcpy, "%.3f", 1e3 * r->mcpy_s);
        if (r->wrong >= 0) snprintf(wrong, sizeof wrong, "%lld", (long long)r->wrong);
        if (fwd_bwd) snprintf(bwd, sizeof bwd, "%.3f", 1e3 * r->bwd.mean);
        printf("  %10lld %10.3f %10s %10.3f %12.0f %8.4g %10s %6s %9s %7.3f %8lld %7s\n",
               (long long)T, 1e3 * r->fwd.mean, bwd, 1e3 * r->total.mean, r->tokens_per_s,
               r->tflops, gemm, gpct, mcpy, r->imbalance, (long long)r->dropped, wrong);
        fflush(stdout);
        ++nrows;
    }

    {
        double sum_tps = 0.0, sum_tf = 0.0;
        for (int i = 0; i < nrows; ++i) sum_tps += rows[i].tokens_per_s, sum_tf += rows[i].tflops;
        printf("# Average tokens/s : %.0f\n", nrows ? sum_tps / nrows : 0.0);
        printf("# Average TFLOP/s  : %.4g\n", nrows ? sum_tf / nrows : 0.0);
        if (o.check) {
            printf("# Check            : %lld wrong of %lld compared (%s, worst %.3g of max|ref|) "
                   "%s\n",
                   (long long)total_wrong, (long long)total_checked,
                   o.backend == MOE_BACKEND_CPU ? "bitwise vs a second CPU layer"
                                                : "vs the CPU backend",
                   worst, total_wrong ? "FAILED" : "OK");
            if (total_wrong) rc = BENCH_EXIT_FAIL;
        } else {
            printf("# Check            : not run (use --check)\n");
        }
        printf("# Times are means over %d iterations; --json has medians, minima and maxima.\n",
               o.iters);
    }
    if (o.json_path &&
        bench_write_json(o.json_path, &o, backend_text, omp_threads, blas_thr, rows, nrows,
                         total_wrong == 0) != 0 && rc == BENCH_EXIT_OK)
        rc = BENCH_EXIT_FAIL;
    if (o.trace_path && bench_write_trace(o.trace_path, tb.ev, tb.n) != 0 && rc == BENCH_EXIT_OK)
        rc = BENCH_EXIT_FAIL;
    goto done;

copy_failed:
    fprintf(stderr, "moe_bench: a copy to or from the backend failed\n");
    rc = BENCH_EXIT_FAIL;
done:
    moe_layer_destroy(layer), moe_layer_destroy(ref);
    moe_context_destroy(ctx), moe_context_destroy(ref_ctx);
    free(x), free(dy), free(wg), free(stage), free(rows), free(tf), free(tbw), free(tt);
    mem_free(&mem, x_dev), mem_free(&mem, y_dev), mem_free(&mem, dy_dev), mem_free(&mem, dx_dev);
    free(tb.ev);
    return rc;
}
