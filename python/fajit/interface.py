"""flash_attn 2.x's functions, on libfajit.

Same names, signatures, defaults and return values as ``flash_attn`` 2.x, so
``import fajit as flash_attn`` works unchanged. Tensors are torch tensors on a
CUDA device, fp16 or bf16, layout (batch, seqlen, nheads, headdim) with any
strides (a last dim that is not contiguous is copied, as flash_attn does).
Work is queued on PyTorch's current stream of the tensors' device.

What libfajit does beyond flash_attn: any head dim its kernels cover (1..512,
not only multiples of 8 up to 256), and a v head dim different from q/k's.

Features (libfajit's forward): window_size (sliding window, FlashAttention
2.3 semantics: negative or >= seqlen_k sides are unbounded, causal is a right
window of 0 and composes with a left one), softcap (scores become softcap *
tanh(scores / softcap)), alibi_slopes (fp32 on q's device, (nheads,) or
(batch, nheads); bias -slope * |i + seqlen_k - seqlen_q - j|), dropout_p, and
the varlen functions (cu_seqlens int32 CUDA tensors of batch + 1 entries;
LSE (nheads, total_q)).

Dropout seeds: each call with dropout_p > 0 draws a 63-bit seed from
``fajit.interface.dropout_generator`` (a CPU torch.Generator) or, when that is
None (the default), from torch's default CPU generator, so torch.manual_seed
makes runs repeatable; the Philox offset is 0, so the seed alone decides the
mask. flash_attn draws from the CUDA generator instead, so the masks differ
from flash_attn's (they are not meant to match). Under CUDA graph capture the
seed drawn at capture is replayed.

return_attn_probs=True returns (out, softmax_lse, S_dmask). S_dmask is
flash_attn's testing aid, with its shape and dtype: (batch, nheads,
seqlen_q_rounded, seqlen_k_rounded), the lengths rounded up to multiples of
128 (under varlen: batch = len(cu_seqlens) - 1 and the max lengths, sequence
b's rows and keys from 0 within it), in q's dtype. It holds the softmax
probabilities, normalised and before dropout (flash_attn documents only
"possibly with different scaling"; here the scale is exactly 1), negated
where dropout dropped the element (-0.0 for a dropped 0; test the sign with
torch.signbit): that sign is the mask the output was computed with and the
backward regenerates. Keys a row does not see (causal, window) are 0, and so
is the padding. With dropout_p == 0 S_dmask is an empty tensor of shape (0,)
in q's dtype, as in flash_attn >= 2.6.3 (older 2.x returned None). Asking for
S_dmask with dropout runs libfajit's reference kernel (op ref-probs), which
writes the probabilities in fp32 (converted to q's dtype here): slower than
the fast kernel, as it is meant for tests; the output is the same
attention.

Autograd: every function has its backward (fajit_attn_bwd) with everything
the forward takes: causal, window_size, softcap (differentiated through the
tanh), alibi_slopes (constants, no gradient), dropout (the backward
regenerates the forward's mask from the seed that call drew: nothing of size
seqlen_q x seqlen_k is kept), varlen, GQA/MQA (dk, dv summed over the query
heads of a kv head), any head dim, and deterministic=True (bit-identical
gradients run to run). Only q, k, v (or the packed tensors) get gradients;
the varlen functions leave the gradients of rows past cu_seqlens[batch]
unwritten, as their forward leaves those output rows. block_table (paged
KV) raises NotImplementedError.
"""

import ctypes
import math
import operator

from . import _lib

__all__ = [
    "flash_attn_func",
    "flash_attn_qkvpacked_func",
    "flash_attn_kvpacked_func",
    "flash_attn_varlen_func",
    "flash_attn_varlen_qkvpacked_func",
    "flash_attn_varlen_kvpacked_func",
]

_torch = None


def _import_torch():
    global _torch
    if _torch is None:
        try:
            import torch
        except ImportError:
            raise ImportError("fajit's flash_attn functions need PyTorch (import torch failed); "
                              "fajit.dlpack.attention works without it") from None
        _torch = torch
    return _torch


# ---------------------------------------------------------------- argument checks

def _check_tensor(name, t, ndim):
    torch = _import_torch()
    if not isinstance(t, torch.Tensor):
        raise TypeError("%s must be a torch.Tensor, got %s" % (name, type(t).__name__))
    if t.dtype not in (torch.float16, torch.bfloat16):
        raise TypeError("%s must be torch.float16 or torch.bfloat16, got %s" % (name, t.dtype))
    if t.dim() != ndim:
        raise ValueError("%s must have %d dimensions, got shape %s" % (name, ndim, tuple(t.shape)))


def _check_cuda(name, t):
    # Checked last, so every other argument error shows on CPU tensors too.
    if t.device.type != "cuda":
        raise ValueError("%s must be on a CUDA device, got %s" % (name, t.device))


def _check_same(names, tensors):
    first_name, first = names[0], tensors[0]
    for name, t in zip(names[1:], tensors[1:]):
        if t.dtype != first.dtype:
            raise TypeError("%s has dtype %s but %s has %s: they must match"
                            % (name, t.dtype, first_name, first.dtype))
        if t.device != first.device:
            raise ValueError("%s is on %s but %s is on %s: they must be on one device"
                             % (name, t.device, first_name, first.device))


def _check_shapes(q, k, v, kname="k", vname="v"):
    b, sq, hq, dqk = q.shape
    bk, sk, hkv, dk = k.shape
    if tuple(v.shape[:3]) != (bk, sk, hkv):
        raise ValueError("%s has shape %s but %s has %s: batch, seqlen and nheads must match"
                         % (vname, tuple(v.shape), kname, tuple(k.shape)))
    if bk != b:
        raise ValueError("q has batch %d but %s has %d" % (b, kname, bk))
    if dk != dqk:
        raise ValueError("q has head dim %d but %s has %d: they must match" % (dqk, kname, dk))
    if hkv == 0 or hq % hkv != 0:
        raise ValueError("nheads of q (%d) must be a multiple of nheads of %s (%d) (GQA/MQA)"
                         % (hq, kname, hkv))


def _mask_window(causal, window_size, seqlen_k):
    """(mask, window_left, window_right) for flash_attn's (causal, window_size).

    As flash_attn: a negative side, or one reaching past every key (>= seqlen_k),
    bounds nothing (-1); causal is a right window of 0; a right window of 0 with
    no left one is the causal mask itself. The causal mask and a left window
    compose (libfajit's FAJIT_MASK_CAUSAL with window_left)."""
    try:
        left, right = (int(w) for w in window_size)
    except (TypeError, ValueError):
        raise TypeError("window_size must be a pair (left, right), got %r"
                        % (window_size,)) from None
    left = -1 if left < 0 or left >= seqlen_k else left
    right = -1 if right < 0 or right >= seqlen_k else right
    if causal:
        right = 0
    if right == 0:
        return _lib.MASK_CAUSAL, left, -1
    return _lib.MASK_NONE, left, right


# Dropout seeds: each call with dropout_p > 0 draws a fresh 63-bit seed from
# this torch.Generator (a CPU one), or from torch's default CPU generator when
# it is None (so torch.manual_seed makes runs repeatable); the Philox offset is
# 0, so the seed alone decides the mask. Tests set it to replay a mask.
dropout_generator = None


def _dropout_seed():
    torch = _import_torch()
    return int(torch.randint(0, 2 ** 63 - 1, (1,), generator=dropout_generator).item())


class _Features:
    """What a call asks beyond the mask: libfajit's appended fields, the same
    in fajit_attn_args and fajit_attn_bwd_args. One object per call: it keeps
    the call's dropout seed for the backward."""

    def __init__(self):
        self.window_left = self.window_right = -1
        self.window_size = (-1, -1)
        self.softcap = 0.0
        self.alibi = None
        self.alibi_batch_stride = 0
        self.dropout_p = 0.0
        self.dropout_seed = None  # drawn by the first fill (the forward's)
        self.varlen = False
        self.want_probs = False  # return_attn_probs with dropout: S_dmask is written
        self.probs = None  # its fp32 buffer, from the forward until _result takes it

    def fill(self, a):
        """Writes the fields into a fajit_attn_args or fajit_attn_bwd_args.

        The dropout seed is drawn on the first fill, the forward's, and kept:
        the backward's fill passes the same seed and offset, so the library
        regenerates the forward's mask."""
        a.window_left, a.window_right = self.window_left, self.window_right
        a.softcap = self.softcap
        if self.alibi is not None:
            a.alibi_slopes = self.alibi.data_ptr()
            a.alibi_batch_stride = self.alibi_batch_stride
        if self.dropout_p > 0.0:
            if self.dropout_seed is None:
                self.dropout_seed = _dropout_seed()
            a.dropout_p = self.dropout_p
            a.dropout_seed, a.dropout_offset = self.dropout_seed, 0


def _alibi(slopes, batch, nheads, device):
    """(slopes as libfajit reads them, batch stride): fp32, (nheads,) or (batch, nheads)."""
    torch = _import_torch()
    if not isinstance(slopes, torch.Tensor):
        raise TypeError("alibi_slopes must be a torch.Tensor, got %s" % type(slopes).__name__)
    if slopes.dtype != torch.float32:
        raise TypeError("alibi_slopes must be torch.float32, got %s" % (slopes.dtype,))
    shape = tuple(slopes.shape)
    if shape not in ((nheads,), (batch, nheads)):
        raise ValueError("alibi_slopes must have shape (nheads,) = (%d,) or (batch, nheads) = "
                         "(%d, %d), got %s" % (nheads, batch, nheads, shape))
    if slopes.device != device:
        raise ValueError("alibi_slopes is on %s but q is on %s: they must be on one device"
                         % (slopes.device, device))
    if slopes.dim() == 2 and batch == 1:
        slopes = slopes[0]  # one row: its batch stride is never used
    if slopes.dim() == 1:
        if nheads > 1 and slopes.stride(0) != 1:
            slopes = slopes.contiguous()
        return slopes, 0
    # libfajit takes a batch stride of 0 (shared) or >= nheads, heads contiguous.
    if (nheads > 1 and slopes.stride(1) != 1) or 0 < slopes.stride(0) < nheads:
        slopes = slopes.contiguous()
    return slopes, slopes.stride(0)


def _features(dropout_p, softcap, alibi_slopes, causal, window_size, batch, nheads, seqlen_k,
              device):
    """(mask, _Features) for a call, every argument checked."""
    p = float(dropout_p)
    if not 0.0 <= p < 1.0:
        raise ValueError("dropout_p must be in [0, 1), got %r" % (dropout_p,))
    cap = float(softcap)
    if not (math.isfinite(cap) and cap >= 0.0):
        raise ValueError("softcap must be a finite number >= 0 (0: off), got %r" % (softcap,))
    mask, left, right = _mask_window(causal, window_size, seqlen_k)
    f = _Features()
    f.window_left, f.window_right, f.window_size = left, right, window_size
    f.softcap, f.dropout_p = cap, p
    if alibi_slopes is not None:
        f.alibi, f.alibi_batch_stride = _alibi(alibi_slopes, batch, nheads, device)
    return mask, f


def _scale(softmax_scale, dqk):
    if softmax_scale is None:
        return dqk ** -0.5
    s = float(softmax_scale)
    if s == 0.0 or not math.isfinite(s):
        # libfajit reads 0 as "the default 1/sqrt(d)"; refuse rather than differ.
        raise ValueError("softmax_scale must be a finite nonzero number, got %r" % (softmax_scale,))
    return s


def _prepare(t):
    """t with a contiguous last dim and strides libfajit reads as written.

    An all-zero {batch, seq, head} stride triple means "contiguous" to the C API,
    so a tensor broadcast that way is copied too."""
    if t.stride(-1) != 1 or (t.stride(0), t.stride(1), t.stride(2)) == (0, 0, 0):
        return t.contiguous()
    return t


def _prepare_packed(t):
    """A packed qkv / kv with a contiguous last dim and no broadcast (zero) stride."""
    if t.stride(-1) != 1 or 0 in t.stride()[:-1]:
        return t.contiguous()
    return t


def _strides(t):
    return (t.stride(0), t.stride(1), t.stride(2))


def _dtype_code(t):
    return _lib.DTYPE_BF16 if t.dtype == _torch.bfloat16 else _lib.DTYPE_FP16


def _stream(device):
    return ctypes.c_void_p(_torch.cuda.current_stream(device).cuda_stream)


# ---------------------------------------------------------------- the C calls

def _round128(n):
    return (n + 127) // 128 * 128


def _probs_buffer(feat, batch, nheads, seqlen_q, seqlen_k, device):
    """The fp32 S_dmask buffer when the call wants one (feat.want_probs):
    zeros of flash_attn's rounded shape, the kernel writing each row's keys.
    Under _POISON_OUTPUTS the part a dense call writes is NaN first."""
    if not feat.want_probs:
        return
    feat.probs = _torch.zeros((batch, nheads, _round128(seqlen_q), _round128(seqlen_k)),
                              dtype=_torch.float32, device=device)
    if _POISON_OUTPUTS and not feat.varlen:
        feat.probs[:, :, :seqlen_q, :seqlen_k] = math.nan


def _fill_probs(a, feat):
    """Points a fajit_attn_args at the S_dmask buffer, if there is one."""
    if feat.probs is not None:
        a.probs = feat.probs.data_ptr()
        a.probs_stride = tuple(feat.probs.stride()[:3])


def _forward(q, k, v, out, lse, scale, mask, feat):
    """Queues fajit_attn_fwd writing out (and lse, which may be None)."""
    loaded = _lib.load()
    b, sq, hq, dqk = q.shape
    if b * sq * hq == 0:
        return
    if k.shape[1] == 0:  # no key at all: every row fully masked
        out.zero_()
        if lse is not None:
            lse.fill_(-math.inf)
        return
    a = loaded.new_args(_lib.AttnArgs, "fajit_attn_args_init")
    a.q, a.k, a.v, a.o = q.data_ptr(), k.data_ptr(), v.data_ptr(), out.data_ptr()
    a.lse = lse.data_ptr() if lse is not None else None
    a.batch, a.seqlen_q, a.seqlen_k = b, sq, k.shape[1]
    a.nheads_q, a.nheads_kv, a.dqk, a.dv = hq, k.shape[2], dqk, v.shape[3]
    a.q_stride, a.k_stride, a.v_stride = _strides(q), _strides(k), _strides(v)
    a.o_stride = _strides(out)
    a.dtype, a.mask, a.softmax_scale = _dtype_code(q), mask, scale
    feat.fill(a)
    _fill_probs(a, feat)
    _launch_forward(loaded, a, q.device)


def _launch_forward(loaded, a, device):
    with _torch.cuda.device(device):
        ctx = _lib.context(device.index)
        # Split-KV partials in a block of torch's caching allocator on the
        # current stream (freed with `ws` once queued: the allocator keeps it
        # for that stream's later work) rather than the library's
        # stream-ordered scratch, which costs the GPU about 1 us a call.
        need = ctypes.c_size_t(0)
        rc = loaded.lib.fajit_attn_fwd_workspace_size(ctx, ctypes.byref(a), ctypes.byref(need))
        _lib.check(rc, "fajit_attn_fwd_workspace_size")
        ws = None
        if need.value:
            ws = _torch.empty(need.value, dtype=_torch.uint8, device=device)
            a.workspace, a.workspace_bytes = ws.data_ptr(), need.value
        rc = loaded.lib.fajit_attn_fwd(ctx, ctypes.byref(a), _stream(device))
    _lib.check(rc, "fajit_attn_fwd")


def _bwd_args(loaded, dout, q, k, v, out, lse, dq, dk, dv, scale, mask, feat, deterministic):
    """A fajit_attn_bwd_args with the pointers, mask, scale and features (the
    shape and strides are the caller's: dense and varlen lay them out apart)."""
    a = loaded.new_args(_lib.AttnBwdArgs, "fajit_attn_bwd_args_init")
    a.q, a.k, a.v, a.o = q.data_ptr(), k.data_ptr(), v.data_ptr(), out.data_ptr()
    a.grad_out, a.lse = dout.data_ptr(), lse.data_ptr()
    a.grad_q, a.grad_k, a.grad_v = dq.data_ptr(), dk.data_ptr(), dv.data_ptr()
    a.dtype, a.mask, a.softmax_scale = _dtype_code(q), mask, scale
    a.deterministic = 1 if deterministic else 0
    feat.fill(a)
    return a


def _launch_backward(loaded, a, device):
    with _torch.cuda.device(device):
        ctx = _lib.context(device.index)
        rc = loaded.lib.fajit_attn_bwd(ctx, ctypes.byref(a), _stream(device))
    _lib.check(rc, "fajit_attn_bwd")


def _loaded_backward():
    loaded = _lib.load()
    if not loaded.has_backward:
        raise NotImplementedError("fajit backward: not in this libfajit build (%s, version %s "
                                  "has no fajit_attn_bwd)" % (loaded.path, loaded.version))
    return loaded


def _backward(dout, q, k, v, out, lse, dq, dk, dv, scale, mask, feat, deterministic):
    """Queues fajit_attn_bwd writing dq, dk, dv (views allowed, no overlap)."""
    loaded = _loaded_backward()
    b, sq, hq, dqk = q.shape
    sk = k.shape[1]
    if b * sq * hq == 0 or sk == 0:  # nothing attends: zero gradients
        for t in (dq, dk, dv):
            t.zero_()
        return
    a = _bwd_args(loaded, dout, q, k, v, out, lse, dq, dk, dv, scale, mask, feat, deterministic)
    a.batch, a.seqlen_q, a.seqlen_k = b, sq, sk
    a.nheads_q, a.nheads_kv, a.dqk, a.dv = hq, k.shape[2], dqk, v.shape[3]
    a.q_stride, a.k_stride, a.v_stride = _strides(q), _strides(k), _strides(v)
    a.o_stride, a.grad_out_stride = _strides(out), _strides(dout)
    a.grad_q_stride, a.grad_k_stride, a.grad_v_stride = _strides(dq), _strides(dk), _strides(dv)
    _launch_backward(loaded, a, q.device)


# Tests set this: every output buffer is NaN-filled before the launch, so an
# element the kernel fails to write shows instead of hiding behind whatever
# the caching allocator's memory held.
_POISON_OUTPUTS = False


def _empty(shape, dtype, device):
    t = _torch.empty(shape, dtype=dtype, device=device)
    if _POISON_OUTPUTS:
        t.fill_(math.nan)
    return t


def _run_forward(q, k, v, scale, mask, feat, need_lse):
    torch = _import_torch()
    b, sq, hq, _ = q.shape
    out = _empty((b, sq, hq, v.shape[3]), q.dtype, q.device)
    lse = _empty((b, hq, sq), torch.float32, q.device) if need_lse else None
    _probs_buffer(feat, b, hq, sq, k.shape[1], q.device)
    _forward(q, k, v, out, lse, scale, mask, feat)
    return out, lse


# ---------------------------------------------------------------- autograd

def _make_functions():
    """The autograd.Function classes (defined once torch is imported).

    Only inputs and outputs are saved for the backward (the features object
    rides along on ctx: its ALiBi slopes and the dropout seed the forward
    drew); packed tensors are sliced again there, and their gradient is one
    buffer written through views, with no concatenation of dq, dk, dv."""
    torch = _import_torch()

    def save(ctx, tensors, lse, scale, mask, feat, deterministic):
        ctx.save_for_backward(*tensors, lse)
        ctx.scale, ctx.mask, ctx.feat, ctx.deterministic = scale, mask, feat, deterministic

    def finish(ctx, out, lse):
        if lse is not None:
            ctx.mark_non_differentiable(lse)
        return out, lse

    def dense_backward(ctx, dout, q, k, v, out, lse, dq, dk, dv):
        _backward(_prepare(dout), q, k, v, out, lse, dq, dk, dv, ctx.scale, ctx.mask, ctx.feat,
                  ctx.deterministic)

    class AttnFunc(torch.autograd.Function):
        @staticmethod
        def forward(ctx, q, k, v, scale, mask, feat, deterministic, need_lse, is_grad):
            out, lse = _run_forward(q, k, v, scale, mask, feat, need_lse or is_grad)
            if is_grad:
                save(ctx, (q, k, v, out), lse, scale, mask, feat, deterministic)
            return finish(ctx, out, lse)

        @staticmethod
        def backward(ctx, dout, _dlse):
            q, k, v, out, lse = ctx.saved_tensors
            dq, dk, dv = (_empty(t.shape, t.dtype, t.device) for t in (q, k, v))
            dense_backward(ctx, dout, q, k, v, out, lse, dq, dk, dv)
            return dq, dk, dv, None, None, None, None, None, None

    class QKVPackedFunc(torch.autograd.Function):
        @staticmethod
        def forward(ctx, qkv, scale, mask, feat, deterministic, need_lse, is_grad):
            q, k, v = qkv.unbind(2)
            out, lse = _run_forward(q, k, v, scale, mask, feat, need_lse or is_grad)
            if is_grad:
                save(ctx, (qkv, out), lse, scale, mask, feat, deterministic)
            return finish(ctx, out, lse)

        @staticmethod
        def backward(ctx, dout, _dlse):
            qkv, out, lse = ctx.saved_tensors
            q, k, v = qkv.unbind(2)
            dqkv = _empty(qkv.shape, qkv.dtype, qkv.device)
            dense_backward(ctx, dout, q, k, v, out, lse, *dqkv.unbind(2))
            return dqkv, None, None, None, None, None, None

    class KVPackedFunc(torch.autograd.Function):
        @staticmethod
        def forward(ctx, q, kv, scale, mask, feat, deterministic, need_lse, is_grad):
            k, v = kv.unbind(2)
            out, lse = _run_forward(q, k, v, scale, mask, feat, need_lse or is_grad)
            if is_grad:
                save(ctx, (q, kv, out), lse, scale, mask, feat, deterministic)
            return finish(ctx, out, lse)

        @staticmethod
        def backward(ctx, dout, _dlse):
            q, kv, out, lse = ctx.saved_tensors
            k, v = kv.unbind(2)
            dq = _empty(q.shape, q.dtype, q.device)
            dkv = _empty(kv.shape, kv.dtype, kv.device)
            dense_backward(ctx, dout, q, k, v, out, lse, dq, *dkv.unbind(2))
            return dq, dkv, None, None, None, None, None, None

    # Varlen: `seqs` is (cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k);
    # the prefix sums are not differentiable and are saved as plain tensors.
    def varlen_save(ctx, tensors, lse, seqs, scale, mask, feat, deterministic):
        save(ctx, tensors + (seqs[0], seqs[1]), lse, scale, mask, feat, deterministic)
        ctx.max_seqlens = seqs[2:]

    def varlen_backward(ctx, dout, q, k, v, out, lse, cu_q, cu_k, dq, dk, dv):
        _varlen_backward(_prepare_varlen(dout), q, k, v, out, lse, dq, dk, dv,
                         (cu_q, cu_k) + ctx.max_seqlens, ctx.scale, ctx.mask, ctx.feat,
                         ctx.deterministic)

    class VarlenFunc(torch.autograd.Function):
        @staticmethod
        def forward(ctx, q, k, v, seqs, scale, mask, feat, deterministic, need_lse, is_grad):
            out, lse = _varlen_forward(q, k, v, seqs, scale, mask, feat, need_lse or is_grad)
            if is_grad:
                varlen_save(ctx, (q, k, v, out), lse, seqs, scale, mask, feat, deterministic)
            return finish(ctx, out, lse)

        @staticmethod
        def backward(ctx, dout, _dlse):
            q, k, v, out, cu_q, cu_k, lse = ctx.saved_tensors
            dq, dk, dv = (_empty(t.shape, t.dtype, t.device) for t in (q, k, v))
            varlen_backward(ctx, dout, q, k, v, out, lse, cu_q, cu_k, dq, dk, dv)
            return dq, dk, dv, None, None, None, None, None, None, None

    class VarlenQKVPackedFunc(torch.autograd.Function):
        @staticmethod
        def forward(ctx, qkv, seqs, scale, mask, feat, deterministic, need_lse, is_grad):
            q, k, v = qkv.unbind(1)
            out, lse = _varlen_forward(q, k, v, seqs, scale, mask, feat, need_lse or is_grad)
            if is_grad:
                varlen_save(ctx, (qkv, out), lse, seqs, scale, mask, feat, deterministic)
            return finish(ctx, out, lse)

        @staticmethod
        def backward(ctx, dout, _dlse):
            qkv, out, cu_q, cu_k, lse = ctx.saved_tensors
            q, k, v = qkv.unbind(1)
            dqkv = _empty(qkv.shape, qkv.dtype, qkv.device)
            varlen_backward(ctx, dout, q, k, v, out, lse, cu_q, cu_k, *dqkv.unbind(1))
            return dqkv, None, None, None, None, None, None, None

    class VarlenKVPackedFunc(torch.autograd.Function):
        @staticmethod
        def forward(ctx, q, kv, seqs, scale, mask, feat, deterministic, need_lse, is_grad):
            k, v = kv.unbind(1)
            out, lse = _varlen_forward(q, k, v, seqs, scale, mask, feat, need_lse or is_grad)
            if is_grad:
                varlen_save(ctx, (q, kv, out), lse, seqs, scale, mask, feat, deterministic)
            return finish(ctx, out, lse)

        @staticmethod
        def backward(ctx, dout, _dlse):
            q, kv, out, cu_q, cu_k, lse = ctx.saved_tensors
            k, v = kv.unbind(1)
            dq = _empty(q.shape, q.dtype, q.device)
            dkv = _empty(kv.shape, kv.dtype, kv.device)
            varlen_backward(ctx, dout, q, k, v, out, lse, cu_q, cu_k, dq, *dkv.unbind(1))
            return dq, dkv, None, None, None, None, None, None, None

    return (AttnFunc, QKVPackedFunc, KVPackedFunc, VarlenFunc, VarlenQKVPackedFunc,
            VarlenKVPackedFunc)


_functions = None


def _fn(index):
    global _functions
    if _functions is None:
        _functions = _make_functions()
    return _functions[index]


def _is_grad(*tensors):
    return _torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def _want_probs(feat, return_attn_probs):
    """flash_attn writes S_dmask only with dropout (return_softmax = return_attn_probs
    and dropout_p > 0)."""
    feat.want_probs = bool(return_attn_probs) and feat.dropout_p > 0.0


def _result(out, lse, return_attn_probs, feat, like):
    """out, or (out, lse, S_dmask): S_dmask in like's (q's) dtype (the fp32
    buffer the forward wrote, released from feat, which the backward keeps),
    or, without dropout, an empty (0,) tensor as flash_attn >= 2.6.3 gives."""
    if not return_attn_probs:
        return out
    probs, feat.probs = feat.probs, None
    if probs is None:
        s_dmask = _torch.empty((0,), dtype=like.dtype, device=like.device)
    else:
        s_dmask = probs.to(like.dtype)
    return out, lse, s_dmask


# ---------------------------------------------------------------- the flash_attn functions

def flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False,
                    window_size=(-1, -1), softcap=0.0, alibi_slopes=None, deterministic=False,
                    return_attn_probs=False):
    """Attention of q (batch, seqlen_q, nheads, d) over k, v (batch, seqlen_k, nheads_k, d).

    As flash_attn.flash_attn_func: nheads a multiple of nheads_k (GQA/MQA),
    causal aligned to the bottom-right corner, softmax_scale default
    1/sqrt(d), window_size, softcap, alibi_slopes ((nheads,) or (batch,
    nheads) fp32) and dropout_p. Returns out (batch, seqlen_q, nheads, dv), or
    with return_attn_probs (out, softmax_lse (batch, nheads, seqlen_q) fp32,
    S_dmask): with dropout_p > 0, S_dmask is (batch, nheads, seqlen_q rounded
    up to 128, seqlen_k rounded up to 128) in q's dtype, the normalised
    softmax before dropout with dropped elements negated (0 where a row sees
    no key, and in the padding); with dropout_p == 0 an empty (0,) tensor, as
    flash_attn gives (see the module's documentation)."""
    _check_tensor("q", q, 4)
    _check_tensor("k", k, 4)
    _check_tensor("v", v, 4)
    _check_same(("q", "k", "v"), (q, k, v))
    _check_shapes(q, k, v)
    mask, feat = _features(dropout_p, softcap, alibi_slopes, causal, window_size, q.shape[0],
                           q.shape[2], k.shape[1], q.device)
    scale = _scale(softmax_scale, q.shape[-1])
    is_grad = _is_grad(q, k, v)
    _check_cuda("q", q)
    _want_probs(feat, return_attn_probs)
    q, k, v = _prepare(q), _prepare(k), _prepare(v)
    out, lse = _fn(0).apply(q, k, v, scale, mask, feat, bool(deterministic),
                            bool(return_attn_probs), is_grad)
    return _result(out, lse, return_attn_probs, feat, out)


def flash_attn_qkvpacked_func(qkv, dropout_p=0.0, softmax_scale=None, causal=False,
                              window_size=(-1, -1), softcap=0.0, alibi_slopes=None,
                              deterministic=False, return_attn_probs=False):
    """flash_attn_func on qkv (batch, seqlen, 3, nheads, d), without copying q, k, v
    apart; the gradient is one (batch, seqlen, 3, nheads, d) tensor."""
    _check_tensor("qkv", qkv, 5)
    if qkv.shape[2] != 3:
        raise ValueError("qkv must have shape (batch, seqlen, 3, nheads, headdim), got %s"
                         % (tuple(qkv.shape),))
    mask, feat = _features(dropout_p, softcap, alibi_slopes, causal, window_size, qkv.shape[0],
                           qkv.shape[3], qkv.shape[1], qkv.device)
    scale = _scale(softmax_scale, qkv.shape[-1])
    is_grad = _is_grad(qkv)
    _check_cuda("qkv", qkv)
    _want_probs(feat, return_attn_probs)
    qkv = _prepare_packed(qkv)
    out, lse = _fn(1).apply(qkv, scale, mask, feat, bool(deterministic), bool(return_attn_probs),
                            is_grad)
    return _result(out, lse, return_attn_probs, feat, out)


def flash_attn_kvpacked_func(q, kv, dropout_p=0.0, softmax_scale=None, causal=False,
                             window_size=(-1, -1), softcap=0.0, alibi_slopes=None,
                             deterministic=False, return_attn_probs=False):
    """flash_attn_func on q and kv (batch, seqlen_k, 2, nheads_k, d)."""
    _check_tensor("q", q, 4)
    _check_tensor("kv", kv, 5)
    _check_same(("q", "kv"), (q, kv))
    if kv.shape[2] != 2:
        raise ValueError("kv must have shape (batch, seqlen_k, 2, nheads_k, headdim), got %s"
                         % (tuple(kv.shape),))
    _check_shapes(q, kv[:, :, 0], kv[:, :, 1], "kv", "kv")
    mask, feat = _features(dropout_p, softcap, alibi_slopes, causal, window_size, q.shape[0],
                           q.shape[2], kv.shape[1], q.device)
    scale = _scale(softmax_scale, q.shape[-1])
    is_grad = _is_grad(q, kv)
    _check_cuda("q", q)
    _want_probs(feat, return_attn_probs)
    kv = _prepare_packed(kv)
    q = _prepare(q)
    out, lse = _fn(2).apply(q, kv, scale, mask, feat, bool(deterministic),
                            bool(return_attn_probs), is_grad)
    return _result(out, lse, return_attn_probs, feat, out)


# ---------------------------------------------------------------- varlen

def _check_varlen_shapes(q, k, v, kname="k", vname="v"):
    tq, hq, dqk = q.shape
    tk, hkv, dk = k.shape
    if tuple(v.shape[:2]) != (tk, hkv):
        raise ValueError("%s has shape %s but %s has %s: total_k and nheads must match"
                         % (vname, tuple(v.shape), kname, tuple(k.shape)))
    if dk != dqk:
        raise ValueError("q has head dim %d but %s has %d: they must match" % (dqk, kname, dk))
    if hkv == 0 or hq % hkv != 0:
        raise ValueError("nheads of q (%d) must be a multiple of nheads of %s (%d) (GQA/MQA)"
                         % (hq, kname, hkv))


def _check_cu_seqlens(name, cu, device):
    torch = _import_torch()
    if not isinstance(cu, torch.Tensor):
        raise TypeError("%s must be a torch.Tensor, got %s" % (name, type(cu).__name__))
    if cu.dtype != torch.int32:
        raise TypeError("%s must be torch.int32, got %s" % (name, cu.dtype))
    if cu.dim() != 1 or cu.shape[0] < 1:
        raise ValueError("%s must have shape (batch + 1,), got %s" % (name, tuple(cu.shape)))
    if cu.device != device:
        raise ValueError("%s is on %s but q is on %s: they must be on one device"
                         % (name, cu.device, device))


def _max_seqlen(name, value):
    try:
        n = operator.index(value)
    except TypeError:
        raise TypeError("%s must be an int, got %s" % (name, type(value).__name__)) from None
    if n < 0:
        raise ValueError("%s must be >= 0, got %d" % (name, n))
    return n


def _prepare_varlen(t):
    """A packed (total, nheads, dim) view libfajit reads as written: last dim
    contiguous, and not a broadcast whose {0, 0, 0} strides mean "contiguous"."""
    if t.stride(-1) != 1 or (t.stride(0), t.stride(1)) == (0, 0):
        return t.contiguous()
    return t


def _prepare_varlen_packed(t):
    """A packed qkv (total, 3, nheads, dim) or kv (total, 2, nheads_k, dim):
    last dim contiguous and no broadcast (zero) stride, so that its slices
    are tensors _prepare_varlen would keep, and the gradient, allocated like
    it, has slices that do not overlap."""
    if t.stride(-1) != 1 or 0 in t.stride()[:-1]:
        return t.contiguous()
    return t


def _varlen_strides(t):
    """Under varlen the batch stride is ignored; the seq and head strides are
    real (never both 0, see _prepare_varlen), so the triple never reads
    "contiguous"."""
    return (0,) + tuple(t.stride()[:2])


def _varlen_forward(q, k, v, seqs, scale, mask, feat, need_lse):
    """out (total_q, nheads_q, dv) and, with need_lse, LSE (nheads_q, total_q)."""
    torch = _import_torch()
    cu_q, cu_k, max_q, max_k = seqs
    total_q, hq, dqk = q.shape
    batch = cu_q.shape[0] - 1
    out = _empty((total_q, hq, v.shape[2]), q.dtype, q.device)
    lse = _empty((hq, total_q), torch.float32, q.device) if need_lse else None
    _probs_buffer(feat, batch, hq, max_q, max_k, q.device)
    if batch == 0 or total_q * hq == 0 or max_q == 0 or max_k == 0 or k.shape[0] == 0:
        out.zero_()  # no row sees a key (or there is no row)
        if lse is not None:
            lse.fill_(-math.inf)
        return out, lse
    loaded = _lib.load()
    a = loaded.new_args(_lib.AttnArgs, "fajit_attn_args_init")
    a.q, a.k, a.v, a.o = q.data_ptr(), k.data_ptr(), v.data_ptr(), out.data_ptr()
    a.lse = lse.data_ptr() if lse is not None else None
    a.batch, a.seqlen_q, a.seqlen_k = batch, max_q, max_k
    a.nheads_q, a.nheads_kv, a.dqk, a.dv = hq, k.shape[1], dqk, v.shape[2]
    a.q_stride, a.k_stride = _varlen_strides(q), _varlen_strides(k)
    a.v_stride, a.o_stride = _varlen_strides(v), _varlen_strides(out)
    a.dtype, a.mask, a.softmax_scale = _dtype_code(q), mask, scale
    a.cu_seqlens_q, a.cu_seqlens_k = cu_q.data_ptr(), cu_k.data_ptr()
    feat.fill(a)
    _fill_probs(a, feat)
    _launch_forward(loaded, a, q.device)
    return out, lse


def _varlen_backward(dout, q, k, v, out, lse, dq, dk, dv, seqs, scale, mask, feat, deterministic):
    """Queues fajit_attn_bwd over packed sequences, writing dq, dk, dv (views
    allowed, no overlap); the forward's early cases give zero gradients."""
    cu_q, cu_k, max_q, max_k = seqs
    total_q, hq, dqk = q.shape
    batch = cu_q.shape[0] - 1
    if batch == 0 or total_q * hq == 0 or max_q == 0 or max_k == 0 or k.shape[0] == 0:
        for t in (dq, dk, dv):  # nothing attends: zero gradients
            t.zero_()
        return
    loaded = _loaded_backward()
    a = _bwd_args(loaded, dout, q, k, v, out, lse, dq, dk, dv, scale, mask, feat, deterministic)
    a.batch, a.seqlen_q, a.seqlen_k = batch, max_q, max_k
    a.nheads_q, a.nheads_kv, a.dqk, a.dv = hq, k.shape[1], dqk, v.shape[2]
    a.q_stride, a.k_stride, a.v_stride = _varlen_strides(q), _varlen_strides(k), _varlen_strides(v)
    a.o_stride, a.grad_out_stride = _varlen_strides(out), _varlen_strides(dout)
    a.grad_q_stride, a.grad_k_stride = _varlen_strides(dq), _varlen_strides(dk)
    a.grad_v_stride = _varlen_strides(dv)
    a.cu_seqlens_q, a.cu_seqlens_k = cu_q.data_ptr(), cu_k.data_ptr()
    _launch_backward(loaded, a, q.device)


def _varlen_seqs(q, cu_q, cu_k, max_q, max_k):
    """(cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k), checked."""
    _check_cu_seqlens("cu_seqlens_q", cu_q, q.device)
    _check_cu_seqlens("cu_seqlens_k", cu_k, q.device)
    if cu_q.shape[0] != cu_k.shape[0]:
        raise ValueError("cu_seqlens_q has %d entries but cu_seqlens_k has %d: both are batch + 1"
                         % (cu_q.shape[0], cu_k.shape[0]))
    return (cu_q, cu_k, _max_seqlen("max_seqlen_q", max_q), _max_seqlen("max_seqlen_k", max_k))


def _varlen_call(q, seqs, dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes,
                 grad_tensors, cuda_name):
    """(scale, mask, features, is_grad) of a varlen call, every argument checked."""
    mask, feat = _features(dropout_p, softcap, alibi_slopes, causal, window_size,
                           seqs[0].shape[0] - 1, q.shape[1], seqs[3], q.device)
    feat.varlen = True
    scale = _scale(softmax_scale, q.shape[-1])
    is_grad = _is_grad(*grad_tensors)
    _check_cuda(cuda_name, grad_tensors[0])
    return scale, mask, feat, is_grad


def _contiguous_seqs(seqs):
    return (seqs[0].contiguous(), seqs[1].contiguous()) + tuple(seqs[2:])


def flash_attn_varlen_qkvpacked_func(qkv, cu_seqlens, max_seqlen, dropout_p=0.0,
                                     softmax_scale=None, causal=False, window_size=(-1, -1),
                                     softcap=0.0, alibi_slopes=None, deterministic=False,
                                     return_attn_probs=False):
    """flash_attn_varlen_func on qkv (total, 3, nheads, d) with one cu_seqlens."""
    _check_tensor("qkv", qkv, 4)
    if qkv.shape[1] != 3:
        raise ValueError("qkv must have shape (total, 3, nheads, headdim), got %s"
                         % (tuple(qkv.shape),))
    seqs = _varlen_seqs(qkv, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen)
    scale, mask, feat, is_grad = _varlen_call(qkv[:, 0], seqs, dropout_p, softmax_scale, causal,
                                              window_size, softcap, alibi_slopes, (qkv,), "qkv")
    _want_probs(feat, return_attn_probs)
    qkv = _prepare_varlen_packed(qkv)
    out, lse = _fn(4).apply(qkv, _contiguous_seqs(seqs), scale, mask, feat, bool(deterministic),
                            bool(return_attn_probs), is_grad)
    return _result(out, lse, return_attn_probs, feat, out)


def flash_attn_varlen_kvpacked_func(q, kv, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                                    max_seqlen_k, dropout_p=0.0, softmax_scale=None,
                                    causal=False, window_size=(-1, -1), softcap=0.0,
                                    alibi_slopes=None, deterministic=False,
                                    return_attn_probs=False):
    """flash_attn_varlen_func on q (total_q, nheads, d) and kv (total_k, 2, nheads_k, d)."""
    _check_tensor("q", q, 3)
    _check_tensor("kv", kv, 4)
    _check_same(("q", "kv"), (q, kv))
    if kv.shape[1] != 2:
        raise ValueError("kv must have shape (total_k, 2, nheads_k, headdim), got %s"
                         % (tuple(kv.shape),))
    k, v = kv.unbind(1)
    _check_varlen_shapes(q, k, v, "kv", "kv")
    seqs = _varlen_seqs(q, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)
    scale, mask, feat, is_grad = _varlen_call(q, seqs, dropout_p, softmax_scale, causal,
                                              window_size, softcap, alibi_slopes, (q, kv), "q")
    _want_probs(feat, return_attn_probs)
    q, kv = _prepare_varlen(q), _prepare_varlen_packed(kv)
    out, lse = _fn(5).apply(q, kv, _contiguous_seqs(seqs), scale, mask, feat, bool(deterministic),
                            bool(return_attn_probs), is_grad)
    return _result(out, lse, return_attn_probs, feat, out)


def flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                           dropout_p=0.0, softmax_scale=None, causal=False,
                           window_size=(-1, -1), softcap=0.0, alibi_slopes=None,
                           deterministic=False, return_attn_probs=False, block_table=None):
    """Attention over packed variable-length sequences, as flash_attn.flash_attn_varlen_func.

    q (total_q, nheads, d), k (total_k, nheads_k, d), v (total_k, nheads_k, dv);
    sequence b is rows cu_seqlens_q[b] .. cu_seqlens_q[b+1]-1 of q (likewise k
    and v with cu_seqlens_k), both int32 CUDA tensors of batch + 1 prefix sums;
    max_seqlen_q/k at least every sequence's length (not checked: that would
    read the GPU). Returns out (total_q, nheads, dv), or with return_attn_probs
    (out, softmax_lse (nheads, total_q) fp32, S_dmask): with dropout_p > 0,
    S_dmask is (batch, nheads, max_seqlen_q rounded up to 128, max_seqlen_k
    rounded up to 128), sequence b's probabilities at [b, :, :len_q, :len_k]
    (signs and zeros as flash_attn_func's); with dropout_p == 0 an empty (0,)
    tensor. Rows past
    cu_seqlens_q[batch] are left unwritten (their gradients too, and those of
    k, v rows past cu_seqlens_k[batch]). block_table (paged KV) is not
    supported."""
    if block_table is not None:
        raise NotImplementedError("fajit: block_table (paged KV cache) is not in libfajit's "
                                  "C API yet")
    _check_tensor("q", q, 3)
    _check_tensor("k", k, 3)
    _check_tensor("v", v, 3)
    _check_same(("q", "k", "v"), (q, k, v))
    _check_varlen_shapes(q, k, v)
    seqs = _varlen_seqs(q, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)
    scale, mask, feat, is_grad = _varlen_call(q, seqs, dropout_p, softmax_scale, causal,
                                              window_size, softcap, alibi_slopes, (q, k, v), "q")
    _want_probs(feat, return_attn_probs)
    q, k, v = _prepare_varlen(q), _prepare_varlen(k), _prepare_varlen(v)
    out, lse = _fn(3).apply(q, k, v, _contiguous_seqs(seqs), scale, mask, feat,
                            bool(deterministic), bool(return_attn_probs), is_grad)
    return _result(out, lse, return_attn_probs, feat, out)
