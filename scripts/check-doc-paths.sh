#!/usr/bin/env bash
# check-doc-paths.sh - list the file paths that README.md and docs/*.md cite but the repository
# does not hold, so that a renamed or deleted file cannot leave a stale citation behind.
# usage: scripts/check-doc-paths.sh [FILE.md...]   (default: README.md docs/*.md)
#
# Only inline `backticked` words count, and only repository-relative ones under the project's
# top-level folders (bench/ csrc/ docker/ docs/ examples/ include/ kernels/ python/ scripts/
# tests/): build outputs (build/...), files a run writes and shell commands in fenced blocks are
# not citations of repository files. A word may be a folder (`tests/cuda/`), a glob
# (`kernels/*.cu`) or hold one brace group (`examples/train_mixture.{c,py}`).
# Exit status: 0 when every cited path exists, 1 otherwise (each missing one is printed).
set -euo pipefail
cd "$(dirname "$0")/.."

if [ $# -eq 0 ]; then
    set -- README.md docs/*.md
fi

# file:line:word for every candidate word; fenced code blocks are skipped
candidates() {
    awk '
        FNR == 1 { fence = 0 }
        /^[ \t]*```/ { fence = !fence; next }
        fence { next }
        {
            line = $0
            while (match(line, /`[^`]+`/)) {
                span = substr(line, RSTART + 1, RLENGTH - 2)
                line = substr(line, RSTART + RLENGTH)
                n = split(span, words, /[ \t]+/)
                for (i = 1; i <= n; i++) {
                    w = words[i]
                    sub(/^\.\//, "", w)
                    sub(/[.,:;)]+$/, "", w)
                    if (w ~ /^(bench|csrc|docker|docs|examples|include|kernels|python|scripts|tests)\/[A-Za-z0-9_.\/*{},+-]*$/)
                        print FILENAME ":" FNR ":" w
                }
            }
        }' "$@"
}

# does the repository hold this path (a file, a folder with files, or a glob's match)?
in_repo() {
    local p=$1
    if git rev-parse --is-inside-work-tree >/dev/null 2>&1; then
        [ -n "$(git ls-files -- "$p" | head -n 1)" ] && return 0
        # a new file not committed yet still counts when it exists
        compgen -G "$p" >/dev/null
    else
        compgen -G "$p" >/dev/null
    fi
}

# expands one brace group: a/b.{c,py} -> a/b.c a/b.py
expand() {
    local w=$1
    if [[ $w =~ ^([^{}]*)\{([^{}]*)\}([^{}]*)$ ]]; then
        local pre=${BASH_REMATCH[1]} alts=${BASH_REMATCH[2]} post=${BASH_REMATCH[3]} a
        IFS=, read -r -a parts <<<"$alts"
        for a in "${parts[@]}"; do echo "$pre$a$post"; done
    else
        echo "$w"
    fi
}

missing=0
while IFS= read -r hit; do
    where=${hit%:*}
    word=${hit##*:}
    while IFS= read -r path; do
        if ! in_repo "$path"; then
            echo "$where: \`$path\` is not in the repository" >&2
            missing=$((missing + 1))
        fi
    done < <(expand "$word")
done < <(candidates "$@")

if [ "$missing" -gt 0 ]; then
    echo "check-doc-paths: $missing cited path(s) missing" >&2
    exit 1
fi
echo "check-doc-paths: every cited path exists"
