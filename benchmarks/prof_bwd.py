#!/usr/bin/env python3
"""benchmarks/prof_bwd.py - where one backward's time goes: the kernels of
fajit_attn_bwd (pre, main, post) against those of SDPA's FlashAttention-2 and
cuDNN backward, each timed by torch.profiler (CUPTI kernel records, median of
10 calls), for d 128 fp16 at 16k causal (b 1, h 16) and 2k (b 8, h 16).

Usage: python3 benchmarks/prof_bwd.py LIB OUTDIR   (traces go to OUTDIR)
"""
import json, os, sys, statistics, collections, torch
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_fwd as bf
from torch.profiler import profile, ProfilerActivity
from torch.nn.attention import SDPBackend
lib, out = sys.argv[1], sys.argv[2]
fj = bf.Fajit(lib)
def prof(name, fn, n=10):
    for _ in range(3): fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as pr:
        for _ in range(n): fn()
        torch.cuda.synchronize()
    path = f"{out}/trace_{name}.json"; pr.export_chrome_trace(path)
    ev = sorted((e for e in json.load(open(path))["traceEvents"] if e.get("cat") == "kernel"), key=lambda e: e["ts"])
    per = collections.defaultdict(list)
    for e in ev: per[e["name"][:60]].append(e["dur"])
    span = (ev[-1]["ts"] + ev[-1]["dur"] - ev[0]["ts"]) / n
    print(f"== {name}: {len(ev)/n:.0f} kernels/iter, span/iter {span:.1f} us, busy/iter {sum(e['dur'] for e in ev)/n:.1f} us")
    for k, v in sorted(per.items(), key=lambda kv: -sum(kv[1])):
        print(f"   {statistics.median(v):9.1f} us x{len(v)/n:.0f}  {k}")
for (b, h, s, causal) in ((1, 16, 16384, True), (8, 16, 2048, False)):
    torch.manual_seed(0)
    d = 128; dtype = torch.float16
    t = {nm: torch.randn(b, s, h, d, device="cuda", dtype=dtype) for nm in ("q", "k", "v", "dout")}
    t["o"] = torch.empty_like(t["q"]); t["lse"] = torch.empty(b, h, s, device="cuda", dtype=torch.float32)
    fj.runner(fj.args(t["q"], t["k"], t["v"], t["o"], causal, t["lse"]))()
    g = {nm: torch.empty_like(t["q"]) for nm in ("dq", "dk", "dv")}
    run = fj.bwd_runner(fj.bwd_args({**t, **g}, causal, False))
    tag = f"s{s}_{'c' if causal else 'n'}"
    prof("fajit_" + tag, run)
    prof("fa2_" + tag, bf.sdpa_grad(SDPBackend.FLASH_ATTENTION, t["q"], t["k"], t["v"], t["dout"], causal))
    prof("cudnn_" + tag, bf.sdpa_grad(SDPBackend.CUDNN_ATTENTION, t["q"], t["k"], t["v"], t["dout"], causal))
    del t, g
