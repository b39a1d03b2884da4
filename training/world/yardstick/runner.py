"""The yardstick's runner (``python -m bench.analogy_world`` is its command): build the world, run each method's
row, measure B′ on held-out scenes of every family (training and held-out families).

Per family (mean absolute pixel error of B′ against the true B′, 0..1 units): the method, no edit (B′ = B), the
base backbone without the method, and the autoencoder floor (reconstruction of the true B′). Method-specific figures
go in ``extra`` (LoRWeB: ``routing_gap`` = within- minus across-family centred cosine similarity of the basis
coefficients, on training families, after training and at initialisation). Writes a table, a JSON file (the stable
interface below), and a picture grid per method (rows: families; columns A, A′, B, true B′, the method's B′).

Adding a method: write its row ``run(ctx: MethodContext) -> MethodOutput`` in ``training/world/yardstick/<method>.py``
(train its preset with its trainer in a subprocess on ``ctx.world``, then produce B′ and the base's B′ for
``ctx.examples``) and add a :class:`~training.world.yardstick.common.Method` to :data:`METHODS`, naming the world
models it needs (``ctx.world.path(name)`` gives their folders).
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import time
from pathlib import Path
from typing import Callable

import torch
from PIL import Image, ImageDraw

from analogy_core.analogy import to_uint8_images
from training.world import build_world
from training.world import evaluate as ev
from training.world import scenes as world_def
from training.world.yardstick import edit_transfer, loc, lorweb, regions
from training.world.yardstick.common import Method, MethodContext, MethodOutput

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
           "LoRWeB basis on the FLUX.1-Kontext-like world backbone, world CLIP queries"),
    Method("regions", ("autoencoder", "clip", "flux_kontext", "region_t5"), run_regions,
           "region predictor (world CLIP, world T5); B′ = LoRWeB's B′ inside the predicted region"),
    Method("loc", ("autoencoder", "clip", "instruct_pix2pix"), loc.run_loc,
           "LoRA of Change hypernetwork on the InstructPix2Pix-like world backbone, world CLIP tokens"),
    Method("edit_transfer", ("autoencoder", "flux_dev"), run_edit_transfer("edit_transfer"),
           "Edit Transfer LoRA on the FLUX.1-dev-like world backbone (instruction prompts), official clean-context "
           "sampler"),
    Method("edit_transfer_stock_inpaint", ("autoencoder", "flux_dev"), run_edit_transfer("edit_transfer_stock_inpaint"),
           "the same LoRA sampled with ComfyUI's stock re-noising inpainting"),
    Method("edit_transfer_textfree", ("autoencoder", "flux_dev"), run_edit_transfer("edit_transfer_textfree"),
           "Edit Transfer LoRA trained and sampled without text (EditTransfer++)"),
]
METHODS: dict[str, Method] = {m.name: m for m in _METHODS}


# ---------------------------------------------------------------------------------------------------------------------
# measuring, reporting


def measure(ctx: MethodContext, output: MethodOutput) -> dict:
    families = {}
    for family, items in ctx.examples.items():
        truth = ev.stack(items, "b_prime")
        families[family] = {
            "split": world_def.get_family(family).split,
            "error": round(float(ev.mae(output.b_prime[family], truth).mean()), 5),
            "no_edit": round(float(ev.mae(ev.stack(items, "b"), truth).mean()), 5),
            "base": round(float(ev.mae(output.base[family], truth).mean()), 5),
            "floor": round(float(ev.mae(output.reconstruct(truth), truth).mean()), 5)}
    extra = dict(output.extra)
    for split in ("train", "heldout"):
        rows = [r for r in families.values() if r["split"] == split]
        if rows:
            extra[f"mean_error_over_no_edit_{split}"] = round(sum(r["error"] / r["no_edit"] for r in rows) / len(rows),
                                                              4)
            extra[f"mean_base_over_no_edit_{split}"] = round(sum(r["base"] / r["no_edit"] for r in rows) / len(rows),
                                                             4)
    return {"families": families, "extra": extra}


def picture(ctx: MethodContext, output: MethodOutput, result: dict, path: Path) -> Path:
    """Rows = families (first example); columns A, A′, B, true B′, the method's B′; a label strip on the left."""
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
        draw.text((4, i * panel + 4), f"{family}\n({r['split']})\nerror {r['error']:.3f}\nno edit {r['no_edit']:.3f}",
                  fill="black")
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)
    return path


def print_table(results: dict) -> None:
    print(f"{'method':8s} {'family':24s} {'split':8s} {'error':>7s} {'no_edit':>8s} {'base':>7s} {'floor':>7s} "
          f"{'err/no_edit':>11s}")
    for method, result in results.items():
        for family, r in result["families"].items():
            print(f"{method:8s} {family:24s} {r['split']:8s} {r['error']:7.4f} {r['no_edit']:8.4f} {r['base']:7.4f} "
                  f"{r['floor']:7.4f} {r['error'] / r['no_edit']:11.3f}")
        for key, value in result["extra"].items():
            print(f"{method:8s} extra {key} = {value}")


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated, of {', '.join(METHODS)}")
    parser.add_argument("--seed", type=int, default=0, help="world, training and sampling seed")
    parser.add_argument("--quick", action="store_true", help="the CI-sized world and runs")
    parser.add_argument("--json", type=Path, help="write the results here (also written to --out)")
    parser.add_argument("--out", type=Path, help="output folder (default outputs/bench_world[_quick]_s<seed>)")
    parser.add_argument("--world-root", type=Path, help="parent folder of cached worlds (default outputs/world)")
    parser.add_argument("--examples", type=int, help="held-out examples per family (default 16, quick 4)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    names = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in names if m not in METHODS]
    if unknown:
        parser.error(f"unknown method(s) {unknown}; available: {', '.join(METHODS)}")
    started = time.monotonic()
    out = args.out or REPO / "outputs" / f"bench_world{'_quick' if args.quick else ''}_s{args.seed}"
    count = args.examples or (4 if args.quick else 16)
    needed = sorted({m for name in names for m in METHODS[name].world_models})
    world = build_world(needed, quick=args.quick, seed=args.seed, root=args.world_root)
    panel = world.builds["autoencoder"]["config"]["panel"]
    examples = {family: ev.examples(family, count, panel) for family in world_def.families("all")}
    results = {}
    for name in names:
        folder = out / name
        shutil.rmtree(folder, ignore_errors=True)
        ctx = MethodContext(world, args.seed, args.quick, folder, examples)
        output = METHODS[name].run(ctx)
        OUTPUTS[name] = output
        results[name] = measure(ctx, output)
        print(f"{name}: picture {picture(ctx, output, results[name], out / f'{name}.png')}")
        report = write_report(args, out, started, results)  # after every method: a late crash keeps the rows
    print_table(results)
    print(f"total time: {report['seconds']:.1f} s")
    return report


def write_report(args: argparse.Namespace, out: Path, started: float, results: dict) -> dict:
    report = {"seed": args.seed, "quick": args.quick, "seconds": round(time.monotonic() - started, 1),
              "methods": results}
    for path in filter(None, (args.json, out / "results.json")):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
