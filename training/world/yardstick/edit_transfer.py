"""Edit Transfer on the analogy world: its world settings, training runs, and the yardstick's rows.

Three rows of ``bench.analogy_world``:

* ``edit_transfer`` — the LoRA trained on the world's training families with the family instruction as prompt
  (caption dropout 0.05, the official recipe), sampled with the official clean-context sampler and that prompt;
* ``edit_transfer_stock_inpaint`` — the same LoRA (the same run) sampled with ComfyUI's stock inpainting: the context
  re-noised to each step's level (:func:`training.train_edit_transfer.sample_composite`, ``context="renoise"``);
* ``edit_transfer_textfree`` — EditTransfer++: trained with every prompt empty, sampled with the empty prompt.

Training runs ``training.train_edit_transfer`` itself (the shared skeleton, in a process of its own) on the world's
FLUX.1-dev-like backbone (world model ``flux_dev``) with ``data: world``; the LoRA file it writes is loaded back
through diffusers' own LoRA loader, so the yardstick measures the file a user gets. ``base`` is the same backbone,
sampler and prompt with the LoRA switched off.

The world's text encoders are random frozen transformers behind a word-hash tokenizer: with text, the instruction
of a training family reaches the model as a fixed, family-specific code (it names the family); a held-out family's
instruction is a code the LoRA never saw.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from diffusers import FluxPipeline

from training.backbone import load_backbone
from training.edit_transfer.config import LORA_FILE, TRANSFORMER_FILE
from training.edit_transfer.task import EditTransferConfig, sample_composite
from training.world import scenes as world
from training.world.evaluate import reconstruct
from training.world.presets import run_trainer
from training.world.yardstick.common import (Ceiling, Curve, CurveSampler, MethodOutput, RunMismatch, load_weights,
                                             losses_from_log, pretraining_rate, world_of_spec)

PANEL = 64
# Why these values: 128-px composites of 64-px panels (the world's panel); the official rank 16 and alpha 16; AdamW
# without weight decay (= Adam, as the paper) at 1e-3 in float32 (the official 1e-4 is for FLUX.1-dev's 12B weights;
# the world transformer has 0.4M); batch 8; logit-normal timesteps and guidance 1.0 as the official recipe; samples
# and evaluation with 8 Euler steps on the plain linear schedule (the world backbone was pretrained without a shift).
ET_WORLD: dict[str, object] = dict(
    data="world", grid_resolution=2 * PANEL, rank=16, lora_alpha=16.0, batch_size=8, max_steps=800,
    learning_rate=1e-3, weight_decay=0.0, use_8bit_adam=False, mixed_precision="no", gradient_checkpointing=False,
    caption_dropout=0.05, timestep_sampling="logit_normal", guidance=1.0, num_workers=0, checkpoint_every=800,
    keep_checkpoints=1, sample_every=800, sample_steps=8, sample_shift=False, log_every=20, report_to="none")
ET_WORLD_QUICK: dict[str, object] = {**ET_WORLD, "max_steps": 200, "checkpoint_every": 200, "sample_every": 200}
ROWS = {
    "edit_transfer": dict(text_free=False, context="clean"),
    "edit_transfer_stock_inpaint": dict(text_free=False, context="renoise"),
    "edit_transfer_textfree": dict(text_free=True, context="clean"),
}
_RUNS: dict[tuple, tuple[Path, float]] = {}  # (world, quick, seed, text_free) -> (run folder, seconds), this process


def et_settings(world_root: str | Path, quick: bool = False, text_free: bool = False) -> dict[str, object]:
    """The full key -> value settings of a world run (backbone included)."""
    return {"backbone": f"world:{Path(world_root) / 'flux_dev'}", **(ET_WORLD_QUICK if quick else ET_WORLD),
            "text_free": text_free}


def train_edit_transfer(world_root: str | Path, out: Path, quick: bool = False, seed: int = 0,
                        text_free: bool = False, overrides: dict[str, object] | None = None,
                        resume: bool = False) -> float:
    """Edit Transfer's world preset through :func:`training.world.presets.run_trainer`; returns the seconds."""
    return run_trainer("training.train_edit_transfer",
                       {**et_settings(world_root, quick, text_free), "seed": seed, **(overrides or {})}, out,
                       resume=resume)


def trained_run(ctx, text_free: bool) -> tuple[Path, float]:
    """The run folder of the LoRA for (world, quick, seed, text_free): trained once per bench process, so the
    ``edit_transfer`` and ``edit_transfer_stock_inpaint`` rows sample the same file."""
    key = (str(ctx.world.root), ctx.quick, ctx.seed, text_free, json.dumps(ctx.row_overrides, sort_keys=True))
    if key not in _RUNS or not (_RUNS[key][0] / LORA_FILE).is_file():
        out = ctx.folder / "train"
        _RUNS[key] = (out, train_edit_transfer(ctx.world.root, out, ctx.quick, ctx.seed, text_free,
                                               ctx.row_overrides, ctx.resume_runs))
    return _RUNS[key]


def load_with_lora(world_root: Path, lora_file: Path):
    """The world's FLUX.1-dev-like backbone with the LoRA file loaded by diffusers' own loader (switch it off with
    ``transformer.disable_adapters()``)."""
    backbone = load_backbone(f"world:{Path(world_root) / 'flux_dev'}")
    backbone.transformer.load_lora_adapter(FluxPipeline.lora_state_dict(str(lora_file)), prefix="transformer",
                                           adapter_name="edit_transfer")
    backbone.transformer.eval()
    return backbone


@torch.no_grad()
def sample_b_prime(backbone, items: list[world.Example], text: bool, context: str, steps: int,
                   seed: int) -> torch.Tensor:
    """B′ panels [N, S, S, 3]: [A A′; B grey] completed by :func:`sample_composite` (the trainer's sampler)."""
    batch = {role: torch.stack([getattr(ex, role) for ex in items]) for role in ("a", "a_prime", "b")}
    batch["prompt"] = [ex.instruction if text else "" for ex in items]
    cfg = EditTransferConfig(grid_resolution=2 * PANEL, sample_steps=steps, sample_shift=False, seed=seed,
                             text_free=not text, guidance=1.0)
    grid = sample_composite(backbone.transformer, backbone, batch, cfg, "cpu", context=context).cpu()
    return grid[:, PANEL:, PANEL:]


def row_settings(ctx) -> dict[str, object]:
    """The row's trainer settings with any ``--row-set`` overrides (what the row trains and samples with)."""
    return {**et_settings(ctx.world.root, ctx.quick), **ctx.row_overrides}


def run_row(ctx, row: str):
    """One ``bench.analogy_world`` row (see the module docstring)."""
    spec = ROWS[row]
    run, seconds = trained_run(ctx, spec["text_free"])
    backbone = load_with_lora(ctx.world.root, run / LORA_FILE)
    settings = row_settings(ctx)
    steps, text = int(settings["sample_steps"]), not spec["text_free"]
    transformer = backbone.transformer
    b_prime, base = {}, {}
    for family, items in ctx.examples.items():
        transformer.enable_adapters()
        b_prime[family] = sample_b_prime(backbone, items, text, spec["context"], steps, ctx.seed)
        transformer.disable_adapters()
        base[family] = sample_b_prime(backbone, items, text, spec["context"], steps, ctx.seed)
    transformer.enable_adapters()
    extra: dict[str, object] = {
        "sampler": "official clean context" if spec["context"] == "clean" else "stock re-noising inpainting",
        "text": text, "train_steps": int(settings["max_steps"]),
        "train_seconds": round(seconds, 1), "lora_run": str(run)}
    losses = losses_from_log(run / "train.log")
    if losses:
        extra["loss_first_step"], extra["loss_last_step"] = losses
    return MethodOutput(b_prime, base, lambda images: reconstruct(backbone, images), extra)


# ---------------------------------------------------------------------------------------------------------------------
# the rows' ceilings: Edit Transfer's LoRA is already a plain LoRA (rank 16), so its ceiling is the row's own run —
# trainer, settings, steps and sampler — on one family alone


def et_ceiling_settings(world_root: str | Path, family: str, quick: bool, seed: int, text_free: bool) -> dict:
    """The settings of one family's ceiling run of the row with ``text_free``."""
    return {**et_settings(world_root, quick, text_free), "data": f"world:families={family}", "seed": seed}


def row_ceiling(row: str) -> Ceiling:
    """The ceilings of an Edit Transfer row (its training settings and its sampler): the LoRA one, and the full
    fine-tune of the transformer (``full_finetune``) on the same family, steps and sampler."""
    spec = ROWS[row]
    text, steps = not spec["text_free"], int(ET_WORLD["sample_steps"])

    def settings(world, quick: bool, family: str, seed: int) -> dict:
        return et_ceiling_settings(world.root, family, quick, seed, spec["text_free"])

    def sample(world, quick: bool, folder: Path, items: list, seed: int) -> torch.Tensor:
        backbone = load_with_lora(world.root, folder / LORA_FILE)
        return sample_b_prime(backbone, items, text, spec["context"], steps, seed)

    def full_settings(world, quick: bool, family: str, seed: int) -> dict:
        return {**settings(world, quick, family, seed), "full_finetune": True,
                "learning_rate": pretraining_rate(world, "flux_dev")}

    def full_sample(world, quick: bool, folder: Path, items: list, seed: int) -> torch.Tensor:
        backbone = load_backbone(f"world:{Path(world.root) / 'flux_dev'}")
        load_weights(backbone.transformer, folder / TRANSFORMER_FILE)
        return sample_b_prime(backbone, items, text, spec["context"], steps, seed)

    shared = "edit_transfer_textfree" if spec["text_free"] else "edit_transfer"  # the two samplers: one run
    models = ("autoencoder", "flux_dev")
    full = Ceiling("training.train_edit_transfer", models, full_settings, full_sample, shared_as=f"{shared}_full")
    return Ceiling("training.train_edit_transfer", models, settings, sample, shared_as=shared, full=full)


# ---------------------------------------------------------------------------------------------------------------------
# the learning curve of a run (bench.row_curve): each LoRA export sampled with the row's sampler


def row_curve(row: str) -> Curve:
    """The curve of an Edit Transfer row: the run must have been trained with the row's ``text_free``."""
    spec = ROWS[row]

    def sampler(ctx, config: dict) -> CurveSampler:
        if bool(config.get("text_free")) != spec["text_free"]:
            raise RunMismatch(f"the run was trained with text_free={bool(config.get('text_free'))}; row {row} "
                              f"samples {'without' if spec['text_free'] else 'with'} text "
                              f"(text_free={spec['text_free']})")
        steps = int(row_settings(ctx)["sample_steps"])
        text = not spec["text_free"]

        def sample(backbone) -> dict[str, torch.Tensor]:
            return {family: sample_b_prime(backbone, items, text, spec["context"], steps, ctx.seed)
                    for family, items in ctx.examples.items()}

        base = load_backbone(f"world:{Path(ctx.world.root) / 'flux_dev'}")
        return CurveSampler(sample(base), lambda path: sample(load_with_lora(ctx.world.root, path)),
                            lambda images: reconstruct(base, images))

    return Curve(LORA_FILE, lambda config: world_of_spec(config.get("backbone", ""), "flux_dev"), ("sample_steps",),
                 sampler)
