/*
 * templates/fwd_params.h - the forward kernels' one argument, shared verbatim by
 * the host (runtime/, C11) and the device (templates/, CUDA C++), so its layout
 * cannot drift between them. Plain C: fixed-size fields, no padding surprises.
 */
#ifndef FAJIT_FWD_PARAMS_H
#define FAJIT_FWD_PARAMS_H

#ifdef __CUDACC_RTC__
typedef long long fajit_i64;
#else
#include <stdint.h>
typedef int64_t fajit_i64;
#endif

struct fajit_fwd_params {
    const void *q;      /* (batch, seqlen_q, nheads_q, dqk) */
    const void *k;      /* (batch, seqlen_k, nheads_kv, dqk) */
    const void *v;      /* (batch, seqlen_k, nheads_kv, dv) */
    void *o;            /* (batch, seqlen_q, nheads_q, dv) */
    float *lse;         /* NULL, or (batch, nheads_q, seqlen_q) */
    fajit_i64 q_stride[3], k_stride[3], v_stride[3], o_stride[3]; /* batch, seq, head; elements */
    int batch, seqlen_q, seqlen_k, nheads_q, nheads_kv;
    float softmax_scale;      /* applied to q.k */
    float softmax_scale_log2; /* softmax_scale * log2(e), for exp2-based kernels */
    float softcap;            /* FAJIT_SOFTCAP: scores -> softcap * tanh(scores / softcap) */
    float dropout_p;          /* FAJIT_DROPOUT: probability of dropping */
    float dropout_scale;      /* 1 / (1 - dropout_p) */
    unsigned long long dropout_seed, dropout_offset;
    const float *alibi_slopes; /* FAJIT_ALIBI: [b * alibi_batch_stride + h] */
    fajit_i64 alibi_batch_stride;
    const int *cu_seqlens_q;  /* FAJIT_VARLEN: batch + 1 prefix sums */
    const int *cu_seqlens_k;
    /* Split-KV (flash-decoding) and GQA packing, chosen per launch by
     * runtime/attn.c (zero: neither). */
    int num_splits; /* > 1: each block attends to 1 / num_splits of its keys and
                       writes fp32 partials; grid x = query blocks * num_splits */
    int pack_gqa;   /* > 1: the nheads_q / nheads_kv query heads of one kv head
                       share a block's rows (row r: query row r / pack_gqa of
                       head y * pack_gqa + r % pack_gqa); grid y = nheads_kv */
    int combine;    /* 1: this launch merges the partials into o and lse: one
                       warp per row, grid x = ceil(partial_rows / warps) */
    int persist;    /* 1 (FAJIT_PERSIST variants, neither split nor packed): a 1-D grid
                       of blocks looping over the (query block, head, batch) items;
                       (also keeps the pointers below 8-byte aligned, as on the host) */
    float *o_partial;        /* num_splits * partial_rows rows of dv rounded up to 8 */
    float *lse_partial;      /* num_splits * partial_rows; -inf: no key in that split */
    fajit_i64 partial_rows;  /* rows of one split: batch * nheads_q * seqlen_q (its max
                                under varlen); row index = the LSE's index of the row */
};

#endif
