/*
 * tests/gpu/bwd_check.h - host side of the backward checks: a random dO for an
 * attn_problem, the fp64 CPU backward, and the comparison of a kernel's
 * gradients against it. No CUDA here (like attn_check.h, which it builds on).
 *
 * The reference is computed from the same rounded q, k, v and dO the kernel
 * reads, and from the O and LSE the forward kernel actually wrote (decoded
 * exactly): it is the backward's formula in exact arithmetic on the kernel's
 * own inputs, so the only differences left are the kernel's fp32 rounding and
 * the rounding of its outputs to fp16/bf16. Whether O and LSE are themselves
 * right is attn_check's business.
 */
#ifndef FAJIT_TESTS_BWD_CHECK_H
#define FAJIT_TESTS_BWD_CHECK_H

#include <stddef.h>
#include <stdint.h>

#include "attn_check.h"

enum { BWD_DQ = 0, BWD_DK = 1, BWD_DV = 2 };

typedef struct bwd_problem {
    const attn_problem *fwd;  /* q, k, v, their layout, the shape; not owned */
    uint16_t *grad_out;       /* dO: fwd->o_elems values, laid out like the output (o_stride) */
    double *ref[3];           /* dq, dk, dv: dense (batch, seq, heads, dim) */
    unsigned char *row_seen;  /* (batch, seqlen_q, nheads_q): the row sees a key (LSE finite) */
    unsigned char *key_seen;  /* (batch, seqlen_k, nheads_kv): some row of the group sees it */
    double max_abs_ref[3];
} bwd_problem;

/* A random dO (~N(0,1), seed) for problem p, gaps included. 0, or -1 when out
 * of memory. The reference is computed later, by bwd_reference. */
int bwd_problem_init(bwd_problem *bp, const attn_problem *p, uint64_t seed);
void bwd_problem_free(bwd_problem *bp);

/* The fp64 backward from the kernel's forward output o (fwd->o_elems values at
 * fwd->o_stride) and LSE ((batch, nheads_q, seqlen_q) fp32). 0 or -1. */
int bwd_reference(bwd_problem *bp, const uint16_t *o, const float *lse);

typedef struct bwd_result {
    int ok;
    double max_err[3], tol[3]; /* per gradient: max |got - ref| and the allowed error */
    int64_t nan_values;        /* NaN where a gradient is defined */
    int64_t bad_zeros;         /* unseen rows / keys whose gradient is not exactly 0 */
    int64_t stray_writes;      /* gradient-buffer gaps that lost their poison */
    char why[256];             /* first failure, "" if ok */
} bwd_result;

/*
 * Compares the kernel's gradients with the reference. grads is one buffer of
 * fwd->in_elems values, poisoned with 0xFFFF before the launch, holding dq, dk
 * and dv at the offsets and strides q, k and v have in fwd->in (so a packed
 * q/k/v layout gets a packed dq/dk/dv). Rule, per gradient t:
 *   |got - ref| <= u * max|ref_t| + 1e-4 * max(1, max|ref_t|),
 * u = 2^-11 (fp16) or 2^-8 (bf16): the rounding of the output alone, since
 * the kernel computes in fp32 (its error is far below the slack). A query row
 * that sees no key must get dq exactly 0, a key no row sees dk = dv = 0; no
 * NaN; every element outside the three tensors keeps its poison.
 */
void bwd_check(const bwd_problem *bp, const uint16_t *grads, bwd_result *r);

const char *bwd_grad_name(int t); /* "dq", "dk", "dv" */

#endif
