/*
 * tests/test_cache_util.h - small helpers shared by the tests/test_cache_*.c
 * fault tests: checks, temporary directories, contexts, log capture, and
 * direct LMDB access to a store (to corrupt it the way a disk or a person
 * would). Header-only: each test includes it once.
 */
#ifndef FAJIT_TEST_CACHE_UTIL_H
#define FAJIT_TEST_CACHE_UTIL_H

#include <ftw.h>
#include <lmdb.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "fajit.h"

static int failures;

#define CHECK(cond, ...)                                                          \
    do {                                                                          \
        int ok_ = (cond) ? 1 : 0;                                                 \
        printf("%s ", ok_ ? "ok  " : "FAIL");                                     \
        printf(__VA_ARGS__);                                                      \
        if (!ok_) {                                                               \
            printf("  [%s:%d] detail: %s", __FILE__, __LINE__, fajit_last_error()); \
            failures++;                                                           \
        }                                                                         \
        printf("\n");                                                             \
        fflush(stdout);                                                           \
    } while (0)

static char root[64];

static inline int rm_one(const char *path, const struct stat *st, int flag, struct FTW *ftw)
{
    (void)st, (void)flag, (void)ftw;
    chmod(path, 0700); /* so that a non-root user can empty a 0555 directory */
    return remove(path);
}

static inline int chmod_one(const char *path, const struct stat *st, int flag, struct FTW *ftw)
{
    (void)flag, (void)ftw;
    chmod(path, S_ISDIR(st->st_mode) ? 0700 : 0600);
    return 0;
}

static inline void remove_tree(const char *dir)
{
    nftw(dir, chmod_one, 16, FTW_PHYS);
    nftw(dir, rm_one, 16, FTW_DEPTH | FTW_PHYS);
}

static inline void make_root(const char *name)
{
    snprintf(root, sizeof root, "/tmp/fajit-%s-XXXXXX", name);
    if (!mkdtemp(root)) {
        perror("mkdtemp");
        exit(2);
    }
}

static inline int finish(void)
{
    remove_tree(root);
    printf("%s: %d failure(s)\n", failures ? "FAIL" : "PASS", failures);
    return failures ? 1 : 0;
}

/* root/name, in one of a few rotating buffers. */
static inline const char *sub(const char *name)
{
    static char bufs[8][256];
    static int next;
    char *b = bufs[next++ % 8];
    snprintf(b, 256, "%s/%s", root, name);
    return b;
}

/* Warnings and errors a context logged (counted, the last one kept). */
typedef struct log_capture {
    _Atomic int warnings;
    char last[1024];
} log_capture;

static inline void capture_log(void *user, int level, const char *msg)
{
    log_capture *lc = user;
    if (level <= FAJIT_LOG_WARN) {
        atomic_fetch_add(&lc->warnings, 1);
        snprintf(lc->last, sizeof lc->last, "%s", msg);
    }
}

static inline fajit_ctx *open_ctx(const char *dir, int mode, log_capture *lc)
{
    fajit_options o;
    fajit_ctx *ctx = NULL;
    fajit_options_init(&o);
    o.cache_dir = dir;
    o.cache_mode = mode;
    if (lc) {
        o.log_level = FAJIT_LOG_WARN;
        o.log_fn = capture_log;
        o.log_user = lc;
    }
    if (fajit_create(&ctx, &o) != 0)
        printf("     fajit_create(%s): %s\n", dir ? dir : "default", fajit_last_error());
    return ctx;
}

static inline fajit_cache_stats stats_of(fajit_ctx *ctx)
{
    fajit_cache_stats st;
    memset(&st, 0, sizeof st);
    if (fajit_cache_get_stats(ctx, &st) != 0)
        printf("     stats: %s\n", fajit_last_error());
    return st;
}

static inline uint64_t verify_bad(fajit_ctx *ctx, uint64_t *checked)
{
    fajit_verify_result r;
    memset(&r, 0, sizeof r);
    if (fajit_cache_verify(ctx, 0, NULL, NULL, &r) != 0) {
        printf("     verify: %s\n", fajit_last_error());
        return (uint64_t)-1;
    }
    if (checked)
        *checked = r.checked;
    return r.bad;
}

static inline void hex_to_key(const char *hex, uint8_t key[16])
{
    for (int i = 0; i < 16; i++) {
        char b[3] = {hex[2 * i], hex[2 * i + 1], 0};
        key[i] = (uint8_t)strtoul(b, NULL, 16);
    }
}

/* ---------------------------------------------------------------- raw LMDB */

/* Opens the store's environment directly (no fajit context may have it open
 * in this process: one environment per path per process). */
static inline int raw_open(const char *dir, MDB_env **env, MDB_dbi *entries)
{
    MDB_txn *txn;
    int rc = mdb_env_create(env);
    if (!rc)
        rc = mdb_env_set_maxdbs(*env, 2);
    if (!rc)
        rc = mdb_env_open(*env, dir, MDB_NOTLS, 0600);
    if (!rc)
        rc = mdb_txn_begin(*env, NULL, 0, &txn);
    if (!rc) {
        rc = mdb_dbi_open(txn, "entries", 0, entries);
        if (rc)
            mdb_txn_abort(txn);
        else
            rc = mdb_txn_commit(txn);
    }
    if (rc)
        printf("     raw LMDB open of %s: %s\n", dir, mdb_strerror(rc));
    return rc;
}

/* Copies the value under key into a malloc'd buffer; NULL if absent. */
static inline uint8_t *raw_get(const char *dir, const uint8_t key[16], size_t *len)
{
    MDB_env *env;
    MDB_dbi dbi;
    MDB_txn *txn;
    MDB_val k = {16, (void *)key}, v;
    uint8_t *out = NULL;
    if (raw_open(dir, &env, &dbi) != 0)
        return NULL;
    if (mdb_txn_begin(env, NULL, MDB_RDONLY, &txn) == 0) {
        if (mdb_get(txn, dbi, &k, &v) == 0 && (out = malloc(v.mv_size ? v.mv_size : 1))) {
            memcpy(out, v.mv_data, v.mv_size);
            *len = v.mv_size;
        }
        mdb_txn_abort(txn);
    }
    mdb_env_close(env);
    return out;
}

static inline int raw_put(const char *dir, const uint8_t key[16], const uint8_t *val, size_t len)
{
    MDB_env *env;
    MDB_dbi dbi;
    MDB_txn *txn;
    MDB_val k = {16, (void *)key}, v = {len, (void *)val};
    int rc = raw_open(dir, &env, &dbi);
    if (rc)
        return rc;
    rc = mdb_txn_begin(env, NULL, 0, &txn);
    if (!rc) {
        rc = mdb_put(txn, dbi, &k, &v, 0);
        if (rc)
            mdb_txn_abort(txn);
        else
            rc = mdb_txn_commit(txn);
    }
    mdb_env_close(env);
    return rc;
}

#endif
