#!/usr/bin/env python3
"""benchmarks/prof_decode.py - decode's kernels one by one: the split-KV main
kernel and its combine (a programmatic dependent launch, so it starts early
and its duration includes the wait), timed by torch.profiler, with the L2
emptied before each call by a 256 MB write (do_bench's way, which leaves dirty
lines) or by a read. seqlen_q 1, 32 query / 8 kv heads, d 128, bf16, batch 1.

Usage: python3 benchmarks/prof_decode.py LIB OUTDIR [SEQLEN_K]
"""
import json, os, sys, statistics, torch
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_decode as bd
from torch.profiler import profile, ProfilerActivity
lib = sys.argv[1]; out = sys.argv[2]; sk = int(sys.argv[3]) if len(sys.argv) > 3 else 65536
fj = bd.Fajit(lib)
torch.manual_seed(0)
q = torch.randn(1, 1, 32, 128, device="cuda", dtype=torch.bfloat16)
k = torch.randn(1, sk, 8, 128, device="cuda", dtype=torch.bfloat16)
v = torch.randn(1, sk, 8, 128, device="cuda", dtype=torch.bfloat16)
o = torch.empty_like(q)
a = fj.args(q, k, v, o, False)
run = fj.runner(a)
for _ in range(3): run()
torch.cuda.synchronize()
print("maxdiff", (o.float() - bd.reference(q, k, v)).abs().max().item(), fj.variant(a))
for mode in ("zero", "sum"):
    flush_w = torch.empty(256 << 20, dtype=torch.int8, device="cuda")
    flush_r = torch.ones(64 << 20, dtype=torch.float32, device="cuda")
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for i in range(30):
            if mode == "zero": flush_w.zero_()
            else: flush_r.sum()
            run()
        torch.cuda.synchronize()
    path = f"{out}/trace_{mode}.json"
    prof.export_chrome_trace(path)
    ev = [e for e in json.load(open(path))["traceEvents"] if e.get("cat") == "kernel"]
    ev.sort(key=lambda e: e["ts"])
    rows = []
    for i, e in enumerate(ev):
        if "fajit" in e["name"] and e["args"].get("grid", [0])[0] > 8:
            prev = ev[i - 1]; nxt = ev[i + 1] if i + 1 < len(ev) else None
            r = {"gap_before": e["ts"] - (prev["ts"] + prev["dur"]), "main": e["dur"]}
            if nxt is not None and "fajit" in nxt["name"]:
                r["gap_comb"] = nxt["ts"] - (e["ts"] + e["dur"]); r["comb"] = nxt["dur"]
                r["total"] = nxt["ts"] + nxt["dur"] - e["ts"]
            rows.append(r)
    rows = rows[5:]
    print(mode, "n", len(rows), " ".join(f"{k} {statistics.median(r[k] for r in rows if k in r):.2f}" for k in rows[0]))
    print(" grids:", sorted({(e['name'][:30], tuple(e['args'].get('grid', []))) for e in ev}))
