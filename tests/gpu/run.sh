#!/usr/bin/env bash
# tests/gpu/run.sh OUTDIR - everything to run on the GPU machine, in one go.
#
# Builds Release into /tmp/b (FAJIT_GPU_BUILD_DIR overrides), runs every CTest
# test (the GPU ones included), the benchmarks, and compute-sanitizer on a quick
# run of test_ref_gpu; writes each step's full log into OUTDIR and prints a
# summary table last. Run from anywhere; assumes `source .gpu-deps/install.sh`
# was done in this shell. Exit status: 0 if every step passed, else 1.
# FAJIT_SKIP_PYTHON=1 leaves out the pytest step and FAJIT_SKIP_BENCH_FWD=1 the
# forward benchmark (each takes minutes; run them in a call of their own when
# the whole would pass the device's 10-minute limit).
set -u -o pipefail

out=${1:?usage: tests/gpu/run.sh OUTDIR}
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
build=${FAJIT_GPU_BUILD_DIR:-/tmp/b}
mkdir -p "$out" && out=$(cd "$out" && pwd) || exit 1

rows=()   # "step|status|seconds|detail"
failed=0

# step NAME LOG COMMAND...: runs COMMAND with stdout+stderr into OUTDIR/LOG.
step() {
    local name=$1 log=$2 start end rc
    shift 2
    echo "== $name: $* (log: $out/$log)"
    start=$(date +%s.%N)
    "$@" >"$out/$log" 2>&1
    rc=$?
    end=$(date +%s.%N)
    last_rc=$rc
    last_secs=$(awk -v a="$start" -v b="$end" 'BEGIN { printf "%.1f", b - a }')
    [ "$rc" -eq 0 ] || failed=1
}

# record NAME DETAIL: one summary row for the step just run.
record() {
    local status=PASS
    [ "$last_rc" -eq 0 ] || status="FAIL($last_rc)"
    rows+=("$1|$status|$last_secs|$2")
}

# First line of LOG matching PATTERN, or "-".
grab() { grep -E -m1 "$2" "$out/$1" 2>/dev/null || echo "-"; }

# ---------------------------------------------------------------- environment
{
    date -u
    uname -a
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>&1
    nvcc --version 2>&1 | tail -2
    cmake --version | head -1
    gcc --version | head -1
    git -C "$root" log --oneline -1 2>&1
} >"$out/environment.log" 2>&1

# ---------------------------------------------------------------- build
step build build.log bash -c "cmake -S '$root' -B '$build' -G Ninja -DCMAKE_BUILD_TYPE=Release && cmake --build '$build'"
record build "$(tail -1 "$out/build.log" | cut -c1-70)"
if [ "$last_rc" -ne 0 ]; then
    tail -30 "$out/build.log"
else
    # ---------------------------------------------------------------- tests
    # -V: the GPU tests' per-case lines go into the log even when they pass.
    step ctest ctest.log ctest --test-dir "$build" --output-on-failure -V -j 8 --output-junit "$out/ctest.xml"
    detail=$(grab ctest.log 'tests passed')
    skipped=$(grep -cE '\*\*\*Skipped|Not Run' "$out/ctest.log")
    [ "$skipped" -eq 0 ] || detail="$detail; $skipped skipped (a GPU test skipped on the GPU machine?)"
    record ctest "$detail"
    # This area's tests: CTest's verdict and the test's own last line (-V
    # prefixes each output line with the test's number).
    for name in test_ref_compile test_ref_gpu test_cache_gpu test_fwd_compile test_fwd_compile_b test_fwd_compile_odd test_fwd_gpu test_fwd_gpu_persist \
                test_features_gpu test_features_gpu_persist test_large_gpu test_bwd_compile test_bwd_gpu test_flash_bwd_compile test_flash_bwd_gpu test_probs_gpu test_tune test_tuned_gpu test_python; do
        line=$(grep -E -m1 "Test +#[0-9]+: $name " "$out/ctest.log")
        num=$(sed -E 's/.*Test +#([0-9]+):.*/\1/' <<<"$line")
        verdict=$(sed -E 's/.* \.+ *//; s/ +/ /g' <<<"$line")
        summary=$(grep -E "^$num: ." "$out/ctest.log" | tail -1 | sed -E 's/^[0-9]+: //' | cut -c1-80)
        rows+=("  $name| | |${verdict:--}: ${summary:--}")
    done

    # ---------------------------------------------------------------- sanitizers
    export FAJIT_CACHE_DIR="$build/test-cache/sanitizer"
    sanitizer=$(command -v compute-sanitizer || echo /usr/local/cuda/bin/compute-sanitizer)
    # One log per tool: each program's run appends to it.
    for tool in memcheck racecheck synccheck initcheck; do
        for prog in test_ref_gpu test_fwd_gpu test_bwd_gpu test_flash_bwd_gpu test_features_gpu; do
            [ -x "$build/tests/$prog" ] || continue
            # The fast kernels' runs: memcheck and racecheck.
            [ "$prog" = test_ref_gpu ] || [ "$tool" = memcheck ] || [ "$tool" = racecheck ] || continue
            args=(--quick)
            [ "$prog" = test_features_gpu ] && args=(--split-only) # the split-KV path
            runs=("$prog")
            [ "$prog" = test_fwd_gpu ] && runs+=(test_fwd_gpu_persist) # and the persistent blocks' loop
            for run in "${runs[@]}"; do
                [ "$run" = test_fwd_gpu_persist ] && args=(--persist 3 --quick)
                step "$tool $run" "sanitizer-$tool-$run.log" "$sanitizer" --tool "$tool" \
                    --error-exitcode 99 "$build/tests/$prog" "${args[@]}"
                record "$tool $run" "$(grab "sanitizer-$tool-$run.log" 'ERROR SUMMARY|RACECHECK SUMMARY|^SKIP' | cut -c1-70)"
                cat "$out/sanitizer-$tool-$run.log" >>"$out/sanitizer-$tool.log"
                rm -f "$out/sanitizer-$tool-$run.log"
            done
        done
    done
    unset FAJIT_CACHE_DIR

    # ---------------------------------------------------------------- python
    if [ -z "${FAJIT_SKIP_PYTHON:-}" ]; then
        step python python.log env FAJIT_LIBRARY="$build/libfajit.so" python3 -m pytest -q -rs "$root/python/tests"
        record python "$(tail -1 "$out/python.log" | cut -c1-90)"
    fi

    # ---------------------------------------------------------------- benchmarks
    step bench_compile bench_compile.log "$build/benchmarks/bench_compile"
    record bench_compile "$(grab bench_compile.log '^cold compile' | sed 's/, median of [0-9]* fresh processes//' | cut -c1-110)"
    rows+=("  cached load| | |$(grab bench_compile.log '^cached load' | sed 's/.*processes: //')")
    step bench_dispatch bench_dispatch.log "$build/benchmarks/bench_dispatch"
    record bench_dispatch "$(grab bench_dispatch.log '^fajit_attn_fwd' | tr -s ' ')"
    rows+=("  bare launch| | |$(grab bench_dispatch.log '^cuLaunchKernel' | tr -s ' ')")
    # Autotuning smoke run: two problems, every candidate checked and timed.
    printf '%s\n' "fwd dqk=128 dtype=fp16 mask=causal batch=4 seqlen=4096 nheads=16" \
        "fwd dqk=64 dtype=bf16 batch=8 seqlen=2048 nheads=32" >"$out/tune.manifest"
    step tune tune.log env FAJIT_CACHE_DIR="$build/test-cache/tune" "$build/fajit" tune "$out/tune.manifest" -j 16
    record tune "$(tail -3 "$out/tune.log" | tr '\n' ' ' | cut -c1-110)"
    if [ -z "${FAJIT_SKIP_BENCH_FWD:-}" ]; then
        step bench_fwd bench_fwd.log python3 "$root/benchmarks/bench_fwd.py" --lib "$build/libfajit.so"
        record bench_fwd "table in bench_fwd.log"
    fi
fi

# ---------------------------------------------------------------- summary
echo
echo "Logs in $out"
printf '%-26s %-10s %8s  %s\n' step status seconds detail
for row in "${rows[@]}"; do
    IFS='|' read -r name status secs detail <<<"$row"
    printf '%-26s %-10s %8s  %s\n' "$name" "$status" "$secs" "$detail"
done
exit "$failed"
