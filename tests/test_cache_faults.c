/*
 * tests/test_cache_faults.c - issue 6, scenario 8: fault injection through
 * the test hooks (cache/hooks.h). A store whose writes fail with ENOSPC or
 * EIO still returns the kernel (compiled in memory) with exactly one warning
 * and stays clean. The Nth hooked allocation of one fajit_compile fails, for
 * every N along four paths (cold; cold with a size cap, whose puts allocate
 * an eviction list; warm; warm read-only): the call returns the kernel with
 * exactly one warning, or FAJIT_ENOMEM naming the one allocation it cannot
 * do without (the cubin's, see `essential`) and no warning - never a crash or a
 * damaged store; the next call works and the store verifies clean. Leaks are
 * checked when this runs under valgrind or ASan (tests/valgrind.sh). EACCES
 * and EROFS on open are in test_cache_trust. No GPU.
 */
#include <errno.h>

#include "cache/hooks.h"
#include "test_cache_util.h"

#define SPEC "ref dqk=56 dtype=bf16 mask=causal arch=sm_80"

static void test_write_errors(const char *dir)
{
    static const struct { int err; const char *name; } errs[] = {{ENOSPC, "ENOSPC"}, {EIO, "EIO"}};
    for (int i = 0; i < 2; i++) {
        log_capture lc = {0};
        fajit_compile_result r;
        fajit_ctx *ctx = open_ctx(dir, FAJIT_CACHE_READWRITE, &lc);
        fajit__test_hooks.put_errno = errs[i].err;
        int rc = ctx ? fajit_compile(ctx, SPEC, &r) : -1;
        fajit__test_hooks.put_errno = 0;
        CHECK(rc == 0 && !r.cached && r.cubin_bytes > 0,
              "%s on put: the kernel is still returned", errs[i].name);
        CHECK(atomic_load(&lc.warnings) == 1 && strstr(lc.last, "kept in memory"),
              "%s: one warning: %s", errs[i].name, lc.last);
        CHECK(ctx && stats_of(ctx).entries == 0 && verify_bad(ctx, NULL) == 0,
              "%s: nothing stored, the store verifies clean", errs[i].name);
        fajit_destroy(ctx);
    }
    fajit_ctx *ctx = open_ctx(dir, FAJIT_CACHE_READWRITE, NULL);
    fajit_compile_result r;
    CHECK(ctx && fajit_compile(ctx, SPEC, &r) == 0 && !r.cached && fajit_compile(ctx, SPEC, &r) == 0 &&
              r.cached,
          "once the disk recovers, the kernel is stored and hits");
    fajit_cache_remove(ctx, NULL);
    fajit_destroy(ctx);
}

/* The one allocation a call cannot do without, failing with FAJIT_ENOMEM and
 * this text in its detail: the cubin's buffer (runtime/compile.c), which holds
 * the kernel itself. The full key is made on the stack, and a compile whose
 * NVRTC log (its ptxas report) could not be copied gives the kernel, kept in
 * memory. Every other hooked allocation (the copy of a stored entry, the
 * store's eviction list...) is a cache step that may fail: the kernel is then
 * compiled or kept in memory with one warning. Allocations outside the hook
 * (codegen's source buffer, NVRTC's and LMDB's own) are not injected. */
static const char *const essential[] = {"cubin of"};

static int is_essential(const char *detail)
{
    for (size_t i = 0; i < sizeof essential / sizeof *essential; i++)
        if (strstr(detail, essential[i]))
            return 1;
    return 0;
}

enum path { COLD, COLD_CAPPED, WARM, WARM_READONLY };
static const char *const path_names[] = {"cold", "cold, size cap", "warm", "warm, read-only"};

static fajit_ctx *open_path_ctx(const char *dir, enum path p, log_capture *lc)
{
    fajit_options o;
    fajit_ctx *ctx = NULL;
    fajit_options_init(&o);
    o.cache_dir = dir;
    o.cache_mode = p == WARM_READONLY ? FAJIT_CACHE_READONLY : FAJIT_CACHE_READWRITE;
    o.cache_max_bytes = p == COLD_CAPPED ? (uint64_t)1 << 30 : 0; /* puts then evict */
    o.log_level = FAJIT_LOG_WARN;
    o.log_fn = capture_log;
    o.log_user = lc;
    if (fajit_create(&ctx, &o) != 0)
        printf("     fajit_create(%s): %s\n", dir, fajit_last_error());
    return ctx;
}

/* One fajit_compile with its nth hooked allocation failing; 0 if it gave
 * what it must: the kernel with one warning, or FAJIT_ENOMEM naming an
 * allocation it cannot do without and no warning; the kernel and no warning
 * when it made fewer than n allocations (*done then). */
static int fail_nth(fajit_ctx *ctx, log_capture *lc, enum path p, int n, int *enomem, int *done)
{
    fajit_compile_result r;
    atomic_store(&lc->warnings, 0);
    fajit__hooks_fail_alloc_at(n);
    int rc = fajit_compile(ctx, SPEC, &r);
    long made = atomic_load(&fajit__test_hooks.alloc_count);
    fajit__hooks_fail_alloc_at(0);
    int warnings = atomic_load(&lc->warnings);
    *done = made < n;
    if (*done) {
        printf("     %s, allocation %d: none (the call makes %ld): status %d, %d warning(s)\n",
               path_names[p], n, made, rc, warnings);
        return rc != 0 || warnings != 0;
    }
    if (rc == 0) {
        printf("     %s, allocation %d: kernel returned (%s), %d warning(s): %s\n",
               path_names[p], n, r.cached ? "stored" : "compiled", warnings, lc->last);
        return warnings != 1 || r.cubin_bytes <= 0;
    }
    printf("     %s, allocation %d: status %d, %d warning(s): %s\n", path_names[p], n, rc,
           warnings, fajit_last_error());
    ++*enomem;
    return rc != FAJIT_ENOMEM || warnings != 0 || !is_essential(fajit_last_error());
}

/* Fails the nth hooked allocation of one fajit_compile, for n = 1, 2, ...
 * until a call makes fewer allocations than n; after each, the next call
 * works, the store verifies clean and, on the cold paths, holds the entry. */
static void alloc_loop(const char *dir, enum path p)
{
    int n, bad = 0, enomem = 0, done = 0;
    for (n = 1; n < 200 && !done; n++) {
        fajit_compile_result r;
        log_capture lc = {0};
        fajit_ctx *ctx = open_path_ctx(dir, p, &lc);
        if (!ctx || fail_nth(ctx, &lc, p, n, &enomem, &done) != 0)
            bad++;
        if (ctx && (fajit_compile(ctx, SPEC, &r) != 0 || verify_bad(ctx, NULL) != 0 ||
                    (p != WARM_READONLY && stats_of(ctx).entries != 1))) {
            printf("     %s, allocation %d: the next call or the store is wrong: %s\n",
                   path_names[p], n, fajit_last_error());
            bad++;
        }
        if (p == COLD || p == COLD_CAPPED)
            fajit_cache_remove(ctx, NULL);
        fajit_destroy(ctx);
    }
    n--; /* the call made n - 1 */
    /* Only a compile allocates the cubin's buffer: at most once on a cold
     * path, never on a warm one. */
    int max_enomem = p == COLD || p == COLD_CAPPED ? 1 : 0;
    CHECK(bad == 0 && n > 1 && enomem <= max_enomem,
          "%s path: each of its %d hooked allocations failed in turn: %d gave FAJIT_ENOMEM "
          "(the cubin's buffer, named; at most %d), the others the kernel with exactly "
          "one warning; the next call works, the store verifies clean",
          path_names[p], n - 1, enomem, max_enomem);
}

/* A store holding SPEC's entry, for the warm paths. */
static void fill(const char *dir)
{
    fajit_compile_result r;
    fajit_ctx *ctx = open_ctx(dir, FAJIT_CACHE_READWRITE, NULL);
    CHECK(ctx && fajit_compile(ctx, SPEC, &r) == 0 && stats_of(ctx).entries == 1,
          "the warm paths' store holds the kernel");
    fajit_destroy(ctx);
}

int main(void)
{
    make_root("faults");
    const char *dir = sub("cache");
    test_write_errors(dir);
    alloc_loop(dir, COLD);
    alloc_loop(dir, COLD_CAPPED);
    fill(dir);
    alloc_loop(dir, WARM);
    alloc_loop(dir, WARM_READONLY);
    return finish();
}
