/*
 * tests/fuzz/fuzz_variant.c - the variant-text parsers: strict
 * fajit__variant_parse and lenient fajit__spec_parse on arbitrary bytes.
 * Invariants: a strict parse that succeeds formats back to the same text;
 * a spec that parses and checks formats, and that text parses strictly to
 * the same variant.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "codegen/variant.h"
#include "fuzz.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    char text[1024], out[FAJIT__VARIANT_TEXT_MAX];
    fajit__variant v, w;
    if (size >= sizeof text)
        return 0;
    memcpy(text, data, size);
    text[size] = '\0';
    if (fajit__variant_parse(text, &v) == 0) {
        FUZZ_ASSERT(fajit__variant_format(&v, out, sizeof out) >= 0);
        FUZZ_ASSERT(strcmp(out, text) == 0);
    }
    if (fajit__spec_parse(text, &v) == 0 && v.bm != FAJIT__UNSET && v.bn != FAJIT__UNSET &&
        v.warps != FAJIT__UNSET && v.stages != FAJIT__UNSET && v.arch != FAJIT__UNSET &&
        fajit__variant_check(&v) == 0) {
        FUZZ_ASSERT(fajit__variant_format(&v, out, sizeof out) >= 0);
        FUZZ_ASSERT(fajit__variant_parse(out, &w) == 0);
        FUZZ_ASSERT(memcmp(&v, &w, sizeof v) == 0);
    }
    return 0;
}
