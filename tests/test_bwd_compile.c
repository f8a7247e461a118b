/*
 * tests/test_bwd_compile.c - the reference backward template compiles with
 * NVRTC, no GPU needed.
 *
 * Renders op ref-dq and ref-dkdv variants with the codegen layer's
 * fajit__render and compiles each as the runtime does (-std=c++17, the
 * variant's arch, no include path), plus --ptxas-options=-v to read the
 * resources of the op's own kernel:
 *   - sm_90: head dims {1, 8, 59, 64, 72, 100, 128, 192/128, 256, 512} x
 *     {fp16, bf16} x {none, causal, causal-tl} x both ops, tiles of the
 *     runtime's heuristic (bm 4 bn 32 warps 4) with one wider config;
 *   - sm_80: the same head dims and ops, dtype and mask varying along.
 * Every compile must succeed, yield a cubin defining the op's entry, keep
 * static shared memory within 48 KB, and warn about nothing in the templates.
 * Spills are printed, not required to be 0. A variant asking for a feature the
 * reference lacks (dropout) must be refused at compile time.
 */
#include <nvrtc.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "codegen/variant.h"
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
    double ms;
    int registers, smem, spill_stores, spill_loads, template_warnings;
    size_t cubin_bytes;
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

static void add_job(job *jobs, size_t *n, size_t cap, fajit__variant v, int expect_refusal)
{
    if (*n >= cap)
        return;
    memset(&jobs[*n], 0, sizeof jobs[*n]);
    jobs[*n].v = v;
    jobs[*n].expect_refusal = expect_refusal;
    ++*n;
}

/* sm_90: the whole grid, the wide tiles for one mask in three; sm_80: every
 * head dim and op, with dtype and mask rotating. */
static size_t build_jobs(job *jobs, size_t cap)
{
    size_t n = 0;
    for (size_t d = 0; d < N_HEAD_DIMS; ++d)
        for (int dtype = 0; dtype < 2; ++dtype)
            for (int mask = 0; mask < 3; ++mask)
                for (int o = 0; o < 2; ++o)
                    add_job(jobs, &n, cap,
                            bwd_variant(ops[o], head_dims[d][0], head_dims[d][1], dtype, mask,
                                        (int)(d + (size_t)mask) % 3 == 0, 90),
                            0);
    for (size_t d = 0; d < N_HEAD_DIMS; ++d)
        for (int o = 0; o < 2; ++o)
            add_job(jobs, &n, cap,
                    bwd_variant(ops[o], head_dims[d][0], head_dims[d][1], (int)(d % 2),
                                (int)(d + (size_t)o) % 3, 0, 80),
                    0);
    for (int o = 0; o < 2; ++o) { /* no dropout in the reference: refuse, not ignore */
        fajit__variant v = bwd_variant(ops[o], 64, 64, 0, 0, 0, 90);
        v.dropout = 1;
        add_job(jobs, &n, cap, v, 1);
    }
    return n;
}

/* ---------------------------------------------------------------- the compile log */

/* The number just before `key` in text ("48" of "Used 48 registers"); -1 if
 * absent. */
static int number_before(const char *text, const char *key)
{
    const char *at = strstr(text, key);
    if (!at)
        return -1;
    const char *p = at;
    while (p > text && p[-1] == ' ')
        --p;
    while (p > text && p[-1] >= '0' && p[-1] <= '9')
        --p;
    return p < at ? atoi(p) : -1;
}

/* Warnings located in a template file (NVRTC names them thanks to #line). */
static int count_template_warnings(const char *log)
{
    int n = 0;
    for (const char *p = log; (p = strstr(p, "warning")) != NULL; ++p) {
        const char *line = p;
        while (line > log && line[-1] != '\n')
            --line;
        if (strstr(line, ".cuh(") && strstr(line, ".cuh(") < p)
            ++n;
    }
    return n;
}

/* ptxas reports each kernel of the cubin in turn, starting "Compiling entry
 * function '<name>'": read the resources from the op's own kernel's section
 * (the other op's kernel is an empty body). */
static void read_resources(job *j, const char *log, const char *entry)
{
    char marker[128];
    snprintf(marker, sizeof marker, "entry function '%s'", entry);
    const char *section = strstr(log, marker);
    j->registers = j->smem = j->spill_stores = j->spill_loads = -1;
    j->template_warnings = count_template_warnings(log);
    if (!section)
        return;
    const char *next = strstr(section + strlen(marker), "Compiling entry function");
    const size_t len = next ? (size_t)(next - section) : strlen(section);
    char *text = malloc(len + 1);
    if (!text)
        return;
    memcpy(text, section, len);
    text[len] = '\0';
    j->registers = number_before(text, "registers");
    j->smem = number_before(text, "bytes smem");
    j->spill_stores = number_before(text, "bytes spill stores");
    j->spill_loads = number_before(text, "bytes spill loads");
    free(text);
}

/* ---------------------------------------------------------------- one compile */

static char *program_log(nvrtcProgram prog)
{
    size_t n = 0;
    if (nvrtcGetProgramLogSize(prog, &n) != NVRTC_SUCCESS)
        return NULL;
    char *log = malloc(n + 1);
    if (log && nvrtcGetProgramLog(prog, log) != NVRTC_SUCCESS)
        log[0] = '\0';
    if (log)
        log[n] = '\0';
    return log;
}

static int compile_rendered(job *j, const char *src, const char *entry)
{
    char arch_opt[64];
    snprintf(arch_opt, sizeof arch_opt, "--gpu-architecture=sm_%d", j->v.arch);
    const char *opts[] = {"-std=c++17", arch_opt, "--ptxas-options=-v"};
    nvrtcProgram prog;
    if (nvrtcCreateProgram(&prog, src, "fajit_ref_bwd.cu", 0, NULL, NULL) != NVRTC_SUCCESS) {
        snprintf(j->why, sizeof j->why, "nvrtcCreateProgram failed");
        return -1;
    }
    const double t0 = now_ms();
    const nvrtcResult rc = nvrtcCompileProgram(prog, 3, opts);
    j->ms = now_ms() - t0;
    char *log = program_log(prog);
    int result = -1;
    if (rc != NVRTC_SUCCESS) {
        snprintf(j->why, sizeof j->why, "%s: %.400s", nvrtcGetErrorString(rc), log ? log : "");
    } else if (nvrtcGetCUBINSize(prog, &j->cubin_bytes) != NVRTC_SUCCESS || j->cubin_bytes == 0) {
        snprintf(j->why, sizeof j->why, "no cubin");
    } else {
        read_resources(j, log ? log : "", entry);
        result = 0;
    }
    free(log);
    nvrtcDestroyProgram(&prog);
    return result;
}

static const char *expected_entry(int op)
{
    return op == FAJIT__OP_REF_DQ ? "fajit_ref_bwd_dq" : "fajit_ref_bwd_dkdv";
}

static void run_job(job *j)
{
    char *src = NULL;
    size_t len = 0;
    const char *entry = NULL;
    if (fajit__render(&j->v, &src, &len, &entry) != 0) {
        j->ok = j->expect_refusal; /* a refused variant may be refused by the renderer already */
        snprintf(j->why, sizeof j->why, "render: %s", fajit__detail());
        return;
    }
    if (strcmp(entry, expected_entry(j->v.op)) != 0) {
        snprintf(j->why, sizeof j->why, "entry name %s, want %s", entry, expected_entry(j->v.op));
        free(src);
        return;
    }
    const int compiled = compile_rendered(j, src, entry) == 0;
    free(src);
    if (j->expect_refusal) {
        j->ok = !compiled && strstr(j->why, "not implemented") != NULL;
        if (compiled)
            snprintf(j->why, sizeof j->why, "compiled, but the reference has no dropout");
        return;
    }
    if (!compiled)
        return;
    if (j->smem < 0 || j->smem > MAX_STATIC_SMEM || j->registers <= 0)
        snprintf(j->why, sizeof j->why, "resources of %s unreadable, or smem %d > %d", entry,
                 j->smem, MAX_STATIC_SMEM);
    else if (j->template_warnings > 0)
        snprintf(j->why, sizeof j->why, "%d warnings in the templates", j->template_warnings);
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
        printf("ok   %7.1f ms  regs %3d  smem %5d  spill %d+%d  cubin %6zu  %s\n", j->ms,
               j->registers, j->smem, j->spill_stores, j->spill_loads, j->cubin_bytes, text);
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
    /* Where a CUDA driver is installed, NVRTC may serve ptxas output from the
     * driver's compute cache, with no ptxas report to check. Compile for real. */
    setenv("CUDA_CACHE_DISABLE", "1", 1);
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
        spilling += jobs[i].ok && (jobs[i].spill_stores > 0 || jobs[i].spill_loads > 0);
        total_ms += jobs[i].ms;
    }
    printf("%zu variants, %zu failed, %zu with spills; compile %.0f ms in all (%.0f ms mean), "
           "wall %.0f ms\n",
           p.n, failures, spilling, total_ms, total_ms / (double)p.n, wall);
    return failures ? 1 : 0;
}
