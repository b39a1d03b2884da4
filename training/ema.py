"""An exponential moving average of a model's trainable parameters (Edit Transfer's official config trains with one,
decay 0.99, and saves the averaged weights).

After every optimiser step: ema ← decay · ema + (1 − decay) · θ (float32 copies, starting at the initial θ; no
warm-up of the decay). The averages travel in the checkpoint's trainable tensors under ``ema.<name>`` (safetensors,
like everything the trainer writes), so ``--resume`` continues the same average.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
from torch import nn

PREFIX = "ema."


def _trainable(model: nn.Module) -> Iterator[tuple[str, nn.Parameter]]:
    return ((name, p) for name, p in model.named_parameters() if p.requires_grad)


class ParameterEMA:
    def __init__(self, model: nn.Module, decay: float):
        if not 0 < decay < 1:
            raise ValueError(f"EMA decay must be in (0, 1), got {decay}")
        self.decay = decay
        self.shadow = {name: p.detach().float().clone() for name, p in _trainable(model)}

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        for name, param in _trainable(model):
            self.shadow[name].mul_(self.decay).add_(param.detach().float(), alpha=1 - self.decay)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {PREFIX + name: value for name, value in self.shadow.items()}

    def load_state_dict(self, tensors: dict[str, torch.Tensor]) -> None:
        names = {k[len(PREFIX):] for k in tensors if k.startswith(PREFIX)}
        if names != set(self.shadow):
            raise ValueError(f"the checkpoint's EMA holds {len(names)} tensors, this run averages "
                             f"{len(self.shadow)} (was it written with another ema_decay or LoRA?)")
        for name in names:
            self.shadow[name].copy_(tensors[PREFIX + name])

    @contextmanager
    def applied(self, model: nn.Module) -> Iterator[None]:
        """Inside the block the model's trainable parameters hold the averages; restored afterwards."""
        saved = {}
        with torch.no_grad():
            for name, param in _trainable(model):
                saved[name] = param.detach().clone()
                param.copy_(self.shadow[name].to(param.dtype))
        try:
            yield
        finally:
            with torch.no_grad():
                for name, param in _trainable(model):
                    param.copy_(saved[name])
