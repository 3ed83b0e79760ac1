#!/usr/bin/env python3
"""lb-report.py - the summary table and plots of a load-balancing experiment (lb-experiment).

Reads DIR/runs.txt (one line per run: strategy, capacity factor, seed, ranks, CSV file, log
file; the ranks field is optional, 1 when absent) and every run's CSV (columns of
examples/train_mixture.c --csv, described in docs/load-balancing.md) and log (its 'result ...'
line), then writes
  DIR/summary.md   the table: one row per (strategy, capacity factor, ranks), means over the seeds
  DIR/*.png        the plots (only with --plots; needs matplotlib); rank_load.png and
                   rank_imbalance.png only when some run has more than one rank
--verify checks what is there instead: every CSV parses with the expected columns and rows,
summary.md has one table row per (strategy, capacity factor, ranks), and with --plots every PNG
is a PNG.

    python3 scripts/lb-report.py DIR [--plots] [--verify]

The table and --verify need only the standard library (any python3); --plots needs matplotlib.
"""
import argparse
import csv
import math
import os
import sys

BASE = ["none", "switch", "importance-load", "z-loss", "loss-free", "expert-choice"]
# placement (lb-experiment): a strategy with the experts re-placed from the running load
ORDER = BASE + ["placement"] + [f"{s}+placement" for s in BASE if s != "none"]
PLOTS = ["load_per_expert.png", "imbalance.png", "dropped.png", "loss.png", "step_time.png"]
RANK_PLOTS = ["rank_load.png", "rank_imbalance.png"]
FIXED = ["step", "loss", "tokens"]
TAIL = ["imbalance", "imbalance_routed", "dropped_frac", "unrouted_frac", "switch_loss",
        "importance_loss", "load_loss", "z_loss", "aux_loss"]


def plot_names(runs):
    return PLOTS + (RANK_PLOTS if any(r["ranks"] > 1 for r in runs) else [])


def read_runs(d):
    runs = []
    with open(os.path.join(d, "runs.txt")) as f:
        for line in f:
            if not line.strip() or line.startswith("#"):
                continue
            f_ = line.split()
            if len(f_) == 5:  # written before the ranks field
                f_.insert(3, "1")
            strategy, cf, seed, ranks, csv_name, log_name = f_
            runs.append(dict(strategy=strategy, cf=float(cf), seed=int(seed), ranks=int(ranks),
                             csv=os.path.join(d, csv_name), log=os.path.join(d, log_name)))
    if not runs:
        raise SystemExit(f"lb-report: no runs listed in {d}/runs.txt")
    return runs


def read_csv(path):
    """Rows as dicts of floats; checks the header against the documented columns (the per-rank
    load and step time columns at the end may be absent: CSVs written before them)."""
    with open(path, newline="") as f:
        rd = csv.reader(f)
        header = next(rd)
        E = sum(1 for h in header if h.startswith("load_") and h != "load_loss")
        P = sum(1 for h in header if h.startswith("rank_rows_"))
        want = (FIXED + [f"load_{e}" for e in range(E)] + [f"routed_{e}" for e in range(E)] +
                TAIL + [f"bias_{e}" for e in range(E)])
        if P > 0 or "step_ms" in header:
            want += ["rank_imbalance"] + [f"rank_rows_{q}" for q in range(P)] + ["step_ms"]
        if E < 1 or header != want:
            raise ValueError(f"{path}: unexpected columns {header}")
        rows = []
        for i, r in enumerate(rd, 2):
            if len(r) != len(header):
                raise ValueError(f"{path}:{i}: {len(r)} fields, the header has {len(header)}")
            try:
                row = {h: float(v) for h, v in zip(header, r)}
            except ValueError as e:
                raise ValueError(f"{path}:{i}: {e}") from None
            if not all(math.isfinite(v) for v in row.values()):
                raise ValueError(f"{path}:{i}: a value is not finite")
            rows.append(row)
    if not rows:
        raise ValueError(f"{path}: no rows")
    return E, rows


def read_result(path):
    """The 'result key=value ...' line of a run's log."""
    with open(path) as f:
        for line in f:
            if line.startswith("result "):
                return {k: v for k, v in (kv.split("=", 1) for kv in line.split()[1:])}
    raise ValueError(f"{path}: no 'result' line (did the run fail?)")


def mean(v):
    return sum(v) / len(v) if v else float("nan")


def num_ranks(rows):
    """P of a CSV's rank_rows_q columns (0: a CSV without them)."""
    return sum(1 for h in rows[0] if h.startswith("rank_rows_"))


def label(r):
    """A run's strategy and capacity factor, and its ranks where they are more than one."""
    s = f"{r['strategy']} ({cf_label(r['cf'], r['strategy'])}"
    return s + (f", P={r['ranks']})" if r["ranks"] > 1 else ")")


def cf_label(cf, strategy):
    if cf <= 0:
        return "1 (default)" if strategy == "expert-choice" else "dropless"
    return f"{cf:g}"


def run_metrics(run):
    E, rows = read_csv(run["csv"])
    res = read_result(run["log"])
    last = rows[-max(1, len(rows) // 10):]  # the last tenth of the logged steps
    has = num_ranks(rows) > 0
    nan = float("nan")
    return dict(E=E, rows=rows, eval_mse=float(res["eval_mse"]),
                final_rank=mean([r["rank_imbalance"] for r in last]) if has else nan,
                mean_rank=mean([r["rank_imbalance"] for r in rows]) if has else nan,
                step_ms=mean([r["step_ms"] for r in rows]) if has else nan,
                specialisation=float(res["specialisation"]),
                final_imbalance=mean([r["imbalance"] for r in last]),
                mean_imbalance=mean([r["imbalance"] for r in rows]),
                dropped=mean([r["dropped_frac"] for r in rows]),
                final_loss=mean([r["loss"] for r in last]))


def groups(runs):
    """(strategy, cf, ranks) -> its runs, in the order of ranks, ORDER, capacity factor."""
    g = {}
    for r in runs:
        g.setdefault((r["strategy"], r["cf"], r["ranks"]), []).append(r)
    rank = {s: i for i, s in enumerate(ORDER)}
    return dict(sorted(g.items(), key=lambda kv: (kv[0][2], rank.get(kv[0][0], 99), kv[0][0],
                                                  kv[0][1] if kv[0][1] > 0 else -1)))


def write_summary(d, runs):
    g = groups(runs)
    seeds = sorted({r["seed"] for r in runs})
    multi = any(r["ranks"] > 1 for r in runs)
    head = ["strategy", "capacity factor", "held-out MSE", "train loss (final)",
            "imbalance (final)", "imbalance (mean)", "dropped (mean)", "specialisation"]
    if multi:
        head += ["ranks", "rank load (final)", "rank load (mean)"]
    head += ["step ms (mean)"]
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for (strategy, cf, ranks), rs in g.items():
        m = [run_metrics(r) for r in rs]

        def col(key, fmt):
            v = [x[key] for x in m]
            if any(math.isnan(x) for x in v):
                return "–"
            s = fmt.format(mean(v))
            if len(v) > 1:
                s += (" (" + fmt.format(min(v)) + "–" + fmt.format(max(v)) + ")")
            return s
        cells = [strategy, cf_label(cf, strategy), col("eval_mse", "{:.4f}"),
                 col("final_loss", "{:.4f}"), col("final_imbalance", "{:.2f}"),
                 col("mean_imbalance", "{:.2f}"), col("dropped", "{:.3f}"),
                 col("specialisation", "{:.3f}")]
        if multi:
            cells += [str(ranks), col("final_rank", "{:.3f}"), col("mean_rank", "{:.3f}")]
        cells += [col("step_ms", "{:.2f}")]
        out.append("| " + " | ".join(cells) + " |")
    note = (f"Means over seeds {', '.join(map(str, seeds))}" +
            (" (min–max in brackets)" if len(seeds) > 1 else "") +
            "; final = mean over the last tenth of the logged steps" +
            ("; rank load = max/mean rows received per rank (1 on one rank)" if multi else "") +
            "; step ms = wall time of a training step, slowest rank, mean over the run "
            "(not deterministic). Columns: docs/load-balancing.md.\n")
    with open(os.path.join(d, "summary.md"), "w") as f:
        f.write("\n".join(out) + "\n\n" + note)
    print("\n".join(out) + "\n\n" + note)


def headline(runs, seed):
    """Per (strategy, ranks), the run the over-time plots show: dropless for token choice,
    capacity factor 1 (its default) for expert choice; else the smallest capacity factor run."""
    pick = {}
    for r in runs:
        if r["seed"] != seed:
            continue
        ec = r["strategy"].startswith("expert-choice")
        preferred = (r["cf"] <= 0 or r["cf"] == 1.0) if ec else r["cf"] <= 0
        key = (0 if preferred else 1, r["cf"])
        k = (r["strategy"], r["ranks"])
        if k not in pick or key < pick[k][0]:
            pick[k] = (key, r)
    rank = {s: i for i, s in enumerate(ORDER)}
    return [pick[k][1] for k in sorted(pick, key=lambda k: (k[1], rank.get(k[0], 99), k[0]))]


def smooth(v, n=5):
    out, acc = [], []
    for x in v:
        acc.append(x)
        if len(acc) > n:
            acc.pop(0)
        out.append(sum(acc) / len(acc))
    return out


def save(fig, path, dpi):
    """A PNG small enough for docs/img: line plots need few colours, so with Pillow (which
    matplotlib's Debian package depends on) the image is stored with a 256-colour palette."""
    try:
        import io
        from PIL import Image
    except ImportError:
        fig.savefig(path, dpi=dpi)
        return
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, facecolor="white")
    buf.seek(0)
    Image.open(buf).convert("RGB").quantize(256).save(path, optimize=True)


def panels(plt, n, title):
    """A figure of n panels, three a row, sharing y."""
    cols = min(3, n)
    rows_n = (n + cols - 1) // cols
    fig, axes = plt.subplots(rows_n, cols, figsize=(4.2 * cols, 2.9 * rows_n), squeeze=False,
                             sharey=True)
    for ax in axes.flat[n:]:
        ax.axis("off")
    fig.suptitle(title, fontsize=11)
    return fig, axes


def make_plots(d, runs):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    seed = min(r["seed"] for r in runs)
    heads = headline(runs, seed)
    data = {id(r): read_csv(r["csv"]) for r in runs if r["seed"] == seed}
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    dpi = 80

    def shares(ax, rows, n, key, name):
        """the n columns key_i over the row's total, one line each"""
        steps = [x["step"] for x in rows]
        for i in range(n):
            frac = [x[f"{key}_{i}"] / max(1.0, sum(x[f"{key}_{j}"] for j in range(n)))
                    for x in rows]
            ax.plot(steps, smooth(frac), lw=1.2, color=colors[i % len(colors)],
                    label=f"{name} {i}")
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)

    def share_panels(runs, name, title, count, key, what, ylabel, even_line=False):
        """one panel per run: each expert's (or rank's) share of the step's total, over steps"""
        fig, axes = panels(plt, len(runs), title)
        for ax, r in zip(axes.flat, runs):
            rows = data[id(r)][1]
            n = count(r, rows)
            shares(ax, rows, n, key, what)
            if even_line:
                ax.axhline(1.0 / n, color="k", lw=0.8, ls=":")
            ax.set_title(label(r), fontsize=10)
        for ax in axes[:, 0]:
            ax.set_ylabel(ylabel)
        axes.flat[0].legend(fontsize=7, loc="upper right")
        fig.tight_layout()
        save(fig, os.path.join(d, name), dpi)
        plt.close(fig)

    # per-expert load over steps, one panel per strategy
    share_panels(heads, "load_per_expert.png", "tokens each expert processes per step "
                 "(moving mean of 5 logged steps)", lambda r, rows: data[id(r)][0], "load",
                 "expert", "load / tokens")

    def over_steps(name, key, ylabel, title, heads, logy=False):
        fig, ax = plt.subplots(figsize=(7, 3.8))
        for i, r in enumerate(heads):
            _, rows = data[id(r)]
            ax.plot([x["step"] for x in rows], smooth([x[key] for x in rows]), lw=1.3,
                    color=colors[i % len(colors)], label=label(r))
        ax.set_xlabel("step")
        ax.set_ylabel(ylabel)
        if logy:
            ax.set_yscale("log")
        ax.set_title(title, fontsize=11)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        save(fig, os.path.join(d, name), dpi)
        plt.close(fig)

    over_steps("imbalance.png", "imbalance", "max / mean load",
               "expert load imbalance per step (moving mean of 5 logged steps)", heads)
    over_steps("loss.png", "loss", "training MSE", "training loss", heads, logy=True)
    timed = [r for r in heads if num_ranks(data[id(r)][1]) > 0]
    over_steps("step_time.png", "step_ms", "ms per step (slowest rank)",
               "wall time of a training step (moving mean of 5 logged steps)", timed)

    # per-rank load: each rank's share of the rows, one panel per strategy; and max/mean
    multi = [r for r in heads if r["ranks"] > 1 and num_ranks(data[id(r)][1]) > 1]
    if multi:
        share_panels(multi, "rank_load.png", "rows each rank's experts receive per step, "
                     "share of all rows (moving mean of 5 logged steps)",
                     lambda r, rows: num_ranks(rows), "rank_rows", "rank", "rows / all rows",
                     even_line=True)
        over_steps("rank_imbalance.png", "rank_imbalance", "max / mean rows per rank",
                   "per-rank load imbalance (moving mean of 5 logged steps)", multi)

    # dropped fraction: one panel per capacity factor that drops
    cfs = sorted({r["cf"] for r in runs if r["cf"] > 0})
    if not cfs:
        cfs = [0.0]
    fig, axes = plt.subplots(1, len(cfs), figsize=(4.2 * len(cfs), 3.4), squeeze=False,
                             sharey=True)
    keys = sorted({(r["strategy"], r["ranks"]) for r in runs},
                  key=lambda k: (k[1], ORDER.index(k[0]) if k[0] in ORDER else 99, k[0]))
    for ax, cf in zip(axes.flat, cfs):
        for i, (s, p) in enumerate(keys):
            rs = [r for r in runs
                  if r["seed"] == seed and r["strategy"] == s and r["ranks"] == p and r["cf"] == cf]
            if not rs:
                continue
            _, rows = data[id(rs[0])]
            ax.plot([x["step"] for x in rows], smooth([x["dropped_frac"] for x in rows]), lw=1.2,
                    color=colors[i % len(colors)], label=s + (f" (P={p})" if p > 1 else ""))
        ax.set_title(f"capacity factor {cf_label(cf, '')}", fontsize=10)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    axes[0, 0].set_ylabel("dropped fraction")
    axes[0, 0].legend(fontsize=7)
    fig.suptitle("dropped fraction: assignments over capacity (token choice), tokens no expert "
                 "picked (expert choice); moving mean of 5", fontsize=10)
    fig.tight_layout()
    save(fig, os.path.join(d, "dropped.png"), dpi)
    plt.close(fig)
    print(f"plots: {', '.join(os.path.join(d, p) for p in plot_names(runs))}")


def verify(d, runs, plots):
    problems = []
    for r in runs:
        try:
            E, rows = read_csv(r["csv"])
            read_result(r["log"])
            steps = [x["step"] for x in rows]
            if steps != sorted(steps) or len(set(steps)) != len(steps):
                problems.append(f"{r['csv']}: steps not increasing")
            for x in rows:
                load = sum(x[f"load_{e}"] for e in range(E))
                routed = sum(x[f"routed_{e}"] for e in range(E))
                if load > routed or not 0.0 <= x["dropped_frac"] <= 1.0 or x["imbalance"] < 0:
                    problems.append(f"{r['csv']}: step {x['step']:.0f} out of range")
                    break
            P = num_ranks(rows)
            if P != r["ranks"]:
                problems.append(f"{r['csv']}: {P} rank_rows columns, the run had {r['ranks']} "
                                f"ranks")
                continue
            for x in rows:
                # every row an expert computes is received by exactly one of its holders
                load = sum(x[f"load_{e}"] for e in range(E))
                rows_ = sum(x[f"rank_rows_{q}"] for q in range(P))
                if rows_ != load or x["step_ms"] <= 0 or not (
                        x["rank_imbalance"] >= 1.0 - 1e-6 or load == 0):
                    problems.append(f"{r['csv']}: step {x['step']:.0f}: rank rows {rows_:.0f} "
                                    f"vs load {load:.0f}, rank_imbalance {x['rank_imbalance']}, "
                                    f"step_ms {x['step_ms']}")
                    break
        except (OSError, ValueError, KeyError) as e:
            problems.append(str(e))
    path = os.path.join(d, "summary.md")
    try:
        with open(path) as f:
            table = [ln for ln in f if ln.startswith("|")]
        head = [c.strip() for c in table[0].strip().strip("|").split("|")]
        body = [ln.strip().strip("|").split("|") for ln in table[2:]]
        want = 9 + (3 if any(r["ranks"] > 1 for r in runs) else 0)
        if (len(head) != want or len(body) != len(groups(runs)) or
                any(len(c) != want for c in body)):
            problems.append(f"{path}: {len(body)} table rows of {len(head)} columns, expected "
                            f"{len(groups(runs))} of {want}")
        for c in body:
            float(c[2].split()[0]), float(c[7].split()[0]), float(c[-1].split()[0])
            if want > 9:
                int(c[8]), float(c[9].split()[0]), float(c[10].split()[0])
    except (OSError, ValueError, IndexError) as e:
        problems.append(f"{path}: {e}")
    if plots:
        for p in plot_names(runs):
            try:
                with open(os.path.join(d, p), "rb") as f:
                    if f.read(8) != b"\x89PNG\r\n\x1a\n":
                        problems.append(f"{p}: not a PNG")
            except OSError as e:
                problems.append(str(e))
    for p in problems:
        print(f"lb-report: {p}", file=sys.stderr)
    print(f"verify: {len(runs)} runs, {len(groups(runs))} table rows"
          f"{', ' + str(len(plot_names(runs))) + ' PNGs' if plots else ''}: "
          f"{'FAIL' if problems else 'OK'}")
    return 1 if problems else 0


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("dir")
    p.add_argument("--plots", action="store_true", help="write the PNGs (needs matplotlib)")
    p.add_argument("--verify", action="store_true", help="check the outputs instead")
    a = p.parse_args()
    runs = read_runs(a.dir)
    if a.verify:
        return verify(a.dir, runs, a.plots)
    write_summary(a.dir, runs)
    if a.plots:
        make_plots(a.dir, runs)
    return 0


if __name__ == "__main__":
    sys.exit(main())
