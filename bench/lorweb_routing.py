"""Which edits LoRWeB's router tells apart, family by family of the analogy world: a trained basis's mixing
coefficients on every family's held-out pairs, and what the query encoder sees of each edit before any basis.

    .venv/bin/python -m bench.lorweb_routing --run outputs/bench_world_s0/lorweb/train --json routing.json

Per family (16 held-out scenes, 4 on the quick world; the yardstick's scenes):

* ``similarity``: the mean centred cosine similarity of its pairs' coefficient vectors (every layer's mixing weights
  joined; centred over every family's pairs) with those of each family — itself (``within``, pairs of distinct
  scenes) and every other. ``nearest``: the other family it is routed most like.
* ``effective_entries``: how many of the basis's entries a mix spreads over, exp(entropy) of each layer's weights,
  averaged over layers and pairs (1: one entry; N: all equally; ``null`` for a basis whose weights are not a softmax
  over the entries, e.g. tanh mixing).
* ``edit_visibility``: how far the query encoder's embedding of A′ lies from A's, in units of the mean distance
  between two different scenes' embeddings (0: the encoder does not see the edit, so neither can the router).

And over the families, the yardstick's own two figures from the same coefficients: ``routing_gap`` (training
families, centred over them) and ``routing_gap_all_families`` (every family), equal to the row's JSON for the run's
final basis.

The world and seed are the run's own (its ``config.json``), as in :mod:`bench.row_curve`.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from analogy_core.encoders import ImageEncoder
from analogy_core.lorweb.basis import LoRABasis, load_basis
from bench.row_curve import (
    held_out_examples,
    run_config,
    run_world,
    shown,
    write_report,
)
from training.backbone import load_query_encoder
from training.lorweb.task import BASIS_FILE
from training.world import scenes as world_def
from training.world.yardstick.lorweb import (
    CURVE,
    centred_cosine,
    coefficient_vectors,
    embed_families,
    routing,
)


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


def effective_entries(weights: torch.Tensor) -> float | None:
    """exp(entropy) of mixing weights [..., N], averaged over the leading dimensions; None unless every row is a
    distribution over the entries (non-negative, summing to 1)."""
    if (weights < 0).any() or not torch.allclose(weights.sum(dim=-1), torch.ones(()), atol=1e-4):
        return None
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


def measure_routing(basis: LoRABasis, encoder: ImageEncoder, examples: dict[str, list]) -> dict:
    """``{"families": {family: record}, "routing_gap", "routing_gap_all_families"}`` (module docstring) for ``basis``
    mixed by the query ``encoder`` on ``examples`` (family -> world examples, at least 2 per family)."""
    if small := [f for f, items in examples.items() if len(items) < 2]:
        raise ValueError(f"routing needs at least 2 examples per family (within-family pairs); {', '.join(small)} "
                         "has fewer")
    with torch.no_grad():
        embeddings = embed_families(encoder, examples)
        queries = {family: basis.settings.query(embedding) for family, embedding in embeddings.items()}
        coefficients, labels = coefficient_vectors(basis, queries)
    rows = {f: torch.tensor([label == f for label in labels]) for f in examples}
    families = {}
    for family, row in family_similarity(coefficients, labels).items():
        nearest = max((g for g in row if g != family), key=row.__getitem__)
        # the family's weights as [examples, layers, entries]: a distribution over the entries per layer
        entries = effective_entries(coefficients[rows[family]].view(len(examples[family]), -1, basis.num_entries))
        visibility = edit_visibility(embeddings[family].image_embeds["a"], embeddings[family].image_embeds["a_prime"])
        families[family] = {
            "split": world_def.get_family(family).split, "within": round(row[family], 4), "nearest": nearest,
            "nearest_similarity": round(row[nearest], 4),
            "effective_entries": None if entries is None else round(entries, 2),
            "edit_visibility": round(visibility, 4), "similarity": {g: round(v, 4) for g, v in row.items()}}
    train = torch.tensor([world_def.get_family(label).split == "train" for label in labels])
    train_labels = [label for label, keep in zip(labels, train.tolist()) if keep]
    return {"families": families,
            "routing_gap": round(routing(coefficients[train], train_labels)["gap"], 4) if len(set(train_labels)) > 1
            else None,
            "routing_gap_all_families": round(routing(coefficients, labels)["gap"], 4)}


def main(argv: list[str] | None = None) -> dict:
    """The command line (module docstring): measure a run's basis, print one line per family, write the JSON."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", type=Path, required=True, help="a LoRWeB training run's output folder")
    parser.add_argument("--basis", type=Path, help=f"the basis file to read (default: the run's {BASIS_FILE})")
    parser.add_argument("--examples", type=int, help="held-out scenes per family, at least 2 (default 16, quick 4)")
    parser.add_argument("--json", type=Path, help="write the report here")
    args = parser.parse_args(argv)
    started = time.monotonic()
    basis_file = args.basis or args.run / BASIS_FILE
    if not basis_file.is_file():
        raise SystemExit(f"{basis_file}: no basis file — expected a LoRWeB run's {BASIS_FILE} (or pass --basis)")
    if args.examples is not None and args.examples < 2:
        raise SystemExit(f"--examples must be at least 2 (within-family pairs), got {args.examples}")
    config = run_config(args.run)
    world = run_world("lorweb", CURVE, config)
    count, examples = held_out_examples(world, args.examples)
    basis = load_basis(basis_file)
    # the query encoder the run trained with (a world run's is the world's CLIP, as the yardstick's row loads it)
    measured = measure_routing(basis, load_query_encoder(config.get("query_encoder", world.spec)), examples)
    for family, record in measured["families"].items():
        entries = "-" if record["effective_entries"] is None else f"{record['effective_entries']:5.2f}"
        print(f"{family:24s} {record['split']:8s} within {record['within']:6.3f}  nearest {record['nearest']:24s} "
              f"{record['nearest_similarity']:6.3f}  entries {entries}  edit visibility {record['edit_visibility']:.3f}")
    print(f"routing gap {measured['routing_gap']}, all families {measured['routing_gap_all_families']}")
    report = {"run": shown(args.run), "basis": basis_file.name, "basis_step": basis.metadata.get("analogy.step"),
              "basis_entries": basis.num_entries, "world": world.root.name, "examples": count, **measured,
              "seconds": round(time.monotonic() - started, 1)}
    write_report(args.json, report)
    return report


if __name__ == "__main__":
    main()
