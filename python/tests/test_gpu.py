"""The Python binding on a GPU, against PyTorch's math attention.

FlashAttention's rule: the reference is computed in fp32 from the same inputs;
fajit's max error against it must be at most twice the max error of the same
math attention computed in the input dtype, plus a small absolute slack.
Outputs, LSE and (when the library has a working backward) gradients; every
output buffer is NaN-poisoned before the launch.

Skips cleanly without torch, CUDA or the library. Runs under pytest or unittest:
    FAJIT_LIBRARY=build/libfajit.so python3 -m pytest -q python/tests
"""

import math
import os
import subprocess
import sys
import unittest

from _support import PY_DIR, STRICT, _lib, fajit, try_import

torch = try_import("torch")
HAVE_CUDA = torch is not None and torch.cuda.is_available()

HEAD_DIMS = (32, 64, 72, 100, 128, 256)
DTYPES = ("float16", "bfloat16")
# (batch, seqlen_q, seqlen_k, nheads_q, nheads_kv): MHA, GQA with sq != sk,
# MQA with sq > sk (fully masked rows under causal), a single query row.
SHAPES = ((2, 128, 128, 4, 4), (1, 113, 203, 4, 2), (2, 256, 97, 6, 1), (1, 1, 128, 4, 4))
SLACK = 1e-3


def attention_ref(q, k, v, causal, scale, upcast):
    """Math attention with flash_attn's semantics; fp32 when upcast, else in the input dtype.

    Returns (out, lse); fully masked rows give 0 and -inf, with clean (zero,
    not NaN) gradients through them."""
    if upcast:
        q, k, v = q.float(), k.float(), v.float()
    hq, hkv = q.shape[2], k.shape[2]
    k = k.repeat_interleave(hq // hkv, dim=2)
    v = v.repeat_interleave(hq // hkv, dim=2)
    if upcast:
        scores = torch.einsum("bqhd,bkhd->bhqk", q, k) * scale
    else:  # as flash_attn's test: scale q first, in the input dtype
        scores = torch.einsum("bqhd,bkhd->bhqk", q * scale, k)
    sq, sk = q.shape[1], k.shape[1]
    empty = torch.zeros(sq, 1, dtype=torch.bool, device=q.device)
    if causal:  # bottom-right aligned: row i sees keys j <= i + sk - sq
        i = torch.arange(sq, device=q.device).view(sq, 1)
        j = torch.arange(sk, device=q.device).view(1, sk)
        masked = j > i + (sk - sq)
        empty = masked.all(dim=-1, keepdim=True)
        # Rows with no key keep finite scores (zeroed below), so no NaN anywhere.
        scores = scores.masked_fill(masked & ~empty, float("-inf"))
    lse = torch.logsumexp(scores.float(), dim=-1).masked_fill(empty.squeeze(-1), float("-inf"))
    p = torch.softmax(scores, dim=-1).masked_fill(empty, 0.0)
    out = torch.einsum("bhqk,bkhd->bqhd", p, v)
    return out, lse


def max_err(a, b):
    return (a.float() - b.float()).abs().max().item()


def rand(*shape, dtype, requires_grad=False):
    t = torch.randn(*shape, device="cuda", dtype=getattr(torch, dtype))
    return t.requires_grad_(requires_grad)


_backward_state = None


def backward_works():
    """None if the library's backward runs, else why not (probed once)."""
    global _backward_state
    if _backward_state is None:
        q = rand(1, 8, 1, 64, dtype="float16", requires_grad=True)
        try:
            fajit.flash_attn_func(q, q.detach(), q.detach()).sum().backward()
            torch.cuda.synchronize()
            _backward_state = ""
        except NotImplementedError as e:
            _backward_state = str(e)
        except fajit.FajitError as e:
            if e.status != _lib.FAJIT_EUNSUPPORTED:
                raise
            _backward_state = "the library's backward says: %s" % e
    return _backward_state or None


@unittest.skipUnless(HAVE_CUDA, "needs torch with CUDA and a GPU")
class GpuTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        try:
            _lib.load()
        except _lib.FajitLibraryError as e:
            if STRICT:
                raise
            raise unittest.SkipTest("libfajit not found: %s" % e)
        from fajit import interface
        interface._POISON_OUTPUTS = True
        torch.manual_seed(0)

    @classmethod
    def tearDownClass(cls):
        from fajit import interface
        interface._POISON_OUTPUTS = False

    # ------------------------------------------------------------ helpers

    def check_close(self, what, got, ref, pt, slack=SLACK):
        self.assertFalse(torch.isnan(got).any().item(), "%s has NaN (unwritten?)" % what)
        err, pt_err = max_err(got, ref), max_err(pt, ref)
        self.assertLessEqual(err, 2 * pt_err + slack,
                             "%s: max error %.3g > 2 * %.3g (math attention in the input "
                             "dtype) + %g" % (what, err, pt_err, slack))
        return err, pt_err

    def check_lse(self, lse, lse_ref):
        self.assertEqual(lse.dtype, torch.float32)
        self.assertTrue(torch.equal(torch.isinf(lse), torch.isinf(lse_ref)),
                        "LSE -inf rows differ from the reference's fully masked rows")
        finite = torch.isfinite(lse_ref)
        if finite.any():
            err = (lse[finite] - lse_ref[finite]).abs().max().item()
            self.assertLessEqual(err, 1e-2, "LSE max error %.3g" % err)

    def check_attention(self, fn, make_inputs, split, shape, d, dtype, causal, grads):
        """fn(inputs) is a fajit function; split(inputs) gives q, k, v views."""
        inputs = make_inputs()
        q, k, v = split(inputs)
        scale = d ** -0.5
        out, lse, s_dmask = fn(*inputs, causal=causal, return_attn_probs=True)
        self.assertIsNone(s_dmask)  # flash_attn gives it only with dropout
        b, sq, sk, hq, hkv = shape
        self.assertEqual(tuple(out.shape), (b, sq, hq, v.shape[-1]))
        self.assertEqual(out.dtype, q.dtype)
        q32, k32, v32 = (t.detach().float().requires_grad_(grads) for t in (q, k, v))
        qlp, klp, vlp = (t.detach().clone().requires_grad_(grads) for t in (q, k, v))
        out_ref, lse_ref = attention_ref(q32, k32, v32, causal, scale, upcast=True)
        out_pt, _ = attention_ref(qlp, klp, vlp, causal, scale, upcast=False)
        err = self.check_close("out", out, out_ref, out_pt)
        self.check_lse(lse, lse_ref)
        if not grads:
            return err
        dout = torch.randn_like(out)
        leaves = [t for t in inputs if t.requires_grad]
        got = torch.autograd.grad(out, leaves, dout)
        ref = torch.autograd.grad(out_ref, (q32, k32, v32), dout.float())
        pt = torch.autograd.grad(out_pt, (qlp, klp, vlp), dout)
        got_qkv = split(got)
        for name, g, r, p in zip(("dq", "dk", "dv"), got_qkv, ref, pt):
            self.assertEqual(g.shape, r.shape, name)
            self.check_close(name, g, r, p)
        return err

    def grads_or_note(self):
        why = backward_works()
        if why:
            print("  (gradients not checked: %s)" % why)
        return why is None

    # ------------------------------------------------------------ flash_attn_func over the grid

    def test_flash_attn_func(self):
        grads = self.grads_or_note()
        for d in HEAD_DIMS:
            for dtype in DTYPES:
                for causal in (False, True):
                    for shape in SHAPES:
                        b, sq, sk, hq, hkv = shape
                        with self.subTest(d=d, dtype=dtype, causal=causal, shape=shape):
                            def make():
                                return (rand(b, sq, hq, d, dtype=dtype, requires_grad=grads),
                                        rand(b, sk, hkv, d, dtype=dtype, requires_grad=grads),
                                        rand(b, sk, hkv, d, dtype=dtype, requires_grad=grads))
                            err, pt = self.check_attention(fajit.flash_attn_func, make,
                                                           lambda t: t, shape, d, dtype,
                                                           causal, grads)
                            print("flash_attn_func d=%d %s causal=%d %s: err %.2e (pt %.2e)"
                                  % (d, dtype, causal, shape, err, pt))

    def test_qkvpacked(self):
        grads = self.grads_or_note()
        for d in (64, 100, 256):
            for causal in (False, True):
                with self.subTest(d=d, causal=causal):
                    def make():
                        return (rand(2, 97, 3, 4, d, dtype="bfloat16", requires_grad=grads),)
                    self.check_attention(fajit.flash_attn_qkvpacked_func, make,
                                         lambda t: tuple(t[0].unbind(2)),
                                         (2, 97, 97, 4, 4), d, "bfloat16", causal, grads)

    def test_kvpacked(self):
        grads = self.grads_or_note()
        for d in (32, 72, 128):
            for causal in (False, True):
                with self.subTest(d=d, causal=causal):
                    def make():
                        return (rand(2, 64, 6, d, dtype="float16", requires_grad=grads),
                                rand(2, 150, 2, 2, d, dtype="float16", requires_grad=grads))
                    self.check_attention(fajit.flash_attn_kvpacked_func, make,
                                         lambda t: (t[0],) + tuple(t[1].unbind(2)),
                                         (2, 64, 150, 6, 2), d, "float16", causal, grads)

    # ------------------------------------------------------------ semantics

    def test_strided_inputs_and_dv(self):
        # q, k, v as transposed views of (b, h, s, d) tensors, and dv != dqk.
        grads = self.grads_or_note()

        def make():
            q = rand(2, 4, 80, 64, dtype="float16").transpose(1, 2).requires_grad_(grads)
            k = rand(2, 2, 90, 64, dtype="float16").transpose(1, 2).requires_grad_(grads)
            v = rand(2, 2, 90, 40, dtype="float16").transpose(1, 2).requires_grad_(grads)
            return q, k, v
        self.check_attention(fajit.flash_attn_func, make, lambda t: t, (2, 80, 90, 4, 2),
                             64, "float16", True, grads)

    def test_scale_window_equivalents_and_defaults(self):
        q, k, v = (rand(1, 70, 2, 100, dtype="bfloat16") for _ in range(3))
        out_causal = fajit.flash_attn_func(q, k, v, causal=True)
        out_window = fajit.flash_attn_func(q, k, v, window_size=(-1, 0))
        self.assertTrue(torch.equal(out_causal, out_window), "window (-1, 0) is the causal mask")
        wide = fajit.flash_attn_func(q, k, v, window_size=(70, 70))
        self.assertTrue(torch.equal(wide, fajit.flash_attn_func(q, k, v)))
        out = fajit.flash_attn_func(q, k, v, softmax_scale=0.3)
        ref, _ = attention_ref(q, k, v, False, 0.3, upcast=True)
        pt, _ = attention_ref(q, k, v, False, 0.3, upcast=False)
        self.check_close("out (scale 0.3)", out, ref, pt)
        self.assertIsInstance(fajit.flash_attn_func(q, k, v), torch.Tensor)

    def test_current_device_and_stream(self):
        q, k, v = (rand(2, 256, 4, 64, dtype="float16") for _ in range(3))
        ref = fajit.flash_attn_func(q, k, v)
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            out = fajit.flash_attn_func(q, k, v)
        torch.cuda.current_stream().wait_stream(s)
        self.assertTrue(torch.equal(out, ref))

    def test_empty(self):
        q = rand(0, 16, 2, 64, dtype="float16")
        self.assertEqual(tuple(fajit.flash_attn_func(q, q, q).shape), (0, 16, 2, 64))
        q = rand(1, 4, 2, 64, dtype="float16")
        k = rand(1, 0, 2, 64, dtype="float16")
        out, lse, _ = fajit.flash_attn_func(q, k, k, return_attn_probs=True)
        self.assertTrue(torch.equal(out, torch.zeros_like(out)))
        self.assertTrue(torch.isneginf(lse).all().item())

    def test_deterministic_backward(self):
        if backward_works():
            self.skipTest(backward_works())
        q, k, v = (rand(2, 200, 4, 72, dtype="bfloat16", requires_grad=True) for _ in range(3))
        dout = torch.randn(2, 200, 4, 72, device="cuda", dtype=torch.bfloat16)
        runs = []
        for _ in range(2):
            out = fajit.flash_attn_func(q, k, v, causal=True, deterministic=True)
            runs.append(torch.autograd.grad(out, (q, k, v), dout))
        for a, b in zip(*runs):
            self.assertTrue(torch.equal(a, b), "deterministic=True gave different gradients")

    def test_import_fajit_as_flash_attn(self):
        code = (
            "import torch\n"
            "import fajit as flash_attn\n"
            "from fajit import flash_attn_func\n"
            "q = torch.randn(1, 64, 2, 100, device='cuda', dtype=torch.float16)\n"
            "out = flash_attn.flash_attn_func(q, q, q, causal=True)\n"
            "out2 = flash_attn_func(q, q, q, 0.0, None, True)\n"
            "assert torch.equal(out, out2)\n"
            "print('ok', tuple(out.shape))\n")
        env = dict(os.environ, PYTHONPATH=PY_DIR + os.pathsep + os.environ.get("PYTHONPATH", ""))
        r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                           text=True, timeout=300)
        self.assertEqual(r.returncode, 0, r.stderr)
        self.assertIn("ok (1, 64, 2, 100)", r.stdout)

    # ------------------------------------------------------------ DLPack

    def test_dlpack_with_torch_tensors(self):
        from fajit import dlpack
        for dtype in DTYPES:
            for causal in (False, True):
                with self.subTest(dtype=dtype, causal=causal):
                    q = rand(2, 100, 4, 72, dtype=dtype)
                    k = rand(2, 130, 2, 72, dtype=dtype)
                    v = rand(2, 130, 2, 72, dtype=dtype)
                    out = dlpack.attention(q, k, v, causal=causal)
                    self.assertIsInstance(out, torch.Tensor)
                    ref, _ = attention_ref(q, k, v, causal, 72 ** -0.5, upcast=True)
                    pt, _ = attention_ref(q, k, v, causal, 72 ** -0.5, upcast=False)
                    self.check_close("dlpack out", out, ref, pt)
                    given = torch.full_like(out, math.nan)
                    s = torch.cuda.current_stream()
                    self.assertIs(dlpack.attention(q, k, v, causal=causal, out=given, stream=s),
                                  given)
                    self.assertTrue(torch.equal(given, out))

    def test_dlpack_with_cupy(self):
        cupy = try_import("cupy")
        if cupy is None:
            self.skipTest("cupy not installed")
        from fajit import dlpack
        q = cupy.random.standard_normal((1, 64, 2, 100)).astype(cupy.float16)
        out = cupy.empty_like(q)
        dlpack.attention(q, q, q, causal=True, out=out,
                         stream=cupy.cuda.get_current_stream())
        qt = torch.from_dlpack(q)
        ref, _ = attention_ref(qt, qt, qt, True, 0.1, upcast=True)
        pt, _ = attention_ref(qt, qt, qt, True, 0.1, upcast=False)
        self.check_close("cupy out", torch.from_dlpack(out), ref, pt)


if __name__ == "__main__":
    unittest.main(verbosity=2)
