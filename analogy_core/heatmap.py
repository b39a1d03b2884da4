"""Render mixing coefficients (layers x basis entries) as an IMAGE, so users see which primitives an analogy picked."""

from __future__ import annotations

import torch

# A perceptually ordered dark-blue -> teal -> yellow ramp (viridis-like anchor colours).
_RAMP = torch.tensor([[0.267, 0.005, 0.329], [0.229, 0.322, 0.546], [0.128, 0.567, 0.551],
                      [0.369, 0.789, 0.383], [0.993, 0.906, 0.144]])


def colourise(values: torch.Tensor) -> torch.Tensor:
    """Values in 0..1 [...] -> RGB [..., 3] along the ramp."""
    pos = values.clamp(0, 1) * (len(_RAMP) - 1)
    low = pos.floor().long().clamp(max=len(_RAMP) - 2)
    frac = (pos - low).unsqueeze(-1)
    return _RAMP[low] * (1 - frac) + _RAMP[low + 1] * frac


def coefficient_heatmap(coefficients: torch.Tensor, cell_width: int = 16, row_height: int = 2) -> torch.Tensor:
    """[layers, N] coefficients -> IMAGE [1, layers·row_height, N·cell_width, 3].

    Each row is normalised by its maximum, so the preferred entries of every layer stand out; a uniform mix (all
    1/N) shows as a flat bright row.
    """
    if coefficients.ndim != 2 or coefficients.numel() == 0:
        raise ValueError(f"expected [layers, N] coefficients, got {tuple(coefficients.shape)}")
    rows = coefficients.float() / coefficients.float().amax(dim=1, keepdim=True).clamp_min(1e-12)
    image = colourise(rows)
    image = image.repeat_interleave(row_height, dim=0).repeat_interleave(cell_width, dim=1)
    return image.unsqueeze(0).contiguous()
