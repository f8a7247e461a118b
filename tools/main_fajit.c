/* tools/main_fajit.c - the `fajit` executable; everything is in cli.c. */
#include "cli.h"

int main(int argc, char **argv) { return fajit_cli_main(argc, argv); }
