/*
 * tests/gpu/test_features_gpu.c - the attention features (sliding window,
 * softcap, ALiBi, dropout, varlen) against an fp64 CPU reference, through the
 * public API only, with the CUDA runtime for memory.
 *
 * Every case runs twice:
 *  - kernel=FAJIT_KERNEL_REFERENCE, checked tightly: |o - ref| <= (2^-11 fp16 /
 *    2^-8 bf16) * max|ref| + 1e-4, LSE within 1e-4 relative, fully masked rows
 *    exactly 0 / -inf;
 *  - kernel=FAJIT_KERNEL_AUTO, checked with FlashAttention's rule
 *    max|o - ref| <= 2 * max|naive - ref| + 1e-3 (naive: the same attention in
 *    the input dtype), LSE within 1e-3 relative. AUTO must pick the fast
 *    kernel (op fwd) for every head dim up to 256, any of them (the odd ones
 *    59, 100, 111, 100/72 and their neighbours 24, 40, 200 have cases of
 *    their own with windows, softcap, ALiBi, dropout and varlen).
 * Split-KV cases (few query rows over long keys, 1..16 rows, up to 64k keys,
 * with causal masks, windows, softcap, ALiBi, GQA and MQA, dropout, varlen)
 * must take the split launch (the library's DEBUG log says how many splits)
 * and pass the same rule; decode rows with GQA also pack the query heads.
 * The CPU applies the same dropout mask (tests/gpu/philox.h), so dropout cases
 * compare exactly up to rounding. Inputs are ~N(0,1), outputs and LSE poisoned
 * with 0xFF before each launch. Varlen cases (ragged lengths including 0 and
 * 1) are also compared, sequence by sequence, with dense runs of the
 * reference kernel: bit-identical. Dropout: the device mask read back through
 * a one-hot V equals the host Philox's exactly; the kept fraction is 1 - p
 * within 3 sigma; the same seed gives bit-identical output; another offset
 * another mask.
 *
 * Exit 0 pass, 1 fail, 77 no GPU (with the reason).
 */
#include <cuda_runtime_api.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "attn_check.h"
#include "fajit.h"
#include "philox.h"
#include "precompile.h"

#define MAX_BATCH 8
#define MAX_CASES 128

enum { ALIBI_OFF = 0, ALIBI_HEAD = 1, ALIBI_BATCH_HEAD = 2 };

typedef struct fcase {
    int batch, sq, sk, hq, hkv, dqk, dv, dtype, mask, wl, wr;
    float softcap;
    int alibi;
    float p;
    uint64_t seed, offset;
    int varlen;
    int lens_q[MAX_BATCH], lens_k[MAX_BATCH]; /* varlen only; sq/sk are their max */
    int want_split; /* AUTO must split the keys (split-KV launch) */
} fcase;

static int failures;

/* Splits of the last split-KV launch, from the library's DEBUG log. */
static int last_splits;

static void on_log(void *user, int level, const char *msg)
{
    int splits;
    (void)user, (void)level;
    if (sscanf(msg, "split-KV: %d splits", &splits) == 1)
        last_splits = splits;
}

static void check(int ok, const char *fmt, const char *detail)
{
    printf("%s %s%s%s\n", ok ? "ok  " : "FAIL", fmt, detail && detail[0] ? ": " : "",
           detail ? detail : "");
    failures += !ok;
}

/* ---------------------------------------------------------------- host problem */

static uint64_t rng_next(uint64_t *s)
{
    uint64_t z = (*s += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

static float rng_normal(uint64_t *s)
{
    double u1 = ((double)(rng_next(s) >> 11) + 0.5) / 9007199254740992.0;
    double u2 = ((double)(rng_next(s) >> 11) + 0.5) / 9007199254740992.0;
    return (float)(sqrt(-2.0 * log(u1)) * cos(6.283185307179586 * u2));
}

static uint16_t encode(int dtype, float f)
{
    return dtype == 0 ? attn_float_to_half(f) : attn_float_to_bf16(f);
}

static float round_to(int dtype, float f) { return (float)attn_decode(dtype, encode(dtype, f)); }

/* Dense runs are laid out exactly as varlen ones with cu[b] = b * seqlen, so
 * one host representation serves both: q is (total_q, hq, dqk), k and v
 * (total_k, hkv, d), o (total_q, hq, dv). */
typedef struct problem {
    fcase c;
    int cu_q[MAX_BATCH + 1], cu_k[MAX_BATCH + 1];
    int64_t total_q, total_k;
    uint16_t *q, *k, *v;
    float *slopes;
    int n_slopes;
    double *ref_o, *ref_lse; /* ref_lse in the API's layout for this case */
    float *naive_o;
    double max_ref;
} problem;

static int len_q(const problem *p, int b) { return p->c.varlen ? p->c.lens_q[b] : p->c.sq; }
static int len_k(const problem *p, int b) { return p->c.varlen ? p->c.lens_k[b] : p->c.sk; }

static int64_t lse_index(const problem *p, int b, int h, int i)
{
    return p->c.varlen ? (int64_t)h * p->total_q + p->cu_q[b] + i
                       : ((int64_t)b * p->c.hq + h) * p->c.sq + i;
}

static float effective_scale(const fcase *c) { return 1.0f / sqrtf((float)c->dqk); }

static float dropout_scale(const fcase *c) { return 1.0f / (1.0f - c->p); }

/* Visible keys [lo, hi) of row i of a sequence (as common.cuh's visible_keys). */
static void visible(const fcase *c, int64_t i, int64_t sq, int64_t sk, int64_t *lo, int64_t *hi)
{
    const int64_t diag = c->mask == 2 ? i : i + sk - sq;
    *lo = 0;
    *hi = sk;
    if (c->mask != 0 && diag + 1 < *hi)
        *hi = diag + 1;
    if (c->wl >= 0 && diag - c->wl > *lo)
        *lo = diag - c->wl;
    if (c->wr >= 0 && diag + c->wr + 1 < *hi)
        *hi = diag + c->wr + 1;
}

/* The score modifiers, in double for the reference and float for the naive. */
static double modify(const fcase *c, double s, double slope, int64_t i, int64_t j, int64_t sq,
                     int64_t sk)
{
    if (c->softcap != 0.0f)
        s = c->softcap * tanh(s / c->softcap);
    if (c->alibi)
        s += -slope * (double)llabs(i + sk - sq - j);
    return s;
}

/* Reference (fp64) and naive (input dtype) for row i of sequence b, head h. */
static void reference_row(problem *p, double *sd, float *sf, double *od, float *of, int b, int h,
                          int64_t i)
{
    const fcase *c = &p->c;
    const int dt = c->dtype;
    const int64_t sq = len_q(p, b), sk = len_k(p, b), hk = h / (c->hq / c->hkv);
    const int64_t qrow = p->cu_q[b] + i;
    const uint16_t *q = p->q + (qrow * c->hq + h) * c->dqk;
    const double slope = c->alibi ? p->slopes[(c->alibi == ALIBI_BATCH_HEAD ? b * c->hq : 0) + h] : 0;
    const uint32_t threshold = fajit_dropout_threshold(c->p);
    int64_t lo, hi;
    double mx = -INFINITY, l = 0.0;
    float mxf = -INFINITY, lf = 0.0f;
    visible(c, i, sq, sk, &lo, &hi);
    for (int64_t j = lo; j < hi; ++j) {
        const uint16_t *kr = p->k + ((p->cu_k[b] + j) * c->hkv + hk) * c->dqk;
        double dd = 0.0;
        float df = 0.0f;
        for (int d = 0; d < c->dqk; ++d) {
            const double qv = attn_decode(dt, q[d]), kv = attn_decode(dt, kr[d]);
            dd += qv * kv;
            df += (float)qv * (float)kv;
        }
        sd[j - lo] = modify(c, dd * (double)effective_scale(c), slope, i, j, sq, sk);
        sf[j - lo] = round_to(dt, (float)modify(c, round_to(dt, round_to(dt, df) * effective_scale(c)),
                                                slope, i, j, sq, sk));
        mx = fmax(mx, sd[j - lo]);
        mxf = fmaxf(mxf, sf[j - lo]);
    }
    for (int64_t j = lo; j < hi; ++j) {
        l += (sd[j - lo] = exp(sd[j - lo] - mx));
        lf += (sf[j - lo] = expf(sf[j - lo] - mxf));
    }
    for (int d = 0; d < c->dv; ++d)
        od[d] = of[d] = 0.0;
    for (int64_t j = lo; j < hi; ++j) {
        const uint16_t *vr = p->v + ((p->cu_k[b] + j) * c->hkv + hk) * c->dv;
        double w = 1.0;
        if (c->p > 0.0f)
            w = fajit_dropout_keep(c->seed, c->offset, threshold, b, h, c->hq, i, j)
                    ? (double)dropout_scale(c)
                    : 0.0;
        const double pd = sd[j - lo] / l * w;
        const float pf = round_to(dt, sf[j - lo] / lf * (float)w);
        for (int d = 0; d < c->dv; ++d) {
            const double vv = attn_decode(dt, vr[d]);
            od[d] += pd * vv;
            of[d] += pf * (float)vv;
        }
    }
    double *o = p->ref_o + (qrow * c->hq + h) * c->dv;
    float *n = p->naive_o + (qrow * c->hq + h) * c->dv;
    for (int d = 0; d < c->dv; ++d) {
        o[d] = od[d];
        n[d] = hi > lo ? round_to(dt, of[d]) : 0.0f;
        p->max_ref = fmax(p->max_ref, fabs(od[d]));
    }
    p->ref_lse[lse_index(p, b, h, (int)i)] = hi > lo ? mx + log(l) : -INFINITY;
}

static void problem_free(problem *p)
{
    free(p->q);
    free(p->k);
    free(p->v);
    free(p->slopes);
    free(p->ref_o);
    free(p->ref_lse);
    free(p->naive_o);
}

static void fill_random(uint16_t *x, size_t n, int dtype, uint64_t *s)
{
    for (size_t i = 0; i < n; i++)
        x[i] = encode(dtype, rng_normal(s));
}

static int problem_init(problem *p, const fcase *c, uint64_t seed)
{
    uint64_t s = seed;
    memset(p, 0, sizeof *p);
    p->c = *c;
    for (int b = 0; b < c->batch; b++) {
        p->cu_q[b + 1] = p->cu_q[b] + len_q(p, b);
        p->cu_k[b + 1] = p->cu_k[b] + len_k(p, b);
    }
    p->total_q = p->cu_q[c->batch];
    p->total_k = p->cu_k[c->batch];
    const size_t nq = (size_t)(p->total_q * c->hq), nk = (size_t)(p->total_k * c->hkv);
    p->n_slopes = c->alibi == ALIBI_BATCH_HEAD ? c->batch * c->hq : c->hq;
    p->q = malloc(nq * (size_t)c->dqk * 2 + 2);
    p->k = malloc(nk * (size_t)c->dqk * 2 + 2);
    p->v = malloc(nk * (size_t)c->dv * 2 + 2);
    p->slopes = malloc((size_t)p->n_slopes * sizeof(float));
    p->ref_o = malloc(nq * (size_t)c->dv * sizeof(double) + 8);
    p->naive_o = malloc(nq * (size_t)c->dv * sizeof(float) + 8);
    p->ref_lse = malloc(nq * sizeof(double) + 8);
    double *sd = malloc(((size_t)c->sk + 1) * sizeof(double) * 2);
    float *sf = malloc(((size_t)c->sk + 1) * sizeof(float) * 2);
    double *od = malloc((size_t)c->dv * sizeof(double));
    float *of = malloc((size_t)c->dv * sizeof(float));
    int ok = p->q && p->k && p->v && p->slopes && p->ref_o && p->naive_o && p->ref_lse && sd && sf &&
             od && of;
    if (ok) {
        fill_random(p->q, nq * (size_t)c->dqk, c->dtype, &s);
        fill_random(p->k, nk * (size_t)c->dqk, c->dtype, &s);
        fill_random(p->v, nk * (size_t)c->dv, c->dtype, &s);
        for (int i = 0; i < p->n_slopes; i++) /* ALiBi's geometric slopes, 2^-1 .. 2^-8 */
            p->slopes[i] = ldexpf(1.0f, -1 - (int)(rng_next(&s) % 8));
        for (int b = 0; b < c->batch; b++)
            for (int h = 0; h < c->hq; h++)
                for (int64_t i = 0; i < len_q(p, b); i++)
                    reference_row(p, sd, sf, od, of, b, h, i);
    }
    free(sd);
    free(sf);
    free(od);
    free(of);
    if (!ok)
        problem_free(p);
    return ok ? 0 : -1;
}

/* ---------------------------------------------------------------- device runs */

typedef struct device {
    void *q, *k, *v, *o;
    float *lse, *slopes;
    int32_t *cu_q, *cu_k;
} device;

static void device_free(device *d)
{
    cudaFree(d->q), cudaFree(d->k), cudaFree(d->v), cudaFree(d->o);
    cudaFree(d->lse), cudaFree(d->slopes), cudaFree(d->cu_q), cudaFree(d->cu_k);
    memset(d, 0, sizeof *d);
}

static int upload(void **dst, const void *src, size_t bytes)
{
    return cudaMalloc(dst, bytes + 16) != cudaSuccess ||
           (src && cudaMemcpy(*dst, src, bytes, cudaMemcpyHostToDevice) != cudaSuccess);
}

static int device_init(device *d, const problem *p)
{
    const fcase *c = &p->c;
    const size_t nq = (size_t)(p->total_q * c->hq), nk = (size_t)(p->total_k * c->hkv);
    memset(d, 0, sizeof *d);
    if (upload(&d->q, p->q, nq * (size_t)c->dqk * 2) || upload(&d->k, p->k, nk * (size_t)c->dqk * 2) ||
        upload(&d->v, p->v, nk * (size_t)c->dv * 2) || upload(&d->o, NULL, nq * (size_t)c->dv * 2) ||
        upload((void **)&d->lse, NULL, nq * 4) ||
        upload((void **)&d->slopes, p->slopes, (size_t)p->n_slopes * 4) ||
        upload((void **)&d->cu_q, p->cu_q, (size_t)(c->batch + 1) * 4) ||
        upload((void **)&d->cu_k, p->cu_k, (size_t)(c->batch + 1) * 4)) {
        device_free(d);
        return -1;
    }
    return 0;
}

static void make_args(const problem *p, const device *d, int kernel, fajit_attn_args *a)
{
    const fcase *c = &p->c;
    fajit_attn_args_init(a);
    a->q = d->q, a->k = d->k, a->v = d->v, a->o = d->o, a->lse = d->lse;
    a->batch = c->batch, a->seqlen_q = c->sq, a->seqlen_k = c->sk;
    a->nheads_q = c->hq, a->nheads_kv = c->hkv, a->dqk = c->dqk, a->dv = c->dv;
    a->dtype = c->dtype, a->mask = c->mask, a->kernel = kernel;
    a->window_left = c->wl, a->window_right = c->wr;
    a->softcap = c->softcap;
    if (c->alibi) {
        a->alibi_slopes = d->slopes;
        a->alibi_batch_stride = c->alibi == ALIBI_BATCH_HEAD ? c->hq : 0;
    }
    a->dropout_p = c->p, a->dropout_seed = c->seed, a->dropout_offset = c->offset;
    if (c->varlen)
        a->cu_seqlens_q = d->cu_q, a->cu_seqlens_k = d->cu_k;
}

/* Poisons o and LSE, runs, and copies them back. */
static int run(const problem *p, const device *d, const fajit_attn_args *a, fajit_ctx *ctx,
               uint16_t *o, float *lse, char *why, size_t cap)
{
    const size_t nq = (size_t)(p->total_q * p->c.hq);
    int rc;
    cudaMemset(d->o, 0xff, nq * (size_t)p->c.dv * 2);
    cudaMemset(d->lse, 0xff, nq * 4);
    if ((rc = fajit_attn_fwd(ctx, a, NULL)) != 0) {
        snprintf(why, cap, "fajit_attn_fwd: %s: %s", fajit_strerror(rc), fajit_last_error());
        return -1;
    }
    cudaError_t e = cudaDeviceSynchronize();
    if (e == cudaSuccess)
        e = cudaMemcpy(o, d->o, nq * (size_t)p->c.dv * 2, cudaMemcpyDeviceToHost);
    if (e == cudaSuccess)
        e = cudaMemcpy(lse, d->lse, nq * 4, cudaMemcpyDeviceToHost);
    if (e != cudaSuccess) {
        snprintf(why, cap, "CUDA: %s", cudaGetErrorName(e));
        return -1;
    }
    return 0;
}

/* ---------------------------------------------------------------- comparison */

typedef struct verdict {
    double err, naive_err, tol, lse_err;
    int64_t bad;
    char why[200];
} verdict;

static void compare(const problem *p, const uint16_t *o, const float *lse, int tight, verdict *v)
{
    const fcase *c = &p->c;
    memset(v, 0, sizeof *v);
    for (int b = 0; b < c->batch; b++)
        for (int64_t i = 0; i < len_q(p, b); i++)
            for (int h = 0; h < c->hq; h++) {
                const size_t row = (size_t)((p->cu_q[b] + i) * c->hq + h) * (size_t)c->dv;
                const double want_lse = p->ref_lse[lse_index(p, b, h, (int)i)];
                const double got_lse = lse[lse_index(p, b, h, (int)i)];
                const int masked = want_lse == -INFINITY;
                for (int d = 0; d < c->dv; d++) {
                    const double got = attn_decode(c->dtype, o[row + (size_t)d]);
                    const double err = fabs(got - p->ref_o[row + (size_t)d]);
                    if (masked ? got != 0.0 : isnan(got)) {
                        if (!v->bad++)
                            snprintf(v->why, sizeof v->why, "o[b=%d,i=%lld,h=%d,d=%d] = %g (masked %d)",
                                     b, (long long)i, h, d, got, masked);
                    }
                    v->err = fmax(v->err, isnan(err) ? INFINITY : err);
                    v->naive_err = fmax(v->naive_err, fabs(p->naive_o[row + (size_t)d] - p->ref_o[row + (size_t)d]));
                }
                if (masked ? got_lse != -INFINITY : !isfinite(got_lse)) {
                    if (!v->bad++)
                        snprintf(v->why, sizeof v->why, "lse[b=%d,i=%lld,h=%d] = %g, want %g", b,
                                 (long long)i, h, got_lse, want_lse);
                } else if (!masked)
                    v->lse_err = fmax(v->lse_err, fabs(got_lse - want_lse) / fmax(1.0, fabs(want_lse)));
            }
    v->tol = tight ? (c->dtype == 0 ? 1.0 / 2048.0 : 1.0 / 256.0) * p->max_ref + 1e-4
                   : 2.0 * v->naive_err + 1e-3;
    if (!v->bad && !(v->err <= v->tol))
        snprintf(v->why, sizeof v->why, "max err %.3g > tol %.3g", v->err, v->tol);
    if (!v->bad && !(v->lse_err <= (tight ? 1e-4 : 1e-3)))
        snprintf(v->why, sizeof v->why, "lse rel err %.3g", v->lse_err);
}

static const char *describe(const fcase *c, char *buf, size_t cap)
{
    snprintf(buf, cap,
             "%s b%d sq%d sk%d h%d/%d d%d/%d %s win %d,%d cap %g alibi %d p %.2f%s",
             attn_dtype_name(c->dtype), c->batch, c->sq, c->sk, c->hq, c->hkv, c->dqk, c->dv,
             attn_mask_name(c->mask), c->wl, c->wr, (double)c->softcap, c->alibi, (double)c->p,
             c->varlen ? " varlen" : "");
    return buf;
}

/* Varlen: each sequence run dense through the reference kernel gives the
 * same bits as the varlen run (no dropout: its stream depends on b). */
static void check_dense_equivalence(const problem *p, const device *d, fajit_ctx *ctx,
                                    const uint16_t *o_var, const float *lse_var)
{
    const fcase *c = &p->c;
    size_t mismatches = 0;
    char why[300] = "";
    uint16_t *o = malloc((size_t)(c->sq * c->hq * c->dv) * 2 + 2);
    float *lse = malloc((size_t)(c->sq * c->hq) * 4 + 4);
    for (int b = 0; b < c->batch && o && lse && !why[0]; b++) {
        fajit_attn_args a;
        problem one = *p;
        make_args(p, d, FAJIT_KERNEL_REFERENCE, &a);
        a.cu_seqlens_q = a.cu_seqlens_k = NULL;
        a.batch = 1, a.seqlen_q = len_q(p, b), a.seqlen_k = len_k(p, b);
        if (a.seqlen_q == 0)
            continue;
        a.q = (const uint16_t *)d->q + (size_t)p->cu_q[b] * c->hq * c->dqk;
        a.k = (const uint16_t *)d->k + (size_t)p->cu_k[b] * c->hkv * c->dqk;
        a.v = (const uint16_t *)d->v + (size_t)p->cu_k[b] * c->hkv * c->dv;
        if (c->alibi == ALIBI_BATCH_HEAD)
            a.alibi_slopes = d->slopes + (size_t)b * c->hq, a.alibi_batch_stride = 0;
        one.c.varlen = 0, one.c.batch = 1, one.c.sq = (int)a.seqlen_q, one.total_q = a.seqlen_q;
        if (run(&one, d, &a, ctx, o, lse, why, sizeof why) != 0)
            break;
        const size_t row0 = (size_t)p->cu_q[b] * c->hq;
        if (memcmp(o, o_var + row0 * c->dv, (size_t)(a.seqlen_q * c->hq * c->dv) * 2) != 0)
            mismatches++;
        for (int h = 0; h < c->hq; h++)
            for (int64_t i = 0; i < a.seqlen_q; i++)
                mismatches += memcmp(&lse[h * a.seqlen_q + i], &lse_var[lse_index(p, b, h, (int)i)], 4) != 0;
    }
    if (!why[0])
        snprintf(why, sizeof why, "%zu mismatches", mismatches);
    check(o && lse && mismatches == 0 && strstr(why, "mismatches"),
          "  varlen == dense runs of each sequence, bit for bit (reference)", why);
    free(o);
    free(lse);
}

static void check_workspace(const problem *p, const device *d, fajit_ctx *ctx, const uint16_t *o0,
                            const float *lse0);

static void run_case(const fcase *c, fajit_ctx *ctx, uint64_t seed)
{
    problem p;
    device d;
    char desc[200], line[400], why[300] = "", variant[400];
    if (problem_init(&p, c, seed) != 0 || device_init(&d, &p) != 0) {
        check(0, describe(c, desc, sizeof desc), "out of host or device memory");
        return;
    }
    const size_t nq = (size_t)(p.total_q * c->hq);
    uint16_t *o = malloc(nq * (size_t)c->dv * 2 + 2);
    float *lse = malloc(nq * 4 + 4);
    for (int k = 0; k < 2 && o && lse; k++) {
        const int kernel = k == 0 ? FAJIT_KERNEL_REFERENCE : FAJIT_KERNEL_AUTO;
        fajit_attn_args a;
        verdict v;
        make_args(&p, &d, kernel, &a);
        if (fajit_attn_variant(ctx, &a, variant, sizeof variant) < 0)
            snprintf(variant, sizeof variant, "? (%s)", fajit_last_error());
        last_splits = 0;
        if (run(&p, &d, &a, ctx, o, lse, why, sizeof why) != 0) {
            check(0, describe(c, desc, sizeof desc), why);
            break;
        }
        compare(&p, o, lse, kernel == FAJIT_KERNEL_REFERENCE, &v);
        snprintf(line, sizeof line, "%-4s %-3.3s %s  err %.2e <= %.2e (naive %.2e) lse %.1e%s%.0d",
                 k == 0 ? "REF" : "AUTO", variant, describe(c, desc, sizeof desc), v.err, v.tol,
                 v.naive_err, v.lse_err, last_splits ? "  splits " : "", last_splits);
        if (!v.why[0] && kernel == FAJIT_KERNEL_AUTO && c->dqk <= 256 && c->dv <= 256 &&
            strncmp(variant, "fwd ", 4) != 0)
            snprintf(v.why, sizeof v.why, "AUTO ran %.40s, not the fast kernel (op fwd)", variant);
        if (!v.why[0] && kernel == FAJIT_KERNEL_AUTO && c->want_split && last_splits < 2)
            snprintf(v.why, sizeof v.why, "AUTO did not split the keys (split-KV)");
        check(!v.why[0], line, v.why);
        if (k == 1 && c->want_split && !v.why[0])
            check_workspace(&p, &d, ctx, o, lse);
        if (k == 0 && c->varlen && c->p == 0.0f)
            check_dense_equivalence(&p, &d, ctx, o, lse);
    }
    free(o);
    free(lse);
    device_free(&d);
    problem_free(&p);
}

/* A split launch given a workspace (exactly the size
 * fajit_attn_fwd_workspace_size names, and 16 bytes short of it, which falls
 * back to the pool's scratch) writes the same bits as with none. */
static void check_workspace(const problem *p, const device *d, fajit_ctx *ctx, const uint16_t *o0,
                            const float *lse0)
{
    const size_t nq = (size_t)(p->total_q * p->c.hq);
    uint16_t *o = malloc(nq * (size_t)p->c.dv * 2 + 2);
    float *lse = malloc(nq * 4 + 4);
    fajit_attn_args a;
    size_t bytes = 0;
    void *ws = NULL;
    char why[300] = "", line[160];
    make_args(p, d, FAJIT_KERNEL_AUTO, &a);
    int rc = fajit_attn_fwd_workspace_size(ctx, &a, &bytes);
    snprintf(line, sizeof line, "  workspace size %zu bytes (%s)", bytes, rc ? fajit_last_error() : "ok");
    check(rc == 0 && bytes > 0 && bytes % 4 == 0, line,
          rc ? fajit_strerror(rc) : bytes == 0 ? "0: a split launch needs some" : "");
    if (rc != 0 || bytes == 0 || !o || !lse || cudaMalloc(&ws, bytes) != cudaSuccess) {
        free(o);
        free(lse);
        return;
    }
    for (int short_by = 0; short_by <= 16; short_by += 16) {
        a.workspace = ws;
        a.workspace_bytes = bytes - (size_t)short_by;
        cudaMemset(ws, 0xff, bytes);
        why[0] = '\0';
        if (run(p, d, &a, ctx, o, lse, why, sizeof why) == 0) {
            const int same = memcmp(o, o0, nq * (size_t)p->c.dv * 2) == 0 && memcmp(lse, lse0, nq * 4) == 0;
            snprintf(why, sizeof why, "%s", same ? "" : "outputs differ from the run without a workspace");
        }
        snprintf(line, sizeof line, "  with a workspace %s: the same bits as without",
                 short_by ? "16 bytes short (pool scratch)" : "of that size");
        check(!why[0], line, why);
    }
    cudaFree(ws);
    free(o);
    free(lse);
}

/* ---------------------------------------------------------------- dropout mask */

/* q = k = 0 makes every probability 1/sk; v one-hot (v[j][d] = (j == d), dv =
 * sk) turns o[i][j] into keep(i, j) * scale / sk: the device's mask, read
 * back. Compared with the host Philox element by element. */
static int64_t read_mask(fajit_ctx *ctx, const fcase *c, int kernel, uint8_t *mask, char *variant,
                         size_t vcap, char *why, size_t cap)
{
    problem p;
    device d;
    fajit_attn_args a;
    memset(&p, 0, sizeof p);
    p.c = *c;
    for (int b = 0; b < c->batch; b++)
        p.cu_q[b + 1] = p.cu_q[b] + c->sq, p.cu_k[b + 1] = p.cu_k[b] + c->sk;
    p.total_q = p.cu_q[c->batch], p.total_k = p.cu_k[c->batch];
    const size_t nq = (size_t)(p.total_q * c->hq), nk = (size_t)(p.total_k * c->hkv);
    p.q = calloc(nq * (size_t)c->dqk, 2);
    p.k = calloc(nk * (size_t)c->dqk, 2);
    p.v = calloc(nk * (size_t)c->dv, 2);
    p.n_slopes = 1;
    p.slopes = calloc(1, 4);
    uint16_t *o = malloc(nq * (size_t)c->dv * 2);
    float *lse = malloc(nq * 4);
    int64_t kept = -1;
    if (p.q && p.k && p.v && o && lse) {
        for (size_t r = 0; r < nk; r++) /* row r = (key row, kv head): key j = r / hkv */
            p.v[r * (size_t)c->dv + (r / (size_t)c->hkv) % (size_t)c->sk] = encode(c->dtype, 1.0f);
        if (device_init(&d, &p) == 0) {
            make_args(&p, &d, kernel, &a);
            if (fajit_attn_variant(ctx, &a, variant, vcap) < 0)
                snprintf(variant, vcap, "?");
            if (run(&p, &d, &a, ctx, o, lse, why, cap) == 0) {
                kept = 0;
                for (size_t n = 0; n < nq * (size_t)c->dv; n++)
                    kept += (mask[n] = attn_decode(c->dtype, o[n]) != 0.0);
            }
            device_free(&d);
        }
    }
    free(o);
    free(lse);
    problem_free(&p);
    return kept;
}

static void check_dropout_mask(fajit_ctx *ctx, int kernel, int dim, int hq, int sq)
{
    fcase c = {.batch = 2, .sq = sq, .sk = dim, .hq = hq, .hkv = hq / 2, .dqk = 8, .dv = dim,
               .dtype = 1, .wl = -1, .wr = -1, .p = 0.17f,
               .seed = 0x0123456789abcdefull, .offset = 0x100000007ull};
    const size_t n = (size_t)c.batch * (size_t)sq * (size_t)hq * (size_t)dim;
    uint8_t *m1 = malloc(n), *m2 = malloc(n), *m3 = malloc(n);
    char variant[400] = "", why[300] = "", line[500];
    const char *who = kernel == FAJIT_KERNEL_REFERENCE ? "REF" : "AUTO";
    if (!m1 || !m2 || !m3) {
        check(0, "dropout mask", "out of memory");
        goto free_masks;
    }
    int64_t kept = read_mask(ctx, &c, kernel, m1, variant, sizeof variant, why, sizeof why);
    if (kept < 0) {
        check(0, "dropout mask run", why);
        goto free_masks;
    }
    size_t differ = 0;
    const uint32_t t = fajit_dropout_threshold(c.p);
    for (int b = 0; b < c.batch; b++)
        for (int i = 0; i < sq; i++)
            for (int h = 0; h < hq; h++)
                for (int j = 0; j < dim; j++)
                    differ += m1[(((size_t)b * sq + i) * hq + h) * dim + j] !=
                              fajit_dropout_keep(c.seed, c.offset, t, b, h, hq, i, j);
    snprintf(line, sizeof line, "%s %.3s dropout mask (b2 sq%d h%d sk%d) == host Philox, element by element",
             who, variant, sq, hq, dim);
    snprintf(why, sizeof why, "%zu of %zu differ", differ, n);
    check(differ == 0, line, why);
    const double frac = (double)kept / (double)n, sigma = sqrt(0.17 * 0.83 / (double)n);
    snprintf(line, sizeof line, "%s kept fraction %.5f vs 1 - p = 0.83 (3 sigma = %.5f)", who, frac,
             3 * sigma);
    check(fabs(frac - 0.83) <= 3 * sigma, line, NULL);
    int64_t again = read_mask(ctx, &c, kernel, m2, variant, sizeof variant, why, sizeof why);
    check(again == kept && memcmp(m1, m2, n) == 0, "  same seed and offset: the same mask", NULL);
    c.offset += 1;
    read_mask(ctx, &c, kernel, m3, variant, sizeof variant, why, sizeof why);
    differ = 0;
    for (size_t k = 0; k < n; k++)
        differ += m1[k] != m3[k];
    snprintf(why, sizeof why, "%zu of %zu differ (independent masks: ~%.0f)", differ, n,
             2 * 0.17 * 0.83 * (double)n);
    check(differ > n / 5, "  offset + 1: another mask", why);
free_masks:
    free(m1);
    free(m2);
    free(m3);
}

/* Same seed -> bit-identical outputs of a full dropout case. */
static void check_reproducible(fajit_ctx *ctx)
{
    fcase c = {.batch = 2, .sq = 77, .sk = 130, .hq = 4, .hkv = 2, .dqk = 64, .dv = 64, .dtype = 0,
               .mask = 1, .wl = -1, .wr = -1, .p = 0.3f, .seed = 7, .offset = 3};
    problem p;
    device d;
    fajit_attn_args a;
    char why[300] = "";
    if (problem_init(&p, &c, 99) != 0 || device_init(&d, &p) != 0) {
        check(0, "reproducible dropout", "out of memory");
        return;
    }
    const size_t nq = (size_t)(p.total_q * c.hq);
    uint16_t *o1 = malloc(nq * (size_t)c.dv * 2), *o2 = malloc(nq * (size_t)c.dv * 2);
    float *l1 = malloc(nq * 4), *l2 = malloc(nq * 4);
    make_args(&p, &d, FAJIT_KERNEL_AUTO, &a);
    int ok = o1 && o2 && l1 && l2 && run(&p, &d, &a, ctx, o1, l1, why, sizeof why) == 0 &&
             run(&p, &d, &a, ctx, o2, l2, why, sizeof why) == 0;
    check(ok && memcmp(o1, o2, nq * (size_t)c.dv * 2) == 0 && memcmp(l1, l2, nq * 4) == 0,
          "AUTO dropout p=0.3: two runs with one seed are bit-identical", why);
    free(o1), free(o2), free(l1), free(l2);
    device_free(&d);
    problem_free(&p);
}

/* ---------------------------------------------------------------- the cases */

static fcase base(int dim, int dtype, int mask, int sq, int sk)
{
    fcase c = {.batch = 2, .sq = sq, .sk = sk, .hq = 4, .hkv = 2, .dqk = dim, .dv = dim,
               .dtype = dtype, .mask = mask, .wl = -1, .wr = -1, .seed = 1234, .offset = 0};
    return c;
}

static fcase varlen(fcase c, const int *lq, const int *lk, int n)
{
    c.varlen = 1;
    c.batch = n;
    c.sq = c.sk = 0;
    for (int b = 0; b < n; b++) {
        c.lens_q[b] = lq[b], c.lens_k[b] = lk[b];
        c.sq = lq[b] > c.sq ? lq[b] : c.sq;
        c.sk = lk[b] > c.sk ? lk[b] : c.sk;
    }
    return c;
}

/* Split-KV: few query rows over long keys, each feature in turn. */
static size_t split_cases(fcase *cs)
{
    static const struct {
        int batch, sq, sk, hq, hkv, d, mask, wl, wr;
        float cap;
        int alibi;
        float p;
    } sp[] = {
        {1, 1, 65536, 8, 2, 128, 0, -1, -1, 0.0f, 0, 0.0f},      /* decode, GQA 4:1 packed */
        {2, 1, 16384, 8, 1, 128, 1, -1, -1, 0.0f, 0, 0.0f},      /* MQA, causal, packed by 8 */
        {2, 4, 20000, 8, 2, 64, 1, -1, -1, 0.0f, 0, 0.0f},       /* causal */
        {2, 16, 4097, 8, 2, 128, 2, -1, -1, 0.0f, 0, 0.0f},      /* top-left: splits left empty */
        {2, 3, 9000, 4, 4, 100, 1, 700, -1, 0.0f, 0, 0.0f},      /* window, dim 100 */
        {1, 8, 12000, 8, 2, 128, 0, -1, -1, 20.0f, 0, 0.0f},     /* softcap */
        {1, 2, 30000, 8, 2, 128, 1, -1, -1, 0.0f, ALIBI_HEAD, 0.0f}, /* ALiBi */
        {2, 1, 8192, 8, 2, 59, 0, 300, 40, 0.0f, 0, 0.0f},       /* packed, both windows, dim 59 */
        {1, 16, 5000, 8, 2, 64, 1, -1, -1, 0.0f, 0, 0.17f},      /* dropout */
    };
    static const int lq[] = {1, 0, 16, 5}, lk[] = {20000, 7, 4100, 9000};
    static const int dq[] = {1, 1, 1, 0}, dk[] = {30000, 100, 9000, 5};
    size_t n = 0;
    for (size_t i = 0; i < sizeof sp / sizeof sp[0]; i++) {
        fcase c = base(sp[i].d, (int)i % 2, sp[i].mask, sp[i].sq, sp[i].sk);
        c.batch = sp[i].batch, c.hq = sp[i].hq, c.hkv = sp[i].hkv;
        c.wl = sp[i].wl, c.wr = sp[i].wr, c.softcap = sp[i].cap, c.alibi = sp[i].alibi, c.p = sp[i].p;
        c.seed = 99 + i;
        c.want_split = 1;
        cs[n++] = c;
    }
    fcase c = varlen(base(128, 1, 1, 0, 0), lq, lk, 4); /* varlen, ragged, causal */
    c.hq = 8, c.hkv = 2, c.want_split = 1;
    cs[n++] = c;
    c = varlen(base(64, 0, 0, 0, 0), dq, dk, 4); /* varlen decode, packed, softcap */
    c.hq = 8, c.hkv = 2, c.softcap = 10.0f, c.want_split = 1;
    cs[n++] = c;
    return n;
}

static size_t build_cases(fcase *cs)
{
    static const int windows[][2] = {{0, 0}, {5, -1}, {-1, 3}, {16, 7}, {0, -1}};
    static const int dims[] = {8, 59, 64, 100, 128, 256, 512};
    static const int lq[] = {0, 1, 17, 113, 64, 3}, lk[] = {5, 0, 1, 150, 64, 200};
    size_t n = 0;
    for (int w = 0; w < 5; w++) /* windows x every mask, seqlen_q < and > seqlen_k */
        for (int mask = 0; mask < 3; mask++) {
            fcase c = base(w % 2 ? 64 : 128, (w + mask) % 2, mask, w % 2 ? 113 : 200, w % 2 ? 200 : 113);
            c.wl = windows[w][0], c.wr = windows[w][1];
            cs[n++] = c;
        }
    for (int k = 0; k < 5; k++) { /* softcap (d 256 unmasked: a persistent kernel) */
        fcase c = base(k == 4 ? 256 : k % 2 ? 128 : 8, k % 2, k == 4 ? 0 : k / 2, 97, 160);
        c.softcap = k % 2 ? 5.0f : 30.0f;
        cs[n++] = c;
    }
    for (int k = 0; k < 4; k++) { /* ALiBi per head, per batch x head; GQA 4:1 and MQA */
        fcase c = base(64, k % 2, k % 3, 120, 90);
        c.alibi = k < 2 ? ALIBI_HEAD : ALIBI_BATCH_HEAD;
        c.hq = 8, c.hkv = k % 2 ? 2 : 1;
        if (k == 3)
            c.wl = 20, c.wr = 4;
        cs[n++] = c;
    }
    for (int k = 0; k < 3; k++) { /* dropout */
        fcase c = base(k == 1 ? 100 : 64, k % 2, k, 150, 130);
        c.p = 0.17f, c.seed = 0xfeedface12345678ull + (uint64_t)k, c.offset = 42u * (uint64_t)k;
        c.hq = 8, c.hkv = 2;
        cs[n++] = c;
    }
    for (int k = 0; k < 4; k++) { /* varlen, ragged with 0 and 1 */
        fcase c = varlen(base(k % 2 ? 59 : 64, k % 2, k % 3, 0, 0), lq, lk, 6);
        if (k == 2)
            c.alibi = ALIBI_BATCH_HEAD, c.softcap = 20.0f, c.wl = 30, c.wr = 10;
        if (k == 3)
            c.p = 0.17f, c.alibi = ALIBI_HEAD;
        cs[n++] = c;
    }
    for (size_t d = 0; d < sizeof dims / sizeof dims[0]; d++) { /* head dims, all at once */
        fcase c = base(dims[d], (int)d % 2, (int)d % 3, 65, 100);
        c.softcap = 15.0f, c.alibi = ALIBI_HEAD, c.wl = 40, c.wr = 20;
        c.p = d % 2 ? 0.17f : 0.0f;
        cs[n++] = c;
    }
    /* Head dims the fast kernel loads narrower (and their neighbours), each
     * with a window, a feature and varlen in turn. */
    static const int odd[][2] = {{24, 24}, {40, 40}, {59, 59}, {100, 100}, {111, 111}, {200, 200}, {100, 72}};
    for (size_t d = 0; d < sizeof odd / sizeof odd[0]; d++)
        for (int k = 0; k < 3; k++) {
            fcase c = base(odd[d][0], (int)(d + (size_t)k) % 2, (int)(d + (size_t)k) % 3, 90, 140);
            c.dv = odd[d][1];
            if (k == 0) /* window, softcap, ALiBi per batch and head, GQA 4:1 */
                c.wl = 33, c.wr = 9, c.softcap = 12.0f, c.alibi = ALIBI_BATCH_HEAD, c.hq = 8;
            if (k == 1) /* dropout with a left window */
                c.p = 0.17f, c.seed = 77 + (uint64_t)d, c.wl = 50;
            if (k == 2) /* varlen, ragged with 0 and 1 */
                c = varlen(c, lq, lk, 6);
            cs[n++] = c;
        }
    return n + split_cases(cs + n);
}

/* ---------------------------------------------------------------- main */

static int gpu_present(void)
{
    int count = 0;
    cudaError_t e = cudaGetDeviceCount(&count);
    if (e != cudaSuccess || count == 0) {
        printf("skip: no CUDA GPU (%s)\n",
               e != cudaSuccess ? cudaGetErrorString(e) : "cudaGetDeviceCount returned 0");
        return 0;
    }
    return 1;
}

/* Every case's variants (both kernel choices), compiled on all cores first. */
static void precompile(fajit_ctx *ctx, const fcase *cs, size_t n)
{
    static char texts[2 * MAX_CASES + 8][400];
    const char *specs[2 * MAX_CASES + 8];
    static const float fake_slopes[4];
    static const int32_t fake_cu[4];
    static const uint16_t fake[8];
    size_t m = 0;
    for (size_t i = 0; i < n; i++)
        for (int k = 0; k < 2; k++) {
            problem p;
            device d = {.q = (void *)fake, .k = (void *)fake, .v = (void *)fake, .o = (void *)fake,
                        .slopes = (float *)fake_slopes, .cu_q = (int32_t *)fake_cu,
                        .cu_k = (int32_t *)fake_cu};
            fajit_attn_args a;
            memset(&p, 0, sizeof p);
            p.c = cs[i];
            make_args(&p, &d, k ? FAJIT_KERNEL_AUTO : FAJIT_KERNEL_REFERENCE, &a);
            if (fajit_attn_variant(ctx, &a, texts[m], sizeof texts[m]) > 0)
                specs[m] = texts[m], m++;
        }
    if (precompile_variants(ctx, specs, m, 16) != 0)
        failures++;
}

/* test_features_gpu [--split-only]: --split-only runs the split-KV cases
 * alone (compute-sanitizer's run of the split path). */
int main(int argc, char **argv)
{
    static fcase cases[MAX_CASES];
    const int split_only = argc > 1 && strcmp(argv[1], "--split-only") == 0;
    fajit_ctx *ctx = NULL;
    if (!gpu_present())
        return 77;
    fajit_options opt;
    fajit_options_init(&opt);
    opt.log_level = FAJIT_LOG_DEBUG; /* split-KV launches say so (on_log) */
    opt.log_fn = on_log;
    int rc = fajit_create(&ctx, &opt);
    if (rc != 0) {
        printf("FAIL fajit_create: %s: %s\n", fajit_strerror(rc), fajit_last_error());
        return 1;
    }
    size_t n = split_only ? split_cases(cases) : build_cases(cases);
    precompile(ctx, cases, n);
    if (!split_only) {
        check_dropout_mask(ctx, FAJIT_KERNEL_AUTO, 256, 4, 64);
        check_dropout_mask(ctx, FAJIT_KERNEL_REFERENCE, 512, 8, 512);
        check_reproducible(ctx);
    }
    for (size_t i = 0; i < n; i++)
        run_case(&cases[i], ctx, 1000 + i);
    fajit_destroy(ctx);
    printf("%s\n", failures ? "FAILED" : "all passed");
    return failures != 0;
}
