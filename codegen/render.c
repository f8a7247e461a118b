/*
 * codegen/render.c - CUDA source for a variant, and the codegen digest.
 *
 * The source is: one comment line with the canonical text, a prelude of
 * `static constexpr int FAJIT_...` constants, then the op's template with every
 * `#include "name"` of an embedded file replaced by that file (recursively,
 * each file once, `#pragma once` lines blanked). Templates choose code paths
 * with `if constexpr` on the constants; no C++ is written from here. `#line`
 * directives keep NVRTC's messages pointing at the template files' own lines.
 * Which template and kernel name an op uses is codegen/ops.c's table.
 */
#include "codegen/variant.h"

#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define XXH_STATIC_LINKING_ONLY /* XXH3_state_t on the stack: no allocation to fail */
#include <xxhash.h>

#include "codegen/embedded.h"
#include "fajit.h"
#include "runtime/error.h"

/* ---------------------------------------------------------------- growable text */

struct sbuf {
    char *p;
    size_t len, cap;
};

static int sb_put(struct sbuf *b, const char *s, size_t n)
{
    if (b->len + n + 1 > b->cap) {
        size_t cap = b->cap ? b->cap : 4096;
        while (cap < b->len + n + 1)
            cap *= 2;
        char *p = realloc(b->p, cap);
        if (!p)
            return fajit__fail(FAJIT_ENOMEM, "render: out of memory for %zu bytes of source", cap);
        b->p = p;
        b->cap = cap;
    }
    memcpy(b->p + b->len, s, n);
    b->len += n;
    b->p[b->len] = '\0';
    return 0;
}

static int sb_printf(struct sbuf *b, const char *fmt, ...) FAJIT__PRINTF(2, 3);
static int sb_printf(struct sbuf *b, const char *fmt, ...)
{
    char tmp[512];
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(tmp, sizeof tmp, fmt, ap);
    va_end(ap);
    if (n < 0 || (size_t)n >= sizeof tmp)
        return fajit__fail(FAJIT_EINVAL, "render: internal error: line too long");
    return sb_put(b, tmp, (size_t)n);
}

/* ---------------------------------------------------------------- prelude */

static int put_prelude(struct sbuf *b, const fajit__variant *v, const char *text)
{
    const struct {
        const char *name;
        int value;
    } c[] = {
        {"FAJIT_OP", v->op},         {"FAJIT_DQK", v->dqk},
        {"FAJIT_DV", v->dv},         {"FAJIT_DTYPE", v->dtype},
        {"FAJIT_MASK", v->mask},     {"FAJIT_WINDOW_LEFT", v->window_left},
        {"FAJIT_WINDOW_RIGHT", v->window_right}, {"FAJIT_DROPOUT", v->dropout},
        {"FAJIT_SOFTCAP", v->softcap}, {"FAJIT_ALIBI", v->alibi},
        {"FAJIT_VARLEN", v->varlen}, {"FAJIT_PAGED", v->paged},
        {"FAJIT_BM", v->bm},         {"FAJIT_BN", v->bn},
        {"FAJIT_WARPS", v->warps},   {"FAJIT_STAGES", v->stages},
        {"FAJIT_SMEM_BYTES", (int)fajit__variant_smem_bytes(v)},
        {"FAJIT_PERSIST", fajit__fwd_persistent(v)},
        {"FAJIT_ARCH", v->arch},
    };
    if (sb_printf(b, "// fajit variant: %s\n", text))
        return FAJIT_ENOMEM;
    for (size_t i = 0; i < sizeof c / sizeof c[0]; i++)
        if (sb_printf(b, "static constexpr int %s = %d;\n", c[i].name, c[i].value))
            return FAJIT_ENOMEM;
    return 0;
}

/* ---------------------------------------------------------------- includes */

static int find_embedded(const char *name, size_t n)
{
    for (size_t i = 0; i < fajit__embedded_count; i++)
        if (strlen(fajit__embedded_files[i].name) == n && memcmp(fajit__embedded_files[i].name, name, n) == 0)
            return (int)i;
    return -1;
}

static const char *skip_ws(const char *s, const char *end)
{
    while (s < end && (*s == ' ' || *s == '\t'))
        s++;
    return s;
}

/* s..end is one line; returns s past `word` at the line's directive, or NULL. */
static const char *directive(const char *s, const char *end, const char *word)
{
    size_t n = strlen(word);
    s = skip_ws(s, end);
    if (s == end || *s != '#')
        return NULL;
    s = skip_ws(s + 1, end);
    if ((size_t)(end - s) < n || memcmp(s, word, n) != 0)
        return NULL;
    return s + n;
}

static int is_pragma_once(const char *s, const char *end)
{
    const char *p = directive(s, end, "pragma");
    if (!p || p == end || (*p != ' ' && *p != '\t'))
        return 0;
    p = skip_ws(p, end);
    if ((size_t)(end - p) < 4 || memcmp(p, "once", 4) != 0)
        return 0;
    return skip_ws(p + 4, end) == end || (end - p > 4 && p[4] == '\r');
}

/* `#include "name"`: the name's start and length; angle includes are left to
 * NVRTC's built-in headers. */
static int quoted_include(const char *s, const char *end, const char **name, size_t *n)
{
    const char *p = directive(s, end, "include"), *close;
    if (!p)
        return 0;
    p = skip_ws(p, end);
    if (p == end || *p != '"' || !(close = memchr(p + 1, '"', (size_t)(end - p - 1))))
        return 0;
    *name = p + 1;
    *n = (size_t)(close - p - 1);
    return 1;
}

static int inline_file(struct sbuf *b, size_t idx, unsigned char *done);

static int inline_include(struct sbuf *b, const char *from, int lineno, const char *name, size_t n,
                          unsigned char *done)
{
    int k = find_embedded(name, n);
    if (k < 0)
        return fajit__fail(FAJIT_EINVAL, "%s:%d: #include \"%.*s\": not an embedded file (not in templates/)",
                           from, lineno, (int)n, name);
    if (done[k])
        return sb_put(b, "\n", 1);
    done[k] = 1;
    int rc = inline_file(b, (size_t)k, done);
    if (rc)
        return rc;
    return sb_printf(b, "#line %d \"%s\"\n", lineno + 1, from);
}

static int inline_file(struct sbuf *b, size_t idx, unsigned char *done)
{
    const struct fajit__embedded_file *f = &fajit__embedded_files[idx];
    const char *s = (const char *)f->data, *end = s + f->len, *name;
    int lineno = 0, rc = 0;
    size_t n;

    if (sb_printf(b, "#line 1 \"%s\"\n", f->name))
        return FAJIT_ENOMEM;
    while (s < end && rc == 0) {
        const char *nl = memchr(s, '\n', (size_t)(end - s)), *eol = nl ? nl : end;
        lineno++;
        if (is_pragma_once(s, eol))
            rc = sb_put(b, "\n", 1); /* blank, so line numbers stay right */
        else if (quoted_include(s, eol, &name, &n))
            rc = inline_include(b, f->name, lineno, name, n, done);
        else if ((rc = sb_put(b, s, (size_t)(eol - s))) == 0)
            rc = sb_put(b, "\n", 1);
        s = nl ? nl + 1 : end;
    }
    return rc;
}

/* ---------------------------------------------------------------- render */

static int render_into(struct sbuf *b, const fajit__variant *v, const char *text, int top)
{
    unsigned char *done = calloc(fajit__embedded_count + 1, 1);
    int rc;
    if (!done)
        return fajit__fail(FAJIT_ENOMEM, "render: out of memory");
    done[top] = 1;
    rc = put_prelude(b, v, text);
    if (rc == 0)
        rc = inline_file(b, (size_t)top, done);
    free(done);
    return rc;
}

int fajit__render(const fajit__variant *v, char **src, size_t *len, const char **entry)
{
    char text[FAJIT__VARIANT_TEXT_MAX];
    const char *tpl;
    struct sbuf b = {0};
    int top, rc;

    *src = NULL;
    *len = 0;
    if (fajit__variant_format(v, text, sizeof text) < 0)
        return FAJIT_EINVAL;
    tpl = fajit__variant_template_name(v); /* op is valid: format checked it */
    if ((top = find_embedded(tpl, strlen(tpl))) < 0)
        return fajit__fail(FAJIT_EUNSUPPORTED, "no template %s embedded (needed by '%s')", tpl, text);
    rc = render_into(&b, v, text, top);
    if (rc) {
        free(b.p);
        return rc;
    }
    *src = b.p;
    *len = b.len;
    if (entry)
        *entry = fajit__variant_entry_name(v);
    return 0;
}

/* ---------------------------------------------------------------- digest */

static uint8_t codegen_digest[16];
static pthread_once_t codegen_digest_once = PTHREAD_ONCE_INIT;

static void hash_u64(XXH3_state_t *st, uint64_t x)
{
    uint8_t le[8];
    for (int i = 0; i < 8; i++)
        le[i] = (uint8_t)(x >> (8 * i));
    XXH3_128bits_update(st, le, sizeof le);
}

/* Each file as name, NUL, u64 LE length, bytes: unambiguous however names and
 * contents are split. */
static void compute_codegen_digest(void)
{
    XXH3_state_t st;
    XXH128_canonical_t c;

    XXH3_INITSTATE(&st);
    XXH3_128bits_reset(&st);
    for (size_t i = 0; i < fajit__embedded_count; i++) {
        const struct fajit__embedded_file *f = &fajit__embedded_files[i];
        XXH3_128bits_update(&st, f->name, strlen(f->name) + 1);
        hash_u64(&st, f->len);
        XXH3_128bits_update(&st, f->data, f->len);
    }
    XXH3_128bits_update(&st, fajit__codegen_sources_sha256, 32);
    XXH128_canonicalFromHash(&c, XXH3_128bits_digest(&st));
    memcpy(codegen_digest, c.digest, sizeof codegen_digest);
}

const uint8_t *fajit__codegen_digest(void)
{
    pthread_once(&codegen_digest_once, compute_codegen_digest);
    return codegen_digest;
}
