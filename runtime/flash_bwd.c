/*
 * runtime/flash_bwd.c - the fast backward's host side (see flash_bwd.h and
 * the header of templates/flash_bwd.cuh for what the kernels do).
 */
#include "runtime/flash_bwd.h"

#include <stdint.h>
#include <string.h>

/* Scratch rows per (batch, head): seqlen_q rounded up to this (kRowPad in
 * the template, which reads whole blocks of lse2 and D from it). */
#define ROW_PAD 128

const char *fajit__flash_bwd_refusal(const fajit_attn_bwd_args *a, const struct fajit_bwd_params *p)
{
    const uintptr_t addresses = (uintptr_t)a->q | (uintptr_t)a->k | (uintptr_t)a->v | (uintptr_t)a->o |
                                (uintptr_t)a->grad_out | (uintptr_t)a->grad_q | (uintptr_t)a->grad_k |
                                (uintptr_t)a->grad_v;
    const int64_t *strides[8] = {p->q_stride,        p->k_stride,      p->v_stride,
                                 p->o_stride,        p->grad_out_stride, p->grad_q_stride,
                                 p->grad_k_stride,   p->grad_v_stride};
    if (a->kernel == FAJIT_KERNEL_REFERENCE)
        return "the reference kernel was asked for";
    if (a->dqk % 8 != 0 || a->dv % 8 != 0)
        return "a head dim is not a multiple of 8";
    if (a->dqk > 256 || a->dv > 256)
        return "a head dim is above 256";
    if (addresses % 16 != 0)
        return "a tensor is not 16-byte aligned";
    for (int t = 0; t < 8; t++)
        for (int i = 0; i < 3; i++)
            if (strides[t][i] % 8 != 0)
                return "a stride is not a multiple of 8 elements";
    return NULL;
}

/* ---------------------------------------------------------------- tiles */

static int pad16(int d)
{
    return (d + 15) / 16 * 16;
}

/* Mirrors split_warps in the template: some split of `warps` over an a x b
 * output gives each warp a multiple of 16 rows of a and of `step` columns of
 * both b1 and b2. */
static int split_exists(int warps, int a, int b1, int b2, int step)
{
    for (int wa = 1; wa <= warps; wa *= 2) {
        int wb = warps / wa;
        if (wa * wb == warps && a % (16 * wa) == 0 && b1 % (step * wb) == 0 && b2 % (step * wb) == 0)
            return 1;
    }
    return 0;
}

int fajit__flash_bwd_layouts_exist(const fajit__variant *v)
{
    int dqk = pad16(v->dqk), dv = pad16(v->dv);
    return split_exists(v->warps, v->bn, v->bm, v->bm, 16) && split_exists(v->warps, v->bn, dqk, dv, 8) &&
           split_exists(v->warps, v->bm, dqk, dqk, 8);
}

static void set_if_unset(int *field, int value)
{
    if (*field == FAJIT__UNSET)
        *field = value;
}

/* One step smaller, in the order that costs least: the second Q/dO buffer
 * (only overlap is lost), then keys per block, then query rows, then warps
 * (when the tiles got too small for them). Fields the caller set stay. 0 when
 * nothing is left to shrink. */
static int shrink(const fajit__variant *caller, fajit__variant *t)
{
    if (caller->stages == FAJIT__UNSET && t->stages > 1)
        t->stages--;
    else if (caller->bn == FAJIT__UNSET && t->bn > 32)
        t->bn /= 2;
    else if (caller->bm == FAJIT__UNSET && t->bm > 32)
        t->bm /= 2;
    else
        return 0;
    while (caller->warps == FAJIT__UNSET && t->warps > 1 && !fajit__flash_bwd_layouts_exist(t))
        t->warps /= 2;
    return 1;
}

/* The big kernels. Their registers hold this warp's share of dK and dV
 * (bn * (dqk + dv) / (32 * warps) floats a thread) plus the S and dP tiles of
 * a step (2 bm bn / (32 warps)): with 8 warps, bm 64 and bn 128 keep that
 * near 128 + 64 for head dims up to 128; wider heads take bn 64; up to 64,
 * bm 128 halves the passes over K and V for the same registers. Measured on
 * H100 (fp16, b 4, h 16, s 4096; tests/gpu/test_flash_bwd_gpu's sweep): d 64
 * bm 128 bn 128 222 TFLOPs (causal 205) against 214 (178) with bm 64; d 128
 * bm 64 bn 128 265 (223), ahead of bn 64 (183-197) and of one stage (241);
 * d 256 bm 64 bn 64 201 (191), ahead of bm 32 (181) and bn 32 (129). */
/* Tuning FlashAttention's grid on the H100 (third session, all 6 seqlens,
 * fp16 and bf16; benchmarks/RESULTS.md) found bm 32 bn 128 with 4 warps the
 * fastest backward at d 64 without a mask: 2-9% ahead of bm 128 with 8
 * warps, which spilled 88 bytes there. Since the dQ accumulator's tile
 * order (fifth session) it wins under a causal mask too: `fajit tune` (fp16,
 * 2k and 8k) timed it 7.5% ahead of bm 128 there, where it had lost before;
 * causal with varlen spilled 4-12 bytes with it (sm_80/90), so keeps bm 128.
 * Windows and the features' registers were not measured with 4 warps. */
static int plain_narrow_head(const fajit__variant *v, int dmax)
{
    return v->op == FAJIT__OP_BWD && dmax <= 64 && (v->mask == FAJIT_MASK_NONE || !v->varlen) &&
           v->window_left == -1 && v->window_right == -1 && !v->dropout && !v->softcap && !v->alibi;
}

static void main_tiles(fajit__variant *v)
{
    const int dmax = pad16(v->dqk) > pad16(v->dv) ? pad16(v->dqk) : pad16(v->dv);
    const size_t limit = fajit__arch_smem_limit(v->arch == FAJIT__UNSET ? 90 : v->arch);
    fajit__variant t = *v;
    if (plain_narrow_head(v, dmax)) {
        set_if_unset(&t.warps, 4);
        set_if_unset(&t.bm, 32);
    }
    set_if_unset(&t.warps, 8);
    /* bwd-dq holds dQ for its bm rows instead: bm 128 spills there on sm_80.
     * Dropout's Philox words take registers beside the S and dP tiles: half
     * the query rows (bm 128 spilled 136-308 bytes at d 64, bm 64 at d 256). */
    set_if_unset(&t.bm, dmax <= 64 && v->op != FAJIT__OP_BWD_DQ && !v->dropout ? 128
                        : dmax > 128 && v->dropout                              ? 32
                                                                                : 64);
    set_if_unset(&t.bn, dmax <= 128 ? 128 : 64);
    set_if_unset(&t.stages, 2);
    while (v->warps == FAJIT__UNSET && t.warps > 1 && !fajit__flash_bwd_layouts_exist(&t))
        t.warps /= 2;
    while (fajit__variant_smem_bytes(&t) > limit && shrink(v, &t))
        ;
    *v = t; /* what still does not fit, the template's static_assert says why */
}

void fajit__flash_bwd_tiles(fajit__variant *v)
{
    if (v->op == FAJIT__OP_BWD || v->op == FAJIT__OP_BWD_DKDV || v->op == FAJIT__OP_BWD_DQ) {
        main_tiles(v);
        return;
    }
    set_if_unset(&v->bn, 64); /* unused */
    set_if_unset(&v->warps, 8);
    set_if_unset(&v->stages, 1);
    if (v->op == FAJIT__OP_BWD_PRE) {
        /* pre: a lane per 16-byte chunk of a dO and O row (2 to 16 lanes a
         * row, a power of two), so that a warp's loads cover whole rows:
         * with 4 lanes a row (bm 64) each load touched 8 rows' lines at 64
         * bytes apiece, and d 128 at 16k took 110 us against
         * FlashAttention-2's 95 (H100, torch.profiler). bm = threads /
         * lanes, kept to 16..128. */
        const int dv = v->dv != FAJIT__UNSET ? v->dv : v->dqk, chunks = (dv + 7) / 8;
        int lanes = 2, bm;
        while (lanes < chunks && lanes < 16)
            lanes *= 2;
        bm = v->warps * 32 / lanes;
        set_if_unset(&v->bm, bm < 16 ? 16 : bm > 128 ? 128 : bm);
    }
    /* post: a thread per 16-byte chunk of dQ. */
    set_if_unset(&v->bm, 64);
}

/* The features of the main kernels (bwd, bwd-dkdv, bwd-dq) as the forward
 * derives them; pre and post read only varlen (their rows are the
 * sequences'; mask and scores do not concern them), so calls that differ in
 * the others share them. */
static void set_features(const fajit_attn_bwd_args *a, int main_kernel, fajit__variant *v)
{
    const fajit__features f = fajit__bwd_features(a);
    v->varlen = a->cu_seqlens_q != NULL;
    if (main_kernel)
        fajit__set_variant_features(&f, a->mask, a->seqlen_q, a->seqlen_k, v);
}

void fajit__flash_bwd_variants(const fajit_attn_bwd_args *a, int arch, fajit__variant out[3])
{
    static const int ops[2][3] = {{FAJIT__OP_BWD_PRE, FAJIT__OP_BWD, FAJIT__OP_BWD_POST},
                                  {FAJIT__OP_BWD_PRE, FAJIT__OP_BWD_DKDV, FAJIT__OP_BWD_DQ}};
    const int *op = ops[a->deterministic ? 1 : 0];
    for (int i = 0; i < 3; i++) {
        fajit__variant *v = &out[i];
        fajit__variant_defaults(v);
        v->op = op[i];
        v->dqk = (int)a->dqk;
        v->dv = (int)a->dv;
        v->dtype = a->dtype;
        v->mask = FAJIT_MASK_NONE;
        set_features(a, op[i] != FAJIT__OP_BWD_PRE && op[i] != FAJIT__OP_BWD_POST, v);
        v->arch = arch;
        v->arch_suffix = 0;
        fajit__flash_bwd_tiles(v);
    }
}

static int deterministic(const fajit__variant v[3])
{
    return v[1].op == FAJIT__OP_BWD_DKDV;
}

/* ---------------------------------------------------------------- scratch */

static int64_t rows_pad(const struct fajit_bwd_params *p)
{
    return ((int64_t)p->seqlen_q + ROW_PAD - 1) / ROW_PAD * ROW_PAD;
}

int fajit__flash_bwd_scratch_bytes(const struct fajit_bwd_params *p, int dqk, int deterministic_mode,
                                   size_t *bytes)
{
    size_t rows, per_row = ((deterministic_mode ? 0 : (size_t)pad16(dqk)) + 2) * sizeof(float);
    *bytes = 0;
    if (p->seqlen_q == 0)
        return 0;
    if (__builtin_mul_overflow((size_t)p->batch, (size_t)p->nheads_q, &rows) ||
        __builtin_mul_overflow(rows, (size_t)rows_pad(p), &rows) ||
        __builtin_mul_overflow(rows, per_row, bytes))
        return fajit__fail(FAJIT_EINVAL,
                           "batch=%d nheads_q=%d seqlen_q=%d dqk=%d: the backward's scratch size "
                           "overflows size_t",
                           p->batch, p->nheads_q, p->seqlen_q, dqk);
    return 0;
}

/* ---------------------------------------------------------------- launches */

static int launch(const fajit__driver *drv, CUfunction fn, const fajit__variant *v, unsigned grid_x,
                  unsigned grid_y, unsigned grid_z, void **kargs, void *stream, const char *what)
{
    CUresult r = drv->launchKernel(fn, grid_x, grid_y, grid_z, (unsigned)(v->warps * 32), 1, 1,
                                   (unsigned)fajit__variant_smem_bytes(v), (CUstream)stream, kargs, NULL);
    return r == CUDA_SUCCESS ? 0 : fajit__cu_fail(r, what);
}

/* The three launches over scratch dq_acc (the accumulator, 0 in
 * deterministic mode) and stats. A side with no rows is not launched (a zero
 * grid is invalid). */
static int launch_all(const fajit__driver *drv, const CUfunction fn[3], const fajit__variant v[3],
                      struct fajit_bwd_params *p, CUdeviceptr dq_acc, CUdeviceptr stats, void *stream)
{
    const unsigned hq = (unsigned)p->nheads_q, hkv = (unsigned)p->nheads_kv, b = (unsigned)p->batch;
    const unsigned q_blocks = (unsigned)((p->seqlen_q + v[2].bm - 1) / v[2].bm);
    void *with_acc[] = {p, &dq_acc, &stats}; /* pre, bwd */
    void *stats_only[] = {p, &stats};         /* bwd-dkdv, bwd-dq */
    void *acc_only[] = {p, &dq_acc};          /* post */
    const int det = deterministic(v);
    int rc;
    if (p->seqlen_q > 0 && (rc = launch(drv, fn[0], &v[0], (unsigned)(rows_pad(p) / v[0].bm), hq, b, with_acc,
                                        stream, "cuLaunchKernel(bwd-pre)")))
        return rc;
    if (p->seqlen_k > 0 &&
        (rc = launch(drv, fn[1], &v[1], (unsigned)((p->seqlen_k + v[1].bn - 1) / v[1].bn), hkv, b,
                     det ? stats_only : with_acc, stream, det ? "cuLaunchKernel(bwd-dkdv)" : "cuLaunchKernel(bwd)")))
        return rc;
    if (p->seqlen_q > 0 && (rc = launch(drv, fn[2], &v[2], q_blocks, hq, b, det ? stats_only : acc_only, stream,
                                        det ? "cuLaunchKernel(bwd-dq)" : "cuLaunchKernel(bwd-post)")))
        return rc;
    return 0;
}

int fajit__flash_bwd_launch(fajit_ctx *ctx, const fajit__driver *drv, const fajit__variant v[3],
                            const struct fajit_bwd_params *p, unsigned long long cu_id, void *stream)
{
    CUfunction fn[3];
    CUdeviceptr scratch = 0, stats = 0;
    struct fajit_bwd_params params = *p; /* the launch reads it through a non-const pointer */
    const int det = deterministic(v);
    size_t bytes, stats_bytes;
    int rc, rc_free;

    for (int i = 0; i < 3; i++)
        if ((rc = fajit__kernel_function(ctx, drv, &v[i], cu_id, &fn[i])) != 0)
            return rc;
    if ((rc = fajit__flash_bwd_scratch_bytes(p, v[1].dqk, det, &bytes)) != 0)
        return rc;
    if (bytes > 0 &&
        (rc = fajit__scratch_alloc(drv, bytes, (CUstream)stream, &scratch, "the fast backward's scratch")))
        return rc;
    /* dq_acc first, the stats after it (16-byte aligned: rows_pad is a multiple of 128). */
    stats_bytes = (size_t)p->batch * (size_t)p->nheads_q * (size_t)rows_pad(p) * 2 * sizeof(float);
    if (scratch)
        stats = scratch + (bytes - stats_bytes);
    rc = launch_all(drv, fn, v, &params, det ? 0 : scratch, stats, stream);
    rc_free = fajit__scratch_free(drv, scratch, (CUstream)stream);
    return rc ? rc : rc_free;
}

int fajit__flash_bwd_run(fajit_ctx *ctx, const fajit__driver *drv, const fajit_attn_bwd_args *a,
                         const struct fajit_bwd_params *p, int arch, unsigned long long cu_id,
                         void *stream)
{
    fajit__variant v[3];
    fajit__flash_bwd_variants(a, arch, v);
    return fajit__flash_bwd_launch(ctx, drv, v, p, cu_id, stream);
}
