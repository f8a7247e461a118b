/*
 * tools/cli.c - `fajit`: option parsing, the cache subcommands, JSON output.
 *
 * A thin client of include/fajit.h: every subcommand is one or two public calls
 * plus formatting. Listings go to stdout (text or, with --json, one JSON value);
 * errors and progress go to stderr, so `--json` output always parses.
 */
#include "cli.h"

#include <ctype.h>
#include <inttypes.h>
#include <stdarg.h>
#include <stdlib.h>
#include <string.h>

/* ---------------------------------------------------------------- shared helpers */

int fajit__cli_exit_code(int status)
{
    switch (status) {
    case FAJIT_OK:
        return FAJIT_EXIT_OK;
    case FAJIT_EPARSE:
    case FAJIT_EINVAL:
    case FAJIT_EAMBIGUOUS: /* the user must type more of the key */
        return FAJIT_EXIT_USAGE;
    case FAJIT_ENOTFOUND:
        return FAJIT_EXIT_NOTFOUND;
    default:
        return FAJIT_EXIT_FAILED;
    }
}

int fajit__cli_report(const fajit__cli_global *g, const char *what, int status)
{
    const char *detail = fajit_last_error();
    if (detail && detail[0])
        fprintf(stderr, "%s: %s: %s: %s\n", g->prog, what, fajit_strerror(status), detail);
    else
        fprintf(stderr, "%s: %s: %s\n", g->prog, what, fajit_strerror(status));
    return fajit__cli_exit_code(status);
}

int fajit__cli_usage_error(const fajit__cli_global *g, const char *fmt, ...)
{
    va_list ap;
    fprintf(stderr, "%s: ", g->prog);
    va_start(ap, fmt);
    vfprintf(stderr, fmt, ap);
    va_end(ap);
    fprintf(stderr, " (try '%s --help')\n", g->prog);
    return FAJIT_EXIT_USAGE;
}

void fajit__cli_json_string(FILE *f, const char *s)
{
    if (!s) {
        fputs("null", f);
        return;
    }
    fputc('"', f);
    for (const unsigned char *p = (const unsigned char *)s; *p; p++) {
        switch (*p) {
        case '"': fputs("\\\"", f); break;
        case '\\': fputs("\\\\", f); break;
        case '\n': fputs("\\n", f); break;
        case '\r': fputs("\\r", f); break;
        case '\t': fputs("\\t", f); break;
        case '\b': fputs("\\b", f); break;
        case '\f': fputs("\\f", f); break;
        default:
            if (*p < 0x20)
                fprintf(f, "\\u%04x", *p);
            else
                fputc(*p, f); /* UTF-8 passes through unchanged */
        }
    }
    fputc('"', f);
}

void fajit__cli_json_number(FILE *f, double x)
{
    if (x != x || x > 1e300 || x < -1e300)
        fputs("null", f);
    else
        fprintf(f, "%.3f", x);
}

fajit_ctx *fajit__cli_open(const fajit__cli_global *g, int *exit_code)
{
    fajit_options opt;
    fajit_ctx *ctx = NULL;
    fajit_options_init(&opt);
    opt.cache_dir = g->cache_dir;
    opt.cache_mode = g->cache_mode;
    if (g->verbose)
        opt.log_level = FAJIT_LOG_INFO;
    int st = fajit_create(&ctx, &opt);
    if (st != FAJIT_OK) { /* EINVAL here is a bad FAJIT_* variable: exit 2 */
        *exit_code = fajit__cli_report(g, "cannot create a context", st);
        return NULL;
    }
    return ctx;
}

static const char *cache_mode_name(int mode)
{
    switch (mode) {
    case FAJIT_CACHE_READWRITE: return "rw";
    case FAJIT_CACHE_READONLY: return "ro";
    case FAJIT_CACHE_OFF: return "off";
    default: return "default";
    }
}

/* "6+ hex digits": what fajit_cache_find takes as a key rather than a spec. */
static int looks_like_key(const char *s)
{
    size_t n = strlen(s);
    if (n < 6 || n > 32)
        return 0;
    for (size_t i = 0; i < n; i++)
        if (!isxdigit((unsigned char)s[i]))
            return 0;
    return 1;
}

/* ---------------------------------------------------------------- arguments */

enum {
    ARG_JSON = 1u << 0,
    ARG_ALL = 1u << 1,
    ARG_FIX = 1u << 2,
    ARG_TUNING = 1u << 3
};

#define MAX_ARG_TEXT 4096

typedef struct cli_args {
    unsigned flags;          /* ARG_* given */
    int npos;                /* positional arguments */
    char pos[MAX_ARG_TEXT];  /* positionals joined by single spaces: a spec may be
                                typed unquoted, `fajit variant ref dqk=72` */
} cli_args;

typedef struct cli_cmd {
    const char *name;
    int (*run)(const fajit__cli_global *g, fajit_ctx *ctx, const cli_args *a);
    unsigned allowed;     /* ARG_* accepted */
    int min_pos, max_pos; /* positional words; max -1: any number (joined) */
    const char *usage;
    const char *summary;
    const char *details;
} cli_cmd;

/* ---------------------------------------------------------------- entries */

static void print_entry_json(FILE *f, const fajit_entry_info *e)
{
    fputs("{\"key\":", f);
    fajit__cli_json_string(f, e->key_hex);
    fputs(",\"variant\":", f);
    fajit__cli_json_string(f, e->variant);
    fputs(",\"arch\":", f);
    fajit__cli_json_string(f, e->arch);
    fprintf(f, ",\"current_build\":%s,\"valid\":%s", e->current_build ? "true" : "false",
            e->valid ? "true" : "false");
    fprintf(f, ",\"cubin_bytes\":%" PRIu64 ",\"entry_bytes\":%" PRIu64, e->cubin_bytes,
            e->entry_bytes);
    fprintf(f, ",\"registers\":%d,\"smem_bytes\":%d,\"spill_bytes\":%d", e->registers,
            e->smem_bytes, e->spill_bytes);
    fputs(",\"compile_ms\":", f);
    fajit__cli_json_number(f, e->compile_ms);
    fprintf(f, ",\"nvrtc_version\":\"%u.%u\"", e->nvrtc_version / 1000,
            (e->nvrtc_version % 1000) / 10);
    fputs(",\"problem\":", f);
    fajit__cli_json_string(f, e->problem);
    fputc('}', f);
}

/* Why an entry stands out in a listing, "" for a good entry of this build. */
static void entry_note(const fajit_entry_info *e, char *buf, size_t cap)
{
    buf[0] = '\0';
    if (!e->valid)
        snprintf(buf, cap, "  [bad: %s]", e->problem);
    else if (!e->current_build)
        snprintf(buf, cap, "  [other build]");
}

typedef struct ls_state {
    int json, all;
    uint64_t shown, hidden;
} ls_state;

static int ls_row(void *user, const fajit_entry_info *e)
{
    ls_state *st = user;
    char note[192];
    if (!st->all && !e->current_build) {
        st->hidden++;
        return 0;
    }
    if (st->json) {
        fputs(st->shown ? ",\n" : "\n", stdout);
        print_entry_json(stdout, e);
    } else {
        entry_note(e, note, sizeof note);
        printf("%.12s  %-6s %9" PRIu64 " %4d %6d %6d %9.1f  %s%s\n", e->key_hex, e->arch,
               e->cubin_bytes, e->registers, e->smem_bytes, e->spill_bytes, e->compile_ms,
               e->variant, note);
    }
    st->shown++;
    return 0;
}

static int tuning_row(void *user, const fajit_tuning_record *r)
{
    ls_state *st = user;
    if (!st->all && !r->current_build) {
        st->hidden++;
        return 0;
    }
    if (st->json) {
        fputs(st->shown ? ",\n{\"gpu\":" : "\n{\"gpu\":", stdout);
        fajit__cli_json_string(stdout, r->gpu_name);
        printf(",\"arch\":\"%s\",\"sm_count\":%d,\"driver_version\":%d,\"variant\":",
               r->gpu_arch, r->sm_count, r->driver_version);
        fajit__cli_json_string(stdout, r->variant);
        printf(",\"seqlen_bucket\":%d,\"bm\":%d,\"bn\":%d,\"warps\":%d,\"stages\":%d,"
               "\"splits\":%d,\"plan_splits\":%d,\"few_rows\":%s,\"median_us\":", r->seqlen_bucket,
               r->bm, r->bn, r->warps, r->stages, r->splits, r->plan_splits,
               r->few_rows ? "true" : "false");
        fajit__cli_json_number(stdout, r->median_us);
        printf(",\"samples\":%u,\"best\":%s,\"current_build\":%s}", r->samples,
               r->best ? "true" : "false", r->current_build ? "true" : "false");
    } else {
        char split[24] = "-"; /* the rule's, where split-KV does not apply */
        if (r->plan_splits > 0)
            snprintf(split, sizeof split, "%d/%d", r->splits, r->plan_splits);
        printf("%-24.24s %-6s %4d  %-8lld %3d/%-3d/%d/%d %-7s %10.2f %s %s%s%s\n", r->gpu_name,
               r->gpu_arch, r->sm_count, 1LL << r->seqlen_bucket, r->bm, r->bn, r->warps,
               r->stages, split, r->median_us, r->best ? "*" : " ", r->variant,
               r->few_rows ? "  [few rows]" : "", r->current_build ? "" : "  [other build]");
    }
    st->shown++;
    return 0;
}

static int cmd_ls_tuning(const fajit__cli_global *g, fajit_ctx *ctx, ls_state *st)
{
    if (st->json)
        fputc('[', stdout);
    else
        printf("%-24s %-6s %4s  %-8s %-13s %-7s %10s %s %s\n", "GPU", "ARCH", "SMS", "SEQ<=",
               "BM/BN/W/S", "SPLITS", "MEDIAN_US", "B", "VARIANT");
    int rc = fajit_tuning_list(ctx, tuning_row, st);
    if (st->json)
        fputs(st->shown ? "\n]\n" : "]\n", stdout);
    if (rc != FAJIT_OK)
        return fajit__cli_report(g, "ls --tuning", rc);
    if (st->hidden)
        fprintf(stderr, "%s: %" PRIu64 " tuning records of other builds not shown (ls --tuning "
                "--all shows them)\n", g->prog, st->hidden);
    return FAJIT_EXIT_OK;
}

static int cmd_ls(const fajit__cli_global *g, fajit_ctx *ctx, const cli_args *a)
{
    ls_state st = {.json = !!(a->flags & ARG_JSON), .all = !!(a->flags & ARG_ALL)};
    if (a->flags & ARG_TUNING)
        return cmd_ls_tuning(g, ctx, &st);
    if (st.json)
        fputc('[', stdout);
    else
        printf("%-12s  %-6s %9s %4s %6s %6s %9s  %s\n", "KEY", "ARCH", "SIZE", "REGS", "SMEM",
               "SPILLS", "MS", "VARIANT");
    int rc = fajit_cache_list(ctx, ls_row, &st);
    if (st.json)
        fputs(st.shown ? "\n]\n" : "]\n", stdout);
    if (rc != FAJIT_OK)
        return fajit__cli_report(g, "ls", rc);
    if (st.hidden) /* stderr: the table on stdout stays one row per entry */
        fprintf(stderr, "%s: %" PRIu64 " entries of other builds not shown (ls --all shows them)\n",
                g->prog, st.hidden);
    return FAJIT_EXIT_OK;
}

static void print_entry_text(const fajit_entry_info *e)
{
    printf("key:          %s\n", e->key_hex);
    printf("variant:      %s\n", e->variant);
    printf("arch:         %s\n", e->arch);
    printf("build:        %s\n", e->current_build ? "current" : "other (unreachable by this build)");
    printf("valid:        %s%s%s\n", e->valid ? "yes" : "no", e->valid ? "" : ": ", e->problem);
    printf("cubin bytes:  %" PRIu64 "\n", e->cubin_bytes);
    printf("entry bytes:  %" PRIu64 "\n", e->entry_bytes);
    printf("registers:    %d\n", e->registers);
    printf("smem bytes:   %d\n", e->smem_bytes);
    printf("spill bytes:  %d\n", e->spill_bytes);
    printf("compile ms:   %.1f\n", e->compile_ms);
    printf("nvrtc:        %u.%u\n", e->nvrtc_version / 1000, (e->nvrtc_version % 1000) / 10);
}

static int cmd_show(const fajit__cli_global *g, fajit_ctx *ctx, const cli_args *a)
{
    fajit_entry_info e;
    int rc = fajit_cache_find(ctx, a->pos, &e);
    if (rc != FAJIT_OK)
        return fajit__cli_report(g, a->pos, rc);
    if (a->flags & ARG_JSON) {
        print_entry_json(stdout, &e);
        fputc('\n', stdout);
    } else {
        print_entry_text(&e);
    }
    return FAJIT_EXIT_OK;
}

static int cmd_source(const fajit__cli_global *g, fajit_ctx *ctx, const cli_args *a)
{
    fajit_entry_info e;
    const char *spec = a->pos;
    char *src = NULL;
    size_t len = 0;
    if (looks_like_key(a->pos)) {
        /* The entry's variant text regenerates the exact source it was built from. */
        int rc = fajit_cache_find(ctx, a->pos, &e);
        if (rc != FAJIT_OK)
            return fajit__cli_report(g, a->pos, rc);
        spec = e.variant;
    }
    int rc = fajit_variant_source(ctx, spec, &src, &len);
    if (rc != FAJIT_OK)
        return fajit__cli_report(g, spec, rc);
    fwrite(src, 1, len, stdout);
    fajit_free(src);
    return FAJIT_EXIT_OK;
}

static int cmd_stats(const fajit__cli_global *g, fajit_ctx *ctx, const cli_args *a)
{
    fajit_cache_stats s;
    memset(&s, 0, sizeof s);
    s.struct_size = sizeof s;
    int rc = fajit_cache_get_stats(ctx, &s);
    if (rc != FAJIT_OK)
        return fajit__cli_report(g, "stats", rc);
    if (a->flags & ARG_JSON) {
        printf("{\"entries\":%" PRIu64 ",\"bytes\":%" PRIu64 ",\"map_bytes\":%" PRIu64
               ",\"hits\":%" PRIu64 ",\"misses\":%" PRIu64 ",\"compiles\":%" PRIu64
               ",\"bad_entries\":%" PRIu64 "}\n",
               s.entries, s.bytes, s.map_bytes, s.hits, s.misses, s.compiles, s.bad_entries);
        return FAJIT_EXIT_OK;
    }
    printf("entries:      %" PRIu64 "\n", s.entries);
    printf("bytes:        %" PRIu64 "\n", s.bytes);
    printf("map bytes:    %" PRIu64 "\n", s.map_bytes);
    printf("hits:         %" PRIu64 "\n", s.hits);
    printf("misses:       %" PRIu64 "\n", s.misses);
    printf("compiles:     %" PRIu64 "\n", s.compiles);
    printf("bad entries:  %" PRIu64 "\n", s.bad_entries);
    return FAJIT_EXIT_OK;
}

typedef struct verify_state {
    int json;
    uint64_t listed;
} verify_state;

static int verify_bad(void *user, const fajit_entry_info *e)
{
    verify_state *st = user;
    if (st->json) {
        fputs(st->listed ? ",\n" : "\n", stdout);
        print_entry_json(stdout, e);
    } else {
        printf("BAD %.12s  %s: %s\n", e->key_hex, e->variant, e->problem);
    }
    st->listed++;
    return 0;
}

static int cmd_verify(const fajit__cli_global *g, fajit_ctx *ctx, const cli_args *a)
{
    verify_state st = {.json = !!(a->flags & ARG_JSON), .listed = 0};
    fajit_verify_result r;
    memset(&r, 0, sizeof r);
    r.struct_size = sizeof r;
    int fix = !!(a->flags & ARG_FIX);
    if (st.json)
        fputs("{\"bad_entries\":[", stdout);
    int rc = fajit_cache_verify(ctx, fix, verify_bad, &st, &r);
    if (st.json)
        printf("%s],\"checked\":%" PRIu64 ",\"bad\":%" PRIu64 ",\"removed\":%" PRIu64 "}\n",
               st.listed ? "\n" : "", r.checked, r.bad, r.removed);
    else
        printf("checked %" PRIu64 " entries: %" PRIu64 " bad, %" PRIu64 " removed\n", r.checked,
               r.bad, r.removed);
    if (rc != FAJIT_OK)
        return fajit__cli_report(g, "verify", rc);
    if (r.bad > r.removed) {
        if (!fix)
            fprintf(stderr, "%s: verify: bad entries found; 'verify --fix' removes them\n",
                    g->prog);
        return FAJIT_EXIT_FAILED;
    }
    return FAJIT_EXIT_OK;
}

static int cmd_rm(const fajit__cli_global *g, fajit_ctx *ctx, const cli_args *a)
{
    if ((a->flags & ARG_ALL) && a->npos)
        return fajit__cli_usage_error(g, "rm: give a KEY or --all, not both");
    if (!(a->flags & ARG_ALL) && !a->npos)
        return fajit__cli_usage_error(g, "rm: give a KEY or --all");
    if (a->flags & ARG_ALL) {
        fajit_cache_stats s;
        memset(&s, 0, sizeof s);
        s.struct_size = sizeof s;
        int rc = fajit_cache_get_stats(ctx, &s);
        if (rc == FAJIT_OK)
            rc = fajit_cache_remove(ctx, NULL);
        if (rc != FAJIT_OK)
            return fajit__cli_report(g, "rm --all", rc);
        printf("removed %" PRIu64 " entries\n", s.entries);
        return FAJIT_EXIT_OK;
    }
    /* Resolve a prefix or spec first, so the message names the exact entry. */
    fajit_entry_info e;
    int rc = fajit_cache_find(ctx, a->pos, &e);
    if (rc == FAJIT_OK)
        rc = fajit_cache_remove(ctx, e.key_hex);
    if (rc != FAJIT_OK)
        return fajit__cli_report(g, a->pos, rc);
    printf("removed %s  %s\n", e.key_hex, e.variant);
    return FAJIT_EXIT_OK;
}

static void print_bundle(const char *what, const char *path, const fajit_bundle_result *r,
                         int json)
{
    if (json) {
        printf("{\"%s\":", what);
        fajit__cli_json_string(stdout, path);
        printf(",\"entries\":%" PRIu64 ",\"bytes\":%" PRIu64 ",\"skipped\":%" PRIu64
               ",\"sha256\":\"%s\"}\n", r->entries, r->bytes, r->skipped, r->sha256);
        return;
    }
    printf("%s %s: %" PRIu64 " entries, %" PRIu64 " bytes, %" PRIu64 " %s\n", what, path,
           r->entries, r->bytes, r->skipped,
           !strcmp(what, "exported") ? "invalid left out" : "already present");
    printf("manifest sha256: %s\n", r->sha256);
}

static int cmd_export(const fajit__cli_global *g, fajit_ctx *ctx, const cli_args *a)
{
    fajit_bundle_result r;
    int rc = fajit_cache_export(ctx, a->pos, &r);
    if (rc != FAJIT_OK)
        return fajit__cli_report(g, "export", rc);
    print_bundle("exported", a->pos, &r, !!(a->flags & ARG_JSON));
    return FAJIT_EXIT_OK;
}

static int cmd_import(const fajit__cli_global *g, fajit_ctx *ctx, const cli_args *a)
{
    fajit_bundle_result r;
    char path[MAX_ARG_TEXT];
    const char *expect = NULL;
    snprintf(path, sizeof path, "%s", a->pos);
    if (a->npos == 2) { /* FILE SHA256: the digest is the last word */
        char *sp = strrchr(path, ' ');
        *sp = '\0';
        expect = sp + 1;
        if (strlen(expect) != 64 || strspn(expect, "0123456789abcdefABCDEF") != 64)
            return fajit__cli_usage_error(g, "import: '%s' is not a SHA-256 (64 hex digits)",
                                          expect);
    }
    int rc = fajit_cache_import(ctx, path, expect, &r);
    if (rc != FAJIT_OK)
        return fajit__cli_report(g, "import", rc);
    print_bundle("imported", path, &r, !!(a->flags & ARG_JSON));
    return FAJIT_EXIT_OK;
}

static void print_info_json(const fajit_info *in)
{
    printf("{\"version\":\"%s\",\"nvrtc\":\"%d.%d\",\"driver_version\":%d,\"device_count\":%d,",
           fajit_version(), in->nvrtc_major, in->nvrtc_minor, in->driver_version,
           in->device_count);
    fputs("\"device_name\":", stdout);
    fajit__cli_json_string(stdout, in->device_name);
    fputs(",\"device_arch\":", stdout);
    fajit__cli_json_string(stdout, in->device_arch);
    fputs(",\"no_gpu_reason\":", stdout);
    fajit__cli_json_string(stdout, in->no_gpu_reason);
    fputs(",\"cache_dir\":", stdout);
    fajit__cli_json_string(stdout, in->cache_dir);
    printf(",\"cache_mode\":\"%s\",\"build_id\":", cache_mode_name(in->cache_mode));
    fajit__cli_json_string(stdout, in->build_id);
    fputs("}\n", stdout);
}

static void print_info_text(const fajit_info *in)
{
    printf("fajit:        %s (tool built with %s)\n", fajit_version(), FAJIT_VERSION_STRING);
    printf("nvrtc:        %d.%d\n", in->nvrtc_major, in->nvrtc_minor);
    if (in->driver_version > 0)
        printf("driver:       CUDA %d.%d\n", in->driver_version / 1000,
               (in->driver_version % 1000) / 10);
    else
        printf("driver:       none\n");
    printf("gpus:         %d\n", in->device_count);
    if (in->device_name[0])
        printf("device:       %s (%s)\n", in->device_name, in->device_arch);
    else
        printf("device:       none: %s\n", in->no_gpu_reason[0] ? in->no_gpu_reason : "unknown");
    printf("cache dir:    %s\n", in->cache_dir);
    printf("cache mode:   %s\n", cache_mode_name(in->cache_mode));
    printf("build id:     %s\n", in->build_id);
}

static int cmd_info(const fajit__cli_global *g, fajit_ctx *ctx, const cli_args *a)
{
    fajit_info in;
    memset(&in, 0, sizeof in);
    in.struct_size = sizeof in;
    int rc = fajit_get_info(ctx, &in);
    if (rc != FAJIT_OK)
        return fajit__cli_report(g, "info", rc);
    if (a->flags & ARG_JSON)
        print_info_json(&in);
    else
        print_info_text(&in);
    return FAJIT_EXIT_OK;
}

static int cmd_variant(const fajit__cli_global *g, fajit_ctx *ctx, const cli_args *a)
{
    char buf[1024];
    int rc = fajit_variant_complete(ctx, a->pos, buf, sizeof buf);
    if (rc < 0)
        return fajit__cli_report(g, a->pos, rc);
    if (a->flags & ARG_JSON) {
        fputs("{\"variant\":", stdout);
        fajit__cli_json_string(stdout, buf);
        fputs("}\n", stdout);
    } else {
        printf("%s\n", buf);
    }
    return FAJIT_EXIT_OK;
}

/* ---------------------------------------------------------------- the command table */

static const cli_cmd commands[] = {
    {"prebuild", NULL, 0, 0, 1, "prebuild [MANIFEST|-] [-j N] [--dry-run] [--json]",
     "compile a manifest's variants into the cache", NULL},
    {"tune", NULL, 0, 0, 1, "tune [MANIFEST|-] [-j N] [--json]",
     "time tile (and split-KV) candidates on this GPU and keep the best", NULL},
    {"ls", cmd_ls, ARG_JSON | ARG_ALL | ARG_TUNING, 0, 0, "ls [--all] [--tuning] [--json]",
     "list cache entries (or tuning records)",
     "Columns: key (first 12 hex digits), arch, cubin size in bytes, registers per\n"
     "thread, shared memory bytes, spill bytes, compile time in ms, variant text.\n"
     "Only entries this build can reach are listed; --all adds other builds' entries\n"
     "(marked [other build]) and undecodable ones (marked [bad: ...]).\n"
     "With --tuning: the tuning records, one per (GPU, variant, seqlen bucket,\n"
     "rule's split count, few-rows class, candidate): GPU, arch, SM count, the\n"
     "bucket's largest seqlen_k, tiles bm/bn/warps/stages, split-KV count as\n"
     "candidate/rule's ('-' where split-KV does not apply: the rule decides),\n"
     "median time in microseconds, '*' on the best of its group (the one calls\n"
     "use), and the candidate's variant text (op fwd, or bwd: the backward's main\n"
     "kernel), marked [few rows] for problems of few query rows a block (decoding,\n"
     "whose heuristic tiles differ).\n"},
    {"show", cmd_show, ARG_JSON, 1, -1, "show KEY [--json]", "print every field of one entry",
     NULL},
    {"source", cmd_source, 0, 1, -1, "source KEY|SPEC",
     "print the exact CUDA source generated for an entry or a spec",
     "For a KEY the entry's variant text is rendered again; the source is the same\n"
     "bytes that were compiled (templates are part of the build identity).\n"},
    {"stats", cmd_stats, ARG_JSON, 0, 0, "stats [--json]", "cache size and counters",
     "Entries, bytes, LMDB map size, and the counters kept in the store across\n"
     "processes: hits, misses, compiles, bad entries found.\n"},
    {"verify", cmd_verify, ARG_JSON | ARG_FIX, 0, 0, "verify [--fix] [--json]",
     "check every entry; --fix removes the bad ones",
     "Checks header, lengths, checksum and key digest of every entry and lists the\n"
     "bad ones. Exit 1 if bad entries were found and not removed.\n"},
    {"rm", cmd_rm, ARG_ALL, 0, -1, "rm KEY|--all", "remove one entry, or all", NULL},
    {"export", cmd_export, ARG_JSON, 1, 1, "export FILE [--json]",
     "write every valid entry to a bundle file",
     "The bundle holds a manifest of every entry's key, length and SHA-256, and the\n"
     "SHA-256 of that manifest, which is printed: give it to import on the other side\n"
     "to tie the bundle to this export. FILE is replaced atomically.\n"},
    {"import", cmd_import, ARG_JSON, 1, 2, "import FILE [SHA256] [--json]",
     "verify a bundle whole, then merge it into the cache",
     "Every entry's SHA-256, format and key are checked before anything is written;\n"
     "any fault rejects the whole bundle (exit 1). With SHA256, the manifest's digest\n"
     "must also equal it. Needs --cache-mode rw.\n"},
    {"info", cmd_info, ARG_JSON, 0, 0, "info [--json]",
     "versions, driver and GPUs, cache path and mode, build identity",
     "Works without a GPU: it then says why none is usable.\n"},
    {"variant", cmd_variant, ARG_JSON, 1, -1, "variant SPEC [--json]",
     "print a spec completed to full canonical text",
     "Fields left out take their defaults, dv equals dqk, tile fields the runtime\n"
     "heuristic's choice and arch the GPU's (else sm_90). Example:\n"
     "  fajit variant ref dqk=72 dtype=bf16 mask=causal\n"},
    {"help", NULL, 0, 0, 1, "help [COMMAND]", "this text, or a command's", NULL},
};
#define NCOMMANDS (sizeof commands / sizeof commands[0])

static const cli_cmd *find_command(const char *name)
{
    for (size_t i = 0; i < NCOMMANDS; i++)
        if (strcmp(commands[i].name, name) == 0)
            return &commands[i];
    return NULL;
}

void fajit__cli_common_help(FILE *f)
{
    fputs("Options (before or after the command):\n"
          "  --cache-dir DIR          cache directory (default $FAJIT_CACHE_DIR, else\n"
          "                           $XDG_CACHE_HOME/fajit, else ~/.cache/fajit)\n"
          "  --cache-mode rw|ro|off   read-write, read-only, or no cache at all (default\n"
          "                           $FAJIT_CACHE_MODE, else rw)\n"
          "  -v, --verbose            log to stderr at level info\n"
          "  --version                print the version and exit\n"
          "  -h, --help               print help and exit\n"
          "\n"
          "KEY is a full key, a unique prefix of at least 6 hex digits, or a variant spec.\n"
          "SPEC is canonical variant text with fields left out, e.g. 'ref dqk=72 dtype=bf16'.\n"
          "\n"
          "Exit codes: 0 success; 1 the operation failed; 2 usage error (bad option,\n"
          "spec or manifest line; ambiguous key prefix); 3 no entry matches the key;\n"
          "4 (tune) no GPU to time on: candidates were compiled and cached only.\n",
          f);
}

static void print_usage(const fajit__cli_global *g, FILE *f)
{
    fprintf(f, "usage: %s [OPTIONS] COMMAND [ARGS]\n\n", g->prog);
    fputs("FlashAttention kernels generated and compiled at run time: cache tools.\n\n"
          "Commands:\n",
          f);
    for (size_t i = 0; i < NCOMMANDS; i++)
        fprintf(f, "  %-26s %s\n", commands[i].usage, commands[i].summary);
    fputc('\n', f);
    fajit__cli_common_help(f);
}

static void print_command_help(const fajit__cli_global *g, const cli_cmd *c, FILE *f)
{
    if (strcmp(c->name, "prebuild") == 0) {
        fajit__cli_prebuild_help(g, f);
    } else if (strcmp(c->name, "tune") == 0) {
        fajit__cli_tune_help(g, f);
    } else {
        fprintf(f, "usage: %s %s\n\n%s.\n", g->prog, c->usage, c->summary);
        if (c->details)
            fprintf(f, "\n%s", c->details);
    }
    fputc('\n', f);
    fajit__cli_common_help(f);
}

static int cmd_help(const fajit__cli_global *g, int npos, const char *name)
{
    if (npos == 0) {
        print_usage(g, stdout);
        return FAJIT_EXIT_OK;
    }
    const cli_cmd *c = find_command(name);
    if (!c)
        return fajit__cli_usage_error(g, "help: unknown command '%s'", name);
    print_command_help(g, c, stdout);
    return FAJIT_EXIT_OK;
}

/* ---------------------------------------------------------------- parsing */

static int parse_cache_mode(const char *s, int *mode)
{
    if (!strcmp(s, "rw") || !strcmp(s, "read-write") || !strcmp(s, "readwrite"))
        *mode = FAJIT_CACHE_READWRITE;
    else if (!strcmp(s, "ro") || !strcmp(s, "read-only") || !strcmp(s, "readonly"))
        *mode = FAJIT_CACHE_READONLY;
    else if (!strcmp(s, "off"))
        *mode = FAJIT_CACHE_OFF;
    else
        return -1;
    return 0;
}

/* Value of option `name` at argv[*i], as "--name=V" or "--name V"; NULL if
 * argv[*i] is another option. *missing is set when the value is absent. */
static const char *option_value(const char *name, int argc, char **argv, int *i, int *missing)
{
    size_t n = strlen(name);
    const char *arg = argv[*i];
    if (strncmp(arg, name, n) != 0)
        return NULL;
    if (arg[n] == '=')
        return arg + n + 1;
    if (arg[n] != '\0')
        return NULL;
    if (*i + 1 >= argc) {
        *missing = 1;
        return NULL;
    }
    return argv[++*i];
}

/* Takes the global options out of argv wherever they are (up to "--"), keeping
 * the other words in order. Returns -1 if fine, else an exit code. */
static int take_global_options(fajit__cli_global *g, int *argc, char **argv, int *version)
{
    int out = 1, done = 0;
    for (int i = 1; i < *argc; i++) {
        int missing = 0;
        const char *v;
        if (done || strcmp(argv[i], "--") == 0) {
            done = 1;
            argv[out++] = argv[i];
        } else if ((v = option_value("--cache-dir", *argc, argv, &i, &missing))) {
            g->cache_dir = v;
        } else if ((v = option_value("--cache-mode", *argc, argv, &i, &missing))) {
            if (parse_cache_mode(v, &g->cache_mode) != 0)
                return fajit__cli_usage_error(g, "--cache-mode %s: must be rw, ro or off", v);
        } else if (missing) {
            return fajit__cli_usage_error(g, "%s needs a value", argv[i]);
        } else if (!strcmp(argv[i], "-v") || !strcmp(argv[i], "--verbose")) {
            g->verbose = 1;
        } else if (!strcmp(argv[i], "--version")) {
            *version = 1;
        } else {
            argv[out++] = argv[i];
        }
    }
    *argc = out;
    argv[out] = NULL;
    return -1;
}

static int append_word(cli_args *a, const char *w)
{
    size_t used = strlen(a->pos), n = strlen(w);
    if (used + n + 2 > sizeof a->pos)
        return -1;
    if (used)
        a->pos[used++] = ' ';
    memcpy(a->pos + used, w, n + 1);
    a->npos++;
    return 0;
}

/* Parses a subcommand's own flags and positionals (argv[0] is its name).
 * Returns -1 to go on, else an exit code (--help printed: 0). */
static int parse_command_args(const fajit__cli_global *g, const cli_cmd *c, int argc, char **argv,
                              cli_args *a)
{
    static const struct { const char *name; unsigned flag; } flags[] = {
        {"--json", ARG_JSON}, {"--all", ARG_ALL}, {"--fix", ARG_FIX}, {"--tuning", ARG_TUNING}};
    int only_positional = 0;
    memset(a, 0, sizeof *a);
    for (int i = 1; i < argc; i++) {
        const char *w = argv[i];
        int known = 0;
        if (!only_positional && !strcmp(w, "--")) {
            only_positional = 1;
            continue;
        }
        if (!only_positional && (!strcmp(w, "-h") || !strcmp(w, "--help"))) {
            print_command_help(g, c, stdout);
            return FAJIT_EXIT_OK;
        }
        if (!only_positional && w[0] == '-' && w[1] != '\0') {
            for (size_t k = 0; k < sizeof flags / sizeof flags[0]; k++)
                if (!strcmp(w, flags[k].name) && (c->allowed & flags[k].flag)) {
                    a->flags |= flags[k].flag;
                    known = 1;
                }
            if (!known)
                return fajit__cli_usage_error(g, "%s: unknown option '%s'", c->name, w);
            continue;
        }
        if (append_word(a, w) != 0)
            return fajit__cli_usage_error(g, "%s: arguments too long", c->name);
    }
    if (a->npos < c->min_pos)
        return fajit__cli_usage_error(g, "%s: missing argument; usage: %s %s", c->name, g->prog,
                                      c->usage);
    if (c->max_pos >= 0 && a->npos > c->max_pos)
        return fajit__cli_usage_error(g, "%s: too many arguments; usage: %s %s", c->name,
                                      g->prog, c->usage);
    return -1;
}

static int run_command(const fajit__cli_global *g, const cli_cmd *c, int argc, char **argv)
{
    cli_args a;
    if (strcmp(c->name, "prebuild") == 0)
        return fajit__cli_prebuild(g, argc, argv);
    if (strcmp(c->name, "tune") == 0)
        return fajit__cli_tune(g, argc, argv);
    int rc = parse_command_args(g, c, argc, argv, &a);
    if (rc >= 0)
        return rc;
    if (strcmp(c->name, "help") == 0)
        return cmd_help(g, a.npos, a.pos);
    fajit_ctx *ctx = fajit__cli_open(g, &rc);
    if (!ctx)
        return rc;
    rc = c->run(g, ctx, &a);
    fajit_destroy(ctx);
    if (fflush(stdout) != 0 && rc == FAJIT_EXIT_OK) {
        perror("stdout");
        rc = FAJIT_EXIT_FAILED;
    }
    return rc;
}

static int cli_dispatch(fajit__cli_global *g, int argc, char **argv)
{
    int version = 0;
    int rc = take_global_options(g, &argc, argv, &version);
    if (rc >= 0)
        return rc;
    if (version) {
        printf("%s %s\n", g->prog, fajit_version());
        return FAJIT_EXIT_OK;
    }
    if (argc < 2) {
        print_usage(g, stderr);
        return FAJIT_EXIT_USAGE;
    }
    if (!strcmp(argv[1], "-h") || !strcmp(argv[1], "--help")) {
        print_usage(g, stdout);
        return FAJIT_EXIT_OK;
    }
    const cli_cmd *c = find_command(argv[1]);
    if (!c)
        return fajit__cli_usage_error(g, "unknown command '%s'", argv[1]);
    return run_command(g, c, argc - 1, argv + 1);
}

int fajit_cli_main(int argc, char **argv)
{
    fajit__cli_global g = {.prog = "fajit", .cache_dir = NULL,
                           .cache_mode = FAJIT_CACHE_DEFAULT, .verbose = 0};
    return cli_dispatch(&g, argc, argv);
}

int fajit_cli_prebuild_main(int argc, char **argv)
{
    fajit__cli_global g = {.prog = "fajit-prebuild", .cache_dir = NULL,
                           .cache_mode = FAJIT_CACHE_DEFAULT, .verbose = 0};
    /* Same as `fajit prebuild ARGS`: insert the subcommand after the program. */
    char **args = calloc((size_t)argc + 2, sizeof *args);
    if (!args) {
        perror("fajit-prebuild");
        return FAJIT_EXIT_FAILED;
    }
    args[0] = argv[0];
    args[1] = "prebuild";
    for (int i = 1; i < argc; i++)
        args[i + 1] = argv[i];
    int rc = cli_dispatch(&g, argc + 1, args);
    free(args);
    return rc;
}
