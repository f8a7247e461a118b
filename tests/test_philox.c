/*
 * test_philox - the host Philox-4x32-10 of tests/gpu/philox.h (the copy the
 * GPU tests use to reproduce the kernels' dropout mask) against Random123's
 * known-answer vectors, and the properties the dropout formula promises.
 */
#include <stdio.h>

#include "gpu/philox.h"

static int failures;

static void check(int ok, const char *what)
{
    printf("%s: %s\n", ok ? "ok" : "FAIL", what);
    failures += !ok;
}

static void check_kat(const char *name, fajit_philox4 c, uint32_t k0, uint32_t k1,
                      const uint32_t want[4])
{
    fajit_philox4 r = fajit_philox4x32_10(c, k0, k1);
    int ok = 1;
    for (int i = 0; i < 4; i++)
        ok &= r.w[i] == want[i];
    if (!ok)
        printf("  got %08x %08x %08x %08x\n", r.w[0], r.w[1], r.w[2], r.w[3]);
    check(ok, name);
}

static void known_answers(void)
{
    static const uint32_t zeros[4] = {0x6627e8d5, 0xe169c58d, 0xbc57ac4c, 0x9b00dbd8};
    static const uint32_t ones[4] = {0x408f276d, 0x41c83b0e, 0xa20bc7c6, 0x6d5451fd};
    static const uint32_t pi[4] = {0xd16cfe09, 0x94fdcceb, 0x5001e420, 0x24126ea1};
    fajit_philox4 c0 = {{0, 0, 0, 0}}, c1 = {{0xffffffffu, 0xffffffffu, 0xffffffffu, 0xffffffffu}};
    fajit_philox4 cpi = {{0x243f6a88u, 0x85a308d3u, 0x13198a2eu, 0x03707344u}};
    check_kat("Random123 KAT philox4x32_10 counter 0, key 0", c0, 0, 0, zeros);
    check_kat("Random123 KAT philox4x32_10 counter ~0, key ~0", c1, 0xffffffffu, 0xffffffffu, ones);
    check_kat("Random123 KAT philox4x32_10 counter pi, key pi", cpi, 0xa4093822u, 0x299f31d0u, pi);
}

static void thresholds(void)
{
    check(fajit_dropout_threshold(0.0f) == 0, "threshold(0) = 0 keeps everything");
    check(fajit_dropout_threshold(0.5f) == 0x80000000u, "threshold(0.5) = 2^31");
    check(fajit_dropout_threshold(0.25f) == 0x40000000u, "threshold(0.25) = 2^30");
    check(fajit_dropout_threshold(0.99999994f) == 0xffffff00u,
          "threshold(largest float below 1) = 2^32 - 256, no wrap");
}

/* Four consecutive keys 4m..4m+3 share one Philox call; the next four do not. */
static void stream_shape(void)
{
    fajit_philox4 c = {{5, 7, 3, 0}};
    fajit_philox4 r = fajit_philox4x32_10(c, 11, 0);
    int same = 1;
    for (int j = 20; j < 24; j++)
        same &= fajit_dropout_word(11, 3, 0, 0, 4, 7, j) == r.w[j & 3];
    check(same, "keys 20..23 of row 7 are the 4 words of counter {5, 7, offset, bh}");
    check(fajit_dropout_word(11, 3, 0, 1, 4, 7, 20) != fajit_dropout_word(11, 3, 0, 0, 4, 7, 20),
          "another head draws another word");
    check(fajit_dropout_word(11, 3, 1, 0, 4, 7, 20) == fajit_dropout_word(11, 3, 0, 4, 4, 7, 20),
          "(b, h) enter as b * nheads_q + h");
    check(fajit_dropout_word(11, 4, 0, 0, 4, 7, 20) != fajit_dropout_word(11, 3, 0, 0, 4, 7, 20),
          "another offset draws another word");
    check(fajit_dropout_word(12, 3, 0, 0, 4, 7, 20) != fajit_dropout_word(11, 3, 0, 0, 4, 7, 20),
          "another seed draws another word");
}

/* The kept fraction over many elements is 1 - p within 4 sigma. */
static void kept_fraction(void)
{
    const float p = 0.17f;
    uint32_t t = fajit_dropout_threshold(p);
    long kept = 0, n = 0;
    for (int64_t i = 0; i < 256; i++)
        for (int64_t j = 0; j < 1024; j++, n++)
            kept += fajit_dropout_keep(1234, 99, t, 1, 2, 3, i, j);
    double frac = (double)kept / (double)n, sigma = sqrt(p * (1.0 - p) / (double)n);
    printf("  kept %ld of %ld = %.5f (1 - p = %.5f, sigma %.5f)\n", kept, n, frac, 1.0 - p, sigma);
    check(fabs(frac - (1.0 - p)) < 4 * sigma, "kept fraction within 4 sigma of 1 - p");
}

int main(void)
{
    known_answers();
    thresholds();
    stream_shape();
    kept_fraction();
    printf("%s\n", failures ? "FAILED" : "all passed");
    return failures != 0;
}
