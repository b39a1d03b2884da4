"""Training data of the region predictor: instruction JSONL (text mode), grouped before/after pairs (analogy mode) and
the analogy world (both).

Every reader returns square images of ``resolution`` px (stretched: the CLIP input is the whole image resized to a
square, so the patch grid covers it exactly). Item keys:

* text mode: ``image`` [S, S, 3], ``instruction``, ``source_caption`` (t_o), ``target_caption`` (t_e), ``edited``
  [S, S, 3] (X_edit: what a frozen generator made of the image for t_e; needed when L_CLIP is on), ``mask`` [S, S]
  and ``has_mask`` (an optional true edit region: used only by ``mask_weight`` and for IoU in samples);
* analogy mode: ``a``, ``a_prime`` (the exemplar pair) and ``x``, ``x_prime`` (a second pair of the same edit; the
  region is predicted on ``x`` and its target is where ``x`` and ``x_prime`` differ).

``data`` specs:

* ``jsonl:<file>`` — one object per line, paths relative to the file::

      {"image": "cat.jpg", "instruction": "make the cat wear a hat", "source_caption": "a cat on a sofa",
       "target_caption": "a cat wearing a hat on a sofa", "edited": "cat_edit.jpg", "mask": "cat_mask.png"}

  ``edited`` and ``mask`` are optional (``edited`` is required while β > 0; make it offline with any generator:
  an img2img/inpainting pass of the whole image toward ``target_caption``). Captions can be produced offline with
  ``python -m training.region_captions`` (the paper's MLLM/LLM step). Masks: white = edit region.
* ``pairs:<file>`` — lines ``{"a": before, "a_prime": after, "group": name}`` (``group`` defaults to the line's
  ``prompt``/``instruction``): pairs of one group show the same edit; each pair is a query once, with the next pair
  of its group as the exemplar (itself when the group has one pair).
* ``world`` — the analogy world's *local* training families on training scenes (:mod:`training.world.scenes`). Item k
  of family f uses example k's before/after pair (A, A′) as the query (its instruction and captions for text mode,
  its difference as the target) and example k+1's (A, A′) as the exemplar. B, B′ and B's mask are never read: they
  are the evaluation's (held-out scenes). ``world_editor`` says what X_edit is in text mode:
  ``redraw`` — the edited scene drawn again with every object moved by up to 2 px, resized by up to ±2 px, and the
  background tint shifted a little: a generator that redraws the whole picture for t_e reproduces the scene only
  approximately, and the paper's structure loss is what keeps the region off the parts it did not need to change;
  ``truth`` — the exact edited image A′ (then the region receives no L_CLIP gradient outside the true edit, since
  X_res does not depend on M where X_edit = X); ``inpaint`` — A′ exactly on the pixels the edit changes and the
  redraw elsewhere: what a generator that is told the region paints (the edit in place, the rest re-imagined).
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from training.data.readers import DataError, ItemError, load_rgb, read_jsonl, to_panel
from training.data.sources import Request, Source, open_source, register

log = logging.getLogger(__name__)
TEXT_KEYS = ("image", "instruction", "source_caption", "target_caption")


def load_mask(path: Path, resolution: int) -> torch.Tensor:
    """A mask image (white = region; any mode, alpha ignored) → [S, S] float 0/1 (nearest resize, so it stays
    binary)."""
    try:
        with Image.open(path) as img:
            gray = img.convert("L").resize((resolution, resolution), Image.NEAREST)
            array = np.asarray(gray, dtype=np.float32)
    except Image.DecompressionBombError as err:
        raise ItemError(f"{path}: refused as a decompression bomb ({err})") from None
    except (OSError, ValueError, SyntaxError, EOFError) as err:
        raise ItemError(f"{path}: unreadable mask ({type(err).__name__}: {err})") from None
    return torch.from_numpy((array > 127.5).astype(np.float32))


class InstructionJsonl(Dataset):
    """Text-mode items from a JSONL file (see the module docstring)."""

    def __init__(self, index: str | Path, resolution: int, need_edited: bool):
        self.index, self.resolution, self.need_edited = Path(index), resolution, need_edited
        self.records, self.bad_lines = read_jsonl(self.index, self._problem, "index")
        if not self.records:
            raise DataError(f'{self.index}: no usable record; each line must be {{"image": path, "instruction": '
                            'text, "source_caption": text, "target_caption": text[, "edited": path][, "mask": path]}')

    @staticmethod
    def _problem(record: dict) -> str | None:
        bad = [k for k in TEXT_KEYS if not isinstance(record.get(k), str) or not record[k].strip()]
        if bad:
            return f"record lacks non-empty strings {bad}"
        wrong = [k for k in ("edited", "mask") if k in record and not isinstance(record[k], str)]
        return f"{wrong} must be paths (strings)" if wrong else None

    def __len__(self) -> int:
        return len(self.records)

    def _image(self, number: int, role: str, name: str) -> torch.Tensor:
        try:
            return to_panel(load_rgb(self.index.parent / name), self.resolution, "stretch")
        except ItemError as err:
            raise ItemError(f"{self.index}:{number} ({role}): {err}") from None

    def __getitem__(self, index: int) -> dict:
        number, record = self.records[index]
        image = self._image(number, "image", record["image"])
        if "edited" in record:
            edited = self._image(number, "edited", record["edited"])
        elif self.need_edited:
            raise ItemError(f"{self.index}:{number}: no \"edited\" image, which L_CLIP needs (β > 0): add X_edit, a "
                            "frozen generator's edit of the image toward target_caption, or set beta=0")
        else:
            edited = image
        if "mask" in record:
            try:
                mask = load_mask(self.index.parent / record["mask"], self.resolution)
            except ItemError as err:
                raise ItemError(f"{self.index}:{number} (mask): {err}") from None
        return {"image": image, "edited": edited,
                "mask": mask if "mask" in record else torch.zeros(self.resolution, self.resolution),
                "has_mask": torch.tensor("mask" in record),
                **{k: record[k] for k in ("instruction", "source_caption", "target_caption")}}


class GroupedPairs(Dataset):
    """Analogy-mode items from a JSONL file of before/after pairs with a group (see the module docstring)."""

    def __init__(self, index: str | Path, resolution: int):
        self.index, self.resolution = Path(index), resolution
        self.records, self.bad_lines = read_jsonl(self.index, self._problem, "index")
        if not self.records:
            raise DataError(f'{self.index}: no usable record; each line must be {{"a": path, "a_prime": path, '
                            '"group": name}')
        groups: dict[str, list[int]] = {}
        for position, (_, record) in enumerate(self.records):
            groups.setdefault(self.group(record), []).append(position)
        self.exemplar = {}
        for members in groups.values():
            for i, position in enumerate(members):
                self.exemplar[position] = members[(i + 1) % len(members)]
        alone = sum(1 for members in groups.values() if len(members) == 1)
        if alone:
            log.warning("%s: %d of %d groups have a single pair (it is its own exemplar)", self.index, alone,
                        len(groups))

    @staticmethod
    def group(record: dict) -> str:
        for key in ("group", "prompt", "instruction"):
            if isinstance(record.get(key), str) and record[key].strip():
                return record[key].strip()
        return ""

    @staticmethod
    def _problem(record: dict) -> str | None:
        bad = [k for k in ("a", "a_prime") if not isinstance(record.get(k), str)]
        return f"record lacks string image paths {bad}" if bad else None

    def __len__(self) -> int:
        return len(self.records)

    def _pair(self, position: int) -> tuple[torch.Tensor, torch.Tensor]:
        number, record = self.records[position]
        out = []
        for role in ("a", "a_prime"):
            try:
                out.append(to_panel(load_rgb(self.index.parent / record[role]), self.resolution, "stretch"))
            except ItemError as err:
                raise ItemError(f"{self.index}:{number} ({role}): {err}") from None
        return out[0], out[1]

    def __getitem__(self, index: int) -> dict:
        x, x_prime = self._pair(index)
        a, a_prime = self._pair(self.exemplar[index]) if self.exemplar[index] != index else (x, x_prime)
        return {"a": a, "a_prime": a_prime, "x": x, "x_prime": x_prime}


# ---------------------------------------------------------------------------------------------------------------------
# the analogy world


TEXT_ROLES = ("image",)
ANALOGY_ROLES = ("a", "a_prime", "x", "x_prime")


def make_region_dataset(spec: str, mode: str, resolution: int, need_edited: bool, world_editor: str = "redraw",
                        world_scenes: int = 4096) -> Dataset:
    """The region predictor's adapter: ``jsonl`` (text mode), ``pairs`` (analogy mode) or, with
    :mod:`training.world` imported, ``world``."""
    options = {"mode": mode, "need_edited": need_edited, "world_editor": world_editor, "world_scenes": world_scenes}
    roles = TEXT_ROLES if mode == "text" else ANALOGY_ROLES
    return open_source(spec, Request("regions", resolution, "stretch", options), roles)


register(Source("jsonl", lambda loc, r: InstructionJsonl(loc, r.resolution, r.options["need_edited"]), TEXT_ROLES,
                "jsonl:<file> (mode text)", needs_location=True, method="regions"))
register(Source("pairs", lambda loc, r: GroupedPairs(loc, r.resolution), ANALOGY_ROLES,
                "pairs:<file> (mode analogy)", needs_location=True, method="regions"))
