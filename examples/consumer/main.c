/* Uses the installed library: completes a spec and compiles it (no GPU needed). */
#include <stdio.h>

#include <fajit.h>

int main(void)
{
    fajit_options opt;
    fajit_ctx *ctx;
    fajit_compile_result r;
    char text[400];

    fajit_options_init(&opt);
    opt.cache_mode = FAJIT_CACHE_OFF;
    if (fajit_create(&ctx, &opt) != 0 ||
        fajit_variant_complete(ctx, "ref dqk=100", text, sizeof text) < 0 ||
        fajit_compile(ctx, text, &r) != 0) {
        fprintf(stderr, "consumer: %s\n", fajit_last_error());
        return 1;
    }
    printf("fajit %s compiled '%s': %llu bytes of cubin\n", fajit_version(), text,
           (unsigned long long)r.cubin_bytes);
    fajit_destroy(ctx);
    return 0;
}
