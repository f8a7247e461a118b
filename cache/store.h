/*
 * cache/store.h - the LMDB store of cache entries, keyed by a 16-byte XXH3-128
 * digest of the full key.
 *
 * Contract:
 *  - One MDB_env per path per process (shared, refcounted), reopened in a child
 *    after fork. Compiling happens outside any transaction.
 *  - get returns an entry only if it decodes (cache/entry.h) and its stored
 *    full key equals the asked one byte for byte; anything else is a miss, and a
 *    bad entry is counted and deleted (read-write mode) so a put replaces it.
 *  - lock_key / unlock_key serialise compiles of one key across threads and
 *    processes (OFD byte-range locks on <dir>/compile.lock): a caller that got
 *    the lock after waiting gets again before compiling.
 *  - put grows the map on MDB_MAP_FULL and retries; a map grown by another
 *    process is adopted (MDB_MAP_RESIZED).
 *  - READONLY: gets only (put returns FAJIT_EREADONLY, lock is a no-op); works on
 *    a read-only directory. OFF: never used (the runtime does not open a store).
 *  - Trust (both modes): a directory or file owned by someone other than this
 *    user or root, or writable by group or others, is refused unless the shared
 *    option is on; data.mdb, lock.mdb and compile.lock must be regular files and
 *    are refused, even in shared mode, if they are symbolic links. A directory
 *    on a network filesystem (NFS, SMB/CIFS, 9p, AFS, Ceph, Lustre...) is
 *    refused: LMDB's locks do not work there. Refusals are FAJIT_ECACHE with a
 *    detail saying what to do.
 *  - Last use: every entry has a last-used time in the meta database, set when
 *    it is put and when this process first gets it (written with the next write
 *    transaction or at close: at most once per process per entry). With
 *    max_bytes, a put evicts least-recently-used entries, in its own
 *    transaction, until the entries' bytes are under the cap.
 */
#ifndef FAJIT_CACHE_STORE_H
#define FAJIT_CACHE_STORE_H

#include <stddef.h>
#include <stdint.h>

#include "entry.h"
#include "runtime/error.h"

typedef struct fajit__store fajit__store;

typedef struct fajit__store_counters {
    uint64_t hits, misses, compiles, bad_entries;
} fajit__store_counters;

/* Errors are recorded with fajit__fail (runtime/error.h); bad entries and map
 * growth are logged to log (may be NULL; must outlive the store).
 *
 * mode: FAJIT_CACHE_READWRITE or FAJIT_CACHE_READONLY. map_bytes: initial map
 * size (0 = 256 MiB). READWRITE creates dir (and parents). */
int fajit__store_open(const char *dir, int mode, uint64_t map_bytes, const fajit__logger *log,
                      fajit__store **out);
void fajit__store_close(fajit__store *s); /* NULL is a no-op */

typedef struct fajit__store_options {
    uint64_t map_bytes; /* initial map size (0 = 256 MiB) */
    uint64_t max_bytes; /* 0: no cap; else LRU eviction keeps the entries' bytes under it */
    int private_files;  /* create the directory 0700 and files 0600 (else 0755 / 0644) */
    int shared;         /* shared mode: other owners and group/other write allowed;
                           creates 0770 / 0660 */
} fajit__store_options;

/* fajit__store_open with options (opt NULL: all zero, as fajit__store_open). */
int fajit__store_open_ex(const char *dir, int mode, const fajit__store_options *opt,
                         const fajit__logger *log, fajit__store **out);

/* Looks key up. On a valid hit *entry is a malloc'd copy of the whole entry
 * (decode it with fajit__entry_decode) and 0 is returned; FAJIT_ENOTFOUND on a
 * miss (including a bad or mismatching entry). Counts hits/misses. */
int fajit__store_get(fajit__store *s, const uint8_t key[16], const uint8_t *full_key,
                     size_t full_key_len, uint8_t **entry, size_t *entry_len);

/* Stores an encoded entry under key (replacing any). Counts a compile. */
int fajit__store_put(fajit__store *s, const uint8_t key[16], const uint8_t *entry,
                     size_t entry_len);

/* Removes one entry (FAJIT_ENOTFOUND if absent), or all with key NULL. */
int fajit__store_del(fajit__store *s, const uint8_t key[16]);

/* Iterates every entry in key order with its raw bytes (valid during the call
 * only); cb returns nonzero to stop. Entries are passed even if corrupt. */
typedef int (*fajit__store_iter_cb)(void *user, const uint8_t key[16], const uint8_t *entry,
                                    size_t entry_len);
int fajit__store_iterate(fajit__store *s, fajit__store_iter_cb cb, void *user);

typedef struct fajit__keylock {
    int fd;
    int64_t offset;
} fajit__keylock;
int fajit__store_lock_key(fajit__store *s, const uint8_t key[16], fajit__keylock *lk);
void fajit__store_unlock_key(fajit__store *s, fajit__keylock *lk);

/* entries, bytes (sum of entry sizes), map size; persistent counters (those of
 * the store plus this process's unflushed ones). */
int fajit__store_stats(fajit__store *s, uint64_t *entries, uint64_t *bytes, uint64_t *map_bytes,
                       fajit__store_counters *counters);

/* Adds this process's counters to the persistent ones (read-write only). */
int fajit__store_flush_counters(fajit__store *s);

/* Count a bad entry found outside get (by verify). */
void fajit__store_count_bad(fajit__store *s);

/* Stores many encoded entries in one write transaction (all or none). */
int fajit__store_put_many(fajit__store *s, size_t n, const uint8_t (*keys)[16],
                          const uint8_t *const *entries, const size_t *entry_lens);

const char *fajit__store_dir(const fajit__store *s);
int fajit__store_mode(const fajit__store *s);

/* ---------------------------------------------------------------- tuning records
 *
 * A third named database, "tuning": one record per (GPU, build, variant
 * without tiles, sequence-length bucket, candidate tiles), layout in
 * cache/FORMAT.md. Keys are opaque bytes to the store (the runtime builds
 * them, runtime/tune.c); values are FAJIT__TUNING_VALUE_LEN bytes carrying
 * a checksum over key and value, so a damaged or moved record reads as
 * absent. Keys that share a prefix are adjacent (LMDB sorts keys bytewise),
 * which is how every candidate of one problem is found. A read-only store
 * on a cache written before tuning existed has no records. */
#define FAJIT__TUNING_KEY_MAX 480 /* LMDB's default key limit is 511 */
#define FAJIT__TUNING_VALUE_LEN 32

typedef struct fajit__tuning_value {
    uint64_t median_ns;    /* median of the timed runs */
    uint64_t timestamp_ns; /* CLOCK_REALTIME when measured */
    uint32_t samples;      /* timed runs behind the median */
} fajit__tuning_value;

/* The 32 stored bytes for v under key (checksum included). */
void fajit__tuning_value_encode(const uint8_t *key, size_t key_len, const fajit__tuning_value *v,
                                uint8_t out[FAJIT__TUNING_VALUE_LEN]);

/* Checks length, version and checksum against key; 0 and *out (may be NULL),
 * or FAJIT_ECORRUPT with *why (static text; why may be NULL). Records
 * nothing with fajit__fail. */
int fajit__tuning_value_decode(const uint8_t *key, size_t key_len, const uint8_t *buf, size_t len,
                               fajit__tuning_value *out, const char **why);

/* Stores (replaces) one record. FAJIT_EREADONLY in read-only mode. */
int fajit__store_tuning_put(fajit__store *s, const uint8_t *key, size_t key_len,
                            const fajit__tuning_value *v);

/* Stores n encoded records in one write transaction (all or none); each value
 * must decode under its key (else FAJIT_EINVAL, nothing written). */
int fajit__store_tuning_put_many(fajit__store *s, size_t n, const uint8_t *const *keys,
                                 const size_t *key_lens, const uint8_t *const *values);

/* One record: 0, or FAJIT_ENOTFOUND (absent or failing its checksum). */
int fajit__store_tuning_get(fajit__store *s, const uint8_t *key, size_t key_len,
                            fajit__tuning_value *out);

/* Every record whose key starts with prefix (prefix_len 0: all), in key
 * order, with its raw value (decode it; valid during the call only). The
 * records are copied out first, so cb runs with no transaction open; cb
 * returns nonzero to stop. */
typedef int (*fajit__tuning_iter_cb)(void *user, const uint8_t *key, size_t key_len,
                                     const uint8_t *value, size_t value_len);
int fajit__store_tuning_iterate(fajit__store *s, const uint8_t *prefix, size_t prefix_len,
                                fajit__tuning_iter_cb cb, void *user);

/* Deletes every record whose key starts with prefix (prefix_len 0: all);
 * *removed (may be NULL) says how many. */
int fajit__store_tuning_del(fajit__store *s, const uint8_t *prefix, size_t prefix_len,
                            uint64_t *removed);

#endif
