"""The one place that touches ComfyUI internals for LoRAs: key maps, weight patches and the runtime wrapper.

- ``merge``: ComfyUI's own patch mechanism on a clone (``ModelPatcher.add_patches`` with ComfyUI's key map, including
  slices of FLUX's fused qkv / linear1 weights). ComfyUI merges in float32 and casts back, and unpatches/offloads as
  with any LoRA.
- ``runtime``: the base weights stay untouched; an APPLY_MODEL wrapper registers forward hooks for the duration of
  each model call that add ``strength * scale * (x @ down.T) @ up.T`` to the target layer's output (its row slice for
  fused weights). Works on fp8/quantised bases and switches LoRAs without re-merging.
"""

from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass

import torch
import torch.nn.functional as F

import comfy.lora
import comfy.model_base
import comfy.patcher_extension
import comfy.utils

from ..analogy_core.lora import LoRA, LoRAError, LoRALayer

log = logging.getLogger(__name__)
RUNTIME_WRAPPER_KEY = "analogy_runtime_lora"


def model_family(model_patcher) -> str:
    """sd15 / sdxl / flux / unknown for a ComfyUI MODEL."""
    base = model_patcher.model
    if isinstance(base, comfy.model_base.Flux):
        return "flux"
    if isinstance(base, comfy.model_base.SDXL):
        return "sdxl"
    config_name = type(getattr(base, "model_config", None)).__name__.lower()
    if config_name.startswith("sd15"):
        return "sd15"
    if config_name.startswith("sdxl"):
        return "sdxl"
    return "unknown"



def _candidates(path: str) -> tuple[str, ...]:
    """Names under which ComfyUI's key map may know a diffusers module path."""
    return ("transformer." + path, "lora_unet_" + path.replace(".", "_"), path, "diffusion_model." + path,
            "lora_transformer_" + path.replace(".", "_"))


def match_targets(lora: LoRA, model_patcher) -> tuple[dict[str, object], list[str]]:
    """({lora path: ComfyUI patch key}, [unmatched lora paths]) using ComfyUI's own key map for this model."""
    key_map = comfy.lora.model_lora_keys_unet(model_patcher.model, {})
    state_keys = set(model_patcher.model.state_dict().keys())
    matched, unmatched = {}, []
    for path, layer in lora.layers.items():
        for name in _candidates(path):
            target = key_map.get(name)
            if target is None:
                continue
            if _unpack(target)[0] in state_keys:
                matched[path] = target
                break
        else:
            unmatched.append(path)
    return matched, unmatched


def check_compatible(lora: LoRA, model_patcher, allow_partial: bool) -> tuple[dict[str, object], str]:
    """Refuse a LoRA for another model family or with keys that match nothing; return targets and a report."""
    family = model_family(model_patcher)
    if "unknown" not in (family, lora.family) and family not in lora.compatible_families:
        raise LoRAError(f"this LoRA is for {' or '.join(lora.compatible_families)} but the model is {family}")
    matched, unmatched = match_targets(lora, model_patcher)
    _check_shapes(lora, matched, model_patcher)
    if not matched:
        raise LoRAError(f"none of the LoRA's {len(lora)} layers matches a layer of this {family} model, "
                        f"e.g. {sorted(unmatched)[:3]}")
    report = f"matched {len(matched)}/{len(lora)} LoRA layers of the {family} model"
    if unmatched:
        listing = ", ".join(sorted(unmatched)[:5])
        if not allow_partial:
            raise LoRAError(f"{len(unmatched)} of {len(lora)} LoRA layers match nothing in this {family} model "
                            f"(e.g. {listing}); enable allow_partial to apply the rest anyway")
        report += f"; skipped {len(unmatched)} unmatched (e.g. {listing})"
    return matched, report


def _unpack(target) -> tuple[str, tuple[int, int, int] | None, object]:
    """A ComfyUI key-map target: "key", (key, (dim, offset, size)) or (key, slice or None, function on the diff)."""
    if isinstance(target, str):
        return target, None, None
    return target[0], target[1], target[2] if len(target) > 2 else None


def _row_permutation(function, rows: int) -> torch.Tensor:
    """The row order a key map's weight function applies (FLUX's final-layer shift/scale swap), checked to be a pure
    row permutation, which is all a low-rank update can follow exactly."""
    probe = torch.arange(rows, dtype=torch.float64).unsqueeze(1)
    moved = function(probe)
    order = moved.squeeze(1).round().long() if moved.shape == probe.shape else None
    if order is None or sorted(order.tolist()) != list(range(rows)):
        raise LoRAError(f"ComfyUI maps this layer through {getattr(function, '__name__', function)}, which is not a "
                        "row permutation; runtime mode cannot apply it (use merge)")
    return order


def _check_shapes(lora: LoRA, matched: dict[str, object], model_patcher) -> None:
    for path, target in matched.items():
        key, slice_, _ = _unpack(target)
        weight_shape = tuple(comfy.utils.get_attr(model_patcher.model, key).shape)
        layer = lora.layers[path]
        out_features = slice_[2] if slice_ else weight_shape[0]
        if (layer.out_features, layer.in_features) != (out_features, weight_shape[1]):
            raise LoRAError(f"{path}: LoRA is [{layer.out_features} x {layer.in_features}] but the model's layer "
                            f"{key} is [{out_features} x {weight_shape[1]}]")


# ---------------------------------------------------------------------------------------------------------------------
# merge


def apply_merge(model_patcher, lora: LoRA, strength: float, allow_partial: bool = False):
    matched, report = check_compatible(lora, model_patcher, allow_partial)
    state, to_load = {}, {}
    for path, target in matched.items():
        layer = lora.layers[path]
        name = f"analogy.{path}"
        # ComfyUI's LoRA adapter computes (alpha / rank) * up @ down in float32 on the weight's device.
        state[f"{name}.lora_up.weight"] = layer.up
        state[f"{name}.lora_down.weight"] = layer.down
        state[f"{name}.alpha"] = torch.tensor(float(layer.scale * layer.rank))
        to_load[name] = target
    patches = comfy.lora.load_lora(state, to_load, log_missing=False)
    patched = model_patcher.clone()
    applied = patched.add_patches(patches, strength)
    if len(applied) != len(patches):
        raise LoRAError(f"ComfyUI accepted {len(applied)} of {len(patches)} patches")
    return patched, f"{report} (merge, strength {strength:g})"


# ---------------------------------------------------------------------------------------------------------------------
# runtime


@dataclass
class _Piece:
    layer: LoRALayer
    offset: int | None
    size: int | None


class RuntimeLoRA:
    """Forward hooks that add the low-rank update to target layers during one model call."""

    def __init__(self, pieces: dict[str, list[_Piece]], strength: float):
        self.pieces = pieces  # module path (under BaseModel) -> pieces
        self.strength = strength
        self._cache: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}

    def _weights(self, piece: _Piece, device, dtype) -> tuple[torch.Tensor, torch.Tensor]:
        key = (id(piece), device, dtype)
        if key not in self._cache:
            self._cache[key] = (piece.layer.down.to(device=device, dtype=dtype),
                                piece.layer.up.to(device=device, dtype=dtype))
        return self._cache[key]

    def _hook(self, pieces: list[_Piece]):
        def hook(module, args, output):
            x = args[0]
            dtype = x.dtype if x.dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64) \
                else torch.bfloat16
            if any(piece.offset is not None for piece in pieces):
                output = output.clone()  # slices are added in place below
            for piece in pieces:
                down, up = self._weights(piece, x.device, dtype)
                scale = self.strength * piece.layer.scale
                if piece.layer.is_conv:
                    hidden = F.conv2d(x.to(dtype), down, stride=module.stride, padding=module.padding,
                                      dilation=module.dilation)
                    delta = F.conv2d(hidden, up) * scale
                    channel_dim = 1
                else:
                    delta = (x.to(dtype) @ down.t()) @ up.t() * scale
                    channel_dim = -1
                if piece.offset is None:
                    output = output + delta.to(output.dtype)
                else:
                    output.narrow(channel_dim, piece.offset, piece.size).add_(delta.to(output.dtype))
            return output
        return hook

    def __call__(self, executor, *args, **kwargs):
        base_model = executor.class_obj
        handles = []
        try:
            for module_path, pieces in self.pieces.items():
                module = comfy.utils.get_attr(base_model, module_path)
                handles.append(module.register_forward_hook(self._hook(pieces)))
            return executor(*args, **kwargs)
        finally:
            for handle in handles:
                handle.remove()


def apply_runtime(model_patcher, lora: LoRA, strength: float, allow_partial: bool = False):
    matched, report = check_compatible(lora, model_patcher, allow_partial)
    pieces: dict[str, list[_Piece]] = {}
    for path, target in matched.items():
        key, slice_, function = _unpack(target)
        module_path = key[: -len(".weight")]
        layer = lora.layers[path]
        if function is not None:  # e.g. FLUX's norm_out: native rows are (shift, scale), diffusers' (scale, shift)
            layer = LoRALayer(layer.down, layer.up[_row_permutation(function, layer.out_features)], layer.scale)
        offset, size = (slice_[1], slice_[2]) if slice_ else (None, None)
        if slice_ and slice_[0] != 0:
            raise LoRAError(f"{path}: ComfyUI slices {key} along dim {slice_[0]}; runtime mode handles dim 0 only")
        pieces.setdefault(module_path, []).append(_Piece(layer, offset, size))
    patched = model_patcher.clone()
    # A fresh key per application: chained Apply nodes in runtime mode stack, like chained LoRA loaders.
    key = f"{RUNTIME_WRAPPER_KEY}_{uuid.uuid4().hex}"
    patched.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.APPLY_MODEL, key, RuntimeLoRA(pieces, strength))
    return patched, f"{report} (runtime, strength {strength:g})"
