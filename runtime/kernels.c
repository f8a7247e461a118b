/*
 * runtime/kernels.c - the lookup chain for a kernel:
 *   in-process table -> LMDB store -> compile (once across processes) -> load.
 */
#include <stdlib.h>
#include <string.h>
#include <xxhash.h>

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
    const char *opts = fajit__nvrtc_options_text();
    uint32_t nvrtc = fajit__nvrtc_version(), format = FAJIT__ENTRY_FORMAT_VERSION;
    uint8_t buf[sizeof tag + 16 + 4 + 256 + 4];
    size_t n = 0, olen = strlen(opts) + 1;
    XXH128_canonical_t c;

    n = append(buf, n, tag, sizeof tag);
    n = append(buf, n, fajit__codegen_digest(), 16);
    n = append(buf, n, &nvrtc, sizeof nvrtc);
    n = append(buf, n, opts, olen < 256 ? olen : 256);
    n = append(buf, n, &format, sizeof format);
    XXH128_canonicalFromHash(&c, XXH3_128bits(buf, n));
    memcpy(out, c.digest, 16);
}

int fajit__variant_key(const fajit_ctx *ctx, const fajit__variant *v, uint8_t **full_key,
                       size_t *full_key_len, uint8_t digest[16])
{
    size_t n = fajit__variant_serialize(v, NULL, 0);
    XXH128_canonical_t c;
    uint8_t *buf = malloc(n + 16);
    if (!buf)
        return fajit__fail(FAJIT_ENOMEM, "variant key of %zu bytes", n + 16);
    fajit__variant_serialize(v, buf, n);
    memcpy(buf + n, ctx->build_id, 16);
    XXH128_canonicalFromHash(&c, XXH3_128bits(buf, n + 16));
    memcpy(digest, c.digest, 16);
    *full_key = buf;
    *full_key_len = n + 16;
    return 0;
}

/* ---------------------------------------------------------------- entries */

static int compile_entry(const fajit__variant *v, const uint8_t *full_key, size_t full_key_len,
                         uint8_t **entry, size_t *entry_len)
{
    fajit__compiled c;
    int rc = fajit__compile_variant(v, &c);
    if (rc != 0)
        return rc;
    rc = fajit__entry_encode(&c.meta, full_key, full_key_len, c.cubin, c.cubin_len, entry,
                             entry_len);
    fajit__compiled_free(&c);
    return rc;
}

/* Miss in read-write mode: take the key's compile lock, look again (another
 * thread or process may have compiled it while we waited), else compile and
 * store. The lock is held across the compile on purpose: that is what makes a
 * stampede compile once. */
static int compile_once(fajit_ctx *ctx, const fajit__variant *v, const uint8_t *full_key,
                        size_t full_key_len, const uint8_t digest[16], uint8_t **entry,
                        size_t *entry_len, int *cached)
{
    fajit__keylock lk;
    int rc = fajit__store_lock_key(ctx->store, digest, &lk);
    if (rc != 0)
        return rc;
    if (fajit__store_get(ctx->store, digest, full_key, full_key_len, entry, entry_len) == 0) {
        *cached = 1;
        goto unlock;
    }
    rc = compile_entry(v, full_key, full_key_len, entry, entry_len);
    if (rc == 0 && fajit__store_put(ctx->store, digest, *entry, *entry_len) != 0)
        fajit__log(&ctx->log, FAJIT_LOG_WARN, "cache put failed, kernel kept in memory: %s",
                   fajit__detail());
unlock:
    fajit__store_unlock_key(ctx->store, &lk);
    return rc;
}

int fajit__kernel_entry(fajit_ctx *ctx, const fajit__variant *v, uint8_t **entry,
                        size_t *entry_len, int *cached)
{
    uint8_t *full_key = NULL, digest[16];
    size_t full_key_len = 0;
    int rc = fajit__variant_key(ctx, v, &full_key, &full_key_len, digest);
    if (rc != 0)
        return rc;
    *cached = 0;
    if (ctx->store &&
        fajit__store_get(ctx->store, digest, full_key, full_key_len, entry, entry_len) == 0) {
        *cached = 1;
    } else if (ctx->store && ctx->cache_mode == FAJIT_CACHE_READWRITE) {
        rc = compile_once(ctx, v, full_key, full_key_len, digest, entry, entry_len, cached);
    } else {
        rc = compile_entry(v, full_key, full_key_len, entry, entry_len);
    }
    free(full_key);
    return rc;
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

static int load_function(fajit_ctx *ctx, const fajit__driver *drv, const fajit__variant *v,
                         fajit__kernel_slot *slot)
{
    uint8_t *entry = NULL;
    size_t entry_len = 0;
    fajit__entry_view view;
    const char *why = NULL, *src_entry = NULL;
    int cached = 0, rc;
    CUresult r;

    rc = fajit__variant_check(v);
    if (rc == 0)
        rc = fajit__kernel_entry(ctx, v, &entry, &entry_len, &cached);
    if (rc != 0)
        return rc;
    /* The store verified it already; decoding again costs microseconds and
     * guarantees nothing unchecked ever reaches cuModuleLoadData. */
    rc = fajit__entry_decode(entry, entry_len, &view, &why);
    if (rc != 0) {
        rc = fajit__fail(FAJIT_ECORRUPT, "kernel entry: %s", why ? why : "invalid");
        goto free_entry;
    }
    r = drv->moduleLoadData(&slot->module, view.cubin);
    if (r != CUDA_SUCCESS) {
        rc = fajit__cu_fail(r, "cuModuleLoadData");
        goto free_entry;
    }
    src_entry = fajit__variant_entry_name(v);
    r = drv->moduleGetFunction(&slot->function, slot->module, src_entry ? src_entry : "?");
    if (r != CUDA_SUCCESS)
        rc = fajit__cu_fail(r, "cuModuleGetFunction");
    if (rc == 0)
        rc = fajit__configure_function(drv, v, slot->function);
    if (rc != 0)
        drv->moduleUnload(slot->module);
free_entry:
    free(entry);
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
