"""The encoder fingerprint (analogy_core.fingerprint): its maths against a hand computation, its file format, and the
LoRA of Change and LoRWeB checks that refuse an ANALOGY from an encoder of the right architecture but other weights."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch

from analogy_core.analogy import AnalogyEmbedding, EncoderInfo
from analogy_core.fingerprint import (FINGERPRINT_KEY, PROBE, PROJECTED, SAME_ENCODER_DISTANCE, EncoderFingerprint,
                                      EncoderMismatch, compare_fingerprints, probe_image, projection,
                                      recorded_fingerprint)


def random_fingerprint(seed: int, embed: int = 12, width: int = 20, tokens: int = 5) -> EncoderFingerprint:
    gen = torch.Generator().manual_seed(seed)
    return EncoderFingerprint.of(torch.randn(embed, generator=gen), torch.randn(tokens, width, generator=gen))


def test_probe_and_projection_are_fixed():
    """Recorded fingerprints stay comparable only while the probe and the hashed directions never change."""
    image = probe_image()
    assert image.shape == (1, 224, 224, 3) and torch.equal(image, probe_image())
    assert torch.equal((image * 255).round() / 255, image)  # k/255 levels: every preprocessing reads the same bytes
    assert image.std() > 0.2  # not a flat picture
    p = projection(1024, 1)
    assert p.shape == (1024, PROJECTED) and torch.equal(p.abs(), torch.full_like(p, 1 / 32))
    # a few hashed signs written out: a change of the hash must fail here, not silently in users' comparisons
    assert (p[:4, :4] * 32).tolist() == HASHED_SIGNS
    gram = p.T @ p
    assert torch.allclose(gram.diagonal(), torch.ones(PROJECTED, dtype=gram.dtype))
    assert (gram - torch.eye(PROJECTED, dtype=gram.dtype)).abs().max() < 0.2  # near-orthogonal directions
    assert not torch.equal(projection(1024, 0), p) and not torch.equal(projection(1024, 2), p)


HASHED_SIGNS = [[1.0, -1.0, 1.0, -1.0], [1.0, 1.0, 1.0, 1.0], [-1.0, -1.0, 1.0, 1.0], [-1.0, 1.0, 1.0, -1.0]]


def test_fingerprint_matches_a_hand_computation():
    gen = torch.Generator().manual_seed(3)
    embeds, tokens = torch.randn(12, generator=gen), torch.randn(7, 20, generator=gen)
    fp = EncoderFingerprint.of(embeds, tokens)
    # by hand, with the directions rebuilt from their definition: sign(bit 0 of the hash) / sqrt(width)
    def signs(width, salt):
        out = torch.empty(width, PROJECTED, dtype=torch.float64)
        for i in range(width):
            for j in range(PROJECTED):
                h = (i * 0x9E3779B1 + j * 0x85EBCA77 + salt * 0xC2B2AE3D) % 2**32
                h ^= h >> 15
                h = (h * 0x2C1B3C6D) % 2**32
                h ^= h >> 12
                out[i, j] = (1 if h & 1 else -1) / math.sqrt(width)
        return out

    expected = (embeds.double() @ signs(12, 0), tokens[0].double() @ signs(20, 1),
                tokens[1:].double().mean(0) @ signs(20, 2))
    for got, want in zip((fp.embeds, fp.class_token, fp.patch_mean), expected):
        assert torch.tensor(got, dtype=torch.float64).sub(want).abs().max() < 1e-5 * want.abs().max()
    # the distance: the largest relative change over the three parts, each part counted on its own
    assert fp.distance(fp) == 0
    for scale, name in zip((2.0, 1.5, 1.25), ("embeds", "class_token", "patch_mean")):
        other = dataclasses.replace(fp, **{name: tuple(scale * v for v in getattr(fp, name))})
        assert other.distance(fp) == pytest.approx(scale - 1), name
        assert fp.distance(other) == pytest.approx(1 - 1 / scale), name
    both = dataclasses.replace(fp, embeds=tuple(1.5 * v for v in fp.embeds),
                               class_token=tuple(-v for v in fp.class_token))
    assert both.distance(fp) == pytest.approx(2.0)  # the worst part, not a sum or a mean


def test_json_round_trip_and_refusals():
    fp = random_fingerprint(0)
    raw = json.loads(json.dumps(fp.to_json()))
    assert raw["probe"] == PROBE and EncoderFingerprint.from_json(raw) == fp
    assert recorded_fingerprint({FINGERPRINT_KEY: json.dumps(raw)}) == fp and recorded_fingerprint({}) is None
    bad = [
        ({**raw, "probe": "another-probe"}, "taken with probe 'another-probe'"),
        ({k: v for k, v in raw.items() if k != "embeds"}, "exactly probe, embeds"),
        ({**raw, "extra": 1}, "exactly probe"),
        ({**raw, "embeds": raw["embeds"][:-1]}, f"embeds must be {PROJECTED} numbers within"),
        ({**raw, "class_token": [True] * PROJECTED}, "class_token must be"),
        ({**raw, "patch_mean": ["1"] * PROJECTED}, "patch_mean must be"),
        ({**raw, "embeds": [1e39] * PROJECTED}, "embeds must be 64 numbers within"),  # inf once in float32
        ({**raw, "embeds": [10 ** 400] * PROJECTED}, "embeds must be 64 numbers within"),  # no float at all
        ({**raw, "embeds": [0.0] * PROJECTED}, "all zeros"),
        ([1, 2], "must be an object"),
    ]
    for value, message in bad:
        with pytest.raises(ValueError, match=message):
            EncoderFingerprint.from_json(value)
    with pytest.raises(ValueError, match="not valid JSON"):
        recorded_fingerprint({FINGERPRINT_KEY: "{"})
    with pytest.raises(KeyError, match="is not valid JSON"):  # the caller's error class, the key named
        recorded_fingerprint({FINGERPRINT_KEY: '{"probe": NaN}'}, KeyError)
    with pytest.raises(ValueError, match="non-finite"):
        EncoderFingerprint.of(torch.full((4,), float("nan")), torch.ones(3, 4))
    with pytest.raises(ValueError, match=r"tokens \[T >= 2, W\]"):
        EncoderFingerprint.of(torch.ones(4), torch.ones(1, 4))


def test_compare_refuses_other_weights_and_says_what_it_checked():
    fp = random_fingerprint(0)
    near = EncoderFingerprint.of(*_perturbed(0, 0.01))
    assert 0 < near.distance(fp) < SAME_ENCODER_DISTANCE
    assert "match the training encoder (fingerprint distance 0.0" in compare_fingerprints(fp, near, "H", "E", "")
    with pytest.raises(EncoderMismatch, match=r"E is not the encoder H was trained with: .* distance 1\.\d\d\d; .*"
                                              r"\. Use F\.$"):
        compare_fingerprints(fp, random_fingerprint(1), "H", "E", "Use F.")
    assert "file records no encoder fingerprint" in compare_fingerprints(None, fp, "H", "E", "")
    huge = dataclasses.replace(fp, class_token=tuple(v * 1e300 for v in fp.class_token))  # inf - inf: no number
    assert math.isinf(huge.distance(fp)) and math.isinf(fp.distance(huge))
    with pytest.raises(EncoderMismatch, match="distance inf"):   # a value that cannot be compared is no match
        compare_fingerprints(fp, huge, "H", "E", "")
    assert "ANALOGY carries no encoder fingerprint" in compare_fingerprints(fp, None, "H", "E", "")


def _perturbed(seed: int, scale: float, embed: int = 12, width: int = 20, tokens: int = 5):
    gen = torch.Generator().manual_seed(seed)
    embeds, patch = torch.randn(embed, generator=gen), torch.randn(tokens, width, generator=gen)
    noise = torch.Generator().manual_seed(99)
    return embeds + scale * torch.randn(embed, generator=noise), patch + scale * torch.randn(tokens, width,
                                                                                            generator=noise)
