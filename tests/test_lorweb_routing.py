"""``bench.lorweb_routing``: per-family routing of a trained LoRWeB basis and the query encoder's view of each edit.
The maths against hand-made cases and brute force; the tool against the yardstick's own routing gap for the same run
(the session's quick LoRWeB row)."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from world_fixtures import quick_bench

from bench import lorweb_routing as lr
from training.world import evaluate as ev
from training.world import scenes as world_def
from training.world.yardstick.lorweb import routing


def brute_similarity(vectors: torch.Tensor, labels: list[str], f: str, g: str) -> float:
    """Mean centred cosine between f's and g's examples, pair by pair."""
    centred = vectors.double() - vectors.double().mean(dim=0)
    values = [float(torch.nn.functional.cosine_similarity(centred[i], centred[j], dim=0))
              for i, a in enumerate(labels) for j, b in enumerate(labels) if a == f and b == g and i != j]
    return sum(values) / len(values)


def test_family_similarity_matches_a_pair_by_pair_reference():
    gen = torch.Generator().manual_seed(0)
    labels = ["x"] * 3 + ["y"] * 4 + ["z"] * 2
    vectors = torch.randn(len(labels), 6, generator=gen)
    vectors[:3] += torch.tensor([10.0, 0, 0, 0, 0, 0])  # x's examples share a direction: a real within-family pull
    table = lr.family_similarity(vectors, labels)
    assert table["x"]["x"] > 0.5 > table["x"]["y"]
    for f in "xyz":
        for g in "xyz":
            assert table[f][g] == pytest.approx(brute_similarity(vectors, labels, f, g), abs=1e-9), (f, g)


def test_the_yardsticks_gap_is_the_tables_within_minus_across_for_equal_families():
    gen = torch.Generator().manual_seed(1)
    labels = [f for f in "abc" for _ in range(4)]
    vectors = torch.randn(len(labels), 5, generator=gen)
    vectors[4:8] -= 2.0
    table, gap = lr.family_similarity(vectors, labels), routing(vectors, labels)
    within = sum(table[f][f] for f in "abc") / 3
    across = sum(table[f][g] for f in "abc" for g in "abc" if f != g) / 6
    assert gap["within"] == pytest.approx(within) and gap["across"] == pytest.approx(across)
    assert gap["gap"] > 0.1


def test_effective_entries_counts_the_entries_a_mix_spreads_over():
    assert lr.effective_entries(torch.full((2, 3, 8), 1 / 8)) == pytest.approx(8)
    assert lr.effective_entries(torch.eye(5)) == pytest.approx(1)
    assert lr.effective_entries(torch.tensor([[0.5, 0.5, 0.0, 0.0]])) == pytest.approx(2)
    # averaged over rows: one row on one entry, one on four
    assert lr.effective_entries(torch.tensor([[1.0, 0, 0, 0], [0.25] * 4])) == pytest.approx(2.5)


def test_edit_visibility_is_the_edits_move_in_units_of_the_scenes_spread():
    scenes = torch.eye(4)  # four scenes, each pair sqrt(2) apart
    assert lr.edit_visibility(scenes, scenes) == 0
    shift = torch.tensor([0.0, 0.0, 0.0, 0.0, 0.7])
    assert lr.edit_visibility(torch.cat([scenes, torch.zeros(4, 1)], 1), torch.cat([scenes, torch.zeros(4, 1)], 1)
                              + shift) == pytest.approx(0.7 / 2 ** 0.5)
    with pytest.raises(ValueError, match="at least 2 scenes"):
        lr.edit_visibility(scenes[:1], scenes[:1])


def test_the_tool_reproduces_the_rows_routing_gap_on_a_trained_run(tmp_path):
    report, out = quick_bench()
    run = out / "lorweb" / "train"
    config = lr.run_config(run)
    world = lr.run_world("lorweb", lr.CURVE, config)
    panel = world.builds["autoencoder"]["config"]["panel"]
    train = [f for f in world_def.families("all") if world_def.get_family(f).split == "train"]
    examples = {f: ev.examples(f, 4, panel) for f in train}  # the yardstick's quick scenes
    records = lr.measure_routing(lr.load_basis(run / lr.BASIS_FILE), lr.load_query_encoder(config["query_encoder"]),
                                 examples)
    within = sum(records[f]["within"] for f in train) / len(train)
    across = sum(records[f]["similarity"][g] for f in train for g in train if f != g) / (len(train) * (len(train) - 1))
    assert within - across == pytest.approx(report["methods"]["lorweb"]["extra"]["routing_gap"], abs=1e-3)
    for f, r in records.items():
        assert r["nearest"] != f and r["nearest_similarity"] == max(v for g, v in r["similarity"].items() if g != f)
        assert 1 <= r["effective_entries"] <= 32 and r["edit_visibility"] >= 0
    assert len({r["edit_visibility"] for r in records.values()}) > 1  # the encoder sees the families differently

    written = lr.main(["--run", str(run), "--json", str(tmp_path / "r.json")])
    assert json.loads((tmp_path / "r.json").read_text()) == written
    assert set(written["families"]) == set(world_def.families("all")) and written["examples"] == 4
    assert written["run"].startswith("…/") and written["basis"] == lr.BASIS_FILE


def test_a_folder_without_a_basis_or_config_is_refused(tmp_path):
    with pytest.raises(SystemExit, match="no basis file"):
        lr.main(["--run", str(tmp_path)])
    _, out = quick_bench()
    copy = tmp_path / "copy"
    copy.mkdir()
    shutil.copy(out / "lorweb" / "train" / lr.BASIS_FILE, copy)
    with pytest.raises(SystemExit, match="no config.json"):
        lr.main(["--run", str(copy)])
