#!/usr/bin/env python3
"""Turns bench_fwd.py's table (its log) into a markdown table and a PNG chart.

    python3 benchmarks/plot_fwd.py bench_fwd.log --png benchmarks/fwd_h100.png > table.md

The chart follows FlashAttention's README charts: forward TFLOP/s by sequence
length, one panel per (head dim, causal), bars for fajit and each peer.
"""
import argparse
import sys


def num(text):
    return float("nan") if text == "-" else float(text)


def parse(path):
    rows = []
    for line in open(path):
        p = line.split()
        if len(p) > 13 and p[0] in ("float16", "bfloat16") and p[1].isdigit():
            rows.append(dict(dtype=p[0], d=int(p[1]), seqlen=int(p[2]), b=int(p[3]), h=int(p[4]),
                             causal=p[5] == "yes", fajit=num(p[6]), fa2=num(p[7]),
                             cudnn=num(p[8]), eff=num(p[9]), tiles=" ".join(p[14:])))
    return rows


def fmt(x, spec=".1f", suffix=""):
    return "-" if x != x else format(x, spec) + suffix


def markdown(rows):
    out = ["| dtype | d | seqlen | causal | fajit | FA2 | cuDNN | mem-eff | fajit/FA2 | fajit/cuDNN |",
           "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        out.append(f"| {r['dtype']} | {r['d']} | {r['seqlen']} | {'yes' if r['causal'] else 'no'} | "
                   f"{fmt(r['fajit'])} | {fmt(r['fa2'])} | {fmt(r['cudnn'])} | {fmt(r['eff'])} | "
                   f"{fmt(r['fajit'] / r['fa2'], '.2f', 'x')} | {fmt(r['fajit'] / r['cudnn'], '.2f', 'x')} |")
    return "\n".join(out)


def chart(rows, path, dtype="float16"):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    grid = [r for r in rows if r["dtype"] == dtype and r["d"] in (64, 128, 256) and r["b"] * r["seqlen"] == 16384]
    dims = sorted({r["d"] for r in grid})
    fig, axes = plt.subplots(2, len(dims), figsize=(5 * len(dims), 7), squeeze=False)
    for ci, causal in enumerate((False, True)):
        for di, d in enumerate(dims):
            ax = axes[ci][di]
            sel = sorted((r for r in grid if r["d"] == d and r["causal"] == causal), key=lambda r: r["seqlen"])
            xs = range(len(sel))
            for k, (name, key) in enumerate((("fajit", "fajit"), ("FlashAttention-2", "fa2"),
                                              ("cuDNN", "cudnn"), ("mem-efficient", "eff"))):
                ax.bar([x + (k - 1.5) * 0.2 for x in xs], [r[key] for r in sel], 0.2, label=name)
            ax.set_xticks(list(xs), [f"{r['seqlen'] // 1024}k" if r["seqlen"] >= 1024 else str(r["seqlen"]) for r in sel])
            ax.set_title(f"d={d}, {'causal' if causal else 'non-causal'} ({dtype})")
            ax.set_ylabel("TFLOP/s")
            ax.set_xlabel("sequence length (batch x seqlen = 16k)")
    axes[0][0].legend(fontsize=8)
    fig.suptitle("Forward attention on an H100 80GB HBM3")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("log")
    ap.add_argument("--png")
    args = ap.parse_args()
    rows = parse(args.log)
    if not rows:
        sys.exit(f"no table rows in {args.log}")
    print(markdown(rows))
    if args.png:
        chart(rows, args.png)


if __name__ == "__main__":
    main()
