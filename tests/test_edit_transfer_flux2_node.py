"""Edit Transfer Context on FLUX.2 inside ComfyUI's own samplers, against the official loop written out on the
diffusers twin (tiny Flux2 models, same weights).

The loop is the official one (see ``test_edit_transfer_node.py``: noise on the panel, the clean composite elsewhere,
the context reset to the clean latents after every Euler step) with the model called as Flux2Pipeline calls it: one
token per latent pixel of ComfyUI's FLUX.2 latent (its VAE patchifies, its latent format is the identity), position
ids (0, h, w, 0), text ids (0, 0, 0, l), guidance embedded, and the text padded at the front to 512 tokens with zeros
as ComfyUI's ``model_base.Flux2`` pads it. ComfyUI's stock inpainting (re-noised context) must differ measurably.
"""

from __future__ import annotations

import importlib
from itertools import pairwise

import pytest
import torch
import torch.nn.functional as F
from diffusers import Flux2KleinPipeline
from test_edit_transfer_node import TEXT, check_ksampler_equals_official_loop
from tiny_models import FLUX2_COMFY, tiny_flux2_pair

COMFY_TEXT_TOKENS = 512  # model_base.Flux2.extra_conds pads the text conditioning to 512 tokens


@pytest.fixture(scope="module")
def setup(comfy_inproc):
    model, patcher = tiny_flux2_pair(comfy_inproc.comfy, seed=14)
    node_module = importlib.import_module(f"{comfy_inproc.pack.__name__}.nodes.edit_transfer")
    return model, patcher, node_module


def conditioning(seed: int, guidance: float = 2.5):
    gen = torch.Generator().manual_seed(seed)
    # FLUX.2 has no pooled text vector (vec_in_dim None); ComfyUI's Flux conditioning still carries the key
    return [[torch.randn(1, TEXT, FLUX2_COMFY["context_in_dim"], generator=gen),
             {"guidance": guidance, "pooled_output": None}]]


@torch.no_grad()
def official_loop(model, latent, mask, noise, sigmas, positive, negative=None, cfg=1.0):
    b, c, h, w = latent.shape

    def tokens(x):
        return x.reshape(b, c, h * w).transpose(1, 2)

    image = tokens(latent)
    keep = (mask >= 0.5).float().unsqueeze(1)
    m = tokens(F.interpolate(keep, size=(h, w)).repeat(1, c, 1, 1))
    latents = tokens(noise) * m + image * (1 - m)
    img_ids = Flux2KleinPipeline._prepare_latent_ids(latent)

    def velocity(cond, x, sigma):
        ctx, extra = cond[0]
        ctx = F.pad(ctx, (0, 0, COMFY_TEXT_TOKENS - ctx.shape[1], 0)).expand(b, -1, -1)
        return model(hidden_states=x, encoder_hidden_states=ctx, timestep=sigma.expand(b), img_ids=img_ids,
                     txt_ids=Flux2KleinPipeline._prepare_text_ids(ctx), guidance=torch.full((b,), extra["guidance"]),
                     return_dict=False)[0]

    for sigma, sigma_next in pairwise(sigmas):
        v = velocity(positive, latents, sigma)
        if cfg != 1.0:
            v_uncond = velocity(negative, latents, sigma)
            v = v_uncond + cfg * (v - v_uncond)
        latents = latents + (sigma_next - sigma) * v
        latents = (1 - m) * image + m * latents
    return latents.transpose(1, 2).reshape(b, c, h, w)


@pytest.mark.parametrize("batch,cfg", [(1, 1.0), (2, 2.5)])
def test_ksampler_with_the_node_equals_the_official_loop_on_flux2(comfy_inproc, setup, batch, cfg):
    model, patcher, node_module = setup
    check_ksampler_equals_official_loop(comfy_inproc.comfy, model, patcher, node_module, batch, cfg, conditioning,
                                        official_loop)
