/*
 * tests/test_cache_crash.c - issue 6, scenario 2: writers SIGKILLed at random
 * points, a few hundred times. Most writers run a cheap fake compile through
 * the cache layer (lock the key, look, "compile" for a random moment, put,
 * unlock) so that kills land mid-lock, mid-put and mid-commit; some run real
 * fajit_compile calls, killed mid-NVRTC or mid-store. Afterwards: the store
 * reopens, every entry is absent or valid (fajit_cache_verify is clean), and
 * the next writer takes every key lock and puts within a timeout. No GPU.
 *
 *   test_cache_crash [FAKE_KILLS [REAL_KILLS]]   (default 300 and 24)
 */
#include <signal.h>
#include <sys/wait.h>
#include <time.h>
#include <xxhash.h>

#include "cache/store.h"
#include "test_cache_util.h"

#define NKEYS 48

static const char *const real_specs[] = {
    "ref dqk=64 dtype=fp16 arch=sm_80", "ref dqk=72 dtype=bf16 arch=sm_80",
    "ref dqk=96 dtype=fp16 mask=causal arch=sm_90", "ref dqk=40 dv=24 dtype=bf16 arch=sm_90"};

/* A fake entry for key number i: a full key whose XXH3-128 is the key (as the
 * runtime's are, so verify judges it like a real one) and a cubin of a size
 * that varies with i, large enough to span several LMDB pages. */
static void fake_key(int i, char *full_key, size_t cap, uint8_t key[16])
{
    XXH128_canonical_t c;
    snprintf(full_key, cap, "fake variant %d", i);
    XXH128_canonicalFromHash(&c, XXH3_128bits(full_key, strlen(full_key)));
    memcpy(key, c.digest, 16);
}

static int fake_put(fajit__store *s, int i)
{
    static uint8_t cubin[96 * 1024];
    char full[64];
    uint8_t key[16], *entry = NULL;
    size_t entry_len = 0, n = 1000 + (size_t)i * 1900;
    fajit__entry_meta meta = {80, 0, 12000, 32, 0, 0, 1};
    fake_key(i, full, sizeof full, key);
    memset(cubin, 'a' + i % 26, n);
    int rc = fajit__entry_encode(&meta, (const uint8_t *)full, strlen(full), cubin, n, &entry,
                                 &entry_len);
    if (rc == 0)
        rc = fajit__store_put(s, key, entry, entry_len);
    free(entry);
    return rc;
}

/* A writer that loops until killed: lock, get, compile (a pause), put, and
 * now and then delete, so that pages are freed and reused. */
static void fake_writer(const char *dir, unsigned seed)
{
    fajit__store *s;
    srand(seed);
    if (fajit__store_open(dir, FAJIT_CACHE_READWRITE, 1 << 20, NULL, &s) != 0) {
        dprintf(1, "     fake writer: %s\n", fajit__detail());
        _exit(3);
    }
    for (;;) {
        int i = rand() % NKEYS;
        char full[64];
        uint8_t key[16], *entry;
        size_t len;
        fajit__keylock lk;
        fake_key(i, full, sizeof full, key);
        if (fajit__store_lock_key(s, key, &lk) != 0)
            _exit(4);
        if (fajit__store_get(s, key, (const uint8_t *)full, strlen(full), &entry, &len) == 0)
            free(entry);
        if (rand() % 4 == 0)
            fajit__store_del(s, key);
        else {
            struct timespec ts = {0, (rand() % 2000) * 1000L};
            nanosleep(&ts, NULL);
            if (fake_put(s, i) != 0)
                _exit(5);
        }
        fajit__store_unlock_key(s, &lk);
    }
}

static void real_writer(const char *dir, unsigned seed)
{
    fajit_ctx *ctx = open_ctx(dir, FAJIT_CACHE_READWRITE, NULL);
    if (!ctx)
        _exit(3);
    for (unsigned k = seed;; k++)
        fajit_compile(ctx, real_specs[k % 4], NULL);
}

/* Starts writers, kills them all after a random pause; returns how many had
 * exited on their own (a failure: they only stop when killed). */
static int kill_round(const char *dir, int writers, int real, long max_us, unsigned seed)
{
    pid_t pids[4];
    int early = 0;
    for (int w = 0; w < writers; w++) {
        pids[w] = fork();
        if (pids[w] == 0) {
            if (real)
                real_writer(dir, seed + (unsigned)w);
            fake_writer(dir, seed * 7 + (unsigned)w);
        }
    }
    struct timespec ts = {0, 1000L * (rand() % max_us)};
    nanosleep(&ts, NULL);
    for (int w = 0; w < writers; w++)
        kill(pids[w], SIGKILL);
    for (int w = 0; w < writers; w++) {
        int status;
        waitpid(pids[w], &status, 0);
        if (!WIFSIGNALED(status)) {
            printf("     writer exited with status %d\n", WEXITSTATUS(status));
            early++;
        }
    }
    return early;
}

/* The next writer: every key lock and a put of every key, under a deadline,
 * then a compile through the API (its lock too). */
static int next_writer(const char *dir)
{
    alarm(20);
    fajit__store *s;
    if (fajit__store_open(dir, FAJIT_CACHE_READWRITE, 0, NULL, &s) != 0)
        return 3;
    for (int i = 0; i < NKEYS; i++) {
        char full[64];
        uint8_t key[16];
        fajit__keylock lk;
        fake_key(i, full, sizeof full, key);
        if (fajit__store_lock_key(s, key, &lk) != 0 || fake_put(s, i) != 0)
            return 4;
        fajit__store_unlock_key(s, &lk);
    }
    fajit__store_close(s);
    alarm(120); /* a compile, whose speed is not the point: under valgrind it takes ~10 s */
    fajit_ctx *ctx = open_ctx(dir, FAJIT_CACHE_READWRITE, NULL);
    fajit_compile_result r;
    int rc = ctx ? fajit_compile(ctx, real_specs[0], &r) : -1;
    fajit_destroy(ctx);
    return rc ? 5 : 0;
}

static void check_store(const char *dir, const char *when)
{
    uint64_t checked = 0;
    fajit_ctx *ctx = open_ctx(dir, FAJIT_CACHE_READWRITE, NULL);
    CHECK(ctx != NULL, "%s: the store reopens", when);
    if (!ctx)
        return;
    uint64_t bad = verify_bad(ctx, &checked);
    CHECK(bad == 0, "%s: every one of %llu entries is valid (bad %llu)", when,
          (unsigned long long)checked, (unsigned long long)bad);
    fajit_destroy(ctx);
    pid_t pid = fork();
    if (pid == 0)
        _exit(next_writer(dir));
    int status;
    waitpid(pid, &status, 0);
    CHECK(WIFEXITED(status) && WEXITSTATUS(status) == 0,
          "%s: the next writer takes every lock and puts within 20 s, then compiles through "
          "the API (status %d, signal %d)",
          when, WIFEXITED(status) ? WEXITSTATUS(status) : -1,
          WIFSIGNALED(status) ? WTERMSIG(status) : 0);
}

int main(int argc, char **argv)
{
    int fake = argc > 1 ? atoi(argv[1]) : 300, real = argc > 2 ? atoi(argv[2]) : 24, early = 0;
    make_root("crash");
    const char *dir = sub("cache");
    srand((unsigned)time(NULL));
    time_t t0 = time(NULL);
    for (int i = 0; i < fake; i++)
        early += kill_round(dir, 1 + i % 3, 0, 1 + (i % 5 == 0 ? 40000 : 8000), (unsigned)i);
    CHECK(early == 0, "%d fake writers (1 to 3 at once) killed at random points", fake);
    check_store(dir, "after the fake writers");
    early = 0;
    for (int i = 0; i < real; i++)
        early += kill_round(dir, 1 + i % 2, 1, 400000, (unsigned)i);
    CHECK(early == 0, "%d real compile rounds killed mid-compile or mid-store", real);
    check_store(dir, "after the real writers");
    printf("     %ld s in all\n", (long)(time(NULL) - t0));
    return finish();
}
