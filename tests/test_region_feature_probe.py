"""bench.region_feature_probe: the neighbourhood features, the IoU, and a run on the quick world's CLIP."""

from __future__ import annotations

import json

import pytest
import torch

import bench.region_feature_probe as probe


def test_neighbours_hold_each_patch_and_its_eight_neighbours_in_order():
    grid, dim = 3, 2
    features = torch.arange(grid * grid * dim, dtype=torch.float32).reshape(1, grid * grid, dim)
    out = probe.with_neighbours(features, grid)
    assert out.shape == (1, 9, 9 * dim)
    centre = out[0, 4].reshape(dim, 9)  # unfold: channel-major, then the 3 x 3 window row by row
    torch.testing.assert_close(centre, features[0].T)  # the centre patch sees the whole 3 x 3 grid
    corner = out[0, 0].reshape(dim, 9)  # the top-left patch: zeros above and left of it
    assert corner[:, [0, 1, 2, 3, 6]].abs().sum() == 0
    torch.testing.assert_close(corner[:, 4], features[0, 0])
    torch.testing.assert_close(corner[:, 5], features[0, 1])   # right neighbour
    torch.testing.assert_close(corner[:, 7], features[0, 3])   # neighbour below


def test_mask_iou_on_hand_made_cases():
    truth = torch.tensor([[1.0, 1.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]])
    assert probe.mask_iou(truth, truth) == 1.0
    assert probe.mask_iou(torch.tensor([[0.9, 0.2, 0.7, 0.0], [0.0] * 4]), truth) == pytest.approx((1 / 3 + 1) / 2)
    assert probe.mask_iou(torch.zeros(2, 4), truth) == pytest.approx(0.5)  # the empty image scores 1, the other 0


def test_colour_is_read_from_one_patch_and_a_place_is_not(tmp_path):
    report = probe.main(["--families", "recolour_red_blue,add_square_top_left", "--train-scenes", "128",
                         "--examples", "16", "--steps", "300", "--json", str(tmp_path / "probe.json")])
    assert json.loads((tmp_path / "probe.json").read_text()) == report
    assert report["world"] == "v2-quick-s0" and report["clip"] == "world"
    recolour, square = report["families"]["recolour_red_blue"], report["families"]["add_square_top_left"]
    # the red objects are found by their colour alone (quick world, seed 0, these settings: linear 0.906, mlp 1.000,
    # mlp_3x3 1.000)
    assert recolour["linear"]["iou"] >= 0.8 and recolour["mlp"]["iou"] >= 0.9
    # the added square's region is an empty corner: no feature of a background patch says where it is (0.000,
    # 0.000, 0.042)
    assert square["linear"]["iou"] <= 0.2 and square["mlp"]["iou"] <= 0.2


def test_a_global_family_is_refused():
    with pytest.raises(SystemExit):
        probe.main(["--families", "invert"])
