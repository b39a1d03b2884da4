"""Procedural images and simple transformation families: the pack's built-in analogy examples.

Used by the demo (the "embedded default" A, A', B) and by the tiny training preset, so nothing is downloaded.
Images are float tensors [H, W, 3] in 0..1.
"""

from __future__ import annotations

from typing import Callable

import torch


def procedural_scene(seed: int, width: int = 256, height: int = 256) -> torch.Tensor:
    """A reproducible picture: a two-colour gradient background with a few soft discs and rectangles."""
    gen = torch.Generator().manual_seed(seed)
    ys = torch.linspace(0, 1, height).view(height, 1, 1)
    xs = torch.linspace(0, 1, width).view(1, width, 1)
    c0, c1 = torch.rand(3, generator=gen), torch.rand(3, generator=gen)
    angle = torch.rand(1, generator=gen) * 6.2832
    t = (xs * torch.cos(angle) + ys * torch.sin(angle)).clamp(0, 1)
    image = (c0 * (1 - t) + c1 * t).expand(height, width, 3).clone()
    for _ in range(int(torch.randint(3, 7, (1,), generator=gen))):
        colour = torch.rand(3, generator=gen)
        cx, cy = torch.rand(2, generator=gen)
        size = 0.08 + 0.2 * float(torch.rand(1, generator=gen))
        if torch.rand(1, generator=gen) < 0.5:  # soft disc
            dist = ((xs - cx) ** 2 + ((ys - cy) * height / width) ** 2).sqrt()
            alpha = torch.sigmoid((size - dist) * 60)
        else:  # rectangle
            half_w, half_h = size, size * float(0.5 + torch.rand(1, generator=gen))
            alpha = (((xs - cx).abs() < half_w) & ((ys - cy).abs() < half_h)).float()
        image = image * (1 - alpha) + colour * alpha
    return image.clamp(0, 1)


def _grayscale(img: torch.Tensor) -> torch.Tensor:
    luma = img[..., 0:1] * 0.299 + img[..., 1:2] * 0.587 + img[..., 2:3] * 0.114
    return luma.expand_as(img).clone()


TRANSFORMS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "invert": lambda img: 1.0 - img,
    "grayscale": _grayscale,
    "channel_swap": lambda img: img[..., [2, 0, 1]].clone(),
    "hflip": lambda img: img.flip(1),
    "vflip": lambda img: img.flip(0),
}


def analogy_example(transform: str = "invert", seed_a: int = 1, seed_b: int = 2, width: int = 256,
                    height: int = 256) -> dict[str, torch.Tensor]:
    """A, A', B, B' for one transformation family."""
    if transform not in TRANSFORMS:
        raise ValueError(f"transform: expected one of {sorted(TRANSFORMS)}, got {transform!r}")
    fn = TRANSFORMS[transform]
    a, b = procedural_scene(seed_a, width, height), procedural_scene(seed_b, width, height)
    return {"a": a, "a_prime": fn(a), "b": b, "b_prime": fn(b)}


# the prompt of each family (the synthetic source and make_synthetic_dataset)
PROMPTS = {
    "invert": "invert the colours",
    "grayscale": "make it black and white",
    "channel_swap": "rotate the colour channels",
    "hflip": "mirror it left to right",
    "vflip": "turn it upside down",
}
