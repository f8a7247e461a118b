/*
 * tests/test_cache_corruption.c - issue 6, scenario 3: an entry damaged on
 * disk (bit flips in the header, key, cubin or checksum; truncation; trailing
 * bytes; a wrong magic or version; another variant's entry under this key) is
 * detected, counted (stats bad_entries), recompiled and rewritten through the
 * public API, and the next ask really hits. Read-only mode serves the fresh
 * compile from memory and leaves the bad entry alone. No GPU.
 */
#include "test_cache_util.h"

#define SPEC "ref dqk=48 dv=48 dtype=fp16 mask=none arch=sm_80"
#define OTHER "ref dqk=56 dv=56 dtype=fp16 mask=none arch=sm_80"

typedef enum {
    FLIP_MAGIC, FLIP_VERSION, FLIP_META, FLIP_KEY, FLIP_CUBIN, FLIP_CHECKSUM, TRUNCATE_HEADER,
    TRUNCATE_CUBIN, TRAILING, BIG_LENGTH, OTHER_ENTRY, EMPTY, N_DAMAGE
} damage;

static const char *const damage_names[N_DAMAGE] = {
    "a flipped magic byte",      "a wrong format version",  "a flipped metadata bit",
    "a flipped full-key bit",    "a flipped cubin bit",     "a wrong checksum",
    "truncation inside the header", "truncation inside the cubin", "trailing bytes",
    "a cubin length past the end", "another variant's entry", "an empty value"};

static uint8_t other_entry[1 << 20];
static size_t other_len;

/* Damages a copy of the good entry; returns its new length. */
static size_t apply_damage(damage d, uint8_t *buf, size_t len)
{
    switch (d) {
    case FLIP_MAGIC: buf[0] ^= 0x20; return len;
    case FLIP_VERSION: buf[8] = 2; return len;
    case FLIP_META: buf[28] ^= 0x04; return len;          /* registers */
    case FLIP_KEY: buf[64 + 3] ^= 0x01; return len;       /* the full key */
    case FLIP_CUBIN: buf[len - 100] ^= 0x80; return len;  /* deep in the cubin */
    case FLIP_CHECKSUM: buf[60] ^= 0xFF; return len;
    case TRUNCATE_HEADER: return 40;
    case TRUNCATE_CUBIN: return len - 7;
    case TRAILING: memset(buf + len, 0, 5); return len + 5;
    case BIG_LENGTH: buf[48 + 7] = 0x7F; return len;      /* cubin_len huge */
    case OTHER_ENTRY: memcpy(buf, other_entry, other_len); return other_len;
    case EMPTY: return 0;
    default: return len;
    }
}

static void check_damage(const char *dir, damage d, const uint8_t key[16], const uint8_t *good,
                         size_t good_len)
{
    static uint8_t bad[(1 << 20) + 16];
    fajit_compile_result r;
    log_capture lc = {0};
    memcpy(bad, good, good_len);
    size_t bad_len = apply_damage(d, bad, good_len);
    if (raw_put(dir, key, bad, bad_len) != 0) {
        CHECK(0, "%s: written into the store with LMDB", damage_names[d]);
        return;
    }
    fajit_ctx *ctx = open_ctx(dir, FAJIT_CACHE_READWRITE, &lc);
    if (!ctx) {
        failures++;
        return;
    }
    fajit_cache_stats before = stats_of(ctx);
    int rc = fajit_compile(ctx, SPEC, &r);
    fajit_cache_stats after = stats_of(ctx);
    CHECK(rc == 0 && !r.cached, "%s: a miss, compiled again (rc %d, cached %d)", damage_names[d],
          rc, r.cached);
    CHECK(after.bad_entries == before.bad_entries + 1 && after.compiles == before.compiles + 1,
          "%s: counted as bad (%llu -> %llu) and rewritten", damage_names[d],
          (unsigned long long)before.bad_entries, (unsigned long long)after.bad_entries);
    CHECK(atomic_load(&lc.warnings) == 1, "%s: one warning: %s", damage_names[d], lc.last);
    rc = fajit_compile(ctx, SPEC, &r);
    CHECK(rc == 0 && r.cached, "%s: the next ask hits", damage_names[d]);
    fajit_destroy(ctx);

    size_t now_len = 0;
    uint8_t *now = raw_get(dir, key, &now_len);
    /* compile_us (header offset 40) and the checksum differ from run to run */
    CHECK(now && now_len == good_len && memcmp(now, good, 40) == 0 &&
              memcmp(now + 44, good + 44, 12) == 0 && memcmp(now + 64, good + 64, good_len - 64) == 0,
          "%s: the rewritten entry has the original key and cubin", damage_names[d]);
    free(now);
    ctx = open_ctx(dir, FAJIT_CACHE_READWRITE, NULL);
    CHECK(ctx && fajit_compile(ctx, SPEC, &r) == 0 && r.cached,
          "%s: a fresh process hits too", damage_names[d]);
    fajit_destroy(ctx);
}

/* Read-only: the damaged entry is a miss compiled in memory, left in place. */
static void check_read_only(const char *dir, const uint8_t key[16], const uint8_t *good,
                            size_t good_len)
{
    static uint8_t bad[1 << 20];
    fajit_compile_result r;
    log_capture lc = {0};
    memcpy(bad, good, good_len);
    bad[good_len - 1] ^= 1;
    raw_put(dir, key, bad, good_len);
    fajit_ctx *ctx = open_ctx(dir, FAJIT_CACHE_READONLY, &lc);
    CHECK(ctx && fajit_compile(ctx, SPEC, &r) == 0 && !r.cached,
          "read-only: a damaged entry is compiled in memory");
    CHECK(ctx && stats_of(ctx).bad_entries >= 1 && atomic_load(&lc.warnings) == 1,
          "read-only: counted, one warning: %s", lc.last);
    fajit_destroy(ctx);
    size_t len = 0;
    uint8_t *now = raw_get(dir, key, &len);
    CHECK(now && len == good_len && memcmp(now, bad, len) == 0,
          "read-only: the damaged entry is left in place");
    free(now);

    ctx = open_ctx(dir, FAJIT_CACHE_READWRITE, NULL);
    fajit_verify_result vr;
    CHECK(ctx && fajit_cache_verify(ctx, 1, NULL, NULL, &vr) == 0 && vr.bad == 1 && vr.removed == 1,
          "verify --fix finds it and removes it");
    CHECK(ctx && verify_bad(ctx, NULL) == 0, "the store verifies clean afterwards");
    CHECK(ctx && fajit_compile(ctx, SPEC, &r) == 0 && !r.cached &&
              fajit_compile(ctx, SPEC, &r) == 0 && r.cached,
          "and the kernel is compiled and stored again");
    fajit_destroy(ctx);
}

int main(void)
{
    fajit_compile_result r, ro;
    uint8_t key[16], okey[16];
    make_root("corrupt");
    const char *dir = sub("cache");

    fajit_ctx *ctx = open_ctx(dir, FAJIT_CACHE_READWRITE, NULL);
    if (!ctx || fajit_compile(ctx, SPEC, &r) != 0 || fajit_compile(ctx, OTHER, &ro) != 0) {
        CHECK(0, "compile the two variants");
        return finish();
    }
    fajit_destroy(ctx);
    hex_to_key(r.key_hex, key);
    hex_to_key(ro.key_hex, okey);
    size_t good_len = 0;
    uint8_t *good = raw_get(dir, key, &good_len);
    uint8_t *other = raw_get(dir, okey, &other_len);
    CHECK(good && other && good_len > 200 && other_len <= sizeof other_entry,
          "the good entries are there (%zu bytes)", good_len);
    if (!good || !other || good_len > (1 << 20) || other_len > sizeof other_entry)
        return finish();
    memcpy(other_entry, other, other_len);
    free(other);

    for (int d = 0; d < N_DAMAGE; d++)
        check_damage(dir, (damage)d, key, good, good_len);
    check_read_only(dir, key, good, good_len);
    free(good);
    return finish();
}
