"""The trainable LoRWeB layer: batched rank-N·r maths, gradients only where they belong, same file as inference."""

from __future__ import annotations

import math

import torch
from torch import nn

from analogy_core.basis import load_basis
from analogy_core.lorweb_layer import LoRWeBLinear, export_basis, inject_lorweb, set_query


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
