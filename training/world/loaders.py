"""The ``world`` model specs the trainers' loaders read (registered with :mod:`training.model_specs` on import):

* ``backbone`` ``world:<folder>`` — the FLUX.1-Kontext-like transformer and its text encoders from
  ``<folder>/flux_kontext`` (or ``<folder>`` itself when it is a model folder, e.g. the FLUX.1-dev-like one), the
  world autoencoder from ``<folder>/autoencoder`` (or the model folder's sibling);
* ``query_encoder`` ``world:<folder>`` — the world CLIP's vision tower (``<folder>/clip`` or a CLIP folder itself);
* ``ip2p`` ``world:<folder>`` — the InstructPix2Pix-like backbone with the world autoencoder;
* ``clip`` / ``instruction_encoder`` ``world`` (the full world of seed 0, built or reused) or ``world:<folder>`` —
  the region predictor's encoders (the world CLIP, the tiny world T5).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from diffusers import DDPMScheduler, FluxTransformer2DModel, UNet2DConditionModel
from transformers import CLIPTextModel, T5EncoderModel

from analogy_core.encoders import ImageEncoder, load_image_encoder
from analogy_core.regions import FrozenClip, InstructionEncoder
from training.backbone import Backbone, HashTokenizer
from training.loc.ip2p import IP2PBackbone
from training.model_specs import register_loader
from training.world.autoencoder import load_world_autoencoder
from training.world.instruct_pix2pix import (TOKENIZER_FILE, add_attention_positions, add_position_input,
                                             attention_positions_of, model_folders, position_frequencies_of)
from training.world.registry import World, build_world, open_world

T5_FOLDER = "region_t5"


def world_model_folders(folder: str, model: str = "flux_kontext") -> tuple[Path, Path]:
    """(transformer folder, autoencoder folder) of a world spec: a world folder (``world.json``; its ``model``) or a
    world model folder (``transformer/``; the autoencoder is its sibling)."""
    root = Path(folder)
    flux = root / model if (root / "world.json").is_file() or (root / model).is_dir() else root
    autoencoder = flux.parent / "autoencoder"
    for path, what in ((flux / "transformer", "transformer"), (autoencoder / "config.json", "autoencoder")):
        if not path.exists():
            raise FileNotFoundError(f"world backbone {folder}: no {what} at {path}; build the world with "
                                    f"`python -m training.world build` (see training/world)")
    return flux, autoencoder


def world_backbone(flux_folder: Path, autoencoder_folder: Path, dtype: torch.dtype = torch.float32) -> Backbone:
    """The world's backbone from its folders: transformer and text encoders, word-hash tokenizers, autoencoder."""
    codec = load_world_autoencoder(autoencoder_folder)
    tokenizer = json.loads((Path(flux_folder) / "hash_tokenizer.json").read_text())
    hashing = HashTokenizer(tokenizer["vocab_size"], tokenizer["length"])
    kwargs = dict(local_files_only=True, torch_dtype=dtype)
    backbone = Backbone(FluxTransformer2DModel.from_pretrained(Path(flux_folder) / "transformer", **kwargs),
                        codec.ae.to(dtype), CLIPTextModel.from_pretrained(Path(flux_folder) / "text_encoder", **kwargs),
                        T5EncoderModel.from_pretrained(Path(flux_folder) / "text_encoder_2", **kwargs), hashing,
                        hashing, True, codec)
    backbone.freeze()
    return backbone


def world_query_encoder(folder: str) -> ImageEncoder:
    """The world CLIP's vision tower: ``<folder>/clip`` of a world folder, or a CLIP folder itself."""
    root = Path(folder)
    root = root / "clip" if (root / "clip" / "config.json").is_file() else root
    vision = root / "vision"  # the world CLIP's vision tower (see training/world/clip.py)
    if not (vision / "config.json").is_file():
        raise FileNotFoundError(f"query encoder world:{folder}: no world CLIP at {vision}; build the world with "
                                f"`python -m training.world build`")
    return load_image_encoder(str(vision))


def world_ip2p(folder: str, dtype: torch.dtype = torch.float32, autoencoder: str | Path | None = None) -> IP2PBackbone:
    """The analogy world's InstructPix2Pix-like backbone (UNet, text encoder, word-hash tokenizer, scheduler) with
    the world autoencoder (see :mod:`training.world.instruct_pix2pix`)."""
    model, default_autoencoder = model_folders(folder) if autoencoder is None else (Path(folder), Path(autoencoder))
    codec = load_world_autoencoder(autoencoder or default_autoencoder)
    tokenizer = json.loads((model / TOKENIZER_FILE).read_text())
    kwargs = dict(local_files_only=True, torch_dtype=dtype)
    scheduler = DDPMScheduler.from_pretrained(model / "scheduler", local_files_only=True)
    unet = UNet2DConditionModel.from_pretrained(model / "unet", **kwargs)
    if frequencies := position_frequencies_of(unet):
        add_position_input(unet, frequencies)
    if frequencies := attention_positions_of(model):
        add_attention_positions(unet, frequencies)
    return IP2PBackbone(unet, codec.ae,
                        CLIPTextModel.from_pretrained(model / "text_encoder", **kwargs),
                        HashTokenizer(tokenizer["vocab_size"], tokenizer["length"]), scheduler.alphas_cumprod.double(),
                        scheduler.config.get("prediction_type", "epsilon"), tiny=True, codec=codec).freeze()


def resolve_world(folder: str) -> World:
    """A built world folder, or (``""``) the full world of seed 0, built or reused."""
    return open_world(folder) if folder else build_world(["clip", T5_FOLDER])


def world_clip(folder: str = "") -> FrozenClip:
    return FrozenClip.from_folder(resolve_world(folder).path("clip"))


def world_instruction_encoder(folder: str = "") -> InstructionEncoder:
    return InstructionEncoder.from_folder(resolve_world(folder).path(T5_FOLDER))


register_loader("backbone", "world", lambda folder, dtype=torch.float32: world_backbone(*world_model_folders(folder),
                                                                                      dtype))
register_loader("query_encoder", "world", lambda folder: world_query_encoder(folder))
register_loader("ip2p", "world", lambda folder, dtype=torch.float32, autoencoder=None: world_ip2p(folder, dtype,
                                                                                               autoencoder))
register_loader("clip", "world", lambda folder: world_clip(folder))
register_loader("instruction_encoder", "world", lambda folder: world_instruction_encoder(folder))
