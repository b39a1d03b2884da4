"""Train a LoRWeB LoRA basis on FLUX.1-Kontext, FLUX.2 or Qwen-Image-Edit with Accelerate.

    python -m training.train_lorweb --preset tiny                    # CPU smoke run, about a minute
    python -m training.train_lorweb --preset tiny --backbone flux2:tiny            # the same on a tiny FLUX.2
    python -m training.train_lorweb --preset flux2_klein_24gb --backbone flux2:/models/FLUX.2-klein-4B
    python -m training.train_lorweb --config my.yaml --set max_steps=2000
    accelerate launch -m training.train_lorweb --config my.yaml      # several GPUs / machines
    python -m training.train_lorweb --config my.yaml --resume        # continue from the newest intact checkpoint

Per step: target grid [a a'; b b'] and reference grid [a a'; b b] are VAE-encoded; the whole target is noised with
one timestep per sample (flow matching, x_t = (1-t)·x0 + t·noise); the reference tokens are appended as clean
context the way the backbone takes a reference image (Kontext: position index 1; FLUX.2: a reference image with its
own position ids; Qwen-Image-Edit: an input image, see :mod:`training.editors`); the transformer, whose targeted linears carry the LoRWeB basis mixed by the CLIP query of
(a, a', b), predicts noise - x0 on the target tokens (MSE over all four quadrants, weighted per timestep as the
official code does). Only the basis, keys and query projections train. Outputs in ``output_dir``:
``lorweb_basis.safetensors`` (the file Load LoRA Basis reads), ``checkpoints/step_N`` (for --resume),
``samples/step_N.png``, ``logs/`` (TensorBoard).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from analogy_core import __version__
from analogy_core.encoders import ImageEncoder
from analogy_core.fingerprint import fingerprint_metadata
from analogy_core.lorweb.layer import blank_query, export_basis, inject_lorweb, lorweb_layers, reads_query, set_query
from analogy_core.lorweb.settings import LoRWeBSettings
from training import flow
from training.backbone import Backbone, load_query_encoder, token_ids
from training.config import without_local_path
from training.editors import EditorBackbone, backbone_family, editor_scheme, load_frozen_any
from training.lorweb.config import PRESETS, LoRWeBConfig
from training.lorweb.data import make_dataset
from training.trainer import (TrainingTask, drop_captions, export_weights, run, sample_pairs_image, save_sample_image,
                              train_every_weight)

BASIS_FILE = "lorweb_basis.safetensors"
TRANSFORMER_FILE = "lorweb_transformer.safetensors"  # written instead of the basis with full_finetune


# ---------------------------------------------------------------------------------------------------------------------
# maths of one step (plain functions of their inputs, so tests can check each against a re-computation)


def grids(batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Target [a a'; b b'] and Kontext reference [a a'; b b] as IMAGE tensors [B, 2S, 2S, 3]."""
    top = torch.cat([batch["a"], batch["a_prime"]], dim=2)
    target = torch.cat([top, torch.cat([batch["b"], batch["b_prime"]], dim=2)], dim=1)
    reference = torch.cat([top, torch.cat([batch["b"], batch["b"]], dim=2)], dim=1)
    return target, reference


def reverse_analogies(batch: dict, generator: torch.Generator, probability: float = 0.5) -> dict:
    """Bidirectional-analogy augmentation (official ``is_bidirectional_analogy``): each sample becomes
    (a', a, b', b) with ``probability``; the caption is kept, as in the official data loader. The option as described,
    not bit for bit: the official loader (NVlabs/LoRWeB ``toolkit/dataloader_mixins.py``, read at 54d8e27) swaps the
    reference grid's top panels (already [a' a]) by tuple assignment of two tensor views, which leaves a in both, so its
    reference is [a a; b' b'] and its query (e_a, e_a, e_b'); here both grids and the query are truly reversed."""
    flip = torch.rand(len(batch["a"]), generator=generator) < probability
    if not flip.any():
        return batch
    out = dict(batch)
    view = flip.view(-1, 1, 1, 1)
    for first, second in (("a", "a_prime"), ("b", "b_prime")):
        out[first] = torch.where(view, batch[second], batch[first])
        out[second] = torch.where(view, batch[first], batch[second])
    return out


def position_ids(backbone: Backbone, grid_size: int, text_tokens: int, device):
    latent = grid_size // backbone.vae_factor
    img_ids = torch.cat([token_ids(latent, latent, 0), token_ids(latent, latent, 1)]).to(device)
    return img_ids, torch.zeros(text_tokens, 3, device=device)


def predict(transformer, ids, x_t, reference, t, text, pooled, guidance):
    """Transformer velocity for the target tokens, with the reference tokens appended as clean context."""
    img_ids, txt_ids = ids
    tokens = x_t.shape[1]
    out = transformer(hidden_states=torch.cat([x_t, reference], dim=1), encoder_hidden_states=text,
                      pooled_projections=pooled, timestep=t, img_ids=img_ids, txt_ids=txt_ids,
                      guidance=guidance, return_dict=False)[0]
    return out[:, :tokens]


def encode_text(backbone, prompts: list[str], reference: torch.Tensor, device):
    """(text tokens, pooled CLIP for FLUX.1 / attention mask or None for the new editors). Qwen-Image-Edit reads the
    reference grid with the prompt, as its pipeline does."""
    if isinstance(backbone, EditorBackbone):
        return backbone.encode_prompts(prompts, device, reference)
    return backbone.encode_prompts(prompts, device)


def velocity(transformer, backbone, grid_size: int, x_t, reference, t, text, extra, guidance) -> torch.Tensor:
    """The transformer's velocity for the target tokens, the reference given as the backbone takes it."""
    if isinstance(backbone, EditorBackbone):
        return backbone.predict(transformer, x_t, reference, t, text, extra, guidance, grid_size)
    return predict(transformer, position_ids(backbone, grid_size, text.shape[1], x_t.device), x_t, reference, t, text,
                   extra, guidance)


def mixing_settings(cfg: LoRWeBConfig, query_encoder: ImageEncoder) -> LoRWeBSettings:
    """How the basis is mixed (heads, softmax/tanh, mean/sum, query mode), bound to the query encoder; recorded in
    the basis file so inference mixes it the same way."""
    info = query_encoder.info
    return LoRWeBSettings(lora_heads=cfg.lora_heads, lora_softmax=cfg.lora_softmax,
                          mixing_coeffs_type=cfg.mixing_coeffs_type, query_mode=cfg.query_mode,
                          external_query_model=without_local_path(cfg.query_encoder), encoder_family=info.family,
                          encoder_name=info.name, encoder_embed_dim=info.embed_dim, source="trainer")


def analogy_query(query_encoder: ImageEncoder, batch: dict, settings: LoRWeBSettings) -> torch.Tensor:
    """The query of each sample for the configured query mode (official: cat(e_a, e_a', e_b))."""
    embedding = query_encoder.encode(batch["a"], batch["a_prime"], batch["b"])
    return settings.query(embedding)


def training_loss(transformer, backbone: Backbone, query_encoder: ImageEncoder, batch: dict, cfg: LoRWeBConfig,
                  generator: torch.Generator, device) -> torch.Tensor:
    """One micro-batch of the LoRWeB objective. Random draws, in order: analogy reversal (if enabled), caption
    dropout, timesteps, noise."""
    if cfg.bidirectional_analogy:
        batch = reverse_analogies(batch, generator)
    target, reference = grids(batch)
    x0 = backbone.encode_images(target).to(device)
    ref_tokens = backbone.encode_images(reference).to(device)
    text, extra = encode_text(backbone, drop_captions(batch["prompt"], cfg.caption_dropout, generator), reference,
                              device)
    b = x0.shape[0]
    if reads_query(transformer):
        query = analogy_query(query_encoder, batch, mixing_settings(cfg, query_encoder)).to(device)
    else:  # a one-entry basis or a full fine-tune: every query mixes alike, so the encoder is not run (bench.ceiling_step)
        query = blank_query(transformer, b, device)
    t, weight = flow.sample_timesteps(cfg.timestep_sampling, b, generator)
    noise = torch.randn(x0.shape, generator=generator).to(device, x0.dtype)
    t, weight = t.to(device), weight.to(device)
    x_t = flow.add_noise(x0, noise, t)
    guidance = torch.full((b,), cfg.guidance, device=device)
    set_query(transformer, query)
    pred = velocity(transformer, backbone, cfg.grid_resolution, x_t, ref_tokens, t, text, extra, guidance)
    return flow.weighted_mse(pred, flow.velocity_target(x0, noise), weight)


@torch.no_grad()
def sample_grid(transformer, backbone: Backbone, query_encoder: ImageEncoder, batch: dict, cfg: LoRWeBConfig,
                device, seed: int | None = None) -> torch.Tensor:
    """Euler flow sampling of the target grid from noise; returns [B, 2S, 2S, 3] (bottom-right = predicted b')."""
    _, reference = grids(batch)
    ref_tokens = backbone.encode_images(reference).to(device)
    text, extra = encode_text(backbone, list(batch["prompt"]), reference, device)
    set_query(transformer, analogy_query(query_encoder, batch, mixing_settings(cfg, query_encoder)).to(device))
    gen = torch.Generator().manual_seed(cfg.seed if seed is None else seed)
    noise = torch.randn(ref_tokens.shape, generator=gen).to(device, ref_tokens.dtype)
    guidance = torch.full((noise.shape[0],), cfg.guidance, device=device)

    def step_velocity(x, t):
        return velocity(transformer, backbone, cfg.grid_resolution, x, ref_tokens, t, text, extra, guidance)

    tokens = flow.euler_sample(step_velocity, noise, cfg.sample_steps)
    return backbone.decode_tokens(tokens, cfg.grid_resolution, cfg.grid_resolution)


# ---------------------------------------------------------------------------------------------------------------------
# the task


def shareable_config(cfg: LoRWeBConfig) -> dict:
    """The run's config for the basis header, without this machine's paths (only file/folder names are kept)."""
    values = cfg.to_dict()
    values.pop("output_dir", None)
    for key in ("backbone", "query_encoder", "data"):
        values[key] = without_local_path(str(values[key]))
    return values


def basis_metadata(cfg: LoRWeBConfig, step: int, query_encoder: ImageEncoder) -> dict[str, str]:
    settings = mixing_settings(cfg, query_encoder)
    return {"analogy.backbone": without_local_path(cfg.backbone), "analogy.family": backbone_family(cfg.backbone),
            "analogy.backbone_family": editor_scheme(cfg.backbone) or "flux_kontext", "analogy.targets": json.dumps(cfg.targets),
            "analogy.encoder": query_encoder.info.name, "analogy.query": settings.query_mode,
            "analogy.step": str(step), "analogy.pack_version": __version__,
            "analogy.config": json.dumps(shareable_config(cfg)), **settings.to_metadata(),
            **fingerprint_metadata(query_encoder.fingerprint())}


class LoRWeBTask(TrainingTask):
    name = "lorweb"
    artifact = BASIS_FILE
    mode_artifacts = {"full_finetune": TRANSFORMER_FILE}
    config_cls = LoRWeBConfig
    presets = PRESETS
    description = __doc__

    def build(self) -> nn.Module:
        cfg = self.cfg
        self.backbone = load_frozen_any(cfg.backbone, cfg.mixed_precision, cfg.seed, self.device)
        self.query_encoder = load_query_encoder(cfg.query_encoder, cfg.seed).to(self.device)
        transformer = self.backbone.transformer
        settings = mixing_settings(cfg, self.query_encoder)
        if cfg.full_finetune:  # no basis: the queries reach no layer (set_query finds none)
            train_every_weight(transformer)
        else:
            inject_lorweb(transformer, cfg.targets, num_entries=cfg.num_entries, rank=cfg.rank, key_dim=cfg.key_dim,
                          query_dim=settings.query_width(self.query_encoder.embed_dim), settings=settings)
        transformer.to(self.device)
        if cfg.gradient_checkpointing:
            transformer.enable_gradient_checkpointing()
        return transformer

    def dataset(self):
        cfg = self.cfg
        return make_dataset(cfg.data, cfg.panel_resolution, cfg.panel_fit, cfg.caption_source)

    def loss(self, model, batch, generator):
        return training_loss(model, self.backbone, self.query_encoder, batch, self.cfg, generator, self.device)

    def export(self, model, path: Path, step: int) -> None:
        metadata = basis_metadata(self.cfg, step, self.query_encoder)
        if self.cfg.full_finetune:
            export_weights(model, path, {**metadata, "analogy.kind": "lorweb_transformer"})
            return
        export_basis(model, family=backbone_family(self.cfg.backbone), metadata=metadata).save(path)

    def summary(self, model) -> str:
        cfg = self.cfg
        count = sum(p.numel() for p in model.parameters() if p.requires_grad)
        if cfg.full_finetune:
            return f"LoRWeB objective, full fine-tune of the transformer: {count / 1e6:.2f}M trainable parameters"
        return (f"LoRWeB basis on {len(lorweb_layers(model))} layers, N={cfg.num_entries} r={cfg.rank} "
                f"d={cfg.key_dim}, {count / 1e6:.2f}M trainable parameters")

    def write_samples(self, model, batch, step: int, folder: Path) -> None:
        generated = sample_grid(model, self.backbone, self.query_encoder, batch, self.cfg, self.device).cpu()
        target, _ = grids(batch)
        # one row per sample: the true grid [a a'; b b'] next to the generated one (bottom-right = predicted b')
        save_sample_image(sample_pairs_image(target, generated), folder, step)


def main(argv=None) -> dict:
    return run(LoRWeBTask, argv)

