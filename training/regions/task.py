"""Train the multi-scale learnable region predictor (Predict Edit Region's checkpoint) with Accelerate.

    python -m training.train_region --preset tiny                      # the analogy world on a CPU, a few minutes
    python -m training.train_region --preset paper --set data=jsonl:my/train.jsonl \\
        --set clip=/models/clip-vit-large-patch14 --set instruction_encoder=/models/flan-t5-base
                                                                       # the paper's form (text mode, eqs. 1-3)
    python -m training.train_region --preset pack ...                  # the pack's form (residual + positions)
    python -m training.train_region --set mode=analogy --set data=pairs:my/pairs.jsonl
    python -m training.train_region --preset tiny --resume             # continue from the newest intact checkpoint

Text mode (the paper, §3): CLIP patch features F_img of the image and T5 tokens of the instruction go through the
cross-attention, self-attention and token-wise MLP to P_region; the loss is α·L_semAlign + β·L_CLIP (eqs. 4-11) with
X_res = M ⊙ X_edit + (1 − M) ⊙ X, M the upsampled P_region, X_edit the frozen generator's edit supplied with the data.
CLIP and T5 stay frozen; only the region module and f_sem train. ``mask_weight`` > 0 adds a BCE against masks that
the data provides (beyond the paper). Analogy mode (beyond the paper): the condition is the exemplar pair (A, A′),
the region is predicted on a second pair's before-image and trained by BCE against that pair's difference.

Outputs in ``output_dir``: ``region_predictor.safetensors`` (the file Load Region Model reads; f_sem is left out),
``checkpoints/step_N`` (for --resume), ``samples/step_N.png``, ``logs/`` (TensorBoard).
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict
from pathlib import Path

import torch
from torch import nn

from analogy_core import __version__
from analogy_core.fingerprint import fingerprint_metadata
from analogy_core.regions import (
    FrozenClip,
    InstructionEncoder,
    LossWeights,
    RegionPredictor,
    RegionSpec,
    VisionFeatures,
    blend,
    straight_through,
    clip_loss,
    edit_mask,
    iou,
    patch_targets,
    probability_image,
    region_bce,
    save_region_predictor,
    sem_align_loss,
)
from training.regions.config import PRESETS, RegionConfig
from training.regions.data import make_region_dataset
from training.regions.models import load_clip, load_instruction_encoder
from training.trainer import TrainingTask, run, save_sample_image

ARTIFACT = "region_predictor.safetensors"


log = logging.getLogger(__name__)


def uses_text(cfg: RegionConfig) -> bool:
    return cfg.mode in ("text", "both")


def uses_analogy(cfg: RegionConfig) -> bool:
    return cfg.mode in ("analogy", "both")


def region_spec(cfg: RegionConfig, clip: FrozenClip, encoder: InstructionEncoder | None) -> RegionSpec:
    return RegionSpec(dim=clip.dim, grid=clip.grid, image_size=clip.image_size,
                      text_dim=encoder.width if encoder is not None else 0,
                      analogy_dim=clip.info.hidden_dim if uses_analogy(cfg) else 0, hidden=cfg.hidden,
                      residual=cfg.residual, positions=cfg.positions,
                      encoder=asdict(clip.info), instruction_encoder=encoder.name if encoder is not None else "")


def loss_weights(cfg: RegionConfig) -> LossWeights:
    return LossWeights(cfg.alpha, cfg.beta, cfg.lambda_g, cfg.lambda_d, cfg.lambda_s)


# ---------------------------------------------------------------------------------------------------------------------
# the objective (plain functions of their inputs, checked term by term in tests/test_region_training.py)


def text_loss(model, clip: FrozenClip, encoder: InstructionEncoder, batch: dict, cfg: RegionConfig,
              original: VisionFeatures | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """α·L_semAlign + β·L_CLIP (+ mask_weight·BCE on items with a mask) for one text-mode micro-batch;
    ``original`` = the CLIP features of ``batch["image"]`` when already computed."""
    device = clip.device
    x = batch["image"].to(device)
    if original is None:
        with torch.no_grad():
            original = clip.vision(x)                              # I_ori, F_img
    t_o, t_e = clip.text(batch["source_caption"]), clip.text(batch["target_caption"])
    tokens, token_mask = encoder.encode(batch["instruction"])
    out = model(original.patches, "text", tokens.to(device), token_mask.to(device), semantic=cfg.alpha > 0)
    parts: dict[str, torch.Tensor] = {}
    total = out.logits.new_zeros(())
    if cfg.alpha > 0:
        sem, sem_parts = sem_align_loss(out.sem_edited, out.sem_original, t_e, t_o)
        total = total + cfg.alpha * sem
        parts.update(sem_parts, sem_align=sem)
    if cfg.beta > 0:
        mask = probability_image(out.probs, clip.grid, x.shape[1], x.shape[2])
        if cfg.straight_through:
            mask = straight_through(mask, cfg.threshold)
        x_res = blend(mask, batch["edited"].to(device), x)
        result = clip.vision(x_res)                               # I_res, F_res: gradients reach the mask
        clip_total, clip_parts = clip_loss(loss_weights(cfg), result.embeds, original.embeds, original.patches,
                                           result.patches, t_e, t_o)
        total = total + cfg.beta * clip_total
        parts.update(clip_parts, clip=clip_total)
    if cfg.mask_weight > 0 and bool(batch["has_mask"].any()):
        rows = batch["has_mask"].to(device).bool()
        target = patch_targets(batch["mask"].to(device)[rows], clip.grid)
        bce = region_bce(out.logits[rows], target)
        total = total + cfg.mask_weight * bce
        parts["mask_bce"] = bce
    return total, parts


def analogy_loss(model, clip: FrozenClip, batch: dict, cfg: RegionConfig, query: VisionFeatures | None = None
                 ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """BCE of the region predicted on ``x`` (condition: the exemplar pair's ANALOGY tokens) against where ``x`` and
    ``x_prime`` differ, pooled to the patch grid; ``query`` = the CLIP features of ``x`` when already computed."""
    device = clip.device
    exemplar = clip.analogy(batch["a"], batch["a_prime"])
    if query is None:
        with torch.no_grad():
            query = clip.vision(batch["x"].to(device))
    out = model(query.patches, "analogy", exemplar.patch_tokens["a"].to(device),
                exemplar.patch_tokens["a_prime"].to(device))
    target = patch_targets(edit_mask(batch["x"], batch["x_prime"], cfg.diff_tolerance).to(device), clip.grid)
    bce = region_bce(out.logits, target)
    return cfg.analogy_weight * bce, {"analogy_bce": bce}


def region_loss(model, clip: FrozenClip, encoder: InstructionEncoder | None, batch: dict, cfg: RegionConfig
                ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    total, parts, features = None, {}, None
    if uses_text(cfg) and uses_analogy(cfg) and torch.equal(batch["image"], batch["x"]):  # world items: one pass
        with torch.no_grad():
            features = clip.vision(batch["image"].to(clip.device))
    if uses_text(cfg):
        total, parts = text_loss(model, clip, encoder, batch, cfg, features)
    if uses_analogy(cfg):
        extra, extra_parts = analogy_loss(model, clip, batch, cfg, features)
        total = extra if total is None else total + extra
        parts.update(extra_parts)
    return total, parts


# ---------------------------------------------------------------------------------------------------------------------
# predictions for samples and evaluation


@torch.no_grad()
def predict_text(model: RegionPredictor, clip: FrozenClip, encoder: InstructionEncoder, images: torch.Tensor,
                 instructions: list[str]) -> torch.Tensor:
    """P_region upsampled to the images [B, H, W]."""
    tokens, mask = encoder.encode(instructions)
    out = model(clip.vision(images.to(clip.device)).patches, "text", tokens.to(clip.device), mask.to(clip.device))
    return probability_image(out.probs, clip.grid, images.shape[1], images.shape[2]).cpu()


@torch.no_grad()
def predict_analogy(model: RegionPredictor, clip: FrozenClip, a: torch.Tensor, a_prime: torch.Tensor,
                    images: torch.Tensor) -> torch.Tensor:
    exemplar = clip.analogy(a, a_prime)
    out = model(clip.vision(images.to(clip.device)).patches, "analogy", exemplar.patch_tokens["a"].to(clip.device),
                exemplar.patch_tokens["a_prime"].to(clip.device))
    return probability_image(out.probs, clip.grid, images.shape[1], images.shape[2]).cpu()


def overlay(images: torch.Tensor, mask: torch.Tensor, colour=(1.0, 0.1, 0.1), strength: float = 0.55) -> torch.Tensor:
    m = mask.unsqueeze(-1) * strength
    return images * (1 - m) + torch.tensor(colour) * m


# ---------------------------------------------------------------------------------------------------------------------
# the task


def shareable_config(cfg: RegionConfig) -> dict:
    values = cfg.to_dict()
    values.pop("output_dir", None)
    for key in ("clip", "instruction_encoder", "data"):
        kind, sep, rest = str(values[key]).partition(":")
        path = rest if sep else kind
        if "/" in path and Path(path).exists():
            values[key] = (kind + ":" if sep else "") + Path(path).name
    return values


class RegionTask(TrainingTask):
    name = "region"
    artifact = ARTIFACT
    config_cls = RegionConfig
    presets = PRESETS
    description = __doc__

    def build(self) -> nn.Module:
        cfg = self.cfg
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        self.clip = load_clip(cfg.clip, cfg.seed).to(self.device)
        self.encoder = load_instruction_encoder(cfg.instruction_encoder, cfg.seed).to(self.device) \
            if uses_text(cfg) else None
        torch.manual_seed(cfg.seed)
        model = RegionPredictor(region_spec(cfg, self.clip, self.encoder), with_sem=uses_text(cfg),
                                position_init=cfg.position_init)
        self.calibrated = cfg.attention_init != "calibrated"
        return model.to(self.device)

    def load_trainable_state(self, model, tensors) -> None:
        super().load_trainable_state(model, tensors)
        self.calibrated = True  # a resumed run's weights were calibrated when it started

    def calibrate(self, model, batch) -> None:
        """:meth:`RegionPredictor.calibrate_attention` on the first batch (text condition when the mode has one)."""
        device, cfg = self.clip.device, self.cfg
        with torch.no_grad():
            if uses_text(cfg):
                patches = self.clip.vision(batch["image"].to(device)).patches
                tokens, token_mask = self.encoder.encode(batch["instruction"])
                condition = ("text", tokens.to(device), token_mask.to(device))
            else:
                patches = self.clip.vision(batch["x"].to(device)).patches
                exemplar = self.clip.analogy(batch["a"], batch["a_prime"])
                condition = ("analogy", exemplar.patch_tokens["a"].to(device),
                             exemplar.patch_tokens["a_prime"].to(device))
        before = self.accelerator.unwrap_model(model).calibrate_attention(
            patches, *condition, reduce=lambda t: self.accelerator.reduce(t.to(device), "mean"))
        log.info("attention scores' std before calibration: cross %.3g, self %.3g", before["cross"], before["self"])
        self.calibrated = True

    def dataset(self):
        cfg = self.cfg
        return make_region_dataset(cfg.data, cfg.mode, cfg.resolution, need_edited=uses_text(cfg) and cfg.beta > 0,
                                   world_editor=cfg.world_editor, world_scenes=cfg.world_scenes)

    def loss(self, model, batch, generator):
        if not self.calibrated:
            self.calibrate(model, batch)
        return region_loss(model, self.clip, self.encoder, batch, self.cfg)[0]

    def export(self, model, path: Path, step: int) -> None:
        save_region_predictor(model, path, {"analogy.step": str(step), "analogy.pack_version": __version__,
                                            "analogy.config": json.dumps(shareable_config(self.cfg)),
                                            **fingerprint_metadata(self.clip.fingerprint())})

    def summary(self, model) -> str:
        count = sum(p.numel() for p in model.parameters() if p.requires_grad)
        return f"{model.spec.describe()}; {count / 1e6:.3f}M trainable parameters (region module + f_sem)"

    def write_samples(self, model, batch, step: int, folder: Path) -> None:
        """One row per item: image, then per mode the predicted region over it (red) and the binary region; the
        item's own mask (where the data has one) last."""
        threshold = self.cfg.threshold
        images = batch["x"] if "x" in batch else batch["image"]
        columns = [images]
        if uses_text(self.cfg):
            soft = predict_text(model, self.clip, self.encoder, batch["image"], batch["instruction"])
            columns += [overlay(batch["image"], soft), overlay(batch["image"], (soft >= threshold).float())]
        if uses_analogy(self.cfg):
            soft = predict_analogy(model, self.clip, batch["a"], batch["a_prime"], batch["x"])
            columns += [overlay(batch["x"], soft), overlay(batch["x"], (soft >= threshold).float())]
        if "x_prime" in batch:
            columns.append(overlay(batch["x"], edit_mask(batch["x"], batch["x_prime"], self.cfg.diff_tolerance).float()))
        elif "mask" in batch:
            columns.append(overlay(batch["image"], batch["mask"]))
        save_sample_image(torch.cat([torch.cat(list(parts), dim=1) for parts in zip(*columns)], dim=0), folder, step)


def mean_iou(predicted: torch.Tensor, truth: torch.Tensor) -> float:
    return float(iou(predicted, truth).mean())


def main(argv=None) -> dict:
    return run(RegionTask, argv)

