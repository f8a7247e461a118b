/*
 * tests/gpu/bwd_check.h - host side of the backward checks: a random dO for an
 * attn_problem, the fp64 CPU backward (with the forward's features: window,
 * softcap, ALiBi, dropout, varlen), the same backward computed naively in the
 * input dtype, and the comparison of a kernel's gradients against them. No
 * CUDA here (like attn_check.h, which it builds on).
 *
 * The reference is computed from the same rounded q, k, v and dO the kernel
 * reads, and from the O and LSE the forward kernel actually wrote (decoded
 * exactly): it is the backward's formula in exact arithmetic on the kernel's
 * own inputs, so the only differences left are the kernel's fp32 rounding and
 * the rounding of its outputs to fp16/bf16. Whether O and LSE are themselves
 * right is checked too, against an fp64 forward with the same features
 * (bwd_problem.fwd_check), since attn_check knows no feature.
 */
#ifndef FAJIT_TESTS_BWD_CHECK_H
#define FAJIT_TESTS_BWD_CHECK_H

#include <stddef.h>
#include <stdint.h>

#include "attn_check.h"

enum { BWD_DQ = 0, BWD_DK = 1, BWD_DV = 2 };

/*
 * The forward's features, exactly as passed to fajit_attn_fwd and
 * fajit_attn_bwd (host copies of the device arrays). Varlen: the
 * attn_problem has batch 1 and seqlen_q/k = total_q/k (so its tensors are the
 * packed (total, heads, dim) ones and its LSE layout (1, heads, total) is the
 * API's (heads, total)); sequence b is rows cu_seqlens_q[b] .. of q and
 * cu_seqlens_k[b] .. of k, for b < nseq.
 */
typedef struct bwd_features {
    int window_left, window_right; /* -1: unbounded */
    float softcap;                 /* 0: off */
    const float *alibi_slopes;     /* NULL: off; [b * alibi_batch_stride + h] */
    int64_t alibi_batch_stride;
    float dropout_p;               /* 0: off; the mask is tests/gpu/philox.h's */
    uint64_t dropout_seed, dropout_offset;
    const int32_t *cu_seqlens_q, *cu_seqlens_k; /* NULL: dense */
    int64_t nseq;
} bwd_features;

/* No feature: window -1,-1, everything else 0 / NULL. */
void bwd_features_none(bwd_features *f);

/* The forward kernel's O and LSE against an fp64 forward with the features:
 * |o - ref| <= (2^-11 fp16 / 2^-8 bf16) * max|ref| + 1e-4 (the reference
 * forward kernel accumulates in fp32), LSE within 1e-4 relative, rows that
 * see no key exactly 0 / -inf. */
typedef struct bwd_forward_check {
    int ok;
    double max_err, tol, max_lse_err;
    char why[200];
} bwd_forward_check;

typedef struct bwd_problem {
    const attn_problem *fwd;  /* q, k, v, their layout, the shape; not owned */
    bwd_features feat;        /* none, unless bwd_problem_set_features */
    uint16_t *grad_out;       /* dO: fwd->o_elems values, laid out like the output (o_stride) */
    double *ref[3];           /* dq, dk, dv: dense (batch, seq, heads, dim) */
    float *naive[3];          /* the same in the input dtype, PyTorch's math attention's way */
    unsigned char *row_seen;  /* (batch, seqlen_q, nheads_q): the row sees a key (LSE finite) */
    unsigned char *key_seen;  /* (batch, seqlen_k, nheads_kv): some row of the group sees it */
    double max_abs_ref[3];
    bwd_forward_check fwd_check; /* filled by bwd_reference */
} bwd_problem;

/* A random dO (~N(0,1), seed) for problem p, gaps included. 0, or -1 when out
 * of memory. The reference is computed later, by bwd_reference. */
int bwd_problem_init(bwd_problem *bp, const attn_problem *p, uint64_t seed);
void bwd_problem_free(bwd_problem *bp);

/* Sets the features (the pointed-to arrays must outlive bp). Before
 * bwd_reference. */
void bwd_problem_set_features(bwd_problem *bp, const bwd_features *f);

/* The fp64 backward from the kernel's forward output o (fwd->o_elems values
 * at fwd->o_stride) and LSE ((batch, nheads_q, seqlen_q) fp32), the naive
 * backward, and the forward's check (bp->fwd_check). 0, or -1 when out of
 * memory or when varlen's cu_seqlens do not fit the problem. */
int bwd_reference(bwd_problem *bp, const uint16_t *o, const float *lse);

enum bwd_rule {
    /* |got - ref| <= u * max|ref_t| + 1e-4 * max(1, max|ref_t|), u = 2^-11
     * (fp16) or 2^-8 (bf16): the rounding of the output alone, for kernels
     * that compute in fp32 throughout (the reference backward). */
    BWD_RULE_TIGHT = 0,
    /* FlashAttention's for gradients (its tests allow 3x for them, 2x for
     * outputs: the backward reads the rounded O through D = rowsum(dO * O),
     * which the naive backward does not): |got - ref| <= 3 * max|naive_t -
     * ref_t| + 1e-4 * max(1, max|ref_t|), floored at the tight rule's bound
     * (no kernel that rounds its output to 16 bits can beat that). */
    BWD_RULE_FLASH = 1
};

typedef struct bwd_result {
    int ok;
    double max_err[3], tol[3]; /* per gradient: max |got - ref| and the allowed error */
    double naive_err[3];       /* per gradient: max |naive - ref| */
    int64_t nan_values;        /* NaN where a gradient is defined */
    int64_t bad_zeros;         /* unseen rows / keys whose gradient is not exactly 0 */
    int64_t stray_writes;      /* gradient-buffer gaps that lost their poison */
    char why[256];             /* first failure, "" if ok */
} bwd_result;

/*
 * Compares the kernel's gradients with the reference. grads is one buffer of
 * fwd->in_elems values, poisoned with 0xFFFF before the launch, holding dq, dk
 * and dv at the offsets and strides q, k and v have in fwd->in (so a packed
 * q/k/v layout gets a packed dq/dk/dv). Per gradient t, the rule's bound
 * (above). A query row that sees no key must get dq exactly 0, a key no row
 * sees dk = dv = 0; no NaN; every element outside the three tensors keeps its
 * poison. bwd_check is bwd_check_rule with BWD_RULE_TIGHT.
 */
void bwd_check_rule(const bwd_problem *bp, const uint16_t *grads, int rule, bwd_result *r);
void bwd_check(const bwd_problem *bp, const uint16_t *grads, bwd_result *r);

const char *bwd_grad_name(int t); /* "dq", "dk", "dv" */

#endif
