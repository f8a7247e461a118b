#!/bin/sh
# tests/valgrind.sh BUILD_DIR [TEST...] - runs CPU tests under
# valgrind --leak-check=full --error-exitcode=1 (definite and indirect leaks
# and every invalid access are errors). Default: the cache, codegen and fault
# tests and the fuzz corpus replays. NVRTC's own allocations are suppressed
# (tests/valgrind.supp); nothing of ours is. Slow: NVRTC under valgrind takes
# seconds per compile, so the default set takes several minutes.
set -u
build=${1:?usage: valgrind.sh BUILD_DIR [TEST...]}
shift
src=$(cd "$(dirname "$0")/.." && pwd)
tests=${*:-"test_entry test_store test_variant test_manifest test_serialize test_render
  test_cache_faults test_cache_collision test_cache_key test_cache_lru test_cache_fork
  test_cache_bundle test_cache_corruption fuzz_variant_replay fuzz_manifest_replay
  fuzz_entry_replay"}
scratch=$(mktemp -d /tmp/fajit-valgrind-XXXXXX)
failed=0
for t in $tests; do
    args=""
    case $t in fuzz_*_replay) f=${t#fuzz_}; args="$src/tests/fuzz/corpus/${f%_replay}" ;; esac
    if FAJIT_CACHE_DIR="$scratch/$t" valgrind -q --leak-check=full \
        --errors-for-leak-kinds=definite,indirect --error-exitcode=99 \
        --child-silent-after-fork=yes --suppressions="$src/tests/valgrind.supp" \
        "$build/tests/$t" $args > "$scratch/$t.log" 2>&1; then
        echo "ok   $t"
    else
        echo "FAIL $t (log: $scratch/$t.log)"
        tail -n 30 "$scratch/$t.log"
        failed=$((failed + 1))
    fi
done
echo "valgrind: $failed test(s) failed"
[ "$failed" -eq 0 ] && rm -rf "$scratch"
exit $((failed != 0))
