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
    double ms;
    int registers, smem, spill_stores, spill_loads, template_warnings;
    size_t cubin_bytes;
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

/* Finds `key` in the ptxas log and reads the number just before it ("48" of
 * "Used 48 registers"); -1 if absent. */
static int number_before(const char *log, const char *key) {
    const char *at = strstr(log, key);
    if (!at)
        return -1;
    const char *p = at;
    while (p > log && p[-1] == ' ')
        --p;
    while (p > log && p[-1] >= '0' && p[-1] <= '9')
        --p;
    return p < at ? atoi(p) : -1;
}

/* Warnings located in a template file (NVRTC names them thanks to #line). */
static int count_template_warnings(const char *log) {
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

static void read_resources(job *j, const char *log) {
    j->registers = number_before(log, "registers");
    j->smem = number_before(log, "bytes smem");
    j->spill_stores = number_before(log, "bytes spill stores");
    j->spill_loads = number_before(log, "bytes spill loads");
    j->template_warnings = count_template_warnings(log);
}

/* ---------------------------------------------------------------- one compile */

static char *program_log(nvrtcProgram prog) {
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

static int compile_rendered(job *j, const char *src, const char *entry) {
    char arch_opt[64];
    snprintf(arch_opt, sizeof arch_opt, "--gpu-architecture=sm_%d", j->v.arch);
    const char *opts[] = {"-std=c++17", arch_opt, "--ptxas-options=-v"};
    nvrtcProgram prog;
    if (nvrtcCreateProgram(&prog, src, "fajit_ref.cu", 0, NULL, NULL) != NVRTC_SUCCESS) {
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
    } else if (strcmp(entry, "fajit_ref_fwd") != 0) {
        snprintf(j->why, sizeof j->why, "entry name %s, want fajit_ref_fwd", entry);
    } else {
        read_resources(j, log ? log : "");
        result = 0;
    }
    free(log);
    nvrtcDestroyProgram(&prog);
    return result;
}

static void run_job(job *j) {
    char *src = NULL;
    size_t len = 0;
    const char *entry = NULL;
    if (fajit__render(&j->v, &src, &len, &entry) != 0) {
        /* A refused variant may be refused by the renderer already. */
        j->ok = j->expect_refusal;
        snprintf(j->why, sizeof j->why, "render: %s", fajit__detail());
        return;
    }
    const int compiled = compile_rendered(j, src, entry) == 0;
    free(src);
    if (j->expect_refusal) {
        j->ok = !compiled && strstr(j->why, "not implemented") != NULL;
        if (compiled)
            snprintf(j->why, sizeof j->why, "compiled, but the reference has no paged KV");
        return;
    }
    if (!compiled)
        return;
    if (j->smem < 0 || j->smem > MAX_STATIC_SMEM || j->registers <= 0)
        snprintf(j->why, sizeof j->why, "resources unreadable or smem %d > %d", j->smem, MAX_STATIC_SMEM);
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
        printf("ok   %7.1f ms  regs %3d  smem %5d  spill %d+%d  cubin %6zu  %s\n", j->ms, j->registers,
               j->smem, j->spill_stores, j->spill_loads, j->cubin_bytes, text);
    else
        printf("FAIL %s\n  %s\n", text, j->why);
}

int main(void) {
    /* Where a CUDA driver is installed, NVRTC keeps ptxas output in the
     * driver's compute cache (~/.nv/ComputeCache) across processes; a variant
     * served from it compiles without a ptxas report, so its resources could
     * not be checked. Compile for real. */
    setenv("CUDA_CACHE_DISABLE", "1", 1);
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
        spilling += jobs[i].ok && (jobs[i].spill_stores > 0 || jobs[i].spill_loads > 0);
        total_ms += jobs[i].ms;
    }
    printf("%zu variants, %zu failed, %zu with spills; compile %.0f ms in all (%.0f ms mean), wall %.0f ms\n",
           p.n, failures, spilling, total_ms, total_ms / (double)p.n, wall);
    return failures ? 1 : 0;
}
