/*
 * tests/test_cache_key.c - issue 6, scenario 10: key completeness. A
 * different NVRTC version, compile options, template and codegen bytes or
 * format version (each through a test hook on the build identity), arch or
 * variant field is a different key and a miss; PATH, the working directory
 * and a symlinked CUDA home do not change the key and still hit. A cubin's
 * arch is checked before loading and a load failure evicts and recompiles
 * (checked with a fake driver table, so no GPU is needed).
 */
#include <cuda.h>

#include "cache/hooks.h"
#include "runtime/runtime.h"
#include "test_cache_util.h"

#define SPEC "ref dqk=64 dtype=fp16 mask=causal arch=sm_80"

static int compile_key(const char *dir, const char *spec, char key[33], int *cached)
{
    fajit_compile_result r;
    fajit_ctx *ctx = open_ctx(dir, FAJIT_CACHE_READWRITE, NULL);
    int rc = ctx ? fajit_compile(ctx, spec, &r) : -1;
    fajit_destroy(ctx);
    if (rc == 0) {
        memcpy(key, r.key_hex, 33);
        *cached = r.cached;
    }
    return rc;
}

static void expect_same(const char *dir, const char *key0, const char *what)
{
    char key[33] = "";
    int cached = 0;
    int rc = compile_key(dir, SPEC, key, &cached);
    CHECK(rc == 0 && strcmp(key, key0) == 0 && cached, "%s: same key, a hit", what);
}

static void expect_other(const char *dir, const char *spec, const char *key0, const char *what)
{
    char key[33] = "";
    int cached = 1;
    int rc = compile_key(dir, spec, key, &cached);
    CHECK(rc == 0 && strcmp(key, key0) != 0 && !cached, "%s: another key (%.12s), a miss", what, key);
}

static void test_key_inputs(const char *dir, const char *key0)
{
    char cwd[4096], link[300];
    uint8_t codegen[16];

    setenv("PATH", "/nonexistent/bin:/usr/bin:/bin", 1);
    expect_same(dir, key0, "another PATH");
    if (getcwd(cwd, sizeof cwd) && chdir("/") == 0) {
        expect_same(dir, key0, "another working directory");
        if (chdir(cwd) != 0)
            CHECK(0, "chdir back");
    }
    snprintf(link, sizeof link, "%s/cuda-link", root);
    if (symlink("/usr/local/cuda", link) == 0) {
        setenv("CUDA_HOME", link, 1);
        setenv("CUDA_PATH", link, 1);
        expect_same(dir, key0, "CUDA_HOME and CUDA_PATH through a symlink");
        unsetenv("CUDA_HOME");
        unsetenv("CUDA_PATH");
    }

    fajit__test_hooks.nvrtc_version = fajit__nvrtc_version() + 10;
    expect_other(dir, SPEC, key0, "another NVRTC version");
    fajit__test_hooks.nvrtc_version = 0;
    fajit__test_hooks.options_text = "-std=c++17 --ptxas-options=-v --no-cache -lineinfo";
    expect_other(dir, SPEC, key0, "other compile options");
    fajit__test_hooks.options_text = NULL;
    memcpy(codegen, fajit__codegen_digest(), 16);
    codegen[5] ^= 1;
    fajit__test_hooks.codegen_digest = codegen;
    expect_other(dir, SPEC, key0, "another template or codegen byte (codegen digest)");
    fajit__test_hooks.codegen_digest = NULL;
    fajit__test_hooks.format_version = FAJIT__ENTRY_FORMAT_VERSION + 1;
    expect_other(dir, SPEC, key0, "another cache format version");
    fajit__test_hooks.format_version = 0;
    expect_other(dir, "ref dqk=64 dtype=fp16 mask=causal arch=sm_90", key0, "another arch");
    expect_other(dir, "ref dqk=64 dtype=fp16 mask=causal arch=sm_90a", key0, "an arch suffix");
    expect_other(dir, "ref dqk=64 dtype=fp16 mask=causal-tl arch=sm_80", key0, "another mask");
    expect_same(dir, key0, "with every hook off again");
}

/* ---------------------------------------------------------------- a fake driver */

static int loads, fail_loads, unexpected_images;
static char load_error[512];
static const uint8_t *expect_image; /* non-NULL: every image loaded must be this cubin */
static size_t expect_len;

static CUresult fake_load(CUmodule *m, const void *image)
{
    if (expect_image && memcmp(image, expect_image, expect_len) != 0)
        unexpected_images++;
    loads++;
    if (fail_loads > 0) {
        fail_loads--;
        return CUDA_ERROR_INVALID_IMAGE;
    }
    *m = (CUmodule)(uintptr_t)0x1000;
    return CUDA_SUCCESS;
}

static CUresult fake_get_function(CUfunction *f, CUmodule m, const char *name)
{
    (void)m, (void)name;
    *f = (CUfunction)(uintptr_t)0x2000;
    return CUDA_SUCCESS;
}

static CUresult fake_ok_fn(CUfunction f, CUfunction_attribute a, int v)
{
    (void)f, (void)a, (void)v;
    return CUDA_SUCCESS;
}

static CUresult fake_unload(CUmodule m)
{
    (void)m;
    return CUDA_SUCCESS;
}

static int load_once(const char *dir, const fajit__variant *v, unsigned long long cu_ctx,
                     fajit_cache_stats *st)
{
    fajit__driver drv;
    memset(&drv, 0, sizeof drv);
    drv.moduleLoadData = fake_load;
    drv.moduleGetFunction = fake_get_function;
    drv.moduleUnload = fake_unload;
    drv.funcSetAttribute = fake_ok_fn;
    CUfunction fn = NULL;
    fajit_ctx *ctx = open_ctx(dir, FAJIT_CACHE_READWRITE, NULL);
    int rc = ctx ? fajit__kernel_function(ctx, &drv, v, cu_ctx, &fn) : -1;
    snprintf(load_error, sizeof load_error, "%s", fajit_last_error());
    if (ctx)
        *st = stats_of(ctx);
    fajit_destroy(ctx);
    return rc == 0 && fn != NULL ? 0 : -1;
}

/* Stores, under v's key, v's entry with its metadata claiming another arch. */
static int plant_wrong_arch(const char *dir, const char *key_hex)
{
    uint8_t key[16], *entry, *bad = NULL;
    size_t len = 0, bad_len = 0;
    fajit__entry_view view;
    hex_to_key(key_hex, key);
    entry = raw_get(dir, key, &len);
    int rc = !entry || fajit__entry_decode(entry, len, &view, NULL) != 0;
    if (rc == 0) {
        view.meta.arch = 90;
        rc = fajit__entry_encode(&view.meta, view.full_key, view.full_key_len, view.cubin,
                                 view.cubin_len, &bad, &bad_len) ||
             raw_put(dir, key, bad, bad_len);
    }
    free(entry);
    free(bad);
    return rc;
}

/* Flips a byte in the middle of the cubin stored under key_hex (its checksum
 * then fails); returns a copy of the intact cubin. */
static uint8_t *plant_flipped_cubin(const char *dir, const char *key_hex, size_t *cubin_len)
{
    uint8_t key[16], *entry, *good = NULL;
    size_t len = 0;
    fajit__entry_view view;
    hex_to_key(key_hex, key);
    entry = raw_get(dir, key, &len);
    if (entry && fajit__entry_decode(entry, len, &view, NULL) == 0 &&
        (good = malloc(view.cubin_len))) {
        memcpy(good, view.cubin, view.cubin_len);
        *cubin_len = view.cubin_len;
        entry[(size_t)(view.cubin - entry) + view.cubin_len / 2] ^= 0x10;
        if (raw_put(dir, key, entry, len) != 0) {
            free(good);
            good = NULL;
        }
    }
    free(entry);
    return good;
}

static void test_load_checks(const char *dir, const char *key0)
{
    fajit__variant v;
    fajit_cache_stats st;
    fajit_ctx *ctx = open_ctx(dir, FAJIT_CACHE_OFF, NULL);
    int rc = fajit__spec_parse(SPEC, &v);
    if (rc == 0)
        rc = fajit__complete_spec(ctx, &v);
    fajit_destroy(ctx);
    if (rc) {
        CHECK(0, "complete " SPEC);
        return;
    }
    loads = 0;
    CHECK(load_once(dir, &v, 1, &st) == 0 && loads == 1, "a good stored cubin loads once");
    uint64_t bad0 = st.bad_entries, compiles0 = st.compiles;

    fail_loads = 1;
    loads = 0;
    CHECK(load_once(dir, &v, 2, &st) == 0 && loads == 2, "a stored cubin the driver refuses: "
          "evicted, compiled again, the new one loads (%d loads)", loads);
    CHECK(st.bad_entries == bad0 + 1 && st.compiles == compiles0 + 1,
          "...counted as bad and rewritten");
    loads = 0;
    CHECK(load_once(dir, &v, 3, &st) == 0 && loads == 1 && st.compiles == compiles0 + 1,
          "...and a later load takes the stored one");

    CHECK(plant_wrong_arch(dir, key0) == 0, "an entry claiming sm_90 planted under the sm_80 key");
    loads = 0;
    CHECK(load_once(dir, &v, 4, &st) == 0 && loads == 1,
          "its arch is checked before loading: it never reaches the driver, the recompiled "
          "cubin does (%d load)", loads);
    fajit_entry_info e;
    ctx = open_ctx(dir, FAJIT_CACHE_READWRITE, NULL);
    CHECK(st.bad_entries == bad0 + 2 && ctx && fajit_cache_find(ctx, key0, &e) == 0 && e.valid &&
              strcmp(e.arch, "sm_80") == 0,
          "...counted as bad, and replaced by an sm_80 entry (%s)", e.arch);
    fajit_destroy(ctx);

    size_t good_len = 0;
    uint8_t *good = plant_flipped_cubin(dir, key0, &good_len);
    expect_image = good;
    expect_len = good_len;
    loads = unexpected_images = 0;
    CHECK(good && load_once(dir, &v, 6, &st) == 0 && loads == 1 && unexpected_images == 0 &&
              st.bad_entries == bad0 + 3,
          "a stored cubin with a flipped byte never reaches the driver: its one load gets the "
          "recompiled, intact cubin; counted as bad");
    expect_image = NULL;
    free(good);
    fail_loads = 5;
    loads = 0;
    CHECK(load_once(dir, &v, 5, &st) != 0 && loads == 2,
          "a cubin that never loads: one recompile, then the error (%d loads): %s", loads,
          load_error);
    fail_loads = 0;
}

int main(void)
{
    char key0[33] = "";
    int cached = 1;
    make_root("key");
    const char *dir = sub("cache");
    CHECK(compile_key(dir, SPEC, key0, &cached) == 0 && !cached, "compiled: key %.12s", key0);
    test_key_inputs(dir, key0);
    test_load_checks(dir, key0);
    return finish();
}
