// test_faults.cc - fault injection: every host and backend allocation the library makes fails
// in turn, over create, forward, backward, the optimizer, forced routing and traces. Each failing
// call must return ALLOC_FAILED, leave its handles usable (the next call gives the bitwise result
// of an undisturbed twin) or destroyable, and leak nothing (an allocation balance here, and
// LeakSanitizer in the sanitizer build).
//
// The hook is test-only: this binary links the static library with the linker's --wrap for
// malloc, calloc, realloc, posix_memalign and free, so every allocation call of the library's
// objects (the CPU backend's memory included) comes here first. Nothing of it is in libmoe.
#include <gtest/gtest.h>

#include <atomic>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <unistd.h>
#include <string>
#include <vector>

#include "moe/moe.h"

extern "C" {
void *__real_malloc(size_t n);
void *__real_calloc(size_t n, size_t m);
void *__real_realloc(void *p, size_t n);
int __real_posix_memalign(void **p, size_t a, size_t n);
void __real_free(void *p);

static std::atomic<long> g_countdown{0}; // > 0: the allocation that brings it to 0 fails
static std::atomic<bool> g_fired{false};
static std::atomic<long> g_live{0};      // wrapped allocations not yet freed

static bool fail_now() {
    if (g_countdown.load() <= 0) return false;
    if (--g_countdown == 0) {
        g_fired = true;
        return true;
    }
    return false;
}
void *__wrap_malloc(size_t n) {
    if (fail_now()) return nullptr;
    void *p = __real_malloc(n);
    if (p) ++g_live;
    return p;
}
void *__wrap_calloc(size_t n, size_t m) {
    if (fail_now()) return nullptr;
    void *p = __real_calloc(n, m);
    if (p) ++g_live;
    return p;
}
void *__wrap_realloc(void *p, size_t n) {
    if (fail_now()) return nullptr;
    void *q = __real_realloc(p, n);
    if (q && !p) ++g_live;
    return q;
}
int __wrap_posix_memalign(void **p, size_t a, size_t n) {
    if (fail_now()) return 12; /* ENOMEM */
    int rc = __real_posix_memalign(p, a, n);
    if (rc == 0) ++g_live;
    return rc;
}
void __wrap_free(void *p) {
    if (p) --g_live;
    __real_free(p);
}
}

namespace {

// the n-th allocation from now fails (n >= 1); returns whether it did
void arm(long n) { g_fired = false, g_countdown = n; }
bool disarm() {
    g_countdown = 0;
    return g_fired.load();
}

constexpr int64_t D = 8, T = 9, T2 = 13;

moe_layer_config_t cfg() {
    moe_layer_config_t c = moe_layer_config_default();
    c.d_model = D, c.d_ff = 12, c.num_experts = 4, c.top_k = 2;
    c.noisy_gating = 1, c.capacity_factor = 1.25, c.switch_loss_coef = 0.01;
    c.z_loss_coef = 0.001;
    return c;
}

std::vector<float> input(int64_t n, unsigned seed) {
    std::vector<float> v(n);
    for (int64_t i = 0; i < n; ++i) v[i] = (float)(((i + 1) * 2654435761u * (seed + 1)) % 2001) / 1000.0f - 1.0f;
    return v;
}

struct Fix {
    moe_context_t *ctx = nullptr;
    moe_layer_t *layer = nullptr;
    Fix() {
        EXPECT_EQ(moe_context_create(&ctx, MOE_BACKEND_CPU, 0, nullptr), MOE_STATUS_SUCCESS);
        moe_layer_config_t c = cfg();
        EXPECT_EQ(moe_layer_create(&layer, ctx, &c), MOE_STATUS_SUCCESS);
    }
    ~Fix() {
        EXPECT_EQ(moe_layer_destroy(layer), MOE_STATUS_SUCCESS);
        EXPECT_EQ(moe_context_destroy(ctx), MOE_STATUS_SUCCESS);
    }
    moe_status_t fwd(int64_t t, std::vector<float> &y) {
        std::vector<float> x = input(t * D, 1);
        y.assign(t * D, 0.0f);
        return moe_layer_forward(layer, x.data(), y.data(), t, 1, nullptr);
    }
    moe_status_t bwd(std::vector<float> &dx) {
        std::vector<float> dy = input(T * D, 2);
        dx.assign(T * D, 0.0f);
        return moe_layer_backward(layer, dy.data(), dx.data(), nullptr);
    }
    std::vector<float> grads() {
        std::vector<float> all;
        for (int p = 0; p < MOE_PARAM_COUNT; ++p) {
            void *g = nullptr;
            int64_t n = 0;
            moe_layer_param(layer, (moe_param_t)p, nullptr, &g, &n);
            all.insert(all.end(), (float *)g, (float *)g + n);
        }
        return all;
    }
    std::vector<float> params() {
        std::vector<float> all;
        for (int p = 0; p < MOE_PARAM_COUNT; ++p) {
            void *v = nullptr;
            int64_t n = 0;
            moe_layer_param(layer, (moe_param_t)p, &v, nullptr, &n);
            all.insert(all.end(), (float *)v, (float *)v + n);
        }
        return all;
    }
};

// Sweeps the allocations of one call: iteration n builds fresh handles (unarmed), fails the
// n-th allocation of `call`, and checks; ends when `call` makes fewer than n allocations.
// Returns the number of allocations failed.
long sweep(const char *what, const std::function<void(long n)> &iteration) {
    long n = 1;
    for (;; ++n) {
        long live = g_live.load();
        bool more = false;
        {
            // iteration returns through g_fired whether the armed call met its n-th allocation
            iteration(n);
            more = g_fired.load();
        }
        EXPECT_EQ(g_live.load(), live) << what << ": allocation " << n << " leaked";
        if (!more || ::testing::Test::HasFailure()) break;
        if (n > 10000) {
            ADD_FAILURE() << what << ": no end";
            break;
        }
    }
    std::printf("# fault injection: %s: %ld allocations failed in turn\n", what, n - 1);
    return n - 1;
}

}  // namespace

TEST(Faults, ContextAndLayerCreate) {
    long a = sweep("moe_context_create + moe_layer_create", [](long n) {
        moe_context_t *ctx = nullptr;
        moe_layer_t *layer = nullptr;
        moe_layer_config_t c = cfg();
        arm(n);
        moe_status_t st = moe_context_create(&ctx, MOE_BACKEND_CPU, 0, nullptr);
        if (st == MOE_STATUS_SUCCESS) st = moe_layer_create(&layer, ctx, &c);
        bool fired = disarm();
        if (fired) {
            EXPECT_EQ(st, MOE_STATUS_ALLOC_FAILED) << n << ": " << moe_last_error();
            EXPECT_EQ(layer, nullptr) << "a failed create hands out no handle";
        } else {
            EXPECT_EQ(st, MOE_STATUS_SUCCESS);
        }
        EXPECT_EQ(moe_layer_destroy(layer), MOE_STATUS_SUCCESS);
        EXPECT_EQ(moe_context_destroy(ctx), MOE_STATUS_SUCCESS);
    });
    EXPECT_GT(a, 10);
}

TEST(Faults, ForwardBackwardAndGrowth) {
    std::vector<float> y_ref, y2_ref, dx_ref, g_ref;
    {
        Fix f;
        ASSERT_EQ(f.fwd(T, y_ref), MOE_STATUS_SUCCESS);
        ASSERT_EQ(f.bwd(dx_ref), MOE_STATUS_SUCCESS);
        g_ref = f.grads();
        ASSERT_EQ(f.fwd(T2, y2_ref), MOE_STATUS_SUCCESS);
    }
    // the first forward (buffers allocated); the call counter of the noise must not move
    long a = sweep("moe_layer_forward (first)", [&](long n) {
        Fix f;
        std::vector<float> y;
        arm(n);
        moe_status_t st = f.fwd(T, y);
        if (!disarm()) {
            EXPECT_EQ(st, MOE_STATUS_SUCCESS);
            return;
        }
        EXPECT_EQ(st, MOE_STATUS_ALLOC_FAILED) << n << ": " << moe_last_error();
        EXPECT_EQ(moe_layer_backward(f.layer, y.data(), y.data(), nullptr),
                  MOE_STATUS_INVALID_ARGUMENT) << "no forward succeeded";
        ASSERT_EQ(f.fwd(T, y), MOE_STATUS_SUCCESS) << moe_last_error();
        EXPECT_EQ(y, y_ref) << "allocation " << n << ": the layer changed";
    });
    // a forward that grows the buffers after a smaller one
    long b = sweep("moe_layer_forward (growth)", [&](long n) {
        Fix f;
        std::vector<float> y, dx;
        ASSERT_EQ(f.fwd(T, y), MOE_STATUS_SUCCESS);
        arm(n);
        moe_status_t st = f.fwd(T2, y);
        if (!disarm()) {
            EXPECT_EQ(st, MOE_STATUS_SUCCESS);
            return;
        }
        EXPECT_EQ(st, MOE_STATUS_ALLOC_FAILED) << n;
        ASSERT_EQ(f.fwd(T2, y), MOE_STATUS_SUCCESS) << moe_last_error();
        EXPECT_EQ(y, y2_ref);
    });
    long c = sweep("moe_layer_backward", [&](long n) {
        Fix f;
        std::vector<float> y, dx;
        ASSERT_EQ(f.fwd(T, y), MOE_STATUS_SUCCESS);
        arm(n);
        moe_status_t st = f.bwd(dx);
        if (!disarm()) {
            EXPECT_EQ(st, MOE_STATUS_SUCCESS);
            return;
        }
        EXPECT_EQ(st, MOE_STATUS_ALLOC_FAILED) << n;
        ASSERT_EQ(moe_layer_zero_grad(f.layer, nullptr), MOE_STATUS_SUCCESS);
        ASSERT_EQ(f.bwd(dx), MOE_STATUS_SUCCESS) << moe_last_error();
        EXPECT_EQ(dx, dx_ref);
        EXPECT_EQ(f.grads(), g_ref);
    });
    std::printf("# fault injection: forward, growth, backward: %ld %ld %ld\n", a, b, c);
    EXPECT_GT(a, 0);
}

TEST(Faults, OptimizerCreateAndStep) {
    std::vector<float> p_ref;
    {
        Fix f;
        std::vector<float> y, dx;
        ASSERT_EQ(f.fwd(T, y), MOE_STATUS_SUCCESS);
        ASSERT_EQ(f.bwd(dx), MOE_STATUS_SUCCESS);
        moe_optimizer_config_t oc = moe_optimizer_config_default(MOE_OPTIMIZER_ADAMW);
        moe_optimizer_t *o = nullptr;
        ASSERT_EQ(moe_optimizer_create(&o, f.layer, &oc), MOE_STATUS_SUCCESS);
        ASSERT_EQ(moe_optimizer_step(o, nullptr), MOE_STATUS_SUCCESS);
        p_ref = f.params();
        moe_optimizer_destroy(o);
    }
    for (int phase = 0; phase < 2; ++phase)
        sweep(phase == 0 ? "moe_optimizer_create" : "moe_optimizer_step", [&](long n) {
            Fix f;
            std::vector<float> y, dx;
            ASSERT_EQ(f.fwd(T, y), MOE_STATUS_SUCCESS);
            ASSERT_EQ(f.bwd(dx), MOE_STATUS_SUCCESS);
            moe_optimizer_config_t oc = moe_optimizer_config_default(MOE_OPTIMIZER_ADAMW);
            moe_optimizer_t *o = nullptr;
            if (phase == 1) {
                ASSERT_EQ(moe_optimizer_create(&o, f.layer, &oc), MOE_STATUS_SUCCESS);
            }
            arm(n);
            moe_status_t st = phase == 0 ? moe_optimizer_create(&o, f.layer, &oc)
                                         : moe_optimizer_step(o, nullptr);
            bool fired = disarm();
            if (fired) {
                EXPECT_EQ(st, MOE_STATUS_ALLOC_FAILED) << n;
                if (phase == 0) {
                    EXPECT_EQ(o, nullptr);
                    ASSERT_EQ(moe_optimizer_create(&o, f.layer, &oc), MOE_STATUS_SUCCESS);
                }
                ASSERT_EQ(moe_optimizer_step(o, nullptr), MOE_STATUS_SUCCESS);
            } else {
                EXPECT_EQ(st, MOE_STATUS_SUCCESS);
                if (phase == 0) {
                    ASSERT_EQ(moe_optimizer_step(o, nullptr), MOE_STATUS_SUCCESS);
                }
            }
            EXPECT_EQ(f.params(), p_ref);
            EXPECT_EQ(moe_optimizer_destroy(o), MOE_STATUS_SUCCESS);
        });
}

TEST(Faults, ForcedRoutingAndTrace) {
    const std::string path = std::string(std::getenv("TMPDIR") ? std::getenv("TMPDIR") : "/tmp") +
                             "/moe_faults_" + std::to_string((long)getpid()) + ".trace";
    std::vector<int32_t> idx(T * 2);
    std::vector<float> g(T * 2, 0.5f);
    for (int64_t t = 0; t < T; ++t) idx[2 * t] = (int32_t)(t % 4), idx[2 * t + 1] = (int32_t)((t + 1) % 4);
    sweep("moe_layer_force_routing + forward", [&](long n) {
        Fix f;
        std::vector<float> y;
        arm(n);
        moe_status_t st = moe_layer_force_routing(f.layer, idx.data(), g.data(), T);
        if (st == MOE_STATUS_SUCCESS) st = f.fwd(T, y);
        if (!disarm()) {
            EXPECT_EQ(st, MOE_STATUS_SUCCESS);
            return;
        }
        EXPECT_EQ(st, MOE_STATUS_ALLOC_FAILED) << n << ": " << moe_last_error();
        ASSERT_EQ(f.fwd(T, y), MOE_STATUS_SUCCESS) << "the forced routing is dropped";
    });
    sweep("moe_layer_trace_open + forward + close", [&](long n) {
        Fix f;
        std::vector<float> y;
        arm(n);
        moe_status_t st = moe_layer_trace_open(f.layer, path.c_str(), 1);
        if (st == MOE_STATUS_SUCCESS) st = f.fwd(T, y);
        moe_status_t cst = moe_layer_trace_close(f.layer);
        if (!disarm()) {
            EXPECT_EQ(st, MOE_STATUS_SUCCESS);
            return;
        }
        EXPECT_EQ(st, MOE_STATUS_ALLOC_FAILED) << n << ": " << moe_last_error();
        EXPECT_EQ(cst, MOE_STATUS_SUCCESS);
        ASSERT_EQ(f.fwd(T, y), MOE_STATUS_SUCCESS);
    });
    std::remove(path.c_str());
}
