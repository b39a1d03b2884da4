"""What the yardstick gives a method's row and what the row gives back (every row of :mod:`training.world.yardstick`
speaks these)."""

from __future__ import annotations

import dataclasses
import json
import math
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
    row_overrides: dict[str, object] = field(default_factory=dict)  # --row-set: the row trainer's settings changed
    resume_runs: bool = False  # --resume-runs: continue the row's training runs already in ``folder``
    diagnostics: bool = False  # --diagnostics: the rows' ablation runs too (regions' other forms, LoC's no exchange)


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


class RunMismatch(ValueError):
    """A training run that is not of the row asked for (another trainer, world or setting)."""


def world_of_spec(spec: object, model: str = "") -> Path:
    """The world folder of a run's ``world:<folder>`` setting (``model``: the spec names that model's folder)."""
    text = str(spec)
    if not text.startswith("world:"):
        raise RunMismatch(f"trained on {text!r}, not on an analogy world (expected 'world:<folder>')")
    folder = Path(text.removeprefix("world:"))
    if model:
        if folder.name != model:
            raise RunMismatch(f"trained on {text!r}, not on a world's {model} (expected 'world:<folder>/{model}')")
        folder = folder.parent
    return folder


@dataclass
class CurveSampler:
    """A row's sampler for one training run's step exports (``bench.row_curve``)."""

    base: dict[str, torch.Tensor]                       # the backbone's B′ without the method, per family
    b_prime: Callable[[Path], dict[str, torch.Tensor]]  # one exported file -> B′ per family, as the row samples
    reconstruct: Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class Curve:
    """How ``bench.row_curve`` measures a row's step exports exactly as the row measures its final file."""

    artifact: str                                    # the file the row's trainer writes (kept per step: keep_exports)
    world_of: Callable[[dict], Path]                 # a run's config.json -> the world folder it was trained on
    sampler_keys: tuple[str, ...]                    # config keys the row's sampler reads (given as row overrides)
    sampler: Callable[[MethodContext, dict], CurveSampler]  # (context, the run's config) -> its sampler


@dataclass(frozen=True)
class Method:
    name: str
    world_models: tuple[str, ...]
    run: Callable[[MethodContext], MethodOutput]
    description: str = ""
    ceiling: Ceiling | None = None  # the row's per-family ceiling (None: not measured for this row yet)
    trainer_config: type | None = None  # the row trainer's config dataclass: what --row-set may change (None: nothing)
    own_settings: frozenset[str] = frozenset()  # settings the row itself sets per run (--row-set may not change them)
    curve: Curve | None = None  # how its step exports are measured (None: bench.row_curve does not know the row)
    ablations: bool = False  # whether --diagnostics adds runs to the row (ctx.diagnostics)


# What says which world and run a row is: its world models (the world folder) and the seed (--seed).
ROW_FIXED_SETTINGS = frozenset({"seed", "backbone", "query_encoder", "image_encoder", "clip", "instruction_encoder"})


def parse_settings(items: list[str] | None, example: str) -> dict[str, object]:
    """``["key=value", ...]`` -> trainer settings; values read as JSON literals where they are one (numbers,
    booleans), else kept as text (``data=world:families=invert``). ``example`` is shown when an item is malformed."""
    out: dict[str, object] = {}
    for item in items or []:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ValueError(f"a trainer setting is key=value (e.g. {example}), got {item!r}")
        try:
            out[key] = json.loads(text)
        except ValueError:
            out[key] = text
    return out


def check_row_overrides(method: Method, overrides: dict[str, object]) -> None:
    """Raise ValueError unless every key of ``overrides`` is a setting of ``method``'s trainer that a row may change,
    with a value its config accepts."""
    if not overrides:
        return
    if method.trainer_config is None:
        raise ValueError(f"--row-set: the {method.name} row has no trainer settings to change")
    fixed = sorted((ROW_FIXED_SETTINGS | method.own_settings) & set(overrides))
    if fixed:
        raise ValueError(f"--row-set {', '.join(fixed)}: set by the {method.name} row itself (its world models, seed "
                         f"(--seed) or its runs' own settings), not to be changed")
    known = {f.name for f in dataclasses.fields(method.trainer_config)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise ValueError(f"--row-set {', '.join(unknown)}: not a setting of the {method.name} row's trainer "
                         f"({method.trainer_config.__name__}); known: {', '.join(sorted(known - ROW_FIXED_SETTINGS))}")
    defaults = method.trainer_config()
    try:
        config = method.trainer_config().update(dict(overrides))
    except ValueError as err:
        raise ValueError(f"--row-set: {err}") from None
    for key in overrides:
        default, value = getattr(defaults, key), getattr(config, key)
        if not _same_kind(default, value):
            raise ValueError(f"--row-set {key}: the {method.name} row's trainer expects {type(default).__name__} "
                             f"(default {default!r}), got {value!r}")
    try:
        config.validate()
    except ValueError as err:
        raise ValueError(f"--row-set: {err}") from None


def _same_kind(default: object, value: object) -> bool:
    """Whether ``value`` can stand where a setting's ``default`` stands (numbers for numbers, text for text, ...)."""
    if isinstance(default, bool) or isinstance(value, bool):
        return isinstance(default, bool) and isinstance(value, bool)
    if isinstance(default, float):
        return isinstance(value, (int, float))
    return default is None or isinstance(value, type(default))


def losses_from_log(path: Path) -> tuple[float, float] | None:
    """(first, last) training loss of the run logged in ``path``: from its trainer's "wrote … (steps a..b, loss x ->
    y)" lines, the first finite x and the last finite y — a continued run (``--resume-runs``) appends a line per
    invocation, and one that had no step left to train logs nan."""
    spans = []
    for line in path.read_text().splitlines():
        if "loss" in line and "->" in line:
            start, end = line.rsplit("loss ", 1)[1].rstrip(")").split(" -> ")
            spans.append((float(start), float(end)))
    starts = [s for s, _ in spans if math.isfinite(s)]
    ends = [e for _, e in spans if math.isfinite(e)]
    return (starts[0], ends[-1]) if starts and ends else None


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
