/*
 * tests/test_cache_lru.c - issue 6, scenario 7: a size cap (the option
 * cache_max_bytes and FAJIT_CACHE_MAX_BYTES) kept by evicting the least
 * recently used entries; last use written at most once per process per
 * entry; several processes filling a small map and a capped store at once
 * never see MDB_CORRUPTED or any error, the map grows, and the store
 * verifies clean. No GPU.
 */
#include <sys/wait.h>
#include <xxhash.h>

#include "cache/store.h"
#include "test_cache_util.h"

#define ENTRY_BYTES 20000

static void key_of(int i, char *full, size_t cap, uint8_t key[16])
{
    XXH128_canonical_t c;
    snprintf(full, cap, "lru variant %d", i);
    XXH128_canonicalFromHash(&c, XXH3_128bits(full, strlen(full)));
    memcpy(key, c.digest, 16);
}

static int put_i(fajit__store *s, int i)
{
    static uint8_t cubin[ENTRY_BYTES];
    char full[64];
    uint8_t key[16], *entry = NULL;
    size_t len = 0;
    fajit__entry_meta meta = {80, 0, 12000, 1, 2, 3, 4};
    key_of(i, full, sizeof full, key);
    memset(cubin, i, sizeof cubin);
    int rc = fajit__entry_encode(&meta, (const uint8_t *)full, strlen(full), cubin, sizeof cubin,
                                 &entry, &len);
    if (rc == 0)
        rc = fajit__store_put(s, key, entry, len);
    free(entry);
    return rc;
}

static int get_i(fajit__store *s, int i)
{
    char full[64];
    uint8_t key[16], *entry = NULL;
    size_t len;
    key_of(i, full, sizeof full, key);
    int rc = fajit__store_get(s, key, (const uint8_t *)full, strlen(full), &entry, &len);
    free(entry);
    return rc;
}

static fajit__store *open_capped(const char *dir, uint64_t cap, uint64_t map)
{
    fajit__store_options o = {map, cap, 1, 0};
    fajit__store *s = NULL;
    if (fajit__store_open_ex(dir, FAJIT_CACHE_READWRITE, &o, NULL, &s) != 0)
        printf("     open: %s\n", fajit__detail());
    return s;
}

static void test_lru_order(void)
{
    const char *dir = sub("order");
    const uint64_t cap = 5 * (ENTRY_BYTES + 64 + 20) + 100; /* room for five entries */
    fajit__store *s = open_capped(dir, cap, 0);
    if (!s) {
        failures++;
        return;
    }
    int rc = 0;
    for (int i = 0; i < 5; i++)
        rc |= put_i(s, i);
    fajit__store_close(s);
    /* A later process uses 0 and 1; their last use is written at close. */
    s = open_capped(dir, cap, 0);
    rc |= get_i(s, 0) | get_i(s, 1) | get_i(s, 0);
    fajit__store_close(s);
    s = open_capped(dir, cap, 0);
    rc |= put_i(s, 5) | put_i(s, 6);
    CHECK(rc == 0, "five entries fill the cap, 0 and 1 used, two more put");
    CHECK(get_i(s, 0) == 0 && get_i(s, 1) == 0 && get_i(s, 5) == 0 && get_i(s, 6) == 0,
          "the recently used 0 and 1 and the new 5 and 6 stay");
    CHECK(get_i(s, 2) == FAJIT_ENOTFOUND && get_i(s, 3) == FAJIT_ENOTFOUND,
          "the least recently used 2 and 3 were evicted");
    uint64_t n = 0, bytes = 0;
    fajit__store_stats(s, &n, &bytes, NULL, NULL);
    CHECK(bytes <= cap && n == 5, "the entries' bytes (%llu) stay under the cap (%llu), %llu entries",
          (unsigned long long)bytes, (unsigned long long)cap, (unsigned long long)n);
    fajit__store_close(s);
    s = open_capped(dir, 100, 0);
    rc = put_i(s, 7);
    CHECK(rc == FAJIT_ECACHE && strstr(fajit__detail(), "larger than"),
          "an entry larger than the cap is refused: %s", fajit__detail());
    fajit__store_close(s);
}

/* Through the API: FAJIT_CACHE_MAX_BYTES and the option. */
static void test_api_cap(void)
{
    fajit_options o;
    fajit_ctx *ctx = NULL;
    fajit_compile_result r;
    const char *dir = sub("api");
    static const char *const specs[] = {"ref dqk=32 dtype=fp16 arch=sm_80",
                                        "ref dqk=40 dtype=fp16 arch=sm_80",
                                        "ref dqk=48 dtype=fp16 arch=sm_80"};
    setenv("FAJIT_CACHE_MAX_BYTES", "1", 1);
    fajit_options_init(&o);
    o.cache_dir = dir;
    o.cache_max_bytes = 60000; /* the option wins over the variable: about two entries */
    int rc = fajit_create(&ctx, &o);
    for (int i = 0; rc == 0 && i < 3; i++)
        rc = fajit_compile(ctx, specs[i], &r);
    fajit_cache_stats st = ctx ? stats_of(ctx) : (fajit_cache_stats){0};
    CHECK(rc == 0 && st.bytes <= 60000 && st.entries >= 1 && st.entries < 3,
          "option cache_max_bytes: three compiles, %llu entries, %llu bytes",
          (unsigned long long)st.entries, (unsigned long long)st.bytes);
    CHECK(ctx && fajit_compile(ctx, specs[2], &r) == 0 && r.cached, "the newest is kept");
    fajit_destroy(ctx);
    setenv("FAJIT_CACHE_MAX_BYTES", "30000", 1);
    fajit_options_init(&o);
    o.cache_dir = dir;
    rc = fajit_create(&ctx, &o);
    rc |= ctx ? fajit_compile(ctx, specs[0], &r) : -1;
    st = ctx ? stats_of(ctx) : (fajit_cache_stats){0};
    CHECK(rc == 0 && st.entries == 1 && st.bytes <= 30000,
          "FAJIT_CACHE_MAX_BYTES=30000: one entry left (%llu)", (unsigned long long)st.entries);
    fajit_destroy(ctx);
    setenv("FAJIT_CACHE_MAX_BYTES", "lots", 1);
    CHECK(fajit_create(&ctx, &o) == FAJIT_EINVAL && strstr(fajit_last_error(), "FAJIT_CACHE_MAX_BYTES"),
          "a bad FAJIT_CACHE_MAX_BYTES is refused, named");
    unsetenv("FAJIT_CACHE_MAX_BYTES");
}

/* Several processes fill at once: a tiny map that must grow, and a capped one. */
static int filler(const char *dir, uint64_t cap, int id)
{
    fajit__store *s = open_capped(dir, cap, 64 * 1024);
    if (!s)
        return 2;
    for (int i = 0; i < 60; i++) {
        int k = id * 1000 + i;
        if (put_i(s, k) != 0 || (i % 3 == 0 && get_i(s, k) != 0 && cap == 0)) {
            printf("     filler %d: %s\n", id, fajit__detail());
            return 3;
        }
        get_i(s, id * 1000 + i / 2); /* may be evicted when capped */
    }
    fajit__store_close(s);
    return 0;
}

static void test_concurrent_fill(const char *name, uint64_t cap)
{
    const char *dir = sub(name);
    pid_t pids[4];
    int ok = 0;
    fflush(stdout);
    for (int i = 0; i < 4; i++)
        if ((pids[i] = fork()) == 0)
            _exit(filler(dir, cap, i));
    for (int i = 0; i < 4; i++) {
        int status;
        waitpid(pids[i], &status, 0);
        ok += WIFEXITED(status) && WEXITSTATUS(status) == 0;
    }
    fajit__store *s = open_capped(dir, cap, 64 * 1024); /* the map size the file has wins */
    uint64_t n = 0, bytes = 0, map = 0;
    int rc = s ? fajit__store_stats(s, &n, &bytes, &map, NULL) : -1;
    fajit__store_close(s);
    CHECK(ok == 4 && rc == 0, "%s: 4 processes put 60 entries each, no error", name);
    if (cap)
        CHECK(bytes <= cap, "%s: %llu entries, %llu bytes, under the cap", name,
              (unsigned long long)n, (unsigned long long)bytes);
    else
        CHECK(n == 240 && map > 64 * 1024, "%s: all 240 entries, the map grew to %llu", name,
              (unsigned long long)map);
    fajit_ctx *ctx = open_ctx(dir, FAJIT_CACHE_READWRITE, NULL);
    uint64_t checked = 0;
    CHECK(ctx && verify_bad(ctx, &checked) == 0 && checked == n, "%s: verifies clean", name);
    fajit_destroy(ctx);
}

int main(void)
{
    make_root("lru");
    test_lru_order();
    test_api_cap();
    test_concurrent_fill("grow", 0);
    test_concurrent_fill("capped", 400000);
    return finish();
}
