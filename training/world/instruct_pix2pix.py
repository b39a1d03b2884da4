"""The world's InstructPix2Pix-like backbone (LoRA of Change's base): a small SD1.5-architecture diffusers
``UNet2DConditionModel`` with InstructPix2Pix's 2x latent input channels, pretrained from scratch to copy and draw the
world, and knowing no edit.

It works in the world autoencoder's latent space (f = 8, 16 channels: an 8 x 8 latent per 64-px panel) with
InstructPix2Pix's conditioning: the latent of the condition image is concatenated to the noisy latent (32 input
channels). DDPM with SD1.5's schedule (scaled-linear betas 0.00085..0.012 over 1000 steps) but v-prediction (as
SD2.x): measured on the quick world, the same UNet after 400 pretraining steps copies held-out images with a mean
error of 0.052 with v-prediction and 0.307 with ε-prediction (autoencoder floor 0.017; DDIM, 10 steps) — a small
ε-model has to cancel x_t against the condition to 1/√(1−ᾱ) precision at low noise. Pretraining, as the other world
backbones are made, on world images (:func:`training.world.scenes.world_image`: plain scenes and global restyles, never
an edit pair):

* **copy**: condition = the image itself, target = the same image: B′ = B, the base answer LoRA of Change edits;
* **generate**: condition = zeros (InstructPix2Pix's dropped image condition), target = a world image (the world's
  prior, so the model can draw colours and shapes it is not shown in the condition).

Text: as the FLUX-like world backbones, a small random frozen CLIP text encoder behind the word-hash tokenizer,
saved with the model; every world run uses the neutral (empty) prompt, so an edit can only come from the analogy.
The condition latent is the world autoencoder's model-space latent (``(z - shift) · scale``, the same as the target),
a convention of this world backbone (SD1.5's InstructPix2Pix conditions on the unscaled VAE mode).

The folder it writes is a diffusers InstructPix2Pix folder without VAE (``unet/``, ``text_encoder/``,
``scheduler/``, ``hash_tokenizer.json``); the autoencoder is the world's (its sibling folder). ``load_ip2p`` in
:mod:`training.loc.ip2p` reads it as ``world:<world folder>``.

The LoRA of Change settings on the world (``LOC_WORLD``) live here too, with the reasons for them.
"""

from __future__ import annotations

import functools
import json
import logging
import math
from pathlib import Path

import torch
from diffusers import DDPMScheduler, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel

from training.backbone import HashTokenizer
from training.loc.ip2p import SD_SCHEDULE, add_noise, load_ip2p, prediction_target
from training.loc.task import edit_images
from training.world.autoencoder import load_world_autoencoder
from training.world.evaluate import mae
from training.world.scenes import NEUTRAL_PROMPT, panel_pool
from training.world.schedule import pretrain_loop, training_metrics, warmup_cosine

log = logging.getLogger(__name__)
MODEL = "instruct_pix2pix"
LATENT_CHANNELS = 16
TEXT_WIDTH = 32
TEXT_TOKENS = 8
TEXT_VOCAB = 1000
TOKENIZER_FILE = "hash_tokenizer.json"
POSITION_CHANNELS_PER_FREQUENCY = 4  # sin and cos of x and of y


def unet_config(cfg: dict) -> dict:
    """SD1.5's block layout at world scale: cross-attention transformer blocks at both latent levels and in the middle
    (attn1 + attn2 each, as SD1.5), InstructPix2Pix's doubled input channels."""
    width = cfg["width"]
    in_channels = 2 * LATENT_CHANNELS + POSITION_CHANNELS_PER_FREQUENCY * cfg["position_frequencies"]
    return dict(sample_size=cfg["panel"] // 8, in_channels=in_channels, out_channels=LATENT_CHANNELS,
                layers_per_block=cfg["layers_per_block"], block_out_channels=(width, 2 * width),
                down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=TEXT_WIDTH,
                attention_head_dim=cfg["head_dim"], norm_num_groups=cfg["groups"],
                transformer_layers_per_block=cfg["transformer_layers"])


def position_channels(frequencies: int, height: int, width: int, like: torch.Tensor) -> torch.Tensor:
    """[1, 4·frequencies, height, width] Fourier features of each latent position: sin and cos of π·k·x and of
    π·k·y for k = 1..frequencies, x and y the cell centres in (-1, 1). cos(π·k·(x + x')) summed over k peaks at
    x' = -x, so a query and key built from these features can find a position's mirror."""
    axes = [(torch.arange(n, device=like.device, dtype=torch.float64) * 2 + 1) / n - 1 for n in (height, width)]
    y, x = torch.meshgrid(*axes, indexing="ij")
    features = []
    for k in range(1, frequencies + 1):
        for coordinate in (x, y):
            features += [torch.sin(torch.pi * k * coordinate), torch.cos(torch.pi * k * coordinate)]
    return torch.stack(features).unsqueeze(0).to(like.dtype)


def _append_positions(conv_in: torch.nn.Module, args: tuple) -> tuple:
    sample = args[0]
    positions = position_channels(conv_in.position_frequencies, *sample.shape[-2:], like=sample)
    return (torch.cat([sample, positions.expand(len(sample), -1, -1, -1)], dim=1), *args[1:])


def add_position_input(unet, frequencies: int) -> None:
    """Give ``unet`` its latent positions: ``conv_in`` sees :func:`position_channels` after the 32 latent channels
    (its config counts them in ``in_channels``; callers still pass noisy latent + condition). A probe of the world
    (``position_frequencies``): an InstructPix2Pix UNet has no position embedding, so a cell's mirror (``hflip``)
    can only be found through its convolutions' zero padding. Measured: it does not make the UNet draw the flip
    (docs/analogy_world_measurements.md, "Does the UNet's flip come with steps, or with positions?")."""
    expected = 2 * LATENT_CHANNELS + POSITION_CHANNELS_PER_FREQUENCY * frequencies
    if frequencies < 1 or unet.config.in_channels != expected:
        raise ValueError(f"position input of {frequencies} frequencies needs a UNet of {expected} input channels "
                         f"(frequencies >= 1), got {unet.config.in_channels}")
    if getattr(unet.conv_in, "position_frequencies", None) is not None:
        raise ValueError("this UNet already has its position input")
    unet.conv_in.position_frequencies = frequencies
    unet.conv_in.register_forward_pre_hook(_append_positions)


def position_frequencies_of(unet) -> int:
    """How many position frequencies a saved world UNet's ``in_channels`` hold beyond the 32 latent channels."""
    extra = unet.config.in_channels - 2 * LATENT_CHANNELS
    if extra < 0 or extra % POSITION_CHANNELS_PER_FREQUENCY:
        raise ValueError(f"a world InstructPix2Pix UNet has {2 * LATENT_CHANNELS} input channels plus "
                         f"{POSITION_CHANNELS_PER_FREQUENCY} per position frequency; this one has "
                         f"{unet.config.in_channels}")
    return extra // POSITION_CHANNELS_PER_FREQUENCY


ATTENTION_POSITIONS_FILE = "attention_positions.json"
ATTENTION_POSITION_SEED = 1009


def attention_position_embedding(frequencies: int, tokens: int, width: int, layer: int,
                                 like: torch.Tensor) -> torch.Tensor:
    """[1, tokens, width]: :func:`position_channels` of a square token grid through a fixed random projection
    (seeded by the layer's index; N(0, 1 / (2·frequencies)), so each channel has unit variance as the LayerNorm'd
    tokens it is added to). Fixed, not learned: it is recomputed on load and no weight is added to the UNet."""
    side = math.isqrt(tokens)
    if side * side != tokens:
        raise ValueError(f"attention positions need a square token grid (a square world panel), got {tokens} tokens")
    return _embedding(frequencies, side, width, layer).to(like.device, like.dtype)


@functools.lru_cache(maxsize=64)
def _embedding(frequencies: int, side: int, width: int, layer: int) -> torch.Tensor:
    # cached: every forward of every self-attention asks for the same few (the hook runs on the training hot path)
    features = position_channels(frequencies, side, side, like=torch.empty(0, dtype=torch.float64))
    features = features.flatten(2).transpose(1, 2)  # [1, tokens, 4·frequencies], row-major as the attention's tokens
    gen = torch.Generator().manual_seed(ATTENTION_POSITION_SEED + layer)
    projection = torch.randn(POSITION_CHANNELS_PER_FREQUENCY * frequencies, width, generator=gen, dtype=torch.float64)
    return features @ projection / math.sqrt(2 * frequencies)


def _add_attention_positions(attention: torch.nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    key = "hidden_states" if not args else None
    hidden = kwargs[key] if key else args[0]
    embedding = attention_position_embedding(attention.position_frequencies, hidden.shape[1], hidden.shape[2],
                                             attention.position_layer, like=hidden)
    if key:
        return args, {**kwargs, key: hidden + embedding}
    return (hidden + embedding, *args[1:]), kwargs


def add_attention_positions(unet, frequencies: int) -> None:
    """Give every self-attention of ``unet`` the absolute position of its tokens: :func:`attention_position_embedding`
    is added to each ``attn1``'s input (after the block's norm, before q, k, v and any LoRA on them; the residual
    stream does not carry it), as a ViT's position embedding. A probe of the world (``attention_positions``): with
    it, q·k can hold cos(π·k·(x + x')), which peaks at a token's mirror — the attention a flip needs. Measured: a
    small gain, not the lever (``hflip`` fully fine-tuned 6,000 steps on the 2,400-step-pretrained 64-wide UNet: 0.91
    of the changed cells with it, 0.80 without; H's rank-4 LoRA 0.08 either way; docs/analogy_world_measurements.md,
    "The flip is the UNet's pretraining and steps")."""
    if frequencies < 1:
        raise ValueError(f"attention positions need at least one frequency, got {frequencies}")
    layers = [m for n, m in unet.named_modules() if n.endswith(".attn1")]
    if not layers:
        raise ValueError("this UNet has no self-attention (.attn1) to give positions")
    for index, attention in enumerate(layers):
        if getattr(attention, "position_frequencies", None) is not None:
            raise ValueError("this UNet already has its attention positions")
        attention.position_frequencies, attention.position_layer = frequencies, index
        attention.register_forward_pre_hook(_add_attention_positions, with_kwargs=True)


def write_attention_positions(folder: Path, frequencies: int) -> None:
    """Record a UNet's attention positions beside it (diffusers' config cannot carry them), for the loader."""
    if frequencies:
        (folder / ATTENTION_POSITIONS_FILE).write_text(json.dumps({"frequencies": frequencies}))


def attention_positions_of(folder: Path) -> int:
    """The attention positions a saved world UNet was built with (0 without the record)."""
    path = folder / ATTENTION_POSITIONS_FILE
    if not path.is_file():
        return 0
    frequencies = json.loads(path.read_text()).get("frequencies")
    if not isinstance(frequencies, int) or isinstance(frequencies, bool) or frequencies < 1:
        raise ValueError(f"{path}: expected {{\"frequencies\": <int >= 1>}}, got {path.read_text()[:200]!r}")
    return frequencies


def text_encoder(seed: int, position_std: float = 0.0):
    """A random, frozen, tiny CLIP text encoder: the world's stand-in for SD1.5's CLIP-L (word-hash tokenizer).

    ``position_std`` > 0 redraws the position embeddings at that scale. At CLIP's initial 0.02 the neutral prompt's
    eight states are near copies of one another (mean cosine 0.99), so every cross-attention reads one constant
    vector and a LoRA on its projections can only add a bias; at 1.0 they differ (mean cosine 0.15) and the
    cross-attention is a small key-value memory an image token can query."""
    if position_std < 0:
        raise ValueError(f"prompt_position_std is a standard deviation (0 keeps CLIP's initialisation), got {position_std}")
    torch.manual_seed(seed)
    model = CLIPTextModel(CLIPTextConfig(vocab_size=TEXT_VOCAB, hidden_size=TEXT_WIDTH, intermediate_size=64,
                                         num_hidden_layers=2, num_attention_heads=2,
                                         max_position_embeddings=TEXT_TOKENS))
    if position_std > 0:
        # ``text_model.embeddings`` before transformers 5, ``embeddings`` since
        position = next(m for n, m in model.named_modules() if n.endswith("embeddings.position_embedding"))
        torch.nn.init.normal_(position.weight, std=position_std)
    return model.eval().requires_grad_(False)


def similarity_attention(unet, gain: float, seed: int) -> None:
    """Start every self-attention as content retrieval: ``to_q`` and ``to_k`` the same random orthogonal map times
    ``gain``, so a token attends to tokens whose features match its own. With diffusers' default initialisation the
    world's tasks (copy, draw) never need attention and it stays uniform (normalised entropy 0.98-0.99 after
    pretraining): every token reads the image's mean, and a LoRA on the attention projections has no per-token path."""
    if gain <= 0:
        raise ValueError(f"self_attention_gain must be > 0 to set the attention (0 in the world's settings skips it), "
                         f"got {gain}")
    gen = torch.Generator().manual_seed(seed)
    for name, module in unet.named_modules():
        if name.endswith(".attn1"):
            weight = torch.empty_like(module.to_q.weight)
            with torch.no_grad():
                torch.nn.init.orthogonal_(weight, gain=gain, generator=gen)
                module.to_q.weight.copy_(weight)
                module.to_k.weight.copy_(weight)


@torch.no_grad()
def self_attention_entropy(unet, latents: torch.Tensor, text: torch.Tensor, alphas: torch.Tensor,
                           timesteps: tuple[int, ...] = (100, 500, 900), seed: int = 0) -> float:
    """Mean normalised entropy (1 = uniform, 0 = one token) of every self-attention map of ``unet`` on ``latents``
    copied at ``timesteps``: how much the UNet's attention depends on the tokens (the attention maps are recomputed
    from each ``attn1``'s own ``to_q``, ``to_k``, heads and scale)."""
    entropies: list[float] = []

    def measure(module, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        batch, tokens, _ = hidden.shape
        q = module.to_q(hidden).view(batch, tokens, module.heads, -1).transpose(1, 2)
        k = module.to_k(hidden).view(batch, tokens, module.heads, -1).transpose(1, 2)
        p = (q @ k.transpose(-1, -2) * module.scale).softmax(dim=-1)
        entropy = -(p * p.clamp_min(1e-12).log()).sum(dim=-1) / torch.log(torch.tensor(float(tokens)))
        entropies.append(float(entropy.mean()))

    hooks = [m.register_forward_pre_hook(measure, with_kwargs=True)
             for n, m in unet.named_modules() if n.endswith(".attn1")]
    gen = torch.Generator().manual_seed(seed)
    try:
        for step in timesteps:
            t = torch.full((len(latents),), step)
            noisy = add_noise(latents, torch.randn(latents.shape, generator=gen), alphas[t].float().view(-1, 1, 1, 1))
            unet(torch.cat([noisy, latents], dim=1), t, encoder_hidden_states=text.expand(len(latents), -1, -1),
                 return_dict=False)
    finally:
        for hook in hooks:
            hook.remove()
    return sum(entropies) / len(entropies)


def pretraining_schedule(optimiser: torch.optim.Optimizer, lr: float, steps: int):
    """The UNet's pretraining schedule: a one-cycle rate peaking at ``lr`` after 5 % of the steps. OneCycleLR cannot
    take a warm-up under two steps (at 20 steps it divides by zero), so a build shorter than 40 steps (a test's or a
    probe's, e.g. ``--world-set instruct_pix2pix.steps=20``) uses the other world models' warm-up + cosine schedule."""
    if steps < 40:
        return warmup_cosine(optimiser, steps)
    return torch.optim.lr_scheduler.OneCycleLR(optimiser, lr, total_steps=steps, pct_start=0.05)


def pretrain(unet, latents: torch.Tensor, text: torch.Tensor, alphas: torch.Tensor, cfg: dict, seed: int) -> list[float]:
    """Copy and generation objectives (MSE of the ``cfg["prediction"]`` target, t uniform over the 1000 steps) on the
    pool's latents [N, 16, h, w]."""
    gen = torch.Generator().manual_seed(seed)
    n_copy, n_gen = cfg["batch_copy"], cfg["batch_generate"]
    weights = torch.cat([torch.ones(n_copy), torch.full((n_gen,), cfg["generate_weight"])])

    def step_loss(step: int) -> torch.Tensor:
        x0 = latents[torch.randint(len(latents), (n_copy + n_gen,), generator=gen)]
        condition = torch.cat([x0[:n_copy], torch.zeros_like(x0[n_copy:])])
        t = torch.randint(0, alphas.shape[0], (len(x0),), generator=gen)
        noise = torch.randn(x0.shape, generator=gen)
        alpha_bar = alphas[t].float().view(-1, 1, 1, 1)
        out = unet(torch.cat([add_noise(x0, noise, alpha_bar), condition], dim=1), t,
                   encoder_hidden_states=text.expand(len(x0), -1, -1), return_dict=False)[0]
        target = prediction_target(x0, noise, alpha_bar, cfg["prediction"])
        per_sample = ((out - target) ** 2).flatten(1).mean(dim=1)
        return (per_sample * weights).sum() / n_copy

    return pretrain_loop(unet, cfg, "instruct_pix2pix", step_loss, log,
                         lambda optimiser, steps: pretraining_schedule(optimiser, cfg["lr"], steps))


@torch.no_grad()
def copy_error(backbone, panel: int, count: int, steps: int, seed: int) -> dict:
    """The base's copying: held-out world images as their own condition, sampled with DDIM (eq. 8 of LoRA of
    Change, no LoRA), against the image; and the autoencoder floor."""
    images = panel_pool(count, panel, "heldout")
    sampled = edit_images(backbone, None, images, steps, seed)
    return {"copy_error_heldout": round(float(mae(sampled, images).mean()), 5),
            "copy_floor_heldout": round(float(mae(backbone.reconstruct(images), images).mean()), 5)}


def build(ctx) -> dict:
    """World model ``instruct_pix2pix``: text encoder, scheduler, the pretrained UNet."""
    cfg, folder = ctx.config, ctx.folder
    encoder = text_encoder(ctx.seed + 31, cfg["prompt_position_std"])
    encoder.save_pretrained(folder / "text_encoder")
    (folder / TOKENIZER_FILE).write_text(json.dumps({"vocab_size": TEXT_VOCAB, "length": TEXT_TOKENS}))
    scheduler = DDPMScheduler(**SD_SCHEDULE, prediction_type=cfg["prediction"])
    scheduler.save_pretrained(folder / "scheduler")
    with torch.no_grad():
        text = encoder(HashTokenizer(TEXT_VOCAB, TEXT_TOKENS)([NEUTRAL_PROMPT]))[0]
    torch.manual_seed(ctx.seed + 32)
    unet = UNet2DConditionModel(**unet_config(cfg))
    if cfg["position_frequencies"]:
        add_position_input(unet, cfg["position_frequencies"])
    if cfg["attention_positions"]:
        add_attention_positions(unet, cfg["attention_positions"])
    if cfg["self_attention_gain"] != 0:
        similarity_attention(unet, cfg["self_attention_gain"], ctx.seed + 34)
    codec = load_world_autoencoder(ctx.dependency("autoencoder"))
    latents = codec.model_latents(panel_pool(cfg["pool"], cfg["panel"]))
    losses = pretrain(unet, latents, text, scheduler.alphas_cumprod.double(), cfg, ctx.seed + 33)
    unet.save_pretrained(folder / "unet")
    write_attention_positions(folder, cfg["attention_positions"])
    backbone = load_ip2p(f"world:{folder}", autoencoder=ctx.dependency("autoencoder"))
    metrics = {**training_metrics(unet, losses),
               "attention_layers": sum(1 for n, _ in unet.named_modules() if n.endswith((".attn1", ".attn2"))),
               "self_attention_entropy": round(self_attention_entropy(
                   unet, codec.model_latents(panel_pool(cfg["eval_images"], cfg["panel"], "heldout")), text,
                   scheduler.alphas_cumprod.double(), seed=ctx.seed), 3)}
    metrics.update(copy_error(backbone, cfg["panel"], count=cfg["eval_images"], steps=cfg["eval_steps"],
                              seed=ctx.seed))
    return metrics


def model_folders(spec: str) -> tuple[Path, Path]:
    """(UNet model folder, autoencoder folder) of a ``world:`` spec's folder: a world folder (``world.json`` or an
    ``instruct_pix2pix`` sub-folder) or the model folder itself (the autoencoder is its sibling)."""
    root = Path(spec)
    model = root / MODEL if (root / "world.json").is_file() or (root / MODEL).is_dir() else root
    autoencoder = model.parent / "autoencoder"
    for path, what in ((model / "unet" / "config.json", "UNet"), (autoencoder / "config.json", "autoencoder")):
        if not path.exists():
            raise FileNotFoundError(f"world InstructPix2Pix backbone {spec}: no {what} at {path}; build the world "
                                    f"with `python -m training.world build --models {MODEL}`")
    return model, autoencoder
