#!/usr/bin/env bash
# Installs what libfajit builds with (Debian packages) and builds it.
#   scripts/setup.sh [BUILD_DIR] [extra cmake args...]
# Sourced by scripts/main.sh and scripts/test.sh; safe to run again.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

need_packages() {
    local missing=()
    command -v cmake >/dev/null || missing+=(cmake)
    command -v ninja >/dev/null || missing+=(ninja-build)
    command -v cc >/dev/null || missing+=(gcc)
    command -v python3 >/dev/null || missing+=(python3)
    command -v pkg-config >/dev/null || missing+=(pkg-config)
    # scripts/test.sh's last stage (it sets FAJIT_NEED_VALGRIND=1).
    [ "${FAJIT_NEED_VALGRIND:-0}" = 0 ] || command -v valgrind >/dev/null || missing+=(valgrind)
    [ -e /usr/include/lmdb.h ] || missing+=(liblmdb-dev)
    [ -e /usr/include/xxhash.h ] || missing+=(libxxhash-dev)
    # The Python binding's CPU tests (tests/python.cmake): pytest and numpy
    # (DLPack parsing), Debian's, for /usr/bin/python3.
    local mod
    for mod in pytest numpy; do
        /usr/bin/python3 -c "import $mod" 2>/dev/null || missing+=(python3-$mod)
    done
    if [ ${#missing[@]} -gt 0 ] && [ -z "${CMAKE_PREFIX_PATH:-}" ]; then
        local sudo=""
        [ "$(id -u)" = 0 ] || sudo=sudo
        echo "setup: installing ${missing[*]}"
        $sudo apt-get update -qq
        DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
    fi
}

find_cuda() {
    if [ -x /usr/local/cuda/bin/nvcc ] || [ -e /usr/local/cuda/include/nvrtc.h ]; then
        export CUDAToolkit_ROOT=${CUDAToolkit_ROOT:-/usr/local/cuda}
        return
    fi
    echo "setup: the CUDA toolkit (NVRTC) was not found in /usr/local/cuda; install it first" >&2
    exit 1
}

fajit_build() {
    local dir=$1
    shift
    need_packages
    find_cuda
    cmake -S "$root" -B "$dir" -G Ninja -DCMAKE_BUILD_TYPE=${FAJIT_BUILD_TYPE:-Release} "$@" >"$dir.configure.log" 2>&1 \
        || { cat "$dir.configure.log"; exit 1; }
    cmake --build "$dir" -j "$(nproc)" >"$dir.build.log" 2>&1 || { tail -50 "$dir.build.log"; exit 1; }
    echo "setup: built $dir"
}

if [ "${BASH_SOURCE[0]}" = "$0" ]; then
    mkdir -p "${1:-$root/build}"
    fajit_build "${1:-$root/build}" "${@:2}"
fi
