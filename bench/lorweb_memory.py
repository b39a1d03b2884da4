"""GPU memory of LoRWeB training on FLUX.2 and Qwen-Image-Edit, estimated by arithmetic (not measured: no GPU here).

    .venv/bin/python -m bench.lorweb_memory            # the presets and the configurations that do not fit

Parameter counts: transformers and VAEs counted exactly from the diffusers classes built on the meta device with the
published configurations (FLUX.2 dev, klein 4B / 9B, Qwen-Image); text encoders from their published sizes; the
LoRWeB basis from the pack's own target list (every linear of the blocks) at the preset's N, r=4, d=128,
CLIP ViT-L/14 queries.

What the trainer keeps on the GPU and what this counts (bytes per parameter or value):
- frozen transformer, VAE, text encoder and CLIP query encoder in bf16 (2); the trainer encodes prompts every step, so
  the text encoder stays resident;
- the basis in fp32 (4) + its gradients (4) + 8-bit AdamW states (2);
- activations with gradient checkpointing: every block's input kept for the backward pass (tokens x width, bf16) plus
  one block recomputed at a time (about 24 values per token and width unit: q/k/v, attention output, the MLP's
  2·mlp-width input and its activation, norms, the basis' rank-128 intermediate per linear), tokens = the target grid +
  the reference grid + text;
- 1.5 GB of CUDA context and workspace, and 10 % allocator slack on top.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

import torch
from diffusers import AutoencoderKLFlux2, AutoencoderKLQwenImage, Flux2Transformer2DModel, QwenImageTransformer2DModel

from analogy_core.layouts import flux2_layout, qwen_image_layout
from analogy_core.lorweb.basis import basis_targets
from training.lorweb.config import PRESETS

GB = 1024 ** 3
FLUX2_DEV = {"num_layers": 8, "num_single_layers": 48, "attention_head_dim": 128, "num_attention_heads": 48,
             "in_channels": 128, "joint_attention_dim": 15360, "mlp_ratio": 3.0, "guidance_embeds": True}
FLUX2_KLEIN_4B = dict(FLUX2_DEV, num_layers=5, num_single_layers=20, num_attention_heads=24, joint_attention_dim=7680,
                      guidance_embeds=False)
FLUX2_KLEIN_9B = dict(FLUX2_DEV, num_layers=8, num_single_layers=24, num_attention_heads=32, joint_attention_dim=12288,
                      guidance_embeds=False)
QWEN_IMAGE = {"num_layers": 60, "attention_head_dim": 128, "num_attention_heads": 24, "in_channels": 64,
              "out_channels": 16, "patch_size": 2, "joint_attention_dim": 3584}
# published parameter counts of the text encoders (model cards) and CLIP ViT-L/14's vision tower
TEXT_ENCODERS = {"Mistral-Small-3.1-24B": 24.0e9, "Qwen3-4B": 4.02e9, "Qwen3-8B": 8.19e9, "Qwen2.5-VL-7B": 8.29e9}
CLIP_VISION = 0.30e9
TEXT_TOKENS = 512  # FLUX.2's max_sequence_length; Qwen-Image-Edit: template + prompt + the grid's ~190 vision tokens


@dataclass(frozen=True)
class Editor:
    name: str
    spec: str
    config: dict
    text_encoder: str

    @property
    def is_flux2(self) -> bool:
        return self.spec.startswith("flux2")


EDITORS = [
    Editor("FLUX.2 [klein] base 4B", "flux2:black-forest-labs/FLUX.2-klein-base-4B", FLUX2_KLEIN_4B, "Qwen3-4B"),
    Editor("FLUX.2 [klein] base 9B", "flux2:black-forest-labs/FLUX.2-klein-base-9B", FLUX2_KLEIN_9B, "Qwen3-8B"),
    Editor("FLUX.2 dev", "flux2:black-forest-labs/FLUX.2-dev", FLUX2_DEV, "Mistral-Small-3.1-24B"),
    Editor("Qwen-Image-Edit-2509", "qwen_image_edit:Qwen/Qwen-Image-Edit-2509", QWEN_IMAGE, "Qwen2.5-VL-7B"),
]


def model_parameters(editor: Editor) -> tuple[int, int]:
    """(transformer, VAE) parameter counts of the real classes with the published configuration."""
    with torch.device("meta"):  # the VAE classes' default configs are the published ones
        if editor.is_flux2:
            transformer, vae = Flux2Transformer2DModel(**editor.config), AutoencoderKLFlux2()
        else:
            transformer, vae = QwenImageTransformer2DModel(**editor.config), AutoencoderKLQwenImage()
    return (sum(p.numel() for p in transformer.parameters()), sum(p.numel() for p in vae.parameters()))


def basis_parameters(editor: Editor, n: int, r: int = 4, d: int = 128, q: int = 3 * 768) -> tuple[int, int]:
    """(targeted layers, basis parameters): per layer N·r·(in + out) + N·d + d·Q."""
    layout = flux2_layout(**editor.config) if editor.is_flux2 else qwen_image_layout(**editor.config)
    targets = basis_targets(layout)
    return len(targets), sum(n * r * (shape[0] + shape[1]) + n * d + d * q for shape in targets.values())


def estimate(editor: Editor, batch: int, grid: int = 512, entries: int = 32) -> dict[str, float]:
    transformer, vae = model_parameters(editor)
    layers, basis = basis_parameters(editor, entries)
    hidden = editor.config["attention_head_dim"] * editor.config["num_attention_heads"]
    blocks = editor.config["num_layers"] + editor.config.get("num_single_layers", 0)
    tokens = 2 * (grid // 16) ** 2 + TEXT_TOKENS  # target + reference grid (16 px per token) + text
    frozen = 2 * (transformer + vae + TEXT_ENCODERS[editor.text_encoder] + CLIP_VISION)
    trainable = (4 + 4 + 2) * basis
    saved = 2 * batch * tokens * hidden * blocks
    one_block = 2 * batch * tokens * hidden * 24
    total = (frozen + trainable + saved + one_block) * 1.10 + 1.5 * GB
    return {"transformer_B": transformer / 1e9, "text_B": TEXT_ENCODERS[editor.text_encoder] / 1e9,
            "layers": layers, "basis_M": basis / 1e6, "frozen_GB": frozen / GB, "basis_GB": trainable / GB,
            "activations_GB": (saved + one_block) / GB, "total_GB": total / GB, "tokens": tokens, "batch": batch}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.parse_args(argv)
    rows = []
    for name, preset in PRESETS.items():
        editor = next((e for e in EDITORS if e.spec == preset.get("backbone")), None)
        if editor is not None:
            rows.append((f"preset {name}", editor, preset["batch_size"], preset["grid_resolution"],
                         preset.get("num_entries", 32)))
    rows += [("(no preset) Qwen-Image-Edit at the official N=32", EDITORS[3], 1, 512, 32),
             ("(no preset) 80 GB does not hold it", EDITORS[2], 1, 512, 32),
             ("(no preset) 24 GB does not hold it", EDITORS[3], 1, 512, 16)]
    print("LoRWeB training memory, ESTIMATED from parameter counts (not measured), bf16 weights, 8-bit AdamW, "
          "gradient checkpointing, r=4 d=128")
    for label, editor, batch, grid, entries in rows:
        e = estimate(editor, batch, grid, entries)
        print(f"{label}: {editor.name} ({e['transformer_B']:.1f}B transformer, {editor.text_encoder} "
              f"{e['text_B']:.1f}B), grid {grid}, batch {batch}, {e['tokens']} tokens: basis N={entries} on {e['layers']} layers "
              f"{e['basis_M']:.0f}M params; frozen weights {e['frozen_GB']:.1f} GB + basis/grads/Adam "
              f"{e['basis_GB']:.1f} GB + activations {e['activations_GB']:.1f} GB -> ~{e['total_GB']:.0f} GB")


if __name__ == "__main__":
    main()
