"""The analogy world's cell metric: count the world's own cells that a B′ puts right.

The world is pixel art: a panel is a grid of flat-colour cells (:data:`~training.world.scenes.CELL`-px cells at the
:data:`~training.world.scenes.REFERENCE_SIZE`; 8 x 8 per panel in world version 2) with exact ground truth. So a B′ is scored
per cell, not per pixel:

* the colour of a cell is the mean of its **central half** (the middle ``c/2 x c/2`` pixels of a ``c``-px cell: the
  inner 4 x 4 of an 8-px cell, i.e. without its 2-px border). The border is left out so that what happens at a cell's
  edges — a seam or a bleed of one pixel from a neighbour (bilinear resampling, a feathered composite, a decoder that
  is not cell-exact) — does not decide the cell, while a cell drawn in the wrong colour still does; averaging the
  central pixels rather than reading one keeps pixel noise from deciding it;
* a cell of B′ is **right** when that colour is within :data:`TOLERANCE` of the true B′ cell's colour, in the
  largest of the three channel differences (0..1 units);
* the cells the edit **changes** are those whose colour differs between B and the true B′ (the exact renderings,
  where every cell is flat: this is the family's edit mask for local families, and for global ones it leaves out
  the cells a global edit maps to themselves, e.g. white under ``grayscale`` or ``channel_swap``); the others are
  the cells it **keeps**.

Per family, over all its held-out scenes (cells pooled: a cell is a cell, whichever scene it is in):

* ``edited_cells``: right cells among the changed ones (doing nothing scores 0; ``None`` when no cell changes);
* ``kept_cells``: right cells among the kept ones (doing nothing scores 1; ``None`` for a family that changes every
  cell, e.g. ``invert``);
* ``kept_background_cells`` / ``kept_object_cells``: the same, split by what the kept cell is in B (its background
  colour, or part of an object): where a B′ loses the cells it should keep.

Doing nothing scores exactly 0 and 1, and a right cell is always nearer the true colour than the colour the cell
had in B, because :data:`TOLERANCE` is below half the smallest change any family makes to a cell (0.2019: the
``forest`` background under ``grayscale``), and below half the gap of the nearest distinct scene colours (0.34). The
world autoencoder's round trip of the truth (the ``floor``) is scored like any B′; in world version 2 it is exact to
1e-3, so it scores 1 and 1 (version 1's learned decoder did not). Nothing here depends on the
world's version beyond the cell grid read from :mod:`training.world.scenes` at call time, so a world with other cells,
or a ceiling run, scores with the same functions.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from training.world import build_world
from training.world import evaluate as ev
from training.world import scenes as world
from training.world.autoencoder import load_world_autoencoder

# Largest channel difference (0..1) at which a cell counts as right, by one rule (README, "The cell metric"): below
# half the smallest change any family makes to a cell (world version 2: 0.2019, so 0.10), so a right cell is nearer
# the truth than B's colour and doing nothing never passes a changed cell. Version 1's palette changed a cell by 0.041
# (slate under grayscale), which gave 0.02; version 2's palette was chosen so that every edit is visible.
TOLERANCE = 0.10
CHANGE_EPS = 1e-3  # cells of the exact renderings whose colours differ by more than this are changed (real changes
#                    are >= 0.041; this only absorbs float rounding and 8-bit quantisation of both images)


def cells_per_side() -> int:
    """Cells along a panel's side (the world's grid; 8 today: 64-px panels of 8-px cells)."""
    return world.REFERENCE_SIZE // world.CELL


def cell_colours(images: torch.Tensor, cells: int | None = None) -> torch.Tensor:
    """IMAGE batch [B, S, S, 3] (or one image [S, S, 3]) -> the colour of every cell [B, n, n, 3]: the mean over the
    central half of each cell (``c // 4`` pixels left out on each side of a ``c``-px cell; all of a cell under 4 px)."""
    if images.dim() == 3:
        images = images[None]
    n = cells or cells_per_side()
    batch, height, width, channels = images.shape
    if height != width or height % n:
        raise ValueError(f"cell metric: panels must be square with a side divisible by {n} cells, got "
                         f"{height} x {width}")
    side = height // n
    border = side // 4
    grid = images.float().reshape(batch, n, side, n, side, channels)
    inner = grid[:, :, border:side - border, :, border:side - border]
    return inner.mean(dim=(2, 4))


def cell_error(images: torch.Tensor, truth: torch.Tensor, cells: int | None = None) -> torch.Tensor:
    """Per cell [B, n, n]: the largest channel difference between the cell colours of ``images`` and ``truth``."""
    return (cell_colours(images, cells) - cell_colours(truth, cells)).abs().amax(dim=-1)


def changed_cells(b: torch.Tensor, truth: torch.Tensor, cells: int | None = None) -> torch.Tensor:
    """Bool [B, n, n]: the cells the edit changes (B and the true B′, exact renderings, differ in colour)."""
    return cell_error(b, truth, cells) > CHANGE_EPS


def cell_counts(b_prime: torch.Tensor, truth: torch.Tensor, b: torch.Tensor, tolerance: float = TOLERANCE,
                cells: int | None = None) -> dict[str, int]:
    """Counts over a batch of scenes: ``edited_right`` of ``edited_total`` changed cells, ``kept_right`` of
    ``kept_total`` kept cells. ``b_prime`` is what is scored, ``truth`` the true B′, ``b`` the B it was made from."""
    right = cell_error(b_prime, truth, cells) <= tolerance
    changed = changed_cells(b, truth, cells)
    return {"edited_right": int((right & changed).sum()), "edited_total": int(changed.sum()),
            "kept_right": int((right & ~changed).sum()), "kept_total": int((~changed).sum())}


def cell_scores(b_prime: torch.Tensor, truth: torch.Tensor, b: torch.Tensor, tolerance: float = TOLERANCE,
                cells: int | None = None, digits: int | None = 4) -> dict[str, float | None]:
    """``{"edited_cells", "kept_cells"}``: fractions of the changed / kept cells that ``b_prime`` puts right (pooled
    over the batch); ``None`` where there is no such cell. ``digits`` rounds (``None``: exact fractions)."""
    counts = cell_counts(b_prime, truth, b, tolerance, cells)
    return {"edited_cells": _fraction(counts["edited_right"], counts["edited_total"], digits),
            "kept_cells": _fraction(counts["kept_right"], counts["kept_total"], digits)}


def _fraction(right: int, total: int, digits: int | None) -> float | None:
    """``right / total`` rounded to ``digits`` (``None``: exact); ``None`` when there is no cell to count."""
    if not total:
        return None
    value = right / total
    return round(value, digits) if digits is not None else value


def background_cells(b: torch.Tensor, cells: int | None = None) -> torch.Tensor:
    """Bool [B, n, n]: the cells of each B in its background colour — the colour most of its cells have. A world scene
    is a flat background with at most three objects of 3 x 3 cells (27 of 64 cells), so that colour is the
    background's (``tests/test_world_metric.py`` checks it against the scenes' own backgrounds)."""
    colours = cell_colours(b, cells)
    batch, n = colours.shape[0], colours.shape[1]
    flat = colours.reshape(batch, n * n, -1)
    same = (flat[:, :, None] - flat[:, None]).abs().amax(dim=-1) <= CHANGE_EPS  # [B, n², n²]
    commonest = same.sum(dim=-1).argmax(dim=-1)
    return same[torch.arange(batch), commonest].reshape(batch, n, n)


def kept_cells_by_role(b_prime: torch.Tensor, truth: torch.Tensor, b: torch.Tensor, tolerance: float = TOLERANCE,
                       cells: int | None = None, digits: int | None = 4) -> dict[str, float | None]:
    """``{"kept_background_cells", "kept_object_cells"}``: ``kept_cells`` split by what the kept cell is in B — the
    background, or part of an object. Tells a B′ that erases or smears objects from one that speckles the background
    (``None`` where there is no such kept cell, e.g. every cell of ``invert``)."""
    right = cell_error(b_prime, truth, cells) <= tolerance
    kept = ~changed_cells(b, truth, cells)
    background = background_cells(b, cells)
    return {name: _fraction(int((right & where).sum()), int(where.sum()), digits)
            for name, where in (("kept_background_cells", kept & background), ("kept_object_cells", kept & ~background))}


def format_scores(scores: dict[str, float | None]) -> str:
    """``"edited 0.42 kept 0.97"`` (``-`` for ``None``), for tables and picture labels."""
    def show(value):
        return "-" if value is None else f"{value:.2f}"
    return f"edited {show(scores['edited_cells'])} kept {show(scores['kept_cells'])}"


# ---------------------------------------------------------------------------------------------------------------------
# the evidence for TOLERANCE: ``python -m training.world.metrics [--quick] [--seed N] [--count N]``


def palette_gaps() -> dict[str, object]:
    """The nearest pair of distinct colours a scene draws with (objects and backgrounds), and for every family the
    smallest change it makes to a cell of held-out scenes (largest channel difference)."""
    names = list(world.COLOURS) + list(world.BACKGROUNDS)
    palette = torch.tensor([*world.COLOURS.values(), *world.BACKGROUNDS.values()])
    gaps = (palette[:, None] - palette[None]).abs().amax(-1).fill_diagonal_(float("inf"))
    i, j = divmod(int(gaps.argmin()), len(names))
    return {"nearest_palette_pair": [names[i], names[j]], "nearest_palette_gap": round(float(gaps[i, j]), 4)}


@torch.no_grad()
def round_trip_evidence(reconstruct, count: int = 16, split: str = "heldout") -> dict[str, object]:
    """Cell errors of ``reconstruct`` (IMAGE -> IMAGE, e.g. the world autoencoder's round trip) on the true B′ of
    ``count`` scenes of every family, and the smallest change each family makes to a cell."""

    errors, per_family = [], {}
    for family in world.families("all"):
        items = ev.examples(family, count, world.REFERENCE_SIZE, split)
        b, truth = ev.stack(items, "b"), ev.stack(items, "b_prime")
        error = cell_error(reconstruct(truth), truth)
        change = cell_error(b, truth)[changed_cells(b, truth)]
        errors.append(error.flatten())
        per_family[family] = {"round_trip_max": round(float(error.max()), 4),
                              "smallest_change": round(float(change.min()), 4) if change.numel() else None}
    flat = torch.cat(errors).double()
    quantiles = {f"q{q}": round(float(flat.quantile(q / 100)), 4) for q in (50, 99, 99.9)}
    return {"cells": flat.numel(), "round_trip_max": round(float(flat.max()), 4), **quantiles,
            "round_trip_mean": round(float(flat.mean()), 5), "families": per_family}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description="the evidence for the cell metric's tolerance")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--count", type=int, default=16, help="scenes per family")
    parser.add_argument("--world-root", type=Path)
    args = parser.parse_args(argv)
    built = build_world(["autoencoder"], quick=args.quick, seed=args.seed, root=args.world_root)
    codec = load_world_autoencoder(built.path("autoencoder"))

    def reconstruct(images):
        pixels = codec.decode(codec.encode(images.permute(0, 3, 1, 2) * 2 - 1))
        return ((pixels + 1) / 2).clamp(0, 1).permute(0, 2, 3, 1)

    report = {"tolerance": TOLERANCE, **palette_gaps()}
    for split in ("heldout", "train"):
        report[f"round_trip_{split}"] = round_trip_evidence(reconstruct, args.count, split)
    print(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
