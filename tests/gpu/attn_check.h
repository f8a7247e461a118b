/*
 * tests/gpu/attn_check.h - host side of the attention checks: random fp16/bf16
 * inputs in a chosen memory layout, the fp64 CPU reference, and the comparison
 * of a kernel's output against it. No CUDA here, so it can be reused by any
 * program that launches attention (through fajit or by hand).
 */
#ifndef FAJIT_TESTS_ATTN_CHECK_H
#define FAJIT_TESTS_ATTN_CHECK_H

#include <stddef.h>
#include <stdint.h>

/* ---------------------------------------------------------------- 16-bit floats */

uint16_t attn_float_to_half(float f);  /* round to nearest even */
double attn_half_to_double(uint16_t h); /* exact */
uint16_t attn_float_to_bf16(float f);  /* round to nearest even */
double attn_bf16_to_double(uint16_t b); /* exact */
/* dtype is enum fajit_dtype: 0 fp16, 1 bf16. */
double attn_decode(int dtype, uint16_t bits);

/* ---------------------------------------------------------------- problems */

typedef struct attn_shape {
    int64_t batch, seqlen_q, seqlen_k, nheads_q, nheads_kv, dqk, dv;
    int dtype;           /* enum fajit_dtype */
    int mask;            /* enum fajit_mask */
    float softmax_scale; /* as passed to the kernel; 0 means 1/sqrt(dqk) */
} attn_shape;

enum attn_layout {
    ATTN_CONTIGUOUS, /* (batch, seq, heads, dim), densely packed */
    ATTN_PADDED,     /* head, seq and batch strides larger than dense, by odd amounts */
    ATTN_PACKED_QKV  /* q, k, v interleaved as slices of one (b, s, hq + 2 hkv, d)
                        buffer with a padded batch stride; needs seqlen_q ==
                        seqlen_k and dqk == dv. The output is padded. */
};

/*
 * One problem: inputs as raw 16-bit values in one buffer (q, k and v at their
 * offsets, gaps filled with random values too), the strides of every tensor
 * (never zero), and the fp64 reference computed from the same rounded inputs.
 */
typedef struct attn_problem {
    attn_shape s;
    int layout;
    int64_t q_stride[3], k_stride[3], v_stride[3], o_stride[3]; /* batch, seq, head */
    uint16_t *in;          /* q, k, v */
    size_t in_elems;
    size_t q_off, k_off, v_off;
    size_t o_elems;        /* size of the output buffer, gaps included */
    double *ref_o;         /* (batch, seqlen_q, nheads_q, dv), dense */
    double *ref_lse;       /* (batch, nheads_q, seqlen_q); -inf for fully masked rows */
    double max_abs_ref_o;
    int64_t masked_rows;   /* rows with no visible key */
} attn_problem;

/* Builds a problem with inputs ~N(0,1) from a fixed seed. 0, or -1 on a bad
 * layout/shape combination or out of memory. */
int attn_problem_init(attn_problem *p, const attn_shape *s, int layout, uint64_t seed);
void attn_problem_free(attn_problem *p);

/* The softmax scale the kernel applies (1/sqrt(dqk) in fp32 when s->softmax_scale is 0). */
float attn_effective_scale(const attn_shape *s);

const char *attn_layout_name(int layout);
const char *attn_mask_name(int mask);
const char *attn_dtype_name(int dtype);

/* ---------------------------------------------------------------- checking */

typedef struct attn_result {
    int ok;
    double max_err, tol;         /* output: max |o - ref| and the allowed error */
    double max_lse_rel_err;      /* max |lse - ref| / max(1, |ref|) */
    int64_t nan_values;          /* NaN in output or LSE (visible rows) */
    int64_t bad_masked_rows;     /* fully masked rows not exactly 0 / -inf */
    int64_t stray_writes;        /* output-buffer gaps that lost their poison */
    char why[256];               /* first failure, "" if ok */
} attn_result;

/* Compares a kernel's output (the whole output buffer, o_elems values, poisoned
 * with 0xFFFF before the launch) and LSE (batch * nheads_q * seqlen_q values,
 * or NULL if not requested) with the reference:
 *   |o - ref| <= (2^-8 bf16 / 2^-11 fp16) * max|ref| + 1e-4 (rounding of the
 *     output only: the kernel accumulates in fp32),
 *   |lse - ref| <= 1e-4 * max(1, |ref|),
 *   fully masked rows exactly 0 with LSE -inf, no NaN, gaps untouched. */
void attn_check(const attn_problem *p, const uint16_t *o, const float *lse, attn_result *r);
/* The same with two rounding steps of the output dtype (the tensor-core
 * kernels round the probabilities too; attn_check.c says why). */
void attn_check_fast(const attn_problem *p, const uint16_t *o, const float *lse, attn_result *r);

#endif
