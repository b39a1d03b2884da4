"""Skipping unreadable items and batching: :class:`ReadableItems` turns a reader's :class:`ItemError` into a skip
(logged and counted), :func:`collate` stacks items, :class:`StepBatchSampler` draws batches as a pure function of
(seed, step, rank), which makes resuming after a crash and multi-process sharding exact."""

from __future__ import annotations

import logging

import torch
from torch.utils.data import Dataset, Sampler

from training.data.readers import DataError, ItemError

log = logging.getLogger(__name__)


class ReadableItems(Dataset):
    """Wraps a reader: item i is the first readable item at or after position i (wrapping around), with the
    positions of the unreadable ones passed over in ``item["skipped_at"]`` (their number in ``item["skipped"]``).
    Deterministic, so resumed runs see the same items. ``bad_lines`` counts the index lines the reader dropped when
    it opened its index (JSONL formats), which never become items."""

    def __init__(self, dataset: Dataset, max_tries: int = 64):
        if len(dataset) == 0:
            raise DataError("the dataset is empty")
        self.dataset, self.max_tries = dataset, max_tries
        self.bad_lines = int(getattr(dataset, "bad_lines", 0))

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict:
        errors, passed = [], []
        for offset in range(min(self.max_tries, len(self.dataset))):
            position = (index + offset) % len(self.dataset)
            try:
                item = self.dataset[position]
            except ItemError as err:
                log.warning("skipping item %d: %s", position, err)
                errors.append(str(err))
                passed.append(position)
                continue
            return dict(item, skipped=len(errors), skipped_at=tuple(passed))
        raise DataError(f"{len(errors)} consecutive unreadable items from position {index}, e.g. {errors[:2]}")

    def probe(self, count: int = 32, minimum: int = 1) -> list[str]:
        """Read up to ``count`` items spread over the dataset; refuse it when fewer than half (or fewer than
        ``minimum``) are readable. Returns the errors seen."""
        size = len(self.dataset)
        positions = sorted({round(i * size / min(count, size)) % size for i in range(min(count, size))})
        errors = []
        for position in positions:
            try:
                self.dataset[position]
            except ItemError as err:
                errors.append(str(err))
        readable = len(positions) - len(errors)
        if readable < minimum or readable * 2 < len(positions):
            raise DataError(f"only {readable} of {len(positions)} probed items are readable (need at least "
                            f"{minimum} and half); first problems: {errors[:3]}")
        found = f"{len(errors)} of {len(positions)} probed items unreadable" + (f", e.g. {errors[0]}" if errors else "")
        bad = f"; {self.bad_lines} bad index lines skipped" if self.bad_lines else ""
        (log.warning if errors or self.bad_lines else log.info)("data check: %s%s", found, bad)
        return errors

    def first_items(self, count: int) -> list[dict]:
        """The first ``count`` readable items (for sample grids)."""
        items, position = [], 0
        while len(items) < min(count, len(self.dataset)) and position < len(self.dataset):
            item = self[position]
            items.append(item)
            position += item["skipped"] + 1
        return items


def collate(items: list[dict]) -> dict:
    """Stack a batch of readable items; ``skipped`` sums the unreadable ones passed over, ``skipped_at`` lists their
    positions once each."""
    if not items:
        raise DataError("empty batch")
    batch: dict = {"skipped": sum(item.get("skipped", 0) for item in items),
                   "skipped_at": sorted({p for item in items for p in item.get("skipped_at", ())})}
    for key in items[0]:
        if key in ("skipped", "skipped_at"):
            continue
        values = [item[key] for item in items]
        batch[key] = torch.stack(values) if isinstance(values[0], torch.Tensor) else values
    return batch


class StepBatchSampler(Sampler):
    """Index lists for micro-batch k = start, start+1, … of one process, as a pure function of (seed, k, rank).

    The sample stream is an endless sequence of epoch permutations; micro-batch k of a run with W processes takes
    positions [(k·W + rank)·B, … + B). Resuming at step s starts at k = s·accumulation, exactly where the run was.
    """

    def __init__(self, size: int, batch_size: int, seed: int, rank: int = 0, world: int = 1, start: int = 0):
        if size == 0:
            raise DataError("the dataset is empty")
        self.size, self.batch_size, self.seed = size, batch_size, seed
        self.rank, self.world, self.start = rank, world, start
        self._perms: dict[int, torch.Tensor] = {}

    def _position(self, p: int) -> int:
        epoch, offset = divmod(p, self.size)
        if epoch not in self._perms:
            gen = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
            self._perms = {epoch: torch.randperm(self.size, generator=gen)}
        return int(self._perms[epoch][offset])

    def batch(self, k: int) -> list[int]:
        first = (k * self.world + self.rank) * self.batch_size
        return [self._position(p) for p in range(first, first + self.batch_size)]

    def __iter__(self):
        k = self.start
        while True:
            yield self.batch(k)
            k += 1

    def __len__(self) -> int:  # endless; DataLoader only needs it for progress estimates
        return 2 ** 31
