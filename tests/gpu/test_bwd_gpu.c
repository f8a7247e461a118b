/*
 * tests/gpu/test_bwd_gpu.c - the backward against an fp64 CPU backward,
 * through the public API only (include/fajit.h), with the CUDA runtime for
 * memory.
 *
 * Per case: random (~N(0,1), fixed seeds) fp16/bf16 q, k, v and dO; the
 * reference forward (fajit_attn_fwd, kernel REFERENCE) gives O and LSE,
 * checked by attn_check (no feature) and by bwd_check's fp64 forward with the
 * features; then fajit_attn_bwd runs three times into a gradient buffer
 * poisoned with 0xFF bytes (NaN) before each run. The first run is checked by
 * bwd_check (tests/gpu/bwd_check.h): kernel REFERENCE by the tight rule
 * (output rounding of max|ref| plus a 1e-4 slack), kernel AUTO by
 * FlashAttention's for gradients (3x the naive low-precision backward's error
 * plus the slack); both with exact zeros for unseen rows and keys and the poison kept
 * in the gaps. The other two runs must be bit-identical to it where the
 * call promises it (deterministic, or the reference; the fast backward's dQ
 * otherwise sums by unordered atomics). dq, dk and dv
 * share one buffer laid out like q, k and v (so a packed q/k/v layout gets
 * packed gradients).
 *
 * Grid: head dims 1, 8, 64, 72, 100, 128, 192/128, 256, 512 x fp16/bf16 x
 * {none, causal, causal-tl} x {seqlen_q < seqlen_k with GQA 4:1, contiguous;
 * seqlen_q > seqlen_k (fully masked rows under causal) with MQA, padded
 * strides; seqlen_q == seqlen_k, packed q/k/v}, batch 2; plus a few shapes of
 * their own (one query row, many blocks, no keys, no queries); plus the
 * features, each with both directions given the same arguments: sliding
 * windows under every mask, softcap, ALiBi per head and per batch and head,
 * dropout (the CPU regenerates the forward's mask with tests/gpu/philox.h,
 * and a backward given another offset must fail the check: the mask really is
 * regenerated, not ignored), varlen with ragged lengths including 0 and 1
 * (packed q/k/v too), and everything at once over head dims.
 *
 * Every case's kernels are compiled up front on 16 threads.
 *
 * Usage: test_bwd_gpu [--quick]   (or FAJIT_TEST_QUICK=1): a few cases only,
 * for slow tools such as compute-sanitizer. Exit 0 pass, 1 fail, 77 no GPU.
 */
#include <cuda_runtime_api.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "attn_check.h"
#include "bwd_check.h"
#include "fajit.h"
#include "precompile.h"

#define RUNS 3
#define MAX_SEQS 8
#define MAX_CASES 256

enum { ALIBI_OFF = 0, ALIBI_HEAD = 1, ALIBI_BATCH_HEAD = 2 };

typedef struct test_case {
    attn_shape s;      /* varlen: batch 1, seqlen_q/k the totals */
    int layout;
    int kernel;        /* enum fajit_kernel_choice */
    int deterministic; /* passed through; the reference always is */
    /* features, passed alike to the forward and the backward */
    int wl, wr;        /* window; -1 unbounded */
    float softcap;
    int alibi;         /* ALIBI_* */
    float p;           /* dropout */
    uint64_t seed, offset;
    int wrong_offset;  /* dropout: a backward with offset + 1 must fail the check */
    int nseq;          /* varlen when > 0: sequence lengths below */
    int lens_q[MAX_SEQS], lens_k[MAX_SEQS];
} test_case;

/* Host arrays of a case's features (what the device copies are made from). */
typedef struct case_data {
    float slopes[MAX_SEQS * 64];
    int n_slopes;
    int32_t cu_q[MAX_SEQS + 1], cu_k[MAX_SEQS + 1];
    int64_t max_q, max_k; /* varlen: the longest sequences */
} case_data;

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
                   .deterministic = (n / 2) % 2,
                   .wl = -1,
                   .wr = -1};
    ++n;
    return c;
}

/* c made varlen over n sequences: batch 1 with the total lengths. */
static test_case varlen(test_case c, const int *lq, const int *lk, int n) {
    c.nseq = n;
    c.s.batch = 1;
    c.s.seqlen_q = c.s.seqlen_k = 0;
    for (int b = 0; b < n; ++b) {
        c.lens_q[b] = lq[b], c.lens_k[b] = lk[b];
        c.s.seqlen_q += lq[b], c.s.seqlen_k += lk[b];
    }
    return c;
}

static test_case dropout(test_case c, float p, uint64_t seed, uint64_t offset) {
    c.p = p, c.seed = seed, c.offset = offset;
    return c;
}

static test_case window(test_case c, int left, int right) {
    c.wl = left, c.wr = right;
    return c;
}

/* Each feature alone and together, both directions given the same arguments. */
static size_t feature_grid(test_case *cases, size_t n, size_t cap) {
    static const int windows[][2] = {{16, 7}, {5, -1}, {0, 0}, {-1, 3}, {3, 2}};
    static const int lq[] = {0, 1, 17, 113, 64, 3}, lk[] = {5, 0, 1, 150, 64, 200};
    static const int same[] = {33, 0, 1, 70};
    static const int all_dims[][2] = {{8, 8}, {59, 59}, {128, 128}, {192, 128}, {256, 256}, {512, 512}};
    for (int w = 0; w < 5; ++w) /* windows under every mask, seqlen_q < and > seqlen_k */
        for (int mask = 0; mask < 3 && n < cap; ++mask) {
            const int dim = w % 2 ? 64 : 128, sq = w % 2 ? 113 : 90, sk = w % 2 ? 90 : 113;
            cases[n++] = window(make_case(dim, dim, (w + mask) % 2, mask, sq, sk, 4, 2,
                                          mask == 1 ? ATTN_PADDED : ATTN_CONTIGUOUS, 0.0f),
                                windows[w][0], windows[w][1]);
        }
    for (int k = 0; k < 4 && n < cap; ++k) { /* softcap, mild and strong */
        test_case c = make_case(k % 2 ? 128 : 8, k % 2 ? 128 : 8, k % 2, k / 2, 97, 120, 4, 2,
                                k % 2 ? ATTN_PADDED : ATTN_CONTIGUOUS, k == 3 ? 0.3f : 0.0f);
        c.softcap = k % 2 ? 5.0f : 30.0f;
        cases[n++] = c;
    }
    for (int k = 0; k < 4 && n < cap; ++k) { /* ALiBi per head, per batch and head; GQA, MQA */
        test_case c = make_case(64, 64, k % 2, k % 3, 100, 90, 8, k % 2 ? 2 : 1, ATTN_PADDED, 0.0f);
        c.alibi = k < 2 ? ALIBI_HEAD : ALIBI_BATCH_HEAD;
        if (k == 3)
            c = window(c, 20, 4);
        cases[n++] = c;
    }
    for (int k = 0; k < 4 && n < cap; ++k) { /* dropout: seeds, offsets past 2^32, p */
        test_case c = make_case(k == 1 ? 100 : 64, k == 1 ? 100 : 64, k % 2, k % 3, 120, 100, 8, 2,
                                k == 2 ? ATTN_PACKED_QKV : ATTN_CONTIGUOUS, 0.0f);
        if (k == 2)
            c.s.seqlen_q = c.s.seqlen_k = 100;
        c = dropout(c, k == 3 ? 0.5f : 0.17f, 0xfeedface12345678ull + (uint64_t)k,
                    k == 1 ? (5ull << 32) + 3 : 42u * (uint64_t)k);
        c.wrong_offset = k < 2;
        cases[n++] = c;
    }
    for (int k = 0; k < 4 && n < cap; ++k) { /* varlen, ragged with 0 and 1 */
        test_case c = k == 3 ? varlen(make_case(64, 64, 1, 1, 0, 0, 4, 4, ATTN_PACKED_QKV, 0.0f), same,
                                      same, 4)
                             : varlen(make_case(k % 2 ? 59 : 64, k % 2 ? 59 : 64, k % 2, k % 3, 0, 0, 4,
                                                2, k == 0 ? ATTN_CONTIGUOUS : ATTN_PADDED, 0.0f),
                                      lq, lk, 6);
        if (k == 1)
            c.alibi = ALIBI_BATCH_HEAD, c.softcap = 20.0f, c = window(c, 30, 10);
        if (k == 2)
            c = dropout(c, 0.17f, 77, 1ull << 33), c.alibi = ALIBI_HEAD, c.wrong_offset = 1;
        cases[n++] = c;
    }
    for (size_t d = 0; d < sizeof all_dims / sizeof all_dims[0] && n < cap; ++d) { /* all at once */
        test_case c = make_case(all_dims[d][0], all_dims[d][1], (int)d % 2, (int)d % 3, 65, 90, 4, 2,
                                d % 2 ? ATTN_PADDED : ATTN_CONTIGUOUS, 0.0f);
        c.softcap = 15.0f, c.alibi = d % 2 ? ALIBI_BATCH_HEAD : ALIBI_HEAD;
        c = window(c, 40, 20);
        if (d % 2)
            c = dropout(c, 0.17f, 1234 + d, 7);
        cases[n++] = c;
    }
    return n;
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
    return feature_grid(cases, n, cap);
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
    static const int lq[] = {0, 1, 17, 40}, lk[] = {5, 0, 33, 40};
    size_t n = 0;
    for (; n < sizeof quick / sizeof quick[0] && n < cap; ++n)
        cases[n] = quick[n];
    if (n + 1 < cap) { /* every feature at once, dense and varlen */
        test_case c = window(make_case(64, 64, 0, 1, 50, 70, 4, 2, ATTN_PADDED, 0.0f), 20, 5);
        c.softcap = 10.0f, c.alibi = ALIBI_BATCH_HEAD;
        cases[n++] = dropout(c, 0.2f, 99, 5);
        c = varlen(c, lq, lk, 4);
        cases[n++] = dropout(c, 0.2f, 98, 1ull << 32);
    }
    return n;
}

/* ---------------------------------------------------------------- host features */

static uint64_t next_u64(uint64_t *state) {
    uint64_t z = (*state += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

/* The number of sequences: varlen's, else the batch. */
static int64_t sequences(const test_case *c) { return c->nseq > 0 ? c->nseq : c->s.batch; }

/* ALiBi's geometric slopes 2^-1 .. 2^-8 at random, and varlen's prefix sums. */
static void make_case_data(const test_case *c, uint64_t seed, case_data *cd) {
    uint64_t state = seed;
    memset(cd, 0, sizeof *cd);
    cd->n_slopes = (int)(c->alibi == ALIBI_BATCH_HEAD ? sequences(c) * c->s.nheads_q : c->s.nheads_q);
    for (int i = 0; i < cd->n_slopes; ++i)
        cd->slopes[i] = ldexpf(1.0f, -1 - (int)(next_u64(&state) % 8));
    for (int b = 0; b < c->nseq; ++b) {
        cd->cu_q[b + 1] = cd->cu_q[b] + c->lens_q[b];
        cd->cu_k[b + 1] = cd->cu_k[b] + c->lens_k[b];
        cd->max_q = c->lens_q[b] > cd->max_q ? c->lens_q[b] : cd->max_q;
        cd->max_k = c->lens_k[b] > cd->max_k ? c->lens_k[b] : cd->max_k;
    }
}

static void host_features(const test_case *c, const case_data *cd, bwd_features *f) {
    bwd_features_none(f);
    f->window_left = c->wl, f->window_right = c->wr;
    f->softcap = c->softcap;
    if (c->alibi) {
        f->alibi_slopes = cd->slopes;
        f->alibi_batch_stride = c->alibi == ALIBI_BATCH_HEAD ? c->s.nheads_q : 0;
    }
    f->dropout_p = c->p, f->dropout_seed = c->seed, f->dropout_offset = c->offset;
    if (c->nseq > 0)
        f->cu_seqlens_q = cd->cu_q, f->cu_seqlens_k = cd->cu_k, f->nseq = c->nseq;
}

static int has_features(const test_case *c) {
    return c->wl >= 0 || c->wr >= 0 || c->softcap != 0.0f || c->alibi || c->p > 0.0f || c->nseq > 0;
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

static int cuda_failed(cudaError_t e, const char *what, char *why, size_t cap) {
    if (e == cudaSuccess)
        return 0;
    snprintf(why, cap, "%s: %s", what, cudaGetErrorName(e));
    return 1;
}

/* The features' arrays: the slopes and the prefix sums. */
static int upload_features(const case_data *cd, device_buffers *d, char *why, size_t cap) {
    const size_t cu_bytes = sizeof cd->cu_q;
    return cuda_failed(cudaMalloc((void **)&d->slopes, sizeof cd->slopes), "cudaMalloc", why, cap) ||
           cuda_failed(cudaMalloc((void **)&d->cu_q, cu_bytes), "cudaMalloc", why, cap) ||
           cuda_failed(cudaMalloc((void **)&d->cu_k, cu_bytes), "cudaMalloc", why, cap) ||
           cuda_failed(cudaMemcpy(d->slopes, cd->slopes, sizeof cd->slopes, cudaMemcpyHostToDevice),
                       "cudaMemcpy", why, cap) ||
           cuda_failed(cudaMemcpy(d->cu_q, cd->cu_q, cu_bytes, cudaMemcpyHostToDevice), "cudaMemcpy", why, cap) ||
           cuda_failed(cudaMemcpy(d->cu_k, cd->cu_k, cu_bytes, cudaMemcpyHostToDevice), "cudaMemcpy", why, cap);
}

/* Every buffer gets 16 spare bytes, so that an empty tensor still has an
 * address (the API refuses NULL for the query-side tensors). */
static int prepare_device(const bwd_problem *bp, const case_data *cd, size_t lse_elems,
                          device_buffers *d, char *why, size_t cap) {
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
           cuda_failed(cudaMemset(d->lse, 0xff, lse_elems * 4 + 16), "cudaMemset", why, cap) ||
           upload_features(cd, d, why, cap);
}

/* The arguments both directions share, written into whichever struct: the
 * shape, mask, scale and features (varlen: the sequences' count and longest
 * lengths, the device prefix sums). */
#define FILL_COMMON(a, c, cd, d)                                                                    \
    do {                                                                                            \
        (a)->batch = (c)->nseq > 0 ? (c)->nseq : (c)->s.batch;                                      \
        (a)->seqlen_q = (c)->nseq > 0 ? (cd)->max_q : (c)->s.seqlen_q;                              \
        (a)->seqlen_k = (c)->nseq > 0 ? (cd)->max_k : (c)->s.seqlen_k;                              \
        (a)->nheads_q = (c)->s.nheads_q;                                                            \
        (a)->nheads_kv = (c)->s.nheads_kv;                                                          \
        (a)->dqk = (c)->s.dqk;                                                                      \
        (a)->dv = (c)->s.dv;                                                                        \
        (a)->dtype = (c)->s.dtype;                                                                  \
        (a)->mask = (c)->s.mask;                                                                    \
        (a)->softmax_scale = (c)->s.softmax_scale;                                                  \
        (a)->window_left = (c)->wl;                                                                 \
        (a)->window_right = (c)->wr;                                                                \
        (a)->softcap = (c)->softcap;                                                                \
        if ((c)->alibi) {                                                                           \
            (a)->alibi_slopes = (d)->slopes;                                                        \
            (a)->alibi_batch_stride = (c)->alibi == ALIBI_BATCH_HEAD ? (c)->s.nheads_q : 0;         \
        }                                                                                           \
        (a)->dropout_p = (c)->p;                                                                    \
        (a)->dropout_seed = (c)->seed;                                                              \
        (a)->dropout_offset = (c)->offset;                                                          \
        if ((c)->nseq > 0) {                                                                        \
            (a)->cu_seqlens_q = (d)->cu_q;                                                          \
            (a)->cu_seqlens_k = (d)->cu_k;                                                          \
        }                                                                                           \
    } while (0)

static void fill_fwd_args(const test_case *c, const case_data *cd, const attn_problem *p,
                          const device_buffers *d, fajit_attn_args *a) {
    const uint16_t *in = d->in;
    fajit_attn_args_init(a);
    a->q = in + p->q_off;
    a->k = in + p->k_off;
    a->v = in + p->v_off;
    a->o = d->o;
    a->lse = d->lse;
    FILL_COMMON(a, c, cd, d);
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
static void fill_bwd_args(const test_case *c, const case_data *cd, const attn_problem *p,
                          const device_buffers *d, fajit_attn_bwd_args *a) {
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
    FILL_COMMON(a, c, cd, d);
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

/* The forward, its checks, and the fp64 backward from what it wrote. */
static int run_forward(fajit_ctx *ctx, const test_case *c, const case_data *cd, bwd_problem *bp,
                       const device_buffers *d, size_t lse_elems, char *why, size_t cap) {
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
    fill_fwd_args(c, cd, p, d, &a);
    if ((rc = fajit_attn_fwd(ctx, &a, NULL)) != FAJIT_OK) {
        snprintf(why, cap, "fajit_attn_fwd: %s: %s", fajit_strerror(rc), fajit_last_error());
        goto out;
    }
    if (cuda_failed(cudaDeviceSynchronize(), "forward kernel", why, cap) ||
        cuda_failed(cudaMemcpy(o, d->o, p->o_elems * 2, cudaMemcpyDeviceToHost), "cudaMemcpy", why, cap) ||
        cuda_failed(cudaMemcpy(lse, d->lse, lse_elems * 4, cudaMemcpyDeviceToHost), "cudaMemcpy", why, cap))
        goto out;
    if (!has_features(c)) { /* attn_check knows no feature; bwd_reference's check does */
        attn_check(p, o, lse, &fr);
        if (!fr.ok) {
            snprintf(why, cap, "forward: %.200s", fr.why);
            goto out;
        }
    }
    if (bwd_reference(bp, o, lse) != 0) {
        snprintf(why, cap, "backward reference: out of memory, or cu_seqlens not fitting the problem");
        goto out;
    }
    if (!bp->fwd_check.ok) {
        snprintf(why, cap, "forward vs fp64 with the features: %.200s", bp->fwd_check.why);
        goto out;
    }
    failed = 0;
out:
    free(o);
    free(lse);
    return failed;
}

/* One backward run into freshly poisoned gradients, downloaded to host. A
 * nonzero offset_delta runs it with another dropout offset than the forward's. */
static int run_backward(fajit_ctx *ctx, const test_case *c, const case_data *cd, const attn_problem *p,
                        const device_buffers *d, uint64_t offset_delta, uint16_t *grads, char *why,
                        size_t cap) {
    fajit_attn_bwd_args a;
    int rc;
    if (cuda_failed(cudaMemset(d->grads, 0xff, p->in_elems * 2 + 16), "cudaMemset", why, cap))
        return 1;
    fill_bwd_args(c, cd, p, d, &a);
    a.dropout_offset += offset_delta;
    if ((rc = fajit_attn_bwd(ctx, &a, NULL)) != FAJIT_OK) {
        snprintf(why, cap, "fajit_attn_bwd: %s: %s", fajit_strerror(rc), fajit_last_error());
        return 1;
    }
    return cuda_failed(cudaDeviceSynchronize(), "backward kernels", why, cap) ||
           cuda_failed(cudaMemcpy(grads, d->grads, p->in_elems * 2, cudaMemcpyDeviceToHost), "cudaMemcpy",
                       why, cap);
}

/* The rule a kernel choice is held to: the reference computes in fp32
 * throughout, so only its output rounding is allowed; AUTO may pick a fast
 * kernel, held to FlashAttention's rule. */
static int rule_of(const test_case *c) {
    return c->kernel == FAJIT_KERNEL_REFERENCE ? BWD_RULE_TIGHT : BWD_RULE_FLASH;
}

/* A dropout case's backward with the forward's offset + 1 must fail the
 * check: the backward really regenerates the mask from (seed, offset). */
static void check_wrong_offset(fajit_ctx *ctx, const test_case *c, const case_data *cd,
                               const bwd_problem *bp, const device_buffers *d, uint16_t *grads,
                               bwd_result *r) {
    bwd_result wrong;
    char why[256] = "";
    if (run_backward(ctx, c, cd, bp->fwd, d, 1, grads, why, sizeof why)) {
        r->ok = 0;
        snprintf(r->why, sizeof r->why, "offset + 1 run: %.200s", why);
        return;
    }
    bwd_check_rule(bp, grads, rule_of(c), &wrong);
    if (wrong.ok) {
        r->ok = 0;
        snprintf(r->why, sizeof r->why, "a backward with dropout offset + 1 passed too: the mask is not "
                                        "regenerated from (seed, offset)");
    }
}

/* Forward, reference, RUNS backward runs: the first checked, the others
 * compared bit for bit with it. 0 pass, 1 fail. */
static int launch_and_check(fajit_ctx *ctx, const test_case *c, const case_data *cd, bwd_problem *bp,
                            bwd_result *r) {
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
    } else if (!prepare_device(bp, cd, lse_elems, &d, r->why, sizeof r->why) &&
               !run_forward(ctx, c, cd, bp, &d, lse_elems, r->why, sizeof r->why)) {
        int failed = 0;
        for (int i = 0; i < RUNS && !failed; ++i)
            failed = run_backward(ctx, c, cd, p, &d, 0, grads[i], r->why, sizeof r->why);
        if (!failed) {
            bwd_check_rule(bp, grads[0], rule_of(c), r);
            /* The fast backward's dQ comes from unordered fp32 atomics unless
             * deterministic mode is asked for; the reference always is. */
            const int must_repeat = c->deterministic || c->kernel == FAJIT_KERNEL_REFERENCE;
            for (int i = 1; i < RUNS && r->ok && must_repeat; ++i)
                if (memcmp(grads[0], grads[i], bytes) != 0) {
                    r->ok = 0;
                    snprintf(r->why, sizeof r->why, "run %d differs from run 0: not deterministic", i);
                }
            if (r->ok && c->wrong_offset)
                check_wrong_offset(ctx, c, cd, bp, &d, grads[1], r);
        }
    }
    free_buffers(&d);
    for (int i = 0; i < RUNS; ++i)
        free(grads[i]);
    return !r->ok;
}

/* " window=l,r softcap=c alibi=h dropout=p varlen=n" for the features on. */
static const char *describe_features(const test_case *c, char *buf, size_t cap) {
    size_t n = 0;
    buf[0] = '\0';
    if (c->wl >= 0 || c->wr >= 0)
        n += (size_t)snprintf(buf + n, cap - n, " window=%d,%d", c->wl, c->wr);
    if (c->softcap != 0.0f && n < cap)
        n += (size_t)snprintf(buf + n, cap - n, " softcap=%g", (double)c->softcap);
    if (c->alibi && n < cap)
        n += (size_t)snprintf(buf + n, cap - n, " alibi=%s", c->alibi == ALIBI_HEAD ? "h" : "bh");
    if (c->p > 0.0f && n < cap)
        n += (size_t)snprintf(buf + n, cap - n, " dropout=%g%s", (double)c->p,
                              c->wrong_offset ? "(+wrong offset)" : "");
    if (c->nseq > 0 && n < cap)
        snprintf(buf + n, cap - n, " varlen=%d", c->nseq);
    return buf;
}

static int run_case(fajit_ctx *ctx, const test_case *c, uint64_t seed, double *worst_ratio) {
    attn_problem p;
    bwd_problem bp;
    bwd_result r;
    bwd_features f;
    case_data cd;
    char feats[160];
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
    make_case_data(c, seed ^ 0x5109e5u, &cd);
    host_features(c, &cd, &f);
    bwd_problem_set_features(&bp, &f);
    const int failed = launch_and_check(ctx, c, &cd, &bp, &r);
    printf("%s %s %-9s dqk=%-3lld dv=%-3lld b=%lld sq=%-3lld sk=%-3lld hq=%lld hkv=%lld %-10s %s det=%d"
           "  err/tol(naive) dq %.1e/%.1e(%.1e) dk %.1e/%.1e(%.1e) dv %.1e/%.1e(%.1e)%s%s%s\n",
           failed ? "FAIL" : "ok  ", attn_dtype_name(s->dtype), attn_mask_name(s->mask),
           (long long)s->dqk, (long long)s->dv, (long long)s->batch, (long long)s->seqlen_q,
           (long long)s->seqlen_k, (long long)s->nheads_q, (long long)s->nheads_kv,
           attn_layout_name(c->layout), c->kernel == FAJIT_KERNEL_AUTO ? "auto" : "ref ",
           c->deterministic, r.max_err[0], r.tol[0], r.naive_err[0], r.max_err[1], r.tol[1],
           r.naive_err[1], r.max_err[2], r.tol[2], r.naive_err[2],
           describe_features(c, feats, sizeof feats), failed ? "\n     " : "", r.why);
    for (int t = 0; t < 3; ++t)
        if (r.tol[t] > 0 && r.max_err[t] / r.tol[t] > *worst_ratio)
            *worst_ratio = r.max_err[t] / r.tol[t];
    bwd_problem_free(&bp);
    attn_problem_free(&p);
    return failed;
}

/* ---------------------------------------------------------------- compiling up front */

/* The reference backward's two variants and the reference forward's, as specs
 * (tiles and arch left to the library): the forward variant fajit_attn_variant
 * names, with its op word swapped. The runtime normalises the window the same
 * way in both directions, so these are the backward's variants. */
static size_t case_specs(fajit_ctx *ctx, const test_case *c, char (*texts)[400]) {
    static const char *const ops[] = {"ref", "ref-dq", "ref-dkdv"};
    static const uint16_t fake[8];
    static const float fake_slopes[4];
    static const int32_t fake_cu[4];
    const device_buffers d = {.in = (void *)fake, .o = (void *)fake, .lse = (float *)fake_slopes,
                              .slopes = (float *)fake_slopes, .cu_q = (int32_t *)fake_cu,
                              .cu_k = (int32_t *)fake_cu};
    attn_problem p;
    case_data cd;
    fajit_attn_args a;
    char text[400];
    memset(&p, 0, sizeof p);
    p.layout = ATTN_CONTIGUOUS;
    make_case_data(c, 0, &cd);
    fill_fwd_args(c, &cd, &p, &d, &a);
    if (fajit_attn_variant(ctx, &a, text, sizeof text) < 0 || strncmp(text, "ref ", 4) != 0)
        return 0;
    char *tiles = strstr(text, " bm=");
    if (tiles)
        *tiles = '\0';
    for (int i = 0; i < 3; ++i)
        snprintf(texts[i], sizeof texts[i], "%s%.380s", ops[i], text + 3);
    return 3;
}

static void precompile(fajit_ctx *ctx, const test_case *cases, size_t n, size_t *failures) {
    static char texts[3 * MAX_CASES][400];
    static const char *specs[3 * MAX_CASES];
    size_t m = 0;
    for (size_t i = 0; i < n; ++i)
        m += case_specs(ctx, &cases[i], &texts[m]);
    for (size_t i = 0; i < m; ++i)
        specs[i] = texts[i];
    *failures += precompile_variants(ctx, specs, m, 16);
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
    static test_case cases[MAX_CASES];
    const size_t n = quick ? quick_grid(cases, MAX_CASES) : full_grid(cases, MAX_CASES);
    size_t failures = 0;
    double worst_ratio = 0.0;
    precompile(ctx, cases, n, &failures);
    for (size_t i = 0; i < n; ++i)
        failures += (size_t)run_case(ctx, &cases[i], 0xb0d0000u + i, &worst_ratio);
    fajit_destroy(ctx);
    printf("test_bwd_gpu%s: %zu cases, %zu failed; worst gradient error %.2f of its tolerance; "
           "%d runs bit-identical in each\n",
           quick ? " (quick)" : "", n, failures, worst_ratio, RUNS);
    return failures ? 1 : 0;
}
