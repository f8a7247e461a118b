/*
 * tests/gpu/test_tuned_gpu.c - every candidate tuning may choose gives right
 * answers, through the launch paths tuning drives.
 *
 * Forward: for a few problems (head dims 64, 72, 128, 256 and 192/128, both
 * dtypes, every mask, seqlen_q != seqlen_k), each candidate of
 * fajit__tune_candidates is made the tuned winner by a tuning record in the
 * context's store (as `fajit tune` would leave it); the test then checks that
 * fajit_attn_variant reports those tiles (the launch path takes the record)
 * and that fajit_attn_fwd's output and LSE pass attn_check_fast (two output rounding steps) against the fp64
 * reference, outputs NaN-poisoned before every launch. Split-KV: decode-like
 * problems (few query rows over long keys, GQA) where the rule splits; every
 * (tile candidate, split count of fajit__tune_split_counts) is made the
 * winner, and the DEBUG log must show the launch split that many ways.
 * Backward: every bwd tile candidate made the winner; the launch path's
 * lookup must return it, and fajit_attn_bwd's gradients pass FlashAttention's
 * rule against the fp64 backward (bwd_check), buffers poisoned.
 *
 * Links the static library: writing records and reading the GPU identity are
 * internal (runtime/tune.h). Exit 0 pass, 1 fail, 77 no GPU.
 */
#include <cuda_runtime_api.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "attn_check.h"
#include "bwd_check.h"
#include "precompile.h"
#include "runtime/flash_bwd.h"
#include "runtime/tune.h"

#define MAX_CANDIDATES 64

typedef struct problem_spec {
    attn_shape s;
    int layout;
} problem_spec;

static const problem_spec problems[] = {
    {{1, 1023, 1023, 2, 2, 64, 64, 0, 1, 0.0f}, ATTN_CONTIGUOUS},   /* fp16 causal */
    {{2, 300, 2049, 4, 1, 128, 128, 1, 0, 0.0f}, ATTN_CONTIGUOUS},  /* bf16, MQA */
    {{1, 777, 517, 2, 1, 256, 256, 0, 2, 0.0f}, ATTN_CONTIGUOUS},   /* fp16 causal top-left */
    {{1, 517, 777, 4, 2, 192, 128, 1, 1, 0.0f}, ATTN_CONTIGUOUS},   /* bf16, dqk != dv */
    {{2, 256, 256, 2, 2, 72, 72, 0, 0, 0.0f}, ATTN_CONTIGUOUS},     /* fp16 */
};
#define NPROBLEMS (sizeof problems / sizeof problems[0])

/* Few query rows over long keys, GQA: the rule splits them on any big GPU. */
static const problem_spec split_problems[] = {
    {{1, 1, 8191, 8, 2, 128, 128, 1, 0, 0.0f}, ATTN_CONTIGUOUS},   /* bf16 decode, packed heads */
    {{2, 3, 5000, 4, 4, 64, 64, 0, 1, 0.0f}, ATTN_CONTIGUOUS},     /* fp16 causal, 3 rows */
};
#define NSPLIT (sizeof split_problems / sizeof split_problems[0])

static const attn_shape bwd_problems[] = {
    {2, 300, 517, 4, 2, 128, 128, 1, 1, 0.0f}, /* bf16 causal, GQA */
    {1, 257, 257, 2, 1, 64, 64, 0, 0, 0.0f},   /* fp16, MQA */
    {1, 200, 300, 2, 2, 256, 256, 0, 2, 0.0f}, /* fp16 causal top-left */
    {1, 150, 220, 4, 1, 192, 128, 1, 0, 0.0f}, /* bf16, dqk != dv */
};
#define NBWD (sizeof bwd_problems / sizeof bwd_problems[0])

/* The split count of the last split-KV launch, from the DEBUG log line. */
static int last_splits = 1;

static void capture_log(void *user, int level, const char *msg)
{
    int n;
    (void)user, (void)level;
    if (sscanf(msg, "split-KV: %d splits", &n) == 1)
        last_splits = n;
}

typedef struct device_buffers {
    void *in, *o;
    float *lse;
} device_buffers;

static int cuda_failed(cudaError_t e, const char *what, char *why, size_t cap)
{
    if (e == cudaSuccess)
        return 0;
    snprintf(why, cap, "%s: %s", what, cudaGetErrorName(e));
    return 1;
}

static void fill_args(const attn_problem *p, const device_buffers *d, fajit_attn_args *a)
{
    const uint16_t *in = d->in;
    fajit_attn_args_init(a);
    a->q = in + p->q_off;
    a->k = in + p->k_off;
    a->v = in + p->v_off;
    a->o = d->o;
    a->lse = d->lse;
    a->batch = p->s.batch;
    a->seqlen_q = p->s.seqlen_q;
    a->seqlen_k = p->s.seqlen_k;
    a->nheads_q = p->s.nheads_q;
    a->nheads_kv = p->s.nheads_kv;
    a->dqk = p->s.dqk;
    a->dv = p->s.dv;
    a->dtype = p->s.dtype;
    a->mask = p->s.mask;
    if (p->layout != ATTN_CONTIGUOUS) {
        memcpy(a->q_stride, p->q_stride, sizeof a->q_stride);
        memcpy(a->k_stride, p->k_stride, sizeof a->k_stride);
        memcpy(a->v_stride, p->v_stride, sizeof a->v_stride);
        memcpy(a->o_stride, p->o_stride, sizeof a->o_stride);
    }
}

/* Poisons the outputs, launches, downloads and checks. */
static void launch_and_check(fajit_ctx *ctx, const attn_problem *p, const device_buffers *d,
                             uint16_t *o, float *lse, attn_result *r)
{
    const size_t lse_elems = (size_t)(p->s.batch * p->s.nheads_q * p->s.seqlen_q);
    fajit_attn_args a;
    int rc;
    memset(r, 0, sizeof *r);
    fill_args(p, d, &a);
    if (cuda_failed(cudaMemset(d->o, 0xff, p->o_elems * 2), "cudaMemset", r->why, sizeof r->why) ||
        cuda_failed(cudaMemset(d->lse, 0xff, lse_elems * 4), "cudaMemset", r->why, sizeof r->why))
        return;
    if ((rc = fajit_attn_fwd(ctx, &a, NULL)) != FAJIT_OK) {
        snprintf(r->why, sizeof r->why, "fajit_attn_fwd: %s: %s", fajit_strerror(rc),
                 fajit_last_error());
        return;
    }
    if (!cuda_failed(cudaDeviceSynchronize(), "kernel", r->why, sizeof r->why) &&
        !cuda_failed(cudaMemcpy(o, d->o, p->o_elems * 2, cudaMemcpyDeviceToHost), "cudaMemcpy",
                     r->why, sizeof r->why) &&
        !cuda_failed(cudaMemcpy(lse, d->lse, lse_elems * 4, cudaMemcpyDeviceToHost), "cudaMemcpy",
                     r->why, sizeof r->why))
        attn_check_fast(p, o, lse, r);
}

/* The variant fajit would launch for the problem, parsed. */
static int launched_variant(fajit_ctx *ctx, const attn_problem *p, const device_buffers *d,
                            fajit__variant *v, char *text, size_t cap)
{
    fajit_attn_args a;
    fill_args(p, d, &a);
    return fajit_attn_variant(ctx, &a, text, cap) < 0 || fajit__variant_parse(text, v) != 0;
}

/* Makes `c` (with split count `splits` under the rule's plan_splits and the
 * problem's few-rows class) the only tuning record of its key: the tuned
 * winner. */
static int make_winner(fajit_ctx *ctx, const fajit__gpu_identity *gpu, const fajit__variant *c,
                       int splits, int plan_splits, int few_rows, int64_t seqlen_k)
{
    uint8_t key[FAJIT__TUNING_KEY_MAX];
    fajit__tuning_value tv = {1000, 1, 1};
    const fajit__tune_choice choice = {*c, splits};
    size_t n = fajit__tuning_key(gpu, ctx->build_id, &choice, fajit__seqlen_bucket(seqlen_k),
                                 plan_splits, few_rows, 1, key, sizeof key);
    if (fajit_tuning_clear(ctx) != 0 || n > sizeof key ||
        fajit__store_tuning_put(ctx->store, key, n, &tv) != 0)
        return -1;
    fajit__tuned_forget();
    return 0;
}

/* Every (tile candidate, split count) of a forward problem made the winner
 * and checked; must_split: the rule has to split the problem. */
static size_t run_problem(fajit_ctx *ctx, const fajit__gpu_identity *gpu, const problem_spec *ps,
                          size_t index, int must_split, size_t *tried)
{
    attn_problem p;
    device_buffers d = {0};
    fajit__variant base, cands[MAX_CANDIDATES], got;
    char text[FAJIT__VARIANT_TEXT_MAX], why[256] = "";
    const char *specs[MAX_CANDIDATES];
    static char spec_text[MAX_CANDIDATES][FAJIT__VARIANT_TEXT_MAX];
    size_t failures = 0, n;
    const size_t lse_elems = (size_t)(ps->s.batch * ps->s.nheads_q * ps->s.seqlen_q);
    uint16_t *o = NULL;
    float *lse = NULL;

    if (attn_problem_init(&p, &ps->s, ps->layout, 0x70e0000u + index) != 0) {
        printf("FAIL problem %zu: cannot build it\n", index);
        return 1;
    }
    o = malloc(p.o_elems * 2);
    lse = malloc(lse_elems * 4);
    if (!o || !lse || cuda_failed(cudaMalloc(&d.in, p.in_elems * 2 + 2), "cudaMalloc", why, sizeof why) ||
        cuda_failed(cudaMalloc(&d.o, p.o_elems * 2), "cudaMalloc", why, sizeof why) ||
        cuda_failed(cudaMalloc((void **)&d.lse, lse_elems * 4), "cudaMalloc", why, sizeof why) ||
        cuda_failed(cudaMemcpy(d.in, p.in, p.in_elems * 2, cudaMemcpyHostToDevice), "cudaMemcpy",
                    why, sizeof why)) {
        printf("FAIL problem %zu: %s\n", index, why[0] ? why : "out of host memory");
        failures = 1;
        goto free_all;
    }
    fajit_tuning_clear(ctx);
    fajit__tuned_forget();
    if (launched_variant(ctx, &p, &d, &base, text, sizeof text) || base.op != FAJIT__OP_FWD) {
        printf("FAIL problem %zu: not the fast forward: %s (%s)\n", index, text, fajit_last_error());
        failures = 1;
        goto free_all;
    }
    n = fajit__tune_candidates(&base, cands, MAX_CANDIDATES);
    if (n == 0 || n > MAX_CANDIDATES) {
        printf("FAIL problem %zu: %zu candidates\n", index, n);
        failures = 1;
        goto free_all;
    }
    for (size_t i = 0; i < n; i++) {
        fajit__variant_format(&cands[i], spec_text[i], sizeof spec_text[i]);
        specs[i] = spec_text[i];
    }
    failures += precompile_variants(ctx, specs, n, (int)sysconf(_SC_NPROCESSORS_ONLN));
    const fajit__fwd_shape sh = {p.s.batch, p.s.seqlen_q, p.s.seqlen_k, p.s.nheads_q, p.s.nheads_kv};
    const int plan = fajit__plan_splits(&base, &sh, gpu->sm_count);
    fajit__variant untiled = base; /* the launch path's few-rows answer for the shape */
    untiled.bm = untiled.bn = untiled.warps = untiled.stages = FAJIT__UNSET;
    const int few_rows = fajit__heuristic_tiles_for(&untiled, &sh);
    if (must_split && plan == 0) {
        printf("FAIL problem %zu: the rule does not split it, so split counts are not tried\n", index);
        failures++;
    }
    for (size_t i = 0; i < n; i++) {
        int counts[8];
        const fajit__variant *c = &cands[i];
        const size_t nc = fajit__tune_split_counts(c, p.s.seqlen_k, plan, counts, 8);
        for (size_t k = 0; k < nc && k < 8; k++) {
            attn_result r;
            memset(&r, 0, sizeof r);
            last_splits = 1;
            if (make_winner(ctx, gpu, c, counts[k], plan, few_rows, p.s.seqlen_k) != 0)
                snprintf(r.why, sizeof r.why, "writing the record: %s", fajit_last_error());
            else if (launched_variant(ctx, &p, &d, &got, text, sizeof text) || got.bm != c->bm ||
                     got.bn != c->bn || got.warps != c->warps || got.stages != c->stages)
                snprintf(r.why, sizeof r.why, "the launch path did not take the record: %.200s",
                         strstr(text, " bm=") ? strstr(text, " bm=") : text);
            else
                launch_and_check(ctx, &p, &d, o, lse, &r);
            if (!r.why[0] && plan > 0 && last_splits != counts[k])
                snprintf(r.why, sizeof r.why, "launched with %d splits, the record says %d", last_splits,
                         counts[k]);
            ++*tried;
            const int failed = !r.ok || r.why[0];
            failures += (size_t)failed;
            printf("%s %s %-9s dqk=%-3lld dv=%-3lld sq=%-4lld sk=%-4lld %-10s bm=%-3d bn=%-3d warps=%d "
                   "stages=%d splits=%-2d/%-2d  err %.2e <= %.2e  lse %.1e%s%s\n",
                   failed ? "FAIL" : "ok  ", attn_dtype_name(p.s.dtype), attn_mask_name(p.s.mask),
                   (long long)p.s.dqk, (long long)p.s.dv, (long long)p.s.seqlen_q,
                   (long long)p.s.seqlen_k, attn_layout_name(p.layout), c->bm, c->bn, c->warps,
                   c->stages, counts[k], plan, r.max_err, r.tol, r.max_lse_rel_err,
                   failed ? "\n     " : "", r.why);
        }
    }
free_all:
    cudaFree(d.in);
    cudaFree(d.o);
    cudaFree(d.lse);
    free(o);
    free(lse);
    attn_problem_free(&p);
    return failures;
}

/* ---------------------------------------------------------------- backward */

typedef struct bwd_buffers {
    void *in, *o, *dout, *grads;
    float *lse;
} bwd_buffers;

static void fill_bwd_args(const attn_problem *p, const bwd_buffers *d, fajit_attn_bwd_args *a)
{
    const uint16_t *in = d->in;
    fajit_attn_bwd_args_init(a);
    a->q = in + p->q_off;
    a->k = in + p->k_off;
    a->v = in + p->v_off;
    a->o = d->o;
    a->grad_out = d->dout;
    a->lse = d->lse;
    a->grad_q = (uint16_t *)d->grads + p->q_off;
    a->grad_k = (uint16_t *)d->grads + p->k_off;
    a->grad_v = (uint16_t *)d->grads + p->v_off;
    a->batch = p->s.batch;
    a->seqlen_q = p->s.seqlen_q;
    a->seqlen_k = p->s.seqlen_k;
    a->nheads_q = p->s.nheads_q;
    a->nheads_kv = p->s.nheads_kv;
    a->dqk = p->s.dqk;
    a->dv = p->s.dv;
    a->dtype = p->s.dtype;
    a->mask = p->s.mask;
}

/* The forward (heuristic tiles: no record yet) into d->o and d->lse, and the
 * fp64 backward from what it wrote. */
static int bwd_prepare(fajit_ctx *ctx, const attn_problem *p, bwd_problem *bp, const bwd_buffers *d,
                       char *why, size_t cap)
{
    const size_t lse_elems = (size_t)(p->s.batch * p->s.nheads_q * p->s.seqlen_q);
    uint16_t *o = malloc(p->o_elems * 2 + 2);
    float *lse = malloc(lse_elems * 4 + 4);
    device_buffers fd = {d->in, d->o, d->lse};
    fajit_attn_args a;
    int rc = 1;
    fill_args(p, &fd, &a);
    if (!o || !lse)
        snprintf(why, cap, "out of host memory");
    else if (fajit_attn_fwd(ctx, &a, NULL) != FAJIT_OK)
        snprintf(why, cap, "fajit_attn_fwd: %s", fajit_last_error());
    else if (!cuda_failed(cudaDeviceSynchronize(), "forward", why, cap) &&
             !cuda_failed(cudaMemcpy(o, d->o, p->o_elems * 2, cudaMemcpyDeviceToHost), "cudaMemcpy", why, cap) &&
             !cuda_failed(cudaMemcpy(lse, d->lse, lse_elems * 4, cudaMemcpyDeviceToHost), "cudaMemcpy", why, cap)) {
        rc = bwd_reference(bp, o, lse);
        if (rc)
            snprintf(why, cap, "fp64 backward: out of memory");
    }
    free(o);
    free(lse);
    return rc;
}

/* The launch path's bwd variant for the problem, with the tiles the lookup
 * fajit_attn_bwd makes would give it. */
static fajit__variant bwd_lookup(fajit_ctx *ctx, const fajit__driver *drv, CUdevice dev, int arch,
                                 const fajit_attn_bwd_args *a)
{
    fajit__variant v[3];
    fajit__flash_bwd_variants(a, arch, v);
    fajit__launch_tiles(ctx, drv, dev, a->seqlen_k, 0, 0, &v[1], NULL);
    return v[1];
}

static void bwd_launch_and_check(fajit_ctx *ctx, const attn_problem *p, const bwd_problem *bp,
                                 const bwd_buffers *d, uint16_t *grads, bwd_result *r)
{
    fajit_attn_bwd_args a;
    int rc;
    fill_bwd_args(p, d, &a);
    if (cuda_failed(cudaMemset(d->grads, 0xff, p->in_elems * 2 + 2), "cudaMemset", r->why, sizeof r->why))
        return;
    if ((rc = fajit_attn_bwd(ctx, &a, NULL)) != FAJIT_OK) {
        snprintf(r->why, sizeof r->why, "fajit_attn_bwd: %s: %s", fajit_strerror(rc), fajit_last_error());
        return;
    }
    if (!cuda_failed(cudaDeviceSynchronize(), "backward", r->why, sizeof r->why) &&
        !cuda_failed(cudaMemcpy(grads, d->grads, p->in_elems * 2, cudaMemcpyDeviceToHost), "cudaMemcpy",
                     r->why, sizeof r->why))
        bwd_check_rule(bp, grads, BWD_RULE_FLASH, r);
}

/* Every bwd tile candidate made the winner: the lookup must return it, and
 * the gradients must pass. */
static size_t run_bwd_problem(fajit_ctx *ctx, const fajit__driver *drv, CUdevice dev,
                              const fajit__gpu_identity *gpu, const attn_shape *s, size_t index,
                              size_t *tried)
{
    attn_problem p;
    bwd_problem bp;
    bwd_buffers d = {0};
    fajit_attn_bwd_args a;
    fajit__variant base, cands[MAX_CANDIDATES];
    const char *specs[MAX_CANDIDATES];
    static char spec_text[MAX_CANDIDATES][FAJIT__VARIANT_TEXT_MAX];
    const size_t lse_elems = (size_t)(s->batch * s->nheads_q * s->seqlen_q);
    char why[256] = "";
    size_t failures = 0, n = 0;
    uint16_t *grads = NULL;

    if (attn_problem_init(&p, s, ATTN_CONTIGUOUS, 0xb0d0000u + index) != 0) {
        printf("FAIL bwd problem %zu: cannot build it\n", index);
        return 1;
    }
    if (bwd_problem_init(&bp, &p, 0xd0d0u + index) != 0) {
        printf("FAIL bwd problem %zu: out of memory\n", index);
        attn_problem_free(&p);
        return 1;
    }
    fajit_tuning_clear(ctx);
    fajit__tuned_forget();
    if (!(grads = malloc(p.in_elems * 2 + 2)) ||
        cuda_failed(cudaMalloc(&d.in, p.in_elems * 2 + 2), "cudaMalloc", why, sizeof why) ||
        cuda_failed(cudaMalloc(&d.grads, p.in_elems * 2 + 2), "cudaMalloc", why, sizeof why) ||
        cuda_failed(cudaMalloc(&d.o, p.o_elems * 2 + 2), "cudaMalloc", why, sizeof why) ||
        cuda_failed(cudaMalloc(&d.dout, p.o_elems * 2 + 2), "cudaMalloc", why, sizeof why) ||
        cuda_failed(cudaMalloc((void **)&d.lse, lse_elems * 4 + 4), "cudaMalloc", why, sizeof why) ||
        cuda_failed(cudaMemcpy(d.in, p.in, p.in_elems * 2, cudaMemcpyHostToDevice), "cudaMemcpy", why, sizeof why) ||
        cuda_failed(cudaMemcpy(d.dout, bp.grad_out, p.o_elems * 2, cudaMemcpyHostToDevice), "cudaMemcpy", why,
                    sizeof why) ||
        bwd_prepare(ctx, &p, &bp, &d, why, sizeof why)) {
        printf("FAIL bwd problem %zu: %s\n", index, why[0] ? why : "out of host memory");
        failures = 1;
        goto free_all;
    }
    fill_bwd_args(&p, &d, &a);
    base = bwd_lookup(ctx, drv, dev, gpu->arch, &a);
    n = fajit__tune_candidates(&base, cands, MAX_CANDIDATES);
    if (n == 0 || n > MAX_CANDIDATES) {
        printf("FAIL bwd problem %zu: %zu candidates\n", index, n);
        failures = 1;
        goto free_all;
    }
    for (size_t i = 0; i < n; i++) {
        fajit__variant_format(&cands[i], spec_text[i], sizeof spec_text[i]);
        specs[i] = spec_text[i];
    }
    failures += precompile_variants(ctx, specs, n, (int)sysconf(_SC_NPROCESSORS_ONLN));
    for (size_t i = 0; i < n; i++) {
        bwd_result r;
        const fajit__variant *c = &cands[i];
        fajit__variant got;
        memset(&r, 0, sizeof r);
        if (make_winner(ctx, gpu, c, 0, 0, 0, s->seqlen_k) != 0)
            snprintf(r.why, sizeof r.why, "writing the record: %s", fajit_last_error());
        else if ((got = bwd_lookup(ctx, drv, dev, gpu->arch, &a)), memcmp(&got, c, sizeof got) != 0)
            snprintf(r.why, sizeof r.why, "the launch path did not take the record (bm=%d bn=%d warps=%d "
                     "stages=%d)", got.bm, got.bn, got.warps, got.stages);
        else
            bwd_launch_and_check(ctx, &p, &bp, &d, grads, &r);
        ++*tried;
        const int failed = !r.ok || r.why[0];
        failures += (size_t)failed;
        printf("%s bwd %s %-9s dqk=%-3lld dv=%-3lld sq=%-4lld sk=%-4lld bm=%-3d bn=%-3d warps=%d stages=%d  "
               "err/tol dq %.1e/%.1e dk %.1e/%.1e dv %.1e/%.1e%s%s\n",
               failed ? "FAIL" : "ok  ", attn_dtype_name(s->dtype), attn_mask_name(s->mask), (long long)s->dqk,
               (long long)s->dv, (long long)s->seqlen_q, (long long)s->seqlen_k, c->bm, c->bn, c->warps,
               c->stages, r.max_err[0], r.tol[0], r.max_err[1], r.tol[1], r.max_err[2], r.tol[2],
               failed ? "\n     " : "", r.why);
    }
free_all:
    cudaFree(d.in);
    cudaFree(d.grads);
    cudaFree(d.o);
    cudaFree(d.dout);
    cudaFree(d.lse);
    free(grads);
    bwd_problem_free(&bp);
    attn_problem_free(&p);
    return failures;
}

/* 0 if a usable GPU is present, else 77 after printing the reason. */
static int require_gpu(void)
{
    int count = 0;
    const cudaError_t e = cudaGetDeviceCount(&count);
    if (e != cudaSuccess || count == 0) {
        printf("SKIP: no CUDA GPU (%s)\n",
               e != cudaSuccess ? cudaGetErrorString(e) : "cudaGetDeviceCount returned 0");
        return 77;
    }
    return 0;
}

int main(void)
{
    const fajit__driver *drv;
    fajit__gpu_identity gpu;
    fajit_options o;
    fajit_ctx *ctx = NULL;
    CUdevice dev;
    size_t failures = 0, tried = 0;
    int rc = require_gpu();
    if (rc)
        return rc;
    fajit_options_init(&o);
    o.cache_mode = FAJIT_CACHE_READWRITE; /* records need a writable store */
    o.log_level = FAJIT_LOG_DEBUG;         /* the split-KV launches say their split count */
    o.log_fn = capture_log;
    if ((rc = fajit_create(&ctx, &o)) != FAJIT_OK || !ctx->store) {
        printf("FAIL fajit_create: %s: %s\n", fajit_strerror(rc), fajit_last_error());
        return 1;
    }
    if (fajit__driver_get(&drv) != 0 || drv->deviceGet(&dev, ctx->device) != CUDA_SUCCESS ||
        fajit__gpu_identity_get(drv, dev, &gpu) != 0) {
        printf("FAIL GPU identity: %s\n", fajit_last_error());
        fajit_destroy(ctx);
        return 1;
    }
    printf("GPU %s, sm_%d, %d SMs\n", gpu.name, gpu.arch, gpu.sm_count);
    if (gpu.arch < 80) {
        printf("SKIP: fajit needs sm_80 or newer\n");
        fajit_destroy(ctx);
        return 77;
    }
    for (size_t i = 0; i < NPROBLEMS; i++)
        failures += run_problem(ctx, &gpu, &problems[i], i, 0, &tried);
    for (size_t i = 0; i < NSPLIT; i++)
        failures += run_problem(ctx, &gpu, &split_problems[i], NPROBLEMS + i, 1, &tried);
    for (size_t i = 0; i < NBWD; i++)
        failures += run_bwd_problem(ctx, drv, dev, &gpu, &bwd_problems[i], i, &tried);
    fajit_tuning_clear(ctx);
    fajit_destroy(ctx);
    printf("test_tuned_gpu: %zu problems, %zu candidates launched as the tuned choice, %zu failed\n",
           NPROBLEMS + NSPLIT + NBWD, tried, failures);
    return failures || tried == 0 ? 1 : 0;
}
