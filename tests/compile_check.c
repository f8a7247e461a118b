/*
 * tests/compile_check.c - see compile_check.h.
 */
#include "compile_check.h"

#include <stdio.h>
#include <string.h>

#include "runtime/error.h"
#include "runtime/runtime.h"

/* Warnings located in a template file (NVRTC names them thanks to #line). */
static int count_template_warnings(const char *log)
{
    int n = 0;
    for (const char *p = log; (p = strstr(p, "warning")) != NULL; ++p) {
        const char *line = p;
        while (line > log && line[-1] != '\n')
            --line;
        if (strstr(line, ".cuh(") && strstr(line, ".cuh(") < p)
            ++n;
    }
    return n;
}

int compile_check_run(const fajit__variant *v, compile_check *c)
{
    fajit__compiled out;
    memset(c, 0, sizeof *c);
    if (fajit__compile_variant(v, &out) != 0) {
        const char *detail = fajit__detail(), *err = strstr(detail, "error");
        snprintf(c->why, sizeof c->why, "%.500s", err ? err : detail);
        fajit__compiled_free(&out);
        return -1;
    }
    c->ms = out.meta.compile_us / 1000.0;
    c->cubin_bytes = out.cubin_len;
    c->registers = (int)out.meta.registers;
    c->smem = (int)out.meta.smem_bytes;
    c->spills = (int)out.meta.spill_bytes;
    c->template_warnings = out.log ? count_template_warnings(out.log) : 0;
    fajit__compiled_free(&out);
    return 0;
}
