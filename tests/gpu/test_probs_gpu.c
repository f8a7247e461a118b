/*
 * tests/gpu/test_probs_gpu.c - the forward's probabilities output
 * (fajit_attn_args.probs, op ref-probs) through the public API, against an
 * fp64 softmax on the CPU and the host copy of the dropout stream
 * (tests/gpu/philox.h).
 *
 * For each case (dense and varlen, causal, windows, softcap, ALiBi, GQA,
 * dropout on and off, fp16 and bf16, a contiguous buffer and flash_attn's
 * (batch, nheads, seqlen rounded up to 128) strided one, poisoned with NaN
 * bits before the launch):
 *  - every element of a row's keys is written: |probs| within 5e-5 + 2e-3 *
 *    p of the fp64 softmax p (normalised, before dropout); keys the row does
 *    not see exactly +0; each visible row's |probs| sums to 1 within 1e-4;
 *  - the sign is the dropout mask: negative (sign bit set) exactly where the
 *    host Philox drops (b, h, i, j);
 *  - everything else (padding, rows and keys past a varlen sequence) keeps
 *    its poison;
 *  - the output and LSE equal, bit for bit, those of the same call without
 *    probs on the reference kernel (asking for probs changes nothing else).
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

#define MAX_BATCH 6

typedef struct pcase {
    const char *name;
    int batch, sq, sk, hq, hkv, d, dtype, mask, wl, wr;
    float softcap, p;
    int alibi;         /* per-head slopes */
    int varlen;
    int lens_q[MAX_BATCH], lens_k[MAX_BATCH];
    int padded;        /* probs strided as flash_attn's (b, h, round128(sq), round128(sk)) */
} pcase;

static int failures;

static void check(int ok, const char *what, const char *detail)
{
    printf("%s %s%s%s\n", ok ? "ok  " : "FAIL", what, detail && detail[0] ? ": " : "",
           detail ? detail : "");
    failures += !ok;
}

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

/* ---------------------------------------------------------------- the problem */

/* q (total_q, hq, d), k and v (total_k, hkv, d); dense runs are varlen runs
 * with cu[b] = b * seqlen and batch strides. */
typedef struct problem {
    pcase c;
    int cu_q[MAX_BATCH + 1], cu_k[MAX_BATCH + 1];
    int64_t total_q, total_k, sqr, skr, probs_elems, ps[3];
    uint16_t *q, *k, *v;
    float slopes[64];
    uint64_t seed, offset;
} problem;

static int len_q(const problem *p, int b) { return p->c.varlen ? p->c.lens_q[b] : p->c.sq; }
static int len_k(const problem *p, int b) { return p->c.varlen ? p->c.lens_k[b] : p->c.sk; }

static int problem_init(problem *p, const pcase *c, uint64_t seed)
{
    uint64_t s = seed;
    memset(p, 0, sizeof *p);
    p->c = *c;
    for (int b = 0; b < c->batch; b++) {
        p->cu_q[b + 1] = p->cu_q[b] + len_q(p, b);
        p->cu_k[b + 1] = p->cu_k[b] + len_k(p, b);
    }
    p->total_q = p->cu_q[c->batch], p->total_k = p->cu_k[c->batch];
    p->sqr = c->padded ? (c->sq + 127) / 128 * 128 : c->sq;
    p->skr = c->padded ? (c->sk + 127) / 128 * 128 : c->sk;
    p->ps[2] = p->skr, p->ps[1] = p->sqr * p->skr, p->ps[0] = c->hq * p->ps[1];
    p->probs_elems = c->batch * p->ps[0];
    p->seed = 0x0123456789abcdefull + seed, p->offset = 0x100000007ull * seed;
    const size_t nq = (size_t)(p->total_q * c->hq * c->d), nk = (size_t)(p->total_k * c->hkv * c->d);
    p->q = malloc(nq * 2 + 2), p->k = malloc(nk * 2 + 2), p->v = malloc(nk * 2 + 2);
    if (!p->q || !p->k || !p->v)
        return -1;
    uint16_t *bufs[3] = {p->q, p->k, p->v};
    const size_t n[3] = {nq, nk, nk};
    for (int t = 0; t < 3; t++)
        for (size_t i = 0; i < n[t]; i++)
            bufs[t][i] = c->dtype ? attn_float_to_bf16(rng_normal(&s)) : attn_float_to_half(rng_normal(&s));
    for (int h = 0; h < c->hq; h++)
        p->slopes[h] = ldexpf(1.0f, -1 - h % 8);
    return 0;
}

static void problem_free(problem *p)
{
    free(p->q), free(p->k), free(p->v);
}

/* Visible keys [lo, hi) of row i (as common.cuh's visible_keys). */
static void visible(const pcase *c, int64_t i, int64_t sq, int64_t sk, int64_t *lo, int64_t *hi)
{
    const int64_t diag = c->mask == FAJIT_MASK_CAUSAL_TL ? i : i + sk - sq;
    *lo = 0, *hi = sk;
    if (c->mask != FAJIT_MASK_NONE && diag + 1 < *hi)
        *hi = diag + 1;
    if (c->wl >= 0 && diag - c->wl > *lo)
        *lo = diag - c->wl;
    if (c->wr >= 0 && diag + c->wr + 1 < *hi)
        *hi = diag + c->wr + 1;
}

/* fp64 softmax of row i of sequence b, head h, over keys [lo, hi): out[j - lo]. */
static void softmax_row(const problem *p, int b, int h, int64_t i, int64_t lo, int64_t hi, double *out)
{
    const pcase *c = &p->c;
    const int64_t sq = len_q(p, b), sk = len_k(p, b), hk = h / (c->hq / c->hkv);
    const uint16_t *q = p->q + ((p->cu_q[b] + i) * c->hq + h) * c->d;
    const double scale = (double)(1.0f / sqrtf((float)c->d));
    double mx = -INFINITY, l = 0.0;
    for (int64_t j = lo; j < hi; j++) {
        const uint16_t *k = p->k + ((p->cu_k[b] + j) * c->hkv + hk) * c->d;
        double s = 0.0;
        for (int d = 0; d < c->d; d++)
            s += attn_decode(c->dtype, q[d]) * attn_decode(c->dtype, k[d]);
        s *= scale;
        if (c->softcap != 0.0f)
            s = c->softcap * tanh(s / c->softcap);
        if (c->alibi)
            s -= p->slopes[h] * (double)llabs(i + sk - sq - j);
        out[j - lo] = s;
        mx = fmax(mx, s);
    }
    for (int64_t j = lo; j < hi; j++)
        l += (out[j - lo] = exp(out[j - lo] - mx));
    for (int64_t j = lo; j < hi; j++)
        out[j - lo] /= l;
}

/* ---------------------------------------------------------------- device */

typedef struct device {
    void *q, *k, *v, *o;
    float *lse, *probs, *slopes;
    int32_t *cu_q, *cu_k;
} device;

static void device_free(device *d)
{
    cudaFree(d->q), cudaFree(d->k), cudaFree(d->v), cudaFree(d->o), cudaFree(d->lse);
    cudaFree(d->probs), cudaFree(d->slopes), cudaFree(d->cu_q), cudaFree(d->cu_k);
}

static int upload(void **dst, const void *src, size_t bytes)
{
    return cudaMalloc(dst, bytes + 16) != cudaSuccess ||
           (src && cudaMemcpy(*dst, src, bytes, cudaMemcpyHostToDevice) != cudaSuccess);
}

static int device_init(device *d, const problem *p)
{
    const pcase *c = &p->c;
    const size_t nq = (size_t)(p->total_q * c->hq), nk = (size_t)(p->total_k * c->hkv);
    memset(d, 0, sizeof *d);
    return upload(&d->q, p->q, nq * (size_t)c->d * 2) || upload(&d->k, p->k, nk * (size_t)c->d * 2) ||
           upload(&d->v, p->v, nk * (size_t)c->d * 2) || upload(&d->o, NULL, nq * (size_t)c->d * 2) ||
           upload((void **)&d->lse, NULL, nq * 4) ||
           upload((void **)&d->probs, NULL, (size_t)p->probs_elems * 4) ||
           upload((void **)&d->slopes, p->slopes, sizeof p->slopes) ||
           upload((void **)&d->cu_q, p->cu_q, sizeof p->cu_q) ||
           upload((void **)&d->cu_k, p->cu_k, sizeof p->cu_k);
}

static void make_args(const problem *p, const device *d, int with_probs, fajit_attn_args *a)
{
    const pcase *c = &p->c;
    fajit_attn_args_init(a);
    a->q = d->q, a->k = d->k, a->v = d->v, a->o = d->o, a->lse = d->lse;
    a->batch = c->batch, a->seqlen_q = c->sq, a->seqlen_k = c->sk;
    a->nheads_q = c->hq, a->nheads_kv = c->hkv, a->dqk = a->dv = c->d;
    a->dtype = c->dtype, a->mask = c->mask, a->kernel = FAJIT_KERNEL_REFERENCE;
    a->window_left = c->wl, a->window_right = c->wr, a->softcap = c->softcap;
    a->alibi_slopes = c->alibi ? d->slopes : NULL;
    a->dropout_p = c->p, a->dropout_seed = p->seed, a->dropout_offset = p->offset;
    if (c->varlen)
        a->cu_seqlens_q = d->cu_q, a->cu_seqlens_k = d->cu_k;
    if (with_probs) {
        a->probs = d->probs;
        if (c->padded) /* else all 0: contiguous */
            memcpy(a->probs_stride, p->ps, sizeof p->ps);
    }
}

/* Poisons o, LSE and probs, runs, copies them back. */
static int run(fajit_ctx *ctx, const problem *p, const device *d, const fajit_attn_args *a, uint16_t *o,
               float *lse, float *probs, char *why, size_t cap)
{
    const size_t nq = (size_t)(p->total_q * p->c.hq);
    cudaMemset(d->o, 0xff, nq * (size_t)p->c.d * 2);
    cudaMemset(d->lse, 0xff, nq * 4);
    cudaMemset(d->probs, 0xff, (size_t)p->probs_elems * 4);
    int rc = fajit_attn_fwd(ctx, a, NULL);
    if (rc != 0) {
        snprintf(why, cap, "fajit_attn_fwd: %s: %s", fajit_strerror(rc), fajit_last_error());
        return -1;
    }
    cudaError_t e = cudaDeviceSynchronize();
    if (e == cudaSuccess)
        e = cudaMemcpy(o, d->o, nq * (size_t)p->c.d * 2, cudaMemcpyDeviceToHost);
    if (e == cudaSuccess)
        e = cudaMemcpy(lse, d->lse, nq * 4, cudaMemcpyDeviceToHost);
    if (e == cudaSuccess && probs)
        e = cudaMemcpy(probs, d->probs, (size_t)p->probs_elems * 4, cudaMemcpyDeviceToHost);
    if (e != cudaSuccess) {
        snprintf(why, cap, "CUDA: %s", cudaGetErrorName(e));
        return -1;
    }
    return 0;
}

/* ---------------------------------------------------------------- checks */

typedef struct tally {
    int64_t checked, dropped, bad_value, bad_sign, bad_masked, bad_poison, bad_sum;
    double max_err;
    char first[200];
} tally;

static int poisoned(float x)
{
    uint32_t bits;
    memcpy(&bits, &x, 4);
    return bits == 0xffffffffu;
}

/* Counts a bad element; the first one's description is kept. */
static void note(tally *t, int64_t *counter, int b, int h, int64_t i, int64_t j, float got, const char *what)
{
    if (!t->first[0])
        snprintf(t->first, sizeof t->first, "probs[b=%d,h=%d,i=%lld,j=%lld] = %g: %s", b, h, (long long)i,
                 (long long)j, (double)got, what);
    (*counter)++;
}

static void check_row(const problem *p, const float *probs, int b, int h, int64_t i, double *ref, tally *t)
{
    const pcase *c = &p->c;
    const int64_t sq = len_q(p, b), sk = len_k(p, b);
    const float *row = probs + b * p->ps[0] + h * p->ps[1] + i * p->ps[2];
    const uint32_t threshold = fajit_dropout_threshold(c->p);
    int64_t lo, hi;
    double sum = 0.0;
    visible(c, i, sq, sk, &lo, &hi);
    if (hi > lo)
        softmax_row(p, b, h, i, lo, hi, ref);
    for (int64_t j = 0; j < sk; j++) {
        const float got = row[j];
        t->checked++;
        if (j < lo || j >= hi) {
            if (got != 0.0f || signbit(got))
                note(t, &t->bad_masked, b, h, i, j, got, "want +0 (a key the row does not see)");
            continue;
        }
        const int keep = c->p == 0.0f || fajit_dropout_keep(p->seed, p->offset, threshold, b, h, c->hq, i, j);
        const double want = ref[j - lo], err = fabs(fabs((double)got) - want);
        t->dropped += !keep;
        sum += fabs((double)got);
        t->max_err = fmax(t->max_err, isnan(err) ? INFINITY : err);
        if (!(err <= 5e-5 + 2e-3 * want)) {
            char what[80];
            snprintf(what, sizeof what, "|probs| should be the softmax %.6g", want);
            note(t, &t->bad_value, b, h, i, j, got, what);
        }
        if ((signbit(got) == 0) != keep)
            note(t, &t->bad_sign, b, h, i, j, got, keep ? "the host Philox keeps it" : "the host Philox drops it");
    }
    if (hi > lo && !(fabs(sum - 1.0) <= 1e-4))
        note(t, &t->bad_sum, b, h, i, -1, (float)sum, "the row's |probs| sum (j -1) is not 1");
    for (int64_t j = sk; j < p->skr; j++) /* padding past the row's keys */
        if (!poisoned(row[j]))
            note(t, &t->bad_poison, b, h, i, j, row[j], "padding past the row's keys written");
}

static void check_probs(const problem *p, const float *probs, tally *t)
{
    const pcase *c = &p->c;
    double *ref = malloc(((size_t)c->sk + 1) * sizeof *ref);
    memset(t, 0, sizeof *t);
    for (int b = 0; b < c->batch && ref; b++)
        for (int h = 0; h < c->hq; h++) {
            for (int64_t i = 0; i < len_q(p, b); i++)
                check_row(p, probs, b, h, i, ref, t);
            for (int64_t i = len_q(p, b); i < p->sqr; i++) /* rows past the sequence */
                for (int64_t j = 0; j < p->skr; j++)
                    if (!poisoned(probs[b * p->ps[0] + h * p->ps[1] + i * p->ps[2] + j]))
                        note(t, &t->bad_poison, b, h, i, j, probs[b * p->ps[0] + h * p->ps[1] + i * p->ps[2] + j],
                             "a row past seqlen_q written");
        }
    if (!ref)
        snprintf(t->first, sizeof t->first, "out of memory");
    free(ref);
}

static void run_case(fajit_ctx *ctx, const pcase *c, uint64_t seed)
{
    problem p;
    device d;
    fajit_attn_args a;
    char why[300] = "", line[400], variant[400] = "?";
    tally t;
    if (problem_init(&p, c, seed) != 0 || device_init(&d, &p) != 0) {
        check(0, c->name, "out of host or device memory");
        problem_free(&p);
        return;
    }
    const size_t nq = (size_t)(p.total_q * c->hq);
    uint16_t *o1 = malloc(nq * (size_t)c->d * 2 + 2), *o2 = malloc(nq * (size_t)c->d * 2 + 2);
    float *l1 = malloc(nq * 4 + 4), *l2 = malloc(nq * 4 + 4), *probs = malloc((size_t)p.probs_elems * 4 + 4);
    if (!o1 || !o2 || !l1 || !l2 || !probs) {
        check(0, c->name, "out of host memory");
        goto free_all;
    }
    make_args(&p, &d, 1, &a);
    fajit_attn_variant(ctx, &a, variant, sizeof variant);
    if (run(ctx, &p, &d, &a, o1, l1, probs, why, sizeof why) != 0) {
        check(0, c->name, why);
        goto free_all;
    }
    check_probs(&p, probs, &t);
    snprintf(line, sizeof line, "%-34s %.9s: %lld probs (%lld dropped), max |err| %.2e", c->name, variant,
             (long long)t.checked, (long long)t.dropped, t.max_err);
    snprintf(why, sizeof why, "value %lld, sign %lld, masked %lld, sum %lld, poison %lld; first %s",
             (long long)t.bad_value, (long long)t.bad_sign, (long long)t.bad_masked, (long long)t.bad_sum,
             (long long)t.bad_poison, t.first);
    check(!t.first[0] && strncmp(variant, "ref-probs ", 10) == 0 && (c->p == 0.0f || t.dropped > 0), line,
          t.first[0] ? why : NULL);
    make_args(&p, &d, 0, &a);
    if (run(ctx, &p, &d, &a, o2, l2, NULL, why, sizeof why) != 0) {
        check(0, c->name, why);
        goto free_all;
    }
    check(memcmp(o1, o2, nq * (size_t)c->d * 2) == 0 && memcmp(l1, l2, nq * 4) == 0,
          "  output and LSE == the reference kernel's without probs, bit for bit", NULL);
free_all:
    free(o1), free(o2), free(l1), free(l2), free(probs);
    device_free(&d);
    problem_free(&p);
}

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

int main(void)
{
    static const pcase cases[] = {
        {.name = "dropout causal fp16 GQA contiguous", .batch = 2, .sq = 77, .sk = 130, .hq = 4, .hkv = 2,
         .d = 64, .dtype = 0, .mask = FAJIT_MASK_CAUSAL, .wl = -1, .wr = -1, .p = 0.17f},
        {.name = "dropout none bf16 padded (flash_attn)", .batch = 2, .sq = 100, .sk = 90, .hq = 3, .hkv = 1,
         .d = 72, .dtype = 1, .wl = -1, .wr = -1, .p = 0.3f, .padded = 1},
        {.name = "window+softcap+alibi bf16 no dropout", .batch = 1, .sq = 120, .sk = 150, .hq = 4, .hkv = 4,
         .d = 100, .dtype = 1, .mask = FAJIT_MASK_NONE, .wl = 30, .wr = 10, .softcap = 15.0f, .alibi = 1,
         .padded = 1},
        {.name = "all features + dropout, top-left", .batch = 2, .sq = 64, .sk = 200, .hq = 8, .hkv = 2,
         .d = 128, .dtype = 0, .mask = FAJIT_MASK_CAUSAL_TL, .wl = 40, .wr = -1, .softcap = 20.0f, .alibi = 1,
         .p = 0.17f, .padded = 1},
        {.name = "varlen dropout causal, ragged with 0 and 1", .batch = 6, .hq = 4, .hkv = 2, .d = 59,
         .dtype = 0, .mask = FAJIT_MASK_CAUSAL, .wl = -1, .wr = -1, .p = 0.17f, .varlen = 1, .padded = 1,
         .lens_q = {0, 1, 17, 113, 64, 3}, .lens_k = {5, 0, 1, 150, 64, 200}},
        {.name = "varlen window no dropout, contiguous", .batch = 3, .hq = 2, .hkv = 1, .d = 32, .dtype = 1,
         .wl = 8, .wr = 8, .varlen = 1, .lens_q = {40, 9, 70}, .lens_k = {40, 30, 70}},
    };
    fajit_ctx *ctx = NULL;
    if (!gpu_present())
        return 77;
    int rc = fajit_create(&ctx, NULL);
    if (rc != 0) {
        printf("FAIL fajit_create: %s: %s\n", fajit_strerror(rc), fajit_last_error());
        return 1;
    }
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        pcase c = cases[i];
        if (c.varlen)
            for (int b = 0; b < c.batch; b++) {
                c.sq = c.lens_q[b] > c.sq ? c.lens_q[b] : c.sq;
                c.sk = c.lens_k[b] > c.sk ? c.lens_k[b] : c.sk;
            }
        run_case(ctx, &c, 100 + i);
    }
    fajit_destroy(ctx);
    printf("%s\n", failures ? "FAILED" : "all passed");
    return failures != 0;
}
