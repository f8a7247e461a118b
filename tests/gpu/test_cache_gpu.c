/*
 * tests/gpu/test_cache_gpu.c - a second process finds the kernel in the cache
 * and compiles nothing.
 *
 * The parent makes a fresh cache directory and runs itself twice as a child
 * (fork + exec of /proc/self/exe --child): each child runs the same attention
 * through fajit_attn_fwd, checks the result against the CPU reference, and
 * destroys its context (which flushes its cache counters to the store). After
 * each child, the parent reads the persistent counters with
 * fajit_cache_get_stats: the first child must have compiled the variant; the
 * second must have hit the cache with no compile and no new entry.
 *
 * Exit 0 pass, 1 fail, 77 no GPU.
 */
#include <cuda_runtime_api.h>
#include <ftw.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#include "attn_check.h"
#include "fajit.h"

static int failures;

static void check(int ok, const char *what) {
    printf("%s %s\n", ok ? "ok  " : "FAIL", what);
    failures += !ok;
}

/* ---------------------------------------------------------------- child */

/* The one variant both children run: bf16, bottom-right causal, dqk 72, GQA. */
static const attn_shape child_shape = {.batch = 2, .seqlen_q = 33, .seqlen_k = 47, .nheads_q = 4,
                                       .nheads_kv = 2, .dqk = 72, .dv = 72, .dtype = 1, .mask = 1};

static int cuda_ok(cudaError_t e, const char *what) {
    if (e != cudaSuccess)
        printf("child: %s: %s\n", what, cudaGetErrorName(e));
    return e == cudaSuccess;
}

/* Runs the attention once through a fresh context; 0 if it ran and is right. */
static int child_main(void) {
    attn_problem p;
    if (attn_problem_init(&p, &child_shape, ATTN_CONTIGUOUS, 42) != 0)
        return 1;
    const size_t lse_elems = (size_t)(p.s.batch * p.s.nheads_q * p.s.seqlen_q);
    uint16_t *in = NULL, *o = NULL, *host_o = malloc(p.o_elems * 2);
    float *lse = NULL, *host_lse = malloc(lse_elems * 4);
    fajit_ctx *ctx = NULL;
    int ok = host_o && host_lse && cuda_ok(cudaMalloc((void **)&in, p.in_elems * 2), "cudaMalloc") &&
             cuda_ok(cudaMalloc((void **)&o, p.o_elems * 2), "cudaMalloc") &&
             cuda_ok(cudaMalloc((void **)&lse, lse_elems * 4), "cudaMalloc") &&
             cuda_ok(cudaMemcpy(in, p.in, p.in_elems * 2, cudaMemcpyHostToDevice), "cudaMemcpy") &&
             cuda_ok(cudaMemset(o, 0xff, p.o_elems * 2), "cudaMemset") &&
             cuda_ok(cudaMemset(lse, 0xff, lse_elems * 4), "cudaMemset");
    int rc = ok ? fajit_create(&ctx, NULL) : FAJIT_OK;
    if (ok && rc == FAJIT_OK) {
        fajit_attn_args a;
        fajit_attn_args_init(&a);
        a.q = in + p.q_off;
        a.k = in + p.k_off;
        a.v = in + p.v_off;
        a.o = o;
        a.lse = lse;
        a.batch = p.s.batch;
        a.seqlen_q = p.s.seqlen_q;
        a.seqlen_k = p.s.seqlen_k;
        a.nheads_q = p.s.nheads_q;
        a.nheads_kv = p.s.nheads_kv;
        a.dqk = p.s.dqk;
        a.dv = p.s.dv;
        a.dtype = p.s.dtype;
        a.mask = p.s.mask;
        a.kernel = FAJIT_KERNEL_REFERENCE;
        rc = fajit_attn_fwd(ctx, &a, NULL);
    }
    if (rc != FAJIT_OK) {
        printf("child: %s: %s\n", fajit_strerror(rc), fajit_last_error());
        ok = 0;
    }
    ok = ok && cuda_ok(cudaDeviceSynchronize(), "kernel") &&
         cuda_ok(cudaMemcpy(host_o, o, p.o_elems * 2, cudaMemcpyDeviceToHost), "cudaMemcpy") &&
         cuda_ok(cudaMemcpy(host_lse, lse, lse_elems * 4, cudaMemcpyDeviceToHost), "cudaMemcpy");
    if (ok) {
        attn_result r;
        attn_check(&p, host_o, host_lse, &r);
        if (!r.ok)
            printf("child: wrong result: %s\n", r.why);
        ok = r.ok;
    }
    fajit_destroy(ctx); /* flushes this process's counters to the store */
    cudaFree(in);
    cudaFree(o);
    cudaFree(lse);
    free(host_o);
    free(host_lse);
    attn_problem_free(&p);
    return ok ? 0 : 1;
}

/* ---------------------------------------------------------------- parent */

static int run_child(void) {
    fflush(stdout);
    const pid_t pid = fork();
    if (pid < 0)
        return -1;
    if (pid == 0) {
        execl("/proc/self/exe", "test_cache_gpu", "--child", (char *)NULL);
        _exit(127);
    }
    int status = 0;
    if (waitpid(pid, &status, 0) != pid)
        return -1;
    return WIFEXITED(status) ? WEXITSTATUS(status) : -1;
}

/* The store's persistent counters, read through a context of our own. */
static int read_stats(const char *dir, fajit_cache_stats *st) {
    fajit_options opt;
    fajit_options_init(&opt);
    opt.cache_dir = dir;
    opt.cache_mode = FAJIT_CACHE_READWRITE;
    fajit_ctx *ctx = NULL;
    int rc = fajit_create(&ctx, &opt);
    if (rc == FAJIT_OK) {
        memset(st, 0, sizeof *st);
        st->struct_size = sizeof *st;
        rc = fajit_cache_get_stats(ctx, st);
    }
    if (rc != FAJIT_OK)
        printf("FAIL reading cache stats: %s: %s\n", fajit_strerror(rc), fajit_last_error());
    fajit_destroy(ctx);
    return rc;
}

static int remove_one(const char *path, const struct stat *sb, int type, struct FTW *ftw) {
    (void)sb;
    (void)type;
    (void)ftw;
    return remove(path);
}

static int require_gpu(void) {
    int count = 0;
    const cudaError_t e = cudaGetDeviceCount(&count);
    if (e != cudaSuccess || count == 0) {
        printf("SKIP: no CUDA GPU (%s)\n",
               e != cudaSuccess ? cudaGetErrorString(e) : "cudaGetDeviceCount returned 0");
        return 77;
    }
    return 0;
}

static void check_two_processes(const char *dir) {
    char line[256];
    fajit_cache_stats s0, s1, s2;
    if (read_stats(dir, &s0) != FAJIT_OK)
        goto unreadable;
    check(s0.entries == 0 && s0.compiles == 0, "a fresh cache directory is empty");

    check(run_child() == 0, "process A ran the variant and got the right result");
    if (read_stats(dir, &s1) != FAJIT_OK)
        goto unreadable;
    snprintf(line, sizeof line, "process A compiled it (compiles %llu -> %llu, entries %llu)",
             (unsigned long long)s0.compiles, (unsigned long long)s1.compiles,
             (unsigned long long)s1.entries);
    check(s1.compiles == s0.compiles + 1 && s1.entries == 1, line);

    check(run_child() == 0, "process B ran the variant and got the right result");
    if (read_stats(dir, &s2) != FAJIT_OK)
        goto unreadable;
    snprintf(line, sizeof line,
             "process B found it in the cache (compiles %llu -> %llu, hits %llu -> %llu, entries %llu)",
             (unsigned long long)s1.compiles, (unsigned long long)s2.compiles,
             (unsigned long long)s1.hits, (unsigned long long)s2.hits,
             (unsigned long long)s2.entries);
    check(s2.compiles == s1.compiles && s2.hits > s1.hits && s2.entries == s1.entries, line);
    return;
unreadable: /* read_stats printed why */
    ++failures;
}

int main(int argc, char **argv) {
    if (argc > 1 && strcmp(argv[1], "--child") == 0)
        return child_main();
    const int skip = require_gpu();
    if (skip)
        return skip;

    char dir[] = "/tmp/fajit-test-cache-gpu-XXXXXX";
    if (!mkdtemp(dir)) {
        perror("mkdtemp");
        return 1;
    }
    /* The children take the cache from the environment, read-write. */
    setenv("FAJIT_CACHE_DIR", dir, 1);
    unsetenv("FAJIT_CACHE_MODE");
    check_two_processes(dir);
    nftw(dir, remove_one, 8, FTW_DEPTH | FTW_PHYS);
    printf("test_cache_gpu: %d failed\n", failures);
    return failures ? 1 : 0;
}
