/*
 * tests/test_codegen_includes.c - the include inliner and the codegen digest
 * against a made-up set of embedded files, so that nesting, repeats, #pragma
 * once, a missing file and files without a final newline are all exercised
 * whatever the real templates happen to include.
 *
 * This program defines the embedded table itself and is linked with the
 * codegen sources, not the library's objects (tests/codegen.cmake).
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "codegen/embedded.h"
#include "codegen/variant.h"
#include "fajit.h"
#include "runtime/error.h"

#define FILE_ENTRY(name, text) {name, (const unsigned char *)(text), sizeof(text) - 1}

/* Sorted by name, like the generated table. */
const struct fajit__embedded_file fajit__embedded_files[] = {
    FILE_ENTRY("a.h", "#pragma once\n"
                      "#include \"b.h\"\n"
                      "int a;\n"),
    FILE_ENTRY("b.h", "  #  pragma   once  \n"
                      "int b;"), /* no final newline */
    FILE_ENTRY("flash_bwd.cuh", "#include \"flash_bwd.cuh\"\n" /* itself: already in */
                                "void bwd();\n"),
    FILE_ENTRY("flash_fwd.cuh", "int f;\n"
                                "#include \"a.h\"\n"
                                "#include \"missing.h\"\n"),
    FILE_ENTRY("reference.cuh", "// top\n"
                                "#include \"a.h\"\n"
                                "#include <cuda_fp16.h>\n"
                                "\t#include   \"b.h\"  // again\n"
                                "#include \"a.h\"\n"
                                "// #include \"missing.h\" in a comment stays\n"
                                "extern \"C\" __global__ void fajit_ref_fwd() {}\n"),
    {0, 0, 0},
};
const size_t fajit__embedded_count = 5;
const unsigned char fajit__codegen_sources_sha256[32] = {1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11,
                                                         12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22,
                                                         23, 24, 25, 26, 27, 28, 29, 30, 31, 32};

static int failures;

static void check(int ok, const char *what)
{
    printf("%s %s\n", ok ? "ok  " : "FAIL", what);
    if (!ok) {
        printf("     detail: '%s'\n", fajit_last_error());
        failures++;
    }
}

static const char *const text =
    "ref dqk=8 dv=16 dtype=fp16 mask=none window=-1,-1 dropout=0 softcap=0 alibi=0 varlen=0 "
    "paged=0 bm=64 bn=64 warps=4 stages=1 arch=sm_80";

static const char *const expected_body =
    "#line 1 \"reference.cuh\"\n"
    "// top\n"
    "#line 1 \"a.h\"\n"
    "\n"
    "#line 1 \"b.h\"\n"
    "\n"
    "int b;\n"
    "#line 3 \"a.h\"\n"
    "int a;\n"
    "#line 3 \"reference.cuh\"\n"
    "#include <cuda_fp16.h>\n"
    "\n"
    "\n"
    "// #include \"missing.h\" in a comment stays\n"
    "extern \"C\" __global__ void fajit_ref_fwd() {}\n";

static void test_inlining(void)
{
    fajit__variant v;
    char *src = NULL;
    size_t len = 0;
    const char *entry = NULL;
    fajit__variant_parse(text, &v);
    int rc = fajit__render(&v, &src, &len, &entry);
    check(rc == 0, "renders with the made-up files");
    if (rc)
        return;
    const char *body = strstr(src, "#line 1 \"reference.cuh\"\n");
    check(body && strcmp(body, expected_body) == 0,
          "nested includes inlined once each, pragma once blanked, <...> kept, #line restores");
    if (!body || strcmp(body, expected_body) != 0)
        printf("---- got:\n%s---- want:\n%s----\n", body ? body : src, expected_body);
    check(strncmp(src, "// fajit variant: ref dqk=8 dv=16 ", 34) == 0 &&
              strstr(src, "static constexpr int FAJIT_DQK = 8;\nstatic constexpr int FAJIT_DV = 16;\n") &&
              strstr(src, "static constexpr int FAJIT_ARCH = 80;\n#line 1 \"reference.cuh\"\n"),
          "header line and prelude before the template");
    check(len == strlen(src) && entry && strcmp(entry, "fajit_ref_fwd") == 0, "length and entry name");
    free(src);

    v.op = FAJIT__OP_FWD;
    src = (char *)"untouched";
    rc = fajit__render(&v, &src, &len, &entry);
    check(rc == FAJIT_EINVAL && src == NULL &&
              strstr(fajit_last_error(), "flash_fwd.cuh:3: #include \"missing.h\": not an embedded file"),
          "an include of a file not embedded: EINVAL naming it, the file and the line");

    v.op = FAJIT__OP_BWD;
    rc = fajit__render(&v, &src, &len, &entry);
    check(rc == 0 && strstr(src, "#line 1 \"flash_bwd.cuh\"\n\nvoid bwd();\n") &&
              entry && strcmp(entry, "fajit_flash_bwd") == 0,
          "a template including itself: the include is dropped");
    if (rc == 0)
        free(src);
}

/* Golden: the digest of this fixed table, computed once by the implementation.
 * It changes only if the digest recipe changes (and with it every build id). */
static void test_digest(void)
{
    char hex[33];
    const uint8_t *d = fajit__codegen_digest();
    for (int i = 0; i < 16; i++)
        sprintf(hex + 2 * i, "%02x", d[i]);
    printf("     digest %s\n", hex);
    check(strcmp(hex, "3fae8751e4176afe98a1432f16849acb") == 0, "codegen digest of the made-up table matches its golden value");
}

int main(void)
{
    test_inlining();
    test_digest();
    printf("%s: %d failure(s)\n", failures ? "FAIL" : "PASS", failures);
    return failures ? 1 : 0;
}
