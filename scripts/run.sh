#!/usr/bin/env bash
# run.sh - build libmoe and run the main job: the demo (one MoE layer forward + backward, with
# a report of what it did), then moe_bench's throughput table.
# usage: scripts/run.sh [moe_bench options]     (scripts/run.sh --help: moe_bench's options)
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/deps.sh
moe_need_packages "${MOE_BUILD_PACKAGES[@]}"
cmake -S . -B build -G Ninja -DCMAKE_BUILD_TYPE=Release >/dev/null
cmake --build build -j "$(nproc)" --target moe_demo moe_bench
if [ "${1:-}" = "--help" ] || [ "${1:-}" = "-h" ]; then
    exec ./build/moe_bench --help
fi
./build/moe_demo
echo
./build/moe_bench "$@"
