/*
 * tests/test_bwd_api.c - fajit_attn_bwd through the public API without a GPU:
 * defaults of fajit_attn_bwd_args_init, every bad argument refused with its
 * name and value (nothing launched), empty problems as no-ops, FAJIT_ENOGPU
 * with valid arguments, and the variants the backward runs completing.
 */
#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "fajit.h"

static int failures;

static void check(int ok, const char *what)
{
    printf("%s %s\n", ok ? "ok  " : "FAIL", what);
    if (!ok) {
        printf("     detail: %s\n", fajit_last_error());
        failures++;
    }
}

static fajit_ctx *make_ctx(void)
{
    fajit_options o;
    fajit_ctx *ctx = NULL;
    fajit_options_init(&o);
    o.cache_mode = FAJIT_CACHE_OFF;
    if (fajit_create(&ctx, &o) != 0)
        printf("fajit_create: %s\n", fajit_last_error());
    return ctx;
}

static void test_init(void)
{
    fajit_attn_bwd_args a;
    memset(&a, 0x5a, sizeof a);
    fajit_attn_bwd_args_init(&a);
    int zero_strides = 1;
    for (int i = 0; i < 3; i++)
        zero_strides &= a.q_stride[i] == 0 && a.grad_v_stride[i] == 0 && a.grad_out_stride[i] == 0;
    check(a.struct_size == sizeof a && !a.q && !a.grad_out && !a.lse && !a.grad_k && a.batch == 0 &&
              zero_strides && a.dtype == FAJIT_DTYPE_FP16 && a.mask == FAJIT_MASK_NONE &&
              a.softmax_scale == 0.0f && a.deterministic == 0 && a.kernel == FAJIT_KERNEL_AUTO,
          "fajit_attn_bwd_args_init: struct_size, NULLs, contiguous, fp16, no mask, AUTO");
    check(a.window_left == -1 && a.window_right == -1 && a.softcap == 0.0f && !a.alibi_slopes &&
              a.alibi_batch_stride == 0 && a.dropout_p == 0.0f && a.dropout_seed == 0 &&
              a.dropout_offset == 0 && !a.cu_seqlens_q && !a.cu_seqlens_k,
          "fajit_attn_bwd_args_init: no feature (window -1,-1, no softcap, ALiBi, dropout, varlen)");
}

/* Never dereferenced: validation comes first, and here there is no GPU. */
static char fake[64] __attribute__((aligned(16)));

static void valid_args(fajit_attn_bwd_args *a)
{
    fajit_attn_bwd_args_init(a);
    a->q = a->k = a->v = a->o = a->grad_out = fake;
    a->lse = (const float *)fake;
    a->grad_q = a->grad_k = a->grad_v = fake;
    a->batch = 2, a->seqlen_q = 17, a->seqlen_k = 33, a->nheads_q = 8, a->nheads_kv = 2;
    a->dqk = 192, a->dv = 128;
}

typedef void (*breaker)(fajit_attn_bwd_args *);
static void bad_size(fajit_attn_bwd_args *a) { a->struct_size = 100000; }
static void small_size(fajit_attn_bwd_args *a) { a->struct_size = 8; }
static void bad_batch(fajit_attn_bwd_args *a) { a->batch = -1; }
static void bad_sq(fajit_attn_bwd_args *a) { a->seqlen_q = (int64_t)1 << 31; }
static void bad_sk(fajit_attn_bwd_args *a) { a->seqlen_k = -2; }
static void bad_hq(fajit_attn_bwd_args *a) { a->nheads_q = 0; }
static void bad_hkv(fajit_attn_bwd_args *a) { a->nheads_kv = 70000; }
static void bad_ratio(fajit_attn_bwd_args *a) { a->nheads_kv = 3; }
static void bad_dqk(fajit_attn_bwd_args *a) { a->dqk = 513; }
static void bad_dv(fajit_attn_bwd_args *a) { a->dv = 0; }
static void bad_dtype(fajit_attn_bwd_args *a) { a->dtype = 7; }
static void bad_mask(fajit_attn_bwd_args *a) { a->mask = 3; }
static void bad_det(fajit_attn_bwd_args *a) { a->deterministic = 2; }
static void bad_kernel(fajit_attn_bwd_args *a) { a->kernel = 9; }
static void bad_scale(fajit_attn_bwd_args *a) { a->softmax_scale = NAN; }
static void null_q(fajit_attn_bwd_args *a) { a->q = NULL; }
static void null_k(fajit_attn_bwd_args *a) { a->k = NULL; }
static void null_v(fajit_attn_bwd_args *a) { a->v = NULL; }
static void null_o(fajit_attn_bwd_args *a) { a->o = NULL; }
static void null_do(fajit_attn_bwd_args *a) { a->grad_out = NULL; }
static void null_lse(fajit_attn_bwd_args *a) { a->lse = NULL; }
static void null_dq(fajit_attn_bwd_args *a) { a->grad_q = NULL; }
static void null_dk(fajit_attn_bwd_args *a) { a->grad_k = NULL; }
static void null_dv(fajit_attn_bwd_args *a) { a->grad_v = NULL; }
static void odd_do(fajit_attn_bwd_args *a) { a->grad_out = fake + 1; }
static void odd_lse(fajit_attn_bwd_args *a) { a->lse = (const float *)(fake + 2); }
static void odd_dk(fajit_attn_bwd_args *a) { a->grad_k = fake + 1; }
static void neg_stride(fajit_attn_bwd_args *a) { a->grad_out_stride[1] = -5; }
static void neg_dq_stride(fajit_attn_bwd_args *a) { a->grad_q_stride[2] = -1; }
static void dv_overflow(fajit_attn_bwd_args *a) { a->grad_v_stride[0] = 1, a->grad_v_stride[1] = INT64_MAX / 4; }
static void batch_overflow(fajit_attn_bwd_args *a) { a->batch = 3, a->grad_k_stride[0] = INT64_MAX / 2 + 1, a->grad_k_stride[1] = 1; }
static void huge_sk(fajit_attn_bwd_args *a) { a->seqlen_k = (int64_t)INT32_MAX + 1; }
/* Gradients whose elements overlap (threads would race on them). */
static void dq_rows_short(fajit_attn_bwd_args *a) { a->grad_q_stride[0] = 100000, a->grad_q_stride[1] = 100, a->grad_q_stride[2] = 192; }
static void dq_rows_overlap(fajit_attn_bwd_args *a) { a->grad_q_stride[0] = 100000, a->grad_q_stride[1] = 1000, a->grad_q_stride[2] = 192; }
static void dk_heads_zero(fajit_attn_bwd_args *a) { a->grad_k_stride[0] = 33 * 384, a->grad_k_stride[1] = 384, a->grad_k_stride[2] = 0; }
static void dv_batches_overlap(fajit_attn_bwd_args *a) { a->grad_v_stride[0] = 100, a->grad_v_stride[1] = 256, a->grad_v_stride[2] = 128; }
/* Offsets past int64 or the address space, for tensors the old checks did not name. */
static void do_product_overflow(fajit_attn_bwd_args *a)
{
    a->batch = 65535, a->seqlen_q = INT32_MAX, a->nheads_q = 65535, a->nheads_kv = 1, a->seqlen_k = 1;
    a->dqk = a->dv = 512;
    a->q_stride[2] = a->o_stride[2] = 1; /* inputs may alias: these span little */
}
static void o_row_overflow(fajit_attn_bwd_args *a) { a->o_stride[1] = INT64_MAX / 8, a->o_stride[2] = 128; }
static void lse_overflow(fajit_attn_bwd_args *a)
{
    a->batch = 65535, a->nheads_q = 65535, a->nheads_kv = 1, a->seqlen_q = (int64_t)1 << 30;
    a->seqlen_k = 1, a->dqk = a->dv = 1;
}
static void dq_past_the_end(fajit_attn_bwd_args *a) { a->grad_q = (void *)(UINTPTR_MAX - 15); }
/* The features (the forward's rules). */
static void bad_wl(fajit_attn_bwd_args *a) { a->window_left = -2; }
static void bad_wr(fajit_attn_bwd_args *a) { a->window_right = -3; }
static void neg_softcap(fajit_attn_bwd_args *a) { a->softcap = -1.0f; }
static void nan_softcap(fajit_attn_bwd_args *a) { a->softcap = NAN; }
static void inf_softcap(fajit_attn_bwd_args *a) { a->softcap = INFINITY; }
static void p_one(fajit_attn_bwd_args *a) { a->dropout_p = 1.0f; }
static void p_neg(fajit_attn_bwd_args *a) { a->dropout_p = -0.5f; }
static void p_nan(fajit_attn_bwd_args *a) { a->dropout_p = NAN; }
static void odd_alibi(fajit_attn_bwd_args *a) { a->alibi_slopes = (const float *)(fake + 2); }
static void alibi_stride_short(fajit_attn_bwd_args *a) { a->alibi_slopes = (const float *)fake, a->alibi_batch_stride = 3; }
static void alibi_stride_neg(fajit_attn_bwd_args *a) { a->alibi_slopes = (const float *)fake, a->alibi_batch_stride = -8; }
static void alibi_stride_overflow(fajit_attn_bwd_args *a) { a->batch = 3, a->alibi_slopes = (const float *)fake, a->alibi_batch_stride = INT64_MAX; }
static void cu_k_missing(fajit_attn_bwd_args *a) { a->cu_seqlens_q = (const int32_t *)fake; }
static void cu_q_missing(fajit_attn_bwd_args *a) { a->cu_seqlens_k = (const int32_t *)fake; }
static void odd_cu_q(fajit_attn_bwd_args *a) { a->cu_seqlens_q = (const int32_t *)(fake + 1), a->cu_seqlens_k = (const int32_t *)fake; }
static void odd_cu_k(fajit_attn_bwd_args *a) { a->cu_seqlens_q = (const int32_t *)fake, a->cu_seqlens_k = (const int32_t *)(fake + 2); }
static void varlen_no_batch(fajit_attn_bwd_args *a) { a->batch = 0, a->cu_seqlens_q = a->cu_seqlens_k = (const int32_t *)fake; }
/* Under varlen the batch stride is ignored, but the row strides still count. */
static void varlen_dq_rows_overlap(fajit_attn_bwd_args *a)
{
    a->cu_seqlens_q = a->cu_seqlens_k = (const int32_t *)fake;
    a->grad_q_stride[0] = 0, a->grad_q_stride[1] = 100, a->grad_q_stride[2] = 192;
}

static void test_validation(fajit_ctx *ctx)
{
    static const struct {
        breaker fn;
        const char *named;
    } cases[] = {
        {bad_size, "struct_size=100000"},   {small_size, "struct_size=8"},
        {bad_batch, "batch=-1"},            {bad_sq, "seqlen_q=2147483648"},
        {bad_sk, "seqlen_k=-2"},            {bad_hq, "nheads_q=0"},
        {bad_hkv, "nheads_kv=70000"},       {bad_ratio, "nheads_kv=3"},
        {bad_dqk, "dqk=513"},               {bad_dv, "dv=0"},
        {bad_dtype, "dtype=7"},             {bad_mask, "mask=3"},
        {bad_det, "deterministic=2"},       {bad_kernel, "kernel=9"},
        {bad_scale, "softmax_scale=nan"},   {null_q, "q: NULL"},
        {null_k, "k: NULL"},                {null_v, "v: NULL"},
        {null_o, "o: NULL"},                {null_do, "grad_out: NULL"},
        {null_lse, "lse: NULL"},            {null_dq, "grad_q: NULL"},
        {null_dk, "grad_k: NULL"},          {null_dv, "grad_v: NULL"},
        {odd_do, "grad_out="},              {odd_lse, "lse="},
        {odd_dk, "grad_k="},                {neg_stride, "grad_out_stride[1]=-5"},
        {neg_dq_stride, "grad_q_stride[2]=-1"}, {dv_overflow, "grad_v_stride[1]"},
        {batch_overflow, "grad_k_stride[0]"},
        {huge_sk, "seqlen_k=2147483648"},
        {dq_rows_short, "grad_q_stride[1]=100: rows of grad_q overlap (need >= dqk=192)"},
        {dq_rows_overlap, "grad_q_stride[1]=1000: rows of grad_q overlap (need >= nheads_q=8 x grad_q_stride[2]=192)"},
        {dk_heads_zero, "grad_k_stride[2]=0: heads of grad_k overlap"},
        {dv_batches_overlap, "grad_v_stride[0]=100: batches of grad_v overlap (need >= dv=128)"},
        {do_product_overflow, "grad_out: batch=65535 x seqlen_q=2147483647 x nheads_q=65535 x dv=512"},
        {o_row_overflow, "o_stride[1]=1152921504606846975: with seqlen_q=17"},
        {lse_overflow, "lse: batch=65535 x nheads_q=65535 x seqlen_q=1073741824"},
        {dq_past_the_end, "grad_q=0xfffffffffffffff0: its"},
        {bad_wl, "window_left=-2"},         {bad_wr, "window_right=-3"},
        {neg_softcap, "softcap=-1"},        {nan_softcap, "softcap=nan"},
        {inf_softcap, "softcap=inf"},       {p_one, "dropout_p=1: must be in [0, 1)"},
        {p_neg, "dropout_p=-0.5"},          {p_nan, "dropout_p=nan"},
        {odd_alibi, "alibi_slopes="},       {alibi_stride_short, "alibi_batch_stride=3"},
        {alibi_stride_neg, "alibi_batch_stride=-8"},
        {alibi_stride_overflow, "alibi_batch_stride=9223372036854775807"},
        {cu_k_missing, "cu_seqlens_k: NULL while cu_seqlens_q is set"},
        {cu_q_missing, "cu_seqlens_q: NULL while cu_seqlens_k is set"},
        {odd_cu_q, "cu_seqlens_q="},        {odd_cu_k, "cu_seqlens_k="},
        {varlen_no_batch, "batch=0: varlen"},
        {varlen_dq_rows_overlap, "grad_q_stride[1]=100: rows of grad_q overlap"},
    };
    fajit_attn_bwd_args a;
    char what[200];

    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        valid_args(&a);
        cases[i].fn(&a);
        int rc = fajit_attn_bwd(ctx, &a, NULL);
        snprintf(what, sizeof what, "fajit_attn_bwd refuses a bad argument, naming '%s'",
                 cases[i].named);
        check(rc == FAJIT_EINVAL && strstr(fajit_last_error(), cases[i].named), what);
    }
    valid_args(&a);
    check(fajit_attn_bwd(ctx, NULL, NULL) == FAJIT_EINVAL && strstr(fajit_last_error(), "args"),
          "NULL args are refused");
    check(fajit_attn_bwd(NULL, &a, NULL) == FAJIT_EINVAL && strstr(fajit_last_error(), "ctx"),
          "a NULL context is refused");
}

/* Valid feature arguments pass validation (FAJIT_ENOGPU here), and a struct
 * from a header without the features (struct_size up to `kernel`) is read
 * without them: whatever lies past its end is never looked at. Called only
 * with no GPU (the fake pointers must never reach one). */
static void test_features_pass(fajit_ctx *ctx)
{
    fajit_attn_bwd_args a;
    valid_args(&a);
    a.window_left = 16, a.window_right = 0, a.softcap = 30.0f;
    a.alibi_slopes = (const float *)fake, a.alibi_batch_stride = 8;
    a.dropout_p = 0.25f, a.dropout_seed = ~0ull, a.dropout_offset = 1ull << 40;
    check(fajit_attn_bwd(ctx, &a, NULL) == FAJIT_ENOGPU,
          "window, softcap, ALiBi per batch and head, dropout: FAJIT_ENOGPU");
    valid_args(&a);
    a.cu_seqlens_q = a.cu_seqlens_k = (const int32_t *)fake;
    a.batch = 3, a.alibi_slopes = (const float *)fake;
    a.q_stride[0] = 999, a.q_stride[1] = 8 * 192, a.q_stride[2] = 192; /* batch stride ignored */
    check(fajit_attn_bwd(ctx, &a, NULL) == FAJIT_ENOGPU, "varlen with ALiBi: FAJIT_ENOGPU");
    valid_args(&a);
    a.window_left = -7, a.softcap = -1.0f, a.dropout_p = 2.0f; /* past the old struct's end */
    a.struct_size = (uint32_t)(offsetof(fajit_attn_bwd_args, kernel) + sizeof a.kernel);
    check(fajit_attn_bwd(ctx, &a, NULL) == FAJIT_ENOGPU,
          "a struct without the feature fields (older header): they keep their defaults");
    a.struct_size -= 1;
    check(fajit_attn_bwd(ctx, &a, NULL) == FAJIT_EINVAL && strstr(fajit_last_error(), "struct_size="),
          "a struct shorter than the first version is refused");
}

static void test_no_work_and_no_gpu(fajit_ctx *ctx)
{
    fajit_attn_bwd_args a;
    valid_args(&a);
    a.batch = 0;
    check(fajit_attn_bwd(ctx, &a, NULL) == 0, "an empty batch is a successful no-op");
    valid_args(&a);
    a.seqlen_q = a.seqlen_k = 0;
    check(fajit_attn_bwd(ctx, &a, NULL) == 0, "no rows and no keys: a successful no-op");
    if (access("/dev/nvidia0", F_OK) == 0) { /* the fake pointers must never reach a GPU */
        printf("skip the no-GPU checks: this machine has a GPU\n");
        return;
    }
    valid_args(&a);
    a.seqlen_k = 0;
    a.k = a.v = a.grad_k = a.grad_v = NULL;
    check(fajit_attn_bwd(ctx, &a, NULL) == FAJIT_ENOGPU,
          "no keys: k, v, grad_k and grad_v may be NULL (FAJIT_ENOGPU, not EINVAL)");
    valid_args(&a);
    a.q_stride[0] = 0, a.q_stride[1] = 0, a.q_stride[2] = 192;     /* every row the same */
    a.grad_out_stride[0] = 0, a.grad_out_stride[1] = 8, a.grad_out_stride[2] = 0;
    a.grad_q_stride[0] = 192, a.grad_q_stride[1] = 2 * 8 * 192, a.grad_q_stride[2] = 2 * 192;
    check(fajit_attn_bwd(ctx, &a, NULL) == FAJIT_ENOGPU,
          "overlapping inputs and a permuted, disjoint grad_q pass validation (FAJIT_ENOGPU)");
    valid_args(&a);
    int rc = fajit_attn_bwd(ctx, &a, NULL);
    check(rc == FAJIT_ENOGPU && fajit_last_error()[0] != '\0',
          "valid arguments without a GPU give FAJIT_ENOGPU with the reason");
    printf("     reason: %s\n", fajit_last_error());
    valid_args(&a);
    a.deterministic = 1;
    a.kernel = FAJIT_KERNEL_REFERENCE;
    a.mask = FAJIT_MASK_CAUSAL_TL;
    a.dtype = FAJIT_DTYPE_BF16;
    check(fajit_attn_bwd(ctx, &a, NULL) == FAJIT_ENOGPU, "deterministic reference, bf16, causal-tl: FAJIT_ENOGPU");
    test_features_pass(ctx);
}

/* The two ops the reference backward launches complete and render, so a
 * manifest can name them for prebuilding. */
static void test_variants(fajit_ctx *ctx)
{
    char text[400], *src = NULL;
    size_t len = 0;
    int n = fajit_variant_complete(ctx, "ref-dq dqk=192 dv=128 dtype=bf16 mask=causal", text,
                                   sizeof text);
    check(n > 0 && strncmp(text, "ref-dq dqk=192 dv=128 dtype=bf16 mask=causal ", 45) == 0 &&
              strstr(text, "bm=4 bn=32 warps=4 stages=1"),
          "ref-dq spec completes with the reference's tiles");
    printf("     %s\n", n > 0 ? text : "");
    n = fajit_variant_complete(ctx, "ref-dkdv dqk=64", text, sizeof text);
    check(n > 0 && strncmp(text, "ref-dkdv dqk=64 dv=64 ", 22) == 0, "ref-dkdv spec completes");
    check(fajit_variant_complete(ctx, "ref-dkdv dqk=64 bn=48", text, sizeof text) == FAJIT_EPARSE &&
              strstr(fajit_last_error(), "bn=48: op ref-dkdv needs a multiple of 32"),
          "ref-dkdv refuses bn=48, naming the op");
    n = fajit_variant_complete(ctx, "ref-dkdv dqk=100 window=16,7 dropout=1 softcap=1 alibi=1 varlen=1",
                               text, sizeof text);
    check(n > 0 && strstr(text, "window=16,7 dropout=1 softcap=1 alibi=1 varlen=1"),
          "ref-dkdv spec with every feature completes");
    check(fajit_variant_complete(ctx, "ref-dq dqk=64 window=-2,0", text, sizeof text) == FAJIT_EPARSE,
          "ref-dq refuses window=-2,0");
    check(fajit_variant_source(ctx, "ref-dkdv dqk=72", &src, &len) == 0 &&
              strstr(src, "fajit_ref_bwd_dkdv") && strstr(src, "static constexpr int FAJIT_OP = 4;") &&
              !strstr(src, "#include \""),
          "ref-dkdv source is complete and defines fajit_ref_bwd_dkdv");
    fajit_free(src);
}

int main(void)
{
    fajit_ctx *ctx = make_ctx();
    if (!ctx)
        return 1;
    test_init();
    test_validation(ctx);
    test_no_work_and_no_gpu(ctx);
    test_variants(ctx);
    fajit_destroy(ctx);
    printf("%s: %d failure(s)\n", failures ? "FAIL" : "PASS", failures);
    return failures ? 1 : 0;
}
