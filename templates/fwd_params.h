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
};

#endif
