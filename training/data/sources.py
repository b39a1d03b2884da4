"""One registry of training-data sources: ``data=<kind>[:<location>]`` for every trainer.

A source reads one format and yields items: dicts of images ``[S, S, 3]`` (float, 0..1) under the analogy roles
``a``, ``a_prime``, ``b``, ``b_prime`` (the standard item; pair sources give ``a``/``a_prime`` only), a ``prompt``
and, where known, ``family`` and ``mask``. Each trainer has a small adapter (``training/<method>/data.py``) that asks
for the roles it needs; a source that does not give them is refused by name, as is an unknown kind. An unreadable
item raises :class:`~training.data.readers.ItemError`, which :class:`~training.data.batching.ReadableItems` turns
into a counted skip for every trainer alike.

Adding a source::

    register(Source("kind", open_kind, roles=("a", "a_prime"), usage="kind:<folder>", needs_location=True))

``open_kind(location, request)`` returns a ``torch.utils.data.Dataset``. A source registered with ``method=`` serves
that method only and takes precedence over a shared source of the same kind (the region predictor's ``pairs``
format differs from LoRA of Change's). The analogy world registers its ``world`` source per method when
:mod:`training.world` is imported (the ``python -m training.train_*`` commands do).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

from torch.utils.data import Dataset

from training.data.analogies import FourPanelFolder, Quads, Relation252K, SyntheticAnalogies
from training.data.pairs import FolderPairs, JsonlPairs, MagicBrush
from training.data.readers import ROLES

PAIR_ROLES = ROLES[:2]


@dataclass(frozen=True)
class Request:
    """What a trainer asks of a source: its name, the panel side and fit, and method-specific options."""

    method: str
    resolution: int
    fit: str = "stretch"
    options: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Source:
    kind: str
    open: Callable[[str, Request], Dataset]
    roles: tuple[str, ...]           # image roles every item carries
    usage: str                       # how a user writes it, e.g. "quads:<file.jsonl>"
    needs_location: bool = False     # "kind:<location>" required (else the part after ":" is optional options)
    method: str | None = None        # serves this method only


_SOURCES: dict[tuple[str, str | None], Source] = {}


def register(source: Source) -> Source:
    _SOURCES[(source.kind, source.method)] = source
    return source


def sources_for(method: str, roles: tuple[str, ...]) -> list[Source]:
    """The sources a method can read: its own, then the shared ones that give ``roles`` (sorted by kind)."""
    own = {kind: s for (kind, m), s in _SOURCES.items() if m == method}
    shared = {kind: s for (kind, m), s in _SOURCES.items() if m is None and kind not in own}
    return sorted((s for s in [*own.values(), *shared.values()] if set(roles) <= set(s.roles)), key=lambda s: s.kind)


def open_source(spec: str, request: Request, roles: tuple[str, ...]) -> Dataset:
    """The dataset for ``data`` = ``spec``; a clear error for an unknown kind, a source without the roles the
    method needs, or a missing location."""
    kind, _, location = spec.partition(":")
    usable = sources_for(request.method, roles)
    source = next((s for s in usable if s.kind == kind), None)
    if source is None:
        known = _SOURCES.get((kind, request.method)) or _SOURCES.get((kind, None))
        why = (f"{kind!r} data gives {', '.join(known.roles)} but {request.method} needs {', '.join(roles)}; "
               if known else "")
        raise ValueError(f"{why}{request.method} data must be one of {', '.join(s.usage for s in usable)}; "
                         f"got {spec!r}")
    if source.needs_location and not location:
        raise ValueError(f"data {spec!r}: write it as {source.usage}")
    return source.open(location, request)


def _pairs(location: str, request: Request) -> Dataset:
    path = Path(location)
    return (FolderPairs if path.is_dir() else JsonlPairs)(path, request.resolution, request.fit)


register(Source("synthetic", lambda _, r: SyntheticAnalogies(r.resolution), ROLES, "synthetic"))
register(Source("relation252k", lambda loc, r: Relation252K(loc, r.resolution, r.fit,
                                                            r.options.get("caption_source", "a")),
                ROLES, "relation252k:<folder>", needs_location=True))
register(Source("quads", lambda loc, r: Quads(loc, r.resolution, r.fit), ROLES, "quads:<file.jsonl>",
                needs_location=True))
register(Source("folder", lambda loc, r: FourPanelFolder(loc, r.resolution, r.fit), ROLES,
                "folder:<dir> (four-panel images + .txt prompts, the official Edit Transfer format)",
                needs_location=True))
register(Source("magicbrush", lambda loc, r: MagicBrush(loc, r.resolution, r.fit, r.options.get("split", "train")),
                PAIR_ROLES, "magicbrush:<folder|file.parquet>", needs_location=True))
register(Source("pairs", _pairs, PAIR_ROLES, "pairs:<file.jsonl|folder>", needs_location=True))
