#!/usr/bin/env bash
# Installs the build into a temporary prefix, then builds and runs two consumers:
# examples/consumer through find_package(fajit), and the same source through
# pkg-config. Also runs the installed fajit-prebuild on a one-line manifest.
#   test_install.sh BUILD_DIR SOURCE_DIR
set -euo pipefail
build=$1 src=$2
tmp=$(mktemp -d /tmp/fajit-install-XXXXXX)
trap 'rm -rf "$tmp"' EXIT
fail() { echo "FAIL $*"; exit 1; }

cmake --install "$build" --prefix "$tmp/prefix" >"$tmp/install.log" || { cat "$tmp/install.log"; fail "cmake --install"; }
for f in include/fajit.h bin/fajit bin/fajit-prebuild share/fajit/default.manifest; do
    [ -e "$tmp/prefix/$f" ] || fail "installed tree lacks $f"
done
libdir=$(cd "$tmp/prefix" && ls -d lib*/cmake/fajit | head -1 | cut -d/ -f1)
[ -e "$tmp/prefix/$libdir/pkgconfig/fajit.pc" ] || fail "no pkg-config file"
echo "ok   installed header, libraries, tools, manifest, CMake package and pkg-config file"

cmake -S "$src/examples/consumer" -B "$tmp/consumer" -G Ninja -DCMAKE_PREFIX_PATH="$tmp/prefix" \
    >"$tmp/consumer.log" 2>&1 || { cat "$tmp/consumer.log"; fail "find_package(fajit)"; }
cmake --build "$tmp/consumer" >>"$tmp/consumer.log" 2>&1 || { cat "$tmp/consumer.log"; fail "consumer build"; }
LD_LIBRARY_PATH="$tmp/prefix/$libdir${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" "$tmp/consumer/consumer" | grep -q "compiled 'ref dqk=100" \
    || fail "consumer (find_package) did not run"
echo "ok   a find_package(fajit) consumer builds and runs"

export PKG_CONFIG_PATH="$tmp/prefix/$libdir/pkgconfig"
unset PKG_CONFIG_SYSROOT_DIR  # set on the GPU host for its carried packages; wrong for ours
cc -std=c11 $(pkg-config --cflags fajit) "$src/examples/consumer/main.c" -o "$tmp/pc-consumer" \
    $(pkg-config --libs fajit) -Wl,-rpath,"$tmp/prefix/$libdir" || fail "pkg-config build"
"$tmp/pc-consumer" | grep -q "compiled" || fail "consumer (pkg-config) did not run"
echo "ok   a pkg-config consumer builds and runs"

echo "ref dqk=64 arch=sm_90" | FAJIT_CACHE_DIR="$tmp/cache" "$tmp/prefix/bin/fajit-prebuild" - >"$tmp/pb.log" 2>&1 \
    || { cat "$tmp/pb.log"; fail "installed fajit-prebuild"; }
grep -q "1 compiled" "$tmp/pb.log" || { cat "$tmp/pb.log"; fail "installed prebuild summary"; }
echo "ok   the installed fajit-prebuild compiles into a cache"
echo "PASS"
