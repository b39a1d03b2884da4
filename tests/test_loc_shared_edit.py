"""``bench.loc_shared_edit``: H's updates with the part every pair gets alike removed, exactly, and scored.

The subtraction is checked against ΔW computed directly (U_B U_A per sample, minus their mean); the probe end to
end on a two-step LoC run on a quick world whose InstructPix2Pix-like UNet is pretrained 20 steps (as
tests/test_loc_rank_probe.py), and on an H made to give every pair the same update, where H − M must sample exactly
as the bare UNet.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from analogy_core.loc import LoRAFactors, load_hypernetwork, save_hypernetwork
from bench import loc_shared_edit as probe
from training.loc.config import HYPERNETWORK_FILE
from training.loc.ip2p import load_ip2p
from training.loc.task import edit_images
from training.world import evaluate as ev
from training.world.registry import open_world
from training.world.yardstick.common import RunMismatch, world_of_spec
from training.world.yardstick.loc import train_loc

SHAPES = {"a.to_q": (6, 5), "a.to_out.0": (4, 6)}  # (out, in) per projection


def random_factors(batch: int, rank: int, seed: int) -> LoRAFactors:
    gen = torch.Generator().manual_seed(seed)
    layers = {p: (torch.randn(batch, rank, i, generator=gen), torch.randn(batch, o, rank, generator=gen))
              for p, (o, i) in SHAPES.items()}
    return LoRAFactors(layers, torch.ones(batch))


def delta(factors: LoRAFactors, path: str) -> torch.Tensor:
    down, up = factors.layers[path]
    return torch.einsum("bor,bri->boi", up.double(), down.double())


def test_the_shared_part_is_subtracted_exactly():
    pool, factors = random_factors(5, 2, 0), random_factors(3, 2, 1)
    centred = probe.without_shared_part(factors, pool)
    for path in SHAPES:
        mean = delta(pool, path).mean(dim=0)
        assert float(mean.norm()) > 0.1                                   # there is a shared part to remove
        assert torch.allclose(delta(centred, path), delta(factors, path) - mean, atol=1e-5)
        assert centred.layers[path][0].shape[1] == 2 * (5 + 1)             # rank r·(N + 1)
    pooled = probe.without_shared_part(pool, pool)
    assert all(torch.allclose(delta(pooled, p).mean(dim=0), torch.zeros(SHAPES[p], dtype=torch.float64), atol=1e-5)
               for p in SHAPES)
    shared = probe.shared_part(pool, 3)
    assert all(torch.allclose(delta(shared, p), delta(pool, p).mean(dim=0).expand(3, -1, -1), atol=1e-5)
               for p in SHAPES)
    with pytest.raises(ValueError, match="scale"):
        probe.without_shared_part(factors.scaled(-1.0), pool)
    with pytest.raises(ValueError, match="scale"):
        probe.shared_part(pool.scaled(2.0), 3)


@pytest.fixture(scope="module")
def short_world():
    from training.world import build_world

    return build_world(["autoencoder", "clip", "instruct_pix2pix"], quick=True, seed=0,
                       overrides={"instruct_pix2pix": {"steps": 20}})


@pytest.fixture(scope="module")
def run(short_world, tmp_path_factory):
    out = tmp_path_factory.mktemp("shared") / "train"
    train_loc(short_world.root, out, True, 0, {"max_steps": 2, "checkpoint_every": 1, "learning_rate": 1e-2,
                                               "sample_every": 1000, "keep_exports": True})
    return out


def test_the_probe_scores_h_and_h_without_its_shared_part(run):
    report = probe.probe(run, count=1)
    assert set(report["families"]) == {"invert", "grayscale", "channel_swap", "hflip", "recolour_red_blue",
                                       "add_square_top_left", "remove_discs"}
    assert 0 < report["update_dependence"] < 1 and 0 <= report["family_share_updates"] <= 1
    rows = report["families"].values()
    assert any(r["h"]["error"] != r["h_minus_shared"]["error"] for r in rows)  # removing M changes B′


def test_an_h_that_gives_every_pair_one_update_leaves_nothing_once_it_is_removed(run, tmp_path):
    """P zeroed: H no longer reads the pair, every pair gets the same ΔW, and H − M is no LoRA at all."""
    constant = tmp_path / "train"
    shutil.copytree(run, constant)
    hypernetwork = load_hypernetwork(run / HYPERNETWORK_FILE)
    with torch.no_grad():
        hypernetwork.fuse.weight.zero_()
    save_hypernetwork(hypernetwork, constant / HYPERNETWORK_FILE)
    report = probe.probe(constant, count=1)
    assert report["update_dependence"] < 1e-9
    settings = json.loads((run / "config.json").read_text())
    backbone = load_ip2p(open_world(world_of_spec(settings["backbone"])).spec)
    items = ev.examples("grayscale", 1, 64)
    bare = edit_images(backbone, None, ev.stack(items, "b"), int(settings["sample_steps"]), int(settings["seed"]))
    bare_error = round(float(ev.mae(bare, ev.stack(items, "b_prime")).mean()), 5)
    assert report["families"]["grayscale"]["h_minus_shared"]["error"] == pytest.approx(bare_error, abs=2e-5)
    assert report["families"]["grayscale"]["h"]["error"] != pytest.approx(bare_error, abs=2e-5)
    shared, whole = report["families"]["grayscale"]["shared_only"], report["families"]["grayscale"]["h"]
    assert shared["error"] == pytest.approx(whole["error"], abs=2e-5)                  # M alone is H here


def test_a_run_that_is_not_a_hypernetwork_run_is_refused(tmp_path):
    with pytest.raises(RunMismatch, match="config.json"):
        probe.probe(tmp_path)
    (tmp_path / "config.json").write_text('{"plain_lora": true}')
    with pytest.raises(RunMismatch, match="not a LoC hypernetwork run"):
        probe.probe(tmp_path)


def test_a_step_export_is_scored_as_its_own_h(run):
    """--step N reads the H the run kept at step N (here step 1 of 2), not the final one; a step it did not keep is
    refused with the steps it did."""
    final, first = probe.probe(run, count=1), probe.probe(run, count=1, step=1)
    assert final["hypernetwork"] == HYPERNETWORK_FILE
    assert first["hypernetwork"] == "loc_hypernetwork.step_000001.safetensors"
    assert probe.probe(run, count=1, step=2)["families"] == final["families"]   # the last export is the final H
    assert first["update_dependence"] != final["update_dependence"]
    with pytest.raises(RunMismatch, match="kept no H of step 5; its step exports: 1, 2"):
        probe.probe(run, count=1, step=5)


def test_the_picture_shows_each_familys_scene_and_what_h_and_m_draw(run, tmp_path):
    """--picture: a row per training family, A, A′, B, true B′, H's B′, M's B′; every column of every row is compared
    pixel for pixel with the scene's own panels and with B′ sampled again here from the same H and from M (so a picture
    of another scene, of another B′ or with two columns swapped fails)."""
    from analogy_core.analogy import to_uint8_images
    from training.backbone import load_query_encoder
    from training.world.yardstick.loc import load_run_model, tokens

    path = tmp_path / "shared.png"
    scenes = 2                                                              # the picture shows the first of them
    report = probe.probe(run, count=scenes, picture=path)
    image = np.asarray(Image.open(path).convert("RGB"))
    families = list(report["families"])
    assert image.shape == (len(families) * 64, probe.LABEL_WIDTH + 6 * 64, 3)
    settings = json.loads((run / "config.json").read_text())
    spec = open_world(world_of_spec(settings["backbone"])).spec
    hypernetwork, encoder = load_run_model(run / HYPERNETWORK_FILE, None, load_query_encoder(spec), False)
    backbone = load_ip2p(spec)
    steps, seed = int(settings["sample_steps"]), int(settings["seed"])
    examples = {family: ev.examples(family, scenes, 64) for family in families}
    with torch.no_grad():
        generated = {family: hypernetwork(*tokens(encoder, items)) for family, items in examples.items()}
        pool = LoRAFactors({p: tuple(torch.cat([g.layers[p][i] for g in generated.values()]) for i in (0, 1))
                            for p in generated[families[0]].layers}, torch.ones(scenes * len(families)))
        shared = probe.shared_part(pool, scenes)
    h_differs_from_m = []
    for row, family in enumerate(families):
        items = examples[family]
        with torch.no_grad():
            h = edit_images(backbone, generated[family], ev.stack(items, "b"), steps, seed)
            m = edit_images(backbone, shared, ev.stack(items, "b"), steps, seed)
        ex = items[0]
        assert not torch.equal(h[0], h[1])                                 # so the first scene's column is told apart
        expected = [to_uint8_images(t[None])[0] for t in (ex.a, ex.a_prime, ex.b, ex.b_prime, h[0], m[0])]
        assert not np.array_equal(expected[0], expected[1]) and not np.array_equal(expected[2], expected[3])
        assert not np.array_equal(expected[4], expected[2])                 # H's B′ is not B itself
        h_differs_from_m.append(not np.array_equal(expected[4], expected[5]))
        panels = image[row * 64:(row + 1) * 64, probe.LABEL_WIDTH:]
        for k, want in enumerate(expected):
            assert np.array_equal(panels[:, k * 64:(k + 1) * 64], want), (family, k)
    assert any(h_differs_from_m)                                            # swapping H's and M's columns would fail
