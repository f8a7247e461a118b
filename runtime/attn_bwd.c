/*
 * runtime/attn_bwd.c - fajit_attn_bwd: check the arguments, derive the
 * variants of the backward's kernels, launch them on the caller's stream.
 *
 * The fast backward (templates/flash_bwd.cuh, runtime/flash_bwd.c: FA2-style
 * tensor-core kernels, dQ through fp32 atomics in stream-ordered scratch, or
 * without atomics in deterministic mode) takes head dims that are multiples
 * of 8 up to 256, every feature included; the reference
 * (templates/reference_bwd.cuh) takes everything else: two
 * kernels, ref-dq writing grad_q and ref-dkdv writing grad_k and grad_v, each
 * a warp per output row, independent of each other, needing no scratch.
 * The fast backward's main kernel takes tuned tiles where `fajit tune` left
 * a record for the device (runtime/tune.h), else the heuristic's.
 * Everything is checked before anything is launched. The features (window,
 * softcap, ALiBi, dropout, varlen) are checked and mapped onto the variant
 * exactly as runtime/attn.c does for the forward (fajit__set_variant_features),
 * so a backward compiles the same mask the forward ran.
 */
#include <math.h>
#include <stdatomic.h>
#include <stddef.h>
#include <string.h>

#include "runtime/flash_bwd.h"
#include "runtime/runtime.h"
#include "runtime/tune.h"
#include "templates/bwd_params.h"

#define MAX_GRID_YZ 65535

void fajit_attn_bwd_args_init(fajit_attn_bwd_args *a)
{
    memset(a, 0, sizeof *a);
    a->struct_size = sizeof *a;
    a->dtype = FAJIT_DTYPE_FP16;
    a->mask = FAJIT_MASK_NONE;
    a->kernel = FAJIT_KERNEL_AUTO;
    a->window_left = -1;
    a->window_right = -1;
}

/* Every field up to `kernel` was in the first version of the struct, so a
 * caller passes at least that much. A shorter struct from a later, older
 * header would keep the defaults of the fields it lacks; a longer one is
 * refused, since fields it set would be silently ignored. */
static int copy_args(const fajit_attn_bwd_args *in, fajit_attn_bwd_args *a)
{
    const size_t first_version = offsetof(fajit_attn_bwd_args, kernel) + sizeof in->kernel;
    if (!in)
        return fajit__fail(FAJIT_EINVAL, "args: NULL");
    fajit_attn_bwd_args_init(a);
    if (in->struct_size > sizeof *a || in->struct_size < first_version)
        return fajit__fail(FAJIT_EINVAL,
                           "args struct_size=%u, this library knows %zu: call "
                           "fajit_attn_bwd_args_init, and build against the installed fajit.h",
                           in->struct_size, sizeof *a);
    memcpy(a, in, in->struct_size);
    a->struct_size = sizeof *a;
    return 0;
}

static int check_shapes(const fajit_attn_bwd_args *a)
{
    int rc;
    if ((rc = fajit__check_range("batch", a->batch, 0, MAX_GRID_YZ)) ||
        (rc = fajit__check_range("seqlen_q", a->seqlen_q, 0, INT32_MAX)) ||
        (rc = fajit__check_range("seqlen_k", a->seqlen_k, 0, INT32_MAX)) ||
        (rc = fajit__check_range("nheads_q", a->nheads_q, 1, MAX_GRID_YZ)) ||
        (rc = fajit__check_range("nheads_kv", a->nheads_kv, 1, MAX_GRID_YZ)) ||
        (rc = fajit__check_range("dqk", a->dqk, 1, 512)) ||
        (rc = fajit__check_range("dv", a->dv, 1, 512)) ||
        (rc = fajit__check_range("dtype", a->dtype, FAJIT_DTYPE_FP16, FAJIT_DTYPE_BF16)) ||
        (rc = fajit__check_range("mask", a->mask, FAJIT_MASK_NONE, FAJIT_MASK_CAUSAL_TL)) ||
        (rc = fajit__check_range("deterministic", a->deterministic, 0, 1)) ||
        (rc = fajit__check_range("kernel", a->kernel, FAJIT_KERNEL_AUTO, FAJIT_KERNEL_REFERENCE)))
        return rc;
    if (a->nheads_q % a->nheads_kv != 0)
        return fajit__fail(FAJIT_EINVAL, "nheads_q=%lld is not a multiple of nheads_kv=%lld",
                           (long long)a->nheads_q, (long long)a->nheads_kv);
    if (!isfinite(a->softmax_scale))
        return fajit__fail(FAJIT_EINVAL, "softmax_scale=%g: must be finite (0 for default)",
                           (double)a->softmax_scale);
    return 0;
}

/* The appended fields (window, softcap, ALiBi, dropout, varlen), after
 * check_shapes (their bounds depend on the shapes); the forward's rules
 * (fajit__check_features), so one call's arguments are judged alike in both
 * directions. */
static int check_features(const fajit_attn_bwd_args *a)
{
    const fajit__features f = fajit__bwd_features(a);
    return fajit__check_features(&f);
}

/* The query-side tensors are always named; the key-side ones may be NULL when
 * there are no keys (nothing of them is read or written then). */
static int check_pointers(const fajit_attn_bwd_args *a)
{
    int rc, need_kv = a->seqlen_k > 0;
    if ((rc = fajit__check_pointer("q", a->q, 2, 1)) ||
        (rc = fajit__check_pointer("k", a->k, 2, need_kv)) ||
        (rc = fajit__check_pointer("v", a->v, 2, need_kv)) ||
        (rc = fajit__check_pointer("o", a->o, 2, 1)) ||
        (rc = fajit__check_pointer("grad_out", a->grad_out, 2, 1)) ||
        (rc = fajit__check_pointer("lse", a->lse, 4, 1)) ||
        (rc = fajit__check_pointer("grad_q", a->grad_q, 2, 1)) ||
        (rc = fajit__check_pointer("grad_k", a->grad_k, 2, need_kv)) ||
        (rc = fajit__check_pointer("grad_v", a->grad_v, 2, need_kv)))
        return rc;
    return 0;
}

/* Under varlen the batch strides are ignored (sequence b starts at row
 * cu_seqlens[b]), so a tensor's extent is one sequence of the max length, and
 * the LSE, (nheads_q, total_q) with total_q <= batch * seqlen_q, is bounded by
 * the dense one's size. */
static int fill_strides(const fajit_attn_bwd_args *a, struct fajit_bwd_params *p)
{
    const int64_t b = a->cu_seqlens_q ? 1 : a->batch, sq = a->seqlen_q, sk = a->seqlen_k, hq = a->nheads_q,
                  hkv = a->nheads_kv, dqk = a->dqk, dv = a->dv;
    const fajit__tensor t[8] = {
        {"q", a->q, a->q_stride, b, sq, hq, dqk, "seqlen_q", "nheads_q", "dqk", 0},
        {"k", a->k, a->k_stride, b, sk, hkv, dqk, "seqlen_k", "nheads_kv", "dqk", 0},
        {"v", a->v, a->v_stride, b, sk, hkv, dv, "seqlen_k", "nheads_kv", "dv", 0},
        {"o", a->o, a->o_stride, b, sq, hq, dv, "seqlen_q", "nheads_q", "dv", 0},
        {"grad_out", a->grad_out, a->grad_out_stride, b, sq, hq, dv, "seqlen_q", "nheads_q", "dv", 0},
        {"grad_q", a->grad_q, a->grad_q_stride, b, sq, hq, dqk, "seqlen_q", "nheads_q", "dqk", 1},
        {"grad_k", a->grad_k, a->grad_k_stride, b, sk, hkv, dqk, "seqlen_k", "nheads_kv", "dqk", 1},
        {"grad_v", a->grad_v, a->grad_v_stride, b, sk, hkv, dv, "seqlen_k", "nheads_kv", "dv", 1},
    };
    int64_t *out[8] = {p->q_stride,        p->k_stride,       p->v_stride,
                       p->o_stride,        p->grad_out_stride, p->grad_q_stride,
                       p->grad_k_stride,   p->grad_v_stride};
    int rc;
    for (int i = 0; i < 8; i++)
        if ((rc = fajit__tensor_strides(&t[i], out[i])) != 0)
            return rc;
    if ((rc = fajit__check_lse(a->lse, a->batch, hq, sq)) != 0)
        return rc;
    if (a->cu_seqlens_q) /* packed: sequence b starts at row cu_seqlens[b] */
        for (int i = 0; i < 8; i++)
            out[i][0] = 0;
    return 0;
}

static int fill_params(const fajit_attn_bwd_args *a, struct fajit_bwd_params *p)
{
    int rc;
    memset(p, 0, sizeof *p);
    if ((rc = fill_strides(a, p)) != 0)
        return rc;
    p->q = a->q;
    p->k = a->k;
    p->v = a->v;
    p->o = a->o;
    p->grad_out = a->grad_out;
    p->lse = a->lse;
    p->grad_q = a->grad_q;
    p->grad_k = a->grad_k;
    p->grad_v = a->grad_v;
    p->batch = (int)a->batch;
    p->seqlen_q = (int)a->seqlen_q;
    p->seqlen_k = (int)a->seqlen_k;
    p->nheads_q = (int)a->nheads_q;
    p->nheads_kv = (int)a->nheads_kv;
    p->softmax_scale = a->softmax_scale != 0.0f ? a->softmax_scale : 1.0f / sqrtf((float)a->dqk);
    p->softmax_scale_log2 = p->softmax_scale * 1.4426950408889634f;
    p->softcap = a->softcap;
    p->dropout_p = a->dropout_p;
    p->dropout_scale = 1.0f / (1.0f - a->dropout_p);
    p->dropout_seed = a->dropout_seed;
    p->dropout_offset = a->dropout_offset;
    p->alibi_slopes = a->alibi_slopes;
    p->alibi_batch_stride = a->alibi_slopes ? a->alibi_batch_stride : 0;
    p->cu_seqlens_q = a->cu_seqlens_q;
    p->cu_seqlens_k = a->cu_seqlens_k;
    return 0;
}

/* The variant of one of the backward's kernels for validated arguments. The
 * reference is deterministic, so it serves either value of `deterministic`.
 * The feature fields are set by the forward's rule (fajit__set_variant_features). */
static void derive_variant(const fajit_attn_bwd_args *a, int op, int arch, fajit__variant *v)
{
    fajit__variant_defaults(v);
    v->op = op;
    v->dqk = (int)a->dqk;
    v->dv = (int)a->dv;
    v->dtype = a->dtype;
    const fajit__features f = fajit__bwd_features(a);
    fajit__set_variant_features(&f, a->mask, a->seqlen_q, a->seqlen_k, v);
    v->arch = arch;
    v->arch_suffix = 0;
    fajit__heuristic_tiles(v);
}

/* One kernel over `rows` rows (query rows for ref-dq, key rows for ref-dkdv)
 * of `heads` heads: a warp per row, bm rows a block. */
static int launch(const fajit__driver *drv, CUfunction fn, const fajit__variant *v,
                  struct fajit_bwd_params *p, int rows, int heads, void *stream)
{
    unsigned grid_x = (unsigned)((rows + v->bm - 1) / v->bm);
    void *kargs[] = {p};
    CUresult r = drv->launchKernel(fn, grid_x, (unsigned)heads, (unsigned)p->batch,
                                   (unsigned)(v->warps * 32), 1, 1,
                                   (unsigned)fajit__variant_smem_bytes(v), (CUstream)stream,
                                   kargs, NULL);
    return r == CUDA_SUCCESS ? 0 : fajit__cu_fail(r, "cuLaunchKernel");
}

/* Both kernels' functions first, then both launches: a compile or load
 * failure of either launches nothing. A side with no rows is not launched
 * (a zero grid is invalid); the other side then writes zeros. */
static int run_reference(fajit_ctx *ctx, const fajit__driver *drv, const fajit_attn_bwd_args *a,
                         struct fajit_bwd_params *p, int arch, unsigned long long cu_id,
                         void *stream)
{
    fajit__variant dq, dkdv;
    CUfunction dq_fn, dkdv_fn;
    int rc;

    derive_variant(a, FAJIT__OP_REF_DQ, arch, &dq); /* checked on a table miss */
    derive_variant(a, FAJIT__OP_REF_DKDV, arch, &dkdv);
    if ((rc = fajit__kernel_function(ctx, drv, &dq, cu_id, &dq_fn)) ||
        (rc = fajit__kernel_function(ctx, drv, &dkdv, cu_id, &dkdv_fn)))
        return rc;
    if (p->seqlen_q > 0 && (rc = launch(drv, dq_fn, &dq, p, p->seqlen_q, p->nheads_q, stream)))
        return rc;
    if (p->seqlen_k > 0 &&
        (rc = launch(drv, dkdv_fn, &dkdv, p, p->seqlen_k, p->nheads_kv, stream)))
        return rc;
    return 0;
}

/* The fast backward's kernels, the main one (op bwd) with the tiles tuned on
 * device dev when the store has them (deterministic mode's kernels are not
 * tuned), then launched. */
static int run_fast(fajit_ctx *ctx, const fajit__driver *drv, const fajit_attn_bwd_args *a,
                    const struct fajit_bwd_params *p, int arch, CUdevice dev, unsigned long long cu_id,
                    void *stream)
{
    fajit__variant v[3];
    fajit__flash_bwd_variants(a, arch, v);
    if (!a->deterministic)
        fajit__launch_tiles(ctx, drv, dev, a->seqlen_k, 0, 0, &v[1], NULL);
    return fajit__flash_bwd_launch(ctx, drv, v, p, cu_id, stream);
}

/* The fast backward where it applies, else the reference (said once per
 * process at INFO unless the reference was asked for). */
static int run(fajit_ctx *ctx, const fajit__driver *drv, const fajit_attn_bwd_args *a,
               struct fajit_bwd_params *p, int arch, CUdevice dev, unsigned long long cu_id, void *stream)
{
    static atomic_int fallback_logged;
    const char *why = fajit__flash_bwd_refusal(a, p);
    if (!why)
        return run_fast(ctx, drv, a, p, arch, dev, cu_id, stream);
    if (a->kernel != FAJIT_KERNEL_REFERENCE && atomic_exchange(&fallback_logged, 1) == 0)
        fajit__log(&ctx->log, FAJIT_LOG_INFO, "backward dqk=%lld dv=%lld: %s; using the "
                   "reference kernels", (long long)a->dqk, (long long)a->dv, why);
    return run_reference(ctx, drv, a, p, arch, cu_id, stream);
}

int fajit_attn_bwd(fajit_ctx *ctx, const fajit_attn_bwd_args *args, void *stream)
{
    const fajit__driver *drv;
    struct fajit_bwd_params p;
    fajit_attn_bwd_args a;
    CUcontext cu;
    int rc, pushed, arch = 0;

    if (!ctx)
        return fajit__fail(FAJIT_EINVAL, "ctx: NULL");
    if ((rc = copy_args(args, &a)) || (rc = check_shapes(&a)) || (rc = check_features(&a)) ||
        (rc = check_pointers(&a)) || (rc = fill_params(&a, &p)))
        return rc;
    if (a.batch == 0 || (a.seqlen_q == 0 && a.seqlen_k == 0))
        return 0; /* nothing to compute or write */
    if ((rc = fajit__driver_get(&drv)) || (rc = fajit__enter_cuda(ctx, drv, &cu, &pushed)))
        return rc;
    const unsigned long long cu_id = fajit__context_id(drv, cu);
    CUdevice dev = -1;
    rc = fajit__context_device(ctx, drv, cu_id, &arch, &dev);
    if (rc == 0)
        rc = run(ctx, drv, &a, &p, arch, dev, cu_id, stream);
    if (pushed)
        drv->ctxPopCurrent(&cu);
    return rc;
}
