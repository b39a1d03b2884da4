"""LoRWeB's data adapter: analogy quads {a, a_prime, b, b_prime: [S, S, 3], prompt} from the shared sources
(:mod:`training.data.sources`): ``relation252k:<folder>`` (the official data; ``caption_source`` picks whose
instruction captions a pair), ``quads:<file.jsonl>``, ``folder:<dir>``, ``synthetic`` and, with :mod:`training.world`
imported, ``world[:options]``."""

from __future__ import annotations

from torch.utils.data import Dataset

from training.data.readers import ROLES
from training.data.sources import Request, open_source


def make_dataset(spec: str, resolution: int, fit: str = "stretch", caption_source: str = "a") -> Dataset:
    return open_source(spec, Request("lorweb", resolution, fit, {"caption_source": caption_source}), ROLES)
