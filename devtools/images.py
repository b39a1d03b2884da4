"""PNG helpers that round-trip exactly the way ComfyUI's LoadImage / SaveImage do (8-bit, value/255)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image


def to_uint8(image: torch.Tensor) -> np.ndarray:
    """[H, W, C] float 0..1 -> uint8, rounding like SaveImage (which truncates 255*x after clipping)."""
    return np.clip(255.0 * image.detach().cpu().float().numpy(), 0, 255).astype(np.uint8)


def save_png(image: torch.Tensor, path: Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(to_uint8(image)).save(path)
    return path


def load_png(path: Path) -> torch.Tensor:
    """PNG -> [H, W, 3] float in 0..1, as LoadImage does."""
    array = np.asarray(Image.open(path).convert("RGB"), dtype=np.float32) / 255.0
    return torch.from_numpy(array)
