"""One training step (forward + backward) of a LoRWeB basis layer at FLUX width, as ratios.

    .venv/bin/python -m bench.lorweb_train_step [--repeats 3] [--tokens 4096]

Layer 3072 -> 3072 with N=32 entries of rank 4 (= rank 128 in total), 2 samples x tokens/2 tokens each (per-sample
coefficients), loss = mean(out²), input requiring grad (as inside a network), the released checkpoint's mixing
settings (``--heads 2 --tanh`` for another basis' settings). The three variants are timed in turn within every
repeat. Compared with
(a) one plain rank-128 LoRA layer (the cost floor: same rank, no routing) and
(b) a loop over the 32 entries, Σ_n c_n (x A_n) B_n (the equation written naively).
Goals from the issue: ours <= 1.15x (a) and >= 3x faster than (b).
"""

from __future__ import annotations

import argparse
import math
import platform

import torch
from torch import nn

from analogy_core.lorweb.layer import LoRWeBLinear
from analogy_core.lorweb.settings import LoRWeBSettings
from bench.timing import interleaved_median_times

DIM, N, R = 3072, 32, 4


class PlainLoRA(nn.Module):
    def __init__(self, base: nn.Linear, rank: int):
        super().__init__()
        self.base = base
        self.A = nn.Parameter(torch.randn(DIM, rank) / math.sqrt(DIM))
        self.B = nn.Parameter(torch.randn(rank, DIM) * 0.01)

    def forward(self, x):
        return self.base(x) + (x @ self.A) @ self.B


class LoopLoRWeB(nn.Module):
    """The same parameters as LoRWeBLinear, computed entry by entry."""

    def __init__(self, layer: LoRWeBLinear):
        super().__init__()
        self.layer = layer

    def forward(self, x):
        layer = self.layer
        c = layer.coefficients(layer.query)  # [B, N]
        out = layer.base(x)
        for n in range(layer.num_entries):
            out = out + c[:, n].view(-1, 1, 1) * ((x @ layer.lora_A[n]) @ layer.lora_B[n])
        return out


def training_step(module: nn.Module, x: torch.Tensor):
    def step():
        module.zero_grad(set_to_none=True)
        x.grad = None
        module(x).square().mean().backward()

    return step


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--heads", type=int, default=1)
    parser.add_argument("--tanh", action="store_true", help="tanh instead of softmax coefficients")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    base = nn.Linear(DIM, DIM)
    base.requires_grad_(False)
    settings = LoRWeBSettings(lora_heads=args.heads, lora_softmax=not args.tanh)
    ours = LoRWeBLinear(base, num_entries=N, rank=R, key_dim=128, query_dim=3 * 768, settings=settings)
    with torch.no_grad():
        ours.lora_B.normal_(0, 0.01)
    ours.query = torch.randn(2, 3 * 768)
    plain = PlainLoRA(base, N * R)
    loop = LoopLoRWeB(ours)
    x = torch.randn(2, args.tokens // 2, DIM, requires_grad=True)

    results = interleaved_median_times({name: training_step(module, x) for name, module in (
        ("plain rank-128 LoRA (a)", plain), ("LoRWeB batched (ours)", ours), ("LoRWeB loop over 32 (b)", loop))},
        args.repeats)
    ours_t = results["LoRWeB batched (ours)"]
    print(f"machine: {platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}; "
          f"mixing {settings.describe()}")
    for name, seconds in results.items():
        print(f"{name:28s} {seconds * 1000:8.1f} ms/step")
    print(f"ours / plain rank-128 LoRA = {ours_t / results['plain rank-128 LoRA (a)']:.3f}x (goal <= 1.15x)")
    print(f"loop / ours                = {results['LoRWeB loop over 32 (b)'] / ours_t:.2f}x (goal >= 3x)")


if __name__ == "__main__":
    main()
