/*
 * tests/gpu/test_large_gpu.c - 64-bit index math: the forward on tensors whose
 * element offsets pass 2^31, through the reference kernel and AUTO (the fast
 * kernel), against the fp64 CPU reference of attn_check.
 *
 * q, k, v and o share one big allocation, NaN-poisoned (0xFFFF), with the
 * same strides and their bases a slot apart; only the rows a case uses are
 * written. Cases:
 *   - batch strides of 2^31 + 4096 elements: batch 1 starts past element 2^31;
 *   - a seq stride of 2^21 + 64 elements over 1100 rows: the last rows lie
 *     past element 2^31 (seq stride x seqlen > 2^31).
 * The reference kernel must pass attn_check (the output's rounding only); the
 * fast kernel must give bit for bit what it gives on a compact copy of the
 * same problem (same variant, so the same arithmetic: only the addressing
 * differs), and be near the fp64 reference. The 64 elements after each
 * batch's last output row must keep their poison.
 *
 * Needs about 5 GiB of free GPU memory. Exit 0 pass, 1 fail, 77 no GPU or
 * too little free memory.
 */
#include <cuda_runtime_api.h>
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "attn_check.h"
#include "fajit.h"
#include "precompile.h"

#define TAIL 64 /* poisoned elements checked after each batch's last output row */

typedef struct big_case {
    const char *what;
    attn_shape s;        /* nheads_q == nheads_kv, dqk == dv */
    int64_t batch_stride; /* elements, for q, k, v and o alike */
    int64_t row_stride;
    int64_t slot;         /* elements between the bases of q, k, v and o */
} big_case;

static size_t case_elems(const big_case *c) {
    return (size_t)((c->s.batch - 1) * c->batch_stride + (c->s.seqlen_q - 1) * c->row_stride +
                    3 * c->slot + c->s.nheads_q * c->s.dv + TAIL);
}

static int cuda_failed(cudaError_t e, const char *what, char *why, size_t cap) {
    if (e == cudaSuccess)
        return 0;
    snprintf(why, cap, "%s: %s", what, cudaGetErrorName(e));
    return 1;
}

static void big_args(const big_case *c, uint16_t *big, float *lse, int kernel, fajit_attn_args *a) {
    fajit_attn_args_init(a);
    a->q = big;
    a->k = big ? big + c->slot : NULL;
    a->v = big ? big + 2 * c->slot : NULL;
    a->o = big ? big + 3 * c->slot : NULL;
    a->lse = lse;
    a->batch = c->s.batch, a->seqlen_q = c->s.seqlen_q, a->seqlen_k = c->s.seqlen_k;
    a->nheads_q = c->s.nheads_q, a->nheads_kv = c->s.nheads_kv, a->dqk = c->s.dqk, a->dv = c->s.dv;
    a->dtype = c->s.dtype, a->mask = c->s.mask, a->kernel = kernel;
    const int64_t st[3] = {c->batch_stride, c->row_stride, c->s.dqk};
    memcpy(a->q_stride, st, sizeof st);
    memcpy(a->k_stride, st, sizeof st);
    memcpy(a->v_stride, st, sizeof st);
    memcpy(a->o_stride, st, sizeof st);
}

/* One batch of a dense host tensor to or from its rows in the big buffer. */
static cudaError_t copy_rows(const big_case *c, uint16_t *dev_base, int64_t b, uint16_t *host,
                             enum cudaMemcpyKind kind) {
    const size_t row = (size_t)(c->s.nheads_q * c->s.dqk) * 2;
    uint16_t *dev = dev_base + b * c->batch_stride;
    uint16_t *h = host + (size_t)(b * c->s.seqlen_q) * (row / 2);
    const size_t pitch = (size_t)c->row_stride * 2;
    if (kind == cudaMemcpyHostToDevice)
        return cudaMemcpy2D(dev, pitch, h, row, row, (size_t)c->s.seqlen_q, kind);
    return cudaMemcpy2D(h, row, dev, pitch, row, (size_t)c->s.seqlen_q, kind);
}

static int upload_inputs(const big_case *c, const attn_problem *p, uint16_t *big, char *why, size_t cap) {
    const size_t offs[3] = {p->q_off, p->k_off, p->v_off};
    for (int t = 0; t < 3; ++t)
        for (int64_t b = 0; b < c->s.batch; ++b)
            if (cuda_failed(copy_rows(c, big + t * c->slot, b, p->in + offs[t], cudaMemcpyHostToDevice),
                            "upload", why, cap))
                return 0;
    return 1;
}

/* Poisons o's rows and the LSE, launches, downloads o (dense) and the LSE, and
 * counts the tails after each batch's last row that lost their poison. */
static int run_big(fajit_ctx *ctx, const big_case *c, uint16_t *big, float *dlse, int kernel,
                   uint16_t *o, float *lse, int64_t *stray, char *why, size_t cap) {
    const size_t lse_elems = (size_t)(c->s.batch * c->s.nheads_q * c->s.seqlen_q);
    const size_t row = (size_t)(c->s.nheads_q * c->s.dv);
    uint16_t *dev_o = big + 3 * c->slot;
    fajit_attn_args a;
    char variant[320];
    for (int64_t b = 0; b < c->s.batch; ++b)
        if (cuda_failed(cudaMemset2D(dev_o + b * c->batch_stride, (size_t)c->row_stride * 2, 0xff,
                                     row * 2, (size_t)c->s.seqlen_q),
                        "poison o", why, cap))
            return 0;
    if (cuda_failed(cudaMemset(dlse, 0xff, lse_elems * 4), "poison lse", why, cap))
        return 0;
    big_args(c, big, dlse, kernel, &a);
    int rc = fajit_attn_variant(ctx, &a, variant, sizeof variant);
    const char *want = kernel == FAJIT_KERNEL_AUTO ? "fwd " : "ref ";
    if (rc < 0 || strncmp(variant, want, 4) != 0) {
        snprintf(why, cap, "expected op %.3s: %.200s", want, rc < 0 ? fajit_last_error() : variant);
        return 0;
    }
    if ((rc = fajit_attn_fwd(ctx, &a, NULL)) != FAJIT_OK) {
        snprintf(why, cap, "fajit_attn_fwd: %s: %s", fajit_strerror(rc), fajit_last_error());
        return 0;
    }
    if (cuda_failed(cudaDeviceSynchronize(), "kernel", why, cap) ||
        cuda_failed(cudaMemcpy(lse, dlse, lse_elems * 4, cudaMemcpyDeviceToHost), "download", why, cap))
        return 0;
    *stray = 0;
    for (int64_t b = 0; b < c->s.batch; ++b) {
        uint16_t tail[TAIL];
        const uint16_t *after = dev_o + b * c->batch_stride + (c->s.seqlen_q - 1) * c->row_stride + row;
        if (cuda_failed(copy_rows(c, dev_o, b, o, cudaMemcpyDeviceToHost), "download", why, cap) ||
            cuda_failed(cudaMemcpy(tail, after, sizeof tail, cudaMemcpyDeviceToHost), "download", why, cap))
            return 0;
        for (int i = 0; i < TAIL; ++i)
            *stray += tail[i] != 0xffff;
    }
    return 1;
}

/* AUTO on a compact, contiguous copy of the same problem. */
static int run_compact(fajit_ctx *ctx, const attn_problem *p, uint16_t *o, float *lse, char *why,
                       size_t cap) {
    const attn_shape *s = &p->s;
    const size_t lse_elems = (size_t)(s->batch * s->nheads_q * s->seqlen_q);
    uint16_t *in = NULL, *dout = NULL;
    float *dlse = NULL;
    fajit_attn_args a;
    int ok = 0;
    if (!cuda_failed(cudaMalloc((void **)&in, p->in_elems * 2), "cudaMalloc", why, cap) &&
        !cuda_failed(cudaMalloc((void **)&dout, p->o_elems * 2), "cudaMalloc", why, cap) &&
        !cuda_failed(cudaMalloc((void **)&dlse, lse_elems * 4), "cudaMalloc", why, cap) &&
        !cuda_failed(cudaMemcpy(in, p->in, p->in_elems * 2, cudaMemcpyHostToDevice), "upload", why, cap)) {
        fajit_attn_args_init(&a);
        a.q = in + p->q_off, a.k = in + p->k_off, a.v = in + p->v_off, a.o = dout, a.lse = dlse;
        a.batch = s->batch, a.seqlen_q = s->seqlen_q, a.seqlen_k = s->seqlen_k;
        a.nheads_q = s->nheads_q, a.nheads_kv = s->nheads_kv, a.dqk = s->dqk, a.dv = s->dv;
        a.dtype = s->dtype, a.mask = s->mask;
        const int rc = fajit_attn_fwd(ctx, &a, NULL);
        if (rc != FAJIT_OK)
            snprintf(why, cap, "compact fajit_attn_fwd: %s: %s", fajit_strerror(rc), fajit_last_error());
        else
            ok = !cuda_failed(cudaDeviceSynchronize(), "kernel", why, cap) &&
                 !cuda_failed(cudaMemcpy(o, dout, p->o_elems * 2, cudaMemcpyDeviceToHost), "download", why, cap) &&
                 !cuda_failed(cudaMemcpy(lse, dlse, lse_elems * 4, cudaMemcpyDeviceToHost), "download", why, cap);
    }
    cudaFree(in);
    cudaFree(dout);
    cudaFree(dlse);
    return ok;
}

/* The fast kernel's bound against fp64: loose (P is rounded to the dtype
 * before P V), yet far below what misaddressed rows or NaN poison give. */
static void judge_fast(const attn_problem *p, const attn_result *r, char *why, size_t cap) {
    const double tol = (p->s.dtype == FAJIT_DTYPE_BF16 ? 1.0 / 32 : 1.0 / 256) * p->max_abs_ref_o + 1e-3;
    if (r->nan_values)
        snprintf(why, cap, "%lld NaN values (unwritten?)", (long long)r->nan_values);
    else if (r->bad_masked_rows)
        snprintf(why, cap, "%lld fully masked rows not 0 / -inf", (long long)r->bad_masked_rows);
    else if (r->max_err > tol)
        snprintf(why, cap, "output error %.3e > %.3e", r->max_err, tol);
    else if (r->max_lse_rel_err > 1e-3)
        snprintf(why, cap, "lse error %.3e > 1e-3", r->max_lse_rel_err);
}

static int run_case(fajit_ctx *ctx, const big_case *c, uint64_t seed) {
    const size_t lse_elems = (size_t)(c->s.batch * c->s.nheads_q * c->s.seqlen_q);
    const size_t elems = case_elems(c);
    attn_problem p;
    attn_result r;
    uint16_t *big = NULL;
    float *dlse = NULL;
    int failures = 0;
    char why[256] = "";

    if (attn_problem_init(&p, &c->s, ATTN_CONTIGUOUS, seed) != 0) {
        printf("FAIL %s: cannot build the problem\n", c->what);
        return 1;
    }
    uint16_t *o = malloc(p.o_elems * 2), *o_compact = malloc(p.o_elems * 2);
    float *lse = malloc(lse_elems * 4), *lse_compact = malloc(lse_elems * 4);
    if (!o || !o_compact || !lse || !lse_compact) {
        snprintf(why, sizeof why, "out of host memory");
    } else if (!cuda_failed(cudaMalloc((void **)&big, elems * 2), "cudaMalloc(big)", why, sizeof why) &&
               !cuda_failed(cudaMalloc((void **)&dlse, lse_elems * 4), "cudaMalloc(lse)", why, sizeof why) &&
               !cuda_failed(cudaMemset(big, 0xff, elems * 2), "poison", why, sizeof why) &&
               upload_inputs(c, &p, big, why, sizeof why)) {
        printf("     %s: %.2f GiB buffer, largest element offset %lld\n", c->what,
               (double)elems * 2 / (1u << 30), (long long)(elems - TAIL - 1));
        static const int kernels[2] = {FAJIT_KERNEL_REFERENCE, FAJIT_KERNEL_AUTO};
        for (int k = 0; k < 2; ++k) {
            int64_t stray = 0;
            char kwhy[256] = "";
            memset(&r, 0, sizeof r);
            if (run_big(ctx, c, big, dlse, kernels[k], o, lse, &stray, kwhy, sizeof kwhy)) {
                attn_check(&p, o, lse, &r);
                if (stray)
                    snprintf(kwhy, sizeof kwhy, "%lld writes past o's last rows", (long long)stray);
                else if (kernels[k] == FAJIT_KERNEL_REFERENCE && !r.ok)
                    snprintf(kwhy, sizeof kwhy, "%s", r.why);
                else if (kernels[k] == FAJIT_KERNEL_AUTO) {
                    judge_fast(&p, &r, kwhy, sizeof kwhy);
                    if (!kwhy[0] && run_compact(ctx, &p, o_compact, lse_compact, kwhy, sizeof kwhy) &&
                        (memcmp(o, o_compact, p.o_elems * 2) != 0 || memcmp(lse, lse_compact, lse_elems * 4) != 0))
                        snprintf(kwhy, sizeof kwhy, "differs from the same kernel on a compact copy");
                }
            }
            printf("%s %s, %s kernel: err %.2e  lse %.1e%s%s\n", kwhy[0] ? "FAIL" : "ok  ", c->what,
                   k == 0 ? "reference" : "AUTO (fast)", r.max_err, r.max_lse_rel_err,
                   kwhy[0] ? "\n     " : "", kwhy);
            failures += kwhy[0] != 0;
        }
    }
    if (why[0]) {
        printf("FAIL %s: %s\n", c->what, why);
        failures++;
    }
    cudaFree(big);
    cudaFree(dlse);
    free(o);
    free(o_compact);
    free(lse);
    free(lse_compact);
    attn_problem_free(&p);
    return failures;
}

static big_case make_case(const char *what, int dtype, int mask, int64_t batch, int64_t seqlen,
                          int64_t batch_stride, int64_t row_stride, int64_t slot) {
    big_case c;
    memset(&c, 0, sizeof c);
    c.what = what;
    c.s.batch = batch, c.s.seqlen_q = c.s.seqlen_k = seqlen, c.s.nheads_q = c.s.nheads_kv = 2;
    c.s.dqk = c.s.dv = 128, c.s.dtype = dtype, c.s.mask = mask;
    c.batch_stride = batch_stride, c.row_stride = row_stride, c.slot = slot;
    return c;
}

/* 0 if a usable GPU with `need` bytes free is present, else 77 after the reason. */
static int require_gpu(size_t need) {
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
    size_t free_bytes = 0, total = 0;
    if (cudaMemGetInfo(&free_bytes, &total) != cudaSuccess || free_bytes < need) {
        printf("SKIP: %.1f GiB free on the GPU, this test needs %.1f GiB\n",
               (double)free_bytes / (1u << 30), (double)need / (1u << 30));
        return 77;
    }
    return 0;
}

int main(void) {
    const int64_t two31 = (int64_t)1 << 31;
    const big_case cases[] = {
        /* batch 1 starts past element 2^31 of every tensor */
        make_case("fp16 batch stride 2^31+4096", FAJIT_DTYPE_FP16, FAJIT_MASK_NONE, 2, 128,
                  two31 + 4096, 2 * 128, 128 * 2 * 128 + 64),
        /* rows past element 2^31: 1100 rows 2^21 + 64 apart; q, k, v, o side by side in a row */
        make_case("bf16 causal seq stride 2^21+64 x 1100 rows", FAJIT_DTYPE_BF16, FAJIT_MASK_CAUSAL, 1,
                  1100, 1100 * (((int64_t)1 << 21) + 64), ((int64_t)1 << 21) + 64, 2 * 128 + 64),
    };
    const size_t n = sizeof cases / sizeof cases[0];
    _Static_assert(sizeof cases / sizeof cases[0] * 2 <= 4, "text[] and specs[] hold 2 variants a case");
    size_t need = 0;
    for (size_t i = 0; i < n; ++i)
        if (case_elems(&cases[i]) * 2 > need)
            need = case_elems(&cases[i]) * 2;
    const int skip = require_gpu(need + ((size_t)1 << 30));
    if (skip)
        return skip;
    for (size_t i = 0; i < n; ++i)
        if ((int64_t)case_elems(&cases[i]) <= two31) {
            printf("FAIL %s does not pass element 2^31\n", cases[i].what);
            return 1;
        }

    fajit_ctx *ctx = NULL;
    int rc = fajit_create(&ctx, NULL);
    if (rc != FAJIT_OK) {
        printf("FAIL fajit_create: %s: %s\n", fajit_strerror(rc), fajit_last_error());
        return 1;
    }
    /* Every variant compiled up front on all cores (shapes and kernel decide it). */
    char text[4][320];
    const char *specs[4];
    size_t failures = 0;
    for (size_t i = 0; i < n; ++i)
        for (int k = 0; k < 2; ++k) {
            fajit_attn_args a;
            big_args(&cases[i], NULL, NULL, k == 0 ? FAJIT_KERNEL_REFERENCE : FAJIT_KERNEL_AUTO, &a);
            if (fajit_attn_variant(ctx, &a, text[i * 2 + (size_t)k], sizeof text[0]) < 0) {
                printf("FAIL variant of %s: %s\n", cases[i].what, fajit_last_error());
                failures++;
            }
            specs[i * 2 + (size_t)k] = text[i * 2 + (size_t)k];
        }
    failures += precompile_variants(ctx, specs, 2 * n, (int)sysconf(_SC_NPROCESSORS_ONLN));
    for (size_t i = 0; i < n; ++i)
        failures += (size_t)run_case(ctx, &cases[i], 0x5eed0000u + i);
    fajit_destroy(ctx);
    printf("test_large_gpu: %zu cases, %zu failure(s)\n", n, failures);
    return failures ? 1 : 0;
}
