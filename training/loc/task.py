"""Train a LoRA of Change hypernetwork on a frozen InstructPix2Pix with Accelerate (paired data only).

    python -m training.train_loc --preset tiny                       # CPU smoke run on the analogy world
    python -m training.train_loc --set data=magicbrush:/data/MagicBrush --set backbone=/models/instruct-pix2pix
    python -m training.train_loc --config stage2.yaml --init-from outputs/loc_stage1/loc_hypernetwork.safetensors
    python -m training.train_loc --config my.yaml --resume           # continue from the newest intact checkpoint

Per sample of a step (the paper's §3.2): the pair (A, A′) is exchanged to (A′, A) with probability 0.5 (random
exchange, which encourages H(A, A′) = −H(A′, A)); B and B′ are one random horizontal flip of A and A′ (the same
flip for both, probability 0.5); H generates the LoRA from the encoder tokens of (A, A′); the frozen UNet, patched
per sample, denoises

    eq. (6):  B′ conditioned on B  with +H(A, A′)
    eq. (7):  B  conditioned on B′ with −H(A, A′)   (LoRA Reverse)

each at its own timestep and noise, summed over the two terms. The paper writes the loss as ‖x0 − Θ(x_t, t, cond,
±H)‖² (Θ = the x0 prediction); since x0 − x̂0 = √((1−ᾱ)/ᾱ)·(ε̂ − ε) for any parametrisation, each term is computed as
a per-sample weight w(t) times the ε-MSE (:func:`loss_weights`): w = 1 (``loss_space: epsilon``, the default: bounded),
(1−ᾱ)/ᾱ (``x0``, the literal eqs. 6-7) or min((1−ᾱ)/ᾱ, ``x0_weight_max``) (``x0_clamped``). Both terms run in one
UNet call (a batch of 2B with LoRAs [+H; −H]). Only H trains; the UNet, VAE, text encoder and image encoder are
frozen.

Text: eqs. 6-8 have none, so by default every prompt is "". With ``text_conditioning`` the instruction
(MagicBrush's ``instruction``) describes A → A′ and conditions only the term that edits in that direction (eq. 6 of a
sample kept as is, eq. 7 of an exchanged one); the other term gets "", and each text is dropped to "" with
probability ``text_dropout``. The random draws are the same with and without text.

Outputs in ``output_dir``: ``loc_hypernetwork.safetensors`` (what Load LoRA Hypernetwork reads),
``checkpoints/step_N`` (for --resume), ``samples/step_N.png`` (A | A′ | B | B′ = H(A, A′) on B | −H(A, A′) on A′),
``logs/`` (TensorBoard). Two-stage training (the paper: a large mixed set, then MagicBrush): ``--init-from`` a
hypernetwork file (or a checkpoint folder) of the same architecture starts a new run from its weights.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from torch import nn

from analogy_core import __version__
from analogy_core.analogy import batch_roles, split_roles
from analogy_core.encoders import ImageEncoder
from analogy_core.files import check_state_dict, read_safetensors, write_safetensors_atomic
from analogy_core.fingerprint import fingerprint_metadata
from analogy_core.layouts import layout_of_diffusers_model
from analogy_core.loc import (
    HypernetworkConfig,
    HypernetworkError,
    LoRAFactors,
    LoRAHypernetwork,
    attention_targets,
    batched_lora,
    build_hypernetwork,
    load_hypernetwork,
    projection_weight_norms,
    save_hypernetwork,
)
from analogy_core.lora_io import save_lora_file
from training.backbone import load_query_encoder
from training.config import without_local_path
from training.loc.config import ENCODER_FILE, HYPERNETWORK_FILE, PLAIN_LORA_FILE, PRESETS, UNET_FILE, LoCConfig
from training.loc.data import make_pair_dataset
from training.loc.plain import PlainLoRA
from training.loc.ip2p import IP2PBackbone, add_noise, ddim_sample, load_ip2p, to_epsilon
from training.trainer import TrainingTask, export_weights, run, save_sample_image, train_every_weight

# ---------------------------------------------------------------------------------------------------------------------
# maths of one step (plain functions of their inputs, so tests can check each against a re-computation)


def exchange_pairs(batch: dict, generator: torch.Generator, probability: float,
                   pairs: tuple[tuple[str, str], ...] = (("a", "a_prime"),)) -> tuple[dict, torch.Tensor]:
    """Random exchange: each sample's (a, a′) becomes (a′, a) with ``probability`` (and every other pair of roles in
    ``pairs`` with the same draw, e.g. (b, b′) of a quad); returns the batch and the mask."""
    swap = torch.rand(len(batch["a"]), generator=generator) < probability
    out = dict(batch)
    view = swap.view(-1, 1, 1, 1)
    for first, second in pairs:
        out[first] = torch.where(view, batch[second], batch[first])
        out[second] = torch.where(view, batch[first], batch[second])
    return out, swap


def dataset_quads(batch: dict) -> dict:
    """``query_source: dataset``: the batch's own b and b′ are B and B′ (checked, since a pair source has none)."""
    missing = [k for k in ("b", "b_prime") if k not in batch]
    if missing:
        raise ValueError(f"query_source: dataset needs quad data (a, a′, b, b′); this batch has no {', '.join(missing)}")
    for key in ("b", "b_prime"):
        if batch[key].shape != batch["a"].shape:
            raise ValueError(f"{key} is {tuple(batch[key].shape)}, expected the shape of a {tuple(batch['a'].shape)}")
    return batch


def paired_quads(batch: dict, generator: torch.Generator, probability: float) -> dict:
    """B, B′ = one random horizontal flip (the same for both) of A, A′ per sample."""
    flip = (torch.rand(len(batch["a"]), generator=generator) < probability).view(-1, 1, 1, 1)
    return dict(batch, b=torch.where(flip, batch["a"].flip(2), batch["a"]),
                b_prime=torch.where(flip, batch["a_prime"].flip(2), batch["a_prime"]))


def term_prompts(prompts: list[str], exchanged: torch.Tensor, dropout: float,
                 generator: torch.Generator) -> tuple[list[str], list[str]]:
    """Texts of eq. 6 and eq. 7 per sample: the instruction (A -> A′) goes to the term that edits in its direction,
    "" to the other; then each is dropped with ``dropout`` (draws: eq. 6 texts, then eq. 7 texts)."""
    forward = [p if not bool(x) else "" for p, x in zip(prompts, exchanged)]
    reverse = [p if bool(x) else "" for p, x in zip(prompts, exchanged)]
    keep = torch.rand(2 * len(prompts), generator=generator) >= dropout
    n = len(prompts)
    return ([p if bool(k) else "" for p, k in zip(forward, keep[:n])],
            [p if bool(k) else "" for p, k in zip(reverse, keep[n:])])


def loss_weights(alpha_bar: torch.Tensor, loss_space: str, x0_weight_max: float = 5.0) -> torch.Tensor:
    """Per-sample weight of the ε-MSE: 1 (``epsilon``), (1 − ᾱ)/ᾱ (``x0``: ‖x0 − x̂0‖² = (1 − ᾱ)/ᾱ · ‖ε − ε̂‖²) or
    that clamped at ``x0_weight_max`` (``x0_clamped``)."""
    if loss_space == "epsilon":
        return torch.ones_like(alpha_bar)
    x0_weight = (1 - alpha_bar) / alpha_bar
    if loss_space == "x0":
        return x0_weight
    if loss_space == "x0_clamped":
        return x0_weight.clamp(max=x0_weight_max)
    raise ValueError(f"unknown loss_space {loss_space!r}")


def encode_pair(encoder: ImageEncoder, a: torch.Tensor, a_prime: torch.Tensor, device) -> tuple[torch.Tensor, ...]:
    """Patch tokens [B, T, W] of A and A′ (frozen encoder, one batched pass)."""
    embedding = encoder.encode(a, a_prime)
    return embedding.patch_tokens["a"].to(device), embedding.patch_tokens["a_prime"].to(device)


class HypernetworkAndEncoder(nn.Module):
    """H and a trainable image encoder E as one module (``image_encoder_learning_rate`` > 0): images in, LoRAs out,
    with gradients through E (transformers CLIP vision models; the same preprocessing and tokens as Encode Analogy)."""

    def __init__(self, hypernetwork: LoRAHypernetwork, encoder: nn.Module):
        super().__init__()
        self.hypernetwork, self.encoder = hypernetwork, encoder

    def forward(self, a: torch.Tensor, a_prime: torch.Tensor) -> LoRAFactors:
        pixels, spans = batch_roles({"a": a, "a_prime": a_prime}, self.encoder.config.image_size)
        param = next(self.encoder.parameters())
        hidden = self.encoder(pixel_values=pixels.to(param.device, param.dtype), output_hidden_states=True)
        tokens = split_roles(hidden.hidden_states[-2].float(), spans)
        return self.hypernetwork(tokens["a"], tokens["a_prime"])


def hypernetwork_of(model: nn.Module) -> LoRAHypernetwork:
    return model.hypernetwork if isinstance(model, HypernetworkAndEncoder) else model


def generate_factors(model: nn.Module, encoder: ImageEncoder, a: torch.Tensor, a_prime: torch.Tensor,
                     device) -> LoRAFactors:
    """H(A, A′) per sample: from frozen encoder tokens, or through E when ``model`` trains E too. A model that does
    not read the pair (``reads_pair`` False: the plain LoRA of the ceiling) gets blank tokens, one per sample, and
    the encoder is not run (the ceiling's step 0.79x as long: bench.ceiling_step)."""
    inner = getattr(model, "module", model)
    if isinstance(inner, HypernetworkAndEncoder):
        return model(a, a_prime)
    if not getattr(inner, "reads_pair", True):
        blank = torch.zeros(len(a), 1, 1, device=device)
        return model(blank, blank)
    return model(*encode_pair(encoder, a, a_prime, device))


def training_loss(hypernetwork: nn.Module, backbone: IP2PBackbone, encoder: ImageEncoder | None, batch: dict,
                  cfg: LoCConfig, generator: torch.Generator, device, parts: dict | None = None) -> torch.Tensor:
    """One micro-batch of eq. (6) + eq. (7). Random draws, in order: exchange (if on), flips (``query_source:
    flips``; with ``dataset`` B and B′ are the batch's b and b′ and there is no flip draw), text dropout (eq. 6
    texts then eq. 7 texts), timesteps (eq. 6 samples then eq. 7), noise ([eq. 6; eq. 7] latents).
    ``parts`` (optional) receives the two terms' values."""
    exchanged = torch.zeros(len(batch["a"]), dtype=torch.bool)
    quads = cfg.query_source == "dataset"
    if quads:
        batch = dataset_quads(batch)
    if cfg.random_exchange:
        pairs = (("a", "a_prime"), ("b", "b_prime")) if quads else (("a", "a_prime"),)
        batch, exchanged = exchange_pairs(batch, generator, cfg.exchange_probability, pairs)
    quad = batch if quads else paired_quads(batch, generator, cfg.flip_probability)
    prompts = list(batch.get("prompt") or [""] * len(batch["a"]))
    if not cfg.text_conditioning:
        prompts = [""] * len(prompts)
    text_6, text_7 = term_prompts(prompts, exchanged, cfg.text_dropout, generator)
    # full_finetune: ``hypernetwork`` is the UNet itself, trained with no LoRA (eq. 6 alone, checked by the config)
    factors = None if cfg.full_finetune else generate_factors(hypernetwork, encoder, quad["a"], quad["a_prime"], device)
    n = len(quad["b"])
    latents, conditions = backbone.encode_images(torch.cat([quad["b"], quad["b_prime"]]))
    (z_b, z_bp), (cond_b, cond_bp) = latents.split(n), conditions.split(n)
    terms = 2 if cfg.lora_reverse else 1
    # eq. 6: target B′, condition B, +H;  eq. 7: target B, condition B′, −H
    x0 = torch.cat([z_bp, z_b][:terms])
    condition = torch.cat([cond_b, cond_bp][:terms])
    loras = factors.cat(factors.scaled(-1.0)) if terms == 2 and factors is not None else factors
    text = backbone.encode_prompts((text_6 + text_7)[: terms * n], device)
    t = torch.randint(0, backbone.num_train_timesteps, (terms * n,), generator=generator)
    noise = torch.randn(x0.shape, generator=generator).to(x0.device, x0.dtype)
    alpha_bar = backbone.alpha_bar(t, x0)
    x_t = add_noise(x0, noise, alpha_bar)
    with batched_lora(backbone.unet, loras):
        output = backbone.unet_output(x_t, condition, t.to(x0.device), text)
    pred = to_epsilon(output.float(), x_t.float(), alpha_bar.float(), backbone.prediction_type)
    weights = loss_weights(alpha_bar.float().flatten(), cfg.loss_space, cfg.x0_weight_max)
    per_sample = ((pred - noise.float()) ** 2).flatten(1).mean(dim=1) * weights
    per_term = [per_sample[k * n:(k + 1) * n].mean() for k in range(terms)]
    if parts is not None:
        parts.update({f"eq{6 + k}": v.detach() for k, v in enumerate(per_term)})
    return sum(per_term)


@torch.no_grad()
def edit_images(backbone: IP2PBackbone, factors: LoRAFactors | None, images: torch.Tensor, steps: int, seed: int,
                prompts: list[str] | None = None) -> torch.Tensor:
    """DDIM (eq. 8) from noise with ``images`` as the InstructPix2Pix condition and one LoRA per image (no CFG)."""
    device = next(backbone.unet.parameters()).device
    z, condition = backbone.encode_images(images)
    text = backbone.encode_prompts(prompts or [""] * len(images), device)
    noise = torch.randn(z.shape, generator=torch.Generator().manual_seed(seed)).to(z.device, z.dtype)
    with batched_lora(backbone.unet, factors):
        latents = ddim_sample(lambda x, t: backbone.predict_x0(x, condition, t, text), noise,
                              backbone.alphas_cumprod, steps)
    return backbone.decode(latents)


@torch.no_grad()
def sample_rows(hypernetwork: LoRAHypernetwork, backbone: IP2PBackbone, encoder: ImageEncoder, batch: dict,
                steps: int, seed: int) -> torch.Tensor:
    """Per item: A | A′ | B (the previous item's A) | H(A, A′) applied to B | −H(A, A′) applied to A′ (LoRA Reverse)."""
    device = next(hypernetwork.parameters()).device
    a, a_prime = batch["a"], batch["a_prime"]
    b = a.roll(1, dims=0) if len(a) > 1 else a.flip(2)
    factors = hypernetwork(*encode_pair(encoder, a, a_prime, device))
    forward = edit_images(backbone, factors, b, steps, seed).cpu()
    reverse = edit_images(backbone, factors.scaled(-1.0), a_prime, steps, seed).cpu()
    return torch.cat([a, a_prime, b, forward, reverse], dim=2)


# ---------------------------------------------------------------------------------------------------------------------
# the task


def hypernetwork_config(cfg: LoCConfig, backbone: IP2PBackbone, encoder: ImageEncoder) -> HypernetworkConfig:
    """H's architecture for this backbone (targets from its layout; with ``update_bound``, its projections' weight
    norms) and encoder (tokens measured once)."""
    layout = layout_of_diffusers_model(backbone.unet)
    targets = attention_targets(layout)
    probe = torch.zeros(1, 8, 8, 3)
    tokens = encoder.encode(probe, probe).patch_tokens["a"]
    bound = {} if cfg.update_bound <= 0 else dict(update_bound=float(cfg.update_bound),
                                                  weight_norms=projection_weight_norms(backbone.unet, targets))
    return HypernetworkConfig(targets=targets, token_width=tokens.shape[-1], encoder=encoder.info,
                              token_count=tokens.shape[1], width=cfg.width, blocks=cfg.blocks, heads=cfg.heads,
                              rank=cfg.rank, ffn=cfg.ffn, family=layout.family, **bound)


def finetuned_weights(unet: nn.Module, scope: str) -> list[str] | None:
    """The UNet parameters a full fine-tune of ``scope`` trains: None (every one) for "unet"; for "attention" the
    weights of every projection H patches (its targets' q/k/v/out, no biases: what a LoRA's ΔW changes)."""
    if scope == "unet":
        return None
    targets = attention_targets(layout_of_diffusers_model(unet))
    return [f"{path}.weight" for target in targets for path in target.projection_paths()]


def initial_weights(path: str, hypernetwork: LoRAHypernetwork) -> dict[str, torch.Tensor]:
    """Weights of a hypernetwork file (same architecture, targets and encoder) or a checkpoint folder."""
    source = Path(path)
    if source.is_dir():
        tensors, _ = read_safetensors(source / "trainable.safetensors")
        return check_state_dict(tensors, hypernetwork.state_dict(), error=HypernetworkError)
    loaded = load_hypernetwork(source)
    if loaded.config != hypernetwork.config:
        raise HypernetworkError(f"--init-from {source.name}: {loaded.config.describe()} does not match this run's "
                                f"{hypernetwork.config.describe()}")
    return loaded.state_dict()


def shareable_config(cfg: LoCConfig) -> dict:
    values = cfg.to_dict()
    values.pop("output_dir", None)
    for key in ("backbone", "image_encoder", "data", "init_from"):
        values[key] = without_local_path(str(values[key]))
    return values


class LoCTask(TrainingTask):
    name = "loc"
    artifact = HYPERNETWORK_FILE
    mode_artifacts = {"plain_lora": PLAIN_LORA_FILE, "full_finetune": UNET_FILE}
    other_artifacts = (ENCODER_FILE,)
    config_cls = LoCConfig
    presets = PRESETS
    description = __doc__

    def build(self) -> nn.Module:
        cfg = self.cfg
        dtype = torch.bfloat16 if cfg.mixed_precision == "bf16" else torch.float16 \
            if cfg.mixed_precision == "fp16" else torch.float32
        self.backbone = load_ip2p(cfg.backbone, dtype, cfg.seed).to(self.device)
        # a full fine-tune reads no pair through H, so it loads no image encoder
        self.encoder = None if cfg.full_finetune else load_query_encoder(cfg.image_encoder, cfg.seed).to(self.device)
        if cfg.gradient_checkpointing:
            self.backbone.unet.enable_gradient_checkpointing()
        if cfg.full_finetune:
            train_every_weight(self.backbone.unet, only=finetuned_weights(self.backbone.unet, cfg.finetune_scope))
            return self.backbone.unet
        if cfg.plain_lora:
            torch.manual_seed(cfg.seed)
            return PlainLoRA(hypernetwork_config(cfg, self.backbone, self.encoder)).to(self.device)
        hypernetwork = build_hypernetwork(hypernetwork_config(cfg, self.backbone, self.encoder), seed=cfg.seed)
        if cfg.init_from:
            hypernetwork.load_state_dict(initial_weights(cfg.init_from, hypernetwork))
        if cfg.image_encoder_learning_rate > 0:
            if self.encoder.kind != "transformers":
                raise ValueError("image_encoder_learning_rate > 0 needs a transformers CLIP vision encoder")
            encoder = self.encoder.model.requires_grad_(True)  # the same module samples read through self.encoder
            return HypernetworkAndEncoder(hypernetwork, encoder).to(self.device)
        return hypernetwork.to(self.device)

    def compile_targets(self, model) -> list[nn.Module]:
        # the UNet does the step's work (H only generates its factors once per pair)
        return [self.backbone.unet]

    def export_companions(self) -> tuple[str, ...]:
        # E trains exactly when its rate is > 0 (the config refuses that rate with plain_lora / full_finetune)
        return (ENCODER_FILE,) if self.cfg.image_encoder_learning_rate > 0 else ()

    def optimizer_groups(self, model):
        if not isinstance(model, HypernetworkAndEncoder):
            return None
        return [{"params": list(model.hypernetwork.parameters())},
                {"params": list(model.encoder.parameters()), "lr": self.cfg.image_encoder_learning_rate}]

    def dataset(self):
        cfg = self.cfg
        return make_pair_dataset(cfg.data, cfg.resolution, cfg.image_fit, cfg.magicbrush_split,
                                 cfg.world_instructions, quads=cfg.query_source == "dataset")

    def loss(self, model, batch, generator):
        return training_loss(model, self.backbone, self.encoder, batch, self.cfg, generator, self.device)

    def export(self, model, path: Path, step: int) -> None:
        cfg = self.cfg
        if isinstance(model, HypernetworkAndEncoder):
            state = {k: v.detach().float().cpu().contiguous() for k, v in model.encoder.state_dict().items()}
            write_safetensors_atomic(state, path.with_name(ENCODER_FILE), {"analogy.kind": "loc_image_encoder",
                                                                          "analogy.step": str(step)})
        metadata = {"analogy.backbone": without_local_path(cfg.backbone),
                    "analogy.encoder_spec": without_local_path(cfg.image_encoder), "analogy.step": str(step),
                    "analogy.pack_version": __version__, "analogy.config": json.dumps(shareable_config(cfg))}
        if isinstance(model, PlainLoRA):
            save_lora_file(model.lora(metadata), path)
            return
        if cfg.full_finetune:
            export_weights(model, path, {**metadata, "analogy.kind": "loc_unet"})
            return
        # the encoder's fingerprint as of this step (a trained E moves it): Generate LoRA tells E from stock CLIP
        fingerprint = fingerprint_metadata(self.encoder.fingerprint())
        save_hypernetwork(hypernetwork_of(model), path, {**metadata, **fingerprint})

    def summary(self, model) -> str:
        count = sum(p.numel() for p in model.parameters() if p.requires_grad)
        if self.cfg.full_finetune:
            scope = "" if self.cfg.finetune_scope == "unet" else ", attention projections only"
            return (f"full fine-tune of the InstructPix2Pix UNet (no LoRA{scope}): {count / 1e6:.2f}M trainable "
                    "parameters")
        if isinstance(model, PlainLoRA):
            config = model.config
            return (f"plain LoRA (one for every pair, no hypernetwork) for {config.family}: {config.num_layers} "
                    f"attention layers × q/k/v/out, rank {config.rank}; {count / 1e6:.2f}M trainable parameters")
        return f"{hypernetwork_of(model).config.describe()}; {count / 1e6:.2f}M trainable parameters"

    def write_samples(self, model, batch, step: int, folder: Path) -> None:
        if self.cfg.full_finetune:  # the fine-tuned UNet edits B with no LoRA: A | A′ | B | its B′
            b = batch["a"].roll(1, dims=0) if len(batch["a"]) > 1 else batch["a"].flip(2)
            edited = edit_images(self.backbone, None, b, self.cfg.sample_steps, self.cfg.seed).cpu()
            rows = torch.cat([batch["a"], batch["a_prime"], b, edited], dim=2)
            save_sample_image(torch.cat(list(rows), dim=0), folder, step)
            return
        rows = sample_rows(hypernetwork_of(model), self.backbone, self.encoder, batch, self.cfg.sample_steps,
                           self.cfg.seed)
        save_sample_image(torch.cat(list(rows), dim=0), folder, step)


def translate_argv(argv: list[str]) -> list[str]:
    """``--init-from PATH`` (this trainer's flag) -> ``--set init_from=PATH`` for the shared command line."""
    out, items = [], iter(argv)
    for item in items:
        if item == "--init-from":
            value = next(items, None)
            if value is None:
                raise SystemExit("--init-from needs a hypernetwork file or checkpoint folder")
            out += ["--set", f"init_from={value}"]
        elif item.startswith("--init-from="):
            out += ["--set", f"init_from={item.split('=', 1)[1]}"]
        else:
            out.append(item)
    return out


def main(argv=None) -> dict:
    return run(LoCTask, translate_argv(list(sys.argv[1:] if argv is None else argv)))

