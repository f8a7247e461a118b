"""python -m fajit COMMAND [ARGS]: runs libfajit's `fajit` command-line tool.

Every argument goes to the tool unchanged (`python -m fajit info`,
`python -m fajit prebuild my.manifest -j 8`, `python -m fajit --help`), and its
exit code comes back. The tool is looked for as FAJIT_CLI, next to the library
in use (<prefix>/bin/fajit for an installed library, the same folder in a build
tree), then on PATH.
"""

import os
import shutil
import subprocess
import sys

from . import _lib


def find_cli():
    """Path of the `fajit` executable, or raises FajitLibraryError saying where it looked."""
    env = os.environ.get("FAJIT_CLI")
    if env:
        if os.access(env, os.X_OK):
            return env
        raise _lib.FajitLibraryError("FAJIT_CLI=%s: not an executable file" % env)
    tried = []
    try:
        libdir = os.path.dirname(_lib.library_path())
        for path in (os.path.join(os.path.dirname(libdir), "bin", "fajit"),
                     os.path.join(libdir, "fajit")):
            if os.path.isfile(path) and os.access(path, os.X_OK):
                return path
            tried.append(path)
    except _lib.FajitLibraryError as e:
        tried.append("(no library: %s)" % e)
    path = shutil.which("fajit")
    if path:
        return path
    raise _lib.FajitLibraryError("the fajit command-line tool was not found (set FAJIT_CLI); "
                                 "tried " + ", ".join(tried) + " and PATH")


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    try:
        cli = find_cli()
    except _lib.FajitLibraryError as e:
        print("python -m fajit: %s" % e, file=sys.stderr)
        return 127
    rc = subprocess.call([cli] + list(argv))
    return rc if rc >= 0 else 128 - rc  # killed by a signal: the shell's convention


if __name__ == "__main__":
    sys.exit(main())
