"""The Python binding without a GPU: import, library discovery, the struct
mirrors against fajit.h, errors carried from C, argument errors, DLPack parsing,
and `python -m fajit`.

Runs under pytest or plain unittest (python3 -m unittest discover -s python/tests).
torch and numpy are optional: the tests that need them skip without them."""

import ctypes
import gc
import inspect
import os
import shutil
import subprocess
import sys
import tempfile
import unittest
import weakref

from _support import PY_DIR, REPO_DIR, STRICT, _lib, fajit, missing, require_library, try_import

np = try_import("numpy")
torch = try_import("torch")

REQUIRED = inspect.Parameter.empty
_COMMON = [("dropout_p", 0.0), ("softmax_scale", None), ("causal", False),
           ("window_size", (-1, -1)), ("softcap", 0.0), ("alibi_slopes", None),
           ("deterministic", False), ("return_attn_probs", False)]

# flash_attn 2.x's signatures (flash_attn/flash_attn_interface.py), name by name.
FLASH_ATTN_SIGNATURES = {
    "flash_attn_func": [("q", REQUIRED), ("k", REQUIRED), ("v", REQUIRED)] + _COMMON,
    "flash_attn_qkvpacked_func": [("qkv", REQUIRED)] + _COMMON,
    "flash_attn_kvpacked_func": [("q", REQUIRED), ("kv", REQUIRED)] + _COMMON,
    "flash_attn_varlen_func": [("q", REQUIRED), ("k", REQUIRED), ("v", REQUIRED),
                               ("cu_seqlens_q", REQUIRED), ("cu_seqlens_k", REQUIRED),
                               ("max_seqlen_q", REQUIRED), ("max_seqlen_k", REQUIRED)]
    + _COMMON + [("block_table", None)],
    "flash_attn_varlen_qkvpacked_func": [("qkv", REQUIRED), ("cu_seqlens", REQUIRED),
                                         ("max_seqlen", REQUIRED)] + _COMMON,
    "flash_attn_varlen_kvpacked_func": [("q", REQUIRED), ("kv", REQUIRED),
                                        ("cu_seqlens_q", REQUIRED), ("cu_seqlens_k", REQUIRED),
                                        ("max_seqlen_q", REQUIRED), ("max_seqlen_k", REQUIRED)]
    + _COMMON,
}


def run_python(code, env_update=None, env_remove=()):
    env = dict(os.environ)
    for name in env_remove:
        env.pop(name, None)
    env.update(env_update or {})
    env["PYTHONPATH"] = PY_DIR + os.pathsep + env.get("PYTHONPATH", "")
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                          text=True, timeout=120)


class ImportTest(unittest.TestCase):
    def test_signatures_match_flash_attn(self):
        for name, want in FLASH_ATTN_SIGNATURES.items():
            with self.subTest(function=name):
                fn = getattr(fajit, name)
                got = [(p.name, p.default) for p in inspect.signature(fn).parameters.values()]
                self.assertEqual(got, want)
                print("signature ok: %s" % name)

    def test_import_needs_neither_library_nor_torch(self):
        # torch hidden and the library path wrong: import still works; the
        # first call says what is missing.
        r = run_python(
            "import sys; sys.modules['torch'] = None\n"
            "import fajit, fajit.dlpack\n"
            "try:\n"
            "    fajit.flash_attn_func(1, 2, 3)\n"
            "except ImportError as e:\n"
            "    print('IMPORTERROR', e)\n",
            {"FAJIT_LIBRARY": "/nonexistent/libfajit.so"})
        self.assertEqual(r.returncode, 0, r.stderr)
        self.assertIn("IMPORTERROR", r.stdout)
        self.assertIn("PyTorch", r.stdout)


class DiscoveryTest(unittest.TestCase):
    def test_fajit_library_is_used(self):
        loaded = require_library(self)
        env_path = os.environ.get("FAJIT_LIBRARY")
        if env_path:
            self.assertEqual(os.path.realpath(env_path), loaded.path)
        self.assertTrue(os.path.isfile(loaded.path), loaded.path)
        print("library: %s (version %s)" % (loaded.path, loaded.version))

    def test_wrong_path_is_a_clear_error(self):
        r = run_python("import fajit\n"
                       "try:\n"
                       "    fajit.load()\n"
                       "except fajit.FajitLibraryError as e:\n"
                       "    print('ERR', e)\n",
                       {"FAJIT_LIBRARY": "/nonexistent/dir/libfajit.so"})
        self.assertEqual(r.returncode, 0, r.stderr)
        self.assertIn("ERR FAJIT_LIBRARY=/nonexistent/dir/libfajit.so: no such file", r.stdout)

    def test_not_a_library_is_a_clear_error(self):
        with tempfile.NamedTemporaryFile(suffix=".so") as f:
            f.write(b"not an ELF file\n")
            f.flush()
            r = run_python("import fajit\n"
                           "try:\n"
                           "    fajit.load()\n"
                           "except fajit.FajitLibraryError as e:\n"
                           "    print('ERR', e)\n",
                           {"FAJIT_LIBRARY": f.name})
        self.assertEqual(r.returncode, 0, r.stderr)
        self.assertIn("ERR FAJIT_LIBRARY=%s: cannot load it" % f.name, r.stdout)

    def test_search_order(self):
        paths = _lib.candidate_paths()
        pkg = os.path.join(PY_DIR, "fajit")
        self.assertTrue(paths[0].startswith(pkg + os.sep), paths[0])
        self.assertIn(os.path.join(sys.prefix, "lib", "libfajit.so.0"), paths)
        self.assertIn("libfajit.so.0", paths)  # the dynamic loader's own search
        self.assertEqual(paths[-1], os.path.join(REPO_DIR, "build", "libfajit.so"))
        self.assertLess(paths.index("libfajit.so.0"), len(paths) - 1)
        print("search order ok: %d places" % len(paths))

    def test_found_without_fajit_library_when_installed_or_built(self):
        # Copy the library next to a copy of the package: found there with
        # FAJIT_LIBRARY unset (the "bundled" place, first in the order).
        loaded = require_library(self)
        with tempfile.TemporaryDirectory() as tmp:
            shutil.copytree(os.path.join(PY_DIR, "fajit"), os.path.join(tmp, "fajit"),
                            ignore=shutil.ignore_patterns("__pycache__"))
            shutil.copy(loaded.path, os.path.join(tmp, "fajit", "libfajit.so"))
            env = dict(os.environ, PYTHONPATH=tmp)
            env.pop("FAJIT_LIBRARY", None)
            r = subprocess.run([sys.executable, "-c", "import fajit; print(fajit.library_path())"],
                               env=env, capture_output=True, text=True, timeout=60, cwd=tmp)
            self.assertEqual(r.returncode, 0, r.stderr)
            self.assertEqual(r.stdout.strip(),
                             os.path.realpath(os.path.join(tmp, "fajit", "libfajit.so")))


def _header():
    path = os.path.join(REPO_DIR, "include", "fajit.h")
    return path if os.path.isfile(path) else None


class StructTest(unittest.TestCase):
    MIRRORS = [(_lib.Options, "fajit_options"), (_lib.AttnArgs, "fajit_attn_args"),
               (_lib.AttnBwdArgs, "fajit_attn_bwd_args"), (_lib.Info, "fajit_info"),
               (_lib.CompileResult, "fajit_compile_result")]

    def test_sizes_written_by_init_functions(self):
        loaded = require_library(self)
        checks = [(_lib.Options, "fajit_options_init"), (_lib.AttnArgs, "fajit_attn_args_init")]
        if loaded.has_backward:
            checks.append((_lib.AttnBwdArgs, "fajit_attn_bwd_args_init"))
        for cls, init in checks:
            size = _lib.init_struct(loaded, cls, init).struct_size
            self.assertEqual(size, ctypes.sizeof(cls), init)
            print("%s: struct_size %d == sizeof(%s)" % (init, size, cls.__name__))

    def test_a_short_mirror_is_caught(self):
        # What the check at load relies on: init writes C's size, whatever the mirror's.
        loaded = require_library(self)

        class Short(ctypes.Structure):  # (one int less would hide in the padding)
            _fields_ = _lib.AttnArgs._fields_[:-3]

        size = _lib.init_struct(loaded, Short, "fajit_attn_args_init").struct_size
        self.assertNotEqual(size, ctypes.sizeof(Short))

    def test_c_reads_the_fields_python_writes(self):
        # One bad field per call: the library names it with the value Python
        # wrote, so it read that field where the mirror put it. Nothing is
        # launched on any error (the pointers are made up).
        loaded = require_library(self)
        ctx = _lib.context()
        calls = [(_lib.AttnArgs, "fajit_attn_args_init", "fajit_attn_fwd", ())]
        if loaded.has_backward:
            calls.append((_lib.AttnBwdArgs, "fajit_attn_bwd_args_init", "fajit_attn_bwd",
                          ("grad_out", "lse", "grad_q", "grad_k", "grad_v")))
        bad = [("nheads_kv", 3, "nheads_kv=3"), ("dv", 9999, "dv=9999"),
               ("dqk", 0, "dqk=0"), ("softmax_scale", float("nan"), "softmax_scale=nan"),
               ("mask", 7, "mask=7"), ("kernel", 9, "kernel=9"), ("dtype", 5, "dtype=5")]
        for cls, init, fn, extra in calls:
            for field, value, text in bad:
                a = loaded.new_args(cls, init)
                for i, p in enumerate(("q", "k", "v", "o") + extra):
                    setattr(a, p, (i + 1) << 24)  # apart: no "overlap" error first
                a.batch, a.seqlen_q, a.seqlen_k, a.nheads_q, a.nheads_kv = 1, 8, 8, 4, 2
                a.dqk = a.dv = 64
                setattr(a, field, value)
                rc = getattr(loaded.lib, fn)(ctx, ctypes.byref(a), None)
                detail = loaded.lib.fajit_last_error().decode()
                if fn == "fajit_attn_bwd" and rc == _lib.FAJIT_EUNSUPPORTED \
                        and "not implemented" in detail:
                    print("%s: a stub in this build (%s); its fields not checked" % (fn, detail))
                    break
                with self.subTest(function=fn, field=field):
                    self.assertEqual(rc, -1, detail)
                    self.assertIn(text, detail)
                    print("%s read %s: %s" % (fn, field, detail))

    def test_field_offsets_match_the_header(self):
        # Compile a C program printing offsetof of every mirrored field.
        header, cc = _header(), shutil.which("cc") or shutil.which("gcc")
        if not header or not cc:
            missing(self, "needs include/fajit.h and a C compiler")
        lines = ["#include <stddef.h>", "#include <stdio.h>", '#include "fajit.h"',
                 "int main(void) {"]
        for cls, cname in self.MIRRORS:
            lines.append('printf("%s sizeof %%zu\\n", sizeof(%s));' % (cname, cname))
            for field, _ in cls._fields_:
                lines.append('printf("%s %s %%zu\\n", offsetof(%s, %s));'
                             % (cname, field, cname, field))
        lines.append("return 0; }")
        with tempfile.TemporaryDirectory() as tmp:
            src, exe = os.path.join(tmp, "offsets.c"), os.path.join(tmp, "offsets")
            with open(src, "w") as f:
                f.write("\n".join(lines) + "\n")
            r = subprocess.run([cc, "-std=c11", "-I", os.path.dirname(header), src, "-o", exe],
                               capture_output=True, text=True)
            self.assertEqual(r.returncode, 0, "a mirrored field is not in fajit.h:\n" + r.stderr)
            out = subprocess.run([exe], capture_output=True, text=True, check=True).stdout
        got = dict(line.rsplit(" ", 1) for line in out.splitlines())
        for cls, cname in self.MIRRORS:
            self.assertEqual(int(got["%s sizeof" % cname]), ctypes.sizeof(cls), cname)
            for field, _ in cls._fields_:
                self.assertEqual(int(got["%s %s" % (cname, field)]), getattr(cls, field).offset,
                                 "%s.%s" % (cname, field))
            print("%s: %d fields at the header's offsets, size %d"
                  % (cname, len(cls._fields_), ctypes.sizeof(cls)))


class ErrorTest(unittest.TestCase):
    def test_error_from_c_carries_its_detail(self):
        require_library(self)
        with self.assertRaises(fajit.FajitError) as cm:
            fajit.variant_complete("ref dqk=9999")
        e = cm.exception
        self.assertEqual(e.status, -10)
        self.assertEqual(e.code, "FAJIT_EPARSE")
        self.assertEqual(e.name, "fajit_variant_complete")
        self.assertIn("dqk=9999", e.detail)  # fajit_last_error names the field and value
        self.assertIn("cannot parse", e.reason)  # fajit_strerror
        self.assertIn("fajit_variant_complete", str(e))
        self.assertIn("dqk=9999", str(e))
        print("FajitError: %s" % e)

    def test_unknown_field(self):
        require_library(self)
        with self.assertRaises(fajit.FajitError) as cm:
            fajit.variant_complete("ref dqk=64 bogus=1")
        self.assertIn("bogus", cm.exception.detail)

    def test_variant_complete_ok(self):
        require_library(self)
        text = fajit.variant_complete("ref dqk=72")
        self.assertTrue(text.startswith("ref dqk=72 dv=72 "), text)

    def test_error_pickles(self):
        import pickle
        e = fajit.FajitError(-1, "fajit_attn_fwd", "q is NULL", "invalid argument")
        e2 = pickle.loads(pickle.dumps(e))
        self.assertEqual((e2.status, e2.name, e2.detail, str(e2)),
                         (e.status, e.name, e.detail, str(e)))

    def test_compile_variant(self):
        require_library(self)
        first = fajit.compile_variant("ref dqk=40 dtype=bf16")
        self.assertGreater(first["cubin_bytes"], 0)
        self.assertEqual(len(first["key"]), 32)
        again = fajit.compile_variant("ref dqk=40 dtype=bf16")
        self.assertEqual(again["key"], first["key"])
        if fajit.info()["cache_mode"] == 0:  # read-write: the second is a hit
            self.assertTrue(again["cached"])
        print("compiled: %s" % first)

    def test_info(self):
        require_library(self)
        d = fajit.info()
        self.assertEqual(d["version"], fajit.version())
        self.assertTrue(d["build_id"] and len(d["build_id"]) == 32, d["build_id"])
        if d["device_count"] == 0:
            self.assertTrue(d["no_gpu_reason"])


@unittest.skipUnless(torch is not None, "needs torch (CPU tensors are enough)")
class ArgumentTest(unittest.TestCase):
    """Argument errors before any C call, shown with CPU tensors."""

    def t(self, *shape, dtype=None):
        return torch.zeros(*shape, dtype=dtype or torch.float16)

    def test_errors(self):
        q, k, v = self.t(2, 16, 4, 64), self.t(2, 16, 2, 64), self.t(2, 16, 2, 64)
        cases = [
            (TypeError, "q must be a torch.Tensor", lambda: fajit.flash_attn_func(1, k, v)),
            (TypeError, "k must be torch.float16 or torch.bfloat16",
             lambda: fajit.flash_attn_func(q, k.float(), v)),
            (ValueError, "v must have 4 dimensions",
             lambda: fajit.flash_attn_func(q, k, v[0])),
            (TypeError, "k has dtype torch.bfloat16 but q has torch.float16",
             lambda: fajit.flash_attn_func(q, k.bfloat16(), v)),
            (ValueError, "q has head dim 64 but k has 32",
             lambda: fajit.flash_attn_func(q, self.t(2, 16, 2, 32), self.t(2, 16, 2, 32))),
            (ValueError, "nheads of q (4) must be a multiple of nheads of k (3)",
             lambda: fajit.flash_attn_func(q, self.t(2, 16, 3, 64), self.t(2, 16, 3, 64))),
            (ValueError, "q has batch 2 but k has 1",
             lambda: fajit.flash_attn_func(q, k[:1], v[:1])),
            (ValueError, "v has shape",
             lambda: fajit.flash_attn_func(q, k, v[:, :8])),
            (ValueError, "q must be on a CUDA device, got cpu",
             lambda: fajit.flash_attn_func(q, k, v)),
            (ValueError, "softmax_scale must be a finite nonzero",
             lambda: fajit.flash_attn_func(q, k, v, softmax_scale=0.0)),
            (ValueError, "dropout_p must be in [0, 1)",
             lambda: fajit.flash_attn_func(q, k, v, dropout_p=1.5)),
            (ValueError, "softcap must be a finite number >= 0 (0: off), got -1.0",
             lambda: fajit.flash_attn_func(q, k, v, softcap=-1.0)),
            (ValueError, "softcap must be a finite number >= 0",
             lambda: fajit.flash_attn_func(q, k, v, softcap=float("inf"))),
            (TypeError, "alibi_slopes must be a torch.Tensor, got list",
             lambda: fajit.flash_attn_func(q, k, v, alibi_slopes=[1.0] * 4)),
            (TypeError, "alibi_slopes must be torch.float32, got torch.float16",
             lambda: fajit.flash_attn_func(q, k, v, alibi_slopes=torch.ones(4).half())),
            (ValueError, "alibi_slopes must have shape (nheads,) = (4,) or (batch, nheads) = "
             "(2, 4), got (2,)",
             lambda: fajit.flash_attn_func(q, k, v, alibi_slopes=torch.ones(2))),
            (ValueError, "got (3, 4)",
             lambda: fajit.flash_attn_func(q, k, v, alibi_slopes=torch.ones(3, 4))),
            (ValueError, "alibi_slopes must have shape (nheads,) = (4,) or (batch, nheads) = "
             "(2, 4), got (2, 3)",
             lambda: fajit.flash_attn_qkvpacked_func(self.t(2, 16, 3, 4, 64),
                                                     alibi_slopes=torch.ones(2, 3))),
            (TypeError, "window_size must be a pair",
             lambda: fajit.flash_attn_func(q, k, v, window_size=3)),
            (ValueError, "qkv must have shape (batch, seqlen, 3, nheads, headdim)",
             lambda: fajit.flash_attn_qkvpacked_func(self.t(2, 16, 2, 4, 64))),
            (ValueError, "qkv must be on a CUDA device",
             lambda: fajit.flash_attn_qkvpacked_func(self.t(2, 16, 3, 4, 64))),
            (ValueError, "kv must have shape (batch, seqlen_k, 2, nheads_k, headdim)",
             lambda: fajit.flash_attn_kvpacked_func(q, self.t(2, 16, 3, 2, 64))),
            (ValueError, "nheads of q (4) must be a multiple of nheads of kv (3)",
             lambda: fajit.flash_attn_kvpacked_func(q, self.t(2, 16, 2, 3, 64))),
        ]
        for exc, text, call in cases:
            with self.subTest(expect=text):
                with self.assertRaises(exc) as cm:
                    call()
                self.assertIn(text, str(cm.exception))
                print("%s: %s" % (exc.__name__, cm.exception))

    def test_features_are_accepted(self):
        # Valid feature arguments get through every check to the CUDA one.
        q, k, v = self.t(2, 16, 4, 64), self.t(2, 16, 2, 64), self.t(2, 16, 2, 64)
        calls = {
            "dropout": lambda: fajit.flash_attn_func(q, k, v, dropout_p=0.1),
            "window": lambda: fajit.flash_attn_func(q, k, v, window_size=(4, 4)),
            "causal window": lambda: fajit.flash_attn_func(q, k, v, causal=True,
                                                           window_size=(4, -1)),
            "softcap": lambda: fajit.flash_attn_func(q, k, v, softcap=30.0),
            "alibi (nheads,)": lambda: fajit.flash_attn_func(q, k, v, alibi_slopes=torch.ones(4)),
            "alibi (batch, nheads)": lambda: fajit.flash_attn_func(
                q, k, v, alibi_slopes=torch.ones(2, 4)),
            "kvpacked all": lambda: fajit.flash_attn_kvpacked_func(
                q, self.t(2, 16, 2, 2, 64), dropout_p=0.2, window_size=(3, 0), softcap=5.0,
                alibi_slopes=torch.ones(4)),
            "with grad, no_grad": lambda: self.no_grad(
                lambda: fajit.flash_attn_func(q.clone().requires_grad_(), k, v, softcap=5.0)),
            "with grad, causal only": lambda: fajit.flash_attn_func(
                q.clone().requires_grad_(), k, v, window_size=(-1, 0)),
        }
        for name, call in calls.items():
            with self.subTest(call=name):
                with self.assertRaises(ValueError) as cm:
                    call()
                self.assertIn("must be on a CUDA device, got cpu", str(cm.exception))
                print("%s: accepted, then %s" % (name, cm.exception))

    def no_grad(self, call):
        with torch.no_grad():
            return call()

    def test_autograd_with_features_is_accepted(self):
        # Autograd takes every feature now: with inputs requiring grad, each
        # call gets through every check to the CUDA one (none is refused).
        q, k, v = self.t(2, 16, 4, 64), self.t(2, 16, 2, 64), self.t(2, 16, 2, 64)
        qg = q.clone().requires_grad_()
        cu = torch.tensor([0, 5, 16], dtype=torch.int32)
        cases = [
            ("window", lambda: fajit.flash_attn_func(qg, k, v, window_size=(4, 4))),
            ("causal window", lambda: fajit.flash_attn_func(qg, k, v, causal=True,
                                                            window_size=(4, -1))),
            ("softcap", lambda: fajit.flash_attn_func(qg, k, v, softcap=30.0)),
            ("alibi", lambda: fajit.flash_attn_func(q, k.clone().requires_grad_(), v,
                                                    alibi_slopes=torch.ones(4))),
            ("dropout qkvpacked", lambda: fajit.flash_attn_qkvpacked_func(
                self.t(2, 16, 3, 4, 64).requires_grad_(), dropout_p=0.1)),
            ("kvpacked softcap dropout", lambda: fajit.flash_attn_kvpacked_func(
                qg, self.t(2, 16, 2, 2, 64), softcap=3.0, dropout_p=0.5)),
            ("varlen", lambda: fajit.flash_attn_varlen_func(qg[0], k[0], v[0], cu, cu, 11, 11,
                                                            deterministic=True)),
            ("varlen qkvpacked", lambda: fajit.flash_attn_varlen_qkvpacked_func(
                self.t(16, 3, 4, 64).requires_grad_(), cu, 11, dropout_p=0.2)),
            ("varlen kvpacked", lambda: fajit.flash_attn_varlen_kvpacked_func(
                q[0], self.t(16, 2, 2, 64).requires_grad_(), cu, cu, 11, 11, softcap=2.0,
                alibi_slopes=torch.ones(2, 4))),
        ]
        for name, call in cases:
            with self.subTest(call=name):
                with self.assertRaises(ValueError) as cm:
                    call()
                self.assertIn("must be on a CUDA device, got cpu", str(cm.exception))
                print("%s with grad: accepted, then %s" % (name, cm.exception))

    def test_varlen_errors(self):
        q, k, v = self.t(16, 4, 64), self.t(20, 2, 64), self.t(20, 2, 32)
        cu_q = torch.tensor([0, 5, 16], dtype=torch.int32)
        cu_k = torch.tensor([0, 12, 20], dtype=torch.int32)
        f = fajit.flash_attn_varlen_func
        cases = [
            (ValueError, "q must have 3 dimensions",
             lambda: f(q[None], k, v, cu_q, cu_k, 11, 12)),
            (ValueError, "v has shape (19, 2, 32) but k has (20, 2, 64): total_k and nheads",
             lambda: f(q, k, v[:19], cu_q, cu_k, 11, 12)),
            (ValueError, "q has head dim 64 but k has 32",
             lambda: f(q, v, v, cu_q, cu_k, 11, 12)),
            (ValueError, "nheads of q (4) must be a multiple of nheads of k (3)",
             lambda: f(q, self.t(20, 3, 64), self.t(20, 3, 64), cu_q, cu_k, 11, 12)),
            (TypeError, "cu_seqlens_q must be a torch.Tensor, got list",
             lambda: f(q, k, v, [0, 5, 16], cu_k, 11, 12)),
            (TypeError, "cu_seqlens_k must be torch.int32, got torch.int64",
             lambda: f(q, k, v, cu_q, cu_k.long(), 11, 12)),
            (ValueError, "cu_seqlens_q must have shape (batch + 1,), got (1, 3)",
             lambda: f(q, k, v, cu_q[None], cu_k, 11, 12)),
            (ValueError, "cu_seqlens_q must have shape (batch + 1,), got (0,)",
             lambda: f(q, k, v, cu_q[:0], cu_k, 11, 12)),
            (ValueError, "cu_seqlens_q has 3 entries but cu_seqlens_k has 2",
             lambda: f(q, k, v, cu_q, cu_k[:2], 11, 12)),
            (TypeError, "max_seqlen_q must be an int, got float",
             lambda: f(q, k, v, cu_q, cu_k, 11.0, 12)),
            (ValueError, "max_seqlen_k must be >= 0, got -1",
             lambda: f(q, k, v, cu_q, cu_k, 11, -1)),
            (ValueError, "alibi_slopes must have shape (nheads,) = (4,) or (batch, nheads) = "
             "(2, 4), got (3, 4)",
             lambda: f(q, k, v, cu_q, cu_k, 11, 12, alibi_slopes=torch.ones(3, 4))),
            (ValueError, "dropout_p must be in [0, 1)",
             lambda: f(q, k, v, cu_q, cu_k, 11, 12, dropout_p=1.0)),
            (NotImplementedError, "block_table (paged KV cache)",
             lambda: f(q, k, v, cu_q, cu_k, 11, 12, block_table=cu_q)),
            (ValueError, "q must be on a CUDA device, got cpu",
             lambda: f(q, k, v, cu_q, cu_k, 11, 12, causal=True, window_size=(3, 3),
                       softcap=2.0, alibi_slopes=torch.ones(2, 4), dropout_p=0.1)),
            (ValueError, "qkv must have shape (total, 3, nheads, headdim), got (16, 2, 4, 64)",
             lambda: fajit.flash_attn_varlen_qkvpacked_func(self.t(16, 2, 4, 64), cu_q, 11)),
            (ValueError, "qkv must be on a CUDA device, got cpu",
             lambda: fajit.flash_attn_varlen_qkvpacked_func(self.t(16, 3, 4, 64), cu_q, 11)),
            (ValueError, "kv must have shape (total_k, 2, nheads_k, headdim), got (20, 3, 2, 64)",
             lambda: fajit.flash_attn_varlen_kvpacked_func(q, self.t(20, 3, 2, 64), cu_q, cu_k,
                                                           11, 12)),
            (ValueError, "q must be on a CUDA device, got cpu",
             lambda: fajit.flash_attn_varlen_kvpacked_func(q, self.t(20, 2, 2, 64), cu_q, cu_k,
                                                           11, 12)),
        ]
        for exc, text, call in cases:
            with self.subTest(expect=text):
                with self.assertRaises(exc) as cm:
                    call()
                self.assertIn(text, str(cm.exception))
                print("%s: %s" % (exc.__name__, cm.exception))

    def test_alibi_strides(self):
        from fajit import interface
        cpu = torch.device("cpu")
        base = torch.rand(2, 4)
        cases = [
            ("(nheads,)", base[0], 1, 0),
            ("(nheads,) strided", torch.rand(8)[::2], 1, 0),  # stride 2: copied
            ("(batch, nheads)", base, 2, 4),
            ("expanded", base[0].expand(2, 4), 2, 0),  # one row for every batch
            ("transposed", base.t().contiguous().t(), 2, 4),  # heads not contiguous: copied
            ("batch 1", base[:1], 1, 0),
        ]
        for name, slopes, ndim, stride in cases:
            with self.subTest(case=name):
                batch = 1 if name == "batch 1" else 2
                got, bstride = interface._alibi(slopes, batch, 4, cpu)
                self.assertEqual(bstride, stride)
                self.assertEqual(got.dim(), ndim if name != "batch 1" else 1)
                self.assertEqual(got.stride(-1), 1)
                self.assertTrue(torch.equal(got.expand(batch, 4), slopes.expand(batch, 4)))
                print("alibi %s: batch stride %d" % (name, bstride))

    def test_dropout_seeds(self):
        from fajit import interface
        interface._import_torch()
        try:
            interface.dropout_generator = torch.Generator().manual_seed(3)
            a, b = interface._dropout_seed(), interface._dropout_seed()
            interface.dropout_generator = torch.Generator().manual_seed(3)
            self.assertEqual(interface._dropout_seed(), a)
            self.assertNotEqual(a, b)
            self.assertTrue(0 <= a < 2 ** 63 and 0 <= b < 2 ** 63)
        finally:
            interface.dropout_generator = None
        torch.manual_seed(11)
        a = interface._dropout_seed()
        torch.manual_seed(11)
        self.assertEqual(interface._dropout_seed(), a)


class FeatureMappingTest(unittest.TestCase):
    """flash_attn's window_size and the feature fields, as the C struct gets them
    (no torch, no library needed)."""

    def test_window_mapping(self):
        from fajit import interface
        N, C = _lib.MASK_NONE, _lib.MASK_CAUSAL
        cases = [  # (causal, window_size, seqlen_k) -> (mask, window_left, window_right)
            ((False, (-1, -1), 16), (N, -1, -1)),
            ((False, (16, 99), 16), (N, -1, -1)),  # sides past every key bound nothing
            ((False, (-1, 0), 16), (C, -1, -1)),  # (-1, 0) is the causal mask
            ((True, (-1, -1), 16), (C, -1, -1)),
            ((True, (100, 5), 16), (C, -1, -1)),
            ((True, (4, -1), 16), (C, 4, -1)),  # causal composes with a left window
            ((True, (4, 7), 16), (C, 4, -1)),  # causal is a right window of 0
            ((False, (4, 0), 16), (C, 4, -1)),
            ((False, (4, 3), 16), (N, 4, 3)),
            ((False, (-5, 3), 16), (N, -1, 3)),  # any negative side is unbounded
            ((False, (0, 0), 16), (C, 0, -1)),  # the diagonal only
            ((False, (15, 15), 16), (N, 15, 15)),
        ]
        for args, want in cases:
            with self.subTest(args=args):
                self.assertEqual(interface._mask_window(*args), want)
        with self.assertRaises(TypeError) as cm:
            interface._mask_window(False, (1, 2, 3), 16)
        self.assertIn("window_size must be a pair", str(cm.exception))
        print("window mapping: %d cases" % len(cases))

    def test_fill(self):
        from fajit import interface

        class Slopes:  # stands for a CUDA tensor: only data_ptr is read
            def data_ptr(self):
                return 0x1000

        f = interface._Features()
        for cls in (_lib.AttnArgs, _lib.AttnBwdArgs):  # the same fields in both structs
            a = cls()
            a.window_left = a.window_right = -1
            f.fill(a)
            self.assertEqual((a.window_left, a.window_right, a.softcap, a.alibi_slopes,
                              a.alibi_batch_stride, a.dropout_p), (-1, -1, 0.0, None, 0, 0.0))
        f.window_left, f.window_right, f.window_size = 8, 0, (8, 0)
        f.softcap, f.alibi, f.alibi_batch_stride = 30.0, Slopes(), 4
        f.fill(a)
        self.assertEqual((a.window_left, a.window_right, a.softcap, a.alibi_slopes,
                          a.alibi_batch_stride), (8, 0, 30.0, 0x1000, 4))

    def test_dropout_seed_drawn_once_per_call(self):
        # The forward's fill draws the seed; the backward's fill passes the same
        # one (and offset 0), so the library regenerates the forward's mask.
        if torch is None:
            self.skipTest("needs torch (for the seed generator)")
        from fajit import interface
        try:
            interface.dropout_generator = torch.Generator().manual_seed(21)
            f, g = interface._Features(), interface._Features()
            f.dropout_p = g.dropout_p = 0.25
            fwd, bwd, other = _lib.AttnArgs(), _lib.AttnBwdArgs(), _lib.AttnArgs()
            f.fill(fwd)
            f.fill(bwd)
            g.fill(other)
        finally:
            interface.dropout_generator = None
        self.assertEqual((bwd.dropout_p, bwd.dropout_seed, bwd.dropout_offset),
                         (fwd.dropout_p, fwd.dropout_seed, fwd.dropout_offset))
        self.assertAlmostEqual(fwd.dropout_p, 0.25)
        self.assertEqual(fwd.dropout_offset, 0)
        self.assertNotEqual(other.dropout_seed, fwd.dropout_seed, "each call draws its own seed")
        print("dropout seed %d: forward and backward alike" % fwd.dropout_seed)


# ---------------------------------------------------------------- DLPack

_CAPSULE_NAME = ctypes.create_string_buffer(b"dltensor")
_capsule_new = ctypes.pythonapi.PyCapsule_New
_capsule_new.restype = ctypes.py_object
_capsule_new.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_void_p]


class FakeCudaTensor:
    """A DLPack producer claiming a CUDA tensor at a made-up address: lets the
    CUDA-side validation run here. Never launched on (see the test)."""

    def __init__(self, shape, strides=None, code=2, bits=16, device_id=0, data=0x10000):
        from fajit import dlpack
        n = len(shape)
        self._shape = (ctypes.c_int64 * n)(*shape)
        self._strides = (ctypes.c_int64 * n)(*strides) if strides else None
        m = dlpack._DLManagedTensor()
        t = m.dl_tensor
        t.data, t.ndim = data, n
        t.device.device_type, t.device.device_id = dlpack.KDL_CUDA, device_id
        t.dtype.code, t.dtype.bits, t.dtype.lanes = code, bits, 1
        t.shape = ctypes.cast(self._shape, ctypes.POINTER(ctypes.c_int64))
        if self._strides is not None:
            t.strides = ctypes.cast(self._strides, ctypes.POINTER(ctypes.c_int64))
        self._managed = m
        self.streams = []

    def __dlpack_device__(self):
        return (2, self._managed.dl_tensor.device.device_id)

    def __dlpack__(self, stream=None):
        self.streams.append(stream)
        return _capsule_new(ctypes.addressof(self._managed), _CAPSULE_NAME, None)


@unittest.skipUnless(np is not None and hasattr(np.zeros(1), "__dlpack__"),
                     "needs numpy >= 1.22 (DLPack)")
class DLPackParseTest(unittest.TestCase):
    def test_contiguous(self):
        from fajit import dlpack
        a = np.zeros((2, 3, 4, 5), dtype=np.float16)
        t = dlpack.parse(a)
        self.assertEqual((t.device_type, t.device_id, t.device_name), (1, 0, "cpu:0"))
        self.assertEqual(t.dtype, (2, 16, 1))
        self.assertEqual(t.dtype_name, "float16")
        self.assertEqual(t.shape, (2, 3, 4, 5))
        self.assertEqual(t.strides, (60, 20, 5, 1))
        self.assertEqual(t.data, a.ctypes.data)
        print("parsed contiguous: shape %s strides %s" % (t.shape, t.strides))

    def test_strided_views(self):
        from fajit import dlpack
        base = np.arange(2 * 6 * 4 * 8, dtype=np.float16).reshape(2, 6, 4, 8)
        for view, name in ((base.transpose(0, 2, 1, 3), "transpose"),
                           (base[:, 1::2, :, 2:], "slice with offset and step"),
                           (base[1:, :, 3:4], "batch and head offset")):
            with self.subTest(view=name):
                t = dlpack.parse(view)
                self.assertEqual(t.shape, view.shape)
                self.assertEqual(t.strides, tuple(s // view.itemsize for s in view.strides))
                self.assertEqual(t.data, view.ctypes.data)
                print("parsed %s: shape %s strides %s" % (name, t.shape, t.strides))

    def test_dtypes(self):
        from fajit import dlpack
        for dt, want in ((np.float32, (2, 32, 1)), (np.int8, (0, 8, 1)), (np.uint16, (1, 16, 1))):
            self.assertEqual(dlpack.parse(np.zeros((1, 2), dtype=dt)).dtype, want)

    def test_producer_kept_alive_then_released(self):
        from fajit import dlpack
        a = np.zeros((4, 4), dtype=np.float16)
        ref = weakref.ref(a)
        t = dlpack.parse(a)
        del a
        gc.collect()
        self.assertIsNotNone(ref(), "the producer died while its capsule was in use")
        del t
        gc.collect()
        self.assertIsNone(ref(), "the capsule's deleter was never called")

    def test_cpu_arrays_are_refused(self):
        from fajit import dlpack
        a = np.zeros((1, 8, 2, 16), dtype=np.float16)
        with self.assertRaises(ValueError) as cm:
            dlpack.attention(a, a, a)
        self.assertIn("q must be on a CUDA device, got cpu:0", str(cm.exception))
        print("refused: %s" % cm.exception)

    def test_not_dlpack(self):
        from fajit import dlpack
        with self.assertRaises(TypeError) as cm:
            dlpack.attention([1], [2], [3])
        self.assertIn("q must support DLPack", str(cm.exception))


class DLPackValidateTest(unittest.TestCase):
    """Validation of CUDA tensors, with a fake producer (no GPU, no launch)."""

    def call(self, q, k, v, **kw):
        from fajit import dlpack
        return dlpack.attention(q, k, v, **kw)

    def test_errors(self):
        q = FakeCudaTensor((2, 16, 4, 64))
        k = FakeCudaTensor((2, 32, 2, 64))
        v = FakeCudaTensor((2, 32, 2, 48))
        out = FakeCudaTensor((2, 16, 4, 48))
        cases = [
            (TypeError, "q must be float16 or bfloat16, got float32",
             lambda: self.call(FakeCudaTensor((2, 16, 4, 64), bits=32, code=2), k, v, out=out)),
            (ValueError, "k must have 4 dimensions",
             lambda: self.call(q, FakeCudaTensor((32, 2, 64)), v, out=out)),
            (ValueError, "v must have a contiguous last dimension",
             lambda: self.call(q, k, FakeCudaTensor((2, 32, 2, 48), (6144, 192, 96, 2)), out=out)),
            (ValueError, "all 0 (broadcast)",
             lambda: self.call(q, FakeCudaTensor((2, 32, 2, 64), (0, 0, 0, 1)), v, out=out)),
            (ValueError, "shapes do not fit",
             lambda: self.call(q, k, FakeCudaTensor((2, 31, 2, 48)), out=out)),
            (ValueError, "nheads of q (4) must be a multiple of nheads of k (3)",
             lambda: self.call(q, FakeCudaTensor((2, 32, 3, 64)), FakeCudaTensor((2, 32, 3, 48)),
                               out=out)),
            (TypeError, "k is bfloat16 but q is float16",
             lambda: self.call(q, FakeCudaTensor((2, 32, 2, 64), code=4), v, out=out)),
            (ValueError, "v is on cuda:1 but q is on cuda:0",
             lambda: self.call(q, k, FakeCudaTensor((2, 32, 2, 48), device_id=1), out=out)),
            (ValueError, "out must have shape (2, 16, 4, 48), got (2, 16, 4, 64)",
             lambda: self.call(q, k, v, out=FakeCudaTensor((2, 16, 4, 64)))),
            (ValueError, "softmax_scale must be a finite nonzero",
             lambda: self.call(q, k, v, out=out, softmax_scale=float("inf"))),
        ]
        for exc, text, call in cases:
            with self.subTest(expect=text):
                with self.assertRaises(exc) as cm:
                    call()
                self.assertIn(text, str(cm.exception))
                print("%s: %s" % (exc.__name__, cm.exception))

    def test_feature_errors(self):
        q = FakeCudaTensor((2, 16, 4, 64))
        k = FakeCudaTensor((2, 32, 2, 64))
        v = FakeCudaTensor((2, 32, 2, 48))
        out = FakeCudaTensor((2, 16, 4, 48))

        def f32(*shape, **kw):
            return FakeCudaTensor(shape, bits=32, **kw)
        cases = [
            (ValueError, "dropout_p must be in [0, 1), got 1.0", dict(dropout_p=1.0)),
            (ValueError, "dropout_p > 0 needs dropout_seed=", dict(dropout_p=0.1)),
            (ValueError, "dropout_seed must be an integer in [0, 2^64), got -1",
             dict(dropout_p=0.1, dropout_seed=-1)),
            (TypeError, "dropout_offset must be an int, got str",
             dict(dropout_p=0.1, dropout_seed=3, dropout_offset="x")),
            (ValueError, "softcap must be a finite number >= 0", dict(softcap=-1.0)),
            (TypeError, "window_size must be a pair", dict(window_size=3)),
            (TypeError, "alibi_slopes must be float32, got float16",
             dict(alibi_slopes=FakeCudaTensor((4,)))),
            (ValueError, "alibi_slopes must have shape (nheads_q,) = (4,) or (batch, nheads_q) = "
             "(2, 4), got (3,)", dict(alibi_slopes=f32(3))),
            (ValueError, "alibi_slopes is on cuda:1 but q is on cuda:0",
             dict(alibi_slopes=f32(4, device_id=1))),
            (ValueError, "alibi_slopes: batch stride 2 must be 0 (shared) or >= nheads_q (4)",
             dict(alibi_slopes=f32(2, 4, strides=(2, 1)))),
            (TypeError, "lse must be float32, got float16",
             dict(lse=FakeCudaTensor((2, 4, 16)))),
            (ValueError, "lse must have shape (batch, nheads_q, seqlen_q) = (2, 4, 16), got (2, 16, 4)",
             dict(lse=f32(2, 16, 4))),
            (ValueError, "lse must be contiguous", dict(lse=f32(2, 4, 16, strides=(128, 32, 2)))),
        ]
        for exc, text, kw in cases:
            with self.subTest(expect=text):
                with self.assertRaises(exc) as cm:
                    self.call(q, k, v, out=out, **kw)
                self.assertIn(text, str(cm.exception))
                print("%s: %s" % (exc.__name__, cm.exception))

    def test_backward_errors(self):
        from fajit import dlpack
        q = FakeCudaTensor((2, 16, 4, 64))
        k = FakeCudaTensor((2, 32, 2, 64))
        v = FakeCudaTensor((2, 32, 2, 48))
        out = FakeCudaTensor((2, 16, 4, 48))
        lse = FakeCudaTensor((2, 4, 16), bits=32)
        grads = dict(dq=FakeCudaTensor((2, 16, 4, 64)), dk=FakeCudaTensor((2, 32, 2, 64)),
                     dv=FakeCudaTensor((2, 32, 2, 48)))

        def call(dout=out, lse_=lse, **kw):
            args = dict(grads)
            args.update(kw)
            return dlpack.attention_backward(q, k, v, out, dout, lse_, **args)
        cases = [
            (ValueError, "dout must have shape (2, 16, 4, 48), got (2, 16, 4, 64)",
             lambda: call(dout=FakeCudaTensor((2, 16, 4, 64)))),
            (TypeError, "dout is bfloat16 but q is float16",
             lambda: call(dout=FakeCudaTensor((2, 16, 4, 48), code=4))),
            (TypeError, "lse must be float32, got float16",
             lambda: call(lse_=FakeCudaTensor((2, 4, 16)))),
            (ValueError, "lse must have shape (batch, nheads_q, seqlen_q) = (2, 4, 16)",
             lambda: call(lse_=FakeCudaTensor((2, 16, 4), bits=32))),
            (ValueError, "dk must have shape (2, 32, 2, 64), got (2, 32, 4, 64)",
             lambda: call(dk=FakeCudaTensor((2, 32, 4, 64)))),
            (TypeError, "dv is bfloat16 but q is float16",
             lambda: call(dv=FakeCudaTensor((2, 32, 2, 48), code=4))),
            (ValueError, "dropout_p > 0 needs dropout_seed=", lambda: call(dropout_p=0.2)),
            (ValueError, "out must have a contiguous last dimension", lambda: dlpack.attention_backward(
                q, k, v, FakeCudaTensor((2, 16, 4, 48), (6144, 384, 96, 2)), out, lse, **grads)),
        ]
        for exc, text, run in cases:
            with self.subTest(expect=text):
                with self.assertRaises(exc) as cm:
                    run()
                self.assertIn(text, str(cm.exception))
                print("%s: %s" % (exc.__name__, cm.exception))

    def test_stream_is_passed_to_producers(self):
        q = FakeCudaTensor((1, 4, 1, 8), bits=32)  # refused after parsing, before any launch
        with self.assertRaises(TypeError):
            self.call(q, q, q, stream=1234)
        self.assertEqual(q.streams, [1234, 1234, 1234])
        with self.assertRaises(TypeError):
            self.call(q, q, q)
        self.assertEqual(q.streams[3:], [1, 1, 1])  # None: the legacy default stream

    def test_reaches_the_library(self):
        # Only where no GPU can be reached: the made-up pointers must never be launched on.
        loaded = require_library(self)
        if fajit.info()["device_count"] != 0:
            self.skipTest("a GPU is here; the fake pointers are checked only without one")
        q, k = FakeCudaTensor((1, 8, 2, 64)), FakeCudaTensor((1, 8, 2, 64))
        v, out = FakeCudaTensor((1, 8, 2, 64)), FakeCudaTensor((1, 8, 2, 64))
        with self.assertRaises(fajit.FajitError) as cm:
            self.call(q, k, v, out=out, causal=True)
        self.assertEqual(cm.exception.name, "fajit_attn_fwd")
        self.assertEqual(cm.exception.code, "FAJIT_ENOGPU")
        print("through DLPack to %s: %s" % (loaded.path, cm.exception))
        # Every feature, and the backward: past every check, to the GPU the library lacks.
        lse = FakeCudaTensor((1, 2, 8), bits=32, data=0x20000)
        slopes = FakeCudaTensor((1, 2), bits=32, data=0x30000)
        feats = dict(causal=True, window_size=(4, 0), softcap=10.0, alibi_slopes=slopes,
                     dropout_p=0.1, dropout_seed=2 ** 64 - 1, dropout_offset=7)
        with self.assertRaises(fajit.FajitError) as cm:
            self.call(q, k, v, out=out, lse=lse, **feats)
        self.assertEqual(cm.exception.code, "FAJIT_ENOGPU")
        if not loaded.has_backward:
            return
        from fajit import dlpack
        grads = [FakeCudaTensor((1, 8, 2, 64), data=0x40000 + 0x10000 * i) for i in range(3)]
        with self.assertRaises(fajit.FajitError) as cm:
            dlpack.attention_backward(q, k, v, out, out, lse, dq=grads[0], dk=grads[1],
                                      dv=grads[2], deterministic=True, **feats)
        self.assertEqual(cm.exception.name, "fajit_attn_bwd")
        self.assertEqual(cm.exception.code, "FAJIT_ENOGPU")
        print("backward through DLPack: %s" % cm.exception)


# ---------------------------------------------------------------- python -m fajit

class MainTest(unittest.TestCase):
    def run_main(self, *args, env_update=None):
        env = dict(os.environ)
        env.update(env_update or {})
        env["PYTHONPATH"] = PY_DIR + os.pathsep + env.get("PYTHONPATH", "")
        return subprocess.run([sys.executable, "-m", "fajit"] + list(args), env=env,
                              capture_output=True, text=True, timeout=120)

    def cli(self):
        require_library(self)
        from fajit.__main__ import find_cli
        try:
            return find_cli()
        except _lib.FajitLibraryError as e:
            missing(self, str(e))

    def test_forwards_and_passes_the_exit_code(self):
        cli = self.cli()
        r = self.run_main("--version")
        self.assertEqual(r.returncode, 0, r.stderr)
        self.assertIn(fajit.version(), r.stdout)
        r = self.run_main("variant", "ref dqk=100")
        self.assertEqual(r.returncode, 0, r.stderr)
        self.assertIn("ref dqk=100 dv=100", r.stdout)
        r = self.run_main("no-such-command")
        self.assertEqual(r.returncode, 2, r.stderr)  # the CLI's usage error, passed through
        self.assertIn("no-such-command", r.stderr)
        print("python -m fajit -> %s: exit codes passed through" % cli)

    def test_missing_cli(self):
        r = self.run_main("info", env_update={"FAJIT_CLI": "/nonexistent/fajit"})
        self.assertEqual(r.returncode, 127)
        self.assertIn("FAJIT_CLI=/nonexistent/fajit", r.stderr)


if __name__ == "__main__":
    if STRICT:
        print("strict: missing prerequisites fail")
    unittest.main(verbosity=2)
