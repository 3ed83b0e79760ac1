/* common.cuh - what every .cu of kernels/ shares: storage-type conversions and dispatch. */
#ifndef MOE_KERNELS_COMMON_CUH
#define MOE_KERNELS_COMMON_CUH

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stdint.h>

/* values of moe_dtype_t (moe.h is C; kept in sync by a static check in the backend) */
#define MOE_K_F32 0
#define MOE_K_BF16 1
#define MOE_K_F16 2

__device__ __forceinline__ float moe_ld(const float *p) { return *p; }
__device__ __forceinline__ float moe_ld(const __nv_bfloat16 *p) { return __bfloat162float(*p); }
__device__ __forceinline__ float moe_ld(const __half *p) { return __half2float(*p); }
__device__ __forceinline__ void moe_st(float *p, float v) { *p = v; }
__device__ __forceinline__ void moe_st(__nv_bfloat16 *p, float v) { *p = __float2bfloat16(v); }
__device__ __forceinline__ void moe_st(__half *p, float v) { *p = __float2half(v); }

/* runs BODY with `scalar_t` bound to the storage type of dtype */
#define MOE_K_DISPATCH(dtype, ...)                                                         \
    do {                                                                                   \
        if ((dtype) == MOE_K_BF16) {                                                       \
            typedef __nv_bfloat16 scalar_t;                                                \
            __VA_ARGS__;                                                                   \
        } else if ((dtype) == MOE_K_F16) {                                                 \
            typedef __half scalar_t;                                                       \
            __VA_ARGS__;                                                                   \
        } else {                                                                           \
            typedef float scalar_t;                                                        \
            __VA_ARGS__;                                                                   \
        }                                                                                  \
    } while (0)

static inline unsigned moe_k_blocks(int64_t n, int threads) {
    int64_t b = (n + threads - 1) / threads;
    return (unsigned)(b > 0 ? b : 1);
}

/* 16-byte vector of storage values */
template <typename S> struct moe_vec {
    static constexpr int n = 16 / sizeof(S);
};

#endif
