/*
 * tests/gpu/precompile.c - see precompile.h.
 */
#include "precompile.h"

#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

struct work {
    fajit_ctx *ctx;
    const char *const *specs;
    size_t n;
    atomic_size_t next, failed;
};

static void *worker(void *arg)
{
    struct work *w = arg;
    for (size_t i; (i = atomic_fetch_add(&w->next, 1)) < w->n;) {
        if (fajit_compile(w->ctx, w->specs[i], NULL) != 0) {
            printf("FAIL precompile '%s': %s\n", w->specs[i], fajit_last_error());
            atomic_fetch_add(&w->failed, 1);
        }
    }
    return NULL;
}

size_t precompile_variants(fajit_ctx *ctx, const char *const *specs, size_t n, int threads)
{
    const char **distinct = malloc((n ? n : 1) * sizeof *distinct);
    pthread_t tid[64];
    struct work w;
    size_t m = 0;
    int started = 0;

    for (size_t i = 0; i < n; i++) {
        size_t j = 0;
        while (j < m && strcmp(distinct[j], specs[i]) != 0)
            j++;
        if (j == m)
            distinct[m++] = specs[i];
    }
    w.ctx = ctx;
    w.specs = distinct;
    w.n = m;
    atomic_init(&w.next, 0);
    atomic_init(&w.failed, 0);
    if (threads > 64)
        threads = 64;
    for (int t = 0; t < threads; t++)
        started += pthread_create(&tid[started], NULL, worker, &w) == 0;
    if (started == 0)
        worker(&w);
    for (int t = 0; t < started; t++)
        pthread_join(tid[t], NULL);
    printf("precompiled %zu distinct variants on %d threads\n", m, started ? started : 1);
    free(distinct);
    return atomic_load(&w.failed);
}
