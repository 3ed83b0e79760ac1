// test_grouped_gemm.cc - the CUTLASS grouped expert GEMMs (kernels/grouped_gemm.h) against a
// float64 loop over the same 16-bit operands: every kind, bf16 and f16, groups of uneven sizes
// with empty ones among them, C overwritten or accumulated. GPU cases skip without an sm_90 GPU.
#include <gtest/gtest.h>

#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>
#include <random>
#include <string>
#include <vector>

#include "core/dtype.h"
#include "gpu_test.h"
#include "kernels/grouped_gemm.h"
#include "moe/moe.h"

namespace {

struct Case {
    int kind, dtype, c_f32, beta_one;
    const char *name;
};

uint16_t to16(float v, int dtype) {
    return dtype == MOE_DTYPE_BF16 ? moe_f32_to_bf16(v) : moe_f32_to_f16(v);
}
float from16(uint16_t v, int dtype) {
    return dtype == MOE_DTYPE_BF16 ? moe_bf16_to_f32(v) : moe_f16_to_f32(v);
}

// 16-bit values with their f32 images (what the reference multiplies)
struct Buf16 {
    std::vector<uint16_t> bits;
    std::vector<float> val;
    Buf16(size_t n, int dtype, std::mt19937 &rng) : bits(n), val(n) {
        std::uniform_real_distribution<float> u(-1.0f, 1.0f);
        for (size_t i = 0; i < n; ++i) {
            bits[i] = to16(u(rng), dtype);
            val[i] = from16(bits[i], dtype);
        }
    }
};

template <class T> T *to_device(const std::vector<T> &h) {
    T *d = nullptr;
    EXPECT_EQ(cudaMalloc(&d, h.size() * sizeof(T) + 16), cudaSuccess);
    EXPECT_EQ(cudaMemcpy(d, h.data(), h.size() * sizeof(T), cudaMemcpyHostToDevice), cudaSuccess);
    return d;
}

class GroupedGemm : public ::testing::TestWithParam<Case> {};

TEST_P(GroupedGemm, MatchesFloat64Loop) {
    REQUIRE_GPU();
    if (!moe_k_grouped_gemm_available())
        GTEST_SKIP() << "the CUTLASS grouped GEMMs need compute capability 9.0 (sm_90a build)";
    const Case c = GetParam();
    std::mt19937 rng(7 + c.kind * 10 + c.dtype);
    // uneven groups, two empty ones, one larger than a 128-row tile
    const std::vector<int64_t> rows = {37, 0, 1, 200, 0, 128, 9};
    const int64_t G = (int64_t)rows.size();
    std::vector<int64_t> off(G + 1, 0);
    for (int64_t g = 0; g < G; ++g) off[g + 1] = off[g] + rows[g];
    const int64_t R = off[G];
    const int64_t M = 48, N = 72, K = 96; // M only for WGRAD: the weight gradient's rows
    const bool wgrad = c.kind == MOE_K_GG_WGRAD;
    const int64_t a_cols = wgrad ? M : K;
    const int64_t b_size = wgrad ? R * N : G * K * N;
    const int64_t c_size = wgrad ? G * M * N : R * N;
    Buf16 A(R * a_cols, c.dtype, rng), B(b_size, c.dtype, rng);
    // C's prior contents: kept (x1) when accumulating, must not matter otherwise
    Buf16 C16(c_size, c.dtype, rng);
    std::vector<float> C32(C16.val);
    if (!c.beta_one)
        for (size_t i = 0; i < C32.size(); ++i) C32[i] = NAN, C16.bits[i] = to16(NAN, c.dtype);

    // reference in float64, with the magnitude sum each output's rounding error scales with
    std::vector<double> ref(c_size), mag(c_size);
    for (int64_t g = 0; g < G; ++g) {
        const int64_t m = rows[g];
        const int64_t om = wgrad ? M : m, ok = wgrad ? m : K;
        for (int64_t i = 0; i < om; ++i)
            for (int64_t j = 0; j < N; ++j) {
                double s = 0.0, a = 0.0;
                for (int64_t k = 0; k < ok; ++k) {
                    double x, w;
                    if (wgrad) {
                        x = A.val[(off[g] + k) * M + i];
                        w = B.val[(off[g] + k) * N + j];
                    } else {
                        x = A.val[(off[g] + i) * K + k];
                        w = c.kind == MOE_K_GG_ROWS_W ? B.val[(g * K + k) * N + j]
                                                      : B.val[(g * N + j) * K + k];
                    }
                    s += x * w;
                    a += std::fabs(x * w);
                }
                const int64_t o = wgrad ? (g * M + i) * N + j : (off[g] + i) * N + j;
                const double prior = c.c_f32 ? C32[o] : C16.val[o];
                ref[o] = c.beta_one ? prior + s : s;
                mag[o] = a + (c.beta_one ? std::fabs(prior) : 0.0);
            }
    }

    uint16_t *dA = to_device(A.bits), *dB = to_device(B.bits);
    void *dC = c.c_f32 ? (void *)to_device(C32) : (void *)to_device(C16.bits);
    int64_t *dOff = to_device(off);
    size_t scratch_bytes = moe_k_grouped_gemm_scratch_bytes(G);
    ASSERT_GT(scratch_bytes, 0u);
    void *scratch = nullptr;
    ASSERT_EQ(cudaMalloc(&scratch, scratch_bytes), cudaSuccess);
    moe_k_grouped_gemm_args_t args = {};
    args.kind = c.kind;
    args.dtype = c.dtype;
    args.c_f32 = c.c_f32;
    args.beta_one = c.beta_one;
    args.num_groups = G;
    args.offsets = dOff;
    args.M = M, args.N = N, args.K = K;
    args.A = dA, args.B = dB, args.C = dC;
    args.scratch = scratch;
    args.scratch_bytes = scratch_bytes;
    ASSERT_EQ(moe_k_grouped_gemm(&args, nullptr), cudaSuccess);
    ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);

    std::vector<float> out(c_size);
    if (c.c_f32) {
        ASSERT_EQ(cudaMemcpy(out.data(), dC, c_size * 4, cudaMemcpyDeviceToHost), cudaSuccess);
    } else {
        std::vector<uint16_t> o16(c_size);
        ASSERT_EQ(cudaMemcpy(o16.data(), dC, c_size * 2, cudaMemcpyDeviceToHost), cudaSuccess);
        for (int64_t i = 0; i < c_size; ++i) out[i] = from16(o16[i], c.dtype);
    }
    // f32 accumulation: ~K ulps of f32 on the magnitude sum; a 16-bit output adds one rounding
    // (half an ulp: 2^-9 of bf16, 2^-12 of f16) of the result
    const double out_eps = c.c_f32 ? 0.0 : (c.dtype == MOE_DTYPE_BF16 ? 0x1p-8 : 0x1p-11);
    int64_t bad = 0;
    for (int64_t i = 0; i < c_size; ++i) {
        const double tol = out_eps * std::fabs(ref[i]) + 1e-5 * mag[i] + 1e-7;
        if (!(std::fabs(out[i] - ref[i]) <= tol) && bad++ < 5)
            ADD_FAILURE() << c.name << " element " << i << ": " << out[i] << " vs " << ref[i];
    }
    EXPECT_EQ(bad, 0);
    cudaFree(dA), cudaFree(dB), cudaFree(dC), cudaFree(dOff), cudaFree(scratch);
}

INSTANTIATE_TEST_SUITE_P(
    Kinds, GroupedGemm,
    ::testing::Values(Case{MOE_K_GG_ROWS_W, MOE_DTYPE_BF16, 1, 1, "fwd1_bf16_bias"},
                      Case{MOE_K_GG_ROWS_W, MOE_DTYPE_BF16, 1, 0, "fwd1_bf16"},
                      Case{MOE_K_GG_ROWS_W, MOE_DTYPE_F16, 0, 0, "fwd2_f16"},
                      Case{MOE_K_GG_ROWS_W, MOE_DTYPE_BF16, 0, 1, "fwd2_bf16_bias"},
                      Case{MOE_K_GG_ROWS_WT, MOE_DTYPE_BF16, 1, 0, "dact_bf16"},
                      Case{MOE_K_GG_ROWS_WT, MOE_DTYPE_F16, 0, 0, "dx_f16"},
                      Case{MOE_K_GG_WGRAD, MOE_DTYPE_BF16, 0, 1, "wgrad_bf16"},
                      Case{MOE_K_GG_WGRAD, MOE_DTYPE_F16, 0, 1, "wgrad_f16"}),
    [](const ::testing::TestParamInfo<Case> &i) { return std::string(i.param.name); });

// the shape rule needs no GPU: rows of 16-bit operands must be whole 16-byte units
TEST(GroupedGemmFit, RefusesShapesTmaCannotLoad) {
    EXPECT_TRUE(moe_k_grouped_gemm_fits(0, 2048, 768, MOE_K_GG_ROWS_W));
    EXPECT_TRUE(moe_k_grouped_gemm_fits(768, 2048, 0, MOE_K_GG_WGRAD));
    EXPECT_FALSE(moe_k_grouped_gemm_fits(0, 20, 16, MOE_K_GG_ROWS_W));
    EXPECT_FALSE(moe_k_grouped_gemm_fits(0, 16, 12, MOE_K_GG_ROWS_WT));
    EXPECT_FALSE(moe_k_grouped_gemm_fits(36, 16, 0, MOE_K_GG_WGRAD));
    EXPECT_FALSE(moe_k_grouped_gemm_fits(0, 0, 16, MOE_K_GG_ROWS_W));
}

} // namespace
