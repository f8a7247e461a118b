/*
 * tests/test_cache_readers.c - issue 6, scenario 5: readers killed inside a
 * read transaction (more of them than LMDB's 126 reader slots) and hundreds
 * of short-lived threads doing gets: no MDB_READERS_FULL, stale reader slots
 * are cleared when a context opens, every get succeeds, the store stays
 * small. No GPU.
 */
#include <pthread.h>
#include <signal.h>
#include <sys/wait.h>
#include <time.h>

#include "test_cache_util.h"

#define SPEC "ref dqk=32 dtype=fp16 mask=none arch=sm_80"
#define RAW_READERS 120  /* almost all of LMDB's default 126 reader slots */
#define API_READERS 200
#define THREADS 600

static int cleared_slots; /* from the INFO log line "cleared N stale reader slot(s)" */

static void info_log(void *user, int level, const char *msg)
{
    (void)user, (void)level;
    const char *p = strstr(msg, "cleared ");
    if (p)
        cleared_slots += atoi(p + 8);
}

static fajit_ctx *open_info_ctx(const char *dir)
{
    fajit_options o;
    fajit_ctx *ctx = NULL;
    fajit_options_init(&o);
    o.cache_dir = dir;
    o.log_level = FAJIT_LOG_INFO;
    o.log_fn = info_log;
    if (fajit_create(&ctx, &o) != 0)
        printf("     fajit_create: %s\n", fajit_last_error());
    return ctx;
}

/* A reader that opens LMDB itself, begins a read transaction, says so, and
 * waits to be killed with the transaction open. */
static void raw_reader(const char *dir, int ready_fd)
{
    MDB_env *env;
    MDB_dbi dbi;
    MDB_txn *txn;
    if (raw_open(dir, &env, &dbi) != 0 || mdb_txn_begin(env, NULL, MDB_RDONLY, &txn) != 0)
        _exit(3);
    if (write(ready_fd, "r", 1) != 1)
        _exit(4);
    pause();
    _exit(0);
}

static int kill_raw_readers(const char *dir)
{
    int ready[2], readied = 0;
    pid_t pids[RAW_READERS];
    if (pipe(ready) != 0)
        return 0;
    for (int i = 0; i < RAW_READERS; i++) {
        if ((pids[i] = fork()) == 0)
            raw_reader(dir, ready[1]);
        char c;
        if (read(ready[0], &c, 1) == 1) /* its transaction is open */
            readied++;
        kill(pids[i], SIGKILL);
        waitpid(pids[i], NULL, 0);
    }
    close(ready[0]);
    close(ready[1]);
    return readied;
}

/* Children that loop on hits through the API, killed at random moments;
 * any failed call is reported on err_fd. */
static int kill_api_readers(const char *dir, int *errors)
{
    int err[2], killed = 0;
    char buf[256];
    if (pipe(err) != 0)
        return 0;
    for (int i = 0; i < API_READERS; i += 8) {
        pid_t pids[8];
        for (int j = 0; j < 8; j++) {
            if ((pids[j] = fork()) == 0) {
                fajit_ctx *ctx = open_ctx(dir, FAJIT_CACHE_READWRITE, NULL);
                fajit_compile_result r;
                for (;;)
                    if (!ctx || fajit_compile(ctx, SPEC, &r) != 0 || !r.cached) {
                        dprintf(err[1], "E %s\n", ctx ? fajit_last_error() : "create");
                        _exit(1);
                    }
            }
        }
        struct timespec ts = {0, 1000L * (1000 + rand() % 20000)};
        nanosleep(&ts, NULL);
        for (int j = 0; j < 8; j++) {
            int status;
            kill(pids[j], SIGKILL);
            waitpid(pids[j], &status, 0);
            killed += WIFSIGNALED(status);
        }
    }
    close(err[1]);
    ssize_t n = read(err[0], buf, sizeof buf - 1);
    *errors = n > 0;
    if (n > 0) {
        buf[n] = '\0';
        printf("     first error: %s", buf);
    }
    close(err[0]);
    return killed;
}

static fajit_ctx *shared_ctx;
static _Atomic int thread_failures;

static void *churn(void *arg)
{
    (void)arg;
    fajit_compile_result r;
    for (int i = 0; i < 3; i++)
        if (fajit_compile(shared_ctx, SPEC, &r) != 0 || !r.cached)
            atomic_fetch_add(&thread_failures, 1);
    return NULL;
}

static int thread_churn(void)
{
    int started = 0;
    for (int i = 0; i < THREADS; i += 50) {
        pthread_t t[50];
        int n = 0;
        for (int j = 0; j < 50; j++)
            n += pthread_create(&t[n], NULL, churn, NULL) == 0;
        for (int j = 0; j < n; j++)
            pthread_join(t[j], NULL);
        started += n;
    }
    return started;
}

/* Stale slots a context opened in a fresh process clears (-1 on error). */
static int cleared_by_new_process(const char *dir)
{
    int fds[2], n = -1;
    if (pipe(fds) != 0)
        return -1;
    pid_t pid = fork();
    if (pid == 0) {
        cleared_slots = 0;
        fajit_ctx *ctx = open_info_ctx(dir);
        fajit_compile_result r;
        int ok = ctx && fajit_compile(ctx, SPEC, &r) == 0 && r.cached;
        dprintf(fds[1], "%d", ok ? cleared_slots : -1);
        fajit_destroy(ctx);
        _exit(0);
    }
    close(fds[1]);
    char buf[32] = "";
    if (read(fds[0], buf, sizeof buf - 1) > 0)
        n = atoi(buf);
    close(fds[0]);
    waitpid(pid, NULL, 0);
    return n;
}

int main(void)
{
    fajit_compile_result r;
    struct stat st;
    int errors = 0;
    make_root("readers");
    const char *dir = sub("cache");
    srand((unsigned)time(NULL));

    fajit_ctx *ctx = open_ctx(dir, FAJIT_CACHE_READWRITE, NULL);
    CHECK(ctx && fajit_compile(ctx, SPEC, &r) == 0, "the kernel is compiled and stored");
    fajit_destroy(ctx);

    /* This process holds the environment open throughout, so that LMDB does
     * not reset the reader table when a new process opens it alone. */
    shared_ctx = open_info_ctx(dir);
    int n = kill_raw_readers(dir);
    CHECK(n == RAW_READERS, "%d readers killed inside a read transaction", n);
    CHECK(shared_ctx && fajit_compile(shared_ctx, SPEC, &r) == 0 && r.cached,
          "a get in a process that was already open still works");
    n = cleared_by_new_process(dir);
    CHECK(n >= RAW_READERS - 5, "a context opened in a new process cleared %d stale reader slots", n);
    n = cleared_by_new_process(dir);
    CHECK(n == 0, "the next one finds none to clear (%d)", n);

    n = kill_api_readers(dir, &errors);
    CHECK(n == API_READERS && !errors,
          "%d API readers killed at random moments (more than the reader slots), none saw an "
          "error", n);
    n = cleared_by_new_process(dir);
    CHECK(n >= 0 && n <= 8, "only the last batch's slots were left stale (%d)", n);
    if (shared_ctx) {
        n = thread_churn();
        CHECK(n == THREADS && atomic_load(&thread_failures) == 0,
              "%d short-lived threads did 3 gets each: %d failed", n,
              atomic_load(&thread_failures));
    }
    n = cleared_by_new_process(dir);
    CHECK(n == 0, "threads leave no stale slot (%d)", n);
    fajit_destroy(shared_ctx);
    CHECK(stat(sub("cache/data.mdb"), &st) == 0 && st.st_size < (4 << 20),
          "the store stays small (%lld bytes)", (long long)st.st_size);
    return finish();
}
