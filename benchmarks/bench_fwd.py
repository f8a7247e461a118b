#!/usr/bin/env python3
"""benchmarks/bench_fwd.py - forward attention speed: fajit against PyTorch SDPA.

fajit is called through ctypes on the built libfajit.so (fajit_attn_args is
mirrored below field by field from include/fajit.h); the peers are
torch.nn.functional.scaled_dot_product_attention under the FlashAttention-2,
cuDNN and memory-efficient backends, in the same process. Each is timed with
triton.testing.do_bench(return_mode="median") (CUDA events if Triton is
missing). FLOPs as FlashAttention counts them: 4 * b * h * sq * sk * d, halved
for causal.

Grids: FlashAttention's (hidden 2048, d 64/128/256, seqlen 512..16k,
batch * seqlen = 16k, causal and not, fp16 and bf16), then odd head dims
72/80/100/160/200 at seqlen 4k in bf16. Each fajit result is also compared with
the FlashAttention-2 backend's output (max abs difference, printed).

With --bwd, the backward instead, on FlashAttention's grid: fajit_attn_bwd
alone (O and LSE from one fajit forward, a random dO), both with
deterministic = 0 (dQ by fp32 atomics) and 1 (no atomics), against the
backward of SDPA's FlashAttention-2 and cuDNN backends alone (one forward with
requires_grad, then torch.autograd.grad(out, (q, k, v), dout,
retain_graph=True) timed under the backend's context). FLOPs 2.5 times the
forward's. fajit's dq/dk/dv are compared with FlashAttention-2's (max abs
difference, printed). The backward kernels are compiled up front on several
threads (fajit_compile), so a cold cache costs the longest compile, not the sum.

Usage: python3 benchmarks/bench_fwd.py [--lib build/libfajit.so] [--quick] [--bwd]
"""
import argparse
import concurrent.futures
import ctypes
import math
import os
import sys
import time

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

try:
    import triton.testing

    def bench(fn):
        return triton.testing.do_bench(fn, return_mode="median")
except ImportError:  # pragma: no cover - the GPU host has Triton
    def bench(fn, reps=50):
        for _ in range(5):
            fn()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        times = []
        for _ in range(reps):
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        return sorted(times)[len(times) // 2]


DTYPES = {torch.float16: 0, torch.bfloat16: 1}
MASK_NONE, MASK_CAUSAL = 0, 1


class Fajit:
    """The library through the fajit package's own binding (python/fajit), so
    the struct mirrors live in one place and are checked against the library."""

    def __init__(self, path):
        os.environ["FAJIT_LIBRARY"] = os.path.abspath(path)
        sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "python"))
        from fajit import _lib
        self._lib = _lib
        self.loaded = _lib.load()
        self.lib = self.loaded.lib
        self.ctx = ctypes.c_void_p(_lib.context(torch.cuda.current_device()))

    def check(self, rc, what):
        return self._lib.check(rc, what)

    def args(self, q, k, v, o, causal, lse=None):
        """(b, s, h, d) tensors, any strides with a contiguous last dim; lse
        (b, h, s) fp32 or None."""
        a = self.loaded.new_args(self._lib.AttnArgs, "fajit_attn_args_init")
        a.q, a.k, a.v, a.o = q.data_ptr(), k.data_ptr(), v.data_ptr(), o.data_ptr()
        if lse is not None:
            a.lse = lse.data_ptr()
        a.batch, a.seqlen_q, a.nheads_q, a.dqk = q.shape
        a.seqlen_k, a.nheads_kv, a.dv = k.shape[1], k.shape[2], v.shape[3]
        for name, t in (("q_stride", q), ("k_stride", k), ("v_stride", v), ("o_stride", o)):
            getattr(a, name)[:] = t.stride()[:3]
        a.dtype = DTYPES[q.dtype]
        a.mask = MASK_CAUSAL if causal else MASK_NONE
        return a

    def variant(self, a):
        buf = ctypes.create_string_buffer(512)
        self.check(self.lib.fajit_attn_variant(self.ctx, ctypes.byref(a), buf, 512), "fajit_attn_variant")
        return buf.value.decode()

    def runner(self, a):
        stream = ctypes.c_void_p(torch.cuda.current_stream().cuda_stream)
        ref = ctypes.byref(a)
        fwd, ctx = self.lib.fajit_attn_fwd, self.ctx

        def run():
            rc = fwd(ctx, ref, stream)
            if rc < 0:
                self.check(rc, "fajit_attn_fwd")
        return run

    def bwd_args(self, t, causal, deterministic):
        """fajit_attn_bwd_args over the dict t of (b, s, h, d) tensors q k v o
        dout dq dk dv and the (b, h, s) lse, as python/fajit/interface.py fills it."""
        a = self.loaded.new_args(self._lib.AttnBwdArgs, "fajit_attn_bwd_args_init")
        q, k, v = t["q"], t["k"], t["v"]
        a.q, a.k, a.v, a.o = q.data_ptr(), k.data_ptr(), v.data_ptr(), t["o"].data_ptr()
        a.grad_out, a.lse = t["dout"].data_ptr(), t["lse"].data_ptr()
        a.grad_q, a.grad_k, a.grad_v = t["dq"].data_ptr(), t["dk"].data_ptr(), t["dv"].data_ptr()
        a.batch, a.seqlen_q, a.nheads_q, a.dqk = q.shape
        a.seqlen_k, a.nheads_kv, a.dv = k.shape[1], k.shape[2], v.shape[3]
        for name, key in (("q_stride", "q"), ("k_stride", "k"), ("v_stride", "v"), ("o_stride", "o"),
                          ("grad_out_stride", "dout"), ("grad_q_stride", "dq"),
                          ("grad_k_stride", "dk"), ("grad_v_stride", "dv")):
            getattr(a, name)[:] = t[key].stride()[:3]
        a.dtype = DTYPES[q.dtype]
        a.mask = MASK_CAUSAL if causal else MASK_NONE
        a.deterministic = 1 if deterministic else 0
        return a

    def bwd_runner(self, a):
        stream = ctypes.c_void_p(torch.cuda.current_stream().cuda_stream)
        ref = ctypes.byref(a)
        bwd, ctx = self.lib.fajit_attn_bwd, self.ctx

        def run():
            rc = bwd(ctx, ref, stream)
            if rc < 0:
                self.check(rc, "fajit_attn_bwd")
        return run

    def precompile(self, specs, threads):
        """fajit_compile for each spec on `threads` threads (ctypes drops the
        GIL); returns the specs that failed, with the error."""
        device = torch.cuda.current_device()

        def one_spec(spec):
            try:
                self._lib.compile_variant(spec, device)
                return None
            except self._lib.FajitError as e:
                return f"{spec}: {e}"
        with concurrent.futures.ThreadPoolExecutor(max_workers=threads) as pool:
            return [r for r in pool.map(one_spec, specs) if r]


def sdpa(backend, q, k, v, causal):
    qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)

    def run():
        with sdpa_kernel(backend):
            return F.scaled_dot_product_attention(qt, kt, vt, is_causal=causal)
    return run


ALL_PEERS = [("fa2", SDPBackend.FLASH_ATTENTION), ("cudnn", SDPBackend.CUDNN_ATTENTION),
             ("eff", SDPBackend.EFFICIENT_ATTENTION)]
PEERS = list(ALL_PEERS)


def tflops(b, h, sq, sk, d, causal, ms):
    flops = 4 * b * h * sq * sk * d / (2 if causal else 1)
    return flops / (ms * 1e-3) / 1e12


def one(fj, dtype, b, h, s, d, causal):
    torch.manual_seed(0)
    q, k, v = (torch.randn(b, s, h, d, device="cuda", dtype=dtype) for _ in range(3))
    o = torch.empty_like(q)
    row = {"dtype": str(dtype).split(".")[-1], "d": d, "b": b, "h": h, "s": s, "causal": causal}
    a = fj.args(q, k, v, o, causal)
    run = fj.runner(a)
    run()
    torch.cuda.synchronize()
    row["variant"] = fj.variant(a)
    row["fajit"] = tflops(b, h, s, s, d, causal, bench(run))
    for name, backend in PEERS:
        try:
            fn = sdpa(backend, q, k, v, causal)
            out = fn()
            torch.cuda.synchronize()
            row[name] = tflops(b, h, s, s, d, causal, bench(fn))
            if name == "fa2" and row["fajit"] is not None:
                row["maxdiff"] = (out.transpose(1, 2) - o).abs().max().item()
        except RuntimeError as e:  # backend does not support the shape
            row[name] = None
            row.setdefault("notes", []).append(f"{name}: {str(e).splitlines()[0][:60]}")
    del q, k, v, o
    return row


def fmt(x):
    return "   -  " if x is None else f"{x:6.1f}"


def ratio(a, b):
    return "   -  " if a is None or b is None else f"{a / b:5.2f}x"


def print_row(r):
    for name, _ in ALL_PEERS:
        r.setdefault(name, None)
    print(f"{r['dtype']:>8} {r['d']:>4} {r['s']:>6} {r['b']:>3} {r['h']:>3} {'yes' if r['causal'] else 'no':>6} "
          f"{fmt(r['fajit'])} {fmt(r['fa2'])} {fmt(r['cudnn'])} {fmt(r['eff'])}  "
          f"{ratio(r['fajit'], r['fa2'])} {ratio(r['fajit'], r['cudnn'])} {ratio(r['fajit'], r['eff'])}  "
          f"{r.get('maxdiff', float('nan')):.1e}  {r['variant'].split()[0] + ' ' + r['variant'].split(' bm=')[-1].split(' arch=')[0] if 'bm=' in r['variant'] else r['variant']}",
          flush=True)


# ---------------------------------------------------------------- backward

BWD_PEERS = [("fa2", SDPBackend.FLASH_ATTENTION), ("cudnn", SDPBackend.CUDNN_ATTENTION)]


def bwd_tflops(b, h, sq, sk, d, causal, ms):
    return 2.5 * tflops(b, h, sq, sk, d, causal, ms)


def bwd_specs(dtypes, dims, causals):
    """The variants fajit_attn_bwd launches on the grid (runtime/flash_bwd.c:
    pre and post without mask; bwd or bwd-dkdv and bwd-dq with it), plus the
    forward's, tiles and arch left to the library."""
    specs = []
    for dtype in dtypes:
        dt = "bf16" if dtype == torch.bfloat16 else "fp16"
        for d in dims:
            if d % 8 != 0 or d > 256:
                continue
            base = f"dqk={d} dv={d} dtype={dt}"
            specs += [f"bwd-pre {base} mask=none", f"bwd-post {base} mask=none"]
            for causal in causals:
                mask = "causal" if causal else "none"
                specs += [f"{op} {base} mask={mask}" for op in ("bwd", "bwd-dkdv", "bwd-dq", "fwd")]
    return specs


def sdpa_grad(backend, q, k, v, dout, causal):
    """The peer's backward alone: one forward on leaf (b, h, s, d) views of
    the (b, s, h, d) tensors, then a run() that only differentiates it."""
    qt, kt, vt = (x.transpose(1, 2).detach().requires_grad_() for x in (q, k, v))
    with sdpa_kernel(backend):
        out = F.scaled_dot_product_attention(qt, kt, vt, is_causal=causal)
    # dO in out's own layout, so no backend copies it to match.
    dout_t = torch.empty_strided(out.shape, out.stride(), dtype=out.dtype, device=out.device)
    dout_t.copy_(dout.transpose(1, 2))

    def run():
        with sdpa_kernel(backend):
            return torch.autograd.grad(out, (qt, kt, vt), dout_t, retain_graph=True)
    return run


def one_bwd(fj, dtype, b, h, s, d, causal):
    torch.manual_seed(0)
    t = {name: torch.randn(b, s, h, d, device="cuda", dtype=dtype) for name in ("q", "k", "v", "dout")}
    row = {"dtype": str(dtype).split(".")[-1], "d": d, "b": b, "h": h, "s": s, "causal": causal}
    t["o"] = torch.empty_like(t["q"])
    t["lse"] = torch.empty(b, h, s, device="cuda", dtype=torch.float32)
    fj.runner(fj.args(t["q"], t["k"], t["v"], t["o"], causal, t["lse"]))()
    grads = {}
    for key, det in (("fajit", False), ("det", True)):
        g = {n: torch.empty_like(t["q"]) for n in ("dq", "dk", "dv")}
        run = fj.bwd_runner(fj.bwd_args({**t, **g}, causal, det))
        run()
        torch.cuda.synchronize()
        row[key + "_ms"] = bench(run)
        row[key] = bwd_tflops(b, h, s, s, d, causal, row[key + "_ms"])
        grads[key] = g
    for name, backend in BWD_PEERS:
        try:
            run = sdpa_grad(backend, t["q"], t["k"], t["v"], t["dout"], causal)
            peer = run()
            torch.cuda.synchronize()
            row[name] = bwd_tflops(b, h, s, s, d, causal, bench(run))
            if name == "fa2":
                for (n, ours), theirs in zip(grads["fajit"].items(), peer):
                    row["diff_" + n] = (theirs.transpose(1, 2) - ours).abs().max().item()
                row["diff_det"] = max((theirs.transpose(1, 2) - ours).abs().max().item()
                                      for ours, theirs in zip(grads["det"].values(), peer))
            del run, peer
        except RuntimeError as e:  # backend does not support the shape
            row[name] = None
            row.setdefault("notes", []).append(f"{name}: {str(e).splitlines()[0][:60]}")
    del t, grads
    return row


BWD_HEADER = (f"{'dtype':>8} {'d':>4} {'seqlen':>6} {'b':>3} {'h':>3} {'causal':>6} {'fajit':>6} {'det':>6} "
              f"{'fa2':>6} {'cudnn':>6}  {'/fa2':>6} {'/cudnn':>6} {'det/fa2':>7} {'detcost':>7}  "
              f"{'dq':>7} {'dk':>7} {'dv':>7} {'det':>7}")


def print_bwd_row(r):
    nan = float("nan")
    cost = "    -  " if r.get("det_ms") is None else f"{r['det_ms'] / r['fajit_ms']:6.2f}x"
    print(f"{r['dtype']:>8} {r['d']:>4} {r['s']:>6} {r['b']:>3} {r['h']:>3} {'yes' if r['causal'] else 'no':>6} "
          f"{fmt(r['fajit'])} {fmt(r['det'])} {fmt(r['fa2'])} {fmt(r['cudnn'])}  "
          f"{ratio(r['fajit'], r['fa2'])} {ratio(r['fajit'], r['cudnn'])}  {ratio(r['det'], r['fa2'])} {cost}  "
          f"{r.get('diff_dq', nan):7.1e} {r.get('diff_dk', nan):7.1e} {r.get('diff_dv', nan):7.1e} "
          f"{r.get('diff_det', nan):7.1e}" + ("  " + "; ".join(r["notes"]) if r.get("notes") else ""),
          flush=True)


def main_bwd(fj, dtypes, causals, dims, seqlens, threads):
    if not fj.loaded.has_backward:
        sys.exit(f"{fj.loaded.path}: this libfajit has no fajit_attn_bwd")
    print(f"GPU {torch.cuda.get_device_name()}, torch {torch.__version__}, cuDNN {torch.backends.cudnn.version()}")
    if threads > 0:
        t0 = time.perf_counter()
        specs = bwd_specs(dtypes, dims, causals)
        failed = fj.precompile(specs, threads)
        print(f"precompiled {len(specs)} variants on {threads} threads in {time.perf_counter() - t0:.1f} s"
              + "".join(f"\n  failed: {f}" for f in failed))
    print("TFLOPs/s (backward alone, FLOPs 2.5 * 4*b*h*sq*sk*d, halved for causal); det: fajit "
          "deterministic; ratios fajit / peer; detcost: time(det) / time(fajit); max abs diff of fajit's "
          "dq dk dv (and det's, all three) vs fa2's")
    print(BWD_HEADER)
    for dtype in dtypes:
        for causal in causals:
            for d in dims:
                for s in seqlens:
                    print_bwd_row(one_bwd(fj, dtype, 16384 // s, 2048 // d, s, d, causal))


def main():
    here = os.path.dirname(os.path.abspath(__file__))
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lib", default=os.environ.get("FAJIT_LIB", os.path.join(here, "..", "build", "libfajit.so")))
    ap.add_argument("--quick", action="store_true", help="seqlens 2k and 8k only")
    ap.add_argument("--dims", default="64,128,256", help="head dims of FlashAttention's grid")
    ap.add_argument("--seqlens", default=None, help="comma list, overrides --quick")
    ap.add_argument("--dtypes", default="fp16,bf16")
    ap.add_argument("--causal", default="0,1", help="0, 1 or 0,1")
    ap.add_argument("--peers", default="fa2,cudnn,eff", help="subset of fa2,cudnn,eff (others print -)")
    ap.add_argument("--no-odd", action="store_true", help="skip the odd head dims at 4k")
    ap.add_argument("--bwd", action="store_true", help="the backward (fa2 and cudnn peers, no odd dims)")
    ap.add_argument("--precompile-threads", type=int, default=16,
                    help="--bwd: threads compiling the variants up front (0: compile on first use)")
    args = ap.parse_args()
    fj = Fajit(args.lib)
    if args.bwd:
        seqlens = [2048, 8192] if args.quick else [512, 1024, 2048, 4096, 8192, 16384]
        if args.seqlens:
            seqlens = [int(x) for x in args.seqlens.split(",")]
        dtypes = [{"fp16": torch.float16, "bf16": torch.bfloat16}[x] for x in args.dtypes.split(",")]
        main_bwd(fj, dtypes, [c == "1" for c in args.causal.split(",")],
                 [int(x) for x in args.dims.split(",")], seqlens, args.precompile_threads)
        return
    print(f"GPU {torch.cuda.get_device_name()}, torch {torch.__version__}, cuDNN {torch.backends.cudnn.version()}")
    print("TFLOPs/s (forward, FLOPs 4*b*h*sq*sk*d, halved for causal); ratios fajit / peer; maxdiff vs fa2")
    print(f"{'dtype':>8} {'d':>4} {'seqlen':>6} {'b':>3} {'h':>3} {'causal':>6} {'fajit':>6} {'fa2':>6} "
          f"{'cudnn':>6} {'eff':>6}  {'/fa2':>6} {'/cudnn':>6} {'/eff':>6}  maxdiff  tiles")
    seqlens = [2048, 8192] if args.quick else [512, 1024, 2048, 4096, 8192, 16384]
    if args.seqlens:
        seqlens = [int(x) for x in args.seqlens.split(",")]
    wanted = set(args.peers.split(","))
    PEERS[:] = [p for p in PEERS if p[0] in wanted]
    dtypes = [{"fp16": torch.float16, "bf16": torch.bfloat16}[x] for x in args.dtypes.split(",")]
    for dtype in dtypes:
        for causal in (c == "1" for c in args.causal.split(",")):
            for d in (int(x) for x in args.dims.split(",")):
                for s in seqlens:
                    print_row(one(fj, dtype, 16384 // s, 2048 // d, s, d, causal))
    for d in () if args.no_odd else (72, 80, 100, 160, 200):
        for causal in (False, True):
            print_row(one(fj, torch.bfloat16, 4, 2048 // d, 4096, d, causal))


if __name__ == "__main__":
    main()
