#!/usr/bin/env python3
"""examples/python_example.py - libfajit from PyTorch, the smallest complete use.

Attention with head dim 100 (a size flash_attn does not ship), causal, bf16,
through the flash_attn-compatible function; checked against PyTorch's math
attention in fp32; the time per call printed.

    FAJIT_LIBRARY=build/libfajit.so python3 examples/python_example.py [headdim] [seqlen]
"""
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "python"))

import torch  # noqa: E402

import fajit as flash_attn  # noqa: E402  (a drop-in: the same call works with flash_attn)


def main():
    d = int(sys.argv[1]) if len(sys.argv) > 1 else 100
    s = int(sys.argv[2]) if len(sys.argv) > 2 else 2048
    if not torch.cuda.is_available():
        print("python_example: no CUDA GPU here, nothing to run (kernels still compile: "
              "python -m fajit prebuild)")
        return 0
    b, h = 2, 16
    q, k, v = (torch.randn(b, s, h, d, device="cuda", dtype=torch.bfloat16) for _ in range(3))

    out = flash_attn.flash_attn_func(q, k, v, causal=True)  # first call compiles or loads

    # Reference: PyTorch's math attention in fp32, layout (b, h, s, d).
    ref = torch.nn.functional.scaled_dot_product_attention(
        *(t.float().transpose(1, 2) for t in (q, k, v)), is_causal=True).transpose(1, 2)
    err = (out.float() - ref).abs().max().item()

    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(21):
        start.record()
        flash_attn.flash_attn_func(q, k, v, causal=True)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    ms = sorted(times)[10]
    flops = 4 * b * h * s * s * d / 2  # causal: half
    ok = err <= 1 / 64
    print("library  %s (%s)" % (flash_attn.library_path(), flash_attn.version()))
    print("check    max |out - fp32 math attention| = %.3g  (%s)" % (err, "ok" if ok else "FAIL"))
    print("speed    %.3f ms per call, %.1f TFLOP/s (b=%d s=%d h=%d d=%d causal bf16)"
          % (ms, flops / (ms * 1e-3) / 1e12, b, s, h, d))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
