/*
 * tests/test_api_stampede.c - N processes ask for the same missing kernel at
 * the same moment through the public API: exactly one NVRTC compile, every
 * process gets the same entry, no errors.
 *
 *   test_api_stampede [N]     (default 8)
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#include "fajit.h"

#define SPEC "ref dqk=88 dv=56 dtype=fp16 mask=causal arch=sm_90"

/* Child: wait for the start signal, compile, report "<cached> <key> <bytes>". */
static int child(const char *dir, int start_fd, int report_fd)
{
    fajit_options o;
    fajit_ctx *ctx;
    fajit_compile_result r;
    char go, line[128];
    int rc, n;

    fajit_options_init(&o);
    o.cache_dir = dir;
    if (fajit_create(&ctx, &o) != 0)
        return 2;
    if (read(start_fd, &go, 1) != 1)
        return 3;
    rc = fajit_compile(ctx, SPEC, &r);
    fajit_destroy(ctx); /* flushes the counters */
    if (rc != 0) {
        fprintf(stderr, "child: %s\n", fajit_last_error());
        return 4;
    }
    n = snprintf(line, sizeof line, "%d %s %llu\n", r.cached, r.key_hex,
                 (unsigned long long)r.cubin_bytes);
    return write(report_fd, line, (size_t)n) == n ? 0 : 5;
}

int main(int argc, char **argv)
{
    int n = argc > 1 ? atoi(argv[1]) : 8, start[2], report[2], failures = 0, compiled = 0;
    char dir[] = "/tmp/fajit-stampede-XXXXXX", buf[8192], first[128] = "";
    fajit_cache_stats st;
    fajit_options o;
    fajit_ctx *ctx;

    if (!mkdtemp(dir) || pipe(start) || pipe(report))
        return 1;
    for (int i = 0; i < n; i++) {
        pid_t pid = fork();
        if (pid == 0)
            _exit(child(dir, start[0], report[1]));
    }
    close(report[1]);
    sleep(1); /* every child has its context open and is blocked on the pipe */
    for (int i = 0; i < n; i++)
        if (write(start[1], "g", 1) != 1)
            return 1;
    for (int i = 0; i < n; i++) {
        int status;
        wait(&status);
        if (!WIFEXITED(status) || WEXITSTATUS(status) != 0) {
            printf("FAIL a child exited with status %d\n", WEXITSTATUS(status));
            failures++;
        }
    }
    ssize_t got = read(report[0], buf, sizeof buf - 1);
    buf[got > 0 ? got : 0] = '\0';
    int lines = 0;
    for (char *line = strtok(buf, "\n"); line; line = strtok(NULL, "\n"), lines++) {
        compiled += line[0] == '0';
        if (!first[0])
            snprintf(first, sizeof first, "%s", line + 2);
        else if (strcmp(first, line + 2) != 0) {
            printf("FAIL entries differ: '%s' vs '%s'\n", first, line + 2);
            failures++;
        }
    }
    printf("%s %d of %d processes reported\n", lines == n ? "ok  " : "FAIL", lines, n);
    printf("%s %d process(es) compiled, the others read the entry\n",
           compiled == 1 ? "ok  " : "FAIL", compiled);
    failures += lines != n || compiled != 1;

    fajit_options_init(&o);
    o.cache_dir = dir;
    if (fajit_create(&ctx, &o) == 0 && fajit_cache_get_stats(ctx, &st) == 0) {
        printf("%s the store counted %llu compile(s) and holds %llu entry\n",
               st.compiles == 1 && st.entries == 1 ? "ok  " : "FAIL",
               (unsigned long long)st.compiles, (unsigned long long)st.entries);
        failures += !(st.compiles == 1 && st.entries == 1);
        fajit_destroy(ctx);
    } else {
        failures++;
    }
    snprintf(buf, sizeof buf, "rm -rf %s", dir);
    if (system(buf) != 0)
        printf("could not remove %s\n", dir);
    printf("%s: %d failure(s)\n", failures ? "FAIL" : "PASS", failures);
    return failures ? 1 : 0;
}
