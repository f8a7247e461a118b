/*
 * cache/sha256.h - SHA-256 (FIPS 180-4), written from the standard for the
 * bundle manifests of `fajit export` / `fajit import`. Header-only (static
 * inline), so any file of the cache layer or a test can use it without a
 * build change; tests/test_cache_bundle.c checks the FIPS test vectors.
 *
 * Not for secrets: no effort is made to be constant time (nothing here is).
 */
#ifndef FAJIT_CACHE_SHA256_H
#define FAJIT_CACHE_SHA256_H

#include <stddef.h>
#include <stdint.h>
#include <string.h>

typedef struct fajit__sha256 {
    uint32_t h[8];
    uint64_t bytes;    /* message length so far */
    uint8_t block[64]; /* pending partial block */
} fajit__sha256;

static inline uint32_t fajit__sha256_rotr(uint32_t x, int n) { return (x >> n) | (x << (32 - n)); }

static inline void fajit__sha256_block(uint32_t h[8], const uint8_t *p)
{
    static const uint32_t k[64] = {
        0x428a2f98, 0x71374491, 0xb5c0fbcf, 0xe9b5dba5, 0x3956c25b, 0x59f111f1, 0x923f82a4,
        0xab1c5ed5, 0xd807aa98, 0x12835b01, 0x243185be, 0x550c7dc3, 0x72be5d74, 0x80deb1fe,
        0x9bdc06a7, 0xc19bf174, 0xe49b69c1, 0xefbe4786, 0x0fc19dc6, 0x240ca1cc, 0x2de92c6f,
        0x4a7484aa, 0x5cb0a9dc, 0x76f988da, 0x983e5152, 0xa831c66d, 0xb00327c8, 0xbf597fc7,
        0xc6e00bf3, 0xd5a79147, 0x06ca6351, 0x14292967, 0x27b70a85, 0x2e1b2138, 0x4d2c6dfc,
        0x53380d13, 0x650a7354, 0x766a0abb, 0x81c2c92e, 0x92722c85, 0xa2bfe8a1, 0xa81a664b,
        0xc24b8b70, 0xc76c51a3, 0xd192e819, 0xd6990624, 0xf40e3585, 0x106aa070, 0x19a4c116,
        0x1e376c08, 0x2748774c, 0x34b0bcb5, 0x391c0cb3, 0x4ed8aa4a, 0x5b9cca4f, 0x682e6ff3,
        0x748f82ee, 0x78a5636f, 0x84c87814, 0x8cc70208, 0x90befffa, 0xa4506ceb, 0xbef9a3f7,
        0xc67178f2};
    uint32_t w[64], v[8];
    for (int t = 0; t < 16; t++)
        w[t] = (uint32_t)p[4 * t] << 24 | (uint32_t)p[4 * t + 1] << 16 |
               (uint32_t)p[4 * t + 2] << 8 | p[4 * t + 3];
    for (int t = 16; t < 64; t++) {
        uint32_t s0 = fajit__sha256_rotr(w[t - 15], 7) ^ fajit__sha256_rotr(w[t - 15], 18) ^
                      (w[t - 15] >> 3);
        uint32_t s1 = fajit__sha256_rotr(w[t - 2], 17) ^ fajit__sha256_rotr(w[t - 2], 19) ^
                      (w[t - 2] >> 10);
        w[t] = w[t - 16] + s0 + w[t - 7] + s1;
    }
    memcpy(v, h, sizeof v);
    for (int t = 0; t < 64; t++) {
        uint32_t e = v[4], a = v[0];
        uint32_t t1 = v[7] +
                      (fajit__sha256_rotr(e, 6) ^ fajit__sha256_rotr(e, 11) ^
                       fajit__sha256_rotr(e, 25)) +
                      ((e & v[5]) ^ (~e & v[6])) + k[t] + w[t];
        uint32_t t2 = (fajit__sha256_rotr(a, 2) ^ fajit__sha256_rotr(a, 13) ^
                       fajit__sha256_rotr(a, 22)) +
                      ((a & v[1]) ^ (a & v[2]) ^ (v[1] & v[2]));
        memmove(v + 1, v, 7 * sizeof v[0]);
        v[4] += t1;
        v[0] = t1 + t2;
    }
    for (int i = 0; i < 8; i++)
        h[i] += v[i];
}

static inline void fajit__sha256_init(fajit__sha256 *s)
{
    static const uint32_t h0[8] = {0x6a09e667, 0xbb67ae85, 0x3c6ef372, 0xa54ff53a,
                                   0x510e527f, 0x9b05688c, 0x1f83d9ab, 0x5be0cd19};
    memcpy(s->h, h0, sizeof h0);
    s->bytes = 0;
}

static inline void fajit__sha256_update(fajit__sha256 *s, const void *data, size_t n)
{
    const uint8_t *p = data;
    size_t fill = (size_t)(s->bytes % 64);
    s->bytes += n;
    if (fill) {
        size_t take = n < 64 - fill ? n : 64 - fill;
        memcpy(s->block + fill, p, take);
        p += take;
        n -= take;
        if (fill + take < 64)
            return;
        fajit__sha256_block(s->h, s->block);
    }
    for (; n >= 64; p += 64, n -= 64)
        fajit__sha256_block(s->h, p);
    if (n)
        memcpy(s->block, p, n);
}

static inline void fajit__sha256_final(fajit__sha256 *s, uint8_t out[32])
{
    uint64_t bits = s->bytes * 8;
    uint8_t pad[72] = {0x80};
    size_t fill = (size_t)(s->bytes % 64), n = (fill < 56 ? 56 : 120) - fill;
    for (int i = 0; i < 8; i++)
        pad[n + (size_t)i] = (uint8_t)(bits >> (56 - 8 * i));
    fajit__sha256_update(s, pad, n + 8);
    for (int i = 0; i < 8; i++)
        for (int j = 0; j < 4; j++)
            out[4 * i + j] = (uint8_t)(s->h[i] >> (24 - 8 * j));
}

static inline void fajit__sha256_of(const void *data, size_t n, uint8_t out[32])
{
    fajit__sha256 s;
    fajit__sha256_init(&s);
    fajit__sha256_update(&s, data, n);
    fajit__sha256_final(&s, out);
}

#endif
