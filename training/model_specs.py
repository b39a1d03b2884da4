"""Model specs that another package teaches the loaders: ``<scheme>:<rest>`` (or a bare ``<scheme>``).

The production loaders (:func:`training.backbone.load_backbone`, :func:`training.backbone.load_query_encoder`,
:func:`training.loc.ip2p.load_ip2p`, :func:`training.regions.models.load_clip` and ``load_instruction_encoder``) know
"tiny", local folders and cached model ids. A package that brings its own models registers a loader per kind for its
scheme; the analogy world registers ``world`` for every kind when :mod:`training.world` is imported::

    register_loader("backbone", "world", lambda rest, **kwargs: ...)

A registered loader receives the text after ``<scheme>:`` ("" for a bare ``<scheme>``) and the loader's keyword
arguments.
"""

from __future__ import annotations

from functools import partial
from typing import Any, Callable

KINDS = ("backbone", "query_encoder", "ip2p", "clip", "instruction_encoder")
_LOADERS: dict[tuple[str, str], Callable[..., Any]] = {}


def register_loader(kind: str, scheme: str, loader: Callable[..., Any]) -> None:
    if kind not in KINDS:
        raise ValueError(f"model kind must be one of {KINDS}, got {kind!r}")
    _LOADERS[(kind, scheme)] = loader


def registered_loader(kind: str, spec: str) -> Callable[..., Any] | None:
    """The loader registered for ``spec``'s scheme, with the rest of the spec bound, or None."""
    scheme, _, rest = spec.partition(":")
    loader = _LOADERS.get((kind, scheme))
    return partial(loader, rest) if loader else None
