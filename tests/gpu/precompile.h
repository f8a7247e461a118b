/*
 * tests/gpu/precompile.h - compile a test's variants up front, on several
 * threads, so a GPU test does not wait for NVRTC one variant at a time.
 * Everything goes through the public API (fajit_compile is thread-safe).
 */
#ifndef FAJIT_TESTS_PRECOMPILE_H
#define FAJIT_TESTS_PRECOMPILE_H

#include <stddef.h>

#include "fajit.h"

/* Compiles each distinct variant text of specs[0..n) into ctx's cache on
 * `threads` threads. Returns the number that failed (each is printed). */
size_t precompile_variants(fajit_ctx *ctx, const char *const *specs, size_t n, int threads);

#endif
