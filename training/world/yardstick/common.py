"""What the yardstick gives a method's row and what the row gives back (every row of :mod:`training.world.yardstick`
speaks these)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from analogy_core.files import check_state_dict, read_safetensors

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
class Ceiling:
    """How a row's backbone is taught one family directly: the ``lora`` ceiling of
    :mod:`training.world.yardstick.ceiling`."""

    module: str                                        # the trainer's module (``python -m <module>``)
    world_models: tuple[str, ...]                      # the world models it uses (their build keys key the cache)
    settings: Callable[[World, bool, str, int], dict]  # (world, quick, family, seed) -> the trainer's settings
    sample: Callable[[World, bool, Path, list, int], torch.Tensor]  # (world, quick, run folder, examples, seed) -> B′
    version: int = 1                                   # bump when what a run trains or writes changes
    shared_as: str = ""  # rows whose ceilings train the same runs name them alike (one cache entry); "": the row's
    full: "Ceiling | None" = None  # the full fine-tune of the same backbone on one family (None: not measured)


@dataclass(frozen=True)
class Method:
    name: str
    world_models: tuple[str, ...]
    run: Callable[[MethodContext], MethodOutput]
    description: str = ""
    ceiling: Ceiling | None = None  # the row's per-family ceiling (None: not measured for this row yet)


def losses_from_log(path: Path) -> tuple[float, float] | None:
    for line in reversed(path.read_text().splitlines()):
        if "loss" in line and "->" in line:
            start, end = line.rsplit("loss ", 1)[1].rstrip(")").split(" -> ")
            return float(start), float(end)
    return None


def pretraining_rate(world: World, model: str) -> float:
    """The learning rate ``model`` was pretrained with (its build record): a full fine-tune ceiling continues the
    backbone's pretraining on one family at that rate (a LoRA's rate is tuned for a few low-rank factors)."""
    return float(world.builds[model]["config"]["lr"])


def load_weights(module: torch.nn.Module, path: Path) -> torch.nn.Module:
    """``module`` with the weights a full fine-tune run wrote (every tensor checked against the module's own: names,
    shapes, finite values), in eval mode."""
    tensors, _ = read_safetensors(path)
    module.load_state_dict(check_state_dict(tensors, module.state_dict()))
    return module.eval()
