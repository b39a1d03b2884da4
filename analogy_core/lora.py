"""The pack's one LoRA representation, shared by every method (mixed, generated, trained, loaded, saved, applied).

A LoRA is a set of low-rank weight updates keyed by the **diffusers module path** of the target layer
(``transformer_blocks.0.attn.to_q`` for FLUX, ``down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q`` for SD).
Each layer holds ``down`` [r, in] (``lora_A``), ``up`` [out, r] (``lora_B``) and ``scale`` (= alpha / r), so

    W' = W + strength * scale * up @ down

Convolutions keep their kernel dims: ``down`` [r, in, kh, kw], ``up`` [out, r, 1, 1].
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Iterable

import torch

FAMILIES = ("sd15", "sdxl", "flux", "flux2", "qwen_image", "unknown")  # flux = FLUX.1, flux2 = FLUX.2
FITS_KEY = "analogy.fits"  # metadata: every family a LoRA fits where its file cannot tell (e.g. "sd15,sdxl")
SOURCES = ("file", "mixed", "generated", "trained")


class LoRAError(ValueError):
    """A LoRA is malformed or does not fit what it is used with."""


@dataclass(frozen=True)
class LoRALayer:
    down: torch.Tensor
    up: torch.Tensor
    scale: float = 1.0

    def __post_init__(self) -> None:
        if self.down.ndim not in (2, 4) or self.up.ndim not in (2, 4):
            raise LoRAError(f"down/up must be 2-D (linear) or 4-D (conv); got {tuple(self.down.shape)} and "
                            f"{tuple(self.up.shape)}")
        if self.up.shape[1] != self.down.shape[0]:
            raise LoRAError(f"rank mismatch: down is {tuple(self.down.shape)} (rank {self.down.shape[0]}), up is "
                            f"{tuple(self.up.shape)} (rank {self.up.shape[1]})")
        if not math.isfinite(self.scale):
            raise LoRAError(f"scale must be finite, got {self.scale}")

    @property
    def rank(self) -> int:
        return self.down.shape[0]

    @property
    def in_features(self) -> int:
        return self.down.shape[1]

    @property
    def out_features(self) -> int:
        return self.up.shape[0]

    @property
    def is_conv(self) -> bool:
        return self.down.ndim == 4

    def delta_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """scale * up @ down, shaped like the target weight ([out, in] or [out, in, kh, kw])."""
        up = self.up.flatten(1).to(dtype)
        down = self.down.flatten(1).to(dtype)
        delta = (up @ down) * self.scale
        if self.is_conv:
            return delta.reshape(self.up.shape[0], *self.down.shape[1:])
        return delta

    def folded(self) -> "LoRALayer":
        """Same update with scale 1 (the scale folded into ``up``, computed in float32)."""
        if self.scale == 1.0:
            return self
        up = (self.up.float() * self.scale).to(self.up.dtype)
        return LoRALayer(self.down, up, 1.0)

    def to(self, dtype: torch.dtype | None = None, device: torch.device | str | None = None) -> "LoRALayer":
        return LoRALayer(self.down.to(device=device, dtype=dtype), self.up.to(device=device, dtype=dtype), self.scale)


@dataclass(frozen=True)
class LoRA:
    """Low-rank updates for a diffusion model, keyed by diffusers module path."""

    layers: dict[str, LoRALayer]
    family: str = "unknown"
    source: str = "file"
    metadata: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.family not in FAMILIES:
            raise LoRAError(f"family must be one of {FAMILIES}, got {self.family!r}")
        if self.source not in SOURCES:
            raise LoRAError(f"source must be one of {SOURCES}, got {self.source!r}")

    # -- facts ----------------------------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.layers)

    @property
    def ranks(self) -> set[int]:
        return {layer.rank for layer in self.layers.values()}

    @property
    def num_parameters(self) -> int:
        return sum(layer.down.numel() + layer.up.numel() for layer in self.layers.values())

    @property
    def compatible_families(self) -> tuple[str, ...]:
        """Families whose models this LoRA fits: its own, or several where the file cannot tell (layers that SD1.5
        and SDXL share by name and shape)."""
        fits = tuple(f for f in self.metadata.get(FITS_KEY, "").split(",") if f in FAMILIES)
        return fits if self.family in fits else (self.family,)

    def summary(self) -> str:
        ranks = sorted(self.ranks)
        rank_text = str(ranks[0]) if len(ranks) == 1 else f"{ranks[0]}..{ranks[-1]}" if ranks else "-"
        family = " or ".join(self.compatible_families)
        return (f"LoRA ({self.source}) for {family}: {len(self)} layers, rank {rank_text}, "
                f"{self.num_parameters / 1e6:.2f}M parameters")

    def check_finite(self) -> None:
        """Raise if any tensor holds NaN or Inf (names the first few layers)."""
        bad = [name for name, layer in self.layers.items()
               if not (torch.isfinite(layer.down).all() and torch.isfinite(layer.up).all())]
        if bad:
            raise LoRAError(f"{len(bad)} LoRA layers contain NaN or Inf values, e.g. {bad[:3]}")

    # -- algebra ---------------------------------------------------------------------------------------------------
    def scaled(self, factor: float) -> "LoRA":
        """Every update multiplied by ``factor`` (negative allowed: -1 reverses the LoRA)."""
        layers = {k: replace(v, scale=v.scale * factor) for k, v in self.layers.items()}
        return replace(self, layers=layers)

    def __neg__(self) -> "LoRA":
        return self.scaled(-1.0)

    def to(self, dtype: torch.dtype | None = None, device: torch.device | str | None = None) -> "LoRA":
        return replace(self, layers={k: v.to(dtype, device) for k, v in self.layers.items()})

    def folded(self) -> "LoRA":
        return replace(self, layers={k: v.folded() for k, v in self.layers.items()})

    @staticmethod
    def concatenate(loras: Iterable["LoRA"], source: str = "mixed") -> "LoRA":
        """The exact sum of several LoRAs as one LoRA whose ranks add up (scales folded into ``down``)."""
        loras = list(loras)
        if not loras:
            raise LoRAError("nothing to concatenate")
        families = {lora.family for lora in loras} - {"unknown"}
        if len(families) > 1:
            raise LoRAError(f"cannot combine LoRAs of different model families: {sorted(families)}")
        grouped: dict[str, list[LoRALayer]] = {}
        for lora in loras:
            for name, layer in lora.layers.items():
                grouped.setdefault(name, []).append(layer)
        layers = {}
        for name, parts in grouped.items():
            down = torch.cat([(p.down.float() * p.scale).to(p.down.dtype) for p in parts], dim=0)
            up = torch.cat([p.up for p in parts], dim=1)
            layers[name] = LoRALayer(down, up, 1.0)
        return LoRA(layers, family=families.pop() if families else "unknown", source=source)
