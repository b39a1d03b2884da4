"""How much of a fully fine-tuned edit fits LoRA of Change's LoRA? Take the UNet a LoC full fine-tune ceiling wrote
(``loc_full-<family>-<key>`` in a world's ``ceilings/``), keep only its change to the weights H patches (q, k, v and
out of every attention layer), cut each change to its best rank-r approximation (SVD; Eckart-Young), and score the
UNet that results on the ceiling's own held-out scenes, sampler and seed with the yardstick's cell metric.

    OMP_NUM_THREADS=1 .venv/bin/python -m bench.loc_rank_probe \\
        --run outputs/world/<world>/ceilings/loc_full-hflip-<key> --ranks 1,2,4,8,16,32 --json probe.json

Rows of the report: ``base`` (the world's UNet), ``fine_tuned`` (every weight the run changed), ``sites`` (only the
changes at H's sites, at full rank; every other weight back to the base's) and ``sites_rank_<r>``. A LoRA can hold
``sites_rank_<r>`` exactly, so a row that draws the edit shows that rank r at H's sites suffices (a rank-r LoRA
trained for it that does worse is short of optimisation, not of capacity). The cut is only a lower bound on what
rank r can do: where it draws nothing, this fine-tune's solution needs more than rank r, but a LoRA trained at rank
r may find another one. Where ``sites`` does not draw the edit either, the fine-tune put it in other weights.
``energy``: the share of the sites' change (squared Frobenius norm, pooled over the projections) the cut keeps.
"""

from __future__ import annotations

import argparse
import json
import re
import time
from pathlib import Path

import torch

from analogy_core.files import check_state_dict, read_safetensors
from analogy_core.layouts import layout_of_diffusers_model
from analogy_core.loc import attention_targets
from bench.row_curve import write_report
from training.loc.config import UNET_FILE
from training.loc.ip2p import load_ip2p
from training.loc.task import edit_images
from training.world import evaluate as ev
from training.world import metrics
from training.world.registry import open_world
from training.world.yardstick.common import RunMismatch, world_of_spec

_ONE_FAMILY = re.compile(r"world:families=(\w+)")


def low_rank(delta: torch.Tensor, rank: int) -> tuple[torch.Tensor, float]:
    """(the best rank-``rank`` approximation of the matrix ``delta`` in Frobenius norm, the share of ‖delta‖² it
    keeps); a rank at or above the matrix's keeps it whole. Computed in float64, returned in ``delta``'s dtype."""
    if delta.dim() != 2 or rank < 1:
        raise ValueError(f"low_rank needs a matrix and a rank >= 1, got shape {tuple(delta.shape)}, rank {rank}")
    u, s, vh = torch.linalg.svd(delta.double(), full_matrices=False)
    total = float((s * s).sum())
    kept = s[:rank]
    approximation = (u[:, :rank] * kept) @ vh[:rank]
    return approximation.to(delta.dtype), (float((kept * kept).sum()) / total if total > 0 else 1.0)


def site_weights(unet) -> list[str]:
    """State-dict keys of the weights H patches: every attention layer's q, k, v and out projection."""
    return [f"{path}.weight" for target in attention_targets(layout_of_diffusers_model(unet))
            for path in target.projection_paths()]


def variant_state(base: dict[str, torch.Tensor], tuned: dict[str, torch.Tensor], sites: list[str],
                  rank: int | None) -> tuple[dict[str, torch.Tensor], float]:
    """The base state with the fine-tune's change at ``sites`` only, each cut to ``rank`` (None: full rank); and the
    share of the sites' squared change the cut keeps (pooled over the sites)."""
    state = dict(base)
    kept = total = 0.0
    for key in sites:
        delta = tuned[key] - base[key]
        size = float(delta.double().pow(2).sum())
        approximation, share = (delta, 1.0) if rank is None else low_rank(delta, rank)
        state[key] = base[key] + approximation
        kept, total = kept + share * size, total + size
    return state, (kept / total if total > 0 else 1.0)


def run_settings(run: Path) -> tuple[dict, str]:
    """(the run's settings, its one family) from a full fine-tune ceiling's folder; refuses anything else."""
    try:
        settings = json.loads((run / "config.json").read_text())
    except (OSError, ValueError) as error:
        raise RunMismatch(f"{run}: no readable config.json of a training run ({error})") from error
    if not settings.get("full_finetune"):
        raise RunMismatch(f"{run} is not a full fine-tune run (its config has no full_finetune: true)")
    match = _ONE_FAMILY.fullmatch(str(settings.get("data", "")))
    if not match:
        raise RunMismatch(f"{run} was not trained on one world family (data {settings.get('data')!r})")
    return settings, match[1]


def score(backbone, items: list, steps: int, seed: int) -> dict[str, float | None]:
    truth, b = ev.stack(items, "b_prime"), ev.stack(items, "b")
    b_prime = edit_images(backbone, None, b, steps, seed)
    return {**metrics.cell_scores(b_prime, truth, b), "error": round(float(ev.mae(b_prime, truth).mean()), 5)}


@torch.no_grad()
def probe(run: Path, ranks: list[int], count: int | None = None) -> dict:
    settings, family = run_settings(run)
    world = open_world(world_of_spec(settings["backbone"]))
    panel = world.builds["autoencoder"]["config"]["panel"]
    items = ev.examples(family, count or ev.scenes_per_family(world.quick), panel)
    steps, seed = int(settings["sample_steps"]), int(settings["seed"])
    backbone = load_ip2p(world.spec)
    base = {k: v.clone() for k, v in backbone.unet.state_dict().items()}
    tensors, _ = read_safetensors(run / UNET_FILE)
    tuned = check_state_dict(tensors, base)
    sites = site_weights(backbone.unet)
    changed = [k for k in base if not torch.equal(base[k], tuned[k])]
    rows: dict[str, dict] = {"base": score(backbone, items, steps, seed)}
    backbone.unet.load_state_dict(tuned)
    rows["fine_tuned"] = score(backbone, items, steps, seed)
    if rows["fine_tuned"] == rows["base"]:
        raise RunMismatch(f"{run}: the fine-tuned UNet samples exactly as the base; nothing to probe")
    for rank in [None, *ranks]:
        state, energy = variant_state(base, tuned, sites, rank)
        backbone.unet.load_state_dict(state)
        name = "sites" if rank is None else f"sites_rank_{rank}"
        rows[name] = {**score(backbone, items, steps, seed), "energy": round(energy, 4)}
        print(f"{name:16s} {metrics.format_scores(rows[name])}  energy {energy:.3f}", flush=True)
    return {"run": str(run), "family": family, "world": str(world.root), "examples": len(items),
            "sample_steps": steps, "seed": seed, "changed_tensors": len(changed),
            "changed_outside_sites": len(set(changed) - set(sites)),
            "site_projections": len(sites), "rows": rows}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", type=Path, required=True, help="a loc_full-<family>-<key> ceiling folder")
    parser.add_argument("--ranks", default="1,2,4,8,16,32", help="comma-separated ranks to cut the change to")
    parser.add_argument("--examples", type=int, help="held-out scenes (default: the yardstick's, 4 quick / 16)")
    parser.add_argument("--json", type=Path, help="write the report here")
    args = parser.parse_args(argv)
    try:
        ranks = [int(r) for r in args.ranks.split(",")]
    except ValueError:
        parser.error(f"--ranks: comma-separated whole numbers, got {args.ranks!r}")
    if any(r < 1 for r in ranks):
        parser.error(f"--ranks: every rank is at least 1, got {args.ranks!r}")
    if args.examples is not None and args.examples < 1:
        parser.error(f"--examples: at least 1, got {args.examples}")
    started = time.monotonic()
    report = probe(args.run, ranks, args.examples)
    report["seconds"] = round(time.monotonic() - started, 1)
    write_report(args.json, report)
    return report


if __name__ == "__main__":
    main()
