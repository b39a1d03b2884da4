"""LoRA files: read any supported format into a :class:`LoRA`, write one in a standard format (safetensors only)."""

from __future__ import annotations

import os
from pathlib import Path

import torch

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


SAVE_DTYPES = {"keep": None, "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def save_lora_file(lora: LoRA, path: str | os.PathLike, key_format: str = "auto",
                   layout: ModelLayout | None = None, dtype: torch.dtype | None = None) -> Path:
    """Write ``lora`` as safetensors. ``dtype`` None keeps the tensors' dtype, or float32 where layers mix dtypes
    (a mixed basis LoRA holds float32 ``down`` and basis-dtype ``up``), so a file has one dtype throughout."""
    lora.check_finite()
    if dtype is None:
        dtypes = {t.dtype for layer in lora.layers.values() for t in (layer.down, layer.up)}
        dtype = torch.float32 if len(dtypes) > 1 else None
    if dtype is not None:
        lora = lora.to(dtype)
    tensors, metadata = to_state_dict(lora, key_format, layout)
    return write_safetensors_atomic(tensors, path, metadata)
