/*
 * tests/test_cache_bundle.c - issue 6, scenario 13: export and import.
 * SHA-256 against the FIPS 180-4 test vectors; `fajit_cache_export` writes
 * the valid entries (a corrupt one is left out); `fajit_cache_import` merges
 * them into another cache, where they hit, and skips what is already there;
 * a tampered bundle (an entry byte, a manifest byte, a truncation, trailing
 * bytes, a rewritten entry with its hashes recomputed, another manifest
 * digest than the one expected) is rejected whole: nothing is imported.
 * Also the CLI: `fajit export FILE` and `fajit import FILE [SHA256]`. No GPU.
 */
#include <sys/wait.h>

#include "cache/entry.h"
#include "cache/sha256.h"
#include "test_cache_util.h"

static const char *const specs[] = {"ref dqk=32 dtype=fp16 arch=sm_80",
                                    "ref dqk=40 dtype=bf16 arch=sm_80",
                                    "ref dqk=48 dtype=fp16 mask=causal arch=sm_90"};

static void hex(const uint8_t *b, size_t n, char *out)
{
    for (size_t i = 0; i < n; i++)
        sprintf(out + 2 * i, "%02x", b[i]);
}

static void test_sha256(void)
{
    static const struct { const char *msg; const char *digest; } v[] = {
        {"", "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"},
        {"abc", "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"},
        {"abcdbcdecdefdefgefghfghighijhijkijkljklmklmnlmnomnopnopq",
         "248d6a61d20638b8e5c026930c3e6039a33ce45964ff2167f6ecedd419db06c1"},
        {"abcdefghbcdefghicdefghijdefghijkefghijklfghijklmghijklmnhijklmnoijklmnopjklmnopqklmnopqrlmnopqrsmnopqrstnopqrstu",
         "cf5b16a778af8380036ce59e7b0492370b249b11e8f07a51afac45037afee9d1"}};
    uint8_t d[32];
    char h[65];
    for (size_t i = 0; i < sizeof v / sizeof v[0]; i++) {
        fajit__sha256_of(v[i].msg, strlen(v[i].msg), d);
        hex(d, 32, h);
        CHECK(strcmp(h, v[i].digest) == 0, "SHA-256 FIPS vector %zu (%zu bytes)", i, strlen(v[i].msg));
    }
    /* One million 'a', fed in odd chunks across block boundaries. */
    static char a[1000000];
    memset(a, 'a', sizeof a);
    fajit__sha256 s;
    fajit__sha256_init(&s);
    for (size_t at = 0, n = 1; at < sizeof a; at += n, n = n % 97 + 13)
        fajit__sha256_update(&s, a + at, at + n > sizeof a ? sizeof a - at : n);
    fajit__sha256_final(&s, d);
    hex(d, 32, h);
    CHECK(strcmp(h, "cdc76e5c9914fb9281a1c7e284d73e67f1809a48a497200e046d39ccc7112cd0") == 0,
          "SHA-256 of a million 'a' in odd chunks");
}

static uint8_t *read_file(const char *path, size_t *len)
{
    FILE *f = fopen(path, "rb");
    uint8_t *buf = NULL;
    if (f && fseek(f, 0, SEEK_END) == 0) {
        long n = ftell(f);
        rewind(f);
        buf = malloc((size_t)n + 64);
        if (buf && fread(buf, 1, (size_t)n, f) == (size_t)n)
            *len = (size_t)n;
        else {
            free(buf);
            buf = NULL;
        }
    }
    if (f)
        fclose(f);
    return buf;
}

static void write_file(const char *path, const uint8_t *buf, size_t len)
{
    FILE *f = fopen(path, "wb");
    if (!f || fwrite(buf, 1, len, f) != len)
        CHECK(0, "write %s", path);
    if (f)
        fclose(f);
}

static uint64_t entries_in(const char *dir)
{
    fajit_ctx *ctx = open_ctx(dir, FAJIT_CACHE_READWRITE, NULL);
    uint64_t n = ctx ? stats_of(ctx).entries : (uint64_t)-1;
    fajit_destroy(ctx);
    return n;
}

static int import_into(const char *dir, const char *path, const char *expect,
                       fajit_bundle_result *r)
{
    fajit_ctx *ctx = open_ctx(dir, FAJIT_CACHE_READWRITE, NULL);
    int rc = ctx ? fajit_cache_import(ctx, path, expect, r) : -1;
    fajit_destroy(ctx);
    return rc;
}

/* Rewrites entry 0's cubin byte and recomputes its SHA-256 and the
 * manifest's: only the entry's own checksum can catch it. */
static void rehash_tamper(uint8_t *b, size_t len)
{
    size_t count = b[12], head = 24 + count * 56 + 32;
    uint64_t n0 = 0;
    for (int i = 7; i >= 0; i--)
        n0 = n0 << 8 | b[24 + 16 + i];
    b[head + n0 - 10] ^= 1;
    fajit__sha256_of(b + head, n0, b + 24 + 24);
    fajit__sha256_of(b, head - 32, b + head - 32);
    (void)len;
}

static void test_tampering(const char *bundle, const char *sha)
{
    size_t len = 0;
    uint8_t *good = read_file(bundle, &len);
    if (!good) {
        failures++;
        return;
    }
    static const char *const names[] = {"an entry byte flipped", "a manifest byte flipped",
                                        "the manifest digest flipped", "truncated",
                                        "trailing bytes", "an entry rewritten, hashes recomputed",
                                        "another entry count", "bad magic"};
    for (int t = 0; t < 8; t++) {
        char path[300], dir[300];
        uint8_t *b = malloc(len + 64);
        size_t n = len;
        memcpy(b, good, len);
        switch (t) {
        case 0: b[len - 50] ^= 4; break;
        case 1: b[24 + 56 + 20] ^= 1; break;
        case 2: b[24 + 3 * 56 + 5] ^= 1; break;
        case 3: n = len - 1000; break;
        case 4: memset(b + len, 0, 8); n = len + 8; break;
        case 5: rehash_tamper(b, len); break;
        case 6: b[12] = 2; break;
        case 7: b[0] = 'X'; break;
        }
        snprintf(path, sizeof path, "%s/tampered-%d.bundle", root, t);
        snprintf(dir, sizeof dir, "%s/tampered-%d", root, t);
        write_file(path, b, n);
        free(b);
        fajit_bundle_result r;
        int rc = import_into(dir, path, NULL, &r);
        char why[512];
        snprintf(why, sizeof why, "%s", fajit_last_error());
        CHECK(rc == FAJIT_ECORRUPT && strstr(why, "nothing imported") && entries_in(dir) == 0,
              "%s: rejected whole, nothing imported: %s", names[t], why);
    }
    char dir[300], wrong[65];
    snprintf(dir, sizeof dir, "%s/wrong-sha", root);
    memcpy(wrong, sha, 65);
    wrong[0] = wrong[0] == '0' ? '1' : '0';
    fajit_bundle_result r;
    CHECK(import_into(dir, bundle, wrong, &r) == FAJIT_ECORRUPT && entries_in(dir) == 0,
          "an intact bundle with another manifest SHA-256 than expected: rejected");
    free(good);
}

static void test_cli(const char *src, const char *bundle)
{
    char cmd[2000], out[300], sha[65] = "";
    snprintf(out, sizeof out, "%s/cli.txt", root);
    snprintf(cmd, sizeof cmd, "%s --cache-dir %s export %s/cli.bundle > %s", FAJIT_TOOL, src, root,
             out);
    int rc = system(cmd);
    size_t len = 0;
    char *text = (char *)read_file(out, &len);
    if (text) {
        text[len] = '\0';
        char *p = strstr(text, "manifest sha256: ");
        if (p)
            memcpy(sha, p + 17, 64), sha[64] = '\0';
    }
    CHECK(rc == 0 && text && strstr(text, "exported") && strlen(sha) == 64,
          "fajit export FILE prints the manifest SHA-256");
    free(text);
    snprintf(cmd, sizeof cmd, "%s --cache-dir %s/cli-dest import %s/cli.bundle %s > %s",
             FAJIT_TOOL, root, root, sha, out);
    rc = system(cmd);
    snprintf(cmd, sizeof cmd, "%s/cli-dest", root);
    CHECK(rc == 0 && entries_in(cmd) == 3, "fajit import FILE SHA256 merges it");
    snprintf(cmd, sizeof cmd, "%s --cache-dir %s/cli-bad import %s/tampered-0.bundle 2>%s",
             FAJIT_TOOL, root, root, out);
    rc = system(cmd);
    text = (char *)read_file(out, &len);
    if (text)
        text[len] = '\0';
    CHECK(WIFEXITED(rc) && WEXITSTATUS(rc) == 1 && text && strstr(text, "nothing imported"),
          "fajit import of a tampered bundle exits 1 and says why: %s", text ? text : "");
    free(text);
    (void)bundle;
}

int main(void)
{
    fajit_compile_result c;
    fajit_bundle_result r;
    make_root("bundle");
    test_sha256();
    const char *src = sub("src"), *dst = sub("dst"), *bundle = sub("all.bundle");
    fajit_ctx *ctx = open_ctx(src, FAJIT_CACHE_READWRITE, NULL);
    int rc = 0;
    for (int i = 0; i < 3; i++)
        rc |= ctx ? fajit_compile(ctx, specs[i], &c) : -1;
    fajit_destroy(ctx);
    uint8_t junk_key[16];
    memset(junk_key, 0x42, 16);
    rc |= raw_put(src, junk_key, (const uint8_t *)"not an entry", 12);
    CHECK(rc == 0, "a cache with three kernels and one corrupt entry");

    ctx = open_ctx(src, FAJIT_CACHE_READONLY, NULL);
    rc = ctx ? fajit_cache_export(ctx, bundle, &r) : -1;
    fajit_destroy(ctx);
    CHECK(rc == 0 && r.entries == 3 && r.skipped == 1 && strlen(r.sha256) == 64,
          "export (from a read-only context): 3 entries, the corrupt one left out, sha %.16s...",
          r.sha256);
    char sha[65];
    memcpy(sha, r.sha256, 65);

    rc = import_into(dst, bundle, sha, &r);
    CHECK(rc == 0 && r.entries == 3 && r.skipped == 0 && strcmp(r.sha256, sha) == 0,
          "import into an empty cache merges 3 entries (manifest digest as expected)");
    ctx = open_ctx(dst, FAJIT_CACHE_READWRITE, NULL);
    int hits = 0;
    for (int i = 0; i < 3; i++)
        hits += ctx && fajit_compile(ctx, specs[i], &c) == 0 && c.cached;
    CHECK(hits == 3 && verify_bad(ctx, NULL) == 0, "the imported kernels hit and verify clean");
    fajit_destroy(ctx);
    rc = import_into(dst, bundle, NULL, &r);
    CHECK(rc == 0 && r.entries == 0 && r.skipped == 3, "importing it again changes nothing");
    ctx = open_ctx(dst, FAJIT_CACHE_READONLY, NULL);
    CHECK(ctx && fajit_cache_import(ctx, bundle, NULL, &r) == FAJIT_EREADONLY,
          "import into a read-only context is refused");
    fajit_destroy(ctx);

    test_tampering(bundle, sha);
    test_cli(src, bundle);
    return finish();
}
