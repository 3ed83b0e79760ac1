#!/usr/bin/env python3
"""placement-steptime.py - does re-placing the experts shorten the expert-parallel step by what
the load model predicts? (docs/expert-parallel.md, "Measured")

Runs moe_bench under mpirun on a skewed routing, alternating the contiguous placement and
`--placement auto --redundant R` (pairs of runs back to back, so both see the same machine
load), and prints per pair: the step time (median total of the timed iterations) of each, the
measured speed-up, and the speed-up the load model predicts from the contiguous run's own
profile. The model: the expert phases (forward and backward experts, max over ranks) scale with
the slowest rank's rows, everything else stays:
    predicted = total_c - experts_c * (1 - rimbal_auto / rimbal_c)
usage: scripts/placement-steptime.py [--pairs N] [--ranks P] [--bench FILE] [--redundant R]
                                     [-- moe_bench options]
Default shape: -E 8 -k 2 -d 256 -F 1024 -t 2048 --routing hot:0.6 -w 1 -n 5, one thread per
rank (P ranks need P idle cores for the step times to mean anything).
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

DEFAULT = ["-E", "8", "-k", "2", "-d", "256", "-F", "1024", "-t", "2048", "--routing", "hot:0.6",
           "-w", "1", "-n", "5"]


def run(args, placement, out):
    cmd = ["mpirun", "-np", str(args.ranks), "--oversubscribe"]
    if os.geteuid() == 0:
        cmd.append("--allow-run-as-root")
    cmd += [args.bench, "--threads", "1", "--placement", placement, "--json", out]
    if placement == "auto":
        cmd += ["--redundant", str(args.redundant)]
    cmd += args.extra or DEFAULT
    env = dict(os.environ, OMP_NUM_THREADS="1")
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, env=env)
    with open(out) as f:
        r = json.load(f)["results"][0]
    ph = r["phases_ms"]
    return {"total": r["total"]["median_ms"], "rimbal": r["rank_imbalance"],
            "experts": ph["experts"] + ph["bwd_experts"]}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--pairs", type=int, default=5)
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--redundant", type=int, default=2)
    ap.add_argument("--bench", default="build/moe_bench")
    ap.add_argument("extra", nargs="*", help="moe_bench options instead of the default shape")
    args = ap.parse_args()
    if not os.access(args.bench, os.X_OK):
        sys.exit(f"placement-steptime: no {args.bench} (build moe_bench with MPI first)")
    print("| pair | contiguous ms (rimbal) | auto ms (rimbal) | measured | predicted | "
          "measured / predicted |")
    print("|---|---|---|---|---|---|")
    meas, pred = [], []
    with tempfile.TemporaryDirectory() as d:
        for i in range(args.pairs):
            c = run(args, "contiguous", os.path.join(d, "c.json"))
            a = run(args, "auto", os.path.join(d, "a.json"))
            model = c["total"] - c["experts"] * (1.0 - a["rimbal"] / c["rimbal"])
            m, p = c["total"] / a["total"], c["total"] / model
            meas.append(m)
            pred.append(p)
            print(f"| {i + 1} | {c['total']:.1f} ({c['rimbal']:.3f}) | {a['total']:.1f} "
                  f"({a['rimbal']:.3f}) | {m:.3f}x | {p:.3f}x | {m / p:.3f} |", flush=True)
    mm, mp = statistics.median(meas), statistics.median(pred)
    print(f"\nmedian over {args.pairs} pairs: measured {mm:.3f}x, predicted {mp:.3f}x, "
          f"measured / predicted {mm / mp:.3f}")


if __name__ == "__main__":
    main()
