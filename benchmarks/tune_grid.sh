#!/usr/bin/env bash
# benchmarks/tune_grid.sh OUTDIR - tunes FlashAttention's benchmark grid
# (forward and backward, `fajit tune`'s default) on this GPU into a fresh
# cache and times it; then tunes bench_decode.py's decode shapes (split-KV
# counts) into the same cache, timed apart; then compares tuned configs with
# the heuristic's cell by cell (benchmarks/bench_tuned.py) in a fresh process
# on that cache. On the GPU machine, after `source .gpu-deps/install.sh`.
# Builds Release into /tmp/b (FAJIT_GPU_BUILD_DIR overrides);
# BENCH_TUNED_ARGS passes options to bench_tuned.py.
set -euo pipefail
out=${1:?usage: benchmarks/tune_grid.sh OUTDIR}
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
build=${FAJIT_GPU_BUILD_DIR:-/tmp/b}
mkdir -p "$out"
cmake -S "$root" -B "$build" -G Ninja -DCMAKE_BUILD_TYPE=Release >"$out/configure.log"
cmake --build "$build" --target fajit fajit_tool >"$out/build.log"
cache="$build/test-cache/tune-grid"
rm -rf "$cache"
seconds() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.1f", b - a }'; }

start=$(date +%s.%N)
FAJIT_CACHE_DIR="$cache" "$build/fajit" tune -j "$(nproc)" >"$out/tune_grid.log" 2>&1
end=$(date +%s.%N)
echo "fajit tune (FlashAttention's grid, forward and backward, empty cache, -j $(nproc)): $(seconds "$start" "$end") s wall"
tail -1 "$out/tune_grid.log"

# bench_decode.py's shapes: one query row, 32 query heads over 8 kv heads.
decode="$out/decode.manifest"
: >"$decode"
for b in 1 8; do
    for sk in 4096 16384 65536 131072; do
        echo "fwd dqk=128 dtype=bf16 batch=$b seqlen_q=1 seqlen_k=$sk nheads_q=32 nheads_kv=8" >>"$decode"
    done
done
start=$(date +%s.%N)
FAJIT_CACHE_DIR="$cache" "$build/fajit" tune -j "$(nproc)" "$decode" >"$out/tune_decode.log" 2>&1
end=$(date +%s.%N)
echo "fajit tune (decode, 8 split-KV problems, same cache): $(seconds "$start" "$end") s wall"
tail -1 "$out/tune_decode.log"

FAJIT_CACHE_DIR="$cache" "$build/fajit" ls --tuning >"$out/tuning.txt"
# shellcheck disable=SC2086 # options split on purpose
python3 "$root/benchmarks/bench_tuned.py" --lib "$build/libfajit.so" --cache "$cache" ${BENCH_TUNED_ARGS:-} |
    tee "$out/bench_tuned.log"
