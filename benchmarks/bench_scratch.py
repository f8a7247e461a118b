#!/usr/bin/env python3
"""benchmarks/bench_scratch.py - what scratch costs a call that follows a
synchronisation.

Split-KV decode and the fast backward take stream-ordered scratch
(runtime/driver.c, fajit__scratch_alloc). A pool with a release threshold of 0
hands freed scratch back to the driver at every synchronisation, so a caller
that synchronises between calls (a generation loop reading the sampled token,
a training step logging its loss) pays to map it again on the next call. The
library's own pool keeps FAJIT_SCRATCH_KEEP_BYTES (default 256 MiB) across
synchronisations.

For each case this prints, in microseconds: "queued", the median time per call
of 200 calls enqueued back to back (CUDA events around the batch), and
"synced", the median host wall time of one call plus torch.cuda.synchronize()
over 200 such pairs. Run it twice to compare: once as is, once with
FAJIT_SCRATCH_KEEP_BYTES=0 (the old behaviour: everything released at each
synchronisation).

Cases: decode (seqlen_q 1, 32/8 heads, d 128, bf16, batch 1) at 4k and 16k keys
(split-KV), and the forward + backward of flash_attn_func at batch 2, seqlen
1k, 16 heads, d 128, bf16 (scratch for dQ).

Usage: python3 benchmarks/bench_scratch.py [--lib build/libfajit.so]
"""
import argparse
import os
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import bench_decode  # noqa: E402  (its Fajit wrapper of the binding)

REPS = 200


def queued_us(fn):
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(REPS):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) * 1e3 / REPS


def synced_us(fn):
    times = []
    for _ in range(REPS):
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append((time.perf_counter() - t0) * 1e6)
    return sorted(times)[len(times) // 2]


def decode_case(fj, sk):
    torch.manual_seed(0)
    q = torch.randn(1, 1, 32, 128, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(1, sk, 8, 128, device="cuda", dtype=torch.bfloat16)
    v = torch.randn_like(k)
    o = torch.empty_like(q)
    a = fj.args(q, k, v, o, False)
    run = fj.runner(a, workspace=False)  # the pool's scratch is what this measures
    run()
    torch.cuda.synchronize()
    err = (o.float() - bench_decode.reference(q, k, v)).abs().max().item()
    return run, err


def backward_case():
    import fajit
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 1024, 16, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True)
               for _ in range(3))
    g = torch.randn(2, 1024, 16, 128, device="cuda", dtype=torch.bfloat16)

    def run():
        out = fajit.flash_attn_func(q, k, v)
        torch.autograd.grad(out, (q, k, v), g)
    return "fwd+bwd b=2 s=1024 h=16 d=128", run


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lib", default=os.environ.get("FAJIT_LIB", os.path.join(HERE, "..", "build", "libfajit.so")))
    args = ap.parse_args()
    fj = bench_decode.Fajit(args.lib)
    keep = os.environ.get("FAJIT_SCRATCH_KEEP_BYTES", "(default: 256 MiB)")
    print("GPU %s; FAJIT_SCRATCH_KEEP_BYTES=%s" % (torch.cuda.get_device_name(), keep))
    print("%-34s %10s %10s %10s" % ("case", "queued us", "synced us", "maxdiff"))
    for sk in (4096, 16384):
        run, err = decode_case(fj, sk)
        print("%-34s %10.1f %10.1f %10.1e" % ("decode b=1 sk=%d" % sk, queued_us(run), synced_us(run), err))
    name, run = backward_case()
    print("%-34s %10.1f %10.1f %10s" % (name, queued_us(run), synced_us(run), "-"))


if __name__ == "__main__":
    main()
