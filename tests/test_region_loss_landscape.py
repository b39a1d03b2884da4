"""bench.region_loss_landscape: the candidate regions, and a run on the quick world's CLIP."""

from __future__ import annotations

import json

import pytest
import torch

import bench.region_loss_landscape as landscape
from training.world.scenes import CELL


def test_the_candidates_are_the_true_region_grown_moved_and_the_trivial_ones():
    truth = torch.zeros(1, 64, 64)
    truth[0, 24:48, 24:48] = 1.0  # 3 x 3 cells
    regions = landscape.candidates(truth, grid=8)
    assert torch.equal(regions["truth"], truth) and regions["none"].sum() == 0 and regions["all"].mean() == 1
    assert regions["half"].unique().tolist() == [0.5]
    assert regions["truth_grown_1_cell"].sum() == (3 + 2) ** 2 * CELL ** 2
    assert regions["truth_grown_2_cells"].sum() == (3 + 4) ** 2 * CELL ** 2
    moved = regions["truth_moved"]
    assert moved.sum() == truth.sum() and (moved * truth).sum() == 0
    # the patch grid's view of the truth: 1 in the middle of its cells, soft at its border (bilinear upsampling)
    patches = regions["truth_patches"]
    assert patches[0, 36, 36] == 1.0 and 0 < patches[0, 24, 36] < 1 and patches[0, 4, 4] == 0


def test_the_paper_losses_reward_the_edit_where_it_is_on_the_quick_world(tmp_path):
    report = landscape.main(["--items", "4", "--oracle-steps", "15", "--json", str(tmp_path / "l.json")])
    assert json.loads((tmp_path / "l.json").read_text()) == report
    assert report["world"] == "v2-quick-s0" and report["editor"] == "redraw"
    assert set(report["families"]) == {"recolour_red_blue", "add_square_top_left", "remove_discs"}
    for family, figures in report["families"].items():
        assert figures["truth"]["iou"] == 1.0 and figures["none"]["iou"] == 0.0
        # quick world, seed 0, 4 items: none 1.21-1.80 and the moved truth 1.39-1.79 against the truth 0.37-0.58
        assert figures["none"]["loss"] > figures["truth"]["loss"] + 0.5, family
        assert figures["truth_moved"]["loss"] > figures["truth"]["loss"] + 0.5, family
        for start in ("half", "truth"):
            found = figures[f"oracle_from_{start}"]
            assert found["loss"] <= found["start_loss"], (family, start)
        assert 0 <= figures["push_at_half"]["inside_pushed_up"] <= 1
