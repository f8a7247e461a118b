# Autotuning infrastructure without a GPU (tests/test_tune.c): tuning records,
# the best-of lookup, split-KV counts and backward records in it, candidate
# pruning (a few candidates compiled), the problem parser, bundles carrying
# records, `fajit tune` / `ls --tuning`.
fajit_add_test(test_tune
  SOURCES test_tune.c
  LIBS fajit_static ${CUDA_nvrtc_LIBRARY} Threads::Threads
  LABELS tune)
target_include_directories(test_tune SYSTEM PRIVATE ${CUDAToolkit_INCLUDE_DIRS})
add_dependencies(test_tune fajit_tool fajit_prebuild_tool)
set_property(TEST test_tune APPEND PROPERTY ENVIRONMENT "CUDA_CACHE_DISABLE=1")

# Every candidate tuning may choose (forward tiles and split-KV counts, the
# backward's tiles), made the tuned winner by a record and launched through
# fajit_attn_fwd / fajit_attn_bwd, against the fp64 references (GPU machine;
# skips without a GPU). Static library: records and GPU identity are internal;
# the shared attention checks are compiled in rather than linked (their
# library links the shared libfajit, which would be a second copy).
fajit_add_test(test_tuned_gpu
  SOURCES gpu/test_tuned_gpu.c gpu/attn_check.c gpu/bwd_check.c gpu/precompile.c
  LIBS fajit_static ${CUDA_nvrtc_LIBRARY} CUDA::cudart Threads::Threads m
  LABELS gpu tune)
target_include_directories(test_tuned_gpu PRIVATE ${CMAKE_CURRENT_SOURCE_DIR}/gpu)
target_include_directories(test_tuned_gpu SYSTEM PRIVATE ${CUDAToolkit_INCLUDE_DIRS})
