"""The region predictor's forms and training options on the analogy world, each trained at the regions row's full
setting (600 steps) and measured as the row measures it: IoU of the binary region (threshold 0.5) with B's true
edit mask on held-out scenes of the local families, at initialisation and after training; per family also the share
of the image the region marks against the true region's, its precision and its recall (``region_per_family_*``).

    .venv/bin/python -m bench.region_forms                   # the quick world (built or reused), seed 0
    .venv/bin/python -m bench.region_forms --full-world      # the full world
    .venv/bin/python -m bench.region_forms --runs text,text_straight_through --json out.json

The runs are the regions row's (``training.world.yardstick.regions.RUNS``): ``text`` and ``analogy`` (the pack's
form), ``text_paper`` (the paper's form and losses), ``text_straight_through`` (the pack's text form trained on the
binarised mask), ``text_mask`` (the pack's text form with a BCE against the true region added to the paper's losses:
beyond the paper, what the module learns when it is told the answer). The row itself (``bench.analogy_world
--methods regions``) trains them for 100 steps on the quick world, too few to tell the forms apart; this command
keeps the row's code and changes only the world and the steps.
Runs are kept under ``--out`` and reused when complete.

``--clip DIR`` trains and scores every run with another CLIP than the world's (a transformers CLIP folder of the
world's vocabulary, e.g. one ``bench.clip_flip_probe --save DIR`` trained): the paper's CLIP losses read the CLIP's
patch features and embeddings, so this asks how much of text mode's region is the world CLIP's doing. The default
run folder then gains ``_clip-<DIR's name>``, and the report names the CLIP. ``--set KEY=VALUE`` changes a trainer
setting of every run (e.g. ``hidden=128``, the token MLP's width); the default run folder gains ``_KEY-VALUE``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

from analogy_core.regions import FrozenClip, InstructionEncoder, load_region_predictor
from training import checkpoints as ckpt
from training.regions.config import RegionConfig
from training.world import build_world
from training.world import scenes as world
from training.world.loaders import T5_FOLDER
from training.world.presets import RunSettingsChanged, check_resumable
from training.world.yardstick.common import losses_from_log, parse_settings
from training.world.yardstick.regions import (REGION_WORLD, RUNS, mean, region_settings, train_region,
                                              world_region_figures)

REPO = Path(__file__).resolve().parent.parent
CHECKPOINT = "region_predictor.safetensors"


def trained(settings: dict, folder: Path, steps: int) -> float | None:
    """Train into ``folder`` unless a complete run of these settings and steps is there; the seconds it took (None
    when reused). A run cut short (its newest checkpoint before ``steps``; the predictor file is rewritten at every
    checkpoint, so its presence says nothing) is continued from that checkpoint. A run of other settings (another
    CLIP, form or length) is refused, never reported as this one."""
    if (folder / "config.json").is_file():
        check_resumable(folder, settings, "training.train_region")
        recorded = json.loads((folder / "config.json").read_text()).get("max_steps")
        if recorded != steps:
            raise RunSettingsChanged(f"{folder} holds a run of {recorded} steps, asked {steps}: use another --out")
        reached = max((c.step for c in ckpt.list_checkpoints(folder / "checkpoints")), default=0)
        if reached >= steps and (folder / CHECKPOINT).is_file():
            return None
        return train_region(settings, folder, steps, resume=reached > 0)
    return train_region(settings, folder, steps)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--full-world", action="store_true", help="the full world instead of the quick one")
    parser.add_argument("--seed", type=int, default=0, help="world and training seed")
    parser.add_argument("--steps", type=int, default=int(REGION_WORLD["max_steps"]), help="training steps per run")
    parser.add_argument("--examples", type=int, default=16, help="held-out scenes per family")
    parser.add_argument("--runs", default=",".join(name for name, _, _ in RUNS), help="comma-separated run names")
    parser.add_argument("--out", type=Path,
                        help="run folder (default outputs/bench_region_forms_<world>_s<seed>[_clip-<name>])")
    parser.add_argument("--json", type=Path, help="write the figures here too")
    parser.add_argument("--clip", type=Path, help="a CLIP folder to use instead of the world's (default: the world's)")
    parser.add_argument("--set", action="append", metavar="KEY=VALUE", dest="sets",
                        help="a probe: change a region trainer setting of every run, e.g. hidden=128 (repeatable; "
                             "not what a run sets itself, the seed or the encoders); recorded as settings_changed")
    args = parser.parse_args(argv)
    try:
        changed = parse_settings(args.sets, "hidden=128")
    except ValueError as error:
        parser.error(str(error))
    unknown = sorted(set(changed) - {f.name for f in dataclasses.fields(RegionConfig)})
    if unknown:
        parser.error(f"--set {', '.join(unknown)}: not a region trainer setting (training/regions/config.py)")
    fixed = sorted(set(changed) & ({"mode", "seed", "clip", "instruction_encoder", "data", "max_steps", "output_dir"}
                                   | {key for _, _, form in RUNS for key in form}))
    if fixed:
        parser.error(f"--set {', '.join(fixed)}: set by the runs or the command itself (use --runs, --seed, --clip, "
                     "--steps, --out)")
    if args.clip is not None and not (args.clip / "config.json").is_file():
        parser.error(f"--clip {args.clip}: not a transformers CLIP folder (no config.json)")
    chosen = {name: (mode, form) for name, mode, form in RUNS if name in args.runs.split(",")}
    quick = not args.full_world
    out = args.out or REPO / "outputs" / f"bench_region_forms_{'quick' if quick else 'full'}_s{args.seed}"
    if args.clip is not None and args.out is None:
        out = out.with_name(f"{out.name}_clip-{args.clip.resolve().name}")
    if changed and args.out is None:
        out = out.with_name(out.name + "".join(f"_{key}-{value}" for key, value in sorted(changed.items())))

    built = build_world(["clip", T5_FOLDER], quick=quick, seed=args.seed)
    clip_folder = args.clip.resolve() if args.clip is not None else built.path("clip")
    clip, encoder = FrozenClip.from_folder(clip_folder), InstructionEncoder.from_folder(built.path(T5_FOLDER))
    local = [f for f in world.families("all") if world.get_family(f).kind == "local"]
    splits = {split: [f for f in local if world.get_family(f).split == split] for split in ("train", "heldout")}
    size = world.REFERENCE_SIZE
    report: dict = {"world": built.root.name, "seed": args.seed, "steps": args.steps, "examples": args.examples,
                    "clip": "world" if args.clip is None else str(clip_folder), "settings_changed": changed,
                    "runs": {}}
    for name, (mode, form) in chosen.items():
        settings = {**region_settings(str(built.root)), **changed, "mode": mode, "seed": args.seed, **form}
        if args.clip is not None:
            settings["clip"] = str(clip_folder)
        trained(settings | {"learning_rate": 0.0}, out / f"{name}_init", 1)
        seconds = trained(settings, out / name, args.steps)
        figures: dict = {"mode": mode, "form": form,  # train_seconds null: a complete run in --out was reused
                         "train_seconds": None if seconds is None else round(seconds, 1)}
        for tag, folder in (("start", out / f"{name}_init"), ("end", out / name)):
            model = load_region_predictor(folder / CHECKPOINT)
            measured = world_region_figures(model, clip, encoder, local, args.examples, size)
            figures[f"iou_per_family_{tag}"] = {f: round(measured[f][mode]["iou"], 4) for f in local}
            for split, names in splits.items():
                figures[f"iou_{split}_families_{tag}"] = mean(measured[f][mode]["iou"] for f in names)
            # where the region is: its share of the image against the true region's, precision and recall
            figures[f"region_per_family_{tag}"] = {f: {k: round(v, 4) for k, v in measured[f][mode].items()
                                                       if k != "iou"} for f in local}
        figures["hidden"] = model.spec.mlp_width  # the token MLP's width (the preset's changed on 2026-12-07)
        if losses := losses_from_log(out / name / "train.log"):
            figures["loss_first_step"], figures["loss_last_step"] = losses
        report["runs"][name] = figures
        print(f"{name:24s} IoU training families {figures['iou_train_families_start']:.3f} -> "
              f"{figures['iou_train_families_end']:.3f}, held-out families {figures['iou_heldout_families_start']:.3f}"
              f" -> {figures['iou_heldout_families_end']:.3f}  "
              f"({'reused' if seconds is None else f'trained in {seconds:.0f} s'})", flush=True)
    text = json.dumps(report, indent=1)
    out.mkdir(parents=True, exist_ok=True)
    (out / "region_forms.json").write_text(text)
    if args.json:
        args.json.write_text(text)
    return report


if __name__ == "__main__":
    started = time.monotonic()
    main()
    print(f"total {time.monotonic() - started:.0f} s")
