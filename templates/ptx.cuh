/*
 * templates/ptx.cuh - the PTX the tensor-core kernels (flash_fwd.cuh,
 * flash_bwd.cuh) share: cp.async copies, ldmatrix, mma.sync m16n8k16 with
 * fp32 accumulation, packing to and from fp16/bf16 pairs, ex2. Written as
 * inline asm because NVRTC compiles without the CUDA headers. The dtype
 * (FAJIT_DTYPE) picks the mma and cvt forms; nothing here depends on a tile
 * shape.
 */
#ifndef FAJIT_PTX_CUH
#define FAJIT_PTX_CUH

#include "common.cuh"

namespace fajit_ptx {

__device__ __forceinline__ int imin(int a, int b) { return a < b ? a : b; }
__device__ __forceinline__ int imax(int a, int b) { return a > b ? a : b; }

__device__ __forceinline__ unsigned smem_addr(const void *p) {
    unsigned a;
    asm("{ .reg .u64 t; cvta.to.shared.u64 t, %1; cvt.u32.u64 %0, t; }" : "=r"(a) : "l"(p));
    return a;
}

/* 16 bytes global -> shared, bypassing L1; zero-filled when !valid. */
__device__ __forceinline__ void cp_async_16(unsigned dst, const void *src, bool valid) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src),
                 "r"(valid ? 16 : 0)
                 : "memory");
}

/* Bytes = 4 or 8 global -> shared through L1 (.cg takes only 16); zero-filled
 * when !valid. */
template <int Bytes>
__device__ __forceinline__ void cp_async_small(unsigned dst, const void *src, bool valid) {
    static_assert(Bytes == 4 || Bytes == 8, "cp.async.ca moves 4, 8 or 16 bytes");
    asm volatile("cp.async.ca.shared.global [%0], [%1], %2, %3;\n" ::"r"(dst), "l"(src), "n"(Bytes),
                 "r"(valid ? Bytes : 0)
                 : "memory");
}

__device__ __forceinline__ void st_shared_u32(unsigned dst, unsigned x) {
    asm volatile("st.shared.u32 [%0], %1;\n" ::"r"(dst), "r"(x) : "memory");
}

__device__ __forceinline__ uint4 ld_shared_v4(unsigned src) {
    uint4 v;
    asm volatile("ld.shared.v4.u32 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
                 : "r"(src)
                 : "memory");
    return v;
}

__device__ __forceinline__ void st_shared_u16(unsigned dst, unsigned short x) {
    asm volatile("st.shared.u16 [%0], %1;\n" ::"r"(dst), "h"(x));
}

__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }

template <int N>
__device__ __forceinline__ void cp_async_wait() {
    asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

__device__ __forceinline__ void ldmatrix_x4(unsigned addr, unsigned (&r)[4]) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(addr));
}

__device__ __forceinline__ void ldmatrix_x4_trans(unsigned addr, unsigned (&r)[4]) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(addr));
}

__device__ __forceinline__ void ldmatrix_x2(unsigned addr, unsigned &r0, unsigned &r1) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x2.shared.b16 {%0, %1}, [%2];\n"
                 : "=r"(r0), "=r"(r1)
                 : "r"(addr));
}

__device__ __forceinline__ void ldmatrix_x2_trans(unsigned addr, unsigned &r0, unsigned &r1) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x2.trans.shared.b16 {%0, %1}, [%2];\n"
                 : "=r"(r0), "=r"(r1)
                 : "r"(addr));
}

/* d += a * b, m16n8k16, row.col, fp32 accumulate. */
__device__ __forceinline__ void mma(float (&d)[4], const unsigned (&a)[4], unsigned b0, unsigned b1) {
    if constexpr (FAJIT_DTYPE == fajit::kDtypeFp16)
        asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, "
            "{%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
            : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
            : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
    else
        asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, "
            "{%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
            : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
            : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

/* Two floats as one register of two 16-bit values, lo in the low half. */
__device__ __forceinline__ unsigned pack2(float lo, float hi) {
    unsigned r;
    if constexpr (FAJIT_DTYPE == fajit::kDtypeFp16)
        asm("cvt.rn.f16x2.f32 %0, %1, %2;\n" : "=r"(r) : "f"(hi), "f"(lo));
    else
        asm("cvt.rn.bf16x2.f32 %0, %1, %2;\n" : "=r"(r) : "f"(hi), "f"(lo));
    return r;
}

/* The two 16-bit values of a register as floats (bf16: the top half of an fp32). */
__device__ __forceinline__ float lo_of(unsigned x) {
    if constexpr (FAJIT_DTYPE == fajit::kDtypeFp16)
        return fajit::fp16_to_float(static_cast<unsigned short>(x & 0xffffu));
    else
        return __uint_as_float(x << 16);
}
__device__ __forceinline__ float hi_of(unsigned x) {
    if constexpr (FAJIT_DTYPE == fajit::kDtypeFp16)
        return fajit::fp16_to_float(static_cast<unsigned short>(x >> 16));
    else
        return __uint_as_float(x & 0xffff0000u);
}

__device__ __forceinline__ float fast_exp2(float x) {
    float y;
    asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
    return y;
}

/* Rows x Vecs vectors of Width 16-bit elements (Width 8: 16 bytes by
 * cp.async.cg; 4 or 2: 8 or 4 bytes by cp.async.ca) from global rows first..
 * of src (row stride `stride` elements) into shared memory at at(r, c), the
 * byte address of row r's vector c; rows at or past `valid` are zero-filled.
 * Threads as (Threads / Vecs) rows of Vecs vector columns (the leftover
 * threads of a count that does not divide Threads copy nothing), each
 * copying its column every kRowStep-th row: a fixed trip count, unrolled
 * whole, one pointer a thread; a tile whose rows are all in range (a
 * block-uniform test: every tile but a sequence's last) has no per-row
 * selects. The forward's and the backward's tile loads. */
template <int Threads, int Rows, int Vecs, int Width, typename At>
__device__ __forceinline__ void load_rows(const unsigned short *src, long long stride, int first, int valid,
                                          int tid, At at) {
    static_assert(Vecs <= Threads, "load_rows: a row's vectors outnumber the threads");
    static_assert(Width == 8 || Width == 4 || Width == 2, "load_rows: 16, 8 or 4 bytes a vector");
    constexpr int kRowStep = Threads / Vecs;
    constexpr int kSteps = (Rows + kRowStep - 1) / kRowStep;
    constexpr bool kWhole = Rows % kRowStep == 0; /* no step past Rows */
    const int c = tid % Vecs, r0 = tid / Vecs;
    if (Threads % Vecs != 0 && r0 >= kRowStep)
        return;
    auto copy = [&](int r, const unsigned short *from, bool ok) {
        if constexpr (Width == 8)
            cp_async_16(at(r, c), from, ok);
        else
            cp_async_small<Width * 2>(at(r, c), from, ok);
    };
    const unsigned short *g = src + static_cast<long long>(first + r0) * stride + c * Width;
    if (first + Rows <= valid) {
#pragma unroll
        for (int k = 0; k < kSteps; ++k) {
            const int r = r0 + k * kRowStep;
            if (kWhole || r < Rows)
                copy(r, g, true);
            g += kRowStep * stride;
        }
        return;
    }
#pragma unroll
    for (int k = 0; k < kSteps; ++k) {
        const int r = r0 + k * kRowStep;
        const bool ok = first + r < valid;
        if (kWhole || r < Rows)
            copy(r, ok ? g : src, ok);
        g += kRowStep * stride;
    }
}

} // namespace fajit_ptx

#endif
