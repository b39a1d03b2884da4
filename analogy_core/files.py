"""Safe tensor file I/O: safetensors only (never pickle), clear errors for damaged files, atomic writes."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin", ".pkl", ".pickle")


class TensorFileError(ValueError):
    """A tensor file is missing, of an unsafe format, truncated or corrupt."""


def read_safetensors(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Load every tensor (on CPU) and the header metadata of a .safetensors file."""
    path = Path(path)
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise TensorFileError(f"{path.name}: {path.suffix} files are Python pickles, which can run arbitrary code "
                              "when loaded; only .safetensors files are accepted (convert it with a trusted tool)")
    if not path.is_file():
        raise TensorFileError(f"{path}: no such file")
    size = path.stat().st_size
    if size < 8:
        raise TensorFileError(f"{path.name}: {size} bytes is too short to be a safetensors file")
    _check_header(path, size)
    try:
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            metadata = dict(handle.metadata() or {})
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    except (SafetensorError, OSError, RuntimeError, ValueError) as err:
        raise TensorFileError(f"{path.name}: not a readable safetensors file (truncated or corrupt?): {err}") from None
    return tensors, metadata


def _check_header(path: Path, size: int) -> None:
    """Validate the header length and the data extent before handing the file to safetensors."""
    with open(path, "rb") as handle:
        header_len = int.from_bytes(handle.read(8), "little")
        if header_len <= 0 or 8 + header_len > size:
            raise TensorFileError(f"{path.name}: not a safetensors file, or truncated (header of {header_len} bytes "
                                  f"in a {size}-byte file)")
        try:
            header = json.loads(handle.read(header_len))
        except ValueError:
            raise TensorFileError(f"{path.name}: corrupt safetensors header (not JSON)") from None
    ends = [entry["data_offsets"][1] for key, entry in header.items() if key != "__metadata__"]
    if ends and 8 + header_len + max(ends) > size:
        raise TensorFileError(f"{path.name}: truncated: the header describes {8 + header_len + max(ends)} bytes "
                              f"but the file has {size}")


def write_safetensors_atomic(tensors: dict[str, torch.Tensor], path: str | os.PathLike,
                             metadata: dict[str, str] | None = None) -> Path:
    """Write to a temporary file in the same folder, then rename: readers never see a half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata={k: str(v) for k, v in (metadata or {}).items()})
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
