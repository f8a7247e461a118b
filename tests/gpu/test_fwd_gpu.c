/*
 * tests/gpu/test_fwd_gpu.c - the fast forward kernel (op fwd) through the public
 * API with kernel = AUTO, against an fp64 CPU reference, by FlashAttention's
 * rule:
 *
 *   max |out - ref| <= 2 * max |naive - ref| + 1e-3
 *
 * where `naive` is the same attention computed the way a plain low-precision
 * implementation would: q.k accumulated in fp32 and rounded to the input dtype,
 * scaled and rounded again, softmax in fp32, probabilities rounded to the
 * dtype, P V accumulated in fp32 and rounded. LSE must be within 1e-3 *
 * max(1, |ref|) (the kernel keeps scores in fp32). Fully masked rows must be
 * exactly 0 with LSE -inf. Output buffers (gaps of strided layouts included)
 * are NaN-poisoned before each launch: an unwritten element or a stray write
 * into a gap fails.
 *
 * Every case first asks fajit_attn_variant which kernel AUTO picks and
 * requires op fwd, so a silent fallback to the reference cannot pass.
 *
 * Grid: head dims 8..256 (and 192/128, 128/64), head dims that are not
 * multiples of 8 (59, 100, 111, 100/72: narrower loads) x fp16/bf16 x none/
 * causal/causal-tl x seqlens 1, 17, 113, 256 both ways, GQA 4:1 (MQA), GQA
 * 2:1, 1:1, contiguous and strided layouts (every stride padded by a multiple
 * of 8 elements), batch 2; q, k and v sliced from one packed qkv buffer
 * (flash_attn's qkvpacked layout: the head dims' odd strides and offsets);
 * then long cases (1023, 2049 both ways) for a few head dims. A q or v
 * misaligned for its head dim's loads must fall back to the reference (and
 * still be right). The CPU reference runs on all cores.
 *
 * Usage: test_fwd_gpu [--persist N] [--quick]. Exit 0 pass, 1 fail, 77 no GPU.
 */
#include <cuda_runtime_api.h>
#include <math.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "attn_check.h"
#include "fajit.h"
#include "precompile.h"

enum { DENSE = 0, STRIDED = 1, QKV_PACKED = 2 };

typedef struct fcase {
    int dqk, dv, dtype, mask;
    int64_t batch, sq, sk, hq, hkv;
    int strided, want_lse; /* strided: DENSE, STRIDED or QKV_PACKED */
    int misalign;          /* q and v start this many elements past an aligned address */
    float scale_mul;       /* softmax_scale = scale_mul / sqrt(dqk); 0: the default scale */
} fcase;

/* One problem on the host: inputs (raw 16-bit), strides, references. */
typedef struct problem {
    fcase c;
    int64_t qs[3], ks[3], vs[3], os[3]; /* batch, seq, head strides in elements */
    size_t q_elems, k_elems, v_elems, o_elems;
    uint16_t *q, *k, *v; /* QKV_PACKED: k and v point into q's buffer */
    double *ref_o;   /* dense (b, sq, hq, dv) */
    double *ref_lse; /* (b, hq, sq) */
    float *naive_o;  /* dense (b, sq, hq, dv) */
    float scale;
} problem;

/* ---------------------------------------------------------------- inputs */

static uint64_t rng_next(uint64_t *s) {
    *s ^= *s << 13;
    *s ^= *s >> 7;
    *s ^= *s << 17;
    return *s;
}

static float rng_normal(uint64_t *s) {
    double u1 = ((double)(rng_next(s) >> 11) + 0.5) / 9007199254740992.0;
    double u2 = ((double)(rng_next(s) >> 11) + 0.5) / 9007199254740992.0;
    return (float)(sqrt(-2.0 * log(u1)) * cos(6.283185307179586 * u2));
}

static uint16_t encode(int dtype, float f) {
    return dtype == 0 ? attn_float_to_half(f) : attn_float_to_bf16(f);
}

static float round_to(int dtype, float f) { return (float)attn_decode(dtype, encode(dtype, f)); }

/* Strides: dense, or each level padded by a (different) multiple of 8. */
static size_t make_strides(int64_t b, int64_t s, int64_t h, int64_t d, int strided, int64_t st[3]) {
    st[2] = d + (strided ? 8 : 0);
    st[1] = h * st[2] + (strided ? 16 : 0);
    st[0] = s * st[1] + (strided ? 24 : 0);
    return (size_t)(b * st[0]) + 8;
}

static uint16_t *random_tensor(size_t n, int dtype, uint64_t *seed) {
    uint16_t *t = malloc(n * 2 + 2);
    for (size_t i = 0; t && i < n; ++i)
        t[i] = encode(dtype, rng_normal(seed));
    return t;
}

/* ---------------------------------------------------------------- references */

static size_t at(const int64_t st[3], int64_t b, int64_t i, int64_t h) {
    return (size_t)(b * st[0] + i * st[1] + h * st[2]);
}

static void visible(const fcase *c, int64_t i, int64_t *lo, int64_t *hi) {
    *lo = 0;
    *hi = c->sk;
    if (c->mask != 0) {
        const int64_t diag = c->mask == 2 ? i : i + c->sk - c->sq;
        if (diag + 1 < *hi)
            *hi = diag + 1;
    }
}

typedef struct row_scratch {
    double *qd, *sd, *od;
    float *qf, *sf, *of;
} row_scratch;

/* Reference (fp64) and naive (low precision) for one query row. */
static void reference_row(problem *p, row_scratch *w, int64_t b, int64_t i, int64_t h) {
    const fcase *c = &p->c;
    const int dt = c->dtype;
    const int64_t hk = h / (c->hq / c->hkv);
    int64_t lo, hi;
    visible(c, i, &lo, &hi);
    const size_t out = (size_t)(((b * c->sq + i) * c->hq + h) * c->dv);
    const size_t lse_at = (size_t)((b * c->hq + h) * c->sq + i);
    for (int d = 0; d < c->dqk; ++d)
        w->qf[d] = (float)(w->qd[d] = attn_decode(dt, p->q[at(p->qs, b, i, h) + (size_t)d]));
    double mx = -INFINITY;
    float mxf = -INFINITY;
    for (int64_t j = lo; j < hi; ++j) {
        const uint16_t *kr = p->k + at(p->ks, b, j, hk);
        double sd = 0.0;
        float sf = 0.0f;
        for (int d = 0; d < c->dqk; ++d) {
            const double kv = attn_decode(dt, kr[d]);
            sd += w->qd[d] * kv;
            sf += w->qf[d] * (float)kv;
        }
        w->sd[j - lo] = sd * (double)p->scale;
        w->sf[j - lo] = round_to(dt, round_to(dt, sf) * p->scale);
        mx = fmax(mx, w->sd[j - lo]);
        mxf = fmaxf(mxf, w->sf[j - lo]);
    }
    double l = 0.0;
    float lf = 0.0f;
    for (int64_t j = lo; j < hi; ++j) {
        l += (w->sd[j - lo] = exp(w->sd[j - lo] - mx));
        lf += (w->sf[j - lo] = expf(w->sf[j - lo] - mxf));
    }
    for (int d = 0; d < c->dv; ++d) {
        w->od[d] = 0.0;
        w->of[d] = 0.0f;
    }
    for (int64_t j = lo; j < hi; ++j) {
        const uint16_t *vr = p->v + at(p->vs, b, j, hk);
        const double pd = w->sd[j - lo] / l;
        const float pf = round_to(dt, w->sf[j - lo] / lf);
        for (int d = 0; d < c->dv; ++d) {
            const double vv = attn_decode(dt, vr[d]);
            w->od[d] += pd * vv;
            w->of[d] += pf * (float)vv;
        }
    }
    for (int d = 0; d < c->dv; ++d) {
        p->ref_o[out + (size_t)d] = w->od[d];
        p->naive_o[out + (size_t)d] = hi > lo ? round_to(dt, w->of[d]) : 0.0f;
    }
    p->ref_lse[lse_at] = hi > lo ? mx + log(l) : -INFINITY;
}

typedef struct worker_arg {
    problem *p;
    int64_t first, step;
} worker_arg;

static void *reference_worker(void *arg) {
    worker_arg *a = arg;
    problem *p = a->p;
    const fcase *c = &p->c;
    row_scratch w;
    const size_t n = (size_t)(c->sk + 1);
    w.qd = malloc(256 * sizeof(double));
    w.od = malloc(256 * sizeof(double));
    w.sd = malloc(n * sizeof(double));
    w.qf = malloc(256 * sizeof(float));
    w.of = malloc(256 * sizeof(float));
    w.sf = malloc(n * sizeof(float));
    const int64_t rows = c->batch * c->hq * c->sq;
    for (int64_t r = a->first; w.qd && w.od && w.sd && w.qf && w.of && w.sf && r < rows; r += a->step)
        reference_row(p, &w, r / (c->hq * c->sq), r % c->sq, (r / c->sq) % c->hq);
    free(w.qd);
    free(w.od);
    free(w.sd);
    free(w.qf);
    free(w.of);
    free(w.sf);
    return NULL;
}

static void compute_references(problem *p) {
    enum { MAX_THREADS = 64 };
    long n = sysconf(_SC_NPROCESSORS_ONLN);
    if (n < 1)
        n = 1;
    if (n > MAX_THREADS)
        n = MAX_THREADS;
    pthread_t th[MAX_THREADS];
    worker_arg args[MAX_THREADS];
    for (long t = 0; t < n; ++t) {
        args[t] = (worker_arg){p, t, n};
        pthread_create(&th[t], NULL, reference_worker, &args[t]);
    }
    for (long t = 0; t < n; ++t)
        pthread_join(th[t], NULL);
}

/* flash_attn's qkvpacked layout: one (b, s, 3, h, d) buffer; q, k and v are
 * its slices (k at h * d elements, v at 2 h d), strides (3 s h d, 3 h d, d). */
static int packed_init(problem *p, uint64_t *seed) {
    const fcase *c = &p->c;
    const int64_t hd = c->hq * c->dqk;
    p->qs[2] = c->dqk;
    p->qs[1] = 3 * hd;
    p->qs[0] = c->sq * p->qs[1];
    memcpy(p->ks, p->qs, sizeof p->qs);
    memcpy(p->vs, p->qs, sizeof p->qs);
    p->q_elems = (size_t)(c->batch * p->qs[0]);
    p->k_elems = p->v_elems = p->q_elems - (size_t)hd; /* counted from k's start (v reads less) */
    p->o_elems = make_strides(c->batch, c->sq, c->hq, c->dv, 1, p->os);
    p->q = random_tensor(p->q_elems, c->dtype, seed);
    if (!p->q)
        return -1;
    p->k = p->q + hd;
    p->v = p->q + 2 * hd;
    return 0;
}

static int problem_init(problem *p, const fcase *c, uint64_t seed) {
    memset(p, 0, sizeof *p);
    p->c = *c;
    p->scale = (c->scale_mul != 0.0f ? c->scale_mul : 1.0f) / sqrtf((float)c->dqk);
    if (c->strided == QKV_PACKED) {
        if (c->sq != c->sk || c->hq != c->hkv || c->dqk != c->dv || packed_init(p, &seed) != 0)
            return -1;
    } else {
        p->q_elems = make_strides(c->batch, c->sq, c->hq, c->dqk, c->strided, p->qs);
        p->k_elems = make_strides(c->batch, c->sk, c->hkv, c->dqk, c->strided, p->ks);
        p->v_elems = make_strides(c->batch, c->sk, c->hkv, c->dv, c->strided, p->vs);
        p->o_elems = make_strides(c->batch, c->sq, c->hq, c->dv, c->strided, p->os);
        p->q = random_tensor(p->q_elems, c->dtype, &seed);
        p->k = random_tensor(p->k_elems, c->dtype, &seed);
        p->v = random_tensor(p->v_elems, c->dtype, &seed);
    }
    const size_t dense = (size_t)(c->batch * c->sq * c->hq * c->dv);
    p->ref_o = malloc(dense * sizeof(double) + 8);
    p->naive_o = malloc(dense * sizeof(float) + 8);
    p->ref_lse = malloc((size_t)(c->batch * c->hq * c->sq) * sizeof(double) + 8);
    if (!p->q || !p->k || !p->v || !p->ref_o || !p->naive_o || !p->ref_lse)
        return -1;
    compute_references(p);
    return 0;
}

static void problem_free(problem *p) {
    free(p->q);
    if (p->c.strided != QKV_PACKED) {
        free(p->k);
        free(p->v);
    }
    free(p->ref_o);
    free(p->naive_o);
    free(p->ref_lse);
}

/* ---------------------------------------------------------------- the check */

typedef struct verdict {
    double err, naive_err, tol, lse_err;
    int64_t nan, stray, bad_masked;
    char why[200];
} verdict;

static int is_gap(const problem *p, size_t idx) {
    const fcase *c = &p->c;
    const int64_t b = (int64_t)idx / p->os[0], r0 = (int64_t)idx % p->os[0];
    const int64_t i = r0 / p->os[1], r1 = r0 % p->os[1];
    const int64_t h = r1 / p->os[2], d = r1 % p->os[2];
    return b >= c->batch || i >= c->sq || h >= c->hq || d >= c->dv;
}

static void check_output(const problem *p, const uint16_t *o, const float *lse, verdict *v) {
    const fcase *c = &p->c;
    memset(v, 0, sizeof *v);
    for (int64_t b = 0; b < c->batch; ++b)
        for (int64_t i = 0; i < c->sq; ++i)
            for (int64_t h = 0; h < c->hq; ++h) {
                int64_t lo, hi;
                visible(c, i, &lo, &hi);
                const size_t dense = (size_t)(((b * c->sq + i) * c->hq + h) * c->dv);
                const uint16_t *orow = o + at(p->os, b, i, h);
                for (int d = 0; d < c->dv; ++d) {
                    const double x = attn_decode(c->dtype, orow[d]), r = p->ref_o[dense + (size_t)d];
                    if (isnan(x)) {
                        v->nan++;
                        continue;
                    }
                    if (hi <= lo && orow[d] != 0)
                        v->bad_masked++;
                    v->err = fmax(v->err, fabs(x - r));
                    v->naive_err = fmax(v->naive_err, fabs((double)p->naive_o[dense + (size_t)d] - r));
                }
                if (lse) {
                    const size_t li = (size_t)((b * c->hq + h) * c->sq + i);
                    const double rl = p->ref_lse[li];
                    if (isnan(lse[li]))
                        v->nan++;
                    else if (hi <= lo)
                        v->bad_masked += !(isinf(lse[li]) && lse[li] < 0);
                    else
                        v->lse_err = fmax(v->lse_err, fabs(lse[li] - rl) / fmax(1.0, fabs(rl)));
                }
            }
    for (size_t idx = 0; idx < p->o_elems; ++idx)
        if (is_gap(p, idx) && o[idx] != 0xffff)
            v->stray++;
    v->tol = 2.0 * v->naive_err + 1e-3;
    if (v->nan)
        snprintf(v->why, sizeof v->why, "%lld NaN values (unwritten?)", (long long)v->nan);
    else if (v->bad_masked)
        snprintf(v->why, sizeof v->why, "%lld fully masked values not 0 / -inf", (long long)v->bad_masked);
    else if (v->stray)
        snprintf(v->why, sizeof v->why, "%lld writes into stride gaps", (long long)v->stray);
    else if (v->err > v->tol)
        snprintf(v->why, sizeof v->why, "output error %.3e > %.3e", v->err, v->tol);
    else if (v->lse_err > 1e-3)
        snprintf(v->why, sizeof v->why, "lse error %.3e > 1e-3", v->lse_err);
}

/* ---------------------------------------------------------------- one case */

static int cuda_ok(cudaError_t e, const char *what, char *why, size_t cap) {
    if (e == cudaSuccess)
        return 1;
    snprintf(why, cap, "%s: %s", what, cudaGetErrorName(e));
    return 0;
}

static void fill_args(const problem *p, void *q, void *k, void *v, void *o, float *lse,
                      fajit_attn_args *a) {
    const fcase *c = &p->c;
    fajit_attn_args_init(a);
    a->q = q;
    a->k = k;
    a->v = v;
    a->o = o;
    a->lse = c->want_lse ? lse : NULL;
    a->batch = c->batch;
    a->seqlen_q = c->sq;
    a->seqlen_k = c->sk;
    a->nheads_q = c->hq;
    a->nheads_kv = c->hkv;
    a->dqk = c->dqk;
    a->dv = c->dv;
    a->dtype = c->dtype;
    a->mask = c->mask;
    a->softmax_scale = c->scale_mul != 0.0f ? p->scale : 0.0f;
    a->kernel = FAJIT_KERNEL_AUTO;
    if (c->strided != DENSE) {
        memcpy(a->q_stride, p->qs, sizeof p->qs);
        memcpy(a->k_stride, p->ks, sizeof p->ks);
        memcpy(a->v_stride, p->vs, sizeof p->vs);
        memcpy(a->o_stride, p->os, sizeof p->os);
    }
}

/* q, k and v on the device: ptr[] what the kernel gets, base[] what to free.
 * QKV_PACKED: one buffer, k and v inside it; else one each, q and v
 * `misalign` elements past cudaMalloc's alignment. */
static int upload_inputs(const problem *p, void *base[3], void *ptr[3], char *why, size_t cap) {
    const fcase *c = &p->c;
    const uint16_t *host[3] = {p->q, p->k, p->v};
    const size_t elems[3] = {p->q_elems, p->k_elems, p->v_elems};
    base[0] = base[1] = base[2] = NULL;
    if (c->strided == QKV_PACKED) {
        if (!cuda_ok(cudaMalloc(&base[0], p->q_elems * 2), "cudaMalloc", why, cap) ||
            !cuda_ok(cudaMemcpy(base[0], p->q, p->q_elems * 2, cudaMemcpyHostToDevice), "upload", why, cap))
            return 0;
        for (int t = 0; t < 3; ++t)
            ptr[t] = (uint16_t *)base[0] + (host[t] - p->q);
        return 1;
    }
    for (int t = 0; t < 3; ++t) {
        const size_t pad = t == 1 ? 0 : (size_t)c->misalign;
        if (!cuda_ok(cudaMalloc(&base[t], (elems[t] + pad) * 2), "cudaMalloc", why, cap))
            return 0;
        ptr[t] = (uint16_t *)base[t] + pad;
        if (!cuda_ok(cudaMemcpy(ptr[t], host[t], elems[t] * 2, cudaMemcpyHostToDevice), "upload", why, cap))
            return 0;
    }
    return 1;
}

/* The fast kernel's load width for a head dim (templates/flash_fwd.cuh). */
static int load_width(int d) { return d % 8 == 0 ? 8 : d % 4 == 0 ? 4 : d % 2 == 0 ? 2 : 1; }

/* Whether a case's pointers are misaligned for the fast kernel's loads. */
static int wants_reference(const fcase *c) {
    return c->misalign % load_width(c->dqk) != 0 || c->misalign % load_width(c->dv) != 0;
}

/* Uploads, checks the chosen variant is op fwd (op ref for a misaligned
 * case), launches, downloads, checks. */
static int launch_case(fajit_ctx *ctx, const problem *p, uint16_t *o, float *lse, verdict *v,
                       char *variant, size_t vcap) {
    const fcase *c = &p->c;
    const size_t lse_elems = (size_t)(c->batch * c->hq * c->sq);
    void *base[3], *in[3], *dout = NULL;
    float *dlse = NULL;
    fajit_attn_args a;
    const char *want = wants_reference(c) ? "ref " : "fwd ";
    int ok = upload_inputs(p, base, in, v->why, sizeof v->why) &&
             cuda_ok(cudaMalloc(&dout, p->o_elems * 2), "cudaMalloc", v->why, sizeof v->why) &&
             cuda_ok(cudaMalloc((void **)&dlse, lse_elems * 4), "cudaMalloc", v->why, sizeof v->why) &&
             cuda_ok(cudaMemset(dout, 0xff, p->o_elems * 2), "poison", v->why, sizeof v->why) &&
             cuda_ok(cudaMemset(dlse, 0xff, lse_elems * 4), "poison", v->why, sizeof v->why);
    if (ok) {
        fill_args(p, in[0], in[1], in[2], dout, dlse, &a);
        int rc = fajit_attn_variant(ctx, &a, variant, vcap);
        if (rc < 0 || strncmp(variant, want, 4) != 0) {
            snprintf(v->why, sizeof v->why, "AUTO does not pick op %.3s: %s", want,
                     rc < 0 ? fajit_last_error() : variant);
            ok = 0;
        } else if ((rc = fajit_attn_fwd(ctx, &a, NULL)) != FAJIT_OK) {
            snprintf(v->why, sizeof v->why, "fajit_attn_fwd: %s: %s", fajit_strerror(rc), fajit_last_error());
            ok = 0;
        } else {
            ok = cuda_ok(cudaDeviceSynchronize(), "kernel", v->why, sizeof v->why) &&
                 cuda_ok(cudaMemcpy(o, dout, p->o_elems * 2, cudaMemcpyDeviceToHost), "download", v->why, sizeof v->why) &&
                 cuda_ok(cudaMemcpy(lse, dlse, lse_elems * 4, cudaMemcpyDeviceToHost), "download", v->why, sizeof v->why);
        }
    }
    for (int t = 0; t < 3; ++t)
        cudaFree(base[t]);
    cudaFree(dout);
    cudaFree(dlse);
    return ok;
}

static int run_case(fajit_ctx *ctx, const fcase *c, uint64_t seed, double *worst) {
    problem p;
    verdict v;
    char variant[320] = "";
    const size_t lse_elems = (size_t)(c->batch * c->hq * c->sq);
    memset(&v, 0, sizeof v);
    if (problem_init(&p, c, seed) != 0) {
        printf("FAIL out of host memory\n");
        problem_free(&p);
        return 1;
    }
    uint16_t *o = malloc(p.o_elems * 2);
    float *lse = malloc(lse_elems * 4);
    if (o && lse && launch_case(ctx, &p, o, lse, &v, variant, sizeof variant)) {
        char why[200];
        memcpy(why, v.why, sizeof why);
        check_output(&p, o, c->want_lse ? lse : NULL, &v);
        if (why[0] && !v.why[0])
            memcpy(v.why, why, sizeof why);
    } else if (!v.why[0]) {
        snprintf(v.why, sizeof v.why, "out of host memory");
    }
    const int failed = v.why[0] != 0;
    const char *tiles = strstr(variant, "bm=");
    static const char *const layouts[] = {"dense  ", "strided", "qkvpack"};
    char layout[32];
    if (c->scale_mul != 0.0f)
        snprintf(layout, sizeof layout, "%s scale*%g", layouts[c->strided], (double)c->scale_mul);
    else
        snprintf(layout, sizeof layout, c->misalign ? "%s+%d" : "%s", layouts[c->strided], c->misalign);
    printf("%s %s %-9s dqk=%-3d dv=%-3d b=%lld sq=%-4lld sk=%-4lld hq=%lld hkv=%lld %s lse=%d  "
           "err %.2e <= %.2e (naive %.2e)  lse %.1e  [%.3s %.40s]%s%s\n",
           failed ? "FAIL" : "ok  ", attn_dtype_name(c->dtype), attn_mask_name(c->mask), c->dqk, c->dv,
           (long long)c->batch, (long long)c->sq, (long long)c->sk, (long long)c->hq, (long long)c->hkv,
           layout, c->want_lse, v.err, v.tol, v.naive_err, v.lse_err, variant,
           tiles ? tiles : "", failed ? "\n     " : "", v.why);
    if (v.tol > 0 && v.err / v.tol > *worst)
        *worst = v.err / v.tol;
    free(o);
    free(lse);
    problem_free(&p);
    return failed;
}

/* ---------------------------------------------------------------- the grid */

static const int dims[][2] = {{8, 8},     {24, 24},   {32, 32},   {40, 40},   {64, 64},
                              {72, 72},   {80, 80},   {96, 96},   {128, 128}, {160, 160},
                              {192, 192}, {200, 200}, {224, 224}, {256, 256}, {192, 128},
                              {128, 64},  {59, 59},   {100, 100}, {111, 111}, {100, 72}};
#define NDIMS (sizeof dims / sizeof dims[0])

static fcase mk(int dqk, int dv, int dtype, int mask, int64_t sq, int64_t sk, int64_t hq, int64_t hkv,
                int strided, int want_lse) {
    fcase c = {dqk, dv, dtype, mask, 2, sq, sk, hq, hkv, strided, want_lse, 0, 0.0f};
    return c;
}

static size_t build_grid(fcase *cs, size_t cap, int quick) {
    static const int64_t lens[][4] = {/* sq, sk, hq, hkv */
                                      {113, 17, 4, 1}, {17, 113, 4, 2}, {1, 256, 4, 1}, {256, 256, 2, 2}};
    size_t n = 0;
    for (size_t d = 0; d < NDIMS; ++d)
        for (int dtype = 0; dtype < 2; ++dtype)
            for (int mask = 0; mask < 3; ++mask)
                for (size_t l = 0; l < 4 && n < cap; ++l) {
                    if (quick && (l != (size_t)mask || d % 4 != 0))
                        continue;
                    if (l == 3 && mask != (int)(d % 3))
                        continue; /* the 256 x 256 pair: one mask per head dim */
                    const int want_lse = n % 4 != 3;
                    cs[n++] = mk(dims[d][0], dims[d][1], dtype, mask, lens[l][0], lens[l][1], lens[l][2],
                                 lens[l][3], (int)((d + l + (size_t)mask) % 2), want_lse);
                }
    /* q, k, v sliced from one packed qkv buffer: offsets and strides of odd
     * head dims; and pointers misaligned for the loads (reference, or the
     * fast kernel where the width allows it). */
    static const int packed_dims[] = {24, 40, 59, 64, 100, 111, 128, 200};
    for (size_t d = 0; d < sizeof packed_dims / sizeof packed_dims[0] && n < cap; ++d)
        if (!quick || d % 3 == 0)
            cs[n++] = mk(packed_dims[d], packed_dims[d], (int)d % 2, (int)d % 3, d % 2 ? 113 : 256,
                         d % 2 ? 113 : 256, 4, 4, QKV_PACKED, 1);
    static const int misaligned[][3] = {{100, 100, 2}, {64, 64, 4}, {59, 59, 1}, {100, 72, 4}, {200, 200, 2}};
    for (size_t d = 0; d < sizeof misaligned / sizeof misaligned[0] && n < cap; ++d) {
        cs[n] = mk(misaligned[d][0], misaligned[d][1], (int)d % 2, 1, 77, 130, 4, 2, DENSE, 1);
        cs[n++].misalign = misaligned[d][2];
    }
    if (quick)
        return n;
    /* Long sequences, many key tiles and pipeline stages. */
    static const int long_dims[][2] = {{64, 64}, {72, 72}, {128, 128}, {192, 128}, {256, 256}};
    static const int64_t long_lens[][2] = {{1023, 2049}, {2049, 1023}, {2049, 2049}};
    for (size_t d = 0; d < 5; ++d)
        for (int l = 0; l < 3 && n < cap; ++l)
            cs[n++] = mk(long_dims[d][0], long_dims[d][1], (int)((d + (size_t)l) % 2), l,
                         long_lens[l][0], long_lens[l][1], 2, 1, l == 1, 1);
    /* Scores far from the default scale's: a large one moves the running
     * max by more than the kernel's rescale slack many times along the keys
     * (both branches of its lazy rescaling), a negative one flips the order
     * of the scores (the kernel negates them before its folded scale). */
    static const float scale_muls[] = {12.0f, -1.0f, -6.0f};
    static const int scale_dims[] = {64, 128, 256};
    for (size_t d = 0; d < 3; ++d)
        for (size_t m = 0; m < 3 && n < cap; ++m) {
            cs[n] = mk(scale_dims[d], scale_dims[d], (int)((d + m) % 2), (int)m, 1023, 2049, 2, 1, DENSE, 1);
            cs[n++].scale_mul = scale_muls[m];
        }
    return n;
}

/* --persist N: d 256 unmasked runs persistent blocks (codegen's
 * fajit__fwd_persistent), here launched with FAJIT_FWD_PERSIST=N, so N
 * blocks loop over every shape's items: one key tile an item and odd counts
 * (the stages' parity flips from item to item), query blocks cut short, GQA,
 * strided layouts, LSE on and off. The other dims and the causal cases
 * check that variants without the loop are unaffected by the setting. */
static size_t build_persist_grid(fcase *cs, size_t cap, int quick) {
    static const int pdims[][2] = {{256, 256}, {224, 224}, {192, 192}, {144, 144}};
    static const int64_t plens[][4] = {/* sq, sk, hq, hkv */
                                       {113, 17, 4, 1},   {17, 113, 4, 2},  {1, 256, 4, 1},
                                       {256, 256, 2, 2},  {300, 2049, 4, 2}, {1023, 129, 2, 1},
                                       {129, 1023, 3, 3}};
    size_t n = 0;
    for (size_t d = 0; d < sizeof pdims / sizeof pdims[0]; ++d)
        for (int dtype = 0; dtype < 2; ++dtype)
            for (size_t l = 0; l < sizeof plens / sizeof plens[0] && n < cap; ++l) {
                if (quick && (l > 3 || d % 2 == 1 || dtype == 1))
                    continue; /* the sanitizers' run: short shapes of d 256 and 192 */
                cs[n++] = mk(pdims[d][0], pdims[d][1], dtype, 0, plens[l][0], plens[l][1], plens[l][2],
                             plens[l][3], (int)((d + l + (size_t)dtype) % 2), (int)(l % 3 != 2));
            }
    if (quick)
        return n;
    for (size_t d = 0; d < sizeof pdims / sizeof pdims[0] && n < cap; ++d)
        cs[n++] = mk(pdims[d][0], pdims[d][1], (int)d % 2, 1, 300, 1023, 4, 2, DENSE, 1);
    cs[n] = mk(256, 256, 1, 0, 1023, 2049, 2, 1, DENSE, 1); /* scores far from the default scale */
    cs[n++].scale_mul = 12.0f;
    return n;
}

/* ---------------------------------------------------------------- main */

/* Every case's variant, compiled up front on all cores (shapes alone decide
 * the variant, and whether the pointers are misaligned for the loads). */
static size_t precompile_grid(fajit_ctx *ctx, const fcase *cs, size_t n) {
    char (*text)[320] = calloc(n ? n : 1, sizeof *text);
    const char **specs = calloc(n ? n : 1, sizeof *specs);
    size_t failed = 0;
    for (size_t i = 0; i < n; ++i) {
        fajit_attn_args a;
        fajit_attn_args_init(&a);
        a.batch = cs[i].batch, a.seqlen_q = cs[i].sq, a.seqlen_k = cs[i].sk;
        a.nheads_q = cs[i].hq, a.nheads_kv = cs[i].hkv, a.dqk = cs[i].dqk, a.dv = cs[i].dv;
        a.dtype = cs[i].dtype, a.mask = cs[i].mask;
        a.kernel = wants_reference(&cs[i]) ? FAJIT_KERNEL_REFERENCE : FAJIT_KERNEL_AUTO;
        if (fajit_attn_variant(ctx, &a, text[i], sizeof text[i]) < 0) {
            printf("FAIL variant of case %zu: %s\n", i, fajit_last_error());
            failed++;
        }
        specs[i] = text[i];
    }
    failed += precompile_variants(ctx, specs, n, (int)sysconf(_SC_NPROCESSORS_ONLN));
    free(specs);
    free(text);
    return failed;
}

static int require_gpu(void) {
    int count = 0;
    const cudaError_t e = cudaGetDeviceCount(&count);
    if (e != cudaSuccess || count == 0) {
        printf("SKIP: no CUDA GPU (%s)\n", e != cudaSuccess ? cudaGetErrorString(e) : "none found");
        return 77;
    }
    struct cudaDeviceProp prop;
    if (cudaGetDeviceProperties(&prop, 0) == cudaSuccess) {
        printf("GPU 0: %s, sm_%d%d\n", prop.name, prop.major, prop.minor);
        if (prop.major < 8) {
            printf("SKIP: fajit needs sm_80 or newer\n");
            return 77;
        }
    }
    return 0;
}

int main(int argc, char **argv) {
    const char *persist = argc > 2 && strcmp(argv[1], "--persist") == 0 ? argv[2] : NULL;
    const int quick = argc > (persist ? 3 : 1) && strcmp(argv[persist ? 3 : 1], "--quick") == 0;
    const int skip = require_gpu();
    if (skip)
        return skip;
    if (persist)
        setenv("FAJIT_FWD_PERSIST", persist, 1); /* read by fajit_create */
    fajit_ctx *ctx = NULL;
    const int rc = fajit_create(&ctx, NULL);
    if (rc != FAJIT_OK) {
        printf("FAIL fajit_create: %s: %s\n", fajit_strerror(rc), fajit_last_error());
        return 1;
    }
    static fcase cases[1024];
    const size_t n = persist ? build_persist_grid(cases, 1024, quick) : build_grid(cases, 1024, quick);
    size_t failures = precompile_grid(ctx, cases, n);
    double worst = 0.0;
    for (size_t i = 0; i < n; ++i)
        failures += (size_t)run_case(ctx, &cases[i], 0x9e3779b97f4a7c15ull ^ (i * 0x1000193u + 1), &worst);
    fajit_destroy(ctx);
    char mode[64] = "";
    if (persist)
        snprintf(mode, sizeof mode, " (persistent, FAJIT_FWD_PERSIST=%s)", persist);
    printf("test_fwd_gpu%s%s: %zu cases, %zu failed; worst output error %.2f of its tolerance\n",
           quick ? " (quick)" : "", mode, n, failures, worst);
    return failures ? 1 : 0;
}
