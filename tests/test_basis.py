"""LoRA basis files: the official layout, this pack's own output, and clear errors for everything else."""

from __future__ import annotations

import math

import pytest
import torch
from safetensors.torch import save_file

from analogy_core.lorweb.basis import BasisError, load_basis, random_basis

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
    ({"transformer.transformer_blocks.0.attn.to_q.lora_B": torch.ones(6, 3, 32)}, r"lora_B \(6, 3, 32\) does not fit"),
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


# -- mixed as trained: tanh, several heads, summed heads, other query modes -------------------------------------------
def plain_coefficients(query, to_q, keys, heads, softmax, mixing, temperature=1.0):
    """The official mixing written out per sample, head and entry (independent of the code under test)."""
    n, d = keys.shape
    head_dim = d // heads
    out = torch.zeros(query.shape[0], n)
    for s in range(query.shape[0]):
        q = [sum(to_q[j, i] * query[s, i] for i in range(query.shape[1])) for j in range(d)]
        per_head = []
        for h in range(heads):
            cols = range(h * head_dim, (h + 1) * head_dim)
            scores = [sum(float(q[j]) * float(keys[m, j]) for j in cols) / math.sqrt(head_dim) / temperature
                      for m in range(n)]
            if softmax:
                top = max(scores)
                exps = [math.exp(v - top) for v in scores]
                per_head.append([v / sum(exps) for v in exps])
            else:
                per_head.append([math.tanh(v) for v in scores])
        for m in range(n):
            total = sum(row[m] for row in per_head)
            out[s, m] = total / heads if mixing == "mean" else min(1.0, max(0.0 if softmax else -1.0, total))
    return out


@pytest.mark.parametrize("heads, softmax, mixing", [(1, False, "mean"), (2, True, "mean"), (2, False, "sum"),
                                                    (4, True, "sum"), (2, False, "mean")])
def test_trained_settings_are_mixed_as_the_official_equations(tmp_path, heads, softmax, mixing):
    from analogy_core.lorweb.settings import LoRWeBSettings

    settings = LoRWeBSettings(lora_heads=heads, lora_softmax=softmax, mixing_coeffs_type=mixing, query_mode="a'-a")
    basis = random_basis(SHAPES, num_entries=6, rank=2, key_dim=8, query_dim=4, seed=3).with_settings(settings)
    path = basis.save(tmp_path / "trained.safetensors")
    loaded = load_basis(path)
    assert loaded.settings == settings  # recorded in the file, used without being told
    query = torch.randn(2, 4) * 3
    layer = loaded.layers["transformer_blocks.0.attn.to_q"]
    ours = loaded.coefficients(query, temperature=0.7)["transformer_blocks.0.attn.to_q"]
    expected = plain_coefficients(query, layer.to_q, layer.keys, heads, softmax, mixing, 0.7)
    official = plain_coefficients(query, layer.to_q, layer.keys, 1, True, "mean", 0.7)
    assert (expected - official).abs().max() > 0.05, "the setting must change the coefficients"
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-6)
    if not softmax:
        assert (ours < 0).any(), "tanh coefficients can be negative"
    lora = loaded.mix(loaded.coefficients(query), sample=1)
    c = plain_coefficients(query, layer.to_q, layer.keys, heads, softmax, mixing)[1]
    reference = sum(c[n] * layer.A[n] @ layer.B[n] for n in range(6)).t()
    torch.testing.assert_close(lora.layers["transformer_blocks.0.attn.to_q"].delta_weight(), reference,
                               rtol=1e-5, atol=1e-6)


def test_settings_that_do_not_fit_the_basis_are_refused():
    from analogy_core.lorweb.settings import LoRWeBSettings

    basis = random_basis(SHAPES, num_entries=6, rank=2, key_dim=8, query_dim=12)
    with pytest.raises(BasisError, match="lora_heads=3 does not divide the basis' key width 8"):
        basis.with_settings(LoRWeBSettings(lora_heads=3))
    with pytest.raises(BasisError, match="query_mode cat-aa'b needs a query width divisible by 3; the basis has 10"):
        random_basis(SHAPES, num_entries=6, rank=2, key_dim=8, query_dim=10).with_settings(LoRWeBSettings())
    with pytest.raises(BasisError, match=r"expects 12-d queries \(query mode cat-aa'b: 3 x 4-d image embeddings\) "
                                         r"but the query gives 9-d"):
        basis.coefficients(torch.randn(1, 9))
