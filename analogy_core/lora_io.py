"""LoRA files: read any supported format into a :class:`LoRA`, write one in a standard format (safetensors only)."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from .files import (FLOAT_DTYPES, naming_file, read_json_file, read_tensor_file, show_value,
                    write_safetensors_atomic)
from .layouts import ModelLayout
from .lora import LoRA, LoRAError
from .lora_formats import ADAPTER_CONFIG, ADAPTER_WEIGHTS, ParsedLoRA, parse_state_dict, to_state_dict

# factors are floating point (float8 is upcast); integer dtypes are let through for alpha scalars, and a factor
# stored as an integer is refused by the parser by name
LORA_FILE_DTYPES = FLOAT_DTYPES | {"I64", "I32", "I16", "I8", "U8"}


def load_lora_file(path: str | os.PathLike, layout: ModelLayout | None = None) -> ParsedLoRA:
    """Read a LoRA of any supported key format. Every problem with the file is a TensorFileError or LoRAError whose
    message starts with the file name (see analogy_core.files for what is checked). A peft adapter saved by
    ``save_pretrained`` (``adapter_model.safetensors``) takes its alphas from the ``adapter_config.json`` beside it."""
    tf = read_tensor_file(path, "LoRA", dtypes=LORA_FILE_DTYPES, finite=False)  # the parser checks the values
    with naming_file(path, LoRAError):
        return parse_state_dict(tf.tensors, tf.metadata, layout, read_adapter_config(path))


# peft initialisations that also rewrite the base weight (PiSSA, OLoRA, CorDA; LoftQ quantises it)
_INITS_THAT_CHANGE_THE_BASE = ("pissa", "olora", "corda", "loftq")


def read_adapter_config(weights: str | os.PathLike) -> dict | None:
    """peft's ``adapter_config.json`` beside a file named ``adapter_model.safetensors`` (peft's own names), or None.

    Only that pairing is read: a config beside a file of another name may describe another adapter. The config must
    be a LoRA's (``peft_type`` LORA, no DoRA); its fields are checked where they are used
    (:func:`analogy_core.lora_formats.check_peft_config`)."""
    weights = Path(weights)
    config_path = weights.with_name(ADAPTER_CONFIG)
    if weights.name != ADAPTER_WEIGHTS or not config_path.is_file():
        return None
    name = ADAPTER_CONFIG  # messages follow the weights file's name (load_lora_file puts it in front)
    config = read_json_file(config_path, max_bytes=2**20, error=LoRAError)
    if not isinstance(config, dict):
        raise LoRAError(f"{name}: holds {show_value(config)}, expected a JSON object (peft's LoraConfig)")
    peft_type = config.get("peft_type", "LORA")
    if peft_type != "LORA":
        raise LoRAError(f"{name}: peft_type is {show_value(peft_type)}; this pack reads LoRA adapters (peft_type "
                        "LORA) — LoHa, LoKr and other peft adapters are not low-rank pairs it can apply")
    init = config.get("init_lora_weights")
    if isinstance(init, str) and init.lower().startswith(_INITS_THAT_CHANGE_THE_BASE):
        raise LoRAError(f"{name}: init_lora_weights is {show_value(init)} — such an adapter is a difference from a "
                        "base weight its initialisation changed, not from the model's own, so applied to the model it "
                        "gives the wrong weights; save it with peft's path_initial_model_for_weight_conversion (which "
                        "turns it into a plain LoRA) or merge it with peft")
    if config.get("use_dora") not in (None, False):
        raise LoRAError(f"{name}: use_dora is {show_value(config['use_dora'])} — a DoRA adapter rescales each "
                        "weight by its magnitude vector, which a plain LoRA cannot express; this pack applies plain "
                        "LoRA only (merge the adapter with peft's merge_and_unload, or train it without DoRA)")
    return config


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
