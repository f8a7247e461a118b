/* tools/main_prebuild.c - `fajit-prebuild`, the same as `fajit prebuild`. */
#include "cli.h"

int main(int argc, char **argv) { return fajit_cli_prebuild_main(argc, argv); }
