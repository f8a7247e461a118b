/*
 * tests/fuzz/fuzz_entry.c - the decoders of bytes read from disk: the cache
 * entry (fajit__entry_decode), the bundle (fajit__bundle_parse) and the
 * serialised variant in an entry's full key (fajit__variant_deserialize).
 * Invariants: a decoded entry's parts lie inside the input and re-encode to
 * the same bytes; a parsed bundle's entries lie inside the input.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cache/entry.h"
#include "codegen/variant.h"
#include "fuzz.h"

static void check_entry(const uint8_t *data, size_t size)
{
    fajit__entry_view view;
    fajit__variant v;
    const char *why = NULL;
    if (fajit__entry_decode(data, size, &view, &why) != 0) {
        FUZZ_ASSERT(why != NULL);
        return;
    }
    FUZZ_ASSERT(view.full_key >= data && view.full_key + view.full_key_len <= data + size);
    FUZZ_ASSERT(view.cubin >= data && view.cubin + view.cubin_len == data + size);
    uint8_t *again = NULL;
    size_t len = 0;
    FUZZ_ASSERT(fajit__entry_encode(&view.meta, view.full_key, view.full_key_len, view.cubin,
                                    view.cubin_len, &again, &len) == 0);
    FUZZ_ASSERT(len == size && memcmp(again, data, size) == 0);
    free(again);
    if (view.full_key_len >= 16)
        fajit__variant_deserialize(view.full_key, view.full_key_len - 16, &v);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    fajit__bundle_view b;
    fajit__variant v;
    check_entry(data, size);
    fajit__variant_deserialize(data, size, &v);
    if (fajit__bundle_parse(data, size, &b, NULL, NULL) == 0) {
        for (size_t i = 0; i < b.count; i++) {
            const uint8_t *key, *entry;
            size_t len;
            fajit__bundle_item(&b, i, &key, &entry, &len);
            FUZZ_ASSERT(entry >= data && entry + len <= data + size);
            check_entry(entry, len);
        }
    }
    return 0;
}
