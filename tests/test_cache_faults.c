/*
 * tests/test_cache_faults.c - issue 6, scenario 8: fault injection through
 * the test hooks (cache/hooks.h). A store whose writes fail with ENOSPC or
 * EIO still returns the kernel (compiled in memory) with exactly one warning
 * and stays clean; the Nth hooked allocation failing, for every N along the
 * cold (compile and store) and warm (hit) paths, gives either the kernel or
 * FAJIT_ENOMEM - never a crash, a wrong result or a damaged store - and the
 * next call works. Leaks are checked when this runs under valgrind or ASan
 * (tests/valgrind.sh). EACCES and EROFS on open are in test_cache_trust. No GPU.
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

/* Fails the nth hooked allocation of one fajit_compile, for n = 1, 2, ...
 * until a call makes fewer allocations than n. */
static void alloc_loop(const char *dir, int warm)
{
    int n, bad = 0, enomem = 0;
    for (n = 1; n < 200; n++) {
        fajit_compile_result r;
        fajit_ctx *ctx = open_ctx(dir, FAJIT_CACHE_READWRITE, NULL);
        if (!ctx) {
            bad++;
            break;
        }
        if (warm && fajit_compile(ctx, SPEC, &r) != 0)
            bad++;
        fajit__hooks_fail_alloc_at(n);
        int rc = fajit_compile(ctx, SPEC, &r);
        long made = atomic_load(&fajit__test_hooks.alloc_count);
        fajit__hooks_fail_alloc_at(0);
        enomem += rc == FAJIT_ENOMEM;
        if (rc != 0 && rc != FAJIT_ENOMEM) {
            printf("     allocation %d failed: status %d: %s\n", n, rc, fajit_last_error());
            bad++;
        }
        if (fajit_compile(ctx, SPEC, &r) != 0 || verify_bad(ctx, NULL) != 0)
            bad++;
        if (!warm)
            fajit_cache_remove(ctx, NULL);
        fajit_destroy(ctx);
        if (made < n)
            break;
    }
    CHECK(bad == 0 && n > 2,
          "%s path: each of its %d hooked allocations failed in turn: %d gave FAJIT_ENOMEM, "
          "the others the kernel; the next call works, the store stays clean",
          warm ? "warm" : "cold", n - 1, enomem);
}

int main(void)
{
    make_root("faults");
    const char *dir = sub("cache");
    test_write_errors(dir);
    alloc_loop(dir, 0);
    alloc_loop(dir, 1);
    return finish();
}
