"""LoRA nodes in the real ComfyUI server: tiny SD1.5 checkpoint -> Load LoRA -> Apply LoRA -> KSampler -> image."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from devtools.comfy_server import PromptFailed
from tiny_models import randomize_

pytestmark = pytest.mark.comfy

TINY_SD15 = dict(image_size=32, in_channels=4, out_channels=4, model_channels=320, num_res_blocks=[1],
                 channel_mult=[1], transformer_depth=[1], transformer_depth_output=[1, 1], transformer_depth_middle=-1,
                 context_dim=768, num_heads=8, num_head_channels=-1, use_linear_in_transformer=False,
                 adm_in_channels=None, use_spatial_transformer=True, legacy=False, use_temporal_attention=False,
                 use_temporal_resblock=False)
ATTN = "down_blocks.0.attentions.0"
LORA_SHAPES = {  # diffusers path -> (out, in[, kh, kw]) of layers the tiny checkpoint shares with SD1.5
    f"{ATTN}.transformer_blocks.0.attn1.to_q": (320, 320), f"{ATTN}.transformer_blocks.0.attn1.to_v": (320, 320),
    f"{ATTN}.transformer_blocks.0.attn2.to_k": (320, 768), f"{ATTN}.transformer_blocks.0.attn2.to_out.0": (320, 320),
    f"{ATTN}.transformer_blocks.0.ff.net.2": (320, 1280), f"{ATTN}.proj_in": (320, 320, 1, 1),
    "down_blocks.0.resnets.0.conv1": (320, 320, 3, 3),
}


@pytest.fixture(scope="module")
def checkpoint(comfy, comfy_inproc):
    """A 21M-parameter SD1.5-shaped checkpoint with a TAESD VAE, every weight set (no zero norms)."""
    cc = comfy_inproc.comfy
    import comfy.taesd.taesd as taesd

    config = cc.supported_models.SD15(dict(TINY_SD15))
    unet = config.get_model({}).diffusion_model
    randomize_(unet, seed=7)
    vae = taesd.TAESD()
    randomize_(vae, seed=8)
    state = {f"model.diffusion_model.{k}": v.half() for k, v in unet.state_dict().items()}
    for k, v in vae.state_dict().items():
        state[f"first_stage_model.{k}"] = v if v.ndim == 0 else v.half()
    state["first_stage_model.vae_scale"] = torch.tensor(1.0)
    state["first_stage_model.vae_shift"] = torch.tensor(0.0)
    save_file(state, comfy.base_dir / "models" / "checkpoints" / "tiny_sd15.safetensors")
    return "tiny_sd15.safetensors"


def write_peft_lora(comfy, name, scale_b=1.0, seed=0):
    """A PEFT-format SD1.5 LoRA as diffusers writes it (unet.<path>.lora_A.weight, alpha in metadata)."""
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for path, shape in LORA_SHAPES.items():
        down_shape = (4, shape[1], *shape[2:])
        up_shape = (shape[0], 4, *([1, 1] if len(shape) == 4 else []))
        tensors[f"unet.{path}.lora_A.weight"] = torch.randn(down_shape, generator=gen) * 0.2
        tensors[f"unet.{path}.lora_B.weight"] = torch.randn(up_shape, generator=gen) * 0.2 * scale_b
    meta = {"lora_adapter_metadata": json.dumps({"unet.r": 4, "unet.lora_alpha": 8})}
    (comfy.base_dir / "models" / "loras" / "test").mkdir(parents=True, exist_ok=True)
    save_file(tensors, comfy.base_dir / "models" / "loras" / "test" / name, metadata=meta)
    return f"test/{name}"


def sampling_prompt(checkpoint, model_ref, prefix, extra=None):
    prompt = {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": checkpoint}},
        "2": {"class_type": "AnalogyTestConditioning", "inputs": {"seed": 1, "tokens": 77, "width": 768}},
        "3": {"class_type": "AnalogyTestConditioning", "inputs": {"seed": 2, "tokens": 77, "width": 768}},
        "4": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "7": {"class_type": "KSampler", "inputs": {
            "model": model_ref, "seed": 3, "steps": 2, "cfg": 2.0, "sampler_name": "euler", "scheduler": "normal",
            "positive": ["2", 0], "negative": ["3", 0], "latent_image": ["4", 0], "denoise": 1.0}},
        "8": {"class_type": "VAEDecode", "inputs": {"samples": ["7", 0], "vae": ["1", 2]}},
        "9": {"class_type": "SaveImage", "inputs": {"images": ["8", 0], "filename_prefix": prefix}},
    }
    prompt.update(extra or {})
    return prompt


def lora_prompt(checkpoint, lora_name, prefix, strength=1.0, mode="merge", extra=None):
    nodes = {
        "5": {"class_type": "AnalogyLoadLoRA", "inputs": {"lora_name": lora_name}},
        "6": {"class_type": "AnalogyApplyLoRA", "inputs": {"model": ["1", 0], "lora": ["5", 0], "strength": strength,
                                                            "mode": mode, "allow_partial": False}},
    }
    nodes.update(extra or {})
    return sampling_prompt(checkpoint, ["6", 0], prefix, nodes)


def image(comfy, history, node="9"):
    return np.asarray(Image.open(comfy.output_files(history, node)[0]), dtype=np.int16)


@pytest.fixture(scope="module")
def base_image(comfy, checkpoint):
    picture = image(comfy, comfy.run(sampling_prompt(checkpoint, ["1", 0], "base")))
    assert picture.std() > 5, "the tiny model must draw something (non-degenerate weights)"
    return picture


def test_lora_changes_the_image_and_strength_zero_does_not(comfy, checkpoint, base_image):
    name = write_peft_lora(comfy, "peft_sd15.safetensors")
    history = comfy.run(lora_prompt(checkpoint, name, "lora_s1"))
    with_lora = image(comfy, history)
    assert np.abs(with_lora - base_image).mean() > 2, "a non-zero LoRA must change the picture"
    strength0 = image(comfy, comfy.run(lora_prompt(checkpoint, name, "lora_s0", strength=0.0)))
    assert np.array_equal(strength0, base_image)


def test_all_zero_lora_reproduces_the_base_image(comfy, checkpoint, base_image):
    name = write_peft_lora(comfy, "zero_sd15.safetensors", scale_b=0.0)
    for mode in ("merge", "runtime"):
        picture = image(comfy, comfy.run(lora_prompt(checkpoint, name, f"zero_{mode}", mode=mode)))
        assert np.array_equal(picture, base_image), mode


def test_runtime_mode_matches_merge_in_sampling(comfy, checkpoint, base_image):
    name = write_peft_lora(comfy, "peft_sd15.safetensors")
    merged = image(comfy, comfy.run(lora_prompt(checkpoint, name, "m_merge", strength=-0.7)))
    log_start = len(comfy.log_tail(10 ** 9))
    runtime = image(comfy, comfy.run(lora_prompt(checkpoint, name, "m_runtime", strength=-0.7, mode="runtime")))
    assert np.abs(merged - base_image).mean() > 2
    assert np.abs(runtime - merged).max() <= 2, "runtime and merge agree up to 8-bit rounding"
    # KSampler's model loading took the LoRA factors along, as a model of their own
    assert "Requested to load LoRAWeights" in comfy.log_tail(10 ** 9)[log_start:]


def test_saved_lora_in_stock_loader_equals_apply(comfy, checkpoint):
    name = write_peft_lora(comfy, "peft_sd15.safetensors", seed=4)
    save = {"10": {"class_type": "AnalogySaveLoRA", "inputs": {
        "lora": ["5", 0], "filename_prefix": "saved/roundtrip", "key_format": "auto", "overwrite": True}}}
    history = comfy.run(lora_prompt(checkpoint, name, "ours", extra=save))
    ours = image(comfy, history)
    saved = comfy.base_dir / "models" / "loras" / "saved" / "roundtrip.safetensors"
    assert saved.is_file()
    stock = {"6": {"class_type": "LoraLoaderModelOnly", "inputs": {
        "model": ["1", 0], "lora_name": "saved/roundtrip.safetensors", "strength_model": 1.0}}}
    theirs = image(comfy, comfy.run(sampling_prompt(checkpoint, ["6", 0], "stock", stock)))
    assert np.array_equal(ours, theirs), "ComfyUI's stock loader must change the model exactly as Apply LoRA did"
    assert "lora key not loaded" not in comfy.log_tail(20000)


def test_save_without_overwrite_numbers_files(comfy, checkpoint):
    name = write_peft_lora(comfy, "peft_sd15.safetensors")
    prompt = {"5": {"class_type": "AnalogyLoadLoRA", "inputs": {"lora_name": name}},
              "10": {"class_type": "AnalogySaveLoRA", "inputs": {
                  "lora": ["5", 0], "filename_prefix": "../escape", "key_format": "peft", "overwrite": False}}}
    with pytest.raises(PromptFailed, match="must be a relative name inside models/loras"):
        comfy.run(prompt)
    prompt["10"]["inputs"]["filename_prefix"] = "numbered/x"
    first = comfy.run(prompt)["outputs"]["10"]["text"][0]
    prompt["10"]["inputs"]["key_format"] = "kohya"  # a changed input re-runs the node
    second = comfy.run(prompt)["outputs"]["10"]["text"][0]
    assert "numbered/x_00001.safetensors" in first and "numbered/x_00002.safetensors" in second


def test_lora_for_another_family_is_refused(comfy, checkpoint):
    key = "transformer.transformer_blocks.0.attn.to_q"
    (comfy.base_dir / "models" / "loras" / "test").mkdir(parents=True, exist_ok=True)
    save_file({f"{key}.lora_A.weight": torch.ones(2, 3072), f"{key}.lora_B.weight": torch.ones(3072, 2)},
              comfy.base_dir / "models" / "loras" / "test" / "flux.safetensors")
    # attention q of a double block: FLUX.1, Qwen-Image and FLUX.2 all have it at this width, SD1.5 does not
    with pytest.raises(PromptFailed, match="this LoRA is for flux or qwen_image or flux2 but the model is sd15"):
        comfy.run(lora_prompt(checkpoint, "test/flux.safetensors", "wrong"))


def test_corrupt_lora_file_is_a_clear_error(comfy, checkpoint):
    path = comfy.base_dir / "models" / "loras" / "test" / "broken.safetensors"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\x00\x01\x00\x00\x00\x00\x00\x00{")
    with pytest.raises(PromptFailed, match=r"broken\.safetensors: not a safetensors \w+, or truncated"):
        comfy.run(lora_prompt(checkpoint, "test/broken.safetensors", "broken"))
