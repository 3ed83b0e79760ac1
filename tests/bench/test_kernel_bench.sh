#!/usr/bin/env bash
# test_kernel_bench.sh - the exit rule of moe_kernel_bench, picked by name.
# usage: test_kernel_bench.sh CASE path/to/moe_kernel_bench
#   usage   --help documents the exit status; a bad argument exits 2
#   missed  with every target made unreachable (MOE_KERNEL_BENCH_TARGET_SCALE) it exits 4 and
#           its last line says MISSED; exits 77 (skipped) where there is no GPU
set -euo pipefail
case_name=$1 kb=$2
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
fail() { echo "FAIL: $*" >&2; exit 1; }

case "$case_name" in
usage)
    "$kb" --help >"$tmp/help" || fail "--help exited $?"
    grep -q '4 at least one target missed' "$tmp/help" || fail "--help does not give exit 4"
    grep -q "targets: N of M met" "$tmp/help" || fail "--help does not describe the last line"
    set +e
    "$kb" --no-such-option >/dev/null 2>&1; rc=$?
    set -e
    [ "$rc" = 2 ] || fail "bad argument: exit $rc, not 2"
    echo "usage OK"
    ;;
missed)
    set +e
    MOE_KERNEL_BENCH_TARGET_SCALE=1e9 "$kb" >"$tmp/out" 2>&1; rc=$?
    set -e
    if grep -q 'no GPU, nothing to measure' "$tmp/out"; then
        echo "no GPU: skipped"
        exit 77
    fi
    cat "$tmp/out"
    [ "$rc" = 4 ] || fail "every target unreachable: exit $rc, not 4"
    tail -n 1 "$tmp/out" | grep -qE '^targets: ([1-9][0-9]*) of \1 MISSED: ' ||
        fail "last line does not say that every target was missed"
    # the same run at the real targets: exit 0 with "met", or 4 with the misses named last
    set +e
    "$kb" >"$tmp/out2" 2>&1; rc=$?
    set -e
    last=$(tail -n 1 "$tmp/out2")
    case "$rc" in
    0) echo "$last" | grep -qE '^targets: ([0-9]+) of \1 met$' || fail "exit 0 but '$last'" ;;
    4) echo "$last" | grep -q 'MISSED' || fail "exit 4 but '$last'" ;;
    *) cat "$tmp/out2"; fail "real targets: exit $rc" ;;
    esac
    echo "missed OK ($last)"
    ;;
*) fail "unknown case '$case_name'" ;;
esac
