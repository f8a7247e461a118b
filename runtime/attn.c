/*
 * runtime/attn.c - fajit_attn_fwd: check the arguments, derive the variant,
 * find its kernel, launch it on the caller's stream.
 *
 * Everything is checked before anything is launched; the warm path is a table
 * lookup and one cuLaunchKernel.
 */
#include <limits.h>
#include <math.h>
#include <stdatomic.h>
#include <stddef.h>
#include <stdio.h>
#include <string.h>

#include "runtime/probs.h"
#include "runtime/runtime.h"
#include "runtime/tune.h"
#include "templates/fwd_params.h"

#define MAX_GRID_YZ 65535

void fajit_attn_args_init(fajit_attn_args *a)
{
    memset(a, 0, sizeof *a);
    a->struct_size = sizeof *a;
    a->dtype = FAJIT_DTYPE_FP16;
    a->mask = FAJIT_MASK_NONE;
    a->kernel = FAJIT_KERNEL_AUTO;
    a->window_left = -1;
    a->window_right = -1;
}

/* A caller built against an older header passes a shorter struct: the fields
 * it does not know keep their defaults. A newer one is refused, since fields
 * it set would be silently ignored. */
static int copy_args(const fajit_attn_args *in, fajit_attn_args *a)
{
    if (!in)
        return fajit__fail(FAJIT_EINVAL, "args: NULL");
    fajit_attn_args_init(a);
    if (in->struct_size > sizeof *a || in->struct_size < offsetof(fajit_attn_args, kernel))
        return fajit__fail(FAJIT_EINVAL,
                           "args struct_size=%u, this library knows %zu: call "
                           "fajit_attn_args_init, and build against the installed fajit.h",
                           in->struct_size, sizeof *a);
    memcpy(a, in, in->struct_size);
    a->struct_size = sizeof *a;
    return 0;
}

static int check_shapes(const fajit_attn_args *a)
{
    int rc;
    if ((rc = fajit__check_range("batch", a->batch, 0, MAX_GRID_YZ)) ||
        (rc = fajit__check_range("seqlen_q", a->seqlen_q, 0, INT32_MAX)) ||
        (rc = fajit__check_range("seqlen_k", a->seqlen_k, 0, INT32_MAX)) ||
        (rc = fajit__check_range("nheads_q", a->nheads_q, 1, MAX_GRID_YZ)) ||
        (rc = fajit__check_range("nheads_kv", a->nheads_kv, 1, MAX_GRID_YZ)) ||
        (rc = fajit__check_range("dqk", a->dqk, 1, 512)) || (rc = fajit__check_range("dv", a->dv, 1, 512)) ||
        (rc = fajit__check_range("dtype", a->dtype, FAJIT_DTYPE_FP16, FAJIT_DTYPE_BF16)) ||
        (rc = fajit__check_range("mask", a->mask, FAJIT_MASK_NONE, FAJIT_MASK_CAUSAL_TL)) ||
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

static int check_pointers(const fajit_attn_args *a)
{
    int rc, need_kv = a->seqlen_k > 0;
    if ((rc = fajit__check_pointer("q", a->q, 2, 1)) || (rc = fajit__check_pointer("k", a->k, 2, need_kv)) ||
        (rc = fajit__check_pointer("v", a->v, 2, need_kv)) || (rc = fajit__check_pointer("o", a->o, 2, 1)) ||
        (rc = fajit__check_pointer("lse", a->lse, 4, 0)))
        return rc;
    if (a->workspace && (uintptr_t)a->workspace % 16 != 0)
        return fajit__fail(FAJIT_EINVAL, "workspace=%p: not 16-byte aligned", a->workspace);
    if (!a->workspace && a->workspace_bytes != 0)
        return fajit__fail(FAJIT_EINVAL, "workspace_bytes=%zu with a NULL workspace", a->workspace_bytes);
    return 0;
}

/* The appended fields (window, softcap, ALiBi, dropout, varlen), after
 * check_shapes (their bounds depend on the shapes). */
static int check_features(const fajit_attn_args *a)
{
    const fajit__features f = fajit__fwd_features(a);
    return fajit__check_features(&f);
}

/* Under varlen the batch strides are ignored (sequence b starts at row
 * cu_seqlens[b]), so a tensor's extent is one sequence of the max length. */
static int fill_strides(const fajit_attn_args *a, struct fajit_fwd_params *p)
{
    const int64_t b = a->cu_seqlens_q ? 1 : a->batch, sq = a->seqlen_q, sk = a->seqlen_k;
    const fajit__tensor t[4] = {
        {"q", a->q, a->q_stride, b, sq, a->nheads_q, a->dqk, "seqlen_q", "nheads_q", "dqk", 0},
        {"k", a->k, a->k_stride, b, sk, a->nheads_kv, a->dqk, "seqlen_k", "nheads_kv", "dqk", 0},
        {"v", a->v, a->v_stride, b, sk, a->nheads_kv, a->dv, "seqlen_k", "nheads_kv", "dv", 0},
        {"o", a->o, a->o_stride, b, sq, a->nheads_q, a->dv, "seqlen_q", "nheads_q", "dv", 1},
    };
    int64_t *out[4] = {p->q_stride, p->k_stride, p->v_stride, p->o_stride};
    int rc;
    for (int i = 0; i < 4; i++)
        if ((rc = fajit__tensor_strides(&t[i], out[i])) != 0)
            return rc;
    if (a->lse && (rc = fajit__check_lse(a->lse, a->batch, a->nheads_q, a->seqlen_q)) != 0)
        return rc;
    if (a->cu_seqlens_q) /* packed: sequence b starts at row cu_seqlens[b] */
        p->q_stride[0] = p->k_stride[0] = p->v_stride[0] = p->o_stride[0] = 0;
    return 0;
}

/* Where op ref-probs writes the probabilities: the kernel's arguments after
 * the params (templates/reference.cuh). ptr NULL: not asked for. */
typedef struct probs_out {
    float *ptr;
    int64_t stride[3]; /* batch, head, row; elements */
} probs_out;

static int fill_probs(const fajit_attn_args *a, probs_out *out)
{
    memset(out, 0, sizeof *out);
    out->ptr = a->probs;
    return a->probs ? fajit__probs_strides(a, out->stride) : 0;
}

/* Op ref-probs: the reference's grid (no split, no packing), with the
 * probabilities' pointer and strides as the kernel's further arguments. */
static int launch_probs(const fajit__driver *drv, CUfunction fn, const fajit__variant *v,
                        struct fajit_fwd_params *p, const probs_out *po, void *stream)
{
    float *ptr = po->ptr;
    long long sb = po->stride[0], sh = po->stride[1], si = po->stride[2];
    void *kargs[] = {p, &ptr, &sb, &sh, &si};
    CUresult r = drv->launchKernel(fn, (unsigned)((p->seqlen_q + v->bm - 1) / v->bm), (unsigned)p->nheads_q,
                                   (unsigned)p->batch, (unsigned)(v->warps * 32), 1, 1, 0, (CUstream)stream,
                                   kargs, NULL);
    return r == CUDA_SUCCESS ? 0 : fajit__cu_fail(r, "cuLaunchKernel");
}

static int fill_params(const fajit_attn_args *a, struct fajit_fwd_params *p)
{
    int rc;
    memset(p, 0, sizeof *p);
    if ((rc = fill_strides(a, p)) != 0)
        return rc;
    p->q = a->q;
    p->k = a->k;
    p->v = a->v;
    p->o = a->o;
    p->lse = a->lse;
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

/* Why the fast forward kernel cannot take these arguments, or NULL if it can.
 * Its loads move the widest vector a head dim allows (the largest power of
 * two dividing it, at most 8 elements; templates/flash_fwd.cuh): q and k by
 * dqk's, v and o by dv's, so each pointer must be aligned to its vector and
 * every stride a multiple of it. */
static const char *fast_fwd_refusal(const fajit_attn_args *a, const struct fajit_fwd_params *p)
{
#define FAST_WIDTH(dim) ((dim) % 8 == 0 ? 8 : (dim) % 4 == 0 ? 4 : (dim) % 2 == 0 ? 2 : 1)
    const int64_t wqk = FAST_WIDTH(a->dqk), wv = FAST_WIDTH(a->dv);
#undef FAST_WIDTH
    if (a->kernel == FAJIT_KERNEL_REFERENCE)
        return "the reference kernel was asked for";
    if (a->dqk > 256 || a->dv > 256)
        return "a head dim is above 256";
    if (((uintptr_t)a->q | (uintptr_t)a->k) % (uintptr_t)(2 * wqk) != 0)
        return wqk == 8 ? "q or k is not 16-byte aligned"
                        : "q or k is not aligned to dqk's load width (2 bytes times the largest "
                          "power of two dividing dqk)";
    if (((uintptr_t)a->v | (uintptr_t)a->o) % (uintptr_t)(2 * wv) != 0)
        return wv == 8 ? "v or o is not 16-byte aligned"
                       : "v or o is not aligned to dv's load width (2 bytes times the largest "
                         "power of two dividing dv)";
    for (int i = 0; i < 3; i++) {
        if (p->q_stride[i] % wqk || p->k_stride[i] % wqk)
            return wqk == 8 ? "a q or k stride is not a multiple of 8 elements"
                            : "a q or k stride is not a multiple of dqk's load width (the largest "
                              "power of two dividing dqk)";
        if (p->v_stride[i] % wv || p->o_stride[i] % wv)
            return wv == 8 ? "a v or o stride is not a multiple of 8 elements"
                           : "a v or o stride is not a multiple of dv's load width (the largest "
                             "power of two dividing dv)";
    }
    return NULL;
}

/* Everything of the variant the arguments decide, except op, tiles and arch. */
static void derive_features(const fajit_attn_args *a, fajit__variant *v)
{
    fajit__variant_defaults(v);
    v->dqk = (int)a->dqk;
    v->dv = (int)a->dv;
    v->dtype = a->dtype;
    const fajit__features f = fajit__fwd_features(a);
    fajit__set_variant_features(&f, a->mask, a->seqlen_q, a->seqlen_k, v);
}

/* The kernel for validated arguments: the fast forward where it applies, else
 * the reference, which covers everything (said once per process at INFO). */
static int choose_op(fajit_ctx *ctx, const fajit_attn_args *a, const struct fajit_fwd_params *p,
                     const fajit__variant *features)
{
    static atomic_int fallback_logged;
    const char *why;
    if (a->probs)
        return FAJIT__OP_REF_PROBS; /* only the reference writes them */
    why = fast_fwd_refusal(a, p);
    if (!why && !fajit__fast_fwd_supports(features))
        why = "the fast forward lacks a feature asked for (dropout, softcap, ALiBi or varlen)";
    if (!why)
        return FAJIT__OP_FWD;
    if (a->kernel != FAJIT_KERNEL_REFERENCE && atomic_exchange(&fallback_logged, 1) == 0)
        fajit__log(&ctx->log, FAJIT_LOG_INFO, "dqk=%lld dv=%lld: %s; using the reference kernel",
                   (long long)a->dqk, (long long)a->dv, why);
    return FAJIT__OP_REF;
}

static fajit__fwd_shape shape_of(const struct fajit_fwd_params *p)
{
    fajit__fwd_shape sh = {p->batch, p->seqlen_q, p->seqlen_k, p->nheads_q, p->nheads_kv};
    return sh;
}

/* The variant for validated arguments on a device of the given arch, with
 * the heuristic's tiles for the call's shape (tuned_choice may replace them).
 * Returns 1 where the few-rows rule chose them (decoding): part of the
 * tuning key, as the tuner keys its records (runtime/tune.h). */
static int derive_variant(fajit_ctx *ctx, const fajit_attn_args *a, const struct fajit_fwd_params *p, int arch,
                          fajit__variant *v)
{
    const fajit__fwd_shape sh = shape_of(p);
    derive_features(a, v);
    v->op = choose_op(ctx, a, p, v);
    v->arch = arch;
    v->arch_suffix = 0;
    return fajit__heuristic_tiles_for(v, &sh);
}

int fajit__configure_function(const fajit__driver *drv, const fajit__variant *v, CUfunction fn)
{
    size_t smem = fajit__variant_smem_bytes(v);
    CUresult r;
    if (smem <= 48 * 1024)
        return 0; /* the default limit */
    r = drv->funcSetAttribute(fn, CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES, (int)smem);
    return r == CUDA_SUCCESS ? 0 : fajit__cu_fail(r, "cuFuncSetAttribute(max dynamic smem)");
}

static int launch_grid(const fajit__driver *drv, CUfunction fn, const fajit__variant *v,
                       struct fajit_fwd_params *p, unsigned gx, unsigned gy, unsigned gz, unsigned smem,
                       void *stream)
{
    void *kargs[] = {p};
    CUresult r = drv->launchKernel(fn, gx, gy, gz, (unsigned)(v->warps * 32), 1, 1, smem,
                                   (CUstream)stream, kargs, NULL);
    return r == CUDA_SUCCESS ? 0 : fajit__cu_fail(r, "cuLaunchKernel");
}

/* ---------------------------------------------------------------- split-KV */

/* Streaming multiprocessors of device dev (0 if unknown), asked once per
 * device. */
static int sm_count(const fajit__driver *drv, CUdevice dev)
{
    static atomic_int known[FAJIT__MAX_DEVICES];
    int n = 0;
    if (!drv || dev < 0 || dev >= FAJIT__MAX_DEVICES)
        return 0;
    n = atomic_load_explicit(&known[dev], memory_order_relaxed);
    if (n == 0 && drv->deviceGetAttribute(&n, CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT, dev) == CUDA_SUCCESS)
        atomic_store_explicit(&known[dev], n, memory_order_relaxed);
    return n;
}

/* v (heuristic tiles) takes the tuned tiles and split count of device dev
 * where the store has them; the split count the rule gives the heuristic's
 * tiles and few_rows (derive_variant's answer) are part of the key
 * (runtime/tune.h). *splits: the count to launch with, 0 for the rule
 * (computed here once when it splits with v's tiles). */
static void tuned_choice(fajit_ctx *ctx, const fajit__driver *drv, CUdevice dev,
                         const struct fajit_fwd_params *p, int few_rows, fajit__variant *v, int *splits)
{
    const fajit__fwd_shape sh = shape_of(p);
    int plan = 0, tuned = 0, found = 0;
    *splits = 0;
    if (v->op != FAJIT__OP_FWD)
        return;
    if ((sh.seqlen_k + v->bn - 1) / v->bn >= FAJIT__MIN_SPLIT_TILES) /* else the rule never splits */
        plan = fajit__plan_splits(v, &sh, sm_count(drv, dev));
    if (ctx->tuned_tiles && ctx->store)
        found = fajit__launch_tiles(ctx, drv, dev, p->seqlen_k, plan, few_rows, v, &tuned);
    *splits = found ? tuned : plan;
}

/* The combine's launch. On sm_90 it is a programmatic dependent launch: its
 * blocks may start while the partials' grid still runs (every block of that
 * grid allows it as it starts) and wait in the kernel (griddepcontrol.wait)
 * until that grid is done and its writes are visible, so the gap between the
 * two kernels is not spent launching. Elsewhere, or when the driver lacks
 * cuLaunchKernelEx or refuses the attribute, an ordinary launch. */
static int launch_combine(const fajit__driver *drv, CUfunction fn, const fajit__variant *v,
                          struct fajit_fwd_params *p, unsigned blocks, void *stream)
{
    if (drv->launchKernelEx && v->arch >= 90) {
        void *kargs[] = {p};
        CUlaunchAttribute attr;
        CUlaunchConfig cfg;
        memset(&attr, 0, sizeof attr);
        memset(&cfg, 0, sizeof cfg);
        attr.id = CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION;
        attr.value.programmaticStreamSerializationAllowed = 1;
        cfg.gridDimX = blocks;
        cfg.gridDimY = cfg.gridDimZ = 1;
        cfg.blockDimX = (unsigned)(v->warps * 32);
        cfg.blockDimY = cfg.blockDimZ = 1;
        cfg.hStream = (CUstream)stream;
        cfg.attrs = &attr;
        cfg.numAttrs = 1;
        if (drv->launchKernelEx(&cfg, fn, kargs, NULL) == CUDA_SUCCESS)
            return 0;
    }
    return launch_grid(drv, fn, v, p, blocks, 1, 1, 0, stream);
}

/* Bytes of fp32 partials (O / l rows of dv rounded up to 8, and LSEs) a split
 * launch of v with plan s needs for p's rows; 0 when s does not split. */
static size_t split_bytes(const fajit__variant *v, const struct fajit_fwd_params *p, const fajit__split_plan *s)
{
    size_t rows = (size_t)p->batch * (size_t)p->nheads_q * (size_t)p->seqlen_q;
    size_t dv_pad = ((size_t)v->dv + 7) / 8 * 8;
    return s->splits > 1 ? (size_t)s->splits * rows * (dv_pad + 1) * sizeof(float) : 0;
}

/* The split launch: partials into the caller's workspace when it is large
 * enough, else into stream-ordered scratch freed on the stream behind the
 * kernels; then the same kernel in its combine role merges them into o and
 * lse. */
static int launch_split(const fajit__driver *drv, CUfunction fn, const fajit__variant *v,
                        struct fajit_fwd_params *p, const fajit__split_plan *s, CUdeviceptr workspace,
                        size_t workspace_bytes, void *stream)
{
    size_t rows = (size_t)p->batch * (size_t)p->nheads_q * (size_t)p->seqlen_q;
    size_t dv_pad = ((size_t)v->dv + 7) / 8 * 8, slots = (size_t)s->splits * rows;
    size_t need = split_bytes(v, p, s);
    CUdeviceptr scratch = workspace;
    const int lent = workspace != 0 && workspace_bytes >= need;
    int freed, rc = lent ? 0 : fajit__scratch_alloc(drv, need, (CUstream)stream, &scratch, "split-KV partials");
    if (rc != 0)
        return rc;
    p->num_splits = s->splits;
    p->pack_gqa = s->pack;
    p->o_partial = (float *)(uintptr_t)scratch;
    p->lse_partial = p->o_partial + slots * dv_pad;
    p->partial_rows = (int64_t)rows;
    rc = launch_grid(drv, fn, v, p, s->grid_x * (unsigned)s->splits, s->grid_y, (unsigned)p->batch,
                     (unsigned)fajit__variant_smem_bytes(v), stream);
    p->combine = 1;
    if (rc == 0)
        rc = launch_combine(drv, fn, v, p, (unsigned)((rows + (size_t)v->warps - 1) / (size_t)v->warps), stream);
    p->combine = 0;
    freed = lent ? 0 : fajit__scratch_free(drv, scratch, (CUstream)stream);
    return rc != 0 ? rc : freed;
}

int fajit__fwd_launch_plan(const fajit__driver *drv, CUfunction fn, const fajit__variant *v,
                           struct fajit_fwd_params *p, const fajit__split_plan *s, CUdeviceptr workspace,
                           size_t workspace_bytes, void *stream)
{
    p->persist = 0;
    if (s->splits > 1)
        return launch_split(drv, fn, v, p, s, workspace, workspace_bytes, stream);
    if (s->blocks > 0) {
        /* a 1-D grid of blocks looping over the items (the kernel numbers
         * them in an int) */
        if ((int64_t)s->grid_x * s->grid_y * p->batch > INT_MAX)
            return fajit__fail(FAJIT_EINVAL,
                               "batch=%d, nheads_q=%d, seqlen_q=%d: %lld query blocks of %d rows, more than %d",
                               p->batch, p->nheads_q, p->seqlen_q, (long long)s->grid_x * s->grid_y * p->batch,
                               v->bm, INT_MAX);
        p->pack_gqa = 1;
        p->persist = 1;
        return launch_grid(drv, fn, v, p, s->blocks, 1, 1, (unsigned)fajit__variant_smem_bytes(v), stream);
    }
    p->pack_gqa = s->pack;
    return launch_grid(drv, fn, v, p, s->grid_x, s->grid_y, (unsigned)p->batch,
                       (unsigned)fajit__variant_smem_bytes(v), stream);
}

/* The launch plan for v on device dev; tuned_splits: tuned_choice's count
 * (0: the rule, with v's tiles). (The plan itself leaves too few key tiles
 * unsplit; persistent grids need the SM count.) */
static fajit__split_plan plan_of(fajit_ctx *ctx, const fajit__driver *drv, CUdevice dev, const fajit__variant *v,
                                 const struct fajit_fwd_params *p, int tuned_splits)
{
    const fajit__fwd_shape sh = shape_of(p);
    return fajit__plan_split(v, &sh, sm_count(drv, dev), tuned_splits, ctx->fwd_persist);
}

static int launch(fajit_ctx *ctx, const fajit__driver *drv, CUdevice dev, CUfunction fn,
                  const fajit__variant *v, struct fajit_fwd_params *p, int tuned_splits, const fajit_attn_args *a,
                  void *stream)
{
    fajit__split_plan s = plan_of(ctx, drv, dev, v, p, tuned_splits);
    if (s.splits > 1 || s.pack > 1)
        fajit__log(&ctx->log, FAJIT_LOG_DEBUG, "split-KV: %d splits, %d query heads a block, grid %u x %u x %d%s",
                   s.splits, s.pack, s.grid_x * (unsigned)s.splits, s.grid_y, p->batch,
                   s.splits > 1 && a->workspace && a->workspace_bytes < split_bytes(v, p, &s)
                       ? "; the workspace is too small, scratch from the pool" : "");
    return fajit__fwd_launch_plan(drv, fn, v, p, &s, (CUdeviceptr)(uintptr_t)a->workspace, a->workspace_bytes,
                                  stream);
}

/* A call whose arguments passed: their checked copy, the kernel params, the
 * probabilities' layout, the variant with its tuned split count, and the
 * device whose CUDA context was entered. */
typedef struct fwd_call {
    fajit_attn_args a;
    struct fajit_fwd_params p;
    probs_out po;
    fajit__variant v;
    const fajit__driver *drv;
    CUcontext cu;
    unsigned long long cu_id;
    CUdevice dev;
    int pushed; /* 1: the caller pops cu */
    int splits; /* tuned_choice's count */
} fwd_call;

/* Checks args (the workspace fields left out when !with_workspace), enters
 * the CUDA context and chooses the variant. Returns 1 when there is nothing
 * to compute (no context entered), 0 when c is ready (the caller pops
 * c->cu if c->pushed), else a status (nothing left entered). */
static int prepare_call(fajit_ctx *ctx, const fajit_attn_args *args, int with_workspace, fwd_call *c)
{
    int rc, arch = 0, few_rows;
    fajit_attn_args *a = &c->a;
    if ((rc = copy_args(args, a)) != 0)
        return rc;
    if (!with_workspace) {
        a->workspace = NULL;
        a->workspace_bytes = 0;
    }
    if ((rc = check_shapes(a)) || (rc = check_features(a)) || (rc = check_pointers(a)) ||
        (rc = fill_params(a, &c->p)) || (rc = fill_probs(a, &c->po)))
        return rc;
    if (a->batch == 0 || a->seqlen_q == 0)
        return 1; /* nothing to compute */
    if ((rc = fajit__driver_get(&c->drv)) || (rc = fajit__enter_cuda(ctx, c->drv, &c->cu, &c->pushed)))
        return rc;
    c->cu_id = fajit__context_id(c->drv, c->cu);
    c->dev = -1;
    rc = fajit__context_device(ctx, c->drv, c->cu_id, &arch, &c->dev);
    if (rc != 0) {
        if (c->pushed)
            c->drv->ctxPopCurrent(&c->cu);
        return rc;
    }
    few_rows = derive_variant(ctx, a, &c->p, arch, &c->v); /* checked on a table miss */
    tuned_choice(ctx, c->drv, c->dev, &c->p, few_rows, &c->v, &c->splits);
    return 0;
}

int fajit_attn_fwd(fajit_ctx *ctx, const fajit_attn_args *args, void *stream)
{
    fwd_call c;
    CUfunction fn;
    int rc;

    if (!ctx)
        return fajit__fail(FAJIT_EINVAL, "ctx: NULL");
    if ((rc = prepare_call(ctx, args, 1, &c)) != 0)
        return rc == 1 ? 0 : rc;
    rc = fajit__kernel_function(ctx, c.drv, &c.v, c.cu_id, &fn);
    if (rc == 0 && c.v.op == FAJIT__OP_REF_PROBS)
        rc = launch_probs(c.drv, fn, &c.v, &c.p, &c.po, stream);
    else if (rc == 0)
        rc = launch(ctx, c.drv, c.dev, fn, &c.v, &c.p, c.splits, &c.a, stream);
    if (c.pushed)
        c.drv->ctxPopCurrent(&c.cu);
    return rc;
}

int fajit_attn_fwd_workspace_size(fajit_ctx *ctx, const fajit_attn_args *args, size_t *bytes)
{
    fwd_call c;
    int rc;

    if (!ctx || !bytes)
        return fajit__fail(FAJIT_EINVAL, "%s: NULL", ctx ? "bytes" : "ctx");
    *bytes = 0;
    if ((rc = prepare_call(ctx, args, 0, &c)) != 0)
        return rc == 1 ? 0 : rc;
    if (c.v.op == FAJIT__OP_FWD) {
        const fajit__split_plan s = plan_of(ctx, c.drv, c.dev, &c.v, &c.p, c.splits);
        *bytes = split_bytes(&c.v, &c.p, &s);
    }
    if (c.pushed)
        c.drv->ctxPopCurrent(&c.cu);
    return 0;
}

/* What fajit_attn_fwd would launch on the context's device: its tuned tiles
 * when a GPU is there and the store has them (the caller's error detail kept). */
static void tuned_tiles_of_ctx_device(fajit_ctx *ctx, const struct fajit_fwd_params *p, int few_rows,
                                      fajit__variant *v)
{
    const fajit__driver *drv;
    char saved[FAJIT__DETAIL_MAX];
    CUdevice dev;
    int splits;
    snprintf(saved, sizeof saved, "%s", fajit__detail());
    if (fajit__driver_get(&drv) == 0 && drv->deviceGet(&dev, ctx->device) == CUDA_SUCCESS)
        tuned_choice(ctx, drv, dev, p, few_rows, v, &splits);
    fajit__fail(0, "%s", saved);
}

int fajit_attn_variant(fajit_ctx *ctx, const fajit_attn_args *args, char *buf, size_t cap)
{
    struct fajit_fwd_params p;
    fajit_attn_args a;
    probs_out po;
    fajit__variant v;
    int rc, few_rows;

    if (!ctx || !buf)
        return fajit__fail(FAJIT_EINVAL, "%s: NULL", ctx ? "buf" : "ctx");
    if ((rc = copy_args(args, &a)) || (rc = check_shapes(&a)) || (rc = check_features(&a)) ||
        (rc = fill_params(&a, &p)) || (rc = fill_probs(&a, &po)))
        return rc;
    few_rows = derive_variant(ctx, &a, &p, fajit__default_arch(ctx), &v);
    tuned_tiles_of_ctx_device(ctx, &p, few_rows, &v);
    rc = fajit__variant_check(&v);
    return rc != 0 ? rc : fajit__variant_format(&v, buf, cap);
}
