#!/usr/bin/env bash
# bench-peers.sh - libmoe's layer against the naive PyTorch MoE layer (bench/peers/torch_moe.py) on
# the same shapes, in one go: peer, ours, peer, ours, ... (alternating, because the machine is
# noisy), then the medians and the ratio libmoe tokens/s / peer tokens/s for forward and
# forward+backward, as a markdown table ready to paste into docs/cpu-performance.md.
#
# usage: scripts/bench-peers.sh [options]
#   --rounds N       alternations (default 3: three runs of each)
#   --threads N      OpenMP + OpenBLAS threads for libmoe, torch.set_num_threads for the peer (2)
#   --tokens T  --d-model D  --d-ff F  --experts E  --top-k K  --activation A
#                    shapes (default 4096 512 2048 8 2 gelu: docs/cpu-performance.md)
#   --warmup N  --iters N   per run (default 2 and 5)
#   --build DIR      build directory of moe_bench (default build; built if needed)
#   --device cpu|cuda  cuda: libmoe's CUDA backend against the peers on the GPU (naive, and
#                    torch._grouped_mm where present)
#   --out DIR        keep every run's JSON here (default: a temporary directory)
set -euo pipefail
cd "$(dirname "$0")/.."

rounds=3 threads=2 tokens=4096 dmodel=512 dff=2048 experts=8 topk=2 act=gelu
warmup=2 iters=5 build=build device=cpu out=""
while [ $# -gt 0 ]; do
    case "$1" in
    --rounds) rounds=$2; shift 2 ;;
    --threads) threads=$2; shift 2 ;;
    --tokens) tokens=$2; shift 2 ;;
    --d-model) dmodel=$2; shift 2 ;;
    --d-ff) dff=$2; shift 2 ;;
    --experts) experts=$2; shift 2 ;;
    --top-k) topk=$2; shift 2 ;;
    --activation) act=$2; shift 2 ;;
    --warmup) warmup=$2; shift 2 ;;
    --iters) iters=$2; shift 2 ;;
    --build) build=$2; shift 2 ;;
    --device) device=$2; shift 2 ;;
    --out) out=$2; shift 2 ;;
    -h | --help) sed -n '2,19p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "bench-peers.sh: unknown option '$1' (try --help)" >&2; exit 2 ;;
    esac
done

# ---- the Python that can import torch (Debian's python3-torch installs for /usr/bin/python3) ----
pick_python() {
    local c
    for c in /usr/bin/python3 python3 python; do
        if command -v "$c" >/dev/null 2>&1 && "$c" -c 'import torch, numpy' >/dev/null 2>&1; then
            command -v "$c"
            return 0
        fi
    done
    return 1
}
if ! py=$(pick_python); then
    source scripts/deps.sh
    moe_need_packages python3-torch python3-numpy || exit 1
    py=$(pick_python) || { echo "bench-peers.sh: no python can import torch" >&2; exit 1; }
fi

# ---- moe_bench, built (incrementally) from this tree -------------------------------------------
source scripts/deps.sh
moe_need_packages "${MOE_BUILD_PACKAGES[@]}"
if [ ! -f "$build/CMakeCache.txt" ]; then
    cmake -S . -B "$build" -G Ninja -DCMAKE_BUILD_TYPE=Release >/dev/null
fi
cmake --build "$build" --target moe_bench >/dev/null
bench="$build/moe_bench"

if [ -z "$out" ]; then
    out=$(mktemp -d)
    trap 'rm -rf "$out"' EXIT
fi
mkdir -p "$out"

backend=cpu peer_set=naive
if [ "$device" = cuda ]; then backend=cuda peer_set=all; fi
shape=(--tokens "$tokens" --d-model "$dmodel" --d-ff "$dff" --experts "$experts" --top-k "$topk"
       --activation "$act")

echo "# bench-peers.sh: T $tokens  D $dmodel  F $dff  E $experts  K $topk  $act  threads $threads" \
     " rounds $rounds  warmup $warmup  iters $iters  device $device"
echo "# $(date -u '+%Y-%m-%d %H:%M UTC')  $(uname -m)  $(grep -m1 'model name' /proc/cpuinfo 2>/dev/null |
      sed 's/.*: //')  nproc $(nproc)  load average before: $(cut -d' ' -f1-3 /proc/loadavg)"
echo "# peer python: $py  ($("$py" -c 'import torch; print("torch", torch.__version__)'))"
echo "# tree $(git rev-parse --short HEAD 2>/dev/null || echo '?')$(git diff --quiet 2>/dev/null || echo '+dirty')" \
     " $(cc --version | head -1)  libopenblas.so.0 -> $(readlink -f "$(ldconfig -p 2>/dev/null |
        awk '/libopenblas.so.0 /{print $NF; exit}')" 2>/dev/null || echo '?')"
for r in $(seq 1 "$rounds"); do
    "$py" bench/peers/torch_moe.py "${shape[@]}" --threads "$threads" --warmup "$warmup" \
        --iters "$iters" --device "$device" --peer "$peer_set" --json "$out/peer.$r.json" |
        grep '^peer' | sed "s/^/# round $r: /"
    "$bench" "${shape[@]}" --threads "$threads" --warmup "$warmup" --iters "$iters" \
        --backend "$backend" --mode fwd-bwd --json "$out/moe.$r.json" >"$out/moe.$r.txt"
    "$py" - "$out/moe.$r.json" "$r" <<'EOF'
import json, sys
d = json.load(open(sys.argv[1]))
x = d["results"][0]
print("# round %s: libmoe %s fwd median_ms %.3f fwd-bwd median_ms %.3f tokens_per_s %.1f / %.1f"
      % (sys.argv[2], d["backend"], x["fwd"]["median_ms"], x["total"]["median_ms"],
         x["tokens"] / x["fwd"]["median_ms"] * 1e3, x["tokens"] / x["total"]["median_ms"] * 1e3))
EOF
done
echo "# load average after: $(cut -d' ' -f1-3 /proc/loadavg)"
grep -E '^#  threads|^# moe_bench' "$out/moe.1.txt" | sed 's/^#/# libmoe:/'

"$py" - "$out" "$rounds" "$tokens" <<'EOF'
import json, statistics, sys
out, rounds, T = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
ours = {"fwd": [], "fwd-bwd": []}
ours_best = {"fwd": float("inf"), "fwd-bwd": float("inf")}  # fastest single iteration, ms
peers = {}
peers_best = {}
for r in range(1, rounds + 1):
    d = json.load(open("%s/moe.%d.json" % (out, r)))
    x = d["results"][0]
    ours["fwd"].append(T / x["fwd"]["median_ms"] * 1e3)
    ours["fwd-bwd"].append(T / x["total"]["median_ms"] * 1e3)
    ours_best["fwd"] = min(ours_best["fwd"], x["fwd"]["min_ms"])
    ours_best["fwd-bwd"] = min(ours_best["fwd-bwd"], x["total"]["min_ms"])
    for p in json.load(open("%s/peer.%d.json" % (out, r)))["results"]:
        peers.setdefault(p["peer"], {}).setdefault(p["mode"], []).append(p["tokens_per_s"])
        b = peers_best.setdefault(p["peer"], {})
        b[p["mode"]] = min(b.get(p["mode"], float("inf")), p["min_ms"])
med = statistics.median
# ratio of the medians; the median of the per-round ratios (each peer run paired with the libmoe
# run right after it: the pair saw similar machine load); and the ratio of the fastest single
# iterations over all runs (the least disturbed by other load on a shared machine)
print()
print("| %-26s | %12s | %12s | %16s | %12s | %10s |" % ("tokens/s, median of %d runs" % rounds,
      "libmoe", "peer", "ratio of medians", "paired ratio", "best/best"))
print("|%s|%s|%s|%s|%s|%s|" % ("-" * 28, "-" * 14, "-" * 14, "-" * 18, "-" * 14, "-" * 12))
for name, modes in peers.items():
    for mode, label in (("fwd", "forward"), ("fwd-bwd", "forward+backward")):
        if mode not in modes:
            continue
        o, p = med(ours[mode]), med(modes[mode])
        pr = med([a / b for a, b in zip(ours[mode], modes[mode])])
        bb = peers_best[name][mode] / ours_best[mode]
        print("| %-26s | %12.0f | %12.0f | %15.2fx | %11.2fx | %9.2fx |"
              % (label + " (" + name + ")", o, p, o / p, pr, bb))
print()
print("fastest iteration (ms): libmoe fwd %.0f, fwd+bwd %.0f; " % (ours_best["fwd"], ours_best["fwd-bwd"])
      + "; ".join("%s fwd %.0f, fwd+bwd %.0f" % (n, b.get("fwd", float("nan")), b.get("fwd-bwd", float("nan")))
                  for n, b in peers_best.items()))
print("runs (tokens/s): libmoe fwd %s; fwd+bwd %s" % (
    ", ".join("%.0f" % v for v in ours["fwd"]), ", ".join("%.0f" % v for v in ours["fwd-bwd"])))
for name, modes in peers.items():
    print("runs (tokens/s): %s fwd %s; fwd+bwd %s" % (name,
          ", ".join("%.0f" % v for v in modes.get("fwd", [])),
          ", ".join("%.0f" % v for v in modes.get("fwd-bwd", []))))
EOF
