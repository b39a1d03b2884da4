"""Unit tests of the four-panel composite maths (no ComfyUI)."""

import pytest
import torch
import torch.nn.functional as F

from analogy_core import composite as cp
from training.data.synthetic import analogy_example, procedural_scene


def img(seed, w, h, batch=1):
    return torch.stack([procedural_scene(seed + i, w, h) for i in range(batch)])


@pytest.fixture
def trio():
    ex = analogy_example("invert", width=40, height=24)
    a, ap, b = (ex[k].unsqueeze(0) for k in ("a", "a_prime", "b"))
    # The three panels differ, so equality checks below can tell them apart.
    assert not torch.allclose(a, ap) and not torch.allclose(a, b) and not torch.allclose(ap, b)
    return a, ap, b


def quadrants(grid, w, h):
    return {
        "top_left": grid[:, :h, :w], "top_right": grid[:, :h, w:],
        "bottom_left": grid[:, h:, :w], "bottom_right": grid[:, h:, w:],
    }


def test_lorweb_layout_places_exact_pixels(trio):
    a, ap, b = trio
    grid, mask, geo = cp.four_panel_composite(a, ap, b, layout="lorweb")
    assert grid.shape == (1, 48, 80, 3) and (geo.panel_width, geo.panel_height) == (40, 24)
    q = quadrants(grid, 40, 24)
    assert torch.equal(q["top_left"], a) and torch.equal(q["top_right"], ap)
    assert torch.equal(q["bottom_left"], b) and torch.equal(q["bottom_right"], b)
    assert mask.shape == (1, 48, 80)
    assert mask[:, 24:, 40:].eq(1).all() and mask.sum() == 24 * 40


def test_edit_transfer_layout_blanks_bottom_right(trio):
    a, ap, b = trio
    grid, mask, _ = cp.four_panel_composite(a, ap, b, layout="edit_transfer", fill=0.25)
    q = quadrants(grid, 40, 24)
    assert torch.equal(q["bottom_left"], b)
    assert q["bottom_right"].eq(0.25).all()


def test_batches_broadcast_and_mismatch_is_named():
    a, ap, b = img(1, 16, 16, batch=2), img(5, 16, 16), img(7, 16, 16, batch=2)
    grid, mask, _ = cp.four_panel_composite(a, ap, b)
    assert grid.shape[0] == 2 and mask.shape[0] == 2
    assert torch.equal(grid[0, :16, 16:], ap[0]) and torch.equal(grid[1, :16, 16:], ap[0])
    assert torch.equal(grid[1, 16:, :16], b[1])
    with pytest.raises(cp.CompositeError, match=r"a has 2.*b has 3"):
        cp.four_panel_composite(a, ap, img(7, 16, 16, batch=3))


@pytest.mark.parametrize(
    "bad, message",
    [
        (torch.zeros(0, 8, 8, 3), r"a_prime: the image batch is empty"),
        (torch.zeros(1, 0, 8, 3), r"a_prime: zero-size image"),
        (torch.zeros(1, 8, 8, 2), r"a_prime: expected 3 \(RGB\) or 4 \(RGBA\) channels, got 2"),
        (torch.zeros(8, 8, 3), r"a_prime: expected an IMAGE of shape"),
    ],
)
def test_bad_inputs_name_the_input(bad, message):
    good = img(1, 8, 8)
    with pytest.raises(cp.CompositeError, match=message):
        cp.four_panel_composite(good, bad, good)


def test_rgba_is_reduced_to_rgb():
    a = img(1, 8, 8)
    rgba = torch.cat([a, torch.full_like(a[..., :1], 0.3)], dim=-1)
    grid, _, _ = cp.four_panel_composite(rgba, a, a)
    assert grid.shape[-1] == 3 and torch.equal(grid[:, :8, :8], a)


def test_center_crop_keeps_the_middle():
    wide = img(3, 60, 20)
    grid, _, geo = cp.four_panel_composite(img(1, 20, 20), img(2, 20, 20), wide, fit="center_crop")
    assert torch.equal(grid[:, 20:, :20], wide[:, :, 20:40])  # crop is 20x20: no resampling involved
    box = geo.boxes["b"]
    assert (box.source_x, box.source_w, box.source_h) == (20, 20, 20)


def test_pad_letterboxes_with_fill():
    wide = img(3, 40, 20)
    grid, _, geo = cp.four_panel_composite(img(1, 40, 40), img(2, 40, 40), wide, fit="pad", fill=0.0)
    panel = grid[:, 40:, :40]
    assert torch.equal(panel[:, 10:30], wide)
    assert panel[:, :10].eq(0).all() and panel[:, 30:].eq(0).all()
    assert (geo.boxes["b"].panel_y, geo.boxes["b"].panel_h) == (10, 20)


def test_an_odd_margin_is_split_with_the_extra_pixel_after_the_content():
    """Centre crop and padding both floor the leading margin (a 1-pixel shift otherwise, which restore_size hides)."""
    wide = img(3, 21, 20)  # one column to cut: the crop keeps columns 0..19
    fitted, box = cp.fit_into_panel(wide, 20, 20, "center_crop", 0.5)
    assert box.source_x == 0 and torch.equal(fitted, wide[:, :, :20])
    wider = img(4, 23, 20)  # three columns to cut: one before, two after
    fitted, box = cp.fit_into_panel(wider, 20, 20, "center_crop", 0.5)
    assert box.source_x == 1 and torch.equal(fitted, wider[:, :, 1:21])
    flat = img(5, 20, 17)  # three rows of fill: one above, two below
    fitted, box = cp.fit_into_panel(flat, 20, 20, "pad", 0.0)
    assert (box.panel_y, box.panel_h) == (1, 17)
    assert torch.equal(fitted[:, 1:18], flat) and fitted[:, :1].eq(0).all() and fitted[:, 18:].eq(0).all()


def test_custom_size_resizes_like_antialiased_bicubic():
    a = img(1, 64, 48)
    grid, _, _ = cp.four_panel_composite(a, a, a, panel_size=(32, 24), fit="stretch")
    ref = F.interpolate(a.movedim(-1, 1), size=(24, 32), mode="bicubic", antialias=True).movedim(1, -1).clamp(0, 1)
    assert not torch.allclose(grid[:, :24, :32], a[:, :24, :32])  # resizing changed the pixels
    torch.testing.assert_close(grid[:, :24, :32], ref)


@pytest.mark.parametrize(
    "size, snap, expected",
    [
        ((100, 50), "multiple_of_16", (96, 48)),
        ((100, 50), "multiple_of_64", (128, 64)),
        ((5, 5), "multiple_of_8", (8, 8)),
        ((300, 300), "kontext", (512, 512)),
        ((600, 400), "kontext", (624, 416)),  # grid 1248x832, the closest preferred aspect to 3:2
        ((123, 77), "none", (123, 77)),
    ],
)
def test_snapping(size, snap, expected):
    assert cp.snap_panel_size(*size, snap) == expected
    if snap == "kontext":
        assert (2 * expected[0], 2 * expected[1]) in cp.KONTEXT_RESOLUTIONS


def test_extract_each_panel_round_trips(trio):
    a, ap, b = trio
    grid, _, geo = cp.four_panel_composite(a, ap, b, layout="edit_transfer")
    assert torch.equal(cp.extract_panel(grid, "top_left", geo), a)
    assert torch.equal(cp.extract_panel(grid, "top_right", geo), ap)
    assert torch.equal(cp.extract_panel(grid, "bottom_left", None), b)


def test_extract_scales_with_a_resized_result(trio):
    a, ap, b = trio
    grid, _, geo = cp.four_panel_composite(a, ap, b)
    big = grid.repeat_interleave(2, dim=1).repeat_interleave(2, dim=2)  # e.g. a sampler output at 2x
    out = cp.extract_panel(big, "top_right", geo)
    assert out.shape == (1, 48, 80, 3)
    assert torch.equal(out[:, ::2, ::2], ap)


def test_restore_size_undoes_padding():
    wide = img(3, 40, 20)
    grid, _, geo = cp.four_panel_composite(img(1, 40, 40), img(2, 40, 40), wide, fit="pad")
    restored = cp.extract_panel(grid, "bottom_right", geo, restore_size=True)
    assert torch.equal(restored, wide)
    with pytest.raises(cp.CompositeError, match="needs the geometry"):
        cp.extract_panel(grid, "bottom_right", None, restore_size=True)


def test_restore_size_on_a_wide_panel_cuts_b_where_it_was_placed():
    """A square B padded into a 48 x 32 panel sits at x 8..40: restore_size must map the x-span with the panel's
    width and the y-span with its height (on a square panel the two are interchangeable)."""
    square = img(3, 32, 32)
    grid, _, geo = cp.four_panel_composite(img(1, 48, 32), img(2, 48, 32), square, fit="pad", fill=0.0)
    box = geo.boxes["b"]
    assert (box.panel_x, box.panel_w, box.panel_y, box.panel_h) == (8, 32, 0, 32)
    assert torch.equal(grid[:, 32:, 8:40], square)  # placed by hand-checked coordinates, no resampling
    assert torch.equal(cp.extract_panel(grid, "bottom_right", geo, restore_size=True), square)
    tall = img(4, 16, 48)  # and a tall B in a tall panel: padded left and right of a 16 x 48 strip
    grid, _, geo = cp.four_panel_composite(img(1, 32, 48), img(2, 32, 48), tall, fit="pad", fill=0.0)
    assert torch.equal(cp.extract_panel(grid, "bottom_right", geo, restore_size=True), tall)


def test_center_crop_into_a_wide_panel_keeps_the_panels_aspect():
    """A 200 x 40 source into a 64 x 32 panel (2:1) is cropped to 80 x 40 (40 · 64 / 32), centred at x 60."""
    wide = img(5, 200, 40)
    grid, _, geo = cp.four_panel_composite(img(1, 64, 32), img(2, 64, 32), wide, fit="center_crop")
    box = geo.boxes["b"]
    assert (box.source_x, box.source_y, box.source_w, box.source_h) == (60, 0, 80, 40)
    torch.testing.assert_close(grid[:, 32:, :64], cp.resize(wide[:, :, 60:140], 64, 32))
    tall = img(6, 40, 200)  # a tall source into the same panel: full width, 20 rows (40 · 32 / 64)
    _, _, geo = cp.four_panel_composite(img(1, 64, 32), img(2, 64, 32), tall, fit="center_crop")
    box = geo.boxes["b"]
    assert (box.source_x, box.source_y, box.source_w, box.source_h) == (0, 90, 40, 20)


def test_resizing_a_hard_edge_stays_in_range():
    """Bicubic resampling overshoots at a hard edge (about -0.06..1.06 here); IMAGE values must stay in 0..1."""
    edge = torch.zeros(1, 8, 8, 3)
    edge[:, :, 4:] = 1.0
    raw = F.interpolate(edge.movedim(-1, 1), size=(32, 32), mode="bicubic", antialias=True).movedim(1, -1)
    assert raw.min() < -0.01 and raw.max() > 1.01  # the overshoot this test is about
    out = cp.resize(edge, 32, 32)
    assert out.min() == 0.0 and out.max() == 1.0
    torch.testing.assert_close(out, raw.clamp(0, 1))
    small = cp.resize(torch.cat([edge, edge], dim=2), 6, 5)  # downscaling too
    assert small.min() >= 0.0 and small.max() <= 1.0


def test_unknown_choices_are_refused(trio):
    a, ap, b = trio
    with pytest.raises(cp.CompositeError, match="layout: expected one of"):
        cp.four_panel_composite(a, ap, b, layout="grid")
    with pytest.raises(cp.CompositeError, match="fit: expected one of"):
        cp.four_panel_composite(a, ap, b, panel_size=(8, 8), fit="zoom")
    with pytest.raises(cp.CompositeError, match="panel size"):
        cp.four_panel_composite(a, ap, b, panel_size=(0, 8))
    with pytest.raises(cp.CompositeError, match="panel: expected one of"):
        cp.extract_panel(a, "middle")


def test_restore_size_rounds_b_span_to_the_nearest_pixel_of_a_rescaled_decode():
    """A decode at another size than the grid (154 x 100 for 96 x 64): B's x-span 8..40 of a 48-px panel lands at
    12.83..64.17 of the decode's 77-px panel, so B is cut from pixel 13 (nearest), not 12 (floor), to 64."""
    square = img(3, 32, 32)
    grid, _, geo = cp.four_panel_composite(img(1, 48, 32), img(2, 48, 32), square, fit="pad", fill=0.0)
    decode = F.interpolate(grid.movedim(-1, 1), size=(100, 154), mode="bilinear", align_corners=False).movedim(1, -1)
    panel = decode[:, 50:, 77:]                       # bottom right: split at the middle, 154 // 2, 100 // 2
    assert panel.shape[1:3] == (50, 77)
    want = cp.resize(panel[:, 0:50, 13:64], 32, 32)   # 8·77/48 = 12.83 → 13, 40·77/48 = 64.17 → 64
    floored = cp.resize(panel[:, 0:50, 12:64], 32, 32)
    assert (want - floored).abs().max() > 1e-3, "the span's first pixel must matter, or this checks nothing"
    torch.testing.assert_close(cp.extract_panel(decode, "bottom_right", geo, restore_size=True), want)


@pytest.mark.parametrize("fill", [-0.01, 1.01, float("nan")])
def test_a_fill_outside_0_to_1_is_refused(trio, fill):
    """The grey of the blank or padded panel is an image value: outside 0..1 it is refused, naming the value
    (0 and 1 themselves are fine and reach the panel)."""
    a, ap, b = trio
    for edge in (0.0, 1.0):
        grid, _, _ = cp.four_panel_composite(a, ap, b, layout="edit_transfer", fill=edge)
        assert torch.all(grid[:, 24:, 40:] == edge)
    with pytest.raises(cp.CompositeError, match="fill"):
        cp.four_panel_composite(a, ap, b, layout="edit_transfer", fill=fill)


def test_an_odd_sized_decode_splits_at_the_floored_middle_with_or_without_the_geometry():
    """83 x 61: the left panels are 41 px wide and the top ones 30 tall, whether the geometry is given or not (it
    once split at round(83 / 2) = 42 with it, banker's rounding, and at 41 without)."""
    grid, _, geo = cp.four_panel_composite(img(1, 16, 12), img(2, 16, 12), img(3, 16, 12), fit="pad", fill=0.0)
    decode = torch.rand(1, 61, 83, 3, generator=torch.Generator().manual_seed(5))
    for geometry in (geo, None):
        assert torch.equal(cp.extract_panel(decode, "top_left", geometry), decode[:, :30, :41])
        assert torch.equal(cp.extract_panel(decode, "top_right", geometry), decode[:, :30, 41:])
        assert torch.equal(cp.extract_panel(decode, "bottom_left", geometry), decode[:, 30:, :41])
        assert torch.equal(cp.extract_panel(decode, "bottom_right", geometry), decode[:, 30:, 41:])


def test_extract_panel_refuses_an_image_too_small_to_split():
    """A 1 × 1 image cannot hold four panels: the refusal names its size (a 2 × 2 one splits into four pixels)."""
    assert cp.extract_panel(torch.rand(1, 2, 2, 3)).shape == (1, 1, 1, 3)
    with pytest.raises(cp.CompositeError, match="image: 1x1 is too small to hold four panels"):
        cp.extract_panel(torch.rand(1, 1, 1, 3))
