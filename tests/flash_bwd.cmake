include_guard(GLOBAL)
# Tests of the fast backward (templates/flash_bwd.cuh, runtime/flash_bwd.c).
# test_flash_bwd_compile needs no GPU (NVRTC only) and runs in CI;
# test_flash_bwd_gpu checks gradients on the GPU machine and skips without one.

# fajit_static: the runtime's internal functions (tile heuristic, the
# launcher fajit__flash_bwd_run) are hidden in the shared library.
fajit_add_test(test_flash_bwd_compile
  SOURCES test_flash_bwd_compile.c compile_check.c
  LIBS fajit_static Threads::Threads
  LABELS bwd)
target_include_directories(test_flash_bwd_compile SYSTEM PRIVATE ${CUDAToolkit_INCLUDE_DIRS})

# The fast backward's launcher against an fp64 CPU backward, FlashAttention's
# error rule; TFLOPs as information. The checks' sources are compiled in, so
# that everything links against fajit_static (one copy of the library).
fajit_add_test(test_flash_bwd_gpu
  SOURCES gpu/test_flash_bwd_gpu.c gpu/attn_check.c gpu/bwd_check.c gpu/precompile.c
  LIBS fajit_static CUDA::cudart Threads::Threads m
  LABELS gpu)
target_include_directories(test_flash_bwd_gpu PRIVATE ${CMAKE_CURRENT_LIST_DIR}/gpu)
target_include_directories(test_flash_bwd_gpu SYSTEM PRIVATE ${CUDAToolkit_INCLUDE_DIRS})
