"""Which weights an image encoder has, told from what it does: its fingerprint.

A file trained on an encoder's outputs (a LoRWeB basis, a LoRA of Change hypernetwork, a region predictor) records
the encoder's identity (family, widths, layers), but two encoders of one architecture look alike there: OpenAI's and
LAION's CLIP ViT-L/14, or the stock CLIP vision model and the image encoder a LoC run trained with its hypernetwork.
Their outputs tell them apart. The fingerprint is the encoder's response to one fixed probe picture, kept small: its
projected image embedding, its class token and the mean of its patch tokens (the penultimate block, what LoC reads),
each projected onto 64 fixed ±1 directions (hashed from the indices, so no random generator and no library version
decides them). A file records the fingerprint of the encoder it was trained with; the nodes compare it with the
fingerprint of the encoder that made the ANALOGY.

Distance: per part, |f − g| / |g|, the largest of the three parts. Measured on the analogy world's CLIP
(``bench.encoder_fingerprint``; README, "What the pack refuses"): its weights stored in float16 0.0001, bfloat16
0.002, fp8 (e4m3) 0.025; the image encoder a LoC run trained at lr 1e-4 moved 0.22 after 300 steps (H's LoRA from the
stock tokens then differs by 6 %), at 1e-5 0.07 after 1,200 (3 %); another initialisation lands above 1. Hence
:data:`SAME_ENCODER_DISTANCE` = 0.1.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from .files import is_json_number, json_metadata

PROBE = "analogy-probe-v1"  # the probe picture and projection; a new one gets a new name
PROBE_SIZE = 224
PROJECTED = 64              # numbers per part
PARTS = ("embeds", "class_token", "patch_mean")
SAME_ENCODER_DISTANCE = 0.1  # above it the weights differ (16-bit and fp8 storage stay below; see above)
FINGERPRINT_KEY = "analogy.encoder_fingerprint"  # the header key files record it under (JSON)
MAX_VALUE = 1e12            # recorded numbers beyond it are damage (projected CLIP activations are O(1-1000))


class EncoderMismatch(ValueError):
    """The encoder of an ANALOGY is not the one a file was trained with."""


def probe_image(size: int = PROBE_SIZE) -> torch.Tensor:
    """The fixed probe picture as IMAGE [1, size, size, 3] in 0..1 (colour ramps, diagonal stripes, a disc and a
    square; levels k/255 so every preprocessing reads the same bytes)."""
    y, x = torch.meshgrid(torch.linspace(0, 1, size, dtype=torch.float64),
                          torch.linspace(0, 1, size, dtype=torch.float64), indexing="ij")
    image = torch.stack([x, y, 0.5 + 0.5 * torch.sin(10 * math.pi * (x + y))], dim=-1)
    disc = (x - 0.3) ** 2 + (y - 0.35) ** 2 < 0.16 ** 2
    square = (x > 0.58) & (x < 0.86) & (y > 0.56) & (y < 0.84)
    image[disc] = torch.tensor([0.92, 0.18, 0.10], dtype=torch.float64)
    image[square] = torch.tensor([0.08, 0.30, 0.88], dtype=torch.float64)
    return ((image * 255).round() / 255).float().unsqueeze(0)


def projection(width: int, salt: int) -> torch.Tensor:
    """[width, PROJECTED] of ±1/sqrt(width), hashed from (row, column, salt): the same on every machine."""
    rows = torch.arange(width, dtype=torch.int64)[:, None]
    cols = torch.arange(PROJECTED, dtype=torch.int64)[None, :]
    mask = 0xFFFFFFFF
    h = (rows * 0x9E3779B1 + cols * 0x85EBCA77 + salt * 0xC2B2AE3D) & mask
    h = h ^ (h >> 15)
    h = (h * 0x2C1B3C6D) & mask
    h = h ^ (h >> 12)
    return ((h & 1) * 2 - 1).double() / math.sqrt(width)


@dataclass(frozen=True)
class EncoderFingerprint:
    """An encoder's response to the probe (see the module docstring); compare two with :meth:`distance`."""

    embeds: tuple[float, ...]
    class_token: tuple[float, ...]
    patch_mean: tuple[float, ...]

    @staticmethod
    def of(embeds: torch.Tensor, tokens: torch.Tensor) -> "EncoderFingerprint":
        """From the probe's image embedding [D] and its tokens [T, W] (class token first)."""
        if embeds.ndim != 1 or tokens.ndim != 2 or tokens.shape[0] < 2:
            raise ValueError(f"a fingerprint needs one image's embedding [D] and tokens [T >= 2, W]; got "
                             f"{tuple(embeds.shape)} and {tuple(tokens.shape)}")
        tokens = tokens.double()
        parts = (embeds.double() @ projection(embeds.shape[0], 0), tokens[0] @ projection(tokens.shape[1], 1),
                 tokens[1:].mean(0) @ projection(tokens.shape[1], 2))
        if not all(torch.isfinite(p).all() for p in parts):
            raise ValueError("the encoder gave non-finite values for the probe picture (damaged weights?)")
        return EncoderFingerprint(*(tuple(float(f"{v:.6g}") for v in p.tolist()) for p in parts))

    def distance(self, other: "EncoderFingerprint") -> float:
        """max over the parts of |self − other| / |other| (0 for the same weights on the same code path; inf when a
        part cannot be compared, so a damaged value never reads as a match)."""
        return max(self.part_distances(other).values())

    def part_distances(self, other: "EncoderFingerprint") -> dict[str, float]:
        """|self − other| / |other| for each part (inf where it is not a number)."""
        out = {}
        for name in PARTS:
            mine = torch.tensor(getattr(self, name), dtype=torch.float64)
            theirs = torch.tensor(getattr(other, name), dtype=torch.float64)
            part = float((mine - theirs).norm() / theirs.norm().clamp_min(1e-12))
            out[name] = part if math.isfinite(part) else math.inf
        return out

    def to_json(self) -> dict:
        return {"probe": PROBE, **{name: list(getattr(self, name)) for name in PARTS}}

    @staticmethod
    def from_json(raw: object) -> "EncoderFingerprint":
        """Parse a recorded fingerprint; anything but this probe's exact shape is refused by name."""
        if not isinstance(raw, dict) or set(raw) != {"probe", *PARTS}:
            raise ValueError(f"a recorded encoder fingerprint must be an object with exactly probe, "
                             f"{', '.join(PARTS)}")
        if raw["probe"] != PROBE:
            raise ValueError(f"the recorded encoder fingerprint was taken with probe {str(raw['probe'])[:40]!r}; "
                             f"this pack knows {PROBE!r}")
        values = {}
        for name in PARTS:
            part = raw[name]
            if not (isinstance(part, list) and len(part) == PROJECTED and all(map(_plausible, part))):
                raise ValueError(f"the recorded encoder fingerprint's {name} must be {PROJECTED} numbers within "
                                 f"±{MAX_VALUE:g}")
            values[name] = tuple(float(v) for v in part)
        if all(v == 0 for v in values["embeds"]):
            raise ValueError("the recorded encoder fingerprint is all zeros")
        return EncoderFingerprint(**values)


def _plausible(value: object) -> bool:
    """A JSON number an encoder could have given (no bool, no 400-digit integer, nothing beyond ±MAX_VALUE)."""
    return is_json_number(value) and abs(value) <= MAX_VALUE


def fingerprint_metadata(fingerprint: EncoderFingerprint) -> dict[str, str]:
    """The header entry a trained file records its encoder's fingerprint in."""
    return {FINGERPRINT_KEY: json.dumps(fingerprint.to_json())}


def recorded_fingerprint(metadata: Mapping[str, str], error: type[ValueError] = ValueError
                         ) -> EncoderFingerprint | None:
    """The fingerprint a file's header records (None for files without one: older or third-party files)."""
    raw = json_metadata(metadata, FINGERPRINT_KEY, error=error)
    if raw is None:
        return None
    try:
        return EncoderFingerprint.from_json(raw)
    except ValueError as err:
        raise error(f"header metadata {FINGERPRINT_KEY!r}: {err}") from None


def describe_recorded(fingerprint: EncoderFingerprint | None) -> str:
    """What a loader's info says about the encoder check its file allows."""
    if fingerprint is None:
        return "records no encoder fingerprint (the encoder's weights are not checked)"
    return "records its training encoder's fingerprint (an encoder with other weights is refused)"


def compare_fingerprints(recorded: EncoderFingerprint | None, actual: EncoderFingerprint | None,
                         trained: str, given: str, remedy: str) -> str:
    """A sentence for the node's info, or :class:`EncoderMismatch` when the weights differ. ``trained`` names the
    file's model, ``given`` where the ANALOGY came from, ``remedy`` what to do instead (all for the message)."""
    if recorded is None:
        return "encoder weights not checked (the file records no encoder fingerprint)"
    if actual is None:
        return "encoder weights not checked (the ANALOGY carries no encoder fingerprint)"
    distance = actual.distance(recorded)
    if not distance <= SAME_ENCODER_DISTANCE:
        raise EncoderMismatch(
            f"{given} is not the encoder {trained} was trained with: same architecture, other weights (fingerprint "
            f"distance {distance:.3f}; the same weights stay below {SAME_ENCODER_DISTANCE}). {remedy}")
    return f"encoder weights match the training encoder (fingerprint distance {distance:.3f})"
