/*
 * runtime/api.c - the public functions on variants, manifests and the cache,
 * on top of codegen/ and cache/. No GPU is needed by any of them.
 */
#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/stat.h>
#include <unistd.h>
#include <xxhash.h>

#include <nvrtc.h>

#include "cache/hooks.h"
#include "runtime/runtime.h"
#include "runtime/tune.h"

static void to_hex(const uint8_t *bytes, size_t n, char *out)
{
    static const char digits[] = "0123456789abcdef";
    for (size_t i = 0; i < n; i++) {
        out[2 * i] = digits[bytes[i] >> 4];
        out[2 * i + 1] = digits[bytes[i] & 15];
    }
    out[2 * n] = '\0';
}

static int spec_to_variant(fajit_ctx *ctx, const char *spec, fajit__variant *v)
{
    int rc;
    fajit__clear_error();
    if (!ctx || !spec)
        return fajit__fail(FAJIT_EINVAL, "%s: NULL", ctx ? "spec" : "ctx");
    rc = fajit__spec_parse(spec, v);
    if (rc == 0)
        rc = fajit__complete_spec(ctx, v);
    return rc;
}

int fajit_variant_complete(fajit_ctx *ctx, const char *spec, char *buf, size_t cap)
{
    fajit__variant v;
    int rc = spec_to_variant(ctx, spec, &v);
    if (rc == 0 && !buf)
        rc = fajit__fail(FAJIT_EINVAL, "buf: NULL");
    return rc != 0 ? rc : fajit__variant_format(&v, buf, cap);
}

/* ---------------------------------------------------------------- manifests */

struct expand_state {
    fajit_ctx *ctx;
    fajit_variant_fn fn;
    void *user;
    int status; /* an error of ours, as opposed to the caller's stop value */
};

static int expand_one(void *user, const fajit__variant *spec, int line)
{
    struct expand_state *st = user;
    char text[FAJIT__VARIANT_TEXT_MAX];
    fajit__variant v = *spec;
    int rc = fajit__complete_spec(st->ctx, &v);
    if (rc == 0)
        rc = fajit__variant_format(&v, text, sizeof text);
    if (rc < 0) {
        st->status = fajit__fail_prefix(rc, "line %d", line);
        return rc;
    }
    return st->fn(st->user, text);
}

int fajit_manifest_expand(fajit_ctx *ctx, const char *manifest, fajit_variant_fn fn, void *user)
{
    struct expand_state st = {ctx, fn, user, 0};
    int rc;
    fajit__clear_error();
    if (!ctx || !manifest || !fn)
        return fajit__fail(FAJIT_EINVAL, "%s: NULL", !ctx ? "ctx" : !manifest ? "manifest" : "fn");
    rc = fajit__manifest_expand(manifest, expand_one, &st);
    return st.status ? st.status : rc;
}

/* ---------------------------------------------------------------- source, compile */

int fajit_variant_source(fajit_ctx *ctx, const char *spec, char **src, size_t *len)
{
    fajit__variant v;
    const char *entry;
    size_t n = 0;
    int rc = spec_to_variant(ctx, spec, &v);
    if (rc == 0 && !src)
        rc = fajit__fail(FAJIT_EINVAL, "src: NULL");
    if (rc != 0)
        return rc;
    rc = fajit__render(&v, src, &n, &entry);
    if (rc == 0 && len)
        *len = n;
    return rc;
}

int fajit_compile(fajit_ctx *ctx, const char *spec, fajit_compile_result *res)
{
    fajit__variant v;
    fajit__entry_view view;
    fajit__full_key key;
    uint8_t *entry = NULL, digest[16];
    size_t entry_len = 0;
    int cached = 0, rc = spec_to_variant(ctx, spec, &v);

    if (rc == 0)
        rc = fajit__kernel_entry(ctx, &v, &entry, &entry_len, &cached);
    if (rc != 0 || !res)
        goto free_entry;
    if (fajit__entry_decode(entry, entry_len, &view, NULL) != 0 ||
        (rc = fajit__variant_key(ctx, &v, &key, digest)) != 0) {
        rc = rc ? rc : fajit__fail(FAJIT_ECORRUPT, "entry just built does not decode");
        goto free_entry;
    }
    memset(res, 0, sizeof *res);
    res->struct_size = sizeof *res;
    res->cached = cached;
    res->compile_ms = cached ? 0.0 : view.meta.compile_us / 1000.0;
    res->cubin_bytes = view.cubin_len;
    res->registers = (int)view.meta.registers;
    res->smem_bytes = (int)view.meta.smem_bytes;
    res->spill_bytes = (int)view.meta.spill_bytes;
    to_hex(digest, 16, res->key_hex);
free_entry:
    free(entry);
    return rc;
}

/* ---------------------------------------------------------------- cache listing */

/* Everything a listing says about one stored entry, valid or not. */
static void describe_entry(const fajit_ctx *ctx, const uint8_t key[16], const uint8_t *bytes,
                           size_t len, fajit_entry_info *e)
{
    fajit__entry_view view;
    fajit__variant v;
    XXH128_canonical_t c;
    const char *why = NULL;

    memset(e, 0, sizeof *e);
    to_hex(key, 16, e->key_hex);
    strcpy(e->variant, "?");
    e->entry_bytes = len;
    if (fajit__entry_decode(bytes, len, &view, &why) != 0) {
        snprintf(e->problem, sizeof e->problem, "%s", why ? why : "does not decode");
        return;
    }
    XXH128_canonicalFromHash(&c, XXH3_128bits(view.full_key, view.full_key_len));
    snprintf(e->arch, sizeof e->arch, "sm_%u%s", view.meta.arch, view.meta.arch_suffix ? "a" : "");
    e->cubin_bytes = view.cubin_len;
    e->registers = (int)view.meta.registers;
    e->smem_bytes = (int)view.meta.smem_bytes;
    e->spill_bytes = (int)view.meta.spill_bytes;
    e->compile_ms = view.meta.compile_us / 1000.0;
    e->nvrtc_version = view.meta.nvrtc_version;
    if (memcmp(c.digest, key, 16) != 0) {
        snprintf(e->problem, sizeof e->problem, "stored under a key that is not its digest");
        return;
    }
    e->valid = 1;
    if (view.full_key_len > 16) {
        e->current_build =
            memcmp(view.full_key + view.full_key_len - 16, ctx->build_id, 16) == 0;
        if (fajit__variant_deserialize(view.full_key, view.full_key_len - 16, &v) == 0)
            fajit__variant_format(&v, e->variant, sizeof e->variant);
    }
}

struct list_state {
    const fajit_ctx *ctx;
    fajit_entry_fn fn;
    void *user;
};

static int list_one(void *user, const uint8_t key[16], const uint8_t *bytes, size_t len)
{
    struct list_state *st = user;
    fajit_entry_info e;
    describe_entry(st->ctx, key, bytes, len, &e);
    return st->fn(st->user, &e);
}

int fajit_cache_list(fajit_ctx *ctx, fajit_entry_fn fn, void *user)
{
    struct list_state st = {ctx, fn, user};
    fajit__clear_error();
    if (!ctx || !fn)
        return fajit__fail(FAJIT_EINVAL, "%s: NULL", ctx ? "fn" : "ctx");
    return ctx->store ? fajit__store_iterate(ctx->store, list_one, &st) : 0;
}

/* ---------------------------------------------------------------- find, remove */

static int is_hex_prefix(const char *s)
{
    size_t n = strspn(s, "0123456789abcdefABCDEF");
    return n >= 6 && n <= 32 && s[n] == '\0';
}

struct find_state {
    const char *prefix;   /* hex prefix, or NULL */
    uint8_t digest[16];   /* exact key when prefix is NULL */
    fajit_entry_info *out;
    const fajit_ctx *ctx;
    int matches;
};

static int find_one(void *user, const uint8_t key[16], const uint8_t *bytes, size_t len)
{
    struct find_state *st = user;
    char hex[33];
    to_hex(key, 16, hex);
    if (st->prefix ? strncasecmp(hex, st->prefix, strlen(st->prefix)) != 0
                   : memcmp(key, st->digest, 16) != 0)
        return 0;
    if (st->matches++ == 0)
        describe_entry(st->ctx, key, bytes, len, st->out);
    return 0;
}

int fajit_cache_find(fajit_ctx *ctx, const char *key, fajit_entry_info *out)
{
    struct find_state st = {NULL, {0}, out, ctx, 0};
    fajit__variant v;
    fajit__full_key full_key;
    int rc;

    fajit__clear_error();
    if (!ctx || !key || !out)
        return fajit__fail(FAJIT_EINVAL, "%s: NULL", !ctx ? "ctx" : !key ? "key" : "out");
    if (is_hex_prefix(key)) {
        st.prefix = key;
    } else {
        if ((rc = spec_to_variant(ctx, key, &v)) != 0 ||
            (rc = fajit__variant_key(ctx, &v, &full_key, st.digest)) != 0)
            return fajit__fail_prefix(rc, "key '%s' is neither a hex digest nor a variant", key);
    }
    if (ctx->store && (rc = fajit__store_iterate(ctx->store, find_one, &st)) != 0)
        return rc;
    if (st.matches == 0)
        return fajit__fail(FAJIT_ENOTFOUND, "no cache entry for '%s'", key);
    if (st.matches > 1)
        return fajit__fail(FAJIT_EAMBIGUOUS, "'%s' matches %d entries", key, st.matches);
    return 0;
}

static void from_hex(const char *hex, uint8_t out[16])
{
    for (int i = 0; i < 16; i++) {
        char byte[3] = {hex[2 * i], hex[2 * i + 1], 0};
        out[i] = (uint8_t)strtoul(byte, NULL, 16);
    }
}

int fajit_cache_remove(fajit_ctx *ctx, const char *key)
{
    fajit_entry_info e;
    uint8_t digest[16];
    int rc;

    fajit__clear_error();
    if (!ctx)
        return fajit__fail(FAJIT_EINVAL, "ctx: NULL");
    if (!ctx->store)
        return key ? fajit__fail(FAJIT_ENOTFOUND, "cache is off") : 0;
    if (ctx->cache_mode == FAJIT_CACHE_READONLY)
        return fajit__fail(FAJIT_EREADONLY, "cache %s is open read-only", ctx->cache_dir);
    if (!key)
        return fajit__store_del(ctx->store, NULL);
    if ((rc = fajit_cache_find(ctx, key, &e)) != 0)
        return rc;
    from_hex(e.key_hex, digest);
    return fajit__store_del(ctx->store, digest);
}

/* ---------------------------------------------------------------- verify */

struct verify_state {
    const fajit_ctx *ctx;
    fajit_entry_fn fn;
    void *user;
    fajit_verify_result *res;
    uint8_t (*bad)[16]; /* keys to remove after the iteration */
    size_t nbad, capbad;
    int status;
};

static int verify_one(void *user, const uint8_t key[16], const uint8_t *bytes, size_t len)
{
    struct verify_state *st = user;
    fajit_entry_info e;
    describe_entry(st->ctx, key, bytes, len, &e);
    st->res->checked++;
    if (e.valid)
        return 0;
    st->res->bad++;
    if (st->fn)
        st->fn(st->user, &e);
    if (st->nbad == st->capbad) {
        size_t cap = st->capbad ? st->capbad * 2 : 16;
        void *grown = realloc(st->bad, cap * sizeof *st->bad);
        if (!grown) {
            st->status = fajit__fail(FAJIT_ENOMEM, "verify: list of bad keys");
            return 1;
        }
        st->bad = grown;
        st->capbad = cap;
    }
    memcpy(st->bad[st->nbad++], key, 16);
    return 0;
}

int fajit_cache_verify(fajit_ctx *ctx, int fix, fajit_entry_fn fn, void *user,
                       fajit_verify_result *res)
{
    fajit_verify_result local;
    struct verify_state st = {ctx, fn, user, res ? res : &local, NULL, 0, 0, 0};
    int rc;

    fajit__clear_error();
    if (!ctx)
        return fajit__fail(FAJIT_EINVAL, "ctx: NULL");
    memset(st.res, 0, sizeof *st.res);
    st.res->struct_size = sizeof *st.res;
    if (!ctx->store)
        return 0;
    rc = fajit__store_iterate(ctx->store, verify_one, &st);
    if (rc == 0 && st.status)
        rc = st.status;
    for (size_t i = 0; i < st.nbad; i++)
        fajit__store_count_bad(ctx->store);
    if (rc == 0 && fix && st.nbad && ctx->cache_mode == FAJIT_CACHE_READONLY)
        rc = fajit__fail(FAJIT_EREADONLY, "cannot fix: cache %s is open read-only",
                         ctx->cache_dir);
    for (size_t i = 0; rc == 0 && fix && i < st.nbad; i++) {
        rc = fajit__store_del(ctx->store, st.bad[i]);
        if (rc == 0)
            st.res->removed++;
    }
    free(st.bad);
    return rc;
}

/* ---------------------------------------------------------------- stats, info */

int fajit_cache_get_stats(fajit_ctx *ctx, fajit_cache_stats *out)
{
    fajit__store_counters c = {0, 0, 0, 0};
    int rc = 0;

    fajit__clear_error();
    if (!ctx || !out)
        return fajit__fail(FAJIT_EINVAL, "%s: NULL", ctx ? "out" : "ctx");
    memset(out, 0, sizeof *out);
    out->struct_size = sizeof *out;
    if (ctx->store)
        rc = fajit__store_stats(ctx->store, &out->entries, &out->bytes, &out->map_bytes, &c);
    out->hits = c.hits;
    out->misses = c.misses;
    out->compiles = c.compiles;
    out->bad_entries = c.bad_entries;
    return rc;
}

static void gpu_info(fajit_ctx *ctx, fajit_info *out)
{
    const fajit__driver *drv;
    fajit__device_info dinfo;
    CUdevice dev;
    CUresult r;

    if (fajit__driver_get(&drv) != 0) {
        snprintf(out->no_gpu_reason, sizeof out->no_gpu_reason, "%s", fajit__detail());
        return;
    }
    out->driver_version = drv->version;
    drv->deviceGetCount(&out->device_count);
    r = drv->deviceGet(&dev, ctx->device);
    if (r != CUDA_SUCCESS) {
        fajit__cu_fail(r, "cuDeviceGet");
        snprintf(out->no_gpu_reason, sizeof out->no_gpu_reason, "device %d: %s", ctx->device,
                 fajit__detail());
        return;
    }
    drv->deviceGetName(out->device_name, (int)sizeof out->device_name, dev);
    if (fajit__device_info_get(ctx, drv, dev, &dinfo) == 0)
        snprintf(out->device_arch, sizeof out->device_arch, "sm_%d", dinfo.arch);
}

int fajit_get_info(fajit_ctx *ctx, fajit_info *out)
{
    fajit__clear_error();
    if (!ctx || !out)
        return fajit__fail(FAJIT_EINVAL, "%s: NULL", ctx ? "out" : "ctx");
    memset(out, 0, sizeof *out);
    out->struct_size = sizeof *out;
    snprintf(out->cache_dir, sizeof out->cache_dir, "%s", ctx->cache_dir);
    out->cache_mode = ctx->cache_mode;
    nvrtcVersion(&out->nvrtc_major, &out->nvrtc_minor);
    to_hex(ctx->build_id, 16, out->build_id);
    gpu_info(ctx, out);
    fajit__clear_error(); /* the GPU probe's failures are reported in the struct */
    return 0;
}

/* ---------------------------------------------------------------- export, import */

/* Valid entries copied out of the store, for a bundle. */
struct export_state {
    const fajit_ctx *ctx;
    uint8_t (*keys)[16];
    uint8_t **entries;
    size_t *lens, n, cap;
    uint64_t skipped;
    int status;
};

static int export_grow(struct export_state *st)
{
    size_t cap = st->cap ? st->cap * 2 : 64;
    void *k = realloc(st->keys, cap * sizeof *st->keys);
    if (k)
        st->keys = k;
    void *e = realloc(st->entries, cap * sizeof *st->entries);
    if (e)
        st->entries = e;
    void *l = realloc(st->lens, cap * sizeof *st->lens);
    if (l)
        st->lens = l;
    if (!k || !e || !l)
        return fajit__fail(FAJIT_ENOMEM, "export: list of %zu entries", cap);
    st->cap = cap;
    return 0;
}

static int export_one(void *user, const uint8_t key[16], const uint8_t *bytes, size_t len)
{
    struct export_state *st = user;
    fajit_entry_info e;
    describe_entry(st->ctx, key, bytes, len, &e);
    if (!e.valid) {
        st->skipped++;
        return 0;
    }
    if (st->n == st->cap && (st->status = export_grow(st)) != 0)
        return 1;
    uint8_t *copy = fajit__malloc(len ? len : 1);
    if (!copy) {
        st->status = fajit__fail(FAJIT_ENOMEM, "export: entry of %zu bytes", len);
        return 1;
    }
    memcpy(copy, bytes, len);
    memcpy(st->keys[st->n], key, 16);
    st->entries[st->n] = copy;
    st->lens[st->n++] = len;
    return 0;
}

/* Writes buf to path through a temporary file and a rename, so a reader
 * never sees half a bundle. */
static int write_file_atomically(const char *path, const uint8_t *buf, size_t len)
{
    char tmp[4200];
    if (snprintf(tmp, sizeof tmp, "%s.tmp.%d", path, (int)getpid()) >= (int)sizeof tmp)
        return fajit__fail(FAJIT_EINVAL, "export: path too long: %s", path);
    FILE *f = fopen(tmp, "wbx");
    if (!f)
        return fajit__fail(FAJIT_EIO, "export: cannot create %s: %s", tmp, strerror(errno));
    int ok = fwrite(buf, 1, len, f) == len;
    ok &= fflush(f) == 0 && fsync(fileno(f)) == 0;
    ok &= fclose(f) == 0;
    if (!ok || rename(tmp, path) != 0) {
        int err = errno;
        unlink(tmp);
        return fajit__fail(FAJIT_EIO, "export: writing %s: %s", path, strerror(err));
    }
    return 0;
}

static void fill_bundle_result(fajit_bundle_result *res, uint64_t n, uint64_t bytes,
                               uint64_t skipped, const uint8_t digest[32])
{
    if (!res)
        return;
    memset(res, 0, sizeof *res);
    res->struct_size = sizeof *res;
    res->entries = n;
    res->bytes = bytes;
    res->skipped = skipped;
    to_hex(digest, 32, res->sha256);
}

int fajit_cache_export(fajit_ctx *ctx, const char *path, fajit_bundle_result *res)
{
    struct export_state st;
    fajit__tuning_set tuning = {0};
    uint8_t *bundle = NULL, digest[32];
    size_t len = 0;
    int rc = 0;
    fajit__clear_error();
    if (!ctx || !path)
        return fajit__fail(FAJIT_EINVAL, "%s: NULL", ctx ? "path" : "ctx");
    memset(&st, 0, sizeof st);
    st.ctx = ctx;
    if (ctx->store)
        rc = fajit__store_iterate(ctx->store, export_one, &st);
    if (rc == 0)
        rc = st.status;
    if (rc == 0)
        rc = fajit__tuning_collect(ctx, &tuning);
    if (rc == 0)
        rc = fajit__bundle_build_tuning(st.n, (const uint8_t(*)[16])st.keys,
                                        (const uint8_t *const *)st.entries, st.lens, tuning.n,
                                        (const uint8_t *const *)tuning.keys, tuning.key_lens,
                                        (const uint8_t *const *)tuning.values,
                                        tuning.value_lens, &bundle, &len, digest);
    fajit__tuning_set_free(&tuning);
    if (rc == 0)
        rc = write_file_atomically(path, bundle, len);
    if (rc == 0)
        fill_bundle_result(res, st.n, len, st.skipped, digest);
    for (size_t i = 0; i < st.n; i++)
        free(st.entries[i]);
    free(st.keys);
    free(st.entries);
    free(st.lens);
    free(bundle);
    return rc;
}

static int read_whole_file(const char *path, uint8_t **out, size_t *len)
{
    FILE *f = fopen(path, "rb");
    struct stat st;
    if (!f)
        return fajit__fail(FAJIT_EIO, "import: %s: %s", path, strerror(errno));
    if (fstat(fileno(f), &st) != 0 || !S_ISREG(st.st_mode)) {
        fclose(f);
        return fajit__fail(FAJIT_EIO, "import: %s: not a regular file", path);
    }
    size_t n = (size_t)st.st_size;
    uint8_t *buf = fajit__malloc(n ? n : 1);
    if (!buf) {
        fclose(f);
        return fajit__fail(FAJIT_ENOMEM, "import: %s: %zu bytes", path, n);
    }
    size_t got = fread(buf, 1, n, f);
    fclose(f);
    if (got != n) {
        free(buf);
        return fajit__fail(FAJIT_EIO, "import: %s: short read", path);
    }
    *out = buf;
    *len = n;
    return 0;
}

/* Entries of a verified bundle that the store lacks, merged in one write. */
static int merge_bundle(fajit_ctx *ctx, const fajit__bundle_view *b, uint64_t *merged,
                        uint64_t *bytes, uint64_t *skipped)
{
    size_t n = b->count ? b->count : 1, k = 0;
    const uint8_t **entries = fajit__malloc(n * sizeof *entries);
    size_t *lens = fajit__malloc(n * sizeof *lens);
    uint8_t(*keybuf)[16] = fajit__malloc(n * 16);
    int rc = entries && lens && keybuf ? 0 : fajit__fail(FAJIT_ENOMEM, "import: %zu entries", n);
    for (size_t i = 0; rc == 0 && i < b->count; i++) {
        const uint8_t *key, *entry, *have = NULL;
        size_t len, have_len = 0;
        fajit__entry_view view;
        fajit__bundle_item(b, i, &key, &entry, &len);
        fajit__entry_decode(entry, len, &view, NULL);
        if (fajit__store_get(ctx->store, key, view.full_key, view.full_key_len, (uint8_t **)&have,
                             &have_len) == 0 && have_len == len && memcmp(have, entry, len) == 0) {
            ++*skipped;
        } else {
            memcpy(keybuf[k], key, 16);
            entries[k] = entry;
            lens[k++] = len;
            *bytes += len;
        }
        free((void *)have);
    }
    fajit__clear_error(); /* the misses above are expected */
    if (rc == 0)
        rc = fajit__store_put_many(ctx->store, k, (const uint8_t(*)[16])keybuf, entries, lens);
    if (rc == 0)
        *merged = k;
    free(keybuf);
    free(entries);
    free(lens);
    return rc;
}

int fajit_cache_import(fajit_ctx *ctx, const char *path, const char *expect_sha256,
                       fajit_bundle_result *res)
{
    uint8_t *buf = NULL;
    size_t len = 0, bad_index = SIZE_MAX;
    fajit__bundle_view b;
    const char *why = NULL;
    char hex[65];
    uint64_t merged = 0, bytes = 0, skipped = 0, tuning = 0;
    int rc;
    fajit__clear_error();
    if (!ctx || !path)
        return fajit__fail(FAJIT_EINVAL, "%s: NULL", ctx ? "path" : "ctx");
    if (!ctx->store || ctx->cache_mode != FAJIT_CACHE_READWRITE)
        return fajit__fail(FAJIT_EREADONLY, "import: cache %s is not open read-write",
                           ctx->cache_dir);
    if ((rc = read_whole_file(path, &buf, &len)) != 0)
        return rc;
    if (fajit__bundle_parse(buf, len, &b, &why, &bad_index) != 0) {
        rc = bad_index == SIZE_MAX
                 ? fajit__fail(FAJIT_ECORRUPT, "import: %s: %s; nothing imported", path, why)
                 : fajit__fail(FAJIT_ECORRUPT, "import: %s: entry %zu: %s; nothing imported",
                               path, bad_index, why);
        goto free_buf;
    }
    if (fajit__tuning_bundle_check(&b, &why, &bad_index) != 0) {
        rc = fajit__fail(FAJIT_ECORRUPT, "import: %s: tuning record %zu: %s; nothing imported",
                         path, bad_index, why);
        goto free_buf;
    }
    to_hex(b.digest, 32, hex);
    if (expect_sha256 && strcasecmp(expect_sha256, hex) != 0) {
        rc = fajit__fail(FAJIT_ECORRUPT, "import: %s: manifest SHA-256 is %s, expected %s; "
                         "nothing imported", path, hex, expect_sha256);
        goto free_buf;
    }
    rc = merge_bundle(ctx, &b, &merged, &bytes, &skipped);
    if (rc == 0) /* after the entries: a record never names a kernel the cache lacks */
        rc = fajit__tuning_bundle_merge(ctx, &b, &tuning);
    if (rc == 0)
        fill_bundle_result(res, merged, bytes, skipped, b.digest);
free_buf:
    free(buf);
    return rc;
}
