/*
 * runtime/probs.h - the forward's optional probabilities output
 * (fajit_attn_args.probs): its argument check, shared by runtime/args.c, which
 * judges every layout by one rule, and runtime/attn.c, which routes a call
 * that asks for it to op ref-probs.
 */
#ifndef FAJIT_RUNTIME_PROBS_H
#define FAJIT_RUNTIME_PROBS_H

#include <stdint.h>

#include "fajit.h"

/* a->probs (non-NULL) checked as an fp32 (batch, nheads_q, seqlen_q,
 * seqlen_k) output with strides {batch, head, row} (all zero in:
 * contiguous): 4-byte aligned, strides >= 0, offsets fit int64, no two
 * elements at one address. out receives the strides in elements. Errors
 * name "probs" or "probs_stride[i]" with the value. */
int fajit__probs_strides(const fajit_attn_args *a, int64_t out[3]);

#endif
