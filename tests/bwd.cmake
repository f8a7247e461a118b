# Tests of the backward pass that need no GPU (CI). The GPU test of the
# reference backward, test_bwd_gpu, is registered in gpu.cmake with the others.

# NVRTC's library itself rather than CUDA::nvrtc, which drags in the driver stub
# (the test must run where no libcuda.so.1 exists).
fajit_add_test(test_bwd_compile
  SOURCES test_bwd_compile.c ${FAJIT_CODEGEN_OBJS}
  LIBS ${CUDA_nvrtc_LIBRARY} ${XXHASH_LIBRARY} Threads::Threads
  LABELS bwd)
target_include_directories(test_bwd_compile SYSTEM PRIVATE ${CUDAToolkit_INCLUDE_DIRS})
set_property(TEST test_bwd_compile APPEND PROPERTY ENVIRONMENT "CUDA_CACHE_DISABLE=1")

# fajit_attn_bwd's argument checks through the public API.
fajit_add_test(test_bwd_api SOURCES test_bwd_api.c LIBS fajit LABELS bwd)
