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
#include <sys/statfs.h>
#include <time.h>
#include <unistd.h>
#include <xxhash.h>

#include "cache/hooks.h"

#define DEFAULT_MAP_BYTES (256ull << 20)
#define LOCK_SLOTS 65521u /* largest prime below 2^16: byte offsets in compile.lock */
#define MAX_GROWTHS 48
#define MAX_BEGIN_RETRIES 8

/* Keys whose last use this process has recorded or queued: a set, so each
 * entry's last-used time is written at most once per process. */
typedef struct touch_set {
    uint8_t (*keys)[16]; /* open addressing; all-zero slot = empty (a zero key is never touched) */
    size_t cap, count;
    struct touched { uint8_t key[16]; uint64_t when; } *pending; /* queued, not yet written */
    size_t npending, cappending;
} touch_set;

typedef struct shared_env {
    struct shared_env *next;
    char *path;  /* canonical directory */
    pid_t pid;   /* the process that opened env; any other must not touch it */
    MDB_env *env;
    MDB_dbi entries, meta;
    MDB_dbi tuning;  /* tuning records (cache/FORMAT.md) */
    int has_tuning;  /* 0: a read-only open of a cache that has no tuning database yet */
    int readonly; /* opened MDB_RDONLY (possibly MDB_NOLOCK too) */
    int refs;
    uint64_t map_bytes; /* as asked at open, to reopen after fork */
    unsigned file_mode; /* mode of files LMDB creates */
    pthread_rwlock_t txn_lock;
    pthread_mutex_t write_lock;
} shared_env;

struct fajit__store {
    char *dir; /* canonical when the directory exists, else as given */
    int mode;
    const fajit__logger *log;
    shared_env *_Atomic env; /* NULL: read-only view of a cache that does not exist */
    _Atomic uint64_t hits, misses, compiles, bad;
    fajit__store_options opt;
    pthread_mutex_t touch_lock;
    touch_set touched;
};

fajit__hooks fajit__test_hooks;

void fajit__hooks_fail_alloc_at(long nth)
{
    atomic_store(&fajit__test_hooks.alloc_count, 0);
    atomic_store(&fajit__test_hooks.alloc_fail_at, nth);
}

void *fajit__malloc(size_t n)
{
    long at = atomic_load(&fajit__test_hooks.alloc_fail_at);
    if (at > 0 && atomic_fetch_add(&fajit__test_hooks.alloc_count, 1) + 1 == at)
        return NULL;
    return malloc(n);
}

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

/* mkdir -p: parents 0755, the cache directory itself dir_mode. */
static int make_dirs(const char *dir, unsigned dir_mode)
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
        if (mkdir(path, c == '\0' ? dir_mode : 0755) != 0 && errno != EEXIST)
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

/* ---------------------------------------------------------------- trust */

/* Filesystems whose locking LMDB cannot rely on (statfs f_type). */
static const struct { long magic; const char *name; } network_fs[] = {
    {0x6969, "NFS"},          {0x517B, "SMB"},          {(long)0xFF534D42, "CIFS"},
    {(long)0xFE534D42, "SMB2"}, {0x01021997, "9p"},     {0x5346414F, "AFS"},
    {0x6B414653, "kAFS"},     {0x00C36400, "Ceph"},     {0x0BD00BD0, "Lustre"},
    {0x01161970, "GFS2"},     {0x7461636F, "OCFS2"},    {0x47504653, "GPFS"},
    {0x73757245, "Coda"},     {0x564C, "NCP"},
};

/* FAJIT_ECACHE if dir is on a network filesystem. */
static int check_local_fs(const char *dir)
{
    struct statfs fs;
    long type;
    if (fajit__test_hooks.fs_type)
        type = fajit__test_hooks.fs_type;
    else if (statfs(dir, &fs) == 0)
        type = (long)fs.f_type;
    else
        return 0; /* unknown: the opens that follow say what is wrong */
    for (size_t i = 0; i < sizeof network_fs / sizeof network_fs[0]; i++)
        if ((type & 0xFFFFFFFFL) == (network_fs[i].magic & 0xFFFFFFFFL))
            return fajit__fail(FAJIT_ECACHE,
                               "cache %s is on a network filesystem (%s): LMDB's locks do not "
                               "work there, so it is not used; point FAJIT_CACHE_DIR at a local "
                               "disk",
                               dir, network_fs[i].name);
    return 0;
}

/* Only this user or root may own what we trust, and nobody else may write it. */
static int check_owner_mode(const char *dir, const char *path, const struct stat *st, int shared)
{
    if (shared)
        return 0;
    if (st->st_uid != geteuid() && st->st_uid != 0)
        return fajit__fail(FAJIT_ECACHE,
                           "cache %s: %s is owned by uid %u, not by this user (uid %u) or root: "
                           "refused (turn on shared mode, FAJIT_CACHE_SHARED=1, to share a cache "
                           "between users)",
                           dir, path, (unsigned)st->st_uid, (unsigned)geteuid());
    if (st->st_mode & (S_IWGRP | S_IWOTH))
        return fajit__fail(FAJIT_ECACHE,
                           "cache %s: %s is writable by %s (mode %03o): refused, since anyone "
                           "who can write it can plant kernels (chmod go-w it, or turn on "
                           "shared mode, FAJIT_CACHE_SHARED=1)",
                           dir, path, st->st_mode & S_IWOTH ? "others" : "its group",
                           (unsigned)(st->st_mode & 0777));
    return 0;
}

/* The directory must be trusted, local, and its files regular files that
 * are not symbolic links (LMDB opens them itself, following links; with a
 * directory nobody else can write, nobody else can swap them afterwards). */
static int check_trust(const char *dir, int shared)
{
    static const char *const files[] = {"data.mdb", "lock.mdb", "compile.lock"};
    struct stat st;
    char path[PATH_MAX];
    if (stat(dir, &st) != 0)
        return fajit__fail(FAJIT_EIO, "cache %s: %s", dir, strerror(errno));
    if (!S_ISDIR(st.st_mode))
        return fajit__fail(FAJIT_ECACHE, "cache %s: not a directory", dir);
    int rc = check_owner_mode(dir, "the directory", &st, shared);
    if (rc)
        return rc;
    for (size_t i = 0; i < sizeof files / sizeof files[0]; i++) {
        snprintf(path, sizeof path, "%s/%s", dir, files[i]);
        if (lstat(path, &st) != 0)
            continue; /* absent: LMDB or the lock creates it, with our mode */
        if (S_ISLNK(st.st_mode))
            return fajit__fail(FAJIT_ECACHE, "cache %s: %s is a symbolic link: refused (a "
                               "link can point the cache's writes anywhere)", dir, files[i]);
        if (!S_ISREG(st.st_mode))
            return fajit__fail(FAJIT_ECACHE, "cache %s: %s is not a regular file: refused",
                               dir, files[i]);
        if ((rc = check_owner_mode(dir, files[i], &st, shared)) != 0)
            return rc;
    }
    return check_local_fs(dir);
}

static unsigned dir_mode_of(const fajit__store_options *o)
{
    return o->shared ? 0770 : o->private_files ? 0700 : 0755;
}

static unsigned file_mode_of(const fajit__store_options *o)
{
    return o->shared ? 0660 : o->private_files ? 0600 : 0644;
}

/* Shared mode means group members write too, whatever the umask of the
 * process that happened to create the files: widen what we own to the
 * shared modes. */
static void apply_shared_modes(const char *dir)
{
    static const char *const files[] = {"data.mdb", "lock.mdb", "compile.lock"};
    char path[PATH_MAX];
    struct stat st;
    if (stat(dir, &st) == 0 && S_ISDIR(st.st_mode) && st.st_uid == geteuid())
        chmod(dir, 0770);
    for (size_t i = 0; i < sizeof files / sizeof files[0]; i++) {
        snprintf(path, sizeof path, "%s/%s", dir, files[i]);
        if (lstat(path, &st) == 0 && S_ISREG(st.st_mode) && st.st_uid == geteuid())
            chmod(path, 0660);
    }
}

/* ---------------------------------------------------------------- fork safety */

/* Holding the registry lock across fork keeps the child's copy consistent. */
static void atfork_prepare(void) { pthread_mutex_lock(&registry_lock); }
static void atfork_release(void) { pthread_mutex_unlock(&registry_lock); }
static void install_atfork(void) { pthread_atfork(atfork_prepare, atfork_release, atfork_release); }

/* ---------------------------------------------------------------- opening environments */

static int try_env_open(const char *path, unsigned flags, uint64_t map_bytes, unsigned file_mode,
                        MDB_env **out)
{
    MDB_env *env;
    if (fajit__test_hooks.open_errno && !(flags & MDB_RDONLY))
        return fajit__test_hooks.open_errno;
    int rc = mdb_env_create(&env);
    if (rc)
        return rc;
    rc = mdb_env_set_maxdbs(env, 3); /* entries, meta, tuning */
    if (!rc && map_bytes)
        rc = mdb_env_set_mapsize(env, (size_t)map_bytes);
    if (!rc)
        rc = mdb_env_open(env, path, flags | MDB_NOTLS, (mdb_mode_t)file_mode);
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
        rc = try_env_open(e->path, 0, e->map_bytes, e->file_mode, &e->env);
    else {
        rc = try_env_open(e->path, MDB_RDONLY, 0, e->file_mode, &e->env);
        if (rc == EACCES || rc == EROFS)
            rc = try_env_open(e->path, MDB_RDONLY | MDB_NOLOCK, 0, e->file_mode, &e->env);
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
    /* Another process may have grown the map since we opened it; nobody else
     * holds this environment yet, so adopting its size needs no lock. */
    for (int i = 0; rc == MDB_MAP_RESIZED && i < MAX_BEGIN_RETRIES; i++) {
        rc = mdb_env_set_mapsize(e->env, 0);
        if (!rc)
            rc = mdb_txn_begin(e->env, NULL, e->readonly ? MDB_RDONLY : 0, &txn);
    }
    if (rc)
        return fail_mdb(e->path, "mdb_txn_begin", rc);
    rc = mdb_dbi_open(txn, "entries", create, &e->entries);
    if (!rc)
        rc = mdb_dbi_open(txn, "meta", create, &e->meta);
    if (!rc) { /* caches written before tuning existed lack it: fine when read-only */
        int trc = mdb_dbi_open(txn, "tuning", create, &e->tuning);
        e->has_tuning = trc == 0;
        if (trc && !(trc == MDB_NOTFOUND && e->readonly))
            rc = trc;
    }
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
static int env_new(const char *path, int mode, uint64_t map_bytes, unsigned file_mode,
                   const fajit__logger *log, shared_env **out)
{
    shared_env *e = calloc(1, sizeof *e);
    if (!e || !(e->path = strdup(path))) {
        free(e);
        return fajit__fail(FAJIT_ENOMEM, "cache %s: out of memory", path);
    }
    e->pid = getpid();
    e->map_bytes = map_bytes ? map_bytes : DEFAULT_MAP_BYTES;
    e->file_mode = file_mode;
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
static int env_acquire(const char *path, int mode, uint64_t map_bytes, unsigned file_mode,
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
    return env_new(path, mode, map_bytes, file_mode, log, out);
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
        rc = env_acquire(e->path, s->mode, e->map_bytes, e->file_mode, s->log, &mine);
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
    fajit__store_options o = {map_bytes, 0, 0, 0};
    return fajit__store_open_ex(dir, mode, &o, log, out);
}

/* Trust checks, then the process's environment for canon. */
static int attach_env(fajit__store *s, const char *canon)
{
    shared_env *e = NULL;
    int rc = check_trust(canon, s->opt.shared);
    if (rc)
        return rc;
    pthread_mutex_lock(&registry_lock);
    rc = env_acquire(canon, s->mode, s->opt.map_bytes, file_mode_of(&s->opt), s->log, &e);
    pthread_mutex_unlock(&registry_lock);
    if (rc == FAJIT_ENOTFOUND)
        rc = 0; /* read-only and no cache there: every get misses */
    if (rc == 0)
        atomic_store(&s->env, e);
    if (rc == 0 && s->opt.shared && s->mode == FAJIT_CACHE_READWRITE)
        apply_shared_modes(canon);
    return rc;
}

int fajit__store_open_ex(const char *dir, int mode, const fajit__store_options *opt,
                         const fajit__logger *log, fajit__store **out)
{
    static const fajit__store_options none;
    if (!opt)
        opt = &none;
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
        int rc = make_dirs(dir, dir_mode_of(opt));
        if (rc)
            return rc;
    }
    fajit__store *s = calloc(1, sizeof *s);
    if (!s)
        return fajit__fail(FAJIT_ENOMEM, "cache %s: out of memory", dir);
    s->mode = mode;
    s->log = log;
    s->opt = *opt;
    pthread_mutex_init(&s->touch_lock, NULL);
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
    if (canon && (rc = attach_env(s, canon)) != 0)
        goto free_dir;
    if (!atomic_load(&s->env))
        fajit__log(log, FAJIT_LOG_INFO, "cache %s: no cache there; read-only store is empty",
                   s->dir);
    *out = s;
    return 0;

free_dir:
    free(s->dir);
free_store:
    pthread_mutex_destroy(&s->touch_lock);
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
    free(s->touched.keys);
    free(s->touched.pending);
    pthread_mutex_destroy(&s->touch_lock);
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

/* ---------------------------------------------------------------- last use */

#define LRU_KEY_LEN 20 /* "lru:" and the entry's key, in the meta database */

static uint64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

static MDB_val lru_key(const uint8_t key[16], uint8_t buf[LRU_KEY_LEN])
{
    memcpy(buf, "lru:", 4);
    memcpy(buf + 4, key, 16);
    return (MDB_val){LRU_KEY_LEN, buf};
}

static int lru_put(shared_env *e, MDB_txn *txn, const uint8_t key[16], uint64_t when)
{
    uint8_t kb[LRU_KEY_LEN], vb[8];
    MDB_val k = lru_key(key, kb), v = {8, vb};
    put_le64(vb, when);
    return mdb_put(txn, e->meta, &k, &v, 0);
}

/* Last use of an entry; 0 (evicted first) if never recorded. */
static uint64_t lru_get(shared_env *e, MDB_txn *txn, const uint8_t key[16])
{
    uint8_t kb[LRU_KEY_LEN];
    MDB_val k = lru_key(key, kb), v;
    return mdb_get(txn, e->meta, &k, &v) == 0 && v.mv_size == 8 ? le64(v.mv_data) : 0;
}

static int lru_del(shared_env *e, MDB_txn *txn, const uint8_t key[16])
{
    uint8_t kb[LRU_KEY_LEN];
    MDB_val k = lru_key(key, kb);
    int rc = mdb_del(txn, e->meta, &k, NULL);
    return rc == MDB_NOTFOUND ? 0 : rc;
}

static int is_zero_key(const uint8_t key[16])
{
    for (int i = 0; i < 16; i++)
        if (key[i])
            return 0;
    return 1;
}

/* Adds key to the set: 1 if it is new, 0 if it was there, -1 out of memory.
 * An all-zero slot is empty, so the all-zero key is never added. */
static int set_insert(touch_set *t, const uint8_t key[16])
{
    if ((t->count + 1) * 2 > t->cap) {
        size_t cap = t->cap ? t->cap * 2 : 64;
        uint8_t(*keys)[16] = calloc(cap, 16);
        if (!keys)
            return -1;
        for (size_t i = 0; i < t->cap; i++) {
            if (is_zero_key(t->keys[i]))
                continue;
            size_t j = (size_t)le64(t->keys[i]) & (cap - 1);
            while (!is_zero_key(keys[j]))
                j = (j + 1) & (cap - 1);
            memcpy(keys[j], t->keys[i], 16);
        }
        free(t->keys);
        t->keys = keys;
        t->cap = cap;
    }
    size_t j = (size_t)le64(key) & (t->cap - 1);
    for (; !is_zero_key(t->keys[j]); j = (j + 1) & (t->cap - 1))
        if (memcmp(t->keys[j], key, 16) == 0)
            return 0;
    memcpy(t->keys[j], key, 16);
    t->count++;
    return 1;
}

/* Notes a use of key by this process; only the first is queued for writing. */
static void touch(fajit__store *s, const uint8_t key[16], int queue)
{
    if (s->mode != FAJIT_CACHE_READWRITE || is_zero_key(key))
        return;
    pthread_mutex_lock(&s->touch_lock);
    touch_set *t = &s->touched;
    if (set_insert(t, key) == 1 && queue) {
        if (t->npending == t->cappending) {
            size_t cap = t->cappending ? t->cappending * 2 : 16;
            void *grown = realloc(t->pending, cap * sizeof *t->pending);
            if (!grown)
                goto unlock; /* a lost last-use time only makes eviction less exact */
            t->pending = grown;
            t->cappending = cap;
        }
        memcpy(t->pending[t->npending].key, key, 16);
        t->pending[t->npending++].when = now_ns();
    }
unlock:
    pthread_mutex_unlock(&s->touch_lock);
}

/* Writes the queued last uses of entries still present; *n says how many of
 * the queue it covered, so that they are dropped after the commit. */
static int write_touches(fajit__store *s, shared_env *e, MDB_txn *txn, size_t *n)
{
    int rc = 0;
    pthread_mutex_lock(&s->touch_lock);
    *n = s->touched.npending;
    for (size_t i = 0; i < *n && rc == 0; i++) {
        MDB_val k = {16, s->touched.pending[i].key}, v;
        if (mdb_get(txn, e->entries, &k, &v) == 0)
            rc = lru_put(e, txn, s->touched.pending[i].key, s->touched.pending[i].when);
    }
    pthread_mutex_unlock(&s->touch_lock);
    return rc;
}

static void drop_touches(fajit__store *s, size_t n)
{
    pthread_mutex_lock(&s->touch_lock);
    touch_set *t = &s->touched;
    if (t->npending > n) /* pending may be NULL when nothing was touched */
        memmove(t->pending, t->pending + n, (t->npending - n) * sizeof *t->pending);
    t->npending -= n;
    pthread_mutex_unlock(&s->touch_lock);
}

typedef struct lru_item {
    uint64_t when;
    uint8_t key[16];
    size_t size;
} lru_item;

static int cmp_lru(const void *a, const void *b)
{
    const lru_item *x = a, *y = b;
    if (x->when != y->when)
        return x->when < y->when ? -1 : 1;
    return memcmp(x->key, y->key, 16);
}

/* Every entry with its size and last use; *total is the sum of the sizes. */
static int collect_lru(shared_env *e, MDB_txn *txn, lru_item **out, size_t *n,
                       uint64_t *total)
{
    MDB_stat st;
    MDB_cursor *cur;
    MDB_val k, v;
    int rc = mdb_stat(txn, e->entries, &st);
    if (rc)
        return rc;
    lru_item *items = fajit__malloc((st.ms_entries ? st.ms_entries : 1) * sizeof *items);
    if (!items)
        return ENOMEM;
    if ((rc = mdb_cursor_open(txn, e->entries, &cur)) != 0) {
        free(items);
        return rc;
    }
    size_t i = 0;
    *total = 0;
    for (rc = mdb_cursor_get(cur, &k, &v, MDB_FIRST); rc == 0 && i < st.ms_entries;
         rc = mdb_cursor_get(cur, &k, &v, MDB_NEXT)) {
        *total += v.mv_size;
        if (k.mv_size != 16)
            continue;
        memcpy(items[i].key, k.mv_data, 16);
        items[i].size = v.mv_size;
        items[i].when = lru_get(e, txn, items[i].key);
        i++;
    }
    mdb_cursor_close(cur);
    *out = items;
    *n = i;
    return rc == MDB_NOTFOUND ? 0 : rc;
}

/* Deletes least-recently-used entries (never keep) until the entries' bytes
 * are at most cap. In the caller's write transaction, so concurrent writers
 * see all of it or none. */
static int evict_lru(shared_env *e, MDB_txn *txn, const uint8_t *keep, uint64_t cap,
                     uint64_t *evicted)
{
    lru_item *items = NULL;
    size_t n = 0;
    uint64_t total = 0;
    int rc = collect_lru(e, txn, &items, &n, &total);
    if (rc == 0 && total > cap) {
        qsort(items, n, sizeof *items, cmp_lru);
        for (size_t i = 0; i < n && total > cap; i++) {
            MDB_val k = {16, items[i].key};
            if (keep && memcmp(items[i].key, keep, 16) == 0)
                continue;
            if ((rc = mdb_del(txn, e->entries, &k, NULL)) != 0 ||
                (rc = lru_del(e, txn, items[i].key)) != 0)
                break;
            total -= items[i].size;
            ++*evicted;
        }
    }
    free(items);
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
        size_t touches = 0;
        rc = op(e, txn, arg);
        if (rc == 0)
            rc = write_touches(s, e, txn, &touches);
        if (rc) {
            txn_abort(e, txn, 1);
        } else {
            rc = txn_commit(e, txn);
            if (rc == 0) {
                drop_touches(s, touches);
                return 0;
            }
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
    } else if (!(*out = fajit__malloc(v.mv_size ? v.mv_size : 1))) {
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
        touch(s, key, 1);
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
    size_t n;
    const uint8_t (*keys)[16];
    const uint8_t *const *entries;
    const size_t *lens;
    uint64_t cap, evicted;
} put_arg;

/* Puts every entry, stamps its last use, then evicts down to the cap. */
static int put_op(shared_env *e, MDB_txn *txn, void *arg)
{
    put_arg *p = arg;
    uint64_t when = now_ns();
    if (fajit__test_hooks.put_errno)
        return fajit__test_hooks.put_errno;
    p->evicted = 0;
    for (size_t i = 0; i < p->n; i++) {
        MDB_val k = {16, (void *)p->keys[i]}, v = {p->lens[i], (void *)p->entries[i]};
        int rc = mdb_put(txn, e->entries, &k, &v, 0);
        if (rc == 0)
            rc = lru_put(e, txn, p->keys[i], when);
        if (rc)
            return rc;
    }
    return p->cap ? evict_lru(e, txn, p->n == 1 ? p->keys[0] : NULL, p->cap, &p->evicted) : 0;
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

static int put_entries(fajit__store *s, put_arg *p)
{
    shared_env *e;
    int rc = writable_env(s, "store an entry", &e);
    if (rc)
        return rc;
    for (size_t i = 0; i < p->n; i++)
        if (p->cap && p->lens[i] > p->cap)
            return fajit__fail(FAJIT_ECACHE, "cache %s: an entry of %zu bytes is larger than "
                               "the cache's cap of %llu bytes", s->dir, p->lens[i],
                               (unsigned long long)p->cap);
    rc = run_write(s, e, put_op, p, "mdb_put");
    if (rc)
        return rc;
    for (size_t i = 0; i < p->n; i++)
        touch(s, p->keys[i], 0); /* its last use is written: no need to queue one */
    if (p->evicted)
        fajit__log(s->log, FAJIT_LOG_INFO, "cache %s: evicted %llu least recently used "
                   "entr%s to stay under %llu bytes", s->dir, (unsigned long long)p->evicted,
                   p->evicted == 1 ? "y" : "ies", (unsigned long long)p->cap);
    return 0;
}

int fajit__store_put(fajit__store *s, const uint8_t key[16], const uint8_t *entry,
                     size_t entry_len)
{
    if (!s || !key || (!entry && entry_len))
        return fajit__fail(FAJIT_EINVAL, "fajit__store_put: NULL argument");
    const uint8_t(*keys)[16] = (const uint8_t(*)[16])key;
    put_arg p = {1, keys, &entry, &entry_len, s->opt.max_bytes, 0};
    int rc = put_entries(s, &p);
    if (rc == 0)
        atomic_fetch_add(&s->compiles, 1);
    return rc;
}

int fajit__store_put_many(fajit__store *s, size_t n, const uint8_t (*keys)[16],
                          const uint8_t *const *entries, const size_t *entry_lens)
{
    if (!s || (n && (!keys || !entries || !entry_lens)))
        return fajit__fail(FAJIT_EINVAL, "fajit__store_put_many: NULL argument");
    if (n == 0)
        return 0;
    put_arg p = {n, keys, entries, entry_lens, s->opt.max_bytes, 0};
    return put_entries(s, &p);
}

/* Removes every last-use record (with all entries). */
static int drop_lru(shared_env *e, MDB_txn *txn)
{
    MDB_cursor *cur;
    MDB_val k, v;
    int rc = mdb_cursor_open(txn, e->meta, &cur);
    if (rc)
        return rc;
    for (rc = mdb_cursor_get(cur, &k, &v, MDB_FIRST); rc == 0;
         rc = mdb_cursor_get(cur, &k, &v, MDB_NEXT)) {
        if (k.mv_size == LRU_KEY_LEN && memcmp(k.mv_data, "lru:", 4) == 0 &&
            (rc = mdb_cursor_del(cur, 0)) != 0)
            break;
    }
    mdb_cursor_close(cur);
    return rc == MDB_NOTFOUND ? 0 : rc;
}

static int del_op(shared_env *e, MDB_txn *txn, void *arg)
{
    if (!arg) {
        int rc = mdb_drop(txn, e->entries, 0);
        return rc ? rc : drop_lru(e, txn);
    }
    MDB_val k = {16, arg};
    int rc = mdb_del(txn, e->entries, &k, NULL);
    return rc ? rc : lru_del(e, txn, arg);
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
        *val = fajit__malloc(v.mv_size ? v.mv_size : 1);
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
    pthread_mutex_lock(&s->touch_lock);
    size_t touches = s->touched.npending;
    pthread_mutex_unlock(&s->touch_lock);
    if (!(add[0] | add[1] | add[2] | add[3]) && !touches)
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

/* Takes the byte lock, polling with F_OFD_SETLK (sleeps of 1 ms doubling to
 * 16 ms) rather than blocking in F_OFD_SETLKW: a waiter sees the release
 * within 16 ms, nothing next to the compile it waits for, and no thread ever
 * sits in a blocking fcntl. That matters under valgrind (3.19 at least),
 * which runs F_OFD_SETLKW without letting the process's other threads run:
 * two threads of one process waiting on one key hung there for good.
 * 0 or an errno. */
static int wait_for_lock(int fd, struct flock *fl)
{
    long ns = 1000000;
    while (fcntl(fd, F_OFD_SETLK, fl) != 0) {
        if (errno != EAGAIN && errno != EACCES && errno != EINTR)
            return errno;
        struct timespec ts = {0, ns};
        nanosleep(&ts, NULL);
        if (ns < 16000000)
            ns *= 2;
    }
    return 0;
}

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
    int fd = open(path, O_RDWR | O_CREAT | O_CLOEXEC | O_NOFOLLOW, (mode_t)file_mode_of(&s->opt));
    if (fd < 0)
        return fajit__fail(FAJIT_EIO, "cache %s: cannot open %s: %s", s->dir, path,
                           strerror(errno));
    struct stat st;
    if (s->opt.shared && fstat(fd, &st) == 0 && st.st_uid == geteuid())
        fchmod(fd, 0660); /* past the umask, as apply_shared_modes */
    struct flock fl;
    memset(&fl, 0, sizeof fl);
    fl.l_type = F_WRLCK;
    fl.l_whence = SEEK_SET;
    fl.l_start = (off_t)(le64(key) % LOCK_SLOTS);
    fl.l_len = 1;
    int err = wait_for_lock(fd, &fl);
    if (err) {
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

/* ---------------------------------------------------------------- tuning records */

#define TUNING_VALUE_VERSION 1u

static uint32_t le32(const uint8_t *p)
{
    return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}

static void put_le32(uint8_t *p, uint32_t v)
{
    for (int i = 0; i < 4; i++)
        p[i] = (uint8_t)(v >> (8 * i));
}

/* XXH3-64 of the key and the value's first 24 bytes: a value moved under
 * another key fails as surely as a flipped bit. */
static uint64_t tuning_checksum(const uint8_t *key, size_t key_len, const uint8_t *value)
{
    uint8_t buf[FAJIT__TUNING_KEY_MAX + 24];
    if (key_len > FAJIT__TUNING_KEY_MAX)
        key_len = FAJIT__TUNING_KEY_MAX; /* callers refuse longer keys first */
    memcpy(buf, key, key_len);
    memcpy(buf + key_len, value, 24);
    return XXH3_64bits(buf, key_len + 24);
}

void fajit__tuning_value_encode(const uint8_t *key, size_t key_len, const fajit__tuning_value *v,
                                uint8_t out[FAJIT__TUNING_VALUE_LEN])
{
    put_le32(out, TUNING_VALUE_VERSION);
    put_le32(out + 4, v->samples);
    put_le64(out + 8, v->median_ns);
    put_le64(out + 16, v->timestamp_ns);
    put_le64(out + 24, tuning_checksum(key, key_len, out));
}

int fajit__tuning_value_decode(const uint8_t *key, size_t key_len, const uint8_t *buf, size_t len,
                               fajit__tuning_value *out, const char **why)
{
    const char *bad = NULL;
    if (!key || key_len == 0 || key_len > FAJIT__TUNING_KEY_MAX)
        bad = "tuning key length out of range";
    else if (!buf || len != FAJIT__TUNING_VALUE_LEN)
        bad = "tuning value is not 32 bytes";
    else if (le32(buf) != TUNING_VALUE_VERSION)
        bad = "unknown tuning value version";
    else if (le64(buf + 24) != tuning_checksum(key, key_len, buf))
        bad = "tuning value checksum mismatch";
    if (why)
        *why = bad;
    if (bad)
        return FAJIT_ECORRUPT;
    if (out) {
        out->samples = le32(buf + 4);
        out->median_ns = le64(buf + 8);
        out->timestamp_ns = le64(buf + 16);
    }
    return 0;
}

static int check_tuning_key(const char *fn, const uint8_t *key, size_t key_len)
{
    if (!key || key_len == 0 || key_len > FAJIT__TUNING_KEY_MAX)
        return fajit__fail(FAJIT_EINVAL, "%s: tuning key of %zu bytes (must be 1..%d)", fn,
                           key_len, FAJIT__TUNING_KEY_MAX);
    return 0;
}

typedef struct tuning_put_arg {
    size_t n;
    const uint8_t *const *keys;
    const size_t *key_lens;
    const uint8_t *const *values; /* encoded, FAJIT__TUNING_VALUE_LEN each */
} tuning_put_arg;

static int tuning_put_op(shared_env *e, MDB_txn *txn, void *arg)
{
    const tuning_put_arg *p = arg;
    if (fajit__test_hooks.put_errno)
        return fajit__test_hooks.put_errno;
    for (size_t i = 0; i < p->n; i++) {
        MDB_val k = {p->key_lens[i], (void *)p->keys[i]};
        MDB_val v = {FAJIT__TUNING_VALUE_LEN, (void *)p->values[i]};
        int rc = mdb_put(txn, e->tuning, &k, &v, 0);
        if (rc)
            return rc;
    }
    return 0;
}

int fajit__store_tuning_put_many(fajit__store *s, size_t n, const uint8_t *const *keys,
                                 const size_t *key_lens, const uint8_t *const *values)
{
    if (!s || (n && (!keys || !key_lens || !values)))
        return fajit__fail(FAJIT_EINVAL, "fajit__store_tuning_put_many: NULL argument");
    for (size_t i = 0; i < n; i++) {
        const char *why = NULL;
        int rc = check_tuning_key("fajit__store_tuning_put_many", keys[i], key_lens[i]);
        if (rc)
            return rc;
        if (fajit__tuning_value_decode(keys[i], key_lens[i], values[i], FAJIT__TUNING_VALUE_LEN,
                                       NULL, &why) != 0)
            return fajit__fail(FAJIT_EINVAL, "tuning record %zu: %s", i, why);
    }
    if (n == 0)
        return 0;
    shared_env *e;
    int rc = writable_env(s, "store tuning records", &e);
    if (rc)
        return rc;
    if (!e->has_tuning)
        return fajit__fail(FAJIT_ECACHE, "cache %s: no tuning database", s->dir);
    tuning_put_arg p = {n, keys, key_lens, values};
    return run_write(s, e, tuning_put_op, &p, "storing tuning records");
}

int fajit__store_tuning_put(fajit__store *s, const uint8_t *key, size_t key_len,
                            const fajit__tuning_value *v)
{
    uint8_t value[FAJIT__TUNING_VALUE_LEN];
    const uint8_t *values[1] = {value};
    if (!s || !v)
        return fajit__fail(FAJIT_EINVAL, "fajit__store_tuning_put: NULL argument");
    int rc = check_tuning_key("fajit__store_tuning_put", key, key_len);
    if (rc)
        return rc;
    fajit__tuning_value_encode(key, key_len, v, value);
    return fajit__store_tuning_put_many(s, 1, &key, &key_len, values);
}

/* The environment to read tuning records from; *e NULL: there are none. */
static int tuning_env(fajit__store *s, shared_env **e)
{
    int rc = store_env(s, e);
    if (rc == 0 && *e && !(*e)->has_tuning)
        *e = NULL;
    return rc;
}

int fajit__store_tuning_get(fajit__store *s, const uint8_t *key, size_t key_len,
                            fajit__tuning_value *out)
{
    if (!s || !out)
        return fajit__fail(FAJIT_EINVAL, "fajit__store_tuning_get: NULL argument");
    int rc = check_tuning_key("fajit__store_tuning_get", key, key_len);
    shared_env *e = NULL;
    if (rc || (rc = tuning_env(s, &e)) != 0)
        return rc;
    if (!e)
        return fajit__fail(FAJIT_ENOTFOUND, "cache %s: no tuning records", s->dir);
    MDB_txn *txn;
    MDB_val k = {key_len, (void *)key}, v;
    if ((rc = txn_begin(e, 0, &txn)) != 0)
        return rc;
    rc = mdb_get(txn, e->tuning, &k, &v);
    if (rc == 0 && fajit__tuning_value_decode(key, key_len, v.mv_data, v.mv_size, out, NULL) != 0)
        rc = MDB_NOTFOUND; /* a bad record is no record; the next put replaces it */
    txn_abort(e, txn, 0);
    if (rc == MDB_NOTFOUND)
        return fajit__fail(FAJIT_ENOTFOUND, "cache %s: no tuning record for that key", s->dir);
    return rc ? fail_mdb(s->dir, "mdb_get (tuning)", rc) : 0;
}

typedef struct tuning_copy {
    uint8_t *bytes; /* key then value, per record */
    size_t len, cap, n;
} tuning_copy;

static int tuning_copy_add(tuning_copy *c, const MDB_val *k, const MDB_val *v)
{
    size_t need = 16 + k->mv_size + v->mv_size;
    if (c->len + need > c->cap) {
        size_t cap = c->cap ? c->cap * 2 : 4096;
        while (cap < c->len + need)
            cap *= 2;
        uint8_t *grown = realloc(c->bytes, cap);
        if (!grown)
            return ENOMEM;
        c->bytes = grown;
        c->cap = cap;
    }
    put_le64(c->bytes + c->len, k->mv_size);
    put_le64(c->bytes + c->len + 8, v->mv_size);
    memcpy(c->bytes + c->len + 16, k->mv_data, k->mv_size);
    memcpy(c->bytes + c->len + 16 + k->mv_size, v->mv_data, v->mv_size);
    c->len += need;
    c->n++;
    return 0;
}

/* Copies every record whose key starts with prefix, in one read transaction. */
static int tuning_collect(fajit__store *s, shared_env *e, const uint8_t *prefix,
                          size_t prefix_len, tuning_copy *c)
{
    MDB_txn *txn;
    MDB_cursor *cur;
    MDB_val k = {prefix_len, (void *)prefix}, v;
    int rc = txn_begin(e, 0, &txn);
    if (rc)
        return rc;
    if ((rc = mdb_cursor_open(txn, e->tuning, &cur)) != 0) {
        txn_abort(e, txn, 0);
        return fail_mdb(s->dir, "mdb_cursor_open (tuning)", rc);
    }
    for (rc = mdb_cursor_get(cur, &k, &v, prefix_len ? MDB_SET_RANGE : MDB_FIRST); rc == 0;
         rc = mdb_cursor_get(cur, &k, &v, MDB_NEXT)) {
        if (k.mv_size < prefix_len || (prefix_len && memcmp(k.mv_data, prefix, prefix_len) != 0))
            break; /* keys are sorted: past the prefix, nothing more matches */
        if ((rc = tuning_copy_add(c, &k, &v)) != 0)
            break;
    }
    mdb_cursor_close(cur);
    txn_abort(e, txn, 0);
    if (rc == ENOMEM)
        return fajit__fail(FAJIT_ENOMEM, "cache %s: copying tuning records", s->dir);
    return rc == 0 || rc == MDB_NOTFOUND ? 0 : fail_mdb(s->dir, "mdb_cursor_get (tuning)", rc);
}

int fajit__store_tuning_iterate(fajit__store *s, const uint8_t *prefix, size_t prefix_len,
                                fajit__tuning_iter_cb cb, void *user)
{
    if (!s || !cb || (!prefix && prefix_len))
        return fajit__fail(FAJIT_EINVAL, "fajit__store_tuning_iterate: NULL argument");
    shared_env *e = NULL;
    tuning_copy c = {NULL, 0, 0, 0};
    int rc = tuning_env(s, &e);
    if (rc || !e)
        return rc;
    rc = tuning_collect(s, e, prefix, prefix_len, &c);
    for (size_t at = 0, i = 0; rc == 0 && i < c.n; i++) {
        size_t kl = (size_t)le64(c.bytes + at), vl = (size_t)le64(c.bytes + at + 8);
        const uint8_t *k = c.bytes + at + 16;
        if (cb(user, k, kl, k + kl, vl))
            break;
        at += 16 + kl + vl;
    }
    free(c.bytes);
    return rc;
}

typedef struct tuning_del_arg {
    const uint8_t *prefix;
    size_t prefix_len;
    uint64_t removed;
} tuning_del_arg;

static int tuning_del_op(shared_env *e, MDB_txn *txn, void *arg)
{
    tuning_del_arg *d = arg;
    MDB_cursor *cur;
    MDB_val k = {d->prefix_len, (void *)d->prefix}, v;
    int rc = mdb_cursor_open(txn, e->tuning, &cur);
    if (rc)
        return rc;
    d->removed = 0;
    rc = mdb_cursor_get(cur, &k, &v, d->prefix_len ? MDB_SET_RANGE : MDB_FIRST);
    while (rc == 0) {
        if (k.mv_size < d->prefix_len ||
            (d->prefix_len && memcmp(k.mv_data, d->prefix, d->prefix_len) != 0))
            break;
        if ((rc = mdb_cursor_del(cur, 0)) != 0)
            break;
        d->removed++;
        rc = mdb_cursor_get(cur, &k, &v, MDB_NEXT); /* LMDB: the one after the deleted */
    }
    mdb_cursor_close(cur);
    return rc == MDB_NOTFOUND || rc == 0 ? 0 : rc;
}

int fajit__store_tuning_del(fajit__store *s, const uint8_t *prefix, size_t prefix_len,
                            uint64_t *removed)
{
    if (!s || (!prefix && prefix_len))
        return fajit__fail(FAJIT_EINVAL, "fajit__store_tuning_del: NULL argument");
    if (removed)
        *removed = 0;
    shared_env *e;
    int rc = writable_env(s, "delete tuning records", &e);
    if (rc)
        return rc;
    if (!e->has_tuning)
        return 0;
    tuning_del_arg d = {prefix, prefix_len, 0};
    rc = run_write(s, e, tuning_del_op, &d, "deleting tuning records");
    if (rc == 0 && removed)
        *removed = d.removed;
    return rc;
}
