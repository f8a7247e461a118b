#!/usr/bin/env bash
# The whole test suite: a Release build with its tests, then the same under
# AddressSanitizer + UndefinedBehaviorSanitizer. Tests that need a GPU skip,
# with a one-line reason, on a machine without one.
#   scripts/test.sh
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
source "$root/scripts/setup.sh"
jobs=$(nproc)

mkdir -p "$root/build" "$root/build-asan"
fajit_build "$root/build"
(cd "$root/build" && ctest --output-on-failure -j "$jobs")

FAJIT_BUILD_TYPE=Debug fajit_build "$root/build-asan" -DFAJIT_SANITIZE=ON
# The install test is left out here: its consumers are built without ASan.
# LSan cannot run under some sandboxes (ptrace); leaks are still checked where it can.
(cd "$root/build-asan" && ASAN_OPTIONS=detect_leaks=${FAJIT_DETECT_LEAKS:-1}:abort_on_error=1 \
    UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1 ctest --output-on-failure -j "$jobs" -LE 'gpu|install')
echo "test.sh: all tests passed (release and asan+ubsan)"
