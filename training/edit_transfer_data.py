"""Edit Transfer training data: every source yields {a, a_prime, b, b_prime: [S, S, 3], prompt} quads.

- ``folder:<dir>`` — the official format (CUC-MIPG/Edit-Transfer ``data/edit_transfer``, read by ai-toolkit): a
  folder of four-panel images ``[A A'; B B']`` (.jpg/.jpeg/.png) with a same-named ``.txt`` prompt each. The image is
  resized to the 2S x 2S grid (``fit``) and cut into its quadrants. A missing ``.txt`` means an empty prompt (counted
  and reported once, as ai-toolkit trains such images uncaptioned).
- ``quads:<file.jsonl>`` — {a, a_prime, b, b_prime, prompt} image paths (composited on the fly by the trainer).
- ``relation252k:<dir>`` — Relation252K before|after pairs, every ordered pair of a task (see training.data).
- ``world`` — the analogy world's training families on training scenes (``analogy_core.world``), prompt = the
  family's instruction.
- ``synthetic`` — the older procedural set of training.data (tiny smoke runs).

Unreadable items raise :class:`training.data.ItemError` naming the file; the trainer skips and counts them.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch.utils.data import Dataset

from training.data import DataError, ItemError, Quads, Relation252K, SyntheticAnalogies, load_rgb, to_panel

log = logging.getLogger(__name__)
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")
DATA_KINDS = ("folder", "quads", "relation252k", "world", "synthetic")


def split_quadrants(grid: torch.Tensor) -> dict[str, torch.Tensor]:
    """[2S, 2S, 3] -> {a: top-left, a_prime: top-right, b: bottom-left, b_prime: bottom-right}."""
    h, w = grid.shape[0] // 2, grid.shape[1] // 2
    return {"a": grid[:h, :w], "a_prime": grid[:h, w:], "b": grid[h:, :w], "b_prime": grid[h:, w:]}


class FourPanelFolder(Dataset):
    """The official Edit Transfer data layout: ``<dir>/<name>.png`` (a 2x2 composite) + ``<dir>/<name>.txt``."""

    def __init__(self, root: str | Path, resolution: int, fit: str = "stretch"):
        self.root, self.resolution, self.fit = Path(root), resolution, fit
        if not self.root.is_dir():
            raise DataError(f"{self.root} is not a folder (expected four-panel images with same-named .txt prompts)")
        self.files = sorted(p for p in self.root.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
        if not self.files:
            raise DataError(f"no .jpg/.jpeg/.png images in {self.root}: the official format is a folder of "
                            "four-panel images [A A'; B B'], each with a same-named .txt prompt")
        uncaptioned = [p.name for p in self.files if not p.with_suffix(".txt").is_file()]
        if uncaptioned:
            log.warning("%d of %d images in %s have no .txt prompt (e.g. %s): they train with an empty prompt",
                        len(uncaptioned), len(self.files), self.root, uncaptioned[:3])

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> dict:
        path = self.files[index]
        grid = to_panel(load_rgb(path), 2 * self.resolution, self.fit)
        caption = path.with_suffix(".txt")
        try:
            prompt = caption.read_text(encoding="utf-8").strip() if caption.is_file() else ""
        except (OSError, UnicodeDecodeError) as err:
            raise ItemError(f"{caption}: unreadable prompt ({type(err).__name__}: {err})") from None
        return {**split_quadrants(grid), "prompt": prompt}


class WorldQuads(Dataset):
    """Analogies of the analogy world's training families on training scenes, generated from the index."""

    def __init__(self, resolution: int, length: int = 4096, families: tuple[str, ...] | None = None):
        from analogy_core import world

        self.world, self.resolution, self.length = world, resolution, length
        self.families = tuple(families or world.families("train"))

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> dict:
        family = self.families[index % len(self.families)]
        example = self.world.example(family, "train", index // len(self.families), self.resolution)
        return {**example.images(), "prompt": example.instruction, "family": family}


def make_edit_transfer_dataset(spec: str, resolution: int, fit: str = "stretch") -> Dataset:
    """The dataset for ``data`` = ``folder:<dir>``, ``quads:<file.jsonl>``, ``relation252k:<dir>``, ``world`` or
    ``synthetic``; ``resolution`` is the panel side."""
    kind, _, location = spec.partition(":")
    if kind == "folder" and location:
        return FourPanelFolder(location, resolution, fit)
    if kind == "quads" and location:
        return Quads(location, resolution, fit)
    if kind == "relation252k" and location:
        return Relation252K(location, resolution, fit, caption_source="a")
    if kind == "world" and not location:
        return WorldQuads(resolution)
    if kind == "synthetic" and not location:
        return SyntheticAnalogies(resolution)
    raise ValueError(f"data must be folder:<dir> (official four-panel images + .txt), quads:<file.jsonl>, "
                     f"relation252k:<dir>, world or synthetic; got {spec!r}")
