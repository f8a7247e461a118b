/*
 * tests/test_stampede.c - many processes (and threads) asking for the same
 * missing key at once compile it exactly once: the others wait on the key lock
 * (fajit__store_lock_key), get again, and read the one compiled entry.
 *
 * Each "compile" sleeps 50 ms, appends a line to a per-key counter file
 * (O_APPEND) and stores an entry whose cubin names the compiler, so a second
 * compile would show both in the counter file and in differing bytes.
 */
#include <errno.h>
#include <fcntl.h>
#include <ftw.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "cache/store.h"

#define CONTENDERS 8
#define MAX_KEYS 3

static int failures;

#define CHECK(cond, ...)                          \
    do {                                          \
        if (cond) {                               \
            printf("ok   ");                      \
        } else {                                  \
            printf("FAIL ");                      \
            failures++;                           \
        }                                         \
        printf(__VA_ARGS__);                      \
        printf("  [%s:%d]\n", __FILE__, __LINE__); \
        fflush(stdout);                           \
    } while (0)

static char root[64];

static int rm_one(const char *path, const struct stat *st, int flag, struct FTW *ftw)
{
    (void)st, (void)flag, (void)ftw;
    return remove(path);
}

static void path_in_root(char *buf, size_t n, const char *name)
{
    snprintf(buf, n, "%s/%s", root, name);
}

/* Each round asks for keys not asked before: key_base + 0..nkeys-1. */
static int key_base;

static void make_key(int k, uint8_t key[16], char *full_key, size_t n)
{
    k += key_base;
    for (int i = 0; i < 16; i++)
        key[i] = (uint8_t)(0xa0 + k * 17 + i);
    snprintf(full_key, n, "fwd dqk=%d dv=%d dtype=bf16 stampede", 64 * (k + 1), 64 * (k + 1));
}

/* What one contender saw. */
typedef struct outcome {
    int ok;         /* the final get hit */
    int compiled;   /* this one compiled */
    int first_miss; /* its first get missed */
    uint8_t *bytes;
    size_t len;
    char err[256];
} outcome;

static void sleep_ms(int ms)
{
    struct timespec ts = {ms / 1000, (long)(ms % 1000) * 1000000L};
    while (nanosleep(&ts, &ts) != 0 && errno == EINTR) {
    }
}

/* The slow part: outside any transaction, under the key lock. */
static int fake_compile(int k, const char *counter_path, const char *full_key, uint8_t **entry,
                        size_t *len)
{
    char who[128];
    snprintf(who, sizeof who, "compiled key %d by pid %d tid %ld\n", k, (int)getpid(),
             (long)syscall(SYS_gettid));
    sleep_ms(50);
    int fd = open(counter_path, O_WRONLY | O_APPEND | O_CREAT | O_CLOEXEC, 0644);
    if (fd < 0 || write(fd, who, strlen(who)) != (ssize_t)strlen(who))
        return -1;
    close(fd);
    fajit__entry_meta meta = {90, 0, 12080, 32, 0, 0, 50000};
    return fajit__entry_encode(&meta, (const uint8_t *)full_key, strlen(full_key),
                               (const uint8_t *)who, strlen(who), entry, len);
}

/* get -> miss -> lock -> get -> compile+put if still a miss -> unlock -> get. */
static void contend(const char *cache_dir, int k, const char *counter_path, outcome *o)
{
    uint8_t key[16], *got = NULL, *entry = NULL;
    size_t got_len = 0, len = 0;
    char fk[128];
    fajit__store *s = NULL;
    fajit__keylock lk;
    memset(o, 0, sizeof *o);
    make_key(k, key, fk, sizeof fk);
    const uint8_t *fkb = (const uint8_t *)fk;
    if (fajit__store_open(cache_dir, FAJIT_CACHE_READWRITE, 0, NULL, &s) != 0)
        goto fail;
    int rc = fajit__store_get(s, key, fkb, strlen(fk), &got, &got_len);
    o->first_miss = rc == FAJIT_ENOTFOUND;
    if (rc == FAJIT_ENOTFOUND) {
        if (fajit__store_lock_key(s, key, &lk) != 0)
            goto close_store;
        rc = fajit__store_get(s, key, fkb, strlen(fk), &got, &got_len);
        if (rc == FAJIT_ENOTFOUND) {
            o->compiled = 1;
            if (fake_compile(k, counter_path, fk, &entry, &len) != 0 ||
                fajit__store_put(s, key, entry, len) != 0) {
                fajit__store_unlock_key(s, &lk);
                goto close_store;
            }
        }
        fajit__store_unlock_key(s, &lk);
        free(got);
        rc = fajit__store_get(s, key, fkb, strlen(fk), &got, &got_len);
    }
    if (rc != 0)
        goto close_store;
    if (entry && (len != got_len || memcmp(entry, got, len) != 0)) {
        snprintf(o->err, sizeof o->err, "read back differs from what it stored");
        goto close_store;
    }
    o->ok = 1;
    o->bytes = got;
    o->len = got_len;
    got = NULL;
close_store:
    fajit__store_close(s);
fail:
    if (!o->ok && !o->err[0])
        snprintf(o->err, sizeof o->err, "%s", fajit__detail());
    free(got);
    free(entry);
}

static int count_lines(const char *path)
{
    FILE *f = fopen(path, "r");
    int n = 0, c;
    if (!f)
        return 0;
    while ((c = fgetc(f)) != EOF)
        n += c == '\n';
    fclose(f);
    return n;
}

/* Checks one key's outcomes: one compile, everyone hit with the same bytes. */
static void check_key(const char *what, int k, const char *counter_path, outcome *o, int n)
{
    int ok = 0, compiled = 0, first_miss = 0, same = 1;
    for (int i = 0; i < n; i++) {
        ok += o[i].ok;
        compiled += o[i].compiled;
        first_miss += o[i].first_miss;
        if (!o[i].ok)
            printf("     contender %d of key %d: %s\n", i, k, o[i].err);
        else if (!o[0].ok || o[i].len != o[0].len || memcmp(o[i].bytes, o[0].bytes, o[0].len))
            same = 0;
    }
    int lines = count_lines(counter_path);
    CHECK(ok == n, "%s, key %d: all %d contenders got a hit in the end (%d did)", what, k, n, ok);
    CHECK(lines == 1 && compiled == 1, "%s, key %d: compiled exactly once (%d lines, %d compiles, "
          "%d first gets missed)", what, k, lines, compiled, first_miss);
    CHECK(same && ok == n, "%s, key %d: all %d got identical bytes", what, k, n);
}

/* ---------------------------------------------------------------- processes */

/* Child: wait for the start (EOF on the pipe), contend, report through a file. */
static void child(int start_fd, const char *cache_dir, int k, int idx, const char *counter)
{
    char c, out_path[128], name[32];
    while (read(start_fd, &c, 1) < 0 && errno == EINTR) {
    }
    outcome o;
    contend(cache_dir, k, counter, &o);
    snprintf(name, sizeof name, "out-%d-%d", k, idx);
    path_in_root(out_path, sizeof out_path, name);
    FILE *f = fopen(out_path, "wb");
    if (!f)
        _exit(3);
    fwrite(&o, sizeof o, 1, f);
    if (o.ok)
        fwrite(o.bytes, 1, o.len, f);
    fclose(f);
    _exit(o.ok ? 0 : 1);
}

static int read_outcome(int k, int idx, outcome *o)
{
    char path[128], name[32];
    snprintf(name, sizeof name, "out-%d-%d", k, idx);
    path_in_root(path, sizeof path, name);
    FILE *f = fopen(path, "rb");
    memset(o, 0, sizeof *o);
    if (!f || fread(o, sizeof *o, 1, f) != 1) {
        if (f)
            fclose(f);
        snprintf(o->err, sizeof o->err, "no report from the child");
        o->ok = 0;
        return -1;
    }
    o->bytes = NULL;
    if (o->ok) {
        o->bytes = malloc(o->len ? o->len : 1);
        if (!o->bytes || fread(o->bytes, 1, o->len, f) != o->len)
            o->ok = 0;
    }
    fclose(f);
    return 0;
}

static void run_processes(const char *what, const char *cache_dir, int nkeys)
{
    int start[2];
    pid_t pids[MAX_KEYS * CONTENDERS];
    char counters[MAX_KEYS][128];
    if (pipe(start) != 0) {
        CHECK(0, "pipe");
        return;
    }
    for (int k = 0; k < nkeys; k++) {
        char name[64];
        snprintf(name, sizeof name, "%s-compiles-%d.txt", what, k);
        path_in_root(counters[k], sizeof counters[k], name);
        unlink(counters[k]);
    }
    fflush(stdout);
    for (int i = 0; i < nkeys * CONTENDERS; i++) {
        pids[i] = fork();
        if (pids[i] == 0) {
            close(start[1]);
            child(start[0], cache_dir, i % nkeys, i / nkeys, counters[i % nkeys]);
        }
    }
    close(start[0]);
    close(start[1]); /* EOF: everyone starts together */
    int exited = 0;
    for (int i = 0; i < nkeys * CONTENDERS; i++) {
        int st = 0;
        waitpid(pids[i], &st, 0);
        exited += WIFEXITED(st) && WEXITSTATUS(st) == 0;
    }
    CHECK(exited == nkeys * CONTENDERS, "%s: %d processes exited cleanly (%d did)", what,
          nkeys * CONTENDERS, exited);
    for (int k = 0; k < nkeys; k++) {
        outcome o[CONTENDERS];
        for (int i = 0; i < CONTENDERS; i++)
            read_outcome(k, i, &o[i]);
        check_key(what, k, counters[k], o, CONTENDERS);
        for (int i = 0; i < CONTENDERS; i++)
            free(o[i].bytes);
    }
}

/* ---------------------------------------------------------------- threads */

typedef struct thread_arg {
    pthread_barrier_t *barrier;
    const char *cache_dir, *counter;
    int k;
    outcome o;
} thread_arg;

static void *thread_main(void *p)
{
    thread_arg *a = p;
    pthread_barrier_wait(a->barrier);
    contend(a->cache_dir, a->k, a->counter, &a->o);
    return NULL;
}

static void run_threads(const char *what, const char *cache_dir, int nkeys)
{
    int n = nkeys * CONTENDERS;
    pthread_t th[MAX_KEYS * CONTENDERS];
    thread_arg args[MAX_KEYS * CONTENDERS];
    char counters[MAX_KEYS][128];
    pthread_barrier_t barrier;
    pthread_barrier_init(&barrier, NULL, (unsigned)n);
    for (int k = 0; k < nkeys; k++) {
        char name[64];
        snprintf(name, sizeof name, "%s-compiles-%d.txt", what, k);
        path_in_root(counters[k], sizeof counters[k], name);
        unlink(counters[k]);
    }
    for (int i = 0; i < n; i++) {
        args[i] = (thread_arg){&barrier, cache_dir, counters[i % nkeys], i % nkeys, {0}};
        pthread_create(&th[i], NULL, thread_main, &args[i]);
    }
    for (int i = 0; i < n; i++)
        pthread_join(th[i], NULL);
    pthread_barrier_destroy(&barrier);
    for (int k = 0; k < nkeys; k++) {
        outcome o[CONTENDERS];
        for (int i = 0; i < CONTENDERS; i++)
            o[i] = args[i * nkeys + k].o;
        check_key(what, k, counters[k], o, CONTENDERS);
        for (int i = 0; i < CONTENDERS; i++)
            free(o[i].bytes);
    }
}

int main(void)
{
    strcpy(root, "/tmp/fajit-test-stampede-XXXXXX");
    if (!mkdtemp(root)) {
        perror("mkdtemp");
        return 2;
    }
    printf("stampede tests in %s\n", root);
    char cache[128], cache2[128];
    path_in_root(cache, sizeof cache, "proc-cache/not/yet/created");
    path_in_root(cache2, sizeof cache2, "thread-cache");

    key_base = 0;
    run_processes("8 processes, 1 key, new cache", cache, 1);
    key_base = 1;
    run_processes("24 processes, 3 keys", cache, 3);
    key_base = 0;
    run_threads("8 threads, 1 key", cache2, 1);
    key_base = 1;
    run_threads("24 threads, 3 keys", cache2, 3);

    /* The keys of the process rounds are all in the cache exactly once. */
    fajit__store *s = NULL;
    uint64_t entries = 0;
    fajit__store_counters c = {0, 0, 0, 0};
    if (fajit__store_open(cache, FAJIT_CACHE_READWRITE, 0, NULL, &s) == 0)
        fajit__store_stats(s, &entries, NULL, NULL, &c);
    CHECK(entries == 4 && c.compiles == 4,
          "process cache: 4 entries, 4 compiles counted (1 + 3 keys): %llu, %llu",
          (unsigned long long)entries, (unsigned long long)c.compiles);
    fajit__store_close(s);

    nftw(root, rm_one, 16, FTW_DEPTH | FTW_PHYS);
    printf("%s: %d failure(s)\n", failures ? "FAIL" : "PASS", failures);
    return failures ? 1 : 0;
}
