/*
 * runtime/driver.h - the CUDA Driver API, opened with dlopen at first use so the
 * library loads, compiles and caches on a machine with no driver.
 */
#ifndef FAJIT_RUNTIME_DRIVER_H
#define FAJIT_RUNTIME_DRIVER_H

#include <cuda.h> /* types and constants only; every function comes through the table */

typedef struct fajit__driver {
    int version; /* cuDriverGetVersion */
    CUresult (*init)(unsigned int);
    CUresult (*driverGetVersion)(int *);
    CUresult (*deviceGet)(CUdevice *, int);
    CUresult (*deviceGetCount)(int *);
    CUresult (*deviceGetAttribute)(int *, CUdevice_attribute, CUdevice);
    CUresult (*deviceGetName)(char *, int, CUdevice);
    CUresult (*primaryCtxRetain)(CUcontext *, CUdevice);
    CUresult (*primaryCtxRelease)(CUdevice);
    CUresult (*ctxGetCurrent)(CUcontext *);
    CUresult (*ctxPushCurrent)(CUcontext);
    CUresult (*ctxPopCurrent)(CUcontext *);
    CUresult (*ctxGetDevice)(CUdevice *);
    CUresult (*ctxGetId)(CUcontext, unsigned long long *); /* NULL before CUDA 12 */
    CUresult (*moduleLoadData)(CUmodule *, const void *);
    CUresult (*moduleUnload)(CUmodule);
    CUresult (*moduleGetFunction)(CUfunction *, CUmodule, const char *);
    CUresult (*funcSetAttribute)(CUfunction, CUfunction_attribute, int);
    CUresult (*launchKernel)(CUfunction, unsigned, unsigned, unsigned, unsigned, unsigned,
                             unsigned, unsigned, CUstream, void **, void **);
    /* NULL before CUDA 12: launches with attributes (the split-KV combine's
     * programmatic dependent launch on sm_90) then go through launchKernel. */
    CUresult (*launchKernelEx)(const CUlaunchConfig *, CUfunction, void **, void **);
    CUresult (*getErrorName)(CUresult, const char **);
    CUresult (*getErrorString)(CUresult, const char **);
    /* Memory, streams and events, for timing (runtime/tune.c). In every driver
     * since CUDA 4, but loaded as a group apart: has_timing is 1 only if all
     * of them are there, so a minimal driver (a test stub) still serves
     * launches. */
    int has_timing;
    CUresult (*memAlloc)(CUdeviceptr *, size_t);
    CUresult (*memFree)(CUdeviceptr);
    CUresult (*memcpyHtoD)(CUdeviceptr, const void *, size_t);
    CUresult (*memcpyDtoH)(void *, CUdeviceptr, size_t);
    CUresult (*memGetInfo)(size_t *, size_t *);
    CUresult (*streamCreate)(CUstream *, unsigned int);
    CUresult (*streamDestroy)(CUstream);
    CUresult (*streamSynchronize)(CUstream);
    CUresult (*eventCreate)(CUevent *, unsigned int);
    CUresult (*eventDestroy)(CUevent);
    CUresult (*eventRecord)(CUevent, CUstream);
    CUresult (*eventSynchronize)(CUevent);
    CUresult (*eventElapsedTime)(float *, CUevent, CUevent);
    /* Stream-ordered scratch (CUDA 11.2+), loaded as a group apart:
     * has_async_alloc is 1 only if all are there. Kernels that need scratch
     * (split-KV partials, the backward's dQ accumulator) allocate it on the
     * caller's stream and free it there after the last kernel reading it, so
     * calls on different streams never share a buffer. */
    int has_async_alloc;
    CUresult (*memAllocAsync)(CUdeviceptr *, size_t, CUstream);
    CUresult (*memFreeAsync)(CUdeviceptr, CUstream);
    CUresult (*memsetD32Async)(CUdeviceptr, unsigned int, size_t, CUstream);
    /* The library's own pools (same CUDA version; NULL if any is missing:
     * scratch then comes from the device's default pool). */
    CUresult (*memPoolCreate)(CUmemoryPool *, const CUmemPoolProps *);
    CUresult (*memPoolSetAttribute)(CUmemoryPool, CUmemPool_attribute, void *);
    CUresult (*memAllocFromPoolAsync)(CUdeviceptr *, size_t, CUmemoryPool, CUstream);
} fajit__driver;

/* The driver table, loaded and cuInit'ed once per process. FAJIT_ENOGPU with a
 * detail saying why (no libcuda.so.1, cuInit failed, no device...) otherwise;
 * the outcome is remembered, so later calls cost nothing. */
int fajit__driver_get(const fajit__driver **out);

/* Records a CUDA failure: FAJIT_ECUDA (FAJIT_ENOGPU for "no device" errors) with
 * "<what>: CUDA_ERROR_NAME: description". */
int fajit__cu_fail(CUresult r, const char *what);

/* Stream-ordered scratch: `bytes` (at least 1) on `stream`, freed with
 * fajit__scratch_free on the same stream after the last kernel using it is
 * enqueued. FAJIT_ECUDA naming `what` when the driver lacks the calls or the
 * allocation fails (*out is 0 then). Needs a current context (the stream's).
 *
 * It comes from a memory pool the library makes per device, once per
 * process, that keeps up to FAJIT_SCRATCH_KEEP_BYTES (environment, read
 * when the pool is made; default 256 MiB) of freed scratch across
 * synchronisations. The default pool's release threshold is 0: every
 * synchronisation of the caller's stream handed the scratch back to the
 * driver, and the next split-KV or backward call paid ~50 us to map it
 * again. Owning the pool leaves the process's default pool, which the host
 * application may use and tune, as it was. */
int fajit__scratch_alloc(const fajit__driver *d, size_t bytes, CUstream stream, CUdeviceptr *out,
                         const char *what);
int fajit__scratch_free(const fajit__driver *d, CUdeviceptr p, CUstream stream);

#endif
