"""flash_attn 2.x's functions, on libfajit.

Same names, signatures, defaults and return values as ``flash_attn`` 2.x, so
``import fajit as flash_attn`` works unchanged. Tensors are torch tensors on a
CUDA device, fp16 or bf16, layout (batch, seqlen, nheads, headdim) with any
strides (a last dim that is not contiguous is copied, as flash_attn does).
Work is queued on PyTorch's current stream of the tensors' device.

What libfajit does beyond flash_attn: any head dim its kernels cover (1..512,
not only multiples of 8 up to 256), and a v head dim different from q/k's.

What libfajit's C API does not have yet raises NotImplementedError naming the
feature, never a silently different result: dropout_p > 0, window_size other
than (-1, -1) (or a window covering everything), softcap, alibi_slopes, and the
varlen functions. The backward needs a library with fajit_attn_bwd.
"""

import ctypes
import math

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


def _mask_for(causal, window_size, seqlen_k):
    """The fajit mask for flash_attn's (causal, window_size); window not implemented."""
    try:
        left, right = (int(w) for w in window_size)
    except (TypeError, ValueError):
        raise TypeError("window_size must be a pair (left, right), got %r" % (window_size,)) from None
    # flash_attn treats a side reaching past every key as no limit, and causal
    # as a right window of 0; (-1, 0) without causal is the causal mask itself.
    left = -1 if left < 0 or left >= seqlen_k else left
    right = -1 if right < 0 or right >= seqlen_k else right
    if causal and right != 0 and right != -1:
        right = 0
    if causal or (left, right) == (-1, 0):
        if left != -1:
            raise NotImplementedError("fajit: window_size=%r (sliding-window attention) is not "
                                      "in libfajit's C API yet" % (tuple(window_size),))
        return _lib.MASK_CAUSAL
    if (left, right) != (-1, -1):
        raise NotImplementedError("fajit: window_size=%r (sliding-window attention) is not in "
                                  "libfajit's C API yet" % (tuple(window_size),))
    return _lib.MASK_NONE


def _check_features(dropout_p, softcap, alibi_slopes):
    if not 0.0 <= float(dropout_p) < 1.0:
        raise ValueError("dropout_p must be in [0, 1), got %r" % (dropout_p,))
    if dropout_p > 0.0:
        raise NotImplementedError("fajit: dropout (dropout_p=%r) is not in libfajit's C API yet; "
                                  "use dropout_p=0.0" % (dropout_p,))
    if softcap != 0.0:
        raise NotImplementedError("fajit: softcap=%r (logit soft-capping) is not in libfajit's "
                                  "C API yet" % (softcap,))
    if alibi_slopes is not None:
        raise NotImplementedError("fajit: alibi_slopes (ALiBi) is not in libfajit's C API yet")


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

def _forward(q, k, v, out, lse, scale, mask):
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
    with _torch.cuda.device(q.device):
        ctx = _lib.context(q.device.index)
        rc = loaded.lib.fajit_attn_fwd(ctx, ctypes.byref(a), _stream(q.device))
    _lib.check(rc, "fajit_attn_fwd")


def _backward(dout, q, k, v, out, lse, dq, dk, dv, scale, mask, deterministic):
    """Queues fajit_attn_bwd writing dq, dk, dv (views allowed, no overlap)."""
    loaded = _lib.load()
    if not loaded.has_backward:
        raise NotImplementedError("fajit backward: not in this libfajit build (%s, version %s "
                                  "has no fajit_attn_bwd)" % (loaded.path, loaded.version))
    b, sq, hq, dqk = q.shape
    sk = k.shape[1]
    if b * sq * hq == 0 or sk == 0:  # nothing attends: zero gradients
        for t in (dq, dk, dv):
            t.zero_()
        return
    a = loaded.new_args(_lib.AttnBwdArgs, "fajit_attn_bwd_args_init")
    a.q, a.k, a.v, a.o = q.data_ptr(), k.data_ptr(), v.data_ptr(), out.data_ptr()
    a.grad_out, a.lse = dout.data_ptr(), lse.data_ptr()
    a.grad_q, a.grad_k, a.grad_v = dq.data_ptr(), dk.data_ptr(), dv.data_ptr()
    a.batch, a.seqlen_q, a.seqlen_k = b, sq, sk
    a.nheads_q, a.nheads_kv, a.dqk, a.dv = hq, k.shape[2], dqk, v.shape[3]
    a.q_stride, a.k_stride, a.v_stride = _strides(q), _strides(k), _strides(v)
    a.o_stride, a.grad_out_stride = _strides(out), _strides(dout)
    a.grad_q_stride, a.grad_k_stride, a.grad_v_stride = _strides(dq), _strides(dk), _strides(dv)
    a.dtype, a.mask, a.softmax_scale = _dtype_code(q), mask, scale
    a.deterministic = 1 if deterministic else 0
    with _torch.cuda.device(q.device):
        ctx = _lib.context(q.device.index)
        rc = loaded.lib.fajit_attn_bwd(ctx, ctypes.byref(a), _stream(q.device))
    _lib.check(rc, "fajit_attn_bwd")


# Tests set this: every output buffer is NaN-filled before the launch, so an
# element the kernel fails to write shows instead of hiding behind whatever
# the caching allocator's memory held.
_POISON_OUTPUTS = False


def _empty(shape, dtype, device):
    t = _torch.empty(shape, dtype=dtype, device=device)
    if _POISON_OUTPUTS:
        t.fill_(math.nan)
    return t


def _run_forward(q, k, v, scale, mask, need_lse):
    torch = _torch
    b, sq, hq, _ = q.shape
    out = _empty((b, sq, hq, v.shape[3]), q.dtype, q.device)
    lse = _empty((b, hq, sq), torch.float32, q.device) if need_lse else None
    _forward(q, k, v, out, lse, scale, mask)
    return out, lse


# ---------------------------------------------------------------- autograd

def _make_functions():
    """The autograd.Function classes (defined once torch is imported).

    Only inputs and outputs are saved for the backward; packed tensors are
    sliced again there, and their gradient is one buffer written through
    views, with no concatenation of dq, dk, dv."""
    torch = _torch

    def save(ctx, tensors, lse, scale, mask, deterministic):
        ctx.save_for_backward(*tensors, lse)
        ctx.scale, ctx.mask, ctx.deterministic = scale, mask, deterministic

    def finish(ctx, out, lse):
        if lse is not None:
            ctx.mark_non_differentiable(lse)
        return out, lse

    class AttnFunc(torch.autograd.Function):
        @staticmethod
        def forward(ctx, q, k, v, scale, mask, deterministic, need_lse, is_grad):
            out, lse = _run_forward(q, k, v, scale, mask, need_lse or is_grad)
            if is_grad:
                save(ctx, (q, k, v, out), lse, scale, mask, deterministic)
            return finish(ctx, out, lse)

        @staticmethod
        def backward(ctx, dout, _dlse):
            q, k, v, out, lse = ctx.saved_tensors
            dq, dk, dv = (_empty(t.shape, t.dtype, t.device) for t in (q, k, v))
            _backward(_prepare(dout), q, k, v, out, lse, dq, dk, dv, ctx.scale, ctx.mask,
                      ctx.deterministic)
            return dq, dk, dv, None, None, None, None, None

    class QKVPackedFunc(torch.autograd.Function):
        @staticmethod
        def forward(ctx, qkv, scale, mask, deterministic, need_lse, is_grad):
            q, k, v = qkv.unbind(2)
            out, lse = _run_forward(q, k, v, scale, mask, need_lse or is_grad)
            if is_grad:
                save(ctx, (qkv, out), lse, scale, mask, deterministic)
            return finish(ctx, out, lse)

        @staticmethod
        def backward(ctx, dout, _dlse):
            qkv, out, lse = ctx.saved_tensors
            q, k, v = qkv.unbind(2)
            dqkv = _empty(qkv.shape, qkv.dtype, qkv.device)
            dq, dk, dv = dqkv.unbind(2)
            _backward(_prepare(dout), q, k, v, out, lse, dq, dk, dv, ctx.scale, ctx.mask,
                      ctx.deterministic)
            return dqkv, None, None, None, None, None

    class KVPackedFunc(torch.autograd.Function):
        @staticmethod
        def forward(ctx, q, kv, scale, mask, deterministic, need_lse, is_grad):
            k, v = kv.unbind(2)
            out, lse = _run_forward(q, k, v, scale, mask, need_lse or is_grad)
            if is_grad:
                save(ctx, (q, kv, out), lse, scale, mask, deterministic)
            return finish(ctx, out, lse)

        @staticmethod
        def backward(ctx, dout, _dlse):
            q, kv, out, lse = ctx.saved_tensors
            k, v = kv.unbind(2)
            dq = _empty(q.shape, q.dtype, q.device)
            dkv = _empty(kv.shape, kv.dtype, kv.device)
            dk, dv = dkv.unbind(2)
            _backward(_prepare(dout), q, k, v, out, lse, dq, dk, dv, ctx.scale, ctx.mask,
                      ctx.deterministic)
            return dq, dkv, None, None, None, None, None

    return AttnFunc, QKVPackedFunc, KVPackedFunc


_functions = None


def _fn(index):
    global _functions
    if _functions is None:
        _functions = _make_functions()
    return _functions[index]


def _is_grad(*tensors):
    return _torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def _result(out, lse, return_attn_probs):
    # flash_attn returns S_dmask only with dropout; without it, None.
    return (out, lse, None) if return_attn_probs else out


# ---------------------------------------------------------------- the flash_attn functions

def flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False,
                    window_size=(-1, -1), softcap=0.0, alibi_slopes=None, deterministic=False,
                    return_attn_probs=False):
    """Attention of q (batch, seqlen_q, nheads, d) over k, v (batch, seqlen_k, nheads_k, d).

    As flash_attn.flash_attn_func: nheads a multiple of nheads_k (GQA/MQA),
    causal aligned to the bottom-right corner, softmax_scale default
    1/sqrt(d). Returns out (batch, seqlen_q, nheads, dv), or with
    return_attn_probs (out, softmax_lse (batch, nheads, seqlen_q) fp32, None)."""
    _check_features(dropout_p, softcap, alibi_slopes)
    _check_tensor("q", q, 4)
    _check_tensor("k", k, 4)
    _check_tensor("v", v, 4)
    _check_same(("q", "k", "v"), (q, k, v))
    _check_shapes(q, k, v)
    mask = _mask_for(causal, window_size, k.shape[1])
    scale = _scale(softmax_scale, q.shape[-1])
    _check_cuda("q", q)
    q, k, v = _prepare(q), _prepare(k), _prepare(v)
    out, lse = _fn(0).apply(q, k, v, scale, mask, bool(deterministic), bool(return_attn_probs),
                            _is_grad(q, k, v))
    return _result(out, lse, return_attn_probs)


def flash_attn_qkvpacked_func(qkv, dropout_p=0.0, softmax_scale=None, causal=False,
                              window_size=(-1, -1), softcap=0.0, alibi_slopes=None,
                              deterministic=False, return_attn_probs=False):
    """flash_attn_func on qkv (batch, seqlen, 3, nheads, d), without copying q, k, v
    apart; the gradient is one (batch, seqlen, 3, nheads, d) tensor."""
    _check_features(dropout_p, softcap, alibi_slopes)
    _check_tensor("qkv", qkv, 5)
    if qkv.shape[2] != 3:
        raise ValueError("qkv must have shape (batch, seqlen, 3, nheads, headdim), got %s"
                         % (tuple(qkv.shape),))
    mask = _mask_for(causal, window_size, qkv.shape[1])
    scale = _scale(softmax_scale, qkv.shape[-1])
    _check_cuda("qkv", qkv)
    qkv = _prepare_packed(qkv)
    out, lse = _fn(1).apply(qkv, scale, mask, bool(deterministic), bool(return_attn_probs),
                            _is_grad(qkv))
    return _result(out, lse, return_attn_probs)


def flash_attn_kvpacked_func(q, kv, dropout_p=0.0, softmax_scale=None, causal=False,
                             window_size=(-1, -1), softcap=0.0, alibi_slopes=None,
                             deterministic=False, return_attn_probs=False):
    """flash_attn_func on q and kv (batch, seqlen_k, 2, nheads_k, d)."""
    _check_features(dropout_p, softcap, alibi_slopes)
    _check_tensor("q", q, 4)
    _check_tensor("kv", kv, 5)
    _check_same(("q", "kv"), (q, kv))
    if kv.shape[2] != 2:
        raise ValueError("kv must have shape (batch, seqlen_k, 2, nheads_k, headdim), got %s"
                         % (tuple(kv.shape),))
    _check_shapes(q, kv[:, :, 0], kv[:, :, 1], "kv", "kv")
    mask = _mask_for(causal, window_size, kv.shape[1])
    scale = _scale(softmax_scale, q.shape[-1])
    _check_cuda("q", q)
    kv = _prepare_packed(kv)
    q = _prepare(q)
    out, lse = _fn(2).apply(q, kv, scale, mask, bool(deterministic), bool(return_attn_probs),
                            _is_grad(q, kv))
    return _result(out, lse, return_attn_probs)


def _varlen_not_yet(name):
    raise NotImplementedError("fajit: %s (variable-length batches, cu_seqlens) is not in "
                              "libfajit's C API yet" % name)


def flash_attn_varlen_qkvpacked_func(qkv, cu_seqlens, max_seqlen, dropout_p=0.0,
                                     softmax_scale=None, causal=False, window_size=(-1, -1),
                                     softcap=0.0, alibi_slopes=None, deterministic=False,
                                     return_attn_probs=False):
    """flash_attn's varlen qkvpacked function; not implemented yet (raises)."""
    _varlen_not_yet("flash_attn_varlen_qkvpacked_func")


def flash_attn_varlen_kvpacked_func(q, kv, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                                    max_seqlen_k, dropout_p=0.0, softmax_scale=None,
                                    causal=False, window_size=(-1, -1), softcap=0.0,
                                    alibi_slopes=None, deterministic=False,
                                    return_attn_probs=False):
    """flash_attn's varlen kvpacked function; not implemented yet (raises)."""
    _varlen_not_yet("flash_attn_varlen_kvpacked_func")


def flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                           dropout_p=0.0, softmax_scale=None, causal=False,
                           window_size=(-1, -1), softcap=0.0, alibi_slopes=None,
                           deterministic=False, return_attn_probs=False, block_table=None):
    """flash_attn's varlen function; not implemented yet (raises)."""
    _varlen_not_yet("flash_attn_varlen_func")
