"""The analogy world: procedural scenes and edit families with exact ground truth (ComfyUI-free, pure numpy/torch).

A *scene* is a flat background colour and two or three non-overlapping objects (square, disc or up-pointing
triangle; one of six colours; 3 x 3 cells), drawn with hard edges on a grid of 8-px cells (pixel art: a 64-px panel
is 8 x 8 cells, each of one colour; world version 2 — version 1 had 4-px cells). An *edit family* is a
fixed rule that applies to any scene it is defined on, chosen so that one example pair A → A′ shows the rule:

* global families change every pixel by an image function: ``invert``, ``grayscale``, ``channel_swap`` (RGB→BRG),
  ``hflip``, ``vflip``;
* local families change a known set of pixels by editing the scene and redrawing it: recolour every object of one
  colour to another, add a white square at a fixed corner, remove every object of one shape. Their *edit mask* is
  exactly the set of pixels where B and B′ differ (colours are chosen so that every changed pixel really changes).

Families are split into *training* and *held-out* families (each held-out family has a training sibling of the same
kind), scenes into training and held-out scenes by seed range (:data:`SCENE_SPLITS`). Everything is a pure function
of (family, split, index) and the world version, so two runs draw the same world.

Captions are procedural: per image (``"a picture of a large red disc at the top left and ... on a navy background"``;
global edits add a style word such as "negative") and per edit (the family's instruction), for the world CLIP and
for methods that read text.

What the world is not: natural images, textures, lighting, ambiguity. It is a yardstick in which a method's success
is a number, not evidence of quality on photographs.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Callable, Sequence

import numpy as np
import torch

# Version 2 (issue 20): 8-px cells (8 x 8 per panel, one latent pixel of an f=8 autoencoder each, so the world
# autoencoder is exact) and a palette whose every edit changes a cell by at least 0.20 in some channel (v1's slate
# background moved by 0.04 under grayscale: no one could see it). Version 1's caches are never reused.
WORLD_VERSION = 2
REFERENCE_SIZE = 64  # object coordinates are integers at this panel size; other sizes sample the same geometry
CELL = 8             # objects are drawn on a grid of CELL x CELL pixels (at the reference size)
OBJECT_CELLS = (3,)  # object sides in cells: the smallest at which disc (a plus), triangle and square differ

COLOURS: dict[str, tuple[float, float, float]] = {
    "red": (0.90, 0.16, 0.14), "green": (0.18, 0.78, 0.22), "blue": (0.16, 0.32, 0.95),
    "yellow": (0.96, 0.86, 0.12), "magenta": (0.84, 0.20, 0.80), "white": (1.0, 1.0, 1.0),
}
# Saturated dark backgrounds: grayscale and channel_swap change each by >= 0.20 (python -m training.world.metrics)
BACKGROUNDS: dict[str, tuple[float, float, float]] = {
    "navy": (0.06, 0.10, 0.42), "forest": (0.06, 0.40, 0.08), "plum": (0.46, 0.08, 0.44),
    "brown": (0.46, 0.22, 0.06),
}
SHAPES = ("square", "disc", "triangle")
# Scene seeds: training scenes and held-out scenes never share a seed.
SCENE_SPLITS = {"train": 0, "heldout": 1}
ADDED_SQUARE = 2 * CELL  # side of the square the "add" families draw (reference pixels)
CORNER_MARGIN = CELL


@dataclass(frozen=True)
class Obj:
    shape: str
    colour: str
    x: int      # left edge, reference pixels (a multiple of CELL)
    y: int      # top edge
    size: int   # side / diameter / base width (a multiple of CELL)

    def box(self) -> tuple[int, int, int, int]:
        return self.x, self.y, self.x + self.size, self.y + self.size


@dataclass(frozen=True)
class Scene:
    background: str
    objects: tuple[Obj, ...]

    def colours(self) -> set[str]:
        return {o.colour for o in self.objects}

    def shapes(self) -> set[str]:
        return {o.shape for o in self.objects}


# -------------------------------------------------------------------------------------------------------------------
# scenes


def _overlaps(a: tuple[int, int, int, int], b: tuple[int, int, int, int], gap: int = CELL) -> bool:
    return not (a[2] + gap <= b[0] or b[2] + gap <= a[0] or a[3] + gap <= b[1] or b[3] + gap <= a[1])


def pick(rng: np.random.Generator, options: Sequence):
    """``rng.choice(options)`` (the same draw from the same stream) without its per-call array conversion (about
    two fifths of sampling a scene, in a profile of Edit Transfer's trainer)."""
    return options[int(rng.integers(len(options)))]


def sample_scene(rng: np.random.Generator) -> Scene:
    """Two or three non-overlapping objects with distinct colours on one of the backgrounds (a layout where the
    objects do not all fit is drawn again from the same generator)."""
    background = str(pick(rng, list(BACKGROUNDS)))
    count = int(rng.integers(2, 4))
    colours = rng.permutation(list(COLOURS))[:count]
    objects: list[Obj] = []
    for _ in range(100):
        objects = []
        for colour in colours:
            for _ in range(50):
                size = CELL * int(pick(rng, OBJECT_CELLS))
                x, y = (CELL * int(v) for v in rng.integers(0, (REFERENCE_SIZE - size) // CELL + 1, size=2))
                candidate = Obj(str(pick(rng, SHAPES)), str(colour), x, y, size)
                if not any(_overlaps(candidate.box(), o.box()) for o in objects):
                    objects.append(candidate)
                    break
        if len(objects) == count:
            break
    return Scene(background, tuple(objects))


def scene_rng(split: str, seed: int, attempt: int = 0) -> np.random.Generator:
    if split not in SCENE_SPLITS:
        raise ValueError(f"scene split must be one of {sorted(SCENE_SPLITS)}, got {split!r}")
    return np.random.default_rng([WORLD_VERSION, SCENE_SPLITS[split], seed, attempt])


def _object_mask(obj: Obj, size: int) -> np.ndarray:
    """Pixels inside the object at panel size ``size``: a pixel belongs to the object when the centre of its cell
    (reference units) does. On 3 x 3 cells: square 9 cells, disc a plus of 5, triangle a pyramid of 4 (1 over 3)."""
    scale = REFERENCE_SIZE / size
    centres = (np.floor((np.arange(size) + 0.5) * scale / CELL) + 0.5) * CELL
    px, py = centres[None, :], centres[:, None]
    x0, y0, s = obj.x, obj.y, obj.size
    if obj.shape == "square":
        return (px >= x0) & (px < x0 + s) & (py >= y0) & (py < y0 + s)
    if obj.shape == "disc":  # a quarter cell inside the circle: corner cells out (else 3 cells draw a square)
        return (px - x0 - s / 2) ** 2 + (py - y0 - s / 2) ** 2 <= (s / 2 - CELL / 4) ** 2
    if obj.shape == "triangle":  # apex at the top centre, base on the bottom row: row r of the lower half is
        rows = s // CELL         # 2r + 1 cells wide (on 3 cells: 1 over 3; the top row stays background)
        row = np.floor((py - y0) / CELL) - (rows - (rows + 1) // 2)
        inside_box = (py >= y0) & (py < y0 + s) & (px >= x0) & (px < x0 + s)
        return inside_box & (row >= 0) & (np.abs(px - x0 - s / 2) <= row * CELL + CELL / 2)
    raise ValueError(f"unknown shape {obj.shape!r}")


def render_layers(scene: Scene, size: int = REFERENCE_SIZE) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """IMAGE [size, size, 3] in 0..1 and each object's visible-pixel mask (objects are drawn in order)."""
    image = np.empty((size, size, 3), dtype=np.float32)
    image[:] = BACKGROUNDS[scene.background]
    owner = np.full((size, size), -1, dtype=np.int64)
    for index, obj in enumerate(scene.objects):
        inside = _object_mask(obj, size)
        image[inside] = COLOURS[obj.colour]
        owner[inside] = index
    masks = [torch.from_numpy(owner == i) for i in range(len(scene.objects))]
    return torch.from_numpy(image), masks


def render(scene: Scene, size: int = REFERENCE_SIZE) -> torch.Tensor:
    return render_layers(scene, size)[0]


# -------------------------------------------------------------------------------------------------------------------
# captions

_SIZE_WORD = lambda s: "small" if s < 3 * CELL else "medium" if s < 4 * CELL else "large"  # noqa: E731


def _where(obj: Obj) -> str:
    cx, cy = obj.x + obj.size / 2, obj.y + obj.size / 2
    row = "top" if cy < REFERENCE_SIZE / 3 else "bottom" if cy >= 2 * REFERENCE_SIZE / 3 else "middle"
    col = "left" if cx < REFERENCE_SIZE / 3 else "right" if cx >= 2 * REFERENCE_SIZE / 3 else "centre"
    if row == "middle" and col == "centre":
        return "in the centre"
    return f"at the {row} {col}" if row != "middle" else f"at the {col}"


def describe(scene: Scene, style: str = "", shape_names: dict[str, str] | None = None) -> str:
    """Procedural caption of a scene; ``style`` is a word such as "negative" for globally edited images."""
    names = shape_names or {}
    ordered = sorted(scene.objects, key=lambda o: (o.y + o.size / 2, o.x + o.size / 2))
    parts = [f"a {_SIZE_WORD(o.size)} {o.colour} {names.get(o.shape, o.shape)} {_where(o)}" for o in ordered]
    things = ", ".join(parts[:-1]) + f" and {parts[-1]}" if len(parts) > 1 else parts[0]
    article = "an" if style[:1] in "aeiou" and style else "a"
    return f"{article} {style + ' ' if style else ''}picture of {things} on a {scene.background} background"


def _mirror(scene: Scene, horizontal: bool) -> Scene:
    def flip(o: Obj) -> Obj:
        if horizontal:
            return replace(o, x=REFERENCE_SIZE - o.x - o.size)
        return replace(o, y=REFERENCE_SIZE - o.y - o.size)
    return Scene(scene.background, tuple(flip(o) for o in scene.objects))


# -------------------------------------------------------------------------------------------------------------------
# families


def _grayscale(img: torch.Tensor) -> torch.Tensor:
    luma = img[..., 0:1] * 0.299 + img[..., 1:2] * 0.587 + img[..., 2:3] * 0.114
    return luma.expand_as(img).clone()


@dataclass(frozen=True)
class Family:
    """One edit rule. Global: ``image_fn`` maps an IMAGE to its edit. Local: ``scene_fn`` edits the scene, which is
    redrawn; ``applies`` says on which scenes the rule is visible (A and B are drawn from those)."""

    name: str
    kind: str                      # "global" | "local"
    split: str                     # "train" | "heldout"
    instruction: str
    image_fn: Callable[[torch.Tensor], torch.Tensor] | None = None
    scene_fn: Callable[[Scene], Scene] | None = None
    applies: Callable[[Scene], bool] = lambda scene: True
    caption: Callable[[Scene], str] = field(default=lambda scene: describe(scene))  # caption of the edited image
    sibling: str = ""              # the training family a held-out family mirrors

    def edit_image(self, scene: Scene, image: torch.Tensor, size: int) -> torch.Tensor:
        if self.kind == "global":
            return self.image_fn(image)
        return render(self.scene_fn(scene), size)


def _recolour(src: str, dst: str) -> Callable[[Scene], Scene]:
    return lambda s: Scene(s.background, tuple(replace(o, colour=dst) if o.colour == src else o for o in s.objects))


def _remove(shape: str) -> Callable[[Scene], Scene]:
    return lambda s: Scene(s.background, tuple(o for o in s.objects if o.shape != shape))


def _corner_box(corner: str) -> tuple[int, int, int, int]:
    lo, hi = CORNER_MARGIN, REFERENCE_SIZE - CORNER_MARGIN - ADDED_SQUARE
    x = lo if corner.endswith("left") else hi
    y = lo if corner.startswith("top") else hi
    return x, y, x + ADDED_SQUARE, y + ADDED_SQUARE


def _add_square(corner: str) -> Callable[[Scene], Scene]:
    x, y, _, _ = _corner_box(corner)
    return lambda s: Scene(s.background, s.objects + (Obj("square", "white", x, y, ADDED_SQUARE),))


def _corner_free(corner: str) -> Callable[[Scene], bool]:
    box = _corner_box(corner)
    return lambda s: not any(_overlaps(box, o.box()) for o in s.objects)


def _has_colour(src: str, dst: str) -> Callable[[Scene], bool]:
    return lambda s: src in s.colours() and dst not in s.colours()


def _has_shape(shape: str) -> Callable[[Scene], bool]:
    return lambda s: shape in s.shapes() and len(s.shapes()) > 1


def _global(name, split, instruction, fn, style, mirror=None, sibling=""):
    if mirror is None:
        caption = lambda s: describe(s, style)  # noqa: E731
    else:
        names = {"triangle": "upside-down triangle"} if mirror == "v" else None
        caption = lambda s: describe(_mirror(s, mirror == "h"), style, names)  # noqa: E731
    return Family(name, "global", split, instruction, image_fn=fn, caption=caption, sibling=sibling)


def _local(name, split, instruction, scene_fn, applies, sibling=""):
    return Family(name, "local", split, instruction, scene_fn=scene_fn, applies=applies,
                  caption=lambda s: describe(scene_fn(s)), sibling=sibling)


FAMILIES: dict[str, Family] = {f.name: f for f in (
    _global("invert", "train", "invert the colours", lambda x: 1.0 - x, "negative"),
    _global("grayscale", "train", "make it black and white", _grayscale, "grayscale"),
    _global("channel_swap", "train", "rotate the colour channels", lambda x: x[..., [2, 0, 1]].clone(),
            "colour-rotated"),
    _global("hflip", "train", "mirror it left to right", lambda x: x.flip(1), "", mirror="h"),
    _local("recolour_red_blue", "train", "make the red objects blue", _recolour("red", "blue"),
           _has_colour("red", "blue")),
    _local("add_square_top_left", "train", "add a white square at the top left", _add_square("top_left"),
           _corner_free("top_left")),
    _local("remove_discs", "train", "remove the discs", _remove("disc"), _has_shape("disc")),
    # held-out families: one sibling of each kind of training family
    _global("vflip", "heldout", "turn it upside down", lambda x: x.flip(0), "", mirror="v", sibling="hflip"),
    _local("recolour_green_magenta", "heldout", "make the green objects magenta", _recolour("green", "magenta"),
           _has_colour("green", "magenta"), sibling="recolour_red_blue"),
    _local("add_square_bottom_right", "heldout", "add a white square at the bottom right",
           _add_square("bottom_right"), _corner_free("bottom_right"), sibling="add_square_top_left"),
    _local("remove_squares", "heldout", "remove the squares", _remove("square"), _has_shape("square"),
           sibling="remove_discs"),
)}


def families(split: str = "all") -> list[str]:
    """Family names of a split ("train", "heldout" or "all"), in registry order."""
    if split == "all":
        return list(FAMILIES)
    if split not in ("train", "heldout"):
        raise ValueError(f"family split must be train, heldout or all, got {split!r}")
    return [name for name, f in FAMILIES.items() if f.split == split]


def get_family(name: str) -> Family:
    if name not in FAMILIES:
        raise ValueError(f"unknown world family {name!r}; known: {', '.join(FAMILIES)}")
    return FAMILIES[name]


def scene_for(family: Family, split: str, seed: int) -> Scene:
    """The scene of ``seed`` in ``split``, redrawn until the family's rule is visible on it (deterministic)."""
    for attempt in range(1000):
        scene = sample_scene(scene_rng(split, seed, attempt))
        if family.applies(scene):
            return scene
    raise RuntimeError(f"no scene for family {family.name} after 1000 draws (seed {seed})")


# -------------------------------------------------------------------------------------------------------------------
# examples


@dataclass
class Example:
    """One analogy with ground truth. Images [S, S, 3] in 0..1; ``mask`` [S, S] bool: where B′ differs from B for
    local families, all pixels for global ones."""

    family: str
    kind: str
    split: str
    a: torch.Tensor
    a_prime: torch.Tensor
    b: torch.Tensor
    b_prime: torch.Tensor
    mask: torch.Tensor
    captions: dict[str, str]
    instruction: str

    def images(self) -> dict[str, torch.Tensor]:
        return {"a": self.a, "a_prime": self.a_prime, "b": self.b, "b_prime": self.b_prime}


def _edit_mask(family: Family, scene: Scene, size: int) -> torch.Tensor:
    if family.kind == "global":
        return torch.ones(size, size, dtype=torch.bool)
    before, after = render(scene, size), render(family.scene_fn(scene), size)
    return (before != after).any(dim=-1)


def example(family: str, split: str, index: int, size: int = REFERENCE_SIZE) -> Example:
    """Analogy ``index`` of ``family`` on ``split`` scenes: A and B are different scenes of that split."""
    fam = get_family(family)
    scene_a = scene_for(fam, split, 2 * index)
    scene_b = scene_for(fam, split, 2 * index + 1)
    a, b = render(scene_a, size), render(scene_b, size)
    return Example(
        family=fam.name, kind=fam.kind, split=split, a=a, a_prime=fam.edit_image(scene_a, a, size), b=b,
        b_prime=fam.edit_image(scene_b, b, size), mask=_edit_mask(fam, scene_b, size),
        captions={"a": describe(scene_a), "a_prime": fam.caption(scene_a), "b": describe(scene_b),
                  "b_prime": fam.caption(scene_b)},
        instruction=fam.instruction)


# Looks of the images the backbones pretrain on: plain scenes and every global restyle (drawing, not editing: a
# backbone must be able to draw a negative or an upside-down picture to show any edit at all).
LOOKS = ("plain", "plain", "plain", "invert", "grayscale", "channel_swap", "hflip", "vflip")


def world_image(split: str, seed: int, size: int = REFERENCE_SIZE) -> tuple[torch.Tensor, str]:
    """One pretraining image of the world and its caption: a scene in one of :data:`LOOKS`."""
    rng = np.random.default_rng([WORLD_VERSION, SCENE_SPLITS[split], seed, 10_007])
    scene = sample_scene(scene_rng(split, seed))
    look = LOOKS[int(rng.integers(len(LOOKS)))]
    image = render(scene, size)
    if look == "plain":
        return image, describe(scene)
    fam = FAMILIES[look]
    return fam.image_fn(image), fam.caption(scene)


def caption_words() -> list[str]:
    """Every word the captions and instructions use (the world CLIP's vocabulary), split like a word tokenizer
    (``upside-down`` -> ``upside``, ``-``, ``down``; commas are words)."""
    words = {"a", "an", "picture", "of", "and", ",", "on", "background", "at", "the", "in", "centre", "top",
             "bottom", "middle", "left", "right", "small", "medium", "large", "negative", "grayscale", "colour",
             "-", "rotated", "upside", "down"}
    words |= set(COLOURS) | set(BACKGROUNDS) | set(SHAPES)
    for family in FAMILIES.values():
        words |= set(family.instruction.split())
    return sorted(words)


NEUTRAL_PROMPT = ""  # the prompt the world backbones are pretrained and evaluated with


def panel_pool(count: int, size: int, split: str = "train", offset: int = 0) -> torch.Tensor:
    """``count`` world images [N, size, size, 3] (plain scenes and global restyles)."""
    return torch.stack([world_image(split, offset + i, size)[0] for i in range(count)])
