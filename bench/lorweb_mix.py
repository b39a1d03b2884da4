"""LoRWeB inference costs at the released checkpoint's shapes, on CPU, as ratios.

    .venv/bin/python -m bench.lorweb_mix [--repeats 3] [--tokens 4608]

1. Mixing: coefficients + the exact rank-N·r composition for all 494 FLUX layers (N=32, r=4, d=128, Q=3·768),
   random float16 weights like the released file, vs materialising ΔW = Σ c_n A_n B_n for every layer (what a
   naive implementation would hand to a weight patcher).
2. Runtime mode: one 3072->3072 linear at FLUX width with a rank-128 mixed LoRA added in the forward pass
   ((x·downᵀ)·upᵀ), vs the bare linear; tokens = 4096 image + 512 text by default (1024 px Kontext grid).
Each pair is timed in turn within every repeat. The basis is mixed with the released checkpoint's settings
(``--heads 2 --tanh`` for another basis' settings).
"""

from __future__ import annotations

import argparse
import platform

import torch

from analogy_core.lorweb.basis import random_basis
from analogy_core.layouts import standard_layout
from analogy_core.lorweb.settings import LoRWeBSettings
from bench.timing import interleaved_median_times


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=4608)
    parser.add_argument("--heads", type=int, default=1)
    parser.add_argument("--tanh", action="store_true", help="tanh instead of softmax coefficients")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    layout = standard_layout("flux")
    shapes = {p: s for p, s in layout.shapes.items() if p.startswith(("transformer_blocks.", "single_transformer"))}
    basis = random_basis(shapes, num_entries=32, rank=4, key_dim=128, query_dim=3 * 768)
    basis = type(basis)({p: type(l)(l.A.half(), l.B.half(), l.keys.half(), l.to_q.half())
                         for p, l in basis.layers.items()})
    basis = basis.with_settings(LoRWeBSettings(lora_heads=args.heads, lora_softmax=not args.tanh))
    params = sum(l.A.numel() + l.B.numel() + l.keys.numel() + l.to_q.numel() for l in basis.layers.values())
    query = torch.randn(1, 3 * 768)

    def mix():
        return basis.mix(basis.coefficients(query))

    def materialise():
        coefficients = basis.coefficients(query)
        for path, layer in basis.layers.items():
            c = coefficients[path][0]
            torch.einsum("n,nir,nro->oi", c, layer.A.float(), layer.B.float())

    times = interleaved_median_times({"mix": mix, "dense": materialise}, args.repeats)
    t_mix, t_dense = times["mix"], times["dense"]

    x = torch.randn(args.tokens, 3072)
    weight = torch.randn(3072, 3072) / 3072 ** 0.5
    lora = mix().layers["transformer_blocks.0.attn.to_q"]
    down, up = lora.down.float(), lora.up.float().contiguous()  # what runtime mode caches per layer

    def bare():
        return torch.nn.functional.linear(x, weight)

    def with_lora():
        return torch.nn.functional.linear(x, weight) + (x @ down.t()) @ up.t()

    times = interleaved_median_times({"bare": bare, "lora": with_lora}, args.repeats * 5)
    t_bare, t_lora = times["bare"], times["lora"]
    print(f"machine: {platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}; "
          f"mixing {basis.settings.describe()}")
    print(f"basis: {len(basis.layers)} layers, {params / 1e6:.0f}M parameters (float16)")
    print(f"mix (coefficients + exact rank-128 LoRA, all layers): {t_mix:.2f} s")
    print(f"materialising dense ΔW instead:                      {t_dense:.2f} s  -> mix is {t_dense / t_mix:.1f}x faster")
    print(f"runtime linear 3072x3072, {args.tokens} tokens: bare {t_bare * 1000:.1f} ms, with rank-128 LoRA "
          f"{t_lora * 1000:.1f} ms -> {t_lora / t_bare:.3f}x ({t_lora / t_bare - 1:+.1%})")


if __name__ == "__main__":
    main()
