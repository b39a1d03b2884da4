"""Is LoRA of Change's hypernetwork H editing each pair, or giving every pair one shared edit? Take a LoC run (its
``loc_hypernetwork.safetensors``, and its trained image encoder when the run trained one), generate the LoRA of
every held-out pair of the training families, and split each update into the part every pair gets alike — M, the
mean ΔW over those pairs — and the rest. Then score, with the row's sampler, steps and seed and the world's cell
metric, B′ from H(A, A′), from H(A, A′) − M and from M alone. M is built exactly, as extra LoRA factors (every
pair's U_A, and its U_B times ±1/N), so every B′ comes from the same patched UNet code.

    OMP_NUM_THREADS=1 .venv/bin/python -m bench.loc_shared_edit --run <out>/loc/train --examples 16 \\
        [--step N] --json F [--picture P.png]

``--picture`` draws one row per training family (its first held-out scene): A, A′, B, the true B′, H's B′ and M
alone's B′, labelled with the family's figures over all its scenes — what H draws, to look at.

Reading it: where H − M keeps B (edited 0, kept 1) while H draws something, and M alone draws what H draws, what H
draws is the shared edit, not the pair's; ``update_dependence`` is the share of ΔW that varies with the pair at all, ``family_share_updates``
the share of that variation lying between the families (both as the row's ``extra``).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from PIL import Image, ImageDraw

from analogy_core.analogy import to_uint8_images
from analogy_core.loc import LoRAFactors, generated_updates, pair_dependence
from bench.row_curve import write_report
from training import checkpoints as ckpt
from training.backbone import load_query_encoder
from training.loc.config import HYPERNETWORK_FILE
from training.loc.ip2p import load_ip2p
from training.loc.task import edit_images
from training.world import evaluate as ev
from training.world import metrics
from training.world import scenes as world
from training.world.registry import open_world
from training.world.yardstick.common import RunMismatch, world_of_spec
from training.world.yardstick.loc import family_share, family_share_chance, load_run_model, tokens


def shared_part(pool: LoRAFactors, batch: int, sign: float = 1.0) -> LoRAFactors:
    """``sign`` times the mean update of ``pool``'s samples, for each of ``batch`` samples, exactly: per projection
    every pool sample's U_A, and its U_B times sign/N (rank r·N). ``pool``'s scales must be 1."""
    if not torch.all(pool.scale == 1):
        raise ValueError("the shared part needs factors of scale 1 (H's own output)")
    n, layers = pool.batch_size, {}
    for path, (pool_down, pool_up) in pool.layers.items():
        _, r, width = pool_down.shape
        down = pool_down.reshape(1, n * r, width).expand(batch, -1, -1)
        up = (pool_up.permute(1, 0, 2).reshape(1, pool_up.shape[1], n * r) * (sign / n)).expand(batch, -1, -1)
        layers[path] = (down, up)
    return LoRAFactors(layers, torch.ones(batch, dtype=pool.scale.dtype))


def without_shared_part(factors: LoRAFactors, pool: LoRAFactors) -> LoRAFactors:
    """``factors`` with the mean update of ``pool``'s samples subtracted from every sample, exactly: per projection,
    U_A gains every pool sample's U_A and U_B every pool sample's U_B times −1/N (rank r·(N + 1)). Scales must be 1."""
    if not torch.all(factors.scale == 1):
        raise ValueError("without_shared_part needs factors of scale 1 (H's own output)")
    shared = shared_part(pool, factors.batch_size, -1.0)
    layers = {path: (torch.cat([down, shared.layers[path][0]], dim=1), torch.cat([up, shared.layers[path][1]], dim=2))
              for path, (down, up) in factors.layers.items()}
    return LoRAFactors(layers, factors.scale)


def score(backbone, factors: LoRAFactors, items: list, steps: int, seed: int,
          drawn: list | None = None) -> dict[str, float | None]:
    """The cell scores and error of B′ sampled with ``factors``; B′ itself is appended to ``drawn`` when given."""
    truth, b = ev.stack(items, "b_prime"), ev.stack(items, "b")
    b_prime = edit_images(backbone, factors, b, steps, seed)
    if drawn is not None:
        drawn.append(b_prime)
    return {**metrics.cell_scores(b_prime, truth, b), "error": round(float(ev.mae(b_prime, truth).mean()), 5)}


LABEL_WIDTH = 230


def draw_picture(examples: dict[str, list], drawn: dict[str, tuple[torch.Tensor, torch.Tensor]],
                 rows: dict[str, dict], path: Path) -> Path:
    """One row per family (its first scene): A, A′, B, true B′, H's B′, M alone's B′ (``drawn[family]`` holds that
    scene's two B′, [H, W, 3] in 0..1), with the family's H and M figures in a label strip on the left."""
    lines = []
    for family, items in examples.items():
        ex, (h, shared) = items[0], drawn[family]
        lines.append(torch.cat([ex.a, ex.a_prime, ex.b, ex.b_prime, h, shared], dim=1))
    grid = to_uint8_images(torch.cat(lines, dim=0)[None])[0]
    panel = next(iter(examples.values()))[0].a.shape[0]
    canvas = Image.new("RGB", (grid.shape[1] + LABEL_WIDTH, grid.shape[0]), "white")
    canvas.paste(Image.fromarray(grid), (LABEL_WIDTH, 0))
    pen = ImageDraw.Draw(canvas)
    for i, family in enumerate(examples):
        r = rows[family]
        pen.text((4, i * panel + 2), f"{family}\nH: {metrics.format_scores(r['h'])}\n"
                 f"M alone: {metrics.format_scores(r['shared_only'])}\nA A' B B'(true) B'(H) B'(M)", fill="black")
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)
    return path


def run_settings(run: Path) -> dict:
    try:
        settings = json.loads((run / "config.json").read_text())
    except (OSError, ValueError) as error:
        raise RunMismatch(f"{run}: no readable config.json of a training run ({error})") from error
    if settings.get("plain_lora") or settings.get("full_finetune") or not (run / HYPERNETWORK_FILE).is_file():
        raise RunMismatch(f"{run} is not a LoC hypernetwork run (no {HYPERNETWORK_FILE}, or a ceiling's run)")
    return settings


def means(rows: dict[str, dict], name: str) -> dict[str, float]:
    edited = [r[name]["edited_cells"] for r in rows.values()]
    kept = [r[name]["kept_cells"] for r in rows.values() if r[name]["kept_cells"] is not None]
    return {"edited_cells": round(sum(edited) / len(edited), 4), "kept_cells": round(sum(kept) / len(kept), 4)}


def hypernetwork_file(run: Path, step: int | None) -> Path:
    """The run's final H, or its step export ``step`` (kept with ``keep_exports``)."""
    if step is None:
        return run / HYPERNETWORK_FILE
    exports = dict(ckpt.step_exports(run, HYPERNETWORK_FILE))
    if step not in exports:
        kept = ", ".join(map(str, exports)) or "none (train with keep_exports=true)"
        raise RunMismatch(f"{run} kept no H of step {step}; its step exports: {kept}")
    return exports[step]


@torch.no_grad()
def probe(run: Path, count: int | None = None, step: int | None = None, picture: Path | None = None) -> dict:
    settings = run_settings(run)
    path = hypernetwork_file(run, step)
    world_folder = open_world(world_of_spec(settings["backbone"]))
    panel = world_folder.builds["autoencoder"]["config"]["panel"]
    steps, seed = int(settings["sample_steps"]), int(settings["seed"])
    trains_encoder = float(settings.get("image_encoder_learning_rate", 0.0)) > 0
    backbone = load_ip2p(world_folder.spec)
    hypernetwork, encoder = load_run_model(path, None, load_query_encoder(world_folder.spec), trains_encoder)
    examples = {f: ev.examples(f, count or ev.scenes_per_family(world_folder.quick), panel)
                for f in world.families("train")}
    generated = {f: hypernetwork(*tokens(encoder, items)) for f, items in examples.items()}
    pool = LoRAFactors({p: tuple(torch.cat([g.layers[p][i] for g in generated.values()]) for i in (0, 1))
                        for p in next(iter(generated.values())).layers},
                       torch.cat([g.scale for g in generated.values()]))
    updates = generated_updates(pool)
    labels = [f for f, items in examples.items() for _ in items]
    rows: dict[str, dict] = {}
    drawn: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for family, items in examples.items():
        h: list[torch.Tensor] = []
        shared: list[torch.Tensor] = []
        rows[family] = {"h": score(backbone, generated[family], items, steps, seed, h),
                        "h_minus_shared": score(backbone, without_shared_part(generated[family], pool), items,
                                                steps, seed),
                        "shared_only": score(backbone, shared_part(pool, len(items)), items, steps, seed, shared),
                        "no_edit_error": round(float(ev.mae(ev.stack(items, "b"), ev.stack(items, "b_prime"))
                                                     .mean()), 5)}
        if picture is not None:
            drawn[family] = (h[0][0], shared[0][0])    # the picture shows the family's first scene only
        print(f"{family:22s} H {metrics.format_scores(rows[family]['h'])}   H − M "
              f"{metrics.format_scores(rows[family]['h_minus_shared'])}   M "
              f"{metrics.format_scores(rows[family]['shared_only'])}", flush=True)
    if picture is not None:
        draw_picture(examples, drawn, rows, picture)
    return {"run": str(run), "hypernetwork": path.name, "world": str(world_folder.root),
            "examples": len(labels) // len(examples),
            "sample_steps": steps, "seed": seed, "image_encoder_trained": trains_encoder,
            "update_dependence": round(pair_dependence(updates), 4),
            "family_share_updates": (None if (shared := family_share(updates, labels)) is None
                                     else round(shared, 4)),
            "family_share_chance": round(family_share_chance(labels), 4),
            "mean_h": means(rows, "h"), "mean_h_minus_shared": means(rows, "h_minus_shared"),
            "mean_shared_only": means(rows, "shared_only"), "families": rows}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", type=Path, required=True, help="a LoC training run folder (config.json and H)")
    parser.add_argument("--examples", type=int, help="held-out scenes per family (default: the yardstick's)")
    parser.add_argument("--step", type=int, help="score the run's step export of this step (default: its final H)")
    parser.add_argument("--json", type=Path, help="write the report here")
    parser.add_argument("--picture", type=Path, help="draw A, A′, B, true B′, H's B′ and M's B′ per family here (PNG)")
    args = parser.parse_args(argv)
    if args.examples is not None and args.examples < 1:
        parser.error(f"--examples: at least 1, got {args.examples}")
    started = time.monotonic()
    report = probe(args.run, args.examples, args.step, args.picture)
    report["seconds"] = round(time.monotonic() - started, 1)
    print(f"mean over the training families: H {report['mean_h']}, H − M {report['mean_h_minus_shared']}, "
          f"M alone {report['mean_shared_only']}; "
          f"update dependence {report['update_dependence']}, family share {report['family_share_updates']}")
    write_report(args.json, report)
    return report


if __name__ == "__main__":
    main()
