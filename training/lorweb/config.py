"""LoRWeB's training config with the official defaults (NVlabs/LoRWeB, commit 54d8e27, stated next to each key) and
its presets."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from analogy_core.lorweb.settings import LoRWeBSettings
from training.config import CommonConfig, FourPanelSettings, build_config


@dataclass
class LoRWeBConfig(FourPanelSettings, CommonConfig):
    # backbone: a local diffusers folder of FLUX.1-Kontext (transformer/, vae/, text_encoder*/, tokenizer*/) or a
    # model id already in the local Hugging Face cache; "tiny" builds random small models (tests, smoke runs).
    # "flux2:<folder or id>" (FLUX.2 dev or klein) and "qwen_image_edit:<folder or id>" train for the new editors
    # ("flux2:tiny", "qwen_image_edit:tiny" for smoke runs); see training/editors.py.
    backbone: str = "black-forest-labs/FLUX.1-Kontext-dev"
    # query encoder: a transformers CLIP vision folder or cached id, "open_clip:<arch>:<weights.safetensors>", or "tiny"
    query_encoder: str = "openai/clip-vit-large-patch14"
    output_dir: str = "outputs/lorweb"
    # data: "relation252k:<folder>", "quads:<file.jsonl>" or "synthetic"
    data: str = "relation252k:data/Relation252K"
    # side of the 2x2 training grid in pixels (each panel is half of it). Official: 512 (the control/target grids are
    # built at 1024 from 512-px panels and resized to 512).
    grid_resolution: int = 512
    # how a panel of another aspect ratio becomes square. Official: "stretch" (every image is resized to the panel,
    # bicubic, aspect not kept). "center_crop" keeps the aspect and crops the middle.
    panel_fit: str = "stretch"
    # Relation252K caption of the analogy (pair i<j of a task): official = the edit instruction of image i, the
    # (a, a') pair; the user describes a -> a' at inference.
    caption_source: str = "a"
    caption_dropout: float = 0.05    # official: captions dropped to "" with probability 0.05
    # Official `is_bidirectional_analogy` (default off): with probability 0.5 train on the reversed analogy
    # (a', a, b', b) instead of (a, a', b, b'), same caption.
    bidirectional_analogy: bool = False
    # True: no basis; train every weight of the transformer with the same objective and write the whole transformer
    # (lorweb_transformer.safetensors): the analogy world's full fine-tune ceiling, not something this pack ships
    full_finetune: bool = False
    # LoRWeB basis (official: N=32, r=4, d=128)
    num_entries: int = 32
    rank: int = 4
    key_dim: int = 128
    # mixing settings recorded in the basis (official released checkpoint: one head, softmax, query = CLIP ViT-L/14
    # image embeds of a, a', b concatenated). See analogy_core.lorweb.settings.
    lora_heads: int = 1
    lora_softmax: bool = True        # False: tanh coefficients
    mixing_coeffs_type: str = "mean"
    query_mode: str = "cat-aa'b"
    targets: list[str] = field(default_factory=lambda: ["transformer_blocks.*", "single_transformer_blocks.*"])
    # optimisation (official: batch 6, 10k steps, lr 1e-3 constant, 8-bit AdamW betas (0.9, 0.99) eps 1e-6, weight
    # decay 0.05, global grad-norm clip 1.0, bf16, gradient checkpointing)
    batch_size: int = 6
    max_steps: int = 10_000
    learning_rate: float = 1e-3
    adam_beta1: float = 0.9
    adam_beta2: float = 0.99
    adam_epsilon: float = 1e-6
    weight_decay: float = 0.05
    max_grad_norm: float = 1.0
    use_8bit_adam: bool = True
    mixed_precision: str = "bf16"
    gradient_checkpointing: bool = True
    # Timesteps. "official": t uniform over indices 0-998 of the official 1000-step schedule (t = 1 ... 0.002, as the
    # official code draws them) with the bell-shaped loss weight
    # the official code applies for `timestep_type: weighted`; "logit_normal" (SD3-style, mid-heavy t, unweighted);
    # "uniform" (unweighted).
    timestep_sampling: str = "official"
    guidance: float = 1.0            # official: FLUX guidance embedding 1.0 during training
    sample_steps: int = 28

    def validate(self) -> None:
        super().validate()
        if self.caption_source not in ("a", "b"):
            raise ValueError(f"caption_source must be one of ('a', 'b'), got {self.caption_source!r}")
        for key in ("num_entries", "rank", "key_dim"):
            if getattr(self, key) < 1:
                raise ValueError(f"{key} must be a positive integer, got {getattr(self, key)!r}")
        if not self.full_finetune and self.lora_heads >= 1 and self.key_dim % self.lora_heads:
            raise ValueError(f"lora_heads ({self.lora_heads}) must divide key_dim ({self.key_dim}): each head reads "
                             "an equal slice of the keys")
        # the mixing settings' own checks (heads, softmax/tanh, mean/sum, query mode), before the backbone loads;
        # build() binds them to the query encoder
        LoRWeBSettings(lora_heads=self.lora_heads, lora_softmax=self.lora_softmax,
                       mixing_coeffs_type=self.mixing_coeffs_type, query_mode=self.query_mode, source="config")


TrainConfig = LoRWeBConfig  # the name earlier releases used

PRESETS: dict[str, dict[str, Any]] = {
    "official": {},
    # Runs the whole pipeline on a CPU in about a minute: random tiny backbone, VAE, text and query encoders, and a
    # synthetic analogy dataset generated on the fly (colour inversion, grayscale, channel swap, flips).
    "tiny": dict(backbone="tiny", query_encoder="tiny", data="synthetic", grid_resolution=64, num_entries=8, rank=2,
                 key_dim=16, batch_size=4, max_steps=120, learning_rate=3e-3, use_8bit_adam=False,
                 mixed_precision="no", gradient_checkpointing=False, caption_dropout=0.05, num_workers=0,
                 checkpoint_every=40, sample_every=60, sample_steps=4, log_every=10, report_to="tensorboard",
                 output_dir="outputs/lorweb_tiny"),
}

# The editors users run today (python -m training.train_lorweb --preset <name>; --backbone flux2:<folder> or
# qwen_image_edit:<folder> points at local weights of the same model). Sized for one GPU of 24 or 80 GB by arithmetic
# from parameter counts (bench/lorweb_memory.py; an estimate, not measured: no GPU here). The official objective,
# basis (N=32, r=4, d=128) and effective batch 6 (batch x gradient accumulation); 512-px grids.
_EDITOR_COMMON = {"grid_resolution": 512, "num_entries": 32, "rank": 4, "key_dim": 128, "mixed_precision": "bf16",
                  "use_8bit_adam": True, "gradient_checkpointing": True}
PRESETS.update({
    # FLUX.2 [klein] base 4B (3.9B transformer, Qwen3-4B text encoder). FLUX.2 dev and Qwen-Image-Edit do not fit
    # 24 GB in this trainer (their bf16 transformers alone are 64 and 41 GB).
    "flux2_klein_24gb": dict(_EDITOR_COMMON, backbone="flux2:black-forest-labs/FLUX.2-klein-base-4B", batch_size=1,
                             gradient_accumulation_steps=6, output_dir="outputs/lorweb_flux2_klein"),
    # FLUX.2 [klein] base 9B (9.1B transformer, Qwen3-8B). FLUX.2 dev (32B + a 24B text encoder) needs more than 80 GB.
    "flux2_klein_80gb": dict(_EDITOR_COMMON, backbone="flux2:black-forest-labs/FLUX.2-klein-base-9B", batch_size=6,
                             gradient_accumulation_steps=1, output_dir="outputs/lorweb_flux2_klein9"),
    # Qwen-Image-Edit-2509 (20.4B transformer, Qwen2.5-VL-7B reading the grid with the prompt). Its 60 blocks hold
    # 840 linears: a basis of N=32 is 1.4B parameters (13 GB with gradients and Adam states, ~77 GB in all), so this
    # preset halves N to keep a margin (~71 GB: python -m bench.lorweb_memory).
    "qwen_image_edit_80gb": dict(_EDITOR_COMMON, backbone="qwen_image_edit:Qwen/Qwen-Image-Edit-2509", num_entries=16,
                                 batch_size=1, gradient_accumulation_steps=6,
                                 output_dir="outputs/lorweb_qwen_image_edit"),
})


def load_config(preset: str | None = None, path: str | Path | None = None,
                overrides: list[str] | None = None) -> LoRWeBConfig:
    """LoRWeB's config (kept for callers of earlier releases; other trainers call :func:`build_config`)."""
    return build_config(LoRWeBConfig, PRESETS, preset, path, overrides)
