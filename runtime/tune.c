/*
 * runtime/tune.c - autotuning of the fast forward's tiles: record keys, the
 * tuned-tiles lookup with its in-process memo, candidates and their pruning,
 * the problem manifest, fajit_tune (compile phase, then timing on the GPU),
 * the listing, and the bundle hooks. Contract in runtime/tune.h; record
 * layout in cache/FORMAT.md; overview in docs/tuning.md.
 */
#include "runtime/tune.h"

#include <ctype.h>
#include <errno.h>
#include <math.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>
#include <xxhash.h>

#include "templates/bwd_params.h"
#include "templates/fwd_params.h"

#include "runtime/flash_bwd.h"

/* The key's last byte is its format version: 2 added plan_splits to the
 * problem prefix and the split count to the candidate; 3 added few_rows to
 * the prefix (the heuristic's tiles depend on it). Records of older versions
 * match no prefix and decode as corrupt (ignored, not misread). */
#define KEY_MAGIC "FJT\x03"
#define GPU_ID_LEN 108 /* name 96, arch, SM count, driver version */
#define TILE_FIELDS 4
#define CHOICE_FIELDS (TILE_FIELDS + 1) /* the tiles, then the split count */
#define PREFIX_FIXED 142                /* bytes of a prefix besides the variant */

/* ---------------------------------------------------------------- little-endian helpers */

static void put_u32(uint8_t *p, uint32_t v)
{
    for (int i = 0; i < 4; i++)
        p[i] = (uint8_t)(v >> (8 * i));
}

static uint32_t get_u32(const uint8_t *p)
{
    return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}

static uint64_t now_realtime_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

static double now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

/* ---------------------------------------------------------------- GPU identity */

int fajit__gpu_identity_get(const fajit__driver *drv, CUdevice dev, fajit__gpu_identity *out)
{
    static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
    static struct { int known; fajit__gpu_identity id; } seen[FAJIT__MAX_DEVICES];
    int cached = dev >= 0 && dev < FAJIT__MAX_DEVICES, major = 0, minor = 0;
    CUresult r;
    if (cached) {
        pthread_mutex_lock(&lock);
        int known = seen[dev].known;
        if (known)
            *out = seen[dev].id;
        pthread_mutex_unlock(&lock);
        if (known)
            return 0;
    }
    memset(out, 0, sizeof *out);
    r = drv->deviceGetName(out->name, (int)sizeof out->name - 1, dev);
    if (r == CUDA_SUCCESS)
        r = drv->deviceGetAttribute(&major, CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR, dev);
    if (r == CUDA_SUCCESS)
        r = drv->deviceGetAttribute(&minor, CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR, dev);
    if (r == CUDA_SUCCESS)
        r = drv->deviceGetAttribute(&out->sm_count, CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT, dev);
    if (r != CUDA_SUCCESS)
        return fajit__cu_fail(r, "GPU identity of the device");
    out->name[sizeof out->name - 1] = '\0';
    out->arch = major * 10 + minor;
    out->driver_version = drv->version;
    if (cached) {
        pthread_mutex_lock(&lock);
        seen[dev].id = *out;
        seen[dev].known = 1;
        pthread_mutex_unlock(&lock);
    }
    return 0;
}

/* ---------------------------------------------------------------- keys */

int fajit__seqlen_bucket(int64_t seqlen_k)
{
    int b = 0;
    while (b < 20 && ((int64_t)1 << b) < seqlen_k)
        b++;
    return b < 6 ? 6 : b;
}

static int *tile_field(fajit__variant *v, int i)
{
    int *const f[TILE_FIELDS] = {&v->bm, &v->bn, &v->warps, &v->stages};
    return f[i];
}

/* Serialisation of v with its tiles unset; length as fajit__variant_serialize. */
static size_t serialize_untiled(const fajit__variant *v, uint8_t *buf, size_t cap)
{
    fajit__variant base = *v;
    for (int i = 0; i < TILE_FIELDS; i++)
        *tile_field(&base, i) = FAJIT__UNSET;
    return fajit__variant_serialize(&base, buf, cap);
}

size_t fajit__tuning_key(const fajit__gpu_identity *gpu, const uint8_t build_id[16],
                         const fajit__tune_choice *c, int bucket, int plan_splits, int few_rows,
                         int with_tiles, uint8_t *buf, size_t cap)
{
    size_t ser = serialize_untiled(&c->v, NULL, 0);
    size_t len = PREFIX_FIXED + ser + (with_tiles ? 4 * CHOICE_FIELDS : 0);
    if (!buf || cap < len)
        return len;
    uint8_t *p = buf;
    memcpy(p, KEY_MAGIC, 4);
    memset(p + 4, 0, 96);
    memcpy(p + 4, gpu->name, strnlen(gpu->name, 95));
    put_u32(p + 100, (uint32_t)gpu->arch);
    put_u32(p + 104, (uint32_t)gpu->sm_count);
    put_u32(p + 108, (uint32_t)gpu->driver_version);
    memcpy(p + 112, build_id, 16);
    p[128] = (uint8_t)ser;
    p[129] = (uint8_t)(ser >> 8);
    serialize_untiled(&c->v, p + 130, ser);
    put_u32(p + 130 + ser, (uint32_t)bucket);
    put_u32(p + 134 + ser, (uint32_t)plan_splits);
    put_u32(p + 138 + ser, few_rows ? 1u : 0u);
    if (with_tiles) {
        fajit__variant t = c->v;
        for (int i = 0; i < TILE_FIELDS; i++)
            put_u32(p + PREFIX_FIXED + ser + 4 * i, (uint32_t)*tile_field(&t, i));
        put_u32(p + PREFIX_FIXED + ser + 4 * TILE_FIELDS, (uint32_t)c->splits);
    }
    return len;
}

int fajit__tuning_key_decode(const uint8_t *key, size_t len, fajit__gpu_identity *gpu,
                             uint8_t build_id[16], fajit__tune_choice *c, int *bucket,
                             int *plan_splits, int *few_rows)
{
    uint8_t ser[256];
    size_t sl;
    if (len < PREFIX_FIXED || memcmp(key, KEY_MAGIC, 4) != 0)
        return fajit__fail(FAJIT_ECORRUPT, "tuning key: bad magic or version, or %zu bytes too "
                           "short", len);
    sl = (size_t)key[128] | (size_t)key[129] << 8;
    if (sl > sizeof ser || len != PREFIX_FIXED + sl + 4 * CHOICE_FIELDS)
        return fajit__fail(FAJIT_ECORRUPT, "tuning key: %zu bytes, variant of %zu", len, sl);
    memset(gpu, 0, sizeof *gpu);
    memcpy(gpu->name, key + 4, 95);
    gpu->arch = (int)get_u32(key + 100);
    gpu->sm_count = (int)get_u32(key + 104);
    gpu->driver_version = (int)get_u32(key + 108);
    memcpy(build_id, key + 112, 16);
    /* The stored variant has its tiles unset; put the candidate's in (struct
     * order is serialisation order, codegen/serialize.c) and check it whole. */
    memcpy(ser, key + 130, sl);
    for (int i = 0; i < TILE_FIELDS; i++) {
        size_t at = 6 + 4 * (offsetof(fajit__variant, bm) / sizeof(int) + (size_t)i);
        if (at + 4 <= sl)
            memcpy(ser + at, key + PREFIX_FIXED + sl + 4 * i, 4);
    }
    *bucket = (int)get_u32(key + 130 + sl);
    *plan_splits = (int)get_u32(key + 134 + sl);
    *few_rows = get_u32(key + 138 + sl) != 0;
    c->splits = (int)get_u32(key + PREFIX_FIXED + sl + 4 * TILE_FIELDS);
    return fajit__variant_deserialize(ser, sl, &c->v);
}

/* ---------------------------------------------------------------- candidates and pruning */

static const int cand_bm[] = {16, 64, 128}, cand_bn[] = {32, 64, 128}, cand_warps[] = {4, 8},
                 cand_stages[] = {1, 2, 3};
/* The backward's main kernel: bn 32 lost badly wherever the sweep of
 * tests/gpu/test_flash_bwd_gpu tried it (129 against 201 TFLOPs at d 256). */
static const int bwd_bm[] = {32, 64, 128}, bwd_bn[] = {64, 128}, bwd_warps[] = {4, 8},
                 bwd_stages[] = {1, 2};
static const int split_counts[] = {1, 2, 4, 8, 16, 32};
#define COUNT(a) (sizeof(a) / sizeof((a)[0]))

/* A warp holds bm / warps rows of O (dv wide) and of S (bn wide) in fp32
 * registers spread over 32 lanes; past this many a thread, ptxas spills (the
 * register file gives a thread at most 255). 192 admits FlashAttention-2's
 * own d 128 tile (bm 128 bn 64, 4 warps), which compiles without spills
 * since the forward's softmax folds its scale and rescales lazily; anything
 * that does spill is pruned after compiling (fajit__tune_compiled_refusal). */
#define MAX_ACCUMULATOR_REGS 192
/* The backward's main kernel holds its share of dK and dV (bn x (dqk + dv))
 * and of a step's S and dP (2 x bm x bn): the heuristic's tiles reach 192
 * (d 64: bm 128 bn 128; d 128: bm 64 bn 128) without spilling. */
#define MAX_BWD_ACCUMULATOR_REGS 192

static const char *refuse(char *buf, size_t cap, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));
static const char *refuse(char *buf, size_t cap, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(buf, cap, fmt, ap);
    va_end(ap);
    return buf;
}

static const char *bwd_static_refusal(const fajit__variant *v, char *buf, size_t cap)
{
    if (v->dqk % 8 || v->dv % 8 || v->dqk < 8 || v->dv < 8 || v->dqk > 256 || v->dv > 256)
        return refuse(buf, cap, "dqk=%d dv=%d: the fast backward takes multiples of 8 in 8..256",
                      v->dqk, v->dv);
    if (v->paged)
        return refuse(buf, cap, "the fast backward lacks paged KV");
    if (v->warps < 1 || v->warps > 16 || v->bm < 16 || v->bm > 128 || 128 % v->bm != 0)
        return refuse(buf, cap, "bm=%d warps=%d: bm must be 16, 32, 64 or 128, warps 1..16", v->bm,
                      v->warps);
    if (v->bn < 16 || v->bn % 16 != 0)
        return refuse(buf, cap, "bn=%d: must be a multiple of 16", v->bn);
    if (v->stages < 1 || v->stages > 2)
        return refuse(buf, cap, "stages=%d: must be 1 or 2", v->stages);
    if (!fajit__flash_bwd_layouts_exist(v))
        return refuse(buf, cap, "bm=%d bn=%d warps=%d: no warp layout", v->bm, v->bn, v->warps);
    size_t smem = fajit__variant_smem_bytes(v), limit = fajit__arch_smem_limit(v->arch);
    if (smem > limit)
        return refuse(buf, cap, "shared memory %zu bytes above the arch's %zu", smem, limit);
    int regs = (v->bn * (v->dqk + v->dv) + 2 * v->bm * v->bn) / (32 * v->warps);
    if (regs > MAX_BWD_ACCUMULATOR_REGS)
        return refuse(buf, cap, "accumulators need %d registers a thread (more than %d)", regs,
                      MAX_BWD_ACCUMULATOR_REGS);
    return NULL;
}

const char *fajit__tune_static_refusal(const fajit__variant *v, char *buf, size_t cap)
{
    int key_warps;
    if (v->op == FAJIT__OP_BWD)
        return bwd_static_refusal(v, buf, cap);
    if (v->op != FAJIT__OP_FWD)
        return refuse(buf, cap, "op %d is neither fwd nor bwd", v->op);
    if (!fajit__fast_fwd_supports(v))
        return refuse(buf, cap, "the fast forward lacks a feature of the variant");
    if (v->dqk > 256 || v->dv > 256 || v->dqk < 1 || v->dv < 1)
        return refuse(buf, cap, "dqk=%d dv=%d: head dims must be in 1..256", v->dqk, v->dv);
    if (v->warps < 1 || v->warps > 16 || v->bm < 16 || v->bm % 16 != 0 ||
        (v->bm % (16 * v->warps) != 0 && (16 * v->warps) % v->bm != 0))
        return refuse(buf, cap, "bm=%d warps=%d: bm must be a multiple of 16 * warps, or divide it", v->bm,
                      v->warps);
    key_warps = fajit__fwd_key_warps(v);
    if (v->bn < 16 || v->bn % (16 * key_warps) != 0)
        return refuse(buf, cap, "bn=%d: must be a multiple of 16 * %d (the warps a key tile is split over)",
                      v->bn, key_warps);
    if (v->stages < 1 || v->stages > 3)
        return refuse(buf, cap, "stages=%d: must be 1..3", v->stages);
    size_t smem = fajit__variant_smem_bytes(v), limit = fajit__arch_smem_limit(v->arch);
    if (smem > limit)
        return refuse(buf, cap, "shared memory %zu bytes above the arch's %zu", smem, limit);
    /* a warp's rows times (dv padded as in smem + its keys of a tile) */
    int regs = v->bm * key_warps / v->warps * ((v->dv + 7) / 8 * 8 + v->bn / key_warps) / 32;
    if (regs > MAX_ACCUMULATOR_REGS)
        return refuse(buf, cap, "accumulators need %d registers a thread (more than %d)", regs,
                      MAX_ACCUMULATOR_REGS);
    return NULL;
}

const char *fajit__tune_compiled_refusal(const fajit__variant *v, const fajit__entry_meta *m,
                                         char *buf, size_t cap)
{
    if (m->spill_bytes > 0)
        return refuse(buf, cap, "ptxas spills %u bytes (%u registers)", m->spill_bytes,
                      m->registers);
    if ((long)m->registers * v->warps * 32 > 65536)
        return refuse(buf, cap, "%u registers x %d threads exceed the 64K register file",
                      m->registers, v->warps * 32);
    return NULL;
}

/* The tile grid of v's op: its four lists and their lengths. */
typedef struct tile_grid {
    const int *f[TILE_FIELDS];
    size_t n[TILE_FIELDS];
} tile_grid;

static tile_grid grid_of(const fajit__variant *v)
{
    if (v->op == FAJIT__OP_BWD)
        return (tile_grid){{bwd_bm, bwd_bn, bwd_warps, bwd_stages},
                           {COUNT(bwd_bm), COUNT(bwd_bn), COUNT(bwd_warps), COUNT(bwd_stages)}};
    return (tile_grid){{cand_bm, cand_bn, cand_warps, cand_stages},
                       {COUNT(cand_bm), COUNT(cand_bn), COUNT(cand_warps), COUNT(cand_stages)}};
}

static size_t grid_size(const fajit__variant *v)
{
    tile_grid g = grid_of(v);
    return g.n[0] * g.n[1] * g.n[2] * g.n[3];
}

size_t fajit__tune_candidates(const fajit__variant *v, fajit__variant *out, size_t cap)
{
    const tile_grid g = grid_of(v);
    const size_t total = grid_size(v);
    size_t n = 0;
    char why[160];
    for (size_t k = 0; k < total; k++) {
        fajit__variant c = *v;
        for (int i = 0, rest = (int)k; i < TILE_FIELDS; rest /= (int)g.n[i], i++)
            *tile_field(&c, i) = g.f[i][(size_t)rest % g.n[i]];
        if (fajit__tune_static_refusal(&c, why, sizeof why))
            continue;
        if (out && n < cap)
            out[n] = c;
        n++;
    }
    return n;
}

size_t fajit__tune_split_counts(const fajit__variant *c, int64_t seqlen_k, int plan_splits, int *out,
                                size_t cap)
{
    int64_t tiles = c->bn > 0 ? (seqlen_k + c->bn - 1) / c->bn : 0;
    int max = tiles < FAJIT__MAX_SPLITS ? (int)tiles : FAJIT__MAX_SPLITS, plan_listed = 0;
    size_t n = 0;
    if (plan_splits <= 0) {
        if (out && cap > 0)
            out[0] = 0;
        return 1;
    }
    for (size_t i = 0; i < COUNT(split_counts) && split_counts[i] <= max; i++) {
        plan_listed |= split_counts[i] == plan_splits;
        if (out && n < cap)
            out[n] = split_counts[i];
        n++;
    }
    if (!plan_listed && plan_splits <= max) {
        if (out && n < cap)
            out[n] = plan_splits;
        n++;
    }
    return n;
}

/* ---------------------------------------------------------------- the tuned-tiles memo */

#define MEMO_SLOTS 1024 /* power of two; cleared when three quarters full */

typedef struct memo_slot {
    uint8_t digest[16]; /* XXH3-128 of the cache directory and the key prefix */
    int used, found;
    int choice[CHOICE_FIELDS]; /* tiles, then the split count */
} memo_slot;

static pthread_mutex_t memo_lock = PTHREAD_MUTEX_INITIALIZER;
static memo_slot memo[MEMO_SLOTS];
static size_t memo_count;

static void memo_digest(const char *dir, const uint8_t *prefix, size_t n, uint8_t out[16])
{
    uint8_t buf[4096 + FAJIT__TUNING_KEY_MAX + 1];
    size_t dl = strnlen(dir, 4096);
    XXH128_canonical_t c;
    memcpy(buf, dir, dl);
    buf[dl] = 0;
    memcpy(buf + dl + 1, prefix, n);
    XXH128_canonicalFromHash(&c, XXH3_128bits(buf, dl + 1 + n));
    memcpy(out, c.digest, 16);
}

static memo_slot *memo_find_locked(const uint8_t digest[16])
{
    size_t i = (size_t)get_u32(digest) & (MEMO_SLOTS - 1);
    for (; memo[i].used; i = (i + 1) & (MEMO_SLOTS - 1))
        if (memcmp(memo[i].digest, digest, 16) == 0)
            return &memo[i];
    return &memo[i]; /* the empty slot where it belongs */
}

static int memo_get(const uint8_t digest[16], memo_slot *out)
{
    pthread_mutex_lock(&memo_lock);
    memo_slot *s = memo_find_locked(digest);
    int hit = s->used;
    if (hit)
        *out = *s;
    pthread_mutex_unlock(&memo_lock);
    return hit;
}

static void memo_put(const memo_slot *v)
{
    pthread_mutex_lock(&memo_lock);
    if ((memo_count + 1) * 4 > MEMO_SLOTS * 3) {
        memset(memo, 0, sizeof memo);
        memo_count = 0;
    }
    memo_slot *s = memo_find_locked(v->digest);
    if (!s->used)
        memo_count++;
    *s = *v;
    s->used = 1;
    pthread_mutex_unlock(&memo_lock);
}

/* Bumped whenever remembered answers may be stale, so the per-thread memo of
 * fajit__launch_tiles drops its entry too. */
static atomic_uint memo_generation;

void fajit__tuned_forget(void)
{
    atomic_fetch_add_explicit(&memo_generation, 1, memory_order_release);
    pthread_mutex_lock(&memo_lock);
    memset(memo, 0, sizeof memo);
    memo_count = 0;
    pthread_mutex_unlock(&memo_lock);
}

typedef struct best_search {
    const fajit__variant *v;
    size_t prefix_len;
    double best_ns;
    int found;
    int choice[CHOICE_FIELDS];
    int heuristic[CHOICE_FIELDS]; /* the heuristic's tiles for v (and few_rows), and plan_splits */
} best_search;

/* Leaving the heuristic's config takes a clear win: another candidate must be
 * at least this much faster in the timings, or run-to-run noise would pick
 * configurations no better than the default (and sometimes worse). */
#define HEURISTIC_PREFERENCE 0.97

static void choice_fields(const fajit__tune_choice *c, int out[CHOICE_FIELDS])
{
    fajit__variant t = c->v;
    for (int i = 0; i < TILE_FIELDS; i++)
        out[i] = *tile_field(&t, i);
    out[TILE_FIELDS] = c->splits;
}

/* A record's split count is one tuning could have tried: 0 where the rule
 * decides (plan_splits 0), else 1..FAJIT__MAX_SPLITS. */
static int splits_valid(int splits, int plan_splits)
{
    return plan_splits == 0 ? splits == 0 : splits >= 1 && splits <= FAJIT__MAX_SPLITS;
}

static int consider_record(void *user, const uint8_t *key, size_t key_len, const uint8_t *value,
                           size_t value_len)
{
    best_search *bs = user;
    fajit__tuning_value tv;
    fajit__tune_choice c = {*bs->v, 0};
    int f[CHOICE_FIELDS];
    char why[160];
    if (key_len != bs->prefix_len + 4 * CHOICE_FIELDS ||
        fajit__tuning_value_decode(key, key_len, value, value_len, &tv, NULL) != 0)
        return 0;
    for (int i = 0; i < TILE_FIELDS; i++)
        *tile_field(&c.v, i) = (int)get_u32(key + bs->prefix_len + 4 * i);
    c.splits = (int)get_u32(key + bs->prefix_len + 4 * TILE_FIELDS);
    /* Only a candidate tuning itself could have chosen. */
    if (fajit__tune_static_refusal(&c.v, why, sizeof why) || fajit__variant_check(&c.v) != 0 ||
        !splits_valid(c.splits, bs->heuristic[TILE_FIELDS]))
        return 0;
    choice_fields(&c, f);
    double ns = (double)tv.median_ns;
    if (memcmp(f, bs->heuristic, sizeof f) == 0)
        ns *= HEURISTIC_PREFERENCE;
    if (!bs->found || ns < bs->best_ns) {
        bs->found = 1;
        bs->best_ns = ns;
        memcpy(bs->choice, f, sizeof f);
    }
    return 0;
}

/* The heuristic's tiles for v (whatever tiles v has) in a problem of the
 * few-rows class few_rows (fajit__heuristic_tiles_for's answer for its
 * shape): what the launch path runs untuned. */
static fajit__variant heuristic_of(const fajit__variant *v, int few_rows)
{
    fajit__variant h = *v;
    for (int i = 0; i < TILE_FIELDS; i++)
        *tile_field(&h, i) = FAJIT__UNSET;
    if (few_rows)
        fajit__few_rows_tiles(&h);
    else
        fajit__heuristic_tiles(&h);
    return h;
}

int fajit__tuned_tiles(fajit_ctx *ctx, const fajit__variant *v, int seqlen_bucket, int plan_splits,
                       int few_rows, const fajit__gpu_identity *gpu, fajit__tune_choice *out)
{
    uint8_t prefix[FAJIT__TUNING_KEY_MAX];
    memo_slot slot;
    if (!ctx || !v || !gpu || !out || !ctx->store ||
        (v->op != FAJIT__OP_FWD && v->op != FAJIT__OP_BWD))
        return FAJIT_ENOTFOUND;
    const fajit__tune_choice asked = {*v, 0};
    size_t n = fajit__tuning_key(gpu, ctx->build_id, &asked, seqlen_bucket, plan_splits, few_rows, 0,
                                 prefix, sizeof prefix);
    if (n > sizeof prefix)
        return FAJIT_ENOTFOUND;
    memset(&slot, 0, sizeof slot);
    memo_digest(ctx->cache_dir, prefix, n, slot.digest);
    if (!memo_get(slot.digest, &slot)) {
        char saved[FAJIT__DETAIL_MAX];
        best_search bs = {v, n, 0, 0, {0}, {0}};
        const fajit__tune_choice h = {heuristic_of(v, few_rows), plan_splits};
        choice_fields(&h, bs.heuristic);
        snprintf(saved, sizeof saved, "%s", fajit__detail());
        int rc = fajit__store_tuning_iterate(ctx->store, prefix, n, consider_record, &bs);
        fajit__fail(0, "%s", saved); /* a lookup must not clobber the caller's detail */
        if (rc != 0)
            return FAJIT_ENOTFOUND; /* not remembered: the store may work next time */
        slot.found = bs.found;
        memcpy(slot.choice, bs.choice, sizeof slot.choice);
        memo_put(&slot);
    }
    if (!slot.found)
        return FAJIT_ENOTFOUND;
    out->v = *v;
    for (int i = 0; i < TILE_FIELDS; i++)
        *tile_field(&out->v, i) = slot.choice[i];
    out->splits = slot.choice[TILE_FIELDS];
    return 0;
}

int fajit__launch_tiles(fajit_ctx *ctx, const fajit__driver *drv, CUdevice dev, int64_t seqlen_k,
                        int plan_splits, int few_rows, fajit__variant *v, int *splits)
{
    /* One entry per op (fwd, bwd): training alternates them. */
    static _Thread_local struct {
        int valid, bucket, plan, few_rows, found, splits;
        unsigned generation;
        const fajit_ctx *ctx;
        CUdevice dev;
        fajit__variant in, out;
    } last[2];
    char saved[FAJIT__DETAIL_MAX];
    fajit__gpu_identity id;
    fajit__tune_choice tuned;
    int bucket, found = 0, op = v->op == FAJIT__OP_BWD;
    unsigned generation;

    if (splits)
        *splits = 0;
    if ((v->op != FAJIT__OP_FWD && v->op != FAJIT__OP_BWD) || !ctx->store || !ctx->tuned_tiles)
        return 0;
    bucket = fajit__seqlen_bucket(seqlen_k);
    generation = atomic_load_explicit(&memo_generation, memory_order_acquire);
    if (last[op].valid && last[op].ctx == ctx && last[op].dev == dev && last[op].bucket == bucket &&
        last[op].plan == plan_splits && last[op].few_rows == few_rows && last[op].generation == generation &&
        memcmp(&last[op].in, v, sizeof *v) == 0) {
        *v = last[op].out;
        if (splits)
            *splits = last[op].splits;
        return last[op].found;
    }
    last[op].valid = 0;
    snprintf(saved, sizeof saved, "%s", fajit__detail());
    if (fajit__gpu_identity_get(drv, dev, &id) != 0) {
        fajit__fail(0, "%s", saved); /* not the caller's error: the heuristic's tiles, retried next call */
        return 0;
    }
    found = fajit__tuned_tiles(ctx, v, bucket, plan_splits, few_rows, &id, &tuned) == 0;
    last[op].in = *v;
    if (found)
        *v = tuned.v;
    last[op].out = *v;
    last[op].splits = found ? tuned.splits : 0;
    last[op].ctx = ctx;
    last[op].dev = dev;
    last[op].bucket = bucket;
    last[op].plan = plan_splits;
    last[op].few_rows = few_rows;
    last[op].generation = generation;
    last[op].found = found;
    last[op].valid = 1;
    if (splits)
        *splits = last[op].splits;
    return found;
}

/* ---------------------------------------------------------------- problems */

static int parse_count(const char *s, int64_t *out)
{
    char *end;
    errno = 0;
    long long x = strtoll(s, &end, 10);
    if (errno || end == s || *end || x < 1 || x > 0x7fffffff)
        return -1;
    *out = x;
    return 0;
}

enum { SH_BATCH, SH_SEQLEN, SH_SEQLEN_Q, SH_SEQLEN_K, SH_NHEADS, SH_NHEADS_Q, SH_NHEADS_KV, SH_N };
static const char *const shape_words[SH_N] = {"batch",  "seqlen",  "seqlen_q", "seqlen_k",
                                              "nheads", "nheads_q", "nheads_kv"};

static int shape_index(const char *w, size_t name_len)
{
    for (int i = 0; i < SH_N; i++)
        if (strlen(shape_words[i]) == name_len && strncmp(w, shape_words[i], name_len) == 0)
            return i;
    return -1;
}

static int is_tile_word(const char *w, size_t name_len)
{
    static const char *const t[] = {"bm", "bn", "warps", "stages", "arch"};
    for (size_t i = 0; i < COUNT(t); i++)
        if (strlen(t[i]) == name_len && strncmp(w, t[i], name_len) == 0)
            return 1;
    return 0;
}

typedef struct shape_acc {
    int64_t val[SH_N];
    int set[SH_N];
} shape_acc;

/* One word of a problem line: a shape word into acc, else appended to spec. */
static int problem_word(const char *w, int line, shape_acc *acc, char *spec, size_t cap)
{
    const char *eq = strchr(w, '=');
    size_t name_len = eq ? (size_t)(eq - w) : strlen(w);
    int sh = shape_index(w, name_len);
    if (sh >= 0) {
        if (acc->set[sh])
            return fajit__fail(FAJIT_EPARSE, "line %d: word '%s': %s given twice", line, w,
                               shape_words[sh]);
        if (parse_count(eq + 1, &acc->val[sh]) != 0)
            return fajit__fail(FAJIT_EPARSE, "line %d: word '%s': must be a whole number in "
                               "1..2147483647", line, w);
        acc->set[sh] = 1;
        return 0;
    }
    if (eq && is_tile_word(w, name_len))
        return fajit__fail(FAJIT_EPARSE, "line %d: word '%s': tiles and arch are what tuning "
                           "chooses; leave them out", line, w);
    size_t used = strlen(spec), n = strlen(w);
    if (used + n + 2 > cap)
        return fajit__fail(FAJIT_EPARSE, "line %d: word '%s': line too long", line, w);
    if (used)
        spec[used++] = ' ';
    memcpy(spec + used, w, n + 1);
    return 0;
}

/* Both lengths (or heads) from the pair word or the single word. */
static int pick_pair(const shape_acc *a, int both, int first, int second, int line,
                     int64_t *x, int64_t *y)
{
    if (a->set[both] && (a->set[first] || a->set[second]))
        return fajit__fail(FAJIT_EPARSE, "line %d: word '%s': give %s or %s and %s, not both",
                           line, shape_words[both], shape_words[both], shape_words[first],
                           shape_words[second]);
    if (a->set[both]) {
        *x = *y = a->val[both];
        return 0;
    }
    if (!a->set[first] || !a->set[second])
        return fajit__fail(FAJIT_EPARSE, "line %d: no %s: give %s=N, or %s=N and %s=N", line,
                           shape_words[both], shape_words[both], shape_words[first],
                           shape_words[second]);
    *x = a->val[first];
    *y = a->val[second];
    return 0;
}

static int finish_problem(const shape_acc *a, const char *spec, int line, fajit__tune_problem *p)
{
    char why[160];
    int rc = fajit__spec_parse(spec, &p->v);
    if (rc != 0) { /* the spec parser numbers its one line 1: say ours */
        char detail[FAJIT__DETAIL_MAX];
        const char *d = fajit__detail();
        snprintf(detail, sizeof detail, "%s", strncmp(d, "line 1: ", 8) == 0 ? d + 8 : d);
        return fajit__fail(FAJIT_EPARSE, "line %d: %s", line, detail);
    }
    if (p->v.op != FAJIT__OP_FWD && p->v.op != FAJIT__OP_BWD)
        return fajit__fail(FAJIT_EPARSE, "line %d: word '%.*s': only ops fwd and bwd are tuned",
                           line, (int)strcspn(spec, " "), spec);
    if (p->v.bm != FAJIT__UNSET || p->v.arch != FAJIT__UNSET)
        return fajit__fail(FAJIT_EPARSE, "line %d: tiles and arch are what tuning chooses", line);
    /* Tiles every head dim takes, so only the variant's own fields can be refused. */
    fajit__variant probe = p->v;
    probe.bm = p->v.op == FAJIT__OP_BWD ? 64 : 128;
    probe.bn = 64;
    probe.warps = p->v.op == FAJIT__OP_BWD ? 4 : 8;
    probe.stages = 1;
    probe.arch = 90;
    if (fajit__tune_static_refusal(&probe, why, sizeof why) && strncmp(why, "acc", 3) != 0 &&
        strncmp(why, "shared", 6) != 0 && strncmp(why, "bm=", 3) != 0)
        return fajit__fail(FAJIT_EPARSE, "line %d: %s", line, why);
    p->batch = a->set[SH_BATCH] ? a->val[SH_BATCH] : 1;
    if ((rc = pick_pair(a, SH_SEQLEN, SH_SEQLEN_Q, SH_SEQLEN_K, line, &p->seqlen_q,
                        &p->seqlen_k)) != 0 ||
        (rc = pick_pair(a, SH_NHEADS, SH_NHEADS_Q, SH_NHEADS_KV, line, &p->nheads_q,
                        &p->nheads_kv)) != 0)
        return rc;
    if (p->nheads_q % p->nheads_kv != 0)
        return fajit__fail(FAJIT_EPARSE, "line %d: word 'nheads_kv=%lld': must divide nheads_q=%lld",
                           line, (long long)p->nheads_kv, (long long)p->nheads_q);
    if (p->batch > 65535 || p->nheads_q > 65535)
        return fajit__fail(FAJIT_EPARSE, "line %d: batch and nheads_q must be at most 65535", line);
    p->line = line;
    return 0;
}

/* One line, comment stripped, into *p; 1 if blank, 0 if parsed. */
static int parse_problem_line(char *text, int line, fajit__tune_problem *p)
{
    shape_acc acc;
    char spec[FAJIT__TUNE_LINE_MAX] = "";
    size_t tlen = 0;
    int words = 0, rc;
    memset(&acc, 0, sizeof acc);
    memset(p, 0, sizeof *p);
    for (char *save = NULL, *w = strtok_r(text, " \t\r\v\f", &save); w;
         w = strtok_r(NULL, " \t\r\v\f", &save), words++) {
        if ((rc = problem_word(w, line, &acc, spec, sizeof spec)) != 0)
            return rc;
        size_t n = strlen(w);
        if (tlen + n + 2 > sizeof p->text)
            return fajit__fail(FAJIT_EPARSE, "line %d: word '%s': line too long", line, w);
        if (tlen)
            p->text[tlen++] = ' ';
        memcpy(p->text + tlen, w, n + 1);
        tlen += n;
    }
    if (words == 0)
        return 1;
    return finish_problem(&acc, spec, line, p);
}

static int add_problem(fajit__tune_problem **list, size_t *n, size_t *cap,
                       const fajit__tune_problem *p)
{
    if (*n == *cap) {
        size_t c = *cap ? *cap * 2 : 32;
        void *grown = realloc(*list, c * sizeof **list);
        if (!grown)
            return fajit__fail(FAJIT_ENOMEM, "tune: %zu problems", c);
        *list = grown;
        *cap = c;
    }
    (*list)[(*n)++] = *p;
    return 0;
}

/* FlashAttention's benchmark grid (benchmarks/benchmark_flash_attention.py):
 * hidden 2048, batch * seqlen = 16384, its forward and its backward. */
static char *grid_text(void)
{
    static const int dims[] = {64, 128, 256}, seqlens[] = {512, 1024, 2048, 4096, 8192, 16384};
    static const char *const dtypes[] = {"fp16", "bf16"}, *const masks[] = {"none", "causal"},
                             *const ops[] = {"fwd", "bwd"};
    size_t cap = 128 * COUNT(ops) * COUNT(dims) * COUNT(seqlens) * 4, used = 0;
    char *text = malloc(cap);
    if (!text)
        return NULL;
    for (size_t o = 0; o < COUNT(ops); o++)
        for (size_t d = 0; d < COUNT(dims); d++)
            for (size_t m = 0; m < COUNT(masks); m++)
                for (size_t t = 0; t < COUNT(dtypes); t++)
                    for (size_t s = 0; s < COUNT(seqlens); s++)
                        used += (size_t)snprintf(text + used, cap - used,
                                                 "%s dqk=%d dtype=%s mask=%s batch=%d seqlen=%d "
                                                 "nheads=%d\n",
                                                 ops[o], dims[d], dtypes[t], masks[m],
                                                 16384 / seqlens[s], seqlens[s], 2048 / dims[d]);
    return text;
}

int fajit__tune_parse_problems(const char *text, fajit__tune_problem **out, size_t *n)
{
    char *own = text ? strdup(text) : grid_text();
    fajit__tune_problem p, *list = NULL;
    size_t count = 0, cap = 0;
    int rc = own ? 0 : fajit__fail(FAJIT_ENOMEM, "tune: problem text");
    char *line = own;
    for (int no = 1; rc == 0 && line; no++) {
        char *next = strchr(line, '\n');
        if (next)
            *next++ = '\0';
        line[strcspn(line, "#")] = '\0';
        rc = parse_problem_line(line, no, &p);
        if (rc == 1)
            rc = 0;
        else if (rc == 0)
            rc = add_problem(&list, &count, &cap, &p);
        line = next;
    }
    free(own);
    if (rc == 0 && count == 0)
        rc = fajit__fail(FAJIT_EPARSE, "tune: the problem list is empty");
    if (rc != 0) {
        free(list);
        return rc;
    }
    *out = list;
    *n = count;
    return 0;
}

/* ---------------------------------------------------------------- listing and clearing */

typedef struct list_item {
    fajit_tuning_record rec;
    uint8_t group[16]; /* XXH3-128 of the key without its tiles */
    double rank;       /* the median, the heuristic's scaled by HEURISTIC_PREFERENCE */
} list_item;

typedef struct list_state {
    const fajit_ctx *ctx;
    list_item *items;
    size_t n, cap;
    int status;
} list_state;

static void fill_record(const fajit_ctx *ctx, const fajit__gpu_identity *gpu,
                        const uint8_t build[16], const fajit__tune_choice *c, int bucket,
                        int plan_splits, int few_rows, const fajit__tuning_value *tv,
                        fajit_tuning_record *r)
{
    memset(r, 0, sizeof *r);
    snprintf(r->gpu_name, sizeof r->gpu_name, "%s", gpu->name);
    snprintf(r->gpu_arch, sizeof r->gpu_arch, "sm_%d", gpu->arch);
    r->sm_count = gpu->sm_count;
    r->driver_version = gpu->driver_version;
    r->current_build = memcmp(build, ctx->build_id, 16) == 0;
    fajit__variant_format(&c->v, r->variant, sizeof r->variant);
    r->seqlen_bucket = bucket;
    r->bm = c->v.bm;
    r->bn = c->v.bn;
    r->warps = c->v.warps;
    r->stages = c->v.stages;
    r->median_us = (double)tv->median_ns / 1000.0;
    r->samples = tv->samples;
    r->timestamp_ns = tv->timestamp_ns;
    r->splits = c->splits;
    r->plan_splits = plan_splits;
    r->few_rows = few_rows;
}

/* The heuristic's config: its tiles, and the rule's split count. */
static int is_heuristic_choice(const fajit__tune_choice *c, int plan_splits, int few_rows)
{
    fajit__variant h = heuristic_of(&c->v, few_rows);
    return memcmp(&h, &c->v, sizeof h) == 0 && c->splits == plan_splits;
}

static int list_one(void *user, const uint8_t *key, size_t key_len, const uint8_t *value,
                    size_t value_len)
{
    list_state *st = user;
    fajit__gpu_identity gpu;
    fajit__tuning_value tv;
    fajit__tune_choice c;
    uint8_t build[16];
    XXH128_canonical_t h;
    int bucket, plan_splits, few_rows;
    if (fajit__tuning_value_decode(key, key_len, value, value_len, &tv, NULL) != 0 ||
        fajit__tuning_key_decode(key, key_len, &gpu, build, &c, &bucket, &plan_splits, &few_rows) != 0)
        return 0; /* not a record this build can read: not listed */
    if (st->n == st->cap) {
        size_t cap = st->cap ? st->cap * 2 : 64;
        void *grown = realloc(st->items, cap * sizeof *st->items);
        if (!grown) {
            st->status = fajit__fail(FAJIT_ENOMEM, "tuning list of %zu records", cap);
            return 1;
        }
        st->items = grown;
        st->cap = cap;
    }
    list_item *it = &st->items[st->n++];
    fill_record(st->ctx, &gpu, build, &c, bucket, plan_splits, few_rows, &tv, &it->rec);
    it->rank = (double)tv.median_ns *
               (is_heuristic_choice(&c, plan_splits, few_rows) ? HEURISTIC_PREFERENCE : 1.0);
    XXH128_canonicalFromHash(&h, XXH3_128bits(key, key_len - 4 * CHOICE_FIELDS));
    memcpy(it->group, h.digest, 16);
    return 0;
}

/* Marks the record launches use in each run of records sharing a group (the
 * lowest median, the heuristic's preferred as in fajit__tuned_tiles; records
 * of one group are adjacent: the tiles and splits are the key's last bytes). */
static void mark_best(list_item *items, size_t n)
{
    for (size_t start = 0; start < n;) {
        size_t end = start + 1, best = start;
        while (end < n && memcmp(items[end].group, items[start].group, 16) == 0) {
            if (items[end].rank < items[best].rank)
                best = end;
            end++;
        }
        items[best].rec.best = 1;
        start = end;
    }
}

int fajit_tuning_list(fajit_ctx *ctx, fajit_tuning_fn fn, void *user)
{
    list_state st = {ctx, NULL, 0, 0, 0};
    fajit__clear_error();
    if (!ctx || !fn)
        return fajit__fail(FAJIT_EINVAL, "%s: NULL", ctx ? "fn" : "ctx");
    if (!ctx->store)
        return 0;
    int rc = fajit__store_tuning_iterate(ctx->store, NULL, 0, list_one, &st);
    if (rc == 0)
        rc = st.status;
    if (rc == 0) {
        mark_best(st.items, st.n);
        for (size_t i = 0; i < st.n && !fn(user, &st.items[i].rec); i++)
            ;
    }
    free(st.items);
    return rc;
}

int fajit_tuning_clear(fajit_ctx *ctx)
{
    fajit__clear_error();
    if (!ctx)
        return fajit__fail(FAJIT_EINVAL, "ctx: NULL");
    if (!ctx->store || ctx->cache_mode != FAJIT_CACHE_READWRITE)
        return fajit__fail(FAJIT_EREADONLY, "tuning: cache %s is not open read-write",
                           ctx->cache_dir);
    int rc = fajit__store_tuning_del(ctx->store, NULL, 0, NULL);
    fajit__tuned_forget();
    return rc;
}

/* ---------------------------------------------------------------- bundles */

static int set_add(fajit__tuning_set *s, const uint8_t *key, size_t kl, const uint8_t *value,
                   size_t vl)
{
    if (s->n == s->cap) {
        size_t cap = s->cap ? s->cap * 2 : 64;
        void *k = realloc(s->keys, cap * sizeof *s->keys);
        if (k)
            s->keys = k;
        void *kls = realloc(s->key_lens, cap * sizeof *s->key_lens);
        if (kls)
            s->key_lens = kls;
        void *v = realloc(s->values, cap * sizeof *s->values);
        if (v)
            s->values = v;
        void *vls = realloc(s->value_lens, cap * sizeof *s->value_lens);
        if (vls)
            s->value_lens = vls;
        if (!k || !kls || !v || !vls)
            return -1;
        s->cap = cap;
    }
    uint8_t *copy = malloc(kl + vl);
    if (!copy)
        return -1;
    memcpy(copy, key, kl);
    memcpy(copy + kl, value, vl);
    s->keys[s->n] = copy;
    s->key_lens[s->n] = kl;
    s->values[s->n] = copy + kl;
    s->value_lens[s->n++] = vl;
    return 0;
}

typedef struct collect_state {
    fajit__tuning_set *set;
    int out_of_memory;
} collect_state;

static int collect_one(void *user, const uint8_t *key, size_t key_len, const uint8_t *value,
                       size_t value_len)
{
    collect_state *st = user;
    if (fajit__tuning_value_decode(key, key_len, value, value_len, NULL, NULL) != 0)
        return 0; /* a bad record is left out, as export leaves bad entries out */
    st->out_of_memory = set_add(st->set, key, key_len, value, value_len) != 0;
    return st->out_of_memory;
}

int fajit__tuning_collect(fajit_ctx *ctx, fajit__tuning_set *set)
{
    collect_state st = {set, 0};
    memset(set, 0, sizeof *set);
    if (!ctx->store)
        return 0;
    int rc = fajit__store_tuning_iterate(ctx->store, NULL, 0, collect_one, &st);
    if (rc == 0 && st.out_of_memory)
        rc = fajit__fail(FAJIT_ENOMEM, "export: %zu tuning records", set->n + 1);
    return rc;
}

void fajit__tuning_set_free(fajit__tuning_set *set)
{
    for (size_t i = 0; i < set->n; i++)
        free(set->keys[i]);
    free(set->keys);
    free(set->key_lens);
    free(set->values);
    free(set->value_lens);
    memset(set, 0, sizeof *set);
}

int fajit__tuning_bundle_check(const fajit__bundle_view *b, const char **why, size_t *bad_index)
{
    for (size_t i = 0; i < b->tuning_count; i++) {
        const uint8_t *k, *v;
        size_t kl, vl;
        fajit__bundle_tuning_item(b, i, &k, &kl, &v, &vl);
        if (fajit__tuning_value_decode(k, kl, v, vl, NULL, why) != 0) {
            *bad_index = i;
            return FAJIT_ECORRUPT;
        }
    }
    return 0;
}

int fajit__tuning_bundle_merge(fajit_ctx *ctx, const fajit__bundle_view *b, uint64_t *merged)
{
    size_t n = b->tuning_count;
    const uint8_t **keys = calloc(n ? n : 1, sizeof *keys), **values = calloc(n ? n : 1,
                                                                                sizeof *values);
    size_t *lens = calloc(n ? n : 1, sizeof *lens);
    int rc = keys && values && lens ? 0 : fajit__fail(FAJIT_ENOMEM, "import: %zu tuning records", n);
    for (size_t i = 0; rc == 0 && i < n; i++) {
        size_t vl;
        fajit__bundle_tuning_item(b, i, &keys[i], &lens[i], &values[i], &vl);
    }
    if (rc == 0)
        rc = fajit__store_tuning_put_many(ctx->store, n, keys, lens, values);
    if (rc == 0) {
        *merged = n;
        fajit__tuned_forget();
    }
    free(keys);
    free(values);
    free(lens);
    return rc;
}

/* ---------------------------------------------------------------- fajit_tune: state */

enum { CAND_KEPT = 0, CAND_PRUNED = 1, CAND_REJECTED = 2 };

typedef struct tune_cand {
    fajit__variant v;
    int state;
    int is_heuristic; /* what runs today: always compiled and timed, the baseline */
    char why[256];
} tune_cand;

typedef struct tune_group {
    fajit__variant base; /* tiles unset, arch set */
    int few_rows;        /* the problems' few-rows class: it picks the heuristic's tiles */
    tune_cand *cands;    /* the heuristic config first */
    size_t n;
    int checked;         /* outputs compared on this group's first problem */
} tune_group;

typedef struct tune_run {
    fajit_ctx *ctx;
    fajit_tune_options opt;
    fajit_tune_result res;
    fajit__tune_problem *problems;
    size_t nproblems;
    size_t *group_of;
    tune_group *groups;
    size_t ngroups;
    pthread_mutex_t lock; /* the job counter, progress events */
    tune_cand **jobs;
    size_t njobs, next_job, jobs_done;
} tune_run;

static void emit(tune_run *r, int kind, size_t done, size_t total, const char *problem,
                 const fajit__variant *v, int splits, const char *why, double median_us,
                 double heur_us)
{
    char text[FAJIT__VARIANT_TEXT_MAX] = "";
    if (!r->opt.progress)
        return;
    if (v)
        fajit__variant_format(v, text, sizeof text);
    fajit_tune_event ev = {kind, done, total, problem ? problem : "", text, why ? why : "",
                           median_us, heur_us, splits};
    r->opt.progress(r->opt.progress_user, &ev);
}

static fajit__fwd_shape problem_shape(const fajit__tune_problem *p)
{
    fajit__fwd_shape sh = {p->batch, p->seqlen_q, p->seqlen_k, p->nheads_q, p->nheads_kv};
    return sh;
}

int fajit__tune_heuristic(const fajit__tune_problem *p, fajit__variant *out)
{
    const fajit__fwd_shape sh = problem_shape(p);
    *out = p->v;
    return fajit__heuristic_tiles_for(out, &sh);
}

/* The group of the problems sharing base and few_rows: their heuristic
 * config (fajit__tune_heuristic), then the other candidates. */
static int init_group(tune_run *r, tune_group *g, const fajit__variant *base, const fajit__variant *heuristic,
                      int few_rows)
{
    fajit__variant found[64];
    size_t n = fajit__tune_candidates(base, found, COUNT(found)), total;
    total = grid_size(base);
    g->base = *base;
    g->few_rows = few_rows;
    g->cands = calloc(n + 1, sizeof *g->cands);
    if (!g->cands)
        return fajit__fail(FAJIT_ENOMEM, "tune: %zu candidates", n + 1);
    g->cands[0].v = *heuristic;
    g->cands[0].is_heuristic = 1;
    g->n = 1;
    for (size_t i = 0; i < n && i < COUNT(found); i++)
        if (memcmp(&found[i], &g->cands[0].v, sizeof found[i]) != 0)
            g->cands[g->n++].v = found[i];
    r->res.candidates += total + (g->n == n + 1); /* the heuristic's, if outside the grid */
    r->res.pruned += total - n;
    return 0;
}

static int build_groups(tune_run *r, int arch)
{
    r->group_of = calloc(r->nproblems, sizeof *r->group_of);
    r->groups = calloc(r->nproblems, sizeof *r->groups);
    if (!r->group_of || !r->groups)
        return fajit__fail(FAJIT_ENOMEM, "tune: %zu problems", r->nproblems);
    for (size_t i = 0; i < r->nproblems; i++) {
        fajit__variant *v = &r->problems[i].v, h;
        size_t g = 0;
        v->arch = arch;
        v->arch_suffix = 0;
        /* Problems of one variant whose shapes get other heuristic tiles
         * (decoding, prefill) are tuned against their own baselines. */
        const int few_rows = fajit__tune_heuristic(&r->problems[i], &h);
        while (g < r->ngroups &&
               (memcmp(&r->groups[g].base, v, sizeof *v) != 0 || r->groups[g].few_rows != few_rows))
            g++;
        if (g == r->ngroups) {
            int rc = init_group(r, &r->groups[g], v, &h, few_rows);
            if (rc)
                return rc;
            r->ngroups++;
        }
        r->group_of[i] = g;
    }
    return 0;
}

static void free_run(tune_run *r)
{
    for (size_t g = 0; g < r->ngroups; g++)
        free(r->groups[g].cands);
    free(r->groups);
    free(r->group_of);
    free(r->problems);
    free(r->jobs);
    pthread_mutex_destroy(&r->lock);
}

/* ---------------------------------------------------------------- fajit_tune: compiling */

static void compile_candidate(tune_run *r, tune_cand *c)
{
    uint8_t *entry = NULL;
    size_t len = 0;
    int cached = 0;
    fajit__entry_view view;
    const char *why = NULL;
    char buf[200];
    if (fajit__kernel_entry(r->ctx, &c->v, &entry, &len, &cached) != 0) {
        c->state = CAND_PRUNED;
        snprintf(c->why, sizeof c->why, "does not compile: %.200s", fajit__detail());
    } else if (fajit__entry_decode(entry, len, &view, &why) != 0) {
        c->state = CAND_PRUNED;
        snprintf(c->why, sizeof c->why, "bad cache entry: %s", why);
    } else if (!c->is_heuristic &&
               (why = fajit__tune_compiled_refusal(&c->v, &view.meta, buf, sizeof buf))) {
        c->state = CAND_PRUNED;
        snprintf(c->why, sizeof c->why, "%s", why);
    }
    free(entry);
}

static void *compile_worker(void *arg)
{
    tune_run *r = arg;
    for (;;) {
        pthread_mutex_lock(&r->lock);
        size_t i = r->next_job < r->njobs ? r->next_job++ : r->njobs;
        pthread_mutex_unlock(&r->lock);
        if (i == r->njobs)
            return NULL;
        tune_cand *c = r->jobs[i];
        compile_candidate(r, c);
        pthread_mutex_lock(&r->lock);
        r->jobs_done++;
        if (c->state == CAND_PRUNED)
            r->res.pruned++;
        else
            r->res.compiled++;
        emit(r, c->state == CAND_PRUNED ? FAJIT_TUNE_PRUNED : FAJIT_TUNE_COMPILED, r->jobs_done,
             r->njobs, "", &c->v, 0, c->state == CAND_PRUNED ? c->why : "", 0, 0);
        pthread_mutex_unlock(&r->lock);
    }
}

static int compile_all(tune_run *r)
{
    size_t n = 0;
    for (size_t g = 0; g < r->ngroups; g++)
        n += r->groups[g].n;
    r->jobs = calloc(n ? n : 1, sizeof *r->jobs);
    if (!r->jobs)
        return fajit__fail(FAJIT_ENOMEM, "tune: %zu compile jobs", n);
    for (size_t g = 0; g < r->ngroups; g++)
        for (size_t i = 0; i < r->groups[g].n; i++)
            r->jobs[r->njobs++] = &r->groups[g].cands[i];
    long cores = sysconf(_SC_NPROCESSORS_ONLN);
    int threads = r->opt.threads > 0 ? r->opt.threads : (int)(cores > 0 ? cores : 1);
    if ((size_t)threads > n)
        threads = n ? (int)n : 1;
    pthread_t *t = calloc((size_t)threads, sizeof *t);
    int started = 0;
    for (; t && started < threads - 1; started++)
        if (pthread_create(&t[started], NULL, compile_worker, r) != 0)
            break; /* fewer threads is slower, not wrong */
    compile_worker(r);
    for (int i = 0; i < started; i++)
        pthread_join(t[i], NULL);
    free(t);
    return 0;
}

/* ---------------------------------------------------------------- fajit_tune: on the GPU */

#define MAX_SETS 8
#define TOLERANCE 1e-2 /* max |o - o_heuristic| for unit-variance inputs */
/* Gradients grow with the sequence (dK and dV sum over query rows) and are
 * rounded to 16 bits after fp32 sums in another order per tile shape: the
 * bound is relative to the largest gradient. */
#define BWD_TOLERANCE 2e-2
#define BWD_LSE 8.0f /* the LSE the backward is given: about ln 4096 (any finite value works) */

typedef struct gpu_state {
    const fajit__driver *drv;
    CUcontext cu;
    int pushed, any_bwd;
    unsigned long long cu_id;
    CUstream stream;
    CUevent *ev; /* a start and a stop event for each timed launch */
    int nev;
    /* q, k, v, o (the backward's input O too), dO, dq, dk, dv (the last four
     * only with a bwd problem), per set */
    CUdeviceptr q[MAX_SETS], k[MAX_SETS], v[MAX_SETS], o[MAX_SETS], dout[MAX_SETS],
        dq[MAX_SETS], dk[MAX_SETS], dv[MAX_SETS];
    CUdeviceptr lse, slopes, cu_q, cu_k; /* read only: one of each */
    int sets, filled_dtype;
    size_t qb, kb, vb, ob, lseb, heads, seqs; /* the largest problem's bytes, heads, batch */
    uint16_t *host_ref, *host_out;
    double *decoded; /* the value of each 16-bit pattern in filled_dtype: checks read
                        hundreds of millions of outputs */
    fajit__gpu_identity gpu;
} gpu_state;

/* One candidate as launched: the variant, its split count, and its kernels
 * (fwd: fn; bwd: the three variants, the candidate's in the middle). */
typedef struct tune_launch {
    fajit__variant v;
    int splits;
    CUfunction fn;
    fajit__variant bwd[3];
} tune_launch;

static size_t q_elems(const fajit__tune_problem *p)
{
    return (size_t)(p->batch * p->seqlen_q * p->nheads_q * p->v.dqk);
}
static size_t k_elems(const fajit__tune_problem *p)
{
    return (size_t)(p->batch * p->seqlen_k * p->nheads_kv * p->v.dqk);
}
static size_t v_elems(const fajit__tune_problem *p)
{
    return (size_t)(p->batch * p->seqlen_k * p->nheads_kv * p->v.dv);
}
static size_t o_elems(const fajit__tune_problem *p)
{
    return (size_t)(p->batch * p->seqlen_q * p->nheads_q * p->v.dv);
}

static int is_bwd(const fajit__tune_problem *p)
{
    return p->v.op == FAJIT__OP_BWD;
}

static int cu_check(CUresult res, const char *what)
{
    return res == CUDA_SUCCESS ? 0 : fajit__cu_fail(res, what);
}

static size_t set_bytes(const gpu_state *g)
{
    return g->qb + g->kb + g->vb + g->ob + (g->any_bwd ? g->ob + g->qb + g->kb + g->vb : 0);
}

/* As many buffer sets as keep two L2s' worth of data between reuses. */
static int count_sets(gpu_state *g, CUdevice dev)
{
    int l2 = 0;
    size_t free_b = 0, total_b = 0, set = set_bytes(g);
    g->drv->deviceGetAttribute(&l2, CU_DEVICE_ATTRIBUTE_L2_CACHE_SIZE, dev);
    int sets = (int)((2 * (size_t)l2 + set - 1) / set) + 1;
    if (g->drv->memGetInfo(&free_b, &total_b) == CUDA_SUCCESS && set > 0 &&
        (size_t)sets * set > free_b / 2)
        sets = (int)(free_b / 2 / set);
    return sets < 1 ? 1 : sets > MAX_SETS ? MAX_SETS : sets;
}

static int alloc_one(gpu_state *g, CUdeviceptr *p, size_t bytes, const char *what)
{
    return bytes ? cu_check(g->drv->memAlloc(p, bytes), what) : 0;
}

static int alloc_buffers(gpu_state *g, CUdevice dev)
{
    int rc = 0;
    size_t bwd = g->any_bwd ? 1 : 0, host = g->ob > g->qb + g->kb + g->vb ? g->ob : g->qb + g->kb + g->vb;
    g->sets = count_sets(g, dev);
    for (int s = 0; rc == 0 && s < g->sets; s++)
        if ((rc = alloc_one(g, &g->q[s], g->qb, "cuMemAlloc(q)")) ||
            (rc = alloc_one(g, &g->k[s], g->kb, "cuMemAlloc(k)")) ||
            (rc = alloc_one(g, &g->v[s], g->vb, "cuMemAlloc(v)")) ||
            (rc = alloc_one(g, &g->o[s], g->ob, "cuMemAlloc(o)")) ||
            (rc = alloc_one(g, &g->dout[s], bwd * g->ob, "cuMemAlloc(dout)")) ||
            (rc = alloc_one(g, &g->dq[s], bwd * g->qb, "cuMemAlloc(dq)")) ||
            (rc = alloc_one(g, &g->dk[s], bwd * g->kb, "cuMemAlloc(dk)")) ||
            (rc = alloc_one(g, &g->dv[s], bwd * g->vb, "cuMemAlloc(dv)")))
            break;
    if (rc == 0 && ((rc = alloc_one(g, &g->lse, g->lseb, "cuMemAlloc(lse)")) ||
                    (rc = alloc_one(g, &g->slopes, g->heads * sizeof(float), "cuMemAlloc(slopes)")) ||
                    (rc = alloc_one(g, &g->cu_q, (g->seqs + 1) * sizeof(int32_t), "cuMemAlloc(cu_q)")) ||
                    (rc = alloc_one(g, &g->cu_k, (g->seqs + 1) * sizeof(int32_t), "cuMemAlloc(cu_k)"))))
        return rc;
    g->host_ref = malloc(host);
    g->host_out = malloc(host);
    g->decoded = malloc(65536 * sizeof *g->decoded);
    if (rc == 0 && (!g->host_ref || !g->host_out || !g->decoded))
        rc = fajit__fail(FAJIT_ENOMEM, "tune: host copies of %zu bytes", host);
    return rc;
}

static void gpu_teardown(gpu_state *g)
{
    if (!g->drv)
        return;
    for (int s = 0; s < MAX_SETS; s++) {
        CUdeviceptr *bufs[] = {&g->q[s], &g->k[s], &g->v[s], &g->o[s],
                               &g->dout[s], &g->dq[s], &g->dk[s], &g->dv[s]};
        for (size_t b = 0; b < COUNT(bufs); b++)
            if (*bufs[b])
                g->drv->memFree(*bufs[b]);
    }
    CUdeviceptr *one[] = {&g->lse, &g->slopes, &g->cu_q, &g->cu_k};
    for (size_t b = 0; b < COUNT(one); b++)
        if (*one[b])
            g->drv->memFree(*one[b]);
    for (int i = 0; i < g->nev; i++)
        g->drv->eventDestroy(g->ev[i]);
    free(g->ev);
    if (g->stream)
        g->drv->streamDestroy(g->stream);
    if (g->pushed)
        g->drv->ctxPopCurrent(&g->cu);
    free(g->host_ref);
    free(g->host_out);
    free(g->decoded);
}

static size_t max_size(size_t a, size_t b)
{
    return a > b ? a : b;
}

/* The largest problem's sizes, so one set of buffers serves every problem. */
static void size_buffers(const tune_run *r, gpu_state *g)
{
    for (size_t i = 0; i < r->nproblems; i++) {
        const fajit__tune_problem *p = &r->problems[i];
        g->qb = max_size(g->qb, 2 * q_elems(p));
        g->kb = max_size(g->kb, 2 * k_elems(p));
        g->vb = max_size(g->vb, 2 * v_elems(p));
        g->ob = max_size(g->ob, 2 * o_elems(p));
        g->heads = max_size(g->heads, (size_t)p->nheads_q);
        g->seqs = max_size(g->seqs, (size_t)p->batch);
        if (is_bwd(p)) {
            g->any_bwd = 1;
            g->lseb = max_size(g->lseb, (size_t)(p->batch * p->nheads_q * p->seqlen_q) * sizeof(float));
        }
    }
}

static int gpu_setup(tune_run *r, gpu_state *g)
{
    CUdevice dev;
    int rc = fajit__driver_get(&g->drv);
    if (rc)
        return rc;
    if (!g->drv->has_timing)
        return fajit__fail(FAJIT_ENOGPU, "the CUDA driver lacks the memory, stream or event "
                           "calls timing needs");
    if ((rc = fajit__enter_cuda(r->ctx, g->drv, &g->cu, &g->pushed)) != 0)
        return rc;
    g->cu_id = fajit__context_id(g->drv, g->cu);
    if ((rc = cu_check(g->drv->ctxGetDevice(&dev), "cuCtxGetDevice")) ||
        (rc = fajit__gpu_identity_get(g->drv, dev, &g->gpu)))
        return rc;
    size_buffers(r, g);
    g->filled_dtype = -1;
    if ((rc = cu_check(g->drv->streamCreate(&g->stream, CU_STREAM_NON_BLOCKING), "cuStreamCreate")))
        return rc;
    g->ev = calloc(2 * (size_t)r->opt.repeat, sizeof *g->ev);
    if (!g->ev)
        return fajit__fail(FAJIT_ENOMEM, "tune: %d events", 2 * r->opt.repeat);
    for (; g->nev < 2 * r->opt.repeat; g->nev++)
        if ((rc = cu_check(g->drv->eventCreate(&g->ev[g->nev], CU_EVENT_DEFAULT), "cuEventCreate")))
            return rc;
    return alloc_buffers(g, dev);
}

/* fp32 to fp16 / bf16 bits, round to nearest even; inputs are small normals. */
static uint16_t to_half_bits(float f, int dtype)
{
    uint32_t b;
    memcpy(&b, &f, 4);
    if (dtype == FAJIT_DTYPE_BF16)
        return (uint16_t)((b + 0x7fff + ((b >> 16) & 1)) >> 16);
    uint32_t sign = (b >> 16) & 0x8000;
    int exp = (int)((b >> 23) & 0xff) - 127 + 15;
    if (exp <= 0)
        return (uint16_t)sign; /* below fp16's normals: zero is close enough for inputs */
    uint32_t mant = b & 0x7fffff, half = sign | (uint32_t)exp << 10 | mant >> 13;
    uint32_t rest = mant & 0x1fff;
    if (rest > 0x1000 || (rest == 0x1000 && (half & 1)))
        half++;
    return (uint16_t)half;
}

static double from_half_bits(uint16_t h, int dtype)
{
    if (dtype == FAJIT_DTYPE_BF16) {
        uint32_t b = (uint32_t)h << 16;
        float f;
        memcpy(&f, &b, 4);
        return f;
    }
    int exp = (h >> 10) & 0x1f, mant = h & 0x3ff;
    double x = exp == 0 ? ldexp(mant, -24)
               : exp == 31 ? (mant ? NAN : INFINITY)
                           : ldexp(1024 + mant, exp - 25);
    return h & 0x8000 ? -x : x;
}

/* The read-only inputs of every set: q, k, v, o and dO from one sequence. */
static int upload_inputs(gpu_state *g, const uint16_t *h)
{
    const size_t at[5] = {0, g->qb, g->qb + g->kb, g->qb + g->kb + g->vb, g->qb + g->kb + g->vb + g->ob};
    int rc = 0;
    for (int s = 0; rc == 0 && s < g->sets; s++) {
        const CUdeviceptr dst[5] = {g->q[s], g->k[s], g->v[s], g->o[s], g->dout[s]};
        const size_t bytes[5] = {g->qb, g->kb, g->vb, g->ob, g->ob};
        for (int b = 0; rc == 0 && b < 5; b++)
            if (dst[b])
                rc = cu_check(g->drv->memcpyHtoD(dst[b], (const char *)h + at[b], bytes[b]),
                              "cuMemcpyHtoD(inputs)");
    }
    return rc;
}

/* The LSE the backward reads, and ALiBi's slopes 2^-1 .. 2^-8 by head. */
static int upload_constants(gpu_state *g)
{
    size_t n = max_size(g->lseb / sizeof(float), g->heads);
    float *f = malloc(max_size(n, 1) * sizeof(float));
    int rc = f ? 0 : fajit__fail(FAJIT_ENOMEM, "tune: %zu floats", n);
    for (size_t i = 0; rc == 0 && i < g->lseb / sizeof(float); i++)
        f[i] = BWD_LSE;
    if (rc == 0 && g->lse)
        rc = cu_check(g->drv->memcpyHtoD(g->lse, f, g->lseb), "cuMemcpyHtoD(lse)");
    for (size_t h = 0; rc == 0 && h < g->heads; h++)
        f[h] = ldexpf(1.0f, -1 - (int)(h % 8));
    if (rc == 0 && g->slopes)
        rc = cu_check(g->drv->memcpyHtoD(g->slopes, f, g->heads * sizeof(float)), "cuMemcpyHtoD(slopes)");
    free(f);
    return rc;
}

/* Unit-variance inputs: uniform on [-sqrt 3, sqrt 3], a fixed sequence. */
static int fill_inputs(gpu_state *g, int dtype)
{
    size_t n = (g->qb + g->kb + g->vb + 2 * g->ob) / 2;
    uint16_t *h = malloc(n * 2);
    uint64_t x = 0x9E3779B97F4A7C15ull;
    int rc = 0;
    if (!h)
        return fajit__fail(FAJIT_ENOMEM, "tune: input of %zu bytes", n * 2);
    for (size_t i = 0; i < n; i++) {
        x = x * 6364136223846793005ull + 1442695040888963407ull;
        float u = (float)((x >> 40) * (1.0 / 16777216.0));
        h[i] = to_half_bits((2.0f * u - 1.0f) * 1.7320508f, dtype);
    }
    rc = upload_inputs(g, h);
    if (rc == 0 && g->filled_dtype == -1)
        rc = upload_constants(g);
    free(h);
    for (uint32_t b = 0; b < 65536; b++)
        g->decoded[b] = from_half_bits((uint16_t)b, dtype);
    if (rc == 0)
        g->filled_dtype = dtype;
    return rc;
}

/* Varlen problems: batch sequences of equal length, so the dense layout is
 * the packed one (batch strides 0, sequence b at row b * seqlen). */
static int upload_seqlens(gpu_state *g, const fajit__tune_problem *p)
{
    int32_t *cu = malloc(2 * ((size_t)p->batch + 1) * sizeof *cu);
    int rc = cu ? 0 : fajit__fail(FAJIT_ENOMEM, "tune: cu_seqlens of %lld", (long long)p->batch);
    size_t n = (size_t)p->batch + 1;
    for (size_t b = 0; rc == 0 && b < n; b++) {
        cu[b] = (int32_t)((int64_t)b * p->seqlen_q);
        cu[n + b] = (int32_t)((int64_t)b * p->seqlen_k);
    }
    if (rc == 0)
        rc = cu_check(g->drv->memcpyHtoD(g->cu_q, cu, n * sizeof *cu), "cuMemcpyHtoD(cu_q)");
    if (rc == 0)
        rc = cu_check(g->drv->memcpyHtoD(g->cu_k, cu + n, n * sizeof *cu), "cuMemcpyHtoD(cu_k)");
    free(cu);
    return rc;
}

static void dense_strides(int64_t seqlen, int64_t heads, int64_t d, int varlen, int64_t out[3])
{
    out[0] = varlen ? 0 : seqlen * heads * d;
    out[1] = heads * d;
    out[2] = d;
}

/* What the forward's and the backward's params share (the same field names):
 * buffer set `set`'s q, k, v, o, dense strides (0 batch strides under
 * varlen), the problem's shape, the scale, and the per-call values of the
 * variant's features: softcap 30, dropout 0.1, ALiBi's slopes by head,
 * varlen's equal sequences. */
#define SET_COMMON_PARAMS(par, g, p, set)                                                       \
    do {                                                                                        \
        const int64_t dqk_ = (p)->v.dqk, dv_ = (p)->v.dv;                                       \
        const int vl_ = (p)->v.varlen;                                                          \
        (par)->q = (const void *)(uintptr_t)(g)->q[set];                                        \
        (par)->k = (const void *)(uintptr_t)(g)->k[set];                                        \
        (par)->v = (const void *)(uintptr_t)(g)->v[set];                                        \
        (par)->o = (void *)(uintptr_t)(g)->o[set];                                              \
        dense_strides((p)->seqlen_q, (p)->nheads_q, dqk_, vl_, (par)->q_stride);                \
        dense_strides((p)->seqlen_k, (p)->nheads_kv, dqk_, vl_, (par)->k_stride);               \
        dense_strides((p)->seqlen_k, (p)->nheads_kv, dv_, vl_, (par)->v_stride);                \
        dense_strides((p)->seqlen_q, (p)->nheads_q, dv_, vl_, (par)->o_stride);                 \
        (par)->batch = (int)(p)->batch;                                                         \
        (par)->seqlen_q = (int)(p)->seqlen_q;                                                   \
        (par)->seqlen_k = (int)(p)->seqlen_k;                                                   \
        (par)->nheads_q = (int)(p)->nheads_q;                                                   \
        (par)->nheads_kv = (int)(p)->nheads_kv;                                                 \
        (par)->softmax_scale = 1.0f / sqrtf((float)dqk_);                                       \
        (par)->softmax_scale_log2 = (par)->softmax_scale * 1.4426950408889634f;                 \
        (par)->softcap = (p)->v.softcap ? 30.0f : 0.0f;                                         \
        (par)->dropout_p = (p)->v.dropout ? 0.1f : 0.0f;                                        \
        (par)->dropout_scale = 1.0f / (1.0f - (par)->dropout_p);                                \
        (par)->dropout_seed = 1234;                                                             \
        (par)->alibi_slopes = (p)->v.alibi ? (const float *)(uintptr_t)(g)->slopes : NULL;      \
        (par)->cu_seqlens_q = vl_ ? (const int *)(uintptr_t)(g)->cu_q : NULL;                   \
        (par)->cu_seqlens_k = vl_ ? (const int *)(uintptr_t)(g)->cu_k : NULL;                   \
    } while (0)

static void make_params(const gpu_state *g, const fajit__tune_problem *p, int set,
                        struct fajit_fwd_params *par)
{
    memset(par, 0, sizeof *par);
    SET_COMMON_PARAMS(par, g, p, set);
}

static void make_bwd_params(const gpu_state *g, const fajit__tune_problem *p, int set,
                            struct fajit_bwd_params *par)
{
    memset(par, 0, sizeof *par);
    SET_COMMON_PARAMS(par, g, p, set);
    par->grad_out = (const void *)(uintptr_t)g->dout[set];
    par->lse = (const float *)(uintptr_t)g->lse;
    par->grad_q = (void *)(uintptr_t)g->dq[set];
    par->grad_k = (void *)(uintptr_t)g->dk[set];
    par->grad_v = (void *)(uintptr_t)g->dv[set];
    memcpy(par->grad_out_stride, par->o_stride, sizeof par->o_stride);
    memcpy(par->grad_q_stride, par->q_stride, sizeof par->q_stride);
    memcpy(par->grad_k_stride, par->k_stride, sizeof par->k_stride);
    memcpy(par->grad_v_stride, par->v_stride, sizeof par->v_stride);
}

/* The candidate's kernels: fwd its function; bwd the pre and post kernels
 * fajit_attn_bwd would run around the candidate's main kernel. */
static int prepare_launch(tune_run *r, gpu_state *g, const fajit__tune_problem *p,
                          const fajit__variant *v, int splits, tune_launch *l)
{
    l->v = *v;
    l->splits = splits;
    if (v->op != FAJIT__OP_BWD)
        return fajit__kernel_function(r->ctx, g->drv, v, g->cu_id, &l->fn);
    fajit_attn_bwd_args a;
    fajit_attn_bwd_args_init(&a);
    a.dqk = v->dqk;
    a.dv = v->dv;
    a.dtype = v->dtype;
    a.seqlen_q = p->seqlen_q;
    a.seqlen_k = p->seqlen_k;
    a.cu_seqlens_q = v->varlen ? (const int32_t *)(uintptr_t)g->cu_q : NULL;
    fajit__flash_bwd_variants(&a, v->arch, l->bwd);
    l->bwd[1] = *v;
    return 0;
}

/* One launch of the candidate on buffer set `set`: the forward as the launch
 * path plans it (the candidate's split count, or the rule's for 0), or the
 * whole fast backward. */
static int launch_on(tune_run *r, gpu_state *g, const tune_launch *l, const fajit__tune_problem *p,
                     int set)
{
    if (l->v.op == FAJIT__OP_BWD) {
        struct fajit_bwd_params bp;
        make_bwd_params(g, p, set, &bp);
        return fajit__flash_bwd_launch(r->ctx, g->drv, l->bwd, &bp, g->cu_id, g->stream);
    }
    struct fajit_fwd_params par;
    const fajit__fwd_shape sh = problem_shape(p);
    const fajit__split_plan plan = fajit__plan_split(&l->v, &sh, g->gpu.sm_count, l->splits, -1);
    make_params(g, p, set, &par);
    return fajit__fwd_launch_plan(g->drv, l->fn, &l->v, &par, &plan, 0, 0, g->stream);
}

static size_t output_elems(const fajit__tune_problem *p)
{
    return is_bwd(p) ? q_elems(p) + k_elems(p) + v_elems(p) : o_elems(p);
}

/* The candidate's output on buffer set 0 (bwd: dq, dk, dv), copied to host. */
static int output_of(tune_run *r, gpu_state *g, const fajit__tune_problem *p,
                     const fajit__variant *v, int splits, uint16_t *host)
{
    tune_launch l;
    int rc = prepare_launch(r, g, p, v, splits, &l);
    if (rc == 0)
        rc = launch_on(r, g, &l, p, 0);
    if (rc == 0)
        rc = cu_check(g->drv->streamSynchronize(g->stream), "cuStreamSynchronize");
    if (rc == 0 && !is_bwd(p))
        return cu_check(g->drv->memcpyDtoH(host, g->o[0], o_elems(p) * 2), "cuMemcpyDtoH(o)");
    if (rc == 0)
        rc = cu_check(g->drv->memcpyDtoH(host, g->dq[0], q_elems(p) * 2), "cuMemcpyDtoH(dq)");
    if (rc == 0)
        rc = cu_check(g->drv->memcpyDtoH(host + q_elems(p), g->dk[0], k_elems(p) * 2), "cuMemcpyDtoH(dk)");
    if (rc == 0)
        rc = cu_check(g->drv->memcpyDtoH(host + q_elems(p) + k_elems(p), g->dv[0], v_elems(p) * 2),
                      "cuMemcpyDtoH(dv)");
    return rc;
}

/* max |a - b|, NaN counting as the worst; *scale gets max |b|. */
static double max_abs_diff(const gpu_state *g, const uint16_t *a, const uint16_t *b, size_t n,
                           double *scale)
{
    double worst = 0, big = 0;
    for (size_t i = 0; i < n; i++) {
        double y = g->decoded[b[i]], d = fabs(g->decoded[a[i]] - y);
        if (!(d <= worst)) /* NaN counts as the worst */
            worst = d == d ? d : INFINITY;
        big = fabs(y) > big ? fabs(y) : big;
    }
    *scale = big;
    return worst;
}

/* Why the candidate's output disagrees with the reference output in
 * g->host_ref, into c->why; 0 if it agrees. */
static int disagrees(tune_run *r, gpu_state *g, const fajit__tune_problem *p, const fajit__variant *v,
                     int splits, int ref_rc, char *why, size_t cap)
{
    double scale = 0, diff = INFINITY, tol = TOLERANCE;
    if (ref_rc != 0) {
        snprintf(why, cap, "no reference output: %.200s", fajit__detail());
        return 1;
    }
    if (output_of(r, g, p, v, splits, g->host_out) != 0) {
        snprintf(why, cap, "failed to run: %.200s", fajit__detail());
        return 1;
    }
    diff = max_abs_diff(g, g->host_out, g->host_ref, output_elems(p), &scale);
    if (is_bwd(p))
        tol = BWD_TOLERANCE * (scale > 1 ? scale : 1);
    if (diff <= tol)
        return 0;
    snprintf(why, cap, "max |%s - heuristic's| = %g above %g", is_bwd(p) ? "grad" : "o", diff, tol);
    return 1;
}

static void reject(tune_run *r, const fajit__tune_problem *p, tune_cand *c, int splits)
{
    if (splits <= 0) /* a tile shape wrong for every split count: never timed again */
        c->state = CAND_REJECTED;
    r->res.rejected++;
    emit(r, FAJIT_TUNE_REJECTED, 0, 0, p->text, &c->v, splits, c->why, 0, 0);
}

/* Every candidate's output against the heuristic config's, on the group's
 * first problem; those that disagree are dropped for good. */
static void check_group(tune_run *r, gpu_state *g, const fajit__tune_problem *p, tune_group *grp)
{
    int rc = output_of(r, g, p, &grp->cands[0].v, 0, g->host_ref);
    grp->checked = 1;
    for (size_t i = 1; i < grp->n; i++) {
        tune_cand *c = &grp->cands[i];
        if (c->state == CAND_KEPT && disagrees(r, g, p, &c->v, 0, rc, c->why, sizeof c->why))
            reject(r, p, c, 0);
    }
}

static int cmp_float(const void *a, const void *b)
{
    float x = *(const float *)a, y = *(const float *)b;
    return x < y ? -1 : x > y;
}

/* Median of opt.repeat timed launches after opt.warmup, rotating buffer sets.
 * The launches are queued back to back, each between its own two events,
 * with one synchronisation at the end: a synchronisation between them would
 * return the stream-ordered scratch (split-KV partials, the backward's
 * accumulators) to the driver each time, and every launch would pay a fresh
 * allocation (about 50 us on an H100) that launches queued back to back, as
 * in a model's layers, do not. */
static int time_candidate(tune_run *r, gpu_state *g, const fajit__tune_problem *p,
                          const fajit__variant *v, int splits, uint64_t *median_ns)
{
    const fajit__driver *d = g->drv;
    tune_launch l;
    float ms[1000];
    int n = r->opt.repeat, rc = prepare_launch(r, g, p, v, splits, &l);
    for (int i = 0; rc == 0 && i < r->opt.warmup; i++)
        rc = launch_on(r, g, &l, p, i % g->sets);
    for (int i = 0; rc == 0 && i < n; i++)
        if ((rc = cu_check(d->eventRecord(g->ev[2 * i], g->stream), "cuEventRecord")) ||
            (rc = launch_on(r, g, &l, p, (r->opt.warmup + i) % g->sets)) ||
            (rc = cu_check(d->eventRecord(g->ev[2 * i + 1], g->stream), "cuEventRecord")))
            break;
    if (rc == 0)
        rc = cu_check(d->eventSynchronize(g->ev[2 * n - 1]), "cuEventSynchronize");
    for (int i = 0; rc == 0 && i < n; i++)
        rc = cu_check(d->eventElapsedTime(&ms[i], g->ev[2 * i], g->ev[2 * i + 1]), "cuEventElapsedTime");
    if (rc == 0) {
        qsort(ms, (size_t)n, sizeof ms[0], cmp_float);
        *median_ns = (uint64_t)((n % 2 ? ms[n / 2] : 0.5f * (ms[n / 2 - 1] + ms[n / 2])) * 1e6);
    }
    return rc;
}

static int record_timing(tune_run *r, gpu_state *g, const fajit__tune_problem *p,
                         const tune_group *grp, const fajit__variant *v, int splits, int plan_splits,
                         uint64_t median_ns)
{
    uint8_t key[FAJIT__TUNING_KEY_MAX];
    const fajit__tune_choice c = {*v, splits};
    size_t n = fajit__tuning_key(&g->gpu, r->ctx->build_id, &c, fajit__seqlen_bucket(p->seqlen_k),
                                 plan_splits, grp->few_rows, 1, key, sizeof key);
    fajit__tuning_value tv = {median_ns, now_realtime_ns(), (uint32_t)r->opt.repeat};
    if (n > sizeof key)
        return fajit__fail(FAJIT_EINVAL, "tune: tuning key of %zu bytes", n);
    return fajit__store_tuning_put(r->ctx->store, key, n, &tv);
}

/* The best (candidate, splits) of one problem so far, and the heuristic's. */
typedef struct problem_best {
    uint64_t best_ns, heur_ns;
    size_t best;
    int best_splits;
} problem_best;

/* Times candidate i of the group with each split count it takes on p
 * (split-KV problems: each checked against the heuristic config's output
 * first), recording every timing. */
static int time_splits(tune_run *r, gpu_state *g, const fajit__tune_problem *p, tune_group *grp,
                       size_t i, int plan_splits, int ref_rc, problem_best *pb)
{
    tune_cand *c = &grp->cands[i];
    int counts[8], rc = 0;
    size_t nc = fajit__tune_split_counts(&c->v, p->seqlen_k, plan_splits, counts, COUNT(counts));
    uint64_t t;
    for (size_t k = 0; rc == 0 && k < nc && k < COUNT(counts) && c->state == CAND_KEPT; k++) {
        const int is_heur = c->is_heuristic && counts[k] == plan_splits;
        if (plan_splits > 0 && !is_heur &&
            disagrees(r, g, p, &c->v, counts[k], ref_rc, c->why, sizeof c->why)) {
            reject(r, p, c, counts[k]);
            continue;
        }
        if ((rc = time_candidate(r, g, p, &c->v, counts[k], &t)) != 0 ||
            (rc = record_timing(r, g, p, grp, &c->v, counts[k], plan_splits, t)) != 0)
            return rc; /* a launch that fails after the check means a broken context */
        if (is_heur)
            pb->heur_ns = t;
        if (t < pb->best_ns) {
            pb->best_ns = t;
            pb->best = i;
            pb->best_splits = counts[k];
        }
        r->res.timed++;
        emit(r, FAJIT_TUNE_TIMED, i + 1, grp->n, p->text, &c->v, counts[k], "", t / 1e3,
             pb->heur_ns ? pb->heur_ns / 1e3 : 0);
    }
    return rc;
}

static int tune_problem(tune_run *r, gpu_state *g, size_t index)
{
    const fajit__tune_problem *p = &r->problems[index];
    tune_group *grp = &r->groups[r->group_of[index]];
    const fajit__fwd_shape sh = problem_shape(p);
    const int plan_splits = fajit__plan_splits(&grp->cands[0].v, &sh, g->gpu.sm_count);
    problem_best pb = {UINT64_MAX, 0, 0, 0};
    int ref_rc = 0, rc = g->filled_dtype == p->v.dtype ? 0 : fill_inputs(g, p->v.dtype);
    if (rc == 0 && p->v.varlen)
        rc = upload_seqlens(g, p);
    if (rc)
        return rc;
    if (!grp->checked)
        check_group(r, g, p, grp);
    if (plan_splits > 0) /* split counts are checked per problem, against the rule's */
        ref_rc = output_of(r, g, p, &grp->cands[0].v, plan_splits, g->host_ref);
    for (size_t i = 0; rc == 0 && i < grp->n; i++)
        rc = time_splits(r, g, p, grp, i, plan_splits, ref_rc, &pb);
    if (rc != 0 || pb.best_ns == UINT64_MAX)
        return rc;
    if (pb.heur_ns && (double)pb.best_ns > (double)pb.heur_ns * HEURISTIC_PREFERENCE) {
        pb.best = 0; /* what the launch path will choose (fajit__tuned_tiles) */
        pb.best_splits = plan_splits;
        pb.best_ns = pb.heur_ns;
    }
    r->res.improved += pb.best_ns < pb.heur_ns;
    emit(r, FAJIT_TUNE_WINNER, index + 1, r->nproblems, p->text, &grp->cands[pb.best].v,
         pb.best_splits, "", pb.best_ns / 1e3, pb.heur_ns / 1e3);
    return 0;
}

static int time_all(tune_run *r)
{
    gpu_state g;
    memset(&g, 0, sizeof g);
    int rc = gpu_setup(r, &g);
    for (size_t i = 0; rc == 0 && i < r->nproblems; i++)
        rc = tune_problem(r, &g, i);
    gpu_teardown(&g);
    fajit__tuned_forget();
    return rc;
}

/* ---------------------------------------------------------------- fajit_tune */

void fajit_tune_options_init(fajit_tune_options *opt)
{
    if (!opt)
        return;
    memset(opt, 0, sizeof *opt);
    opt->struct_size = sizeof *opt;
    opt->warmup = 3;
    opt->repeat = 10;
}

static int copy_options(const fajit_tune_options *in, fajit_tune_options *o)
{
    fajit_tune_options_init(o);
    if (!in)
        return 0;
    if (in->struct_size < offsetof(fajit_tune_options, problems) + sizeof in->problems ||
        in->struct_size > sizeof *in)
        return fajit__fail(FAJIT_EINVAL, "fajit_tune_options.struct_size=%u: not from "
                           "fajit_tune_options_init", in->struct_size);
    memcpy(o, in, in->struct_size);
    o->struct_size = sizeof *o;
    int rc = fajit__check_range("threads", o->threads, 0, 1024);
    if (rc == 0)
        rc = fajit__check_range("warmup", o->warmup, 0, 1000);
    if (rc == 0)
        rc = fajit__check_range("repeat", o->repeat, 1, 1000);
    return rc;
}

static void copy_result(const fajit_tune_result *in, fajit_tune_result *out)
{
    if (!out)
        return;
    size_t n = out->struct_size && out->struct_size < sizeof *out ? out->struct_size : sizeof *out;
    fajit_tune_result tmp = *in;
    tmp.struct_size = (uint32_t)n;
    memcpy(out, &tmp, n);
}

int fajit_tune(fajit_ctx *ctx, const fajit_tune_options *opt, fajit_tune_result *res)
{
    tune_run r;
    int rc;
    fajit__clear_error();
    if (!ctx)
        return fajit__fail(FAJIT_EINVAL, "ctx: NULL");
    memset(&r, 0, sizeof r);
    pthread_mutex_init(&r.lock, NULL);
    r.ctx = ctx;
    if ((rc = copy_options(opt, &r.opt)) != 0)
        goto done;
    if (!ctx->store || ctx->cache_mode != FAJIT_CACHE_READWRITE) {
        rc = fajit__fail(FAJIT_EREADONLY, "tune: cache %s is not open read-write, so timings "
                         "could not be kept", ctx->cache_dir);
        goto done;
    }
    if ((rc = fajit__tune_parse_problems(r.opt.problems, &r.problems, &r.nproblems)) != 0)
        goto done;
    r.res.problems = r.nproblems;
    if ((rc = build_groups(&r, fajit__default_arch(ctx))) != 0)
        goto done;
    double t0 = now_s();
    if ((rc = compile_all(&r)) != 0)
        goto done;
    r.res.compile_s = now_s() - t0;
    t0 = now_s();
    rc = time_all(&r);
    r.res.timing_s = now_s() - t0;
    if (rc == FAJIT_ENOGPU) {
        char why[FAJIT__DETAIL_MAX];
        snprintf(why, sizeof why, "%s", fajit__detail());
        rc = fajit__fail(FAJIT_ENOGPU, "no GPU to time on (%s); %llu candidates compiled and "
                         "cached, %llu pruned", why, (unsigned long long)r.res.compiled,
                         (unsigned long long)r.res.pruned);
    }
done:
    copy_result(&r.res, res);
    free_run(&r);
    return rc;
}
