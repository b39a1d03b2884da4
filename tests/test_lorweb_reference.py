"""LoRWeB against the official maths, written plainly: a released-style basis file must work through our nodes.

Reference: the diffusers FLUX model where every targeted linear computes W x + Σ_n c_n (x A_n) B_n, with
c = softmax(W_q [e_a, e_a', e_b] · Kᵀ / sqrt(d)) computed in the test. Ours: the file loaded and mixed by our nodes,
applied to ComfyUI's own Flux (the same weights) by Apply LoRA to Model.
"""

from __future__ import annotations

import math

import pytest
import torch
from safetensors.torch import save_file

from test_tiny_models import flux_inputs, run_diffusers_flux
from test_lora_comfy import comfy_flux_out, rel_err
from tiny_models import tiny_flux_pair

N, R, D, EMB = 8, 4, 16, 768  # basis entries, rank, key dim, CLIP embedding width (query = 3 x 768)


def targeted_linears(model):
    """Every nn.Linear inside transformer_blocks / single_transformer_blocks (the official target list)."""
    return {name: module for name, module in model.named_modules()
            if isinstance(module, torch.nn.Linear) and name.startswith(("transformer_blocks.", "single_transformer_blocks."))}


def official_basis_file(model, path, seed=0, emb=EMB, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, linear in targeted_linears(model).items():
        base = f"transformer.{name}."
        tensors[base + "lora_A"] = torch.randn(N, linear.in_features, R, generator=gen) * 0.15
        tensors[base + "lora_B"] = torch.randn(N, R, linear.out_features, generator=gen) * 0.15
        tensors[base + "lora_keys"] = torch.randn(N, D, generator=gen)
        tensors[base + "att_lora_to_q.weight"] = torch.randn(D, 3 * emb, generator=gen) * 0.05
    tensors = {k: v.to(dtype) for k, v in tensors.items()}
    save_file(tensors, path)  # the released file has no metadata
    return tensors


def reference_output(model, tensors, embeds, inp):
    """The diffusers model with each targeted layer adding Σ_n c_n (x A_n) B_n (a plain loop over n)."""
    query = torch.cat([embeds["a"], embeds["a_prime"], embeds["b"]])
    handles = []
    for name, linear in targeted_linears(model).items():
        base = f"transformer.{name}."
        A, B = tensors[base + "lora_A"].float(), tensors[base + "lora_B"].float()
        q = tensors[base + "att_lora_to_q.weight"].float() @ query
        c = torch.softmax(tensors[base + "lora_keys"].float() @ q / math.sqrt(D), dim=0)

        def hook(module, args, output, A=A, B=B, c=c):
            x = args[0]
            delta = sum(c[n] * (x @ A[n]) @ B[n] for n in range(N))
            return output + delta

        handles.append(linear.register_forward_hook(hook))
    try:
        with torch.no_grad():
            return run_diffusers_flux(model, inp)
    finally:
        for handle in handles:
            handle.remove()


def fake_analogy(comfy_inproc, embeds):
    analogy_mod = __import__(f"{comfy_inproc.pack.__name__}.analogy_core.analogy", fromlist=["x"])
    info = analogy_mod.EncoderInfo.describe(EMB, 1024, 224, 14, 24)
    return analogy_mod.AnalogyEmbedding(info, {k: v.unsqueeze(0) for k, v in embeds.items()})


@pytest.mark.parametrize("mode", ["merge", "runtime"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])  # the released file is float16
def test_released_layout_basis_matches_the_official_maths(comfy_inproc, tmp_path, monkeypatch, mode, dtype):
    model, patcher = tiny_flux_pair(comfy_inproc.comfy, seed=3)
    assert len(targeted_linears(model)) == 2 * 14 + 2 * 6
    tensors = official_basis_file(model, tmp_path / "lorweb_model.safetensors", dtype=dtype)
    gen = torch.Generator().manual_seed(11)
    embeds = {role: torch.randn(EMB, generator=gen) for role in ("a", "a_prime", "b")}
    inp = flux_inputs(seed=4)

    with torch.no_grad():
        base = run_diffusers_flux(model, inp)
    ref = reference_output(model, tensors, embeds, inp)
    assert rel_err(base, ref) > 0.05, "the basis must visibly change the output"

    lorweb = __import__(f"{comfy_inproc.pack.__name__}.nodes.lorweb", fromlist=["x"])
    monkeypatch.setattr(lorweb.folder_paths, "get_full_path",
                        lambda folder, name: str(tmp_path / name) if folder == "lorweb" else None)
    basis, info = lorweb.LoadLoRABasis().load("lorweb_model.safetensors")
    assert f"N={N} entries of rank {R}, key dim {D}, query dim {3 * EMB}" in info
    lora, heat, _ = lorweb.MixLoRABasis().mix(basis, fake_analogy(comfy_inproc, embeds), 1.0, 0)
    assert lora.ranks == {N * R} and len(lora) == 40
    assert heat.shape == (1, 40 * 2, N * 16, 3) and heat.min() >= 0 and heat.max() <= 1
    patched, report = comfy_inproc.nodes.ApplyLoRAToModel().apply(patcher, lora, 1.0, mode, False)
    assert "matched 40/40" in report
    out = comfy_flux_out(patched, inp)
    assert rel_err(out, ref) <= 1e-4, (rel_err(out, ref), rel_err(out, base))


def test_temperature_and_blend_follow_the_formula(comfy_inproc, tmp_path):
    """Coefficients from the node equal softmax(q Kᵀ / sqrt(d) / T); blending coefficients is linear."""
    basis_mod = __import__(f"{comfy_inproc.pack.__name__}.analogy_core.basis", fromlist=["x"])
    lorweb = __import__(f"{comfy_inproc.pack.__name__}.nodes.lorweb", fromlist=["x"])
    basis = basis_mod.random_basis({"transformer_blocks.0.attn.to_q": (8, 6)}, num_entries=N, rank=2, key_dim=D,
                                   query_dim=3 * EMB, seed=1)
    layer = basis.layers["transformer_blocks.0.attn.to_q"]
    gen = torch.Generator().manual_seed(2)
    e1 = {r: torch.randn(EMB, generator=gen) for r in ("a", "a_prime", "b")}
    e2 = {r: torch.randn(EMB, generator=gen) for r in ("a", "a_prime", "b")}
    q1 = torch.cat([e1["a"], e1["a_prime"], e1["b"]])
    q2 = torch.cat([e2["a"], e2["a_prime"], e2["b"]])

    def coeffs(q, t):
        return torch.softmax((layer.keys @ (layer.to_q @ q)) / math.sqrt(D) / t, dim=0)

    def delta(c):
        return sum(c[n] * (layer.A[n] @ layer.B[n]).t() for n in range(N))  # [out, in]

    mixer = lorweb.MixLoRABasis()
    lora, _, _ = mixer.mix(basis, fake_analogy(comfy_inproc, e1), 0.5, 0)
    torch.testing.assert_close(lora.layers["transformer_blocks.0.attn.to_q"].delta_weight(), delta(coeffs(q1, 0.5)),
                               rtol=1e-5, atol=1e-6)
    assert not torch.allclose(coeffs(q1, 0.5), coeffs(q1, 1.0))
    blended, _, _ = mixer.mix(basis, fake_analogy(comfy_inproc, e1), 1.0, 0, fake_analogy(comfy_inproc, e2), 0.25,
                              "coefficients")
    expected = delta(0.75 * coeffs(q1, 1.0) + 0.25 * coeffs(q2, 1.0))
    torch.testing.assert_close(blended.layers["transformer_blocks.0.attn.to_q"].delta_weight(), expected,
                               rtol=1e-5, atol=1e-6)
    by_query, _, _ = mixer.mix(basis, fake_analogy(comfy_inproc, e1), 1.0, 0, fake_analogy(comfy_inproc, e2), 0.25,
                               "query")
    torch.testing.assert_close(by_query.layers["transformer_blocks.0.attn.to_q"].delta_weight(),
                               delta(coeffs(0.75 * q1 + 0.25 * q2, 1.0)), rtol=1e-5, atol=1e-6)


def test_query_width_mismatch_is_explained(comfy_inproc):
    basis_mod = __import__(f"{comfy_inproc.pack.__name__}.analogy_core.basis", fromlist=["x"])
    analogy_mod = __import__(f"{comfy_inproc.pack.__name__}.analogy_core.analogy", fromlist=["x"])
    lorweb = __import__(f"{comfy_inproc.pack.__name__}.nodes.lorweb", fromlist=["x"])
    basis = basis_mod.random_basis({"transformer_blocks.0.attn.to_q": (8, 6)}, num_entries=4, rank=2, key_dim=8)
    small = analogy_mod.AnalogyEmbedding(analogy_mod.EncoderInfo.describe(512, 768, 224, 16, 12),
                                         {r: torch.randn(1, 512) for r in ("a", "a_prime", "b")})
    with pytest.raises(ValueError, match=r"expects 2304-d queries .* CLIP ViT-B/16 gives 1536-d"):
        lorweb.MixLoRABasis().mix(basis, small, 1.0, 0)
    pair_only = analogy_mod.AnalogyEmbedding(small.encoder, {r: torch.randn(1, 768) for r in ("a", "a_prime")})
    with pytest.raises(ValueError, match="no b image"):
        lorweb.MixLoRABasis().mix(basis, pair_only, 1.0, 0)
    with pytest.raises(ValueError, match="sample 3 is out of range"):
        lorweb.MixLoRABasis().mix(basis, small, 1.0, 3)
