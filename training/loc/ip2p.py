"""The frozen InstructPix2Pix backbone of LoRA of Change training, and its diffusion maths (DDPM noising, DDIM).

``load_ip2p("path/to/folder")`` reads a diffusers InstructPix2Pix folder (``unet/`` with 8 input channels, ``vae/``,
``text_encoder/``, ``tokenizer/``, ``scheduler/``; e.g. timbrooks/instruct-pix2pix) or a model id already in the
local Hugging Face cache; nothing is downloaded (``local_files_only``). ``"tiny"`` builds a random small model of
the same architecture with a word-hash tokenizer (tests, CPU smoke runs). ``"world:<folder>"`` reads the analogy
world's InstructPix2Pix-like backbone (:mod:`training.world.instruct_pix2pix`) with the world autoencoder.

InstructPix2Pix conditions on an image by concatenating its latent to the noisy latent (8 input channels). As in
the original training and diffusers' pipeline (and ComfyUI's InstructPixToPixConditioning), the condition latent is
the VAE posterior mode *without* the scaling factor, and the denoised latent is the mode times the scaling factor.

Noise schedule: DDPM, x_t = √ᾱ_t·x0 + √(1−ᾱ_t)·ε with ᾱ from the folder's scheduler config (SD1.5's scaled-linear
betas 0.00085..0.012 over 1000 steps for "tiny"). The UNet's output is turned into an x0 prediction for the
paper's objective (eqs. 6-7 are written on Θ, an x0 predictor) and for DDIM sampling (eq. 8).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from torch import nn
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from training.backbone import TINY_VAE, HashTokenizer, _randomise
from training.model_specs import registered_loader

TINY_UNET = dict(sample_size=8, in_channels=8, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
                 down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                 up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32, attention_head_dim=8,
                 norm_num_groups=8)
TINY_TEXT = dict(vocab_size=1000, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                 max_position_embeddings=16)
SD_SCHEDULE = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


@dataclass
class IP2PBackbone:
    unet: nn.Module
    vae: nn.Module
    text_encoder: nn.Module
    tokenizer: object
    alphas_cumprod: torch.Tensor     # [T] float64
    prediction_type: str = "epsilon"
    tiny: bool = False
    codec: object | None = None      # the world autoencoder (model-space latents for target and condition)

    @property
    def num_train_timesteps(self) -> int:
        return self.alphas_cumprod.shape[0]

    def freeze(self) -> "IP2PBackbone":
        for module in (self.unet, self.vae, self.text_encoder):
            module.requires_grad_(False)
            module.eval()
        return self

    def to(self, device) -> "IP2PBackbone":
        for module in (self.unet, self.text_encoder) if self.codec is not None else \
                (self.unet, self.vae, self.text_encoder):
            module.to(device)  # the world autoencoder stays on the CPU (its exact cell shortcut is cheap)
        return self

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str], device) -> torch.Tensor:
        """CLIP text hidden states [B, L, D] (what the UNet's cross-attention reads)."""
        if self.tiny or isinstance(self.tokenizer, HashTokenizer):
            ids = self.tokenizer(list(prompts))
        else:
            ids = self.tokenizer(list(prompts), padding="max_length", max_length=self.tokenizer.model_max_length,
                                 truncation=True, return_tensors="pt").input_ids
        return self.text_encoder(ids.to(device))[0]

    @torch.no_grad()
    def encode_images(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """IMAGE [B, H, W, 3] in 0..1 -> (latent to denoise = mode·scaling, condition latent = mode); for the world
        backbone both are the world autoencoder's model-space latents."""
        if self.codec is not None:
            device = next(self.unet.parameters()).device
            latents = self.codec.model_latents(images.cpu().float()).to(device)
            return latents, latents
        param = next(self.vae.parameters())
        pixels = images.permute(0, 3, 1, 2).to(param.device, param.dtype) * 2 - 1
        mode = self.vae.encode(pixels).latent_dist.mode()
        return mode * self.vae.config.scaling_factor, mode

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Denoised latents (scaled) -> IMAGE [B, H, W, 3] in 0..1."""
        if self.codec is not None:
            pixels = self.codec.decode(latents.cpu().float() / self.codec.scale + self.codec.shift)
            return ((pixels + 1) / 2).clamp(0, 1).permute(0, 2, 3, 1)
        param = next(self.vae.parameters())
        pixels = self.vae.decode((latents / self.vae.config.scaling_factor).to(param.dtype)).sample
        return ((pixels.float() + 1) / 2).clamp(0, 1).permute(0, 2, 3, 1)

    @torch.no_grad()
    def reconstruct(self, images: torch.Tensor) -> torch.Tensor:
        """The autoencoder's round trip of IMAGE batches (the floor no method goes below)."""
        return self.decode(self.encode_images(images)[0]).cpu()

    def unet_output(self, x_t: torch.Tensor, condition: torch.Tensor, t: torch.Tensor,
                    text: torch.Tensor) -> torch.Tensor:
        """The UNet's raw output for noisy latents ``x_t`` with the image condition latent concatenated."""
        sample = torch.cat([x_t, condition.to(x_t.dtype)], dim=1)
        return self.unet(sample, t, encoder_hidden_states=text.to(x_t.dtype), return_dict=False)[0]

    def predict_x0(self, x_t: torch.Tensor, condition: torch.Tensor, t: torch.Tensor,
                   text: torch.Tensor) -> torch.Tensor:
        """Θ(x_t, t, condition): the x0 prediction of the (LoRA-patched) UNet."""
        return to_x0(self.unet_output(x_t, condition, t, text), x_t, self.alpha_bar(t, x_t), self.prediction_type)

    def alpha_bar(self, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """ᾱ_t per sample, shaped to broadcast against ``like``."""
        values = self.alphas_cumprod.to(like.device)[t.to(like.device).long()]
        return values.to(like.dtype).view(-1, *([1] * (like.ndim - 1)))


def add_noise(x0: torch.Tensor, noise: torch.Tensor, alpha_bar: torch.Tensor) -> torch.Tensor:
    """x_t = √ᾱ·x0 + √(1−ᾱ)·ε."""
    return alpha_bar.sqrt() * x0 + (1 - alpha_bar).sqrt() * noise


def prediction_target(x0: torch.Tensor, noise: torch.Tensor, alpha_bar: torch.Tensor,
                      prediction_type: str) -> torch.Tensor:
    """What a model of ``prediction_type`` is trained to output at x_t = add_noise(x0, noise, ᾱ): ε, the velocity
    √ᾱ·ε − √(1−ᾱ)·x0 (diffusers' ``get_velocity``), or x0."""
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "v_prediction":
        return alpha_bar.sqrt() * noise - (1 - alpha_bar).sqrt() * x0
    if prediction_type == "sample":
        return x0
    raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}, got {prediction_type!r}")


def to_x0(output: torch.Tensor, x_t: torch.Tensor, alpha_bar: torch.Tensor, prediction_type: str) -> torch.Tensor:
    """The x0 the model's output implies: ε-prediction (x_t − √(1−ᾱ)ε̂)/√ᾱ, v-prediction √ᾱx_t − √(1−ᾱ)v̂."""
    if prediction_type == "epsilon":
        return (x_t - (1 - alpha_bar).sqrt() * output) / alpha_bar.sqrt()
    if prediction_type == "v_prediction":
        return alpha_bar.sqrt() * x_t - (1 - alpha_bar).sqrt() * output
    if prediction_type == "sample":
        return output
    raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}, got {prediction_type!r}")


def to_epsilon(output: torch.Tensor, x_t: torch.Tensor, alpha_bar: torch.Tensor, prediction_type: str) -> torch.Tensor:
    """The noise the model's output implies (for the ε-space loss)."""
    if prediction_type == "epsilon":
        return output
    x0 = to_x0(output, x_t, alpha_bar, prediction_type)
    return (x_t - alpha_bar.sqrt() * x0) / (1 - alpha_bar).sqrt()


def ddim_timesteps(num_train: int, steps: int) -> list[int]:
    """``steps`` timesteps from T−1 down to 0, evenly spaced."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    return [round(v) for v in torch.linspace(num_train - 1, 0, steps).tolist()]


@torch.no_grad()
def ddim_sample(x0_model: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], noise: torch.Tensor,
                alphas_cumprod: torch.Tensor, steps: int) -> torch.Tensor:
    """Eq. (8): x_{t−1} = √ᾱ_{t−1}·x̂0 + √(1−ᾱ_{t−1})·(x_t − √ᾱ_t·x̂0)/√(1−ᾱ_t), from x_T = ε to x0.

    ``x0_model(x_t, t[B])`` is Θ; the last step returns its x̂0 (ᾱ_{−1} = 1)."""
    x = noise
    times = ddim_timesteps(alphas_cumprod.shape[0], steps)
    for index, t in enumerate(times):
        a_t = float(alphas_cumprod[t])
        a_prev = float(alphas_cumprod[times[index + 1]]) if index + 1 < len(times) else 1.0
        x0 = x0_model(x, torch.full((x.shape[0],), t, device=x.device, dtype=torch.long))
        eps = (x - math.sqrt(a_t) * x0) / math.sqrt(1 - a_t)
        x = math.sqrt(a_prev) * x0 + math.sqrt(1 - a_prev) * eps
    return x


# ---------------------------------------------------------------------------------------------------------------------
# loading


def tiny_ip2p(seed: int = 0) -> IP2PBackbone:
    """A random InstructPix2Pix-architecture backbone from small configs (8-channel UNet, 4-channel VAE)."""
    unet = UNet2DConditionModel(**TINY_UNET)
    _randomise(unet, seed)
    vae = AutoencoderKL(**dict(TINY_VAE, latent_channels=4, scaling_factor=0.5))
    _randomise(vae, seed + 1)
    text = CLIPTextModel(CLIPTextConfig(**TINY_TEXT))
    return IP2PBackbone(unet, vae, text, HashTokenizer(TINY_TEXT["vocab_size"], TINY_TEXT["max_position_embeddings"]),
                        schedule(), "epsilon", tiny=True).freeze()


def schedule(**config) -> torch.Tensor:
    """ᾱ_t (float64) of a DDPM scheduler config (SD1.5's when empty)."""
    scheduler = DDPMScheduler(**{**SD_SCHEDULE, **config})
    return scheduler.alphas_cumprod.double()


def load_ip2p(name: str, dtype: torch.dtype = torch.float32, seed: int = 0,
              autoencoder: str | Path | None = None) -> IP2PBackbone:
    """"tiny", "world:<folder>" or a local diffusers InstructPix2Pix folder / cached model id (nothing is
    downloaded). ``autoencoder`` overrides where a world backbone's autoencoder is read from."""
    if name == "tiny":
        return tiny_ip2p(seed)
    if registered := registered_loader("ip2p", name):
        return registered(dtype=dtype, autoencoder=autoencoder)
    kwargs = dict(local_files_only=True, torch_dtype=dtype)
    unet = UNet2DConditionModel.from_pretrained(name, subfolder="unet", **kwargs)
    if unet.config.in_channels != 8:
        raise ValueError(f"{name}: the UNet has {unet.config.in_channels} input channels; InstructPix2Pix has 8 "
                         "(noisy latent + image condition). Is this an InstructPix2Pix model?")
    scheduler = DDPMScheduler.from_pretrained(name, subfolder="scheduler", local_files_only=True)
    prediction = scheduler.config.get("prediction_type", "epsilon")
    if prediction not in PREDICTION_TYPES:
        raise ValueError(f"{name}: unsupported prediction_type {prediction!r}")
    return IP2PBackbone(unet, AutoencoderKL.from_pretrained(name, subfolder="vae", **kwargs),
                        CLIPTextModel.from_pretrained(name, subfolder="text_encoder", **kwargs),
                        CLIPTokenizer.from_pretrained(name, subfolder="tokenizer", local_files_only=True),
                        scheduler.alphas_cumprod.double(), prediction, tiny=False).freeze()
