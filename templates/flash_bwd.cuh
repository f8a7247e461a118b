/*
 * templates/flash_bwd.cuh - the fast backward attention on tensor cores, in
 * the FlashAttention-2 manner. Same semantics as reference_bwd.cuh (read its
 * header for the formulas): (batch, seqlen, nheads, headdim) with any
 * batch/seq/head strides and a contiguous last dim, GQA/MQA (dK and dV summed
 * over the query heads of a kv head), causal bottom-right and top-left, rows
 * with LSE -inf (no visible key) contributing nothing, 64-bit offsets; and
 * every feature of the forward, each specialised by its prelude constant:
 * local windows (FAJIT_WINDOW_LEFT/RIGHT; blocks skip the tiles no row of
 * theirs sees, as under causal), softcap (dS through the tanh), ALiBi,
 * dropout (the forward's Philox mask regenerated from seed and offset,
 * nothing stored), varlen (per-sequence offsets and lengths from
 * cu_seqlens; the grids cover the longest sequence, blocks past their
 * sequence's end leave at once). Pre and post read only FAJIT_VARLEN.
 *
 * Five ops share this file, each variant defining every kernel (the others'
 * with an empty body, as in reference_bwd.cuh). The default mode runs
 * pre, bwd, post; deterministic mode runs pre, bwd-dkdv, bwd-dq.
 *   bwd-pre  (FAJIT_OP 5) fajit_flash_bwd_pre(p, dq_acc, stats): per query
 *            row, D = dO . O and lse2 = LSE * log2(e) (+inf where LSE is
 *            -inf, so that exp2 of anything minus it is 0) into `stats`, and
 *            the row's fp32 dQ accumulator zeroed (when dq_acc is not NULL).
 *            Grid (rows_pad / FAJIT_BM, nheads_q, batch), no shared memory.
 *   bwd      (FAJIT_OP 2) fajit_flash_bwd(p, dq_acc, stats): the key-major
 *            kernel, below, with dQ through atomics.
 *   bwd-post (FAJIT_OP 6) fajit_flash_bwd_post(p, dq_acc): grad_q =
 *            softmax_scale * the accumulator, in fp16/bf16, at grad_q's
 *            strides. Grid (ceil(seqlen_q / FAJIT_BM), nheads_q, batch).
 *   bwd-dkdv (FAJIT_OP 7) fajit_flash_bwd_dkdv(p, stats): the key-major
 *            kernel without dQ.
 *   bwd-dq   (FAJIT_OP 8) fajit_flash_bwd_dq(p, stats): the query-major
 *            kernel: a block per FAJIT_BM query rows of one (batch, query
 *            head) walks its key blocks in order (K and V double-buffered
 *            when FAJIT_STAGES is 2), recomputing S and dP for dS (phase 1
 *            below, without P) and adding dS K into registers (phase 3);
 *            grad_q written directly. No atomics: bit-identical across runs.
 *            Grid (ceil(seqlen_q / FAJIT_BM), nheads_q, batch).
 *
 * Scratch (allocated by the runtime, runtime/flash_bwd.c): per (batch, query
 * head) bh, rows_pad = seqlen_q rounded up to kRowPad rows,
 *   dq_acc[bh][rows_pad][kDqk]   fp32 (kDqk = dqk rounded up to 16; not in
 *                                deterministic mode), in mma-tile order:
 *                                dq_at() below
 *   stats[bh][rows_pad]          lse2; stats[batch * nheads_q + bh][...] D.
 * Padding rows get lse2 = +inf and D = 0, so they contribute exactly 0.
 *
 * The key-major kernel. A block owns FAJIT_BN keys of one (batch, kv head);
 * it holds their dK and dV in registers (fp32) and walks, for each query head
 * of the kv head's group in turn (so dK and dV need no atomics), the blocks
 * of FAJIT_BM query rows that see any of its keys (causal masks skip the
 * others). Per query block, with Q, dO, lse2 and D of the block in shared
 * memory (double-buffered by cp.async when FAJIT_STAGES is 2):
 *   1. S^T = K Q^T and dP^T = V dO^T (mma.sync m16n8k16, fp32 accumulate),
 *      warps tiling keys x queries; P^T = exp2(S^T * scale * log2(e) - lse2),
 *      masked elements 0; dS^T = P^T * (dP^T - D); both rounded to fp16/bf16
 *      into shared memory.
 *   2. dV += P^T dO and dK += dS^T Q, warps tiling keys x head dim.
 *   3. (bwd) dQ = dS K, warps tiling queries x head dim, added with fp32
 *      atomics (red.global.add) into dq_acc; the post kernel scales and
 *      converts it.
 * At the end dK (times softmax_scale) and dV go out in fp16/bf16.
 *
 * Shared memory rows are arrays of 16-byte chunks padded to an odd count, so
 * the 8 rows an ldmatrix phase reads, and the 8 chunks a cp.async phase
 * writes, fall in 8 distinct bank groups; every fragment address is then a
 * per-lane base plus a compile-time offset. Head dims are rounded up to 16
 * (the mma k step); the pad chunk of Q, K, V and dO rows is zeroed once, so
 * it adds nothing to the products, and the pad columns of dK, dV and dQ are
 * computed (as zeros) but never written.
 *
 * Launch (runtime): key-major grid (ceil(seqlen_k / FAJIT_BN), nheads_kv,
 * batch); every kernel FAJIT_WARPS * 32 threads and FAJIT_SMEM_BYTES of
 * dynamic shared memory (the layouts below; codegen's
 * fajit__variant_smem_bytes computes the same number). Needs every tensor
 * 16-byte aligned with strides multiples of 8 elements.
 */
#include "common.cuh"
#include "bwd_params.h"
#include "ptx.cuh"

namespace fajit_fb {

/* FAJIT_OP values (enum fajit__op in codegen/variant.h, fixed there). */
constexpr int kOpBwd = 2;
constexpr int kOpPre = 5;
constexpr int kOpPost = 6;
constexpr int kOpDkdv = 7;
constexpr int kOpDq = 8;

} // namespace fajit_fb

static_assert(FAJIT_OP == fajit_fb::kOpBwd || FAJIT_OP == fajit_fb::kOpPre || FAJIT_OP == fajit_fb::kOpPost ||
                  FAJIT_OP == fajit_fb::kOpDkdv || FAJIT_OP == fajit_fb::kOpDq,
              "flash_bwd.cuh is the template of ops bwd, bwd-pre, bwd-post, bwd-dkdv and bwd-dq");
static_assert(FAJIT_ARCH >= 80, "flash_bwd: needs sm_80 or newer (mma.sync bf16, cp.async)");
static_assert(FAJIT_DQK >= 8 && FAJIT_DQK <= 256 && FAJIT_DQK % 8 == 0,
              "flash_bwd: dqk must be a multiple of 8 in 8..256");
static_assert(FAJIT_DV >= 8 && FAJIT_DV <= 256 && FAJIT_DV % 8 == 0,
              "flash_bwd: dv must be a multiple of 8 in 8..256");
static_assert(FAJIT_WARPS >= 1 && FAJIT_WARPS <= 16, "flash_bwd: warps must be 1..16");
static_assert(FAJIT_BM >= 16 && FAJIT_BM % 16 == 0 && 128 % FAJIT_BM == 0,
              "flash_bwd: bm must be 16, 32, 64 or 128");
static_assert(FAJIT_BN >= 16 && FAJIT_BN % 16 == 0, "flash_bwd: bn must be a multiple of 16");
static_assert(FAJIT_STAGES >= 1 && FAJIT_STAGES <= 2, "flash_bwd: stages must be 1 or 2");
static_assert(FAJIT_PAGED == 0, "flash_bwd: paged KV is not implemented");
static_assert(FAJIT_WINDOW_LEFT >= -1 && FAJIT_WINDOW_RIGHT >= -1, "flash_bwd: window sides must be >= -1");

namespace fajit_fb {

using namespace fajit_ptx; /* ptx.cuh */
using elem_t = unsigned short; /* raw fp16 / bf16 bits */

constexpr bool kKeyMajor = FAJIT_OP == kOpBwd || FAJIT_OP == kOpDkdv; /* grid over key blocks */
constexpr bool kQueryMajor = FAJIT_OP == kOpDq;                       /* grid over query blocks */
constexpr int kThreads = FAJIT_WARPS * 32;
constexpr int kRowPad = 128;                        /* scratch rows per head: a multiple of this */
constexpr int kDqk = (FAJIT_DQK + 15) / 16 * 16;    /* head dims rounded up to the mma k step */
constexpr int kDv = (FAJIT_DV + 15) / 16 * 16;
constexpr int kChunksQK = kDqk / 8, kChunksV = kDv / 8; /* 16-byte chunks in a smem row */
constexpr int kLoadQK = FAJIT_DQK / 8, kLoadV = FAJIT_DV / 8; /* chunks read from memory */
constexpr int kChunksP = FAJIT_BM / 8;                  /* P^T / dS^T rows: one per key */

/* Row length in chunks: padded to an odd count (see the header). */
__host__ __device__ constexpr int row_chunks(int chunks) { return chunks | 1; }

/* ---------------------------------------------------------------- warp layouts */

/* Warps tiling an A x B output as wa x wb: A in 16-row mma tiles, B in 8-column
 * ones, each warp an (A / wa) x (B / wb) tile. */
struct Split {
    int wa, wb;
};

/* The split of `warps` over A x B (B being two dims b1, b2 split alike, for dK
 * and dV) with A / wa a multiple of 16 and B / wb a multiple of b_step, that
 * loads the fewest fragments per mma (the smallest A / wa + B / wb); {0, 0}
 * when none exists. */
__host__ __device__ constexpr Split split_warps(int warps, int a, int b1, int b2, int b_step) {
    Split best{0, 0};
    int best_cost = 1 << 30;
    for (int wa = 1; wa <= warps; wa *= 2) {
        const int wb = warps / wa;
        if (wa * wb != warps || a % (16 * wa) != 0 || b1 % (b_step * wb) != 0 || b2 % (b_step * wb) != 0)
            continue;
        const int cost = a / wa + (b1 > b2 ? b1 : b2) / wb;
        if (cost < best_cost) {
            best = Split{wa, wb};
            best_cost = cost;
        }
    }
    return best;
}

__host__ __device__ constexpr int at_least_1(int x) { return x > 0 ? x : 1; }

/* 1. S^T, dP^T: keys x queries; the B step of 16 keeps n tiles in pairs. */
constexpr Split kSdp = split_warps(FAJIT_WARPS, FAJIT_BN, FAJIT_BM, FAJIT_BM, 16);
/* 2. dK, dV: keys x head dim. */
constexpr Split kKv = split_warps(FAJIT_WARPS, FAJIT_BN, kDqk, kDv, 8);
/* 3. dQ: queries x head dim. */
constexpr Split kDq = split_warps(FAJIT_WARPS, FAJIT_BM, kDqk, kDqk, 8);
static_assert(!(kKeyMajor || kQueryMajor) || (kSdp.wa > 0 && (kKv.wa > 0 || kQueryMajor) && kDq.wa > 0),
              "flash_bwd: no warp layout for these bm, bn and warps (bn / 16 and bm / 16 too small "
              "for the warps)");

/* Warp columns of each layout, 1 where the op has none (pre and post
 * compile the phases too, with layouts their tiles may not have). */
constexpr int kSdpWb = at_least_1(kSdp.wb), kKvWb = at_least_1(kKv.wb), kDqWb = at_least_1(kDq.wb);
constexpr int kSdpKeys = FAJIT_BN / at_least_1(kSdp.wa), kSdpRows = FAJIT_BM / kSdpWb;
constexpr int kSdpMT = at_least_1(kSdpKeys / 16), kSdpNT = at_least_1(kSdpRows / 8);
constexpr int kKvKeys = FAJIT_BN / at_least_1(kKv.wa);
constexpr int kKvMT = at_least_1(kKvKeys / 16);
constexpr int kKvQkCols = kDqk / kKvWb, kKvVCols = kDv / kKvWb;
constexpr int kKvQkNT = at_least_1(kKvQkCols / 8), kKvVNT = at_least_1(kKvVCols / 8);
constexpr int kDqRows = FAJIT_BM / at_least_1(kDq.wa), kDqCols = kDqk / kDqWb;
constexpr int kDqMT = at_least_1(kDqRows / 16), kDqNT = at_least_1(kDqCols / 8);

/* ---------------------------------------------------------------- shared memory */

constexpr int kRowQK = row_chunks(kChunksQK) * 8; /* elements per smem row */
constexpr int kRowV = row_chunks(kChunksV) * 8;
constexpr int kRowP = row_chunks(kChunksP) * 8;
constexpr int kQElems = FAJIT_BM * kRowQK;
constexpr int kDoElems = FAJIT_BM * kRowV;
constexpr int kKElems = FAJIT_BN * kRowQK;
constexpr int kVElems = FAJIT_BN * kRowV;
constexpr int kPElems = FAJIT_BN * kRowP; /* P^T or dS^T */
/* Key-major (bwd, bwd-dkdv): per stage Q and dO; K, V, P^T, dS^T; per stage
 * lse2 and D. Query-major (bwd-dq): Q, dO; per stage K and V; dS^T; lse2, D. */
constexpr int kQStages = kKeyMajor ? FAJIT_STAGES : 1;
constexpr int kKStages = kQueryMajor ? FAJIT_STAGES : 1;
constexpr int kSmemBytes = (kQStages * (kQElems + kDoElems) + kKStages * (kKElems + kVElems) +
                            (kQueryMajor ? 1 : 2) * kPElems) * 2 + kQStages * FAJIT_BM * 2 * 4;
static_assert(!(kKeyMajor || kQueryMajor) || kSmemBytes <= FAJIT_SMEM_BYTES,
              "flash_bwd: shared memory layout larger than FAJIT_SMEM_BYTES (codegen disagrees)");

/* Element offset of chunk `chunk` of row `row` in a tile of Row-element rows. */
template <int Row>
__device__ __forceinline__ int smem_at(int row, int chunk) {
    return row * Row + chunk * 8;
}

/* A lane's ldmatrix address in a tile of Row-element rows: the lane's row and
 * chunk folded into one base, so that every fragment is base + a constant. */
template <int Row>
struct LaneAddr {
    unsigned base;
    __device__ __forceinline__ void init(unsigned tile, int row_lane, int chunk_lane) {
        base = tile + static_cast<unsigned>(row_lane * Row + chunk_lane * 8) * 2;
    }
    __device__ __forceinline__ unsigned at(int r0, int c0) const {
        return base + static_cast<unsigned>(r0 * Row + c0 * 8) * 2;
    }
};

/*
 * Lane patterns of the four ways an mma operand sits in shared memory
 * (m16n8k16, A row-major 16 x 16, B "col" 16 x 8; two B n tiles per x4):
 *   A stored M x K:  rows m0 + (lane & 15), chunk k0/8 + (lane >> 4)
 *   A stored K x M:  rows k0 + (lane & 7) + 8 (lane >> 4), chunk m0/8 + ((lane >> 3) & 1), .trans
 *   B stored N x K:  rows n0 + (lane & 7) + 8 (lane >> 4), chunk k0/8 + ((lane >> 3) & 1)
 *   B stored K x N:  rows k0 + (lane & 7) + 8 ((lane >> 3) & 1), chunk n0/8 + (lane >> 4), .trans
 * row0 / chunk0 are the warp's tile origin in the stored tile.
 */
template <int Row>
__device__ __forceinline__ LaneAddr<Row> a_rows(unsigned tile, int row0, int chunk0, int lane) {
    LaneAddr<Row> a;
    a.init(tile, row0 + (lane & 15), chunk0 + (lane >> 4));
    return a;
}
template <int Row>
__device__ __forceinline__ LaneAddr<Row> a_trans(unsigned tile, int row0, int chunk0, int lane) {
    LaneAddr<Row> a;
    a.init(tile, row0 + (lane & 7) + ((lane >> 4) << 3), chunk0 + ((lane >> 3) & 1));
    return a;
}
template <int Row>
__device__ __forceinline__ LaneAddr<Row> b_rows(unsigned tile, int row0, int chunk0, int lane) {
    LaneAddr<Row> a;
    a.init(tile, row0 + (lane & 7) + ((lane >> 4) << 3), chunk0 + ((lane >> 3) & 1));
    return a;
}
template <int Row>
__device__ __forceinline__ LaneAddr<Row> b_trans(unsigned tile, int row0, int chunk0, int lane) {
    LaneAddr<Row> a;
    a.init(tile, row0 + (lane & 7) + (((lane >> 3) & 1) << 3), chunk0 + (lane >> 4));
    return a;
}

/* ---------------------------------------------------------------- PTX beyond ptx.cuh */

__device__ __forceinline__ float pos_infinity() { return __int_as_float(0x7f800000); }

/* threadIdx.x by a volatile read: the compiler keeps no value derived from
 * an earlier read alive up to this one. */
__device__ __forceinline__ int fresh_tid() {
    int t;
    asm volatile("mov.u32 %0, %%tid.x;\n" : "=r"(t));
    return t;
}

/* 16-byte global accesses (no vector types without headers). */
struct U4 {
    unsigned x, y, z, w;
};

__device__ __forceinline__ U4 ld_global_16(const void *p) {
    U4 r;
    asm volatile("ld.global.nc.v4.u32 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r.x), "=r"(r.y), "=r"(r.z), "=r"(r.w)
                 : "l"(p));
    return r;
}

__device__ __forceinline__ void st_global_16(void *p, U4 v) {
    asm volatile("st.global.v4.u32 [%0], {%1, %2, %3, %4};\n" ::"l"(p), "r"(v.x), "r"(v.y), "r"(v.z),
                 "r"(v.w)
                 : "memory");
}

/* acc[0] += a, acc[1] += b in global memory, unordered (fp32 atomics). */
__device__ __forceinline__ void red_add2(float *at, float a, float b) {
    if constexpr (FAJIT_ARCH >= 90) {
        asm volatile("red.global.add.v2.f32 [%0], {%1, %2};\n" ::"l"(at), "f"(a), "f"(b) : "memory");
    } else {
        asm volatile("red.global.add.f32 [%0], %1;\n" ::"l"(at), "f"(a) : "memory");
        asm volatile("red.global.add.f32 [%0], %1;\n" ::"l"(at + 1), "f"(b) : "memory");
    }
}

/* ---------------------------------------------------------------- scratch */

/* Scratch rows per (batch, head): seqlen_q rounded up to kRowPad. */
__device__ __forceinline__ long long rows_pad(const fajit_bwd_params &p) {
    return (static_cast<long long>(p.seqlen_q) + kRowPad - 1) / kRowPad * kRowPad;
}

__device__ __forceinline__ float *lse2_of(float *stats, const fajit_bwd_params &p, long long bh) {
    return stats + bh * rows_pad(p);
}
__device__ __forceinline__ float *d_of(float *stats, const fajit_bwd_params &p, long long bh) {
    return stats + (static_cast<long long>(p.batch) * p.nheads_q + bh) * rows_pad(p);
}
__device__ __forceinline__ float *dq_acc_of(float *dq_acc, const fajit_bwd_params &p, long long bh) {
    return dq_acc + bh * rows_pad(p) * kDqk;
}

/*
 * Where element (row, col) of a head's dQ accumulator lives: in mma-tile
 * order, each 16-row x 8-column tile of an m16n8 accumulator 128 floats in
 * a row, its top 8 rows first, each of those rows' 8 columns together:
 *   ((row / 16) (kDqk / 8) + col / 8) 128 + (row % 16 / 8) 64 + (row % 8) 8 + col % 8.
 * A warp's red.v2 of one tile half (lane l: row l / 4, columns 2 (l % 4)
 * and + 1) then covers 256 contiguous bytes instead of 32 bytes of 8 rows
 * (8 cache lines), and the post kernel still reads a row's 8 columns as 32
 * contiguous bytes. Blocks of 16 rows stay contiguous, so zeroing whole
 * query blocks is unchanged.
 */
__device__ __forceinline__ long long dq_at(long long row, int col) {
    return ((row / 16) * (kDqk / 8) + col / 8) * 128 + (row % 16 / 8) * 64 + (row % 8) * 8 + col % 8;
}

/* ---------------------------------------------------------------- tiles */

/* Rows rows x LoadChunks chunks from src (row stride `stride`, rows first..)
 * into a smem tile of Row-element rows; rows at or past `valid` zero-filled. */
/* Rows rows x LoadChunks chunks from src (row stride `stride`, rows first..)
 * into a smem tile of Row-element rows; rows at or past `valid` zero-filled
 * (ptx.cuh's load_rows: fixed unrolled trip count, no per-row selects on
 * full tiles). */
template <int Rows, int LoadChunks, int Row>
__device__ __forceinline__ void load_tile(unsigned dst, const elem_t *src, long long stride, int first,
                                          int valid, int tid) {
    load_rows<kThreads, Rows, LoadChunks, 8>(src, stride, first, valid, tid, [&](int r, int c) {
        return dst + static_cast<unsigned>(smem_at<Row>(r, c) * 2);
    });
}

/* The pad chunk of rows whose head dim is an odd number of chunks (dim % 16
 * == 8) is never loaded: zero it once. */
template <int Rows, int LoadChunks, int Chunks, int Row>
__device__ __forceinline__ void zero_pad_chunk(elem_t *tile, int tid) {
    if constexpr (Chunks != LoadChunks) {
        for (int r = tid; r < Rows; r += kThreads) {
            unsigned *at = reinterpret_cast<unsigned *>(tile + smem_at<Row>(r, Chunks - 1));
            at[0] = at[1] = at[2] = at[3] = 0u;
        }
    }
}

/* ---------------------------------------------------------------- warp GEMM */

template <int MT, int NT>
__device__ __forceinline__ void zero(float (&acc)[MT][NT][4]) {
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
        for (int nt = 0; nt < NT; ++nt)
            acc[mt][nt][0] = acc[mt][nt][1] = acc[mt][nt][2] = acc[mt][nt][3] = 0.0f;
}

/* acc (MT 16-row x NT 8-column tiles) += A B over KSteps k steps of 16, the
 * fragments by ldmatrix at the lanes' addresses (a_* / b_* above; ATrans and
 * BTrans say which pattern). */
template <int MT, int NT, int KSteps, bool ATrans, bool BTrans, int RowA, int RowB>
__device__ __forceinline__ void warp_gemm(float (&acc)[MT][NT][4], const LaneAddr<RowA> &a,
                                          const LaneAddr<RowB> &b) {
#pragma unroll
    for (int kk = 0; kk < KSteps; ++kk) {
        unsigned af[MT][4];
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) {
            if constexpr (ATrans)
                ldmatrix_x4_trans(a.at(kk * 16, mt * 2), af[mt]);
            else
                ldmatrix_x4(a.at(mt * 16, kk * 2), af[mt]);
        }
#pragma unroll
        for (int np = 0; np < NT / 2; ++np) {
            unsigned bf[4];
            if constexpr (BTrans)
                ldmatrix_x4_trans(b.at(kk * 16, np * 2) , bf);
            else
                ldmatrix_x4(b.at(np * 16, kk * 2) , bf);
#pragma unroll
            for (int mt = 0; mt < MT; ++mt) {
                mma(acc[mt][2 * np], af[mt], bf[0], bf[1]);
                mma(acc[mt][2 * np + 1], af[mt], bf[2], bf[3]);
            }
        }
        if constexpr (NT % 2 == 1) {
            /* .x2: lanes 0..15 give the addresses, their chunk/row high bit is 0. */
            unsigned b0, b1;
            if constexpr (BTrans)
                ldmatrix_x2_trans(b.at(kk * 16, NT - 1) , b0, b1);
            else
                ldmatrix_x2(b.at((NT - 1) * 8, kk * 2) , b0, b1);
#pragma unroll
            for (int mt = 0; mt < MT; ++mt)
                mma(acc[mt][NT - 1], af[mt], b0, b1);
        }
    }
}

/* ---------------------------------------------------------------- sequences and masks */

using fajit::Seq; /* common.cuh: seq_of, seq_q, seq_k */
using fajit::seq_of;
using fajit::seq_q;
using fajit::seq_k;

/* Index in p.lse of row 0 of (sequence b, head h): LSE is (batch, nheads_q,
 * seqlen_q), or (nheads_q, total_q) under varlen. */
__device__ __forceinline__ long long lse_row0(const fajit_bwd_params &p, const Seq &s, long long b, long long h) {
    if constexpr (FAJIT_VARLEN)
        return h * static_cast<long long>(p.cu_seqlens_q[p.batch]) + s.q_start;
    else
        return (b * p.nheads_q + h) * p.seqlen_q;
}

/*
 * The mask of common.cuh's visible_keys, spelled for tiles: key j of the
 * sequence is visible to its query row i iff
 *   j < sk,  j <= i + off + kReach (when kRight),  j >= i + off - kLeftW (when kLeft),
 * off = sk - sq (diagonal at the bottom-right; also a window's without a
 * mask) or 0 (causal-tl). A causal mask bounds the right at the diagonal
 * itself (a right window under it adds nothing; the runtime drops it), a
 * right window alone at diagonal + window_right. Both bounds move right as
 * the row grows, which is what lets blocks skip the tiles no row of theirs
 * sees.
 */
constexpr bool kRight = FAJIT_MASK != fajit::kMaskNone || FAJIT_WINDOW_RIGHT >= 0;
constexpr int kReach = FAJIT_MASK != fajit::kMaskNone ? 0 : FAJIT_WINDOW_RIGHT;
constexpr bool kLeft = FAJIT_WINDOW_LEFT >= 0;
constexpr int kLeftW = FAJIT_WINDOW_LEFT;

__device__ __forceinline__ int diag_of(int sq, int sk) {
    return FAJIT_MASK == fajit::kMaskCausalTL ? 0 : sk - sq;
}

/* Whether key `key` is hidden from row `row` (sequence lengths sk, diagonal offset off). */
__device__ __forceinline__ bool hidden(int key, int row, int sk, int off) {
    return key >= sk || (kRight && key > row + off + kReach) || (kLeft && key < row + off - kLeftW);
}

/* Whether the tile of keys n0.. x rows m0.. needs a per-element test: it
 * straddles sk or a bound of some row's keys. */
__device__ __forceinline__ bool tile_needs_mask(int n0, int m0, int sk, int off) {
    return n0 + FAJIT_BN > sk || (kRight && n0 + FAJIT_BN - 1 > m0 + off + kReach) ||
           (kLeft && n0 < m0 + FAJIT_BM - 1 + off - kLeftW);
}

/* The query blocks (of FAJIT_BM rows) with a row seeing some key of n0 ..
 * n0 + FAJIT_BN - 1: [first, first + count). */
struct Blocks {
    int first, count;
};

__device__ __forceinline__ Blocks query_blocks_of(int n0, int sq, int off) {
    /* The first row whose right bound reaches n0 (int: n0 < sk, off = sk - sq at most). */
    const int first_row = kRight ? imax(0, n0 - off - kReach) : 0;
    const int first = first_row / FAJIT_BM;
    int end = (sq + FAJIT_BM - 1) / FAJIT_BM;
    if constexpr (kLeft) { /* the last row whose left bound reaches the block's last key */
        const long long last = static_cast<long long>(n0) + FAJIT_BN - 1 - off + kLeftW;
        if (last < first_row)
            return Blocks{first, 0};
        if (last + 1 < sq)
            end = static_cast<int>((last + FAJIT_BM) / FAJIT_BM);
    }
    return Blocks{first, imax(0, end - first)};
}

/* The key tiles (of FAJIT_BN keys) some row of m0 .. m0 + FAJIT_BM - 1 sees. */
__device__ __forceinline__ Blocks key_tiles_of(int m0, int sq, int sk, int off) {
    int key_end = sk;
    if constexpr (kRight) { /* the keys the block's last row may see (its right bound) */
        const int last_row = (m0 + FAJIT_BM < sq ? m0 + FAJIT_BM : sq) - 1;
        const long long reach = static_cast<long long>(last_row) + off + kReach + 1;
        key_end = reach < sk ? static_cast<int>(reach > 0 ? reach : 0) : sk;
    }
    int first = 0;
    if constexpr (kLeft) { /* the first key the block's first row may see */
        const long long lo = static_cast<long long>(m0) + off - kLeftW;
        if (lo >= key_end)
            return Blocks{0, 0};
        first = lo > 0 ? static_cast<int>(lo / FAJIT_BN) : 0;
    }
    return Blocks{first, imax(0, (key_end + FAJIT_BN - 1) / FAJIT_BN - first)};
}

/* ---------------------------------------------------------------- score modifiers */

/* tanh(x) = 1 - 2 / (e^2x + 1), by two MUFU ops (flash_fwd.cuh's tanh_exp2:
 * absolute error ~1e-6, exactly +-1 at the ends), so the backward's scores
 * are the forward's. */
__device__ __forceinline__ float tanh_exp2(float x) {
    const float e = fast_exp2(x * 2.8853900817779268f); /* 2 log2(e) */
    float r;
    asm("rcp.approx.ftz.f32 %0, %1;\n" : "=f"(r) : "f"(e + 1.0f));
    return fmaf(-2.0f, r, 1.0f);
}

/* What one (sequence, query head) adds to q.k and to P: the score's scaling
 * (softcap), its ALiBi slope, the dropout stream's counter. */
struct Head {
    float slope2;             /* ALiBi: slope * log2(e) */
    unsigned long long philox; /* dropout: offset + ((b * nheads_q + h) << 32), common.cuh's T */
};

__device__ __forceinline__ Head head_of(const fajit_bwd_params &p, long long b, long long h) {
    Head r{0.0f, 0ull};
    if constexpr (FAJIT_ALIBI)
        r.slope2 = p.alibi_slopes[b * p.alibi_batch_stride + h] * 1.4426950408889634f;
    if constexpr (FAJIT_DROPOUT)
        r.philox = fajit::dropout_stream(p.dropout_offset, b, h, p.nheads_q);
    return r;
}

/*
 * The dropout keep bits of one 16-key x 8-row tile of S^T, bit 2 half + e for
 * this lane's element (key n0w + half 8 + lane / 4, row r0w + 2 (lane % 4) + e):
 * common.cuh's stream, element (b, h, i, j) word j & 3 of the Philox call for
 * (j >> 2, i). The tile needs 32 calls (4 groups of 4 keys x 8 rows): lane L
 * makes the one for key group L / 8 and row L % 8, and four shuffle rounds
 * hand each lane its four words. In round s, lane L (word w = (L / 4) % 4 of
 * its key group) takes its element k = (s + w) % 4 from the lane that made
 * that element's call, which sends word (k - s) % 4 of its result: every
 * lane reading a given call in a round wants the same word. n0w is a multiple
 * of 16.
 */
__device__ __forceinline__ unsigned keep_bits(const fajit_bwd_params &p, const Head &hd, unsigned threshold,
                                              int n0w, int r0w, int lane) {
    const unsigned group = static_cast<unsigned>(n0w >> 2) + static_cast<unsigned>(lane >> 3);
    const fajit::Philox4 r =
        fajit::dropout_words_at(p.dropout_seed, hd.philox, group, static_cast<unsigned>(r0w + (lane & 7)));
    const int my_k = 2 * (lane >> 4) + (lane & 1); /* the element my call is to the lanes reading it */
    const int w = (lane >> 2) & 3;
    unsigned bits = 0u;
#pragma unroll
    for (int s = 0; s < 4; ++s) {
        const int send = (my_k - s) & 3;
        const unsigned word = send == 0 ? r.x : send == 1 ? r.y : send == 2 ? r.z : r.w;
        const int k = (s + w) & 3;
        const int src = (2 * (k >> 1) + (lane >> 4)) * 8 + 2 * (lane & 3) + (k & 1);
        const unsigned got = __shfl_sync(fajit::kFullWarp, word, src);
        bits |= (got >= threshold ? 1u : 0u) << k;
    }
    return bits;
}

/* The smem tiles, as shared-space byte addresses (for ldmatrix and
 * cp.async), and the generic pointer of the first (for plain accesses). */
struct Tiles {
    unsigned q, dout, k, v, p, ds, lse2, d;
    unsigned char *base;

    template <typename T>
    __device__ __forceinline__ T *at(unsigned addr) const {
        return reinterpret_cast<T *>(base + (addr - q));
    }
};

/* The layout of the file header: Q, dO, K, V, (P^T), dS^T, lse2, D. */
__device__ __forceinline__ Tiles tiles_of(elem_t *smem) {
    Tiles t;
    t.base = reinterpret_cast<unsigned char *>(smem);
    t.q = smem_addr(smem);
    t.dout = t.q + kQStages * kQElems * 2;
    t.k = t.dout + kQStages * kDoElems * 2;
    t.v = t.k + kKStages * kKElems * 2;
    t.p = t.v + kKStages * kVElems * 2;
    t.ds = kQueryMajor ? t.p : t.p + kPElems * 2;
    t.lse2 = t.ds + kPElems * 2;
    t.d = t.lse2 + kQStages * FAJIT_BM * 4;
    return t;
}

/* Pad chunks of every Q, dO, K and V buffer: zeroed once, before the first
 * barrier. */
__device__ __forceinline__ void zero_pad_chunks(const Tiles &t, int tid) {
#pragma unroll
    for (int s = 0; s < kQStages; ++s) {
        zero_pad_chunk<FAJIT_BM, kLoadQK, kChunksQK, kRowQK>(t.at<elem_t>(t.q) + s * kQElems, tid);
        zero_pad_chunk<FAJIT_BM, kLoadV, kChunksV, kRowV>(t.at<elem_t>(t.dout) + s * kDoElems, tid);
    }
#pragma unroll
    for (int s = 0; s < kKStages; ++s) {
        zero_pad_chunk<FAJIT_BN, kLoadQK, kChunksQK, kRowQK>(t.at<elem_t>(t.k) + s * kKElems, tid);
        zero_pad_chunk<FAJIT_BN, kLoadV, kChunksV, kRowV>(t.at<elem_t>(t.v) + s * kVElems, tid);
    }
}

/*
 * Where a block's query blocks come from, worked out once per block: the Q
 * and dO rows and the lse2 scratch row of head 0 of the block's sequence,
 * and the strides between heads and rows (and from lse2 to D), so that each
 * query block costs a multiply-add per pointer instead of the 64-bit
 * products of the full offsets.
 */
struct QuerySrc {
    const elem_t *q, *dout;     /* (batch b, head 0, sequence row 0) */
    long long q_head, dout_head; /* elements between heads */
    long long q_row, dout_row;   /* elements between rows */
    const float *stats;          /* lse2 of (bh = b * nheads_q, row 0) */
    long long stats_head;        /* floats between heads: rows_pad */
    long long stats_d;           /* floats from an lse2 row to its D row */
    int valid;                   /* rows in the sequence */
};

/* The lse2 and D rows of a query block: 16-byte chunks, lse2's first. */
constexpr int kStatChunks = 2 * (FAJIT_BM / 4);

__device__ __forceinline__ QuerySrc query_src_of(const fajit_bwd_params &p, const float *stats, const Seq &seq,
                                                 long long b) {
    QuerySrc r;
    r.q = static_cast<const elem_t *>(p.q) + b * p.q_stride[0] + seq.q_start * p.q_stride[1];
    r.dout = static_cast<const elem_t *>(p.grad_out) + b * p.grad_out_stride[0] +
             seq.q_start * p.grad_out_stride[1];
    r.q_head = p.q_stride[2];
    r.dout_head = p.grad_out_stride[2];
    r.q_row = p.q_stride[1];
    r.dout_row = p.grad_out_stride[1];
    r.stats_head = rows_pad(p);
    r.stats_d = static_cast<long long>(p.batch) * p.nheads_q * r.stats_head;
    r.stats = stats + b * p.nheads_q * r.stats_head;
    r.valid = seq_q(p, seq);
    return r;
}

/* Q, dO, lse2 and D of the query block at row m0 of head h into Q stage s
 * (cp.async; rows past the sequence's zero-filled, the scratch rows are
 * padded). Chunk j of lse2/D is thread j's (and j + kThreads's ...): with
 * kStatChunks <= kThreads its offsets depend on tid alone, which the
 * compiler keeps out of the caller's loop. */
__device__ __forceinline__ void load_query_block(const QuerySrc &src, const Tiles &t, int h, int m0, int s,
                                                 int tid) {
    load_tile<FAJIT_BM, kLoadQK, kRowQK>(t.q + s * kQElems * 2, src.q + h * src.q_head, src.q_row, m0, src.valid,
                                         tid);
    load_tile<FAJIT_BM, kLoadV, kRowV>(t.dout + s * kDoElems * 2, src.dout + h * src.dout_head, src.dout_row, m0,
                                       src.valid, tid);
    const float *rows = src.stats + h * src.stats_head + m0;
#pragma unroll
    for (int k = 0; k < (kStatChunks + kThreads - 1) / kThreads; ++k) {
        const int j = tid + k * kThreads;
        if (kStatChunks % kThreads == 0 || j < kStatChunks) {
            const bool is_d = j >= FAJIT_BM / 4;
            const int c = is_d ? j - FAJIT_BM / 4 : j;
            cp_async_16((is_d ? t.d : t.lse2) + (s * FAJIT_BM + c * 4) * 4, rows + (is_d ? src.stats_d : 0) + c * 4,
                        true);
        }
    }
}

/* K and V of the key block at n0 of kv head h_kv into K stage s. */
__device__ __forceinline__ void load_key_block(const fajit_bwd_params &p, const Tiles &t, const Seq &seq,
                                               long long b, long long h_kv, int n0, int s, int tid) {
    const elem_t *k = static_cast<const elem_t *>(p.k) + b * p.k_stride[0] + seq.k_start * p.k_stride[1] +
                      h_kv * p.k_stride[2];
    const elem_t *v = static_cast<const elem_t *>(p.v) + b * p.v_stride[0] + seq.k_start * p.v_stride[1] +
                      h_kv * p.v_stride[2];
    load_tile<FAJIT_BN, kLoadQK, kRowQK>(t.k + s * kKElems * 2, k, p.k_stride[1], n0, seq_k(p, seq), tid);
    load_tile<FAJIT_BN, kLoadV, kRowV>(t.v + s * kVElems * 2, v, p.v_stride[1], n0, seq_k(p, seq), tid);
}

/* ---------------------------------------------------------------- the three phases */

/* Which buffers a step reads: Q stage sq, K stage sk. */
struct Step {
    int sq, sk;
    int n0, m0; /* first key, first query row */
    bool mask;  /* elements need the per-element test */
};


/* Without softcap and ALiBi the score is q.k times a constant: its scale
 * and the row's lse2 go into one FFMA (the forward's folding). */
constexpr bool kFoldScale = !FAJIT_SOFTCAP && !FAJIT_ALIBI;

/* x, the score in the log2 domain, of q.k = a (the forward's: scaled, or
 * capped by tanh under softcap, whose dS/dx factor 1 - tanh^2 goes to grad). */
__device__ __forceinline__ float score_of(float a, float scale, float cap2, float &grad) {
    if constexpr (FAJIT_SOFTCAP) {
        const float th = tanh_exp2(a * scale);
        grad = fmaf(-th, th, 1.0f);
        return th * cap2;
    } else {
        return a * scale;
    }
}

/* Without softcap (whose dS/dx factor would need a register a score until
 * the dS), x - lse2 is formed for the whole tile first and the mask applied
 * to it in a block of its own, which the steps that need none branch over:
 * interleaved with the exp2s, ptxas predicated the mask's tests and selects
 * into every step (d 128 causal: 102 more instructions in the loop than
 * unmasked). H100, fp16, two interleaved A/B rounds
 * (benchmarks/results/bench_bwd_maskapart_ab_h100_s8.txt): d 64 +2-7%,
 * d 128 +0.4-1.4%, deterministic mode d 64 causal +13-15%. */
constexpr bool kMaskApart = !FAJIT_SOFTCAP;

/*
 * Phase 1 for this warp's kSdpKeys x kSdpRows tile: P^T (when WriteP) and
 * dS^T, rounded, into smem. With the features (reference_bwd.cuh's formulas,
 * in the log2 domain of the forward): x = s q.k log2(e), or under softcap
 * c log2(e) tanh(s q.k / c) with dS/dx's factor 1 - tanh^2; ALiBi adds
 * -slope log2(e) |i + sk - sq - j|; P = exp2(x - lse2). Dropout: P^T is
 * stored as P Z / dropout_scale (the kept P, 0 for dropped; write_dkdv scales
 * dV) and dS = P (Z dP - D), Z = dropout_scale or 0 as the forward kept the
 * element.
 */
template <bool WriteP>
__device__ __forceinline__ void sdp_phase(const fajit_bwd_params &p, const Tiles &t, const Step &st, const Seq &seq,
                                          int off, const Head &hd, int warp, int lane) {
    const int key0 = (warp / kSdpWb) * kSdpKeys, row0 = (warp % kSdpWb) * kSdpRows;
    float acc_s[kSdpMT][kSdpNT][4], acc_dp[kSdpMT][kSdpNT][4];
    zero(acc_s);
    zero(acc_dp);
    warp_gemm<kSdpMT, kSdpNT, kDqk / 16, false, false>(
        acc_s, a_rows<kRowQK>(t.k + st.sk * kKElems * 2, key0, 0, lane),
        b_rows<kRowQK>(t.q + st.sq * kQElems * 2, row0, 0, lane));
    warp_gemm<kSdpMT, kSdpNT, kDv / 16, false, false>(
        acc_dp, a_rows<kRowV>(t.v + st.sk * kVElems * 2, key0, 0, lane),
        b_rows<kRowV>(t.dout + st.sq * kDoElems * 2, row0, 0, lane));

    const float *lse2 = t.at<const float>(t.lse2) + st.sq * FAJIT_BM;
    const float *dd = t.at<const float>(t.d) + st.sq * FAJIT_BM;
    elem_t *sp = t.at<elem_t>(t.p), *sds = t.at<elem_t>(t.ds);
    const float scale = FAJIT_SOFTCAP ? __fdividef(p.softmax_scale, p.softcap) : p.softmax_scale_log2; /* as the forward */
    const float cap2 = FAJIT_SOFTCAP ? p.softcap * 1.4426950408889634f : 0.0f;
    const unsigned threshold = FAJIT_DROPOUT ? fajit::dropout_threshold(p.dropout_p) : 0u;
    /* x - lse2 of block rows col and col + 1 at block key `key` (g: dS/dx's
     * softcap factor). Without softcap and ALiBi one FFMA; lse2 is +inf for
     * rows that see no key: P = 0 there. */
    auto x_pair = [&](float a0, float a1, int col, int key, float l0, float l1, float &x0, float &x1, float &g0,
                      float &g1) {
        if constexpr (kFoldScale) {
            x0 = fmaf(a0, scale, -l0);
            x1 = fmaf(a1, scale, -l1);
        } else {
            x0 = score_of(a0, scale, cap2, g0);
            x1 = score_of(a1, scale, cap2, g1);
            if constexpr (FAJIT_ALIBI) {
                const int dist = st.m0 + col + seq_k(p, seq) - seq_q(p, seq) - (st.n0 + key);
                x0 = fmaf(-hd.slope2, static_cast<float>(dist < 0 ? -dist : dist), x0);
                x1 = fmaf(-hd.slope2, static_cast<float>(dist + 1 < 0 ? -dist - 1 : dist + 1), x1);
            }
            x0 -= l0;
            x1 -= l1;
        }
    };
    /* -inf where the mask hides the element. */
    auto mask_pair = [&](int col, int key, float &x0, float &x1) {
        const int kg = st.n0 + key, rg = st.m0 + col;
        if (hidden(kg, rg, seq_k(p, seq), off))
            x0 = fajit::neg_infinity();
        if (hidden(kg, rg + 1, seq_k(p, seq), off))
            x1 = fajit::neg_infinity();
    };
    if constexpr (kMaskApart) {
        /* x - lse2 in place, then the mask in a block of its own that a
         * step without one branches over. */
#pragma unroll
        for (int nt = 0; nt < kSdpNT; ++nt) {
            const int col = row0 + nt * 8 + (lane % 4) * 2;
            const float l0 = lse2[col], l1 = lse2[col + 1];
#pragma unroll
            for (int mt = 0; mt < kSdpMT; ++mt)
#pragma unroll
                for (int half = 0; half < 2; ++half) {
                    float &x0 = acc_s[mt][nt][2 * half], &x1 = acc_s[mt][nt][2 * half + 1];
                    float g0, g1; /* (no softcap here: left alone) */
                    x_pair(x0, x1, col, key0 + mt * 16 + half * 8 + lane / 4, l0, l1, x0, x1, g0, g1);
                }
        }
        if (st.mask) {
#pragma unroll
            for (int nt = 0; nt < kSdpNT; ++nt)
#pragma unroll
                for (int mt = 0; mt < kSdpMT; ++mt)
#pragma unroll
                    for (int half = 0; half < 2; ++half)
                        mask_pair(row0 + nt * 8 + (lane % 4) * 2, key0 + mt * 16 + half * 8 + lane / 4,
                                  acc_s[mt][nt][2 * half], acc_s[mt][nt][2 * half + 1]);
        }
    }
#pragma unroll
    for (int nt = 0; nt < kSdpNT; ++nt) {
        const int col = row0 + nt * 8 + (lane % 4) * 2; /* query row within the block */
        const float l0 = kMaskApart ? 0.0f : lse2[col], l1 = kMaskApart ? 0.0f : lse2[col + 1];
        const float d0 = dd[col], d1 = dd[col + 1];
#pragma unroll
        for (int mt = 0; mt < kSdpMT; ++mt) {
            unsigned keep = 0xfu;
            if constexpr (FAJIT_DROPOUT)
                keep = keep_bits(p, hd, threshold, st.n0 + key0 + mt * 16, st.m0 + row0 + nt * 8, lane);
#pragma unroll
            for (int half = 0; half < 2; ++half) {
                const int key = key0 + mt * 16 + half * 8 + lane / 4; /* within the block */
                float g0 = 1.0f, g1 = 1.0f, x0 = acc_s[mt][nt][2 * half], x1 = acc_s[mt][nt][2 * half + 1];
                if constexpr (!kMaskApart) { /* softcap: g lives only until the dS */
                    x_pair(x0, x1, col, key, l0, l1, x0, x1, g0, g1);
                    if (st.mask)
                        mask_pair(col, key, x0, x1);
                }
                float p0 = fast_exp2(x0), p1 = fast_exp2(x1);
                float dp0 = acc_dp[mt][nt][2 * half], dp1 = acc_dp[mt][nt][2 * half + 1];
                if constexpr (FAJIT_DROPOUT) {
                    dp0 = keep >> (2 * half) & 1u ? dp0 * p.dropout_scale : 0.0f;
                    dp1 = keep >> (2 * half + 1) & 1u ? dp1 * p.dropout_scale : 0.0f;
                }
                float ds0 = p0 * (dp0 - d0), ds1 = p1 * (dp1 - d1);
                if constexpr (FAJIT_SOFTCAP) {
                    ds0 *= g0;
                    ds1 *= g1;
                }
                if constexpr (FAJIT_DROPOUT) {
                    p0 = keep >> (2 * half) & 1u ? p0 : 0.0f;
                    p1 = keep >> (2 * half + 1) & 1u ? p1 : 0.0f;
                }
                const int at = smem_at<kRowP>(key, 0) + col;
                if constexpr (WriteP)
                    *reinterpret_cast<unsigned *>(sp + at) = pack2(p0, p1);
                *reinterpret_cast<unsigned *>(sds + at) = pack2(ds0, ds1);
            }
        }
    }
}

/* Phase 2: dV += P^T dO, dK += dS^T Q for this warp's keys x columns. */
__device__ __forceinline__ void kv_phase(float (&dv)[kKvMT][kKvVNT][4], float (&dk)[kKvMT][kKvQkNT][4],
                                         const Tiles &t, int sq, int warp, int lane) {
    const int key0 = (warp / kKvWb) * kKvKeys, cb = warp % kKvWb;
    warp_gemm<kKvMT, kKvVNT, FAJIT_BM / 16, false, true>(
        dv, a_rows<kRowP>(t.p, key0, 0, lane), b_trans<kRowV>(t.dout + sq * kDoElems * 2, 0, cb * kKvVCols / 8, lane));
    warp_gemm<kKvMT, kKvQkNT, FAJIT_BM / 16, false, true>(
        dk, a_rows<kRowP>(t.ds, key0, 0, lane), b_trans<kRowQK>(t.q + sq * kQElems * 2, 0, cb * kKvQkCols / 8, lane));
}

/* Phase 3: acc += dS K for this warp's rows x columns (K stage sk). */
__device__ __forceinline__ void dq_phase(float (&acc)[kDqMT][kDqNT][4], const Tiles &t, int sk, int warp, int lane) {
    const int row0 = (warp / kDqWb) * kDqRows, col0 = (warp % kDqWb) * kDqCols;
    warp_gemm<kDqMT, kDqNT, FAJIT_BN / 16, true, true>(
        acc, a_trans<kRowP>(t.ds, 0, row0 / 8, lane), b_trans<kRowQK>(t.k + sk * kKElems * 2, 0, col0 / 8, lane));
}

/* The element (mt, nt, e) of phase 3's tile: its row within the block and column. */
__device__ __forceinline__ int dq_row(int warp, int lane, int mt, int half) {
    return (warp / kDqWb) * kDqRows + mt * 16 + half * 8 + lane / 4;
}
__device__ __forceinline__ int dq_col(int warp, int lane, int nt) {
    return (warp % kDqWb) * kDqCols + nt * 8 + (lane % 4) * 2;
}

/* The key-major kernel's dQ: phase 3's tile added into dq_acc (fp32
 * atomics); dq_rows is this lane's first element of the query block's
 * (dq_at(dq_row(.., 0, 0), dq_col(.., 0)) for row 0 of the block), every
 * other one a constant away. */
__device__ __forceinline__ void dq_atomics(float *dq_rows, const Tiles &t, int warp, int lane) {
    float acc[kDqMT][kDqNT][4];
    zero(acc);
    dq_phase(acc, t, 0, warp, lane);
#pragma unroll
    for (int mt = 0; mt < kDqMT; ++mt)
#pragma unroll
        for (int half = 0; half < 2; ++half)
#pragma unroll
            for (int nt = 0; nt < kDqNT; ++nt)
                red_add2(dq_rows + (mt * (kDqk / 8) + nt) * 128 + half * 64, acc[mt][nt][2 * half],
                         acc[mt][nt][2 * half + 1]);
}

/* dK (times softmax_scale) and dV (times dropout_scale under dropout: P^T
 * held the kept P unscaled) of the block's keys below the sequence's end. */
__device__ __forceinline__ void write_dkdv(const fajit_bwd_params &p, const Seq &seq, long long b, long long h_kv,
                                          int n0, float (&dv)[kKvMT][kKvVNT][4], float (&dk)[kKvMT][kKvQkNT][4],
                                          int warp, int lane) {
    const int key0 = (warp / kKvWb) * kKvKeys, cb = warp % kKvWb;
    const float dv_scale = FAJIT_DROPOUT ? p.dropout_scale : 1.0f;
    elem_t *gk = static_cast<elem_t *>(p.grad_k) + b * p.grad_k_stride[0] + seq.k_start * p.grad_k_stride[1] +
                 h_kv * p.grad_k_stride[2];
    elem_t *gv = static_cast<elem_t *>(p.grad_v) + b * p.grad_v_stride[0] + seq.k_start * p.grad_v_stride[1] +
                 h_kv * p.grad_v_stride[2];
#pragma unroll
    for (int mt = 0; mt < kKvMT; ++mt)
#pragma unroll
        for (int half = 0; half < 2; ++half) {
            const int key = n0 + key0 + mt * 16 + half * 8 + lane / 4;
            if (key >= seq_k(p, seq))
                continue;
            elem_t *rk = gk + static_cast<long long>(key) * p.grad_k_stride[1] + cb * kKvQkCols + (lane % 4) * 2;
            elem_t *rv = gv + static_cast<long long>(key) * p.grad_v_stride[1] + cb * kKvVCols + (lane % 4) * 2;
#pragma unroll
            for (int nt = 0; nt < kKvQkNT; ++nt)
                if (cb * kKvQkCols + nt * 8 < FAJIT_DQK) /* pad columns are not written */
                    *reinterpret_cast<unsigned *>(rk + nt * 8) =
                        pack2(dk[mt][nt][2 * half] * p.softmax_scale, dk[mt][nt][2 * half + 1] * p.softmax_scale);
#pragma unroll
            for (int nt = 0; nt < kKvVNT; ++nt)
                if (cb * kKvVCols + nt * 8 < FAJIT_DV)
                    *reinterpret_cast<unsigned *>(rv + nt * 8) =
                        pack2(dv[mt][nt][2 * half] * dv_scale, dv[mt][nt][2 * half + 1] * dv_scale);
        }
}

/* ---------------------------------------------------------------- block order */

/* This block's (x, head, batch). Under a causal mask (common.cuh's
 * heavy_halves_first) the heavier half of every head's blocks starts first:
 * low x is heavy in the key-major kernel (heavy_low), high x in the
 * query-major one. Windows give blocks even work: the natural order. */
struct Slot {
    int x;
    long long y, z;
};

__device__ __forceinline__ Slot block_slot(bool heavy_low) {
    if constexpr (FAJIT_MASK == fajit::kMaskNone || kLeft) {
        return Slot{static_cast<int>(blockIdx.x), blockIdx.y, blockIdx.z};
    } else {
        const fajit::BlockSlot s = fajit::heavy_halves_first(blockIdx.x, blockIdx.y, blockIdx.z);
        const int x = heavy_low ? static_cast<int>(s.rank) : static_cast<int>(gridDim.x - 1 - s.rank);
        return Slot{x, s.y, s.z};
    }
}

/* ---------------------------------------------------------------- the key-major kernel */

/*
 * bwd and bwd-dkdv: a block per FAJIT_BN keys of one (batch, kv head), dK and
 * dV in registers, walking for each query head of the group the query blocks
 * that see any of its keys (iteration i: head h_kv * group + i / nmb, block
 * mb0 + i % nmb; masks and windows skip the others). WithDq (bwd) adds phase
 * 3 into dq_acc; bwd-dkdv leaves dQ to the query-major kernel. Under varlen
 * the grid covers the longest sequence; blocks past their sequence's keys
 * leave at once.
 */
template <bool WithDq>
__device__ __forceinline__ void flash_bwd_key_major(const fajit_bwd_params &p, float *dq_acc, const float *stats,
                                                    elem_t *smem) {
    const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
    const Slot slot = block_slot(true);
    const long long b = slot.z, h_kv = slot.y;
    const Seq seq = seq_of(p, b);
    const int n0 = slot.x * FAJIT_BN, group = p.nheads_q / p.nheads_kv;
    if (FAJIT_VARLEN && n0 >= seq_k(p, seq))
        return;
    const int off = diag_of(seq_q(p, seq), seq_k(p, seq));
    const Blocks qb = query_blocks_of(n0, seq_q(p, seq), off);
    const int mb0 = qb.first, nmb = qb.count;
    const int iters = group * nmb;
    const Tiles t = tiles_of(smem);
    zero_pad_chunks(t, tid);
    load_key_block(p, t, seq, b, h_kv, n0, 0, tid); /* K and V stay throughout */

    float dv[kKvMT][kKvVNT][4], dk[kKvMT][kKvQkNT][4];
    zero(dv);
    zero(dk);
    const QuerySrc src = query_src_of(p, stats, seq, b);
    /* dQ of head 0 (bwd only; the same for the whole block, so it may live
     * in a uniform register) and this lane's first element of a query block. */
    float *const dq_head0 = WithDq ? dq_acc_of(dq_acc, p, b * p.nheads_q) : nullptr;
    const int dq_lane = static_cast<int>(dq_at(dq_row(warp, lane, 0, 0), dq_col(warp, lane, 0)));
    /* Iteration i's query head and block, and the next iteration's, stepped
     * (block first) instead of divided out of i. */
    int h = static_cast<int>(h_kv) * group;
    int m0 = mb0 * FAJIT_BM;
    int h_next = h;
    int m_next = m0;
    auto step = [&] {
        m_next += FAJIT_BM;
        if (m_next == (mb0 + nmb) * FAJIT_BM) {
            m_next = mb0 * FAJIT_BM;
            ++h_next;
        }
    };
    if constexpr (FAJIT_STAGES == 2) {
        if (iters > 0)
            load_query_block(src, t, h, m0, 0, tid);
    }
    cp_async_commit();
    step();

    for (int i = 0; i < iters; ++i) {
        const int s = FAJIT_STAGES == 2 ? i % 2 : 0;
        if constexpr (FAJIT_STAGES == 1) {
            if (i > 0)
                __syncthreads(); /* every warp is done with the single buffer */
            load_query_block(src, t, h, m0, 0, tid);
            cp_async_commit();
        }
        cp_async_wait<0>();
        __syncthreads(); /* block i landed for all; everyone is past block i - 1 */
        if constexpr (FAJIT_STAGES == 2) {
            if (i + 1 < iters)
                load_query_block(src, t, h_next, m_next, (i + 1) % 2, tid);
            cp_async_commit();
        }
        const Step st{s, 0, n0, m0, tile_needs_mask(n0, m0, seq_k(p, seq), off)};
        sdp_phase<true>(p, t, st, seq, off, head_of(p, b, h), warp, lane);
        __syncthreads(); /* P^T and dS^T complete */
        kv_phase(dv, dk, t, s, warp, lane);
        if constexpr (WithDq)
            dq_atomics(dq_head0 + (static_cast<long long>(h) * src.stats_head + m0) * kDqk + dq_lane, t, warp,
                       lane); /* m0 % 16 == 0: the block's rows start a tile row */
        h = h_next;
        m0 = m_next;
        step();
    }
    cp_async_wait<0>(); /* no copy may outlive the block */
    /* The thread index read afresh (volatile: not merged with the one
     * before the loop), so that no lane offset lives across the loop: at
     * d 128 that one register was a spill. */
    const int tid_end = fresh_tid();
    write_dkdv(p, seq, b, h_kv, n0, dv, dk, tid_end / 32, tid_end % 32);
}

/* ---------------------------------------------------------------- the query-major kernel */

/* grad_q = softmax_scale * acc for the block's rows below the sequence's end. */
__device__ __forceinline__ void write_dq(const fajit_bwd_params &p, const Seq &seq, long long b, long long h, int m0,
                                        float (&acc)[kDqMT][kDqNT][4], int warp, int lane) {
    elem_t *g = static_cast<elem_t *>(p.grad_q) + b * p.grad_q_stride[0] + seq.q_start * p.grad_q_stride[1] +
                h * p.grad_q_stride[2];
#pragma unroll
    for (int mt = 0; mt < kDqMT; ++mt)
#pragma unroll
        for (int half = 0; half < 2; ++half) {
            const int row = m0 + dq_row(warp, lane, mt, half);
            if (row >= seq_q(p, seq))
                continue;
#pragma unroll
            for (int nt = 0; nt < kDqNT; ++nt) {
                const int col = dq_col(warp, lane, nt);
                if (col - (lane % 4) * 2 < FAJIT_DQK) /* the tile's first column: pad tiles are not written */
                    *reinterpret_cast<unsigned *>(g + static_cast<long long>(row) * p.grad_q_stride[1] + col) =
                        pack2(acc[mt][nt][2 * half] * p.softmax_scale, acc[mt][nt][2 * half + 1] * p.softmax_scale);
            }
        }
}

/*
 * bwd-dq (deterministic mode): a block per FAJIT_BM query rows of one
 * (batch, query head), its dQ in registers, walking the key blocks its rows
 * see in order (K and V through FAJIT_STAGES buffers): phase 1 for dS^T
 * only, phase 3 into the registers. No atomics, one fixed order: the result
 * is the same bit for bit on every run.
 */
__device__ __forceinline__ void flash_bwd_query_major(const fajit_bwd_params &p, const float *stats, elem_t *smem) {
    const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
    const Slot slot = block_slot(false);
    const long long b = slot.z, h = slot.y, h_kv = h / (p.nheads_q / p.nheads_kv);
    const Seq seq = seq_of(p, b);
    const int m0 = slot.x * FAJIT_BM;
    if (FAJIT_VARLEN && m0 >= seq_q(p, seq))
        return;
    const int off = diag_of(seq_q(p, seq), seq_k(p, seq));
    const Blocks kt = key_tiles_of(m0, seq_q(p, seq), seq_k(p, seq), off);
    const int n_tiles = kt.count, nb0 = kt.first * FAJIT_BN;
    const Head hd = head_of(p, b, h);
    const Tiles t = tiles_of(smem);
    zero_pad_chunks(t, tid);
    load_query_block(query_src_of(p, stats, seq, b), t, static_cast<int>(h), m0, 0, tid);
    if constexpr (FAJIT_STAGES == 2) {
        if (n_tiles > 0)
            load_key_block(p, t, seq, b, h_kv, nb0, 0, tid);
    }
    cp_async_commit();

    float acc[kDqMT][kDqNT][4];
    zero(acc);
    for (int i = 0; i < n_tiles; ++i) {
        const int s = FAJIT_STAGES == 2 ? i % 2 : 0, n0 = nb0 + i * FAJIT_BN;
        if constexpr (FAJIT_STAGES == 1) {
            if (i > 0)
                __syncthreads(); /* every warp is done with the single K/V buffer */
            load_key_block(p, t, seq, b, h_kv, n0, 0, tid);
            cp_async_commit();
        }
        cp_async_wait<0>();
        __syncthreads(); /* tile i landed for all; everyone is past tile i - 1 */
        if constexpr (FAJIT_STAGES == 2) {
            if (i + 1 < n_tiles)
                load_key_block(p, t, seq, b, h_kv, n0 + FAJIT_BN, (i + 1) % 2, tid);
            cp_async_commit();
        }
        const Step st{0, s, n0, m0, tile_needs_mask(n0, m0, seq_k(p, seq), off)};
        sdp_phase<false>(p, t, st, seq, off, hd, warp, lane);
        __syncthreads(); /* dS^T complete */
        dq_phase(acc, t, s, warp, lane);
    }
    cp_async_wait<0>();
    write_dq(p, seq, b, h, m0, acc, warp, lane);
}

/* ---------------------------------------------------------------- pre and post */

/* Threads per row in the pre kernel: a power of two dividing the warp. */
constexpr int kPreLanes = kThreads / FAJIT_BM;
static_assert(FAJIT_OP != kOpPre || (kThreads % FAJIT_BM == 0 && kPreLanes <= 32 && (kPreLanes & (kPreLanes - 1)) == 0),
              "flash_bwd pre: warps * 32 must be bm times a power of two <= 32");

/* dO . O over one 16-byte chunk of each. */
__device__ __forceinline__ float dot_chunk(U4 a, U4 b) {
    return lo_of(a.x) * lo_of(b.x) + hi_of(a.x) * hi_of(b.x) + lo_of(a.y) * lo_of(b.y) + hi_of(a.y) * hi_of(b.y) +
           lo_of(a.z) * lo_of(b.z) + hi_of(a.z) * hi_of(b.z) + lo_of(a.w) * lo_of(b.w) + hi_of(a.w) * hi_of(b.w);
}

__device__ __forceinline__ void flash_bwd_pre(const fajit_bwd_params &p, float *dq_acc, float *stats) {
    const int tid = threadIdx.x;
    const long long b = blockIdx.z, h = blockIdx.y, bh = b * p.nheads_q + h;
    const Seq seq = seq_of(p, b);
    const int r0 = blockIdx.x * FAJIT_BM, row = r0 + tid / kPreLanes, part = tid % kPreLanes;
    float acc = 0.0f;
    if (row < seq_q(p, seq)) {
        const long long at = seq.q_start + row;
        const elem_t *o = static_cast<const elem_t *>(p.o) + b * p.o_stride[0] + at * p.o_stride[1] +
                          h * p.o_stride[2];
        const elem_t *dout = static_cast<const elem_t *>(p.grad_out) + b * p.grad_out_stride[0] +
                             at * p.grad_out_stride[1] + h * p.grad_out_stride[2];
        for (int c = part; c < kLoadV; c += kPreLanes)
            acc += dot_chunk(ld_global_16(dout + c * 8), ld_global_16(o + c * 8));
    }
#pragma unroll
    for (int off = kPreLanes / 2; off > 0; off /= 2)
        acc += __shfl_xor_sync(fajit::kFullWarp, acc, off);
    if (part == 0) {
        float lse2 = pos_infinity(); /* padding rows and rows that see no key: P = 0 */
        if (row < seq_q(p, seq)) {
            const float lse = p.lse[lse_row0(p, seq, b, h) + row];
            if (lse != fajit::neg_infinity())
                lse2 = lse * 1.4426950408889634f;
        }
        lse2_of(stats, p, bh)[row] = lse2;
        d_of(stats, p, bh)[row] = row < seq_q(p, seq) ? acc : 0.0f;
    }
    /* The block's rows of the dQ accumulator (contiguous), when there is one
     * (deterministic mode has none). */
    if (dq_acc != nullptr) {
        float *z = dq_acc_of(dq_acc, p, bh) + static_cast<long long>(r0) * kDqk;
        for (int i = tid; i < FAJIT_BM * kDqk / 4; i += kThreads)
            st_global_16(z + i * 4, U4{0u, 0u, 0u, 0u});
    }
}

__device__ __forceinline__ void flash_bwd_post(const fajit_bwd_params &p, const float *dq_acc) {
    const int tid = threadIdx.x;
    const long long b = blockIdx.z, h = blockIdx.y, bh = b * p.nheads_q + h;
    const Seq seq = seq_of(p, b);
    const int r0 = blockIdx.x * FAJIT_BM;
    const float *src = dq_acc + bh * rows_pad(p) * kDqk;
    elem_t *dst = static_cast<elem_t *>(p.grad_q) + b * p.grad_q_stride[0] + seq.q_start * p.grad_q_stride[1] +
                  h * p.grad_q_stride[2];
    for (int i = tid; i < FAJIT_BM * kLoadQK; i += kThreads) {
        const int row = r0 + i / kLoadQK, c = i % kLoadQK;
        if (row >= seq_q(p, seq))
            break; /* i only grows */
        const float *at = src + dq_at(row, c * 8); /* the row's 8 columns, together */
        const U4 a = ld_global_16(at);
        const U4 e = ld_global_16(at + 4);
        const float sc = p.softmax_scale;
        const U4 out{pack2(__uint_as_float(a.x) * sc, __uint_as_float(a.y) * sc),
                     pack2(__uint_as_float(a.z) * sc, __uint_as_float(a.w) * sc),
                     pack2(__uint_as_float(e.x) * sc, __uint_as_float(e.y) * sc),
                     pack2(__uint_as_float(e.z) * sc, __uint_as_float(e.w) * sc)};
        st_global_16(dst + static_cast<long long>(row) * p.grad_q_stride[1] + c * 8, out);
    }
}

} // namespace fajit_fb

extern "C" __global__ void __launch_bounds__(fajit_fb::kThreads)
    fajit_flash_bwd(const fajit_bwd_params p, float *dq_acc, const float *stats) {
    if constexpr (FAJIT_OP == fajit_fb::kOpBwd) {
        extern __shared__ __attribute__((aligned(128))) unsigned short smem[];
        fajit_fb::flash_bwd_key_major<true>(p, dq_acc, stats, smem);
    }
}

extern "C" __global__ void __launch_bounds__(fajit_fb::kThreads)
    fajit_flash_bwd_dkdv(const fajit_bwd_params p, const float *stats) {
    if constexpr (FAJIT_OP == fajit_fb::kOpDkdv) {
        extern __shared__ __attribute__((aligned(128))) unsigned short smem[];
        fajit_fb::flash_bwd_key_major<false>(p, nullptr, stats, smem);
    }
}

extern "C" __global__ void __launch_bounds__(fajit_fb::kThreads)
    fajit_flash_bwd_dq(const fajit_bwd_params p, const float *stats) {
    if constexpr (FAJIT_OP == fajit_fb::kOpDq) {
        extern __shared__ __attribute__((aligned(128))) unsigned short smem[];
        fajit_fb::flash_bwd_query_major(p, stats, smem);
    }
}

extern "C" __global__ void __launch_bounds__(fajit_fb::kThreads)
    fajit_flash_bwd_pre(const fajit_bwd_params p, float *dq_acc, float *stats) {
    if constexpr (FAJIT_OP == fajit_fb::kOpPre)
        fajit_fb::flash_bwd_pre(p, dq_acc, stats);
}

extern "C" __global__ void __launch_bounds__(fajit_fb::kThreads)
    fajit_flash_bwd_post(const fajit_bwd_params p, const float *dq_acc) {
    if constexpr (FAJIT_OP == fajit_fb::kOpPost)
        fajit_fb::flash_bwd_post(p, dq_acc);
}
