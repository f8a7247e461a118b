/*
 * runtime/driver.c - loads libcuda.so.1 with dlopen, once per process.
 */
#include "runtime/driver.h"

#include <dlfcn.h>
#include <errno.h>
#include <pthread.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "runtime/error.h"

static fajit__driver drv;
static int drv_status;
static char drv_reason[512];
static pthread_once_t drv_once = PTHREAD_ONCE_INIT;

/* dlsym into a function-pointer field. Going through a void * copy keeps ISO C
 * happy about object-to-function pointer conversion. */
static int load_symbol(void *lib, const char *name, void *field, size_t size)
{
    void *sym = dlsym(lib, name);
    if (!sym)
        return -1;
    memcpy(field, &sym, size);
    return 0;
}

/* A driver entry point and the table field it goes into. */
typedef struct sym_entry {
    const char *name;
    size_t offset;
} sym_entry;

#define SYM(field, name) {name, offsetof(fajit__driver, field)}
static const sym_entry required[] = {
    SYM(init, "cuInit"),
    SYM(driverGetVersion, "cuDriverGetVersion"),
    SYM(deviceGet, "cuDeviceGet"),
    SYM(deviceGetCount, "cuDeviceGetCount"),
    SYM(deviceGetAttribute, "cuDeviceGetAttribute"),
    SYM(deviceGetName, "cuDeviceGetName"),
    SYM(primaryCtxRetain, "cuDevicePrimaryCtxRetain"),
    SYM(primaryCtxRelease, "cuDevicePrimaryCtxRelease_v2"),
    SYM(ctxGetCurrent, "cuCtxGetCurrent"),
    SYM(ctxPushCurrent, "cuCtxPushCurrent_v2"),
    SYM(ctxPopCurrent, "cuCtxPopCurrent_v2"),
    SYM(ctxGetDevice, "cuCtxGetDevice"),
    SYM(moduleLoadData, "cuModuleLoadData"),
    SYM(moduleUnload, "cuModuleUnload"),
    SYM(moduleGetFunction, "cuModuleGetFunction"),
    SYM(funcSetAttribute, "cuFuncSetAttribute"),
    SYM(launchKernel, "cuLaunchKernel"),
    SYM(getErrorName, "cuGetErrorName"),
    SYM(getErrorString, "cuGetErrorString"),
};

/* All or nothing: see has_timing in driver.h. */
static const sym_entry timing[] = {
    SYM(memAlloc, "cuMemAlloc_v2"),
    SYM(memFree, "cuMemFree_v2"),
    SYM(memcpyHtoD, "cuMemcpyHtoD_v2"),
    SYM(memcpyDtoH, "cuMemcpyDtoH_v2"),
    SYM(memGetInfo, "cuMemGetInfo_v2"),
    SYM(streamCreate, "cuStreamCreate"),
    SYM(streamDestroy, "cuStreamDestroy_v2"),
    SYM(streamSynchronize, "cuStreamSynchronize"),
    SYM(eventCreate, "cuEventCreate"),
    SYM(eventDestroy, "cuEventDestroy_v2"),
    SYM(eventRecord, "cuEventRecord"),
    SYM(eventSynchronize, "cuEventSynchronize"),
    SYM(eventElapsedTime, "cuEventElapsedTime"),
};

/* All or nothing: see has_async_alloc in driver.h. */
static const sym_entry async_alloc[] = {
    SYM(memAllocAsync, "cuMemAllocAsync"),
    SYM(memFreeAsync, "cuMemFreeAsync"),
    SYM(memsetD32Async, "cuMemsetD32Async"),
};

/* All or nothing too: see memPoolCreate in driver.h. */
static const sym_entry pools[] = {
    SYM(memPoolCreate, "cuMemPoolCreate"),
    SYM(memPoolSetAttribute, "cuMemPoolSetAttribute"),
    SYM(memAllocFromPoolAsync, "cuMemAllocFromPoolAsync"),
};
#undef SYM

/* Loads every entry of a group into drv; the name of the first one missing,
 * or NULL when all are there. */
static const char *load_group(void *lib, const sym_entry *group, size_t n)
{
    const char *missing = NULL;
    for (size_t i = 0; i < n; i++)
        if (load_symbol(lib, group[i].name, (char *)&drv + group[i].offset, sizeof drv.init) != 0 &&
            !missing)
            missing = group[i].name;
    return missing;
}
#define LOAD_GROUP(lib, group) load_group(lib, group, sizeof group / sizeof group[0])

static int load_symbols(void *lib)
{
    const char *missing = LOAD_GROUP(lib, required);
    if (missing) {
        snprintf(drv_reason, sizeof drv_reason, "libcuda.so.1 lacks %s: driver too old", missing);
        return FAJIT_ENOGPU;
    }
    /* Optional: a unique id per context (a destroyed context's address can be
     * reused by a new one, so the address alone is not a safe cache key). */
    if (load_symbol(lib, "cuCtxGetId", &drv.ctxGetId, sizeof drv.ctxGetId) != 0)
        drv.ctxGetId = NULL;
    if (load_symbol(lib, "cuLaunchKernelEx", &drv.launchKernelEx, sizeof drv.launchKernelEx) != 0)
        drv.launchKernelEx = NULL;
    drv.has_timing = LOAD_GROUP(lib, timing) == NULL;
    drv.has_async_alloc = LOAD_GROUP(lib, async_alloc) == NULL;
    if (LOAD_GROUP(lib, pools) != NULL)
        drv.memPoolCreate = NULL;
    return 0;
}

static void load_driver(void)
{
    const char *name = NULL;
    int count = 0;
    CUresult r;
    /* Never unloaded: CUfunctions handed out stay valid for the process. */
    void *lib = dlopen("libcuda.so.1", RTLD_NOW | RTLD_LOCAL);
    if (!lib) {
        snprintf(drv_reason, sizeof drv_reason, "no CUDA driver: cannot load libcuda.so.1 (%s)",
                 dlerror());
        drv_status = FAJIT_ENOGPU;
        return;
    }
    drv_status = load_symbols(lib);
    if (drv_status != 0)
        return;
    r = drv.init(0);
    if (r == CUDA_SUCCESS)
        r = drv.deviceGetCount(&count);
    if (r != CUDA_SUCCESS || count == 0) {
        if (r != CUDA_SUCCESS)
            drv.getErrorName(r, &name);
        snprintf(drv_reason, sizeof drv_reason, "no usable GPU: %s",
                 r != CUDA_SUCCESS ? (name ? name : "cuInit failed") : "the driver sees 0 devices");
        drv_status = FAJIT_ENOGPU;
        return;
    }
    drv.driverGetVersion(&drv.version);
    drv_status = 0;
}

int fajit__driver_get(const fajit__driver **out)
{
    pthread_once(&drv_once, load_driver);
    if (drv_status != 0) {
        *out = NULL;
        return fajit__fail(drv_status, "%s", drv_reason);
    }
    *out = &drv;
    return 0;
}

int fajit__cu_fail(CUresult r, const char *what)
{
    const char *name = "CUDA_ERROR_UNKNOWN", *text = "unknown error";
    if (drv.getErrorName)
        drv.getErrorName(r, &name);
    if (drv.getErrorString)
        drv.getErrorString(r, &text);
    return fajit__fail(r == CUDA_ERROR_NO_DEVICE || r == CUDA_ERROR_INVALID_DEVICE ? FAJIT_ENOGPU
                                                                                   : FAJIT_ECUDA,
                       "%s: %s: %s", what, name ? name : "?", text ? text : "?");
}

/* ---------------------------------------------------------------- scratch pools */

#define MAX_POOL_DEVICES 64
#define DEFAULT_KEEP_BYTES ((uint64_t)256 << 20)

static pthread_mutex_t pool_lock = PTHREAD_MUTEX_INITIALIZER;
static CUmemoryPool scratch_pools[MAX_POOL_DEVICES]; /* never destroyed: see driver.h */
static int pool_failed[MAX_POOL_DEVICES];            /* made once, or tried once */

/* FAJIT_SCRATCH_KEEP_BYTES: a decimal byte count; anything else (or unset)
 * gives the default. */
static uint64_t keep_bytes(void)
{
    const char *e = getenv("FAJIT_SCRATCH_KEEP_BYTES");
    char *end = NULL;
    unsigned long long n;
    if (!e || !*e)
        return DEFAULT_KEEP_BYTES;
    errno = 0;
    n = strtoull(e, &end, 10);
    return errno || *end || e[0] == '-' ? DEFAULT_KEEP_BYTES : (uint64_t)n;
}

static CUmemoryPool make_pool(const fajit__driver *d, CUdevice dev)
{
    CUmemPoolProps props;
    CUmemoryPool pool = NULL;
    uint64_t keep = keep_bytes();
    memset(&props, 0, sizeof props);
    props.allocType = CU_MEM_ALLOCATION_TYPE_PINNED;
    props.handleTypes = CU_MEM_HANDLE_TYPE_NONE;
    props.location.type = CU_MEM_LOCATION_TYPE_DEVICE;
    props.location.id = dev;
    if (d->memPoolCreate(&pool, &props) != CUDA_SUCCESS)
        return NULL;
    d->memPoolSetAttribute(pool, CU_MEMPOOL_ATTR_RELEASE_THRESHOLD, &keep); /* best effort */
    return pool;
}

/* The current device's scratch pool; NULL where the driver or device has
 * none (the default pool serves then). */
static CUmemoryPool scratch_pool(const fajit__driver *d)
{
    CUdevice dev = 0;
    CUmemoryPool pool = NULL;
    if (!d->memPoolCreate || d->ctxGetDevice(&dev) != CUDA_SUCCESS || dev < 0 ||
        dev >= MAX_POOL_DEVICES)
        return NULL;
    pthread_mutex_lock(&pool_lock);
    if (!scratch_pools[dev] && !pool_failed[dev]) {
        scratch_pools[dev] = make_pool(d, dev);
        pool_failed[dev] = scratch_pools[dev] == NULL;
    }
    pool = scratch_pools[dev];
    pthread_mutex_unlock(&pool_lock);
    return pool;
}

int fajit__scratch_alloc(const fajit__driver *d, size_t bytes, CUstream stream, CUdeviceptr *out,
                         const char *what)
{
    CUresult r;
    CUmemoryPool pool;
    *out = 0;
    if (!d->has_async_alloc)
        return fajit__fail(FAJIT_ECUDA, "%s needs %zu bytes of scratch, and this driver lacks "
                           "cuMemAllocAsync (CUDA 11.2 or later)", what, bytes);
    pool = scratch_pool(d);
    if (pool)
        r = d->memAllocFromPoolAsync(out, bytes ? bytes : 1, pool, stream);
    else
        r = d->memAllocAsync(out, bytes ? bytes : 1, stream);
    if (r != CUDA_SUCCESS) {
        *out = 0;
        return fajit__cu_fail(r, what);
    }
    return 0;
}

int fajit__scratch_free(const fajit__driver *d, CUdeviceptr p, CUstream stream)
{
    CUresult r;
    if (!p)
        return 0;
    r = d->memFreeAsync(p, stream);
    return r == CUDA_SUCCESS ? 0 : fajit__cu_fail(r, "cuMemFreeAsync(scratch)");
}
