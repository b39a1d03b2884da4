"""What the yardstick gives a method's row and what the row gives back (every row of :mod:`training.world.yardstick`
speaks these)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from training.world import scenes as world_def
from training.world.registry import World


@dataclass
class MethodContext:
    """What the bench gives a method."""

    world: World
    seed: int
    quick: bool
    folder: Path                                  # the method's own output folder (training runs, files)
    examples: dict[str, list[world_def.Example]]  # held-out scenes of every family


@dataclass
class MethodOutput:
    """What a method gives back: B′ per family (IMAGE batches in the order of ``ctx.examples``), the base backbone's
    B′ without the method, the autoencoder round trip its backbone uses (for the floor), and extra figures."""

    b_prime: dict[str, torch.Tensor]
    base: dict[str, torch.Tensor]
    reconstruct: Callable[[torch.Tensor], torch.Tensor]
    extra: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Method:
    name: str
    world_models: tuple[str, ...]
    run: Callable[[MethodContext], MethodOutput]
    description: str = ""


def losses_from_log(path: Path) -> tuple[float, float] | None:
    for line in reversed(path.read_text().splitlines()):
        if "loss" in line and "->" in line:
            start, end = line.rsplit("loss ", 1)[1].rstrip(")").split(" -> ")
            return float(start), float(end)
    return None
