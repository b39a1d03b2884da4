"""LoRA of Change's data adapter: before/after pairs {a, a_prime: [S, S, 3], prompt} from the shared sources
(:mod:`training.data.sources`; the query B and target B′ are made from A and A′ by the trainer).

* ``magicbrush:<folder or .parquet file>`` — MagicBrush as distributed on the Hugging Face hub (see
  :class:`training.data.pairs.MagicBrush`); ``magicbrush_split`` picks ``train`` or ``dev``.
* ``pairs:<file.jsonl>`` / ``pairs:<folder>`` — see :mod:`training.data.pairs`.
* any quad source (``quads``, ``relation252k``, ``folder``, ``synthetic``): its (a, a′).
* with ``query_source: dataset``, only the quad sources, whose b and b′ the trainer then uses as B and B′.
* ``world[:options]`` — pairs of the analogy world's training families (registered by :mod:`training.world`);
  prompts are the families' instructions when ``world_instructions`` is on, else "".
"""

from __future__ import annotations

from torch.utils.data import Dataset

from training.data.readers import ROLES
from training.data.sources import PAIR_ROLES, Request, open_source


def make_pair_dataset(spec: str, resolution: int, fit: str = "stretch", split: str = "train",
                      world_instructions: bool = False, quads: bool = False) -> Dataset:
    """Pairs (a, a′), or with ``quads`` (``query_source: dataset``) items that also carry b and b′ (a pair-only
    source is then refused by name)."""
    options = {"split": split, "prompt": "instruction" if world_instructions else "neutral"}
    return open_source(spec, Request("loc", resolution, fit, options), ROLES if quads else PAIR_ROLES)
