"""Where the paper's CLIP losses put their minimum on the analogy world: L_CLIP (eqs. 7-10, the tiny preset's
weights unless given) of text mode's training items, evaluated for fixed candidate regions instead of a trained
predictor.

Text mode trained with the paper's losses marks most of the image (docs/analogy_world_measurements.md, "Regions in
text mode"). That can be the losses (their minimum is a large region on this world) or the optimisation (the minimum
is the true region, and training does not get there). In text mode L_semAlign does not depend on the region, so
L_CLIP is all that moves it. This asks L_CLIP directly, with X_res = M ⊙ X_edit + (1 − M) ⊙ X, for M = no region,
the true region (pixels, and as the CLIP's patch grid can say it), the true region grown by one and two cells, the
true region moved elsewhere, one half everywhere, and the whole image; and for a free region per image (per-patch
logits, upsampled as the predictor's P_region is) descended on L_CLIP from one half everywhere and from the true
region: the best any predictor could do on the loss. It also reports the gradient of L_CLIP with respect to M at
M = 1/2 everywhere and at the true region: the share of pixels inside and outside the true region that the loss
pushes up.

    .venv/bin/python -m bench.region_loss_landscape --full-world --seed 0 --editor redraw --json out.json
    .venv/bin/python -m bench.region_loss_landscape --full-world --lambda-s 0.01     # other loss weights

``--editor`` is the world's X_edit (``world_editor``: ``redraw``, ``inpaint`` or ``truth``; see
training/regions/data.py). Nothing is trained; the world's CLIP is built or reused.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from analogy_core.regions import (FrozenClip, LossWeights, VisionFeatures, blend, clip_loss, grow, iou,
                                  patch_targets, probability_image)
from training.regions.config import PRESETS, RegionConfig
from training.world import build_world
from training.world.data import WORLD_EDITORS, WorldRegions
from training.world.scenes import CELL

TINY = PRESETS["tiny"]
THRESHOLD = RegionConfig.threshold  # the binary region the row scores (0.5)


@dataclass
class Family:
    """One family's items and what L_CLIP needs of them besides the region: X, X_edit, the true mask, the CLIP
    features of X, T_e, T_o, and the loss weights."""

    clip: FrozenClip
    batch: dict[str, torch.Tensor]
    original: VisionFeatures
    t_e: torch.Tensor
    t_o: torch.Tensor
    weights: LossWeights

    @classmethod
    def of(cls, clip: FrozenClip, items: list[dict], weights: LossWeights) -> "Family":
        batch = {key: torch.stack([item[key] for item in items]) for key in ("image", "edited", "mask")}
        with torch.no_grad():
            original = clip.vision(batch["image"])
            t_e = clip.text([item["target_caption"] for item in items])
            t_o = clip.text([item["source_caption"] for item in items])
        return cls(clip, batch, original, t_e, t_o, weights)

    def loss(self, region: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """L_CLIP (eq. 10) of X_res = M ⊙ X_edit + (1 − M) ⊙ X for the region M [B, H, W]."""
        result = self.clip.vision(blend(region, self.batch["edited"], self.batch["image"]))
        return clip_loss(self.weights, result.embeds, self.original.embeds, self.original.patches, result.patches,
                         self.t_e, self.t_o)

    def iou(self, region: torch.Tensor) -> float:
        """Mean IoU of the region at the row's threshold with the true region."""
        return round(float(iou(region >= THRESHOLD, self.batch["mask"]).mean()), 4)


def candidates(true_mask: torch.Tensor, grid: int) -> dict[str, torch.Tensor]:
    """Name -> region [B, H, W] in 0..1 for a batch of true masks [B, H, W]."""
    height, width = true_mask.shape[1:]
    patches = probability_image(patch_targets(true_mask, grid), grid, height, width)
    moved = torch.roll(true_mask, shifts=(height // 2, width // 2), dims=(1, 2))
    return {"none": torch.zeros_like(true_mask), "truth": true_mask, "truth_patches": patches,
            "truth_grown_1_cell": grow(true_mask, CELL).float(),
            "truth_grown_2_cells": grow(true_mask, 2 * CELL).float(), "truth_moved": moved,
            "half": torch.full_like(true_mask, 0.5), "all": torch.ones_like(true_mask)}


def push(family: Family, region: torch.Tensor) -> dict[str, float]:
    """The share of pixels inside / outside the true region where −∂L_CLIP/∂M > 0 (the loss wants more region)."""
    region = region.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(family.loss(region)[0], region)
    inside, wants_more = family.batch["mask"].bool(), grad < 0
    return {"inside_pushed_up": round(float(wants_more[inside].float().mean()), 4),
            "outside_pushed_up": round(float(wants_more[~inside].float().mean()), 4)}


def oracle(family: Family, start: torch.Tensor, steps: int) -> dict[str, float]:
    """The region the loss itself prefers: free per-patch logits per image (what P_region can say, upsampled as the
    predictor's is), started at ``start`` [B, grid²] and descended with Adam (rate 0.1) for ``steps`` steps; its loss
    at the start and the end, the share its binary region marks and its IoU with the true region (row's threshold)."""
    height, width = family.batch["mask"].shape[1:]
    logits = start.clone().requires_grad_(True)
    optimiser = torch.optim.Adam([logits], lr=0.1)
    losses = []
    for step in range(steps + 1):
        region = probability_image(torch.sigmoid(logits), family.clip.grid, height, width)
        total, _ = family.loss(region)
        losses.append(float(total.detach()))
        if step == steps:
            break
        optimiser.zero_grad()
        total.backward()
        optimiser.step()
    region = region.detach()
    return {"start_loss": round(losses[0], 5), "loss": round(losses[-1], 5),
            "marked_share": round(float((region >= THRESHOLD).float().mean()), 4), "iou": family.iou(region)}


def family_figures(family: Family, oracle_steps: int) -> dict:
    """Per candidate its loss, the loss's parts, ``marked_share`` (the mean of the region as given: 0.5 for
    ``half``) and its IoU; the pushes; and the free regions (whose ``marked_share`` is their binary region's)."""
    out = {}
    with torch.no_grad():
        for name, region in candidates(family.batch["mask"], family.clip.grid).items():
            total, parts = family.loss(region)
            out[name] = {"loss": round(float(total), 5), **{k: round(float(v), 5) for k, v in parts.items()},
                         "marked_share": round(float(region.mean()), 4), "iou": family.iou(region)}
    out["push_at_half"] = push(family, torch.full_like(family.batch["mask"], 0.5))
    out["push_at_truth"] = push(family, family.batch["mask"])
    if oracle_steps > 0:
        cells = patch_targets(family.batch["mask"], family.clip.grid)
        out["oracle_from_half"] = oracle(family, torch.zeros_like(cells), oracle_steps)
        out["oracle_from_truth"] = oracle(family, 8.0 * cells - 4.0, oracle_steps)
    return out


def print_family(name: str, figures: dict) -> None:
    ranked = sorted((n for n in figures if not n.startswith(("push", "oracle"))), key=lambda n: figures[n]["loss"])
    print(f"{name:22s} " + "  ".join(f"{n} {figures[n]['loss']:.4f}" for n in ranked))
    half, truth = figures["push_at_half"], figures["push_at_truth"]
    print(f"{'':22s} pushed up at ½: inside {half['inside_pushed_up']:.2f}, outside {half['outside_pushed_up']:.2f}; "
          f"at the truth: inside {truth['inside_pushed_up']:.2f}, outside {truth['outside_pushed_up']:.2f}")
    for start in ("half", "truth"):
        if (found := figures.get(f"oracle_from_{start}")) is not None:
            print(f"{'':22s} free region from {start}: loss {found['start_loss']:.4f} -> {found['loss']:.4f}, marks "
                  f"{found['marked_share']:.2f}, IoU {found['iou']:.3f}")


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--full-world", action="store_true", help="the full world instead of the quick one")
    parser.add_argument("--seed", type=int, default=0, help="world seed")
    parser.add_argument("--editor", choices=WORLD_EDITORS, default="redraw", help="what X_edit is (world_editor)")
    parser.add_argument("--items", type=int, default=32, help="training items per family")
    parser.add_argument("--oracle-steps", type=int, default=300,
                        help="Adam steps of the free per-patch region (0: none)")
    parser.add_argument("--lambda-g", type=float, default=RegionConfig.lambda_g, help="weight of L_CLIPg")
    parser.add_argument("--lambda-d", type=float, default=RegionConfig.lambda_d, help="weight of L_CLIPd")
    parser.add_argument("--lambda-s", type=float, default=float(TINY["lambda_s"]),
                        help="weight of L_CLIPs (the tiny preset's 1/64²: eq. 9's sum as a mean over 64 × 64 pairs)")
    parser.add_argument("--json", type=Path, help="write the figures here too")
    args = parser.parse_args(argv)
    torch.manual_seed(args.seed)
    weights = LossWeights(lambda_g=args.lambda_g, lambda_d=args.lambda_d, lambda_s=args.lambda_s)
    built = build_world(["clip"], quick=not args.full_world, seed=args.seed)
    clip = FrozenClip.from_folder(built.path("clip"))
    data = WorldRegions(int(TINY["resolution"]), editor=args.editor)
    by_family: dict[str, list[dict]] = {family: [] for family in data.families}
    for index in range(args.items * len(data.families)):
        item = data[index]
        by_family[item["family"]].append(item)
    report = {"world": built.root.name, "editor": args.editor, "items_per_family": args.items,
              "oracle_steps": args.oracle_steps,
              "weights": {"lambda_g": weights.lambda_g, "lambda_d": weights.lambda_d, "lambda_s": weights.lambda_s},
              "families": {}}
    for name, items in by_family.items():
        report["families"][name] = family_figures(Family.of(clip, items, weights), args.oracle_steps)
        print_family(name, report["families"][name])
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))
    return report


if __name__ == "__main__":
    main()
