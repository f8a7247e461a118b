/*
 * tests/test_cache_trust.c - issue 6, scenarios 9, 11 and 12, through the
 * public API. No GPU.
 *
 *  9 read-only deployments: a read-only cache directory, a read-only data
 *    file, a read-only filesystem (the open_errno hook: EROFS), an unwritable
 *    or missing HOME: hits served, misses compiled in memory, nothing fails.
 * 11 permissions and poisoning: the directory is created 0700 and files 0600;
 *    a directory owned by another user or writable by group or others, or a
 *    data, lock or compile-lock file that is a symlink or not a regular file,
 *    is refused (one warning naming the problem, kernels compiled in memory),
 *    unless shared mode is on (option or FAJIT_CACHE_SHARED=1) - never for
 *    symlinks. Shared mode creates 0770 / 0660.
 * 12 network filesystems (the fs_type hook: NFS, CIFS, 9p): not written,
 *    a clear message, memory only.
 *
 * Permission checks need a user that permissions apply to: run as root, they
 * run in a child that drops to uid 65534.
 */
#include <errno.h>
#include <sys/wait.h>

#include "cache/hooks.h"
#include "test_cache_util.h"

#define SPEC "ref dqk=24 dtype=fp16 arch=sm_80"
#define MISS "ref dqk=16 dtype=fp16 arch=sm_80"
#define NOBODY 65534

static int exists(const char *path)
{
    struct stat st;
    return lstat(path, &st) == 0;
}

static unsigned mode_of(const char *path)
{
    struct stat st;
    return lstat(path, &st) == 0 ? (unsigned)(st.st_mode & 07777) : 0u;
}

static int compile(fajit_ctx *ctx, const char *spec, int want_cached)
{
    fajit_compile_result r;
    return ctx && fajit_compile(ctx, spec, &r) == 0 && r.cached == want_cached;
}

static int effective_mode(fajit_ctx *ctx)
{
    fajit_info in;
    return ctx && fajit_get_info(ctx, &in) == 0 ? in.cache_mode : -1;
}

/* A cache with SPEC in it, made by this process. */
static void make_cache(const char *dir)
{
    fajit_ctx *ctx = open_ctx(dir, FAJIT_CACHE_READWRITE, NULL);
    if (!compile(ctx, SPEC, 0))
        CHECK(0, "prepare %s", dir);
    fajit_destroy(ctx);
}

/* Runs fn as a user permissions apply to; returns its failures. */
static int as_user(int (*fn)(void), const char *what)
{
    fflush(stdout);
    pid_t pid = fork();
    if (pid == 0) {
        if (geteuid() == 0 && (setgid(NOBODY) != 0 || setuid(NOBODY) != 0))
            _exit(77);
        failures = 0;
        _exit(fn() ? 1 : failures ? 1 : 0);
    }
    int status;
    waitpid(pid, &status, 0);
    if (WIFEXITED(status) && WEXITSTATUS(status) == 77) {
        printf("skip %s: running as root and cannot drop to uid %d\n", what, NOBODY);
        return 0;
    }
    CHECK(WIFEXITED(status) && WEXITSTATUS(status) == 0, "%s (as uid %u)", what,
          geteuid() == 0 ? NOBODY : (unsigned)geteuid());
    return 0;
}

/* ---------------------------------------------------------------- 9: read-only deployments */

static void expect_degraded(const char *dir, int want_mode, const char *what)
{
    log_capture lc = {0};
    fajit_ctx *ctx = open_ctx(dir, FAJIT_CACHE_READWRITE, &lc);
    CHECK(ctx != NULL, "%s: the context opens", what);
    CHECK(effective_mode(ctx) == want_mode && atomic_load(&lc.warnings) == 1,
          "%s: the cache is used %s, one warning: %s", what,
          want_mode == FAJIT_CACHE_READONLY ? "read-only" : "not at all", lc.last);
    if (want_mode == FAJIT_CACHE_READONLY)
        CHECK(compile(ctx, SPEC, 1), "%s: a hit is served", what);
    CHECK(compile(ctx, MISS, 0) && compile(ctx, MISS, 0),
          "%s: a miss is compiled in memory, every time", what);
    fajit_destroy(ctx);
}

static int read_only_checks(void)
{
    expect_degraded(sub("ro-dir"), FAJIT_CACHE_READONLY, "a 0555 directory");
    CHECK(!exists(sub("ro-dir/lock.mdb")) && !exists(sub("ro-dir/compile.lock")),
          "a 0555 directory: nothing is written there");
    expect_degraded(sub("ro-file"), FAJIT_CACHE_READONLY, "a 0444 data file");

    const char *home = sub("ro-home");
    unsetenv("FAJIT_CACHE_DIR");
    unsetenv("XDG_CACHE_HOME");
    setenv("HOME", home, 1);
    log_capture lc = {0};
    fajit_ctx *ctx = open_ctx(NULL, FAJIT_CACHE_DEFAULT, &lc);
    CHECK(ctx && compile(ctx, MISS, 0) && atomic_load(&lc.warnings) == 1,
          "an unwritable HOME: the context opens and compiles in memory: %s", lc.last);
    fajit_destroy(ctx);
    setenv("HOME", "/nonexistent-fajit-home", 1);
    ctx = open_ctx(NULL, FAJIT_CACHE_DEFAULT, NULL);
    CHECK(ctx && compile(ctx, MISS, 0), "a HOME that does not exist: likewise");
    fajit_destroy(ctx);
    return 0;
}

static void test_read_only(void)
{
    const char *dir = sub("ro-dir"), *file = sub("ro-file");
    make_cache(dir);
    make_cache(file);
    remove(sub("ro-dir/lock.mdb"));
    remove(sub("ro-dir/compile.lock"));
    /* As an operator ships a cache: readable by all, writable by none. */
    chmod(sub("ro-dir/data.mdb"), 0444);
    chmod(dir, 0555);
    chmod(sub("ro-file/data.mdb"), 0444);
    chmod(sub("ro-file/lock.mdb"), 0666 & ~0022); /* lock file must stay usable */
    chmod(file, 0755);
    mkdir(sub("ro-home"), 0555);
    if (geteuid() == 0) { /* the user owns the data-file case's directory */
        if (chown(file, NOBODY, NOBODY) || chown(sub("ro-file/data.mdb"), NOBODY, NOBODY) ||
            chown(sub("ro-file/lock.mdb"), NOBODY, NOBODY))
            CHECK(0, "chown to %d", NOBODY);
        chmod(sub("ro-file/lock.mdb"), 0600);
    }
    as_user(read_only_checks, "read-only deployments");

    /* A read-only filesystem: EROFS on the read-write open (a hook). */
    make_cache(sub("rofs"));
    fajit__test_hooks.open_errno = EROFS;
    expect_degraded(sub("rofs"), FAJIT_CACHE_READONLY, "a read-only filesystem (EROFS)");
    fajit__test_hooks.open_errno = EACCES;
    expect_degraded(sub("rofs"), FAJIT_CACHE_READONLY, "EACCES on the data file");
    fajit__test_hooks.open_errno = 0;
}

/* ---------------------------------------------------------------- 11: permissions */

static fajit_ctx *open_shared(const char *dir, int shared, log_capture *lc)
{
    fajit_options o;
    fajit_ctx *ctx = NULL;
    fajit_options_init(&o);
    o.cache_dir = dir;
    o.cache_shared = shared;
    o.log_level = FAJIT_LOG_WARN;
    o.log_fn = capture_log;
    o.log_user = lc;
    if (fajit_create(&ctx, &o) != 0)
        printf("     fajit_create: %s\n", fajit_last_error());
    return ctx;
}

/* dir must be refused (warning containing why) unless shared mode is on. */
static void expect_refused(const char *dir, const char *why, const char *what, int shared_ok)
{
    log_capture lc = {0};
    fajit_ctx *ctx = open_shared(dir, 0, &lc);
    CHECK(ctx && effective_mode(ctx) == FAJIT_CACHE_OFF && atomic_load(&lc.warnings) == 1 &&
              strstr(lc.last, why),
          "%s: refused with a clear message: %s", what, lc.last);
    CHECK(compile(ctx, SPEC, 0) && compile(ctx, SPEC, 0), "%s: kernels compiled in memory", what);
    fajit_destroy(ctx);
    lc.warnings = 0;
    ctx = open_shared(dir, 1, &lc);
    if (shared_ok)
        CHECK(ctx && effective_mode(ctx) == FAJIT_CACHE_READWRITE && compile(ctx, SPEC, 1),
              "%s: accepted in shared mode (option), and hits", what);
    else
        CHECK(ctx && effective_mode(ctx) == FAJIT_CACHE_OFF && strstr(lc.last, why),
              "%s: refused even in shared mode", what);
    fajit_destroy(ctx);
    if (!shared_ok)
        return;
    setenv("FAJIT_CACHE_SHARED", "1", 1);
    ctx = open_shared(dir, -1, &lc);
    CHECK(ctx && effective_mode(ctx) == FAJIT_CACHE_READWRITE, "%s: accepted with FAJIT_CACHE_SHARED=1", what);
    fajit_destroy(ctx);
    unsetenv("FAJIT_CACHE_SHARED");
}

static void test_permissions(void)
{
    const char *dir = sub("private/cache");
    fajit_ctx *ctx = open_ctx(dir, FAJIT_CACHE_READWRITE, NULL);
    CHECK(compile(ctx, SPEC, 0), "a new cache stores a kernel");
    fajit_destroy(ctx);
    CHECK(mode_of(dir) == 0700 && mode_of(sub("private")) == 0755,
          "the cache directory is created 0700 (%o), its parents 0755 (%o)", mode_of(dir),
          mode_of(sub("private")));
    CHECK(mode_of(sub("private/cache/data.mdb")) == 0600 &&
              mode_of(sub("private/cache/lock.mdb")) == 0600 &&
              mode_of(sub("private/cache/compile.lock")) == 0600,
          "its files are created 0600 (%o %o %o)", mode_of(sub("private/cache/data.mdb")),
          mode_of(sub("private/cache/lock.mdb")), mode_of(sub("private/cache/compile.lock")));

    const char *g = sub("group-writable");
    make_cache(g);
    chmod(g, 0770);
    expect_refused(g, "writable by its group", "a group-writable directory", 1);
    const char *o = sub("other-writable");
    make_cache(o);
    chmod(o, 0757);
    expect_refused(o, "writable by others", "an other-writable directory", 1);
    const char *f = sub("group-writable-file");
    make_cache(f);
    chmod(sub("group-writable-file/data.mdb"), 0660);
    expect_refused(f, "data.mdb is writable by its group", "a group-writable data file", 1);

    if (geteuid() == 0) {
        const char *u = sub("other-owner");
        make_cache(u);
        if (chown(u, NOBODY, NOBODY) == 0)
            expect_refused(u, "owned by uid 65534", "a directory owned by another user", 1);
        const char *uf = sub("other-owner-file");
        make_cache(uf);
        if (chown(sub("other-owner-file/data.mdb"), NOBODY, NOBODY) == 0)
            expect_refused(uf, "data.mdb is owned by uid 65534", "a data file owned by another user", 1);
    } else {
        printf("skip a directory owned by another user: not root, cannot chown\n");
    }

    static const char *const files[] = {"data.mdb", "lock.mdb", "compile.lock"};
    for (int i = 0; i < 3; i++) {
        char d[300], link[400], victim[300], what[100];
        snprintf(d, sizeof d, "%s", sub("symlink"));
        snprintf(victim, sizeof victim, "%s", sub("victim"));
        make_cache(d);
        snprintf(link, sizeof link, "%s/%s", d, files[i]);
        remove(link);
        remove(victim);
        if (symlink(victim, link) != 0)
            CHECK(0, "symlink %s", link);
        snprintf(what, sizeof what, "%s as a symlink", files[i]);
        expect_refused(d, "is a symbolic link", what, 0);
        CHECK(!exists(victim), "%s: nothing was written through the link", what);
        remove_tree(d);
    }
    const char *nr = sub("not-regular");
    make_cache(nr);
    remove(sub("not-regular/compile.lock"));
    mkdir(sub("not-regular/compile.lock"), 0700);
    expect_refused(nr, "not a regular file", "compile.lock as a directory", 0);

    const char *sh = sub("shared/cache");
    ctx = open_shared(sh, 1, &(log_capture){0});
    CHECK(compile(ctx, SPEC, 0), "shared mode stores a kernel");
    fajit_destroy(ctx);
    CHECK(mode_of(sh) == 0770 && mode_of(sub("shared/cache/data.mdb")) == 0660,
          "shared mode creates 0770 (%o) and 0660 (%o)", mode_of(sh),
          mode_of(sub("shared/cache/data.mdb")));
}

/* ---------------------------------------------------------------- 12: network filesystems */

static void test_network_fs(void)
{
    static const struct { long magic; const char *name; } fs[] = {
        {0x6969, "NFS"}, {(long)0xFF534D42, "CIFS"}, {0x01021997, "9p"}};
    for (int i = 0; i < 3; i++) {
        char dir[300], data[340];
        snprintf(dir, sizeof dir, "%s/net-%s", root, fs[i].name);
        snprintf(data, sizeof data, "%s/data.mdb", dir);
        fajit__test_hooks.fs_type = fs[i].magic;
        for (int mode = FAJIT_CACHE_READWRITE; mode <= FAJIT_CACHE_READONLY; mode++) {
            log_capture lc = {0};
            fajit_ctx *ctx = open_ctx(dir, mode, &lc);
            CHECK(ctx && effective_mode(ctx) == FAJIT_CACHE_OFF && strstr(lc.last, fs[i].name) &&
                      strstr(lc.last, "network filesystem"),
                  "%s, %s: not used, clear message: %s", fs[i].name, mode ? "read-only" : "read-write",
                  lc.last);
            CHECK(compile(ctx, SPEC, 0) && compile(ctx, SPEC, 0), "%s: compiled in memory", fs[i].name);
            fajit_destroy(ctx);
        }
        CHECK(!exists(data), "%s: nothing was written there", fs[i].name);
    }
    fajit__test_hooks.fs_type = 0x58465342; /* XFS: local */
    fajit_ctx *ctx = open_ctx(sub("local"), FAJIT_CACHE_READWRITE, NULL);
    CHECK(ctx && effective_mode(ctx) == FAJIT_CACHE_READWRITE && compile(ctx, SPEC, 0) &&
              compile(ctx, SPEC, 1),
          "a local filesystem type is used");
    fajit_destroy(ctx);
    fajit__test_hooks.fs_type = 0;
}

int main(void)
{
    make_root("trust");
    chmod(root, 0755); /* uid 65534 must reach the directories inside */
    unsetenv("FAJIT_CACHE_SHARED");
    test_permissions();
    test_network_fs();
    test_read_only();
    return finish();
}
