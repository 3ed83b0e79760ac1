#!/usr/bin/env bash
# ep_matches_one_rank.sh - train_mixture with expert parallelism over P MPI ranks trains the same
# model as one process: with the noise off (the noise is keyed by rank) and dropless routing,
# the held-out MSEs of the MoE and of the data-parallel dense baseline agree. SGD, because Adam
# would hide a wrong gradient scale; a Switch coefficient of 0.1, so the aux loss's weight
# against the data loss counts too.
# usage: ep_matches_one_rank.sh MPIEXEC NP TRAIN_MIXTURE [train_mixture options for both runs]
#        (extra mpiexec flags in $MPIEXEC_FLAGS)
set -euo pipefail
mpiexec=$1 np=$2 bin=$3
shift 3
args=(--no-noise --sgd --lr 0.1 --switch-coef 0.1 --steps 200 --seed 2 --log-every 200 "$@")
# shellcheck disable=SC2086
one=$("$mpiexec" -np 1 ${MPIEXEC_FLAGS:-} "$bin" "${args[@]}" --expect-ranks 1 | grep '^result')
# shellcheck disable=SC2086
many=$("$mpiexec" -np "$np" ${MPIEXEC_FLAGS:-} "$bin" "${args[@]}" --expect-ranks "$np" |
       grep '^result')
echo "1 rank:   $one"
echo "$np ranks: $many"
field() { sed -n "s/.* $1=\([^ ]*\).*/\1/p" <<<"$2"; }
status=0
for f in eval_mse dense_mse; do
    a=$(field "$f" "$one") b=$(field "$f" "$many")
    # f32 sums in another order (per-rank partial router gradients) may move the last digits
    if awk -v a="$a" -v b="$b" 'BEGIN { d = a - b; if (d < 0) d = -d; exit !(d <= 1e-3 * a) }'
    then echo "$f: $a vs $b: OK"
    else echo "$f: $a vs $b: differ by more than 1e-3 relative"; status=1
    fi
done
exit $status
