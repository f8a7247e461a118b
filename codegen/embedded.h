/*
 * codegen/embedded.h - the files of templates/, embedded into the library at
 * build time by cmake/embed.cmake (generated fajit_embedded.c), so nothing is
 * read from disk at run time.
 */
#ifndef FAJIT_CODEGEN_EMBEDDED_H
#define FAJIT_CODEGEN_EMBEDDED_H

#include <stddef.h>

struct fajit__embedded_file {
    const char *name;          /* file name under templates/, e.g. "reference.cuh" */
    const unsigned char *data; /* its bytes, exactly */
    size_t len;
};

/* Sorted by name. */
extern const struct fajit__embedded_file fajit__embedded_files[];
extern const size_t fajit__embedded_count;

/* SHA-256 of the codegen/ sources (names and bytes, sorted by name), computed at
 * build time: a change to the code that renders kernels changes every key. */
extern const unsigned char fajit__codegen_sources_sha256[32];

#endif
