/*
 * tests/test_manifest.c - manifest expansion: lists, ranges, product order,
 * comments and blank lines, defaults, errors with line numbers, the size guard,
 * and nothing reaching the callback when any line is bad.
 */
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
    if (!ok) {
        printf("     detail: '%s'\n", fajit_last_error());
        failures++;
    }
}

/* Collects what the callback sees. */
struct seen {
    fajit__variant *v;
    int *line;
    int n, cap;
    int stop_after; /* 0: never stop */
};

static int collect(void *user, const fajit__variant *spec, int line)
{
    struct seen *s = user;
    if (s->n == s->cap) {
        s->cap = s->cap ? 2 * s->cap : 64;
        s->v = realloc(s->v, (size_t)s->cap * sizeof *s->v);
        s->line = realloc(s->line, (size_t)s->cap * sizeof *s->line);
        if (!s->v || !s->line)
            exit(2);
    }
    s->v[s->n] = *spec;
    s->line[s->n] = line;
    s->n++;
    return s->stop_after && s->n == s->stop_after ? 42 : 0;
}

static int expand(const char *text, struct seen *s)
{
    memset(s, 0, sizeof *s);
    return fajit__manifest_expand(text, collect, s);
}

static void done(struct seen *s)
{
    free(s->v);
    free(s->line);
}

static void test_basic(void)
{
    struct seen s;
    int rc = expand("ref dqk=64", &s);
    check(rc == 0 && s.n == 1 && s.line[0] == 1 && s.v[0].dqk == 64 && s.v[0].dv == 64 &&
              s.v[0].bm == FAJIT__UNSET && s.v[0].arch == FAJIT__UNSET,
          "one spec line: one variant, dv = dqk, tiles and arch unset");
    done(&s);

    rc = expand("ref dqk=64..128:32 dtype=fp16,bf16", &s);
    int order_ok = rc == 0 && s.n == 6;
    for (int i = 0; order_ok && i < 6; i++)
        order_ok = s.v[i].dqk == 64 + 32 * (i / 2) && s.v[i].dv == s.v[i].dqk &&
                   s.v[i].dtype == i % 2;
    check(order_ok, "range x list: 3 x 2 = 6, last field (dtype) fastest, dv follows dqk");
    done(&s);

    rc = expand("ref dtype=fp16,bf16 dqk=64,128", &s);
    check(rc == 0 && s.n == 4 && s.v[0].dqk == 64 && s.v[0].dtype == 0 && s.v[1].dqk == 64 &&
              s.v[1].dtype == 1 && s.v[2].dqk == 128 && s.v[3].dtype == 1,
          "order follows the field order, not the order written");
    done(&s);

    rc = expand("ref,fwd,bwd dqk=64 arch=sm_80,sm_90a", &s);
    check(rc == 0 && s.n == 6 && s.v[0].op == FAJIT__OP_REF && s.v[0].arch == 80 &&
              s.v[1].arch == 90 && s.v[1].arch_suffix == 'a' && s.v[2].op == FAJIT__OP_FWD &&
              s.v[5].op == FAJIT__OP_BWD,
          "op list (slowest) and arch list with sm_90a");
    done(&s);

    rc = expand("fwd dqk=64 window=-1,-1;128,0", &s);
    check(rc == 0 && s.n == 2 && s.v[0].window_left == -1 && s.v[0].window_right == -1 &&
              s.v[1].window_left == 128 && s.v[1].window_right == 0,
          "window list, ';'-separated pairs");
    done(&s);

    rc = expand("fwd dqk=64 window=0..256:128,0..1", &s);
    check(rc == 0 && s.n == 6 && s.v[0].window_left == 0 && s.v[0].window_right == 0 &&
              s.v[1].window_right == 1 && s.v[2].window_left == 128 && s.v[5].window_left == 256,
          "window sides as ranges: product, left slower");
    done(&s);

    rc = expand("fwd dqk=64..72:5,200,1..2 dv=32", &s);
    check(rc == 0 && s.n == 5 && s.v[0].dqk == 64 && s.v[1].dqk == 69 && s.v[2].dqk == 200 &&
              s.v[3].dqk == 1 && s.v[4].dqk == 2 && s.v[4].dv == 32,
          "list of ranges and values; a range's end need not be hit by the step");

    done(&s);
    rc = expand("fwd dqk=-1..1 dv=8", &s);
    check(rc == FAJIT_EPARSE && s.n == 0 && strstr(fajit_last_error(), "line 1: dqk=-1: must be 1..512"),
          "a range reaching a bad value: the spec check's detail with the line");
    done(&s);
}

static void test_comments(void)
{
    struct seen s;
    const char *text = "# the fleet's variants\n"
                       "\n"
                       "ref dqk=64   # head dim 64\r\n"
                       "   \t \n"
                       "#ref dqk=999\n"
                       "fwd dqk=128 dtype=bf16 mask=causal bm=128 bn=64 warps=4 stages=2 arch=sm_90\n"
                       "ref dqk=72"; /* no final newline */
    int rc = expand(text, &s);
    check(rc == 0 && s.n == 3 && s.line[0] == 3 && s.line[1] == 6 && s.line[2] == 7,
          "comments, blank lines, CRLF, no final newline; callback gets line numbers");
    check(s.n == 3 && s.v[1].op == FAJIT__OP_FWD && s.v[1].bm == 128 && s.v[1].stages == 2 &&
              s.v[1].arch == 90 && s.v[1].mask == FAJIT_MASK_CAUSAL && s.v[2].dqk == 72,
          "fields given on a line are kept");
    done(&s);
    rc = expand("", &s);
    check(rc == 0 && s.n == 0, "empty manifest: nothing, no error");
    done(&s);
    rc = expand("# only\n#comments\n\n", &s);
    check(rc == 0 && s.n == 0, "comments only: nothing, no error");
    done(&s);
}

/* Two values for every field: variant i must hold, for field f (slot from the
 * end), value bit f of i. Checks that manifest.c's field order is the
 * canonical order of variant.c. */
static void test_field_order(void)
{
    struct seen s;
    const char *text = "fwd dqk=64,128 dv=32,64 dtype=fp16,bf16 mask=none,causal window=-1,-1;0,0 "
                       "dropout=0,1 softcap=0,1 alibi=0,1 varlen=0,1 paged=0,1 bm=64,128 bn=32,64 "
                       "warps=4,8 stages=1,2 arch=sm_80,sm_90";
    int rc = expand(text, &s), bad = 0;
    for (int i = 0; rc == 0 && i < s.n && bad < 3; i++) {
        const fajit__variant *v = &s.v[i];
#define BIT(k) ((i >> (14 - (k))) & 1)
        int ok = v->dqk == (BIT(0) ? 128 : 64) && v->dv == (BIT(1) ? 64 : 32) && v->dtype == BIT(2) &&
                 v->mask == BIT(3) && v->window_left == BIT(4) - 1 && v->window_right == BIT(4) - 1 &&
                 v->dropout == BIT(5) && v->softcap == BIT(6) && v->alibi == BIT(7) &&
                 v->varlen == BIT(8) && v->paged == BIT(9) && v->bm == (BIT(10) ? 128 : 64) &&
                 v->bn == (BIT(11) ? 64 : 32) && v->warps == (BIT(12) ? 8 : 4) &&
                 v->stages == 1 + BIT(13) && v->arch == (BIT(14) ? 90 : 80);
#undef BIT
        if (!ok) {
            printf("     variant %d out of order\n", i);
            bad++;
        }
    }
    check(rc == 0 && s.n == 32768 && bad == 0, "2^15 product over every field: canonical order, arch fastest");
    done(&s);

    /* A full canonical text is a manifest line naming one variant. */
    const char *canon = "bwd dqk=192 dv=128 dtype=bf16 mask=causal-tl window=16,0 dropout=1 softcap=1 "
                        "alibi=1 varlen=1 paged=1 bm=64 bn=48 warps=2 stages=3 arch=sm_100a";
    fajit__variant want;
    rc = expand(canon, &s);
    check(rc == 0 && s.n == 1 && fajit__variant_parse(canon, &want) == 0 &&
              memcmp(&want, &s.v[0], sizeof want) == 0,
          "a canonical text as a manifest line gives exactly that variant");
    done(&s);

    rc = expand("fwd dqk=1..512 dtype=fp16,bf16 mask=none,causal,causal-tl arch=sm_80,sm_90", &s);
    check(rc == 0 && s.n == 512 * 2 * 3 * 2 && s.v[s.n - 1].dqk == 512 && s.v[s.n - 1].arch == 90,
          "512 x 2 x 3 x 2 = 6144 variants");
    done(&s);
}

static const struct {
    const char *text, *expect;
} bad_manifests[] = {
    {"ref dqk=64\n\nref dqk=64..8\n", "line 3: dqk=64..8: empty range"},
    {"ref dqk=1..8:0", "line 1: dqk=1..8:0: range step must be >= 1"},
    {"ref dqk=1..8:-2", "line 1: dqk=1..8:-2: range step must be >= 1"},
    {"ref dqk=1..", "line 1: dqk=1..: bad range"},
    {"ref dqk=..8", "line 1: dqk=..8: bad range"},
    {"ref dqk=1..8:x", "line 1: dqk=1..8:x: bad range"},
    {"ref dqk=1...8", "line 1: dqk=1...8: bad range"},
    {"ref dqk=64 dtype=fp16..bf16", "line 1: dtype=fp16..bf16: ranges are only for integer fields"},
    {"ref dqk=64 arch=sm_80..sm_90", "line 1: arch=sm_80..sm_90: ranges are only for integer fields"},
    {"ref dqk=64,,72", "line 1: dqk=64,,72: empty item in list"},
    {"ref dqk=64,", "line 1: dqk=64,: empty item in list"},
    {"ref dqk=", "line 1: dqk=: missing value"},
    {"ref dqk=64 window=5", "line 1: window=5: expected L,R"},
    {"ref dqk=64 window=-1,-1;", "line 1: window=-1,-1;: empty item in list"},
    {"ref dqk=64 foo=1", "line 1: foo=1: unknown field 'foo'"},
    {"ref dqk=64 dqk=72", "line 1: field 'dqk' given twice"},
    {"ref dqk=64 mask", "line 1: 'mask': expected field=value"},
    {"\n\ndqk=64", "line 3: a spec starts with the op (ref, fwd or bwd), found 'dqk=64'"},
    {"ref,xyz dqk=64", "line 1: op 'xyz': unknown op"},
    {"ref dtype=bf16", "line 1: dqk: required"},
    {"ref dqk=64 dtype=fp16,fp32", "line 1: dtype=fp32: unknown dtype (expected fp16 or bf16)"},
    {"ref dqk=500..520:10", "line 1: dqk=520: must be 1..512"},
    {"ref dqk=64 bn=32,48", "line 1: bn=48: op ref needs a multiple of 32"},
    {"ref dqk=64 arch=sm_80,sm_91", "line 1: arch=sm_91: unknown arch"},
    {"ref dqk=064", "line 1: dqk=064: not a plain decimal integer"},
    {"fwd dqk=1..512 dv=1..512 bm=1..256", "line 1: expands to more than 1000000 variants"},
    {"fwd dqk=1..9999999999", "line 1: dqk=1..9999999999: expands to more than 1000000 values"},
    {"fwd dqk=64 window=0..99999999,0..99999999", "line 1: window=0..99999999,0..99999999: range too long"},
};

static void test_errors(void)
{
    int bad = 0, n = (int)(sizeof bad_manifests / sizeof bad_manifests[0]);
    for (int i = 0; i < n; i++) {
        struct seen s;
        int rc = expand(bad_manifests[i].text, &s);
        if (rc != FAJIT_EPARSE || s.n != 0 || !strstr(fajit_last_error(), bad_manifests[i].expect)) {
            printf("FAIL '%s'\n     expected '%s'\n     got rc %d, %d callbacks, '%s'\n",
                   bad_manifests[i].text, bad_manifests[i].expect, rc, s.n, fajit_last_error());
            bad++;
        }
        done(&s);
    }
    printf("     %d bad manifests tried\n", n);
    check(bad == 0, "bad manifests: EPARSE, 'line N: field=value: why', no callback at all");

    struct seen s;
    int rc = expand("ref dqk=64\nfwd dqk=128\n\n# later\nref dqk=0\n", &s);
    check(rc == FAJIT_EPARSE && s.n == 0 && strstr(fajit_last_error(), "line 5: dqk=0: must be 1..512"),
          "a bad line 5 fails the manifest before lines 1-2 reach the callback");
    done(&s);
}

static void test_stop(void)
{
    struct seen s;
    memset(&s, 0, sizeof s);
    s.stop_after = 3;
    int rc = fajit__manifest_expand("ref dqk=64,72\nref dqk=80,96\nref dqk=128\n", collect, &s);
    check(rc == 42 && s.n == 3 && s.v[2].dqk == 80, "callback's nonzero return stops and is returned");
    done(&s);
    rc = fajit__manifest_expand("ref dqk=64..128", NULL, NULL);
    check(rc == 0, "NULL callback: validation only");
    rc = fajit__manifest_expand("ref dqk=64..1280", NULL, NULL);
    check(rc == FAJIT_EPARSE, "NULL callback still reports errors");
}

int main(void)
{
    test_basic();
    test_comments();
    test_field_order();
    test_errors();
    test_stop();
    printf("%s: %d failure(s)\n", failures ? "FAIL" : "PASS", failures);
    return failures ? 1 : 0;
}
