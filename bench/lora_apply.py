"""Cost of applying a rank-128 LoRA to SD1.5-UNet-shaped layers on CPU, as ratios to one base forward pass.

    .venv/bin/python -m bench.lora_apply [--rank 128] [--repeats 5]

The layer set is every linear layer inside SD1.5's transformer blocks (attn1/attn2 q, k, v, out, ff in/out: 160
layers, shapes from the real SD1.5 config), each fed the tokens it sees for a 512x512 image with CFG (batch 2:
4096/1024/256/64 tokens per level, 77 context tokens for attn2.to_k/to_v). One "base pass" runs every layer once.

- merge: what Apply LoRA (merge) costs once per LoRA change: W + s * up @ down in float32 and the cast back, for all
  layers (ComfyUI's patcher does exactly this per weight).
- runtime overhead: what runtime mode adds to every sampling step: (x @ down.T) @ up.T for every layer, as a ratio
  to the base pass.
"""

from __future__ import annotations

import argparse
import platform

import torch

from analogy_core.layouts import standard_layout
from bench.timing import median_time

# latent tokens per UNet level at 512x512 (64x64 latent)
TOKENS_BY_BLOCK = {"down_blocks.0": 4096, "up_blocks.3": 4096, "down_blocks.1": 1024, "up_blocks.2": 1024,
                   "down_blocks.2": 256, "up_blocks.1": 256, "mid_block": 64}


def sd15_layers():
    """(path, weight shape, tokens) for every linear in SD1.5's transformer blocks."""
    layers = []
    for path, shape in standard_layout("sd15").shapes.items():
        if ".transformer_blocks." not in path or len(shape) != 2:
            continue
        block = next(b for b in TOKENS_BY_BLOCK if path.startswith(b + "."))
        tokens = 77 if path.endswith(("attn2.to_k", "attn2.to_v")) else TOKENS_BY_BLOCK[block]
        layers.append((path, shape, tokens))
    return layers


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rank", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    args = parser.parse_args(argv)
    dtype = getattr(torch, args.dtype)
    torch.manual_seed(0)
    specs = sd15_layers()
    weights = [torch.randn(shape, dtype=dtype) * 0.02 for _, shape, _ in specs]
    inputs = [torch.randn(2, tokens, shape[1], dtype=dtype) for _, shape, tokens in specs]
    downs = [torch.randn(args.rank, shape[1], dtype=dtype) * 0.01 for _, shape, _ in specs]
    ups = [torch.randn(shape[0], args.rank, dtype=dtype) * 0.01 for _, shape, _ in specs]

    def base_pass():
        for w, x in zip(weights, inputs):
            torch.nn.functional.linear(x, w)

    def merge():
        for w, d, u in zip(weights, downs, ups):
            (w.float() + 0.8 * (u.float() @ d.float())).to(w.dtype)

    def runtime_step():
        for w, x, d, u in zip(weights, inputs, downs, ups):
            torch.nn.functional.linear(x, w) + (x @ d.t()) @ u.t() * 0.8

    base = median_time(base_pass, args.repeats)
    merged = median_time(merge, args.repeats)
    step = median_time(runtime_step, args.repeats)
    print(f"machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}, {args.dtype}")
    print(f"layers: {len(specs)} SD1.5 transformer linears, rank {args.rank}")
    print(f"base pass (all layers once, 512px CFG batch): {base * 1000:.1f} ms")
    print(f"merge (all layers, float32):                  {merged / base:.3f} x base pass")
    print(f"runtime step (base + low-rank):               {step / base:.3f} x base pass "
          f"(overhead {step / base - 1:+.1%})")


if __name__ == "__main__":
    main()
