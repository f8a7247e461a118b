/*
 * tests/gpu/bwd_check.c - see bwd_check.h.
 */
#include "bwd_check.h"

#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

const char *bwd_grad_name(int t) { return t == BWD_DQ ? "dq" : t == BWD_DK ? "dk" : "dv"; }

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
    memset(bp, 0, sizeof *bp);
    bp->fwd = p;
    bp->grad_out = malloc((p->o_elems + 1) * sizeof *bp->grad_out);
    for (int t = 0; t < 3; ++t)
        bp->ref[t] = calloc(dense_elems(s, t), sizeof *bp->ref[t]);
    bp->row_seen = calloc(rows, 1);
    bp->key_seen = calloc(keys, 1);
    if (!bp->grad_out || !bp->ref[0] || !bp->ref[1] || !bp->ref[2] || !bp->row_seen || !bp->key_seen) {
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
    for (int t = 0; t < 3; ++t)
        free(bp->ref[t]);
    free(bp->row_seen);
    free(bp->key_seen);
    memset(bp, 0, sizeof *bp);
}

/* ---------------------------------------------------------------- reference */

static size_t at(const int64_t stride[3], int64_t b, int64_t i, int64_t h) {
    return (size_t)(b * stride[0] + i * stride[1] + h * stride[2]);
}

/* The forward's masks (attn_check.c's rule; no window in the public API). */
static int key_visible(const attn_shape *s, int64_t i, int64_t j) {
    switch (s->mask) {
    case 1: return j <= i + s->seqlen_k - s->seqlen_q; /* bottom-right */
    case 2: return j <= i;                             /* top-left */
    default: return 1;
    }
}

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

/* acc[d] += w * x[d] */
static void axpy(double *acc, double w, const double *x, int64_t n) {
    for (int64_t d = 0; d < n; ++d)
        acc[d] += w * x[d];
}

/* Every contribution of query row i of head h. */
static void reference_row(bwd_problem *bp, const decoded *x, double lse, int64_t b, int64_t i,
                          int64_t h) {
    const attn_problem *p = bp->fwd;
    const attn_shape *s = &p->s;
    const int64_t hk = h / (s->nheads_q / s->nheads_kv);
    const double scale = attn_effective_scale(s);
    const double *q = x->in + p->q_off + at(p->q_stride, b, i, h);
    const double *dout = x->dout + at(p->o_stride, b, i, h);
    const double row_d = dot(dout, x->o + at(p->o_stride, b, i, h), s->dv);
    double *dq = bp->ref[BWD_DQ] + ((b * s->seqlen_q + i) * s->nheads_q + h) * s->dqk;
    for (int64_t j = 0; j < s->seqlen_k; ++j) {
        if (!key_visible(s, i, j))
            continue;
        const size_t key = (size_t)((b * s->seqlen_k + j) * s->nheads_kv + hk);
        const double *k = x->in + p->k_off + at(p->k_stride, b, j, hk);
        const double *v = x->in + p->v_off + at(p->v_stride, b, j, hk);
        const double prob = exp(scale * dot(q, k, s->dqk) - lse);
        const double ds = prob * (dot(dout, v, s->dv) - row_d);
        axpy(dq, scale * ds, k, s->dqk);
        axpy(bp->ref[BWD_DK] + key * (size_t)s->dqk, scale * ds, q, s->dqk);
        axpy(bp->ref[BWD_DV] + key * (size_t)s->dv, prob, dout, s->dv);
        bp->key_seen[key] = 1;
    }
}

int bwd_reference(bwd_problem *bp, const uint16_t *o, const float *lse) {
    const attn_problem *p = bp->fwd;
    const attn_shape *s = &p->s;
    decoded x = {decode_all(s->dtype, p->in, p->in_elems), decode_all(s->dtype, o, p->o_elems),
                 decode_all(s->dtype, bp->grad_out, p->o_elems)};
    int rc = -1;
    if (!x.in || !x.o || !x.dout)
        goto out;
    for (int t = 0; t < 3; ++t)
        memset(bp->ref[t], 0, dense_elems(s, t) * sizeof *bp->ref[t]);
    for (int64_t b = 0; b < s->batch; ++b)
        for (int64_t i = 0; i < s->seqlen_q; ++i)
            for (int64_t h = 0; h < s->nheads_q; ++h) {
                const double row_lse = lse[(b * s->nheads_q + h) * s->seqlen_q + i];
                const size_t row = (size_t)((b * s->seqlen_q + i) * s->nheads_q + h);
                bp->row_seen[row] = row_lse != -INFINITY; /* a fully masked row adds nothing */
                if (bp->row_seen[row])
                    reference_row(bp, &x, row_lse, b, i, h);
            }
    for (int t = 0; t < 3; ++t) {
        bp->max_abs_ref[t] = 0.0;
        for (size_t n = 0; n < dense_elems(s, t); ++n)
            bp->max_abs_ref[t] = fmax(bp->max_abs_ref[t], fabs(bp->ref[t][n]));
    }
    rc = 0;
out:
    free(x.in);
    free(x.o);
    free(x.dout);
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

static void check_grad(const bwd_problem *bp, const uint16_t *grads, int t, unsigned char *owned,
                       bwd_result *r) {
    const attn_shape *s = &bp->fwd->s;
    const grad_view g = view_of(bp, t);
    const double rounding = s->dtype == 0 ? 1.0 / 2048.0 : 1.0 / 256.0;
    r->tol[t] = rounding * bp->max_abs_ref[t] + 1e-4 * fmax(1.0, bp->max_abs_ref[t]);
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

void bwd_check(const bwd_problem *bp, const uint16_t *grads, bwd_result *r) {
    const attn_problem *p = bp->fwd;
    memset(r, 0, sizeof *r);
    r->ok = 1;
    unsigned char *owned = calloc(p->in_elems + 1, 1);
    if (!owned) {
        fail_once(r, "out of memory");
        return;
    }
    for (int t = 0; t < 3; ++t)
        check_grad(bp, grads, t, owned, r);
    for (size_t n = 0; n < p->in_elems; ++n)
        r->stray_writes += !owned[n] && grads[n] != 0xffffu;
    free(owned);
    if (r->stray_writes > 0)
        fail_once(r, "%lld gradient-buffer gap elements were written", (long long)r->stray_writes);
    if (r->nan_values > 0)
        fail_once(r, "%lld NaN values", (long long)r->nan_values);
}
