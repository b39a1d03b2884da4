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
            path = self._native_underscored[name[: -len("_qkv")]] + "_qkv"
            return (path, True) if self.native_parts(path) else None  # FLUX.1 only: FLUX.2's linear1 is one layer
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
    dims = FluxDims(h, int(h * mlp_ratio), num_layers, num_single_layers, in_channels, joint_attention_dim,
                    out_channels or in_channels, pooled_projection_dim, guidance_embeds)
    return flux_layout_from_dims(dims)


@dataclass(frozen=True)
class FluxDims:
    """What a FLUX-like layout depends on: widths, block counts and the global layers' outer widths."""

    hidden: int
    mlp_hidden: int
    double: int
    single: int
    in_channels: int
    context: int
    out_channels: int
    pooled: int = 768
    guidance: bool = True


def _add_blocks(shapes: dict, native: dict, kind: str, native_kind: str, count: int,
                layers: dict[str, tuple[int, int]], table: dict[str, tuple[str, int | None]], h: int) -> None:
    for n in range(count):
        for suffix, shape in layers.items():
            path = f"{kind}.{n}.{suffix}"
            shapes[path] = shape
            native_suffix, index = table[suffix]
            offset = None if index is None else index * h
            size = None if index is None else shape[0]
            native[path] = NativeTarget(f"{native_kind}.{n}.{native_suffix}", offset, size)


def _add_globals(shapes: dict, native: dict, layers: dict[str, tuple[int, int]], names: dict[str, str]) -> None:
    for path, shape in layers.items():
        shapes[path] = shape
        native[path] = NativeTarget(names[path])


def flux_layout_from_dims(d: FluxDims) -> ModelLayout:
    """FLUX.1 layout for any widths and block counts (pruned and distilled variants included)."""
    h = d.hidden
    double, single = flux_block_layers(h, d.mlp_hidden)
    shapes: dict[str, tuple[int, ...]] = {}
    native: dict[str, NativeTarget] = {}
    _add_blocks(shapes, native, "transformer_blocks", "double_blocks", d.double, double, _FLUX_DOUBLE_NATIVE, h)
    _add_blocks(shapes, native, "single_transformer_blocks", "single_blocks", d.single, single, _FLUX_SINGLE_NATIVE, h)
    globals_ = {
        "x_embedder": (h, d.in_channels), "context_embedder": (h, d.context), "proj_out": (d.out_channels, h),
        "time_text_embed.timestep_embedder.linear_1": (h, 256), "time_text_embed.timestep_embedder.linear_2": (h, h),
        "time_text_embed.text_embedder.linear_1": (h, d.pooled), "time_text_embed.text_embedder.linear_2": (h, h),
    }
    if d.guidance:
        globals_["time_text_embed.guidance_embedder.linear_1"] = (h, 256)
        globals_["time_text_embed.guidance_embedder.linear_2"] = (h, h)
    _add_globals(shapes, native, globals_, _FLUX_GLOBAL_NATIVE)
    shapes["norm_out.linear"] = (2 * h, h)
    native["norm_out.linear"] = NativeTarget("final_layer.adaLN_modulation.1", swap_halves=True)
    return ModelLayout("flux", shapes, native)


# ---------------------------------------------------------------------------------------------------------------------
# FLUX.2 (dev and the klein models): diffusers Flux2Transformer2DModel <-> BFL names (ComfyUI's comfy.ldm.flux with
# global modulation). Double blocks keep FLUX.1's fused q/k/v and a SwiGLU MLP whose first linear is [2m, h]; a single
# block's linear1 is one diffusers layer (attn.to_qkv_mlp_proj, [3h + 2m, h]) and linear2 is attn.to_out. The
# modulation layers are shared by all blocks.

FLUX2_CONFIG = dict(num_layers=8, num_single_layers=48, attention_head_dim=128, num_attention_heads=48,
                    in_channels=128, joint_attention_dim=15360, mlp_ratio=3.0, guidance_embeds=True)
_FLUX2_DOUBLE_NATIVE = {**{k: v for k, v in _FLUX_DOUBLE_NATIVE.items() if not k.startswith(("ff", "norm1"))},
                        "ff.linear_in": ("img_mlp.0", None), "ff.linear_out": ("img_mlp.2", None),
                        "ff_context.linear_in": ("txt_mlp.0", None), "ff_context.linear_out": ("txt_mlp.2", None)}
_FLUX2_SINGLE_NATIVE = {"attn.to_qkv_mlp_proj": ("linear1", None), "attn.to_out": ("linear2", None)}
_FLUX2_GLOBAL_NATIVE = {
    "x_embedder": "img_in", "context_embedder": "txt_in", "proj_out": "final_layer.linear",
    "time_guidance_embed.timestep_embedder.linear_1": "time_in.in_layer",
    "time_guidance_embed.timestep_embedder.linear_2": "time_in.out_layer",
    "time_guidance_embed.guidance_embedder.linear_1": "guidance_in.in_layer",
    "time_guidance_embed.guidance_embedder.linear_2": "guidance_in.out_layer",
    "double_stream_modulation_img.linear": "double_stream_modulation_img.lin",
    "double_stream_modulation_txt.linear": "double_stream_modulation_txt.lin",
    "single_stream_modulation.linear": "single_stream_modulation.lin",
}


def flux2_block_layers(h: int, m: int) -> tuple[dict[str, tuple[int, int]], dict[str, tuple[int, int]]]:
    """Linear layers of one FLUX.2 double and single block (diffusers suffix -> [out, in]); m = MLP hidden width."""
    double = {k: v for k, v in flux_block_layers(h, m)[0].items() if not k.startswith(("ff", "norm1"))}
    double.update({"ff.linear_in": (2 * m, h), "ff.linear_out": (h, m),
                   "ff_context.linear_in": (2 * m, h), "ff_context.linear_out": (h, m)})
    single = {"attn.to_qkv_mlp_proj": (3 * h + 2 * m, h), "attn.to_out": (h, h + m)}
    return double, single


def flux2_layout(num_layers: int = 8, num_single_layers: int = 48, attention_head_dim: int = 128,
                 num_attention_heads: int = 48, in_channels: int = 128, joint_attention_dim: int = 15360,
                 mlp_ratio: float = 3.0, out_channels: int | None = None, guidance_embeds: bool = True,
                 **_ignored) -> ModelLayout:
    """Layout of a diffusers Flux2Transformer2DModel with the given config."""
    h = attention_head_dim * num_attention_heads
    return flux2_layout_from_dims(FluxDims(h, int(h * mlp_ratio), num_layers, num_single_layers, in_channels,
                                           joint_attention_dim, out_channels or in_channels, 0, guidance_embeds))


def flux2_layout_from_dims(d: FluxDims) -> ModelLayout:
    h = d.hidden
    double, single = flux2_block_layers(h, d.mlp_hidden)
    shapes: dict[str, tuple[int, ...]] = {}
    native: dict[str, NativeTarget] = {}
    _add_blocks(shapes, native, "transformer_blocks", "double_blocks", d.double, double, _FLUX2_DOUBLE_NATIVE, h)
    _add_blocks(shapes, native, "single_transformer_blocks", "single_blocks", d.single, single,
                _FLUX2_SINGLE_NATIVE, h)
    globals_ = {
        "x_embedder": (h, d.in_channels), "context_embedder": (h, d.context), "proj_out": (d.out_channels, h),
        "time_guidance_embed.timestep_embedder.linear_1": (h, 256),
        "time_guidance_embed.timestep_embedder.linear_2": (h, h),
        "double_stream_modulation_img.linear": (6 * h, h), "double_stream_modulation_txt.linear": (6 * h, h),
        "single_stream_modulation.linear": (3 * h, h),
    }
    if d.guidance:
        globals_["time_guidance_embed.guidance_embedder.linear_1"] = (h, 256)
        globals_["time_guidance_embed.guidance_embedder.linear_2"] = (h, h)
    _add_globals(shapes, native, globals_, _FLUX2_GLOBAL_NATIVE)
    shapes["norm_out.linear"] = (2 * h, h)
    native["norm_out.linear"] = NativeTarget("final_layer.adaLN_modulation.1", swap_halves=True)
    return ModelLayout("flux2", shapes, native)


# ---------------------------------------------------------------------------------------------------------------------
# Qwen-Image and Qwen-Image-Edit (one architecture): ComfyUI's comfy.ldm.qwen_image uses diffusers'
# QwenImageTransformer2DModel module names, so every layer's native name is its diffusers path.

QWEN_IMAGE_CONFIG = dict(num_layers=60, attention_head_dim=128, num_attention_heads=24, in_channels=64,
                         out_channels=16, patch_size=2, joint_attention_dim=3584)


def qwen_block_layers(h: int, m: int) -> dict[str, tuple[int, int]]:
    attention = {f"attn.{name}": (h, h) for name in ("to_q", "to_k", "to_v", "add_q_proj", "add_k_proj",
                                                      "add_v_proj", "to_out.0", "to_add_out")}
    stream = {}
    for side in ("img", "txt"):
        stream.update({f"{side}_mod.1": (6 * h, h), f"{side}_mlp.net.0.proj": (m, h), f"{side}_mlp.net.2": (h, m)})
    return {**attention, **stream}


def qwen_image_layout(num_layers: int = 60, attention_head_dim: int = 128, num_attention_heads: int = 24,
                      in_channels: int = 64, out_channels: int | None = 16, patch_size: int = 2,
                      joint_attention_dim: int = 3584, **_ignored) -> ModelLayout:
    """Layout of a diffusers QwenImageTransformer2DModel with the given config."""
    h = attention_head_dim * num_attention_heads
    out = patch_size * patch_size * (out_channels or in_channels)
    return qwen_layout_from_dims(FluxDims(h, 4 * h, num_layers, 0, in_channels, joint_attention_dim, out, 0, False))


def qwen_layout_from_dims(d: FluxDims) -> ModelLayout:
    h = d.hidden
    shapes: dict[str, tuple[int, ...]] = {}
    for n in range(d.double):
        shapes.update({f"transformer_blocks.{n}.{k}": v for k, v in qwen_block_layers(h, d.mlp_hidden).items()})
    shapes.update({"img_in": (h, d.in_channels), "txt_in": (h, d.context), "proj_out": (d.out_channels, h),
                   "time_text_embed.timestep_embedder.linear_1": (h, 256),
                   "time_text_embed.timestep_embedder.linear_2": (h, h), "norm_out.linear": (2 * h, h)})
    return ModelLayout("qwen_image", shapes, {path: NativeTarget(path) for path in shapes})


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
    """The layout of the full-size public model of a family (sd15, sdxl, flux = FLUX.1, flux2 = FLUX.2 dev,
    qwen_image = Qwen-Image / Qwen-Image-Edit)."""
    if family in TRANSFORMER_FAMILIES:
        return TRANSFORMER_FAMILIES[family].build(TRANSFORMER_FAMILIES[family].dims)
    if family == "sd15":
        return unet_layout(SD15_UNET_CONFIG, "sd15")
    if family == "sdxl":
        return unet_layout(SDXL_UNET_CONFIG, "sdxl")
    raise ValueError(f"no standard layout for family {family!r}; expected sd15, sdxl, flux, flux2 or qwen_image")


@dataclass(frozen=True)
class TransformerFamily:
    """A DiT family whose layout is a function of a few widths: the published model's dims and the builder, so a
    LoRA of any width (FLUX.2 dev or klein, pruned or distilled variants) gets the layout its own shapes imply."""

    name: str
    title: str
    dims: FluxDims
    build: object  # FluxDims -> ModelLayout

    @property
    def mlp_ratio(self) -> float:
        return self.dims.mlp_hidden / self.dims.hidden


def _dims(config: dict, family: str) -> FluxDims:
    layout = {"flux": flux_layout, "flux2": flux2_layout, "qwen_image": qwen_image_layout}[family](**config)
    return layout_dims(layout)


def layout_dims(layout: ModelLayout) -> FluxDims:
    """The widths and block counts of a FLUX-like or Qwen-Image layout (read back from its shapes)."""
    shapes = layout.shapes
    h = shapes["proj_out"][1]
    mlp_keys = {"flux": ("transformer_blocks.0.ff.net.2", "single_transformer_blocks.0.proj_out"),
                "flux2": ("transformer_blocks.0.ff.linear_out", "single_transformer_blocks.0.attn.to_out"),
                "qwen_image": ("transformer_blocks.0.img_mlp.net.2",)}[layout.family]
    found = [shapes[k][1] - (h if k.startswith("single") else 0) for k in mlp_keys if k in shapes]
    m = found[0] if found else h * (3 if layout.family == "flux2" else 4)
    double = len({p.split(".")[1] for p in shapes if p.startswith("transformer_blocks.")})
    single = len({p.split(".")[1] for p in shapes if p.startswith("single_transformer_blocks.")})
    inp = shapes.get("x_embedder", shapes.get("img_in"))[1]
    context = shapes.get("context_embedder", shapes.get("txt_in"))[1]
    pooled = shapes.get("time_text_embed.text_embedder.linear_1", (0, 0))[1]
    guidance = any("guidance_embedder" in p for p in shapes)
    return FluxDims(h, m, double, single, inp, context, shapes["proj_out"][0], pooled, guidance)


TRANSFORMER_FAMILIES: dict[str, TransformerFamily] = {
    "flux": TransformerFamily("flux", "FLUX.1", _dims(FLUX_CONFIG, "flux"), flux_layout_from_dims),
    "flux2": TransformerFamily("flux2", "FLUX.2", _dims(FLUX2_CONFIG, "flux2"), flux2_layout_from_dims),
    "qwen_image": TransformerFamily("qwen_image", "Qwen-Image", _dims(QWEN_IMAGE_CONFIG, "qwen_image"),
                                    qwen_layout_from_dims),
}


def layout_of_diffusers_model(model) -> ModelLayout:
    """Layout of an instantiated diffusers UNet2DConditionModel, FluxTransformer2DModel, Flux2Transformer2DModel or
    QwenImageTransformer2DModel."""
    config = dict(model.config)
    name = type(model).__name__
    if name.startswith("Flux2"):
        return flux2_layout(**config)
    if name.startswith("Flux"):
        return flux_layout(**config)
    if name.startswith("QwenImage"):
        return qwen_image_layout(**config)
    family = "sdxl" if config.get("addition_embed_type") == "text_time" else "sd15"
    return unet_layout({k: v for k, v in config.items() if not k.startswith("_")}, family)
