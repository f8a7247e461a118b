"""fajit: FlashAttention kernels generated, compiled and cached at run time (libfajit).

A drop-in for flash_attn 2.x's functions (``import fajit as flash_attn``):
flash_attn_func, flash_attn_qkvpacked_func, flash_attn_kvpacked_func and the
varlen ones, on torch tensors, with any head dim libfajit covers. A
framework-neutral entry on DLPack tensors is ``fajit.dlpack.attention`` (and
``fajit.dlpack.attention_backward``).

Pure Python over the C library through ctypes; libfajit.so is found on first
use (FAJIT_LIBRARY, next to this package, installed, or the build tree: see
fajit._lib). Errors of the library raise FajitError with its message.
"""

from ._lib import (
    FajitError,
    FajitLibraryError,
    compile_variant,
    has_backward,
    info,
    library_path,
    load,
    variant_complete,
    version,
)
from .interface import (
    flash_attn_func,
    flash_attn_kvpacked_func,
    flash_attn_qkvpacked_func,
    flash_attn_varlen_func,
    flash_attn_varlen_kvpacked_func,
    flash_attn_varlen_qkvpacked_func,
)

__version__ = "0.1.0"

__all__ = [
    "FajitError",
    "FajitLibraryError",
    "compile_variant",
    "flash_attn_func",
    "flash_attn_kvpacked_func",
    "flash_attn_qkvpacked_func",
    "flash_attn_varlen_func",
    "flash_attn_varlen_kvpacked_func",
    "flash_attn_varlen_qkvpacked_func",
    "has_backward",
    "info",
    "library_path",
    "load",
    "variant_complete",
    "version",
]
