#!/usr/bin/env bash
# valgrind.sh - one memcheck pass over the CPU test binaries of a build (default build/): the
# API, edge, hardening, optimizer and trace-reader suites, whole, plus a filtered set of the
# layer and expert-parallel tests (the full grids cost tens of minutes under valgrind).
# usage: scripts/valgrind.sh [BUILD_DIR]
# Fails on any memcheck error or definite leak (--error-exitcode); one OpenMP thread.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/deps.sh
moe_need_packages valgrind
dir=${1:-build}
export OMP_NUM_THREADS=1 OMP_WAIT_POLICY=passive
vg=(valgrind --quiet --error-exitcode=99 --leak-check=full --errors-for-leak-kinds=definite
    --show-leak-kinds=definite --track-origins=no)
run() {
    local bin=$1 filter=$2
    echo "== valgrind $bin ${filter}"
    "${vg[@]}" "$dir/tests/$bin" --gtest_brief=1 --gtest_filter="$filter" >"$dir/valgrind-$bin.log" 2>&1 ||
        { tail -40 "$dir/valgrind-$bin.log" >&2; echo "valgrind: $bin failed" >&2; exit 1; }
}
# (not the 8 GiB host buffers of ApiAlloc.HugeBatch*: valgrind zeroes them for minutes)
run test_api '-ApiAlloc.HugeBatch*'
run test_edge '*'
run test_hardening '*'
run test_optim '*'
run test_trace_read '*'
run test_layer 'LayerInit.*:LayerNoise.*:Grid/LayerVsReference.ForwardBackwardMatch/c0_*:Grid/LayerVsReference.ForwardBackwardMatch/c9_*:Grid/LayerVsReference.ForwardBackwardMatch/c13_*'
run test_ep_local 'EpLocalErrors.BadArguments:EpLocalChunks.*:Grid/EpLocal.DroplessMatchesSingleRank/1:Grid/EpLocal.DroplessMatchesSingleRank/4'
echo "valgrind: OK"
