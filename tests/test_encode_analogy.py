"""Encode Analogy: ComfyUI's CLIP_VISION path, the transformers path and the open_clip path agree on the same weights."""

from __future__ import annotations

import json

import pytest
import torch
from comfy_inproc import float32_clip_vision
from tiny_models import randomize_

from training.data.synthetic import procedural_scene

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
    from safetensors.torch import load_file

    folder, _ = tiny_clip
    return float32_clip_vision(folder / "comfy_clip_config.json", dict(TINY_CLIP, model_type="clip_vision_model"),
                               load_file(folder / "hf" / "model.safetensors"))


def images():
    return {"a": procedural_scene(1, 300, 200).unsqueeze(0), "a_prime": procedural_scene(2, 300, 200).unsqueeze(0),
            "b": torch.stack([procedural_scene(3, 180, 260), procedural_scene(4, 180, 260)])}


def test_comfy_and_transformers_paths_agree(comfy_inproc, tiny_clip, comfy_clip):
    analogy_nodes = __import__(f"{comfy_inproc.pack.__name__}.nodes.analogy", fromlist=["x"])
    analogy_mod = __import__(f"{comfy_inproc.pack.__name__}.analogy_core.analogy", fromlist=["x"])
    ours = analogy_nodes.encode_with_comfy(comfy_clip, images())
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


def pil_reference(image: torch.Tensor, size: int = 224, resample=None, mean=None, std=None) -> torch.Tensor:
    """CLIPImageProcessor's steps done by hand: 8-bit image, PIL bicubic resize of the shortest side to ``size`` (the
    long side truncated like transformers), centre crop (top/left = floor of half the excess), /255, CLIP mean/std."""
    import numpy as np
    from PIL import Image

    from analogy_core.analogy import CLIP_MEAN, CLIP_STD

    resample = Image.BICUBIC if resample is None else resample
    mean = np.asarray(CLIP_MEAN if mean is None else mean, dtype=np.float32)
    std = np.asarray(CLIP_STD if std is None else std, dtype=np.float32)
    pixels = (image.numpy() * 255).round().astype(np.uint8)
    h, w = pixels.shape[:2]
    new_h, new_w = (size, int(size * w / h)) if h <= w else (int(size * h / w), size)
    resized = np.asarray(Image.fromarray(pixels).resize((new_w, new_h), resample), dtype=np.float32)
    top, left = (new_h - size) // 2, (new_w - size) // 2
    crop = resized[top: top + size, left: left + size] / np.float32(255)
    return torch.from_numpy((crop - mean) / std).permute(2, 0, 1)


@pytest.mark.parametrize("height, width", [(217, 333), (333, 217), (224, 224), (97, 120)])
def test_preprocessing_is_the_official_one(comfy_inproc, height, width):
    """Our pixels equal CLIPImageProcessor's steps done by hand with PIL bicubic (a bilinear resize would fail)."""
    from PIL import Image

    from analogy_core.analogy import preprocess

    image = procedural_scene(9, width, height)
    assert image.shape == (height, width, 3)
    ours = preprocess(image.unsqueeze(0))
    assert ours.shape == (1, 3, 224, 224)
    expected = pil_reference(image)
    torch.testing.assert_close(ours[0], expected, rtol=1e-5, atol=1e-5)
    if (height, width) != (224, 224):  # the comparison tells bicubic from bilinear and from a plain squash
        assert (pil_reference(image, resample=Image.BILINEAR) - expected).abs().max() > 0.05
        squash = torch.nn.functional.interpolate(image.permute(2, 0, 1)[None], size=(224, 224), mode="bicubic")[0]
        assert (squash - expected).abs().max() > 0.05
    # ComfyUI's own encode_image resizes with torch bicubic instead: measurably different input pixels.
    import comfy.clip_vision

    comfy_pixels = comfy.clip_vision.clip_preprocess(image.unsqueeze(0), size=224)
    if (height, width) != (224, 224):
        assert (comfy_pixels - ours).abs().mean() > 1e-3


def comfy_vision(folder, config: dict, state=None):
    """ComfyUI's own ClipVisionModel for a config (float32 weights for exact comparisons)."""
    path = folder / f"comfy_{config['model_type']}_{config['hidden_size']}_{config['image_size']}.json"
    return float32_clip_vision(path, config, state)


def test_comfy_path_preprocesses_at_the_encoders_size(comfy_inproc, tmp_path):
    """A CLIP at another resolution (like ViT-L/14@336) is fed pixels at its own size, equal on both paths."""
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    analogy_nodes = __import__(f"{comfy_inproc.pack.__name__}.nodes.analogy", fromlist=["x"])
    analogy_mod = __import__(f"{comfy_inproc.pack.__name__}.analogy_core.analogy", fromlist=["x"])
    config = dict(TINY_CLIP, image_size=56)
    model = CLIPVisionModelWithProjection(CLIPVisionConfig(**config)).eval()
    randomize_(model, seed=8)
    clip_vision = comfy_vision(tmp_path, dict(config, model_type="clip_vision_model"), model.state_dict())
    ours = analogy_nodes.encode_with_comfy(clip_vision, images())
    theirs = analogy_mod.encode_with_transformers(model, images())
    assert ours.encoder == theirs.encoder and ours.encoder.image_size == 56 and ours.encoder.family == "clip"
    assert ours.patch_tokens["a"].shape == (2, 1 + (56 // 14) ** 2, 64)
    for role in ours.roles:
        torch.testing.assert_close(ours.image_embeds[role], theirs.image_embeds[role], rtol=1e-4, atol=1e-5)


SIGLIP = dict(num_channels=3, hidden_act="gelu_pytorch_tanh", hidden_size=48, image_size=28, intermediate_size=96,
              model_type="siglip_vision_model", num_attention_heads=2, num_hidden_layers=2, patch_size=14,
              image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5])
DINO = dict(hidden_size=32, patch_size=14, image_size=518, num_channels=3, num_attention_heads=2, hidden_act="gelu",
            model_type="dinov2", num_hidden_layers=2, layer_norm_eps=1e-6, use_swiglu_ffn=False, layerscale_value=1.0,
            mlp_ratio=4, image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225])


def test_encoder_family_is_recognised_and_non_clip_encoders_are_refused(comfy_inproc, comfy_clip, tmp_path):
    """ComfyUI loads CLIP, SigLIP, SigLIP2 and DINOv2 as CLIP_VISION; the ANALOGY records which, and Encode Analogy
    refuses what LoRWeB's CLIP query cannot be built from."""
    analogy_nodes = __import__(f"{comfy_inproc.pack.__name__}.nodes.analogy", fromlist=["x"])
    assert analogy_nodes.encoder_family(comfy_clip) == "clip"
    siglip = comfy_vision(tmp_path, SIGLIP)
    dino = comfy_vision(tmp_path, DINO)
    assert analogy_nodes.encoder_family(siglip) == "siglip" and analogy_nodes.encoder_family(dino) == "dinov2"
    info = analogy_nodes.encoder_info(siglip)
    assert (info.family, info.embed_dim, info.hidden_dim, info.patch_size, info.num_layers) == ("siglip", 48, 48, 14, 2)
    assert info.name.startswith("SigLIP-like ViT (embed 48")
    info = analogy_nodes.encoder_info(dino)
    assert (info.family, info.embed_dim, info.patch_size, info.num_layers, info.image_size) == ("dinov2", 32, 14, 2, 518)
    imgs = images()
    for clip_vision, name in ((siglip, "SigLIP-like ViT"), (dino, "DINOv2-like ViT")):
        with pytest.raises(ValueError, match=f"this CLIP_VISION is {name} .* needs a CLIP vision model"):
            analogy_nodes.EncodeAnalogy().encode(clip_vision, imgs["a"], imgs["a_prime"], imgs["b"])
    # newer ComfyUI keeps the config's model_type (and the config) on the object, e.g. for SigLIP2 NaFlex
    siglip.model_type, siglip.config = "siglip2_vision_model", dict(SIGLIP, model_type="siglip2_vision_model")
    assert analogy_nodes.encoder_family(siglip) == "siglip2" and analogy_nodes.encoder_info(siglip).family == "siglip2"
    siglip.model_type = "dinov3"  # newer ComfyUI's DINOv3: refused by name before its structure is read
    with pytest.raises(ValueError, match=r"this CLIP_VISION is a DINOv3 model .* needs a CLIP vision model"):
        analogy_nodes.EncodeAnalogy().encode(siglip, imgs["a"], imgs["a_prime"], imgs["b"])
    siglip.model_type = "radio_vision_model"
    with pytest.raises(ValueError, match="unknown CLIP_VISION model type 'radio_vision_model'"):
        analogy_nodes.encoder_family(siglip)


def test_encode_node_reports_the_encoder(comfy_inproc, comfy_clip):
    analogy_nodes = __import__(f"{comfy_inproc.pack.__name__}.nodes.analogy", fromlist=["x"])
    imgs = images()
    analogy, info = analogy_nodes.EncodeAnalogy().encode(comfy_clip, imgs["a"], imgs["a_prime"])
    assert analogy.roles == ("a", "a_prime") and "CLIP-like ViT (embed 32" in info and "(family clip)" in info
    assert analogy.encoder.family == "clip"
    with pytest.raises(ValueError, match="batch sizes must be 1 or all equal"):
        analogy_nodes.EncodeAnalogy().encode(comfy_clip, imgs["b"], imgs["a"], imgs["b"].repeat(3, 1, 1, 1)[:3])
    tokens = tuple(analogy.patch_tokens["a"].shape[1:])
    assert f"tokens {tokens}" in info and analogy.patch_tokens["a"].dtype == torch.float32


def test_a_half_precision_clip_vision_gives_float32_embeddings(comfy_inproc, comfy_clip):
    """ComfyUI may store CLIP vision in bfloat16 / float16; the ANALOGY holds float32 close to the float32 model's.
    (ComfyUI's layers compute in the input's dtype, float32 pixels here, so the node's own ``.float()`` is a guard
    this test cannot tell from its absence.)"""
    import copy

    analogy_nodes = __import__(f"{comfy_inproc.pack.__name__}.nodes.analogy", fromlist=["x"])
    half = copy.deepcopy(comfy_clip)
    half.model.to(torch.bfloat16)
    imgs = images()
    analogy, _ = analogy_nodes.EncodeAnalogy().encode(half, imgs["a"], imgs["a_prime"])
    reference, _ = analogy_nodes.EncodeAnalogy().encode(comfy_clip, imgs["a"], imgs["a_prime"])
    for role in ("a", "a_prime"):
        assert analogy.image_embeds[role].dtype == analogy.patch_tokens[role].dtype == torch.float32
        torch.testing.assert_close(analogy.patch_tokens[role], reference.patch_tokens[role], rtol=0.1, atol=0.1)


def test_encode_uses_the_models_own_normalisation_and_loads_it_first(comfy_inproc, comfy_clip, monkeypatch):
    """The CLIP_VISION's image_mean / image_std (ComfyUI reads them from its config) reach the preprocessing, and
    the model is loaded through ComfyUI's model management before the pass."""
    analogy_nodes = __import__(f"{comfy_inproc.pack.__name__}.nodes.analogy", fromlist=["x"])
    seen: dict[str, object] = {}
    real_batch_roles = analogy_nodes.batch_roles

    def recording_batch_roles(images, size, mean, std):
        seen["normalisation"] = (mean, std)
        return real_batch_roles(images, size, mean, std)

    monkeypatch.setattr(analogy_nodes, "batch_roles", recording_batch_roles)
    monkeypatch.setattr(analogy_nodes.comfy_compat, "load_models", lambda patchers: seen.setdefault("loaded", patchers))
    monkeypatch.setattr(comfy_clip, "image_mean", [0.5, 0.5, 0.5], raising=False)
    monkeypatch.setattr(comfy_clip, "image_std", [0.25, 0.25, 0.25], raising=False)
    imgs = images()
    analogy_nodes.EncodeAnalogy().encode(comfy_clip, imgs["a"], imgs["a_prime"])
    assert seen["normalisation"] == ((0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    assert seen["loaded"] == [comfy_clip.patcher]


# -- open_clip path ----------------------------------------------------------------------------------------------------


def hf_to_open_clip_visual(hf: dict[str, torch.Tensor], layers: int) -> dict[str, torch.Tensor]:
    """Independent key mapping transformers CLIPVisionModelWithProjection -> open_clip VisionTransformer."""
    v = "vision_model."
    out = {"class_embedding": hf[v + "embeddings.class_embedding"],
           "positional_embedding": hf[v + "embeddings.position_embedding.weight"],
           "conv1.weight": hf[v + "embeddings.patch_embedding.weight"],
           "proj": hf["visual_projection.weight"].t().contiguous()}
    for ours, theirs in (("ln_pre", "pre_layrnorm"), ("ln_post", "post_layernorm")):
        for p in ("weight", "bias"):
            out[f"{ours}.{p}"] = hf[f"{v}{theirs}.{p}"]
    for i in range(layers):
        src, dst = f"{v}encoder.layers.{i}.", f"transformer.resblocks.{i}."
        for p in ("weight", "bias"):
            out[f"{dst}attn.in_proj_{p}"] = torch.cat([hf[f"{src}self_attn.{n}_proj.{p}"] for n in "qkv"])
            for ours, theirs in (("attn.out_proj", "self_attn.out_proj"), ("ln_1", "layer_norm1"),
                                 ("ln_2", "layer_norm2"), ("mlp.c_fc", "mlp.fc1"), ("mlp.c_proj", "mlp.fc2")):
                out[f"{dst}{ours}.{p}"] = hf[f"{src}{theirs}.{p}"]
    return out


@pytest.fixture(scope="module")
def open_clip_file(tiny_clip):
    """The tiny CLIP's weights as a whole open_clip model (vision + a text tower) saved in safetensors."""
    import open_clip
    from safetensors.torch import load_file, save_file

    folder, _ = tiny_clip
    arch = "analogy-test-tiny-clip"
    config = folder / f"{arch}.json"
    config.write_text(json.dumps({
        "embed_dim": TINY_CLIP["projection_dim"], "quick_gelu": True,
        "vision_cfg": {"image_size": 224, "layers": 3, "width": 64, "head_width": 16, "mlp_ratio": 2.0,
                       "patch_size": 14},
        "text_cfg": {"context_length": 8, "vocab_size": 64, "width": 32, "heads": 2, "layers": 1}}))
    open_clip.add_model_config(config)
    model = open_clip.create_model(arch, pretrained=None)
    visual = hf_to_open_clip_visual(load_file(folder / "hf" / "model.safetensors"), TINY_CLIP["num_hidden_layers"])
    model.visual.load_state_dict(visual, strict=True)
    path = folder / "open_clip_model.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, path)
    return arch, path


def test_open_clip_and_transformers_paths_agree(tiny_clip, open_clip_file):
    from analogy_core.encoders import ImageEncoder, load_image_encoder

    arch, path = open_clip_file
    open_clip_encoder = load_image_encoder(f"open_clip:{arch}:{path}")
    transformers_encoder = load_image_encoder(str(tiny_clip[0] / "hf"))
    assert open_clip_encoder.kind == "open_clip" and transformers_encoder.kind == "transformers"
    assert open_clip_encoder.info == transformers_encoder.info == ImageEncoder(tiny_clip[1], "transformers").info
    ours, theirs = open_clip_encoder.encode_images(images()), transformers_encoder.encode_images(images())
    assert ours.encoder == theirs.encoder and ours.roles == theirs.roles == ("a", "a_prime", "b")
    assert not torch.allclose(ours.image_embeds["a"], ours.image_embeds["a_prime"], atol=1e-3)
    for role in ours.roles:
        torch.testing.assert_close(ours.image_embeds[role], theirs.image_embeds[role], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(ours.patch_tokens[role], theirs.patch_tokens[role], rtol=1e-4, atol=1e-4)
    assert ours.patch_tokens["b"].shape == (2, 1 + (224 // 14) ** 2, 64)


def test_open_clip_loader_refuses_wrong_files(tmp_path, tiny_clip, open_clip_file):
    from safetensors.torch import load_file, save_file

    from analogy_core.analogy import AnalogyError
    from analogy_core.encoders import load_image_encoder

    arch, path = open_clip_file
    with pytest.raises(AnalogyError, match="no architecture 'ViT-Nope'"):
        load_image_encoder(f"open_clip:ViT-Nope:{path}")
    with pytest.raises(AnalogyError, match="open_clip:<architecture>:<weights.safetensors>"):
        load_image_encoder("open_clip:ViT-L-14")
    transformers_keys = tmp_path / "hf_keys.safetensors"  # a transformers file is not an open_clip one
    save_file(load_file(tiny_clip[0] / "hf" / "model.safetensors"), transformers_keys)
    with pytest.raises(AnalogyError, match="missing"):
        load_image_encoder(f"open_clip:{arch}:{transformers_keys}")
    with pytest.raises(AnalogyError, match="does not fit"):  # right keys, another architecture's shapes
        load_image_encoder(f"open_clip:ViT-B-32-quickgelu:{path}")


def test_open_clip_loader_refuses_extra_vision_weights(tmp_path, tiny_clip, open_clip_file):
    """Strict loading both ways: a file with every vision weight plus one the tower does not have (another variant's
    layer, a misnamed key) is refused, naming the unexpected key, not loaded with the extra weight dropped."""
    from safetensors.torch import load_file, save_file

    from analogy_core.analogy import AnalogyError
    from analogy_core.encoders import load_image_encoder

    arch, path = open_clip_file
    tensors = load_file(path)
    extra = tmp_path / "extra_key.safetensors"
    save_file(tensors, extra)
    assert load_image_encoder(f"open_clip:{arch}:{extra}").kind == "open_clip", "the same weights load as they are"
    save_file({**tensors, "visual.extra_head.weight": torch.zeros(4, 4)}, extra)
    with pytest.raises(AnalogyError, match=r"0 missing .*1 unexpected .*extra_head\.weight"):
        load_image_encoder(f"open_clip:{arch}:{extra}")


def test_a_batched_pass_keeps_each_samples_own_encoding(tiny_clip):
    """One encoder pass over several roles and samples: sample i of a role is what encoding that image alone gives,
    and a batch-1 role is repeated to the batch."""
    from analogy_core.analogy import encode_with_transformers

    model = tiny_clip[1]
    scenes = images()
    batched = encode_with_transformers(model, {"a": scenes["a"], "b": scenes["b"]})
    assert not torch.allclose(batched.image_embeds["b"][0], batched.image_embeds["b"][1], atol=1e-3)
    for i in range(2):
        alone = encode_with_transformers(model, {"b": scenes["b"][i:i + 1]})
        torch.testing.assert_close(batched.image_embeds["b"][i:i + 1], alone.image_embeds["b"], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(batched.patch_tokens["b"][i:i + 1], alone.patch_tokens["b"], rtol=1e-4, atol=1e-4)
    a_alone = encode_with_transformers(model, {"a": scenes["a"]})
    for i in range(2):
        torch.testing.assert_close(batched.image_embeds["a"][i:i + 1], a_alone.image_embeds["a"], rtol=1e-4, atol=1e-5)



def test_image_encoder_encode_gives_each_image_its_own_role(tiny_clip):
    """ImageEncoder.encode(a, a′, b): each role holds the encoding of the image passed for it, not another's."""
    from analogy_core.analogy import encode_with_transformers
    from analogy_core.encoders import ImageEncoder

    model, scenes = tiny_clip[1], images()
    b = scenes["b"][:1]
    encoded = ImageEncoder(model, "transformers").encode(scenes["a"], scenes["a_prime"], b)
    for role, image in (("a", scenes["a"]), ("a_prime", scenes["a_prime"]), ("b", b)):
        alone = encode_with_transformers(model, {role: image})
        torch.testing.assert_close(encoded.image_embeds[role], alone.image_embeds[role], rtol=1e-4, atol=1e-5)
    assert not torch.allclose(encoded.image_embeds["a"], encoded.image_embeds["a_prime"], atol=1e-3)

# -- the encoder fingerprint ------------------------------------------------------------------------------------------

def test_the_fingerprint_is_the_same_on_every_path_and_tells_other_weights_apart(comfy_inproc, tiny_clip, comfy_clip,
                                                                                open_clip_file):
    """ComfyUI's CLIP_VISION (the node's output), transformers and open_clip give one fingerprint for one set of
    weights; the same architecture with other weights, or in bfloat16 storage, is told apart by the distance."""
    import copy

    from analogy_core.encoders import ImageEncoder, load_image_encoder
    from analogy_core.fingerprint import SAME_ENCODER_DISTANCE

    analogy_nodes = __import__(f"{comfy_inproc.pack.__name__}.nodes.analogy", fromlist=["x"])
    imgs = images()
    node_analogy, _ = analogy_nodes.EncodeAnalogy().encode(comfy_clip, imgs["a"], imgs["a_prime"])
    comfy = node_analogy.fingerprint
    transformers = ImageEncoder(tiny_clip[1], "transformers").fingerprint()
    open_clip = load_image_encoder(f"open_clip:{open_clip_file[0]}:{open_clip_file[1]}").fingerprint()
    assert comfy is not None and comfy.distance(transformers) < 1e-3 and open_clip.distance(transformers) < 1e-3

    other = copy.deepcopy(tiny_clip[1])
    randomize_(other, seed=6)
    assert ImageEncoder(other, "transformers").fingerprint().distance(transformers) > 4 * SAME_ENCODER_DISTANCE
    stored_bf16 = copy.deepcopy(tiny_clip[1]).to(torch.bfloat16).float()  # ComfyUI may store CLIP vision in 16 bits
    assert ImageEncoder(stored_bf16, "transformers").fingerprint().distance(transformers) < SAME_ENCODER_DISTANCE / 4


def test_the_fingerprint_is_taken_once_per_loaded_model(comfy_inproc, comfy_clip, monkeypatch):
    """Encode Analogy probes each CLIP_VISION once while it lives; another model (other weights) gets its own."""
    import copy

    analogy_nodes = __import__(f"{comfy_inproc.pack.__name__}.nodes.analogy", fromlist=["x"])
    calls = []
    encode = analogy_nodes.encode_with_comfy
    monkeypatch.setattr(analogy_nodes, "encode_with_comfy",
                        lambda cv, imgs: calls.append(list(imgs)) or encode(cv, imgs))
    model = copy.deepcopy(comfy_clip)
    first = analogy_nodes.comfy_fingerprint(model)
    assert calls == [["a"]] and analogy_nodes.comfy_fingerprint(model) == first and len(calls) == 1
    imgs = images()
    analogy, _ = analogy_nodes.EncodeAnalogy().encode(model, imgs["a"], imgs["a_prime"])
    assert analogy.fingerprint == first and len(calls) == 2  # the analogy's own pass, no second probe
    other = copy.deepcopy(comfy_clip)
    with torch.no_grad():
        for p in other.model.parameters():
            p.mul_(1.5)
    assert analogy_nodes.comfy_fingerprint(other).distance(first) > 0.1 and len(calls) == 3
