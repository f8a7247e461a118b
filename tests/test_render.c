/*
 * tests/test_render.c - rendering with the real embedded templates: the
 * prelude, includes inlined (each once, none left), determinism, every field
 * reaching the source, clean failures, and the codegen digest.
 */
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define XXH_STATIC_LINKING_ONLY
#include <xxhash.h>

#include "codegen/embedded.h"
#include "codegen/variant.h"
#include "fajit.h"
#include "runtime/error.h"

static int failures;

static void check(int ok, const char *what)
{
    printf("%s %s\n", ok ? "ok  " : "FAIL", what);
    if (!ok) {
        printf("     detail: '%s'\n", fajit_last_error());
        failures++;
    }
}

static const char *const example =
    "ref dqk=72 dv=72 dtype=bf16 mask=causal window=-1,-1 dropout=0 softcap=0 alibi=0 varlen=0 "
    "paged=0 bm=4 bn=32 warps=4 stages=1 arch=sm_90";

static const char *const example_prelude =
    "// fajit variant: ref dqk=72 dv=72 dtype=bf16 mask=causal window=-1,-1 dropout=0 softcap=0 "
    "alibi=0 varlen=0 paged=0 bm=4 bn=32 warps=4 stages=1 arch=sm_90\n"
    "static constexpr int FAJIT_OP = 0;\n"
    "static constexpr int FAJIT_DQK = 72;\n"
    "static constexpr int FAJIT_DV = 72;\n"
    "static constexpr int FAJIT_DTYPE = 1;\n"
    "static constexpr int FAJIT_MASK = 1;\n"
    "static constexpr int FAJIT_WINDOW_LEFT = -1;\n"
    "static constexpr int FAJIT_WINDOW_RIGHT = -1;\n"
    "static constexpr int FAJIT_DROPOUT = 0;\n"
    "static constexpr int FAJIT_SOFTCAP = 0;\n"
    "static constexpr int FAJIT_ALIBI = 0;\n"
    "static constexpr int FAJIT_VARLEN = 0;\n"
    "static constexpr int FAJIT_PAGED = 0;\n"
    "static constexpr int FAJIT_BM = 4;\n"
    "static constexpr int FAJIT_BN = 32;\n"
    "static constexpr int FAJIT_WARPS = 4;\n"
    "static constexpr int FAJIT_STAGES = 1;\n"
    "static constexpr int FAJIT_SMEM_BYTES = 0;\n"
    "static constexpr int FAJIT_PERSIST = 0;\n"
    "static constexpr int FAJIT_ARCH = 90;\n"
    "#line 1 \"reference.cuh\"\n";

static int embedded(const char *name)
{
    for (size_t i = 0; i < fajit__embedded_count; i++)
        if (strcmp(fajit__embedded_files[i].name, name) == 0)
            return 1;
    return 0;
}

static size_t count(const char *hay, const char *needle)
{
    size_t n = 0;
    for (const char *p = strstr(hay, needle); p; p = strstr(p + 1, needle))
        n++;
    return n;
}

/* No line of src is a quoted #include of an embedded file or a #pragma once. */
static int includes_resolved(const char *src)
{
    for (size_t i = 0; i < fajit__embedded_count; i++) {
        char inc[300];
        snprintf(inc, sizeof inc, "#include \"%s\"", fajit__embedded_files[i].name);
        if (strstr(src, inc)) {
            printf("     left in the source: %s\n", inc);
            return 0;
        }
    }
    return !strstr(src, "#pragma once");
}

/* Each embedded file appears at most once ("#line 1" opens it). */
static int each_file_once(const char *src)
{
    for (size_t i = 0; i < fajit__embedded_count; i++) {
        char mark[300];
        snprintf(mark, sizeof mark, "#line 1 \"%s\"\n", fajit__embedded_files[i].name);
        if (count(src, mark) > 1) {
            printf("     %s inlined %zu times\n", fajit__embedded_files[i].name, count(src, mark));
            return 0;
        }
    }
    return 1;
}

static void test_reference(void)
{
    fajit__variant v;
    char *a = NULL, *b = NULL;
    size_t alen = 0, blen = 0;
    const char *entry = NULL;

    if (!embedded("reference.cuh")) {
        fajit__variant_parse(example, &v);
        check(fajit__render(&v, &a, &alen, &entry) == FAJIT_EUNSUPPORTED && a == NULL &&
                  strstr(fajit_last_error(), "no template reference.cuh embedded"),
              "reference.cuh not embedded yet: EUNSUPPORTED, nothing returned");
        return;
    }
    fajit__variant_parse(example, &v);
    int rc = fajit__render(&v, &a, &alen, &entry);
    check(rc == 0 && a && alen == strlen(a), "ref variant renders; length matches the NUL-terminated text");
    if (rc != 0)
        return;
    check(strncmp(a, example_prelude, strlen(example_prelude)) == 0,
          "source starts with the canonical-text comment, the prelude, then the template");
    check(entry && strcmp(entry, "fajit_ref_fwd") == 0 && strstr(a, "fajit_ref_fwd(") != NULL,
          "entry is fajit_ref_fwd and the source defines it");
    check(includes_resolved(a), "no #include of an embedded file and no #pragma once left");
    check(each_file_once(a), "every embedded file inlined at most once");
    check(!embedded("common.cuh") || strstr(a, "#line 1 \"common.cuh\"\n"), "common.cuh inlined");

    rc = fajit__render(&v, &b, &blen, NULL);
    check(rc == 0 && blen == alen && memcmp(a, b, alen) == 0, "rendering twice gives identical bytes");
    free(b);

    /* Every field reaches the source. */
    static const char *const changed[] = {
        "ref dqk=73 dv=72 dtype=bf16 mask=causal window=-1,-1 dropout=0 softcap=0 alibi=0 varlen=0 paged=0 bm=4 bn=32 warps=4 stages=1 arch=sm_90",
        "ref dqk=72 dv=71 dtype=bf16 mask=causal window=-1,-1 dropout=0 softcap=0 alibi=0 varlen=0 paged=0 bm=4 bn=32 warps=4 stages=1 arch=sm_90",
        "ref dqk=72 dv=72 dtype=fp16 mask=causal window=-1,-1 dropout=0 softcap=0 alibi=0 varlen=0 paged=0 bm=4 bn=32 warps=4 stages=1 arch=sm_90",
        "ref dqk=72 dv=72 dtype=bf16 mask=causal-tl window=-1,-1 dropout=0 softcap=0 alibi=0 varlen=0 paged=0 bm=4 bn=32 warps=4 stages=1 arch=sm_90",
        "ref dqk=72 dv=72 dtype=bf16 mask=causal window=8,-1 dropout=0 softcap=0 alibi=0 varlen=0 paged=0 bm=4 bn=32 warps=4 stages=1 arch=sm_90",
        "ref dqk=72 dv=72 dtype=bf16 mask=causal window=-1,8 dropout=0 softcap=0 alibi=0 varlen=0 paged=0 bm=4 bn=32 warps=4 stages=1 arch=sm_90",
        "ref dqk=72 dv=72 dtype=bf16 mask=causal window=-1,-1 dropout=1 softcap=0 alibi=0 varlen=0 paged=0 bm=4 bn=32 warps=4 stages=1 arch=sm_90",
        "ref dqk=72 dv=72 dtype=bf16 mask=causal window=-1,-1 dropout=0 softcap=1 alibi=0 varlen=0 paged=0 bm=4 bn=32 warps=4 stages=1 arch=sm_90",
        "ref dqk=72 dv=72 dtype=bf16 mask=causal window=-1,-1 dropout=0 softcap=0 alibi=1 varlen=0 paged=0 bm=4 bn=32 warps=4 stages=1 arch=sm_90",
        "ref dqk=72 dv=72 dtype=bf16 mask=causal window=-1,-1 dropout=0 softcap=0 alibi=0 varlen=1 paged=0 bm=4 bn=32 warps=4 stages=1 arch=sm_90",
        "ref dqk=72 dv=72 dtype=bf16 mask=causal window=-1,-1 dropout=0 softcap=0 alibi=0 varlen=0 paged=1 bm=4 bn=32 warps=4 stages=1 arch=sm_90",
        "ref dqk=72 dv=72 dtype=bf16 mask=causal window=-1,-1 dropout=0 softcap=0 alibi=0 varlen=0 paged=0 bm=8 bn=32 warps=4 stages=1 arch=sm_90",
        "ref dqk=72 dv=72 dtype=bf16 mask=causal window=-1,-1 dropout=0 softcap=0 alibi=0 varlen=0 paged=0 bm=4 bn=64 warps=4 stages=1 arch=sm_90",
        "ref dqk=72 dv=72 dtype=bf16 mask=causal window=-1,-1 dropout=0 softcap=0 alibi=0 varlen=0 paged=0 bm=4 bn=32 warps=2 stages=1 arch=sm_90",
        "ref dqk=72 dv=72 dtype=bf16 mask=causal window=-1,-1 dropout=0 softcap=0 alibi=0 varlen=0 paged=0 bm=4 bn=32 warps=4 stages=1 arch=sm_80",
        "ref dqk=72 dv=72 dtype=bf16 mask=causal window=-1,-1 dropout=0 softcap=0 alibi=0 varlen=0 paged=0 bm=4 bn=32 warps=4 stages=1 arch=sm_90a",
    };
    int differ = 1;
    for (size_t i = 0; i < sizeof changed / sizeof changed[0]; i++) {
        fajit__variant w;
        char *c = NULL;
        size_t clen = 0;
        if (fajit__variant_parse(changed[i], &w) != 0 || fajit__render(&w, &c, &clen, NULL) != 0 ||
            (clen == alen && memcmp(a, c, alen) == 0) || strncmp(c + strlen("// fajit variant: "), changed[i], strlen(changed[i])) != 0) {
            printf("     not different, or failed: %s (%s)\n", changed[i], fajit_last_error());
            differ = 0;
        }
        free(c);
    }
    check(differ, "changing any one field (16 cases) changes the source and its header line");
    free(a);
}

static void test_failures(void)
{
    fajit__variant v;
    char *src = (char *)"untouched";
    size_t len = 99;
    const char *entry = NULL;

    fajit__variant_parse(example, &v);
    v.op = FAJIT__OP_FWD;
    v.bm = 128;
    if (!embedded("flash_fwd.cuh"))
        check(fajit__render(&v, &src, &len, &entry) == FAJIT_EUNSUPPORTED && src == NULL && len == 0 &&
                  strstr(fajit_last_error(), "no template flash_fwd.cuh embedded"),
              "fwd with no flash_fwd.cuh: EUNSUPPORTED naming the template");
    v.op = FAJIT__OP_BWD;
    if (!embedded("flash_bwd.cuh"))
        check(fajit__render(&v, &src, &len, &entry) == FAJIT_EUNSUPPORTED && src == NULL &&
                  strstr(fajit_last_error(), "no template flash_bwd.cuh embedded"),
              "bwd with no flash_bwd.cuh: EUNSUPPORTED naming the template");
    fajit__variant_parse(example, &v);
    v.bn = FAJIT__UNSET;
    src = (char *)"untouched";
    check(fajit__render(&v, &src, &len, &entry) == FAJIT_EINVAL && src == NULL &&
              strstr(fajit_last_error(), "bn: unset"),
          "an unset tile field: EINVAL, nothing returned");
    fajit__variant_parse(example, &v);
    v.dqk = 1000;
    check(fajit__render(&v, &src, &len, &entry) == FAJIT_EINVAL && strstr(fajit_last_error(), "dqk=1000"),
          "an out-of-range field: EINVAL naming it");
}

/* ---------------------------------------------------------------- digest */

static void *digest_thread(void *arg)
{
    memcpy(arg, fajit__codegen_digest(), 16);
    return NULL;
}

/* The documented recipe, recomputed here: each embedded file's name with its
 * NUL, its length as u64 LE, its bytes; then the codegen sources' SHA-256. */
static void expected_digest(uint8_t out[16])
{
    XXH3_state_t st;
    XXH128_canonical_t c;
    XXH3_INITSTATE(&st);
    XXH3_128bits_reset(&st);
    for (size_t i = 0; i < fajit__embedded_count; i++) {
        const struct fajit__embedded_file *f = &fajit__embedded_files[i];
        uint8_t le[8];
        for (int k = 0; k < 8; k++)
            le[k] = (uint8_t)((uint64_t)f->len >> (8 * k));
        XXH3_128bits_update(&st, f->name, strlen(f->name) + 1);
        XXH3_128bits_update(&st, le, 8);
        XXH3_128bits_update(&st, f->data, f->len);
    }
    XXH3_128bits_update(&st, fajit__codegen_sources_sha256, 32);
    XXH128_canonicalFromHash(&c, XXH3_128bits_digest(&st));
    memcpy(out, c.digest, 16);
}

static void test_digest(void)
{
    enum { T = 8 };
    pthread_t th[T];
    uint8_t got[T][16], want[16], zero[16] = {0};
    int same = 1;

    for (int i = 0; i < T; i++)
        pthread_create(&th[i], NULL, digest_thread, got[i]);
    for (int i = 0; i < T; i++)
        pthread_join(th[i], NULL);
    for (int i = 1; i < T; i++)
        same &= memcmp(got[0], got[i], 16) == 0;
    check(same && memcmp(got[0], zero, 16) != 0, "8 threads racing for the digest all get the same, non-zero");
    check(fajit__codegen_digest() == fajit__codegen_digest() &&
              memcmp(fajit__codegen_digest(), got[0], 16) == 0,
          "later calls return the same stored digest");
    expected_digest(want);
    check(memcmp(want, got[0], 16) == 0, "digest = XXH3-128(names, lengths, bytes, codegen SHA-256), big-endian");
    printf("     %zu embedded files; digest ", fajit__embedded_count);
    for (int i = 0; i < 16; i++)
        printf("%02x", got[0][i]);
    printf("\n");
}

int main(void)
{
    test_reference();
    test_failures();
    test_digest();
    printf("%s: %d failure(s)\n", failures ? "FAIL" : "PASS", failures);
    return failures ? 1 : 0;
}
