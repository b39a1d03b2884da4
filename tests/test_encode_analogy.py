"""Encode Analogy: ComfyUI's CLIP_VISION path and the transformers (training) path agree on the same weights."""

from __future__ import annotations

import json

import pytest
import torch

from analogy_core.synthetic import procedural_scene
from tiny_models import randomize_

TINY_CLIP = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_hidden_layers=3, patch_size=14,
                 image_size=224, projection_dim=32, hidden_act="quick_gelu", layer_norm_eps=1e-5, num_channels=3)


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    """A random CLIP vision tower saved with transformers (safetensors) and loaded back from disk."""
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    folder = tmp_path_factory.mktemp("clip")
    model = CLIPVisionModelWithProjection(CLIPVisionConfig(**TINY_CLIP)).eval()
    randomize_(model, seed=5)
    model.save_pretrained(folder / "hf", safe_serialization=True)
    return folder, CLIPVisionModelWithProjection.from_pretrained(folder / "hf").eval()


@pytest.fixture(scope="module")
def comfy_clip(comfy_inproc, tiny_clip):
    """The same weights through ComfyUI's own ClipVisionModel (float32 weights for an exact comparison)."""
    import comfy.cli_args
    import comfy.clip_vision
    from safetensors.torch import load_file

    folder, _ = tiny_clip
    config = folder / "comfy_clip_config.json"
    config.write_text(json.dumps(dict(TINY_CLIP, model_type="clip_vision_model")))
    previous = comfy.cli_args.args.fp32_text_enc
    comfy.cli_args.args.fp32_text_enc = True
    try:
        clip_vision = comfy.clip_vision.ClipVisionModel(str(config))
    finally:
        comfy.cli_args.args.fp32_text_enc = previous
    missing, unexpected = clip_vision.load_sd(load_file(folder / "hf" / "model.safetensors"))
    assert not [k for k in missing if "position_ids" not in k] and not unexpected
    return clip_vision


def images():
    return {"a": procedural_scene(1, 300, 200).unsqueeze(0), "a_prime": procedural_scene(2, 300, 200).unsqueeze(0),
            "b": torch.stack([procedural_scene(3, 180, 260), procedural_scene(4, 180, 260)])}


def test_comfy_and_transformers_paths_agree(comfy_inproc, tiny_clip, comfy_clip):
    lorweb = __import__(f"{comfy_inproc.pack.__name__}.nodes.lorweb", fromlist=["x"])
    analogy_mod = __import__(f"{comfy_inproc.pack.__name__}.analogy_core.analogy", fromlist=["x"])
    ours = lorweb.encode_with_comfy(comfy_clip, images())
    theirs = analogy_mod.encode_with_transformers(tiny_clip[1], images())
    assert ours.roles == theirs.roles == ("a", "a_prime", "b") and ours.batch_size == 2
    assert ours.encoder == theirs.encoder and ours.encoder.embed_dim == 32 and ours.encoder.num_layers == 3
    assert not torch.allclose(ours.image_embeds["a"], ours.image_embeds["a_prime"], atol=1e-3)
    for role in ours.roles:
        torch.testing.assert_close(ours.image_embeds[role], theirs.image_embeds[role], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(ours.patch_tokens[role], theirs.patch_tokens[role], rtol=1e-4, atol=1e-4)
    assert ours.patch_tokens["a"].shape == (2, 1 + (224 // 14) ** 2, 64)
    # batch-1 roles are repeated for a batch-2 B
    torch.testing.assert_close(ours.image_embeds["a"][0], ours.image_embeds["a"][1])
    assert not torch.allclose(ours.image_embeds["b"][0], ours.image_embeds["b"][1])
    assert ours.query().shape == (2, 3 * 32)


def test_preprocessing_is_the_official_one(comfy_inproc):
    """Our pixels equal transformers' CLIPImageProcessor fed the same 8-bit images (PIL bicubic, centre crop)."""
    import numpy as np
    from PIL import Image

    from analogy_core.analogy import clip_image_processor, preprocess

    image = procedural_scene(9, 333, 217)
    ours = preprocess(image.unsqueeze(0))
    pil = Image.fromarray((image.numpy() * 255).round().astype(np.uint8))
    theirs = clip_image_processor()(images=[pil], return_tensors="pt")["pixel_values"]
    assert ours.shape == (1, 3, 224, 224)
    torch.testing.assert_close(ours, theirs)
    # ComfyUI's own encode_image resizes with torch bicubic instead: measurably different input pixels.
    import comfy.clip_vision

    comfy_pixels = comfy.clip_vision.clip_preprocess(image.unsqueeze(0), size=224)
    assert (comfy_pixels - ours).abs().mean() > 1e-3


def test_encode_node_reports_the_encoder(comfy_inproc, comfy_clip):
    lorweb = __import__(f"{comfy_inproc.pack.__name__}.nodes.lorweb", fromlist=["x"])
    imgs = images()
    analogy, info = lorweb.EncodeAnalogy().encode(comfy_clip, imgs["a"], imgs["a_prime"])
    assert analogy.roles == ("a", "a_prime") and "CLIP-like ViT (embed 32" in info
    with pytest.raises(ValueError, match="batch sizes must be 1 or all equal"):
        lorweb.EncodeAnalogy().encode(comfy_clip, imgs["b"], imgs["a"], imgs["b"].repeat(3, 1, 1, 1)[:3])
