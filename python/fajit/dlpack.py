"""A framework-neutral entry: attention on any DLPack tensors (CuPy, JAX, torch...).

    from fajit.dlpack import attention
    out = attention(q, k, v, causal=True)            # q, k, v: CuPy arrays, say

q (batch, seqlen_q, nheads_q, d), k (batch, seqlen_k, nheads_kv, d) and
v (batch, seqlen_k, nheads_kv, dv) are any objects with ``__dlpack__`` and
``__dlpack_device__``: on one CUDA device, fp16 or bf16, 4-D, the last
dimension contiguous (other strides are free). nheads_q must be a multiple of
nheads_kv (GQA/MQA). causal is aligned to the bottom-right corner; the
softmax scale defaults to 1/sqrt(d).

The output: ``out=`` a DLPack tensor of shape (batch, seqlen_q, nheads_q, dv),
same dtype and device, written in place (it must be mutable: a CuPy or torch
array, not a JAX one). Without ``out=`` a torch tensor is allocated and
returned, which needs PyTorch; other frameworks take it with their
``from_dlpack`` (``cupy.from_dlpack(out)``) without a copy.

The stream: ``stream=`` the CUstream to queue the work on, as an int or as an
object with ``.ptr`` (CuPy) or ``.cuda_stream`` (torch); None is the legacy
default stream. Each input is asked for its capsule with that stream, so its
producer makes its pending writes visible on it first (the DLPack stream
protocol). The call is asynchronous: keep the arrays alive until the stream
has run it, as with any kernel launch. It runs in the calling thread's current
CUDA context, else the primary context of the tensors' device.

Forward only; for autograd use the torch functions (fajit.flash_attn_func).
"""

import ctypes
import math

from . import _lib

__all__ = ["attention", "DLPackTensor", "parse"]

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


def _check_consistent(q, k, v, out):
    b, sq, hq, d = q.shape
    if k.shape[0] != b or v.shape[:3] != k.shape[:3] or k.shape[3] != d:
        raise ValueError("shapes do not fit: q %s, k %s, v %s (k must be (batch, seqlen_k, "
                         "nheads_kv, d), v (batch, seqlen_k, nheads_kv, dv))"
                         % (q.shape, k.shape, v.shape))
    if k.shape[2] == 0 or hq % k.shape[2] != 0:
        raise ValueError("nheads of q (%d) must be a multiple of nheads of k (%d)"
                         % (hq, k.shape[2]))
    for name, t in (("k", k), ("v", v)) + ((("out", out),) if out is not None else ()):
        if t.dtype != q.dtype:
            raise TypeError("%s is %s but q is %s: they must match" % (name, t.dtype_name,
                                                                      q.dtype_name))
        if (t.device_type, t.device_id) != (q.device_type, q.device_id):
            raise ValueError("%s is on %s but q is on %s" % (name, t.device_name, q.device_name))
    if out is not None:
        want = (b, sq, hq, v.shape[3])
        if out.shape != want:
            raise ValueError("out must have shape %s, got %s" % (want, out.shape))
        if out.read_only:
            raise ValueError("out is read-only (its producer says so): pass a mutable array")


def _torch_out(q, dv, handle):
    try:
        import torch
    except ImportError:
        raise ValueError("attention() without out= allocates the output with PyTorch, which is "
                         "not installed: pass out= (a DLPack array of shape (batch, seqlen_q, "
                         "nheads_q, dv))") from None
    dtype = torch.float16 if q.dtype[0] == KDL_FLOAT else torch.bfloat16
    b, sq, hq, _ = q.shape
    with torch.cuda.device(q.device_id):
        # Allocated on the stream the kernel writes it on, so torch's caching
        # allocator never hands the memory out again before that work is done.
        s = torch.cuda.ExternalStream(handle) if handle else torch.cuda.default_stream()
        with torch.cuda.stream(s):
            return torch.empty((b, sq, hq, dv), dtype=dtype, device="cuda:%d" % q.device_id)


def _fill_args(loaded, q, k, v, o, causal, softmax_scale):
    a = loaded.new_args(_lib.AttnArgs, "fajit_attn_args_init")
    a.q, a.k, a.v, a.o = q.data, k.data, v.data, o.data
    a.batch, a.seqlen_q, a.nheads_q, a.dqk = q.shape
    a.seqlen_k, a.nheads_kv, a.dv = k.shape[1], k.shape[2], v.shape[3]
    a.q_stride, a.k_stride = q.strides[:3], k.strides[:3]
    a.v_stride, a.o_stride = v.strides[:3], o.strides[:3]
    a.dtype = _lib.DTYPE_FP16 if q.dtype[0] == KDL_FLOAT else _lib.DTYPE_BF16
    a.mask = _lib.MASK_CAUSAL if causal else _lib.MASK_NONE
    a.softmax_scale = softmax_scale
    return a


def attention(q, k, v, *, causal=False, softmax_scale=None, out=None, stream=None):
    """Attention on DLPack tensors; returns out (the given one, or a new torch tensor).

    See the module's documentation for the layouts, the stream and the output."""
    handle = _stream_handle(stream)
    tq, tk, tv = parse(q, "q", handle), parse(k, "k", handle), parse(v, "v", handle)
    for name, t in (("q", tq), ("k", tk), ("v", tv)):
        _validate(name, t)
    tout = None
    if out is not None:
        tout = parse(out, "out", handle)
        _validate("out", tout)
    _check_consistent(tq, tk, tv, tout)
    scale = tq.shape[3] ** -0.5 if softmax_scale is None else float(softmax_scale)
    if scale == 0.0 or not math.isfinite(scale):
        raise ValueError("softmax_scale must be a finite nonzero number, got %r" % (softmax_scale,))
    if out is None:
        out = _torch_out(tq, tv.shape[3], handle)
        tout = parse(out, "out", handle)
    if tq.shape[0] * tq.shape[1] * tq.shape[2] == 0 or tk.shape[1] == 0:
        raise ValueError("empty q or k (shapes %s, %s): nothing libfajit can compute here"
                         % (tq.shape, tk.shape))
    loaded = _lib.load()
    a = _fill_args(loaded, tq, tk, tv, tout, causal, scale)
    rc = loaded.lib.fajit_attn_fwd(_lib.context(tq.device_id), ctypes.byref(a),
                                   ctypes.c_void_p(handle))
    _lib.check(rc, "fajit_attn_fwd")
    return out
