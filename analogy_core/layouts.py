"""Layer inventories of the supported backbones and the mapping between their two naming schemes.

A LoRA in this pack is keyed by **diffusers** module paths. Files in the wild also use the **native** names of the
original code bases (ComfyUI uses them internally too): the LDM UNet names of SD1.5/SDXL (``input_blocks.1.1...``)
and Black Forest Labs' FLUX names (``double_blocks.0.img_attn.qkv``), where one native weight can hold several
diffusers layers stacked along its output rows (FLUX's fused q/k/v and ``linear1``). A :class:`ModelLayout` knows,
for one backbone configuration, every targetable layer's shape and its native location.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from functools import lru_cache

import torch

# Standard configurations (public model configs; no download needed).
SD15_UNET_CONFIG = dict(
    sample_size=64, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=768, attention_head_dim=8,
)
SDXL_UNET_CONFIG = dict(
    sample_size=128, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    cross_attention_dim=2048, attention_head_dim=(5, 10, 20), transformer_layers_per_block=(1, 2, 10),
    use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816,
)
FLUX_CONFIG = dict(num_layers=19, num_single_layers=38, attention_head_dim=128, num_attention_heads=24,
                   in_channels=64, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True)


@dataclass(frozen=True)
class NativeTarget:
    """Where a diffusers layer lives in the native layout: a module path and, for fused weights, its row slice.

    ``swap_halves``: the native weight stores the two halves of the output rows in the other order (FLUX's final
    modulation is (shift, scale) natively, (scale, shift) in diffusers); a LoRA's ``up`` is converted by
    :func:`swap_row_halves` both ways.
    """

    path: str
    offset: int | None = None
    size: int | None = None
    swap_halves: bool = False


def swap_row_halves(tensor: torch.Tensor) -> torch.Tensor:
    """[a; b] -> [b; a] along dim 0 (its own inverse)."""
    first, second = tensor.chunk(2, dim=0)
    return torch.cat([second, first])


@dataclass
class ModelLayout:
    family: str
    shapes: dict[str, tuple[int, ...]]  # diffusers path -> weight shape ([out, in] or [out, in, kh, kw])
    native: dict[str, NativeTarget] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.from_native: dict[str, list[tuple[str, NativeTarget]]] = {}
        for path, target in self.native.items():
            self.from_native.setdefault(target.path, []).append((path, target))
        for parts in self.from_native.values():
            parts.sort(key=lambda item: item[1].offset or 0)
        self._underscored = {p.replace(".", "_"): p for p in self.shapes}
        self._native_underscored = {p.replace(".", "_"): p for p in self.from_native}

    def resolve_underscored(self, name: str) -> tuple[str, bool] | None:
        """kohya-style ``down_blocks_0_attentions_0_...`` -> (dotted path, is_native), or None."""
        if name in self._underscored:
            return self._underscored[name], False
        if name in self._native_underscored:
            return self._native_underscored[name], True
        if name.endswith("_linear1_qkv") and name[: -len("_qkv")] in self._native_underscored:
            return self._native_underscored[name[: -len("_qkv")]] + "_qkv", True
        return None

    def has_native(self, native_path: str) -> bool:
        return bool(self.native_parts(native_path))

    def native_parts(self, native_path: str) -> list[tuple[str, NativeTarget]]:
        """The diffusers layers stacked in a native weight, by output offset.

        ``<single block>.linear1_qkv`` (ComfyUI's and XLabs' name for the q/k/v rows of FLUX's fused linear1) gives
        only q, k and v.
        """
        if native_path.endswith(".linear1_qkv"):
            parts = self.from_native.get(native_path[: -len("_qkv")], [])
            return [part for part in parts if part[0].endswith(("attn.to_q", "attn.to_k", "attn.to_v"))]
        return self.from_native.get(native_path, [])

    def native_shape(self, native_path: str) -> tuple[int, ...]:
        parts = self.native_parts(native_path)
        first_shape = self.shapes[parts[0][0]]
        if parts[0][1].offset is None:
            return first_shape
        return (sum(self.shapes[p][0] for p, _ in parts), *first_shape[1:])


# ---------------------------------------------------------------------------------------------------------------------
# FLUX


def flux_block_layers(hidden: int, mlp_hidden: int) -> tuple[dict[str, tuple[int, int]], dict[str, tuple[int, int]]]:
    """Linear layers of one double and one single FLUX block (diffusers suffix -> [out, in])."""
    h, m = hidden, mlp_hidden
    double = {
        "attn.to_q": (h, h), "attn.to_k": (h, h), "attn.to_v": (h, h),
        "attn.add_q_proj": (h, h), "attn.add_k_proj": (h, h), "attn.add_v_proj": (h, h),
        "attn.to_out.0": (h, h), "attn.to_add_out": (h, h),
        "ff.net.0.proj": (m, h), "ff.net.2": (h, m), "ff_context.net.0.proj": (m, h), "ff_context.net.2": (h, m),
        "norm1.linear": (6 * h, h), "norm1_context.linear": (6 * h, h),
    }
    single = {"attn.to_q": (h, h), "attn.to_k": (h, h), "attn.to_v": (h, h), "proj_mlp": (m, h),
              "proj_out": (h, h + m), "norm.linear": (3 * h, h)}
    return double, single


# diffusers suffix -> (native suffix, index of the slice inside the fused native weight or None)
_FLUX_DOUBLE_NATIVE = {
    "attn.to_q": ("img_attn.qkv", 0), "attn.to_k": ("img_attn.qkv", 1), "attn.to_v": ("img_attn.qkv", 2),
    "attn.add_q_proj": ("txt_attn.qkv", 0), "attn.add_k_proj": ("txt_attn.qkv", 1),
    "attn.add_v_proj": ("txt_attn.qkv", 2),
    "attn.to_out.0": ("img_attn.proj", None), "attn.to_add_out": ("txt_attn.proj", None),
    "ff.net.0.proj": ("img_mlp.0", None), "ff.net.2": ("img_mlp.2", None),
    "ff_context.net.0.proj": ("txt_mlp.0", None), "ff_context.net.2": ("txt_mlp.2", None),
    "norm1.linear": ("img_mod.lin", None), "norm1_context.linear": ("txt_mod.lin", None),
}
_FLUX_SINGLE_NATIVE = {
    "attn.to_q": ("linear1", 0), "attn.to_k": ("linear1", 1), "attn.to_v": ("linear1", 2),
    "proj_mlp": ("linear1", 3), "proj_out": ("linear2", None), "norm.linear": ("modulation.lin", None),
}
_FLUX_GLOBAL_NATIVE = {
    "x_embedder": "img_in", "context_embedder": "txt_in", "proj_out": "final_layer.linear",
    "time_text_embed.timestep_embedder.linear_1": "time_in.in_layer",
    "time_text_embed.timestep_embedder.linear_2": "time_in.out_layer",
    "time_text_embed.guidance_embedder.linear_1": "guidance_in.in_layer",
    "time_text_embed.guidance_embedder.linear_2": "guidance_in.out_layer",
    "time_text_embed.text_embedder.linear_1": "vector_in.in_layer",
    "time_text_embed.text_embedder.linear_2": "vector_in.out_layer",
}


def flux_layout(num_layers: int = 19, num_single_layers: int = 38, attention_head_dim: int = 128,
                num_attention_heads: int = 24, in_channels: int = 64, joint_attention_dim: int = 4096,
                pooled_projection_dim: int = 768, guidance_embeds: bool = True, mlp_ratio: float = 4.0,
                out_channels: int | None = None, **_ignored) -> ModelLayout:
    """Layout of a FluxTransformer2DModel with the given (diffusers) config."""
    h = attention_head_dim * num_attention_heads
    m = int(h * mlp_ratio)
    double, single = flux_block_layers(h, m)
    shapes: dict[str, tuple[int, ...]] = {}
    native: dict[str, NativeTarget] = {}
    for kind, count, layers, table in (("transformer_blocks", num_layers, double, _FLUX_DOUBLE_NATIVE),
                                       ("single_transformer_blocks", num_single_layers, single, _FLUX_SINGLE_NATIVE)):
        native_prefix = "double_blocks" if kind == "transformer_blocks" else "single_blocks"
        for n in range(count):
            for suffix, shape in layers.items():
                path = f"{kind}.{n}.{suffix}"
                shapes[path] = shape
                native_suffix, index = table[suffix]
                offset = None if index is None else index * h
                size = None if index is None else shape[0]
                native[path] = NativeTarget(f"{native_prefix}.{n}.{native_suffix}", offset, size)
    globals_ = {
        "x_embedder": (h, in_channels), "context_embedder": (h, joint_attention_dim),
        "proj_out": (out_channels or in_channels, h),
        "time_text_embed.timestep_embedder.linear_1": (h, 256), "time_text_embed.timestep_embedder.linear_2": (h, h),
        "time_text_embed.text_embedder.linear_1": (h, pooled_projection_dim),
        "time_text_embed.text_embedder.linear_2": (h, h),
    }
    if guidance_embeds:
        globals_["time_text_embed.guidance_embedder.linear_1"] = (h, 256)
        globals_["time_text_embed.guidance_embedder.linear_2"] = (h, h)
    for path, shape in globals_.items():
        shapes[path] = shape
        native[path] = NativeTarget(_FLUX_GLOBAL_NATIVE[path])
    shapes["norm_out.linear"] = (2 * h, h)
    native["norm_out.linear"] = NativeTarget("final_layer.adaLN_modulation.1", swap_halves=True)
    return ModelLayout("flux", shapes, native)


# ---------------------------------------------------------------------------------------------------------------------
# SD1.5 / SDXL UNets


def unet_layout(config: dict, family: str) -> ModelLayout:
    """Layout of a diffusers UNet2DConditionModel with ``config`` (its modules listed on the meta device)."""
    shapes = _unet_shapes(tuple(sorted((k, _freeze(v)) for k, v in config.items())))
    native = {}
    for path in shapes:
        ldm = diffusers_to_ldm_path(path, config)
        if ldm is not None:
            native[path] = NativeTarget(ldm)
    return ModelLayout(family, dict(shapes), native)


def _freeze(value):
    return tuple(value) if isinstance(value, list) else value


@lru_cache(maxsize=8)
def _unet_shapes(frozen_config: tuple) -> dict[str, tuple[int, ...]]:
    from diffusers import UNet2DConditionModel  # heavy: imported when a model is built, not at ComfyUI start-up

    with torch.device("meta"):
        model = UNet2DConditionModel(**dict(frozen_config))
    return {name: tuple(module.weight.shape) for name, module in model.named_modules()
            if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d))}


_RESNET_SUFFIX = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
                  "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
_UNET_GLOBALS = {"conv_in": "input_blocks.0.0", "time_embedding.linear_1": "time_embed.0",
                 "time_embedding.linear_2": "time_embed.2", "add_embedding.linear_1": "label_emb.0.0",
                 "add_embedding.linear_2": "label_emb.0.2", "conv_norm_out": "out.0", "conv_out": "out.2"}


def _resnet_suffix(rest: str) -> str:
    head, _, tail = rest.partition(".")
    mapped = _RESNET_SUFFIX.get(head)
    if mapped is None:
        raise KeyError(rest)
    return mapped + ("." + tail if tail else "")


def diffusers_to_ldm_path(path: str, config: dict) -> str | None:
    """Map a diffusers UNet module path to the LDM (original SD / ComfyUI) path; None if it has no twin."""
    layers = config.get("layers_per_block", 2)
    if isinstance(layers, (list, tuple)):
        if len(set(layers)) != 1:
            return None
        layers = layers[0]
    up_has_attention = ["CrossAttn" in t for t in config.get("up_block_types", ())]
    if path in _UNET_GLOBALS:
        return _UNET_GLOBALS[path]
    try:
        if m := re.fullmatch(r"down_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", path):
            i, kind, j, rest = int(m[1]), m[2], int(m[3]), m[4]
            index = 1 + i * (layers + 1) + j
            return (f"input_blocks.{index}.0.{_resnet_suffix(rest)}" if kind == "resnets"
                    else f"input_blocks.{index}.1.{rest}")
        if m := re.fullmatch(r"down_blocks\.(\d+)\.downsamplers\.0\.conv", path):
            return f"input_blocks.{(int(m[1]) + 1) * (layers + 1)}.0.op"
        if m := re.fullmatch(r"mid_block\.(resnets|attentions)\.(\d+)\.(.+)", path):
            kind, j, rest = m[1], int(m[2]), m[3]
            return (f"middle_block.{2 * j}.{_resnet_suffix(rest)}" if kind == "resnets"
                    else f"middle_block.{2 * j + 1}.{rest}")
        if m := re.fullmatch(r"up_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", path):
            i, kind, j, rest = int(m[1]), m[2], int(m[3]), m[4]
            index = i * (layers + 1) + j
            return (f"output_blocks.{index}.0.{_resnet_suffix(rest)}" if kind == "resnets"
                    else f"output_blocks.{index}.1.{rest}")
        if m := re.fullmatch(r"up_blocks\.(\d+)\.upsamplers\.0\.conv", path):
            i = int(m[1])
            sub = 2 if i < len(up_has_attention) and up_has_attention[i] else 1
            return f"output_blocks.{i * (layers + 1) + layers}.{sub}.conv"
    except KeyError:
        return None
    return None


# ---------------------------------------------------------------------------------------------------------------------
# Standard layouts


@lru_cache(maxsize=None)
def standard_layout(family: str) -> ModelLayout:
    """The layout of the full-size public model of a family (``sd15``, ``sdxl`` or ``flux``)."""
    if family == "flux":
        return flux_layout(**FLUX_CONFIG)
    if family == "sd15":
        return unet_layout(SD15_UNET_CONFIG, "sd15")
    if family == "sdxl":
        return unet_layout(SDXL_UNET_CONFIG, "sdxl")
    raise ValueError(f"no standard layout for family {family!r}; expected sd15, sdxl or flux")


def layout_of_diffusers_model(model) -> ModelLayout:
    """Layout of an instantiated diffusers UNet2DConditionModel or FluxTransformer2DModel."""
    config = dict(model.config)
    name = type(model).__name__
    if name.startswith("Flux"):
        return flux_layout(**config)
    family = "sdxl" if config.get("addition_embed_type") == "text_time" else "sd15"
    return unet_layout({k: v for k, v in config.items() if not k.startswith("_")}, family)
