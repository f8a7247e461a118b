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
 *   - the heuristic's choice for sm_86 (99 KB of shared memory) at d 256;
 *   - each feature alone (window, softcap, ALiBi, dropout, varlen): bwd on
 *     sm_90 and sm_80, bwd-dkdv and bwd-dq on one arch each; all of them
 *     together for bwd, bwd-dkdv and bwd-dq on both archs; pre and post
 *     under varlen.
 * Every compile must succeed, define the op's entry, and warn about nothing
 * in the templates; registers and spills are printed (spills not required to
 * be 0). Without compiling: the heuristic's tiles fit each arch's shared
 * memory for every head-dim pair 8..256 (step 8); fajit__flash_bwd_variants
 * normalises the window as the forward does and puts the features on the
 * main kernels only; and a variant asking for paged KV is refused at compile
 * time.
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
#define MAX_JOBS 128

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

/* The forward's features, one bit each. */
enum { F_WINDOW = 1, F_SOFTCAP = 2, F_ALIBI = 4, F_DROPOUT = 8, F_VARLEN = 16, F_ALL = 31, F_COUNT = 5 };

/* A variant with features: the window has both sides without a mask and the
 * left one under a causal mask (the runtime drops a right one there); pre and
 * post take only varlen, as fajit__flash_bwd_variants makes them. */
static fajit__variant feature_variant(int op, int d, int dtype, int mask, int arch, int features)
{
    const int side = op == FAJIT__OP_BWD_PRE || op == FAJIT__OP_BWD_POST;
    fajit__variant v;
    fajit__variant_defaults(&v);
    v.op = op;
    v.dqk = v.dv = d;
    v.dtype = dtype;
    v.mask = side ? FAJIT_MASK_NONE : mask;
    if ((features & F_WINDOW) && !side) {
        v.window_left = 32;
        v.window_right = mask == FAJIT_MASK_NONE ? 16 : -1;
    }
    v.softcap = !side && (features & F_SOFTCAP) != 0;
    v.alibi = !side && (features & F_ALIBI) != 0;
    v.dropout = !side && (features & F_DROPOUT) != 0;
    v.varlen = (features & F_VARLEN) != 0;
    v.arch = arch;
    v.arch_suffix = 0;
    fajit__flash_bwd_tiles(&v);
    return v;
}

/* Each feature alone: bwd on sm_90 and sm_80 (head dims 64 and 128, masks
 * in turn), deterministic mode's bwd-dkdv and bwd-dq on one arch each; every
 * feature together for the three main kernels on both archs (d 128, and d 256
 * for bwd on sm_90); pre and post under varlen. */
static size_t add_feature_jobs(job *jobs, size_t n)
{
    for (int f = 0; f < F_COUNT; ++f) {
        const int feature = 1 << f, d = f % 2 ? 64 : 128, mask = f % 3;
        add_job(jobs, &n, feature_variant(FAJIT__OP_BWD, d, f % 2, mask, 90, feature), 0);
        add_job(jobs, &n, feature_variant(FAJIT__OP_BWD, d, (f + 1) % 2, (f + 1) % 3, 80, feature), 0);
        add_job(jobs, &n, feature_variant(FAJIT__OP_BWD_DKDV, d, f % 2, mask, f % 2 ? 80 : 90, feature), 0);
        add_job(jobs, &n, feature_variant(FAJIT__OP_BWD_DQ, d, f % 2, mask, f % 2 ? 90 : 80, feature), 0);
    }
    for (int arch = 80; arch <= 90; arch += 10)
        for (int op = FAJIT__OP_BWD_DKDV; op <= FAJIT__OP_BWD_DQ + 1; ++op) {
            const int o = op == FAJIT__OP_BWD_DQ + 1 ? FAJIT__OP_BWD : op;
            add_job(jobs, &n, feature_variant(o, 128, arch == 90, arch == 90 ? 1 : 0, arch, F_ALL), 0);
        }
    add_job(jobs, &n, feature_variant(FAJIT__OP_BWD, 256, 1, 2, 90, F_ALL), 0);
    add_job(jobs, &n, feature_variant(FAJIT__OP_BWD_PRE, 72, 0, 0, 90, F_VARLEN), 0);
    add_job(jobs, &n, feature_variant(FAJIT__OP_BWD_POST, 72, 1, 0, 80, F_VARLEN), 0);
    return n;
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
    n = add_feature_jobs(jobs, n);
    fajit__variant v = flash_variant(FAJIT__OP_BWD, 64, 64, 0, 0, 90);
    v.paged = 1; /* no paged KV: refuse, not ignore */
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
            snprintf(j->why, sizeof j->why, "compiled, but the fast backward has no paged KV");
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

/* fajit__flash_bwd_variants derives the main kernel's mask and window as
 * the forward does (normalised: the forward compiled that mask), its other
 * features from the arguments, and pre/post with varlen only. */
static int check_variants(void)
{
    static const struct {
        int mask, wl, wr, sq, sk;   /* arguments */
        int want_mask, want_wl, want_wr;
    } cases[] = {
        {0, 5, 0, 100, 100, 1, 5, -1},    /* right window 0, no mask: the causal mask */
        {1, 5, 3, 100, 100, 1, 5, -1},    /* right window under causal: implied */
        {0, 200, 7, 100, 150, 0, -1, 7},  /* left past every key */
        {2, 99, -1, 100, 150, 2, -1, -1}, /* top-left: the diagonal is the row */
        {0, -1, 99, 100, 150, 0, -1, -1}, /* right past every key */
        {0, 10, 20, 100, 120, 0, 10, 20}, /* kept */
        {2, 10, 4, 100, 120, 2, 10, -1},
    };
    static const float slopes[1];
    static const int32_t cu[2];
    int bad = 0;
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; ++i)
        for (int det = 0; det < 2; ++det) {
            fajit_attn_bwd_args a;
            fajit__variant v[3];
            fajit_attn_bwd_args_init(&a);
            a.dqk = a.dv = 64;
            a.mask = cases[i].mask;
            a.window_left = cases[i].wl;
            a.window_right = cases[i].wr;
            a.seqlen_q = cases[i].sq;
            a.seqlen_k = cases[i].sk;
            a.deterministic = det;
            a.softcap = i % 2 ? 5.0f : 0.0f;
            a.alibi_slopes = i % 3 ? slopes : NULL;
            a.dropout_p = i % 2 ? 0.0f : 0.25f;
            a.cu_seqlens_q = a.cu_seqlens_k = i % 4 == 1 ? cu : NULL;
            fajit__flash_bwd_variants(&a, 90, v);
            const int varlen = a.cu_seqlens_q != NULL;
            int ok = v[1].mask == cases[i].want_mask && v[1].window_left == cases[i].want_wl &&
                     v[1].window_right == cases[i].want_wr && v[1].softcap == (a.softcap != 0.0f) &&
                     v[1].alibi == (a.alibi_slopes != NULL) && v[1].dropout == (a.dropout_p > 0.0f) &&
                     v[1].varlen == varlen && v[2].op == (det ? FAJIT__OP_BWD_DQ : FAJIT__OP_BWD_POST);
            for (int k = 0; k < 3; k += 2) {
                const int side = v[k].op != FAJIT__OP_BWD_DQ;
                const fajit__variant *x = side ? &v[k] : &v[1];
                ok = ok && x->mask == v[k].mask && x->window_left == v[k].window_left &&
                     x->window_right == v[k].window_right && x->softcap == v[k].softcap &&
                     x->alibi == v[k].alibi && x->dropout == v[k].dropout && v[k].varlen == varlen &&
                     (!side || (v[k].mask == 0 && v[k].window_left == -1 && v[k].window_right == -1 &&
                                !v[k].softcap && !v[k].alibi && !v[k].dropout));
            }
            if (!ok) {
                char text[FAJIT__VARIANT_TEXT_MAX];
                fajit__variant_format(&v[1], text, sizeof text);
                printf("FAIL variants for mask=%d window=%d,%d sq=%d sk=%d det=%d: %s\n", cases[i].mask,
                       cases[i].wl, cases[i].wr, cases[i].sq, cases[i].sk, det, text);
                bad++;
            }
        }
    printf("%s fajit__flash_bwd_variants: normalised mask and window, features on the main kernels, "
           "pre/post varlen only (%zu calls, %d wrong)\n",
           bad ? "FAIL" : "ok  ", 2 * sizeof cases / sizeof cases[0], bad);
    return bad == 0;
}

int main(void)
{
    int major = 0, minor = 0;
    nvrtcVersion(&major, &minor);
    printf("NVRTC %d.%d, %d threads\n", major, minor, COMPILE_THREADS);
    size_t failures = !check_op_numbers() + !check_tiles_fit() + !check_variants();

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
