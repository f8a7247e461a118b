/*
 * tests/test_entry.c - the cache entry format (cache/entry.c, cache/FORMAT.md):
 * round trip, every corruption class, and the golden file that pins the bytes.
 *
 * `test_entry --write-golden PATH` regenerates the golden file; do that only
 * together with a deliberate format change (see cache/FORMAT.md).
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cache/entry.h"
#include "fajit.h"

static int failures;

#define CHECK(cond, ...)                          \
    do {                                          \
        if (cond) {                               \
            printf("ok   ");                      \
        } else {                                  \
            printf("FAIL ");                      \
            failures++;                           \
        }                                         \
        printf(__VA_ARGS__);                      \
        printf("  [%s:%d]\n", __FILE__, __LINE__); \
    } while (0)

#define GOLDEN_PATH FAJIT_SOURCE_DIR "/tests/golden/entry_v1.bin"

/* The fixed inputs of the golden entry. */
static const fajit__entry_meta golden_meta = {
    .arch = 90,
    .arch_suffix = 'a',
    .nvrtc_version = 12080,
    .registers = 168,
    .smem_bytes = 49152,
    .spill_bytes = 24,
    .compile_us = 1234567,
};
static const char golden_key[] = "fwd dqk=72 dv=72 dtype=bf16 mask=causal arch=sm_90a";
static uint8_t golden_cubin[40];

static void fill_golden_cubin(void)
{
    for (size_t i = 0; i < sizeof golden_cubin; i++)
        golden_cubin[i] = (uint8_t)(i * 37 + 11);
}

static int encode_golden(uint8_t **buf, size_t *len)
{
    return fajit__entry_encode(&golden_meta, (const uint8_t *)golden_key, strlen(golden_key),
                               golden_cubin, sizeof golden_cubin, buf, len);
}

static int meta_equal(const fajit__entry_meta *a, const fajit__entry_meta *b)
{
    return a->arch == b->arch && a->arch_suffix == b->arch_suffix &&
           a->nvrtc_version == b->nvrtc_version && a->registers == b->registers &&
           a->smem_bytes == b->smem_bytes && a->spill_bytes == b->spill_bytes &&
           a->compile_us == b->compile_us;
}

/* Decodes a private copy of exactly len bytes, so a read past the end is a
 * heap overflow that ASan reports. */
static int decode_copy(const uint8_t *buf, size_t len, const char **why)
{
    uint8_t *copy = malloc(len ? len : 1);
    if (!copy)
        return -999;
    memcpy(copy, buf, len);
    fajit__entry_view v;
    int rc = fajit__entry_decode(copy, len, &v, why);
    free(copy);
    return rc;
}

static uint8_t *read_file(const char *path, size_t *len)
{
    FILE *f = fopen(path, "rb");
    if (!f)
        return NULL;
    uint8_t *buf = malloc(1 << 16);
    *len = buf ? fread(buf, 1, 1 << 16, f) : 0;
    fclose(f);
    return buf;
}

static int write_golden(const char *path)
{
    uint8_t *buf;
    size_t len;
    if (encode_golden(&buf, &len) != 0)
        return 1;
    FILE *f = fopen(path, "wb");
    int ok = f && fwrite(buf, 1, len, f) == len;
    if (f)
        ok = (fclose(f) == 0) && ok;
    free(buf);
    printf("%s %s (%zu bytes)\n", ok ? "wrote" : "FAILED to write", path, len);
    return !ok;
}

static void test_round_trip(void)
{
    uint8_t *buf;
    size_t len;
    int rc = encode_golden(&buf, &len);
    CHECK(rc == 0, "encode returns 0 (got %d)", rc);
    if (rc)
        return;
    CHECK(len == 64 + strlen(golden_key) + sizeof golden_cubin, "entry length %zu", len);
    fajit__entry_view v;
    const char *why = "unset";
    rc = fajit__entry_decode(buf, len, &v, &why);
    CHECK(rc == 0 && why == NULL, "decode of a fresh entry succeeds (rc %d)", rc);
    CHECK(meta_equal(&v.meta, &golden_meta), "metadata round-trips");
    CHECK(v.full_key_len == strlen(golden_key) && v.full_key == buf + 64 &&
              memcmp(v.full_key, golden_key, v.full_key_len) == 0,
          "full key round-trips and points into the buffer");
    CHECK(v.cubin_len == sizeof golden_cubin && v.cubin == buf + 64 + v.full_key_len &&
              memcmp(v.cubin, golden_cubin, v.cubin_len) == 0,
          "cubin round-trips and points into the buffer");
    free(buf);

    fajit__entry_meta zero = {0};
    rc = fajit__entry_encode(&zero, NULL, 0, NULL, 0, &buf, &len);
    CHECK(rc == 0 && len == 64, "empty key and cubin encode to a bare header");
    if (rc == 0) {
        rc = fajit__entry_decode(buf, len, &v, NULL);
        CHECK(rc == 0 && v.full_key_len == 0 && v.cubin_len == 0, "bare header decodes");
        free(buf);
    }
    rc = fajit__entry_encode(&zero, NULL, 5, NULL, 0, &buf, &len);
    CHECK(rc == FAJIT_EINVAL, "NULL key with a length is FAJIT_EINVAL (got %d)", rc);
    rc = fajit__entry_encode(NULL, NULL, 0, NULL, 0, &buf, &len);
    CHECK(rc == FAJIT_EINVAL, "NULL meta is FAJIT_EINVAL (got %d)", rc);
}

static void test_golden(void)
{
    uint8_t *buf, *golden;
    size_t len, golden_len = 0;
    if (encode_golden(&buf, &len) != 0) {
        CHECK(0, "encode golden inputs");
        return;
    }
    golden = read_file(GOLDEN_PATH, &golden_len);
    CHECK(golden != NULL, "read %s", GOLDEN_PATH);
    if (golden) {
        CHECK(golden_len == len && memcmp(golden, buf, len) == 0,
              "encoding the golden inputs gives the golden bytes (%zu vs %zu bytes); a "
              "format change must bump the version and regenerate the file",
              len, golden_len);
        CHECK(memcmp(golden, "FAJITCE\x01\x01\0\0\0\x40\0\0\0", 16) == 0,
              "golden starts with magic, version 1, header length 64");
        fajit__entry_view v;
        int rc = fajit__entry_decode(golden, golden_len, &v, NULL);
        CHECK(rc == 0, "the golden file decodes (rc %d)", rc);
        if (rc == 0) {
            CHECK(meta_equal(&v.meta, &golden_meta), "golden metadata as written");
            CHECK(v.full_key_len == strlen(golden_key) &&
                      memcmp(v.full_key, golden_key, v.full_key_len) == 0,
                  "golden full key as written");
            CHECK(v.cubin_len == sizeof golden_cubin &&
                      memcmp(v.cubin, golden_cubin, v.cubin_len) == 0,
                  "golden cubin as written");
        }
    }
    free(golden);
    free(buf);
}

/* Flipping any single byte, in any bit, must make decode fail. */
static void test_byte_flips(const uint8_t *buf, size_t len)
{
    uint8_t *copy = malloc(len);
    static const uint8_t masks[] = {0x01, 0x80, 0xff};
    int undetected = 0, wrong_why = 0;
    for (size_t i = 0; i < len; i++) {
        for (size_t m = 0; m < sizeof masks; m++) {
            memcpy(copy, buf, len);
            copy[i] ^= masks[m];
            const char *why = NULL;
            if (decode_copy(copy, len, &why) != FAJIT_ECORRUPT || !why)
                undetected++;
            /* Key and cubin bytes are only covered by the checksum. */
            if (i >= 64 && (!why || strcmp(why, "checksum mismatch") != 0))
                wrong_why++;
        }
    }
    CHECK(undetected == 0, "every single-byte flip of a %zu-byte entry is detected (%d missed)",
          len, undetected);
    CHECK(wrong_why == 0, "flips in key and cubin bytes are caught by the checksum (%d not)",
          wrong_why);
    free(copy);
}

static void test_truncation_and_trailing(const uint8_t *buf, size_t len)
{
    int undetected = 0, short_why = 0;
    for (size_t n = 0; n < len; n++) {
        const char *why = NULL;
        if (decode_copy(buf, n, &why) != FAJIT_ECORRUPT || !why)
            undetected++;
        else if (n < 64 && strcmp(why, "shorter than the 64-byte header") != 0)
            short_why++;
    }
    CHECK(undetected == 0, "truncation at every length 0..%zu is detected (%d missed)", len - 1,
          undetected);
    CHECK(short_why == 0, "truncation inside the header says so (%d did not)", short_why);

    uint8_t *longer = malloc(len + 1);
    memcpy(longer, buf, len);
    longer[len] = 0;
    const char *why = NULL;
    int rc = decode_copy(longer, len + 1, &why);
    CHECK(rc == FAJIT_ECORRUPT && why && strcmp(why, "trailing bytes after the cubin") == 0,
          "one trailing byte is rejected (%s)", why ? why : "accepted");
    free(longer);
}

/* Sets a header field, recomputing nothing: the length checks come first. */
static const char *why_with_field(const uint8_t *buf, size_t len, size_t off, const uint8_t *val,
                                  size_t n)
{
    uint8_t *copy = malloc(len);
    memcpy(copy, buf, len);
    memcpy(copy + off, val, n);
    const char *why = NULL;
    if (decode_copy(copy, len, &why) != FAJIT_ECORRUPT)
        why = NULL;
    free(copy);
    return why;
}

static void test_distinct_reasons(const uint8_t *buf, size_t len)
{
    static const uint8_t ones[8] = {0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff};
    static const uint8_t two[4] = {2, 0, 0, 0}, sixty_five[4] = {65, 0, 0, 0};
    uint8_t one_more[8] = {0}, key_more[4] = {0};
    size_t cubin_len = len - 64 - strlen(golden_key);
    one_more[0] = (uint8_t)(cubin_len + 1);
    key_more[0] = (uint8_t)(strlen(golden_key) + sizeof golden_cubin + 1);
    const char *whys[8];
    const char *dummy = NULL;
    whys[0] = decode_copy(buf, 10, &dummy) == FAJIT_ECORRUPT ? dummy : NULL;
    whys[1] = why_with_field(buf, len, 0, (const uint8_t *)"FAJITCF", 7);
    whys[2] = why_with_field(buf, len, 8, two, 4);
    whys[3] = why_with_field(buf, len, 12, sixty_five, 4);
    whys[4] = why_with_field(buf, len, 44, key_more, 4);
    whys[5] = why_with_field(buf, len, 48, one_more, 8);
    uint8_t *longer = malloc(len + 3);
    memcpy(longer, buf, len);
    memset(longer + len, 0, 3);
    whys[6] = decode_copy(longer, len + 3, &dummy) == FAJIT_ECORRUPT ? dummy : NULL;
    free(longer);
    whys[7] = why_with_field(buf, len, 56, ones, 8);
    static const char *const expect[8] = {
        "shorter than the 64-byte header",
        "bad magic (not a fajit cache entry)",
        "unknown format version",
        "header length does not match the format version",
        "full key length runs past the end of the entry",
        "cubin length runs past the end of the entry",
        "trailing bytes after the cubin",
        "checksum mismatch",
    };
    for (int i = 0; i < 8; i++)
        CHECK(whys[i] && strcmp(whys[i], expect[i]) == 0, "reason \"%s\" (got \"%s\")", expect[i],
              whys[i] ? whys[i] : "(accepted)");
    int distinct = 1;
    for (int i = 0; i < 8; i++)
        for (int j = i + 1; j < 8; j++)
            if (whys[i] && whys[j] && strcmp(whys[i], whys[j]) == 0)
                distinct = 0;
    CHECK(distinct, "all eight reasons are distinct");

    /* Lengths so large that a careless sum would wrap around. */
    CHECK(why_with_field(buf, len, 44, ones, 4) != NULL, "full key length 0xffffffff rejected");
    CHECK(why_with_field(buf, len, 48, ones, 8) != NULL, "cubin length 2^64-1 rejected");
    const char *why = NULL;
    CHECK(fajit__entry_decode(NULL, 100, NULL, &why) == FAJIT_ECORRUPT && why,
          "NULL buffer rejected");
}

/* An entry made in place in the cubin's own buffer (as the runtime does after
 * a compile) is byte for byte the one fajit__entry_encode makes; a buffer
 * without room for it is refused, untouched. */
static void test_in_place(void)
{
    uint8_t *ref = NULL, *buf = malloc(sizeof golden_cubin + FAJIT__ENTRY_ROOM);
    size_t ref_len = 0, len = 0, key_len = strlen(golden_key);
    if (!buf || encode_golden(&ref, &ref_len) != 0) {
        CHECK(0, "in place: setup");
        free(buf);
        return;
    }
    memcpy(buf, golden_cubin, sizeof golden_cubin);
    int rc = fajit__entry_encode_in_place(buf, sizeof golden_cubin + key_len + 63, &golden_meta,
                                          (const uint8_t *)golden_key, key_len,
                                          sizeof golden_cubin, &len);
    CHECK(rc == FAJIT_EINVAL && memcmp(buf, golden_cubin, sizeof golden_cubin) == 0,
          "in place: a buffer one byte short is refused and left as it was");
    rc = fajit__entry_encode_in_place(buf, sizeof golden_cubin + FAJIT__ENTRY_ROOM, &golden_meta,
                                      (const uint8_t *)golden_key, key_len, sizeof golden_cubin,
                                      &len);
    CHECK(rc == 0 && len == ref_len && memcmp(buf, ref, len) == 0,
          "in place: the entry equals fajit__entry_encode's (%zu bytes)", len);
    free(ref);
    free(buf);
}

int main(int argc, char **argv)
{
    fill_golden_cubin();
    if (argc == 3 && strcmp(argv[1], "--write-golden") == 0)
        return write_golden(argv[2]);
    test_round_trip();
    test_golden();
    test_in_place();
    uint8_t *buf;
    size_t len;
    if (encode_golden(&buf, &len) == 0) {
        test_byte_flips(buf, len);
        test_truncation_and_trailing(buf, len);
        test_distinct_reasons(buf, len);
        free(buf);
    }
    printf("%s: %d failure(s)\n", failures ? "FAIL" : "PASS", failures);
    return failures ? 1 : 0;
}
