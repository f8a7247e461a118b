/*
 * benchmarks/bench_compile.c - compile and cache latency, through the public API.
 *
 *  1. Cold compile: fajit_compile of one reference variant in a fresh context
 *     with the cache off (so nothing is found), 5 runs, each in its own context.
 *     No GPU needed: this is the NVRTC cost a user pays on a first call.
 *  2. Cached load in a fresh process (GPU only): a temporary cache is filled
 *     with fajit_compile, then 5 fresh child processes (this program with
 *     --child) each time their first fajit_attn_fwd call, which finds the cubin
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

/* ---------------------------------------------------------------- 1. cold compile */

static int bench_cold_compile(void) {
    double nvrtc_ms[RUNS], call_ms[RUNS];
    for (int i = 0; i < RUNS; ++i) {
        fajit_options opt;
        fajit_options_init(&opt);
        opt.cache_mode = FAJIT_CACHE_OFF;
        fajit_ctx *ctx = NULL;
        int rc = fajit_create(&ctx, &opt);
        if (rc != FAJIT_OK)
            return report_failure("fajit_create", rc);
        fajit_compile_result res;
        memset(&res, 0, sizeof res);
        res.struct_size = sizeof res;
        const double t0 = now_ms();
        rc = fajit_compile(ctx, cold_spec, &res);
        call_ms[i] = now_ms() - t0;
        nvrtc_ms[i] = res.compile_ms;
        fajit_destroy(ctx);
        if (rc != FAJIT_OK)
            return report_failure("fajit_compile", rc);
        if (res.cached) {
            fprintf(stderr, "fajit_compile found the variant cached with the cache off\n");
            return 1;
        }
        printf("  run %d: fajit_compile %.1f ms (NVRTC %.1f ms), %d registers, %llu-byte cubin\n",
               i + 1, call_ms[i], nvrtc_ms[i], res.registers, (unsigned long long)res.cubin_bytes);
    }
    printf("cold compile, median of %d fresh contexts: fajit_compile %.1f ms, NVRTC %.1f ms\n  (%s)\n",
           RUNS, median(call_ms, RUNS), median(nvrtc_ms, RUNS), cold_spec);
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
static int child_main(void) {
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

static int run_child(const char *exe, double *create_ms, double *first_ms, double *second_ms,
                     unsigned long long *compiles) {
    char cmd[PATH_MAX + 32];
    snprintf(cmd, sizeof cmd, "'%s' --child", exe);
    FILE *f = popen(cmd, "r");
    if (!f)
        return -1;
    const int n = fscanf(f, "%lf %lf %lf %llu", create_ms, first_ms, second_ms, compiles);
    const int status = pclose(f);
    return n == 4 && status == 0 ? 0 : -1;
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

static int bench_cached_load(void) {
    int count = 0;
    if (cudaGetDeviceCount(&count) != cudaSuccess || count == 0) {
        printf("cached load in a fresh process: skipped (no CUDA GPU)\n");
        return 0;
    }
    char exe[PATH_MAX], dir[] = "/tmp/fajit-bench-cache-XXXXXX", variant[512];
    const ssize_t n = readlink("/proc/self/exe", exe, sizeof exe - 1);
    if (n <= 0 || !mkdtemp(dir))
        return 1;
    exe[n] = '\0';
    setenv("FAJIT_CACHE_DIR", dir, 1);
    unsetenv("FAJIT_CACHE_MODE");
    int failed = populate_cache(dir, variant, sizeof variant);
    double create[RUNS], first[RUNS], second[RUNS];
    for (int i = 0; i < RUNS && !failed; ++i) {
        unsigned long long compiles = 0;
        failed = run_child(exe, &create[i], &first[i], &second[i], &compiles) != 0;
        if (!failed && compiles != 1) { /* the parent's compile, and no other */
            fprintf(stderr, "a child compiled (compiles = %llu): the cache was missed\n", compiles);
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
    if (argc > 1 && strcmp(argv[1], "--child") == 0)
        return child_main();
    printf("bench_compile (fajit %s)\n", fajit_version());
    int failed = bench_cold_compile();
    failed |= bench_cached_load();
    return failed;
}
