"""The ANALOGY value: CLIP encodings of A, A' (and B), plus the preprocessing that matches the official LoRWeB code.

LoRWeB preprocesses each image like ``CLIPImageProcessor`` at 224 px (shortest side resized with PIL bicubic,
centre crop, CLIP mean/std) and uses the projected ``image_embeds``; LoC and the region module read the patch tokens
(penultimate hidden states). Both come from one batched encoder pass and travel together with the encoder's identity
so a consumer can refuse embeddings from an encoder it was not trained with; the encoder's fingerprint (its
response to a fixed probe picture, :mod:`.fingerprint`) tells apart two encoders of one architecture.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from .fingerprint import EncoderFingerprint, probe_image

ROLES = ("a", "a_prime", "b")
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class AnalogyError(ValueError):
    pass


# Image-encoder families ComfyUI's CLIP_VISION loader knows (its model_type names map onto these).
ENCODER_FAMILIES = {"clip": "CLIP", "siglip": "SigLIP", "siglip2": "SigLIP2", "dinov2": "DINOv2", "dinov3": "DINOv3"}

# (family, embed_dim, hidden_dim, image_size, patch_size, num_layers) -> the model's common name
KNOWN_ENCODERS = {
    ("clip", 768, 1024, 224, 14, 24): "CLIP ViT-L/14", ("clip", 768, 1024, 336, 14, 24): "CLIP ViT-L/14@336",
    ("clip", 1024, 1280, 224, 14, 32): "CLIP ViT-H/14", ("clip", 1280, 1664, 224, 14, 48): "CLIP ViT-bigG/14",
    ("clip", 512, 768, 224, 16, 12): "CLIP ViT-B/16", ("clip", 512, 768, 224, 32, 12): "CLIP ViT-B/32",
    ("siglip", 1152, 1152, 384, 14, 27): "SigLIP so400m/14@384",
    ("siglip", 1152, 1152, 512, 16, 27): "SigLIP so400m/16@512",
    ("siglip2", 768, 768, 224, 16, 12): "SigLIP2 ViT-B/16",
    ("siglip2", 1152, 1152, -1, 16, 27): "SigLIP2 so400m/16 NaFlex",  # ComfyUI's naflex config (image_size -1)
    ("dinov2", 1024, 1024, 518, 14, 24): "DINOv2 ViT-L/14", ("dinov2", 1536, 1536, 518, 14, 40): "DINOv2 ViT-g/14",
}


@dataclass(frozen=True)
class EncoderInfo:
    """Identity of an image encoder: family, a readable name and the dimensions consumers depend on."""

    name: str
    embed_dim: int     # image embedding width (768 for CLIP ViT-L/14's projected image_embeds)
    hidden_dim: int    # patch-token width (1024 for ViT-L/14)
    image_size: int
    patch_size: int
    num_layers: int
    family: str = "clip"  # a key of ENCODER_FAMILIES

    @staticmethod
    def describe(embed_dim: int, hidden_dim: int, image_size: int, patch_size: int, num_layers: int,
                 family: str = "clip") -> "EncoderInfo":
        if family not in ENCODER_FAMILIES:
            raise AnalogyError(f"unknown image-encoder family {family!r}; known: {', '.join(ENCODER_FAMILIES)}")
        name = KNOWN_ENCODERS.get((family, embed_dim, hidden_dim, image_size, patch_size, num_layers))
        if name is None:
            name = (f"{ENCODER_FAMILIES[family]}-like ViT (embed {embed_dim}, width {hidden_dim}, {num_layers} layers, "
                    f"patch {patch_size}, {image_size}px)")
        return EncoderInfo(name, embed_dim, hidden_dim, image_size, patch_size, num_layers, family)

    @property
    def label(self) -> str:
        """Name and family for messages, e.g. "CLIP ViT-L/14 (family clip)"."""
        return f"{self.name} (family {self.family})"


@dataclass(frozen=True)
class AnalogyEmbedding:
    """Per role (``a``, ``a_prime``, optional ``b``): image_embeds [batch, D] and patch_tokens [batch, T, W]."""

    encoder: EncoderInfo
    image_embeds: dict[str, torch.Tensor]
    patch_tokens: dict[str, torch.Tensor] = field(default_factory=dict)
    fingerprint: EncoderFingerprint | None = None  # the encoder's weights, told by its outputs (fingerprint.py)

    @property
    def roles(self) -> tuple[str, ...]:
        return tuple(r for r in ROLES if r in self.image_embeds)

    @property
    def batch_size(self) -> int:
        return next(iter(self.image_embeds.values())).shape[0]

    def query(self, roles: tuple[str, ...] = ROLES) -> torch.Tensor:
        """concat(e_a, e_a', e_b) per sample: LoRWeB's "cat-aa'b" query [batch, len(roles)·D]."""
        missing = [r for r in roles if r not in self.image_embeds]
        if missing:
            raise AnalogyError(f"this ANALOGY has no {', '.join(missing)} image; connect it in Encode Analogy")
        return torch.cat([self.image_embeds[r].float() for r in roles], dim=-1)


def clip_image_processor(image_size: int = 224, mean=CLIP_MEAN, std=CLIP_STD):
    """transformers' PIL CLIP image processor configured like openai/clip-vit-large-patch14 (no download).

    The official code ran transformers 4.56, whose CLIPImageProcessor resizes with PIL. transformers 5 made that
    class resize with torchvision (a few pixels differ by 1-2 levels) and kept the PIL one as CLIPImageProcessorPil."""
    try:
        # heavy: imported when a model is built, not at ComfyUI start-up
        from transformers import CLIPImageProcessorPil as CLIPImageProcessor
    except ImportError:  # transformers 4.x: the default processor is the PIL one
        from transformers import CLIPImageProcessor  # heavy: imported when a model is built, not at ComfyUI start-up

    return CLIPImageProcessor(do_resize=True, size={"shortest_edge": image_size}, resample=3, do_center_crop=True,
                              crop_size={"height": image_size, "width": image_size}, do_rescale=True,
                              rescale_factor=1 / 255, do_normalize=True, image_mean=list(mean), image_std=list(std),
                              do_convert_rgb=True)


def to_uint8_images(images: torch.Tensor) -> list[np.ndarray]:
    """IMAGE [B, H, W, C] in 0..1 -> uint8 HWC arrays (rounded, so LoadImage's k/255 values come back exactly)."""
    array = (images[..., :3].detach().float().cpu().clamp(0, 1) * 255.0).round().to(torch.uint8).numpy()
    return list(array)


def preprocess(images: torch.Tensor, image_size: int = 224, mean=CLIP_MEAN, std=CLIP_STD) -> torch.Tensor:
    """The official preprocessing: IMAGE [B, H, W, C] -> pixel_values [B, 3, S, S] (float32)."""
    if images.ndim != 4 or images.shape[0] == 0 or images.shape[1] == 0 or images.shape[2] == 0:
        raise AnalogyError(f"expected a non-empty IMAGE [batch, height, width, channels], got {tuple(images.shape)}")
    processor = clip_image_processor(image_size, mean, std)
    return processor(images=to_uint8_images(images), return_tensors="pt")["pixel_values"].float()


def batch_roles(images: dict[str, torch.Tensor], image_size: int = 224, mean=CLIP_MEAN,
                std=CLIP_STD) -> tuple[torch.Tensor, list[tuple[str, int]]]:
    """Preprocess every role's batch and stack them for one encoder pass; returns pixels and (role, count) spans."""
    pixels, spans = [], []
    sizes = {role: img.shape[0] for role, img in images.items()}
    larger = {s for s in sizes.values() if s > 1}
    if len(larger) > 1:
        raise AnalogyError("batch sizes must be 1 or all equal: " + ", ".join(f"{r} has {s}" for r, s in sizes.items()))
    for role, image in images.items():
        pixels.append(preprocess(image, image_size, mean, std))
        spans.append((role, image.shape[0]))
    return torch.cat(pixels), spans


def split_roles(tensor: torch.Tensor, spans: list[tuple[str, int]]) -> dict[str, torch.Tensor]:
    """Undo :func:`batch_roles` on an encoder output, repeating batch-1 roles to the common batch size."""
    target = max(count for _, count in spans)
    out, start = {}, 0
    for role, count in spans:
        part = tensor[start: start + count]
        start += count
        out[role] = part.expand(target, *part.shape[1:]) if count != target else part
    return out


def fingerprint_encoder(encode: Callable[[dict[str, torch.Tensor]], AnalogyEmbedding]) -> EncoderFingerprint:
    """The fingerprint of the encoder behind ``encode`` (any of the encode functions, bound to one model)."""
    probe = encode({"a": probe_image()})
    return EncoderFingerprint.of(probe.image_embeds["a"][0], probe.patch_tokens["a"][0])


def encode_with_transformers(model, images: dict[str, torch.Tensor]) -> AnalogyEmbedding:
    """Encode with a transformers ``CLIPVisionModelWithProjection`` (the training path)."""
    pixels, spans = batch_roles(images, model.config.image_size)
    param = next(model.parameters())
    with torch.no_grad():
        out = model(pixel_values=pixels.to(param.device, param.dtype), output_hidden_states=True)
    return AnalogyEmbedding(transformers_encoder_info(model), split_roles(out.image_embeds.float().cpu(), spans),
                            split_roles(out.hidden_states[-2].float().cpu(), spans))


def encode_with_open_clip(visual, images: dict[str, torch.Tensor]) -> AnalogyEmbedding:
    """Encode with an open_clip ``VisionTransformer`` (``model.visual``): the same values as the transformers path
    for the same weights. Patch tokens are the output of the second-to-last block, class token first, like
    transformers' ``hidden_states[-2]`` and ComfyUI's ``penultimate_hidden_states``."""
    info = open_clip_encoder_info(visual)
    mean = tuple(getattr(visual, "image_mean", None) or CLIP_MEAN)
    std = tuple(getattr(visual, "image_std", None) or CLIP_STD)
    pixels, spans = batch_roles(images, info.image_size, mean, std)
    param = next(visual.parameters())
    with torch.no_grad():
        out = visual.forward_intermediates(pixels.to(param.device, param.dtype), indices=[info.num_layers - 2],
                                           output_fmt="NLC", output_extra_tokens=True)
    tokens = torch.cat([out["image_intermediates_prefix"][0], out["image_intermediates"][0]], dim=1)
    return AnalogyEmbedding(info, split_roles(out["image_features"].float().cpu(), spans),
                            split_roles(tokens.float().cpu(), spans))


def transformers_encoder_info(model) -> EncoderInfo:
    """Identity of a transformers ``CLIPVisionModelWithProjection``."""
    c = model.config
    return EncoderInfo.describe(c.projection_dim, c.hidden_size, c.image_size, c.patch_size, c.num_hidden_layers)


def open_clip_encoder_info(visual) -> EncoderInfo:
    """Identity of an open_clip ``VisionTransformer`` (sizes may be ints or (h, w) pairs)."""
    def first(value):
        return value[0] if isinstance(value, (tuple, list)) else value

    return EncoderInfo.describe(visual.output_dim, visual.transformer.width, first(visual.image_size),
                                first(visual.patch_size), visual.transformer.layers)
