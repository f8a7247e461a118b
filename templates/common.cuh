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

} // namespace fajit

#endif
