"""Training configuration: the common base every trainer shares and the precedence that builds a config.

Precedence: dataclass defaults < ``--preset`` < ``--config file.yaml`` < ``--set key=value`` overrides.
Each trainer declares its own dataclass (a subclass of :class:`CommonConfig`) and preset table; :func:`build_config`
applies the precedence for any of them.

Each method's config and presets live in ``training/<method>/config.py``.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import torch
import yaml

from training.flow import TIMESTEP_SAMPLINGS
from training.lr_schedule import check_schedule


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
    lr_schedule: str = "constant"    # or constant_with_warmup, linear, cosine (diffusers' schedules; lr_schedule.py)
    lr_warmup_steps: int = 0
    use_8bit_adam: bool = False      # bitsandbytes AdamW8bit when it and CUDA are available, else torch AdamW
    mixed_precision: str = "no"      # "no", "fp16", "bf16"
    gradient_checkpointing: bool = False
    # torch.compile the task's compile_targets (its denoiser) for the training steps, in place: parameter names,
    # checkpoints and files unchanged; samples run eager. The first compile of a graph takes a minute or two
    # (torch caches it on disk for later runs); whether steps get faster depends on the model and device
    torch_compile: bool = False
    seed: int = 0
    num_workers: int = 2
    # bookkeeping
    checkpoint_every: int = 500
    keep_checkpoints: int = 3
    keep_exports: bool = False       # also keep each checkpoint's output file as <name>.step_N.safetensors
    sample_every: int = 500
    log_every: int = 10
    report_to: str = "tensorboard"   # "tensorboard", "wandb", "none", ...

    def update(self, values: dict[str, Any]) -> "CommonConfig":
        known = {f.name for f in dataclasses.fields(self)}
        for key, value in values.items():
            if key not in known:
                raise ValueError(f"unknown config key {key!r}; known keys: {sorted(known)}")
            default = getattr(self, key)
            if value is None and isinstance(default, str):  # YAML's empty value or null: off, as "" is
                value = ""
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
        """Raise ValueError for values no run can use (subclasses add their own checks): checked before anything
        loads, so a typo in a long run's config costs seconds, not a backbone load."""
        check_field_types(self)
        for key in ("batch_size", "gradient_accumulation_steps", "max_steps", "checkpoint_every", "sample_every",
                    "log_every", "keep_checkpoints"):
            value = getattr(self, key)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{key} must be a positive integer, got {value!r}")
        if self.mixed_precision not in ("no", "fp16", "bf16"):
            raise ValueError(f"mixed_precision must be no, fp16 or bf16, got {self.mixed_precision!r}")
        if not self.max_grad_norm >= 0:
            raise ValueError(f"max_grad_norm must be >= 0 (0 = no clipping), got {self.max_grad_norm!r}")
        if self.learning_rate < 0:  # 0 is legitimate: one step that changes nothing (the yardstick's init figures)
            raise ValueError(f"learning_rate must be a finite number >= 0, got {self.learning_rate!r}")
        for key in ("adam_beta1", "adam_beta2"):
            if not 0 <= getattr(self, key) < 1:
                raise ValueError(f"{key} must be in [0, 1), got {getattr(self, key)!r}")
        if not self.adam_epsilon > 0 or not self.weight_decay >= 0:
            raise ValueError(f"adam_epsilon must be > 0 and weight_decay >= 0, got {self.adam_epsilon!r} and "
                             f"{self.weight_decay!r}")
        check_schedule(self.lr_schedule, self.lr_warmup_steps, self.max_steps)
        if self.torch_compile and not hasattr(torch.compiler, "set_stance"):
            raise ValueError(f"torch_compile needs torch >= 2.6 (samples run eager through torch.compiler.set_stance); "
                             f"this is torch {torch.__version__}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


Config = TypeVar("Config", bound=CommonConfig)
_TYPE_WORDS = {bool: "true or false", int: "an integer", float: "a number", str: "text"}


def _fits(expected: type, value: Any) -> bool:
    if expected is float:  # an integer is a number too; no key has an infinite or NaN value
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    return isinstance(value, expected) and (expected is bool or not isinstance(value, bool))


def check_field_types(config: CommonConfig) -> None:
    """Every key declared as bool, int, float (finite) or text holds one (a float key takes an integer too), and a
    list key a list of those: a YAML file or a ``--set`` that gives ``num_entries=abc``, ``max_steps=1.5``,
    ``weight_decay=.inf`` or ``targets=blocks.*`` (text, not a list) is refused by name instead of failing mid-build
    or, for the list, being read letter by letter."""
    hints = typing.get_type_hints(type(config))
    for field in dataclasses.fields(config):
        expected, value = hints.get(field.name), getattr(config, field.name)
        if typing.get_origin(expected) is list and typing.get_args(expected)[0] in _TYPE_WORDS:
            item = typing.get_args(expected)[0]
            if not (isinstance(value, list) and all(_fits(item, v) for v in value)):
                raise ValueError(f"{field.name} must be a list of {_TYPE_WORDS[item]} (e.g. --set "
                                 f"'{field.name}=[a, b]'), got {value!r} ({type(value).__name__})")
        elif expected in _TYPE_WORDS and not _fits(expected, value):
            raise ValueError(f"{field.name} must be {_TYPE_WORDS[expected]}"
                             f"{' (finite)' if expected is float else ''}, got {value!r} ({type(value).__name__})")


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


class FourPanelSettings:
    """What every four-panel trainer's config (LoRWeB, Edit Transfer; dataclasses that declare ``grid_resolution``,
    ``panel_fit``, ``timestep_sampling`` and ``caption_dropout``) shares: the panel side and their validation."""

    @property
    def panel_resolution(self) -> int:
        return self.grid_resolution // 2

    def validate(self) -> None:
        super().validate()
        check_four_panel_settings(self)


def check_four_panel_settings(cfg: CommonConfig) -> None:
    """The grid size, how panels are fitted, the timestep sampling and the caption dropout."""
    if cfg.grid_resolution % 32:
        raise ValueError(f"grid_resolution must be a multiple of 32 (two panels, each a whole number of 16-px "
                         f"FLUX patches), got {cfg.grid_resolution}")
    choices = {"panel_fit": ("stretch", "center_crop"), "timestep_sampling": TIMESTEP_SAMPLINGS}
    for key, allowed in choices.items():
        if getattr(cfg, key) not in allowed:
            raise ValueError(f"{key} must be one of {allowed}, got {getattr(cfg, key)!r}")
    if not 0 <= cfg.caption_dropout <= 1:
        raise ValueError(f"caption_dropout must be in [0, 1], got {cfg.caption_dropout}")


def without_local_path(spec: str) -> str:
    """"quads:/home/me/d/quads.jsonl" -> "quads:quads.jsonl"; model ids and "tiny" stay as they are."""
    parts = spec.split(":")
    return ":".join(Path(p).name if ("/" in p or "\\" in p) and (Path(p).is_absolute() or Path(p).exists()) else p
                    for p in parts)
