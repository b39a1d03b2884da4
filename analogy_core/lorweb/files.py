"""LoRA basis files on disk: telling a basis from an ordinary LoRA by its header, and finding its config.yaml.

* :func:`is_basis_file` reads only the safetensors header (metadata and key names, no tensor data) and caches the
  answer by (path, mtime, size), so listing a large ``loras`` folder stays cheap on every refresh.
* The official release ships ``config.yaml`` one folder above ``lorweb_model/lorweb_model.safetensors``; an official
  training run writes it beside the weights. :func:`load_basis_with_settings` looks in both places (or takes an
  explicit path) and records the settings in the basis. Settings the basis file itself records (this pack's trainer)
  win over a config.yaml found by location; an explicit config.yaml that contradicts them is an error.
"""

from __future__ import annotations

import os
from pathlib import Path

from ..files import probe_header
from .basis import BasisError, LoRABasis, load_basis
from .settings import METADATA_KEY, LoRWeBSettingsError, read_lorweb_config

CONFIG_NAME = "config.yaml"
BASIS_KEY_SUFFIXES = (".lora_keys", ".att_lora_to_q.weight")
_HEADER_CACHE: dict[tuple[str, int, int], bool] = {}


def is_basis_file(path: str | os.PathLike) -> bool:
    """Whether a .safetensors file's header says it is a LoRWeB basis (our metadata, or basis key names as in the
    released file, which has no metadata). Unreadable files are not bases."""
    path = os.fspath(path)
    try:
        stat = os.stat(path)
    except OSError:
        return False
    key = (os.path.realpath(path), stat.st_mtime_ns, stat.st_size)
    if key not in _HEADER_CACHE:
        _HEADER_CACHE[key] = _read_is_basis(path)
    return _HEADER_CACHE[key]


def _read_is_basis(path: str) -> bool:
    header = probe_header(path)
    if header is None:  # not a readable safetensors file: not something Load LoRA Basis can read
        return False
    return header.metadata.get("analogy.kind") == "lorweb_basis" or any(
        k.endswith(BASIS_KEY_SUFFIXES) for k in header.entries)


def find_basis_config(basis_path: str | os.PathLike) -> Path | None:
    """config.yaml beside the basis file, else one folder up (the released layout), else None."""
    folder = Path(basis_path).resolve().parent
    for candidate in (folder / CONFIG_NAME, folder.parent / CONFIG_NAME):
        if candidate.is_file():
            return candidate
    return None


def load_basis_with_settings(path: str | os.PathLike, config_path: str | os.PathLike | None = None
                             ) -> tuple[LoRABasis, str]:
    """Load a basis and attach how it must be mixed; returns the basis and a sentence saying where that came from."""
    basis = load_basis(path)
    explicit = bool(config_path)
    found = Path(config_path) if explicit else find_basis_config(path)
    recorded = METADATA_KEY in basis.metadata
    if found is None:
        return basis, f"settings: {basis.settings.source}"
    if recorded and not explicit:
        return basis, f"settings: {basis.settings.source} (ignored {found}: the file records its own)"
    try:
        config = read_lorweb_config(found)
        config.check_shapes(basis.num_entries, basis.rank, basis.key_dim, basis.query_dim)
    except LoRWeBSettingsError as err:
        hint = "" if explicit else " (found next to the basis; pass the right one as config_path)"
        raise BasisError(f"{err}{hint}") from None
    if recorded and config.settings != basis.settings:
        raise BasisError(f"{found} contradicts the settings recorded in {Path(path).name}: "
                         f"{config.settings.describe()} vs {basis.settings.describe()}")
    return basis.with_settings(config.settings), f"settings: {found}"
