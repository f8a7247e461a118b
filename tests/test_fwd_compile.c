/*
 * tests/test_fwd_compile.c - the fast forward template (flash_fwd.cuh) compiles
 * with NVRTC for the tiles the runtime heuristic picks, no GPU needed.
 *
 * Renders op=fwd variants with fajit__render, tiles from fajit__heuristic_tiles
 * (the runtime's choice for that arch), and compiles each with NVRTC as the
 * runtime does (fajit__compile_variant, through tests/compile_check.c):
 *   - sm_90: every head dim 8..256 in steps of 8 (dtype and mask rotating),
 *     192/128 and 128/64, and every dtype x mask for 64, 72, 128 and 256;
 *   - sm_80: a subset (2 cores, CI time);
 *   - features (softcap, ALiBi, varlen, dropout, and all of them, also with a window) on
 *     head dims 64, 72, 96, 128, 192/128, 256, sm_80 and sm_90.
 *   - decode's few-rows tile (fajit__heuristic_tiles_for, seqlen_q 1, 32/8 heads)
 *     on head dims 64..128, sm_80 and sm_90, with a mask, a window and varlen, and sm_86;
 * With --odd (ctest test_fwd_compile_odd), head dims that are not multiples of
 * 8 instead, whose loads are narrower (templates/flash_fwd.cuh, "Loads"):
 *   - dqk = dv in {1, 8, 24, 40, 59, 72, 100, 111, 200} and (59, 100), (100, 72),
 *     (6, 2), on sm_80 and sm_90, dtype and mask rotating;
 *   - every feature together on 59, 100 and 111.
 * Every compile must succeed with no spills and no template warnings, and the
 * dynamic shared memory the variant declares (fajit__variant_smem_bytes) must
 * fit the arch's opt-in limit. Variants the template cannot serve (paged KV,
 * a head dim above 256) must be refused at compile time with the reason.
 */
#include <nvrtc.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "codegen/variant.h"
#include "compile_check.h"
#include "fajit.h"
#include "runtime/error.h"
#include "runtime/runtime.h"
#include "runtime/tune.h"

#define COMPILE_THREADS 2

typedef struct job {
    fajit__variant v;
    const char *expect_refusal; /* NULL, or a phrase the compile error must contain */
    /* results */
    int ok;
    char why[512];
    compile_check c;
    size_t dyn_smem;
} job;

static double now_ms(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec * 1e3 + ts.tv_nsec / 1e6;
}

/* ---------------------------------------------------------------- variants */

static size_t smem_limit(int arch) {
    return arch == 90 ? 227 * 1024 : arch == 80 ? 163 * 1024 : 99 * 1024;
}

/* An op=fwd variant with these fields and every tile unset. */
static fajit__variant untiled(int dqk, int dv, int dtype, int mask, int arch) {
    fajit__variant v;
    fajit__variant_defaults(&v);
    v.op = FAJIT__OP_FWD;
    v.dqk = dqk;
    v.dv = dv;
    v.dtype = dtype;
    v.mask = mask;
    v.arch = arch;
    v.arch_suffix = 0;
    return v;
}

static fajit__variant fwd_variant(int dqk, int dv, int dtype, int mask, int arch) {
    fajit__variant v = untiled(dqk, dv, dtype, mask, arch);
    fajit__heuristic_tiles(&v);
    return v;
}

/* What fajit_attn_fwd launches for a decode step (seqlen_q 1, 32 query / 8
 * kv heads, 64k keys): the few-rows rule's tile (runtime/heuristic.c), with
 * a left window of `window` keys (-1: none) and varlen as asked. */
static fajit__variant decode_variant(int d, int dtype, int mask, int arch, int window, int varlen) {
    const fajit__fwd_shape decode = {1, 1, 65536, 32, 8};
    fajit__variant v = untiled(d, d, dtype, mask, arch);
    v.window_left = window;
    v.varlen = varlen;
    fajit__heuristic_tiles_for(&v, &decode);
    return v;
}

/* Features: bits of FEAT_* set the variant's fields of the same name. */
enum { FEAT_SOFTCAP = 1, FEAT_ALIBI = 2, FEAT_VARLEN = 4, FEAT_DROPOUT = 8 };

static fajit__variant feature_variant(int dqk, int dv, int dtype, int mask, int arch, int feats) {
    fajit__variant v = untiled(dqk, dv, dtype, mask, arch);
    v.softcap = (feats & FEAT_SOFTCAP) != 0;
    v.alibi = (feats & FEAT_ALIBI) != 0;
    v.varlen = (feats & FEAT_VARLEN) != 0;
    v.dropout = (feats & FEAT_DROPOUT) != 0;
    fajit__heuristic_tiles(&v); /* after the features: they may change the tiles */
    return v;
}

static size_t add(job *jobs, size_t n, size_t cap, fajit__variant v) {
    if (n < cap) {
        memset(&jobs[n], 0, sizeof jobs[n]);
        jobs[n].v = v;
        return n + 1;
    }
    return n;
}

static size_t build_jobs(job *jobs, size_t cap) {
    static const int full[] = {64, 72, 128, 256};
    static const int sm80[][2] = {{8, 8}, {72, 72}, {128, 128}, {192, 128}, {256, 256}};
    size_t n = 0;
    for (int d = 8; d <= 256; d += 8)
        n = add(jobs, n, cap, fwd_variant(d, d, (d / 8) % 2, (d / 16) % 3, 90));
    n = add(jobs, n, cap, fwd_variant(192, 128, 1, 1, 90));
    n = add(jobs, n, cap, fwd_variant(128, 64, 0, 2, 90));
    for (size_t i = 0; i < sizeof full / sizeof full[0]; ++i)
        for (int dtype = 0; dtype < 2; ++dtype)
            for (int mask = 0; mask < 3; ++mask)
                if (!(dtype == (full[i] / 8) % 2 && mask == (full[i] / 16) % 3))
                    n = add(jobs, n, cap, fwd_variant(full[i], full[i], dtype, mask, 90));
    for (size_t i = 0; i < sizeof sm80 / sizeof sm80[0]; ++i)
        n = add(jobs, n, cap, fwd_variant(sm80[i][0], sm80[i][1], (int)i % 2, (int)i % 3, 80));
    n = add(jobs, n, cap, fwd_variant(128, 128, 1, 1, 86));
    /* d 160's two-tiles-a-warp tile (4 warps, bn 32; one stage unmasked, two
     * masked) sits at the register file's edge: every mask and both dtypes
     * on the archs whose rules differ (the d 160 of the loop above is
     * fp16 causal on sm_90). */
    for (int mask = 0; mask < 3; ++mask)
        for (int a = 0; a < 3; ++a)
            if (!(mask == 1 && a == 2))
                n = add(jobs, n, cap, fwd_variant(160, 160, (mask + a) % 2, mask, a == 0 ? 80 : a == 1 ? 86 : 90));
    /* Decode's few-rows tile (8 warps, bn 128 where it fits) over the head
     * dims it covers, sm_80 and sm_90, with a mask, a window and varlen on
     * d 128, and sm_86's narrower keys. */
    static const int decode_dims[] = {64, 72, 96, 112, 128};
    for (size_t i = 0; i < sizeof decode_dims / sizeof decode_dims[0]; ++i)
        for (int a = 0; a < 2; ++a)
            n = add(jobs, n, cap, decode_variant(decode_dims[i], 1 - (int)(i + (size_t)a) % 2,
                                                 (int)(i + (size_t)a) % 2, a ? 90 : 80, -1, 0));
    n = add(jobs, n, cap, decode_variant(128, 1, 1, 90, -1, 1));
    n = add(jobs, n, cap, decode_variant(128, 1, 0, 80, 4096, 0));
    n = add(jobs, n, cap, decode_variant(128, 1, 0, 90, 4096, 1));
    n = add(jobs, n, cap, decode_variant(128, 1, 0, 86, -1, 0));
    /* Every feature alone and all together, over head dims that stress the
     * registers (64, 128 and 256 sit near the 255 limit) and both archs. */
    static const int feat_dims[][2] = {{64, 64}, {72, 72}, {128, 128}, {192, 128}, {256, 256}};
    static const int feat_sets[] = {FEAT_SOFTCAP, FEAT_ALIBI, FEAT_VARLEN, FEAT_DROPOUT,
                                    FEAT_SOFTCAP | FEAT_ALIBI | FEAT_VARLEN | FEAT_DROPOUT};
    enum { NDIMS = sizeof feat_dims / sizeof feat_dims[0], NSETS = sizeof feat_sets / sizeof feat_sets[0] };
    for (size_t i = 0; i < NDIMS; ++i)
        for (size_t f = 0; f < NSETS; ++f)
            if (f == NSETS - 1 || (i + f) % 2 == 0) /* CI time: all together everywhere, alone on some */
                n = add(jobs, n, cap, feature_variant(feat_dims[i][0], feat_dims[i][1], (int)(i + f) % 2,
                                                      (int)(i + f) % 3, (i + f) % 4 < 2 ? 80 : 90, feat_sets[f]));
    n = add(jobs, n, cap, feature_variant(96, 96, 1, 1, 90, FEAT_DROPOUT));
    n = add(jobs, n, cap, feature_variant(72, 72, 0, 1, 80, FEAT_DROPOUT));
    if (n < cap) { /* a window on top of every feature */
        n = add(jobs, n, cap,
                feature_variant(64, 64, 0, 0, 80, FEAT_SOFTCAP | FEAT_ALIBI | FEAT_VARLEN | FEAT_DROPOUT));
        jobs[n - 1].v.window_left = 100;
        jobs[n - 1].v.window_right = 7;
    }
    if (n + 2 <= cap) { /* what the template cannot do must not compile */
        n = add(jobs, n, cap, fwd_variant(64, 64, 0, 0, 90));
        jobs[n - 1].v.paged = 1;
        jobs[n - 1].expect_refusal = "not implemented";
        n = add(jobs, n, cap, fwd_variant(64, 64, 0, 0, 90));
        jobs[n - 1].v.dqk = 264;
        jobs[n - 1].expect_refusal = "dqk must be in 1..256";
    }
    return n;
}

/* Head dims that are not multiples of 8 (and 8, 24, 40, 72, 200 beside them,
 * the widths' neighbours): each on sm_80 and sm_90. */
static size_t build_odd_jobs(job *jobs, size_t cap) {
    static const int dims[][2] = {{1, 1},   {8, 8},     {24, 24},   {40, 40},  {59, 59},  {72, 72},
                                  {100, 100}, {111, 111}, {200, 200}, {59, 100}, {100, 72}, {6, 2}};
    enum { NDIMS = sizeof dims / sizeof dims[0] };
    size_t n = 0;
    for (size_t i = 0; i < NDIMS; ++i)
        for (int a = 0; a < 2; ++a)
            n = add(jobs, n, cap, fwd_variant(dims[i][0], dims[i][1], (int)(i + (size_t)a) % 2,
                                              (int)(i + 2 * (size_t)a) % 3, a ? 90 : 80));
    static const int feat_dims[][2] = {{59, 59}, {100, 100}, {111, 111}};
    for (size_t i = 0; i < 3; ++i)
        n = add(jobs, n, cap, feature_variant(feat_dims[i][0], feat_dims[i][1], (int)i % 2, (int)i % 3,
                                              i == 1 ? 80 : 90,
                                              FEAT_SOFTCAP | FEAT_ALIBI | FEAT_VARLEN | FEAT_DROPOUT));
    return n;
}

/* ---------------------------------------------------------------- one compile */

static void run_job(job *j) {
    const char *entry = fajit__variant_entry_name(&j->v);
    j->dyn_smem = fajit__variant_smem_bytes(&j->v);
    const int compiled = compile_check_run(&j->v, &j->c) == 0;
    snprintf(j->why, sizeof j->why, "%s", j->c.why);
    if (compiled && (!entry || strcmp(entry, "fajit_flash_fwd") != 0)) {
        snprintf(j->why, sizeof j->why, "entry name %s, want fajit_flash_fwd", entry ? entry : "?");
        return;
    }
    if (j->expect_refusal) {
        j->ok = !compiled && strstr(j->why, j->expect_refusal) != NULL;
        if (compiled)
            snprintf(j->why, sizeof j->why, "compiled, but the template cannot serve it");
        return;
    }
    if (!compiled)
        return;
    if (j->c.registers <= 0)
        snprintf(j->why, sizeof j->why, "ptxas report unreadable");
    else if (j->c.spills > 0)
        snprintf(j->why, sizeof j->why, "spills: %d bytes (stores + loads)", j->c.spills);
    else if (j->dyn_smem == 0 || j->dyn_smem > smem_limit(j->v.arch))
        snprintf(j->why, sizeof j->why, "dynamic smem %zu outside 1..%zu", j->dyn_smem, smem_limit(j->v.arch));
    else if (j->c.template_warnings > 0)
        snprintf(j->why, sizeof j->why, "%d warnings in the templates", j->c.template_warnings);
    else
        j->ok = 1;
}

/* ---------------------------------------------------------------- threads */

typedef struct pool {
    job *jobs;
    size_t n, next;
    pthread_mutex_t lock;
} pool;

static void *worker(void *arg) {
    pool *p = arg;
    for (;;) {
        pthread_mutex_lock(&p->lock);
        const size_t i = p->next++;
        pthread_mutex_unlock(&p->lock);
        if (i >= p->n)
            return NULL;
        run_job(&p->jobs[i]);
    }
}

static void print_job(const job *j) {
    char text[FAJIT__VARIANT_TEXT_MAX];
    if (fajit__variant_format(&j->v, text, sizeof text) < 0)
        snprintf(text, sizeof text, "(unformattable variant)");
    if (j->expect_refusal)
        printf("%s refused as it must: %s\n  (%.160s)\n", j->ok ? "ok  " : "FAIL", text, j->why);
    else if (j->ok)
        printf("ok   %7.1f ms  regs %3d  dyn smem %6zu  spill %d  cubin %6zu  %s\n", j->c.ms,
               j->c.registers, j->dyn_smem, j->c.spills, j->c.cubin_bytes, text);
    else
        printf("FAIL %s\n  %s\n", text, j->why);
}

int main(int argc, char **argv) {
    int major = 0, minor = 0;
    int odd = 0, part = 0, parts = 1;
    const char *part_env = getenv("FAJIT_TEST_PART"); /* K/N, as --part */
    if (part_env && !(sscanf(part_env, "%d/%d", &part, &parts) == 2 && parts >= 1 && part >= 0 &&
                      part < parts)) {
        printf("FAJIT_TEST_PART=%s: expected K/N with 0 <= K < N\n", part_env);
        return 2;
    }
    for (int i = 1; i < argc; ++i) {
        if (strcmp(argv[i], "--odd") == 0)
            odd = 1;
        else if (!(strcmp(argv[i], "--part") == 0 && i + 1 < argc &&
                   sscanf(argv[++i], "%d/%d", &part, &parts) == 2 && parts >= 1 && part >= 0 &&
                   part < parts)) {
            printf("usage: test_fwd_compile [--odd] [--part K/N]  (bad argument: %s)\n", argv[i]);
            return 2;
        }
    }
    nvrtcVersion(&major, &minor);
    printf("NVRTC %d.%d, %d threads%s, part %d of %d\n", major, minor, COMPILE_THREADS,
           odd ? ", odd head dims" : "", part + 1, parts);

    static job jobs[160];
    const size_t cap = sizeof jobs / sizeof jobs[0];
    size_t all = odd ? build_odd_jobs(jobs, cap) : build_jobs(jobs, cap), n = 0;
    /* Every N-th job from the K-th: each part a CTest test of its own, so
     * each stays well under a minute on two cores. */
    for (size_t i = (size_t)part; i < all; i += (size_t)parts)
        jobs[n++] = jobs[i];
    pool p = {.jobs = jobs, .n = n, .next = 0};
    pthread_mutex_init(&p.lock, NULL);
    const double t0 = now_ms();
    pthread_t threads[COMPILE_THREADS];
    for (int t = 0; t < COMPILE_THREADS; ++t)
        pthread_create(&threads[t], NULL, worker, &p);
    for (int t = 0; t < COMPILE_THREADS; ++t)
        pthread_join(threads[t], NULL);
    const double wall = now_ms() - t0;
    pthread_mutex_destroy(&p.lock);

    size_t failures = 0, spilling = 0;
    double total_ms = 0.0;
    for (size_t i = 0; i < p.n; ++i) {
        print_job(&jobs[i]);
        failures += !jobs[i].ok;
        spilling += jobs[i].ok && jobs[i].c.spills > 0;
        total_ms += jobs[i].c.ms;
    }
    printf("%zu variants, %zu failed, %zu with spills; compile %.0f ms in all (%.0f ms mean), wall %.0f ms\n",
           p.n, failures, spilling, total_ms, total_ms / (double)p.n, wall);
    return failures ? 1 : 0;
}
