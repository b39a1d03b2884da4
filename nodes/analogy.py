"""Encode Analogy: the ANALOGY value every method reads (LoRWeB's query, LoRA of Change's tokens, the region
predictor's exemplar), and the identity of ComfyUI's CLIP_VISION encoders."""

from __future__ import annotations

import dataclasses
import weakref

import torch

from ..analogy_core.analogy import CLIP_MEAN, CLIP_STD, AnalogyEmbedding, AnalogyError, EncoderInfo, batch_roles, \
    fingerprint_encoder, split_roles
from ..analogy_core.fingerprint import EncoderFingerprint
from . import comfy_compat
from .common import ANALOGY_TYPE, CATEGORY

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


_FINGERPRINTS: "weakref.WeakKeyDictionary[object, EncoderFingerprint]" = weakref.WeakKeyDictionary()


def comfy_fingerprint(clip_vision) -> EncoderFingerprint:
    """The fingerprint of ComfyUI's CLIP_VISION (one probe pass per loaded model; kept while the model lives)."""
    try:
        known = _FINGERPRINTS.get(clip_vision)
    except TypeError:  # a host object that cannot be weakly referenced or hashed: taken each time
        known = None
    if known is None:
        known = fingerprint_encoder(lambda images: encode_with_comfy(clip_vision, images))
        try:
            _FINGERPRINTS[clip_vision] = known
        except TypeError:
            pass
    return known


class EncodeAnalogy:
    DESCRIPTION = ("Encodes the example pair A -> A' and the query B with a CLIP vision model (one batched pass, "
                   "preprocessed exactly like the official LoRWeB code). The ANALOGY output carries each image's "
                   "projected embedding and patch tokens plus the encoder's identity and fingerprint (its response "
                   "to a fixed probe picture, which tells apart two encoders of one architecture).")
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
        analogy = dataclasses.replace(analogy, fingerprint=comfy_fingerprint(clip_vision))
        info = f"{analogy.encoder.label}: {', '.join(analogy.roles)}, batch {analogy.batch_size}, " \
               f"embeds {analogy.encoder.embed_dim}-d, tokens {tuple(analogy.patch_tokens['a'].shape[1:])}"
        return (analogy, info)


NODE_CLASS_MAPPINGS = {"AnalogyEncode": EncodeAnalogy}
NODE_DISPLAY_NAME_MAPPINGS = {"AnalogyEncode": "Encode Analogy"}
