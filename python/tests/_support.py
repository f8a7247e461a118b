"""Shared by the tests: imports fajit from this source tree, finds the library.

FAJIT_TEST_STRICT=1 (set by CTest) turns "library or CLI not found" from a
skip into a failure, so CI cannot pass by skipping everything."""

import os
import sys
import unittest

PY_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REPO_DIR = os.path.dirname(PY_DIR)
if PY_DIR not in sys.path:
    sys.path.insert(0, PY_DIR)

import fajit  # noqa: E402,F401 (re-exported to the tests)
from fajit import _lib  # noqa: E402

STRICT = os.environ.get("FAJIT_TEST_STRICT") == "1"


def missing(tc, why):
    """Skip (or, strict, fail) the test tc for a missing prerequisite."""
    if STRICT:
        tc.fail("FAJIT_TEST_STRICT=1 and " + why)
    raise unittest.SkipTest(why)


def require_library(tc):
    try:
        return _lib.load()
    except _lib.FajitLibraryError as e:
        missing(tc, "libfajit not found (set FAJIT_LIBRARY): %s" % e)


def try_import(name):
    try:
        return __import__(name)
    except ImportError:
        return None
