/*
 * tests/test_store.c - the LMDB store (cache/store.c): put/get, full-key
 * mismatch, corrupt entries detected/counted/deleted/replaced, read-only mode
 * (incl. a nonexistent and an unwritable directory), map growth (also under
 * concurrent readers), persistent counters, iterate/del, and fork.
 */
#include <errno.h>
#include <ftw.h>
#include <lmdb.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include "cache/store.h"

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

/* ---------------------------------------------------------------- helpers */

static int rm_one(const char *path, const struct stat *st, int flag, struct FTW *ftw)
{
    (void)st, (void)flag, (void)ftw;
    return remove(path);
}

static void make_root(void)
{
    strcpy(root, "/tmp/fajit-test-store-XXXXXX");
    if (!mkdtemp(root)) {
        perror("mkdtemp");
        exit(2);
    }
}

static void remove_root(void)
{
    char ro[128];
    snprintf(ro, sizeof ro, "%s/ro_unwritable", root);
    chmod(ro, 0755); /* else a non-root user cannot empty it */
    nftw(root, rm_one, 16, FTW_DEPTH | FTW_PHYS);
}

static const char *sub(const char *name)
{
    static char bufs[4][256];
    static int next;
    char *b = bufs[next++ % 4];
    snprintf(b, 256, "%s/%s", root, name);
    return b;
}

static void make_key(int seed, uint8_t key[16])
{
    for (int i = 0; i < 16; i++)
        key[i] = (uint8_t)(seed * 31 + i * 7 + 1);
}

static void make_full_key(int seed, char *buf, size_t n)
{
    snprintf(buf, n, "fwd dqk=%d dv=%d dtype=fp16 arch=sm_90 build=test", seed, seed);
}

/* An encoded entry for seed with a cubin of cubin_len pseudo-random bytes. */
static uint8_t *make_entry(int seed, size_t cubin_len, size_t *len)
{
    char fk[128];
    make_full_key(seed, fk, sizeof fk);
    uint8_t *cubin = malloc(cubin_len ? cubin_len : 1);
    uint32_t x = (uint32_t)seed * 2654435761u + 12345u;
    for (size_t i = 0; i < cubin_len; i++) {
        x = x * 1103515245u + 12345u;
        cubin[i] = (uint8_t)(x >> 16);
    }
    fajit__entry_meta meta = {90, 0, 12080, 64, 1024, 0, (uint32_t)seed};
    uint8_t *out = NULL;
    if (fajit__entry_encode(&meta, (const uint8_t *)fk, strlen(fk), cubin, cubin_len, &out, len))
        *len = 0;
    free(cubin);
    return out;
}

static int put_seed(fajit__store *s, int seed, size_t cubin_len)
{
    uint8_t key[16];
    size_t len;
    uint8_t *e = make_entry(seed, cubin_len, &len);
    make_key(seed, key);
    int rc = fajit__store_put(s, key, e, len);
    free(e);
    return rc;
}

/* 0 if the store returns exactly the entry of seed; else the status or 1. */
static int get_seed(fajit__store *s, int seed, size_t cubin_len)
{
    uint8_t key[16], *got = NULL;
    size_t got_len = 0, len;
    char fk[128];
    make_key(seed, key);
    make_full_key(seed, fk, sizeof fk);
    int rc = fajit__store_get(s, key, (const uint8_t *)fk, strlen(fk), &got, &got_len);
    if (rc)
        return rc;
    uint8_t *want = make_entry(seed, cubin_len, &len);
    rc = (len == got_len && memcmp(want, got, len) == 0) ? 0 : 1;
    free(want);
    free(got);
    return rc;
}

static fajit__store_counters counters_of(fajit__store *s, uint64_t *entries)
{
    fajit__store_counters c = {0, 0, 0, 0};
    uint64_t n = 0;
    if (fajit__store_stats(s, &n, NULL, NULL, &c) != 0)
        printf("stats failed: %s\n", fajit__detail());
    if (entries)
        *entries = n;
    return c;
}

/* Captures the last WARN message. */
static pthread_mutex_t log_lock = PTHREAD_MUTEX_INITIALIZER;
static char last_warn[2048];
static void capture_log(void *user, int level, const char *msg)
{
    (void)user;
    if (level != FAJIT_LOG_WARN)
        return;
    pthread_mutex_lock(&log_lock);
    snprintf(last_warn, sizeof last_warn, "%s", msg);
    pthread_mutex_unlock(&log_lock);
}
static const fajit__logger test_log = {capture_log, NULL, FAJIT_LOG_DEBUG};

/* Writes raw bytes under key with LMDB directly (the store must be closed). */
static int raw_put(const char *dir, const uint8_t key[16], const void *val, size_t len)
{
    MDB_env *env;
    MDB_txn *txn;
    MDB_dbi dbi;
    int rc = mdb_env_create(&env);
    if (rc)
        return rc;
    mdb_env_set_maxdbs(env, 2);
    rc = mdb_env_open(env, dir, 0, 0644);
    if (!rc)
        rc = mdb_txn_begin(env, NULL, 0, &txn);
    if (!rc) {
        rc = mdb_dbi_open(txn, "entries", MDB_CREATE, &dbi);
        MDB_val k = {16, (void *)key}, v = {len, (void *)val};
        if (!rc)
            rc = mdb_put(txn, dbi, &k, &v, 0);
        if (!rc)
            rc = mdb_txn_commit(txn);
        else
            mdb_txn_abort(txn);
    }
    mdb_env_close(env);
    return rc;
}

/* ---------------------------------------------------------------- tests */

static void test_put_get(void)
{
    const char *dir = sub("nested/parents/put_get");
    fajit__store *s = NULL;
    int rc = fajit__store_open(dir, FAJIT_CACHE_READWRITE, 0, NULL, &s);
    CHECK(rc == 0 && s, "open read-write creates %s with parents (rc %d %s)", dir, rc,
          rc ? fajit__detail() : "");
    if (!s)
        return;
    struct stat st;
    CHECK(stat(sub("nested/parents/put_get/data.mdb"), &st) == 0, "data.mdb is in the directory");
    CHECK(put_seed(s, 1, 1000) == 0, "put an entry");
    CHECK(get_seed(s, 1, 1000) == 0, "get returns it byte for byte");
    rc = get_seed(s, 2, 1000);
    CHECK(rc == FAJIT_ENOTFOUND, "get of an absent key is FAJIT_ENOTFOUND (got %d)", rc);

    /* Same digest, another full key: a collision must be a miss. */
    uint8_t key[16], *got = (uint8_t *)1;
    size_t got_len = 99;
    make_key(1, key);
    const char *other = "fwd dqk=999 something else entirely";
    fajit__store_counters before = counters_of(s, NULL);
    rc = fajit__store_get(s, key, (const uint8_t *)other, strlen(other), &got, &got_len);
    CHECK(rc == FAJIT_ENOTFOUND && got == NULL && got_len == 0,
          "same digest with a different full key is a miss (got %d)", rc);
    fajit__store_counters after = counters_of(s, NULL);
    CHECK(after.bad_entries == before.bad_entries + 1 && after.misses == before.misses + 1,
          "the mismatch is counted as a bad entry and a miss");
    CHECK(get_seed(s, 1, 1000) == FAJIT_ENOTFOUND, "the mismatching entry was deleted");
    CHECK(put_seed(s, 1, 1000) == 0 && get_seed(s, 1, 1000) == 0, "a put replaces it");
    fajit__store_close(s);
    fajit__store_close(NULL);
}

struct corruption {
    const char *name;
    const char *why; /* expected in the WARN message */
};

static void corrupt_bytes(int kind, uint8_t *e, size_t *len)
{
    switch (kind) {
    case 0: /* a flipped cubin byte */
        e[*len - 5] ^= 0x10;
        break;
    case 1: /* truncated */
        *len -= 7;
        break;
    case 2: { /* a valid entry whose stored full key is another one */
        size_t l2;
        uint8_t *other = make_entry(77, 500, &l2);
        memcpy(e, other, l2);
        *len = l2;
        free(other);
        break;
    }
    case 3: /* flipped magic */
        e[0] ^= 0xff;
        break;
    default: /* shorter than a header */
        *len = 10;
        break;
    }
}

static void test_corrupt_entries(void)
{
    static const struct corruption kinds[] = {
        {"flipped cubin byte", "checksum mismatch"},
        {"truncated", "cubin length runs past"},
        {"wrong stored full key", "stored full key differs"},
        {"bad magic", "bad magic"},
        {"shorter than a header", "shorter than the 64-byte header"},
    };
    const char *dir = sub("corrupt");
    for (int k = 0; k < 5; k++) {
        fajit__store *s = NULL;
        if (fajit__store_open(dir, FAJIT_CACHE_READWRITE, 0, &test_log, &s) != 0) {
            CHECK(0, "open %s: %s", dir, fajit__detail());
            return;
        }
        CHECK(put_seed(s, 5, 2000) == 0 && get_seed(s, 5, 2000) == 0, "[%s] good entry stored",
              kinds[k].name);
        fajit__store_close(s); /* flushes counters; the env is closed for raw access */

        size_t len;
        uint8_t key[16], *e = make_entry(5, 2000, &len);
        make_key(5, key);
        corrupt_bytes(k, e, &len);
        int rc = raw_put(dir, key, e, len);
        free(e);
        CHECK(rc == 0, "[%s] bad bytes written with LMDB under the same key", kinds[k].name);

        if (fajit__store_open(dir, FAJIT_CACHE_READWRITE, 0, &test_log, &s) != 0)
            return;
        uint64_t n0, n1;
        fajit__store_counters c0 = counters_of(s, &n0);
        last_warn[0] = '\0';
        rc = get_seed(s, 5, 2000);
        fajit__store_counters c1 = counters_of(s, &n1);
        CHECK(rc == FAJIT_ENOTFOUND, "[%s] get is a miss (got %d)", kinds[k].name, rc);
        CHECK(c1.bad_entries == c0.bad_entries + 1, "[%s] counted as a bad entry", kinds[k].name);
        CHECK(strstr(last_warn, kinds[k].why) != NULL, "[%s] logged at WARN: \"%s\"",
              kinds[k].name, last_warn);
        CHECK(n0 == 1 && n1 == 0, "[%s] the bad entry was deleted (entries %llu -> %llu)",
              kinds[k].name, (unsigned long long)n0, (unsigned long long)n1);
        CHECK(put_seed(s, 5, 2000) == 0 && get_seed(s, 5, 2000) == 0,
              "[%s] replaced by a put and served again", kinds[k].name);
        fajit__store_close(s);
    }
}

static void test_read_only(void)
{
    const char *dir = sub("ro");
    fajit__store *rw = NULL, *ro = NULL;
    if (fajit__store_open(dir, FAJIT_CACHE_READWRITE, 0, NULL, &rw) != 0) {
        CHECK(0, "open %s: %s", dir, fajit__detail());
        return;
    }
    CHECK(put_seed(rw, 10, 300) == 0, "read-write store filled");
    fajit__store_close(rw);

    int rc = fajit__store_open(dir, FAJIT_CACHE_READONLY, 0, NULL, &ro);
    CHECK(rc == 0, "open read-only (rc %d)", rc);
    if (rc)
        return;
    CHECK(get_seed(ro, 10, 300) == 0, "read-only serves hits");
    CHECK(fajit__store_mode(ro) == FAJIT_CACHE_READONLY, "mode is read-only");
    rc = put_seed(ro, 11, 300);
    CHECK(rc == FAJIT_EREADONLY, "put is FAJIT_EREADONLY (got %d): %s", rc, fajit__detail());
    uint8_t key[16];
    make_key(10, key);
    rc = fajit__store_del(ro, key);
    CHECK(rc == FAJIT_EREADONLY, "del is FAJIT_EREADONLY (got %d)", rc);
    fajit__keylock lk;
    rc = fajit__store_lock_key(ro, key, &lk);
    CHECK(rc == 0 && lk.fd == -1, "lock_key is a no-op");
    fajit__store_unlock_key(ro, &lk);

    /* One env per path: a read-write open while it is open read-only is refused. */
    rc = fajit__store_open(dir, FAJIT_CACHE_READWRITE, 0, NULL, &rw);
    CHECK(rc == FAJIT_EREADONLY && rw == NULL,
          "read-write open of a path open read-only in this process is refused (%d)", rc);
    fajit__store_close(ro);

    /* ...but read-only stores share a read-write env. */
    fajit__store *a = NULL, *b = NULL;
    fajit__store_open(dir, FAJIT_CACHE_READWRITE, 0, NULL, &a);
    rc = fajit__store_open(dir, FAJIT_CACHE_READONLY, 0, NULL, &b);
    CHECK(rc == 0 && a && b && get_seed(b, 10, 300) == 0 && put_seed(b, 12, 10) == FAJIT_EREADONLY,
          "a read-only store shares the read-write env and still refuses puts");
    fajit__store_close(b);
    CHECK(a && get_seed(a, 10, 300) == 0, "the read-write store still works after that");
    fajit__store_close(a);

    const char *none = sub("does/not/exist");
    rc = fajit__store_open(none, FAJIT_CACHE_READONLY, 0, NULL, &ro);
    CHECK(rc == 0 && ro, "read-only on a nonexistent directory opens (rc %d)", rc);
    if (ro) {
        uint64_t n = 1, bytes = 1, map = 1;
        CHECK(get_seed(ro, 10, 300) == FAJIT_ENOTFOUND, "...and every get misses");
        CHECK(fajit__store_stats(ro, &n, &bytes, &map, NULL) == 0 && n == 0 && bytes == 0,
              "...and it has no entries");
        fajit__store_close(ro);
    }
    struct stat st;
    CHECK(stat(none, &st) != 0, "...and the directory was not created");
}

/* Read-only on a directory we cannot write (no lock file can be made). */
static int check_unwritable_dir(const char *dir)
{
    fajit__store *ro = NULL;
    int rc = fajit__store_open(dir, FAJIT_CACHE_READONLY, 0, NULL, &ro);
    CHECK(rc == 0, "read-only open of a 0555 directory (rc %d %s)", rc, rc ? fajit__detail() : "");
    if (rc)
        return 1;
    rc = get_seed(ro, 20, 400);
    CHECK(rc == 0, "serves hits without a lock file (rc %d)", rc);
    CHECK(get_seed(ro, 21, 400) == FAJIT_ENOTFOUND, "misses what is not there");
    fajit__store_close(ro);
    return rc != 0;
}

static void test_read_only_unwritable(void)
{
    const char *dir = sub("ro_unwritable");
    fajit__store *rw = NULL;
    if (fajit__store_open(dir, FAJIT_CACHE_READWRITE, 0, NULL, &rw) != 0)
        return;
    put_seed(rw, 20, 400);
    fajit__store_close(rw);
    remove(sub("ro_unwritable/lock.mdb"));
    remove(sub("ro_unwritable/compile.lock"));
    chmod(dir, 0555);
    chmod(root, 0755);
    if (geteuid() != 0) {
        check_unwritable_dir(dir);
        return;
    }
    /* Root ignores permissions, so check as "nobody" in a child. */
    pid_t pid = fork();
    if (pid == 0) {
        if (setgid(65534) != 0 || setuid(65534) != 0)
            _exit(77);
        _exit(check_unwritable_dir(dir));
    }
    int status = 0;
    waitpid(pid, &status, 0);
    if (WIFEXITED(status) && WEXITSTATUS(status) == 77)
        printf("skip read-only on a 0555 directory: running as root and cannot drop to uid "
               "65534, and root ignores permissions\n");
    else
        CHECK(WIFEXITED(status) && WEXITSTATUS(status) == 0,
              "read-only on a 0555 directory, checked as uid 65534 since we run as root");
    struct stat st;
    CHECK(stat(sub("ro_unwritable/lock.mdb"), &st) != 0, "no lock file was created there");
}

static void test_map_growth(void)
{
    const char *dir = sub("growth");
    fajit__store *s = NULL;
    const uint64_t tiny = 128 * 1024;
    int rc = fajit__store_open(dir, FAJIT_CACHE_READWRITE, tiny, NULL, &s);
    CHECK(rc == 0, "open with a %llu-byte map (rc %d %s)", (unsigned long long)tiny, rc,
          rc ? fajit__detail() : "");
    if (rc)
        return;
    const int n = 48;
    const size_t cubin = 100 * 1024;
    int put_fail = 0, get_fail = 0;
    for (int i = 0; i < n; i++)
        put_fail += put_seed(s, 100 + i, cubin + (size_t)i) != 0;
    CHECK(put_fail == 0, "%d puts of ~100 KiB into a 128 KiB map succeed (%d failed: %s)", n,
          put_fail, put_fail ? fajit__detail() : "");
    for (int i = 0; i < n; i++)
        get_fail += get_seed(s, 100 + i, cubin + (size_t)i) != 0;
    CHECK(get_fail == 0, "all %d are read back intact (%d not)", n, get_fail);
    uint64_t entries = 0, bytes = 0, map = 0;
    fajit__store_stats(s, &entries, &bytes, &map, NULL);
    CHECK(entries == (uint64_t)n && bytes > (uint64_t)n * cubin,
          "stats: %llu entries, %llu bytes", (unsigned long long)entries,
          (unsigned long long)bytes);
    CHECK(map > bytes && map > tiny, "the map grew to %llu bytes", (unsigned long long)map);
    fajit__store_close(s);

    rc = fajit__store_open(dir, FAJIT_CACHE_READWRITE, tiny, NULL, &s);
    get_fail = 0;
    for (int i = 0; rc == 0 && i < n; i++)
        get_fail += get_seed(s, 100 + i, cubin + (size_t)i) != 0;
    CHECK(rc == 0 && get_fail == 0, "reopened with the tiny map size, all still readable");
    CHECK(rc == 0 && put_seed(s, 99, cubin) == 0 && get_seed(s, 99, cubin) == 0,
          "and a further put grows it again");
    fajit__store_close(s);
}

/* Readers hammer the store while the map grows under them. */
struct reader_arg {
    fajit__store *s;
    atomic_int *stop;
    int bad, reads;
};

static void *reader(void *p)
{
    struct reader_arg *a = p;
    while (!atomic_load(a->stop)) {
        a->bad += get_seed(a->s, 1, 5000) != 0;
        a->reads++;
    }
    return NULL;
}

static void test_growth_under_readers(void)
{
    const char *dir = sub("growth_readers");
    fajit__store *s = NULL;
    if (fajit__store_open(dir, FAJIT_CACHE_READWRITE, 128 * 1024, NULL, &s) != 0) {
        CHECK(0, "open: %s", fajit__detail());
        return;
    }
    put_seed(s, 1, 5000);
    atomic_int stop = 0;
    pthread_t th[4];
    struct reader_arg args[4];
    for (int i = 0; i < 4; i++) {
        args[i] = (struct reader_arg){s, &stop, 0, 0};
        pthread_create(&th[i], NULL, reader, &args[i]);
    }
    int put_fail = 0;
    for (int i = 0; i < 40; i++)
        put_fail += put_seed(s, 200 + i, 64 * 1024) != 0;
    atomic_store(&stop, 1);
    int bad = 0, reads = 0;
    for (int i = 0; i < 4; i++) {
        pthread_join(th[i], NULL);
        bad += args[i].bad;
        reads += args[i].reads;
    }
    uint64_t map = 0;
    fajit__store_stats(s, NULL, NULL, &map, NULL);
    CHECK(put_fail == 0 && bad == 0 && map > 128 * 1024,
          "map grew to %llu while 4 threads read (%d reads, %d bad, %d puts failed)",
          (unsigned long long)map, reads, bad, put_fail);
    fajit__store_close(s);
}

/* Another process grows the map past ours: our next transaction must adopt
 * the new size (MDB_MAP_RESIZED) rather than fail. */
static void test_map_grown_elsewhere(void)
{
    const char *dir = sub("grown_elsewhere");
    fajit__store *s = NULL;
    if (fajit__store_open(dir, FAJIT_CACHE_READWRITE, 128 * 1024, NULL, &s) != 0) {
        CHECK(0, "open: %s", fajit__detail());
        return;
    }
    put_seed(s, 1, 1000);
    uint64_t before = 0, after = 0;
    fajit__store_stats(s, NULL, NULL, &before, NULL);
    fflush(stdout);
    pid_t pid = fork();
    if (pid == 0) {
        int bad = 0;
        for (int i = 0; i < 30; i++)
            bad |= put_seed(s, 300 + i, 100 * 1024) != 0;
        fajit__store_close(s);
        _exit(bad);
    }
    int status = 0;
    waitpid(pid, &status, 0);
    CHECK(WIFEXITED(status) && WEXITSTATUS(status) == 0, "another process filled 3 MiB");
    int get_fail = 0;
    for (int i = 0; i < 30; i++)
        get_fail += get_seed(s, 300 + i, 100 * 1024) != 0;
    fajit__store_stats(s, NULL, NULL, &after, NULL);
    CHECK(get_fail == 0 && after > before,
          "this process reads it all, adopting the grown map (%llu -> %llu bytes, %d failed)",
          (unsigned long long)before, (unsigned long long)after, get_fail);
    CHECK(put_seed(s, 2, 1000) == 0 && get_seed(s, 2, 1000) == 0, "and still writes");
    fajit__store_close(s);
}

static void test_counters_persist(void)
{
    const char *dir = sub("counters");
    fajit__store *s = NULL;
    if (fajit__store_open(dir, FAJIT_CACHE_READWRITE, 0, NULL, &s) != 0)
        return;
    put_seed(s, 1, 100);
    get_seed(s, 1, 100);
    get_seed(s, 1, 100);
    get_seed(s, 2, 100);
    get_seed(s, 3, 100);
    get_seed(s, 4, 100);
    fajit__store_count_bad(s);
    fajit__store_counters c = counters_of(s, NULL);
    CHECK(c.hits == 2 && c.misses == 3 && c.compiles == 1 && c.bad_entries == 1,
          "in-memory counters: %llu hits %llu misses %llu compiles %llu bad",
          (unsigned long long)c.hits, (unsigned long long)c.misses,
          (unsigned long long)c.compiles, (unsigned long long)c.bad_entries);
    CHECK(fajit__store_flush_counters(s) == 0, "flush");
    c = counters_of(s, NULL);
    CHECK(c.hits == 2 && c.misses == 3, "flushing does not double count");
    get_seed(s, 1, 100);
    fajit__store_close(s); /* flushes the last hit */

    if (fajit__store_open(dir, FAJIT_CACHE_READWRITE, 0, NULL, &s) != 0)
        return;
    c = counters_of(s, NULL);
    CHECK(c.hits == 3 && c.misses == 3 && c.compiles == 1 && c.bad_entries == 1,
          "after reopen: %llu hits %llu misses %llu compiles %llu bad",
          (unsigned long long)c.hits, (unsigned long long)c.misses,
          (unsigned long long)c.compiles, (unsigned long long)c.bad_entries);
    fajit__store_close(s);

    fajit__store *ro = NULL;
    fajit__store_open(dir, FAJIT_CACHE_READONLY, 0, NULL, &ro);
    get_seed(ro, 1, 100);
    c = counters_of(ro, NULL);
    CHECK(c.hits == 4, "read-only store reports persistent + its own hits (%llu)",
          (unsigned long long)c.hits);
    CHECK(fajit__store_flush_counters(ro) == FAJIT_EREADONLY, "read-only flush is refused");
    fajit__store_close(ro);
}

struct iter_state {
    int count, stop_after;
    uint8_t last[16];
    int ordered, valid;
};

static int count_cb(void *user, const uint8_t key[16], const uint8_t *entry, size_t len)
{
    struct iter_state *st = user;
    if (st->count > 0 && memcmp(st->last, key, 16) >= 0)
        st->ordered = 0;
    memcpy(st->last, key, 16);
    st->valid += fajit__entry_decode(entry, len, NULL, NULL) == 0;
    st->count++;
    return st->stop_after && st->count >= st->stop_after;
}

static void test_iterate_del(void)
{
    const char *dir = sub("iterate");
    fajit__store *s = NULL;
    if (fajit__store_open(dir, FAJIT_CACHE_READWRITE, 0, NULL, &s) != 0)
        return;
    for (int i = 0; i < 5; i++)
        put_seed(s, 40 + i, 200);
    struct iter_state st = {0, 0, {0}, 1, 0};
    int rc = fajit__store_iterate(s, count_cb, &st);
    CHECK(rc == 0 && st.count == 5 && st.ordered && st.valid == 5,
          "iterate visits 5 valid entries in key order (%d, ordered %d)", st.count, st.ordered);
    struct iter_state early = {0, 2, {0}, 1, 0};
    fajit__store_iterate(s, count_cb, &early);
    CHECK(early.count == 2, "a nonzero callback return stops iteration (%d)", early.count);

    uint8_t key[16];
    make_key(42, key);
    CHECK(fajit__store_del(s, key) == 0, "del one entry");
    CHECK(get_seed(s, 42, 200) == FAJIT_ENOTFOUND, "it is gone");
    rc = fajit__store_del(s, key);
    CHECK(rc == FAJIT_ENOTFOUND, "del of an absent key is FAJIT_ENOTFOUND (%d)", rc);
    uint64_t n = 0;
    fajit__store_stats(s, &n, NULL, NULL, NULL);
    CHECK(n == 4, "4 entries left (%llu)", (unsigned long long)n);
    CHECK(fajit__store_del(s, NULL) == 0, "del all");
    fajit__store_stats(s, &n, NULL, NULL, NULL);
    st = (struct iter_state){0, 0, {0}, 1, 0};
    fajit__store_iterate(s, count_cb, &st);
    CHECK(n == 0 && st.count == 0 && get_seed(s, 40, 200) == FAJIT_ENOTFOUND,
          "nothing left after del all");
    CHECK(put_seed(s, 40, 200) == 0 && get_seed(s, 40, 200) == 0, "the store works after del all");
    fajit__store_close(s);
}

static void test_fork(void)
{
    const char *dir = sub("fork");
    fajit__store *s = NULL;
    if (fajit__store_open(dir, FAJIT_CACHE_READWRITE, 0, NULL, &s) != 0)
        return;
    put_seed(s, 60, 3000);
    get_seed(s, 60, 3000); /* parent: 1 compile, 1 hit, unflushed at fork */
    fflush(stdout);
    pid_t pid = fork();
    if (pid == 0) {
        int bad = 0;
        bad |= get_seed(s, 60, 3000) != 0;
        bad |= put_seed(s, 61, 3000) != 0;
        bad |= get_seed(s, 61, 3000) != 0;
        fajit__store_close(s); /* flushes the child's own counters only */
        _exit(bad);
    }
    int status = 0;
    waitpid(pid, &status, 0);
    CHECK(WIFEXITED(status) && WEXITSTATUS(status) == 0,
          "child gets and puts through the parent's store handle");
    CHECK(get_seed(s, 61, 3000) == 0, "parent reads the child's entry");
    CHECK(put_seed(s, 62, 3000) == 0 && get_seed(s, 62, 3000) == 0, "parent still writes");
    fajit__store_close(s);
    fajit__store_open(dir, FAJIT_CACHE_READWRITE, 0, NULL, &s);
    fajit__store_counters c = counters_of(s, NULL);
    CHECK(c.hits == 5 && c.compiles == 3,
          "counters: parent's and child's each counted once (%llu hits, %llu compiles)",
          (unsigned long long)c.hits, (unsigned long long)c.compiles);
    fajit__store_close(s);
}

int main(void)
{
    make_root();
    printf("store tests in %s\n", root);
    test_put_get();
    test_corrupt_entries();
    test_read_only();
    test_read_only_unwritable();
    test_map_growth();
    test_growth_under_readers();
    test_map_grown_elsewhere();
    test_counters_persist();
    test_iterate_del();
    test_fork();
    remove_root();
    printf("%s: %d failure(s)\n", failures ? "FAIL" : "PASS", failures);
    return failures ? 1 : 0;
}
