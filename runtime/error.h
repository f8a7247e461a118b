/*
 * runtime/error.h - error detail and logging, the one cross-cutting utility:
 * every layer (codegen, cache, runtime) records the detail of a failure here,
 * so the public fajit_last_error() can report it.
 */
#ifndef FAJIT_RUNTIME_ERROR_H
#define FAJIT_RUNTIME_ERROR_H

#include <stdarg.h>
#include <stddef.h>

#include "fajit.h"

#if defined(__GNUC__)
#define FAJIT__PRINTF(a, b) __attribute__((format(printf, a, b)))
#else
#define FAJIT__PRINTF(a, b)
#endif

#define FAJIT__DETAIL_MAX 8192

/* Sets this thread's detail message and returns status (so `return
 * fajit__fail(FAJIT_EINVAL, "dqk=%d: must be 1..512", d);` reads naturally). */
int fajit__fail(int status, const char *fmt, ...) FAJIT__PRINTF(2, 3);

/* Prepends "<prefix>: " to the current detail; returns status. */
int fajit__fail_prefix(int status, const char *fmt, ...) FAJIT__PRINTF(2, 3);

/* Clears this thread's detail (at the start of a public call). */
void fajit__clear_error(void);

const char *fajit__detail(void);

/* A log sink, owned by a context and outliving everything that holds it. */
typedef struct fajit__logger {
    fajit_log_fn fn; /* NULL: stderr */
    void *user;
    int level;       /* messages above it are dropped */
} fajit__logger;

/* Logs if lg is non-NULL and level <= lg->level. */
void fajit__log(const fajit__logger *lg, int level, const char *fmt, ...) FAJIT__PRINTF(3, 4);

#endif
