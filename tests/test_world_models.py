"""The quick analogy world's pretrained models and the quick LoRWeB yardstick run (CI-sized, seed 0).

One session-scoped world (tests/world_fixtures.py) and one LoRWeB run of ``bench.analogy_world --quick`` serve every
test here and in test_world_server.py.
"""

from __future__ import annotations

import json

import pytest
import torch

from training.world import scenes as world
from training.world import evaluate as ev
from world_fixtures import quick_bench, quick_world

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def built():
    return quick_world()


@pytest.fixture(scope="module")
def bench():
    return quick_bench()


def test_world_is_cached_and_reused(built):
    from training.world import build_world

    again = build_world(["autoencoder", "clip", "flux_kontext"], quick=True, seed=0)
    assert {n: r["key"] for n, r in again.builds.items()} == {n: r["key"] for n, r in built.builds.items()}
    assert all(json.loads((built.path(n) / "build.json").read_text())["key"] == r["key"]
               for n, r in built.builds.items())


def test_autoencoder_reconstructs_and_its_shortcut_is_exact(built):
    from training.world.autoencoder import load_world_autoencoder

    metrics = built.builds["autoencoder"]["metrics"]
    assert metrics["mae_heldout"] < 1e-3 and metrics["mae_heldout_edited_b_prime"] < 1e-3, "set by hand: exact"
    codec = load_world_autoencoder(built.path("autoencoder"))
    items = ev.examples("recolour_red_blue", 2, world.REFERENCE_SIZE)
    grids = ev.four_panel(*(ev.stack(items, r) for r in ("a", "a_prime", "b", "b_prime")))
    pixels = grids.permute(0, 3, 1, 2) * 2 - 1
    full = codec.ae.encode(pixels).latents
    torch.testing.assert_close(codec.encode(pixels), full, rtol=0, atol=1e-5)
    torch.testing.assert_close(codec.decode(full), codec.ae.decode(full).sample, rtol=0, atol=1e-4)
    # the encoder never mixes latent cells: a grid's latent is its panels' latents side by side
    panel = codec.encode(ev.stack(items, "a").permute(0, 3, 1, 2) * 2 - 1)
    torch.testing.assert_close(full[:, :, :8, :8], panel, rtol=0, atol=1e-5)


def test_world_clip_learned_the_captions(built):
    from transformers import AutoTokenizer, CLIPModel, CLIPVisionModelWithProjection

    from training.world.clip import VISION_FOLDER, normalise, resized_pool

    metrics = built.builds["clip"]["metrics"]
    assert metrics["retrieval_top1_heldout_64"] > 5 * metrics["chance"], metrics
    folder = built.path("clip")
    model = CLIPModel.from_pretrained(folder, local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    assert tokenizer.unk_token_id not in tokenizer([world.example("vflip", "heldout", 0).captions["b_prime"]]).input_ids[0]
    vision = CLIPVisionModelWithProjection.from_pretrained(folder / VISION_FOLDER, local_files_only=True)
    pixels = normalise(resized_pool(ev.stack(ev.examples("invert", 2, world.REFERENCE_SIZE), "a")))
    with torch.no_grad():
        joint = model.get_image_features(pixel_values=pixels)
        joint = joint if isinstance(joint, torch.Tensor) else joint.pooler_output  # transformers 5: an output object
        torch.testing.assert_close(vision(pixel_values=pixels).image_embeds, joint)


def test_backbone_copies_and_knows_no_edit(built, bench):
    """Copying: sampled grids of held-out images with themselves as reference are within a little of the autoencoder
    floor. No edit ability: on every family the base's B′ error is the no-edit error or worse (it returns B)."""
    metrics = built.builds["flux_kontext"]["metrics"]
    # world v2, quick, seed 0: copy error 0.0224 (pixels), floor 3e-5 (the autoencoder is exact)
    assert metrics["copy_error_heldout"] < 0.03, metrics
    report, _ = bench
    for family, row in report["methods"]["lorweb"]["families"].items():
        assert row["base"] >= 0.9 * row["no_edit"], (family, row)
        # the base's B′ is B (up to copying and the floor), not the truth
        assert row["base"] <= row["no_edit"] + row["floor"] + 0.03, (family, row)
        # in cells: it keeps what the edit keeps and edits nothing (lowest kept over the families 0.93 / 0.97 / 0.80,
        # highest edited 0.06 / 0.00 / 0.004 on the 4 quick scenes of seeds 0 / 1 / 2)
        base = row["base_cells"]
        assert base["kept_cells"] is None or base["kept_cells"] >= 0.75, (family, row)
        assert base["edited_cells"] <= 0.1, (family, row)


def test_quick_lorweb_learns_invert_and_routes_by_family(bench):
    report, out = bench
    assert set(report) == {"seed", "quick", "seconds", "methods"} and report["quick"] is True
    assert json.loads((out / "world.json").read_text()) == report
    lorweb = report["methods"]["lorweb"]
    families = lorweb["families"]
    assert set(families) == set(world.families("all"))
    for family, row in families.items():
        assert set(row) == {"split", "error", "no_edit", "base", "floor", "error_over_no_edit", "base_over_no_edit",
                            "edited_cells", "kept_cells", "kept_background_cells", "kept_object_cells",
                            "no_edit_cells", "base_cells", "floor_cells"}
        # the cell metric (tests/test_world_metric.py): no edit scores 0 / 1; the world v2 autoencoder is exact, so
        # its floor scores 1 / 1
        assert row["no_edit_cells"] == {"edited_cells": 0.0, "kept_cells": None if family == "invert" else 1.0}, row
        assert row["floor_cells"] == {"edited_cells": 1.0, "kept_cells": None if family == "invert" else 1.0}, row
    for split in ("train", "heldout"):
        for key in ("mean_error_over_no_edit", "error_over_no_edit_of_means", "mean_edited_cells", "mean_kept_cells"):
            assert f"{key}_{split}" in lorweb["extra"], (key, split)
    assert (out / "lorweb.png").is_file()
    # Measured on the quick world v2, seeds 0 / 1 / 2, with requirements/lock.txt's libraries and the quick preset's
    # learning rate 2e-3 (README, "The analogy world"; bench/results/analogy_world_v2_quick_lorweb_s<seed>.json): the
    # mean over the training families of error / no-edit is 1.61x / 1.38x / 1.37x (worse than doing nothing), the
    # cells edited right 0.03 / 0.04 / 0.03, kept 0.65 / 0.71 / 0.78 — reported, not asserted. What held in every
    # seed: `invert` at 0.55x / 0.51x / 0.60x the no-edit error (0.54x / 0.51x / 0.61x its base), and a routing gap
    # of 0.24 / 0.27 / 0.22, 0.26 / 0.25 / 0.20 above the one at initialisation. Asserted inside those (the margins
    # date from the 6e-3 runs: invert 0.70x / 0.47x / 0.57x, gain 0.11 / 0.14 / 0.15; a fresh install of unpinned
    # libraries once moved seed 0's invert by 0.14x).
    invert = families["invert"]
    assert invert["error"] < INVERT_MARGIN * invert["no_edit"], invert
    assert invert["error"] < INVERT_MARGIN * invert["base"], ("the base does not invert", invert)
    extra = lorweb["extra"]
    assert extra["routing_gap"] > extra["routing_gap_init"] + ROUTING_GAIN, extra


INVERT_MARGIN = 0.8
ROUTING_GAIN = 0.05
