"""Edit Transfer (Chen et al., 2025) on FLUX.1-dev: the model-side pieces, ComfyUI-free.

A LoRA on FLUX.1-dev completes the four-panel composite [A A'; B ?]: it is trained with noise on the bottom-right
panel only and, at inference, the official sampler (the authors' modified FluxInpaintPipeline) keeps A, A' and B as
**clean** latents at every step — the unmasked latents start clean and are reset to the clean context after every
step, never re-noised. :class:`CleanContext` is that update in a form any sampler can run: before each model call the
context latents become the clean ones, and the model's denoised estimate of the context is the clean latent, so the
sampler's own state converges to it too. ``nodes/edit_transfer.py`` hooks it into ComfyUI's samplers; the trainer
and the analogy world use the same class.

Masks follow the official pipeline: the pixel mask (1 = generate) is binarised at 0.5 and resized to the latent grid
by nearest-neighbour sampling.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F

from .layouts import ModelLayout

BLOCK_PREFIXES = ("transformer_blocks.", "single_transformer_blocks.")


class EditTransferError(ValueError):
    """Bad input for the Edit Transfer context; the message says what was expected and what came."""


def encode_panels(image: torch.Tensor, encode: Callable[[torch.Tensor], torch.Tensor],
                  multiple: int = 1) -> torch.Tensor:
    """The official inference's VAE encoding of a four-panel composite: each quadrant of IMAGE [B, H, W, C] encoded
    on its own by ``encode`` (IMAGE -> latent [B, c, h, w]) and the latents tiled [[TL, TR], [BL, BR]] into
    [B, c, 2h, 2w] (the authors' pipeline, ``_encode_vae_image2``). Encoding the whole composite instead lets the
    latents near the seams see the neighbouring panel. ``multiple``: the panel sides must be multiples of it (the
    VAE's factor, so the tiles meet exactly)."""
    if image.ndim != 4 or image.shape[1] % (2 * multiple) or image.shape[2] % (2 * multiple):
        raise EditTransferError(f"expected a composite IMAGE [batch, height, width, channels] whose panels are "
                                f"multiples of {multiple} pixels, got {tuple(image.shape)}")
    h, w = image.shape[1] // 2, image.shape[2] // 2
    parts = [encode(image[:, r * h:(r + 1) * h, c * w:(c + 1) * w]) for r in (0, 1) for c in (0, 1)]
    return torch.cat([torch.cat(parts[:2], dim=-1), torch.cat(parts[2:], dim=-1)], dim=-2)


def edit_transfer_targets(layout: ModelLayout) -> list[str]:
    """The layers the released Edit Transfer LoRA adapts: every linear layer of FLUX's double and single blocks
    (diffusers paths; 19·14 + 38·6 = 494 for FLUX.1-dev)."""
    return [path for path in layout.shapes if path.startswith(BLOCK_PREFIXES)]


def latent_generate_mask(mask: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """A pixel MASK ([B, H, W] or [H, W], 1 = the panel to generate) as a boolean [B, 1, height, width] latent mask:
    binarised at 0.5, then nearest-neighbour resized (what the official pipeline does to its inpainting mask)."""
    if not isinstance(mask, torch.Tensor):
        raise EditTransferError(f"mask: expected a MASK tensor, got {type(mask).__name__}")
    if mask.ndim == 2:
        mask = mask.unsqueeze(0)
    if mask.ndim == 4 and mask.shape[1] == 1:
        mask = mask[:, 0]
    if mask.ndim != 3 or 0 in mask.shape:
        raise EditTransferError(f"mask: expected a MASK of shape [batch, height, width], got {tuple(mask.shape)}")
    binary = (mask.float() >= 0.5).float().unsqueeze(1)
    resized = F.interpolate(binary, size=(height, width), mode="nearest")
    generate = resized > 0.5
    per_sample = generate.flatten(1)
    if not per_sample.any(dim=1).all():
        raise EditTransferError("mask: it selects no pixel to generate (expected 1 on the bottom-right panel, e.g. the "
                                "mask output of Four-Panel Composite)")
    if per_sample.all(dim=1).any():
        raise EditTransferError("mask: it covers the whole image, so nothing is kept as context (expected 1 only on "
                                "the panel to generate)")
    return generate


def tile_batch(tensor: torch.Tensor, batch: int, what: str) -> torch.Tensor:
    """Repeat ``tensor`` along dim 0 to ``batch`` rows (as ComfyUI repeats a latent to a batch size)."""
    size = tensor.shape[0]
    if size == batch:
        return tensor
    if batch % size:
        raise EditTransferError(f"{what} holds {size} latents but the sampler runs a batch of {batch}: connect the "
                                "same composite latent to Edit Transfer Context and to the sampler")
    return tensor.repeat(batch // size, *([1] * (tensor.ndim - 1)))


@dataclass
class CleanContext:
    """The clean-context update of the official Edit Transfer sampler.

    ``clean``: the composite's latents in the model's own latent space ([b, C, h, w], e.g. FLUX's
    ``(vae_latent - shift) * scale``); ``generate``: boolean [b or 1, 1, h, w], True on the panel the sampler
    generates. Everything else is context: the model sees it clean at every call, and its denoised estimate there is
    the clean latent.
    """

    clean: torch.Tensor
    generate: torch.Tensor
    _cache: dict = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.clean.ndim < 3:
            raise EditTransferError(f"latent: expected [batch, channels, height, width], got {tuple(self.clean.shape)}")
        if tuple(self.generate.shape[-2:]) != tuple(self.clean.shape[-2:]):
            raise EditTransferError(f"mask of latent size {tuple(self.generate.shape[-2:])} does not fit the latent "
                                    f"{tuple(self.clean.shape[-2:])}")
        masks, latents = self.generate.shape[0], self.clean.shape[0]
        if masks != latents and (masks > latents or latents % masks):
            raise EditTransferError(f"the mask holds {masks} masks but the latent {latents} images: give one mask, or "
                                    "one per image (the mask output of the same Four-Panel Composite)")

    @classmethod
    def from_pixel_mask(cls, clean: torch.Tensor, mask: torch.Tensor) -> "CleanContext":
        return cls(clean.detach().float().cpu(), latent_generate_mask(mask, *clean.shape[-2:]).cpu())

    def _tensors(self, x: torch.Tensor, groups: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(clean, generate) on x's device/dtype with x's batch: ``groups`` chunks (cond, uncond, …) of the sampler's
        batch, each chunk holding the whole latent batch."""
        if tuple(x.shape[1:]) != tuple(self.clean.shape[1:]):
            raise EditTransferError(f"the sampler's latent is {tuple(x.shape[1:])} (channels, height, width) but the "
                                    f"context latent is {tuple(self.clean.shape[1:])}: connect the same composite "
                                    "latent (VAE-encoded by the model's VAE) to Edit Transfer Context and the sampler")
        key = (x.device, x.dtype, x.shape[0], groups)
        if key not in self._cache:
            if groups < 1 or x.shape[0] % groups:
                groups = 1
            per_group = x.shape[0] // groups
            clean = tile_batch(self.clean, per_group, "the context latent").repeat(groups, 1, 1, 1)
            generate = tile_batch(tile_batch(self.generate, self.clean.shape[0], "the mask"), per_group,
                                  "the mask").repeat(groups, 1, 1, 1)
            self._cache.clear()
            self._cache[key] = (clean.to(x.device, x.dtype), generate.to(x.device))
        return self._cache[key]

    def model_input(self, x: torch.Tensor, groups: int = 1, input_scale: torch.Tensor | None = None) -> torch.Tensor:
        """``x`` with the context replaced by the clean latents. ``input_scale``: what the model's input
        preconditioning multiplies x by (1 for flow models such as FLUX), so that the model itself sees the clean
        latent."""
        clean, generate = self._tensors(x, groups)
        if input_scale is not None:
            clean = clean / input_scale.to(x.device, x.dtype)
        return torch.where(generate, x, clean)

    def denoised(self, denoised: torch.Tensor, groups: int = 1) -> torch.Tensor:
        """The model's denoised estimate with the context set to the clean latents (so any sampler's state converges
        to the clean context at sigma = 0)."""
        clean, generate = self._tensors(denoised, groups)
        return torch.where(generate, denoised, clean.to(denoised.dtype))
