#!/bin/sh
# tests/fuzz/run.sh BUILD_DIR [SECONDS] - builds the fuzz targets with clang,
# libFuzzer, ASan and UBSan, and fuzzes each for SECONDS (default 120), starting
# from the committed corpus (new inputs go to a scratch copy, not the tree).
# BUILD_DIR is a configured build of this tree (for generated/fajit_embedded.c).
# A finding leaves a crash-* file in the scratch directory and exits non-zero.
set -eu
build=${1:?usage: run.sh BUILD_DIR [SECONDS]}
secs=${2:-120}
src=$(cd "$(dirname "$0")/../.." && pwd)
out=${FUZZ_OUT:-/tmp/fajit-fuzz}
mkdir -p "$out"
cflags="-g -O1 -fsanitize=fuzzer,address,undefined -fno-sanitize-recover=undefined -D_GNU_SOURCE -std=c11"
inc="-I$src -I$src/include -I$src/tests/fuzz"
libsrc="$src/runtime/error.c $src/codegen/ops.c $src/codegen/variant.c $src/codegen/manifest.c
        $src/codegen/serialize.c $src/codegen/render.c $build/generated/fajit_embedded.c
        $src/cache/entry.c $src/cache/store.c"
for t in variant manifest entry; do
    clang $cflags $inc -o "$out/fuzz_$t" "$src/tests/fuzz/fuzz_$t.c" $libsrc -llmdb -lxxhash -lpthread
    mkdir -p "$out/corpus-$t"
    cp "$src/tests/fuzz/corpus/$t/"* "$out/corpus-$t/"
    (cd "$out" && ./fuzz_$t -max_total_time="$secs" -max_len=65536 -rss_limit_mb=4096 \
        "corpus-$t" 2>&1 | tail -n 3)
done
echo "fuzz: no findings in ${secs} s per target"
