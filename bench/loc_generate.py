"""LoRA of Change inference cost at SD1.5 / 512-px shapes, on CPU, as ratios to one UNet step.

    .venv/bin/python -m bench.loc_generate [--repeats 3] [--rank 4]

1. Generate LoRA: an ANALOGY (CLIP ViT-L/14 patch tokens, 257 x 1024, of A and A′) -> H -> the pack's LoRA for the
   32 attention layers x q/k/v/out of SD1.5 (rank 4, the default; H = 435M parameters: P, a 6-block decoder at
   width 512, 32 heads), including the norm check of every generated layer — what the Generate LoRA node does.
2. Baseline: one forward pass of the InstructPix2Pix UNet (SD1.5 architecture with 8 input channels) at 512 px
   (latent 64 x 64, batch 1, 77 text tokens) — one sampler step without CFG (InstructPix2Pix's CFG runs 3 of them).

Both use random float32 weights (timing does not depend on their values) and run in this process, interleaved.
"""

from __future__ import annotations

import argparse
import platform

import torch
from diffusers import UNet2DConditionModel

from analogy_core.analogy import AnalogyEmbedding, EncoderInfo
from analogy_core.layouts import SD15_UNET_CONFIG, standard_layout
from analogy_core.loc import HypernetworkConfig, attention_targets, build_hypernetwork, generate_lora
from bench.timing import median_time

VIT_L = EncoderInfo.describe(768, 1024, 224, 14, 24)  # CLIP ViT-L/14: 257 tokens of width 1024


def random_unet():
    with torch.device("meta"):
        unet = UNet2DConditionModel(**dict(SD15_UNET_CONFIG, in_channels=8))
    unet = unet.to_empty(device="cpu").eval()
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in unet.named_parameters():
            if param.ndim > 1:
                param.copy_(torch.randn(param.shape, generator=gen) / param[0].numel() ** 0.5)
            else:
                param.fill_(0.0 if name.endswith("bias") else 1.0)
    return unet


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--rank", type=int, default=4)
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    config = HypernetworkConfig(attention_targets(standard_layout("sd15")), token_width=1024, encoder=VIT_L,
                                token_count=257, rank=args.rank)
    hypernetwork = build_hypernetwork(config, seed=0).eval()
    with torch.no_grad():
        for _, view in hypernetwork.u_b_parameters():
            view.normal_(std=0.01)  # a trained H: non-zero updates
    gen = torch.Generator().manual_seed(1)
    analogy = AnalogyEmbedding(VIT_L, {r: torch.randn(1, 768, generator=gen) for r in ("a", "a_prime")},
                               {r: torch.randn(1, 257, 1024, generator=gen) for r in ("a", "a_prime")})
    unet = random_unet()
    sample = torch.randn(1, 8, 64, 64, generator=gen)
    text = torch.randn(1, 77, 768, generator=gen)
    timestep = torch.tensor([500])

    def generate():
        return generate_lora(hypernetwork, analogy)

    @torch.no_grad()
    def unet_step():
        return unet(sample, timestep, encoder_hidden_states=text).sample

    @torch.no_grad()
    def decoder_only():
        return hypernetwork(analogy.patch_tokens["a"], analogy.patch_tokens["a_prime"])

    t_unet = median_time(unet_step, args.repeats)
    t_generate = median_time(generate, args.repeats)
    t_forward = median_time(decoder_only, args.repeats)
    t_unet_2 = median_time(unet_step, args.repeats)  # again after, to see drift on a shared machine
    lora = generate()
    params_h = sum(p.numel() for p in hypernetwork.parameters())
    params_u = sum(p.numel() for p in unet.parameters())
    print(f"machine: {platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}")
    print(f"H: {params_h / 1e6:.0f}M parameters, rank {args.rank}; LoRA: {lora.summary()}")
    print(f"UNet (SD1.5, 8 input channels): {params_u / 1e6:.0f}M parameters; one step at 512 px (64x64 latent, "
          f"batch 1): {t_unet:.2f} s before, {t_unet_2:.2f} s after")
    base = (t_unet + t_unet_2) / 2
    print(f"Generate LoRA (H + LoRA + checks): {t_generate:.3f} s -> {t_generate / base:.3f}x one UNet step")
    print(f"  of which H's forward pass:       {t_forward:.3f} s -> {t_forward / base:.3f}x one UNet step")


if __name__ == "__main__":
    main()
