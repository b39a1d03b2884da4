"""The quick-world regions row (``python -m bench.analogy_world --quick --methods regions``), asserting only what
held on seeds 0, 1 and 2 (issue 20).

Expensive: it trains the row's five region runs and the LoRWeB run whose B′ it confines (4.6 minutes on 2 CPU
cores with the quick world built): `bash scripts/test.sh -m expensive tests/test_world_regions_row.py`. It uses the
session's world (tests/world_fixtures.py).
"""

from __future__ import annotations

import pytest
from world_fixtures import SEED, quick_world

from training.world import scenes as world

pytestmark = [pytest.mark.slow, pytest.mark.expensive, pytest.mark.timeout(3600)]


@pytest.fixture(scope="module")
def row(tmp_path_factory) -> dict:
    from training.world.yardstick.runner import main

    quick_world()
    out = tmp_path_factory.mktemp("regions-row")  # --diagnostics: the ablation runs too (text_mask is asserted)
    return main(["--methods", "regions", "--quick", "--seed", str(SEED), "--out", str(out),
                 "--diagnostics"])["methods"]["regions"]


# Measured on the quick world v2 at the row's preset (100 steps per run, the token MLP 128 wide, the learned positions
# starting as sin-cos ones since stop 64), seeds 0 / 1 / 2 (bench/results/analogy_world_v2_quick_regions_sincos_s<N>
# .json, with --diagnostics), IoU on the training families:
#   analogy      0.065 -> 0.230, 0.025 -> 0.532, 0.075 -> 0.505 (recolour_red_blue 0.43 / 0.67 / 0.52; the square
#                0.19 / 0.81 / 0.91; the discs 0.06-0.11). With the earlier random positions 0.322 / 0.346 / 0.202,
#                the recolour 0.86 / 0.92 / 0.60 and the square 0.00-0.12: the sin-cos start finds the square within
#                100 steps and the recolour less well (docs/analogy_world_measurements.md, "Regions in analogy mode")
#   text         0.095 at every seed (the paper's losses: the region marks the whole image); text_mask (the paper's
#                losses + BCE against the true region) 0.63 / 0.65 / 0.61
#   confinement  LoRWeB's B′ outside the analogy region equals B (largest change 0.0) at every seed; the error
#                outside the true region 0.0985 / 0.0643 / 0.0642 unconfined, 0.0008 / 0.0030 / 0.0000 confined
# The target (IoU >= 0.6) is the full world's (met there at the preset: 0.607 / 0.633 / 0.607); the quick world's
# 100 steps are reported, not asserted against it. Asserted, inside what held at every seed:
ANALOGY_GAIN = 0.08        # the analogy IoU rises by more than this from initialisation (0.165-0.507)
RECOLOUR_IOU = 0.35        # analogy mode finds the recoloured objects (0.43-0.67)
MASK_OVER_TEXT = 0.2       # told the region, text mode finds more than with the paper's losses alone (0.52-0.55)
OUTSIDE_RATIO = 0.1        # confined / unconfined error outside the true region (0.000-0.047)


def test_the_row_reports_every_family_and_every_run(row):
    assert set(row["families"]) == set(world.families("all"))
    assert row["extra"]["hidden"] == 128  # the preset's token MLP, four times the world CLIP's width
    local = {f for f in world.families("all") if world.get_family(f).kind == "local"}
    assert set(row["extra"]["iou_per_family"]) == local
    for runs in row["extra"]["iou_per_family"].values():
        assert set(runs) == {"text", "analogy", "text_paper", "text_straight_through", "text_mask"}
        assert all(0.0 <= iou <= 1.0 for iou in runs.values()), runs


def test_analogy_mode_learns_the_region_and_finds_the_recolour(row):
    extra = row["extra"]
    assert extra["iou_analogy"] > extra["iou_analogy_start"] + ANALOGY_GAIN, extra
    assert extra["iou_per_family"]["recolour_red_blue"]["analogy"] >= RECOLOUR_IOU, extra["iou_per_family"]


def test_text_mode_told_the_region_finds_more_than_the_papers_losses_alone(row):
    extra = row["extra"]
    assert extra["iou_text_mask"] > extra["iou_text"] + MASK_OVER_TEXT, extra


def test_confined_edit_keeps_b_outside_the_region(row):
    extra = row["extra"]
    assert extra["lorweb_outside_region_max_change_from_b_all_families"] == 0.0, extra
    unconfined = extra["lorweb_unconfined_error_outside_true"]
    assert unconfined > 0.0, "LoRWeB's B′ changed nothing outside the true region: nothing to confine"
    assert extra["lorweb_confined_error_outside_true"] < OUTSIDE_RATIO * unconfined, extra
