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

# Fuzz targets (tests/fuzz), built here as plain drivers that replay the
# committed corpus; tests/fuzz/run.sh builds them with libFuzzer and the
# sanitizers and fuzzes.
foreach(f variant manifest entry)
  add_executable(fuzz_${f}_replay fuzz/fuzz_${f}.c fuzz/replay.c ${FAJIT_CODEGEN_OBJS}
                 $<TARGET_OBJECTS:fajit_cache>)
  target_include_directories(fuzz_${f}_replay PRIVATE ${FAJIT_TEST_INCLUDES} ${CMAKE_CURRENT_SOURCE_DIR}/fuzz)
  target_compile_options(fuzz_${f}_replay PRIVATE ${FAJIT_WARNINGS})
  target_link_libraries(fuzz_${f}_replay PRIVATE ${LMDB_LIBRARY} ${XXHASH_LIBRARY} Threads::Threads)
  add_test(NAME fuzz_${f}_replay
           COMMAND fuzz_${f}_replay ${CMAKE_CURRENT_SOURCE_DIR}/fuzz/corpus/${f})
  set_tests_properties(fuzz_${f}_replay PROPERTIES LABELS "cache;faults;fuzz")
endforeach()
