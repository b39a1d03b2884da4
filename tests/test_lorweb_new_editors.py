"""LoRWeB on the editors users run today: a basis over every linear of FLUX.2's and Qwen-Image's transformer blocks,
mixed by Mix LoRA Basis and applied by Apply LoRA to Model on ComfyUI's own Flux2 / QwenImage (tiny twins, same
weights as the diffusers models; no downloads).

Reference: the diffusers model with the mixed update merged by hand into each targeted weight,
W + Σ_n c_n (A_n B_n)ᵀ, c = softmax(W_q [e_a, e_a', e_b] · Kᵀ / sqrt(d)) computed in the test. Every comparison first
checks that the basis changes the output.
"""

from __future__ import annotations

import copy

import pytest
import torch
from safetensors.torch import save_file
from test_lora_comfy import rel_err
from test_lora_new_editors import RUNNERS, comfy_out
from test_lorweb_reference import EMB, fake_analogy, plain_coefficients
from tiny_models import tiny_flux2_pair, tiny_qwen_pair

N, R, D = 6, 3, 16
BLOCKS = ("transformer_blocks.", "single_transformer_blocks.")
PAIRS = {"flux2": tiny_flux2_pair, "qwen_image": tiny_qwen_pair}


def block_linears(model) -> dict[str, torch.nn.Linear]:
    """Every nn.Linear inside the transformer blocks, read off the diffusers model itself."""
    return {name: module for name, module in model.named_modules()
            if isinstance(module, torch.nn.Linear) and name.startswith(BLOCKS)}


def basis_tensors(model, seed: int) -> dict[str, torch.Tensor]:
    """A basis in the released file's layout over every block linear of ``model`` (no header)."""
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, linear in block_linears(model).items():
        base = f"transformer.{name}."
        tensors[base + "lora_A"] = torch.randn(N, linear.in_features, R, generator=gen) * 0.2
        tensors[base + "lora_B"] = torch.randn(N, R, linear.out_features, generator=gen) * 0.2
        tensors[base + "lora_keys"] = torch.randn(N, D, generator=gen)
        tensors[base + "att_lora_to_q.weight"] = torch.randn(D, 3 * EMB, generator=gen) * 0.05
    return tensors


def merged_by_hand(model, tensors: dict[str, torch.Tensor], query: torch.Tensor):
    """A copy of the diffusers model with W += Σ_n c_n (A_n B_n)ᵀ in every targeted linear."""
    merged = copy.deepcopy(model)
    with torch.no_grad():
        for name, linear in block_linears(merged).items():
            base = f"transformer.{name}."
            A, B = tensors[base + "lora_A"].double(), tensors[base + "lora_B"].double()
            c = plain_coefficients(tensors[base + "att_lora_to_q.weight"], tensors[base + "lora_keys"], query)
            delta = sum(c[n].double() * (A[n] @ B[n]).t() for n in range(N))
            linear.weight += delta.float()
    return merged


def lorweb_nodes(comfy_inproc):
    return __import__(f"{comfy_inproc.pack.__name__}.nodes.lorweb", fromlist=["x"])


def core(comfy_inproc, module: str):
    return __import__(f"{comfy_inproc.pack.__name__}.analogy_core.{module}", fromlist=["x"])


@pytest.fixture(scope="module", params=["flux2", "qwen_image"])
def editor(request, comfy_inproc, tmp_path_factory):
    """(family, diffusers model, ComfyUI patcher, basis tensors, basis file, analogy embeddings)."""
    family = request.param
    model, patcher = PAIRS[family](comfy_inproc.comfy, seed=51)
    tensors = basis_tensors(model, seed=52)
    path = tmp_path_factory.mktemp(family) / "basis.safetensors"
    save_file(tensors, str(path))
    gen = torch.Generator().manual_seed(53)
    embeds = {role: torch.randn(EMB, generator=gen) for role in ("a", "a_prime", "b")}
    return family, model, patcher, tensors, path, embeds


def load(comfy_inproc, monkeypatch, path):
    nodes = lorweb_nodes(comfy_inproc)
    monkeypatch.setattr(nodes.folder_paths, "get_full_path",
                        lambda folder, name: str(path.parent / name) if folder == "lorweb" else None)
    return nodes.LoadLoRABasis().load(path.name)


def test_the_basis_targets_every_linear_of_the_blocks(comfy_inproc, editor):
    """The pack's target list, the trainer's injection and the diffusers model agree on what a basis covers."""
    family, model, *_ = editor
    layouts, basis_mod = core(comfy_inproc, "layouts"), core(comfy_inproc, "lorweb.basis")
    layer_mod = core(comfy_inproc, "lorweb.layer")
    linears = block_linears(model)
    targets = basis_mod.basis_targets(layouts.layout_of_diffusers_model(model))
    assert targets == {name: tuple(m.weight.shape) for name, m in linears.items()}
    injected = layer_mod.inject_lorweb(copy.deepcopy(model), layer_mod.DEFAULT_TARGETS, num_entries=2, rank=1,
                                       key_dim=4, query_dim=12)
    assert set(injected) == set(linears)
    per_block = {"flux2": (12, 2), "qwen_image": (14, 0)}[family]  # linears of one double / single block
    assert len(linears) == 2 * per_block[0] + 2 * per_block[1]


@pytest.mark.parametrize("mode", ["merge", "runtime"])
def test_mixed_basis_applied_equals_the_hand_merged_diffusers_model(comfy_inproc, monkeypatch, editor, mode):
    family, model, patcher, tensors, path, embeds = editor
    inp = RUNNERS[family][0](seed=5)
    query = torch.cat([embeds["a"], embeds["a_prime"], embeds["b"]])
    with torch.no_grad():
        base = RUNNERS[family][1](model, inp)
        ref = RUNNERS[family][1](merged_by_hand(model, tensors, query), inp)
    assert rel_err(base, ref) > 0.05, "the mixed basis must visibly change the output"

    basis, info = load(comfy_inproc, monkeypatch, path)
    assert basis.family == family, "the family comes from the layers' names and shapes (the file has no header)"
    assert f"LoRA basis for {family}: {len(block_linears(model))} layers" in info
    lora, _, _ = lorweb_nodes(comfy_inproc).MixLoRABasis().mix(basis, fake_analogy(comfy_inproc, embeds), 1.0, 0)
    assert lora.family == family and lora.ranks == {N * R}
    patched, report = comfy_inproc.nodes.ApplyLoRAToModel().apply(patcher, lora, 1.0, mode, False)
    assert f"matched {len(lora)}/{len(lora)} LoRA layers of the {family} model" in report
    out = comfy_out(patched, family, inp)
    assert rel_err(out, ref) <= 1e-5, (rel_err(out, ref), rel_err(out, base))
    assert rel_err(comfy_out(patcher, family, inp), base) <= 1e-5, "the input model is untouched"


def test_saved_mix_is_mapped_by_comfyuis_stock_loader(comfy_inproc, monkeypatch, tmp_path, editor):
    """Save LoRA's file of the mix uses key names ComfyUI's stock LoraLoader maps onto its Flux2 / QwenImage model:
    every layer lands, and the result equals the hand-merged reference."""
    import comfy.sd
    import comfy.utils

    family, model, patcher, tensors, path, embeds = editor
    basis, _ = load(comfy_inproc, monkeypatch, path)
    lora, _, _ = lorweb_nodes(comfy_inproc).MixLoRABasis().mix(basis, fake_analogy(comfy_inproc, embeds), 1.0, 0)
    saved = core(comfy_inproc, "lora_io").save_lora_file(lora, tmp_path / "mixed.safetensors", "auto")
    state = comfy.utils.load_torch_file(str(saved), safe_load=True)
    stock, _ = comfy.sd.load_lora_for_models(patcher, None, state, 1.0, 0.0)
    written = sum(k.endswith((".lora_A.weight", ".lora_down.weight")) for k in state)
    assert len(stock.patches) == written, "the stock loader maps every key of the file"
    inp = RUNNERS[family][0](seed=6)
    query = torch.cat([embeds["a"], embeds["a_prime"], embeds["b"]])
    with torch.no_grad():
        ref = RUNNERS[family][1](merged_by_hand(model, tensors, query), inp)
        base = RUNNERS[family][1](model, inp)
    assert rel_err(base, ref) > 0.05
    assert rel_err(comfy_out(stock, family, inp), ref) <= 1e-5


def test_a_basis_for_another_family_is_refused_by_name(comfy_inproc, monkeypatch, tmp_path, editor):
    family, _, _, tensors, path, embeds = editor
    other = "qwen_image" if family == "flux2" else "flux2"
    # a header that contradicts the layers: refused at load, naming both families
    lying = tmp_path / "lying.safetensors"
    save_file(tensors, str(lying), {"analogy.family": other})
    with pytest.raises(ValueError, match=rf"the header says this basis is for .* \({other}\) but its layers are "
                                         rf".*\({family}; e\.g\. "):
        load(comfy_inproc, monkeypatch, lying)
    # its mix on the other family's model: refused at Apply by name
    basis, _ = load(comfy_inproc, monkeypatch, path)
    lora, _, _ = lorweb_nodes(comfy_inproc).MixLoRABasis().mix(basis, fake_analogy(comfy_inproc, embeds), 1.0, 0)
    _, other_patcher = PAIRS[other](comfy_inproc.comfy, seed=54)
    with pytest.raises(ValueError, match=f"this LoRA is for {family} but the model is {other}"):
        comfy_inproc.nodes.ApplyLoRAToModel().apply(other_patcher, lora, 1.0, "merge", False)


def test_a_basis_of_shared_layers_fits_every_family_that_has_them(comfy_inproc, editor):
    """Attention q of a double block exists in FLUX.1, FLUX.2 and Qwen-Image: such a basis (no header) fits all,
    and its mix applies to either new editor."""
    _, _, patcher, tensors, *_ = editor
    basis_mod = core(comfy_inproc, "lorweb.basis")
    key = "transformer.transformer_blocks.0.attn.to_q."
    shared = basis_mod.basis_from_state_dict({k: v for k, v in tensors.items() if k.startswith(key)})
    assert set(shared.metadata["analogy.fits"].split(",")) == {"flux", "flux2", "qwen_image"}
    lora = shared.mix({p: torch.full((N,), 1.0 / N) for p in shared.layers})
    assert "matched 1/1" in comfy_inproc.nodes.ApplyLoRAToModel().apply(patcher, lora, 1.0, "merge", False)[1]
