#!/bin/sh
# tests/valgrind.sh BUILD_DIR [CTEST_REGEX] - runs the CPU tests (default:
# the cache, codegen and fault tests and the API test) under
# valgrind --leak-check=full --error-exitcode=1, through ctest's memcheck.
# NVRTC's own one-time allocations are suppressed (tests/valgrind.supp);
# nothing of ours is. Slow: NVRTC under valgrind takes seconds per compile.
set -eu
build=${1:?usage: valgrind.sh BUILD_DIR [CTEST_REGEX]}
regex=${2:-'^(test_entry|test_store|test_variant|test_manifest|test_serialize|test_render|test_api|test_cache_.*|fuzz_.*)$'}
src=$(cd "$(dirname "$0")/.." && pwd)
cd "$build"
ctest -R "$regex" -E 'test_cache_crash|test_cache_readers|_gpu$' -j2 --timeout 1800 \
    -T memcheck \
    --overwrite MemoryCheckCommand=$(command -v valgrind) \
    --overwrite "MemoryCheckCommandOptions=--leak-check=full --errors-for-leak-kinds=definite,indirect --error-exitcode=1 --track-fds=no --child-silent-after-fork=yes --suppressions=$src/tests/valgrind.supp" \
    --output-on-failure
