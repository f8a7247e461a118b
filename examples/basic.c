/*
 * examples/basic.c - the smallest complete use of libfajit from C:
 * a context, attention on device buffers (head dim 72 by default, causal, bf16), a check
 * of sampled rows against a CPU fp64 reference, and the time per call.
 *
 *   fajit_example [dqk] [seqlen]
 */
#include <cuda_runtime.h>
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "fajit.h"

#define CHECK_CUDA(call)                                                             \
    do {                                                                             \
        cudaError_t e_ = (call);                                                     \
        if (e_ != cudaSuccess) {                                                     \
            fprintf(stderr, "%s:%d: %s: %s\n", __FILE__, __LINE__, #call,            \
                    cudaGetErrorString(e_));                                         \
            exit(1);                                                                 \
        }                                                                            \
    } while (0)

static float bf16_to_float(uint16_t h)
{
    uint32_t bits = (uint32_t)h << 16;
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

static uint16_t float_to_bf16(float f)
{
    uint32_t bits;
    memcpy(&bits, &f, 4);
    return (uint16_t)((bits + 0x7fff + ((bits >> 16) & 1)) >> 16);
}

static uint16_t *random_bf16(size_t n, uint64_t *state)
{
    uint16_t *h = malloc(n * sizeof *h);
    for (size_t i = 0; i < n; i++) {
        *state = *state * 6364136223846793005ULL + 1442695040888963407ULL;
        h[i] = float_to_bf16((float)((*state >> 40) / (double)(1 << 24) * 2.0 - 1.0));
    }
    return h;
}

/* fp64 causal attention of one query row (bottom-right aligned; sq == sk here). */
static void reference_row(const uint16_t *q, const uint16_t *k, const uint16_t *v, int s, int h,
                          int d, int i, int head, double *out)
{
    double *p = malloc((size_t)s * sizeof *p), m = -INFINITY, l = 0;
    for (int j = 0; j <= i; j++) {
        double dot = 0;
        for (int c = 0; c < d; c++)
            dot += (double)bf16_to_float(q[((size_t)i * h + head) * d + c]) *
                   bf16_to_float(k[((size_t)j * h + head) * d + c]);
        p[j] = dot / sqrt((double)d);
        m = p[j] > m ? p[j] : m;
    }
    for (int c = 0; c < d; c++)
        out[c] = 0;
    for (int j = 0; j <= i; j++) {
        p[j] = exp(p[j] - m);
        l += p[j];
        for (int c = 0; c < d; c++)
            out[c] += p[j] * bf16_to_float(v[((size_t)j * h + head) * d + c]);
    }
    for (int c = 0; c < d; c++)
        out[c] /= l;
    free(p);
}

int main(int argc, char **argv)
{
    int d = argc > 1 ? atoi(argv[1]) : 72, s = argc > 2 ? atoi(argv[2]) : 2048, h = 16, b = 1;
    size_t n = (size_t)b * s * h * d;
    uint64_t seed = 42;
    int ndev = 0, rc;
    fajit_ctx *ctx;
    fajit_attn_args a;
    char variant[512];

    if (cudaGetDeviceCount(&ndev) != cudaSuccess || ndev == 0) {
        printf("fajit_example: no CUDA GPU here, nothing to run (kernels still compile: see "
               "fajit prebuild)\n");
        return 0;
    }
    if ((rc = fajit_create(&ctx, NULL)) != 0) {
        fprintf(stderr, "fajit_create: %s: %s\n", fajit_strerror(rc), fajit_last_error());
        return 1;
    }
    uint16_t *hq = random_bf16(n, &seed), *hk = random_bf16(n, &seed), *hv = random_bf16(n, &seed);
    uint16_t *ho = malloc(n * sizeof *ho);
    void *dq, *dk, *dv, *dout;
    CHECK_CUDA(cudaMalloc(&dq, n * 2));
    CHECK_CUDA(cudaMalloc(&dk, n * 2));
    CHECK_CUDA(cudaMalloc(&dv, n * 2));
    CHECK_CUDA(cudaMalloc(&dout, n * 2));
    CHECK_CUDA(cudaMemcpy(dq, hq, n * 2, cudaMemcpyHostToDevice));
    CHECK_CUDA(cudaMemcpy(dk, hk, n * 2, cudaMemcpyHostToDevice));
    CHECK_CUDA(cudaMemcpy(dv, hv, n * 2, cudaMemcpyHostToDevice));
    CHECK_CUDA(cudaMemset(dout, 0xff, n * 2)); /* NaN: unwritten outputs fail the check */

    /* The call: shapes in elements, contiguous (batch, seqlen, heads, dim). */
    fajit_attn_args_init(&a);
    a.q = dq, a.k = dk, a.v = dv, a.o = dout;
    a.batch = b, a.seqlen_q = a.seqlen_k = s, a.nheads_q = a.nheads_kv = h;
    a.dqk = a.dv = d;
    a.dtype = FAJIT_DTYPE_BF16;
    a.mask = FAJIT_MASK_CAUSAL;
    if ((rc = fajit_attn_fwd(ctx, &a, NULL)) != 0) {
        fprintf(stderr, "fajit_attn_fwd: %s: %s\n", fajit_strerror(rc), fajit_last_error());
        return 1;
    }
    CHECK_CUDA(cudaDeviceSynchronize());
    CHECK_CUDA(cudaMemcpy(ho, dout, n * 2, cudaMemcpyDeviceToHost));
    fajit_attn_variant(ctx, &a, variant, sizeof variant);

    /* Check 64 sampled rows against fp64. */
    double worst = 0, *ref = malloc((size_t)d * sizeof *ref);
    for (int t = 0; t < 64; t++) {
        int i = (int)((uint64_t)t * 7919 % (uint64_t)s), head = t % h;
        reference_row(hq, hk, hv, s, h, d, i, head, ref);
        for (int c = 0; c < d; c++) {
            double err = fabs(bf16_to_float(ho[((size_t)i * h + head) * d + c]) - ref[c]);
            worst = err > worst || isnan(err) ? (isnan(err) ? INFINITY : err) : worst;
        }
    }

    /* Time: median of 21 calls. */
    cudaEvent_t e0, e1;
    float ms[21];
    CHECK_CUDA(cudaEventCreate(&e0));
    CHECK_CUDA(cudaEventCreate(&e1));
    for (int r = 0; r < 21; r++) {
        CHECK_CUDA(cudaEventRecord(e0, 0));
        fajit_attn_fwd(ctx, &a, NULL);
        CHECK_CUDA(cudaEventRecord(e1, 0));
        CHECK_CUDA(cudaEventSynchronize(e1));
        CHECK_CUDA(cudaEventElapsedTime(&ms[r], e0, e1));
    }
    for (int i = 1; i < 21; i++) /* insertion sort, tiny */
        for (int j = i; j > 0 && ms[j] < ms[j - 1]; j--) {
            float t = ms[j];
            ms[j] = ms[j - 1];
            ms[j - 1] = t;
        }
    double flops = 4.0 * b * h * (double)s * s * d / 2; /* causal: half */
    int ok = worst <= 1.0 / 128 + 1e-3;                  /* bf16 output rounding */
    printf("variant  %s\n", variant);
    printf("check    max |out - fp64 ref| over 64 rows = %.3g  (%s)\n", worst, ok ? "ok" : "FAIL");
    printf("speed    %.3f ms per call, %.1f TFLOP/s (b=%d s=%d h=%d d=%d causal bf16)\n",
           ms[10], flops / (ms[10] * 1e-3) / 1e12, b, s, h, d);
    fajit_destroy(ctx);
    return ok ? 0 : 1;
}
