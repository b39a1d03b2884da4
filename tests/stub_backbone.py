"""A stand-in backbone for the trainers' maths tests: an exact, invertible "VAE" (2x2 pixel blocks packed as 12-d
tokens) and a prompt encoder whose output depends on the prompt, so loss and sampler equations can be recomputed by
hand."""

from __future__ import annotations

from dataclasses import dataclass

import torch


def to_tokens(images: torch.Tensor) -> torch.Tensor:
    """Stub VAE + packing: every 2x2 pixel block of [B, H, W, 3] becomes one 12-d token (row-major)."""
    b, h, w, c = images.shape
    return images.reshape(b, h // 2, 2, w // 2, 2, c).permute(0, 1, 3, 2, 4, 5).reshape(b, (h // 2) * (w // 2), 4 * c)


def from_tokens(tokens: torch.Tensor, h: int, w: int) -> torch.Tensor:
    b = tokens.shape[0]
    return tokens.reshape(b, h // 2, w // 2, 2, 2, 3).permute(0, 1, 3, 2, 4, 5).reshape(b, h, w, 3)


@dataclass
class StubBackbone:
    vae_factor: int = 1

    def encode_images(self, images):
        return to_tokens(images * 2 - 1)

    def decode_tokens(self, tokens, height, width):
        return (from_tokens(tokens, height, width) + 1) / 2

    def encode_prompts(self, prompts, device, t5_length=None):
        self.t5_length = t5_length
        lengths = torch.tensor([float(len(p)) for p in prompts])
        return lengths.view(-1, 1, 1).expand(-1, 2, 5).clone(), (lengths * 0.5).view(-1, 1).expand(-1, 4).clone()
