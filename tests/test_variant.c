/*
 * tests/test_variant.c - canonical text: defaults, checks, strict parse and
 * format round trips over generated variants, bad texts and their errors, and
 * the lenient spec parse.
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "codegen/variant.h"
#include "fajit.h"
#include "runtime/error.h"

static int failures;

static void check(int ok, const char *what)
{
    printf("%s %s\n", ok ? "ok  " : "FAIL", what);
    if (!ok)
        failures++;
}

/* Fails with the detail shown, for checks inside loops. */
static void fail_detail(const char *what, const char *input)
{
    printf("FAIL %s\n     input:  '%s'\n     detail: '%s'\n", what, input, fajit_last_error());
    failures++;
}

#define CANON                                                                                     \
    "ref dqk=72 dv=72 dtype=bf16 mask=causal window=-1,-1 dropout=0 softcap=0 alibi=0 varlen=0 " \
    "paged=0 bm=4 bn=32 warps=4 stages=1 arch=sm_90"

/* ---------------------------------------------------------------- generator */

static uint64_t rng = 0x9e3779b97f4a7c15ull;

static int rnd(int n)
{
    rng ^= rng << 13;
    rng ^= rng >> 7;
    rng ^= rng << 17;
    return (int)(rng % (uint64_t)n);
}

static const int archs[] = {80, 86, 87, 89, 90, 100, 103, 110, 120, 121};

/* A random valid variant of any op, dtype, mask and arch. */
static void random_variant(fajit__variant *v)
{
    fajit__variant_defaults(v);
    v->op = rnd(FAJIT__OP_COUNT);
    v->dqk = 1 + rnd(512);
    v->dv = rnd(3) ? v->dqk : 1 + rnd(512);
    v->dtype = rnd(2);
    v->mask = rnd(3);
    v->window_left = rnd(2) ? -1 : rnd(5000);
    v->window_right = rnd(2) ? -1 : rnd(5000);
    v->dropout = rnd(2);
    v->softcap = rnd(2);
    v->alibi = rnd(2);
    v->varlen = rnd(2);
    v->paged = rnd(2);
    v->warps = 1 << rnd(5);
    if (v->op == FAJIT__OP_REF || v->op == FAJIT__OP_REF_DQ || v->op == FAJIT__OP_REF_DKDV ||
        v->op == FAJIT__OP_REF_PROBS) {
        v->bm = v->warps * (1 + rnd(256 / v->warps));
        v->bn = 32 * (1 + rnd(8));
        v->stages = 1;
    } else {
        v->bm = 1 + rnd(256);
        v->bn = 1 + rnd(256);
        v->stages = 1 + rnd(8);
    }
    v->arch = archs[rnd(10)];
    v->arch_suffix = v->arch >= 90 && rnd(2) ? 'a' : 0;
}

/* The same variant as a spec: fields shuffled, any whitespace between them. */
static void shuffled_spec(const char *canon, char *out)
{
    char copy[FAJIT__VARIANT_TEXT_MAX], *tok[20], *save = NULL;
    static const char *const gaps[] = {" ", "  ", "\t", " \t "};
    int n = 0;
    strcpy(copy, canon);
    for (char *t = strtok_r(copy, " ", &save); t && n < 20; t = strtok_r(NULL, " ", &save))
        tok[n++] = t;
    for (int i = n - 1; i > 1; i--) { /* keep the op first */
        int j = 1 + rnd(i);
        char *x = tok[i];
        tok[i] = tok[j];
        tok[j] = x;
    }
    strcpy(out, gaps[rnd(4)]);
    for (int i = 0; i < n; i++) {
        strcat(out, tok[i]);
        strcat(out, gaps[rnd(4)]);
    }
}

static void test_round_trips(void)
{
    const int N = 5000;
    int bad = 0, seen_op[FAJIT__OP_COUNT] = {0}, seen_suffix = 0;
    for (int i = 0; i < N && bad < 5; i++) {
        fajit__variant v, w, s;
        char text[FAJIT__VARIANT_TEXT_MAX], again[FAJIT__VARIANT_TEXT_MAX];
        char spec[2 * FAJIT__VARIANT_TEXT_MAX];
        random_variant(&v);
        seen_op[v.op]++;
        seen_suffix += v.arch_suffix == 'a';
        if (fajit__variant_check(&v) != 0 || fajit__variant_format(&v, text, sizeof text) < 0) {
            fail_detail("generated variant checks and formats", "(struct)");
            bad++;
            continue;
        }
        memset(&w, 0x5a, sizeof w);
        if (fajit__variant_parse(text, &w) != 0 || memcmp(&v, &w, sizeof v) != 0) {
            fail_detail("parse(format(v)) == v", text);
            bad++;
            continue;
        }
        if (fajit__variant_format(&w, again, sizeof again) != (int)strlen(text) ||
            strcmp(again, text) != 0) {
            fail_detail("format(parse(s)) == s", text);
            bad++;
            continue;
        }
        shuffled_spec(text, spec);
        if (fajit__spec_parse(spec, &s) != 0 || memcmp(&v, &s, sizeof v) != 0) {
            fail_detail("shuffled spec parses to the same variant", spec);
            bad++;
        }
    }
    int every_op = 1;
    for (int op = 0; op < FAJIT__OP_COUNT; op++)
        every_op &= seen_op[op] > 0;
    printf("     %d variants: ref %d, fwd %d, bwd %d, ref-dq %d, ref-dkdv %d, bwd-pre %d, bwd-post %d, "
           "bwd-dkdv %d, bwd-dq %d, sm_NNa %d\n",
           N, seen_op[FAJIT__OP_REF], seen_op[FAJIT__OP_FWD], seen_op[FAJIT__OP_BWD],
           seen_op[FAJIT__OP_REF_DQ], seen_op[FAJIT__OP_REF_DKDV], seen_op[FAJIT__OP_BWD_PRE],
           seen_op[FAJIT__OP_BWD_POST], seen_op[FAJIT__OP_BWD_DKDV], seen_op[FAJIT__OP_BWD_DQ], seen_suffix);
    check(bad == 0, "5000 random variants: format/parse round trips, shuffled specs agree");
    check(every_op && seen_suffix, "generator covered every op and sm_NNa");
}

static void test_example(void)
{
    fajit__variant v;
    char buf[FAJIT__VARIANT_TEXT_MAX];
    int rc = fajit__variant_parse(CANON, &v);
    check(rc == 0, "the example canonical text parses");
    check(v.op == FAJIT__OP_REF && v.dqk == 72 && v.dv == 72 && v.dtype == FAJIT_DTYPE_BF16 &&
              v.mask == FAJIT_MASK_CAUSAL && v.window_left == -1 && v.window_right == -1 &&
              v.dropout == 0 && v.paged == 0 && v.bm == 4 && v.bn == 32 && v.warps == 4 &&
              v.stages == 1 && v.arch == 90 && v.arch_suffix == 0,
          "its fields have the values the text names");
    check(fajit__variant_format(&v, buf, sizeof buf) == (int)strlen(CANON) && strcmp(buf, CANON) == 0,
          "format gives the text back, returning its length");
    check(fajit__variant_format(&v, buf, strlen(CANON)) == FAJIT_EINVAL &&
              strstr(fajit_last_error(), "too small") != NULL,
          "format into a buffer one byte short fails with EINVAL");
    check(fajit__variant_format(&v, buf, strlen(CANON) + 1) == (int)strlen(CANON),
          "format into an exactly sized buffer succeeds");
    v.arch_suffix = 'a';
    v.mask = FAJIT_MASK_CAUSAL_TL;
    v.window_left = 256;
    v.window_right = 0;
    fajit__variant_format(&v, buf, sizeof buf);
    check(strstr(buf, " mask=causal-tl window=256,0 ") && strstr(buf, " arch=sm_90a") != NULL,
          "causal-tl, window and sm_90a spelled as documented");
}

/* ---------------------------------------------------------------- bad texts */

/* CANON with the first `from` replaced by `to`. */
static void mutate(const char *from, const char *to, char *out)
{
    const char *at = strstr(CANON, from);
    size_t pre = (size_t)(at - CANON);
    memcpy(out, CANON, pre);
    strcpy(out + pre, to);
    strcat(out, at + strlen(from));
}

static const struct {
    const char *from, *to, *expect;
} bad_texts[] = {
    {"dtype=bf16", "dtype=fp32", "dtype=fp32: unknown dtype (expected fp16 or bf16)"},
    {"dtype=bf16", "dtype=BF16", "dtype=BF16: unknown dtype"},
    {" bm=4", "", "field 'bm' missing after 'paged=0'"},
    {"dqk=72", "dqk=072", "dqk=072: not a plain decimal integer"},
    {"dqk=72", "dqk=+72", "dqk=+72: not a plain decimal integer"},
    {"dqk=72", "dqk=-0", "dqk=-0: not a plain decimal integer"},
    {"dqk=72", "dqk=7x", "dqk=7x: not a plain decimal integer"},
    {"dqk=72", "dqk=", "dqk=: not a plain decimal integer"},
    {"dqk=72", "dqk=99999999999", "dqk=99999999999: not a plain decimal integer"},
    {"dqk=72", "dqk=0", "dqk=0: must be 1..512"},
    {"dqk=72", "dqk=513", "dqk=513: must be 1..512"},
    {"dqk=72", "dqk=-1", "dqk=-1: must be 1..512"},
    {"dv=72", "dv=600", "dv=600: must be 1..512"},
    {"mask=causal", "mask=causal-br", "mask=causal-br: unknown mask"},
    {"window=-1,-1", "window=-2,-1", "window: left=-2: must be -1 (unbounded) or >= 0"},
    {"window=-1,-1", "window=0,-5", "window: right=-5"},
    {"window=-1,-1", "window=5", "window=5: expected L,R"},
    {"window=-1,-1", "window=-1,-1,3", "window=-1,-1,3: expected L,R"},
    {"window=-1,-1", "window=01,2", "window=01,2: expected L,R"},
    {"dropout=0", "dropout=2", "dropout=2: must be 0 or 1"},
    {"paged=0", "paged=-1", "paged=-1: must be 0 or 1"},
    {"bm=4", "bm=0", "bm=0: must be 1..256"},
    {"bm=4", "bm=512", "bm=512: must be 1..256"},
    {"bn=32", "bn=48", "bn=48: op ref needs a multiple of 32"},
    {"bn=32", "bn=288", "bn=288: must be 1..256"},
    {"bm=4", "bm=6", "bm=6: op ref needs a multiple of warps (4)"},
    {"warps=4", "warps=3", "warps=3: must be 1, 2, 4, 8 or 16"},
    {"warps=4", "warps=32", "warps=32: must be 1..16"},
    {"stages=1", "stages=2", "stages=2: op ref needs stages=1"},
    {"stages=1", "stages=9", "stages=9: must be 1..8"},
    {"arch=sm_90", "arch=sm_91", "arch=sm_91: unknown arch"},
    {"arch=sm_90", "arch=sm_80a", "arch=sm_80a: 'a' targets exist only for sm_90 and later"},
    {"arch=sm_90", "arch=90", "arch=90: expected sm_NN"},
    {"arch=sm_90", "arch=sm_090", "arch=sm_090: expected sm_NN"},
    {"arch=sm_90", "arch=sm_90b", "arch=sm_90b: expected sm_NN"},
    {"arch=sm_90", "arch=compute_90", "arch=compute_90: expected sm_NN"},
    {"ref", "xyz", "op 'xyz': unknown op (expected ref, fwd, bwd, ref-dq, ref-dkdv, bwd-pre, bwd-post, bwd-dkdv, bwd-dq or ref-probs)"},
    {"ref", "REF", "op 'REF': unknown op"},
    {"dv=72 dtype", "dv=72\tdtype", "character 0x09 at offset"},
    {"dv=72 dtype", "dv=72  dtype", "double space at offset 16"},
    {"ref", " ref", "leading space"},
    {"arch=sm_90", "arch=sm_90 ", "trailing space"},
    {"arch=sm_90", "arch=sm_90\n", "character 0x0a"},
    {"arch=sm_90", "arch=sm_90 foo=1", "unexpected 'foo=1' after 'arch=sm_90'"},
    {"arch=sm_90", "arch=sm_90 arch=sm_90", "unexpected 'arch=sm_90' after 'arch=sm_90'"},
    {"dqk=72 dv=72", "dv=72 dqk=72", "field 'dqk' missing after 'ref' (found 'dv=72')"},
    {" dropout=0 softcap=0 alibi=0 varlen=0 paged=0 bm=4 bn=32 warps=4 stages=1 arch=sm_90", "",
     "field 'dropout' missing after 'window=-1,-1'"},
    {" arch=sm_90", "", "field 'arch' missing after 'stages=1'"},
    {"dqk=72", "dqk", "field 'dqk' missing after 'ref' (found 'dqk')"},
    {"dqk=72", "DQK=72", "field 'dqk' missing after 'ref' (found 'DQK=72')"},
};

static void test_bad_texts(void)
{
    int bad = 0, n = (int)(sizeof bad_texts / sizeof bad_texts[0]);
    for (int i = 0; i < n; i++) {
        char text[2 * FAJIT__VARIANT_TEXT_MAX];
        fajit__variant v, sentinel;
        mutate(bad_texts[i].from, bad_texts[i].to, text);
        memset(&v, 0x5a, sizeof v);
        sentinel = v;
        fajit__clear_error();
        int rc = fajit__variant_parse(text, &v);
        if (rc != FAJIT_EPARSE || !strstr(fajit_last_error(), bad_texts[i].expect) ||
            memcmp(&v, &sentinel, sizeof v) != 0) {
            printf("     expected rc %d and detail containing '%s', got rc %d\n", FAJIT_EPARSE,
                   bad_texts[i].expect, rc);
            fail_detail("bad text rejected with the expected detail", text);
            bad++;
        }
    }
    printf("     %d bad texts tried\n", n);
    check(bad == 0, "every bad text: EPARSE, detail names the field and value, output untouched");
    fajit__variant v;
    check(fajit__variant_parse("", &v) == FAJIT_EPARSE && strstr(fajit_last_error(), "empty"),
          "empty text rejected");
    check(fajit__variant_parse("ref", &v) == FAJIT_EPARSE &&
              strcmp(fajit_last_error(), "field 'dqk' missing after 'ref'") == 0,
          "op alone: field 'dqk' missing after 'ref'");
}

/* Every single-character deletion of the canonical text is either rejected or
 * (where it still spells a valid variant) formats back to itself. */
static void test_deletions(void)
{
    size_t n = strlen(CANON);
    int bad = 0, accepted = 0;
    for (size_t i = 0; i < n; i++) {
        char text[FAJIT__VARIANT_TEXT_MAX], again[FAJIT__VARIANT_TEXT_MAX];
        fajit__variant v;
        memcpy(text, CANON, i);
        strcpy(text + i, CANON + i + 1);
        if (fajit__variant_parse(text, &v) != 0)
            continue;
        accepted++;
        if (fajit__variant_format(&v, again, sizeof again) < 0 || strcmp(again, text) != 0) {
            fail_detail("accepted deletion round-trips", text);
            bad++;
        }
    }
    printf("     %zu deletions, %d still valid variants\n", n, accepted);
    check(bad == 0 && accepted < 8, "single-character deletions: rejected or exactly canonical");
}

/* ---------------------------------------------------------------- check */

static void test_check(void)
{
    fajit__variant v, base;
    fajit__variant_parse(CANON, &base);
    check(fajit__variant_check(&base) == 0, "check accepts the example");

    v = base;
    v.bm = FAJIT__UNSET;
    check(fajit__variant_check(&v) == FAJIT_EINVAL && strstr(fajit_last_error(), "bm: unset"),
          "check: unset bm is an error in a full variant");
    v = base;
    v.arch = FAJIT__UNSET;
    check(fajit__variant_check(&v) == FAJIT_EINVAL && strstr(fajit_last_error(), "arch: unset"),
          "check: unset arch is an error in a full variant");
    v = base;
    v.op = FAJIT__OP_COUNT;
    char op_text[32];
    snprintf(op_text, sizeof op_text, "op=%d", FAJIT__OP_COUNT);
    check(fajit__variant_check(&v) == FAJIT_EINVAL && strstr(fajit_last_error(), op_text),
          "check: unknown op number");
    v = base;
    v.arch_suffix = 'f';
    check(fajit__variant_check(&v) == FAJIT_EINVAL && strstr(fajit_last_error(), "arch_suffix=102"),
          "check: arch_suffix other than 0 / 'a'");
    v = base;
    v.dtype = 2;
    check(fajit__variant_check(&v) == FAJIT_EINVAL && strstr(fajit_last_error(), "dtype=2"),
          "check: dtype out of the enum");
    v = base;
    v.mask = 3;
    check(fajit__variant_check(&v) == FAJIT_EINVAL && strstr(fajit_last_error(), "mask=3"),
          "check: mask out of the enum");
    v = base;
    v.op = FAJIT__OP_FWD;
    v.bm = 6;
    v.bn = 48;
    v.stages = 3;
    check(fajit__variant_check(&v) == 0, "check: fwd takes tiles ref refuses (bm 6, bn 48, stages 3)");
    char buf[FAJIT__VARIANT_TEXT_MAX];
    v = base;
    v.warps = FAJIT__UNSET;
    check(fajit__variant_format(&v, buf, sizeof buf) == FAJIT_EINVAL, "format refuses an unset field");
    fajit__variant_defaults(&v);
    check(v.op == FAJIT__OP_REF && v.dtype == FAJIT_DTYPE_FP16 && v.mask == FAJIT_MASK_NONE &&
              v.window_left == -1 && v.window_right == -1 && v.dropout == 0 && v.softcap == 0 &&
              v.alibi == 0 && v.varlen == 0 && v.paged == 0 && v.bm == FAJIT__UNSET &&
              v.bn == FAJIT__UNSET && v.warps == FAJIT__UNSET && v.stages == FAJIT__UNSET &&
              v.arch == FAJIT__UNSET && v.arch_suffix == 0,
          "defaults: fp16, no mask, unbounded window, flags off, tiles and arch unset");
    check(fajit__variant_check(&v) == FAJIT_EINVAL, "defaults alone are not a full variant");
}

/* ---------------------------------------------------------------- specs */

static void test_spec(void)
{
    fajit__variant v;
    int rc = fajit__spec_parse("ref dqk=72", &v);
    check(rc == 0 && v.op == FAJIT__OP_REF && v.dqk == 72 && v.dv == 72 &&
              v.dtype == FAJIT_DTYPE_FP16 && v.mask == FAJIT_MASK_NONE && v.window_left == -1 &&
              v.window_right == -1 && v.dropout == 0 && v.bm == FAJIT__UNSET &&
              v.bn == FAJIT__UNSET && v.warps == FAJIT__UNSET && v.stages == FAJIT__UNSET &&
              v.arch == FAJIT__UNSET,
          "spec 'ref dqk=72': defaults, dv = dqk, tiles and arch unset");
    rc = fajit__spec_parse("  fwd\tarch=sm_90a  dv=128 dtype=bf16 dqk=192 window=128,0 dropout=1 \n", &v);
    check(rc == 0 && v.op == FAJIT__OP_FWD && v.dqk == 192 && v.dv == 128 &&
              v.dtype == FAJIT_DTYPE_BF16 && v.arch == 90 && v.arch_suffix == 'a' &&
              v.window_left == 128 && v.window_right == 0 && v.dropout == 1,
          "spec with any order and whitespace, dv apart from dqk, sm_90a");
    rc = fajit__spec_parse("bwd dqk=64 mask=causal-tl bm=128 bn=64 warps=8 stages=2", &v);
    check(rc == 0 && v.op == FAJIT__OP_BWD && v.mask == FAJIT_MASK_CAUSAL_TL && v.bm == 128 &&
              v.bn == 64 && v.warps == 8 && v.stages == 2 && v.arch == FAJIT__UNSET,
          "spec with tiles and no arch");
    check(fajit__spec_parse("bwd-pre dqk=72", &v) == 0 && v.op == FAJIT__OP_BWD_PRE &&
              fajit__spec_parse("bwd-post dqk=72", &v) == 0 && v.op == FAJIT__OP_BWD_POST &&
              fajit__spec_parse("bwd-dkdv dqk=72", &v) == 0 && v.op == FAJIT__OP_BWD_DKDV &&
              fajit__spec_parse("bwd-dq dqk=72", &v) == 0 && v.op == FAJIT__OP_BWD_DQ,
          "specs of the fast backward's other ops (pre, post, dkdv, dq)");
    check(fajit__spec_parse("fwd dqk=64 bm=6 warps=4", &v) == 0, "fwd spec: bm not a multiple of warps is fine");

    static const struct {
        const char *text, *expect;
    } bad[] = {
        {"ref", "dqk: required"},
        {"ref dv=64", "dqk: required"},
        {"", "empty spec"},
        {"  \t ", "empty spec"},
        {"dqk=64", "spec must start with the op (ref, fwd or bwd), found 'dqk=64'"},
        {"xyz dqk=64", "op 'xyz': unknown op"},
        {"ref dqk=64 foo=1", "unknown field 'foo' in 'foo=1'"},
        {"ref dqk=64 =1", "unknown field '' in '=1'"},
        {"ref dqk=64 dqk=72", "field 'dqk' given twice"},
        {"ref dqk=64 mask", "'mask': expected field=value"},
        {"ref dqk=64,72", "dqk=64,72: a spec takes one value"},
        {"ref dqk=64..72", "dqk=64..72: a spec takes one value"},
        {"ref dqk=64 dtype=fp16,bf16", "dtype=fp16,bf16: a spec takes one value"},
        {"ref dqk=600", "dqk=600: must be 1..512"},
        {"ref dqk=064", "dqk=064: not a plain decimal integer"},
        {"ref dqk=64 dtype=fp32", "dtype=fp32: unknown dtype (expected fp16 or bf16)"},
        {"ref dqk=64 bn=48", "bn=48: op ref needs a multiple of 32"},
        {"ref dqk=64 bm=6 warps=4", "bm=6: op ref needs a multiple of warps (4)"},
        {"ref dqk=64 stages=2", "stages=2: op ref needs stages=1"},
        {"ref dqk=64 warps=5", "warps=5: must be 1, 2, 4, 8 or 16"},
        {"ref dqk=64 arch=sm_75", "arch=sm_75: unknown arch"},
        {"ref dqk=64 arch=sm_86a", "arch=sm_86a: 'a' targets exist only for sm_90 and later"},
        {"ref dqk=64 window=-3,0", "window: left=-3"},
        {"ref dqk=64 window=1", "window=1: expected L,R"},
    };
    int nbad = 0, n = (int)(sizeof bad / sizeof bad[0]);
    for (int i = 0; i < n; i++) {
        fajit__variant_defaults(&v);
        fajit__variant sentinel = v;
        rc = fajit__spec_parse(bad[i].text, &v);
        if (rc != FAJIT_EPARSE || !strstr(fajit_last_error(), bad[i].expect) ||
            memcmp(&v, &sentinel, sizeof v) != 0) {
            printf("     expected detail containing '%s', got rc %d\n", bad[i].expect, rc);
            fail_detail("bad spec rejected with the expected detail", bad[i].text);
            nbad++;
        }
    }
    printf("     %d bad specs tried\n", n);
    check(nbad == 0, "every bad spec: EPARSE naming the field and value");
}

int main(void)
{
    test_example();
    test_round_trips();
    test_bad_texts();
    test_deletions();
    test_check();
    test_spec();
    printf("%s: %d failure(s)\n", failures ? "FAIL" : "PASS", failures);
    return failures ? 1 : 0;
}
