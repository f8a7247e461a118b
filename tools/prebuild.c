/*
 * tools/prebuild.c - `fajit prebuild` / `fajit-prebuild`: expand a manifest,
 * compile what the cache lacks on N threads, report progress and a summary.
 *
 * The library does the hard parts (expansion, completion, the compile-once
 * lock, the store); this file only schedules fajit_compile calls and reports.
 */
#include "cli.h"

#include <errno.h>
#include <inttypes.h>
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#define MAX_JOBS 1024

typedef struct pb_options {
    const char *manifest; /* path, "-" for stdin, NULL for the embedded default */
    int jobs;             /* 0: the online cores */
    int dry_run, json;
    int from_tuning;      /* the tuning records' winners instead of a manifest */
    int warmup, repeat;   /* tune only; -1: the library's defaults */
} pb_options;

/* ---------------------------------------------------------------- the variant list */

/* Expanded variants in manifest order, deduplicated through an open-addressing
 * set of indices (a manifest of every head dim has thousands of lines, too many
 * for a quadratic scan to be pleasant). */
typedef struct pb_list {
    char **items;
    size_t n, cap;
    size_t *slots; /* index + 1, 0 = empty */
    size_t nslots; /* power of two, > 2 n */
} pb_list;

static uint64_t text_hash(const char *s)
{
    uint64_t h = 1469598103934665603ull; /* FNV-1a */
    for (; *s; s++)
        h = (h ^ (unsigned char)*s) * 1099511628211ull;
    return h;
}

/* Slot holding text, or the empty slot where it belongs. */
static size_t *list_slot(pb_list *l, const char *text)
{
    size_t mask = l->nslots - 1;
    for (size_t i = text_hash(text) & mask;; i = (i + 1) & mask) {
        size_t *slot = &l->slots[i];
        if (*slot == 0 || strcmp(l->items[*slot - 1], text) == 0)
            return slot;
    }
}

static int list_grow_set(pb_list *l)
{
    size_t nslots = l->nslots ? l->nslots * 2 : 64;
    size_t *slots = calloc(nslots, sizeof *slots);
    if (!slots)
        return -1;
    free(l->slots);
    l->slots = slots;
    l->nslots = nslots;
    for (size_t i = 0; i < l->n; i++)
        *list_slot(l, l->items[i]) = i + 1;
    return 0;
}

/* Appends text unless already present. 0, or -1 out of memory. */
static int list_add(pb_list *l, const char *text)
{
    if (2 * (l->n + 1) >= l->nslots && list_grow_set(l) != 0)
        return -1;
    size_t *slot = list_slot(l, text);
    if (*slot)
        return 0;
    if (l->n == l->cap) {
        size_t cap = l->cap ? l->cap * 2 : 64;
        char **items = realloc(l->items, cap * sizeof *items);
        if (!items)
            return -1;
        l->items = items;
        l->cap = cap;
    }
    if (!(l->items[l->n] = strdup(text)))
        return -1;
    *slot = ++l->n;
    return 0;
}

static void list_free(pb_list *l)
{
    for (size_t i = 0; i < l->n; i++)
        free(l->items[i]);
    free(l->items);
    free(l->slots);
}

static int collect_variant(void *user, const char *variant)
{
    return list_add(user, variant) == 0 ? 0 : FAJIT_ENOMEM;
}

/* The variant calls use for each tuned problem of this build. */
static int collect_winner(void *user, const fajit_tuning_record *r)
{
    if (!r->best || !r->current_build)
        return 0;
    return list_add(user, r->variant) == 0 ? 0 : FAJIT_ENOMEM;
}

/* ---------------------------------------------------------------- reading the manifest */

static char *read_stream(FILE *f)
{
    size_t n = 0, cap = 4096;
    char *buf = malloc(cap);
    while (buf) {
        n += fread(buf + n, 1, cap - n - 1, f);
        if (ferror(f) || feof(f))
            break;
        char *bigger = realloc(buf, cap * 2);
        if (!bigger) {
            free(buf);
            return NULL;
        }
        buf = bigger;
        cap *= 2;
    }
    if (!buf || ferror(f)) {
        free(buf);
        return NULL;
    }
    buf[n] = '\0';
    return buf;
}

/* The manifest text (malloc'd), or NULL after printing why. */
static char *load_manifest(const fajit__cli_global *g, const char *path)
{
    if (!path)
        return strdup((const char *)fajit_tool_default_manifest);
    if (strcmp(path, "-") == 0) {
        char *text = read_stream(stdin);
        if (!text)
            fprintf(stderr, "%s: cannot read the manifest from stdin: %s\n", g->prog,
                    strerror(errno));
        return text;
    }
    FILE *f = fopen(path, "r");
    if (!f) {
        fprintf(stderr, "%s: cannot open manifest %s: %s\n", g->prog, path, strerror(errno));
        return NULL;
    }
    char *text = read_stream(f);
    if (!text)
        fprintf(stderr, "%s: cannot read manifest %s: %s\n", g->prog, path, strerror(errno));
    fclose(f);
    return text;
}

/* ---------------------------------------------------------------- compiling */

typedef struct pb_result {
    int status;
    fajit_compile_result res;
    char *error; /* fajit_last_error() of the failing call, malloc'd */
} pb_result;

typedef struct pb_run {
    fajit_ctx *ctx;
    const pb_list *list;
    pb_result *results;
    pthread_mutex_t lock; /* guards everything below and stderr output */
    size_t next, done, compiled, cached, failed;
    int tty;
} pb_run;

static void print_progress_locked(pb_run *r)
{
    int width = snprintf(NULL, 0, "%zu", r->list->n);
    fprintf(stderr, "\r[%*zu/%zu] compiled %zu, cached %zu, failed %zu", width, r->done,
            r->list->n, r->compiled, r->cached, r->failed);
    fflush(stderr);
}

static void report_one_locked(pb_run *r, size_t i)
{
    const pb_result *res = &r->results[i];
    const char *text = r->list->items[i];
    r->done++;
    if (res->status != FAJIT_OK)
        r->failed++;
    else if (res->res.cached)
        r->cached++;
    else
        r->compiled++;
    if (r->tty) {
        if (res->status != FAJIT_OK) /* keep failures visible above the progress line */
            fprintf(stderr, "\r\033[KFAILED    %s\n", text);
        print_progress_locked(r);
    } else if (res->status != FAJIT_OK) {
        fprintf(stderr, "FAILED    %s\n", text);
    } else if (res->res.cached) {
        fprintf(stderr, "cached    %s\n", text);
    } else {
        fprintf(stderr, "compiled  %8.1f ms  %s\n", res->res.compile_ms, text);
    }
}

static void *compile_worker(void *arg)
{
    pb_run *r = arg;
    for (;;) {
        pthread_mutex_lock(&r->lock);
        size_t i = r->next < r->list->n ? r->next++ : r->list->n;
        pthread_mutex_unlock(&r->lock);
        if (i == r->list->n)
            return NULL;
        pb_result *res = &r->results[i];
        memset(&res->res, 0, sizeof res->res);
        res->res.struct_size = sizeof res->res;
        res->status = fajit_compile(r->ctx, r->list->items[i], &res->res);
        if (res->status != FAJIT_OK) /* the detail is thread-local: take it now */
            res->error = strdup(fajit_last_error());
        pthread_mutex_lock(&r->lock);
        report_one_locked(r, i);
        pthread_mutex_unlock(&r->lock);
    }
}

/* Runs the compiles on `jobs` threads (the calling one included). */
static int run_compiles(const fajit__cli_global *g, pb_run *r, int jobs)
{
    pthread_t threads[MAX_JOBS];
    int started = 0;
    for (; started < jobs - 1; started++) {
        int err = pthread_create(&threads[started], NULL, compile_worker, r);
        if (err) { /* fewer threads is slower, not wrong */
            fprintf(stderr, "%s: running on %d threads: %s\n", g->prog, started + 1,
                    strerror(err));
            break;
        }
    }
    compile_worker(r);
    for (int t = 0; t < started; t++)
        pthread_join(threads[t], NULL);
    if (r->tty)
        fputc('\n', stderr);
    return started + 1;
}

/* ---------------------------------------------------------------- reporting */

static double now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

typedef struct pb_summary {
    size_t variants, compiled, cached, failed;
    int threads;
    double wall_s;
    uint64_t cubin_bytes, new_bytes;
} pb_summary;

static void summarise(const pb_run *r, int threads, double wall_s, pb_summary *s)
{
    memset(s, 0, sizeof *s);
    s->variants = r->list->n;
    s->compiled = r->compiled;
    s->cached = r->cached;
    s->failed = r->failed;
    s->threads = threads;
    s->wall_s = wall_s;
    for (size_t i = 0; i < r->list->n; i++) {
        const pb_result *res = &r->results[i];
        if (res->status != FAJIT_OK)
            continue;
        s->cubin_bytes += res->res.cubin_bytes;
        if (!res->res.cached)
            s->new_bytes += res->res.cubin_bytes;
    }
}

static void print_summary_json(const pb_run *r, const pb_summary *s)
{
    printf("{\"variants\":%zu,\"compiled\":%zu,\"cached\":%zu,\"failed\":%zu,\"threads\":%d,"
           "\"wall_s\":",
           s->variants, s->compiled, s->cached, s->failed, s->threads);
    fajit__cli_json_number(stdout, s->wall_s);
    printf(",\"cubin_bytes\":%" PRIu64 ",\"compiled_bytes\":%" PRIu64 ",\"failures\":[",
           s->cubin_bytes, s->new_bytes);
    int first = 1;
    for (size_t i = 0; i < r->list->n; i++) {
        const pb_result *res = &r->results[i];
        if (res->status == FAJIT_OK)
            continue;
        fputs(first ? "\n{\"variant\":" : ",\n{\"variant\":", stdout);
        fajit__cli_json_string(stdout, r->list->items[i]);
        fputs(",\"status\":", stdout);
        fajit__cli_json_string(stdout, fajit_strerror(res->status));
        fputs(",\"error\":", stdout);
        fajit__cli_json_string(stdout, res->error ? res->error : "");
        fputc('}', stdout);
        first = 0;
    }
    fputs(first ? "]}\n" : "\n]}\n", stdout);
}

static void print_summary_text(const pb_summary *s)
{
    printf("prebuild: %zu variant%s on %d thread%s in %.1f s: %zu compiled, %zu already cached, "
           "%zu failed\n",
           s->variants, s->variants == 1 ? "" : "s", s->threads, s->threads == 1 ? "" : "s",
           s->wall_s, s->compiled,
           s->cached, s->failed);
    printf("cubins: %" PRIu64 " bytes, %" PRIu64 " of them compiled now\n", s->cubin_bytes,
           s->new_bytes);
}

/* Names every failed variant with its error (the NVRTC log for a compile error). */
static void print_failures(const fajit__cli_global *g, const pb_run *r)
{
    for (size_t i = 0; i < r->list->n; i++) {
        const pb_result *res = &r->results[i];
        if (res->status == FAJIT_OK)
            continue;
        fprintf(stderr, "%s: FAILED %s: %s", g->prog, r->list->items[i],
                fajit_strerror(res->status));
        if (res->error && res->error[0])
            fprintf(stderr, ": %s", res->error);
        fputc('\n', stderr);
    }
}

/* ---------------------------------------------------------------- the subcommand */

void fajit__cli_prebuild_help(const fajit__cli_global *g, FILE *f)
{
    const char *sub = strcmp(g->prog, "fajit") == 0 ? " prebuild" : "";
    fprintf(f, "usage: %s%s [MANIFEST|-|--from-tuning] [-j N] [--dry-run] [--json]\n\n", g->prog,
            sub);
    fputs("Compiles every variant of a manifest that the cache lacks, so that later\n"
          "runs (or a fleet that ships the cache directory) never compile.\n"
          "\n"
          "  MANIFEST       a manifest file: one spec a line, '#' comments, values may be\n"
          "                 lists (dtype=fp16,bf16) or ranges (dqk=64..256:8); '-' reads\n"
          "                 stdin; none: the default manifest built into the tool\n"
          "                 (installed as share/fajit/default.manifest)\n"
          "  -j, --jobs N   compile on N threads (default: the online cores)\n"
          "  --from-tuning  the winners of the cache's tuning records (fajit tune) instead\n"
          "                 of a manifest\n"
          "  --dry-run      list the expanded variants and compile nothing\n"
          "  --json         print the summary (or, with --dry-run, the list) as JSON\n"
          "\n"
          "Progress goes to stderr: one updating line on a terminal, else one line per\n"
          "variant ('compiled  12.3 ms  VARIANT', 'cached    VARIANT', 'FAILED    VARIANT').\n"
          "The summary goes to stdout. Exit 1 if any variant failed; each is named with\n"
          "its error, which for a compile error carries the NVRTC log. Exit 2 if the\n"
          "manifest cannot be read or has a bad line (the message names the line).\n",
          f);
}

static int parse_jobs(const fajit__cli_global *g, const char *s, int *jobs)
{
    char *end;
    errno = 0;
    long n = strtol(s, &end, 10);
    if (errno || end == s || *end || n < 1 || n > MAX_JOBS)
        return fajit__cli_usage_error(g, "prebuild: -j %s: must be a number 1..%d", s, MAX_JOBS);
    *jobs = (int)n;
    return -1;
}

/* Returns -1 to go on, else an exit code (--help: 0). */
static int parse_prebuild_args(const fajit__cli_global *g, int argc, char **argv, pb_options *o)
{
    int positional = 0, only_positional = 0, rc;
    memset(o, 0, sizeof *o);
    for (int i = 1; i < argc; i++) {
        const char *w = argv[i];
        if (only_positional || w[0] != '-' || w[1] == '\0') {
            if (positional++)
                return fajit__cli_usage_error(g, "prebuild: give at most one MANIFEST");
            o->manifest = w;
        } else if (!strcmp(w, "--")) {
            only_positional = 1;
        } else if (!strcmp(w, "-h") || !strcmp(w, "--help")) {
            fajit__cli_prebuild_help(g, stdout);
            fputc('\n', stdout);
            fajit__cli_common_help(stdout);
            return FAJIT_EXIT_OK;
        } else if (!strcmp(w, "--dry-run")) {
            o->dry_run = 1;
        } else if (!strcmp(w, "--from-tuning")) {
            o->from_tuning = 1;
        } else if (!strcmp(w, "--json")) {
            o->json = 1;
        } else if (!strcmp(w, "-j") || !strcmp(w, "--jobs")) {
            if (i + 1 >= argc)
                return fajit__cli_usage_error(g, "prebuild: %s needs a value", w);
            if ((rc = parse_jobs(g, argv[++i], &o->jobs)) >= 0)
                return rc;
        } else if (!strncmp(w, "-j", 2) || !strncmp(w, "--jobs=", 7)) {
            if ((rc = parse_jobs(g, w[1] == 'j' ? w + 2 : w + 7, &o->jobs)) >= 0)
                return rc;
        } else {
            return fajit__cli_usage_error(g, "prebuild: unknown option '%s'", w);
        }
    }
    if (o->from_tuning && o->manifest)
        return fajit__cli_usage_error(g, "prebuild: give a MANIFEST or --from-tuning, not both");
    return -1;
}

static void print_dry_run(const pb_list *l, int json)
{
    if (json)
        fputc('[', stdout);
    for (size_t i = 0; i < l->n; i++) {
        if (json) {
            fputs(i ? ",\n" : "\n", stdout);
            fajit__cli_json_string(stdout, l->items[i]);
        } else {
            printf("%s\n", l->items[i]);
        }
    }
    if (json)
        fputs(l->n ? "\n]\n" : "]\n", stdout);
}

static int default_jobs(void)
{
    long cores = sysconf(_SC_NPROCESSORS_ONLN);
    if (cores < 1)
        cores = 1;
    if (cores > MAX_JOBS)
        cores = MAX_JOBS;
    return (int)cores;
}

static int clamp_jobs(int jobs, size_t variants)
{
    if (jobs < 1)
        jobs = default_jobs();
    if (variants > 0 && (size_t)jobs > variants)
        jobs = (int)variants;
    return jobs < 1 ? 1 : jobs;
}

/* A read-only or disabled cache keeps nothing: say so, since it is likely a slip. */
static void warn_if_nothing_kept(const fajit__cli_global *g, fajit_ctx *ctx)
{
    fajit_info in;
    memset(&in, 0, sizeof in);
    in.struct_size = sizeof in;
    if (fajit_get_info(ctx, &in) != FAJIT_OK || in.cache_mode == FAJIT_CACHE_READWRITE)
        return;
    fprintf(stderr, "%s: the cache is %s: variants are compiled but not stored\n", g->prog,
            in.cache_mode == FAJIT_CACHE_OFF ? "off" : "read-only");
}

static int compile_all(const fajit__cli_global *g, fajit_ctx *ctx, const pb_list *list,
                       const pb_options *o)
{
    pb_run r;
    memset(&r, 0, sizeof r);
    r.ctx = ctx;
    r.list = list;
    r.tty = isatty(STDERR_FILENO);
    r.results = calloc(list->n ? list->n : 1, sizeof *r.results);
    if (!r.results) {
        fprintf(stderr, "%s: out of memory\n", g->prog);
        return FAJIT_EXIT_FAILED;
    }
    pthread_mutex_init(&r.lock, NULL);
    warn_if_nothing_kept(g, ctx);
    double t0 = now_s();
    int threads = run_compiles(g, &r, clamp_jobs(o->jobs, list->n));
    pb_summary s;
    summarise(&r, threads, now_s() - t0, &s);
    if (o->json)
        print_summary_json(&r, &s);
    else
        print_summary_text(&s);
    print_failures(g, &r);
    for (size_t i = 0; i < list->n; i++)
        free(r.results[i].error);
    free(r.results);
    pthread_mutex_destroy(&r.lock);
    return s.failed ? FAJIT_EXIT_FAILED : FAJIT_EXIT_OK;
}

int fajit__cli_prebuild(const fajit__cli_global *g, int argc, char **argv)
{
    pb_options o;
    pb_list list;
    int rc = parse_prebuild_args(g, argc, argv, &o);
    if (rc >= 0)
        return rc;
    char *manifest = o.from_tuning ? strdup("") : load_manifest(g, o.manifest);
    if (!manifest)
        return FAJIT_EXIT_USAGE;
    fajit_ctx *ctx = fajit__cli_open(g, &rc);
    if (!ctx)
        goto free_manifest;
    memset(&list, 0, sizeof list);
    int st = o.from_tuning ? fajit_tuning_list(ctx, collect_winner, &list)
                           : fajit_manifest_expand(ctx, manifest, collect_variant, &list);
    if (st != FAJIT_OK) {
        rc = fajit__cli_report(g, o.from_tuning ? "tuning records"
                                  : o.manifest ? o.manifest : "default manifest", st);
        goto free_list;
    }
    if (o.dry_run) {
        print_dry_run(&list, o.json);
        rc = FAJIT_EXIT_OK;
    } else {
        rc = compile_all(g, ctx, &list, &o);
    }
free_list:
    list_free(&list);
    fajit_destroy(ctx);
free_manifest:
    free(manifest);
    if (fflush(stdout) != 0 && rc == FAJIT_EXIT_OK)
        rc = FAJIT_EXIT_FAILED;
    return rc;
}

/* ---------------------------------------------------------------- fajit tune */

void fajit__cli_tune_help(const fajit__cli_global *g, FILE *f)
{
    fprintf(f, "usage: %s tune [MANIFEST|-] [-j N] [--warmup N] [--repeat N] [--json]\n\n",
            g->prog);
    fputs("Times tile candidates (bm, bn, warps, stages) of the fast forward and of the\n"
          "fast backward's main kernel on this GPU for each problem, and split-KV counts\n"
          "for forward problems the built-in rule would split (decoding), and keeps\n"
          "every timing in the cache; later calls of the same variant, sequence-length\n"
          "bucket (and rule's split count) use the fastest. Candidates are pruned by\n"
          "the template's rules, shared memory and the ptxas report, compiled on N\n"
          "threads (into the kernel cache), checked against the heuristic config's\n"
          "output, then timed with CUDA events.\n"
          "\n"
          "  MANIFEST       problems, one a line: a fwd or bwd spec plus shape words, e.g.\n"
          "                   fwd dqk=128 dtype=fp16 mask=causal batch=4 seqlen=4096 nheads=16\n"
          "                   bwd dqk=128 dtype=bf16 mask=causal batch=4 seqlen=4096 nheads=16\n"
          "                   fwd dqk=128 dtype=bf16 seqlen_q=1 seqlen_k=65536 nheads_q=32 nheads_kv=8\n"
          "                 (seqlen_q/seqlen_k, nheads_q/nheads_kv separately; batch\n"
          "                 defaults to 1); '-' reads stdin; none: FlashAttention's\n"
          "                 benchmark grid, forward and backward (d 64/128/256, seqlen\n"
          "                 512..16k, fp16/bf16, causal and not: 144 problems)\n"
          "  -j, --jobs N   compile on N threads (default: the online cores)\n"
          "  --warmup N     launches before timing a candidate (default 3)\n"
          "  --repeat N     timed launches, the median is kept (default 10)\n"
          "  --json         winners as a JSON array on stdout\n"
          "\n"
          "Progress goes to stderr, one line per event; winners to stdout (with\n"
          "splits=N where a split count was tuned). Exit 4 when there is no GPU:\n"
          "candidates were pruned and compiled (the cache is warm) but nothing was\n"
          "timed.\n",
          f);
}

static int parse_count_arg(const fajit__cli_global *g, const char *name, const char *s, int lo,
                           int hi, int *out)
{
    char *end;
    errno = 0;
    long n = strtol(s, &end, 10);
    if (errno || end == s || *end || n < lo || n > hi)
        return fajit__cli_usage_error(g, "tune: %s %s: must be a number %d..%d", name, s, lo, hi);
    *out = (int)n;
    return -1;
}

/* Returns -1 to go on, else an exit code. */
static int parse_tune_args(const fajit__cli_global *g, int argc, char **argv, pb_options *o)
{
    int rc;
    memset(o, 0, sizeof *o);
    o->warmup = o->repeat = -1;
    for (int i = 1; i < argc; i++) {
        const char *w = argv[i];
        if (w[0] != '-' || w[1] == '\0') {
            if (o->manifest)
                return fajit__cli_usage_error(g, "tune: give at most one MANIFEST");
            o->manifest = w;
        } else if (!strcmp(w, "-h") || !strcmp(w, "--help")) {
            fajit__cli_tune_help(g, stdout);
            fputc('\n', stdout);
            fajit__cli_common_help(stdout);
            return FAJIT_EXIT_OK;
        } else if (!strcmp(w, "--json")) {
            o->json = 1;
        } else if (i + 1 < argc && (!strcmp(w, "-j") || !strcmp(w, "--jobs"))) {
            if ((rc = parse_count_arg(g, w, argv[++i], 1, MAX_JOBS, &o->jobs)) >= 0)
                return rc;
        } else if (i + 1 < argc && !strcmp(w, "--warmup")) {
            if ((rc = parse_count_arg(g, w, argv[++i], 0, 1000, &o->warmup)) >= 0)
                return rc;
        } else if (i + 1 < argc && !strcmp(w, "--repeat")) {
            if ((rc = parse_count_arg(g, w, argv[++i], 1, 1000, &o->repeat)) >= 0)
                return rc;
        } else {
            return fajit__cli_usage_error(g, "tune: unknown option or missing value '%s'", w);
        }
    }
    return -1;
}

typedef struct tune_cli {
    int json;
    size_t winners;
} tune_cli;

static void print_winner(tune_cli *t, const fajit_tune_event *ev)
{
    double gain = ev->median_us > 0 ? ev->heuristic_us / ev->median_us - 1.0 : 0;
    if (t->json) {
        fputs(t->winners ? ",\n{\"problem\":" : "\n{\"problem\":", stdout);
        fajit__cli_json_string(stdout, ev->problem);
        fputs(",\"variant\":", stdout);
        fajit__cli_json_string(stdout, ev->variant);
        fputs(",\"median_us\":", stdout);
        fajit__cli_json_number(stdout, ev->median_us);
        fputs(",\"heuristic_us\":", stdout);
        fajit__cli_json_number(stdout, ev->heuristic_us);
        printf(",\"splits\":%d}", ev->splits);
    } else {
        char split[32] = "";
        if (ev->splits > 0)
            snprintf(split, sizeof split, " splits=%d", ev->splits);
        printf("%s\n  -> %s%s\n     %.2f us (heuristic %.2f us, %+.1f%%)\n", ev->problem,
               ev->variant, split, ev->median_us, ev->heuristic_us, 100.0 * gain);
    }
    fflush(stdout);
    t->winners++;
}

/* " splits=N" for a tuned split count, else "". */
static const char *splits_word(int splits, char *buf, size_t cap)
{
    buf[0] = '\0';
    if (splits > 0)
        snprintf(buf, cap, " splits=%d", splits);
    return buf;
}

static void tune_progress(void *user, const fajit_tune_event *ev)
{
    char word[32];
    switch (ev->kind) {
    case FAJIT_TUNE_PRUNED:
        fprintf(stderr, "[%zu/%zu] pruned    %s: %s\n", ev->done, ev->total, ev->variant,
                ev->why);
        break;
    case FAJIT_TUNE_COMPILED:
        fprintf(stderr, "[%zu/%zu] compiled  %s\n", ev->done, ev->total, ev->variant);
        break;
    case FAJIT_TUNE_REJECTED:
        fprintf(stderr, "rejected  %s%s: %s\n", ev->variant, splits_word(ev->splits, word, sizeof word),
                ev->why);
        break;
    case FAJIT_TUNE_TIMED:
        fprintf(stderr, "timed     %9.2f us  %s%s\n", ev->median_us, ev->variant,
                splits_word(ev->splits, word, sizeof word));
        break;
    case FAJIT_TUNE_WINNER:
        fprintf(stderr, "[%zu/%zu] problem done: %s\n", ev->done, ev->total, ev->problem);
        print_winner(user, ev);
        break;
    default:
        break;
    }
}

static int run_tune(const fajit__cli_global *g, fajit_ctx *ctx, const pb_options *o,
                    const char *problems)
{
    fajit_tune_options opt;
    fajit_tune_result res;
    tune_cli t = {o->json, 0};
    fajit_tune_options_init(&opt);
    opt.problems = problems;
    opt.threads = o->jobs;
    if (o->warmup >= 0)
        opt.warmup = o->warmup;
    if (o->repeat >= 0)
        opt.repeat = o->repeat;
    opt.progress = tune_progress;
    opt.progress_user = &t;
    memset(&res, 0, sizeof res);
    res.struct_size = sizeof res;
    if (o->json)
        fputc('[', stdout);
    int st = fajit_tune(ctx, &opt, &res);
    if (o->json)
        fputs(t.winners ? "\n]\n" : "]\n", stdout);
    if (res.problems)
        fprintf(stderr, "tune: %" PRIu64 " problems, %" PRIu64 " candidates, %" PRIu64 " pruned, %"
            PRIu64 " compiled in %.1f s, %" PRIu64 " rejected, %" PRIu64 " timed in %.1f s, %"
            PRIu64 " improved on the heuristic\n", res.problems, res.candidates, res.pruned,
            res.compiled, res.compile_s, res.rejected, res.timed, res.timing_s, res.improved);
    if (st == FAJIT_ENOGPU) {
        fajit__cli_report(g, "tune", st);
        return FAJIT_EXIT_NOGPU;
    }
    return st == FAJIT_OK ? FAJIT_EXIT_OK : fajit__cli_report(g, "tune", st);
}

int fajit__cli_tune(const fajit__cli_global *g, int argc, char **argv)
{
    pb_options o;
    int rc = parse_tune_args(g, argc, argv, &o);
    if (rc >= 0)
        return rc;
    char *problems = o.manifest ? load_manifest(g, o.manifest) : NULL;
    if (o.manifest && !problems)
        return FAJIT_EXIT_USAGE;
    fajit_ctx *ctx = fajit__cli_open(g, &rc);
    if (ctx) {
        rc = run_tune(g, ctx, &o, problems);
        fajit_destroy(ctx);
    }
    free(problems);
    if (fflush(stdout) != 0 && rc == FAJIT_EXIT_OK)
        rc = FAJIT_EXIT_FAILED;
    return rc;
}
