#!/usr/bin/env bash
# fuzz.sh - build the libFuzzer targets (clang, ASan + UBSan + LeakSanitizer, CPU backend) in
# build-fuzz/ and run each on its seed corpus in tests/fuzz/corpus/<target>.
# usage: scripts/fuzz.sh [SECONDS_PER_TARGET] [TARGET...]   (default 20 s, every target: each
#        tests/fuzz/fuzz_<name>.c)
#        MOE_FUZZ_RUNS=N instead bounds each target to N executions (-runs=N)
# A crash, leak or sanitizer report fails the run and leaves the input as build-fuzz/crash-*.
# New inputs the fuzzer finds go to build-fuzz/corpus/<target>, never into the repository's seeds.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/deps.sh
moe_need_packages "${MOE_HARDENING_PACKAGES[@]}" cmake ninja-build libopenblas-openmp-dev \
    libopenmpi-dev
secs=${1:-20}
shift || true
targets=("$@")
# default: every target of tests/fuzz (each fuzz_<name>.c is one, with corpus/fuzz_<name>)
if [ ${#targets[@]} -eq 0 ]; then
    for src in tests/fuzz/fuzz_*.c; do targets+=("$(basename "$src" .c)"); done
fi
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
    bound=(-max_total_time="$secs")
    [ -z "${MOE_FUZZ_RUNS:-}" ] || bound+=(-runs="$MOE_FUZZ_RUNS")
    seeds=()
    [ ! -d "tests/fuzz/corpus/$t" ] || seeds=("tests/fuzz/corpus/$t")
    build-fuzz/tests/fuzz/$t "${bound[@]}" -print_final_stats=1 -timeout=10 \
        -rss_limit_mb=2048 -artifact_prefix=build-fuzz/ "$work" "${seeds[@]}" \
        >"build-fuzz/$t.log" 2>&1 || rc=$?
    grep -E "stat::number_of_executed_units|ERROR|SUMMARY|runtime error|fuzz_[a-z_]*\.c:" \
        "build-fuzz/$t.log" | head -20 || true
    [ "$rc" -eq 0 ] || { echo "$t: FAILED (log: build-fuzz/$t.log)" >&2; exit 1; }
done
