# Tests of the reference kernel. test_ref_compile needs no GPU (NVRTC only) and
# runs in CI; the ones labelled gpu skip (exit 77) with a reason when no CUDA GPU
# is present, and run in full on the GPU machine through tests/gpu/run.sh.

# Compiles through the library's own compile step (tests/compile_check.c).
fajit_add_test(test_ref_compile
  SOURCES test_ref_compile.c compile_check.c
  LIBS fajit_static Threads::Threads)
target_include_directories(test_ref_compile SYSTEM PRIVATE ${CUDAToolkit_INCLUDE_DIRS})

# Host-side problems and the fp64 reference, shared by the GPU tests.
add_library(fajit_attn_check STATIC gpu/attn_check.c gpu/precompile.c)
target_compile_options(fajit_attn_check PRIVATE ${FAJIT_WARNINGS})
target_link_libraries(fajit_attn_check PUBLIC m fajit Threads::Threads)
target_include_directories(fajit_attn_check PUBLIC ${CMAKE_CURRENT_SOURCE_DIR}/gpu)

fajit_add_test(test_ref_gpu
  SOURCES gpu/test_ref_gpu.c
  LIBS fajit fajit_attn_check CUDA::cudart
  LABELS gpu)

fajit_add_test(test_cache_gpu
  SOURCES gpu/test_cache_gpu.c
  LIBS fajit fajit_attn_check CUDA::cudart
  LABELS gpu)

# The fast forward kernel against the fp64 reference (FlashAttention's rule).
fajit_add_test(test_fwd_gpu
  SOURCES gpu/test_fwd_gpu.c
  LIBS fajit fajit_attn_check CUDA::cudart Threads::Threads
  LABELS gpu)
# The same binary over the persistent kernels (d 256 unmasked), 3 blocks
# looping over every shape's items.
add_test(NAME test_fwd_gpu_persist COMMAND test_fwd_gpu --persist 3)
set_tests_properties(test_fwd_gpu_persist PROPERTIES SKIP_RETURN_CODE 77 LABELS gpu
                     ENVIRONMENT "FAJIT_CACHE_DIR=${CMAKE_BINARY_DIR}/test-cache/test_fwd_gpu_persist")
include(${CMAKE_CURRENT_LIST_DIR}/fwd.cmake OPTIONAL) # test_fwd_compile (CPU); guarded against a second include

# The reference backward against an fp64 CPU backward (tests/gpu/bwd_check.c).
fajit_add_test(test_bwd_gpu
  SOURCES gpu/test_bwd_gpu.c gpu/bwd_check.c
  LIBS fajit fajit_attn_check CUDA::cudart
  LABELS gpu)

# 64-bit index math: the forward on tensors whose offsets pass 2^31 (about
# 5 GiB of GPU memory; skips with less free).
fajit_add_test(test_large_gpu
  SOURCES gpu/test_large_gpu.c
  LIBS fajit fajit_attn_check CUDA::cudart
  LABELS gpu)
