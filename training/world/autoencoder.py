"""The world's tiny autoencoder: TAESD's architecture (diffusers ``AutoencoderTiny``, f=8, 16 latent channels as FLUX).

The world is pixel art on 4-px cells, so an 8 x 8 latent cell covers 2 x 2 world cells (12 colour values). The
encoder is set, not learned: its first two stride-2 convolutions average 2 x 2 pixels (giving the exact cell colours),
the third rearranges the 2 x 2 cells of each latent cell into 12 channels (space to depth), and the last convolution
projects them with a fixed orthogonal 16 x 12 matrix (so latents are linear in the cell colours, and every colour edit
is a well-conditioned map of latents). Its residual blocks start as identities (last convolution zero) and stay so.

The decoder is learned. Nearest upsampling followed by convolutions cannot undo space to depth linearly (a pixel
does not know which quarter of its latent cell it is in), so the first decoder stage learns it from neighbouring
latents; the later stages are exact nearest-neighbour upsampling to pixels. Training therefore runs at cell
resolution (16 x 16 per 64-px panel): cheap, and exactly what the full decoder computes at pixel resolution.

Everything else is TAESD's layout, so :func:`comfy_taesd_state` writes a file ComfyUI's stock VAELoader loads (its
TAESD is 64 channels wide: the narrower trained network is embedded with zero channels, which stay exactly zero).
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import torch
from diffusers import AutoencoderTiny
from safetensors.torch import save_file
from torch import nn

from training.world import scenes as world
from training.world.schedule import warmup_cosine

log = logging.getLogger(__name__)
LATENT_CHANNELS = 16
PHASES = 4                    # world cells per latent cell (2 x 2)
CELL_CHANNELS = 3 * PHASES    # colour values per latent cell
COMFY_WIDTH = 64              # ComfyUI's TAESD width
# diffusers DecoderTiny.layers indices (ComfyUI's taesd_decoder has a Clamp in front: index + 1)
ENC_AVG, ENC_S2D, ENC_OUT = (2, 6), 10, 14
DEC_IN, DEC_UP_CONV, DEC_HEAD_END, DEC_COPY_CONVS, DEC_OUT = 0, 6, 10, (11, 16), 18


def build_autoencoder(decoder_width: int, encoder_width: int = 16):
    if encoder_width < CELL_CHANNELS:
        raise ValueError(f"encoder width must hold the {CELL_CHANNELS} cell colours, got {encoder_width}")
    if decoder_width < CELL_CHANNELS + 3:
        raise ValueError(f"decoder width must be at least {CELL_CHANNELS + 3}, got {decoder_width}")
    return AutoencoderTiny(encoder_block_out_channels=(encoder_width,) * 4,
                           decoder_block_out_channels=(decoder_width,) * 4, latent_channels=LATENT_CHANNELS)


def _blocks(layers: nn.Sequential) -> list[nn.Module]:
    return [m for m in layers if isinstance(getattr(m, "conv", None), nn.Sequential)]


def _zero(conv: nn.Conv2d) -> None:
    conv.weight.zero_()
    if conv.bias is not None:
        conv.bias.zero_()


def projection(seed: int) -> torch.Tensor:
    """The fixed 16 x 12 latent projection: orthogonal columns scaled by 2 (latents of about unit spread)."""
    gen = torch.Generator().manual_seed(seed)
    return torch.linalg.qr(torch.randn(LATENT_CHANNELS, CELL_CHANNELS, generator=gen))[0] * 2.0


@torch.no_grad()
def initialise(ae, seed: int) -> None:
    """Set the encoder (exact cell averages, space to depth, projection) and the decoder's starting point: cell
    colours back from the latents, a phase-blind average as the first guess, exact upsampling afterwards."""
    gen = torch.Generator().manual_seed(seed)
    enc, dec = ae.encoder.layers, ae.decoder.layers
    for param in ae.parameters():  # small random start for the learned layers (fan-in scaled), zero biases
        if param.ndim == 4:
            param.copy_(torch.randn(param.shape, generator=gen) / math.sqrt(param[0].numel()))
        else:
            param.zero_()
    for block in _blocks(enc) + _blocks(dec):
        _zero(block.conv[4])  # identity residual blocks (relu(0 + x) = x for the non-negative signals)
    p = projection(seed)
    conv = enc[0]
    _zero(conv)
    for k in range(3):
        conv.weight[k, k, 1, 1] = 1.0
    for index in ENC_AVG:  # 2 x 2 mean with a stride-2 3 x 3 kernel: taps (1..2, 1..2) cover pixels (2i..2i+1)
        _zero(enc[index])
        for k in range(3):
            enc[index].weight[k, k, 1:3, 1:3] = 0.25
    conv = enc[ENC_S2D]
    _zero(conv)
    for phase in range(PHASES):
        dy, dx = divmod(phase, 2)
        for k in range(3):
            conv.weight[3 * phase + k, k, 1 + dy, 1 + dx] = 1.0
    conv = enc[ENC_OUT]
    _zero(conv)
    conv.weight[:, :CELL_CHANNELS, 1, 1] = p
    conv.bias[:] = -0.5 * p.sum(dim=1)  # latents of colours centred on 0.5
    conv = dec[DEC_IN]
    _zero(conv)
    conv.weight[:CELL_CHANNELS, :, 1, 1] = p.t() / 4.0  # pᵀp = 4·I
    conv.bias[:CELL_CHANNELS] = 0.5
    conv = dec[DEC_UP_CONV]  # output channels 0..2: the colour (starts as the mean of the four cells), then the cells
    _zero(conv)
    for phase in range(PHASES):
        for k in range(3):
            conv.weight[k, 3 * phase + k, 1, 1] = 1.0 / PHASES
            conv.weight[3 + 3 * phase + k, 3 * phase + k, 1, 1] = 1.0
    for index in DEC_COPY_CONVS:  # later stages: carry the colour channels only (exact nearest upsampling)
        _zero(dec[index])
        for k in range(3):
            dec[index].weight[k, k, 1, 1] = 1.0
    for block in _blocks(dec)[6:]:
        for conv in block.conv:
            if isinstance(conv, nn.Conv2d):
                _zero(conv)
    _zero(dec[DEC_OUT])
    for k in range(3):
        dec[DEC_OUT].weight[k, k, 1, 1] = 1.0


def learned_parameters(ae) -> list[nn.Parameter]:
    """The decoder's first stage (input conv, three blocks, upsampling conv, three blocks): the only part trained."""
    return [p for layer in list(ae.decoder.layers)[:DEC_HEAD_END] for p in layer.parameters()]


def cells(images: torch.Tensor) -> torch.Tensor:
    """IMAGE batch [B, 3, H, W] in 0..1 -> cell colours [B, 3, H/4, W/4] (exact for pixel-art world images)."""
    return torch.nn.functional.avg_pool2d(images, world.CELL)


def encode_cells(ae, cell_images: torch.Tensor) -> torch.Tensor:
    """What the full encoder gives for the image these cells came from: space to depth and projection only."""
    width = ae.encoder.layers[0].out_channels
    x = torch.nn.functional.pad(cell_images, (0, 0, 0, 0, 0, width - 3))  # the encoder's other channels are zero
    for layer in list(ae.encoder.layers)[ENC_S2D:]:
        x = layer(x)
    return x


def decode_cells(ae, latents: torch.Tensor) -> torch.Tensor:
    """The decoder's first stage: latents -> cell colours [B, 3, 2h, 2w] (what the later stages upsample)."""
    x = torch.tanh(latents / 3) * 3
    for layer in list(ae.decoder.layers)[:DEC_HEAD_END]:
        x = layer(x)
    return x[:, :3]


def train_decoder(ae, panels: torch.Tensor, steps: int, batch_size: int, lr: float, seed: int) -> list[float]:
    """Train the decoder's first stage on cell images of random 2 x 2 grids of world panels (so panel seams are seen
    as in the four-panel grids), cropped to latent-aligned windows. ``panels``: [N, 3, S, S] in 0..1."""
    gen = torch.Generator().manual_seed(seed)
    pool = cells(panels)
    side = pool.shape[-1]
    params = learned_parameters(ae)
    optimiser = torch.optim.Adam(params, lr=lr)
    schedule = warmup_cosine(optimiser, steps)
    ae.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    losses = []
    for step in range(steps):
        quad = pool[torch.randint(len(pool), (batch_size, 4), generator=gen)]
        grid = torch.cat([torch.cat([quad[:, 0], quad[:, 1]], 3), torch.cat([quad[:, 2], quad[:, 3]], 3)], 2)
        oy, ox = (2 * torch.randint(0, side // 2 + 1, (2,), generator=gen)).tolist()  # whole latent cells
        target = grid[:, :, oy: oy + side, ox: ox + side]
        out = decode_cells(ae, encode_cells(ae, target))
        loss = (out - target).abs().mean() + (out - target).pow(2).mean()
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        schedule.step()
        losses.append(loss.item())
        if step % 200 == 0 or step == steps - 1:
            log.info("autoencoder step %d/%d loss %.4f", step + 1, steps, loss.item())
    ae.requires_grad_(False)
    return losses


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
    """The world autoencoder run through its exact shortcut: the encoder's first stages are a 4 x 4 mean and the
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
        return encode_cells(self.ae, cells((pixels.float() + 1) / 2))

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Raw latents -> [B, 3, H, W] in -1..1 (what ``ae.decode(...).sample`` gives)."""
        colours = decode_cells(self.ae, latents.float())
        return torch.nn.functional.interpolate(colours, scale_factor=world.CELL, mode="nearest") * 2 - 1

    def model_latents(self, images: torch.Tensor) -> torch.Tensor:
        """IMAGE batch [B, H, W, 3] in 0..1 -> model-space latents ``(z - shift) · scale`` [B, 16, H/8, W/8]."""
        return (self.encode(images.permute(0, 3, 1, 2) * 2 - 1) - self.shift) * self.scale


def load_world_autoencoder(folder: str | Path) -> CellCodec:
    return CellCodec(AutoencoderTiny.from_pretrained(Path(folder), local_files_only=True))


def build(ctx) -> dict:
    """World model ``autoencoder``: set the encoder, train the decoder, measure, set the latent normalisation the
    transformers train with, write the diffusers folder and ComfyUI's TAESD file."""
    cfg = ctx.config
    ae = build_autoencoder(cfg["decoder_width"])
    initialise(ae, ctx.seed)
    panels = torch.stack([world.world_image("train", i, cfg["panel"])[0] for i in range(cfg["pool"])])
    held = torch.stack([world.world_image("heldout", i, cfg["panel"])[0] for i in range(64)])
    start = reconstruction_error(ae, held)
    losses = train_decoder(ae, panels.permute(0, 3, 1, 2), cfg["steps"], cfg["batch"], cfg["lr"], ctx.seed)
    with torch.no_grad():
        z = ae.encode(panels[:512].permute(0, 3, 1, 2) * 2 - 1).latents
    shift, scale = float(z.mean()), float(1.0 / z.std())
    ae.register_to_config(shift_factor=round(shift, 6), scaling_factor=round(scale, 6))
    ae.save_pretrained(ctx.folder)
    state = comfy_taesd_state(ae, latent_scale=ae.config.scaling_factor, latent_shift=ae.config.shift_factor)
    save_file(state, ctx.folder / COMFY_FILE, metadata={"analogy.kind": "world_taesd",
                                                        "analogy.world_version": str(world.WORLD_VERSION)})
    examples = [world.example(name, "heldout", 0, cfg["panel"]) for name in world.families("all")]
    b_primes = torch.stack([ex.b_prime for ex in examples])
    return {"mae_heldout_start": round(start, 5), "mae_heldout": round(reconstruction_error(ae, held), 5),
            "mae_heldout_edited_b_prime": round(reconstruction_error(ae, b_primes), 5),
            "loss_end": sum(losses[-20:]) / 20, "latent_shift": shift, "latent_scale": scale}
