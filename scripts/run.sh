#!/usr/bin/env bash
# run.sh - build libmoe and run the main job: one MoE layer forward + backward, with a report.
# usage: scripts/run.sh [num_tokens]
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/deps.sh
moe_need_packages "${MOE_BUILD_PACKAGES[@]}"
cmake -S . -B build -G Ninja -DCMAKE_BUILD_TYPE=Release >/dev/null
cmake --build build -j "$(nproc)" --target moe_demo
./build/moe_demo "$@"
