"""The LoRA nodes on FLUX.2 and Qwen-Image in the real ComfyUI server: Load LoRA (Analogy) + Apply LoRA to Model
(merge and runtime) sample the same latent as ComfyUI's stock LoraLoaderModelOnly on the same file, and on the file
Save LoRA writes.

Qwen-Image is saved at the width ComfyUI's detector assumes (3072, 24 heads, text 3584; it reads only the block count
and input channels) with one block, and loads through the stock UNETLoader. ComfyUI 0.3.75's detector fixes FLUX.2 at
48 heads of 128 (hidden 6144: over 1.5 billion parameters even with one block), so the tiny FLUX.2 file (BFL names, the
layout UNETLoader reads) is loaded through the test loader with ComfyUI's own Flux2 class; newer ComfyUI derives the
heads from the width.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from tiny_models import FLUX2_COMFY, randomize_

pytestmark = pytest.mark.comfy
QWEN_SERVER = dict(image_model="qwen_image", in_channels=64, num_layers=1)  # what the detector reads
FLUX2_SERVER = dict(FLUX2_COMFY, in_channels=128, out_channels=128, context_in_dim=32, depth=1, depth_single_blocks=1)


def _qwen_file(comfy, comfy_inproc) -> str:
    cc = comfy_inproc.comfy
    config = cc.supported_models.QwenImage(dict(QWEN_SERVER))
    config.set_inference_dtype(torch.bfloat16, None)
    model = config.get_model({}).diffusion_model
    randomize_(model, seed=51)
    state = {k: v.to(torch.bfloat16).contiguous() for k, v in model.state_dict().items()}
    save_file(state, comfy.base_dir / "models" / "diffusion_models" / "tiny_qwen_image.safetensors")
    return "tiny_qwen_image.safetensors"


def _flux2_file(comfy, comfy_inproc) -> str:
    cc = comfy_inproc.comfy
    config = cc.supported_models.Flux2(dict(FLUX2_SERVER))
    config.set_inference_dtype(torch.float32, None)
    model = config.get_model({}).diffusion_model
    randomize_(model, seed=52)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()},
              comfy.base_dir / "models" / "diffusion_models" / "tiny_flux2.safetensors",
              metadata={"unet_config": json.dumps(FLUX2_SERVER)})
    return "tiny_flux2.safetensors"


def _lora_file(comfy, name: str, layers: dict[str, tuple[int, int]], form: str, seed: int) -> str:
    """A kohya/musubi-style file (lora_unet_<name_> + alpha) or an ai-toolkit one (diffusion_model.<name>.lora_A/B)."""
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for path, (out, inp) in layers.items():
        down, up = torch.randn(4, inp, generator=gen) * 0.3, torch.randn(out, 4, generator=gen) * 0.3
        if form == "kohya":
            base = "lora_unet_" + path.replace(".", "_")
            tensors.update({f"{base}.lora_down.weight": down, f"{base}.lora_up.weight": up,
                            f"{base}.alpha": torch.tensor(8.0)})
        else:
            tensors.update({f"diffusion_model.{path}.lora_A.weight": down, f"diffusion_model.{path}.lora_B.weight": up})
    folder = comfy.base_dir / "models" / "loras" / "editors"
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, folder / name)
    return f"editors/{name}"


H = 3072
QWEN_LAYERS = {"transformer_blocks.0.attn.to_q": (H, H), "transformer_blocks.0.attn.add_v_proj": (H, H),
               "transformer_blocks.0.img_mlp.net.0.proj": (4 * H, H), "transformer_blocks.0.txt_mod.1": (6 * H, H),
               "img_in": (H, 64), "proj_out": (64, H)}
h, m = FLUX2_SERVER["hidden_size"], 3 * FLUX2_SERVER["hidden_size"]
FLUX2_LAYERS = {"double_blocks.0.img_attn.qkv": (3 * h, h), "double_blocks.0.txt_mlp.0": (2 * m, h),
                "single_blocks.0.linear1": (3 * h + 2 * m, h), "single_blocks.0.linear2": (h, h + m),
                "double_stream_modulation_img.lin": (6 * h, h), "final_layer.adaLN_modulation.1": (2 * h, h)}

SETUPS = {
    "qwen_image": dict(loader={"class_type": "UNETLoader", "inputs": {"weight_dtype": "default"}},
                       latent={"class_type": "EmptySD3LatentImage", "inputs": {"width": 64, "height": 64,
                                                                              "batch_size": 1}},
                       width=3584, pooled=0, layers=QWEN_LAYERS, form="kohya"),
    "flux2": dict(loader={"class_type": "AnalogyTestTinyFluxLoader", "inputs": {}},
                  latent={"class_type": "EmptyFlux2LatentImage", "inputs": {"width": 64, "height": 64,
                                                                           "batch_size": 1}},
                  width=FLUX2_SERVER["context_in_dim"], pooled=8, layers=FLUX2_LAYERS, form="aitoolkit"),
    # (FLUX.2 has no pooled input, but ComfyUI 0.3.75's Flux.encode_adm, which Flux2 inherits, reads one)
}


@pytest.fixture(scope="module")
def files(comfy, comfy_inproc):
    (comfy.base_dir / "models" / "diffusion_models").mkdir(parents=True, exist_ok=True)
    out = {"qwen_image": _qwen_file(comfy, comfy_inproc), "flux2": _flux2_file(comfy, comfy_inproc)}
    for seed, family in enumerate(SETUPS, start=60):
        setup = SETUPS[family]
        out[f"{family}_lora"] = _lora_file(comfy, f"{family}.safetensors", setup["layers"], setup["form"], seed)
    return out


def prompt(family: str, unet: str, model_nodes: dict, model_ref: list, prefix: str) -> dict:
    setup = SETUPS[family]
    nodes = {
        "1": {**setup["loader"], "inputs": {**setup["loader"]["inputs"], "unet_name": unet}},
        "2": {"class_type": "AnalogyTestConditioning", "inputs": {"seed": 1, "tokens": 8, "width": setup["width"],
                                                                  "pooled_width": setup["pooled"]}},
        "3": {"class_type": "AnalogyTestConditioning", "inputs": {"seed": 2, "tokens": 8, "width": setup["width"],
                                                                  "pooled_width": setup["pooled"]}},
        "4": setup["latent"],
        "7": {"class_type": "KSampler", "inputs": {
            "model": model_ref, "seed": 3, "steps": 2, "cfg": 1.0, "sampler_name": "euler", "scheduler": "simple",
            "positive": ["2", 0], "negative": ["3", 0], "latent_image": ["4", 0], "denoise": 1.0}},
        "9": {"class_type": "SaveLatent", "inputs": {"samples": ["7", 0], "filename_prefix": prefix}},
    }
    nodes.update(model_nodes)
    return nodes


def sampled(comfy, history) -> torch.Tensor:
    [found] = history["outputs"]["9"]["latents"]
    return load_file(str(comfy.base_dir / found["type"] / found["subfolder"] / found["filename"]))["latent_tensor"]


def ours(lora_name: str, mode: str, strength: float, save: str | None = None) -> dict:
    nodes = {"5": {"class_type": "AnalogyLoadLoRA", "inputs": {"lora_name": lora_name}},
             "6": {"class_type": "AnalogyApplyLoRA", "inputs": {"model": ["1", 0], "lora": ["5", 0],
                                                                "strength": strength, "mode": mode,
                                                                "allow_partial": False}}}
    if save:
        nodes["10"] = {"class_type": "AnalogySaveLoRA", "inputs": {"lora": ["5", 0], "filename_prefix": save,
                                                                   "key_format": "auto", "overwrite": True}}
    return nodes


def stock(lora_name: str, strength: float) -> dict:
    return {"6": {"class_type": "LoraLoaderModelOnly", "inputs": {"model": ["1", 0], "lora_name": lora_name,
                                                                  "strength_model": strength}}}


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@pytest.mark.parametrize("family", ["qwen_image", "flux2"])
def test_pack_apply_equals_the_stock_loader_in_sampling(comfy, files, family):
    unet, lora = files[family], files[f"{family}_lora"]
    base = sampled(comfy, comfy.run(prompt(family, unet, {}, ["1", 0], f"{family}_base")))
    assert base.std() > 0 and torch.isfinite(base).all()
    theirs = sampled(comfy, comfy.run(prompt(family, unet, stock(lora, 0.8), ["6", 0], f"{family}_stock")))
    assert rel(theirs, base) > 0.01, "the LoRA must change the sampled latent"
    saved = f"editors/saved_{family}"
    for mode in ("merge", "runtime"):
        mine = sampled(comfy, comfy.run(prompt(family, unet, ours(lora, mode, 0.8, saved), ["6", 0],
                                               f"{family}_{mode}")))
        assert rel(mine, theirs) <= 1e-4, (mode, rel(mine, theirs), rel(mine, base))
    log_start = len(comfy.log_tail(10 ** 9))
    resaved = sampled(comfy, comfy.run(prompt(family, unet, stock(saved + ".safetensors", 0.8), ["6", 0],
                                              f"{family}_resaved")))
    assert rel(resaved, theirs) <= 1e-4, "the stock loader reads Save LoRA's file as the pack applies it"
    assert "lora key not loaded" not in comfy.log_tail(10 ** 9)[log_start:]


def test_a_flux1_lora_is_refused_on_flux2_and_qwen_image(comfy, files):
    from devtools.comfy_server import PromptFailed

    path = "transformer.single_transformer_blocks.0.proj_mlp"
    save_file({f"{path}.lora_A.weight": torch.full((2, 3072), 0.01),
               f"{path}.lora_B.weight": torch.full((12288, 2), 0.01)},
              comfy.base_dir / "models" / "loras" / "editors" / "flux1.safetensors")
    for family in ("qwen_image", "flux2"):
        with pytest.raises(PromptFailed, match=f"this LoRA is for flux but the model is {family}"):
            comfy.run(prompt(family, files[family], ours("editors/flux1.safetensors", "merge", 1.0), ["6", 0],
                             f"{family}_refused"))
