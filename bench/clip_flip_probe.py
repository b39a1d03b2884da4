"""Does a world CLIP see layout? Train a probe CLIP with the world CLIP's recipe (:mod:`training.world.clip`) and
report, for every edit family, how far its embedding of A′ lies from A's — the query LoRWeB's router and LoRA of
Change's encoder read.

    OMP_NUM_THREADS=1 .venv/bin/python -m bench.clip_flip_probe --steps 3000 --mirror-negatives --json probe.json

The world's own CLIP sees a flipped scene as the scene itself (edit visibility ~0.001, README "What its router
tells apart"): a flip of this world only permutes flat 8-px patches. ``--mirror-negatives`` trains on batches of
whole groups — a plain scene, its ``hflip`` and its ``vflip``, each with its own caption — so that in every batch
layout is all that tells three pictures apart; ``--position-std S`` redraws the vision position embeddings at std S
before training (0: CLIP's initialisation). Without either it is the world recipe itself (its quick or full
settings, ``--full``), trained ``--steps`` steps. Nothing is written to the world's cache; ``--save DIR`` writes the
probe CLIP as a world CLIP folder (with its report as ``probe.json``), which ``bench.region_forms --clip DIR`` trains
and scores the region predictor with.

Per family (16 held-out scenes): ``edit_visibility`` as :func:`bench.lorweb_routing.edit_visibility` computes it
from the vision tower's ``image_embeds``, embedded as the query encoders embed. And the CLIP's caption retrieval,
top-1 among 64: held-out world images (every look), held-out plain scenes (the look a mirror pool holds), training
images. The mirror pool has a third as many scenes as the world pool, in the plain look only, and a batch holds
whole groups (``batch_images``: 63 of the world's 64).
"""

from __future__ import annotations

import argparse
import math
import time
from collections.abc import Callable
from pathlib import Path

import torch

from analogy_core.encoders import ImageEncoder
from bench.lorweb_routing import edit_visibility
from bench.row_curve import family_examples, write_report
from training.world import clip
from training.world import scenes as world_def
from training.world.models import PANEL
from training.world.registry import WORLD_MODELS
from training.world.yardstick.lorweb import embed_families

MIRRORS = ("hflip", "vflip")
GROUP = 1 + len(MIRRORS)  # a plain scene and its mirrors


def mirror_pool(groups: int) -> tuple[torch.Tensor, list[str]]:
    """``groups`` training scenes, each as [plain, hflip, vflip] consecutive images [3·groups, H, W, 3] with their
    captions. A scene whose mirror reads as the scene itself (its objects on the mirror's axis) is skipped: two
    equal captions for two different pictures would be a contradiction the contrastive loss cannot resolve."""
    images, captions = [], []
    index = 0
    while len(images) < GROUP * groups:
        scene = world_def.sample_scene(world_def.scene_rng("train", index))
        index += 1
        group = [world_def.describe(scene)] + [world_def.FAMILIES[name].caption(scene) for name in MIRRORS]
        if len(set(group)) < GROUP:
            continue
        image = world_def.render(scene)
        images += [image] + [world_def.FAMILIES[name].image_fn(image) for name in MIRRORS]
        captions += group
    return torch.stack(images), captions


def plain_pool(split: str, count: int) -> tuple[torch.Tensor, list[str]]:
    """``count`` scenes of ``split`` in the plain look, with their captions (retrieval on the looks both pools hold)."""
    scenes = [world_def.sample_scene(world_def.scene_rng(split, i)) for i in range(count)]
    return torch.stack([world_def.render(scene) for scene in scenes]), [world_def.describe(s) for s in scenes]


def group_batches(size: int, groups: int) -> Callable[[torch.Generator], torch.Tensor]:
    """Batches of ``size // 3`` whole groups of :func:`mirror_pool` (a scene never without its mirrors)."""
    if size < GROUP:
        raise ValueError(f"a mirror batch holds whole groups of {GROUP}; batch {size} is smaller")
    offsets = torch.arange(GROUP)
    return lambda gen: (torch.randperm(groups, generator=gen)[: size // GROUP, None] * GROUP + offsets).flatten()


def probe_model(cfg: dict, vocab_size: int, seed: int, position_std: float):
    """The world CLIP's initial model; ``position_std`` > 0 redraws its vision position embeddings at that std."""
    if not math.isfinite(position_std) or position_std < 0:
        raise ValueError(f"position_std is a standard deviation (0 keeps CLIP's initialisation), got {position_std}")
    model = clip.make_model(cfg, vocab_size, seed)
    if position_std > 0:
        torch.nn.init.normal_(model.vision_model.embeddings.position_embedding.weight, std=position_std)
    return model


def train_probe(cfg: dict, seed: int, mirror_negatives: bool, position_std: float):
    """(CLIP model, its tokenizer, its build record) trained with ``cfg`` (the world CLIP's settings) on the world pool
    or, with ``mirror_negatives``, on ``cfg['pool'] // 3`` mirror groups (a third as many scenes, plain looks only)."""
    tokenizer = clip.make_tokenizer()
    model = probe_model(cfg, len(tokenizer), seed, position_std)
    if mirror_negatives:
        images, captions = mirror_pool(cfg["pool"] // GROUP)
        batches = group_batches(cfg["batch"], len(captions) // GROUP)
        batch_images = cfg["batch"] // GROUP * GROUP
    else:
        images, captions = clip.world_pool("train", cfg["pool"])
        batches, batch_images = None, cfg["batch"]
    loss = clip.fit_clip(model, clip.resized_pool(images), clip.tokenize_pool(tokenizer, captions), cfg, seed,
                         batches)
    plain_images, plain_captions = plain_pool("heldout", 64)
    record = {**clip.clip_metrics(model, tokenizer, loss, images[:64], captions[:64]),
              "retrieval_top1_heldout_plain_64": clip.retrieval_accuracy(model, tokenizer, plain_images,
                                                                         plain_captions),
              "pool_images": len(captions), "batch_images": batch_images}
    return model, tokenizer, record


def visibility(model, count: int) -> dict[str, float]:
    """Each family's edit visibility under ``model``'s vision tower, on ``count`` held-out scenes, embedded as the
    query encoders embed (the pack's preprocessing, ``image_embeds``)."""
    encoder = ImageEncoder(clip.vision_tower(model), "transformers")
    with torch.no_grad():
        embeddings = embed_families(encoder, family_examples(count, PANEL))
    return {family: round(edit_visibility(e.image_embeds["a"], e.image_embeds["a_prime"]), 4)
            for family, e in embeddings.items()}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, help="training steps (default: the world recipe's)")
    parser.add_argument("--full", action="store_true", help="the full world's CLIP settings (default: quick)")
    parser.add_argument("--mirror-negatives", action="store_true", help="batches of scenes with their mirrors")
    parser.add_argument("--position-std", type=float, default=0.0, help="redraw the position embeddings at this std")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--examples", type=int, default=16, help="held-out scenes per family (at least 2)")
    parser.add_argument("--json", type=Path, help="write the report here")
    parser.add_argument("--save", type=Path, help="write the probe CLIP here as a world CLIP folder (a new folder)")
    args = parser.parse_args(argv)
    if args.save is not None and args.save.exists():
        raise SystemExit(f"--save {args.save}: the folder exists; give a new one (a probe CLIP is never overwritten)")
    if args.steps is not None and args.steps < 1:
        raise SystemExit(f"--steps must be at least 1, got {args.steps}")
    if args.examples < 2:
        raise SystemExit(f"--examples must be at least 2 (visibility is measured against the scenes' spread), "
                         f"got {args.examples}")
    if not math.isfinite(args.position_std) or args.position_std < 0:
        raise SystemExit(f"--position-std is a standard deviation, 0 or more, got {args.position_std}")
    started = time.monotonic()
    cfg = dict(WORLD_MODELS["clip"].configs["full" if args.full else "quick"])
    if args.steps:
        cfg["steps"] = args.steps
    model, tokenizer, record = train_probe(cfg, args.seed, args.mirror_negatives, args.position_std)
    report = {"settings": "full" if args.full else "quick", "config": cfg, "seed": args.seed,
              "mirror_negatives": args.mirror_negatives, "position_std": args.position_std, **record,
              "examples": args.examples, "edit_visibility": visibility(model, args.examples),
              "seconds": round(time.monotonic() - started, 1)}
    for family, value in report["edit_visibility"].items():
        print(f"{family:24s} edit visibility {value:.4f}")
    print(f"held-out retrieval top-1 {report['retrieval_top1_heldout_64']:.3f} "
          f"(plain scenes {report['retrieval_top1_heldout_plain_64']:.3f})")
    if args.save is not None:
        report["saved"] = str(clip.save_clip(model, tokenizer, args.save))
        write_report(args.save / "probe.json", report)
    write_report(args.json, report)
    return report


if __name__ == "__main__":
    main()
