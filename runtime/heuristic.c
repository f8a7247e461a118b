/*
 * runtime/heuristic.c - tile sizes for a variant when nobody tuned them (and
 * for a call's shape: the fast forward's few-rows rule), the fast forward's
 * split-KV plan (flash-decoding), and the arch a spec gets when it names none.
 */
#include "runtime/flash_bwd.h"
#include "runtime/runtime.h"
#include "runtime/tune.h"

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

/* Opt-in dynamic shared memory per block of an arch: sm_80/87 163 KB, sm_90
 * and the datacenter Blackwells 227 KB, the others (sm_86, 89, 120...) 99 KB. */
size_t fajit__arch_smem_limit(int arch)
{
    switch (arch) {
    case 80:
    case 87:
        return 163 * 1024;
    case 90:
    case 100:
    case 103:
    case 110:
        return 227 * 1024;
    default:
        return 99 * 1024;
    }
}

/* t (the tiles chosen for asked) shrunk until its shared memory fits the
 * arch's limit, only in the fields asked left unset. Narrower key tiles before
 * fewer stages: a single stage leaves the copy of the next tile unhidden, and
 * its variants of d128 (sm_86/89) and of d256 with every feature (sm_80)
 * spilled where two stages of half the keys did not. */
static void fit_smem(const fajit__variant *asked, fajit__variant *t, size_t limit)
{
    while (fajit__variant_smem_bytes(t) > limit) {
        /* (warps splitting the key tiles need 16 keys each) */
        if (asked->bn == FAJIT__UNSET && t->bn > 32 && t->bn / 2 % (16 * fajit__fwd_key_warps(t)) == 0)
            t->bn /= 2;
        else if (asked->stages == FAJIT__UNSET && t->stages > 1)
            t->stages--;
        else if (asked->bm == FAJIT__UNSET && t->bm > 16 * t->warps)
            t->bm /= 2;
        else
            break; /* the template's static_assert says why */
    }
}

/* The fast forward (templates/flash_fwd.cuh). A warp owns 16 * (bm / 16 /
 * warps) query rows; its registers hold that many rows of the output (dv wide)
 * and of the scores (bn wide). Below a padded head dim of 128 two 16-row tiles
 * a warp (bm 128, 4 warps) halve the shared-memory traffic per mma; wider
 * heads take one tile a warp (8 warps) so the accumulators fit in registers
 * without spills. Two stages overlap the next K/V copy with this tile's math;
 * when the arch's shared memory is short, narrower key tiles, then fewer
 * stages, then fewer rows (fit_smem). */
static void fwd_tiles(fajit__variant *v)
{
    /* The registers follow the padded head dims: dqk to the mma k step of 16,
     * dv to whole n tiles of 8 (a dv not a multiple of 8 computes its tail). */
    int dqk_pad = (v->dqk + 15) / 16 * 16, dv_pad = (v->dv + 7) / 8 * 8;
    int dmax = dqk_pad > dv_pad ? dqk_pad : dv_pad;
    const int arch = v->arch == FAJIT__UNSET ? 90 : v->arch;
    const int masked = v->mask != FAJIT_MASK_NONE || v->window_left >= 0 || v->window_right >= 0;
    size_t limit = fajit__arch_smem_limit(arch);
    fajit__variant t = *v; /* fields the caller set stay as they are */

    /* d 128 without dropout, softcap or ALiBi takes FlashAttention-2's own
     * tile (bm 128 bn 64, 4 warps: two blocks an SM): measured on H100
     * (fp16, `fajit tune`, 1k-16k) 12-30% ahead of one tile a warp at bn
     * 128, once the softmax folded its scale and rescaled lazily made it fit
     * in registers. It sits at the register file's edge: unmasked and causal
     * (sm_90 without varlen) it does not spill with two stages (causal took
     * one stage until the sixth session: `fajit tune` on H100, fp16 b 8 h 16
     * 2k, timed two stages 7.8% ahead, 427 against 460 us); windows, and
     * causal on other archs or with varlen, spilled (16-68 bytes), so those
     * keep one tile a warp. */
    const int windowed = v->window_left >= 0 || v->window_right >= 0;
    if (dmax == 128 && dqk_pad == dv_pad && !v->dropout && !v->softcap && !v->alibi && !windowed &&
        (!masked || (arch == 90 && !v->varlen))) {
        set_if_unset(&t.warps, 4);
        set_if_unset(&t.bn, 64);
    }
    /* d 256 causal on sm_90 without windows, dropout, softcap or ALiBi:
     * FlashAttention-2's tile for d 256 (bm 64 bn 64, 4 warps, one K and one
     * V buffer: 96 KB, two blocks an SM), whose single stage pipelines K
     * against V (templates/flash_fwd.cuh next_tile). H100, bench_fwd.py
     * (sixth session, benchmarks/results/bench_fwd_d128_d256_h100_s6.txt):
     * causal 1k-4k 1.00-1.15x FlashAttention-2 (bm 128 bn 64, 8 warps, 2
     * stages: 0.92-1.02x), 8k-16k 1.04-1.09x (that tile: 1.06-1.13x).
     * Unmasked it lost to that tile from 8k on (0.99 against 1.05x at 8k)
     * and gained nothing at 1k-2k, so unmasked keeps it. With softcap,
     * ALiBi and varlen together it spilled (16 bytes). */
    if (dmax == 256 && dqk_pad == dv_pad && arch == 90 && v->mask != FAJIT_MASK_NONE && !windowed &&
        !v->dropout && !v->softcap && !v->alibi) {
        set_if_unset(&t.warps, 4);
        set_if_unset(&t.bm, 64);
        set_if_unset(&t.bn, 64);
        set_if_unset(&t.stages, 1);
    }
    /* d 160 without features: two 16-row tiles a warp over 32-key tiles (4
     * warps; one stage unmasked, whose two-stage variant spilled, two under
     * a mask) keeps the 160-wide accumulators and the scores in registers
     * with fewer passes over K and V than one tile a warp: `fajit tune` on
     * H100 (bf16, b 4, h 12, 4k) timed it 17% (1621 against 1897 us)
     * and, causal, 26% (832 against 1052 us) ahead of bm 128 bn 64, 8 warps.
     * Exactly 160 both ways and without varlen: 152 or 156 wide, and varlen
     * unmasked, spilled 8-40 bytes (sm_80/86/90). */
    if (v->dqk == 160 && v->dv == 160 && !v->varlen && !v->dropout && !v->softcap && !v->alibi && !windowed) {
        set_if_unset(&t.warps, 4);
        set_if_unset(&t.bn, 32);
        set_if_unset(&t.stages, masked ? 2 : 1);
    }
    /* Two tiles a warp hold 2 dv_pad accumulators plus the scores; past a dv
     * of 96 that leaves too few registers when the narrower Q is kept in
     * registers too (dqk_pad < dv_pad: 64/104, 72/112 and 59/100 spill), and
     * masked heads padded to 112 both ways spill too (16-32 bytes, sm_80 and
     * sm_90, one stage or two), so those take one tile a warp like the wide
     * heads. */
    const int narrow_q = dv_pad > 96 && dqk_pad < dv_pad;
    const int masked_112 = masked && dqk_pad == dv_pad && dmax == 112;
    set_if_unset(&t.warps, dmax < 128 && !narrow_q && !masked_112 ? 4 : 8);
    if (v->dropout && dmax < 128) /* see the dropout note below */
        set_if_unset(&t.bm, 16 * t.warps);
    set_if_unset(&t.bm, 128 > 16 * t.warps ? 128 : 16 * t.warps);
    /* Dropout's Philox state needs registers the score and output tiles
     * otherwise take: one 16-row tile a warp below 128, 64-key tiles at 128,
     * keep those variants free of spills (sm_80/90). */
    if (v->dropout)
        set_if_unset(&t.bn, 64);
    /* Measured on H100 (fp16, 2k-8k): d128 gains 10-15% from bn 128 (the
     * softmax and barrier cost per key halves); d64 and d256 lose with it. */
    set_if_unset(&t.bn, dmax == 128 ? 128 : 64);
    set_if_unset(&t.stages, 2);
    fit_smem(v, &t, limit);
    *v = t;
}

/* ---------------------------------------------------------------- few query rows a block */

/* Whether a fast-forward block of bm query rows of shape sh holds a kv
 * head's whole group of query heads (seqlen_q 1; ALiBi and dropout index by
 * a block's single head: never packed). fajit__plan_split packs exactly when
 * this says so; the few-rows rule asks it of the tile it is about to take. */
static int packs_group(const fajit__variant *v, int bm, const fajit__fwd_shape *sh, int64_t group)
{
    return sh->seqlen_q == 1 && group > 1 && group <= bm && !v->alibi && !v->dropout;
}

/* A decode step (few real query rows a block: seqlen_q 1 with a kv head's
 * query heads packed into one block, its keys split over blocks) streams K
 * and V once and does little math on them. The usual tile would give those
 * few rows to one warp, whose math then trails the copies; a block of one
 * 16-row tile whose 4 warps split every key tile (templates/flash_fwd.cuh
 * kKeyWarps, merged at the end) keeps them all busy. bm 16 bn 128, 4 warps,
 * 2 stages (132 KB: one block an SM, so the split rule fills the SMs with one
 * block each) timed best or within 1% of the best candidate on every decode
 * problem `fajit tune` tried on H100 (bf16 d128 32/8 heads: batch 1 4k-128k
 * keys, batch 8 4k and 16k; fp16 d64; 4 query rows of 16 MHA heads), e.g.
 * batch 1 4k 13.7 us (bm 128 bn 128 8 warps: 14.9), 64k 97.7 (98.5), 128k
 * 181.0 (182.5) (benchmarks/results/tune_decode_h100_s6.txt); under
 * bench_decode.py's dirty-L2 timing the gain is 0-1% (64k 108.1 against
 * 108.6 us).
 * One 16-row tile holds the accumulators of head dims up to 128 in
 * registers; unequal head dims, other widths, dropout, softcap and ALiBi
 * keep fwd_tiles' choice (not measured). */
#define FEW_ROWS_MAX 16 /* real query rows a block: one 16-row mma tile holds them */
#define FEW_ROWS_DMIN 64 /* head dims (dqk == dv) the rule covers */
#define FEW_ROWS_DMAX 128
#define FEW_ROWS_BM 16
#define FEW_ROWS_BN 128
#define FEW_ROWS_WARPS 4
#define FEW_ROWS_STAGES 2

static int few_rows_tile_fits(const fajit__variant *v)
{
    return v->op == FAJIT__OP_FWD && v->dqk == v->dv && v->dqk >= FEW_ROWS_DMIN && v->dqk <= FEW_ROWS_DMAX &&
           !v->dropout && !v->softcap && !v->alibi;
}

/* The few-rows tile for v (fields the caller set kept), shrunk as fwd_tiles
 * shrinks its own where the arch's shared memory is short. */
static void few_rows_tiles(fajit__variant *v)
{
    fajit__variant t = *v;
    /* a caller's bm of more rows than the warps' tiles: a tile a warp */
    set_if_unset(&t.warps, t.bm != FAJIT__UNSET && t.bm / 16 > FEW_ROWS_WARPS ? t.bm / 16 : FEW_ROWS_WARPS);
    set_if_unset(&t.bm, FEW_ROWS_BM);
    set_if_unset(&t.bn, FEW_ROWS_BN);
    set_if_unset(&t.stages, FEW_ROWS_STAGES);
    fit_smem(v, &t, fajit__arch_smem_limit(v->arch == FAJIT__UNSET ? 90 : v->arch));
    *v = t;
}

/* Real query rows in one block of v (tiles set) for shape sh. */
static int64_t rows_a_block(const fajit__variant *v, const fajit__fwd_shape *sh)
{
    int64_t group = sh->nheads_kv > 0 ? sh->nheads_q / sh->nheads_kv : 1;
    return packs_group(v, v->bm, sh, group) ? sh->seqlen_q * group : sh->seqlen_q;
}

int fajit__heuristic_tiles_for(fajit__variant *v, const fajit__fwd_shape *sh)
{
    if (sh && few_rows_tile_fits(v)) {
        /* Few rows as the usual tile would pack them: a group of more than
         * 16 query heads keeps that tile (packed, it reads K and V once; the
         * few-rows tile could not pack it). */
        fajit__variant usual = *v;
        fajit__heuristic_tiles(&usual);
        if (rows_a_block(&usual, sh) <= FEW_ROWS_MAX) {
            few_rows_tiles(v);
            return 1;
        }
    }
    fajit__heuristic_tiles(v);
    return 0;
}

void fajit__few_rows_tiles(fajit__variant *v)
{
    if (few_rows_tile_fits(v))
        few_rows_tiles(v);
    else
        fajit__heuristic_tiles(v);
}

void fajit__heuristic_tiles(fajit__variant *v)
{
    switch (v->op) {
    case FAJIT__OP_FWD:
        fwd_tiles(v);
        break;
    case FAJIT__OP_BWD:
    case FAJIT__OP_BWD_PRE:
    case FAJIT__OP_BWD_POST:
    case FAJIT__OP_BWD_DKDV:
    case FAJIT__OP_BWD_DQ:
        fajit__flash_bwd_tiles(v);
        break;
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

/* ---------------------------------------------------------------- split-KV plan */

/* Blocks of v an SM runs at once: its shared memory (the opt-in limit plus
 * the 1 KB each block reserves) and registers (the kernel runs near 255 a
 * thread). */
static int blocks_per_sm(const fajit__variant *v)
{
    size_t per_sm = fajit__arch_smem_limit(v->arch) + 1024, per_block = fajit__variant_smem_bytes(v) + 1024;
    int by_smem = (int)(per_sm / per_block), by_regs = 65536 / (v->warps * 32 * 256);
    int n = by_smem < by_regs ? by_smem : by_regs;
    return n > 0 ? n : 1;
}

/* The fewest splits whose waves of blocks fill the SMs within 5% of the best
 * filling any split count reaches (FlashAttention's flash-decoding rule, with
 * whole waves of resident blocks). */
static int choose_splits(int64_t blocks, int slots, int max_splits)
{
    double eff[FAJIT__MAX_SPLITS + 1], best = 0.0;
    for (int s = 1; s <= max_splits; s++) {
        int64_t n = blocks * s, waves = (n + slots - 1) / slots;
        eff[s] = (double)n / (double)(waves * slots);
        best = eff[s] > best ? eff[s] : best;
    }
    for (int s = 1; s <= max_splits; s++)
        if (eff[s] >= 0.95 * best)
            return s;
    return 1;
}

/* Packing when each kv head's query heads fit one block's rows at seqlen_q 1
 * (packs_group); splitting when the blocks would leave SMs idle and the keys
 * are long, or as tuned. */
static fajit__split_plan plan_split_kv(const fajit__variant *v, const fajit__fwd_shape *sh, int sms,
                                       int tuned_splits)
{
    fajit__split_plan s = {1, 1, (unsigned)((sh->seqlen_q + v->bm - 1) / v->bm), (unsigned)sh->nheads_q, 0, 0};
    int64_t group = sh->nheads_q / sh->nheads_kv, n_tiles = (sh->seqlen_k + v->bn - 1) / v->bn, blocks;
    int max_splits = n_tiles < FAJIT__MAX_SPLITS ? (int)n_tiles : FAJIT__MAX_SPLITS, slots;
    if (v->op != FAJIT__OP_FWD)
        return s;
    if (packs_group(v, v->bm, sh, group)) {
        s.pack = (int)group;
        s.grid_x = 1;
        s.grid_y = (unsigned)sh->nheads_kv;
    }
    if (tuned_splits > 0) { /* measured with these tiles: taken, within the keys' tiles */
        s.splits = tuned_splits < max_splits ? tuned_splits : max_splits > 0 ? max_splits : 1;
        return s;
    }
    blocks = (int64_t)s.grid_x * s.grid_y * sh->batch;
    if (n_tiles < FAJIT__MIN_SPLIT_TILES || sms <= 0)
        return s;
    slots = sms * blocks_per_sm(v);
    if (blocks * 5 >= (int64_t)slots * 4) /* 80% of a wave: enough blocks already */
        return s;
    s.max_splits = max_splits;
    s.splits = choose_splits(blocks, slots, max_splits);
    return s;
}

fajit__split_plan fajit__plan_split(const fajit__variant *v, const fajit__fwd_shape *sh, int sms,
                                    int tuned_splits, int persist)
{
    fajit__split_plan s = plan_split_kv(v, sh, sms, tuned_splits);
    if (s.splits == 1 && s.pack == 1 && fajit__fwd_persistent(v)) {
        int64_t items = (int64_t)s.grid_x * s.grid_y * sh->batch, cap = items;
        if (sms > 0)
            cap = (int64_t)sms * blocks_per_sm(v);
        if (persist == 0)
            cap = items;
        else if (persist > 0 && persist < cap)
            cap = persist;
        s.blocks = (unsigned)(items < cap ? items : cap); /* items: checked against INT_MAX at launch */
    }
    return s;
}

int fajit__plan_splits(const fajit__variant *heuristic, const fajit__fwd_shape *sh, int sms)
{
    fajit__split_plan s = fajit__plan_split(heuristic, sh, sms, 0, -1);
    return s.max_splits > 0 ? s.splits : 0;
}
