"""The region predictor's world instruction encoder: a tiny T5 encoder over the world's vocabulary, random and frozen
(built from a fixed seed and cached as a transformers folder, the format Load Instruction Encoder reads). It knows no
language: which words matter is learnt by the region module, as with any frozen encoder."""

from __future__ import annotations

from training.regions.models import save_instruction_encoder, tiny_t5
from training.world import scenes as world

T5_SEED = 1234


def world_vocabulary() -> list[str]:
    """The words of the world's captions and instructions (the world CLIP's vocabulary)."""
    return world.caption_words()


def build_region_t5(ctx) -> dict:
    """World-model builder (training/world/models.py registers it as ``region_t5``): the tiny T5 folder."""
    encoder = tiny_t5(T5_SEED + ctx.seed, world_vocabulary(), ctx.config)
    save_instruction_encoder(encoder, ctx.folder)
    return {"vocabulary": len(encoder.tokenizer), "width": encoder.width,
            "parameters": sum(p.numel() for p in encoder.model.parameters())}
