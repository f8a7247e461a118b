/*
 * tests/gpu/bwd_check.c - see bwd_check.h.
 */
#include "bwd_check.h"

#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "philox.h"

const char *bwd_grad_name(int t) { return t == BWD_DQ ? "dq" : t == BWD_DK ? "dk" : "dv"; }

void bwd_features_none(bwd_features *f) {
    memset(f, 0, sizeof *f);
    f->window_left = f->window_right = -1;
}

/* ---------------------------------------------------------------- random dO */

/* splitmix64 and Box-Muller, as attn_check.c draws its inputs. */
static uint64_t next_u64(uint64_t *state) {
    uint64_t z = (*state += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

static float next_normal(uint64_t *state) {
    const double u1 = ((double)(next_u64(state) >> 11) + 0.5) / 9007199254740992.0;
    const double u2 = ((double)(next_u64(state) >> 11) + 0.5) / 9007199254740992.0;
    return (float)(sqrt(-2.0 * log(u1)) * cos(6.283185307179586 * u2));
}

/* Sizes of the dense (batch, seq, heads, dim) tensors, 1 at least so that
 * calloc never sees 0. */
static size_t dense_elems(const attn_shape *s, int t) {
    const int64_t seq = t == BWD_DQ ? s->seqlen_q : s->seqlen_k;
    const int64_t heads = t == BWD_DQ ? s->nheads_q : s->nheads_kv;
    const int64_t dim = t == BWD_DV ? s->dv : s->dqk;
    const size_t n = (size_t)(s->batch * seq * heads * dim);
    return n > 0 ? n : 1;
}

int bwd_problem_init(bwd_problem *bp, const attn_problem *p, uint64_t seed) {
    const attn_shape *s = &p->s;
    const size_t rows = (size_t)(s->batch * s->seqlen_q * s->nheads_q) + 1;
    const size_t keys = (size_t)(s->batch * s->seqlen_k * s->nheads_kv) + 1;
    int ok = 1;
    memset(bp, 0, sizeof *bp);
    bp->fwd = p;
    bwd_features_none(&bp->feat);
    bp->grad_out = malloc((p->o_elems + 1) * sizeof *bp->grad_out);
    for (int t = 0; t < 3; ++t) {
        bp->ref[t] = calloc(dense_elems(s, t), sizeof *bp->ref[t]);
        bp->naive[t] = calloc(dense_elems(s, t), sizeof *bp->naive[t]);
        ok &= bp->ref[t] != NULL && bp->naive[t] != NULL;
    }
    bp->row_seen = calloc(rows, 1);
    bp->key_seen = calloc(keys, 1);
    if (!ok || !bp->grad_out || !bp->row_seen || !bp->key_seen) {
        bwd_problem_free(bp);
        return -1;
    }
    uint64_t state = seed;
    for (size_t n = 0; n < p->o_elems; ++n) {
        const float x = next_normal(&state);
        bp->grad_out[n] = s->dtype == 0 ? attn_float_to_half(x) : attn_float_to_bf16(x);
    }
    return 0;
}

void bwd_problem_free(bwd_problem *bp) {
    free(bp->grad_out);
    for (int t = 0; t < 3; ++t) {
        free(bp->ref[t]);
        free(bp->naive[t]);
    }
    free(bp->row_seen);
    free(bp->key_seen);
    memset(bp, 0, sizeof *bp);
}

void bwd_problem_set_features(bwd_problem *bp, const bwd_features *f) { bp->feat = *f; }

/* ---------------------------------------------------------------- sequences */

static size_t at(const int64_t stride[3], int64_t b, int64_t i, int64_t h) {
    return (size_t)(b * stride[0] + i * stride[1] + h * stride[2]);
}

/* One sequence: dense batch b, or varlen sequence b (tensor batch 0, rows
 * from cu_seqlens). index is the b that dropout and ALiBi see. */
typedef struct seq {
    int64_t index, tb, q0, k0, sq, sk;
} seq;

static int64_t seq_count(const bwd_problem *bp) {
    return bp->feat.cu_seqlens_q ? bp->feat.nseq : bp->fwd->s.batch;
}

static seq seq_of(const bwd_problem *bp, int64_t b) {
    const bwd_features *f = &bp->feat;
    const attn_shape *s = &bp->fwd->s;
    seq r = {b, b, 0, 0, s->seqlen_q, s->seqlen_k};
    if (f->cu_seqlens_q) {
        r.tb = 0;
        r.q0 = f->cu_seqlens_q[b];
        r.k0 = f->cu_seqlens_k[b];
        r.sq = f->cu_seqlens_q[b + 1] - r.q0;
        r.sk = f->cu_seqlens_k[b + 1] - r.k0;
    }
    return r;
}

/* Varlen needs a batch-1 problem whose lengths are the totals. */
static int varlen_fits(const bwd_problem *bp) {
    const bwd_features *f = &bp->feat;
    const attn_shape *s = &bp->fwd->s;
    if (!f->cu_seqlens_q)
        return 1;
    if (s->batch != 1 || f->nseq < 1 || f->cu_seqlens_q[0] != 0 || f->cu_seqlens_k[0] != 0 ||
        f->cu_seqlens_q[f->nseq] != s->seqlen_q || f->cu_seqlens_k[f->nseq] != s->seqlen_k)
        return 0;
    for (int64_t b = 0; b < f->nseq; ++b)
        if (f->cu_seqlens_q[b + 1] < f->cu_seqlens_q[b] || f->cu_seqlens_k[b + 1] < f->cu_seqlens_k[b])
            return 0;
    return 1;
}

/* Visible keys [lo, hi) of row i of a sequence (visible_keys of common.cuh). */
static void visible(const bwd_problem *bp, const seq *q, int64_t i, int64_t *lo, int64_t *hi) {
    const bwd_features *f = &bp->feat;
    const int64_t diag = bp->fwd->s.mask == 2 ? i : i + q->sk - q->sq;
    *lo = 0;
    *hi = q->sk;
    if (bp->fwd->s.mask != 0 && diag + 1 < *hi)
        *hi = diag + 1;
    if (f->window_left >= 0 && diag - f->window_left > *lo)
        *lo = diag - f->window_left;
    if (f->window_right >= 0 && diag + f->window_right + 1 < *hi)
        *hi = diag + f->window_right + 1;
}

/* ---------------------------------------------------------------- one row */

/* The inputs decoded once: the sums below read each value many times. */
typedef struct decoded {
    double *in, *o, *dout; /* laid out as fwd->in, the output, dO */
} decoded;

static double *decode_all(int dtype, const uint16_t *bits, size_t n) {
    double *x = malloc((n + 1) * sizeof *x);
    for (size_t i = 0; x && i < n; ++i)
        x[i] = attn_decode(dtype, bits[i]);
    return x;
}

static double dot(const double *x, const double *y, int64_t n) {
    double acc = 0.0;
    for (int64_t d = 0; d < n; ++d)
        acc += x[d] * y[d];
    return acc;
}

/* The same in float, as a low-precision matmul accumulates. */
static float dot_f(const double *x, const double *y, int64_t n) {
    float acc = 0.0f;
    for (int64_t d = 0; d < n; ++d)
        acc += (float)x[d] * (float)y[d];
    return acc;
}

/* acc[d] += w * x[d] */
static void axpy(double *acc, double w, const double *x, int64_t n) {
    for (int64_t d = 0; d < n; ++d)
        acc[d] += w * x[d];
}

static void axpy_f(float *acc, float w, const double *x, int64_t n) {
    for (int64_t d = 0; d < n; ++d)
        acc[d] += w * (float)x[d];
}

static float round_to(int dtype, float f) {
    return (float)attn_decode(dtype, dtype == 0 ? attn_float_to_half(f) : attn_float_to_bf16(f));
}

/* Everything one (sequence, head, row) needs, and per-key scratch (sk long). */
typedef struct row_ctx {
    bwd_problem *bp;
    const decoded *x;
    seq s;
    int64_t h, hk, i, lo, hi;
    double scale, slope, z_keep; /* z_keep: the kept elements' factor, 1 / (1 - p) in fp32 */
    const double *q, *o, *dout;
    double *xs, *sc, *z; /* per key: scale * q.k, the score, the dropout factor */
    float *sf, *tf, *pf; /* naive: score, softcap's tanh, probability */
    float *dpf, *dq_acc;    /* naive: dP per key; dq of the row */
    float *dk_acc, *dv_acc; /* naive dk, dv per query head: (batch, seqlen_k, nheads_q, dim) */
} row_ctx;

static const double *key_of(const row_ctx *r, int64_t j, int which) {
    const attn_problem *p = r->bp->fwd;
    return which == BWD_DK ? r->x->in + p->k_off + at(p->k_stride, r->s.tb, r->s.k0 + j, r->hk)
                           : r->x->in + p->v_off + at(p->v_stride, r->s.tb, r->s.k0 + j, r->hk);
}

/* Dense index of key j's (kv head) row and of query row i's, as ref[] lays them out. */
static size_t key_index(const row_ctx *r, int64_t j) {
    const attn_shape *s = &r->bp->fwd->s;
    return (size_t)((r->s.tb * s->seqlen_k + r->s.k0 + j) * s->nheads_kv + r->hk);
}

static size_t row_index(const row_ctx *r) {
    const attn_shape *s = &r->bp->fwd->s;
    return (size_t)((r->s.tb * s->seqlen_q + r->s.q0 + r->i) * s->nheads_q + r->h);
}

/* Scores of the row's visible keys, in fp64 and (naive) in the input dtype,
 * with the forward's softcap, ALiBi and dropout mask. */
static void score_row(row_ctx *r) {
    const bwd_features *f = &r->bp->feat;
    const int dt = r->bp->fwd->s.dtype;
    const float scale_f = (float)r->scale, cap = f->softcap;
    const uint32_t threshold = fajit_dropout_threshold(f->dropout_p);
    for (int64_t j = r->lo; j < r->hi; ++j) {
        const double *k = key_of(r, j, BWD_DK);
        const double bias = -r->slope * (double)llabs(r->i + r->s.sk - r->s.sq - j);
        double s = r->xs[j] = r->scale * dot(r->q, k, r->bp->fwd->s.dqk);
        float sf = round_to(dt, round_to(dt, dot_f(r->q, k, r->bp->fwd->s.dqk)) * scale_f);
        r->tf[j] = 0.0f;
        if (cap != 0.0f) {
            s = cap * tanh(s / cap);
            r->tf[j] = round_to(dt, tanhf(round_to(dt, sf / cap)));
            sf = round_to(dt, cap * r->tf[j]);
        }
        if (f->alibi_slopes) {
            s += bias;
            sf = round_to(dt, sf + round_to(dt, (float)bias));
        }
        r->sc[j] = s;
        r->sf[j] = sf;
        r->z[j] = 1.0;
        if (f->dropout_p > 0.0f)
            r->z[j] = fajit_dropout_keep(f->dropout_seed, f->dropout_offset, threshold, r->s.index, r->h,
                                         r->bp->fwd->s.nheads_q, r->i, j)
                          ? r->z_keep
                          : 0.0;
    }
}

/* The fp64 forward of the row against the kernel's O row and LSE. */
static void forward_row(row_ctx *r, const uint16_t *o_bits, double lse_got, double *o_ref,
                        bwd_forward_check *c, double *max_ref) {
    const attn_shape *s = &r->bp->fwd->s;
    double m = -INFINITY, l = 0.0;
    for (int64_t j = r->lo; j < r->hi; ++j)
        m = fmax(m, r->sc[j]);
    memset(o_ref, 0, (size_t)s->dv * sizeof *o_ref);
    for (int64_t j = r->lo; j < r->hi; ++j) {
        const double e = exp(r->sc[j] - m);
        l += e;
        axpy(o_ref, e * r->z[j], key_of(r, j, BWD_DV), s->dv);
    }
    const int masked = r->hi <= r->lo;
    const double lse_want = masked ? -INFINITY : m + log(l);
    for (int64_t d = 0; d < s->dv; ++d) {
        const double want = masked ? 0.0 : o_ref[d] / l, got = attn_decode(s->dtype, o_bits[d]);
        const double err = fabs(got - want);
        *max_ref = fmax(*max_ref, fabs(want));
        if (!masked && !(err <= c->max_err))
            c->max_err = isnan(err) ? INFINITY : err;
        if ((masked ? got != 0.0 : isnan(got)) && !c->why[0])
            snprintf(c->why, sizeof c->why, "o[seq %lld, row %lld, h %lld, d %lld] = %g, want %g",
                     (long long)r->s.index, (long long)r->i, (long long)r->h, (long long)d, got, want);
    }
    const double rel = fabs(lse_got - lse_want) / fmax(1.0, fabs(lse_want));
    if (masked ? lse_got != -INFINITY : !(rel <= 1e-4)) {
        if (!c->why[0])
            snprintf(c->why, sizeof c->why, "lse[seq %lld, row %lld, h %lld] = %.9g, want %.9g",
                     (long long)r->s.index, (long long)r->i, (long long)r->h, lse_got, lse_want);
    } else if (!masked)
        c->max_lse_err = fmax(c->max_lse_err, rel);
}

/* The fp64 backward of the row from the kernel's O row (decoded in r->o) and
 * LSE, into ref[] (dq of the row, dk and dv of its keys). */
static void reference_row(row_ctx *r, double lse) {
    bwd_problem *bp = r->bp;
    const attn_shape *s = &bp->fwd->s;
    const double cap = bp->feat.softcap, row_d = dot(r->dout, r->o, s->dv);
    double *dq = bp->ref[BWD_DQ] + row_index(r) * (size_t)s->dqk;
    for (int64_t j = r->lo; j < r->hi; ++j) {
        const size_t key = key_index(r, j);
        const double *k = key_of(r, j, BWD_DK), *v = key_of(r, j, BWD_DV);
        const double prob = exp(r->sc[j] - lse);
        double ds = prob * (r->z[j] * dot(r->dout, v, s->dv) - row_d);
        if (cap != 0.0) {
            const double t = tanh(r->xs[j] / cap);
            ds *= 1.0 - t * t;
        }
        axpy(dq, r->scale * ds, k, s->dqk);
        axpy(bp->ref[BWD_DK] + key * (size_t)s->dqk, r->scale * ds, r->q, s->dqk);
        axpy(bp->ref[BWD_DV] + key * (size_t)s->dv, prob * r->z[j], r->dout, s->dv);
        bp->key_seen[key] = 1;
    }
}

/*
 * The row's backward as PyTorch's math attention computes it in fp16/bf16
 * (every intermediate tensor rounded to the dtype, matmuls and softmax
 * accumulating in fp32): the yardstick of FlashAttention's rule. dq is
 * final; dk and dv go to per-query-head accumulators (r->dk_acc, dv_acc).
 */
static void naive_row(row_ctx *r) {
    bwd_problem *bp = r->bp;
    const attn_shape *s = &bp->fwd->s;
    const int dt = s->dtype;
    const float cap = bp->feat.softcap, scale = (float)r->scale;
    float m = -INFINITY, l = 0.0f, d_sum = 0.0f;
    for (int64_t j = r->lo; j < r->hi; ++j)
        m = fmaxf(m, r->sf[j]);
    for (int64_t j = r->lo; j < r->hi; ++j)
        l += expf(r->sf[j] - m);
    for (int64_t j = r->lo; j < r->hi; ++j) { /* P, dP, and D = sum P dP (softmax's backward) */
        r->pf[j] = round_to(dt, expf(r->sf[j] - m) / l);
        r->dpf[j] = round_to(dt, round_to(dt, dot_f(r->dout, key_of(r, j, BWD_DV), s->dv)) * (float)r->z[j]);
        d_sum += r->pf[j] * r->dpf[j];
    }
    float *dq = r->dq_acc;
    memset(dq, 0, (size_t)s->dqk * sizeof *dq);
    for (int64_t j = r->lo; j < r->hi; ++j) {
        float dx = round_to(dt, r->pf[j] * (r->dpf[j] - d_sum));
        if (cap != 0.0f) /* through S = cap * t, t = tanh(u), u = x / cap */
            dx = round_to(dt, round_to(dt, round_to(dt, dx * cap) * (1.0f - r->tf[j] * r->tf[j])) / cap);
        const float ddot = round_to(dt, dx * scale);
        const size_t acc = (size_t)((r->s.tb * s->seqlen_k + r->s.k0 + j) * s->nheads_q + r->h);
        axpy_f(dq, ddot, key_of(r, j, BWD_DK), s->dqk);
        axpy_f(r->dk_acc + acc * (size_t)s->dqk, ddot, r->q, s->dqk);
        axpy_f(r->dv_acc + acc * (size_t)s->dv, round_to(dt, r->pf[j] * (float)r->z[j]), r->dout, s->dv);
    }
    float *out = bp->naive[BWD_DQ] + row_index(r) * (size_t)s->dqk;
    for (int64_t d = 0; d < s->dqk; ++d)
        out[d] = round_to(dt, dq[d]);
}

/* ---------------------------------------------------------------- the whole problem */

typedef struct workspace {
    decoded x;
    double *xs, *sc, *z, *o_ref;
    float *sf, *tf, *pf, *dpf, *dq_acc, *dk_acc, *dv_acc;
} workspace;

static void workspace_free(workspace *w) {
    free(w->x.in), free(w->x.o), free(w->x.dout);
    free(w->xs), free(w->sc), free(w->z), free(w->o_ref);
    free(w->sf), free(w->tf), free(w->pf), free(w->dpf), free(w->dq_acc);
    free(w->dk_acc), free(w->dv_acc);
}

static int workspace_init(workspace *w, const bwd_problem *bp, const uint16_t *o) {
    const attn_problem *p = bp->fwd;
    const attn_shape *s = &p->s;
    const size_t keys = (size_t)s->seqlen_k + 1;
    const size_t acc = (size_t)(s->batch * s->seqlen_k * s->nheads_q) + 1;
    memset(w, 0, sizeof *w);
    w->x.in = decode_all(s->dtype, p->in, p->in_elems);
    w->x.o = decode_all(s->dtype, o, p->o_elems);
    w->x.dout = decode_all(s->dtype, bp->grad_out, p->o_elems);
    w->xs = malloc(keys * sizeof *w->xs), w->sc = malloc(keys * sizeof *w->sc);
    w->z = malloc(keys * sizeof *w->z), w->o_ref = malloc(((size_t)s->dv + 1) * sizeof *w->o_ref);
    w->sf = malloc(keys * sizeof *w->sf), w->tf = malloc(keys * sizeof *w->tf);
    w->pf = malloc(keys * sizeof *w->pf), w->dpf = malloc(keys * sizeof *w->dpf);
    w->dq_acc = malloc(((size_t)s->dqk + 1) * sizeof *w->dq_acc);
    w->dk_acc = calloc(acc * (size_t)s->dqk, sizeof *w->dk_acc);
    w->dv_acc = calloc(acc * (size_t)s->dv, sizeof *w->dv_acc);
    return w->x.in && w->x.o && w->x.dout && w->xs && w->sc && w->z && w->o_ref && w->sf && w->tf &&
                   w->pf && w->dpf && w->dq_acc && w->dk_acc && w->dv_acc
               ? 0
               : -1;
}

/* The naive dk, dv: each query head's accumulator rounded, then the group's
 * sum (GQA's repeat_interleave, backwards) rounded. */
static void naive_reduce_heads(bwd_problem *bp, const workspace *w) {
    const attn_shape *s = &bp->fwd->s;
    const int64_t group = s->nheads_q / s->nheads_kv;
    for (int t = BWD_DK; t <= BWD_DV; ++t) {
        const int64_t dim = t == BWD_DK ? s->dqk : s->dv;
        const float *acc = t == BWD_DK ? w->dk_acc : w->dv_acc;
        for (int64_t key = 0; key < s->batch * s->seqlen_k; ++key)
            for (int64_t hk = 0; hk < s->nheads_kv; ++hk)
                for (int64_t d = 0; d < dim; ++d) {
                    float sum = 0.0f;
                    for (int64_t h = hk * group; h < (hk + 1) * group; ++h)
                        sum += round_to(s->dtype, acc[(size_t)((key * s->nheads_q + h) * dim + d)]);
                    bp->naive[t][(size_t)((key * s->nheads_kv + hk) * dim + d)] = round_to(s->dtype, sum);
                }
    }
}

/* Every row of every sequence and head. */
static void all_rows(bwd_problem *bp, const workspace *w, const uint16_t *o, const float *lse,
                     double *max_ref_o) {
    const attn_problem *p = bp->fwd;
    const attn_shape *s = &p->s;
    row_ctx r = {.bp = bp, .x = &w->x, .scale = attn_effective_scale(s), .xs = w->xs, .sc = w->sc,
             .z = w->z, .sf = w->sf, .tf = w->tf, .pf = w->pf, .dpf = w->dpf, .dq_acc = w->dq_acc,
             .dk_acc = w->dk_acc, .dv_acc = w->dv_acc};
    r.z_keep = (double)(1.0f / (1.0f - bp->feat.dropout_p));
    for (int64_t b = 0; b < seq_count(bp); ++b)
        for (int64_t h = 0; h < s->nheads_q; ++h) {
            r.s = seq_of(bp, b);
            r.h = h;
            r.hk = h / (s->nheads_q / s->nheads_kv);
            r.slope = bp->feat.alibi_slopes ? bp->feat.alibi_slopes[b * bp->feat.alibi_batch_stride + h] : 0.0;
            for (r.i = 0; r.i < r.s.sq; ++r.i) {
                const size_t o_at = at(p->o_stride, r.s.tb, r.s.q0 + r.i, h);
                const double row_lse = lse[(r.s.tb * s->nheads_q + h) * s->seqlen_q + r.s.q0 + r.i];
                r.q = w->x.in + p->q_off + at(p->q_stride, r.s.tb, r.s.q0 + r.i, h);
                r.o = w->x.o + o_at;
                r.dout = w->x.dout + o_at;
                visible(bp, &r.s, r.i, &r.lo, &r.hi);
                score_row(&r);
                forward_row(&r, o + o_at, row_lse, w->o_ref, &bp->fwd_check, max_ref_o);
                bp->row_seen[row_index(&r)] = row_lse != -INFINITY; /* a fully masked row adds nothing */
                if (bp->row_seen[row_index(&r)])
                    reference_row(&r, row_lse);
                naive_row(&r);
            }
        }
}

int bwd_reference(bwd_problem *bp, const uint16_t *o, const float *lse) {
    const attn_shape *s = &bp->fwd->s;
    workspace w;
    double max_ref_o = 0.0;
    int rc = -1;
    memset(&w, 0, sizeof w);
    if (!varlen_fits(bp) || workspace_init(&w, bp, o) != 0)
        goto out;
    for (int t = 0; t < 3; ++t) {
        memset(bp->ref[t], 0, dense_elems(s, t) * sizeof *bp->ref[t]);
        memset(bp->naive[t], 0, dense_elems(s, t) * sizeof *bp->naive[t]);
    }
    memset(bp->row_seen, 0, (size_t)(s->batch * s->seqlen_q * s->nheads_q) + 1);
    memset(bp->key_seen, 0, (size_t)(s->batch * s->seqlen_k * s->nheads_kv) + 1);
    memset(&bp->fwd_check, 0, sizeof bp->fwd_check);
    all_rows(bp, &w, o, lse, &max_ref_o);
    naive_reduce_heads(bp, &w);
    bwd_forward_check *c = &bp->fwd_check;
    c->tol = (s->dtype == 0 ? 1.0 / 2048.0 : 1.0 / 256.0) * max_ref_o + 1e-4;
    c->ok = !c->why[0] && c->max_err <= c->tol;
    if (c->ok == 0 && !c->why[0])
        snprintf(c->why, sizeof c->why, "forward output error %.3g > %.3g", c->max_err, c->tol);
    for (int t = 0; t < 3; ++t) {
        bp->max_abs_ref[t] = 0.0;
        for (size_t n = 0; n < dense_elems(s, t); ++n)
            bp->max_abs_ref[t] = fmax(bp->max_abs_ref[t], fabs(bp->ref[t][n]));
    }
    rc = 0;
out:
    workspace_free(&w);
    return rc;
}

/* ---------------------------------------------------------------- checking */

static void fail_once(bwd_result *r, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

static void fail_once(bwd_result *r, const char *fmt, ...) {
    r->ok = 0;
    if (r->why[0] != '\0')
        return;
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(r->why, sizeof r->why, fmt, ap);
    va_end(ap);
}

/* Where gradient t lives in the grads buffer, and its extents. */
typedef struct grad_view {
    size_t off;
    const int64_t *stride;
    int64_t seq, heads, dim;
    const unsigned char *seen;
} grad_view;

static grad_view view_of(const bwd_problem *bp, int t) {
    const attn_problem *p = bp->fwd;
    const attn_shape *s = &p->s;
    grad_view g;
    g.off = t == BWD_DQ ? p->q_off : t == BWD_DK ? p->k_off : p->v_off;
    g.stride = t == BWD_DQ ? p->q_stride : t == BWD_DK ? p->k_stride : p->v_stride;
    g.seq = t == BWD_DQ ? s->seqlen_q : s->seqlen_k;
    g.heads = t == BWD_DQ ? s->nheads_q : s->nheads_kv;
    g.dim = t == BWD_DV ? s->dv : s->dqk;
    g.seen = t == BWD_DQ ? bp->row_seen : bp->key_seen;
    return g;
}

/* max |naive - ref| of gradient t over the rows that see a key. */
static double naive_error(const bwd_problem *bp, int t) {
    const attn_shape *s = &bp->fwd->s;
    const grad_view g = view_of(bp, t);
    double worst = 0.0;
    for (size_t row = 0; row < (size_t)(s->batch * g.seq * g.heads); ++row)
        for (int64_t d = 0; g.seen[row] && d < g.dim; ++d) {
            const size_t n = row * (size_t)g.dim + (size_t)d;
            worst = fmax(worst, fabs((double)bp->naive[t][n] - bp->ref[t][n]));
        }
    return worst;
}

static double tolerance(const bwd_problem *bp, int t, int rule, double naive_err) {
    const double rounding = bp->fwd->s.dtype == 0 ? 1.0 / 2048.0 : 1.0 / 256.0;
    const double slack = 1e-4 * fmax(1.0, bp->max_abs_ref[t]);
    const double tight = rounding * bp->max_abs_ref[t] + slack;
    return rule == BWD_RULE_FLASH ? fmax(tight, 3.0 * naive_err + slack) : tight;
}

static void check_grad(const bwd_problem *bp, const uint16_t *grads, int t, int rule,
                       unsigned char *owned, bwd_result *r) {
    const attn_shape *s = &bp->fwd->s;
    const grad_view g = view_of(bp, t);
    r->naive_err[t] = naive_error(bp, t);
    r->tol[t] = tolerance(bp, t, rule, r->naive_err[t]);
    for (int64_t b = 0; b < s->batch; ++b)
        for (int64_t i = 0; i < g.seq; ++i)
            for (int64_t h = 0; h < g.heads; ++h) {
                const size_t row = (size_t)((b * g.seq + i) * g.heads + h), base = g.off + at(g.stride, b, i, h);
                const int seen = g.seen[row];
                memset(owned + base, 1, (size_t)g.dim);
                for (int64_t d = 0; d < g.dim; ++d) {
                    const double got = attn_decode(s->dtype, grads[base + (size_t)d]);
                    const double want = bp->ref[t][row * (size_t)g.dim + (size_t)d];
                    const double err = fabs(got - want);
                    r->nan_values += isnan(got) != 0;
                    r->bad_zeros += !seen && got != 0.0;
                    if (seen ? !(err <= r->tol[t]) : got != 0.0)
                        fail_once(r, "%s[b=%lld,%lld,h=%lld,d=%lld] = %.6g, want %.6g%s", bwd_grad_name(t),
                                  (long long)b, (long long)i, (long long)h, (long long)d, got, want,
                                  seen ? "" : " exactly (unseen)");
                    if (seen && !(err <= r->max_err[t]))
                        r->max_err[t] = isnan(err) ? INFINITY : err;
                }
            }
}

void bwd_check_rule(const bwd_problem *bp, const uint16_t *grads, int rule, bwd_result *r) {
    const attn_problem *p = bp->fwd;
    memset(r, 0, sizeof *r);
    r->ok = 1;
    unsigned char *owned = calloc(p->in_elems + 1, 1);
    if (!owned) {
        fail_once(r, "out of memory");
        return;
    }
    for (int t = 0; t < 3; ++t)
        check_grad(bp, grads, t, rule, owned, r);
    for (size_t n = 0; n < p->in_elems; ++n)
        r->stray_writes += !owned[n] && grads[n] != 0xffffu;
    free(owned);
    if (r->stray_writes > 0)
        fail_once(r, "%lld gradient-buffer gap elements were written", (long long)r->stray_writes);
    if (r->nan_values > 0)
        fail_once(r, "%lld NaN values", (long long)r->nan_values);
}

void bwd_check(const bwd_problem *bp, const uint16_t *grads, bwd_result *r) {
    bwd_check_rule(bp, grads, BWD_RULE_TIGHT, r);
}
