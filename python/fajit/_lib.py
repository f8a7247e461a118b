"""Loading libfajit and its ctypes bindings.

The library is found and loaded once, on first use (importing fajit needs no
library, so argument errors and the docs work anywhere). Where it is looked for,
first match wins:

1. ``FAJIT_LIBRARY``: the path of the library file. When set, nothing else is
   tried, and a path that does not load is an error naming it.
2. Next to the package (a copy bundled in ``fajit/``).
3. Installed: ``sys.prefix/lib``, ``/usr/local/lib`` (and their ``lib64`` and
   multiarch siblings), then the dynamic loader's own search (``libfajit.so.0``
   through ``LD_LIBRARY_PATH`` and ``ldconfig``).
4. The build tree of the source checkout this package sits in:
   ``<repo>/build/libfajit.so``.

Every struct of ``fajit.h`` used here is mirrored field for field. Their
``struct_size`` is set by the C init functions, and at load each mirror's
``ctypes.sizeof`` is compared with the size the library wrote, so a header and
a binding that disagree fail at load instead of corrupting memory later.
"""

import atexit
import ctypes
import ctypes.util
import os
import sys
import sysconfig
import threading

__all__ = [
    "FajitError",
    "FajitLibraryError",
    "load",
    "library_path",
    "has_backward",
    "context",
    "check",
]

_PKG_DIR = os.path.dirname(os.path.abspath(__file__))
_REPO_DIR = os.path.dirname(os.path.dirname(_PKG_DIR))

# enum values of fajit.h
FAJIT_OK = 0
FAJIT_EUNSUPPORTED = -9
DTYPE_FP16, DTYPE_BF16 = 0, 1
MASK_NONE, MASK_CAUSAL, MASK_CAUSAL_TL = 0, 1, 2
KERNEL_AUTO, KERNEL_REFERENCE = 0, 1
CACHE_DEFAULT = -1
LOG_DEFAULT = -1

STATUS_NAMES = {
    0: "FAJIT_OK",
    -1: "FAJIT_EINVAL",
    -2: "FAJIT_ENOMEM",
    -3: "FAJIT_ENOGPU",
    -4: "FAJIT_ECUDA",
    -5: "FAJIT_ECOMPILE",
    -6: "FAJIT_ECACHE",
    -7: "FAJIT_EIO",
    -8: "FAJIT_ENOTFOUND",
    -9: "FAJIT_EUNSUPPORTED",
    -10: "FAJIT_EPARSE",
    -11: "FAJIT_EREADONLY",
    -12: "FAJIT_ECORRUPT",
    -13: "FAJIT_EAMBIGUOUS",
}


class FajitError(RuntimeError):
    """A libfajit call failed.

    Attributes: ``status`` (the negative FAJIT_E* code), ``name`` (the C
    function that failed), ``detail`` (``fajit_last_error()``: the bad field
    and value, the NVRTC log, the CUDA error name), ``reason``
    (``fajit_strerror(status)``) and ``code`` (e.g. ``"FAJIT_EINVAL"``).
    """

    def __init__(self, status, name, detail, reason=None):
        self.status = int(status)
        self.name = name
        self.detail = detail or ""
        self.reason = reason or "status %d" % self.status
        self.code = STATUS_NAMES.get(self.status, "FAJIT_E?")
        text = "%s: %s (%s)" % (name, self.reason, self.code)
        if self.detail:
            text += ": " + self.detail
        super().__init__(text)

    def __reduce__(self):  # picklable across processes (multiprocessing)
        return (FajitError, (self.status, self.name, self.detail, self.reason))


class FajitLibraryError(OSError):
    """libfajit could not be found or loaded, or does not match this binding."""


# ---------------------------------------------------------------- struct mirrors

_i64_3 = ctypes.c_int64 * 3
_log_fn = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_int, ctypes.c_char_p)


class Options(ctypes.Structure):
    _fields_ = [
        ("struct_size", ctypes.c_uint32),
        ("cache_dir", ctypes.c_char_p),
        ("cache_mode", ctypes.c_int),
        ("log_level", ctypes.c_int),
        ("log_fn", _log_fn),
        ("log_user", ctypes.c_void_p),
        ("device", ctypes.c_int),
        ("cache_map_bytes", ctypes.c_uint64),
        ("cache_max_bytes", ctypes.c_uint64),
        ("cache_shared", ctypes.c_int),
    ]


class AttnArgs(ctypes.Structure):
    _fields_ = [
        ("struct_size", ctypes.c_uint32),
        ("q", ctypes.c_void_p),
        ("k", ctypes.c_void_p),
        ("v", ctypes.c_void_p),
        ("o", ctypes.c_void_p),
        ("lse", ctypes.c_void_p),
        ("batch", ctypes.c_int64),
        ("seqlen_q", ctypes.c_int64),
        ("seqlen_k", ctypes.c_int64),
        ("nheads_q", ctypes.c_int64),
        ("nheads_kv", ctypes.c_int64),
        ("dqk", ctypes.c_int64),
        ("dv", ctypes.c_int64),
        ("q_stride", _i64_3),
        ("k_stride", _i64_3),
        ("v_stride", _i64_3),
        ("o_stride", _i64_3),
        ("dtype", ctypes.c_int),
        ("mask", ctypes.c_int),
        ("softmax_scale", ctypes.c_float),
        ("kernel", ctypes.c_int),
        # appended fields (window, softcap, ALiBi, dropout, varlen)
        ("window_left", ctypes.c_int),
        ("window_right", ctypes.c_int),
        ("softcap", ctypes.c_float),
        ("alibi_slopes", ctypes.c_void_p),
        ("alibi_batch_stride", ctypes.c_int64),
        ("dropout_p", ctypes.c_float),
        ("dropout_seed", ctypes.c_uint64),
        ("dropout_offset", ctypes.c_uint64),
        ("cu_seqlens_q", ctypes.c_void_p),
        ("cu_seqlens_k", ctypes.c_void_p),
        # the probabilities output (flash_attn's S_dmask): fp32, strides batch, head, row
        ("probs", ctypes.c_void_p),
        ("probs_stride", _i64_3),
        # scratch the caller lends (split-KV partials); NULL: the library's pool
        ("workspace", ctypes.c_void_p),
        ("workspace_bytes", ctypes.c_size_t),
    ]


class AttnBwdArgs(ctypes.Structure):
    _fields_ = [
        ("struct_size", ctypes.c_uint32),
        ("q", ctypes.c_void_p),
        ("k", ctypes.c_void_p),
        ("v", ctypes.c_void_p),
        ("o", ctypes.c_void_p),
        ("grad_out", ctypes.c_void_p),
        ("lse", ctypes.c_void_p),
        ("grad_q", ctypes.c_void_p),
        ("grad_k", ctypes.c_void_p),
        ("grad_v", ctypes.c_void_p),
        ("batch", ctypes.c_int64),
        ("seqlen_q", ctypes.c_int64),
        ("seqlen_k", ctypes.c_int64),
        ("nheads_q", ctypes.c_int64),
        ("nheads_kv", ctypes.c_int64),
        ("dqk", ctypes.c_int64),
        ("dv", ctypes.c_int64),
        ("q_stride", _i64_3),
        ("k_stride", _i64_3),
        ("v_stride", _i64_3),
        ("o_stride", _i64_3),
        ("grad_out_stride", _i64_3),
        ("grad_q_stride", _i64_3),
        ("grad_k_stride", _i64_3),
        ("grad_v_stride", _i64_3),
        ("dtype", ctypes.c_int),
        ("mask", ctypes.c_int),
        ("softmax_scale", ctypes.c_float),
        ("deterministic", ctypes.c_int),
        ("kernel", ctypes.c_int),
        # appended fields (the forward's features, as in AttnArgs)
        ("window_left", ctypes.c_int),
        ("window_right", ctypes.c_int),
        ("softcap", ctypes.c_float),
        ("alibi_slopes", ctypes.c_void_p),
        ("alibi_batch_stride", ctypes.c_int64),
        ("dropout_p", ctypes.c_float),
        ("dropout_seed", ctypes.c_uint64),
        ("dropout_offset", ctypes.c_uint64),
        ("cu_seqlens_q", ctypes.c_void_p),
        ("cu_seqlens_k", ctypes.c_void_p),
    ]


class CompileResult(ctypes.Structure):
    _fields_ = [
        ("struct_size", ctypes.c_uint32),
        ("cached", ctypes.c_int),
        ("compile_ms", ctypes.c_double),
        ("cubin_bytes", ctypes.c_uint64),
        ("registers", ctypes.c_int),
        ("smem_bytes", ctypes.c_int),
        ("spill_bytes", ctypes.c_int),
        ("key_hex", ctypes.c_char * 33),
    ]


class Info(ctypes.Structure):
    _fields_ = [
        ("struct_size", ctypes.c_uint32),
        ("cache_dir", ctypes.c_char * 4096),
        ("cache_mode", ctypes.c_int),
        ("nvrtc_major", ctypes.c_int),
        ("nvrtc_minor", ctypes.c_int),
        ("driver_version", ctypes.c_int),
        ("device_count", ctypes.c_int),
        ("device_name", ctypes.c_char * 128),
        ("device_arch", ctypes.c_char * 16),
        ("build_id", ctypes.c_char * 33),
        ("no_gpu_reason", ctypes.c_char * 256),
    ]


_P = ctypes.c_void_p
_SIGNATURES = {
    # name: (restype, argtypes)
    "fajit_version": (ctypes.c_char_p, []),
    "fajit_strerror": (ctypes.c_char_p, [ctypes.c_int]),
    "fajit_last_error": (ctypes.c_char_p, []),
    "fajit_free": (None, [_P]),
    "fajit_options_init": (None, [ctypes.POINTER(Options)]),
    "fajit_create": (ctypes.c_int, [ctypes.POINTER(_P), ctypes.POINTER(Options)]),
    "fajit_destroy": (None, [_P]),
    "fajit_attn_args_init": (None, [ctypes.POINTER(AttnArgs)]),
    "fajit_attn_fwd": (ctypes.c_int, [_P, ctypes.POINTER(AttnArgs), _P]),
    "fajit_attn_fwd_workspace_size": (
        ctypes.c_int,
        [_P, ctypes.POINTER(AttnArgs), ctypes.POINTER(ctypes.c_size_t)],
    ),
    "fajit_attn_variant": (
        ctypes.c_int,
        [_P, ctypes.POINTER(AttnArgs), ctypes.c_char_p, ctypes.c_size_t],
    ),
    "fajit_variant_complete": (
        ctypes.c_int,
        [_P, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_size_t],
    ),
    "fajit_compile": (ctypes.c_int, [_P, ctypes.c_char_p, ctypes.POINTER(CompileResult)]),
    "fajit_get_info": (ctypes.c_int, [_P, ctypes.POINTER(Info)]),
}
# Present only in libraries that have them; looked up with hasattr at load.
_OPTIONAL_SIGNATURES = {
    "fajit_attn_bwd_args_init": (None, [ctypes.POINTER(AttnBwdArgs)]),
    "fajit_attn_bwd": (ctypes.c_int, [_P, ctypes.POINTER(AttnBwdArgs), _P]),
}

# ---------------------------------------------------------------- finding the library

_LIB_NAMES = ("libfajit.so", "libfajit.so.0")


def _installed_dirs():
    prefixes = []
    for p in (sys.prefix, sys.base_prefix, "/usr/local"):
        if p not in prefixes:
            prefixes.append(p)
    multiarch = sysconfig.get_config_var("MULTIARCH")
    dirs = []
    for p in prefixes:
        dirs.append(os.path.join(p, "lib"))
        dirs.append(os.path.join(p, "lib64"))
        if multiarch:
            dirs.append(os.path.join(p, "lib", multiarch))
    return dirs


def candidate_paths():
    """Where the library is looked for, in order (FAJIT_LIBRARY aside).

    A bare name (no slash) is left to the dynamic loader's own search."""
    paths = [os.path.join(_PKG_DIR, n) for n in _LIB_NAMES]
    for d in _installed_dirs():
        paths.extend(os.path.join(d, n) for n in reversed(_LIB_NAMES))
    paths.append("libfajit.so.0")
    paths.append(os.path.join(_REPO_DIR, "build", "libfajit.so"))
    return paths


def _open(path):
    lib = ctypes.CDLL(path)
    # The path actually opened, for `python -m fajit` and error messages.
    return lib, _resolved_path(lib, path)


def _resolved_path(lib, fallback):
    # dladdr on a symbol of the library names the file the loader picked.
    class _DlInfo(ctypes.Structure):
        _fields_ = [("dli_fname", ctypes.c_char_p), ("dli_fbase", _P),
                    ("dli_sname", ctypes.c_char_p), ("dli_saddr", _P)]
    try:
        libdl = ctypes.CDLL(None)
        dladdr = libdl.dladdr
        dladdr.argtypes = [_P, ctypes.POINTER(_DlInfo)]
        dladdr.restype = ctypes.c_int
        info = _DlInfo()
        addr = ctypes.cast(lib.fajit_version, _P)
        if dladdr(addr, ctypes.byref(info)) and info.dli_fname:
            return os.path.realpath(info.dli_fname.decode())
    except (AttributeError, OSError):
        pass
    return fallback


def _find_and_open():
    env = os.environ.get("FAJIT_LIBRARY")
    if env:
        if not os.path.exists(env):
            raise FajitLibraryError(
                "FAJIT_LIBRARY=%s: no such file (it must name libfajit.so itself)" % env)
        try:
            return _open(env)
        except OSError as e:
            raise FajitLibraryError("FAJIT_LIBRARY=%s: cannot load it: %s" % (env, e)) from None
    tried = []
    for path in candidate_paths():
        if os.sep in path and not os.path.exists(path):
            tried.append(path)
            continue
        try:
            return _open(path)
        except OSError as e:
            tried.append("%s (%s)" % (path, e))
    raise FajitLibraryError(
        "libfajit not found. Set FAJIT_LIBRARY to the path of libfajit.so, install it "
        "(cmake --install), or build it in <repo>/build. Tried: " + "; ".join(tried))


# ---------------------------------------------------------------- the loaded library

class _Loaded:
    """The library, its path, and whether it has the backward."""

    def __init__(self, lib, path):
        self.lib = lib
        self.path = path
        for name, (res, args) in _SIGNATURES.items():
            try:
                fn = getattr(lib, name)
            except AttributeError:
                raise FajitLibraryError(
                    "%s: missing symbol %s: not a libfajit this binding knows" % (path, name)
                ) from None
            fn.restype, fn.argtypes = res, args
        self.has_backward = all(hasattr(lib, n) for n in _OPTIONAL_SIGNATURES)
        if self.has_backward:
            for name, (res, args) in _OPTIONAL_SIGNATURES.items():
                fn = getattr(lib, name)
                fn.restype, fn.argtypes = res, args
        self.version = lib.fajit_version().decode()
        self._check_struct_sizes()
        # Defaults as the init functions write them, copied per call (cheaper
        # than calling init through ctypes on every attention call).
        self._templates = {}

    def new_args(self, cls, init_name):
        """A fresh struct holding what init_name writes (struct_size included)."""
        raw = self._templates.get(cls)
        if raw is None:
            raw = bytes(init_struct(self, cls, init_name))
            self._templates[cls] = raw
        return cls.from_buffer_copy(raw)

    def _check_struct_sizes(self):
        checks = [(Options, "fajit_options_init"), (AttnArgs, "fajit_attn_args_init")]
        if self.has_backward:
            checks.append((AttnBwdArgs, "fajit_attn_bwd_args_init"))
        for cls, init in checks:
            size = init_struct(self, cls, init).struct_size
            if size != ctypes.sizeof(cls):
                raise FajitLibraryError(
                    "%s: %s wrote struct_size=%d but the Python mirror %s has %d bytes: the "
                    "library (version %s) and this fajit package disagree on fajit.h"
                    % (self.path, init, size, cls.__name__, ctypes.sizeof(cls), self.version))


def init_struct(loaded, cls, init_name):
    """A struct filled by its C init function (which sets struct_size).

    Over-allocated, so a library whose struct is bigger than the mirror writes
    into slack instead of past the end; the size check then reports it."""
    buf = (ctypes.c_char * (ctypes.sizeof(cls) + 4096))()
    fn = getattr(loaded.lib, init_name)
    fn(ctypes.cast(buf, fn.argtypes[0]))
    return cls.from_buffer_copy(buf)


_lock = threading.Lock()
_loaded = None
_contexts = {}


def load():
    """The loaded library (found, bound and checked on the first call)."""
    global _loaded
    if _loaded is None:
        with _lock:
            if _loaded is None:
                lib, path = _find_and_open()
                _loaded = _Loaded(lib, path)
    return _loaded


def library_path():
    """Path of the libfajit file in use (loading it if not loaded yet)."""
    return load().path


def has_backward():
    return load().has_backward


def raise_error(loaded, status, name):
    detail = loaded.lib.fajit_last_error()
    reason = loaded.lib.fajit_strerror(status)
    raise FajitError(status, name, detail.decode(errors="replace") if detail else "",
                     reason.decode() if reason else None)


def check(status, name):
    """Raises FajitError for a negative status of the C function `name`."""
    if status < 0:
        raise_error(load(), status, name)
    return status


def context(device=-1):
    """The process's fajit_ctx for a CUDA device ordinal (-1: FAJIT_DEVICE, else 0).

    Created on first use with default options (FAJIT_* variables apply),
    destroyed at exit."""
    ctx = _contexts.get(device)
    if ctx is not None:
        return ctx
    loaded = load()
    with _lock:
        ctx = _contexts.get(device)
        if ctx is None:
            opt = init_struct(loaded, Options, "fajit_options_init")
            opt.device = device
            handle = _P()
            check(loaded.lib.fajit_create(ctypes.byref(handle), ctypes.byref(opt)),
                  "fajit_create")
            ctx = handle.value
            _contexts[device] = ctx
    return ctx


@atexit.register
def _destroy_contexts():
    if _loaded is None:
        return
    while _contexts:
        _, ctx = _contexts.popitem()
        _loaded.lib.fajit_destroy(ctx)


# ---------------------------------------------------------------- small helpers over the C API

def version():
    """Version of the loaded library, e.g. "0.1.0"."""
    return load().version


def variant_complete(spec, device=-1):
    """Completes a variant spec ("ref dqk=72") into its canonical text."""
    loaded = load()
    buf = ctypes.create_string_buffer(1024)
    n = check(loaded.lib.fajit_variant_complete(context(device), spec.encode(), buf,
                                                ctypes.sizeof(buf)), "fajit_variant_complete")
    if n >= ctypes.sizeof(buf):
        buf = ctypes.create_string_buffer(n + 1)
        check(loaded.lib.fajit_variant_complete(context(device), spec.encode(), buf, n + 1),
              "fajit_variant_complete")
    return buf.value.decode()


def compile_variant(spec, device=-1):
    """Makes sure a variant is compiled and cached (no GPU needed); returns a dict."""
    loaded = load()
    res = CompileResult()
    res.struct_size = ctypes.sizeof(CompileResult)
    check(loaded.lib.fajit_compile(context(device), spec.encode(), ctypes.byref(res)),
          "fajit_compile")
    return {
        "cached": bool(res.cached),
        "compile_ms": res.compile_ms,
        "cubin_bytes": res.cubin_bytes,
        "registers": res.registers,
        "smem_bytes": res.smem_bytes,
        "spill_bytes": res.spill_bytes,
        "key": res.key_hex.decode(),
    }


def info(device=-1):
    """fajit_get_info as a dict, plus the library path and version."""
    loaded = load()
    out = Info()
    out.struct_size = ctypes.sizeof(Info)
    check(loaded.lib.fajit_get_info(context(device), ctypes.byref(out)), "fajit_get_info")
    d = {name: getattr(out, name) for name, _ in Info._fields_ if name != "struct_size"}
    for k, v in d.items():
        if isinstance(v, bytes):
            d[k] = v.decode(errors="replace")
    d["library"] = loaded.path
    d["version"] = loaded.version
    return d
