# Autotuning infrastructure without a GPU (tests/test_tune.c): tuning records,
# the best-of lookup, candidate pruning (a few candidates compiled), the
# problem parser, bundles carrying records, `fajit tune` / `ls --tuning`.
fajit_add_test(test_tune
  SOURCES test_tune.c
  LIBS fajit_static ${CUDA_nvrtc_LIBRARY} Threads::Threads
  LABELS tune)
target_include_directories(test_tune SYSTEM PRIVATE ${CUDAToolkit_INCLUDE_DIRS})
add_dependencies(test_tune fajit_tool fajit_prebuild_tool)
set_property(TEST test_tune APPEND PROPERTY ENVIRONMENT "CUDA_CACHE_DISABLE=1")
