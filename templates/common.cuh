/*
 * templates/common.cuh - device helpers shared by the kernels.
 *
 * Compiled by NVRTC with no include path, so nothing here may include a system
 * or CUDA header: fp16/bf16 values are carried as their raw 16 bits in an
 * unsigned short and converted by the functions below. The renderer prepends
 * the FAJIT_* constants (FAJIT_DTYPE among them) before this file.
 */
#ifndef FAJIT_COMMON_CUH
#define FAJIT_COMMON_CUH

namespace fajit {

/* FAJIT_DTYPE values (enum fajit_dtype in fajit.h). */
constexpr int kDtypeFp16 = 0;
constexpr int kDtypeBf16 = 1;

/* FAJIT_MASK values (enum fajit_mask in fajit.h). */
constexpr int kMaskNone = 0;
constexpr int kMaskCausal = 1;   /* aligned to the bottom-right corner */
constexpr int kMaskCausalTL = 2; /* aligned to the top-left corner */

constexpr int kWarpSize = 32;
constexpr unsigned kFullWarp = 0xffffffffu;

/* No <math.h> constants without headers: build them from their bits. */
__device__ __forceinline__ float neg_infinity() { return __int_as_float(0xff800000); }

/* ---------------------------------------------------------------- conversions */

__device__ __forceinline__ float fp16_to_float(unsigned short h) {
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
    return f;
}

/* Round to nearest even; NaN and infinities kept. */
__device__ __forceinline__ unsigned short float_to_fp16(float f) {
    unsigned short h;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f));
    return h;
}

/* bf16 is the top half of an fp32, so widening is exact. */
__device__ __forceinline__ float bf16_to_float(unsigned short b) {
    return __uint_as_float(static_cast<unsigned>(b) << 16);
}

/* Round to nearest even. A NaN stays a NaN (its quiet bit set, so dropping
 * the low mantissa bits cannot turn it into an infinity). */
__device__ __forceinline__ unsigned short float_to_bf16(float f) {
    unsigned u = __float_as_uint(f);
    if ((u & 0x7fffffffu) > 0x7f800000u)
        return static_cast<unsigned short>((u >> 16) | 0x0040u);
    u += 0x7fffu + ((u >> 16) & 1u);
    return static_cast<unsigned short>(u >> 16);
}

template <int Dtype>
__device__ __forceinline__ float load_as_float(const unsigned short *p) {
    static_assert(Dtype == kDtypeFp16 || Dtype == kDtypeBf16, "dtype must be fp16 or bf16");
    if constexpr (Dtype == kDtypeFp16)
        return fp16_to_float(*p);
    else
        return bf16_to_float(*p);
}

template <int Dtype>
__device__ __forceinline__ void store_from_float(unsigned short *p, float f) {
    static_assert(Dtype == kDtypeFp16 || Dtype == kDtypeBf16, "dtype must be fp16 or bf16");
    if constexpr (Dtype == kDtypeFp16)
        *p = float_to_fp16(f);
    else
        *p = float_to_bf16(f);
}

/* ---------------------------------------------------------------- warp reductions */

/* Butterfly reductions: every lane ends with the same, bitwise identical value
 * (each step combines the same two operands on both partners). */
__device__ __forceinline__ float warp_max(float x) {
    for (int offset = kWarpSize / 2; offset > 0; offset /= 2)
        x = fmaxf(x, __shfl_xor_sync(kFullWarp, x, offset));
    return x;
}

__device__ __forceinline__ float warp_sum(float x) {
    for (int offset = kWarpSize / 2; offset > 0; offset /= 2)
        x += __shfl_xor_sync(kFullWarp, x, offset);
    return x;
}

/* ---------------------------------------------------------------- masks */

/* The keys a query row may attend to form one interval [begin, end): the causal
 * mask and the local window each bound it on one side. */
struct KeyRange {
    long long begin, end;
};

/*
 * Visible keys of query row `row` (FlashAttention 2.x semantics). The mask's
 * diagonal is key row + seqlen_k - seqlen_q (bottom-right alignment, also used
 * by the window when there is no causal mask) or key row (top-left):
 *   causal:        key <= diagonal
 *   window left:   key >= diagonal - WindowLeft   (when WindowLeft >= 0)
 *   window right:  key <= diagonal + WindowRight  (when WindowRight >= 0)
 * An empty range (end <= begin) is a fully masked row.
 */
template <int Mask, int WindowLeft, int WindowRight>
__device__ __forceinline__ KeyRange visible_keys(long long row, long long seqlen_q,
                                                 long long seqlen_k) {
    static_assert(Mask == kMaskNone || Mask == kMaskCausal || Mask == kMaskCausalTL,
                  "mask must be none, causal or causal-tl");
    const long long diagonal = Mask == kMaskCausalTL ? row : row + seqlen_k - seqlen_q;
    KeyRange r{0, seqlen_k};
    if constexpr (Mask != kMaskNone)
        r.end = diagonal + 1 < r.end ? diagonal + 1 : r.end;
    if constexpr (WindowLeft >= 0)
        r.begin = diagonal - WindowLeft > r.begin ? diagonal - WindowLeft : r.begin;
    if constexpr (WindowRight >= 0)
        r.end = diagonal + WindowRight + 1 < r.end ? diagonal + WindowRight + 1 : r.end;
    return r;
}

/* ---------------------------------------------------------------- dropout RNG */

/*
 * Philox-4x32-10 (Salmon et al., "Parallel random numbers: as easy as 1, 2, 3",
 * SC 2011), written from the published algorithm: 10 rounds over a 128-bit
 * counter c0..c3 with a 64-bit key k0, k1; each round
 *     (hi0, lo0) = 0xD2511F53 * c0,  (hi1, lo1) = 0xCD9E8D57 * c2   (32x32 -> 64)
 *     c = {hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0}
 * and the key is bumped by the Weyl constants (0x9E3779B9, 0xBB67AE85) between
 * rounds. tests/gpu/philox.h is the host copy; tests/test_philox.c checks it
 * against Random123's known answers.
 */
struct Philox4 {
    unsigned x, y, z, w;
};

__device__ __forceinline__ Philox4 philox4x32_10(Philox4 c, unsigned k0, unsigned k1) {
#pragma unroll
    for (int round = 0; round < 10; ++round) {
        if (round > 0) {
            k0 += 0x9E3779B9u;
            k1 += 0xBB67AE85u;
        }
        const unsigned hi0 = __umulhi(0xD2511F53u, c.x), lo0 = 0xD2511F53u * c.x;
        const unsigned hi1 = __umulhi(0xCD9E8D57u, c.z), lo1 = 0xCD9E8D57u * c.z;
        c = Philox4{hi1 ^ c.y ^ k0, lo1, hi0 ^ c.w ^ k1, lo0};
    }
    return c;
}

/*
 * The dropout stream. Element (b, h, i, j) -- batch b, query head h, query row
 * i, key column j; under varlen b is the sequence and i, j the row and column
 * WITHIN it -- takes word (j & 3) of
 *
 *     philox4x32_10(counter, key)
 *     key     = {lo32(seed), hi32(seed)}
 *     counter = {j >> 2, i, lo32(T), hi32(T)},
 *               T = offset + ((b * nheads_q + h) << 32)   (mod 2^64)
 *
 * so one Philox call gives four consecutive keys 4m..4m+3 of a row. Distinct
 * (b, h, i, j >> 2) never share a counter within a call, and two calls with the
 * same seed whose offsets differ by 1 .. 2^32 - 1 draw disjoint counters.
 *
 * Keep decision: keep = (word >= threshold), threshold = the u32 nearest to
 * p * 2^32 (round half to even; p < 1 keeps it below 2^32), so a key is kept
 * with probability 1 - threshold / 2^32 ~ 1 - p; kept probabilities are
 * multiplied by dropout_scale = 1 / (1 - p), dropped ones become 0.
 */
__device__ __forceinline__ unsigned dropout_threshold(float p) {
    return __float2uint_rn(p * 4294967296.0f); /* exact scaling, then round */
}

/* The high half of the counter of (b, h)'s stream (kernels that walk one
 * head compute it once). */
__device__ __forceinline__ unsigned long long dropout_stream(unsigned long long offset, long long b,
                                                             long long h, long long nheads_q) {
    return offset + (static_cast<unsigned long long>(b * nheads_q + h) << 32);
}

/* Philox words for key group g (keys 4 g .. 4 g + 3) of row i in stream t. */
__device__ __forceinline__ Philox4 dropout_words_at(unsigned long long seed, unsigned long long t,
                                                    unsigned g, unsigned i) {
    const Philox4 c{g, i, static_cast<unsigned>(t), static_cast<unsigned>(t >> 32)};
    return philox4x32_10(c, static_cast<unsigned>(seed), static_cast<unsigned>(seed >> 32));
}

/* Philox words for keys 4 * (j >> 2) .. + 3 of row i of (b, h). */
__device__ __forceinline__ Philox4 dropout_words(unsigned long long seed,
                                                 unsigned long long offset, long long b,
                                                 long long h, long long nheads_q, long long i,
                                                 long long j) {
    return dropout_words_at(seed, dropout_stream(offset, b, h, nheads_q),
                            static_cast<unsigned>(static_cast<unsigned long long>(j) >> 2),
                            static_cast<unsigned>(i));
}

/* Word (j & 3) of a dropout_words result. */
__device__ __forceinline__ unsigned dropout_word(const Philox4 &r, long long j) {
    const int k = static_cast<int>(j & 3);
    return k == 0 ? r.x : k == 1 ? r.y : k == 2 ? r.z : r.w;
}

/* Whether element (b, h, i, j) is kept (see the formula above). */
__device__ __forceinline__ bool dropout_keep(unsigned long long seed, unsigned long long offset,
                                             unsigned threshold, long long b, long long h,
                                             long long nheads_q, long long i, long long j) {
    return dropout_word(dropout_words(seed, offset, b, h, nheads_q, i, j), j) >= threshold;
}

/* ---------------------------------------------------------------- sequences */

/* A (batch, head)'s sequence as the tensor-core kernels see it: its lengths
 * and, under varlen (FAJIT_VARLEN), where its rows start in the packed tensors
 * (sequence b is rows cu_seqlens_q[b] .. of the query-side tensors and
 * cu_seqlens_k[b] .. of the key-side ones; batch strides are 0); dense: batch
 * b, starts 0, the launch's lengths. Params is fajit_fwd_params or
 * fajit_bwd_params (the same field names). */
struct Seq {
    int sq, sk;                 /* query and key rows of this sequence */
    long long q_start, k_start; /* varlen: first packed row of the sequence */
};

template <typename Params>
__device__ __forceinline__ Seq seq_of(const Params &p, long long b) {
    Seq s;
    if constexpr (FAJIT_VARLEN) {
        s.q_start = p.cu_seqlens_q[b];
        s.k_start = p.cu_seqlens_k[b];
        s.sq = static_cast<int>(p.cu_seqlens_q[b + 1] - s.q_start);
        s.sk = static_cast<int>(p.cu_seqlens_k[b + 1] - s.k_start);
    } else {
        s.q_start = s.k_start = 0;
        s.sq = p.seqlen_q;
        s.sk = p.seqlen_k;
    }
    return s;
}

/* The sequence's lengths: read from p where dense, so the plain kernels read
 * their constant bank (a copy in a register changes their code). */
template <typename Params>
__device__ __forceinline__ int seq_q(const Params &p, const Seq &s) {
    return FAJIT_VARLEN ? s.sq : p.seqlen_q;
}
template <typename Params>
__device__ __forceinline__ int seq_k(const Params &p, const Seq &s) {
    return FAJIT_VARLEN ? s.sk : p.seqlen_k;
}

/* The reference kernels' view of the same: 64-bit lengths and the LSE index
 * of row 0 (LSE is (batch, nheads_q, seqlen_q), or (nheads_q, total_q) under
 * varlen). */
struct RefSeq {
    long long q_start, k_start; /* first packed row (varlen), else 0 */
    long long seqlen_q, seqlen_k;
    long long lse_base; /* LSE index of row 0 */
};

template <typename Params>
__device__ __forceinline__ RefSeq ref_sequence_of(const Params &p, long long b, long long h) {
    RefSeq s;
    if constexpr (FAJIT_VARLEN) {
        s.q_start = p.cu_seqlens_q[b];
        s.k_start = p.cu_seqlens_k[b];
        s.seqlen_q = p.cu_seqlens_q[b + 1] - s.q_start;
        s.seqlen_k = p.cu_seqlens_k[b + 1] - s.k_start;
        s.lse_base = h * static_cast<long long>(p.cu_seqlens_q[p.batch]) + s.q_start;
    } else {
        s.q_start = s.k_start = 0;
        s.seqlen_q = p.seqlen_q;
        s.seqlen_k = p.seqlen_k;
        s.lse_base = (b * p.nheads_q + h) * p.seqlen_q;
    }
    return s;
}

/* ---------------------------------------------------------------- score modifiers */

/* Softcap (FlashAttention 2.6): an already scaled score s becomes cap * tanh(s / cap). */
__device__ __forceinline__ float softcap_score(float s, float cap) {
    return cap * tanhf(s / cap);
}

/* ALiBi bias of (row i, key j): -slope * |i + seqlen_k - seqlen_q - j|, the same
 * for every mask (where a causal mask lets j be seen it equals FlashAttention's
 * causal form slope * (j - i - seqlen_k + seqlen_q)). */
__device__ __forceinline__ float alibi_bias(float slope, long long i, long long j,
                                            long long seqlen_q, long long seqlen_k) {
    long long d = i + seqlen_k - seqlen_q - j;
    d = d < 0 ? -d : d;
    return -slope * static_cast<float>(d);
}

/*
 * Blocks along a sequence that differ in work under a causal mask (a query
 * block sees keys up to its diagonal, a key block queries from its
 * diagonal on). The GPU starts blocks in linear order (x fastest), so a grid
 * of (blocks, heads, batch) leaves the heaviest block of the last heads to
 * start near the end and run on alone (a tail of up to a whole heavy block).
 * This maps the linear index of block (bx, by, bz) so that the heavier half
 * of every (y, z)'s x blocks starts before any lighter half, each half head
 * by head (blocks that run together still share a few heads' inputs in L2):
 * rank 0 .. ceil(nx / 2) - 1 are the heavier half in order, the rest the
 * lighter; the caller says which x is the rank-th heaviest.
 */
struct BlockSlot {
    unsigned rank, y, z;
};

__device__ __forceinline__ BlockSlot heavy_halves_first(unsigned bx, unsigned by, unsigned bz) {
    /* 32-bit arithmetic (64-bit divisions cost registers the kernels' loops
     * need); a grid of 2^31 blocks or more keeps the natural order. */
    const unsigned nx = gridDim.x, ny = gridDim.y, nz = gridDim.z;
    if (static_cast<unsigned long long>(nx) * ny * nz >= (1ull << 31))
        return BlockSlot{bx, by, bz};
    unsigned at = bx + nx * (by + ny * bz);
    const unsigned heads = ny * nz, heavy = (nx + 1) / 2; /* blocks in a head's heavier half */
    unsigned head, rank;
    if (at < heads * heavy) {
        head = at / heavy;
        rank = at % heavy;
    } else {
        at -= heads * heavy;
        head = at / (nx - heavy);
        rank = heavy + at % (nx - heavy);
    }
    return BlockSlot{rank, head % ny, head / ny};
}

} // namespace fajit

#endif
