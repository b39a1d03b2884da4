"""The analogy world's examples (no models): B′ is the family's function of B, masks are exactly where B and B′
differ, splits never share scenes, everything is deterministic."""

from __future__ import annotations

import hashlib
import re

import numpy as np
import pytest
import torch

from training.world import scenes as world
from training.world.data import WorldAnalogies, parse_spec

SIZE = world.REFERENCE_SIZE


def colour(name: str) -> torch.Tensor:
    return torch.tensor(world.COLOURS.get(name) or world.BACKGROUNDS[name])


def expected_global(family: str, b: torch.Tensor) -> torch.Tensor:
    """Each global family written out independently of the world module."""
    if family == "invert":
        return 1.0 - b
    if family == "grayscale":
        y = 0.299 * b[..., 0] + 0.587 * b[..., 1] + 0.114 * b[..., 2]
        return torch.stack([y, y, y], dim=-1)
    if family == "channel_swap":
        return torch.stack([b[..., 2], b[..., 0], b[..., 1]], dim=-1)
    if family == "hflip":
        return b[:, torch.arange(SIZE - 1, -1, -1)]
    if family == "vflip":
        return b[torch.arange(SIZE - 1, -1, -1)]
    raise AssertionError(family)


def pixels_equal(region: torch.Tensor, rgb: torch.Tensor) -> bool:
    return bool((region == rgb.float()).all())


@pytest.mark.parametrize("family", world.families("all"))
@pytest.mark.parametrize("split", ["train", "heldout"])
def test_b_prime_is_the_family_function_of_b(family, split):
    fam = world.get_family(family)
    for index in range(6):
        ex = world.example(family, split, index, SIZE)
        assert not torch.equal(ex.a, ex.b), "A and B are different scenes"
        assert not torch.equal(ex.b, ex.b_prime) and not torch.equal(ex.a, ex.a_prime), "the edit is visible"
        if fam.kind == "global":
            torch.testing.assert_close(ex.b_prime, expected_global(family, ex.b), rtol=0, atol=1e-6)
            torch.testing.assert_close(ex.a_prime, expected_global(family, ex.a), rtol=0, atol=1e-6)
            assert ex.mask.all()
            continue
        changed = (ex.b != ex.b_prime).any(dim=-1)
        assert torch.equal(ex.mask, changed), "the mask is exactly where B and B′ differ"
        assert 0 < int(ex.mask.sum()) < SIZE * SIZE // 3
        inside_b, inside_b_prime = ex.b[ex.mask], ex.b_prime[ex.mask]
        if family.startswith("recolour_"):
            src, dst = family.split("_")[1:]
            assert pixels_equal(inside_b, colour(src)) and pixels_equal(inside_b_prime, colour(dst))
            assert not (ex.b_prime == colour(src).float()).all(dim=-1).any(), "no object of the old colour is left"
        elif family.startswith("add_square_"):
            assert pixels_equal(inside_b_prime, colour("white"))
            ys, xs = torch.nonzero(ex.mask, as_tuple=True)
            side = world.ADDED_SQUARE * SIZE // world.REFERENCE_SIZE
            assert int(ys.max() - ys.min()) + 1 == side and int(xs.max() - xs.min()) + 1 == side
            assert len(ys) == side * side, "a square"
            top = family.endswith("top_left")
            assert (int(ys.min()) < SIZE // 2) == top and (int(xs.min()) < SIZE // 2) == top
        elif family.startswith("remove_"):
            # the background is the most common colour of B′; removed objects uncover it
            values, counts = ex.b_prime.reshape(-1, 3).unique(dim=0, return_counts=True)
            assert pixels_equal(inside_b_prime, values[counts.argmax()]), "removed objects uncover the background"
            shape = family.split("_")[1][:-1]  # remove_discs -> disc
            assert shape in ex.captions["b"] and shape not in ex.captions["b_prime"]
        else:
            raise AssertionError(f"no check written for family {family}")


def test_images_are_pixel_art_on_8px_cells_and_deterministic():
    assert world.CELL == 8 and world.WORLD_VERSION == 2
    ex = world.example("remove_discs", "train", 3, SIZE)
    for image in ex.images().values():
        cells = image.view(SIZE // world.CELL, world.CELL, SIZE // world.CELL, world.CELL, 3)
        assert (cells == cells[:, :1, :, :1]).all(), "every 8x8 cell is one colour"
    again = world.example("remove_discs", "train", 3, SIZE)
    assert all(torch.equal(x, y) for x, y in zip(ex.images().values(), again.images().values()))
    assert torch.equal(ex.mask, again.mask) and ex.captions == again.captions


@pytest.mark.parametrize("shape, cells", [
    ("square", ["###", "###", "###"]),
    ("disc", [".#.", "###", ".#."]),        # corner cells out: three cells would otherwise draw a square
    ("triangle", ["...", ".#.", "###"]),    # apex on top, base on the bottom row
])
def test_shapes_on_three_cells(shape, cells):
    obj = world.Obj(shape, "red", 2 * world.CELL, world.CELL, 3 * world.CELL)
    image = world.render(world.Scene("navy", (obj,)))
    grid = image[world.CELL // 2::world.CELL, world.CELL // 2::world.CELL]   # one pixel per cell
    red = (grid == torch.tensor(world.COLOURS["red"])).all(dim=-1)
    drawn = ["".join("#" if red[1 + r, 2 + c] else "." for c in range(3)) for r in range(3)]
    assert drawn == cells
    assert int(red.sum()) == sum(row.count("#") for row in cells), "nothing drawn outside the object's box"


def test_scenes_hold_two_or_three_objects():
    counts = [len(world.sample_scene(world.scene_rng("train", index)).objects) for index in range(300)]
    assert set(counts) == {2, 3}


def test_every_edit_changes_a_cell_visibly():
    """Version 2's palette: every global family moves every colour it changes by >= 0.2 (v1's slate moved 0.04)."""
    palette = torch.tensor([*world.COLOURS.values(), *world.BACKGROUNDS.values()])[None, :, None]  # [1, N, 1, 3]
    for family in ("invert", "grayscale", "channel_swap"):
        edited = world.get_family(family).image_fn(palette)
        change = (edited - palette).abs().amax(dim=-1)
        assert float(change[change > 1e-6].min()) >= 0.2, family


def test_training_and_held_out_scenes_differ():
    seen = set()
    for index in range(200):
        seen.add(world.render(world.sample_scene(world.scene_rng("train", index))).numpy().tobytes())
    held = [world.render(world.sample_scene(world.scene_rng("heldout", index))).numpy().tobytes()
            for index in range(200)]
    assert not seen.intersection(held)


def test_family_splits_and_siblings():
    train, held = world.families("train"), world.families("heldout")
    assert set(train).isdisjoint(held) and len(train) >= 6 and len(held) >= 3
    kinds = {world.get_family(f).kind for f in train}
    assert kinds == {"global", "local"}
    for name in held:  # every held-out family has a training sibling of the same kind
        fam = world.get_family(name)
        assert fam.sibling in train and world.get_family(fam.sibling).kind == fam.kind


def test_captions_use_the_vocabulary_and_name_the_content():
    vocab = set(world.caption_words())
    for family in world.families("all"):
        ex = world.example(family, "heldout", 1, SIZE)
        for text in [*ex.captions.values(), ex.instruction]:
            words = re.findall(r"\w+|[^\w\s]+", text)
            assert set(words) <= vocab, set(words) - vocab
    ex = world.example("recolour_red_blue", "train", 0, SIZE)
    assert "red" in ex.captions["b"] and "red" not in ex.captions["b_prime"] and "blue" in ex.captions["b_prime"]
    assert world.example("invert", "train", 0).captions["a_prime"].startswith("a negative picture")


def test_world_data_spec():
    data = WorldAnalogies.from_spec("families=train,scenes=heldout,prompt=instruction", 64)
    fams = world.families("train")
    assert [data.family(i) for i in range(len(fams))] == fams
    item = data[len(fams) + 2]
    ex = world.example(fams[2], "heldout", 1, 64)
    assert torch.equal(item["b_prime"], ex.b_prime) and item["prompt"] == ex.instruction
    assert WorldAnalogies.from_spec("", 64)[0]["prompt"] == "", "neutral prompt by default"
    with pytest.raises(ValueError, match="prompt"):
        parse_spec("prompt=loud")
    with pytest.raises(ValueError, match="unknown world family"):
        WorldAnalogies.from_spec("families=invert+paint", 64)
    assert np.isclose(float(item["mask"].mean()), float(ex.mask.float().mean()))


def world_digest() -> str:
    """SHA-256 over world v2's first scenes of each split (their repr) and the images of its first examples."""
    digest = hashlib.sha256()
    for split in sorted(world.SCENE_SPLITS):
        for seed in range(100):
            digest.update(repr(world.sample_scene(world.scene_rng(split, seed))).encode())
        for family in sorted(world.FAMILIES):
            for index in range(8):
                for role, image in world.example(family, split, index, 64).images().items():
                    digest.update(role.encode() + image.numpy().tobytes())
    return digest.hexdigest()


def test_world_v2_draws_the_scenes_it_always_drew():
    """Every cached model, ceiling and figure of world v2 was made on these scenes: a change to how scenes are drawn
    or rendered must bump WORLD_VERSION (so no cache is reused), not slip in under v2. Digest of world v2 as measured
    (2026-12-07)."""
    assert world.WORLD_VERSION == 2
    assert world_digest() == "2ed40c0498dde217b9354cf55ce7a8a4aa305fff5feeb624b4b3e13a986a98e5"


@pytest.mark.parametrize("x, y, where", [
    (0, 0, "at the top left"), (16, 0, "at the top centre"), (40, 0, "at the top right"),
    (0, 16, "at the left"), (16, 16, "in the centre"), (40, 16, "at the right"),
    (0, 40, "at the bottom left"), (16, 40, "at the bottom centre"), (40, 40, "at the bottom right"),
])
def test_a_caption_places_an_object_in_its_third_of_the_panel(x, y, where):
    """A 3-cell object's centre (x + 12, y + 12 px) falls in one third of the 64-px panel per axis: the caption names
    that row and column (written out by hand), so left and right, top and bottom are never swapped."""
    scene = world.Scene("navy", (world.Obj("square", "red", x, y, 3 * world.CELL),))
    assert world.describe(scene) == f"a picture of a medium red square {where} on a navy background"


def test_mirror_captions_place_the_objects_where_the_mirrored_image_shows_them():
    """hflip/vflip captions describe the mirrored picture: an object at the top left of B is at the top right of the
    hflip and at the bottom left of the vflip (whose triangles point down); one in the middle row stays there under
    vflip (its 3-cell box at y = 16 mirrors to y = 64 - 16 - 24 = 24). Written out by hand."""
    side = 3 * world.CELL
    scene = world.Scene("navy", (world.Obj("triangle", "red", 0, 0, side), world.Obj("disc", "blue", 40, 16, side)))
    assert world.describe(scene) == ("a picture of a medium red triangle at the top left and a medium blue disc "
                                     "at the right on a navy background")
    assert world.get_family("hflip").caption(scene) == (
        "a picture of a medium red triangle at the top right and a medium blue disc at the left on a navy background")
    assert world.get_family("vflip").caption(scene) == (
        "a picture of a medium blue disc at the right and a medium red upside-down triangle at the bottom left "
        "on a navy background")


def test_pretraining_images_draw_every_look_including_the_flips():
    """world_image draws each seed's scene plain or in one of the global restyles (LOOKS): over 120 seeds every look,
    the last one (vflip) included, is drawn, each image is its look's function of the plain render (told apart by
    comparing with every look written out here), and the caption is that look's caption."""
    looks = {"plain": lambda img: img, "invert": lambda img: 1.0 - img,
             "grayscale": lambda img: expected_global("grayscale", img),
             "channel_swap": lambda img: expected_global("channel_swap", img),
             "hflip": lambda img: expected_global("hflip", img), "vflip": lambda img: expected_global("vflip", img)}
    assert set(world.LOOKS) == set(looks)
    drawn = []
    for seed in range(120):
        image, caption = world.world_image("train", seed, SIZE)
        scene = world.sample_scene(world.scene_rng("train", seed))
        plain = world.render(scene, SIZE)
        matches = [name for name, fn in looks.items() if torch.allclose(image, fn(plain), atol=1e-6)]
        assert matches, f"seed {seed}: the image is none of the looks"
        if len(matches) == 1:
            look = matches[0]
            drawn.append(look)
            expected = world.describe(scene) if look == "plain" else world.get_family(look).caption(scene)
            assert caption == expected, (seed, look)
    assert set(drawn) == set(looks), set(looks) - set(drawn)
    assert drawn.count("plain") > drawn.count("vflip"), "plain is three of the eight looks"
