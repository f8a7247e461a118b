/*
 * tests/test_flash_bwd_compile.c - the fast backward template
 * (templates/flash_bwd.cuh: ops bwd, bwd-pre, bwd-post, bwd-dkdv, bwd-dq)
 * compiles with NVRTC,
 * no GPU needed.
 *
 * Every variant is built as the runtime builds it (fajit__flash_bwd_tiles,
 * the tile heuristic of runtime/flash_bwd.c) and compiled as the runtime
 * compiles it (tests/compile_check.c):
 *   - the main kernel for sm_90 and sm_80 over head dims 8..256 (both
 *     dims multiples of 8, dqk != dv included), fp16 and bf16, each mask;
 *   - the pre and post kernels for a few head dims on both archs;
 *   - deterministic mode's bwd-dkdv and bwd-dq for a few head dims;
 *   - the heuristic's choice for sm_86 (99 KB of shared memory) at d 256.
 * Every compile must succeed, define the op's entry, and warn about nothing
 * in the templates; registers and spills are printed (spills not required to
 * be 0). Without compiling: the heuristic's tiles fit each arch's shared
 * memory for every head-dim pair 8..256 (step 8), and a variant asking for
 * dropout is refused at compile time.
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
#include "runtime/flash_bwd.h"
#include "runtime/runtime.h"

#define COMPILE_THREADS 2
#define MAX_JOBS 96

typedef struct job {
    fajit__variant v;
    int expect_refusal; /* 1: the compile must fail (unsupported feature) */
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

static fajit__variant flash_variant(int op, int dqk, int dv, int dtype, int mask, int arch)
{
    fajit__variant v;
    fajit__variant_defaults(&v);
    v.op = op;
    v.dqk = dqk;
    v.dv = dv;
    v.dtype = dtype;
    v.mask = op == FAJIT__OP_BWD_PRE || op == FAJIT__OP_BWD_POST ? FAJIT_MASK_NONE : mask;
    v.arch = arch;
    v.arch_suffix = 0;
    fajit__flash_bwd_tiles(&v);
    return v;
}

static void add_job(job *jobs, size_t *n, fajit__variant v, int expect_refusal)
{
    if (*n >= MAX_JOBS)
        return;
    memset(&jobs[*n], 0, sizeof jobs[*n]);
    jobs[*n].v = v;
    jobs[*n].expect_refusal = expect_refusal;
    ++*n;
}

/* Main-kernel head dims: each tile configuration of the heuristic, odd
 * chunk counts (d % 16 == 8), dqk != dv both ways. */
static const int main_dims[][2] = {{8, 8},     {32, 32},   {64, 64},   {72, 72},   {128, 128},
                                   {200, 200}, {256, 256}, {192, 128}, {64, 128}};
#define N_MAIN_DIMS (sizeof main_dims / sizeof main_dims[0])

static size_t build_jobs(job *jobs)
{
    size_t n = 0;
    for (size_t d = 0; d < N_MAIN_DIMS; ++d) {
        const int dqk = main_dims[d][0], dv = main_dims[d][1];
        add_job(jobs, &n, flash_variant(FAJIT__OP_BWD, dqk, dv, (int)(d % 2), (int)(d % 3), 90), 0);
        add_job(jobs, &n, flash_variant(FAJIT__OP_BWD, dqk, dv, (int)((d + 1) % 2), (int)((d + 1) % 3), 80), 0);
    }
    add_job(jobs, &n, flash_variant(FAJIT__OP_BWD, 256, 256, 0, 1, 86), 0);
    static const int side_dims[][2] = {{8, 8}, {72, 72}, {192, 128}, {256, 256}};
    for (size_t d = 0; d < 4; ++d)
        for (int op = FAJIT__OP_BWD_PRE; op <= FAJIT__OP_BWD_POST; ++op)
            add_job(jobs, &n, flash_variant(op, side_dims[d][0], side_dims[d][1], (int)(d % 2), 0, d % 2 ? 80 : 90),
                    0);
    /* Deterministic mode's two kernels. */
    static const int det_dims[][2] = {{8, 8}, {64, 64}, {72, 72}, {128, 128}, {192, 128}, {256, 256}};
    for (size_t d = 0; d < 6; ++d)
        for (int op = FAJIT__OP_BWD_DKDV; op <= FAJIT__OP_BWD_DQ; ++op)
            add_job(jobs, &n,
                    flash_variant(op, det_dims[d][0], det_dims[d][1], (int)(d % 2), (int)(d + (size_t)op) % 3,
                                  (d + (size_t)op) % 2 ? 80 : 90),
                    0);
    fajit__variant v = flash_variant(FAJIT__OP_BWD, 64, 64, 0, 0, 90);
    v.dropout = 1; /* no dropout yet: refuse, not ignore */
    add_job(jobs, &n, v, 1);
    return n;
}

/* ---------------------------------------------------------------- one compile */

static const char *expected_entry(int op)
{
    switch (op) {
    case FAJIT__OP_BWD:
        return "fajit_flash_bwd";
    case FAJIT__OP_BWD_PRE:
        return "fajit_flash_bwd_pre";
    case FAJIT__OP_BWD_POST:
        return "fajit_flash_bwd_post";
    case FAJIT__OP_BWD_DKDV:
        return "fajit_flash_bwd_dkdv";
    default:
        return "fajit_flash_bwd_dq";
    }
}

static void run_job(job *j)
{
    const char *entry = fajit__variant_entry_name(&j->v);
    if (!entry || strcmp(entry, expected_entry(j->v.op)) != 0) {
        snprintf(j->why, sizeof j->why, "entry name %s, want %s", entry ? entry : "?", expected_entry(j->v.op));
        return;
    }
    const int compiled = compile_check_run(&j->v, &j->c) == 0;
    snprintf(j->why, sizeof j->why, "%s", j->c.why);
    if (j->expect_refusal) {
        j->ok = !compiled && strstr(j->why, "not implemented") != NULL;
        if (compiled)
            snprintf(j->why, sizeof j->why, "compiled, but the fast backward has no dropout");
        return;
    }
    if (!compiled)
        return;
    if (j->c.registers <= 0 || j->c.cubin_bytes == 0)
        snprintf(j->why, sizeof j->why, "resources of %s unreadable", entry);
    else if (j->c.template_warnings > 0)
        snprintf(j->why, sizeof j->why, "%d warnings in the templates", j->c.template_warnings);
    else
        j->ok = 1;
}

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
        printf("ok   %7.1f ms  regs %3d  smem %6zu  spill %4d  cubin %6zu  %s\n", j->c.ms, j->c.registers,
               fajit__variant_smem_bytes(&j->v), j->c.spills, j->c.cubin_bytes, text);
    else
        printf("FAIL %s\n  %s\n", text, j->why);
}

/* ---------------------------------------------------------------- without compiling */

/* The op numbers are part of cache keys and of the template's static_assert. */
static int check_op_numbers(void)
{
    const int ok = FAJIT__OP_BWD == 2 && FAJIT__OP_BWD_PRE == 5 && FAJIT__OP_BWD_POST == 6 &&
                   FAJIT__OP_BWD_DKDV == 7 && FAJIT__OP_BWD_DQ == 8;
    printf("%s op numbers: bwd %d, bwd-pre %d, bwd-post %d, bwd-dkdv %d, bwd-dq %d (flash_bwd.cuh "
           "expects 2, 5, 6, 7 and 8)\n",
           ok ? "ok  " : "FAIL", FAJIT__OP_BWD, FAJIT__OP_BWD_PRE, FAJIT__OP_BWD_POST, FAJIT__OP_BWD_DKDV,
           FAJIT__OP_BWD_DQ);
    return ok;
}

/* One variant of the heuristic's: 1 if it fits the arch, else printed (the
 * first few). */
static int tiles_fit(int op, int dqk, int dv, int arch, int *bad)
{
    const fajit__variant v = flash_variant(op, dqk, dv, 0, 0, arch);
    const size_t smem = fajit__variant_smem_bytes(&v);
    if (smem <= fajit__arch_smem_limit(arch) && fajit__variant_check(&v) == 0)
        return 1;
    if ((*bad)++ < 5)
        printf("FAIL tiles of op %d bm=%d bn=%d warps=%d stages=%d for dqk=%d dv=%d sm_%d: %zu bytes of "
               "shared memory, the arch has %zu\n",
               op, v.bm, v.bn, v.warps, v.stages, dqk, dv, arch, smem, fajit__arch_smem_limit(arch));
    return 0;
}

/* The heuristic's tiles of the three big kernels fit every arch's shared
 * memory, for every head-dim pair the fast backward takes. */
static int check_tiles_fit(void)
{
    static const int archs[] = {80, 86, 89, 90, 120};
    static const int ops[] = {FAJIT__OP_BWD, FAJIT__OP_BWD_DKDV, FAJIT__OP_BWD_DQ};
    int bad = 0;
    for (size_t a = 0; a < sizeof archs / sizeof archs[0]; ++a)
        for (int dqk = 8; dqk <= 256; dqk += 8)
            for (int dv = 8; dv <= 256; dv += 8)
                for (size_t o = 0; o < sizeof ops / sizeof ops[0]; ++o)
                    tiles_fit(ops[o], dqk, dv, archs[a], &bad);
    printf("%s heuristic tiles fit shared memory: 1024 head-dim pairs x 5 archs x 3 ops, %d failures\n",
           bad ? "FAIL" : "ok  ", bad);
    return bad == 0;
}

int main(void)
{
    int major = 0, minor = 0;
    nvrtcVersion(&major, &minor);
    printf("NVRTC %d.%d, %d threads\n", major, minor, COMPILE_THREADS);
    size_t failures = !check_op_numbers() + !check_tiles_fit();

    static job jobs[MAX_JOBS];
    pool p = {.jobs = jobs, .n = build_jobs(jobs), .next = 0};
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
    printf("%zu variants, %zu failed, %zu with spills; compile %.0f ms in all, wall %.0f ms\n", p.n, failures,
           spilling, total_ms, wall);
    return failures ? 1 : 0;
}
