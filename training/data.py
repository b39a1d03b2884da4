"""Analogy training data: Relation252K folders, JSONL quads, and an on-the-fly synthetic set.

Every dataset yields dicts {a, a_prime, b, b_prime: [S, S, 3] float tensors, prompt: str}. An item whose image is
missing or corrupt yields None; :func:`collate` drops those and counts them, so a bad file costs one sample, never
the run. Batches are drawn by :class:`StepBatchSampler` as a pure function of (seed, step, rank), which makes resuming
after a crash and multi-process sharding exact.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset, Sampler

from analogy_core.composite import fit_into_panel
from analogy_core.synthetic import TRANSFORMS, analogy_example
from training.make_synthetic_dataset import PROMPTS

log = logging.getLogger(__name__)
ROLES = ("a", "a_prime", "b", "b_prime")


def load_rgb(path: Path) -> torch.Tensor:
    with Image.open(path) as img:
        array = np.asarray(img.convert("RGB"), dtype=np.float32) / 255.0
    return torch.from_numpy(array)


def square(image: torch.Tensor, size: int) -> torch.Tensor:
    """Centre-crop to a square and resize to size x size (the official training crops panels square)."""
    panel, _ = fit_into_panel(image.unsqueeze(0), size, size, "center_crop", 0.5)
    return panel[0]


class Relation252K(Dataset):
    """``<root>/<category>/Group*/labels.json``; each image is a side-by-side before|after pair.

    Samples are all ordered pairs i < j of images within one group (task): (a, a') from image i, (b, b') from j, with
    image j's edit instruction as the prompt.
    """

    def __init__(self, root: str | Path, resolution: int):
        self.root, self.resolution = Path(root), resolution
        label_files = sorted(self.root.glob("*/Group*/labels.json"))
        if not label_files:
            raise FileNotFoundError(f"no <category>/Group*/labels.json under {self.root}: is this Relation252K?")
        self.items: list[tuple[Path, dict, dict]] = []
        for labels in label_files:
            entries = json.loads(labels.read_text())
            for i in range(len(entries)):
                for j in range(i + 1, len(entries)):
                    self.items.append((labels.parent, entries[i], entries[j]))

    def __len__(self) -> int:
        return len(self.items)

    def _pair(self, folder: Path, entry: dict) -> tuple[torch.Tensor, torch.Tensor]:
        image = load_rgb(folder / entry["img_name"])
        half = image.shape[1] // 2
        return square(image[:, :half], self.resolution), square(image[:, half: 2 * half], self.resolution)

    def __getitem__(self, index: int):
        folder, first, second = self.items[index]
        try:
            a, a_prime = self._pair(folder, first)
            b, b_prime = self._pair(folder, second)
        except (OSError, UnidentifiedImageError, ValueError, KeyError) as err:
            log.warning("skipping %s / %s: %s", folder, second.get("img_name"), err)
            return None
        return {"a": a, "a_prime": a_prime, "b": b, "b_prime": b_prime,
                "prompt": second.get("edit_instruction") or first.get("edit_instruction", "")}


class Quads(Dataset):
    """A JSONL file of {a, a_prime, b, b_prime, prompt} with image paths relative to the file."""

    def __init__(self, index: str | Path, resolution: int):
        self.index, self.resolution = Path(index), resolution
        self.records = [json.loads(line) for line in self.index.read_text().splitlines() if line.strip()]
        for n, record in enumerate(self.records):
            missing = [k for k in (*ROLES, "prompt") if k not in record]
            if missing:
                raise ValueError(f"{self.index}:{n + 1}: record lacks {missing}")

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int):
        record = self.records[index]
        try:
            images = {role: square(load_rgb(self.index.parent / record[role]), self.resolution) for role in ROLES}
        except (OSError, UnidentifiedImageError, ValueError) as err:
            log.warning("skipping quad %d of %s: %s", index, self.index, err)
            return None
        return {**images, "prompt": record["prompt"]}


class SyntheticAnalogies(Dataset):
    """Procedural scenes under simple transformation families, generated from the index (no files)."""

    def __init__(self, resolution: int, length: int = 4096, families: tuple[str, ...] = tuple(sorted(TRANSFORMS))):
        self.resolution, self.length, self.families = resolution, length, families

    def __len__(self) -> int:
        return self.length

    def family(self, index: int) -> str:
        return self.families[index % len(self.families)]

    def __getitem__(self, index: int):
        family = self.family(index)
        quad = analogy_example(family, seed_a=2 * index + 1, seed_b=2 * index + 2, width=self.resolution,
                               height=self.resolution)
        return {**quad, "prompt": PROMPTS[family], "family": family}


def make_dataset(spec: str, resolution: int) -> Dataset:
    kind, _, location = spec.partition(":")
    if kind == "synthetic":
        return SyntheticAnalogies(resolution)
    if kind == "relation252k":
        return Relation252K(location, resolution)
    if kind == "quads":
        return Quads(location, resolution)
    raise ValueError(f"data must be synthetic, relation252k:<folder> or quads:<file.jsonl>; got {spec!r}")


def collate(items: list) -> dict | None:
    """Stack the good items; report how many were skipped."""
    good = [item for item in items if item is not None]
    batch = {"skipped": len(items) - len(good)}
    if not good:
        return batch
    for role in ROLES:
        batch[role] = torch.stack([item[role] for item in good])
    batch["prompt"] = [item["prompt"] for item in good]
    return batch


class StepBatchSampler(Sampler):
    """Index lists for micro-batch k = start, start+1, … of one process, as a pure function of (seed, k, rank).

    The sample stream is an endless sequence of epoch permutations; micro-batch k of a run with W processes takes
    positions [(k·W + rank)·B, … + B). Resuming at step s starts at k = s·accumulation, exactly where the run was.
    """

    def __init__(self, size: int, batch_size: int, seed: int, rank: int = 0, world: int = 1, start: int = 0):
        if size == 0:
            raise ValueError("the dataset is empty")
        self.size, self.batch_size, self.seed = size, batch_size, seed
        self.rank, self.world, self.start = rank, world, start
        self._perms: dict[int, torch.Tensor] = {}

    def _position(self, p: int) -> int:
        epoch, offset = divmod(p, self.size)
        if epoch not in self._perms:
            gen = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
            self._perms = {epoch: torch.randperm(self.size, generator=gen)}
        return int(self._perms[epoch][offset])

    def batch(self, k: int) -> list[int]:
        first = (k * self.world + self.rank) * self.batch_size
        return [self._position(p) for p in range(first, first + self.batch_size)]

    def __iter__(self):
        k = self.start
        while True:
            yield self.batch(k)
            k += 1

    def __len__(self) -> int:  # endless; DataLoader only needs it for progress estimates
        return 2 ** 31
