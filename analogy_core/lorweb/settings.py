"""How a LoRWeB basis must be mixed: the official ``network_kwargs`` as settings, and the one mixing function.

The official code (NVlabs/LoRWeB, ``toolkit/network_mixins.py`` for training, ``extensions_built_in/flux_kontext.py``
for inference) computes per layer, for an external image query e (one query per sample):

    q = W_q · e                                   (d,)   projection "linear"
    split q and every key K_n into H heads of d/H (head h = columns h·d/H … (h+1)·d/H)
    s_h,n = q_h · K_h,n / sqrt(d/H)               one score per head and entry
    c_h = softmax_n(s_h)      (lora_softmax true)   or   c_h = tanh(s_h)   (false)
    c = mean_h c_h            (mixing "mean")       or   c = clamp(Σ_h c_h, 0|-1, 1)   (mixing "sum"; lower bound 0
                                                                                        for softmax, -1 for tanh)
    Δy = Σ_n c_n (x A_n) B_n

The query e is built from the CLIP image embeddings by ``query_mode``: "cat-aa'b" = [e_a, e_a', e_b] (3·D wide),
"ca'-ca" = e_a' - e_a, "ca'-ca+cb" = e_a' - e_a + e_b (D wide). Short aliases "a'-a" and "a'-a+b" are accepted.
``pooling_type`` only matters for the official internal query (pooled from the layer input), which is not supported.

Where the settings come from: the official ``config.yaml`` (``config.process[0].network.network_kwargs``), a basis
file's metadata (written by this pack's trainer), else the released checkpoint's values (:data:`OFFICIAL`).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Mapping

import torch
import yaml

from ..analogy import ENCODER_FAMILIES, AnalogyEmbedding, EncoderInfo
from ..files import show_value

METADATA_KEY = "analogy.lorweb_settings"
LEGACY_ENCODER_KEY = "analogy.encoder"  # the encoder name the first trainer recorded
DEFAULT_SOURCE = "official defaults"
MAX_HEADS = 4096  # lora_heads must divide the key width (128 in the released basis)

# canonical query mode -> (roles it reads, query width in image embeddings)
QUERY_MODES: dict[str, tuple[tuple[str, ...], int]] = {
    "cat-aa'b": (("a", "a_prime", "b"), 3),
    "ca'-ca": (("a", "a_prime"), 1),
    "ca'-ca+cb": (("a", "a_prime", "b"), 1),
}
QUERY_MODE_ALIASES = {"a'-a": "ca'-ca", "a'-a+b": "ca'-ca+cb", "cat-aa\u2032b": "cat-aa'b"}
UNSUPPORTED_QUERY_MODES = {
    "aa'bb'": "the whole composite as one image", "caa'bb'": "the whole composite as one image",
    "caa'b": "the composite with B' blanked as one image", "caa'": "the top half of the composite as one image",
    "cat-paa'b": "patch-token sequences", "cat-paa'b3": "patch-token sequences of three layers",
    "paa'b": "patch-token sequences", "paa'b3": "patch-token sequences of three layers",
}

# Hugging Face ids the official code loads as external_query_model -> (family, name, embedding width)
KNOWN_QUERY_MODELS = {
    "openai/clip-vit-large-patch14": ("clip", "CLIP ViT-L/14", 768),
    "openai/clip-vit-large-patch14-336": ("clip", "CLIP ViT-L/14@336", 768),
    "google/siglip2-base-patch16-224": ("siglip2", "SigLIP2 ViT-B/16", 768),
}


class LoRWeBSettingsError(ValueError):
    """A LoRWeB setting this pack cannot honour, or settings that do not fit the basis or the query."""


def canonical_query_mode(mode: str) -> str:
    mode = QUERY_MODE_ALIASES.get(mode, mode)
    if mode in QUERY_MODES:
        return mode
    supported = ", ".join(list(QUERY_MODES) + list(QUERY_MODE_ALIASES))
    if mode in UNSUPPORTED_QUERY_MODES:
        raise LoRWeBSettingsError(f"query_mode {show_value(mode)} (a query from {UNSUPPORTED_QUERY_MODES[mode]}) is "
                                  f"not supported; supported: {supported}")
    raise LoRWeBSettingsError(f"unknown query_mode {show_value(mode)}; supported: {supported}")


def query_width(mode: str, embed_dim: int) -> int:
    """Width of the query a basis trained with ``mode`` expects from an encoder of ``embed_dim``-wide embeddings."""
    return QUERY_MODES[canonical_query_mode(mode)][1] * embed_dim


def build_query(embedding: AnalogyEmbedding, mode: str = "cat-aa'b") -> torch.Tensor:
    """The official external query of ``mode`` for every sample of ``embedding``: [batch, width] (float32)."""
    mode = canonical_query_mode(mode)
    if mode == "cat-aa'b":
        return embedding.query(("a", "a_prime", "b"))
    a, a_prime = embedding.query(("a",)), embedding.query(("a_prime",))
    return a_prime - a if mode == "ca'-ca" else a_prime - a + embedding.query(("b",))


def query_model_identity(model_id: str) -> tuple[str, str | None, int | None]:
    """(family, name, embedding width) of an ``external_query_model`` id; name/width are None when not known.

    Like the official loader, the family is read from the name ('clip', 'siglip', ...) for ids it does not list."""
    if model_id in KNOWN_QUERY_MODELS:
        return KNOWN_QUERY_MODELS[model_id]
    lowered = model_id.lower()
    for needle, family in (("siglip2", "siglip2"), ("siglip", "siglip"), ("dinov2", "dinov2"), ("clip", "clip")):
        if needle in lowered:
            return family, None, None
    raise LoRWeBSettingsError(f"external_query_model {show_value(model_id)}: cannot tell which image-encoder family "
                              "this is (expected a CLIP, SigLIP, SigLIP2 or DINOv2 model, e.g. "
                              "openai/clip-vit-large-patch14)")


def mixing_coefficients(projected: torch.Tensor, keys: torch.Tensor, settings: "LoRWeBSettings",
                        temperature: float = 1.0) -> torch.Tensor:
    """The official mixing: projected queries [B, d] and keys [N, d] -> coefficients [B, N] (see the module doc).

    ``temperature`` (this pack's extension, 1 = as trained) divides the scores before softmax/tanh."""
    batch, key_dim = projected.shape
    heads = settings.lora_heads
    if key_dim % heads or keys.shape[1] != key_dim:
        raise LoRWeBSettingsError(f"lora_heads={heads} does not divide the key width {key_dim} "
                                  f"(keys {tuple(keys.shape)})")
    head_dim = key_dim // heads
    scores = torch.einsum("bhk,nhk->bhn", projected.reshape(batch, heads, head_dim),
                          keys.to(projected.dtype).reshape(-1, heads, head_dim)) / (math.sqrt(head_dim) * temperature)
    per_head = torch.softmax(scores, dim=-1) if settings.lora_softmax else torch.tanh(scores)
    if settings.mixing_coeffs_type == "mean":
        return per_head.mean(dim=1)
    return per_head.sum(dim=1).clamp(min=0.0 if settings.lora_softmax else -1.0, max=1.0)


@dataclass(frozen=True)
class LoRWeBSettings:
    """The official ``network_kwargs`` that decide how a basis is mixed, plus the query encoder it was trained with.

    ``encoder_name`` is binding when known (a config.yaml naming a known model, or the trainer's record); without it
    only the encoder family is compared."""

    lora_heads: int = 1
    lora_softmax: bool = True
    mixing_coeffs_type: str = "mean"
    pooling_type: str = "avg"
    query_projection_type: str = "linear"
    query_mode: str = "cat-aa'b"
    external_query: bool = True
    external_query_model: str = "openai/clip-vit-large-patch14"
    encoder_family: str | None = None     # derived from external_query_model when not given
    encoder_name: str | None = None       # the exact encoder, when known
    encoder_embed_dim: int | None = None  # its embedding width, when known
    source: str = field(default=DEFAULT_SOURCE, compare=False)

    def __post_init__(self):
        if not isinstance(self.source, str):
            raise LoRWeBSettingsError(f"source must be a string, got {show_value(self.source)}")

        def fail(name, expected):
            raise LoRWeBSettingsError(f"{name} must be {expected}, got {show_value(getattr(self, name))} "
                                      f"({self.source})")

        if type(self.lora_heads) is not int or not 1 <= self.lora_heads <= MAX_HEADS:
            fail("lora_heads", f"a positive integer up to {MAX_HEADS}")
        if isinstance(self.lora_softmax, str) and self.lora_softmax.lower() in ("true", "false"):
            object.__setattr__(self, "lora_softmax", self.lora_softmax.lower() == "true")  # run.py's CLI spelling
        if not isinstance(self.lora_softmax, bool):
            fail("lora_softmax", "true (softmax) or false (tanh)")
        if self.mixing_coeffs_type not in ("mean", "sum"):
            fail("mixing_coeffs_type", "'mean' or 'sum'")
        if self.pooling_type not in ("avg", "max"):
            fail("pooling_type", "'avg' or 'max'")
        if self.query_projection_type != "linear":
            raise LoRWeBSettingsError(
                f"query_projection_type {show_value(self.query_projection_type)} is not supported: only 'linear' "
                f"(the att_lora_to_q matrix every basis file holds) is ({self.source})")
        if self.external_query is not True:
            raise LoRWeBSettingsError(f"external_query={show_value(self.external_query)} (a query pooled from each "
                                      f"layer's own input) is not supported: only true, a query from an image "
                                      f"encoder, is ({self.source})")
        for name in ("query_mode", "external_query_model"):
            if not isinstance(getattr(self, name), str):
                fail(name, "a name (a string)")
        try:
            object.__setattr__(self, "query_mode", canonical_query_mode(self.query_mode))
        except LoRWeBSettingsError as err:
            raise LoRWeBSettingsError(f"{err} ({self.source})") from None
        if self.encoder_family is None:
            object.__setattr__(self, "encoder_family", query_model_identity(self.external_query_model)[0])
        if not (isinstance(self.encoder_family, str) and self.encoder_family in ENCODER_FAMILIES):
            fail("encoder_family", f"one of {', '.join(ENCODER_FAMILIES)}")
        if self.encoder_name is not None and not (isinstance(self.encoder_name, str) and len(self.encoder_name) <= 300):
            fail("encoder_name", "a model name or null")
        if self.encoder_embed_dim is not None and not (type(self.encoder_embed_dim) is int
                                                       and 1 <= self.encoder_embed_dim <= 10**6):
            fail("encoder_embed_dim", f"an integer in 1..{10**6} or null")

    # -- construction ---------------------------------------------------------------------------------------------
    @classmethod
    def from_network_kwargs(cls, kwargs: Mapping[str, Any], source: str = "network_kwargs") -> "LoRWeBSettings":
        """From the official ``network_kwargs``; absent keys take the official values. A known
        ``external_query_model`` also fixes the encoder's name and width."""
        names = ("lora_heads", "lora_softmax", "mixing_coeffs_type", "pooling_type", "query_projection_type",
                 "query_mode", "external_query", "external_query_model")
        values = {k: kwargs[k] for k in names if kwargs.get(k) is not None}
        model = values.get("external_query_model", cls.external_query_model)
        if not isinstance(model, str):
            raise LoRWeBSettingsError(f"external_query_model must be a model name, got {model!r} ({source})")
        family, name, width = query_model_identity(model)
        return cls(**values, encoder_family=family, encoder_name=name, encoder_embed_dim=width, source=source)

    @classmethod
    def from_metadata(cls, metadata: Mapping[str, str]) -> "LoRWeBSettings":
        """From a basis file's header metadata (what :meth:`to_metadata` wrote); official values when absent."""
        legacy_name = metadata.get(LEGACY_ENCODER_KEY) or None
        raw = metadata.get(METADATA_KEY)
        if raw is None:
            return cls(encoder_name=legacy_name, source="basis metadata" if legacy_name else DEFAULT_SOURCE)
        try:
            values = json.loads(raw)
        except json.JSONDecodeError as err:
            raise LoRWeBSettingsError(f"basis metadata {METADATA_KEY} is not valid JSON: {err}") from None
        if not isinstance(values, dict):
            raise LoRWeBSettingsError(f"basis metadata {METADATA_KEY} must be a JSON object, got {raw[:80]!r}")
        known = {f for f in cls.__dataclass_fields__}
        unknown = sorted(set(values) - known)
        if unknown:
            raise LoRWeBSettingsError(f"basis metadata {METADATA_KEY} has settings this pack does not know: "
                                      f"{', '.join(unknown)}")
        values.setdefault("source", "basis metadata")
        if values.get("encoder_name") is None and legacy_name:
            values["encoder_name"] = legacy_name
        return cls(**values)

    def to_metadata(self) -> dict[str, str]:
        return {METADATA_KEY: json.dumps(asdict(self), sort_keys=True)}

    def for_encoder(self, info: EncoderInfo, model: str | None = None) -> "LoRWeBSettings":
        """These settings bound to the encoder a basis is trained with (what the trainer records)."""
        return replace(self, external_query_model=model or self.external_query_model, encoder_family=info.family,
                       encoder_name=info.name, encoder_embed_dim=info.embed_dim, source=self.source)

    # -- queries ----------------------------------------------------------------------------------------------------
    @property
    def roles(self) -> tuple[str, ...]:
        return QUERY_MODES[self.query_mode][0]

    def query_width(self, embed_dim: int) -> int:
        return query_width(self.query_mode, embed_dim)

    def describe_width(self, width: int) -> str:
        factor = QUERY_MODES[self.query_mode][1]
        if factor == 1:
            return f"query mode {self.query_mode}: one {width}-d image embedding"
        return f"query mode {self.query_mode}: {factor} x {width // factor}-d image embeddings"

    def check_encoder(self, info: EncoderInfo) -> None:
        """Refuse embeddings from an encoder family (or, when recorded, an encoder) the basis was not trained with."""
        expected = self.encoder_name or f"a {ENCODER_FAMILIES[self.encoder_family]} model"
        if info.family != self.encoder_family or (self.encoder_name and info.name != self.encoder_name):
            raise LoRWeBSettingsError(
                f"the basis was trained with queries from {expected} (family {self.encoder_family}; "
                f"external_query_model {self.external_query_model}, {self.source}) but the ANALOGY comes from "
                f"{info.label}; encode the analogy with the encoder the basis was trained with")

    def query(self, embedding: AnalogyEmbedding, check_encoder: bool = True) -> torch.Tensor:
        """The training/inference query of this query mode for every sample: [batch, width]."""
        if check_encoder:
            self.check_encoder(embedding.encoder)
        return build_query(embedding, self.query_mode)

    def check_shapes(self, key_dim: int, query_dim: int) -> None:
        """Settings that cannot fit a basis of these widths."""
        if key_dim % self.lora_heads:
            raise LoRWeBSettingsError(f"lora_heads={self.lora_heads} does not divide the basis' key width {key_dim} "
                                      f"({self.source})")
        factor = QUERY_MODES[self.query_mode][1]
        if query_dim % factor:
            raise LoRWeBSettingsError(f"query_mode {self.query_mode} needs a query width divisible by {factor}; the "
                                      f"basis has {query_dim} ({self.source})")
        if self.encoder_embed_dim and query_dim != self.query_width(self.encoder_embed_dim):
            raise LoRWeBSettingsError(
                f"the basis takes {query_dim}-d queries but {self.encoder_name or self.external_query_model} with "
                f"query_mode {self.query_mode} gives {self.query_width(self.encoder_embed_dim)}-d ({self.source})")

    def mixing_coefficients(self, projected: torch.Tensor, keys: torch.Tensor, temperature: float = 1.0):
        return mixing_coefficients(projected, keys, self, temperature)

    def describe(self) -> str:
        heads = f"{self.lora_heads} head{'s' if self.lora_heads > 1 else ''}"
        encoder = self.encoder_name or f"{ENCODER_FAMILIES[self.encoder_family]} ({self.external_query_model})"
        return (f"{'softmax' if self.lora_softmax else 'tanh'}, {heads}, {self.mixing_coeffs_type}; query "
                f"{self.query_mode} from {encoder} [{self.source}]")


OFFICIAL = LoRWeBSettings()  # the released checkpoint's settings (README command + LoRWeB_default_PROMPTS.yaml)


# -- the official config.yaml ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class LoRWeBConfig:
    """What an official training ``config.yaml`` says about its basis: mixing settings and shapes (None = absent)."""

    settings: LoRWeBSettings
    num_entries: int | None = None  # loras_num
    key_dim: int | None = None      # lora_keys_dim
    rank: int | None = None         # network.linear
    path: str = ""

    def check_shapes(self, num_entries: int, rank: int, key_dim: int, query_dim: int) -> None:
        """Refuse a config.yaml that does not describe a basis of these shapes."""
        for name, stated, actual in (("loras_num", self.num_entries, num_entries), ("linear", self.rank, rank),
                                     ("lora_keys_dim", self.key_dim, key_dim)):
            if stated is not None and stated != actual:
                raise LoRWeBSettingsError(f"{self.path}: {name}={stated} but the basis has {actual}; this "
                                          f"config.yaml belongs to another basis")
        self.settings.check_shapes(key_dim, query_dim)


def parse_lorweb_config(document: Mapping[str, Any], path: str = "config.yaml") -> LoRWeBConfig:
    """Read ``config.process[0].network`` of an official (ai-toolkit) training config already parsed from YAML."""
    def step(node, key, what):
        if isinstance(key, int):
            ok = isinstance(node, list) and len(node) > key
        else:
            ok = isinstance(node, Mapping) and key in node
        if not ok:
            raise LoRWeBSettingsError(f"{path}: expected {what} (the official LoRWeB training config, "
                                      f"config.process[0].network.network_kwargs), found none")
        return node[key]

    root = document.get("config", document) if isinstance(document, Mapping) else document
    network = step(step(step(root, "process", "config.process"), 0, "config.process[0]"), "network",
                   "config.process[0].network")
    kwargs = step(network, "network_kwargs", "config.process[0].network.network_kwargs")
    network_type = str(network.get("type", "attlora")).lower()
    if network_type != "attlora":
        raise LoRWeBSettingsError(f"{path}: network type {network_type!r} is not a LoRWeB basis (type 'attlora')")

    def integer(value, name):
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int):
            raise LoRWeBSettingsError(f"{path}: {name} must be an integer, got {value!r}")
        return value

    settings = LoRWeBSettings.from_network_kwargs(kwargs, source=f"config {path}")
    return LoRWeBConfig(settings, integer(kwargs.get("loras_num"), "loras_num"),
                        integer(kwargs.get("lora_keys_dim"), "lora_keys_dim"),
                        integer(network.get("linear", network.get("rank")), "linear"), path)


def read_lorweb_config(path: str | os.PathLike) -> LoRWeBConfig:
    """Parse an official ``config.yaml`` (safe YAML: no Python objects are built)."""
    path = Path(path)
    if not path.is_file():
        raise LoRWeBSettingsError(f"LoRWeB config {path} does not exist")
    try:
        document = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        raise LoRWeBSettingsError(f"{path} is not a readable YAML file: {err}") from None
    return parse_lorweb_config(document or {}, str(path))
