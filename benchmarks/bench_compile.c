/*
 * benchmarks/bench_compile.c - compile and cache latency, through the public API.
 *
 *  1. Cold compile: fajit_compile of one reference variant in a fresh context
 *     with the cache off (so nothing is found), 5 runs, each in a fresh child
 *     process (this program with --cold-child). No GPU needed: this is the
 *     NVRTC cost a user pays on a first call.
 *  2. Cached load in a fresh process (GPU only): a temporary cache is filled
 *     with fajit_compile, then 5 fresh child processes (this program with
 *     --load-child) each time their first fajit_attn_fwd call, which finds the cubin
 *     in LMDB and loads it with cuModuleLoadData, next to a second (warm) call.
 *
 * Prints a table; exit 0 unless something failed.
 */
#include <cuda_runtime_api.h>
#include <ftw.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "fajit.h"

#define RUNS 5

static const char *const cold_spec =
    "ref dqk=128 dv=128 dtype=fp16 mask=none window=-1,-1 dropout=0 softcap=0 alibi=0 varlen=0 "
    "paged=0 bm=4 bn=32 warps=4 stages=1 arch=sm_90";

static double now_ms(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec * 1e3 + ts.tv_nsec / 1e6;
}

static int cmp_double(const void *a, const void *b) {
    const double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

static double median(double *v, int n) {
    qsort(v, (size_t)n, sizeof *v, cmp_double);
    return n % 2 ? v[n / 2] : (v[n / 2 - 1] + v[n / 2]) / 2;
}

static int report_failure(const char *what, int rc) {
    fprintf(stderr, "%s: %s: %s\n", what, fajit_strerror(rc), fajit_last_error());
    return 1;
}

/* ---------------------------------------------------------------- child processes */

/* Runs this program with `mode` and reads `count` numbers from the one line it
 * prints. 0, or -1 if it failed. */
static int run_child(const char *exe, const char *mode, double *values, int count) {
    char cmd[PATH_MAX + 32];
    snprintf(cmd, sizeof cmd, "'%s' %s", exe, mode);
    FILE *f = popen(cmd, "r");
    if (!f)
        return -1;
    int n = 0;
    while (n < count && fscanf(f, "%lf", &values[n]) == 1)
        ++n;
    const int status = pclose(f);
    return n == count && status == 0 ? 0 : -1;
}

/* ---------------------------------------------------------------- 1. cold compile */

/* One cold compile, in a fresh process and context with the cache off. A
 * first compile of another variant loads NVRTC, and is reported apart.
 * Where a CUDA driver is installed, NVRTC keeps ptxas output in the driver's
 * compute cache (~/.nv/ComputeCache), across processes: a repeated variant
 * then takes ~25 ms and prints no ptxas report. The parent sets
 * CUDA_CACHE_DISABLE=1 for these children, so each run really compiles.
 * Prints "first_ms cold_call_ms cold_nvrtc_ms registers". */
static int cold_child_main(void) {
    static const char *const warmup_spec = "ref dqk=64 dtype=bf16 arch=sm_90";
    fajit_options opt;
    fajit_options_init(&opt);
    opt.cache_mode = FAJIT_CACHE_OFF;
    fajit_ctx *ctx = NULL;
    fajit_compile_result res;
    memset(&res, 0, sizeof res);
    res.struct_size = sizeof res;
    int rc = fajit_create(&ctx, &opt);
    const double t0 = now_ms();
    if (rc == FAJIT_OK)
        rc = fajit_compile(ctx, warmup_spec, NULL);
    const double t1 = now_ms();
    if (rc == FAJIT_OK)
        rc = fajit_compile(ctx, cold_spec, &res);
    const double t2 = now_ms();
    fajit_destroy(ctx);
    if (rc != FAJIT_OK)
        return report_failure("cold compile", rc);
    if (res.cached) {
        fprintf(stderr, "fajit_compile found the variant cached with the cache off\n");
        return 1;
    }
    printf("%f %f %f %d\n", t1 - t0, t2 - t1, res.compile_ms, res.registers);
    return 0;
}

static int bench_cold_compile(const char *exe) {
    double first[RUNS], call[RUNS], nvrtc[RUNS];
    setenv("CUDA_CACHE_DISABLE", "1", 1); /* for the children; see cold_child_main */
    for (int i = 0; i < RUNS; ++i) {
        double v[4];
        if (run_child(exe, "--cold-child", v, 4) != 0)
            return 1;
        first[i] = v[0];
        call[i] = v[1];
        nvrtc[i] = v[2];
        printf("  process %d: first compile (loads NVRTC) %.1f ms; this variant: fajit_compile "
               "%.1f ms, NVRTC %.1f ms, %d registers%s\n",
               i + 1, first[i], call[i], nvrtc[i], (int)v[3],
               v[3] > 0 ? "" : " (no ptxas report: served from a compute cache?)");
    }
    printf("cold compile, median of %d fresh processes: fajit_compile %.1f ms, NVRTC %.1f ms "
           "(first compile in a process, NVRTC loading included: %.1f ms)\n  (%s)\n",
           RUNS, median(call, RUNS), median(nvrtc, RUNS), median(first, RUNS), cold_spec);
    unsetenv("CUDA_CACHE_DISABLE");
    return 0;
}

/* ---------------------------------------------------------------- 2. cached load */

/* The problem both the parent (to learn its variant) and the children run. */
static void problem_args(fajit_attn_args *a, const void *q, const void *k, const void *v, void *o) {
    fajit_attn_args_init(a);
    a->q = q;
    a->k = k;
    a->v = v;
    a->o = o;
    a->batch = 1;
    a->seqlen_q = a->seqlen_k = 128;
    a->nheads_q = a->nheads_kv = 1;
    a->dqk = a->dv = 128;
    a->dtype = FAJIT_DTYPE_FP16;
    a->mask = FAJIT_MASK_NONE;
    a->kernel = FAJIT_KERNEL_REFERENCE;
}

/* Child: prints "create_ms first_ms second_ms compiles" for the parent. The
 * CUDA context is made first and not timed: it is not the cache's cost. */
static int load_child_main(void) {
    void *buf = NULL;
    const size_t bytes = 128 * 128 * 2;
    if (cudaMalloc(&buf, 4 * bytes) != cudaSuccess || cudaMemset(buf, 0, 4 * bytes) != cudaSuccess)
        return 1;
    char *b = buf;
    fajit_attn_args a;
    problem_args(&a, b, b + bytes, b + 2 * bytes, b + 3 * bytes);

    fajit_ctx *ctx = NULL;
    const double t0 = now_ms();
    int rc = fajit_create(&ctx, NULL);
    const double t1 = now_ms();
    if (rc == FAJIT_OK)
        rc = fajit_attn_fwd(ctx, &a, NULL);
    const double t2 = now_ms();
    if (rc == FAJIT_OK)
        rc = fajit_attn_fwd(ctx, &a, NULL);
    const double t3 = now_ms();
    fajit_cache_stats st;
    memset(&st, 0, sizeof st);
    st.struct_size = sizeof st;
    if (rc == FAJIT_OK)
        rc = fajit_cache_get_stats(ctx, &st);
    if (rc != FAJIT_OK || cudaDeviceSynchronize() != cudaSuccess)
        return report_failure("child", rc);
    printf("%f %f %f %llu\n", t1 - t0, t2 - t1, t3 - t2, (unsigned long long)st.compiles);
    fajit_destroy(ctx);
    cudaFree(buf);
    return 0;
}

/* Fills the cache with the exact variant fajit_attn_fwd will ask for. */
static int populate_cache(const char *dir, char *variant, size_t cap) {
    fajit_options opt;
    fajit_options_init(&opt);
    opt.cache_dir = dir;
    opt.cache_mode = FAJIT_CACHE_READWRITE;
    fajit_ctx *ctx = NULL;
    fajit_attn_args a;
    problem_args(&a, NULL, NULL, NULL, NULL);
    int rc = fajit_create(&ctx, &opt);
    if (rc == FAJIT_OK && (rc = fajit_attn_variant(ctx, &a, variant, cap)) >= 0)
        rc = fajit_compile(ctx, variant, NULL);
    fajit_destroy(ctx);
    return rc < 0 ? report_failure("populating the cache", rc) : 0;
}

static int remove_one(const char *path, const struct stat *sb, int type, struct FTW *ftw) {
    (void)sb;
    (void)type;
    (void)ftw;
    return remove(path);
}

static int bench_cached_load(const char *exe) {
    int count = 0;
    if (cudaGetDeviceCount(&count) != cudaSuccess || count == 0) {
        printf("cached load in a fresh process: skipped (no CUDA GPU)\n");
        return 0;
    }
    char dir[] = "/tmp/fajit-bench-cache-XXXXXX", variant[512];
    if (!mkdtemp(dir))
        return 1;
    setenv("FAJIT_CACHE_DIR", dir, 1);
    unsetenv("FAJIT_CACHE_MODE");
    int failed = populate_cache(dir, variant, sizeof variant);
    double create[RUNS], first[RUNS], second[RUNS];
    for (int i = 0; i < RUNS && !failed; ++i) {
        double v[4];
        failed = run_child(exe, "--load-child", v, 4) != 0;
        create[i] = v[0];
        first[i] = v[1];
        second[i] = v[2];
        if (!failed && v[3] != 1) { /* the parent's compile, and no other */
            fprintf(stderr, "a child compiled (compiles = %.0f): the cache was missed\n", v[3]);
            failed = 1;
        }
        if (!failed)
            printf("  process %d: fajit_create %.2f ms, first fajit_attn_fwd %.2f ms, second %.3f ms\n",
                   i + 1, create[i], first[i], second[i]);
    }
    if (!failed)
        printf("cached load, median of %d fresh processes: fajit_create %.2f ms, first call "
               "(LMDB + cuModuleLoadData + launch) %.2f ms, warm call %.3f ms\n  (%s)\n",
               RUNS, median(create, RUNS), median(first, RUNS), median(second, RUNS), variant);
    nftw(dir, remove_one, 8, FTW_DEPTH | FTW_PHYS);
    return failed;
}

int main(int argc, char **argv) {
    if (argc > 1 && strcmp(argv[1], "--cold-child") == 0)
        return cold_child_main();
    if (argc > 1 && strcmp(argv[1], "--load-child") == 0)
        return load_child_main();
    char exe[PATH_MAX];
    const ssize_t n = readlink("/proc/self/exe", exe, sizeof exe - 1);
    if (n <= 0)
        return 1;
    exe[n] = '\0';
    printf("bench_compile (fajit %s)\n", fajit_version());
    int failed = bench_cold_compile(exe);
    failed |= bench_cached_load(exe);
    return failed;
}
