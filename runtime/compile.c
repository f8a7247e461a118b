/*
 * runtime/compile.c - NVRTC: rendered source to cubin, with resource usage.
 *
 * Compiles happen in memory, with no include path: everything a kernel needs
 * is inlined by the renderer. ptxas' verbose report is parsed for registers,
 * shared memory and spills, so they are known without a GPU.
 */
#include <nvrtc.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "cache/hooks.h"
#include "runtime/runtime.h"

/* Fixed options; the arch option is added per variant. Changing this text
 * changes the build identity, hence every key. */
/* --no-cache: our store is the cache. NVRTC's own (in ~/.nv when a driver is
 * present) would skip ptxas on a repeat and leave no resource usage to record. */
static const char *const fixed_options[] = {"-std=c++17", "--ptxas-options=-v", "--no-cache"};
#define N_FIXED (sizeof fixed_options / sizeof fixed_options[0])

static char options_text[256];
static pthread_once_t options_once = PTHREAD_ONCE_INIT;

static void join_options(void)
{
    size_t n = 0;
    for (size_t i = 0; i < N_FIXED; i++)
        n += (size_t)snprintf(options_text + n, sizeof options_text - n, "%s ", fixed_options[i]);
    snprintf(options_text + n, sizeof options_text - n, "--gpu-architecture=sm_<arch>");
}

const char *fajit__nvrtc_options_text(void)
{
    pthread_once(&options_once, join_options);
    return options_text;
}

uint32_t fajit__nvrtc_version(void)
{
    int major = 0, minor = 0;
    if (nvrtcVersion(&major, &minor) != NVRTC_SUCCESS)
        return 0;
    return (uint32_t)(major * 1000 + minor * 10);
}

static double now_us(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec * 1e6 + ts.tv_nsec / 1e3;
}

/* Sum of every "<n> <unit>" number following `tag` in log[0, end). */
static uint32_t sum_after(const char *log, const char *end, const char *tag, const char *unit)
{
    uint32_t total = 0;
    for (const char *p = strstr(log, tag); p && p < end; p = strstr(p + 1, tag)) {
        const char *q = p + strlen(tag);
        unsigned long n;
        char *stop;
        while (*q == ' ')
            q++;
        n = strtoul(q, &stop, 10);
        if (stop != q && strncmp(stop, unit, strlen(unit)) == 0)
            total += (uint32_t)n;
    }
    return total;
}

/* Sum of every number written just before `tag` ("8 bytes spill") in
 * log[0, end). */
static uint32_t sum_before(const char *log, const char *end, const char *tag)
{
    uint32_t total = 0;
    for (const char *p = strstr(log, tag); p && p < end; p = strstr(p + 1, tag)) {
        const char *q = p;
        while (q > log && q[-1] == ' ')
            q--;
        while (q > log && q[-1] >= '0' && q[-1] <= '9')
            q--;
        total += (uint32_t)strtoul(q, NULL, 10);
    }
    return total;
}

/* ptxas lines in log[0, end): "Used 40 registers, used 1 barriers, 1024
 * bytes smem" and "0 bytes stack frame, 8 bytes spill stores, 8 bytes spill
 * loads". */
static void parse_resource_usage(const char *log, const char *end, fajit__entry_meta *m)
{
    m->registers = sum_after(log, end, "Used", " registers");
    m->spill_bytes = sum_before(log, end, "bytes spill");
    m->smem_bytes = sum_before(log, end, "bytes smem");
}

/* ptxas reports each kernel in turn from "Compiling entry function '<name>'":
 * the resources recorded are those of the variant's own kernel (a template may
 * define others, e.g. the reference backward's empty twin). The section is
 * parsed in place: a copy could fail for want of memory and silently widen
 * the sums to every kernel. */
static void parse_entry_resources(const char *log, const char *entry, fajit__entry_meta *m)
{
    char marker[160];
    const char *at, *next;
    snprintf(marker, sizeof marker, "entry function '%s'", entry ? entry : "");
    at = entry ? strstr(log, marker) : NULL;
    if (!at) {
        parse_resource_usage(log, log + strlen(log), m);
        return;
    }
    next = strstr(at + strlen(marker), "Compiling entry function");
    parse_resource_usage(at, next ? next : at + strlen(at), m);
}

/* NVRTC's log (*log NULL when it has none). Without memory for it the
 * kernel is still good: *lost is set (the ptxas report in the log is the
 * entry's resource usage, so such a kernel is used but not stored) and the
 * detail says why. */
static void program_log(nvrtcProgram prog, char **log, int *lost)
{
    size_t n = 0;
    *log = NULL;
    *lost = 0;
    if (nvrtcGetProgramLogSize(prog, &n) != NVRTC_SUCCESS || n == 0)
        return;
    *log = fajit__malloc(n + 1);
    if (!*log) {
        *lost = 1;
        fajit__fail(FAJIT_ENOMEM, "NVRTC log of %zu bytes", n + 1);
        return;
    }
    if (nvrtcGetProgramLog(prog, *log) != NVRTC_SUCCESS)
        (*log)[0] = '\0';
    (*log)[n] = '\0';
}

/* The cubin, in a buffer with FAJIT__ENTRY_ROOM spare bytes after it, so
 * that runtime/kernels.c makes the cache entry in place (no allocation that
 * could lose the kernel between the compile and the store). */
static int take_cubin(nvrtcProgram prog, fajit__compiled *out)
{
    size_t n = 0;
    if (nvrtcGetCUBINSize(prog, &n) != NVRTC_SUCCESS || n == 0)
        return fajit__fail(FAJIT_ECOMPILE, "NVRTC produced no cubin");
    if (n > SIZE_MAX - FAJIT__ENTRY_ROOM)
        return fajit__fail(FAJIT_ECOMPILE, "NVRTC cubin of %zu bytes", n);
    out->cubin = fajit__malloc(n + FAJIT__ENTRY_ROOM);
    if (!out->cubin)
        return fajit__fail(FAJIT_ENOMEM, "cubin of %zu bytes", n + FAJIT__ENTRY_ROOM);
    if (nvrtcGetCUBIN(prog, (char *)out->cubin) != NVRTC_SUCCESS) {
        free(out->cubin);
        out->cubin = NULL;
        return fajit__fail(FAJIT_ECOMPILE, "nvrtcGetCUBIN failed");
    }
    out->cubin_len = n;
    return 0;
}

static int run_nvrtc(const char *src, const char *name, const fajit__variant *v,
                     fajit__compiled *out)
{
    const char *opts[N_FIXED + 1];
    char arch_opt[48], text[FAJIT__VARIANT_TEXT_MAX];
    nvrtcProgram prog;
    nvrtcResult r;
    char *log;
    int rc;
    double t0 = now_us();

    snprintf(arch_opt, sizeof arch_opt, "--gpu-architecture=sm_%d%s", v->arch,
             v->arch_suffix ? "a" : "");
    memcpy(opts, fixed_options, sizeof fixed_options);
    opts[N_FIXED] = arch_opt;
    r = nvrtcCreateProgram(&prog, src, name, 0, NULL, NULL);
    if (r != NVRTC_SUCCESS)
        return fajit__fail(FAJIT_ECOMPILE, "nvrtcCreateProgram: %s", nvrtcGetErrorString(r));
    r = nvrtcCompileProgram(prog, (int)(N_FIXED + 1), opts);
    program_log(prog, &log, &out->no_report);
    if (r != NVRTC_SUCCESS) {
        fajit__variant_format(v, text, sizeof text);
        rc = fajit__fail(FAJIT_ECOMPILE, "NVRTC failed (%s) for '%s':\n%s", nvrtcGetErrorString(r),
                         text, log ? log : "(no log)");
        goto destroy_program;
    }
    rc = take_cubin(prog, out);
    if (rc == 0) {
        parse_entry_resources(log ? log : "", fajit__variant_entry_name(v), &out->meta);
        out->meta.compile_us = (uint32_t)(now_us() - t0);
        out->log = log; /* kept: the compile tests read its warnings */
        log = NULL;
    }
destroy_program:
    free(log);
    nvrtcDestroyProgram(&prog);
    return rc;
}

int fajit__compile_variant(const fajit__variant *v, fajit__compiled *out)
{
    char *src = NULL;
    size_t len = 0;
    const char *entry = NULL;
    int rc;

    memset(out, 0, sizeof *out);
    rc = fajit__render(v, &src, &len, &entry);
    if (rc != 0)
        return rc;
    rc = run_nvrtc(src, "fajit_kernel.cu", v, out);
    free(src);
    if (rc != 0)
        return rc;
    out->meta.arch = (uint32_t)v->arch;
    out->meta.arch_suffix = (uint32_t)v->arch_suffix;
    out->meta.nvrtc_version = fajit__nvrtc_version();
    return 0;
}

void fajit__compiled_free(fajit__compiled *c)
{
    if (!c)
        return;
    free(c->cubin);
    free(c->log);
    c->cubin = NULL;
    c->log = NULL;
    c->cubin_len = 0;
}
