"""The world's FLUX.1-Kontext-like backbone: a tiny diffusers ``FluxTransformer2DModel`` that can draw and copy the
world, pretrained from scratch, and knowing no edit.

Pretraining, on four-panel grids of independent world images (the grid size LoRWeB trains on), with the flow
matching of :mod:`training.flow` (x_t = (1 - t)·x0 + t·ε, target ε - x0):

* **copy** (Kontext, the neutral prompt): the clean grid is appended as the reference image (position index 1, as
  Kontext marks reference latents) and the model denoises the same grid: B′ = B everywhere. This is what LoRWeB's
  reference grid [a a′; b b] asks of the base in three quadrants, and the base's answer in the fourth;
* **completion** (drawing; its own prompt, "draw a new picture in the last panel"): the reference is
  [s1 s2; s3 s3] (LoRWeB's layout) and the target [s1 s2; s3 s4] with s4 an unrelated world image: keep three
  panels, draw a new picture of the world in the fourth. The base thus draws world images from noise and knows that
  the last panel can differ from its reference — as FLUX.1-Kontext, which edits what it is asked to — while nothing
  relates the new panel to any other: no edit is ever shown. Measured on the quick world: LoRWeB trained on top of a
  copy-only base moved the other quadrants (their copy error rose from 0.024 to 0.04-0.05) and reached 0.42x the
  no-edit error on ``invert`` alone after 300 steps; on top of copy + completion the other quadrants stayed at
  0.025-0.03 and ``invert`` reached 0.25x (0.17x at learning rate 6e-3).

A separate unconditional-generation objective was tried and dropped: mixed in from the start it slowed the forming
of the copy circuit (copy error 0.135 after 600 steps, against 0.024 with copying alone).

The grids' images come from :func:`training.world.scenes.world_image` (plain scenes and global restyles, never an edit
pair), so any edit the backbone later shows comes from the method under test.

Text: FLUX needs T5 tokens and a pooled CLIP vector. The world has no language model: the two text encoders are
small random frozen transformers (as the ``tiny`` backbone) behind the word-hash tokenizer, saved with the model,
and every world run uses the neutral (empty) prompt. The edit can then only come from the analogy, never from words
(LoRWeB's official inference needs a prompt; on the world, its information is deliberately zero). The neutral
conditioning is also written as ``neutral_conditioning.safetensors`` for ComfyUI.

Guidance is drawn uniformly from [1, 4] per sample during pretraining, so the base does not depend on it.
"""

from __future__ import annotations

import json
import logging
from typing import Callable

import torch
import torch.nn.functional as F
from diffusers import FluxTransformer2DModel
from safetensors.torch import save_file
from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

from training import flow
from training.backbone import HashTokenizer, pack, token_ids
from training.world.autoencoder import load_world_autoencoder
from training.world.evaluate import copy_error
from training.world.loaders import world_backbone
from training.world.scenes import NEUTRAL_PROMPT, panel_pool
from training.world.schedule import pretrain_loop, training_metrics

log = logging.getLogger(__name__)
HEAD_DIM = 32
AXES = (8, 12, 12)         # rope axes (index, row, column); sums to HEAD_DIM
TEXT_WIDTH = 32            # T5 token width = joint_attention_dim; pooled CLIP width
TEXT_TOKENS = 8            # word-hash tokenizer length
TEXT_VOCAB = 1000
COMPLETE_PROMPT = "draw a new picture in the last panel"  # the completion objective's prompt (never used by methods)
CONDITIONING_FILE = "neutral_conditioning.safetensors"
TOKENIZER_FILE = "hash_tokenizer.json"


def transformer_config(cfg: dict) -> dict:
    return dict(patch_size=1, in_channels=64, num_layers=cfg["double_blocks"], num_single_layers=cfg["single_blocks"],
                attention_head_dim=HEAD_DIM, num_attention_heads=cfg["heads"], joint_attention_dim=TEXT_WIDTH,
                pooled_projection_dim=TEXT_WIDTH, guidance_embeds=True, axes_dims_rope=AXES)


def comfy_unet_config(diffusers_config: dict) -> dict:
    """The same transformer as ComfyUI's Flux model config (for the file header the dev loaders read)."""
    heads, head_dim = diffusers_config["num_attention_heads"], diffusers_config["attention_head_dim"]
    return dict(image_model="flux", in_channels=diffusers_config["in_channels"] // 4, out_channels=
                diffusers_config["in_channels"] // 4, vec_in_dim=diffusers_config["pooled_projection_dim"],
                context_in_dim=diffusers_config["joint_attention_dim"], hidden_size=heads * head_dim, mlp_ratio=4.0,
                num_heads=heads, depth=diffusers_config["num_layers"],
                depth_single_blocks=diffusers_config["num_single_layers"],
                axes_dim=list(diffusers_config["axes_dims_rope"]), theta=10000, patch_size=2, qkv_bias=True,
                guidance_embed=diffusers_config["guidance_embeds"])


def text_encoders(seed: int):
    """(CLIP text, T5 encoder): random, frozen, tiny; the world's stand-ins for FLUX's text encoders."""
    torch.manual_seed(seed)
    clip = CLIPTextModel(CLIPTextConfig(vocab_size=TEXT_VOCAB, hidden_size=TEXT_WIDTH, intermediate_size=64,
                                        num_hidden_layers=2, num_attention_heads=2,
                                        max_position_embeddings=TEXT_TOKENS, projection_dim=TEXT_WIDTH,
                                        pad_token_id=0, bos_token_id=0, eos_token_id=2))
    t5 = T5EncoderModel(T5Config(vocab_size=TEXT_VOCAB, d_model=TEXT_WIDTH, d_kv=8, d_ff=64, num_layers=2,
                                 num_heads=4))
    return clip.eval().requires_grad_(False), t5.eval().requires_grad_(False)


# ---------------------------------------------------------------------------------------------------------------------
# grids of world images as latent tokens


def grid_images(panels: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """[B, 4] panel indices -> IMAGE grids [B, 2S, 2S, 3] (row-major: top-left, top-right, bottom-left, right)."""
    p = panels[index]
    top = torch.cat([p[:, 0], p[:, 1]], dim=2)
    return torch.cat([top, torch.cat([p[:, 2], p[:, 3]], dim=2)], dim=1)


def grid_tokens(panel_latents: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Model-space panel latents [N, C, h, w] -> packed grid tokens [B, (h)(w), 4C] of the 2 x 2 grids ``index``.
    Equal to encoding the grid image (the world encoder never mixes latent cells; tested)."""
    p = panel_latents[index]
    top = torch.cat([p[:, 0], p[:, 1]], dim=3)
    return pack(torch.cat([top, torch.cat([p[:, 2], p[:, 3]], dim=3)], dim=2))


# ---------------------------------------------------------------------------------------------------------------------
# pretraining


def velocity(transformer, x_t, reference, t, text, pooled, guidance, latent_side: int):
    """The transformer's velocity for the target tokens (reference tokens, if any, appended as Kontext context)."""
    ids = token_ids(latent_side, latent_side, 0)
    hidden = x_t
    if reference is not None:
        ids = torch.cat([ids, token_ids(latent_side, latent_side, 1)])
        hidden = torch.cat([x_t, reference], dim=1)
    out = transformer(hidden_states=hidden, encoder_hidden_states=text.expand(len(x_t), -1, -1),
                      pooled_projections=pooled.expand(len(x_t), -1), timestep=t, img_ids=ids,
                      txt_ids=torch.zeros(text.shape[1], 3), guidance=guidance, return_dict=False)[0]
    return out[:, : x_t.shape[1]]


def pretrain_loss(transformer, x0: torch.Tensor, reference: torch.Tensor | None, text, pooled,
                  gen: torch.Generator, latent_side: int) -> torch.Tensor:
    """Flow-matching loss of denoising ``x0`` (tokens) with ``reference`` tokens as Kontext context (or none)."""
    t, _ = flow.sample_timesteps("logit_normal", len(x0), gen)
    noise = torch.randn(x0.shape, generator=gen)
    guidance = 1.0 + 3.0 * torch.rand(len(x0), generator=gen)
    pred = velocity(transformer, flow.add_noise(x0, noise, t), reference, t, text, pooled, guidance, latent_side)
    return F.mse_loss(pred, flow.velocity_target(x0, noise))


def completion_grids(panel_latents: torch.Tensor, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(target, reference) tokens of the completion objective: reference [s1 s2; s3 s3] (LoRWeB's layout), target
    [s1 s2; s3 s4] with s4 an unrelated world image: keep three panels, draw a new picture in the fourth."""
    reference = index.clone()
    reference[:, 3] = index[:, 2]
    return grid_tokens(panel_latents, index), grid_tokens(panel_latents, reference)


def pretrain(transformer, panel_latents: torch.Tensor, conditioning: dict[str, tuple], cfg: dict,
             seed: int) -> list[float]:
    """Copy (neutral prompt) and completion (its own prompt) on random grids of the panel pool; ``conditioning``:
    prompt name -> (T5 tokens, pooled)."""
    gen = torch.Generator().manual_seed(seed)
    side = 2 * panel_latents.shape[-1]

    def draw(count: int) -> torch.Tensor:
        return torch.randint(len(panel_latents), (count, 4), generator=gen)

    def step_loss(step: int) -> torch.Tensor:
        copy_x0 = grid_tokens(panel_latents, draw(cfg["batch_copy"]))
        loss = pretrain_loss(transformer, copy_x0, copy_x0, *conditioning["neutral"], gen, side)
        target, reference = completion_grids(panel_latents, draw(cfg["batch_complete"]))
        return loss + cfg["complete_weight"] * pretrain_loss(transformer, target, reference,
                                                             *conditioning["complete"], gen, side)

    return pretrain_loop(transformer, cfg, "flux_kontext", step_loss, log)


def build(ctx) -> dict:
    """World model ``flux_kontext``: text encoders, neutral conditioning, the pretrained transformer."""
    cfg, folder = ctx.config, ctx.folder
    clip, t5 = text_encoders(ctx.seed + 11)
    clip.save_pretrained(folder / "text_encoder")
    t5.save_pretrained(folder / "text_encoder_2")
    (folder / TOKENIZER_FILE).write_text(json.dumps({"vocab_size": TEXT_VOCAB, "length": TEXT_TOKENS}))
    tokenizer = HashTokenizer(TEXT_VOCAB, TEXT_TOKENS)
    conditioning = {}
    with torch.no_grad():
        for name, prompt in (("neutral", NEUTRAL_PROMPT), ("complete", COMPLETE_PROMPT)):
            ids = tokenizer([prompt])
            conditioning[name] = (t5(ids)[0], clip(ids).pooler_output)
    text, pooled = conditioning["neutral"]
    save_file({"context": text.contiguous(), "pooled": pooled.contiguous()}, folder / CONDITIONING_FILE,
              metadata={"prompt": NEUTRAL_PROMPT})

    torch.manual_seed(ctx.seed + 12)
    transformer = FluxTransformer2DModel(**transformer_config(cfg))
    codec = load_world_autoencoder(ctx.dependency("autoencoder"))
    latents = codec.model_latents(panel_pool(cfg["pool"], cfg["panel"]))
    losses = pretrain(transformer, latents, conditioning, cfg, ctx.seed + 13)
    return save_and_measure(ctx, transformer, losses, copy_error)


def save_and_measure(ctx, transformer, losses: list[float], copy_error: Callable[..., dict]) -> dict:
    """The end of a FLUX-like world build: save the transformer, load the world backbone back the way the trainers
    do, and return the pretraining figures with ``copy_error(backbone, panel, count=, steps=, seed=)``."""
    cfg = ctx.config
    transformer.save_pretrained(ctx.folder / "transformer")
    backbone = world_backbone(ctx.folder, ctx.dependency("autoencoder"))
    return {**training_metrics(transformer, losses),
            **copy_error(backbone, cfg["panel"], count=cfg["eval_grids"], steps=cfg["eval_steps"], seed=ctx.seed)}
