/*
 * templates/reference_bwd.cuh - the reference backward attention: simple,
 * exact and deterministic. Two ops share this file:
 *   ref-dq    (FAJIT_OP 3): kernel fajit_ref_bwd_dq, writes grad_q;
 *   ref-dkdv  (FAJIT_OP 4): kernel fajit_ref_bwd_dkdv, writes grad_k, grad_v.
 * Each variant defines both kernels, the other op's as an empty body, because
 * the prelude's constants cannot choose between extern "C" definitions.
 *
 * What it computes (FlashAttention 2.x backward), for batch b, query head h,
 * its kv head hk = h / (nheads_q / nheads_kv), scale s, and the forward's
 * output O and LSE:
 *
 *   x_ij  = s * q_i . k_j                     for keys j visible to row i
 *   S_ij  = x_ij, or c * tanh(x_ij / c)       (FAJIT_SOFTCAP, c = softcap)
 *           + alibi bias(i, j)                (FAJIT_ALIBI, a constant)
 *   P_ij  = exp(S_ij - lse_i)                 (the undropped softmax)
 *   Z_ij  = 1, or dropout_scale / 0 as fajit::dropout_keep keeps (b, h, i, j)
 *           or drops it                       (FAJIT_DROPOUT: the forward's mask)
 *   D_i   = dO_i . O_i
 *   dS_ij = P_ij * (Z_ij * dO_i . v_j - D_i) * S'_ij,
 *           S'_ij = dS_ij/dx_ij = 1 - tanh^2(x_ij / c) under softcap, else 1
 *   dq_i  = s * sum_j dS_ij k_j
 *   dk_j  = s * sum_{h of hk's group} sum_i dS_ij q_i
 *   dv_j  =     sum_{h of hk's group} sum_i P_ij Z_ij dO_i
 *
 * (D_i = sum_j P_ij Z_ij dO_i . v_j since O is the forward's dropped-out
 * output, so dS is the softmax's gradient with dropout folded in.) Every
 * score, mask and dropout decision is the forward's (reference.cuh) to the
 * bit: visible_keys, softcap_score, alibi_bias and dropout_keep of
 * common.cuh, with the same arguments. A row with LSE -inf (fully masked)
 * contributes nothing and gets dq 0; a key seen by no row gets dk = dv = 0.
 * fp16/bf16 in and out, fp32 for every value and sum, any strides
 * (contiguous last dim), GQA/MQA.
 *
 * Varlen (FAJIT_VARLEN): as the forward, sequence b is packed rows
 * cu_seqlens_q[b] .. of q, o, dO and dq and cu_seqlens_k[b] .. of k, v, dk and
 * dv (batch strides unused, 0); i, j and the lengths above are the sequence's;
 * the grids cover the longest sequence and rows past a sequence's end do
 * nothing; LSE is (nheads_q, total_q).
 *
 * How: one warp per output row, no atomics and no scratch, so every sum is
 * taken in one fixed order and the results are bit-identical across runs.
 *  - ref-dq: a warp per query row i (like the forward reference). Its q and dO
 *    rows sit in shared memory as fp32; the visible keys are visited in steps
 *    of FAJIT_BN, one key per lane, which computes dS for it; then every lane
 *    adds the step's dS_ij k_j into its dq columns lane, lane + 32, ...
 *  - ref-dkdv: a warp per key row j of kv head hk. Its k and v rows sit in
 *    shared memory as fp32; for each query head of the group, the query rows
 *    are visited in steps of FAJIT_BN, one row per lane, which tests whether
 *    the row sees key j (visible_keys, exactly as the forward) and computes P,
 *    D and dS for it; then every lane adds P dO_i and dS q_i into its dv and
 *    dk columns. Rows that do not see j are skipped, never summed as zeros.
 * It is the GPU reference the fast backward is tested against and the fallback
 * for what that one does not cover, so plain correctness beats speed here.
 *
 * Launch (the runtime does exactly this): FAJIT_WARPS * 32 threads, no dynamic
 * shared memory; ref-dq grid (ceil(seqlen_q / FAJIT_BM), nheads_q, batch),
 * ref-dkdv grid (ceil(seqlen_k / FAJIT_BM), nheads_kv, batch). Warp w of a
 * block handles rows w, w + FAJIT_WARPS, ... of the block's FAJIT_BM rows.
 * FAJIT_STAGES is unused. Every index into a tensor is 64-bit.
 */
#include "common.cuh"
#include "bwd_params.h"

namespace fajit_ref_bwd {

/* FAJIT_OP values (enum fajit__op in codegen/variant.h, fixed there). */
constexpr int kOpRefDq = 3;
constexpr int kOpRefDkdv = 4;

} // namespace fajit_ref_bwd

static_assert(FAJIT_OP == fajit_ref_bwd::kOpRefDq || FAJIT_OP == fajit_ref_bwd::kOpRefDkdv,
              "reference_bwd.cuh is the template of ops ref-dq and ref-dkdv");
static_assert(FAJIT_ARCH >= 70, "reference backward: needs sm_70 or newer");
static_assert(FAJIT_STAGES >= 1, "reference backward: stages is unused but must be >= 1");
static_assert(FAJIT_DQK >= 1 && FAJIT_DQK <= 512, "reference backward: dqk must be 1..512");
static_assert(FAJIT_DV >= 1 && FAJIT_DV <= 512, "reference backward: dv must be 1..512");
static_assert(FAJIT_BM >= 1, "reference backward: bm must be >= 1");
static_assert(FAJIT_BN >= 32 && FAJIT_BN % 32 == 0, "reference backward: bn must be a multiple of 32");
static_assert(FAJIT_WARPS >= 1 && FAJIT_WARPS <= 32, "reference backward: warps must be 1..32");
static_assert(FAJIT_PAGED == 0, "reference backward: paged KV is not implemented");

namespace fajit_ref_bwd {

using fajit::kWarpSize;
using elem_t = unsigned short; /* raw fp16 / bf16 bits */

constexpr int kPerLaneStep = FAJIT_BN / kWarpSize;                   /* keys or rows per lane a step */
constexpr int kQkColsPerLane = (FAJIT_DQK + kWarpSize - 1) / kWarpSize; /* dq / dk columns */
constexpr int kVColsPerLane = (FAJIT_DV + kWarpSize - 1) / kWarpSize;   /* dv columns */

/* Per warp: two fp32 rows (dqk and dv long) and two step arrays (bn long). */
static_assert(FAJIT_WARPS * (FAJIT_DQK + FAJIT_DV + 2 * FAJIT_BN) * sizeof(float) <= 48 * 1024,
              "reference backward: static shared memory over 48 KB; lower warps or bn");

__device__ __forceinline__ float load(const elem_t *p) { return fajit::load_as_float<FAJIT_DTYPE>(p); }

/* A row of a (batch, seq, heads, dim) tensor. */
template <typename T>
__device__ __forceinline__ T *row_of(T *base, const long long stride[3], long long b, long long i,
                                     long long h) {
    return base + b * stride[0] + i * stride[1] + h * stride[2];
}

/* x . y for a shared fp32 row x and a global 16-bit row y, in order of d. */
template <int Dim>
__device__ __forceinline__ float dot_shared_global(const float *x, const elem_t *y) {
    float acc = 0.0f;
    for (int d = 0; d < Dim; ++d)
        acc += x[d] * load(y + d);
    return acc;
}

/* x . y for two global 16-bit rows, in order of d. */
template <int Dim>
__device__ __forceinline__ float dot_global(const elem_t *x, const elem_t *y) {
    float acc = 0.0f;
    for (int d = 0; d < Dim; ++d)
        acc += load(x + d) * load(y + d);
    return acc;
}

/* Where one (batch, head)'s sequence lies (common.cuh). */
using Seq = fajit::RefSeq;

__device__ __forceinline__ fajit::KeyRange keys_of(long long row, const Seq &s) {
    return fajit::visible_keys<FAJIT_MASK, FAJIT_WINDOW_LEFT, FAJIT_WINDOW_RIGHT>(row, s.seqlen_q,
                                                                                s.seqlen_k);
}

/* The ALiBi slope of (b, h), 0 without ALiBi. */
__device__ __forceinline__ float slope_of(const fajit_bwd_params &p, long long b, long long h) {
    if constexpr (FAJIT_ALIBI)
        return p.alibi_slopes[b * p.alibi_batch_stride + h];
    else
        return 0.0f;
}

/* A visible key's score as the forward computes it (scaled, softcapped,
 * ALiBi-biased), and the derivative of the score by the scaled dot product. */
struct Score {
    float value; /* S */
    float grad;  /* dS/dx: 1 - tanh^2 under softcap, else 1 */
};

__device__ __forceinline__ Score score_of(const fajit_bwd_params &p, float dot, float alibi_slope,
                                          long long row, long long key, const Seq &s) {
    Score r{p.softmax_scale * dot, 1.0f};
    if constexpr (FAJIT_SOFTCAP) {
        /* softcap_score(x, c) is c * tanhf(x / c): the same expression, so the
         * same value as the forward's, and its tanh for the derivative. */
        const float t = tanhf(r.value / p.softcap);
        r.value = fajit::softcap_score(r.value, p.softcap);
        r.grad = 1.0f - t * t;
    }
    if constexpr (FAJIT_ALIBI)
        r.value += fajit::alibi_bias(alibi_slope, row, key, s.seqlen_q, s.seqlen_k);
    return r;
}

/* Z of (b, h, row, key): dropout_scale where the forward kept the element, 0
 * where it dropped it; 1 without dropout. */
__device__ __forceinline__ float dropout_factor(const fajit_bwd_params &p, long long b, long long h,
                                                long long row, long long key) {
    if constexpr (FAJIT_DROPOUT)
        return fajit::dropout_keep(p.dropout_seed, p.dropout_offset,
                                   fajit::dropout_threshold(p.dropout_p), b, h, p.nheads_q, row, key)
                   ? p.dropout_scale
                   : 0.0f;
    else
        return 1.0f;
}

/* P = exp(score - lse), 0 for a fully masked row (lse -inf), whose exp would
 * otherwise be exp(+inf). */
__device__ __forceinline__ float probability(float score, float lse) {
    return lse == fajit::neg_infinity() ? 0.0f : expf(score - lse);
}

/* Stores `cols` (lane's columns lane, lane + 32, ...) times `factor` into a
 * Dim-long 16-bit row. */
template <int Dim, int Cols>
__device__ __forceinline__ void store_row(elem_t *row, const float (&cols)[Cols], float factor,
                                          int lane) {
#pragma unroll
    for (int c = 0; c < Cols; ++c) {
        const int d = c * kWarpSize + lane;
        if (d < Dim)
            fajit::store_from_float<FAJIT_DTYPE>(row + d, cols[c] * factor);
    }
}

/* acc[c] += weight * row[c * 32 + lane] for the lane's columns. */
template <int Dim, int Cols>
__device__ __forceinline__ void add_scaled_row(float (&acc)[Cols], float weight, const elem_t *row,
                                               int lane) {
#pragma unroll
    for (int c = 0; c < Cols; ++c) {
        const int d = c * kWarpSize + lane;
        if (d < Dim)
            acc[c] += weight * load(row + d);
    }
}

/* ---------------------------------------------------------------- ref-dq */

/* dq for one query row of sequence s, computed by the whole warp. */
__device__ void dq_row(const fajit_bwd_params &p, long long b, long long h, long long row,
                       const Seq &s, float *q_shared, float *do_shared, float *ds_shared, int lane) {
    const long long h_kv = h / (p.nheads_q / p.nheads_kv);
    const long long packed_row = s.q_start + row;
    const elem_t *q_row = row_of(static_cast<const elem_t *>(p.q), p.q_stride, b, packed_row, h);
    const elem_t *o_row = row_of(static_cast<const elem_t *>(p.o), p.o_stride, b, packed_row, h);
    const elem_t *do_row =
        row_of(static_cast<const elem_t *>(p.grad_out), p.grad_out_stride, b, packed_row, h);
    const elem_t *k_head = row_of(static_cast<const elem_t *>(p.k), p.k_stride, b, s.k_start, h_kv);
    const elem_t *v_head = row_of(static_cast<const elem_t *>(p.v), p.v_stride, b, s.k_start, h_kv);
    elem_t *dq_row_out = row_of(static_cast<elem_t *>(p.grad_q), p.grad_q_stride, b, packed_row, h);
    const float lse = p.lse[s.lse_base + row];
    const float slope = slope_of(p, b, h);

    /* D = dO . O: lane partial sums, then the butterfly (same order every run). */
    float d_part = 0.0f;
    for (int d = lane; d < FAJIT_DQK; d += kWarpSize)
        q_shared[d] = load(q_row + d);
    for (int d = lane; d < FAJIT_DV; d += kWarpSize) {
        const float g = load(do_row + d);
        do_shared[d] = g;
        d_part += g * load(o_row + d);
    }
    const float row_d = fajit::warp_sum(d_part);
    __syncwarp();

    const fajit::KeyRange keys = keys_of(row, s);
    float acc[kQkColsPerLane];
#pragma unroll
    for (int c = 0; c < kQkColsPerLane; ++c)
        acc[c] = 0.0f;

    for (long long start = keys.begin; start < keys.end; start += FAJIT_BN) {
#pragma unroll
        for (int t = 0; t < kPerLaneStep; ++t) {
            const long long key = start + t * kWarpSize + lane;
            float ds = 0.0f;
            if (key < keys.end) {
                const Score sc = score_of(
                    p, dot_shared_global<FAJIT_DQK>(q_shared, k_head + key * p.k_stride[1]), slope,
                    row, key, s);
                const float dp = dot_shared_global<FAJIT_DV>(do_shared, v_head + key * p.v_stride[1]);
                ds = probability(sc.value, lse) * (dropout_factor(p, b, h, row, key) * dp - row_d) *
                     sc.grad;
            }
            ds_shared[t * kWarpSize + lane] = ds;
        }
        __syncwarp(); /* ds_shared complete */

        const long long left = keys.end - start;
        const int step_keys = left < FAJIT_BN ? static_cast<int>(left) : FAJIT_BN;
        for (int j = 0; j < step_keys; ++j)
            add_scaled_row<FAJIT_DQK>(acc, ds_shared[j], k_head + (start + j) * p.k_stride[1], lane);
        __syncwarp(); /* ds_shared read by all lanes before the next step */
    }
    store_row<FAJIT_DQK>(dq_row_out, acc, p.softmax_scale, lane);
    __syncwarp(); /* q_shared, do_shared read by all lanes before the next row */
}

/* ---------------------------------------------------------------- ref-dkdv */

/* Accumulators of one key row's gradients, the lane's columns. */
struct KeyGrads {
    float dk[kQkColsPerLane];
    float dv[kVColsPerLane];
};

/* One query head's view of a key row: the head, its sequence and ALiBi slope. */
struct HeadView {
    long long b, h;
    Seq s;
    float slope;
};

/* The weight of dO_i in dv_j (P Z) and dS of one query row against key j, for
 * the lane that owns the row: both 0 when the row does not see j (visible
 * reports which). */
__device__ __forceinline__ void row_against_key(const fajit_bwd_params &p, const HeadView &hv,
                                                long long row, long long key, const float *k_shared,
                                                const float *v_shared, float &dv_weight, float &ds,
                                                bool &visible) {
    dv_weight = ds = 0.0f;
    visible = false;
    if (row >= hv.s.seqlen_q)
        return;
    const fajit::KeyRange keys = keys_of(row, hv.s);
    if (key < keys.begin || key >= keys.end)
        return;
    const long long packed_row = hv.s.q_start + row;
    const float lse = p.lse[hv.s.lse_base + row];
    const elem_t *q_row = row_of(static_cast<const elem_t *>(p.q), p.q_stride, hv.b, packed_row, hv.h);
    const elem_t *o_row = row_of(static_cast<const elem_t *>(p.o), p.o_stride, hv.b, packed_row, hv.h);
    const elem_t *do_row =
        row_of(static_cast<const elem_t *>(p.grad_out), p.grad_out_stride, hv.b, packed_row, hv.h);
    const Score sc = score_of(p, dot_shared_global<FAJIT_DQK>(k_shared, q_row), hv.slope, row, key, hv.s);
    const float dp = dot_shared_global<FAJIT_DV>(v_shared, do_row);
    const float row_d = dot_global<FAJIT_DV>(do_row, o_row);
    const float prob = probability(sc.value, lse);
    const float z = dropout_factor(p, hv.b, hv.h, row, key);
    dv_weight = prob * z;
    ds = prob * (z * dp - row_d) * sc.grad;
    visible = lse != fajit::neg_infinity();
}

/* Adds query head hv.h's contributions to key row `key`'s gradients. */
__device__ void dkdv_from_head(const fajit_bwd_params &p, const HeadView &hv, long long key,
                               const float *k_shared, const float *v_shared, float *p_shared,
                               float *ds_shared, KeyGrads &g, int lane) {
    for (long long start = 0; start < hv.s.seqlen_q; start += FAJIT_BN) {
        bool any = false;
#pragma unroll
        for (int t = 0; t < kPerLaneStep; ++t) {
            float weight, ds;
            bool visible;
            row_against_key(p, hv, start + t * kWarpSize + lane, key, k_shared, v_shared, weight, ds,
                            visible);
            /* -0.0f marks a row that does not see the key (skipped below); a
             * seen one's weight is >= +0 (a dropped element's is +0). */
            p_shared[t * kWarpSize + lane] = visible ? weight : -0.0f;
            ds_shared[t * kWarpSize + lane] = ds;
            any |= visible;
        }
        if (!__any_sync(fajit::kFullWarp, any))
            continue; /* no row of this step sees the key */
        __syncwarp(); /* p_shared, ds_shared complete */

        const long long left = hv.s.seqlen_q - start;
        const int step_rows = left < FAJIT_BN ? static_cast<int>(left) : FAJIT_BN;
        for (int r = 0; r < step_rows; ++r) {
            const float weight = p_shared[r];
            if (__float_as_uint(weight) == 0x80000000u)
                continue; /* invisible: the same test in every lane */
            const long long packed_row = hv.s.q_start + start + r;
            add_scaled_row<FAJIT_DV>(
                g.dv, weight,
                row_of(static_cast<const elem_t *>(p.grad_out), p.grad_out_stride, hv.b, packed_row, hv.h),
                lane);
            add_scaled_row<FAJIT_DQK>(
                g.dk, ds_shared[r],
                row_of(static_cast<const elem_t *>(p.q), p.q_stride, hv.b, packed_row, hv.h), lane);
        }
        __syncwarp(); /* the step's arrays read by all lanes before the next step */
    }
}

/* dk and dv for one key row of kv head h_kv (of sequence b), computed by the
 * whole warp. */
__device__ void dkdv_row(const fajit_bwd_params &p, long long b, long long h_kv, long long key,
                         float *k_shared, float *v_shared, float *p_shared, float *ds_shared,
                         int lane) {
    const long long group = p.nheads_q / p.nheads_kv;
    const long long packed_key = fajit::ref_sequence_of(p, b, 0).k_start + key;
    const elem_t *k_row = row_of(static_cast<const elem_t *>(p.k), p.k_stride, b, packed_key, h_kv);
    const elem_t *v_row = row_of(static_cast<const elem_t *>(p.v), p.v_stride, b, packed_key, h_kv);
    for (int d = lane; d < FAJIT_DQK; d += kWarpSize)
        k_shared[d] = load(k_row + d);
    for (int d = lane; d < FAJIT_DV; d += kWarpSize)
        v_shared[d] = load(v_row + d);
    __syncwarp();

    KeyGrads g;
#pragma unroll
    for (int c = 0; c < kQkColsPerLane; ++c)
        g.dk[c] = 0.0f;
#pragma unroll
    for (int c = 0; c < kVColsPerLane; ++c)
        g.dv[c] = 0.0f;
    for (long long h = h_kv * group; h < (h_kv + 1) * group; ++h) {
        const HeadView hv{b, h, fajit::ref_sequence_of(p, b, h), slope_of(p, b, h)};
        dkdv_from_head(p, hv, key, k_shared, v_shared, p_shared, ds_shared, g, lane);
    }

    store_row<FAJIT_DQK>(row_of(static_cast<elem_t *>(p.grad_k), p.grad_k_stride, b, packed_key, h_kv),
                         g.dk, p.softmax_scale, lane);
    store_row<FAJIT_DV>(row_of(static_cast<elem_t *>(p.grad_v), p.grad_v_stride, b, packed_key, h_kv),
                        g.dv, 1.0f, lane);
    __syncwarp(); /* k_shared, v_shared read by all lanes before the next row */
}

} // namespace fajit_ref_bwd

extern "C" __global__ void __launch_bounds__(FAJIT_WARPS * 32) fajit_ref_bwd_dq(const fajit_bwd_params p) {
    if constexpr (FAJIT_OP == fajit_ref_bwd::kOpRefDq) {
        __shared__ float q_rows[FAJIT_WARPS][FAJIT_DQK];
        __shared__ float do_rows[FAJIT_WARPS][FAJIT_DV];
        __shared__ float ds[FAJIT_WARPS][FAJIT_BN];
        const int warp = threadIdx.x / fajit::kWarpSize;
        const int lane = threadIdx.x % fajit::kWarpSize;
        const long long b = blockIdx.z;
        const long long h = blockIdx.y;
        const fajit_ref_bwd::Seq s = fajit::ref_sequence_of(p, b, h);
        for (int r = warp; r < FAJIT_BM; r += FAJIT_WARPS) {
            const long long row = static_cast<long long>(blockIdx.x) * FAJIT_BM + r;
            if (row >= s.seqlen_q || row >= p.seqlen_q)
                break;
            fajit_ref_bwd::dq_row(p, b, h, row, s, q_rows[warp], do_rows[warp], ds[warp], lane);
        }
    }
}

extern "C" __global__ void __launch_bounds__(FAJIT_WARPS * 32) fajit_ref_bwd_dkdv(const fajit_bwd_params p) {
    if constexpr (FAJIT_OP == fajit_ref_bwd::kOpRefDkdv) {
        __shared__ float k_rows[FAJIT_WARPS][FAJIT_DQK];
        __shared__ float v_rows[FAJIT_WARPS][FAJIT_DV];
        __shared__ float probs[FAJIT_WARPS][FAJIT_BN];
        __shared__ float ds[FAJIT_WARPS][FAJIT_BN];
        const int warp = threadIdx.x / fajit::kWarpSize;
        const int lane = threadIdx.x % fajit::kWarpSize;
        const long long b = blockIdx.z;
        const long long h_kv = blockIdx.y;
        const long long seqlen_k = fajit::ref_sequence_of(p, b, 0).seqlen_k;
        for (int r = warp; r < FAJIT_BM; r += FAJIT_WARPS) {
            const long long key = static_cast<long long>(blockIdx.x) * FAJIT_BM + r;
            if (key >= seqlen_k || key >= p.seqlen_k)
                break;
            fajit_ref_bwd::dkdv_row(p, b, h_kv, key, k_rows[warp], v_rows[warp], probs[warp], ds[warp],
                                    lane);
        }
    }
}
