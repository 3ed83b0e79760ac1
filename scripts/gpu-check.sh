#!/usr/bin/env bash
# gpu-check.sh - the whole GPU check in one command, for a machine with an NVIDIA GPU:
#   configure + build (Release, -Werror), the test suite (CPU and GPU tests), the kernel
#   benchmarks, then compute-sanitizer memcheck over the GPU tests and racecheck over a reduced
#   set. Writes logs and a markdown summary to the folder given as $1 (default: $OUT, else ./out).
#
# Works offline. What it needs beyond the CUDA toolkit, cmake and ninja:
#   - GoogleTest: an installed package, or sources in .gtest-src/ (scripts/gpu-deps.sh copies them)
#   - OpenBLAS (the CPU backend links it): the system's, or .gpu-deps/openblas.tar.xz (made by
#     scripts/gpu-deps.sh from Debian's packages) unpacked into the build folder.
# The benchmarks run before the sanitizers so that a slow sanitizer cannot starve them.
# Environment: MOE_CUDA_ARCH (default 90a), MOE_GPU_BUILD (build folder, default build-gpu),
# MOE_GPU_CHECK_BUDGET (seconds for the whole script, default 540).
set -uo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
OUTDIR=${1:-${OUT:-$ROOT/out}}
BUILD=${MOE_GPU_BUILD:-$ROOT/build-gpu}
ARCH=${MOE_CUDA_ARCH:-90a}
BUDGET=${MOE_GPU_CHECK_BUDGET:-540}
T0=$(date +%s)
mkdir -p "$OUTDIR" "$BUILD"
SUMMARY="$OUTDIR/summary.md"
rows=()
overall=0

left() { echo $((BUDGET - ($(date +%s) - T0))); }

# step NAME LOGFILE CAP_SECONDS CMD...: runs CMD under a time limit, records the result
step() {
    local name=$1 log=$2 cap=$3
    shift 3
    local lim
    lim=$(left)
    [ "$lim" -gt "$cap" ] && lim=$cap
    if [ "$lim" -le 10 ]; then
        rows+=("| $name | not run (time budget spent) | 0 s |")
        overall=1
        return 1
    fi
    local s=$(date +%s)
    echo "== $name (limit ${lim}s): $*" | tee -a "$OUTDIR/$log"
    timeout --signal=INT --kill-after=10 "$lim" "$@" >>"$OUTDIR/$log" 2>&1
    local rc=$?
    local d=$(($(date +%s) - s))
    local res="ok"
    [ $rc -ne 0 ] && res="FAILED (rc $rc)" && overall=1
    [ $rc -eq 124 ] && res="TIMED OUT after ${lim}s"
    rows+=("| $name | $res | $d s |")
    echo "== $name: $res in ${d}s"
    return $rc
}

{
    echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
    [ -f "$ROOT/COMMIT" ] && echo "commit: $(cat "$ROOT/COMMIT")"
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1
    nvcc --version | tail -2
    cmake --version | head -1
    echo "cores: $(nproc)"
} >"$OUTDIR/build.log" 2>&1
DEVICE=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1)

# ---- dependencies: OpenBLAS, GoogleTest --------------------------------------------------------
cmake_extra=()
have_sys_blas=0
if ldconfig -p 2>/dev/null | grep -q 'libopenblas\.so ' && \
   ls /usr/include/cblas.h /usr/include/*/cblas.h /usr/include/*/*/cblas.h >/dev/null 2>&1; then
    have_sys_blas=1
fi
if [ $have_sys_blas -eq 0 ]; then
    if [ -f "$ROOT/.gpu-deps/openblas.tar.xz" ]; then
        mkdir -p "$BUILD/deps"
        tar -C "$BUILD/deps" -xJf "$ROOT/.gpu-deps/openblas.tar.xz"
        export LD_LIBRARY_PATH="$BUILD/deps/openblas/lib:${LD_LIBRARY_PATH:-}"
        cmake_extra+=("-DCMAKE_PREFIX_PATH=$BUILD/deps/openblas")
        echo "OpenBLAS: carried .gpu-deps/openblas.tar.xz" >>"$OUTDIR/build.log"
    else
        echo "OpenBLAS: none on this machine and no .gpu-deps/openblas.tar.xz (run scripts/gpu-deps.sh)" \
            | tee -a "$OUTDIR/build.log"
        exit 1
    fi
else
    echo "OpenBLAS: the system's" >>"$OUTDIR/build.log"
fi
[ -d "$ROOT/.gtest-src" ] && cmake_extra+=("-DMOE_GTEST_SOURCE_DIR=$ROOT/.gtest-src")
# CUTLASS headers (the grouped expert GEMMs on sm_90a): the carried tarball, else the cache
if [ -f "$ROOT/.gpu-deps/cutlass.tar.xz" ]; then
    mkdir -p "$BUILD/deps/cutlass"
    tar -C "$BUILD/deps/cutlass" -xJf "$ROOT/.gpu-deps/cutlass.tar.xz"
    cmake_extra+=("-DMOE_CUTLASS_DIR=$BUILD/deps/cutlass/include")
    echo "CUTLASS: carried .gpu-deps/cutlass.tar.xz" >>"$OUTDIR/build.log"
else
    echo "CUTLASS: no .gpu-deps/cutlass.tar.xz (run scripts/gpu-deps.sh): cuBLAS expert GEMMs only" \
        | tee -a "$OUTDIR/build.log"
fi

# ---- build, tests, benchmarks, sanitizers -----------------------------------------------------
# ctest runs 8 programs at a time: idle OpenMP threads must sleep, and a few each are plenty for
# the CPU reference layers (16 spinning threads per program starve each other)
CORES=$(nproc --all) # before OMP_NUM_THREADS is set: nproc honours it
export OMP_WAIT_POLICY=passive OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
TB="$BUILD/tests/cuda/test_cuda_layer"
if step "configure" build.log 120 cmake -S "$ROOT" -B "$BUILD" -G Ninja -DCMAKE_BUILD_TYPE=Release \
        -DMOE_ENABLE_CUDA=ON "-DCMAKE_CUDA_ARCHITECTURES=$ARCH" "${cmake_extra[@]}" &&
   step "build (-Werror, arch $ARCH)" build.log 300 cmake --build "$BUILD" -j "$CORES"; then
    step "test suite (ctest)" ctest.log 200 ctest --test-dir "$BUILD" -j 8 --output-on-failure
    [ -x "$BUILD/tests/cuda/test_grouped_gemm" ] &&
        step "compute-sanitizer memcheck (CUTLASS grouped GEMMs)" memcheck.log 90 \
            compute-sanitizer --tool memcheck --error-exitcode 1 \
            "$BUILD/tests/cuda/test_grouped_gemm" --gtest_brief=1
    # the same GPU tests through the other code paths: the per-thread gate kernel and one
    # grouped cuBLAS call per expert GEMM (the defaults are the warp gate and a GEMM loop)
    step "GPU tests, alternate paths (MOE_CUDA_GATE=thread MOE_CUDA_GEMM=grouped)" ctest.log 150 \
        env MOE_CUDA_GATE=thread MOE_CUDA_GEMM=grouped "$TB" --gtest_brief=1
    step "kernel benchmarks" bench.log 150 "$BUILD/moe_kernel_bench"
    # the benchmark's table is the tail of its log
    sed -n '/^## libmoe kernel benchmark/,$p' "$OUTDIR/bench.log" >"$OUTDIR/bench.md"
    # the whole layer through the public API: moe_bench against the CPU layer, the presets,
    # and the PyTorch peers on the same shapes (python3 with torch is on the GPU machines)
    MB="$BUILD/moe_bench"
    step "moe_bench --check (CUDA vs CPU layer, f32)" moebench.log 90 \
        "$MB" --backend cuda --check -b 256 -e 4096 -f 4
    step "moe_bench --local-ranks 4 --check (expert parallel on one GPU vs the CPU layer)" \
        moebench.log 90 "$MB" --backend cuda --local-ranks 4 --check -t 2048
    step "moe_bench mixtral bf16 (T 8192)" moebench.log 90 \
        "$MB" --backend cuda --preset mixtral --dtype bf16 -t 8192 -w 2 -n 5
    # deepseek's 256 experts are 15 GB of bf16 weights initialised on the host: time one rank's
    # share of an 8-way expert-parallel layer (32 experts) instead
    step "moe_bench deepseek bf16, 32 of 256 experts (T 8192)" moebench.log 120 \
        "$MB" --backend cuda --preset deepseek -E 32 --dtype bf16 -t 8192 -w 2 -n 5
    step "torch peers, mixtral shape (T 8192)" peers.log 120 \
        python3 "$ROOT/bench/peers/torch_moe.py" --device cuda --peer all --tokens 8192 \
        --d-model 4096 --d-ff 14336 --experts 8 --top-k 2 --activation swiglu --warmup 2 --iters 5
    # the Python binding's GPU tests (libmoe.torch and the ctypes layer on CUDA, against the CPU
    # layer), when the machine's python3 has numpy, pytest and torch with CUDA
    if python3 -c 'import numpy, pytest, torch; assert torch.cuda.is_available()' 2>/dev/null; then
        step "pytest (Python binding, CUDA tests included)" pytest.log 90 \
            env OMP_NUM_THREADS=1 LIBMOE_PATH="$BUILD/libmoe.so" \
            python3 -m pytest -q -p no:cacheprovider "$ROOT/python/tests"
    else
        rows+=("| pytest (Python binding) | skipped: no python3 with numpy, pytest and CUDA torch | 0 s |")
    fi
    # several GPUs: the NCCL layer under mpirun, one GPU per rank, checked against the float64
    # reference (--check), and its exchange against the NCCL all-to-all ceiling of the same bytes
    # (the ceil column); on one GPU this part is skipped and says so
    NGPU=$(nvidia-smi --query-gpu=index --format=csv,noheader 2>/dev/null | wc -l)
    if [ "$NGPU" -ge 2 ] && command -v mpirun >/dev/null 2>&1; then
        step "mpirun -np $NGPU moe_bench --check (NCCL, 1 GPU per rank)" moebench.log 90 \
            mpirun -np "$NGPU" --allow-run-as-root "$MB" --backend cuda --check -t 2048
        step "mpirun -np $NGPU moe_bench mixtral bf16 (NCCL, ceiling at equal bytes)" moebench.log 120 \
            mpirun -np "$NGPU" --allow-run-as-root "$MB" --backend cuda --preset mixtral \
            --dtype bf16 -t 8192 -w 2 -n 5
    else
        rows+=("| expert parallelism over NCCL on several GPUs | skipped: $NGPU GPU(s) on this machine | 0 s |")
    fi
    step "compute-sanitizer memcheck (GPU tests)" memcheck.log 200 \
        compute-sanitizer --tool memcheck --error-exitcode 1 --leak-check full \
        "$TB" --gtest_brief=1
    if [ -x "$BUILD/tests/cuda/test_cuda_ep" ]; then
        step "compute-sanitizer memcheck (expert parallel + balancing GPU tests)" memcheck.log 120 \
            compute-sanitizer --tool memcheck --error-exitcode 1 --leak-check full \
            "$BUILD/tests/cuda/test_cuda_ep" --gtest_brief=1 '--gtest_filter=-*Nccl*'
        # NCCL probes kernels of other architectures (cudaErrorNoKernelImageForDevice, which
        # memcheck counts as errors): its test runs without the sanitizer
        step "NCCL communicator test (1 rank)" ctest.log 60 \
            "$BUILD/tests/cuda/test_cuda_ep" --gtest_brief=1 '--gtest_filter=*Nccl*'
    fi
    step "compute-sanitizer racecheck (reduced set)" racecheck.log 120 \
        compute-sanitizer --tool racecheck --error-exitcode 1 \
        "$TB" --gtest_brief=1 '--gtest_filter=*K2_E16_gelu*:*T1_K2_E4*:*T64_K8_E64*:CudaLayerDeterminism*'
fi

# ---- summary ----------------------------------------------------------------------------------
{
    echo "# gpu-check on ${DEVICE:-unknown device}"
    echo
    echo "date $(date -u +%Y-%m-%dT%H:%M:%SZ)${ROOT:+, tree $( [ -f "$ROOT/COMMIT" ] && cat "$ROOT/COMMIT" || echo 'without COMMIT file')}"
    echo
    echo "| step | result | time |"
    echo "|---|---|---:|"
    printf '%s\n' "${rows[@]}"
    echo
    if [ -f "$OUTDIR/ctest.log" ]; then
        echo '```'
        grep -E "tests passed|tests failed|Skipped|\*\*\*Failed|Not Run" "$OUTDIR/ctest.log" | head -40
        echo '```'
    fi
    for t in memcheck racecheck; do
        [ -f "$OUTDIR/$t.log" ] && echo "$t: $(grep -E 'ERROR SUMMARY|RACECHECK SUMMARY' "$OUTDIR/$t.log" | tail -1)"
    done
    echo
    [ -s "$OUTDIR/bench.md" ] && cat "$OUTDIR/bench.md"
} >"$SUMMARY"
cat "$SUMMARY"
exit $overall
