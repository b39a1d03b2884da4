"""LoRA basis files: the official layout, this pack's own output, and clear errors for everything else."""

from __future__ import annotations

import math

import pytest
import torch
from safetensors.torch import save_file

from analogy_core.basis import BasisError, load_basis, random_basis

SHAPES = {"transformer_blocks.0.attn.to_q": (32, 32), "single_transformer_blocks.0.proj_out": (32, 160)}


def official(tmp_path, **changes):
    basis = random_basis(SHAPES, num_entries=6, rank=2, key_dim=8, query_dim=12, seed=0)
    tensors = basis.state_dict()
    tensors.update(changes)
    tensors = {k: v for k, v in tensors.items() if v is not None}
    path = tmp_path / "basis.safetensors"
    save_file(tensors, path)
    return basis, path


def test_official_layout_loads_and_mixes_exactly(tmp_path):
    basis, path = official(tmp_path)
    loaded = load_basis(path)
    assert loaded.family == "flux" and set(loaded.layers) == set(SHAPES)
    assert (loaded.num_entries, loaded.rank, loaded.key_dim, loaded.query_dim) == (6, 2, 8, 12)
    query = torch.randn(2, 12)
    coefficients = loaded.coefficients(query, temperature=2.0)
    layer = loaded.layers["single_transformer_blocks.0.proj_out"]
    expected_c = torch.softmax((query @ layer.to_q.t()) @ layer.keys.t() / math.sqrt(8) / 2.0, dim=-1)
    torch.testing.assert_close(coefficients["single_transformer_blocks.0.proj_out"], expected_c)
    assert torch.allclose(expected_c.sum(-1), torch.ones(2))
    lora = loaded.mix(coefficients, sample=1)
    mixed = lora.layers["single_transformer_blocks.0.proj_out"]
    assert (mixed.rank, mixed.in_features, mixed.out_features) == (12, 160, 32)
    reference = sum(expected_c[1, n] * layer.A[n] @ layer.B[n] for n in range(6)).t()  # Σ c_n A_n B_n as [out, in]
    torch.testing.assert_close(mixed.delta_weight(), reference, rtol=1e-5, atol=1e-6)
    assert lora.source == "mixed" and lora.family == "flux"


def test_own_files_round_trip_with_metadata(tmp_path):
    basis = random_basis(SHAPES, num_entries=4, rank=3, key_dim=8, query_dim=12)
    path = basis.save(tmp_path / "own.safetensors", {"analogy.encoder": "CLIP ViT-L/14", "analogy.step": "100"})
    loaded = load_basis(path)
    assert loaded.metadata["analogy.kind"] == "lorweb_basis" and loaded.metadata["analogy.step"] == "100"
    for name, layer in basis.layers.items():
        assert torch.equal(loaded.layers[name].A, layer.A) and torch.equal(loaded.layers[name].to_q, layer.to_q)


@pytest.mark.parametrize("change, message", [
    ({"transformer.transformer_blocks.0.attn.to_q.lora_keys": None}, "to_q' is missing lora_keys"),
    ({"transformer.transformer_blocks.0.attn.to_q.lora_B": torch.ones(5, 2, 32)}, r"lora_B \(5, 2, 32\) does not fit"),
    ({"transformer.transformer_blocks.0.attn.to_q.lora_keys": torch.ones(6, 9)}, "do not fit N=6"),
    ({"transformer.transformer_blocks.0.attn.to_q.lora_A": torch.full((6, 32, 2), float("nan"))}, "NaN or Inf"),
    ({"transformer.extra.weight": torch.ones(2)}, "not part of a LoRA basis"),
    ({"transformer.single_transformer_blocks.0.proj_out.att_lora_to_q.weight": torch.ones(8, 24)}, "differ from the other layers.*Q=(12|24)"),
    ({"transformer.transformer_blocks.0.attn.to_q.lora_A": torch.ones(6, 32)}, "expected lora_A \\[N, in, r\\]"),
])
def test_broken_bases_get_clear_errors(tmp_path, change, message):
    _, path = official(tmp_path, **change)
    with pytest.raises(BasisError, match=message):
        load_basis(path)


def test_an_ordinary_lora_is_not_a_basis(tmp_path):
    path = tmp_path / "lora.safetensors"
    save_file({"transformer.x.lora_A.weight": torch.ones(2, 4), "transformer.x.lora_B.weight": torch.ones(4, 2)}, path)
    with pytest.raises(BasisError, match="lora.safetensors: this is an ordinary LoRA, not a LoRA basis"):
        load_basis(path)
    other = tmp_path / "model.safetensors"
    save_file({"conv.weight": torch.ones(2, 2)}, other)
    with pytest.raises(BasisError, match="not a LoRA basis"):
        load_basis(other)
