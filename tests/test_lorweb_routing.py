"""``bench.lorweb_routing``: per-family routing of a trained LoRWeB basis and the query encoder's view of each edit.
The maths against hand-made cases and brute force; the tool against the yardstick's own routing gap for the same run
(the session's quick LoRWeB row)."""

from __future__ import annotations

import json
import shutil
from types import SimpleNamespace

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
    # weights that are not a distribution (tanh mixing, summed heads) have no entropy to count
    assert lr.effective_entries(torch.tensor([[0.9, -0.2, 0.3]])) is None
    assert lr.effective_entries(torch.tensor([[0.9, 0.9, 0.3]])) is None


def test_edit_visibility_is_the_edits_move_in_units_of_the_scenes_spread():
    scenes = torch.eye(4)  # four scenes, each pair sqrt(2) apart
    assert lr.edit_visibility(scenes, scenes) == 0
    shift = torch.tensor([0.0, 0.0, 0.0, 0.0, 0.7])
    assert lr.edit_visibility(torch.cat([scenes, torch.zeros(4, 1)], 1), torch.cat([scenes, torch.zeros(4, 1)], 1)
                              + shift) == pytest.approx(0.7 / 2 ** 0.5)
    # the spread is A's, not A′'s: an edit that doubles every embedding moves each by 1
    assert lr.edit_visibility(scenes, 2 * scenes) == pytest.approx(1 / 2 ** 0.5)
    with pytest.raises(ValueError, match="at least 2 scenes"):
        lr.edit_visibility(scenes[:1], scenes[:1])


class StubEncoder:
    """A query 'encoder' whose embedding of an image is its mean colour (3-d), per role."""

    def encode(self, a, a_prime, b):
        return SimpleNamespace(image_embeds={r: x.mean(dim=(1, 2)) for r, x in (("a", a), ("a_prime", a_prime))})


class StubBasis:
    """Two layers of three entries, each a softmax over scores of the query (A′ − A's mean colour), the second
    layer's scores negated: a basis mixes per layer."""

    settings = SimpleNamespace(query=lambda e: e.image_embeds["a_prime"] - e.image_embeds["a"])
    num_entries = 3

    def coefficients(self, query):
        return {"l0": (5 * query).softmax(dim=1), "l1": (-5 * query).softmax(dim=1)}


def test_measure_routing_assembles_each_familys_record_from_the_same_coefficients():
    examples = {f: ev.examples(f, 3, 64) for f in ("invert", "grayscale", "hflip", "vflip")}
    measured = lr.measure_routing(StubBasis(), StubEncoder(), examples)
    families = measured["families"]
    # a reference from the same coefficients, computed here
    vectors, labels, spread = [], [], {}
    for f, items in examples.items():
        q = ev.stack(items, "a_prime").mean(dim=(1, 2)) - ev.stack(items, "a").mean(dim=(1, 2))
        layers = [(5 * q).softmax(dim=1), (-5 * q).softmax(dim=1)]
        vectors.append(torch.cat(layers, dim=1))
        labels += [f] * len(items)
        # exp(entropy) of each example's weights in each layer, averaged
        spread[f] = float(torch.stack([(-(w * w.log()).sum(dim=1)).exp() for w in layers]).mean())
    table = lr.family_similarity(torch.cat(vectors), labels)
    assert table["invert"]["invert"] != table["invert"]["grayscale"]  # the stub routes families apart
    assert len({round(v, 2) for v in spread.values()}) > 1  # and spreads some families' mixes wider than others
    for f in examples:
        assert families[f]["within"] == pytest.approx(table[f][f], abs=1e-4)
        assert families[f]["nearest"] != f
        assert families[f]["nearest_similarity"] == max(v for g, v in families[f]["similarity"].items() if g != f)
        assert families[f]["effective_entries"] == pytest.approx(spread[f], abs=0.006)
    # a flip leaves the mean colour as it is: this encoder cannot see it, an invert it sees
    assert families["hflip"]["edit_visibility"] == pytest.approx(0, abs=1e-6)
    assert families["invert"]["edit_visibility"] > 0.5
    train = [f for f in examples if f != "vflip"]
    keep = torch.tensor([label in train for label in labels])
    assert measured["routing_gap"] == pytest.approx(
        routing(torch.cat(vectors)[keep], [label for label in labels if label in train])["gap"], abs=1e-4)
    assert measured["routing_gap_all_families"] == pytest.approx(routing(torch.cat(vectors), labels)["gap"], abs=1e-4)
    assert measured["routing_gap"] != measured["routing_gap_all_families"]  # centred over different sets
    with pytest.raises(ValueError, match="at least 2 examples"):
        lr.measure_routing(StubBasis(), StubEncoder(), {"invert": examples["invert"][:1]})


def test_the_tool_reproduces_the_rows_routing_gaps_on_a_trained_run(tmp_path):
    report, out = quick_bench()
    run = out / "lorweb" / "train"
    row = report["methods"]["lorweb"]["extra"]
    written = lr.main(["--run", str(run), "--json", str(tmp_path / "r.json")])
    assert json.loads((tmp_path / "r.json").read_text()) == written
    # the yardstick's scenes and coefficients: both of the row's gaps, to their rounding
    assert written["routing_gap"] == pytest.approx(row["routing_gap"], abs=2e-4)
    assert written["routing_gap_all_families"] == pytest.approx(row["routing_gap_all_families"], abs=2e-4)
    assert set(written["families"]) == set(world_def.families("all")) and written["examples"] == 4
    assert written["run"].startswith("…/") and written["basis"] == lr.BASIS_FILE
    assert written["basis_step"] == str(row["train_steps"])
    for f, record in written["families"].items():
        assert 1 <= record["effective_entries"] <= written["basis_entries"], f
    assert len({r["edit_visibility"] for r in written["families"].values()}) > 1  # the encoder tells families apart


def test_a_folder_without_a_basis_or_config_is_refused(tmp_path):
    with pytest.raises(SystemExit, match="no basis file"):
        lr.main(["--run", str(tmp_path)])
    with pytest.raises(SystemExit, match="at least 2"):
        lr.main(["--run", str(tmp_path), "--basis", __file__, "--examples", "1"])
    _, out = quick_bench()
    copy = tmp_path / "copy"
    copy.mkdir()
    shutil.copy(out / "lorweb" / "train" / lr.BASIS_FILE, copy)
    with pytest.raises(SystemExit, match="no config.json"):
        lr.main(["--run", str(copy)])
