/*
 * tests/test_tune.c - the autotuning infrastructure without a GPU: tuning
 * records in the store (round trip, key independence, checksum), the
 * best-of lookup and its memo, candidate enumeration and pruning (a few
 * survivors compiled for sm_90 with no spills), the shape-aware heuristic
 * (decode's few-rows tile) and the tuner's baseline and record keys agreeing
 * with it, the problem manifest parser, export/import carrying records, and
 * `fajit tune` / `fajit ls --tuning`.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#include "runtime/flash_bwd.h"
#include "runtime/tune.h"

static int failures;

#define CHECK(cond, ...)                                                                        \
    do {                                                                                        \
        int ok_ = !!(cond);                                                                     \
        printf("%s: ", ok_ ? "ok  " : "FAIL");                                                  \
        printf(__VA_ARGS__);                                                                    \
        printf("\n");                                                                           \
        if (!ok_) {                                                                             \
            printf("      (%s) detail: %s\n", #cond, fajit_last_error());                       \
            failures++;                                                                         \
        }                                                                                       \
    } while (0)

static const char *cache_dir(const char *leaf, char *buf, size_t cap)
{
    snprintf(buf, cap, "%s/test-cache/test_tune/%s", FAJIT_BINARY_DIR, leaf);
    char cmd[1200];
    snprintf(cmd, sizeof cmd, "rm -rf '%s'", buf);
    if (system(cmd) != 0)
        printf("warning: %s failed\n", cmd);
    return buf;
}

static fajit_ctx *open_ctx(const char *dir)
{
    fajit_options o;
    fajit_ctx *ctx = NULL;
    fajit_options_init(&o);
    o.cache_dir = dir;
    o.cache_mode = FAJIT_CACHE_READWRITE;
    if (fajit_create(&ctx, &o) != 0) {
        printf("FAIL: fajit_create(%s): %s\n", dir, fajit_last_error());
        exit(1);
    }
    return ctx;
}

static fajit__gpu_identity gpu_a(void)
{
    fajit__gpu_identity g;
    memset(&g, 0, sizeof g);
    snprintf(g.name, sizeof g.name, "NVIDIA H100 80GB HBM3");
    g.arch = 90;
    g.sm_count = 132;
    g.driver_version = 12040;
    return g;
}

static fajit__variant fwd_variant(int d, int bm, int bn, int warps, int stages)
{
    fajit__variant v;
    fajit__variant_defaults(&v);
    v.op = FAJIT__OP_FWD;
    v.dqk = v.dv = d;
    v.bm = bm;
    v.bn = bn;
    v.warps = warps;
    v.stages = stages;
    v.arch = 90;
    v.arch_suffix = 0;
    return v;
}

/* A record of candidate v with split count `splits` under plan_splits and
 * the few-rows class few_rows. */
static int put_class_record(fajit_ctx *ctx, const fajit__gpu_identity *g, const uint8_t build[16],
                            const fajit__variant *v, int splits, int bucket, int plan_splits,
                            int few_rows, uint64_t ns)
{
    uint8_t key[FAJIT__TUNING_KEY_MAX];
    const fajit__tune_choice c = {*v, splits};
    size_t n = fajit__tuning_key(g, build, &c, bucket, plan_splits, few_rows, 1, key, sizeof key);
    fajit__tuning_value tv = {ns, 1700000000000000000ull, 10};
    return fajit__store_tuning_put(ctx->store, key, n, &tv);
}

/* A record of a problem with full blocks (prefill) under plan_splits. */
static int put_split_record(fajit_ctx *ctx, const fajit__gpu_identity *g, const uint8_t build[16],
                            const fajit__variant *v, int splits, int bucket, int plan_splits,
                            uint64_t ns)
{
    return put_class_record(ctx, g, build, v, splits, bucket, plan_splits, 0, ns);
}

/* A record where split-KV does not apply (the rule decides). */
static int put_record(fajit_ctx *ctx, const fajit__gpu_identity *g, const uint8_t build[16],
                      const fajit__variant *v, int bucket, uint64_t ns)
{
    return put_split_record(ctx, g, build, v, 0, bucket, 0, ns);
}

static int count_cb(void *user, const uint8_t *k, size_t kl, const uint8_t *v, size_t vl)
{
    (void)k, (void)kl, (void)v, (void)vl;
    ++*(int *)user;
    return 0;
}

typedef struct seen_split {
    int n, best_splits, best_warps, plan, few_rows;
} seen_split;

static int seen_split_cb(void *user, const fajit_tuning_record *r)
{
    seen_split *s = user;
    s->n++;
    s->plan = r->plan_splits;
    s->few_rows += r->few_rows;
    if (r->best) {
        s->best_splits = r->splits;
        s->best_warps = r->warps;
    }
    return 0;
}

static void test_records(void)
{
    char dir[1024];
    fajit_ctx *ctx = open_ctx(cache_dir("records", dir, sizeof dir));
    fajit__gpu_identity g = gpu_a(), g2 = gpu_a();
    uint8_t key[FAJIT__TUNING_KEY_MAX], other_build[16];
    fajit__variant v = fwd_variant(128, 128, 64, 8, 2);
    fajit__tune_choice back, vc = {v, 0};
    fajit__tuning_value tv = {123456, 42, 10}, got;
    size_t n = fajit__tuning_key(&g, ctx->build_id, &vc, 12, 0, 0, 1, key, sizeof key);
    CHECK(n <= FAJIT__TUNING_KEY_MAX, "record key is %zu bytes (limit %d)", n,
          FAJIT__TUNING_KEY_MAX);
    CHECK(fajit__store_tuning_put(ctx->store, key, n, &tv) == 0, "put a record");
    CHECK(fajit__store_tuning_get(ctx->store, key, n, &got) == 0 && got.median_ns == 123456 &&
              got.timestamp_ns == 42 && got.samples == 10,
          "get returns what was put");
    fajit__gpu_identity dg;
    uint8_t db[16];
    int bucket = 0, plan = -1, few = -1;
    CHECK(fajit__tuning_key_decode(key, n, &dg, db, &back, &bucket, &plan, &few) == 0 &&
              memcmp(&back.v, &v, sizeof v) == 0 && back.splits == 0 && bucket == 12 &&
              plan == 0 && few == 0 && dg.sm_count == 132 && strcmp(dg.name, g.name) == 0 &&
              memcmp(db, ctx->build_id, 16) == 0,
          "key decodes to GPU, build, variant with tiles, bucket and no split count");
    {
        uint8_t sk[FAJIT__TUNING_KEY_MAX];
        const fajit__tune_choice sc = {v, 16};
        size_t sn = fajit__tuning_key(&g, ctx->build_id, &sc, 16, 31, 1, 1, sk, sizeof sk);
        CHECK(sn == n && fajit__tuning_key_decode(sk, sn, &dg, db, &back, &bucket, &plan, &few) == 0 &&
                  back.splits == 16 && plan == 31 && bucket == 16 && few == 1 &&
                  memcmp(&back.v, &v, sizeof v) == 0,
              "a split-KV record of a few-rows problem round-trips: splits 16 under the rule's 31");
        for (uint8_t old = 1; old <= 2; old++) { /* before split counts; before few_rows */
            sk[3] = old;
            CHECK(fajit__tuning_key_decode(sk, sn, &dg, db, &back, &bucket, &plan, &few) == FAJIT_ECORRUPT,
                  "a key of format version %d is refused, not misread: %s", old, fajit_last_error());
        }
    }

    /* Independence: another GPU, bucket, build or candidate is another record. */
    g2.sm_count = 114;
    memcpy(other_build, ctx->build_id, 16);
    other_build[0] ^= 1;
    fajit__variant v2 = fwd_variant(128, 64, 64, 4, 2);
    CHECK(put_record(ctx, &g2, ctx->build_id, &v, 12, 1) == 0 &&
              put_record(ctx, &g, ctx->build_id, &v, 13, 2) == 0 &&
              put_record(ctx, &g, other_build, &v, 12, 3) == 0 &&
              put_record(ctx, &g, ctx->build_id, &v2, 12, 4) == 0,
          "records for another GPU, bucket, build and candidate");
    CHECK(fajit__store_tuning_get(ctx->store, key, n, &got) == 0 && got.median_ns == 123456,
          "the first record is untouched by the others");
    int all = 0, group = 0;
    uint8_t prefix[FAJIT__TUNING_KEY_MAX];
    size_t pn = fajit__tuning_key(&g, ctx->build_id, &vc, 12, 0, 0, 0, prefix, sizeof prefix);
    fajit__store_tuning_iterate(ctx->store, NULL, 0, count_cb, &all);
    fajit__store_tuning_iterate(ctx->store, prefix, pn, count_cb, &group);
    CHECK(all == 5 && group == 2, "iterate: 5 records in all, 2 under one problem's prefix "
          "(got %d, %d)", all, group);

    /* A value under the wrong key fails its checksum. */
    uint8_t enc[FAJIT__TUNING_VALUE_LEN];
    fajit__tuning_value_encode(key, n, &tv, enc);
    key[n - 1] ^= 1;
    CHECK(fajit__tuning_value_decode(key, n, enc, sizeof enc, NULL, NULL) == FAJIT_ECORRUPT,
          "a value moved to another key is refused");
    key[n - 1] ^= 1;
    enc[9] ^= 4;
    CHECK(fajit__tuning_value_decode(key, n, enc, sizeof enc, NULL, NULL) == FAJIT_ECORRUPT,
          "a flipped bit is refused");

    /* Best of: the lowest median wins; the memo answers after the first lookup. */
    fajit__variant asked = fwd_variant(128, FAJIT__UNSET, FAJIT__UNSET, FAJIT__UNSET,
                                       FAJIT__UNSET);
    fajit__tune_choice out;
    fajit__tuned_forget();
    CHECK(fajit__tuned_tiles(ctx, &asked, 12, 0, 0, &g, &out) == 0 && out.v.bm == 64 &&
              out.v.warps == 4 && out.splits == 0,
          "tuned tiles: the candidate with the lowest median (bm=%d warps=%d)", out.v.bm,
          out.v.warps);
    CHECK(fajit__tuned_tiles(ctx, &asked, 14, 0, 0, &g, &out) == FAJIT_ENOTFOUND,
          "tuned tiles: nothing for an untuned bucket");
    CHECK(fajit__tuned_tiles(ctx, &asked, 12, 7, 0, &g, &out) == FAJIT_ENOTFOUND,
          "tuned tiles: nothing for another rule's split count");
    CHECK(put_record(ctx, &g, ctx->build_id, &v, 12, 0) == 0 &&
              fajit__tuned_tiles(ctx, &asked, 12, 0, 0, &g, &out) == 0 && out.v.bm == 64,
          "the memo answers without reading the store again");
    fajit__tuned_forget();
    CHECK(fajit__tuned_tiles(ctx, &asked, 12, 0, 0, &g, &out) == 0 && out.v.bm == 128,
          "after forgetting, the new best is found");
    {   /* a record of an older format version is ignored */
        uint8_t old_key[FAJIT__TUNING_KEY_MAX];
        const fajit__tune_choice oc = {fwd_variant(128, 64, 32, 4, 1), 0};
        size_t on = fajit__tuning_key(&g, ctx->build_id, &oc, 12, 0, 0, 1, old_key, sizeof old_key);
        fajit__tuning_value fast = {1, 42, 10};
        old_key[3] = 2;
        fajit__tuned_forget();
        CHECK(fajit__store_tuning_put(ctx->store, old_key, on, &fast) == 0 &&
                  fajit__tuned_tiles(ctx, &asked, 12, 0, 0, &g, &out) == 0 && out.v.bm == 128,
              "a faster record under a version-2 key is ignored (bm=%d)", out.v.bm);
        fajit__store_tuning_del(ctx->store, old_key, on, NULL);
    }

    uint64_t removed = 0;
    CHECK(fajit__store_tuning_del(ctx->store, prefix, pn, &removed) == 0 && removed == 2,
          "delete by prefix removes that problem's records (%llu)", (unsigned long long)removed);
    fajit_destroy(ctx);
}

/* A driver that knows one device: the H100 of gpu_a(). Only what the GPU
 * identity reads is there; anything else would crash the test, loudly. */
static CUresult fake_name(char *name, int len, CUdevice dev)
{
    (void)dev;
    snprintf(name, (size_t)len, "NVIDIA H100 80GB HBM3");
    return CUDA_SUCCESS;
}

static CUresult fake_attribute(int *out, CUdevice_attribute a, CUdevice dev)
{
    (void)dev;
    *out = a == CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR   ? 9
           : a == CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR ? 0
           : a == CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT     ? 132
                                                               : 0;
    return CUDA_SUCCESS;
}

/* The launch path's choice (fajit__launch_tiles): tuned tiles when a record
 * beats the heuristic's clearly, the heuristic's otherwise, and a fresh
 * answer once records change. */
static void test_launch_tiles(void)
{
    char dir[1024];
    fajit_ctx *ctx = open_ctx(cache_dir("launch", dir, sizeof dir));
    fajit__gpu_identity g = gpu_a();
    fajit__driver drv;
    const CUdevice dev = FAJIT__MAX_DEVICES - 1; /* a slot no real device of this test uses */
    fajit__variant heur = fwd_variant(96, FAJIT__UNSET, FAJIT__UNSET, FAJIT__UNSET, FAJIT__UNSET);
    memset(&drv, 0, sizeof drv);
    drv.deviceGetName = fake_name;
    drv.deviceGetAttribute = fake_attribute;
    drv.version = g.driver_version;
    fajit__heuristic_tiles(&heur);
    fajit__variant other = heur, v = heur;
    other.bm = heur.bm == 64 ? 128 : 64; /* a candidate tuning could pick, not the heuristic's */
    other.warps = other.bm / 16;
    other.stages = 1;
    CHECK(fajit__tune_static_refusal(&other, dir, sizeof dir) == NULL,
          "the other candidate bm=%d bn=%d warps=%d stages=%d is one tuning tries", other.bm,
          other.bn, other.warps, other.stages);

    fajit__tuned_forget();
    CHECK(fajit__launch_tiles(ctx, &drv, dev, 2048, 0, 0, &v, NULL) == 0 &&
              memcmp(&v, &heur, sizeof v) == 0,
          "no record: the heuristic's tiles (bm=%d bn=%d warps=%d stages=%d)", v.bm, v.bn,
          v.warps, v.stages);
    CHECK(put_record(ctx, &g, ctx->build_id, &heur, fajit__seqlen_bucket(2048), 1000) == 0 &&
              put_record(ctx, &g, ctx->build_id, &other, fajit__seqlen_bucket(2048), 990) == 0,
          "records: heuristic 1000 ns, other 990 ns");
    fajit__tuned_forget(); /* what tuning does after storing */
    v = heur;
    CHECK(fajit__launch_tiles(ctx, &drv, dev, 2048, 0, 0, &v, NULL) == 1 && memcmp(&v, &heur, sizeof v) == 0,
          "a 1%% win does not leave the heuristic's tiles (bm=%d)", v.bm);
    CHECK(put_record(ctx, &g, ctx->build_id, &other, fajit__seqlen_bucket(2048), 900) == 0,
          "record: other 900 ns");
    fajit__tuned_forget();
    v = heur;
    CHECK(fajit__launch_tiles(ctx, &drv, dev, 2048, 0, 0, &v, NULL) == 1 && v.bm == other.bm &&
              v.warps == other.warps && v.stages == other.stages,
          "a 10%% win takes the tuned tiles (bm=%d warps=%d stages=%d)", v.bm, v.warps,
          v.stages);
    v = heur;
    CHECK(fajit__launch_tiles(ctx, &drv, dev, 2048, 0, 0, &v, NULL) == 1 && v.bm == other.bm,
          "the repeat of the last lookup answers the same");
    setenv("FAJIT_TUNED_TILES", "0", 1);
    fajit_ctx *off = open_ctx(dir);
    unsetenv("FAJIT_TUNED_TILES");
    v = heur;
    CHECK(fajit__launch_tiles(off, &drv, dev, 2048, 0, 0, &v, NULL) == 0 && memcmp(&v, &heur, sizeof v) == 0,
          "FAJIT_TUNED_TILES=0: the heuristic's tiles despite the record");
    fajit_destroy(off);
    v = heur;
    CHECK(fajit__launch_tiles(ctx, &drv, dev, 64 * 1024, 0, 0, &v, NULL) == 0 && v.bm == heur.bm,
          "another length bucket was not tuned: the heuristic's");
    v = heur;
    v.mask = FAJIT_MASK_CAUSAL;
    fajit__variant causal = v;
    CHECK(fajit__launch_tiles(ctx, &drv, dev, 2048, 0, 0, &v, NULL) == 0 && memcmp(&v, &causal, sizeof v) == 0,
          "another variant (causal) was not tuned: the heuristic's");
    CHECK(fajit_tuning_clear(ctx) == 0, "clear the tuning records");
    v = heur;
    CHECK(fajit__launch_tiles(ctx, &drv, dev, 2048, 0, 0, &v, NULL) == 0 && v.bm == heur.bm,
          "after clearing, the heuristic's again (the per-thread memo saw the change)");
    fajit__variant ref = heur;
    ref.op = FAJIT__OP_REF;
    v = ref;
    CHECK(fajit__launch_tiles(ctx, &drv, dev, 2048, 0, 0, &v, NULL) == 0 && memcmp(&v, &ref, sizeof v) == 0,
          "the reference op is never tuned");
    fajit_destroy(ctx);
}

static fajit__driver fake_driver(void)
{
    fajit__driver drv;
    memset(&drv, 0, sizeof drv);
    drv.deviceGetName = fake_name;
    drv.deviceGetAttribute = fake_attribute;
    drv.version = gpu_a().driver_version;
    return drv;
}

/* The split-KV plan: the rule splits decode rows over long keys on an H100
 * (132 SMs), never a training shape; a tuned count is taken as measured,
 * bounded by the key tiles. */
static void test_split_plan(void)
{
    fajit__variant h = fwd_variant(128, FAJIT__UNSET, FAJIT__UNSET, FAJIT__UNSET, FAJIT__UNSET);
    fajit__heuristic_tiles(&h);
    const fajit__fwd_shape decode = {1, 1, 65536, 32, 8}, train = {4, 4096, 4096, 16, 16},
                           short_keys = {1, 1, 256, 32, 8};
    int plan = fajit__plan_splits(&h, &decode, 132);
    fajit__split_plan s = fajit__plan_split(&h, &decode, 132, 0, -1);
    CHECK(plan > 1 && s.splits == plan && s.pack == 4 && s.max_splits > 0,
          "decode 1x64k, 32/8 heads: the rule splits %d ways, 4 query heads a block", plan);
    CHECK(fajit__plan_splits(&h, &train, 132) == 0 && fajit__plan_splits(&h, &short_keys, 132) == 0 &&
              fajit__plan_splits(&h, &decode, 0) == 0,
          "no split for a training shape, 256 keys, or an unknown SM count");
    fajit__variant bwd = h;
    bwd.op = FAJIT__OP_BWD;
    CHECK(fajit__plan_splits(&bwd, &decode, 132) == 0, "no split for the backward");
    s = fajit__plan_split(&h, &decode, 132, 4, -1);
    CHECK(s.splits == 4 && s.pack == 4, "a tuned count of 4 is taken");
    const fajit__fwd_shape few = {1, 1, 300, 32, 8};
    s = fajit__plan_split(&h, &few, 132, 32, -1);
    CHECK(s.splits == (300 + h.bn - 1) / h.bn, "a tuned 32 is bounded by the %d key tiles of 300 keys",
          s.splits);

    int counts[8];
    size_t n = fajit__tune_split_counts(&h, 65536, plan, counts, 8), has_plan = 0, ok = n >= 6;
    for (size_t i = 0; i < n; i++) {
        has_plan |= counts[i] == plan;
        ok &= counts[i] >= 1 && counts[i] <= FAJIT__MAX_SPLITS;
    }
    CHECK(ok && has_plan && n == (plan == 1 || plan == 2 || plan == 4 || plan == 8 || plan == 16 ||
                                  plan == 32 ? 6u : 7u),
          "split candidates: 1..32 and the rule's %d (%zu counts)", plan, n);
    fajit__variant wide = h;
    wide.bn = 128;
    n = fajit__tune_split_counts(&wide, 1000, 3, counts, 8);
    CHECK(n == 5 && counts[0] == 1 && counts[3] == 8 && counts[4] == 3,
          "1000 keys in tiles of 128: 1, 2, 4, 8 and the rule's 3 (%zu counts)", n);
    n = fajit__tune_split_counts(&h, 65536, 0, counts, 8);
    CHECK(n == 1 && counts[0] == 0, "no split-KV: the single count 0, the rule's");
}

/* Persistent forward kernels (fajit__fwd_persistent: d256 unmasked takes bm
 * 128, 8 warps, 2 stages on sm_90) launched neither split nor packed: the
 * grid is one block an SM (192 KB each) unless there are fewer items, a
 * block an item when asked (persist 0) or no SM count is known, at most N
 * when asked; a decode shape still splits (and is then not persistent). */
static void test_persistent_plan(void)
{
    fajit__variant v = fwd_variant(256, FAJIT__UNSET, FAJIT__UNSET, FAJIT__UNSET, FAJIT__UNSET);
    fajit__heuristic_tiles(&v);
    fajit__variant causal = v, d64 = fwd_variant(64, FAJIT__UNSET, FAJIT__UNSET, FAJIT__UNSET, FAJIT__UNSET);
    causal.mask = FAJIT_MASK_CAUSAL;
    fajit__heuristic_tiles(&d64);
    CHECK(fajit__fwd_persistent(&v) && v.bm == 128 && v.warps == 8 && v.stages == 2,
          "d256 unmasked sm_90 (bm=%d warps=%d stages=%d) runs persistent blocks", v.bm, v.warps, v.stages);
    CHECK(!fajit__fwd_persistent(&causal) && !fajit__fwd_persistent(&d64),
          "causal d256 and d64 (two tiles a warp) do not");
    const fajit__fwd_shape train = {16, 1024, 1024, 8, 8}, small = {1, 200, 128, 2, 2},
                           decode = {1, 1, 65536, 32, 8};
    fajit__split_plan s = fajit__plan_split(&v, &train, 132, 0, -1);
    CHECK(s.splits == 1 && s.pack == 1 && s.blocks == 132 && s.grid_x * s.grid_y * 16 == 1024,
          "1024 items on 132 SMs: %u blocks", s.blocks);
    s = fajit__plan_split(&v, &small, 132, 0, -1);
    CHECK(s.blocks == 4, "4 items: 4 blocks (%u)", s.blocks);
    s = fajit__plan_split(&v, &train, 132, 0, 0);
    CHECK(s.blocks == 1024, "persist 0: a block an item (%u)", s.blocks);
    s = fajit__plan_split(&v, &train, 0, 0, -1);
    CHECK(s.blocks == 1024, "no SM count: a block an item (%u)", s.blocks);
    s = fajit__plan_split(&v, &train, 132, 0, 5);
    CHECK(s.blocks == 5, "persist 5: 5 blocks (%u)", s.blocks);
    s = fajit__plan_split(&v, &decode, 132, 0, -1);
    CHECK(s.splits > 1 && s.pack == 4 && s.blocks == 0,
          "decode with this tile: split %d ways, packed, not persistent (%u)", s.splits, s.blocks);
}

static int same_tiles(const fajit__variant *a, const fajit__variant *b)
{
    return memcmp(a, b, sizeof *a) == 0;
}

/* The shape-aware heuristic (fajit__heuristic_tiles_for): a decode step of
 * few query rows a block takes the few-rows rule's key-split tile (bm 16, 4
 * warps splitting each key tile); prefill,
 * no shape, and every variant the rule does not cover take exactly
 * fajit__heuristic_tiles' tiles. */
static void test_few_rows_rule(void)
{
    const fajit__fwd_shape decode = {1, 1, 65536, 32, 8}, prefill = {1, 1024, 1024, 32, 8};
    fajit__variant base = fwd_variant(128, FAJIT__UNSET, FAJIT__UNSET, FAJIT__UNSET, FAJIT__UNSET);
    base.dtype = FAJIT_DTYPE_BF16;
    fajit__variant heur = base, v = base;
    fajit__heuristic_tiles(&heur);
    int few = fajit__heuristic_tiles_for(&v, &decode);
    CHECK(few == 1 && v.bm == 16 && v.bn == 128 && v.warps == 4 && v.stages == 2 && fajit__fwd_key_warps(&v) == 4,
          "decode (seqlen_q 1, 32/8 heads, d128 bf16, sm_90): bm=%d bn=%d warps=%d stages=%d "
          "(prefill's: bm=%d bn=%d warps=%d)", v.bm, v.bn, v.warps, v.stages, heur.bm, heur.bn, heur.warps);
    fajit__split_plan s = fajit__plan_split(&v, &decode, 132, 0, -1);
    CHECK(s.pack == 4 && s.grid_y == 8, "the decode tile packs the 4 query heads of a kv head (pack %d)",
          s.pack);
    fajit__variant back = base;
    fajit__few_rows_tiles(&back);
    CHECK(same_tiles(&back, &v), "fajit__few_rows_tiles (a record's few_rows) rebuilds the same tile");
    v = base;
    few = fajit__heuristic_tiles_for(&v, &prefill);
    CHECK(few == 0 && same_tiles(&v, &heur), "prefill (seqlen_q 1024): fajit__heuristic_tiles' tile");
    v = base;
    few = fajit__heuristic_tiles_for(&v, NULL);
    CHECK(few == 0 && same_tiles(&v, &heur), "no shape: fajit__heuristic_tiles' tile");

    /* Which shapes have few rows a block: packed groups up to 16, unpacked
     * seqlen_q up to 16 (a group too big for the block is not packed). */
    static const struct {
        fajit__fwd_shape sh;
        int few;
        const char *what;
    } shapes[] = {
        {{1, 1, 4096, 32, 32}, 1, "MHA decode: 1 row a block"},
        {{8, 1, 4096, 64, 4}, 1, "decode, group 16"},
        {{1, 1, 4096, 64, 2}, 0, "decode, group 32: 32 rows a block"},
        {{1, 1, 4096, 256, 1}, 1, "decode, group 256 > bm: not packed, 1 row a block"},
        {{1, 16, 4096, 32, 8}, 1, "seqlen_q 16 (not packed)"},
        {{1, 17, 4096, 32, 8}, 0, "seqlen_q 17"},
        {{2, 4096, 4096, 16, 16}, 0, "training"},
    };
    for (size_t i = 0; i < sizeof shapes / sizeof shapes[0]; i++) {
        v = base;
        few = fajit__heuristic_tiles_for(&v, &shapes[i].sh);
        CHECK(few == shapes[i].few && (few ? v.bm == 16 && v.warps == 4 && v.bn == 128 : same_tiles(&v, &heur)),
              "%s: %s (bm=%d bn=%d warps=%d)", shapes[i].what, few ? "few rows" : "the usual tile", v.bm,
              v.bn, v.warps);
    }

    /* Variants the rule does not cover, for any shape, and every variant
     * without a shape or at prefill: exactly fajit__heuristic_tiles'. */
    static const int archs[] = {80, 86, 89, 90, 100, 120};
    int same = 1, covered = 0, ok_cover = 1, n = 0;
    for (int d = 8; d <= 256; d += 8)
        for (size_t a = 0; a < sizeof archs / sizeof archs[0]; a++)
            for (int f = 0; f < 16; f++)
                for (int mask = 0; mask < 3; mask++) {
                    fajit__variant w = fwd_variant(d, FAJIT__UNSET, FAJIT__UNSET, FAJIT__UNSET, FAJIT__UNSET);
                    w.arch = archs[a];
                    w.mask = mask;
                    w.dropout = f & 1;
                    w.softcap = (f >> 1) & 1;
                    w.alibi = (f >> 2) & 1;
                    w.varlen = (f >> 3) & 1;
                    if (d == 160)
                        w.dv = 128; /* unequal head dims */
                    fajit__variant h = w, x = w, y = w, z = w;
                    fajit__heuristic_tiles(&h);
                    same &= fajit__heuristic_tiles_for(&x, NULL) == 0 && same_tiles(&x, &h);
                    same &= fajit__heuristic_tiles_for(&y, &prefill) == 0 && same_tiles(&y, &h);
                    const int takes = fajit__heuristic_tiles_for(&z, &decode);
                    const int covers =
                        w.dqk == w.dv && d >= 64 && d <= 128 && !w.dropout && !w.softcap && !w.alibi;
                    ok_cover &= takes == covers && (takes ? z.warps == 4 && z.bm == 16 &&
                                                                fajit__variant_smem_bytes(&z) <=
                                                                    fajit__arch_smem_limit(w.arch)
                                                          : same_tiles(&z, &h));
                    covered += takes;
                    n++;
                }
    CHECK(same, "%d variants: no shape or prefill gives fajit__heuristic_tiles' tiles", n);
    CHECK(ok_cover, "decode: the few-rows tile for d 64..128 without dropout, softcap or ALiBi (%d of %d), "
          "fitting the arch's shared memory; the usual tile for the rest", covered, n);

    v = base;
    v.arch = 86; /* 99 KB: two stages of 128 keys do not fit */
    few = fajit__heuristic_tiles_for(&v, &decode);
    CHECK(few == 1 && v.warps == 4 && v.bm == 16 && v.bn == 64 && v.stages == 2,
          "sm_86 decode: narrower key tiles first, as fwd_tiles (bn=%d stages=%d)", v.bn, v.stages);
    v = base;
    v.stages = 1;
    few = fajit__heuristic_tiles_for(&v, &decode);
    CHECK(few == 1 && v.stages == 1 && v.warps == 4 && v.bn == 128, "a tile field the caller set is kept");
    v = base;
    v.bm = 128;
    few = fajit__heuristic_tiles_for(&v, &decode);
    CHECK(few == 1 && v.bm == 128 && v.warps == 8 && fajit__fwd_key_warps(&v) == 1,
          "a caller's bm 128 takes a 16-row tile a warp (8 warps), not 4 warps of two tiles (warps=%d)", v.warps);
}

/* The tuner's heuristic config is what fajit_attn_fwd launches for the
 * problem's shape, and records are keyed by the few-rows answer: the launch
 * path prefers the few-rows tile for a decode call and never reads a
 * decode problem's records for a prefill call of the same bucket. */
static void test_few_rows_tuning(void)
{
    char dir[1024];
    fajit__tune_problem *p = NULL;
    size_t n = 0;
    int rc = fajit__tune_parse_problems(
        "fwd dqk=128 dtype=bf16 seqlen_q=1 seqlen_k=65536 nheads_q=32 nheads_kv=8\n"
        "fwd dqk=128 dtype=bf16 batch=2 seqlen=1024 nheads=32\n",
        &p, &n);
    CHECK(rc == 0 && n == 2, "a decode and a prefill problem of one variant parse");
    if (rc != 0 || n != 2) {
        free(p);
        return;
    }
    const fajit__fwd_shape decode = {1, 1, 65536, 32, 8};
    fajit__variant want, got, pre, pre_want;
    p[0].v.arch = p[1].v.arch = 90; /* as fajit_tune sets them */
    p[0].v.arch_suffix = p[1].v.arch_suffix = 0;
    want = p[0].v;
    const int want_few = fajit__heuristic_tiles_for(&want, &decode);
    const int few = fajit__tune_heuristic(&p[0], &got);
    CHECK(few == 1 && want_few == 1 && same_tiles(&got, &want) && got.warps == 4 && got.bm == 16 && got.bn == 128,
          "decode problem: the tuner's heuristic config is the shape-aware choice (bm=%d bn=%d warps=%d "
          "stages=%d)", got.bm, got.bn, got.warps, got.stages);
    pre_want = p[1].v;
    fajit__heuristic_tiles(&pre_want);
    CHECK(fajit__tune_heuristic(&p[1], &pre) == 0 && same_tiles(&pre, &pre_want),
          "prefill problem of the same variant: fajit__heuristic_tiles' config (warps=%d bn=%d)", pre.warps,
          pre.bn);

    /* Records as `fajit tune` leaves them for the decode problem: its
     * heuristic config and the prefill tile 2% faster. */
    fajit_ctx *ctx = open_ctx(cache_dir("few_rows", dir, sizeof dir));
    fajit__gpu_identity g = gpu_a();
    fajit__driver drv = fake_driver();
    const CUdevice dev = FAJIT__MAX_DEVICES - 1;
    const int plan = fajit__plan_splits(&got, &decode, 132), bucket = fajit__seqlen_bucket(65536);
    fajit__variant prefill_tile = got, v;
    prefill_tile.bm = pre.bm;
    prefill_tile.bn = pre.bn;
    prefill_tile.warps = pre.warps;
    prefill_tile.stages = pre.stages;
    int splits = -1;
    CHECK(plan > 0 && put_class_record(ctx, &g, ctx->build_id, &got, plan, bucket, plan, 1, 1000) == 0 &&
              put_class_record(ctx, &g, ctx->build_id, &prefill_tile, plan, bucket, plan, 1, 980) == 0,
          "decode records (rule's %d splits): the few-rows heuristic 1000 ns, the prefill tile 980 ns", plan);
    fajit__tuned_forget();
    v = got;
    CHECK(fajit__launch_tiles(ctx, &drv, dev, 65536, plan, 1, &v, &splits) == 1 && same_tiles(&v, &got) &&
              splits == plan,
          "a 2%% win keeps the few-rows heuristic's tile for the decode call (warps=%d)", v.warps);
    v = pre;
    CHECK(fajit__launch_tiles(ctx, &drv, dev, 65536, plan, 0, &v, &splits) == 0 && same_tiles(&v, &pre),
          "a call of the same variant, bucket and split count with full blocks reads none of them");
    seen_split st = {0};
    CHECK(fajit_tuning_list(ctx, seen_split_cb, &st) == 0 && st.n == 2 && st.best_splits == plan &&
              st.few_rows == 2 && st.best_warps == got.warps,
          "list: both records of the few-rows class, its heuristic marked best (warps=%d)", st.best_warps);
    fajit_destroy(ctx);
    free(p);
}

/* Tuned split counts through the launch path: the record's count where it
 * beats the rule's by 3%, the rule's otherwise, nothing with
 * FAJIT_TUNED_TILES=0, and nothing for another rule's count. */
static void test_split_launch(void)
{
    char dir[1024];
    fajit_ctx *ctx = open_ctx(cache_dir("split", dir, sizeof dir));
    fajit__gpu_identity g = gpu_a();
    fajit__driver drv = fake_driver();
    const CUdevice dev = FAJIT__MAX_DEVICES - 1;
    fajit__variant h = fwd_variant(128, FAJIT__UNSET, FAJIT__UNSET, FAJIT__UNSET, FAJIT__UNSET), v;
    fajit__heuristic_tiles(&h);
    const fajit__fwd_shape decode = {1, 1, 65536, 32, 8};
    const int plan = fajit__plan_splits(&h, &decode, 132), bucket = fajit__seqlen_bucket(65536);
    const int alt1 = plan == 16 ? 32 : 16, alt2 = plan == 8 ? 4 : 8; /* not the rule's */
    int splits = -1;
    CHECK(put_split_record(ctx, &g, ctx->build_id, &h, plan, bucket, plan, 1000) == 0 &&
              put_split_record(ctx, &g, ctx->build_id, &h, alt1, bucket, plan, 980) == 0,
          "records: the rule's %d splits 1000 ns, %d splits 980 ns", plan, alt1);
    fajit__tuned_forget();
    v = h;
    CHECK(fajit__launch_tiles(ctx, &drv, dev, 65536, plan, 0, &v, &splits) == 1 && splits == plan &&
              memcmp(&v, &h, sizeof v) == 0,
          "a 2%% win keeps the rule's count (%d)", splits);
    CHECK(put_split_record(ctx, &g, ctx->build_id, &h, alt2, bucket, plan, 900) == 0,
          "record: %d splits 900 ns", alt2);
    fajit__tuned_forget();
    v = h;
    CHECK(fajit__launch_tiles(ctx, &drv, dev, 65536, plan, 0, &v, &splits) == 1 && splits == alt2,
          "a 10%% win takes the tuned count (%d)", splits);
    v = h;
    CHECK(fajit__launch_tiles(ctx, &drv, dev, 65536, plan + 1, 0, &v, &splits) == 0 && splits == 0,
          "another rule's count was not tuned: the rule decides");
    fajit__variant other = h;
    other.bm = 64;
    other.warps = 4;
    CHECK(put_split_record(ctx, &g, ctx->build_id, &other, 2, bucket, plan, 500) == 0, "record: bm 64 with 2 splits 500 ns");
    fajit__tuned_forget();
    v = h;
    CHECK(fajit__launch_tiles(ctx, &drv, dev, 65536, plan, 0, &v, &splits) == 1 && splits == 2 && v.bm == 64 &&
              v.warps == 4,
          "tiles and split count are chosen together (bm=%d, %d splits)", v.bm, splits);
    setenv("FAJIT_TUNED_TILES", "0", 1);
    fajit_ctx *off = open_ctx(dir);
    unsetenv("FAJIT_TUNED_TILES");
    v = h;
    CHECK(fajit__launch_tiles(off, &drv, dev, 65536, plan, 0, &v, &splits) == 0 && splits == 0 &&
              memcmp(&v, &h, sizeof v) == 0,
          "FAJIT_TUNED_TILES=0: the heuristic's tiles and the rule's count despite the records");
    fajit_destroy(off);

    seen_split st = {0};
    CHECK(fajit_tuning_list(ctx, seen_split_cb, &st) == 0 && st.n == 4 && st.best_splits == 2 &&
              st.plan == plan,
          "list: 4 records of the rule's %d, the best has 2 splits", plan);
    fajit_destroy(ctx);
}

/* Backward records: the fast backward's main kernel takes tuned tiles as the
 * forward does; the per-thread memo keeps one answer per op. */
static void test_bwd_launch(void)
{
    char dir[1024];
    fajit_ctx *ctx = open_ctx(cache_dir("bwd", dir, sizeof dir));
    fajit__gpu_identity g = gpu_a();
    fajit__driver drv = fake_driver();
    const CUdevice dev = FAJIT__MAX_DEVICES - 1;
    fajit__variant hb = fwd_variant(128, FAJIT__UNSET, FAJIT__UNSET, FAJIT__UNSET, FAJIT__UNSET), v;
    hb.op = FAJIT__OP_BWD;
    fajit__heuristic_tiles(&hb);
    fajit__variant ob = hb, hf = fwd_variant(128, FAJIT__UNSET, FAJIT__UNSET, FAJIT__UNSET, FAJIT__UNSET);
    fajit__heuristic_tiles(&hf);
    ob.bm = hb.bm == 64 ? 32 : 64;
    ob.stages = 1;
    char why[200];
    CHECK(fajit__tune_static_refusal(&ob, why, sizeof why) == NULL, "bwd candidate bm=%d bn=%d warps=%d "
          "stages=%d is one tuning tries", ob.bm, ob.bn, ob.warps, ob.stages);
    const int bucket = fajit__seqlen_bucket(4096);
    CHECK(put_record(ctx, &g, ctx->build_id, &hb, bucket, 1000) == 0 &&
              put_record(ctx, &g, ctx->build_id, &ob, bucket, 800) == 0,
          "bwd records: heuristic 1000 ns, other 800 ns");
    fajit__tuned_forget();
    int splits = -1;
    v = hb;
    CHECK(fajit__launch_tiles(ctx, &drv, dev, 4096, 0, 0, &v, &splits) == 1 && v.bm == ob.bm &&
              v.stages == 1 && splits == 0,
          "the backward takes the tuned tiles (bm=%d stages=%d)", v.bm, v.stages);
    v = hf;
    CHECK(fajit__launch_tiles(ctx, &drv, dev, 4096, 0, 0, &v, NULL) == 0 && memcmp(&v, &hf, sizeof v) == 0,
          "the forward of the same shape was not tuned: the heuristic's");
    v = hb;
    CHECK(fajit__launch_tiles(ctx, &drv, dev, 4096, 0, 0, &v, NULL) == 1 && v.bm == ob.bm,
          "after a forward lookup the backward's is still remembered");
    fajit__variant det = hb;
    det.op = FAJIT__OP_BWD_DKDV;
    v = det;
    CHECK(fajit__launch_tiles(ctx, &drv, dev, 4096, 0, 0, &v, NULL) == 0 && memcmp(&v, &det, sizeof v) == 0,
          "deterministic mode's kernels are not tuned");
    fajit_destroy(ctx);
}

static void test_bwd_candidates(void)
{
    static const int dims[][2] = {{64, 64}, {128, 128}, {256, 256}, {192, 128}};
    for (size_t d = 0; d < sizeof dims / sizeof dims[0]; d++) {
        fajit__variant b = fwd_variant(dims[d][0], FAJIT__UNSET, FAJIT__UNSET, FAJIT__UNSET, FAJIT__UNSET),
                       c[64], h;
        b.op = FAJIT__OP_BWD;
        b.dv = dims[d][1];
        h = b;
        fajit__heuristic_tiles(&h);
        size_t n = fajit__tune_candidates(&b, c, 64);
        int legal = n > 0 && n <= 24, has_heur = 0;
        for (size_t i = 0; i < n && i < 64; i++) {
            legal &= fajit__flash_bwd_layouts_exist(&c[i]) && c[i].stages <= 2 &&
                     fajit__variant_smem_bytes(&c[i]) <= 227 * 1024 && fajit__variant_check(&c[i]) == 0;
            has_heur |= memcmp(&c[i], &h, sizeof h) == 0;
        }
        CHECK(legal && has_heur, "bwd d%d/%d sm_90: %zu candidates, all legal, the heuristic's among them",
              dims[d][0], dims[d][1], n);
    }
    char why[200];
    fajit__variant bad = fwd_variant(100, 64, 64, 4, 1);
    bad.op = FAJIT__OP_BWD;
    CHECK(fajit__tune_static_refusal(&bad, why, sizeof why) && strstr(why, "multiples of 8"),
          "bwd d100 is refused: %s", why);
    bad = fwd_variant(128, 64, 64, 4, 3);
    bad.op = FAJIT__OP_BWD;
    CHECK(fajit__tune_static_refusal(&bad, why, sizeof why) && strstr(why, "stages"),
          "bwd stages 3 is refused: %s", why);
    bad = fwd_variant(256, 128, 128, 4, 2);
    bad.op = FAJIT__OP_BWD;
    CHECK(fajit__tune_static_refusal(&bad, why, sizeof why) != NULL, "bwd d256 bm128 bn128 is refused: %s", why);
    /* The heaviest bwd survivor at d 128 compiles without spills. */
    fajit__variant b = fwd_variant(128, FAJIT__UNSET, FAJIT__UNSET, FAJIT__UNSET, FAJIT__UNSET), s[64];
    b.op = FAJIT__OP_BWD;
    size_t k = fajit__tune_candidates(&b, s, 64), pick = 0;
    for (size_t i = 1; i < k; i++)
        if ((s[i].bn * 256 + 2 * s[i].bm * s[i].bn) / s[i].warps >
            (s[pick].bn * 256 + 2 * s[pick].bm * s[pick].bn) / s[pick].warps)
            pick = i;
    fajit__compiled cc;
    int rc = k ? fajit__compile_variant(&s[pick], &cc) : -1;
    CHECK(rc == 0 && fajit__tune_compiled_refusal(&s[pick], &cc.meta, why, sizeof why) == NULL,
          "bwd d128: heaviest survivor bm=%d bn=%d warps=%d stages=%d compiles, %u registers, %u spill bytes",
          s[pick].bm, s[pick].bn, s[pick].warps, s[pick].stages, rc == 0 ? cc.meta.registers : 0,
          rc == 0 ? cc.meta.spill_bytes : 0);
    if (rc == 0)
        fajit__compiled_free(&cc);
}

static void test_candidates(void)
{
    fajit__variant base = fwd_variant(128, FAJIT__UNSET, FAJIT__UNSET, FAJIT__UNSET,
                                      FAJIT__UNSET), c[64];
    char why[200];
    size_t n = fajit__tune_candidates(&base, c, 64);
    int legal = n > 0;
    for (size_t i = 0; i < n; i++)
        legal &= (c[i].bm % (16 * c[i].warps) == 0 ||
                  (16 * c[i].warps % c[i].bm == 0 && c[i].bn % (16 * c[i].warps * 16 / c[i].bm) == 0)) &&
                 c[i].bm % 16 == 0 && c[i].bn % 16 == 0 && fajit__variant_smem_bytes(&c[i]) <= 227 * 1024 &&
                 fajit__variant_check(&c[i]) == 0;
    CHECK(legal, "d128 sm_90: %zu candidates, all legal by the template's rules", n);
    int key_split = 0;
    for (size_t i = 0; i < n; i++)
        key_split += c[i].bm == 16 && c[i].warps == 4 && c[i].bn == 64 && fajit__fwd_key_warps(&c[i]) == 4;
    CHECK(key_split == 3, "d128: bm 16 bn 64 with 4 warps (keys split over the warps) is a candidate at 1..3 "
                          "stages (%d)", key_split);
    for (int odd = 0; odd < 2; odd++) { /* the fast forward takes every head dim now */
        fajit__variant ob = fwd_variant(odd ? 59 : 100, FAJIT__UNSET, FAJIT__UNSET, FAJIT__UNSET,
                                        FAJIT__UNSET), oc[64];
        size_t on = fajit__tune_candidates(&ob, oc, 64);
        int ok = on > 0;
        for (size_t i = 0; i < on; i++)
            ok &= fajit__variant_check(&oc[i]) == 0;
        CHECK(ok, "d%d (not a multiple of 8): %zu candidates, all valid variants", ob.dqk, on);
    }
    fajit__variant bad = fwd_variant(128, 48, 64, 4, 2);
    CHECK(fajit__tune_static_refusal(&bad, why, sizeof why) != NULL && strstr(why, "16 * warps"),
          "bm 48 with 4 warps is refused: %s", why);
    bad = fwd_variant(128, 16, 32, 4, 2); /* 4 warps a 16-row tile: 8 keys each, below the mma's 16 */
    CHECK(fajit__tune_static_refusal(&bad, why, sizeof why) != NULL && strstr(why, "bn=32"),
          "bm 16 bn 32 with 4 warps is refused: %s", why);
    bad = fwd_variant(128, 64, 64, 8, 2); /* 4 row tiles, each one's keys over 2 warps */
    CHECK(fajit__tune_static_refusal(&bad, why, sizeof why) == NULL && fajit__fwd_key_warps(&bad) == 2,
          "bm 64 bn 64 with 8 warps is taken, 2 warps a key tile: %s", why);
    bad = fwd_variant(256, 128, 128, 8, 3);
    bad.arch = 86;
    CHECK(fajit__tune_static_refusal(&bad, why, sizeof why) != NULL && strstr(why, "shared"),
          "d256 bn128 3 stages on sm_86 is refused: %s", why);
    fajit__variant b86 = base;
    b86.arch = 86;
    CHECK(fajit__tune_candidates(&b86, NULL, 0) < n, "sm_86's smaller shared memory prunes more");
    fajit__entry_meta m;
    memset(&m, 0, sizeof m);
    m.registers = 255;
    fajit__variant w8 = fwd_variant(128, 128, 64, 8, 2);
    CHECK(fajit__tune_compiled_refusal(&w8, &m, why, sizeof why) == NULL,
          "255 registers x 256 threads fit the register file");
    m.spill_bytes = 8;
    CHECK(fajit__tune_compiled_refusal(&w8, &m, why, sizeof why) != NULL,
          "a spilling candidate is refused: %s", why);

    /* A few survivors compiled. The static bound admits tiles at the edge
     * of the register file (the heaviest survivor of each head dim): one
     * that spills is refused after compiling, exactly when it spills, so no
     * spilling kernel is ever timed. FlashAttention-2's own d 128 tile (bm
     * 128 bn 64, 4 warps, 2 stages) survives and compiles without spills. */
    int dims[] = {64, 128, 256};
    for (int d = 0; d < 3; d++) {
        fajit__variant b = fwd_variant(dims[d], FAJIT__UNSET, FAJIT__UNSET, FAJIT__UNSET,
                                       FAJIT__UNSET), s[64];
        size_t k = fajit__tune_candidates(&b, s, 64), pick = 0;
        for (size_t i = 1; i < k; i++) /* the most accumulator registers */
            if (s[i].bm / s[i].warps * (s[i].dv + s[i].bn) >
                s[pick].bm / s[pick].warps * (s[pick].dv + s[pick].bn))
                pick = i;
        fajit__compiled cc;
        int rc = fajit__compile_variant(&s[pick], &cc);
        const char *refused = rc == 0 ? fajit__tune_compiled_refusal(&s[pick], &cc.meta, why, sizeof why) : NULL;
        CHECK(rc == 0 && (cc.meta.spill_bytes > 0) == (refused != NULL),
              "d%d: heaviest survivor bm=%d bn=%d warps=%d stages=%d compiles, %u registers, "
              "%u spill bytes, %s", dims[d], s[pick].bm, s[pick].bn, s[pick].warps, s[pick].stages,
              rc == 0 ? cc.meta.registers : 0, rc == 0 ? cc.meta.spill_bytes : 0,
              refused ? refused : "kept");
        if (rc == 0)
            fajit__compiled_free(&cc);
    }
    fajit__variant fa2 = fwd_variant(128, 128, 64, 4, 2), s[64];
    size_t k = fajit__tune_candidates(&fa2, s, 64), found = 0;
    for (size_t i = 0; i < k && i < 64; i++)
        found |= s[i].bm == 128 && s[i].bn == 64 && s[i].warps == 4 && s[i].stages == 2;
    fajit__compiled cc;
    int rc = found ? fajit__compile_variant(&fa2, &cc) : -1;
    CHECK(rc == 0 && cc.meta.spill_bytes == 0 && fajit__tune_compiled_refusal(&fa2, &cc.meta, why, sizeof why) == NULL,
          "d128 bm=128 bn=64 warps=4 stages=2 is a candidate (%zu) and compiles without spills "
          "(%u registers, %u spill bytes)", found, rc == 0 ? cc.meta.registers : 0,
          rc == 0 ? cc.meta.spill_bytes : 0);
    if (rc == 0)
        fajit__compiled_free(&cc);
}

static void expect_parse_error(const char *text, const char *word)
{
    fajit__tune_problem *p = NULL;
    size_t n = 0;
    int rc = fajit__tune_parse_problems(text, &p, &n);
    CHECK(rc == FAJIT_EPARSE && strstr(fajit_last_error(), word),
          "'%s' is refused naming '%s': %s", text, word, fajit_last_error());
    free(p);
}

static void test_parser(void)
{
    fajit__tune_problem *p = NULL;
    size_t n = 0;
    int rc = fajit__tune_parse_problems(
        "# comment\n\nfwd dqk=128 dtype=bf16 mask=causal batch=4 seqlen_q=4096 seqlen_k=2048 "
        "nheads_q=16 nheads_kv=4  # trailing\nfwd dqk=64 seqlen=512 nheads=8\n",
        &p, &n);
    CHECK(rc == 0 && n == 2 && p[0].batch == 4 && p[0].seqlen_q == 4096 &&
              p[0].seqlen_k == 2048 && p[0].nheads_q == 16 && p[0].nheads_kv == 4 &&
              p[0].v.dqk == 128 && p[0].v.dtype == FAJIT_DTYPE_BF16 &&
              p[0].v.mask == FAJIT_MASK_CAUSAL && p[0].v.bm == FAJIT__UNSET && p[0].line == 3,
          "a problem line with shapes parses");
    CHECK(rc == 0 && n == 2 && p[1].batch == 1 && p[1].seqlen_q == 512 && p[1].seqlen_k == 512 &&
              p[1].nheads_kv == 8 && p[1].line == 4,
          "seqlen and nheads set both; batch defaults to 1");
    free(p);
    rc = fajit__tune_parse_problems(NULL, &p, &n);
    int fwd = 0, bwd = 0;
    for (size_t i = 0; rc == 0 && i < n; i++) {
        fwd += p[i].v.op == FAJIT__OP_FWD;
        bwd += p[i].v.op == FAJIT__OP_BWD;
    }
    CHECK(rc == 0 && n == 144 && fwd == 72 && bwd == 72 && p[0].batch * p[0].seqlen_q == 16384 &&
              p[0].nheads_q * p[0].v.dqk == 2048 && p[143].batch * p[143].seqlen_k == 16384,
          "the default grid: %zu problems (%d fwd, %d bwd), batch * seqlen 16384, hidden 2048", n, fwd, bwd);
    free(p);
    rc = fajit__tune_parse_problems("bwd dqk=128 dtype=bf16 mask=causal batch=2 seqlen=2048 nheads=16\n"
                                    "fwd dqk=128 dtype=bf16 seqlen_q=1 seqlen_k=65536 nheads_q=32 nheads_kv=8\n",
                                    &p, &n);
    CHECK(rc == 0 && n == 2 && p[0].v.op == FAJIT__OP_BWD && p[0].v.mask == FAJIT_MASK_CAUSAL &&
              p[0].batch == 2 && p[0].seqlen_k == 2048 && p[1].seqlen_q == 1 && p[1].nheads_kv == 8,
          "a bwd problem and a decode problem parse");
    free(p);
    expect_parse_error("bwd dqk=100 seqlen=8 nheads=1", "multiples of 8");
    expect_parse_error("bwd-dkdv dqk=64 seqlen=8 nheads=1", "bwd-dkdv");
    expect_parse_error("fwd dqk=64 seqlen=x nheads=1", "seqlen=x");
    expect_parse_error("fwd dqk=64 bm=64 seqlen=8 nheads=1", "bm=64");
    expect_parse_error("fwd dqk=64 bogus=3 seqlen=8 nheads=1", "bogus");
    expect_parse_error("ref dqk=64 seqlen=8 nheads=1", "ref");
    expect_parse_error("fwd dqk=64 nheads=1", "seqlen");
    expect_parse_error("fwd dqk=64 seqlen=8 nheads_q=6 nheads_kv=4", "nheads_kv=4");
    expect_parse_error("fwd dqk=64 seqlen=8 seqlen=9 nheads=2", "seqlen=9");
    expect_parse_error("fwd dqk=300 seqlen=8 nheads=2", "dqk=300");
    expect_parse_error("fwd dqk=64 seqlen=8\nfwd dqk=64 bogus=3 seqlen=8 nheads=1", "line 1: no nheads");
    expect_parse_error("# nothing\n", "empty");
}

typedef struct seen {
    int n, best, current;
    char variant[320];
} seen;

static int seen_cb(void *user, const fajit_tuning_record *r)
{
    seen *s = user;
    s->n++;
    s->best += r->best;
    s->current += r->current_build;
    if (r->best)
        snprintf(s->variant, sizeof s->variant, "%s", r->variant);
    return 0;
}

static void test_bundle(void)
{
    char d1[1024], d2[1024], path[1200];
    fajit_ctx *a = open_ctx(cache_dir("export", d1, sizeof d1));
    fajit__gpu_identity g = gpu_a();
    fajit__variant v1 = fwd_variant(64, 128, 64, 4, 2), v2 = fwd_variant(64, 64, 64, 4, 2);
    put_record(a, &g, a->build_id, &v1, 10, 500);
    put_record(a, &g, a->build_id, &v2, 10, 400);
    seen s = {0};
    CHECK(fajit_tuning_list(a, seen_cb, &s) == 0 && s.n == 2 && s.best == 1 && s.current == 2 &&
              strstr(s.variant, "bm=64"),
          "list: 2 records, the faster marked best");
    snprintf(path, sizeof path, "%s/bundle.fjb", d1);
    fajit_bundle_result r;
    CHECK(fajit_cache_export(a, path, &r) == 0, "export with tuning records");
    fajit_ctx *b = open_ctx(cache_dir("import", d2, sizeof d2));
    CHECK(fajit_cache_import(b, path, r.sha256, &r) == 0, "import it");
    seen t = {0};
    CHECK(fajit_tuning_list(b, seen_cb, &t) == 0 && t.n == 2 && t.best == 1 &&
              strcmp(t.variant, s.variant) == 0,
          "the imported cache has both records and the same best");
    /* A flipped byte in the bundle's tuning section is caught whole. */
    FILE *f = fopen(path, "r+b");
    if (f) {
        fseek(f, 32 + 40, SEEK_SET); /* inside the first tuning record (no entries) */
        int c = fgetc(f);
        fseek(f, 32 + 40, SEEK_SET);
        fputc(c ^ 0x20, f);
        fclose(f);
    }
    CHECK(fajit_cache_import(b, path, NULL, NULL) == FAJIT_ECORRUPT,
          "a damaged tuning record rejects the bundle: %s", fajit_last_error());
    fajit_destroy(a);
    fajit_destroy(b);

    /* A cache without tuning records still exports version 1. */
    fajit_ctx *c = open_ctx(cache_dir("plain", d1, sizeof d1));
    snprintf(path, sizeof path, "%s/plain.fjb", d1);
    CHECK(fajit_cache_export(c, path, NULL) == 0, "export without records");
    unsigned char head[12] = {0};
    f = fopen(path, "rb");
    size_t got = f ? fread(head, 1, sizeof head, f) : 0;
    if (f)
        fclose(f);
    CHECK(got == 12 && head[8] == 1, "written as bundle version 1, readable by older readers");
    fajit_destroy(c);
}

static int run(const char *cmd)
{
    int st = system(cmd);
    return WIFEXITED(st) ? WEXITSTATUS(st) : -1;
}

static void test_cli(void)
{
    char dir[1024], cmd[4096];
    const char *tool = FAJIT_BINARY_DIR "/fajit";
    fajit_ctx *ctx = open_ctx(cache_dir("cli", dir, sizeof dir));
    fajit__gpu_identity g = gpu_a();
    fajit__variant v1 = fwd_variant(64, 128, 64, 4, 2), v2 = fwd_variant(64, 64, 32, 4, 1);
    put_record(ctx, &g, ctx->build_id, &v1, 11, 250000);
    put_record(ctx, &g, ctx->build_id, &v2, 11, 150000);
    fajit__variant v3 = fwd_variant(128, 128, 128, 8, 2);
    put_class_record(ctx, &g, ctx->build_id, &v3, 8, 16, 31, 1, 50000); /* a decode problem's */
    fajit_info info;
    memset(&info, 0, sizeof info);
    info.struct_size = sizeof info;
    fajit_get_info(ctx, &info);
    fajit_destroy(ctx);

    snprintf(cmd, sizeof cmd, "%s --cache-dir '%s' ls --tuning > '%s/ls.txt'", tool, dir, dir);
    int rc = run(cmd);
    snprintf(cmd, sizeof cmd, "grep -q 'NVIDIA H100 80GB HBM3.*sm_90.*132.*2048.*64/32 */4/1 *- .*"
             "150.00 \\*' '%s/ls.txt' && grep -c 'fwd dqk=64' '%s/ls.txt' | grep -qx 2", dir, dir);
    CHECK(rc == 0 && run(cmd) == 0, "ls --tuning lists both records, the faster marked *");
    snprintf(cmd, sizeof cmd,
             "grep -q '128/128/8/2 *8/31 .*50.00 \\* fwd dqk=128.*\\[few rows\\]' '%s/ls.txt' && "
             "test $(grep -c 'few rows' '%s/ls.txt') = 1", dir, dir);
    CHECK(run(cmd) == 0, "ls --tuning shows a split-KV record's count and the rule's (8/31), "
          "and marks the decode problem's record [few rows]");
    snprintf(cmd, sizeof cmd, "%s --cache-dir '%s' ls --tuning --json | grep -c "
             "'\"best\":true' | grep -qx 2", tool, dir);
    CHECK(run(cmd) == 0, "ls --tuning --json marks one best a problem");
    snprintf(cmd, sizeof cmd, "%s --cache-dir '%s' ls --tuning --json | grep -q "
             "'\"splits\":8,\"plan_splits\":31,\"few_rows\":true'", tool, dir);
    CHECK(run(cmd) == 0, "ls --tuning --json gives splits, plan_splits and few_rows");
    snprintf(cmd, sizeof cmd, "%s/fajit-prebuild --cache-dir '%s' --from-tuning --dry-run | "
             "grep -x '%s' >/dev/null", FAJIT_BINARY_DIR, dir,
             "fwd dqk=64 dv=64 dtype=fp16 mask=none window=-1,-1 dropout=0 softcap=0 alibi=0 "
             "varlen=0 paged=0 bm=64 bn=32 warps=4 stages=1 arch=sm_90");
    CHECK(run(cmd) == 0, "fajit-prebuild --from-tuning lists the winner");

    snprintf(cmd, sizeof cmd, "echo 'fwd dqk=64 bm=64 seqlen=8 nheads=1' | %s --cache-dir '%s' "
             "tune - 2>'%s/err.txt'", tool, dir, dir);
    rc = run(cmd);
    snprintf(cmd, sizeof cmd, "grep -q \"word 'bm=64'\" '%s/err.txt'", dir);
    CHECK(rc == 2 && run(cmd) == 0, "tune: a bad problem line exits 2 naming the word");
    if (info.device_count > 0) {
        printf("skip: a GPU is present, so the no-GPU exit of tune is not checked here\n");
        return;
    }
    snprintf(cmd, sizeof cmd, "echo 'fwd dqk=64 seqlen=256 nheads=2' | %s --cache-dir '%s' "
             "tune -j 2 - 2>'%s/tune.txt'", tool, dir, dir);
    rc = run(cmd);
    snprintf(cmd, sizeof cmd, "grep -q 'compiled  fwd dqk=64' '%s/tune.txt' && grep -q 'no GPU "
             "to time on' '%s/tune.txt'", dir, dir);
    CHECK(rc == 4 && run(cmd) == 0, "tune without a GPU compiles the candidates, then exits 4");
    snprintf(cmd, sizeof cmd, "%s --cache-dir '%s' ls | grep -c 'fwd dqk=64' | "
             "awk '$1 >= 10 {ok=1} END {exit !ok}'", tool, dir);
    CHECK(run(cmd) == 0, "the compiled candidates are in the kernel cache");
    /* A decode problem of the same variant is tuned against its own baseline
     * (the few-rows tile): a second group, twice the candidates (compiled
     * above: cache hits). */
    snprintf(cmd, sizeof cmd, "printf 'fwd dqk=64 seqlen=256 nheads=2\\nfwd dqk=64 seqlen_q=1 seqlen_k=256 "
             "nheads_q=8 nheads_kv=2\\n' | %s --cache-dir '%s' tune -j 2 - 2>'%s/tune2.txt'", tool, dir, dir);
    rc = run(cmd);
    snprintf(cmd, sizeof cmd, "one=$(sed -n 's/^tune: 1 problems, \\([0-9]*\\) candidates.*/\\1/p' '%s/tune.txt'); "
             "two=$(sed -n 's/^tune: 2 problems, \\([0-9]*\\) candidates.*/\\1/p' '%s/tune2.txt'); "
             "test -n \"$one\" && test \"$two\" = $((2 * one))", dir, dir);
    CHECK(rc == 4 && run(cmd) == 0, "tune: a decode and a prefill problem of one variant are two groups");
}

int main(void)
{
    test_records();
    test_launch_tiles();
    test_split_plan();
    test_persistent_plan();
    test_split_launch();
    test_few_rows_rule();
    test_few_rows_tuning();
    test_bwd_launch();
    test_parser();
    test_candidates();
    test_bwd_candidates();
    test_bundle();
    test_cli();
    printf("%s\n", failures ? "FAILED" : "all passed");
    return failures ? 1 : 0;
}
