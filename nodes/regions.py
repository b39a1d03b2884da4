"""Learnable edit regions: Load Region Model, Load Instruction Encoder (T5), Predict Edit Region, Composite By Region.

Predict Edit Region finds where an edit should happen (from an instruction or from an ANALOGY); Composite By Region
then keeps every pixel outside that region exactly as it was. The maths lives in ``analogy_core.regions``.
"""

from __future__ import annotations

import os

import torch

import folder_paths

from ..analogy_core.analogy import CLIP_MEAN, CLIP_STD, AnalogyEmbedding
from ..analogy_core.composite import resize
from ..analogy_core.fingerprint import describe_recorded
from ..analogy_core.regions import (InstructionEncoder, RegionError, RegionPredictor, check_encoder,
                                    check_encoder_weights, clip_pixels,
                                    composite_by_mask, load_region_predictor, project_tokens,
                                    region_masks)
from . import comfy_compat
from .common import ANALOGY_TYPE, CATEGORY
from .analogy import comfy_fingerprint, encoder_info

REGION_FOLDER = "regions"
REGION_MODEL_TYPE = "ANALOGY_REGION_MODEL"
INSTRUCTION_ENCODER_TYPE = "ANALOGY_INSTRUCTION_ENCODER"
TEXT_ENCODER_FOLDER = "text_encoders"

folder_paths.add_model_folder_path(REGION_FOLDER, os.path.join(folder_paths.models_dir, REGION_FOLDER))
if REGION_FOLDER in folder_paths.folder_names_and_paths:  # region checkpoints are .safetensors
    folder_paths.folder_names_and_paths[REGION_FOLDER] = (folder_paths.folder_names_and_paths[REGION_FOLDER][0],
                                                          {".safetensors"})


# ---------------------------------------------------------------------------------------------------------------------
# loaders


def region_names() -> list[str]:
    return sorted(folder_paths.get_filename_list(REGION_FOLDER))


class LoadRegionModel:
    DESCRIPTION = ("Loads a region predictor trained with python -m training.train_region from models/regions "
                   "(safetensors only; every tensor is checked against the sizes its header records).")
    CATEGORY = f"{CATEGORY}/regions"
    FUNCTION = "load"
    RETURN_TYPES = (REGION_MODEL_TYPE, "STRING")
    RETURN_NAMES = ("region_model", "info")
    OUTPUT_TOOLTIPS = ("The region predictor, for Predict Edit Region.",
                       "Its modes (instruction / analogy) and the encoders it was trained with.")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"region_name": (region_names(), {"tooltip": "A region checkpoint in models/regions."})}}

    @classmethod
    def IS_CHANGED(cls, region_name):
        path = folder_paths.get_full_path(REGION_FOLDER, region_name)
        return f"{path}:{os.path.getmtime(path)}" if path and os.path.exists(path) else region_name

    def load(self, region_name):
        path = folder_paths.get_full_path(REGION_FOLDER, region_name)
        if path is None:
            raise RegionError(f"region checkpoint {region_name!r} not found in models/regions")
        model = load_region_predictor(path)
        return (model, f"{model.spec.describe()}; {describe_recorded(model.encoder_fingerprint)}")


def instruction_encoder_names() -> list[str]:
    """``<folder>/<weights>.safetensors`` for every subfolder of the text-encoder folders that holds a transformers
    model (config.json and safetensors weights): the folder is the encoder, the file name only shows which."""
    names = set()
    for root in folder_paths.get_folder_paths(TEXT_ENCODER_FOLDER):
        if not os.path.isdir(root):
            continue
        for entry in sorted(os.listdir(root)):
            folder = os.path.join(root, entry)
            if os.path.isfile(os.path.join(folder, "config.json")):
                weights = sorted(f for f in os.listdir(folder) if f.endswith(".safetensors"))
                if weights:
                    names.add(f"{entry}/{weights[0]}")
    return sorted(names)


def instruction_encoder_path(name: str) -> str | None:
    """The folder of a listed ``<folder>/<weights>.safetensors`` (one level below a text-encoder folder only)."""
    parts = name.replace("\\", "/").split("/")
    if len(parts) != 2 or parts[0] in ("", ".", "..") or not parts[1].endswith(".safetensors"):
        return None
    for root in folder_paths.get_folder_paths(TEXT_ENCODER_FOLDER):
        folder = os.path.join(root, parts[0])
        if os.path.isfile(os.path.join(folder, "config.json")) and os.path.isfile(os.path.join(folder, parts[1])):
            return folder
    return None


class ComfyInstructionEncoder:
    """A T5 folder's encoder, its weights under ComfyUI's memory manager (loaded, offloaded and freed like any
    other model)."""

    def __init__(self, encoder: InstructionEncoder):
        import comfy.model_management as mm  # ComfyUI's own modules exist only inside a ComfyUI process

        self.encoder = encoder
        holder = torch.nn.Module()  # ModelPatcher sets .device on its model, which transformers models refuse
        holder.t5 = encoder.model
        self.patcher = comfy_compat.new_patcher(holder, mm.text_encoder_device(), mm.text_encoder_offload_device())

    @property
    def name(self) -> str:
        return self.encoder.name

    @property
    def width(self) -> int:
        return self.encoder.width

    def encode(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        comfy_compat.load_models([self.patcher])
        tokens, mask = self.encoder.encode(texts)
        return tokens.cpu(), mask.cpu()


class LoadInstructionEncoder:
    DESCRIPTION = ("Loads a T5 encoder saved as a transformers folder in models/text_encoders/<folder>/ (config.json, "
                   "model.safetensors and the tokenizer files), e.g. google/flan-t5-base, the region paper's "
                   "instruction encoder. Nothing is downloaded; pickle weights are refused.")
    CATEGORY = f"{CATEGORY}/regions"
    FUNCTION = "load"
    RETURN_TYPES = (INSTRUCTION_ENCODER_TYPE,)
    RETURN_NAMES = ("instruction_encoder",)
    OUTPUT_TOOLTIPS = ("Instruction token features for Predict Edit Region.",)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"encoder": (instruction_encoder_names(), {
            "tooltip": "A transformers T5 folder in models/text_encoders (shown with its weights file); the whole "
                       "folder is loaded."})}}

    def load(self, encoder):
        path = instruction_encoder_path(encoder)
        if path is None:
            raise RegionError(f"{encoder!r} is not <folder>/<weights>.safetensors of a T5 folder (with config.json) "
                              "in models/text_encoders")
        return (ComfyInstructionEncoder(InstructionEncoder.from_folder(path)),)


# ---------------------------------------------------------------------------------------------------------------------
# features


def comfy_vision_patches(clip_vision, images: torch.Tensor) -> torch.Tensor:
    """F_img: CLIP patch features in the joint space (last layer, post-layernorm, visual projection) from ComfyUI's
    CLIP_VISION, on the whole image resized to the encoder's square input, as the trainer computes them."""
    size = clip_vision.image_size
    mean = tuple(getattr(clip_vision, "image_mean", CLIP_MEAN))
    std = tuple(getattr(clip_vision, "image_std", CLIP_STD))
    pixels = clip_pixels(images, size, mean, std)
    comfy_compat.load_models([clip_vision.patcher])
    model = clip_vision.model
    with torch.no_grad():
        out = model(pixel_values=pixels.to(clip_vision.load_device), intermediate_output=-2)
        features = project_tokens(out[0], model.vision_model.post_layernorm, model.visual_projection)
    return features.patches.cpu()


def comfy_t5_tokens(clip, text: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Instruction features from ComfyUI's own text encoder (e.g. the t5xxl of a FLUX DualCLIPLoader): the token
    sequence it returns as conditioning, with its padding masked (the tokenizer entry of that length, pad id from
    that tokenizer)."""
    tokens = clip.tokenize(text)
    cond = clip.encode_from_tokens(tokens)
    if isinstance(cond, (tuple, list)):
        cond = cond[0]
    length = cond.shape[1]
    mask = torch.ones(1, length, dtype=torch.bool)
    candidates = [k for k, chunks in tokens.items() if sum(len(c) for c in chunks) == length]
    if candidates:
        key = next((k for k in candidates if "t5" in k), candidates[0])
        sub = getattr(clip.tokenizer, key, None) or getattr(clip.tokenizer, f"clip_{key}", None)
        pad = getattr(sub, "pad_token", None)
        ids = [pair[0] for chunk in tokens[key] for pair in chunk]
        if pad is not None and all(isinstance(i, int) for i in ids):
            mask = torch.tensor([[i != pad for i in ids]])
            mask[0, 0] = True  # never an empty instruction
    return cond.float().cpu(), mask


# ---------------------------------------------------------------------------------------------------------------------
# Predict Edit Region


def _region_device(clip_vision) -> torch.device:
    return torch.device(clip_vision.load_device) if clip_vision.load_device is not None else torch.device("cpu")


def predict_probabilities(model: RegionPredictor, clip_vision, image: torch.Tensor, instruction: str = "",
                          instruction_encoder=None, clip=None, analogy: AnalogyEmbedding | None = None
                          ) -> tuple[torch.Tensor, str]:
    """P_region [B, grid²] for an IMAGE batch and one instruction or ANALOGY; returns it and the mode used."""
    info = encoder_info(clip_vision)
    check_encoder(model.spec, info)
    if analogy is not None:
        check_encoder(model.spec, analogy.encoder, "ANALOGY")
    region_encoder_weights(model, clip_vision, analogy)
    patches = comfy_vision_patches(clip_vision, image)
    if analogy is not None:
        missing = [r for r in ("a", "a_prime") if r not in analogy.patch_tokens]
        if missing:
            raise RegionError(f"the ANALOGY has no patch tokens for {missing}; make it with Encode Analogy")
        kind, first, second = "analogy", analogy.patch_tokens["a"], analogy.patch_tokens["a_prime"]
        if first.shape[0] not in (1, patches.shape[0]):
            raise RegionError(f"the ANALOGY holds {first.shape[0]} pairs for {patches.shape[0]} images: give one pair "
                              "or one per image")
    elif instruction.strip():
        if instruction_encoder is not None:
            first, second = instruction_encoder.encode([instruction.strip()])
        elif clip is not None:
            first, second = comfy_t5_tokens(clip, instruction.strip())
        else:
            raise RegionError("an instruction needs an instruction encoder: connect Load Instruction Encoder (T5), "
                              "or a CLIP whose text encoder is the T5 this region model was trained with")
        kind = "text"
    else:
        raise RegionError("Predict Edit Region needs an instruction (text) or an ANALOGY (from Encode Analogy)")
    device = _region_device(clip_vision)
    model.to(device)
    with torch.no_grad():
        out = model(patches.to(device), kind, first.to(device), second.to(device) if second is not None else None)
    return out.probs.float().cpu(), kind


def region_encoder_weights(model: RegionPredictor, clip_vision, analogy: AnalogyEmbedding | None) -> str:
    """Refuse a CLIP_VISION (or an ANALOGY's encoder) of the right architecture but other weights than the region
    model was trained with; a sentence for the info."""
    if model.encoder_fingerprint is None:  # an older file: nothing to compare, so no probe pass either
        return check_encoder_weights(model, None, "this CLIP_VISION")
    note = check_encoder_weights(model, comfy_fingerprint(clip_vision),
                                 f"this CLIP_VISION ({encoder_info(clip_vision).label})")
    if analogy is not None:
        check_encoder_weights(model, analogy.fingerprint, f"the ANALOGY's encoder ({analogy.encoder.label})")
    return note


def preview(image: torch.Tensor, soft: torch.Tensor, binary: torch.Tensor) -> torch.Tensor:
    """The image with the region tinted red and the rest dimmed a little."""
    rgb = image[..., :3].float()
    m = soft.unsqueeze(-1)
    tinted = rgb * (1 - 0.5 * m) + torch.tensor([1.0, 0.15, 0.1]) * 0.5 * m
    outside = (1 - binary).unsqueeze(-1)
    return (tinted * (1 - 0.35 * outside)).clamp(0, 1)


class PredictEditRegion:
    DESCRIPTION = (
        "Predicts where an edit should happen: the learnable region of Ma et al. (CLIP patch features cross-attend "
        "to the instruction's T5 tokens, self-attention, a per-patch MLP), or in analogy mode the part of the image "
        "that corresponds to what changed between A and A'. Outputs a soft mask (feathered inside the region), the "
        "binary mask at the image's resolution and a preview. Feed the mask to Composite By Region (edited pixels "
        "inside, original pixels outside, bit for bit) or to SetLatentNoiseMask for inpainting.")
    CATEGORY = f"{CATEGORY}/regions"
    FUNCTION = "predict"
    RETURN_TYPES = ("MASK", "MASK", "IMAGE", "STRING")
    RETURN_NAMES = ("mask", "binary_mask", "preview", "info")
    OUTPUT_TOOLTIPS = ("Soft region: 0 outside the binary region, ramping up to 1 over `feather` pixels inside it.",
                       "Binary region (0/1) at the image's resolution, after threshold and grow.",
                       "The image with the region tinted red.",
                       "Mode, and the share of each image the region covers.")

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "image": ("IMAGE", {"tooltip": "The image to edit (B in an analogy)."}),
                "region_model": (REGION_MODEL_TYPE, {"tooltip": "From Load Region Model."}),
                "clip_vision": ("CLIP_VISION", {"tooltip": "The CLIP vision model the region model was trained with "
                                                           "(ViT-L/14 for the paper's setting)."}),
                "threshold": ("FLOAT", {"default": 0.5, "min": 0.01, "max": 0.99, "step": 0.01,
                                        "tooltip": "A pixel is in the region when its probability reaches this."}),
                "grow": ("INT", {"default": 0, "min": -256, "max": 256, "step": 1,
                                 "tooltip": "Pixels to enlarge (negative: shrink) the binary region by."}),
                "feather": ("INT", {"default": 0, "min": 0, "max": 256, "step": 1,
                                    "tooltip": "Width in pixels of the soft ramp inside the region's border "
                                               "(nothing outside the binary region is touched)."}),
            },
            "optional": {
                "instruction": ("STRING", {"multiline": True, "default": "",
                                           "tooltip": "The edit in words (text mode), e.g. 'make the cup red'. "
                                                      "Ignored when an ANALOGY is connected."}),
                "instruction_encoder": (INSTRUCTION_ENCODER_TYPE, {
                    "tooltip": "T5 for the instruction (Load Instruction Encoder), as in training."}),
                "clip": ("CLIP", {"tooltip": "Instead of Load Instruction Encoder: ComfyUI's own text encoder, when "
                                             "its T5 is the one the region model was trained with (the width is "
                                             "checked)."}),
                "analogy": (ANALOGY_TYPE, {"tooltip": "Analogy mode: A -> A' from Encode Analogy; the region is "
                                                      "where the image should change the same way."}),
            },
        }

    def predict(self, image, region_model, clip_vision, threshold, grow, feather, instruction="",
                instruction_encoder=None, clip=None, analogy=None):
        probs, mode = predict_probabilities(region_model, clip_vision, image, instruction, instruction_encoder, clip,
                                            analogy)
        weights = region_encoder_weights(region_model, clip_vision, analogy)
        height, width = image.shape[1], image.shape[2]
        masks = region_masks(probs, region_model.spec.grid, height, width, threshold, grow, feather)
        shares = ", ".join(f"{100 * float(m.mean()):.1f}%" for m in masks.binary)
        info = f"{mode} mode; region covers {shares} of the image (threshold {threshold}); {weights}"
        return (masks.soft, masks.binary, preview(image, masks.soft, masks.binary), info)


# ---------------------------------------------------------------------------------------------------------------------
# Composite By Region


def _batch(tensor: torch.Tensor, size: int, name: str) -> torch.Tensor:
    if tensor.shape[0] == size:
        return tensor
    if tensor.shape[0] == 1:
        return tensor.expand(size, *tensor.shape[1:])
    raise RegionError(f"{name} has a batch of {tensor.shape[0]}; expected 1 or {size}")


class CompositeByRegion:
    DESCRIPTION = ("Puts the edited image inside the region and the original outside it: where the mask is 0 the "
                   "output is the original's pixels bit for bit, where it is 1 the edited ones, in between a blend. "
                   "An edited image of another size (e.g. a sampler's output snapped to multiples of 8/16) is resized "
                   "to the original first.")
    CATEGORY = f"{CATEGORY}/regions"
    FUNCTION = "composite"
    RETURN_TYPES = ("IMAGE",)
    RETURN_NAMES = ("image",)
    OUTPUT_TOOLTIPS = ("Original outside the region, edited inside.",)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "original": ("IMAGE", {"tooltip": "The image before the edit (kept outside the region)."}),
            "edited": ("IMAGE", {"tooltip": "The edited image (used inside the region)."}),
            "mask": ("MASK", {"tooltip": "The region (Predict Edit Region's mask or binary_mask)."}),
        }}

    def composite(self, original, edited, mask):
        for name, image in (("original", original), ("edited", edited)):
            if image.ndim != 4:
                raise RegionError(f"{name}: expected an IMAGE [batch, height, width, channels], got shape "
                                  f"{tuple(image.shape)}")
        if mask.ndim == 2:  # a single [height, width] mask: before the batch is read from its first dimension
            mask = mask.unsqueeze(0)
        if mask.ndim != 3:
            raise RegionError(f"mask: expected a MASK [batch, height, width] or [height, width], got shape "
                              f"{tuple(mask.shape)}")
        batch = max(original.shape[0], edited.shape[0], mask.shape[0])
        height, width = original.shape[1], original.shape[2]
        if edited.shape[1:3] != (height, width):
            edited = resize(edited, width, height)
        if mask.shape[1:] != (height, width):
            mask = torch.nn.functional.interpolate(mask.unsqueeze(1).float(), size=(height, width),
                                                   mode="bilinear", align_corners=False).squeeze(1)
        channels = original.shape[-1]
        original = _batch(original, batch, "original")
        edited = _batch(edited[..., :channels] if edited.shape[-1] >= channels else edited, batch, "edited")
        if edited.shape[-1] != channels:
            raise RegionError(f"edited has {edited.shape[-1]} channels, original {channels}")
        return (composite_by_mask(original, edited, _batch(mask, batch, "mask").to(original.device)),)


NODE_CLASS_MAPPINGS = {
    "AnalogyLoadRegionModel": LoadRegionModel,
    "AnalogyLoadInstructionEncoder": LoadInstructionEncoder,
    "AnalogyPredictEditRegion": PredictEditRegion,
    "AnalogyCompositeByRegion": CompositeByRegion,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "AnalogyLoadRegionModel": "Load Region Model",
    "AnalogyLoadInstructionEncoder": "Load Instruction Encoder (T5)",
    "AnalogyPredictEditRegion": "Predict Edit Region",
    "AnalogyCompositeByRegion": "Composite By Region",
}
