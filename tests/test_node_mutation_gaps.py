"""What a mutation sweep of ``nodes/`` (stop 46: 119 mutants over the eight node modules other than the composite's)
found no test for: LoRA application edge cases (a LoRA of unknown family, nothing matching with allow_partial, an
unknown mode, the reported size, chained runtime LoRAs, a key-map slice along another dimension, factor dtypes after
a detach, offloaded factors, strided convolutions), the model families ComfyUI's classes map to, a Linear patch
embedding's patch size, Composite By Region's broadcasting, resizing and alpha (and a 2-D mask, which made a batch
of H images), the region preview's colours, the instruction mask from ComfyUI's T5 tokens and the T5 folder names,
Save LoRA's names and precision, Load LoRA's text-encoder note, Load LoRA Hypernetwork / Generate LoRA (the file's
description, the chosen item, a negative strength, the defaults), the pack's .safetensors-only model folders and
every node's Python defaults. Each test was checked to fail on its mutant (the offload test's ``cpu`` case pins the
shared storage on a CPU host, where the mutants change nothing). Runs on ComfyUI's own classes in this process
(``comfy_inproc``)."""

from __future__ import annotations

import importlib
from types import SimpleNamespace

import pytest
import torch

from analogy_core.loc import build_hypernetwork, generate_lora, save_hypernetwork
from test_loc_core import analogy, config_for, perturb_u_b
from test_lora_comfy import comfy_sd_out, rel_err, small_lora
from tiny_models import SD_DIFFUSERS, randomize_, tiny_sd_pair


def pack_module(comfy_inproc, name: str):
    return importlib.import_module(f"{comfy_inproc.pack.__name__}.{name}")


@pytest.fixture(scope="module")
def sd(comfy_inproc):
    return tiny_sd_pair(comfy_inproc.comfy)[1]


# ---------------------------------------------------------------------------------------------------------------------
# Apply LoRA to Model (nodes/lora.py, nodes/lora_patch.py)

def test_a_lora_of_unknown_family_applies_to_any_model(comfy_inproc, sd):
    _, info = comfy_inproc.nodes.ApplyLoRAToModel().apply(sd, small_lora(comfy_inproc.lora, family="unknown"),
                                                          1.0, "merge", False)
    assert "matched 3/3" in info


def test_a_lora_matching_nothing_is_refused_even_with_allow_partial(comfy_inproc, sd):
    lora = small_lora(comfy_inproc.lora, paths={"down_blocks.7.attentions.0.transformer_blocks.0.attn1.to_q": (32, 32)})
    with pytest.raises(ValueError, match="none of the LoRA's 1 layers matches"):
        comfy_inproc.nodes.ApplyLoRAToModel().apply(sd, lora, 1.0, "merge", True)


def test_an_unknown_mode_is_refused(comfy_inproc, sd):
    with pytest.raises(ValueError, match="mode must be one of"):
        comfy_inproc.nodes.ApplyLoRAToModel().apply(sd, small_lora(comfy_inproc.lora), 1.0, "bogus", False)


def test_the_info_reports_the_lora_weights_size_in_kilobytes(comfy_inproc, sd):
    lora = small_lora(comfy_inproc.lora)
    _, info = comfy_inproc.nodes.ApplyLoRAToModel().apply(sd, lora, 1.0, "runtime", False)
    expected = sum((layer.down.numel() + layer.up.numel()) * 4 for layer in lora.layers.values())
    assert f"{expected / 1024:.1f} KB of LoRA weights" in info


def test_chained_runtime_loras_each_find_their_own_weights(comfy_inproc, sd):
    import comfy.patcher_extension as extension

    node = comfy_inproc.nodes.ApplyLoRAToModel()
    once, _ = node.apply(sd, small_lora(comfy_inproc.lora, seed=1), 1.0, "runtime", False)
    twice, _ = node.apply(once, small_lora(comfy_inproc.lora, seed=2), 1.0, "runtime", False)
    wrappers = twice.get_all_wrappers(extension.WrappersMP.APPLY_MODEL)
    weights = [patcher.model for patcher in twice.get_additional_models()]
    assert len(wrappers) == 2 and weights[0] is not weights[1]
    for wrapper, own in zip(wrappers, weights):
        assert wrapper._weights_for(SimpleNamespace(current_patcher=twice)) is own


def test_runtime_mode_refuses_a_key_map_slice_along_another_dimension(comfy_inproc, sd, monkeypatch):
    """ComfyUI's key maps may slice a fused weight (e.g. FLUX's qkv); runtime mode adds rows (dim 0) only."""
    lora = small_lora(comfy_inproc.lora, paths={"down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q": (32, 32)})
    [path] = lora.layers
    sliced = {path: ("diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight", (1, 0, 16))}
    monkeypatch.setattr(comfy_inproc.patch, "check_compatible", lambda *args: (sliced, ""))
    with pytest.raises(ValueError, match="along dim 1; runtime mode handles dim 0 only"):
        comfy_inproc.nodes.ApplyLoRAToModel().apply(sd, lora, 1.0, "runtime", False)


def test_runtime_factors_keep_the_compute_dtype_after_a_detach(comfy_inproc, sd):
    patched, _ = comfy_inproc.nodes.ApplyLoRAToModel().apply(sd, small_lora(comfy_inproc.lora, dtype=torch.bfloat16),
                                                              1.0, "runtime", False)
    [weights] = patched.get_additional_models()
    size = weights.model_size()
    weights.detach(unpatch_all=True)
    assert all(p.dtype == torch.float32 for p in weights.model.parameters()) and weights.model_size() == size


@pytest.mark.parametrize("offload", ["cpu", "meta"])
def test_offloaded_runtime_factors_share_the_loras_tensors_only_on_their_device(comfy_inproc, offload):
    """After an offload the factors are put back onto the LoRA's own float32 tensors (so the host does not hold
    them twice), but only where those live: offloaded to ``meta`` they stay there."""
    comfy = comfy_inproc.comfy
    import comfy.sampler_helpers

    base_model = tiny_sd_pair(comfy, seed=5)[1].model
    patcher = comfy.model_patcher.ModelPatcher(base_model, load_device=torch.device("cpu"),
                                               offload_device=torch.device(offload))
    lora = small_lora(comfy_inproc.lora, seed=6)  # float32, the model's dtype: the factors share its storage
    patched, _ = comfy_inproc.nodes.ApplyLoRAToModel().apply(patcher, lora, 0.8, "runtime", False)
    [weights] = patched.get_additional_models()
    comfy.sampler_helpers.prepare_sampling(patched, [1, 4, 8, 8], {}, model_options={})
    comfy.model_management.unload_all_models()
    sources = {t.data_ptr() for layer in lora.layers.values() for t in (layer.down, layer.up)}
    params = list(weights.model.parameters())
    assert len(params) == 2 * len(lora.layers)
    if offload == "meta":
        assert all(p.is_meta for p in params)
    else:
        assert {p.data_ptr() for p in params} == sources


def test_runtime_mode_on_a_strided_convolution_equals_merge(comfy_inproc, sd):
    lora = small_lora(comfy_inproc.lora, paths={"down_blocks.0.downsamplers.0.conv": (32, 32, 3, 3)})
    node = comfy_inproc.nodes.ApplyLoRAToModel()
    gen = torch.Generator().manual_seed(3)
    x, t, ctx = torch.randn(1, 4, 8, 8, generator=gen), torch.tensor([400.0]), torch.randn(1, 5, 32, generator=gen)
    merged = comfy_sd_out(node.apply(sd, lora, 1.0, "merge", False)[0], x, t, ctx)
    runtime = comfy_sd_out(node.apply(sd, lora, 1.0, "runtime", False)[0], x, t, ctx)
    assert rel_err(merged, comfy_sd_out(sd, x, t, ctx)) > 0.01, "the LoRA must change the output"
    assert rel_err(runtime, merged) <= 1e-4


# ---------------------------------------------------------------------------------------------------------------------
# Save LoRA's file names (nodes/lora.py)

@pytest.mark.parametrize("prefix, expected", [
    ("a/x.safetensors", ("a", "x.safetensors")),     # the extension is not doubled
    ("my:lo*ra?", ("my_lo_ra_.safetensors",)),        # odd characters become "_"
    ("sub\\x", ("sub", "x.safetensors")),             # a Windows separator is a folder
])
def test_save_lora_cleans_the_prefix(comfy_inproc, tmp_path, prefix, expected):
    assert comfy_inproc.nodes.safe_lora_path(tmp_path, prefix, True) == tmp_path.joinpath(*expected)


def test_save_lora_writes_the_chosen_precision(comfy_inproc, tmp_path, monkeypatch):
    from safetensors import safe_open

    monkeypatch.setattr(comfy_inproc.nodes.folder_paths, "get_folder_paths", lambda kind: [str(tmp_path)])
    result = comfy_inproc.nodes.SaveLoRA().save(small_lora(comfy_inproc.lora), "x", "peft", True, dtype="float16")
    assert result["result"] == ("x.safetensors",)
    with safe_open(str(tmp_path / "x.safetensors"), "pt") as file:
        dtypes = {file.get_tensor(key).dtype for key in file.keys()}
    assert dtypes == {torch.float16}


def test_load_lora_reports_the_text_encoder_layers_it_leaves_out(comfy_inproc, tmp_path, monkeypatch):
    from safetensors.torch import save_file

    gen = torch.Generator().manual_seed(0)
    state = {}
    for prefix, width in (("lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q", 320),  # SD1.5 widths
                          ("lora_te_text_model_encoder_layers_0_self_attn_q_proj", 768)):
        state[f"{prefix}.lora_down.weight"] = torch.randn(4, width, generator=gen)
        state[f"{prefix}.lora_up.weight"] = torch.randn(width, 4, generator=gen)
    save_file(state, str(tmp_path / "kohya.safetensors"))
    monkeypatch.setattr(comfy_inproc.nodes.folder_paths, "get_full_path_or_raise",
                        lambda kind, name: str(tmp_path / name))
    lora, info = comfy_inproc.nodes.LoadLoRA().load("kohya.safetensors")
    assert len(lora.layers) == 1 and "1 text-encoder layers left out" in info
    # no .alpha key and no peft config: the layers read at scale 1 are said to be so
    assert "1 layers carry no alpha" in info and "lora_alpha / r" in info
    state["lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.alpha"] = torch.tensor(2.0)
    save_file(state, str(tmp_path / "kohya.safetensors"))
    lora, info = comfy_inproc.nodes.LoadLoRA().load("kohya.safetensors")
    assert "carry no alpha" not in info and next(iter(lora.layers.values())).scale == 0.5
    # a peft folder: the alphas from its adapter_config.json, said so (ComfyUI's loader does not read it)
    del state["lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.alpha"]
    (tmp_path / "peft").mkdir()
    save_file(state, str(tmp_path / "peft" / "adapter_model.safetensors"))
    (tmp_path / "peft" / "adapter_config.json").write_text('{"peft_type": "LORA", "r": 4, "lora_alpha": 12}')
    lora, info = comfy_inproc.nodes.LoadLoRA().load("peft/adapter_model.safetensors")
    assert "alphas from the adapter_config.json" in info and "carry no alpha" not in info
    assert next(iter(lora.layers.values())).scale == 3.0


def test_save_lora_refuses_a_folder_linked_outside_the_loras_folder(comfy_inproc, tmp_path):
    root, outside = tmp_path / "loras", tmp_path / "outside"
    root.mkdir()
    outside.mkdir()
    (root / "link").symlink_to(outside)
    with pytest.raises(ValueError, match="points outside models/loras"):
        comfy_inproc.nodes.safe_lora_path(root, "link/x", True)


# ---------------------------------------------------------------------------------------------------------------------
# The model families (nodes/comfy_compat.py)

def test_model_families_of_comfyuis_classes(comfy_inproc):
    compat = pack_module(comfy_inproc, "nodes.comfy_compat")
    base_classes, supported = comfy_inproc.comfy.model_base, comfy_inproc.comfy.supported_models
    sdxl_ip2p = base_classes.SDXL_instructpix2pix.__new__(base_classes.SDXL_instructpix2pix)
    assert compat.model_family(SimpleNamespace(model=sdxl_ip2p)) == "sdxl", "a subclass of SDXL is SDXL"
    base = base_classes.BaseModel.__new__(base_classes.BaseModel)
    object.__setattr__(base, "model_config", supported.SD20.__new__(supported.SD20))
    assert compat.model_family(SimpleNamespace(model=base)) == "sd20"
    flux = base_classes.Flux.__new__(base_classes.Flux)
    object.__setattr__(flux, "model_config", SimpleNamespace(unet_config={"image_model": "flux2"}))
    assert compat.model_family(SimpleNamespace(model=flux)) == "flux2"
    double = SimpleNamespace(manual_cast_dtype=None, get_dtype=lambda: torch.float64)
    assert compat.compute_dtype(double) == torch.float64


def test_encoder_info_reads_the_patch_size_of_a_linear_patch_embedding(comfy_inproc):
    """SigLIP2 NaFlex embeds patches with a Linear [hidden, 3·p·p]; without a config the patch side is read from it."""
    analogy_nodes = pack_module(comfy_inproc, "nodes.analogy")
    vision = SimpleNamespace(embeddings=SimpleNamespace(patch_embedding=torch.nn.Linear(3 * 16 * 16, 48)),
                             encoder=SimpleNamespace(layers=[None] * 3))
    clip_vision = SimpleNamespace(model_type="siglip2_vision_model", config=None, image_size=256,
                                  model=SimpleNamespace(vision_model=vision))
    info = analogy_nodes.encoder_info(clip_vision)
    assert (info.family, info.patch_size, info.hidden_dim, info.embed_dim, info.num_layers, info.image_size) == (
        "siglip2", 16, 48, 48, 3, 256)


# ---------------------------------------------------------------------------------------------------------------------
# Composite By Region and the region preview (nodes/regions.py)

def test_composite_by_region_broadcasts_resizes_the_mask_and_drops_alpha(comfy_inproc):
    regions = pack_module(comfy_inproc, "nodes.regions")
    gen = torch.Generator().manual_seed(0)
    original = torch.rand(2, 8, 6, 3, generator=gen)
    edited = torch.rand(1, 8, 6, 4, generator=gen)                    # one RGBA image for a batch of two
    mask = torch.zeros(1, 4, 3)
    mask[:, :2] = 1.0                                                 # the top half, at half resolution
    out = regions.CompositeByRegion().composite(original, edited, mask)[0]
    full = torch.nn.functional.interpolate(mask[None], size=(8, 6), mode="bilinear", align_corners=False)[0, 0]
    assert 0 < full.mean() < 1, "the region must cover part of the image"
    expected = original * (1 - full[None, :, :, None]) + edited[..., :3] * full[None, :, :, None]
    assert out.shape == (2, 8, 6, 3)
    torch.testing.assert_close(out, expected)
    assert torch.equal(out[:, full == 0], original[:, full == 0]), "outside: the original bit for bit"
    with pytest.raises(ValueError, match="original has a batch of 2; expected 1 or 3"):
        regions.CompositeByRegion().composite(original, edited.repeat(3, 1, 1, 1), mask)


def test_composite_by_region_takes_a_single_2d_mask(comfy_inproc):
    """A [height, width] mask once set the batch from its first dimension: 8 images out of one."""
    regions = pack_module(comfy_inproc, "nodes.regions")
    gen = torch.Generator().manual_seed(1)
    original, edited = torch.rand(1, 8, 6, 3, generator=gen), torch.rand(1, 8, 6, 3, generator=gen)
    mask = torch.zeros(8, 6)
    mask[:, 3:] = 1.0
    out = regions.CompositeByRegion().composite(original, edited, mask)[0]
    assert out.shape == (1, 8, 6, 3)
    assert torch.equal(out[..., :3, :], original[..., :3, :]) and torch.equal(out[..., 3:, :], edited[..., 3:, :])
    with pytest.raises(ValueError, match="MASK"):
        regions.CompositeByRegion().composite(original, edited, torch.ones(1, 1, 8, 6))
    with pytest.raises(ValueError, match="original: expected an IMAGE"):
        regions.CompositeByRegion().composite(original[0], edited, mask)


def test_composite_by_region_resizes_an_edited_image_of_another_size_to_the_original(comfy_inproc):
    """A sampler's output of another size (here twice the original's 8 x 6, a non-square one so that width and height
    cannot be mixed up unseen) is resized to the original's height and width before the blend."""
    from analogy_core.composite import resize

    regions = pack_module(comfy_inproc, "nodes.regions")
    gen = torch.Generator().manual_seed(2)
    original, edited = torch.rand(1, 8, 6, 3, generator=gen), torch.rand(1, 16, 12, 3, generator=gen)
    mask = torch.zeros(1, 8, 6)
    mask[:, 4:] = 1.0
    out = regions.CompositeByRegion().composite(original, edited, mask)[0]
    assert out.shape == (1, 8, 6, 3)
    assert torch.equal(out[:, :4], original[:, :4])
    torch.testing.assert_close(out[:, 4:], resize(edited, 6, 8)[:, 4:])

def test_the_region_preview_tints_the_region_red_and_dims_the_rest(comfy_inproc):
    regions = pack_module(comfy_inproc, "nodes.regions")
    image = torch.full((1, 2, 2, 3), 0.5)
    soft = torch.tensor([[[1.0, 0.0], [0.0, 0.0]]])
    out = regions.preview(image, soft, (soft > 0).float())
    torch.testing.assert_close(out[0, 0, 0], torch.tensor([0.75, 0.325, 0.3]))   # 0.5·0.5 + (1, 0.15, 0.1)·0.5
    torch.testing.assert_close(out[0, 1, 1], torch.tensor([0.325, 0.325, 0.325]))  # 0.5 · (1 − 0.35)


# ---------------------------------------------------------------------------------------------------------------------
# Generate LoRA (nodes/loc.py)

@pytest.fixture(scope="module")
def loc_unet():
    from diffusers import UNet2DConditionModel

    model = UNet2DConditionModel(**dict(SD_DIFFUSERS, in_channels=8)).eval()
    randomize_(model, seed=1)
    return model


def test_the_hypernetwork_loads_from_models_loc_with_its_description(comfy_inproc, loc_unet, tmp_path, monkeypatch):
    loc_nodes = pack_module(comfy_inproc, "nodes.loc")
    hypernetwork = build_hypernetwork(config_for(loc_unet), seed=2)
    save_hypernetwork(hypernetwork, tmp_path / "h.safetensors")
    monkeypatch.setattr(loc_nodes.folder_paths, "get_full_path",
                        lambda kind, name: str(tmp_path / name) if (tmp_path / name).is_file() else None)
    loaded, info = loc_nodes.LoadLoRAHypernetwork().load("h.safetensors")
    assert info.startswith(loaded.config.describe()) and "rank" in info
    assert info.endswith("records no encoder fingerprint (the encoder's weights are not checked)")
    with pytest.raises(ValueError, match="not found in models/loc"):
        loc_nodes.LoadLoRAHypernetwork().load("missing.safetensors")
    inputs = loc_nodes.GenerateLoRA.INPUT_TYPES()["required"]
    assert (inputs["direction"][1]["default"], inputs["strength"][1]["default"], inputs["sample"][1]["default"]) == (
        "forward", 1.0, 0), "a new node generates H(A, A') of the first item at full strength"


def test_generate_lora_uses_the_chosen_item_and_a_negative_strength(comfy_inproc, loc_unet):
    hypernetwork = build_hypernetwork(config_for(loc_unet), seed=2)
    perturb_u_b(hypernetwork)
    item = analogy(batch=2, seed=5)
    node = pack_module(comfy_inproc, "nodes.loc").GenerateLoRA()

    def deltas(lora):
        return {k: v.delta_weight() for k, v in lora.layers.items()}

    first = deltas(node.generate(hypernetwork, item, "forward", 1.0, 0)[0])
    second = deltas(node.generate(hypernetwork, item, "forward", 1.0, 1)[0])
    negative = deltas(node.generate(hypernetwork, item, "forward", -0.5, 1)[0])
    key = next(iter(first))
    assert second[key].abs().max() > 0 and not torch.allclose(first[key], second[key]), "the items must differ"
    reference = deltas(generate_lora(hypernetwork, item, "forward", 1.0, sample=1))
    assert second.keys() == reference.keys()
    for name, delta in reference.items():
        torch.testing.assert_close(second[name], delta)
        torch.testing.assert_close(negative[name], -0.5 * delta)


# ---------------------------------------------------------------------------------------------------------------------
# Predict Edit Region's instruction from ComfyUI's own text encoder, and the T5 folder names (nodes/regions.py)

class FakeDualClip:
    """A CLIP of two tokenizers whose sequences have the conditioning's length: CLIP-L (pad 0) and T5 (pad 1)."""

    def __init__(self, t5_ids: list[int]):
        self.t5_ids = t5_ids
        self.tokenizer = SimpleNamespace(clip_l=SimpleNamespace(pad_token=0), t5xxl=SimpleNamespace(pad_token=1))

    def tokenize(self, text):
        return {"l": [[(i, 1.0) for i in (7, 0, 0)]], "t5xxl": [[(i, 1.0) for i in self.t5_ids]]}

    def encode_from_tokens(self, tokens):
        return torch.arange(12.0).view(1, 3, 4)


def test_the_instruction_mask_comes_from_the_t5_tokens_and_is_never_empty(comfy_inproc):
    regions = pack_module(comfy_inproc, "nodes.regions")
    cond, mask = regions.comfy_t5_tokens(FakeDualClip([5, 9, 1]), "make it red")
    assert torch.equal(cond, torch.arange(12.0).view(1, 3, 4))
    assert mask.tolist() == [[True, True, False]], "T5's padding (id 1) masked, not CLIP-L's"
    _, empty = regions.comfy_t5_tokens(FakeDualClip([1, 1, 1]), "")
    assert empty.tolist() == [[True, False, False]], "an all-padding instruction keeps its first token"


def test_instruction_encoder_names_stay_one_level_inside_the_text_encoders_folder(comfy_inproc, tmp_path, monkeypatch):
    regions = pack_module(comfy_inproc, "nodes.regions")
    root = tmp_path / "text_encoders"
    (root / "t5").mkdir(parents=True)
    for folder in (root / "t5", tmp_path):  # a valid folder inside, and one above the root
        (folder / "config.json").write_text("{}")
        (folder / "x.safetensors").write_bytes(b"")
    monkeypatch.setattr(regions.folder_paths, "get_folder_paths", lambda kind: [str(root)])
    assert regions.instruction_encoder_path("t5/x.safetensors") == str(root / "t5")
    assert regions.instruction_encoder_path("t5\\x.safetensors") == str(root / "t5")
    for name in ("../x.safetensors", "./x.safetensors", "t5/x.bin", "x.safetensors"):
        assert regions.instruction_encoder_path(name) is None, name


# ---------------------------------------------------------------------------------------------------------------------
# The pack's model folders list .safetensors files only (nodes/lorweb.py, nodes/loc.py)

@pytest.mark.parametrize("module, folder", [("nodes.lorweb", "lorweb"), ("nodes.loc", "loc")])
def test_the_packs_model_folders_list_safetensors_only(comfy_inproc, tmp_path, monkeypatch, module, folder):
    folder_paths = pack_module(comfy_inproc, module).folder_paths
    for name in ("x.ckpt", "notes.pt", "y.safetensors"):
        (tmp_path / name).write_bytes(b"")
    extensions = folder_paths.folder_names_and_paths[folder][1]
    monkeypatch.setitem(folder_paths.folder_names_and_paths, folder, ([str(tmp_path)], extensions))
    monkeypatch.setattr(folder_paths, "filename_list_cache", {})
    assert folder_paths.get_filename_list(folder) == ["y.safetensors"]


# ---------------------------------------------------------------------------------------------------------------------
# Every node: an input's widget default is the function's own default (an API prompt may omit optional inputs)

def test_every_nodes_python_defaults_equal_its_widget_defaults(comfy_inproc):
    import inspect

    checked = 0
    for name, node in comfy_inproc.pack.NODE_CLASS_MAPPINGS.items():
        parameters = inspect.signature(getattr(node, node.FUNCTION)).parameters
        for section in ("required", "optional"):
            for key, spec in node.INPUT_TYPES().get(section, {}).items():
                options = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
                default = parameters[key].default if key in parameters else inspect.Parameter.empty
                if "default" in options and default is not inspect.Parameter.empty:
                    assert default == options["default"], (name, key, default, options["default"])
                    checked += 1
    assert checked >= 5, "five inputs have a Python default today; fewer means an API prompt must now give one"


def test_composite_by_region_refuses_an_edited_image_with_fewer_channels(comfy_inproc):
    """An RGBA original with an RGB edit cannot be blended channel for channel (more channels are cut instead)."""
    regions = pack_module(comfy_inproc, "nodes.regions")
    original, mask = torch.rand(1, 8, 6, 4), torch.ones(1, 8, 6)
    assert regions.CompositeByRegion().composite(original[..., :3], original, mask)[0].shape == (1, 8, 6, 3)
    with pytest.raises(ValueError, match="edited has 3 channels, original 4"):
        regions.CompositeByRegion().composite(original, torch.rand(1, 8, 6, 3), mask)


def test_load_region_model_names_a_missing_file(comfy_inproc, monkeypatch):
    regions = pack_module(comfy_inproc, "nodes.regions")
    monkeypatch.setattr(regions.folder_paths, "get_full_path", lambda kind, name: None)
    with pytest.raises(ValueError, match="region checkpoint 'missing.safetensors' not found in models/regions"):
        regions.LoadRegionModel().load("missing.safetensors")
