"""The LoRA type, its algebra and its file formats (no ComfyUI)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from analogy_core.files import TensorFileError, read_safetensors
from analogy_core.layouts import flux_layout, standard_layout, unet_layout
from analogy_core.lora import LoRA, LoRAError, LoRALayer
from analogy_core.lora_formats import comfy_patch_keys, parse_state_dict, to_state_dict
from analogy_core.lora_io import load_lora_file, save_lora_file
from tiny_models import FLUX_DIFFUSERS, SD_DIFFUSERS

GEN = torch.Generator().manual_seed(0)


def rand(*shape):
    return torch.randn(*shape, generator=GEN)


def random_lora(layout, rank=3, family=None, paths=None, scale=0.7) -> LoRA:
    layers = {}
    for path in paths or layout.shapes:
        shape = layout.shapes[path]
        down_shape = (rank, shape[1], *shape[2:])
        up_shape = (shape[0], rank, *([1, 1] if len(shape) == 4 else []))
        layers[path] = LoRALayer(rand(*down_shape), rand(*up_shape), scale)
    return LoRA(layers, family=family or layout.family)


@pytest.fixture(scope="module")
def tiny_flux():
    return flux_layout(**FLUX_DIFFUSERS)


@pytest.fixture(scope="module")
def tiny_sd():
    return unet_layout(SD_DIFFUSERS, "sd15")


def assert_same_updates(a: LoRA, b: LoRA):
    assert set(a.layers) == set(b.layers)
    for path in a.layers:
        torch.testing.assert_close(b.layers[path].delta_weight(torch.float64),
                                   a.layers[path].delta_weight(torch.float64), rtol=1e-5, atol=1e-6)


# -- the type ---------------------------------------------------------------------------------------------------------


def test_delta_weight_is_scaled_up_times_down():
    layer = LoRALayer(rand(4, 6), rand(5, 4), scale=0.25)
    expected = 0.25 * layer.up.double() @ layer.down.double()
    assert expected.abs().max() > 0.1
    torch.testing.assert_close(layer.delta_weight(torch.float64), expected)
    conv = LoRALayer(rand(4, 6, 3, 3), rand(5, 4, 1, 1), 2.0)
    assert conv.delta_weight().shape == (5, 6, 3, 3)
    torch.testing.assert_close(conv.delta_weight()[:, :, 1, 2], 2.0 * conv.up[:, :, 0, 0] @ conv.down[:, :, 1, 2])


def test_rank_mismatch_and_bad_scale_are_refused():
    with pytest.raises(LoRAError, match="rank mismatch"):
        LoRALayer(rand(4, 6), rand(5, 3))
    with pytest.raises(LoRAError, match="finite"):
        LoRALayer(rand(4, 6), rand(5, 4), float("nan"))


def test_scaling_negation_and_concatenation_are_exact():
    a = LoRA({"x": LoRALayer(rand(2, 6), rand(5, 2), 0.5), "y": LoRALayer(rand(3, 4), rand(4, 3))}, "flux")
    b = LoRA({"x": LoRALayer(rand(4, 6), rand(5, 4), 2.0)}, "flux")
    torch.testing.assert_close((-a).layers["x"].delta_weight(), -a.layers["x"].delta_weight())
    torch.testing.assert_close(a.scaled(0.3).layers["y"].delta_weight(), 0.3 * a.layers["y"].delta_weight())
    both = LoRA.concatenate([a, b])
    assert both.layers["x"].rank == 6 and both.layers["y"].rank == 3
    torch.testing.assert_close(both.layers["x"].delta_weight(),
                               a.layers["x"].delta_weight() + b.layers["x"].delta_weight(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(a.folded().layers["x"].delta_weight(), a.layers["x"].delta_weight())
    with pytest.raises(LoRAError, match="different model families"):
        LoRA.concatenate([a, LoRA(b.layers, "sd15")])



def test_a_lora_of_unknown_family_joins_any_family_and_fits_metadata_must_name_the_own_family():
    """Concatenating: a LoRA whose family is unknown takes on the other's (two unknowns stay unknown). The "fits"
    metadata widens a LoRA's families only when it names the LoRA's own family; otherwise the own family alone."""
    from analogy_core.lora import FITS_KEY

    known = LoRA({"x": LoRALayer(rand(2, 6), rand(5, 2))}, "flux")
    unknown = LoRA({"x": LoRALayer(rand(3, 6), rand(5, 3))})
    assert LoRA.concatenate([unknown, known]).family == "flux"
    assert LoRA.concatenate([unknown, unknown]).family == "unknown"
    assert LoRA(known.layers, "sd15", metadata={FITS_KEY: "sd15,sdxl"}).compatible_families == ("sd15", "sdxl")
    assert LoRA(known.layers, "flux", metadata={FITS_KEY: "sd15,sdxl"}).compatible_families == ("flux",)

def test_non_finite_values_are_found():
    lora = LoRA({"x": LoRALayer(rand(2, 6), torch.full((5, 2), float("inf")))}, "flux")
    with pytest.raises(LoRAError, match="NaN or Inf.*'x'"):
        lora.check_finite()


# -- layouts ----------------------------------------------------------------------------------------------------------


def test_flux_layout_has_the_official_494_block_layers():
    layout = standard_layout("flux")
    blocks = [p for p in layout.shapes if p.startswith(("transformer_blocks.", "single_transformer_blocks."))]
    assert len(blocks) == 19 * 14 + 38 * 6 == 494
    assert layout.shapes["single_transformer_blocks.0.proj_out"] == (3072, 3072 + 12288)
    assert layout.native["single_transformer_blocks.3.proj_mlp"].path == "single_blocks.3.linear1"
    assert layout.native["single_transformer_blocks.3.proj_mlp"].offset == 3 * 3072
    assert layout.native_shape("double_blocks.0.img_attn.qkv") == (9216, 3072)


def test_sd15_layout_names_match_the_ldm_unet():
    layout = standard_layout("sd15")
    native = {p: t.path for p, t in layout.native.items()}
    assert native["down_blocks.1.attentions.1.transformer_blocks.0.attn2.to_k"] == \
        "input_blocks.5.1.transformer_blocks.0.attn2.to_k"
    assert native["up_blocks.3.attentions.2.proj_out"] == "output_blocks.11.1.proj_out"
    assert native["up_blocks.1.upsamplers.0.conv"] == "output_blocks.5.2.conv"
    assert native["up_blocks.0.upsamplers.0.conv"] == "output_blocks.2.1.conv"
    assert native["down_blocks.2.downsamplers.0.conv"] == "input_blocks.9.0.op"
    assert native["mid_block.resnets.1.time_emb_proj"] == "middle_block.2.emb_layers.1"
    assert layout.shapes["down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k"] == (320, 768)


# -- formats ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("key_format", ["peft", "kohya", "comfyui"])
def test_flux_formats_round_trip_exactly(tiny_flux, key_format):
    paths = [p for p in tiny_flux.native if p.startswith(("transformer_blocks", "single_transformer_blocks"))]
    lora = random_lora(tiny_flux, paths=paths + ["norm_out.linear"])
    tensors, meta = to_state_dict(lora, key_format, tiny_flux)
    if key_format == "comfyui":  # BFL keeps the final modulation as (shift, scale): up's halves swap
        up = lora.layers["norm_out.linear"].up
        torch.testing.assert_close(tensors["diffusion_model.final_layer.adaLN_modulation.1.lora_up.weight"],
                                   torch.cat([up[32:], up[:32]]))
    if key_format != "peft":  # fused native weights: one block-diagonal LoRA per qkv / linear1
        base = "lora_unet_single_blocks_0_linear1" if key_format == "kohya" else "diffusion_model.single_blocks.0.linear1"
        assert tensors[f"{base}.lora_down.weight"].shape == (4 * 3, 32)
        assert tensors[f"{base}.lora_up.weight"].shape == (3 * 32 + 128, 4 * 3)
    parsed = parse_state_dict(tensors, meta, tiny_flux)
    assert parsed.lora.family == "flux"
    assert_same_updates(lora, parsed.lora)


@pytest.mark.parametrize("key_format", ["peft", "kohya", "comfyui"])
def test_sd_formats_round_trip_exactly_including_convs(tiny_sd, key_format):
    lora = random_lora(tiny_sd, paths=list(tiny_sd.native))
    assert any(layer.is_conv for layer in lora.layers.values())
    tensors, meta = to_state_dict(lora, key_format, tiny_sd)
    parsed = parse_state_dict(tensors, meta, tiny_sd)
    assert_same_updates(lora, parsed.lora)


@pytest.mark.parametrize("key_format", ["peft", "kohya", "comfyui"])
def test_a_reversed_lora_keeps_its_sign_in_every_format(tiny_sd, key_format):
    """-H(A, A′) (LoC's LoRA Reverse) has scale −1: formats that fold the scale into ``up`` fold its sign too."""
    lora = random_lora(tiny_sd, paths=list(tiny_sd.native)[:4], scale=1.0)
    reversed_lora = -lora
    assert all(layer.scale == -1.0 for layer in reversed_lora.layers.values())
    parsed = parse_state_dict(*to_state_dict(reversed_lora, key_format, tiny_sd), tiny_sd).lora
    assert_same_updates(reversed_lora, parsed)
    path = next(iter(lora.layers))
    torch.testing.assert_close(parsed.layers[path].delta_weight(), -lora.layers[path].delta_weight())


def test_folding_a_negative_scale_moves_the_sign_into_up():
    layer = LoRALayer(rand(3, 6), rand(5, 3), -1.0)
    folded = layer.folded()
    assert folded.scale == 1.0
    torch.testing.assert_close(folded.up, -layer.up)
    torch.testing.assert_close(folded.delta_weight(), layer.delta_weight())


def test_auto_format_picks_what_comfyui_reads(tiny_sd, tiny_flux):
    sd_keys = to_state_dict(random_lora(tiny_sd, paths=list(tiny_sd.native)[:3]), "auto", tiny_sd)[0]
    assert all(k.startswith("lora_unet_") for k in sd_keys)
    flux_keys = to_state_dict(random_lora(tiny_flux, paths=["transformer_blocks.0.attn.to_q"]), "auto")[0]
    assert set(flux_keys) == {"transformer.transformer_blocks.0.attn.to_q.lora_A.weight",
                              "transformer.transformer_blocks.0.attn.to_q.lora_B.weight"}


def test_peft_alpha_metadata_is_honoured(tiny_flux):
    path = "transformer_blocks.1.attn.to_k"
    down, up = rand(4, 32), rand(32, 4)
    tensors = {f"transformer.{path}.lora_A.weight": down, f"transformer.{path}.lora_B.weight": up,
               "transformer.transformer_blocks.0.ff.net.2.lora_A.weight": rand(2, 128),
               "transformer.transformer_blocks.0.ff.net.2.lora_B.weight": rand(32, 2)}
    meta = {"lora_adapter_metadata": json.dumps({"r": 4, "lora_alpha": 8, "rank_pattern": {"ff.net.2": 2},
                                                 "alpha_pattern": {"ff.net.2": 1}})}
    lora = parse_state_dict(tensors, meta, tiny_flux).lora
    assert lora.layers[path].scale == pytest.approx(2.0)  # lora_alpha / r: what diffusers applies
    assert lora.layers["transformer_blocks.0.ff.net.2"].scale == pytest.approx(0.5)
    without = parse_state_dict(tensors, {}, tiny_flux).lora
    assert without.layers[path].scale == 1.0  # no alpha anywhere: scale 1, as ComfyUI and diffusers do


def test_rslora_metadata_scales_by_the_square_root_of_the_rank(tiny_flux):
    path = "transformer_blocks.1.attn.to_k"
    tensors = {f"transformer.{path}.lora_A.weight": rand(16, 32), f"transformer.{path}.lora_B.weight": rand(32, 16)}
    meta = {"lora_adapter_metadata": json.dumps({"r": 16, "lora_alpha": 8, "use_rslora": True})}
    assert parse_state_dict(tensors, meta, tiny_flux).lora.layers[path].scale == pytest.approx(8 / 16 ** 0.5)
    meta = {"lora_adapter_metadata": json.dumps({"r": 16, "lora_alpha": 8})}
    assert parse_state_dict(tensors, meta, tiny_flux).lora.layers[path].scale == pytest.approx(8 / 16)


@pytest.mark.parametrize("key_format", ["peft", "kohya", "comfyui"])
def test_layers_of_several_ranks_and_scales_round_trip(tiny_flux, key_format):
    """A written peft header's rank and alpha patterns must give each lower-rank layer its own scale back."""
    shapes = {p: tiny_flux.shapes[p] for p in ("transformer_blocks.0.attn.to_out.0", "transformer_blocks.0.ff.net.2",
                                               "single_transformer_blocks.0.proj_out")}  # unfused in every format
    lora = LoRA({path: LoRALayer(rand(rank, shape[1]), rand(shape[0], rank), scale)
                 for (path, shape), rank, scale in zip(shapes.items(), (4, 2, 1), (0.5, 3.0, -1.5))}, family="flux")
    tensors, meta = to_state_dict(lora, key_format, tiny_flux)
    assert_same_updates(lora, parse_state_dict(tensors, meta, tiny_flux).lora)


def test_kohya_alpha_tensor_sets_the_scale(tiny_sd):
    path = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    base = "lora_unet_" + path.replace(".", "_")
    tensors = {f"{base}.lora_down.weight": rand(8, 32), f"{base}.lora_up.weight": rand(32, 8),
               f"{base}.alpha": torch.tensor(4.0)}
    parsed = parse_state_dict(tensors, {}, tiny_sd)
    assert parsed.lora.layers[path].scale == 0.5 and parsed.key_format == "kohya"


@pytest.mark.parametrize("alpha", [torch.tensor(4), torch.tensor([4], dtype=torch.int32),
                                   torch.tensor(4, dtype=torch.uint8)])
def test_an_integer_alpha_is_read_as_its_value(tiny_sd, alpha):
    path = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    base = "lora_unet_" + path.replace(".", "_")
    tensors = {f"{base}.lora_down.weight": rand(8, 32), f"{base}.lora_up.weight": rand(32, 8), f"{base}.alpha": alpha}
    parsed = parse_state_dict(tensors, {}, tiny_sd)
    assert parsed.lora.layers[path].scale == 0.5 and parsed.layers_without_alpha == 0  # 4 / rank 8, as ComfyUI
    with pytest.raises(LoRAError, match=r"up is stored as torch.int64; LoRA weights are floating point"):
        parse_state_dict({**tensors, f"{base}.lora_up.weight": torch.ones(32, 8, dtype=torch.int64)}, {}, tiny_sd)
    for dtype in (torch.complex64, torch.bool):  # no number ComfyUI would read: refused, not cast
        with pytest.raises(LoRAError, match=f"alpha is stored as {dtype}"):
            parse_state_dict({**tensors, f"{base}.alpha": torch.tensor(4).to(dtype)}, {}, tiny_sd)


def test_layers_without_any_alpha_are_counted(tiny_flux):
    path = "transformer_blocks.1.attn.to_k"
    tensors = {f"transformer.{path}.lora_A.weight": rand(4, 32), f"transformer.{path}.lora_B.weight": rand(32, 4)}
    assert parse_state_dict(tensors, {}, tiny_flux).layers_without_alpha == 1
    meta = {"lora_adapter_metadata": json.dumps({"r": 4, "lora_alpha": 8})}
    assert parse_state_dict(tensors, meta, tiny_flux).layers_without_alpha == 0


def peft_folder(folder, config, header: dict | None = None, alpha=None):
    """A peft save_pretrained-style folder: adapter_model.safetensors (one FLUX layer) and adapter_config.json."""
    folder.mkdir(parents=True, exist_ok=True)
    key = "base_model.model.transformer_blocks.1.attn.to_k"
    tensors = {f"{key}.lora_A.weight": rand(4, 32), f"{key}.lora_B.weight": rand(32, 4)}
    if alpha is not None:
        tensors[f"{key}.alpha"] = torch.tensor(float(alpha))
    save_file(tensors, str(folder / "adapter_model.safetensors"), metadata=header)
    (folder / "adapter_config.json").write_text(config if isinstance(config, str) else json.dumps(config))
    return folder / "adapter_model.safetensors"


def test_a_peft_adapter_config_beside_the_weights_gives_the_alpha(tiny_flux, tmp_path):
    path = "transformer_blocks.1.attn.to_k"
    weights = peft_folder(tmp_path / "a", {"peft_type": "LORA", "r": 4, "lora_alpha": 8})
    parsed = load_lora_file(weights, tiny_flux)
    assert parsed.lora.layers[path].scale == 2.0 and parsed.peft_config_source == "adapter_config.json"
    rs = peft_folder(tmp_path / "rs", {"r": 4, "lora_alpha": 8, "use_rslora": True})
    assert load_lora_file(rs, tiny_flux).lora.layers[path].scale == pytest.approx(4.0)  # alpha / sqrt(r)
    # the header's config wins over the side file, a layer's own .alpha over both
    header = {"lora_adapter_metadata": json.dumps({"r": 4, "lora_alpha": 2})}
    both = load_lora_file(peft_folder(tmp_path / "h", {"r": 4, "lora_alpha": 8}, header), tiny_flux)
    assert both.lora.layers[path].scale == 0.5 and both.peft_config_source == "header"
    own = load_lora_file(peft_folder(tmp_path / "o", {"r": 4, "lora_alpha": 8}, alpha=1.0), tiny_flux)
    assert own.lora.layers[path].scale == 0.25 and own.peft_config_source == ""


def test_an_adapter_config_is_read_only_beside_peft_s_own_weights_name(tiny_flux, tmp_path):
    """adapter_config.json belongs to adapter_model.safetensors (peft's save_pretrained): the same tensors under
    another name in that folder take no alpha from it (scale 1, said so), so a stray config never rescales them."""
    path = "transformer_blocks.1.attn.to_k"
    weights = peft_folder(tmp_path / "a", {"peft_type": "LORA", "r": 4, "lora_alpha": 8})
    assert load_lora_file(weights, tiny_flux).lora.layers[path].scale == 2.0
    renamed = weights.with_name("my_edit.safetensors")
    renamed.write_bytes(weights.read_bytes())
    parsed = load_lora_file(renamed, tiny_flux)
    assert parsed.lora.layers[path].scale == 1.0 and parsed.peft_config_source != "adapter_config.json"
    assert parsed.layers_without_alpha == 1


def test_several_patterns_fitting_a_layer_read_as_peft_reads_them(tiny_flux, tmp_path):
    """The first pattern key that fits wins, as in peft's get_pattern_key (checked against it, pattern by pattern)."""
    from peft.utils.other import get_pattern_key

    path = "transformer_blocks.1.attn.to_k"
    patterns = [{path: 2, "to_k": 16}, {"to_k": 16, path: 2}, {"attn.to_k": 6, "to_k": 16}, {"to_q": 1, "k": 3}]
    for alpha_pattern in patterns:
        weights = peft_folder(tmp_path / str(len(list(tmp_path.iterdir()))),
                              {"r": 4, "lora_alpha": 8, "alpha_pattern": alpha_pattern})
        expected = alpha_pattern.get(get_pattern_key(list(alpha_pattern), path), 8)
        assert load_lora_file(weights, tiny_flux).lora.layers[path].scale == expected / 4, alpha_pattern


@pytest.mark.parametrize("config, message", [
    ({"peft_type": "LOHA", "r": 4}, r"peft_type is 'LOHA'; this pack reads LoRA adapters"),
    ({"r": 4, "lora_alpha": 8, "use_dora": True}, r"use_dora is True — a DoRA adapter"),
    ({"r": 4, "lora_alpha": 8, "init_lora_weights": "pissa_niter_4"}, r"init_lora_weights is 'pissa_niter_4'"),
    ({"r": 4, "lora_alpha": 8, "init_lora_weights": "olora"}, r"a base weight its initialisation changed"),
    ({"r": 4, "lora_alpha": "8"}, r"adapter_config\.json: lora_alpha is '8', expected a number"),
    ({"r": 0, "lora_alpha": 8}, r"adapter_config\.json: r is 0, expected a positive integer"),
    ([4, 8], r"holds a JSON array of 2 items, expected a JSON object"),
    ('{"r": 4, "lora_alpha": NaN}', r"NaN"),
    ('{"r": 4,', r"adapter_config\.json"),
])
def test_a_bad_adapter_config_is_refused_by_name(tiny_flux, tmp_path, config, message):
    weights = peft_folder(tmp_path / "my lora", config)
    with pytest.raises(LoRAError, match=message) as err:
        load_lora_file(weights, tiny_flux)
    assert str(err.value).startswith("adapter_model.safetensors: adapter_config.json")


def test_old_diffusers_processor_keys(tiny_sd):
    base = "down_blocks.0.attentions.0.transformer_blocks.0.attn2.processor"
    tensors = {f"unet.{base}.to_k_lora.down.weight": rand(2, 32), f"unet.{base}.to_k_lora.up.weight": rand(32, 2),
               f"unet.{base}.to_out_lora.down.weight": rand(2, 32), f"unet.{base}.to_out_lora.up.weight": rand(32, 2)}
    lora = parse_state_dict(tensors, {}, tiny_sd).lora
    assert set(lora.layers) == {"down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k",
                                "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_out.0"}


def test_family_is_detected_from_names_and_shapes():
    flux_qkv = {"lora_unet_double_blocks_3_img_attn_qkv.lora_down.weight": rand(2, 3072),
                "lora_unet_double_blocks_3_img_attn_qkv.lora_up.weight": rand(9216, 2),
                "lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": rand(2, 768),
                "lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_up.weight": rand(3072, 2)}
    parsed = parse_state_dict(flux_qkv)
    assert parsed.lora.family == "flux" and parsed.text_encoder_keys == 1
    assert set(parsed.lora.layers) == {f"transformer_blocks.3.attn.to_{c}" for c in "qkv"}
    torch.testing.assert_close(parsed.lora.layers["transformer_blocks.3.attn.to_v"].up,
                               flux_qkv["lora_unet_double_blocks_3_img_attn_qkv.lora_up.weight"][6144:])
    k = "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k"
    sd15 = {f"{k}.lora_A.weight": rand(2, 768), f"{k}.lora_B.weight": rand(640, 2)}
    assert parse_state_dict(sd15).lora.family == "sd15"
    sdxl = {f"{k}.lora_A.weight": rand(2, 2048), f"{k}.lora_B.weight": rand(640, 2)}
    assert parse_state_dict(sdxl).lora.family == "sdxl"
    ldm = "lora_unet_input_blocks_4_1_transformer_blocks_1_attn2_to_k"  # kohya SDXL keys use LDM names
    sdxl_kohya = {f"{ldm}.lora_down.weight": rand(2, 2048), f"{ldm}.lora_up.weight": rand(640, 2)}
    parsed = parse_state_dict(sdxl_kohya)
    assert parsed.lora.family == "sdxl"
    assert set(parsed.lora.layers) == {"down_blocks.1.attentions.0.transformer_blocks.1.attn2.to_k"}


@pytest.mark.parametrize("tensors, message", [
    ({"a.lora_down.weight": torch.ones(2, 4), "a.lora_up.weight": torch.ones(4, 2), "a.dora_scale": torch.ones(4)},
     "unsupported LoRA variant: DoRA"),
    ({"transformer.x.lora_A": torch.ones(32, 4, 3), "transformer.x.lora_B": torch.ones(32, 3, 4),
      "transformer.x.lora_keys": torch.ones(32, 8)}, "LoRWeB basis"),
    ({"transformer.transformer_blocks.0.attn.to_q.lora_A": torch.ones(32, 3072, 4),
      "transformer.transformer_blocks.0.attn.to_q.lora_B": torch.ones(32, 4, 3072)}, "this is a LoRA basis"),
    ({"model.weight": torch.ones(2, 2)}, "not LoRA weights"),
    ({"x.lora_A.weight": torch.ones(2, 4)}, "has no up weight"),
    ({}, "holds no tensors"),
    ({"lora_te_x.lora_down.weight": torch.ones(2, 4), "lora_te_x.lora_up.weight": torch.ones(4, 2)},
     "only holds text-encoder layers"),
    ({"unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight": torch.ones(2, 999),
      "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_B.weight": torch.ones(320, 2)},
     "do not match SD1.5, SDXL, FLUX.1, FLUX.2 or Qwen-Image"),
])
def test_bad_state_dicts_get_clear_errors(tensors, message):
    with pytest.raises(LoRAError, match=message):
        parse_state_dict(tensors)


@pytest.mark.parametrize("key, variant, comfy_applies", [
    ("unet.x.hada_w1_a", "LoHa", True), ("unet.x.lokr_w1", "LoKr", True), ("unet.x.dora_scale", "DoRA", True),
    ("unet.x.diff", "full weight difference", True), ("unet.x.diff_b", "full weight difference", True),
    ("unet.x.lora_mid.weight", "LoCon with a Tucker core", True), ("unet.x.w_norm", "norm weight", True),
    ("unet.x.oft_blocks", "OFT/BOFT", True), ("unet.x.a1.weight", "GLoRA", True),
    ("unet.x.set_weight", "weight replacement", True), ("unet.x.lora_B.bias", r"LoRA with a bias", False),
    ("unet.x.lora_B.default.bias", r"LoRA with a bias", False), ("transformer.x.lora_keys", "LoRWeB basis", False),
    ("transformer.x.att_lora_to_q.weight", "LoRWeB basis", False),
    ("base_model.model.x.lora_magnitude_vector", r"DoRA \(peft's use_dora\)", False)])
def test_other_adapter_types_are_named_and_pointed_to_comfyui(key, variant, comfy_applies):
    tensors = {"unet.x.lora_A.weight": torch.ones(2, 4), "unet.x.lora_B.weight": torch.ones(4, 2), key: torch.ones(4)}
    with pytest.raises(LoRAError, match=f"unsupported LoRA variant: {variant}") as caught:
        parse_state_dict(tensors)
    assert ("LoraLoaderModelOnly reads this variant" in str(caught.value)) == comfy_applies


def test_a_layer_that_fits_no_model_is_named_not_its_valid_neighbours():
    valid = [f"down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_{c}" for c in ("q", "v", "out.0")]
    tensors = {}
    for path in valid:
        tensors |= {f"unet.{path}.lora_A.weight": rand(2, 320), f"unet.{path}.lora_B.weight": rand(320, 2)}
    assert parse_state_dict(tensors).lora.family in ("sd15", "sdxl")  # the valid layers alone load
    misspelt = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_qq"
    resized = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_k"
    tensors |= {f"unet.{misspelt}.lora_A.weight": rand(2, 320), f"unet.{misspelt}.lora_B.weight": rand(320, 2),
                f"unet.{resized}.lora_A.weight": rand(2, 640), f"unet.{resized}.lora_B.weight": rand(320, 2)}
    with pytest.raises(LoRAError, match="do not match SD1.5") as caught:
        parse_state_dict(tensors, {"ss_base_model_version": "sd_v1"})
    message = str(caught.value)
    assert "closest is SD1.5 (at its published size), where 2 of 5 layers do not fit" in message
    assert f"'{misspelt}' is no layer of it" in message
    assert f"'{resized}' is [320, 640] ([out, in]) where its layer is [320, 320]" in message
    assert not any(f"'{path}'" in message for path in valid)
    assert message.index(misspelt) < message.index(resized)  # names it lacks first: the likelier culprit


def test_a_narrower_dit_loras_misfit_is_judged_at_its_own_width(tiny_flux):
    paths = ["transformer_blocks.0.attn.to_out.0", "transformer_blocks.0.ff.net.2",
             "single_transformer_blocks.0.proj_out"]
    tensors = {}
    for path in paths:
        out_f, in_f = tiny_flux.shapes[path][:2]
        tensors |= {f"transformer.{path}.lora_A.weight": rand(2, in_f),
                    f"transformer.{path}.lora_B.weight": rand(out_f, 2)}
    assert parse_state_dict(tensors).lora.family == "flux"  # a 32-wide FLUX.1: read at its own width
    tensors |= {"transformer.transformer_blocks.0.attn.to_outt.lora_A.weight": rand(2, 32),
                "transformer.transformer_blocks.0.attn.to_outt.lora_B.weight": rand(32, 2)}
    with pytest.raises(LoRAError) as caught:
        parse_state_dict(tensors, {"modelspec.architecture": "flux-1-dev/lora"})
    message = str(caught.value)
    assert "closest is FLUX.1 (at the width its other layers imply), where 1 of 4 layers do not fit" in message
    assert "'transformer_blocks.0.attn.to_outt' is no layer of it" in message and "[out, in]" not in message


def test_a_lora_of_another_model_is_told_no_name_matches():
    tensors = {f"model.blocks.{i}.mixer.lora_A.weight": rand(2, 8) for i in range(5)}
    tensors |= {f"model.blocks.{i}.mixer.lora_B.weight": rand(8, 2) for i in range(5)}
    with pytest.raises(LoRAError, match=r"no layer name is one of theirs, e.g. \['model.blocks.0.mixer'"):
        parse_state_dict(tensors)


def test_shape_mismatch_names_the_layer(tiny_flux):
    path = "transformer.transformer_blocks.0.attn.to_q"
    with pytest.raises(LoRAError, match=r"to_q: LoRA shape \[32 x 31\] does not fit"):
        parse_state_dict({f"{path}.lora_A.weight": rand(2, 31), f"{path}.lora_B.weight": rand(32, 2)}, {}, tiny_flux)


def test_comfy_patch_keys_slice_fused_weights(tiny_flux):
    lora = random_lora(tiny_flux, paths=["transformer_blocks.0.attn.add_v_proj", "single_transformer_blocks.1.proj_mlp",
                                         "transformer_blocks.1.ff.net.2"])
    keys = comfy_patch_keys(lora, tiny_flux)
    assert keys["transformer_blocks.0.attn.add_v_proj"] == ("diffusion_model.double_blocks.0.txt_attn.qkv.weight",
                                                            (0, 64, 32))
    assert keys["single_transformer_blocks.1.proj_mlp"] == ("diffusion_model.single_blocks.1.linear1.weight",
                                                            (0, 96, 128))
    assert keys["transformer_blocks.1.ff.net.2"] == "diffusion_model.double_blocks.1.img_mlp.2.weight"


# -- files ------------------------------------------------------------------------------------------------------------


def test_save_and_load_keep_updates_and_metadata(tmp_path, tiny_flux):
    lora = random_lora(tiny_flux, paths=["transformer_blocks.0.attn.to_q", "single_transformer_blocks.0.proj_out"])
    path = save_lora_file(lora, tmp_path / "x.safetensors", "peft")
    _, meta = read_safetensors(path)
    assert meta["analogy.family"] == "flux" and meta["analogy.rank"] == "3" and "lora_adapter_metadata" in meta
    parsed = load_lora_file(path, tiny_flux)
    assert_same_updates(lora, parsed.lora)


def test_save_gives_one_dtype_per_file(tmp_path, tiny_flux):
    lora = random_lora(tiny_flux, paths=["transformer_blocks.0.attn.to_q"])
    name, layer = next(iter(lora.layers.items()))
    mixed = LoRA({name: LoRALayer(layer.down.float(), layer.up.bfloat16(), layer.scale)}, family="flux")
    kept, _ = read_safetensors(save_lora_file(mixed, tmp_path / "mixed.safetensors", "peft"))
    assert {t.dtype for t in kept.values()} == {torch.float32}  # mixed dtypes are promoted, nothing is rounded
    half, _ = read_safetensors(save_lora_file(mixed, tmp_path / "half.safetensors", "peft", dtype=torch.float16))
    assert {t.dtype for t in half.values()} == {torch.float16}
    assert_same_updates(mixed, load_lora_file(tmp_path / "mixed.safetensors", tiny_flux).lora)
    whole = mixed.to(torch.bfloat16)  # one dtype throughout: kept as it is, not doubled in size as float32
    kept, _ = read_safetensors(save_lora_file(whole, tmp_path / "bf16.safetensors", "peft"))
    assert {t.dtype for t in kept.values()} == {torch.bfloat16}


def test_native_formats_follow_the_loras_own_widths(tiny_flux):
    """No layout given: native names (kohya, comfyui) are written at the widths the LoRA implies, not FLUX.1's
    published 3072, and read back to the same updates."""
    single = [f"single_transformer_blocks.0.{p}" for p in ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp")]
    lora = random_lora(tiny_flux, paths=single + ["transformer_blocks.1.attn.to_add_out"])
    for key_format in ("kohya", "comfyui"):
        tensors, meta = to_state_dict(lora, key_format)
        assert tensors["lora_unet_single_blocks_0_linear1.lora_up.weight" if key_format == "kohya" else
                       "diffusion_model.single_blocks.0.linear1.lora_up.weight"].shape[0] == 3 * 32 + 128
        assert_same_updates(lora, parse_state_dict(tensors, meta).lora)
    assert to_state_dict(lora, "kohya", tiny_flux)[0]


def test_layers_shared_by_sd15_and_sdxl_fit_both_and_headers_decide():
    def kohya(name, out, inp):
        return {f"lora_unet_{name}.lora_down.weight": rand(1, inp), f"lora_unet_{name}.lora_up.weight": rand(out, 1),
                f"lora_unet_{name}.alpha": torch.tensor(1.0)}

    shared = kohya("input_blocks_4_1_transformer_blocks_0_attn1_to_q", 640, 640)
    plain = parse_state_dict(shared).lora
    assert plain.family == "sd15" and plain.compatible_families == ("sd15", "sdxl")
    hinted = parse_state_dict(shared, {"ss_base_model_version": "sdxl_base_v1-0"}).lora
    assert hinted.family == "sdxl" and hinted.compatible_families == ("sdxl", "sd15")
    assert parse_state_dict(shared, {"modelspec.architecture": "stable-diffusion-xl-v1-base/lora"}).lora.family == "sdxl"
    only_sdxl = parse_state_dict({**shared, **kohya("input_blocks_4_1_transformer_blocks_1_attn2_to_k", 640, 2048)})
    assert only_sdxl.lora.family == "sdxl" and only_sdxl.lora.compatible_families == ("sdxl",)


def test_refuses_pickles_and_damaged_files(tmp_path):
    pickle = tmp_path / "evil.ckpt"
    pickle.write_bytes(b"\x80\x04not really")
    with pytest.raises(TensorFileError, match="pickle"):
        load_lora_file(pickle)
    good = tmp_path / "good.safetensors"
    save_file({"a.lora_A.weight": torch.ones(2, 64), "a.lora_B.weight": torch.ones(64, 2)}, good)
    data = good.read_bytes()
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(data[:-100])
    with pytest.raises(TensorFileError, match="truncated"):
        load_lora_file(truncated)
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all}")
    with pytest.raises(TensorFileError, match="corrupt safetensors header"):
        load_lora_file(garbage)
    with pytest.raises(TensorFileError, match="no such file"):
        load_lora_file(tmp_path / "missing.safetensors")


def test_nan_in_a_file_is_refused(tmp_path, tiny_flux):
    path = tmp_path / "nan.safetensors"
    key = "transformer.transformer_blocks.0.attn.to_q"
    save_file({f"{key}.lora_A.weight": torch.full((2, 32), float("nan")), f"{key}.lora_B.weight": torch.ones(32, 2)},
              path)
    with pytest.raises(LoRAError, match="nan.safetensors: layer '.*to_q': down contains NaN or Inf"):
        load_lora_file(path, tiny_flux)


def test_xlabs_flux_keys_are_read():
    """XLabs FLUX LoRAs: <block>.processor.{qkv,proj}_lora{1,2,}.{down,up}.weight, single-block qkv = linear1 q/k/v."""
    h = 3072
    tensors = {
        "double_blocks.0.processor.qkv_lora1.down.weight": rand(2, h), "double_blocks.0.processor.qkv_lora1.up.weight": rand(3 * h, 2),
        "double_blocks.0.processor.proj_lora2.down.weight": rand(2, h), "double_blocks.0.processor.proj_lora2.up.weight": rand(h, 2),
        "single_blocks.1.processor.qkv_lora.down.weight": rand(2, h), "single_blocks.1.processor.qkv_lora.up.weight": rand(3 * h, 2),
        "single_blocks.1.processor.proj_lora.down.weight": rand(2, h + 4 * h), "single_blocks.1.processor.proj_lora.up.weight": rand(h, 2),
    }
    lora = parse_state_dict(tensors).lora
    assert lora.family == "flux"
    assert set(lora.layers) == {
        "transformer_blocks.0.attn.to_q", "transformer_blocks.0.attn.to_k", "transformer_blocks.0.attn.to_v",
        "transformer_blocks.0.attn.to_add_out", "single_transformer_blocks.1.attn.to_q",
        "single_transformer_blocks.1.attn.to_k", "single_transformer_blocks.1.attn.to_v",
        "single_transformer_blocks.1.proj_out"}
    torch.testing.assert_close(lora.layers["single_transformer_blocks.1.attn.to_v"].up,
                               tensors["single_blocks.1.processor.qkv_lora.up.weight"][2 * h:])
    # ComfyUI's own name for the same slice, kohya style
    comfy_style = {"lora_unet_single_blocks_2_linear1_qkv.lora_down.weight": rand(2, h),
                   "lora_unet_single_blocks_2_linear1_qkv.lora_up.weight": rand(3 * h, 2)}
    assert set(parse_state_dict(comfy_style).lora.layers) == {f"single_transformer_blocks.2.attn.to_{c}" for c in "qkv"}
