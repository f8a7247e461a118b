/*
 * tests/gpu/test_bwd_gpu.c - the reference backward against an fp64 CPU
 * backward, through the public API only (include/fajit.h), with the CUDA
 * runtime for memory.
 *
 * Per case: random (~N(0,1), fixed seeds) fp16/bf16 q, k, v and dO; the
 * reference forward (fajit_attn_fwd, kernel REFERENCE) gives O and LSE, checked
 * by attn_check; then fajit_attn_bwd runs three times into a gradient buffer
 * poisoned with 0xFF bytes (NaN) before each run. The first run is checked by
 * bwd_check (tests/gpu/bwd_check.h: output rounding of max|ref| plus a 1e-4
 * slack, exact zeros for unseen rows and keys, poison kept in the gaps); the
 * other two must be bit-identical to it. dq, dk and dv share one buffer laid
 * out like q, k and v (so a packed q/k/v layout gets packed gradients).
 *
 * Grid: head dims 1, 8, 64, 72, 100, 128, 192/128, 256, 512 x fp16/bf16 x
 * {none, causal, causal-tl} x {seqlen_q < seqlen_k with GQA 4:1, contiguous;
 * seqlen_q > seqlen_k (fully masked rows under causal) with MQA, padded
 * strides; seqlen_q == seqlen_k, packed q/k/v}, batch 2; plus a few shapes of
 * their own (one query row, many blocks, no keys, no queries).
 *
 * Usage: test_bwd_gpu [--quick]   (or FAJIT_TEST_QUICK=1): a few cases only,
 * for slow tools such as compute-sanitizer. Exit 0 pass, 1 fail, 77 no GPU.
 */
#include <cuda_runtime_api.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "attn_check.h"
#include "bwd_check.h"
#include "fajit.h"

#define RUNS 3

typedef struct test_case {
    attn_shape s;
    int layout;
    int kernel;        /* enum fajit_kernel_choice */
    int deterministic; /* passed through; the reference always is */
} test_case;

/* ---------------------------------------------------------------- the grid */

static const int head_dims[][2] = {{1, 1},     {8, 8},     {64, 64},   {72, 72},  {100, 100},
                                   {128, 128}, {192, 128}, {256, 256}, {512, 512}};
#define N_HEAD_DIMS (sizeof head_dims / sizeof head_dims[0])

static test_case make_case(int dqk, int dv, int dtype, int mask, int64_t sq, int64_t sk, int64_t hq,
                           int64_t hkv, int layout, float scale) {
    static int n;
    test_case c = {.s = {.batch = 2, .seqlen_q = sq, .seqlen_k = sk, .nheads_q = hq, .nheads_kv = hkv,
                         .dqk = dqk, .dv = dv, .dtype = dtype, .mask = mask, .softmax_scale = scale},
                   .layout = layout,
                   .kernel = n % 2 ? FAJIT_KERNEL_REFERENCE : FAJIT_KERNEL_AUTO,
                   .deterministic = (n / 2) % 2};
    ++n;
    return c;
}

static size_t full_grid(test_case *cases, size_t cap) {
    size_t n = 0;
    for (size_t d = 0; d < N_HEAD_DIMS; ++d)
        for (int dtype = 0; dtype < 2; ++dtype)
            for (int mask = 0; mask < 3; ++mask) {
                const int dqk = head_dims[d][0], dv = head_dims[d][1];
                const float scale = d % 2 ? 0.3f : 0.0f; /* 0: default 1/sqrt(dqk) */
                if (n + 3 > cap)
                    return n;
                cases[n++] = make_case(dqk, dv, dtype, mask, 17, 113, 8, 2, ATTN_CONTIGUOUS, scale);
                cases[n++] = make_case(dqk, dv, dtype, mask, 113, 17, 4, 1, ATTN_PADDED, 0.0f);
                cases[n++] = make_case(dqk, dv, dtype, mask, 64, 64, 4, 4,
                                       dqk == dv ? ATTN_PACKED_QKV : ATTN_PADDED, scale);
            }
    if (n + 5 <= cap) {
        cases[n++] = make_case(128, 128, 1, 1, 1, 256, 4, 1, ATTN_CONTIGUOUS, 0.0f); /* one row */
        cases[n++] = make_case(64, 64, 0, 1, 300, 300, 4, 2, ATTN_PADDED, 0.0f);     /* many blocks */
        cases[n++] = make_case(64, 64, 0, 2, 200, 333, 2, 2, ATTN_CONTIGUOUS, 0.0f);
        cases[n++] = make_case(72, 72, 1, 0, 5, 0, 4, 2, ATTN_PADDED, 0.0f);  /* no keys: dq = 0 */
        cases[n++] = make_case(72, 72, 0, 1, 0, 7, 4, 2, ATTN_PADDED, 0.0f);  /* no rows: dk = dv = 0 */
    }
    return n;
}

/* A handful of cases for compute-sanitizer: every layout, masked rows, GQA. */
static size_t quick_grid(test_case *cases, size_t cap) {
    const test_case quick[] = {
        make_case(72, 72, 1, 1, 113, 17, 4, 1, ATTN_PADDED, 0.0f),
        make_case(64, 64, 0, 2, 17, 113, 8, 2, ATTN_CONTIGUOUS, 0.0f),
        make_case(192, 128, 0, 1, 64, 64, 4, 4, ATTN_PADDED, 0.3f),
        make_case(100, 100, 1, 0, 64, 64, 4, 2, ATTN_PACKED_QKV, 0.0f),
        make_case(512, 512, 1, 1, 1, 256, 4, 1, ATTN_CONTIGUOUS, 0.0f),
    };
    size_t n = 0;
    for (; n < sizeof quick / sizeof quick[0] && n < cap; ++n)
        cases[n] = quick[n];
    return n;
}

/* ---------------------------------------------------------------- device side */

typedef struct device_buffers {
    void *in, *o, *dout, *grads;
    float *lse;
} device_buffers;

static void free_buffers(device_buffers *d) {
    cudaFree(d->in);
    cudaFree(d->o);
    cudaFree(d->dout);
    cudaFree(d->grads);
    cudaFree(d->lse);
}

static int cuda_failed(cudaError_t e, const char *what, char *why, size_t cap) {
    if (e == cudaSuccess)
        return 0;
    snprintf(why, cap, "%s: %s", what, cudaGetErrorName(e));
    return 1;
}

/* Every buffer gets 16 spare bytes, so that an empty tensor still has an
 * address (the API refuses NULL for the query-side tensors). */
static int prepare_device(const bwd_problem *bp, size_t lse_elems, device_buffers *d, char *why,
                          size_t cap) {
    const attn_problem *p = bp->fwd;
    memset(d, 0, sizeof *d);
    return cuda_failed(cudaMalloc(&d->in, p->in_elems * 2 + 16), "cudaMalloc", why, cap) ||
           cuda_failed(cudaMalloc(&d->o, p->o_elems * 2 + 16), "cudaMalloc", why, cap) ||
           cuda_failed(cudaMalloc(&d->dout, p->o_elems * 2 + 16), "cudaMalloc", why, cap) ||
           cuda_failed(cudaMalloc(&d->grads, p->in_elems * 2 + 16), "cudaMalloc", why, cap) ||
           cuda_failed(cudaMalloc((void **)&d->lse, lse_elems * 4 + 16), "cudaMalloc", why, cap) ||
           cuda_failed(cudaMemcpy(d->in, p->in, p->in_elems * 2, cudaMemcpyHostToDevice), "cudaMemcpy",
                       why, cap) ||
           cuda_failed(cudaMemcpy(d->dout, bp->grad_out, p->o_elems * 2, cudaMemcpyHostToDevice),
                       "cudaMemcpy", why, cap) ||
           cuda_failed(cudaMemset(d->o, 0xff, p->o_elems * 2 + 16), "cudaMemset", why, cap) ||
           cuda_failed(cudaMemset(d->lse, 0xff, lse_elems * 4 + 16), "cudaMemset", why, cap);
}

static void fill_fwd_args(const test_case *c, const attn_problem *p, const device_buffers *d,
                          fajit_attn_args *a) {
    const uint16_t *in = d->in;
    fajit_attn_args_init(a);
    a->q = in + p->q_off;
    a->k = in + p->k_off;
    a->v = in + p->v_off;
    a->o = d->o;
    a->lse = d->lse;
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

/* The backward's arguments: the forward's, plus dO laid out like O and the
 * gradients laid out like q, k and v in one buffer. */
static void fill_bwd_args(const test_case *c, const attn_problem *p, const device_buffers *d,
                          fajit_attn_bwd_args *a) {
    const uint16_t *in = d->in;
    uint16_t *grads = d->grads;
    fajit_attn_bwd_args_init(a);
    a->q = in + p->q_off;
    a->k = in + p->k_off;
    a->v = in + p->v_off;
    a->o = d->o;
    a->grad_out = d->dout;
    a->lse = d->lse;
    a->grad_q = grads + p->q_off;
    a->grad_k = grads + p->k_off;
    a->grad_v = grads + p->v_off;
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
    a->deterministic = c->deterministic;
    a->kernel = c->kernel;
    if (c->layout != ATTN_CONTIGUOUS) {
        memcpy(a->q_stride, p->q_stride, sizeof a->q_stride);
        memcpy(a->k_stride, p->k_stride, sizeof a->k_stride);
        memcpy(a->v_stride, p->v_stride, sizeof a->v_stride);
        memcpy(a->o_stride, p->o_stride, sizeof a->o_stride);
        memcpy(a->grad_out_stride, p->o_stride, sizeof a->grad_out_stride);
        memcpy(a->grad_q_stride, p->q_stride, sizeof a->grad_q_stride);
        memcpy(a->grad_k_stride, p->k_stride, sizeof a->grad_k_stride);
        memcpy(a->grad_v_stride, p->v_stride, sizeof a->grad_v_stride);
    }
}

/* The forward, its check, and the fp64 backward from what it wrote. */
static int run_forward(fajit_ctx *ctx, const test_case *c, bwd_problem *bp, const device_buffers *d,
                       size_t lse_elems, char *why, size_t cap) {
    const attn_problem *p = bp->fwd;
    uint16_t *o = malloc(p->o_elems * 2 + 16);
    float *lse = malloc(lse_elems * 4 + 16);
    fajit_attn_args a;
    attn_result fr;
    int rc, failed = 1;
    if (!o || !lse) {
        snprintf(why, cap, "out of host memory");
        goto out;
    }
    fill_fwd_args(c, p, d, &a);
    if ((rc = fajit_attn_fwd(ctx, &a, NULL)) != FAJIT_OK) {
        snprintf(why, cap, "fajit_attn_fwd: %s: %s", fajit_strerror(rc), fajit_last_error());
        goto out;
    }
    if (cuda_failed(cudaDeviceSynchronize(), "forward kernel", why, cap) ||
        cuda_failed(cudaMemcpy(o, d->o, p->o_elems * 2, cudaMemcpyDeviceToHost), "cudaMemcpy", why, cap) ||
        cuda_failed(cudaMemcpy(lse, d->lse, lse_elems * 4, cudaMemcpyDeviceToHost), "cudaMemcpy", why, cap))
        goto out;
    attn_check(p, o, lse, &fr);
    if (!fr.ok) {
        snprintf(why, cap, "forward: %.200s", fr.why);
        goto out;
    }
    failed = bwd_reference(bp, o, lse) != 0;
    if (failed)
        snprintf(why, cap, "backward reference: out of memory");
out:
    free(o);
    free(lse);
    return failed;
}

/* One backward run into freshly poisoned gradients, downloaded to host. */
static int run_backward(fajit_ctx *ctx, const test_case *c, const attn_problem *p,
                        const device_buffers *d, uint16_t *grads, char *why, size_t cap) {
    fajit_attn_bwd_args a;
    int rc;
    if (cuda_failed(cudaMemset(d->grads, 0xff, p->in_elems * 2 + 16), "cudaMemset", why, cap))
        return 1;
    fill_bwd_args(c, p, d, &a);
    if ((rc = fajit_attn_bwd(ctx, &a, NULL)) != FAJIT_OK) {
        snprintf(why, cap, "fajit_attn_bwd: %s: %s", fajit_strerror(rc), fajit_last_error());
        return 1;
    }
    return cuda_failed(cudaDeviceSynchronize(), "backward kernels", why, cap) ||
           cuda_failed(cudaMemcpy(grads, d->grads, p->in_elems * 2, cudaMemcpyDeviceToHost), "cudaMemcpy",
                       why, cap);
}

/* Forward, reference, RUNS backward runs: the first checked, the others
 * compared bit for bit with it. 0 pass, 1 fail. */
static int launch_and_check(fajit_ctx *ctx, const test_case *c, bwd_problem *bp, bwd_result *r) {
    const attn_problem *p = bp->fwd;
    const size_t lse_elems = (size_t)(c->s.batch * c->s.nheads_q * c->s.seqlen_q);
    const size_t bytes = p->in_elems * 2;
    device_buffers d = {0};
    uint16_t *grads[RUNS] = {0};
    memset(r, 0, sizeof *r);
    for (int i = 0; i < RUNS; ++i)
        grads[i] = malloc(bytes + 16);
    if (!grads[0] || !grads[1] || !grads[2]) {
        snprintf(r->why, sizeof r->why, "out of host memory");
    } else if (!prepare_device(bp, lse_elems, &d, r->why, sizeof r->why) &&
               !run_forward(ctx, c, bp, &d, lse_elems, r->why, sizeof r->why)) {
        int failed = 0;
        for (int i = 0; i < RUNS && !failed; ++i)
            failed = run_backward(ctx, c, p, &d, grads[i], r->why, sizeof r->why);
        if (!failed) {
            bwd_check(bp, grads[0], r);
            for (int i = 1; i < RUNS && r->ok; ++i)
                if (memcmp(grads[0], grads[i], bytes) != 0) {
                    r->ok = 0;
                    snprintf(r->why, sizeof r->why, "run %d differs from run 0: not deterministic", i);
                }
        }
    }
    free_buffers(&d);
    for (int i = 0; i < RUNS; ++i)
        free(grads[i]);
    return !r->ok;
}

static int run_case(fajit_ctx *ctx, const test_case *c, uint64_t seed, double *worst_ratio) {
    attn_problem p;
    bwd_problem bp;
    bwd_result r;
    const attn_shape *s = &c->s;
    if (attn_problem_init(&p, s, c->layout, seed) != 0) {
        printf("FAIL cannot build problem (bad layout or out of memory)\n");
        return 1;
    }
    if (bwd_problem_init(&bp, &p, seed ^ 0xd0d0d0d0u) != 0) {
        printf("FAIL cannot build the backward problem (out of memory)\n");
        attn_problem_free(&p);
        return 1;
    }
    const int failed = launch_and_check(ctx, c, &bp, &r);
    printf("%s %s %-9s dqk=%-3lld dv=%-3lld b=%lld sq=%-3lld sk=%-3lld hq=%lld hkv=%lld %-10s %s det=%d"
           "  err dq %.1e/%.1e dk %.1e/%.1e dv %.1e/%.1e%s%s\n",
           failed ? "FAIL" : "ok  ", attn_dtype_name(s->dtype), attn_mask_name(s->mask),
           (long long)s->dqk, (long long)s->dv, (long long)s->batch, (long long)s->seqlen_q,
           (long long)s->seqlen_k, (long long)s->nheads_q, (long long)s->nheads_kv,
           attn_layout_name(c->layout), c->kernel == FAJIT_KERNEL_AUTO ? "auto" : "ref ",
           c->deterministic, r.max_err[0], r.tol[0], r.max_err[1], r.tol[1], r.max_err[2], r.tol[2],
           failed ? "\n     " : "", r.why);
    for (int t = 0; t < 3; ++t)
        if (r.tol[t] > 0 && r.max_err[t] / r.tol[t] > *worst_ratio)
            *worst_ratio = r.max_err[t] / r.tol[t];
    bwd_problem_free(&bp);
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
    static test_case cases[256];
    const size_t n = quick ? quick_grid(cases, 256) : full_grid(cases, 256);
    size_t failures = 0;
    double worst_ratio = 0.0;
    for (size_t i = 0; i < n; ++i)
        failures += (size_t)run_case(ctx, &cases[i], 0xb0d0000u + i, &worst_ratio);
    fajit_destroy(ctx);
    printf("test_bwd_gpu%s: %zu cases, %zu failed; worst gradient error %.2f of its tolerance; "
           "%d runs bit-identical in each\n",
           quick ? " (quick)" : "", n, failures, worst_ratio, RUNS);
    return failures ? 1 : 0;
}
