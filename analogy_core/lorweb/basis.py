"""LoRWeB's LoRA basis: per targeted layer N rank-r LoRAs, N learned keys and a query projection.

For an analogy query e (by default concat(e_a, e_a', e_b) of CLIP image embeddings) each layer computes (LoRWeB,
Manor et al.; the released checkpoint's settings):

    q = W_q · e                                      (d,)
    c = softmax(q · Kᵀ / sqrt(d) / temperature)      (N,)
    Δy = Σ_n c_n (x A_n) B_n                          A_n: (in, r), B_n: (r, out)

Other trained settings (tanh instead of softmax, several heads, summed heads, other query modes) are read from the
basis' metadata or the official config.yaml as :class:`~.lorweb_settings.LoRWeBSettings`; the mixing function is
:func:`~.lorweb_settings.mixing_coefficients`, shared with the trainable layer. Each layer's mix is exactly one
rank-N·r LoRA: down = [c_1 A_1 | … | c_N A_N]ᵀ, up = [B_1; …; B_N]ᵀ. Nothing
here materialises ΔW.

File layout (the official NVlabs checkpoint and this pack's training output), per layer ``<prefix><path>.``:
``lora_A`` [N, in, r], ``lora_B`` [N, r, out], ``lora_keys`` [N, d], ``att_lora_to_q.weight`` [d, Q], no alpha.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field, replace
from functools import cached_property

import torch

from ..files import (FLOAT_DTYPES, MAX_UPDATE_NORM, as_float, check_low_rank_norm, json_metadata, naming_file,
                    read_tensor_file, write_safetensors_atomic)
from ..fingerprint import recorded_fingerprint
from ..layouts import TRANSFORMER_FAMILIES, ModelLayout
from ..lora import FAMILIES, FITS_KEY, LoRA, LoRALayer
from ..lora_formats import infer_layout
from .settings import METADATA_KEY, OFFICIAL, LoRWeBSettings, LoRWeBSettingsError

BASIS_SUFFIXES = {"lora_A": "A", "lora_B": "B", "lora_keys": "keys", "att_lora_to_q.weight": "to_q"}
PREFIXES = ("transformer.", "unet.", "diffusion_model.", "base_model.model.")


MAX_ROUTER_VALUE = 1e4  # largest |entry| accepted in lora_keys / att_lora_to_q (see _check_layer)


class BasisError(ValueError):
    """A file or tensor set is not a valid LoRA basis, or does not fit what it is used with."""


@dataclass(frozen=True)
class BasisLayer:
    A: torch.Tensor      # [N, in, r]
    B: torch.Tensor      # [N, r, out]
    keys: torch.Tensor   # [N, d]
    to_q: torch.Tensor   # [d, Q]

    @property
    def num_entries(self) -> int:
        return self.A.shape[0]

    @property
    def rank(self) -> int:
        return self.A.shape[2]

    @property
    def key_dim(self) -> int:
        return self.keys.shape[1]

    @property
    def query_dim(self) -> int:
        return self.to_q.shape[1]

    def coefficients(self, query: torch.Tensor, temperature: float = 1.0,
                     settings: LoRWeBSettings = OFFICIAL) -> torch.Tensor:
        """Mixing weights [B, N] for queries [B, Q] (float32), e.g. softmax(W_q·query · Kᵀ / sqrt(d) / T)."""
        return settings.mixing_coefficients(query.float() @ self.to_q.float().t(), self.keys.float(), temperature)

    def mixed(self, coefficients: torch.Tensor) -> LoRALayer:
        """The exact rank-N·r LoRA for one analogy's coefficients [N]."""
        n, in_features, r = self.A.shape
        down = (self.A.float() * coefficients.float().view(n, 1, 1)).permute(0, 2, 1).reshape(n * r, in_features)
        # up is a view of the basis (no copy, basis dtype): the mixed LoRA of the released checkpoint would
        # otherwise hold another 1.4 GB. Consumers compute in float32 or cast as they need.
        up = self.B.reshape(n * r, -1).t()
        return LoRALayer(down.contiguous(), up, 1.0)


@dataclass(frozen=True)
class LoRABasis:
    layers: dict[str, BasisLayer]
    family: str = "flux"
    metadata: dict[str, str] = field(default_factory=dict)

    @property
    def num_entries(self) -> int:
        return next(iter(self.layers.values())).num_entries

    @property
    def rank(self) -> int:
        return next(iter(self.layers.values())).rank

    @property
    def key_dim(self) -> int:
        return next(iter(self.layers.values())).key_dim

    @property
    def query_dim(self) -> int:
        return next(iter(self.layers.values())).query_dim

    @cached_property
    def settings(self) -> LoRWeBSettings:
        """How this basis must be mixed: from its metadata, else the released checkpoint's settings."""
        try:
            return LoRWeBSettings.from_metadata(self.metadata)
        except LoRWeBSettingsError as err:
            raise BasisError(str(err)) from None

    def with_settings(self, settings: LoRWeBSettings) -> "LoRABasis":
        """This basis with ``settings`` recorded in its metadata (checked against its shapes)."""
        try:
            settings.check_shapes(self.key_dim, self.query_dim)
        except LoRWeBSettingsError as err:
            raise BasisError(str(err)) from None
        return replace(self, metadata={**self.metadata, **settings.to_metadata()})

    def summary(self) -> str:
        return (f"LoRA basis for {self.family}: {len(self.layers)} layers, N={self.num_entries} entries of rank "
                f"{self.rank}, key dim {self.key_dim}, query dim {self.query_dim}; mixing {self.settings.describe()}")

    def coefficients(self, query: torch.Tensor, temperature: float = 1.0, source: str = "") -> dict[str, torch.Tensor]:
        """Per layer, the [B, N] mixing weights for a batch of queries [B, Q], mixed as the basis was trained.

        This is the one query-width check; ``source`` names where the query came from in its message."""
        if query.ndim == 1:
            query = query.unsqueeze(0)
        if query.shape[-1] != self.query_dim:
            raise BasisError(f"the basis expects {self.query_dim}-d queries "
                             f"({self.settings.describe_width(self.query_dim)}) but "
                             f"{source or 'the query'} gives {query.shape[-1]}-d")
        if not temperature > 0:
            raise BasisError(f"temperature must be positive, got {temperature}")
        settings = self.settings
        return {path: layer.coefficients(query, temperature, settings) for path, layer in self.layers.items()}

    def mix(self, coefficients: dict[str, torch.Tensor], sample: int = 0) -> LoRA:
        """One LoRA from per-layer coefficients ([N] or [B, N], ``sample`` picks the batch item)."""
        layers = {}
        for path, layer in self.layers.items():
            c = coefficients[path]
            layers[path] = layer.mixed(c[sample] if c.ndim == 2 else c)
        meta = {"analogy.basis_entries": str(self.num_entries), "analogy.basis_rank": str(self.rank)}
        if FITS_KEY in self.metadata:  # a basis of layers several families share: its mix fits each of them
            meta[FITS_KEY] = self.metadata[FITS_KEY]
        return LoRA(layers, family=self.family, source="mixed", metadata=meta)

    # -- files ----------------------------------------------------------------------------------------------------
    def state_dict(self, prefix: str = "transformer.") -> dict[str, torch.Tensor]:
        out = {}
        for path, layer in self.layers.items():
            base = f"{prefix}{path}."
            out[base + "lora_A"], out[base + "lora_B"] = layer.A, layer.B
            out[base + "lora_keys"], out[base + "att_lora_to_q.weight"] = layer.keys, layer.to_q
        return out

    def save(self, path, metadata: dict[str, str] | None = None):
        meta = dict(self.metadata)
        meta.update(metadata or {})
        meta.update({"analogy.kind": "lorweb_basis", "analogy.family": self.family,
                     "analogy.basis_entries": str(self.num_entries), "analogy.basis_rank": str(self.rank),
                     "analogy.key_dim": str(self.key_dim), "analogy.query_dim": str(self.query_dim),
                     "analogy.layers": str(len(self.layers))})
        return write_safetensors_atomic(self.state_dict(), path, meta)


def basis_from_state_dict(tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> LoRABasis:
    """Validate and group a basis state dict (official NVlabs layout or this pack's own)."""
    metadata = dict(metadata or {})
    groups: dict[str, dict[str, torch.Tensor]] = {}
    stray = []
    for key, tensor in tensors.items():
        for suffix, role in BASIS_SUFFIXES.items():
            if key.endswith("." + suffix):
                groups.setdefault(key[: -len(suffix) - 1], {})[role] = tensor
                break
        else:
            stray.append(key)
    if not groups or all(g.get("A") is not None and g["A"].ndim == 2 for g in groups.values()):
        if any(re.search(r"\.(lora_[AB]\.weight|lora_(up|down)\.weight)$", k) for k in tensors):
            raise BasisError("this is an ordinary LoRA, not a LoRA basis; load it with Load LoRA (Analogy)")
        raise BasisError(f"not a LoRA basis: no layer has lora_A/lora_B/lora_keys/att_lora_to_q tensors "
                         f"(keys look like {list(tensors)[:3]})")
    if stray:
        raise BasisError(f"{len(stray)} keys are not part of a LoRA basis, e.g. {stray[:3]}")
    layers: dict[str, BasisLayer] = {}
    for base, parts in groups.items():
        missing = set(BASIS_SUFFIXES.values()) - parts.keys()
        if missing:
            names = [k for k, v in BASIS_SUFFIXES.items() if v in missing]
            raise BasisError(f"layer {base!r} is missing {', '.join(names)}")
        path = base
        for prefix in PREFIXES:
            if path.startswith(prefix):
                path = path[len(prefix):]
                break
        layers[path] = _check_layer(base, BasisLayer(parts["A"], parts["B"], parts["keys"], parts["to_q"]))
    first = next(iter(layers.values()))
    for path, layer in layers.items():
        if (layer.num_entries, layer.rank, layer.key_dim, layer.query_dim) != \
                (first.num_entries, first.rank, first.key_dim, first.query_dim):
            raise BasisError(f"{path}: N={layer.num_entries}, r={layer.rank}, d={layer.key_dim}, "
                             f"Q={layer.query_dim} differ from the other layers' N={first.num_entries}, "
                             f"r={first.rank}, d={first.key_dim}, Q={first.query_dim}")
    family, fits = _family(layers, metadata.get("analogy.family") or None)
    if len(fits) > 1:
        metadata[FITS_KEY] = ",".join(fits)
    else:
        metadata.pop(FITS_KEY, None)
    return LoRABasis(layers, family=family, metadata=metadata)


def _check_layer(base: str, layer: BasisLayer) -> BasisLayer:
    """Shapes that fit together with no empty dimension, floating point (float8 upcast), finite values, and no
    entry whose update A_n·B_n is beyond MAX_UPDATE_NORM (so no softmax mean mix, a convex combination, is either;
    tanh and sum mixes, |c_n| <= 1, stay within N times it)."""
    tensors = {"lora_A": layer.A, "lora_B": layer.B, "lora_keys": layer.keys, "att_lora_to_q": layer.to_q}
    for name, tensor in tensors.items():
        if not tensor.is_floating_point():
            raise BasisError(f"{base}.{name} is stored as {tensor.dtype}; a basis holds floating-point tensors")
    A, B, keys, to_q = (as_float(t) for t in tensors.values())
    if A.ndim != 3 or B.ndim != 3 or keys.ndim != 2 or to_q.ndim != 2:
        raise BasisError(f"{base}: expected lora_A [N, in, r], lora_B [N, r, out], lora_keys [N, d], "
                         f"att_lora_to_q.weight [d, Q]; got {tuple(A.shape)}, {tuple(B.shape)}, "
                         f"{tuple(keys.shape)}, {tuple(to_q.shape)}")
    n, _, r = A.shape
    if B.shape[0] != n or B.shape[1] != r:
        raise BasisError(f"{base}: lora_B {tuple(B.shape)} does not fit lora_A {tuple(A.shape)} (N={n}, r={r})")
    if keys.shape[0] != n or to_q.shape[0] != keys.shape[1]:
        raise BasisError(f"{base}: lora_keys {tuple(keys.shape)} / att_lora_to_q {tuple(to_q.shape)} do not fit "
                         f"N={n} entries")
    if 0 in (*A.shape, *B.shape, *keys.shape, *to_q.shape):
        raise BasisError(f"{base}: a basis needs at least one entry, rank, key and query dimension and feature; got "
                         f"N={n}, in={A.shape[1]}, r={r}, out={B.shape[2]}, d={keys.shape[1]}, Q={to_q.shape[1]}")
    for name, tensor in zip(tensors, (A, B, keys, to_q)):
        if not torch.isfinite(tensor).all():
            raise BasisError(f"{base}.{name} contains NaN or Inf values")
    for name, tensor in (("lora_keys", keys), ("att_lora_to_q", to_q)):
        peak = tensor.abs().max().item()
        if peak > MAX_ROUTER_VALUE:
            raise BasisError(f"{base}.{name} holds values up to {peak:.3g}, beyond the {MAX_ROUTER_VALUE:g} accepted "
                             "(trained values are of order 1; larger ones overflow the mixing logits)")
    bounds = A.float().flatten(1).norm(dim=1) * B.float().flatten(1).norm(dim=1)  # ‖A_n B_n‖ <= ‖A_n‖·‖B_n‖
    for entry in torch.nonzero(~(bounds <= MAX_UPDATE_NORM)).flatten().tolist():  # exact check where needed
        check_low_rank_norm(B[entry].t(), A[entry].t(), 1.0, f"{base} entry {entry}", error=BasisError)
    return BasisLayer(A, B, keys, to_q)


BLOCK_PREFIXES = ("transformer_blocks.", "single_transformer_blocks.")


def basis_targets(layout: ModelLayout) -> dict[str, tuple[int, ...]]:
    """What a LoRWeB basis targets on a model of ``layout``: every linear of its transformer blocks (as the released
    basis does on FLUX.1-Kontext), {diffusers path: [out, in]}. FLUX.2's shared modulation layers, the embedders and
    the final layer sit outside the blocks and are not targeted."""
    return {path: shape for path, shape in layout.shapes.items() if path.startswith(BLOCK_PREFIXES)}


def basis_families(layers: dict[str, BasisLayer]) -> tuple[str, ...]:
    """The DiT families (flux, flux2, qwen_image) whose layout the basis' layer names and shapes fit, at the widths
    they imply. Several when the basis only targets layers they share (the double blocks' attention)."""
    entries = [(path, False, (layer.B.shape[2], layer.A.shape[1])) for path, layer in layers.items()]
    return tuple(family for family in TRANSFORMER_FAMILIES if infer_layout(family, entries) is not None)


def _family(layers: dict[str, BasisLayer], header: str | None) -> tuple[str, tuple[str, ...]]:
    """(family, every family it fits): the header's, checked against the layers, else the one its layers imply
    (FLUX.1 first: the released basis has no header). Layers that fit no published architecture (research variants
    at odd shapes) keep the header's family, else FLUX.1 for FLUX-style block names."""
    fits = basis_families(layers)
    if header is not None:
        if header not in FAMILIES:
            raise BasisError(f"the header's analogy.family {header[:40]!r} is not one of {FAMILIES}")
        if fits and header not in fits:
            titles = " or ".join(TRANSFORMER_FAMILIES[f].title for f in fits)
            title = TRANSFORMER_FAMILIES[header].title if header in TRANSFORMER_FAMILIES else header
            example = next((p for p in layers if "single" in p or "mlp" in p or "ff" in p), next(iter(layers)))
            raise BasisError(f"the header says this basis is for {title} ({header}) but its layers are {titles}'s "
                             f"({' or '.join(fits)}; e.g. {example}); it is a basis for another model family")
        return header, fits or (header,)
    if fits:
        return fits[0], fits
    if all(p.startswith(BLOCK_PREFIXES) for p in layers):
        return "flux", ("flux",)  # a FLUX-architecture basis at other widths (tests, research variants)
    return "unknown", ("unknown",)


def load_basis(path) -> LoRABasis:
    """Read a basis file; every problem is a TensorFileError or BasisError whose message starts with the file name
    (see analogy_core.files for what is checked before loading)."""
    tf = read_tensor_file(path, "LoRA basis", dtypes=FLOAT_DTYPES, finite=False)  # values checked per layer
    with naming_file(path, BasisError):
        json_metadata(tf.metadata, METADATA_KEY, error=BasisError)  # structure first; then its meaning:
        recorded_fingerprint(tf.metadata, BasisError)
        basis = basis_from_state_dict(tf.tensors, tf.metadata)
        try:  # settings recorded in the header are checked at load (also against the shapes), not at first mix
            basis.settings.check_shapes(basis.key_dim, basis.query_dim)
        except LoRWeBSettingsError as err:
            raise BasisError(str(err)) from None
        return basis


def random_basis(shapes: dict[str, tuple[int, int]], num_entries: int = 32, rank: int = 4, key_dim: int = 128,
                 query_dim: int = 3 * 768, seed: int = 0, scale: float = 0.02, family: str = "flux") -> LoRABasis:
    """A random basis over ``shapes`` ({path: (out, in)}), e.g. for tests and benchmarks."""
    gen = torch.Generator().manual_seed(seed)
    layers = {}
    for path, (out_f, in_f) in shapes.items():
        layers[path] = BasisLayer(
            torch.randn(num_entries, in_f, rank, generator=gen) * scale,
            torch.randn(num_entries, rank, out_f, generator=gen) * scale,
            torch.randn(num_entries, key_dim, generator=gen),
            torch.randn(key_dim, query_dim, generator=gen) / math.sqrt(query_dim),
        )
    return LoRABasis(layers, family=family)
