#!/usr/bin/env bash
# fuzz.sh - build the libFuzzer targets (clang, ASan + UBSan + LeakSanitizer, CPU backend) in
# build-fuzz/ and run each on its seed corpus in tests/fuzz/corpus/<target>.
# usage: scripts/fuzz.sh [SECONDS_PER_TARGET] [TARGET...]   (default 20 s, every target)
# A crash, leak or sanitizer report fails the run and leaves the input as build-fuzz/crash-*.
# New inputs the fuzzer finds go to build-fuzz/corpus/<target>, never into the repository's seeds.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/deps.sh
moe_need_packages clang libclang-rt-14-dev libomp-dev cmake ninja-build libopenblas-openmp-dev \
    libopenmpi-dev
secs=${1:-20}
shift || true
targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=(fuzz_layer)
CC=clang CXX=clang++ cmake -S . -B build-fuzz -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo \
    -DMOE_BUILD_FUZZ=ON -DMOE_ENABLE_CUDA=OFF -DMOE_BUILD_TESTS=OFF -DMOE_BUILD_BENCH=OFF >/dev/null
cmake --build build-fuzz -j "$(nproc)" --target "${targets[@]}"
export OMP_NUM_THREADS=1 OMP_WAIT_POLICY=passive
export ASAN_OPTIONS=${ASAN_OPTIONS:-detect_leaks=1:abort_on_error=1}
export UBSAN_OPTIONS=${UBSAN_OPTIONS:-print_stacktrace=1:halt_on_error=1}
for t in "${targets[@]}"; do
    work=build-fuzz/corpus/$t
    mkdir -p "$work"
    echo "== $t: ${secs}s"
    # -max_total_time bounds the run; the stats line at exit gives the executions
    rc=0
    build-fuzz/tests/fuzz/$t -max_total_time="$secs" -print_final_stats=1 -timeout=10 \
        -rss_limit_mb=2048 -artifact_prefix=build-fuzz/ "$work" "tests/fuzz/corpus/$t" \
        >"build-fuzz/$t.log" 2>&1 || rc=$?
    grep -E "stat::number_of_executed_units|ERROR|SUMMARY|runtime error|fuzz_layer.c:" \
        "build-fuzz/$t.log" | head -20 || true
    [ "$rc" -eq 0 ] || { echo "$t: FAILED (log: build-fuzz/$t.log)" >&2; exit 1; }
done
