"""A framework-neutral entry: attention on any DLPack tensors (CuPy, JAX, torch...).

    from fajit.dlpack import attention, attention_backward
    out, lse = attention(q, k, v, causal=True, return_lse=True)   # CuPy arrays, say
    dq, dk, dv = attention_backward(q, k, v, out, dout, lse, causal=True)

q (batch, seqlen_q, nheads_q, d), k (batch, seqlen_k, nheads_kv, d) and
v (batch, seqlen_k, nheads_kv, dv) are any objects with ``__dlpack__`` and
``__dlpack_device__``: on one CUDA device, fp16 or bf16, 4-D, the last
dimension contiguous (other strides are free). nheads_q must be a multiple of
nheads_kv (GQA/MQA). The softmax scale defaults to 1/sqrt(d).

Features, keyword arguments meaning what they mean in flash_attn_func:
causal (aligned to the bottom-right corner), window_size (left, right), -1
unbounded, softcap (scores -> softcap * tanh(scores / softcap)),
alibi_slopes (a DLPack fp32 tensor on the same device, (nheads_q,) or
(batch, nheads_q), heads contiguous, a batch stride of 0 or >= nheads_q;
bias -slope * |i + seqlen_k - seqlen_q - j|) and dropout_p. Dropout needs an
explicit ``dropout_seed`` (an int in [0, 2^64)) and optionally
``dropout_offset`` (default 0): the mask is a pure function of them (Philox,
see fajit.h), so the backward given the same seed and offset regenerates it
and nothing of size seqlen_q x seqlen_k is kept. No generator is drawn from
here: frameworks keep their own random state (JAX's keys, say).

Outputs: ``out=`` a DLPack tensor of shape (batch, seqlen_q, nheads_q, dv),
same dtype and device, written in place (it must be mutable: a CuPy or torch
array, not a JAX one); ``lse=`` an fp32 (batch, nheads_q, seqlen_q)
contiguous one receives the log-sum-exp the backward needs. attention()
returns out, or (out, lse) with ``return_lse=True``. An output not given is
allocated as a torch tensor, which needs PyTorch; other frameworks take it
with their ``from_dlpack`` (``cupy.from_dlpack(out)``) without a copy.

The backward: attention_backward(q, k, v, out, dout, lse, ...) with the
forward's inputs, output, LSE and features (same dropout_seed and
dropout_offset) and dout shaped like out returns (dq, dk, dv), written into
``dq=``, ``dk=``, ``dv=`` when given (shaped like q, k, v; dk and dv are
summed over the query heads sharing a kv head); ``deterministic=True`` asks
for bit-identical gradients run to run.

The stream: ``stream=`` the CUstream to queue the work on, as an int or as an
object with ``.ptr`` (CuPy) or ``.cuda_stream`` (torch); None is the legacy
default stream. Each input is asked for its capsule with that stream, so its
producer makes its pending writes visible on it first (the DLPack stream
protocol). The calls are asynchronous: keep the arrays alive until the stream
has run them, as with any kernel launch. They run in the calling thread's
current CUDA context, else the primary context of the tensors' device.

Varlen and autograd are the torch functions' (fajit.flash_attn_varlen_func,
fajit.flash_attn_func).
"""

import ctypes
import math

from . import _lib
from .interface import _mask_window

__all__ = ["attention", "attention_backward", "DLPackTensor", "parse"]

# DLDeviceType and DLDataTypeCode values of dlpack.h
KDL_CPU, KDL_CUDA, KDL_CUDA_HOST, KDL_CUDA_MANAGED = 1, 2, 3, 13
KDL_INT, KDL_UINT, KDL_FLOAT, KDL_BFLOAT = 0, 1, 2, 4
_DEVICE_NAMES = {1: "cpu", 2: "cuda", 3: "cuda_host", 4: "opencl", 7: "vulkan", 8: "metal",
                 10: "rocm", 13: "cuda_managed", 14: "oneapi"}
_CODE_NAMES = {KDL_INT: "int", KDL_UINT: "uint", KDL_FLOAT: "float", KDL_BFLOAT: "bfloat",
               5: "complex", 6: "bool"}


class _DLDevice(ctypes.Structure):
    _fields_ = [("device_type", ctypes.c_int32), ("device_id", ctypes.c_int32)]


class _DLDataType(ctypes.Structure):
    _fields_ = [("code", ctypes.c_uint8), ("bits", ctypes.c_uint8), ("lanes", ctypes.c_uint16)]


class _DLTensor(ctypes.Structure):
    _fields_ = [
        ("data", ctypes.c_void_p),
        ("device", _DLDevice),
        ("ndim", ctypes.c_int32),
        ("dtype", _DLDataType),
        ("shape", ctypes.POINTER(ctypes.c_int64)),
        ("strides", ctypes.POINTER(ctypes.c_int64)),
        ("byte_offset", ctypes.c_uint64),
    ]


class _DLManagedTensor(ctypes.Structure):
    _fields_ = [("dl_tensor", _DLTensor), ("manager_ctx", ctypes.c_void_p),
                ("deleter", ctypes.c_void_p)]


class _DLPackVersion(ctypes.Structure):
    _fields_ = [("major", ctypes.c_uint32), ("minor", ctypes.c_uint32)]


class _DLManagedTensorVersioned(ctypes.Structure):  # DLPack >= 1.0
    _fields_ = [("version", _DLPackVersion), ("manager_ctx", ctypes.c_void_p),
                ("deleter", ctypes.c_void_p), ("flags", ctypes.c_uint64),
                ("dl_tensor", _DLTensor)]


_FLAG_READ_ONLY = 1

_capsule_get_pointer = ctypes.pythonapi.PyCapsule_GetPointer
_capsule_get_pointer.restype = ctypes.c_void_p
_capsule_get_pointer.argtypes = [ctypes.py_object, ctypes.c_char_p]
_capsule_get_name = ctypes.pythonapi.PyCapsule_GetName
_capsule_get_name.restype = ctypes.c_char_p
_capsule_get_name.argtypes = [ctypes.py_object]


class DLPackTensor:
    """What a DLPack capsule describes: data pointer (byte_offset applied),
    device type and id, dtype (code, bits, lanes), shape and strides in
    elements (computed row-major when the producer gives none), read_only.

    It holds the capsule, which is not consumed: the capsule's destructor calls
    the producer's deleter when this object goes away, so the producer's
    memory stays valid at least as long as this object does."""

    def __init__(self, capsule, source):
        self._capsule = capsule
        self._source = source  # keeps the producer alive too
        name = _capsule_get_name(capsule)
        if name == b"dltensor":
            managed = _DLManagedTensor.from_address(_capsule_get_pointer(capsule, name))
            self.read_only = False
        elif name == b"dltensor_versioned":
            managed = _DLManagedTensorVersioned.from_address(_capsule_get_pointer(capsule, name))
            self.read_only = bool(managed.flags & _FLAG_READ_ONLY)
        else:
            raise ValueError("not an unused DLPack capsule (name %r)" % (name,))
        t = managed.dl_tensor
        self.device_type, self.device_id = t.device.device_type, t.device.device_id
        self.dtype = (t.dtype.code, t.dtype.bits, t.dtype.lanes)
        self.shape = tuple(t.shape[i] for i in range(t.ndim))
        if t.strides:
            self.strides = tuple(t.strides[i] for i in range(t.ndim))
        else:
            self.strides = _row_major(self.shape)
        self.data = (t.data or 0) + t.byte_offset

    @property
    def ndim(self):
        return len(self.shape)

    @property
    def device_name(self):
        return "%s:%d" % (_DEVICE_NAMES.get(self.device_type, "type%d" % self.device_type),
                          self.device_id)

    @property
    def dtype_name(self):
        code, bits, lanes = self.dtype
        text = "%s%d" % (_CODE_NAMES.get(code, "code%d" % code), bits)
        return text if lanes == 1 else "%sx%d" % (text, lanes)


def _row_major(shape):
    strides, acc = [], 1
    for n in reversed(shape):
        strides.append(acc)
        acc *= n
    return tuple(reversed(strides))


def _stream_handle(stream):
    if stream is None:
        return None
    for attr in ("cuda_stream", "ptr"):
        if hasattr(stream, attr):
            return int(getattr(stream, attr))
    return int(stream)


def parse(obj, name="tensor", stream=None):
    """Asks obj for its DLPack capsule and describes it (a DLPackTensor).

    stream: the consumer's CUstream handle (int) for a CUDA producer to order
    its work before (None: the legacy default stream); CPU producers are asked
    with no stream, as the protocol requires."""
    if not hasattr(obj, "__dlpack__") or not hasattr(obj, "__dlpack_device__"):
        raise TypeError("%s must support DLPack (__dlpack__ and __dlpack_device__), got %s"
                        % (name, type(obj).__name__))
    device_type, _ = obj.__dlpack_device__()
    if int(device_type) in (KDL_CUDA, KDL_CUDA_MANAGED):
        # 1 is the legacy default stream; 0 is not allowed by the protocol.
        capsule = obj.__dlpack__(stream=1 if not stream else stream)
    else:
        capsule = obj.__dlpack__()
    return DLPackTensor(capsule, obj)


def _validate(name, t, ndim=4):
    if t.device_type not in (KDL_CUDA, KDL_CUDA_MANAGED):
        raise ValueError("%s must be on a CUDA device, got %s" % (name, t.device_name))
    if t.dtype not in ((KDL_FLOAT, 16, 1), (KDL_BFLOAT, 16, 1)):
        raise TypeError("%s must be float16 or bfloat16, got %s" % (name, t.dtype_name))
    if t.ndim != ndim:
        raise ValueError("%s must have %d dimensions (batch, seqlen, nheads, headdim), got shape %s"
                         % (name, ndim, t.shape))
    if t.shape[-1] > 1 and t.strides[-1] != 1:
        raise ValueError("%s must have a contiguous last dimension, got strides %s"
                         % (name, t.strides))
    if t.strides[:3] == (0, 0, 0) and t.shape[0] * t.shape[1] * t.shape[2] > 1:
        raise ValueError("%s has batch, seq and head strides all 0 (broadcast); libfajit reads "
                         "that as contiguous: pass a real copy" % name)


def _same_device(name, t, q):
    if (t.device_type, t.device_id) != (q.device_type, q.device_id):
        raise ValueError("%s is on %s but q is on %s" % (name, t.device_name, q.device_name))


def _check_output(name, t, want, q):
    """A 16-bit output (out, dq, dk, dv): q's dtype and device, shape want, mutable."""
    _validate(name, t)
    if t.dtype != q.dtype:
        raise TypeError("%s is %s but q is %s: they must match" % (name, t.dtype_name, q.dtype_name))
    _same_device(name, t, q)
    if t.shape != want:
        raise ValueError("%s must have shape %s, got %s" % (name, want, t.shape))
    if t.read_only:
        raise ValueError("%s is read-only (its producer says so): pass a mutable array" % name)


def _check_lse(t, q, written):
    """An LSE: fp32 (batch, nheads_q, seqlen_q), contiguous (libfajit's layout)."""
    want = (q.shape[0], q.shape[2], q.shape[1])
    if t.device_type not in (KDL_CUDA, KDL_CUDA_MANAGED):
        raise ValueError("lse must be on a CUDA device, got %s" % t.device_name)
    if t.dtype != (KDL_FLOAT, 32, 1):
        raise TypeError("lse must be float32, got %s" % t.dtype_name)
    if t.shape != want:
        raise ValueError("lse must have shape (batch, nheads_q, seqlen_q) = %s, got %s"
                         % (want, t.shape))
    if any(n > 1 and s != r for n, s, r in zip(t.shape, t.strides, _row_major(t.shape))):
        raise ValueError("lse must be contiguous, got strides %s" % (t.strides,))
    _same_device("lse", t, q)
    if written and t.read_only:
        raise ValueError("lse is read-only (its producer says so): pass a mutable array")


def _check_consistent(q, k, v):
    b, sq, hq, d = q.shape
    if k.shape[0] != b or v.shape[:3] != k.shape[:3] or k.shape[3] != d:
        raise ValueError("shapes do not fit: q %s, k %s, v %s (k must be (batch, seqlen_k, "
                         "nheads_kv, d), v (batch, seqlen_k, nheads_kv, dv))"
                         % (q.shape, k.shape, v.shape))
    if k.shape[2] == 0 or hq % k.shape[2] != 0:
        raise ValueError("nheads of q (%d) must be a multiple of nheads of k (%d)"
                         % (hq, k.shape[2]))
    for name, t in (("k", k), ("v", v)):
        if t.dtype != q.dtype:
            raise TypeError("%s is %s but q is %s: they must match" % (name, t.dtype_name,
                                                                      q.dtype_name))
        _same_device(name, t, q)


def _check_nonempty(q, k):
    if q.shape[0] * q.shape[1] * q.shape[2] == 0 or k.shape[1] == 0:
        raise ValueError("empty q or k (shapes %s, %s): nothing libfajit can compute here"
                         % (q.shape, k.shape))


def _torch_empty(shape, q, handle, dtype=None, what="out"):
    """A torch tensor for an output the caller did not give."""
    try:
        import torch
    except ImportError:
        raise ValueError("%s not given: it would be allocated with PyTorch, which is not "
                         "installed: pass %s= (a DLPack array of shape %s)"
                         % (what, what, tuple(shape))) from None
    if dtype is None:
        dtype = torch.float16 if q.dtype[0] == KDL_FLOAT else torch.bfloat16
    with torch.cuda.device(q.device_id):
        # Allocated on the stream the kernel writes it on, so torch's caching
        # allocator never hands the memory out again before that work is done.
        s = torch.cuda.ExternalStream(handle) if handle else torch.cuda.default_stream()
        with torch.cuda.stream(s):
            return torch.empty(tuple(shape), dtype=dtype, device="cuda:%d" % q.device_id)


def _output(obj, name, shape, q, handle, check, dtype=None):
    """(the object, its DLPackTensor) for an output: obj checked by check, or
    a new torch tensor."""
    if obj is None:
        obj = _torch_empty(shape, q, handle, dtype, name)
        return obj, parse(obj, name, handle)
    t = parse(obj, name, handle)
    check(t)
    return obj, t


# ---------------------------------------------------------------- features

class _Features:
    """The feature keywords, checked once, written into either args struct."""

    def __init__(self, q, causal, window_size, softcap, alibi_slopes, dropout_p, dropout_seed,
                 dropout_offset, handle):
        b, sq, hq, _ = q.shape
        self.dropout_p = float(dropout_p)
        if not 0.0 <= self.dropout_p < 1.0:
            raise ValueError("dropout_p must be in [0, 1), got %r" % (dropout_p,))
        self.seed, self.offset = _dropout_ints(self.dropout_p, dropout_seed, dropout_offset)
        self.softcap = float(softcap)
        if not (math.isfinite(self.softcap) and self.softcap >= 0.0):
            raise ValueError("softcap must be a finite number >= 0 (0: off), got %r" % (softcap,))
        self.seqlen_k = None
        self.causal, self.window_size = causal, window_size
        self.mask = self.left = self.right = None
        self.alibi, self.alibi_batch_stride = None, 0
        if alibi_slopes is not None:
            self.alibi = parse(alibi_slopes, "alibi_slopes", handle)
            self.alibi_batch_stride = _check_alibi(self.alibi, q)

    def set_seqlen_k(self, seqlen_k):
        """The window as libfajit takes it (flash_attn's mapping, interface._mask_window)."""
        self.mask, self.left, self.right = _mask_window(self.causal, self.window_size, seqlen_k)

    def fill(self, a):
        a.mask = self.mask
        a.window_left, a.window_right = self.left, self.right
        a.softcap = self.softcap
        if self.alibi is not None:
            a.alibi_slopes, a.alibi_batch_stride = self.alibi.data, self.alibi_batch_stride
        if self.dropout_p > 0.0:
            a.dropout_p, a.dropout_seed, a.dropout_offset = self.dropout_p, self.seed, self.offset


def _dropout_ints(p, seed, offset):
    def u64(name, value):
        try:
            n = int(value)
        except (TypeError, ValueError):
            raise TypeError("%s must be an int, got %s" % (name, type(value).__name__)) from None
        if n != value or not 0 <= n < 2 ** 64:
            raise ValueError("%s must be an integer in [0, 2^64), got %r" % (name, value))
        return n
    if p == 0.0:
        return 0, 0
    if seed is None:
        raise ValueError("dropout_p > 0 needs dropout_seed= (an int in [0, 2^64)): the mask is "
                         "a function of the seed and offset, and the backward must be given the "
                         "same ones")
    return u64("dropout_seed", seed), u64("dropout_offset", offset)


def _check_alibi(t, q):
    """ALiBi slopes: fp32, (nheads_q,) or (batch, nheads_q), heads contiguous; returns
    the batch stride libfajit takes (0: shared by every batch)."""
    b, _, hq, _ = q.shape
    if t.device_type not in (KDL_CUDA, KDL_CUDA_MANAGED):
        raise ValueError("alibi_slopes must be on a CUDA device, got %s" % t.device_name)
    if t.dtype != (KDL_FLOAT, 32, 1):
        raise TypeError("alibi_slopes must be float32, got %s" % t.dtype_name)
    if t.shape not in ((hq,), (b, hq)):
        raise ValueError("alibi_slopes must have shape (nheads_q,) = (%d,) or (batch, nheads_q) = "
                         "(%d, %d), got %s" % (hq, b, hq, t.shape))
    _same_device("alibi_slopes", t, q)
    if hq > 1 and t.strides[-1] != 1:
        raise ValueError("alibi_slopes must have contiguous heads, got strides %s" % (t.strides,))
    if t.ndim == 1 or b == 1:
        return 0
    if 0 < t.strides[0] < hq or t.strides[0] < 0:
        raise ValueError("alibi_slopes: batch stride %d must be 0 (shared) or >= nheads_q (%d): "
                         "pass a contiguous copy" % (t.strides[0], hq))
    return t.strides[0]


def _scale(softmax_scale, d):
    scale = d ** -0.5 if softmax_scale is None else float(softmax_scale)
    if scale == 0.0 or not math.isfinite(scale):
        raise ValueError("softmax_scale must be a finite nonzero number, got %r" % (softmax_scale,))
    return scale


def _dtype_code(q):
    return _lib.DTYPE_FP16 if q.dtype[0] == KDL_FLOAT else _lib.DTYPE_BF16


def _parse_inputs(names, objs, handle):
    ts = [parse(o, n, handle) for n, o in zip(names, objs)]
    for n, t in zip(names, ts):
        _validate(n, t)
    return ts


def _fill_shape(a, q, k, v):
    a.batch, a.seqlen_q, a.nheads_q, a.dqk = q.shape
    a.seqlen_k, a.nheads_kv, a.dv = k.shape[1], k.shape[2], v.shape[3]
    a.q_stride, a.k_stride, a.v_stride = q.strides[:3], k.strides[:3], v.strides[:3]
    a.dtype = _dtype_code(q)


# ---------------------------------------------------------------- the calls

def attention(q, k, v, *, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1),
              softcap=0.0, alibi_slopes=None, dropout_seed=None, dropout_offset=0, out=None,
              lse=None, return_lse=False, stream=None):
    """Attention on DLPack tensors; returns out, or (out, lse) with return_lse.

    See the module's documentation for the layouts, the features, the outputs
    and the stream."""
    handle = _stream_handle(stream)
    tq, tk, tv = _parse_inputs(("q", "k", "v"), (q, k, v), handle)
    _check_consistent(tq, tk, tv)
    feat = _Features(tq, causal, window_size, softcap, alibi_slopes, dropout_p, dropout_seed,
                     dropout_offset, handle)
    feat.set_seqlen_k(tk.shape[1])
    scale = _scale(softmax_scale, tq.shape[3])
    b, sq, hq, _ = tq.shape
    out, tout = _output(out, "out", (b, sq, hq, tv.shape[3]), tq, handle,
                        lambda t: _check_output("out", t, (b, sq, hq, tv.shape[3]), tq))
    tlse = None
    if lse is not None or return_lse:
        lse, tlse = _output(lse, "lse", (b, hq, sq), tq, handle, lambda t: _check_lse(t, tq, True),
                            dtype=_torch_float32())
    _check_nonempty(tq, tk)
    loaded = _lib.load()
    a = loaded.new_args(_lib.AttnArgs, "fajit_attn_args_init")
    a.q, a.k, a.v, a.o = tq.data, tk.data, tv.data, tout.data
    a.lse = tlse.data if tlse is not None else None
    _fill_shape(a, tq, tk, tv)
    a.o_stride = tout.strides[:3]
    a.softmax_scale = scale
    feat.fill(a)
    rc = loaded.lib.fajit_attn_fwd(_lib.context(tq.device_id), ctypes.byref(a),
                                   ctypes.c_void_p(handle))
    _lib.check(rc, "fajit_attn_fwd")
    return (out, lse) if return_lse else out


def _torch_float32():
    """torch.float32 when an LSE must be allocated (None lets _torch_empty say torch is missing)."""
    try:
        import torch
    except ImportError:
        return None
    return torch.float32


def attention_backward(q, k, v, out, dout, lse, *, dropout_p=0.0, softmax_scale=None,
                       causal=False, window_size=(-1, -1), softcap=0.0, alibi_slopes=None,
                       dropout_seed=None, dropout_offset=0, deterministic=False, dq=None, dk=None,
                       dv=None, stream=None):
    """Gradients (dq, dk, dv) of attention() from dout, on DLPack tensors.

    q, k, v, out and lse are the forward's (lse as attention(..., return_lse=True)
    gives it), with the same features and softmax_scale (and dropout_seed and
    dropout_offset: the mask is regenerated from them). dout is shaped like out.
    dq, dk, dv (shaped like q, k, v) are written when given, else allocated
    with torch. See the module's documentation."""
    handle = _stream_handle(stream)
    tq, tk, tv, tout, tdout = _parse_inputs(("q", "k", "v", "out", "dout"),
                                            (q, k, v, out, dout), handle)
    _check_consistent(tq, tk, tv)
    b, sq, hq, _ = tq.shape
    want_out = (b, sq, hq, tv.shape[3])
    for name, t in (("out", tout), ("dout", tdout)):
        if t.dtype != tq.dtype:
            raise TypeError("%s is %s but q is %s: they must match"
                            % (name, t.dtype_name, tq.dtype_name))
        _same_device(name, t, tq)
        if t.shape != want_out:
            raise ValueError("%s must have shape %s, got %s" % (name, want_out, t.shape))
    tlse = parse(lse, "lse", handle)
    _check_lse(tlse, tq, False)
    feat = _Features(tq, causal, window_size, softcap, alibi_slopes, dropout_p, dropout_seed,
                     dropout_offset, handle)
    feat.set_seqlen_k(tk.shape[1])
    scale = _scale(softmax_scale, tq.shape[3])
    grads = []
    for name, obj, like in (("dq", dq, tq), ("dk", dk, tk), ("dv", dv, tv)):
        grads.append(_output(obj, name, like.shape, tq, handle,
                             lambda t, n=name, s=like.shape: _check_output(n, t, s, tq)))
    _check_nonempty(tq, tk)
    loaded = _lib.load()
    if not loaded.has_backward:
        raise NotImplementedError("fajit backward: not in this libfajit build (%s, version %s "
                                  "has no fajit_attn_bwd)" % (loaded.path, loaded.version))
    a = loaded.new_args(_lib.AttnBwdArgs, "fajit_attn_bwd_args_init")
    a.q, a.k, a.v, a.o = tq.data, tk.data, tv.data, tout.data
    a.grad_out, a.lse = tdout.data, tlse.data
    (_, tdq), (_, tdk), (_, tdv) = grads
    a.grad_q, a.grad_k, a.grad_v = tdq.data, tdk.data, tdv.data
    _fill_shape(a, tq, tk, tv)
    a.o_stride, a.grad_out_stride = tout.strides[:3], tdout.strides[:3]
    a.grad_q_stride, a.grad_k_stride, a.grad_v_stride = (tdq.strides[:3], tdk.strides[:3],
                                                         tdv.strides[:3])
    a.softmax_scale = scale
    a.deterministic = 1 if deterministic else 0
    feat.fill(a)
    rc = loaded.lib.fajit_attn_bwd(_lib.context(tq.device_id), ctypes.byref(a),
                                   ctypes.c_void_p(handle))
    _lib.check(rc, "fajit_attn_bwd")
    return tuple(g for g, _ in grads)
