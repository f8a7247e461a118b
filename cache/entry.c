/*
 * cache/entry.c - encode and decode cache entries; the grammar is in
 * cache/FORMAT.md, and the two must agree (tests/golden/entry_v1.bin pins it).
 */
#include "cache/entry.h"

#include <stdlib.h>
#include <string.h>

/* For XXH3_state_t on the stack: header and library come from one install. */
#define XXH_STATIC_LINKING_ONLY
#include <xxhash.h>

#include "cache/hooks.h"
#include "cache/sha256.h"
#include "runtime/error.h"

enum {
    OFF_MAGIC = 0,
    OFF_VERSION = 8,
    OFF_HEADER_LEN = 12,
    OFF_ARCH = 16,
    OFF_ARCH_SUFFIX = 20,
    OFF_NVRTC = 24,
    OFF_REGISTERS = 28,
    OFF_SMEM = 32,
    OFF_SPILL = 36,
    OFF_COMPILE_US = 40,
    OFF_KEY_LEN = 44,
    OFF_CUBIN_LEN = 48,
    OFF_CHECKSUM = 56,
    HEADER_LEN = 64
};

static void put_u32(uint8_t *p, uint32_t v)
{
    for (int i = 0; i < 4; i++)
        p[i] = (uint8_t)(v >> (8 * i));
}

static void put_u64(uint8_t *p, uint64_t v)
{
    for (int i = 0; i < 8; i++)
        p[i] = (uint8_t)(v >> (8 * i));
}

static uint32_t get_u32(const uint8_t *p)
{
    uint32_t v = 0;
    for (int i = 3; i >= 0; i--)
        v = (v << 8) | p[i];
    return v;
}

static uint64_t get_u64(const uint8_t *p)
{
    uint64_t v = 0;
    for (int i = 7; i >= 0; i--)
        v = (v << 8) | p[i];
    return v;
}

/* XXH3-64 of the whole entry with the checksum field read as zeros, without
 * copying the (possibly large) entry. */
static uint64_t entry_checksum(const uint8_t *buf, size_t len)
{
    static const uint8_t zeros[8];
    XXH3_state_t st;
    XXH3_INITSTATE(&st);
    XXH3_64bits_reset(&st);
    XXH3_64bits_update(&st, buf, OFF_CHECKSUM);
    XXH3_64bits_update(&st, zeros, sizeof zeros);
    XXH3_64bits_update(&st, buf + HEADER_LEN, len - HEADER_LEN);
    return XXH3_64bits_digest(&st);
}

static void write_header(uint8_t *h, const fajit__entry_meta *m, uint32_t key_len,
                         uint64_t cubin_len)
{
    memcpy(h + OFF_MAGIC, FAJIT__ENTRY_MAGIC, 8);
    put_u32(h + OFF_VERSION, FAJIT__ENTRY_FORMAT_VERSION);
    put_u32(h + OFF_HEADER_LEN, HEADER_LEN);
    put_u32(h + OFF_ARCH, m->arch);
    put_u32(h + OFF_ARCH_SUFFIX, m->arch_suffix);
    put_u32(h + OFF_NVRTC, m->nvrtc_version);
    put_u32(h + OFF_REGISTERS, m->registers);
    put_u32(h + OFF_SMEM, m->smem_bytes);
    put_u32(h + OFF_SPILL, m->spill_bytes);
    put_u32(h + OFF_COMPILE_US, m->compile_us);
    put_u32(h + OFF_KEY_LEN, key_len);
    put_u64(h + OFF_CUBIN_LEN, cubin_len);
    put_u64(h + OFF_CHECKSUM, 0);
}

_Static_assert(HEADER_LEN == FAJIT__ENTRY_HEADER_LEN, "entry.h and entry.c disagree on the header");

/* Size of an entry with these parts; 0 with a detail if it cannot be one. */
static size_t entry_size(size_t full_key_len, size_t cubin_len)
{
    if (full_key_len > UINT32_MAX) {
        fajit__fail(FAJIT_EINVAL, "cache entry: full key of %zu bytes exceeds 4 GiB",
                    full_key_len);
        return 0;
    }
    if (cubin_len > SIZE_MAX - HEADER_LEN - full_key_len) {
        fajit__fail(FAJIT_EINVAL, "cache entry: cubin of %zu bytes is too large", cubin_len);
        return 0;
    }
    return HEADER_LEN + full_key_len + cubin_len;
}

/* Header, full key and checksum around a cubin already at its place. */
static void seal(uint8_t *buf, size_t len, const fajit__entry_meta *meta, const uint8_t *full_key,
                 size_t full_key_len, size_t cubin_len)
{
    write_header(buf, meta, (uint32_t)full_key_len, cubin_len);
    if (full_key_len)
        memcpy(buf + HEADER_LEN, full_key, full_key_len);
    put_u64(buf + OFF_CHECKSUM, entry_checksum(buf, len));
}

int fajit__entry_encode(const fajit__entry_meta *meta, const uint8_t *full_key,
                        size_t full_key_len, const uint8_t *cubin, size_t cubin_len,
                        uint8_t **out, size_t *out_len)
{
    if (!meta || !out || !out_len || (!full_key && full_key_len) || (!cubin && cubin_len))
        return fajit__fail(FAJIT_EINVAL, "cache entry: NULL argument");
    *out = NULL;
    *out_len = 0;
    size_t len = entry_size(full_key_len, cubin_len);
    if (len == 0)
        return FAJIT_EINVAL;
    uint8_t *buf = fajit__malloc(len);
    if (!buf)
        return fajit__fail(FAJIT_ENOMEM, "cache entry: cannot allocate %zu bytes", len);
    if (cubin_len)
        memcpy(buf + HEADER_LEN + full_key_len, cubin, cubin_len);
    seal(buf, len, meta, full_key, full_key_len, cubin_len);
    *out = buf;
    *out_len = len;
    return 0;
}

int fajit__entry_encode_in_place(uint8_t *buf, size_t cap, const fajit__entry_meta *meta,
                                 const uint8_t *full_key, size_t full_key_len, size_t cubin_len,
                                 size_t *out_len)
{
    if (!buf || !meta || !out_len || (!full_key && full_key_len))
        return fajit__fail(FAJIT_EINVAL, "cache entry: NULL argument");
    size_t len = entry_size(full_key_len, cubin_len);
    if (len == 0)
        return FAJIT_EINVAL;
    if (len > cap)
        return fajit__fail(FAJIT_EINVAL, "cache entry: %zu bytes do not fit in a buffer of %zu",
                           len, cap);
    if (cubin_len)
        memmove(buf + HEADER_LEN + full_key_len, buf, cubin_len);
    seal(buf, len, meta, full_key, full_key_len, cubin_len);
    *out_len = len;
    return 0;
}

/* Checks the fixed header and the lengths; NULL if fine, else why. */
static const char *check_layout(const uint8_t *buf, size_t len)
{
    if (len < HEADER_LEN)
        return "shorter than the 64-byte header";
    if (memcmp(buf + OFF_MAGIC, FAJIT__ENTRY_MAGIC, 8) != 0)
        return "bad magic (not a fajit cache entry)";
    if (get_u32(buf + OFF_VERSION) != FAJIT__ENTRY_FORMAT_VERSION)
        return "unknown format version";
    if (get_u32(buf + OFF_HEADER_LEN) != HEADER_LEN)
        return "header length does not match the format version";
    size_t left = len - HEADER_LEN;
    uint64_t key_len = get_u32(buf + OFF_KEY_LEN);
    if (key_len > left)
        return "full key length runs past the end of the entry";
    left -= (size_t)key_len;
    uint64_t cubin_len = get_u64(buf + OFF_CUBIN_LEN);
    if (cubin_len > left)
        return "cubin length runs past the end of the entry";
    if (cubin_len != left)
        return "trailing bytes after the cubin";
    return NULL;
}

int fajit__entry_decode(const uint8_t *buf, size_t len, fajit__entry_view *view,
                        const char **why)
{
    const char *bad = buf ? check_layout(buf, len) : "no entry bytes";
    if (!bad && get_u64(buf + OFF_CHECKSUM) != entry_checksum(buf, len))
        bad = "checksum mismatch";
    if (why)
        *why = bad;
    if (bad)
        return FAJIT_ECORRUPT;
    if (view) {
        view->meta.arch = get_u32(buf + OFF_ARCH);
        view->meta.arch_suffix = get_u32(buf + OFF_ARCH_SUFFIX);
        view->meta.nvrtc_version = get_u32(buf + OFF_NVRTC);
        view->meta.registers = get_u32(buf + OFF_REGISTERS);
        view->meta.smem_bytes = get_u32(buf + OFF_SMEM);
        view->meta.spill_bytes = get_u32(buf + OFF_SPILL);
        view->meta.compile_us = get_u32(buf + OFF_COMPILE_US);
        view->full_key_len = get_u32(buf + OFF_KEY_LEN);
        view->full_key = buf + HEADER_LEN;
        view->cubin_len = (size_t)get_u64(buf + OFF_CUBIN_LEN);
        view->cubin = buf + HEADER_LEN + view->full_key_len;
    }
    return 0;
}

/* ---------------------------------------------------------------- bundles */

enum { BUNDLE_HEAD = 24, BUNDLE_RECORD = 56, BUNDLE_DIGEST = 32 };

enum { BUNDLE_HEAD_V2 = 32, TUNING_REC_HEAD = 4 };

/* Bytes of the tuning section; SIZE_MAX if a record does not fit its u16s. */
static size_t tuning_section_len(size_t nt, const size_t *klens, const size_t *vlens)
{
    size_t total = 0;
    for (size_t i = 0; i < nt; i++) {
        if (klens[i] == 0 || klens[i] > UINT16_MAX || vlens[i] > UINT16_MAX)
            return SIZE_MAX;
        total += TUNING_REC_HEAD + klens[i] + vlens[i];
        if (total > UINT32_MAX)
            return SIZE_MAX;
    }
    return total;
}

static void put_u16(uint8_t *p, size_t v)
{
    p[0] = (uint8_t)v;
    p[1] = (uint8_t)(v >> 8);
}

static uint8_t *write_tuning_section(uint8_t *at, size_t nt, const uint8_t *const *tkeys,
                                     const size_t *klens, const uint8_t *const *tvalues,
                                     const size_t *vlens)
{
    for (size_t i = 0; i < nt; i++) {
        put_u16(at, klens[i]);
        put_u16(at + 2, vlens[i]);
        memcpy(at + TUNING_REC_HEAD, tkeys[i], klens[i]);
        if (vlens[i])
            memcpy(at + TUNING_REC_HEAD + klens[i], tvalues[i], vlens[i]);
        at += TUNING_REC_HEAD + klens[i] + vlens[i];
    }
    return at;
}

int fajit__bundle_build_tuning(size_t n, const uint8_t (*keys)[16], const uint8_t *const *entries,
                               const size_t *lens, size_t nt, const uint8_t *const *tkeys,
                               const size_t *tkey_lens, const uint8_t *const *tvalues,
                               const size_t *tvalue_lens, uint8_t **out, size_t *out_len,
                               uint8_t digest[32])
{
    size_t tbytes = nt ? tuning_section_len(nt, tkey_lens, tvalue_lens) : 0;
    size_t head_len = nt ? BUNDLE_HEAD_V2 : BUNDLE_HEAD;
    if (tbytes == SIZE_MAX || nt > UINT32_MAX)
        return fajit__fail(FAJIT_EINVAL, "bundle: a tuning record is too large");
    if (n > UINT32_MAX || n > (SIZE_MAX - head_len - BUNDLE_DIGEST - tbytes) / BUNDLE_RECORD)
        return fajit__fail(FAJIT_EINVAL, "bundle: %zu entries are too many", n);
    size_t head = head_len + n * BUNDLE_RECORD + tbytes + BUNDLE_DIGEST, total = head;
    for (size_t i = 0; i < n; i++) {
        if (lens[i] > SIZE_MAX - total)
            return fajit__fail(FAJIT_EINVAL, "bundle: entries too large");
        total += lens[i];
    }
    uint8_t *buf = fajit__malloc(total);
    if (!buf)
        return fajit__fail(FAJIT_ENOMEM, "bundle: cannot allocate %zu bytes", total);
    memcpy(buf, FAJIT__BUNDLE_MAGIC, 8);
    put_u32(buf + 8, nt ? FAJIT__BUNDLE_VERSION_TUNING : FAJIT__BUNDLE_VERSION);
    put_u32(buf + 12, (uint32_t)n);
    put_u64(buf + 16, total - head);
    if (nt) {
        put_u32(buf + 24, (uint32_t)nt);
        put_u32(buf + 28, (uint32_t)tbytes);
    }
    uint8_t *rec = buf + head_len, *at = buf + head;
    for (size_t i = 0; i < n; i++, rec += BUNDLE_RECORD) {
        memcpy(rec, keys[i], 16);
        put_u64(rec + 16, lens[i]);
        fajit__sha256_of(entries[i], lens[i], rec + 24);
        if (lens[i])
            memcpy(at, entries[i], lens[i]);
        at += lens[i];
    }
    write_tuning_section(rec, nt, tkeys, tkey_lens, tvalues, tvalue_lens);
    fajit__sha256_of(buf, head - BUNDLE_DIGEST, buf + head - BUNDLE_DIGEST);
    memcpy(digest, buf + head - BUNDLE_DIGEST, 32);
    *out = buf;
    *out_len = total;
    return 0;
}

int fajit__bundle_build(size_t n, const uint8_t (*keys)[16], const uint8_t *const *entries,
                        const size_t *lens, uint8_t **out, size_t *out_len, uint8_t digest[32])
{
    return fajit__bundle_build_tuning(n, keys, entries, lens, 0, NULL, NULL, NULL, NULL, out,
                                      out_len, digest);
}

/* The records of a tuning section fill exactly tbytes; NULL if so, else why. */
static const char *check_tuning_section(const uint8_t *at, size_t nt, size_t tbytes)
{
    size_t used = 0;
    for (size_t i = 0; i < nt; i++) {
        if (tbytes - used < TUNING_REC_HEAD)
            return "tuning record runs past its section";
        size_t kl = (size_t)at[used] | (size_t)at[used + 1] << 8;
        size_t vl = (size_t)at[used + 2] | (size_t)at[used + 3] << 8;
        used += TUNING_REC_HEAD;
        if (kl == 0 || kl > tbytes - used || vl > tbytes - used - kl)
            return "tuning record runs past its section";
        used += kl + vl;
    }
    return used == tbytes ? NULL : "tuning records do not fill their section";
}

/* Header and manifest digest; NULL if fine, else why. *mlen is the header's
 * length (where the manifest starts), *nt and *tbytes the tuning section's. */
static const char *check_bundle_head(const uint8_t *buf, size_t len, size_t *count,
                                     size_t *head, size_t *mlen, size_t *nt, size_t *tbytes)
{
    uint8_t sum[32];
    uint32_t version;
    if (len < BUNDLE_HEAD + BUNDLE_DIGEST)
        return "shorter than a bundle header";
    if (memcmp(buf, FAJIT__BUNDLE_MAGIC, 8) != 0)
        return "bad magic (not a fajit bundle)";
    version = get_u32(buf + 8);
    if (version != FAJIT__BUNDLE_VERSION && version != FAJIT__BUNDLE_VERSION_TUNING)
        return "unknown bundle version";
    *mlen = version == FAJIT__BUNDLE_VERSION ? BUNDLE_HEAD : BUNDLE_HEAD_V2;
    if (len < *mlen + BUNDLE_DIGEST)
        return "shorter than a bundle header";
    *nt = version == FAJIT__BUNDLE_VERSION ? 0 : get_u32(buf + 24);
    *tbytes = version == FAJIT__BUNDLE_VERSION ? 0 : get_u32(buf + 28);
    if (*tbytes > len - *mlen - BUNDLE_DIGEST)
        return "tuning records run past the end of the bundle";
    *count = get_u32(buf + 12);
    if (*count > (len - *mlen - BUNDLE_DIGEST - *tbytes) / BUNDLE_RECORD)
        return "manifest runs past the end of the bundle";
    *head = *mlen + *count * BUNDLE_RECORD + *tbytes + BUNDLE_DIGEST;
    if (get_u64(buf + 16) != len - *head)
        return "entry bytes do not match the bundle's length";
    fajit__sha256_of(buf, *head - BUNDLE_DIGEST, sum);
    if (memcmp(sum, buf + *head - BUNDLE_DIGEST, 32) != 0)
        return "manifest SHA-256 mismatch";
    return check_tuning_section(buf + *head - BUNDLE_DIGEST - *tbytes, *nt, *tbytes);
}

/* One manifest record against its bytes; NULL if fine, else why. */
static const char *check_bundle_entry(const uint8_t *rec, const uint8_t *entry, size_t len)
{
    uint8_t sum[32];
    fajit__entry_view view;
    const char *why = NULL;
    XXH128_canonical_t c;
    fajit__sha256_of(entry, len, sum);
    if (memcmp(sum, rec + 24, 32) != 0)
        return "entry SHA-256 mismatch";
    if (fajit__entry_decode(entry, len, &view, &why) != 0)
        return why;
    XXH128_canonicalFromHash(&c, XXH3_128bits(view.full_key, view.full_key_len));
    if (memcmp(c.digest, rec, 16) != 0)
        return "entry listed under a key that is not its digest";
    return NULL;
}

int fajit__bundle_parse(const uint8_t *buf, size_t len, fajit__bundle_view *view,
                        const char **why, size_t *bad_index)
{
    size_t count = 0, head = 0, at, mlen = BUNDLE_HEAD, nt = 0, tbytes = 0;
    const char *bad =
        buf ? check_bundle_head(buf, len, &count, &head, &mlen, &nt, &tbytes) : "no bundle bytes";
    size_t index = SIZE_MAX;
    at = head;
    for (size_t i = 0; !bad && i < count; i++) {
        const uint8_t *rec = buf + mlen + i * BUNDLE_RECORD;
        uint64_t n = get_u64(rec + 16);
        if (n > len - at)
            bad = "entry runs past the end of the bundle";
        else
            bad = check_bundle_entry(rec, buf + at, (size_t)n);
        if (bad)
            index = i;
        at += bad ? 0 : (size_t)n;
    }
    if (!bad && at != len)
        bad = "entry lengths do not add up to the bundle's length";
    if (why)
        *why = bad;
    if (bad_index)
        *bad_index = index;
    if (bad)
        return FAJIT_ECORRUPT;
    if (view) {
        view->count = count;
        view->manifest = buf + mlen;
        view->entries = buf + head;
        memcpy(view->digest, buf + head - BUNDLE_DIGEST, 32);
        view->tuning_count = nt;
        view->tuning = buf + head - BUNDLE_DIGEST - tbytes;
    }
    return 0;
}

void fajit__bundle_item(const fajit__bundle_view *b, size_t i, const uint8_t **key,
                        const uint8_t **entry, size_t *len)
{
    const uint8_t *at = b->entries;
    for (size_t j = 0; j < i; j++)
        at += get_u64(b->manifest + j * BUNDLE_RECORD + 16);
    *key = b->manifest + i * BUNDLE_RECORD;
    *entry = at;
    *len = (size_t)get_u64(b->manifest + i * BUNDLE_RECORD + 16);
}

void fajit__bundle_tuning_item(const fajit__bundle_view *b, size_t i, const uint8_t **key,
                               size_t *key_len, const uint8_t **value, size_t *value_len)
{
    const uint8_t *at = b->tuning;
    for (size_t j = 0;; j++) {
        size_t kl = (size_t)at[0] | (size_t)at[1] << 8, vl = (size_t)at[2] | (size_t)at[3] << 8;
        if (j == i) {
            *key = at + TUNING_REC_HEAD;
            *key_len = kl;
            *value = at + TUNING_REC_HEAD + kl;
            *value_len = vl;
            return;
        }
        at += TUNING_REC_HEAD + kl + vl;
    }
}
