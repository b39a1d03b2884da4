"""Mixing policy of the Mix LoRA Basis node, ComfyUI-free: one analogy (or two blended) -> one LoRA.

The node only converts ComfyUI types; everything decided here is testable without ComfyUI:

* the query is built with the basis' own query mode, after checking that the ANALOGY comes from the encoder family
  (and, when recorded, the encoder) the basis was trained with; the query width is checked once, in
  :meth:`LoRABasis.coefficients`;
* the encoder's weights are checked too when the basis records their fingerprint (its trainer does): another CLIP
  ViT-L/14 than the one the keys were trained on is refused, not mixed into a LoRA of no edit;
* two analogies blend either by their coefficients ((1-w)·c1 + w·c2, both edits weighted) or by their queries
  (the interpolated query is mixed);
* the report names the most used basis entries (largest mean |coefficient| over layers; tanh bases mix with signed
  coefficients, so the heat map and the report rank entries by magnitude and print the signed mean).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..analogy import AnalogyEmbedding, AnalogyError
from ..fingerprint import compare_fingerprints, recorded_fingerprint
from .basis import BasisError, LoRABasis
from ..lora import LoRA
from .settings import LoRWeBSettingsError

BLEND_MODES = ("coefficients", "query")


@dataclass(frozen=True)
class MixResult:
    lora: LoRA
    coefficients: dict[str, torch.Tensor]  # per layer [1, N]
    report: str

    @property
    def table(self) -> torch.Tensor:
        """How strongly each layer uses each entry, |c| as [layers, N] (what the heat map draws)."""
        return torch.cat(list(self.coefficients.values()), dim=0).abs()


def analogy_query(basis: LoRABasis, analogy: AnalogyEmbedding, sample: int = 0) -> torch.Tensor:
    """The query [1, Q] of one ANALOGY item, built the way the basis was trained (encoder checked)."""
    if not 0 <= sample < analogy.batch_size:
        raise AnalogyError(f"sample {sample} is out of range: the ANALOGY holds {analogy.batch_size} item(s)")
    try:
        return basis.settings.query(analogy)[sample: sample + 1]
    except LoRWeBSettingsError as err:
        raise BasisError(str(err)) from None


def mix_analogy(basis: LoRABasis, analogy: AnalogyEmbedding, temperature: float = 1.0, sample: int = 0,
                analogy_2: AnalogyEmbedding | None = None, blend: float = 0.5,
                blend_mode: str = "coefficients") -> MixResult:
    """Mix ``basis`` for one analogy item, optionally blended with ``analogy_2`` (weight ``blend``)."""
    if blend_mode not in BLEND_MODES:
        raise BasisError(f"blend_mode must be one of {BLEND_MODES}, got {blend_mode!r}")
    if not 0.0 <= blend <= 1.0:
        raise BasisError(f"blend must be between 0 and 1, got {blend}")
    source = f"the ANALOGY from {analogy.encoder.name}"
    query = analogy_query(basis, analogy, sample)
    weights = check_encoder_weights(basis, analogy, "the ANALOGY's encoder")
    if analogy_2 is None or blend == 0:
        coefficients = basis.coefficients(query, temperature, source)
    else:
        query_2 = analogy_query(basis, analogy_2, sample if sample < analogy_2.batch_size else 0)
        check_encoder_weights(basis, analogy_2, "analogy_2's encoder")
        source_2 = f"analogy_2 from {analogy_2.encoder.name}"
        if blend_mode == "query":
            if query_2.shape[-1] != query.shape[-1]:
                raise BasisError(f"{source_2} gives {query_2.shape[-1]}-d queries, {source} {query.shape[-1]}-d; "
                                 "blend analogies encoded with one encoder")
            coefficients = basis.coefficients((1 - blend) * query + blend * query_2, temperature, source)
        else:
            c1 = basis.coefficients(query, temperature, source)
            c2 = basis.coefficients(query_2, temperature, source_2)
            coefficients = {k: (1 - blend) * c1[k] + blend * c2[k] for k in c1}
    lora = basis.mix(coefficients)
    return MixResult(lora, coefficients, f"{lora.summary()}; {weights}; {top_entries(coefficients)}")


def check_encoder_weights(basis: LoRABasis, analogy: AnalogyEmbedding, given: str) -> str:
    """Refuse an ANALOGY whose encoder has the basis' architecture but other weights (when the basis records its
    encoder's fingerprint); a sentence for the report."""
    return compare_fingerprints(recorded_fingerprint(basis.metadata, BasisError), analogy.fingerprint, "this basis",
                                f"{given} ({analogy.encoder.label})",
                                "Encode the analogy with the CLIP vision weights the basis was trained with (its "
                                "header's analogy.config names its query_encoder)")


def top_entries(coefficients: dict[str, torch.Tensor], k: int = 5) -> str:
    """The ``k`` basis entries used most (largest mean |c| over layers) with their mean coefficient, e.g.
    "#3=0.412, #0=-0.101"."""
    table = torch.cat(list(coefficients.values()), dim=0)
    top = torch.topk(table.abs().mean(dim=0), k=min(k, table.shape[1]))
    means = table.mean(dim=0)
    return "mean coefficient of the top entries: " + ", ".join(f"#{i}={means[i]:.3f}" for i in top.indices.tolist())
