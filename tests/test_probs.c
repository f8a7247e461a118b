/*
 * tests/test_probs.c - the forward's probabilities output
 * (fajit_attn_args.probs, op ref-probs), no GPU needed:
 *  - codegen: "ref-probs" text round-trips, takes the reference's tile
 *    rules, serialises (so keys) apart from "ref" with the same fields, and
 *    renders reference.cuh with FAJIT_OP 9 and entry fajit_ref_probs_fwd;
 *  - NVRTC: ref-probs compiles (sm_80 and sm_90, plain, dropout, every
 *    feature, varlen) with no template warning, and both ops of
 *    reference.cuh still yield their kernel;
 *  - the API: a bad probs pointer or stride is refused with FAJIT_EINVAL
 *    naming it (nothing launched); good probs route any kernel choice to op
 *    ref-probs; a caller built before the field (shorter struct_size) never
 *    has it read.
 */
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "codegen/variant.h"
#include "compile_check.h"
#include "fajit.h"
#include "runtime/error.h"

static int failures;

static void check(int ok, const char *what, const char *detail)
{
    printf("%s %s%s%s\n", ok ? "ok  " : "FAIL", what, detail && detail[0] ? ": " : "",
           detail ? detail : "");
    failures += !ok;
}

/* ---------------------------------------------------------------- codegen */

static const char *const probs_text =
    "ref-probs dqk=72 dv=72 dtype=bf16 mask=causal window=16,-1 dropout=1 softcap=0 alibi=1 "
    "varlen=0 paged=0 bm=4 bn=32 warps=4 stages=1 arch=sm_90";

static void test_text(void)
{
    fajit__variant v, w;
    char again[FAJIT__VARIANT_TEXT_MAX];
    int rc = fajit__variant_parse(probs_text, &v);
    check(rc == 0 && v.op == FAJIT__OP_REF_PROBS && v.dropout == 1 && v.alibi == 1,
          "parse: op ref-probs", rc ? fajit__detail() : NULL);
    rc = fajit__variant_format(&v, again, sizeof again);
    check(rc > 0 && strcmp(again, probs_text) == 0, "format(parse(s)) == s", again);
    rc = fajit__spec_parse("ref-probs dqk=64 bn=48", &w);
    check(rc == FAJIT_EPARSE && strstr(fajit__detail(), "bn=48: op ref-probs needs a multiple of 32"),
          "the reference's tile rules apply", fajit__detail());
    rc = fajit__spec_parse("ref-probs dqk=64 stages=2", &w);
    check(rc == FAJIT_EPARSE && strstr(fajit__detail(), "stages=2"), "stages must be 1",
          fajit__detail());
}

static void test_key(void)
{
    fajit__variant v, ref, back;
    uint8_t a[256], b[256];
    fajit__variant_parse(probs_text, &v);
    ref = v;
    ref.op = FAJIT__OP_REF;
    size_t na = fajit__variant_serialize(&v, a, sizeof a), nb = fajit__variant_serialize(&ref, b, sizeof b);
    check(na == nb && memcmp(a, b, na) != 0, "serialised apart from op ref with the same fields (another key)",
          NULL);
    int rc = fajit__variant_deserialize(a, na, &back);
    check(rc == 0 && memcmp(&back, &v, sizeof v) == 0, "deserialise gives ref-probs back", NULL);
}

static void test_render(void)
{
    fajit__variant v;
    char *src = NULL;
    size_t len = 0;
    const char *entry = NULL;
    fajit__variant_parse(probs_text, &v);
    int rc = fajit__render(&v, &src, &len, &entry);
    check(rc == 0 && entry && strcmp(entry, "fajit_ref_probs_fwd") == 0, "entry fajit_ref_probs_fwd",
          entry);
    check(rc == 0 && strstr(src, "static constexpr int FAJIT_OP = 9;") &&
              strstr(src, "#line 1 \"reference.cuh\"") && strstr(src, "fajit_ref_probs_fwd(") &&
              strstr(src, "// fajit variant: ref-probs "),
          "rendered: reference.cuh with FAJIT_OP 9 and the canonical text", NULL);
    free(src);
    check(strcmp(fajit__variant_template_name(&v), "reference.cuh") == 0 &&
              fajit__variant_smem_bytes(&v) == 0,
          "template reference.cuh, static shared memory only", NULL);
}

/* ---------------------------------------------------------------- NVRTC */

static fajit__variant probs_variant(int op, int dim, int dtype, int mask, int dropout, int all,
                                    int varlen, int arch)
{
    fajit__variant v;
    fajit__variant_defaults(&v);
    v.op = op;
    v.dqk = v.dv = dim;
    v.dtype = dtype;
    v.mask = mask;
    v.dropout = dropout;
    v.softcap = v.alibi = all;
    v.window_left = all ? 20 : -1;
    v.varlen = varlen;
    v.bm = 4, v.bn = 32, v.warps = 4, v.stages = 1;
    v.arch = arch;
    return v;
}

static void test_compile(void)
{
    const fajit__variant vs[] = {
        probs_variant(FAJIT__OP_REF_PROBS, 64, 0, 0, 0, 0, 0, 90),
        probs_variant(FAJIT__OP_REF_PROBS, 128, 1, 1, 1, 0, 0, 80),
        probs_variant(FAJIT__OP_REF_PROBS, 100, 0, 2, 1, 1, 1, 90),
        probs_variant(FAJIT__OP_REF_PROBS, 512, 1, 1, 1, 1, 0, 90),
        probs_variant(FAJIT__OP_REF, 100, 0, 2, 1, 1, 1, 90), /* the plain op, probs kernel empty */
    };
    for (size_t i = 0; i < sizeof vs / sizeof vs[0]; i++) {
        char text[FAJIT__VARIANT_TEXT_MAX], line[FAJIT__VARIANT_TEXT_MAX + 64];
        compile_check c;
        fajit__variant_format(&vs[i], text, sizeof text);
        int rc = compile_check_run(&vs[i], &c);
        snprintf(line, sizeof line, "NVRTC: %s (%.0f ms, %d regs)", text, c.ms, c.registers);
        check(rc == 0 && c.cubin_bytes > 0 && c.template_warnings == 0, line, rc ? c.why : NULL);
    }
}

/* ---------------------------------------------------------------- the API */

static float fake[4096] __attribute__((aligned(16)));

static void valid_args(fajit_attn_args *a)
{
    fajit_attn_args_init(a);
    /* Never dereferenced: validation happens first, and variants need no GPU. */
    a->q = a->k = a->v = fake;
    a->o = fake;
    a->batch = 2, a->seqlen_q = 17, a->seqlen_k = 33, a->nheads_q = 8, a->nheads_kv = 2;
    a->dqk = 64, a->dv = 64;
    a->dropout_p = 0.17f, a->dropout_seed = 5;
}

static void set_probs(fajit_attn_args *a, int64_t sb, int64_t sh, int64_t si)
{
    a->probs = fake + 64;
    a->probs_stride[0] = sb, a->probs_stride[1] = sh, a->probs_stride[2] = si;
}

static void expect_refusal(fajit_ctx *ctx, const fajit_attn_args *a, const char *named, const char *what)
{
    char text[400], line[600];
    int rc = fajit_attn_fwd(ctx, a, NULL);
    snprintf(line, sizeof line, "fajit_attn_fwd refuses %s, naming '%s'", what, named);
    check(rc == FAJIT_EINVAL && strstr(fajit_last_error(), named), line, fajit_last_error());
    rc = fajit_attn_variant(ctx, a, text, sizeof text);
    check(rc == FAJIT_EINVAL && strstr(fajit_last_error(), named), "  fajit_attn_variant too", NULL);
}

static void test_refusals(fajit_ctx *ctx)
{
    fajit_attn_args a;
    valid_args(&a);
    set_probs(&a, 0, 0, 0);
    a.probs = (float *)((char *)fake + 2);
    expect_refusal(ctx, &a, "must be 4-byte aligned", "a misaligned probs");
    valid_args(&a);
    set_probs(&a, 8 * 17 * 33, 17 * 33, -1);
    expect_refusal(ctx, &a, "probs_stride[2]=-1: must be >= 0", "a negative stride");
    valid_args(&a);
    set_probs(&a, 8 * 17 * 33, 17 * 33, 32);
    expect_refusal(ctx, &a, "probs_stride[2]=32: rows of probs overlap (need >= seqlen_k=33)",
                   "rows closer than seqlen_k");
    valid_args(&a);
    set_probs(&a, 8 * 17 * 40, 16 * 40, 40);
    expect_refusal(ctx, &a, "probs_stride[1]=640: heads of probs overlap (need >= seqlen_q=17 x probs_stride[2]=40)",
                   "heads closer than seqlen_q rows");
    valid_args(&a);
    set_probs(&a, INT64_MAX / 2, 17 * 33, 33);
    expect_refusal(ctx, &a, "probs_stride[0]=4611686018427387903: with batch=2 the byte offsets of probs overflow int64",
                   "a batch stride whose offsets overflow");
    valid_args(&a);
    a.batch = 1, a.seqlen_q = a.seqlen_k = INT32_MAX, a.nheads_q = a.nheads_kv = 8;
    set_probs(&a, 0, 0, 0);
    expect_refusal(ctx, &a, "probs: nheads_q=8 x seqlen_q=2147483647 x seqlen_k=2147483647 elements overflow int64",
                   "a contiguous size past int64");
}

static void expect_op(fajit_ctx *ctx, const fajit_attn_args *a, const char *want, const char *what)
{
    char text[400], line[600];
    int rc = fajit_attn_variant(ctx, a, text, sizeof text);
    snprintf(line, sizeof line, "%s: %s", what, rc > 0 ? text : fajit_last_error());
    check(rc > 0 && strncmp(text, want, strlen(want)) == 0, line, NULL);
}

static void test_routing(fajit_ctx *ctx)
{
    fajit_attn_args a;
    valid_args(&a);
    expect_op(ctx, &a, "fwd dqk=64", "no probs: the fast forward");
    set_probs(&a, 0, 0, 0);
    expect_op(ctx, &a, "ref-probs dqk=64 dv=64 dtype=fp16 mask=none window=-1,-1 dropout=1 ",
              "probs (contiguous): op ref-probs under kernel AUTO");
    a.kernel = FAJIT_KERNEL_REFERENCE;
    set_probs(&a, 3 * 8 * 128 * 128, 128 * 128, 128); /* flash_attn's rounded (b, h, 128, 128) */
    expect_op(ctx, &a, "ref-probs ", "probs (strided): op ref-probs under kernel REFERENCE");
    a.dropout_p = 0.0f, a.cu_seqlens_q = a.cu_seqlens_k = (const int32_t *)fake;
    expect_op(ctx, &a, "ref-probs dqk=64 dv=64 dtype=fp16 mask=none window=-1,-1 dropout=0 softcap=0 alibi=0 varlen=1",
              "probs without dropout, varlen");
    valid_args(&a);
    a.struct_size = (uint32_t)offsetof(fajit_attn_args, probs); /* built before the field */
    a.probs = (float *)((char *)fake + 1);                       /* would be refused if read */
    expect_op(ctx, &a, "fwd dqk=64", "a struct_size before probs: the field is never read");
    if (access("/dev/nvidia0", F_OK) != 0) {
        valid_args(&a);
        set_probs(&a, 0, 0, 0);
        int rc = fajit_attn_fwd(ctx, &a, NULL);
        check(rc == FAJIT_ENOGPU, "good probs pass validation (ENOGPU here)", fajit_last_error());
    }
}

int main(void)
{
    fajit_options o;
    fajit_ctx *ctx = NULL;
    test_text();
    test_key();
    test_render();
    test_compile();
    fajit_options_init(&o);
    o.cache_mode = FAJIT_CACHE_OFF;
    if (fajit_create(&ctx, &o) != 0) {
        printf("FAIL fajit_create: %s\n", fajit_last_error());
        return 1;
    }
    test_refusals(ctx);
    test_routing(ctx);
    fajit_destroy(ctx);
    printf("%s\n", failures ? "FAILED" : "all passed");
    return failures != 0;
}
