include_guard(GLOBAL) # included from tests/CMakeLists.txt and/or gpu.cmake
# Tests of the fast forward kernel (templates/flash_fwd.cuh). test_fwd_compile
# needs no GPU (NVRTC only) and runs in CI; test_fwd_gpu (registered in
# gpu.cmake) checks results on the GPU machine.

# NVRTC's library itself (no driver stub: the test must run without
# libcuda.so.1); fajit_static for the runtime's tile heuristic.
fajit_add_test(test_fwd_compile
  SOURCES test_fwd_compile.c compile_check.c
  LIBS fajit_static ${CUDA_nvrtc_LIBRARY} Threads::Threads
  LABELS fwd)
target_include_directories(test_fwd_compile SYSTEM PRIVATE ${CUDAToolkit_INCLUDE_DIRS})
# The variants in two halves (every other one), each a test well under a
# minute on two cores.
set_property(TEST test_fwd_compile APPEND PROPERTY ENVIRONMENT "FAJIT_TEST_PART=0/2")
add_test(NAME test_fwd_compile_b COMMAND test_fwd_compile --part 1/2)
set_tests_properties(test_fwd_compile_b PROPERTIES LABELS fwd
                     ENVIRONMENT "FAJIT_CACHE_DIR=${CMAKE_BINARY_DIR}/test-cache/test_fwd_compile_b")

# The same program over head dims that are not multiples of 8 (narrower loads).
add_test(NAME test_fwd_compile_odd COMMAND test_fwd_compile --odd)
set_tests_properties(test_fwd_compile_odd PROPERTIES LABELS fwd
                     ENVIRONMENT "FAJIT_CACHE_DIR=${CMAKE_BINARY_DIR}/test-cache/test_fwd_compile_odd")
