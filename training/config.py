"""Training configuration: a common base every trainer shares, LoRWeB's config with the official defaults, presets.

Precedence: dataclass defaults < ``--preset`` < ``--config file.yaml`` < ``--set key=value`` overrides.
Each trainer declares its own dataclass (a subclass of :class:`CommonConfig`) and preset table; :func:`build_config`
applies the precedence for any of them.

LoRWeB defaults follow the official code (NVlabs/LoRWeB, commit 54d8e27) and are stated next to each key.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import yaml


@dataclass
class CommonConfig:
    """Keys every trainer has: where to write, data, optimisation, bookkeeping."""

    output_dir: str = "outputs/run"
    data: str = ""
    batch_size: int = 1
    gradient_accumulation_steps: int = 1
    max_steps: int = 1000
    learning_rate: float = 1e-4
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_epsilon: float = 1e-8
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0       # global gradient-norm clipping every step; 0 switches it off
    use_8bit_adam: bool = False      # bitsandbytes AdamW8bit when it and CUDA are available, else torch AdamW
    mixed_precision: str = "no"      # "no", "fp16", "bf16"
    gradient_checkpointing: bool = False
    seed: int = 0
    num_workers: int = 2
    # bookkeeping
    checkpoint_every: int = 500
    keep_checkpoints: int = 3
    sample_every: int = 500
    log_every: int = 10
    report_to: str = "tensorboard"   # "tensorboard", "wandb", "none", ...

    def update(self, values: dict[str, Any]) -> "CommonConfig":
        known = {f.name for f in dataclasses.fields(self)}
        for key, value in values.items():
            if key not in known:
                raise ValueError(f"unknown config key {key!r}; known keys: {sorted(known)}")
            default = getattr(self, key)
            if isinstance(value, str) and not isinstance(default, str):
                value = yaml.safe_load(value)  # --set numbers/booleans/lists arrive as text
                if isinstance(default, float) and isinstance(value, str):
                    try:  # YAML 1.1 reads "1e-3" (no dot) as text
                        value = float(value)
                    except ValueError:
                        raise ValueError(f"{key} must be a number, got {value!r}") from None
            setattr(self, key, value)
        return self

    def validate(self) -> None:
        """Raise ValueError for values no run can use (subclasses add their own checks)."""
        for key in ("batch_size", "gradient_accumulation_steps", "max_steps", "checkpoint_every", "sample_every",
                    "log_every", "keep_checkpoints"):
            value = getattr(self, key)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{key} must be a positive integer, got {value!r}")
        if self.mixed_precision not in ("no", "fp16", "bf16"):
            raise ValueError(f"mixed_precision must be no, fp16 or bf16, got {self.mixed_precision!r}")
        if not self.max_grad_norm >= 0:
            raise ValueError(f"max_grad_norm must be >= 0 (0 = no clipping), got {self.max_grad_norm!r}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


Config = TypeVar("Config", bound=CommonConfig)


def build_config(config_cls: type[Config], presets: dict[str, dict[str, Any]], preset: str | None = None,
                 path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Defaults < preset < YAML file < ``key=value`` overrides, then validated."""
    config = config_cls()
    if preset:
        if preset not in presets:
            raise ValueError(f"unknown preset {preset!r}; choose from {sorted(presets)}")
        config.update(presets[preset])
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
    config.validate()
    return config


def check_four_panel_settings(cfg: CommonConfig) -> None:
    """The settings every four-panel trainer shares (LoRWeB, Edit Transfer): the grid size, how panels are fitted, the
    timestep sampling and the caption dropout."""
    from training.flow import TIMESTEP_SAMPLINGS

    if cfg.grid_resolution % 32:
        raise ValueError(f"grid_resolution must be a multiple of 32 (two panels, each a whole number of 16-px "
                         f"FLUX patches), got {cfg.grid_resolution}")
    choices = {"panel_fit": ("stretch", "center_crop"), "timestep_sampling": TIMESTEP_SAMPLINGS}
    for key, allowed in choices.items():
        if getattr(cfg, key) not in allowed:
            raise ValueError(f"{key} must be one of {allowed}, got {getattr(cfg, key)!r}")
    if not 0 <= cfg.caption_dropout <= 1:
        raise ValueError(f"caption_dropout must be in [0, 1], got {cfg.caption_dropout}")


# ---------------------------------------------------------------------------------------------------------------------
# LoRWeB


@dataclass
class LoRWeBConfig(CommonConfig):
    # backbone: a local diffusers folder of FLUX.1-Kontext (transformer/, vae/, text_encoder*/, tokenizer*/) or a
    # model id already in the local Hugging Face cache; "tiny" builds random small models (tests, smoke runs).
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
    # LoRWeB basis (official: N=32, r=4, d=128)
    num_entries: int = 32
    rank: int = 4
    key_dim: int = 128
    # mixing settings recorded in the basis (official released checkpoint: one head, softmax, query = CLIP ViT-L/14
    # image embeds of a, a', b concatenated). See analogy_core.lorweb_settings.
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
    # Timesteps. "official": t uniform over the 1000 training steps (t = 1 ... 0.001) with the bell-shaped loss weight
    # the official code applies for `timestep_type: weighted`; "logit_normal" (SD3-style, mid-heavy t, unweighted);
    # "uniform" (unweighted).
    timestep_sampling: str = "official"
    guidance: float = 1.0            # official: FLUX guidance embedding 1.0 during training
    sample_steps: int = 28

    @property
    def panel_resolution(self) -> int:
        return self.grid_resolution // 2

    def validate(self) -> None:
        super().validate()
        check_four_panel_settings(self)
        if self.caption_source not in ("a", "b"):
            raise ValueError(f"caption_source must be one of ('a', 'b'), got {self.caption_source!r}")


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


def load_config(preset: str | None = None, path: str | Path | None = None,
                overrides: list[str] | None = None) -> LoRWeBConfig:
    """LoRWeB's config (kept for callers of earlier releases; other trainers call :func:`build_config`)."""
    return build_config(LoRWeBConfig, PRESETS, preset, path, overrides)
