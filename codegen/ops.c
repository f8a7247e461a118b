/*
 * codegen/ops.c - what each op is made of: its template and its kernel's name.
 * The one table both the renderer and the runtime's loader read.
 */
#include "codegen/variant.h"
#include "fajit.h"

static const struct {
    const char *template_name;
    const char *entry_name;
} ops[FAJIT__OP_COUNT] = {
    [FAJIT__OP_REF] = {"reference.cuh", "fajit_ref_fwd"},
    [FAJIT__OP_FWD] = {"flash_fwd.cuh", "fajit_flash_fwd"},
    [FAJIT__OP_BWD] = {"flash_bwd.cuh", "fajit_flash_bwd"},
    [FAJIT__OP_REF_DQ] = {"reference_bwd.cuh", "fajit_ref_bwd_dq"},
    [FAJIT__OP_REF_DKDV] = {"reference_bwd.cuh", "fajit_ref_bwd_dkdv"},
    [FAJIT__OP_BWD_PRE] = {"flash_bwd.cuh", "fajit_flash_bwd_pre"},
    [FAJIT__OP_BWD_POST] = {"flash_bwd.cuh", "fajit_flash_bwd_post"},
    [FAJIT__OP_BWD_DKDV] = {"flash_bwd.cuh", "fajit_flash_bwd_dkdv"},
    [FAJIT__OP_BWD_DQ] = {"flash_bwd.cuh", "fajit_flash_bwd_dq"},
    [FAJIT__OP_REF_PROBS] = {"reference.cuh", "fajit_ref_probs_fwd"},
};

const char *fajit__variant_entry_name(const fajit__variant *v)
{
    return v->op >= 0 && v->op < FAJIT__OP_COUNT ? ops[v->op].entry_name : NULL;
}

const char *fajit__variant_template_name(const fajit__variant *v)
{
    return v->op >= 0 && v->op < FAJIT__OP_COUNT ? ops[v->op].template_name : NULL;
}


/* Must match the layout in templates/flash_fwd.cuh (its static_assert against
 * FAJIT_SMEM_BYTES catches a disagreement at compile time): Q tile, then
 * `stages` K tiles, then `stages` V tiles, rows of 16-byte chunks, dqk rounded
 * up to the mma k step of 16, rows of a multiple of 8 chunks kept (swizzled),
 * others padded to an odd chunk count. */
static size_t fwd_row_bytes(int dim)
{
    size_t chunks = ((size_t)dim + 7) / 8; /* a head dim not a multiple of 8 pads its last chunk */
    return (chunks % 8 == 0 ? chunks : (chunks | 1)) * 16;
}

int fajit__fwd_key_warps(const fajit__variant *v)
{
    int row_tiles = v->bm / 16;
    return v->bm > 0 && v->warps > row_tiles && row_tiles > 0 ? v->warps / row_tiles : 1;
}

static size_t fwd_smem_bytes(const fajit__variant *v)
{
    size_t qk = fwd_row_bytes((v->dqk + 15) / 16 * 16), vv = fwd_row_bytes(v->dv), kv, merge;
    int key_warps = fajit__fwd_key_warps(v);
    if (v->bm <= 0 || v->bn <= 0 || v->stages <= 0 || v->dqk <= 0 || v->dv <= 0)
        return 0;
    kv = (size_t)v->stages * (size_t)v->bn * (qk + vv);
    /* key-split warps' merge: a lane's accumulators (4 floats an 8-wide dv
     * tile), max and sums, for every warp but a row tile's first */
    merge = key_warps > 1 ? (size_t)(key_warps - 1) * (size_t)(v->bm / 16) * 32 *
                                ((size_t)(v->dv + 7) / 8 * 4 + 4) * sizeof(float)
                          : 0;
    return (size_t)v->bm * qk + (kv > merge ? kv : merge);
}

/* Must match the layouts in templates/flash_bwd.cuh (its static_assert
 * against FAJIT_SMEM_BYTES catches a disagreement). Key-major (bwd,
 * bwd-dkdv): per stage a Q tile (bm rows) and a dO tile; K and V (bn rows),
 * P^T and dS^T (bn rows of bm); per stage bm fp32 lse2 and D. Query-major
 * (bwd-dq): one Q and dO; per stage K and V; dS^T; lse2 and D. Head dims
 * round up to 16 (the mma k step); every row is a whole odd number of 16-byte
 * chunks. */
static size_t bwd_row_bytes(int dim)
{
    return ((size_t)dim / 8 | 1) * 16;
}

static size_t bwd_smem_bytes(const fajit__variant *v)
{
    size_t qk, vv, pp, q_stages, k_stages, p_tiles;
    if (v->bm <= 0 || v->bn <= 0 || v->stages <= 0 || v->dqk <= 0 || v->dv <= 0)
        return 0;
    qk = bwd_row_bytes((v->dqk + 15) / 16 * 16);
    vv = bwd_row_bytes((v->dv + 15) / 16 * 16);
    pp = bwd_row_bytes(v->bm);
    q_stages = v->op == FAJIT__OP_BWD_DQ ? 1 : (size_t)v->stages;
    k_stages = v->op == FAJIT__OP_BWD_DQ ? (size_t)v->stages : 1;
    p_tiles = v->op == FAJIT__OP_BWD_DQ ? 1 : 2;
    return q_stages * (size_t)v->bm * (qk + vv + 2 * 4) + (size_t)v->bn * (k_stages * (qk + vv) + p_tiles * pp);
}

size_t fajit__variant_smem_bytes(const fajit__variant *v)
{
    switch (v->op) {
    case FAJIT__OP_FWD:
        return fwd_smem_bytes(v);
    case FAJIT__OP_BWD:
    case FAJIT__OP_BWD_DKDV:
    case FAJIT__OP_BWD_DQ:
        return bwd_smem_bytes(v);
    case FAJIT__OP_BWD_PRE:  /* no shared memory */
    case FAJIT__OP_BWD_POST:
    case FAJIT__OP_REF:
    case FAJIT__OP_REF_PROBS:
    case FAJIT__OP_REF_DQ:
    case FAJIT__OP_REF_DKDV:
    default:
        return 0; /* static shared memory only */
    }
}

/* Whether the fast forward's kernel for v runs as persistent blocks
 * (templates/flash_fwd.cuh attend_items, FAJIT_PERSIST): one 16-row tile a
 * warp (bm = 16 warps), two stages, 8 keys of a tile a warp at least (the
 * output leaves through the K and V buffers), no mask, window, dropout,
 * ALiBi, varlen or paged KV; its launch is then a 1-D grid of blocks looping
 * over the (query block, head, batch) items. The template covers dqk = dv
 * any multiple of 16; taken where it was measured faster: d 256 (H100,
 * bench_fwd.py, three interleaved rounds, ninth session: 1k +3-4%, 2k +1-4%,
 * 16k even). d 192 measured 2-3% slower at 2k-16k (even at 1k), the other
 * dims were not measured: they keep a block an item. */
int fajit__fwd_persistent(const fajit__variant *v)
{
    return v->op == FAJIT__OP_FWD && v->dqk == 256 && v->dv == 256 && v->bm == 16 * v->warps && v->stages == 2 &&
           v->warps * 8 <= v->bn && v->mask == FAJIT_MASK_NONE && v->window_left < 0 && v->window_right < 0 &&
           !v->dropout && !v->alibi && !v->varlen && !v->paged;
}

/* What templates/flash_fwd.cuh implements: every mask and window, softcap,
 * ALiBi, varlen and dropout; not yet paged KV (the reference covers it).
 * Edit together with the template's static_asserts. */
int fajit__fast_fwd_supports(const fajit__variant *v)
{
    return !v->paged;
}
