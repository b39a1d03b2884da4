"""Readers of before/after pairs (registered in :mod:`training.data.sources`): MagicBrush parquet shards, JSONL or
folder pairs. LoRA of Change trains on *paired* data only (the query B and target B′ are made from A and A′ by the trainer). Every reader
yields ``{"a": [S, S, 3], "a_prime": [S, S, 3], "prompt": str}`` (float 0..1; ``prompt`` is the edit instruction, ""
when the data has none). Unreadable items raise :class:`~training.data.readers.ItemError` naming the file (and row
or line), which :class:`~training.data.batching.ReadableItems` turns into counted skips, as for every trainer.

``data`` specs:

* ``magicbrush:<folder or .parquet file>`` — MagicBrush as distributed on the Hugging Face hub (osunlp/MagicBrush):
  parquet shards ``data/train-*.parquet`` (``magicbrush_split: dev`` for ``data/dev-*.parquet``) with columns
  ``img_id`` (string), ``turn_index`` (int32), ``source_img``, ``mask_img``, ``target_img`` (images: structs of
  ``bytes`` and ``path``) and ``instruction`` (string). A = ``source_img``, A′ = ``target_img``, prompt =
  ``instruction``; the mask is not used. Early revisions named the images ``input_img``/``output_img``; both are
  read. Shards are read lazily with pyarrow, one row group at a time (the last row group read is cached per
  process): random access costs one row-group read of the two image columns (~100 rows in the hub's files), so
  give the data loader a few workers (``num_workers``) on real runs.
* ``pairs:<file.jsonl>`` — lines ``{"a": path, "a_prime": path, "prompt": text}`` (paths relative to the file;
  ``prompt`` optional, also read as ``instruction``).
* ``pairs:<folder>`` — ``<folder>/before/<name>.<ext>`` and ``<folder>/after/<name>.<ext>`` matched by file stem; an
  optional ``<folder>/after/<name>.txt`` holds the instruction.

The analogy world's pairs come from its own source (:mod:`training.world.data`).
"""

from __future__ import annotations

import bisect
import logging
import os
from pathlib import Path

from torch.utils.data import Dataset

from training.data.readers import DataError, ItemError, decode_rgb, load_rgb, read_jsonl, to_panel

log = logging.getLogger(__name__)
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp"}
SOURCE_COLUMNS = ("source_img", "input_img")
TARGET_COLUMNS = ("target_img", "output_img")
TEXT_COLUMN = "instruction"


class MagicBrush(Dataset):
    """MagicBrush parquet shards (see the module docstring for the column layout)."""

    def __init__(self, location: str | os.PathLike, resolution: int, fit: str = "stretch", split: str = "train"):
        import pyarrow.parquet as pq  # optional dependency: parquet (MagicBrush) data only

        self.resolution, self.fit = resolution, fit
        self.files = self._find(Path(location), split)
        self.columns: list[tuple[str, str, str | None]] = []   # per file: source, target, text column
        self.row_groups: list[tuple[int, int]] = []           # (file index, row group)
        starts = [0]
        for index, path in enumerate(self.files):
            try:
                parquet = pq.ParquetFile(path)
            except Exception as err:  # noqa: BLE001 - pyarrow raises several types for damaged files
                log.warning("skipping %s: not a readable parquet file (%s)", path, err)
                self.columns.append(("", "", None))
                continue
            names = set(parquet.schema_arrow.names)
            source = next((c for c in SOURCE_COLUMNS if c in names), None)
            target = next((c for c in TARGET_COLUMNS if c in names), None)
            if source is None or target is None:
                raise DataError(f"{path}: no MagicBrush image columns (expected {SOURCE_COLUMNS[0]} and "
                                f"{TARGET_COLUMNS[0]}; the file has {sorted(names)[:8]})")
            self.columns.append((source, target, TEXT_COLUMN if TEXT_COLUMN in names else None))
            for group in range(parquet.num_row_groups):
                rows = parquet.metadata.row_group(group).num_rows
                if rows:
                    self.row_groups.append((index, group))
                    starts.append(starts[-1] + rows)
        self.starts = starts
        if not self.row_groups:
            raise DataError(f"{location}: no readable MagicBrush rows in {len(self.files)} parquet file(s)")
        self._cache: tuple[int, int, object] | None = None  # (pid, row-group position, pyarrow table)

    @staticmethod
    def _find(location: Path, split: str) -> list[Path]:
        if location.is_file():
            return [location]
        if not location.is_dir():
            raise DataError(f"{location}: no such MagicBrush folder or parquet file")
        files = sorted(location.rglob(f"{split}-*.parquet"))
        if not files:
            found = sorted(p.name for p in location.rglob("*.parquet"))[:5]
            raise DataError(f"{location}: no {split}-*.parquet shards (MagicBrush's data/{split}-NNNNN-of-NNNNN-"
                            f"*.parquet); parquet files found: {found or 'none'}")
        return files

    def __len__(self) -> int:
        return self.starts[-1]

    def _group(self, position: int):
        pid = os.getpid()
        if self._cache is not None and self._cache[:2] == (pid, position):
            return self._cache[2]
        import pyarrow.parquet as pq  # optional dependency: parquet (MagicBrush) data only

        file_index, group = self.row_groups[position]
        path = self.files[file_index]
        wanted = [c for c in self.columns[file_index] if c]
        try:
            table = pq.ParquetFile(path).read_row_group(group, columns=wanted)
        except Exception as err:  # noqa: BLE001
            raise ItemError(f"{path} row group {group}: unreadable ({type(err).__name__}: {err})") from None
        self._cache = (pid, position, table)
        return table

    def __getitem__(self, index: int) -> dict:
        position = bisect.bisect_right(self.starts, index) - 1
        row = index - self.starts[position]
        file_index, group = self.row_groups[position]
        where = f"{self.files[file_index]} row {row} of row group {group}"
        table = self._group(position)
        source, target, text = self.columns[file_index]
        images = {}
        for role, column in (("a", source), ("a_prime", target)):
            cell = table.column(column)[row].as_py()
            data = cell.get("bytes") if isinstance(cell, dict) else cell if isinstance(cell, bytes) else None
            if not data:
                raise ItemError(f"{where}: {column} holds no image bytes")
            images[role] = to_panel(decode_rgb(data, f"{where} ({column})"), self.resolution, self.fit)
        prompt = table.column(text)[row].as_py() if text else ""
        return {**images, "prompt": prompt if isinstance(prompt, str) else ""}


class JsonlPairs(Dataset):
    """Lines ``{"a": path, "a_prime": path, "prompt": text}``; bad lines are skipped with their number."""

    def __init__(self, index: str | os.PathLike, resolution: int, fit: str = "stretch"):
        self.index, self.resolution, self.fit = Path(index), resolution, fit
        self.records, self.bad_lines = read_jsonl(self.index, self._problem, "pairs index")
        if not self.records:
            raise DataError(f'{self.index}: no usable record; each line must be {{"a": path, "a_prime": path, '
                            '"prompt": text}')

    @staticmethod
    def _problem(record: dict) -> str | None:
        bad = [k for k in ("a", "a_prime") if not isinstance(record.get(k), str)]
        return f"record lacks string image paths {bad}" if bad else None

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict:
        number, record = self.records[index]
        images = {}
        for role in ("a", "a_prime"):
            try:
                images[role] = to_panel(load_rgb(self.index.parent / record[role]), self.resolution, self.fit)
            except ItemError as err:
                raise ItemError(f"{self.index}:{number} ({role}): {err}") from None
        prompt = record.get("prompt", record.get("instruction", ""))
        return {**images, "prompt": prompt if isinstance(prompt, str) else ""}


class FolderPairs(Dataset):
    """``before/<name>`` and ``after/<name>`` matched by stem; ``after/<name>.txt`` is the optional instruction."""

    def __init__(self, root: str | os.PathLike, resolution: int, fit: str = "stretch"):
        self.root, self.resolution, self.fit = Path(root), resolution, fit
        before, after = (self._images(self.root / side) for side in ("before", "after"))
        if not before or not after:
            raise DataError(f"{self.root}: expected before/ and after/ folders of images with matching names")
        self.stems = sorted(set(before) & set(after))
        unmatched = sorted(set(before) ^ set(after))
        if unmatched:
            log.warning("%s: %d images have no partner in the other folder, e.g. %s", self.root, len(unmatched),
                        unmatched[:3])
        if not self.stems:
            raise DataError(f"{self.root}: no file name appears in both before/ and after/")
        self.before, self.after = before, after

    @staticmethod
    def _images(folder: Path) -> dict[str, Path]:
        if not folder.is_dir():
            return {}
        return {p.stem: p for p in sorted(folder.iterdir()) if p.suffix.lower() in IMAGE_SUFFIXES}

    def __len__(self) -> int:
        return len(self.stems)

    def __getitem__(self, index: int) -> dict:
        stem = self.stems[index]
        a = to_panel(load_rgb(self.before[stem]), self.resolution, self.fit)
        a_prime = to_panel(load_rgb(self.after[stem]), self.resolution, self.fit)
        text_file = self.after[stem].with_suffix(".txt")
        try:
            prompt = text_file.read_text().strip() if text_file.is_file() else ""
        except (OSError, UnicodeDecodeError):
            prompt = ""
        return {"a": a, "a_prime": a_prime, "prompt": prompt}
