"""LoRA files: read any supported format into a :class:`LoRA`, write one in a standard format (safetensors only)."""

from __future__ import annotations

import os
from pathlib import Path

from .files import read_safetensors, write_safetensors_atomic
from .layouts import ModelLayout
from .lora import LoRA
from .lora_formats import ParsedLoRA, parse_state_dict, to_state_dict


def load_lora_file(path: str | os.PathLike, layout: ModelLayout | None = None) -> ParsedLoRA:
    tensors, metadata = read_safetensors(path)
    try:
        return parse_state_dict(tensors, metadata, layout)
    except ValueError as err:
        raise type(err)(f"{Path(path).name}: {err}") from None


def save_lora_file(lora: LoRA, path: str | os.PathLike, key_format: str = "auto",
                   layout: ModelLayout | None = None) -> Path:
    lora.check_finite()
    tensors, metadata = to_state_dict(lora, key_format, layout)
    return write_safetensors_atomic(tensors, path, metadata)
