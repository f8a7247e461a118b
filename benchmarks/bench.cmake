# Benchmarks: programs that print a table, run by hand or by tests/gpu/run.sh;
# not tests (nothing here is registered with CTest).

# Cold NVRTC compile (no GPU needed) and cached load in a fresh process (GPU).
add_executable(bench_compile bench_compile.c)
target_compile_options(bench_compile PRIVATE ${FAJIT_WARNINGS})
target_link_libraries(bench_compile PRIVATE fajit CUDA::cudart)

# Warm dispatch cost next to a bare cuLaunchKernel: the only program that links
# the driver directly, to launch the same cubin by hand.
add_executable(bench_dispatch bench_dispatch.c)
target_compile_options(bench_dispatch PRIVATE ${FAJIT_WARNINGS})
target_include_directories(bench_dispatch PRIVATE ${CMAKE_SOURCE_DIR})
target_link_libraries(bench_dispatch PRIVATE fajit CUDA::cuda_driver ${CUDA_nvrtc_LIBRARY} m)
target_include_directories(bench_dispatch SYSTEM PRIVATE ${CUDAToolkit_INCLUDE_DIRS})

# fajit's own warm-call cost, against a stub driver that does nothing (no GPU).
add_library(fajit_stub_cuda SHARED stub_driver/stub_cuda.c)
set_target_properties(fajit_stub_cuda PROPERTIES OUTPUT_NAME cuda SUFFIX .so.1 PREFIX lib
                      LIBRARY_OUTPUT_DIRECTORY ${CMAKE_CURRENT_BINARY_DIR}/stub_driver
                      C_VISIBILITY_PRESET default)
add_executable(bench_overhead bench_overhead.c)
target_compile_options(bench_overhead PRIVATE ${FAJIT_WARNINGS})
target_link_libraries(bench_overhead PRIVATE fajit)
add_dependencies(bench_overhead fajit_stub_cuda)
