/*
 * cache/store.c - the LMDB store of cache entries (contract in cache/store.h).
 *
 * LMDB forbids opening one environment twice in a process (closing either
 * handle would drop the other's POSIX locks), so every store on a directory
 * shares one refcounted shared_env from a process-wide registry. After fork the
 * parent's environment is unusable in the child: the child opens its own and
 * leaks the parent's handle, which it must never close.
 *
 * Locking inside one process, per environment:
 *  - txn_lock (rwlock): every transaction holds it shared; a map resize holds
 *    it exclusive, because mdb_env_set_mapsize needs no live transaction in
 *    the process.
 *  - write_lock (mutex): one write transaction at a time, taken inside
 *    txn_lock.
 * No transaction is ever held while calling back into the caller.
 */
#include "cache/store.h"

#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <lmdb.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#define DEFAULT_MAP_BYTES (256ull << 20)
#define LOCK_SLOTS 65521u /* largest prime below 2^16: byte offsets in compile.lock */
#define MAX_GROWTHS 48
#define MAX_BEGIN_RETRIES 8

typedef struct shared_env {
    struct shared_env *next;
    char *path;  /* canonical directory */
    pid_t pid;   /* the process that opened env; any other must not touch it */
    MDB_env *env;
    MDB_dbi entries, meta;
    int readonly; /* opened MDB_RDONLY (possibly MDB_NOLOCK too) */
    int refs;
    uint64_t map_bytes; /* as asked at open, to reopen after fork */
    pthread_rwlock_t txn_lock;
    pthread_mutex_t write_lock;
} shared_env;

struct fajit__store {
    char *dir; /* canonical when the directory exists, else as given */
    int mode;
    const fajit__logger *log;
    shared_env *_Atomic env; /* NULL: read-only view of a cache that does not exist */
    _Atomic uint64_t hits, misses, compiles, bad;
};

static pthread_mutex_t registry_lock = PTHREAD_MUTEX_INITIALIZER;
static shared_env *registry;
static pthread_once_t atfork_once = PTHREAD_ONCE_INIT;

static const char *const counter_names[4] = {"hits", "misses", "compiles", "bad_entries"};

/* ---------------------------------------------------------------- small helpers */

/* LMDB returns errno values and its own negative MDB_* codes. */
static int status_of(int rc)
{
    if (rc == ENOMEM)
        return FAJIT_ENOMEM;
    if (rc == EACCES || rc == EROFS)
        return FAJIT_EREADONLY;
    return rc > 0 ? FAJIT_EIO : FAJIT_ECACHE;
}

static int fail_mdb(const char *dir, const char *what, int rc)
{
    return fajit__fail(status_of(rc), "cache %s: %s: %s", dir, what, mdb_strerror(rc));
}

static void key_hex(const uint8_t key[16], char out[33])
{
    static const char digits[] = "0123456789abcdef";
    for (int i = 0; i < 16; i++) {
        out[2 * i] = digits[key[i] >> 4];
        out[2 * i + 1] = digits[key[i] & 15];
    }
    out[32] = '\0';
}

static uint64_t le64(const uint8_t *p)
{
    uint64_t v = 0;
    for (int i = 7; i >= 0; i--)
        v = (v << 8) | p[i];
    return v;
}

static void put_le64(uint8_t *p, uint64_t v)
{
    for (int i = 0; i < 8; i++)
        p[i] = (uint8_t)(v >> (8 * i));
}

/* mkdir -p with mode 0755. */
static int make_dirs(const char *dir)
{
    char path[PATH_MAX];
    size_t n = strlen(dir);
    if (n == 0 || n >= sizeof path)
        return fajit__fail(FAJIT_EINVAL, "cache directory \"%s\": empty or too long", dir);
    memcpy(path, dir, n + 1);
    for (size_t i = 1; i <= n; i++) {
        if (path[i] != '/' && path[i] != '\0')
            continue;
        char c = path[i];
        path[i] = '\0';
        if (mkdir(path, 0755) != 0 && errno != EEXIST)
            return fajit__fail(errno == EACCES || errno == EROFS ? FAJIT_EREADONLY : FAJIT_EIO,
                               "cache %s: cannot create directory %s: %s", dir, path,
                               strerror(errno));
        path[i] = c;
    }
    struct stat st;
    if (stat(dir, &st) != 0 || !S_ISDIR(st.st_mode))
        return fajit__fail(FAJIT_EIO, "cache %s: not a directory", dir);
    return 0;
}

/* ---------------------------------------------------------------- fork safety */

/* Holding the registry lock across fork keeps the child's copy consistent. */
static void atfork_prepare(void) { pthread_mutex_lock(&registry_lock); }
static void atfork_release(void) { pthread_mutex_unlock(&registry_lock); }
static void install_atfork(void) { pthread_atfork(atfork_prepare, atfork_release, atfork_release); }

/* ---------------------------------------------------------------- opening environments */

static int try_env_open(const char *path, unsigned flags, uint64_t map_bytes, MDB_env **out)
{
    MDB_env *env;
    int rc = mdb_env_create(&env);
    if (rc)
        return rc;
    rc = mdb_env_set_maxdbs(env, 2);
    if (!rc && map_bytes)
        rc = mdb_env_set_mapsize(env, (size_t)map_bytes);
    if (!rc)
        rc = mdb_env_open(env, path, flags | MDB_NOTLS, 0644);
    if (rc) {
        mdb_env_close(env);
        return rc;
    }
    *out = env;
    return 0;
}

/* Opens the LMDB environment of e->path. Read-only: falls back to MDB_NOLOCK on
 * a directory we cannot write; FAJIT_ENOTFOUND (no detail) if there is no cache. */
static int open_env(shared_env *e, int mode)
{
    int rc;
    if (mode == FAJIT_CACHE_READWRITE)
        rc = try_env_open(e->path, 0, e->map_bytes, &e->env);
    else {
        rc = try_env_open(e->path, MDB_RDONLY, 0, &e->env);
        if (rc == EACCES || rc == EROFS)
            rc = try_env_open(e->path, MDB_RDONLY | MDB_NOLOCK, 0, &e->env);
        if (rc == ENOENT)
            return FAJIT_ENOTFOUND;
    }
    if (rc)
        return fail_mdb(e->path, "mdb_env_open", rc);
    e->readonly = mode != FAJIT_CACHE_READWRITE;
    return 0;
}

/* Opens (read-write: creates) the two named databases. */
static int open_dbis(shared_env *e)
{
    MDB_txn *txn;
    unsigned create = e->readonly ? 0 : MDB_CREATE;
    int rc = mdb_txn_begin(e->env, NULL, e->readonly ? MDB_RDONLY : 0, &txn);
    if (rc)
        return fail_mdb(e->path, "mdb_txn_begin", rc);
    rc = mdb_dbi_open(txn, "entries", create, &e->entries);
    if (!rc)
        rc = mdb_dbi_open(txn, "meta", create, &e->meta);
    if (rc) {
        mdb_txn_abort(txn);
        if (rc == MDB_NOTFOUND && e->readonly)
            return FAJIT_ENOTFOUND; /* a directory with no fajit databases yet */
        return fail_mdb(e->path, "mdb_dbi_open", rc);
    }
    rc = mdb_txn_commit(txn);
    return rc ? fail_mdb(e->path, "mdb_txn_commit", rc) : 0;
}

static int init_env_locks(shared_env *e)
{
    pthread_rwlockattr_t attr;
    pthread_rwlockattr_init(&attr);
    /* A waiting resize must not starve behind a stream of readers. */
    pthread_rwlockattr_setkind_np(&attr, PTHREAD_RWLOCK_PREFER_WRITER_NONRECURSIVE_NP);
    int rc = pthread_rwlock_init(&e->txn_lock, &attr);
    pthread_rwlockattr_destroy(&attr);
    if (rc)
        return fajit__fail(FAJIT_ENOMEM, "cache %s: pthread_rwlock_init: %s", e->path,
                           strerror(rc));
    rc = pthread_mutex_init(&e->write_lock, NULL);
    if (rc) {
        pthread_rwlock_destroy(&e->txn_lock);
        return fajit__fail(FAJIT_ENOMEM, "cache %s: pthread_mutex_init: %s", e->path,
                           strerror(rc));
    }
    return 0;
}

static void free_env(shared_env *e)
{
    if (e->env)
        mdb_env_close(e->env);
    free(e->path);
    free(e);
}

/* Opens a fresh environment for this process. Registry lock held. */
static int env_new(const char *path, int mode, uint64_t map_bytes, const fajit__logger *log,
                   shared_env **out)
{
    shared_env *e = calloc(1, sizeof *e);
    if (!e || !(e->path = strdup(path))) {
        free(e);
        return fajit__fail(FAJIT_ENOMEM, "cache %s: out of memory", path);
    }
    e->pid = getpid();
    e->map_bytes = map_bytes ? map_bytes : DEFAULT_MAP_BYTES;
    int rc = open_env(e, mode);
    if (!rc) {
        int dead = 0;
        mdb_reader_check(e->env, &dead); /* slots left by crashed processes */
        if (dead)
            fajit__log(log, FAJIT_LOG_INFO, "cache %s: cleared %d stale reader slot(s)", path,
                       dead);
        rc = open_dbis(e);
    }
    if (!rc)
        rc = init_env_locks(e);
    if (rc) {
        free_env(e);
        return rc;
    }
    e->refs = 1;
    e->next = registry;
    registry = e;
    *out = e;
    return 0;
}

/* The environment for path in this process, shared or new. Registry lock held. */
static int env_acquire(const char *path, int mode, uint64_t map_bytes,
                       const fajit__logger *log, shared_env **out)
{
    pid_t me = getpid();
    for (shared_env *e = registry; e; e = e->next) {
        if (e->pid != me || strcmp(e->path, path) != 0)
            continue;
        if (e->readonly && mode == FAJIT_CACHE_READWRITE)
            return fajit__fail(FAJIT_EREADONLY,
                               "cache %s: already open read-only in this process; close those "
                               "stores before opening it read-write",
                               path);
        e->refs++;
        *out = e;
        return 0;
    }
    return env_new(path, mode, map_bytes, log, out);
}

/* Drops one reference; closes the environment with the last one. Only ever
 * called with an environment of this process. */
static void env_release(shared_env *e)
{
    pthread_mutex_lock(&registry_lock);
    if (--e->refs == 0) {
        for (shared_env **p = &registry; *p; p = &(*p)->next) {
            if (*p == e) {
                *p = e->next;
                break;
            }
        }
        pthread_rwlock_destroy(&e->txn_lock);
        pthread_mutex_destroy(&e->write_lock);
        free_env(e);
    }
    pthread_mutex_unlock(&registry_lock);
}

/* The store's environment for this process: after a fork, the child opens its
 * own (leaking the parent's) and starts its counters from zero, since the
 * inherited ones are the parent's to flush. *out NULL: the store is empty. */
static int store_env(fajit__store *s, shared_env **out)
{
    shared_env *e = atomic_load(&s->env);
    if (!e || e->pid == getpid()) {
        *out = e;
        return 0;
    }
    int rc = 0;
    pthread_mutex_lock(&registry_lock);
    e = atomic_load(&s->env);
    if (e && e->pid != getpid()) {
        shared_env *mine = NULL;
        rc = env_acquire(e->path, s->mode, e->map_bytes, s->log, &mine);
        if (rc == FAJIT_ENOTFOUND)
            rc = 0; /* read-only, and the cache is gone: empty */
        atomic_store(&s->hits, 0);
        atomic_store(&s->misses, 0);
        atomic_store(&s->compiles, 0);
        atomic_store(&s->bad, 0);
        if (rc == 0) /* on failure keep the parent's, so the next call tries again */
            atomic_store(&s->env, mine);
        e = mine;
    }
    pthread_mutex_unlock(&registry_lock);
    *out = e;
    return rc;
}

int fajit__store_open(const char *dir, int mode, uint64_t map_bytes, const fajit__logger *log,
                      fajit__store **out)
{
    if (!out)
        return fajit__fail(FAJIT_EINVAL, "fajit__store_open: out is NULL");
    *out = NULL;
    if (!dir || !*dir)
        return fajit__fail(FAJIT_EINVAL, "cache directory is empty");
    if (mode != FAJIT_CACHE_READWRITE && mode != FAJIT_CACHE_READONLY)
        return fajit__fail(FAJIT_EINVAL, "cache %s: mode %d: must be read-write or read-only",
                           dir, mode);
    pthread_once(&atfork_once, install_atfork);
    if (mode == FAJIT_CACHE_READWRITE) {
        int rc = make_dirs(dir);
        if (rc)
            return rc;
    }
    fajit__store *s = calloc(1, sizeof *s);
    if (!s)
        return fajit__fail(FAJIT_ENOMEM, "cache %s: out of memory", dir);
    s->mode = mode;
    s->log = log;
    int rc = 0;
    char *canon = realpath(dir, NULL);
    if (!canon && !(mode == FAJIT_CACHE_READONLY && errno == ENOENT)) {
        rc = fajit__fail(FAJIT_EIO, "cache %s: %s", dir, strerror(errno));
        goto free_store;
    }
    s->dir = canon ? canon : strdup(dir);
    if (!s->dir) {
        rc = fajit__fail(FAJIT_ENOMEM, "cache %s: out of memory", dir);
        goto free_store;
    }
    if (canon) {
        shared_env *e = NULL;
        pthread_mutex_lock(&registry_lock);
        rc = env_acquire(canon, mode, map_bytes, log, &e);
        pthread_mutex_unlock(&registry_lock);
        if (rc == FAJIT_ENOTFOUND)
            rc = 0; /* read-only and no cache there: every get misses */
        if (rc)
            goto free_dir;
        atomic_store(&s->env, e);
    }
    if (!atomic_load(&s->env))
        fajit__log(log, FAJIT_LOG_INFO, "cache %s: no cache there; read-only store is empty",
                   s->dir);
    *out = s;
    return 0;

free_dir:
    free(s->dir);
free_store:
    free(s);
    return rc;
}

void fajit__store_close(fajit__store *s)
{
    if (!s)
        return;
    shared_env *e = atomic_load(&s->env);
    /* An environment inherited over fork is the parent's: leave it alone. */
    if (e && e->pid == getpid()) {
        if (s->mode == FAJIT_CACHE_READWRITE && fajit__store_flush_counters(s) != 0)
            fajit__log(s->log, FAJIT_LOG_WARN, "%s", fajit__detail());
        env_release(e);
    }
    free(s->dir);
    free(s);
}

const char *fajit__store_dir(const fajit__store *s) { return s ? s->dir : NULL; }

int fajit__store_mode(const fajit__store *s) { return s ? s->mode : -1; }

void fajit__store_count_bad(fajit__store *s)
{
    if (s)
        atomic_fetch_add(&s->bad, 1);
}

/* ---------------------------------------------------------------- transactions */

/* Takes txn_lock exclusive to change the map size: no transaction of this
 * process is live then, as mdb_env_set_mapsize requires. size 0 adopts the
 * size another process has grown the map to. */
static int set_map_size(shared_env *e, size_t size)
{
    pthread_rwlock_wrlock(&e->txn_lock);
    int rc = mdb_env_set_mapsize(e->env, size);
    pthread_rwlock_unlock(&e->txn_lock);
    return rc ? fail_mdb(e->path, "mdb_env_set_mapsize", rc) : 0;
}

static void unlock_txn(shared_env *e, int write)
{
    if (write)
        pthread_mutex_unlock(&e->write_lock);
    pthread_rwlock_unlock(&e->txn_lock);
}

/* Begins a transaction with this process's locks held; adopts a map grown by
 * another process (MDB_MAP_RESIZED) and clears stale readers when the reader
 * table is full. */
static int txn_begin(shared_env *e, int write, MDB_txn **txn)
{
    int rc = 0;
    for (int i = 0; i < MAX_BEGIN_RETRIES; i++) {
        pthread_rwlock_rdlock(&e->txn_lock);
        if (write)
            pthread_mutex_lock(&e->write_lock);
        rc = mdb_txn_begin(e->env, NULL, write ? 0 : MDB_RDONLY, txn);
        if (rc == 0)
            return 0;
        unlock_txn(e, write);
        if (rc == MDB_MAP_RESIZED) {
            int st = set_map_size(e, 0);
            if (st)
                return st;
        } else if (rc == MDB_READERS_FULL) {
            mdb_reader_check(e->env, NULL);
        } else {
            break;
        }
    }
    return fail_mdb(e->path, "mdb_txn_begin", rc);
}

static void txn_abort(shared_env *e, MDB_txn *txn, int write)
{
    mdb_txn_abort(txn);
    unlock_txn(e, write);
}

static int txn_commit(shared_env *e, MDB_txn *txn)
{
    int rc = mdb_txn_commit(txn);
    unlock_txn(e, 1);
    return rc;
}

/* What a write transaction does; returns an LMDB code. */
typedef int (*write_op)(shared_env *e, MDB_txn *txn, void *arg);

/* Runs op in a write transaction, doubling the map and retrying whenever LMDB
 * reports it full. Returns 0, the op's MDB_NOTFOUND, or a status with detail. */
static int run_write(fajit__store *s, shared_env *e, write_op op, void *arg, const char *what)
{
    for (int growths = 0;; growths++) {
        MDB_txn *txn;
        int rc = txn_begin(e, 1, &txn);
        if (rc)
            return rc;
        rc = op(e, txn, arg);
        if (rc) {
            txn_abort(e, txn, 1);
        } else {
            rc = txn_commit(e, txn);
            if (rc == 0)
                return 0;
        }
        if (rc == MDB_NOTFOUND)
            return rc;
        if (rc != MDB_MAP_FULL || growths >= MAX_GROWTHS)
            return fail_mdb(s->dir, what, rc);
        MDB_envinfo info;
        mdb_env_info(e->env, &info);
        size_t bigger = info.me_mapsize * 2;
        fajit__log(s->log, FAJIT_LOG_INFO, "cache %s: map full at %zu bytes, growing to %zu",
                   s->dir, info.me_mapsize, bigger);
        rc = set_map_size(e, bigger);
        if (rc)
            return rc;
    }
}

/* ---------------------------------------------------------------- get */

/* NULL if the stored bytes are a valid entry for full_key, else why not. */
static const char *check_entry(const MDB_val *v, const uint8_t *full_key, size_t full_key_len)
{
    fajit__entry_view view;
    const char *why = NULL;
    if (fajit__entry_decode(v->mv_data, v->mv_size, &view, &why) != 0)
        return why;
    if (view.full_key_len != full_key_len ||
        (full_key_len && memcmp(view.full_key, full_key, full_key_len) != 0))
        return "stored full key differs from the asked one (digest collision or wrong key)";
    return NULL;
}

typedef struct lookup {
    const uint8_t *key, *full_key;
    size_t full_key_len;
} lookup;

/* Reads the entry under key; a valid one is copied out. FAJIT_ENOTFOUND if
 * absent or bad (*why then says what is wrong). */
static int read_entry(fajit__store *s, shared_env *e, const lookup *lk, uint8_t **out,
                      size_t *out_len, const char **why)
{
    MDB_txn *txn;
    MDB_val k = {16, (void *)lk->key}, v;
    int rc = txn_begin(e, 0, &txn);
    if (rc)
        return rc;
    rc = mdb_get(txn, e->entries, &k, &v);
    if (rc == MDB_NOTFOUND) {
        rc = FAJIT_ENOTFOUND;
    } else if (rc) {
        rc = fail_mdb(s->dir, "mdb_get", rc);
    } else if ((*why = check_entry(&v, lk->full_key, lk->full_key_len)) != NULL) {
        rc = FAJIT_ENOTFOUND;
    } else if (!(*out = malloc(v.mv_size ? v.mv_size : 1))) {
        rc = fajit__fail(FAJIT_ENOMEM, "cache %s: cannot allocate %zu bytes", s->dir, v.mv_size);
    } else {
        memcpy(*out, v.mv_data, v.mv_size);
        *out_len = v.mv_size;
    }
    txn_abort(e, txn, 0);
    return rc;
}

/* Deletes the entry only if it is still bad: another process may have
 * replaced it with a good one since we looked. */
static int delete_if_still_bad(shared_env *e, MDB_txn *txn, void *arg)
{
    const lookup *lk = arg;
    MDB_val k = {16, (void *)lk->key}, v;
    int rc = mdb_get(txn, e->entries, &k, &v);
    if (rc)
        return rc;
    if (!check_entry(&v, lk->full_key, lk->full_key_len))
        return 0;
    return mdb_del(txn, e->entries, &k, NULL);
}

static void handle_bad_entry(fajit__store *s, shared_env *e, const lookup *lk, const char *why)
{
    char hex[33];
    key_hex(lk->key, hex);
    atomic_fetch_add(&s->bad, 1);
    if (s->mode != FAJIT_CACHE_READWRITE || e->readonly) {
        fajit__log(s->log, FAJIT_LOG_WARN, "cache %s: bad entry %s: %s; treated as a miss "
                   "(read-only, left in place)", s->dir, hex, why);
        return;
    }
    int rc = run_write(s, e, delete_if_still_bad, (void *)lk, "deleting a bad entry");
    if (rc && rc != MDB_NOTFOUND)
        fajit__log(s->log, FAJIT_LOG_WARN, "cache %s: bad entry %s: %s; treated as a miss, "
                   "but deleting it failed: %s", s->dir, hex, why, fajit__detail());
    else
        fajit__log(s->log, FAJIT_LOG_WARN, "cache %s: bad entry %s: %s; treated as a miss "
                   "and deleted", s->dir, hex, why);
}

int fajit__store_get(fajit__store *s, const uint8_t key[16], const uint8_t *full_key,
                     size_t full_key_len, uint8_t **entry, size_t *entry_len)
{
    if (!s || !key || !entry || !entry_len || (!full_key && full_key_len))
        return fajit__fail(FAJIT_EINVAL, "fajit__store_get: NULL argument");
    *entry = NULL;
    *entry_len = 0;
    shared_env *e;
    int rc = store_env(s, &e);
    if (rc)
        return rc;
    lookup lk = {key, full_key, full_key_len};
    const char *why = NULL;
    rc = e ? read_entry(s, e, &lk, entry, entry_len, &why) : FAJIT_ENOTFOUND;
    if (rc == 0) {
        atomic_fetch_add(&s->hits, 1);
        return 0;
    }
    if (rc != FAJIT_ENOTFOUND)
        return rc;
    atomic_fetch_add(&s->misses, 1);
    if (why)
        handle_bad_entry(s, e, &lk, why);
    char hex[33];
    key_hex(key, hex);
    return fajit__fail(FAJIT_ENOTFOUND, "cache %s: no valid entry for key %s", s->dir, hex);
}

/* ---------------------------------------------------------------- put, del */

typedef struct put_arg {
    const uint8_t *key, *entry;
    size_t entry_len;
} put_arg;

static int put_op(shared_env *e, MDB_txn *txn, void *arg)
{
    const put_arg *p = arg;
    MDB_val k = {16, (void *)p->key}, v = {p->entry_len, (void *)p->entry};
    return mdb_put(txn, e->entries, &k, &v, 0);
}

static int writable_env(fajit__store *s, const char *what, shared_env **e)
{
    if (s->mode != FAJIT_CACHE_READWRITE)
        return fajit__fail(FAJIT_EREADONLY, "cache %s: opened read-only; cannot %s", s->dir,
                           what);
    int rc = store_env(s, e);
    if (!rc && !*e)
        rc = fajit__fail(FAJIT_ECACHE, "cache %s: not open", s->dir);
    return rc;
}

int fajit__store_put(fajit__store *s, const uint8_t key[16], const uint8_t *entry,
                     size_t entry_len)
{
    if (!s || !key || (!entry && entry_len))
        return fajit__fail(FAJIT_EINVAL, "fajit__store_put: NULL argument");
    shared_env *e;
    int rc = writable_env(s, "store an entry", &e);
    if (rc)
        return rc;
    put_arg p = {key, entry, entry_len};
    rc = run_write(s, e, put_op, &p, "mdb_put");
    if (rc)
        return rc;
    atomic_fetch_add(&s->compiles, 1);
    return 0;
}

static int del_op(shared_env *e, MDB_txn *txn, void *arg)
{
    if (!arg)
        return mdb_drop(txn, e->entries, 0);
    MDB_val k = {16, arg};
    return mdb_del(txn, e->entries, &k, NULL);
}

int fajit__store_del(fajit__store *s, const uint8_t key[16])
{
    if (!s)
        return fajit__fail(FAJIT_EINVAL, "fajit__store_del: NULL store");
    shared_env *e;
    int rc = writable_env(s, "delete entries", &e);
    if (rc)
        return rc;
    rc = run_write(s, e, del_op, (void *)key, key ? "mdb_del" : "mdb_drop");
    if (rc == MDB_NOTFOUND) {
        char hex[33];
        key_hex(key, hex);
        return fajit__fail(FAJIT_ENOTFOUND, "cache %s: no entry for key %s", s->dir, hex);
    }
    return rc;
}

/* ---------------------------------------------------------------- iterate */

/* Copies out the first entry with a key after *after (or the first of all), so
 * no transaction is held while the caller's callback runs. MDB_NOTFOUND at the
 * end. */
static int copy_next(fajit__store *s, shared_env *e, const uint8_t *after, uint8_t key[16],
                     uint8_t **val, size_t *len)
{
    MDB_txn *txn;
    MDB_cursor *cur;
    MDB_val k = {16, (void *)after}, v;
    int rc = txn_begin(e, 0, &txn);
    if (rc)
        return rc;
    rc = mdb_cursor_open(txn, e->entries, &cur);
    if (rc) {
        txn_abort(e, txn, 0);
        return fail_mdb(s->dir, "mdb_cursor_open", rc);
    }
    rc = mdb_cursor_get(cur, &k, &v, after ? MDB_SET_RANGE : MDB_FIRST);
    while (rc == 0 && (k.mv_size != 16 || (after && memcmp(k.mv_data, after, 16) == 0)))
        rc = mdb_cursor_get(cur, &k, &v, MDB_NEXT); /* skip the last one seen */
    if (rc == 0) {
        *val = malloc(v.mv_size ? v.mv_size : 1);
        if (*val) {
            memcpy(key, k.mv_data, 16);
            memcpy(*val, v.mv_data, v.mv_size);
            *len = v.mv_size;
        } else {
            rc = fajit__fail(FAJIT_ENOMEM, "cache %s: cannot allocate %zu bytes", s->dir,
                             v.mv_size);
        }
    } else if (rc != MDB_NOTFOUND) {
        rc = fail_mdb(s->dir, "mdb_cursor_get", rc);
    }
    mdb_cursor_close(cur);
    txn_abort(e, txn, 0);
    return rc;
}

int fajit__store_iterate(fajit__store *s, fajit__store_iter_cb cb, void *user)
{
    if (!s || !cb)
        return fajit__fail(FAJIT_EINVAL, "fajit__store_iterate: NULL argument");
    shared_env *e;
    int rc = store_env(s, &e);
    if (rc || !e)
        return rc;
    uint8_t key[16];
    for (int first = 1;; first = 0) {
        uint8_t *val = NULL;
        size_t len = 0;
        rc = copy_next(s, e, first ? NULL : key, key, &val, &len);
        if (rc == MDB_NOTFOUND)
            return 0;
        if (rc)
            return rc;
        int stop = cb(user, key, val, len);
        free(val);
        if (stop)
            return 0;
    }
}

/* ---------------------------------------------------------------- counters, stats */

static void load_counters(shared_env *e, MDB_txn *txn, uint64_t out[4])
{
    for (int i = 0; i < 4; i++) {
        MDB_val k = {strlen(counter_names[i]), (void *)counter_names[i]}, v;
        out[i] = mdb_get(txn, e->meta, &k, &v) == 0 && v.mv_size == 8 ? le64(v.mv_data) : 0;
    }
}

static int add_counters_op(shared_env *e, MDB_txn *txn, void *arg)
{
    const uint64_t *add = arg;
    uint64_t now[4];
    load_counters(e, txn, now);
    for (int i = 0; i < 4; i++) {
        uint8_t buf[8];
        put_le64(buf, now[i] + add[i]);
        MDB_val k = {strlen(counter_names[i]), (void *)counter_names[i]}, v = {8, buf};
        int rc = mdb_put(txn, e->meta, &k, &v, 0);
        if (rc)
            return rc;
    }
    return 0;
}

int fajit__store_flush_counters(fajit__store *s)
{
    if (!s)
        return fajit__fail(FAJIT_EINVAL, "fajit__store_flush_counters: NULL store");
    shared_env *e;
    int rc = writable_env(s, "flush counters", &e);
    if (rc)
        return rc;
    uint64_t add[4] = {atomic_load(&s->hits), atomic_load(&s->misses),
                       atomic_load(&s->compiles), atomic_load(&s->bad)};
    if (!(add[0] | add[1] | add[2] | add[3]))
        return 0;
    rc = run_write(s, e, add_counters_op, add, "flushing counters");
    if (rc)
        return rc;
    /* Subtract what was written, keeping counts made meanwhile by other threads. */
    atomic_fetch_sub(&s->hits, add[0]);
    atomic_fetch_sub(&s->misses, add[1]);
    atomic_fetch_sub(&s->compiles, add[2]);
    atomic_fetch_sub(&s->bad, add[3]);
    return 0;
}

/* Entries, bytes and persistent counters, in one read transaction. */
static int read_stats(fajit__store *s, shared_env *e, uint64_t *entries, uint64_t *bytes,
                      uint64_t counters[4])
{
    MDB_txn *txn;
    MDB_cursor *cur;
    MDB_stat st;
    MDB_val k, v;
    int rc = txn_begin(e, 0, &txn);
    if (rc)
        return rc;
    rc = mdb_stat(txn, e->entries, &st);
    if (!rc)
        rc = mdb_cursor_open(txn, e->entries, &cur);
    if (rc) {
        txn_abort(e, txn, 0);
        return fail_mdb(s->dir, "mdb_stat", rc);
    }
    *entries = st.ms_entries;
    *bytes = 0;
    for (rc = mdb_cursor_get(cur, &k, &v, MDB_FIRST); rc == 0;
         rc = mdb_cursor_get(cur, &k, &v, MDB_NEXT))
        *bytes += v.mv_size;
    mdb_cursor_close(cur);
    load_counters(e, txn, counters);
    txn_abort(e, txn, 0);
    return rc == MDB_NOTFOUND ? 0 : fail_mdb(s->dir, "mdb_cursor_get", rc);
}

int fajit__store_stats(fajit__store *s, uint64_t *entries, uint64_t *bytes, uint64_t *map_bytes,
                       fajit__store_counters *counters)
{
    if (!s)
        return fajit__fail(FAJIT_EINVAL, "fajit__store_stats: NULL store");
    shared_env *e;
    int rc = store_env(s, &e);
    if (rc)
        return rc;
    uint64_t n = 0, b = 0, map = 0, c[4] = {0, 0, 0, 0};
    if (e) {
        rc = read_stats(s, e, &n, &b, c);
        if (rc)
            return rc;
        MDB_envinfo info;
        pthread_rwlock_rdlock(&e->txn_lock); /* me_mapsize changes under the exclusive lock */
        mdb_env_info(e->env, &info);
        pthread_rwlock_unlock(&e->txn_lock);
        map = info.me_mapsize;
    }
    if (entries)
        *entries = n;
    if (bytes)
        *bytes = b;
    if (map_bytes)
        *map_bytes = map;
    if (counters) {
        counters->hits = c[0] + atomic_load(&s->hits);
        counters->misses = c[1] + atomic_load(&s->misses);
        counters->compiles = c[2] + atomic_load(&s->compiles);
        counters->bad_entries = c[3] + atomic_load(&s->bad);
    }
    return 0;
}

/* ---------------------------------------------------------------- key locks */

int fajit__store_lock_key(fajit__store *s, const uint8_t key[16], fajit__keylock *lk)
{
    if (!s || !key || !lk)
        return fajit__fail(FAJIT_EINVAL, "fajit__store_lock_key: NULL argument");
    lk->fd = -1;
    lk->offset = -1;
    if (s->mode != FAJIT_CACHE_READWRITE)
        return 0; /* nothing is stored, so there is nothing to wait for */
    char path[PATH_MAX];
    if (snprintf(path, sizeof path, "%s/compile.lock", s->dir) >= (int)sizeof path)
        return fajit__fail(FAJIT_EINVAL, "cache %s: path too long", s->dir);
    /* A descriptor per lock: OFD locks then also exclude threads of this process. */
    int fd = open(path, O_RDWR | O_CREAT | O_CLOEXEC, 0644);
    if (fd < 0)
        return fajit__fail(FAJIT_EIO, "cache %s: cannot open %s: %s", s->dir, path,
                           strerror(errno));
    struct flock fl;
    memset(&fl, 0, sizeof fl);
    fl.l_type = F_WRLCK;
    fl.l_whence = SEEK_SET;
    fl.l_start = (off_t)(le64(key) % LOCK_SLOTS);
    fl.l_len = 1;
    while (fcntl(fd, F_OFD_SETLKW, &fl) != 0) {
        if (errno == EINTR)
            continue;
        int err = errno;
        close(fd);
        return fajit__fail(FAJIT_EIO, "cache %s: locking byte %lld of %s: %s", s->dir,
                           (long long)fl.l_start, path, strerror(err));
    }
    lk->fd = fd;
    lk->offset = fl.l_start;
    return 0;
}

void fajit__store_unlock_key(fajit__store *s, fajit__keylock *lk)
{
    (void)s;
    if (!lk || lk->fd < 0)
        return;
    struct flock fl;
    memset(&fl, 0, sizeof fl);
    fl.l_type = F_UNLCK;
    fl.l_whence = SEEK_SET;
    fl.l_start = (off_t)lk->offset;
    fl.l_len = 1;
    fcntl(lk->fd, F_OFD_SETLK, &fl); /* close releases it anyway */
    close(lk->fd);
    lk->fd = -1;
    lk->offset = -1;
}
