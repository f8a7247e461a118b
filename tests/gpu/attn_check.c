/*
 * tests/gpu/attn_check.c - see attn_check.h.
 */
#include "attn_check.h"

#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* ---------------------------------------------------------------- 16-bit floats */

static uint32_t float_bits(float f) {
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    return u;
}

static float bits_float(uint32_t u) {
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

uint16_t attn_float_to_half(float f) {
    const uint32_t x = float_bits(f);
    const uint16_t sign = (uint16_t)((x >> 16) & 0x8000u);
    const uint32_t mag = x & 0x7fffffffu;
    if (mag > 0x7f800000u)
        return sign | 0x7e00u; /* NaN */
    if (mag >= 0x477ff000u)
        return sign | 0x7c00u; /* >= 65520 rounds to infinity */
    if (mag < 0x38800000u) {
        /* Below 2^-14: a half subnormal, counted in units of 2^-24. Scaling by a
         * power of two is exact; lrintf rounds to nearest even. A result of
         * 0x400 is the smallest normal, which is the right carry. */
        return sign | (uint16_t)lrintf(bits_float(mag) * 16777216.0f);
    }
    uint32_t h = ((mag >> 23) - 127 + 15) << 10 | ((mag >> 13) & 0x3ffu);
    const uint32_t rest = mag & 0x1fffu;
    if (rest > 0x1000u || (rest == 0x1000u && (h & 1u)))
        h++; /* a carry into the exponent is the right rounding */
    return sign | (uint16_t)h;
}

double attn_half_to_double(uint16_t h) {
    const int exponent = (h >> 10) & 0x1f;
    const int mantissa = h & 0x3ff;
    double v;
    if (exponent == 0)
        v = ldexp(mantissa, -24);
    else if (exponent == 31)
        v = mantissa ? NAN : INFINITY;
    else
        v = ldexp(1024 + mantissa, exponent - 25);
    return (h & 0x8000) ? -v : v;
}

uint16_t attn_float_to_bf16(float f) {
    uint32_t u = float_bits(f);
    if ((u & 0x7fffffffu) > 0x7f800000u)
        return (uint16_t)((u >> 16) | 0x40u);
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

double attn_bf16_to_double(uint16_t b) { return bits_float((uint32_t)b << 16); }

double attn_decode(int dtype, uint16_t bits) {
    return dtype == 0 ? attn_half_to_double(bits) : attn_bf16_to_double(bits);
}

static uint16_t encode(int dtype, float f) {
    return dtype == 0 ? attn_float_to_half(f) : attn_float_to_bf16(f);
}

/* ---------------------------------------------------------------- random inputs */

/* splitmix64: small, good enough, and the same on every machine. */
static uint64_t next_u64(uint64_t *state) {
    uint64_t z = (*state += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

static double next_uniform(uint64_t *state) { /* in (0, 1) */
    return ((double)(next_u64(state) >> 11) + 0.5) / 9007199254740992.0;
}

static float next_normal(uint64_t *state) { /* Box-Muller */
    const double u1 = next_uniform(state), u2 = next_uniform(state);
    return (float)(sqrt(-2.0 * log(u1)) * cos(6.283185307179586 * u2));
}

/* ---------------------------------------------------------------- layouts */

const char *attn_layout_name(int layout) {
    switch (layout) {
    case ATTN_CONTIGUOUS: return "contiguous";
    case ATTN_PADDED: return "padded";
    case ATTN_PACKED_QKV: return "packed-qkv";
    default: return "?";
    }
}

const char *attn_mask_name(int mask) {
    switch (mask) {
    case 0: return "none";
    case 1: return "causal";
    case 2: return "causal-tl";
    default: return "?";
    }
}

const char *attn_dtype_name(int dtype) { return dtype == 0 ? "fp16" : dtype == 1 ? "bf16" : "?"; }

float attn_effective_scale(const attn_shape *s) {
    return s->softmax_scale != 0.0f ? s->softmax_scale : 1.0f / sqrtf((float)s->dqk);
}

/* Strides of a (batch, seq, heads, dim) tensor; padded adds odd gaps after each
 * head, each row and each batch. Returns the number of elements it spans. */
static size_t tensor_strides(int64_t batch, int64_t seq, int64_t heads, int64_t dim, int padded,
                             int64_t stride[3]) {
    stride[2] = dim + (padded ? 3 : 0);
    stride[1] = heads * stride[2] + (padded ? 5 : 0);
    stride[0] = seq * stride[1] + (padded ? 11 : 0);
    return (size_t)(batch * stride[0]);
}

static int set_layout(attn_problem *p) {
    const attn_shape *s = &p->s;
    if (p->layout == ATTN_PACKED_QKV) {
        if (s->seqlen_q != s->seqlen_k || s->dqk != s->dv)
            return -1;
        const int64_t d = s->dqk, heads = s->nheads_q + 2 * s->nheads_kv;
        const int64_t row = heads * d, batch = s->seqlen_q * row + 7; /* non-contiguous batches */
        for (int i = 0; i < 3; ++i) {
            const int64_t st[3] = {batch, row, d};
            p->q_stride[i] = p->k_stride[i] = p->v_stride[i] = st[i];
        }
        p->q_off = 0;
        p->k_off = (size_t)(s->nheads_q * d);
        p->v_off = (size_t)((s->nheads_q + s->nheads_kv) * d);
        p->in_elems = (size_t)(s->batch * batch);
        p->o_elems = tensor_strides(s->batch, s->seqlen_q, s->nheads_q, s->dv, 1, p->o_stride);
        return 0;
    }
    const int padded = p->layout == ATTN_PADDED;
    if (!padded && p->layout != ATTN_CONTIGUOUS)
        return -1;
    const size_t nq = tensor_strides(s->batch, s->seqlen_q, s->nheads_q, s->dqk, padded, p->q_stride);
    const size_t nk = tensor_strides(s->batch, s->seqlen_k, s->nheads_kv, s->dqk, padded, p->k_stride);
    const size_t nv = tensor_strides(s->batch, s->seqlen_k, s->nheads_kv, s->dv, padded, p->v_stride);
    p->q_off = 0;
    p->k_off = nq;
    p->v_off = nq + nk;
    p->in_elems = nq + nk + nv;
    p->o_elems = tensor_strides(s->batch, s->seqlen_q, s->nheads_q, s->dv, padded, p->o_stride);
    return 0;
}

static size_t at(const int64_t stride[3], int64_t b, int64_t i, int64_t h) {
    return (size_t)(b * stride[0] + i * stride[1] + h * stride[2]);
}

/* ---------------------------------------------------------------- reference */

static int key_visible(const attn_shape *s, int64_t i, int64_t j) {
    switch (s->mask) {
    case 1: return j <= i + s->seqlen_k - s->seqlen_q; /* bottom-right */
    case 2: return j <= i;                             /* top-left */
    default: return 1;
    }
}

/* One query row in fp64: o_row (dv values) and its LSE (-inf if fully masked). */
static double reference_row(const attn_problem *p, int64_t b, int64_t i, int64_t h, double *scores,
                            double *o_row) {
    const attn_shape *s = &p->s;
    const int64_t hk = h / (s->nheads_q / s->nheads_kv);
    const uint16_t *q = p->in + p->q_off + at(p->q_stride, b, i, h);
    const double scale = attn_effective_scale(s);
    double row_max = -INFINITY;
    for (int64_t j = 0; j < s->seqlen_k; ++j) {
        scores[j] = -INFINITY;
        if (!key_visible(s, i, j))
            continue;
        const uint16_t *k = p->in + p->k_off + at(p->k_stride, b, j, hk);
        double dot = 0.0;
        for (int64_t d = 0; d < s->dqk; ++d)
            dot += attn_decode(s->dtype, q[d]) * attn_decode(s->dtype, k[d]);
        scores[j] = scale * dot;
        row_max = fmax(row_max, scores[j]);
    }
    memset(o_row, 0, (size_t)s->dv * sizeof *o_row);
    if (row_max == -INFINITY)
        return -INFINITY;
    double sum = 0.0;
    for (int64_t j = 0; j < s->seqlen_k; ++j) {
        if (scores[j] == -INFINITY)
            continue;
        const double prob = exp(scores[j] - row_max);
        const uint16_t *v = p->in + p->v_off + at(p->v_stride, b, j, hk);
        sum += prob;
        for (int64_t d = 0; d < s->dv; ++d)
            o_row[d] += prob * attn_decode(s->dtype, v[d]);
    }
    for (int64_t d = 0; d < s->dv; ++d)
        o_row[d] /= sum;
    return row_max + log(sum);
}

static int compute_reference(attn_problem *p) {
    const attn_shape *s = &p->s;
    double *scores = malloc((size_t)(s->seqlen_k > 0 ? s->seqlen_k : 1) * sizeof *scores);
    if (!scores)
        return -1;
    p->max_abs_ref_o = 0.0;
    p->masked_rows = 0;
    for (int64_t b = 0; b < s->batch; ++b)
        for (int64_t i = 0; i < s->seqlen_q; ++i)
            for (int64_t h = 0; h < s->nheads_q; ++h) {
                double *o_row = p->ref_o + ((b * s->seqlen_q + i) * s->nheads_q + h) * s->dv;
                const double lse = reference_row(p, b, i, h, scores, o_row);
                p->ref_lse[(b * s->nheads_q + h) * s->seqlen_q + i] = lse;
                p->masked_rows += lse == -INFINITY;
                for (int64_t d = 0; d < s->dv; ++d)
                    p->max_abs_ref_o = fmax(p->max_abs_ref_o, fabs(o_row[d]));
            }
    free(scores);
    return 0;
}

int attn_problem_init(attn_problem *p, const attn_shape *s, int layout, uint64_t seed) {
    memset(p, 0, sizeof *p);
    p->s = *s;
    p->layout = layout;
    if (s->nheads_kv <= 0 || s->nheads_q % s->nheads_kv != 0 || set_layout(p) != 0)
        return -1;
    const size_t rows = (size_t)(s->batch * s->seqlen_q * s->nheads_q);
    p->in = malloc(p->in_elems * sizeof *p->in);
    p->ref_o = malloc(rows * (size_t)s->dv * sizeof *p->ref_o);
    p->ref_lse = malloc(rows * sizeof *p->ref_lse);
    if (!p->in || !p->ref_o || !p->ref_lse)
        goto fail;
    uint64_t state = seed;
    for (size_t n = 0; n < p->in_elems; ++n)
        p->in[n] = encode(s->dtype, next_normal(&state));
    if (compute_reference(p) != 0)
        goto fail;
    return 0;
fail:
    attn_problem_free(p);
    return -1;
}

void attn_problem_free(attn_problem *p) {
    free(p->in);
    free(p->ref_o);
    free(p->ref_lse);
    p->in = NULL;
    p->ref_o = p->ref_lse = NULL;
}

/* ---------------------------------------------------------------- checking */

static void fail_once(attn_result *r, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

/* Marks the check failed, keeping the first failure's description. */
static void fail_once(attn_result *r, const char *fmt, ...) {
    r->ok = 0;
    if (r->why[0] != '\0')
        return;
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(r->why, sizeof r->why, fmt, ap);
    va_end(ap);
}

static void check_row(const attn_problem *p, const uint16_t *o, const float *lse, int64_t b,
                      int64_t i, int64_t h, attn_result *r) {
    const attn_shape *s = &p->s;
    const size_t row = (size_t)((b * s->seqlen_q + i) * s->nheads_q + h);
    const double want_lse = p->ref_lse[(b * s->nheads_q + h) * s->seqlen_q + i];
    const uint16_t *o_row = o + at(p->o_stride, b, i, h);
    const int masked = want_lse == -INFINITY;
    int row_bad = 0;
    for (int64_t d = 0; d < s->dv; ++d) {
        const double got = attn_decode(s->dtype, o_row[d]), want = p->ref_o[row * (size_t)s->dv + d];
        const double err = fabs(got - want);
        r->nan_values += isnan(got) != 0;
        if (masked ? got != 0.0 : !(err <= r->tol))
            fail_once(r, "o[b=%lld,i=%lld,h=%lld,d=%lld] = %.6g, want %.6g", (long long)b,
                      (long long)i, (long long)h, (long long)d, got, want);
        row_bad |= masked && got != 0.0;
        if (!masked && !(err <= r->max_err))
            r->max_err = isnan(err) ? INFINITY : err;
    }
    if (lse) {
        const double got = lse[(b * s->nheads_q + h) * s->seqlen_q + i];
        const double rel = fabs(got - want_lse) / fmax(1.0, fabs(want_lse));
        r->nan_values += isnan(got) != 0;
        if (masked ? got != -INFINITY : !(rel <= 1e-4))
            fail_once(r, "lse[b=%lld,i=%lld,h=%lld] = %.9g, want %.9g", (long long)b, (long long)i,
                      (long long)h, got, want_lse);
        row_bad |= masked && got != -INFINITY;
        if (!masked && !(rel <= r->max_lse_rel_err))
            r->max_lse_rel_err = isnan(rel) ? INFINITY : rel;
    }
    r->bad_masked_rows += row_bad;
}

/* Marks the elements the output tensor owns; every other one must keep its poison. */
static void check_gaps(const attn_problem *p, const uint16_t *o, attn_result *r) {
    const attn_shape *s = &p->s;
    unsigned char *owned = calloc(p->o_elems, 1);
    if (!owned) {
        fail_once(r, "out of memory");
        return;
    }
    for (int64_t b = 0; b < s->batch; ++b)
        for (int64_t i = 0; i < s->seqlen_q; ++i)
            for (int64_t h = 0; h < s->nheads_q; ++h)
                memset(owned + at(p->o_stride, b, i, h), 1, (size_t)s->dv);
    for (size_t n = 0; n < p->o_elems; ++n)
        r->stray_writes += !owned[n] && o[n] != 0xffffu;
    free(owned);
    if (r->stray_writes > 0)
        fail_once(r, "%lld output-buffer gap elements were written", (long long)r->stray_writes);
}

static void check_within(const attn_problem *p, const uint16_t *o, const float *lse, attn_result *r,
                         double steps) {
    const attn_shape *s = &p->s;
    memset(r, 0, sizeof *r);
    r->ok = 1;
    const double rounding = s->dtype == 0 ? 1.0 / 2048.0 : 1.0 / 256.0;
    r->tol = steps * rounding * p->max_abs_ref_o + 1e-4;
    for (int64_t b = 0; b < s->batch; ++b)
        for (int64_t i = 0; i < s->seqlen_q; ++i)
            for (int64_t h = 0; h < s->nheads_q; ++h)
                check_row(p, o, lse, b, i, h, r);
    check_gaps(p, o, r);
    if (r->nan_values > 0)
        fail_once(r, "%lld NaN values", (long long)r->nan_values);
}

void attn_check(const attn_problem *p, const uint16_t *o, const float *lse, attn_result *r) {
    check_within(p, o, lse, r, 1.0);
}

/* Two rounding steps: the output's own, and the fp16/bf16 rounding of the
 * probabilities before P V in the tensor-core kernels (FlashAttention-2's
 * too), which can carry a value across a rounding boundary of the output
 * (seen: 1.00027 stored as 1.00098, the step above 1.0 being twice the one
 * below). A wrong tile, split or layout misses by orders of magnitude more;
 * the FlashAttention rule (2x the naive error) is test_fwd_gpu's. */
void attn_check_fast(const attn_problem *p, const uint16_t *o, const float *lse, attn_result *r) {
    check_within(p, o, lse, r, 2.0);
}
