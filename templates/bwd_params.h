/*
 * templates/bwd_params.h - the backward kernels' one argument, shared verbatim
 * by the host (runtime/, C11) and the device (templates/, CUDA C++), like
 * fwd_params.h. Plain C: fixed-size fields, no padding surprises.
 */
#ifndef FAJIT_BWD_PARAMS_H
#define FAJIT_BWD_PARAMS_H

#ifdef __CUDACC_RTC__
typedef long long fajit_bwd_i64;
#else
#include <stdint.h>
typedef int64_t fajit_bwd_i64;
#endif

struct fajit_bwd_params {
    const void *q;        /* (batch, seqlen_q, nheads_q, dqk) */
    const void *k;        /* (batch, seqlen_k, nheads_kv, dqk) */
    const void *v;        /* (batch, seqlen_k, nheads_kv, dv) */
    const void *o;        /* (batch, seqlen_q, nheads_q, dv): the forward's output */
    const void *grad_out; /* (batch, seqlen_q, nheads_q, dv): dO */
    const float *lse;     /* (batch, nheads_q, seqlen_q), contiguous: the forward's LSE */
    void *grad_q;         /* (batch, seqlen_q, nheads_q, dqk) */
    void *grad_k;         /* (batch, seqlen_k, nheads_kv, dqk) */
    void *grad_v;         /* (batch, seqlen_k, nheads_kv, dv) */
    fajit_bwd_i64 q_stride[3], k_stride[3], v_stride[3], o_stride[3], grad_out_stride[3],
        grad_q_stride[3], grad_k_stride[3], grad_v_stride[3]; /* batch, seq, head; elements */
    int batch, seqlen_q, seqlen_k, nheads_q, nheads_kv;
    float softmax_scale;      /* applied to q.k */
    float softmax_scale_log2; /* softmax_scale * log2(e), for exp2-based kernels */
    /* The forward's features (0 / NULL when off). The fields above keep
     * their offsets: what follows replaced reserved slots, then appends. */
    float softcap;            /* FAJIT_SOFTCAP: scores -> softcap * tanh(scores / softcap) */
    float dropout_p;          /* FAJIT_DROPOUT: probability of dropping */
    float dropout_scale;      /* 1 / (1 - dropout_p) */
    int reserved[2];          /* zero; room for later per-call values */
    unsigned long long dropout_seed, dropout_offset; /* the forward's: its mask, regenerated */
    const float *alibi_slopes;     /* FAJIT_ALIBI: [b * alibi_batch_stride + h] */
    fajit_bwd_i64 alibi_batch_stride;
    const int *cu_seqlens_q;  /* FAJIT_VARLEN: batch + 1 prefix sums; batch strides are 0 */
    const int *cu_seqlens_k;
};

#endif
