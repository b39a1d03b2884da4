"""Do the world CLIP's patch features tell which cells of B a local edit changes? Small classifiers trained on
them per family, scored as the regions row scores its region.

    OMP_NUM_THREADS=1 .venv/bin/python -m bench.region_feature_probe --full-world --json probe.json

The region predictor reads B's projected CLIP patch features F (one patch per world cell at the world CLIP's
28-px patches on a 224-px input). For each training local family this trains, on B of training scenes, a per-patch
classifier of "this cell is in B's true edit mask" (target: the share of the patch inside the mask, BCE) and reports
the IoU of its binary mask (probability ≥ 0.5, per image, cell grid) on held-out scenes:

* ``linear``: one linear layer per patch;
* ``mlp``: two hidden layers of ``--width`` per patch — what a token-wise MLP can read from one patch;
* ``mlp_3x3``: the same MLP over the patch and its eight neighbours (zero-padded) — what local context adds.

No condition enters and no position is given explicitly (the CLIP's own position embeddings and the 3 × 3 window's
zero padding at the border carry a little): a family whose region is a place (the added square's empty corner)
scores near 0; a family whose region is a colour or a shape is scored on whether F carries it. This asks whether the
features or the region module limit a family, not what the row reaches.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from analogy_core.regions import FrozenClip, iou, patch_targets
from training.world import build_world
from training.world import scenes as world

PROBES = ("linear", "mlp", "mlp_3x3")


def family_features(clip: FrozenClip, family: str, split: str, count: int, batch: int = 128
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """B's projected patch features [count, N, d] and per-patch mask shares [count, N] of ``family``."""
    examples = [world.example(family, split, k, world.REFERENCE_SIZE) for k in range(count)]
    images = torch.stack([ex.b for ex in examples])
    with torch.no_grad():
        features = torch.cat([clip.vision(images[i:i + batch]).patches for i in range(0, count, batch)])
    return features, patch_targets(torch.stack([ex.mask for ex in examples]), clip.grid)


def with_neighbours(features: torch.Tensor, grid: int) -> torch.Tensor:
    """[B, N, d] → [B, N, 9d]: each patch with its 3 × 3 neighbourhood on the patch grid (zeros beyond the edge)."""
    b, n, d = features.shape
    maps = features.transpose(1, 2).reshape(b, d, grid, grid)
    return F.unfold(maps, 3, padding=1).transpose(1, 2)


def classifier(kind: str, dim: int, width: int) -> nn.Module:
    if kind == "linear":
        return nn.Linear(dim, 1)
    return nn.Sequential(nn.Linear(dim, width), nn.GELU(), nn.Linear(width, width), nn.GELU(), nn.Linear(width, 1))


def mask_iou(probs: torch.Tensor, targets: torch.Tensor) -> float:
    """Mean over images of the IoU of (probs ≥ 0.5) with (targets ≥ 0.5); an image where both are empty scores 1."""
    return float(iou(probs >= 0.5, targets >= 0.5).mean())


def fit_and_score(kind: str, train: tuple[torch.Tensor, torch.Tensor], test: tuple[torch.Tensor, torch.Tensor],
                  grid: int, width: int, steps: int, seed: int) -> dict[str, float]:
    """Train one probe (Adam 3e-3, 64 images a step, inputs standardised on the training features); its held-out
    IoU and the share of cells it marks."""
    (x_train, y_train), (x_test, y_test) = train, test
    if kind == "mlp_3x3":
        x_train, x_test = with_neighbours(x_train, grid), with_neighbours(x_test, grid)
    torch.manual_seed(seed)
    net = classifier(kind, x_train.shape[-1], width)
    mean, std = x_train.mean((0, 1)), x_train.std((0, 1)) + 1e-6
    optimiser = torch.optim.Adam(net.parameters(), lr=3e-3)
    generator = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        pick = torch.randint(0, x_train.shape[0], (64,), generator=generator)
        logits = net((x_train[pick] - mean) / std).squeeze(-1)
        loss = F.binary_cross_entropy_with_logits(logits, y_train[pick])
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    with torch.no_grad():
        probs = torch.sigmoid(net((x_test - mean) / std).squeeze(-1))
    return {"iou": round(mask_iou(probs, y_test), 4), "marked_share": round(float((probs >= 0.5).float().mean()), 4)}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--full-world", action="store_true", help="the full world's CLIP instead of the quick one's")
    parser.add_argument("--seed", type=int, default=0, help="world seed (its CLIP) and the probes' seed")
    parser.add_argument("--clip", type=Path, help="a CLIP folder instead of the world's")
    parser.add_argument("--train-scenes", type=int, default=1024, help="training scenes per family")
    parser.add_argument("--examples", type=int, default=64, help="held-out scenes per family")
    parser.add_argument("--steps", type=int, default=1500, help="training steps per probe")
    parser.add_argument("--width", type=int, default=128, help="hidden width of the MLP probes")
    parser.add_argument("--families", default=",".join(f for f in world.families("train")
                                                       if world.get_family(f).kind == "local"),
                        help="comma-separated local families (default: the training ones)")
    parser.add_argument("--json", type=Path, help="write the report here too")
    args = parser.parse_args(argv)
    families = [f.strip() for f in args.families.split(",") if f.strip()]
    for family in families:
        if family not in world.families("all") or world.get_family(family).kind != "local":
            parser.error(f"--families: {family!r} is not a local family of the world")
    built = None if args.clip is not None else build_world(["clip"], quick=not args.full_world, seed=args.seed)
    clip = FrozenClip.from_folder(args.clip if built is None else built.path("clip"))
    report: dict = {"world": None if built is None else built.root.name,
                    "clip": "world" if built is not None else str(args.clip), "seed": args.seed,
                    "train_scenes": args.train_scenes,
                    "examples": args.examples, "steps": args.steps, "width": args.width, "families": {}}
    for family in families:
        started = time.monotonic()
        train = family_features(clip, family, "train", args.train_scenes)
        test = family_features(clip, family, "heldout", args.examples)
        figures = {kind: fit_and_score(kind, train, test, clip.grid, args.width, args.steps, args.seed)
                   for kind in PROBES}
        figures["true_share"] = round(float((test[1] >= 0.5).float().mean()), 4)
        report["families"][family] = figures
        print(f"{family:24s} " + "  ".join(f"{k} {figures[k]['iou']:.3f}" for k in PROBES) +
              f"  ({time.monotonic() - started:.0f} s)", flush=True)
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))
    return report


if __name__ == "__main__":
    main()
