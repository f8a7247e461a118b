#!/usr/bin/env bash
# tests/valgrind.sh [-j JOBS] [-L LABEL_REGEX] BUILD_DIR [TEST...] - runs the
# CPU tests under valgrind memcheck: any invalid access, use of uninitialised
# memory, and definite or indirect leak fails the test. BUILD_DIR is a build
# without sanitizers (Debug or Release). issue 6, scenario 16.
#
# Which tests: those named, else every test CTest knows in BUILD_DIR (with
# -L, those whose labels match, as ctest -L), with its CTest arguments, less:
#   - the GPU tests (label gpu; on the GPU machine compute-sanitizer checks them);
#   - test_python: it would check CPython and numpy, not us (the library it
#     loads is the one the C tests check);
#   - test_install: it checks packaging (install tree, CMake and pkg-config
#     consumers), not code of ours that the other tests do not run.
# test_cli runs with the fajit and fajit-prebuild it drives wrapped in valgrind.
#
# Valgrind's choices, and why:
#   --leak-check=full --{show,errors-for}-leak-kinds=definite,indirect: a leak
#     is memory nothing points to any more. "Still reachable" memory (held by
#     a static until exit, as NVRTC's) is not one, nor is "possibly lost":
#     LMDB's ID lists are pointed to one element in (mdb_midl_alloc), so an
#     environment a forked child never closes before _exit reads as that.
#   --log-file=DIR/TEST.%p.log instead of --child-silent-after-fork: the
#     stampede, crash, fork, reader, LRU and trust tests fork workers that run
#     the library themselves; each process writes its own log and a non-empty
#     log (with -q, valgrind writes only errors) fails the test, so errors in
#     children count too. A child SIGKILLed on purpose (test_cache_crash,
#     test_cache_readers) leaves an empty log: nothing to report, by design.
#   No --trace-children: what tests exec is rm, sh and the fajit CLI (through
#     system() in test_cache_bundle and test_tune); tracing sh would cost a
#     valgrind start per command, and the CLI is checked by test_cli instead.
#   tests/valgrind.supp suppresses NVRTC's own allocations and its reads of
#     uninitialised memory inside libnvrtc only; nothing of libfajit's.
# Slow: NVRTC runs ~20-40x slower under valgrind, so the compile-heavy tests
# dominate; -j runs tests in parallel (default: the number of CPUs).
set -u
jobs=$(nproc)
labels=""
while [ $# -gt 0 ]; do
    case $1 in
    -j) jobs=$2; shift 2 ;;
    -j?*) jobs=${1#-j}; shift ;;
    -L) labels=$2; shift 2 ;;
    -L?*) labels=${1#-L}; shift ;;
    *) break ;;
    esac
done
build=$(cd "${1:?usage: valgrind.sh [-j JOBS] [-L LABEL_REGEX] BUILD_DIR [TEST...]}" && pwd) || exit 2
[ -f "$build/CTestTestfile.cmake" ] || { echo "valgrind: $build is not a build directory" >&2; exit 2; }
shift
src=$(cd "$(dirname "$0")/.." && pwd)
scratch=$(mktemp -d /tmp/fajit-valgrind-XXXXXX)
vg="valgrind -q --leak-check=full --show-leak-kinds=definite,indirect
    --errors-for-leak-kinds=definite,indirect --error-exitcode=99
    --suppressions=$src/tests/valgrind.supp"

# One line per test, tab-separated: NAME, its working directory, its CTest
# environment (FAJIT_CACHE_DIR aside: each test gets its own scratch one),
# COMMAND ARGS... From CTest, so that new tests are checked without editing
# this script.
(cd "$build" && ctest --show-only=json-v1 ${labels:+-L "$labels"}) | python3 -c '
import json, sys
wanted = set(sys.argv[1:])
skip = {"test_python", "test_install"}
for t in json.load(sys.stdin)["tests"]:
    props = {p["name"]: p["value"] for p in t.get("properties", [])}
    labels = props.get("LABELS", [])
    if wanted and t["name"] not in wanted:
        continue
    if not wanted and (t["name"] in skip or "gpu" in labels):
        continue
    env = [e for e in props.get("ENVIRONMENT", []) if not e.startswith("FAJIT_CACHE_DIR=")]
    print("\t".join([t["name"], props.get("WORKING_DIRECTORY", "."), " ".join(env) or "-",
                     " ".join(t["command"])]))
' "$@" > "$scratch/tests"
[ -s "$scratch/tests" ] || { echo "valgrind: no test to run" >&2; exit 2; }

# Wrappers that run the CLI under valgrind, for test_cli.
for tool in fajit fajit-prebuild; do
    printf '#!/bin/sh\nexec %s --log-file=%s/test_cli.%%p.log %s/%s "$@"\n' \
        "$(echo $vg)" "$scratch" "$build" "$tool" > "$scratch/$tool"
    chmod +x "$scratch/$tool"
done

# run_one NAME WORKDIR ENV COMMAND ARGS...: prints "ok" or "FAIL" with its time.
run_one() {
    name=$1 dir=$2 env=$3
    shift 3
    [ "$env" = - ] && env=""
    start=$(date +%s)
    if [ "$name" = test_cli ]; then
        set -- "$1" "$scratch/fajit" "$scratch/fajit-prebuild"
    else
        set -- $vg --log-file="$scratch/$name.%p.log" "$@"
    fi
    (cd "$dir" && env $env FAJIT_CACHE_DIR="$scratch/cache-$name" "$@") > "$scratch/$name.out" 2>&1
    rc=$?
    secs=$(($(date +%s) - start))
    errors=$(find "$scratch" -maxdepth 1 -name "$name.*.log" -size +0 | head -n 1)
    if [ "$rc" -eq 0 ] && [ -z "$errors" ]; then
        echo "ok   $name (${secs} s)"
    else
        echo "FAIL $name (exit $rc, ${secs} s; output: $scratch/$name.out)"
        [ -n "$errors" ] && head -n 40 "$errors"
        tail -n 15 "$scratch/$name.out"
        echo "$name" >> "$scratch/failed"
    fi
}

# A pool of $jobs tests at a time.
while IFS=$'\t' read -r name dir env cmd; do
    while [ "$(jobs -pr | wc -l)" -ge "$jobs" ]; do
        wait -n
    done
    run_one "$name" "$dir" "$env" $cmd < /dev/null &
done < "$scratch/tests"
wait
failed=$(cat "$scratch/failed" 2>/dev/null | wc -l)
echo "valgrind: $(wc -l < "$scratch/tests") test(s), $failed failed"
[ "$failed" -eq 0 ] && rm -rf "$scratch"
exit $((failed != 0))
