/*
 * runtime/heuristic.c - tile sizes for a variant when nobody tuned them, and
 * the arch a spec gets when it names none.
 */
#include "runtime/runtime.h"

static void set_if_unset(int *field, int value)
{
    if (*field == FAJIT__UNSET)
        *field = value;
}

/* The reference kernel: a warp per query row, 32 keys a step. Four warps a
 * block keep many blocks in flight for any shape; wide head dims (big
 * per-lane accumulators) get the same, since registers scale with dv/32. */
static void reference_tiles(fajit__variant *v)
{
    set_if_unset(&v->warps, 4);
    set_if_unset(&v->bm, v->warps);
    set_if_unset(&v->bn, 32);
    set_if_unset(&v->stages, 1);
}

void fajit__heuristic_tiles(fajit__variant *v)
{
    switch (v->op) {
    case FAJIT__OP_REF:
    case FAJIT__OP_REF_DQ:
    case FAJIT__OP_REF_DKDV:
    default:
        reference_tiles(v);
        break;
    }
}

int fajit__default_arch(fajit_ctx *ctx)
{
    const fajit__driver *drv;
    fajit__device_info info;
    CUdevice dev;
    char saved[FAJIT__DETAIL_MAX];
    int arch = 90;

    /* Probing the GPU must not clobber the caller's error detail. */
    snprintf(saved, sizeof saved, "%s", fajit__detail());
    if (fajit__driver_get(&drv) == 0 && drv->deviceGet(&dev, ctx->device) == CUDA_SUCCESS &&
        fajit__device_info_get(ctx, drv, dev, &info) == 0)
        arch = info.arch;
    fajit__fail(0, "%s", saved);
    return arch;
}

int fajit__complete_spec(fajit_ctx *ctx, fajit__variant *v)
{
    if (v->arch == FAJIT__UNSET) {
        v->arch = fajit__default_arch(ctx);
        v->arch_suffix = 0;
    }
    fajit__heuristic_tiles(v);
    return fajit__variant_check(v);
}
