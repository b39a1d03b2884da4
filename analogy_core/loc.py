"""LoRA of Change (Song et al., CVPR 2025): a hypernetwork H that turns a before/after pair (A, A′) into a LoRA.

H, as the paper (§3.1, appendix A) describes it:

* **E** — the image encoder of the ANALOGY (CLIP vision through ComfyUI, transformers or open_clip): its patch tokens
  f_A, f_A′ ∈ R^{T×W} (penultimate hidden states, class token first; T and W come from the encoder, 257×1024 for
  CLIP ViT-L/14). The paper used an ImageNet ViT-B (196×768); we take the encoder the ANALOGY was made with and
  record its identity in the checkpoint.
* **P** — ``concat(f_A, f_A′)`` per token (width 2W) and one linear layer to the instruction feature (width 512).
* **D** — a transformer decoder: one learned query per target attention layer (32 for SD1.5: attn1 and attn2 of
  its 16 transformer blocks), M = 6 blocks of self-attention, cross-attention to the instruction tokens and FFN,
  8 heads (``torch.nn.TransformerDecoder``; pre-LayerNorm, FFN 4×512, no dropout so training is deterministic and
  resumes exactly; a final LayerNorm).
* **S** — one linear head per attention layer i whose output splits (eq. 10) into U_A¹..U_A⁴, U_B¹..U_B⁴ for the
  q, k, v and output projections, each at its real widths (the cross-attention k/v read the 768-d text context).
  In this pack's LoRA convention U_A is ``down`` [r, in] and U_B is ``up`` [out, r]; the update of projection p is
  ``ΔW_p = scale · U_B^p U_A^p`` with scale = alpha / r = 1.

Initialisation (eq. 11): the head weight is ``concat(w¹, w²)`` with w² — every output that forms a U_B — and its
bias at **zero**, so a fresh H generates an exactly zero LoRA, like a fresh LoRA. Since the projections' in and out
widths differ (cross-attention k/v), the U_A part is not exactly "d/2" wide; what eq. 11 fixes is that U_B starts at
zero. w¹ is drawn so that U_A's entries have LoRA's usual scale (variance 1/(3·in) for unit-variance decoder
features, as kaiming-uniform(a=√5) gives a fresh LoRA's A).

**Update bound** (not in the paper; off unless ``update_bound`` is set). Nothing in eqs. 6-11 limits the size of a
generated update, and on the analogy world H trained with random exchange and LoRA Reverse generated updates ~85x
the norm of the weights they patch (the LoRA then replaces the backbone instead of nudging it). With
``update_bound = c`` every projection's update is softly capped at c times that projection's weight norm ‖W_p‖
(recorded in the file when H is built for a backbone): ``ΔW_p ← c‖W_p‖ · tanh(‖ΔW_p‖ / c‖W_p‖) · ΔW_p / ‖ΔW_p‖``,
applied to U_B so that the factors stay rank r. The map is odd in ΔW, so −H (LoRA Reverse) is still the exact
negation, and it is the identity to first order for small updates (a fresh H still generates exactly zero).

**Rank.** The paper does not state r. We default to r = 4: each head has r·Σ_p(in_p + out_p) outputs, so S holds
about 102M parameters per unit of rank for SD1.5 (408M at r = 4, 1.6 GB in float32) — the size of LoRWeB's basis
(835M) in order of magnitude, trainable next to a frozen SD1.5 on one GPU; r = 4 is also the rank commonly used for
concept/edit LoRAs on SD1.5. ``rank`` is a training option and is recorded in the checkpoint.

Targets come from the model layout code (:func:`attention_targets` of :func:`~.layouts.standard_layout` "sd15", or
of the layout of any diffusers UNet for tiny test and world backbones); the checkpoint stores the list it was trained
for, so the file describes itself.

Training applies one generated LoRA per sample of a batch: :func:`batched_lora` adds ``(x·U_Aᵀ)·U_Bᵀ`` of sample b
to each target projection's output through forward hooks (shared by the trainer and the tests). Inference turns one
sample into the pack's :class:`~.lora.LoRA` (family sd15, source "generated"), which Apply LoRA to Model merges or
applies at runtime and Save LoRA writes for any loader.
"""

from __future__ import annotations

import json
import math
import os
import re
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Iterator, Mapping

import torch
from torch import nn

from .analogy import ENCODER_FAMILIES, AnalogyEmbedding, EncoderInfo
from .fingerprint import EncoderFingerprint, compare_fingerprints, fingerprint_metadata, recorded_fingerprint
from .files import (FLOAT_DTYPES, MAX_UPDATE_NORM, json_metadata, load_checked_module, low_rank_norm, naming_file,
                    probe_header, read_tensor_file, show_value, write_safetensors_atomic)
from .layouts import ModelLayout
from .lora import FAMILIES, LoRA, LoRALayer

KIND = "loc_hypernetwork"              # analogy.kind of a hypernetwork file
CONFIG_KEY = "analogy.loc"             # the architecture, targets and encoder identity as JSON
PROJECTIONS = ("to_q", "to_k", "to_v", "to_out.0")
DIRECTIONS = ("forward", "reverse", "swapped")
QUERY_INIT_STD = 0.02     # the learned queries' initial scale (small: the pair, not the query, drives D at first)
MAX_PARAMETER_VALUE = 1e4  # largest |weight| accepted in a hypernetwork file (trained values are of order 1)
_ATTENTION = re.compile(r"(.+\.attn[12])\.(to_q|to_k|to_v|to_out\.0)")
_TARGET_PATH = re.compile(r"\w+(\.\w+)*\.attn[12]", re.ASCII)  # a UNet module path, as attention_targets finds them
# bounds a config read from a file must respect before anything is built (a hostile header cannot make us allocate)
_LIMITS = {"width": 8192, "blocks": 64, "heads": 256, "rank": 1024, "ffn": 65536, "token_width": 65536,
           "targets": 4096, "features": 65536, "bound": 1000.0, "norm": 1e6}


class HypernetworkError(ValueError):
    """A hypernetwork file or config is invalid, or does not fit the ANALOGY it is used with."""


# ---------------------------------------------------------------------------------------------------------------------
# targets


@dataclass(frozen=True)
class AttentionTarget:
    """One attention layer of the UNet (``...transformer_blocks.0.attn1``) and its q, k, v, out weight shapes."""

    path: str
    shapes: tuple[tuple[int, int], ...]  # (out, in) per projection, in PROJECTIONS order

    def projection_paths(self) -> tuple[str, ...]:
        return tuple(f"{self.path}.{p}" for p in PROJECTIONS)

    def head_width(self, rank: int) -> int:
        """Outputs of this layer's head: U_A (r·in) and U_B (out·r) of every projection."""
        return rank * sum(o + i for o, i in self.shapes)

    def down_width(self, rank: int) -> int:
        return rank * sum(i for _, i in self.shapes)


def attention_targets(layout: ModelLayout) -> tuple[AttentionTarget, ...]:
    """Every self/cross-attention layer of a UNet layout with all four projections, in the layout's order."""
    groups: dict[str, dict[str, tuple[int, ...]]] = {}
    for path, shape in layout.shapes.items():
        match = _ATTENTION.fullmatch(path)
        if match:
            groups.setdefault(match[1], {})[match[2]] = shape
    targets = []
    for path, parts in groups.items():
        if set(parts) != set(PROJECTIONS) or any(len(s) != 2 for s in parts.values()):
            continue
        targets.append(AttentionTarget(path, tuple((parts[p][0], parts[p][1]) for p in PROJECTIONS)))
    if not targets:
        raise HypernetworkError(f"the {layout.family} layout has no attention layers with to_q/to_k/to_v/to_out.0")
    return tuple(targets)


# ---------------------------------------------------------------------------------------------------------------------
# config


@dataclass(frozen=True)
class HypernetworkConfig:
    """Architecture of H, what it generates for, and the encoder whose tokens it reads (all stored in the file)."""

    targets: tuple[AttentionTarget, ...]
    token_width: int                  # W of the encoder's patch tokens (H reads 2W per token)
    encoder: EncoderInfo | None = None  # identity of that encoder; None: any encoder with W-d tokens
    token_count: int | None = None    # T of that encoder (recorded; checked with the identity)
    width: int = 512                  # P's output and D's width (paper: 512)
    blocks: int = 6                   # M (paper: 6)
    heads: int = 8                    # attention heads in D (paper: 8)
    rank: int = 4                     # r of every generated LoRA layer (not stated in the paper; see module doc)
    ffn: int = 2048                   # D's feed-forward width (4 × width)
    family: str = "sd15"              # model family of the generated LoRAs
    update_bound: float | None = None  # c of the soft cap ‖ΔW_p‖ ≤ c‖W_p‖ (module docstring); None: unbounded
    weight_norms: tuple[float, ...] | None = None  # ‖W_p‖ per projection (targets × PROJECTIONS), with the bound

    def __post_init__(self) -> None:
        for key in ("token_width", "width", "blocks", "heads", "rank", "ffn"):
            value = getattr(self, key)
            if type(value) is not int or not 1 <= value <= _LIMITS[key]:
                raise HypernetworkError(f"{key} must be an integer in 1..{_LIMITS[key]}, got {show_value(value)}")
        if self.width % self.heads:
            raise HypernetworkError(f"width {self.width} is not divisible by heads {self.heads}")
        if not 1 <= len(self.targets) <= _LIMITS["targets"]:
            raise HypernetworkError(f"a hypernetwork needs 1..{_LIMITS['targets']} target layers, got "
                                    f"{len(self.targets)}")
        if not (isinstance(self.family, str) and self.family in FAMILIES):
            raise HypernetworkError(f"family must be one of {FAMILIES}, got {show_value(self.family)}")
        if self.token_count is not None and (type(self.token_count) is not int or not 1 <= self.token_count <= 10**6):
            raise HypernetworkError(f"token_count must be an integer in 1..{10**6}, got {show_value(self.token_count)}")
        if self.encoder is not None and self.encoder.hidden_dim != self.token_width:
            raise HypernetworkError(f"the recorded encoder has {self.encoder.hidden_dim}-d tokens but token_width is "
                                    f"{self.token_width}")
        self._check_bound()

    def _check_bound(self) -> None:
        if (self.update_bound is None) != (self.weight_norms is None):
            raise HypernetworkError("update_bound and weight_norms go together (the cap is relative to each "
                                    "projection's weight norm): give both or neither")
        if self.update_bound is None:
            return
        value = self.update_bound
        if type(value) not in (int, float) or not 0 < value <= _LIMITS["bound"]:
            raise HypernetworkError(f"update_bound must be a number in (0, {_LIMITS['bound']}], got "
                                    f"{show_value(value)}")
        count = len(PROJECTIONS) * self.num_layers
        norms = self.weight_norms
        if not isinstance(norms, tuple) or len(norms) != count:
            raise HypernetworkError(f"weight_norms must hold one norm per projection ({count}), got "
                                    f"{show_value(norms if not isinstance(norms, tuple) else len(norms))}")
        bad = [n for n in norms if type(n) not in (int, float) or not 0 < n <= _LIMITS["norm"]]
        if bad:
            raise HypernetworkError(f"weight_norms must be positive numbers up to {_LIMITS['norm']:g}, got "
                                    f"{show_value(bad[0])}")

    def update_caps(self) -> dict[str, float] | None:
        """Per projection path, the largest ‖ΔW_p‖ the soft bound allows (c‖W_p‖); None when unbounded."""
        if self.update_bound is None:
            return None
        paths = [p for t in self.targets for p in t.projection_paths()]
        return {p: self.update_bound * n for p, n in zip(paths, self.weight_norms)}

    @property
    def num_layers(self) -> int:
        return len(self.targets)

    def to_json(self) -> dict:
        encoder = None if self.encoder is None else {
            "name": self.encoder.name, "family": self.encoder.family, "embed_dim": self.encoder.embed_dim,
            "hidden_dim": self.encoder.hidden_dim, "image_size": self.encoder.image_size,
            "patch_size": self.encoder.patch_size, "num_layers": self.encoder.num_layers}
        value = {"format": 1, "width": self.width, "blocks": self.blocks, "heads": self.heads, "rank": self.rank,
                 "ffn": self.ffn, "family": self.family, "token_width": self.token_width,
                 "token_count": self.token_count, "encoder": encoder,
                 "targets": [[t.path, [list(s) for s in t.shapes]] for t in self.targets]}
        if self.update_bound is not None:  # only when set: unbounded files read as before
            value["update_bound"] = {"ratio": self.update_bound, "weight_norms": list(self.weight_norms)}
        return value

    @staticmethod
    def from_json(value: Mapping) -> "HypernetworkConfig":
        """Parse what :meth:`to_json` wrote; any deviation is a HypernetworkError (the file is untrusted)."""
        if not isinstance(value, Mapping):
            raise HypernetworkError("the hypernetwork config is not a JSON object")
        if type(value.get("format")) is not int or value["format"] != 1:
            raise HypernetworkError(f"unknown hypernetwork config format {show_value(value.get('format'))} (this pack "
                                    "reads 1)")
        targets = _parse_targets(value.get("targets"))
        encoder = _parse_encoder(value.get("encoder"))
        kwargs = {}
        for key in ("width", "blocks", "heads", "rank", "ffn", "token_width", "token_count", "family"):
            if key not in value:
                raise HypernetworkError(f"the hypernetwork config lacks {key!r}")
            kwargs[key] = value[key]
        bound = value.get("update_bound")
        if bound is not None:
            if not (isinstance(bound, Mapping) and set(bound) == {"ratio", "weight_norms"}
                    and isinstance(bound["weight_norms"], list)):
                raise HypernetworkError("the hypernetwork config's update_bound must be {\"ratio\": c, "
                                        "\"weight_norms\": [one per projection]}")
            kwargs.update(update_bound=bound["ratio"], weight_norms=tuple(bound["weight_norms"]))
        return HypernetworkConfig(targets=targets, encoder=encoder, **kwargs)

    def describe(self) -> str:
        encoder = self.encoder.label if self.encoder else f"any encoder with {self.token_width}-d tokens"
        return (f"LoRA of Change hypernetwork for {self.family}: {self.num_layers} attention layers × q/k/v/out, "
                f"rank {self.rank}, decoder {self.blocks} blocks × {self.heads} heads at width {self.width}; "
                f"reads {encoder}" + ("" if self.update_bound is None else
                                      f"; updates softly bounded at {self.update_bound:g}x each weight's norm"))


def _parse_targets(raw) -> tuple[AttentionTarget, ...]:
    if not isinstance(raw, list) or not 1 <= len(raw) <= _LIMITS["targets"]:
        raise HypernetworkError("the hypernetwork config's targets must be a non-empty list of [path, shapes]")
    targets, seen = [], set()
    for entry in raw:
        if not (isinstance(entry, list) and len(entry) == 2 and isinstance(entry[1], list)
                and len(entry[1]) == len(PROJECTIONS)):
            raise HypernetworkError(f"bad target entry {show_value(entry)}: expected [path, [[out, in] x 4]]")
        if not (isinstance(entry[0], str) and len(entry[0]) <= 300 and _TARGET_PATH.fullmatch(entry[0])):
            raise HypernetworkError(f"target {show_value(entry[0])} is not the path of an attention layer "
                                    "(…attn1 or …attn2)")
        shapes = []
        for shape in entry[1]:
            if not (isinstance(shape, list) and len(shape) == 2
                    and all(type(d) is int and 1 <= d <= _LIMITS["features"] for d in shape)):
                raise HypernetworkError(f"target {entry[0][:80]!r}: shape {show_value(shape)} is not [out, in] of "
                                        f"positive ints up to {_LIMITS['features']}")
            shapes.append((shape[0], shape[1]))
        if entry[0] in seen:
            raise HypernetworkError(f"target {entry[0][:80]!r} is listed twice")
        seen.add(entry[0])
        targets.append(AttentionTarget(entry[0], tuple(shapes)))
    return tuple(targets)


def _parse_encoder(raw) -> EncoderInfo | None:
    if raw is None:
        return None
    keys = ("name", "family", "embed_dim", "hidden_dim", "image_size", "patch_size", "num_layers")
    if not isinstance(raw, Mapping) or set(raw) != set(keys):
        raise HypernetworkError(f"the recorded encoder must be an object with exactly {', '.join(keys)}")
    if not (isinstance(raw["name"], str) and 0 < len(raw["name"]) <= 300):
        raise HypernetworkError(f"the recorded encoder's name is {show_value(raw['name'])}, expected a model name")
    if not (isinstance(raw["family"], str) and raw["family"] in ENCODER_FAMILIES):
        raise HypernetworkError(f"the recorded encoder's family is {show_value(raw['family'])}, expected one of "
                                f"{', '.join(ENCODER_FAMILIES)}")
    for key in keys[2:]:
        if not (type(raw[key]) is int and -1 <= raw[key] <= 10**6):
            raise HypernetworkError(f"the recorded encoder's {key} is {show_value(raw[key])}, expected an integer "
                                    f"in -1..{10**6}")
    return EncoderInfo(raw["name"], raw["embed_dim"], raw["hidden_dim"], raw["image_size"], raw["patch_size"],
                       raw["num_layers"], raw["family"])


# ---------------------------------------------------------------------------------------------------------------------
# generated factors


@dataclass(frozen=True)
class LoRAFactors:
    """One LoRA per sample: per projection path, ``down`` [B, r, in] (U_A) and ``up`` [B, out, r] (U_B), and a scale
    per sample [B] (±strength; −1 is LoRA Reverse). Differentiable: the trainer back-propagates through it."""

    layers: dict[str, tuple[torch.Tensor, torch.Tensor]]
    scale: torch.Tensor

    @property
    def batch_size(self) -> int:
        return self.scale.shape[0]

    def scaled(self, factor: float | torch.Tensor) -> "LoRAFactors":
        return replace(self, scale=self.scale * factor)

    def cat(self, other: "LoRAFactors") -> "LoRAFactors":
        """The samples of ``self`` followed by those of ``other`` (one batch for two loss terms)."""
        layers = {k: (torch.cat([d, other.layers[k][0]]), torch.cat([u, other.layers[k][1]]))
                  for k, (d, u) in self.layers.items()}
        return LoRAFactors(layers, torch.cat([self.scale, other.scale]))

    def update_norm(self, other: "LoRAFactors | None" = None) -> torch.Tensor:
        """Per sample, ‖ΔW‖ over all layers (the Frobenius norm of every layer's update, stacked) of this LoRA, or of
        this LoRA plus ``other``, computed exactly from the factors: ‖U D‖² = Σ (UᵀU ⊙ D Dᵀ)."""
        total = 0.0
        for path, (down, up) in self.layers.items():
            ups, downs = up.float() * self.scale.float().view(-1, 1, 1), down.float()
            if other is not None:
                other_down, other_up = other.layers[path]
                ups = torch.cat([ups, other_up.float() * other.scale.float().view(-1, 1, 1)], dim=2)
                downs = torch.cat([downs, other_down.float()], dim=1)
            total = total + squared_update_norm(downs, ups)
        return torch.as_tensor(total).clamp_min(0).sqrt()

    def lora(self, sample: int = 0, family: str = "sd15", metadata: dict[str, str] | None = None) -> LoRA:
        """Sample ``sample`` as the pack's LoRA type (detached, float32)."""
        s = float(self.scale[sample])
        layers = {k: LoRALayer(d[sample].detach().float().contiguous(), u[sample].detach().float().contiguous(), s)
                  for k, (d, u) in self.layers.items()}
        return LoRA(layers, family=family, source="generated", metadata=dict(metadata or {}))


# ---------------------------------------------------------------------------------------------------------------------
# the hypernetwork


class LoRAHypernetwork(nn.Module):
    """H = S ∘ D ∘ P over encoder tokens of A and A′ (see the module docstring)."""

    def __init__(self, config: HypernetworkConfig):
        super().__init__()
        self.config = config
        self.encoder_fingerprint: EncoderFingerprint | None = None  # of the encoder it was trained with (its file's)
        c = config
        self.fuse = nn.Linear(2 * c.token_width, c.width)                       # P
        self.queries = nn.Parameter(torch.empty(c.num_layers, c.width))         # one learned query per layer
        block = nn.TransformerDecoderLayer(c.width, c.heads, c.ffn, dropout=0.0, activation="gelu",
                                           batch_first=True, norm_first=True)
        self.decoder = nn.TransformerDecoder(block, c.blocks, norm=nn.LayerNorm(c.width))  # D
        self.heads = nn.ModuleList(nn.Linear(c.width, t.head_width(c.rank)) for t in c.targets)  # S
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """So that a fresh H's U_A depends on (A, A′) from the first step: queries ~ N(0, QUERY_INIT_STD²) and zero
        biases in P and D's feed-forwards (with queries ~ N(0, 1) and torch's default biases, the input-independent
        part dominated the decoder's residual stream and ~80-87 % of the first U_A was the same for every pair; see
        :func:`input_dependence`). D's weights keep torch's defaults. Heads as eq. 11: the U_A part drawn at LoRA's
        usual scale, the U_B part and all head biases zero (a fresh H generates an exactly zero LoRA)."""
        if self.queries.is_meta:
            return
        nn.init.normal_(self.queries, std=QUERY_INIT_STD)
        feed_forwards = [m for layer in self.decoder.layers for m in (layer.linear1, layer.linear2)]
        for module in (self.fuse, *feed_forwards):
            nn.init.zeros_(module.bias)
        r, width = self.config.rank, self.config.width
        with torch.no_grad():
            for target, head in zip(self.config.targets, self.heads):
                head.weight.zero_()
                head.bias.zero_()
                row = 0
                for _, in_features in target.shapes:  # U_A rows of each projection: [r · in]
                    rows = r * in_features
                    head.weight[row: row + rows].normal_(std=1.0 / math.sqrt(3 * in_features * width))
                    row += rows

    def forward(self, tokens_a: torch.Tensor, tokens_a_prime: torch.Tensor) -> LoRAFactors:
        """Tokens [B, T, W] of A and A′ -> one LoRA per sample (scale 1)."""
        c = self.config
        if tokens_a.shape != tokens_a_prime.shape or tokens_a.ndim != 3 or tokens_a.shape[-1] != c.token_width:
            raise HypernetworkError(f"expected A and A′ tokens [batch, T, {c.token_width}] of one shape, got "
                                    f"{tuple(tokens_a.shape)} and {tuple(tokens_a_prime.shape)}")
        dtype = self.fuse.weight.dtype
        memory = self.fuse(torch.cat([tokens_a, tokens_a_prime], dim=-1).to(dtype))   # f_vis_ins [B, T, width]
        queries = self.queries.unsqueeze(0).expand(memory.shape[0], -1, -1)
        primitives = self.decoder(queries, memory)                                   # [B, L, width]
        layers = {}
        b, r = memory.shape[0], c.rank
        caps = c.update_caps()
        for i, (target, head) in enumerate(zip(c.targets, self.heads)):
            out = head(primitives[:, i])                                             # eq. 5 / eq. 10
            downs, ups = out.split([target.down_width(r), out.shape[1] - target.down_width(r)], dim=1)
            down_parts = downs.split([r * i_f for _, i_f in target.shapes], dim=1)
            up_parts = ups.split([o_f * r for o_f, _ in target.shapes], dim=1)
            for path, (o_f, i_f), d, u in zip(target.projection_paths(), target.shapes, down_parts, up_parts):
                d, u = d.reshape(b, r, i_f), u.reshape(b, o_f, r)
                if caps is not None:
                    u = u * soft_bound_factor(d, u, caps[path]).view(b, 1, 1).to(u.dtype)
                layers[path] = (d, u)
        return LoRAFactors(layers, torch.ones(b, device=memory.device, dtype=memory.dtype))

    def u_b_parameters(self) -> Iterator[tuple[str, torch.Tensor]]:
        """(name, view) of every head weight/bias slice that produces U_B (zero at initialisation)."""
        r = self.config.rank
        for index, (target, head) in enumerate(zip(self.config.targets, self.heads)):
            start = target.down_width(r)
            yield f"heads.{index}.weight[U_B]", head.weight[start:]
            yield f"heads.{index}.bias[U_B]", head.bias[start:]


def squared_update_norm(down: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """Per sample, ‖up @ down‖² ([B, out, r] @ [B, r, in]) without forming it: Σ (UᵀU ⊙ D Dᵀ), float32 (differentiable;
    :func:`~.files.low_rank_norm` is the checked, single-layer form used on files)."""
    up, down = up.float(), down.float()
    return ((up.transpose(1, 2) @ up) * (down @ down.transpose(1, 2))).sum(dim=(1, 2))


def low_rank_update_norm(down: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """Per sample, the Frobenius norm of ``up @ down``; the square is clamped at 1e-24 before the root so that the
    gradient of a zero update is finite (zero)."""
    return squared_update_norm(down, up).clamp_min(1e-24).sqrt()


def soft_bound_factor(down: torch.Tensor, up: torch.Tensor, cap: float) -> torch.Tensor:
    """Per sample, the factor f = cap · tanh(n / cap) / n (n = ‖up @ down‖) that maps an update of norm n to one of
    norm cap · tanh(n / cap) < cap in the same direction: f → 1 as n → 0, and f · n → cap as n grows."""
    norm = low_rank_update_norm(down, up)
    return cap * torch.tanh(norm / cap) / norm


def projection_weight_norms(model: nn.Module, targets: tuple[AttentionTarget, ...]) -> tuple[float, ...]:
    """‖W_p‖ (Frobenius) of every target projection of ``model``, in targets × PROJECTIONS order: what a bounded H
    records for the backbone it is trained on."""
    norms = []
    for path in (p for t in targets for p in t.projection_paths()):
        try:
            weight = model.get_submodule(path).weight
        except AttributeError:
            raise HypernetworkError(f"the model has no layer {path} with a weight")
        norms.append(float(weight.detach().float().norm()))
    return tuple(norms)


@torch.no_grad()
def relative_update_norms(factors: LoRAFactors, model: nn.Module) -> torch.Tensor:
    """‖ΔW_p‖ / ‖W_p‖ [B, projections] of one generated LoRA per sample on ``model`` (scale included)."""
    columns = []
    for path, (down, up) in factors.layers.items():
        weight = float(model.get_submodule(path).weight.detach().float().norm())
        columns.append(low_rank_update_norm(down, up).cpu() * factors.scale.float().abs().cpu() / weight)
    return torch.stack(columns, dim=1)


def build_hypernetwork(config: HypernetworkConfig, seed: int | None = None) -> LoRAHypernetwork:
    """A freshly initialised H (deterministic for a given ``seed``)."""
    if seed is None:
        return LoRAHypernetwork(config)
    state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        return LoRAHypernetwork(config)
    finally:
        torch.random.set_rng_state(state)


# ---------------------------------------------------------------------------------------------------------------------
# applying one LoRA per sample (training, tests, world evaluation)


@contextmanager
def batched_lora(model: nn.Module, factors: LoRAFactors | None) -> Iterator[None]:
    """Inside the block, every target projection of ``model`` adds ``scale_b · (x_b·U_A,bᵀ)·U_B,bᵀ`` for sample b.

    A batch that is k times the LoRA batch (classifier-free guidance stacks [uncond; cond]) uses the LoRAs tiled
    k times (sample i of the batch takes LoRA i mod B). ``None`` applies nothing.
    """
    if factors is None:
        yield
        return
    handles = []
    try:
        for path, (down, up) in factors.layers.items():
            try:
                module = model.get_submodule(path)
            except AttributeError:
                raise HypernetworkError(f"the model has no layer {path}: the hypernetwork was made for another UNet")
            handles.append(module.register_forward_hook(_hook(down, up, factors.scale, path)))
        yield
    finally:
        for handle in handles:
            handle.remove()


def _hook(down: torch.Tensor, up: torch.Tensor, scale: torch.Tensor, path: str):
    def add_update(module, args, output):
        x = args[0]
        n, b = x.shape[0], down.shape[0]
        if n % b:
            raise HypernetworkError(f"{path}: batch of {n} does not fit {b} generated LoRAs")
        d, u, s = (down, up, scale) if n == b else (down.repeat(n // b, 1, 1), up.repeat(n // b, 1, 1),
                                                    scale.repeat(n // b))
        flat = x.reshape(n, -1, x.shape[-1])
        h = torch.bmm(flat, d.transpose(1, 2).to(x.dtype))                            # [n, M, r]
        delta = torch.bmm(h, u.transpose(1, 2).to(x.dtype)) * s.to(x.dtype).view(n, 1, 1)
        return output + delta.reshape(*output.shape)
    return add_update


# ---------------------------------------------------------------------------------------------------------------------
# inference: an ANALOGY -> a LoRA


@torch.no_grad()
def consistency_gap(hypernetwork: LoRAHypernetwork, tokens_a: torch.Tensor,
                    tokens_a_prime: torch.Tensor) -> torch.Tensor:
    """‖H(A, A′) + H(A′, A)‖ / ‖H(A, A′)‖ per sample (norms over all layers' updates): 0 when exchanging the pair
    exactly reverses the LoRA, which the paper's random exchange encourages. NaN where H(A, A′) = 0 (a fresh H)."""
    forward = hypernetwork(tokens_a, tokens_a_prime)
    swapped = hypernetwork(tokens_a_prime, tokens_a)
    return forward.update_norm(swapped) / forward.update_norm()


@torch.no_grad()
def exchange_scores(hypernetwork: LoRAHypernetwork, tokens_a: torch.Tensor,
                    tokens_a_prime: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per sample, how H(A′, A) relates to H(A, A′) (ΔW of every layer materialised, float32; for evaluation):

    * ``gap`` — ‖H(A, A′) + H(A′, A)‖ / ‖H(A, A′)‖ (as :func:`consistency_gap`);
    * ``cosine`` — the cosine of H(A′, A) − H̄ with −(H(A, A′) − H̄), H̄ the mean LoRA of the batch's 2B generated
      LoRAs (both orders). 1 when exchanging exactly negates the input-dependent part, about −1 when H ignores the
      order, 0 when the two are unrelated. Both are invariant to the LoRAs' overall scale."""
    forward = hypernetwork(tokens_a, tokens_a_prime)
    swapped = hypernetwork(tokens_a_prime, tokens_a)
    dot = torch.zeros(forward.batch_size)
    norm_x, norm_y, norm_f, norm_sum = (torch.zeros_like(dot) for _ in range(4))
    for path in forward.layers:
        delta_f, delta_s = _delta(forward, path), _delta(swapped, path)
        mean = torch.cat([delta_f, delta_s]).mean(dim=0, keepdim=True)
        x, y = (delta_s - mean).flatten(1), -(delta_f - mean).flatten(1)
        dot += (x * y).sum(1)
        norm_x, norm_y = norm_x + x.square().sum(1), norm_y + y.square().sum(1)
        norm_f, norm_sum = norm_f + delta_f.square().flatten(1).sum(1), \
            norm_sum + (delta_f + delta_s).square().flatten(1).sum(1)
    return {"gap": norm_sum.sqrt() / norm_f.sqrt(), "cosine": dot / (norm_x * norm_y).sqrt()}


def _delta(factors: LoRAFactors, path: str) -> torch.Tensor:
    """ΔW [B, out, in] of one projection for every sample (scale included)."""
    down, up = factors.layers[path]
    return (up.float() @ down.float()).cpu() * factors.scale.float().cpu().view(-1, 1, 1)


def generated_updates(factors: LoRAFactors) -> torch.Tensor:
    """Every projection's ΔW of every sample, flattened and joined: [B, Σ_p out_p · in_p] (the update itself, which
    a rescaling of U_A against U_B leaves unchanged)."""
    return torch.cat([_delta(factors, path).flatten(1) for path in factors.layers], dim=1)


@torch.no_grad()
def input_dependence(hypernetwork: LoRAHypernetwork, tokens_a: torch.Tensor, tokens_a_prime: torch.Tensor) -> float:
    """The fraction of the generated U_A's second moment that varies across the batch's pairs:
    Σ_b ‖U_A,b − mean_b U_A‖² / Σ_b ‖U_A,b‖² (0: one LoRA direction for every input, → 1: all input-driven)."""
    factors = hypernetwork(tokens_a, tokens_a_prime)
    return pair_dependence(torch.cat([down.flatten(1) for down, _ in factors.layers.values()], dim=1))


def pair_dependence(values: torch.Tensor) -> float:
    """The share of the second moment of ``values`` [N, D] that varies across its rows: Σ_i ‖x_i − μ‖² / Σ_i ‖x_i‖²
    (0: one value for every row; 1: no common part). Of generated factors or updates ΔW, the complement is the part
    every pair gets alike, whatever its edit."""
    values = values.double().flatten(1)
    total = float(values.square().sum())
    if total == 0:
        raise ValueError("pair_dependence: every value is zero")
    return float((values - values.mean(dim=0)).square().sum()) / total


def check_encoder(config: HypernetworkConfig, analogy: AnalogyEmbedding) -> None:
    """Refuse an ANALOGY whose patch tokens come from an encoder other than the one H was trained with."""
    missing = [r for r in ("a", "a_prime") if r not in analogy.patch_tokens]
    if missing:
        raise HypernetworkError(f"this ANALOGY has no patch tokens for {', '.join(missing)}; make it with Encode "
                                "Analogy (A and A′ connected)")
    tokens = analogy.patch_tokens["a"]
    trained = config.encoder.label if config.encoder else "its training encoder"
    if tokens.shape[-1] != config.token_width:
        raise HypernetworkError(f"the hypernetwork reads {config.token_width}-d patch tokens ({trained}) but the "
                                f"ANALOGY's encoder, {analogy.encoder.label}, gives {tokens.shape[-1]}-d tokens; "
                                "encode the analogy with the CLIP vision model the hypernetwork was trained with")
    if config.encoder is not None and _identity(config.encoder) != _identity(analogy.encoder):
        raise HypernetworkError(f"the hypernetwork was trained on tokens of {config.encoder.label}, but the ANALOGY "
                                f"comes from {analogy.encoder.label} (same width, another model); encode the "
                                "analogy with the CLIP vision model the hypernetwork was trained with")
    if config.token_count is not None and tokens.shape[1] != config.token_count:
        raise HypernetworkError(f"the hypernetwork was trained on {config.token_count} tokens per image, the "
                                f"ANALOGY has {tokens.shape[1]} (another input resolution?)")


def check_encoder_weights(hypernetwork: LoRAHypernetwork, analogy: AnalogyEmbedding) -> str:
    """Refuse an ANALOGY from an encoder of the right architecture but other weights than H's training encoder (a
    stock CLIP for an H trained with its own image encoder, LAION's CLIP for OpenAI's); a sentence for the info."""
    return compare_fingerprints(hypernetwork.encoder_fingerprint, analogy.fingerprint, "this hypernetwork",
                                f"the ANALOGY's encoder ({analogy.encoder.label})",
                                "Encode the analogy with the CLIP vision file it was trained with (a run that trained "
                                "its image encoder writes it beside H as loc_image_encoder.safetensors)")


def _identity(info: EncoderInfo) -> tuple:
    return (info.family, info.name, info.embed_dim, info.hidden_dim, info.image_size, info.patch_size,
            info.num_layers)


@torch.no_grad()
def generate_lora(hypernetwork: LoRAHypernetwork, analogy: AnalogyEmbedding, direction: str = "forward",
                  strength: float = 1.0, sample: int = 0) -> LoRA:
    """The LoRA of one ANALOGY item: ``forward`` H(A, A′), ``reverse`` −H(A, A′) (LoRA Reverse) or ``swapped``
    H(A′, A), times ``strength``. Refuses the wrong encoder and updates no usable LoRA has (damaged weights)."""
    if direction not in DIRECTIONS:
        raise HypernetworkError(f"direction must be one of {DIRECTIONS}, got {direction!r}")
    if not math.isfinite(strength):
        raise HypernetworkError(f"strength must be finite, got {strength}")
    config = hypernetwork.config
    check_encoder(config, analogy)
    check_encoder_weights(hypernetwork, analogy)
    if not 0 <= sample < analogy.batch_size:
        raise HypernetworkError(f"sample {sample} is out of range: the ANALOGY holds {analogy.batch_size} item(s)")
    first, second = ("a_prime", "a") if direction == "swapped" else ("a", "a_prime")
    param = next(hypernetwork.parameters())
    tokens = [analogy.patch_tokens[r][sample: sample + 1].to(param.device, param.dtype) for r in (first, second)]
    factors = hypernetwork(*tokens)
    sign = -1.0 if direction == "reverse" else 1.0
    meta = {"analogy.loc_direction": direction, "analogy.loc_rank": str(config.rank)}
    lora = factors.scaled(sign * strength).lora(0, config.family, meta)
    _check_generated(lora)
    return lora


def _check_generated(lora: LoRA) -> None:
    for name, layer in lora.layers.items():
        norm = low_rank_norm(layer.up, layer.down, layer.scale, limit=MAX_UPDATE_NORM)
        if not norm <= MAX_UPDATE_NORM:
            raise HypernetworkError(f"{name}: the generated update's norm is {norm:.3g}, beyond the "
                                    f"{MAX_UPDATE_NORM:g} any usable LoRA stays below (damaged hypernetwork?)")


# ---------------------------------------------------------------------------------------------------------------------
# files


def hypernetwork_metadata(config: HypernetworkConfig, extra: Mapping[str, str] | None = None,
                          fingerprint: EncoderFingerprint | None = None) -> dict[str, str]:
    recorded = {} if fingerprint is None else fingerprint_metadata(fingerprint)
    return {**recorded, **dict(extra or {}), "analogy.kind": KIND, CONFIG_KEY: json.dumps(config.to_json()),
            "analogy.family": config.family}


def save_hypernetwork(hypernetwork: LoRAHypernetwork, path: str | os.PathLike,
                      metadata: Mapping[str, str] | None = None, dtype: torch.dtype | None = None):
    """Write H's weights, config and its encoder's fingerprint (when known) as safetensors (atomically); ``dtype``
    e.g. bfloat16 halves the file."""
    state = {k: (v.to(dtype) if dtype is not None else v) for k, v in hypernetwork.state_dict().items()}
    meta = hypernetwork_metadata(hypernetwork.config, metadata, hypernetwork.encoder_fingerprint)
    return write_safetensors_atomic(state, path, meta)


_OTHER_KINDS = {"lorweb_basis": "a LoRWeB LoRA basis (load it with Load LoRA Basis)"}


def load_hypernetwork(path: str | os.PathLike) -> LoRAHypernetwork:
    """Read a hypernetwork file (checked before anything is built; nothing larger than the file is allocated).
    Every problem is a TensorFileError or HypernetworkError whose message starts with the file name."""
    tf = read_tensor_file(path, "LoRA of Change hypernetwork", dtypes=FLOAT_DTYPES)
    with naming_file(path, HypernetworkError):
        kind = tf.metadata.get("analogy.kind")
        if kind != KIND:
            raise HypernetworkError(f"this is not a LoRA of Change hypernetwork: {_describe_other(kind, tf.tensors)}")
        raw = json_metadata(tf.metadata, CONFIG_KEY, error=HypernetworkError)
        if raw is None:
            raise HypernetworkError(f"the header has no {CONFIG_KEY!r} config (architecture and targets)")
        config = HypernetworkConfig.from_json(raw)
        fingerprint = recorded_fingerprint(tf.metadata, HypernetworkError)
        hypernetwork = load_checked_module(lambda: LoRAHypernetwork(config), tf.tensors, max_abs=MAX_PARAMETER_VALUE,
                                           error=HypernetworkError)
        hypernetwork.encoder_fingerprint = fingerprint
        return hypernetwork


def _describe_other(kind: str | None, tensors: Mapping[str, torch.Tensor]) -> str:
    if kind in _OTHER_KINDS:
        return f"it is {_OTHER_KINDS[kind]}"
    if any(k.endswith((".lora_keys", ".att_lora_to_q.weight")) for k in tensors):
        return f"it is {_OTHER_KINDS['lorweb_basis']}"
    if any(re.search(r"(lora_[AB]|lora_(up|down))(\.weight)?$", k) for k in tensors):
        return "it is an ordinary LoRA (load it with Load LoRA (Analogy))"
    if kind:
        return f"its header says analogy.kind = {kind[:40]!r}"
    return f"no analogy.kind = {KIND!r} in its header (keys look like {sorted(tensors)[:3]})"


def is_hypernetwork_file(path: str | os.PathLike) -> bool:
    """Whether a file's header says it is a LoRA of Change hypernetwork (header only; unreadable files are not)."""
    header = probe_header(path)
    return header is not None and header.metadata.get("analogy.kind") == KIND

