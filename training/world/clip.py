"""The world CLIP: a tiny transformers ``CLIPModel`` (vision + text) trained contrastively on world images and their
procedural captions, so that query encoders (LoRWeB, LoRA of Change) and region losses see the world's structure.

The folder it writes is an ordinary transformers CLIP folder (``config.json``, ``model.safetensors``, a word-level
``tokenizer.json``): ``CLIPModel.from_pretrained`` reads it and ``AutoTokenizer.from_pretrained`` its tokenizer; its
``vision/`` sub-folder holds the vision tower alone (``CLIPVisionModelWithProjection``), which the query encoders
load (``query_encoder=world:<world folder>``). Images are preprocessed exactly as everywhere else in the pack
(:func:`analogy_core.analogy.preprocess`: PIL bicubic to 224 px, CLIP mean/std), so the vision tower is 224 px with
28-px patches (8 x 8 patches; one patch = 8 px of a 64-px panel).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import (
    AutoTokenizer,
    CLIPConfig,
    CLIPImageProcessor,
    CLIPModel,
    CLIPVisionModelWithProjection,
    PreTrainedTokenizerFast,
)
from transformers.tokenization_utils_base import BatchEncoding

from analogy_core.analogy import CLIP_MEAN, CLIP_STD
from training.world import scenes as world
from training.world.schedule import warmup_cosine

log = logging.getLogger(__name__)
SPECIALS = ("[PAD]", "[UNK]", "[BOS]", "[EOS]")  # ids 0..3; EOS is not 2, so CLIP pools at the first EOS
MAX_TOKENS = 48
VISION_FOLDER = "vision"  # the vision tower alone (CLIPVisionModelWithProjection), for query encoders


def make_tokenizer():
    """Word-level tokenizer over the world's vocabulary (a ``PreTrainedTokenizerFast``; no download)."""
    vocab = {token: i for i, token in enumerate(SPECIALS)}
    for word in world.caption_words():
        vocab.setdefault(word, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="[BOS] $A [EOS]", special_tokens=[
        ("[BOS]", vocab["[BOS]"]), ("[EOS]", vocab["[EOS]"])])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="[BOS]", eos_token="[EOS]", pad_token="[PAD]",
                                   unk_token="[UNK]", model_max_length=MAX_TOKENS)


def make_model(cfg: dict, vocab_size: int, seed: int):
    torch.manual_seed(seed)
    config = CLIPConfig(
        text_config=dict(vocab_size=vocab_size, hidden_size=cfg["width"], intermediate_size=2 * cfg["width"],
                         num_hidden_layers=cfg["text_layers"], num_attention_heads=cfg["heads"],
                         max_position_embeddings=MAX_TOKENS, pad_token_id=0, bos_token_id=2, eos_token_id=3,
                         projection_dim=cfg["projection_dim"]),
        vision_config=dict(hidden_size=cfg["width"], intermediate_size=2 * cfg["width"],
                           num_hidden_layers=cfg["vision_layers"], num_attention_heads=cfg["heads"], image_size=224,
                           patch_size=28, projection_dim=cfg["projection_dim"]),
        projection_dim=cfg["projection_dim"])
    return CLIPModel(config)


def resized_pool(images: torch.Tensor) -> torch.Tensor:
    """IMAGE batch -> the 224-px uint8 pictures CLIPImageProcessor normalises (its resize and crop, done once)."""
    processor = CLIPImageProcessor(do_resize=True, size={"shortest_edge": 224}, resample=3, do_center_crop=True,
                                   crop_size={"height": 224, "width": 224}, do_rescale=False, do_normalize=False)
    arrays = list((images.clamp(0, 1) * 255).round().to(torch.uint8).numpy())
    pixels = processor(images=arrays, return_tensors="pt")["pixel_values"]
    return pixels.round().clamp(0, 255).to(torch.uint8)


def normalise(pixels: torch.Tensor) -> torch.Tensor:
    """uint8 [B, 3, S, S] -> CLIP input: (x / 255 - mean) / std, as one multiply-add per element."""
    std = torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    scale, offset = 1 / (255 * std), -torch.tensor(CLIP_MEAN).view(1, 3, 1, 1) / std
    return torch.addcmul(offset, pixels.float(), scale)


def world_pool(split: str, count: int, offset: int = 0) -> tuple[torch.Tensor, list[str]]:
    images, captions = zip(*(world.world_image(split, offset + i) for i in range(count)))
    return torch.stack(images), list(captions)


def contrastive_loss(model, pixels: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    out = model(input_ids=ids, attention_mask=mask, pixel_values=pixels, return_dict=True)
    labels = torch.arange(len(ids))
    return (F.cross_entropy(out.logits_per_image, labels) + F.cross_entropy(out.logits_per_text, labels)) / 2


@torch.no_grad()
def retrieval_accuracy(model, tokenizer, images: torch.Tensor, captions: list[str]) -> float:
    """Image -> caption top-1 accuracy among the given captions."""
    model.eval()
    tokens = tokenizer(captions, padding=True, return_tensors="pt")
    out = model(input_ids=tokens.input_ids, attention_mask=tokens.attention_mask,
                pixel_values=normalise(resized_pool(images)), return_dict=True)
    return float((out.logits_per_image.argmax(dim=1) == torch.arange(len(captions))).float().mean())


def tokenize_pool(tokenizer, captions: list[str]) -> BatchEncoding:
    """The pool's captions as padded token ids (``MAX_TOKENS``); refuses a word outside the world vocabulary."""
    tokens = tokenizer(captions, padding="max_length", max_length=MAX_TOKENS, return_tensors="pt")
    if (tokens.input_ids == tokenizer.unk_token_id).any():
        raise RuntimeError("a world caption has a word outside the world vocabulary")
    return tokens


def random_batches(size: int, pool: int) -> Callable[[torch.Generator], torch.Tensor]:
    """The world CLIP's batches: ``size`` pool indices drawn without replacement each step."""
    return lambda gen: torch.randperm(pool, generator=gen)[:size]


def fit_clip(model, pixels: torch.Tensor, tokens: BatchEncoding, cfg: dict, seed: int,
             batches: Callable[[torch.Generator], torch.Tensor] | None = None) -> float:
    """Train ``model`` contrastively on the pool (uint8 ``pixels`` [N, 3, 224, 224], their ``tokens``) for
    ``cfg['steps']`` steps, each on the indices ``batches`` draws (default :func:`random_batches`); the last loss."""
    batches = batches or random_batches(cfg["batch"], len(pixels))
    optimiser = torch.optim.AdamW(model.parameters(), lr=cfg["lr"], weight_decay=0.01)
    steps = cfg["steps"]
    schedule = warmup_cosine(optimiser, steps)
    gen = torch.Generator().manual_seed(seed)
    model.train()
    for step in range(steps):
        pick = batches(gen)
        length = int(tokens.attention_mask[pick].sum(1).max())
        loss = contrastive_loss(model, normalise(pixels[pick]), tokens.input_ids[pick, :length],
                                tokens.attention_mask[pick, :length])
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        schedule.step()
        if step % 100 == 0 or step == steps - 1:
            log.info("clip step %d/%d loss %.3f", step + 1, steps, loss.item())
    return loss.item()


def train_clip(cfg: dict, seed: int, folder: Path) -> dict:
    """Train the world CLIP on ``cfg['pool']`` training-scene images and write it (and its tokenizer) to ``folder``."""
    tokenizer = make_tokenizer()
    model = make_model(cfg, len(tokenizer), seed)
    images, captions = world_pool("train", cfg["pool"])
    loss = fit_clip(model, resized_pool(images), tokenize_pool(tokenizer, captions), cfg, seed)
    metrics = clip_metrics(model, tokenizer, loss, images[:64], captions[:64])
    save_clip(model, tokenizer, folder)
    return metrics


def save_clip(model, tokenizer, folder: Path) -> Path:
    """A world CLIP folder: the CLIPModel and its tokenizer (what the region trainer and ``FrozenClip`` read), and its
    vision tower in ``VISION_FOLDER`` (what query encoders read)."""
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    vision_tower(model).save_pretrained(folder / VISION_FOLDER)
    return folder


def clip_metrics(model, tokenizer, loss: float, train_images: torch.Tensor, train_captions: list[str]) -> dict:
    """The build's record: the last loss, chance, and caption retrieval top-1 among 64 held-out and the given training
    images."""
    held_images, held_captions = world_pool("heldout", 64)
    return {"loss": loss, "chance": 1 / 64,
            "retrieval_top1_heldout_64": retrieval_accuracy(model, tokenizer, held_images, held_captions),
            "retrieval_top1_train_64": retrieval_accuracy(model, tokenizer, train_images, train_captions)}


def vision_tower(model):
    """The CLIP's vision tower and projection as a ``CLIPVisionModelWithProjection`` (what query encoders load)."""
    vision = CLIPVisionModelWithProjection(model.config.vision_config)
    state = {k: v for k, v in model.state_dict().items() if k.startswith(("vision_model.", "visual_projection."))}
    missing, unexpected = vision.load_state_dict(state, strict=False)
    if [k for k in missing if "position_ids" not in k] or unexpected:
        raise RuntimeError(f"vision tower does not fit: {missing[:3]} {unexpected[:3]}")
    return vision.eval()


def load_world_clip(folder: str | Path):
    """(CLIPModel, tokenizer) from a world CLIP folder (local files only)."""
    return (CLIPModel.from_pretrained(folder, local_files_only=True),
            AutoTokenizer.from_pretrained(folder, local_files_only=True))
