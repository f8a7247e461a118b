# Tests of the cache layer (entry format, LMDB store, compile stampede). No GPU.
# Included by tests/CMakeLists.txt. Each test makes its own mkdtemp directory
# under /tmp and removes it.
set(FAJIT_CACHE_TEST_LIBS ${LMDB_LIBRARY} ${XXHASH_LIBRARY} Threads::Threads)

foreach(t test_entry test_store test_stampede)
  fajit_add_test(${t} SOURCES ${t}.c ${FAJIT_CACHE_OBJS} LIBS ${FAJIT_CACHE_TEST_LIBS}
                 LABELS cache)
  set_tests_properties(${t} PROPERTIES TIMEOUT 120)
endforeach()
