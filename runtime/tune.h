/*
 * runtime/tune.h - autotuning of the fast forward's tiles and split-KV counts
 * and of the fast backward's tiles (runtime/tune.c): tuning record keys, the
 * candidates and their pruning, the problem manifest, the lookup the launch
 * paths use, and the bundle hooks; the split-KV plan (runtime/heuristic.c).
 * Record layout: cache/FORMAT.md; overview: docs/tuning.md.
 */
#ifndef FAJIT_RUNTIME_TUNE_H
#define FAJIT_RUNTIME_TUNE_H

#include <stddef.h>
#include <stdint.h>

#include "runtime/runtime.h"

/* What tuning results are tied to: a record measured on another card, arch,
 * SM count or driver is never used. */
typedef struct fajit__gpu_identity {
    char name[96];      /* cuDeviceGetName, NUL-padded */
    int arch;           /* compute capability major * 10 + minor */
    int sm_count;
    int driver_version; /* cuDriverGetVersion */
} fajit__gpu_identity;

/* The identity of a device, learnt once per device per process. */
int fajit__gpu_identity_get(const fajit__driver *drv, CUdevice dev, fajit__gpu_identity *out);

/* ceil(log2(seqlen_k)) clamped to 6..20: bucket b holds seqlen_k in
 * (2^(b-1), 2^b]; everything up to 64 is bucket 6, above 2^19 bucket 20. */
int fajit__seqlen_bucket(int64_t seqlen_k);

/* ---------------------------------------------------------------- split-KV plan
 *
 * The fast forward spreads few query rows over long keys by splitting each
 * block's keys over `splits` blocks whose partial outputs a second launch
 * merges (runtime/attn.c). The plan is FlashAttention's wave-filling rule
 * (runtime/heuristic.c) unless tuning measured a count for the problem. */
#define FAJIT__MAX_SPLITS 128
#define FAJIT__MIN_SPLIT_TILES 8 /* key tiles a block must have before splitting pays */

typedef struct fajit__fwd_shape {
    int64_t batch, seqlen_q, seqlen_k, nheads_q, nheads_kv;
} fajit__fwd_shape;

/* The heuristic's tiles for a call of shape sh (fields v has set are kept):
 * for the fast forward with few real query rows a block (seqlen_q times the
 * GQA group where the call packs a kv head's query heads into one block, else
 * seqlen_q; at most one warp's 16-row mma tile: decoding) the few-rows rule's,
 * for head dims it covers; else, and for sh NULL, fajit__heuristic_tiles(v).
 * Returns 1 when the few-rows rule chose them: tuning keys its records by
 * that answer (runtime/tune.c), so the launch path and the tuner compare
 * against the same heuristic config. */
int fajit__heuristic_tiles_for(fajit__variant *v, const fajit__fwd_shape *sh);

/* The tiles fajit__heuristic_tiles_for gives v for a call it answered 1 for
 * (where only that answer is known, not the shape: a tuning record's key);
 * fajit__heuristic_tiles(v) for a variant the few-rows rule does not cover. */
void fajit__few_rows_tiles(fajit__variant *v);

typedef struct fajit__split_plan {
    int splits, pack;
    unsigned grid_x, grid_y; /* query blocks (before splitting), heads (kv heads when packed) */
    int max_splits;          /* 0: the rule does not split (too few key tiles, enough blocks
                                already, no SM count, not op fwd); else its bound */
    unsigned blocks;         /* a persistent variant's launch (fajit__fwd_persistent) that
                                neither splits nor packs: the 1-D grid, each block looping
                                over the grid_x * grid_y * batch items; else 0 */
} fajit__split_plan;

/* The plan of a fast-forward launch of v (tiles set) on a device of `sms`
 * SMs: tuned_splits > 0 takes that count (bounded by the key tiles and
 * FAJIT__MAX_SPLITS), else the rule decides. A persistent variant's launch
 * that neither splits nor packs gets `blocks`: the blocks the SMs hold at
 * once (no SM count known: a block an item), at most `persist` when persist
 * > 0, a block an item when it is 0 ($FAJIT_FWD_PERSIST; -1: no bound).
 * Pure: no GPU needed. */
fajit__split_plan fajit__plan_split(const fajit__variant *v, const fajit__fwd_shape *sh, int sms,
                                    int tuned_splits, int persist);

/* The split count the rule gives a problem with the heuristic's tiles: the
 * tuning key's plan_splits, 0 when split-KV does not apply to it (every
 * other op, and most forward problems). Tuned split counts are kept per
 * plan_splits, so a count measured on one problem serves the launches the
 * rule sees alike. */
int fajit__plan_splits(const fajit__variant *heuristic, const fajit__fwd_shape *sh, int sms);

/* The split counts tuning tries with candidate c for a problem whose
 * plan_splits is given: 0 alone (the rule) when it is 0; else 1, 2, 4, 8,
 * 16, 32 and plan_splits itself, those above c's key tiles (seqlen_k / bn)
 * or FAJIT__MAX_SPLITS left out. Returns how many (at most 8), writing up
 * to cap of them. */
size_t fajit__tune_split_counts(const fajit__variant *c, int64_t seqlen_k, int plan_splits, int *out,
                                size_t cap);

/* Queues a fast-forward launch of fn (variant v, params p filled as
 * runtime/attn.c fills them) as plan s says: one grid, or the split grid and
 * its combine over the partials: in workspace when it holds workspace_bytes
 * and they fit, else in stream-ordered scratch (runtime/attn.c). */
struct fajit_fwd_params;
int fajit__fwd_launch_plan(const fajit__driver *drv, CUfunction fn, const fajit__variant *v,
                           struct fajit_fwd_params *p, const fajit__split_plan *s, CUdeviceptr workspace,
                           size_t workspace_bytes, void *stream);

/* ---------------------------------------------------------------- records */

/* A record's choice: the variant with the candidate's tiles and its split
 * count (0: the plan's rule). */
typedef struct fajit__tune_choice {
    fajit__variant v;
    int splits;
} fajit__tune_choice;

/* A record key (with_tiles 1: c's tiles and splits appended) or the prefix
 * every candidate of one problem shares (with_tiles 0: GPU, build, variant
 * without tiles, bucket, plan_splits, few_rows). few_rows: what
 * fajit__heuristic_tiles_for answered for the problem's shape (0 for bwd).
 * Returns the length, or the length needed when cap is too small (buf may
 * be NULL). */
size_t fajit__tuning_key(const fajit__gpu_identity *gpu, const uint8_t build_id[16],
                         const fajit__tune_choice *c, int bucket, int plan_splits, int few_rows,
                         int with_tiles, uint8_t *buf, size_t cap);

/* Inverse of fajit__tuning_key (with tiles): 0, or FAJIT_ECORRUPT with a
 * detail (keys of another format version included). c->v is the full
 * candidate variant. */
int fajit__tuning_key_decode(const uint8_t *key, size_t len, fajit__gpu_identity *gpu,
                             uint8_t build_id[16], fajit__tune_choice *c, int *bucket,
                             int *plan_splits, int *few_rows);

/* The tuned choice for v (op fwd or bwd; its tile fields are ignored) on gpu
 * in seqlen_bucket, plan_splits and few_rows: *out = v with the tiles and
 * split count of the record with the lowest median, the heuristic's config
 * (its tiles for few_rows, splits == plan_splits) preferred unless another
 * is at least 3% faster.
 * FAJIT_ENOTFOUND (no detail recorded: this is the common case) when nothing
 * was tuned for that key, the op is neither or the cache is off. The answer,
 * found or not, is remembered per (cache directory, key) for the process, so
 * after the first call for a key the store is not read again. */
int fajit__tuned_tiles(fajit_ctx *ctx, const fajit__variant *v, int seqlen_bucket, int plan_splits,
                       int few_rows, const fajit__gpu_identity *gpu, fajit__tune_choice *out);

/* Forgets the remembered answers (tuning stored or cleared records, records
 * were imported, or a context was destroyed). */
void fajit__tuned_forget(void);

/* The launch path's tiles: v (full, op fwd or bwd, tiles by the heuristic)
 * takes the tuned tiles for the device `dev`, seqlen_k's bucket,
 * plan_splits and few_rows (fajit__heuristic_tiles_for's answer; both 0 for
 * bwd) when the store has a record, else keeps the heuristic's; *splits
 * (may be NULL) gets the tuned split count, 0 for the rule. Returns 1 if a
 * record was found. Never fails (no record, no GPU
 * identity or no store all mean the heuristic); a repeat of the thread's
 * last lookup of the same op costs a compare. */
int fajit__launch_tiles(fajit_ctx *ctx, const fajit__driver *drv, CUdevice dev, int64_t seqlen_k,
                        int plan_splits, int few_rows, fajit__variant *v, int *splits);

/* The candidates tuning tries for v: op fwd, bm {64, 128} x bn {32, 64,
 * 128} x warps {4, 8} x stages {1, 2, 3}; op bwd (the fast backward's main
 * kernel), bm {32, 64, 128} x bn {64, 128} x warps {4, 8} x stages {1, 2};
 * minus those the static rules refuse (fajit__tune_static_refusal). Writes
 * up to cap of them to out (may be NULL) and returns how many there are. */
size_t fajit__tune_candidates(const fajit__variant *v, fajit__variant *out, size_t cap);

/* Why a full fwd or bwd variant is not worth compiling, into buf
 * (NUL-terminated); NULL if it is. Mirrors the rules of the template
 * (templates/flash_fwd.cuh: head dims, bm a multiple of 16 * warps, bn of 16,
 * stages 1..3; templates/flash_bwd.cuh: head dims multiples of 8, bm 32..128,
 * stages 1..2, its warp layouts), the arch's opt-in shared memory, and an
 * upper bound on the accumulator registers. */
const char *fajit__tune_static_refusal(const fajit__variant *v, char *buf, size_t cap);

/* Why a compiled candidate is refused by its ptxas report (spills, or
 * registers x threads past the 64K-register file); NULL if kept. */
const char *fajit__tune_compiled_refusal(const fajit__variant *v, const fajit__entry_meta *m,
                                         char *buf, size_t cap);

/* ---------------------------------------------------------------- problems */

#define FAJIT__TUNE_LINE_MAX 512

typedef struct fajit__tune_problem {
    fajit__variant v; /* op fwd or bwd, tiles and arch FAJIT__UNSET */
    int64_t batch, seqlen_q, seqlen_k, nheads_q, nheads_kv;
    int line;
    char text[FAJIT__TUNE_LINE_MAX]; /* the line, words separated by single spaces */
} fajit__tune_problem;

/* The tuner's heuristic config for problem p (arch set): p->v with the
 * tiles fajit_attn_fwd (or fajit_attn_bwd) launches untuned for its shape,
 * into *out. Returns few_rows (fajit__heuristic_tiles_for), the problem's
 * class in the record keys. */
int fajit__tune_heuristic(const fajit__tune_problem *p, fajit__variant *out);

/* Parses a problem manifest (syntax in fajit.h, fajit_tune_options), or the
 * benchmark grid (forward and backward problems) for text NULL. *out is malloc'd. FAJIT_EPARSE with
 * "line N: word 'w': why" on a bad line. */
int fajit__tune_parse_problems(const char *text, fajit__tune_problem **out, size_t *n);

/* ---------------------------------------------------------------- bundles (runtime/api.c) */

/* The store's valid tuning records, copied out for a bundle. */
typedef struct fajit__tuning_set {
    size_t n, cap;
    uint8_t **keys;
    size_t *key_lens;
    uint8_t **values;
    size_t *value_lens;
} fajit__tuning_set;

int fajit__tuning_collect(fajit_ctx *ctx, fajit__tuning_set *set);
void fajit__tuning_set_free(fajit__tuning_set *set);

/* Every tuning record of a parsed bundle decodes under its key: 0, or
 * FAJIT_ECORRUPT with *why and *bad_index. Nothing recorded with fajit__fail. */
int fajit__tuning_bundle_check(const fajit__bundle_view *b, const char **why, size_t *bad_index);

/* Merges a checked bundle's tuning records in one write; *merged counts them. */
int fajit__tuning_bundle_merge(fajit_ctx *ctx, const fajit__bundle_view *b, uint64_t *merged);

#endif
