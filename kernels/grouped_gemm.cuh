// grouped_gemm.cuh - the CUTLASS ptr-array grouped GEMMs behind moe_k_grouped_gemm: one kernel
// type per (operand type, output type, kind), a setup kernel that writes each group's shape,
// pointers and strides from the device offsets, and the host launch. Included once per operand
// type (grouped_gemm_bf16.cu, grouped_gemm_f16.cu) so the two halves compile in parallel.
#pragma once

#include <cutlass/cutlass.h>
#include <cutlass/epilogue/collective/collective_builder.hpp>
#include <cutlass/gemm/collective/collective_builder.hpp>
#include <cutlass/gemm/device/gemm_universal_adapter.h>
#include <cutlass/gemm/dispatch_policy.hpp>
#include <cutlass/gemm/group_array_problem_shape.hpp>
#include <cutlass/gemm/kernel/gemm_universal.hpp>
#include <cutlass/kernel_hardware_info.h>
#include <cute/tensor.hpp>

#include "kernels/grouped_gemm.h"

namespace moe_gg {

using ProblemShape = cutlass::gemm::GroupProblemShape<cute::Shape<int, int, int>>;
using Shape3 = ProblemShape::UnderlyingProblemShape;

// operand layouts in CUTLASS's terms (A is M x K, B is K x N, C is M x N, row-major C):
// rows (m, K) are row-major A; W (K, N) is row-major B; W (N, K) used as W^T is column-major B;
// rows (m, M) used as A^T (M, m) are column-major A
template <int Kind> struct Layouts;
template <> struct Layouts<MOE_K_GG_ROWS_W> {
    using A = cutlass::layout::RowMajor;
    using B = cutlass::layout::RowMajor;
};
template <> struct Layouts<MOE_K_GG_ROWS_WT> {
    using A = cutlass::layout::RowMajor;
    using B = cutlass::layout::ColumnMajor;
};
template <> struct Layouts<MOE_K_GG_WGRAD> {
    using A = cutlass::layout::ColumnMajor;
    using B = cutlass::layout::RowMajor;
};

// one tile shape for every kind: 128 x 128 output tiles, cooperative (two consumer warp groups),
// no cluster, so any group row count works; stage count from what the epilogue leaves
template <class T, class TC, int Kind> struct Gemm {
    using LayoutA = typename Layouts<Kind>::A;
    using LayoutB = typename Layouts<Kind>::B;
    using LayoutC = cutlass::layout::RowMajor;
    static constexpr int kAlignAB = 16 / sizeof(T);
    static constexpr int kAlignC = 16 / sizeof(TC);
    using TileShape = cute::Shape<cute::_128, cute::_128, cute::_64>;
    using ClusterShape = cute::Shape<cute::_1, cute::_1, cute::_1>;
    using Epilogue = typename cutlass::epilogue::collective::CollectiveBuilder<
        cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, TileShape, ClusterShape,
        cutlass::epilogue::collective::EpilogueTileAuto, float, float, TC, LayoutC *, kAlignC, TC,
        LayoutC *, kAlignC, cutlass::epilogue::PtrArrayTmaWarpSpecializedCooperative,
        cutlass::epilogue::fusion::LinearCombination<TC, float>>::CollectiveOp;
    using Mainloop = typename cutlass::gemm::collective::CollectiveBuilder<
        cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, T, LayoutA *, kAlignAB, T, LayoutB *,
        kAlignAB, float, TileShape, ClusterShape,
        cutlass::gemm::collective::StageCountAutoCarveout<static_cast<int>(
            sizeof(typename Epilogue::SharedStorage))>,
        cutlass::gemm::KernelPtrArrayTmaWarpSpecializedCooperative>::CollectiveOp;
    using Kernel = cutlass::gemm::kernel::GemmUniversal<ProblemShape, Mainloop, Epilogue>;
    using Device = cutlass::gemm::device::GemmUniversalAdapter<Kernel>;
    using StrideA = typename Kernel::InternalStrideA;
    using StrideB = typename Kernel::InternalStrideB;
    using StrideC = typename Kernel::InternalStrideC;
    using StrideD = typename Kernel::InternalStrideD;
};

// the per-group arrays CUTLASS reads, carved from the caller's scratch
template <class GM, class T, class TC> struct Arrays {
    Shape3 *shape;
    const T **a;
    const T **b;
    const TC **c;
    TC **d;
    typename GM::StrideA *sa;
    typename GM::StrideB *sb;
    typename GM::StrideC *sc;
    typename GM::StrideD *sd;
    void *workspace;
    size_t workspace_bytes;
};

constexpr size_t kAlign = 256;

inline size_t align_up(size_t n) { return (n + kAlign - 1) / kAlign * kAlign; }

// the arrays' byte offsets in the scratch, in carve order; returns the bytes they take
template <class GM, class T, class TC> inline size_t layout(int64_t G, size_t off[9]) {
    const size_t g = static_cast<size_t>(G);
    const size_t sizes[9] = {g * sizeof(Shape3),
                             g * sizeof(T *),
                             g * sizeof(T *),
                             g * sizeof(TC *),
                             g * sizeof(TC *),
                             g * sizeof(typename GM::StrideA),
                             g * sizeof(typename GM::StrideB),
                             g * sizeof(typename GM::StrideC),
                             g * sizeof(typename GM::StrideD)};
    size_t used = 0;
    for (int i = 0; i < 9; ++i) {
        off[i] = used;
        used += align_up(sizes[i]);
    }
    return used;
}

template <class GM, class T, class TC>
inline Arrays<GM, T, TC> carve(void *scratch, int64_t G, size_t bytes) {
    size_t off[9];
    const size_t used = layout<GM, T, TC>(G, off);
    char *p = static_cast<char *>(scratch);
    Arrays<GM, T, TC> r;
    r.shape = reinterpret_cast<Shape3 *>(p + off[0]);
    r.a = reinterpret_cast<const T **>(p + off[1]);
    r.b = reinterpret_cast<const T **>(p + off[2]);
    r.c = reinterpret_cast<const TC **>(p + off[3]);
    r.d = reinterpret_cast<TC **>(p + off[4]);
    r.sa = reinterpret_cast<typename GM::StrideA *>(p + off[5]);
    r.sb = reinterpret_cast<typename GM::StrideB *>(p + off[6]);
    r.sc = reinterpret_cast<typename GM::StrideC *>(p + off[7]);
    r.sd = reinterpret_cast<typename GM::StrideD *>(p + off[8]);
    r.workspace = p + used;
    r.workspace_bytes = bytes > used ? bytes - used : 0;
    return r;
}

// every stride type here has one dynamic mode: the leading dimension of a packed operand
template <class S> __device__ inline S lead_stride(int64_t ld) {
    S s{};
    if constexpr (cute::is_static<cute::remove_cvref_t<decltype(cute::get<0>(s))>>::value)
        cute::get<1>(s) = ld;
    else
        cute::get<0>(s) = ld;
    return s;
}

// one thread per group: shape, operand pointers and strides from the group's row range.
// A group with no rows gets no tiles (M = 0), also as a weight gradient, whose K would be 0: a
// tile with no k-steps would store its unset accumulators.
template <class GM, class T, class TC, int Kind>
__global__ void setup_kernel(Arrays<GM, T, TC> r, const int64_t *off, int64_t G, int64_t M,
                             int64_t N, int64_t K, const T *A, const T *B, TC *C) {
    const int64_t g = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
    if (g >= G) return;
    const int64_t r0 = off[g], m = off[g + 1] - off[g];
    if (Kind == MOE_K_GG_WGRAD) {
        r.shape[g] = Shape3(m > 0 ? static_cast<int>(M) : 0, static_cast<int>(N),
                            static_cast<int>(m));
        r.a[g] = A + r0 * M;
        r.b[g] = B + r0 * N;
        r.d[g] = C + g * M * N;
        r.sa[g] = lead_stride<typename GM::StrideA>(M);
        r.sb[g] = lead_stride<typename GM::StrideB>(N);
    } else {
        r.shape[g] = Shape3(static_cast<int>(m), static_cast<int>(N), static_cast<int>(K));
        r.a[g] = A + r0 * K;
        r.b[g] = B + g * K * N;
        r.d[g] = C + r0 * N;
        r.sa[g] = lead_stride<typename GM::StrideA>(K);
        r.sb[g] = lead_stride<typename GM::StrideB>(Kind == MOE_K_GG_ROWS_W ? N : K);
    }
    r.c[g] = r.d[g];
    r.sc[g] = lead_stride<typename GM::StrideC>(N);
    r.sd[g] = lead_stride<typename GM::StrideD>(N);
}

inline cutlass::KernelHardwareInfo hardware(int device) {
    cutlass::KernelHardwareInfo hw;
    hw.device_id = device;
    hw.sm_count = cutlass::KernelHardwareInfo::query_device_multiprocessor_count(device);
    return hw;
}

template <class GM, class T, class TC>
typename GM::Device::Arguments arguments(const Arrays<GM, T, TC> &r, int64_t G, int beta_one,
                                         const cutlass::KernelHardwareInfo &hw) {
    typename GM::Device::Arguments args;
    args.mode = cutlass::gemm::GemmUniversalMode::kGrouped;
    // shapes on the device only: the kernel's tile scheduler reads them there
    args.problem_shape = {static_cast<int>(G), r.shape, nullptr};
    args.mainloop = {r.a, r.sa, r.b, r.sb};
    args.epilogue.thread.alpha = 1.0f;
    args.epilogue.thread.beta = beta_one ? 1.0f : 0.0f;
    args.epilogue.ptr_C = beta_one ? r.c : nullptr; // beta 0: C is never read
    args.epilogue.dC = r.sc;
    args.epilogue.ptr_D = r.d;
    args.epilogue.dD = r.sd;
    args.hw_info = hw;
    return args;
}

template <class T, class TC, int Kind> size_t workspace_bytes(int64_t G, int device) {
    using GM = Gemm<T, TC, Kind>;
    size_t off[9];
    const size_t arrays = layout<GM, T, TC>(G, off);
    // the workspace depends on the group count and the device, not on where the arrays are
    Arrays<GM, T, TC> r{};
    return arrays + align_up(GM::Device::get_workspace_size(arguments(r, G, 1, hardware(device))));
}

template <class T, class TC, int Kind>
cudaError_t run(const moe_k_grouped_gemm_args_t *a, cudaStream_t stream) {
    using GM = Gemm<T, TC, Kind>;
    const int64_t G = a->num_groups;
    if (G == 0) return cudaSuccess;
    Arrays<GM, T, TC> r = carve<GM, T, TC>(a->scratch, G, a->scratch_bytes);
    const int threads = 128;
    const unsigned blocks = static_cast<unsigned>((G + threads - 1) / threads);
    setup_kernel<GM, T, TC, Kind><<<blocks, threads, 0, stream>>>(
        r, a->offsets, G, a->M, a->N, a->K, static_cast<const T *>(a->A),
        static_cast<const T *>(a->B), static_cast<TC *>(a->C));
    cudaError_t e = cudaGetLastError();
    if (e != cudaSuccess) return e;
    int device = 0;
    e = cudaGetDevice(&device);
    if (e != cudaSuccess) return e;
    typename GM::Device::Arguments args = arguments(r, G, a->beta_one, hardware(device));
    typename GM::Device gemm;
    if (gemm.can_implement(args) != cutlass::Status::kSuccess) return cudaErrorNotSupported;
    if (GM::Device::get_workspace_size(args) > r.workspace_bytes) return cudaErrorInvalidValue;
    if (gemm.initialize(args, r.workspace, stream) != cutlass::Status::kSuccess)
        return cudaErrorLaunchFailure;
    if (gemm.run(stream) != cutlass::Status::kSuccess) {
        e = cudaGetLastError();
        return e != cudaSuccess ? e : cudaErrorLaunchFailure;
    }
    return cudaGetLastError();
}

// the five GEMMs of an expert FFN for operand type T: forward H (f32 out) and Y (T out), dgrad
// dA (f32 out) and dX (T out), weight gradients (T out, accumulated)
template <class T>
cudaError_t launch(const moe_k_grouped_gemm_args_t *a, cudaStream_t stream) {
    switch (a->kind) {
    case MOE_K_GG_ROWS_W:
        return a->c_f32 ? run<T, float, MOE_K_GG_ROWS_W>(a, stream)
                        : run<T, T, MOE_K_GG_ROWS_W>(a, stream);
    case MOE_K_GG_ROWS_WT:
        return a->c_f32 ? run<T, float, MOE_K_GG_ROWS_WT>(a, stream)
                        : run<T, T, MOE_K_GG_ROWS_WT>(a, stream);
    case MOE_K_GG_WGRAD:
        return a->c_f32 ? cudaErrorNotSupported : run<T, T, MOE_K_GG_WGRAD>(a, stream);
    default: return cudaErrorInvalidValue;
    }
}

template <class T> size_t max_workspace(int64_t G, int device) {
    size_t w[5] = {workspace_bytes<T, float, MOE_K_GG_ROWS_W>(G, device),
                   workspace_bytes<T, T, MOE_K_GG_ROWS_W>(G, device),
                   workspace_bytes<T, float, MOE_K_GG_ROWS_WT>(G, device),
                   workspace_bytes<T, T, MOE_K_GG_ROWS_WT>(G, device),
                   workspace_bytes<T, T, MOE_K_GG_WGRAD>(G, device)};
    size_t m = 0;
    for (size_t v : w) m = v > m ? v : m;
    return m;
}

} // namespace moe_gg
