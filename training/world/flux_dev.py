"""The world's FLUX.1-dev-like backbone (Edit Transfer's base): the tiny FLUX transformer of ``flux_kontext`` (same
size, text encoders and neutral conditioning), pretrained from scratch to draw and copy the world, knowing no edit.

FLUX.1-dev has no reference-image input: Edit Transfer completes a four-panel composite by inpainting. Pretraining,
on four-panel grids of world images (:func:`training.world.scenes.world_image`: plain scenes and global restyles, never
an edit pair), with the flow matching of :mod:`training.flow`:

* **copy by inpainting**: grids [A A; B B] of two independent images with noise on the bottom-right panel only and
  the loss there (the form Edit Transfer trains in, with the identity as the only "edit"): the base completes a
  grid [A A′; B ?] by copying B, whatever A → A′ shows;
* **generate**: grids of four independent images denoised from noise everywhere (the world's prior, so the model
  can draw colours and shapes it is not shown in the context).

Guidance is drawn uniformly from [1, 4] per sample, as for ``flux_kontext``; every world run uses the neutral
prompt unless a method gives text on purpose (Edit Transfer's text variant feeds the family instruction through the
world's random text encoders).
"""

from __future__ import annotations

import json
import logging

import torch
from diffusers import FluxTransformer2DModel
from safetensors.torch import save_file

from training import flow
from training.backbone import HashTokenizer
from training.edit_transfer.task import EditTransferConfig, panel_token_mask, predict, sample_composite
from training.world.autoencoder import load_world_autoencoder
from training.world.evaluate import mae, reconstruct
from training.world.flux_kontext import (
    CONDITIONING_FILE,
    NEUTRAL_PROMPT,
    TEXT_TOKENS,
    TEXT_VOCAB,
    TOKENIZER_FILE,
    grid_tokens,
    panel_pool,
    save_and_measure,
    text_encoders,
    transformer_config,
)
from training.world.schedule import pretrain_loop

log = logging.getLogger(__name__)


def write_text_encoders(folder, seed: int):
    """The world's random frozen text encoders and the neutral conditioning, saved as ``flux_kontext`` saves them;
    returns (text tokens, pooled) of the neutral prompt."""
    clip, t5 = text_encoders(seed)
    clip.save_pretrained(folder / "text_encoder")
    t5.save_pretrained(folder / "text_encoder_2")
    (folder / TOKENIZER_FILE).write_text(json.dumps({"vocab_size": TEXT_VOCAB, "length": TEXT_TOKENS}))
    with torch.no_grad():
        ids = HashTokenizer(TEXT_VOCAB, TEXT_TOKENS)([NEUTRAL_PROMPT])
        pooled, text = clip(ids).pooler_output, t5(ids)[0]
    save_file({"context": text.contiguous(), "pooled": pooled.contiguous()}, folder / CONDITIONING_FILE,
              metadata={"prompt": NEUTRAL_PROMPT})
    return text, pooled


def pretrain_loss(transformer, x0: torch.Tensor, mask: torch.Tensor | None, text, pooled,
                  gen: torch.Generator) -> torch.Tensor:
    """Flow-matching loss on ``x0`` grids: noise and loss on the ``mask`` panel only (copy), or everywhere (None)."""
    t, _ = flow.sample_timesteps("logit_normal", len(x0), gen)
    noise = torch.randn(x0.shape, generator=gen)
    guidance = 1.0 + 3.0 * torch.rand(len(x0), generator=gen)
    x_t = flow.add_noise(x0, noise, t) if mask is None else flow.add_noise_masked(x0, noise, t, mask)
    pred = predict(transformer, x_t, t, text.expand(len(x0), -1, -1), pooled.expand(len(x0), -1), guidance)
    return flow.weighted_mse(pred, flow.velocity_target(x0, noise), torch.ones(len(x0)), mask)


def copy_grids(count: int, pool_size: int, gen: torch.Generator) -> torch.Tensor:
    """[count, 4] panel indices of grids [A A; B B]."""
    pairs = torch.randint(pool_size, (count, 2), generator=gen)
    return pairs[:, [0, 0, 1, 1]]


def pretrain(transformer, panel_latents: torch.Tensor, text, pooled, cfg: dict, seed: int) -> list[float]:
    """Copy-by-inpainting and generation objectives on random grids of the panel pool (module docstring); as for
    ``flux_kontext``, generation joins after ``generate_from`` of the steps (it slows the forming of the copy
    circuit) and the learning rate warms up, then decays by a cosine."""
    gen = torch.Generator().manual_seed(seed)
    mask = panel_token_mask(2 * panel_latents.shape[-1])
    pool = len(panel_latents)

    def step_loss(step: int) -> torch.Tensor:
        copy_x0 = grid_tokens(panel_latents, copy_grids(cfg["batch_copy"], pool, gen))
        loss = pretrain_loss(transformer, copy_x0, mask, text, pooled, gen)
        if cfg["batch_generate"] and step >= cfg["generate_from"] * cfg["steps"]:
            gen_x0 = grid_tokens(panel_latents, torch.randint(pool, (cfg["batch_generate"], 4), generator=gen))
            loss = loss + cfg["generate_weight"] * pretrain_loss(transformer, gen_x0, None, text, pooled, gen)
        return loss

    return pretrain_loop(transformer, cfg, "flux_dev", step_loss, log)


@torch.no_grad()
def copy_error(backbone, panel: int, count: int, steps: int, seed: int) -> dict:
    """The base's copying with the official clean-context sampler: held-out grids [A A; B grey] completed, the
    bottom-right panel against B, and the autoencoder floor on B."""
    images = panel_pool(2 * count, panel, "heldout")
    a, b = images[0::2], images[1::2]
    cfg = EditTransferConfig(grid_resolution=2 * panel, sample_steps=steps, sample_shift=False, seed=seed,
                             text_free=True, guidance=1.0)
    batch = {"a": a, "a_prime": a, "b": b, "prompt": [NEUTRAL_PROMPT] * count}
    grid = sample_composite(backbone.transformer, backbone, batch, cfg, "cpu").cpu()
    return {"copy_error_heldout": round(float(mae(grid[:, panel:, panel:], b).mean()), 5),
            "copy_floor_heldout": round(float(mae(reconstruct(backbone, b), b).mean()), 5)}


def build(ctx) -> dict:
    """World model ``flux_dev``: text encoders, neutral conditioning, the pretrained transformer."""
    cfg, folder = ctx.config, ctx.folder
    text, pooled = write_text_encoders(folder, ctx.seed + 21)
    torch.manual_seed(ctx.seed + 22)
    transformer = FluxTransformer2DModel(**transformer_config(cfg))
    codec = load_world_autoencoder(ctx.dependency("autoencoder"))
    latents = codec.model_latents(panel_pool(cfg["pool"], cfg["panel"]))
    losses = pretrain(transformer, latents, text, pooled, cfg, ctx.seed + 23)
    return save_and_measure(ctx, transformer, losses, copy_error)
