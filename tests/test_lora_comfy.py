"""Apply LoRA to Model against references: peft on diffusers vs our node on ComfyUI's own models (in-process)."""

from __future__ import annotations

import json

import pytest
import torch
from peft import LoraConfig
from peft.tuners.lora import LoraLayer

from test_tiny_models import flux_inputs, run_comfy_flux, run_diffusers_flux
from tiny_models import FLUX_COMFY, tiny_flux_pair, tiny_sd_pair

SD_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "ff.net.2", "conv1", "time_emb_proj"]
FLUX_TARGETS = ["to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj", "to_out.0", "to_add_out",
                "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2", "norm1.linear",
                "norm1_context.linear", "proj_mlp", "proj_out", "norm.linear", "norm_out.linear"]


def add_peft_lora(model, targets, rank=4, alpha=8, seed=1):
    """A peft LoRA with non-zero B (a zero-initialised one would make every comparison pass)."""
    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets, init_lora_weights=False)
    model.add_adapter(config)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, LoraLayer):
                for sub in (module.lora_A["default"], module.lora_B["default"]):
                    sub.weight.copy_(torch.randn(sub.weight.shape, generator=gen) * 0.3)
    return config


def set_peft_strength(model, strength):
    for module in model.modules():
        if isinstance(module, LoraLayer):
            module.set_scale("default", strength)  # peft: scaling = strength * alpha / r


def peft_lora_file(model, config, tmp_path, pipeline_cls, component):
    """Save the adapter the way diffusers does (keys `<component>.<path>.lora_A.weight`, peft config in metadata)."""
    from peft.utils import get_peft_model_state_dict

    layers = get_peft_model_state_dict(model)
    kwargs = {f"{component}_lora_layers": layers, f"{component}_lora_adapter_metadata": config.to_dict()}
    pipeline_cls.save_lora_weights(tmp_path, weight_name="peft_lora.safetensors", **kwargs)
    return tmp_path / "peft_lora.safetensors"


def rel_err(a, b):
    return ((a - b).norm() / b.norm()).item()


def comfy_sd_out(patcher, x, t, ctx):
    """ComfyUI's UNet forward under the patcher's weights and APPLY_MODEL wrappers."""
    comfy = __import__("comfy.patcher_extension").patcher_extension
    patcher.patch_model()
    try:
        base = patcher.model

        def call(x, t, ctx):
            return base.diffusion_model(x, timesteps=t, context=ctx)

        wrappers = comfy.get_all_wrappers(comfy.WrappersMP.APPLY_MODEL, {"wrappers": patcher.wrappers})
        executor = comfy.WrapperExecutor.new_class_executor(call, base, wrappers)
        with torch.no_grad():
            return executor.execute(x, t, ctx)
    finally:
        patcher.unpatch_model()


def comfy_flux_out(patcher, inp):
    comfy = __import__("comfy.patcher_extension").patcher_extension
    patcher.patch_model()
    try:
        base = patcher.model
        wrappers = comfy.get_all_wrappers(comfy.WrappersMP.APPLY_MODEL, {"wrappers": patcher.wrappers})
        executor = comfy.WrapperExecutor.new_class_executor(
            lambda: run_comfy_flux(base.diffusion_model, inp), base, wrappers)
        with torch.no_grad():
            return executor.execute()
    finally:
        patcher.unpatch_model()


@pytest.fixture(scope="module")
def sd_setup(comfy_inproc, tmp_path_factory):
    from diffusers import StableDiffusionPipeline

    unet, patcher = tiny_sd_pair(comfy_inproc.comfy)
    config = add_peft_lora(unet, SD_TARGETS)
    path = peft_lora_file(unet, config, tmp_path_factory.mktemp("sd"), StableDiffusionPipeline, "unet")
    return unet, patcher, path


@pytest.fixture(scope="module")
def flux_setup(comfy_inproc, tmp_path_factory):
    from diffusers import FluxPipeline

    model, patcher = tiny_flux_pair(comfy_inproc.comfy)
    config = add_peft_lora(model, FLUX_TARGETS, rank=3, alpha=6, seed=2)
    path = peft_lora_file(model, config, tmp_path_factory.mktemp("flux"), FluxPipeline, "transformer")
    return model, patcher, path


def load_ours(comfy_inproc, path, diffusers_model):
    layouts = __import__(f"{comfy_inproc.pack.__name__}.analogy_core.layouts", fromlist=["x"])
    io = __import__(f"{comfy_inproc.pack.__name__}.analogy_core.lora_io", fromlist=["x"])
    return io.load_lora_file(path, layouts.layout_of_diffusers_model(diffusers_model)).lora


def test_diffusers_file_is_the_peft_sd15_format_comfyui_cannot_map(sd_setup):
    from safetensors import safe_open

    with safe_open(str(sd_setup[2]), "pt") as handle:
        keys = list(handle.keys())
        meta = handle.metadata()
    assert all(k.startswith("unet.") and k.endswith((".lora_A.weight", ".lora_B.weight")) for k in keys)
    assert json.loads(meta["lora_adapter_metadata"])["unet.lora_alpha"] == 8  # alpha/r = 2 lives only here


@pytest.mark.parametrize("strength", [1.0, 0.5, -1.0])
@pytest.mark.parametrize("mode", ["merge", "runtime"])
def test_sd15_matches_peft_on_diffusers(comfy_inproc, sd_setup, strength, mode):
    unet, patcher, path = sd_setup
    lora = load_ours(comfy_inproc, path, unet)
    assert lora.layers and all(layer.scale == 2.0 for layer in lora.layers.values())
    assert any(layer.is_conv for layer in lora.layers.values())
    gen = torch.Generator().manual_seed(3)
    x, t, ctx = torch.randn(2, 4, 8, 8, generator=gen), torch.tensor([10.0, 700.0]), torch.randn(2, 5, 32, generator=gen)
    with torch.no_grad():
        set_peft_strength(unet, strength)
        ref = unet(x, t, encoder_hidden_states=ctx).sample
        unet.disable_adapters()
        base = unet(x, t, encoder_hidden_states=ctx).sample
        unet.enable_adapters()
    assert rel_err(base, ref) > 0.05, "the LoRA must visibly change the output"
    node = comfy_inproc.nodes.ApplyLoRAToModel()
    patched, info = node.apply(patcher, lora, strength, mode, False)
    assert f"matched {len(lora)}/{len(lora)}" in info
    out = comfy_sd_out(patched, x, t, ctx)
    assert rel_err(out, ref) <= 1e-4, (rel_err(out, ref), rel_err(out, base))
    # the input model is untouched
    torch.testing.assert_close(comfy_sd_out(patcher, x, t, ctx), base, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("strength", [1.0, 0.5, -1.0])
@pytest.mark.parametrize("mode", ["merge", "runtime"])
def test_flux_matches_peft_on_diffusers(comfy_inproc, flux_setup, strength, mode):
    model, patcher, path = flux_setup
    lora = load_ours(comfy_inproc, path, model)
    assert len(lora) == 2 * 14 + 2 * 6 + 2  # peft's "proj_out" also catches the final layer; + norm_out
    inp = flux_inputs(seed=5)
    with torch.no_grad():
        set_peft_strength(model, strength)
        ref = run_diffusers_flux(model, inp)
        model.disable_adapters()
        base = run_diffusers_flux(model, inp)
        model.enable_adapters()
    assert rel_err(base, ref) > 0.05
    patched, info = comfy_inproc.nodes.ApplyLoRAToModel().apply(patcher, lora, strength, mode, False)
    assert f"matched {len(lora)}/{len(lora)}" in info
    out = comfy_flux_out(patched, inp)
    assert rel_err(out, ref) <= 1e-4, (rel_err(out, ref), rel_err(out, base))


def test_our_key_tables_agree_with_comfyuis(comfy_inproc, sd_setup, flux_setup):
    """Every layer of both tiny models: our native names equal the keys ComfyUI's own key map gives."""
    layouts = __import__(f"{comfy_inproc.pack.__name__}.analogy_core.layouts", fromlist=["x"])
    formats = comfy_inproc.formats
    lora_mod = comfy_inproc.lora
    for diffusers_model, patcher in ((sd_setup[0], sd_setup[1]), (flux_setup[0], flux_setup[1])):
        layout = layouts.layout_of_diffusers_model(diffusers_model)
        paths = list(layout.native)
        fake = lora_mod.LoRA({p: lora_mod.LoRALayer(torch.zeros(1, layout.shapes[p][1], *layout.shapes[p][2:]),
                                                    torch.zeros(layout.shapes[p][0], 1,
                                                                *([1, 1] if len(layout.shapes[p]) == 4 else [])))
                              for p in paths}, layout.family)
        ours = formats.comfy_patch_keys(fake, layout)
        theirs, unmatched = comfy_inproc.patch.match_targets(fake, patcher)
        assert not unmatched and len(ours) == len(theirs) > 20
        probe = torch.randn(8, 3)
        for path in ours:  # weight functions (FLUX's norm_out shift/scale swap) compared by what they do
            mine, comfys = ours[path], theirs[path]
            if isinstance(mine, tuple) and len(mine) == 3:
                assert mine[:2] == comfys[:2] and torch.equal(mine[2](probe), comfys[2](probe)), path
            else:
                assert mine == comfys, path


def test_unmatched_keys_fail_loudly_unless_partial(comfy_inproc, flux_setup, sd_setup):
    model, patcher, path = flux_setup
    lora = load_ours(comfy_inproc, path, model)
    lora_mod = comfy_inproc.lora
    extra = dict(lora.layers)
    extra["transformer_blocks.7.attn.to_q"] = lora.layers["transformer_blocks.0.attn.to_q"]  # no block 7 here
    bigger = lora_mod.LoRA(extra, "flux")
    node = comfy_inproc.nodes.ApplyLoRAToModel()
    n = len(bigger)
    with pytest.raises(ValueError, match=rf"1 of {n} LoRA layers match nothing.*transformer_blocks\.7\.attn\.to_q"):
        node.apply(patcher, bigger, 1.0, "merge", False)
    _, info = node.apply(patcher, bigger, 1.0, "merge", True)
    assert f"matched {n - 1}/{n}" in info and "skipped 1 unmatched" in info
    with pytest.raises(ValueError, match="this LoRA is for flux but the model is sd15"):
        node.apply(sd_setup[1], lora, 1.0, "merge", False)
    nan = lora_mod.LoRA({"transformer_blocks.0.attn.to_q": lora_mod.LoRALayer(
        torch.full((3, 32), float("nan")), torch.ones(32, 3))}, "flux")
    with pytest.raises(ValueError, match="NaN or Inf"):
        node.apply(patcher, nan, 1.0, "runtime", False)


def test_lora_fitting_sd15_and_sdxl_applies_to_either(comfy_inproc, sd_setup):
    """A file whose layers SD1.5 and SDXL share cannot name its family; Apply accepts both, refuses others."""
    from dataclasses import replace

    unet, patcher, path = sd_setup
    lora = load_ours(comfy_inproc, path, unet)
    node = comfy_inproc.nodes.ApplyLoRAToModel()
    as_sdxl = replace(lora, family="sdxl")
    with pytest.raises(ValueError, match="this LoRA is for sdxl but the model is sd15"):
        node.apply(patcher, as_sdxl, 1.0, "merge", False)
    either = replace(as_sdxl, metadata={"analogy.fits": "sdxl,sd15"})
    assert either.compatible_families == ("sdxl", "sd15") and "for sdxl or sd15" in either.summary()
    gen = torch.Generator().manual_seed(9)
    x, t, ctx = torch.randn(1, 4, 8, 8, generator=gen), torch.tensor([300.0]), torch.randn(1, 5, 32, generator=gen)
    ours, _ = node.apply(patcher, either, 1.0, "merge", False)
    reference, _ = node.apply(patcher, lora, 1.0, "merge", False)
    out = comfy_sd_out(ours, x, t, ctx)
    assert rel_err(out, comfy_sd_out(patcher, x, t, ctx)) > 0.05
    torch.testing.assert_close(out, comfy_sd_out(reference, x, t, ctx))


def test_high_rank_bf16_merge_matches_float64_reference(comfy_inproc):
    """ComfyUI#8996: rank >= 16 Kontext LoRAs reported as noise. A rank-128 LoRA on FLUX-sized (3072) bf16 layers,
    merged by our node through ComfyUI's patcher, must equal the float64 result rounded to bf16."""
    comfy = comfy_inproc.comfy
    config = dict(FLUX_COMFY, hidden_size=3072, num_heads=24, axes_dim=[16, 56, 56], depth=1, depth_single_blocks=1,
                  context_in_dim=64, vec_in_dim=32)
    model_config = comfy.supported_models.Flux(dict(config))
    model_config.set_inference_dtype(torch.bfloat16, None)
    base = model_config.get_model({})
    targets = {"diffusion_model.double_blocks.0.img_attn.qkv.weight": (9216, 3072),
               "diffusion_model.single_blocks.0.linear1.weight": (9216 + 12288, 3072)}
    gen = torch.Generator().manual_seed(0)
    originals = {}
    for key, shape in targets.items():
        weight = (torch.randn(shape, generator=gen) * 0.02).to(torch.bfloat16)
        comfy.utils.set_attr_param(base, key, weight)
        originals[key] = weight.clone()
    cpu = torch.device("cpu")
    patcher = comfy.model_patcher.ModelPatcher(base, load_device=cpu, offload_device=cpu)
    lora_mod = comfy_inproc.lora
    rank = 128
    layers = {p: lora_mod.LoRALayer(torch.randn(rank, 3072, generator=gen) * 0.05,
                                    torch.randn(3072, rank, generator=gen) * 0.05, scale=0.5)
              for p in ("transformer_blocks.0.attn.to_k", "single_transformer_blocks.0.attn.to_q")}
    layers["single_transformer_blocks.0.proj_mlp"] = lora_mod.LoRALayer(
        torch.randn(rank, 3072, generator=gen) * 0.05, torch.randn(12288, rank, generator=gen) * 0.05, scale=0.5)
    lora = lora_mod.LoRA(layers, "flux")
    patched, _ = comfy_inproc.nodes.ApplyLoRAToModel().apply(patcher, lora, 0.8, "merge", False)
    patched.patch_model()
    try:
        checks = [("diffusion_model.double_blocks.0.img_attn.qkv.weight", "transformer_blocks.0.attn.to_k", 3072),
                  ("diffusion_model.single_blocks.0.linear1.weight", "single_transformer_blocks.0.attn.to_q", 0),
                  ("diffusion_model.single_blocks.0.linear1.weight", "single_transformer_blocks.0.proj_mlp", 9216)]
        for key, path, offset in checks:
            layer = layers[path]
            rows = layer.out_features
            merged = comfy.utils.get_attr(base, key)[offset: offset + rows]
            assert merged.dtype == torch.bfloat16
            w64 = originals[key][offset: offset + rows].double()
            ref64 = w64 + 0.8 * layer.scale * layer.up.double() @ layer.down.double()
            assert (ref64 - w64).abs().mean() > 10 * w64.abs().mean() * 2 ** -8, "the update is far above bf16 noise"
            ulp = 2.0 ** (torch.floor(torch.log2(ref64.abs().clamp_min(1e-30))) - 7)
            err = (merged.double() - ref64).abs()
            assert (err <= 0.5 * ulp + 1e-12).float().mean() > 0.999  # round-to-nearest of the exact result
            # everywhere: half a bf16 ulp plus float32 accumulation error of the rank-128 product (visible only
            # where W and the update cancel to nearly zero)
            terms = w64.abs() + 0.8 * layer.scale * layer.up.double().abs() @ layer.down.double().abs()
            assert (err <= 0.5 * ulp + 2.0 ** -20 * terms).all()
        untouched = comfy.utils.get_attr(base, "diffusion_model.double_blocks.0.img_attn.qkv.weight")[:3072]
        assert torch.equal(untouched, originals["diffusion_model.double_blocks.0.img_attn.qkv.weight"][:3072])
    finally:
        patched.unpatch_model()
    assert torch.equal(comfy.utils.get_attr(base, "diffusion_model.single_blocks.0.linear1.weight"),
                       originals["diffusion_model.single_blocks.0.linear1.weight"])


def test_saved_files_are_read_back_by_diffusers_and_peft(comfy_inproc, flux_setup, sd_setup, tmp_path):
    """Our Save LoRA output (format auto) loaded by diffusers' own LoRA loader reproduces the original adapter."""
    from diffusers import FluxPipeline, FluxTransformer2DModel, StableDiffusionPipeline, UNet2DConditionModel

    io = __import__(f"{comfy_inproc.pack.__name__}.analogy_core.lora_io", fromlist=["x"])
    # FLUX: peft keys with the transformer. prefix
    model, _, path = flux_setup
    saved = io.save_lora_file(load_ours(comfy_inproc, path, model), tmp_path / "flux.safetensors", "auto")
    inp = flux_inputs(seed=8)
    with torch.no_grad():
        set_peft_strength(model, 1.0)
        expected = run_diffusers_flux(model, inp)
    fresh = FluxTransformer2DModel.from_config(model.config).eval()
    fresh.load_state_dict({k.replace(".base_layer", ""): v for k, v in model.state_dict().items() if "lora_" not in k})
    state = FluxPipeline.lora_state_dict(str(saved))
    fresh.load_lora_adapter(state, prefix="transformer", adapter_name="ours")
    with torch.no_grad():
        got = run_diffusers_flux(fresh, inp)
    assert rel_err(got, expected) <= 1e-4

    # SD1.5: kohya keys (lora_unet_..., .alpha), which diffusers converts itself
    unet, _, path = sd_setup
    saved = io.save_lora_file(load_ours(comfy_inproc, path, unet), tmp_path / "sd.safetensors", "auto")
    gen = torch.Generator().manual_seed(9)
    x, t, ctx = torch.randn(1, 4, 8, 8, generator=gen), torch.tensor([300.0]), torch.randn(1, 5, 32, generator=gen)
    with torch.no_grad():
        set_peft_strength(unet, 1.0)
        expected = unet(x, t, encoder_hidden_states=ctx).sample
    fresh = UNet2DConditionModel.from_config(unet.config).eval()
    fresh.load_state_dict({k.replace(".base_layer", ""): v for k, v in unet.state_dict().items() if "lora_" not in k})
    state, alphas = StableDiffusionPipeline.lora_state_dict(str(saved))
    fresh.load_lora_adapter({k: v for k, v in state.items() if k.startswith("unet.")}, prefix="unet",
                            network_alphas=alphas, adapter_name="ours")
    with torch.no_grad():
        got = fresh(x, t, encoder_hidden_states=ctx).sample
    assert rel_err(got, expected) <= 1e-4


@pytest.mark.parametrize("key_format", ["auto", "kohya", "comfyui"])
def test_saved_flux_file_in_comfyuis_stock_loader_equals_apply(comfy_inproc, flux_setup, tmp_path, key_format):
    """ComfyUI's own LoRA loading (comfy.sd.load_lora_for_models, what LoraLoader calls) on our saved FLUX file, in
    each key format (kohya and comfyui fuse q/k/v into BFL weights and swap norm_out's halves)."""
    import comfy.sd
    import comfy.utils

    model, patcher, path = flux_setup
    io = __import__(f"{comfy_inproc.pack.__name__}.analogy_core.lora_io", fromlist=["x"])
    lora = load_ours(comfy_inproc, path, model)
    assert "norm_out.linear" in lora.layers
    layouts = __import__(f"{comfy_inproc.pack.__name__}.analogy_core.layouts", fromlist=["x"])
    layout = layouts.layout_of_diffusers_model(model)
    saved = io.save_lora_file(lora, tmp_path / "ours.safetensors", key_format, layout)
    stock, _ = comfy.sd.load_lora_for_models(patcher, None, comfy.utils.load_torch_file(str(saved), safe_load=True),
                                             0.7, 0.0)
    ours, _ = comfy_inproc.nodes.ApplyLoRAToModel().apply(patcher, lora, 0.7, "merge", False)
    inp = flux_inputs(seed=12)
    a, b = comfy_flux_out(stock, inp), comfy_flux_out(ours, inp)
    assert rel_err(a, comfy_flux_out(patcher, inp)) > 0.02
    assert rel_err(a, b) <= 1e-5


def test_weight_functions_must_be_row_permutations(comfy_inproc):
    """Runtime mode follows ComfyUI's key-map weight functions only where they reorder rows (FLUX's norm_out swap)."""
    import comfy.utils

    order = comfy_inproc.patch._row_permutation(comfy.utils.swap_scale_shift, 6)
    assert order.tolist() == [3, 4, 5, 0, 1, 2]
    with pytest.raises(ValueError, match="not a row permutation; runtime mode cannot apply it"):
        comfy_inproc.patch._row_permutation(lambda weight: weight * 2, 6)


# ---------------------------------------------------------------------------------------------------------------------
# runtime mode inside ComfyUI's memory management

RUNTIME_PATHS = {"down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q": (32, 32),
                 "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k": (32, 32),
                 "down_blocks.0.resnets.0.conv1": (32, 32, 3, 3)}


def small_lora(lora_mod, dtype=torch.float32, seed=0, family="sd15", paths=None):
    """A rank-4 LoRA on ``paths`` (diffusers path -> weight shape; default RUNTIME_PATHS) of the tiny SD1.5."""
    gen = torch.Generator().manual_seed(seed)
    layers = {}
    for path, shape in (paths or RUNTIME_PATHS).items():
        down = torch.randn(4, *shape[1:], generator=gen) * 0.3
        up = torch.randn(shape[0], 4, *([1, 1] if len(shape) == 4 else []), generator=gen) * 0.3
        layers[path] = lora_mod.LoRALayer(down.to(dtype), up.to(dtype), 1.5)
    return lora_mod.LoRA(layers, family)


def denoised(patcher, base_model, x, sigma, ctx):
    """BaseModel.apply_model (ComfyUI's own wrapper execution) under the patcher's weights and wrappers."""
    patcher.patch_model()
    try:
        with torch.no_grad():
            return base_model.apply_model(x, sigma, c_crossattn=ctx, transformer_options={"wrappers": patcher.wrappers})
    finally:
        patcher.unpatch_model()


def reachable_tensors(root) -> list[torch.Tensor]:
    """Every tensor reachable from ``root`` through containers, attributes and closures (not module globals)."""
    import gc
    import types

    seen, found, stack = set(), [], [root]
    while stack:
        obj = stack.pop()
        if id(obj) in seen or isinstance(obj, (type, types.ModuleType, types.FrameType, str, bytes, int, float)):
            continue
        seen.add(id(obj))
        if isinstance(obj, torch.Tensor):
            found.append(obj)
        elif isinstance(obj, types.FunctionType):
            stack.extend(cell.cell_contents for cell in obj.__closure__ or () if cell.cell_contents is not None)
            stack.extend(obj.__defaults__ or ())
        else:
            stack.extend(gc.get_referents(obj))
    assert len(seen) > 1000, "the walk must reach into the patcher, its model and its wrappers"
    return found


def test_runtime_weights_are_loaded_counted_and_freed_by_comfyui(comfy_inproc, monkeypatch):
    """Runtime mode's factors belong to ComfyUI's memory manager: sampling preparation hands them to load_models_gpu
    with the model, the loaded-model list counts their exact bytes, unload_all_models() offloads them, and no private
    cache keeps a copy. The offload device is ``meta`` here, so on a CPU-only host "offloaded" means "no data left"."""
    comfy = comfy_inproc.comfy
    import comfy.sampler_helpers

    management = comfy.model_management
    _, cpu_patcher = tiny_sd_pair(comfy, seed=5)  # a fresh model: the unload below leaves it on the meta device
    base_model = cpu_patcher.model
    node = comfy_inproc.nodes.ApplyLoRAToModel()
    lora = small_lora(comfy_inproc.lora, torch.bfloat16, seed=6)  # != the model's float32: a cache would copy
    gen = torch.Generator().manual_seed(7)
    x, sigma, ctx = torch.randn(1, 4, 8, 8, generator=gen), torch.tensor([3.0]), torch.randn(1, 5, 32, generator=gen)
    merged, _ = node.apply(cpu_patcher, lora, 0.8, "merge", False)
    reference, plain = denoised(merged, base_model, x, sigma, ctx), denoised(cpu_patcher, base_model, x, sigma, ctx)
    assert rel_err(reference, plain) > 0.01, "the LoRA must change the output"

    patcher = comfy.model_patcher.ModelPatcher(base_model, load_device=torch.device("cpu"),
                                               offload_device=torch.device("meta"))
    patched, info = node.apply(patcher, lora, 0.8, "runtime", False)
    [weights_patcher] = patched.get_additional_models()
    expected = sum((layer.down.numel() + layer.up.numel()) * 4 for layer in lora.layers.values())  # float32
    assert weights_patcher.model_size() == expected and "KB of LoRA weights" in info

    requested = []
    load = management.load_models_gpu
    monkeypatch.setattr(management, "load_models_gpu", lambda models, *a, **k: (requested.append(list(models)),
                                                                                load(models, *a, **k))[1])
    comfy.sampler_helpers.prepare_sampling(patched, [1, 4, 8, 8], {}, model_options={})
    assert len(requested) == 1 and requested[0][0] is patched and weights_patcher in requested[0]
    loaded = {id(entry.model): entry for entry in management.current_loaded_models}
    assert loaded[id(weights_patcher)].model_loaded_memory() == expected
    assert loaded[id(patched)].model_loaded_memory() == patched.model_size()

    out = denoised(patched, base_model, x, sigma, ctx)
    assert rel_err(out, reference) <= 1e-4, (rel_err(out, reference), rel_err(out, plain))

    management.unload_all_models()
    assert all(entry.model not in (patched, weights_patcher) for entry in management.current_loaded_models)
    assert weights_patcher.loaded_size() == 0
    assert all(p.is_meta for p in weights_patcher.model.parameters()), "ComfyUI moved the factors to offload"
    own = {t.data_ptr() for layer in lora.layers.values() for t in (layer.down, layer.up)}
    kept = [t for t in reachable_tensors(patched) if not t.is_meta]
    assert kept and all(t.data_ptr() in own for t in kept), [(tuple(t.shape), t.dtype) for t in kept
                                                            if t.data_ptr() not in own]


def test_runtime_weights_share_the_loras_memory_after_an_offload(comfy_inproc, sd_setup):
    """Factors in the model's dtype are the LoRA's own tensors (no host copy), and stay so after ComfyUI offloads
    them: an offload from a GPU leaves new host copies, which the detach callback swaps back for the LoRA's tensors."""
    _, patcher, _ = sd_setup
    lora = small_lora(comfy_inproc.lora, torch.float32, seed=8)
    patched, _ = comfy_inproc.nodes.ApplyLoRAToModel().apply(patcher, lora, 1.0, "runtime", False)
    [weights_patcher] = patched.get_additional_models()
    factors = list(weights_patcher.model.factors)
    sources = [(layer.down, layer.up) for layer in lora.layers.values()]
    assert all(f.down.data_ptr() == d.data_ptr() and f.up.data_ptr() == u.data_ptr()
               for f, (d, u) in zip(factors, sources))
    for param in weights_patcher.model.parameters():  # what ``.to(cpu)`` of a GPU copy leaves behind
        param.data = param.data.clone()
    assert factors[0].down.data_ptr() != sources[0][0].data_ptr()
    weights_patcher.detach(unpatch_all=True)
    assert all(f.down.data_ptr() == d.data_ptr() and f.up.data_ptr() == u.data_ptr()
               for f, (d, u) in zip(factors, sources))


def test_chained_runtime_loras_stack_like_merges(comfy_inproc, sd_setup):
    """Two Apply nodes in runtime mode: two weight patchers, two wrappers, the sum of both updates."""
    _, patcher, _ = sd_setup
    node = comfy_inproc.nodes.ApplyLoRAToModel()
    first, second = small_lora(comfy_inproc.lora, torch.float32, 9), small_lora(comfy_inproc.lora, torch.float32, 10)
    runtime, _ = node.apply(node.apply(patcher, first, 0.6, "runtime", False)[0], second, -0.9, "runtime", False)
    merged, _ = node.apply(node.apply(patcher, first, 0.6, "merge", False)[0], second, -0.9, "merge", False)
    assert len(runtime.get_additional_models()) == 2
    gen = torch.Generator().manual_seed(11)
    x, t, ctx = torch.randn(1, 4, 8, 8, generator=gen), torch.tensor([400.0]), torch.randn(1, 5, 32, generator=gen)
    out, ref = comfy_sd_out(runtime, x, t, ctx), comfy_sd_out(merged, x, t, ctx)
    assert rel_err(ref, comfy_sd_out(patcher, x, t, ctx)) > 0.01
    assert rel_err(out, ref) <= 1e-4


def test_a_peft_adapter_folder_applies_with_its_adapter_config(comfy_inproc, tmp_path):
    """peft's own save_pretrained folder (adapter_model.safetensors, whose keys carry no alpha, and
    adapter_config.json with lora_alpha and an alpha_pattern): Apply LoRA to Model equals peft's forward. The same
    file under another name is read at scale 1 (as ComfyUI reads it) and says so."""
    from peft import get_peft_model

    model, patcher = tiny_flux_pair(comfy_inproc.comfy, seed=3)
    inp = flux_inputs(seed=6)
    with torch.no_grad():
        base = run_diffusers_flux(model, inp)
    odd = "transformer_blocks.0.attn.to_k"
    config = LoraConfig(r=3, lora_alpha=9, alpha_pattern={odd: 1.5}, target_modules=["to_q", "to_k", "to_v"],
                        init_lora_weights=False)
    peft_model = get_peft_model(model, config)
    gen = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for module in peft_model.modules():
            if isinstance(module, LoraLayer):
                for sub in (module.lora_A["default"], module.lora_B["default"]):
                    sub.weight.copy_(torch.randn(sub.weight.shape, generator=gen) * 0.3)
        ref = run_diffusers_flux(peft_model.base_model.model, inp)
    assert rel_err(base, ref) > 0.05, "the adapter must visibly change the output"
    peft_model.save_pretrained(tmp_path / "my adapter")
    weights = tmp_path / "my adapter" / "adapter_model.safetensors"
    assert (weights.parent / "adapter_config.json").is_file()

    io = __import__(f"{comfy_inproc.pack.__name__}.analogy_core.lora_io", fromlist=["x"])
    parsed = io.load_lora_file(weights)
    assert parsed.peft_config_source == "adapter_config.json" and parsed.layers_without_alpha == 0
    scales = {path: layer.scale for path, layer in parsed.lora.layers.items()}
    assert scales[odd] == pytest.approx(0.5) and scales["transformer_blocks.0.attn.to_q"] == pytest.approx(3.0)
    patched, _ = comfy_inproc.nodes.ApplyLoRAToModel().apply(patcher, parsed.lora, 1.0, "merge", False)
    out = comfy_flux_out(patched, inp)
    assert rel_err(out, ref) <= 1e-4, (rel_err(out, ref), rel_err(out, base))

    renamed = tmp_path / "my adapter" / "renamed.safetensors"  # a config beside another name may be another's
    renamed.write_bytes(weights.read_bytes())
    plain = io.load_lora_file(renamed)
    assert plain.peft_config_source == "" and plain.layers_without_alpha == len(plain.lora.layers)
    assert {layer.scale for layer in plain.lora.layers.values()} == {1.0}
