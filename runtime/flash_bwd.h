/*
 * runtime/flash_bwd.h - the fast backward (templates/flash_bwd.cuh) from the
 * host side: which calls it takes, its variants and tiles, its scratch and
 * its three launches. runtime/attn_bwd.c validates the arguments and fills
 * struct fajit_bwd_params, then calls fajit__flash_bwd_run where
 * fajit__flash_bwd_refusal says the fast kernels apply.
 */
#ifndef FAJIT_RUNTIME_FLASH_BWD_H
#define FAJIT_RUNTIME_FLASH_BWD_H

#include "runtime/runtime.h"
#include "templates/bwd_params.h"

/* Why the fast backward cannot take these validated arguments (a static
 * string), or NULL if it can: the reference asked for, a head dim not a
 * multiple of 8 or above 256, a tensor not 16-byte aligned, a stride (in p,
 * as filled) not a multiple of 8 elements. Every feature of the forward
 * (window, softcap, ALiBi, dropout, varlen) is taken. */
const char *fajit__flash_bwd_refusal(const fajit_attn_bwd_args *a, const struct fajit_bwd_params *p);

/* Fills the tile fields left FAJIT__UNSET of a variant of one of the fast
 * backward's ops (dqk, dv and arch set; arch FAJIT__UNSET is taken as
 * sm_90): the big kernels' (bwd, bwd-dkdv, bwd-dq) by head dim (8 warps, 2
 * stages; bm 128 bn 128 up to 64 (bwd-dq bm 64), bm 64 bn 128 up to 128,
 * bm 64 bn 64 above; under dropout bm 64 up to 64 and bm 32 above 128),
 * shrunk until they fit the
 * arch's shared memory; pre and post fixed (bm 64, 8 warps). The runtime's
 * heuristic (fajit__heuristic_tiles) should dispatch here for these ops. */
void fajit__flash_bwd_tiles(fajit__variant *v);

/* The main kernel's three warp layouts all exist for v's bm, bn, warps and
 * padded head dims (the template's static_assert): 1, else 0. */
int fajit__flash_bwd_layouts_exist(const fajit__variant *v);

/* The variants of the three kernels for validated arguments on an arch, in
 * launch order: bwd-pre, bwd, bwd-post; with a->deterministic, bwd-pre,
 * bwd-dkdv, bwd-dq. The main kernels (bwd, bwd-dkdv, bwd-dq) take the
 * features as the forward's variant does: mask and window normalised alike
 * (a right window of 0 becomes the causal mask, windows past every key
 * none), softcap, ALiBi, dropout, varlen. Pre and post depend on head dims,
 * dtype and varlen only (mask none), so calls that differ in the others
 * share them. */
void fajit__flash_bwd_variants(const fajit_attn_bwd_args *a, int arch, fajit__variant out[3]);

/* Scratch bytes a call needs: two fp32 values a query row (lse * log2 e, and
 * D) and, unless deterministic, the fp32 dQ accumulator (dqk rounded up to
 * 16 a row); rows rounded up to 128 per head. 0 when seqlen_q is 0;
 * FAJIT_EINVAL if the size does not fit a size_t. */
int fajit__flash_bwd_scratch_bytes(const struct fajit_bwd_params *p, int dqk, int deterministic_mode,
                                   size_t *bytes);

/*
 * Queues the fast backward for the three variants v (as
 * fajit__flash_bwd_variants makes them; tiles may differ, e.g. when tuning)
 * on `stream` in the current CUDA context (cu_id): the kernels' functions
 * first (compiled or loaded; a failure launches nothing), then the scratch
 * (stream-ordered, cuMemAllocAsync), the three kernels, and the scratch freed
 * on the stream. dK and dV are summed over the query heads of a kv head
 * inside one block (no atomics). dQ: by unordered fp32 atomics (results may
 * differ in the last bits between runs), or in deterministic mode by a
 * second kernel over query blocks that recomputes S and dP (bit-identical
 * runs, about 1.4x the work). With seqlen_q 0, grad_k and grad_v are written
 * as zeros; with seqlen_k 0, grad_q is. p must hold arguments that passed
 * attn_bwd.c's checks and fajit__flash_bwd_refusal. Thread-safe.
 */
int fajit__flash_bwd_launch(fajit_ctx *ctx, const fajit__driver *drv, const fajit__variant v[3],
                            const struct fajit_bwd_params *p, unsigned long long cu_id, void *stream);

/* fajit__flash_bwd_variants for a and arch (as fajit__context_arch gives
 * it), then fajit__flash_bwd_launch: what attn_bwd.c calls. */
int fajit__flash_bwd_run(fajit_ctx *ctx, const fajit__driver *drv, const fajit_attn_bwd_args *a,
                         const struct fajit_bwd_params *p, int arch, unsigned long long cu_id,
                         void *stream);

#endif
