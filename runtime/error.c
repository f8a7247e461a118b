/*
 * runtime/error.c - status texts, the thread-local detail message, logging.
 */
#include "runtime/error.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static _Thread_local char detail[FAJIT__DETAIL_MAX];

const char *fajit_strerror(int status)
{
    switch (status) {
#define FAJIT_X_CASE(name, value, text) \
    case value:                         \
        return text;
        FAJIT_STATUS_LIST(FAJIT_X_CASE)
#undef FAJIT_X_CASE
    default:
        return "unknown status";
    }
}

const char *fajit_last_error(void) { return detail; }

const char *fajit__detail(void) { return detail; }

void fajit__clear_error(void) { detail[0] = '\0'; }

void fajit_free(void *p) { free(p); }

int fajit__fail(int status, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(detail, sizeof detail, fmt, ap);
    va_end(ap);
    return status;
}

int fajit__fail_prefix(int status, const char *fmt, ...)
{
    char old[FAJIT__DETAIL_MAX];
    size_t n, rest;
    va_list ap;
    memcpy(old, detail, sizeof old);
    va_start(ap, fmt);
    vsnprintf(detail, sizeof detail, fmt, ap);
    va_end(ap);
    n = strlen(detail);
    rest = strlen(old);
    /* "<prefix>: <old detail>", cut to fit */
    if (rest && n + 2 < sizeof detail) {
        memcpy(detail + n, ": ", 2);
        n += 2;
        if (rest > sizeof detail - 1 - n)
            rest = sizeof detail - 1 - n;
        memcpy(detail + n, old, rest);
        detail[n + rest] = '\0';
    }
    return status;
}

void fajit__log(const fajit__logger *lg, int level, const char *fmt, ...)
{
    static const char *const names[] = {"off", "error", "warn", "info", "debug"};
    char msg[2048];
    va_list ap;
    if (!lg || level > lg->level || level <= FAJIT_LOG_OFF)
        return;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    if (lg->fn)
        lg->fn(lg->user, level, msg);
    else
        fprintf(stderr, "fajit: %s: %s\n", names[level <= FAJIT_LOG_DEBUG ? level : 4], msg);
}
