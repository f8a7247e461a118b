/*
 * tests/compile_check.h - one NVRTC compile of a variant exactly as the
 * library does it (fajit__compile_variant: same rendered source, same
 * options), with the report the compile tests assert on.
 */
#ifndef FAJIT_TESTS_COMPILE_CHECK_H
#define FAJIT_TESTS_COMPILE_CHECK_H

#include <stddef.h>

#include "codegen/variant.h"

typedef struct compile_check {
    double ms;               /* NVRTC wall time */
    size_t cubin_bytes;
    int registers, smem, spills; /* ptxas report: per thread, static bytes, spill bytes */
    int template_warnings;   /* warnings located in a templates/ file */
    char why[512];           /* why it did not compile: NVRTC's error lines */
} compile_check;

/* 0 if v compiled (report filled), -1 if not (why filled). Thread-safe. */
int compile_check_run(const fajit__variant *v, compile_check *c);

#endif
