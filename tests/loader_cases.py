"""Every loader of a tensor file, with valid sample contents, for the fuzz test (tests/test_fuzz_loaders.py).

To put a new loader under the fuzz test, append one :class:`LoaderCase` to :data:`LOADER_CASES`:

- ``samples``: a function returning a few valid (tensors, metadata) pairs that ``load`` accepts (small: the fuzz
  test serialises and mutates them thousands of times);
- ``load``: the public loader, called with a path;
- ``errors``: the pack's error classes it may raise (a failure must be one of these, naming the file);
- ``check``: invariants a successful load must satisfy (finite, bounded, usable), asserted on every success;
- ``configs``: header metadata keys that hold a JSON config, which the fuzz test also sweeps field by field.

The T5 folder of Load Instruction Encoder is a folder, not one file: :func:`save_t5_folder` writes a tiny valid one
and :func:`check_t5` checks a loaded encoder (tests/test_fuzz_loaders.py sweeps its files).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Callable

import torch

from analogy_core.analogy import AnalogyEmbedding, EncoderInfo
from analogy_core.lorweb.basis import MAX_ROUTER_VALUE, BasisError, LoRABasis, load_basis, random_basis
from analogy_core.files import MAX_UPDATE_NORM, TensorFileError, low_rank_norm
from analogy_core.fingerprint import FINGERPRINT_KEY, EncoderFingerprint, fingerprint_metadata
from analogy_core.layouts import ModelLayout, standard_layout
from analogy_core.loc import (MAX_PARAMETER_VALUE, HypernetworkConfig, HypernetworkError, LoRAHypernetwork,
                              attention_targets, build_hypernetwork, generate_lora, hypernetwork_metadata,
                              load_hypernetwork)
from analogy_core.lora import LoRA, LoRAError, LoRALayer
from analogy_core.lora_formats import to_state_dict
from analogy_core.lora_io import load_lora_file
from analogy_core.lorweb.settings import OFFICIAL

Sample = tuple[dict[str, torch.Tensor], dict[str, str]]


def recorded_encoder() -> dict[str, str]:
    """The header entry of a training encoder's fingerprint (as every trainer of the pack writes one)."""
    gen = torch.Generator().manual_seed(9)
    return fingerprint_metadata(EncoderFingerprint.of(torch.randn(8, generator=gen), torch.randn(5, 6, generator=gen)))


@dataclass(frozen=True)
class LoaderCase:
    name: str
    samples: Callable[[], list[Sample]]
    load: Callable[[Path], object]
    errors: tuple[type[ValueError], ...]
    check: Callable[[object], None] = field(default=lambda result: None)
    configs: tuple[str, ...] = ()


# -- LoRA files in every key format the reader supports ---------------------------------------------------------------


def _random_lora(family: str, paths: list[str], rank: int, seed: int, scale: float = 0.5) -> LoRA:
    layout = standard_layout(family)
    gen = torch.Generator().manual_seed(seed)
    layers = {}
    for path in paths:
        shape = layout.shapes[path]
        down = torch.randn(rank, shape[1], *shape[2:], generator=gen) * 0.05
        up = torch.randn(shape[0], rank, *([1, 1] if len(shape) == 4 else []), generator=gen) * 0.05
        layers[path] = LoRALayer(down, up, scale)
    return LoRA(layers, family=family)


@lru_cache(maxsize=None)
def lora_samples() -> tuple[Sample, ...]:
    flux = _random_lora("flux", ["transformer_blocks.0.attn.to_q", "transformer_blocks.0.attn.to_k",
                                 "transformer_blocks.0.attn.to_v", "single_transformer_blocks.1.proj_out"], 2, 0)
    sd15 = _random_lora("sd15", ["down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q",
                                 "down_blocks.0.resnets.0.conv1"], 2, 1)
    samples = [to_state_dict(flux, "peft"),       # transformer.<path>.lora_A/B + lora_adapter_metadata (rank/alpha)
               to_state_dict(flux, "kohya"),      # lora_unet_<native FLUX>, fused q/k/v, .alpha
               to_state_dict(flux, "comfyui"),    # diffusion_model.<native>
               to_state_dict(sd15, "kohya")]      # SD1.5 kohya incl. a 3x3 conv
    tensors, meta = to_state_dict(sd15, "peft")   # diffusers peft with the alpha in the header
    samples.append(({k: v.to(torch.float8_e4m3fn) for k, v in tensors.items()}, meta))  # float8 storage
    gen = torch.Generator().manual_seed(2)
    h = 3072
    samples.append(({  # older diffusers attention processors, bf16, no metadata
        "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.processor.to_q_lora.down.weight":
            (torch.randn(2, 320, generator=gen) * 0.05).bfloat16(),
        "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.processor.to_q_lora.up.weight":
            (torch.randn(320, 2, generator=gen) * 0.05).bfloat16(),
    }, {}))
    samples.append(({  # XLabs FLUX
        "double_blocks.0.processor.qkv_lora1.down.weight": torch.randn(2, h, generator=gen) * 0.05,
        "double_blocks.0.processor.qkv_lora1.up.weight": torch.randn(3 * h, 2, generator=gen) * 0.05,
        "single_blocks.1.processor.proj_lora.down.weight": torch.randn(2, 5 * h, generator=gen) * 0.05,
        "single_blocks.1.processor.proj_lora.up.weight": torch.randn(h, 2, generator=gen) * 0.05,
    }, {"ss_base_model_version": "flux1"}))
    return tuple(samples)


def check_lora(parsed) -> None:
    lora = parsed.lora
    assert len(lora) > 0
    for name, layer in lora.layers.items():
        assert layer.rank >= 1, name
        assert torch.isfinite(layer.down.float()).all() and torch.isfinite(layer.up.float()).all(), name
        # bounded norm: every entry of the update is finite (forming 3072-wide updates here would be slow)
        assert low_rank_norm(layer.up, layer.down, layer.scale) <= MAX_UPDATE_NORM * 1.001, name


# -- LoRWeB basis -----------------------------------------------------------------------------------------------------

BASIS_SHAPES = {"transformer_blocks.0.attn.to_q": (32, 32), "single_transformer_blocks.0.proj_out": (32, 160)}


@lru_cache(maxsize=None)
def basis_samples() -> tuple[Sample, ...]:
    basis = random_basis(BASIS_SHAPES, num_entries=3, rank=2, key_dim=8, query_dim=12, seed=0)
    own = basis.with_settings(OFFICIAL)
    meta = {**own.metadata, "analogy.kind": "lorweb_basis", "analogy.family": "flux", "analogy.step": "10",
            **recorded_encoder()}
    half = {k: v.half() for k, v in basis.state_dict().items()}  # the released file: fp16, no metadata
    return (own.state_dict(), meta), (half, {})


def check_basis(basis: LoRABasis) -> None:
    assert basis.num_entries >= 1 and basis.rank >= 1 and basis.key_dim >= 1 and basis.query_dim >= 1
    for layer in basis.layers.values():
        for tensor in (layer.A, layer.B, layer.keys, layer.to_q):
            assert torch.isfinite(tensor.float()).all()
        assert layer.keys.abs().max() <= MAX_ROUTER_VALUE and layer.to_q.abs().max() <= MAX_ROUTER_VALUE
    query = torch.randn(2, basis.query_dim, generator=torch.Generator().manual_seed(0))
    coefficients = basis.coefficients(query)
    assert all(torch.isfinite(c).all() for c in coefficients.values())
    lora = basis.mix(coefficients)
    for layer in lora.layers.values():
        assert torch.isfinite(layer.delta_weight()).all()


LOADER_CASES: list[LoaderCase] = [
    LoaderCase("lora", lambda: list(lora_samples()), load_lora_file, (TensorFileError, LoRAError), check_lora,
               ("lora_adapter_metadata",)),
    LoaderCase("basis", lambda: list(basis_samples()), load_basis, (TensorFileError, BasisError), check_basis,
               ("analogy.lorweb_settings", FINGERPRINT_KEY)),
]


# -- LoRA of Change hypernetwork --------------------------------------------------------------------------------------

LOC_ENCODER = EncoderInfo.describe(4, 6, 224, 32, 2)
LOC_SHAPES = {  # attn1 8 -> 8; attn2 reads a 5-d text context in k and v
    f"down_blocks.0.attentions.0.transformer_blocks.0.attn{n}.{p}": (8, 5 if n == 2 and p in ("to_k", "to_v") else 8)
    for n in (1, 2) for p in ("to_q", "to_k", "to_v", "to_out.0")}


@lru_cache(maxsize=None)
def hypernetwork_samples() -> tuple[Sample, ...]:
    config = HypernetworkConfig(attention_targets(ModelLayout("sd15", LOC_SHAPES)), token_width=6, encoder=LOC_ENCODER,
                                token_count=3, width=8, blocks=1, heads=2, rank=1, ffn=8)
    hypernetwork = build_hypernetwork(config, seed=0)
    with torch.no_grad():
        for _, view in hypernetwork.u_b_parameters():
            view.normal_(generator=torch.Generator().manual_seed(1))
    tensors = {k: v.contiguous() for k, v in hypernetwork.state_dict().items()}
    meta = hypernetwork_metadata(config, {"analogy.step": "5", **recorded_encoder()})
    return (tensors, meta), ({k: v.half() for k, v in tensors.items()}, dict(meta))


def check_hypernetwork(hypernetwork: LoRAHypernetwork) -> None:
    for name, param in hypernetwork.state_dict().items():
        assert torch.isfinite(param).all() and param.abs().max() <= MAX_PARAMETER_VALUE, name
    config = hypernetwork.config
    gen = torch.Generator().manual_seed(0)
    tokens = {r: torch.randn(1, config.token_count or 3, config.token_width, generator=gen) for r in ("a", "a_prime")}
    embeds = {r: torch.randn(1, 4, generator=gen) for r in ("a", "a_prime")}
    encoder = config.encoder or EncoderInfo.describe(4, config.token_width, 224, 32, 2)
    try:
        lora = generate_lora(hypernetwork, AnalogyEmbedding(encoder, embeds, tokens))
    except HypernetworkError:
        return  # a clean refusal of an absurd update is fine
    for name, layer in lora.layers.items():
        assert torch.isfinite(layer.delta_weight()).all(), name


LOADER_CASES.append(LoaderCase("loc_hypernetwork", lambda: list(hypernetwork_samples()), load_hypernetwork,
                               (TensorFileError, HypernetworkError), check_hypernetwork,
                               ("analogy.loc", FINGERPRINT_KEY)))


# -- region predictor (Predict Edit Region's checkpoint) ---------------------------------------------------------------

from dataclasses import asdict  # noqa: E402

from analogy_core import regions  # noqa: E402


@lru_cache(maxsize=None)
def region_samples() -> tuple[Sample, ...]:
    spec = regions.RegionSpec(dim=6, grid=3, image_size=12, text_dim=5, analogy_dim=4, hidden=7,
                              encoder=asdict(EncoderInfo.describe(6, 4, 12, 4, 2)), instruction_encoder="tiny-t5")
    torch.manual_seed(0)
    model = regions.RegionPredictor(spec)
    tensors = {k: v.contiguous() for k, v in model.inference_state_dict().items()}
    text_only = regions.RegionPredictor(regions.RegionSpec(dim=6, grid=3, image_size=12, text_dim=6))  # no projection
    return ((tensors, regions.region_metadata(spec, {"analogy.step": "7", **recorded_encoder()})),
            ({k: v.half() for k, v in text_only.inference_state_dict().items()}, regions.region_metadata(text_only.spec)))


def check_region(model: regions.RegionPredictor) -> None:
    for name, param in model.state_dict().items():
        assert torch.isfinite(param).all() and param.abs().max() <= regions.MAX_PARAMETER_VALUE, name
    spec = model.spec
    gen = torch.Generator().manual_seed(0)
    patches = torch.randn(2, spec.grid ** 2, spec.dim, generator=gen)
    if spec.text_dim:
        assert torch.isfinite(model(patches, "text", torch.randn(2, 3, spec.text_dim, generator=gen)).probs).all()
    if spec.analogy_dim:
        tokens = torch.randn(2, 4, spec.analogy_dim, generator=gen)
        assert torch.isfinite(model(patches, "analogy", tokens, tokens.flip(1)).probs).all()


LOADER_CASES.append(LoaderCase("region_predictor", lambda: list(region_samples()), regions.load_region_predictor,
                               (TensorFileError, regions.RegionError), check_region,
                               (regions.SPEC_KEY, FINGERPRINT_KEY)))


# -- T5 folder (Load Instruction Encoder) --------------------------------------------------------------------------

T5_SIZES = dict(d_model=16, d_kv=4, d_ff=24, num_layers=1, num_heads=2, relative_attention_num_buckets=8,
                relative_attention_max_distance=16, feed_forward_proj="gated-gelu", dropout_rate=0.0)
T5_WORDS = "make it the cup on left right top red blue green add remove a cat hat".split()
T5_TEXTS = ("make the cup red", "add a hat on the left cat")


def t5_tokenizer(words: tuple[str, ...] | list[str] = T5_WORDS, extra_ids: int = 2):
    """A T5 tokenizer (transformers' own class: Unigram pieces, ``</s>`` appended, <pad>=0 </s>=1 <unk>=2)."""
    from transformers import T5Tokenizer

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    pieces += [("\u2581" + w, -1.0 - i / 100) for i, w in enumerate(words)]
    return T5Tokenizer(vocab=pieces, extra_ids=extra_ids)


def t5_model(vocab_size: int, seed: int = 0, **sizes):
    """A random T5 encoder whose features vary from token to token (transformers' init, seeded)."""
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(seed)
    config = T5Config(vocab_size=vocab_size, pad_token_id=0, eos_token_id=1, **{**T5_SIZES, **sizes})
    return T5EncoderModel(config).eval()


def save_t5_folder(folder: Path, seed: int = 0, tokenizer=None, **sizes) -> Path:
    """A tiny T5 folder as save_pretrained writes one (config.json, model.safetensors, tokenizer files)."""
    tokenizer = tokenizer or t5_tokenizer()
    folder.mkdir(parents=True, exist_ok=True)
    t5_model(len(tokenizer), seed, **sizes).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def check_t5(encoder: "regions.InstructionEncoder") -> None:
    """A loaded encoder is usable: finite features of the right width that depend on the words."""
    features, mask = encoder.encode(list(T5_TEXTS))
    assert features.shape[0] == 2 and features.shape[-1] == encoder.width and mask.shape == features.shape[:2]
    assert torch.isfinite(features).all()
    first, second = features[0, mask[0]], features[1, mask[1]]
    assert (first[0] - first[1]).abs().max() > 0, "features do not vary over tokens"
    assert (first[0] - second[0]).abs().max() > 0, "features do not depend on the words"
