"""Where the paper's CLIP losses put their minimum on the analogy world: L_CLIP (eqs. 7-10, the tiny preset's
weights) of text mode's training items, evaluated for fixed candidate regions instead of a trained predictor.

Text mode trained with the paper's losses marks most of the image (docs/analogy_world_measurements.md, "Regions in
text mode"). That can be the losses (their minimum is a large region on this world) or the optimisation (the minimum
is the true region, and training does not get there). This asks the losses directly: X_res = M ⊙ X_edit + (1 − M) ⊙ X
for M = no region, the true region (pixels, and as the CLIP's patch grid can say it), the true region grown by one
and two cells, the true region moved elsewhere, one half everywhere, and the whole image. It also reports the
gradient of L_CLIP with respect to M at M = 1/2 everywhere (where a fresh predictor starts, about) and at the true
region: the share of pixels inside and outside the true region that the loss pushes up.

    .venv/bin/python -m bench.region_loss_landscape --full-world --seed 0 --editor redraw --json out.json

``--editor`` is the world's X_edit (``world_editor``: ``redraw``, ``inpaint`` or ``truth``; see
training/regions/data.py). Nothing is trained; the world's CLIP is built or reused.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from analogy_core.regions import (FrozenClip, LossWeights, blend, clip_loss, grow, iou, patch_targets,
                                  probability_image)
from training.regions.config import PRESETS
from training.world import build_world
from training.world.data import WORLD_EDITORS, WorldRegions
from training.world.scenes import CELL

TINY = PRESETS["tiny"]
WEIGHTS = LossWeights(lambda_s=float(TINY["lambda_s"]))


def candidates(true_mask: torch.Tensor, grid: int) -> dict[str, torch.Tensor]:
    """Name -> region [B, H, W] in 0..1 for a batch of true masks [B, H, W]."""
    height, width = true_mask.shape[1:]
    patches = probability_image(patch_targets(true_mask, grid), grid, height, width)
    moved = torch.roll(true_mask, shifts=(height // 2, width // 2), dims=(1, 2))
    return {"none": torch.zeros_like(true_mask), "truth": true_mask, "truth_patches": patches,
            "truth_grown_1_cell": grow(true_mask, CELL).float(), "truth_grown_2_cells": grow(true_mask, 2 * CELL).float(),
            "truth_moved": moved, "half": torch.full_like(true_mask, 0.5), "all": torch.ones_like(true_mask)}


def loss_of(clip: FrozenClip, mask: torch.Tensor, batch: dict, original, t_e, t_o) -> tuple[torch.Tensor, dict]:
    result = clip.vision(blend(mask, batch["edited"], batch["image"]))
    return clip_loss(WEIGHTS, result.embeds, original.embeds, original.patches, result.patches, t_e, t_o)


def push(clip: FrozenClip, mask: torch.Tensor, batch: dict, original, t_e, t_o) -> dict[str, float]:
    """The share of pixels inside / outside the true region where −∂L_CLIP/∂M > 0 (the loss wants more region)."""
    mask = mask.clone().requires_grad_(True)
    total, _ = loss_of(clip, mask, batch, original, t_e, t_o)
    (grad,) = torch.autograd.grad(total, mask)
    inside = batch["mask"].bool()
    wants_more = grad < 0
    return {"inside_pushed_up": round(float(wants_more[inside].float().mean()), 4),
            "outside_pushed_up": round(float(wants_more[~inside].float().mean()), 4)}


def oracle(clip: FrozenClip, batch: dict, original, t_e, t_o, start: torch.Tensor, steps: int) -> dict[str, float]:
    """The region the loss itself prefers: free per-patch logits per image (what P_region can say, upsampled as the
    predictor's is), started at ``start`` [B, grid²] and descended with Adam for ``steps`` steps; its loss, the share
    it marks and its IoU with the true region at the row's threshold (0.5)."""
    height, width = batch["mask"].shape[1:]
    logits = start.clone().requires_grad_(True)
    optimiser = torch.optim.Adam([logits], lr=0.1)
    losses = []
    for _ in range(steps + 1):
        mask = probability_image(torch.sigmoid(logits), clip.grid, height, width)
        total, _ = loss_of(clip, mask, batch, original, t_e, t_o)
        losses.append(float(total.detach()))
        if len(losses) > steps:
            break
        optimiser.zero_grad()
        total.backward()
        optimiser.step()
    binary = mask.detach() >= 0.5
    return {"start_loss": round(losses[0], 5), "loss": round(losses[-1], 5),
            "marked_share": round(float(binary.float().mean()), 4), "iou": round(float(iou(binary, batch["mask"]).mean()), 4)}


def family_figures(clip: FrozenClip, items: list[dict], oracle_steps: int) -> dict:
    batch = {key: torch.stack([item[key] for item in items]) for key in ("image", "edited", "mask")}
    t_o = clip.text([item["source_caption"] for item in items])
    t_e = clip.text([item["target_caption"] for item in items])
    with torch.no_grad():
        original = clip.vision(batch["image"])
        out = {}
        for name, mask in candidates(batch["mask"], clip.grid).items():
            total, parts = loss_of(clip, mask, batch, original, t_e, t_o)
            out[name] = {"loss": round(float(total), 5), **{k: round(float(v), 5) for k, v in parts.items()},
                         "marked_share": round(float(mask.mean()), 4)}
        for name, mask in candidates(batch["mask"], clip.grid).items():
            out[name]["iou"] = round(float(iou(mask >= 0.5, batch["mask"]).mean()), 4)
    out["push_at_half"] = push(clip, torch.full_like(batch["mask"], 0.5), batch, original, t_e, t_o)
    out["push_at_truth"] = push(clip, batch["mask"], batch, original, t_e, t_o)
    if oracle_steps > 0:
        cells = patch_targets(batch["mask"], clip.grid)
        out["oracle_from_half"] = oracle(clip, batch, original, t_e, t_o, torch.zeros_like(cells), oracle_steps)
        out["oracle_from_truth"] = oracle(clip, batch, original, t_e, t_o, 8.0 * cells - 4.0, oracle_steps)
    return out


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--full-world", action="store_true", help="the full world instead of the quick one")
    parser.add_argument("--seed", type=int, default=0, help="world seed")
    parser.add_argument("--editor", choices=WORLD_EDITORS, default="redraw", help="what X_edit is (world_editor)")
    parser.add_argument("--items", type=int, default=32, help="training items per family")
    parser.add_argument("--oracle-steps", type=int, default=300, help="Adam steps of the free per-patch region (0: none)")
    parser.add_argument("--json", type=Path, help="write the figures here too")
    args = parser.parse_args(argv)
    torch.manual_seed(args.seed)
    built = build_world(["clip"], quick=not args.full_world, seed=args.seed)
    clip = FrozenClip.from_folder(built.path("clip"))
    data = WorldRegions(int(TINY["resolution"]), editor=args.editor)
    count = len(data.families)
    by_family: dict[str, list[dict]] = {family: [] for family in data.families}
    for index in range(args.items * count):
        item = data[index]
        by_family[item["family"]].append(item)
    report = {"world": built.root.name, "editor": args.editor, "items_per_family": args.items,
              "lambda_s": WEIGHTS.lambda_s, "families": {f: family_figures(clip, items, args.oracle_steps) for f, items in by_family.items()}}
    for family, figures in report["families"].items():
        ranked = sorted((name for name in figures if not name.startswith(("push", "oracle"))),
                        key=lambda n: figures[n]["loss"])
        print(f"{family:22s} " + "  ".join(f"{n} {figures[n]['loss']:.4f}" for n in ranked))
        print(f"{'':22s} push at ½: inside {figures['push_at_half']['inside_pushed_up']:.2f} up, outside "
              f"{figures['push_at_half']['outside_pushed_up']:.2f} up; at the truth: inside "
              f"{figures['push_at_truth']['inside_pushed_up']:.2f}, outside {figures['push_at_truth']['outside_pushed_up']:.2f}")
        for start in ("half", "truth"):
            if (found := figures.get(f"oracle_from_{start}")) is not None:
                print(f"{'':22s} free region from {start}: loss {found['loss']:.4f}, marks {found['marked_share']:.2f}, "
                      f"IoU {found['iou']:.3f}")
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))
    return report


if __name__ == "__main__":
    main()
