/*
 * templates/reference.cuh - the reference forward attention: simple and exact.
 *
 * What it computes, for every batch b, query head h and query row i:
 *
 *   s_j   = softmax_scale * (q[b,i,h,:] . k[b,j,hk,:])        for visible keys j
 *   s_j   = softcap * tanh(s_j / softcap)                    (FAJIT_SOFTCAP)
 *   s_j  += -slope[b,h] * |i + seqlen_k - seqlen_q - j|      (FAJIT_ALIBI)
 *   o     = sum_j d_j exp(s_j - m) v[b,j,hk,:] / l,   m = max_j s_j,  l = sum_j exp(s_j - m)
 *   lse   = m + log(l)                                       (natural log)
 *
 * with hk = h / (nheads_q / nheads_kv) (GQA/MQA), following FlashAttention 2.x:
 * layout (batch, seqlen, nheads, headdim) with any batch/seq/head strides (in
 * elements) and a contiguous last dimension; fp16 or bf16 in and out, fp32 for
 * every sum. Visible keys are those of visible_keys() in common.cuh (causal
 * bottom-right or top-left, local window). A row with no visible key (fully
 * masked, or seqlen_k == 0) gets output 0 and LSE -inf. LSE is written to
 * lse[(b * nheads_q + h) * seqlen_q + i] when p.lse is not NULL.
 *
 * d_j is 1 without dropout; with FAJIT_DROPOUT it is dropout_scale when
 * fajit::dropout_keep() keeps (b, h, i, j), else 0 (the Philox formula is in
 * common.cuh). l and the LSE are those of the undropped softmax, as in
 * FlashAttention. slope[b,h] = alibi_slopes[b * alibi_batch_stride + h].
 *
 * Varlen (FAJIT_VARLEN): sequence b is packed rows cu_seqlens_q[b] ..
 * cu_seqlens_q[b+1]-1 of q and o and cu_seqlens_k[b] .. of k and v (batch
 * strides unused); i, j, seqlen_q and seqlen_k above are that sequence's, and
 * the grid's p.seqlen_q is the longest sequence (rows past a sequence's end do
 * nothing). LSE is (nheads_q, total_q), total_q = cu_seqlens_q[batch]: row i
 * of sequence b at lse[h * total_q + cu_seqlens_q[b] + i].
 *
 * How: one warp per query row. The row's q (as fp32) sits in shared memory; the
 * keys are visited in steps of FAJIT_BN, one key per lane at a time, with the
 * softmax kept exact by online max/sum rescaling (expf, not exp2 shortcuts);
 * each lane accumulates output columns lane, lane + 32, ... in registers.
 * It is the GPU reference the fast kernels are tested against and the fallback
 * for shapes they do not cover, so plain correctness beats speed here.
 *
 * Launch (the runtime does exactly this): grid (ceil(seqlen_q / FAJIT_BM),
 * nheads_q, batch), FAJIT_WARPS * 32 threads, no dynamic shared memory. Warp w
 * of a block handles rows w, w + FAJIT_WARPS, ... of the block's FAJIT_BM rows.
 * FAJIT_STAGES is unused. Every index into a tensor is 64-bit.
 *
 * Two ops render this file, each with its own kernel (the other one is
 * compiled empty, since the prelude's constants cannot choose between
 * extern "C" definitions):
 *   ref       (FAJIT_OP 0): fajit_ref_fwd(p), the above;
 *   ref-probs (FAJIT_OP 9): fajit_ref_probs_fwd(p, probs, probs_stride_b,
 *             probs_stride_h, probs_stride_i), the above and, after each row's
 *             softmax is complete, the row's probabilities (fp32):
 *               probs[b * stride_b + h * stride_h + i * stride_i + j]
 *                 = exp(s_j - m) / l   for visible keys j (normalised, before
 *                                      dropout), negated where dropout drops
 *                                      (b, h, i, j) (-0.0 for a dropped 0),
 *                 = 0                  for keys the row does not see,
 *             for j < seqlen_k (the sequence's under varlen; b is then the
 *             sequence, i and j within it). Elements past a row's keys and
 *             rows past seqlen_q are not written. s_j is recomputed exactly as
 *             in the main pass and the sign comes from fajit::dropout_keep,
 *             the stream every forward and backward kernel draws from, so it is
 *             the mask the output was computed with (flash_attn's S_dmask).
 */
#include "common.cuh"
#include "fwd_params.h"

static_assert(FAJIT_OP == 0 || FAJIT_OP == 9, "reference.cuh is the template of ops ref and ref-probs");
static_assert(FAJIT_ARCH >= 70, "reference: needs sm_70 or newer");
static_assert(FAJIT_STAGES >= 1, "reference: stages is unused but must be >= 1");
static_assert(FAJIT_DQK >= 1 && FAJIT_DQK <= 512, "reference: dqk must be 1..512");
static_assert(FAJIT_DV >= 1 && FAJIT_DV <= 512, "reference: dv must be 1..512");
static_assert(FAJIT_BM >= 1, "reference: bm must be >= 1");
static_assert(FAJIT_BN >= 32 && FAJIT_BN % 32 == 0, "reference: bn must be a multiple of 32");
static_assert(FAJIT_WARPS >= 1 && FAJIT_WARPS <= 32, "reference: warps must be 1..32");
static_assert(FAJIT_PAGED == 0, "reference: paged KV is not implemented");

namespace fajit_ref {

using fajit::kWarpSize;
using elem_t = unsigned short; /* raw fp16 / bf16 bits */

/* FAJIT_OP values (enum fajit__op in codegen/variant.h, fixed there). */
constexpr int kOpRef = 0, kOpRefProbs = 9;

/* Where op ref-probs writes the probabilities (see the header); ptr is
 * nullptr for op ref. */
struct ProbsOut {
    float *ptr;
    long long stride_b, stride_h, stride_i;
};

constexpr int kKeysPerLane = FAJIT_BN / kWarpSize;                /* per step */
constexpr int kColsPerLane = (FAJIT_DV + kWarpSize - 1) / kWarpSize; /* output columns */

/* Per warp: its q row and the probabilities of the current step's keys. */
static_assert(FAJIT_WARPS * (FAJIT_DQK + FAJIT_BN) * sizeof(float) <= 48 * 1024,
              "reference: static shared memory over 48 KB; lower warps or bn");

/* q . k for one key row, in fp32, in order of the head dimension. */
__device__ __forceinline__ float dot_q_k(const float *q_shared, const elem_t *k_row) {
    float acc = 0.0f;
    for (int d = 0; d < FAJIT_DQK; ++d)
        acc += q_shared[d] * fajit::load_as_float<FAJIT_DTYPE>(k_row + d);
    return acc;
}

/* Where one (batch, head)'s sequence lies (common.cuh). */
using Seq = fajit::RefSeq;

/* The score of one visible key: scaled, softcapped, ALiBi-biased. */
__device__ __forceinline__ float score_of(const fajit_fwd_params &p, float dot, float slope,
                                          long long row, long long key, const Seq &s) {
    float score = p.softmax_scale * dot;
    if constexpr (FAJIT_SOFTCAP)
        score = fajit::softcap_score(score, p.softcap);
    if constexpr (FAJIT_ALIBI)
        score += fajit::alibi_bias(slope, row, key, s.seqlen_q, s.seqlen_k);
    return score;
}

/* The row's normalised probabilities with the dropout sign (op ref-probs),
 * lane by lane over the row's keys, once its max m and sum l are final. */
__device__ void write_probs(const fajit_fwd_params &p, const ProbsOut &out, long long b,
                            long long h, long long row, const Seq &s, const fajit::KeyRange &keys,
                            const float *q_shared, const elem_t *k_head, float slope, float row_max,
                            float row_sum, unsigned drop_threshold, int lane) {
    float *dst = out.ptr + b * out.stride_b + h * out.stride_h + row * out.stride_i;
    for (long long key = lane; key < s.seqlen_k; key += kWarpSize) {
        float prob = 0.0f; /* a key the row does not see */
        if (key >= keys.begin && key < keys.end) {
            const float score = score_of(p, dot_q_k(q_shared, k_head + key * p.k_stride[1]), slope,
                                         row, key, s);
            prob = expf(score - row_max) / row_sum;
            if constexpr (FAJIT_DROPOUT)
                if (!fajit::dropout_keep(p.dropout_seed, p.dropout_offset, drop_threshold, b, h,
                                         p.nheads_q, row, key))
                    prob = -prob;
        }
        dst[key] = prob;
    }
}

/* Attention for one query row, computed by the whole warp. */
__device__ void attend_row(const fajit_fwd_params &p, const ProbsOut &probs_out, long long b,
                           long long h, long long row, const Seq &s, float *q_shared,
                           float *probs_shared, int lane) {
    const long long h_kv = h / (p.nheads_q / p.nheads_kv);
    const elem_t *q_row = static_cast<const elem_t *>(p.q) + b * p.q_stride[0] +
                          (s.q_start + row) * p.q_stride[1] + h * p.q_stride[2];
    const elem_t *k_head = static_cast<const elem_t *>(p.k) + b * p.k_stride[0] +
                           s.k_start * p.k_stride[1] + h_kv * p.k_stride[2];
    const elem_t *v_head = static_cast<const elem_t *>(p.v) + b * p.v_stride[0] +
                           s.k_start * p.v_stride[1] + h_kv * p.v_stride[2];
    elem_t *o_row = static_cast<elem_t *>(p.o) + b * p.o_stride[0] +
                    (s.q_start + row) * p.o_stride[1] + h * p.o_stride[2];
    float slope = 0.0f;
    if constexpr (FAJIT_ALIBI)
        slope = p.alibi_slopes[b * p.alibi_batch_stride + h];
    unsigned drop_threshold = 0;
    if constexpr (FAJIT_DROPOUT)
        drop_threshold = fajit::dropout_threshold(p.dropout_p);

    for (int d = lane; d < FAJIT_DQK; d += kWarpSize)
        q_shared[d] = fajit::load_as_float<FAJIT_DTYPE>(q_row + d);
    __syncwarp();

    const fajit::KeyRange keys = fajit::visible_keys<FAJIT_MASK, FAJIT_WINDOW_LEFT, FAJIT_WINDOW_RIGHT>(
        row, s.seqlen_q, s.seqlen_k);
    float row_max = fajit::neg_infinity(); /* m: max score so far */
    float row_sum = 0.0f;                  /* l: sum of exp(score - m) so far */
    float out[kColsPerLane];
#pragma unroll
    for (int c = 0; c < kColsPerLane; ++c)
        out[c] = 0.0f;

    for (long long start = keys.begin; start < keys.end; start += FAJIT_BN) {
        /* Scores of this step's keys: lane handles start + lane + 32 t. */
        float score[kKeysPerLane];
        float step_max = fajit::neg_infinity();
#pragma unroll
        for (int t = 0; t < kKeysPerLane; ++t) {
            const long long key = start + t * kWarpSize + lane;
            score[t] = fajit::neg_infinity();
            if (key < keys.end)
                score[t] = score_of(p, dot_q_k(q_shared, k_head + key * p.k_stride[1]), slope,
                                    row, key, s);
            step_max = fmaxf(step_max, score[t]);
        }
        /* The step's first key is visible, so new_max is finite (for finite
         * inputs) and exp(row_max - new_max) is 0 on the first step. */
        const float new_max = fmaxf(row_max, fajit::warp_max(step_max));
        const float rescale = expf(row_max - new_max);
        float step_sum = 0.0f;
#pragma unroll
        for (int t = 0; t < kKeysPerLane; ++t) {
            const long long key = start + t * kWarpSize + lane;
            const float prob = key < keys.end ? expf(score[t] - new_max) : 0.0f;
            float weight = prob; /* what multiplies v: the dropped-out probability */
            if constexpr (FAJIT_DROPOUT)
                weight = fajit::dropout_keep(p.dropout_seed, p.dropout_offset, drop_threshold, b, h,
                                             p.nheads_q, row, key)
                             ? prob * p.dropout_scale
                             : 0.0f;
            probs_shared[t * kWarpSize + lane] = weight;
            step_sum += prob;
        }
        row_sum = row_sum * rescale + fajit::warp_sum(step_sum);
        row_max = new_max;
        __syncwarp(); /* probs_shared complete */

        const long long left = keys.end - start;
        const int step_keys = left < FAJIT_BN ? static_cast<int>(left) : FAJIT_BN;
#pragma unroll
        for (int c = 0; c < kColsPerLane; ++c)
            out[c] *= rescale;
        for (int j = 0; j < step_keys; ++j) {
            const float prob = probs_shared[j];
            const elem_t *v_row = v_head + (start + j) * p.v_stride[1];
#pragma unroll
            for (int c = 0; c < kColsPerLane; ++c) {
                const int d = c * kWarpSize + lane;
                if (d < FAJIT_DV)
                    out[c] += prob * fajit::load_as_float<FAJIT_DTYPE>(v_row + d);
            }
        }
        __syncwarp(); /* probs_shared read by all lanes before the next step */
    }

    /* row_sum >= 1 when any key was visible (the max contributes exp(0)). */
    const bool any_visible = row_sum > 0.0f;
#pragma unroll
    for (int c = 0; c < kColsPerLane; ++c) {
        const int d = c * kWarpSize + lane;
        if (d < FAJIT_DV)
            fajit::store_from_float<FAJIT_DTYPE>(o_row + d, any_visible ? out[c] / row_sum : 0.0f);
    }
    if (p.lse != nullptr && lane == 0)
        p.lse[s.lse_base + row] = any_visible ? row_max + logf(row_sum) : fajit::neg_infinity();
    if constexpr (FAJIT_OP == kOpRefProbs)
        write_probs(p, probs_out, b, h, row, s, keys, q_shared, k_head, slope, row_max, row_sum,
                    drop_threshold, lane);
    __syncwarp(); /* q_shared read by all lanes before the next row overwrites it */
}

/* The block's rows (see the launch in the header). */
__device__ __forceinline__ void attend_block(const fajit_fwd_params &p, const ProbsOut &probs_out) {
    __shared__ float q_rows[FAJIT_WARPS][FAJIT_DQK];
    __shared__ float probs[FAJIT_WARPS][FAJIT_BN];
    const int warp = threadIdx.x / kWarpSize;
    const int lane = threadIdx.x % kWarpSize;
    const long long b = blockIdx.z;
    const long long h = blockIdx.y;
    const Seq s = fajit::ref_sequence_of(p, b, h);
    for (int r = warp; r < FAJIT_BM; r += FAJIT_WARPS) {
        const long long row = static_cast<long long>(blockIdx.x) * FAJIT_BM + r;
        if (row >= s.seqlen_q || row >= p.seqlen_q)
            break;
        attend_row(p, probs_out, b, h, row, s, q_rows[warp], probs[warp], lane);
    }
}

} // namespace fajit_ref

extern "C" __global__ void __launch_bounds__(FAJIT_WARPS * 32) fajit_ref_fwd(const fajit_fwd_params p) {
    if constexpr (FAJIT_OP == fajit_ref::kOpRef)
        fajit_ref::attend_block(p, fajit_ref::ProbsOut{nullptr, 0, 0, 0});
}

extern "C" __global__ void __launch_bounds__(FAJIT_WARPS * 32)
    fajit_ref_probs_fwd(const fajit_fwd_params p, float *probs, long long probs_stride_b,
                        long long probs_stride_h, long long probs_stride_i) {
    if constexpr (FAJIT_OP == fajit_ref::kOpRefProbs)
        fajit_ref::attend_block(p, fajit_ref::ProbsOut{probs, probs_stride_b, probs_stride_h,
                                                       probs_stride_i});
}
