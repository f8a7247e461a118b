# The cache and the API under faults, races, bad input and hostile files
# (issue 6). No GPU. Included by tests/CMakeLists.txt. The tests link the
# static library, so that they can reach the internal test hooks
# (cache/hooks.h) and the store; each makes its own directory under /tmp.
set(FAJIT_FAULT_TESTS
  test_cache_corruption
  test_cache_crash
  test_cache_collision
  test_cache_readers
  test_cache_fork
  test_cache_trust
  test_cache_key
  test_cache_lru
  test_cache_faults)

foreach(t ${FAJIT_FAULT_TESTS})
  fajit_add_test(${t} SOURCES ${t}.c LIBS fajit_static ${LMDB_LIBRARY} ${XXHASH_LIBRARY}
                 Threads::Threads LABELS "cache;faults")
  target_include_directories(${t} PRIVATE ${CMAKE_SOURCE_DIR}/include)
  target_include_directories(${t} SYSTEM PRIVATE ${CUDAToolkit_INCLUDE_DIRS}) # runtime/runtime.h
  set_tests_properties(${t} PROPERTIES TIMEOUT 120)
endforeach()

# Export and import, also through the CLI.
fajit_add_test(test_cache_bundle SOURCES test_cache_bundle.c
               LIBS fajit_static ${LMDB_LIBRARY} ${XXHASH_LIBRARY} Threads::Threads
               LABELS "cache;faults")
target_compile_definitions(test_cache_bundle PRIVATE FAJIT_TOOL="$<TARGET_FILE:fajit_tool>")
add_dependencies(test_cache_bundle fajit_tool)
