/*
 * tests/test_api.c - the public API without a GPU: options and environment,
 * cache modes, compile and cache queries, argument validation of
 * fajit_attn_fwd (every bad value named, nothing launched), FAJIT_ENOGPU, and
 * the tiles fajit_attn_variant reports for a decode and a prefill shape.
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "fajit.h"

static int failures;
static char tmp[256];

static void check(int ok, const char *what)
{
    printf("%s %s\n", ok ? "ok  " : "FAIL", what);
    if (!ok) {
        printf("     detail: %s\n", fajit_last_error());
        failures++;
    }
}

static int exists(const char *path)
{
    struct stat st;
    return stat(path, &st) == 0;
}

static fajit_ctx *make_ctx(const char *dir, int mode)
{
    fajit_options o;
    fajit_ctx *ctx = NULL;
    fajit_options_init(&o);
    o.cache_dir = dir;
    o.cache_mode = mode;
    if (fajit_create(&ctx, &o) != 0)
        printf("     fajit_create(%s): %s\n", dir, fajit_last_error());
    return ctx;
}

static void test_options_and_environment(void)
{
    char a[300], b[300], x[300];
    fajit_options o;
    fajit_ctx *ctx;
    fajit_info info;

    snprintf(a, sizeof a, "%s/env-dir", tmp);
    snprintf(b, sizeof b, "%s/explicit-dir", tmp);
    snprintf(x, sizeof x, "%s/xdg", tmp);
    setenv("FAJIT_CACHE_DIR", a, 1);
    ctx = make_ctx(NULL, FAJIT_CACHE_DEFAULT);
    check(ctx && fajit_get_info(ctx, &info) == 0 && strcmp(info.cache_dir, a) == 0,
          "FAJIT_CACHE_DIR sets the cache directory");
    fajit_destroy(ctx);
    ctx = make_ctx(b, FAJIT_CACHE_DEFAULT);
    check(ctx && fajit_get_info(ctx, &info) == 0 && strcmp(info.cache_dir, b) == 0,
          "an explicit cache_dir overrides FAJIT_CACHE_DIR");
    fajit_destroy(ctx);
    unsetenv("FAJIT_CACHE_DIR");
    setenv("XDG_CACHE_HOME", x, 1);
    ctx = make_ctx(NULL, FAJIT_CACHE_OFF);
    check(ctx && fajit_get_info(ctx, &info) == 0 && strncmp(info.cache_dir, x, strlen(x)) == 0 &&
              strcmp(info.cache_dir + strlen(x), "/fajit") == 0,
          "XDG_CACHE_HOME/fajit is the next default");
    fajit_destroy(ctx);
    unsetenv("XDG_CACHE_HOME");
    setenv("HOME", "/nonexistent-home", 1);
    ctx = make_ctx(NULL, FAJIT_CACHE_OFF);
    check(ctx && fajit_get_info(ctx, &info) == 0 &&
              strcmp(info.cache_dir, "/nonexistent-home/.cache/fajit") == 0,
          "~/.cache/fajit is the last default");
    fajit_destroy(ctx);

    setenv("FAJIT_CACHE_MODE", "sideways", 1);
    fajit_options_init(&o);
    o.cache_dir = b;
    ctx = NULL;
    check(fajit_create(&ctx, &o) == FAJIT_EINVAL && !ctx &&
              strstr(fajit_last_error(), "FAJIT_CACHE_MODE=sideways"),
          "a bad FAJIT_CACHE_MODE is refused, naming it");
    setenv("FAJIT_CACHE_MODE", "off", 1);
    ctx = make_ctx(b, FAJIT_CACHE_DEFAULT);
    check(ctx && fajit_get_info(ctx, &info) == 0 && info.cache_mode == FAJIT_CACHE_OFF,
          "FAJIT_CACHE_MODE=off applies when the option is unset");
    fajit_destroy(ctx);
    ctx = make_ctx(b, FAJIT_CACHE_READONLY);
    check(ctx && fajit_get_info(ctx, &info) == 0 && info.cache_mode == FAJIT_CACHE_READONLY,
          "an explicit cache_mode overrides FAJIT_CACHE_MODE");
    fajit_destroy(ctx);
    unsetenv("FAJIT_CACHE_MODE");
    setenv("FAJIT_DEVICE", "-3", 1);
    check(fajit_create(&ctx, &o) == FAJIT_EINVAL && strstr(fajit_last_error(), "FAJIT_DEVICE=-3"),
          "a bad FAJIT_DEVICE is refused, naming it");
    unsetenv("FAJIT_DEVICE");
    o.struct_size = 3;
    check(fajit_create(&ctx, &o) == FAJIT_EINVAL && strstr(fajit_last_error(), "struct_size"),
          "an options struct not from fajit_options_init is refused");
    fajit_destroy(NULL); /* a no-op */
    check(strcmp(fajit_version(), FAJIT_VERSION_STRING) == 0, "fajit_version matches the header");
    check(strcmp(fajit_strerror(FAJIT_ENOGPU), "no usable GPU or CUDA driver") == 0 &&
              strcmp(fajit_strerror(12345), "unknown status") == 0,
          "fajit_strerror names codes from the X-macro list");
}

#define SPEC "ref dqk=40 dv=24 dtype=bf16 mask=causal-tl arch=sm_80"

static void test_cache_modes(void)
{
    char off[300], ro[300], rw[300];
    fajit_compile_result r1, r2;
    fajit_entry_info e;
    fajit_ctx *ctx;

    snprintf(off, sizeof off, "%s/off", tmp);
    ctx = make_ctx(off, FAJIT_CACHE_OFF);
    check(ctx && fajit_compile(ctx, SPEC, &r1) == 0 && !r1.cached && r1.cubin_bytes > 0,
          "mode off compiles in memory");
    check(!exists(off), "mode off never creates the cache directory");
    fajit_destroy(ctx);

    snprintf(ro, sizeof ro, "%s/ro-missing", tmp);
    ctx = make_ctx(ro, FAJIT_CACHE_READONLY);
    check(ctx && fajit_compile(ctx, SPEC, &r1) == 0 && !r1.cached, "read-only compiles a miss");
    check(ctx && fajit_compile(ctx, SPEC, &r1) == 0 && !r1.cached,
          "read-only stores nothing (a second ask compiles again)");
    check(ctx && fajit_cache_remove(ctx, NULL) == FAJIT_EREADONLY, "read-only refuses rm");
    fajit_destroy(ctx);
    check(!exists(ro), "read-only never creates the cache directory");

    snprintf(rw, sizeof rw, "%s/rw", tmp);
    ctx = make_ctx(rw, FAJIT_CACHE_READWRITE);
    check(ctx && fajit_compile(ctx, SPEC, &r1) == 0 && !r1.cached && r1.registers > 0 &&
              r1.compile_ms > 0,
          "read-write compiles a miss and reports registers and time");
    check(ctx && fajit_compile(ctx, SPEC, &r2) == 0 && r2.cached &&
              strcmp(r1.key_hex, r2.key_hex) == 0 && r1.cubin_bytes == r2.cubin_bytes,
          "the second ask is a hit with the same key");
    check(fajit_cache_find(ctx, SPEC, &e) == 0 && e.valid && e.current_build &&
              strcmp(e.key_hex, r1.key_hex) == 0 && strstr(e.variant, "dqk=40 dv=24") &&
              strcmp(e.arch, "sm_80") == 0,
          "find by spec gives the entry, its variant text and arch");
    char prefix[8];
    memcpy(prefix, r1.key_hex, 7);
    prefix[7] = '\0';
    check(fajit_cache_find(ctx, prefix, &e) == 0 && strcmp(e.key_hex, r1.key_hex) == 0,
          "find by a hex prefix");
    check(fajit_cache_find(ctx, "ref dqk=41", &e) == FAJIT_ENOTFOUND, "an absent spec is not found");
    check(fajit_cache_find(ctx, "ref dqk=x", &e) == FAJIT_EPARSE &&
              strstr(fajit_last_error(), "dqk"),
          "a bad key is refused, naming the field");
    check(fajit_cache_remove(ctx, r1.key_hex) == 0 && fajit_cache_find(ctx, SPEC, &e) == FAJIT_ENOTFOUND,
          "rm removes the entry");
    fajit_destroy(ctx);
    ctx = make_ctx(rw, FAJIT_CACHE_READONLY);
    check(ctx && fajit_compile(ctx, SPEC, &r2) == 0 && !r2.cached, "read-only sees the removal");
    fajit_destroy(ctx);
}

static int count_cb(void *user, const char *variant)
{
    (void)variant;
    ++*(int *)user;
    return 0;
}

static void test_variants(void)
{
    char buf[400];
    int n = 0;
    fajit_ctx *ctx = make_ctx("/nonexistent", FAJIT_CACHE_OFF);
    char *src = NULL;
    size_t len = 0;

    check(fajit_variant_complete(ctx, "ref dqk=72", buf, sizeof buf) > 0 &&
              strstr(buf, "ref dqk=72 dv=72 dtype=fp16 mask=none") && strstr(buf, "bm=4 bn=32"),
          "a spec is completed with defaults and heuristic tiles");
    check(fajit_variant_complete(ctx, "ref dqk=72 dtype=fp8", buf, sizeof buf) == FAJIT_EPARSE &&
              strstr(fajit_last_error(), "fp8"),
          "a bad spec is refused, naming the value");
    check(fajit_manifest_expand(ctx, "# two dims, two dtypes\nref dqk=64,128 dtype=fp16,bf16\n",
                                count_cb, &n) == 0 && n == 4,
          "a manifest expands to the product");
    n = 0;
    check(fajit_manifest_expand(ctx, "ref dqk=64\nref dqk=64 bogus=1\n", count_cb, &n) ==
                  FAJIT_EPARSE &&
              strstr(fajit_last_error(), "line 2") && strstr(fajit_last_error(), "bogus"),
          "a bad manifest line is refused, naming line and field");
    static const char *const archs[] = {"sm_80", "sm_86", "sm_89", "sm_90"};
    for (size_t i = 0; i < sizeof archs / sizeof archs[0]; i++) {
        char spec[64], what[96];
        fajit_compile_result r;
        snprintf(spec, sizeof spec, "ref dqk=64 dtype=bf16 arch=%s", archs[i]);
        snprintf(what, sizeof what, "the reference compiles for %s", archs[i]);
        check(fajit_compile(ctx, spec, &r) == 0 && r.cubin_bytes > 0, what);
    }
    check(fajit_variant_source(ctx, "ref dqk=72", &src, &len) == 0 && len == strlen(src) &&
              strstr(src, "fajit_ref_fwd") && !strstr(src, "#include \""),
          "the source is complete (no includes left) and names the kernel");
    fajit_free(src);
    fajit_destroy(ctx);
}

static void valid_args(fajit_attn_args *a)
{
    static const char fake[64] __attribute__((aligned(16))) = {0};
    fajit_attn_args_init(a);
    /* Never dereferenced: validation happens first, and here there is no GPU. */
    a->q = a->k = a->v = fake;
    a->o = (void *)fake;
    a->batch = 2, a->seqlen_q = 17, a->seqlen_k = 33, a->nheads_q = 8, a->nheads_kv = 2;
    a->dqk = 72, a->dv = 72;
}

typedef void (*breaker)(fajit_attn_args *);
static void bad_dqk(fajit_attn_args *a) { a->dqk = 513; }
static void bad_dv(fajit_attn_args *a) { a->dv = 0; }
static void bad_heads(fajit_attn_args *a) { a->nheads_kv = 3; }
static void bad_dtype(fajit_attn_args *a) { a->dtype = 7; }
static void bad_mask(fajit_attn_args *a) { a->mask = -1; }
static void bad_q(fajit_attn_args *a) { a->q = NULL; }
static void bad_align(fajit_attn_args *a) { a->o = (char *)a->o + 1; }
static void bad_stride(fajit_attn_args *a) { a->k_stride[1] = -5; }
static void bad_scale(fajit_attn_args *a) { a->softmax_scale = 1.0f / 0.0f; }
static void bad_size(fajit_attn_args *a) { a->struct_size = 100000; }
static void bad_batch(fajit_attn_args *a) { a->batch = -1; }
static void bad_overflow(fajit_attn_args *a) { a->q_stride[0] = 1, a->q_stride[1] = INT64_MAX / 4; }
static void huge_sq(fajit_attn_args *a) { a->seqlen_q = (int64_t)INT32_MAX + 1; }
static void neg_sk(fajit_attn_args *a) { a->seqlen_k = -1; }
static void zero_heads(fajit_attn_args *a) { a->nheads_q = 0; }
static void huge_batch(fajit_attn_args *a) { a->batch = 70000; }
static void zero_dqk(fajit_attn_args *a) { a->dqk = 0; }
static void null_k(fajit_attn_args *a) { a->k = NULL; }
static void null_o(fajit_attn_args *a) { a->o = NULL; }
static void odd_k(fajit_attn_args *a) { a->k = (const char *)a->k + 1; }
static void odd_lse(fajit_attn_args *a) { a->lse = (float *)((char *)a->o + 2); }
/* o's rows closer than a row of dv elements, heads on top of each other... */
static void o_rows_short(fajit_attn_args *a) { a->o_stride[0] = 100000, a->o_stride[1] = 64, a->o_stride[2] = 72; }
static void o_rows_overlap(fajit_attn_args *a) { a->o_stride[0] = 100000, a->o_stride[1] = 200, a->o_stride[2] = 72; }
static void o_heads_zero(fajit_attn_args *a) { a->o_stride[0] = 17 * 576, a->o_stride[1] = 576, a->o_stride[2] = 0; }
static void o_batches_overlap(fajit_attn_args *a) { a->o_stride[0] = 100, a->o_stride[1] = 576, a->o_stride[2] = 72; }
/* ...largest offsets past int64 (explicit strides, and the sizes' product for
 * contiguous ones), or past the end of the address space. */
static void o_batch_overflow(fajit_attn_args *a) { a->o_stride[0] = INT64_MAX / 2, a->o_stride[1] = 576, a->o_stride[2] = 72; }
static void v_row_overflow(fajit_attn_args *a) { a->v_stride[1] = INT64_MAX / 16, a->v_stride[2] = 72; }
static void q_product_overflow(fajit_attn_args *a)
{
    a->batch = 65535, a->seqlen_q = INT32_MAX, a->nheads_q = 65535, a->nheads_kv = 1, a->dqk = 512;
}
static void k_product_overflow(fajit_attn_args *a)
{
    a->batch = 65535, a->seqlen_k = INT32_MAX, a->nheads_q = a->nheads_kv = 65535, a->seqlen_q = 1;
}
static void q_past_the_end(fajit_attn_args *a) { a->q = (const void *)(UINTPTR_MAX - 15); }
/* q and o fit int64 bytes (dims 1), the LSE's 4-byte floats do not. */
static void lse_overflow(fajit_attn_args *a)
{
    a->lse = (float *)a->o;
    a->batch = 65535, a->nheads_q = 65535, a->nheads_kv = 1, a->seqlen_q = (int64_t)1 << 30;
    a->seqlen_k = 1, a->dqk = a->dv = 1;
}
static void lse_past_the_end(fajit_attn_args *a) { a->lse = (float *)(UINTPTR_MAX - 3); }
static void odd_workspace(fajit_attn_args *a) { a->workspace = (char *)a->o + 8, a->workspace_bytes = 4096; }
static void null_workspace(fajit_attn_args *a) { a->workspace_bytes = 4096; }

/* Inputs may alias (reads are safe); dims of extent 1 may have any stride. */
static void check_accepted_layouts(fajit_ctx *ctx)
{
    fajit_attn_args a;
    char text[400];
    valid_args(&a);
    a.q_stride[0] = 0, a.q_stride[1] = 0, a.q_stride[2] = 72; /* every row the same */
    a.k_stride[0] = 0, a.k_stride[1] = 8, a.k_stride[2] = 0;  /* rows and heads overlap */
    check(fajit_attn_variant(ctx, &a, text, sizeof text) > 0,
          "inputs with overlapping batches, rows and heads are accepted");
    valid_args(&a);
    a.batch = 1, a.nheads_q = a.nheads_kv = 1;
    a.o_stride[0] = 0, a.o_stride[1] = 72, a.o_stride[2] = 0;
    check(fajit_attn_variant(ctx, &a, text, sizeof text) > 0,
          "an output's extent-1 dims may have any stride");
    valid_args(&a);
    a.o_stride[0] = 72, a.o_stride[1] = 2 * 8 * 72, a.o_stride[2] = 2 * 72; /* (s, h, b) order */
    check(fajit_attn_variant(ctx, &a, text, sizeof text) > 0,
          "an output with permuted but disjoint dims is accepted");
}

static void test_attn_validation(void)
{
    static const struct {
        breaker fn;
        const char *named;
    } cases[] = {
        {bad_dqk, "dqk=513"},         {bad_dv, "dv=0"},       {bad_heads, "nheads_kv=3"},
        {bad_dtype, "dtype=7"},       {bad_mask, "mask=-1"},  {bad_q, "q: NULL"},
        {bad_align, "aligned"},       {bad_stride, "k_stride[1]=-5"},
        {bad_scale, "softmax_scale"}, {bad_size, "struct_size=100000"},
        {bad_batch, "batch=-1"},      {bad_overflow, "overflow"},
        {huge_sq, "seqlen_q=2147483648"}, {neg_sk, "seqlen_k=-1"}, {zero_heads, "nheads_q=0"},
        {huge_batch, "batch=70000"},  {zero_dqk, "dqk=0"},    {null_k, "k: NULL"},
        {null_o, "o: NULL"},          {odd_k, "k=0x"},        {odd_lse, "lse=0x"},
        {o_rows_short, "o_stride[1]=64: rows of o overlap (need >= dv=72)"},
        {o_rows_overlap, "o_stride[1]=200: rows of o overlap (need >= nheads_q=8 x o_stride[2]=72)"},
        {o_heads_zero, "o_stride[2]=0: heads of o overlap"},
        {o_batches_overlap, "o_stride[0]=100: batches of o overlap"},
        {o_batch_overflow, "o_stride[0]=4611686018427387903: with batch=2"},
        {v_row_overflow, "v_stride[1]=576460752303423487: with seqlen_k=33"},
        {q_product_overflow, "q: batch=65535 x seqlen_q=2147483647 x nheads_q=65535 x dqk=512"},
        {k_product_overflow, "k: batch=65535 x seqlen_k=2147483647 x nheads_kv=65535"},
        {q_past_the_end, "past the end of the address space"},
        {lse_overflow, "lse: batch=65535 x nheads_q=65535 x seqlen_q=1073741824"},
        {lse_past_the_end, "lse=0xfffffffffffffffc: its"},
        {odd_workspace, "not 16-byte aligned"},
        {null_workspace, "workspace_bytes=4096 with a NULL workspace"},
    };
    fajit_ctx *ctx = make_ctx("/nonexistent", FAJIT_CACHE_OFF);
    fajit_attn_args a;
    char what[160];

    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        valid_args(&a);
        cases[i].fn(&a);
        int rc = fajit_attn_fwd(ctx, &a, NULL);
        snprintf(what, sizeof what, "fajit_attn_fwd refuses a bad argument, naming '%s'",
                 cases[i].named);
        check(rc == FAJIT_EINVAL && strstr(fajit_last_error(), cases[i].named), what);
        if (cases[i].fn != bad_size && cases[i].fn != odd_workspace && cases[i].fn != null_workspace) {
            size_t bytes = 1;
            rc = fajit_attn_fwd_workspace_size(ctx, &a, &bytes);
            snprintf(what, sizeof what, "fajit_attn_fwd_workspace_size refuses it too, naming '%s'",
                     cases[i].named);
            check(rc == FAJIT_EINVAL && strstr(fajit_last_error(), cases[i].named) && bytes == 0, what);
        }
    }
    valid_args(&a);
    null_workspace(&a);
    {
        size_t bytes = 1;
        check(fajit_attn_fwd_workspace_size(ctx, &a, &bytes) != FAJIT_EINVAL,
              "fajit_attn_fwd_workspace_size ignores the workspace fields");
        check(fajit_attn_fwd_workspace_size(ctx, &a, NULL) == FAJIT_EINVAL &&
                  strstr(fajit_last_error(), "bytes: NULL"),
              "fajit_attn_fwd_workspace_size refuses a NULL bytes");
        a.batch = 0;
        check(fajit_attn_fwd_workspace_size(ctx, &a, &bytes) == 0 && bytes == 0,
              "an empty batch needs no workspace");
    }
    check_accepted_layouts(ctx);
    check(fajit_attn_fwd(ctx, NULL, NULL) == FAJIT_EINVAL, "NULL args are refused");
    check(fajit_attn_fwd(NULL, &a, NULL) == FAJIT_EINVAL, "a NULL context is refused");
    valid_args(&a);
    a.batch = 0;
    check(fajit_attn_fwd(ctx, &a, NULL) == 0, "an empty batch is a successful no-op");
    valid_args(&a);
    if (access("/dev/nvidia0", F_OK) != 0) {
        int rc = fajit_attn_fwd(ctx, &a, NULL);
        check(rc == FAJIT_ENOGPU && fajit_last_error()[0] != '\0',
              "valid arguments without a GPU give FAJIT_ENOGPU with the reason");
        printf("     reason: %s\n", fajit_last_error());
        size_t bytes = 1;
        check(fajit_attn_fwd_workspace_size(ctx, &a, &bytes) == FAJIT_ENOGPU && bytes == 0,
              "fajit_attn_fwd_workspace_size without a GPU gives FAJIT_ENOGPU");
        char text[400];
        check(fajit_attn_variant(ctx, &a, text, sizeof text) > 0 && strstr(text, "arch=sm_90") &&
                  strstr(text, "dqk=72 dv=72 dtype=fp16"),
              "fajit_attn_variant without a GPU assumes sm_90");
    } else {
        printf("skip the no-GPU checks: this machine has a GPU\n");
    }
    fajit_destroy(ctx);
}

/* fajit_attn_variant reports the tiles for the call's shape: a decode step
 * (seqlen_q 1, 32/8 heads, d128 bf16) gets the few-rows rule's bm 16, 4 warps, the
 * same variant at prefill the usual 4 (runtime/heuristic.c). Cache off: no
 * tuning record can change them. */
static void test_decode_tiles(void)
{
    fajit_ctx *ctx = make_ctx("/nonexistent", FAJIT_CACHE_OFF);
    fajit_attn_args a;
    char text[400] = "";
    valid_args(&a);
    a.batch = 1, a.seqlen_q = 1, a.seqlen_k = 65536, a.nheads_q = 32, a.nheads_kv = 8;
    a.dqk = a.dv = 128, a.dtype = FAJIT_DTYPE_BF16;
    check(fajit_attn_variant(ctx, &a, text, sizeof text) > 0 && strncmp(text, "fwd dqk=128", 11) == 0 &&
              strstr(text, " bm=16 ") && strstr(text, " warps=4 "),
          "decode: the few-rows tile");
    printf("     %s\n", text);
    a.seqlen_q = a.seqlen_k = 1024;
    check(fajit_attn_variant(ctx, &a, text, sizeof text) > 0 && strstr(text, " bm=128 bn=64 warps=4 "),
          "prefill of the same variant: the usual tile");
    printf("     %s\n", text);
    fajit_destroy(ctx);
}

int main(void)
{
    snprintf(tmp, sizeof tmp, "/tmp/fajit-test-api-XXXXXX");
    if (!mkdtemp(tmp)) {
        perror("mkdtemp");
        return 1;
    }
    test_options_and_environment();
    test_cache_modes();
    test_variants();
    test_attn_validation();
    test_decode_tiles();
    char cmd[300];
    snprintf(cmd, sizeof cmd, "rm -rf %s", tmp);
    if (system(cmd) != 0)
        printf("could not remove %s\n", tmp);
    printf("%s: %d failure(s)\n", failures ? "FAIL" : "PASS", failures);
    return failures ? 1 : 0;
}
