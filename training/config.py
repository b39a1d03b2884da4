"""Training configuration: one dataclass with the official LoRWeB defaults, YAML files and presets.

Precedence: dataclass defaults < ``--preset`` < ``--config file.yaml`` < ``--set key=value`` overrides.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


@dataclass
class TrainConfig:
    # backbone: a local diffusers folder of FLUX.1-Kontext (transformer/, vae/, text_encoder*/, tokenizer*/) or a
    # model id already in the local Hugging Face cache; "tiny" builds random small models (tests, smoke runs).
    backbone: str = "black-forest-labs/FLUX.1-Kontext-dev"
    # query encoder: a transformers CLIP vision folder or cached id, "open_clip:<arch>:<weights.safetensors>", or "tiny"
    query_encoder: str = "openai/clip-vit-large-patch14"
    output_dir: str = "outputs/lorweb"
    # data: "relation252k:<folder>", "quads:<file.jsonl>" or "synthetic"
    data: str = "relation252k:data/Relation252K"
    # side of the 2x2 training grid in pixels (each panel is half of it). The paper trains on images of at most 512 px
    # on the long edge; the grid is the training image.
    grid_resolution: int = 512
    caption_dropout: float = 0.05
    # LoRWeB basis (official: N=32, r=4, d=128, query = CLIP ViT-L/14 embeds of a, a', b)
    num_entries: int = 32
    rank: int = 4
    key_dim: int = 128
    targets: list[str] = field(default_factory=lambda: ["transformer_blocks.*", "single_transformer_blocks.*"])
    # optimisation (official: batch 6, 10k steps, lr 1e-3, 8-bit AdamW (0.9, 0.99), wd 0.05, bf16)
    batch_size: int = 6
    gradient_accumulation_steps: int = 1
    max_steps: int = 10_000
    learning_rate: float = 1e-3
    adam_beta1: float = 0.9
    adam_beta2: float = 0.99
    weight_decay: float = 0.05
    use_8bit_adam: bool = True       # used when bitsandbytes and CUDA are available, else torch AdamW
    mixed_precision: str = "bf16"    # "no", "fp16", "bf16"
    gradient_checkpointing: bool = True
    timestep_sampling: str = "weighted"   # "weighted" (logit-normal, mid-heavy) or "uniform"
    guidance: float = 1.0
    seed: int = 0
    num_workers: int = 2
    # bookkeeping
    checkpoint_every: int = 500
    keep_checkpoints: int = 3
    sample_every: int = 500
    sample_steps: int = 28
    log_every: int = 10
    report_to: str = "tensorboard"

    @property
    def panel_resolution(self) -> int:
        return self.grid_resolution // 2

    def update(self, values: dict[str, Any]) -> "TrainConfig":
        known = {f.name: f for f in dataclasses.fields(self)}
        for key, value in values.items():
            if key not in known:
                raise ValueError(f"unknown config key {key!r}; known keys: {sorted(known)}")
            default = getattr(self, key)
            if isinstance(value, str) and not isinstance(default, str):
                value = yaml.safe_load(value)  # --set numbers/booleans/lists arrive as text
            setattr(self, key, value)
        return self

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


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


def load_config(preset: str | None = None, path: str | Path | None = None,
                overrides: list[str] | None = None) -> TrainConfig:
    config = TrainConfig()
    if preset:
        if preset not in PRESETS:
            raise ValueError(f"unknown preset {preset!r}; choose from {sorted(PRESETS)}")
        config.update(PRESETS[preset])
    if path:
        values = yaml.safe_load(Path(path).read_text()) or {}
        if not isinstance(values, dict):
            raise ValueError(f"{path}: expected a mapping of config keys")
        config.update(values)
    for item in overrides or []:
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"--set expects key=value, got {item!r}")
        config.update({key.strip(): value})
    if config.grid_resolution % 32:
        raise ValueError(f"grid_resolution must be a multiple of 32 (two panels, each a whole number of 16-px FLUX "
                         f"patches), got {config.grid_resolution}")
    return config
