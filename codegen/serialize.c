/*
 * codegen/serialize.c - the variant's binary form, the bytes that get hashed
 * into cache keys and stored in entries:
 *
 *   offset 0  "FJV"            magic, 3 bytes
 *   offset 3  version          1 byte (FAJIT__VARIANT_SER_VERSION)
 *   offset 4  field count      u16, little-endian (18 in version 1)
 *   offset 6  fields           field count x i32, little-endian, struct order:
 *             op dqk dv dtype mask window_left window_right dropout softcap
 *             alibi varlen paged bm bn warps stages arch arch_suffix
 *
 * Written byte by byte, so the result does not depend on the host's struct
 * layout or endianness. tests/test_serialize.c holds golden digests of it.
 */
#include "codegen/variant.h"

#include <string.h>

#include "fajit.h"
#include "runtime/error.h"

#define HEADER_LEN 6

/* Struct order; a new field goes at the end with a new version. */
static int *field_slot(fajit__variant *v, size_t i)
{
    int *const f[] = {&v->op,      &v->dqk,          &v->dv,          &v->dtype,   &v->mask,
                      &v->window_left, &v->window_right, &v->dropout, &v->softcap, &v->alibi,
                      &v->varlen,  &v->paged,        &v->bm,          &v->bn,      &v->warps,
                      &v->stages,  &v->arch,         &v->arch_suffix};
    return f[i];
}
#define NFIELDS 18u
/* A field added to the struct must be added above (and the version bumped). */
_Static_assert(sizeof(fajit__variant) == NFIELDS * sizeof(int), "serialize.c misses a variant field");

size_t fajit__variant_serialize(const fajit__variant *v, uint8_t *buf, size_t cap)
{
    size_t len = HEADER_LEN + 4 * NFIELDS;
    fajit__variant copy = *v;

    if (!buf || cap < len)
        return len;
    memcpy(buf, "FJV", 3);
    buf[3] = FAJIT__VARIANT_SER_VERSION;
    buf[4] = (uint8_t)(NFIELDS & 0xff);
    buf[5] = (uint8_t)(NFIELDS >> 8);
    for (size_t i = 0; i < NFIELDS; i++) {
        uint32_t x = (uint32_t)*field_slot(&copy, i);
        uint8_t *p = buf + HEADER_LEN + 4 * i;
        p[0] = (uint8_t)x;
        p[1] = (uint8_t)(x >> 8);
        p[2] = (uint8_t)(x >> 16);
        p[3] = (uint8_t)(x >> 24);
    }
    return len;
}

static int32_t read_i32(const uint8_t *p)
{
    uint32_t x = (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
    return (int32_t)x; /* two's complement on every platform we build for */
}

static int check_header(const uint8_t *buf, size_t len)
{
    unsigned count;
    if (len < HEADER_LEN)
        return fajit__fail(FAJIT_EPARSE, "serialised variant: %zu bytes, shorter than its %d-byte header",
                           len, HEADER_LEN);
    if (memcmp(buf, "FJV", 3) != 0)
        return fajit__fail(FAJIT_EPARSE, "serialised variant: bad magic %02x %02x %02x (expected \"FJV\")",
                           buf[0], buf[1], buf[2]);
    if (buf[3] != FAJIT__VARIANT_SER_VERSION)
        return fajit__fail(FAJIT_EPARSE, "serialised variant: version %u unknown (this build reads %d)",
                           buf[3], FAJIT__VARIANT_SER_VERSION);
    count = (unsigned)buf[4] | (unsigned)buf[5] << 8;
    if (count != NFIELDS)
        return fajit__fail(FAJIT_EPARSE, "serialised variant: field count %u (version %d has %u)", count,
                           FAJIT__VARIANT_SER_VERSION, NFIELDS);
    if (len != HEADER_LEN + 4 * NFIELDS)
        return fajit__fail(FAJIT_EPARSE, "serialised variant: %zu bytes (expected exactly %u)", len,
                           HEADER_LEN + 4 * NFIELDS);
    return 0;
}

int fajit__variant_deserialize(const uint8_t *buf, size_t len, fajit__variant *out)
{
    fajit__variant v;
    if (!buf)
        return fajit__fail(FAJIT_EPARSE, "serialised variant: no bytes");
    if (check_header(buf, len))
        return FAJIT_EPARSE;
    memset(&v, 0, sizeof v);
    for (size_t i = 0; i < NFIELDS; i++)
        *field_slot(&v, i) = read_i32(buf + HEADER_LEN + 4 * i);
    if (fajit__variant_check(&v))
        return fajit__fail_prefix(FAJIT_EPARSE, "serialised variant");
    *out = v;
    return 0;
}
