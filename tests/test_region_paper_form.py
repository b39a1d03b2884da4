"""The region predictor as the paper writes it: presets, attention scores of unit spread, f_sem on the raw CLIP
patches (eq. 5), and the straight-through binarised mask, each against a written-out computation."""

from __future__ import annotations

import math

import torch

from analogy_core.regions import (RegionPredictor, RegionSpec, attention_scores, region_masks,
                                  straight_through)
from training.config import build_config
from training.regions.config import PRESETS, RegionConfig


def predictor(positions: bool = True, residual: bool = True, dim: int = 64) -> RegionPredictor:
    torch.manual_seed(0)
    spec = RegionSpec(dim=dim, grid=4, image_size=32, text_dim=dim, residual=residual, positions=positions)
    return RegionPredictor(spec, with_sem=True)


def inputs(dim: int = 64, scale: float = 0.02):
    gen = torch.Generator().manual_seed(1)
    patches = torch.randn(3, 16, dim, generator=gen) * scale     # small features, like projected CLIP/T5 ones
    tokens = torch.randn(3, 5, dim, generator=gen) * scale
    return patches, tokens, torch.ones(3, 5, dtype=torch.bool)


def test_presets_name_the_paper_and_the_pack_forms():
    paper = build_config(RegionConfig, PRESETS, "paper", None, [])
    pack = build_config(RegionConfig, PRESETS, "pack", None, [])
    assert (paper.residual, paper.positions) == (False, False)
    assert (pack.residual, pack.positions) == (True, True)
    assert "attention_init" in paper.to_dict() and "straight_through" in paper.to_dict()   # recorded in the file
    assert (RegionConfig().attention_init, RegionConfig().straight_through) == ("calibrated", False)


def test_calibrated_attention_scores_have_unit_spread():
    for residual in (False, True):
        model = predictor(residual=residual, dim=256)
        patches, tokens, mask = inputs(256)
        x = patches + model.position
        spread = attention_scores(model.cross, x, tokens).std().item()
        assert spread < 1e-2                                       # torch's init: the softmax nearly averages
        before = model.calibrate_attention(patches, "text", tokens, mask)
        assert math.isclose(before["cross"], spread, rel_tol=1e-4)
        assert math.isclose(attention_scores(model.cross, x, tokens).std().item(), 1.0, rel_tol=1e-3)
        edited = model.cross(x, tokens, mask) + (x if residual else 0)
        assert math.isclose(attention_scores(model.self_attn, edited, edited).std().item(), 1.0, rel_tol=1e-3)
        probs = model(patches, "text", tokens, mask).probs
        assert probs.std(dim=1).mean() > 0                          # per-patch output varies


def test_f_sem_reads_the_raw_patches():
    model = predictor(positions=True)
    patches, tokens, mask = inputs()
    out = model(patches, "text", tokens, mask, semantic=True)
    torch.testing.assert_close(out.sem_original, model.f_sem(patches))
    assert not torch.allclose(out.sem_original, model.f_sem(patches + model.position))   # positions would change it
    positioned = model(patches, "text", tokens, mask, semantic=True)
    torch.testing.assert_close(positioned.sem_edited, model.f_sem(out.edited))


def test_straight_through_forward_is_the_binary_mask_and_its_gradient_the_soft_ones():
    probs = torch.tensor([[0.2, 0.49, 0.5, 0.9]], requires_grad=True)
    weights = torch.tensor([[1.0, -2.0, 3.0, 0.5]])
    mask = straight_through(probs, 0.5)
    torch.testing.assert_close(mask.detach(), torch.tensor([[0.0, 0.0, 1.0, 1.0]]))  # a probability at the threshold
    same = region_masks(probs.detach().reshape(1, 4, 1).expand(1, 4, 4).reshape(1, 16), 4, 4, 4, 0.5).binary
    torch.testing.assert_close(same.reshape(4, 4)[:, 0], mask.detach()[0])             # is in, as inference has it
    assert not torch.allclose(mask.detach(), probs.detach())     # the forward value changes
    (mask * weights).sum().backward()
    torch.testing.assert_close(probs.grad, weights)              # d/dp of (hard + p − sg(p)) = 1
