/* tool_util.c - the helpers of tool_util.h: mpirun detection, backend memory, dtype conversion
 * and enumeration names, shared by moe_bench, moe_trace and the examples. */
#include "tool_util.h"

#include <stdlib.h>
#include <string.h>

#ifdef MOE_TOOL_CUDA
#include <cuda_runtime_api.h>
#endif

#include "core/dtype.h"

int tool_under_mpi(void) {
    return getenv("OMPI_COMM_WORLD_SIZE") || getenv("PMI_SIZE") || getenv("PMIX_RANK");
}

int tool_local_rank(void) {
    const char *v = getenv("OMPI_COMM_WORLD_LOCAL_RANK");
    if (!v) v = getenv("MPI_LOCALRANKID");
    if (!v) v = getenv("SLURM_LOCALID");
    return v ? atoi(v) : -1;
}

void *tool_mem_alloc(const tool_mem_t *m, size_t bytes) {
#ifdef MOE_TOOL_CUDA
    if (m->gpu) {
        void *p = NULL;
        return cudaMalloc(&p, bytes ? bytes : 1) == cudaSuccess ? p : NULL;
    }
#endif
    (void)m;
    return malloc(bytes ? bytes : 1);
}

void tool_mem_free(const tool_mem_t *m, void *p) {
    if (!p) return;
#ifdef MOE_TOOL_CUDA
    if (m->gpu) {
        cudaFree(p);
        return;
    }
#endif
    (void)m;
    free(p);
}

int tool_mem_copy(const tool_mem_t *m, void *dst, const void *src, size_t bytes, tool_copy_t kind) {
#ifdef MOE_TOOL_CUDA
    if (m->gpu) {
        enum cudaMemcpyKind k = kind == TOOL_COPY_TO_BACKEND ? cudaMemcpyHostToDevice
                                : kind == TOOL_COPY_TO_HOST  ? cudaMemcpyDeviceToHost
                                                             : cudaMemcpyDeviceToDevice;
        return cudaMemcpy(dst, src, bytes, k) == cudaSuccess ? 0 : -1;
    }
#endif
    (void)m, (void)kind;
    if (bytes) memcpy(dst, src, bytes);
    return 0;
}

int tool_mem_sync(const tool_mem_t *m) {
#ifdef MOE_TOOL_CUDA
    if (m->gpu) return cudaDeviceSynchronize() == cudaSuccess ? 0 : -1;
#endif
    (void)m;
    return 0;
}

void tool_to_dtype(moe_dtype_t t, const float *src, void *dst, int64_t n) {
    if (t == MOE_DTYPE_F32) {
        if (n) memcpy(dst, src, (size_t)n * 4);
        return;
    }
    uint16_t *d = (uint16_t *)dst;
    for (int64_t i = 0; i < n; ++i)
        d[i] = t == MOE_DTYPE_BF16 ? moe_f32_to_bf16(src[i]) : moe_f32_to_f16(src[i]);
}

void tool_from_dtype(moe_dtype_t t, const void *src, float *dst, int64_t n) {
    if (t == MOE_DTYPE_F32) {
        if (n) memcpy(dst, src, (size_t)n * 4);
        return;
    }
    const uint16_t *s = (const uint16_t *)src;
    for (int64_t i = 0; i < n; ++i)
        dst[i] = t == MOE_DTYPE_BF16 ? moe_bf16_to_f32(s[i]) : moe_f16_to_f32(s[i]);
}

int tool_round_to_dtype(moe_dtype_t t, float *v, int64_t n) {
    if (t == MOE_DTYPE_F32) return 0;
    void *raw = malloc((size_t)(n ? n : 1) * moe_dtype_size(t));
    if (!raw) return -1;
    tool_to_dtype(t, v, raw, n);
    tool_from_dtype(t, raw, v, n);
    free(raw);
    return 0;
}

float *tool_fetch_f32(const tool_mem_t *m, moe_dtype_t t, const void *src, int64_t n) {
    size_t bytes = (size_t)n * moe_dtype_size(t);
    void *raw = malloc(bytes ? bytes : 1);
    float *out = malloc((size_t)(n ? n : 1) * sizeof(float));
    if (!raw || !out || tool_mem_copy(m, raw, src, bytes, TOOL_COPY_TO_HOST) != 0) {
        free(raw), free(out);
        return NULL;
    }
    tool_from_dtype(t, raw, out, n);
    free(raw);
    return out;
}

const char *const tool_activation_names[4] = {"relu", "gelu", "silu", "swiglu"};
const char *const tool_gate_names[2] = {"softmax-of-topk", "topk-of-softmax"};
const char *const tool_priority_names[2] = {"position", "score"};
