"""The frozen encoders of the region trainer: a CLIP (vision + text) and a T5 instruction encoder.

``clip`` / ``instruction_encoder`` specs: a local transformers folder or a model id already in the Hugging Face cache
(``local_files_only``: nothing is downloaded; safetensors only), ``"world"`` / ``"world:<folder>"`` (the analogy world's CLIP and
instruction T5: the full world of seed 0, built or reused, or a built world folder) or ``"tiny"``
(random small models with a word-level tokenizer, for tests and smoke runs).
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from huggingface_hub import snapshot_download
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
from transformers import CLIPConfig, CLIPModel, PreTrainedTokenizerFast, T5Config, T5EncoderModel

from analogy_core.regions import FrozenClip, InstructionEncoder
from training.model_specs import registered_loader

SPECIAL = ("<pad>", "</s>", "<unk>")
TINY_CLIP = dict(text=dict(vocab_size=0, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                           num_attention_heads=2, max_position_embeddings=64),
                 vision=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                             image_size=32, patch_size=8),
                 projection_dim=16)
TINY_T5 = dict(d_model=24, d_kv=8, d_ff=48, num_layers=1, num_heads=3, relative_attention_num_buckets=8,
               relative_attention_max_distance=16, feed_forward_proj="gated-gelu", dropout_rate=0.0)
TINY_WORDS = ("a picture of the make it red blue green white black add remove change turn cat dog hat square disc "
              "triangle at top bottom left right centre middle small large on background objects object colour")


def words_of(texts: list[str]) -> list[str]:
    return sorted({w for text in texts for w in re.findall(r"[a-z0-9'-]+", text.lower())})


def word_tokenizer(words: list[str]):
    """A lower-casing word-level tokenizer (transformers ``PreTrainedTokenizerFast``) over ``words``, ending every
    sequence with ``</s>``; unknown words become ``<unk>``."""
    vocab = {token: i for i, token in enumerate(SPECIAL)}
    for word in words:
        vocab.setdefault(word, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", vocab["</s>"])])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")


def _randomise(module: torch.nn.Module, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in module.named_parameters():
            if param.ndim >= 2:
                param.copy_(torch.randn(param.shape, generator=gen) / param.shape[-1] ** 0.5)
            elif "bias" in name:
                param.zero_()
            else:
                param.fill_(1.0)


def tiny_clip(seed: int = 0, words: list[str] | None = None) -> FrozenClip:
    tokenizer = word_tokenizer(words or TINY_WORDS.split())
    text = dict(TINY_CLIP["text"], vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
                eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.eos_token_id)
    config = CLIPConfig(text_config=text, vision_config=TINY_CLIP["vision"], projection_dim=TINY_CLIP["projection_dim"])
    model = CLIPModel(config)
    _randomise(model, seed)
    return FrozenClip(model, tokenizer)


def tiny_t5(seed: int = 0, words: list[str] | None = None, config: dict | None = None) -> InstructionEncoder:
    tokenizer = word_tokenizer(words or TINY_WORDS.split())
    model = T5EncoderModel(T5Config(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
                                    eos_token_id=tokenizer.eos_token_id, **(config or TINY_T5)))
    _randomise(model, seed)
    return InstructionEncoder(model, tokenizer, "tiny-t5")


def save_instruction_encoder(encoder: InstructionEncoder, folder: str | Path) -> Path:
    """A T5 folder the Load Instruction Encoder node and :meth:`InstructionEncoder.from_folder` read."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    encoder.model.save_pretrained(folder, safe_serialization=True)
    encoder.tokenizer.save_pretrained(folder)
    return folder


def load_clip(spec: str, seed: int = 0) -> FrozenClip:
    if spec == "tiny":
        return tiny_clip(seed)
    if registered := registered_loader("clip", spec):
        return registered()
    return FrozenClip.from_folder(_local(spec))


def load_instruction_encoder(spec: str, seed: int = 0) -> InstructionEncoder:
    if spec == "tiny":
        return tiny_t5(seed + 1)
    if registered := registered_loader("instruction_encoder", spec):
        return registered()
    return InstructionEncoder.from_folder(_local(spec))


def _local(spec: str) -> str:
    """A folder, or a model id resolved in the local Hugging Face cache only."""
    if Path(spec).is_dir():
        return spec
    try:
        return snapshot_download(spec, local_files_only=True)
    except Exception as err:  # noqa: BLE001 - not cached / not a valid id
        raise FileNotFoundError(f"{spec!r} is neither a folder nor a model in the local Hugging Face cache (nothing "
                                f"is downloaded at run time; fetch it yourself first): {err}") from None
