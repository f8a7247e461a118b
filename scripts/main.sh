#!/usr/bin/env bash
# The main job: build, prebuild the default manifest into the default cache
# and print its summary; on a machine with a GPU, also run attention checked
# against the reference, with its speed.
#   scripts/main.sh
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
source "$root/scripts/setup.sh"
mkdir -p "$root/build"
fajit_build "$root/build"

echo "== fajit prebuild (default manifest, default cache)"
"$root/build/fajit-prebuild"
"$root/build/fajit" info
echo "== attention on the GPU, checked against an fp64 reference"
"$root/build/examples/fajit_example" 72    # the fast forward kernel
"$root/build/examples/fajit_example" 100   # the fast kernel with 8-byte loads (100 is not a multiple of 8)
"$root/build/examples/fajit_example" 320   # above 256: the reference kernel
