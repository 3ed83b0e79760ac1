#!/usr/bin/env bash
# cutlass-fetch.sh - NVIDIA's CUTLASS headers, one pinned version, in a cache outside the
# repository; prints the include directory (the folder that holds cutlass/ and cute/).
#
# usage: scripts/cutlass-fetch.sh            fetch once (pip download of the nvidia-cutlass wheel,
#                                            checked against its pinned sha256), then print
#        scripts/cutlass-fetch.sh --pack F   also write the include folder as a tarball F (for a
#                                            machine without network, see scripts/gpu-deps.sh)
# cache: $MOE_CACHE_DIR, else ${XDG_CACHE_HOME:-~/.cache}/libmoe. CMake looks in the same place
# (MOE_CUTLASS_DIR overrides it). Nothing of CUTLASS is committed to the repository.
set -euo pipefail
MOE_CUTLASS_VERSION=4.2.0.0
MOE_CUTLASS_SHA256=f9599ada45c7bcb6bf53f7d3f0a7d154183e53451c01bfa59eecd37dd4a693f6
cache=${MOE_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/libmoe}
dest=$cache/cutlass-$MOE_CUTLASS_VERSION
inc=$dest/include

if [ ! -f "$inc/cutlass/cutlass.h" ] || [ ! -f "$inc/cute/tensor.hpp" ]; then
    py=
    for p in python3 /usr/bin/python3; do
        if command -v "$p" >/dev/null 2>&1 && "$p" -m pip --version >/dev/null 2>&1; then
            py=$p
            break
        fi
    done
    [ -n "$py" ] || { echo "cutlass-fetch: no python3 with pip to download nvidia-cutlass" >&2; exit 1; }
    tmp=$(mktemp -d)
    trap 'rm -rf "$tmp"' EXIT
    "$py" -m pip download -q --no-deps --only-binary=:all: -d "$tmp" \
        "nvidia-cutlass==$MOE_CUTLASS_VERSION" >&2
    whl=$(ls "$tmp"/nvidia_cutlass-*.whl)
    echo "$MOE_CUTLASS_SHA256  $whl" | sha256sum -c --quiet - >&2 ||
        { echo "cutlass-fetch: $whl does not match the pinned sha256" >&2; exit 1; }
    # the wheel carries the headers under cutlass_library/source/include
    "$py" - "$whl" "$tmp/unpacked" <<'PY'
import sys, zipfile
prefix = "cutlass_library/source/include/"
with zipfile.ZipFile(sys.argv[1]) as z:
    members = [m for m in z.namelist() if m.startswith(prefix) and not m.endswith("/")]
    if not members:
        sys.exit("cutlass-fetch: no headers under " + prefix)
    for m in members:
        z.extract(m, sys.argv[2])
PY
    mkdir -p "$dest"
    rm -rf "$inc.partial"
    mv "$tmp/unpacked/cutlass_library/source/include" "$inc.partial"
    rm -rf "$inc"
    mv "$inc.partial" "$inc"
fi

if [ "${1:-}" = "--pack" ]; then
    [ -n "${2:-}" ] || { echo "usage: $0 --pack FILE.tar.xz" >&2; exit 2; }
    tar -C "$dest" -cJf "$2" include
fi
echo "$inc"
