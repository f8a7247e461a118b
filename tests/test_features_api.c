/*
 * tests/test_features_api.c - the public API's checks of the appended fields
 * of fajit_attn_args (window, softcap, ALiBi, dropout, varlen), no GPU needed:
 * each bad value is refused with FAJIT_EINVAL naming it, nothing launched;
 * good values derive the variant they should (fajit_attn_variant, which needs
 * no GPU), windows that bound nothing normalised to -1.
 */
#include <stdio.h>
#include <string.h>
#include <unistd.h>

#include "fajit.h"

static int failures;

static void check(int ok, const char *what)
{
    printf("%s %s\n", ok ? "ok  " : "FAIL", what);
    failures += !ok;
}

static const char fake[256] __attribute__((aligned(16)));

static void valid_args(fajit_attn_args *a)
{
    fajit_attn_args_init(a);
    /* Never dereferenced: validation happens first, and variants need no GPU. */
    a->q = a->k = a->v = fake;
    a->o = (void *)fake;
    a->batch = 2, a->seqlen_q = 17, a->seqlen_k = 33, a->nheads_q = 8, a->nheads_kv = 2;
    a->dqk = 64, a->dv = 64;
}

typedef void (*breaker)(fajit_attn_args *);
static void bad_left(fajit_attn_args *a) { a->window_left = -2; }
static void bad_right(fajit_attn_args *a) { a->window_right = -7; }
static void bad_softcap_neg(fajit_attn_args *a) { a->softcap = -1.0f; }
static void bad_softcap_inf(fajit_attn_args *a) { a->softcap = 1.0f / 0.0f; }
static void bad_dropout_one(fajit_attn_args *a) { a->dropout_p = 1.0f; }
static void bad_dropout_neg(fajit_attn_args *a) { a->dropout_p = -0.5f; }
static void bad_dropout_nan(fajit_attn_args *a) { a->dropout_p = 0.0f / 0.0f; }
static void bad_alibi_align(fajit_attn_args *a) { a->alibi_slopes = (const float *)(fake + 2); }
static void bad_alibi_stride(fajit_attn_args *a)
{
    a->alibi_slopes = (const float *)fake;
    a->alibi_batch_stride = 5; /* < nheads_q 8 */
}
static void bad_alibi_stride_neg(fajit_attn_args *a) { a->alibi_batch_stride = -8; }
static void bad_cu_only_q(fajit_attn_args *a) { a->cu_seqlens_q = (const int32_t *)fake; }
static void bad_cu_only_k(fajit_attn_args *a) { a->cu_seqlens_k = (const int32_t *)fake; }
static void bad_cu_align(fajit_attn_args *a)
{
    a->cu_seqlens_q = (const int32_t *)fake;
    a->cu_seqlens_k = (const int32_t *)(fake + 6);
}
static void bad_cu_batch(fajit_attn_args *a)
{
    a->cu_seqlens_q = a->cu_seqlens_k = (const int32_t *)fake;
    a->batch = 0;
}

static void test_refusals(fajit_ctx *ctx)
{
    static const struct {
        breaker fn;
        const char *named;
    } cases[] = {
        {bad_left, "window_left=-2"},
        {bad_right, "window_right=-7"},
        {bad_softcap_neg, "softcap=-1"},
        {bad_softcap_inf, "softcap=inf"},
        {bad_dropout_one, "dropout_p=1"},
        {bad_dropout_neg, "dropout_p=-0.5"},
        {bad_dropout_nan, "nan: must be in [0, 1)"},
        {bad_alibi_align, "alibi_slopes="},
        {bad_alibi_stride, "alibi_batch_stride=5"},
        {bad_alibi_stride_neg, "alibi_batch_stride=-8"},
        {bad_cu_only_q, "cu_seqlens_k: NULL"},
        {bad_cu_only_k, "cu_seqlens_q: NULL"},
        {bad_cu_align, "cu_seqlens_k="},
        {bad_cu_batch, "batch=0"},
    };
    fajit_attn_args a;
    char what[200], text[400];
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        valid_args(&a);
        cases[i].fn(&a);
        int rc = fajit_attn_fwd(ctx, &a, NULL);
        snprintf(what, sizeof what, "fajit_attn_fwd refuses, naming '%s' (%s)", cases[i].named,
                 fajit_last_error());
        check(rc == FAJIT_EINVAL && strstr(fajit_last_error(), cases[i].named), what);
        rc = fajit_attn_variant(ctx, &a, text, sizeof text);
        snprintf(what, sizeof what, "fajit_attn_variant refuses it too, naming '%s'", cases[i].named);
        check(rc == FAJIT_EINVAL && strstr(fajit_last_error(), cases[i].named), what);
    }
}

/* The variant fajit_attn_variant derives for args changed by fn contains want. */
static void expect_variant(fajit_ctx *ctx, breaker fn, const char *want, const char *what)
{
    fajit_attn_args a;
    char text[400], line[600];
    valid_args(&a);
    fn(&a);
    int rc = fajit_attn_variant(ctx, &a, text, sizeof text);
    snprintf(line, sizeof line, "%s: %s", what, rc > 0 ? text : fajit_last_error());
    check(rc > 0 && strstr(text, want) != NULL, line);
}

static void window_3_5(fajit_attn_args *a) { a->window_left = 3, a->window_right = 5; }
static void window_huge(fajit_attn_args *a) { a->window_left = 32, a->window_right = 16; }
static void window_nearly(fajit_attn_args *a) { a->window_left = 31, a->window_right = 15; }
static void window_causal(fajit_attn_args *a) { a->window_left = 4, a->window_right = 0; }
static void window_tl(fajit_attn_args *a)
{
    a->mask = FAJIT_MASK_CAUSAL_TL, a->window_left = 16, a->window_right = 9;
}
static void window_tl_short(fajit_attn_args *a)
{
    a->mask = FAJIT_MASK_CAUSAL_TL, a->window_left = 15;
}
static void softcap_on(fajit_attn_args *a) { a->softcap = 30.0f; }
static void alibi_on(fajit_attn_args *a)
{
    a->alibi_slopes = (const float *)fake;
    a->alibi_batch_stride = 8;
}
static void dropout_on(fajit_attn_args *a) { a->dropout_p = 0.17f, a->dropout_seed = 42; }
static void varlen_on(fajit_attn_args *a)
{
    a->cu_seqlens_q = a->cu_seqlens_k = (const int32_t *)fake;
    a->q_stride[0] = 12345, a->q_stride[1] = 512, a->q_stride[2] = 64;
}

static void test_variants(fajit_ctx *ctx)
{
    expect_variant(ctx, window_3_5, "mask=none window=3,5 dropout=0", "a window is part of the variant");
    expect_variant(ctx, window_huge, "mask=none window=-1,-1",
                   "a window wider than every row's keys is -1,-1 (sq 17, sk 33)");
    expect_variant(ctx, window_nearly, "mask=none window=31,15",
                   "one key short of that, it is kept");
    expect_variant(ctx, window_causal, "mask=causal window=4,-1",
                   "right window 0 without a mask is the causal mask");
    expect_variant(ctx, window_tl, "mask=causal-tl window=-1,-1",
                   "top-left causal: left >= seqlen_q - 1 bounds nothing, right is the mask's");
    expect_variant(ctx, window_tl_short, "mask=causal-tl window=15,-1", "top-left: left 15 kept");
    expect_variant(ctx, softcap_on, "dropout=0 softcap=1 alibi=0 varlen=0", "softcap flag");
    expect_variant(ctx, alibi_on, "softcap=0 alibi=1 varlen=0", "alibi flag");
    expect_variant(ctx, dropout_on, "dropout=1 softcap=0", "dropout flag");
    expect_variant(ctx, varlen_on, "alibi=0 varlen=1", "varlen flag (batch strides ignored)");
    expect_variant(ctx, window_3_5, "fwd dqk=64", "the fast forward takes windows");
}

int main(void)
{
    fajit_options o;
    fajit_ctx *ctx = NULL;
    fajit_options_init(&o);
    o.cache_mode = FAJIT_CACHE_OFF;
    if (fajit_create(&ctx, &o) != 0) {
        printf("FAIL fajit_create: %s\n", fajit_last_error());
        return 1;
    }
    test_refusals(ctx);
    test_variants(ctx);
    if (access("/dev/nvidia0", F_OK) != 0) {
        fajit_attn_args a;
        valid_args(&a);
        dropout_on(&a);
        softcap_on(&a);
        alibi_on(&a);
        window_3_5(&a);
        int rc = fajit_attn_fwd(ctx, &a, NULL);
        check(rc == FAJIT_ENOGPU, "every feature at once passes validation (ENOGPU here)");
    }
    fajit_destroy(ctx);
    printf("%s\n", failures ? "FAILED" : "all passed");
    return failures != 0;
}
