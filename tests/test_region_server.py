"""Predict Edit Region and Composite By Region in the real ComfyUI server, on tiny models built here.

Checks: the node's CLIP patch features equal the trainer's (same weights, ComfyUI's CLIP_VISION vs transformers);
Predict Edit Region → Composite By Region → SaveImage keeps every pixel outside the region bit for bit (text and
analogy mode); the shipped examples run with tiny models swapped in for the downloads: region_inpaint.json
(SetLatentNoiseMask inpainting on a tiny SD1.5, then Composite By Region) and region_constrained_analogy.json (a
LoRWeB edit of B on a tiny FLUX confined to the predicted region): outside the region the saved image equals B.
"""

from __future__ import annotations

import json
from dataclasses import asdict

import numpy as np
import pytest
import torch
from comfy_inproc import float32_clip_vision
from PIL import Image
from safetensors.torch import save_file
from test_comfy_server import REPO
from test_encode_analogy import TINY_CLIP
from test_lora_server import checkpoint  # noqa: F401  (fixture: tiny SD1.5 with a TAESD VAE)
from test_lorweb_server import tiny_files  # noqa: F401  (fixture: tiny FLUX, TAEF1, LoRWeB basis, example inputs)
from tiny_models import FLUX_COMFY, randomize_

from analogy_core.analogy import EncoderInfo
from analogy_core.regions import RegionPredictor, RegionSpec, save_region_predictor
from devtools.workflow import ui_to_api

pytestmark = pytest.mark.comfy

CLIP_FILE, T5_FOLDER, T5_WEIGHTS = "tiny_region_clip.safetensors", "tiny_t5", "tiny_t5/model.safetensors"
REGION_FILES = {"text": "tiny_region_text.safetensors", "analogy": "tiny_region_analogy.safetensors"}
INSTRUCTION = "make the red square blue"
ENCODER = EncoderInfo.describe(TINY_CLIP["projection_dim"], TINY_CLIP["hidden_size"], TINY_CLIP["image_size"],
                               TINY_CLIP["patch_size"], TINY_CLIP["num_hidden_layers"])


def image_array(comfy, history, node) -> np.ndarray:
    return np.asarray(Image.open(comfy.output_files(history, node)[0]).convert("RGB"), dtype=np.int16)


def input_array(comfy, name) -> np.ndarray:
    return np.asarray(Image.open(comfy.base_dir / "input" / name).convert("RGB"), dtype=np.int16)


def inproc_module(comfy_inproc, name):
    return __import__(f"{comfy_inproc.pack.__name__}.{name}", fromlist=["x"])


def comfy_clip_vision(comfy_inproc, path):
    """ComfyUI's own ClipVisionModel on the test file (float32), in this process."""
    import comfy.utils

    return float32_clip_vision(path.with_suffix(".json"), dict(TINY_CLIP, model_type="clip_vision_model"),
                               comfy.utils.load_torch_file(str(path)))


def split_threshold(probs: torch.Tensor) -> float:
    """A threshold between two neighbouring probability levels that puts 20-80 % of the patches in the region (a
    random model's P_region varies little, so 0.5 could select all or nothing)."""
    levels = probs.flatten().double().sort().values
    for low, high in zip(levels[:-1], levels[1:]):
        share = float((levels > low).double().mean())
        if high - low > 1e-5 and 0.2 < share < 0.8:
            return float((low + high) / 2)
    raise AssertionError(f"the random region model does not vary enough over the test image: {levels.unique()[:8]}")


@pytest.fixture(scope="module")
def region_files(comfy, comfy_inproc, tiny_files, checkpoint):  # noqa: F811
    """Tiny CLIP vision, a tiny T5 folder, two random region models (text mode, analogy mode) and for each a
    threshold that splits the test image's patches (region_b.png for text, analogy_b.png with the example pair for
    analogy)."""
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    from devtools.images import load_png, save_png
    from training.data.synthetic import procedural_scene
    from training.regions.models import save_instruction_encoder, tiny_t5

    models = comfy.base_dir / "models"
    for folder in ("clip_vision", "text_encoders", "regions"):
        (models / folder).mkdir(parents=True, exist_ok=True)
    clip = CLIPVisionModelWithProjection(CLIPVisionConfig(**TINY_CLIP)).eval()
    randomize_(clip, seed=21)
    clip_path = models / "clip_vision" / CLIP_FILE
    save_file({k: v.contiguous() for k, v in clip.state_dict().items()}, clip_path,
              metadata={"clip_config": json.dumps(dict(TINY_CLIP, model_type="clip_vision_model"))})
    save_instruction_encoder(tiny_t5(seed=22), models / "text_encoders" / T5_FOLDER)
    save_png(procedural_scene(31, 96, 72), comfy.base_dir / "input" / "region_b.png")

    nodes = inproc_module(comfy_inproc, "nodes.regions")
    core = inproc_module(comfy_inproc, "analogy_core.regions")
    clip_vision = comfy_clip_vision(comfy_inproc, clip_path)
    t5 = core.InstructionEncoder.from_folder(models / "text_encoders" / T5_FOLDER)
    encode_analogy = inproc_module(comfy_inproc, "nodes.analogy").encode_with_comfy
    pair = {r: load_png(comfy.base_dir / "input" / f"analogy_{r}.png").unsqueeze(0) for r in ("a", "a_prime")}
    images = {"text": load_png(comfy.base_dir / "input" / "region_b.png").unsqueeze(0),
              "analogy": load_png(comfy.base_dir / "input" / "analogy_b.png").unsqueeze(0)}
    conditions = {"text": ("text", *t5.encode([INSTRUCTION])),
                  "analogy": ("analogy", *(encode_analogy(clip_vision, pair).patch_tokens[r] for r in pair))}
    out = {"clip_vision": clip_vision, "clip": clip, "nodes": nodes, "t5": t5, "encode_analogy": encode_analogy,
           "pair": pair, "images": images}
    for mode in ("text", "analogy"):
        spec = RegionSpec(dim=TINY_CLIP["projection_dim"], grid=TINY_CLIP["image_size"] // TINY_CLIP["patch_size"],
                          image_size=TINY_CLIP["image_size"], text_dim=t5.width if mode == "text" else 0,
                          analogy_dim=TINY_CLIP["hidden_size"] if mode == "analogy" else 0,
                          encoder=asdict(ENCODER), instruction_encoder=T5_FOLDER)
        patches = nodes.comfy_vision_patches(clip_vision, images[mode])
        torch.manual_seed(23)
        net = RegionPredictor(spec)
        with torch.no_grad():
            for name, p in net.named_parameters():
                if not name.startswith("head"):
                    p.mul_(3.0)  # sharper attention than at initialisation: a region that follows the picture
        path = save_region_predictor(net, models / "regions" / REGION_FILES[mode])
        out[mode] = core.load_region_predictor(path)
        out[f"{mode}_threshold"] = split_threshold(out[mode](patches, *conditions[mode]).probs)
    return out


def test_node_features_equal_the_trainers(region_files):
    """Predict Edit Region (ComfyUI's CLIP_VISION) and train_region (transformers) see the same F_img."""
    from transformers import CLIPConfig, CLIPModel

    from analogy_core.regions import FrozenClip
    from training.regions.models import TINY_CLIP as TINY_TEXT
    from training.regions.models import word_tokenizer

    vision = {k: v for k, v in TINY_CLIP.items() if k != "projection_dim"}
    tokenizer = word_tokenizer(["a"])
    text = dict(TINY_TEXT["text"], vocab_size=len(tokenizer), eos_token_id=tokenizer.eos_token_id)
    full = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=TINY_CLIP["projection_dim"]))
    missing, unexpected = full.load_state_dict(region_files["clip"].state_dict(), strict=False)
    assert not unexpected and all(k.startswith(("text_", "logit_scale")) for k in missing)
    image = torch.cat([region_files["images"]["text"], region_files["images"]["text"].flip(2)])
    ours = region_files["nodes"].comfy_vision_patches(region_files["clip_vision"], image)
    theirs = FrozenClip(full, tokenizer).vision(image).patches
    assert ours.shape == (2, 256, TINY_CLIP["projection_dim"]) and ours.std() > 0.1
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-5)


def inproc_binary(region_files, image: np.ndarray, mode: str, inputs: dict) -> np.ndarray:
    """The binary region the node computes in this process for an image the server loaded (same files)."""
    tensor = torch.from_numpy(image.astype(np.float32) / 255.0).unsqueeze(0)
    nodes = region_files["nodes"]
    if mode == "analogy":
        embedding = region_files["encode_analogy"](region_files["clip_vision"], region_files["pair"])
        probs, _ = nodes.predict_probabilities(region_files[mode], region_files["clip_vision"], tensor,
                                               analogy=embedding)
    else:
        probs, _ = nodes.predict_probabilities(region_files[mode], region_files["clip_vision"], tensor,
                                               inputs["instruction"], region_files["t5"])
    masks = nodes.region_masks(probs, 16, image.shape[0], image.shape[1], inputs["threshold"], inputs["grow"],
                               inputs["feather"])
    return masks.binary[0].numpy()


IMAGE_FILES = {"text": "region_b.png", "analogy": "analogy_b.png"}


def region_prompt(mode: str, threshold: float, grow: int = 2, feather: int = 3) -> dict:
    predict = {"image": ["1", 0], "region_model": ["3", 0], "clip_vision": ["2", 0], "threshold": threshold,
               "grow": grow, "feather": feather}
    prompt = {
        "1": {"class_type": "LoadImage", "inputs": {"image": IMAGE_FILES[mode]}},
        "2": {"class_type": "AnalogyTestTinyClipVisionLoader", "inputs": {"clip_name": CLIP_FILE}},
        "3": {"class_type": "AnalogyLoadRegionModel", "inputs": {"region_name": REGION_FILES[mode]}},
        "5": {"class_type": "AnalogyPredictEditRegion", "inputs": predict},
        "6": {"class_type": "ImageInvert", "inputs": {"image": ["1", 0]}},
        "7": {"class_type": "AnalogyCompositeByRegion", "inputs": {"original": ["1", 0], "edited": ["6", 0],
                                                                   "mask": ["5", 0]}},
        "8": {"class_type": "SaveImage", "inputs": {"images": ["7", 0], "filename_prefix": f"region_{mode}"}},
        "9": {"class_type": "MaskToImage", "inputs": {"mask": ["5", 1]}},
        "10": {"class_type": "SaveImage", "inputs": {"images": ["9", 0], "filename_prefix": f"binary_{mode}"}},
        "11": {"class_type": "MaskToImage", "inputs": {"mask": ["5", 0]}},
        "12": {"class_type": "SaveImage", "inputs": {"images": ["11", 0], "filename_prefix": f"soft_{mode}"}},
        "13": {"class_type": "SaveImage", "inputs": {"images": ["5", 2], "filename_prefix": f"preview_{mode}"}},
    }
    if mode == "text":
        prompt["4"] = {"class_type": "AnalogyLoadInstructionEncoder", "inputs": {"encoder": T5_WEIGHTS}}
        predict.update(instruction=INSTRUCTION, instruction_encoder=["4", 0])
    else:
        prompt["4"] = {"class_type": "LoadImage", "inputs": {"image": "analogy_a.png"}}
        prompt["14"] = {"class_type": "LoadImage", "inputs": {"image": "analogy_a_prime.png"}}
        prompt["15"] = {"class_type": "AnalogyEncode", "inputs": {"clip_vision": ["2", 0], "a": ["4", 0],
                                                                  "a_prime": ["14", 0]}}
        predict.update(analogy=["15", 0])
    return prompt


@pytest.mark.parametrize("mode", ["text", "analogy"])
def test_predict_then_composite_keeps_the_outside_bit_for_bit(comfy, region_files, mode):
    prompt = region_prompt(mode, region_files[f"{mode}_threshold"])
    history = comfy.run(prompt)
    original = input_array(comfy, IMAGE_FILES[mode])
    out, binary, soft = (image_array(comfy, history, n) for n in ("8", "10", "12"))
    inside, outside = binary[..., 0] == 255, binary[..., 0] == 0
    assert (inside | outside).all(), "the binary mask is 0/1"
    assert 0.05 < inside.mean() < 0.95, f"a region that is neither empty nor everything ({inside.mean():.2f})"
    assert np.array_equal(out[outside], original[outside]), "outside the region: the input, bit for bit"
    assert ((soft[..., 0] > 0) <= inside).all(), "the feathered mask stays inside the binary region"
    full = soft[..., 0] == 255
    assert full.any() and np.abs(out[full] - (255 - original[full])).max() <= 1, "inside: the edited image"
    expected = inproc_binary(region_files, original, mode, dict(prompt["5"]["inputs"], instruction=INSTRUCTION))
    agree = float((inside == (expected == 1)).mean())
    assert agree > 0.9, f"the server's region is the one the node computes here (up to precision; {agree:.3f})"


def test_instruction_without_an_encoder_is_a_clear_error(comfy, region_files):
    from devtools.comfy_server import PromptFailed

    prompt = region_prompt("text", region_files["text_threshold"])
    del prompt["5"]["inputs"]["instruction_encoder"]
    with pytest.raises(PromptFailed, match="needs an instruction encoder"):
        comfy.run(prompt)


def example(comfy, name: str) -> dict:
    return ui_to_api(json.loads((REPO / "example_workflows" / name).read_text()), comfy.object_info())


def by_type(prompt: dict) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for key, node in prompt.items():
        out.setdefault(node["class_type"], []).append(key)
    return out


def swap_region_models(prompt: dict, kinds: dict, mode: str) -> None:
    for key in kinds.get("CLIPVisionLoader", []):
        prompt[key] = {"class_type": "AnalogyTestTinyClipVisionLoader", "inputs": {"clip_name": CLIP_FILE}}
    for key in kinds["AnalogyLoadRegionModel"]:
        prompt[key]["inputs"]["region_name"] = REGION_FILES[mode]
    for key in kinds.get("AnalogyLoadInstructionEncoder", []):
        prompt[key]["inputs"]["encoder"] = T5_WEIGHTS


def save_binary_mask(prompt: dict, kinds: dict, prefix: str) -> str:
    """Add MaskToImage → SaveImage of Predict Edit Region's binary mask to an example's prompt; returns the id."""
    prompt["900"] = {"class_type": "MaskToImage", "inputs": {"mask": [kinds["AnalogyPredictEditRegion"][0], 1]}}
    prompt["901"] = {"class_type": "SaveImage", "inputs": {"images": ["900", 0], "filename_prefix": prefix}}
    return "901"


def saved(comfy, prompt, history, source_type) -> np.ndarray:
    kinds = by_type(prompt)
    node = next(k for k in kinds["SaveImage"] if prompt[k]["inputs"]["images"][0] in kinds[source_type])
    return image_array(comfy, history, node)


def test_region_inpaint_example_keeps_the_outside_of_the_image(comfy, region_files, checkpoint):  # noqa: F811
    """example_workflows/region_inpaint.json: Predict Edit Region → SetLatentNoiseMask → KSampler → VAEDecode →
    Composite By Region → SaveImage, on a tiny SD1.5 (random conditioning instead of the text encoder)."""
    prompt = example(comfy, "region_inpaint.json")
    kinds = by_type(prompt)
    swap_region_models(prompt, kinds, "text")
    prompt[kinds["CheckpointLoaderSimple"][0]]["inputs"]["ckpt_name"] = checkpoint
    for seed, key in enumerate(kinds["CLIPTextEncode"]):
        prompt[key] = {"class_type": "AnalogyTestConditioning", "inputs": {"seed": seed, "tokens": 77, "width": 768}}
    prompt[kinds["KSampler"][0]]["inputs"].update(steps=2, seed=5)
    prompt[kinds["LoadImage"][0]]["inputs"]["image"] = IMAGE_FILES["text"]
    prompt[kinds["AnalogyPredictEditRegion"][0]]["inputs"].update(threshold=region_files["text_threshold"], grow=1,
                                                                  instruction=INSTRUCTION)
    for key in kinds["SaveImage"]:
        prompt[key]["inputs"]["filename_prefix"] = f"inpaint_{key}"
    mask_node = save_binary_mask(prompt, kinds, "inpaint_mask")
    history = comfy.run(prompt)
    result = saved(comfy, prompt, history, "AnalogyCompositeByRegion")
    original = input_array(comfy, IMAGE_FILES["text"])
    outside = image_array(comfy, history, mask_node)[..., 0] == 0
    assert 0.05 < 1 - outside.mean() < 0.95
    assert np.array_equal(result[outside], original[outside]), "outside the region: the image bit for bit"
    assert np.abs(result[~outside] - original[~outside]).mean() > 3, "the sampler repainted the region"


def test_region_constrained_analogy_example_leaves_b_outside_the_region(comfy, region_files, tiny_files):  # noqa: F811
    """example_workflows/region_constrained_analogy.json: the LoRWeB example's B′ put back into B inside the region
    Predict Edit Region finds from the same ANALOGY (tiny FLUX, TAEF1-style VAE, random conditioning)."""
    prompt = example(comfy, "region_constrained_analogy.json")
    kinds = by_type(prompt)
    swap_region_models(prompt, kinds, "analogy")
    prompt[kinds["UNETLoader"][0]] = {"class_type": "AnalogyTestTinyFluxLoader",
                                      "inputs": {"unet_name": "tiny_flux.safetensors"}}
    prompt[kinds["CLIPTextEncode"][0]] = {"class_type": "AnalogyTestConditioning", "inputs": {
        "seed": 1, "tokens": 8, "width": FLUX_COMFY["context_in_dim"], "pooled_width": FLUX_COMFY["vec_in_dim"]}}
    del prompt[kinds["DualCLIPLoader"][0]]
    prompt[kinds["VAELoader"][0]]["inputs"]["vae_name"] = "tiny_taef1.safetensors"
    prompt[kinds["AnalogyLoadLoRABasis"][0]]["inputs"]["basis_name"] = "tiny_basis.safetensors"
    prompt[kinds["AnalogyFourPanelComposite"][0]]["inputs"].update(panel_size="custom", width=64, height=64,
                                                                   snap="multiple_of_16")
    prompt[kinds["KSampler"][0]]["inputs"].update(steps=2, seed=11)
    prompt[kinds["AnalogyPredictEditRegion"][0]]["inputs"].update(threshold=region_files["analogy_threshold"], grow=1)
    for key in kinds["SaveImage"]:
        prompt[key]["inputs"]["filename_prefix"] = f"constrained_{key}"
    mask_node = save_binary_mask(prompt, kinds, "constrained_mask")
    history = comfy.run(prompt)
    result = saved(comfy, prompt, history, "AnalogyCompositeByRegion")
    b_prime = saved(comfy, prompt, history, "AnalogyExtractPanel")
    b = input_array(comfy, "analogy_b.png")
    assert result.shape == b.shape and b_prime.shape == b.shape, "B' restored to B's size, composited on B"
    outside = image_array(comfy, history, mask_node)[..., 0] == 0
    assert 0.05 < 1 - outside.mean() < 0.95, "only part of B is in the region"
    assert np.array_equal(result[outside], b[outside]), "outside the region: B bit for bit"
    assert np.abs(b_prime[outside] - b[outside]).mean() > 1, "LoRWeB alone changes B outside the region too"
    assert np.abs(result[~outside] - b[~outside]).mean() > 1, "inside the region the edit is kept"


class FakeComfyT5:
    """What Predict Edit Region reads from a ComfyUI CLIP: tokenize → {"l": ..., "t5xxl": ...} (pairs of id, weight)
    and encode_from_tokens → the t5xxl tokens' features (padded to 8 tokens, pad id 0)."""

    def __init__(self, width: int, pad_values: float = 0.0):
        from types import SimpleNamespace

        self.width, self.pad_values = width, pad_values
        self.tokenizer = SimpleNamespace(t5xxl=SimpleNamespace(pad_token=0), clip_l=SimpleNamespace(pad_token=49407))

    def tokenize(self, text):
        ids = [5 + len(word) for word in text.split()] + [1]
        return {"l": [[(49406, 1.0)] * 77], "t5xxl": [[(i, 1.0) for i in ids + [0] * (8 - len(ids))]]}

    def encode_from_tokens(self, tokens):
        ids = torch.tensor([pair[0] for pair in tokens["t5xxl"][0]], dtype=torch.float32)
        features = torch.sin(ids[:, None] * torch.arange(1, self.width + 1)[None, :] * 0.37)
        features[ids == 0] = self.pad_values
        return features.unsqueeze(0)


def test_comfy_text_encoder_serves_when_it_is_the_trained_t5(region_files):
    """The `clip` input: ComfyUI's own T5 output, its padding masked (so pad features do not matter); a T5 of another
    width is refused by name."""
    nodes, model, clip_vision = region_files["nodes"], region_files["text"], region_files["clip_vision"]
    width = model.spec.text_dim
    image = region_files["images"]["text"]
    probs, mode = nodes.predict_probabilities(model, clip_vision, image, "make it blue", clip=FakeComfyT5(width))
    assert mode == "text" and probs.std() > 0
    other_pads, _ = nodes.predict_probabilities(model, clip_vision, image, "make it blue",
                                                clip=FakeComfyT5(width, pad_values=5.0))
    torch.testing.assert_close(other_pads, probs)
    other_words, _ = nodes.predict_probabilities(model, clip_vision, image, "make the square green",
                                                 clip=FakeComfyT5(width))
    assert not torch.allclose(other_words, probs), "the instruction reaches the region"
    with pytest.raises(ValueError, match=f"instruction features must be \\[batch, tokens, {width}\\]"):
        nodes.predict_probabilities(model, clip_vision, image, "make it blue", clip=FakeComfyT5(width + 4))


def test_instruction_encoder_names_list_t5_folders_and_refuse_anything_else(comfy_inproc, tmp_path):
    """Load Instruction Encoder lists `<folder>/<weights>.safetensors` for transformers folders only, and refuses a
    name that is not one of them (another depth, `..`, a folder without config.json, a pickle) with a clear error."""
    import folder_paths

    from training.regions.models import save_instruction_encoder, tiny_t5

    nodes = inproc_module(comfy_inproc, "nodes.regions")
    root = tmp_path / "text_encoders"
    save_instruction_encoder(tiny_t5(seed=5), root / "t5_ok")
    (root / "no_config").mkdir()
    (root / "no_config" / "model.safetensors").write_bytes(b"0")
    (root / "pickle_only").mkdir()
    (root / "pickle_only" / "config.json").write_text("{}")
    (root / "pickle_only" / "pytorch_model.bin").write_bytes(b"0")
    (root / "loose.safetensors").write_bytes(b"0")
    paths = folder_paths.folder_names_and_paths[nodes.TEXT_ENCODER_FOLDER]
    folder_paths.folder_names_and_paths[nodes.TEXT_ENCODER_FOLDER] = ([str(root)], paths[1])
    folder_paths.filename_list_cache.pop(nodes.TEXT_ENCODER_FOLDER, None)
    try:
        assert nodes.instruction_encoder_names() == ["t5_ok/model.safetensors"]
        assert nodes.instruction_encoder_path("t5_ok/model.safetensors") == str(root / "t5_ok")
        for bad in ("t5_ok", "../text_encoders/t5_ok/model.safetensors", "t5_ok/../t5_ok/model.safetensors",
                    "no_config/model.safetensors", "pickle_only/pytorch_model.bin", "t5_ok/missing.safetensors",
                    "loose.safetensors"):
            assert nodes.instruction_encoder_path(bad) is None, bad
            with pytest.raises(nodes.RegionError, match="is not <folder>/<weights>.safetensors"):
                nodes.LoadInstructionEncoder().load(bad)
        encoder = nodes.LoadInstructionEncoder().load("t5_ok/model.safetensors")[0]
        assert encoder is not None
    finally:
        folder_paths.folder_names_and_paths[nodes.TEXT_ENCODER_FOLDER] = paths
        folder_paths.filename_list_cache.pop(nodes.TEXT_ENCODER_FOLDER, None)


def test_analogy_mode_refuses_another_encoder_and_a_pair_count_that_fits_no_batch(region_files):
    """The region model and the ANALOGY must come from the encoder it was trained with (the CLIP_VISION too), and an
    ANALOGY of n pairs serves one image or n images."""
    import copy
    import dataclasses

    nodes, model, clip_vision = region_files["nodes"], region_files["analogy"], region_files["clip_vision"]
    embedding = region_files["encode_analogy"](clip_vision, region_files["pair"])
    image = region_files["images"]["analogy"]
    probs, mode = nodes.predict_probabilities(model, clip_vision, image, analogy=embedding)
    assert mode == "analogy" and probs.std() > 0
    other = dataclasses.replace(embedding.encoder, patch_size=embedding.encoder.patch_size * 2)
    with pytest.raises(ValueError, match="this ANALOGY is .*trained with"):
        nodes.predict_probabilities(model, clip_vision, image, analogy=dataclasses.replace(embedding, encoder=other))
    retrained = copy.copy(model)
    retrained.spec = dataclasses.replace(model.spec, encoder=dataclasses.asdict(other))
    with pytest.raises(ValueError, match="this CLIP_VISION is .*trained with"):
        nodes.predict_probabilities(retrained, clip_vision, image, analogy=embedding)
    pairs = dataclasses.replace(embedding, image_embeds={r: t.repeat(2, 1) for r, t in embedding.image_embeds.items()},
                                patch_tokens={r: t.repeat(2, 1, 1) for r, t in embedding.patch_tokens.items()})
    with pytest.raises(ValueError, match="holds 2 pairs for 3 images"):
        nodes.predict_probabilities(model, clip_vision, image.repeat(3, 1, 1, 1), analogy=pairs)


def test_a_clip_vision_with_other_weights_is_refused(comfy_inproc, region_files, tmp_path):
    """A region model records the fingerprint of the CLIP it was trained with: the same weights pass (and the info
    says so), a CLIP_VISION or an ANALOGY of the same architecture with other weights is refused by name."""
    import copy
    import dataclasses

    from analogy_core.encoders import ImageEncoder

    nodes, clip_vision, image = region_files["nodes"], region_files["clip_vision"], region_files["images"]["analogy"]
    core = inproc_module(comfy_inproc, "analogy_core.regions")
    embedding = region_files["encode_analogy"](clip_vision, region_files["pair"])
    other_clip = copy.deepcopy(region_files["clip"])
    randomize_(other_clip, seed=99)
    trained = ImageEncoder(region_files["clip"], "transformers").fingerprint()
    other = ImageEncoder(other_clip, "transformers").fingerprint()
    model = region_files["analogy"]
    model_copy = copy.deepcopy(model)
    model_copy.encoder_fingerprint = trained
    recorded = core.load_region_predictor(core.save_region_predictor(model_copy, tmp_path / "recorded.safetensors"))
    assert recorded.encoder_fingerprint.distance(trained) == 0
    probs, mode = nodes.predict_probabilities(recorded, clip_vision, image, analogy=embedding)
    assert mode == "analogy" and torch.equal(probs, nodes.predict_probabilities(model, clip_vision, image,
                                                                                  analogy=embedding)[0])
    assert "encoder weights match" in nodes.region_encoder_weights(recorded, clip_vision, embedding)
    assert "records no encoder fingerprint" in nodes.region_encoder_weights(model, clip_vision, embedding)
    recorded.encoder_fingerprint = other
    with pytest.raises(ValueError, match=r"this CLIP_VISION \(.*\) is not the encoder this region model was trained "
                                         r"with: same architecture, other weights"):
        nodes.predict_probabilities(recorded, clip_vision, image, analogy=embedding)
    recorded.encoder_fingerprint = trained
    with pytest.raises(ValueError, match=r"the ANALOGY's encoder \(.*\) is not the encoder this region model"):
        nodes.predict_probabilities(recorded, clip_vision, image, analogy=dataclasses.replace(embedding,
                                                                                              fingerprint=other))


def test_neither_an_instruction_nor_an_analogy_is_a_clear_error(region_files):
    """A blank instruction (spaces only) and no ANALOGY: nothing says where to edit."""
    nodes, image = region_files["nodes"], region_files["images"]["text"]
    probs, mode = nodes.predict_probabilities(region_files["text"], region_files["clip_vision"], image,
                                              instruction="make it blue",
                                              clip=FakeComfyT5(region_files["text"].spec.text_dim))
    assert mode == "text" and probs.std() > 0  # the same call with an instruction works
    with pytest.raises(ValueError, match=r"needs an instruction \(text\) or an ANALOGY \(from Encode Analogy\)"):
        nodes.predict_probabilities(region_files["text"], region_files["clip_vision"], image, instruction="   ")
