"""Contract tests: every ComfyUI behaviour the pack relies on, pinned against the host (ComfyUI 0.3.75 in CI), so that a
host change fails here, loudly and by name, instead of somewhere inside a node. The API differences of newer hosts
(Comfy-Org/ComfyUI 0.38, read from its sources) live in nodes/comfy_compat.py; their branches are exercised below with
monkeypatched fakes.

What the pack uses (``grep -rn "comfy\\.\\|folder_paths" nodes/ __init__.py``): comfy.lora (model_lora_keys_unet,
load_lora), ModelPatcher (clone, add_patches, patches, add_wrapper_with_key, wrappers, set/get_additional_models,
add_callback_with_key, detach, model_size, loaded_size), comfy.patcher_extension (WrappersMP.APPLY_MODEL,
CallbacksMP.ON_DETACH), BaseModel.apply_model's wrapper executor, comfy.utils.get_attr, comfy.model_base (BaseModel,
Flux and its subclasses, SDXL), comfy.model_management (load_models_gpu, unload_all_models), CLIP_VISION objects
(model call, output tuple, image_size, load_device, patcher), clip_preprocess, folder_paths.
"""

from __future__ import annotations

import importlib
from types import SimpleNamespace

import pytest
import torch

from comfy_inproc import float32_clip_vision
from tiny_models import FLUX_COMFY, randomize_, tiny_sd_pair

HIDDEN = FLUX_COMFY["hidden_size"]


@pytest.fixture(scope="module")
def compat(comfy_inproc):
    return importlib.import_module(f"{comfy_inproc.pack.__name__}.nodes.comfy_compat")


@pytest.fixture(scope="module")
def flux_model(comfy_inproc):
    """A FLUX.1 BaseModel as ComfyUI builds it (weights are not needed for key maps and family detection)."""
    comfy = comfy_inproc.comfy
    config = comfy.supported_models.Flux(dict(FLUX_COMFY))
    config.set_inference_dtype(torch.float32, None)
    return config.get_model({})


@pytest.fixture(scope="module")
def sd(comfy_inproc):
    return tiny_sd_pair(comfy_inproc.comfy, seed=21)[1]


# ---------------------------------------------------------------------------------------------------------------------
# key maps and patches


def test_key_map_target_forms(comfy_inproc, flux_model):
    """model_lora_keys_unet maps a LoRA name to one of three target forms, and runtime mode's _unpack reads each."""
    comfy = comfy_inproc.comfy
    unpack = comfy_inproc.patch._unpack
    key_map = comfy.lora.model_lora_keys_unet(flux_model, {})
    state_keys = set(flux_model.state_dict())
    # 1. a plain state-dict key
    plain = key_map["transformer.transformer_blocks.0.attn.to_out.0"]
    assert plain == "diffusion_model.double_blocks.0.img_attn.proj.weight" and plain in state_keys
    assert unpack(plain) == (plain, None, None)
    # 2. (key, (dim, offset, size)): a row slice of a fused weight
    qkv = "diffusion_model.double_blocks.0.img_attn.qkv.weight"
    assert key_map["transformer.transformer_blocks.0.attn.to_q"] == (qkv, (0, 0, HIDDEN))
    assert key_map["transformer.transformer_blocks.0.attn.to_k"] == (qkv, (0, HIDDEN, HIDDEN))
    assert key_map["transformer.transformer_blocks.0.attn.to_v"] == (qkv, (0, 2 * HIDDEN, HIDDEN))
    linear1 = "diffusion_model.single_blocks.0.linear1.weight"
    assert key_map["transformer.single_transformer_blocks.0.proj_mlp"] == (linear1, (0, 3 * HIDDEN, 4 * HIDDEN))
    assert unpack(key_map["transformer.transformer_blocks.0.attn.to_k"]) == (qkv, (0, HIDDEN, HIDDEN), None)
    # 3. (key, None, function): the whole weight through a function of the diff (FLUX norm_out's shift/scale swap)
    final = key_map["transformer.norm_out.linear"]
    assert final[0] == "diffusion_model.final_layer.adaLN_modulation.1.weight" and final[1] is None
    assert final[2] is comfy.utils.swap_scale_shift and unpack(final) == final
    halves = torch.arange(6.0).unsqueeze(1)
    assert final[2](halves).squeeze(1).tolist() == [3.0, 4.0, 5.0, 0.0, 1.0, 2.0]
    assert {qkv, linear1, final[0]} <= state_keys  # (key maps may also name weights a model lacks: match_targets
    # keeps only targets in the state dict)


def test_load_lora_and_the_patch_tuple_add_patches_stores(comfy_inproc, flux_model):
    """load_lora turns our lora_up/lora_down/alpha names into a LoRAAdapter keyed by the key-map target;
    add_patches stores (strength, adapter, strength_model, offset, function) per state-dict key; calculate_weight
    adds strength * alpha / rank * up @ down to the slice."""
    comfy = comfy_inproc.comfy
    import comfy.weight_adapter

    cpu = torch.device("cpu")
    patcher = comfy.model_patcher.ModelPatcher(flux_model, load_device=cpu, offload_device=cpu)
    key_map = comfy.lora.model_lora_keys_unet(flux_model, {})
    targets = {name: key_map[f"transformer.{name}"] for name in
               ("transformer_blocks.0.attn.to_out.0", "transformer_blocks.0.attn.to_k", "norm_out.linear")}
    gen = torch.Generator().manual_seed(0)
    state, rows = {}, {"norm_out.linear": 2 * HIDDEN}
    for name in targets:
        state[f"x.{name}.lora_up.weight"] = torch.randn(rows.get(name, HIDDEN), 2, generator=gen)
        state[f"x.{name}.lora_down.weight"] = torch.randn(2, HIDDEN, generator=gen)
        state[f"x.{name}.alpha"] = torch.tensor(3.0)
    patches = comfy.lora.load_lora(state, {f"x.{n}": t for n, t in targets.items()}, log_missing=False)
    assert set(patches) == set(targets.values())
    adapter = patches[targets["transformer_blocks.0.attn.to_k"]]
    assert isinstance(adapter, comfy.weight_adapter.WeightAdapterBase)
    assert adapter.weights[0] is state["x.transformer_blocks.0.attn.to_k.lora_up.weight"]
    assert adapter.weights[1] is state["x.transformer_blocks.0.attn.to_k.lora_down.weight"]
    assert adapter.weights[2] == 3.0

    clone = patcher.clone()
    applied = clone.add_patches(patches, 0.5)
    assert set(applied) == set(patches) and not patcher.patches
    for target in targets.values():
        key, offset, function = comfy_inproc.patch._unpack(target)
        assert clone.patches[key][-1] == (0.5, patches[target], 1.0, offset, function)
    qkv = targets["transformer_blocks.0.attn.to_k"][0]
    weight = torch.randn(3 * HIDDEN, HIDDEN, generator=gen)
    merged = comfy.lora.calculate_weight(clone.patches[qkv], weight.clone(), qkv)
    up, down = adapter.weights[0], adapter.weights[1]
    expected = weight.clone()
    expected[HIDDEN: 2 * HIDDEN] += 0.5 * (3.0 / 2) * up @ down
    torch.testing.assert_close(merged, expected)


def test_merge_precision_of_this_host(comfy_inproc):
    """This host merges a fully loaded layer into a float32 copy of the weight (test_lora_comfy's bf16 merge test
    checks the result against float64 rounded once). Newer hosts make the copy in lora_compute_dtype(device), float16
    on capable GPUs: when the CI host gains it, the README's and lora_patch's precision notes need a new look."""
    management = comfy_inproc.comfy.model_management
    assert not hasattr(management, "lora_compute_dtype")


# ---------------------------------------------------------------------------------------------------------------------
# wrappers, additional models, callbacks, loading


def test_apply_model_wrapper_api(comfy_inproc, sd):
    """add_wrapper_with_key files a wrapper under WrappersMP.APPLY_MODEL; clones copy the lists; sampling merges the
    patcher's wrappers into transformer_options; BaseModel.apply_model calls them with the BaseModel as
    executor.class_obj, and executor(...) runs the rest."""
    comfy = comfy_inproc.comfy
    import comfy.sampler_helpers

    wrappers_mp = comfy.patcher_extension.WrappersMP
    assert wrappers_mp.APPLY_MODEL == "apply_model"
    seen = []

    def doubling(executor, *args, **kwargs):
        seen.append(executor.class_obj)
        return 2 * executor(*args, **kwargs)

    patcher = sd.clone()
    patcher.add_wrapper_with_key(wrappers_mp.APPLY_MODEL, "probe", doubling)
    clone = patcher.clone()
    assert clone.wrappers[wrappers_mp.APPLY_MODEL]["probe"] == [doubling]
    assert clone.wrappers[wrappers_mp.APPLY_MODEL]["probe"] is not patcher.wrappers[wrappers_mp.APPLY_MODEL]["probe"]
    model_options = {"transformer_options": {}}
    comfy.sampler_helpers.prepare_model_patcher(clone, {}, model_options)
    transformer_options = model_options["transformer_options"]
    assert comfy.patcher_extension.get_all_wrappers(wrappers_mp.APPLY_MODEL, transformer_options) == [doubling]
    gen = torch.Generator().manual_seed(1)
    x, sigma, ctx = torch.randn(1, 4, 8, 8, generator=gen), torch.tensor([2.0]), torch.randn(1, 5, 32, generator=gen)
    with torch.no_grad():
        plain = sd.model.apply_model(x, sigma, c_crossattn=ctx)
        wrapped = sd.model.apply_model(x, sigma, c_crossattn=ctx, transformer_options=transformer_options)
    assert seen == [sd.model] and plain.abs().mean() > 0.01
    torch.testing.assert_close(wrapped, 2 * plain)


def test_additional_models_callbacks_and_loading(comfy_inproc, sd):
    """An auxiliary module under its own ModelPatcher: attached with set_additional_models, cloned (sharing the module)
    with the model, sized by model_size(), loaded by load_models_gpu (loaded_size() counts it), told about detach
    through CallbacksMP.ON_DETACH, and unloaded by unload_all_models()."""
    comfy = comfy_inproc.comfy
    management = comfy.model_management
    cpu = torch.device("cpu")
    module = torch.nn.Sequential(torch.nn.Linear(8, 4, bias=False))
    aux = comfy.model_patcher.ModelPatcher(module, load_device=cpu, offload_device=cpu)
    detached = []
    aux.add_callback_with_key(comfy.patcher_extension.CallbacksMP.ON_DETACH, "probe",
                              lambda patcher, unpatch_all: detached.append((patcher, unpatch_all)))
    model = sd.clone()
    model.set_additional_models("probe", [aux])
    assert model.get_additional_models_with_key("probe") == [aux] and model.get_additional_models() == [aux]
    clone = model.clone()
    [aux_clone] = clone.get_nested_additional_models()
    assert aux_clone is not aux and aux_clone.model is module and aux_clone.parent is aux
    assert aux_clone.get_all_callbacks(comfy.patcher_extension.CallbacksMP.ON_DETACH)
    assert aux.model_size() == 8 * 4 * 4 and aux.loaded_size() == 0

    assert hasattr(management, "load_models_gpu")
    management.load_models_gpu([clone] + clone.get_nested_additional_models())
    assert aux_clone in management.loaded_models() and aux_clone.loaded_size() == aux.model_size()
    management.unload_all_models()
    assert aux_clone not in management.loaded_models() and aux_clone.loaded_size() == 0
    assert (aux_clone, True) in detached


def test_compat_load_models_uses_the_list_form(compat, comfy_inproc, monkeypatch):
    management = comfy_inproc.comfy.model_management
    calls = []
    monkeypatch.setattr(management, "load_models_gpu", lambda models, *a, **k: calls.append(("list", models)))
    monkeypatch.delattr(management, "load_model_gpu")  # newer hosts may drop the single-model wrapper
    compat.load_models(iter(["a", "b"]))
    assert calls == [("list", ["a", "b"])]
    monkeypatch.delattr(management, "load_models_gpu")  # an old host: one call per model
    monkeypatch.setattr(management, "load_model_gpu", lambda model: calls.append(("one", model)), raising=False)
    compat.load_models(["c", "d"])
    assert calls[1:] == [("one", "c"), ("one", "d")]


def test_new_patcher_class(compat, comfy_inproc, monkeypatch):
    model_patcher = comfy_inproc.comfy.model_patcher
    cpu = torch.device("cpu")
    assert not hasattr(model_patcher, "CoreModelPatcher")  # 0.3.75; newer hosts alias it (dynamic VRAM)
    assert type(compat.new_patcher(torch.nn.Linear(2, 2), cpu, cpu)) is model_patcher.ModelPatcher

    class Dynamic(model_patcher.ModelPatcher):
        pass

    monkeypatch.setattr(model_patcher, "CoreModelPatcher", Dynamic, raising=False)
    assert type(compat.new_patcher(torch.nn.Linear(2, 2), cpu, cpu)) is Dynamic


# ---------------------------------------------------------------------------------------------------------------------
# model families


def test_model_base_classes_and_family(compat, comfy_inproc, flux_model, sd):
    """FLUX.1 (dev, schnell, Fill, Kontext) is model_base.Flux itself; Flux2, Chroma and ChromaRadiance (and in newer
    hosts LongCatImage) subclass it, so only the exact class is FLUX.1 for our LoRAs; likewise Qwen-Image 2.1 (newer
    hosts' QwenImage21) subclasses QwenImage and is not Qwen-Image for them."""
    comfy = comfy_inproc.comfy
    model_base = comfy.model_base
    for name in ("BaseModel", "Flux", "SDXL", "HiDream"):
        assert hasattr(model_base, name), name
    for name in ("Flux2", "Chroma", "ChromaRadiance"):
        assert issubclass(getattr(model_base, name), model_base.Flux), name
    assert type(flux_model) is model_base.Flux and compat.model_family(SimpleNamespace(model=flux_model)) == "flux"
    schnell = comfy.supported_models.FluxSchnell(dict(FLUX_COMFY, guidance_embed=False)).get_model({})
    assert compat.model_family(SimpleNamespace(model=schnell)) == "flux"
    assert compat.model_family(sd) == "sd15"

    class LongCatImage(model_base.Flux):  # what newer hosts add; any future subclass is treated the same way
        pass

    class QwenImage21(model_base.QwenImage):  # newer hosts (0.37+): Qwen-Image 2.1, another transformer and encoder
        pass

    qwen = model_base.QwenImage.__new__(model_base.QwenImage)
    assert compat.model_family(SimpleNamespace(model=qwen)) == "qwen_image"
    for cls, family in ((model_base.Flux2, "flux2"), (model_base.Chroma, "chroma"),
                        (model_base.ChromaRadiance, "chromaradiance"), (LongCatImage, "longcatimage"),
                        (QwenImage21, "qwenimage21"),
                        (model_base.HiDream, "hidream"), (model_base.SDXL, "sdxl")):
        assert compat.model_family(SimpleNamespace(model=cls.__new__(cls))) == family, cls


def test_flux1_lora_is_refused_on_other_flux_models(comfy_inproc):
    lora_mod = comfy_inproc.lora
    lora = lora_mod.LoRA({"transformer_blocks.0.attn.to_q": lora_mod.LoRALayer(torch.ones(2, HIDDEN),
                                                                                 torch.ones(HIDDEN, 2))}, "flux")
    model_base = comfy_inproc.comfy.model_base
    for cls in (model_base.Flux2, model_base.Chroma, model_base.HiDream):
        fake = SimpleNamespace(model=cls.__new__(cls))
        with pytest.raises(ValueError, match=f"this LoRA is for flux but the model is {cls.__name__.lower()}"):
            comfy_inproc.patch.check_compatible(lora, fake, False)


def test_compute_dtype(compat, comfy_inproc, sd):
    assert compat.compute_dtype(sd.model) == torch.float32
    fp8 = SimpleNamespace(manual_cast_dtype=None, get_dtype=lambda: torch.float8_e4m3fn)
    assert compat.compute_dtype(fp8) == torch.bfloat16
    cast = SimpleNamespace(manual_cast_dtype=torch.float16, get_dtype=lambda: torch.float8_e4m3fn)
    assert compat.compute_dtype(cast) == torch.float16
    newer = SimpleNamespace(get_dtype_inference=lambda: torch.bfloat16, manual_cast_dtype=None,
                            get_dtype=lambda: torch.float8_e4m3fn)
    assert compat.compute_dtype(newer) == torch.bfloat16


# ---------------------------------------------------------------------------------------------------------------------
# FLUX.2 and Qwen-Image: the key maps the pack relies on, and what this host's map lacks

# diffusers FLUX.2 names ComfyUI's key map does not know, per host (read from the sources): 0.3.75 maps FLUX.2 through
# FLUX.1's flux_to_diffusers; 0.38 adds ff.linear_in/linear_out and the single blocks' to_qkv_mlp_proj / to_out.
FLUX2_UNMAPPED = {
    "0.3.75": {"transformer_blocks.N.ff.linear_in", "transformer_blocks.N.ff.linear_out",
               "transformer_blocks.N.ff_context.linear_in", "transformer_blocks.N.ff_context.linear_out",
               "single_transformer_blocks.N.attn.to_qkv_mlp_proj", "single_transformer_blocks.N.attn.to_out",
               "double_stream_modulation_img.linear", "double_stream_modulation_txt.linear",
               "single_stream_modulation.linear", "time_guidance_embed.timestep_embedder.linear_1",
               "time_guidance_embed.timestep_embedder.linear_2", "time_guidance_embed.guidance_embedder.linear_1",
               "time_guidance_embed.guidance_embedder.linear_2"},
}
FLUX2_UNMAPPED["0.38"] = {k for k in FLUX2_UNMAPPED["0.3.75"] if not k.startswith(("transformer_blocks", "single"))}


def _built(comfy, cls, config):
    model_config = cls(dict(config))
    model_config.set_inference_dtype(torch.float32, None)
    return model_config.get_model({})


def test_flux2_key_map_of_this_host(comfy_inproc):
    """The FLUX.2 names this host's key map lacks are one of the known sets (the pack applies them through the BFL
    weights, whose generic ``diffusion_model.<name>`` / ``lora_unet_<name>`` keys every host maps); a new host that
    maps more (or fewer) names fails here by name. Where both map a name, they agree
    (tests/test_lora_new_editors.py)."""
    import re

    from tiny_models import FLUX2_COMFY

    comfy = comfy_inproc.comfy
    model = _built(comfy, comfy.supported_models.Flux2, FLUX2_COMFY)
    assert isinstance(model, comfy.model_base.Flux2) and isinstance(model, comfy.model_base.Flux)
    key_map = comfy.lora.model_lora_keys_unet(model, {})
    state = set(model.state_dict())
    layouts = importlib.import_module(f"{comfy_inproc.pack.__name__}.analogy_core.layouts")
    layout = layouts.flux2_layout_from_dims(layouts.FluxDims(32, 96, 2, 2, 16, 24, 16, 0, True))
    unmapped = set()
    for path in layout.shapes:
        target = key_map.get("transformer." + path)
        if target is None or (target if isinstance(target, str) else target[0]) not in state:
            unmapped.add(re.sub(r"blocks\.\d+\.", "blocks.N.", path))
    assert unmapped in FLUX2_UNMAPPED.values(), sorted(unmapped)
    for native in ("double_blocks.0.img_mlp.0", "single_blocks.1.linear1", "double_stream_modulation_img.lin"):
        key = f"diffusion_model.{native}.weight"
        assert key in state and key_map[f"diffusion_model.{native}"] == key
        assert key_map["lora_unet_" + native.replace(".", "_")] == key


def test_qwen_image_key_map_of_this_host(comfy_inproc, compat):
    """ComfyUI's Qwen-Image uses diffusers' module names: every linear is mapped from its diffusers name with and
    without ``transformer.``, from ``diffusion_model.<name>`` and kohya's ``lora_unet_<name_>``."""
    from tiny_models import QWEN_COMFY

    comfy = comfy_inproc.comfy
    model = _built(comfy, comfy.supported_models.QwenImage, QWEN_COMFY)
    assert type(model) is comfy.model_base.QwenImage
    assert compat.model_family(SimpleNamespace(model=model)) == "qwen_image"
    key_map = comfy.lora.model_lora_keys_unet(model, {})
    layouts = importlib.import_module(f"{comfy_inproc.pack.__name__}.analogy_core.layouts")
    layout = layouts.qwen_image_layout(**{k: v for k, v in QWEN_COMFY.items() if k != "image_model"})
    state = model.state_dict()
    for path, shape in layout.shapes.items():
        key = f"diffusion_model.{path}.weight"
        assert tuple(state[key].shape) == shape, path
        for name in (path, "transformer." + path, "diffusion_model." + path, "lora_unet_" + path.replace(".", "_")):
            assert key_map[name] == key, name


# ---------------------------------------------------------------------------------------------------------------------
# CLIP vision


TINY_CLIP = dict(hidden_size=32, intermediate_size=64, num_attention_heads=2, num_hidden_layers=3, patch_size=14,
                 image_size=56, projection_dim=16, hidden_act="quick_gelu", layer_norm_eps=1e-5, num_channels=3)


@pytest.fixture(scope="module")
def clip_pair(comfy_inproc, tmp_path_factory):
    """(transformers CLIPVisionModelWithProjection, ComfyUI ClipVisionModel) with the same float32 weights."""
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    reference = CLIPVisionModelWithProjection(CLIPVisionConfig(**TINY_CLIP)).eval()
    randomize_(reference, seed=3)
    clip_vision = float32_clip_vision(tmp_path_factory.mktemp("clip") / "config.json",
                                      dict(TINY_CLIP, model_type="clip_vision_model"), reference.state_dict())
    return reference, clip_vision


def test_clip_vision_output_tuple(compat, clip_pair):
    """model(pixel_values=..., intermediate_output=-2) returns (last hidden state, penultimate layer's tokens,
    projected image_embeds, multimodal projection); Encode Analogy reads [2] and [1]."""
    reference, clip_vision = clip_pair
    assert clip_vision.image_size == 56 and clip_vision.return_all_hidden_states is False
    assert isinstance(clip_vision.load_device, torch.device) and hasattr(clip_vision.patcher, "model_size")
    model = clip_vision.model
    assert model.vision_model.embeddings.patch_embedding.weight.shape == (32, 3, 14, 14)
    assert model.visual_projection.weight.shape == (16, 32) and len(model.vision_model.encoder.layers) == 3
    pixels = torch.randn(2, 3, 56, 56, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        out = model(pixel_values=pixels, intermediate_output=-2)
        ref = reference(pixel_values=pixels, output_hidden_states=True)
    assert len(out) == 4 and out[3] is None
    torch.testing.assert_close(out[0], ref.last_hidden_state, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(out[1], ref.hidden_states[-2], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(out[2], ref.image_embeds, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(out[1], out[0], atol=1e-3)
    assert compat.clip_vision_model_type(clip_vision) == "clip_vision_model"


def test_clip_vision_model_type_on_newer_hosts(compat):
    assert compat.clip_vision_model_type(SimpleNamespace(model_type="siglip2_vision_model")) == "siglip2_vision_model"
    assert compat.clip_vision_model_type(SimpleNamespace(return_all_hidden_states=True)) == "siglip_vision_model"


def test_clip_preprocess_home(compat, comfy_inproc, monkeypatch):
    """0.3.75 defines clip_preprocess in comfy.clip_vision; newer hosts in comfy.clip_model (with an alias left in
    clip_vision). compat prefers the new home and matches the host's function."""
    import comfy.clip_model
    import comfy.clip_vision

    image = torch.rand(1, 40, 70, 3, generator=torch.Generator().manual_seed(5))
    assert callable(comfy.clip_vision.clip_preprocess) and not hasattr(comfy.clip_model, "clip_preprocess")
    torch.testing.assert_close(compat.clip_preprocess(image, size=56),
                               comfy.clip_vision.clip_preprocess(image, size=56))
    assert compat.clip_preprocess(image, size=56).shape == (1, 3, 56, 56)
    monkeypatch.setattr(comfy.clip_model, "clip_preprocess", lambda image, **kw: ("new home", kw), raising=False)
    assert compat.clip_preprocess(image, size=56) == ("new home", {"size": 56})


# ---------------------------------------------------------------------------------------------------------------------
# folder_paths


def test_folder_paths_calls(comfy_inproc, tmp_path):
    import folder_paths

    name = "analogy_contract_probe"
    root = tmp_path / name
    (root / "sub").mkdir(parents=True)
    for file in ("x.safetensors", "sub/y.safetensors", "z.ckpt"):
        (root / file).write_bytes(b"0")
    assert isinstance(folder_paths.models_dir, str)
    assert {".safetensors", ".ckpt"} <= set(folder_paths.folder_names_and_paths["loras"][1])
    try:
        folder_paths.add_model_folder_path(name, str(root))
        paths, extensions = folder_paths.folder_names_and_paths[name]
        assert paths == [str(root)] and isinstance(paths, list) and len(extensions) == 0  # new folder: any file
        assert sorted(folder_paths.get_filename_list(name)) == ["sub/y.safetensors", "x.safetensors", "z.ckpt"]
        folder_paths.folder_names_and_paths[name] = (paths, {".safetensors"})  # what nodes/lorweb.py does
        folder_paths.filename_list_cache.pop(name, None)
        assert folder_paths.get_filename_list(name) == ["sub/y.safetensors", "x.safetensors"]
        assert folder_paths.get_folder_paths(name) == [str(root)]
        assert folder_paths.get_full_path(name, "sub/y.safetensors") == str(root / "sub" / "y.safetensors")
        assert folder_paths.get_full_path(name, "missing.safetensors") is None
        assert folder_paths.get_full_path("no_such_folder_kind", "x.safetensors") is None
        with pytest.raises(FileNotFoundError):
            folder_paths.get_full_path_or_raise(name, "missing.safetensors")
    finally:
        folder_paths.folder_names_and_paths.pop(name, None)
        folder_paths.filename_list_cache.pop(name, None)


# ---------------------------------------------------------------------------------------------------------------------
# runtime mode on newer hosts: model compiler, multi-GPU rebuilds


def small_runtime_lora(lora_mod):
    gen = torch.Generator().manual_seed(12)
    path = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    return lora_mod.LoRA({path: lora_mod.LoRALayer(torch.randn(4, 32, generator=gen),
                                                   torch.randn(32, 4, generator=gen), 1.0)}, "sd15")


def run(patcher):
    comfy_ext = __import__("comfy.patcher_extension").patcher_extension
    gen = torch.Generator().manual_seed(13)
    x, t, ctx = torch.randn(1, 4, 8, 8, generator=gen), torch.tensor([300.0]), torch.randn(1, 5, 32, generator=gen)
    base = patcher.model
    wrappers = comfy_ext.get_all_wrappers(comfy_ext.WrappersMP.APPLY_MODEL, {"wrappers": patcher.wrappers})
    executor = comfy_ext.WrapperExecutor.new_class_executor(
        lambda: base.diffusion_model(x, timesteps=t, context=ctx), base, wrappers)
    with torch.no_grad():
        return executor.execute()


def test_runtime_mode_pauses_the_model_compiler(comfy_inproc, sd, monkeypatch):
    """Newer hosts compile CUDA graphs of whole blocks (comfy/model_prefetch.py) whose replays skip Python forward
    hooks; runtime mode switches ``args.disable_comfy_compiler`` on for its model calls and restores it after. The CI
    host has no such switch and is left untouched."""
    from comfy.cli_args import args

    assert not hasattr(args, "disable_comfy_compiler")
    patched, _ = comfy_inproc.nodes.ApplyLoRAToModel().apply(sd, small_runtime_lora(comfy_inproc.lora), 1.0,
                                                              "runtime", False)
    observed = []
    handle = sd.model.diffusion_model.register_forward_pre_hook(
        lambda module, inputs: observed.append(getattr(args, "disable_comfy_compiler", None)))
    try:
        run(patched)
        assert observed == [None] and not hasattr(args, "disable_comfy_compiler")
        monkeypatch.setattr(args, "disable_comfy_compiler", False, raising=False)
        out = run(patched)
        assert observed[-1] is True and args.disable_comfy_compiler is False
        monkeypatch.setattr(args, "disable_comfy_compiler", True)  # the user's --disable-comfy-compiler stays
        torch.testing.assert_close(run(patched), out)
        assert observed[-1] is True and args.disable_comfy_compiler is True
    finally:
        handle.remove()
    assert (out - run(sd)).abs().mean() > 1e-3, "the runtime LoRA was active"


def test_overlapping_pauses_restore_the_compiler_only_when_the_last_one_ends(compat, monkeypatch):
    """Newer hosts sample on several GPUs at once, one thread each (``samplers.outer_sample``'s MultiGPUThreadPool),
    and ``args.disable_comfy_compiler`` is process-wide: thread A's pause ending while thread B's model call runs must
    not switch the compiler back on under B; the last pause to end restores what the first one found."""
    import threading

    from comfy.cli_args import args

    for found in (False, True):
        monkeypatch.setattr(args, "disable_comfy_compiler", found, raising=False)
        inside, release, seen = {n: threading.Event() for n in "AB"}, {n: threading.Event() for n in "AB"}, {}

        def model_call(name: str) -> None:
            with compat.model_compiler_paused():
                inside[name].set()
                release[name].wait(10)
                seen[name] = args.disable_comfy_compiler

        threads = {n: threading.Thread(target=model_call, args=(n,)) for n in "AB"}
        try:
            threads["A"].start()
            assert inside["A"].wait(10) and args.disable_comfy_compiler is True
            threads["B"].start()
            assert inside["B"].wait(10)
            release["A"].set()
            threads["A"].join(10)
            assert args.disable_comfy_compiler is True        # B is still inside its model call
            release["B"].set()
            threads["B"].join(10)
            assert seen == {"A": True, "B": True} and args.disable_comfy_compiler is found
        finally:  # a failed assert must not leave a thread to restore the switch after monkeypatch undid it
            for name, thread in threads.items():
                release[name].set()
                if thread.ident is not None:                  # started
                    thread.join(10)
            assert not any(t.is_alive() for t in threads.values())


def test_runtime_weights_rebuild_for_multi_gpu(comfy_inproc, sd):
    """Newer hosts rebuild a model's additional models for each extra GPU from ``cached_patcher_init`` (and raise
    without it); the rebuilt weights carry the same token, which the wrapper uses to find the copy ComfyUI loaded
    for the running patcher."""
    patch = comfy_inproc.patch
    lora = small_runtime_lora(comfy_inproc.lora)
    patched, _ = comfy_inproc.nodes.ApplyLoRAToModel().apply(sd, lora, 1.0, "runtime", False)
    [weights_patcher] = patched.get_additional_models()
    factory, factory_args = weights_patcher.cached_patcher_init
    for rebuilt in (factory(*factory_args), factory(*factory_args, disable_dynamic=True)):
        assert rebuilt.model is not weights_patcher.model and rebuilt.model.token == weights_patcher.model.token
        for ours, theirs in zip(weights_patcher.model.parameters(), rebuilt.model.parameters()):
            assert torch.equal(ours, theirs)
    [wrapper] = patched.get_all_wrappers(comfy_inproc.comfy.patcher_extension.WrappersMP.APPLY_MODEL)
    assert isinstance(wrapper, patch.RuntimeLoRA)
    other_gpu = patched.clone()
    other_gpu.set_additional_models(patch.RUNTIME_WRAPPER_KEY, [rebuilt])
    assert wrapper._weights_for(SimpleNamespace(current_patcher=other_gpu)) is rebuilt.model
    assert wrapper._weights_for(SimpleNamespace(current_patcher=None)) is weights_patcher.model
