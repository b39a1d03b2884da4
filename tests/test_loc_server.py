"""LoRA of Change in the real ComfyUI server: a tiny InstructPix2Pix checkpoint (detected by ComfyUI's own
CheckpointLoaderSimple as SD1.5 InstructPix2Pix) -> LoadImage x3 -> CLIP vision / Encode Analogy -> Load LoRA
Hypernetwork -> Generate LoRA -> Apply LoRA to Model -> InstructPixToPixConditioning -> KSampler -> VAEDecode ->
SaveImage; and the Generate LoRA node's errors.

Swapped for what needs real weights: the CLIP vision loader (a test loader for a tiny CLIP, which ComfyUI's detector
refuses) and the text encoder (seeded random conditioning; the tiny checkpoint has none)."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from analogy_core.analogy import EncoderInfo
from analogy_core.lorweb.basis import random_basis
from analogy_core.layouts import ModelLayout
from analogy_core.loc import HypernetworkConfig, attention_targets, build_hypernetwork, save_hypernetwork
from devtools.comfy_server import PromptFailed
from test_encode_analogy import TINY_CLIP
from test_lora_server import TINY_SD15
from tiny_models import randomize_

pytestmark = pytest.mark.comfy
TINY_IP2P = dict(TINY_SD15, in_channels=8)
# what Encode Analogy reports for TINY_CLIP (projection 32, width 64, 224 px, patch 14, 3 layers): 257 tokens
TINY_CLIP_INFO = EncoderInfo.describe(32, 64, 224, 14, 3)


def ip2p_targets(comfy) -> HypernetworkConfig:
    """The tiny checkpoint's attention layers in diffusers names (ComfyUI's own key map), as a layout."""
    config = comfy.supported_models.SD15_instructpix2pix(dict(TINY_IP2P))
    unet = config.get_model({}).diffusion_model
    mapping = comfy.utils.unet_to_diffusers(dict(TINY_IP2P))  # diffusers key -> LDM key
    state = unet.state_dict()
    shapes = {k[: -len(".weight")]: tuple(state[v].shape) for k, v in mapping.items()
              if k.endswith(".weight") and v in state}
    return unet, attention_targets(ModelLayout("sd15", shapes))


def write_hypernetwork(path, targets, seed: int, u_b: float, encoder: EncoderInfo = TINY_CLIP_INFO):
    config = HypernetworkConfig(targets, token_width=encoder.hidden_dim, encoder=encoder, token_count=257,
                                width=32, blocks=1, heads=4, rank=2, ffn=64)
    hypernetwork = build_hypernetwork(config, seed=seed)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, view in hypernetwork.u_b_parameters():
            view.copy_(torch.randn(view.shape, generator=gen) * u_b)
    save_hypernetwork(hypernetwork, path)


@pytest.fixture(scope="module")
def loc_files(comfy, comfy_inproc):
    """Tiny InstructPix2Pix checkpoint with a TAESD VAE, tiny CLIP vision, hypernetworks, the example images."""
    import comfy.taesd.taesd as taesd
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    from training.data.synthetic import analogy_example
    from devtools.images import save_png

    cc = comfy_inproc.comfy
    models = comfy.base_dir / "models"
    for folder in ("checkpoints", "clip_vision", "loc"):
        (models / folder).mkdir(parents=True, exist_ok=True)
    unet, targets = ip2p_targets(cc)
    assert len(targets) == 6 and {t.shapes[1] for t in targets} >= {(320, 768)}, "attn2 k reads the 768-d text"
    randomize_(unet, seed=11)
    vae = taesd.TAESD()
    randomize_(vae, seed=12)
    state = {f"model.diffusion_model.{k}": v.half() for k, v in unet.state_dict().items()}
    for k, v in vae.state_dict().items():
        state[f"first_stage_model.{k}"] = v if v.ndim == 0 else v.half()
    state["first_stage_model.vae_scale"] = torch.tensor(1.0)
    state["first_stage_model.vae_shift"] = torch.tensor(0.0)
    save_file(state, models / "checkpoints" / "tiny_ip2p.safetensors")

    clip = CLIPVisionModelWithProjection(CLIPVisionConfig(**TINY_CLIP))
    randomize_(clip, seed=13)
    save_file({k: v.contiguous() for k, v in clip.state_dict().items()}, models / "clip_vision" / "tiny_clip.safetensors",
              metadata={"clip_config": json.dumps(dict(TINY_CLIP, model_type="clip_vision_model"))})

    write_hypernetwork(models / "loc" / "tiny_loc.safetensors", targets, seed=1, u_b=0.02)
    write_hypernetwork(models / "loc" / "fresh_loc.safetensors", targets, seed=1, u_b=0.0)
    write_hypernetwork(models / "loc" / "wide_loc.safetensors", targets, seed=1, u_b=0.02,
                       encoder=EncoderInfo.describe(32, 48, 224, 14, 3))
    write_hypernetwork(models / "loc" / "other_loc.safetensors", targets, seed=1, u_b=0.02,
                       encoder=EncoderInfo.describe(32, 64, 224, 14, 4))
    random_basis({"transformer_blocks.0.attn.to_q": (8, 8)}, num_entries=2, rank=1, key_dim=4,
                 query_dim=6).save(models / "loc" / "a_basis.safetensors")
    example = analogy_example("invert", width=64, height=48)  # small: the test samples B at its own size
    for role in ("a", "a_prime", "b"):
        save_png(example[role], comfy.base_dir / "input" / f"loc_{role}.png")
    return "tiny_ip2p.safetensors"


def loc_prompt(hypernetwork="tiny_loc.safetensors", direction="forward", strength=1.0, bypass=False, prefix="loc"):
    prompt = {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "tiny_ip2p.safetensors"}},
        "2": {"class_type": "LoadImage", "inputs": {"image": "loc_a.png"}},
        "3": {"class_type": "LoadImage", "inputs": {"image": "loc_a_prime.png"}},
        "4": {"class_type": "LoadImage", "inputs": {"image": "loc_b.png"}},
        "5": {"class_type": "AnalogyTestTinyClipVisionLoader", "inputs": {"clip_name": "tiny_clip.safetensors"}},
        "6": {"class_type": "AnalogyEncode", "inputs": {"clip_vision": ["5", 0], "a": ["2", 0], "a_prime": ["3", 0]}},
        "7": {"class_type": "AnalogyLoadLoRAHypernetwork", "inputs": {"hypernetwork_name": hypernetwork}},
        "8": {"class_type": "AnalogyGenerateLoRA", "inputs": {"hypernetwork": ["7", 0], "analogy": ["6", 0],
                                                              "direction": direction, "strength": strength,
                                                              "sample": 0}},
        "9": {"class_type": "AnalogyApplyLoRA", "inputs": {"model": ["1", 0], "lora": ["8", 0], "strength": 1.0,
                                                           "mode": "merge", "allow_partial": False}},
        "10": {"class_type": "AnalogyTestConditioning", "inputs": {"seed": 1, "tokens": 77, "width": 768}},
        "11": {"class_type": "AnalogyTestConditioning", "inputs": {"seed": 2, "tokens": 77, "width": 768}},
        "12": {"class_type": "InstructPixToPixConditioning", "inputs": {
            "positive": ["10", 0], "negative": ["11", 0], "vae": ["1", 2], "pixels": ["4", 0]}},
        "13": {"class_type": "KSampler", "inputs": {
            "model": ["1", 0] if bypass else ["9", 0], "seed": 5, "steps": 2, "cfg": 1.5, "sampler_name": "euler",
            "scheduler": "normal", "positive": ["12", 0], "negative": ["12", 1], "latent_image": ["12", 2],
            "denoise": 1.0}},
        "14": {"class_type": "VAEDecode", "inputs": {"samples": ["13", 0], "vae": ["1", 2]}},
        "15": {"class_type": "SaveImage", "inputs": {"images": ["14", 0], "filename_prefix": prefix}},
    }
    if bypass:
        for key in ("7", "8", "9"):
            del prompt[key]
    return prompt


def b_prime(comfy, prompt) -> np.ndarray:
    history = comfy.run(copy.deepcopy(prompt))
    return np.asarray(Image.open(comfy.output_files(history, "15")[0]), dtype=np.int16)


@pytest.fixture(scope="module")
def base(comfy, loc_files):
    picture = b_prime(comfy, loc_prompt(bypass=True, prefix="loc_base"))
    assert picture.std() > 3, "the tiny InstructPix2Pix must draw something"
    return picture


def test_generated_lora_edits_b_in_the_real_comfyui(comfy, loc_files, base):
    b = Image.open(comfy.base_dir / "input" / "loc_b.png")
    assert base.shape == (b.size[1], b.size[0], 3), "B′ has B's size (B is the InstructPix2Pix condition)"
    forward = b_prime(comfy, loc_prompt(prefix="loc_forward"))
    assert np.abs(forward - base).mean() > 1.0, "the generated LoRA changes B′"
    reverse = b_prime(comfy, loc_prompt(direction="reverse", prefix="loc_reverse"))
    swapped = b_prime(comfy, loc_prompt(direction="swapped", prefix="loc_swapped"))
    assert np.abs(reverse - forward).mean() > 1.0 and np.abs(swapped - forward).mean() > 1.0
    zero = b_prime(comfy, loc_prompt(strength=0.0, prefix="loc_zero"))
    assert np.array_equal(zero, base), "strength 0 gives the base image bit for bit"


def test_a_fresh_hypernetwork_leaves_b_prime_bit_identical(comfy, loc_files, base):
    fresh = b_prime(comfy, loc_prompt(hypernetwork="fresh_loc.safetensors", prefix="loc_fresh"))
    assert np.array_equal(fresh, base)


@pytest.mark.parametrize("name, message", [
    ("wide_loc.safetensors", "reads 48-d patch tokens .* gives 64-d tokens"),
    ("other_loc.safetensors", "same width, another model"),
    ("a_basis.safetensors", "not a LoRA of Change hypernetwork: it is a LoRWeB LoRA basis"),
])
def test_generate_lora_errors(comfy, loc_files, name, message):
    with pytest.raises(PromptFailed, match=message):
        comfy.run(loc_prompt(hypernetwork=name, prefix="loc_error"))
