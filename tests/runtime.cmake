# Tests of the public API on top of the whole library (no GPU needed).
fajit_add_test(test_api SOURCES test_api.c LIBS fajit Threads::Threads LABELS runtime)
target_include_directories(test_api PRIVATE ${CMAKE_SOURCE_DIR}/include)
fajit_add_test(test_api_stampede SOURCES test_api_stampede.c LIBS fajit LABELS runtime)
add_test(NAME test_api_stampede_64 COMMAND test_api_stampede 64)
set_tests_properties(test_api_stampede_64 PROPERTIES LABELS runtime)
add_test(NAME test_install COMMAND ${CMAKE_SOURCE_DIR}/tests/test_install.sh ${CMAKE_BINARY_DIR} ${CMAKE_SOURCE_DIR})
set_tests_properties(test_install PROPERTIES LABELS install)
