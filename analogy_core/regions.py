"""Multi-scale learnable edit regions (Ma et al., "Beyond Editing Pairs: Fine-Grained Instructional Image Editing via
Multi-Scale Learnable Regions"): the region predictor, its training losses, analogy mode, mask post-processing and
the checkpoint format. ComfyUI-free (the nodes and the trainer share this module).

The predictor (paper §3.2, equations 1-3), for an image X and a condition (instruction tokens, or an analogy):

    F_img       = E_v(X)[patches]                        CLIP patch features in the joint space, [N, d]
    F_Editedimg = softmax(F_img W_Q^C (C W_K^C)ᵀ / √d) C W_V^C          cross-attention, C = condition tokens
    F_imgRegion = softmax(F_E W_Q^S (F_E W_K^S)ᵀ / √d) F_E W_V^S        self-attention on F_E = F_Editedimg
    P_region    = sigmoid(MLP(F_imgRegion))                             one probability per patch, [N]

reshaped to the patch grid and upsampled to the image. "Multi-scale" in the paper means exactly this: the region is a
free per-patch map whose extent follows the edit and the object (Figure 2), instead of LearnRegion's boxes of a few
fixed sizes; there is no feature pyramid. The attention blocks are single-head with √d scaling and no
normalisation, as the equations are written; ``residual`` (not in the paper) adds each block's input to its output,
F_Editedimg = F_img + CrossAttn, F_imgRegion = F_Editedimg + SelfAttn. With torch's default init and CLIP/T5 feature
scales the attention scores barely vary, so both softmaxes average and the paper's form has little per-patch
information; :meth:`RegionPredictor.calibrate_attention` (the trainer's default, at the first step of a fresh run)
scales W_Q, W_K so the scores have unit standard deviation.
``positions`` (not in the paper) adds a learned vector per patch to F_img (and
per token to an analogy condition), which the world's "add a square at the top left" needed; the trainer starts them
as 2-D sin-cos positions (:func:`sincos_positions`, ``position_init``), so neighbouring patches start alike and the
self-attention can gather a patch's surroundings from the first step. Checkpoints record which form they use.

Conditions. Text mode (the paper): instruction tokens of a T5 encoder (FLAN-T5-Base, 768-d = d for ViT-L/14; a linear
projection is learnt when the widths differ). Analogy mode (beyond the paper): the ANALOGY's patch tokens of A and A′,
one condition token per position holding [t_A, t_A′ − t_A] (what is there and how it changed), projected to d.

Losses (paper §3.3, equations 4-11), each term as written there; X_res is the pack's first-order stand-in for the
paper's generator, which makes X_res from X, t_e and the thresholded region (README, "Training losses"):

    L_semAlign = (1 − cos(f_sem(F_Editedimg), T_e)) + (1 − cos(f_sem(F_img), T_o))
    X_res      = M ⊙ X_edit + (1 − M) ⊙ X          (M: the soft region at image resolution)
    L_CLIPg    = 1 − cos(I_res, T_e)
    L_CLIPd    = 1 − cos(I_res − I_ori, T_e − T_o)
    L_CLIPs    = ‖Sim(F_img) − Sim(F_res)‖²₂       (Sim: pairwise cosine similarities of patch features; sum of squares)
    L_total    = α·L_semAlign + β·(λg·L_CLIPg + λd·L_CLIPd + λs·L_CLIPs)

T_o, T_e are CLIP text embeddings of the source and target captions, I = E_v(·)[CLS] (projected image embeddings).
X_edit is what a frozen generator makes of X for the target caption; the region reaches L_CLIP through the blend.
Analogy mode is supervised instead by the A→A′ difference (:func:`region_bce` against :func:`patch_targets`).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Mapping, NamedTuple, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .analogy import CLIP_MEAN, CLIP_STD, ENCODER_FAMILIES, AnalogyEmbedding, EncoderInfo
from .encoders import ImageEncoder
from .files import (FLOAT_DTYPES, json_metadata, load_checked_module, naming_file, probe_header, read_tensor_file,
                    show_value, write_safetensors_atomic)
from .fingerprint import EncoderFingerprint, compare_fingerprints, fingerprint_metadata, recorded_fingerprint
from .t5_folder import load_t5_folder

KIND = "region_predictor"
SPEC_KEY = "analogy.region_spec"
MODES = ("text", "analogy")
MAX_PARAMETER_VALUE = 1e4   # trained weights are O(1); beyond this a file is damaged or hostile
_LIMITS = {"dim": 8192, "grid": 256, "image_size": 4096, "width": 16384, "hidden": 16384}
_PIXEL_STAT = 100.0  # bound on |mean| and on std, 1/bound the least std (CLIP's are ~0.4 and ~0.27 on 0..1 pixels)


class RegionError(ValueError):
    """A region checkpoint, condition or input does not fit what the region predictor needs."""


# ---------------------------------------------------------------------------------------------------------------------
# the architecture's description (stored in the checkpoint header)


@dataclass(frozen=True)
class RegionSpec:
    """Sizes and the encoders a region predictor was trained with."""

    dim: int                          # d: CLIP joint width of the patch features (768 for ViT-L/14)
    grid: int                         # patches per side of the CLIP input (16 for ViT-L/14 at 224 px)
    image_size: int                   # CLIP input side in pixels
    text_dim: int = 0                 # instruction-token width (0: no text mode)
    analogy_dim: int = 0              # ANALOGY patch-token width (0: no analogy mode)
    hidden: int = 0                   # width of the token-wise MLP (0: d)
    residual: bool = False            # add each attention's input to its output (not in the paper's equations)
    positions: bool = False           # learned position embeddings on the patch grid (not in the paper)
    encoder: dict = field(default_factory=dict)              # EncoderInfo fields of the CLIP vision model
    instruction_encoder: str = ""     # name of the instruction encoder (e.g. "flan-t5-base")
    mean: tuple[float, float, float] = CLIP_MEAN
    std: tuple[float, float, float] = CLIP_STD

    def __post_init__(self):
        _check_int("dim", self.dim, 1, _LIMITS["dim"])
        _check_int("grid", self.grid, 1, _LIMITS["grid"])
        _check_int("image_size", self.image_size, self.grid, _LIMITS["image_size"])
        _check_int("text_dim", self.text_dim, 0, _LIMITS["width"])
        _check_int("analogy_dim", self.analogy_dim, 0, _LIMITS["width"])
        _check_int("hidden", self.hidden, 0, _LIMITS["hidden"])
        if not (self.text_dim or self.analogy_dim):
            raise RegionError("a region predictor needs a text or an analogy condition (text_dim or analogy_dim)")
        for name, low, high in (("mean", -_PIXEL_STAT, _PIXEL_STAT), ("std", 1 / _PIXEL_STAT, _PIXEL_STAT)):
            value = getattr(self, name)
            # exact comparisons: a huge JSON integer is out of range, never converted to float (OverflowError)
            if not (isinstance(value, (tuple, list)) and len(value) == 3
                    and all(type(v) in (int, float) and low <= v <= high for v in value)):
                raise RegionError(f"region spec {name} must be three numbers in [{low:g}, {high:g}] (one per colour "
                                  f"channel), got {_short(value)}")
        for name in ("residual", "positions"):
            if not isinstance(getattr(self, name), bool):
                raise RegionError(f"region spec {name} must be true or false, got {show_value(getattr(self, name))}")
        if self.encoder != {}:
            _check_encoder(self.encoder)
        if not (isinstance(self.instruction_encoder, str) and len(self.instruction_encoder) <= 300):
            raise RegionError(f"region spec instruction_encoder must be a name, got "
                              f"{show_value(self.instruction_encoder)}")

    @property
    def modes(self) -> tuple[str, ...]:
        return tuple(m for m, w in (("text", self.text_dim), ("analogy", self.analogy_dim)) if w)

    @property
    def mlp_width(self) -> int:
        return self.hidden or self.dim

    @property
    def encoder_info(self) -> EncoderInfo | None:
        if not self.encoder:
            return None
        try:
            return EncoderInfo(**self.encoder)
        except TypeError:
            raise RegionError(f"region spec encoder is not an encoder description: {str(self.encoder)[:80]}") from None

    def to_json(self) -> dict:
        return {"format": 1, **asdict(self), "mean": list(self.mean), "std": list(self.std)}

    @staticmethod
    def from_json(value: Mapping) -> "RegionSpec":
        """Parse :meth:`to_json`'s output; any deviation is a RegionError (files are untrusted)."""
        if not isinstance(value, Mapping):
            raise RegionError("the region spec is not a JSON object")
        if type(value.get("format")) is not int or value["format"] != 1:
            raise RegionError(f"unknown region spec format {show_value(value.get('format'))} (this pack reads 1)")
        known = {f for f in RegionSpec.__dataclass_fields__}
        unknown = sorted(set(value) - known - {"format"})
        if unknown:
            raise RegionError(f"the region spec has unknown keys {[k[:40] for k in unknown[:3]]}")
        kwargs = {k: value[k] for k in known if k in value}
        for key in ("mean", "std"):
            if key in kwargs:
                kwargs[key] = tuple(kwargs[key]) if isinstance(kwargs[key], list) else kwargs[key]
        try:
            return RegionSpec(**kwargs)
        except TypeError as err:
            raise RegionError(f"the region spec is incomplete: {err}") from None

    def describe(self) -> str:
        modes = " and ".join(self.modes)
        encoder = self.encoder_info.label if self.encoder_info else f"a {self.dim}-d CLIP"
        text = f", instruction encoder {self.instruction_encoder or '?'} ({self.text_dim}-d)" if self.text_dim else ""
        form = "".join(text for flag, text in ((self.residual, ", residual attention"),
                                               (self.positions, ", position embeddings")) if flag)
        return (f"region predictor ({modes} mode{form}), d={self.dim}, {self.grid}x{self.grid} patches of {encoder}"
                f"{text}")


def _check_int(name: str, value, low: int, high: int) -> None:
    if type(value) is not int or not low <= value <= high:
        raise RegionError(f"region spec {name} must be an integer in [{low}, {high}], got {show_value(value)}")


def _short(value) -> str:
    if isinstance(value, (list, tuple)) and len(value) <= 3:
        return "[" + ", ".join(show_value(v) for v in value) + "]"
    return show_value(value)


_ENCODER_SIZES = ("embed_dim", "hidden_dim", "image_size", "patch_size", "num_layers")


def _check_encoder(encoder) -> None:
    """The CLIP vision identity a spec records: exactly EncoderInfo's fields, sizes in range, a known family."""
    if not isinstance(encoder, dict):
        raise RegionError(f"region spec encoder must be an object, got {show_value(encoder)}")
    fields = {*_ENCODER_SIZES, "name", "family"}
    if set(encoder) != fields:
        raise RegionError(f"region spec encoder must have exactly the fields {', '.join(sorted(fields))}")
    for key in _ENCODER_SIZES:
        if not (type(encoder[key]) is int and -1 <= encoder[key] <= 10**6):
            raise RegionError(f"region spec encoder.{key} must be an integer in -1..{10**6}, got "
                              f"{show_value(encoder[key])}")
    if not (isinstance(encoder["name"], str) and 0 < len(encoder["name"]) <= 300):
        raise RegionError(f"region spec encoder.name must be a model name, got {show_value(encoder['name'])}")
    if not (isinstance(encoder["family"], str) and encoder["family"] in ENCODER_FAMILIES):
        raise RegionError(f"region spec encoder.family must be one of {', '.join(ENCODER_FAMILIES)}, got "
                          f"{show_value(encoder['family'])}")


# ---------------------------------------------------------------------------------------------------------------------
# the module


def attend(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
           key_mask: torch.Tensor | None = None) -> torch.Tensor:
    """softmax(Q Kᵀ / √d) V over the last two dims; ``key_mask`` [B, M] (True = attend) hides padding tokens."""
    scores = query @ key.transpose(-1, -2) / math.sqrt(query.shape[-1])
    if key_mask is not None:
        scores = scores.masked_fill(~key_mask[:, None, :].bool(), float("-inf"))
    return scores.softmax(dim=-1) @ value


class SingleHeadAttention(nn.Module):
    """W_Q, W_K, W_V ∈ R^{d×d} (no bias), one head, √d scaling, no residual: the paper's equations 1 and 2."""

    def __init__(self, dim: int):
        super().__init__()
        self.q = nn.Linear(dim, dim, bias=False)
        self.k = nn.Linear(dim, dim, bias=False)
        self.v = nn.Linear(dim, dim, bias=False)

    def forward(self, queries: torch.Tensor, context: torch.Tensor, context_mask: torch.Tensor | None = None):
        return attend(self.q(queries), self.k(context), self.v(context), context_mask)


def attention_scores(attention: "SingleHeadAttention", queries: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
    """Q Kᵀ / √d of one attention block, [B, N, M] (before the softmax)."""
    query = attention.q(queries)
    return query @ attention.k(context).transpose(-1, -2) / math.sqrt(query.shape[-1])


def _rescale_scores(attention: "SingleHeadAttention", queries: torch.Tensor, context: torch.Tensor,
                    mask: torch.Tensor | None, reduce) -> float:
    scores = attention_scores(attention, queries, context)
    if mask is not None:
        scores = scores[mask[:, None, :].expand_as(scores).bool()]
    std = reduce(scores.float().std().reshape(1)).clamp_min(1e-20)
    factor = float(std) ** -0.5
    attention.q.weight.mul_(factor)
    attention.k.weight.mul_(factor)
    return float(std)


POSITION_INITS = ("sincos", "random")


def sincos_positions(grid: int, dim: int) -> torch.Tensor:
    """2-D sin-cos positions of a grid × grid patch grid (row-major, as the CLIP's patch tokens) → [grid², dim].

    A quarter of the channels each: sin(x·ω_k), cos(x·ω_k), sin(y·ω_k), cos(y·ω_k) for k < dim // 4, with ω_k =
    grid^(−k / (dim // 4)) — periods from 2π patches to 2π·grid, so every frequency varies across the grid (the usual
    temperature 10000 leaves most of them flat on a small one); the dim % 4 channels left over are 0. The dot product
    of two positions is Σ_k cos(ω_k Δx) + cos(ω_k Δy): largest for a patch with itself, then its neighbours."""
    quarter = dim // 4
    omega = float(grid) ** (-torch.arange(quarter, dtype=torch.float32) / max(quarter, 1))
    coords = torch.arange(grid, dtype=torch.float32)
    y, x = torch.meshgrid(coords, coords, indexing="ij")
    angles = [c.flatten()[:, None] * omega[None] for c in (x, y)]
    table = torch.cat([part for angle in angles for part in (angle.sin(), angle.cos())], dim=1)
    return F.pad(table, (0, dim - table.shape[1]))


def straight_through(probs: torch.Tensor, threshold: float = 0.5) -> torch.Tensor:
    """The binary mask inference uses (``region_masks``: probs >= threshold), in the forward pass, with the gradient of
    ``probs`` (straight-through estimator): hard + probs − stop_gradient(probs)."""
    hard = (probs >= threshold).to(probs.dtype)
    return hard + probs - probs.detach()


class Condition(NamedTuple):
    tokens: torch.Tensor               # [B, M, d]
    mask: torch.Tensor | None = None   # [B, M] True = real token


class RegionOutput(NamedTuple):
    edited: torch.Tensor     # F_Editedimg [B, N, d]
    region: torch.Tensor     # F_imgRegion [B, N, d]
    logits: torch.Tensor     # [B, N]
    probs: torch.Tensor      # P_region [B, N]
    sem_edited: torch.Tensor | None = None     # f_sem(F_Editedimg) [B, d] (training)
    sem_original: torch.Tensor | None = None   # f_sem(F_img) [B, d], F_img without learned positions (eq. 5)


class RegionPredictor(nn.Module):
    """Cross-attention → self-attention → token-wise MLP + sigmoid, with the condition projections of its modes.

    ``with_sem`` adds f_sem (training only: it is not part of the exported checkpoint). ``position_init`` starts
    the learned positions (with ``spec.positions``) as :func:`sincos_positions` (the class token of an ANALOGY at 0)
    or as small random vectors (N(0, 0.02²), the pack's init until 2026-12-07); a loaded checkpoint replaces them."""

    def __init__(self, spec: RegionSpec, with_sem: bool = False, position_init: str = "sincos"):
        super().__init__()
        self.spec = spec
        self.encoder_fingerprint: EncoderFingerprint | None = None  # of the CLIP it was trained with (its file's)
        d = spec.dim
        if spec.text_dim:  # the paper picks a T5 of CLIP's width; otherwise a learnt projection
            self.text_proj = nn.Linear(spec.text_dim, d) if spec.text_dim != d else nn.Identity()
        if spec.analogy_dim:
            self.analogy_proj = nn.Linear(2 * spec.analogy_dim, d)
        if position_init not in POSITION_INITS:
            raise RegionError(f"position_init must be one of {POSITION_INITS}, got {position_init!r}")
        if spec.positions:  # one vector per patch (and per ANALOGY token: class token + the same grid)
            if position_init == "sincos":
                grid_positions = sincos_positions(spec.grid, d)
                self.position = nn.Parameter(grid_positions.clone())
                if spec.analogy_dim:
                    self.analogy_position = nn.Parameter(torch.cat([torch.zeros(1, d), grid_positions]))
            else:
                self.position = nn.Parameter(torch.randn(spec.grid ** 2, d) * 0.02)
                if spec.analogy_dim:
                    self.analogy_position = nn.Parameter(torch.randn(spec.grid ** 2 + 1, d) * 0.02)
        self.cross = SingleHeadAttention(d)
        self.self_attn = SingleHeadAttention(d)
        self.head = nn.Sequential(nn.Linear(d, spec.mlp_width), nn.GELU(), nn.Linear(spec.mlp_width, 1))
        self.f_sem = SemanticProjector(d, spec.mlp_width) if with_sem else None

    # -- conditions -------------------------------------------------------------------------------------------------
    def text_condition(self, tokens: torch.Tensor, mask: torch.Tensor | None = None) -> Condition:
        """Instruction tokens [B, M, text_dim] (+ mask [B, M]) → condition tokens of width d."""
        if not self.spec.text_dim:
            raise RegionError("this region predictor was not trained with instructions (text mode); give it an "
                              "ANALOGY instead")
        if tokens.ndim != 3 or tokens.shape[-1] != self.spec.text_dim:
            raise RegionError(f"instruction features must be [batch, tokens, {self.spec.text_dim}] "
                              f"({self.spec.instruction_encoder or 'the instruction encoder it was trained with'}), "
                              f"got {tuple(tokens.shape)}")
        if mask is not None and not mask.any(dim=-1).all():
            raise RegionError("an instruction is empty: write what to change")
        return Condition(self.text_proj(tokens.float()), mask)

    def analogy_condition(self, a_tokens: torch.Tensor, a_prime_tokens: torch.Tensor) -> Condition:
        """ANALOGY patch tokens of A and A′ [B, T, w] → one token per position: proj([t_A, t_A′ − t_A])."""
        if not self.spec.analogy_dim:
            raise RegionError("this region predictor was not trained in analogy mode; give it an instruction")
        if a_tokens.shape != a_prime_tokens.shape or a_tokens.ndim != 3 or a_tokens.shape[-1] != self.spec.analogy_dim:
            raise RegionError(f"ANALOGY patch tokens must be [batch, tokens, {self.spec.analogy_dim}] for A and A', "
                              f"got {tuple(a_tokens.shape)} and {tuple(a_prime_tokens.shape)}")
        a, a_prime = a_tokens.float(), a_prime_tokens.float()
        tokens = self.analogy_proj(torch.cat([a, a_prime - a], dim=-1))
        if self.spec.positions:
            if tokens.shape[1] != self.analogy_position.shape[0]:
                raise RegionError(f"the ANALOGY has {tokens.shape[1]} tokens per image; this region predictor was "
                                  f"trained with {self.analogy_position.shape[0]} (class token + {self.spec.grid}x"
                                  f"{self.spec.grid} patches): encode A and A' with the same CLIP vision model")
            tokens = tokens + self.analogy_position
        return Condition(tokens)

    # -- prediction ---------------------------------------------------------------------------------------------------
    def condition(self, kind: str, first: torch.Tensor, second: torch.Tensor | None = None) -> Condition:
        """``("text", tokens, mask)`` or ``("analogy", a_tokens, a_prime_tokens)`` → condition tokens of width d."""
        if kind == "text":
            return self.text_condition(first, second)
        if kind == "analogy":
            return self.analogy_condition(first, second)
        raise RegionError(f"condition kind must be one of {MODES}, got {kind!r}")

    def forward(self, patches: torch.Tensor, kind: str, first: torch.Tensor, second: torch.Tensor | None = None,
                semantic: bool = False) -> RegionOutput:
        """``patches`` F_img [B, N, d] (N = grid²) and a condition (see :meth:`condition`) → F_Editedimg,
        F_imgRegion, logits, P_region; with ``semantic`` also f_sem(F_Editedimg) and f_sem(F_img) (training)."""
        if patches.ndim != 3 or patches.shape[1:] != (self.spec.grid ** 2, self.spec.dim):
            raise RegionError(f"patch features must be [batch, {self.spec.grid ** 2}, {self.spec.dim}], got "
                              f"{tuple(patches.shape)}: is this the CLIP vision model the region predictor was "
                              f"trained with?")
        tokens, mask = self.condition(kind, first, second)
        if tokens.shape[0] == 1 and patches.shape[0] > 1:  # one condition for a batch of images
            tokens = tokens.expand(patches.shape[0], -1, -1)
            mask = mask.expand(patches.shape[0], -1) if mask is not None else None
        elif tokens.shape[0] != patches.shape[0]:
            raise RegionError(f"{patches.shape[0]} images but {tokens.shape[0]} conditions")
        raw = patches = patches.float()
        if self.spec.positions:
            patches = patches + self.position
        edited = self.cross(patches, tokens, mask)                             # eq. 1
        if self.spec.residual:
            edited = patches + edited
        region = self.self_attn(edited, edited)                                # eq. 2
        if self.spec.residual:
            region = edited + region
        logits = self.head(region).squeeze(-1)                                 # eq. 3 (before the sigmoid)
        # eq. 5 reads F_img itself: the raw CLIP patches, without the learned positions
        sem = (self.f_sem(edited), self.f_sem(raw)) if semantic else (None, None)
        return RegionOutput(edited, region, logits, torch.sigmoid(logits), *sem)

    @torch.no_grad()
    def calibrate_attention(self, patches: torch.Tensor, kind: str, first: torch.Tensor,
                            second: torch.Tensor | None = None,
                            reduce: Callable[[torch.Tensor], torch.Tensor] = lambda t: t) -> dict[str, float]:
        """Scale W_Q and W_K of the cross- and then the self-attention (each by std^−½) so that their scores on this
        batch have unit standard deviation; returns the stds before. With torch's default init and CLIP/T5 feature
        scales the scores barely vary across patches and both softmaxes average. ``reduce`` averages the measured
        stds across data-parallel ranks (so every rank scales alike)."""
        tokens, mask = self.condition(kind, first, second)
        x = patches.float() + (self.position if self.spec.positions else 0)
        before = {"cross": _rescale_scores(self.cross, x, tokens, mask, reduce)}
        edited = self.cross(x, tokens, mask) + (x if self.spec.residual else 0)
        before["self"] = _rescale_scores(self.self_attn, edited, edited, None, reduce)
        return before

    def inference_state_dict(self) -> dict[str, torch.Tensor]:
        """Everything but f_sem (the paper removes it at inference)."""
        return {k: v for k, v in self.state_dict().items() if not k.startswith("f_sem.")}


class SemanticProjector(nn.Module):
    """f_sem: spatial features [B, N, d] → one CLIP-space embedding [B, d] (token-wise MLP, then the mean over
    tokens). Applied to F_Editedimg and to F_img alike (eqs. 4, 5)."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.net(features).mean(dim=1)


# ---------------------------------------------------------------------------------------------------------------------
# losses (each a plain function of its inputs; batch mean of the per-sample values)


def cosine_distance(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """1 − cos(x, y) per row."""
    return 1.0 - F.cosine_similarity(x.float(), y.float(), dim=-1)


def sem_align_loss(sem_edited: torch.Tensor, sem_original: torch.Tensor, t_e: torch.Tensor,
                   t_o: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """L_semAlign = L_semEdited + L_semOriginal (eqs. 4-6) from f_sem(F_Editedimg) and f_sem(F_img)."""
    edited_term = cosine_distance(sem_edited, t_e).mean()
    original_term = cosine_distance(sem_original, t_o).mean()
    return edited_term + original_term, {"sem_edited": edited_term, "sem_original": original_term}


def blend(mask: torch.Tensor, x_edit: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """X_res = M ⊙ X_edit + (1 − M) ⊙ X for IMAGE tensors [B, H, W, C] and a mask [B, H, W]."""
    m = mask.unsqueeze(-1)
    return m * x_edit + (1.0 - m) * x


def clip_guidance_loss(i_res: torch.Tensor, t_e: torch.Tensor) -> torch.Tensor:
    """L_CLIPg = 1 − cos(I_res, T_e) (eq. 7)."""
    return cosine_distance(i_res, t_e).mean()


def clip_direction_loss(i_res: torch.Tensor, i_ori: torch.Tensor, t_e: torch.Tensor, t_o: torch.Tensor) -> torch.Tensor:
    """L_CLIPd = 1 − cos(I_res − I_ori, T_e − T_o) (eq. 8)."""
    return cosine_distance(i_res - i_ori, t_e - t_o).mean()


def self_similarity(features: torch.Tensor) -> torch.Tensor:
    """Sim(F) = [F_i·F_j / (‖F_i‖ ‖F_j‖)]_ij for patch features [B, N, d] → [B, N, N]."""
    unit = F.normalize(features.float(), dim=-1)
    return unit @ unit.transpose(-1, -2)


def clip_structure_loss(f_img: torch.Tensor, f_res: torch.Tensor) -> torch.Tensor:
    """L_CLIPs = ‖Sim(F_img) − Sim(F_res)‖²₂ (eq. 9): the sum of squared differences per image, batch mean."""
    return (self_similarity(f_img) - self_similarity(f_res)).pow(2).sum(dim=(1, 2)).mean()


@dataclass(frozen=True)
class LossWeights:
    """The weights of eqs. 10-11, 1 each by default (the paper publishes none); the trainer's config sets its own
    (``RegionConfig``: λs = 1/256², since eq. 9 sums an N×N matrix)."""

    alpha: float = 1.0      # L_semAlign
    beta: float = 1.0       # L_CLIP
    lambda_g: float = 1.0
    lambda_d: float = 1.0
    lambda_s: float = 1.0


def clip_loss(weights: LossWeights, i_res: torch.Tensor, i_ori: torch.Tensor, f_img: torch.Tensor,
              f_res: torch.Tensor, t_e: torch.Tensor, t_o: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """L_CLIP = λg·L_CLIPg + λd·L_CLIPd + λs·L_CLIPs (eq. 10)."""
    parts = {"clip_g": clip_guidance_loss(i_res, t_e), "clip_d": clip_direction_loss(i_res, i_ori, t_e, t_o),
             "clip_s": clip_structure_loss(f_img, f_res)}
    total = weights.lambda_g * parts["clip_g"] + weights.lambda_d * parts["clip_d"] + weights.lambda_s * parts["clip_s"]
    return total, parts


# ---------------------------------------------------------------------------------------------------------------------
# analogy mode: the A→A′ difference as the region's target


def edit_mask(before: torch.Tensor, after: torch.Tensor, tolerance: float = 0.0) -> torch.Tensor:
    """Pixels where an IMAGE pair differs by more than ``tolerance`` in any channel: [B, H, W] bool."""
    if before.shape != after.shape:
        raise RegionError(f"before and after images differ in shape: {tuple(before.shape)} vs {tuple(after.shape)}")
    return (after.float() - before.float()).abs().amax(dim=-1) > tolerance


def patch_targets(mask: torch.Tensor, grid: int) -> torch.Tensor:
    """Fraction of each patch's pixels inside ``mask`` [B, H, W] → [B, grid²] (the image is split into grid × grid
    cells the way the CLIP input, resized to a square, is split into patches)."""
    pooled = F.adaptive_avg_pool2d(mask.float().unsqueeze(1), (grid, grid))
    return pooled.flatten(1)


def region_bce(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Binary cross-entropy of P_region against per-patch targets in [0, 1] (mean over patches and batch)."""
    return F.binary_cross_entropy_with_logits(logits.float(), targets.float())


# ---------------------------------------------------------------------------------------------------------------------
# from patch probabilities to masks


def probability_image(probs: torch.Tensor, grid: int, height: int, width: int) -> torch.Tensor:
    """P_region [B, grid²] → soft region [B, H, W]: the patch grid upsampled bilinearly to the image (the CLIP input
    is the whole image resized to a square, so patch (i, j) covers the same fraction of the image)."""
    maps = probs.float().reshape(-1, 1, grid, grid)
    return F.interpolate(maps, size=(height, width), mode="bilinear", align_corners=False).squeeze(1).clamp(0, 1)


def grow(mask: torch.Tensor, pixels: int) -> torch.Tensor:
    """Dilate (pixels > 0) or erode (< 0) a binary mask [B, H, W] by a (2|p|+1)² square."""
    if pixels == 0:
        return mask.bool()
    size = 2 * abs(pixels) + 1
    x = mask.float().unsqueeze(1)
    if pixels > 0:
        return (F.max_pool2d(x, size, stride=1, padding=abs(pixels)) > 0.5).squeeze(1)
    return (-F.max_pool2d(-x, size, stride=1, padding=abs(pixels)) > 0.5).squeeze(1)


def feather(mask: torch.Tensor, pixels: int) -> torch.Tensor:
    """A soft mask that ramps from 1/p at the border up to 1 at depth p, inside the binary ``mask`` only: the mean of
    the mask eroded by 0..p-1 pixels. Pixels outside the binary mask stay exactly 0."""
    binary = mask.bool()
    if pixels <= 0:
        return binary.float()
    layers = [binary.float()]
    for depth in range(1, pixels):
        layers.append(grow(binary, -depth).float())
    return torch.stack(layers).mean(dim=0) * binary


class RegionMasks(NamedTuple):
    probability: torch.Tensor   # [B, H, W] upsampled P_region
    binary: torch.Tensor        # [B, H, W] float 0/1 after threshold and grow
    soft: torch.Tensor          # [B, H, W] feathered inside the binary mask


def region_masks(probs: torch.Tensor, grid: int, height: int, width: int, threshold: float = 0.5,
                 grow_pixels: int = 0, feather_pixels: int = 0) -> RegionMasks:
    probability = probability_image(probs, grid, height, width)
    binary = grow(probability >= threshold, grow_pixels)
    return RegionMasks(probability, binary.float(), feather(binary, feather_pixels))


def iou(predicted: torch.Tensor, truth: torch.Tensor) -> torch.Tensor:
    """Intersection over union per image of two binary masks [B, H, W] (1 where both are empty)."""
    p, t = predicted.bool().flatten(1), truth.bool().flatten(1)
    inter, union = (p & t).sum(1).float(), (p | t).sum(1).float()
    return torch.where(union > 0, inter / union.clamp(min=1), torch.ones_like(union))


def composite_by_mask(original: torch.Tensor, edited: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``edited`` where mask = 1, ``original`` where mask = 0 (bit for bit), the blend in between. IMAGE [B, H, W, C]
    and MASK [B, H, W] of one size; batches of 1 broadcast."""
    m = mask.to(original.dtype).unsqueeze(-1)
    blended = m * edited.to(original.dtype) + (1 - m) * original
    out = torch.where(m >= 1, edited.to(original.dtype), blended)
    return torch.where(m <= 0, original, out)


# ---------------------------------------------------------------------------------------------------------------------
# CLIP inputs and features


def clip_pixels(images: torch.Tensor, size: int, mean: Sequence[float] = CLIP_MEAN,
                std: Sequence[float] = CLIP_STD) -> torch.Tensor:
    """IMAGE [B, H, W, C] → CLIP pixel values [B, 3, size, size]: the whole image resized to the square input
    (bicubic, antialiased, aspect not kept, so every patch maps to a fixed part of the image), normalised.
    Differentiable: L_CLIP's gradients reach the mask through it."""
    if images.ndim != 4 or images.shape[-1] < 3 or min(images.shape[:3]) == 0:
        raise RegionError(f"expected a non-empty IMAGE [batch, height, width, 3], got {tuple(images.shape)}")
    x = images[..., :3].float().movedim(-1, 1)
    if x.shape[-2:] != (size, size):
        x = F.interpolate(x, size=(size, size), mode="bicubic", antialias=True, align_corners=False)
    mean_t = torch.tensor(mean, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    std_t = torch.tensor(std, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return (x - mean_t) / std_t


class VisionFeatures(NamedTuple):
    embeds: torch.Tensor    # I = E_v(X)[CLS], projected [B, d]
    patches: torch.Tensor   # F = E_v(X)[patches], projected [B, N, d]


def project_tokens(last_hidden: torch.Tensor, post_layernorm: nn.Module, projection: nn.Module) -> VisionFeatures:
    """Last-layer tokens [B, 1+N, h] → CLIP joint space: post-layernorm and visual projection applied to the class
    token (CLIP's image embedding) and, the same way, to every patch token."""
    projected = projection(post_layernorm(last_hidden))
    return VisionFeatures(projected[:, 0].float(), projected[:, 1:].float())


class FrozenClip:
    """A transformers ``CLIPModel`` (vision + text) for training: frozen, vision differentiable w.r.t. pixels."""

    def __init__(self, model: nn.Module, tokenizer):
        self.model = model.requires_grad_(False).eval()
        self.tokenizer = tokenizer
        config = model.config.vision_config
        self.image_size = config.image_size
        self.grid = config.image_size // config.patch_size
        self.info = EncoderInfo.describe(model.config.projection_dim, config.hidden_size, config.image_size,
                                         config.patch_size, config.num_hidden_layers)
        self._analogy_encoder = None

    @staticmethod
    def from_folder(path: str | os.PathLike) -> "FrozenClip":
        """A local transformers CLIP folder (model + tokenizer); nothing is downloaded, no pickle is read."""
        # heavy: imported when a model is built, not at ComfyUI start-up
        from transformers import AutoTokenizer, CLIPModel

        path = os.fspath(path)
        if not Path(path, "config.json").is_file():
            raise RegionError(f"{path} is not a transformers CLIP folder (no config.json)")
        model = CLIPModel.from_pretrained(path, local_files_only=True, use_safetensors=True)
        return FrozenClip(model, AutoTokenizer.from_pretrained(path, local_files_only=True))

    def to(self, device) -> "FrozenClip":
        self.model.to(device)
        return self

    @property
    def dim(self) -> int:
        return self.model.config.projection_dim

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def vision(self, images: torch.Tensor) -> VisionFeatures:
        """I and F of IMAGE [B, H, W, C] (gradients flow to ``images``)."""
        pixels = clip_pixels(images, self.image_size).to(self.device)
        vision = self.model.vision_model
        hidden = vision(pixel_values=pixels).last_hidden_state
        return project_tokens(hidden, vision.post_layernorm, self.model.visual_projection)

    @torch.no_grad()
    def text(self, captions: list[str]) -> torch.Tensor:
        """CLIP text embeddings (T_o / T_e) [B, d]."""
        batch = self.tokenizer(list(captions), padding=True, truncation=True,
                               max_length=self.model.config.text_config.max_position_embeddings, return_tensors="pt")
        out = self.model.text_model(input_ids=batch["input_ids"].to(self.device),
                                    attention_mask=batch["attention_mask"].to(self.device))
        return self.model.text_projection(out.pooler_output).float()

    def analogy(self, a: torch.Tensor, a_prime: torch.Tensor) -> AnalogyEmbedding:
        """The ANALOGY of (A, A′) exactly as Encode Analogy makes it (official preprocessing, penultimate tokens)."""
        return self.vision_encoder().encode(a, a_prime)

    def fingerprint(self) -> EncoderFingerprint:
        """The vision tower's fingerprint, as Encode Analogy takes it from the same weights in ComfyUI."""
        return self.vision_encoder().fingerprint()

    def vision_encoder(self) -> ImageEncoder:
        """The vision tower as an :class:`ImageEncoder` (shares the weights; built once)."""
        if self._analogy_encoder is None:
            # heavy: imported when a model is built, not at ComfyUI start-up
            from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

            config = CLIPVisionConfig(**{**self.model.config.vision_config.to_dict(),
                                         "projection_dim": self.model.config.projection_dim})
            shell = CLIPVisionModelWithProjection(config)
            shell.vision_model, shell.visual_projection = self.model.vision_model, self.model.visual_projection
            self._analogy_encoder = ImageEncoder(shell, "transformers")
        return self._analogy_encoder


class InstructionEncoder:
    """A frozen T5 encoder (transformers ``T5EncoderModel`` + its tokenizer) giving instruction token features."""

    def __init__(self, model: nn.Module, tokenizer, name: str, max_length: int = 128):
        self.model = model.requires_grad_(False).eval()
        self.tokenizer, self.name, self.max_length = tokenizer, name, max_length

    @staticmethod
    def from_folder(path: str | os.PathLike, dtype: torch.dtype = torch.float32) -> "InstructionEncoder":
        """A local T5 folder (config.json, model.safetensors, tokenizer.json) such as google/flan-t5-base saved with
        ``save_pretrained``, read strictly (:mod:`.t5_folder`): every problem is a RegionError naming the file.
        Nothing is downloaded; pickle weights (pytorch_model.bin) are refused."""
        folder = Path(path)
        model, tokenizer = load_t5_folder(folder, RegionError)
        return InstructionEncoder(model.to(dtype), tokenizer, folder.name)

    @property
    def width(self) -> int:
        return self.model.config.d_model

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def to(self, device) -> "InstructionEncoder":
        self.model.to(device)
        return self

    @torch.no_grad()
    def encode(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Token features [B, M, width] (float32) and the attention mask [B, M] (True = token)."""
        batch = self.tokenizer(list(texts), padding=True, truncation=True, max_length=self.max_length,
                               return_tensors="pt")
        mask = batch["attention_mask"].to(self.device)
        out = self.model(input_ids=batch["input_ids"].to(self.device), attention_mask=mask)
        return out.last_hidden_state.float(), mask.bool()


# ---------------------------------------------------------------------------------------------------------------------
# checkpoint files


def region_metadata(spec: RegionSpec, extra: Mapping[str, str] | None = None,
                    fingerprint: EncoderFingerprint | None = None) -> dict[str, str]:
    recorded = {} if fingerprint is None else fingerprint_metadata(fingerprint)
    return {**recorded, **dict(extra or {}), "analogy.kind": KIND, SPEC_KEY: json.dumps(spec.to_json())}


def save_region_predictor(model: RegionPredictor, path: str | os.PathLike,
                          metadata: Mapping[str, str] | None = None) -> Path:
    """The inference weights (no f_sem), the spec and the CLIP's fingerprint (when known) as safetensors, written
    atomically."""
    meta = region_metadata(model.spec, metadata, model.encoder_fingerprint)
    return write_safetensors_atomic(model.inference_state_dict(), path, meta)


def load_region_predictor(path: str | os.PathLike) -> RegionPredictor:
    """Read a region checkpoint, checked before anything is built (nothing larger than the file is allocated). Every
    problem is a TensorFileError or RegionError whose message starts with the file name."""
    tf = read_tensor_file(path, "region predictor", dtypes=FLOAT_DTYPES)
    with naming_file(path, RegionError):
        kind = tf.metadata.get("analogy.kind")
        if kind != KIND:
            raise RegionError(f"this is not a region predictor (its header says analogy.kind = {str(kind)[:40]!r}; "
                              f"train one with python -m training.train_region)")
        raw = json_metadata(tf.metadata, SPEC_KEY, error=RegionError)
        if raw is None:
            raise RegionError(f"the header has no {SPEC_KEY!r} (sizes and encoders)")
        spec = RegionSpec.from_json(raw)
        fingerprint = recorded_fingerprint(tf.metadata, RegionError)
        model = load_checked_module(lambda: RegionPredictor(spec), tf.tensors, max_abs=MAX_PARAMETER_VALUE,
                                    error=RegionError)
        model.encoder_fingerprint = fingerprint
        return model


def is_region_file(path: str | os.PathLike) -> bool:
    """Whether a file's header says it is a region predictor (header only; unreadable files are not)."""
    header = probe_header(path)
    return header is not None and header.metadata.get("analogy.kind") == KIND


def check_encoder_weights(model: RegionPredictor, fingerprint: EncoderFingerprint | None, given: str) -> str:
    """Refuse a CLIP of the right architecture but other weights than the predictor was trained with (when its file
    records their fingerprint); a sentence for the node's info."""
    return compare_fingerprints(model.encoder_fingerprint, fingerprint, "this region model", given,
                                "Connect the CLIP vision weights it was trained with (its header's analogy.config "
                                "names its clip)")


def check_encoder(spec: RegionSpec, info: EncoderInfo, what: str = "CLIP_VISION") -> None:
    """Refuse an image encoder other than the one the predictor was trained with (by name and widths)."""
    want = spec.encoder_info
    if want is None:
        return
    if (info.family, info.embed_dim, info.hidden_dim, info.patch_size, info.image_size, info.num_layers) != (
            want.family, want.embed_dim, want.hidden_dim, want.patch_size, want.image_size, want.num_layers):
        raise RegionError(f"this {what} is {info.label}; the region predictor was trained with {want.label}: "
                          "connect that model")
