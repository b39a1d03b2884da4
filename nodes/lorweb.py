"""LoRWeB nodes: Encode Analogy, Load LoRA Basis, Mix LoRA Basis."""

from __future__ import annotations

import os

import torch

import folder_paths

from ..analogy_core.analogy import CLIP_MEAN, CLIP_STD, AnalogyEmbedding, AnalogyError, EncoderInfo, batch_roles, \
    split_roles
from ..analogy_core.lorweb.basis import BasisError
from ..analogy_core.lorweb.files import find_basis_config, is_basis_file, load_basis_with_settings
from ..analogy_core.heatmap import coefficient_heatmap
from ..analogy_core.lorweb.mix import BLEND_MODES, mix_analogy
from . import comfy_compat
from .common import ANALOGY_TYPE, BASIS_TYPE, CATEGORY, LORA_TYPE

BASIS_FOLDER = "lorweb"
folder_paths.add_model_folder_path(BASIS_FOLDER, os.path.join(folder_paths.models_dir, BASIS_FOLDER))
if BASIS_FOLDER in folder_paths.folder_names_and_paths:  # the basis files are .safetensors
    folder_paths.folder_names_and_paths[BASIS_FOLDER] = (folder_paths.folder_names_and_paths[BASIS_FOLDER][0],
                                                         {".safetensors"})


# ComfyUI's CLIP_VISION model_type (its config's "model_type"; kept as an attribute by releases newer than 0.3.75)
COMFY_MODEL_TYPES = {"clip_vision_model": "clip", "siglip_vision_model": "siglip",
                     "siglip2_vision_model": "siglip2", "dinov2": "dinov2", "dinov3": "dinov3"}


def encoder_family(clip_vision) -> str:
    """The encoder family of ComfyUI's CLIP_VISION (from its model type as :mod:`comfy_compat` reads it on any host)."""
    model_type = comfy_compat.clip_vision_model_type(clip_vision)
    if model_type not in COMFY_MODEL_TYPES:
        raise AnalogyError(f"unknown CLIP_VISION model type {model_type!r}; this pack knows "
                           f"{', '.join(COMFY_MODEL_TYPES)}")
    return COMFY_MODEL_TYPES[model_type]


def encoder_info(clip_vision) -> EncoderInfo:
    """Identity (family, name, widths) of ComfyUI's CLIP_VISION model, read from its weights and config."""
    family, model = encoder_family(clip_vision), clip_vision.model
    config = getattr(clip_vision, "config", None) or {}
    if family == "dinov2":
        patch, layers = model.embeddings.patch_embeddings.projection.weight, len(model.encoder.layer)
        projection = None
    else:
        patch, layers = model.vision_model.embeddings.patch_embedding.weight, len(model.vision_model.encoder.layers)
        projection = getattr(model, "visual_projection", None)
    hidden = patch.shape[0]
    # a Conv2d patch embedding [hidden, 3, p, p]; SigLIP2 NaFlex uses a Linear [hidden, 3·p·p]
    patch_size = config.get("patch_size") or (patch.shape[-1] if patch.ndim == 4 else round((patch.shape[1] / 3) ** .5))
    embed_dim = projection.weight.shape[0] if hasattr(projection, "weight") else hidden
    return EncoderInfo.describe(embed_dim, hidden, clip_vision.image_size, patch_size, layers, family)


def encode_with_comfy(clip_vision, images: dict[str, torch.Tensor]) -> AnalogyEmbedding:
    """One batched pass of ComfyUI's CLIP vision model over the officially preprocessed images."""
    family = encoder_family(clip_vision)
    if family != "clip":
        label = encoder_info(clip_vision).label if family != "dinov3" else "a DINOv3 model (family dinov3)"
        raise AnalogyError(f"this CLIP_VISION is {label}; Encode Analogy needs a CLIP vision model (LoRWeB's "
                           "preprocessing and query are CLIP's; the released basis uses CLIP ViT-L/14, "
                           "clip_vision/clip-vit-large-patch14)")
    info = encoder_info(clip_vision)
    mean = tuple(getattr(clip_vision, "image_mean", CLIP_MEAN))
    std = tuple(getattr(clip_vision, "image_std", CLIP_STD))
    pixels, spans = batch_roles(images, clip_vision.image_size, mean, std)
    comfy_compat.load_models([clip_vision.patcher])
    with torch.no_grad():
        out = clip_vision.model(pixel_values=pixels.to(clip_vision.load_device), intermediate_output=-2)
    embeds, tokens = out[2].float().cpu(), out[1].float().cpu()
    return AnalogyEmbedding(info, split_roles(embeds, spans), split_roles(tokens, spans))


class EncodeAnalogy:
    DESCRIPTION = ("Encodes the example pair A -> A' and the query B with a CLIP vision model (one batched pass, "
                   "preprocessed exactly like the official LoRWeB code). The ANALOGY output carries each image's "
                   "projected embedding and patch tokens plus the encoder's identity.")
    CATEGORY = f"{CATEGORY}/lorweb"
    FUNCTION = "encode"
    RETURN_TYPES = (ANALOGY_TYPE, "STRING")
    RETURN_NAMES = ("analogy", "info")
    OUTPUT_TOOLTIPS = ("Embeddings of A, A' (and B) for Mix LoRA Basis and the other analogy nodes.",
                       "Encoder name and dimensions.")

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "clip_vision": ("CLIP_VISION", {"tooltip": "CLIP vision encoder; LoRWeB uses CLIP ViT-L/14 "
                                                           "(openai/clip-vit-large-patch14)."}),
                "a": ("IMAGE", {"tooltip": "A: the example before the change."}),
                "a_prime": ("IMAGE", {"tooltip": "A': the example after the change."}),
            },
            "optional": {
                "b": ("IMAGE", {"tooltip": "B: the image to edit (needed by LoRWeB; pair-only methods skip it)."}),
            },
        }

    def encode(self, clip_vision, a, a_prime, b=None):
        images = {"a": a, "a_prime": a_prime}
        if b is not None:
            images["b"] = b
        analogy = encode_with_comfy(clip_vision, images)
        info = f"{analogy.encoder.label}: {', '.join(analogy.roles)}, batch {analogy.batch_size}, " \
               f"embeds {analogy.encoder.embed_dim}-d, tokens {tuple(analogy.patch_tokens['a'].shape[1:])}"
        return (analogy, info)


class LoadLoRABasis:
    DESCRIPTION = ("Loads a LoRWeB LoRA basis (the released lorweb_model.safetensors or one trained with "
                   "python -m training.train_lorweb) from models/lorweb or models/loras, validating every tensor, "
                   "with how it must be mixed: the settings the file records, else the official config.yaml beside "
                   "it or one folder up (or at config_path), else the released checkpoint's settings.")
    CATEGORY = f"{CATEGORY}/lorweb"
    FUNCTION = "load"
    RETURN_TYPES = (BASIS_TYPE, "STRING")
    RETURN_NAMES = ("basis", "info")
    OUTPUT_TOOLTIPS = ("The basis: per layer N LoRAs, N keys and a query projection.", "Basis summary.")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"basis_name": (basis_names(), {"tooltip": "A basis in models/lorweb, or a file in "
                                                                       "models/loras whose header says it is one."})},
                "optional": {"config_path": ("STRING", {
                    "default": "", "tooltip": "The official config.yaml of this basis (how it must be mixed). Empty: "
                                              "use the settings the file records, else a config.yaml beside the "
                                              "file or one folder up, else the released checkpoint's settings."})}}

    @classmethod
    def IS_CHANGED(cls, basis_name, config_path=""):
        """Reload when the basis or the config.yaml it would use changes on disk."""
        path = basis_path(basis_name)
        config = (config_path.strip() or find_basis_config(path)) if path else None
        return "|".join(f"{p}:{os.path.getmtime(p) if os.path.exists(p) else '-'}" for p in (path, config) if p)

    def load(self, basis_name, config_path=""):
        path = basis_path(basis_name)
        if path is None:
            raise BasisError(f"basis file {basis_name!r} not found in models/lorweb or models/loras")
        basis, note = load_basis_with_settings(path, config_path.strip() or None)
        return (basis, f"{basis.summary()}\n{note}")


def basis_path(basis_name: str) -> str | None:
    return folder_paths.get_full_path(BASIS_FOLDER, basis_name) or folder_paths.get_full_path("loras", basis_name)


def basis_names() -> list[str]:
    """Every file in models/lorweb plus the files in models/loras whose header says they are a basis (cached)."""
    lora_bases = set()
    for name in folder_paths.get_filename_list("loras"):
        path = folder_paths.get_full_path("loras", name) if name.lower().endswith(".safetensors") else None
        if path and is_basis_file(path):
            lora_bases.add(name)
    return sorted(set(folder_paths.get_filename_list(BASIS_FOLDER)) | lora_bases)


class MixLoRABasis:
    DESCRIPTION = ("Mixes the basis into one LoRA for this analogy, as the basis was trained (by default "
                   "q = W_q·[e_A, e_A', e_B], c = softmax(q·Kᵀ/√d / temperature); tanh, several heads and other "
                   "query modes as its settings say), LoRA = Σ c_n A_n B_n (an exact rank N·r LoRA). Refuses an "
                   "ANALOGY from another encoder than the basis was trained with. Optionally blends a second "
                   "analogy, and draws the coefficients as a heat map.")
    CATEGORY = f"{CATEGORY}/lorweb"
    FUNCTION = "mix"
    RETURN_TYPES = (LORA_TYPE, "IMAGE", "STRING")
    RETURN_NAMES = ("lora", "coefficients", "info")
    OUTPUT_TOOLTIPS = ("The mixed LoRA, for Apply LoRA to Model or Save LoRA.",
                       "Heat map of the mixing coefficients: one row per layer, one column per basis entry "
                       "(each row scaled to its maximum).",
                       "The most used basis entries.")

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "basis": (BASIS_TYPE, {"tooltip": "From Load LoRA Basis."}),
                "analogy": (ANALOGY_TYPE, {"tooltip": "From Encode Analogy (with A, A' and B)."}),
                "temperature": ("FLOAT", {"default": 1.0, "min": 0.01, "max": 100.0, "step": 0.01,
                                          "tooltip": "Divides the query-key scores before softmax (or tanh): below "
                                                     "1 sharpens the choice of basis entries, above 1 evens it out. "
                                                     "1 = as trained."}),
                "sample": ("INT", {"default": 0, "min": 0, "max": 4095,
                                   "tooltip": "Which item of a batched ANALOGY to mix (one LoRA per model)."}),
            },
            "optional": {
                "analogy_2": (ANALOGY_TYPE, {"tooltip": "A second analogy to blend with the first."}),
                "blend": ("FLOAT", {"default": 0.5, "min": 0.0, "max": 1.0, "step": 0.01,
                                    "tooltip": "Weight of analogy_2 (0 = only the first analogy)."}),
                "blend_mode": (list(BLEND_MODES), {
                    "default": "coefficients",
                    "tooltip": "coefficients: mix the two analogies' coefficients (both edits, weighted). "
                               "query: interpolate the CLIP queries before the softmax."}),
            },
        }

    def mix(self, basis, analogy, temperature, sample, analogy_2=None, blend=0.5, blend_mode="coefficients"):
        result = mix_analogy(basis, analogy, temperature, sample, analogy_2, blend, blend_mode)
        return (result.lora, coefficient_heatmap(result.table), result.report)


NODE_CLASS_MAPPINGS = {
    "AnalogyEncode": EncodeAnalogy,
    "AnalogyLoadLoRABasis": LoadLoRABasis,
    "AnalogyMixLoRABasis": MixLoRABasis,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "AnalogyEncode": "Encode Analogy",
    "AnalogyLoadLoRABasis": "Load LoRA Basis",
    "AnalogyMixLoRABasis": "Mix LoRA Basis",
}
