"""The world models' pretraining: the learning-rate schedule (linear warm-up, then cosine decay to 5 %) and the
optimisation loop every world builder shares."""

from __future__ import annotations

import logging
import math
from typing import Callable

import torch


def warmup_cosine(optimiser: torch.optim.Optimizer, steps: int, warmup: float = 0.05):
    warm = max(1, int(steps * warmup))

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        progress = (step - warm) / max(1, steps - warm)
        return 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return torch.optim.lr_scheduler.LambdaLR(optimiser, factor)


def pretrain_loop(model: torch.nn.Module, cfg: dict, name: str, step_loss: Callable[[int], torch.Tensor],
                  log: logging.Logger, make_schedule: Callable = warmup_cosine) -> list[float]:
    """The world models' pretraining loop: AdamW at ``cfg["lr"]`` (no weight decay) for ``cfg["steps"]`` steps under
    ``make_schedule(optimiser, steps)``, gradient norm clipped at 1; ``step_loss(step)`` draws the batch and returns
    its loss. Leaves the model in eval mode; returns the loss of every step."""
    optimiser = torch.optim.AdamW(model.parameters(), lr=cfg["lr"], weight_decay=0.0)
    schedule = make_schedule(optimiser, cfg["steps"])
    model.train()
    losses = []
    for step in range(cfg["steps"]):
        loss = step_loss(step)
        optimiser.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimiser.step()
        schedule.step()
        losses.append(loss.item())
        if step % 100 == 0 or step == cfg["steps"] - 1:
            log.info("%s step %d/%d loss %.4f", name, step + 1, cfg["steps"], loss.item())
    model.eval()
    return losses


def training_metrics(model: torch.nn.Module, losses: list[float]) -> dict:
    """What every world builder records of its pretraining: mean loss over the first and last 20 steps, size."""
    return {"loss_start": sum(losses[:20]) / 20, "loss_end": sum(losses[-20:]) / 20,
            "parameters_millions": round(sum(p.numel() for p in model.parameters()) / 1e6, 3)}
