# Tests of the attention features (window, softcap, ALiBi, dropout, varlen):
# the host Philox (CPU), the reference kernel's feature variants under NVRTC
# (CPU), the public API's checks of the new fields (CPU), and the kernels
# against an fp64 CPU reference (GPU, skips with 77 without one).
include_guard(GLOBAL)

fajit_add_test(test_philox
  SOURCES test_philox.c
  LIBS m
  LABELS features)

# Compiles through the library's own compile step (tests/compile_check.c).
fajit_add_test(test_ref_features_compile
  SOURCES test_ref_features_compile.c compile_check.c
  LIBS fajit_static Threads::Threads
  LABELS features)
target_include_directories(test_ref_features_compile SYSTEM PRIVATE ${CUDAToolkit_INCLUDE_DIRS})

fajit_add_test(test_features_api SOURCES test_features_api.c LIBS fajit LABELS features)

# The features against an fp64 CPU reference, reference and AUTO kernels.
if(TARGET fajit_attn_check)
  fajit_add_test(test_features_gpu
    SOURCES gpu/test_features_gpu.c
    LIBS fajit fajit_attn_check CUDA::cudart m
    LABELS gpu features)
  # Again with the persistent kernels (d 256 unmasked, its softcap case
  # among them) run by 3 blocks looping over the items.
  add_test(NAME test_features_gpu_persist COMMAND test_features_gpu)
  set_tests_properties(test_features_gpu_persist PROPERTIES SKIP_RETURN_CODE 77 LABELS "gpu;features"
                       ENVIRONMENT "FAJIT_FWD_PERSIST=3;FAJIT_CACHE_DIR=${CMAKE_BINARY_DIR}/test-cache/test_features_gpu_persist")
endif()

# The forward's probabilities output (fajit_attn_args.probs, op ref-probs):
# its text, key, rendering and NVRTC compile, and the API's checks (CPU); the
# probabilities against an fp64 softmax with the host Philox's signs (GPU).
fajit_add_test(test_probs
  SOURCES test_probs.c compile_check.c
  LIBS fajit_static Threads::Threads
  LABELS features)
target_include_directories(test_probs SYSTEM PRIVATE ${CUDAToolkit_INCLUDE_DIRS})
if(TARGET fajit_attn_check)
  fajit_add_test(test_probs_gpu
    SOURCES gpu/test_probs_gpu.c
    LIBS fajit fajit_attn_check CUDA::cudart m
    LABELS gpu features)
endif()
