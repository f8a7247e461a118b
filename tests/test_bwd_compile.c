/*
 * tests/test_bwd_compile.c - the reference backward template compiles with
 * NVRTC, no GPU needed.
 *
 * Renders op ref-dq and ref-dkdv variants with the codegen layer's
 * fajit__render and compiles each as the runtime does (-std=c++17, the
 * variant's arch, no include path), plus --ptxas-options=-v to read the
 * resources of the op's own kernel:
 *   - sm_90: head dims {1, 8, 59, 64, 72, 100, 128, 192/128, 256, 512} x
 *     {none, causal, causal-tl} x both ops, the dtype alternating so that
 *     every head dim and every mask meets both, tiles of the runtime's
 *     heuristic (bm 4 bn 32 warps 4) with one wider config;
 *   - sm_80: the same head dims and ops, dtype and mask varying along;
 *   - the features, for sm_80 and sm_90 and both ops: sliding windows (with
 *     no mask, causal and causal-tl), softcap, ALiBi, dropout, varlen, each
 *     alone, then all at once, also at head dims 1, 100, 192/128 and 512.
 * Every compile must succeed, yield a cubin defining the op's entry, keep
 * static shared memory within 48 KB, and warn about nothing in the templates.
 * Spills are printed, not required to be 0. A variant asking for a feature the
 * reference lacks (paged KV) must be refused at compile time.
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
#define MAX_JOBS 256

typedef struct job {
    fajit__variant v;
    int expect_refusal; /* 1: the compile must fail (unsupported feature) */
    /* results */
    int ok;
    char why[512];
    compile_check c;
} job;

static double now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec * 1e3 + ts.tv_nsec / 1e6;
}

/* ---------------------------------------------------------------- variants */

static fajit__variant bwd_variant(int op, int dqk, int dv, int dtype, int mask, int wide, int arch)
{
    fajit__variant v;
    fajit__variant_defaults(&v);
    v.op = op;
    v.dqk = dqk;
    v.dv = dv;
    v.dtype = dtype;
    v.mask = mask;
    v.bm = wide ? 8 : 4;
    v.bn = wide ? 64 : 32;
    v.warps = wide ? 8 : 4;
    v.stages = 1;
    v.arch = arch;
    v.arch_suffix = 0;
    return v;
}

static const int head_dims[][2] = {{1, 1},     {8, 8},     {59, 59},   {64, 64},   {72, 72},
                                   {100, 100}, {128, 128}, {192, 128}, {256, 256}, {512, 512}};
#define N_HEAD_DIMS (sizeof head_dims / sizeof head_dims[0])
static const int ops[] = {FAJIT__OP_REF_DQ, FAJIT__OP_REF_DKDV};

enum { F_WINDOW = 1, F_SOFTCAP = 2, F_ALIBI = 4, F_DROPOUT = 8, F_VARLEN = 16 };
#define F_ALL (F_WINDOW | F_SOFTCAP | F_ALIBI | F_DROPOUT | F_VARLEN)

/* A variant with the given features on; the window is (left, right). */
static fajit__variant feature_variant(int op, int dqk, int dv, int dtype, int mask, int features,
                                      int left, int right, int arch)
{
    fajit__variant v = bwd_variant(op, dqk, dv, dtype, mask, 0, arch);
    if (features & F_WINDOW)
        v.window_left = left, v.window_right = right;
    v.softcap = (features & F_SOFTCAP) != 0;
    v.alibi = (features & F_ALIBI) != 0;
    v.dropout = (features & F_DROPOUT) != 0;
    v.varlen = (features & F_VARLEN) != 0;
    return v;
}

static void add_job(job *jobs, size_t *n, size_t cap, fajit__variant v, int expect_refusal)
{
    if (*n >= cap)
        return;
    memset(&jobs[*n], 0, sizeof jobs[*n]);
    jobs[*n].v = v;
    jobs[*n].expect_refusal = expect_refusal;
    ++*n;
}

/* Each feature alone, then all at once, for one op and arch. */
static void add_features(job *jobs, size_t *n, size_t cap, int op, int arch)
{
    static const struct {
        int mask, features, left, right;
    } alone[] = {
        {0, F_WINDOW, 16, 7}, {1, F_WINDOW, 5, -1}, {2, F_WINDOW, 3, 2},
        {0, F_SOFTCAP, -1, -1}, {1, F_ALIBI, -1, -1}, {2, F_DROPOUT, -1, -1},
        {1, F_VARLEN, -1, -1}, {1, F_ALL, 40, -1},
    };
    for (size_t k = 0; k < sizeof alone / sizeof alone[0]; ++k)
        add_job(jobs, n, cap,
                feature_variant(op, 64, 64, (int)(k % 2), alone[k].mask, alone[k].features,
                                alone[k].left, alone[k].right, arch),
                0);
}

/* sm_90: every head dim x mask, the dtype alternating, the wide tiles for one
 * mask in three; sm_80: every head dim and op, with dtype and mask rotating;
 * then the features on both. */
static size_t build_jobs(job *jobs, size_t cap)
{
    static const int all_dims[][2] = {{1, 1}, {100, 100}, {192, 128}, {512, 512}};
    size_t n = 0;
    for (size_t d = 0; d < N_HEAD_DIMS; ++d)
        for (int mask = 0; mask < 3; ++mask)
            for (int o = 0; o < 2; ++o)
                add_job(jobs, &n, cap,
                        bwd_variant(ops[o], head_dims[d][0], head_dims[d][1],
                                    (int)(d + (size_t)mask + (size_t)o) % 2, mask,
                                    (int)(d + (size_t)mask) % 3 == 0, 90),
                        0);
    for (size_t d = 0; d < N_HEAD_DIMS; ++d)
        for (int o = 0; o < 2; ++o)
            add_job(jobs, &n, cap,
                    bwd_variant(ops[o], head_dims[d][0], head_dims[d][1], (int)(d % 2),
                                (int)(d + (size_t)o) % 3, 0, 80),
                    0);
    for (int o = 0; o < 2; ++o) {
        add_features(jobs, &n, cap, ops[o], 90);
        add_features(jobs, &n, cap, ops[o], 80);
        for (size_t d = 0; d < sizeof all_dims / sizeof all_dims[0]; ++d)
            add_job(jobs, &n, cap,
                    feature_variant(ops[o], all_dims[d][0], all_dims[d][1], (int)(d % 2),
                                    (int)(d % 3), F_ALL, 30, 10, d % 2 ? 80 : 90),
                    0);
    }
    for (int o = 0; o < 2; ++o) { /* no paged KV in the reference: refuse, not ignore */
        fajit__variant v = bwd_variant(ops[o], 64, 64, 0, 0, 0, 90);
        v.paged = 1;
        add_job(jobs, &n, cap, v, 1);
    }
    return n;
}

/* ---------------------------------------------------------------- one compile */

static const char *expected_entry(int op)
{
    return op == FAJIT__OP_REF_DQ ? "fajit_ref_bwd_dq" : "fajit_ref_bwd_dkdv";
}

static void run_job(job *j)
{
    const char *entry = fajit__variant_entry_name(&j->v);
    if (!entry || strcmp(entry, expected_entry(j->v.op)) != 0) {
        snprintf(j->why, sizeof j->why, "entry name %s, want %s", entry ? entry : "?",
                 expected_entry(j->v.op));
        return;
    }
    /* Resources are those of the op's own kernel (runtime/compile.c reads its
     * section of the ptxas report; the other op's kernel is an empty body). */
    const int compiled = compile_check_run(&j->v, &j->c) == 0;
    snprintf(j->why, sizeof j->why, "%s", j->c.why);
    if (j->expect_refusal) {
        j->ok = !compiled && strstr(j->why, "not implemented") != NULL;
        if (compiled)
            snprintf(j->why, sizeof j->why, "compiled, but the reference has no paged KV");
        return;
    }
    if (!compiled)
        return;
    if (j->c.smem < 0 || j->c.smem > MAX_STATIC_SMEM || j->c.registers <= 0)
        snprintf(j->why, sizeof j->why, "resources of %s unreadable, or smem %d > %d", entry,
                 j->c.smem, MAX_STATIC_SMEM);
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

static void *worker(void *arg)
{
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

static void print_job(const job *j)
{
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

/* The op numbers are part of cache keys and of the template's static_assert. */
static int check_op_numbers(void)
{
    const int ok = FAJIT__OP_REF_DQ == 3 && FAJIT__OP_REF_DKDV == 4;
    printf("%s op numbers: ref-dq %d, ref-dkdv %d (reference_bwd.cuh expects 3 and 4)\n",
           ok ? "ok  " : "FAIL", FAJIT__OP_REF_DQ, FAJIT__OP_REF_DKDV);
    return ok;
}

int main(void)
{
    int major = 0, minor = 0;
    nvrtcVersion(&major, &minor);
    printf("NVRTC %d.%d, %d threads\n", major, minor, COMPILE_THREADS);
    size_t failures = check_op_numbers() ? 0 : 1;

    static job jobs[MAX_JOBS];
    pool p = {.jobs = jobs, .n = build_jobs(jobs, MAX_JOBS), .next = 0};
    pthread_mutex_init(&p.lock, NULL);
    const double t0 = now_ms();
    pthread_t threads[COMPILE_THREADS];
    for (int t = 0; t < COMPILE_THREADS; ++t)
        pthread_create(&threads[t], NULL, worker, &p);
    for (int t = 0; t < COMPILE_THREADS; ++t)
        pthread_join(threads[t], NULL);
    const double wall = now_ms() - t0;
    pthread_mutex_destroy(&p.lock);

    size_t spilling = 0;
    double total_ms = 0.0;
    for (size_t i = 0; i < p.n; ++i) {
        print_job(&jobs[i]);
        failures += !jobs[i].ok;
        spilling += jobs[i].ok && jobs[i].c.spills > 0;
        total_ms += jobs[i].c.ms;
    }
    printf("%zu variants, %zu failed, %zu with spills; compile %.0f ms in all (%.0f ms mean), "
           "wall %.0f ms\n",
           p.n, failures, spilling, total_ms, total_ms / (double)p.n, wall);
    return failures ? 1 : 0;
}
