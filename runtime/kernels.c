/*
 * runtime/kernels.c - the lookup chain for a kernel:
 *   in-process table -> LMDB store -> compile (once across processes) -> load.
 */
#include <stdlib.h>
#include <string.h>
#include <xxhash.h>

#include "cache/hooks.h"
#include "runtime/runtime.h"

/* ---------------------------------------------------------------- keys */

static size_t append(uint8_t *buf, size_t at, const void *bytes, size_t n)
{
    memcpy(buf + at, bytes, n);
    return at + n;
}

void fajit__build_identity(uint8_t out[16])
{
    static const char tag[] = "fajit-build-identity-1";
    const fajit__hooks *h = &fajit__test_hooks; /* tests change one input at a time */
    const char *opts = h->options_text ? h->options_text : fajit__nvrtc_options_text();
    const uint8_t *codegen = h->codegen_digest ? h->codegen_digest : fajit__codegen_digest();
    uint32_t nvrtc = h->nvrtc_version ? h->nvrtc_version : fajit__nvrtc_version();
    uint32_t format = h->format_version ? h->format_version : FAJIT__ENTRY_FORMAT_VERSION;
    uint8_t buf[sizeof tag + 16 + 4 + 256 + 4];
    size_t n = 0, olen = strlen(opts) + 1;
    XXH128_canonical_t c;

    n = append(buf, n, tag, sizeof tag);
    n = append(buf, n, codegen, 16);
    n = append(buf, n, &nvrtc, sizeof nvrtc);
    n = append(buf, n, opts, olen < 256 ? olen : 256);
    n = append(buf, n, &format, sizeof format);
    XXH128_canonicalFromHash(&c, XXH3_128bits(buf, n));
    memcpy(out, c.digest, 16);
}

int fajit__variant_key(const fajit_ctx *ctx, const fajit__variant *v, fajit__full_key *key,
                       uint8_t digest[16])
{
    size_t n = fajit__variant_serialize(v, NULL, 0);
    XXH128_canonical_t c;
    if (n > sizeof key->bytes - 16) /* the serialisation's size is fixed: a build error */
        return fajit__fail(FAJIT_EUNSUPPORTED, "variant key of %zu bytes exceeds %zu", n + 16,
                           sizeof key->bytes);
    fajit__variant_serialize(v, key->bytes, n);
    memcpy(key->bytes + n, ctx->build_id, 16);
    key->len = n + 16;
    XXH128_canonicalFromHash(&c, XXH3_128bits(key->bytes, key->len));
    memcpy(digest, c.digest, 16);
    if (fajit__test_hooks.force_digest) /* a forced collision: the full key must catch it */
        memcpy(digest, fajit__test_hooks.digest, 16);
    return 0;
}

/* ---------------------------------------------------------------- entries */

/* One lookup of a kernel's entry. The cache is an optimisation: when a step
 * of it fails (a read, the key lock, a write) the kernel is compiled or kept
 * in memory and the call goes on. Only the first such step of a call is a
 * warning, so that a caller sees one per call, not one per step; the others
 * are logged at INFO. */
typedef struct lookup {
    fajit_ctx *ctx;
    const fajit__variant *v;
    fajit__full_key key;
    uint8_t digest[16];
    int warned;
    int keep_in_memory; /* compiled without the report its entry needs */
} lookup;

static void degraded(lookup *lk, const char *what)
{
    fajit__log(&lk->ctx->log, lk->warned ? FAJIT_LOG_INFO : FAJIT_LOG_WARN, "%s: %s", what,
               fajit__detail());
    lk->warned = 1;
}

/* Compiles lk's variant into an entry. The entry is made in the compiled
 * cubin's own buffer (runtime/compile.c leaves FAJIT__ENTRY_ROOM bytes after
 * it), so once NVRTC has produced the kernel nothing can lose it for want of
 * memory: storing it is then all that may fail, and that only costs a warning. */
static int compile_entry(lookup *lk, uint8_t **entry, size_t *entry_len)
{
    fajit__compiled c;
    int rc = fajit__compile_variant(lk->v, &c);
    if (rc == 0 && c.no_report) {
        lk->keep_in_memory = 1;
        degraded(lk, "kernel compiled without its resource report, kept in memory");
    }
    if (rc == 0) {
        rc = fajit__entry_encode_in_place(c.cubin, c.cubin_len + FAJIT__ENTRY_ROOM, &c.meta,
                                          lk->key.bytes, lk->key.len, c.cubin_len, entry_len);
        if (rc == 0) {
            *entry = c.cubin;
            c.cubin = NULL;
        }
    }
    fajit__compiled_free(&c);
    return rc;
}

static void store_entry(lookup *lk, const uint8_t *entry, size_t entry_len)
{
    if (lk->keep_in_memory)
        return;
    if (fajit__store_put(lk->ctx->store, lk->digest, entry, entry_len) != 0)
        degraded(lk, "cache put failed, kernel kept in memory");
}

/* The stored entry for lk, if the store has a valid one. A read that fails
 * for another reason than a miss (no memory, I/O) is a degraded step. */
static int stored_entry(lookup *lk, uint8_t **entry, size_t *entry_len)
{
    int rc = fajit__store_get(lk->ctx->store, lk->digest, lk->key.bytes, lk->key.len, entry,
                              entry_len);
    if (rc != 0 && rc != FAJIT_ENOTFOUND)
        degraded(lk, "cache read failed, treated as a miss");
    return rc == 0;
}

/* Miss in read-write mode: take the key's compile lock, look again (another
 * thread or process may have compiled it while we waited), else compile and
 * store. The lock is held across the compile on purpose: that is what makes a
 * stampede compile once. */
static int compile_once(lookup *lk, uint8_t **entry, size_t *entry_len, int *cached)
{
    fajit__keylock kl;
    int rc = fajit__store_lock_key(lk->ctx->store, lk->digest, &kl);
    if (rc != 0) {
        degraded(lk, "cache lock failed, kernel compiled in memory");
        return compile_entry(lk, entry, entry_len);
    }
    if (stored_entry(lk, entry, entry_len)) {
        *cached = 1;
        goto unlock;
    }
    rc = compile_entry(lk, entry, entry_len);
    if (rc == 0)
        store_entry(lk, *entry, *entry_len);
unlock:
    fajit__store_unlock_key(lk->ctx->store, &kl);
    return rc;
}

/* A fresh compile that replaces what the store holds (after the stored one
 * failed to load); in memory only unless the cache is writable. */
static int recompile_entry(lookup *lk, uint8_t **entry, size_t *entry_len)
{
    int rc = compile_entry(lk, entry, entry_len);
    if (rc == 0 && lk->ctx->store && lk->ctx->cache_mode == FAJIT_CACHE_READWRITE)
        store_entry(lk, *entry, *entry_len);
    return rc;
}

static int kernel_entry(fajit_ctx *ctx, const fajit__variant *v, int fresh, uint8_t **entry,
                        size_t *entry_len, int *cached)
{
    lookup lk;
    int rc;
    memset(&lk, 0, sizeof lk);
    lk.ctx = ctx;
    lk.v = v;
    rc = fajit__variant_key(ctx, v, &lk.key, lk.digest);
    if (rc != 0)
        return rc;
    *cached = 0;
    if (fresh)
        rc = recompile_entry(&lk, entry, entry_len);
    else if (ctx->store && stored_entry(&lk, entry, entry_len))
        *cached = 1;
    else if (ctx->store && ctx->cache_mode == FAJIT_CACHE_READWRITE)
        rc = compile_once(&lk, entry, entry_len, cached);
    else
        rc = compile_entry(&lk, entry, entry_len);
    return rc;
}

int fajit__kernel_entry(fajit_ctx *ctx, const fajit__variant *v, uint8_t **entry,
                        size_t *entry_len, int *cached)
{
    return kernel_entry(ctx, v, 0, entry, entry_len, cached);
}

/* ---------------------------------------------------------------- the table */

static uint64_t slot_hash(const fajit__variant *v, unsigned long long cu_ctx_id)
{
    return XXH3_64bits_withSeed(v, sizeof *v, cu_ctx_id);
}

static fajit__kernel_slot *table_find(fajit__kernel_table *t, const fajit__variant *v,
                                      unsigned long long cu_ctx_id)
{
    size_t mask, i;
    if (t->capacity == 0)
        return NULL;
    mask = t->capacity - 1;
    for (i = slot_hash(v, cu_ctx_id) & mask; t->slots[i].used; i = (i + 1) & mask) {
        if (t->slots[i].cu_ctx_id == cu_ctx_id &&
            memcmp(&t->slots[i].variant, v, sizeof *v) == 0)
            return &t->slots[i];
    }
    return NULL;
}

static void table_place(fajit__kernel_table *t, const fajit__kernel_slot *s)
{
    size_t mask = t->capacity - 1, i = slot_hash(&s->variant, s->cu_ctx_id) & mask;
    while (t->slots[i].used)
        i = (i + 1) & mask;
    t->slots[i] = *s;
    t->count++;
}

static int table_insert(fajit__kernel_table *t, const fajit__kernel_slot *s)
{
    if ((t->count + 1) * 4 > t->capacity * 3) {
        size_t cap = t->capacity ? t->capacity * 2 : 64;
        fajit__kernel_table grown = {calloc(cap, sizeof(fajit__kernel_slot)), cap, 0};
        if (!grown.slots)
            return fajit__fail(FAJIT_ENOMEM, "kernel table of %zu slots", cap);
        for (size_t i = 0; i < t->capacity; i++)
            if (t->slots[i].used)
                table_place(&grown, &t->slots[i]);
        free(t->slots);
        *t = grown;
    }
    table_place(t, s);
    return 0;
}

/* Entry view of a kernel ready for the driver; NULL *why if its cubin is for
 * v's arch. Decoding again costs microseconds and guarantees nothing
 * unchecked ever reaches cuModuleLoadData. */
static int check_loadable(const fajit__variant *v, const uint8_t *entry, size_t entry_len,
                          fajit__entry_view *view, const char **why)
{
    *why = NULL;
    if (fajit__entry_decode(entry, entry_len, view, why) != 0)
        return fajit__fail(FAJIT_ECORRUPT, "kernel entry: %s", *why ? *why : "invalid");
    if (view->meta.arch != (uint32_t)v->arch || view->meta.arch_suffix != (uint32_t)v->arch_suffix)
        *why = "its cubin is for another arch";
    return 0;
}

/* A stored entry the driver refused, or one for the wrong arch: drop it so
 * that the next process does not trip on it too, and count it as bad. */
static void evict_stored(fajit_ctx *ctx, const fajit__variant *v, const char *why)
{
    fajit__full_key key;
    uint8_t digest[16];
    fajit__store_count_bad(ctx->store);
    if (ctx->cache_mode == FAJIT_CACHE_READWRITE && fajit__variant_key(ctx, v, &key, digest) == 0)
        fajit__store_del(ctx->store, digest);
    fajit__log(&ctx->log, FAJIT_LOG_WARN, "cache: stored kernel %s; evicted, compiling it again",
               why);
}

/* Load failures that say the cubin itself is unusable here (rather than, say,
 * that the GPU is out of memory). */
static int is_image_error(CUresult r)
{
    return r == CUDA_ERROR_INVALID_IMAGE || r == CUDA_ERROR_NO_BINARY_FOR_GPU ||
           r == CUDA_ERROR_INVALID_PTX || r == CUDA_ERROR_UNSUPPORTED_PTX_VERSION ||
           r == CUDA_ERROR_INVALID_SOURCE || r == CUDA_ERROR_SHARED_OBJECT_INIT_FAILED;
}

/* Loads the entry's cubin; a cached one that fails to load is evicted and
 * compiled once more before giving up. */
static int load_module(fajit_ctx *ctx, const fajit__driver *drv, const fajit__variant *v,
                       CUmodule *module)
{
    for (int fresh = 0; fresh < 2; fresh++) {
        uint8_t *entry = NULL;
        size_t entry_len = 0;
        fajit__entry_view view;
        const char *why = NULL;
        int cached = 0;
        CUresult r = CUDA_SUCCESS;
        int rc = kernel_entry(ctx, v, fresh, &entry, &entry_len, &cached);
        if (rc == 0)
            rc = check_loadable(v, entry, entry_len, &view, &why);
        if (rc == 0 && !why) {
            r = drv->moduleLoadData(module, view.cubin);
            if (r != CUDA_SUCCESS)
                rc = fajit__cu_fail(r, "cuModuleLoadData");
        }
        free(entry);
        if (rc == 0 && !why)
            return 0;
        if (!cached || fresh || (r != CUDA_SUCCESS && !is_image_error(r)))
            return rc ? rc : fajit__fail(FAJIT_ECOMPILE, "kernel compiled for sm_%u, not sm_%d",
                                         view.meta.arch, v->arch);
        evict_stored(ctx, v, why ? why : fajit__detail());
    }
    return FAJIT_ECACHE; /* not reached */
}

static int load_function(fajit_ctx *ctx, const fajit__driver *drv, const fajit__variant *v,
                         fajit__kernel_slot *slot)
{
    const char *src_entry = NULL;
    CUresult r;
    int rc = fajit__variant_check(v);
    if (rc == 0)
        rc = load_module(ctx, drv, v, &slot->module);
    if (rc != 0)
        return rc;
    src_entry = fajit__variant_entry_name(v);
    r = drv->moduleGetFunction(&slot->function, slot->module, src_entry ? src_entry : "?");
    if (r != CUDA_SUCCESS)
        rc = fajit__cu_fail(r, "cuModuleGetFunction");
    if (rc == 0)
        rc = fajit__configure_function(drv, v, slot->function);
    if (rc != 0)
        drv->moduleUnload(slot->module);
    return rc;
}

int fajit__kernel_function(fajit_ctx *ctx, const fajit__driver *drv, const fajit__variant *v,
                           unsigned long long cu_ctx_id, CUfunction *fn)
{
    fajit__kernel_slot *hit, slot;
    int rc;

    pthread_mutex_lock(&ctx->lock);
    hit = table_find(&ctx->table, v, cu_ctx_id);
    if (hit)
        *fn = hit->function;
    pthread_mutex_unlock(&ctx->lock);
    if (hit)
        return 0;

    /* Miss: load outside the lock, so one slow compile does not stall other
     * threads' warm calls. Two threads may load the same kernel; the loser
     * unloads its copy. */
    memset(&slot, 0, sizeof slot);
    slot.variant = *v;
    slot.cu_ctx_id = cu_ctx_id;
    slot.used = 1;
    rc = load_function(ctx, drv, v, &slot);
    if (rc != 0)
        return rc;
    pthread_mutex_lock(&ctx->lock);
    hit = table_find(&ctx->table, v, cu_ctx_id);
    if (hit) {
        *fn = hit->function;
    } else {
        rc = table_insert(&ctx->table, &slot);
        *fn = slot.function;
    }
    pthread_mutex_unlock(&ctx->lock);
    if (hit || rc != 0)
        drv->moduleUnload(slot.module);
    return rc;
}

void fajit__kernel_table_free(fajit_ctx *ctx, const fajit__driver *drv)
{
    (void)drv; /* modules stay loaded: their CUDA contexts own them (see fajit_destroy) */
    free(ctx->table.slots);
    ctx->table.slots = NULL;
    ctx->table.capacity = ctx->table.count = 0;
}
