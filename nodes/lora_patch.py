"""The one place that touches ComfyUI internals for LoRAs: key maps, weight patches and the runtime wrapper.

- ``merge``: ComfyUI's own patch mechanism on a clone (``ModelPatcher.add_patches`` with ComfyUI's key map, including
  slices of FLUX's fused qkv / linear1 weights); ComfyUI merges, unpatches and offloads as with any LoRA. Its
  precision is the host's: for a layer loaded whole, up @ down is computed in float32 and added to a copy of the
  weight, float32 in 0.3.75 and ``comfy.model_management.lora_compute_dtype(device)`` in newer hosts (float16 on GPUs
  that run fp16 well, float32 on CPU), then rounded to the stored dtype (stochastically for fp8). Layers that stay
  offloaded (lowvram, and every layer under newer hosts' dynamic VRAM) are patched at each use in the weight's own
  compute dtype (e.g. bfloat16).
- ``runtime``: the base weights stay untouched; an APPLY_MODEL wrapper registers forward hooks for the duration of
  each model call that add ``strength * scale * (x @ down.T) @ up.T`` to the target layer's output (its row slice for
  fused weights), computed in the activations' dtype. The factors live in a small module with its own ModelPatcher,
  attached to the patched MODEL as an additional model, so ComfyUI loads, counts, offloads and frees them with the
  model. Works on fp8/quantised bases and switches LoRAs without re-merging.
"""

from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass

import torch
import torch.nn.functional as F

import comfy.lora
import comfy.model_patcher
import comfy.patcher_extension
import comfy.utils

from ..analogy_core.layouts import TRANSFORMER_FAMILIES
from ..analogy_core.lora import LoRA, LoRAError, LoRALayer
from ..analogy_core.lora_formats import comfy_patch_keys, layout_for_lora
from . import comfy_compat

log = logging.getLogger(__name__)
RUNTIME_WRAPPER_KEY = "analogy_runtime_lora"


model_family = comfy_compat.model_family  # sd15 / sdxl / flux (FLUX.1) / flux2 / qwen_image, or a class name


def _candidates(path: str) -> tuple[str, ...]:
    """Names under which ComfyUI's key map may know a diffusers module path."""
    return ("transformer." + path, "lora_unet_" + path.replace(".", "_"), path, "diffusion_model." + path,
            "lora_transformer_" + path.replace(".", "_"))


def match_targets(lora: LoRA, model_patcher) -> tuple[dict[str, object], list[str]]:
    """({lora path: ComfyUI patch key}, [unmatched lora paths]) using ComfyUI's own key map for this model; layers
    that map lacks (FLUX.2's MLPs, single blocks and shared modulations in ComfyUI 0.3.75) go to their BFL/native
    weight through the pack's layout of the LoRA's own family, which the contract tests check against newer hosts'
    maps."""
    key_map = comfy.lora.model_lora_keys_unet(model_patcher.model, {})
    state_keys = set(model_patcher.model.state_dict().keys())
    native = _native_keys(lora)
    matched, unmatched = {}, []
    for path in lora.layers:
        targets = [key_map.get(name) for name in _candidates(path)] + [native.get(path)]
        target = next((t for t in targets if t is not None and _unpack(t)[0] in state_keys), None)
        if target is None:
            unmatched.append(path)
        else:
            matched[path] = target
    return matched, unmatched


def _native_keys(lora: LoRA) -> dict[str, object]:
    """Patch keys from the pack's own layout for DiT families whose native names ComfyUI uses (FLUX.1, FLUX.2,
    Qwen-Image); nothing for SD UNets and LoRAs of unknown family (ComfyUI's key map covers those)."""
    if lora.family not in TRANSFORMER_FAMILIES:
        return {}
    try:
        return comfy_patch_keys(lora, layout_for_lora(lora))
    except LoRAError:  # not a consistent layout of its family (e.g. a hand-made LoRA): ComfyUI's map only
        return {}


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
    """Every matched layer against the model's actual weight (its row slice for fused weights): a LoRA of another
    width of the same family (FLUX.2 dev vs klein, a pruned variant) is refused here, naming the layer."""
    wrong = []
    for path, target in matched.items():
        key, slice_, _ = _unpack(target)
        weight_shape = tuple(comfy.utils.get_attr(model_patcher.model, key).shape)
        layer = lora.layers[path]
        out_features = slice_[2] if slice_ else weight_shape[0]
        if (layer.out_features, layer.in_features) != (out_features, weight_shape[1]):
            wrong.append(f"{path}: LoRA is [{layer.out_features} x {layer.in_features}] but the model's layer "
                         f"{key} is [{out_features} x {weight_shape[1]}]")
    if wrong:
        more = f" ({len(wrong)} of {len(matched)} layers do not fit this model)" if len(wrong) > 1 else ""
        raise LoRAError(wrong[0] + more)


# ---------------------------------------------------------------------------------------------------------------------
# merge


def apply_merge(model_patcher, lora: LoRA, strength: float, allow_partial: bool = False):
    matched, report = check_compatible(lora, model_patcher, allow_partial)
    state, to_load = {}, {}
    for path, target in matched.items():
        layer = lora.layers[path]
        name = f"analogy.{path}"
        # ComfyUI's LoRA adapter adds (alpha / rank) * up @ down (see the module docstring for its precision).
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


class _Factors(torch.nn.Module):
    """down and up of one target layer as parameters of a leaf module, so ComfyUI loads, counts and offloads them
    like any layer."""

    def __init__(self, down: torch.Tensor, up: torch.Tensor, dtype: torch.dtype):
        super().__init__()
        self.down = torch.nn.Parameter(down.to(dtype), requires_grad=False)  # no copy when the dtype matches
        self.up = torch.nn.Parameter(up.to(dtype), requires_grad=False)
        # LoRA tensors the parameters share storage with; put back after an offload so that the host does not
        # hold each factor twice (the LoRA itself stays alive in ComfyUI's node cache).
        self._sources = {name: t for name, t in (("down", down), ("up", up)) if t.dtype == dtype}

    def restore_sources(self) -> None:
        for name, source in self._sources.items():
            param = getattr(self, name)
            if param.device == source.device and param.data_ptr() != source.data_ptr():
                param.data = source


class LoRAWeights(torch.nn.Module):
    """The factors of one runtime-mode application. They get their own ModelPatcher, attached to the patched MODEL
    as an additional model, so ComfyUI loads them with the model (counting their bytes), offloads them with it and
    frees them on unload; nothing else keeps device copies."""

    def __init__(self, layers: list[LoRALayer], dtype: torch.dtype, token: str):
        super().__init__()
        self.factors = torch.nn.ModuleList(_Factors(layer.down, layer.up, dtype) for layer in layers)
        self.token = token  # identifies this application's weights among a patcher's additional models

    def restore_sources(self) -> None:
        for factors in self.factors:
            factors.restore_sources()


@dataclass(frozen=True)
class _Target:
    index: int  # into LoRAWeights.factors
    offset: int | None  # row slice of a fused weight (FLUX qkv / linear1)
    size: int | None
    scale: float


def _restore_after_offload(patcher, unpatch_all: bool) -> None:
    if unpatch_all:
        patcher.model.restore_sources()


def _weights_patcher(layers: list[LoRALayer], dtype: torch.dtype, token: str, load_device, offload_device,
                     disable_dynamic: bool = False):
    weights = LoRAWeights(layers, dtype, token)
    if disable_dynamic:
        patcher = comfy.model_patcher.ModelPatcher(weights, load_device=load_device, offload_device=offload_device)
    else:
        patcher = comfy_compat.new_patcher(weights, load_device, offload_device)
    patcher.add_callback_with_key(comfy.patcher_extension.CallbacksMP.ON_DETACH, RUNTIME_WRAPPER_KEY,
                                  _restore_after_offload)
    # Newer hosts rebuild additional models for each extra GPU (multi-GPU) or as non-dynamic delegates from this.
    patcher.cached_patcher_init = (_weights_patcher, (layers, dtype, token, load_device, offload_device))
    return patcher


class RuntimeLoRA:
    """APPLY_MODEL wrapper: forward hooks that add the low-rank update to the target layers during one model call."""

    def __init__(self, targets: dict[str, list[_Target]], weights: LoRAWeights, strength: float):
        self.targets = targets  # module path (under BaseModel) -> targets
        self.weights = weights
        self.strength = strength

    def _weights_for(self, base_model) -> LoRAWeights:
        """This application's factors as ComfyUI loaded them for the running patcher (a multi-GPU clone of the model
        has its own copy); otherwise the ones created with the wrapper (shared by clones)."""
        patcher = getattr(base_model, "current_patcher", None)
        if patcher is not None and hasattr(patcher, "get_additional_models_with_key"):
            for extra in patcher.get_additional_models_with_key(RUNTIME_WRAPPER_KEY):
                if getattr(extra.model, "token", None) == self.weights.token:
                    return extra.model
        return self.weights

    def _hook(self, weights: LoRAWeights, targets: list[_Target]):
        def hook(module, args, output):
            x = args[0]
            dtype = x.dtype if x.dtype in comfy_compat.FLOAT_DTYPES else torch.bfloat16
            if any(target.offset is not None for target in targets):
                output = output.clone()  # slices are added in place below
            for target in targets:
                factors = weights.factors[target.index]
                # Already there when ComfyUI loaded them (a no-op); a transient copy for the call otherwise.
                down = factors.down.to(device=x.device, dtype=dtype)
                up = factors.up.to(device=x.device, dtype=dtype)
                scale = self.strength * target.scale
                if down.ndim == 4:
                    hidden = F.conv2d(x.to(dtype), down, stride=module.stride, padding=module.padding,
                                      dilation=module.dilation)
                    delta = F.conv2d(hidden, up) * scale
                    channel_dim = 1
                else:
                    delta = (x.to(dtype) @ down.t()) @ up.t() * scale
                    channel_dim = -1
                if target.offset is None:
                    output = output + delta.to(output.dtype)
                else:
                    output.narrow(channel_dim, target.offset, target.size).add_(delta.to(output.dtype))
            return output
        return hook

    def __call__(self, executor, *args, **kwargs):
        base_model = executor.class_obj
        weights = self._weights_for(base_model)
        handles = []
        try:
            for module_path, targets in self.targets.items():
                module = comfy.utils.get_attr(base_model, module_path)
                handles.append(module.register_forward_hook(self._hook(weights, targets)))
            with comfy_compat.model_compiler_paused():
                return executor(*args, **kwargs)
        finally:
            for handle in handles:
                handle.remove()


def apply_runtime(model_patcher, lora: LoRA, strength: float, allow_partial: bool = False):
    matched, report = check_compatible(lora, model_patcher, allow_partial)
    layers: list[LoRALayer] = []
    targets: dict[str, list[_Target]] = {}
    for path, target in matched.items():
        key, slice_, function = _unpack(target)
        layer = lora.layers[path]
        if function is not None:  # e.g. FLUX's norm_out: native rows are (shift, scale), diffusers' (scale, shift)
            layer = LoRALayer(layer.down, layer.up[_row_permutation(function, layer.out_features)], layer.scale)
        if slice_ and slice_[0] != 0:
            raise LoRAError(f"{path}: ComfyUI slices {key} along dim {slice_[0]}; runtime mode handles dim 0 only")
        offset, size = (slice_[1], slice_[2]) if slice_ else (None, None)
        targets.setdefault(key[: -len(".weight")], []).append(_Target(len(layers), offset, size, layer.scale))
        layers.append(layer)
    patched = model_patcher.clone()
    token = uuid.uuid4().hex
    lora_patcher = _weights_patcher(layers, comfy_compat.compute_dtype(patched.model), token, patched.load_device,
                                    patched.offload_device)
    # Chained Apply nodes in runtime mode stack, like chained LoRA loaders: one weights patcher and wrapper each.
    stacked = patched.get_additional_models_with_key(RUNTIME_WRAPPER_KEY) + [lora_patcher]
    patched.set_additional_models(RUNTIME_WRAPPER_KEY, stacked)
    patched.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.APPLY_MODEL, f"{RUNTIME_WRAPPER_KEY}_{token}",
                                 RuntimeLoRA(targets, lora_patcher.model, strength))
    return patched, f"{report} (runtime, strength {strength:g}, {_size(lora_patcher.model_size())} of LoRA weights)"


def _size(num_bytes: int) -> str:
    return f"{num_bytes / 2 ** 20:.1f} MB" if num_bytes >= 2 ** 20 else f"{num_bytes / 2 ** 10:.1f} KB"
