# The Python binding's CPU-side tests (python/tests/test_cpu.py): import,
# library discovery, struct mirrors against fajit.h, errors from C, argument
# errors, DLPack parsing, `python -m fajit`. No GPU needed; the GPU tests
# (python/tests/test_gpu.py) are run by hand on the GPU machine.
#
# The interpreter is one that has pytest (Debian's python3-pytest goes to
# /usr/bin/python3, which a PATH python3 may not be); without pytest the same
# tests run under unittest. FAJIT_TEST_STRICT=1 makes a missing library or CLI
# a failure, not a skip. Not under the sanitizers: an ASan libfajit cannot be
# dlopen'ed by an uninstrumented python.
if(FAJIT_SANITIZE)
  return()
endif()

find_program(FAJIT_PATH_PYTHON3 python3)
set(_fajit_py "")
foreach(_py /usr/bin/python3 ${FAJIT_PATH_PYTHON3})
  if(NOT _fajit_py AND EXISTS "${_py}")
    execute_process(COMMAND "${_py}" -c "import pytest" RESULT_VARIABLE _rc OUTPUT_QUIET ERROR_QUIET)
    if(_rc EQUAL 0)
      set(_fajit_py "${_py}")
    endif()
  endif()
endforeach()

set(_fajit_py_tests ${CMAKE_SOURCE_DIR}/python/tests)
if(_fajit_py)
  set(_fajit_py_cmd "${_fajit_py}" -m pytest -q -rs -p no:cacheprovider ${_fajit_py_tests}/test_cpu.py)
elseif(FAJIT_PATH_PYTHON3)
  message(STATUS "python tests: no python3 with pytest; running them under unittest")
  set(_fajit_py_cmd ${FAJIT_PATH_PYTHON3} -m unittest discover -s ${_fajit_py_tests} -p test_cpu.py -v)
else()
  message(STATUS "python tests: no python3, not registered")
  return()
endif()

add_test(NAME test_python COMMAND ${_fajit_py_cmd} WORKING_DIRECTORY ${CMAKE_SOURCE_DIR})
set_tests_properties(test_python PROPERTIES LABELS "python" TIMEOUT 300
  ENVIRONMENT "FAJIT_LIBRARY=$<TARGET_FILE:fajit>;FAJIT_TEST_STRICT=1;FAJIT_CACHE_DIR=${CMAKE_BINARY_DIR}/test-cache/test_python;PYTHONDONTWRITEBYTECODE=1")
