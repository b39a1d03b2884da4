"""A transformers T5 encoder folder (Load Instruction Encoder), read strictly: whatever the folder holds, the result
is the encoder it describes or the caller's error naming the file and what is wrong.

- ``config.json``: strict JSON; each field the encoder uses is checked (type, range) and only those reach
  transformers; every other field is ignored.
- Weights: ``model.safetensors`` (or the shards ``model.safetensors.index.json`` names) through the checked tensor
  reader (:mod:`.files`; no pickle). Every weight of the encoder the config describes must be there with its shape,
  finite and within ±1e4; nothing may be missing (transformers' ``from_pretrained`` would fill it randomly and only
  log it) and nothing unknown. A full T5 checkpoint's decoder and LM head are skipped, not loaded.
- Tokenizer: ``tokenizer.json`` (+ ``tokenizer_config.json``) of a T5-style tokenizer (T5's own, or a plain
  tokenizers one as the analogy world saves): ``<pad>`` and ``</s>`` at the config's ids, every id inside the
  model's vocabulary (another model's tokenizer would index beyond the embedding table).
- A probe instruction runs through the loaded encoder and must give finite features.
"""

from __future__ import annotations

import math
import re
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Mapping

import torch

from .files import (FLOAT_DTYPES, TensorFileError, load_checked_module, read_json_file, read_tensor_file,
                    show_value)

CONFIG = "config.json"
WEIGHTS = "model.safetensors"
INDEX = "model.safetensors.index.json"
TOKENIZER = "tokenizer.json"
TOKENIZER_CONFIG = "tokenizer_config.json"
MAX_WEIGHT_VALUE = 1e4          # trained T5 weights are far below; beyond is damage (and fp16 overflow)
MAX_TOKENIZER_BYTES = 64 * 2**20  # the tokenizer.json of mT5 (250k pieces) is ~16 MB
MAX_EXTRA_IDS = 1000            # T5 has 100 sentinel tokens; the tokenizer makes one per extra id
PROBE = "make the cup on the left red"

_SIZES = {"vocab_size": 2**20, "d_model": 16384, "d_kv": 1024, "d_ff": 2**17, "num_layers": 128, "num_heads": 256}
_ACTIVATIONS = ("relu", "gelu", "gelu_new", "gelu_pytorch_tanh", "silu")
_TOKENIZER_MODELS = ("Unigram", "WordLevel", "BPE", "WordPiece")
_TOKENIZER_CLASSES = ("T5Tokenizer", "T5TokenizerFast", "PreTrainedTokenizerFast", "TokenizersBackend")
_SPECIAL_TOKENS = ("pad_token", "eos_token", "unk_token", "bos_token", "sep_token", "cls_token", "mask_token")
_TOKEN_LISTS = ("additional_special_tokens", "extra_special_tokens")
_DECODER_PART = re.compile(r"decoder\..+|lm_head\.weight")  # in full T5 checkpoints; not the encoder's
_TIED = ("shared.weight", "encoder.embed_tokens.weight")    # one table under two names; files hold either or both


def load_t5_folder(folder: str | Path, error: type[ValueError]) -> tuple[torch.nn.Module, object]:
    """(T5EncoderModel in eval mode, frozen, float32; its tokenizer) of a checked T5 folder. Every problem is an
    ``error`` whose message starts with ``<folder>/<file>`` or ``<folder>``."""
    folder = Path(folder)
    if not folder.is_dir():
        raise error(f"{folder}: no such folder")
    config = t5_config(read_json_file(folder / CONFIG, name=f"{folder.name}/{CONFIG}", error=error),
                       f"{folder.name}/{CONFIG}", error)
    tokenizer = load_tokenizer(folder, config, error)
    model = load_encoder(folder, config, error)
    check_probe(model, tokenizer, folder.name, error)
    return model, tokenizer


# ---------------------------------------------------------------------------------------------------------------------
# config.json


def t5_config(raw: object, where: str, error: type[ValueError]):
    """A ``T5Config`` of the checked fields of a parsed config.json (anything else in it is ignored)."""
    from transformers import T5Config  # transformers is imported when a folder is read, not with the pack (slow)

    if not isinstance(raw, dict):
        raise error(f"{where}: a JSON {type(raw).__name__}, expected an object")
    if raw.get("model_type") != "t5":
        raise error(f"{where}: model_type is {show_value(raw.get('model_type'))}, expected \"t5\" (a T5 encoder "
                    "such as google/flan-t5-base)")
    fields = {key: _integer(raw, key, 1, high, None, where, error) for key, high in _SIZES.items()}
    buckets = _integer(raw, "relative_attention_num_buckets", 4, 1024, 32, where, error)
    # relative positions up to buckets/4 are exact, farther ones binned logarithmically up to max_distance
    distance = _integer(raw, "relative_attention_max_distance", buckets // 4 + 1, 2**20, 128, where, error)
    vocab = fields["vocab_size"]
    fields.update(relative_attention_num_buckets=buckets, relative_attention_max_distance=distance,
                  pad_token_id=_integer(raw, "pad_token_id", 0, vocab - 1, 0, where, error),
                  eos_token_id=_integer(raw, "eos_token_id", 0, vocab - 1, 1, where, error),
                  layer_norm_epsilon=_number(raw, "layer_norm_epsilon", 1e-12, 1.0, 1e-6, where, error),
                  dropout_rate=_number(raw, "dropout_rate", 0.0, 1.0, 0.1, where, error),
                  feed_forward_proj=_activation(raw, where, error))
    return T5Config(**fields, is_encoder_decoder=False, use_cache=False)


def _integer(raw: Mapping, key: str, low: int, high: int, default: int | None, where: str,
             error: type[ValueError]) -> int:
    if key not in raw:
        if default is None:
            raise error(f"{where}: no {key}")
        return default
    value = raw[key]
    if type(value) is not int or not low <= value <= high:  # exact int compare: no float overflow on 10**400
        raise error(f"{where}: {key} is {show_value(value)}, expected an integer in {low}..{high}")
    return value


def _number(raw: Mapping, key: str, low: float, high: float, default: float, where: str,
            error: type[ValueError]) -> float:
    value = raw.get(key, default)
    if type(value) not in (int, float) or not low <= value <= high:  # NaN fails the comparison
        raise error(f"{where}: {key} is {show_value(value)}, expected a number in {low:g}..{high:g}")
    return float(value)


def _activation(raw: Mapping, where: str, error: type[ValueError]) -> str:
    value = raw.get("feed_forward_proj", "relu")
    if not isinstance(value, str) or value.removeprefix("gated-") not in _ACTIVATIONS:
        raise error(f"{where}: feed_forward_proj is {show_value(value)}, expected one of {', '.join(_ACTIVATIONS)}, "
                    "optionally prefixed with 'gated-'")
    return value


# ---------------------------------------------------------------------------------------------------------------------
# weights


def load_encoder(folder: Path, config, error: type[ValueError]) -> torch.nn.Module:
    """The T5EncoderModel of ``config`` holding exactly the folder's encoder weights (checked before it is built)."""
    from transformers import T5EncoderModel  # (slow import, as above)

    files = weight_files(folder, error)
    tensors = read_encoder_tensors(files, folder.name, error)
    where = f"{folder.name}/{files[0].name if len(files) == 1 else INDEX}"
    with torch.device("meta"):
        shell = T5EncoderModel(config)
    tensors = _untie(tensors, shell.state_dict(), where, error)
    try:
        return load_checked_module(lambda: shell, tensors, max_abs=MAX_WEIGHT_VALUE, error=error)
    except error as err:
        raise error(f"{where}: {err} (config.json describes {config.num_layers} layers, d_model {config.d_model}, "
                    f"{config.num_heads} heads of {config.d_kv}, d_ff {config.d_ff}, vocabulary {config.vocab_size})"
                    ) from None


def weight_files(folder: Path, error: type[ValueError]) -> list[Path]:
    """model.safetensors, or the shards model.safetensors.index.json names (plain file names in the folder)."""
    if (folder / INDEX).is_file():
        where = f"{folder.name}/{INDEX}"
        index = read_json_file(folder / INDEX, name=where, error=error)
        weight_map = index.get("weight_map") if isinstance(index, dict) else None
        if not isinstance(weight_map, dict) or not weight_map:
            raise error(f"{where}: expected an object with a non-empty \"weight_map\" of tensor name -> file")
        names = set(weight_map.values())
        bad = [n for n in names if not (isinstance(n, str) and re.fullmatch(r"[\w\-.]+\.safetensors", n)
                                        and not n.startswith("."))]
        if bad:
            raise error(f"{where}: {show_value(bad[0])} is not the name of a .safetensors file in this folder")
        missing = sorted(n for n in names if not (folder / n).is_file())
        if missing:
            raise error(f"{where}: names {len(missing)} missing shard(s), e.g. {missing[0]!r}")
        return [folder / n for n in sorted(names)]
    if (folder / WEIGHTS).is_file():
        return [folder / WEIGHTS]
    raise error(f"{folder.name}: no {WEIGHTS} (nor {INDEX}){_missing_weights_hint(folder)}")


def _missing_weights_hint(folder: Path) -> str:
    """What the folder holds instead, and what to do: shards without their index, a single file of another name (the
    node lists a folder by any .safetensors file in it), or pickle weights only."""
    others = sorted(p.name for p in folder.glob("*.safetensors"))
    shards = [n for n in others if re.search(r"-\d+-of-\d+\.safetensors$", n)]
    pickles = sorted(p.name for p in folder.glob("*") if p.suffix in (".bin", ".pt", ".pth", ".ckpt"))
    if shards:
        return f" ({shards[0]} is a shard: its {INDEX} is missing)"
    if others:
        return f" ({others[0]} is not read under that name: a single weights file must be named {WEIGHTS})"
    if pickles:
        return f" ({pickles[0]} is a pickle, which is never loaded: convert it with save_pretrained)"
    return ""


def _is_encoder_key(key: str) -> bool:
    return key in _TIED or key.startswith("encoder.")


def read_encoder_tensors(files: list[Path], folder_name: str, error: type[ValueError]) -> dict[str, torch.Tensor]:
    """The encoder's tensors of every file (checked structure, float dtypes, finite); refuses unknown keys and
    weights that hold no T5 encoder at all (a LoRA, a basis, no tensors)."""
    tensors: dict[str, torch.Tensor] = {}
    stored: dict[str, str] = {}
    metadata: dict[str, str] = {}
    for path in files:
        where = f"{folder_name}/{path.name}"
        try:
            tf = read_tensor_file(path, "T5 weights file", dtypes=FLOAT_DTYPES, keys=_is_encoder_key)
        except TensorFileError as err:
            raise error(f"{folder_name}/{err}") from None
        foreign = sorted(k for k in tf.stored_dtypes if not (_is_encoder_key(k) or _DECODER_PART.fullmatch(k)))
        if foreign and not tf.tensors:
            raise error(f"{where}: holds no T5 encoder weights ({_describe(tf.stored_dtypes, tf.metadata)})")
        if foreign:
            raise error(f"{where}: {len(foreign)} tensors are not part of a T5 model, e.g. "
                        f"{[k[:80] for k in foreign[:3]]}")
        twice = sorted(stored.keys() & tf.stored_dtypes.keys())
        if twice:
            raise error(f"{where}: tensor {twice[0]!r} is also in another shard")
        tensors.update(tf.tensors)
        stored.update(tf.stored_dtypes)
        metadata.update(tf.metadata)
    if not tensors:
        where = f"{folder_name}/{files[0].name if len(files) == 1 else INDEX}"
        raise error(f"{where}: holds no T5 encoder weights ({_describe(stored, metadata)})")
    return tensors


def _describe(keys: Mapping[str, str], metadata: Mapping[str, str]) -> str:
    if not keys:
        return "no tensors at all"
    kind = metadata.get("analogy.kind")
    if kind or any(k.endswith((".lora_keys", ".att_lora_to_q.weight")) for k in keys):
        return f"it is a {(kind or 'lorweb_basis')[:40]} file of this pack"
    if any(re.search(r"lora_[AB]|lora_(up|down)", k) for k in keys):
        return "it is a LoRA"
    return f"keys look like {[k[:80] for k in sorted(keys)[:3]]}"


def _untie(tensors: dict[str, torch.Tensor], reference: Mapping[str, torch.Tensor], where: str,
           error: type[ValueError]) -> dict[str, torch.Tensor]:
    """The embedding table under every name ``reference`` uses for it; two different tables are refused."""
    present = [tensors[k] for k in _TIED if k in tensors]
    if len(present) == 2 and (present[0].shape != present[1].shape or not torch.equal(present[0], present[1])):
        raise error(f"{where}: {_TIED[0]} and {_TIED[1]} hold two different embedding tables (T5 ties them)")
    out = {k: v for k, v in tensors.items() if k not in _TIED}
    if present:
        out.update({k: present[0] for k in _TIED if k in reference})
    return out


# ---------------------------------------------------------------------------------------------------------------------
# tokenizer


def load_tokenizer(folder: Path, config, error: type[ValueError]):
    """The folder's tokenizer, checked against the model: T5's special ids, every id inside the vocabulary."""
    cls = _tokenizer_class(folder, error)
    if not (folder / TOKENIZER).is_file():
        raise error(f"{folder.name}: no {TOKENIZER} (save the tokenizer with a recent transformers' save_pretrained)")
    _check_tokenizer_json(folder, error)
    with _third_party(f"{folder.name}: cannot read its tokenizer ({TOKENIZER}, {TOKENIZER_CONFIG})", error):
        tokenizer = cls.from_pretrained(folder, local_files_only=True)
        vocab = tokenizer.get_vocab()
        ids = probe_batch(tokenizer)["input_ids"][0].tolist()
        pad, eos = tokenizer.pad_token_id, tokenizer.eos_token_id
    _check_token_ids(f"{folder.name}/{TOKENIZER}", vocab, ids, pad, eos, config, error)
    return tokenizer


def _tokenizer_class(folder: Path, error: type[ValueError]):
    """T5's tokenizer class, or the plain tokenizers one, after checking tokenizer_config.json's fields."""
    import transformers  # (slow import, as above)

    path = folder / TOKENIZER_CONFIG
    raw = read_json_file(path, name=f"{folder.name}/{TOKENIZER_CONFIG}", error=error) if path.is_file() else {}
    where = f"{folder.name}/{TOKENIZER_CONFIG}"
    if not isinstance(raw, dict):
        raise error(f"{where}: a JSON {type(raw).__name__}, expected an object")
    name = raw.get("tokenizer_class", "T5Tokenizer")
    if not (isinstance(name, str) and name in _TOKENIZER_CLASSES):
        raise error(f"{where}: tokenizer_class is {show_value(name)}; an instruction encoder needs T5's tokenizer")
    if "auto_map" in raw:
        raise error(f"{where}: names custom tokenizer code (auto_map), which is never run")
    if raw.get("backend", "tokenizers") != "tokenizers":
        raise error(f"{where}: backend is {show_value(raw.get('backend'))}; only \"tokenizers\" ({TOKENIZER}) is read")
    _check_tokenizer_fields(raw, where, error)
    if name.startswith("T5"):
        return getattr(transformers, "T5TokenizerFast", None) or transformers.T5Tokenizer
    return transformers.PreTrainedTokenizerFast


def _check_tokenizer_json(folder: Path, error: type[ValueError]) -> None:
    """tokenizer.json as strict JSON, with the structure transformers reads itself (the tokenizers library checks
    the rest and its complaints are refusals too)."""
    where = f"{folder.name}/{TOKENIZER}"
    raw = read_json_file(folder / TOKENIZER, name=where, max_bytes=MAX_TOKENIZER_BYTES, error=error)
    model = raw.get("model") if isinstance(raw, dict) else None
    if not (isinstance(model, dict) and model.get("type") in _TOKENIZER_MODELS):
        raise error(f"{where}: expected an object whose \"model\" is a {', '.join(_TOKENIZER_MODELS)} tokenizer model")
    added = raw.get("added_tokens")
    if not (isinstance(added, list) and all(isinstance(t, dict) and type(t.get("id")) is int and t["id"] >= 0
                                            and isinstance(t.get("content"), str) for t in added)):
        raise error(f"{where}: \"added_tokens\" must be a list of objects with an integer id and a string content")


def _check_tokenizer_fields(raw: Mapping, where: str, error: type[ValueError]) -> None:
    extra = raw.get("extra_ids", 0)
    if type(extra) is not int or not 0 <= extra <= MAX_EXTRA_IDS:
        raise error(f"{where}: extra_ids is {show_value(extra)}, expected an integer in 0..{MAX_EXTRA_IDS}")
    for key in _SPECIAL_TOKENS:
        if key in raw and raw[key] is not None and not _is_token(raw[key]):
            raise error(f"{where}: {key} is {show_value(raw[key])}, expected a token (a string)")
    for key in _TOKEN_LISTS:
        value = raw.get(key)
        if value is not None and not (isinstance(value, list) and len(value) <= MAX_EXTRA_IDS
                                      and all(_is_token(v) for v in value)):
            raise error(f"{where}: {key} is {show_value(value)}, expected a list of at most {MAX_EXTRA_IDS} tokens")
    length = raw.get("model_max_length", 512)
    if type(length) not in (int, float) or not length >= 1:
        raise error(f"{where}: model_max_length is {show_value(length)}, expected a positive number")


def _is_token(value: object) -> bool:
    return isinstance(value, str) or (isinstance(value, dict) and isinstance(value.get("content"), str))


def _check_token_ids(where: str, vocab: Mapping[str, int], ids: list[int], pad: int | None, eos: int | None, config,
                     error: type[ValueError]) -> None:
    top = max(vocab.values(), default=-1)
    if not vocab or top >= config.vocab_size or any(not 0 <= i < config.vocab_size for i in ids):
        raise error(f"{where}: token ids reach {max([top, *ids])} but the model has {config.vocab_size} embeddings "
                    "(the tokenizer of another model?)")
    if pad != config.pad_token_id:
        raise error(f"{where}: the padding token has id {pad}, config.json says {config.pad_token_id}; not this "
                    "model's T5 tokenizer")
    if eos != config.eos_token_id or not ids or ids[-1] != eos:
        raise error(f"{where}: an instruction does not end with </s> (id {config.eos_token_id}) as T5's tokenizer "
                    f"ends it (ids {ids[-3:]}, eos {eos})")


@contextmanager
def _third_party(message: str, error: type[ValueError]) -> Iterator[None]:
    """Any exception of a third-party reader (tokenizers raises plain ``Exception``) as ``error(message: ...)``."""
    try:
        yield
    except Exception as err:  # noqa: BLE001 - whatever the bytes make a parser raise is a refusal of the file
        raise error(f"{message}: {type(err).__name__}: {str(err)[:200]}") from None


# ---------------------------------------------------------------------------------------------------------------------
# probe


def probe_batch(tokenizer, max_length: int = 128) -> Mapping[str, torch.Tensor]:
    """The probe instruction tokenized as :meth:`~.regions.InstructionEncoder.encode` tokenizes instructions."""
    return tokenizer([PROBE], padding=True, truncation=True, max_length=max_length, return_tensors="pt")


@torch.no_grad()
def check_probe(model: torch.nn.Module, tokenizer, folder_name: str, error: type[ValueError]) -> None:
    """Run one instruction through the loaded encoder: its features must be finite and differ between tokens."""
    with _third_party(f"{folder_name}: the encoder fails on a probe instruction", error):
        batch = probe_batch(tokenizer)
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
    if not math.isfinite(out.abs().max().item()):
        raise error(f"{folder_name}: the encoder's features of a probe instruction are not finite (weights that "
                    "overflow?)")
    if (out[0] - out[0, :1]).abs().max().item() == 0:
        raise error(f"{folder_name}: the encoder gives every token of a probe instruction the same features (zeroed "
                    "weights?): a region could not depend on the instruction")
