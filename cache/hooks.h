/*
 * cache/hooks.h - test hooks: internal knobs that let tests force the faults
 * and coincidences the cache must survive (a digest collision, a network
 * filesystem, a full disk, a failing allocation, another NVRTC version...).
 *
 * Not API: the struct is internal (hidden in the shared library) and only
 * tests that link the static library (fajit_static) or the object files can
 * reach it. Every field's zero value means "no hook"; the library reads the
 * fields at the point of use and never writes them, except the allocation
 * counter. Tests set hooks while no other thread uses the library.
 */
#ifndef FAJIT_CACHE_HOOKS_H
#define FAJIT_CACHE_HOOKS_H

#include <stdatomic.h>
#include <stddef.h>
#include <stdint.h>

typedef struct fajit__hooks {
    /* ---- cache/store.c */
    long fs_type;      /* nonzero: the statfs f_type the store believes its directory has */
    int put_errno;     /* nonzero: every put's write transaction fails with this errno
                          (ENOSPC, EIO...) */
    int open_errno;    /* nonzero: opening an environment read-write fails with this errno
                          (EACCES, EROFS...) */
    /* ---- allocations in cache/ and runtime/{kernels,compile,api}.c (fajit__malloc) */
    _Atomic long alloc_fail_at; /* nonzero: the Nth hooked allocation from now fails */
    _Atomic long alloc_count;   /* hooked allocations since alloc_fail_at was set */
    /* ---- runtime/kernels.c: the key */
    int force_digest;           /* nonzero: every variant's digest is `digest` */
    uint8_t digest[16];
    uint32_t nvrtc_version;     /* nonzero: the NVRTC version hashed into the build identity */
    uint32_t format_version;    /* nonzero: the format version hashed into the build identity */
    const char *options_text;   /* non-NULL: the NVRTC options text hashed likewise */
    const uint8_t *codegen_digest; /* non-NULL (16 bytes): the template and codegen digest */
} fajit__hooks;

extern fajit__hooks fajit__test_hooks;

/* malloc, except that it returns NULL when fajit__test_hooks.alloc_fail_at
 * says this is the allocation to fail. */
void *fajit__malloc(size_t n);

/* Arms the allocation hook: the nth hooked allocation from now fails (0: off). */
void fajit__hooks_fail_alloc_at(long nth);

#endif
