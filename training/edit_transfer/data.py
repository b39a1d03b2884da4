"""Edit Transfer's data adapter: quads {a, a_prime, b, b_prime: [S, S, 3], prompt} from the shared sources
(:mod:`training.data.sources`), ``resolution`` being the panel side.

- ``folder:<dir>`` — the official format (CUC-MIPG/Edit-Transfer ``data/edit_transfer``, read by ai-toolkit): a
  folder of four-panel images ``[A A'; B B']`` with a same-named ``.txt`` prompt each.
- ``quads:<file.jsonl>``, ``relation252k:<dir>``, ``synthetic`` — as for LoRWeB.
- ``world[:options]`` — the analogy world's training families on training scenes, prompt = the family's
  instruction (registered by :mod:`training.world`).
"""

from __future__ import annotations

from torch.utils.data import Dataset

from training.data.readers import ROLES
from training.data.sources import Request, open_source


def make_edit_transfer_dataset(spec: str, resolution: int, fit: str = "stretch") -> Dataset:
    return open_source(spec, Request("edit_transfer", resolution, fit), ROLES)
