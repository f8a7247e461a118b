/*
 * tests/fuzz/fuzz.h - the libFuzzer entry point every target defines. The
 * targets build two ways: with clang -fsanitize=fuzzer,address,undefined for
 * fuzzing (tests/fuzz/run.sh), and with the project's compiler and
 * tests/fuzz/replay.c as plain drivers that replay the committed corpus in
 * CTest.
 */
#ifndef FAJIT_TESTS_FUZZ_H
#define FAJIT_TESTS_FUZZ_H

#include <stddef.h>
#include <stdint.h>

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

/* A target's own invariant broke: crash loudly, so the fuzzer keeps the input. */
#define FUZZ_ASSERT(cond)                                                              \
    do {                                                                               \
        if (!(cond)) {                                                                 \
            fprintf(stderr, "fuzz invariant failed: %s (%s:%d)\n", #cond, __FILE__, __LINE__); \
            abort();                                                                   \
        }                                                                              \
    } while (0)

#endif
