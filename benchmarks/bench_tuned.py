#!/usr/bin/env python3
"""benchmarks/bench_tuned.py - tuned configs against the heuristic's, per cell.

Run after `fajit tune` has filled the cache (FAJIT_CACHE_DIR or --cache). Two
contexts on the same cache in this one process: one created with
FAJIT_TUNED_TILES=0 (the heuristic's tiles and split counts), one default
(tuned ones where the store has a record). Three tables:

- forward, every cell of FlashAttention's grid (hidden 2048, d 64/128/256,
  seqlen 512..16k, batch * seqlen = 16k, causal and not, fp16 and bf16): both
  tile configurations and, where they differ, both speeds; where they are the
  same kernel the gain is 0 by construction and nothing is timed;
- decode (split-KV; bench_decode.py's shapes: seqlen_q 1, 32 query / 8 kv
  heads, d 128, bf16, batch 1 and 8, seqlen_k 4k..128k): both always timed
  (the split count is not visible through the API);
- backward (fajit_attn_bwd), the same grid as the forward: both always timed
  (which tiles the backward's main kernel takes is not visible either).

Timed alternately (ROUNDS rounds of triton's do_bench median each, ROUNDS_ALWAYS
in the tables timed always, the median of those kept) so drift hits both alike.

It also checks what a fresh process does with tuned configurations: the cache
counters before and after the first call of every cell must show no compile
(tuning stored every candidate it compiled), and nothing here times anything
before choosing (the launch path reads the records; it never measures).

Usage: python3 benchmarks/bench_tuned.py [--lib build/libfajit.so] [--cache DIR]
       [--no-bwd] [--no-decode]
"""
import argparse
import ctypes
import os
import statistics
import sys

import torch
import triton.testing

ROUNDS = 5        # forward cells whose tiles differ
ROUNDS_ALWAYS = 3  # backward and decode cells, timed whether or not the configs differ
DTYPES = {torch.float16: 0, torch.bfloat16: 1}


class CacheStats(ctypes.Structure):
    _fields_ = [("struct_size", ctypes.c_uint32), ("entries", ctypes.c_uint64),
                ("bytes", ctypes.c_uint64), ("map_bytes", ctypes.c_uint64),
                ("hits", ctypes.c_uint64), ("misses", ctypes.c_uint64),
                ("compiles", ctypes.c_uint64), ("bad_entries", ctypes.c_uint64)]


class Lib:
    def __init__(self, path, cache):
        os.environ["FAJIT_LIBRARY"] = os.path.abspath(path)
        sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "python"))
        from fajit import _lib
        self._lib = _lib
        self.loaded = _lib.load()
        self.lib = self.loaded.lib
        self.lib.fajit_cache_get_stats.argtypes = [ctypes.c_void_p, ctypes.POINTER(CacheStats)]
        self.lib.fajit_cache_get_stats.restype = ctypes.c_int
        self.cache = cache

    def create(self, tuned):
        """A context on the cache; FAJIT_TUNED_TILES is read when it is created."""
        if tuned:
            os.environ.pop("FAJIT_TUNED_TILES", None)
        else:
            os.environ["FAJIT_TUNED_TILES"] = "0"
        opt = self._lib.init_struct(self.loaded, self._lib.Options, "fajit_options_init")
        if self.cache:
            opt.cache_dir = self.cache.encode()
        opt.device = torch.cuda.current_device()
        handle = ctypes.c_void_p()
        self._lib.check(self.lib.fajit_create(ctypes.byref(handle), ctypes.byref(opt)), "fajit_create")
        os.environ.pop("FAJIT_TUNED_TILES", None)
        return handle

    def stats(self, ctx):
        s = CacheStats()
        s.struct_size = ctypes.sizeof(s)
        self._lib.check(self.lib.fajit_cache_get_stats(ctx, ctypes.byref(s)), "fajit_cache_get_stats")
        return s

    def args(self, q, k, v, o, causal):
        a = self.loaded.new_args(self._lib.AttnArgs, "fajit_attn_args_init")
        a.q, a.k, a.v, a.o = q.data_ptr(), k.data_ptr(), v.data_ptr(), o.data_ptr()
        a.batch, a.seqlen_q, a.nheads_q, a.dqk = q.shape
        a.seqlen_k, a.nheads_kv, a.dv = k.shape[1], k.shape[2], v.shape[3]
        a.dtype = DTYPES[q.dtype]
        a.mask = 1 if causal else 0
        return a

    def tiles(self, ctx, a):
        buf = ctypes.create_string_buffer(512)
        self._lib.check(self.lib.fajit_attn_variant(ctx, ctypes.byref(a), buf, 512), "fajit_attn_variant")
        text = buf.value.decode()
        return text[text.index(" bm="):text.index(" arch=")].strip()

    def runner(self, ctx, a):
        stream = ctypes.c_void_p(torch.cuda.current_stream().cuda_stream)
        ref, fwd = ctypes.byref(a), self.lib.fajit_attn_fwd

        def run():
            rc = fwd(ctx, ref, stream)
            if rc < 0:
                self._lib.check(rc, "fajit_attn_fwd")
        return run

    def bwd_args(self, q, k, v, o, lse, do, dq, dk, dv, causal):
        a = self.loaded.new_args(self._lib.AttnBwdArgs, "fajit_attn_bwd_args_init")
        a.q, a.k, a.v, a.o, a.lse = q.data_ptr(), k.data_ptr(), v.data_ptr(), o.data_ptr(), lse.data_ptr()
        a.grad_out, a.grad_q, a.grad_k, a.grad_v = do.data_ptr(), dq.data_ptr(), dk.data_ptr(), dv.data_ptr()
        a.batch, a.seqlen_q, a.nheads_q, a.dqk = q.shape
        a.seqlen_k, a.nheads_kv, a.dv = k.shape[1], k.shape[2], v.shape[3]
        a.dtype = DTYPES[q.dtype]
        a.mask = 1 if causal else 0
        return a

    def bwd_runner(self, ctx, a):
        stream = ctypes.c_void_p(torch.cuda.current_stream().cuda_stream)
        ref, bwd = ctypes.byref(a), self.lib.fajit_attn_bwd

        def run():
            rc = bwd(ctx, ref, stream)
            if rc < 0:
                self._lib.check(rc, "fajit_attn_bwd")
        return run


def tflops(b, h, s, d, causal, ms):
    return 4 * b * h * s * s * d / (2 if causal else 1) / (ms * 1e-3) / 1e12


def alternate(run_h, run_t, rounds=ROUNDS):
    """Median ms of each, timed alternately."""
    th, tt = [], []
    for _ in range(rounds):
        th.append(triton.testing.do_bench(run_h, return_mode="median"))
        tt.append(triton.testing.do_bench(run_t, return_mode="median"))
    return statistics.median(th), statistics.median(tt)


def bwd_cell(lib, heur_ctx, tuned_ctx, dtype, d, s, causal):
    b, h = 16384 // s, 2048 // d
    torch.manual_seed(0)
    q, k, v, do = (torch.randn(b, s, h, d, device="cuda", dtype=dtype) for _ in range(4))
    o = torch.empty_like(q)
    lse = torch.empty(b, h, s, device="cuda", dtype=torch.float32)
    fa = lib.args(q, k, v, o, causal)
    fa.lse = lse.data_ptr()
    lib.runner(heur_ctx, fa)()
    grads = [[torch.empty_like(x) for x in (q, k, v)] for _ in range(2)]
    a_h = lib.bwd_args(q, k, v, o, lse, do, *grads[0], causal)
    a_t = lib.bwd_args(q, k, v, o, lse, do, *grads[1], causal)
    run_h, run_t = lib.bwd_runner(heur_ctx, a_h), lib.bwd_runner(tuned_ctx, a_t)
    run_h()
    run_t()
    torch.cuda.synchronize()
    maxdiff = max((x.float() - y.float()).abs().max().item() / max(1.0, x.float().abs().max().item())
                  for x, y in zip(grads[0], grads[1]))
    ms_h, ms_t = alternate(run_h, run_t, ROUNDS_ALWAYS)
    flops = 2.5 * 4 * b * h * s * s * d / (2 if causal else 1)
    row = {"dtype": str(dtype).split(".")[-1], "d": d, "s": s, "causal": causal, "maxdiff": maxdiff,
           "tf_heur": flops / (ms_h * 1e-3) / 1e12, "tf_tuned": flops / (ms_t * 1e-3) / 1e12}
    del q, k, v, do, o, lse, grads
    return row


def decode_cell(lib, heur_ctx, tuned_ctx, b, sk, hq=32, hkv=8, d=128, dtype=torch.bfloat16):
    torch.manual_seed(0)
    q = torch.randn(b, 1, hq, d, device="cuda", dtype=dtype)
    k, v = (torch.randn(b, sk, hkv, d, device="cuda", dtype=dtype) for _ in range(2))
    o_h, o_t = torch.empty_like(q), torch.empty_like(q)
    a_h, a_t = lib.args(q, k, v, o_h, False), lib.args(q, k, v, o_t, False)
    run_h, run_t = lib.runner(heur_ctx, a_h), lib.runner(tuned_ctx, a_t)
    run_h()
    run_t()
    torch.cuda.synchronize()
    ms_h, ms_t = alternate(run_h, run_t, ROUNDS_ALWAYS)
    gb = (k.numel() + v.numel()) * k.element_size() / 1e9
    row = {"b": b, "sk": sk, "heur": lib.tiles(heur_ctx, a_h), "tuned": lib.tiles(tuned_ctx, a_t),
           "us_heur": ms_h * 1e3, "us_tuned": ms_t * 1e3, "gbs_heur": gb / (ms_h * 1e-3),
           "gbs_tuned": gb / (ms_t * 1e-3), "maxdiff": (o_h.float() - o_t.float()).abs().max().item()}
    del q, k, v, o_h, o_t
    return row


def cell(lib, heur_ctx, tuned_ctx, dtype, d, s, causal):
    b, h = 16384 // s, 2048 // d
    torch.manual_seed(0)
    q, k, v = (torch.randn(b, s, h, d, device="cuda", dtype=dtype) for _ in range(3))
    o_h, o_t = torch.empty_like(q), torch.empty_like(q)
    a_h, a_t = lib.args(q, k, v, o_h, causal), lib.args(q, k, v, o_t, causal)
    run_h, run_t = lib.runner(heur_ctx, a_h), lib.runner(tuned_ctx, a_t)
    run_h()
    run_t()
    torch.cuda.synchronize()
    row = {"dtype": str(dtype).split(".")[-1], "d": d, "s": s, "causal": causal,
           "heur": lib.tiles(heur_ctx, a_h), "tuned": lib.tiles(tuned_ctx, a_t),
           "maxdiff": (o_h.float() - o_t.float()).abs().max().item()}
    if row["heur"] != row["tuned"]:
        ms_h, ms_t = alternate(run_h, run_t)
        row["tf_heur"] = tflops(b, h, s, d, causal, ms_h)
        row["tf_tuned"] = tflops(b, h, s, d, causal, ms_t)
    del q, k, v, o_h, o_t
    return row


def main():
    here = os.path.dirname(os.path.abspath(__file__))
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lib", default=os.path.join(here, "..", "build", "libfajit.so"))
    ap.add_argument("--cache", default=os.environ.get("FAJIT_CACHE_DIR"))
    ap.add_argument("--dims", default="64,128,256")
    ap.add_argument("--seqlens", default="512,1024,2048,4096,8192,16384")
    ap.add_argument("--no-bwd", action="store_true", help="skip the backward table")
    ap.add_argument("--no-decode", action="store_true", help="skip the decode (split-KV) table")
    args = ap.parse_args()
    lib = Lib(args.lib, args.cache)
    heur_ctx, tuned_ctx = lib.create(tuned=False), lib.create(tuned=True)
    before = lib.stats(tuned_ctx)
    print(f"GPU {torch.cuda.get_device_name()}; cache {args.cache or '(default)'}")
    print(f"{'dtype':>8} {'d':>4} {'seqlen':>6} {'causal':>6} {'heuristic tiles':>30} "
          f"{'tuned tiles':>30} {'heur TF':>8} {'tuned TF':>8} {'gain':>7}  maxdiff")
    rows = []
    for dtype in (torch.float16, torch.bfloat16):
        for causal in (False, True):
            for d in (int(x) for x in args.dims.split(",")):
                for s in (int(x) for x in args.seqlens.split(",")):
                    r = cell(lib, heur_ctx, tuned_ctx, dtype, d, s, causal)
                    rows.append(r)
                    if "tf_heur" in r:
                        speeds = f"{r['tf_heur']:8.1f} {r['tf_tuned']:8.1f} {100 * (r['tf_tuned'] / r['tf_heur'] - 1):+6.1f}%"
                    else:
                        speeds = f"{'same kernel':>17} {'+0.0%':>7}"
                    print(f"{r['dtype']:>8} {d:>4} {s:>6} {'yes' if causal else 'no':>6} {r['heur']:>30} "
                          f"{r['tuned']:>30} {speeds}  {r['maxdiff']:.1e}", flush=True)
    differ = [r for r in rows if "tf_heur" in r]
    gains = [r["tf_tuned"] / r["tf_heur"] - 1 for r in differ]
    print(f"\nforward: {len(rows)} cells; tuned tiles differ from the heuristic's in {len(differ)}; "
          f"gain where they differ: min {100 * min(gains, default=0):+.1f}%, "
          f"median {100 * statistics.median(gains) if gains else 0:+.1f}%, max {100 * max(gains, default=0):+.1f}%")
    dims = [int(x) for x in args.dims.split(",")]
    seqlens = [int(x) for x in args.seqlens.split(",")]
    if not args.no_decode:
        print("\ndecode (split-KV): seqlen_q 1, 32 query / 8 kv heads, d 128, bf16; GB/s of K and V")
        print(f"{'b':>3} {'seqlen_k':>8} {'heuristic tiles':>30} {'tuned tiles':>30} {'heur us':>8} {'tuned us':>8} "
              f"{'heur GB/s':>9} {'tuned GB/s':>10} {'gain':>7}  maxdiff")
        drows = []
        for b in (1, 8):
            for sk in (4096, 16384, 65536, 131072):
                r = decode_cell(lib, heur_ctx, tuned_ctx, b, sk)
                drows.append(r)
                print(f"{b:>3} {sk:>8} {r['heur']:>30} {r['tuned']:>30} {r['us_heur']:8.1f} {r['us_tuned']:8.1f} "
                      f"{r['gbs_heur']:9.0f} {r['gbs_tuned']:10.0f} {100 * (r['us_heur'] / r['us_tuned'] - 1):+6.1f}%  "
                      f"{r['maxdiff']:.1e}", flush=True)
        dg = [r["us_heur"] / r["us_tuned"] - 1 for r in drows]
        print(f"decode: {len(drows)} cells; gain min {100 * min(dg):+.1f}%, median {100 * statistics.median(dg):+.1f}%, "
              f"max {100 * max(dg):+.1f}%")
    if not args.no_bwd:
        print("\nbackward (fajit_attn_bwd, FLOPs 2.5x the forward's)")
        print(f"{'dtype':>8} {'d':>4} {'seqlen':>6} {'causal':>6} {'heur TF':>8} {'tuned TF':>8} {'gain':>7}  maxdiff/max")
        brows = []
        for dtype in (torch.float16, torch.bfloat16):
            for causal in (False, True):
                for d in dims:
                    for s in seqlens:
                        r = bwd_cell(lib, heur_ctx, tuned_ctx, dtype, d, s, causal)
                        brows.append(r)
                        print(f"{r['dtype']:>8} {d:>4} {s:>6} {'yes' if causal else 'no':>6} {r['tf_heur']:8.1f} "
                              f"{r['tf_tuned']:8.1f} {100 * (r['tf_tuned'] / r['tf_heur'] - 1):+6.1f}%  "
                              f"{r['maxdiff']:.1e}", flush=True)
        bg = [r["tf_tuned"] / r["tf_heur"] - 1 for r in brows]
        print(f"backward: {len(brows)} cells; gain min {100 * min(bg):+.1f}%, median "
              f"{100 * statistics.median(bg):+.1f}%, max {100 * max(bg):+.1f}%; cells above +3%: "
              f"{sum(g > 0.03 for g in bg)}, below -3%: {sum(g < -0.03 for g in bg)}")
    after = lib.stats(tuned_ctx)
    print(f"\nfresh process: compiles during the run {after.compiles - before.compiles}, "
          f"cache misses {after.misses - before.misses}, hits {after.hits - before.hits}")
    lib.lib.fajit_destroy(heur_ctx)
    lib.lib.fajit_destroy(tuned_ctx)


if __name__ == "__main__":
    main()
