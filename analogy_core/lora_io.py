"""LoRA files: read any supported format into a :class:`LoRA`, write one in a standard format (safetensors only)."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from .files import FLOAT_DTYPES, naming_file, read_tensor_file, write_safetensors_atomic
from .layouts import ModelLayout
from .lora import LoRA, LoRAError
from .lora_formats import ParsedLoRA, parse_state_dict, to_state_dict

# factors are floating point (float8 is upcast); integer dtypes are let through for alpha scalars, and a factor
# stored as an integer is refused by the parser by name
LORA_FILE_DTYPES = FLOAT_DTYPES | {"I64", "I32", "I16", "I8", "U8"}


def load_lora_file(path: str | os.PathLike, layout: ModelLayout | None = None) -> ParsedLoRA:
    """Read a LoRA of any supported key format. Every problem with the file is a TensorFileError or LoRAError whose
    message starts with the file name (see analogy_core.files for what is checked)."""
    tf = read_tensor_file(path, "LoRA", dtypes=LORA_FILE_DTYPES, finite=False)  # the parser checks the values
    with naming_file(path, LoRAError):
        return parse_state_dict(tf.tensors, tf.metadata, layout)


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
