"""The learning-rate schedule of the world models' pretraining: linear warm-up, then cosine decay to 5 %."""

from __future__ import annotations

import math

import torch


def warmup_cosine(optimiser: torch.optim.Optimizer, steps: int, warmup: float = 0.05):
    warm = max(1, int(steps * warmup))

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        progress = (step - warm) / max(1, steps - warm)
        return 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return torch.optim.lr_scheduler.LambdaLR(optimiser, factor)
