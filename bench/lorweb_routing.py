"""Which edits LoRWeB's router tells apart, family by family of the analogy world: a trained basis's mixing
coefficients on every family's held-out pairs, and what the query encoder sees of each edit before any basis.

    .venv/bin/python -m bench.lorweb_routing --run outputs/bench_world_s0/lorweb/train --json routing.json

Per family (16 held-out scenes, 4 on the quick world; the yardstick's scenes):

* ``similarity``: the mean centred cosine similarity of its pairs' coefficient vectors (every layer's mixing weights
  joined) with those of each family — itself (``within``, pairs of distinct scenes) and every other; the yardstick's
  routing gap is ``within`` minus the mean across the training families. ``nearest``: the other family it is routed
  most like.
* ``effective_entries``: how many of the basis's entries a mix spreads over, exp(entropy) of each layer's weights,
  averaged over layers and pairs (1: one entry; N: all equally).
* ``edit_visibility``: how far the query encoder's embedding of A′ lies from A's, in units of the mean distance
  between two different scenes' embeddings (0: the encoder does not see the edit, so neither can the router).

The world and seed are the run's own (its ``config.json``), as in :mod:`bench.row_curve`.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from analogy_core.lorweb.basis import load_basis
from bench.row_curve import run_config, run_world, shown
from training.backbone import load_query_encoder
from training.lorweb.task import BASIS_FILE
from training.world import evaluate as ev
from training.world import scenes as world_def
from training.world.yardstick.lorweb import CURVE, centred_cosine


def family_similarity(coefficients: torch.Tensor, labels: list[str]) -> dict[str, dict[str, float]]:
    """``[f][g]``: mean centred cosine between the coefficient vectors [E, D] of family f's and g's examples (for f = g,
    distinct examples only)."""
    sim = centred_cosine(coefficients)
    names = list(dict.fromkeys(labels))
    member = {f: torch.tensor([label == f for label in labels]) for f in names}
    table: dict[str, dict[str, float]] = {}
    for f in names:
        table[f] = {}
        for g in names:
            block = sim[member[f]][:, member[g]]
            if f == g:
                block = block[~torch.eye(len(block), dtype=torch.bool)]
            table[f][g] = float(block.mean())
    return table


def effective_entries(weights: torch.Tensor) -> float:
    """exp(entropy) of mixing weights [..., N] (each row sums to 1), averaged over the leading dimensions."""
    entropy = -(weights * weights.clamp_min(1e-12).log()).sum(dim=-1)
    return float(entropy.exp().mean())


def edit_visibility(a: torch.Tensor, a_prime: torch.Tensor) -> float:
    """Mean ‖e(A′) − e(A)‖ over the pairs, over the mean ‖e(A_i) − e(A_j)‖ between distinct scenes (embeddings [E, D],
    E ≥ 2)."""
    if len(a) < 2:
        raise ValueError(f"edit visibility needs at least 2 scenes to measure the scenes' spread, got {len(a)}")
    spread = torch.cdist(a.double(), a.double())
    spread = spread[~torch.eye(len(a), dtype=torch.bool)].mean()
    return float((a_prime.double() - a.double()).norm(dim=1).mean() / spread)


def measure_routing(basis, encoder, examples: dict[str, list]) -> dict[str, dict]:
    """Every family's record (module docstring) for ``basis`` and the query ``encoder`` on ``examples``."""
    vectors, labels, entries, visibility = [], [], {}, {}
    with torch.no_grad():
        for family, items in examples.items():
            embedding = encoder.encode(ev.stack(items, "a"), ev.stack(items, "a_prime"), ev.stack(items, "b"))
            weights = list(basis.coefficients(basis.settings.query(embedding)).values())
            entries[family] = effective_entries(torch.stack(weights))
            visibility[family] = edit_visibility(embedding.image_embeds["a"], embedding.image_embeds["a_prime"])
            vectors.append(torch.cat(weights, dim=1))
            labels += [family] * len(items)
    table = family_similarity(torch.cat(vectors), labels)
    records = {}
    for family, row in table.items():
        nearest = max((g for g in row if g != family), key=row.__getitem__)
        records[family] = {"split": world_def.get_family(family).split, "within": round(row[family], 4),
                           "nearest": nearest, "nearest_similarity": round(row[nearest], 4),
                           "effective_entries": round(entries[family], 2),
                           "edit_visibility": round(visibility[family], 4),
                           "similarity": {g: round(v, 4) for g, v in row.items()}}
    return records


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", type=Path, required=True, help="a LoRWeB training run's output folder")
    parser.add_argument("--basis", type=Path, help=f"the basis file to read (default: the run's {BASIS_FILE})")
    parser.add_argument("--examples", type=int, help="held-out scenes per family (default 16, quick world 4)")
    parser.add_argument("--json", type=Path, help="write the report here")
    args = parser.parse_args(argv)
    started = time.monotonic()
    basis_file = args.basis or args.run / BASIS_FILE
    if not basis_file.is_file():
        raise SystemExit(f"{basis_file}: no basis file — expected a LoRWeB run's {BASIS_FILE} (or pass --basis)")
    config = run_config(args.run)
    world = run_world("lorweb", CURVE, config)
    panel = world.builds["autoencoder"]["config"]["panel"]
    count = args.examples or (4 if world.quick else 16)
    examples = {family: ev.examples(family, count, panel) for family in world_def.families("all")}
    encoder = load_query_encoder(config.get("query_encoder", world.spec))  # the encoder the run trained with
    families = measure_routing(load_basis(basis_file), encoder, examples)
    for family, r in families.items():
        print(f"{family:24s} {r['split']:8s} within {r['within']:6.3f}  nearest {r['nearest']:24s} "
              f"{r['nearest_similarity']:6.3f}  entries {r['effective_entries']:5.2f}  "
              f"edit visibility {r['edit_visibility']:.3f}")
    report = {"run": shown(args.run), "basis": basis_file.name, "world": world.root.name, "examples": count,
              "families": families, "seconds": round(time.monotonic() - started, 1)}
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
