"""The frozen FLUX.1-Kontext backbone and CLIP query encoder for training, from a local folder or tiny configs.

Nothing is downloaded: a model id must already be in the local Hugging Face cache (``local_files_only``).
``"tiny"`` builds random small models with the same architecture (for tests and CPU smoke runs) and a word-hash
tokenizer, since real tokenizers need vocabulary files. ``"world:<folder>"`` loads the analogy world's pretrained
backbone (``python -m training.world build``; see :mod:`training.world`): the FLUX.1-Kontext-like transformer and
its text encoders from ``<folder>/flux_kontext`` (or ``<folder>`` itself when it is a model folder, e.g. another
world transformer), the world autoencoder from ``<folder>/autoencoder`` (or the model folder's sibling).
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

import torch
from diffusers import AutoencoderKL, FluxTransformer2DModel
from torch import nn
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTokenizer,
    CLIPVisionConfig,
    CLIPVisionModelWithProjection,
    T5Config,
    T5EncoderModel,
    T5TokenizerFast,
)

from analogy_core.encoders import ImageEncoder, load_image_encoder
from training.model_specs import registered_loader

TINY_TRANSFORMER = dict(patch_size=1, in_channels=16, num_layers=1, num_single_layers=2, attention_head_dim=16,
                        num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32,
                        guidance_embeds=True, axes_dims_rope=(4, 6, 6))
TINY_VAE = dict(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(16, 32),
                down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
                up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"), layers_per_block=1, norm_num_groups=8,
                scaling_factor=1.0, shift_factor=0.0)
TINY_CLIP_VISION = dict(hidden_size=32, intermediate_size=64, num_attention_heads=2, num_hidden_layers=2,
                        patch_size=32, image_size=224, projection_dim=16)


class HashTokenizer:
    """Deterministic word-hash tokenizer for the tiny preset (real runs use the model folder's tokenizers)."""

    def __init__(self, vocab_size: int, length: int):
        self.vocab_size, self.length = vocab_size, length

    def __call__(self, prompts: list[str]) -> torch.Tensor:
        ids = torch.zeros(len(prompts), self.length, dtype=torch.long)
        for row, prompt in enumerate(prompts):
            words = prompt.lower().split()[: self.length - 1]
            for col, word in enumerate(words):
                ids[row, col + 1] = 1 + int(hashlib.sha1(word.encode()).hexdigest(), 16) % (self.vocab_size - 1)
        return ids


def t5_token_ids(tokenizer, prompts: list[str], length: int | None = None) -> torch.Tensor:
    """T5 ids [B, L] of FLUX's text. ``None``: padded and truncated to 512 (diffusers' and ai-toolkit's FLUX.1
    default). An int: ComfyUI's FLUX tokenisation (comfy/text_encoders/flux.py: T5 ``min_length=256``, no
    truncation) — every prompt whole, padded with the pad id to max(``length``, the longest prompt). FLUX attends
    to the padding tokens (no mask), so the padded length changes what the transformer reads."""
    if length is None:
        return tokenizer(prompts, padding="max_length", max_length=512, truncation=True, return_tensors="pt").input_ids
    ids = tokenizer(prompts, padding="longest", truncation=False, return_tensors="pt").input_ids
    if ids.shape[1] < length:
        ids = torch.nn.functional.pad(ids, (0, length - ids.shape[1]), value=tokenizer.pad_token_id)
    return ids


@dataclass
class Backbone:
    transformer: nn.Module
    vae: nn.Module
    clip_text: nn.Module
    t5: nn.Module
    clip_tokenizer: object
    t5_tokenizer: object
    tiny: bool                 # word-hash tokenizers (tiny and world backbones)
    codec: object | None = None  # the world autoencoder's exact shortcut (encode/decode of -1..1 pixels), if any

    @property
    def vae_factor(self) -> int:
        config = self.vae.config
        channels = getattr(config, "block_out_channels", None) or config.encoder_block_out_channels
        return 2 ** (len(channels) - 1)

    def freeze(self) -> None:
        for module in (self.transformer, self.vae, self.clip_text, self.t5):
            module.requires_grad_(False)
            module.eval()

    # -- text ------------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def encode_prompts(self, prompts: list[str], device,
                       t5_length: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(T5 token embeddings [B, T, D], pooled CLIP-L [B, P]) as FLUX expects; T5 ids as :func:`t5_token_ids`."""
        if self.tiny:
            clip_ids, t5_ids = self.clip_tokenizer(prompts), self.t5_tokenizer(prompts)
        else:
            clip_ids = self.clip_tokenizer(prompts, padding="max_length", max_length=77, truncation=True,
                                           return_tensors="pt").input_ids
            t5_ids = t5_token_ids(self.t5_tokenizer, prompts, t5_length)
        pooled = self.clip_text(clip_ids.to(device)).pooler_output
        tokens = self.t5(t5_ids.to(device))[0]
        return tokens, pooled

    # -- images ----------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """IMAGE [B, H, W, 3] in 0..1 -> packed latent tokens [B, (h/2)(w/2), 4·C]."""
        param = next(self.vae.parameters())
        pixels = images.permute(0, 3, 1, 2).to(param.device, param.dtype) * 2 - 1
        if self.codec is not None:
            latents = self.codec.encode(pixels)
        else:
            encoded = self.vae.encode(pixels)
            latents = encoded.latent_dist.mode() if hasattr(encoded, "latent_dist") else encoded.latents
        latents = (latents - self.vae.config.shift_factor) * self.vae.config.scaling_factor
        return pack(latents)

    @torch.no_grad()
    def decode_tokens(self, tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """Packed latent tokens -> IMAGE [B, H, W, 3]."""
        f = self.vae_factor
        latents = unpack(tokens, height // f, width // f)
        latents = latents / self.vae.config.scaling_factor + self.vae.config.shift_factor
        param = next(self.vae.parameters())
        if self.codec is not None:
            pixels = self.codec.decode(latents.to(param.dtype))
        else:
            pixels = self.vae.decode(latents.to(param.dtype)).sample
        return ((pixels.float() + 1) / 2).clamp(0, 1).permute(0, 2, 3, 1)


def pack(latents: torch.Tensor) -> torch.Tensor:
    """[B, C, h, w] -> [B, (h/2)(w/2), 4C] (FLUX's 2x2 patches)."""
    b, c, h, w = latents.shape
    x = latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack(tokens: torch.Tensor, h: int, w: int) -> torch.Tensor:
    b, _, d = tokens.shape
    c = d // 4
    x = tokens.view(b, h // 2, w // 2, c, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, c, h, w)


def token_ids(h: int, w: int, index: int = 0) -> torch.Tensor:
    """Position ids [(h/2)(w/2), 3] of packed latents; Kontext marks reference images with index 1."""
    ids = torch.zeros(h // 2, w // 2, 3)
    ids[..., 0] = index
    ids[..., 1] = torch.arange(h // 2)[:, None]
    ids[..., 2] = torch.arange(w // 2)[None, :]
    return ids.reshape(-1, 3)


def _randomise(module: nn.Module, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.ndim >= 2:
                p.copy_(torch.randn(p.shape, generator=gen) / math.sqrt(p[0].numel()))
            elif "bias" in name:
                p.zero_()
            else:
                p.fill_(1.0)


def load_frozen_backbone(name: str, mixed_precision: str, seed: int, device) -> Backbone:
    """The frozen FLUX backbone of a four-panel trainer in its training precision, with the VAE and text encoders on
    ``device`` (the transformer, which carries the trained adapter, is moved by the trainer)."""
    dtype = torch.bfloat16 if mixed_precision == "bf16" else torch.float32
    backbone = load_backbone(name, dtype, seed)
    for module in (backbone.vae, backbone.clip_text, backbone.t5):
        module.to(device)
    return backbone


def load_backbone(name: str, dtype: torch.dtype = torch.float32, seed: int = 0) -> Backbone:
    if registered := registered_loader("backbone", name):
        return registered(dtype=dtype)
    if name == "tiny":
        transformer = FluxTransformer2DModel(**TINY_TRANSFORMER)
        _randomise(transformer, seed)
        vae = AutoencoderKL(**TINY_VAE)
        _randomise(vae, seed + 1)
        clip_text = CLIPTextModel(CLIPTextConfig(vocab_size=1000, hidden_size=32, intermediate_size=64,
                                                 num_hidden_layers=2, num_attention_heads=2,
                                                 max_position_embeddings=16))
        t5 = T5EncoderModel(T5Config(vocab_size=1000, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4))
        backbone = Backbone(transformer, vae, clip_text, t5, HashTokenizer(1000, 16), HashTokenizer(1000, 16), True)
    else:
        kwargs = dict(local_files_only=True, torch_dtype=dtype)
        backbone = Backbone(
            FluxTransformer2DModel.from_pretrained(name, subfolder="transformer", **kwargs),
            AutoencoderKL.from_pretrained(name, subfolder="vae", **kwargs),
            CLIPTextModel.from_pretrained(name, subfolder="text_encoder", **kwargs),
            T5EncoderModel.from_pretrained(name, subfolder="text_encoder_2", **kwargs),
            CLIPTokenizer.from_pretrained(name, subfolder="tokenizer", local_files_only=True),
            T5TokenizerFast.from_pretrained(name, subfolder="tokenizer_2", local_files_only=True),
            False,
        )
    backbone.freeze()
    return backbone


def load_query_encoder(name: str, seed: int = 0) -> ImageEncoder:
    """LoRWeB's frozen query encoder: "tiny" (random, from a small config), a transformers CLIP vision folder or
    cached id, "open_clip:<architecture>:<weights.safetensors>" (see :mod:`analogy_core.encoders`), or
    "world:<folder>": the analogy world's CLIP (``<folder>/clip`` of a world folder, or a CLIP folder itself)."""
    if registered := registered_loader("query_encoder", name):
        return registered()
    if name != "tiny":
        return load_image_encoder(name)

    model = CLIPVisionModelWithProjection(CLIPVisionConfig(**TINY_CLIP_VISION))
    _randomise(model, seed + 2)
    return ImageEncoder(model, "transformers")
