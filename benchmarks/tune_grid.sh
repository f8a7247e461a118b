#!/usr/bin/env bash
# benchmarks/tune_grid.sh OUTDIR - tunes FlashAttention's benchmark grid on
# this GPU into a fresh cache, times the tuning, then compares tuned tiles
# with the heuristic's cell by cell (benchmarks/bench_tuned.py) in a fresh
# process on that cache. On the GPU machine, after `source .gpu-deps/install.sh`.
# Builds Release into /tmp/b (FAJIT_GPU_BUILD_DIR overrides).
set -euo pipefail
out=${1:?usage: benchmarks/tune_grid.sh OUTDIR}
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
build=${FAJIT_GPU_BUILD_DIR:-/tmp/b}
mkdir -p "$out"
cmake -S "$root" -B "$build" -G Ninja -DCMAKE_BUILD_TYPE=Release >"$out/configure.log"
cmake --build "$build" --target fajit fajit_tool >"$out/build.log"
cache="$build/test-cache/tune-grid"
rm -rf "$cache"
start=$(date +%s.%N)
FAJIT_CACHE_DIR="$cache" "$build/fajit" tune -j "$(nproc)" >"$out/tune_grid.log" 2>&1
end=$(date +%s.%N)
echo "fajit tune (FlashAttention's grid, empty cache, -j $(nproc)): $(awk -v a="$start" -v b="$end" 'BEGIN { printf "%.1f", b - a }') s wall"
tail -4 "$out/tune_grid.log"
FAJIT_CACHE_DIR="$cache" "$build/fajit" ls --tuning >"$out/tuning.txt"
python3 "$root/benchmarks/bench_tuned.py" --lib "$build/libfajit.so" --cache "$cache" | tee "$out/bench_tuned.log"
