"""The world's tiny autoencoder: TAESD's architecture (diffusers ``AutoencoderTiny``, f=8, 16 latent channels as FLUX),
set by hand and exact on the world (version 2).

The world is pixel art on 8-px cells, so one latent pixel covers exactly one world cell. Every weight is set, none
learned: the encoder's three stride-2 convolutions average 2 x 2 pixels each (an 8 x 8 mean: the cell's colour), and
the last convolution projects the three colour values with a fixed 16 x 3 matrix of orthonormal columns scaled by
:data:`PROJECTION_SCALE` (latents are linear in the cell colours). The decoder's first convolution projects back,
every later stage is exact nearest-neighbour upsampling (its convolutions carry the three colour channels, its
residual blocks are identities: last convolution zero, and ``relu(x) = x`` for the non-negative colours). TAESD's
decoder starts with ``tanh(z / 3) · 3``; the small projection scale keeps latents within ±0.2, where that clamp
moves a colour by under 1e-3. So a world image's round trip is exact to that, and a B′ is judged on what a method
drew, not on the autoencoder (version 1's 4-px cells, 2 x 2 per latent pixel, needed a learned decoder that missed
the cell metric's tolerance on some cells).

Everything is TAESD's layout, so :func:`comfy_taesd_state` writes a file ComfyUI's stock VAELoader loads (its TAESD
is 64 channels wide: the narrower network is embedded with zero channels, which stay exactly zero).
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from diffusers import AutoencoderTiny
from safetensors.torch import save_file
from torch import nn

from training.world import scenes as world

log = logging.getLogger(__name__)
LATENT_CHANNELS = 16
COLOUR_CHANNELS = 3
FACTOR = 8                    # pixels per latent pixel along a side (three stride-2 stages)
PROJECTION_SCALE = 0.2        # norm of each projection column (latents within ±0.2: tanh(z/3)·3 is z to < 1e-3)
COMFY_WIDTH = 64              # ComfyUI's TAESD width
# diffusers EncoderTiny / DecoderTiny ``layers`` indices (ComfyUI's taesd_decoder has a Clamp in front: index + 1)
ENC_POOLS, ENC_OUT = (2, 6, 10), 14
DEC_IN, DEC_HEAD_END, DEC_COPY_CONVS, DEC_OUT = 0, 5, (6, 11, 16), 18


def build_autoencoder(width: int = 16):
    if width < COLOUR_CHANNELS:
        raise ValueError(f"autoencoder width must hold the {COLOUR_CHANNELS} colour channels, got {width}")
    return AutoencoderTiny(encoder_block_out_channels=(width,) * 4, decoder_block_out_channels=(width,) * 4,
                           latent_channels=LATENT_CHANNELS)


def _zero(conv: nn.Conv2d) -> None:
    conv.weight.zero_()
    if conv.bias is not None:
        conv.bias.zero_()


def _copy_colours(conv: nn.Conv2d) -> None:
    _zero(conv)
    for k in range(COLOUR_CHANNELS):
        conv.weight[k, k, conv.kernel_size[0] // 2, conv.kernel_size[1] // 2] = 1.0


def projection(seed: int) -> torch.Tensor:
    """The fixed 16 x 3 latent projection: orthonormal columns scaled by :data:`PROJECTION_SCALE`."""
    gen = torch.Generator().manual_seed(seed)
    return torch.linalg.qr(torch.randn(LATENT_CHANNELS, COLOUR_CHANNELS, generator=gen))[0] * PROJECTION_SCALE


@torch.no_grad()
def initialise(ae, seed: int) -> None:
    """Set every weight: 8 x 8 mean and projection in the encoder, back-projection and exact upsampling in the
    decoder, identity residual blocks, nothing else (all other weights and biases zero)."""
    enc, dec = ae.encoder.layers, ae.decoder.layers
    for param in ae.parameters():
        param.zero_()
    _copy_colours(enc[0])
    for index in ENC_POOLS:  # 2 x 2 mean with a stride-2 3 x 3 kernel: taps (1..2, 1..2) cover pixels (2i..2i+1)
        for k in range(COLOUR_CHANNELS):
            enc[index].weight[k, k, 1:3, 1:3] = 0.25
    p = projection(seed)
    enc[ENC_OUT].weight[:, :COLOUR_CHANNELS, 1, 1] = p
    enc[ENC_OUT].bias[:] = -0.5 * p.sum(dim=1)  # latents of colours centred on 0.5
    dec[DEC_IN].weight[:COLOUR_CHANNELS, :, 1, 1] = p.t() / PROJECTION_SCALE ** 2  # pᵀp = scale²·I
    dec[DEC_IN].bias[:COLOUR_CHANNELS] = 0.5
    for index in (*DEC_COPY_CONVS, DEC_OUT):
        _copy_colours(dec[index])


def encode_pixels(ae, images: torch.Tensor) -> torch.Tensor:
    """The encoder's shortcut: IMAGE-channel batch [B, 3, H, W] in 0..1 -> raw latents [B, 16, H/8, W/8]."""
    x = nn.functional.avg_pool2d(images, FACTOR)
    x = nn.functional.pad(x, (0, 0, 0, 0, 0, ae.encoder.layers[0].out_channels - COLOUR_CHANNELS))
    for layer in list(ae.encoder.layers)[ENC_POOLS[-1] + 1:]:
        x = layer(x)
    return x


def decode_colours(ae, latents: torch.Tensor) -> torch.Tensor:
    """The decoder's first stage: raw latents -> colours at latent resolution [B, 3, h, w] (what the later stages
    upsample exactly)."""
    x = torch.tanh(latents / 3) * 3
    for layer in list(ae.decoder.layers)[:DEC_HEAD_END]:
        x = layer(x)
    return x[:, :COLOUR_CHANNELS]


@torch.no_grad()
def reconstruction_error(ae, images: torch.Tensor) -> float:
    """Mean absolute pixel error (0..1 units) of the full autoencoder on IMAGE-layout batch [B, H, W, 3]."""
    x = images.permute(0, 3, 1, 2) * 2 - 1
    out = ae.decode(ae.encode(x).latents).sample.clamp(-1, 1)
    return float((out - x).abs().mean() / 2)


def comfy_taesd_state(ae, latent_scale: float, latent_shift: float) -> dict[str, torch.Tensor]:
    """ComfyUI's TAESD keys (``taesd_encoder.*``, ``taesd_decoder.*``, ``vae_scale``, ``vae_shift``) at ComfyUI's
    64-channel width. The extra channels are zero and stay zero, so the result equals this network exactly.

    ``vae_scale``/``vae_shift`` are chosen so that what ComfyUI's FLUX model receives, ``(latent - 0.1159) · 0.3611``
    (its FLUX latent format), equals what the world backbone was trained on: ``(z - latent_shift) · latent_scale``
    for the raw encoder output ``z`` (ComfyUI: ``latent = z / vae_scale + vae_shift``, decoder input
    ``(latent - vae_shift) · vae_scale = z``)."""
    flux_shift, flux_scale = 0.1159, 0.3611
    vae_scale = flux_scale / latent_scale
    vae_shift = flux_shift - latent_shift / vae_scale
    state: dict[str, torch.Tensor] = {}
    # layers whose input or output is not the network width: RGB in/out and the latent
    fixed_in = {("encoder", 0), ("decoder", DEC_IN)}
    fixed_out = {("encoder", ENC_OUT), ("decoder", DEC_OUT)}
    for part, offset in (("encoder", 0), ("decoder", 1)):
        for key, value in getattr(ae, part).layers.state_dict().items():
            index, rest = key.split(".", 1)
            layer = (part, int(index))
            state[f"taesd_{part}.{int(index) + offset}.{rest}"] = _pad(value, layer not in fixed_out,
                                                                       layer not in fixed_in)
    state["vae_scale"] = torch.tensor(float(vae_scale))
    state["vae_shift"] = torch.tensor(float(vae_shift))
    return state


def _pad(value: torch.Tensor, pad_out: bool, pad_in: bool) -> torch.Tensor:
    """Zero-pad a conv weight [out, in, k, k] or bias [out] to ComfyUI's width on the sides that are the width."""
    shape = list(value.shape)
    if pad_out:
        shape[0] = COMFY_WIDTH
    if pad_in and value.ndim > 1:
        shape[1] = COMFY_WIDTH
    out = torch.zeros(shape, dtype=value.dtype)
    out[tuple(slice(0, n) for n in value.shape)] = value
    return out.contiguous()


# ---------------------------------------------------------------------------------------------------------------------
# the exact shortcut, the built model, ComfyUI's file

COMFY_FILE = "world_taesd.safetensors"


class CellCodec:
    """The world autoencoder run through its exact shortcut: the encoder's stride-2 stages are an 8 x 8 mean and the
    decoder's later stages nearest-neighbour upsampling (checked against the full network when made), so encoding
    and decoding cost a fraction of the full convolutions. Pixels in -1..1 as diffusers' AutoencoderTiny."""

    def __init__(self, ae):
        self.ae = ae.eval().requires_grad_(False)
        self.shift = float(ae.config.shift_factor)
        self.scale = float(ae.config.scaling_factor)
        self._check()

    @torch.no_grad()
    def _check(self) -> None:
        gen = torch.Generator().manual_seed(0)
        probe = torch.rand(2, 3, 32, 32, generator=gen) * 2 - 1
        full_z = self.ae.encode(probe).latents
        full_x = self.ae.decode(full_z).sample
        if not (torch.allclose(self.encode(probe), full_z, atol=1e-4)
                and torch.allclose(self.decode(full_z), full_x, atol=1e-4)):
            raise ValueError("this autoencoder does not have the world autoencoder's structure (its shortcut "
                             "differs from the full network)")

    @torch.no_grad()
    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        """[B, 3, H, W] in -1..1 -> raw latents [B, 16, H/8, W/8] (what ``ae.encode(...).latents`` gives)."""
        return encode_pixels(self.ae, (pixels.float() + 1) / 2)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Raw latents -> [B, 3, H, W] in -1..1 (what ``ae.decode(...).sample`` gives)."""
        colours = decode_colours(self.ae, latents.float())
        return torch.nn.functional.interpolate(colours, scale_factor=FACTOR, mode="nearest") * 2 - 1

    def model_latents(self, images: torch.Tensor) -> torch.Tensor:
        """IMAGE batch [B, H, W, 3] in 0..1 -> model-space latents ``(z - shift) · scale`` [B, 16, H/8, W/8]."""
        return (self.encode(images.permute(0, 3, 1, 2) * 2 - 1) - self.shift) * self.scale


def load_world_autoencoder(folder: str | Path) -> CellCodec:
    return CellCodec(AutoencoderTiny.from_pretrained(Path(folder), local_files_only=True))


def build(ctx) -> dict:
    """World model ``autoencoder``: set every weight, measure the round trip, set the latent normalisation the
    transformers train with, write the diffusers folder and ComfyUI's TAESD file."""
    cfg = ctx.config
    ae = build_autoencoder(cfg["width"])
    initialise(ae, ctx.seed)
    panels = torch.stack([world.world_image("train", i, cfg["panel"])[0] for i in range(cfg["pool"])])
    held = torch.stack([world.world_image("heldout", i, cfg["panel"])[0] for i in range(64)])
    with torch.no_grad():
        z = ae.encode(panels.permute(0, 3, 1, 2) * 2 - 1).latents
    shift, scale = float(z.mean()), float(1.0 / z.std())
    ae.register_to_config(shift_factor=round(shift, 6), scaling_factor=round(scale, 6))
    ae.save_pretrained(ctx.folder)
    state = comfy_taesd_state(ae, latent_scale=ae.config.scaling_factor, latent_shift=ae.config.shift_factor)
    save_file(state, ctx.folder / COMFY_FILE, metadata={"analogy.kind": "world_taesd",
                                                        "analogy.world_version": str(world.WORLD_VERSION)})
    examples = [world.example(name, "heldout", 0, cfg["panel"]) for name in world.families("all")]
    b_primes = torch.stack([ex.b_prime for ex in examples])
    return {"mae_heldout": round(reconstruction_error(ae, held), 6),
            "mae_heldout_edited_b_prime": round(reconstruction_error(ae, b_primes), 6),
            "latent_shift": shift, "latent_scale": scale}
