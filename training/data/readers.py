"""Reading training images: the item and dataset errors every reader raises, image decoding with its refusals, and
the panel fit. Every data source (:mod:`training.data.sources`) reads its files through here."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from analogy_core.composite import fit_into_panel

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
