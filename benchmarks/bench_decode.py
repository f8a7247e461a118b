#!/usr/bin/env python3
"""benchmarks/bench_decode.py - decode attention (one query row over a long KV
cache) speed: fajit against PyTorch SDPA, as memory bandwidth.

Decode reads the whole K and V cache once for a handful of query rows, so its
speed is bytes over time: K and V read once, plus Q read and O written, divided
by the kernel time, printed as GB/s and as a fraction of the card's copy rate
(measured here with a device-to-device copy, read + write, and against the
3.0 TB/s the issue quotes for the H100). fajit splits the keys over blocks
(split-KV, flash-decoding) and packs the query heads that share a kv head into
one block's rows when the plain grid would leave SMs idle.

Grid: seqlen_q = 1, seqlen_k 4k, 16k, 64k, 128k, 32 query heads over 8 kv heads
(GQA 4:1), d = 128, bf16, batch 1 and 8. Peers: SDPA's FlashAttention-2 and
cuDNN backends (enable_gqa, so they read the cache once too), in the same
process. Timing: triton.testing.do_bench (median; it clears the L2 between
runs, so the cache comes from HBM), CUDA events if Triton is missing; the
"clean L2" columns time fajit and cuDNN again with the L2 emptied by a read
instead of do_bench's write (see bench_clean_l2). Each fajit output is
compared with an fp32 reference (max abs difference).

fajit is called through the fajit package's own binding (python/fajit), as
benchmarks/bench_fwd.py does.

Usage: python3 benchmarks/bench_decode.py [--lib build/libfajit.so]
           [--seqlens 4096,16384,65536,131072] [--batches 1,8] [--causal]
"""
import argparse
import ctypes
import os
import sys

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

try:
    import triton.testing

    def bench(fn):
        return triton.testing.do_bench(fn, return_mode="median")
except ImportError:  # pragma: no cover - the GPU host has Triton
    def bench(fn, reps=100):
        flush = torch.empty(256 << 20, dtype=torch.int8, device="cuda")
        for _ in range(5):
            fn()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        times = []
        for _ in range(reps):
            flush.zero_()
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        return sorted(times)[len(times) // 2]


def bench_clean_l2(fn, reps=100):
    """Median time with the L2 emptied by a read before each run. do_bench
    empties it by zeroing 256 MB, which leaves ~50 MB of dirty lines that the
    timed kernel's reads must write back first (~17 us at 3 TB/s, the same for
    every kernel timed): this column shows the kernels without that."""
    flush = torch.ones(64 << 20, dtype=torch.float32, device="cuda")
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)]
    fn()
    for start, end in events:
        flush.sum()
        start.record()
        fn()
        end.record()
    torch.cuda.synchronize()
    return sorted(s.elapsed_time(e) for s, e in events)[reps // 2]


H100_COPY_GBS = 3000.0  # the issue's figure for the H100's copy rate (read + write)
DTYPES = {torch.float16: 0, torch.bfloat16: 1}


class Fajit:
    """The library through python/fajit's binding (struct mirrors checked at load)."""

    def __init__(self, path):
        os.environ["FAJIT_LIBRARY"] = os.path.abspath(path)
        sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "python"))
        from fajit import _lib
        self._lib = _lib
        self.loaded = _lib.load()
        self.lib = self.loaded.lib
        self.ctx = ctypes.c_void_p(_lib.context(torch.cuda.current_device()))

    def args(self, q, k, v, o, causal):
        """(b, s, h, d) tensors, any strides with a contiguous last dim."""
        a = self.loaded.new_args(self._lib.AttnArgs, "fajit_attn_args_init")
        a.q, a.k, a.v, a.o = q.data_ptr(), k.data_ptr(), v.data_ptr(), o.data_ptr()
        a.batch, a.seqlen_q, a.nheads_q, a.dqk = q.shape
        a.seqlen_k, a.nheads_kv, a.dv = k.shape[1], k.shape[2], v.shape[3]
        for name, t in (("q_stride", q), ("k_stride", k), ("v_stride", v), ("o_stride", o)):
            getattr(a, name)[:] = t.stride()[:3]
        a.dtype = DTYPES[q.dtype]
        a.mask = 1 if causal else 0
        return a

    def variant(self, a):
        buf = ctypes.create_string_buffer(512)
        self._lib.check(self.lib.fajit_attn_variant(self.ctx, ctypes.byref(a), buf, 512), "fajit_attn_variant")
        return buf.value.decode()

    def runner(self, a, workspace=True):
        """The call, with the workspace it needs (split-KV partials) lent once,
        as an engine keeps one for its decode steps (workspace=False: none, so
        the library takes scratch from its pool each call)."""
        stream = ctypes.c_void_p(torch.cuda.current_stream().cuda_stream)
        need = ctypes.c_size_t(0)
        if workspace:
            self._lib.check(self.lib.fajit_attn_fwd_workspace_size(self.ctx, ctypes.byref(a), ctypes.byref(need)),
                            "fajit_attn_fwd_workspace_size")
        ws = torch.empty(need.value, dtype=torch.uint8, device="cuda") if need.value else None
        if ws is not None:
            a.workspace, a.workspace_bytes = ws.data_ptr(), need.value
        ref, fwd, ctx = ctypes.byref(a), self.lib.fajit_attn_fwd, self.ctx

        def run(ws=ws):  # (holds the workspace as long as the runner lives)
            rc = fwd(ctx, ref, stream)
            if rc < 0:
                self._lib.check(rc, "fajit_attn_fwd")
        return run


def sdpa(backend, q, k, v, causal):
    qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)

    def run():
        with sdpa_kernel(backend):
            return F.scaled_dot_product_attention(qt, kt, vt, is_causal=causal, enable_gqa=True)
    return run


def reference(q, k, v):
    """fp32 attention of one query row per head over every key (a causal mask
    aligned bottom-right hides none of them), GQA without copying K and V."""
    b, _, hq, d = q.shape
    hkv = k.shape[2]
    qf = q[:, 0].float().view(b, hkv, hq // hkv, d)
    kf, vf = k.float().transpose(1, 2), v.float().transpose(1, 2)
    p = torch.softmax(torch.einsum("bhgd,bhkd->bhgk", qf, kf) / d ** 0.5, dim=-1)
    return torch.einsum("bhgk,bhkd->bhgd", p, vf).reshape(b, 1, hq, d)


def copy_rate_gbs():
    """Device-to-device copy of 1 GiB, read + write bytes over time."""
    src = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    ms = bench(lambda: dst.copy_(src))
    return 2 * src.numel() / (ms * 1e-3) / 1e9


PEERS = [("fa2", SDPBackend.FLASH_ATTENTION), ("cudnn", SDPBackend.CUDNN_ATTENTION)]


def one(fj, b, sk, hq, hkv, d, causal, dtype=torch.bfloat16):
    torch.manual_seed(0)
    q = torch.randn(b, 1, hq, d, device="cuda", dtype=dtype)
    k = torch.randn(b, sk, hkv, d, device="cuda", dtype=dtype)
    v = torch.randn(b, sk, hkv, d, device="cuda", dtype=dtype)
    o = torch.empty_like(q)
    nbytes = (2 * k.numel() + 2 * q.numel()) * k.element_size()  # K, V once; Q in, O out
    row = {"b": b, "sk": sk, "bytes": nbytes}
    a = fj.args(q, k, v, o, causal)
    run = fj.runner(a)
    run()
    torch.cuda.synchronize()
    row["variant"] = fj.variant(a)
    ms = bench(run)
    row["fajit"] = (ms * 1e3, nbytes / (ms * 1e-3) / 1e9)
    ms = bench_clean_l2(run)
    row["fajit_clean"] = (ms * 1e3, nbytes / (ms * 1e-3) / 1e9)
    row["maxdiff"] = (o.float() - reference(q, k, v)).abs().max().item()
    for name, backend in PEERS:
        try:
            fn = sdpa(backend, q, k, v, causal)
            fn()
            torch.cuda.synchronize()
            ms = bench(fn)
            row[name] = (ms * 1e3, nbytes / (ms * 1e-3) / 1e9)
            if name == "cudnn":
                ms = bench_clean_l2(fn)
                row["cudnn_clean"] = (ms * 1e3, nbytes / (ms * 1e-3) / 1e9)
        except RuntimeError as e:  # the backend does not take the shape
            row[name] = None
            row.setdefault("notes", []).append(f"{name}: {str(e).splitlines()[0][:60]}")
    del q, k, v, o
    return row


def cell(x, copy):
    if x is None:
        return f"{'-':>8} {'-':>7} {'-':>5}"
    us, gbs = x
    return f"{us:8.1f} {gbs:7.0f} {100 * gbs / copy:4.0f}%"


def clean(x):
    return f"{'-':>8} {'-':>5}" if x is None else f"{x[0]:8.1f} {100 * x[1] / H100_COPY_GBS:4.0f}%"


def main():
    here = os.path.dirname(os.path.abspath(__file__))
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lib", default=os.environ.get("FAJIT_LIB", os.path.join(here, "..", "build", "libfajit.so")))
    ap.add_argument("--seqlens", default="4096,16384,65536,131072")
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--heads", default="32,8", help="query heads, kv heads")
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--causal", action="store_true", help="causal mask (bottom-right: every key visible)")
    args = ap.parse_args()
    fj = Fajit(args.lib)
    hq, hkv = (int(x) for x in args.heads.split(","))
    copy = copy_rate_gbs()
    print(f"GPU {torch.cuda.get_device_name()}, torch {torch.__version__}, cuDNN {torch.backends.cudnn.version()}")
    print(f"decode: seqlen_q 1, {hq} query / {hkv} kv heads, d {args.dim}, bf16{', causal' if args.causal else ''}; "
          f"bytes = K + V once + Q + O")
    print(f"measured copy rate {copy:.0f} GB/s (read + write); % columns are of {H100_COPY_GBS:.0f} GB/s "
          f"(the issue's H100 figure); target fajit >= 85%")
    print(f"{'b':>3} {'seqlen_k':>8} {'MB':>7} | {'fajit us':>8} {'GB/s':>7} {'%':>5} | {'fa2 us':>8} {'GB/s':>7} "
          f"{'%':>5} | {'cudnn us':>8} {'GB/s':>7} {'%':>5} | {'/fa2':>5} {'/cudnn':>6} | clean L2: {'fajit us':>8} "
          f"{'%':>5} {'cudnn us':>8} {'%':>5} |  maxdiff  tiles")
    for b in (int(x) for x in args.batches.split(",")):
        for sk in (int(x) for x in args.seqlens.split(",")):
            r = one(fj, b, sk, hq, hkv, args.dim, args.causal)
            ratio = lambda p: "  -  " if r[p] is None else f"{r[p][0] / r['fajit'][0]:5.2f}"
            tiles = r["variant"].split(" bm=")[-1] if " bm=" in r["variant"] else r["variant"]
            print(f"{b:3d} {sk:8d} {r['bytes'] / 1e6:7.1f} | {cell(r['fajit'], H100_COPY_GBS)} | "
                  f"{cell(r['fa2'], H100_COPY_GBS)} | {cell(r['cudnn'], H100_COPY_GBS)} | "
                  f"{ratio('fa2')} {ratio('cudnn'):>6} | {clean(r.get('fajit_clean'))} {clean(r.get('cudnn_clean'))} "
                  f"|  {r['maxdiff']:.1e}  {r['variant'][:3]} {tiles}"
                  f"{'  ' + '; '.join(r['notes']) if 'notes' in r else ''}", flush=True)


if __name__ == "__main__":
    main()
