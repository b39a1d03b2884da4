"""The region figures the analogy world reports beside IoU (``training.world.yardstick.regions.region_figures``),
on hand-made masks whose answers are counted by hand."""

from __future__ import annotations

import pytest
import torch

from training.world.yardstick.regions import region_figures


def masks(*cells: list[tuple[int, int]], size: int = 4) -> torch.Tensor:
    out = torch.zeros(len(cells), size, size, dtype=torch.bool)
    for i, marked in enumerate(cells):
        for r, c in marked:
            out[i, r, c] = True
    return out


def test_an_over_marking_region_has_full_recall_and_low_precision():
    truth = masks([(0, 0), (0, 1)])
    over = masks([(r, c) for r in range(2) for c in range(4)])  # 8 of 16 pixels, the true 2 among them
    figures = region_figures(over, truth)
    assert figures == pytest.approx({"iou": 2 / 8, "marked_share": 8 / 16, "true_share": 2 / 16,
                                     "precision": 2 / 8, "recall": 1.0})


def test_the_true_region_scores_one_and_an_empty_region_zero():
    truth = masks([(1, 1), (2, 2), (3, 3)], [(0, 3)])
    assert region_figures(truth, truth) == pytest.approx({"iou": 1.0, "marked_share": 4 / 32, "true_share": 4 / 32,
                                                          "precision": 1.0, "recall": 1.0})
    empty = torch.zeros_like(truth)
    figures = region_figures(empty, truth)
    assert (figures["iou"], figures["precision"], figures["recall"], figures["marked_share"]) == (0.0, 0.0, 0.0, 0.0)


def test_precision_and_recall_pool_pixels_while_iou_averages_images():
    truth = masks([(0, 0)], [(0, 0), (0, 1), (1, 0), (1, 1)])
    predicted = masks([(0, 0)], [(0, 0)])  # image 1 exact; image 2 one of four
    figures = region_figures(predicted, truth)
    assert figures["iou"] == pytest.approx((1.0 + 0.25) / 2)         # per image, then the mean
    assert figures["recall"] == pytest.approx(2 / 5)                  # over all pixels
    assert figures["precision"] == pytest.approx(1.0)


def test_confinement_measures_errors_by_the_true_mask_and_change_outside_the_predicted_region():
    """``confinement`` with a predicted region that differs from the true mask: the errors inside / outside the true
    mask against written-out values, and the change from B measured outside the predicted region only (here 0:
    the composite keeps B there), though the edit changed B outside the true mask too."""
    from training.world.yardstick.regions import confinement

    b = torch.zeros(1, 4, 4, 3)
    edited = torch.full((1, 4, 4, 3), 0.5)
    truth = b.clone()
    truth[:, :2, :2] = 0.5                                    # the true edit: the top-left 2 x 2
    true_mask = torch.zeros(1, 4, 4)
    true_mask[:, :2, :2] = 1
    region = torch.zeros(1, 4, 4)
    region[:, :2, :3] = 1                                     # predicted: one column too wide
    confined, figures = confinement(b, edited, truth, region, true_mask)
    assert torch.equal(confined[:, :2, :3], edited[:, :2, :3]) and torch.equal(confined[:, 2:], b[:, 2:])
    assert figures["outside_region_max_change_from_b"] == 0.0
    assert figures["confined_error_inside_true"] == 0.0
    assert figures["confined_error_outside_true"] == pytest.approx(2 * 0.5 / 12)    # 2 of 12 pixels off by 0.5
    assert figures["unconfined_error_outside_true"] == pytest.approx(0.5)
    assert figures["unconfined_error_inside_true"] == 0.0
