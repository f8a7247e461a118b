/*
 * templates/flash_fwd.cuh - the fast forward attention on tensor cores, in the
 * FlashAttention-2 manner. Same semantics as reference.cuh (read its header):
 * (batch, seqlen, nheads, headdim) with any batch/seq/head strides and a
 * contiguous last dim, GQA/MQA, causal bottom-right and top-left, local windows
 * (common.cuh visible_keys), fully masked rows -> 0 and LSE -inf, LSE to p.lse
 * when not NULL, 64-bit offsets.
 *
 * How. A block owns FAJIT_BM query rows of one (batch, head); warp w owns 16 *
 * kMTiles consecutive rows of them, so every softmax reduction stays inside a
 * quad of lanes and needs no shared memory. Keys are visited in tiles of
 * FAJIT_BN, only those some row of the block may see (causal and windows skip
 * whole tiles; the per-element mask is applied only to tiles that straddle a
 * row's bounds). Per tile:
 *   S = Q K^T   mma.sync m16n8k16 (fp16/bf16 in, fp32 accumulate); Q and K
 *               fragments by ldmatrix from shared memory (Q kept in registers
 *               when small enough);
 *   online softmax in the exp2 domain: x = S * softmax_scale_log2, running max
 *               m and per-lane partial row sums l, the accumulator rescaled by
 *               exp2(m_old - m_new);
 *   O += P V    P converted to fp16/bf16 in registers (the S accumulator layout
 *               is the A-operand layout), V fragments by ldmatrix.trans.
 * K and V tiles stream through FAJIT_STAGES shared-memory buffers filled by
 * cp.async (zero-filled past seqlen_k, so no garbage reaches P V).
 *
 * Head dims: any dqk and dv in 1..256. Shared-memory rows are whole 16-byte
 * chunks (8 elements), and the mma k step is 16, so Q and K rows round dqk up
 * to a multiple of 16 and V rows round dv up to a multiple of 8. The columns
 * past the head dim are never loaded: they are zeroed once per block, so they
 * add nothing to q.k, and P V's output columns past dv (never stored) stay
 * finite.
 *
 * Loads of a tensor move the widest vector its head dim allows, the largest
 * power of two dividing it, capped at 8 elements: cp.async of 16 bytes for a
 * multiple of 8, 8 bytes for 4, 4 bytes for 2; an odd head dim takes plain
 * 2-byte loads and shared-memory stores (cp.async has no 2-byte form), which
 * stall at the store instead of overlapping the math. Q and K use dqk's width,
 * V and O dv's. A multiple of 8 compiles to the code it always had.
 *
 * Shared memory rows are arrays of 16-byte chunks. A row of a multiple of 8
 * chunks is XOR-swizzled (chunk ^ (row % 8)); any other row length is padded to
 * an odd number of chunks. Either way the 8 rows an ldmatrix phase reads, and
 * the 8 chunks a cp.async phase writes, fall in 8 distinct bank groups.
 *
 * Launch (runtime): grid (ceil(seqlen_q / FAJIT_BM), nheads_q, batch),
 * FAJIT_WARPS * 32 threads, FAJIT_SMEM_BYTES of dynamic shared memory (the
 * layout below; codegen's fajit__variant_smem_bytes computes the same number).
 *
 * Few query rows over long keys (decode) would leave SMs idle; the runtime
 * then sets, per launch (fwd_params.h; no variant field):
 *   - p.pack_gqa (seqlen_q = 1): a block's rows are the query heads of one kv
 *     head, grid y = nheads_kv, so K and V are read once per kv head;
 *   - p.num_splits: grid x = query blocks * splits, each block attends to one
 *     share of its key tiles and writes O / l (fp32) and its LSE to scratch;
 *     a second launch of the same kernel with p.combine = 1 (a warp per row)
 *     merges the splits by their LSEs into o and lse.
 * Warps with no row of their own (decode's mostly empty blocks) only copy.
 * Or a block of fewer 16-row tiles than warps (bm < 16 * warps) splits each
 * key tile over its warps instead, which merge at the end (kKeyWarps): then
 * every warp does math on a decode block's few rows.
 * Needs q and k aligned to dqk's load width (in bytes: 2 * width) with
 * strides multiples of it in elements, v and o the same for dv's width
 * (runtime/attn.c fast_fwd_refusal checks, and falls back to the reference).
 */
#include "common.cuh"
#include "fwd_params.h"
#include "ptx.cuh"

static_assert(FAJIT_OP == 1, "flash_fwd.cuh is the template of op fwd");
static_assert(FAJIT_ARCH >= 80, "flash_fwd: needs sm_80 or newer (mma.sync bf16, cp.async)");
static_assert(FAJIT_DQK >= 1 && FAJIT_DQK <= 256, "flash_fwd: dqk must be in 1..256");
static_assert(FAJIT_DV >= 1 && FAJIT_DV <= 256, "flash_fwd: dv must be in 1..256");
static_assert(FAJIT_WARPS >= 1 && FAJIT_WARPS <= 16, "flash_fwd: warps must be 1..16");
static_assert(FAJIT_BM % 16 == 0 && (FAJIT_BM % (16 * FAJIT_WARPS) == 0 || (16 * FAJIT_WARPS) % FAJIT_BM == 0),
              "flash_fwd: bm must be a multiple of 16 * warps, or divide it (warps then split the keys)");
static_assert(FAJIT_BN >= 16 && FAJIT_BN % 16 == 0, "flash_fwd: bn must be a multiple of 16");
static_assert(FAJIT_STAGES >= 1 && FAJIT_STAGES <= 3, "flash_fwd: stages must be 1..3");
static_assert(FAJIT_PAGED == 0, "flash_fwd: paged KV is not implemented");

namespace fajit_fa {

using namespace fajit_ptx; /* ptx.cuh */

using elem_t = unsigned short; /* raw fp16 / bf16 bits */

constexpr int kThreads = FAJIT_WARPS * 32;
/* Fewer 16-row tiles than warps (bm < 16 * warps: decode's few rows over long
 * keys) split every key tile over kKeyWarps warps a row tile: warp w takes
 * rows of tile w % kRowWarps and keys (w / kRowWarps) * kWarpBN onwards of
 * each key tile, with a softmax state of its own; the warps of a row tile
 * merge their states in shared memory at the end (merge_key_warps). */
constexpr int kRowWarps = FAJIT_BM / 16 < FAJIT_WARPS ? FAJIT_BM / 16 : FAJIT_WARPS;
constexpr int kKeyWarps = FAJIT_WARPS / kRowWarps;
constexpr int kWarpBN = FAJIT_BN / kKeyWarps; /* keys of a tile one warp takes */
static_assert(kKeyWarps == 1 || (FAJIT_WARPS % kRowWarps == 0 && kWarpBN % 16 == 0),
              "flash_fwd: with bm < 16 * warps, warps / (bm / 16) must divide bn / 16");
constexpr int kMTiles = FAJIT_BM / (16 * kRowWarps); /* 16-row mma tiles per warp */
constexpr int kWarpRows = 16 * kMTiles;
constexpr int kDqkPad = (FAJIT_DQK + 15) / 16 * 16; /* mma k steps of 16 */
constexpr int kChunksQK = kDqkPad / 8;              /* 16-byte chunks of a Q/K smem row */
constexpr int kChunksV = (FAJIT_DV + 7) / 8;       /* 16-byte chunks of a V smem row */
constexpr int kNTiles = kWarpBN / 8;    /* n tiles of a warp's S */
constexpr int kOTiles = kChunksV;       /* n tiles of O */

/* Elements a load moves at once for a head dim: the largest power of two
 * dividing it, up to 8 (16 bytes). */
__host__ __device__ constexpr int load_width(int dim) {
    return dim % 8 == 0 ? 8 : dim % 4 == 0 ? 4 : dim % 2 == 0 ? 2 : 1;
}
constexpr int kWidthQK = load_width(FAJIT_DQK);
constexpr int kWidthV = load_width(FAJIT_DV);

/* GQA packing (p.pack_gqa) gives one block rows of several query heads; ALiBi
 * and dropout index by head per block, so their variants never pack. */
constexpr bool kCanPack = !FAJIT_ALIBI && !FAJIT_DROPOUT;
/* Causal blocks start in common.cuh's heavy_halves_first order (H100, fp16
 * causal 1k-16k: d256 0.89-0.99x -> 0.92-1.07x FlashAttention-2 at 1k-4k,
 * d64 even or better), but for two 16-row tiles a warp at dv 128: that tile
 * sits at the register file's edge, and the remapped indices spilled. */
constexpr bool kHeavyFirst = FAJIT_MASK != fajit::kMaskNone && !(kMTiles == 2 && kChunksV >= 16);
constexpr int kDvPad = kOTiles * 8; /* floats of a partial output row */
constexpr int kKSteps = kDqkPad / 16;   /* k steps of Q K^T */
constexpr int kPSteps = kWarpBN / 16;   /* k steps of P V */

/* Row length in chunks: swizzled rows keep their length, others go odd. */
__host__ __device__ constexpr int row_chunks(int chunks) { return chunks % 8 == 0 ? chunks : (chunks | 1); }

constexpr int kQElems = FAJIT_BM * row_chunks(kChunksQK) * 8;
constexpr int kKElems = FAJIT_BN * row_chunks(kChunksQK) * 8; /* one stage */
constexpr int kVElems = FAJIT_BN * row_chunks(kChunksV) * 8;  /* one stage */
/* merge_key_warps' exchange, in the K/V buffers once the loop is done: each
 * warp of key split 1.. keeps a lane's accumulators, max and sums. */
constexpr int kMergeFloats = kOTiles * 4 + 4; /* a lane's */
constexpr int kMergeBytes = kKeyWarps > 1 ? (kKeyWarps - 1) * kRowWarps * 32 * kMergeFloats * 4 : 0;
constexpr int kKVBytes = FAJIT_STAGES * (kKElems + kVElems) * 2;
constexpr int kSmemBytes = kQElems * 2 + (kKVBytes > kMergeBytes ? kKVBytes : kMergeBytes);
static_assert(kSmemBytes <= FAJIT_SMEM_BYTES,
              "flash_fwd: shared memory layout larger than FAJIT_SMEM_BYTES (codegen disagrees)");

/* Q fragments live in registers when they cost at most 32 of them. */
constexpr bool kQInRegs = kMTiles * kKSteps * 4 <= 32;
/* Otherwise, with two 16-row tiles a warp, unmasked, Q K^T loads the next
 * k step's Q fragments ahead of this step's mma (8 registers more): ncu of
 * d 256 (one Q register set) showed each step's first mma waiting on the Q
 * ldmatrix issued just before it. H100, bench_fwd.py, three interleaved A/B
 * rounds (benchmarks/results/bench_fwd_qpf_stage_ab_h100_s7.txt): d 128
 * unmasked (bm 128 bn 64, 4 warps) +4-8% at 1k-16k, fp16 and bf16. Causal
 * (sm_90) and d 160 at sm_80/86 spilled with it; one tile a warp (d 256)
 * gained nothing (-2% at 1k). */
constexpr bool kQPrefetch = !kQInRegs && kMTiles == 2 && kOTiles <= 16 && FAJIT_MASK == fajit::kMaskNone &&
                            FAJIT_WINDOW_LEFT < 0 && FAJIT_WINDOW_RIGHT < 0;

/* Element offset of chunk `chunk` of row `row` in a tile of `Chunks`-chunk rows. */
template <int Chunks>
__device__ __forceinline__ int smem_at(int row, int chunk) {
    if constexpr (Chunks % 8 == 0)
        return (row * Chunks + (chunk ^ (row & 7))) * 8;
    else
        return (row * row_chunks(Chunks) + chunk) * 8;
}

/*
 * A lane's ldmatrix addresses in a tile of Chunks-chunk rows. Every fragment
 * load reads row R + row_lane and chunk C0 + chunk_lane, with R a multiple of
 * 8 and C0 even, both compile-time; row_lane % 8 is the swizzle's XOR term for
 * every R. So (C0 + chunk_lane) ^ (row_lane % 8) = 8 (C0 / 8) + ((C0 % 8 +
 * chunk_lane) ^ (row_lane % 8)): four per-lane offsets plus constants, instead
 * of one live register per distinct address.
 */
template <int Chunks>
struct LaneAddr {
    unsigned base;  /* byte address of the lane's row, chunk 0 (padded: chunk_lane) */
    unsigned sw[4]; /* swizzled: byte offset of chunk (2 r + chunk_lane) ^ (row_lane % 8) */

    __device__ __forceinline__ void init(unsigned tile, int row_lane, int chunk_lane) {
        if constexpr (Chunks % 8 == 0) {
            base = tile + row_lane * Chunks * 16;
#pragma unroll
            for (int r = 0; r < 4; ++r)
                sw[r] = ((2 * r + chunk_lane) ^ (row_lane & 7)) * 16;
        } else {
            base = tile + (row_lane * row_chunks(Chunks) + chunk_lane) * 16;
        }
    }
    __device__ __forceinline__ unsigned at(int r0, int c0) const {
        if constexpr (Chunks % 8 == 0)
            return base + r0 * Chunks * 16 + (c0 / 8) * 128 + sw[(c0 % 8) / 2];
        else
            return base + (r0 * row_chunks(Chunks) + c0) * 16;
    }
};

/* ---------------------------------------------------------------- tiles */

/* The block's view of one (batch, head): base pointers and row strides. */
struct Heads {
    const elem_t *q, *k, *v;
    elem_t *o;
    long long q_row, k_row, v_row, o_row; /* seq strides (packed: q's and o's head strides) */
};

using fajit::Seq; /* common.cuh: seq_of, seq_q, seq_k */
using fajit::seq_of;
using fajit::seq_q;
using fajit::seq_k;

/* Index in p.lse of row 0 of (sequence b, head h): LSE is (batch, nheads_q,
 * seqlen_q), or (nheads_q, total_q) under varlen (fajit.h). Computed where it
 * is needed, so no register holds it through the main loop. */
__device__ __forceinline__ long long lse_row0(const fajit_fwd_params &p, const Seq &seq, long long bh,
                                              long long h) {
    if constexpr (FAJIT_VARLEN)
        return h * static_cast<long long>(p.cu_seqlens_q[p.batch]) + seq.q_start;
    else
        return bh * p.seqlen_q;
}

__device__ __forceinline__ Heads heads_of(const fajit_fwd_params &p, const Seq &seq, long long b,
                                          long long h) {
    /* (heads fit an int: a 32-bit division, not the 64-bit subroutine) */
    const long long h_kv = static_cast<int>(h) / (p.nheads_q / p.nheads_kv);
    /* Varlen tensors are packed (total, nheads, dim): batch strides unused. */
    Heads t;
    if constexpr (FAJIT_VARLEN) {
        t.q = static_cast<const elem_t *>(p.q) + seq.q_start * p.q_stride[1] + h * p.q_stride[2];
        t.k = static_cast<const elem_t *>(p.k) + seq.k_start * p.k_stride[1] + h_kv * p.k_stride[2];
        t.v = static_cast<const elem_t *>(p.v) + seq.k_start * p.v_stride[1] + h_kv * p.v_stride[2];
        t.o = static_cast<elem_t *>(p.o) + seq.q_start * p.o_stride[1] + h * p.o_stride[2];
    } else {
        t.q = static_cast<const elem_t *>(p.q) + b * p.q_stride[0] + h * p.q_stride[2];
        t.k = static_cast<const elem_t *>(p.k) + b * p.k_stride[0] + h_kv * p.k_stride[2];
        t.v = static_cast<const elem_t *>(p.v) + b * p.v_stride[0] + h_kv * p.v_stride[2];
        t.o = static_cast<elem_t *>(p.o) + b * p.o_stride[0] + h * p.o_stride[2];
    }
    t.q_row = p.q_stride[1];
    t.k_row = p.k_stride[1];
    t.v_row = p.v_stride[1];
    t.o_row = p.o_stride[1];
    return t;
}

/*
 * The block's place in the launch. GQA packing (decode: seqlen_q = 1) makes
 * the pack = nheads_q / nheads_kv query heads of one kv head the block's rows:
 * row r is head h0 + r, every row at query position 0, so the Q and O row
 * strides become the head strides and the LSE index steps by the LSE's head
 * stride (1 dense, total_q under varlen).
 */
struct Block {
    int rows;     /* rows of the block's row space: seqlen_q, or pack when packed */
    int pack;     /* query heads packed as rows (1: not packed) */
    int split;    /* its key split, -1 when the launch does not split */
    int lse_step; /* index step in p.lse (and the partials) from one row to the next */
};

/* Query position of block row r (packed rows all sit at position 0). */
__device__ __forceinline__ int pos_of(int r, const Block &blk) { return blk.pack == 1 ? r : 0; }

/* Index in p.lse (and in one split's partials) of block row `row`. */
__device__ __forceinline__ long long lse_index(const fajit_fwd_params &p, const Seq &seq, long long bh,
                                               long long h, int row, const Block &blk) {
    return lse_row0(p, seq, bh, h) + static_cast<long long>(row) * blk.lse_step;
}

/* Rows rows x Dim columns from src (row stride `stride`) into a smem tile of
 * Chunks-chunk rows; rows at or past `valid` are zero-filled. The columns past
 * Dim are left alone (zero_pad sets them once). */
template <int Rows, int Dim, int Chunks>
__device__ __forceinline__ void load_tile(unsigned dst, const elem_t *src, long long stride,
                                          int first, int valid, int tid) {
    constexpr int Width = load_width(Dim), kVecs = Dim / Width;
    if constexpr (Width > 1 && kVecs <= kThreads) {
        /* ptx.cuh's load_rows: a fixed unrolled trip count, no per-row
         * selects on full tiles. */
        load_rows<kThreads, Rows, kVecs, Width>(src, stride, first, valid, tid, [&](int r, int c) {
            const int e = c * Width;
            return dst + static_cast<unsigned>((smem_at<Chunks>(r, e / 8) + e % 8) * 2);
        });
    } else if constexpr (Width > 1) {
        /* More vectors a row than threads (a one-warp block of 2- or 4-wide
         * vectors; 16-byte ones number at most 32): a flat loop. */
        static_assert(Width < 8, "flash_fwd: 16-byte rows always fit load_rows");
#pragma unroll 1
        for (int i = tid; i < Rows * kVecs; i += kThreads) {
            const int r = i / kVecs, e = (i % kVecs) * Width;
            const bool ok = first + r < valid;
            const elem_t *g = ok ? src + static_cast<long long>(first + r) * stride + e : src;
            cp_async_small<Width * 2>(dst + (smem_at<Chunks>(r, e / 8) + e % 8) * 2, g, ok);
        }
    } else {
        /* Odd: 2-byte loads, kBatch in flight before their stores wait. */
        constexpr int kTotal = Rows * Dim, kBatch = 8;
#pragma unroll 1
        for (int i0 = tid; i0 < kTotal; i0 += kBatch * kThreads) {
            elem_t x[kBatch];
#pragma unroll
            for (int k = 0; k < kBatch; ++k) {
                const int i = i0 + k * kThreads, r = i / Dim, e = i % Dim;
                x[k] = i < kTotal && first + r < valid ? src[static_cast<long long>(first + r) * stride + e]
                                                       : static_cast<elem_t>(0);
            }
#pragma unroll
            for (int k = 0; k < kBatch; ++k) {
                const int i = i0 + k * kThreads, r = i / Dim, e = i % Dim;
                if (i < kTotal)
                    st_shared_u16(dst + (smem_at<Chunks>(r, e / 8) + e % 8) * 2, x[k]);
            }
        }
    }
}

/* Zeroes columns Dim .. Chunks * 8 - 1 of every row (never loaded: the pad
 * to the mma k step of Q and K, the tail of a last partial chunk). */
template <int Rows, int Dim, int Chunks>
__device__ __forceinline__ void zero_pad(elem_t *tile, int tid) {
    if constexpr (Dim % 8 == 0 && Chunks * 8 != Dim) {
        static_assert(Chunks * 8 == Dim + 8, "a multiple of 8 pads one chunk (to the k step)");
        for (int r = tid; r < Rows; r += kThreads) {
            unsigned *at = reinterpret_cast<unsigned *>(tile + smem_at<Chunks>(r, Chunks - 1));
            at[0] = at[1] = at[2] = at[3] = 0u;
        }
    } else if constexpr (Dim % 8 != 0) {
        constexpr int kPad = Chunks * 8 - Dim;
        for (int i = tid; i < Rows * kPad; i += kThreads) {
            const int r = i / kPad, e = Dim + i % kPad;
            tile[smem_at<Chunks>(r, e / 8) + e % 8] = 0;
        }
    }
}

/* ---------------------------------------------------------------- softmax state */

/* Per thread: for each m tile, rows lane/4 (half 0) and lane/4 + 8 (half 1). */
struct RowState {
    float m[kMTiles][2]; /* running max of x = s * scale_log2, -inf before any key */
    float l[kMTiles][2]; /* this lane's partial sum of exp2(x - m) */
    /* Visible keys, affine in the row (common.cuh visible_keys): the lane's
     * row mt * 16 + half * 8 past its first has diagonal diag0 + that offset
     * times row_step (0 when packed rows all sit at query position 0). Three
     * registers instead of a begin and an end per row. */
    int diag0, row_step, seqlen_k;
};

/* Whether key `key` is outside the visible range of the lane's row (mt, half). */
__device__ __forceinline__ bool key_hidden(const RowState &st, int mt, int half, int key) {
    const int diag = st.diag0 + (mt * 16 + half * 8) * st.row_step;
    bool hidden = key >= st.seqlen_k;
    if constexpr (FAJIT_MASK != fajit::kMaskNone)
        hidden = hidden || key > diag;
    if constexpr (FAJIT_WINDOW_LEFT >= 0)
        hidden = hidden || key < diag - FAJIT_WINDOW_LEFT;
    if constexpr (FAJIT_WINDOW_RIGHT >= 0)
        hidden = hidden || key > diag + FAJIT_WINDOW_RIGHT;
    return hidden;
}

/* ---------------------------------------------------------------- scores */

__device__ __forceinline__ float fast_rcp(float x) {
    float y;
    asm("rcp.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
    return y;
}

/* tanh(x) = 1 - 2 / (e^2x + 1): two MUFU ops, absolute error ~1e-6 over the
 * whole range (+-1 exactly at the ends: e^2x flushes to 0 or overflows to inf,
 * whose reciprocal is 0), unlike tanh.approx's ~5e-4, which softcap would
 * multiply by the cap. */
__device__ __forceinline__ float tanh_exp2(float x) {
    const float e = fast_exp2(x * 2.8853900817779268f); /* 2 log2(e) */
    return fmaf(-2.0f, fast_rcp(e + 1.0f), 1.0f);
}

/* Without softcap and ALiBi the scale is folded into the softmax's
 * exponent: exp2(s * scale - m), one FFMA an element instead of a multiply
 * and a subtraction, and the row max taken over the raw scores. A negative
 * softmax_scale (allowed, if odd) negates the scores first, so the max and
 * the -inf of masked keys keep their meaning and the scale is |scale|. */
constexpr bool kFoldScale = !FAJIT_SOFTCAP && !FAJIT_ALIBI;

/* What turns q.k into x, the score in the log2 domain, for this block. */
struct ScoreMods {
    float scale; /* softcap: softmax_scale / softcap; folded: |softmax_scale| * log2(e);
                    else softmax_scale * log2(e) */
    bool negate; /* folded with a negative softmax_scale: scores negated first */
    float cap;   /* softcap: softcap * log2(e) */
    float slope; /* ALiBi: the (batch, head)'s slope * log2(e) */
    int alibi_row; /* ALiBi: this lane's first row + seqlen_k - seqlen_q, minus its first column offset */
};

__device__ __forceinline__ ScoreMods score_mods(const fajit_fwd_params &p, const Seq &seq, long long b,
                                                long long h, int lane_row0, int lane) {
    ScoreMods m;
    /* __fdividef: no slow-path call (the backward computes the same) */
    m.scale = FAJIT_SOFTCAP ? __fdividef(p.softmax_scale, p.softcap) : p.softmax_scale_log2;
    m.negate = kFoldScale && m.scale < 0.0f;
    if (m.negate)
        m.scale = -m.scale;
    m.cap = FAJIT_SOFTCAP ? p.softcap * 1.4426950408889634f : 0.0f;
    m.slope = 0.0f;
    m.alibi_row = 0;
    if constexpr (FAJIT_ALIBI) {
        m.slope = p.alibi_slopes[b * p.alibi_batch_stride + h] * 1.4426950408889634f;
        m.alibi_row = lane_row0 + seq_k(p, seq) - seq_q(p, seq) - (lane % 4) * 2;
    }
    return m;
}

/* x = q.k scaled (capped, biased) into the log2 domain, in place, for the key
 * tile starting at n0: softcap (2.6) caps the scaled score, ALiBi biases the
 * result by -slope * |row + sk - sq - key| (common.cuh, FlashAttention's order). */
__device__ __forceinline__ void scale_scores(float (&x)[kMTiles][kNTiles][4], const ScoreMods &m,
                                             int n0) {
    if constexpr (kFoldScale) {
        /* the softmax scales; only a negative scale's sign is applied here */
        if (m.negate) {
#pragma unroll
            for (int mt = 0; mt < kMTiles; ++mt)
#pragma unroll
                for (int j = 0; j < kNTiles; ++j)
#pragma unroll
                    for (int e = 0; e < 4; ++e)
                        x[mt][j][e] = -x[mt][j][e];
        }
    } else {
#pragma unroll
        for (int mt = 0; mt < kMTiles; ++mt)
#pragma unroll
            for (int j = 0; j < kNTiles; ++j)
#pragma unroll
                for (int e = 0; e < 4; ++e) {
                    float v = x[mt][j][e];
                    if constexpr (FAJIT_SOFTCAP)
                        v = tanh_exp2(v * m.scale) * m.cap;
                    else
                        v *= m.scale;
                    if constexpr (FAJIT_ALIBI) {
                        int d = m.alibi_row - n0 + (mt * 16 + (e / 2) * 8) - (j * 8 + e % 2);
                        d = d < 0 ? -d : d;
                        v = fmaf(-m.slope, static_cast<float>(d), v);
                    }
                    x[mt][j][e] = v;
                }
    }
}

/* Masks tile elements outside each row's visible keys (tiles straddling a bound). */
__device__ __forceinline__ void mask_tile(float (&x)[kMTiles][kNTiles][4], const RowState &st,
                                          int n0, int lane) {
#pragma unroll
    for (int mt = 0; mt < kMTiles; ++mt)
#pragma unroll
        for (int j = 0; j < kNTiles; ++j)
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                const int half = e / 2;
                const int key = n0 + j * 8 + (lane % 4) * 2 + (e % 2);
                if (key_hidden(st, mt, half, key))
                    x[mt][j][e] = fajit::neg_infinity();
            }
}

/* The running max moves only when a row's new max passes it by more than
 * this (log2 units): below that the stale max is kept, the probabilities
 * exp2(x - m) stay under 2^kRescaleSlack (exact in fp16/bf16 as relative
 * values, far from overflow in the fp32 sums), and the accumulator needs no
 * rescaling. The output O = acc / l and LSE = m + log2(l) are the same
 * whichever max was used. The decision is the warp's, so acc_o is rescaled by
 * a whole warp or not at all (a warp-uniform branch). */
constexpr float kRescaleSlack = 8.0f;

/* x (raw scores when kFoldScale, else scaled ones) -> probabilities in place;
 * moves the running max when it must and then rescales l and acc_o. scale:
 * the folded scale (1 when not folded). */
__device__ __forceinline__ void online_softmax(float (&x)[kMTiles][kNTiles][4], RowState &st,
                                               float (&acc_o)[kMTiles][kOTiles][4], float scale) {
    float mx[kMTiles][2];
    bool move = false;
#pragma unroll
    for (int mt = 0; mt < kMTiles; ++mt)
#pragma unroll
        for (int half = 0; half < 2; ++half) {
            float r = x[mt][0][2 * half];
#pragma unroll
            for (int j = 0; j < kNTiles; ++j)
                r = fmaxf(r, fmaxf(x[mt][j][2 * half], x[mt][j][2 * half + 1]));
            r = fmaxf(r, __shfl_xor_sync(fajit::kFullWarp, r, 1));
            r = fmaxf(r, __shfl_xor_sync(fajit::kFullWarp, r, 2));
            mx[mt][half] = r * scale; /* -inf stays -inf: scale > 0 */
            /* -inf + slack is -inf: the first visible key always moves it */
            move = move || mx[mt][half] > st.m[mt][half] + kRescaleSlack;
        }
    if (__any_sync(fajit::kFullWarp, move)) {
#pragma unroll
        for (int mt = 0; mt < kMTiles; ++mt)
#pragma unroll
            for (int half = 0; half < 2; ++half) {
                const float m_new = fmaxf(st.m[mt][half], mx[mt][half]);
                /* exp2(-inf - finite) = 0: nothing accumulated yet; both -inf: no key yet */
                const float corr = m_new == fajit::neg_infinity() ? 1.0f : fast_exp2(st.m[mt][half] - m_new);
                st.m[mt][half] = m_new;
                st.l[mt][half] *= corr;
#pragma unroll
                for (int j = 0; j < kOTiles; ++j) {
                    acc_o[mt][j][2 * half] *= corr;
                    acc_o[mt][j][2 * half + 1] *= corr;
                }
            }
    }
#pragma unroll
    for (int mt = 0; mt < kMTiles; ++mt)
#pragma unroll
        for (int half = 0; half < 2; ++half) {
            /* No visible key yet: subtract 0, so exp2(-inf) = 0 everywhere. */
            const float use = st.m[mt][half] == fajit::neg_infinity() ? 0.0f : st.m[mt][half];
            float sum = 0.0f;
#pragma unroll
            for (int j = 0; j < kNTiles; ++j)
#pragma unroll
                for (int e = 2 * half; e < 2 * half + 2; ++e) {
                    x[mt][j][e] = fast_exp2(fmaf(x[mt][j][e], scale, -use));
                    sum += x[mt][j][e];
                }
            st.l[mt][half] += sum;
        }
}

/* ---------------------------------------------------------------- dropout */

/* Zeroes the probabilities of dropped elements (P V then sums the kept ones;
 * write_out scales by dropout_scale). Element (b, h, row, key) uses word
 * key & 3 of the Philox call for (row, key >> 2) (common.cuh's formula). The
 * key tiles start at a multiple of 8 under dropout (see kb in the kernel), so
 * a lane's two keys of an 8-key group, 2 (lane % 4) and +1, are words
 * 2 (lane & 1) and +1 of one call. row0 is the lane's first row. */
__device__ __forceinline__ void dropout_tile(float (&x)[kMTiles][kNTiles][4], const fajit_fwd_params &p,
                                             long long b, long long h, unsigned threshold, int row0,
                                             int n0, int lane) {
#pragma unroll
    for (int mt = 0; mt < kMTiles; ++mt)
#pragma unroll
        for (int half = 0; half < 2; ++half)
#pragma unroll
            for (int j = 0; j < kNTiles; ++j) {
                const int row = row0 + mt * 16 + half * 8;
                const int key = n0 + j * 8 + (lane % 4) * 2;
                const fajit::Philox4 r = fajit::dropout_words(p.dropout_seed, p.dropout_offset, b, h,
                                                              p.nheads_q, row, key);
                const unsigned w0 = lane & 1 ? r.z : r.x, w1 = lane & 1 ? r.w : r.y;
                if (w0 < threshold)
                    x[mt][j][2 * half] = 0.0f;
                if (w1 < threshold)
                    x[mt][j][2 * half + 1] = 0.0f;
            }
}

/* ---------------------------------------------------------------- the math */

/* The lanes' fragment addresses: Q (A operand, rows of this warp), K (B
 * operand of Q K^T, two n tiles per ldmatrix.x4), V (B operand of P V,
 * transposed, two dv tiles per ldmatrix.x4.trans). Offsets within one stage. */
struct Frags {
    LaneAddr<kChunksQK> q, k;
    LaneAddr<kChunksV> v;
};

__device__ __forceinline__ void init_frags(Frags &f, unsigned sQ, unsigned sK, unsigned sV,
                                           int warp_row0, int warp_key0, int lane) {
    f.q.init(sQ, warp_row0 + (lane & 15), lane >> 4);
    f.k.init(sK, warp_key0 + (lane & 7) + ((lane >> 4) << 3), (lane >> 3) & 1);
    f.v.init(sV, warp_key0 + (lane & 7) + (((lane >> 3) & 1) << 3), lane >> 4);
}

/* acc = Q K^T for the K tile at byte offset k_off from stage 0. */
__device__ __forceinline__ void qk_tile(float (&acc)[kMTiles][kNTiles][4], const Frags &f,
                                        const unsigned (&qreg)[kQInRegs ? kMTiles : 1][kQInRegs ? kKSteps : 1][4],
                                        unsigned k_off) {
#pragma unroll
    for (int mt = 0; mt < kMTiles; ++mt)
#pragma unroll
        for (int j = 0; j < kNTiles; ++j)
            acc[mt][j][0] = acc[mt][j][1] = acc[mt][j][2] = acc[mt][j][3] = 0.0f;
    unsigned qa[2][kMTiles][4];
    if constexpr (kQPrefetch) {
#pragma unroll
        for (int mt = 0; mt < kMTiles; ++mt)
            ldmatrix_x4(f.q.at(mt * 16, 0), qa[0][mt]);
    }
#pragma unroll
    for (int kk = 0; kk < kKSteps; ++kk) {
        unsigned a[kMTiles][4];
#pragma unroll
        for (int mt = 0; mt < kMTiles; ++mt) {
            if constexpr (kQInRegs) {
#pragma unroll
                for (int i = 0; i < 4; ++i)
                    a[mt][i] = qreg[mt][kk][i];
            } else if constexpr (kQPrefetch) {
#pragma unroll
                for (int i = 0; i < 4; ++i)
                    a[mt][i] = qa[kk % 2][mt][i];
            } else {
                ldmatrix_x4(f.q.at(mt * 16, 2 * kk), a[mt]);
            }
        }
        if constexpr (kQPrefetch) {
            if (kk + 1 < kKSteps) {
#pragma unroll
                for (int mt = 0; mt < kMTiles; ++mt)
                    ldmatrix_x4(f.q.at(mt * 16, 2 * (kk + 1)), qa[(kk + 1) % 2][mt]);
            }
        }
#pragma unroll
        for (int np = 0; np < kNTiles / 2; ++np) {
            unsigned b[4];
            ldmatrix_x4(f.k.at(np * 16, 2 * kk) + k_off, b);
#pragma unroll
            for (int mt = 0; mt < kMTiles; ++mt) {
                mma(acc[mt][2 * np], a[mt], b[0], b[1]);
                mma(acc[mt][2 * np + 1], a[mt], b[2], b[3]);
            }
        }
    }
}

/* acc_o += P V for the V tile at byte offset v_off; P is the softmaxed x in
 * the accumulator layout, which is the A-operand layout once packed. */
template <typename PFrag>
__device__ __forceinline__ void pv_mma(float (&acc_o)[kMTiles][kOTiles][4], const PFrag &p_frag, const Frags &f,
                                       unsigned v_off) {
#pragma unroll
    for (int kk = 0; kk < kPSteps; ++kk) {
        unsigned a[kMTiles][4];
        p_frag(kk, a);
#pragma unroll
        for (int dp = 0; dp < kOTiles / 2; ++dp) {
            unsigned b[4];
            ldmatrix_x4_trans(f.v.at(kk * 16, 2 * dp) + v_off, b);
#pragma unroll
            for (int mt = 0; mt < kMTiles; ++mt) {
                mma(acc_o[mt][2 * dp], a[mt], b[0], b[1]);
                mma(acc_o[mt][2 * dp + 1], a[mt], b[2], b[3]);
            }
        }
        if constexpr (kOTiles % 2 == 1) {
            /* .x2: lanes 0..15 give the addresses, chunk_lane is 0 for them. */
            unsigned b0, b1;
            ldmatrix_x2_trans(f.v.at(kk * 16, kOTiles - 1) + v_off, b0, b1);
#pragma unroll
            for (int mt = 0; mt < kMTiles; ++mt)
                mma(acc_o[mt][kOTiles - 1], a[mt], b0, b1);
        }
    }
}

/* P's A fragments for k step kk of P V, packed from the softmaxed x. */
__device__ __forceinline__ void pack_p(const float (&x)[kMTiles][kNTiles][4], int kk, unsigned (&a)[kMTiles][4]) {
#pragma unroll
    for (int mt = 0; mt < kMTiles; ++mt) {
        a[mt][0] = pack2(x[mt][2 * kk][0], x[mt][2 * kk][1]);
        a[mt][1] = pack2(x[mt][2 * kk][2], x[mt][2 * kk][3]);
        a[mt][2] = pack2(x[mt][2 * kk + 1][0], x[mt][2 * kk + 1][1]);
        a[mt][3] = pack2(x[mt][2 * kk + 1][2], x[mt][2 * kk + 1][3]);
    }
}

/* acc_o += P V for the V tile at byte offset v_off, P packed step by step
 * from x (the accumulator layout is the A-operand layout once packed). */
__device__ __forceinline__ void pv_tile(float (&acc_o)[kMTiles][kOTiles][4],
                                        const float (&x)[kMTiles][kNTiles][4], const Frags &f,
                                        unsigned v_off) {
    pv_mma(acc_o, [&](int kk, unsigned (&a)[kMTiles][4]) { pack_p(x, kk, a); }, f, v_off);
}

/* The same from P packed in advance (half x's registers: the one-stage
 * pipeline packs it before issuing the next K, which keeps x from living
 * through that copy's address arithmetic). */
__device__ __forceinline__ void pv_tile_packed(float (&acc_o)[kMTiles][kOTiles][4],
                                               const unsigned (&pa)[kPSteps][kMTiles][4], const Frags &f,
                                               unsigned v_off) {
    pv_mma(acc_o, [&](int kk, unsigned (&a)[kMTiles][4]) {
#pragma unroll
        for (int mt = 0; mt < kMTiles; ++mt)
#pragma unroll
            for (int e = 0; e < 4; ++e)
                a[mt][e] = pa[kk][mt][e];
    }, f, v_off);
}

/* ---------------------------------------------------------------- epilogue */

/* Output columns col and col + 1 (col = 8 j + 2 (lane % 4), even) of one row,
 * packed in `two`: a 4-byte store, or the part of it below dv (an even dv
 * never splits the pair; an odd one stores 2-byte halves). */
__device__ __forceinline__ void store_pair(elem_t *at, unsigned two, int j, int lane) {
    if constexpr (FAJIT_DV % 8 == 0) {
        *reinterpret_cast<unsigned *>(at) = two;
    } else {
        const int col = j * 8 + (lane % 4) * 2;
        const bool full_tile = j * 8 + 8 <= FAJIT_DV;
        if constexpr (kWidthV >= 2) {
            if (full_tile || col < FAJIT_DV)
                *reinterpret_cast<unsigned *>(at) = two;
        } else {
            if (full_tile || col < FAJIT_DV)
                at[0] = static_cast<elem_t>(two & 0xffffu);
            if (full_tile || col + 1 < FAJIT_DV)
                at[1] = static_cast<elem_t>(two >> 16);
        }
    }
}

/* Zeroes `Width` output elements at `at` (aligned to them). */
template <int Width>
__device__ __forceinline__ void store_zeros(elem_t *at) {
    if constexpr (Width == 8)
        asm volatile("st.global.v4.u32 [%0], {%1, %1, %1, %1};\n" ::"l"(at), "r"(0u) : "memory");
    else if constexpr (Width == 4)
        asm volatile("st.global.v2.u32 [%0], {%1, %1};\n" ::"l"(at), "r"(0u) : "memory");
    else if constexpr (Width == 2)
        asm volatile("st.global.u32 [%0], %1;\n" ::"l"(at), "r"(0u) : "memory");
    else
        asm volatile("st.global.u16 [%0], %1;\n" ::"l"(at), "h"(static_cast<unsigned short>(0)) : "memory");
}

/* One row's partial (split >= 0): O / l in fp32 and its LSE, for the combine. */
__device__ __forceinline__ void write_partial_row(const fajit_fwd_params &p, long long at, int split,
                                                  const float (&acc_o)[kMTiles][kOTiles][4], int mt,
                                                  int half, float inv, float lse, int lane) {
    const long long slot = split * p.partial_rows + at;
    float *o = p.o_partial + slot * kDvPad + (lane % 4) * 2;
#pragma unroll
    for (int j = 0; j < kOTiles; ++j)
        *reinterpret_cast<float2 *>(o + j * 8) = float2{acc_o[mt][j][2 * half] * inv, acc_o[mt][j][2 * half + 1] * inv};
    if (lane % 4 == 0)
        p.lse_partial[slot] = lse;
}

/* With one 16-row tile a warp, O leaves through shared memory when its rows
 * are whole 16-byte chunks that fit in the warp's own rows of the Q tile (no
 * other warp reads those once its last Q K^T is done): each thread puts its
 * pairs there, then the warp stores whole rows 16 bytes a lane, a quarter of
 * the store instructions. ncu (d 256 bm 64, 4 warps, 1k) had the 4-byte
 * stores at 4% of the stall samples; the A/B above: d 256 +2-4% at 1k, +1-2%
 * at 4k, even from 16k. Two tiles a warp sit at the register file's edge,
 * where ptxas spilled in the loop for the epilogue's sake (d 128 and d 160,
 * 8-40 bytes), so they keep the pairs. */
constexpr bool kStageO = kMTiles == 1 && kWidthV == 8 && kChunksV <= row_chunks(kChunksQK);

/* 1 / l and the LSE of the thread's row (mt, half) (l summed over its quad). */
__device__ __forceinline__ void row_norm(const fajit_fwd_params &p, const RowState &st, int mt, int half, float &inv,
                                         float &lse) {
    float l = st.l[mt][half];
    l += __shfl_xor_sync(fajit::kFullWarp, l, 1);
    l += __shfl_xor_sync(fajit::kFullWarp, l, 2);
    /* l >= 1 when any key was visible (the max contributes exp2(0)). */
    const bool any = l > 0.0f;
    /* Dropout: P V summed kept probabilities only; scale them here. */
    inv = any ? fast_rcp(l) : 0.0f; /* l >= 1: no slow path (and no call) */
    if constexpr (FAJIT_DROPOUT)
        inv *= p.dropout_scale;
    lse = any ? (st.m[mt][half] + log2f(l)) * 0.6931471805599453f : fajit::neg_infinity();
}

/* O = acc_o / l and LSE for this thread's rows of the block (or a split's
 * partials of them), O by 4-byte pairs. */
__device__ __forceinline__ void write_out(const fajit_fwd_params &p, const Heads &t, const Seq &seq,
                                          long long bh, long long h,
                                          float (&acc_o)[kMTiles][kOTiles][4], const RowState &st,
                                          int row0, int lane, const Block &blk) {
#pragma unroll
    for (int mt = 0; mt < kMTiles; ++mt)
#pragma unroll
        for (int half = 0; half < 2; ++half) {
            float inv, lse;
            row_norm(p, st, mt, half, inv, lse);
            const int row = row0 + mt * 16 + half * 8 + lane / 4;
            if (row >= blk.rows)
                continue;
            if (blk.split >= 0) {
                write_partial_row(p, lse_index(p, seq, bh, h, row, blk), blk.split, acc_o, mt, half, inv, lse,
                                  lane);
                continue;
            }
            elem_t *o_row = t.o + static_cast<long long>(row) * t.o_row + (lane % 4) * 2;
#pragma unroll
            for (int j = 0; j < kOTiles; ++j)
                store_pair(o_row + j * 8, pack2(acc_o[mt][j][2 * half] * inv, acc_o[mt][j][2 * half + 1] * inv),
                           j, lane);
            if (p.lse != nullptr && lane % 4 == 0)
                p.lse[lse_index(p, seq, bh, h, row, blk)] = lse;
        }
}

/* A block none of whose rows sees a key: O = 0, LSE = -inf (split: its
 * partial LSE -inf, which the combine skips). */
__device__ void write_masked_block(const fajit_fwd_params &p, const Heads &t, const Seq &seq, long long bh,
                                   long long h, int m0, int tid, const Block &blk) {
    const int n = imin(FAJIT_BM, blk.rows - m0);
    if (blk.split >= 0) {
        /* The partial output too (zeros): the combine reads every split's
         * rows unconditionally, weighting this one by 0. */
        for (int i = tid; i < n * kDvPad; i += kThreads) {
            const long long slot = blk.split * p.partial_rows + lse_index(p, seq, bh, h, m0 + i / kDvPad, blk);
            p.o_partial[slot * kDvPad + i % kDvPad] = 0.0f;
        }
        for (int r = tid; r < n; r += kThreads)
            p.lse_partial[blk.split * p.partial_rows + lse_index(p, seq, bh, h, m0 + r, blk)] =
                fajit::neg_infinity();
        return;
    }
    constexpr int kVecs = FAJIT_DV / kWidthV;
    for (int i = tid; i < FAJIT_BM * kVecs; i += kThreads) {
        const int r = i / kVecs, c = i % kVecs;
        if (m0 + r < blk.rows)
            store_zeros<kWidthV>(t.o + static_cast<long long>(m0 + r) * t.o_row + c * kWidthV);
    }
    if (p.lse != nullptr)
        for (int r = tid; r < n; r += kThreads)
            p.lse[lse_index(p, seq, bh, h, m0 + r, blk)] = fajit::neg_infinity();
}

/* ---------------------------------------------------------------- combine */

/* Programmatic dependent launch (sm_90; runtime/attn.c launch_combine): a
 * block of the partials' grid lets the combine's grid start early, and the
 * combine waits for that grid to finish, its writes visible. Both are no-ops
 * for a grid launched without the attribute. */
__device__ __forceinline__ void allow_dependents() {
    if constexpr (FAJIT_ARCH >= 90)
        asm volatile("griddepcontrol.launch_dependents;\n" ::: "memory");
}

__device__ __forceinline__ void wait_prerequisites() {
    if constexpr (FAJIT_ARCH >= 90)
        asm volatile("griddepcontrol.wait;\n" ::: "memory");
}

/* Where output row `idx` (the LSE's index: (b, h, i) dense, (h, packed row)
 * under varlen) lives in o. */
__device__ __forceinline__ elem_t *out_row(const fajit_fwd_params &p, long long idx, long long total_q) {
    elem_t *o = static_cast<elem_t *>(p.o);
    if constexpr (FAJIT_VARLEN)
        return o + (idx % total_q) * p.o_stride[1] + (idx / total_q) * p.o_stride[2];
    const long long sq = p.seqlen_q, i = idx % sq, bh = idx / sq;
    return o + (bh / p.nheads_q) * p.o_stride[0] + i * p.o_stride[1] + (bh % p.nheads_q) * p.o_stride[2];
}

/* The split launch's second pass: a warp per output row merges the splits'
 * partial outputs, each weighted by exp(lse_s - lse), lse = log sum exp lse_s;
 * a row no split saw a key of gets 0 and -inf. Lane s holds split s's weight
 * (32 splits at a time), broadcast to the warp, so every lane's loads of
 * several splits are in flight at once instead of one L2 round trip each. */
__device__ void combine_partials(const fajit_fwd_params &p, int tid) {
    constexpr int kCols = (kDvPad + 31) / 32; /* columns a lane merges */
    constexpr float kLog2e = 1.4426950408889634f;
    const int warp = tid / 32, lane = tid % 32, splits = p.num_splits;
    wait_prerequisites(); /* the partials (and nothing of them is read before) */
    const long long total_q = FAJIT_VARLEN ? p.cu_seqlens_q[p.batch] : 0;
    const long long rows = FAJIT_VARLEN ? total_q * p.nheads_q : p.partial_rows;
    const long long idx = static_cast<long long>(blockIdx.x) * FAJIT_WARPS + warp;
    if (idx >= rows)
        return;
    const float *lse_s = p.lse_partial + idx;
    const long long step = p.partial_rows;
    const float *o_row = p.o_partial + idx * kDvPad + lane; /* split s's at + s * step * kDvPad */
    /* The first kAhead splits' partial rows are loaded with the LSEs, before
     * their weights are known: up to kAhead splits cost one L2 round trip,
     * not one for the LSEs and more for the rows (those past splits read as
     * 0; a split without keys wrote zeros, and both weigh 0). */
    constexpr int kAhead = 16;
    float ahead[kAhead][kCols];
#pragma unroll
    for (int k = 0; k < kAhead; ++k)
#pragma unroll
        for (int c = 0; c < kCols; ++c)
            ahead[k][c] = k < splits && c * 32 + lane < kDvPad ? o_row[k * step * kDvPad + c * 32] : 0.0f;
    /* Lane s holds split s's LSE (of the first 32; more are folded in). */
    const float ls0 = lane < splits ? lse_s[lane * step] : fajit::neg_infinity();
    float mx = ls0;
    for (int s = lane + 32; s < splits; s += 32)
        mx = fmaxf(mx, lse_s[s * step]);
    mx = fajit::warp_max(mx);
    const bool any = mx != fajit::neg_infinity();
    float sum = any ? fast_exp2((ls0 - mx) * kLog2e) : 0.0f; /* exp2(-inf) = 0 */
    for (int s = lane + 32; any && s < splits; s += 32)
        sum += fast_exp2((lse_s[s * step] - mx) * kLog2e);
    sum = fajit::warp_sum(sum);
    const float lse = any ? mx + log2f(sum) * 0.6931471805599453f : fajit::neg_infinity();
    float acc[kCols];
#pragma unroll
    for (int c = 0; c < kCols; ++c)
        acc[c] = 0.0f;
    if (any) {
        const float w0 = ls0 == fajit::neg_infinity() ? 0.0f : fast_exp2((ls0 - lse) * kLog2e);
#pragma unroll
        for (int k = 0; k < kAhead; ++k) {
            const float w = __shfl_sync(fajit::kFullWarp, w0, k);
#pragma unroll
            for (int c = 0; c < kCols; ++c)
                acc[c] = fmaf(w, ahead[k][c], acc[c]);
        }
        for (int s0 = 0; s0 < splits; s0 += 32) {
            const float ls = s0 == 0 ? ls0 : s0 + lane < splits ? lse_s[(s0 + lane) * step] : fajit::neg_infinity();
            const float w_lane = ls == fajit::neg_infinity() ? 0.0f : fast_exp2((ls - lse) * kLog2e);
            const int n = imin(32, splits - s0);
            /* No branch on w: 8 splits' loads go out together. (Branching
             * on it serialised one round trip a split: 11 us for 16 splits
             * of d 128, ncu.) */
#pragma unroll 8
            for (int k = s0 == 0 ? kAhead : 0; k < n; ++k) {
                const float w = __shfl_sync(fajit::kFullWarp, w_lane, k);
                const float *o = o_row + (s0 + k) * step * kDvPad;
#pragma unroll
                for (int c = 0; c < kCols; ++c)
                    if (c * 32 + lane < kDvPad)
                        acc[c] = fmaf(w, o[c * 32], acc[c]);
            }
        }
    }
    elem_t *o = out_row(p, idx, total_q);
#pragma unroll
    for (int c = 0; c < kCols; ++c)
        if (c * 32 + lane < FAJIT_DV)
            fajit::store_from_float<FAJIT_DTYPE>(o + c * 32 + lane, acc[c]);
    if (p.lse != nullptr && lane == 0)
        p.lse[idx] = lse;
}

/* ---------------------------------------------------------------- key-split warps */

/* The kKeyWarps warps of row tile `rtile` saw disjoint keys of every tile,
 * each with its own running max m and sums l (in the same lane layout): the
 * first (key_split 0) takes the others' over shared memory `buf` (the K/V
 * buffers, free once every warp is past the loop) as
 *   m = max m_k,  l = sum l_k 2^(m_k - m),  acc = sum acc_k 2^(m_k - m),
 * a key split that saw no key (m_k = -inf) weighing 0. Returns whether this
 * warp holds the merged state (and writes the output). Every thread of the
 * block calls it: two barriers. */
__device__ __forceinline__ bool merge_key_warps(float (&acc_o)[kMTiles][kOTiles][4], RowState &st, elem_t *buf,
                                                int rtile, int key_split, int lane) {
    static_assert(kKeyWarps == 1 || kMTiles == 1, "key-split warps own one 16-row tile");
    float *const slots = reinterpret_cast<float *>(buf);
    __syncthreads(); /* every warp is done reading K and V */
    if (key_split > 0) {
        /* float i of a lane at slot[i * 32 + lane]: conflict-free */
        float *slot = slots + ((key_split - 1) * kRowWarps + rtile) * 32 * kMergeFloats + lane;
#pragma unroll
        for (int j = 0; j < kOTiles; ++j)
#pragma unroll
            for (int e = 0; e < 4; ++e)
                slot[(j * 4 + e) * 32] = acc_o[0][j][e];
#pragma unroll
        for (int half = 0; half < 2; ++half) {
            slot[(kOTiles * 4 + half) * 32] = st.m[0][half];
            slot[(kOTiles * 4 + 2 + half) * 32] = st.l[0][half];
        }
    }
    __syncthreads();
    if (key_split > 0)
        return false;
#pragma unroll 1
    for (int k = 1; k < kKeyWarps; ++k) {
        const float *slot = slots + ((k - 1) * kRowWarps + rtile) * 32 * kMergeFloats + lane;
        float mine[2], theirs[2];
#pragma unroll
        for (int half = 0; half < 2; ++half) {
            const float mk = slot[(kOTiles * 4 + half) * 32], m = fmaxf(st.m[0][half], mk);
            /* -inf - -inf is NaN: a side without keys weighs 0 */
            mine[half] = st.m[0][half] == fajit::neg_infinity() ? 0.0f : fast_exp2(st.m[0][half] - m);
            theirs[half] = mk == fajit::neg_infinity() ? 0.0f : fast_exp2(mk - m);
            st.m[0][half] = m;
            st.l[0][half] = st.l[0][half] * mine[half] + slot[(kOTiles * 4 + 2 + half) * 32] * theirs[half];
        }
#pragma unroll
        for (int j = 0; j < kOTiles; ++j)
#pragma unroll
            for (int e = 0; e < 4; ++e)
                acc_o[0][j][e] = acc_o[0][j][e] * mine[e / 2] + slot[(j * 4 + e) * 32] * theirs[e / 2];
    }
    return true;
}

/* ---------------------------------------------------------------- the kernel */

/*
 * Where a block sits in the launch, from its block index. Computed before the
 * main loop and again after it from fresh reads of the index (place_fresh),
 * so none of it takes a register through the loop.
 */
struct Place {
    long long b, h, bh; /* batch, (first) query head, b * nheads_q + h */
    int m0;             /* first row of the block in its row space */
    Seq seq;
    Block blk;
};

__device__ __forceinline__ Place place_of(const fajit_fwd_params &p, unsigned bx, unsigned by, unsigned bz) {
    Place w;
    /* Split-KV: grid x is (query block, split), the split fastest. */
    const int splits = p.num_splits > 1 ? p.num_splits : 1;
    if (kHeavyFirst && splits == 1) {
        /* The heavier half of every head's blocks first (common.cuh); x is
         * then the rank, 0 the heaviest (the last query block, below). */
        const fajit::BlockSlot s = fajit::heavy_halves_first(bx, by, bz);
        bx = s.rank;
        by = s.y;
        bz = s.z;
    }
    const int x = static_cast<int>(bx) / splits, x_blocks = static_cast<int>(gridDim.x) / splits;
    w.blk.split = splits == 1 ? -1 : static_cast<int>(bx) % splits;
    w.blk.pack = kCanPack && p.pack_gqa > 1 ? p.pack_gqa : 1;
    w.b = bz;
    w.h = by * static_cast<long long>(w.blk.pack);
    w.bh = w.b * p.nheads_q + w.h;
    /* Causal blocks further down see more keys: start those first (blocks
     * are scheduled roughly in linear order), so the short ones fill the
     * tail of the grid instead of the long ones. */
    w.m0 = (FAJIT_MASK != fajit::kMaskNone ? x_blocks - 1 - x : x) * FAJIT_BM;
    w.seq = seq_of(p, w.b);
    w.blk.rows = w.blk.pack == 1 ? seq_q(p, w.seq) : seq_q(p, w.seq) * w.blk.pack;
    w.blk.lse_step = w.blk.pack == 1 || !FAJIT_VARLEN ? 1 : p.cu_seqlens_q[p.batch];
    return w;
}

/* The block index, read anew: the compiler cannot reuse an earlier read. */
__device__ __forceinline__ Place place_fresh(const fajit_fwd_params &p) {
    unsigned x, y, z;
    asm volatile("mov.u32 %0, %%ctaid.x;\n" : "=r"(x));
    asm volatile("mov.u32 %0, %%ctaid.y;\n" : "=r"(y));
    asm volatile("mov.u32 %0, %%ctaid.z;\n" : "=r"(z));
    return place_of(p, x, y, z);
}

/* The block's tensors; packed rows are heads, so Q's and O's row strides are
 * their head strides. */
__device__ __forceinline__ Heads heads_at(const fajit_fwd_params &p, const Place &w) {
    Heads t = heads_of(p, w.seq, w.b, w.h);
    if (w.blk.pack > 1) {
        t.q_row = p.q_stride[2];
        t.o_row = p.o_stride[2];
    }
    return t;
}

/* The same through shared memory (kStageO, not a split launch), in two
 * halves: stage_pairs puts the thread's normalised pairs into rows r0.. of
 * the smem tile at `tile` (rows of kChunksQK chunks: the Q tile, or a
 * persistent block's K and V buffers) and keeps their LSEs; store_staged
 * then has the warp store those rows, 16 bytes a lane, as output rows
 * w.m0 + warp_row0.. of place w. */
__device__ __forceinline__ void stage_pairs(const fajit_fwd_params &p, float (&acc_o)[kMTiles][kOTiles][4],
                                            const RowState &st, unsigned tile, int r0, float (&lse)[kMTiles][2],
                                            int lane) {
    /* Every lane's last read of these rows (ldmatrix) is done before any
     * lane overwrites them (racecheck: the lanes of a warp are not in
     * lockstep). */
    __syncwarp();
#pragma unroll
    for (int mt = 0; mt < kMTiles; ++mt)
#pragma unroll
        for (int half = 0; half < 2; ++half) {
            float inv;
            row_norm(p, st, mt, half, inv, lse[mt][half]);
            const int r = r0 + mt * 16 + half * 8 + lane / 4;
#pragma unroll
            for (int j = 0; j < kOTiles; ++j)
                st_shared_u32(tile + static_cast<unsigned>(smem_at<kChunksQK>(r, j) + (lane % 4) * 2) * 2,
                              pack2(acc_o[mt][j][2 * half] * inv, acc_o[mt][j][2 * half + 1] * inv));
        }
    __syncwarp();
}

__device__ __forceinline__ void store_staged(const fajit_fwd_params &p, const Place &w, unsigned tile, int r0,
                                             int warp_row0, const float (&lse)[kMTiles][2], int lane) {
    const Heads t = heads_at(p, w);
    const int row0 = w.m0 + warp_row0;
    constexpr int kPieces = kWarpRows * kChunksV;
#pragma unroll
    for (int i = lane; i < kPieces; i += 32) {
        const int r = i / kChunksV, c = i % kChunksV;
        if (row0 + r < w.blk.rows) {
            const uint4 v = ld_shared_v4(tile + static_cast<unsigned>(smem_at<kChunksQK>(r0 + r, c)) * 2);
            *reinterpret_cast<uint4 *>(t.o + static_cast<long long>(row0 + r) * t.o_row + c * 8) = v;
        }
    }
    if (p.lse != nullptr && lane % 4 == 0) {
#pragma unroll
        for (int mt = 0; mt < kMTiles; ++mt)
#pragma unroll
            for (int half = 0; half < 2; ++half) {
                const int row = row0 + mt * 16 + half * 8 + lane / 4;
                if (row < w.blk.rows)
                    p.lse[lse_index(p, w.seq, w.bh, w.h, row, w.blk)] = lse[mt][half];
            }
    }
}

/* The pairs go to the warp's rows of sQ first, before anything of the
 * block's place is computed again; then the warp stores whole rows. */
__device__ __forceinline__ void write_out_staged(const fajit_fwd_params &p, float (&acc_o)[kMTiles][kOTiles][4],
                                                 const RowState &st, unsigned aQ, int warp_row0, int lane) {
    float lse[kMTiles][2];
    stage_pairs(p, acc_o, st, aQ, warp_row0, lse, lane);
    store_staged(p, place_fresh(p), aQ, warp_row0, warp_row0, lse, lane);
}

/* One block's attention: FAJIT_BM rows of one (batch, head), or of one kv
 * head's packed query heads, over all its keys or one split of them. */
__device__ __forceinline__ void attend(const fajit_fwd_params &p) {
    extern __shared__ __attribute__((aligned(128))) elem_t smem[];
    elem_t *const sQ = smem;
    elem_t *const sK = smem + kQElems;
    elem_t *const sV = sK + FAJIT_STAGES * kKElems;

    const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
    const Place w = place_of(p, blockIdx.x, blockIdx.y, blockIdx.z);
    const long long b = w.b, h = w.h, bh = w.bh;
    const int m0 = w.m0;
    const Seq &seq = w.seq;
    const Block &blk = w.blk;
    if constexpr (FAJIT_VARLEN) {
        /* The grid covers the longest sequence; shorter ones leave blocks idle. */
        if (m0 >= blk.rows)
            return;
    }
    const Heads t = heads_at(p, w);
    const int splits = p.num_splits > 1 ? p.num_splits : 1;
    if (splits > 1)
        allow_dependents(); /* the combine may launch; it waits for this grid's end */

    /* Keys any row of the block may see: visible ranges only move right. */
    const int last_row = imin(m0 + FAJIT_BM, blk.rows) - 1;
    const fajit::KeyRange first = fajit::visible_keys<FAJIT_MASK, FAJIT_WINDOW_LEFT, FAJIT_WINDOW_RIGHT>(
        pos_of(m0, blk), seq_q(p, seq), seq_k(p, seq));
    const fajit::KeyRange last = fajit::visible_keys<FAJIT_MASK, FAJIT_WINDOW_LEFT, FAJIT_WINDOW_RIGHT>(
        pos_of(last_row, blk), seq_q(p, seq), seq_k(p, seq));
    int kb = static_cast<int>(first.begin > 0 ? first.begin : 0);
    if constexpr (FAJIT_DROPOUT)
        kb &= ~7; /* dropout_tile's word choice; the keys before begin are masked */
    const int ke = static_cast<int>(last.end < seq_k(p, seq) ? last.end : seq_k(p, seq));
    int n_tiles = (ke - kb + FAJIT_BN - 1) / FAJIT_BN;
    int tile_step = FAJIT_BN; /* keys from one of this block's tiles to its next */
    if (kKeyWarps > 1 && splits > 1) {
        /* The few-rows (decode) tile's share of the key tiles: every
         * splits-th from its own index on (the last splits may get none), not
         * a run of them: the splits of all heads then sweep K and V front to
         * back together, which H100 serves faster (decode 64k 105.4 -> 104.8
         * us). (Others keep a run: a stride held in a register made ptxas
         * spill d 128's usual tile.) */
        n_tiles = blk.split < n_tiles ? (n_tiles - blk.split + splits - 1) / splits : 0;
        kb += blk.split * FAJIT_BN;
        tile_step = splits * FAJIT_BN;
    } else if (splits > 1) {
        /* This split's share of the key tiles (the last ones may get none). */
        const int per = (n_tiles + splits - 1) / splits, first_tile = blk.split * per;
        n_tiles = imin(per, n_tiles - first_tile);
        kb += first_tile * FAJIT_BN;
    }
    if (ke <= kb || n_tiles <= 0) {
        write_masked_block(p, t, seq, bh, h, m0, tid, blk);
        return;
    }
    /* Tiles inside [all_begin, all_end) need no per-element mask. */
    const int all_begin = static_cast<int>(last.begin);
    const int all_end = static_cast<int>(first.end < seq_k(p, seq) ? first.end : seq_k(p, seq));

    const unsigned aQ = smem_addr(sQ), aK = smem_addr(sK), aV = smem_addr(sV);
    zero_pad<FAJIT_BM, FAJIT_DQK, kChunksQK>(sQ, tid);
#pragma unroll
    for (int s = 0; s < FAJIT_STAGES; ++s) {
        zero_pad<FAJIT_BN, FAJIT_DQK, kChunksQK>(sK + s * kKElems, tid);
        zero_pad<FAJIT_BN, FAJIT_DV, kChunksV>(sV + s * kVElems, tid);
    }

    /* Q and the first STAGES-1 K/V tiles in flight; one commit group per tile.
     * (Giving tile 0's V a group of its own, so the first Q K^T waits only
     * for Q and K, measured 4% faster at d 128 but 5% slower at d 64 and 256
     * on H100: not done.) */
    load_tile<FAJIT_BM, FAJIT_DQK, kChunksQK>(aQ, t.q, t.q_row, m0, blk.rows, tid);
    auto load_k = [&](int i) {
        const int s = i % FAJIT_STAGES, n0 = kb + i * tile_step;
        load_tile<FAJIT_BN, FAJIT_DQK, kChunksQK>(aK + s * kKElems * 2, t.k, t.k_row, n0, seq_k(p, seq), tid);
    };
    auto load_v = [&](int i) {
        const int s = i % FAJIT_STAGES, n0 = kb + i * tile_step;
        load_tile<FAJIT_BN, FAJIT_DV, kChunksV>(aV + s * kVElems * 2, t.v, t.v_row, n0, seq_k(p, seq), tid);
    };
    auto load_kv = [&](int i) {
        load_k(i);
        load_v(i);
    };
    if constexpr (FAJIT_STAGES == 1) {
        load_k(0); /* with Q; V 0 goes out once the first barrier is passed */
        cp_async_commit();
    }
#pragma unroll
    for (int i = 0; i < FAJIT_STAGES - 1; ++i) {
        if (i < n_tiles)
            load_kv(i);
        cp_async_commit();
    }
    /* Tile i is in shared memory for every thread when this returns (one
     * stage: its K; V follows, see after_scores), and tile i + STAGES - 1 is
     * on its way. One stage pipelines K against V, as FlashAttention-2 does
     * with its single K and V buffers: past this barrier every warp is done
     * with P V of tile i - 1, so V i goes out (and lands under Q K^T); past
     * after_scores' every warp is done with Q K^T, so K i + 1 goes out (and
     * lands under the softmax and P V). Two barriers a tile, as before, when
     * the load of K and V together was waited for in full. */
    auto next_tile = [&](int i) {
        if constexpr (FAJIT_STAGES == 1) {
            cp_async_wait<0>(); /* K i (and Q) landed, for this thread */
            __syncthreads();    /* ... for every thread; the V buffer is free */
            load_v(i);
            cp_async_commit();
        } else {
            cp_async_wait<FAJIT_STAGES - 2>(); /* tile i (and Q) landed, for this thread */
            __syncthreads(); /* ... for every thread; and buffer (i-1) % STAGES is free */
            if (i + FAJIT_STAGES - 1 < n_tiles)
                load_kv(i + FAJIT_STAGES - 1);
            cp_async_commit();
        }
    };
    /* One stage, before P V: V i landed for every thread, the K buffer is
     * free (K i + 1 out). */
    auto after_scores = [&](int i) {
        if constexpr (FAJIT_STAGES == 1) {
            cp_async_wait<0>();
            __syncthreads();
            if (i + 1 < n_tiles)
                load_k(i + 1);
            cp_async_commit();
        }
    };

    /* (constants 0 and warp without key splits: a known 0 costs no register) */
    const int warp_row0 = (kKeyWarps == 1 ? warp : warp % kRowWarps) * kWarpRows;
    const int key_split = kKeyWarps == 1 ? 0 : warp / kRowWarps;
    const int warp_key0 = key_split * kWarpBN; /* the warp's first key in each tile */
    if (FAJIT_STAGES > 1 && kKeyWarps == 1 && m0 + warp_row0 >= blk.rows) {
        /* No row of this warp's (few query rows: decode, a last block): it
         * only helps copy, at the same barriers. (Single-stage variants,
         * the small-smem archs', keep the math: a second copy of their
         * in-loop loads spilled.) */
        for (int i = 0; i < n_tiles; ++i)
            next_tile(i);
        cp_async_wait<0>();
        return;
    }
    RowState st;
    {
        /* visible_keys' diagonal of the lane's first row (causal-tl: the row) */
        const int pos0 = pos_of(m0 + warp_row0 + lane / 4, blk);
        st.diag0 = FAJIT_MASK == fajit::kMaskCausalTL ? pos0 : pos0 + seq_k(p, seq) - seq_q(p, seq);
        st.row_step = blk.pack == 1 ? 1 : 0;
        st.seqlen_k = seq_k(p, seq);
    }
#pragma unroll
    for (int mt = 0; mt < kMTiles; ++mt)
#pragma unroll
        for (int half = 0; half < 2; ++half) {
            st.m[mt][half] = fajit::neg_infinity();
            st.l[mt][half] = 0.0f;
        }
    Frags f;
    init_frags(f, aQ, aK, aV, warp_row0, warp_key0, lane);

    float acc_o[kMTiles][kOTiles][4];
#pragma unroll
    for (int mt = 0; mt < kMTiles; ++mt)
#pragma unroll
        for (int j = 0; j < kOTiles; ++j)
            acc_o[mt][j][0] = acc_o[mt][j][1] = acc_o[mt][j][2] = acc_o[mt][j][3] = 0.0f;
    unsigned qreg[kQInRegs ? kMTiles : 1][kQInRegs ? kKSteps : 1][4];
    const ScoreMods mods = score_mods(p, seq, b, h, m0 + warp_row0 + lane / 4, lane);
    const unsigned threshold = FAJIT_DROPOUT ? fajit::dropout_threshold(p.dropout_p) : 0u;

    for (int i = 0; i < n_tiles; ++i) {
        next_tile(i);
        if constexpr (kQInRegs) {
            if (i == 0) {
#pragma unroll
                for (int mt = 0; mt < kMTiles; ++mt)
#pragma unroll
                    for (int kk = 0; kk < kKSteps; ++kk)
                        ldmatrix_x4(f.q.at(mt * 16, 2 * kk), qreg[mt][kk]);
            }
        }
        const int s = i % FAJIT_STAGES, n0 = kb + i * tile_step + warp_key0; /* the warp's keys */
        float x[kMTiles][kNTiles][4];
        qk_tile(x, f, qreg, s * kKElems * 2);
        scale_scores(x, mods, n0);
        if (n0 < all_begin || n0 + kWarpBN > all_end)
            mask_tile(x, st, n0, lane);
        online_softmax(x, st, acc_o, kFoldScale ? mods.scale : 1.0f);
        if constexpr (FAJIT_DROPOUT)
            dropout_tile(x, p, b, h, threshold, m0 + warp_row0 + lane / 4, n0, lane);
        if constexpr (FAJIT_STAGES == 1) {
            unsigned pa[kPSteps][kMTiles][4];
#pragma unroll
            for (int kk = 0; kk < kPSteps; ++kk)
                pack_p(x, kk, pa[kk]);
            after_scores(i);
            pv_tile_packed(acc_o, pa, f, s * kVElems * 2);
        } else {
            pv_tile(acc_o, x, f, s * kVElems * 2);
        }
    }
    cp_async_wait<0>(); /* no copy may outlive the block (empty groups only, by now) */
    if constexpr (kKeyWarps > 1) {
        if (!merge_key_warps(acc_o, st, smem + kQElems, warp_row0 / kWarpRows, key_split, lane))
            return; /* its share went to the row tile's first warp */
    }
    if constexpr (kStageO) {
        if (p.num_splits <= 1) {
            write_out_staged(p, acc_o, st, aQ, warp_row0, lane);
            return;
        }
    }
    const Place fin = place_fresh(p);
    write_out(p, heads_at(p, fin), fin.seq, fin.bh, fin.h, acc_o, st, fin.m0 + warp_row0, lane, fin.blk);
}

/* ---------------------------------------------------------------- persistent blocks */

/*
 * FAJIT_PERSIST (codegen's fajit__fwd_persistent decides, the runtime
 * launches accordingly): one 16-row tile a warp, two stages, the same dims
 * for Q K^T and P V, no mask, window, dropout, ALiBi or varlen. Such a block
 * holds one SM alone (d 256: 192 KB, every register), and each block used to
 * pay its start (Q and the first K and V copied before any math) and its end
 * unhidden: at 16 key tiles a block (d 256, 1k) about two tiles' time, so
 * FlashAttention-2's two 4-warp blocks an SM led there while we led from 4k
 * (the fit over 1k/4k/16k in benchmarks/RESULTS.md, ninth session).
 *
 * So (p.persist: the runtime's choice when the launch neither splits the
 * keys nor packs heads) the grid is 1-D, at most the blocks the SMs hold at
 * once, and block
 * b takes items b, b + gridDim.x, ... (an item: what a block of the 3-D grid
 * did, numbered as that grid's blocks are, x fastest). The copies run on
 * across items: the last tile of an item sends the next item's K and V
 * tile 0 into the free stage (as any tile sends its successor), and each warp,
 * once past that tile's Q K^T, copies its own rows of the next item's Q (no
 * other warp reads them). O then leaves through the last tile's K and V
 * buffers (a barrier first: every warp is done with them) instead of the Q
 * rows, which already hold the next item's. The next item's first barrier
 * finds its Q and tile 0 landed.
 */
constexpr bool kPersist = FAJIT_PERSIST != 0;
static_assert(!kPersist || (kMTiles == 1 && kKeyWarps == 1 && FAJIT_STAGES == 2 && FAJIT_DQK == FAJIT_DV &&
                            FAJIT_DQK % 16 == 0 && FAJIT_MASK == fajit::kMaskNone && FAJIT_WINDOW_LEFT < 0 &&
                            FAJIT_WINDOW_RIGHT < 0 && !FAJIT_VARLEN && !FAJIT_DROPOUT && !FAJIT_ALIBI &&
                            FAJIT_WARPS * 8 <= FAJIT_BN),
              "flash_fwd: FAJIT_PERSIST for a variant the persistent loop does not cover (codegen disagrees)");

/* Item `item`'s place: (query block, head, batch) as the 3-D grid numbers it. */
__device__ __forceinline__ Place place_item(const fajit_fwd_params &p, int item) {
    const int x_blocks = (p.seqlen_q + FAJIT_BM - 1) / FAJIT_BM, per_batch = x_blocks * p.nheads_q;
    const int b = item / per_batch, r = item - b * per_batch;
    return place_of(p, static_cast<unsigned>(r % x_blocks), static_cast<unsigned>(r / x_blocks),
                    static_cast<unsigned>(b));
}

/* The byte address of staged output row r (a multiple of 16) of stage s:
 * rows 0..bn-1 in the K buffer, the rest in the V buffer (same row length). */
__device__ __forceinline__ unsigned staged_row_tile(unsigned aK, unsigned aV, int s, int r, int &tile_row) {
    const bool in_k = r < FAJIT_BN;
    tile_row = in_k ? r : r - FAJIT_BN;
    return in_k ? aK + s * kKElems * 2 : aV + s * kVElems * 2;
}

/* (a template, so that the variants without the loop never instantiate it) */
template <bool On>
__device__ void attend_items(const fajit_fwd_params &p) {
    if constexpr (On) {
        extern __shared__ __attribute__((aligned(128))) elem_t smem[];
        const unsigned aQ = smem_addr(smem), aK = aQ + kQElems * 2, aV = aK + FAJIT_STAGES * kKElems * 2;
        const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32, warp_row0 = warp * 16;
        /* (read from the parameters where needed: registers are short) */
        auto items = [&]() { return (p.seqlen_q + FAJIT_BM - 1) / FAJIT_BM * p.nheads_q * p.batch; };
        auto next_of = [&](int it) { return it + static_cast<int>(gridDim.x); };
        const int n_tiles = (p.seqlen_k + FAJIT_BN - 1) / FAJIT_BN;
        int item = static_cast<int>(blockIdx.x);
        if (n_tiles == 0) {
            for (; item < items(); item = next_of(item)) {
                const Place w = place_item(p, item);
                write_masked_block(p, heads_at(p, w), w.seq, w.bh, w.h, w.m0, tid, w.blk);
            }
            return;
        }
        if (item >= items())
            return;
        /* (K and V rows have the same strides in every item) */
        auto load_kv = [&](const elem_t *k, const elem_t *v, int s, int n0) {
            load_tile<FAJIT_BN, FAJIT_DQK, kChunksQK>(aK + s * kKElems * 2, k, p.k_stride[1], n0, p.seqlen_k, tid);
            load_tile<FAJIT_BN, FAJIT_DV, kChunksV>(aV + s * kVElems * 2, v, p.v_stride[1], n0, p.seqlen_k, tid);
        };
        {
            const Place w = place_item(p, item);
            const Heads t = heads_at(p, w);
            load_tile<FAJIT_BM, FAJIT_DQK, kChunksQK>(aQ, t.q, t.q_row, w.m0, w.blk.rows, tid);
            load_kv(t.k, t.v, 0, 0);
            cp_async_commit();
        }
        Frags f;
        init_frags(f, aQ, aK, aV, warp_row0, 0, lane);
        const ScoreMods mods = score_mods(p, fajit::Seq{}, 0, 0, 0, lane); /* no ALiBi: the same for every item */
        unsigned qreg[kQInRegs ? kMTiles : 1][kQInRegs ? kKSteps : 1][4];
        int s = 0; /* the stage of the tile at hand (two stages: it alternates) */
#pragma unroll 1
        for (;;) {
            RowState st;
            st.diag0 = 0; /* no mask: only keys past seqlen_k are hidden */
            st.row_step = 1;
            st.seqlen_k = p.seqlen_k;
#pragma unroll
            for (int half = 0; half < 2; ++half) {
                st.m[0][half] = fajit::neg_infinity();
                st.l[0][half] = 0.0f;
            }
            float acc_o[kMTiles][kOTiles][4];
#pragma unroll
            for (int j = 0; j < kOTiles; ++j)
                acc_o[0][j][0] = acc_o[0][j][1] = acc_o[0][j][2] = acc_o[0][j][3] = 0.0f;
            const Heads t = heads_at(p, place_item(p, item)); /* its K and V, through the loop */
            for (int i = 0; i < n_tiles; ++i) {
                cp_async_wait<0>(); /* tile i (and the item's Q) landed, for this thread */
                __syncthreads();    /* ... for every thread; the other stage is free */
                /* tile i + 1 of this item, or tile 0 of the next (and, below,
                 * the next's Q rows: its place is worked out once) */
                const elem_t *k = t.k, *v = t.v, *next_q = nullptr;
                int n1 = (i + 1) * FAJIT_BN, next_m0 = 0;
                if (i + 1 == n_tiles) {
                    k = nullptr;
                    if (next_of(item) < items()) {
                        const Place nw = place_item(p, next_of(item));
                        const Heads nt = heads_at(p, nw);
                        k = nt.k;
                        v = nt.v;
                        n1 = 0;
                        next_q = nt.q;
                        next_m0 = nw.m0;
                    }
                }
                if (k != nullptr)
                    load_kv(k, v, s ^ 1, n1);
                cp_async_commit();
                if constexpr (kQInRegs) {
                    if (i == 0) {
#pragma unroll
                        for (int kk = 0; kk < kKSteps; ++kk)
                            ldmatrix_x4(f.q.at(0, 2 * kk), qreg[0][kk]);
                    }
                }
                float x[kMTiles][kNTiles][4];
                qk_tile(x, f, qreg, s * kKElems * 2);
                if (next_q != nullptr) {
                    /* The warp's Q rows are read for the last time: the next
                     * item's go out (Q from registers: they were free since
                     * tile 0, the same place is simplest). */
                    __syncwarp();
                    load_rows<32, 16, FAJIT_DQK / kWidthQK, kWidthQK>(
                        next_q, p.q_stride[1], next_m0 + warp_row0, p.seqlen_q, lane, [&](int r, int c) {
                            return aQ + static_cast<unsigned>(smem_at<kChunksQK>(warp_row0 + r, c)) * 2;
                        });
                    cp_async_commit();
                }
                const int n0 = i * FAJIT_BN;
                scale_scores(x, mods, n0);
                if (n0 + FAJIT_BN > p.seqlen_k)
                    mask_tile(x, st, n0, lane);
                online_softmax(x, st, acc_o, kFoldScale ? mods.scale : 1.0f);
                pv_tile(acc_o, x, f, s * kVElems * 2);
                s ^= 1;
            }
            const int s_last = s ^ 1; /* (s: the next item's tile 0's) */
            __syncthreads(); /* every warp is done with the last tile's K and V */
            {
                /* The thread index read anew: the epilogue's addresses then
                 * cannot be worked out once before the item loop, where
                 * ptxas kept them in spilled registers (d 224, 240). */
                unsigned tx;
                asm volatile("mov.u32 %0, %%tid.x;\n" : "=r"(tx));
                const int e_lane = static_cast<int>(tx % 32), e_row0 = static_cast<int>(tx / 32) * 16;
                int r0;
                const unsigned tile = staged_row_tile(aK, aV, s_last, e_row0, r0);
                float lse[kMTiles][2];
                stage_pairs(p, acc_o, st, tile, r0, lse, e_lane);
                store_staged(p, place_item(p, item), tile, r0, e_row0, lse, e_lane);
            }
            item = next_of(item);
            if (item >= items())
                break;
        }
        cp_async_wait<0>(); /* nothing is in flight by now; no copy may outlive the block */
    }
}

} // namespace fajit_fa

/* Key-split blocks (bm < 16 * warps) name their minimum of one block an SM:
 * left out, ptxas capped sm_80's d128 bm 16 bn 128 4-warp kernel at 168
 * registers (three blocks an SM) and spilled 12 bytes into the loop. The
 * others' 0 is the attribute left out (same cubin). */
namespace fajit_fa {
constexpr int kMinBlocks = kKeyWarps > 1 ? 1 : 0;
}

extern "C" __global__ void __launch_bounds__(fajit_fa::kThreads, fajit_fa::kMinBlocks) fajit_flash_fwd(const fajit_fwd_params p) {
    if (p.combine)
        fajit_fa::combine_partials(p, threadIdx.x);
    else if (fajit_fa::kPersist && p.persist)
        fajit_fa::attend_items<fajit_fa::kPersist>(p);
    else
        fajit_fa::attend(p);
}
