/*
 * runtime/args.c - argument checks and context facts shared by the entry
 * points that launch (fajit_attn_fwd, fajit_attn_bwd), so each argument is
 * judged by one rule and every error reads the same.
 */
#include "runtime/runtime.h"

int fajit__check_range(const char *name, int64_t v, int64_t lo, int64_t hi)
{
    if (v < lo || v > hi)
        return fajit__fail(FAJIT_EINVAL, "%s=%lld: must be in %lld..%lld", name, (long long)v,
                           (long long)lo, (long long)hi);
    return 0;
}

/* All zero means contiguous; otherwise each must be >= 0, and the offsets
 * within one batch must not overflow int64 (the batch offset is the caller's
 * to check, since it needs the batch count). */
int fajit__resolve_strides(const char *name, const int64_t in[3], int64_t seqlen, int64_t heads,
                           int64_t dim, int64_t out[3])
{
    if (in[0] == 0 && in[1] == 0 && in[2] == 0) {
        out[2] = dim;
        out[1] = heads * dim;
        out[0] = seqlen * heads * dim;
        return 0;
    }
    int64_t extent[3] = {0, seqlen, heads}, last = dim;
    for (int i = 0; i < 3; i++) {
        int64_t span;
        if (in[i] < 0)
            return fajit__fail(FAJIT_EINVAL, "%s_stride[%d]=%lld: must be >= 0", name, i,
                               (long long)in[i]);
        out[i] = in[i];
        if (i > 0 && extent[i] > 0 &&
            (__builtin_mul_overflow(extent[i] - 1, in[i], &span) ||
             __builtin_add_overflow(last, span, &last)))
            return fajit__fail(FAJIT_EINVAL, "%s_stride[%d]=%lld: offsets overflow int64", name,
                               i, (long long)in[i]);
    }
    return 0;
}

int fajit__check_pointer(const char *name, const void *p, size_t align, int required)
{
    if (!p && required)
        return fajit__fail(FAJIT_EINVAL, "%s: NULL device pointer", name);
    if ((uintptr_t)p % align != 0)
        return fajit__fail(FAJIT_EINVAL, "%s=%p: must be %zu-byte aligned", name, p, align);
    return 0;
}

unsigned long long fajit__context_id(const fajit__driver *drv, CUcontext cu)
{
    unsigned long long id = 0;
    if (drv->ctxGetId && drv->ctxGetId(cu, &id) == CUDA_SUCCESS)
        return id;
    return (unsigned long long)(uintptr_t)cu;
}

/* The last answer is kept per thread, keyed by the context's unique id, so a
 * warm call makes no driver call for it. */
int fajit__context_arch(fajit_ctx *ctx, const fajit__driver *drv, unsigned long long cu_id,
                        int *arch)
{
    static _Thread_local unsigned long long last_id;
    static _Thread_local int last_arch;
    fajit__device_info info;
    CUdevice dev;
    CUresult r;
    int rc;

    if (cu_id != 0 && cu_id == last_id) {
        *arch = last_arch;
        return 0;
    }
    if ((r = drv->ctxGetDevice(&dev)) != CUDA_SUCCESS)
        return fajit__cu_fail(r, "cuCtxGetDevice");
    if ((rc = fajit__device_info_get(ctx, drv, dev, &info)) != 0)
        return rc;
    if (info.arch < 80)
        return fajit__fail(FAJIT_EUNSUPPORTED, "GPU arch sm_%d: fajit needs sm_80 or newer",
                           info.arch);
    last_id = cu_id;
    last_arch = *arch = info.arch;
    return 0;
}
