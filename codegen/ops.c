/*
 * codegen/ops.c - what each op is made of: its template and its kernel's name.
 * The one table both the renderer and the runtime's loader read.
 */
#include "codegen/variant.h"

static const struct {
    const char *template_name;
    const char *entry_name;
} ops[FAJIT__OP_COUNT] = {
    [FAJIT__OP_REF] = {"reference.cuh", "fajit_ref_fwd"},
    [FAJIT__OP_FWD] = {"flash_fwd.cuh", "fajit_flash_fwd"},
    [FAJIT__OP_BWD] = {"flash_bwd.cuh", "fajit_flash_bwd"},
    [FAJIT__OP_REF_DQ] = {"reference_bwd.cuh", "fajit_ref_bwd_dq"},
    [FAJIT__OP_REF_DKDV] = {"reference_bwd.cuh", "fajit_ref_bwd_dkdv"},
};

const char *fajit__variant_entry_name(const fajit__variant *v)
{
    return v->op >= 0 && v->op < FAJIT__OP_COUNT ? ops[v->op].entry_name : NULL;
}

const char *fajit__variant_template_name(const fajit__variant *v)
{
    return v->op >= 0 && v->op < FAJIT__OP_COUNT ? ops[v->op].template_name : NULL;
}

size_t fajit__variant_smem_bytes(const fajit__variant *v)
{
    switch (v->op) {
    case FAJIT__OP_REF:
    default:
        return 0; /* static shared memory only */
    }
}
