"""The trainable LoRWeB layer: batched rank-N·r maths, gradients only where they belong, same file as inference."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from analogy_core.lorweb.basis import load_basis
from analogy_core.lorweb.layer import LoRWeBLinear, export_basis, inject_lorweb, set_query


def live_layer(seed=0, n=5, r=3, d=8, q=12, in_f=10, out_f=7):
    torch.manual_seed(seed)
    layer = LoRWeBLinear(nn.Linear(in_f, out_f), num_entries=n, rank=r, key_dim=d, query_dim=q)
    with torch.no_grad():
        layer.lora_B.normal_(0, 0.3)  # trained-looking B (the zero init would hide mistakes)
    return layer


def reference(layer, x, query):
    """Σ_n c_n (x A_n) B_n per sample, as a plain loop (the LoRWeB equation)."""
    out = layer.base(x)
    for s in range(x.shape[0]):
        q = layer.att_lora_to_q.weight @ query[s]
        c = torch.softmax(layer.lora_keys @ q / math.sqrt(layer.key_dim), dim=0)
        out[s] = out[s] + sum(c[n] * (x[s] @ layer.lora_A[n]) @ layer.lora_B[n] for n in range(layer.num_entries))
    return out


def test_batched_forward_equals_the_per_entry_sum():
    layer = live_layer()
    x, query = torch.randn(3, 6, 10), torch.randn(3, 12)
    layer.query = query
    out = layer(x)
    assert (out - layer.base(x)).abs().max() > 1e-2, "the basis must change the output"
    torch.testing.assert_close(out, reference(layer, x, query), rtol=1e-5, atol=1e-6)
    # per-sample coefficients: sample 0 alone gives the same row
    layer.query = query[:1]
    torch.testing.assert_close(layer(x[:1]), out[:1], rtol=1e-5, atol=1e-6)


def test_only_basis_keys_and_projection_get_gradients():
    model = nn.Sequential()
    model.add_module("transformer_blocks", nn.ModuleList([nn.Linear(10, 10), nn.Linear(10, 10)]))
    model.add_module("proj_out", nn.Linear(10, 4))
    model.requires_grad_(False)  # the frozen backbone, as the trainer has it
    layers = inject_lorweb(model, ["transformer_blocks.*"], num_entries=4, rank=2, key_dim=8, query_dim=6)
    assert set(layers) == {"transformer_blocks.0", "transformer_blocks.1"}
    for layer in layers.values():
        with torch.no_grad():
            layer.lora_B.normal_()
    set_query(model, torch.randn(2, 6))
    x = torch.randn(2, 5, 10)
    loss = model.proj_out(model.transformer_blocks[1](model.transformer_blocks[0](x))).square().mean()
    loss.backward()
    trained = {name for name, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert trained == {f"transformer_blocks.{i}.{k}" for i in (0, 1)
                       for k in ("lora_A", "lora_B", "lora_keys", "att_lora_to_q.weight")}
    assert all(not p.requires_grad for n, p in model.named_parameters() if "base" in n or n.startswith("proj_out"))


def test_exported_file_mixes_to_what_the_layer_computes(tmp_path):
    """Training layer and inference path (file -> Mix) agree: the trained file is what the nodes use."""
    model = nn.Module()
    model.transformer_blocks = nn.ModuleList([nn.Linear(10, 7)])
    inject_lorweb(model, ["transformer_blocks.*"], num_entries=5, rank=3, key_dim=8, query_dim=12)
    layer = model.transformer_blocks[0]
    with torch.no_grad():
        layer.lora_B.normal_(0, 0.3)
    path = export_basis(model, metadata={"analogy.step": "7"}).save(tmp_path / "b.safetensors")
    basis = load_basis(path)
    assert basis.metadata["analogy.step"] == "7" and set(basis.layers) == {"transformer_blocks.0"}
    query = torch.randn(1, 12)
    lora = basis.mix(basis.coefficients(query))
    x = torch.randn(1, 4, 10)
    layer.query = query
    expected = layer(x) - layer.base(x)
    mixed = lora.layers["transformer_blocks.0"]
    torch.testing.assert_close(x @ mixed.down.t() @ mixed.up.t(), expected, rtol=1e-5, atol=1e-6)


# -- official initialisation -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("in_f, out_f, n, r", [(3072, 64, 32, 4), (512, 96, 8, 16), (64, 3072, 32, 4),
                                               (1000, 10, 4, 2)])
def test_initialisation_is_the_official_one(in_f, out_f, n, r):
    """kaiming_uniform_(a=√5) on [N, in, r]: fan-in in·r, so U(±1/sqrt(in·r)) with std 1/sqrt(3·in·r); up = 0; keys
    ~ N(0, 1); the query projection keeps nn.Linear's init (U(±1/sqrt(Q)), std 1/sqrt(3·Q))."""
    torch.manual_seed(0)
    query_dim, key_dim = 3 * 96, 128
    layer = LoRWeBLinear(nn.Linear(in_f, out_f), num_entries=n, rank=r, key_dim=key_dim, query_dim=query_dim)
    target = 1 / math.sqrt(3 * in_f * r)
    assert abs(layer.lora_A.std().item() / target - 1) < 0.10, (layer.lora_A.std().item(), target)
    assert layer.lora_A.abs().max().item() <= 1 / math.sqrt(in_f * r) + 1e-7
    assert abs(layer.lora_A.mean().item()) < 0.1 * target
    assert torch.count_nonzero(layer.lora_B) == 0
    assert abs(layer.lora_keys.std().item() - 1) < 0.1 and abs(layer.lora_keys.mean().item()) < 0.1
    to_q = layer.att_lora_to_q.weight
    assert to_q.shape == (key_dim, query_dim) and layer.att_lora_to_q.bias is None
    assert abs(to_q.std().item() * math.sqrt(3 * query_dim) - 1) < 0.10
    assert to_q.abs().max().item() <= 1 / math.sqrt(query_dim) + 1e-7


# -- settings: the layer trains what the inference basis mixes ----------------------------------------------------------
def plain_layer_output(layer, x, query, heads, softmax, mixing):
    """W x + Σ_n c_n (x A_n) B_n with the official mixing written out per head (independent of the code)."""
    out = layer.base(x)
    d = layer.key_dim
    hd = d // heads
    for s in range(x.shape[0]):
        q = layer.att_lora_to_q.weight @ query[s]
        per_head = []
        for h in range(heads):
            scores = layer.lora_keys[:, h * hd:(h + 1) * hd] @ q[h * hd:(h + 1) * hd] / math.sqrt(hd)
            per_head.append(torch.softmax(scores, dim=0) if softmax else torch.tanh(scores))
        total = torch.stack(per_head).sum(0)
        c = total / heads if mixing == "mean" else total.clamp(0.0 if softmax else -1.0, 1.0)
        out[s] = out[s] + sum(c[n] * (x[s] @ layer.lora_A[n]) @ layer.lora_B[n] for n in range(layer.num_entries))
    return out


@pytest.mark.parametrize("heads, softmax, mixing, mode", [(2, False, "mean", "a'-a"), (1, False, "sum", "cat-aa'b"),
                                                          (4, True, "sum", "a'-a+b"), (2, True, "mean", "cat-aa'b")])
def test_layer_forward_follows_its_settings_and_equals_the_inference_mix(tmp_path, heads, softmax, mixing, mode):
    from analogy_core.analogy import AnalogyEmbedding, EncoderInfo
    from analogy_core.lorweb.settings import LoRWeBSettings

    info = EncoderInfo.describe(4, 8, 224, 14, 2)
    settings = LoRWeBSettings(lora_heads=heads, lora_softmax=softmax, mixing_coeffs_type=mixing, query_mode=mode,
                              source="trainer").for_encoder(info, "tiny-clip")
    model = nn.Module()
    model.transformer_blocks = nn.ModuleList([nn.Linear(10, 7)])
    inject_lorweb(model, ["transformer_blocks.*"], num_entries=5, rank=3, key_dim=8,
                  query_dim=settings.query_width(info.embed_dim), settings=settings)
    layer = model.transformer_blocks[0]
    with torch.no_grad():
        layer.lora_B.normal_(0, 0.3)
        layer.att_lora_to_q.weight.mul_(4)  # scores well away from 0, where softmax/tanh/mean/sum differ most
    gen = torch.Generator().manual_seed(1)
    embedding = AnalogyEmbedding(info, {r: torch.randn(2, 4, generator=gen) for r in ("a", "a_prime", "b")})
    query = settings.query(embedding)
    x = torch.randn(2, 6, 10)
    set_query(model, query)
    out = layer(x)
    expected = plain_layer_output(layer, x, query, heads, softmax, mixing)
    official = plain_layer_output(layer, x, query, 1, True, "mean")
    assert (expected - official).abs().max() > 1e-2, "the settings must change the output"
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)

    basis = load_basis(export_basis(model).save(tmp_path / "b.safetensors"))
    assert basis.settings == settings
    for s in range(2):
        mixed = basis.mix(basis.coefficients(query), sample=s).layers["transformer_blocks.0"]
        torch.testing.assert_close(layer.base(x[s]) + x[s] @ mixed.down.t() @ mixed.up.t(), out[s],
                                   rtol=1e-5, atol=1e-5)
