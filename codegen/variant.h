/*
 * codegen/variant.h - the variant: one field per specialisation parameter, its
 * canonical text, its binary serialisation, manifests, and source rendering.
 *
 * Nothing here touches the GPU or the disk.
 */
#ifndef FAJIT_CODEGEN_VARIANT_H
#define FAJIT_CODEGEN_VARIANT_H

#include <stddef.h>
#include <stdint.h>

/* Operations: the first word of the canonical text. */
enum fajit__op {
    FAJIT__OP_REF = 0, /* "ref": the simple exact reference forward */
    FAJIT__OP_FWD = 1, /* "fwd": the fast forward (later issue) */
    FAJIT__OP_BWD = 2, /* "bwd": the fast backward's main kernel (flash_bwd.cuh) */
    FAJIT__OP_REF_DQ = 3,   /* "ref-dq": the reference backward's dq (reference_bwd.cuh) */
    FAJIT__OP_REF_DKDV = 4, /* "ref-dkdv": the reference backward's dk and dv (same file) */
    FAJIT__OP_BWD_PRE = 5,  /* "bwd-pre": the fast backward's D = rowsum(dO o O) (flash_bwd.cuh) */
    FAJIT__OP_BWD_POST = 6, /* "bwd-post": the fast backward's dQ to fp16/bf16 (same file) */
    FAJIT__OP_BWD_DKDV = 7, /* "bwd-dkdv": deterministic mode's dK, dV kernel (same file) */
    FAJIT__OP_BWD_DQ = 8,   /* "bwd-dq": deterministic mode's dQ kernel (same file) */
    FAJIT__OP_REF_PROBS = 9, /* "ref-probs": the reference forward that also writes the
                                attention probabilities (fajit_attn_args.probs;
                                reference.cuh's second kernel) */
    FAJIT__OP_COUNT
};

/* Value of a tile field, or of arch, that a partial spec left out. */
#define FAJIT__UNSET (-1)

/*
 * The variant. Per-call values (pointers, lengths, scale, dropout p, seed) are
 * kernel arguments and never appear here. Canonical text, fields in this order:
 *
 *   ref dqk=72 dv=72 dtype=bf16 mask=causal window=-1,-1 dropout=0 softcap=0
 *   alibi=0 varlen=0 paged=0 bm=4 bn=32 warps=4 stages=1 arch=sm_90
 *
 * (one line, single spaces). Enums use the public values of fajit.h.
 */
typedef struct fajit__variant {
    int op;           /* enum fajit__op */
    int dqk, dv;      /* 1..512 */
    int dtype;        /* enum fajit_dtype: fp16, bf16 */
    int mask;         /* enum fajit_mask: none, causal, causal-tl */
    int window_left;  /* -1 = unbounded, else >= 0 */
    int window_right; /* -1 = unbounded, else >= 0 */
    int dropout, softcap, alibi, varlen, paged; /* 0 / 1 */
    int bm, bn, warps, stages;                  /* >= 1, or FAJIT__UNSET in a spec */
    int arch;         /* 80, 86, 89, 90, 100, 120...; FAJIT__UNSET in a spec */
    int arch_suffix;  /* 0, or 'a' for arch-specific targets (sm_90a) */
} fajit__variant;

/* Longest canonical text, NUL included. */
#define FAJIT__VARIANT_TEXT_MAX 320

/* Default spec values: everything but tiles and arch, which stay FAJIT__UNSET. */
void fajit__variant_defaults(fajit__variant *v);

/* Errors: every function below that fails records the detail with fajit__fail
 * (runtime/error.h): the bad field and value, and why. */

/* Checks ranges and combinations of a full variant. 0 or FAJIT_EINVAL. */
int fajit__variant_check(const fajit__variant *v);

/* Canonical text into buf (NUL-terminated). Returns length, or FAJIT_EINVAL if
 * cap is too small or a field is unset / out of range. */
int fajit__variant_format(const fajit__variant *v, char *buf, size_t cap);

/* Strict parse of full canonical text: every field, in order, nothing else.
 * format(parse(s)) == s. FAJIT_EPARSE naming the bad field and value. */
int fajit__variant_parse(const char *text, fajit__variant *out);

/* Lenient parse of one spec: op first, then field=value in any order, each at
 * most once; fields left out take defaults (dv = dqk; tiles and arch
 * FAJIT__UNSET). Single values only (manifests expand lists first). */
int fajit__spec_parse(const char *text, fajit__variant *out);

/* Manifest expansion: one spec a line, '#' to end of line is a comment, blank
 * lines skipped; a value may be a list "a,b,c", and an integer field a range
 * "lo..hi" or "lo..hi:step" (inclusive). The product of the lists, in field
 * order with the last field varying fastest, is passed to cb as specs (tiles and
 * arch possibly FAJIT__UNSET). cb returns nonzero to stop; that value is
 * returned. On a bad line: FAJIT_EPARSE, detail "line N: field=value: why". */
typedef int (*fajit__variant_cb)(void *user, const fajit__variant *spec, int line);
int fajit__manifest_expand(const char *text, fajit__variant_cb cb, void *user);

/* Binary serialisation (what gets hashed and stored as the entry's key):
 * "FJV" magic, a version byte, a u16 field count, then each field as a
 * little-endian i32, in struct order. Returns the length written, or the length
 * needed if cap is too small (call with buf NULL to size). */
#define FAJIT__VARIANT_SER_VERSION 1
size_t fajit__variant_serialize(const fajit__variant *v, uint8_t *buf, size_t cap);

/* Inverse of serialize; rejects unknown versions, wrong lengths, and values
 * fajit__variant_check refuses. 0 or FAJIT_EPARSE. */
int fajit__variant_deserialize(const uint8_t *buf, size_t len, fajit__variant *out);

/* Complete, deterministic CUDA source for a full variant: a prelude of
 * constexpr constants, then the op's template with the embedded files it
 * includes inlined (so it compiles with no include path). *src is malloc'd,
 * NUL-terminated. *entry receives the kernel's extern "C" name (static string).
 * Returns 0, FAJIT_EINVAL (unset/out-of-range field) or FAJIT_ENOMEM. */
int fajit__render(const fajit__variant *v, char **src, size_t *len, const char **entry);

/* The extern "C" name of the kernel an op's template defines ("fajit_ref_fwd"),
 * or NULL for an unknown op. Static string. */
const char *fajit__variant_entry_name(const fajit__variant *v);

/* Dynamic shared memory, in bytes, the op's kernel is launched with for this
 * variant (0 for the reference kernel, whose shared memory is static). The
 * renderer passes it to the template as FAJIT_SMEM_BYTES, and the template
 * static_asserts its layout fits. */
size_t fajit__variant_smem_bytes(const fajit__variant *v);

/* Warps the fast forward splits each key tile over (templates/flash_fwd.cuh
 * kKeyWarps): warps / (bm / 16) when a block has fewer 16-row tiles than
 * warps, else 1. */
int fajit__fwd_key_warps(const fajit__variant *v);

/* 1 if the fast forward's kernel for v (tiles set) loops over work items
 * in a 1-D grid of persistent blocks (templates/flash_fwd.cuh attend_items),
 * else 0. The renderer passes it as FAJIT_PERSIST; the runtime launches by it. */
int fajit__fwd_persistent(const fajit__variant *v);

/* 1 if the fast forward (op fwd, templates/flash_fwd.cuh) implements the
 * variant's features (dropout, softcap, ALiBi, varlen, paged), else 0; the
 * runtime falls back to the reference for the others. Head dims, alignment
 * and tiles are judged elsewhere. */
int fajit__fast_fwd_supports(const fajit__variant *v);

/* The embedded template an op renders ("reference.cuh"), or NULL. Static. */
const char *fajit__variant_template_name(const fajit__variant *v);

/* Digest (16 bytes) of every embedded template byte and of the codegen source,
 * computed once. Part of the build identity. */
const uint8_t *fajit__codegen_digest(void);

#endif
