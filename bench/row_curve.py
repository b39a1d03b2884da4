"""A row's learning curve on the analogy world: every step export of one training run (``keep_exports``), measured
exactly as the row measures its final file (same held-out scenes, sampler and seed; the yardstick's cell metric and
error ratios). Rows that know how: LoRWeB's, LoRA of Change's (either of its runs: ``<out>/loc/train``, with random
exchange, or ``train_no_exchange``, which the row trains only with ``--diagnostics``) and Edit Transfer's three.

    # train a row with a step export at every checkpoint (here: LoRWeB, 8,400 steps, one every 1,000)
    .venv/bin/python -m bench.analogy_world --methods lorweb --no-ceilings --row-set max_steps=8400 \\
        --row-set checkpoint_every=1000 --row-set keep_exports=true
    # then measure each export of that run
    .venv/bin/python -m bench.row_curve --row lorweb --run outputs/bench_world_s0/lorweb/train --json curve.json

The world, its size and the seed are the run's own (its ``config.json`` names the world folder it trained on; the
yardstick's row seeds the trainer and the sampler alike); the row's sampler settings are read from the run too. A
run of another row, or of a world no longer on disk, is refused. The base backbone (no method) is sampled once.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from training import checkpoints as ckpt
from training.world import evaluate as ev
from training.world import scenes as world_def
from training.world.registry import World, open_world
from training.world.yardstick.common import (
    Curve,
    MethodContext,
    MethodOutput,
    RunMismatch,
)
from training.world.yardstick.runner import METHODS, measure

REPO = Path(__file__).resolve().parent.parent
SUMMARY = ("mean_edited_cells_train", "mean_kept_cells_train", "mean_error_over_no_edit_train",
           "mean_edited_cells_heldout", "mean_kept_cells_heldout", "mean_error_over_no_edit_heldout")
ROWS = sorted(name for name, method in METHODS.items() if method.curve is not None)


def run_config(run: Path) -> dict:
    """The run's ``config.json`` (what the trainer wrote at its start)."""
    config_file = run / "config.json"
    if not config_file.is_file():
        raise SystemExit(f"{run}: no config.json — expected the output folder of a training run")
    return json.loads(config_file.read_text())


def run_world(row: str, curve: Curve, config: dict) -> World:
    """The built world the run trained on, with every model the row uses."""
    try:
        folder = curve.world_of(config)
    except RunMismatch as error:
        raise SystemExit(f"not a run of row {row}: {error}") from None
    try:
        world = open_world(folder)
        for model in METHODS[row].world_models:
            world.path(model)
    except (FileNotFoundError, KeyError) as error:
        raise SystemExit(f"the run's world cannot be used: {error}") from None
    return world


def shown(run: Path) -> str:
    """The run folder as the JSON records it: relative to the repository when inside it, else its last three parts
    (no machine's paths in a shared file)."""
    resolved = run.resolve()
    if resolved.is_relative_to(REPO):
        return str(resolved.relative_to(REPO))
    return str(Path("…", *resolved.parts[-3:]))


def held_out_examples(world: World, count: int | None) -> tuple[int, dict[str, list]]:
    """(scenes per family, family -> the yardstick's held-out examples) on ``world``: ``count`` or the yardstick's
    default (16, quick world 4)."""
    count = count or ev.scenes_per_family(world.quick)
    return count, family_examples(count, world.builds["autoencoder"]["config"]["panel"])


def family_examples(count: int, panel: int) -> dict[str, list]:
    """Family -> ``count`` held-out examples of every world family, drawn at ``panel`` px (the yardstick's scenes)."""
    return {family: ev.examples(family, count, panel) for family in world_def.families("all")}


def write_report(path: Path | None, report: dict) -> None:
    """``report`` as indented JSON at ``path`` (its folder made), when a path is given."""
    if path:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(report, indent=2))


def curve(ctx: MethodContext, row: str, config: dict, exports: list[tuple[int, Path]]) -> list[dict]:
    """One record per export: the step, the split means and each family's cell fractions and error ratio."""
    try:
        sampler = METHODS[row].curve.sampler(ctx, config)
    except RunMismatch as error:
        raise SystemExit(f"not a run of row {row}: {error}") from None
    records = []
    for step, path in exports:
        measured = measure(ctx, MethodOutput(sampler.b_prime(path), sampler.base, sampler.reconstruct))
        record = {"step": step, "file": path.name, **{k: measured["extra"].get(k) for k in SUMMARY},
                  "families": {family: {k: figures[k] for k in ("split", "edited_cells", "kept_cells",
                                                                 "error_over_no_edit")}
                               for family, figures in measured["families"].items()}}
        print(json.dumps({k: record[k] for k in ("step", *SUMMARY)}), flush=True)
        records.append(record)
    return records


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--row", required=True, choices=ROWS, help="the yardstick row the run was trained for")
    parser.add_argument("--run", type=Path, required=True, help="the run's output folder (with step exports)")
    parser.add_argument("--examples", type=int, help="held-out scenes per family (default 16, quick world 4)")
    parser.add_argument("--json", type=Path, help="write the curve here")
    args = parser.parse_args(argv)
    started = time.monotonic()
    spec = METHODS[args.row].curve
    exports = ckpt.step_exports(args.run, spec.artifact)
    if not exports:
        raise SystemExit(f"{args.run}: no step exports ({spec.artifact.removesuffix('.safetensors')}.step_N"
                         ".safetensors) — train the row with --row-set keep_exports=true")
    config = run_config(args.run)
    world = run_world(args.row, spec, config)
    seed = int(config.get("seed", world.seed))
    count, examples = held_out_examples(world, args.examples)
    sampler_settings = {key: config[key] for key in spec.sampler_keys if key in config}  # as the run sampled
    ctx = MethodContext(world, seed, world.quick, args.run, examples, sampler_settings)
    report = {"row": args.row, "run": shown(args.run), "world": world.root.name, "seed": seed, "examples": count,
              "curve": curve(ctx, args.row, config, exports)}
    report["seconds"] = round(time.monotonic() - started, 1)
    write_report(args.json, report)
    return report


if __name__ == "__main__":
    main()
