/*
 * tests/test_cache_fork.c - issue 6, scenario 6, through the public API: two
 * contexts on one path in one process (they share one LMDB environment; a
 * read-only one may join a read-write one), and fork()ed workers that use the
 * parent's context (the child reopens the environment), open contexts of
 * their own, fork again, and destroy the inherited context, without
 * disturbing the parent. No GPU.
 */
#include <dirent.h>
#include <limits.h>
#include <sys/wait.h>

#include "test_cache_util.h"

#define A "ref dqk=32 dtype=bf16 arch=sm_80"
#define B "ref dqk=40 dtype=bf16 arch=sm_80"
#define C "ref dqk=48 dtype=bf16 arch=sm_80"
#define WORKERS 4

static const char *const worker_specs[WORKERS] = {
    "ref dqk=56 dtype=bf16 arch=sm_80", "ref dqk=64 dtype=bf16 arch=sm_80",
    "ref dqk=72 dtype=bf16 arch=sm_80", "ref dqk=80 dtype=bf16 arch=sm_80"};

static int compiled(fajit_ctx *ctx, const char *spec, int want_cached)
{
    fajit_compile_result r;
    return ctx && fajit_compile(ctx, spec, &r) == 0 && r.cached == want_cached;
}

/* Descriptors this process has open on dir/data.mdb: LMDB opens the file a
 * fixed number of times per environment, so a second environment on the path
 * (the LMDB misuse that drops a process's locks when one of them closes)
 * shows as more. */
static int data_fds(const char *dir)
{
    char want[PATH_MAX], path[PATH_MAX], got[PATH_MAX];
    int n = 0;
    DIR *d = opendir("/proc/self/fd");
    if (!d || !realpath(dir, want)) {
        if (d)
            closedir(d);
        return -1;
    }
    strncat(want, "/data.mdb", sizeof want - strlen(want) - 1);
    for (struct dirent *e; (e = readdir(d));) {
        snprintf(path, sizeof path, "/proc/self/fd/%s", e->d_name);
        ssize_t len = readlink(path, got, sizeof got - 1);
        if (len > 0) {
            got[len] = '\0';
            n += strcmp(got, want) == 0;
        }
    }
    closedir(d);
    return n;
}

/* A worker: uses the inherited context, a context of its own, a grandchild. */
static int worker(fajit_ctx *inherited, const char *dir, int i)
{
    if (!compiled(inherited, A, 1) || !compiled(inherited, worker_specs[i], 0))
        return 1;
    fajit_ctx *own = open_ctx(dir, FAJIT_CACHE_READWRITE, NULL);
    if (!compiled(own, worker_specs[i], 1) || !compiled(own, B, 1))
        return 2;
    pid_t pid = fork();
    if (pid == 0) {
        int ok = compiled(inherited, worker_specs[i], 1) && compiled(own, A, 1);
        fajit_destroy(own); /* both inherited: destroying them must leave the parents' alone */
        fajit_destroy(inherited);
        _exit(ok ? 0 : 3);
    }
    int status;
    waitpid(pid, &status, 0);
    fajit_destroy(own);
    fajit_destroy(inherited); /* the parent's: must not close the parent's environment */
    return WIFEXITED(status) && WEXITSTATUS(status) == 0 ? 0 : 4;
}

int main(void)
{
    make_root("fork");
    const char *dir = sub("cache");
    fajit_ctx *one = open_ctx(dir, FAJIT_CACHE_READWRITE, NULL);
    CHECK(compiled(one, A, 0), "the first context compiles A");
    int fds_one = data_fds(dir);
    fajit_ctx *two = open_ctx(dir, FAJIT_CACHE_READWRITE, NULL);
    CHECK(compiled(two, A, 1) && compiled(two, B, 0), "a second context on the path hits A, stores B");
    CHECK(compiled(one, B, 1), "the first sees B");
    fajit_ctx *ro = open_ctx(dir, FAJIT_CACHE_READONLY, NULL);
    CHECK(compiled(ro, B, 1), "a read-only context on the same path hits B");
    int fds_three = data_fds(dir);
    CHECK(fds_one > 0 && fds_three == fds_one,
          "one LMDB environment for the three contexts: data.mdb open %d time(s) with one "
          "context, %d with three", fds_one, fds_three);
    fajit_destroy(two);
    fajit_destroy(ro);
    CHECK(compiled(one, A, 1) && compiled(one, C, 0) && compiled(one, C, 1),
          "after both are destroyed the first still hits and stores");

    pid_t pids[WORKERS];
    for (int i = 0; i < WORKERS; i++)
        if ((pids[i] = fork()) == 0)
            _exit(worker(one, dir, i));
    int ok = 0;
    for (int i = 0; i < WORKERS; i++) {
        int status;
        waitpid(pids[i], &status, 0);
        if (WIFEXITED(status) && WEXITSTATUS(status) == 0)
            ok++;
        else
            printf("     worker %d: status %d signal %d\n", i,
                   WIFEXITED(status) ? WEXITSTATUS(status) : -1,
                   WIFSIGNALED(status) ? WTERMSIG(status) : 0);
    }
    CHECK(ok == WORKERS, "%d forked workers used the inherited context, their own, a grandchild", ok);
    int all = 1;
    for (int i = 0; i < WORKERS; i++)
        all &= compiled(one, worker_specs[i], 1);
    CHECK(all && compiled(one, A, 1), "the parent's context still works and sees the workers' kernels");
    fajit_cache_stats st = stats_of(one);
    CHECK(st.entries == 3 + WORKERS, "the store holds %llu entries", (unsigned long long)st.entries);
    CHECK(verify_bad(one, NULL) == 0, "and verifies clean");
    fajit_destroy(one);
    return finish();
}
