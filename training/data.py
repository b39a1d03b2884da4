"""Analogy training data: Relation252K folders, JSONL quads, an on-the-fly synthetic set, and the batch sampler.

Every reader yields dicts {a, a_prime, b, b_prime: [S, S, 3] float tensors, prompt: str}. An item that cannot be read
(missing or corrupt image, decompression bomb, a 1-px image, a non-string path, a missing field) raises
:class:`ItemError` naming the file (and JSONL line) and the reason. :class:`ReadableItems` turns those into skips: it
takes the next readable item instead, logs and counts every skip, and never hands out an empty batch; it refuses a
dataset whose readable items are too few before training starts.

Batches are drawn by :class:`StepBatchSampler` as a pure function of (seed, step, rank), which makes resuming after a
crash and multi-process sharding exact.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset, Sampler

from analogy_core.composite import fit_into_panel
from analogy_core.synthetic import TRANSFORMS, analogy_example
from training.make_synthetic_dataset import PROMPTS

log = logging.getLogger(__name__)
ROLES = ("a", "a_prime", "b", "b_prime")
MIN_IMAGE_SIDE = 8          # smaller images carry no usable content (and break resizing)
PANEL_FITS = ("stretch", "center_crop")


class ItemError(Exception):
    """One training item cannot be read; the message names where and why."""


class DataError(ValueError):
    """A dataset as a whole cannot be used (e.g. too few readable items)."""


def load_rgb(path) -> torch.Tensor:
    """An image file as float RGB [H, W, 3] in 0..1; any reason it cannot be used becomes an ItemError."""
    if not isinstance(path, (str, Path)):
        raise ItemError(f"image path must be a string, got {type(path).__name__} {path!r}")
    try:
        with Image.open(path) as img:
            array = np.asarray(img.convert("RGB"), dtype=np.float32) / 255.0
    except Image.DecompressionBombError as err:
        raise ItemError(f"{path}: refused as a decompression bomb ({err})") from None
    except (OSError, ValueError, SyntaxError, EOFError) as err:  # PIL raises all of these for damaged files
        raise ItemError(f"{path}: unreadable image ({type(err).__name__}: {err})") from None
    if min(array.shape[:2]) < MIN_IMAGE_SIDE:
        raise ItemError(f"{path}: {array.shape[1]}x{array.shape[0]} px is smaller than {MIN_IMAGE_SIDE} px")
    return torch.from_numpy(array)


def to_panel(image: torch.Tensor, size: int, fit: str = "stretch") -> torch.Tensor:
    """A size x size panel: "stretch" resizes ignoring the aspect (official), "center_crop" crops the middle."""
    if fit not in PANEL_FITS:
        raise ValueError(f"panel fit must be one of {PANEL_FITS}, got {fit!r}")
    panel, _ = fit_into_panel(image.unsqueeze(0), size, size, fit, 0.5)
    return panel[0]


class Relation252K(Dataset):
    """``<root>/<category>/Group*/labels.json``; each image is a side-by-side before|after pair.

    Samples are all ordered pairs i < j of images within one group (task): (a, a') from image i, (b, b') from j. The
    prompt is image i's edit instruction (``caption_source="a"``, official: it describes a -> a') or image j's ("b").
    """

    def __init__(self, root: str | Path, resolution: int, fit: str = "stretch", caption_source: str = "a"):
        self.root, self.resolution, self.fit, self.caption_source = Path(root), resolution, fit, caption_source
        label_files = sorted(self.root.glob("*/Group*/labels.json"))
        if not label_files:
            raise DataError(f"no <category>/Group*/labels.json under {self.root}: is this Relation252K?")
        self.items: list[tuple[Path, dict, dict]] = []
        for labels in label_files:
            entries = self._entries(labels)
            for i in range(len(entries)):
                for j in range(i + 1, len(entries)):
                    self.items.append((labels.parent, entries[i], entries[j]))

    @staticmethod
    def _entries(labels: Path) -> list[dict]:
        try:
            entries = json.loads(labels.read_text())
        except (OSError, ValueError) as err:
            log.warning("skipping task %s: labels.json unreadable (%s)", labels.parent, err)
            return []
        if not isinstance(entries, list):
            log.warning("skipping task %s: labels.json is not a list of entries", labels.parent)
            return []
        return [e for e in entries if isinstance(e, dict)]

    def __len__(self) -> int:
        return len(self.items)

    def _pair(self, folder: Path, entry: dict) -> tuple[torch.Tensor, torch.Tensor]:
        name = entry.get("img_name")
        if not isinstance(name, str):
            raise ItemError(f"{folder / 'labels.json'}: entry without a string img_name: {str(entry)[:80]}")
        image = load_rgb(folder / name)
        half = image.shape[1] // 2
        if half < MIN_IMAGE_SIDE:
            raise ItemError(f"{folder / name}: {image.shape[1]} px wide is too narrow for a before|after pair")
        return (to_panel(image[:, :half], self.resolution, self.fit),
                to_panel(image[:, half: 2 * half], self.resolution, self.fit))

    def __getitem__(self, index: int) -> dict:
        folder, first, second = self.items[index]
        a, a_prime = self._pair(folder, first)
        b, b_prime = self._pair(folder, second)
        source = first if self.caption_source == "a" else second
        prompt = source.get("edit_instruction")
        return {"a": a, "a_prime": a_prime, "b": b, "b_prime": b_prime,
                "prompt": prompt if isinstance(prompt, str) else ""}


class Quads(Dataset):
    """A JSONL file of {a, a_prime, b, b_prime, prompt} with image paths relative to the file.

    Lines that are not JSON objects with the four image paths are skipped and reported with their line number."""

    def __init__(self, index: str | Path, resolution: int, fit: str = "stretch"):
        self.index, self.resolution, self.fit = Path(index), resolution, fit
        try:
            lines = self.index.read_text().splitlines()
        except (OSError, UnicodeDecodeError) as err:
            raise DataError(f"{self.index}: cannot read the quads index ({err})") from None
        self.records: list[tuple[int, dict]] = []
        self.bad_lines = 0
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            problem = self._problem(line)
            if problem:
                self.bad_lines += 1
                log.warning("skipping %s:%d: %s", self.index, number, problem)
                continue
            self.records.append((number, json.loads(line)))
        if not self.records:
            raise DataError(f"{self.index}: no usable record ({self.bad_lines} bad lines); each line must be "
                            '{"a": path, "a_prime": path, "b": path, "b_prime": path, "prompt": text}')

    @staticmethod
    def _problem(line: str) -> str | None:
        try:
            record = json.loads(line)
        except ValueError as err:
            return f"not JSON ({err})"
        if not isinstance(record, dict):
            return f"expected a JSON object, got {type(record).__name__}"
        missing = [k for k in ROLES if k not in record]
        if missing:
            return f"record lacks {missing}"
        wrong = [k for k in ROLES if not isinstance(record[k], str)]
        if wrong:
            return f"image paths must be strings: {wrong}"
        return None

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict:
        number, record = self.records[index]
        images = {}
        for role in ROLES:
            try:
                images[role] = to_panel(load_rgb(self.index.parent / record[role]), self.resolution, self.fit)
            except ItemError as err:
                raise ItemError(f"{self.index}:{number} ({role}): {err}") from None
        prompt = record.get("prompt", "")
        return {**images, "prompt": prompt if isinstance(prompt, str) else str(prompt)}


class SyntheticAnalogies(Dataset):
    """Procedural scenes under simple transformation families, generated from the index (no files)."""

    def __init__(self, resolution: int, length: int = 4096, families: tuple[str, ...] = tuple(sorted(TRANSFORMS))):
        self.resolution, self.length, self.families = resolution, length, families

    def __len__(self) -> int:
        return self.length

    def family(self, index: int) -> str:
        return self.families[index % len(self.families)]

    def __getitem__(self, index: int) -> dict:
        family = self.family(index)
        quad = analogy_example(family, seed_a=2 * index + 1, seed_b=2 * index + 2, width=self.resolution,
                               height=self.resolution)
        return {**quad, "prompt": PROMPTS[family], "family": family}


def make_dataset(spec: str, resolution: int, fit: str = "stretch", caption_source: str = "a") -> Dataset:
    kind, _, location = spec.partition(":")
    if kind == "synthetic":
        return SyntheticAnalogies(resolution)
    if kind == "relation252k":
        return Relation252K(location, resolution, fit, caption_source)
    if kind == "quads":
        return Quads(location, resolution, fit)
    if kind == "world":  # the analogy world (options: see training/world/data.py)
        from training.world.data import make_world_dataset

        return make_world_dataset(location, resolution)
    raise ValueError(f"data must be synthetic, relation252k:<folder>, quads:<file.jsonl> or world[:options]; "
                     f"got {spec!r}")


# ---------------------------------------------------------------------------------------------------------------------
# skipping unreadable items, batching


class ReadableItems(Dataset):
    """Wraps a reader: item i is the first readable item at or after position i (wrapping around), with the number
    of unreadable ones passed over in ``item["skipped"]``. Deterministic, so resumed runs see the same items."""

    def __init__(self, dataset: Dataset, max_tries: int = 64):
        if len(dataset) == 0:
            raise DataError("the dataset is empty")
        self.dataset, self.max_tries = dataset, max_tries

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict:
        errors = []
        for offset in range(min(self.max_tries, len(self.dataset))):
            position = (index + offset) % len(self.dataset)
            try:
                item = self.dataset[position]
            except ItemError as err:
                log.warning("skipping item %d: %s", position, err)
                errors.append(str(err))
                continue
            return dict(item, skipped=len(errors))
        raise DataError(f"{len(errors)} consecutive unreadable items from position {index}, e.g. {errors[:2]}")

    def probe(self, count: int = 32, minimum: int = 1) -> list[str]:
        """Read up to ``count`` items spread over the dataset; refuse it when fewer than half (or fewer than
        ``minimum``) are readable. Returns the errors seen."""
        size = len(self.dataset)
        positions = sorted({round(i * size / min(count, size)) % size for i in range(min(count, size))})
        errors = []
        for position in positions:
            try:
                self.dataset[position]
            except ItemError as err:
                errors.append(str(err))
        readable = len(positions) - len(errors)
        if readable < minimum or readable * 2 < len(positions):
            raise DataError(f"only {readable} of {len(positions)} probed items are readable (need at least "
                            f"{minimum} and half); first problems: {errors[:3]}")
        return errors

    def first_items(self, count: int) -> list[dict]:
        """The first ``count`` readable items (for sample grids)."""
        items, position = [], 0
        while len(items) < min(count, len(self.dataset)) and position < len(self.dataset):
            item = self[position]
            items.append(item)
            position += item["skipped"] + 1
        return items


def collate(items: list[dict]) -> dict:
    """Stack a batch of readable items; ``skipped`` sums the unreadable ones passed over."""
    if not items:
        raise DataError("empty batch")
    batch: dict = {"skipped": sum(item.get("skipped", 0) for item in items)}
    for key in items[0]:
        if key == "skipped":
            continue
        values = [item[key] for item in items]
        batch[key] = torch.stack(values) if isinstance(values[0], torch.Tensor) else values
    return batch


class StepBatchSampler(Sampler):
    """Index lists for micro-batch k = start, start+1, … of one process, as a pure function of (seed, k, rank).

    The sample stream is an endless sequence of epoch permutations; micro-batch k of a run with W processes takes
    positions [(k·W + rank)·B, … + B). Resuming at step s starts at k = s·accumulation, exactly where the run was.
    """

    def __init__(self, size: int, batch_size: int, seed: int, rank: int = 0, world: int = 1, start: int = 0):
        if size == 0:
            raise DataError("the dataset is empty")
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
