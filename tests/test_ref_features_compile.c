/*
 * tests/test_ref_features_compile.c - the reference forward compiles with
 * NVRTC for every feature (window, softcap, ALiBi, dropout, varlen, all at
 * once), no GPU needed: each variant is rendered by fajit__render and compiled
 * as the runtime does (-std=c++17, the variant's arch, no include path) for
 * sm_80 and sm_90. Every compile must yield a cubin, and the templates must
 * warn about nothing.
 */
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "codegen/variant.h"
#include "compile_check.h"
#include "fajit.h"
#include "runtime/error.h"

#define MAX_JOBS 128
#define THREADS 2

typedef struct job {
    fajit__variant v;
    int ok;
    char why[600];
} job;

static job jobs[MAX_JOBS];
static size_t n_jobs;
static atomic_size_t next_job;

enum { F_DROPOUT = 1, F_SOFTCAP = 2, F_ALIBI = 4, F_VARLEN = 8 };

static void add(int dim, int dtype, int mask, int left, int right, int features, int arch)
{
    fajit__variant *v = &jobs[n_jobs++].v;
    fajit__variant_defaults(v);
    v->op = FAJIT__OP_REF;
    v->dqk = v->dv = dim;
    v->dtype = dtype;
    v->mask = mask;
    v->window_left = left;
    v->window_right = right;
    v->dropout = (features & F_DROPOUT) != 0;
    v->softcap = (features & F_SOFTCAP) != 0;
    v->alibi = (features & F_ALIBI) != 0;
    v->varlen = (features & F_VARLEN) != 0;
    v->bm = 4;
    v->bn = 32;
    v->warps = 4;
    v->stages = 1;
    v->arch = arch;
    v->arch_suffix = 0;
}

/* Each feature alone over a few head dims and dtypes, windows with every
 * mask, everything at once; sm_90, and a subset on sm_80. */
static void build_jobs(void)
{
    static const int dims[] = {8, 59, 128, 512};
    static const int windows[][2] = {{0, 0}, {3, -1}, {-1, 5}, {16, 2}};
    for (int arch = 80; arch <= 90; arch += 10) {
        for (size_t d = 0; d < sizeof dims / sizeof dims[0]; d++)
            for (int f = F_DROPOUT; f <= F_VARLEN; f <<= 1)
                if (arch == 90 || d == 1)
                    add(dims[d], (int)(d + (size_t)f) % 2, (f & 3), -1, -1, f, arch);
        for (size_t w = 0; w < sizeof windows / sizeof windows[0]; w++)
            for (int mask = 0; mask < 3; mask++)
                if (arch == 90 || w == 3)
                    add(64, mask % 2, mask, windows[w][0], windows[w][1], 0, arch);
        for (int dtype = 0; dtype < 2; dtype++)
            add(arch == 90 ? 100 : 256, dtype, 1 + dtype, 8, 0, F_DROPOUT | F_SOFTCAP | F_ALIBI | F_VARLEN, arch);
    }
}

static void run_job(job *j)
{
    compile_check c;
    if (compile_check_run(&j->v, &c) != 0)
        snprintf(j->why, sizeof j->why, "%s", c.why);
    else if (c.cubin_bytes == 0)
        snprintf(j->why, sizeof j->why, "no cubin");
    else if (c.template_warnings > 0)
        snprintf(j->why, sizeof j->why, "%d warnings in the templates", c.template_warnings);
    else
        j->ok = 1;
}

static void *worker(void *unused)
{
    (void)unused;
    for (size_t i; (i = atomic_fetch_add(&next_job, 1)) < n_jobs;)
        run_job(&jobs[i]);
    return NULL;
}

int main(void)
{
    pthread_t threads[THREADS];
    char text[FAJIT__VARIANT_TEXT_MAX];
    int failed = 0;
    build_jobs();
    for (int t = 0; t < THREADS; t++)
        pthread_create(&threads[t], NULL, worker, NULL);
    for (int t = 0; t < THREADS; t++)
        pthread_join(threads[t], NULL);
    for (size_t i = 0; i < n_jobs; i++) {
        if (fajit__variant_format(&jobs[i].v, text, sizeof text) < 0)
            snprintf(text, sizeof text, "(unformattable)");
        printf("%s %s%s%s\n", jobs[i].ok ? "ok  " : "FAIL", text, jobs[i].ok ? "" : "\n  ",
               jobs[i].ok ? "" : jobs[i].why);
        failed += !jobs[i].ok;
    }
    printf("%zu variants, %d failed\n", n_jobs, failed);
    return failed != 0 || n_jobs == 0;
}
