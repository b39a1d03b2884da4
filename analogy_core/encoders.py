"""Frozen CLIP image encoders for training and scripts: transformers or open_clip behind one small API.

Inside ComfyUI the Encode Analogy node uses the user's ``CLIP_VISION`` instead; all three paths share the official
preprocessing and give the same :class:`AnalogyEmbedding` for the same weights (tested).

Specs accepted by :func:`load_image_encoder`:

* ``openai/clip-vit-large-patch14`` or a local folder: ``CLIPVisionModelWithProjection.from_pretrained`` with
  ``local_files_only`` (nothing is downloaded);
* ``open_clip:<architecture>:<weights.safetensors>``, e.g. ``open_clip:ViT-L-14-quickgelu:/models/open_clip.safetensors``
  (safetensors only: open_clip's ``.bin``/``.pt`` files are pickles). The architecture is an open_clip model name
  or the path of an open_clip model-config JSON (``{"embed_dim", "vision_cfg", "text_cfg", ...}``).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from .analogy import (AnalogyEmbedding, AnalogyError, EncoderInfo, encode_with_open_clip, encode_with_transformers,
                      fingerprint_encoder, open_clip_encoder_info, transformers_encoder_info)
from .fingerprint import EncoderFingerprint
from .files import read_safetensors

OPEN_CLIP_PREFIX = "open_clip:"


class ImageEncoder:
    """A frozen CLIP vision tower (``kind`` "transformers" or "open_clip") with one ``encode`` for (a, a', b)."""

    def __init__(self, model: torch.nn.Module, kind: str):
        if kind not in ("transformers", "open_clip"):
            raise AnalogyError(f"unknown encoder kind {kind!r}")
        self.model = model.requires_grad_(False).eval()
        self.kind = kind

    @property
    def info(self) -> EncoderInfo:
        if self.kind == "transformers":
            return transformers_encoder_info(self.model)
        return open_clip_encoder_info(self.model)

    @property
    def embed_dim(self) -> int:
        return self.info.embed_dim

    def to(self, device) -> "ImageEncoder":
        self.model.to(device)
        return self

    def encode_images(self, images: dict[str, torch.Tensor]) -> AnalogyEmbedding:
        if self.kind == "transformers":
            return encode_with_transformers(self.model, images)
        return encode_with_open_clip(self.model, images)

    def fingerprint(self) -> EncoderFingerprint:
        """Of the weights it has now (an encoder trained with a hypernetwork changes it)."""
        return fingerprint_encoder(self.encode_images)

    def encode(self, a: torch.Tensor, a_prime: torch.Tensor, b: torch.Tensor | None = None) -> AnalogyEmbedding:
        images = {"a": a, "a_prime": a_prime}
        if b is not None:
            images["b"] = b
        return self.encode_images(images)


def load_image_encoder(spec: str, dtype: torch.dtype = torch.float32) -> ImageEncoder:
    if spec.startswith(OPEN_CLIP_PREFIX):
        parts = spec[len(OPEN_CLIP_PREFIX):].split(":", 1)
        if len(parts) != 2 or not all(parts):
            raise AnalogyError(f"open_clip encoder spec must be 'open_clip:<architecture>:<weights.safetensors>', "
                               f"got {spec!r}")
        return ImageEncoder(load_open_clip_visual(parts[0], parts[1]).to(dtype), "open_clip")
    # heavy: imported when a model is built, not at ComfyUI start-up
    from transformers import CLIPVisionModelWithProjection

    model = CLIPVisionModelWithProjection.from_pretrained(spec, local_files_only=True, torch_dtype=dtype)
    return ImageEncoder(model, "transformers")


def load_open_clip_visual(architecture: str, weights: str | os.PathLike) -> torch.nn.Module:
    """open_clip's vision tower of ``architecture`` with weights from a safetensors file holding a whole open_clip
    CLIP (``visual.*`` keys are used) or only its vision tower. Every vision weight must be present."""
    import open_clip  # optional dependency: open_clip encoders only

    if architecture.endswith(".json"):  # a custom architecture: open_clip registers it under the file's stem
        config = Path(architecture)
        if not config.is_file():
            raise AnalogyError(f"open_clip model config {architecture} does not exist")
        open_clip.add_model_config(config)
        architecture = config.stem
    if architecture not in open_clip.list_models():
        raise AnalogyError(f"open_clip has no architecture {architecture!r}; e.g. ViT-L-14-quickgelu for OpenAI's "
                           f"CLIP ViT-L/14 (QuickGELU), ViT-L-14 for LAION's")
    tensors, _ = read_safetensors(weights)
    visual_keys = {k[len("visual."):]: v for k, v in tensors.items() if k.startswith("visual.")}
    state = visual_keys or tensors
    visual = open_clip.create_model(architecture, pretrained=None, device="cpu").visual
    try:
        missing, unexpected = visual.load_state_dict(state, strict=False)
    except RuntimeError as err:  # shape mismatches
        raise AnalogyError(f"{os.fspath(weights)} does not fit open_clip {architecture}'s vision tower: {err}") from None
    if missing or unexpected:
        raise AnalogyError(f"{os.fspath(weights)} does not fit open_clip {architecture}'s vision tower: "
                           f"{len(missing)} missing (e.g. {sorted(missing)[:3]}), "
                           f"{len(unexpected)} unexpected (e.g. {sorted(unexpected)[:3]})")
    return visual
