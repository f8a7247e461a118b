/*
 * tests/test_cache_collision.c - issue 6, scenario 4: a forced digest
 * collision (the test hook fajit__test_hooks.force_digest gives every variant
 * the same 16-byte key) is a miss and a recompile, never the wrong kernel:
 * the entry served for each variant carries that variant's own full key and
 * text, in read-write and read-only mode. No GPU.
 */
#include "cache/hooks.h"
#include "runtime/runtime.h"
#include "test_cache_util.h"

static const char *const specs[] = {"ref dqk=64 dtype=fp16 mask=none arch=sm_80",
                                    "ref dqk=64 dtype=bf16 mask=none arch=sm_80",
                                    "ref dqk=80 dtype=fp16 mask=causal arch=sm_80"};

/* The canonical text of the variant whose entry the runtime serves for spec. */
static int served_variant(fajit_ctx *ctx, const char *spec, char *asked, char *served,
                          int *cached)
{
    fajit__variant v, got;
    fajit__entry_view view;
    uint8_t *entry = NULL;
    size_t len = 0;
    int rc = fajit__spec_parse(spec, &v);
    if (rc == 0)
        rc = fajit__complete_spec(ctx, &v);
    if (rc == 0)
        rc = fajit__variant_format(&v, asked, FAJIT__VARIANT_TEXT_MAX) < 0;
    if (rc == 0)
        rc = fajit__kernel_entry(ctx, &v, &entry, &len, cached);
    if (rc == 0)
        rc = fajit__entry_decode(entry, len, &view, NULL);
    if (rc == 0)
        rc = view.full_key_len <= 16 ||
             fajit__variant_deserialize(view.full_key, view.full_key_len - 16, &got) != 0 ||
             fajit__variant_format(&got, served, FAJIT__VARIANT_TEXT_MAX) < 0;
    free(entry);
    return rc;
}

/* Read-write: every ask displaces the other variant, so each is a miss.
 * Read-only: nothing is displaced, so only the stored variant may hit. */
static void round_of_asks(fajit_ctx *ctx, const char *mode, int read_write)
{
    int expect_cached_second = read_write;
    char asked[FAJIT__VARIANT_TEXT_MAX], served[FAJIT__VARIANT_TEXT_MAX];
    int cached = 0;
    for (int round = 0; round < 2; round++) {
        for (int i = 0; i < 3; i++) {
            int rc = served_variant(ctx, specs[i], asked, served, &cached);
            CHECK(rc == 0 && strcmp(asked, served) == 0 && (!cached || (!read_write && i == 0)),
                  "%s, round %d: '%s' gets its own kernel (cached %d: a hit only if it is the one stored)", mode,
                  round, specs[i], cached);
        }
    }
    /* The same variant twice in a row: the second ask hits (read-write). */
    const char *again = specs[read_write ? 0 : 1]; /* read-only: one not stored */
    int rc = served_variant(ctx, again, asked, served, &cached);
    rc |= served_variant(ctx, again, asked, served, &cached);
    CHECK(rc == 0 && strcmp(asked, served) == 0 && cached == expect_cached_second,
          "%s: asking the same variant again %s", mode,
          expect_cached_second ? "hits" : "compiles again in memory");
}

int main(void)
{
    fajit_entry_info e;
    make_root("collide");
    const char *dir = sub("cache");
    fajit__test_hooks.force_digest = 1;
    memset(fajit__test_hooks.digest, 0xC5, 16);

    log_capture lc = {0};
    fajit_ctx *ctx = open_ctx(dir, FAJIT_CACHE_READWRITE, &lc);
    if (!ctx)
        return finish();
    round_of_asks(ctx, "read-write", 1);
    fajit_cache_stats st = stats_of(ctx);
    CHECK(st.entries == 1 && st.bad_entries >= 5,
          "one slot shared by the colliding variants; each displacement counted as bad (%llu)",
          (unsigned long long)st.bad_entries);
    CHECK(strstr(lc.last, "stored full key differs") != NULL,
          "the collision is logged: %s", lc.last);
    CHECK(fajit_cache_find(ctx, "c5c5c5c5c5c5c5c5c5c5c5c5c5c5c5c5", &e) == 0 && !e.valid &&
              strstr(e.problem, "not its digest"),
          "verify and find see the forced slot as an entry not under its digest: %s",
          e.problem);
    fajit_destroy(ctx);

    ctx = open_ctx(dir, FAJIT_CACHE_READONLY, NULL);
    if (ctx)
        round_of_asks(ctx, "read-only", 0);
    fajit_destroy(ctx);

    fajit__test_hooks.force_digest = 0;
    ctx = open_ctx(dir, FAJIT_CACHE_READWRITE, NULL);
    fajit_compile_result r;
    CHECK(ctx && fajit_compile(ctx, specs[0], &r) == 0 && !r.cached &&
              strcmp(r.key_hex, "c5c5c5c5c5c5c5c5c5c5c5c5c5c5c5c5") != 0,
          "without the hook the variant has its own key (a miss)");
    fajit_destroy(ctx);
    return finish();
}
