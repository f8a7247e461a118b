/*
 * runtime/runtime.h - the runtime layer's internal interfaces: the context,
 * the compile step, the kernel lookup chain and the tile heuristic.
 */
#ifndef FAJIT_RUNTIME_RUNTIME_H
#define FAJIT_RUNTIME_RUNTIME_H

#include <limits.h>
#include <pthread.h>
#include <stdio.h>
#include <stdint.h>

#include "cache/store.h"
#include "codegen/variant.h"
#include "fajit.h"
#include "runtime/driver.h"
#include "runtime/error.h"

/* ---------------------------------------------------------------- compile */

typedef struct fajit__compiled {
    uint8_t *cubin; /* malloc'd */
    size_t cubin_len;
    fajit__entry_meta meta; /* resource usage, NVRTC version, compile time */
    char *log;              /* NVRTC's log (ptxas report, warnings), malloc'd, or NULL */
    int no_report; /* the log could not be read (no memory): meta's resource usage is
                      unknown (zeros), so the kernel is used but not stored */
} fajit__compiled;

/* NVRTC version of the library linked in, as major * 1000 + minor * 10. */
uint32_t fajit__nvrtc_version(void);

/* The fixed NVRTC options (the arch option aside), part of the build identity. */
const char *fajit__nvrtc_options_text(void);

/* Renders and compiles a full variant to a cubin for its arch; the cubin's
 * buffer has FAJIT__ENTRY_ROOM spare bytes after it, so the cache entry can be
 * built in place (a compiled kernel is never lost for want of memory). On failure:
 * FAJIT_ECOMPILE with the NVRTC log in the detail. Free with
 * fajit__compiled_free (also after a failure). */
int fajit__compile_variant(const fajit__variant *v, fajit__compiled *out);
void fajit__compiled_free(fajit__compiled *c);

/* ---------------------------------------------------------------- the kernel table */

/* One loaded kernel: a variant in one CUDA context. */
typedef struct fajit__kernel_slot {
    fajit__variant variant;
    unsigned long long cu_ctx_id;
    CUmodule module;
    CUfunction function;
    int used;
} fajit__kernel_slot;

typedef struct fajit__kernel_table {
    fajit__kernel_slot *slots; /* open addressing, capacity a power of two */
    size_t capacity, count;
} fajit__kernel_table;

/* Per-device facts learnt once. */
typedef struct fajit__device_info {
    int known;
    int arch;           /* e.g. 90 */
    int smem_optin;     /* max dynamic shared memory per block, bytes */
} fajit__device_info;

#define FAJIT__MAX_DEVICES 64

struct fajit_ctx {
    fajit__logger log;
    char cache_dir[PATH_MAX];
    int cache_mode;
    int device;
    fajit__store *store; /* NULL in FAJIT_CACHE_OFF mode */
    uint8_t build_id[16];
    pthread_mutex_t lock; /* guards table, devices, primary */
    fajit__kernel_table table;
    fajit__device_info devices[FAJIT__MAX_DEVICES];
    CUcontext primary;    /* retained primary context of `device`, or NULL */
    int tuned_tiles;      /* 1: launches take tuned tiles when the store has them;
                             0 ($FAJIT_TUNED_TILES=0): the heuristic's, for comparisons */
    int fwd_persist;      /* persistent forward kernels' grid ($FAJIT_FWD_PERSIST): -1 the
                             blocks the SMs hold, 0 a block an item, N at most N blocks */
};

/* Build identity: XXH3-128 of the codegen digest (templates + codegen sources),
 * the NVRTC version, the compile options and the cache format version. */
void fajit__build_identity(uint8_t out[16]);

/* Full key (serialised variant + build identity) and its XXH3-128 digest.
 * The key has a fixed size below FAJIT__ENTRY_KEY_ROOM and is made in the
 * caller's buffer: nothing to allocate, so a lookup cannot fail for want of
 * memory before it reaches the compiler. */
typedef struct fajit__full_key {
    uint8_t bytes[FAJIT__ENTRY_KEY_ROOM];
    size_t len;
} fajit__full_key;
int fajit__variant_key(const fajit_ctx *ctx, const fajit__variant *v, fajit__full_key *key,
                       uint8_t digest[16]);

/* The cache entry for a full variant: from the store, else compiled (once across
 * threads and processes) and stored unless the cache is read-only or off.
 * *entry is malloc'd; *cached says whether it came from the store. No GPU. */
int fajit__kernel_entry(fajit_ctx *ctx, const fajit__variant *v, uint8_t **entry,
                        size_t *entry_len, int *cached);

/* The CUfunction for a full variant in the current CUDA context (identified by
 * cu_ctx_id): the in-process table, else the entry loaded with cuModuleLoadData. */
int fajit__kernel_function(fajit_ctx *ctx, const fajit__driver *drv, const fajit__variant *v,
                           unsigned long long cu_ctx_id, CUfunction *fn);

/* Function attributes a launch of v needs (dynamic shared memory above 48 KiB),
 * set once when the function is loaded. runtime/attn.c, which launches. */
int fajit__configure_function(const fajit__driver *drv, const fajit__variant *v, CUfunction fn);

void fajit__kernel_table_free(fajit_ctx *ctx, const fajit__driver *drv);

/* ---------------------------------------------------------------- heuristic, devices */

/* Fills tile fields left FAJIT__UNSET in v with the heuristic's choice for v's
 * op, head dims, dtype and arch. */
void fajit__heuristic_tiles(fajit__variant *v);

/* Opt-in dynamic shared memory per block of an arch (sm_80/87 163 KB, sm_90
 * and the datacenter Blackwells 227 KB, others 99 KB). */
size_t fajit__arch_smem_limit(int arch);

/* Arch of the context's device when a GPU is present, else 90. */
int fajit__default_arch(fajit_ctx *ctx);

/* Completes a spec: tiles by the heuristic, arch by fajit__default_arch, then
 * checks the whole variant. */
int fajit__complete_spec(fajit_ctx *ctx, fajit__variant *v);

/* Facts about a CUDA device, learnt on first use. */
int fajit__device_info_get(fajit_ctx *ctx, const fajit__driver *drv, CUdevice dev,
                           fajit__device_info *out);

/* Makes a CUDA context current for a launch: the caller's, else the primary
 * context of ctx->device (pushed; *pushed tells the caller to pop it). */
int fajit__enter_cuda(fajit_ctx *ctx, const fajit__driver *drv, CUcontext *cu, int *pushed);

/* ---------------------------------------------------------------- arguments (runtime/args.c) */

/* FAJIT_EINVAL "name=v: must be in lo..hi" unless lo <= v <= hi. */
int fajit__check_range(const char *name, int64_t v, int64_t lo, int64_t hi);

/* One (batch, seqlen, heads, dim) fp16/bf16 tensor of a launch, as its
 * checks see it. The names are the arguments' ("q", "seqlen_q", "nheads_q",
 * "dqk"), so errors name what the caller set. */
typedef struct fajit__tensor {
    const char *name;
    const void *ptr;
    const int64_t *stride; /* {batch, seq, head} as passed; all 0: contiguous */
    int64_t batch, seqlen, heads, dim;
    const char *seqlen_name, *heads_name, *dim_name;
    int written; /* an output: distinct elements must have distinct addresses */
} fajit__tensor;

/* The tensor's strides in elements (all zero in: contiguous), checked: each
 * >= 0; one past its largest byte offset fits int64 and does not run past the
 * end of the address space; an output's elements do not overlap. Errors name
 * "<name>_stride[i]" (or the sizes, for contiguous strides). */
int fajit__tensor_strides(const fajit__tensor *t, int64_t out[3]);

/* An LSE of batch * heads * seqlen floats: its byte size fits int64 and it
 * does not run past the end of the address space. */
int fajit__check_lse(const float *lse, int64_t batch, int64_t heads, int64_t seqlen);

/* FAJIT_EINVAL naming the pointer if it is NULL while required, or misaligned. */
int fajit__check_pointer(const char *name, const void *p, size_t align, int required);

/* A unique id of a CUDA context (cuCtxGetId, else its address). */
unsigned long long fajit__context_id(const fajit__driver *drv, CUcontext cu);

/* Arch of the current CUDA context's device (cached per thread by context id);
 * FAJIT_EUNSUPPORTED below sm_80. */
int fajit__context_arch(fajit_ctx *ctx, const fajit__driver *drv, unsigned long long cu_id,
                        int *arch);

/* The feature arguments a forward and a backward share, as their structs
 * hold them. */
typedef struct fajit__features {
    int window_left, window_right;
    float softcap, dropout_p;
    const float *alibi_slopes;
    int64_t alibi_batch_stride;
    const int32_t *cu_seqlens_q, *cu_seqlens_k;
    int64_t batch, nheads_q;
} fajit__features;

/* FAJIT_EINVAL naming the bad feature argument: windows -1..INT32_MAX,
 * softcap finite >= 0, dropout_p in [0, 1), ALiBi slopes aligned and a batch
 * stride of 0 or >= nheads_q whose span fits int64, cu_seqlens both or
 * neither (aligned), varlen with batch >= 1. After the shapes are checked. */
int fajit__check_features(const fajit__features *f);

/* The feature arguments of a forward's or a backward's struct. */
fajit__features fajit__fwd_features(const fajit_attn_args *a);
fajit__features fajit__bwd_features(const fajit_attn_bwd_args *a);

/* The variant's feature fields (mask, window normalised, softcap, ALiBi,
 * dropout, varlen) from validated arguments: one rule for the forward and
 * every backward kernel, so a backward compiles the very mask its forward ran. */
void fajit__set_variant_features(const fajit__features *f, int mask, int64_t seqlen_q,
                                 int64_t seqlen_k, fajit__variant *v);

/* The same, with the device as well. */
int fajit__context_device(fajit_ctx *ctx, const fajit__driver *drv, unsigned long long cu_id,
                          int *arch, CUdevice *dev);

#endif
