/*
 * codegen/manifest.c - manifest expansion: one spec a line, lists and ranges
 * in values, expanded to the product of the lists.
 *
 * Each combination is written out as a one-value spec and handed to
 * fajit__spec_parse, so a manifest line accepts exactly what a spec accepts and
 * reports a bad value with the same words. The whole manifest is expanded and
 * checked once before the callback sees anything: a typo on line 50 must not
 * surface after an hour of compiling lines 1-49.
 */
#include "codegen/variant.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "fajit.h"
#include "runtime/error.h"

/* More than this from one line is a typo (a range with a missing step), not a
 * plan: refuse it before materialising anything. */
#define MAX_PER_LINE 1000000LL
#define ECHO_MAX 64

enum vkind { V_INT, V_WORD, V_WINDOW };

/* Fields in canonical (struct) order: the product varies the last fastest.
 * The op is the slowest of all. Kept in step with fields[] in variant.c by
 * tests/test_manifest.c (a line naming every field must expand to the same
 * variant as the spec it spells). */
static const struct {
    const char *name;
    enum vkind kind;
} mfields[] = {
    {"dqk", V_INT},     {"dv", V_INT},      {"dtype", V_WORD}, {"mask", V_WORD},
    {"window", V_WINDOW}, {"dropout", V_INT}, {"softcap", V_INT}, {"alibi", V_INT},
    {"varlen", V_INT},  {"paged", V_INT},   {"bm", V_INT},     {"bn", V_INT},
    {"warps", V_INT},   {"stages", V_INT},  {"arch", V_WORD},
};
#define NMFIELDS ((int)(sizeof mfields / sizeof mfields[0]))
#define NSLOTS (NMFIELDS + 1) /* slot 0 is the op */

/* A literal (s, n) or an integer range lo, lo+step, ... (count values). */
struct atom {
    const char *s;
    size_t n;
    long long lo, step, count;
};

/* One list item: an atom, or for window a pair of atoms (left slower). */
struct item {
    struct atom side[2];
    int sides;
    long long count;
};

struct slot {
    const char *name;     /* NULL: not given on this line */
    const char *value;    /* the whole value text, for errors */
    size_t value_n;
    struct item *items;
    int nitems;
    long long count;
};

struct line {
    int number;
    struct slot slot[NSLOTS];
};

static int line_fail(const struct line *ln, const char *name, const char *s, size_t n, const char *why)
{
    return fajit__fail(FAJIT_EPARSE, "line %d: %s=%.*s%s: %s", ln->number, name,
                       (int)(n > ECHO_MAX ? ECHO_MAX : n), s, n > ECHO_MAX ? "..." : "", why);
}

/* ---------------------------------------------------------------- values */

static int parse_ll(const char *s, size_t n, long long *out)
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
    for (; i < n; i++) {
        if (s[i] < '0' || s[i] > '9')
            return -1;
        x = x * 10 + (s[i] - '0');
    }
    *out = neg ? -x : x;
    return 0;
}

/* "lo..hi" or "lo..hi:step" (inclusive); anything without ".." is a literal
 * that fajit__spec_parse will judge. */
static int parse_atom(const struct line *ln, const char *name, const char *s, size_t n,
                      int ranges_ok, struct atom *a)
{
    const char *dots = NULL, *colon;
    for (size_t i = 0; i + 1 < n && !dots; i++)
        if (s[i] == '.' && s[i + 1] == '.')
            dots = s + i;
    memset(a, 0, sizeof *a);
    if (n == 0)
        return line_fail(ln, name, s, n, "missing value");
    if (!dots) {
        a->s = s;
        a->n = n;
        a->count = 1;
        return 0;
    }
    if (!ranges_ok)
        return line_fail(ln, name, s, n, "ranges are only for integer fields");
    colon = memchr(dots, ':', n - (size_t)(dots - s));
    const char *hi_s = dots + 2, *end = s + n;
    long long hi;
    a->step = 1;
    if (parse_ll(s, (size_t)(dots - s), &a->lo) ||
        parse_ll(hi_s, (size_t)((colon ? colon : end) - hi_s), &hi) ||
        (colon && parse_ll(colon + 1, (size_t)(end - colon - 1), &a->step)))
        return line_fail(ln, name, s, n, "bad range (expected lo..hi or lo..hi:step, integers)");
    if (a->step < 1)
        return line_fail(ln, name, s, n, "range step must be >= 1");
    if (hi < a->lo)
        return line_fail(ln, name, s, n, "empty range");
    a->count = (hi - a->lo) / a->step + 1;
    return 0;
}

static int parse_item(const struct line *ln, const char *name, enum vkind kind, const char *s,
                      size_t n, struct item *it)
{
    const char *comma;
    memset(it, 0, sizeof *it);
    if (kind != V_WINDOW) {
        it->sides = 1;
        if (parse_atom(ln, name, s, n, kind == V_INT, &it->side[0]))
            return FAJIT_EPARSE;
        it->count = it->side[0].count;
        return 0;
    }
    if (!(comma = memchr(s, ',', n)))
        return line_fail(ln, name, s, n, "expected L,R (each an integer or a range)");
    it->sides = 2;
    if (parse_atom(ln, name, s, (size_t)(comma - s), 1, &it->side[0]) ||
        parse_atom(ln, name, comma + 1, n - (size_t)(comma - s) - 1, 1, &it->side[1]))
        return FAJIT_EPARSE;
    if (it->side[0].count > MAX_PER_LINE || it->side[1].count > MAX_PER_LINE)
        return line_fail(ln, name, s, n, "range too long");
    it->count = it->side[0].count * it->side[1].count;
    return 0;
}

/* Window values hold a comma themselves, so a list of windows is ';'-separated. */
static int parse_slot_items(const struct line *ln, struct slot *sl, enum vkind kind)
{
    char sep = kind == V_WINDOW ? ';' : ',';
    const char *s = sl->value, *end = s + sl->value_n;
    int cap = 1;

    if (sl->value_n == 0)
        return line_fail(ln, sl->name, s, 0, "missing value");
    for (const char *p = s; p < end; p++)
        cap += *p == sep;
    if (!(sl->items = calloc((size_t)cap, sizeof *sl->items)))
        return fajit__fail(FAJIT_ENOMEM, "line %d: out of memory", ln->number);
    sl->count = 0;
    while (1) {
        const char *e = memchr(s, sep, (size_t)(end - s));
        struct item *it = &sl->items[sl->nitems];
        if ((e ? e : end) == s)
            return line_fail(ln, sl->name, sl->value, sl->value_n, "empty item in list");
        if (parse_item(ln, sl->name, kind, s, (size_t)((e ? e : end) - s), it))
            return FAJIT_EPARSE;
        sl->nitems++;
        sl->count += it->count;
        if (sl->count > MAX_PER_LINE)
            return fajit__fail(FAJIT_EPARSE, "line %d: %s=%.*s: expands to more than %lld values",
                               ln->number, sl->name, (int)(sl->value_n > ECHO_MAX ? ECHO_MAX : sl->value_n),
                               sl->value, MAX_PER_LINE);
        if (!e)
            return 0;
        s = e + 1;
    }
}

/* Writes value number k of a slot (0 <= k < count) at out; returns its length. */
static size_t atom_text(const struct atom *a, long long k, char *out)
{
    if (a->s) {
        memcpy(out, a->s, a->n);
        return a->n;
    }
    return (size_t)sprintf(out, "%lld", a->lo + k * a->step);
}

static size_t slot_text(const struct slot *sl, long long k, char *out)
{
    const struct item *it = sl->items;
    while (k >= it->count)
        k -= it++->count;
    if (it->sides == 1)
        return atom_text(&it->side[0], k, out);
    size_t n = atom_text(&it->side[0], k / it->side[1].count, out);
    out[n++] = ',';
    return n + atom_text(&it->side[1], k % it->side[1].count, out + n);
}

/* ---------------------------------------------------------------- lines */

static void free_line(struct line *ln)
{
    for (int i = 0; i < NSLOTS; i++)
        free(ln->slot[i].items);
}

static int slot_of(const char *s, size_t n)
{
    for (int i = 0; i < NMFIELDS; i++)
        if (strlen(mfields[i].name) == n && memcmp(mfields[i].name, s, n) == 0)
            return i + 1;
    return -1;
}

static int is_blank(char c)
{
    return c == ' ' || c == '\t' || c == '\r';
}

static int add_field_token(struct line *ln, const char *tok, size_t n)
{
    const char *eq = memchr(tok, '=', n);
    int i;
    if (!eq)
        return fajit__fail(FAJIT_EPARSE, "line %d: '%.*s': expected field=value", ln->number,
                           (int)(n > ECHO_MAX ? ECHO_MAX : n), tok);
    if ((i = slot_of(tok, (size_t)(eq - tok))) < 0)
        return fajit__fail(FAJIT_EPARSE, "line %d: %.*s: unknown field '%.*s'", ln->number,
                           (int)(n > ECHO_MAX ? ECHO_MAX : n), tok, (int)(eq - tok), tok);
    if (ln->slot[i].name)
        return fajit__fail(FAJIT_EPARSE, "line %d: field '%s' given twice", ln->number,
                           mfields[i - 1].name);
    ln->slot[i].name = mfields[i - 1].name;
    ln->slot[i].value = eq + 1;
    ln->slot[i].value_n = n - (size_t)(eq + 1 - tok);
    return parse_slot_items(ln, &ln->slot[i], mfields[i - 1].kind);
}

/* Splits a line (comment already cut) into its slots. Returns 1 for a blank
 * line, 0 for a spec, or an error. */
static int parse_line(struct line *ln, const char *s, const char *end)
{
    int first = 1;
    while (1) {
        while (s < end && is_blank(*s))
            s++;
        if (s == end)
            return first ? 1 : 0;
        const char *tok = s;
        while (s < end && !is_blank(*s))
            s++;
        size_t n = (size_t)(s - tok);
        if (first && memchr(tok, '=', n))
            return fajit__fail(FAJIT_EPARSE, "line %d: a spec starts with the op (ref, fwd or bwd), found '%.*s'",
                               ln->number, (int)(n > ECHO_MAX ? ECHO_MAX : n), tok);
        if (first) {
            ln->slot[0].name = "op";
            ln->slot[0].value = tok;
            ln->slot[0].value_n = n;
            if (parse_slot_items(ln, &ln->slot[0], V_WORD))
                return FAJIT_EPARSE;
        } else if (add_field_token(ln, tok, n)) {
            return FAJIT_EPARSE;
        }
        first = 0;
    }
}

static int check_line_size(const struct line *ln)
{
    long long total = 1;
    for (int i = 0; i < NSLOTS; i++) {
        if (!ln->slot[i].name)
            continue;
        if (ln->slot[i].count > MAX_PER_LINE / total)
            return fajit__fail(FAJIT_EPARSE, "line %d: expands to more than %lld variants",
                               ln->number, MAX_PER_LINE);
        total *= ln->slot[i].count;
    }
    return 0;
}

/* Writes combination idx[] as a one-value spec into buf. */
static void spell_spec(const struct line *ln, const long long *idx, char *buf)
{
    size_t n = slot_text(&ln->slot[0], idx[0], buf);
    for (int i = 1; i < NSLOTS; i++) {
        if (!ln->slot[i].name)
            continue;
        n += (size_t)sprintf(buf + n, " %s=", ln->slot[i].name);
        n += slot_text(&ln->slot[i], idx[i], buf + n);
    }
    buf[n] = '\0';
}

/* Odometer over the given slots, last slot fastest. */
static int next_combination(const struct line *ln, long long *idx)
{
    for (int i = NSLOTS - 1; i >= 0; i--) {
        if (!ln->slot[i].name)
            continue;
        if (++idx[i] < ln->slot[i].count)
            return 1;
        idx[i] = 0;
    }
    return 0;
}

static int emit_line(const struct line *ln, size_t line_len, fajit__variant_cb cb, void *user)
{
    long long idx[NSLOTS] = {0};
    /* Each value is a literal from the line or at most two numbers of at most
     * 20 chars, after " name=". */
    char *buf = malloc(line_len + (size_t)NSLOTS * 64 + 1);
    fajit__variant v;
    int rc = 0;

    if (!buf)
        return fajit__fail(FAJIT_ENOMEM, "line %d: out of memory", ln->number);
    do {
        spell_spec(ln, idx, buf);
        if (fajit__spec_parse(buf, &v)) {
            rc = fajit__fail_prefix(FAJIT_EPARSE, "line %d", ln->number);
            break;
        }
        if (cb && (rc = cb(user, &v, ln->number)) != 0)
            break;
    } while (next_combination(ln, idx));
    free(buf);
    return rc;
}

static int expand_line(const char *s, const char *end, int number, fajit__variant_cb cb, void *user)
{
    struct line ln;
    const char *hash = memchr(s, '#', (size_t)(end - s));
    int rc;

    memset(&ln, 0, sizeof ln);
    ln.number = number;
    if (hash)
        end = hash;
    rc = parse_line(&ln, s, end);
    if (rc == 1) /* blank or comment only */
        rc = 0;
    else if (rc == 0 && (rc = check_line_size(&ln)) == 0)
        rc = emit_line(&ln, (size_t)(end - s), cb, user);
    free_line(&ln);
    return rc;
}

/* cb NULL: check every line and every combination, call nothing. */
static int walk_manifest(const char *text, fajit__variant_cb cb, void *user)
{
    const char *s = text;
    int number = 1;
    while (*s) {
        const char *nl = strchr(s, '\n'), *end = nl ? nl : s + strlen(s);
        int rc = expand_line(s, end, number, cb, user);
        if (rc)
            return rc;
        if (!nl)
            break;
        s = nl + 1;
        number++;
    }
    return 0;
}

int fajit__manifest_expand(const char *text, fajit__variant_cb cb, void *user)
{
    int rc = walk_manifest(text, NULL, NULL);
    if (rc)
        return rc;
    return cb ? walk_manifest(text, cb, user) : 0;
}
