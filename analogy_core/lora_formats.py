"""LoRA state dicts in the ecosystem's key formats, to and from the pack's :class:`LoRA`.

Read: diffusers/PEFT (``<prefix><path>.lora_A.weight`` / ``lora_B``; alpha from ``.alpha`` tensors or the
``lora_adapter_metadata`` header that diffusers writes), kohya (``lora_unet_<path_with_underscores>.lora_down.weight``
/ ``lora_up`` / ``.alpha``), older diffusers (``.lora.down.weight``, ``processor.to_q_lora.down.weight``) and
ComfyUI-style native names (``diffusion_model.double_blocks.0.img_attn.qkv.lora_up.weight``). Native FLUX weights
that fuse several diffusers layers (q/k/v, ``linear1``) are split exactly: each part keeps the shared ``down`` and its
own rows of ``up``.

Write: ``peft`` (diffusers/peft names, scale folded so every reader agrees), ``kohya`` (``lora_unet_`` + ``.alpha``),
``comfyui`` (``diffusion_model.<native>``), and ``auto`` = the format ComfyUI's stock LoraLoader, diffusers and peft
all read for that family (kohya for SD UNets, ``transformer.``-prefixed peft for FLUX).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, replace

import torch

from . import __version__
from .files import as_float, check_low_rank_norm, is_json_number, json_metadata, show_value
from .layouts import (TRANSFORMER_FAMILIES, FluxDims, ModelLayout, layout_dims, standard_layout,
                      swap_row_halves)
from .lora import FAMILIES, FITS_KEY, LoRA, LoRAError, LoRALayer

# suffix -> role. Longest first so ".lora_A.default.weight" wins over shorter look-alikes.
_ROLE_SUFFIXES = (
    (".lora_A.default.weight", "down"), (".lora_B.default.weight", "up"),
    (".lora_A.weight", "down"), (".lora_B.weight", "up"),
    (".lora_down.weight", "down"), (".lora_up.weight", "up"),
    (".lora.down.weight", "down"), (".lora.up.weight", "up"),
    ("_lora.down.weight", "down"), ("_lora.up.weight", "up"),
    (".lora_A", "down"), (".lora_B", "up"),
    (".alpha", "alpha"),
)
# (regex searched in each key, what it is)
_UNSUPPORTED = (
    (r"\.dora_scale$", "DoRA"), (r"\.lora_mid\.weight$", "LoCon with a Tucker core"), (r"\.hada_", "LoHa"),
    (r"\.lokr_", "LoKr"), (r"\.diff(_b)?$", "full weight difference"), (r"\.[wb]_norm$", "norm weight"),
    (r"\.lora_B(\.default)?\.bias$", "LoRA with a bias (peft's lora_bias=True)"), (r"\.oft_blocks$", "OFT/BOFT"),
    (r"\.lora_magnitude_vector", "DoRA (peft's use_dora)"), (r"\.a1\.weight$", "GLoRA"),
    (r"\.set_weight$", "weight replacement"),
    (r"\.lora_keys$", "LoRWeB basis (use Load LoRA Basis)"),
    (r"\.att_lora_to_q\.", "LoRWeB basis (use Load LoRA Basis)"),
)
FAMILY_TITLES = {"sd15": "SD1.5", "sdxl": "SDXL",
                 **{family: spec.title for family, spec in TRANSFORMER_FAMILIES.items()}}
# variants ComfyUI's own loader reads (comfy/lora.py, comfy/weight_adapter/): their refusal points there
_COMFY_APPLIES = ("DoRA", "LoCon with a Tucker core", "LoHa", "LoKr", "full weight difference", "norm weight",
                  "OFT/BOFT", "GLoRA", "weight replacement")
_XLABS_KEY = re.compile(r"(.*\.processor\.(?:qkv|proj)_lora\d?)\.(down|up)\.weight$")
# XLabs processor names -> BFL names; "linear1_qkv" is the q/k/v rows of a single block's fused linear1 (as in ComfyUI)
_XLABS_NAMES = ((".processor.qkv_lora1", ".img_attn.qkv"), (".processor.qkv_lora2", ".txt_attn.qkv"),
                (".processor.proj_lora1", ".img_attn.proj"), (".processor.proj_lora2", ".txt_attn.proj"),
                (".processor.qkv_lora", ".linear1_qkv"), (".processor.proj_lora", ".linear2"))
_TEXT_ENCODER_PREFIXES = ("lora_te_", "lora_te1_", "lora_te2_", "lora_te3_", "text_encoder.", "text_encoder_2.",
                          "te.", "te1.", "te2.", "text_encoders.")
_DOTTED_PREFIXES = ("base_model.model.", "model.diffusion_model.", "diffusion_model.", "transformer.", "unet.")
_UNDERSCORE_PREFIXES = ("lora_unet_", "lora_transformer_", "lycoris_")
SAVE_FORMATS = ("auto", "peft", "kohya", "comfyui")  # auto may also pick "native_peft" (FLUX.2)


@dataclass
class ParsedLoRA:
    lora: LoRA
    text_encoder_keys: int  # entries for text encoders, which a diffusion-model LoRA leaves out
    key_format: str
    # layers with neither an ``.alpha`` key nor a peft config (header or adapter_config.json), read at scale 1 as
    # ComfyUI reads them
    layers_without_alpha: int = 0
    # where the peft config that gave layers their alpha came from: "header" (diffusers' lora_adapter_metadata),
    # "adapter_config.json" (peft's file beside adapter_model.safetensors) or "" (none)
    peft_config_source: str = ""


def split_roles(state_dict: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """Group ``<base><suffix>`` keys into {base: {"down", "up", "alpha"}}; refuse unsupported LoRA variants."""
    groups: dict[str, dict[str, torch.Tensor]] = {}
    unknown = []
    for key, tensor in state_dict.items():
        xlabs = _XLABS_KEY.match(key)
        if xlabs:  # XLabs FLUX LoRAs: <block>.processor.qkv_lora1.down.weight
            groups.setdefault(xlabs[1], {})["down" if xlabs[2] == "down" else "up"] = tensor
            continue
        for marker, variant in _UNSUPPORTED:
            if re.search(marker, key):
                where = "; ComfyUI's own LoraLoaderModelOnly reads this variant" if variant in _COMFY_APPLIES else ""
                raise LoRAError(f"unsupported LoRA variant: {variant} (key {key!r}); this loader reads plain "
                                f"low-rank LoRAs (lora_A/lora_B, lora_down/lora_up){where}")
        for suffix, role in _ROLE_SUFFIXES:
            if key.endswith(suffix):
                groups.setdefault(key[: -len(suffix)], {})[role] = tensor
                break
        else:
            unknown.append(key)
    if unknown:
        raise LoRAError(f"{len(unknown)} keys are not LoRA weights, e.g. {unknown[:3]}")
    for base, parts in groups.items():
        _check_group(base, parts)
    return groups


def _check_group(base: str, parts: dict[str, torch.Tensor]) -> None:
    """One layer's factors: floating point (float8 upcast in place), 2-D or 4-D, rank >= 1, no empty dimension,
    a conv ``up`` with a 1x1 kernel, one finite alpha (an integer alpha, as some trainers store it, is read as a
    float, as ComfyUI reads it)."""
    missing = {"down", "up"} - parts.keys()
    if missing:
        raise LoRAError(f"layer {base!r} has no {' / '.join(sorted(missing))} weight")
    for role, tensor in parts.items():
        if role == "alpha" and not (tensor.is_floating_point() or tensor.is_complex() or tensor.dtype == torch.bool):
            parts[role] = tensor.to(torch.float32)
        elif not tensor.is_floating_point():
            raise LoRAError(f"layer {base!r}: {role} is stored as {tensor.dtype}; LoRA weights are floating point")
        else:
            parts[role] = as_float(tensor)
    down, up = parts["down"], parts["up"]
    if down.ndim == 3 or up.ndim == 3:
        raise LoRAError(f"layer {base!r} has 3-D weights {tuple(down.shape)}: this is a LoRA basis "
                        "(LoRWeB), not a LoRA; load it with Load LoRA Basis")
    if down.ndim not in (2, 4) or up.ndim != down.ndim:
        raise LoRAError(f"layer {base!r}: down {list(down.shape)} and up {list(up.shape)} must both be 2-D "
                        "([rank, in] and [out, rank]) or both 4-D (conv)")
    if down.shape[0] == 0:
        raise LoRAError(f"layer {base!r} has rank 0 (empty factors down {list(down.shape)}, up {list(up.shape)})")
    if 0 in down.shape or 0 in up.shape:
        raise LoRAError(f"layer {base!r} has an empty dimension: down {list(down.shape)}, up {list(up.shape)}")
    if up.shape[1] != down.shape[0]:
        raise LoRAError(f"layer {base!r}: down {list(down.shape)} has rank {down.shape[0]} but up "
                        f"{list(up.shape)} has rank {up.shape[1]}")
    if up.ndim == 4 and tuple(up.shape[2:]) != (1, 1):
        raise LoRAError(f"layer {base!r}: a conv LoRA's up must have a 1x1 kernel, got {list(up.shape)}")
    for role in ("down", "up"):
        if not torch.isfinite(parts[role]).all():
            raise LoRAError(f"layer {base!r}: {role} contains NaN or Inf values")
    if "alpha" in parts:
        alpha = parts["alpha"]
        if alpha.numel() != 1 or not torch.isfinite(alpha.float()).all():
            raise LoRAError(f"layer {base!r}: alpha must be one finite number, got a tensor of shape "
                            f"{list(alpha.shape)}" + (f" = {alpha.item()}" if alpha.numel() == 1 else ""))


def _first_pattern_value(patterns: dict | None, base: str, default):
    """peft's reading of ``alpha_pattern`` / ``rank_pattern`` (``peft.utils.other.get_pattern_key``): the value of the
    first key, in the file's order, that matches the layer's module path or its dotted tail; else ``default``."""
    for pattern, value in (patterns or {}).items():
        if re.match(rf"(?:.*\.)?(?:{pattern})$", base):
            return value
    return default


def _peft_alpha(base: str, rank: int, config: dict | None) -> float | None:
    """alpha for one layer from a checked peft LoraConfig dict (diffusers' ``lora_adapter_metadata``)."""
    if not config:
        return None
    alpha = _first_pattern_value(config.get("alpha_pattern"), base, config.get("lora_alpha"))
    r = _first_pattern_value(config.get("rank_pattern"), base, config.get("r"))
    if alpha is None:
        return None
    r = r or rank
    if config.get("use_rslora"):
        return float(alpha) / (r ** 0.5) * rank  # returned as an "alpha" whose /rank gives alpha/sqrt(r)
    return float(alpha) * rank / r


# peft's pattern keys are regular expressions; the files diffusers writes use module names. Accepted: a module name
# (a "." matching any character as in a regex) with optional anchors and at most one ".*" or "\d+", which cannot
# backtrack catastrophically whatever the file holds.
_SAFE_PATTERN = re.compile(r"\^?[\w\-.]*(?:(?:\.\*|\\d\+)[\w\-.]*)?\$?")


def check_peft_config(config: dict, source: str = "lora_adapter_metadata") -> dict:
    """Types and values of the fields this reader uses; refuse what would otherwise fail later or mean nothing.
    ``source`` names where the config came from in the messages."""
    alpha, r = config.get("lora_alpha"), config.get("r")
    if alpha is not None and not is_json_number(alpha):
        raise LoRAError(f"{source}: lora_alpha is {show_value(alpha)}, expected a number")
    if r is not None and not _is_rank(r):
        raise LoRAError(f"{source}: r is {show_value(r)}, expected a positive integer up to {MAX_PEFT_RANK}")
    for field, check, expected in (("alpha_pattern", is_json_number, "a number"),
                                   ("rank_pattern", _is_rank, f"a positive integer up to {MAX_PEFT_RANK}")):
        patterns = config.get(field)
        if patterns is None:
            continue
        if not isinstance(patterns, dict):
            raise LoRAError(f"{source}: {field} is a {type(patterns).__name__}, expected an object")
        for pattern, value in patterns.items():
            if len(pattern) > 256 or not _SAFE_PATTERN.fullmatch(pattern):
                raise LoRAError(f"{source}: {field} key {pattern[:80]!r} is not a module name (regular "
                                "expressions beyond one '.*' or '\\d+' are not evaluated)")
            if not check(value):
                raise LoRAError(f"{source}: {field}[{pattern[:80]!r}] is {show_value(value)}, "
                                f"expected {expected}")
    return config


MAX_PEFT_RANK = 2**16
ADAPTER_WEIGHTS, ADAPTER_CONFIG = "adapter_model.safetensors", "adapter_config.json"  # peft's save_pretrained names


def _is_rank(value: object) -> bool:
    return type(value) is int and 1 <= value <= MAX_PEFT_RANK


def peft_config_from_metadata(metadata: dict[str, str]) -> dict | None:
    """The peft LoraConfig diffusers stores under ``lora_adapter_metadata`` (checked), or None.

    diffusers writes it flat for a single adapter or with the component as prefix (``"unet.lora_alpha"``,
    ``"transformer.lora_alpha"``); the diffusion model's entry is returned. JSON null counts as absent.
    """
    config = json_metadata(metadata, "lora_adapter_metadata", error=LoRAError)
    if config is None:
        return None
    if "lora_alpha" in config or "r" in config:
        return check_peft_config(config)
    for component in ("transformer", "unet"):
        sub = {k[len(component) + 1:]: v for k, v in config.items() if k.startswith(component + ".")}
        if sub:
            return check_peft_config(sub)
    return None


def _normalise_base(base: str) -> tuple[str | None, bool]:
    """Strip known prefixes. Returns (name, underscored) or (None, _) for text-encoder entries."""
    if base.startswith(_TEXT_ENCODER_PREFIXES):
        return None, False
    for prefix in _UNDERSCORE_PREFIXES:
        if base.startswith(prefix):
            return base[len(prefix):], True
    for prefix in _DOTTED_PREFIXES:
        if base.startswith(prefix):
            base = base[len(prefix):]
            break
    for xlabs, bfl in _XLABS_NAMES:
        if base.endswith(xlabs):
            return base[: -len(xlabs)] + bfl, False
    # older diffusers attention processors: attn1.processor.to_q(_lora) -> attn1.to_q; to_out -> to_out.0
    base = re.sub(r"\.processor\.(to_q|to_k|to_v)$", r".\1", base)
    base = re.sub(r"\.processor\.to_out$", ".to_out.0", base)
    return base, False


def _resolve(name: str, underscored: bool, layout: ModelLayout) -> tuple[str, bool] | None:
    """(path, is_native) of a layer name in ``layout``, or None."""
    if underscored:
        return layout.resolve_underscored(name)
    if name in layout.shapes:
        return name, False
    if layout.has_native(name):
        return name, True
    return None


Entry = tuple[str, bool, tuple[int, int]]  # (name, underscored, (out, in) of the LoRA's update)


def _entries(names: list[tuple[str, bool]], groups: dict, keys: list[str]) -> list[Entry]:
    return [(name, underscored, (groups[key]["up"].shape[0], groups[key]["down"].shape[1]))
            for (name, underscored), key in zip(names, keys)]


def _fits(layout: ModelLayout, entries: list[Entry]) -> bool:
    for name, underscored, shape in entries:
        found = _resolve(name, underscored, layout)
        if found is None:
            return False
        path, native = found
        expected = layout.native_shape(path) if native else layout.shapes[path]
        if shape != tuple(expected[:2]):
            return False
    return True


def family_hint(metadata: dict[str, str]) -> str | None:
    """The base model a file's header names: ours, kohya's ``ss_base_model_version`` or ``modelspec.architecture``."""
    if metadata.get("analogy.family") in FAMILIES and metadata["analogy.family"] != "unknown":
        return metadata["analogy.family"]
    text = f"{metadata.get('modelspec.architecture', '')} {metadata.get('ss_base_model_version', '')}".lower()
    needles = (("flux.2", "flux2"), ("flux-2", "flux2"), ("flux_2", "flux2"), ("flux2", "flux2"), ("klein", "flux2"),
               ("qwen", "qwen_image"), ("flux", "flux"), ("xl", "sdxl"), ("sd_v1", "sd15"),
               ("stable-diffusion-v1", "sd15"))
    for needle, family in needles:
        if needle in text:
            return family
    return None


# ---------------------------------------------------------------------------------------------------------------------
# Width-flexible layouts: a DiT LoRA is read against the layout its own shapes imply (any hidden and MLP width, any
# block count); whether it fits a model is decided at Apply against that model's actual weights.

_BLOCK_INDEX = re.compile(r"^(single_transformer_blocks|transformer_blocks|double_blocks|single_blocks)([._])\d+([._])")
_OUTER_DIMS = {  # diffusers path -> (FluxDims field, 0 = out / 1 = in)
    "x_embedder": ("in_channels", 1), "img_in": ("in_channels", 1), "context_embedder": ("context", 1),
    "txt_in": ("context", 1), "proj_out": ("out_channels", 0), "time_text_embed.text_embedder.linear_1": ("pooled", 1),
}


def _block_counts(entries: list[Entry]) -> tuple[int, int]:
    double = single = 0
    for name, _, _ in entries:
        match = _BLOCK_INDEX.match(name)
        if match:
            index = int(name[len(match[1]) + 1: match.end() - 1])
            if match[1].startswith("single"):
                single = max(single, index + 1)
            else:
                double = max(double, index + 1)
    return double, single


def _outer_dims(layout: ModelLayout, entries: list[Entry]) -> dict[str, int]:
    """in_channels, context, out_channels and pooled widths read from the LoRA's global layers, where it has any."""
    dims = {}
    for name, underscored, shape in entries:
        path, native = _resolve(name, underscored, layout)
        if native:
            path = layout.native_parts(path)[0][0]
        if path in _OUTER_DIMS:
            field, side = _OUTER_DIMS[path]
            dims[field] = shape[side]
    return dims


def _width_candidates(entries: list[Entry], standard: FluxDims) -> list[tuple[int, int]]:
    """(hidden, mlp hidden) pairs worth trying, the published model's ratio first."""
    ratio = standard.mlp_hidden / standard.hidden
    seen = {d for _, _, shape in entries for d in shape}
    hiddens = sorted(seen, key=lambda h: (h != standard.hidden, h))
    pairs = []
    for h in hiddens:
        derived = {int(h * ratio)} | seen | {d - h for d in seen} | {d - 3 * h for d in seen}
        derived |= {(d - 3 * h) // 2 for d in seen} | {d // 2 for d in seen}
        for m in sorted((m for m in derived if m > 0), key=lambda m: (m != int(h * ratio), m)):
            pairs.append((h, m))
    return pairs


MAX_BLOCKS = 512  # per kind; published models have at most 60: an index beyond is a damaged name, not a model


def infer_layout(family: str, entries: list[Entry]) -> ModelLayout | None:
    """The layout of ``family`` (flux, flux2, qwen_image) that the LoRA's names and shapes imply, or None when its
    names are not this family's or its shapes are not self-consistent (e.g. q and k of different widths). Block 0
    stands for every block while the widths are searched, so the search stays small for any LoRA."""
    spec = TRANSFORMER_FAMILIES[family]
    double, single = _block_counts(entries)
    if max(double, single) > MAX_BLOCKS:
        return None
    generic = list(dict.fromkeys((_BLOCK_INDEX.sub(r"\g<1>\g<2>0\g<3>", name), u, shape)
                                 for name, u, shape in entries))
    small = replace(spec.dims, double=min(double, 1), single=min(single, 1))
    probe = spec.build(small)
    if any(_resolve(name, underscored, probe) is None for name, underscored, _ in generic):
        return None
    outer = _outer_dims(probe, generic)
    for hidden, mlp in _width_candidates(generic, spec.dims):
        dims = replace(small, hidden=hidden, mlp_hidden=mlp, **outer)
        if _fits(spec.build(dims), generic):
            return spec.build(replace(dims, double=double, single=single))
    return None


def _is_published(layout: ModelLayout) -> bool:
    """Widths and block counts within the published model of the layout's family."""
    if layout.family not in TRANSFORMER_FAMILIES:
        return True
    dims, standard = layout_dims(layout), TRANSFORMER_FAMILIES[layout.family].dims
    return ((dims.hidden, dims.mlp_hidden) == (standard.hidden, standard.mlp_hidden)
            and dims.double <= standard.double and dims.single <= standard.single)


def layout_for_lora(lora: LoRA) -> ModelLayout:
    """The layout a LoRA's own layers imply for its family (for native names of any width); SD UNets: standard."""
    if lora.family not in TRANSFORMER_FAMILIES:
        return standard_layout(lora.family)
    entries = [(path, False, (layer.out_features, layer.in_features)) for path, layer in lora.layers.items()]
    layout = infer_layout(lora.family, entries)
    if layout is None:
        raise LoRAError(f"the LoRA's layers are not a consistent {TRANSFORMER_FAMILIES[lora.family].title} layout "
                        f"(names or shapes), e.g. {sorted(lora.layers)[:3]}")
    return layout


def detect_layouts(names: list[tuple[str, bool]], groups: dict, keys: list[str],
                   hint: str | None) -> list[ModelLayout]:
    """Every layout the LoRA's names and shapes fit, the header's family first, then layouts of the published size.
    DiT families (FLUX.1, FLUX.2, Qwen-Image) are read at the widths the file implies; SD UNets against the standard
    tables. A LoRA touching only layers several families share (SD1.5/SDXL attention; the double blocks' attention of
    FLUX.1, FLUX.2 and Qwen-Image) fits each of them."""
    entries = _entries(names, groups, keys)
    fitting = [layout for family in TRANSFORMER_FAMILIES if (layout := infer_layout(family, entries)) is not None]
    fitting += [layout for layout in map(standard_layout, ("sd15", "sdxl")) if _fits(layout, entries)]
    if not fitting:
        raise LoRAError("the LoRA's layers do not match SD1.5, SDXL, FLUX.1, FLUX.2 or Qwen-Image (names or shapes); "
                        f"{_closest_misfits(entries, hint)}; pass the model layout explicitly for other backbones")
    order = ["flux", "sd15", "sdxl", "qwen_image", "flux2"]
    return sorted(fitting, key=lambda layout: (layout.family != hint, not _is_published(layout),
                                               not _has_published_ratio(layout), order.index(layout.family)))


def _misfits(layout: ModelLayout, entries: list[Entry]) -> tuple[list[str], list[str]]:
    """What keeps each entry from ``layout``: the names it does not have, and shapes other than its layers'."""
    missing, resized = [], []
    for name, underscored, shape in entries:
        found = _resolve(name, underscored, layout)
        if found is None:
            missing.append(f"{name!r} is no layer of it")
            continue
        path, native = found
        expected = tuple((layout.native_shape(path) if native else layout.shapes[path])[:2])
        if shape != expected:
            resized.append(f"{name!r} is {list(shape)} ([out, in]) where its layer is {list(expected)}")
    return missing, resized


def _nearest_layout(family: str, entries: list[Entry]) -> tuple[ModelLayout, str]:
    """The family's layout to compare against: for a DiT, the width its name-matching layers imply when they agree
    (a klein or pruned LoRA with one misspelt layer), else the published size."""
    published = standard_layout(family)
    if family in TRANSFORMER_FAMILIES:
        named = [e for e in entries if _resolve(e[0], e[1], published) is not None]
        if named and len(named) < len(entries) and (layout := infer_layout(family, named)) is not None:
            return layout, "at the width its other layers imply"
    return published, "at its published size"


def _closest_misfits(entries: list[Entry], hint: str | None) -> str:
    """The model most of the LoRA's layers fit (the header's family on a tie) and what does not fit it, so a
    misspelt or resized layer is named rather than the first few valid ones."""
    order = [hint] if hint in FAMILY_TITLES else []
    order += [family for family in FAMILY_TITLES if family not in order]
    nearest = {family: _nearest_layout(family, entries) for family in order}
    misfits = {family: _misfits(nearest[family][0], entries) for family in order}
    family = min(order, key=lambda f: sum(map(len, misfits[f])))
    missing, resized = misfits[family]
    if len(missing) == len(entries):
        return f"no layer name is one of theirs, e.g. {[name for name, _, _ in entries[:3]]}"
    wrong = missing + resized  # names the model lacks first: the likelier culprits
    listed = "; ".join(wrong[:3]) + (f"; and {len(wrong) - 3} more" if len(wrong) > 3 else "")
    return (f"closest is {FAMILY_TITLES[family]} ({nearest[family][1]}), where {len(wrong)} of {len(entries)} layers "
            f"do not fit: {listed}")


def _has_published_ratio(layout: ModelLayout) -> bool:
    """MLP width / hidden width as in the family's published model (4 for FLUX.1 and Qwen-Image, 3 for FLUX.2)."""
    if layout.family not in TRANSFORMER_FAMILIES:
        return True
    dims = layout_dims(layout)
    return dims.mlp_hidden * TRANSFORMER_FAMILIES[layout.family].dims.hidden == \
        dims.hidden * TRANSFORMER_FAMILIES[layout.family].dims.mlp_hidden


def parse_state_dict(state_dict: dict[str, torch.Tensor], metadata: dict[str, str] | None = None,
                     layout: ModelLayout | None = None, adapter_config: dict | None = None) -> ParsedLoRA:
    """Turn a LoRA state dict of any supported key format into a :class:`LoRA` keyed by diffusers paths.
    ``adapter_config``: peft's adapter_config.json (checked here), read for alphas where the header has no peft config;
    an ``.alpha`` key of a layer still wins."""
    metadata = dict(metadata or {})
    if not state_dict:
        raise LoRAError("the file holds no tensors")
    groups = split_roles(state_dict)
    text_encoder = 0
    names, keys = [], []
    for base in groups:
        name, underscored = _normalise_base(base)
        if name is None:
            text_encoder += 1
            continue
        names.append((name, underscored))
        keys.append(base)
    if not keys:
        raise LoRAError("the LoRA only holds text-encoder layers; apply it to CLIP with ComfyUI's LoraLoader")
    if layout is None:
        fitting = detect_layouts(names, groups, keys, family_hint(metadata))
        layout = fitting[0]
        if len(fitting) > 1:  # e.g. attention layers SD1.5 and SDXL share: Apply accepts either model
            metadata[FITS_KEY] = ",".join(f.family for f in fitting)
        else:
            metadata.pop(FITS_KEY, None)

    peft_config, source = peft_config_from_metadata(metadata), "header"
    if peft_config is None and adapter_config is not None:
        peft_config, source = check_peft_config(adapter_config, ADAPTER_CONFIG), ADAPTER_CONFIG
    layers: dict[str, LoRALayer] = {}
    formats, without_alpha, from_config = set(), 0, 0
    for (name, underscored), base in zip(names, keys):
        found = _resolve(name, underscored, layout)
        if found is None:
            raise LoRAError(f"layer {base!r} is not a layer of the {layout.family} model")
        path, native = found
        parts = groups[base]
        down, up = parts["down"], parts["up"]
        rank = down.shape[0]
        if "alpha" in parts:
            alpha = float(parts["alpha"].float().item())
        else:
            alpha = _peft_alpha(name if not underscored else path, rank, peft_config)
            from_config += alpha is not None
        without_alpha += alpha is None
        scale = 1.0 if alpha is None else alpha / rank
        check_low_rank_norm(up, down, scale, f"layer {base!r}", error=LoRAError)
        formats.add("kohya" if underscored else "native" if native else "diffusers")
        if native:
            expected = layout.native_shape(path)
            if (up.shape[0], down.shape[1]) != expected[:2]:
                raise LoRAError(f"{path}: LoRA shape [{up.shape[0]} x {down.shape[1]}] does not fit the "
                                f"{layout.family} layer [{expected[0]} x {expected[1]}]")
            for sub_path, target in layout.native_parts(path):
                rows = up if target.offset is None else up[target.offset: target.offset + target.size]
                rows = swap_row_halves(rows) if target.swap_halves else rows
                _add(layers, sub_path, LoRALayer(down, rows, scale), layout)
        else:
            _add(layers, path, LoRALayer(down, up, scale), layout)
    lora = LoRA(layers, family=layout.family, source="file", metadata=metadata)
    lora.check_finite()
    return ParsedLoRA(lora, text_encoder, "+".join(sorted(formats)), without_alpha, source if from_config else "")


def _add(layers: dict[str, LoRALayer], path: str, layer: LoRALayer, layout: ModelLayout) -> None:
    expected = layout.shapes[path]
    if (layer.out_features, layer.in_features) != expected[:2]:
        raise LoRAError(f"{path}: LoRA shape [{layer.out_features} x {layer.in_features}] does not fit the "
                        f"{layout.family} layer [{expected[0]} x {expected[1]}]")
    kernel, target_kernel = tuple(layer.down.shape[2:]), tuple(expected[2:])
    if kernel != target_kernel and not {kernel, target_kernel} <= {(), (1, 1)}:
        raise LoRAError(f"{path}: LoRA kernel {list(kernel) or 'linear'} does not fit the {layout.family} layer's "
                        f"{list(target_kernel) or 'linear'}")
    if path in layers:
        raise LoRAError(f"{path} appears twice in the file (under two key formats?)")
    layers[path] = layer


# ---------------------------------------------------------------------------------------------------------------------
# Writing


def _fused_native(lora: LoRA, layout: ModelLayout) -> dict[str, LoRALayer]:
    """Layers under native names; parts of a fused native weight become one block-diagonal LoRA (exact)."""
    out: dict[str, LoRALayer] = {}
    grouped: dict[str, list[tuple[str, LoRALayer]]] = {}
    for path, layer in lora.layers.items():
        target = layout.native.get(path)
        if target is None:
            raise LoRAError(f"{path} has no native {layout.family} name; save in the peft format instead")
        expected = layout.shapes[path]
        if (layer.out_features, layer.in_features) != expected[:2]:  # native names and slices depend on the config
            raise LoRAError(f"{path}: LoRA shape [{layer.out_features} x {layer.in_features}] does not fit the "
                            f"{layout.family} layer [{expected[0]} x {expected[1]}] that native names refer to; save "
                            "in the peft format (or pass the model's layout)")
        grouped.setdefault(target.path, []).append((path, layer))
    for native_path, parts in grouped.items():
        if len(parts) == 1 and layout.native[parts[0][0]].offset is None:
            layer = parts[0][1]
            if layout.native[parts[0][0]].swap_halves:
                layer = LoRALayer(layer.down, swap_row_halves(layer.up), layer.scale)
            out[native_path] = layer
            continue
        out_rows = layout.native_shape(native_path)[0]
        downs, ups, col = [], [], 0
        total_rank = sum(layer.rank for _, layer in parts)
        for path, layer in parts:
            target = layout.native[path]
            downs.append((layer.down.float() * layer.scale))
            block = torch.zeros(out_rows, total_rank, dtype=torch.float32)
            block[target.offset: target.offset + target.size, col: col + layer.rank] = layer.up.float()
            ups.append(block)
            col += layer.rank
        dtype = parts[0][1].down.dtype
        out[native_path] = LoRALayer(torch.cat(downs).to(dtype), sum(ups).to(dtype), 1.0)
    return out


def _metadata(lora: LoRA, key_format: str) -> dict[str, str]:
    ranks = sorted(lora.ranks)
    meta = {k: v for k, v in lora.metadata.items() if k.startswith("analogy.") or k == "ss_base_model_version"}
    meta.update({
        "analogy.family": lora.family, "analogy.source": lora.source, "analogy.rank": str(max(ranks)),
        "analogy.layers": str(len(lora)), "analogy.key_format": key_format, "analogy.pack_version": __version__,
        "format": "pt",
    })
    return meta


def auto_format(family: str) -> str:
    """The key format ComfyUI's stock LoraLoader (0.3.75 and newer), diffusers and peft all read for a family:
    kohya names for SD UNets; ``transformer.``-prefixed peft names for FLUX.1 and Qwen-Image; for FLUX.2 the BFL names
    with peft suffixes that ai-toolkit writes (``diffusion_model.double_blocks.0.img_attn.qkv.lora_A.weight``), since
    ComfyUI 0.3.75 maps no diffusers name of FLUX.2's MLPs and single blocks."""
    return {"flux": "peft", "qwen_image": "peft", "unknown": "peft", "flux2": "native_peft"}.get(family, "kohya")


def to_state_dict(lora: LoRA, key_format: str = "auto", layout: ModelLayout | None = None
                  ) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Serialise to (tensors, header metadata) in one of :data:`SAVE_FORMATS`. Native names (kohya, comfyui, FLUX.2's
    auto) follow ``layout`` or else the layout the LoRA's own shapes imply."""
    if key_format not in SAVE_FORMATS:
        raise LoRAError(f"key format must be one of {SAVE_FORMATS}, got {key_format!r}")
    if not lora.layers:
        raise LoRAError("the LoRA has no layers")
    if key_format == "auto":
        key_format = auto_format(lora.family)
    if lora.family == "unknown" and key_format != "peft":
        raise LoRAError("a LoRA of unknown model family can only be saved in the peft format")
    meta = _metadata(lora, key_format)
    if key_format == "peft":
        return _peft_tensors(lora, meta), meta
    layout = layout or layout_for_lora(lora)
    if key_format == "kohya":
        layers = lora.layers if lora.family in ("sd15", "sdxl") else _fused_native(lora, layout)
        return _native_tensors(layers, "lora_unet_", "_", alpha=True), meta
    layers = _fused_native(lora, layout)
    if key_format == "native_peft":
        return _native_tensors(layers, "diffusion_model.", ".", alpha=False), meta
    return _native_tensors(layers, "diffusion_model.", ".", alpha=True), meta  # comfyui


def _peft_tensors(lora: LoRA, meta: dict[str, str]) -> dict[str, torch.Tensor]:
    """diffusers/peft names, scale folded (alpha == r), the peft config in the header as diffusers writes it."""
    prefix = "unet." if lora.family in ("sd15", "sdxl") else "" if lora.family == "unknown" else "transformer."
    tensors, rank_pattern = {}, {}
    top_rank = max(lora.ranks)
    for path, layer in lora.layers.items():
        layer = layer.folded()  # alpha == r everywhere: readers that ignore alpha still get the right scale
        tensors[f"{prefix}{path}.lora_A.weight"] = layer.down
        tensors[f"{prefix}{path}.lora_B.weight"] = layer.up
        if layer.rank != top_rank:
            rank_pattern[path] = layer.rank
    meta["lora_adapter_metadata"] = json.dumps({
        "r": top_rank, "lora_alpha": top_rank, "rank_pattern": rank_pattern, "alpha_pattern": dict(rank_pattern),
        "target_modules": sorted(lora.layers), "peft_type": "LORA",
    })
    return tensors


def _native_tensors(layers: dict[str, LoRALayer], prefix: str, separator: str, alpha: bool
                    ) -> dict[str, torch.Tensor]:
    """``<prefix><path>`` with kohya suffixes and ``.alpha`` (``alpha``), or peft suffixes with the scale folded."""
    tensors = {}
    for path, layer in layers.items():
        base = prefix + path.replace(".", separator)
        if alpha:
            tensors[f"{base}.lora_down.weight"] = layer.down
            tensors[f"{base}.lora_up.weight"] = layer.up
            tensors[f"{base}.alpha"] = torch.tensor(float(layer.scale * layer.rank))
        else:
            layer = layer.folded()
            tensors[f"{base}.lora_A.weight"] = layer.down
            tensors[f"{base}.lora_B.weight"] = layer.up
    return tensors


def comfy_patch_keys(lora: LoRA, layout: ModelLayout) -> dict[str, str | tuple]:
    """ComfyUI's internal patch key of every layer: ``diffusion_model.<native>.weight``, with (dim, offset, size)
    for a slice of a fused weight (the form ``ModelPatcher.add_patches`` takes), and (key, None, swap_row_halves)
    where the native rows are in the other order (ComfyUI passes its own swap function there)."""
    keys: dict[str, str | tuple] = {}
    for path in lora.layers:
        target = layout.native.get(path)
        if target is None:
            raise LoRAError(f"{path} has no ComfyUI counterpart in the {layout.family} layout")
        key = f"diffusion_model.{target.path}.weight"
        if target.swap_halves:
            keys[path] = (key, None, swap_row_halves)
        else:
            keys[path] = key if target.offset is None else (key, (0, target.offset, target.size))
    return keys
