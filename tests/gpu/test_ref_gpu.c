/*
 * tests/gpu/test_ref_gpu.c - the reference kernel against an fp64 CPU reference,
 * through the public API only (include/fajit.h), with the CUDA runtime for
 * memory.
 *
 * Inputs are random (~N(0,1), fixed seeds) fp16/bf16 values; output and LSE are
 * poisoned with 0xFF bytes (NaN in fp16, bf16 and fp32) before each launch, so
 * an unwritten element fails. The grid covers head dims 1..512 (q/k and v
 * apart), both dtypes, every mask with seqlen_q < seqlen_k and seqlen_q >
 * seqlen_k (so bottom-right causal has fully masked rows), GQA/MQA, padded
 * strides and q/k/v packed in one buffer, batch 2, with and without LSE.
 * The pass rule is attn_check's (tests/gpu/attn_check.h).
 *
 * Usage: test_ref_gpu [--quick]   (or FAJIT_TEST_QUICK=1): a few cases only,
 * for slow tools such as compute-sanitizer. Exit 0 pass, 1 fail, 77 no GPU.
 */
#include <cuda_runtime_api.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "attn_check.h"
#include "fajit.h"

typedef struct test_case {
    attn_shape s;
    int layout;
    int want_lse;
} test_case;

/* ---------------------------------------------------------------- the grid */

static const int head_dims[][2] = {{1, 1},     {8, 8},     {59, 59},   {64, 64},   {72, 72},
                                   {100, 100}, {128, 128}, {192, 128}, {256, 256}, {512, 512}};
static const int64_t seqlens[][2] = {{17, 113}, {113, 17}, {1, 256}, {64, 64}};

static test_case make_case(int dqk, int dv, int dtype, int mask, int64_t sq, int64_t sk,
                           int64_t hkv, int layout, float scale, int want_lse) {
    test_case c = {.s = {.batch = 2, .seqlen_q = sq, .seqlen_k = sk, .nheads_q = 4, .nheads_kv = hkv,
                         .dqk = dqk, .dv = dv, .dtype = dtype, .mask = mask, .softmax_scale = scale},
                   .layout = layout,
                   .want_lse = want_lse};
    return c;
}

/* Every head dim x dtype x mask x seqlen pair; the pairs differ in layout, GQA
 * ratio and scale so each of those meets every head dim and mask. */
static size_t full_grid(test_case *cases, size_t cap) {
    size_t n = 0;
    for (size_t d = 0; d < sizeof head_dims / sizeof head_dims[0]; ++d)
        for (int dtype = 0; dtype < 2; ++dtype)
            for (int mask = 0; mask < 3; ++mask)
                for (size_t l = 0; l < sizeof seqlens / sizeof seqlens[0] && n < cap; ++l) {
                    const int dqk = head_dims[d][0], dv = head_dims[d][1];
                    static const int64_t hkv[] = {4, 2, 1, 2};
                    int layout = l == 1 ? ATTN_PADDED : ATTN_CONTIGUOUS;
                    if (l == 3)
                        layout = dqk == dv ? ATTN_PACKED_QKV : ATTN_PADDED;
                    const float scale = l == 2 ? 0.3f : 0.0f; /* 0: default 1/sqrt(dqk) */
                    const int want_lse = n % 5 != 4;         /* LSE NULL in a fifth of them */
                    cases[n] = make_case(dqk, dv, dtype, mask, seqlens[l][0], seqlens[l][1], hkv[l],
                                         layout, scale, want_lse);
                    ++n;
                }
    /* Many key steps; no keys at all (every row fully masked). */
    if (n + 3 <= cap) {
        cases[n++] = make_case(128, 128, 1, 1, 300, 1000, 2, ATTN_PADDED, 0.0f, 1);
        cases[n++] = make_case(64, 64, 0, 0, 5, 0, 1, ATTN_CONTIGUOUS, 0.0f, 1);
        cases[n++] = make_case(72, 72, 1, 1, 5, 0, 2, ATTN_PADDED, 0.0f, 1);
    }
    return n;
}

/* A handful of cases for compute-sanitizer: every layout, masked rows, GQA. */
static size_t quick_grid(test_case *cases, size_t cap) {
    const test_case quick[] = {
        make_case(72, 72, 1, 1, 113, 17, 2, ATTN_PADDED, 0.0f, 1),
        make_case(64, 64, 0, 2, 17, 113, 1, ATTN_CONTIGUOUS, 0.0f, 1),
        make_case(192, 128, 0, 1, 64, 64, 4, ATTN_PADDED, 0.0f, 1),
        make_case(100, 100, 1, 0, 64, 64, 2, ATTN_PACKED_QKV, 0.0f, 0),
        make_case(512, 512, 1, 1, 1, 256, 1, ATTN_CONTIGUOUS, 0.3f, 1),
    };
    size_t n = 0;
    for (; n < sizeof quick / sizeof quick[0] && n < cap; ++n)
        cases[n] = quick[n];
    return n;
}

/* ---------------------------------------------------------------- one case */

typedef struct device_buffers {
    void *in, *o;
    float *lse;
} device_buffers;

static void free_buffers(device_buffers *d) {
    cudaFree(d->in);
    cudaFree(d->o);
    cudaFree(d->lse);
}

static int cuda_failed(cudaError_t e, const char *what, char *why, size_t cap) {
    if (e == cudaSuccess)
        return 0;
    snprintf(why, cap, "%s: %s", what, cudaGetErrorName(e));
    return 1;
}

/* Uploads the inputs and poisons the outputs. */
static int prepare_device(const attn_problem *p, size_t lse_elems, device_buffers *d, char *why,
                          size_t cap) {
    memset(d, 0, sizeof *d);
    return cuda_failed(cudaMalloc(&d->in, p->in_elems * 2 + 2), "cudaMalloc", why, cap) ||
           cuda_failed(cudaMalloc(&d->o, p->o_elems * 2), "cudaMalloc", why, cap) ||
           cuda_failed(cudaMalloc((void **)&d->lse, lse_elems * 4), "cudaMalloc", why, cap) ||
           cuda_failed(cudaMemcpy(d->in, p->in, p->in_elems * 2, cudaMemcpyHostToDevice),
                       "cudaMemcpy", why, cap) ||
           cuda_failed(cudaMemset(d->o, 0xff, p->o_elems * 2), "cudaMemset", why, cap) ||
           cuda_failed(cudaMemset(d->lse, 0xff, lse_elems * 4), "cudaMemset", why, cap);
}

static void fill_args(const test_case *c, const attn_problem *p, const device_buffers *d,
                      fajit_attn_args *a) {
    const uint16_t *in = d->in;
    fajit_attn_args_init(a);
    a->q = in + p->q_off;
    a->k = in + p->k_off;
    a->v = in + p->v_off;
    a->o = d->o;
    a->lse = c->want_lse ? d->lse : NULL;
    a->batch = c->s.batch;
    a->seqlen_q = c->s.seqlen_q;
    a->seqlen_k = c->s.seqlen_k;
    a->nheads_q = c->s.nheads_q;
    a->nheads_kv = c->s.nheads_kv;
    a->dqk = c->s.dqk;
    a->dv = c->s.dv;
    a->dtype = c->s.dtype;
    a->mask = c->s.mask;
    a->softmax_scale = c->s.softmax_scale;
    a->kernel = FAJIT_KERNEL_REFERENCE;
    if (c->layout != ATTN_CONTIGUOUS) { /* contiguous: all-zero strides, the default */
        memcpy(a->q_stride, p->q_stride, sizeof a->q_stride);
        memcpy(a->k_stride, p->k_stride, sizeof a->k_stride);
        memcpy(a->v_stride, p->v_stride, sizeof a->v_stride);
        memcpy(a->o_stride, p->o_stride, sizeof a->o_stride);
    }
}

/* Launches through fajit, waits, downloads and checks. 0 pass, 1 fail. */
static int launch_and_check(fajit_ctx *ctx, const test_case *c, const attn_problem *p,
                            attn_result *r) {
    const size_t lse_elems = (size_t)(c->s.batch * c->s.nheads_q * c->s.seqlen_q);
    device_buffers d = {0};
    fajit_attn_args a;
    uint16_t *o = malloc(p->o_elems * 2);
    float *lse = malloc(lse_elems * 4);
    memset(r, 0, sizeof *r);
    if (!o || !lse) {
        snprintf(r->why, sizeof r->why, "out of host memory");
    } else if (!prepare_device(p, lse_elems, &d, r->why, sizeof r->why)) {
        fill_args(c, p, &d, &a);
        const int rc = fajit_attn_fwd(ctx, &a, NULL);
        if (rc != FAJIT_OK)
            snprintf(r->why, sizeof r->why, "fajit_attn_fwd: %s: %s", fajit_strerror(rc),
                     fajit_last_error());
        else if (!cuda_failed(cudaDeviceSynchronize(), "kernel", r->why, sizeof r->why) &&
                 !cuda_failed(cudaMemcpy(o, d.o, p->o_elems * 2, cudaMemcpyDeviceToHost),
                              "cudaMemcpy", r->why, sizeof r->why) &&
                 !cuda_failed(cudaMemcpy(lse, d.lse, lse_elems * 4, cudaMemcpyDeviceToHost),
                              "cudaMemcpy", r->why, sizeof r->why))
            attn_check(p, o, c->want_lse ? lse : NULL, r);
    }
    free_buffers(&d);
    free(o);
    free(lse);
    return !r->ok;
}

static int run_case(fajit_ctx *ctx, const test_case *c, uint64_t seed, double *worst_ratio) {
    attn_problem p;
    attn_result r;
    const attn_shape *s = &c->s;
    if (attn_problem_init(&p, s, c->layout, seed) != 0) {
        printf("FAIL cannot build problem (bad layout or out of memory)\n");
        return 1;
    }
    const int failed = launch_and_check(ctx, c, &p, &r);
    printf("%s %s %-9s dqk=%-3lld dv=%-3lld b=%lld sq=%-3lld sk=%-4lld hq=%lld hkv=%lld %-10s lse=%d"
           "  err %.2e <= %.2e  lse %.1e  masked rows %lld%s%s\n",
           failed ? "FAIL" : "ok  ", attn_dtype_name(s->dtype), attn_mask_name(s->mask),
           (long long)s->dqk, (long long)s->dv, (long long)s->batch, (long long)s->seqlen_q,
           (long long)s->seqlen_k, (long long)s->nheads_q, (long long)s->nheads_kv,
           attn_layout_name(c->layout), c->want_lse, r.max_err, r.tol, r.max_lse_rel_err,
           (long long)p.masked_rows, failed ? "\n     " : "", r.why);
    if (r.tol > 0 && r.max_err / r.tol > *worst_ratio)
        *worst_ratio = r.max_err / r.tol;
    attn_problem_free(&p);
    return failed;
}

/* ---------------------------------------------------------------- main */

/* 0 if a usable GPU is present, else 77 after printing the reason. */
static int require_gpu(void) {
    int count = 0;
    const cudaError_t e = cudaGetDeviceCount(&count);
    if (e != cudaSuccess || count == 0) {
        printf("SKIP: no CUDA GPU (%s)\n",
               e != cudaSuccess ? cudaGetErrorString(e) : "cudaGetDeviceCount returned 0");
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
    const char *quick_env = getenv("FAJIT_TEST_QUICK");
    const int quick = (argc > 1 && strcmp(argv[1], "--quick") == 0) ||
                      (quick_env && quick_env[0] && strcmp(quick_env, "0") != 0);
    const int skip = require_gpu();
    if (skip)
        return skip;

    fajit_ctx *ctx = NULL;
    const int rc = fajit_create(&ctx, NULL);
    if (rc != FAJIT_OK) {
        printf("FAIL fajit_create: %s: %s\n", fajit_strerror(rc), fajit_last_error());
        return 1;
    }
    static test_case cases[512];
    const size_t n = quick ? quick_grid(cases, 512) : full_grid(cases, 512);
    size_t failures = 0;
    double worst_ratio = 0.0;
    for (size_t i = 0; i < n; ++i)
        failures += (size_t)run_case(ctx, &cases[i], 0x5eed0000u + i, &worst_ratio);
    fajit_destroy(ctx);
    printf("test_ref_gpu%s: %zu cases, %zu failed; worst output error %.2f of its tolerance\n",
           quick ? " (quick)" : "", n, failures, worst_ratio);
    return failures ? 1 : 0;
}
