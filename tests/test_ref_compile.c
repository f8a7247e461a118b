/*
 * tests/test_ref_compile.c - the reference template compiles with NVRTC, no GPU
 * needed.
 *
 * Renders op=ref variants with the codegen layer's fajit__render and compiles
 * each with NVRTC exactly as the runtime does (-std=c++17, the variant's arch,
 * no include path), plus --ptxas-options=-v to read the resources:
 *   - sm_90: every head dim of the grid x {fp16, bf16} x {none, causal,
 *     causal-tl} x both tile configurations (bm 4 bn 32 warps 4, bm 8 bn 64
 *     warps 8);
 *   - sm_80: a subset (to keep the run short on 2 cores).
 * Every compile must succeed, yield a cubin, keep static shared memory within
 * 48 KB, and warn about nothing in the templates. Spills are printed, not
 * required to be 0. A variant asking for a feature the reference lacks
 * (paged KV) must be refused at compile time, not compiled into a wrong kernel.
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

#define COMPILE_THREADS 2
#define MAX_STATIC_SMEM (48 * 1024)

typedef struct job {
    fajit__variant v;
    int expect_refusal; /* 1: the compile must fail (unsupported feature) */
    /* results */
    int ok;
    char why[512];
    compile_check c;
} job;

static double now_ms(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec * 1e3 + ts.tv_nsec / 1e6;
}

/* ---------------------------------------------------------------- variants */

static fajit__variant ref_variant(int dqk, int dv, int dtype, int mask, int tiles, int arch) {
    static const int tile_configs[2][3] = {{4, 32, 4}, {8, 64, 8}}; /* bm, bn, warps */
    fajit__variant v;
    fajit__variant_defaults(&v);
    v.op = FAJIT__OP_REF;
    v.dqk = dqk;
    v.dv = dv;
    v.dtype = dtype;
    v.mask = mask;
    v.bm = tile_configs[tiles][0];
    v.bn = tile_configs[tiles][1];
    v.warps = tile_configs[tiles][2];
    v.stages = 1;
    v.arch = arch;
    v.arch_suffix = 0;
    return v;
}

static const int head_dims[][2] = {{1, 1},     {7, 7},     {8, 8},     {24, 24},   {59, 59},
                                   {64, 64},   {72, 72},   {100, 100}, {128, 128}, {192, 128},
                                   {256, 256}, {320, 320}, {512, 512}};
#define N_HEAD_DIMS (sizeof head_dims / sizeof head_dims[0])

/* sm_90: the full grid in both tile configs; sm_80: a few head dims, all
 * dtypes and masks, the tile configs alternating. */
static size_t build_jobs(job *jobs, size_t cap) {
    static const int sm80_dims[] = {0, 6, 9, 12}; /* indices: 1, 72, 192/128, 512 */
    size_t n = 0;
    for (size_t d = 0; d < N_HEAD_DIMS; ++d)
        for (int dtype = 0; dtype < 2; ++dtype)
            for (int mask = 0; mask < 3; ++mask)
                for (int tiles = 0; tiles < 2; ++tiles)
                    if (n < cap)
                        jobs[n++].v = ref_variant(head_dims[d][0], head_dims[d][1], dtype, mask, tiles, 90);
    for (size_t i = 0; i < sizeof sm80_dims / sizeof sm80_dims[0]; ++i)
        for (int dtype = 0; dtype < 2; ++dtype)
            for (int mask = 0; mask < 3; ++mask) {
                const int *dims = head_dims[sm80_dims[i]];
                if (n < cap)
                    jobs[n++].v = ref_variant(dims[0], dims[1], dtype, mask, (mask + dtype) % 2, 80);
            }
    if (n < cap) { /* the reference has no paged KV: it must refuse, not ignore it */
        jobs[n].v = ref_variant(64, 64, 0, 0, 0, 90);
        jobs[n].v.paged = 1;
        jobs[n++].expect_refusal = 1;
    }
    return n;
}

/* ---------------------------------------------------------------- the compile log */

static void run_job(job *j) {
    const char *entry = fajit__variant_entry_name(&j->v);
    const int compiled = compile_check_run(&j->v, &j->c) == 0;
    snprintf(j->why, sizeof j->why, "%s", j->c.why);
    if (compiled && (!entry || strcmp(entry, "fajit_ref_fwd") != 0)) {
        snprintf(j->why, sizeof j->why, "entry name %s, want fajit_ref_fwd", entry ? entry : "?");
        return;
    }
    if (j->expect_refusal) {
        j->ok = !compiled && strstr(j->why, "not implemented") != NULL;
        if (compiled)
            snprintf(j->why, sizeof j->why, "compiled, but the reference has no paged KV");
        return;
    }
    if (!compiled)
        return;
    if (j->c.smem < 0 || j->c.smem > MAX_STATIC_SMEM || j->c.registers <= 0)
        snprintf(j->why, sizeof j->why, "resources unreadable or smem %d > %d", j->c.smem,
                 MAX_STATIC_SMEM);
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
        printf("%s refused as it must: %s\n  (%.120s)\n", j->ok ? "ok  " : "FAIL", text, j->why);
    else if (j->ok)
        printf("ok   %7.1f ms  regs %3d  smem %5d  spill %d  cubin %6zu  %s\n", j->c.ms,
               j->c.registers, j->c.smem, j->c.spills, j->c.cubin_bytes, text);
    else
        printf("FAIL %s\n  %s\n", text, j->why);
}

int main(void) {
    int major = 0, minor = 0;
    nvrtcVersion(&major, &minor);
    printf("NVRTC %d.%d, %d threads\n", major, minor, COMPILE_THREADS);

    static job jobs[256];
    pool p = {.jobs = jobs, .n = build_jobs(jobs, sizeof jobs / sizeof jobs[0]), .next = 0};
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
