/* optim.cu - the optimizer step on the GPU: one thread per element over the per-element bodies
 * of core/optim_update.h, the same code the CPU loop runs. Built with --fmad=false so products
 * and sums round as on the host: the CUDA and CPU updates agree bit for bit. */
#include "kernels/common.cuh"
#include "kernels/kernels.h"

#include "core/optim_update.h"

__global__ void optim_update_kernel(int adam, float *w, const float *g, float *m, float *v,
                                    int64_t n, moe_optim_scalars_t c) {
    for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n;
         i += (int64_t)gridDim.x * blockDim.x) {
        if (adam)
            moe_adam_update(w, g, m, v, (long long)i, &c);
        else
            moe_sgd_update(w, g, m, (long long)i, &c);
    }
}

extern "C" cudaError_t moe_k_optim_update(int adam, float *w, const float *g, float *m, float *v,
                                          int64_t n, const struct moe_optim_scalars *c,
                                          cudaStream_t stream) {
    if (n <= 0) return cudaSuccess;
    unsigned blocks = moe_k_blocks(n, 256);
    if (blocks > 8192) blocks = 8192;
    optim_update_kernel<<<blocks, 256, 0, stream>>>(adam, w, g, m, v, n, *c);
    return cudaGetLastError();
}
