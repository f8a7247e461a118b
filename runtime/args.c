/*
 * runtime/args.c - argument checks and context facts shared by the entry
 * points that launch (fajit_attn_fwd, fajit_attn_bwd), so each argument is
 * judged by one rule and every error reads the same.
 */
#include <math.h>

#include "runtime/probs.h"
#include "runtime/runtime.h"

int fajit__check_range(const char *name, int64_t v, int64_t lo, int64_t hi)
{
    if (v < lo || v > hi)
        return fajit__fail(FAJIT_EINVAL, "%s=%lld: must be in %lld..%lld", name, (long long)v,
                           (long long)lo, (long long)hi);
    return 0;
}

/* How a layout's elements are sized and its dims named in errors: every
 * tensor is fp16 or bf16 with dims {batch, seq, head}; the probabilities
 * (fajit_attn_args.probs) are fp32 with dims {batch, head, row}, passed here
 * as a fajit__tensor whose "seqlen" is nheads_q and whose "heads" are rows. */
typedef struct elem_kind {
    int64_t bytes;
    const char *what[3]; /* what the outer dims' elements are, plural */
} elem_kind;

static const elem_kind tensor_elems = {2, {"batches", "rows", "heads"}};
static const elem_kind probs_elems = {4, {"batches", "heads", "rows"}};

/* All zero: contiguous (seqlen, heads, dim). */
static int contiguous_strides(const fajit__tensor *t, int64_t out[3])
{
    int64_t row, batch;
    if (__builtin_mul_overflow(t->heads, t->dim, &row) ||
        __builtin_mul_overflow(t->seqlen, row, &batch))
        return fajit__fail(FAJIT_EINVAL, "%s: %s=%lld x %s=%lld x %s=%lld elements overflow int64",
                           t->name, t->seqlen_name, (long long)t->seqlen, t->heads_name,
                           (long long)t->heads, t->dim_name, (long long)t->dim);
    out[0] = batch;
    out[1] = row;
    out[2] = t->dim;
    return 0;
}

static int overflow_fail(const fajit__tensor *t, const int64_t st[3], int i, int given)
{
    const char *extent_name[3] = {"batch", t->seqlen_name, t->heads_name};
    const int64_t extent[3] = {t->batch, t->seqlen, t->heads};
    if (!given)
        return fajit__fail(FAJIT_EINVAL,
                           "%s: batch=%lld x %s=%lld x %s=%lld x %s=%lld elements: its byte "
                           "offsets overflow int64",
                           t->name, (long long)t->batch, t->seqlen_name, (long long)t->seqlen,
                           t->heads_name, (long long)t->heads, t->dim_name, (long long)t->dim);
    return fajit__fail(FAJIT_EINVAL,
                       "%s_stride[%d]=%lld: with %s=%lld the byte offsets of %s overflow int64",
                       t->name, i, (long long)st[i], extent_name[i], (long long)extent[i],
                       t->name);
}

/* One past the largest byte offset must fit int64 (the kernels index with
 * it), and the tensor must not run past the end of the address space: such
 * strides would read or write out of bounds whatever the allocation. */
static int check_span(const fajit__tensor *t, const int64_t st[3], int given, const elem_kind *k)
{
    const int64_t extent[3] = {t->batch, t->seqlen, t->heads};
    int64_t end = t->dim, span;
    for (int i = 2; i >= 0; i--)
        if (__builtin_mul_overflow(extent[i] - 1, st[i], &span) ||
            __builtin_add_overflow(end, span, &end) || end > INT64_MAX / k->bytes)
            return overflow_fail(t, st, i, given);
    if ((uintptr_t)t->ptr > UINTPTR_MAX - (uint64_t)(end * k->bytes))
        return fajit__fail(FAJIT_EINVAL, "%s=%p: its %lld bytes run past the end of the address space",
                           t->name, t->ptr, (long long)(end * k->bytes));
    return 0;
}

/* Distinct elements of an output need distinct addresses, or threads race on
 * them. The usual sufficient rule: the dims of extent > 1 sorted by stride,
 * each stride at least the previous dim's stride times its extent, starting
 * from the contiguous last dim (stride 1, extent dim). */
static int check_no_overlap(const fajit__tensor *t, const int64_t st[3], const elem_kind *kind)
{
    const char *const *what = kind->what;
    const char *extent_name[3] = {"batch", t->seqlen_name, t->heads_name};
    const int64_t extent[3] = {t->batch, t->seqlen, t->heads};
    int order[3], n = 0;
    int64_t need = t->dim;

    for (int i = 2; i >= 0; i--) /* innermost first, so ties keep the layout's order */
        if (extent[i] > 1)
            order[n++] = i;
    for (int k = 1; k < n; k++) /* insertion sort by stride, stable */
        for (int j = k; j > 0 && st[order[j]] < st[order[j - 1]]; j--) {
            int swap = order[j];
            order[j] = order[j - 1];
            order[j - 1] = swap;
        }
    for (int k = 0; k < n; k++) {
        const int i = order[k];
        if (st[i] < need) {
            if (k == 0)
                return fajit__fail(FAJIT_EINVAL, "%s_stride[%d]=%lld: %s of %s overlap (need >= %s=%lld)",
                                   t->name, i, (long long)st[i], what[i], t->name, t->dim_name,
                                   (long long)t->dim);
            const int p = order[k - 1];
            return fajit__fail(FAJIT_EINVAL,
                               "%s_stride[%d]=%lld: %s of %s overlap (need >= %s=%lld x "
                               "%s_stride[%d]=%lld)",
                               t->name, i, (long long)st[i], what[i], t->name, extent_name[p],
                               (long long)extent[p], t->name, p, (long long)st[p]);
        }
        if (__builtin_mul_overflow(st[i], extent[i], &need))
            need = INT64_MAX;
    }
    return 0;
}

static int layout_strides(const fajit__tensor *t, int64_t out[3], const elem_kind *k)
{
    const int64_t *in = t->stride;
    const int given = in[0] != 0 || in[1] != 0 || in[2] != 0;
    int rc;
    if (!given && (rc = contiguous_strides(t, out)) != 0)
        return rc;
    for (int i = 0; given && i < 3; i++) {
        if (in[i] < 0)
            return fajit__fail(FAJIT_EINVAL, "%s_stride[%d]=%lld: must be >= 0", t->name, i,
                               (long long)in[i]);
        out[i] = in[i];
    }
    if (t->batch == 0 || t->seqlen == 0)
        return 0; /* no elements: nothing is addressed */
    if ((rc = check_span(t, out, given, k)) != 0)
        return rc;
    return given && t->written ? check_no_overlap(t, out, k) : 0;
}

int fajit__tensor_strides(const fajit__tensor *t, int64_t out[3])
{
    return layout_strides(t, out, &tensor_elems);
}

int fajit__probs_strides(const fajit_attn_args *a, int64_t out[3])
{
    const fajit__tensor t = {"probs",    a->probs,    a->probs_stride, a->batch, a->nheads_q, a->seqlen_q,
                             a->seqlen_k, "nheads_q", "seqlen_q",      "seqlen_k", 1};
    int rc = fajit__check_pointer("probs", a->probs, 4, 1);
    return rc != 0 ? rc : layout_strides(&t, out, &probs_elems);
}

int fajit__check_lse(const float *lse, int64_t batch, int64_t heads, int64_t seqlen)
{
    int64_t n;
    if (__builtin_mul_overflow(batch, heads, &n) || __builtin_mul_overflow(n, seqlen, &n) ||
        n > INT64_MAX / (int64_t)sizeof *lse)
        return fajit__fail(FAJIT_EINVAL,
                           "lse: batch=%lld x nheads_q=%lld x seqlen_q=%lld floats: its byte "
                           "offsets overflow int64",
                           (long long)batch, (long long)heads, (long long)seqlen);
    if ((uintptr_t)lse > UINTPTR_MAX - (uint64_t)n * sizeof *lse)
        return fajit__fail(FAJIT_EINVAL, "lse=%p: its %lld bytes run past the end of the address space",
                           (const void *)lse, (long long)(n * (int64_t)sizeof *lse));
    return 0;
}

int fajit__check_pointer(const char *name, const void *p, size_t align, int required)
{
    if (!p && required)
        return fajit__fail(FAJIT_EINVAL, "%s: NULL device pointer", name);
    if ((uintptr_t)p % align != 0)
        return fajit__fail(FAJIT_EINVAL, "%s=%p: must be %zu-byte aligned", name, p, align);
    return 0;
}

unsigned long long fajit__context_id(const fajit__driver *drv, CUcontext cu)
{
    unsigned long long id = 0;
    if (drv->ctxGetId && drv->ctxGetId(cu, &id) == CUDA_SUCCESS)
        return id;
    return (unsigned long long)(uintptr_t)cu;
}

/* The last answer is kept per thread, keyed by the context's unique id, so a
 * warm call makes no driver call for it. */
int fajit__context_device(fajit_ctx *ctx, const fajit__driver *drv, unsigned long long cu_id,
                          int *arch, CUdevice *dev)
{
    static _Thread_local unsigned long long last_id;
    static _Thread_local int last_arch;
    static _Thread_local CUdevice last_dev;
    fajit__device_info info;
    CUdevice d;
    CUresult r;
    int rc;

    if (cu_id != 0 && cu_id == last_id) {
        *arch = last_arch;
        *dev = last_dev;
        return 0;
    }
    if ((r = drv->ctxGetDevice(&d)) != CUDA_SUCCESS)
        return fajit__cu_fail(r, "cuCtxGetDevice");
    if ((rc = fajit__device_info_get(ctx, drv, d, &info)) != 0)
        return rc;
    if (info.arch < 80)
        return fajit__fail(FAJIT_EUNSUPPORTED, "GPU arch sm_%d: fajit needs sm_80 or newer",
                           info.arch);
    last_id = cu_id;
    last_arch = *arch = info.arch;
    last_dev = *dev = d;
    return 0;
}

int fajit__context_arch(fajit_ctx *ctx, const fajit__driver *drv, unsigned long long cu_id,
                        int *arch)
{
    CUdevice dev;
    return fajit__context_device(ctx, drv, cu_id, arch, &dev);
}

/* A window that reaches past every row's keys on one side bounds nothing:
 * -1 instead, so equivalent calls share a variant. The diagonal of row i is i
 * (top-left) or i + seqlen_k - seqlen_q; under varlen the lengths are maxima,
 * which bound every sequence's diagonal the same way. Under a causal mask a
 * right window >= 0 is implied by the mask; a right window of 0 with no mask is
 * the causal mask itself. The forward and the backward both call this, so a
 * backward compiles the very mask its forward ran. */
static void normalize_window(int mask, int64_t seqlen_q, int64_t seqlen_k, fajit__variant *v)
{
    int64_t max_diag = mask == FAJIT_MASK_CAUSAL_TL ? seqlen_q - 1 : seqlen_k - 1;
    int64_t right_enough = mask == FAJIT_MASK_CAUSAL_TL ? seqlen_k - 1 : seqlen_q - 1;
    if (v->window_left >= max_diag)
        v->window_left = -1;
    if (v->mask != FAJIT_MASK_NONE || v->window_right >= right_enough)
        v->window_right = -1;
    else if (v->window_right == 0) {
        v->mask = FAJIT_MASK_CAUSAL;
        v->window_right = -1;
    }
}

int fajit__check_features(const fajit__features *a)
{
    int64_t span;
    int rc;
    if ((rc = fajit__check_range("window_left", a->window_left, -1, INT32_MAX)) ||
        (rc = fajit__check_range("window_right", a->window_right, -1, INT32_MAX)))
        return rc;
    if (!isfinite(a->softcap) || a->softcap < 0.0f)
        return fajit__fail(FAJIT_EINVAL, "softcap=%g: must be finite and >= 0 (0: off)",
                           (double)a->softcap);
    if (!(a->dropout_p >= 0.0f && a->dropout_p < 1.0f)) /* NaN fails too */
        return fajit__fail(FAJIT_EINVAL, "dropout_p=%g: must be in [0, 1)", (double)a->dropout_p);
    if ((rc = fajit__check_pointer("alibi_slopes", a->alibi_slopes, 4, 0)))
        return rc;
    if (a->alibi_batch_stride != 0 &&
        (a->alibi_batch_stride < a->nheads_q ||
         (a->batch > 0 && __builtin_mul_overflow(a->batch - 1, a->alibi_batch_stride, &span))))
        return fajit__fail(FAJIT_EINVAL,
                           "alibi_batch_stride=%lld: must be 0 (slopes shared by every batch) "
                           "or >= nheads_q=%lld, and (batch - 1) * stride must fit int64",
                           (long long)a->alibi_batch_stride, (long long)a->nheads_q);
    if (!a->cu_seqlens_q != !a->cu_seqlens_k)
        return fajit__fail(FAJIT_EINVAL, "cu_seqlens_%s: NULL while cu_seqlens_%s is set: varlen "
                           "needs both (or neither)", a->cu_seqlens_q ? "k" : "q",
                           a->cu_seqlens_q ? "q" : "k");
    if ((rc = fajit__check_pointer("cu_seqlens_q", a->cu_seqlens_q, 4, 0)) ||
        (rc = fajit__check_pointer("cu_seqlens_k", a->cu_seqlens_k, 4, 0)))
        return rc;
    if (a->cu_seqlens_q && a->batch < 1)
        return fajit__fail(FAJIT_EINVAL, "batch=%lld: varlen (cu_seqlens_q/k set) needs batch >= 1",
                           (long long)a->batch);
    return 0;
}

/* The forward's and the backward's args name their feature fields alike. */
#define FEATURES_OF(a)                                                                          \
    {(a)->window_left,  (a)->window_right, (a)->softcap,                                        \
     (a)->dropout_p,    (a)->alibi_slopes, (a)->alibi_batch_stride,                             \
     (a)->cu_seqlens_q, (a)->cu_seqlens_k, (a)->batch,                                          \
     (a)->nheads_q}

fajit__features fajit__fwd_features(const fajit_attn_args *a)
{
    const fajit__features f = FEATURES_OF(a);
    return f;
}

fajit__features fajit__bwd_features(const fajit_attn_bwd_args *a)
{
    const fajit__features f = FEATURES_OF(a);
    return f;
}

void fajit__set_variant_features(const fajit__features *f, int mask, int64_t seqlen_q,
                                 int64_t seqlen_k, fajit__variant *v)
{
    v->mask = mask;
    v->window_left = f->window_left;
    v->window_right = f->window_right;
    normalize_window(mask, seqlen_q, seqlen_k, v);
    v->softcap = f->softcap != 0.0f;
    v->alibi = f->alibi_slopes != NULL;
    v->dropout = f->dropout_p > 0.0f;
    v->varlen = f->cu_seqlens_q != NULL;
}
