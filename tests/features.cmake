# Tests of the attention features (window, softcap, ALiBi, dropout, varlen):
# the host Philox (CPU), the reference kernel's feature variants under NVRTC
# (CPU), the public API's checks of the new fields (CPU), and the kernels
# against an fp64 CPU reference (GPU, skips with 77 without one).
include_guard(GLOBAL)

fajit_add_test(test_philox
  SOURCES test_philox.c
  LIBS m
  LABELS features)
