"""The world's FLUX.1-Kontext-like backbone: a tiny diffusers ``FluxTransformer2DModel`` that can draw and copy the
world, pretrained from scratch, and knowing no edit.

Pretraining, on four-panel grids of independent world images (the grid size LoRWeB trains on), with the flow
matching of :mod:`training.flow` (x_t = (1 - t)·x0 + t·ε, target ε - x0):

* **copy** (Kontext): the clean grid is appended as the reference image (position index 1, as Kontext marks
  reference latents) and the model denoises the same grid: B′ = B everywhere. This is what LoRWeB's reference grid
  [a a′; b b] asks of the base in three quadrants, and the base answer in the fourth;
* **generate**: no reference, the model denoises a grid of world images from noise (the world's prior, so that the
  model can draw colours and shapes it is not shown in the reference).

The grids' images come from :func:`analogy_core.world.world_image` (plain scenes and global restyles, never an edit
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
from pathlib import Path

import torch
import torch.nn.functional as F

from analogy_core import world
from training import flow
from training.world.schedule import warmup_cosine

log = logging.getLogger(__name__)
HEAD_DIM = 32
AXES = (8, 12, 12)         # rope axes (index, row, column); sums to HEAD_DIM
TEXT_WIDTH = 32            # T5 token width = joint_attention_dim; pooled CLIP width
TEXT_TOKENS = 8            # word-hash tokenizer length
TEXT_VOCAB = 1000
NEUTRAL_PROMPT = ""
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
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

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


def panel_pool(count: int, size: int, split: str = "train", offset: int = 0) -> torch.Tensor:
    """``count`` world images [N, size, size, 3] (plain scenes and global restyles)."""
    return torch.stack([world.world_image(split, offset + i, size)[0] for i in range(count)])


def grid_images(panels: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """[B, 4] panel indices -> IMAGE grids [B, 2S, 2S, 3] (row-major: top-left, top-right, bottom-left, right)."""
    p = panels[index]
    top = torch.cat([p[:, 0], p[:, 1]], dim=2)
    return torch.cat([top, torch.cat([p[:, 2], p[:, 3]], dim=2)], dim=1)


def grid_tokens(panel_latents: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Model-space panel latents [N, C, h, w] -> packed grid tokens [B, (h)(w), 4C] of the 2 x 2 grids ``index``.
    Equal to encoding the grid image (the world encoder never mixes latent cells; tested)."""
    from training.backbone import pack

    p = panel_latents[index]
    top = torch.cat([p[:, 0], p[:, 1]], dim=3)
    return pack(torch.cat([top, torch.cat([p[:, 2], p[:, 3]], dim=3)], dim=2))


# ---------------------------------------------------------------------------------------------------------------------
# pretraining


def velocity(transformer, x_t, reference, t, text, pooled, guidance, latent_side: int):
    """The transformer's velocity for the target tokens (reference tokens, if any, appended as Kontext context)."""
    from training.backbone import token_ids

    ids = token_ids(latent_side, latent_side, 0)
    hidden = x_t
    if reference is not None:
        ids = torch.cat([ids, token_ids(latent_side, latent_side, 1)])
        hidden = torch.cat([x_t, reference], dim=1)
    out = transformer(hidden_states=hidden, encoder_hidden_states=text.expand(len(x_t), -1, -1),
                      pooled_projections=pooled.expand(len(x_t), -1), timestep=t, img_ids=ids,
                      txt_ids=torch.zeros(text.shape[1], 3), guidance=guidance, return_dict=False)[0]
    return out[:, : x_t.shape[1]]


def pretrain_loss(transformer, x0: torch.Tensor, copy: bool, text, pooled, gen: torch.Generator,
                  latent_side: int) -> torch.Tensor:
    t, _ = flow.sample_timesteps("logit_normal", len(x0), gen)
    noise = torch.randn(x0.shape, generator=gen)
    guidance = 1.0 + 3.0 * torch.rand(len(x0), generator=gen)
    pred = velocity(transformer, flow.add_noise(x0, noise, t), x0 if copy else None, t, text, pooled, guidance,
                    latent_side)
    return F.mse_loss(pred, flow.velocity_target(x0, noise))


def pretrain(transformer, panel_latents: torch.Tensor, text, pooled, cfg: dict, seed: int) -> list[float]:
    """Copy and generation objectives on random grids of the panel pool (see the module docstring). Generation joins
    after ``generate_from`` of the steps: mixed in from the start it slows the forming of the copy circuit (measured:
    copy error 0.135 after 600 steps with both objectives from the start, 0.024 with copying alone)."""
    gen = torch.Generator().manual_seed(seed)
    side = 2 * panel_latents.shape[-1]
    optimiser = torch.optim.AdamW(transformer.parameters(), lr=cfg["lr"], weight_decay=0.0)
    schedule = warmup_cosine(optimiser, cfg["steps"])
    transformer.train()
    losses = []
    for step in range(cfg["steps"]):
        copy_x0 = grid_tokens(panel_latents, torch.randint(len(panel_latents), (cfg["batch_copy"], 4), generator=gen))
        loss = pretrain_loss(transformer, copy_x0, True, text, pooled, gen, side)
        if cfg["batch_generate"] and step >= cfg["generate_from"] * cfg["steps"]:
            gen_x0 = grid_tokens(panel_latents,
                                 torch.randint(len(panel_latents), (cfg["batch_generate"], 4), generator=gen))
            loss = loss + cfg["generate_weight"] * pretrain_loss(transformer, gen_x0, False, text, pooled, gen, side)
        optimiser.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(transformer.parameters(), 1.0)
        optimiser.step()
        schedule.step()
        losses.append(loss.item())
        if step % 100 == 0 or step == cfg["steps"] - 1:
            log.info("flux_kontext step %d/%d loss %.4f", step + 1, cfg["steps"], loss.item())
    transformer.eval()
    return losses


def build(ctx) -> dict:
    """World model ``flux_kontext``: text encoders, neutral conditioning, the pretrained transformer."""
    from diffusers import FluxTransformer2DModel
    from safetensors.torch import save_file

    from training.backbone import HashTokenizer, world_backbone
    from training.world.evaluate import copy_error

    cfg, folder = ctx.config, ctx.folder
    clip, t5 = text_encoders(ctx.seed + 11)
    clip.save_pretrained(folder / "text_encoder")
    t5.save_pretrained(folder / "text_encoder_2")
    (folder / TOKENIZER_FILE).write_text(json.dumps({"vocab_size": TEXT_VOCAB, "length": TEXT_TOKENS}))
    tokenizer = HashTokenizer(TEXT_VOCAB, TEXT_TOKENS)
    with torch.no_grad():
        ids = tokenizer([NEUTRAL_PROMPT])
        pooled, text = clip(ids).pooler_output, t5(ids)[0]
    save_file({"context": text.contiguous(), "pooled": pooled.contiguous()}, folder / CONDITIONING_FILE,
              metadata={"prompt": NEUTRAL_PROMPT})

    torch.manual_seed(ctx.seed + 12)
    transformer = FluxTransformer2DModel(**transformer_config(cfg))
    from training.world.autoencoder import load_world_autoencoder

    codec = load_world_autoencoder(ctx.dependency("autoencoder"))
    panels = panel_pool(cfg["pool"], cfg["panel"])
    latents = codec.model_latents(panels)
    losses = pretrain(transformer, latents, text, pooled, cfg, ctx.seed + 13)
    transformer.save_pretrained(folder / "transformer")
    backbone = world_backbone(folder, ctx.dependency("autoencoder"))
    metrics = {"loss_start": sum(losses[:20]) / 20, "loss_end": sum(losses[-20:]) / 20,
               "parameters_millions": round(sum(p.numel() for p in transformer.parameters()) / 1e6, 3)}
    metrics.update(copy_error(backbone, cfg["panel"], count=cfg["eval_grids"], steps=cfg["eval_steps"],
                              seed=ctx.seed))
    return metrics
