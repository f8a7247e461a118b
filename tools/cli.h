/*
 * tools/cli.h - the `fajit` command-line tool and `fajit-prebuild`.
 *
 * Both executables are thin clients of the public header include/fajit.h; they
 * never reach into the library's internals. main_fajit.c and main_prebuild.c
 * only call the two entry points below; everything else lives in cli.c
 * (option parsing, the cache subcommands, JSON output) and prebuild.c.
 */
#ifndef FAJIT_TOOLS_CLI_H
#define FAJIT_TOOLS_CLI_H

#include <stdio.h>

#include "fajit.h"

/* Exit codes, documented in tools/README.md and in every --help. */
enum fajit_cli_exit {
    FAJIT_EXIT_OK = 0,       /* success */
    FAJIT_EXIT_FAILED = 1,   /* the operation failed (a variant did not compile,
                                verify found bad entries without --fix...) */
    FAJIT_EXIT_USAGE = 2,    /* bad command line, spec or manifest */
    FAJIT_EXIT_NOTFOUND = 3, /* no cache entry matches the key */
    FAJIT_EXIT_NOGPU = 4     /* tune: no GPU to time on (the compile phase ran) */
};

/* `fajit [GLOBAL OPTIONS] COMMAND [ARGS]`. Returns the process exit code. */
int fajit_cli_main(int argc, char **argv);

/* `fajit-prebuild [ARGS]`, the same as `fajit prebuild [ARGS]`. */
int fajit_cli_prebuild_main(int argc, char **argv);

/* ---------------------------------------------------------------- shared by cli.c and prebuild.c */

/* Options accepted before or after the subcommand. */
typedef struct fajit__cli_global {
    const char *prog;      /* name used in messages: "fajit" or "fajit-prebuild" */
    const char *cache_dir; /* --cache-dir, NULL: the library's default */
    int cache_mode;        /* --cache-mode, FAJIT_CACHE_DEFAULT if not given */
    int verbose;           /* -v: library log level info, to stderr */
} fajit__cli_global;

/* Creates the library context the options ask for; on failure prints why,
 * sets *exit_code and returns NULL. */
fajit_ctx *fajit__cli_open(const fajit__cli_global *g, int *exit_code);

/* Prints "PROG: WHAT: <status text>: <detail>" to stderr and returns the exit
 * code for status (see fajit__cli_exit_code). */
int fajit__cli_report(const fajit__cli_global *g, const char *what, int status);

/* Exit code for a library status: parse and argument errors are the user's
 * (2), a missing entry is 3, anything else is 1. */
int fajit__cli_exit_code(int status);

/* Prints "PROG: msg" to stderr and returns FAJIT_EXIT_USAGE. */
int fajit__cli_usage_error(const fajit__cli_global *g, const char *fmt, ...)
    __attribute__((format(printf, 2, 3)));

/* Writes s as a JSON string literal, quotes included, escaping what RFC 8259
 * requires (quote, backslash, control characters). NULL is written as null. */
void fajit__cli_json_string(FILE *f, const char *s);

/* Writes a finite double as a JSON number (JSON has no NaN or infinity: null). */
void fajit__cli_json_number(FILE *f, double x);

/* The prebuild subcommand; argv[0] is "prebuild". Returns the exit code. */
int fajit__cli_prebuild(const fajit__cli_global *g, int argc, char **argv);

/* The tune subcommand (tools/prebuild.c); argv[0] is "tune". */
int fajit__cli_tune(const fajit__cli_global *g, int argc, char **argv);
void fajit__cli_tune_help(const fajit__cli_global *g, FILE *f);

/* Global options, key and spec syntax, exit codes: the tail of every --help. */
void fajit__cli_common_help(FILE *f);

/* Usage text of the prebuild subcommand (without the common tail). */
void fajit__cli_prebuild_help(const fajit__cli_global *g, FILE *f);

/* The default manifest embedded at build time (tools/default.manifest). */
extern const unsigned char fajit_tool_default_manifest[];

#endif
