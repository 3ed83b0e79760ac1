#!/usr/bin/env bash
# soak.sh - 10,000 forward + backward iterations with changing token counts (0 and 1 included),
# on 1 rank and on 4 local ranks, each sequence run twice: resident memory must stay flat after
# the warm-up and the outputs must be bitwise repeatable (tests/soak/soak.c).
# usage: scripts/soak.sh [BUILD_DIR] [ITERATIONS]   (default build/, 10000); builds moe_soak there
set -euo pipefail
cd "$(dirname "$0")/.."
dir=${1:-build}
iters=${2:-10000}
[ -f "$dir/CMakeCache.txt" ] || cmake -S . -B "$dir" -G Ninja -DCMAKE_BUILD_TYPE=Release >/dev/null
cmake --build "$dir" --target moe_soak >/dev/null
export OMP_NUM_THREADS=1 OMP_WAIT_POLICY=passive
for ranks in 1 4; do
    /usr/bin/time -f "  %e s wall, max rss %M KiB" "$dir/tests/moe_soak" --iters "$iters" \
        --ranks "$ranks"
done
