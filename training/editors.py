"""Frozen backbones of the editors users run today, for the four-panel trainers: FLUX.2 (dev, klein) and
Qwen-Image-Edit (2509 and later), next to FLUX.1-Kontext in :mod:`training.backbone`.

Specs (``backbone`` in a trainer's config): ``flux2`` / ``flux2:<folder or cached id>`` / ``flux2:tiny`` and
``qwen_image_edit`` / ``qwen_image_edit:<folder or cached id>`` / ``qwen_image_edit:tiny``; anything else is a
FLUX.1-Kontext spec (:func:`training.backbone.load_backbone`). Nothing is downloaded (``local_files_only``).

Each editor takes the analogy the way its diffusers pipeline takes a reference image (diffusers 0.42), mirrored in
:meth:`EditorBackbone.predict`:

* FLUX.2 (``pipeline_flux2.py``, ``pipeline_flux2_klein.py``): the reference grid is VAE-encoded, 2x2-patchified,
  normalised by the VAE's batch-norm statistics and appended after the target tokens with its own position ids
  (T, H, W, L) = (10, h, w, 0) (the first reference image; the target has T = 0); text ids are (0, 0, 0, l); the
  timestep is t in [0, 1]; the guidance embedding only on guidance-distilled models (dev, not klein).
* Qwen-Image-Edit (``pipeline_qwenimage_edit_plus.py``): the grid is an input image: its latents ((z - mean) / std,
  packed 2x2) appended after the target tokens, ``img_shapes`` listing the target then the image; timestep t in
  [0, 1]; the prompt encoded by Qwen2.5-VL together with the image (real models; the tiny text encoder reads text
  only).

``tiny`` builds random small models of the real classes (transformer and VAE) with a small T5 as the text encoder
(the real ones are Mistral / Qwen3 / Qwen2.5-VL), for tests and CPU smoke runs.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

import torch
from diffusers import AutoencoderKLFlux2, AutoencoderKLQwenImage, Flux2Transformer2DModel, QwenImageTransformer2DModel
from torch import nn
from transformers import T5Config, T5EncoderModel

from training.backbone import HashTokenizer, _randomise, load_frozen_backbone

# diffusers' reference-image time offset in FLUX.2 (Flux2Pipeline._prepare_image_ids: T = 10 + 10·i)
FLUX2_REFERENCE_T = 10
TINY_TEXT = {"vocab_size": 1000, "d_model": 32, "d_kv": 8, "d_ff": 64, "num_layers": 2, "num_heads": 4}
TINY_FLUX2 = {"patch_size": 1, "in_channels": 16, "num_layers": 1, "num_single_layers": 2, "attention_head_dim": 16,
              "num_attention_heads": 2, "joint_attention_dim": 32, "mlp_ratio": 3.0, "axes_dims_rope": (4, 4, 4, 4),
              "guidance_embeds": True}
TINY_FLUX2_VAE = {"in_channels": 3, "out_channels": 3, "latent_channels": 4, "block_out_channels": (16, 32),
                  "down_block_types": ("DownEncoderBlock2D",) * 2, "up_block_types": ("UpDecoderBlock2D",) * 2,
                  "layers_per_block": 1, "norm_num_groups": 8}
TINY_QWEN = {"patch_size": 2, "in_channels": 16, "out_channels": 4, "num_layers": 2, "attention_head_dim": 16,
             "num_attention_heads": 2, "joint_attention_dim": 32, "axes_dims_rope": (4, 6, 6)}
TINY_QWEN_VAE = {"base_dim": 16, "z_dim": 4, "dim_mult": [1, 2], "num_res_blocks": 1, "temperal_downsample": [False],
                 "latents_mean": [0.1, -0.2, 0.3, 0.0], "latents_std": [1.5, 0.8, 1.2, 1.0]}

# the side of the square image Qwen2.5-VL reads with the prompt (QwenImageEditPlusPipeline: CONDITION_IMAGE_SIZE =
# 384 x 384 pixels of area)
QWEN_CONDITION_SIDE = 384
# (prompts, device, reference images [B, H, W, 3] in 0..1) -> (text embeddings [B, L, D], attention mask or None)
TextEncoder = Callable[[list[str], torch.device, torch.Tensor], tuple[torch.Tensor, torch.Tensor | None]]


@dataclass
class EditorBackbone:
    """A frozen editor: transformer, VAE and text encoder, and how its pipeline feeds a reference image."""

    transformer: nn.Module
    vae: nn.Module
    text_encoder: TextEncoder
    modules: tuple[nn.Module, ...] = ()  # the text encoder's modules (frozen and moved with the others)
    tiny: bool = False

    family: ClassVar[str] = ""      # the LoRA family of its transformer (analogy_core.lora.FAMILIES)
    spec_scheme: ClassVar[str] = ""  # its backbone spec scheme

    def freeze(self) -> EditorBackbone:
        for module in (self.transformer, self.vae, *self.modules):
            module.requires_grad_(False)
            module.eval()
        return self

    def to(self, device) -> EditorBackbone:
        """The VAE and text encoder on ``device`` (the transformer is moved by the trainer)."""
        for module in (self.vae, *self.modules):
            module.to(device)
        return self

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str], device, images: torch.Tensor | None = None):
        return self.text_encoder(list(prompts), device, images)

    def _pixels(self, images: torch.Tensor) -> torch.Tensor:
        param = next(self.vae.parameters())
        return images.permute(0, 3, 1, 2).to(param.device, param.dtype) * 2 - 1

    @property
    def token_pixels(self) -> int:
        """Pixels per latent token side: the VAE's downsampling, then the 2x2 patchify / packing."""
        return 2 * self.vae_factor

    # implemented per editor
    @property
    def vae_factor(self) -> int:
        """Pixels per latent pixel (before the 2x2 packing), as :attr:`training.backbone.Backbone.vae_factor`."""
        raise NotImplementedError

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def decode_tokens(self, tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
        raise NotImplementedError

    def predict(self, transformer, x_t, reference, t, text, mask, guidance, grid_size: int) -> torch.Tensor:
        """Velocity for the target tokens ``x_t`` with the reference grid's tokens given as the editor takes them
        (``reference`` None: the target alone, as for Edit Transfer's single four-panel image)."""
        raise NotImplementedError

    @staticmethod
    def _with_reference(x_t: torch.Tensor, reference: torch.Tensor | None) -> torch.Tensor:
        return x_t if reference is None else torch.cat([x_t, reference], dim=1)


def _config(transformer):
    """The diffusers config of a transformer, also when Accelerate wrapped it (DDP's ``.module``)."""
    return getattr(transformer, "module", transformer).config


# ---------------------------------------------------------------------------------------------------------------------
# FLUX.2


def flux2_image_ids(h: int, w: int, t: int = 0) -> torch.Tensor:
    """(T, H, W, L) ids of an h x w token grid, as Flux2Pipeline._prepare_latent_ids / _prepare_image_ids."""
    return torch.cartesian_prod(torch.tensor([t]), torch.arange(h), torch.arange(w), torch.arange(1))


def flux2_text_ids(length: int) -> torch.Tensor:
    """(0, 0, 0, l) ids of the text tokens, as Flux2Pipeline._prepare_text_ids."""
    return torch.cartesian_prod(torch.arange(1), torch.arange(1), torch.arange(1), torch.arange(length))


class Flux2Backbone(EditorBackbone):
    family = "flux2"
    spec_scheme = "flux2"

    @property
    def vae_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    def _bn(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        bn = self.vae.bn
        mean = bn.running_mean.view(1, -1, 1, 1).to(like.device, like.dtype)
        std = torch.sqrt(bn.running_var.view(1, -1, 1, 1) + self.vae.config.batch_norm_eps).to(like.device, like.dtype)
        return mean, std

    @torch.no_grad()
    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """IMAGE [B, H, W, 3] -> tokens [B, (H/f)(W/f), 4·C] (Flux2Pipeline._encode_vae_image, then _pack_latents)."""
        latents = self.vae.encode(self._pixels(images)).latent_dist.mode()
        b, c, h, w = latents.shape
        latents = latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 1, 3, 5, 2, 4).reshape(b, c * 4, h // 2, w // 2)
        mean, std = self._bn(latents)
        latents = (latents - mean) / std
        return latents.reshape(b, c * 4, -1).permute(0, 2, 1)

    @torch.no_grad()
    def decode_tokens(self, tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
        f = self.token_pixels
        b, _, d = tokens.shape
        latents = tokens.permute(0, 2, 1).reshape(b, d, height // f, width // f)
        mean, std = self._bn(latents)
        latents = latents * std + mean
        c = d // 4
        latents = latents.reshape(b, c, 2, 2, height // f, width // f).permute(0, 1, 4, 2, 5, 3)
        latents = latents.reshape(b, c, 2 * height // f, 2 * width // f)
        param = next(self.vae.parameters())
        pixels = self.vae.decode(latents.to(param.dtype)).sample
        return ((pixels.float() + 1) / 2).clamp(0, 1).permute(0, 2, 3, 1)

    def position_ids(self, grid_size: int, text_tokens: int, device,
                     reference: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        side = grid_size // self.token_pixels
        parts = [flux2_image_ids(side, side, 0)] + ([flux2_image_ids(side, side, FLUX2_REFERENCE_T)] if reference else [])
        return torch.cat(parts).to(device), flux2_text_ids(text_tokens).to(device)

    def predict(self, transformer, x_t, reference, t, text, mask, guidance, grid_size: int) -> torch.Tensor:
        img_ids, txt_ids = self.position_ids(grid_size, text.shape[1], x_t.device, reference is not None)
        use_guidance = _config(transformer).guidance_embeds
        out = transformer(hidden_states=self._with_reference(x_t, reference), encoder_hidden_states=text, timestep=t,
                          img_ids=img_ids, txt_ids=txt_ids, guidance=guidance if use_guidance else None,
                          return_dict=False)[0]
        return out[:, : x_t.shape[1]]


# ---------------------------------------------------------------------------------------------------------------------
# Qwen-Image-Edit


class QwenImageEditBackbone(EditorBackbone):
    family = "qwen_image"
    spec_scheme = "qwen_image_edit"

    @property
    def vae_factor(self) -> int:
        return 2 ** len(self.vae.temperal_downsample)  # one spatial downsampling per stage

    def _stats(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        shape = (1, self.vae.config.z_dim, 1, 1, 1)
        mean = torch.tensor(self.vae.config.latents_mean).view(shape).to(like.device, like.dtype)
        std = torch.tensor(self.vae.config.latents_std).view(shape).to(like.device, like.dtype)
        return mean, std

    @torch.no_grad()
    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """IMAGE [B, H, W, 3] -> tokens [B, (H/f)(W/f), 4·C] (QwenImageEditPlusPipeline._encode_vae_image, then
        _pack_latents)."""
        latents = self.vae.encode(self._pixels(images).unsqueeze(2)).latent_dist.mode()  # [B, C, 1, h, w]
        mean, std = self._stats(latents)
        latents = ((latents - mean) / std)[:, :, 0]
        b, c, h, w = latents.shape
        x = latents.reshape(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
        return x.reshape(b, (h // 2) * (w // 2), c * 4)

    @torch.no_grad()
    def decode_tokens(self, tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
        f = self.token_pixels
        b, _, d = tokens.shape
        h, w = height // f, width // f
        latents = tokens.view(b, h, w, d // 4, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, d // 4, 1, 2 * h, 2 * w)
        mean, std = self._stats(latents)
        param = next(self.vae.parameters())
        pixels = self.vae.decode((latents * std + mean).to(param.dtype)).sample[:, :, 0]
        return ((pixels.float() + 1) / 2).clamp(0, 1).permute(0, 2, 3, 1)

    def img_shapes(self, grid_size: int, batch: int, reference: bool = True) -> list[list[tuple[int, int, int]]]:
        """Target then input image, per sample, in tokens (QwenImageEditPlusPipeline.__call__)."""
        side = grid_size // self.token_pixels
        return [[(1, side, side)] * (2 if reference else 1)] * batch

    def predict(self, transformer, x_t, reference, t, text, mask, guidance, grid_size: int) -> torch.Tensor:
        use_guidance = getattr(_config(transformer), "guidance_embeds", False)
        if mask is None:
            mask = torch.ones(text.shape[:2], device=text.device, dtype=torch.long)
        out = transformer(hidden_states=self._with_reference(x_t, reference), encoder_hidden_states=text,
                          encoder_hidden_states_mask=mask, timestep=t,
                          img_shapes=self.img_shapes(grid_size, x_t.shape[0], reference is not None),
                          guidance=guidance if use_guidance else None, return_dict=False)[0]
        return out[:, : x_t.shape[1]]


EDITORS: dict[str, type[EditorBackbone]] = {cls.spec_scheme: cls for cls in (Flux2Backbone, QwenImageEditBackbone)}
DEFAULT_MODELS = {"flux2": "black-forest-labs/FLUX.2-dev", "qwen_image_edit": "Qwen/Qwen-Image-Edit-2509"}


# ---------------------------------------------------------------------------------------------------------------------
# loading


def editor_scheme(spec: str) -> str | None:
    """"flux2" / "qwen_image_edit" for specs of the new editors, None for FLUX.1-Kontext specs."""
    scheme = spec.partition(":")[0]
    return scheme if scheme in EDITORS else None


def backbone_family(spec: str) -> str:
    """The LoRA family a backbone spec trains for: flux2, qwen_image, or flux (FLUX.1-Kontext)."""
    scheme = editor_scheme(spec)
    return EDITORS[scheme].family if scheme else "flux"


def tiny_text_encoder(seed: int) -> tuple[TextEncoder, tuple[nn.Module, ...]]:
    t5 = T5EncoderModel(T5Config(**TINY_TEXT))
    _randomise(t5, seed)
    tokenizer = HashTokenizer(TINY_TEXT["vocab_size"], 16)

    def encode(prompts, device, images=None):
        return t5(tokenizer(prompts).to(device))[0], None

    return encode, (t5,)


def load_editor(spec: str, dtype: torch.dtype = torch.float32, seed: int = 0) -> EditorBackbone:
    """A frozen FLUX.2 or Qwen-Image-Edit backbone from its spec (see the module docstring)."""
    scheme, _, rest = spec.partition(":")
    cls = EDITORS[scheme]
    rest = rest or DEFAULT_MODELS[scheme]
    if rest == "tiny":
        if cls is Flux2Backbone:
            transformer, vae = Flux2Transformer2DModel(**TINY_FLUX2), AutoencoderKLFlux2(**TINY_FLUX2_VAE)
        else:
            transformer, vae = QwenImageTransformer2DModel(**TINY_QWEN), AutoencoderKLQwenImage(**TINY_QWEN_VAE)
        _randomise(transformer, seed)
        _randomise(vae, seed + 1)
        encode, modules = tiny_text_encoder(seed + 3)
        return cls(transformer, vae, encode, modules, tiny=True).freeze()
    return _load_pretrained(cls, rest, dtype).freeze()


def _load_pretrained(cls: type[EditorBackbone], name: str, dtype: torch.dtype) -> EditorBackbone:
    """Transformer and VAE from ``name``'s subfolders; the prompt encoded by the model's own pipeline class (its
    ``encode_prompt``: Mistral / Qwen3 hidden states for FLUX.2, Qwen2.5-VL with the image for Qwen-Image-Edit)."""
    import diffusers  # the pipeline class named by the folder's model_index.json

    kwargs = {"local_files_only": True, "torch_dtype": dtype}
    transformer_cls, vae_cls = ((Flux2Transformer2DModel, AutoencoderKLFlux2) if cls is Flux2Backbone
                                else (QwenImageTransformer2DModel, AutoencoderKLQwenImage))
    transformer = transformer_cls.from_pretrained(name, subfolder="transformer", **kwargs)
    vae = vae_cls.from_pretrained(name, subfolder="vae", **kwargs)
    index = diffusers.DiffusionPipeline.load_config(name, local_files_only=True)
    pipeline_cls = getattr(diffusers, index["_class_name"])
    pipe = pipeline_cls.from_pretrained(name, transformer=None, vae=None, **kwargs)
    modules = (pipe.text_encoder,)

    if cls is Flux2Backbone:
        def encode(prompts, device, images=None):
            return pipe.encode_prompt(prompt=prompts, device=device)[0], None
    else:
        from PIL import Image

        def encode(prompts, device, images=None):
            """One prompt at a time with its grid (the pipeline's condition image, ~384² pixels), zero-padded."""
            embeds, masks = [], []
            for prompt, image in zip(prompts, images):
                pil = Image.fromarray((image.float().cpu().clamp(0, 1).numpy() * 255).round().astype("uint8"))
                condition = pil.resize((QWEN_CONDITION_SIDE, QWEN_CONDITION_SIDE), Image.BICUBIC)
                embed, mask = pipe.encode_prompt(prompt=[prompt], image=[condition], device=device)
                embeds.append(embed[0])
                masks.append(torch.ones(embed.shape[1], device=device, dtype=torch.long) if mask is None else mask[0])
            length = max(e.shape[0] for e in embeds)
            text = torch.stack([torch.nn.functional.pad(e, (0, 0, 0, length - e.shape[0])) for e in embeds])
            mask = torch.stack([torch.nn.functional.pad(m, (0, length - m.shape[0])) for m in masks])
            return text, mask
    return cls(transformer, vae, encode, modules, tiny=False)


def load_frozen_any(spec: str, mixed_precision: str, seed: int, device):
    """A frozen four-panel backbone of any family in its training precision, VAE and text encoders on ``device``:
    FLUX.2 / Qwen-Image-Edit here, FLUX.1-Kontext through :func:`training.backbone.load_frozen_backbone`."""
    if editor_scheme(spec) is None:
        return load_frozen_backbone(spec, mixed_precision, seed, device)
    dtype = torch.bfloat16 if mixed_precision == "bf16" else torch.float32
    return load_editor(spec, dtype, seed).to(device)
