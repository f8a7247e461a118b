#!/usr/bin/env python3
"""examples/train_block.py - train a small transformer block with fajit's attention.

One pre-norm transformer block (4 heads of head dim 100, a size flash_attn does
not ship) learns a copy task for a few hundred steps, three times from the same
initial weights on the same batches:

  fajit      attention by fajit.flash_attn_qkvpacked_func in bf16 (forward and backward)
  math bf16  PyTorch's math attention (SDPA, MATH backend) in bf16
  math fp32  PyTorch's math attention in fp32

The task: 64 random tokens, then the same 64 again; only the second half is
scored. Predicting it needs attention by position (the token 63 places back),
so the loss falls from ln(64) = 4.16 towards 0 only if attention, forward and
backward, works. The positional embedding starts as large as the token one
(std 1, not 0.02): positions as distinct as tokens make that offset
learnable in a few dozen steps instead of a plateau of hundreds.

The bf16 runs differ only by how attention rounds, so their loss curves must
agree to within the dtype's noise, measured as the gap between the two math
runs: each window's mean loss of fajit must lie within 2 x (largest math bf16
vs fp32 gap) + 0.05 + 5% of math bf16's. And the loss must really fall: the
last window's mean below a tenth of the first's (the copy learned), in every
run. About 20 s on an H100.

    FAJIT_LIBRARY=build/libfajit.so python3 examples/train_block.py [steps]

Exit 0: curves match and the task is learned; 1: not; 77: cannot run here
(no GPU, or a libfajit without a working backward: the message says which).
"""
import copy
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "python"))

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import fajit  # noqa: E402

HEADS, HEAD_DIM, VOCAB, HALF, BATCH, WINDOW = 4, 100, 64, 64, 16, 10
LR, POS_STD, LEARNED = 1e-3, 1.0, 0.1


def attn_fajit(qkv):
    return fajit.flash_attn_qkvpacked_func(qkv.to(torch.bfloat16), causal=True).float()


def attn_math(dtype):
    def attend(qkv):
        from torch.nn.attention import SDPBackend, sdpa_kernel
        q, k, v = (t.to(dtype).transpose(1, 2) for t in qkv.unbind(2))
        with sdpa_kernel(SDPBackend.MATH):
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return out.transpose(1, 2).float()
    return attend


class Block(nn.Module):
    """Embedding, one pre-norm attention + MLP block, and a head."""

    def __init__(self, seqlen):
        super().__init__()
        d = HEADS * HEAD_DIM
        self.emb = nn.Embedding(VOCAB, d)
        self.pos = nn.Parameter(torch.randn(seqlen, d) * POS_STD)
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))
        self.head = nn.Linear(d, VOCAB)
        self.attend = None

    def forward(self, tokens):
        b, s = tokens.shape
        x = self.emb(tokens) + self.pos[:s]
        qkv = self.qkv(self.ln1(x)).view(b, s, 3, HEADS, HEAD_DIM)
        x = x + self.proj(self.attend(qkv).reshape(b, s, HEADS * HEAD_DIM))
        x = x + self.mlp(self.ln2(x))
        return self.head(x)


def batches(steps, device):
    """Copy task: a random first half, then the same tokens again."""
    g = torch.Generator(device="cpu").manual_seed(1234)
    for _ in range(steps):
        first = torch.randint(0, VOCAB, (BATCH, HALF), generator=g)
        yield torch.cat([first, first], dim=1).to(device)


def train(model, attend, steps, device):
    model.attend = attend
    opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.0)
    losses = []
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for tokens in batches(steps, device):
        logits = model(tokens[:, :-1])
        # Only the second half is predictable: score those positions.
        loss = F.cross_entropy(logits[:, HALF - 1:].reshape(-1, VOCAB),
                               tokens[:, HALF:].reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    torch.cuda.synchronize()
    return losses, (time.perf_counter() - t0) / steps * 1e3


def window_means(losses):
    return [sum(losses[i:i + WINDOW]) / len(losses[i:i + WINDOW])
            for i in range(0, len(losses), WINDOW)]


def backward_problem():
    """Why fajit cannot train here, or None."""
    if not fajit.has_backward():
        return "fajit backward: not in this libfajit build (%s)" % fajit.library_path()
    q = torch.randn(1, 8, 1, HEAD_DIM, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    try:
        fajit.flash_attn_func(q, q, q, causal=True).sum().backward()
    except (NotImplementedError, fajit.FajitError) as e:
        return "fajit backward does not run in this build: %s" % e
    return None


def main():
    steps = int(sys.argv[1]) if len(sys.argv) > 1 else 300
    if not torch.cuda.is_available():
        print("train_block: no CUDA GPU here, nothing to run")
        return 77
    why = backward_problem()
    if why:
        print("train_block: cannot train with fajit yet: %s" % why)
        return 77
    device = "cuda"
    start = time.perf_counter()
    torch.manual_seed(0)
    base = Block(2 * HALF - 1).to(device)
    runs = {}
    for name, attend in (("fajit", attn_fajit), ("math bf16", attn_math(torch.bfloat16)),
                         ("math fp32", attn_math(torch.float32))):
        runs[name] = train(copy.deepcopy(base), attend, steps, device)
        print("%-9s  %.2f ms/step, loss %.4f -> %.4f"
              % (name, runs[name][1], runs[name][0][0], runs[name][0][-1]))

    fa, mb, mf = (window_means(runs[n][0]) for n in ("fajit", "math bf16", "math fp32"))
    noise = max(abs(b - f) for b, f in zip(mb, mf))
    bound = 2 * noise + 0.05  # plus 5% of the loss itself, per window
    print("\nsteps      fajit  math-bf16  math-fp32   |fajit-bf16|")
    for i, (a, b, f) in enumerate(zip(fa, mb, mf)):
        print("%4d-%-4d %7.4f %9.4f %10.4f %12.4f"
              % (i * WINDOW, min((i + 1) * WINDOW, steps) - 1, a, b, f, abs(a - b)))
    worst = max(abs(a - b) - 0.05 * b for a, b in zip(fa, mb))
    # Every run must learn the copy, or matching curves prove little.
    learned = all(w[-1] < LEARNED * w[0] for w in (fa, mb, mf))
    ok = worst <= bound and learned
    print("\nworst window gap fajit vs math bf16 (less 5%% of the loss) = %.4f; bound 2 x %.4f "
          "(bf16 vs fp32 math) + 0.05 = %.4f: %s"
          % (worst, noise, bound, "ok" if worst <= bound else "FAIL"))
    print("loss fell (first -> last window): fajit %.3f -> %.3f, math bf16 %.3f -> %.3f, "
          "math fp32 %.3f -> %.3f; below %g x the first: %s"
          % (fa[0], fa[-1], mb[0], mb[-1], mf[0], mf[-1], LEARNED, "ok" if learned else "FAIL"))
    print("%s in %.1f s" % ("ok" if ok else "FAIL", time.perf_counter() - start))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
