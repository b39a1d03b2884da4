"""The ``world`` data source of every trainer (registered in :mod:`training.data.sources` on import): analogies of
the analogy world, generated from the index (no files).

    data=world                                         # training families on training scenes, neutral prompt
    data=world:families=heldout,scenes=heldout         # evaluation-style data
    data=world:families=invert+hflip,prompt=instruction

Options (comma-separated ``key=value``): ``families`` = ``train`` | ``heldout`` | ``all`` | names joined by ``+``;
``scenes`` = ``train`` | ``heldout``; ``prompt`` = ``neutral`` (the empty prompt: the edit can only come from the
analogy; the yardstick's choice) | ``instruction`` (the family's instruction). Item i is analogy i // F of family
i % F (F families), so every batch mixes families evenly. Items carry ``family`` and the true edit ``mask`` of B.

Per method: LoRWeB's prompt defaults to ``neutral``; Edit Transfer's to ``instruction``; LoRA of Change's to its
``world_instructions`` setting (it uses A and A′ only). The region predictor reads :class:`WorldRegions` (local
families, both modes; see :mod:`training.regions.data` for the item keys).
"""

from __future__ import annotations

import zlib
from dataclasses import replace

import numpy as np
import torch
from torch.utils.data import Dataset

from training.data.readers import DataError
from training.data.sources import Request, Source, register
from training.regions.data import ANALOGY_ROLES, TEXT_ROLES
from training.world import scenes as world

PROMPTS = ("neutral", "instruction")
WORLD_EDITORS = ("redraw", "truth", "inpaint")
LENGTH = 1 << 20  # items per "epoch"; analogies are generated, so the length only sets the sampler's permutations


def parse_spec(options: str, prompt: str = "neutral") -> dict[str, str]:
    values = {"families": "train", "scenes": "train", "prompt": prompt}
    for part in filter(None, (p.strip() for p in options.split(","))):
        key, sep, value = part.partition("=")
        if not sep or key not in values:
            raise ValueError(f"world data option must be one of {sorted(values)} as key=value, got {part!r} "
                             f"(e.g. data=world:families=train,scenes=train,prompt=neutral)")
        values[key] = value
    if values["prompt"] not in PROMPTS:
        raise ValueError(f"world data prompt must be one of {PROMPTS}, got {values['prompt']!r}")
    if values["scenes"] not in world.SCENE_SPLITS:
        raise ValueError(f"world data scenes must be one of {sorted(world.SCENE_SPLITS)}, got {values['scenes']!r}")
    return values


def family_list(spec: str) -> tuple[str, ...]:
    if spec in ("train", "heldout", "all"):
        return tuple(world.families(spec))
    names = tuple(spec.split("+"))
    for name in names:
        world.get_family(name)  # raises with the known names
    return names


class WorldAnalogies(Dataset):
    def __init__(self, resolution: int, families: tuple[str, ...], scenes: str = "train", prompt: str = "neutral",
                 length: int = LENGTH):
        if resolution % world.CELL:
            raise ValueError(f"world panels must be a multiple of {world.CELL} px, got {resolution}")
        self.resolution, self.families, self.scenes, self.prompt, self.length = (resolution, families, scenes,
                                                                                 prompt, length)

    @classmethod
    def from_spec(cls, options: str, resolution: int, prompt: str = "neutral", length: int = LENGTH
                  ) -> "WorldAnalogies":
        """``prompt`` is the default when ``options`` do not set one."""
        values = parse_spec(options, prompt)
        return cls(resolution, family_list(values["families"]), values["scenes"], values["prompt"], length)

    def __len__(self) -> int:
        return self.length

    def family(self, index: int) -> str:
        return self.families[index % len(self.families)]

    def __getitem__(self, index: int) -> dict:
        ex = world.example(self.family(index), self.scenes, index // len(self.families), self.resolution)
        prompt = ex.instruction if self.prompt == "instruction" else ""
        return {**ex.images(), "prompt": prompt, "family": ex.family, "mask": ex.mask.float()}


def local_families(split: str) -> list[str]:
    return [name for name in world.families(split) if world.get_family(name).kind == "local"]


def redraw(scene, seed: int, jitter: int = 2, tint: float = 0.04):
    """The scene drawn again: each object moved by up to ``jitter`` reference px and resized by up to ±``jitter``;
    returns the scene and a background tint offset (per channel, up to ±``tint``)."""
    rng = np.random.default_rng([world.WORLD_VERSION, 777, seed])
    objects = []
    for obj in scene.objects:
        dx, dy, ds = (int(v) for v in rng.integers(-jitter, jitter + 1, size=3))
        size = max(6, obj.size + ds)
        x = int(np.clip(obj.x + dx, 0, world.REFERENCE_SIZE - size))
        y = int(np.clip(obj.y + dy, 0, world.REFERENCE_SIZE - size))
        objects.append(replace(obj, x=x, y=y, size=size))
    return world.Scene(scene.background, tuple(objects)), rng.uniform(-tint, tint, size=3).astype(np.float32)


def render_redrawn(scene, seed: int, size: int) -> torch.Tensor:
    moved, tint = redraw(scene, seed)
    image, masks = world.render_layers(moved, size)
    background = np.ones((size, size, 1), dtype=bool)
    for mask in masks:
        background &= ~mask.numpy()[..., None]
    array = image.numpy()
    return torch.from_numpy(np.where(background, np.clip(array + tint, 0.0, 1.0), array).astype(np.float32))


class WorldRegions(Dataset):
    """The analogy world's local families on training scenes, for both modes (see the module docstring)."""

    def __init__(self, resolution: int, scenes: int = 4096, editor: str = "redraw", split: str = "train",
                 families: list[str] | None = None):
        if editor not in WORLD_EDITORS:
            raise ValueError(f"world_editor must be one of {WORLD_EDITORS}, got {editor!r}")
        self.world, self.resolution, self.scenes, self.editor, self.split = world, resolution, scenes, editor, split
        self.families = families or local_families("train")
        if not self.families:
            raise DataError("the analogy world has no local training families")

    def __len__(self) -> int:
        return self.scenes * len(self.families)

    def pair(self, family: str, k: int) -> dict:
        """Example k's before/after pair (A, A′) with its scene and captions, drawn as training.world.scenes.example
        draws them (scene seed 2k) without rendering B and B′."""
        fam = self.world.get_family(family)
        scene = self.world.scene_for(fam, self.split, 2 * k)
        before = self.world.render(scene, self.resolution)
        return {"scene": scene, "before": before, "after": fam.edit_image(scene, before, self.resolution),
                "source": self.world.describe(scene), "target": fam.caption(scene), "instruction": fam.instruction}

    def x_edit(self, family: str, k: int, pair: dict) -> torch.Tensor:
        if self.editor == "truth":
            return pair["after"]
        edited = self.world.get_family(family).scene_fn(pair["scene"])
        redrawn = render_redrawn(edited, seed=zlib.crc32(f"{family}/{self.split}/{k}".encode()), size=self.resolution)
        if self.editor == "redraw":
            return redrawn
        changed = (pair["before"] != pair["after"]).any(dim=-1, keepdim=True)
        return torch.where(changed, pair["after"], redrawn)

    def __getitem__(self, index: int) -> dict:
        family = self.families[index % len(self.families)]
        k = index // len(self.families)
        query, exemplar = self.pair(family, k), self.pair(family, (k + 1) % self.scenes)
        mask = (query["before"] != query["after"]).any(dim=-1).float()
        return {"image": query["before"], "edited": self.x_edit(family, k, query), "mask": mask,
                "has_mask": torch.tensor(True), "instruction": query["instruction"],
                "source_caption": query["source"], "target_caption": query["target"], "x": query["before"],
                "x_prime": query["after"], "a": exemplar["before"], "a_prime": exemplar["after"], "family": family}


# LoRA of Change and Edit Transfer drew from 4,096 analogies per "epoch" (the sampler's permutation length): kept, so
# their world runs draw the same items as before.
_LENGTHS = {"lorweb": LENGTH, "loc": 4096, "edit_transfer": 4096}
_PROMPTS = {"lorweb": "neutral", "edit_transfer": "instruction"}


def open_analogies(options: str, request: Request) -> Dataset:
    prompt = _PROMPTS.get(request.method) or request.options.get("prompt", "neutral")
    return WorldAnalogies.from_spec(options, request.resolution, prompt, _LENGTHS.get(request.method, LENGTH))


def open_regions(options: str, request: Request) -> Dataset:
    if options:
        raise ValueError(f"the region predictor's world data takes no options, got world:{options}")
    return WorldRegions(request.resolution, request.options["world_scenes"], request.options["world_editor"])


USAGE = "world[:families=..,scenes=..,prompt=..]"
register(Source("world", open_analogies, ("a", "a_prime", "b", "b_prime"), USAGE))
register(Source("world", open_regions, TEXT_ROLES + ANALOGY_ROLES, "world", method="regions"))
