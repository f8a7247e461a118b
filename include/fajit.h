/*
 * fajit.h - libfajit, FlashAttention kernels generated, compiled and run at run time.
 *
 * This is the only public header. Everything not declared here is internal.
 *
 * Conventions
 *  - Every function returning int returns 0 (FAJIT_OK) on success or a negative
 *    FAJIT_E* code. fajit_strerror() names the code; fajit_last_error() gives the
 *    detail of the most recent failure on the calling thread (the bad field and
 *    value, the NVRTC log, the CUDA error name).
 *  - Option and argument structs are filled by their *_init() function first; it
 *    sets struct_size, which lets later versions append fields without breaking
 *    callers compiled against this header.
 *  - Device pointers are void * / const void *; a stream is a CUstream passed as
 *    void * (NULL is the legacy default stream). Shapes and strides are int64_t,
 *    counted in elements.
 *  - The library never aborts the process and prints nothing unless asked (a log
 *    callback, or FAJIT_LOG_LEVEL with no callback, which logs to stderr).
 */
#ifndef FAJIT_H
#define FAJIT_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define FAJIT_VERSION_MAJOR 0
#define FAJIT_VERSION_MINOR 1
#define FAJIT_VERSION_PATCH 0
#define FAJIT_VERSION_STRING "0.1.0"
/* FAJIT_VERSION_MAJOR * 10000 + MINOR * 100 + PATCH */
#define FAJIT_VERSION_NUMBER 100

#if defined(FAJIT_STATIC)
#define FAJIT_API
#elif defined(FAJIT_BUILDING)
#define FAJIT_API __attribute__((visibility("default")))
#else
#define FAJIT_API
#endif

/* Version of the library actually loaded, e.g. "0.1.0". Static storage. */
FAJIT_API const char *fajit_version(void);

/* ---------------------------------------------------------------- status codes */

#define FAJIT_STATUS_LIST(X)                                                        \
    X(FAJIT_OK, 0, "success")                                                       \
    X(FAJIT_EINVAL, -1, "invalid argument")                                         \
    X(FAJIT_ENOMEM, -2, "out of memory")                                            \
    X(FAJIT_ENOGPU, -3, "no usable GPU or CUDA driver")                             \
    X(FAJIT_ECUDA, -4, "CUDA driver call failed")                                   \
    X(FAJIT_ECOMPILE, -5, "kernel compilation failed")                              \
    X(FAJIT_ECACHE, -6, "kernel cache error")                                       \
    X(FAJIT_EIO, -7, "I/O error")                                                   \
    X(FAJIT_ENOTFOUND, -8, "not found")                                             \
    X(FAJIT_EUNSUPPORTED, -9, "unsupported configuration")                          \
    X(FAJIT_EPARSE, -10, "cannot parse variant or manifest text")                   \
    X(FAJIT_EREADONLY, -11, "cache is read-only")                                   \
    X(FAJIT_ECORRUPT, -12, "corrupt cache entry")                                   \
    X(FAJIT_EAMBIGUOUS, -13, "key prefix matches several entries")

enum fajit_status {
#define FAJIT_X_ENUM(name, value, text) name = value,
    FAJIT_STATUS_LIST(FAJIT_X_ENUM)
#undef FAJIT_X_ENUM
};

/* Static text for a status code; "unknown status" for codes not in the list. */
FAJIT_API const char *fajit_strerror(int status);

/* Detail of the most recent failing call made by this thread ("" if none).
 * Thread-local storage, valid until this thread's next failing call. */
FAJIT_API const char *fajit_last_error(void);

/* Frees memory the library returned through an out-parameter (source text...). */
FAJIT_API void fajit_free(void *p);

/* ---------------------------------------------------------------- context */

typedef struct fajit_ctx fajit_ctx;

enum fajit_cache_mode {
    FAJIT_CACHE_DEFAULT = -1,  /* FAJIT_CACHE_MODE, else read-write */
    FAJIT_CACHE_READWRITE = 0, /* hits served, misses compiled and stored */
    FAJIT_CACHE_READONLY = 1,  /* hits served, misses compiled in memory only */
    FAJIT_CACHE_OFF = 2        /* the disk is never touched */
};

enum fajit_log_level {
    FAJIT_LOG_DEFAULT = -1, /* FAJIT_LOG_LEVEL, else off */
    FAJIT_LOG_OFF = 0,
    FAJIT_LOG_ERROR = 1,
    FAJIT_LOG_WARN = 2,
    FAJIT_LOG_INFO = 3,
    FAJIT_LOG_DEBUG = 4
};

/* Log callback: msg is valid only during the call. May be called from any
 * thread that uses the context, concurrently; it must not call back into fajit. */
typedef void (*fajit_log_fn)(void *user, int level, const char *msg);

typedef struct fajit_options {
    uint32_t struct_size;  /* set by fajit_options_init */
    const char *cache_dir; /* NULL: $FAJIT_CACHE_DIR, else $XDG_CACHE_HOME/fajit,
                              else ~/.cache/fajit. Copied by fajit_create. */
    int cache_mode;        /* enum fajit_cache_mode */
    int log_level;         /* enum fajit_log_level */
    fajit_log_fn log_fn;   /* NULL: stderr, only if a level above OFF is set */
    void *log_user;        /* passed to log_fn; not owned */
    int device;            /* CUDA device ordinal; -1: $FAJIT_DEVICE, else 0 */
    uint64_t cache_map_bytes; /* initial LMDB map size; 0: $FAJIT_CACHE_MAP_MB, else
                                 256 MiB. The map grows when full either way. */
    /* Fields below were added in 0.1; a struct_size that stops before them is
     * accepted and they take their "unset" values. */
    uint64_t cache_max_bytes; /* cap on the bytes of the cache's entries, kept by evicting
                                 the least recently used; 0: $FAJIT_CACHE_MAX_BYTES, else
                                 no cap */
    int cache_shared;         /* 1: shared mode (a cache directory owned by another user or
                                 writable by its group is used, files are created 0660);
                                 0: private (refused, files 0600); -1 (set by
                                 fajit_options_init): $FAJIT_CACHE_SHARED, else private */
} fajit_options;

/* Fills *opt with "unset" values: explicit fields override FAJIT_* variables,
 * which override the built-in defaults. */
FAJIT_API void fajit_options_init(fajit_options *opt);

/* Creates a context. opt may be NULL (all defaults). No GPU is needed: the CUDA
 * driver is opened only when something must be launched. The cache is opened
 * here (read-write mode creates the directory). *out is NULL on failure.
 * A context may be used from several threads at once; create/destroy are not
 * thread-safe with respect to other calls on the same context. */
FAJIT_API int fajit_create(fajit_ctx **out, const fajit_options *opt);

/* Destroys a context, flushing its cache counters. NULL is a no-op. Modules it
 * loaded stay loaded in their CUDA contexts until those contexts are destroyed. */
FAJIT_API void fajit_destroy(fajit_ctx *ctx);

/* ---------------------------------------------------------------- attention */

enum fajit_dtype { FAJIT_DTYPE_FP16 = 0, FAJIT_DTYPE_BF16 = 1 };

enum fajit_mask {
    FAJIT_MASK_NONE = 0,
    FAJIT_MASK_CAUSAL = 1,   /* aligned to the bottom-right corner, as FlashAttention 2.1+ */
    FAJIT_MASK_CAUSAL_TL = 2 /* aligned to the top-left corner */
};

enum fajit_kernel_choice {
    FAJIT_KERNEL_AUTO = 0,     /* the fastest kernel that covers the call */
    FAJIT_KERNEL_REFERENCE = 1 /* the simple exact reference kernel */
};

/*
 * Forward attention arguments. Layout (batch, seqlen, nheads, headdim) with any
 * batch/seq/head strides and a contiguous last dimension.
 *
 * A stride triple {batch, seq, head} of all zeros means contiguous. LSE, when
 * requested, is fp32 with layout (batch, nheads_q, seqlen_q), contiguous; fully
 * masked rows get output 0 and LSE -inf. nheads_q must be a multiple of
 * nheads_kv (GQA/MQA). All pointers are device pointers owned by the caller and
 * must stay valid until the work queued on the stream has finished.
 */
typedef struct fajit_attn_args {
    uint32_t struct_size; /* set by fajit_attn_args_init */
    const void *q;        /* (batch, seqlen_q, nheads_q, dqk) */
    const void *k;        /* (batch, seqlen_k, nheads_kv, dqk) */
    const void *v;        /* (batch, seqlen_k, nheads_kv, dv) */
    void *o;              /* (batch, seqlen_q, nheads_q, dv), written */
    float *lse;           /* NULL, or (batch, nheads_q, seqlen_q) fp32, written */
    int64_t batch, seqlen_q, seqlen_k, nheads_q, nheads_kv, dqk, dv;
    int64_t q_stride[3], k_stride[3], v_stride[3], o_stride[3]; /* batch, seq, head */
    int dtype;           /* enum fajit_dtype, for q, k, v and o */
    int mask;            /* enum fajit_mask */
    float softmax_scale; /* 0: 1/sqrt(dqk) */
    int kernel;          /* enum fajit_kernel_choice */

    /* ---- Appended fields. A caller built against a header without them
     * passes a shorter struct_size and gets the defaults fajit_attn_args_init
     * sets here. */

    /* Sliding window (FlashAttention 2.3): query i sees key j only when
     * i + seqlen_k - seqlen_q - window_left <= j <= i + seqlen_k - seqlen_q + window_right
     * (the top-left diagonal i under FAJIT_MASK_CAUSAL_TL). -1: unbounded on that
     * side (the default). Compiled into the kernel: each distinct window is a
     * variant. */
    int window_left, window_right;
    /* Softcap (FlashAttention 2.6): scores s become softcap * tanh(s / softcap),
     * after the softmax scale. 0: off (the default). */
    float softcap;
    /* ALiBi: score(i, j) += -slope * |i + seqlen_k - seqlen_q - j|. NULL: off.
     * fp32 device pointer, nheads_q slopes, or batch * nheads_q with
     * alibi_batch_stride = nheads_q (0: the same slopes for every batch). */
    const float *alibi_slopes;
    int64_t alibi_batch_stride;
    /* Dropout on the attention probabilities, kept values scaled by 1/(1-p).
     * The mask is a pure function of (dropout_seed, dropout_offset, batch, head,
     * row, column) through Philox-4x32-10 (formula in templates/common.cuh), so
     * a backward with the same seed and offset regenerates it. 0: off. */
    float dropout_p;
    uint64_t dropout_seed, dropout_offset;
    /* Varlen: with cu_seqlens_q/k (int32 device arrays of batch + 1 prefix
     * sums) q, k, v and o are packed (total, nheads, dim): sequence b is rows
     * cu_seqlens[b] .. cu_seqlens[b+1]-1, batch strides are ignored, seqlen_q/k
     * are the max lengths (max_seqlen_q/k of flash_attn_varlen_func), and LSE is
     * (nheads_q, total_q). Both NULL: dense. */
    const int32_t *cu_seqlens_q, *cu_seqlens_k;
    /* Attention probabilities, a testing aid (flash_attn's S_dmask). NULL (the
     * default): not written. Else an fp32 device buffer, 4-byte aligned, that
     * receives for every batch b (the sequence under varlen), query head h,
     * query row i < seqlen_q and key j < seqlen_k (the sequence's lengths
     * under varlen, i and j counted within it)
     *   probs[b * probs_stride[0] + h * probs_stride[1] + i * probs_stride[2] + j]
     *     = softmax probability of key j for row i, normalised, before dropout
     *       (exp(s_ij - m_i) / l_i, the l of the LSE), negated where dropout
     *       dropped (b, h, i, j) (-0.0 for a dropped 0): the sign is the mask
     *       the output was computed with, the one every kernel and the
     *       backward draw from (dropout_seed, dropout_offset);
     *     = 0 for keys row i does not see (mask, window; every key of a fully
     *       masked row).
     * Other elements (padding, rows and keys past a varlen sequence's
     * lengths) are left as they were. probs_stride {batch, head, row} in
     * elements, key stride 1; all 0 means contiguous (batch, nheads_q,
     * seqlen_q, seqlen_k). The strides are checked as the tensors' are
     * (>= 0, offsets fit int64, no two elements at one address). A call with
     * probs runs the reference kernel (op ref-probs) whatever `kernel` says:
     * slower, and meant for tests. */
    float *probs;
    int64_t probs_stride[3];
    /* Scratch the caller lends: a device buffer of workspace_bytes, 16-byte
     * aligned, that nothing else touches until the work this call queues on
     * `stream` is done (stream order: a caching allocator's block on that
     * stream, or a buffer kept for it). Split-KV launches (decoding: few query
     * rows over long keys) put their partial outputs there; the size a call
     * needs is fajit_attn_fwd_workspace_size's answer (0 for most calls). NULL
     * (the default), or fewer bytes than the call needs: the library takes
     * stream-ordered scratch from its pool for the call (cuMemAllocAsync and
     * cuMemFreeAsync, which cost the GPU about 1 us a call; H100, decode). */
    void *workspace;
    size_t workspace_bytes;
} fajit_attn_args;

FAJIT_API void fajit_attn_args_init(fajit_attn_args *args);

/* Queues attention on `stream` (a CUstream, NULL for the default stream) in the
 * calling thread's current CUDA context, else the primary context of the
 * context's device. The first call for a variant compiles it (or loads it from
 * the cache); later calls only launch. Arguments are checked first: on any error
 * nothing is launched. Thread-safe. */
FAJIT_API int fajit_attn_fwd(fajit_ctx *ctx, const fajit_attn_args *args, void *stream);

/* *bytes = the workspace fajit_attn_fwd would use for these arguments on the
 * device it would run on (the calling thread's current CUDA context, else the
 * context's device): 0 when the call needs none. The arguments are checked as
 * fajit_attn_fwd checks them (the workspace fields aside); nothing is compiled
 * or launched. The answer is the plan's at the time of the call: tuning
 * records stored later (fajit tune) may change it. */
FAJIT_API int fajit_attn_fwd_workspace_size(fajit_ctx *ctx, const fajit_attn_args *args, size_t *bytes);

/* Canonical text of the variant fajit_attn_fwd would run for these arguments,
 * written to buf (NUL-terminated, truncated to cap). Needs the GPU only to learn
 * its arch. Returns the text length or a negative status. */
FAJIT_API int fajit_attn_variant(fajit_ctx *ctx, const fajit_attn_args *args, char *buf,
                                 size_t cap);

/*
 * Backward attention arguments: the gradients of the forward's inputs, with
 * FlashAttention 2.x semantics. Layouts, strides, GQA/MQA, mask and
 * softmax_scale are exactly those of fajit_attn_args, and must be the ones the
 * forward ran with; o and lse are that forward's output and LSE (the gradient
 * is computed from them, so a stale o or lse gives wrong gradients, silently).
 *
 * grad_k and grad_v are summed over the nheads_q / nheads_kv query heads that
 * share a kv head. grad_q, grad_k and grad_v are fully overwritten (rows that
 * see no key, or keys no row sees, get 0); they must not overlap each other
 * or the inputs. All pointers are device pointers owned by the caller and must
 * stay valid until the work queued on the stream has finished.
 *
 * Scratch: the reference backward needs none. The fast backward (a later
 * release) will allocate what it needs itself, stream-ordered on the call's
 * stream; how is said here when it lands.
 *
 * deterministic: 1 asks for bit-identical results across runs with the same
 * arguments on the same device (no unordered floating-point atomics). The
 * reference backward is always deterministic; with 0, a faster kernel may be
 * chosen that is not.
 *
 * Features (the appended fields): window, softcap, ALiBi, dropout and varlen
 * mean exactly what they mean in fajit_attn_args, and must be the forward's.
 * The softcap's tanh is differentiated through (the gradient of a score is
 * scaled by 1 - tanh^2); ALiBi slopes are constants (no gradient). Dropout
 * regenerates the forward's mask from dropout_seed and dropout_offset, so the
 * same p, seed and offset must be passed: nothing of size seqlen_q x seqlen_k
 * is stored anywhere. Under varlen, every tensor (dO and the gradients
 * included) is packed (total, nheads, dim) with its batch stride ignored, and
 * lse is the forward's (nheads_q, total_q).
 */
typedef struct fajit_attn_bwd_args {
    uint32_t struct_size;       /* set by fajit_attn_bwd_args_init */
    const void *q, *k, *v, *o;  /* the forward's inputs and output, layouts as fajit_attn_args */
    const void *grad_out;       /* dO, (batch, seqlen_q, nheads_q, dv) */
    const float *lse;           /* the forward's LSE, (batch, nheads_q, seqlen_q) fp32, required */
    void *grad_q;               /* (batch, seqlen_q, nheads_q, dqk), written */
    void *grad_k;               /* (batch, seqlen_k, nheads_kv, dqk), written: summed over the
                                   query heads sharing a kv head */
    void *grad_v;               /* (batch, seqlen_k, nheads_kv, dv), written, likewise */
    int64_t batch, seqlen_q, seqlen_k, nheads_q, nheads_kv, dqk, dv;
    int64_t q_stride[3], k_stride[3], v_stride[3], o_stride[3], grad_out_stride[3],
        grad_q_stride[3], grad_k_stride[3], grad_v_stride[3]; /* {batch, seq, head}; all 0 = contiguous */
    int dtype;                  /* enum fajit_dtype, all tensors */
    int mask;                   /* enum fajit_mask, as in the forward */
    float softmax_scale;        /* 0: 1/sqrt(dqk) */
    int deterministic;          /* 1: bit-identical across runs (the reference always is) */
    int kernel;                 /* enum fajit_kernel_choice */

    /* ---- Appended fields (0.1: the forward's features). A caller built
     * against a header without them passes a shorter struct_size and gets the
     * defaults fajit_attn_bwd_args_init sets here (no feature). Each means
     * what the field of the same name means in fajit_attn_args. */
    int window_left, window_right; /* sliding window; -1: unbounded side (the default) */
    float softcap;                 /* 0: off */
    const float *alibi_slopes;     /* NULL: off; fp32, nheads_q or batch * nheads_q slopes */
    int64_t alibi_batch_stride;    /* 0: the same slopes for every batch, else >= nheads_q */
    float dropout_p;               /* 0: off; else the forward's p, in [0, 1) */
    uint64_t dropout_seed, dropout_offset; /* the forward's: its mask is regenerated from them */
    const int32_t *cu_seqlens_q, *cu_seqlens_k; /* varlen: batch + 1 prefix sums; both NULL: dense */
} fajit_attn_bwd_args;

/* Fills *args with defaults: zeros and NULLs, contiguous strides, fp16, no
 * mask, default scale, deterministic 0, kernel AUTO, window -1,-1, no
 * softcap, ALiBi, dropout or varlen; sets struct_size. */
FAJIT_API void fajit_attn_bwd_args_init(fajit_attn_bwd_args *args);

/* Queues the backward on `stream`, in the same CUDA context as fajit_attn_fwd
 * would use. Arguments are checked first (each error names the bad argument);
 * on any error nothing is launched. The first call for a variant compiles it
 * (or loads it from the cache); later calls only launch. With batch, seqlen_q
 * and seqlen_k all valid and no work to do (batch 0), nothing is launched;
 * with seqlen_q 0, grad_k and grad_v are written as zeros; with seqlen_k 0,
 * grad_q is. Thread-safe. */
FAJIT_API int fajit_attn_bwd(fajit_ctx *ctx, const fajit_attn_bwd_args *args, void *stream);

/* ---------------------------------------------------------------- variants */

/* Completes a spec (canonical text with fields left out, e.g. "ref dqk=72")
 * into full canonical text: defaults filled in, dv = dqk, tile fields from the
 * runtime heuristic, arch from the context's GPU (else sm_90). Errors name the
 * bad field and value. Returns the length or a negative status. */
FAJIT_API int fajit_variant_complete(fajit_ctx *ctx, const char *spec, char *buf, size_t cap);

/* Expands a manifest (one spec a line, '#' comments, lists "a,b" and ranges
 * "lo..hi:step" in values) into completed canonical texts, calling fn for each
 * in order; fn returns nonzero to stop (that value is returned). Errors name the
 * line, the field and the value. */
typedef int (*fajit_variant_fn)(void *user, const char *variant);
FAJIT_API int fajit_manifest_expand(fajit_ctx *ctx, const char *manifest, fajit_variant_fn fn,
                                    void *user);

/* Exact CUDA source generated for a variant (a spec is completed first).
 * *src is NUL-terminated, owned by the caller, freed with fajit_free. */
FAJIT_API int fajit_variant_source(fajit_ctx *ctx, const char *spec, char **src, size_t *len);

typedef struct fajit_compile_result {
    uint32_t struct_size;
    int cached;           /* 1: found in the cache, nothing compiled */
    double compile_ms;    /* NVRTC time of this compile (0 if cached) */
    uint64_t cubin_bytes;
    int registers, smem_bytes, spill_bytes;
    char key_hex[33];     /* XXH3-128 key of the entry */
} fajit_compile_result;

/* Makes sure the variant (a spec is completed first) is compiled and in the
 * cache, compiling it if missing; no GPU needed. Thread-safe: concurrent
 * calls, even from other processes, compile a key once. res may be NULL. */
FAJIT_API int fajit_compile(fajit_ctx *ctx, const char *spec, fajit_compile_result *res);

/* ---------------------------------------------------------------- cache */

typedef struct fajit_entry_info {
    char key_hex[33];      /* XXH3-128 of the entry's full key */
    char variant[320];     /* canonical text ("?" if undecodable) */
    char arch[16];         /* e.g. "sm_90" */
    int current_build;     /* 1: reachable by this build; 0: another build's */
    int valid;             /* 1: header, checksum and key check out */
    uint64_t cubin_bytes, entry_bytes;
    int registers, smem_bytes, spill_bytes;
    double compile_ms;
    uint32_t nvrtc_version; /* major * 1000 + minor * 10 */
    char problem[128];     /* why the entry is invalid, "" if valid */
} fajit_entry_info;

typedef int (*fajit_entry_fn)(void *user, const fajit_entry_info *e);

/* Calls fn for each entry in key order; fn returns nonzero to stop. */
FAJIT_API int fajit_cache_list(fajit_ctx *ctx, fajit_entry_fn fn, void *user);

/* Finds one entry by key: a hex digest or unique prefix of at least 6 digits, or
 * a variant spec (completed first). FAJIT_ENOTFOUND / FAJIT_EAMBIGUOUS. */
FAJIT_API int fajit_cache_find(fajit_ctx *ctx, const char *key, fajit_entry_info *out);

/* Removes one entry (key as fajit_cache_find) or, with key NULL, all entries. */
FAJIT_API int fajit_cache_remove(fajit_ctx *ctx, const char *key);

typedef struct fajit_verify_result {
    uint32_t struct_size;
    uint64_t checked, bad, removed;
} fajit_verify_result;

/* Checks every entry (header, lengths, checksum, key digest); calls fn (may be
 * NULL) for each bad one; with fix, removes the bad ones. */
FAJIT_API int fajit_cache_verify(fajit_ctx *ctx, int fix, fajit_entry_fn fn, void *user,
                                 fajit_verify_result *res);

typedef struct fajit_cache_stats {
    uint32_t struct_size;
    uint64_t entries, bytes, map_bytes;
    /* Counters kept in the store across processes and runs. */
    uint64_t hits, misses, compiles, bad_entries;
} fajit_cache_stats;

FAJIT_API int fajit_cache_get_stats(fajit_ctx *ctx, fajit_cache_stats *out);

typedef struct fajit_info {
    uint32_t struct_size;
    char cache_dir[4096];
    int cache_mode;
    int nvrtc_major, nvrtc_minor;
    int driver_version;    /* 0 if no driver */
    int device_count;      /* 0 if no driver or GPU */
    char device_name[128]; /* the context's device, "" if none */
    char device_arch[16];  /* e.g. "sm_90", "" if none */
    char build_id[33];     /* hex digest of templates, codegen, NVRTC, options, format */
    char no_gpu_reason[256];
} fajit_info;

FAJIT_API int fajit_get_info(fajit_ctx *ctx, fajit_info *out);

/* ---------------------------------------------------------------- bundles */

typedef struct fajit_bundle_result {
    uint32_t struct_size;
    uint64_t entries;  /* entries written to the bundle, or merged into the cache */
    uint64_t bytes;    /* their bytes */
    uint64_t skipped;  /* export: invalid entries left out; import: entries the cache
                          already held, byte for byte */
    char sha256[65];   /* hex SHA-256 of the bundle's manifest (which covers every entry) */
} fajit_bundle_result;

/* Writes every valid entry of the cache to a bundle file at path (replaced
 * atomically): a header, a manifest with each entry's key, length and SHA-256,
 * the SHA-256 of the manifest, then the entries. res may be NULL. */
FAJIT_API int fajit_cache_export(fajit_ctx *ctx, const char *path, fajit_bundle_result *res);

/* Merges a bundle into the cache (read-write mode). The whole bundle is
 * verified first (manifest digest, every entry's SHA-256, entry format, key);
 * any fault rejects all of it with FAJIT_ECORRUPT and nothing is written. If
 * expect_sha256 is non-NULL, the manifest's SHA-256 (hex) must equal it, which
 * ties the bundle to a digest obtained out of band. res may be NULL. */
FAJIT_API int fajit_cache_import(fajit_ctx *ctx, const char *path, const char *expect_sha256,
                                 fajit_bundle_result *res);

/* ---------------------------------------------------------------- autotuning */

/*
 * Tuning measures tile candidates (block M, block N, warps, stages) of the
 * fast forward and of the fast backward's main kernel on this GPU, and for
 * forward problems where split-KV applies (few query rows over long keys:
 * decoding) also split counts, and keeps every measurement in the cache, in
 * its own table keyed by the GPU (name, arch, SM count, driver version), the
 * library build, the variant without its tiles, a sequence-length bucket
 * (seqlen_k in (2^(b-1), 2^b]) and, for split-KV problems, the split count
 * the built-in rule gives them. Calls whose key has records run the
 * candidate with the lowest median time (the heuristic's own config kept
 * unless another is at least 3% faster); others keep the heuristic.
 * FAJIT_TUNED_TILES=0 in the environment when a context is created turns
 * tuned configs off for it. See docs/tuning.md.
 */

/* What a progress callback reports (fajit_tune_event.kind). */
enum fajit_tune_event_kind {
    FAJIT_TUNE_PRUNED = 0,   /* a candidate was dropped before timing (why says why) */
    FAJIT_TUNE_COMPILED = 1, /* a candidate compiled (or was in the cache) and is kept */
    FAJIT_TUNE_REJECTED = 2, /* a candidate's output disagreed with the heuristic's */
    FAJIT_TUNE_TIMED = 3,    /* a candidate was timed on a problem */
    FAJIT_TUNE_WINNER = 4    /* the best candidate of a problem */
};

typedef struct fajit_tune_event {
    int kind;             /* enum fajit_tune_event_kind */
    size_t done, total;   /* progress of the current phase (compiling, or timing) */
    const char *problem;  /* the problem line (shape words included), "" in the compile phase */
    const char *variant;  /* the candidate's canonical text */
    const char *why;      /* PRUNED / REJECTED: the reason; else "" */
    double median_us;     /* TIMED / WINNER: the candidate's median time */
    double heuristic_us;  /* TIMED / WINNER: the heuristic config's median time */
    int splits;           /* REJECTED / TIMED / WINNER: the candidate's split-KV count, 0
                             where the built-in rule decides (problems it does not
                             split, and bwd) */
} fajit_tune_event;

/* Called under a lock (never concurrently), from fajit_tune's caller or, in
 * the compile phase, from its compile threads; the strings are valid during
 * the call only. It must not call back into fajit. */
typedef void (*fajit_tune_progress_fn)(void *user, const fajit_tune_event *ev);

typedef struct fajit_tune_options {
    uint32_t struct_size;  /* set by fajit_tune_options_init */
    /* Problems, one a line, '#' comments: a spec of op fwd or bwd (variant
     * fields, no tiles, no arch) plus shape words, e.g.
     *   fwd dqk=128 dtype=fp16 mask=causal batch=4 seqlen_q=4096 seqlen_k=4096 nheads_q=16 nheads_kv=16
     *   bwd dqk=128 dtype=bf16 mask=causal batch=4 seqlen=4096 nheads=16
     *   fwd dqk=128 dtype=bf16 batch=1 seqlen_q=1 seqlen_k=65536 nheads_q=32 nheads_kv=8
     * Shape words: batch (default 1), seqlen (both lengths) or seqlen_q and
     * seqlen_k, nheads (both) or nheads_q and nheads_kv. op bwd tunes the
     * fast backward's main kernel (fajit_attn_bwd, deterministic 0; head dims
     * multiples of 8 up to 256), timing the whole backward (its three
     * kernels); a forward line where split-KV applies (the third line) also
     * tunes the split count. NULL: FlashAttention's benchmark grid, forward
     * and backward (hidden 2048, head dims 64/128/256, seqlen 512..16384
     * with batch * seqlen = 16384, causal and not, fp16 and bf16: 144
     * problems). */
    const char *problems;
    int threads;           /* compile threads; 0: the online cores */
    int warmup;            /* launches before timing a candidate (init: 3) */
    int repeat;            /* timed launches whose median is kept (init: 10) */
    fajit_tune_progress_fn progress; /* NULL: none */
    void *progress_user;
} fajit_tune_options;

typedef struct fajit_tune_result {
    uint32_t struct_size;
    uint64_t problems;    /* problems parsed */
    uint64_t candidates;  /* distinct candidate variants enumerated */
    uint64_t pruned;      /* dropped before timing: illegal, shared memory, registers, spills,
                             compile errors */
    uint64_t compiled;    /* candidates kept after compiling (NVRTC or the cache) */
    uint64_t rejected;    /* dropped by the correctness check on the GPU */
    uint64_t timed;       /* (problem, candidate) timings recorded */
    uint64_t improved;    /* problems whose winner beats the heuristic config */
    double compile_s, timing_s;
} fajit_tune_result;

FAJIT_API void fajit_tune_options_init(fajit_tune_options *opt);

/* Enumerates the candidates of every problem, prunes them statically and by
 * their ptxas report, compiles the survivors on opt->threads threads (which
 * fills the kernel cache), then on the GPU checks each candidate's output
 * against the heuristic config's on the problem's first occurrence and times
 * each with CUDA events (median of opt->repeat after opt->warmup, on rotating
 * input buffers), storing one record per (problem key, candidate). Needs a
 * read-write cache (FAJIT_EREADONLY otherwise). With no GPU the compile phase
 * still runs, then FAJIT_ENOGPU is returned with *res filled. opt NULL: the
 * defaults; res may be NULL. */
FAJIT_API int fajit_tune(fajit_ctx *ctx, const fajit_tune_options *opt, fajit_tune_result *res);

typedef struct fajit_tuning_record {
    char gpu_name[96];
    char gpu_arch[16];    /* "sm_90" */
    int sm_count;
    int driver_version;   /* cuDriverGetVersion */
    int current_build;    /* 1: recorded by this build (used); 0: another build's */
    char variant[320];    /* canonical text of the candidate, tiles included */
    int seqlen_bucket;    /* for seqlen_k in (2^(b-1), 2^b] */
    int bm, bn, warps, stages;
    double median_us;
    uint32_t samples;
    uint64_t timestamp_ns; /* when it was measured, ns since the epoch */
    int best;             /* 1: the record launches use for its (GPU, build, variant,
                             bucket, plan_splits, few_rows): the lowest median, the
                             heuristic's config kept unless another is at least 3% faster */
    int splits;           /* the candidate's split-KV count; 0: the built-in rule's */
    int plan_splits;      /* the rule's split count for the problem (part of the key);
                             0: split-KV does not apply (every bwd record) */
    int few_rows;         /* 1: a problem with few query rows a block (decoding), whose
                             heuristic tiles are the few-rows rule's (part of the key) */
} fajit_tuning_record;

typedef int (*fajit_tuning_fn)(void *user, const fajit_tuning_record *r);

/* Calls fn for every valid tuning record, grouped by (GPU, build, variant,
 * bucket, plan_splits, few_rows); fn returns nonzero to stop. */
FAJIT_API int fajit_tuning_list(fajit_ctx *ctx, fajit_tuning_fn fn, void *user);

/* Removes every tuning record (read-write cache). */
FAJIT_API int fajit_tuning_clear(fajit_ctx *ctx);

#ifdef __cplusplus
}
#endif
#endif /* FAJIT_H */
