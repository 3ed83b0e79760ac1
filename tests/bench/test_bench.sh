#!/usr/bin/env bash
# test_bench.sh - one test of moe_bench, picked by name.
# usage: test_bench.sh CASE path/to/moe_bench [python]
#   table    the default run prints the header, one row per size and the footer
#   check    --check passes (bitwise CPU vs CPU) on several layer configurations
#   json     --json writes valid JSON with the numbers of the table
#   trace    --trace writes a Chrome trace: traceEvents of complete events with name/ph/ts/dur/pid/tid
#   usage    --help lists every option; bad options exit 2; rank-skew exits 3 (NOT_SUPPORTED)
#   routing  --routing hot:0.5 with K 1 puts half the tokens on expert 0 (imbalance E/2)
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
               --seed --threads --preset --routing; do
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
*) fail "unknown case '$case_name'" ;;
esac
