/*
 * tests/test_serialize.c - the binary form: layout, round trips, rejection of
 * truncated, padded, garbage and unknown-version input, and golden XXH3-128
 * digests. The digests are cache keys' raw material: if this test fails after
 * a change to serialize.c, the change moved every key. Do it only on purpose,
 * with FAJIT__VARIANT_SER_VERSION bumped, and update the goldens here.
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <xxhash.h>

#include "codegen/variant.h"
#include "fajit.h"
#include "runtime/error.h"

#define SER_LEN 78 /* 6-byte header + 18 fields x 4 */

static int failures;

static void check(int ok, const char *what)
{
    printf("%s %s\n", ok ? "ok  " : "FAIL", what);
    if (!ok) {
        printf("     detail: '%s'\n", fajit_last_error());
        failures++;
    }
}

static void to_hex(const uint8_t *b, size_t n, char *out)
{
    for (size_t i = 0; i < n; i++)
        sprintf(out + 2 * i, "%02x", b[i]);
}

static void digest_hex(const uint8_t *buf, size_t len, char out[33])
{
    XXH128_canonical_t c;
    XXH128_canonicalFromHash(&c, XXH3_128bits(buf, len));
    to_hex(c.digest, 16, out);
}

static const char *const example =
    "ref dqk=72 dv=72 dtype=bf16 mask=causal window=-1,-1 dropout=0 softcap=0 alibi=0 varlen=0 "
    "paged=0 bm=4 bn=32 warps=4 stages=1 arch=sm_90";

static void test_layout(void)
{
    fajit__variant v;
    uint8_t buf[SER_LEN + 8];
    char hex[2 * SER_LEN + 1];
    fajit__variant_parse(example, &v);

    check(fajit__variant_serialize(&v, NULL, 0) == SER_LEN, "serialize(NULL) gives the length, 78");
    memset(buf, 0xee, sizeof buf);
    check(fajit__variant_serialize(&v, buf, SER_LEN - 1) == SER_LEN && buf[0] == 0xee,
          "too small a buffer: length returned, nothing written");
    check(fajit__variant_serialize(&v, buf, sizeof buf) == SER_LEN && buf[SER_LEN] == 0xee,
          "serialize writes exactly 78 bytes");
    to_hex(buf, SER_LEN, hex);
    /* "FJV", version 1, count 18, then op dqk dv dtype mask wl wr dropout softcap alibi
     * varlen paged bm bn warps stages arch suffix, each i32 little-endian. */
    const char *want = "464a5601"
                       "1200"
                       "00000000" "48000000" "48000000" "01000000" "01000000"
                       "ffffffff" "ffffffff" "00000000" "00000000" "00000000"
                       "00000000" "00000000" "04000000" "20000000" "04000000"
                       "01000000" "5a000000" "00000000";
    check(strcmp(hex, want) == 0, "byte layout of the example is exactly the documented one");
    if (strcmp(hex, want) != 0)
        printf("     got  %s\n     want %s\n", hex, want);
}

struct rt {
    int n, bad;
};

static int round_trip(void *user, const fajit__variant *spec, int line)
{
    struct rt *r = user;
    fajit__variant v = *spec, w;
    uint8_t buf[SER_LEN], again[SER_LEN];
    (void)line;
    /* Manifest specs may leave tiles out; fill them so the variant is full. */
    if (v.bm == FAJIT__UNSET)
        v.bm = v.op == FAJIT__OP_REF ? 4 : 128;
    if (v.bn == FAJIT__UNSET)
        v.bn = 64;
    if (v.warps == FAJIT__UNSET)
        v.warps = 4;
    if (v.stages == FAJIT__UNSET)
        v.stages = 1;
    r->n++;
    if (fajit__variant_serialize(&v, buf, sizeof buf) != SER_LEN ||
        fajit__variant_deserialize(buf, sizeof buf, &w) != 0 || memcmp(&v, &w, sizeof v) != 0 ||
        fajit__variant_serialize(&w, again, sizeof again) != SER_LEN || memcmp(buf, again, SER_LEN) != 0) {
        if (r->bad++ < 3)
            printf("     round trip failed: %s\n", fajit_last_error());
    }
    return 0;
}

static void test_round_trips(void)
{
    struct rt r = {0, 0};
    int rc = fajit__manifest_expand(
        "ref,fwd,bwd dqk=1..512:37 dv=8,512 dtype=fp16,bf16 mask=none,causal,causal-tl "
        "window=-1,-1;0,0;4096,7 dropout=0,1 softcap=0,1 alibi=0,1 "
        "arch=sm_80,sm_86,sm_87,sm_89,sm_90,sm_90a,sm_100a,sm_121\n"
        "fwd dqk=64 bm=1,256 bn=1,256 warps=1,16 stages=1,8 varlen=0,1 paged=0,1 arch=sm_120\n",
        round_trip, &r);
    printf("     %d variants\n", r.n);
    check(rc == 0 && r.n == 3 * 14 * 2 * 2 * 3 * 3 * 8 * 8 + 64 && r.bad == 0,
          "every variant of a broad manifest: deserialize(serialize(v)) == v, bytes stable");
}

static uint8_t example_bytes[SER_LEN];

static int reject(const uint8_t *buf, size_t len, const char *expect, const char *what)
{
    fajit__variant out, sentinel;
    memset(&out, 0x5a, sizeof out);
    sentinel = out;
    int rc = fajit__variant_deserialize(buf, len, &out);
    int ok = rc == FAJIT_EPARSE && memcmp(&out, &sentinel, sizeof out) == 0 &&
             (!expect || strstr(fajit_last_error(), expect));
    if (!ok)
        printf("     %s: rc %d, detail '%s', expected '%s'\n", what, rc, fajit_last_error(),
               expect ? expect : "(any)");
    return ok;
}

static void test_rejections(void)
{
    fajit__variant v;
    uint8_t b[SER_LEN + 1];
    int ok = 1;
    fajit__variant_parse(example, &v);
    fajit__variant_serialize(&v, example_bytes, sizeof example_bytes);

    for (size_t len = 0; len < SER_LEN; len++)
        ok &= reject(example_bytes, len, len < 6 ? "shorter than its 6-byte header" : "bytes (expected exactly 78)",
                     "truncated");
    check(ok, "every truncation (0..77 bytes) rejected");

    memcpy(b, example_bytes, SER_LEN);
    b[SER_LEN] = 0;
    check(reject(b, SER_LEN + 1, "79 bytes (expected exactly 78)", "padded"), "one byte too many rejected");
    check(reject(NULL, 0, "no bytes", "NULL"), "NULL rejected");

    memcpy(b, example_bytes, SER_LEN);
    b[0] = 'X';
    check(reject(b, SER_LEN, "bad magic", "magic"), "bad magic rejected");
    memcpy(b, example_bytes, SER_LEN);
    b[3] = 2;
    check(reject(b, SER_LEN, "version 2 unknown", "version"), "unknown version 2 rejected");
    b[3] = 0;
    check(reject(b, SER_LEN, "version 0 unknown", "version"), "version 0 rejected");
    memcpy(b, example_bytes, SER_LEN);
    b[4] = 17;
    check(reject(b, SER_LEN, "field count 17", "count"), "wrong field count rejected");
    memcpy(b, example_bytes, SER_LEN);
    b[5] = 1;
    check(reject(b, SER_LEN, "field count 274", "count"), "field count's high byte read");

    static const struct {
        int field;
        int32_t value;
        const char *expect;
    } bad_values[] = {
        {0, 99, "op=99"},      {1, 0, "dqk=0"},          {2, 513, "dv=513"},
        {3, 2, "dtype=2"},     {4, -1, "mask=-1"},       {5, -2, "left=-2"},
        {7, 2, "dropout=2"},   {11, 1 << 24, "paged=16777216"}, {12, -1, "bm: unset"},
        {13, 48, "bn=48: op ref needs a multiple of 32"}, {14, 3, "warps=3"},
        {15, 2, "stages=2"},   {16, 75, "arch=sm_75"},   {17, 'b', "arch_suffix=98"},
        {16, -1, "arch: unset"},
    };
    ok = 1;
    for (size_t i = 0; i < sizeof bad_values / sizeof bad_values[0]; i++) {
        uint32_t x = (uint32_t)bad_values[i].value;
        uint8_t *p = b + 6 + 4 * bad_values[i].field;
        memcpy(b, example_bytes, SER_LEN);
        p[0] = (uint8_t)x;
        p[1] = (uint8_t)(x >> 8);
        p[2] = (uint8_t)(x >> 16);
        p[3] = (uint8_t)(x >> 24);
        ok &= reject(b, SER_LEN, bad_values[i].expect, "bad value");
        ok &= strncmp(fajit_last_error(), "serialised variant: ", 20) == 0;
    }
    check(ok, "field values the check refuses are rejected, naming field and value");

    /* Random bytes behind a valid header: whatever is accepted must be a valid
     * variant that serialises back to the same bytes. */
    uint64_t s = 12345;
    int accepted = 0, bad = 0;
    for (int i = 0; i < 20000; i++) {
        memcpy(b, example_bytes, SER_LEN);
        for (int k = 0; k < 1 + i % 4; k++) {
            s = s * 6364136223846793005ull + 1442695040888963407ull;
            b[(s >> 33) % SER_LEN] = (uint8_t)(s >> 20);
        }
        fajit__variant w;
        uint8_t again[SER_LEN];
        if (fajit__variant_deserialize(b, SER_LEN, &w) != 0)
            continue;
        accepted++;
        if (fajit__variant_check(&w) != 0 || fajit__variant_serialize(&w, again, SER_LEN) != SER_LEN ||
            memcmp(again, b, SER_LEN) != 0)
            bad++;
    }
    printf("     20000 mutated buffers, %d accepted\n", accepted);
    check(bad == 0 && accepted < 20000, "random mutations: rejected, or valid and byte-identical");
}

/* Golden keys' raw material. Computed once with this implementation; a change
 * here means every cache key moved. */
static const struct {
    const char *text, *digest;
} goldens[] = {
    {"ref dqk=72 dv=72 dtype=bf16 mask=causal window=-1,-1 dropout=0 softcap=0 alibi=0 varlen=0 "
     "paged=0 bm=4 bn=32 warps=4 stages=1 arch=sm_90",
     "e3a345567a5edb2cb06ee8a2e1db8f5d"},
    {"ref dqk=128 dv=128 dtype=fp16 mask=none window=-1,-1 dropout=0 softcap=0 alibi=0 varlen=0 "
     "paged=0 bm=8 bn=64 warps=8 stages=1 arch=sm_80",
     "90a4a032a5486109da3c84cc901ab889"},
    {"fwd dqk=192 dv=128 dtype=bf16 mask=causal-tl window=256,0 dropout=1 softcap=1 alibi=0 "
     "varlen=1 paged=0 bm=128 bn=64 warps=4 stages=2 arch=sm_90a",
     "29c1b3263d9ecfd366bd0eaa3a996e57"},
    {"bwd dqk=512 dv=1 dtype=fp16 mask=causal window=0,1024 dropout=0 softcap=0 alibi=1 varlen=0 "
     "paged=1 bm=64 bn=128 warps=16 stages=8 arch=sm_121",
     "00f6a1fa4388ffe14c06ee3145c89a0f"},
};

static void test_goldens(void)
{
    int ok = 1;
    for (size_t i = 0; i < sizeof goldens / sizeof goldens[0]; i++) {
        fajit__variant v;
        uint8_t buf[SER_LEN];
        char hex[33];
        if (fajit__variant_parse(goldens[i].text, &v) != 0) {
            printf("     golden %zu does not parse: %s\n", i, fajit_last_error());
            ok = 0;
            continue;
        }
        fajit__variant_serialize(&v, buf, sizeof buf);
        digest_hex(buf, sizeof buf, hex);
        printf("     %s  %.40s...\n", hex, goldens[i].text);
        if (strcmp(hex, goldens[i].digest) != 0) {
            printf("     golden %zu: got %s, want %s\n", i, hex, goldens[i].digest);
            ok = 0;
        }
    }
    check(ok, "golden XXH3-128 digests of 4 serialised variants unchanged");
}

int main(void)
{
    test_layout();
    test_round_trips();
    test_rejections();
    test_goldens();
    printf("%s: %d failure(s)\n", failures ? "FAIL" : "PASS", failures);
    return failures ? 1 : 0;
}
