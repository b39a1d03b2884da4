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

import torch
from torch.utils.data import Dataset

from training.data.readers import MIN_IMAGE_SIDE, ROLES, DataError, ItemError, load_rgb, read_jsonl, to_panel
from training.data.synthetic import PROMPTS, TRANSFORMS, analogy_example

log = logging.getLogger(__name__)
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")


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
        self.bad_lines = 0  # unreadable labels.json files and entries that are not objects (ReadableItems reports it)
        for labels in label_files:
            entries = self._entries(labels)
            for i in range(len(entries)):
                for j in range(i + 1, len(entries)):
                    self.items.append((labels.parent, entries[i], entries[j]))

    def _entries(self, labels: Path) -> list[dict]:
        """The object entries of one task's labels.json; an unreadable file counts as one bad line, as does each
        entry that is not an object."""
        try:
            entries = json.loads(labels.read_text(encoding="utf-8"))
        except RecursionError:
            return self._skip_task(labels, "labels.json is nested too deeply to read")
        except (OSError, ValueError) as err:  # ValueError: not JSON or not UTF-8
            return self._skip_task(labels, f"labels.json unreadable ({err})")
        if not isinstance(entries, list):
            return self._skip_task(labels, "labels.json is not a list of entries")
        kept = [e for e in entries if isinstance(e, dict)]
        if len(kept) < len(entries):
            self.bad_lines += len(entries) - len(kept)
            log.warning("task %s: %d labels.json entries are not objects, skipped", labels.parent,
                        len(entries) - len(kept))
        return kept

    def _skip_task(self, labels: Path, why: str) -> list[dict]:
        self.bad_lines += 1
        log.warning("skipping task %s: %s", labels.parent, why)
        return []

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
        self.records, self.bad_lines = read_jsonl(self.index, self._problem, "quads index")
        if not self.records:
            raise DataError(f"{self.index}: no usable record ({self.bad_lines} bad lines); each line must be "
                            '{"a": path, "a_prime": path, "b": path, "b_prime": path, "prompt": text}')

    @staticmethod
    def _problem(record: dict) -> str | None:
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
