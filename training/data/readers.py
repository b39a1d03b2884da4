"""Reading training images: the item and dataset errors every reader raises, image decoding with its refusals, and
the panel fit. Every data source (:mod:`training.data.sources`) reads its files through here."""

from __future__ import annotations

import io
import json
import logging
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from PIL import Image

from analogy_core.composite import fit_into_panel

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
    return _decode(path, str(path))


def decode_rgb(data: bytes, where: str) -> torch.Tensor:
    """Encoded image bytes (``where`` names them in errors) as float RGB [H, W, 3] in 0..1."""
    return _decode(io.BytesIO(data), where)


def _decode(source, where: str) -> torch.Tensor:
    try:
        with Image.open(source) as img:
            array = np.asarray(img.convert("RGB"), dtype=np.float32) / 255.0
    except Image.DecompressionBombError as err:
        raise ItemError(f"{where}: refused as a decompression bomb ({err})") from None
    except (OSError, ValueError, SyntaxError, EOFError) as err:  # PIL raises all of these for damaged files
        raise ItemError(f"{where}: unreadable image ({type(err).__name__}: {err})") from None
    if min(array.shape[:2]) < MIN_IMAGE_SIDE:
        raise ItemError(f"{where}: {array.shape[1]}x{array.shape[0]} px is smaller than {MIN_IMAGE_SIDE} px")
    return torch.from_numpy(array)


def to_panel(image: torch.Tensor, size: int, fit: str = "stretch") -> torch.Tensor:
    """A size x size panel: "stretch" resizes ignoring the aspect (official), "center_crop" crops the middle."""
    if fit not in PANEL_FITS:
        raise ValueError(f"panel fit must be one of {PANEL_FITS}, got {fit!r}")
    panel, _ = fit_into_panel(image.unsqueeze(0), size, size, fit, 0.5)
    return panel[0]


def read_jsonl(index: Path, check: Callable[[dict], str | None], what: str) -> tuple[list[tuple[int, dict]], int]:
    """The usable records of a JSONL index as (line number, record), and how many lines were bad. A bad line (not
    UTF-8, not JSON, nested too deeply to parse, not an object, or refused by ``check``) is logged with its line
    number and skipped, like an unreadable image; only an unreadable file stops the dataset."""
    try:
        data = index.read_bytes()
    except OSError as err:
        raise DataError(f"{index}: cannot read the {what} ({err})") from None
    records, bad = [], 0
    for number, raw in enumerate(data.split(b"\n"), start=1):
        if not raw.strip():
            continue
        record, problem = parse_record(raw)
        problem = problem or check(record)
        if problem:
            bad += 1
            log.warning("skipping %s:%d: %s", index, number, problem)
            continue
        records.append((number, record))
    return records, bad


def parse_record(raw: bytes) -> tuple[dict, str | None]:
    """One JSON object from one line of bytes, or the reason it is not one."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        return {}, f"not UTF-8 text (byte {err.start} of the line)"
    return parse_json_object(text)


def parse_json_object(text: str) -> tuple[dict, str | None]:
    try:
        value = json.loads(text)
    except RecursionError:
        return {}, "JSON nested too deeply to read"
    except ValueError as err:
        return {}, f"not JSON ({err})"
    if not isinstance(value, dict):
        return {}, f"expected a JSON object, got {type(value).__name__}"
    return value, None
