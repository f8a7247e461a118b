/*
 * codegen/variant.c - the variant's defaults, checks, canonical text (strict
 * parse and format) and the lenient one-spec parse.
 *
 * One table (fields[]) lists the fields in canonical order with their kind, so
 * the strict parser, the lenient parser and the formatter cannot disagree on
 * names or order. The strict parser re-formats what it parsed and compares, so
 * format(parse(s)) == s holds by construction, not by care.
 */
#include "codegen/variant.h"

#include <limits.h>
#include <stddef.h>
#include <stdio.h>
#include <string.h>

#include "fajit.h"
#include "runtime/error.h"

/* Longest value echoed back in an error detail: the detail must stay readable
 * even when the bad input is a megabyte of garbage. */
#define ECHO_MAX 64

enum field_kind { K_INT, K_FLAG, K_DTYPE, K_MASK, K_WINDOW, K_ARCH };

struct field {
    const char *name;
    enum field_kind kind;
    size_t off; /* offset of the int (for K_WINDOW the left side; right follows) */
    int lo, hi; /* K_INT range */
    int tile;   /* may be FAJIT__UNSET in a spec */
};

#define OFF(m) offsetof(fajit__variant, m)

static const struct field fields[] = {
    {"dqk", K_INT, OFF(dqk), 1, 512, 0},
    {"dv", K_INT, OFF(dv), 1, 512, 0},
    {"dtype", K_DTYPE, OFF(dtype), 0, 0, 0},
    {"mask", K_MASK, OFF(mask), 0, 0, 0},
    {"window", K_WINDOW, OFF(window_left), 0, 0, 0},
    {"dropout", K_FLAG, OFF(dropout), 0, 1, 0},
    {"softcap", K_FLAG, OFF(softcap), 0, 1, 0},
    {"alibi", K_FLAG, OFF(alibi), 0, 1, 0},
    {"varlen", K_FLAG, OFF(varlen), 0, 1, 0},
    {"paged", K_FLAG, OFF(paged), 0, 1, 0},
    {"bm", K_INT, OFF(bm), 1, 256, 1},
    {"bn", K_INT, OFF(bn), 1, 256, 1},
    {"warps", K_INT, OFF(warps), 1, 16, 1},
    {"stages", K_INT, OFF(stages), 1, 8, 1},
    {"arch", K_ARCH, OFF(arch), 0, 0, 1},
};
#define NFIELDS (sizeof fields / sizeof fields[0])

static const char *const op_words[FAJIT__OP_COUNT] = {"ref",      "fwd",      "bwd",     "ref-dq",
                                                       "ref-dkdv", "bwd-pre",  "bwd-post", "bwd-dkdv",
                                                       "bwd-dq",   "ref-probs"};
#define OP_WORDS_TEXT "ref, fwd, bwd, ref-dq, ref-dkdv, bwd-pre, bwd-post, bwd-dkdv, bwd-dq or ref-probs"
static const char *const dtype_words[] = {"fp16", "bf16"};
static const char *const mask_words[] = {"none", "causal", "causal-tl"};
static const int known_archs[] = {80, 86, 87, 89, 90, 100, 103, 110, 120, 121};
#define NARCHS (sizeof known_archs / sizeof known_archs[0])
#define ARCH_LIST "sm_80, sm_86, sm_87, sm_89, sm_90, sm_100, sm_103, sm_110, sm_120, sm_121"

static int *field_ptr(fajit__variant *v, const struct field *f)
{
    return (int *)((char *)v + f->off);
}

static int field_get(const fajit__variant *v, const struct field *f)
{
    return *(const int *)((const char *)v + f->off);
}

static int word_index(const char *const *words, int n, const char *s, size_t len)
{
    for (int i = 0; i < n; i++)
        if (strlen(words[i]) == len && memcmp(words[i], s, len) == 0)
            return i;
    return -1;
}

void fajit__variant_defaults(fajit__variant *v)
{
    memset(v, 0, sizeof *v);
    v->op = FAJIT__OP_REF;
    v->dqk = FAJIT__UNSET; /* required: a spec without it is an error */
    v->dv = FAJIT__UNSET;  /* defaults to dqk once dqk is known */
    v->dtype = FAJIT_DTYPE_FP16;
    v->mask = FAJIT_MASK_NONE;
    v->window_left = -1;
    v->window_right = -1;
    v->bm = v->bn = v->warps = v->stages = FAJIT__UNSET;
    v->arch = FAJIT__UNSET;
    v->arch_suffix = 0;
}

/* ---------------------------------------------------------------- checks */

static int arch_known(int arch)
{
    for (size_t i = 0; i < NARCHS; i++)
        if (known_archs[i] == arch)
            return 1;
    return 0;
}

static int check_arch(const fajit__variant *v, int allow_unset)
{
    if (v->arch == FAJIT__UNSET && allow_unset && v->arch_suffix == 0)
        return 0;
    if (v->arch == FAJIT__UNSET)
        return fajit__fail(FAJIT_EINVAL, "arch: unset (a full variant needs a target arch)");
    if (!arch_known(v->arch))
        return fajit__fail(FAJIT_EINVAL, "arch=sm_%d: unknown arch (expected one of " ARCH_LIST ")",
                           v->arch);
    if (v->arch_suffix != 0 && v->arch_suffix != 'a')
        return fajit__fail(FAJIT_EINVAL, "arch_suffix=%d: must be 0 or 'a'", v->arch_suffix);
    if (v->arch_suffix == 'a' && v->arch < 90)
        return fajit__fail(FAJIT_EINVAL, "arch=sm_%da: 'a' targets exist only for sm_90 and later",
                           v->arch);
    return 0;
}

static int check_window_side(const char *side, int value)
{
    if (value < -1)
        return fajit__fail(FAJIT_EINVAL, "window: %s=%d: must be -1 (unbounded) or >= 0", side,
                           value);
    return 0;
}

static int check_field(const fajit__variant *v, const struct field *f, int allow_unset)
{
    int x = field_get(v, f);
    switch (f->kind) {
    case K_INT:
        if (f->tile && x == FAJIT__UNSET && allow_unset)
            return 0;
        if (f->tile && x == FAJIT__UNSET)
            return fajit__fail(FAJIT_EINVAL, "%s: unset (a full variant needs every tile field)",
                               f->name);
        if (x < f->lo || x > f->hi)
            return fajit__fail(FAJIT_EINVAL, "%s=%d: must be %d..%d", f->name, x, f->lo, f->hi);
        if (f->off == OFF(warps) && (x & (x - 1)) != 0)
            return fajit__fail(FAJIT_EINVAL, "warps=%d: must be 1, 2, 4, 8 or 16", x);
        return 0;
    case K_FLAG:
        return x == 0 || x == 1 ? 0 : fajit__fail(FAJIT_EINVAL, "%s=%d: must be 0 or 1", f->name, x);
    case K_DTYPE:
        return x == FAJIT_DTYPE_FP16 || x == FAJIT_DTYPE_BF16
                   ? 0
                   : fajit__fail(FAJIT_EINVAL, "dtype=%d: unknown dtype (expected fp16 or bf16)", x);
    case K_MASK:
        return x >= FAJIT_MASK_NONE && x <= FAJIT_MASK_CAUSAL_TL
                   ? 0
                   : fajit__fail(FAJIT_EINVAL,
                                 "mask=%d: unknown mask (expected none, causal or causal-tl)", x);
    case K_WINDOW:
        if (check_window_side("left", v->window_left))
            return FAJIT_EINVAL;
        return check_window_side("right", v->window_right);
    case K_ARCH:
        return check_arch(v, allow_unset);
    }
    return fajit__fail(FAJIT_EINVAL, "%s: internal error: unknown field kind", f->name);
}

/* The reference kernels (forward and backward alike) map one warp to
 * bm/warps rows and walk the other side in steps of bn handled 32 lanes at a
 * time, with no pipelining. Checks of pairs only apply when both values are
 * known (a spec may leave tiles out). */
static int check_ref_tiles(const fajit__variant *v)
{
    const char *op = op_words[v->op];
    if (v->bn != FAJIT__UNSET && v->bn % 32 != 0)
        return fajit__fail(FAJIT_EINVAL, "bn=%d: op %s needs a multiple of 32", v->bn, op);
    if (v->bm != FAJIT__UNSET && v->warps != FAJIT__UNSET && v->bm % v->warps != 0)
        return fajit__fail(FAJIT_EINVAL, "bm=%d: op %s needs a multiple of warps (%d)", v->bm, op,
                           v->warps);
    if (v->stages != FAJIT__UNSET && v->stages != 1)
        return fajit__fail(FAJIT_EINVAL, "stages=%d: op %s needs stages=1", v->stages, op);
    return 0;
}

static int check_variant(const fajit__variant *v, int allow_unset)
{
    if (v->op < 0 || v->op >= FAJIT__OP_COUNT)
        return fajit__fail(FAJIT_EINVAL, "op=%d: unknown op (expected " OP_WORDS_TEXT ")", v->op);
    for (size_t i = 0; i < NFIELDS; i++)
        if (check_field(v, &fields[i], allow_unset))
            return FAJIT_EINVAL;
    if (v->op == FAJIT__OP_REF || v->op == FAJIT__OP_REF_DQ || v->op == FAJIT__OP_REF_DKDV ||
        v->op == FAJIT__OP_REF_PROBS)
        return check_ref_tiles(v);
    return 0;
}

int fajit__variant_check(const fajit__variant *v)
{
    return check_variant(v, 0);
}

/* ---------------------------------------------------------------- format */

static int format_value(const fajit__variant *v, const struct field *f, char *buf, size_t cap)
{
    int x = field_get(v, f);
    switch (f->kind) {
    case K_INT:
    case K_FLAG:
        return snprintf(buf, cap, "%d", x);
    case K_DTYPE:
        return snprintf(buf, cap, "%s", dtype_words[x]);
    case K_MASK:
        return snprintf(buf, cap, "%s", mask_words[x]);
    case K_WINDOW:
        return snprintf(buf, cap, "%d,%d", v->window_left, v->window_right);
    case K_ARCH:
        return snprintf(buf, cap, "sm_%d%s", x, v->arch_suffix == 'a' ? "a" : "");
    }
    return snprintf(buf, cap, "?");
}

int fajit__variant_format(const fajit__variant *v, char *buf, size_t cap)
{
    char text[FAJIT__VARIANT_TEXT_MAX];
    size_t len;

    if (fajit__variant_check(v))
        return FAJIT_EINVAL;
    len = (size_t)snprintf(text, sizeof text, "%s", op_words[v->op]);
    for (size_t i = 0; i < NFIELDS; i++) {
        char value[64];
        format_value(v, &fields[i], value, sizeof value);
        len += (size_t)snprintf(text + len, sizeof text - len, " %s=%s", fields[i].name, value);
    }
    if (len + 1 > cap)
        return fajit__fail(FAJIT_EINVAL, "buffer of %zu bytes too small for canonical text (%zu needed)",
                           cap, len + 1);
    memcpy(buf, text, len + 1);
    return (int)len;
}

/* ---------------------------------------------------------------- values */

/* Plain decimal: optional '-', no '+', no leading zeros, no "-0", fits an int.
 * One grammar for canonical text and specs, so a spec value is always a
 * canonical value. */
static int parse_int(const char *s, size_t n, int *out)
{
    size_t i = 0;
    long long x = 0;
    int neg = 0;

    if (i < n && s[i] == '-') {
        neg = 1;
        i++;
    }
    if (i >= n || n - i > 10)
        return -1;
    if (s[i] == '0' && (n - i > 1 || neg))
        return -1;
    for (; i < n; i++) {
        if (s[i] < '0' || s[i] > '9')
            return -1;
        x = x * 10 + (s[i] - '0');
    }
    x = neg ? -x : x;
    if (x < INT_MIN || x > INT_MAX)
        return -1;
    *out = (int)x;
    return 0;
}

static int bad_value(const struct field *f, const char *s, size_t n, const char *why)
{
    return fajit__fail(FAJIT_EPARSE, "%s=%.*s%s: %s", f->name, (int)(n > ECHO_MAX ? ECHO_MAX : n), s,
                       n > ECHO_MAX ? "..." : "", why);
}

static int parse_window(fajit__variant *v, const struct field *f, const char *s, size_t n)
{
    const char *comma = memchr(s, ',', n);
    if (!comma || parse_int(s, (size_t)(comma - s), &v->window_left) ||
        parse_int(comma + 1, n - (size_t)(comma - s) - 1, &v->window_right))
        return bad_value(f, s, n, "expected L,R (two plain decimal integers, -1 for unbounded)");
    return 0;
}

static int parse_arch(fajit__variant *v, const struct field *f, const char *s, size_t n)
{
    size_t digits = n;
    int suffix = 0;

    if (n < 4 || memcmp(s, "sm_", 3) != 0)
        return bad_value(f, s, n, "expected sm_NN or sm_NNa, e.g. sm_90");
    if (s[n - 1] == 'a') {
        suffix = 'a';
        digits--;
    }
    if (parse_int(s + 3, digits - 3, &v->arch) || v->arch < 0)
        return bad_value(f, s, n, "expected sm_NN or sm_NNa, e.g. sm_90");
    if (!arch_known(v->arch))
        return bad_value(f, s, n, "unknown arch (expected one of " ARCH_LIST ")");
    if (suffix && v->arch < 90)
        return bad_value(f, s, n, "'a' targets exist only for sm_90 and later");
    v->arch_suffix = suffix;
    return 0;
}

/* Parses one value of field f into v. Range checks are left to check_variant,
 * except where the text itself cannot name a value (unknown words). */
static int parse_value(fajit__variant *v, const struct field *f, const char *s, size_t n)
{
    int i;
    switch (f->kind) {
    case K_INT:
    case K_FLAG:
        if (parse_int(s, n, field_ptr(v, f)))
            return bad_value(f, s, n,
                             "not a plain decimal integer (digits, optional '-', no leading zeros)");
        return 0;
    case K_DTYPE:
        if ((i = word_index(dtype_words, 2, s, n)) < 0)
            return bad_value(f, s, n, "unknown dtype (expected fp16 or bf16)");
        v->dtype = i;
        return 0;
    case K_MASK:
        if ((i = word_index(mask_words, 3, s, n)) < 0)
            return bad_value(f, s, n, "unknown mask (expected none, causal or causal-tl)");
        v->mask = i;
        return 0;
    case K_WINDOW:
        return parse_window(v, f, s, n);
    case K_ARCH:
        return parse_arch(v, f, s, n);
    }
    return bad_value(f, s, n, "internal error: unknown field kind");
}

static int parse_op(const char *s, size_t n, int *op)
{
    if ((*op = word_index(op_words, FAJIT__OP_COUNT, s, n)) >= 0)
        return 0;
    return fajit__fail(FAJIT_EPARSE, "op '%.*s%s': unknown op (expected " OP_WORDS_TEXT ")",
                       (int)(n > ECHO_MAX ? ECHO_MAX : n), s, n > ECHO_MAX ? "..." : "");
}

static const struct field *field_by_name(const char *s, size_t n)
{
    for (size_t i = 0; i < NFIELDS; i++)
        if (strlen(fields[i].name) == n && memcmp(fields[i].name, s, n) == 0)
            return &fields[i];
    return NULL;
}

/* ---------------------------------------------------------------- strict parse */

/* Rejects anything but printable ASCII words separated by single spaces, so
 * the token walk below only has to deal with order and values. */
static int check_spacing(const char *text)
{
    size_t n = strlen(text);
    if (n == 0)
        return fajit__fail(FAJIT_EPARSE, "empty text (expected canonical variant text)");
    for (size_t i = 0; i < n; i++) {
        unsigned char c = (unsigned char)text[i];
        if (c != ' ' && (c < 0x21 || c > 0x7e))
            return fajit__fail(FAJIT_EPARSE,
                               "character 0x%02x at offset %zu: canonical text is printable "
                               "ASCII words separated by single spaces",
                               c, i);
    }
    if (text[0] == ' ')
        return fajit__fail(FAJIT_EPARSE, "leading space: canonical text starts with the op");
    if (text[n - 1] == ' ')
        return fajit__fail(FAJIT_EPARSE, "trailing space: canonical text ends with the arch field");
    const char *dbl = strstr(text, "  ");
    if (dbl)
        return fajit__fail(FAJIT_EPARSE, "double space at offset %zu: fields are separated by single spaces",
                           (size_t)(dbl - text));
    return 0;
}

/* Next space-separated token of *p: its start and length; *p moves past it. */
static size_t next_token(const char **p, const char **tok)
{
    const char *s = *p, *e = strchr(s, ' ');
    size_t n = e ? (size_t)(e - s) : strlen(s);
    *tok = s;
    *p = e ? e + 1 : s + n;
    return n;
}

static int parse_field_strict(fajit__variant *v, const struct field *f, const char *tok, size_t n,
                              const char *prev, size_t prev_n)
{
    size_t name_n = strlen(f->name);
    if (n == 0)
        return fajit__fail(FAJIT_EPARSE, "field '%s' missing after '%.*s'", f->name,
                           (int)prev_n, prev);
    if (n <= name_n || memcmp(tok, f->name, name_n) != 0 || tok[name_n] != '=')
        return fajit__fail(FAJIT_EPARSE, "field '%s' missing after '%.*s' (found '%.*s%s')",
                           f->name, (int)prev_n, prev, (int)(n > ECHO_MAX ? ECHO_MAX : n), tok,
                           n > ECHO_MAX ? "..." : "");
    return parse_value(v, f, tok + name_n + 1, n - name_n - 1);
}

/* Catches whatever the value grammar accepted but format would spell
 * differently, so no two texts ever name the same variant. */
static int check_round_trip(const fajit__variant *v, const char *text)
{
    char again[FAJIT__VARIANT_TEXT_MAX];
    if (fajit__variant_format(v, again, sizeof again) < 0 || strcmp(again, text) != 0)
        return fajit__fail(FAJIT_EPARSE, "not canonical text (canonical form: '%s')", again);
    return 0;
}

int fajit__variant_parse(const char *text, fajit__variant *out)
{
    fajit__variant v;
    const char *p = text, *tok, *prev;
    size_t n, prev_n;

    if (check_spacing(text))
        return FAJIT_EPARSE;
    fajit__variant_defaults(&v);
    n = next_token(&p, &tok);
    if (parse_op(tok, n, &v.op))
        return FAJIT_EPARSE;
    prev = tok;
    prev_n = n;
    for (size_t i = 0; i < NFIELDS; i++) {
        n = next_token(&p, &tok);
        if (parse_field_strict(&v, &fields[i], tok, n, prev, prev_n))
            return FAJIT_EPARSE;
        prev = tok;
        prev_n = n;
    }
    if (*p) {
        n = next_token(&p, &tok);
        return fajit__fail(FAJIT_EPARSE, "unexpected '%.*s%s' after '%.*s' (arch is the last field)",
                           (int)(n > ECHO_MAX ? ECHO_MAX : n), tok, n > ECHO_MAX ? "..." : "",
                           (int)prev_n, prev);
    }
    if (fajit__variant_check(&v))
        return FAJIT_EPARSE;
    if (check_round_trip(&v, text))
        return FAJIT_EPARSE;
    *out = v;
    return 0;
}

/* ---------------------------------------------------------------- lenient parse */

static int is_blank(char c)
{
    return c == ' ' || c == '\t' || c == '\r' || c == '\n';
}

/* Next whitespace-separated token; 0 at the end. */
static size_t next_word(const char **p, const char **tok)
{
    const char *s = *p;
    while (is_blank(*s))
        s++;
    *tok = s;
    while (*s && !is_blank(*s))
        s++;
    *p = s;
    return (size_t)(s - *tok);
}

/* A spec is one variant: a list or range here is a manifest line given to the
 * wrong function, and saying so beats "unknown dtype". */
static int looks_like_list(const struct field *f, const char *s, size_t n)
{
    if (memchr(s, '.', n))
        return 1;
    return f->kind != K_WINDOW && memchr(s, ',', n) != NULL;
}

static int parse_spec_field(fajit__variant *v, const char *tok, size_t n, unsigned *seen)
{
    const char *eq = memchr(tok, '=', n);
    const struct field *f;
    size_t name_n, idx;

    if (!eq)
        return fajit__fail(FAJIT_EPARSE, "'%.*s%s': expected field=value",
                           (int)(n > ECHO_MAX ? ECHO_MAX : n), tok, n > ECHO_MAX ? "..." : "");
    name_n = (size_t)(eq - tok);
    if (!(f = field_by_name(tok, name_n)))
        return fajit__fail(FAJIT_EPARSE, "unknown field '%.*s' in '%.*s%s'",
                           (int)(name_n > ECHO_MAX ? ECHO_MAX : name_n), tok,
                           (int)(n > ECHO_MAX ? ECHO_MAX : n), tok, n > ECHO_MAX ? "..." : "");
    idx = (size_t)(f - fields);
    if (*seen & (1u << idx))
        return fajit__fail(FAJIT_EPARSE, "field '%s' given twice", f->name);
    *seen |= 1u << idx;
    if (looks_like_list(f, eq + 1, n - name_n - 1))
        return bad_value(f, eq + 1, n - name_n - 1,
                         "a spec takes one value (lists and ranges belong in manifests)");
    return parse_value(v, f, eq + 1, n - name_n - 1);
}

int fajit__spec_parse(const char *text, fajit__variant *out)
{
    fajit__variant v;
    const char *p = text, *tok;
    unsigned seen = 0;
    size_t n;

    fajit__variant_defaults(&v);
    if ((n = next_word(&p, &tok)) == 0)
        return fajit__fail(FAJIT_EPARSE, "empty spec (expected an op: ref, fwd or bwd)");
    if (memchr(tok, '=', n))
        return fajit__fail(FAJIT_EPARSE, "spec must start with the op (ref, fwd or bwd), found '%.*s%s'",
                           (int)(n > ECHO_MAX ? ECHO_MAX : n), tok, n > ECHO_MAX ? "..." : "");
    if (parse_op(tok, n, &v.op))
        return FAJIT_EPARSE;
    while ((n = next_word(&p, &tok)) != 0)
        if (parse_spec_field(&v, tok, n, &seen))
            return FAJIT_EPARSE;
    if (!(seen & 1u)) /* fields[0] is dqk */
        return fajit__fail(FAJIT_EPARSE, "dqk: required");
    if (!(seen & 2u))
        v.dv = v.dqk;
    if (check_variant(&v, 1))
        return FAJIT_EPARSE;
    *out = v;
    return 0;
}
