"""The LoRA core on the editors users run today: FLUX.2 (dev, klein) and Qwen-Image(-Edit), on tiny models.

Each tiny model exists twice with the same weights: diffusers' own class (Flux2Transformer2DModel,
QwenImageTransformer2DModel) and ComfyUI's (model_base.Flux2, model_base.QwenImage). The reference is peft's LoRA on
the diffusers model; the pack's Load LoRA + Apply LoRA (merge and runtime) on ComfyUI's model must give the same output,
and so must ComfyUI's stock loader (comfy.sd.load_lora_for_models, what LoraLoader calls) on the same file. Every
comparison first checks that the LoRA changes the output.
"""

from __future__ import annotations

import importlib

import pytest
import torch
from peft.tuners.lora import LoraLayer
from safetensors.torch import save_file

from test_lora_comfy import add_peft_lora, rel_err, set_peft_strength
from tiny_models import FLUX2_COMFY, QWEN_COMFY, comfy_model, randomize_, tiny_flux2_pair, tiny_qwen_pair

RANK, ALPHA = 3, 6  # alpha / rank = 2: a reader that ignores alpha is caught


# ---------------------------------------------------------------------------------------------------------------------
# forward passes of both twins


def flux2_inputs(seed: int = 0, batch: int = 2, h: int = 3, w: int = 4, txt: int = 5) -> dict:
    gen = torch.Generator().manual_seed(seed)
    img_ids = torch.zeros(h, w, 4)
    img_ids[..., 1] = torch.arange(h)[:, None]
    img_ids[..., 2] = torch.arange(w)[None, :]
    txt_ids = torch.zeros(txt, 4)
    txt_ids[:, 3] = torch.arange(txt)
    return dict(img=torch.randn(batch, h * w, 16, generator=gen), txt=torch.randn(batch, txt, 24, generator=gen),
                img_ids=img_ids.reshape(h * w, 4), txt_ids=txt_ids, t=torch.tensor([0.3, 0.8][:batch]),
                guidance=torch.tensor([2.5] * batch))


def run_diffusers_flux2(model, inp: dict) -> torch.Tensor:
    return model(hidden_states=inp["img"], encoder_hidden_states=inp["txt"], timestep=inp["t"], img_ids=inp["img_ids"],
                 txt_ids=inp["txt_ids"], guidance=inp["guidance"]).sample


def run_comfy_flux2(flux, inp: dict) -> torch.Tensor:
    b = inp["img"].shape[0]
    return flux.forward_orig(inp["img"], inp["img_ids"].expand(b, -1, -1), inp["txt"],
                             inp["txt_ids"].expand(b, -1, -1), inp["t"], None, guidance=inp["guidance"])


def qwen_inputs(seed: int = 0, batch: int = 2, side: int = 8, txt: int = 5) -> dict:
    """A square latent: ComfyUI 0.3.75 and diffusers place the image's rope positions differently on non-square
    grids (1.6 % apart at 3 x 4 tokens), identically on square ones."""
    gen = torch.Generator().manual_seed(seed)
    return dict(x=torch.randn(batch, 4, 1, side, side, generator=gen), ctx=torch.randn(batch, txt, 24, generator=gen),
                t=torch.tensor([0.3, 0.8][:batch]))


def _pack(x: torch.Tensor) -> torch.Tensor:
    b, c, _, h, w = x.shape
    return x[:, :, 0].reshape(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // 2) * (w // 2),
                                                                                             c * 4)


def run_diffusers_qwen(model, inp: dict) -> torch.Tensor:
    b, _, _, h, w = inp["x"].shape
    return model(hidden_states=_pack(inp["x"]), encoder_hidden_states=inp["ctx"],
                 encoder_hidden_states_mask=torch.ones(b, inp["ctx"].shape[1]), timestep=inp["t"],
                 img_shapes=[[(1, h // 2, w // 2)]] * b).sample


def run_comfy_qwen(qwen, inp: dict) -> torch.Tensor:
    return _pack(qwen(inp["x"], inp["t"], inp["ctx"]))


RUNNERS = {"flux2": (flux2_inputs, run_diffusers_flux2, run_comfy_flux2),
           "qwen_image": (qwen_inputs, run_diffusers_qwen, run_comfy_qwen)}


def comfy_out(patcher, family: str, inp: dict) -> torch.Tensor:
    """ComfyUI's model under the patcher's weights and APPLY_MODEL wrappers (runtime mode's hooks)."""
    ext = importlib.import_module("comfy.patcher_extension")
    patcher.patch_model()
    try:
        base = patcher.model
        wrappers = ext.get_all_wrappers(ext.WrappersMP.APPLY_MODEL, {"wrappers": patcher.wrappers})
        executor = ext.WrapperExecutor.new_class_executor(
            lambda: RUNNERS[family][2](base.diffusion_model, inp), base, wrappers)
        with torch.no_grad():
            return executor.execute()
    finally:
        patcher.unpatch_model()


def diffusers_out(model, family: str, inp: dict, strength: float | None) -> torch.Tensor:
    """The diffusers twin with peft's LoRA at ``strength`` (None: adapters off)."""
    with torch.no_grad():
        if strength is None:
            model.disable_adapters()
            try:
                return RUNNERS[family][1](model, inp)
            finally:
                model.enable_adapters()
        set_peft_strength(model, strength)
        return RUNNERS[family][1](model, inp)


# ---------------------------------------------------------------------------------------------------------------------
# fixtures: tiny twins with a peft LoRA on every linear layer


def linear_names(model) -> list[str]:
    return [name for name, module in model.named_modules() if isinstance(module, torch.nn.Linear)]


def peft_factors(model) -> dict[str, tuple[torch.Tensor, torch.Tensor, float]]:
    """{module path: (A, B, alpha / r)} of the peft adapter."""
    out = {}
    for name, module in model.named_modules():
        if isinstance(module, LoraLayer):
            out[name] = (module.lora_A["default"].weight.detach().clone(),
                         module.lora_B["default"].weight.detach().clone(),
                         module.lora_alpha["default"] / module.r["default"])  # not .scaling: strength
    return out


def save_diffusers_lora(model, config, path, pipeline_cls):
    from peft.utils import get_peft_model_state_dict

    pipeline_cls.save_lora_weights(path.parent, weight_name=path.name,
                                   transformer_lora_layers=get_peft_model_state_dict(model),
                                   transformer_lora_adapter_metadata=config.to_dict())
    return path


@pytest.fixture(scope="module")
def flux2(comfy_inproc, tmp_path_factory):
    from diffusers import Flux2Pipeline

    model, patcher = tiny_flux2_pair(comfy_inproc.comfy, seed=31)
    config = add_peft_lora(model, linear_names(model), rank=RANK, alpha=ALPHA, seed=32)
    path = save_diffusers_lora(model, config, tmp_path_factory.mktemp("flux2") / "peft.safetensors", Flux2Pipeline)
    return model, patcher, path


@pytest.fixture(scope="module")
def qwen(comfy_inproc, tmp_path_factory):
    from diffusers import QwenImagePipeline

    model, patcher = tiny_qwen_pair(comfy_inproc.comfy, seed=33)
    config = add_peft_lora(model, linear_names(model), rank=RANK, alpha=ALPHA, seed=34)
    path = save_diffusers_lora(model, config, tmp_path_factory.mktemp("qwen") / "peft.safetensors", QwenImagePipeline)
    return model, patcher, path


@pytest.fixture(scope="module")
def pack(comfy_inproc):
    name = comfy_inproc.pack.__name__
    return type("Pack", (), {m: importlib.import_module(f"{name}.analogy_core.{m}")
                             for m in ("layouts", "lora_io", "lora_formats", "lora")})


def setup_for(request, family):
    return request.getfixturevalue({"flux2": "flux2", "qwen_image": "qwen"}[family])


def test_the_twins_compute_the_same(flux2, qwen):
    for family, (model, patcher, _) in (("flux2", flux2), ("qwen_image", qwen)):
        inp = RUNNERS[family][0](seed=1)
        ref = diffusers_out(model, family, inp, None)
        assert ref.std() > 0.1
        assert rel_err(comfy_out(patcher, family, inp), ref) <= 1e-5, family


# ---------------------------------------------------------------------------------------------------------------------
# the diffusers/peft file: detected, applied exactly in both modes


@pytest.mark.parametrize("family", ["flux2", "qwen_image"])
def test_diffusers_file_is_detected_by_names_and_shapes(request, pack, family):
    model, _, path = setup_for(request, family)
    parsed = pack.lora_io.load_lora_file(path)  # no layout given: the family and widths come from the file
    lora = parsed.lora
    assert lora.family == family and parsed.key_format == "diffusers"
    assert set(lora.layers) == set(peft_factors(model)) and len(lora) > 20
    assert all(layer.scale == ALPHA / RANK for layer in lora.layers.values())  # from lora_adapter_metadata
    assert lora.compatible_families == (family,), "its MLP / single-block names belong to this family only"


@pytest.mark.parametrize("strength", [1.0, -0.5])
@pytest.mark.parametrize("mode", ["merge", "runtime"])
@pytest.mark.parametrize("family", ["flux2", "qwen_image"])
def test_apply_matches_peft_on_diffusers(request, comfy_inproc, pack, family, mode, strength):
    model, patcher, path = setup_for(request, family)
    lora = pack.lora_io.load_lora_file(path).lora
    inp = RUNNERS[family][0](seed=2)
    ref, base = diffusers_out(model, family, inp, strength), diffusers_out(model, family, inp, None)
    assert rel_err(base, ref) > 0.05, "the LoRA must visibly change the output"
    patched, info = comfy_inproc.nodes.ApplyLoRAToModel().apply(patcher, lora, strength, mode, False)
    assert f"matched {len(lora)}/{len(lora)} LoRA layers of the {family} model" in info
    out = comfy_out(patched, family, inp)
    assert rel_err(out, ref) <= 1e-5, (rel_err(out, ref), rel_err(out, base))
    assert rel_err(comfy_out(patcher, family, inp), base) <= 1e-5, "the input model is untouched"


# ---------------------------------------------------------------------------------------------------------------------
# the other formats in circulation, written here from peft's factors (independently of the pack's writers)

FLUX2_QKV = {"img_attn.qkv": ("to_q", "to_k", "to_v"), "txt_attn.qkv": ("add_q_proj", "add_k_proj", "add_v_proj")}
FLUX2_NATIVE = {  # diffusers suffix -> BFL suffix, blocks and globals (as diffusers' own Flux2 converters name them)
    "attn.to_out.0": "img_attn.proj", "attn.to_add_out": "txt_attn.proj", "ff.linear_in": "img_mlp.0",
    "ff.linear_out": "img_mlp.2", "ff_context.linear_in": "txt_mlp.0", "ff_context.linear_out": "txt_mlp.2",
    "attn.to_qkv_mlp_proj": "linear1", "attn.to_out": "linear2",
    "x_embedder": "img_in", "context_embedder": "txt_in", "proj_out": "final_layer.linear",
    "time_guidance_embed.timestep_embedder.linear_1": "time_in.in_layer",
    "time_guidance_embed.timestep_embedder.linear_2": "time_in.out_layer",
    "time_guidance_embed.guidance_embedder.linear_1": "guidance_in.in_layer",
    "time_guidance_embed.guidance_embedder.linear_2": "guidance_in.out_layer",
    "double_stream_modulation_img.linear": "double_stream_modulation_img.lin",
    "double_stream_modulation_txt.linear": "double_stream_modulation_txt.lin",
    "single_stream_modulation.linear": "single_stream_modulation.lin",
}


def flux2_native_factors(factors: dict) -> dict[str, tuple[torch.Tensor, torch.Tensor, float]]:
    """peft's FLUX.2 factors under BFL names: q/k/v as one block-diagonal LoRA of the fused qkv (exact), norm_out's
    rows in BFL's (shift, scale) order."""
    out = {}
    for path, (a, b, scale) in factors.items():
        if path == "norm_out.linear":
            out["final_layer.adaLN_modulation.1"] = (a, torch.cat(b.chunk(2)[::-1]), scale)
            continue
        block = path.split(".")[:2] if path.startswith(("transformer_blocks", "single_transformer")) else None
        suffix = ".".join(path.split(".")[2:]) if block else path
        if block and suffix.split(".")[-1] in sum(FLUX2_QKV.values(), ()):
            continue
        prefix = (("double_blocks." if block[0] == "transformer_blocks" else "single_blocks.") + block[1] + "."
                  if block else "")
        out[prefix + FLUX2_NATIVE[suffix]] = (a, b, scale)
    for n in range(FLUX2_COMFY["depth"]):
        for fused, parts in FLUX2_QKV.items():
            pieces = [factors[f"transformer_blocks.{n}.attn.{p}"] for p in parts]
            down = torch.cat([a for a, _, _ in pieces])
            up = torch.block_diag(*[b for _, b, _ in pieces])
            out[f"double_blocks.{n}.{fused}"] = (down, up, pieces[0][2])
    return out


def write_format(factors: dict, form: str, path) -> None:
    """ai-toolkit (diffusion_model.<name>.lora_A/B, scale folded), kohya/musubi (lora_unet_<name_>.lora_down/up +
    alpha), ComfyUI (diffusion_model.<name>.lora_down/up + alpha), bare names (<name>.lora_A/B, scale folded)."""
    tensors = {}
    for name, (a, b, scale) in factors.items():
        rank = a.shape[0]
        if form in ("aitoolkit", "bare"):
            base = ("diffusion_model." if form == "aitoolkit" else "") + name
            tensors[f"{base}.lora_A.weight"], tensors[f"{base}.lora_B.weight"] = a, b * scale
        else:
            base = "lora_unet_" + name.replace(".", "_") if form == "kohya" else "diffusion_model." + name
            tensors[f"{base}.lora_down.weight"], tensors[f"{base}.lora_up.weight"] = a, b
            tensors[f"{base}.alpha"] = torch.tensor(scale * rank)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))


FORMATS = [("flux2", "aitoolkit"), ("flux2", "kohya"), ("flux2", "comfyui"),
           ("qwen_image", "aitoolkit"), ("qwen_image", "kohya"), ("qwen_image", "comfyui"), ("qwen_image", "bare")]


@pytest.mark.parametrize("family, form", FORMATS)
def test_formats_in_circulation_equal_peft_and_the_stock_loader(request, comfy_inproc, pack, tmp_path, family, form):
    import comfy.sd
    import comfy.utils

    model, patcher, _ = setup_for(request, family)
    factors = peft_factors(model)
    path = tmp_path / f"{form}.safetensors"
    write_format(flux2_native_factors(factors) if family == "flux2" else factors, form, path)
    parsed = pack.lora_io.load_lora_file(path)
    assert parsed.lora.family == family and set(parsed.lora.layers) == set(factors)
    inp = RUNNERS[family][0](seed=3)
    ref, base = diffusers_out(model, family, inp, 0.7), diffusers_out(model, family, inp, None)
    assert rel_err(base, ref) > 0.05
    node = comfy_inproc.nodes.ApplyLoRAToModel()
    for mode in ("merge", "runtime"):
        ours = comfy_out(node.apply(patcher, parsed.lora, 0.7, mode, False)[0], family, inp)
        assert rel_err(ours, ref) <= 1e-5, (mode, rel_err(ours, ref))
    state = comfy.utils.load_torch_file(str(path), safe_load=True)
    stock, _ = comfy.sd.load_lora_for_models(patcher, None, state, 0.7, 0.0)
    written = sum(k.endswith((".lora_A.weight", ".lora_down.weight")) for k in state)
    assert len(stock.patches) == written, "ComfyUI's stock loader maps every layer of the file"
    assert rel_err(comfy_out(stock, family, inp), ref) <= 1e-5


def test_flux2_diffusers_names_and_comfyuis_key_map(flux2, comfy_inproc, pack):
    """Where ComfyUI's key map knows a FLUX.2 diffusers name it targets what the pack's table says; the names it does
    not know (ComfyUI 0.3.75: the MLPs, the fused single blocks, the shared modulations, the timestep embedder) are
    still applied by the pack, through the BFL weight they live in."""
    import comfy.lora

    model, patcher, path = flux2
    lora = pack.lora_io.load_lora_file(path).lora
    ours = pack.lora_formats.comfy_patch_keys(lora, pack.lora_formats.layout_for_lora(lora))
    key_map = comfy.lora.model_lora_keys_unet(patcher.model, {})
    probe = torch.randn(8, 3)
    known = [p for p in ours if "transformer." + p in key_map]
    for p in known:
        theirs, mine = key_map["transformer." + p], ours[p]
        if isinstance(mine, tuple) and len(mine) == 3:
            assert mine[:2] == theirs[:2] and torch.equal(mine[2](probe), theirs[2](probe)), p
        else:
            assert mine == theirs, p
    assert len(known) >= 6 * FLUX2_COMFY["depth"] + 2, "q/k/v slices, projections and the global layers"


# ---------------------------------------------------------------------------------------------------------------------
# Save LoRA: what each reader gets


@pytest.mark.parametrize("family", ["flux2", "qwen_image"])
def test_saved_auto_file_is_read_identically_by_comfyui_diffusers_and_peft(request, comfy_inproc, pack, tmp_path,
                                                                           family):
    import comfy.sd
    import comfy.utils
    from diffusers import Flux2Pipeline, Flux2Transformer2DModel, QwenImagePipeline, QwenImageTransformer2DModel

    model, patcher, path = setup_for(request, family)
    lora = pack.lora_io.load_lora_file(path).lora
    if family == "flux2":  # diffusers' FLUX.2 converter maps BFL's final_layer.adaLN_modulation.1 onto norm_out
        # without swapping its (shift, scale) halves, so that one layer is left out of the diffusers comparison
        lora = type(lora)({k: v for k, v in lora.layers.items() if k != "norm_out.linear"}, lora.family)
    saved = pack.lora_io.save_lora_file(lora, tmp_path / "ours.safetensors", "auto")
    keys = list(comfy.utils.load_torch_file(str(saved), safe_load=True))
    expected_prefix = "diffusion_model." if family == "flux2" else "transformer."
    assert all(k.startswith(expected_prefix) and k.endswith((".lora_A.weight", ".lora_B.weight")) for k in keys)
    inp = RUNNERS[family][0](seed=4)
    # ComfyUI's stock loader = the pack's Apply
    stock, _ = comfy.sd.load_lora_for_models(patcher, None, comfy.utils.load_torch_file(str(saved), safe_load=True),
                                             0.8, 0.0)
    ours, _ = comfy_inproc.nodes.ApplyLoRAToModel().apply(patcher, lora, 0.8, "merge", False)
    a, b = comfy_out(stock, family, inp), comfy_out(ours, family, inp)
    assert rel_err(a, comfy_out(patcher, family, inp)) > 0.05 and rel_err(a, b) <= 1e-5
    # diffusers' loader (peft underneath) on a fresh twin = the same LoRA applied by the pack
    pipeline, cls = (Flux2Pipeline, Flux2Transformer2DModel) if family == "flux2" else (
        QwenImagePipeline, QwenImageTransformer2DModel)
    fresh = cls.from_config(model.config).eval()
    fresh.load_state_dict({k.replace(".base_layer", ""): v for k, v in model.state_dict().items() if "lora_" not in k})
    fresh.load_lora_adapter(pipeline.lora_state_dict(str(saved)), prefix="transformer", adapter_name="ours")
    fresh.set_adapters(["ours"], [0.8])
    with torch.no_grad():
        got = RUNNERS[family][1](fresh, inp)
    assert rel_err(got, b) <= 1e-5


# ---------------------------------------------------------------------------------------------------------------------
# width-flexible acceptance, refusal by family name


def wider_twin(comfy, family: str):
    """A ComfyUI model of the same family with 3 heads instead of 2 (hidden 48 instead of 32)."""
    config = dict(FLUX2_COMFY if family == "flux2" else QWEN_COMFY)
    if family == "flux2":
        config.update(hidden_size=48, num_heads=3)
        cls = comfy.supported_models.Flux2
    else:
        config.update(num_attention_heads=3)
        cls = comfy.supported_models.QwenImage
    model_config = cls(dict(config))
    model_config.set_inference_dtype(torch.float32, None)
    base = model_config.get_model({})
    randomize_(base.diffusion_model, seed=40)
    return comfy_model(comfy, cls, config, base.diffusion_model.state_dict())


@pytest.mark.parametrize("family", ["flux2", "qwen_image"])
def test_a_lora_of_another_width_loads_and_apply_names_the_layer_that_does_not_fit(request, comfy_inproc, pack,
                                                                                   family):
    _, _, path = setup_for(request, family)
    lora = pack.lora_io.load_lora_file(path).lora  # hidden 32: far from any published width, accepted at load
    wide = wider_twin(comfy_inproc.comfy, family)
    first = "context_embedder" if family == "flux2" else "img_in"  # the first layer in the file's order
    native = "txt_in" if family == "flux2" else "img_in"
    shape = "32 x 24" if family == "flux2" else "32 x 16"
    for mode in ("merge", "runtime"):
        with pytest.raises(ValueError, match=rf"^{first}: LoRA is \[{shape}\] but the model's layer "
                                             rf"diffusion_model\.{native}\.weight is \[48 x \d+\] "
                                             rf"\({len(lora)} of {len(lora)} layers do not fit this model\)"):
            comfy_inproc.nodes.ApplyLoRAToModel().apply(wide, lora, 1.0, mode, False)
    subset = type(lora)({"transformer_blocks.0.attn.to_q": lora.layers["transformer_blocks.0.attn.to_q"]}, family)
    key = "double_blocks.0.img_attn.qkv" if family == "flux2" else "transformer_blocks.0.attn.to_q"
    with pytest.raises(ValueError, match=rf"^transformer_blocks\.0\.attn\.to_q: LoRA is \[32 x 32\] but the "
                                         rf"model's layer diffusion_model\.{key}\.weight is \[48 x 48\]$"):
        comfy_inproc.nodes.ApplyLoRAToModel().apply(wide, subset, 1.0, "merge", False)


def test_a_narrower_flux1_lora_is_accepted_at_load(pack):
    """FLUX.1 at width 32 (not 3072): read against the layout its own shapes imply; the fused native weights are split
    at its own widths."""
    gen = torch.Generator().manual_seed(5)
    h, m = 32, 128
    tensors = {"diffusion_model.single_blocks.0.linear1.lora_down.weight": torch.randn(2, h, generator=gen),
               "diffusion_model.single_blocks.0.linear1.lora_up.weight": torch.randn(3 * h + m, 2, generator=gen),
               "diffusion_model.double_blocks.1.img_mlp.0.lora_down.weight": torch.randn(2, h, generator=gen),
               "diffusion_model.double_blocks.1.img_mlp.0.lora_up.weight": torch.randn(m, 2, generator=gen)}
    lora = pack.lora_formats.parse_state_dict(tensors).lora
    assert lora.family == "flux"
    assert {p: (layer.out_features, layer.in_features) for p, layer in lora.layers.items()} == {
        "single_transformer_blocks.0.attn.to_q": (h, h), "single_transformer_blocks.0.attn.to_k": (h, h),
        "single_transformer_blocks.0.attn.to_v": (h, h), "single_transformer_blocks.0.proj_mlp": (m, h),
        "transformer_blocks.1.ff.net.0.proj": (m, h)}
    up = tensors["diffusion_model.single_blocks.0.linear1.lora_up.weight"]
    assert torch.equal(lora.layers["single_transformer_blocks.0.proj_mlp"].up, up[3 * h:])


def test_loras_of_another_family_are_refused_by_name(comfy_inproc, flux2, qwen, pack):
    lora_mod = pack.lora
    node = comfy_inproc.nodes.ApplyLoRAToModel()

    def one(path, out, inp):
        return pack.lora_formats.parse_state_dict({f"transformer.{path}.lora_A.weight": torch.ones(2, inp),
                                                   f"transformer.{path}.lora_B.weight": torch.ones(out, 2)}).lora

    flux1 = one("transformer_blocks.0.ff.net.0.proj", 128, 32)
    assert flux1.compatible_families == ("flux",)
    flux2_lora = one("single_transformer_blocks.0.attn.to_qkv_mlp_proj", 3 * 32 + 2 * 96, 32)
    qwen_lora = one("transformer_blocks.0.img_mlp.net.0.proj", 128, 32)
    assert flux2_lora.compatible_families == ("flux2",) and qwen_lora.compatible_families == ("qwen_image",)
    for lora, patcher, family in ((flux1, flux2[1], "flux2"), (qwen_lora, flux2[1], "flux2"),
                                  (flux2_lora, qwen[1], "qwen_image"), (flux1, qwen[1], "qwen_image")):
        with pytest.raises(ValueError, match=f"this LoRA is for {lora.family} but the model is {family}"):
            node.apply(patcher, lora, 1.0, "merge", False)
    shared = one("transformer_blocks.0.attn.to_q", 32, 32)  # attention q of a double block: all three have it
    assert set(shared.compatible_families) == {"flux", "flux2", "qwen_image"}
    assert isinstance(shared, lora_mod.LoRA)
    for patcher, family in ((flux2[1], "flux2"), (qwen[1], "qwen_image")):
        assert "matched 1/1" in node.apply(patcher, shared, 1.0, "merge", False)[1]


def test_headers_name_the_new_families(pack):
    hint = pack.lora_formats.family_hint
    assert hint({"modelspec.architecture": "Flux.2-dev/lora"}) == "flux2"
    assert hint({"modelspec.architecture": "flux-2-klein-4b/lora"}) == "flux2"
    assert hint({"ss_base_model_version": "qwen_image"}) == "qwen_image"
    assert hint({"modelspec.architecture": "qwen-image-edit-2509/lora"}) == "qwen_image"
    assert hint({"modelspec.architecture": "flux-1-dev/lora"}) == "flux"
    assert hint({"analogy.family": "flux2"}) == "flux2"
