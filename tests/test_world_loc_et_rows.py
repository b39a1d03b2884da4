"""The quick-world rows of LoRA of Change and Edit Transfer (``python -m bench.analogy_world --quick --methods
loc,edit_transfer``), asserting only what held on seeds 0, 1 and 2 (issue 20).

Expensive: on a clean clone it builds the InstructPix2Pix- and FLUX.1-dev-like backbones of the session's quick world
(about 6 minutes) and trains both rows (about 8 minutes): `bash scripts/test.sh -m expensive
tests/test_world_loc_et_rows.py`. It uses the session's world (tests/world_fixtures.py), so it runs on the world's
worker.
"""

from __future__ import annotations

import pytest
from world_fixtures import SEED, quick_world

from training.world import scenes as world

# a clean clone builds the session's world and both backbones, then trains both rows: beyond the suite's 900-s limit
pytestmark = [pytest.mark.slow, pytest.mark.expensive, pytest.mark.timeout(3600)]


@pytest.fixture(scope="module")
def rows(tmp_path_factory) -> dict:
    from training.world.yardstick.runner import main

    quick_world()
    out = tmp_path_factory.mktemp("loc-et-rows")
    # the default rows (no --diagnostics): LoC trains its published run only
    return main(["--methods", "loc,edit_transfer", "--quick", "--seed", str(SEED), "--out", str(out)])["methods"]


# Measured on the quick world v2, seeds 0 / 1 / 2, error ÷ no edit:
#   LoRA of Change  (H at lr 1e-4, the row's rate since 2026-12-03; bench/results/analogy_world_v2_quick_loc_lr1e-4_
#                   s<N>.json, on the pinned libraries) invert 0.41 / 0.47 / 0.45 (its base 0.98 / 0.98 / 0.97); mean
#                   over the training families 1.81x / 1.78x / 1.86x, edited cells 0.012 / 0.005 / 0.009, kept 0.098 /
#                   0.120 / 0.097 (its base keeps 0.74 / 0.73 / 0.82). At lr 1e-3 (before): invert 0.48 / 0.58 /
#                   0.66, 2.67x / 2.70x / 2.73x, kept 0.006-0.014.
#   Edit Transfer   (analogy_world_v2_quick_loc_et_ceilings_s0.json, analogy_world_v2_quick_loc_et_s<1|2>.json,
#                   measured before the library pin) invert 0.84 / 0.76 / 0.85 (base 1.00 / 0.99 / 0.99); mean
#                   1.77x / 2.15x / 1.71x, edited 0.023 / 0.067 / 0.027, kept 0.59 / 0.44 / 0.57 (base 0.84 / 0.84 /
#                   0.93); loss 0.92 -> 0.26, 1.77 -> 0.32, 1.05 -> 0.31.
# What held in every seed, asserted inside those figures: each row beats doing nothing and its own base on invert,
# and Edit Transfer's loss falls by more than half. The means (the targets: edited >= 0.8, kept >= 0.95) are
# reported by the yardstick, not asserted: no seed comes near them.
INVERT_MARGIN = {"loc": 0.8, "edit_transfer": 0.9}


def test_both_rows_report_every_family_with_the_cell_metric(rows):
    assert set(rows) == {"loc", "edit_transfer"}
    for method, row in rows.items():
        assert set(row["families"]) == set(world.families("all")), method
        for family, scores in row["families"].items():
            assert scores["no_edit_cells"]["edited_cells"] == 0.0, (method, family)
            assert 0.0 <= scores["edited_cells"] <= 1.0, (method, family)


@pytest.mark.parametrize("method", ["loc", "edit_transfer"])
def test_each_row_beats_doing_nothing_and_its_base_on_invert(rows, method):
    invert = rows[method]["families"]["invert"]
    assert invert["error"] < INVERT_MARGIN[method] * invert["no_edit"], invert
    assert invert["error"] < INVERT_MARGIN[method] * invert["base"], ("the base alone does as well", invert)


def test_edit_transfers_loss_falls_by_more_than_half(rows):
    extra = rows["edit_transfer"]["extra"]
    assert extra["loss_last_step"] < 0.5 * extra["loss_first_step"], extra


def test_loc_reports_how_far_its_generated_updates_move_the_weights(rows):
    extra = rows["loc"]["extra"]
    median, largest = extra["relative_update_median"], extra["relative_update_max"]
    assert 0 < median <= largest, (median, largest)
    assert not [key for key in extra if "no_exchange" in key]  # the ablation run is --diagnostics only
