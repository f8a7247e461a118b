/*
 * tests/fuzz/fuzz_manifest.c - the manifest expander on arbitrary text.
 * Expansion stops after 2000 variants (a range can expand to millions, which
 * is slow, not wrong). Invariant: every spec handed out has a line number
 * within the text.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "codegen/variant.h"
#include "fuzz.h"

struct count {
    int n, lines;
};

static int on_spec(void *user, const fajit__variant *spec, int line)
{
    struct count *c = user;
    char out[FAJIT__VARIANT_TEXT_MAX];
    FUZZ_ASSERT(line >= 1 && line <= c->lines);
    if (fajit__variant_check(spec) == 0 && spec->arch != FAJIT__UNSET && spec->bm != FAJIT__UNSET &&
        spec->bn != FAJIT__UNSET && spec->warps != FAJIT__UNSET && spec->stages != FAJIT__UNSET)
        FUZZ_ASSERT(fajit__variant_format(spec, out, sizeof out) >= 0);
    return ++c->n >= 2000;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    static char text[1 << 16];
    struct count c = {0, 1};
    if (size >= sizeof text)
        return 0;
    memcpy(text, data, size);
    text[size] = '\0';
    for (size_t i = 0; i < size; i++)
        c.lines += text[i] == '\n';
    fajit__manifest_expand(text, on_spec, &c);
    return 0;
}
