"""Edit Transfer LoRA files: the released layout and the trainer's output, read alike by every loader.

- The released ``edit_transfer.safetensors`` (CUC-MIPG/EditTransfer): rank 16, PEFT keys
  ``transformer.<path>.lora_A.weight`` / ``.lora_B.weight`` over every linear of FLUX's double and single blocks
  (494 for FLUX.1-dev), no alpha, no header metadata. A fixture in exactly that layout, on a tiny FLUX, loads with
  the pack's Load LoRA + Apply LoRA and with ComfyUI's stock loader (comfy.sd.load_lora_for_models, what
  LoraLoader / LoraLoaderModelOnly call) to the same model output, which is also what diffusers computes.
- The trainer's output (export_lora + save_lora_file, here with alpha != rank to make the scale matter): ComfyUI's
  stock loader, diffusers and Load LoRA reproduce the trained peft model's output.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from test_lora_comfy import comfy_flux_out, rel_err
from test_tiny_models import flux_inputs, run_diffusers_flux
from tiny_models import tiny_flux_pair

RANK = 16


def released_layout_file(diffusers_model, path, seed: int = 0, scale: float = 0.1):
    """A LoRA in the released file's exact layout (keys, rank, no alpha, no metadata) for ``diffusers_model``."""
    from analogy_core.edit_transfer import edit_transfer_targets
    from analogy_core.layouts import layout_of_diffusers_model

    layout = layout_of_diffusers_model(diffusers_model)
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for target in edit_transfer_targets(layout):
        out_features, in_features = layout.shapes[target]
        tensors[f"transformer.{target}.lora_A.weight"] = torch.randn(RANK, in_features, generator=gen) * scale
        tensors[f"transformer.{target}.lora_B.weight"] = torch.randn(out_features, RANK, generator=gen) * scale
    save_file(tensors, str(path))
    return path, layout


def test_released_layout_covers_the_494_flux_linears():
    from analogy_core.edit_transfer import edit_transfer_targets
    from analogy_core.layouts import standard_layout

    targets = edit_transfer_targets(standard_layout("flux"))
    assert len(targets) == 494 == 19 * 14 + 38 * 6
    assert "transformer_blocks.18.ff_context.net.2" in targets and "single_transformer_blocks.37.norm.linear" in targets
    assert not any(t.startswith(("x_embedder", "proj_out", "norm_out", "time_text_embed")) for t in targets)


@pytest.fixture(scope="module")
def twins(comfy_inproc):
    return tiny_flux_pair(comfy_inproc.comfy, seed=11)


def diffusers_with_file(model, path):
    """A fresh diffusers transformer with ``model``'s weights and the file loaded by diffusers' own LoRA loader."""
    from diffusers import FluxPipeline, FluxTransformer2DModel

    fresh = FluxTransformer2DModel.from_config(model.config).eval()
    fresh.load_state_dict({k.replace(".base_layer", ""): v for k, v in model.state_dict().items() if "lora_" not in k})
    fresh.load_lora_adapter(FluxPipeline.lora_state_dict(str(path)), prefix="transformer", adapter_name="file")
    return fresh


def readers_agree(comfy_inproc, patcher, diffusers_model, path, layout, inp):
    """Outputs of (stock ComfyUI loader, Load LoRA + Apply merge, Apply runtime, diffusers) for the file at ``path``."""
    import comfy.sd
    import comfy.utils

    io = __import__(f"{comfy_inproc.pack.__name__}.analogy_core.lora_io", fromlist=["x"])
    lora = io.load_lora_file(path, layout).lora
    stock, _ = comfy.sd.load_lora_for_models(patcher, None, comfy.utils.load_torch_file(str(path), safe_load=True),
                                             1.0, 0.0)
    apply = comfy_inproc.nodes.ApplyLoRAToModel()
    merged, info = apply.apply(patcher, lora, 1.0, "merge", False)
    assert f"matched {len(lora)}/{len(lora)}" in info
    runtime, _ = apply.apply(patcher, lora, 1.0, "runtime", False)
    with torch.no_grad():
        via_diffusers = run_diffusers_flux(diffusers_with_file(diffusers_model, path), inp)
    return lora, [comfy_flux_out(stock, inp), comfy_flux_out(merged, inp), comfy_flux_out(runtime, inp),
                  via_diffusers]


def test_released_layout_loads_alike_in_load_lora_and_comfyuis_loader(comfy_inproc, twins, tmp_path):
    model, patcher = twins
    path, layout = released_layout_file(model, tmp_path / "edit_transfer.safetensors")
    with safe_open(str(path), "pt") as handle:
        keys = list(handle.keys())
        assert not any(k.endswith(".alpha") for k in keys) and not (handle.metadata() or {}).get("lora_adapter_metadata")
    assert len(keys) == 2 * (2 * 14 + 2 * 6)
    inp = flux_inputs(seed=3)
    base = comfy_flux_out(patcher, inp)
    lora, (stock, merged, runtime, via_diffusers) = readers_agree(comfy_inproc, patcher, model, path, layout, inp)
    assert lora.ranks == {RANK} and all(layer.scale == 1.0 for layer in lora.layers.values()), "no alpha: scale 1"
    assert rel_err(stock, base) > 0.05, "the LoRA must visibly change the output"
    assert rel_err(merged, stock) <= 1e-5 and rel_err(runtime, stock) <= 1e-5
    assert rel_err(via_diffusers, stock) <= 1e-4


def test_trained_lora_file_is_read_identically_by_stock_loader_diffusers_and_load_lora(comfy_inproc, twins, tmp_path):
    from analogy_core.lora_io import save_lora_file
    from training.config import build_config
    from training.edit_transfer.task import PRESETS, EditTransferConfig, add_lora, export_lora, lora_metadata

    model, patcher = twins
    trained = copy.deepcopy(model)
    add_lora(trained, rank=4, alpha=8.0)  # alpha != rank: readers that ignore the header must still agree
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, param in trained.named_parameters():
            if ".lora_" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.1)
    cfg = build_config(EditTransferConfig, PRESETS, "tiny", None, ["backbone=/home/someone/FLUX.1-dev"])
    path = save_lora_file(export_lora(trained, lora_metadata(cfg, 123)), tmp_path / "edit_transfer_lora.safetensors")
    inp = flux_inputs(seed=4)
    with torch.no_grad():
        expected = run_diffusers_flux(trained, inp)
    from analogy_core.layouts import layout_of_diffusers_model

    lora, outputs = readers_agree(comfy_inproc, patcher, model, path, layout_of_diffusers_model(model), inp)
    assert rel_err(expected, comfy_flux_out(patcher, inp)) > 0.05
    for name, got in zip(("stock LoraLoader", "Load LoRA merge", "Load LoRA runtime", "diffusers"), outputs):
        assert rel_err(got, expected) <= 1e-4, (name, rel_err(got, expected))
    with safe_open(str(path), "pt") as handle:
        meta = handle.metadata()
        assert all(k.startswith("transformer.") and k.endswith((".lora_A.weight", ".lora_B.weight"))
                   for k in handle.keys())
    assert meta["analogy.method"] == "edit_transfer" and meta["analogy.step"] == "123"
    assert meta["analogy.family"] == "flux" and meta["analogy.source"] == "trained"
    assert meta["analogy.backbone"] == "FLUX.1-dev", "no local path in the header"
    assert json.loads(meta["lora_adapter_metadata"])["r"] == 4 and len(lora) == 2 * 14 + 2 * 6
