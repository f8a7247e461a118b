# Tests of the backward pass that need no GPU (CI). The GPU test of the
# reference backward, test_bwd_gpu, is registered in gpu.cmake with the others.

# Compiles through the library's own compile step (tests/compile_check.c).
fajit_add_test(test_bwd_compile
  SOURCES test_bwd_compile.c compile_check.c
  LIBS fajit_static Threads::Threads
  LABELS bwd)
target_include_directories(test_bwd_compile SYSTEM PRIVATE ${CUDAToolkit_INCLUDE_DIRS})

# fajit_attn_bwd's argument checks through the public API.
fajit_add_test(test_bwd_api SOURCES test_bwd_api.c LIBS fajit LABELS bwd)
