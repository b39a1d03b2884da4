"""The region predictor on the analogy world: its encoders and the IoU evaluation the bench reports.

* CLIP: the world's CLIP (vision + text, trained contrastively on world images and their procedural captions).
* Instruction encoder: a tiny T5 encoder over the world's vocabulary, random and frozen (built from a fixed seed and
  cached as a transformers folder, the format Load Instruction Encoder reads). It knows no language: which words
  matter is learnt by the region module, as with any frozen encoder.
* Evaluation: held-out scenes of the local families; the region is predicted on B (text: the family's instruction;
  analogy: the example's own A → A′ as the exemplar) and compared with the true edit mask of B.
"""

from __future__ import annotations

import torch

from analogy_core.regions import FrozenClip, InstructionEncoder, composite_by_mask, iou, load_region_predictor
from training.regions.task import predict_analogy, predict_text
from training.world import scenes as world
from training.world.loaders import T5_FOLDER
from training.world.presets import run_trainer
from training.world.yardstick.common import MethodContext, MethodOutput, losses_from_log
from training.world.yardstick.lorweb import run_lorweb

# ---------------------------------------------------------------------------------------------------------------------
# evaluation


def evaluation_examples(family: str, count: int, size: int, split: str = "heldout") -> list:
    return [world.example(family, split, k, size) for k in range(count)]


def region_figures(predicted: torch.Tensor, truth: torch.Tensor) -> dict[str, float]:
    """How binary regions [B, H, W] meet the true edit masks: mean IoU per image, and over all pixels the share of
    the image marked, the true region's share, precision (marked pixels inside the true region) and recall (true
    region pixels marked). Over-marking shows as a high recall with a low precision."""
    p, t = predicted.bool(), truth.bool()
    both = float((p & t).sum())
    return {"iou": float(iou(p, t).mean()), "marked_share": float(p.float().mean()),
            "true_share": float(t.float().mean()), "precision": both / max(float(p.sum()), 1.0),
            "recall": both / max(float(t.sum()), 1.0)}


@torch.no_grad()
def world_region_figures(model, clip: FrozenClip, encoder: InstructionEncoder | None, families: list[str], count: int,
                         size: int, threshold: float = 0.5, split: str = "heldout"
                         ) -> dict[str, dict[str, dict[str, float]]]:
    """:func:`region_figures` of the binary region on B against B's true edit mask, per family and mode ("text",
    "analogy")."""
    spec = model.spec
    out: dict[str, dict[str, dict[str, float]]] = {}
    for family in families:
        examples = evaluation_examples(family, count, size, split)
        b = torch.stack([ex.b for ex in examples])
        truth = torch.stack([ex.mask for ex in examples])
        figures = {}
        if spec.text_dim and encoder is not None:
            soft = predict_text(model, clip, encoder, b, [ex.instruction for ex in examples])
            figures["text"] = region_figures(soft >= threshold, truth)
        if spec.analogy_dim:
            a, a_prime = torch.stack([ex.a for ex in examples]), torch.stack([ex.a_prime for ex in examples])
            soft = predict_analogy(model, clip, a, a_prime, b)
            figures["analogy"] = region_figures(soft >= threshold, truth)
        out[family] = figures
    return out


def world_iou(model, clip: FrozenClip, encoder: InstructionEncoder | None, families: list[str], count: int,
              size: int, threshold: float = 0.5, split: str = "heldout") -> dict[str, dict[str, float]]:
    """Mean IoU of the binary region on B with B's true edit mask, per family and mode ("text", "analogy")."""
    figures = world_region_figures(model, clip, encoder, families, count, size, threshold, split)
    return {family: {mode: f["iou"] for mode, f in modes.items()} for family, modes in figures.items()}


# ---------------------------------------------------------------------------------------------------------------------
# the bench row (bench.analogy_world's method "regions")

# train_region --preset tiny with the world's encoders; quick = the CI-sized run
REGION_WORLD: dict[str, object] = dict(max_steps=600, checkpoint_every=300, keep_checkpoints=1, sample_every=600,
                                       log_every=20, report_to="none", threads=1)
REGION_WORLD_QUICK: dict[str, object] = {**REGION_WORLD, "max_steps": 100, "checkpoint_every": 100,
                                         "sample_every": 100}


# (name, mode, form): the pack's form in each mode, the paper's form (no residual connections, no learned
# positions) in text mode with the paper's losses, the pack's text form trained on the binarised mask inference
# uses (straight-through gradient), and the pack's text form told the answer: the paper's losses plus a BCE against
# the true edit region the world knows (mask_weight; beyond the paper) — what the module can learn in text mode when
# the losses are not the limit, as analogy mode is taught by its pair's difference
RUNS: tuple[tuple[str, str, dict], ...] = (("text", "text", {}), ("analogy", "analogy", {}),
                                           ("text_paper", "text", {"residual": False, "positions": False}),
                                           ("text_straight_through", "text", {"straight_through": True}),
                                           ("text_mask", "text", {"mask_weight": 1.0}))
ROW_RUNS = ("text", "analogy")  # the row's own runs: the pack's form in each mode; the rest only with --diagnostics


def row_runs(diagnostics: bool) -> tuple[tuple[str, str, dict], ...]:
    """The runs the row trains: its own, and with ``diagnostics`` the ablations that explain text mode's figures."""
    return tuple(run for run in RUNS if diagnostics or run[0] in ROW_RUNS)


def region_settings(world_folder: str, quick: bool = False) -> dict[str, object]:
    spec = f"world:{world_folder}"
    return {"clip": spec, "instruction_encoder": spec, **(REGION_WORLD_QUICK if quick else REGION_WORLD)}


def train_region(settings: dict[str, object], out, max_steps: int, resume: bool = False) -> float:
    """The region trainer's world run through :func:`training.world.presets.run_trainer`; returns the seconds."""
    return run_trainer("training.train_region", settings, out, max_steps, resume)


def confinement(b: torch.Tensor, edited: torch.Tensor, truth: torch.Tensor, region: torch.Tensor,
                true_mask: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
    """An edit confined to ``region`` (binary [B, H, W]): the composite, and its mean absolute error against the true
    B′ inside and outside the true edit mask next to the unconfined edit's, and the largest change from B outside
    the region (0 when nothing outside moved)."""
    confined = composite_by_mask(b, edited, region.float())
    inside, outside, out_region = true_mask.bool(), ~true_mask.bool(), ~region.bool()

    def error(image, where):
        return float((image - truth).abs().mean(dim=-1)[where].mean()) if where.any() else 0.0

    return confined, {"confined_error_inside_true": error(confined, inside),
                      "confined_error_outside_true": error(confined, outside),
                      "unconfined_error_inside_true": error(edited, inside),
                      "unconfined_error_outside_true": error(edited, outside),
                      "outside_region_max_change_from_b":
                          float((confined - b).abs().amax(dim=-1)[out_region].max()) if out_region.any() else 0.0}


def mean(values) -> float:
    values = list(values)
    return round(sum(values) / len(values), 4) if values else float("nan")


@torch.no_grad()
def predicted_regions(model, clip: FrozenClip, examples: dict[str, list], threshold: float) -> dict[str, torch.Tensor]:
    """Analogy-mode binary regions of B (exemplar: the example's own A → A′) per family."""
    out = {}
    for family, items in examples.items():
        stack = {r: torch.stack([getattr(ex, r) for ex in items]) for r in ("a", "a_prime", "b")}
        out[family] = predict_analogy(model, clip, stack["a"], stack["a_prime"], stack["b"]) >= threshold
    return out


def run_bench_row(ctx, lorweb_output=None):
    """Train the region predictor on the world (one model per mode: text with the paper's losses, analogy; with
    ``ctx.diagnostics`` the other forms of :data:`RUNS` too), measure IoU before and after on held-out scenes, and
    confine LoRWeB's B′ to the analogy model's region. Returns the yardstick's MethodOutput: B′ = LoRWeB's B′
    inside the predicted region, B outside; base = LoRWeB's B′ unconfined."""
    settings = {**region_settings(str(ctx.world.root), ctx.quick), **ctx.row_overrides, "seed": ctx.seed}
    steps = int(settings["max_steps"])
    clip = FrozenClip.from_folder(ctx.world.path("clip"))
    encoder = InstructionEncoder.from_folder(ctx.world.path(T5_FOLDER))
    local = [f for f in ctx.examples if world.get_family(f).kind == "local"]
    count, size = len(ctx.examples[local[0]]), ctx.examples[local[0]][0].b.shape[0]
    threshold = 0.5
    extra: dict = {"train_steps": steps, "threshold": threshold}
    after: dict[str, dict[str, float]] = {f: {} for f in local}
    before: dict[str, dict[str, float]] = {f: {} for f in local}
    models = {}
    runs = row_runs(ctx.diagnostics)
    for name, mode, form in runs:  # one model per mode: trained jointly, analogy mode learnt far more slowly
        run = {**settings, "mode": mode, **form}
        train_region({**run, "learning_rate": 0.0}, ctx.folder / f"{name}_init", 1, ctx.resume_runs)
        extra[f"train_seconds_{name}"] = round(train_region(run, ctx.folder / name, steps, ctx.resume_runs), 1)
        models[name] = load_region_predictor(ctx.folder / name / "region_predictor.safetensors")
        initial = load_region_predictor(ctx.folder / f"{name}_init" / "region_predictor.safetensors")
        for target, model in ((after, models[name]), (before, initial)):
            for family, scores in world_iou(model, clip, encoder, local, count, size, threshold).items():
                target[family].update({name: scores[mode]})
        losses = losses_from_log(ctx.folder / name / "train.log")
        if losses:
            extra[f"loss_first_step_{name}"], extra[f"loss_last_step_{name}"] = losses
    for split in ("train", "heldout"):
        names = [f for f in local if world.get_family(f).split == split]
        suffix = "" if split == "train" else "_heldout_families"
        for mode, _, _ in runs:
            extra[f"iou_{mode}{suffix}"] = mean(after[f][mode] for f in names)
            extra[f"iou_{mode}_start{suffix}"] = mean(before[f][mode] for f in names)
    extra["iou_per_family"] = {f: {m: round(v, 4) for m, v in after[f].items()} for f in local}
    extra["iou_per_family_start"] = {f: {m: round(v, 4) for m, v in before[f].items()} for f in local}
    trained = models["analogy"]
    extra["hidden"] = trained.spec.mlp_width  # the token MLP's width (every run of the row trains with the same)

    if lorweb_output is None:  # the edit to confine: LoRWeB's B′ (trained here unless the bench just trained it)
        lorweb_output = run_lorweb(MethodContext(ctx.world, ctx.seed, ctx.quick, ctx.folder / "lorweb",
                                                             ctx.examples))
    regions = predicted_regions(trained, clip, ctx.examples, threshold)
    b_prime, stats = {}, {}
    for family, items in ctx.examples.items():
        b = torch.stack([ex.b for ex in items])
        truth = torch.stack([ex.b_prime for ex in items])
        true_mask = torch.stack([ex.mask for ex in items])
        b_prime[family], stats[family] = confinement(b, lorweb_output.b_prime[family], truth, regions[family],
                                                     true_mask)
    for split in ("train", "heldout"):
        names = [f for f in local if world.get_family(f).split == split]
        suffix = "" if split == "train" else "_heldout_families"
        for key in next(iter(stats.values())):
            extra[f"lorweb_{key}{suffix}"] = mean(stats[f][key] for f in names)
    extra["lorweb_outside_region_max_change_from_b_all_families"] = max(
        s["outside_region_max_change_from_b"] for s in stats.values())
    return MethodOutput(b_prime, dict(lorweb_output.b_prime), lorweb_output.reconstruct, extra)
