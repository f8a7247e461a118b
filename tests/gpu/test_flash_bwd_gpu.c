/*
 * tests/gpu/test_flash_bwd_gpu.c - the fast backward (templates/flash_bwd.cuh
 * through runtime/flash_bwd.c's fajit__flash_bwd_run, before attn_bwd.c
 * routes calls to it) against an fp64 CPU backward.
 *
 * Per case: random (~N(0,1), fixed seeds) fp16/bf16 q, k, v and dO, laid out
 * contiguously in one buffer; the forward (fajit_attn_fwd) gives O and LSE;
 * tests/gpu/bwd_check.h's fp64 backward runs on them. Then struct
 * fajit_bwd_params is filled as attn_bwd.c fills it, the gradient buffer is
 * poisoned (0xFF bytes: NaN), fajit__flash_bwd_run runs, and bwd_check
 * compares (exact zeros for rows and keys that see nothing, no NaN, poison
 * kept in the gaps). The error allowed per gradient is FlashAttention's
 * rule: twice the error of the same backward computed naively in the input
 * dtype (scores, probabilities, dP and dS rounded to fp16/bf16, as a framework's
 * unfused backward would), plus bwd_check's slack (output rounding of max|ref|
 * and 1e-4).
 *
 * Grid: head dims 32, 64, 72, 128, 200, 256 and 192/128 x seqlen pairs among
 * 1, 17, 113, 256, 1023 with seqlen_q != seqlen_k both ways x none, causal,
 * causal-tl x GQA 4:1 (and MQA, MHA) x fp16/bf16, plus no keys and no
 * queries; three of each head dim's cases, and a few more, again in
 * deterministic mode, run 3 times and required bit-identical. Then, as
 * information, TFLOPs (2.5 x 4 b h sq sk d, halved for causal) at b 4, h 16,
 * s 4096, fp16, d 64, 128 and 256, no mask and causal: the fast backward
 * with the heuristic's tiles (with --sweep also a few others, to tune the
 * heuristic by), deterministic mode, and (d <= 128) the reference
 * (fajit_attn_bwd, kernel REFERENCE).
 *
 * Usage: test_flash_bwd_gpu [--quick] [--no-bench] [--sweep]: --quick runs a
 * few small cases and no bench (for compute-sanitizer), --sweep adds the tile
 * sweep to the bench. Exit 0 pass, 1 fail, 77 no GPU.
 */
#include <cuda_runtime_api.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "attn_check.h"
#include "bwd_check.h"
#include "fajit.h"
#include "precompile.h"
#include "runtime/flash_bwd.h"
#include "runtime/runtime.h"

#define MAX_SEQS 8

/* The forward's features, passed alike to the forward and the backward. */
typedef struct ffeat {
    int wl, wr;            /* window; -1 unbounded */
    float softcap;         /* 0: off */
    int alibi;             /* 0 off, 1 slopes per head, 2 per batch and head */
    float p;               /* dropout */
    uint64_t seed, offset;
    int nseq;              /* varlen when > 0: the attn_shape has batch 1 and the total lengths */
    int lens_q[MAX_SEQS], lens_k[MAX_SEQS];
} ffeat;

typedef struct fcase {
    attn_shape s;
    int det; /* deterministic mode: bwd-dkdv + bwd-dq, RUNS runs bit-identical */
    ffeat f;
} fcase;

/* Host arrays of a case's features: ALiBi slopes, varlen's prefix sums and
 * longest sequences. */
typedef struct case_host {
    float slopes[MAX_SEQS * 16];
    int32_t cu_q[MAX_SEQS + 1], cu_k[MAX_SEQS + 1];
    int64_t max_q, max_k;
} case_host;

#define RUNS 3
#define MAX_CASES 128

/* ---------------------------------------------------------------- the grid */

static fcase make_case(int dqk, int dv, int dtype, int mask, int64_t b, int64_t sq, int64_t sk, int64_t hq,
                       int64_t hkv) {
    fcase c = {.s = {.batch = b, .seqlen_q = sq, .seqlen_k = sk, .nheads_q = hq, .nheads_kv = hkv, .dqk = dqk,
                     .dv = dv, .dtype = dtype, .mask = mask, .softmax_scale = 0.0f},
               .f = {.wl = -1, .wr = -1}};
    return c;
}

static const int head_dims[][2] = {{32, 32}, {64, 64}, {72, 72}, {128, 128}, {200, 200}, {256, 256}, {192, 128}};
#define N_HEAD_DIMS (sizeof head_dims / sizeof head_dims[0])

static fcase window(fcase c, int left, int right) {
    c.f.wl = left, c.f.wr = right;
    return c;
}

static fcase dropout(fcase c, float p, uint64_t seed, uint64_t offset) {
    c.f.p = p, c.f.seed = seed, c.f.offset = offset;
    return c;
}

/* c made varlen over n sequences: batch 1 with the total lengths. */
static fcase varlen(fcase c, const int *lq, const int *lk, int n) {
    c.f.nseq = n;
    c.s.batch = 1;
    c.s.seqlen_q = c.s.seqlen_k = 0;
    for (int b = 0; b < n; ++b) {
        c.f.lens_q[b] = lq[b], c.f.lens_k[b] = lk[b];
        c.s.seqlen_q += lq[b], c.s.seqlen_k += lk[b];
    }
    return c;
}

/* Window, softcap, ALiBi per batch and head and dropout at once. */
static fcase all_features(fcase c, int left, int right) {
    c = window(c, left, right);
    c.f.softcap = 15.0f;
    c.f.alibi = 2;
    return dropout(c, 0.17f, 0x5eed0000u + (uint64_t)c.s.dqk, (1ull << 32) + 5);
}

static fcase det_case(fcase c);

/* A few small cases, every mode and kernel path, for compute-sanitizer. */
static size_t quick_grid(fcase *cs, size_t cap) {
    const fcase quick[] = {
        make_case(64, 64, 0, 1, 1, 113, 256, 4, 1),
        make_case(72, 72, 1, 2, 1, 256, 113, 2, 2),
        {.s = {.batch = 1, .seqlen_q = 113, .seqlen_k = 256, .nheads_q = 4, .nheads_kv = 2, .dqk = 128, .dv = 128,
               .dtype = 0, .mask = 1}, .det = 1},
        {.s = {.batch = 1, .seqlen_q = 130, .seqlen_k = 70, .nheads_q = 2, .nheads_kv = 1, .dqk = 192, .dv = 128,
               .dtype = 1, .mask = 2}, .det = 1, .f = {.wl = -1, .wr = -1}},
    };
    static const int lq[] = {0, 1, 17, 140}, lk[] = {5, 0, 33, 70};
    size_t n = 0;
    for (; n < sizeof quick / sizeof quick[0] && n < cap; ++n)
        cs[n] = quick[n];
    if (n + 2 <= cap) { /* every feature at once, dense and varlen */
        fcase c = all_features(make_case(64, 64, 0, 0, 1, 150, 200, 4, 2), 40, 20);
        cs[n++] = c;
        c = all_features(make_case(128, 128, 1, 1, 1, 0, 0, 4, 2), 30, -1);
        cs[n++] = det_case(varlen(c, lq, lk, 4));
    }
    return n;
}

/* The same case in deterministic mode. */
static fcase det_case(fcase c) {
    c.det = 1;
    return c;
}

/* Each feature with and without a causal mask, GQA/MQA, seqlen_q != seqlen_k,
 * fp16 and bf16, some in deterministic mode; then all of them together. */
static size_t feature_grid(fcase *cs, size_t n, size_t cap) {
    static const int lq[] = {0, 1, 17, 113, 64, 3}, lk[] = {5, 0, 1, 150, 64, 200};
    static const int lq2[] = {33, 0, 1, 70, 300}, lk2[] = {33, 0, 1, 70, 129};
    const fcase f[] = {
        window(make_case(64, 64, 0, 0, 2, 113, 256, 8, 2), 16, 7),
        window(make_case(128, 128, 1, 1, 2, 256, 113, 4, 1), 5, -1),
        det_case(window(make_case(72, 72, 0, 0, 1, 200, 200, 4, 2), 0, 0)), /* the causal mask + left 0 */
        window(make_case(64, 64, 1, 0, 2, 90, 300, 4, 4), -1, 3),
        det_case(window(make_case(128, 128, 0, 2, 1, 300, 150, 4, 2), 40, -1)),
        window(make_case(256, 256, 1, 0, 1, 1023, 1023, 2, 1), 100, 60),
        window(make_case(192, 128, 0, 1, 1, 700, 900, 4, 1), 130, -1),
        {.s = {.batch = 2, .seqlen_q = 113, .seqlen_k = 256, .nheads_q = 8, .nheads_kv = 2, .dqk = 64, .dv = 64,
               .dtype = 0, .mask = 0}, .f = {.wl = -1, .wr = -1, .softcap = 30.0f}},
        det_case((fcase){.s = {.batch = 2, .seqlen_q = 256, .seqlen_k = 113, .nheads_q = 4, .nheads_kv = 1,
                               .dqk = 128, .dv = 128, .dtype = 1, .mask = 1}, .f = {.wl = -1, .wr = -1, .softcap = 5.0f}}),
        {.s = {.batch = 2, .seqlen_q = 100, .seqlen_k = 90, .nheads_q = 8, .nheads_kv = 2, .dqk = 64, .dv = 64,
               .dtype = 1, .mask = 0}, .f = {.wl = -1, .wr = -1, .alibi = 1}},
        det_case((fcase){.s = {.batch = 2, .seqlen_q = 90, .seqlen_k = 200, .nheads_q = 4, .nheads_kv = 1,
                               .dqk = 128, .dv = 128, .dtype = 0, .mask = 1}, .f = {.wl = -1, .wr = -1, .alibi = 2}}),
        {.s = {.batch = 2, .seqlen_q = 150, .seqlen_k = 120, .nheads_q = 4, .nheads_kv = 2, .dqk = 192, .dv = 128,
               .dtype = 0, .mask = 2}, .f = {.wl = 20, .wr = 4, .alibi = 1}},
        dropout(make_case(64, 64, 0, 0, 2, 120, 100, 8, 2), 0.17f, 0xfeedface12345678ull, (5ull << 32) + 3),
        det_case(dropout(make_case(128, 128, 1, 1, 2, 100, 257, 4, 1), 0.5f, 42, 7)),
        dropout(make_case(72, 72, 0, 2, 1, 256, 256, 4, 1), 0.17f, 1234, 0),
        det_case(dropout(make_case(256, 256, 1, 0, 1, 64, 200, 2, 2), 0.1f, 99, 1ull << 33)),
        varlen(make_case(64, 64, 0, 1, 1, 0, 0, 4, 2), lq, lk, 6),
        det_case(varlen(make_case(128, 128, 1, 0, 1, 0, 0, 4, 1), lq, lk, 6)),
        varlen(make_case(72, 72, 0, 2, 1, 0, 0, 2, 2), lq2, lk2, 5),
        all_features(make_case(128, 128, 0, 0, 2, 65, 90, 4, 2), 40, 20),
        det_case(varlen(all_features(make_case(64, 64, 1, 1, 1, 0, 0, 4, 2), 20, -1), lq, lk, 6)),
        det_case(all_features(make_case(256, 256, 0, 2, 1, 200, 150, 2, 1), 50, -1)),
        varlen(all_features(make_case(128, 128, 1, 0, 1, 0, 0, 8, 2), 30, 10), lq2, lk2, 5),
    };
    for (size_t i = 0; i < sizeof f / sizeof f[0] && n < cap; ++i)
        cs[n++] = f[i];
    return n;
}

static size_t build_grid(fcase *cs, size_t cap) {
    size_t n = 0;
    for (size_t d = 0; d < N_HEAD_DIMS && n + 7 <= cap; ++d) {
        const int dqk = head_dims[d][0], dv = head_dims[d][1], t = (int)(d % 2);
        cs[n++] = make_case(dqk, dv, t, 0, 2, 113, 256, 8, 2);       /* GQA 4:1 */
        cs[n++] = make_case(dqk, dv, 1 - t, 1, 2, 256, 113, 4, 1);   /* masked rows, MQA */
        cs[n++] = make_case(dqk, dv, t, 2, 1, 17, 1023, 4, 1);       /* top-left: unseen keys */
        cs[n++] = make_case(dqk, dv, 1 - t, 1, 1, 1023, 17, 8, 2);   /* bottom-right, few keys */
        cs[n++] = make_case(dqk, dv, t, 1, 2, 1, 256, 4, 1);         /* one query row */
        cs[n++] = make_case(dqk, dv, 1 - t, 2, 1, 256, 256, 2, 2);   /* MHA, square */
        cs[n++] = make_case(dqk, dv, t, 0, 1, 17, 1, 4, 2);          /* one key */
    }
    for (size_t d = 0; d < N_HEAD_DIMS && n + 3 <= cap; ++d) { /* deterministic mode */
        const size_t first = d * 7;
        cs[n++] = det_case(cs[first]);
        cs[n++] = det_case(cs[first + 1]);
        cs[n++] = det_case(cs[first + 5]);
    }
    if (n + 8 <= cap) {
        cs[n++] = make_case(64, 64, 0, 1, 1, 1023, 1023, 4, 1);
        cs[n++] = make_case(128, 128, 1, 2, 1, 1023, 1023, 4, 1);
        cs[n++] = det_case(make_case(256, 256, 0, 1, 1, 1023, 1023, 2, 1));
        cs[n++] = make_case(64, 64, 1, 0, 2, 5, 0, 4, 2);  /* no keys: dq = 0 */
        cs[n++] = make_case(128, 128, 0, 1, 2, 0, 7, 4, 2); /* no rows: dk = dv = 0 */
        cs[n++] = det_case(make_case(64, 64, 1, 0, 2, 5, 0, 4, 2));
        cs[n++] = det_case(make_case(128, 128, 0, 1, 2, 0, 7, 4, 2));
    }
    return feature_grid(cs, n, cap);
}

/* ---------------------------------------------------------------- the naive backward */

static double round_to(int dtype, double x) {
    const float f = (float)x;
    return dtype == 0 ? attn_half_to_double(attn_float_to_half(f)) : attn_bf16_to_double(attn_float_to_bf16(f));
}

static double *decode_all(int dtype, const uint16_t *bits, size_t n) {
    double *x = malloc((n + 1) * sizeof *x);
    for (size_t i = 0; x && i < n; ++i)
        x[i] = attn_decode(dtype, bits[i]);
    return x;
}

static size_t at3(const int64_t st[3], int64_t b, int64_t i, int64_t h) {
    return (size_t)(b * st[0] + i * st[1] + h * st[2]);
}

static int visible(const attn_shape *s, int64_t i, int64_t j) {
    return s->mask == 1 ? j <= i + s->seqlen_k - s->seqlen_q : s->mask == 2 ? j <= i : 1;
}

static double dotn(const double *x, const double *y, int64_t n) {
    double acc = 0.0;
    for (int64_t d = 0; d < n; ++d)
        acc += x[d] * y[d];
    return acc;
}

typedef struct naive_in {
    double *in, *o, *dout;
} naive_in;

/* One query row's contributions, every intermediate rounded to the dtype. */
static void naive_row(const bwd_problem *bp, const naive_in *x, double lse, int64_t b, int64_t i, int64_t h,
                      double *g[3]) {
    const attn_problem *p = bp->fwd;
    const attn_shape *s = &p->s;
    const int64_t hk = h / (s->nheads_q / s->nheads_kv);
    const double scale = attn_effective_scale(s);
    const double *q = x->in + p->q_off + at3(p->q_stride, b, i, h);
    const double *dout = x->dout + at3(p->o_stride, b, i, h);
    const double row_d = dotn(dout, x->o + at3(p->o_stride, b, i, h), s->dv);
    double *dq = g[BWD_DQ] + ((b * s->seqlen_q + i) * s->nheads_q + h) * s->dqk;
    for (int64_t j = 0; j < s->seqlen_k; ++j) {
        if (!visible(s, i, j))
            continue;
        const size_t key = (size_t)((b * s->seqlen_k + j) * s->nheads_kv + hk);
        const double *k = x->in + p->k_off + at3(p->k_stride, b, j, hk);
        const double *v = x->in + p->v_off + at3(p->v_stride, b, j, hk);
        const double score = round_to(s->dtype, round_to(s->dtype, dotn(q, k, s->dqk)) * scale);
        const double prob = round_to(s->dtype, exp(score - lse));
        const double dp = round_to(s->dtype, dotn(dout, v, s->dv));
        const double ds = round_to(s->dtype, prob * (dp - row_d));
        double *dk = g[BWD_DK] + key * (size_t)s->dqk, *dv = g[BWD_DV] + key * (size_t)s->dv;
        for (int64_t d = 0; d < s->dqk; ++d) {
            dq[d] += ds * k[d];
            dk[d] += ds * q[d];
        }
        for (int64_t d = 0; d < s->dv; ++d)
            dv[d] += prob * dout[d];
    }
}

/* Max |naive - ref| per gradient over the seen rows/keys. 0, or -1 (memory). */
static int naive_errors(const bwd_problem *bp, const uint16_t *o, const float *lse, double err[3]) {
    const attn_problem *p = bp->fwd;
    const attn_shape *s = &p->s;
    const size_t n[3] = {(size_t)(s->batch * s->seqlen_q * s->nheads_q * s->dqk) + 1,
                         (size_t)(s->batch * s->seqlen_k * s->nheads_kv * s->dqk) + 1,
                         (size_t)(s->batch * s->seqlen_k * s->nheads_kv * s->dv) + 1};
    naive_in x = {decode_all(s->dtype, p->in, p->in_elems), decode_all(s->dtype, o, p->o_elems),
                  decode_all(s->dtype, bp->grad_out, p->o_elems)};
    double *g[3] = {calloc(n[0], sizeof(double)), calloc(n[1], sizeof(double)), calloc(n[2], sizeof(double))};
    int rc = -1;
    if (!x.in || !x.o || !x.dout || !g[0] || !g[1] || !g[2])
        goto out;
    for (int64_t b = 0; b < s->batch; ++b)
        for (int64_t i = 0; i < s->seqlen_q; ++i)
            for (int64_t h = 0; h < s->nheads_q; ++h) {
                const double row_lse = lse[(b * s->nheads_q + h) * s->seqlen_q + i];
                if (row_lse != -INFINITY)
                    naive_row(bp, &x, row_lse, b, i, h, g);
            }
    const double scale = attn_effective_scale(s);
    for (int t = 0; t < 3; ++t) {
        err[t] = 0.0;
        for (size_t e = 0; e + 1 < n[t]; ++e) {
            const double got = round_to(s->dtype, g[t][e] * (t == BWD_DV ? 1.0 : scale));
            err[t] = fmax(err[t], fabs(got - bp->ref[t][e]));
        }
    }
    rc = 0;
out:
    free(x.in);
    free(x.o);
    free(x.dout);
    for (int t = 0; t < 3; ++t)
        free(g[t]);
    return rc;
}

/* ---------------------------------------------------------------- device side */

typedef struct device_buffers {
    void *in, *o, *dout, *grads;
    float *lse, *slopes;
    int32_t *cu_q, *cu_k;
} device_buffers;

static void free_buffers(device_buffers *d) {
    cudaFree(d->in);
    cudaFree(d->o);
    cudaFree(d->dout);
    cudaFree(d->grads);
    cudaFree(d->lse);
    cudaFree(d->slopes);
    cudaFree(d->cu_q);
    cudaFree(d->cu_k);
}

/* ---------------------------------------------------------------- features */

static int has_features(const fcase *c) {
    return c->f.wl >= 0 || c->f.wr >= 0 || c->f.softcap != 0.0f || c->f.alibi || c->f.p > 0.0f || c->f.nseq > 0;
}

static uint64_t next_u64(uint64_t *state) {
    uint64_t z = (*state += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

/* ALiBi's slopes 2^-1 .. 2^-8 at random, varlen's prefix sums and maxima. */
static void make_case_host(const fcase *c, uint64_t seed, case_host *h) {
    uint64_t state = seed;
    memset(h, 0, sizeof *h);
    for (size_t i = 0; i < sizeof h->slopes / sizeof h->slopes[0]; ++i)
        h->slopes[i] = ldexpf(1.0f, -1 - (int)(next_u64(&state) % 8));
    for (int b = 0; b < c->f.nseq; ++b) {
        h->cu_q[b + 1] = h->cu_q[b] + c->f.lens_q[b];
        h->cu_k[b + 1] = h->cu_k[b] + c->f.lens_k[b];
        h->max_q = c->f.lens_q[b] > h->max_q ? c->f.lens_q[b] : h->max_q;
        h->max_k = c->f.lens_k[b] > h->max_k ? c->f.lens_k[b] : h->max_k;
    }
}

static void host_features(const fcase *c, const case_host *h, bwd_features *f) {
    bwd_features_none(f);
    f->window_left = c->f.wl, f->window_right = c->f.wr;
    f->softcap = c->f.softcap;
    if (c->f.alibi) {
        f->alibi_slopes = h->slopes;
        f->alibi_batch_stride = c->f.alibi == 2 ? c->s.nheads_q : 0;
    }
    f->dropout_p = c->f.p, f->dropout_seed = c->f.seed, f->dropout_offset = c->f.offset;
    if (c->f.nseq > 0)
        f->cu_seqlens_q = h->cu_q, f->cu_seqlens_k = h->cu_k, f->nseq = c->f.nseq;
}

/* The features and (varlen) the launch's shape, written into either
 * argument struct: batch = the sequences, seqlen_q/k = the longest. */
#define SET_FEATURES(a, c, h, d)                                                                  \
    do {                                                                                          \
        (a)->window_left = (c)->f.wl;                                                             \
        (a)->window_right = (c)->f.wr;                                                            \
        (a)->softcap = (c)->f.softcap;                                                            \
        if ((c)->f.alibi) {                                                                       \
            (a)->alibi_slopes = (d)->slopes;                                                      \
            (a)->alibi_batch_stride = (c)->f.alibi == 2 ? (c)->s.nheads_q : 0;                    \
        }                                                                                         \
        (a)->dropout_p = (c)->f.p;                                                                \
        (a)->dropout_seed = (c)->f.seed;                                                          \
        (a)->dropout_offset = (c)->f.offset;                                                      \
        if ((c)->f.nseq > 0) {                                                                    \
            (a)->batch = (c)->f.nseq;                                                             \
            (a)->seqlen_q = (h)->max_q;                                                           \
            (a)->seqlen_k = (h)->max_k;                                                           \
            (a)->cu_seqlens_q = (d)->cu_q;                                                        \
            (a)->cu_seqlens_k = (d)->cu_k;                                                        \
        }                                                                                         \
    } while (0)

static int cuda_failed(cudaError_t e, const char *what, char *why, size_t cap) {
    if (e == cudaSuccess)
        return 0;
    snprintf(why, cap, "%s: %s", what, cudaGetErrorName(e));
    return 1;
}

static int prepare_device(const bwd_problem *bp, const case_host *h, size_t lse_elems, device_buffers *d, char *why,
                          size_t cap) {
    const attn_problem *p = bp->fwd;
    memset(d, 0, sizeof *d);
    return cuda_failed(cudaMalloc((void **)&d->slopes, sizeof h->slopes), "cudaMalloc", why, cap) ||
           cuda_failed(cudaMalloc((void **)&d->cu_q, sizeof h->cu_q), "cudaMalloc", why, cap) ||
           cuda_failed(cudaMalloc((void **)&d->cu_k, sizeof h->cu_k), "cudaMalloc", why, cap) ||
           cuda_failed(cudaMemcpy(d->slopes, h->slopes, sizeof h->slopes, cudaMemcpyHostToDevice), "cudaMemcpy", why,
                       cap) ||
           cuda_failed(cudaMemcpy(d->cu_q, h->cu_q, sizeof h->cu_q, cudaMemcpyHostToDevice), "cudaMemcpy", why, cap) ||
           cuda_failed(cudaMemcpy(d->cu_k, h->cu_k, sizeof h->cu_k, cudaMemcpyHostToDevice), "cudaMemcpy", why, cap) ||
           cuda_failed(cudaMalloc(&d->in, p->in_elems * 2 + 16), "cudaMalloc", why, cap) ||
           cuda_failed(cudaMalloc(&d->o, p->o_elems * 2 + 16), "cudaMalloc", why, cap) ||
           cuda_failed(cudaMalloc(&d->dout, p->o_elems * 2 + 16), "cudaMalloc", why, cap) ||
           cuda_failed(cudaMalloc(&d->grads, p->in_elems * 2 + 16), "cudaMalloc", why, cap) ||
           cuda_failed(cudaMalloc((void **)&d->lse, lse_elems * 4 + 16), "cudaMalloc", why, cap) ||
           cuda_failed(cudaMemcpy(d->in, p->in, p->in_elems * 2, cudaMemcpyHostToDevice), "cudaMemcpy", why, cap) ||
           cuda_failed(cudaMemcpy(d->dout, bp->grad_out, p->o_elems * 2, cudaMemcpyHostToDevice), "cudaMemcpy",
                       why, cap) ||
           cuda_failed(cudaMemset(d->o, 0xff, p->o_elems * 2 + 16), "cudaMemset", why, cap) ||
           cuda_failed(cudaMemset(d->lse, 0xff, lse_elems * 4 + 16), "cudaMemset", why, cap);
}

/* The forward's arguments for a problem (fast kernel where it applies). */
static void fill_fwd_args(const attn_shape *s, const attn_problem *p, const void *in, void *o, float *lse,
                          fajit_attn_args *a) {
    fajit_attn_args_init(a);
    a->q = (const uint16_t *)in + p->q_off;
    a->k = (const uint16_t *)in + p->k_off;
    a->v = (const uint16_t *)in + p->v_off;
    a->o = o;
    a->lse = lse;
    a->batch = s->batch;
    a->seqlen_q = s->seqlen_q;
    a->seqlen_k = s->seqlen_k;
    a->nheads_q = s->nheads_q;
    a->nheads_kv = s->nheads_kv;
    a->dqk = s->dqk;
    a->dv = s->dv;
    a->dtype = s->dtype;
    a->mask = s->mask;
    a->softmax_scale = s->softmax_scale;
    memcpy(a->q_stride, p->q_stride, sizeof a->q_stride);
    memcpy(a->k_stride, p->k_stride, sizeof a->k_stride);
    memcpy(a->v_stride, p->v_stride, sizeof a->v_stride);
    memcpy(a->o_stride, p->o_stride, sizeof a->o_stride);
}

/* The backward's arguments and params as attn_bwd.c fills them: the
 * gradients laid out like q, k and v in one buffer, dO like O. */
static void fill_bwd(const attn_shape *s, const attn_problem *p, const void *in, const void *o, const void *dout,
                     const float *lse, void *grads, int det, fajit_attn_bwd_args *a, struct fajit_bwd_params *bp) {
    fajit_attn_bwd_args_init(a);
    a->deterministic = det;
    a->q = (const uint16_t *)in + p->q_off;
    a->k = (const uint16_t *)in + p->k_off;
    a->v = (const uint16_t *)in + p->v_off;
    a->o = o;
    a->grad_out = dout;
    a->lse = lse;
    a->grad_q = (uint16_t *)grads + p->q_off;
    a->grad_k = (uint16_t *)grads + p->k_off;
    a->grad_v = (uint16_t *)grads + p->v_off;
    a->batch = s->batch;
    a->seqlen_q = s->seqlen_q;
    a->seqlen_k = s->seqlen_k;
    a->nheads_q = s->nheads_q;
    a->nheads_kv = s->nheads_kv;
    a->dqk = s->dqk;
    a->dv = s->dv;
    a->dtype = s->dtype;
    a->mask = s->mask;
    a->softmax_scale = s->softmax_scale;
    memcpy(a->q_stride, p->q_stride, sizeof a->q_stride);
    memcpy(a->k_stride, p->k_stride, sizeof a->k_stride);
    memcpy(a->v_stride, p->v_stride, sizeof a->v_stride);
    memcpy(a->o_stride, p->o_stride, sizeof a->o_stride);
    memcpy(a->grad_out_stride, p->o_stride, sizeof a->grad_out_stride);
    memcpy(a->grad_q_stride, p->q_stride, sizeof a->grad_q_stride);
    memcpy(a->grad_k_stride, p->k_stride, sizeof a->grad_k_stride);
    memcpy(a->grad_v_stride, p->v_stride, sizeof a->grad_v_stride);

    memset(bp, 0, sizeof *bp);
    bp->q = a->q;
    bp->k = a->k;
    bp->v = a->v;
    bp->o = o;
    bp->grad_out = dout;
    bp->lse = lse;
    bp->grad_q = a->grad_q;
    bp->grad_k = a->grad_k;
    bp->grad_v = a->grad_v;
    memcpy(bp->q_stride, p->q_stride, sizeof bp->q_stride);
    memcpy(bp->k_stride, p->k_stride, sizeof bp->k_stride);
    memcpy(bp->v_stride, p->v_stride, sizeof bp->v_stride);
    memcpy(bp->o_stride, p->o_stride, sizeof bp->o_stride);
    memcpy(bp->grad_out_stride, p->o_stride, sizeof bp->grad_out_stride);
    memcpy(bp->grad_q_stride, p->q_stride, sizeof bp->grad_q_stride);
    memcpy(bp->grad_k_stride, p->k_stride, sizeof bp->grad_k_stride);
    memcpy(bp->grad_v_stride, p->v_stride, sizeof bp->grad_v_stride);
    bp->batch = (int)s->batch;
    bp->seqlen_q = (int)s->seqlen_q;
    bp->seqlen_k = (int)s->seqlen_k;
    bp->nheads_q = (int)s->nheads_q;
    bp->nheads_kv = (int)s->nheads_kv;
    bp->softmax_scale = attn_effective_scale(s);
    bp->softmax_scale_log2 = bp->softmax_scale * 1.4426950408889634f;
}

/* The features into the arguments and params, as attn_bwd.c fills them
 * (varlen: the sequences as the batch, the longest lengths, batch strides 0). */
static void apply_features(const fcase *c, const case_host *h, const device_buffers *d, fajit_attn_bwd_args *a,
                           struct fajit_bwd_params *bp) {
    SET_FEATURES(a, c, h, d);
    bp->softcap = a->softcap;
    bp->dropout_p = a->dropout_p;
    bp->dropout_scale = 1.0f / (1.0f - a->dropout_p);
    bp->dropout_seed = a->dropout_seed;
    bp->dropout_offset = a->dropout_offset;
    bp->alibi_slopes = a->alibi_slopes;
    bp->alibi_batch_stride = a->alibi_batch_stride;
    bp->cu_seqlens_q = a->cu_seqlens_q;
    bp->cu_seqlens_k = a->cu_seqlens_k;
    if (c->f.nseq > 0) {
        int64_t *st[8] = {bp->q_stride,        bp->k_stride,      bp->v_stride,      bp->o_stride,
                          bp->grad_out_stride, bp->grad_q_stride, bp->grad_k_stride, bp->grad_v_stride};
        bp->batch = (int)a->batch;
        bp->seqlen_q = (int)a->seqlen_q;
        bp->seqlen_k = (int)a->seqlen_k;
        for (int i = 0; i < 8; ++i)
            st[i][0] = 0;
    }
}

/* The CUDA context the runtime would launch in (the caller's, made current
 * by the CUDA runtime), and its arch. */
typedef struct launch_env {
    const fajit__driver *drv;
    unsigned long long cu_id;
    int arch;
} launch_env;

static int get_env(fajit_ctx *ctx, launch_env *env) {
    CUcontext cu;
    int pushed = 0, rc;
    cudaFree(NULL); /* the runtime's primary context, current on this thread */
    if ((rc = fajit__driver_get(&env->drv)) || (rc = fajit__enter_cuda(ctx, env->drv, &cu, &pushed)))
        return rc;
    env->cu_id = fajit__context_id(env->drv, cu);
    rc = fajit__context_arch(ctx, env->drv, env->cu_id, &env->arch);
    if (pushed)
        env->drv->ctxPopCurrent(&cu);
    return rc;
}

/* Forward on the device, O and LSE downloaded, the fp64 backward and the
 * naive one's errors. */
static int run_forward(fajit_ctx *ctx, const fcase *c, const case_host *h, bwd_problem *bp, const device_buffers *d,
                       size_t lse_elems, double naive_err[3], char *why, size_t cap) {
    const attn_problem *p = bp->fwd;
    uint16_t *o = malloc(p->o_elems * 2 + 16);
    float *lse = malloc(lse_elems * 4 + 16);
    fajit_attn_args a;
    int rc, failed = 1;
    if (!o || !lse) {
        snprintf(why, cap, "out of host memory");
        goto out;
    }
    fill_fwd_args(&c->s, p, d->in, d->o, d->lse, &a);
    SET_FEATURES(&a, c, h, d);
    if ((rc = fajit_attn_fwd(ctx, &a, NULL)) != FAJIT_OK) {
        snprintf(why, cap, "fajit_attn_fwd: %s: %s", fajit_strerror(rc), fajit_last_error());
        goto out;
    }
    if (cuda_failed(cudaDeviceSynchronize(), "forward kernel", why, cap) ||
        cuda_failed(cudaMemcpy(o, d->o, p->o_elems * 2, cudaMemcpyDeviceToHost), "cudaMemcpy", why, cap) ||
        cuda_failed(cudaMemcpy(lse, d->lse, lse_elems * 4, cudaMemcpyDeviceToHost), "cudaMemcpy", why, cap))
        goto out;
    /* With features, bwd_check's own naive backward (which has them) sets the
     * tolerance; this file's naive_errors knows none. */
    if (bwd_reference(bp, o, lse) != 0 || (!has_features(c) && naive_errors(bp, o, lse, naive_err) != 0)) {
        snprintf(why, cap, "backward references: out of memory, or cu_seqlens not fitting the problem");
        goto out;
    }
    if (has_features(c) && !bp->fwd_check.ok) {
        snprintf(why, cap, "forward vs fp64 with the features: %.200s", bp->fwd_check.why);
        goto out;
    }
    failed = 0;
out:
    free(o);
    free(lse);
    return failed;
}

static int run_fast_backward(fajit_ctx *ctx, const launch_env *env, const fcase *c, const case_host *h,
                             const attn_problem *p, const device_buffers *d, uint16_t *grads, char *why, size_t cap) {
    fajit_attn_bwd_args a;
    struct fajit_bwd_params params;
    const char *refusal;
    int rc;
    if (cuda_failed(cudaMemset(d->grads, 0xff, p->in_elems * 2 + 16), "cudaMemset", why, cap))
        return 1;
    fill_bwd(&c->s, p, d->in, d->o, d->dout, d->lse, d->grads, c->det, &a, &params);
    apply_features(c, h, d, &a, &params);
    if ((refusal = fajit__flash_bwd_refusal(&a, &params)) != NULL) {
        snprintf(why, cap, "refused: %s", refusal);
        return 1;
    }
    if ((rc = fajit__flash_bwd_run(ctx, env->drv, &a, &params, env->arch, env->cu_id, NULL)) != 0) {
        snprintf(why, cap, "fajit__flash_bwd_run: %s: %s", fajit_strerror(rc), fajit_last_error());
        return 1;
    }
    return cuda_failed(cudaDeviceSynchronize(), "backward kernels", why, cap) ||
           cuda_failed(cudaMemcpy(grads, d->grads, p->in_elems * 2, cudaMemcpyDeviceToHost), "cudaMemcpy", why, cap);
}

/* bwd_check's verdict with the tolerance replaced by FlashAttention's rule. */
static void judge(const fcase *c, const bwd_problem *bp, const uint16_t *grads, const double naive_err[3],
                  bwd_result *r) {
    if (has_features(c)) { /* FlashAttention's rule against bwd_check's naive backward with the features */
        bwd_check_rule(bp, grads, BWD_RULE_FLASH, r);
        return;
    }
    bwd_check(bp, grads, r);
    r->ok = r->nan_values == 0 && r->bad_zeros == 0 && r->stray_writes == 0;
    if (!r->ok)
        return; /* r->why names the first problem */
    r->why[0] = '\0';
    for (int t = 0; t < 3; ++t) {
        r->tol[t] += 2.0 * naive_err[t];
        if (!(r->max_err[t] <= r->tol[t])) {
            r->ok = 0;
            snprintf(r->why, sizeof r->why, "%s: max error %.3g > allowed %.3g (naive %.3g)", bwd_grad_name(t),
                     r->max_err[t], r->tol[t], naive_err[t]);
            return;
        }
    }
}

/* " window=l,r softcap=c alibi=h dropout=p varlen=n" for the features on. */
static const char *describe_features(const fcase *c, char *buf, size_t cap) {
    size_t n = 0;
    buf[0] = '\0';
    if (c->f.wl >= 0 || c->f.wr >= 0)
        n += (size_t)snprintf(buf + n, cap - n, " window=%d,%d", c->f.wl, c->f.wr);
    if (c->f.softcap != 0.0f && n < cap)
        n += (size_t)snprintf(buf + n, cap - n, " softcap=%g", (double)c->f.softcap);
    if (c->f.alibi && n < cap)
        n += (size_t)snprintf(buf + n, cap - n, " alibi=%s", c->f.alibi == 1 ? "h" : "bh");
    if (c->f.p > 0.0f && n < cap)
        n += (size_t)snprintf(buf + n, cap - n, " dropout=%g", (double)c->f.p);
    if (c->f.nseq > 0 && n < cap)
        snprintf(buf + n, cap - n, " varlen=%d", c->f.nseq);
    return buf;
}

static int run_case(fajit_ctx *ctx, const launch_env *env, const fcase *c, uint64_t seed, double *worst) {
    const attn_shape *s = &c->s;
    const size_t lse_elems = (size_t)(s->batch * s->nheads_q * s->seqlen_q);
    attn_problem p;
    bwd_problem bp;
    bwd_result r;
    device_buffers d = {0};
    double naive[3] = {0};
    uint16_t *grads = NULL, *again = NULL;
    const int runs = c->det ? RUNS : 1;
    case_host h;
    bwd_features feat;
    char feats[160];
    memset(&r, 0, sizeof r);
    make_case_host(c, seed ^ 0x5109e5u, &h);
    host_features(c, &h, &feat);
    if (attn_problem_init(&p, s, ATTN_CONTIGUOUS, seed) != 0) {
        printf("FAIL cannot build problem (out of memory)\n");
        return 1;
    }
    if (bwd_problem_init(&bp, &p, seed ^ 0xd0d0d0d0u) != 0 || !(grads = malloc(p.in_elems * 2 + 16)) ||
        !(again = malloc(p.in_elems * 2 + 16))) {
        free(grads);
        printf("FAIL cannot build the backward problem (out of memory)\n");
        attn_problem_free(&p);
        return 1;
    }
    bwd_problem_set_features(&bp, &feat);
    if (!prepare_device(&bp, &h, lse_elems, &d, r.why, sizeof r.why) &&
        !run_forward(ctx, c, &h, &bp, &d, lse_elems, naive, r.why, sizeof r.why) &&
        !run_fast_backward(ctx, env, c, &h, &p, &d, grads, r.why, sizeof r.why)) {
        judge(c, &bp, grads, naive, &r);
        for (int i = 1; i < runs && r.ok; ++i) {
            r.ok = !run_fast_backward(ctx, env, c, &h, &p, &d, again, r.why, sizeof r.why);
            if (r.ok && memcmp(grads, again, p.in_elems * 2) != 0) {
                r.ok = 0;
                snprintf(r.why, sizeof r.why, "deterministic mode: run %d differs from run 0", i);
            }
        }
    }
    printf("%s %s %s %-9s dqk=%-3lld dv=%-3lld b=%lld sq=%-4lld sk=%-4lld hq=%lld hkv=%lld  err/tol dq %.1e/%.1e "
           "dk %.1e/%.1e dv %.1e/%.1e%s%s%s\n",
           r.ok ? "ok  " : "FAIL", c->det ? "det" : "   ", attn_dtype_name(s->dtype), attn_mask_name(s->mask),
           (long long)s->dqk,
           (long long)s->dv, (long long)s->batch, (long long)s->seqlen_q, (long long)s->seqlen_k,
           (long long)s->nheads_q, (long long)s->nheads_kv, r.max_err[0], r.tol[0], r.max_err[1], r.tol[1],
           r.max_err[2], r.tol[2], describe_features(c, feats, sizeof feats), r.ok ? "" : "\n     ",
           r.ok ? "" : r.why);
    for (int t = 0; t < 3; ++t)
        if (r.tol[t] > 0 && r.max_err[t] / r.tol[t] > *worst)
            *worst = r.max_err[t] / r.tol[t];
    free_buffers(&d);
    free(grads);
    free(again);
    bwd_problem_free(&bp);
    attn_problem_free(&p);
    return !r.ok;
}

/* ---------------------------------------------------------------- up-front compiles */

static size_t add_spec(char (*specs)[FAJIT__VARIANT_TEXT_MAX], size_t n, const fajit__variant *v) {
    return fajit__variant_format(v, specs[n], FAJIT__VARIANT_TEXT_MAX) > 0 ? n + 1 : n;
}

/* Every backward variant of the grid and the forward's, compiled on all cores. */
static size_t precompile_grid(fajit_ctx *ctx, int arch, const fcase *cs, size_t n) {
    char (*specs)[FAJIT__VARIANT_TEXT_MAX] = calloc(4 * n + 4, FAJIT__VARIANT_TEXT_MAX);
    const char **ptrs = calloc(4 * n + 4, sizeof *ptrs);
    size_t m = 0, failed = 0;
    if (!specs || !ptrs) {
        free(specs);
        free(ptrs);
        return 0;
    }
    static float fake_slopes[4];
    static int32_t fake_cu[4];
    const device_buffers fake = {.slopes = fake_slopes, .cu_q = fake_cu, .cu_k = fake_cu};
    for (size_t i = 0; i < n; ++i) {
        fajit_attn_bwd_args a;
        fajit__variant v[3];
        case_host h;
        char fwd[256];
        fajit_attn_bwd_args_init(&a);
        a.dqk = cs[i].s.dqk;
        a.dv = cs[i].s.dv;
        a.dtype = cs[i].s.dtype;
        a.mask = cs[i].s.mask;
        a.seqlen_q = cs[i].s.seqlen_q;
        a.seqlen_k = cs[i].s.seqlen_k;
        a.deterministic = cs[i].det;
        make_case_host(&cs[i], 0, &h);
        SET_FEATURES(&a, &cs[i], &h, &fake);
        fajit__flash_bwd_variants(&a, arch, v);
        for (int k = 0; k < 3; ++k)
            m = add_spec(specs, m, &v[k]);
        /* The forward's variant: the same normalised mask and window. */
        snprintf(fwd, sizeof fwd, "fwd dqk=%lld dv=%lld dtype=%s mask=%s window=%d,%d dropout=%d softcap=%d "
                 "alibi=%d varlen=%d", (long long)a.dqk, (long long)a.dv, a.dtype ? "bf16" : "fp16",
                 v[1].mask == 0 ? "none" : v[1].mask == 1 ? "causal" : "causal-tl", v[1].window_left,
                 v[1].window_right, v[1].dropout, v[1].softcap, v[1].alibi, v[1].varlen);
        if (fajit_variant_complete(ctx, fwd, specs[m], FAJIT__VARIANT_TEXT_MAX) > 0)
            m++;
    }
    for (size_t i = 0; i < m; ++i)
        ptrs[i] = specs[i];
    failed = precompile_variants(ctx, ptrs, m, (int)sysconf(_SC_NPROCESSORS_ONLN));
    free(specs);
    free(ptrs);
    return failed;
}

/* ---------------------------------------------------------------- TFLOPs */

static uint16_t *random_bits(size_t n, int dtype, uint64_t seed) {
    uint16_t *x = malloc(n * 2);
    uint64_t st = seed;
    for (size_t i = 0; x && i < n; ++i) {
        st = st * 6364136223846793005ull + 1442695040888963407ull;
        const float u = (float)((st >> 40) & 0xffffff) / 16777216.0f * 2.0f - 1.0f;
        x[i] = dtype == 0 ? attn_float_to_half(u) : attn_float_to_bf16(u);
    }
    return x;
}

/* Tile configurations timed besides the heuristic's, per head dim. */
typedef struct tiles {
    int bm, bn, warps, stages;
} tiles;

static const tiles sweep64[] = {{128, 128, 8, 2}, {64, 64, 8, 2}, {64, 64, 8, 1}, {64, 64, 4, 2}, {128, 64, 8, 2}};
static const tiles sweep128[] = {{64, 128, 8, 1}, {64, 64, 8, 2}, {64, 64, 8, 1}, {64, 64, 4, 2}, {128, 64, 8, 2}};
static const tiles sweep256[] = {{64, 64, 8, 1}, {32, 64, 8, 2}, {64, 32, 8, 2}};

static size_t sweep_of(int d, const tiles **out) {
    *out = d == 64 ? sweep64 : d == 128 ? sweep128 : sweep256;
    return d == 64 ? sizeof sweep64 / sizeof *sweep64
                   : d == 128 ? sizeof sweep128 / sizeof *sweep128 : sizeof sweep256 / sizeof *sweep256;
}

/* The default mode's variants with the main kernel's tiles replaced; 0 when
 * they do not fit the arch's shared memory. */
static int swept_variants(const fajit_attn_bwd_args *a, int arch, const tiles *t, fajit__variant v[3]) {
    fajit__flash_bwd_variants(a, arch, v);
    v[1].bm = t->bm;
    v[1].bn = t->bn;
    v[1].warps = t->warps;
    v[1].stages = t->stages;
    return fajit__variant_smem_bytes(&v[1]) <= fajit__arch_smem_limit(arch);
}

/* The features the bench times at d 128, causal, over the plain causal
 * forward's O and LSE (their values do not change the work): each as bits
 * 1 dropout 0.1, 2 softcap + ALiBi, 4 window left 1024, 8 varlen (the batch
 * as 4 sequences of 4096). */
static const struct {
    const char *name;
    int bits;
} bench_feats[] = {{"dropout", 1}, {"softcap+alibi", 2}, {"window 1024", 4}, {"varlen", 8}, {"all", 15}};
#define N_BENCH_FEATS (sizeof bench_feats / sizeof bench_feats[0])

static void bench_feature_args(int bits, const float *slopes, const int32_t *cu, fajit_attn_bwd_args *a,
                               struct fajit_bwd_params *p) {
    a->dropout_p = p->dropout_p = bits & 1 ? 0.1f : 0.0f;
    p->dropout_scale = 1.0f / (1.0f - p->dropout_p);
    a->dropout_seed = p->dropout_seed = 1234;
    a->softcap = p->softcap = bits & 2 ? 30.0f : 0.0f;
    a->alibi_slopes = p->alibi_slopes = bits & 2 ? slopes : NULL;
    a->alibi_batch_stride = p->alibi_batch_stride = 0;
    a->window_left = bits & 4 ? 1024 : -1;
    a->cu_seqlens_q = a->cu_seqlens_k = p->cu_seqlens_q = p->cu_seqlens_k = bits & 8 ? cu : NULL;
}

/* Every kernel the bench times, compiled up front on all cores. */
static void precompile_bench(fajit_ctx *ctx, int arch, int sweep) {
    static char specs[160][FAJIT__VARIANT_TEXT_MAX];
    const char *ptrs[160];
    static const float slopes[1];
    static const int32_t cu[1];
    size_t m = 0;
    for (size_t f = 0; f < N_BENCH_FEATS; ++f)
        for (int det = 0; det < 2; ++det) {
            fajit_attn_bwd_args a;
            struct fajit_bwd_params p;
            fajit__variant v[3];
            fajit_attn_bwd_args_init(&a);
            memset(&p, 0, sizeof p);
            a.dqk = a.dv = 128;
            a.mask = 1;
            a.seqlen_q = a.seqlen_k = 4096;
            a.deterministic = det;
            bench_feature_args(bench_feats[f].bits, slopes, cu, &a, &p);
            fajit__flash_bwd_variants(&a, arch, v);
            for (int k = 0; k < 3; ++k)
                m = add_spec(specs, m, &v[k]);
        }
    for (int d = 64; d <= 256; d *= 2)
        for (int mask = 0; mask < 2; ++mask)
            for (int det = 0; det < 2; ++det) {
                fajit_attn_bwd_args a;
                fajit__variant v[3];
                const tiles *sw;
                const size_t ns = det || !sweep ? 0 : sweep_of(d, &sw);
                fajit_attn_bwd_args_init(&a);
                a.dqk = a.dv = d;
                a.mask = mask;
                a.deterministic = det;
                fajit__flash_bwd_variants(&a, arch, v);
                for (int k = 0; k < 3; ++k)
                    m = add_spec(specs, m, &v[k]);
                for (size_t i = 0; i < ns && m + 1 < 128; ++i)
                    if (swept_variants(&a, arch, &sw[i], v))
                        m = add_spec(specs, m, &v[1]);
            }
    for (size_t i = 0; i < m; ++i)
        ptrs[i] = specs[i];
    precompile_variants(ctx, ptrs, m, (int)sysconf(_SC_NPROCESSORS_ONLN));
}

/* Milliseconds of one backward, the mean of `reps` after a warm-up: the fast
 * kernels for variants v, or (v NULL) fajit_attn_bwd with a's kernel choice. */
static double time_backward(fajit_ctx *ctx, const launch_env *env, const fajit__variant *v,
                            const fajit_attn_bwd_args *a, const struct fajit_bwd_params *p, int reps) {
    cudaEvent_t e0, e1;
    float ms = 0.0f;
    int rc = 0;
    cudaEventCreate(&e0);
    cudaEventCreate(&e1);
    for (int i = 0; i <= reps && rc == 0; ++i) {
        if (i == 1)
            cudaEventRecord(e0, NULL);
        rc = v ? fajit__flash_bwd_launch(ctx, env->drv, v, p, env->cu_id, NULL) : fajit_attn_bwd(ctx, a, NULL);
    }
    cudaEventRecord(e1, NULL);
    const int ok = rc == 0 && cudaEventSynchronize(e1) == cudaSuccess && cudaEventElapsedTime(&ms, e0, e1) == cudaSuccess;
    cudaEventDestroy(e0);
    cudaEventDestroy(e1);
    if (!ok)
        printf("     timing failed: %s\n", rc ? fajit_last_error() : "CUDA error");
    return ok ? ms / reps : -1.0;
}

static void print_time(const char *what, const fajit__variant *v, double ms, double flops) {
    if (v)
        printf("     %-13s bm=%-3d bn=%-3d warps=%d stages=%d %8.3f ms %6.1f TFLOPs\n", what, v->bm, v->bn, v->warps,
               v->stages, ms, flops / (ms * 1e9));
    else
        printf("     %-13s %40.3f ms %6.2f TFLOPs\n", what, ms, flops / (ms * 1e9));
}

/* Every timing of one problem: the heuristic's tiles, the sweep,
 * deterministic mode, and (d <= 128) the reference. */
static void bench_times(fajit_ctx *ctx, const launch_env *env, fajit_attn_bwd_args *a,
                        const struct fajit_bwd_params *p, int d, double flops, int sweep) {
    fajit__variant v[3];
    const tiles *sw;
    const size_t ns = sweep ? sweep_of(d, &sw) : 0;
    fajit__flash_bwd_variants(a, env->arch, v);
    print_time("fast", &v[1], time_backward(ctx, env, v, a, p, 10), flops);
    for (size_t i = 0; i < ns; ++i)
        if (swept_variants(a, env->arch, &sw[i], v))
            print_time("  tiles", &v[1], time_backward(ctx, env, v, a, p, 10), flops);
    a->deterministic = 1;
    fajit__flash_bwd_variants(a, env->arch, v);
    print_time("deterministic", &v[1], time_backward(ctx, env, v, a, p, 10), flops);
    a->deterministic = 0;
    if (d <= 128) {
        a->kernel = FAJIT_KERNEL_REFERENCE;
        print_time("reference", NULL, time_backward(ctx, env, NULL, a, p, 1), flops);
        a->kernel = FAJIT_KERNEL_AUTO;
    }
}

/* The features at b 4, h 16, s 4096, d 128, causal: ms and the time against
 * the plain causal backward's, default and deterministic mode. */
static void bench_features(fajit_ctx *ctx, const launch_env *env, fajit_attn_bwd_args *a, struct fajit_bwd_params *p,
                           double flops) {
    float slopes[16];
    const int32_t cu_host[5] = {0, 4096, 8192, 12288, 16384};
    float *d_slopes = NULL;
    int32_t *d_cu = NULL;
    fajit__variant v[3];
    double plain[2];
    for (int i = 0; i < 16; ++i)
        slopes[i] = ldexpf(1.0f, -1 - i % 8);
    if (cudaMalloc((void **)&d_slopes, sizeof slopes) || cudaMalloc((void **)&d_cu, sizeof cu_host) ||
        cudaMemcpy(d_slopes, slopes, sizeof slopes, cudaMemcpyHostToDevice) ||
        cudaMemcpy(d_cu, cu_host, sizeof cu_host, cudaMemcpyHostToDevice)) {
        printf("     features skipped: out of memory\n");
        goto out;
    }
    for (int det = 0; det < 2; ++det) {
        a->deterministic = det;
        fajit__flash_bwd_variants(a, env->arch, v);
        plain[det] = time_backward(ctx, env, v, a, p, 10);
    }
    printf("     features (d=128 causal; TFLOPs counted as the plain causal's):\n");
    for (size_t f = 0; f < N_BENCH_FEATS; ++f) {
        struct fajit_bwd_params q = *p;
        bench_feature_args(bench_feats[f].bits, d_slopes, d_cu, a, &q);
        if (bench_feats[f].bits & 8) { /* 4 sequences of 4096, packed: batch strides 0 */
            int64_t *st[8] = {q.q_stride, q.k_stride, q.v_stride, q.o_stride,
                              q.grad_out_stride, q.grad_q_stride, q.grad_k_stride, q.grad_v_stride};
            for (int i = 0; i < 8; ++i)
                st[i][0] = 0;
        }
        for (int det = 0; det < 2; ++det) {
            a->deterministic = det;
            fajit__flash_bwd_variants(a, env->arch, v);
            const double ms = time_backward(ctx, env, v, a, &q, 10);
            printf("     %-13s %-13s %8.3f ms %6.1f TFLOPs  %.2fx the plain time\n", bench_feats[f].name,
                   det ? "deterministic" : "", ms, flops / (ms * 1e9), ms / plain[det]);
        }
        bench_feature_args(0, NULL, NULL, a, &q);
    }
    a->deterministic = 0;
out:
    cudaFree(d_slopes);
    cudaFree(d_cu);
}

static void bench_one(fajit_ctx *ctx, const launch_env *env, int d, int causal, int sweep) {
    const int64_t b = 4, h = 16, s = 4096;
    const size_t n = (size_t)(b * h * s * d);
    attn_problem shape; /* strides only */
    attn_shape sh = {.batch = b, .seqlen_q = s, .seqlen_k = s, .nheads_q = h, .nheads_kv = h, .dqk = d, .dv = d,
                     .dtype = 0, .mask = causal ? 1 : 0};
    uint16_t *host = random_bits(4 * n, 0, 0x5eed + (uint64_t)d);
    void *dev = NULL, *o = NULL, *grads = NULL;
    float *lse = NULL;
    memset(&shape, 0, sizeof shape);
    shape.s = sh;
    for (int i = 0; i < 3; ++i) {
        const int64_t st[3] = {s * h * d, h * d, d};
        shape.q_stride[i] = shape.k_stride[i] = shape.v_stride[i] = shape.o_stride[i] = st[i];
    }
    shape.q_off = 0;
    shape.k_off = n;
    shape.v_off = 2 * n;
    if (!host || cudaMalloc(&dev, 4 * n * 2) || cudaMalloc(&o, n * 2) || cudaMalloc(&grads, 3 * n * 2) ||
        cudaMalloc((void **)&lse, (size_t)(b * h * s) * 4) || cudaMemcpy(dev, host, 4 * n * 2, cudaMemcpyHostToDevice)) {
        printf("bench skipped: out of memory\n");
        goto out;
    }
    fajit_attn_args fa;
    fill_fwd_args(&sh, &shape, dev, o, lse, &fa);
    if (fajit_attn_fwd(ctx, &fa, NULL) != 0 || cudaDeviceSynchronize() != cudaSuccess) {
        printf("bench skipped: forward failed: %s\n", fajit_last_error());
        goto out;
    }
    fajit_attn_bwd_args a;
    struct fajit_bwd_params p;
    fill_bwd(&sh, &shape, dev, o, (uint16_t *)dev + 3 * n, lse, grads, 0, &a, &p);
    const double flops = 2.5 * 4.0 * (double)(b * h) * (double)s * (double)s * d / (causal ? 2.0 : 1.0);
    printf("bench fp16 b=4 h=16 s=4096 d=%d %s:\n", d, causal ? "causal" : "no mask");
    bench_times(ctx, env, &a, &p, d, flops, sweep);
    if (d == 128 && causal)
        bench_features(ctx, env, &a, &p, flops);
out:
    free(host);
    cudaFree(dev);
    cudaFree(o);
    cudaFree(grads);
    cudaFree(lse);
}

/* ---------------------------------------------------------------- main */

static int require_gpu(void) {
    int count = 0;
    const cudaError_t e = cudaGetDeviceCount(&count);
    if (e != cudaSuccess || count == 0) {
        printf("SKIP: no CUDA GPU (%s)\n", e != cudaSuccess ? cudaGetErrorString(e) : "cudaGetDeviceCount returned 0");
        return 77;
    }
    struct cudaDeviceProp prop;
    if (cudaGetDeviceProperties(&prop, 0) == cudaSuccess) {
        printf("GPU 0: %s, sm_%d%d\n", prop.name, prop.major, prop.minor);
        if (prop.major < 8) {
            printf("SKIP: the fast backward needs sm_80 or newer\n");
            return 77;
        }
    }
    return 0;
}

static int has_flag(int argc, char **argv, const char *flag) {
    for (int i = 1; i < argc; ++i)
        if (strcmp(argv[i], flag) == 0)
            return 1;
    return 0;
}

int main(int argc, char **argv) {
    const int quick = has_flag(argc, argv, "--quick"), sweep = has_flag(argc, argv, "--sweep");
    const int bench = !quick && !has_flag(argc, argv, "--no-bench");
    const int skip = require_gpu();
    if (skip)
        return skip;
    fajit_ctx *ctx = NULL;
    launch_env env;
    int rc = fajit_create(&ctx, NULL);
    if (rc != FAJIT_OK || (rc = get_env(ctx, &env)) != 0) {
        printf("FAIL setup: %s: %s\n", fajit_strerror(rc), fajit_last_error());
        fajit_destroy(ctx);
        return 1;
    }
    static fcase cases[MAX_CASES];
    const size_t n = quick ? quick_grid(cases, MAX_CASES) : build_grid(cases, MAX_CASES);
    size_t failures = precompile_grid(ctx, env.arch, cases, n);
    double worst = 0.0;
    for (size_t i = 0; i < n; ++i) {
        failures += (size_t)run_case(ctx, &env, &cases[i], 0xfb0000u + i, &worst);
        fflush(stdout);
    }
    printf("test_flash_bwd_gpu%s: %zu cases, %zu failed; worst gradient error %.2f of its tolerance\n",
           quick ? " (quick)" : "", n, failures, worst);
    if (bench) {
        precompile_bench(ctx, env.arch, sweep);
        for (int d = 64; d <= 256; d *= 2)
            for (int causal = 0; causal < 2; ++causal)
                bench_one(ctx, &env, d, causal, sweep);
    }
    fajit_destroy(ctx);
    return failures ? 1 : 0;
}
