"""The yardstick's runner (``python -m bench.analogy_world`` is its command): build the world, run each method's
row, measure B′ on held-out scenes of every family (training and held-out families).

Per family (mean absolute pixel error of B′ against the true B′, 0..1 units): the method, no edit (B′ = B), the
base backbone without the method, and the autoencoder floor (reconstruction of the true B′). And the same four at the
world's own resolution (:mod:`training.world.metrics`): the fraction of the cells the edit changes that B′ puts right
(``edited_cells``) and of the cells it keeps (``kept_cells``; ``None`` for a family that changes every cell), a cell
being right when the colour of its centre is within :data:`~training.world.metrics.TOLERANCE` of the truth's.
Method-specific figures go in ``extra`` (LoRWeB: ``routing_gap`` = within- minus across-family centred cosine
similarity of the basis coefficients, on training families, after training and at initialisation). Writes a table, a
JSON file (the stable interface below), and a picture grid per method (rows: families; columns A, A′, B, true B′,
the method's B′; each row labelled with both errors and both cell fractions).

The JSON (stable: keys are added, never removed or renamed; the one exception, since 2026-12-07: the figures of the
rows' ablation runs, present only with ``--diagnostics``)::

    {"seed", "quick", "seconds", "world_overrides" (only for a probe world, --world-set: {model: {setting: value}}),
     "row_overrides" (only for a probe run, --row-set: {setting: value} given to every row's trainer),
     "resumed_runs" (only with --resume-runs: the rows continued the runs already in --out; their train_seconds
        count this invocation's training only),
     "lanes" (only when ceiling runs were trained beside the rows: {"lanes", "threads_per_lane"}; the rows trained
        and sampled with one lane's threads, see --ceiling-jobs),
     "diagnostics" (only with --diagnostics: the rows also trained their ablation runs, whose figures are in
        ``extra`` — regions: ``*_text_paper*``, ``*_text_straight_through*``, ``*_text_mask*`` and those runs in
        ``iou_per_family`` and ``iou_per_family_start``; LoC: every ``*_no_exchange*``; without it those keys are
        absent),
     "methods": {name: {
        "families": {family: {
            "split": "train" | "heldout",
            "error", "no_edit", "base", "floor": mean absolute pixel error of B′ (method, B, base, reconstruction),
            "error_over_no_edit", "base_over_no_edit": the two ratios of this family,
            "edited_cells", "kept_cells": the method's cell fractions (float, or null where there is no such cell),
            "kept_background_cells", "kept_object_cells": the method's kept_cells split by what the cell is in B
                (background, or part of an object; null where there is no such kept cell),
            "no_edit_cells", "base_cells", "floor_cells": {"edited_cells", "kept_cells"} of B, the base, the floor,
            "ceiling": {"lora": {"edited_cells", "kept_cells", "kept_background_cells", "kept_object_cells", "error",
                                 "train_steps", "train_seconds", "train_threads" (null: the default)},
                        "full": {the same}}: training families of a row with a ceiling, when ceilings are on
                (--ceilings): a plain LoRA of the row's per-layer rank budget trained on this family alone, sampled
                as the row samples; "full" (rows with one, full world or --full-ceilings): the backbone fully
                fine-tuned on this family alone (:mod:`training.world.yardstick.ceiling`)}},
        "extra": {
            "mean_error_over_no_edit_<split>", "mean_base_over_no_edit_<split>": the mean over the split's families
                of the per-family ratio (each family weighs the same),
            "error_over_no_edit_of_means_<split>", "base_over_no_edit_of_means_<split>": the mean error over the
                mean no-edit error (the ratio of means, dominated by the families with large errors such as invert),
            "mean_edited_cells_<split>", "mean_kept_cells_<split>": the method's cell fractions averaged over the
                split's families (kept: over the families that keep cells),
            "mean_base_edited_cells_<split>", "mean_base_kept_cells_<split>": the same for the base,
            "mean_kept_background_cells_<split>", "mean_kept_object_cells_<split>": the method's, split by role,
            "mean_ceiling_lora_edited_cells_<split>", "mean_ceiling_lora_kept_cells_<split>",
            "mean_ceiling_lora_error_over_no_edit_<split>": the same for the ceilings (when measured),
            "mean_ceiling_full_...": the same for the full fine-tune ceilings (when measured),
            "ceiling_families", "ceiling_train_seconds_this_run": the families with a ceiling, and the seconds this
                run spent training ceilings (0 when all came from the cache),
            "ceiling_jobs", "ceiling_train_wall_seconds_this_run": (when runs were trained side by side) the lanes,
                and the wall time from the start of the first ceiling run trained for this row to the end of its
                last (0 when none was: cached, or trained for a row sharing them),
            "ceiling_overrides": the ceilings' trainer settings changed with --ceiling-set (only when given),
            ... method-specific figures}}}}

``<split>`` is ``train`` (training families) or ``heldout`` (held-out families); every figure is measured on
held-out scenes.

Adding a method: write its row ``run(ctx: MethodContext) -> MethodOutput`` in ``training/world/yardstick/<method>.py``
(train its preset with its trainer in a process of its own on ``ctx.world``, then produce B′ and the base's B′ for
``ctx.examples``) and add a :class:`~training.world.yardstick.common.Method` to :data:`METHODS`, naming the world
models it needs (``ctx.world.path(name)`` gives their folders). Its ceiling: give the ``Method`` a
:class:`~training.world.yardstick.common.Ceiling` (trainer module, one family's settings, how to sample B′ with the
file that run wrote; :mod:`training.world.yardstick.ceiling`).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import shutil
import time
from pathlib import Path
from typing import Callable

import torch
from PIL import Image, ImageDraw

from analogy_core.analogy import to_uint8_images
from training.edit_transfer.config import EditTransferConfig
from training.loc.config import LoCConfig
from training.lorweb.config import LoRWeBConfig
from training.regions.config import RegionConfig
from training.world import build_world, metrics
from training.world import evaluate as ev
from training.world import scenes as world_def
from training.world.presets import RunSettingsChanged
from training.world.registry import World, parse_overrides
from training.world.yardstick import ceiling, edit_transfer, loc, lorweb, regions
from training.world.yardstick.common import Method, MethodContext, MethodOutput, check_row_overrides, parse_settings

REPO = Path(__file__).resolve().parents[3]
log = logging.getLogger("bench.analogy_world")


OUTPUTS: dict[str, MethodOutput] = {}  # outputs of the methods run so far in this process (later rows may use them)


def run_regions(ctx: MethodContext) -> MethodOutput:
    """The region predictor: IoU on local families, and LoRWeB's B′ (if that row ran first) confined to it."""
    return regions.run_bench_row(ctx, OUTPUTS.get("lorweb"))


def run_edit_transfer(row: str) -> Callable[[MethodContext], MethodOutput]:
    """One of Edit Transfer's rows (the same trainer, different settings or sampler)."""
    return lambda ctx: edit_transfer.run_row(ctx, row)


_METHODS = [
    Method("lorweb", ("autoencoder", "clip", "flux_kontext"), lorweb.run_lorweb,
           "LoRWeB basis on the FLUX.1-Kontext-like world backbone, world CLIP queries", ceiling=lorweb.CEILING,
           trainer_config=LoRWeBConfig, curve=lorweb.CURVE),
    Method("regions", ("autoencoder", "clip", "flux_kontext", "region_t5"), run_regions,
           "region predictor (world CLIP, world T5); B′ = LoRWeB's B′ inside the predicted region",
           trainer_config=RegionConfig, own_settings=frozenset({"mode", *(k for _, _, f in regions.RUNS for k in f)}),
           ablations=True),
    Method("loc", ("autoencoder", "clip", "instruct_pix2pix"), loc.run_loc,
           "LoRA of Change hypernetwork on the InstructPix2Pix-like world backbone, world CLIP tokens",
           ceiling=loc.CEILING, trainer_config=LoCConfig, own_settings=frozenset({"random_exchange"}),
           curve=loc.CURVE, ablations=True),
    Method("edit_transfer", ("autoencoder", "flux_dev"), run_edit_transfer("edit_transfer"),
           "Edit Transfer LoRA on the FLUX.1-dev-like world backbone (instruction prompts), official clean-context "
           "sampler", ceiling=edit_transfer.row_ceiling("edit_transfer"), trainer_config=EditTransferConfig,
           own_settings=frozenset({"text_free"}), curve=edit_transfer.row_curve("edit_transfer")),
    Method("edit_transfer_stock_inpaint", ("autoencoder", "flux_dev"), run_edit_transfer("edit_transfer_stock_inpaint"),
           "the same LoRA sampled with ComfyUI's stock re-noising inpainting",
           ceiling=edit_transfer.row_ceiling("edit_transfer_stock_inpaint"), trainer_config=EditTransferConfig,
           own_settings=frozenset({"text_free"}), curve=edit_transfer.row_curve("edit_transfer_stock_inpaint")),
    Method("edit_transfer_textfree", ("autoencoder", "flux_dev"), run_edit_transfer("edit_transfer_textfree"),
           "Edit Transfer LoRA trained and sampled without text (EditTransfer++)",
           ceiling=edit_transfer.row_ceiling("edit_transfer_textfree"), trainer_config=EditTransferConfig,
           own_settings=frozenset({"text_free"}), curve=edit_transfer.row_curve("edit_transfer_textfree")),
]
METHODS: dict[str, Method] = {m.name: m for m in _METHODS}


# ---------------------------------------------------------------------------------------------------------------------
# measuring, reporting


def measure(ctx: MethodContext, output: MethodOutput) -> dict:
    families = {}
    for family, items in ctx.examples.items():
        truth, b = ev.stack(items, "b_prime"), ev.stack(items, "b")
        floor = output.reconstruct(truth)
        row = {"split": world_def.get_family(family).split,
               "error": round(float(ev.mae(output.b_prime[family], truth).mean()), 5),
               "no_edit": round(float(ev.mae(b, truth).mean()), 5),
               "base": round(float(ev.mae(output.base[family], truth).mean()), 5),
               "floor": round(float(ev.mae(floor, truth).mean()), 5)}
        row["error_over_no_edit"] = round(row["error"] / row["no_edit"], 4)
        row["base_over_no_edit"] = round(row["base"] / row["no_edit"], 4)
        row.update(metrics.cell_scores(output.b_prime[family], truth, b))
        row.update(metrics.kept_cells_by_role(output.b_prime[family], truth, b))
        for name, images in (("no_edit", b), ("base", output.base[family]), ("floor", floor)):
            row[f"{name}_cells"] = metrics.cell_scores(images, truth, b)
        families[family] = row
    extra = dict(output.extra)
    extra.update(split_means(families))
    return {"families": families, "extra": extra}


def split_means(families: dict[str, dict]) -> dict[str, float | None]:
    """The ``extra`` figures over the families of each split (see the module docstring)."""
    out: dict[str, float | None] = {}

    def mean(values: list) -> float | None:
        values = [v for v in values if v is not None]
        return round(sum(values) / len(values), 4) if values else None

    for split in ("train", "heldout"):
        rows = [r for r in families.values() if r["split"] == split]
        if not rows:
            continue
        out[f"mean_error_over_no_edit_{split}"] = mean([r["error"] / r["no_edit"] for r in rows])
        out[f"mean_base_over_no_edit_{split}"] = mean([r["base"] / r["no_edit"] for r in rows])
        no_edit = sum(r["no_edit"] for r in rows)
        out[f"error_over_no_edit_of_means_{split}"] = round(sum(r["error"] for r in rows) / no_edit, 4)
        out[f"base_over_no_edit_of_means_{split}"] = round(sum(r["base"] for r in rows) / no_edit, 4)
        out[f"mean_edited_cells_{split}"] = mean([r["edited_cells"] for r in rows])
        out[f"mean_kept_cells_{split}"] = mean([r["kept_cells"] for r in rows])
        out[f"mean_base_edited_cells_{split}"] = mean([r["base_cells"]["edited_cells"] for r in rows])
        out[f"mean_base_kept_cells_{split}"] = mean([r["base_cells"]["kept_cells"] for r in rows])
        for role in ("background", "object"):
            out[f"mean_kept_{role}_cells_{split}"] = mean([r[f"kept_{role}_cells"] for r in rows])
    return out


def picture(ctx: MethodContext, output: MethodOutput, result: dict, path: Path) -> Path:
    """Rows = families (first example); columns A, A′, B, true B′, the method's B′; a label strip on the left with the
    family's figures over all its held-out scenes (errors, and the cell fractions of the method and of its base)."""
    rows = []
    for family, items in ctx.examples.items():
        ex = items[0]
        rows.append(torch.cat([ex.a, ex.a_prime, ex.b, ex.b_prime, output.b_prime[family][0]], dim=1))
    grid = to_uint8_images(torch.cat(rows, dim=0)[None])[0]
    panel, label = ctx.examples[next(iter(ctx.examples))][0].a.shape[0], 210
    canvas = Image.new("RGB", (grid.shape[1] + label, grid.shape[0]), "white")
    canvas.paste(Image.fromarray(grid), (label, 0))
    draw = ImageDraw.Draw(canvas)
    for i, family in enumerate(ctx.examples):
        r = result["families"][family]
        draw.text((4, i * panel + 2), f"{family} ({r['split']})\nerror {r['error']:.3f} no edit {r['no_edit']:.3f}\n"
                  f"cells {metrics.format_scores(r)}\nbase: {metrics.format_scores(r['base_cells'])}",
                  fill="black")
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)
    return path


def ceiling_picture(ctx: MethodContext, output: MethodOutput, b_prime: dict[str, torch.Tensor], result: dict,
                    out: Path, kind: str = "lora") -> Path:
    """The row's picture for one kind of ceiling (families with one; the last column and the labels are the
    ceiling's): ``<out>/<method>_ceiling.png`` (LoRA) or ``<method>_ceiling_full.png`` (full fine-tune)."""
    only = MethodContext(ctx.world, ctx.seed, ctx.quick, ctx.folder, {f: ctx.examples[f] for f in b_prime})
    rows = {f: {**result["families"][f], **result["families"][f]["ceiling"][kind]} for f in b_prime}
    name = f"{ctx.folder.name}_ceiling{'' if kind == 'lora' else '_' + kind}.png"
    return picture(only, MethodOutput(b_prime, {}, output.reconstruct), {"families": rows}, out / name)


def _fraction(value: float | None) -> str:
    return f"{'-':>6s}" if value is None else f"{value:6.3f}"


def print_table(results: dict) -> None:
    print(f"{'method':8s} {'family':24s} {'split':8s} {'error':>7s} {'no_edit':>8s} {'base':>7s} {'floor':>7s} "
          f"{'err/no_edit':>11s} {'edited':>6s} {'kept':>6s} {'b.edit':>6s} {'b.kept':>6s} {'f.edit':>6s} "
          f"{'f.kept':>6s}")
    for method, result in results.items():
        for family, r in result["families"].items():
            cells = " ".join(_fraction(v) for v in (r["edited_cells"], r["kept_cells"],
                                                   r["base_cells"]["edited_cells"], r["base_cells"]["kept_cells"],
                                                   r["floor_cells"]["edited_cells"], r["floor_cells"]["kept_cells"]))
            print(f"{method:8s} {family:24s} {r['split']:8s} {r['error']:7.4f} {r['no_edit']:8.4f} {r['base']:7.4f} "
                  f"{r['floor']:7.4f} {r['error'] / r['no_edit']:11.3f} {cells}")
        for key, value in result["extra"].items():
            print(f"{method:8s} extra {key} = {value}")
    print(f"cells: edited / kept = fraction of the cells the edit changes / keeps that are right (cell centre within "
          f"{metrics.TOLERANCE} of the truth); b. = base, f. = autoencoder floor; no edit scores 0 / 1")


CEILING_OPTIONS = ("ceiling_families", "ceiling_steps", "ceiling_set", "ceiling_rank", "ceiling_root",
                   "full_ceilings", "ceiling_jobs")


def refuse_unused_ceiling_options(parser: argparse.ArgumentParser, args: argparse.Namespace, ceilings: bool,
                                  names: list[str]) -> None:
    """A ceiling option with no ceiling to apply it to is an error, not a silent no-op."""
    given = [f"--{o.replace('_', '-')}" for o in CEILING_OPTIONS if getattr(args, o) is not None]
    if not given:
        return
    if not ceilings:
        parser.error(f"{', '.join(given)} apply to the ceilings, which are off for this run "
                     f"({'--no-ceilings' if args.ceilings is False else '--quick turns them off'}): add --ceilings")
    if not any(METHODS[name].ceiling for name in names):
        with_one = [name for name, method in METHODS.items() if method.ceiling]
        parser.error(f"{', '.join(given)} apply to the ceilings, and none of {', '.join(names)} has one "
                     f"(rows with a ceiling: {', '.join(with_one)})")


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated, of {', '.join(METHODS)}")
    parser.add_argument("--seed", type=int, default=0, help="world, training and sampling seed")
    parser.add_argument("--quick", action="store_true", help="the CI-sized world and runs")
    parser.add_argument("--json", type=Path, help="write the results here (also written to --out)")
    parser.add_argument("--out", type=Path, help="output folder (default outputs/bench_world[_quick]_s<seed>)")
    parser.add_argument("--world-root", type=Path, help="parent folder of cached worlds (default outputs/world)")
    parser.add_argument("--examples", type=int, help="held-out examples per family (default 16, quick 4)")
    parser.add_argument("--ceilings", action=argparse.BooleanOptionalAction, default=None,
                        help="per training family, train (or reuse from the cache) the row's LoRA ceiling and add "
                             "families.<f>.ceiling (default: on for the full world, off with --quick)")
    parser.add_argument("--ceiling-families", help="'+'-joined families for the ceilings (default: the training "
                                                   "families)")
    parser.add_argument("--ceiling-steps", type=int, help="train each ceiling this many steps instead of its default "
                                                            "(LoRWeB's 1,200; LoC's and Edit Transfer's: their row's "
                                                            "steps); cached apart")
    parser.add_argument("--ceiling-set", action="append", metavar="KEY=VALUE",
                        help="a trainer setting of every ceiling run, e.g. learning_rate=2e-3, or of one kind's "
                             "runs, e.g. full.finetune_scope=attention (repeatable; cached apart; not the family, "
                             "rank budget, seed, backbone or steps)")
    parser.add_argument("--ceiling-rank", type=int, metavar="N",
                        help="a probe: train the LoRA ceilings at this per-layer rank instead of the row's rank "
                             "budget (what the budget costs; cached apart; recorded as extra.ceiling_rank)")
    parser.add_argument("--world-set", action="append", metavar="MODEL.SETTING=VALUE",
                        help="a probe: change one world model's setting, e.g. flux_kontext.heads=6 (repeatable); the "
                             "world is built in a folder of its own, the default world is left as it is")
    parser.add_argument("--row-set", action="append", metavar="KEY=VALUE",
                        help="a probe: change a setting of every selected row's trainer, e.g. learning_rate=2e-3 or "
                             "data=world:families=invert (repeatable; not the seed, the world's models or what a row "
                             "sets per run; the ceilings take --ceiling-set); recorded as row_overrides")
    parser.add_argument("--resume-runs", action="store_true",
                        help="continue each row's training runs already in --out instead of starting afresh: a "
                             "finished run is measured as it is, a longer --row-set max_steps=N extends it (any "
                             "other changed setting is refused); recorded as resumed_runs")
    parser.add_argument("--full-ceilings", action=argparse.BooleanOptionalAction, default=None,
                        help="also the full fine-tune ceiling, for rows that have one (default: on for the full "
                             "world, off with --quick)")
    parser.add_argument("--ceiling-jobs", type=int, metavar="N",
                        help="train the ceiling runs the cache lacks N at a time (fewer when fewer are missing), "
                             "each a process with the cores shared out, beside the rows: while the rows train and "
                             "sample they hold one lane with its share of threads (default: the cores available; 1, "
                             "or nothing missing: the ceilings after the rows, everything with every core); the "
                             "world's models to build are built N at a time too. Fewer threads per run round float "
                             "sums otherwise, so figures drift a little (recorded as lanes, extra.ceiling_jobs, each "
                             "run's train_threads)")
    parser.add_argument("--diagnostics", action="store_true",
                        help="also train the rows' ablation runs: the regions row's paper form, straight-through and "
                             "mask-supervised text runs, LoC without random exchange (recorded as diagnostics)")
    parser.add_argument("--ceiling-root", type=Path, help="the ceilings' cache (default <world folder>/ceilings or "
                                                          f"${ceiling.ENV_ROOT})")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    names = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in names if m not in METHODS]
    if unknown:
        parser.error(f"unknown method(s) {unknown}; available: {', '.join(METHODS)}")
    try:
        world_overrides = parse_overrides(args.world_set)
        ceiling_overrides = ceiling.parse_setting_overrides(args.ceiling_set)
        row_overrides = parse_settings(args.row_set, "learning_rate=2e-3")
        if args.ceiling_rank is not None and args.ceiling_rank < 1:
            raise ValueError(f"--ceiling-rank must be at least 1, got {args.ceiling_rank}")
        if args.ceiling_jobs is not None and args.ceiling_jobs < 1:
            raise ValueError(f"--ceiling-jobs must be at least 1, got {args.ceiling_jobs}")
        for name in names:
            check_row_overrides(METHODS[name], row_overrides)
    except ValueError as err:
        parser.error(str(err))
    started = time.monotonic()
    out = args.out or REPO / "outputs" / f"bench_world{'_quick' if args.quick else ''}_s{args.seed}"
    count = args.examples or ev.scenes_per_family(args.quick)
    ceilings = (not args.quick) if args.ceilings is None else args.ceilings
    ceiling_families = args.ceiling_families.split("+") if args.ceiling_families else None
    refuse_unused_ceiling_options(parser, args, ceilings, names)
    if args.diagnostics and not any(METHODS[name].ablations for name in names):
        parser.error(f"--diagnostics adds ablation runs to rows, and none of {', '.join(names)} has any (rows with "
                     f"ablations: {', '.join(n for n, m in METHODS.items() if m.ablations)})")
    full_ceilings = (not args.quick) if args.full_ceilings is None else args.full_ceilings
    if not full_ceilings and any(key.startswith("full.") for key in ceiling_overrides):
        parser.error("--ceiling-set full.*: the full fine-tune ceilings are off for this run "
                     f"({'--no-full-ceilings' if args.full_ceilings is False else '--quick turns them off'}): "
                     "add --full-ceilings")
    needed = sorted({m for name in names for m in METHODS[name].world_models})
    jobs = ceiling.available_cores() if args.ceiling_jobs is None else args.ceiling_jobs
    world = build_world(needed, quick=args.quick, seed=args.seed, root=args.world_root, overrides=world_overrides,
                        jobs=jobs)
    panel = world.builds["autoencoder"]["config"]["panel"]
    examples = {family: ev.examples(family, count, panel) for family in world_def.families("all")}
    with_ceiling = [name for name in names if ceilings and METHODS[name].ceiling]
    queue = ceiling_queue(args, with_ceiling, world, ceiling_families or ceiling.training_families(examples),
                          ceiling_overrides, jobs)
    results, contexts = {}, {}
    try:
        with queue.lane() if queue else contextlib.nullcontext():
            for name in with_ceiling if queue else []:  # trained beside the rows, on the other lanes
                queue.add(name, METHODS[name].ceiling, world,
                          ceiling_families or ceiling.training_families(examples), args.seed)
            for name in names:
                contexts[name] = MethodContext(world, args.seed, args.quick, out / name, examples, row_overrides,
                                               args.resume_runs, args.diagnostics)
                results[name] = run_row(parser, args, contexts[name], name)
                report = write_report(args, out, started, results, world, row_overrides, queue)  # a crash keeps rows
        for name in with_ceiling:
            b_primes = ceiling.add_ceilings(name, METHODS[name].ceiling, contexts[name], results[name],
                                            ceiling_families, args.ceiling_root, args.ceiling_steps,
                                            ceiling_overrides, args.full_ceilings, args.ceiling_rank, queue=queue)
            for kind, b_prime in b_primes.items():
                if b_prime:
                    path = ceiling_picture(contexts[name], OUTPUTS[name], b_prime, results[name], out, kind)
                    print(f"{name}: {kind} ceiling picture {path}")
            report = write_report(args, out, started, results, world, row_overrides, queue)
    finally:
        if queue is not None:
            queue.close()
    print_table(results)
    print(f"total time: {report['seconds']:.1f} s")
    return report


def ceiling_queue(args: argparse.Namespace, names: list[str], world: World, families: list[str],
                  overrides: dict[str, object], jobs: int) -> ceiling.CeilingQueue | None:
    """The queue that trains the ceiling runs ``names`` lack beside the rows (:class:`ceiling.CeilingQueue`), with
    at most ``jobs`` lanes, fewer when fewer runs are missing (the rows hold one); None when none is missing or
    ``jobs`` is 1 (the rows then keep every core)."""
    if jobs < 2:
        return None
    folders = {folder for method in names for folder in ceiling.missing_runs(
        method, METHODS[method].ceiling, world, families, args.seed, args.ceiling_root, args.ceiling_steps, overrides,
        args.full_ceilings, args.ceiling_rank)}
    if not folders:
        return None
    return ceiling.CeilingQueue(min(jobs, len(folders) + 1), args.ceiling_root, args.ceiling_steps, overrides,
                                args.full_ceilings, args.ceiling_rank)


def run_row(parser: argparse.ArgumentParser, args: argparse.Namespace, ctx: MethodContext, name: str) -> dict:
    """Train and sample one row in ``ctx.folder`` (afresh unless ``--resume-runs``), measure it and draw its
    picture; returns its measured result."""
    if not args.resume_runs:
        shutil.rmtree(ctx.folder, ignore_errors=True)
    try:
        output = METHODS[name].run(ctx)
    except RunSettingsChanged as err:
        parser.error(f"--resume-runs: {err}")
    OUTPUTS[name] = output
    result = measure(ctx, output)
    print(f"{name}: picture {picture(ctx, output, result, ctx.folder.parent / f'{name}.png')}")
    return result


def write_report(args: argparse.Namespace, out: Path, started: float, results: dict, world: World,
                 row_overrides: dict[str, object] | None = None, queue: ceiling.CeilingQueue | None = None) -> dict:
    report = {"seed": args.seed, "quick": args.quick, "seconds": round(time.monotonic() - started, 1),
              "methods": results}
    if queue is not None:
        report["lanes"] = {"lanes": queue.jobs, "threads_per_lane": queue.threads}
    if world.overrides:
        report["world_overrides"] = world.overrides
    if row_overrides:
        report["row_overrides"] = row_overrides
    if args.resume_runs:
        report["resumed_runs"] = True
    if args.diagnostics:
        report["diagnostics"] = True
    for path in filter(None, (args.json, out / "results.json")):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
