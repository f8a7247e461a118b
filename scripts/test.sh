#!/usr/bin/env bash
# The whole test suite: a Release build with its tests, then the same under
# AddressSanitizer + UndefinedBehaviorSanitizer, then the cache and fault
# tests under valgrind. Tests that need a GPU skip, with a one-line reason, on
# a machine without one.
#   scripts/test.sh            (FAJIT_VALGRIND=0 leaves the valgrind stage out)
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
source "$root/scripts/setup.sh"
jobs=$(nproc)

mkdir -p "$root/build" "$root/build-asan"
[ "${FAJIT_VALGRIND:-1}" = 0 ] || export FAJIT_NEED_VALGRIND=1 # setup installs it
fajit_build "$root/build"
(cd "$root/build" && ctest --output-on-failure -j "$jobs")

FAJIT_BUILD_TYPE=Debug fajit_build "$root/build-asan" -DFAJIT_SANITIZE=ON
# The install test is left out here: its consumers are built without ASan.
# LSan cannot run under some sandboxes (ptrace); leaks are still checked where it can.
(cd "$root/build-asan" && ASAN_OPTIONS=detect_leaks=${FAJIT_DETECT_LEAKS:-1}:abort_on_error=1 \
    UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1 ctest --output-on-failure -j "$jobs" -LE 'gpu|install')
# Valgrind on the release build (no sanitizers): the tests labelled cache (the
# cache and fault tests: forked workers, killed writers, injected faults,
# hand-damaged files; about 8 minutes on 2 cores). Every CPU test under
# valgrind takes about 53 minutes here, NVRTC running ~35x slower, so the
# rest is run by hand: tests/valgrind.sh build.
stages="release, asan+ubsan"
if [ "${FAJIT_VALGRIND:-1}" != 0 ]; then
    command -v valgrind >/dev/null || {
        echo "test.sh: valgrind not found: apt-get install valgrind (or FAJIT_VALGRIND=0)" >&2
        exit 1
    }
    "$root/tests/valgrind.sh" -j "$jobs" -L cache "$root/build"
    stages="$stages, valgrind"
fi
echo "test.sh: all tests passed ($stages)"
