#!/usr/bin/env bash
# gpu-deps.sh - packs what the GPU machine lacks into one folder that travels with the tree:
#   .gpu-deps/openblas.tar.xz  OpenBLAS 0.3.21 (Debian's libopenblas0-pthread + headers) with the
#                              libgfortran / libquadmath it needs, laid out as a prefix (lib/, include/)
#   .gtest-src/                GoogleTest sources (Debian's /usr/src/googletest), built in-tree
#   .gpu-deps/cutlass.tar.xz   the pinned CUTLASS headers (scripts/cutlass-fetch.sh)
# Run it here (a Debian machine with libopenblas-dev and googletest installed); gpu-check.sh
# unpacks the tarball when the GPU machine has no OpenBLAS of its own.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
DEST=${1:-$ROOT}
stage=$(mktemp -d)
trap 'rm -rf "$stage"' EXIT
mkdir -p "$stage/openblas/lib" "$stage/openblas/include"
libdir=/usr/lib/x86_64-linux-gnu
so=$(readlink -f $libdir/openblas-pthread/libopenblas.so.0)
cp "$so" "$stage/openblas/lib/"
ln -s "$(basename "$so")" "$stage/openblas/lib/libopenblas.so.0"
ln -s "$(basename "$so")" "$stage/openblas/lib/libopenblas.so"
for l in libgfortran.so.5 libquadmath.so.0; do cp -L "$libdir/$l" "$stage/openblas/lib/"; done
cp /usr/include/x86_64-linux-gnu/openblas-pthread/*.h "$stage/openblas/include/"
mkdir -p "$DEST/.gpu-deps"
tar -C "$stage" -cJf "$DEST/.gpu-deps/openblas.tar.xz" openblas
"$ROOT/scripts/cutlass-fetch.sh" --pack "$DEST/.gpu-deps/cutlass.tar.xz" >/dev/null
if [ -d /usr/src/googletest ] && [ ! -d "$DEST/.gtest-src" ]; then
    cp -r /usr/src/googletest "$DEST/.gtest-src"
fi
ls -la "$DEST/.gpu-deps"
