/*
 * runtime/context.c - options, the environment (read here and nowhere else),
 * context create/destroy, devices and CUDA contexts.
 */
#include <errno.h>
#include <stddef.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include "runtime/runtime.h"
#include "runtime/tune.h"

const char *fajit_version(void) { return FAJIT_VERSION_STRING; }

void fajit_options_init(fajit_options *opt)
{
    memset(opt, 0, sizeof *opt);
    opt->struct_size = sizeof *opt;
    opt->cache_mode = FAJIT_CACHE_DEFAULT;
    opt->log_level = FAJIT_LOG_DEFAULT;
    opt->device = -1;
    opt->cache_shared = -1;
}

/* Size of fajit_options before cache_max_bytes was appended. */
#define OPTIONS_SIZE_0_1_0 offsetof(fajit_options, cache_max_bytes)

/* The caller's options in the current layout: a struct from an older header
 * is copied over the current defaults. */
static int adopt_options(const fajit_options *opt, fajit_options *out)
{
    fajit_options_init(out);
    if (!opt)
        return 0;
    if (opt->struct_size != sizeof *opt && opt->struct_size != OPTIONS_SIZE_0_1_0)
        return fajit__fail(FAJIT_EINVAL,
                           "options struct_size=%u, expected %zu: call fajit_options_init",
                           opt->struct_size, sizeof *opt);
    memcpy(out, opt, opt->struct_size);
    out->struct_size = sizeof *out;
    return 0;
}

/* ---------------------------------------------------------------- environment */

static int env_word(const char *var, const char *const *words, int n, int *out)
{
    const char *s = getenv(var);
    if (!s || !*s)
        return 0;
    for (int i = 0; i < n; i++) {
        if (words[i] && strcasecmp(s, words[i]) == 0) {
            *out = i % (n / 2);
            return 0;
        }
    }
    return fajit__fail(FAJIT_EINVAL, "%s=%s: unknown value", var, s);
}

static int env_int(const char *var, long lo, long hi, long *out)
{
    const char *s = getenv(var);
    char *end;
    long v;
    if (!s || !*s)
        return 0;
    errno = 0;
    v = strtol(s, &end, 10);
    if (errno || *end || v < lo || v > hi)
        return fajit__fail(FAJIT_EINVAL, "%s=%s: expected an integer in %ld..%ld", var, s, lo, hi);
    *out = v;
    return 0;
}

/* Default cache directory: $FAJIT_CACHE_DIR, $XDG_CACHE_HOME/fajit, ~/.cache/fajit. */
static int default_cache_dir(char *buf, size_t cap)
{
    const char *dir = getenv("FAJIT_CACHE_DIR"), *xdg = getenv("XDG_CACHE_HOME");
    const char *home = getenv("HOME");
    int n;
    if (dir && *dir)
        n = snprintf(buf, cap, "%s", dir);
    else if (xdg && *xdg)
        n = snprintf(buf, cap, "%s/fajit", xdg);
    else if (home && *home)
        n = snprintf(buf, cap, "%s/.cache/fajit", home);
    else
        return fajit__fail(FAJIT_EINVAL, "no cache directory: set FAJIT_CACHE_DIR or HOME");
    if (n < 0 || (size_t)n >= cap)
        return fajit__fail(FAJIT_EINVAL, "cache directory path too long");
    return 0;
}

/* FAJIT_CACHE_MAX_BYTES and FAJIT_CACHE_SHARED, under their options. */
static int resolve_cache_policy(const fajit_options *opt, fajit__store_options *so)
{
    static const char *const flags[] = {"0", "1", "off", "on"};
    long max_bytes = 0;
    int shared = 0, rc;
    if ((rc = env_int("FAJIT_CACHE_MAX_BYTES", 0, LONG_MAX, &max_bytes)) != 0 ||
        (rc = env_word("FAJIT_CACHE_SHARED", flags, 4, &shared)) != 0)
        return rc;
    so->max_bytes = opt->cache_max_bytes ? opt->cache_max_bytes : (uint64_t)max_bytes;
    so->shared = opt->cache_shared < 0 ? shared : opt->cache_shared != 0;
    so->private_files = 1;
    return 0;
}

/* Explicit options override FAJIT_* variables, which override defaults. */
static int resolve_options(const fajit_options *opt, fajit_ctx *ctx, fajit__store_options *so)
{
    static const char *const modes[] = {"rw", "ro", "off", "readwrite", "readonly", NULL};
    static const char *const levels[] = {"off", "error", "warn", "info", "debug",
                                         "0",   "1",     "2",    "3",    "4"};
    int mode = FAJIT_CACHE_READWRITE, level = FAJIT_LOG_OFF, rc;
    long device = 0, map_mb = 256, tuned = 1, persist = -1;

    if ((rc = env_word("FAJIT_CACHE_MODE", modes, 6, &mode)) != 0 ||
        (rc = env_word("FAJIT_LOG_LEVEL", levels, 10, &level)) != 0 ||
        (rc = env_int("FAJIT_DEVICE", 0, FAJIT__MAX_DEVICES - 1, &device)) != 0 ||
        (rc = env_int("FAJIT_CACHE_MAP_MB", 1, 1L << 20, &map_mb)) != 0 ||
        (rc = env_int("FAJIT_TUNED_TILES", 0, 1, &tuned)) != 0 ||
        (rc = env_int("FAJIT_FWD_PERSIST", -1, INT_MAX, &persist)) != 0)
        return rc;
    ctx->tuned_tiles = (int)tuned;
    ctx->fwd_persist = (int)persist;
    ctx->cache_mode = opt->cache_mode == FAJIT_CACHE_DEFAULT ? mode : opt->cache_mode;
    ctx->log.level = opt->log_level == FAJIT_LOG_DEFAULT ? level : opt->log_level;
    ctx->log.fn = opt->log_fn;
    ctx->log.user = opt->log_user;
    ctx->device = opt->device < 0 ? (int)device : opt->device;
    so->map_bytes = opt->cache_map_bytes ? opt->cache_map_bytes : (uint64_t)map_mb << 20;
    if ((rc = resolve_cache_policy(opt, so)) != 0)
        return rc;
    if (ctx->cache_mode < FAJIT_CACHE_READWRITE || ctx->cache_mode > FAJIT_CACHE_OFF)
        return fajit__fail(FAJIT_EINVAL, "cache_mode=%d: expected 0 (rw), 1 (ro) or 2 (off)",
                           ctx->cache_mode);
    if (ctx->log.level < FAJIT_LOG_OFF || ctx->log.level > FAJIT_LOG_DEBUG)
        return fajit__fail(FAJIT_EINVAL, "log_level=%d: expected 0..4", ctx->log.level);
    if (ctx->device >= FAJIT__MAX_DEVICES)
        return fajit__fail(FAJIT_EINVAL, "device=%d: expected 0..%d", ctx->device,
                           FAJIT__MAX_DEVICES - 1);
    if (opt->cache_dir) {
        if (strlen(opt->cache_dir) >= sizeof ctx->cache_dir || !*opt->cache_dir)
            return fajit__fail(FAJIT_EINVAL, "cache_dir: empty or too long");
        strcpy(ctx->cache_dir, opt->cache_dir);
        return 0;
    }
    return default_cache_dir(ctx->cache_dir, sizeof ctx->cache_dir);
}

/* ---------------------------------------------------------------- create / destroy */

/* Opens the cache. A cache that cannot be used never fails the context: an
 * unwritable one is opened read-only (hits served, misses compiled in
 * memory); a refused one (untrusted, network filesystem...) or a broken one
 * is not used at all. Either way one warning says why. */
static int open_cache(fajit_ctx *ctx, const fajit__store_options *so)
{
    char why[1024];
    int rc;
    if (ctx->cache_mode == FAJIT_CACHE_OFF)
        return 0;
    rc = fajit__store_open_ex(ctx->cache_dir, ctx->cache_mode, so, &ctx->log, &ctx->store);
    if (rc == 0 || rc == FAJIT_EINVAL || rc == FAJIT_ENOMEM)
        return rc;
    snprintf(why, sizeof why, "%s", fajit__detail());
    if (rc == FAJIT_EREADONLY && ctx->cache_mode == FAJIT_CACHE_READWRITE &&
        fajit__store_open_ex(ctx->cache_dir, FAJIT_CACHE_READONLY, so, &ctx->log,
                             &ctx->store) == 0) {
        ctx->cache_mode = FAJIT_CACHE_READONLY;
        fajit__log(&ctx->log, FAJIT_LOG_WARN, "%s; using the cache read-only: hits served, "
                   "misses compiled in memory", why);
    } else {
        ctx->cache_mode = FAJIT_CACHE_OFF;
        fajit__log(&ctx->log, FAJIT_LOG_WARN, "%s; kernels are compiled in memory only", why);
    }
    fajit__clear_error();
    return 0;
}

int fajit_create(fajit_ctx **out, const fajit_options *opt)
{
    fajit_options o;
    fajit__store_options so;
    fajit_ctx *ctx;
    int rc;

    fajit__clear_error();
    if (!out)
        return fajit__fail(FAJIT_EINVAL, "out: NULL");
    *out = NULL;
    if ((rc = adopt_options(opt, &o)) != 0)
        return rc;
    opt = &o;
    memset(&so, 0, sizeof so);
    ctx = calloc(1, sizeof *ctx);
    if (!ctx)
        return fajit__fail(FAJIT_ENOMEM, "context");
    rc = resolve_options(opt, ctx, &so);
    if (rc != 0)
        goto free_ctx;
    fajit__build_identity(ctx->build_id);
    if ((rc = open_cache(ctx, &so)) != 0)
        goto free_ctx;
    pthread_mutex_init(&ctx->lock, NULL);
    fajit__log(&ctx->log, FAJIT_LOG_INFO, "context: cache %s (%s), device %d", ctx->cache_dir,
               ctx->cache_mode == FAJIT_CACHE_OFF        ? "off"
               : ctx->cache_mode == FAJIT_CACHE_READONLY ? "read-only"
                                                         : "read-write",
               ctx->device);
    *out = ctx;
    return 0;
free_ctx:
    free(ctx);
    return rc;
}

void fajit_destroy(fajit_ctx *ctx)
{
    const fajit__driver *drv = NULL;
    if (!ctx)
        return;
    if (ctx->primary && fajit__driver_get(&drv) == 0) {
        CUdevice dev;
        if (drv->deviceGet(&dev, ctx->device) == CUDA_SUCCESS)
            drv->primaryCtxRelease(dev);
    }
    fajit__kernel_table_free(ctx, drv);
    fajit__store_close(ctx->store); /* flushes the counters */
    fajit__tuned_forget(); /* a later context may get this address and another cache */
    pthread_mutex_destroy(&ctx->lock);
    free(ctx);
}

/* ---------------------------------------------------------------- devices */

int fajit__device_info_get(fajit_ctx *ctx, const fajit__driver *drv, CUdevice dev,
                           fajit__device_info *out)
{
    int major = 0, minor = 0, optin = 0;
    CUresult r;

    if (dev < 0 || dev >= FAJIT__MAX_DEVICES)
        return fajit__fail(FAJIT_EUNSUPPORTED, "device ordinal %d beyond %d", (int)dev,
                           FAJIT__MAX_DEVICES - 1);
    pthread_mutex_lock(&ctx->lock);
    *out = ctx->devices[dev];
    pthread_mutex_unlock(&ctx->lock);
    if (out->known)
        return 0;
    r = drv->deviceGetAttribute(&major, CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR, dev);
    if (r == CUDA_SUCCESS)
        r = drv->deviceGetAttribute(&minor, CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR, dev);
    if (r == CUDA_SUCCESS)
        r = drv->deviceGetAttribute(&optin,
                                    CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN, dev);
    if (r != CUDA_SUCCESS)
        return fajit__cu_fail(r, "cuDeviceGetAttribute");
    out->known = 1;
    out->arch = major * 10 + minor;
    out->smem_optin = optin;
    pthread_mutex_lock(&ctx->lock);
    ctx->devices[dev] = *out;
    pthread_mutex_unlock(&ctx->lock);
    return 0;
}

static int retain_primary(fajit_ctx *ctx, const fajit__driver *drv, CUcontext *cu)
{
    CUdevice dev;
    CUresult r;
    int rc = 0;

    pthread_mutex_lock(&ctx->lock);
    if (!ctx->primary) {
        r = drv->deviceGet(&dev, ctx->device);
        if (r == CUDA_SUCCESS)
            r = drv->primaryCtxRetain(&ctx->primary, dev);
        if (r != CUDA_SUCCESS) {
            ctx->primary = NULL;
            rc = fajit__cu_fail(r, "primary context of the chosen device");
        }
    }
    *cu = ctx->primary;
    pthread_mutex_unlock(&ctx->lock);
    return rc;
}

int fajit__enter_cuda(fajit_ctx *ctx, const fajit__driver *drv, CUcontext *cu, int *pushed)
{
    CUresult r = drv->ctxGetCurrent(cu);
    int rc;

    *pushed = 0;
    if (r != CUDA_SUCCESS)
        return fajit__cu_fail(r, "cuCtxGetCurrent");
    if (*cu)
        return 0;
    rc = retain_primary(ctx, drv, cu);
    if (rc != 0)
        return rc;
    r = drv->ctxPushCurrent(*cu);
    if (r != CUDA_SUCCESS)
        return fajit__cu_fail(r, "cuCtxPushCurrent");
    *pushed = 1;
    return 0;
}
