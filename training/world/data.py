"""The ``world`` data spec of the trainers: analogies of the analogy world, generated from the index (no files).

    data=world                                         # training families on training scenes, neutral prompt
    data=world:families=heldout,scenes=heldout         # evaluation-style data
    data=world:families=invert+hflip,prompt=instruction

Options (comma-separated ``key=value``): ``families`` = ``train`` | ``heldout`` | ``all`` | names joined by ``+``;
``scenes`` = ``train`` | ``heldout``; ``prompt`` = ``neutral`` (the empty prompt: the edit can only come from the
analogy; the yardstick's choice) | ``instruction`` (the family's instruction). Item i is analogy i // F of family
i % F (F families), so every batch mixes families evenly. Items carry ``family`` and the true edit ``mask`` of B.
"""

from __future__ import annotations

import torch
from torch.utils.data import Dataset

from analogy_core import world

PROMPTS = ("neutral", "instruction")
LENGTH = 1 << 20  # items per "epoch"; analogies are generated, so the length only sets the sampler's permutations


def parse_spec(options: str) -> dict[str, str]:
    values = {"families": "train", "scenes": "train", "prompt": "neutral"}
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
    def from_spec(cls, options: str, resolution: int) -> "WorldAnalogies":
        values = parse_spec(options)
        return cls(resolution, family_list(values["families"]), values["scenes"], values["prompt"])

    def __len__(self) -> int:
        return self.length

    def family(self, index: int) -> str:
        return self.families[index % len(self.families)]

    def __getitem__(self, index: int) -> dict:
        ex = world.example(self.family(index), self.scenes, index // len(self.families), self.resolution)
        prompt = ex.instruction if self.prompt == "instruction" else ""
        return {**ex.images(), "prompt": prompt, "family": ex.family, "mask": ex.mask.float()}


def make_world_dataset(options: str, resolution: int) -> Dataset:
    return WorldAnalogies.from_spec(options, resolution)
