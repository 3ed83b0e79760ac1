#!/usr/bin/env bash
# run.sh - installs a libmoe build into a fresh prefix and builds and runs the consumer of
# tests/install out of tree, twice: with find_package(moe) (shared and static targets) and with
# pkg-config (shared, and static from Libs.private).
# usage: tests/install/run.sh BUILD_DIR WORK_DIR
set -euo pipefail
build=$1
work=$2
here=$(cd "$(dirname "$0")" && pwd)
rm -rf "$work"
mkdir -p "$work"
prefix=$work/prefix

cmake --install "$build" --prefix "$prefix" >/dev/null
for f in include/moe/moe.h; do
    [ -f "$prefix/$f" ] || { echo "install: $f missing" >&2; exit 1; }
done
cfg=$(find "$prefix" -name moeConfig.cmake)
pc=$(find "$prefix" -name libmoe.pc)
[ -n "$cfg" ] && [ -f "$(dirname "$cfg")/moeConfigVersion.cmake" ] && [ -n "$pc" ] ||
    { echo "install: moeConfig.cmake, moeConfigVersion.cmake or libmoe.pc missing" >&2; exit 1; }

echo "== find_package(moe)"
generator=()
command -v ninja >/dev/null && generator=(-G Ninja)
cmake -S "$here" -B "$work/cmake" "${generator[@]}" -DCMAKE_BUILD_TYPE=Release \
      -DCMAKE_PREFIX_PATH="$prefix" >"$work/cmake.log" || { cat "$work/cmake.log"; exit 1; }
cmake --build "$work/cmake" >>"$work/cmake.log" || { cat "$work/cmake.log"; exit 1; }
"$work/cmake/consumer_shared"
"$work/cmake/consumer_static"
# the shared consumer uses the installed library, not the build tree's
# (ldd's output read whole first: grep -q stops reading early, and pipefail would count
# the writer's SIGPIPE as a failure)
libs=$(ldd "$work/cmake/consumer_shared")
grep -q "$prefix/.*libmoe.so" <<<"$libs" ||
    { echo "consumer_shared does not load libmoe from $prefix" >&2; echo "$libs"; exit 1; }

echo "== pkg-config libmoe"
export PKG_CONFIG_PATH=$(dirname "$pc")
cc=${CC:-cc}
libdir=$(pkg-config --variable=libdir libmoe)
[ "$(pkg-config --modversion libmoe)" = "$(sed -n 's/^Version: //p' "$pc")" ]
# shellcheck disable=SC2046
"$cc" -std=c11 -o "$work/consumer_pc" "$here/consumer.c" $(pkg-config --cflags --libs libmoe) \
      -Wl,-rpath,"$libdir"
"$work/consumer_pc"
# static: libmoe.a in place of -lmoe, then what Libs.private says it needs
# shellcheck disable=SC2046
"$cc" -std=c11 -o "$work/consumer_pc_static" "$here/consumer.c" $(pkg-config --cflags libmoe) \
      $(pkg-config --static --libs libmoe | sed "s|-lmoe\b|$libdir/libmoe.a|")
"$work/consumer_pc_static"
echo "install consumers: OK"
