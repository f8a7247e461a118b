/*
 * benchmarks/bench_overhead.c - fajit's own host cost per warm fajit_attn_fwd,
 * without the driver's: run against the stub libcuda.so.1 built next to it
 * (benchmarks/stub_driver), whose calls return at once. No GPU needed.
 *
 *   LD_LIBRARY_PATH=<build>/benchmarks/stub_driver <build>/benchmarks/bench_overhead
 */
#include <stdio.h>
#include <time.h>

#include "fajit.h"

static double now_ns(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec * 1e9 + t.tv_nsec;
}

int main(void)
{
    static char buf[4096] __attribute__((aligned(256)));
    fajit_options o;
    fajit_attn_args a;
    fajit_ctx *ctx;
    double best = 1e30;
    int rc;

    fajit_options_init(&o);
    o.cache_mode = FAJIT_CACHE_OFF;
    if ((rc = fajit_create(&ctx, &o)) != 0) {
        printf("fajit_create: %s\n", fajit_last_error());
        return 1;
    }
    fajit_attn_args_init(&a);
    a.q = a.k = a.v = buf; /* the stub driver never reads them */
    a.o = buf;
    a.batch = a.seqlen_q = a.seqlen_k = a.nheads_q = a.nheads_kv = 1;
    a.dqk = a.dv = 64;
    if ((rc = fajit_attn_fwd(ctx, &a, NULL)) != 0) { /* compiles (in memory) and loads */
        printf("fajit_attn_fwd: %s: %s (is the stub driver on LD_LIBRARY_PATH?)\n",
               fajit_strerror(rc), fajit_last_error());
        return 1;
    }
    for (int r = 0; r < 20; r++) {
        double t0 = now_ns();
        for (int i = 0; i < 100000; i++)
            fajit_attn_fwd(ctx, &a, NULL);
        double per_call = (now_ns() - t0) / 100000;
        best = per_call < best ? per_call : best;
    }
    printf("fajit's own host time per warm fajit_attn_fwd (stub driver): %.1f ns, best of 20 "
           "batches of 100000\n", best);
    fajit_destroy(ctx);
    return 0;
}
