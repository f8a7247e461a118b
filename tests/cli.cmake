# The command-line tools end to end (tests/test_cli.sh), no GPU needed. The
# script makes its own temporary cache and HOME; FAJIT_CACHE_DIR here only keeps
# a stray run away from the user's cache.
add_test(NAME test_cli
         COMMAND ${CMAKE_SOURCE_DIR}/tests/test_cli.sh $<TARGET_FILE:fajit_tool>
                 $<TARGET_FILE:fajit_prebuild_tool>)
set_tests_properties(test_cli PROPERTIES LABELS "cli" TIMEOUT 300
                     ENVIRONMENT "FAJIT_CACHE_DIR=${CMAKE_BINARY_DIR}/test-cache/test_cli")
