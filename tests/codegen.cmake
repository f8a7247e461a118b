# Tests of the codegen layer (no GPU, no disk). Included by tests/CMakeLists.txt.
set(FAJIT_CODEGEN_TEST_LIBS ${XXHASH_LIBRARY} Threads::Threads)

foreach(t test_variant test_manifest test_serialize test_render)
  fajit_add_test(${t} SOURCES ${t}.c ${FAJIT_CODEGEN_OBJS} LIBS ${FAJIT_CODEGEN_TEST_LIBS}
                 LABELS codegen)
endforeach()

# The include inliner against a made-up set of embedded files: the test
# defines fajit__embedded_files itself, so it links the codegen sources rather
# than the layer's objects (which carry the real table).
fajit_add_test(test_codegen_includes
  SOURCES test_codegen_includes.c ${CMAKE_SOURCE_DIR}/codegen/render.c
          ${CMAKE_SOURCE_DIR}/codegen/variant.c ${CMAKE_SOURCE_DIR}/codegen/ops.c
          ${CMAKE_SOURCE_DIR}/runtime/error.c
  LIBS ${FAJIT_CODEGEN_TEST_LIBS}
  LABELS codegen)
