"""The Python binding on a GPU, against PyTorch's math attention.

FlashAttention's rule: the reference is computed in fp32 from the same inputs;
fajit's max error against it must be at most twice (outputs) or three times
(gradients, as FlashAttention's own tests allow: the backward reads the
rounded output through D = rowsum(dO * O), which the math attention does not)
the max error of the same math attention computed in the input dtype, plus a
small absolute slack.
Outputs, LSE and (when the library has a working backward) gradients; the
features (window, softcap, ALiBi, dropout, varlen) against the same math with
them, outputs and gradients (dropout against the pattern a call with the same
seed reads out, which the backward regenerates, and S_dmask of
return_attn_probs: its signs that pattern, its magnitudes the softmax by the
same rule); the DLPack entry's features and backward; every output buffer is
NaN-poisoned before the launch.

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
GRAD_FACTOR = 3  # FlashAttention's tests: 2x for outputs, 3x for gradients


def visible(sq, sk, causal, window, device):
    """(sq, sk) bool: query i sees key j (flash_attn: bottom-right diagonal
    i + sk - sq, window (left, right) around it, -1 unbounded, causal = right 0)."""
    left, right = window
    if causal:
        right = 0
    i = torch.arange(sq, device=device).view(sq, 1)
    j = torch.arange(sk, device=device).view(1, sk)
    diag = i + (sk - sq)
    vis = torch.ones(sq, sk, dtype=torch.bool, device=device)
    if left >= 0:
        vis &= j >= diag - left
    if right >= 0:
        vis &= j <= diag + right
    return vis


def alibi_bias(slopes, b, hq, sq, sk, device):
    """fajit.h's ALiBi bias, (b, hq, sq, sk) fp32: -slope * |i + sk - sq - j|."""
    i = torch.arange(sq, device=device).view(sq, 1)
    j = torch.arange(sk, device=device).view(1, sk)
    dist = (i + (sk - sq) - j).abs().float()
    return -slopes.float().expand(b, hq).reshape(b, hq, 1, 1) * dist


def softmax_ref(q, k, causal, scale, upcast, window=(-1, -1), softcap=0.0, alibi=None):
    """attention_ref's probabilities (b, hq, sq, sk) before dropout, and LSE;
    fully masked rows give 0 and -inf."""
    if upcast:
        q, k = q.float(), k.float()
    b, hq, hkv = q.shape[0], q.shape[2], k.shape[2]
    k = k.repeat_interleave(hq // hkv, dim=2)
    if upcast:
        scores = torch.einsum("bqhd,bkhd->bhqk", q, k) * scale
    else:  # as flash_attn's test: scale q first, in the input dtype
        scores = torch.einsum("bqhd,bkhd->bhqk", q * scale, k)
    sq, sk = q.shape[1], k.shape[1]
    if softcap > 0.0:
        scores = torch.tanh(scores / softcap) * softcap
    if alibi is not None:  # as flash_attn's test: the fp32 bias promotes the scores
        scores = scores + alibi_bias(alibi, b, hq, sq, sk, q.device)
    masked = ~visible(sq, sk, causal, window, q.device)
    empty = masked.all(dim=-1, keepdim=True)
    # Rows with no key keep finite scores (zeroed below), so no NaN anywhere.
    scores = scores.masked_fill(masked & ~empty, float("-inf"))
    lse = torch.logsumexp(scores.float(), dim=-1).masked_fill(empty.squeeze(-1), float("-inf"))
    return torch.softmax(scores, dim=-1).masked_fill(empty, 0.0), lse


def round128(n):
    return (n + 127) // 128 * 128


def attention_ref(q, k, v, causal, scale, upcast, window=(-1, -1), softcap=0.0, alibi=None,
                  keep=None, dropout_p=0.0):
    """Math attention with flash_attn's semantics; fp32 when upcast, else in the input dtype.

    softcap: scores -> softcap * tanh(scores / softcap) after the scale; alibi:
    slopes (hq,) or (b, hq) fp32, bias added after the softcap (in fp32, as
    flash_attn's test, so the input-dtype run keeps fp32 scores from there); keep: a
    (b, hq, sq, sk) bool dropout pattern, kept probabilities scaled by
    1 / (1 - dropout_p), LSE undropped. Returns (out, lse); fully masked rows
    give 0 and -inf, with clean (zero, not NaN) gradients through them."""
    if upcast:
        q, k, v = q.float(), k.float(), v.float()
    p, lse = softmax_ref(q, k, causal, scale, upcast, window, softcap, alibi)
    v = v.repeat_interleave(q.shape[2] // k.shape[2], dim=2)
    if keep is not None:
        p = p.masked_fill(~keep, 0.0) * (1.0 / (1.0 - dropout_p))
    out = torch.einsum("bhqk,bkhd->bqhd", p.to(v.dtype), v)
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

    def check_close(self, what, got, ref, pt, slack=SLACK, factor=2):
        self.assertFalse(torch.isnan(got).any().item(), "%s has NaN (unwritten?)" % what)
        err, pt_err = max_err(got, ref), max_err(pt, ref)
        self.assertLessEqual(err, factor * pt_err + slack,
                             "%s: max error %.3g > %d * %.3g (math attention in the input "
                             "dtype) + %g" % (what, err, factor, pt_err, slack))
        return err, pt_err

    def check_lse(self, lse, lse_ref):
        self.assertEqual(lse.dtype, torch.float32)
        self.assertTrue(torch.equal(torch.isinf(lse), torch.isinf(lse_ref)),
                        "LSE -inf rows differ from the reference's fully masked rows")
        finite = torch.isfinite(lse_ref)
        if finite.any():
            err = (lse[finite] - lse_ref[finite]).abs().max().item()
            self.assertLessEqual(err, 1e-2, "LSE max error %.3g" % err)

    def check_no_s_dmask(self, s_dmask, q):
        """Without dropout flash_attn (>= 2.6.3) returns an empty (0,) S_dmask."""
        self.assertIsInstance(s_dmask, torch.Tensor)
        self.assertEqual((tuple(s_dmask.shape), s_dmask.dtype), ((0,), q.dtype))

    def check_s_dmask(self, what, s_dmask, q, k, keep, causal, scale, **ref):
        """S_dmask of a dense call: (b, hq, round128(sq), round128(sk)) in q's
        dtype; negative (sign bit) exactly where keep is False on a visible
        key; |S_dmask| the softmax before dropout by FlashAttention's rule
        (against the fp32 softmax, twice the input-dtype softmax's error plus
        the slack); invisible keys and the padding +0."""
        b, sq, hq = q.shape[:3]
        sk = k.shape[1]
        self.assertEqual(tuple(s_dmask.shape), (b, hq, round128(sq), round128(sk)), what)
        self.assertEqual(s_dmask.dtype, q.dtype, what)
        live = s_dmask[:, :, :sq, :sk]
        vis = visible(sq, sk, causal, ref.get("window", (-1, -1)), q.device)
        self.assertTrue(torch.equal(torch.signbit(live), ~keep & vis),
                        "%s: S_dmask's signs are not the dropout pattern" % what)
        pad = s_dmask.clone()
        pad[:, :, :sq, :sk] = 0
        self.assertTrue(torch.equal(pad, torch.zeros_like(pad)) and not torch.signbit(pad).any(),
                        "%s: S_dmask's padding is not +0" % what)
        self.assertTrue(torch.equal(live.masked_fill(vis, 0), torch.zeros_like(live)) and
                        not torch.signbit(live.masked_fill(vis, 0)).any(),
                        "%s: keys a row does not see are not +0" % what)
        p_ref, _ = softmax_ref(q, k, causal, scale, True, **ref)
        p_pt, _ = softmax_ref(q, k, causal, scale, False, **ref)
        err, pt = self.check_close(what + ": |S_dmask|", live.abs(), p_ref, p_pt)
        return err, pt

    def check_attention(self, fn, make_inputs, split, shape, d, dtype, causal, grads):
        """fn(inputs) is a fajit function; split(inputs) gives q, k, v views."""
        inputs = make_inputs()
        q, k, v = split(inputs)
        scale = d ** -0.5
        out, lse, s_dmask = fn(*inputs, causal=causal, return_attn_probs=True)
        self.check_no_s_dmask(s_dmask, q)
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
            self.check_close(name, g, r, p, factor=GRAD_FACTOR)
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

    # ------------------------------------------------------------ features (forward only)

    def compare(self, what, out, lse, q, k, v, scale, causal, **ref):
        """out (and lse, if not None) against the fp32 reference, by FlashAttention's rule."""
        ref_out, ref_lse = attention_ref(q, k, v, causal, scale, True, **ref)
        pt_out, _ = attention_ref(q, k, v, causal, scale, False, **ref)
        self.assertEqual(out.shape, ref_out.shape, what)
        err, pt = self.check_close(what, out, ref_out, pt_out)
        if lse is not None:
            self.check_lse(lse, ref_lse)
        print("%s: err %.2e (pt %.2e)" % (what, err, pt))

    def test_window(self):
        windows = ((16, 16), (32, 0), (0, 20), (-1, 8), (50, -1), (7, 3))
        for shape in ((1, 113, 203, 4, 2), (2, 128, 128, 4, 4), (2, 256, 97, 6, 1)):
            b, sq, sk, hq, hkv = shape
            for window in windows:
                for causal in (False, True):
                    dtype = "float16" if causal else "bfloat16"
                    with self.subTest(shape=shape, window=window, causal=causal):
                        q = rand(b, sq, hq, 64, dtype=dtype)
                        k, v = (rand(b, sk, hkv, 64, dtype=dtype) for _ in range(2))
                        out, lse, _ = fajit.flash_attn_func(q, k, v, causal=causal,
                                                            window_size=window,
                                                            return_attn_probs=True)
                        self.compare("window %s causal=%d %s %s" % (window, causal, shape, dtype),
                                     out, lse, q, k, v, 0.125, causal, window=window)

    def test_softcap(self):
        for d in (64, 128, 72):
            for causal in (False, True):
                for cap in (5.0, 30.0):
                    with self.subTest(d=d, causal=causal, softcap=cap):
                        q = rand(1, 113, 4, d, dtype="float16") * 4  # scores reach the cap
                        k, v = (rand(1, 203, 2, d, dtype="float16") for _ in range(2))
                        out, lse, _ = fajit.flash_attn_func(q, k, v, causal=causal, softcap=cap,
                                                            return_attn_probs=True)
                        self.compare("softcap %g d=%d causal=%d" % (cap, d, causal), out, lse,
                                     q, k, v, d ** -0.5, causal, softcap=cap)

    def test_alibi(self):
        b, sq, sk, hq, hkv = 2, 97, 150, 6, 2
        per_head = torch.rand(hq, device="cuda") * 0.5 + 0.05
        per_batch = torch.rand(b, hq, device="cuda") * 0.5 + 0.05
        slopes_cases = (("(nheads,)", per_head), ("(batch, nheads)", per_batch),
                        ("(batch, nheads) expanded", per_head.expand(b, hq)),
                        ("(batch, nheads) transposed", per_batch.t().contiguous().t()))
        for name, slopes in slopes_cases:
            for causal in (False, True):
                for d in (64, 100):
                    with self.subTest(slopes=name, causal=causal, d=d):
                        q = rand(b, sq, hq, d, dtype="bfloat16")
                        k, v = (rand(b, sk, hkv, d, dtype="bfloat16") for _ in range(2))
                        out, lse, _ = fajit.flash_attn_func(q, k, v, causal=causal,
                                                            alibi_slopes=slopes,
                                                            return_attn_probs=True)
                        self.compare("alibi %s causal=%d d=%d" % (name, causal, d), out, lse,
                                     q, k, v, d ** -0.5, causal, alibi=slopes)

    def test_features_together_and_packed(self):
        b, s, h = 2, 130, 4
        slopes = torch.rand(b, h, device="cuda") * 0.3 + 0.05
        feats = dict(window=(40, 20), softcap=15.0, alibi=slopes)
        call = dict(window_size=(40, 20), softcap=15.0, alibi_slopes=slopes,
                    return_attn_probs=True)
        for d in (64, 100):
            for causal in (False, True):
                with self.subTest(fn="flash_attn_func", d=d, causal=causal):
                    q, k, v = (rand(b, s, h, d, dtype="float16") * 2 for _ in range(3))
                    out, lse, _ = fajit.flash_attn_func(q, k, v, causal=causal, **call)
                    self.compare("all features d=%d causal=%d" % (d, causal), out, lse, q, k, v,
                                 d ** -0.5, causal, **feats)
                with self.subTest(fn="qkvpacked", d=d, causal=causal):
                    qkv = rand(b, s, 3, h, d, dtype="bfloat16")
                    out, lse, _ = fajit.flash_attn_qkvpacked_func(qkv, causal=causal, **call)
                    q, k, v = qkv.unbind(2)
                    self.compare("qkvpacked features d=%d causal=%d" % (d, causal), out, lse,
                                 q, k, v, d ** -0.5, causal, **feats)
                with self.subTest(fn="kvpacked", d=d, causal=causal):
                    q = rand(b, 90, h, d, dtype="float16")
                    kv = rand(b, s, 2, 2, d, dtype="float16")
                    out, lse, _ = fajit.flash_attn_kvpacked_func(q, kv, causal=causal, **call)
                    k, v = kv.unbind(2)
                    self.compare("kvpacked features d=%d causal=%d" % (d, causal), out, lse,
                                 q, k, v, d ** -0.5, causal, **feats)

    # ------------------------------------------------------------ features: gradients

    def grads_vs_ref(self, what, out, leaves, split, ref_fn):
        """fajit's out (computed from leaves) and the gradients of out . dout
        against the math reference, by FlashAttention's rule. split(tensors
        like leaves) gives (q, k, v) views; ref_fn(q, k, v, upcast) is the
        reference's output."""
        q, k, v = split(leaves)
        q32, k32, v32 = (t.detach().float().requires_grad_() for t in (q, k, v))
        qlp, klp, vlp = (t.detach().clone().requires_grad_() for t in (q, k, v))
        out_ref, out_pt = ref_fn(q32, k32, v32, True), ref_fn(qlp, klp, vlp, False)
        err, pt = self.check_close(what + ": out", out, out_ref, out_pt)
        dout = torch.randn_like(out)

        def grad(o, xs, g):
            gs = torch.autograd.grad(o, xs, g, allow_unused=True)
            return [torch.zeros_like(x) if d is None else d for x, d in zip(xs, gs)]

        got = split(grad(out, leaves, dout))
        ref = grad(out_ref, (q32, k32, v32), dout.float())
        low = grad(out_pt, (qlp, klp, vlp), dout)
        notes = []
        for name, g, r, lp in zip(("dq", "dk", "dv"), got, ref, low):
            self.assertEqual(tuple(g.shape), tuple(r.shape), "%s: %s" % (what, name))
            e, pe = self.check_close("%s: %s" % (what, name), g, r, lp, factor=GRAD_FACTOR)
            notes.append("%s %.1e (pt %.1e)" % (name, e, pe))
        print("%s: out %.1e (pt %.1e), %s" % (what, err, pt, ", ".join(notes)))

    def dense_grads(self, what, shape, d, dtype, causal, call, ref, fn_name="func", seed=None):
        """One dense call with grad through flash_attn_func (or the packed
        functions), checked against attention_ref with the same features."""
        b, sq, sk, hq, hkv = shape
        scale = d ** -0.5
        if fn_name == "qkvpacked":
            leaves = (rand(b, sq, 3, hq, d, dtype=dtype, requires_grad=True),)

            def split(t):
                return tuple(t[0].unbind(2))

            def run():
                return fajit.flash_attn_qkvpacked_func(leaves[0], causal=causal, **call)
        elif fn_name == "kvpacked":
            leaves = (rand(b, sq, hq, d, dtype=dtype, requires_grad=True),
                      rand(b, sk, 2, hkv, d, dtype=dtype, requires_grad=True))

            def split(t):
                return (t[0],) + tuple(t[1].unbind(2))

            def run():
                return fajit.flash_attn_kvpacked_func(*leaves, causal=causal, **call)
        else:
            leaves = (rand(b, sq, hq, d, dtype=dtype, requires_grad=True),
                      rand(b, sk, hkv, d, dtype=dtype, requires_grad=True),
                      rand(b, sk, hkv, d, dtype=dtype, requires_grad=True))

            def split(t):
                return tuple(t)

            def run():
                return fajit.flash_attn_func(*leaves, causal=causal, **call)
        out = run() if seed is None else self.with_seed(seed, run)
        self.grads_vs_ref(what, out, leaves, split,
                          lambda q, k, v, up: attention_ref(q, k, v, causal, scale, up, **ref)[0])

    def require_backward(self):
        why = backward_works()
        if why:
            self.skipTest(why)

    def test_window_grads(self):
        self.require_backward()
        for shape in ((1, 113, 150, 4, 2), (2, 128, 97, 4, 1)):
            for window in ((16, 16), (32, 0), (0, 20), (-1, 8), (50, -1)):
                for causal in (False, True):
                    dtype = "float16" if causal else "bfloat16"
                    with self.subTest(shape=shape, window=window, causal=causal):
                        self.dense_grads("grads window %s causal=%d %s %s" % (window, causal, shape,
                                                                               dtype),
                                         shape, 64, dtype, causal, dict(window_size=window),
                                         dict(window=window))

    def test_softcap_grads(self):
        self.require_backward()
        for d, dtype in ((64, "float16"), (100, "bfloat16")):
            for causal in (False, True):
                for cap in (5.0, 30.0):
                    with self.subTest(d=d, causal=causal, softcap=cap):
                        self.dense_grads("grads softcap %g d=%d causal=%d" % (cap, d, causal),
                                         (2, 97, 120, 4, 2), d, dtype, causal,
                                         dict(softcap=cap), dict(softcap=cap))

    def test_alibi_grads(self):
        self.require_backward()
        b, hq = 2, 6
        per_head = torch.rand(hq, device="cuda") * 0.5 + 0.05
        per_batch = torch.rand(b, hq, device="cuda") * 0.5 + 0.05
        for name, slopes in (("(nheads,)", per_head), ("(batch, nheads)", per_batch)):
            for causal in (False, True):
                with self.subTest(slopes=name, causal=causal):
                    self.dense_grads("grads alibi %s causal=%d" % (name, causal),
                                     (b, 97, 150, hq, 2), 64, "bfloat16", causal,
                                     dict(alibi_slopes=slopes), dict(alibi=slopes))

    def test_dropout_grads(self):
        self.require_backward()
        p, seed = 0.17, 2468
        for fn_name, shape in (("func", (2, 100, 90, 4, 2)), ("qkvpacked", (2, 96, 96, 4, 4)),
                               ("kvpacked", (1, 70, 110, 6, 2))):
            keep, _ = self.dropout_pattern(seed, p, *shape)
            for causal in (False, True):
                for dtype in DTYPES:
                    with self.subTest(fn=fn_name, causal=causal, dtype=dtype):
                        self.dense_grads("grads dropout %s %s causal=%d %s"
                                         % (fn_name, shape, causal, dtype),
                                         shape, 64, dtype, causal, dict(dropout_p=p),
                                         dict(keep=keep, dropout_p=p), fn_name, seed=seed)

    def test_features_together_grads(self):
        self.require_backward()
        b, s, h, p, seed = 2, 110, 4, 0.2, 1357
        slopes = torch.rand(b, h, device="cuda") * 0.3 + 0.05
        for fn_name, shape in (("func", (b, s, 90, h, 2)), ("qkvpacked", (b, s, s, h, h)),
                               ("kvpacked", (b, 80, s, h, 1))):
            keep, _ = self.dropout_pattern(seed, p, *shape)
            call = dict(window_size=(40, 20), softcap=15.0, alibi_slopes=slopes, dropout_p=p)
            ref = dict(window=(40, 20), softcap=15.0, alibi=slopes, keep=keep, dropout_p=p)
            for d, causal in ((64, False), (100, True)):
                with self.subTest(fn=fn_name, d=d, causal=causal):
                    self.dense_grads("grads all features %s d=%d causal=%d" % (fn_name, d, causal),
                                     shape, d, "float16", causal, call, ref, fn_name, seed=seed)

    def test_deterministic_feature_grads(self):
        self.require_backward()
        q, k, v = (rand(2, 150, 4, 64, dtype="bfloat16", requires_grad=True) for _ in range(3))
        dout = torch.randn(2, 150, 4, 64, device="cuda", dtype=torch.bfloat16)
        runs = []
        for _ in range(2):
            out = self.with_seed(3, lambda: fajit.flash_attn_func(
                q, k, v, dropout_p=0.3, softcap=10.0, window_size=(30, 5), deterministic=True))
            runs.append(torch.autograd.grad(out, (q, k, v), dout))
        for name, a, b in zip(("dq", "dk", "dv"), *runs):
            self.assertTrue(torch.equal(a, b), "deterministic=True: %s differs between runs" % name)
        for name, a in zip(("dq", "dk", "dv"), runs[0]):
            self.assertTrue(torch.isfinite(a).all().item(), name)

    # ------------------------------------------------------------ dropout

    def with_seed(self, seed, call):
        """call() with dropout seeds drawn from a generator seeded with seed."""
        from fajit import interface
        interface.dropout_generator = torch.Generator().manual_seed(seed)
        try:
            return call()
        finally:
            interface.dropout_generator = None

    def dropout_pattern(self, seed, p, b, sq, sk, hq, hkv):
        """The (b, hq, sq, sk) keep pattern of a call with these shapes and seed.

        Read out of the output: q = 0 makes every probability 1 / sk, and v[j]
        = e_j (one-hot over dv = sk) puts key j's dropped-or-scaled probability
        in output column j. The pattern depends on (seed, offset, batch, head,
        row, key) only, not on the data or head dims."""
        q = torch.zeros(b, sq, hq, 64, device="cuda", dtype=torch.float16)
        k = rand(b, sk, hkv, 64, dtype="float16")
        v = torch.eye(sk, device="cuda", dtype=torch.float16).view(1, sk, 1, sk)
        v = v.expand(b, sk, hkv, sk).contiguous()
        out = self.with_seed(seed, lambda: fajit.flash_attn_func(q, k, v, dropout_p=p))
        out = out.float().permute(0, 2, 1, 3)  # (b, hq, sq, sk)
        keep = out > 0
        self.assertTrue(torch.equal(out == 0, ~keep), "negative output in the pattern run")
        kept_value = 1.0 / ((1.0 - p) * sk)
        err = (out[keep] - kept_value).abs().max().item() if keep.any() else 0.0
        self.assertLessEqual(err, 1e-2 * kept_value, "kept probabilities are not "
                             "1 / ((1 - p) sk) = %g: max error %g" % (kept_value, err))
        frac = keep.float().mean().item()
        self.assertLess(abs(frac - (1.0 - p)), 0.02, "kept fraction %.4f for p=%g" % (frac, p))
        return keep, frac

    def test_dropout_against_its_pattern(self):
        p, seed = 0.17, 1234
        for shape in ((2, 128, 96, 4, 2), (1, 75, 96, 2, 2)):
            b, sq, sk, hq, hkv = shape
            keep, frac = self.dropout_pattern(seed, p, *shape)
            print("dropout p=%g %s: kept %.4f" % (p, shape, frac))
            for causal in (False, True):
                for dtype in DTYPES:
                    with self.subTest(shape=shape, causal=causal, dtype=dtype):
                        q = rand(b, sq, hq, 64, dtype=dtype)
                        k, v = (rand(b, sk, hkv, 64, dtype=dtype) for _ in range(2))
                        out, lse, s_dmask = self.with_seed(
                            seed, lambda: fajit.flash_attn_func(q, k, v, dropout_p=p,
                                                                causal=causal,
                                                                return_attn_probs=True))
                        what = "dropout %s causal=%d %s" % (shape, causal, dtype)
                        self.compare(what, out, lse, q, k, v, 0.125, causal, keep=keep,
                                     dropout_p=p)
                        err, pt = self.check_s_dmask(what, s_dmask, q, k, keep, causal, 0.125)
                        print("%s: S_dmask signs == the pattern, |S_dmask| err %.2e (pt %.2e)"
                              % (what, err, pt))

    def test_dropout_seeds(self):
        q, k, v = (rand(2, 100, 4, 64, dtype="bfloat16") for _ in range(3))
        plain = fajit.flash_attn_func(q, k, v, causal=True)
        self.assertTrue(torch.equal(fajit.flash_attn_func(q, k, v, dropout_p=0.0, causal=True),
                                    plain), "dropout_p=0.0 differs from no dropout")
        one = self.with_seed(5, lambda: fajit.flash_attn_func(q, k, v, dropout_p=0.3))
        again = self.with_seed(5, lambda: fajit.flash_attn_func(q, k, v, dropout_p=0.3))
        self.assertTrue(torch.equal(one, again), "the same seed gave different outputs")
        other = self.with_seed(6, lambda: fajit.flash_attn_func(q, k, v, dropout_p=0.3))
        self.assertFalse(torch.equal(one, other), "different seeds gave the same output")
        # The default: torch's CPU generator, so torch.manual_seed replays.
        torch.manual_seed(77)
        a = fajit.flash_attn_func(q, k, v, dropout_p=0.3)
        b = fajit.flash_attn_func(q, k, v, dropout_p=0.3)
        torch.manual_seed(77)
        a2 = fajit.flash_attn_func(q, k, v, dropout_p=0.3)
        self.assertTrue(torch.equal(a, a2), "torch.manual_seed does not replay dropout")
        self.assertFalse(torch.equal(a, b), "successive calls drew the same dropout pattern")
        for t in (one, other, a, b):
            self.assertTrue(torch.isfinite(t).all().item())
            self.assertEqual(tuple(t.shape), (2, 100, 4, 64))
        # Packed and varlen take it too (shape and finiteness only here).
        qkv = rand(2, 100, 3, 4, 64, dtype="float16")
        out = fajit.flash_attn_qkvpacked_func(qkv, dropout_p=0.2)
        self.assertTrue(torch.isfinite(out).all().item())
        cu = torch.tensor([0, 37, 100], device="cuda", dtype=torch.int32)
        out = self.with_seed(9, lambda: fajit.flash_attn_varlen_qkvpacked_func(
            qkv[0], cu, 63, dropout_p=0.2))
        again = self.with_seed(9, lambda: fajit.flash_attn_varlen_qkvpacked_func(
            qkv[0], cu, 63, dropout_p=0.2))
        self.assertEqual(tuple(out.shape), (100, 4, 64))
        self.assertTrue(torch.isfinite(out).all().item())
        self.assertTrue(torch.equal(out, again))

    # ------------------------------------------------------------ varlen

    LENS_Q = (0, 1, 17, 113, 64, 3)
    LENS_K = (5, 0, 1, 150, 64, 200)
    # For gradients: the same raggedness, but the one-key sequence has 2 rows,
    # not 17. Its exact dq, dk are 0 (a softmax over one key has no gradient),
    # which the math attention gets to the bit while a FlashAttention backward
    # gets the rounding of O through D, summed over every row: a bound of
    # rows x that rounding, which 17 rows would bring near the slack.
    GRAD_LENS_Q = (0, 1, 2, 113, 64, 17)
    GRAD_LENS_K = (5, 0, 1, 150, 64, 200)

    def varlen_ref(self, q, k, v, lens_q, lens_k, causal, scale, upcast, alibi=None, keep=None,
                   **ref):
        """Each sequence run densely through attention_ref: (out, lse (hq, total_q)).

        keep: a dense (batch, hq, max_q, max_k) dropout pattern; sequence b
        takes keep[b, :, :len_q, :len_k] (varlen's stream uses the row and
        column within the sequence)."""
        outs, lses = [], []
        cq = ck = 0
        for b, (lq, lk) in enumerate(zip(lens_q, lens_k)):
            qs = q[cq:cq + lq].unsqueeze(0)
            ks, vs = k[ck:ck + lk].unsqueeze(0), v[ck:ck + lk].unsqueeze(0)
            slopes = None if alibi is None else (alibi[b] if alibi.dim() == 2 else alibi)
            if lk == 0:  # no key: output 0, LSE -inf
                o = torch.zeros(1, lq, q.shape[1], v.shape[2], device=q.device,
                                dtype=torch.float32 if upcast else q.dtype)
                l_ = torch.full((1, q.shape[1], lq), float("-inf"), device=q.device)
            else:
                kb = None if keep is None else keep[b:b + 1, :, :lq, :lk]
                o, l_ = attention_ref(qs, ks, vs, causal, scale, upcast, alibi=slopes, keep=kb,
                                      **ref)
            outs.append(o[0])
            lses.append(l_[0])
            cq, ck = cq + lq, ck + lk
        return torch.cat(outs, 0), torch.cat(lses, 1)

    def check_varlen(self, what, out, lse, q, k, v, lens_q, lens_k, causal, scale, **ref):
        ref_out, ref_lse = self.varlen_ref(q, k, v, lens_q, lens_k, causal, scale, True, **ref)
        pt_out, _ = self.varlen_ref(q, k, v, lens_q, lens_k, causal, scale, False, **ref)
        self.assertEqual(out.shape, ref_out.shape, what)
        self.assertEqual(tuple(lse.shape), (q.shape[1], q.shape[0]), what)
        err, pt = self.check_close(what, out, ref_out, pt_out)
        self.check_lse(lse, ref_lse)
        print("%s: err %.2e (pt %.2e)" % (what, err, pt))

    @staticmethod
    def cu(lens):
        c = [0]
        for n in lens:
            c.append(c[-1] + n)
        return torch.tensor(c, device="cuda", dtype=torch.int32)

    def test_varlen(self):
        lq, lk = self.LENS_Q, self.LENS_K
        cu_q, cu_k = self.cu(lq), self.cu(lk)
        hq, hkv = 6, 2
        slopes = torch.rand(len(lq), hq, device="cuda") * 0.3 + 0.05
        cases = (("plain", {}, {}),
                 ("window+softcap+alibi",
                  dict(window_size=(30, 10), softcap=20.0, alibi_slopes=slopes),
                  dict(window=(30, 10), softcap=20.0, alibi=slopes)))
        for d, dtype in ((64, "float16"), (59, "bfloat16"), (128, "bfloat16")):
            for causal in (False, True):
                for name, call, ref in cases:
                    with self.subTest(d=d, dtype=dtype, causal=causal, case=name):
                        q = rand(sum(lq), hq, d, dtype=dtype)
                        k, v = (rand(sum(lk), hkv, d, dtype=dtype) for _ in range(2))
                        out, lse, _ = fajit.flash_attn_varlen_func(
                            q, k, v, cu_q, cu_k, max(lq), max(lk), causal=causal,
                            return_attn_probs=True, **call)
                        self.check_varlen("varlen %s d=%d %s causal=%d" % (name, d, dtype, causal),
                                          out, lse, q, k, v, lq, lk, causal, d ** -0.5, **ref)

    def test_varlen_dropout_against_its_pattern(self):
        lq, lk = self.LENS_Q, self.LENS_K
        hq, hkv, p, seed = 4, 2, 0.17, 4321
        # The dense pattern of batch len(lq), (max_q, max_k): varlen's sequence b
        # draws the same (b, h, i, j) elements.
        keep, _ = self.dropout_pattern(seed, p, len(lq), max(lq), max(lk), hq, hkv)
        for causal in (False, True):
            with self.subTest(causal=causal):
                q = rand(sum(lq), hq, 64, dtype="float16")
                k, v = (rand(sum(lk), hkv, 64, dtype="float16") for _ in range(2))
                out, lse, s_dmask = self.with_seed(seed, lambda: fajit.flash_attn_varlen_func(
                    q, k, v, self.cu(lq), self.cu(lk), max(lq), max(lk), dropout_p=p,
                    causal=causal, return_attn_probs=True))
                self.check_varlen("varlen dropout causal=%d" % causal, out, lse, q, k, v, lq, lk,
                                  causal, 0.125, keep=keep, dropout_p=p)
                self.check_varlen_s_dmask("varlen S_dmask causal=%d" % causal, s_dmask, q, k, lq,
                                          lk, hq, keep, causal)

    def check_varlen_s_dmask(self, what, s_dmask, q, k, lq, lk, hq, keep, causal):
        """Varlen S_dmask: (batch, hq, round128(max_q), round128(max_k)); sequence
        b at [b, :, :len_q, :len_k], checked as a dense call of its own (keep:
        the dense pattern, sequence b's rows and keys from 0), +0 elsewhere."""
        self.assertEqual(tuple(s_dmask.shape), (len(lq), hq, round128(max(lq)), round128(max(lk))))
        rest = s_dmask.clone()
        cq = ck = 0
        for b, (nq, nk) in enumerate(zip(lq, lk)):
            rest[b, :, :nq, :nk] = 0
            if nq and nk:
                self.check_s_dmask("%s seq %d" % (what, b), s_dmask[b:b + 1, :, :round128(nq),
                                                                  :round128(nk)].contiguous(),
                                   q[cq:cq + nq].unsqueeze(0), k[ck:ck + nk].unsqueeze(0),
                                   keep[b:b + 1, :, :nq, :nk], causal, 0.125)
            cq, ck = cq + nq, ck + nk
        self.assertTrue(torch.equal(rest, torch.zeros_like(rest)) and not torch.signbit(rest).any(),
                        "%s: outside the sequences S_dmask is not +0" % what)
        print("%s: every sequence's signs == the pattern" % what)

    def test_s_dmask_packed_and_without_dropout(self):
        p, seed = 0.2, 2222
        b, s, h, d = 2, 96, 4, 64
        keep, _ = self.dropout_pattern(seed, p, b, s, s, h, h)
        qkv = rand(b, s, 3, h, d, dtype="bfloat16")
        q, k, v = qkv.unbind(2)
        out, lse, s_dmask = self.with_seed(seed, lambda: fajit.flash_attn_qkvpacked_func(
            qkv, dropout_p=p, causal=True, return_attn_probs=True))
        self.compare("qkvpacked dropout", out, lse, q, k, v, d ** -0.5, True, keep=keep, dropout_p=p)
        self.check_s_dmask("qkvpacked S_dmask", s_dmask, q, k, keep, True, d ** -0.5)
        kv = qkv[:, :, 1:]
        out, lse, s_dmask = self.with_seed(seed, lambda: fajit.flash_attn_kvpacked_func(
            q, kv, dropout_p=p, window_size=(20, 5), return_attn_probs=True))
        self.check_s_dmask("kvpacked S_dmask window", s_dmask, q, k, keep, False, d ** -0.5,
                           window=(20, 5))
        self.compare("kvpacked dropout window (ref-probs)", out, lse, q, k, v, d ** -0.5, False,
                     window=(20, 5), keep=keep, dropout_p=p)
        # The same call without return_attn_probs (the fast kernel): the same mask.
        fast = self.with_seed(seed, lambda: fajit.flash_attn_kvpacked_func(
            q, kv, dropout_p=p, window_size=(20, 5)))
        self.compare("kvpacked dropout window (fast)", fast, None, q, k, v, d ** -0.5, False,
                     window=(20, 5), keep=keep, dropout_p=p)
        for name, call in (("func", lambda: fajit.flash_attn_func(q, k, v, return_attn_probs=True)),
                           ("varlen", lambda: fajit.flash_attn_varlen_qkvpacked_func(
                               qkv[0], self.cu((40, 56)), 56, return_attn_probs=True))):
            with self.subTest(fn=name):
                self.check_no_s_dmask(call()[2], q)

    def test_varlen_packed(self):
        lens = (3, 0, 77, 128, 1)
        cu = self.cu(lens)
        for causal in (False, True):
            with self.subTest(fn="varlen_qkvpacked", causal=causal):
                qkv = rand(sum(lens), 3, 4, 64, dtype="float16")
                out, lse, _ = fajit.flash_attn_varlen_qkvpacked_func(
                    qkv, cu, max(lens), causal=causal, return_attn_probs=True)
                q, k, v = qkv.unbind(1)
                self.check_varlen("varlen qkvpacked causal=%d" % causal, out, lse, q, k, v,
                                  lens, lens, causal, 0.125)
            with self.subTest(fn="varlen_kvpacked", causal=causal):
                lq, lk = self.LENS_Q, self.LENS_K
                q = rand(sum(lq), 4, 64, dtype="bfloat16")
                kv = rand(sum(lk), 2, 2, 64, dtype="bfloat16")
                out, lse, _ = fajit.flash_attn_varlen_kvpacked_func(
                    q, kv, self.cu(lq), self.cu(lk), max(lq), max(lk), causal=causal,
                    return_attn_probs=True)
                k, v = kv.unbind(1)
                self.check_varlen("varlen kvpacked causal=%d" % causal, out, lse, q, k, v,
                                  lq, lk, causal, 0.125)

    def varlen_grads(self, what, fn_name, lq, lk, hq, hkv, d, dtype, causal, call, ref, seed=None):
        """One varlen call with grad, checked sequence by sequence against the math."""
        cu_q, cu_k = self.cu(lq), self.cu(lk)
        scale = d ** -0.5
        if fn_name == "qkvpacked":
            leaves = (rand(sum(lq), 3, hq, d, dtype=dtype, requires_grad=True),)

            def split(t):
                return tuple(t[0].unbind(1))

            def run():
                return fajit.flash_attn_varlen_qkvpacked_func(leaves[0], cu_q, max(lq),
                                                              causal=causal, **call)
        elif fn_name == "kvpacked":
            leaves = (rand(sum(lq), hq, d, dtype=dtype, requires_grad=True),
                      rand(sum(lk), 2, hkv, d, dtype=dtype, requires_grad=True))

            def split(t):
                return (t[0],) + tuple(t[1].unbind(1))

            def run():
                return fajit.flash_attn_varlen_kvpacked_func(*leaves, cu_q, cu_k, max(lq), max(lk),
                                                             causal=causal, **call)
        else:
            leaves = (rand(sum(lq), hq, d, dtype=dtype, requires_grad=True),
                      rand(sum(lk), hkv, d, dtype=dtype, requires_grad=True),
                      rand(sum(lk), hkv, d, dtype=dtype, requires_grad=True))

            def split(t):
                return tuple(t)

            def run():
                return fajit.flash_attn_varlen_func(*leaves, cu_q, cu_k, max(lq), max(lk),
                                                    causal=causal, **call)
        out = run() if seed is None else self.with_seed(seed, run)
        self.grads_vs_ref(what, out, leaves, split,
                          lambda q, k, v, up: self.varlen_ref(q, k, v, lq, lk, causal, scale, up,
                                                              **ref)[0])

    def test_varlen_grads(self):
        self.require_backward()
        lq, lk = self.GRAD_LENS_Q, self.GRAD_LENS_K
        same = (3, 0, 77, 128, 1)
        slopes = torch.rand(len(lq), 6, device="cuda") * 0.3 + 0.05
        feats = (("plain", {}, {}),
                 ("window+softcap+alibi",
                  dict(window_size=(30, 10), softcap=20.0, alibi_slopes=slopes),
                  dict(window=(30, 10), softcap=20.0, alibi=slopes)))
        for causal in (False, True):
            for name, call, ref in feats:
                for fn_name, lens, hkv, dtype in (("func", (lq, lk), 2, "float16"),
                                                  ("kvpacked", (lq, lk), 3, "bfloat16"),
                                                  ("qkvpacked", (same, same), 6, "bfloat16")):
                    if fn_name == "qkvpacked" and name != "plain":
                        call_, ref_ = dict(call, alibi_slopes=slopes[:len(same)]), \
                            dict(ref, alibi=slopes[:len(same)])
                    else:
                        call_, ref_ = call, ref
                    with self.subTest(fn=fn_name, causal=causal, case=name):
                        self.varlen_grads("grads varlen %s %s causal=%d" % (fn_name, name, causal),
                                          fn_name, lens[0], lens[1], 6, hkv, 64, dtype, causal,
                                          call_, ref_)

    def test_varlen_dropout_grads(self):
        self.require_backward()
        lq, lk = self.GRAD_LENS_Q, self.GRAD_LENS_K
        hq, hkv, p, seed = 4, 2, 0.17, 8642
        keep, _ = self.dropout_pattern(seed, p, len(lq), max(lq), max(lk), hq, hkv)
        for causal in (False, True):
            for fn_name in ("func", "kvpacked"):
                with self.subTest(fn=fn_name, causal=causal):
                    self.varlen_grads("grads varlen dropout %s causal=%d" % (fn_name, causal),
                                      fn_name, lq, lk, hq, hkv, 64, "float16", causal,
                                      dict(dropout_p=p), dict(keep=keep, dropout_p=p), seed=seed)

    def test_varlen_strided_and_defaults(self):
        # q, k, v as head-major views (seq stride != nheads * d), and no LSE asked.
        lens = (40, 9, 70)
        cu = self.cu(lens)
        q = rand(4, sum(lens), 64, dtype="float16").transpose(0, 1)
        k = rand(2, sum(lens), 64, dtype="float16").transpose(0, 1)
        v = rand(2, sum(lens), 64, dtype="float16").transpose(0, 1)
        out = fajit.flash_attn_varlen_func(q, k, v, cu, cu, 70, 70, causal=True)
        self.assertIsInstance(out, torch.Tensor)
        ref, _ = self.varlen_ref(q, k, v, lens, lens, True, 0.125, True)
        pt, _ = self.varlen_ref(q, k, v, lens, lens, True, 0.125, False)
        self.check_close("varlen strided", out, ref, pt)
        if backward_works():
            return
        leaves = tuple(t.detach().requires_grad_(True) for t in (q, k, v))  # still strided
        out = fajit.flash_attn_varlen_func(*leaves, cu, cu, 70, 70)
        self.grads_vs_ref("grads varlen strided", out, leaves, tuple,
                          lambda q_, k_, v_, up: self.varlen_ref(q_, k_, v_, lens, lens, False,
                                                                 0.125, up)[0])

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

    def test_dlpack_features(self):
        from fajit import dlpack
        b, sq, sk, hq, hkv, d = 2, 100, 130, 4, 2, 72
        slopes = torch.rand(b, hq, device="cuda") * 0.3 + 0.05
        cases = (("window", dict(window_size=(30, 10)), dict(window=(30, 10))),
                 ("softcap", dict(softcap=15.0), dict(softcap=15.0)),
                 ("alibi (batch, nheads)", dict(alibi_slopes=slopes), dict(alibi=slopes)),
                 ("alibi (nheads,)", dict(alibi_slopes=slopes[0]), dict(alibi=slopes[0])),
                 ("all", dict(window_size=(40, 0), softcap=20.0, alibi_slopes=slopes),
                  dict(window=(40, 0), softcap=20.0, alibi=slopes)))
        for dtype in DTYPES:
            q = rand(b, sq, hq, d, dtype=dtype)
            k, v = (rand(b, sk, hkv, d, dtype=dtype) for _ in range(2))
            for name, call, ref in cases:
                for causal in (False, True):
                    with self.subTest(dtype=dtype, case=name, causal=causal):
                        out, lse = dlpack.attention(q, k, v, causal=causal, return_lse=True, **call)
                        self.compare("dlpack %s causal=%d %s" % (name, causal, dtype), out, lse,
                                     q, k, v, d ** -0.5, causal, **ref)

    @staticmethod
    def drawn_seed(seed):
        """The dropout seed fajit.interface draws under with_seed(seed)."""
        g = torch.Generator().manual_seed(seed)
        return int(torch.randint(0, 2 ** 63 - 1, (1,), generator=g).item())

    def test_dlpack_dropout(self):
        from fajit import dlpack
        p, seed = 0.17, 1234
        shape = (2, 128, 96, 4, 2)
        b, sq, sk, hq, hkv = shape
        keep, _ = self.dropout_pattern(seed, p, *shape)
        q = rand(b, sq, hq, 64, dtype="float16")
        k, v = (rand(b, sk, hkv, 64, dtype="float16") for _ in range(2))
        out, lse = dlpack.attention(q, k, v, dropout_p=p, dropout_seed=self.drawn_seed(seed),
                                    causal=True, return_lse=True)
        self.compare("dlpack dropout", out, lse, q, k, v, 0.125, True, keep=keep, dropout_p=p)
        torch_out = self.with_seed(seed, lambda: fajit.flash_attn_func(q, k, v, dropout_p=p,
                                                                      causal=True))
        self.assertTrue(torch.equal(out, torch_out), "DLPack and torch entries differ for one seed")
        other = dlpack.attention(q, k, v, dropout_p=p, dropout_seed=self.drawn_seed(seed),
                                 dropout_offset=1, causal=True)
        self.assertFalse(torch.equal(out, other), "dropout_offset changed nothing")

    def test_dlpack_backward(self):
        self.require_backward()
        b, sq, sk, hq, hkv, d = 2, 97, 150, 6, 2, 64
        slopes = torch.rand(hq, device="cuda") * 0.3 + 0.05
        cases = (("plain", {}, {}),
                 ("window+softcap+alibi", dict(window_size=(40, 20), softcap=15.0,
                                               alibi_slopes=slopes),
                  dict(window=(40, 20), softcap=15.0, alibi=slopes)))
        for dtype in DTYPES:
            for name, call, ref in cases:
                for causal in (False, True):
                    with self.subTest(dtype=dtype, case=name, causal=causal):
                        leaves = (rand(b, sq, hq, d, dtype=dtype, requires_grad=True),
                                  rand(b, sk, hkv, d, dtype=dtype, requires_grad=True),
                                  rand(b, sk, hkv, d, dtype=dtype, requires_grad=True))
                        self.dlpack_grads("dlpack grads %s causal=%d %s" % (name, causal, dtype),
                                          leaves, causal, call, ref)

    def dlpack_grads(self, what, leaves, causal, call, ref):
        """dlpack.attention and attention_backward against attention_ref's autograd."""
        from fajit import dlpack
        q, k, v = (t.detach() for t in leaves)
        scale = q.shape[-1] ** -0.5
        out, lse = dlpack.attention(q, k, v, causal=causal, return_lse=True, **call)

        class Wrap(torch.autograd.Function):  # lets grads_vs_ref drive the DLPack backward
            @staticmethod
            def forward(ctx, q_, k_, v_):
                return out.clone()

            @staticmethod
            def backward(ctx, dout):
                given = tuple(torch.full_like(t, math.nan) for t in (q, k, v))
                got = dlpack.attention_backward(q, k, v, out, dout.contiguous(), lse,
                                                causal=causal, dq=given[0], dk=given[1],
                                                dv=given[2], **call)
                for g, t in zip(got, given):
                    assert g is t, "attention_backward did not return the given buffers"
                return got

        self.grads_vs_ref(what, Wrap.apply(*leaves), leaves, tuple,
                          lambda q_, k_, v_, up: attention_ref(q_, k_, v_, causal, scale, up,
                                                               **ref)[0])

    def test_dlpack_backward_dropout_matches_torch(self):
        self.require_backward()
        from fajit import dlpack
        p, seed = 0.2, 4321
        q, k, v = (rand(2, 110, 4, 64, dtype="bfloat16", requires_grad=True) for _ in range(3))
        dout = torch.randn(2, 110, 4, 64, device="cuda", dtype=torch.bfloat16)
        feats = dict(dropout_p=p, softcap=10.0, window_size=(30, 5))
        out_t = self.with_seed(seed, lambda: fajit.flash_attn_func(q, k, v, deterministic=True,
                                                                   **feats))
        grads_t = torch.autograd.grad(out_t, (q, k, v), dout)
        qd, kd, vd = (t.detach() for t in (q, k, v))
        out_d, lse = dlpack.attention(qd, kd, vd, dropout_seed=self.drawn_seed(seed),
                                      return_lse=True, **feats)
        self.assertTrue(torch.equal(out_d, out_t))
        grads_d = dlpack.attention_backward(qd, kd, vd, out_d, dout, lse, deterministic=True,
                                            dropout_seed=self.drawn_seed(seed), **feats)
        for name, a, b in zip(("dq", "dk", "dv"), grads_d, grads_t):
            self.assertTrue(torch.equal(a, b), "DLPack %s differs from torch autograd's" % name)
        print("dlpack backward with dropout == torch autograd's, bit for bit")

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
