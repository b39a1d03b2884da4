"""Train an Edit Transfer LoRA on FLUX.1-dev (or FLUX.2) with Accelerate (Chen et al., 2025, "Edit Transfer").

    python -m training.train_edit_transfer --preset tiny                     # CPU smoke run, under a minute
    python -m training.train_edit_transfer --preset tiny --backbone flux2:tiny   # the same on a tiny FLUX.2
    python -m training.train_edit_transfer --set data=folder:data/edit_transfer   # the official recipe
    python -m training.train_edit_transfer --set text_free=true ...          # EditTransfer++: no text while training
    accelerate launch -m training.train_edit_transfer --config my.yaml       # several GPUs
    python -m training.train_edit_transfer --config my.yaml --resume         # continue from the newest checkpoint

Per step: the four-panel composite [A A'; B B'] is VAE-encoded; only the bottom-right panel is noised, one t per
sample, x_t = ((1 - t) x + t ε)·m + x·(1 - m); the frozen FLUX.1-dev transformer with one ordinary LoRA (peft, on
every linear layer of its double and single blocks, like the released file) predicts the velocity ε - x, and the MSE
is taken on the bottom-right panel only. Official recipe (paper §4.1 and the released config/edit_transfer.yml): rank
16, alpha 16, lr 1e-4, batch 4, 6,000 steps, 1024-px composites of 512-px panels, caption dropout 0.05, timesteps
t = sigmoid(n), n ~ N(0, 1) (ai-toolkit's default "sigmoid" timestep type), guidance embedding 1.0, bf16, gradient
checkpointing, grad-norm clip 1.0; the released config's optimiser (8-bit AdamW, eps 1e-6, weight decay 0.01; torch
AdamW where bitsandbytes or CUDA is missing) and EMA of the LoRA weights (decay 0.99, :mod:`training.ema`): the
exported file holds the EMA weights, checkpoints hold both, ``--resume`` restores both. T5 prompts are padded to 256
tokens as ComfyUI feeds FLUX (``t5_length``; the official training pads to 512).

``text_free`` is EditTransfer++'s text-decoupled stage only (same authors, 2026): no text during fine-tuning — every
prompt is empty — so the LoRA must read the transformation from the image pair; at inference a prompt may still be
given. EditTransfer++'s best-worst contrastive refinement and condition compression are not implemented.

On FLUX.2 (``backbone: flux2:<folder>``, :mod:`training.editors`) the composite is the one image the transformer
denoises (position ids T = 0, no reference image), with the same objective; the LoRA covers every linear of FLUX.2's
blocks and is saved under the BFL names ComfyUI's stock loader maps (Save LoRA's ``auto`` for FLUX.2).

Outputs in ``output_dir``: ``edit_transfer_lora.safetensors`` (an ordinary LoRA: PEFT keys
``transformer.<path>.lora_A/B.weight`` with the peft config in the header, which ComfyUI's LoraLoader, diffusers and
the pack's Load LoRA read identically), ``checkpoints/step_N`` (for --resume), ``samples/step_N.png`` (true grid next
to the sampled one), ``logs/`` (TensorBoard).
"""

from __future__ import annotations

import json
from contextlib import nullcontext
from pathlib import Path

import torch
from peft import LoraConfig
from peft.tuners.lora import LoraLayer
from torch import nn

from analogy_core import __version__
from analogy_core.edit_transfer import BLOCK_PREFIXES
from analogy_core.lora import LoRA, LoRALayer
from analogy_core.lora_io import save_lora_file
from training import checkpoints as ckpt
from training import flow
from training.backbone import Backbone, token_ids
from training.config import without_local_path
from training.edit_transfer.config import CONTEXTS, LORA_FILE, PRESETS, TRANSFORMER_FILE, EditTransferConfig
from training.edit_transfer.data import make_edit_transfer_dataset
from training.editors import EditorBackbone, backbone_family, load_frozen_any
from training.ema import PREFIX as EMA_PREFIX
from training.ema import ParameterEMA
from training.trainer import (TrainingTask, drop_captions, export_weights, run, sample_pairs_image, save_sample_image,
                              train_every_weight)

# ---------------------------------------------------------------------------------------------------------------------
# the LoRA (peft on the frozen transformer)


def lora_targets(transformer: nn.Module) -> list[str]:
    """Every linear layer of the double and single blocks (494 in FLUX.1-dev): the released LoRA's layers (also
    after peft wrapped them: a wrapped layer counts once, its ``lora_A``/``lora_B`` not at all)."""
    names = []
    for name, module in transformer.named_modules():
        if isinstance(module, nn.Linear) and name.startswith(BLOCK_PREFIXES) and ".lora_" not in name:
            names.append(name.removesuffix(".base_layer"))
    return names


def add_lora(transformer: nn.Module, rank: int, alpha: float, trainable_dtype: torch.dtype = torch.float32) -> None:
    """One ordinary peft LoRA (A: kaiming-uniform, B: zeros, scale alpha/rank) on :func:`lora_targets`; only its
    factors train (kept in ``trainable_dtype``, float32, under bf16 autocast)."""
    transformer.requires_grad_(False)
    transformer.add_adapter(LoraConfig(r=rank, lora_alpha=alpha, target_modules=lora_targets(transformer),
                                       init_lora_weights=True))
    for name, param in transformer.named_parameters():
        param.requires_grad_(".lora_A." in name or ".lora_B." in name)
        if param.requires_grad:
            param.data = param.data.to(trainable_dtype)


def export_lora(transformer: nn.Module, metadata: dict[str, str] | None = None, family: str = "flux") -> LoRA:
    """The trained adapter as the pack's LoRA (diffusers paths, scale alpha/rank) for ``family``."""
    layers = {}
    for name, module in transformer.named_modules():
        if isinstance(module, LoraLayer) and "default" in module.lora_A:
            layers[name] = LoRALayer(module.lora_A["default"].weight.detach().float().cpu().clone(),
                                     module.lora_B["default"].weight.detach().float().cpu().clone(),
                                     float(module.scaling["default"]))
    if not layers:
        raise RuntimeError("the transformer carries no LoRA adapter")
    return LoRA(layers, family=family, source="trained", metadata=dict(metadata or {}))


# ---------------------------------------------------------------------------------------------------------------------
# maths of one step (plain functions of their inputs, so tests can check each against a re-computation)


def four_panels(batch: dict, bottom_right: str = "b_prime", fill: float = 0.5) -> torch.Tensor:
    """The composite [A A'; B X] as IMAGE [B, 2S, 2S, 3]; X is B' (training) or the grey ``fill`` panel that Four-Panel
    Composite's edit_transfer layout puts there (inference)."""
    corner = batch["b_prime"] if bottom_right == "b_prime" else torch.full_like(batch["b"], fill)
    top = torch.cat([batch["a"], batch["a_prime"]], dim=2)
    return torch.cat([top, torch.cat([batch["b"], corner], dim=2)], dim=1)


def panel_token_mask(latent_side: int) -> torch.Tensor:
    """[1, N, 1] mask of the packed latent tokens of a square composite: 1 on the bottom-right panel."""
    side = latent_side // 2  # tokens per side (FLUX packs 2x2 latent pixels)
    rows = torch.arange(side).view(-1, 1).expand(side, side)
    cols = torch.arange(side).view(1, -1).expand(side, side)
    return ((rows >= side // 2) & (cols >= side // 2)).float().reshape(1, side * side, 1)


def training_prompts(batch: dict, cfg: EditTransferConfig, generator: torch.Generator) -> list[str]:
    """Empty prompts when text-free (no random draw); else captions dropped with probability caption_dropout."""
    if cfg.text_free:
        return [""] * len(batch["prompt"])
    return drop_captions(list(batch["prompt"]), cfg.caption_dropout, generator)


def predict(transformer, x_t, t, text, pooled, guidance: float | torch.Tensor) -> torch.Tensor:
    """FLUX.1-dev's velocity for the composite tokens (position ids: one image, index 0); ``guidance`` one value or
    one per sample."""
    b, tokens = x_t.shape[:2]
    side = int(round(tokens ** 0.5))
    img_ids = token_ids(2 * side, 2 * side, 0).to(x_t.device)
    txt_ids = torch.zeros(text.shape[1], 3, device=x_t.device)
    guidance = guidance.to(x_t.device) if torch.is_tensor(guidance) else torch.full((b,), guidance, device=x_t.device)
    return transformer(hidden_states=x_t, encoder_hidden_states=text, pooled_projections=pooled, timestep=t,
                       img_ids=img_ids, txt_ids=txt_ids, guidance=guidance, return_dict=False)[0]


def model_velocity(transformer, backbone, text, extra, guidance: float, grid_size: int):
    """(x_t, t) -> the transformer's velocity for the composite tokens: FLUX.1 through :func:`predict`, FLUX.2 as
    its pipeline denoises one image (``extra``: FLUX.1's pooled CLIP, the new editors' attention mask or None)."""
    if isinstance(backbone, EditorBackbone):
        def velocity(x_t, t):
            per_sample = torch.full((x_t.shape[0],), guidance, device=x_t.device)
            return backbone.predict(transformer, x_t, None, t, text, extra, per_sample, grid_size)
        return velocity
    return lambda x_t, t: predict(transformer, x_t, t, text, extra, guidance)


def encode_prompts(backbone, prompts: list[str], cfg: EditTransferConfig, device):
    """(text tokens, pooled CLIP or the new editors' mask); FLUX.1's T5 padded to ``t5_length``."""
    if isinstance(backbone, EditorBackbone):
        return backbone.encode_prompts(prompts, device)
    return backbone.encode_prompts(prompts, device, cfg.t5_length)


def panel_loss(velocity, x0, noise, t, weight, mask) -> torch.Tensor:
    """Noise on the panel only, velocity MSE on the panel only."""
    x_t = flow.add_noise_masked(x0, noise, t, mask)
    return flow.weighted_mse(velocity(x_t, t), flow.velocity_target(x0, noise), weight, mask)


def panel_objective(transformer, x0, noise, t, weight, mask, text, pooled, guidance: float) -> torch.Tensor:
    """:func:`panel_loss` with FLUX.1's :func:`predict`."""
    return panel_loss(lambda x_t, t_: predict(transformer, x_t, t_, text, pooled, guidance), x0, noise, t, weight,
                      mask)


def training_loss(transformer, backbone: Backbone, batch: dict, cfg: EditTransferConfig, generator: torch.Generator,
                  device) -> torch.Tensor:
    """One micro-batch of the Edit Transfer objective. Random draws, in order: caption dropout (unless text-free),
    timesteps, noise."""
    x0 = backbone.encode_images(four_panels(batch)).to(device)
    text, extra = encode_prompts(backbone, training_prompts(batch, cfg, generator), cfg, device)
    t, weight = flow.sample_timesteps(cfg.timestep_sampling, x0.shape[0], generator)
    noise = torch.randn(x0.shape, generator=generator).to(device, x0.dtype)
    mask = panel_token_mask(cfg.grid_resolution // backbone.vae_factor).to(device)
    velocity = model_velocity(transformer, backbone, text, extra, cfg.guidance, cfg.grid_resolution)
    return panel_loss(velocity, x0, noise, t.to(device), weight.to(device), mask)


@torch.no_grad()
def sample_composite(transformer, backbone: Backbone, batch: dict, cfg: EditTransferConfig, device,
                     seed: int | None = None, context: str = "clean", prompts: list[str] | None = None,
                     steps: int | None = None) -> torch.Tensor:
    """Complete [A A'; B grey] by Euler flow sampling of the bottom-right panel; returns IMAGE [B, 2S, 2S, 3].

    ``context="clean"``: the official sampler — the other panels start as the clean latents and are reset to them
    after every step. ``"renoise"``: ComfyUI's stock inpainting — they are re-noised to the next step's level with
    the same noise (x = (1 - t) x_clean + t ε), so the model sees a noisy context. ``prompts`` default to the batch's
    (empty when the config is text-free)."""
    if context not in CONTEXTS:
        raise ValueError(f"context must be one of {CONTEXTS}, got {context!r}")
    clean = backbone.encode_images(four_panels(batch, bottom_right="grey")).to(device)
    if prompts is None:
        prompts = [""] * len(batch["prompt"]) if cfg.text_free else list(batch["prompt"])
    text, extra = encode_prompts(backbone, prompts, cfg, device)
    gen = torch.Generator().manual_seed(cfg.seed if seed is None else seed)
    noise = torch.randn(clean.shape, generator=gen).to(device, clean.dtype)
    mask = panel_token_mask(cfg.grid_resolution // backbone.vae_factor).to(device, clean.dtype)
    steps = steps or cfg.sample_steps
    times = flow.shifted_times(steps, flow.flux_mu(clean.shape[1])) if cfg.sample_shift else None

    velocity = model_velocity(transformer, backbone, text, extra, cfg.guidance, cfg.grid_resolution)

    def after_step(x, t_next):
        context_now = clean if context == "clean" else (1 - t_next) * clean + t_next * noise
        return x * mask + context_now * (1 - mask)

    start = noise * mask + clean * (1 - mask) if context == "clean" else noise
    tokens = flow.euler_sample(velocity, start, steps, after_step, times)
    return backbone.decode_tokens(tokens, cfg.grid_resolution, cfg.grid_resolution)


# ---------------------------------------------------------------------------------------------------------------------
# the task


def shareable_config(cfg: EditTransferConfig) -> dict:
    """The run's config for the LoRA header, without this machine's paths."""
    values = cfg.to_dict()
    values.pop("output_dir", None)
    for key in ("backbone", "data"):
        values[key] = without_local_path(str(values[key]))
    return values


def lora_metadata(cfg: EditTransferConfig, step: int) -> dict[str, str]:
    return {"analogy.method": "edit_transfer", "analogy.backbone": without_local_path(cfg.backbone),
            "analogy.text_free": str(cfg.text_free).lower(), "analogy.step": str(step),
            "analogy.pack_version": __version__, "analogy.config": json.dumps(shareable_config(cfg)),
            "ss_base_model_version": {"flux2": "flux2"}.get(backbone_family(cfg.backbone), "flux1")}


class EditTransferTask(TrainingTask):
    name = "edit_transfer"
    artifact = LORA_FILE
    mode_artifacts = {"full_finetune": TRANSFORMER_FILE}
    config_cls = EditTransferConfig
    presets = PRESETS
    description = __doc__

    def build(self) -> nn.Module:
        cfg = self.cfg
        self.backbone = load_frozen_any(cfg.backbone, cfg.mixed_precision, cfg.seed, self.device)
        transformer = self.backbone.transformer
        if cfg.full_finetune:
            train_every_weight(transformer)
        else:
            add_lora(transformer, cfg.rank, cfg.lora_alpha)
        transformer.to(self.device)
        if cfg.gradient_checkpointing:
            transformer.enable_gradient_checkpointing()
        self.ema = ParameterEMA(transformer, cfg.ema_decay) if cfg.ema_decay > 0 else None
        return transformer

    def after_step(self, model) -> None:
        if self.ema is not None:
            self.ema.update(model)

    def trainable_state(self, model) -> dict[str, torch.Tensor]:
        state = super().trainable_state(model)
        return {**state, **self.ema.state_dict()} if self.ema is not None else state

    def load_trainable_state(self, model, tensors: dict[str, torch.Tensor]) -> None:
        raw = {k: v for k, v in tensors.items() if not k.startswith(EMA_PREFIX)}
        super().load_trainable_state(model, raw)
        if self.ema is not None:
            try:
                self.ema.load_state_dict(tensors)
            except ValueError as err:
                raise ckpt.CheckpointError(str(err)) from None

    def averaged(self, model):
        """The EMA weights in the model while exporting or sampling (the raw ones when there is no EMA)."""
        return self.ema.applied(model) if self.ema is not None else nullcontext()

    def dataset(self):
        return make_edit_transfer_dataset(self.cfg.data, self.cfg.panel_resolution, self.cfg.panel_fit)

    def loss(self, model, batch, generator):
        return training_loss(model, self.backbone, batch, self.cfg, generator, self.device)

    def export(self, model, path: Path, step: int) -> None:
        with self.averaged(model):
            if self.cfg.full_finetune:
                export_weights(model, path, {**lora_metadata(self.cfg, step),
                                             "analogy.kind": "edit_transfer_transformer"})
                return
            save_lora_file(export_lora(model, lora_metadata(self.cfg, step), backbone_family(self.cfg.backbone)),
                           path)

    def summary(self, model) -> str:
        count = sum(p.numel() for p in model.parameters() if p.requires_grad)
        text = "text-free" if self.cfg.text_free else "with text"
        if self.cfg.full_finetune:
            return f"Edit Transfer full fine-tune of the transformer, {text}: {count / 1e6:.2f}M trainable parameters"
        return (f"Edit Transfer LoRA on {len(lora_targets(model))} layers, rank {self.cfg.rank}, alpha "
                f"{self.cfg.lora_alpha:g}, {text}: {count / 1e6:.2f}M trainable parameters")

    def write_samples(self, model, batch, step: int, folder: Path) -> None:
        with self.averaged(model):
            generated = sample_composite(model, self.backbone, batch, self.cfg, self.device).float().cpu()
        save_sample_image(sample_pairs_image(four_panels(batch), generated), folder, step)


def main(argv=None) -> dict:
    return run(EditTransferTask, argv)

