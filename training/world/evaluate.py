"""Measurements on the analogy world: B′ sampled by a FLUX-Kontext-like backbone (with or without a method's
patch), and the per-family errors the yardstick reports.

Errors are mean absolute differences in 0..1 pixel units over the whole B′ panel:

* ``error``: the method's B′ against the true B′;
* ``no_edit``: B itself against the true B′ (what doing nothing scores);
* ``base``: the backbone without the method (its B′ from the same reference grid [A A′; B B]);
* ``floor``: the autoencoder's reconstruction of the true B′ (no method can be expected below it).
"""

from __future__ import annotations

from typing import Callable

import torch

from training import flow
from training.backbone import Backbone, token_ids
from training.world import scenes as world
from training.world.scenes import NEUTRAL_PROMPT, panel_pool


def four_panel(a, a_prime, b, b_prime) -> torch.Tensor:
    """IMAGE batches -> grids [B, 2S, 2S, 3] = [a a′; b b′]."""
    return torch.cat([torch.cat([a, a_prime], dim=2), torch.cat([b, b_prime], dim=2)], dim=1)


def bottom_right(grid: torch.Tensor) -> torch.Tensor:
    s = grid.shape[1] // 2
    return grid[:, s:, s:]


@torch.no_grad()
def sample_grids(backbone: Backbone, reference: torch.Tensor, steps: int, seed: int, guidance: float = 1.0,
                 before_call: Callable[[], None] | None = None) -> torch.Tensor:
    """Sample target grids given reference grids [B, 2S, 2S, 3] (Kontext context) with the neutral prompt and
    Euler steps from t = 1 to 0 (the same integration as the trainers' sample grids). ``before_call`` lets a method
    set per-batch state (LoRWeB's query) on the transformer first."""
    transformer = backbone.transformer
    device = next(transformer.parameters()).device
    ref = backbone.encode_images(reference).to(device)
    text, pooled = backbone.encode_prompts([NEUTRAL_PROMPT] * len(reference), device)
    side = reference.shape[1] // backbone.vae_factor
    ids = torch.cat([token_ids(side, side, 0), token_ids(side, side, 1)]).to(device)
    txt_ids = torch.zeros(text.shape[1], 3, device=device)
    guidance_t = torch.full((len(reference),), guidance, device=device)
    if before_call is not None:
        before_call()

    def velocity(x, t):
        out = transformer(hidden_states=torch.cat([x, ref], dim=1), encoder_hidden_states=text,
                          pooled_projections=pooled, timestep=t.to(device), img_ids=ids, txt_ids=txt_ids,
                          guidance=guidance_t, return_dict=False)[0]
        return out[:, : x.shape[1]]

    gen = torch.Generator().manual_seed(seed)
    noise = torch.randn(ref.shape, generator=gen).to(device, ref.dtype)
    tokens = flow.euler_sample(velocity, noise, steps)
    size = reference.shape[1]
    return backbone.decode_tokens(tokens, size, size).cpu()


def mae(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-item mean absolute error [B] of IMAGE batches."""
    return (x.float() - y.float()).abs().flatten(1).mean(dim=1)


@torch.no_grad()
def reconstruct(backbone: Backbone, images: torch.Tensor) -> torch.Tensor:
    size = images.shape[1]
    return backbone.decode_tokens(backbone.encode_images(images), size, size).cpu()


def copy_error(backbone: Backbone, panel: int, count: int, steps: int, seed: int) -> dict:
    """The base's copying: grids of held-out world images as their own reference; error of the sampled grid and
    the autoencoder floor on the same grids."""
    panels = panel_pool(4 * count, panel, "heldout")
    grids = four_panel(panels[0::4], panels[1::4], panels[2::4], panels[3::4])
    sampled = sample_grids(backbone, grids, steps, seed)
    return {"copy_error_heldout": round(float(mae(sampled, grids).mean()), 5),
            "copy_floor_heldout": round(float(mae(reconstruct(backbone, grids), grids).mean()), 5)}


def scenes_per_family(quick: bool) -> int:
    """Held-out scenes per family the yardstick scores by default: 16 on the full world, 4 on the quick one."""
    return 4 if quick else 16


def examples(family: str, count: int, panel: int, split: str = "heldout") -> list[world.Example]:
    return [world.example(family, split, k, panel) for k in range(count)]


def stack(items: list[world.Example], role: str) -> torch.Tensor:
    return torch.stack([getattr(ex, role) for ex in items])


def reference_grids(items: list[world.Example]) -> torch.Tensor:
    """LoRWeB/Kontext reference grids [a a′; b b] of a list of examples."""
    b = stack(items, "b")
    return four_panel(stack(items, "a"), stack(items, "a_prime"), b, b)
