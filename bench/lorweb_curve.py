"""LoRWeB's learning curve on the analogy world: every step export of a row's training run (``keep_exports``),
measured exactly as the row measures its final basis (same held-out scenes, sampler and seed; the yardstick's
cell metric and error ratios).

    # train the row with a step export at every checkpoint (here: 8,400 steps, one every 1,000)
    .venv/bin/python -m bench.analogy_world --methods lorweb --no-ceilings --row-set max_steps=8400 \\
        --row-set checkpoint_every=1000 --row-set keep_exports=true
    # then measure each export of that run
    .venv/bin/python -m bench.lorweb_curve --run outputs/bench_world_s0/lorweb/train --json curve.json

``--quick`` and ``--seed`` name the world as for ``bench.analogy_world``; the run must have been trained on that
world (its ``config.json`` says which), else the command stops. The base backbone (no basis) is sampled once.
"""

from __future__ import annotations

import argparse
import functools
import json
import time
from pathlib import Path

from analogy_core.lorweb.basis import load_basis
from training import checkpoints as ckpt
from training.backbone import load_backbone
from training.lorweb.task import BASIS_FILE
from training.world import build_world
from training.world import evaluate as ev
from training.world import scenes as world_def
from training.world.yardstick import lorweb
from training.world.yardstick.common import MethodContext, MethodOutput
from training.world.yardstick.runner import METHODS, measure

REPO = Path(__file__).resolve().parent.parent
SUMMARY = ("mean_edited_cells_train", "mean_kept_cells_train", "mean_error_over_no_edit_train",
           "mean_edited_cells_heldout", "mean_kept_cells_heldout", "mean_error_over_no_edit_heldout")


def run_config(run: Path) -> dict:
    """The run's ``config.json`` (what the trainer wrote at its start)."""
    config_file = run / "config.json"
    if not config_file.is_file():
        raise SystemExit(f"{run}: no config.json — expected the output folder of a LoRWeB training run")
    return json.loads(config_file.read_text())


def run_world(config: dict) -> Path:
    """The world folder a LoRWeB run was trained on (its ``backbone``, ``world:<folder>``)."""
    backbone = str(config.get("backbone", ""))
    if not backbone.startswith("world:"):
        raise SystemExit(f"trained on {backbone!r}, not on an analogy world (expected 'world:<folder>')")
    return Path(backbone.removeprefix("world:")).resolve()


def shown(run: Path) -> str:
    """The run folder as the JSON records it: relative to the repository when inside it, else its last three parts
    (no machine's paths in a shared file)."""
    resolved = run.resolve()
    if resolved.is_relative_to(REPO):
        return str(resolved.relative_to(REPO))
    return str(Path("…", *resolved.parts[-3:]))


def curve(ctx: MethodContext, exports: list[tuple[int, Path]]) -> list[dict]:
    """One record per export: the step, the split means and each family's cell fractions and error ratio."""
    backbone = load_backbone(ctx.world.spec)
    base = lorweb.base_b_prime(ctx, backbone)
    reconstruct = functools.partial(ev.reconstruct, backbone)
    records = []
    for step, path in exports:
        output = MethodOutput(lorweb.basis_b_prime(ctx, load_basis(path)), base, reconstruct)
        measured = measure(ctx, output)
        record = {"step": step, "file": path.name, **{k: measured["extra"].get(k) for k in SUMMARY},
                  "families": {family: {k: row[k] for k in ("split", "edited_cells", "kept_cells",
                                                             "error_over_no_edit")}
                               for family, row in measured["families"].items()}}
        print(json.dumps({k: record[k] for k in ("step", *SUMMARY)}), flush=True)
        records.append(record)
    return records


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", type=Path, required=True, help="the LoRWeB run's output folder (with step exports)")
    parser.add_argument("--quick", action="store_true", help="the quick world (as bench.analogy_world --quick)")
    parser.add_argument("--seed", type=int, default=0, help="world and sampling seed")
    parser.add_argument("--examples", type=int, help="held-out scenes per family (default 16, quick 4)")
    parser.add_argument("--world-root", type=Path, help="where worlds are cached (as bench.analogy_world)")
    parser.add_argument("--json", type=Path, help="write the curve here")
    args = parser.parse_args(argv)
    started = time.monotonic()
    exports = ckpt.step_exports(args.run, BASIS_FILE)
    if not exports:
        raise SystemExit(f"{args.run}: no step exports ({BASIS_FILE.removesuffix('.safetensors')}.step_N.safetensors)"
                         " — train the row with --row-set keep_exports=true")
    world = build_world(list(METHODS["lorweb"].world_models), quick=args.quick, seed=args.seed, root=args.world_root)
    config = run_config(args.run)
    if run_world(config) != world.root.resolve():
        raise SystemExit(f"{args.run} was trained on {run_world(config)}, not on this world ({world.root}): "
                         "pass the --quick / --seed / --world-root it was trained with")
    panel = world.builds["autoencoder"]["config"]["panel"]
    count = args.examples or (4 if args.quick else 16)
    examples = {family: ev.examples(family, count, panel) for family in world_def.families("all")}
    sampler = {key: config[key] for key in ("sample_steps", "guidance")}  # as the run sampled, were they changed
    ctx = MethodContext(world, args.seed, args.quick, args.run, examples, sampler)
    report = {"run": shown(args.run), "world": world.root.name, "seed": args.seed, "examples": count,
              "curve": curve(ctx, exports)}
    report["seconds"] = round(time.monotonic() - started, 1)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
