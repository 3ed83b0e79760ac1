#!/usr/bin/env bash
# test_bench.sh - one test of moe_bench, picked by name.
# usage: test_bench.sh CASE path/to/moe_bench [python]
#   table    the default run prints the header, one row per size and the footer
#   check    --check passes (vs its float64 reference) on several layer configurations
#   check_fails  --check fails when MOE_BENCH_CHECK_PERTURB moves one value of y, dx or a
#            gradient (1 rank and 4 local ranks): the check can fail
#   json     --json writes valid JSON with the numbers of the table
#   trace    --trace writes a Chrome trace: traceEvents of complete events with name/ph/ts/dur/pid/tid
#   usage    --help lists every option; bad options and impossible runs exit 2 (K > E, E not
#            divisible by the ranks, --check with capacity on 2 ranks, a missing --replay file);
#            rank-skew on one rank and bf16 on the CPU exit 3 (NOT_SUPPORTED)
#   routing  --routing hot:0.5 with K 1 puts half the tokens on expert 0 (imbalance E/2)
#   ep_local --local-ranks 4 --check passes (learned, rank-skew, zero-rank, uniform); rank-skew:1
#            sends (nearly) every assignment to another rank; multi-rank JSON and trace parse
#   replay   --replay FILE (a trace written by test_trace's fixture) at 1 rank and 4 ranks,
#            checked, and at 2 ranks with the trace's capacity (runs, not checked)
#   model    --model-table prints the six predictions; the model column is filled on 4 ranks
#            with --link-bw
#   preset   --preset NAME for every library preset runs and passes --check; unknown names exit 2
set -euo pipefail
case_name=$1 bench=$2 py=${3:-python3}
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
# small shapes: every case finishes in a few seconds on 2 cores
small=(-d 64 -F 128 -E 4 -k 2 -w 1 -n 2 --threads 2)
fail() { echo "FAIL: $*" >&2; exit 1; }

case "$case_name" in
table)
    "$bench" >"$tmp/out" || fail "default run exited $?"
    cat "$tmp/out"
    grep -q '^# moe_bench: libmoe ' "$tmp/out" || fail "no header"
    grep -qE '^#  *tokens +fwd\(ms\) +bwd\(ms\) +total\(ms\) +tokens/s +TFLOP/s' "$tmp/out" ||
        fail "no column titles"
    [ "$(grep -cE '^ +1024 +[0-9.]+ +[0-9.]+ +[0-9.]+ +[0-9]+ ' "$tmp/out")" = 1 ] || fail "no row"
    grep -q '^# Average tokens/s' "$tmp/out" || fail "no footer"
    "$bench" "${small[@]}" -b 32 -e 256 -f 2 --mode fwd >"$tmp/sweep" || fail "sweep exited $?"
    cat "$tmp/sweep"
    [ "$(grep -cE '^ +[0-9]+ ' "$tmp/sweep")" = 4 ] || fail "sweep 32..256 x2 should print 4 rows"
    ;;
check)
    for extra in "" "--noisy --capacity-factor 1.0 --priority score" \
                 "--activation swiglu --gate topk-of-softmax --renormalize --no-bias" \
                 "--activation relu --routing zipf:1.5 --capacity-factor 0.8" \
                 "--activation silu --routing hot:0.7 -b 16 -e 64 -f 4"; do
        # shellcheck disable=SC2086
        "$bench" "${small[@]}" -w 0 -n 1 -t 100 --check $extra >"$tmp/out" ||
            { cat "$tmp/out"; fail "--check $extra exited $?"; }
        grep -qE '^# Check +: 0 wrong of [1-9][0-9]* compared .* OK$' "$tmp/out" ||
            { cat "$tmp/out"; fail "--check $extra did not report OK"; }
        if grep -E '^ +[0-9]+ ' "$tmp/out" | awk '{ if ($NF != "0") bad = 1 } END { exit !bad }'; then
            fail "#wrong column not 0 with --check $extra"
        fi
    done
    echo "check OK"
    ;;
check_fails)
    for name in y dx dWg dW1 db1 dW2 db2; do
        set +e
        MOE_BENCH_CHECK_PERTURB=$name "$bench" "${small[@]}" -w 0 -n 1 -t 100 --check \
            >"$tmp/out" 2>"$tmp/err"
        rc=$?
        set -e
        [ "$rc" = 1 ] || { cat "$tmp/out" "$tmp/err"; fail "perturbed $name: exit $rc, not 1"; }
        grep -qE '^# Check +: 1 wrong of [1-9][0-9]* compared .* FAILED$' "$tmp/out" ||
            { cat "$tmp/out"; fail "perturbed $name: check did not report 1 wrong"; }
        grep -q "^# check: $name\[0\]" "$tmp/err" || fail "perturbed $name: not named on stderr"
    done
    for name in y dW2; do
        set +e
        MOE_BENCH_CHECK_PERTURB=$name "$bench" -d 64 -F 128 -E 8 -k 2 -w 1 -n 2 --local-ranks 4 \
            -t 32 --check >"$tmp/out" 2>"$tmp/err"
        rc=$?
        set -e
        [ "$rc" = 1 ] || { cat "$tmp/out" "$tmp/err"; fail "4 ranks, perturbed $name: exit $rc"; }
        grep -qE '^# Check +: 1 wrong .* FAILED$' "$tmp/out" || fail "4 ranks, $name: not FAILED"
    done
    echo "check_fails OK"
    ;;
json)
    "$bench" "${small[@]}" -b 64 -e 128 --check --json "$tmp/r.json" >"$tmp/out" ||
        fail "run exited $?"
    "$py" - "$tmp/r.json" <<'PY'
import json, sys
d = json.load(open(sys.argv[1]))
assert d["tool"] == "moe_bench" and d["ranks"] == 1, d
assert d["config"]["d_model"] == 64 and d["config"]["experts"] == 4, d["config"]
assert d["check"] == "OK", d["check"]
rows = d["results"]
assert [r["tokens"] for r in rows] == [64, 128], rows
for r in rows:
    for phase in ("fwd", "bwd", "total"):
        t = r[phase]
        assert 0 < t["min_ms"] <= t["median_ms"] <= t["max_ms"], (phase, t)
    assert r["tokens_per_s"] > 0 and r["tflops"] > 0 and r["wrong"] == 0
    assert r["assignments"] == 2 * r["tokens"] and r["imbalance"] >= 1.0
print("json OK:", len(rows), "rows")
PY
    ;;
trace)
    "$bench" "${small[@]}" -t 64 --trace "$tmp/t.json" >"$tmp/out" || fail "run exited $?"
    "$py" - "$tmp/t.json" <<'PY'
import json, sys
d = json.load(open(sys.argv[1]))
ev = d["traceEvents"]
assert isinstance(ev, list)
x = [e for e in ev if e.get("ph") == "X"]
assert x, "no complete events"
for e in x:
    for key in ("name", "ph", "ts", "dur", "pid", "tid"):
        assert key in e, (key, e)
    assert e["dur"] >= 0 and e["ts"] >= 0
names = {e["name"] for e in x}
assert {"forward", "backward"} <= names, names
assert sum(e["name"] == "forward" for e in x) == 2  # -n 2 timed iterations
tracks = {(e["pid"], e["tid"]) for e in x}
assert len(tracks) >= 2, tracks  # one track per phase
print("trace OK:", len(x), "complete events on", len(tracks), "tracks")
PY
    ;;
usage)
    "$bench" --help >"$tmp/help" || fail "--help exited $?"
    for opt in --tokens --d-model --d-ff --experts --top-k --dtype --activation --gate \
               --renormalize --noisy --capacity-factor --priority --backend --device --warmup \
               --iters --mode --min-tokens --max-tokens --step-factor --check --json --trace \
               --seed --threads --preset --routing --local-ranks --replay --link-bw --model-table \
               --chunks; do
        grep -q -- "$opt" "$tmp/help" || fail "--help does not mention $opt"
    done
    set +e
    "$bench" --no-such-option >/dev/null 2>&1; [ $? = 2 ] || fail "unknown option: exit not 2"
    "$bench" --top-k 9 --experts 8 >/dev/null 2>&1; [ $? = 2 ] || fail "K > E: exit not 2"
    "$bench" --routing zipf:x >/dev/null 2>&1; [ $? = 2 ] || fail "bad zipf: exit not 2"
    "$bench" --routing rank-skew >"$tmp/o" 2>&1; [ $? = 3 ] || fail "rank-skew: exit not 3"
    grep -q NOT_SUPPORTED "$tmp/o" || fail "rank-skew does not say NOT_SUPPORTED"
    "$bench" "${small[@]}" -t 8 --backend cpu --dtype bf16 >/dev/null 2>&1
    [ $? = 3 ] || fail "bf16 on the CPU backend: exit not 3"
    "$bench" "${small[@]}" -t 8 --local-ranks 3 >/dev/null 2>&1
    [ $? = 2 ] || fail "E 4 on 3 ranks: exit not 2"
    "$bench" "${small[@]}" -t 8 --local-ranks 2 --check --capacity-factor 1 >/dev/null 2>&1
    [ $? = 2 ] || fail "--check with capacity on 2 ranks: exit not 2"
    "$bench" --replay /nonexistent.trace >/dev/null 2>&1
    [ $? = 2 ] || fail "--replay of a missing file: exit not 2"
    set -e
    echo "usage OK"
    ;;
routing)
    "$bench" -d 256 -F 64 -E 8 -k 1 -t 4000 -w 0 -n 1 --threads 2 --routing hot:0.5 \
        --json "$tmp/r.json" >"$tmp/out" || fail "run exited $?"
    cat "$tmp/out"
    "$py" - "$tmp/r.json" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))["results"][0]
# half of 4000 tokens on expert 0 over a mean of 500: 4.0, up to sampling noise
assert abs(r["imbalance"] - 4.0) < 0.25, r["imbalance"]
print("routing OK: imbalance", r["imbalance"])
PY
    ;;
ep_local)
    ep=(-d 64 -F 128 -E 8 -k 2 -w 1 -n 2 --local-ranks 4)
    for routing in learned rank-skew zero-rank uniform; do
        "$bench" "${ep[@]}" -b 32 -e 64 --check --routing "$routing" >"$tmp/out" ||
            { cat "$tmp/out"; fail "--local-ranks 4 --check --routing $routing exited $?"; }
        grep -qE '^# Check +: 0 wrong of [1-9][0-9]* compared .* OK$' "$tmp/out" ||
            { cat "$tmp/out"; fail "--local-ranks 4 --check --routing $routing not OK"; }
        [ "$(grep -cE '^ +[0-9]+ ' "$tmp/out")" = 2 ] || fail "sweep 32..64 should print 2 rows"
    done
    cat "$tmp/out"
    grep -q '^# moe_bench: .* ranks 4 (local' "$tmp/out" || fail "header does not say 4 local ranks"
    # rank-skew:1: every rank's assignments go to the next rank's experts (the router follows
    # the inputs' targets up to a few ties at this small D)
    "$bench" "${ep[@]}" -t 200 --routing rank-skew:1 --json "$tmp/skew.json" >"$tmp/out" ||
        fail "rank-skew:1 exited $?"
    "$bench" "${ep[@]}" -t 64 --routing zero-rank --json "$tmp/ep.json" --trace "$tmp/ep.trace" \
        >"$tmp/out" || fail "zero-rank with --json/--trace exited $?"
    "$py" - "$tmp/skew.json" "$tmp/ep.json" "$tmp/ep.trace" <<'PY'
import json, sys
skew = json.load(open(sys.argv[1]))["results"][0]
assert all(r["remote_share"] > 0.95 for r in skew["ranks"]), skew["ranks"]
d = json.load(open(sys.argv[2]))
assert d["ranks"] == 4 and d["routing"] == "zero-rank", d
r = d["results"][0]
assert [q["tokens"] for q in r["ranks"]] == [0, 64, 64, 64], r["ranks"]
assert r["ranks"][0]["rows_sent"] == 0 and r["ranks"][0]["rows_received"] > 0, r["ranks"]
assert sum(q["rows_sent"] for q in r["ranks"]) == sum(q["rows_received"] for q in r["ranks"])
assert r["algbw_gbps"] > 0 and abs(r["busbw_gbps"] - r["algbw_gbps"] * 3 / 4) < 1e-6 * r["algbw_gbps"] + 1e-9
assert r["rank_imbalance"] >= 1.0 and r["alltoall_ms"] > 0 and r["model_ms"] > 0
for name in ("gate", "dispatch", "experts", "return", "combine", "bwd_experts"):
    assert r["phases_ms"][name] > 0, (name, r["phases_ms"])
t = json.load(open(sys.argv[3]))["traceEvents"]
x = [e for e in t if e.get("ph") == "X"]
assert {e["pid"] for e in x} == {0, 1, 2, 3}, "one process per rank"
ph = {(e["pid"], e["name"]) for e in x if e["tid"] >= 10}
for pid in range(4):
    for name in ("gate", "dispatch", "experts", "return", "bwd_dispatch"):
        assert (pid, name) in ph, (pid, name)
print("ep_local OK: busbw", r["busbw_gbps"], "GB/s, remote share", [q["remote_share"] for q in skew["ranks"]])
PY
    ;;
replay)
    trace=${4:?replay needs the trace file}
    "$bench" --replay "$trace" -w 1 -n 3 --check >"$tmp/out" || { cat "$tmp/out"; fail "replay on 1 rank exited $?"; }
    grep -qE '^# Check +: 0 wrong .* OK$' "$tmp/out" || { cat "$tmp/out"; fail "replay 1 rank: check not OK"; }
    # dropless so that one CPU layer over all tokens is the reference at 4 ranks
    "$bench" --replay "$trace" --local-ranks 4 --capacity-factor 0 -w 1 -n 3 --check \
        --json "$tmp/r.json" >"$tmp/out" || { cat "$tmp/out"; fail "replay on 4 ranks exited $?"; }
    cat "$tmp/out"
    grep -qE '^# Check +: 0 wrong .* OK$' "$tmp/out" || fail "replay 4 ranks: check not OK"
    # the trace's own capacity on 2 ranks: drops happen per source rank (not checked)
    "$bench" --replay "$trace" --local-ranks 2 -w 0 -n 2 >"$tmp/out2" || fail "replay on 2 ranks exited $?"
    "$py" - "$tmp/r.json" <<'PY'
import json, sys
d = json.load(open(sys.argv[1]))
assert d["routing"] == "replay" and d["ranks"] == 4 and d["check"] == "OK", d
assert d["config"]["experts"] == 8 and d["config"]["top_k"] == 2, d["config"]
print("replay OK:", d["results"][0]["tokens"], "tokens per rank and step")
PY
    ;;
model)
    "$bench" --model-table >"$tmp/out" || fail "--model-table exited $?"
    cat "$tmp/out"
    [ "$(grep -cE '^ +(mixtral|deepseek) +(8|64|512) ' "$tmp/out")" = 6 ] || fail "not six predictions"
    "$bench" -d 64 -F 128 -E 8 -w 1 -n 2 -t 64 --local-ranks 4 --link-bw 10 >"$tmp/out" ||
        fail "--link-bw run exited $?"
    grep -q 'model = bench/model.c at --link-bw' "$tmp/out" || fail "header does not name --link-bw"
    grep -E '^ +64 ' "$tmp/out" | awk '{ if ($16 !~ /^[0-9.]+$/) exit 1 }' || fail "model column empty"
    echo "model OK"
    ;;
preset)
    # every library preset (docs/presets.md) at a small D / F, checked; an unknown name exits 2
    # and the message lists the known ones
    for p in mixtral qwen2-moe qwen3-moe deepseek-v3 deepseek switch olmoe; do
        "$bench" --preset "$p" -d 32 -F 16 -t 64 -w 0 -n 1 --threads 2 --check >"$tmp/out" ||
            { cat "$tmp/out"; fail "--preset $p --check exited $?"; }
        grep -qE '^# Check +: 0 wrong of [1-9][0-9]* compared .* OK$' "$tmp/out" ||
            { cat "$tmp/out"; fail "--preset $p --check did not report OK"; }
    done
    set +e
    "$bench" --preset nope >"$tmp/o" 2>&1; [ $? = 2 ] || fail "--preset nope: exit not 2"
    set -e
    grep -q "deepseek-v3" "$tmp/o" || fail "--preset nope does not list the presets"
    echo "preset OK"
    ;;
*) fail "unknown case '$case_name'" ;;
esac
