/*
 * benchmarks/bench_dispatch.c - host cost of a warm fajit_attn_fwd call, next to
 * a bare cuLaunchKernel of the same kernel (GPU needed).
 *
 * A tiny problem (b=1 h=1 sq=sk=1 d=64 fp16) so the GPU never holds the host
 * back: the time measured is what the call costs the calling thread. Each
 * sample is a batch of calls timed with clock_gettime, the stream drained
 * between batches (untimed); the table shows the median and spread of the
 * per-call times of the batches.
 *
 * The bare launch uses the very kernel fajit runs: its variant text
 * (fajit_attn_variant) and source (fajit_variant_source), compiled here with
 * NVRTC with the runtime's options, loaded with cuModuleLoadData, launched with
 * the same geometry and an identical struct fajit_fwd_params. Both outputs are
 * compared byte for byte.
 */
#include <cuda.h>
#include <math.h>
#include <nvrtc.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "fajit.h"
#include "templates/fwd_params.h"

#define BATCHES 100
#define CALLS_PER_BATCH 100 /* 10000 calls in all */
#define DIM 64

typedef struct bench_ctx {
    CUdeviceptr q, k, v, o_fajit, o_bare;
    fajit_ctx *fj;
    fajit_attn_args args;
    CUmodule module;
    CUfunction fn;
    struct fajit_fwd_params params;
    unsigned grid[3], block;
} bench_ctx;

static double now_us(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec * 1e6 + ts.tv_nsec / 1e3;
}

static int cu_failed(CUresult r, const char *what) {
    if (r == CUDA_SUCCESS)
        return 0;
    const char *name = "?";
    cuGetErrorName(r, &name);
    fprintf(stderr, "%s: %s\n", what, name);
    return 1;
}

static int fajit_failed(int rc, const char *what) {
    if (rc >= 0)
        return 0;
    fprintf(stderr, "%s: %s: %s\n", what, fajit_strerror(rc), fajit_last_error());
    return 1;
}

/* ---------------------------------------------------------------- the bare kernel */

/* Reads the integer after "name=" in canonical variant text; -1 if absent. */
static int variant_field(const char *text, const char *name) {
    char key[32];
    snprintf(key, sizeof key, " %s=", name);
    const char *at = strstr(text, key);
    return at ? atoi(at + strlen(key)) : -1;
}

static int compile_cubin(const char *src, const char *arch_opt, char **cubin) {
    const char *opts[] = {"-std=c++17", arch_opt}; /* as runtime/compile.c, less -v */
    nvrtcProgram prog;
    size_t n = 0;
    if (nvrtcCreateProgram(&prog, src, "fajit.cu", 0, NULL, NULL) != NVRTC_SUCCESS)
        return 1;
    int failed = nvrtcCompileProgram(prog, 2, opts) != NVRTC_SUCCESS ||
                 nvrtcGetCUBINSize(prog, &n) != NVRTC_SUCCESS || !(*cubin = malloc(n)) ||
                 nvrtcGetCUBIN(prog, *cubin) != NVRTC_SUCCESS;
    if (failed)
        fprintf(stderr, "NVRTC could not compile the variant's source\n");
    nvrtcDestroyProgram(&prog);
    return failed;
}

/* Loads the kernel of fajit's variant and sets up the launch as the runtime does. */
static int load_bare_kernel(bench_ctx *b) {
    char variant[512], arch_opt[64], *src = NULL, *cubin = NULL;
    size_t len = 0;
    if (fajit_failed(fajit_attn_variant(b->fj, &b->args, variant, sizeof variant), "fajit_attn_variant") ||
        fajit_failed(fajit_variant_source(b->fj, variant, &src, &len), "fajit_variant_source"))
        return 1;
    const char *arch = strstr(variant, " arch=");
    snprintf(arch_opt, sizeof arch_opt, "--gpu-architecture=%s", arch ? arch + 6 : "?");
    int failed = compile_cubin(src, arch_opt, &cubin) ||
                 cu_failed(cuModuleLoadData(&b->module, cubin), "cuModuleLoadData") ||
                 /* the reference's entry point (codegen/ops.c); not in the public API */
                 cu_failed(cuModuleGetFunction(&b->fn, b->module, "fajit_ref_fwd"), "cuModuleGetFunction");
    fajit_free(src);
    free(cubin);
    const int bm = variant_field(variant, "bm"), warps = variant_field(variant, "warps");
    if (!failed && (bm <= 0 || warps <= 0)) {
        fprintf(stderr, "no bm/warps in '%s'\n", variant);
        failed = 1;
    }
    if (failed)
        return 1;
    printf("variant: %s\n", variant);

    struct fajit_fwd_params *p = &b->params;
    memset(p, 0, sizeof *p);
    p->q = (const void *)b->q;
    p->k = (const void *)b->k;
    p->v = (const void *)b->v;
    p->o = (void *)b->o_bare;
    const fajit_i64 strides[3] = {DIM, DIM, DIM}; /* (1, 1, 1, DIM) contiguous */
    memcpy(p->q_stride, strides, sizeof strides);
    memcpy(p->k_stride, strides, sizeof strides);
    memcpy(p->v_stride, strides, sizeof strides);
    memcpy(p->o_stride, strides, sizeof strides);
    p->batch = p->seqlen_q = p->seqlen_k = p->nheads_q = p->nheads_kv = 1;
    p->softmax_scale = 1.0f / sqrtf((float)DIM);
    p->softmax_scale_log2 = p->softmax_scale * 1.4426950408889634f;
    b->grid[0] = (unsigned)((p->seqlen_q + bm - 1) / bm);
    b->grid[1] = (unsigned)p->nheads_q;
    b->grid[2] = (unsigned)p->batch;
    b->block = (unsigned)(warps * 32);
    return 0;
}

static CUresult launch_bare(bench_ctx *b) {
    void *kargs[] = {&b->params};
    return cuLaunchKernel(b->fn, b->grid[0], b->grid[1], b->grid[2], b->block, 1, 1, 0, NULL, kargs, NULL);
}

/* ---------------------------------------------------------------- setup */

static int setup(bench_ctx *b) {
    CUdevice dev;
    CUcontext cu;
    memset(b, 0, sizeof *b);
    if (cu_failed(cuDeviceGet(&dev, 0), "cuDeviceGet") ||
        cu_failed(cuDevicePrimaryCtxRetain(&cu, dev), "cuDevicePrimaryCtxRetain") ||
        cu_failed(cuCtxSetCurrent(cu), "cuCtxSetCurrent"))
        return 1;
    CUdeviceptr *bufs[] = {&b->q, &b->k, &b->v, &b->o_fajit, &b->o_bare};
    for (size_t i = 0; i < sizeof bufs / sizeof bufs[0]; ++i)
        if (cu_failed(cuMemAlloc(bufs[i], DIM * 2), "cuMemAlloc") ||
            cu_failed(cuMemsetD16(*bufs[i], (unsigned short)(0x3c00 + 0x100 * i), DIM), "cuMemsetD16"))
            return 1; /* q=1, k=1.25... (fp16): nonzero inputs, distinct outputs' poison */

    fajit_options opt;
    fajit_options_init(&opt);
    opt.cache_mode = FAJIT_CACHE_OFF; /* the first call compiles in memory; the rest hit */
    if (fajit_failed(fajit_create(&b->fj, &opt), "fajit_create"))
        return 1;
    fajit_attn_args *a = &b->args;
    fajit_attn_args_init(a);
    a->q = (const void *)b->q;
    a->k = (const void *)b->k;
    a->v = (const void *)b->v;
    a->o = (void *)b->o_fajit;
    a->batch = a->seqlen_q = a->seqlen_k = a->nheads_q = a->nheads_kv = 1;
    a->dqk = a->dv = DIM;
    a->dtype = FAJIT_DTYPE_FP16;
    a->kernel = FAJIT_KERNEL_REFERENCE;
    return load_bare_kernel(b);
}

/* Both paths must have computed the same thing. */
static int outputs_match(bench_ctx *b) {
    unsigned short x[DIM], y[DIM];
    if (cu_failed(cuCtxSynchronize(), "kernel") || cu_failed(cuMemcpyDtoH(x, b->o_fajit, sizeof x), "copy") ||
        cu_failed(cuMemcpyDtoH(y, b->o_bare, sizeof y), "copy"))
        return 0;
    return memcmp(x, y, sizeof x) == 0;
}

/* ---------------------------------------------------------------- timing */

static int cmp_double(const void *x, const void *y) {
    const double a = *(const double *)x, c = *(const double *)y;
    return (a > c) - (a < c);
}

typedef struct timing {
    double median, p10, p90;
} timing;

/* Median and spread of a sorted array of per-call times. */
static void summarize(double *per_call, timing *t) {
    qsort(per_call, BATCHES, sizeof per_call[0], cmp_double);
    t->median = (per_call[BATCHES / 2 - 1] + per_call[BATCHES / 2]) / 2;
    t->p10 = per_call[BATCHES / 10];
    t->p90 = per_call[BATCHES * 9 / 10];
}

/* Host time of one batch of CALLS_PER_BATCH calls, per call; -1 on error. */
static double time_batch(bench_ctx *b, int use_fajit) {
    int bad = 0;
    const double t0 = now_us();
    for (int c = 0; c < CALLS_PER_BATCH; ++c)
        bad |= use_fajit ? fajit_attn_fwd(b->fj, &b->args, NULL) != FAJIT_OK
                         : launch_bare(b) != CUDA_SUCCESS;
    const double per_call = (now_us() - t0) / CALLS_PER_BATCH;
    return bad || cu_failed(cuCtxSynchronize(), "batch") ? -1 : per_call;
}

/* fajit and bare batches alternate, so drift of a shared host (clocks, other
 * tenants) hits both alike. */
static int time_calls(bench_ctx *b, timing *tf, timing *tb) {
    double fajit[BATCHES], bare[BATCHES];
    for (int i = 0; i < BATCHES; ++i) {
        fajit[i] = time_batch(b, 1);
        bare[i] = time_batch(b, 0);
        if (fajit[i] < 0 || bare[i] < 0)
            return 1;
    }
    summarize(fajit, tf);
    summarize(bare, tb);
    return 0;
}

/* Host time of the two driver calls fajit's warm path adds to a launch
 * (fajit's own code costs ~0.1 us: measured with a stub driver), best of 20
 * batches of 10000. */
static void time_context_queries(void) {
    CUcontext cu = NULL;
    unsigned long long id = 0;
    double best_current = 1e30, best_id = 1e30;
    for (int r = 0; r < 20; ++r) {
        double t0 = now_us();
        for (int i = 0; i < 10000; ++i)
            cuCtxGetCurrent(&cu);
        double t1 = now_us();
        for (int i = 0; i < 10000; ++i)
            cuCtxGetId(cu, &id);
        double t2 = now_us();
        best_current = fmin(best_current, (t1 - t0) / 10000);
        best_id = fmin(best_id, (t2 - t1) / 10000);
    }
    printf("%-36s %10.3f\n", "cuCtxGetCurrent (best batch)", best_current);
    printf("%-36s %10.3f\n", "cuCtxGetId (best batch)", best_id);
}

int main(void) {
    const CUresult init = cuInit(0);
    int count = 0;
    if (init != CUDA_SUCCESS || cuDeviceGetCount(&count) != CUDA_SUCCESS || count == 0) {
        const char *name = "no device";
        if (init != CUDA_SUCCESS)
            cuGetErrorName(init, &name);
        printf("bench_dispatch: skipped (no CUDA GPU: %s)\n", name);
        return 0;
    }
    bench_ctx b;
    timing tf, tb;
    if (setup(&b))
        return 1;
    /* Warm both paths (fajit's first call compiles), then check they agree. */
    if (fajit_failed(fajit_attn_fwd(b.fj, &b.args, NULL), "fajit_attn_fwd") ||
        cu_failed(launch_bare(&b), "cuLaunchKernel"))
        return 1;
    const int same = outputs_match(&b);
    if (time_calls(&b, &tf, &tb))
        return 1;

    printf("host time per call, %d calls each in alternating batches of %d (b=1 h=1 sq=sk=1 d=%d fp16)\n",
           BATCHES * CALLS_PER_BATCH, CALLS_PER_BATCH, DIM);
    printf("%-36s %10s %10s %10s\n", "", "median us", "p10 us", "p90 us");
    printf("%-36s %10.3f %10.3f %10.3f\n", "fajit_attn_fwd (warm in-process hit)", tf.median, tf.p10, tf.p90);
    printf("%-36s %10.3f %10.3f %10.3f\n", "cuLaunchKernel (same kernel, bare)", tb.median, tb.p10, tb.p90);
    printf("%-36s %10.3f\n", "fajit overhead", tf.median - tb.median);
    printf("outputs identical: %s\n", same ? "yes" : "NO");
    time_context_queries();
    fajit_destroy(b.fj);
    cuModuleUnload(b.module);
    return same ? 0 : 1;
}
