/*
 * cache/entry.h - the cache entry format (grammar in cache/FORMAT.md).
 *
 * An entry is a fixed little-endian header, the full key bytes, then the cubin.
 * The cache knows nothing of what a kernel computes: the full key is opaque
 * bytes (the runtime's serialised variant plus build identity).
 */
#ifndef FAJIT_CACHE_ENTRY_H
#define FAJIT_CACHE_ENTRY_H

#include <stddef.h>
#include <stdint.h>

#define FAJIT__ENTRY_MAGIC "FAJITCE\x01"
#define FAJIT__ENTRY_FORMAT_VERSION 1u
#define FAJIT__ENTRY_HEADER_LEN 64u

/* Spare bytes a buffer holding a cubin needs after it for
 * fajit__entry_encode_in_place to make an entry of it, with a full key of up
 * to FAJIT__ENTRY_KEY_ROOM bytes (the runtime's are about 120). */
#define FAJIT__ENTRY_KEY_ROOM 256u
#define FAJIT__ENTRY_ROOM (FAJIT__ENTRY_HEADER_LEN + FAJIT__ENTRY_KEY_ROOM)

typedef struct fajit__entry_meta {
    uint32_t arch;          /* sm number, e.g. 90 */
    uint32_t arch_suffix;   /* 0, or 'a' (sm_90a) */
    uint32_t nvrtc_version; /* major * 1000 + minor * 10 */
    uint32_t registers;     /* per thread */
    uint32_t smem_bytes;    /* static shared memory */
    uint32_t spill_bytes;   /* spill stores + loads, bytes */
    uint32_t compile_us;    /* NVRTC wall time */
} fajit__entry_meta;

/* A decoded view into an entry's bytes (pointers alias the input buffer). */
typedef struct fajit__entry_view {
    fajit__entry_meta meta;
    const uint8_t *full_key;
    size_t full_key_len;
    const uint8_t *cubin;
    size_t cubin_len;
} fajit__entry_view;

/* Builds an entry into a malloc'd buffer. 0 or FAJIT_ENOMEM / FAJIT_EINVAL. */
int fajit__entry_encode(const fajit__entry_meta *meta, const uint8_t *full_key,
                        size_t full_key_len, const uint8_t *cubin, size_t cubin_len,
                        uint8_t **out, size_t *out_len);

/* Makes an entry of buf without allocating: buf's first cubin_len bytes are
 * the cubin, and it holds cap bytes, at least 64 + full_key_len + cubin_len.
 * The cubin is moved up and the header and full key written before it;
 * *out_len is the entry's length. 0 or FAJIT_EINVAL (buf too small). Why: a
 * kernel just compiled must not be lost for want of a second buffer between
 * the compile and the store (issue 6, scenario 8). */
int fajit__entry_encode_in_place(uint8_t *buf, size_t cap, const fajit__entry_meta *meta,
                                 const uint8_t *full_key, size_t full_key_len, size_t cubin_len,
                                 size_t *out_len);

/* Validates magic, version, every length, and the checksum, then fills *view.
 * 0, or FAJIT_ECORRUPT with *why (static text) saying what is wrong (why may be
 * NULL). Never reads past len; records nothing with fajit__fail. */
int fajit__entry_decode(const uint8_t *buf, size_t len, fajit__entry_view *view,
                        const char **why);

/* ---------------------------------------------------------------- bundles */

/* A bundle (`fajit export`): header, manifest of (key, length, SHA-256) per
 * entry, the manifest's SHA-256, then the entries. Grammar in FORMAT.md. */
#define FAJIT__BUNDLE_MAGIC "FAJITBN\x01"
#define FAJIT__BUNDLE_VERSION 1u
/* Version 2 adds tuning records (FORMAT.md); written only when there are
 * some, so a bundle without them stays readable by version-1 readers. */
#define FAJIT__BUNDLE_VERSION_TUNING 2u

typedef struct fajit__bundle_view {
    size_t count;
    const uint8_t *manifest; /* count records of 56 bytes */
    const uint8_t *entries;  /* the entries, in manifest order */
    uint8_t digest[32];      /* SHA-256 of header and manifest */
    size_t tuning_count;     /* version 2: tuning records, covered by digest */
    const uint8_t *tuning;   /* their bytes: (u16 key_len, u16 value_len, key, value)... */
} fajit__bundle_view;

/* Builds a bundle of n entries (each a valid entry under its key) into a
 * malloc'd buffer; digest receives the manifest's SHA-256. */
int fajit__bundle_build(size_t n, const uint8_t (*keys)[16], const uint8_t *const *entries,
                        const size_t *lens, uint8_t **out, size_t *out_len, uint8_t digest[32]);

/* fajit__bundle_build plus nt tuning records (opaque keys and values; the
 * store checks them on import). nt 0 writes version 1, else version 2. */
int fajit__bundle_build_tuning(size_t n, const uint8_t (*keys)[16], const uint8_t *const *entries,
                               const size_t *lens, size_t nt, const uint8_t *const *tkeys,
                               const size_t *tkey_lens, const uint8_t *const *tvalues,
                               const size_t *tvalue_lens, uint8_t **out, size_t *out_len,
                               uint8_t digest[32]);

/* Verifies a whole bundle: layout, manifest digest, every entry's SHA-256,
 * every entry's format (fajit__entry_decode) and that each key is the
 * XXH3-128 of the entry's full key. 0, or FAJIT_ECORRUPT with *why (static
 * text; may be NULL) and *bad_index (may be NULL; SIZE_MAX if not about one
 * entry). Never reads past len; records nothing with fajit__fail. */
int fajit__bundle_parse(const uint8_t *buf, size_t len, fajit__bundle_view *view,
                        const char **why, size_t *bad_index);

/* Tuning record i of a parsed bundle (i < view->tuning_count). */
void fajit__bundle_tuning_item(const fajit__bundle_view *b, size_t i, const uint8_t **key,
                               size_t *key_len, const uint8_t **value, size_t *value_len);

/* Entry i of a parsed bundle. */
void fajit__bundle_item(const fajit__bundle_view *b, size_t i, const uint8_t **key,
                        const uint8_t **entry, size_t *len);

#endif
