"""LoRWeB against the official maths, written plainly: a released-style basis file must work through our nodes.

Reference: the diffusers FLUX model where every targeted linear computes W x + Σ_n c_n (x A_n) B_n, with
c = softmax(W_q [e_a, e_a', e_b] · Kᵀ / sqrt(d)) computed in the test (or, for a basis whose config.yaml says so,
tanh / several heads / summed heads / the a'-a query, written out per head). Ours: the file loaded (with its
config.yaml) and mixed by our nodes, applied to ComfyUI's own Flux (the same weights) by Apply LoRA to Model.
"""

from __future__ import annotations

import math
import os
import textwrap

import pytest
import torch
from safetensors.torch import save_file
from test_lora_comfy import comfy_flux_out, rel_err
from test_tiny_models import flux_inputs, run_diffusers_flux
from tiny_models import tiny_flux_pair

N, R, D, EMB = 8, 4, 16, 768  # basis entries, rank, key dim, CLIP embedding width (query = 3 x 768)


def targeted_linears(model):
    """Every nn.Linear inside transformer_blocks / single_transformer_blocks (the official target list)."""
    return {name: module for name, module in model.named_modules()
            if isinstance(module, torch.nn.Linear) and name.startswith(("transformer_blocks.", "single_transformer_blocks."))}


def official_basis_file(model, path, seed=0, emb=EMB, dtype=torch.float32, query_factor=3):
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, linear in targeted_linears(model).items():
        base = f"transformer.{name}."
        tensors[base + "lora_A"] = torch.randn(N, linear.in_features, R, generator=gen) * 0.15
        tensors[base + "lora_B"] = torch.randn(N, R, linear.out_features, generator=gen) * 0.15
        tensors[base + "lora_keys"] = torch.randn(N, D, generator=gen)
        tensors[base + "att_lora_to_q.weight"] = torch.randn(D, query_factor * emb, generator=gen) * 0.05
    tensors = {k: v.to(dtype) for k, v in tensors.items()}
    save_file(tensors, path)  # the released file has no metadata
    return tensors


def plain_coefficients(to_q, keys, query, heads=1, softmax=True, mixing="mean"):
    """The official mixing, head by head: scores q_h·K_h,n / sqrt(d/H), softmax or tanh, mean or clamped sum."""
    q = to_q.float() @ query
    head_dim = D // heads
    per_head = []
    for h in range(heads):
        part = slice(h * head_dim, (h + 1) * head_dim)
        scores = keys[:, part].float() @ q[part] / math.sqrt(head_dim)
        per_head.append(torch.softmax(scores, dim=0) if softmax else torch.tanh(scores))
    total = sum(per_head)
    return total / heads if mixing == "mean" else total.clamp(0.0 if softmax else -1.0, 1.0)


def reference_output(model, tensors, embeds, inp, query=None, **mixing):
    """The diffusers model with each targeted layer adding Σ_n c_n (x A_n) B_n (a plain loop over n)."""
    query = torch.cat([embeds["a"], embeds["a_prime"], embeds["b"]]) if query is None else query
    handles = []
    for name, linear in targeted_linears(model).items():
        base = f"transformer.{name}."
        A, B = tensors[base + "lora_A"].float(), tensors[base + "lora_B"].float()
        c = plain_coefficients(tensors[base + "att_lora_to_q.weight"], tensors[base + "lora_keys"], query, **mixing)

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


def fake_analogy(comfy_inproc, embeds, image_size=224, family="clip", hidden=1024, patch=14, layers=24):
    """An ANALOGY as Encode Analogy makes it (CLIP ViT-L/14 unless told otherwise), with given embeddings."""
    analogy_mod = __import__(f"{comfy_inproc.pack.__name__}.analogy_core.analogy", fromlist=["x"])
    info = analogy_mod.EncoderInfo.describe(EMB, hidden, image_size, patch, layers, family)
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
    basis_mod = __import__(f"{comfy_inproc.pack.__name__}.analogy_core.lorweb.basis", fromlist=["x"])
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
    basis_mod = __import__(f"{comfy_inproc.pack.__name__}.analogy_core.lorweb.basis", fromlist=["x"])
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


# -- a basis trained with other settings: config.yaml beside, one folder up, or given ----------------------------------
def official_config(**network_kwargs) -> str:
    """The official training config (as run.py saves it) with these network_kwargs."""
    kwargs = {"loras_num": N, "lora_keys_dim": D, "external_query": True, "pooling_type": "avg",
              "query_projection_type": "linear", "external_query_model": "openai/clip-vit-large-patch14"}
    kwargs.update(network_kwargs)
    body = "\n".join(f"          {k}: {v!r}" if isinstance(v, str) else f"          {k}: {str(v).lower()}"
                     for k, v in kwargs.items())
    return textwrap.dedent(f"""\
        job: extension
        config:
          name: lorweb_model
          process:
            - type: sd_trainer
              network:
                type: attlora
                linear: {R}
                linear_alpha: {R}
                network_kwargs:
        """) + body + "\n"


TANH_TWO_HEADS_A_PRIME_MINUS_A = dict(lora_heads=2, lora_softmax=False, mixing_coeffs_type="mean",
                                      query_mode="ca'-ca")


def released_layout(tmp_path, model, monkeypatch, lorweb, config_text=None, where="one_up", **basis_kwargs):
    """lorweb_model/lorweb_model.safetensors with its config.yaml one folder up (the release) or beside it."""
    folder = tmp_path / "lorweb_model"
    folder.mkdir(exist_ok=True)
    tensors = official_basis_file(model, folder / "lorweb_model.safetensors", **basis_kwargs)
    if config_text is not None:
        (tmp_path if where == "one_up" else folder).joinpath("config.yaml").write_text(config_text)
    monkeypatch.setattr(lorweb.folder_paths, "get_full_path",
                        lambda kind, name: str(folder / name) if kind == "lorweb" else None)
    return tensors


def test_basis_trained_with_tanh_two_heads_and_a_prime_minus_a_matches_the_official_maths(
        comfy_inproc, tmp_path, monkeypatch):
    model, patcher = tiny_flux_pair(comfy_inproc.comfy, seed=3)
    lorweb = __import__(f"{comfy_inproc.pack.__name__}.nodes.lorweb", fromlist=["x"])
    tensors = released_layout(tmp_path, model, monkeypatch, lorweb, official_config(**TANH_TWO_HEADS_A_PRIME_MINUS_A),
                              seed=7, query_factor=1)
    gen = torch.Generator().manual_seed(12)
    embeds = {role: torch.randn(EMB, generator=gen) * 4 for role in ("a", "a_prime", "b")}
    query = embeds["a_prime"] - embeds["a"]
    inp = flux_inputs(seed=4)
    ref = reference_output(model, tensors, embeds, inp, query, heads=2, softmax=False, mixing="mean")
    as_default = reference_output(model, tensors, embeds, inp, query)  # the same file mixed like the release
    assert rel_err(as_default, ref) > 0.05, "the settings must visibly change the output"

    basis, info = lorweb.LoadLoRABasis().load("lorweb_model.safetensors")
    assert "tanh, 2 heads, mean; query ca'-ca from CLIP ViT-L/14" in info and "config.yaml" in info
    lora, _, _ = lorweb.MixLoRABasis().mix(basis, fake_analogy(comfy_inproc, embeds), 1.0, 0)
    patched, _ = comfy_inproc.nodes.ApplyLoRAToModel().apply(patcher, lora, 1.0, "merge", False)
    out = comfy_flux_out(patched, inp)
    assert rel_err(out, ref) <= 1e-4, (rel_err(out, ref), rel_err(out, as_default))


@pytest.mark.parametrize("where", ["beside", "one_up", "explicit"])
def test_config_yaml_is_found_or_given(comfy_inproc, tmp_path, monkeypatch, where):
    """The node reads config.yaml beside the basis, one folder up, or at config_path; the mix follows it exactly."""
    lorweb = __import__(f"{comfy_inproc.pack.__name__}.nodes.lorweb", fromlist=["x"])
    model, _ = tiny_flux_pair(comfy_inproc.comfy, seed=3)
    settings = dict(lora_heads=4, lora_softmax=True, mixing_coeffs_type="sum", query_mode="a'-a+b")
    tensors = released_layout(tmp_path, model, monkeypatch, lorweb,
                              None if where == "explicit" else official_config(**settings), where=where, query_factor=1)
    config_path = ""
    if where == "explicit":
        config_path = str(tmp_path / "configs" / "my run.yaml")
        (tmp_path / "configs").mkdir()
        (tmp_path / "configs" / "my run.yaml").write_text(official_config(**settings))
    basis, info = lorweb.LoadLoRABasis().load("lorweb_model.safetensors", config_path)
    assert "softmax, 4 heads, sum; query ca'-ca+cb" in info
    gen = torch.Generator().manual_seed(3)
    embeds = {role: torch.randn(EMB, generator=gen) * 4 for role in ("a", "a_prime", "b")}
    lora, _, _ = lorweb.MixLoRABasis().mix(basis, fake_analogy(comfy_inproc, embeds), 1.0, 0)
    name = "single_transformer_blocks.1.proj_out"
    base = f"transformer.{name}."
    to_q, keys = tensors[base + "att_lora_to_q.weight"], tensors[base + "lora_keys"]
    query = embeds["a_prime"] - embeds["a"] + embeds["b"]
    c = plain_coefficients(to_q, keys, query, heads=4, softmax=True, mixing="sum")
    assert (c - plain_coefficients(to_q, keys, query)).abs().max() > 0.05
    expected = sum(c[n] * tensors[base + "lora_A"][n] @ tensors[base + "lora_B"][n] for n in range(N)).t()
    torch.testing.assert_close(lora.layers[name].delta_weight(), expected, rtol=1e-5, atol=1e-6)
    # without any config.yaml the same file is mixed like the release (and here refused: its queries are 768-d)
    if where != "explicit":
        stamp = lorweb.LoadLoRABasis.IS_CHANGED("lorweb_model.safetensors")
        assert "config.yaml" in stamp  # ComfyUI re-runs the loader when the config changes
        (tmp_path / ("config.yaml" if where == "one_up" else "lorweb_model/config.yaml")).unlink()
        assert lorweb.LoadLoRABasis.IS_CHANGED("lorweb_model.safetensors") != stamp
        basis, info = lorweb.LoadLoRABasis().load("lorweb_model.safetensors")
        assert "official defaults" in info
        with pytest.raises(ValueError, match=r"expects 768-d queries \(query mode cat-aa'b: 3 x 256-d"):
            lorweb.MixLoRABasis().mix(basis, fake_analogy(comfy_inproc, embeds), 1.0, 0)


def test_mismatched_encoder_family_is_refused(comfy_inproc, tmp_path, monkeypatch):
    """A 768-d SigLIP2 basis has CLIP ViT-L/14's query width: only the recorded encoder tells them apart."""
    lorweb = __import__(f"{comfy_inproc.pack.__name__}.nodes.lorweb", fromlist=["x"])
    basis_mod = __import__(f"{comfy_inproc.pack.__name__}.analogy_core.lorweb.basis", fromlist=["x"])
    model, _ = tiny_flux_pair(comfy_inproc.comfy, seed=3)
    released_layout(tmp_path, model, monkeypatch, lorweb,
                    official_config(external_query_model="google/siglip2-base-patch16-224"), where="beside")
    siglip2_basis, info = lorweb.LoadLoRABasis().load("lorweb_model.safetensors")
    assert "SigLIP2 ViT-B/16" in info and siglip2_basis.query_dim == 3 * EMB
    gen = torch.Generator().manual_seed(1)
    embeds = {role: torch.randn(EMB, generator=gen) for role in ("a", "a_prime", "b")}
    clip_l = fake_analogy(comfy_inproc, embeds)
    assert clip_l.query().shape[-1] == siglip2_basis.query_dim  # same width: the family is what differs
    with pytest.raises(ValueError, match=r"trained with queries from SigLIP2 ViT-B/16 \(family siglip2; "
                                         r".* comes from CLIP ViT-L/14 \(family clip\)"):
        lorweb.MixLoRABasis().mix(siglip2_basis, clip_l, 1.0, 0)

    # a basis with the release's settings refuses a SigLIP2 analogy of the same width ...
    clip_basis = basis_mod.random_basis({"transformer_blocks.0.attn.to_q": (8, 6)}, num_entries=4, rank=2,
                                        key_dim=8, query_dim=3 * EMB)
    siglip2 = fake_analogy(comfy_inproc, embeds, family="siglip2", hidden=768, patch=16, layers=12)
    assert siglip2.encoder.name == "SigLIP2 ViT-B/16"
    with pytest.raises(ValueError, match=r"queries from a CLIP model .* comes from SigLIP2 ViT-B/16"):
        lorweb.MixLoRABasis().mix(clip_basis, siglip2, 1.0, 0)
    # ... also as the second analogy of a blend
    for mode in ("coefficients", "query"):
        with pytest.raises(ValueError, match="comes from SigLIP2 ViT-B/16"):
            lorweb.MixLoRABasis().mix(clip_basis, clip_l, 1.0, 0, siglip2, 0.5, mode)
    lorweb.MixLoRABasis().mix(clip_basis, clip_l, 1.0, 0)  # the right family passes

    # a config.yaml naming the model binds the exact encoder: ViT-L/14@336 is also 768-d CLIP
    released_layout(tmp_path, model, monkeypatch, lorweb, official_config(), where="beside")
    named_basis, _ = lorweb.LoadLoRABasis().load("lorweb_model.safetensors")
    with pytest.raises(ValueError, match=r"queries from CLIP ViT-L/14 .* comes from CLIP ViT-L/14@336"):
        lorweb.MixLoRABasis().mix(named_basis, fake_analogy(comfy_inproc, embeds, image_size=336), 1.0, 0)
    lorweb.MixLoRABasis().mix(named_basis, clip_l, 1.0, 0)


def test_basis_and_lora_lists(comfy_inproc, tmp_path, monkeypatch):
    """Load LoRA Basis lists its folder plus the bases in models/loras; Load LoRA lists only .safetensors files."""
    from safetensors.torch import save_file

    lorweb = __import__(f"{comfy_inproc.pack.__name__}.nodes.lorweb", fromlist=["x"])
    basis_mod = __import__(f"{comfy_inproc.pack.__name__}.analogy_core.lorweb.basis", fromlist=["x"])
    folders = {"lorweb": tmp_path / "lorweb", "loras": tmp_path / "loras"}
    for folder in folders.values():
        (folder / "sub").mkdir(parents=True)
    basis = basis_mod.random_basis({"transformer_blocks.0.attn.to_q": (8, 6)}, num_entries=4, rank=2, key_dim=8,
                                   query_dim=12)
    save_file(basis.state_dict(), folders["lorweb"] / "released.safetensors")
    save_file(basis.state_dict(), folders["loras"] / "sub" / "released_copy.safetensors")
    basis.save(folders["loras"] / "own_basis.safetensors")
    save_file({"transformer.x.lora_A.weight": torch.ones(2, 4), "transformer.x.lora_B.weight": torch.ones(4, 2)},
              folders["loras"] / "style.safetensors")
    (folders["loras"] / "old.ckpt").write_bytes(b"pickle")
    (folders["loras"] / "notes.pt").write_bytes(b"pickle")

    def names(kind):
        root = folders[kind]
        return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())

    monkeypatch.setattr(lorweb.folder_paths, "get_filename_list", names)
    monkeypatch.setattr(lorweb.folder_paths, "get_full_path",
                        lambda kind, name: str(folders[kind] / name) if (folders[kind] / name).is_file() else None)
    listed = lorweb.LoadLoRABasis.INPUT_TYPES()["required"]["basis_name"][0]
    assert listed == ["own_basis.safetensors", "released.safetensors", "sub/released_copy.safetensors"]
    loras = comfy_inproc.nodes.LoadLoRA.INPUT_TYPES()["required"]["lora_name"][0]
    assert loras == ["own_basis.safetensors", "style.safetensors", "sub/released_copy.safetensors"]
    # a basis found only in models/loras loads (the fallback of the folder lookup)
    loaded, info = lorweb.LoadLoRABasis().load("own_basis.safetensors")
    _, note = lorweb.load_basis_with_settings(str(folders["loras"] / "own_basis.safetensors"), None)
    assert loaded.num_entries == 4 and note and info == (f"{loaded.summary()}\n{note}\nrecords no encoder "
                                                          "fingerprint (the encoder's weights are not checked)")
    # IS_CHANGED: the explicit config.yaml is part of the key, and a newer basis file changes it
    config = tmp_path / "explicit.yaml"
    config.write_text("rank: 2\n")
    key = lorweb.LoadLoRABasis.IS_CHANGED("released.safetensors", str(config))
    assert str(config) in key and str(folders["lorweb"] / "released.safetensors") in key
    stamp = (folders["lorweb"] / "released.safetensors").stat().st_mtime
    os.utime(folders["lorweb"] / "released.safetensors", (stamp + 10, stamp + 10))
    assert lorweb.LoadLoRABasis.IS_CHANGED("released.safetensors", str(config)) != key
