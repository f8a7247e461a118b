/*
 * runtime/attn_bwd.c - fajit_attn_bwd: check the arguments, derive the
 * variants of the backward's kernels, launch them on the caller's stream.
 */
#include <string.h>

#include "runtime/runtime.h"

void fajit_attn_bwd_args_init(fajit_attn_bwd_args *a)
{
    memset(a, 0, sizeof *a);
    a->struct_size = sizeof *a;
    a->dtype = FAJIT_DTYPE_FP16;
    a->mask = FAJIT_MASK_NONE;
    a->kernel = FAJIT_KERNEL_AUTO;
}

int fajit_attn_bwd(fajit_ctx *ctx, const fajit_attn_bwd_args *args, void *stream)
{
    (void)ctx;
    (void)args;
    (void)stream;
    return fajit__fail(FAJIT_EUNSUPPORTED, "fajit_attn_bwd: not implemented yet");
}
