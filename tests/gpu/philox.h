/*
 * tests/gpu/philox.h - host copy of the dropout stream of templates/common.cuh
 * (Philox-4x32-10 and the (b, h, i, j) -> keep formula), header-only, so the
 * CPU reference can reproduce the kernels' dropout mask bit for bit. Keep the
 * two in step: tests/test_philox.c checks this one against Random123's known
 * answers, and test_features_gpu checks the device one against this one.
 */
#ifndef FAJIT_TEST_PHILOX_H
#define FAJIT_TEST_PHILOX_H

#include <math.h>
#include <stdint.h>

typedef struct fajit_philox4 {
    uint32_t w[4];
} fajit_philox4;

static inline fajit_philox4 fajit_philox4x32_10(fajit_philox4 c, uint32_t k0, uint32_t k1)
{
    for (int round = 0; round < 10; ++round) {
        if (round > 0) {
            k0 += 0x9E3779B9u;
            k1 += 0xBB67AE85u;
        }
        uint64_t p0 = (uint64_t)0xD2511F53u * c.w[0], p1 = (uint64_t)0xCD9E8D57u * c.w[2];
        fajit_philox4 n = {{(uint32_t)(p1 >> 32) ^ c.w[1] ^ k0, (uint32_t)p1,
                            (uint32_t)(p0 >> 32) ^ c.w[3] ^ k1, (uint32_t)p0}};
        c = n;
    }
    return c;
}

/* u32 nearest to p * 2^32, ties to even (as __float2uint_rn on the device). */
static inline uint32_t fajit_dropout_threshold(float p)
{
    return (uint32_t)nearbyint((double)p * 4294967296.0);
}

/* Philox word of element (b, h, i, j): see templates/common.cuh. */
static inline uint32_t fajit_dropout_word(uint64_t seed, uint64_t offset, int64_t b, int64_t h,
                                          int64_t nheads_q, int64_t i, int64_t j)
{
    uint64_t t = offset + ((uint64_t)(b * nheads_q + h) << 32);
    fajit_philox4 c = {{(uint32_t)((uint64_t)j >> 2), (uint32_t)i, (uint32_t)t,
                        (uint32_t)(t >> 32)}};
    return fajit_philox4x32_10(c, (uint32_t)seed, (uint32_t)(seed >> 32)).w[j & 3];
}

static inline int fajit_dropout_keep(uint64_t seed, uint64_t offset, uint32_t threshold,
                                     int64_t b, int64_t h, int64_t nheads_q, int64_t i, int64_t j)
{
    return fajit_dropout_word(seed, offset, b, h, nheads_q, i, j) >= threshold;
}

#endif
