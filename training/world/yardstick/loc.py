"""LoRA of Change on the analogy world: its world settings, training runs, and the yardstick's figures (``loc`` row
of ``bench.analogy_world``).

Training runs ``training.train_loc`` itself (the shared skeleton) on the world's InstructPix2Pix-like backbone
(world model ``instruct_pix2pix``) with the world CLIP as image encoder and ``data: world`` — *paired* data only, as
the paper trains: pairs (A, A′) of the training families on training scenes, B and B′ made from them by flips. The
hypernetwork file it writes is loaded back with the node's own loader, so the yardstick measures the file a user gets.

Evaluation on held-out scenes of every family (quads the trainer never saw: A, A′ and B are different scenes): B′ is
sampled with DDIM (eq. 8) from the backbone patched with H(A, A′), B as the InstructPix2Pix condition; ``base`` is
the same sampler without the LoRA. ``extra`` holds:

* ``consistency_gap_*`` — ‖H(A, A′) + H(A′, A)‖ / ‖H(A, A′)‖ (mean over the training families' examples) after
  training and at an early checkpoint (``_early``, after ``EARLY`` of the steps), for the run with random exchange
  (the default) and, with ``--diagnostics``, a run without it (``_no_exchange``; same steps and seed; every
  ``*_no_exchange`` figure comes from that run and is absent without it). At initialisation the gap is undefined:
  eq. 11 makes H(A, A′) exactly zero (``consistency_gap_init`` is null for that reason);
* per family (``*_by_family``, every family) and as a claim (``consistency_gap_claim*``, ``direction_cosine*``: mean
  over the training families that are not self-inverse): the gap, and the direction-aware ``direction_cosine`` —
  the cosine of H(A′, A) − H̄ with −(H(A, A′) − H̄), H̄ the mean generated LoRA (:func:`~analogy_core.loc.
  exchange_scores`). A self-inverse edit (``SELF_INVERSE``: invert, hflip, vflip; f(f(x)) = x) is its own inverse,
  so its LoRA can rightly satisfy H(A′, A) = H(A, A′) (gap 2): those families are left out of the claim. At
  initialisation both are undefined (zero LoRA); ``*_init`` gives them for the fresh H with its zero U_B half
  replaced by random values (both scores are scale-invariant): the chance level a trained H is compared with;
* ``input_dependence_init`` / ``input_dependence`` — the fraction of the generated U_A that varies with (A, A′)
  (:func:`~analogy_core.loc.input_dependence`) for the fresh H and after training;
* ``relative_update_median`` / ``relative_update_max`` (and ``_no_exchange``) — ‖ΔW_p‖ / ‖W_p‖ of the generated
  LoRAs for the training families' held-out pairs, median and largest over pairs and projections: how far H's
  update moves the weights it patches (a plain LoRA ceiling taught one family moves them 0.26-0.44);
* ``reverse_*`` — LoRA Reverse undoing the edit: −H(A, A′) applied with the true B′ as the condition, against B
  (``reverse_error_<split>``), next to doing nothing (``reverse_no_edit_<split>`` = |B′ − B|);
* the no-exchange run's own B′ error ratio, training time and losses (``--diagnostics``);
* ``family_share_*`` — how much of the spread of what H reads (A′'s tokens minus A's) and of what it generates
  (every ΔW) lies between the training families, next to what random labels give (:func:`family_figures`);
* ``image_encoder_trained`` — whether the runs trained the image encoder E with H (``--row-set
  image_encoder_learning_rate=…``, the paper optimises E too): every figure of a run then reads its tokens through
  that run's own E (the file beside its hypernetwork, or E's weights in a checkpoint), never the frozen world CLIP.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import torch

from analogy_core.encoders import ImageEncoder
from analogy_core.files import check_state_dict, read_safetensors
from analogy_core.layouts import layout_of_diffusers_model
from analogy_core.loc import (HypernetworkError, LoRAHypernetwork, build_hypernetwork, consistency_gap,
                              exchange_scores, generated_updates, input_dependence, load_hypernetwork,
                              pair_dependence, relative_update_norms)
from training import checkpoints as ckpt
from training.backbone import load_query_encoder
from training.loc.config import ENCODER_FILE, HYPERNETWORK_FILE, PLAIN_LORA_FILE, UNET_FILE
from training.loc.ip2p import load_ip2p
from training.loc.plain import load_plain_lora
from training.loc.task import edit_images, encode_pair
from training.world import scenes as world
from training.world.evaluate import mae, stack
from training.world.presets import run_trainer
from training.world.yardstick.common import (Ceiling, Curve, CurveSampler, MethodOutput, RunMismatch, load_weights,
                                             losses_from_log, pretraining_rate, world_of_spec)

PANEL = 64
EARLY = 0.1
SELF_INVERSE = ("invert", "hflip", "vflip")  # world families with f(f(x)) = x (channel_swap is a 3-cycle)
# Why these values: 64-px panels (the world's panel); H as the paper (M = 6 decoder blocks, 8 heads) at width 128
# instead of 512 (the world's tokens are 64-d and its UNet 64/128 wide; 512 would make H 6x the backbone on 2 CPU
# cores), rank 4 (the pack's default); paired world data with no text (the trainer's default: the edit can only come
# from the pair); the trainer's default loss (eqs. 6-7 as ε-MSE, bounded weights); AdamW at 1e-4 in float32; DDIM
# with 20 steps for samples and evaluation. Why 1e-4: each U_B entry is a head output summing `width` decoder
# features, so Adam moves it up to ~width x lr per step (a plain LoRA's up entry: lr). At 1e-3 (this row until
# 2026-12-03) H's updates grew to a median 27x the norm of the weights they patch (with or without exchange, LoRA
# Reverse or quads) and the loss did not fall; at 1e-4 they stay near the weights' size (median 0.7) and the loss
# falls (0.56 -> 0.29). The paper's 1e-5 (width 512) gives 0.21 and the same B′ figures (README, LoRA of Change).
LOC_WORLD: dict[str, object] = dict(
    data="world", resolution=PANEL, rank=4, width=128, blocks=6, heads=8, ffn=512, batch_size=8, max_steps=1500,
    learning_rate=1e-4, weight_decay=0.0, mixed_precision="no", gradient_checkpointing=False, text_dropout=0.0,
    num_workers=0, checkpoint_every=150, keep_checkpoints=100, sample_every=1500, sample_steps=20,
    log_every=50, report_to="none")
PLAIN_LORA_RATE = 1e-3  # the LoRA ceiling's rate (every ceiling figure in the README was measured at it)
LOC_WORLD_QUICK: dict[str, object] = {**LOC_WORLD, "max_steps": 300, "checkpoint_every": 30, "sample_every": 300}


def loc_settings(world_root: str | Path, quick: bool = False) -> dict[str, object]:
    """The full key -> value settings of a world run (backbone and image encoder included)."""
    spec = f"world:{world_root}"
    return {"backbone": spec, "image_encoder": spec, **(LOC_WORLD_QUICK if quick else LOC_WORLD)}


def train_loc(world_root: str | Path, out: Path, quick: bool = False, seed: int = 0,
              overrides: dict[str, object] | None = None, resume: bool = False) -> float:
    """LoC's world preset through :func:`training.world.presets.run_trainer`; returns the seconds it took."""
    return run_trainer("training.train_loc", {**loc_settings(world_root, quick), "seed": seed, **(overrides or {})},
                       out, resume=resume)


def loc_ceiling_settings(world_root: str | Path, family: str, quick: bool = False, seed: int = 0) -> dict[str, object]:
    """The settings of LoC's LoRA ceiling for one family: the row's settings and steps, with one plain LoRA of H's
    rank in H's place (:mod:`training.loc.plain`) trained with eq. (6) alone on ``family`` alone (no LoRA Reverse, no
    exchange: a plain LoRA taught one direction has no reverse to learn), at PLAIN_LORA_RATE: a plain LoRA's entries
    are its parameters, so it keeps the rate H's fan-in made too fast for H (see LOC_WORLD)."""
    settings = loc_settings(world_root, quick)
    steps = settings["max_steps"]
    return {**settings, "learning_rate": PLAIN_LORA_RATE, "plain_lora": True, "lora_reverse": False,
            "random_exchange": False,
            "data": f"world:families={family}", "seed": seed, "checkpoint_every": steps, "sample_every": steps}


def plain_lora_b_prime(backbone, folder: Path, items: list, steps: int, seed: int) -> torch.Tensor:
    """B′ of ``items`` with the plain LoRA file a run wrote in ``folder`` (read back through the pack's LoRA reader),
    sampled as the row samples (DDIM from noise, B as the condition)."""
    factors = load_plain_lora(folder / PLAIN_LORA_FILE, layout_of_diffusers_model(backbone.unet))
    return edit_images(backbone, factors, stack(items, "b"), steps, seed)


def ceiling_b_prime(world, quick: bool, folder: Path, items: list, seed: int) -> torch.Tensor:
    """The ceiling's B′ on the world's InstructPix2Pix with the row's sampling steps and seed."""
    steps = int(loc_settings(world.root, quick)["sample_steps"])
    return plain_lora_b_prime(load_ip2p(world.spec), folder, items, steps, seed)


def full_ceiling_settings(world, quick: bool, family: str, seed: int) -> dict:
    """The same run training every weight of the UNet (no LoRA) at the backbone's own pretraining rate."""
    return {**loc_ceiling_settings(world.root, family, quick, seed), "plain_lora": False, "full_finetune": True,
            "learning_rate": pretraining_rate(world, "instruct_pix2pix")}


def full_ceiling_b_prime(world, quick: bool, folder: Path, items: list, seed: int) -> torch.Tensor:
    """B′ of ``items`` from the UNet a ``full_finetune`` run wrote, sampled as the row samples (no LoRA)."""
    backbone = load_ip2p(world.spec)
    load_weights(backbone.unet, folder / UNET_FILE)
    steps = int(loc_settings(world.root, quick)["sample_steps"])
    return edit_images(backbone, None, stack(items, "b"), steps, seed)


_MODELS = ("autoencoder", "clip", "instruct_pix2pix")
CEILING = Ceiling("training.train_loc", _MODELS,
                  lambda world, quick, family, seed: loc_ceiling_settings(world.root, family, quick, seed),
                  ceiling_b_prime,
                  full=Ceiling("training.train_loc", _MODELS, full_ceiling_settings, full_ceiling_b_prime,
                               shared_as="loc_full"))


def load_run_model(path: Path, template, encoder: ImageEncoder | None,
                   trained_encoder: bool) -> tuple[LoRAHypernetwork, ImageEncoder | None]:
    """H and the image encoder its tokens come from, as a run left them at ``path``: the hypernetwork file it wrote
    (the final one or a step export) or a checkpoint folder (``template``: H's architecture). A run that trained E
    (``image_encoder_learning_rate`` > 0, ``trained_encoder``) wrote E beside each file
    (``loc_image_encoder.safetensors``, or its step copy) and saved H and E as one module in its checkpoints: then
    the world encoder ``encoder`` comes back holding the run's E, since H read E's tokens, not the frozen world
    CLIP's. Otherwise ``encoder`` comes back as it is."""
    if path.is_dir():
        tensors, _ = read_safetensors(path / ckpt.TRAINABLE_FILE)
        if trained_encoder:  # the checkpoint of H and E as one module (training.loc.task.HypernetworkAndEncoder)
            encoder_state = {k[len("encoder."):]: v for k, v in tensors.items() if k.startswith("encoder.")}
            tensors = {k[len("hypernetwork."):]: v for k, v in tensors.items() if k.startswith("hypernetwork.")}
        model = copy.deepcopy(template)
        model.load_state_dict(check_state_dict(tensors, model.state_dict(), error=HypernetworkError))
        model.eval()
    else:
        model = load_hypernetwork(path)
        encoder_file = ckpt.companion_path(path, HYPERNETWORK_FILE, ENCODER_FILE)
        encoder_state = read_safetensors(encoder_file)[0] if trained_encoder and encoder_file.is_file() else {}
    if not trained_encoder:
        return model, encoder
    if not encoder_state:
        raise HypernetworkError(f"{path}: the run trained its image encoder (image_encoder_learning_rate > 0) but "
                                f"its trained encoder is not there ({ENCODER_FILE} or its step copy beside the file, "
                                f"or encoder.* in a checkpoint); its H cannot be measured with the frozen world CLIP")
    return model, with_weights(encoder, encoder_state)


def with_weights(encoder: ImageEncoder, state: dict[str, torch.Tensor]) -> ImageEncoder:
    """A copy of ``encoder`` holding ``state`` (a trained E, checked key for key and shape for shape)."""
    trained = copy.deepcopy(encoder)
    trained.model.load_state_dict(check_state_dict(state, trained.model.state_dict(), error=HypernetworkError))
    return trained


def checkpoint_at(run: Path, fraction: float) -> Path:
    """The checkpoint folder nearest to ``fraction`` of the run's steps."""
    found = ckpt.list_checkpoints(run / "checkpoints")
    if not found:
        raise FileNotFoundError(f"{run}: no checkpoints")
    last = max(c.step for c in found)
    return min(found, key=lambda c: abs(c.step - fraction * last)).path


@torch.no_grad()
def tokens(encoder, items: list[world.Example]) -> tuple[torch.Tensor, torch.Tensor]:
    return encode_pair(encoder, stack(items, "a"), stack(items, "a_prime"), "cpu")


def mean_gap(hypernetwork, encoder, examples: dict[str, list], families: list[str]) -> float | None:
    gaps = torch.cat([consistency_gap(hypernetwork, *tokens(encoder, examples[f])) for f in families])
    return None if torch.isnan(gaps).any() else round(float(gaps.mean()), 4)


def direction_figures(hypernetwork, encoder, examples: dict[str, list], tag: str) -> dict[str, object]:
    """Per-family gap and direction cosine, and their means over the training families that are not self-inverse."""
    by_family = {f: exchange_scores(hypernetwork, *tokens(encoder, items)) for f, items in examples.items()}
    claim = [f for f in examples if world.get_family(f).split == "train" and f not in SELF_INVERSE]
    out: dict[str, object] = {}
    for key, name in (("gap", "consistency_gap"), ("cosine", "direction_cosine")):
        values = {f: float(scores[key].mean()) for f, scores in by_family.items()}
        out[f"{name}_by_family{tag}"] = {f: round(v, 4) for f, v in values.items()}
        out[f"{'consistency_gap_claim' if key == 'gap' else name}{tag}"] = round(
            sum(values[f] for f in claim) / len(claim), 4)
    return out


def family_share(values: torch.Tensor, labels: list[str]) -> float | None:
    """The share of the spread of ``values`` [N, D] around their mean that lies between the families ``labels``
    (R² of a one-way analysis of variance): Σ_f n_f ‖μ_f − μ‖² / Σ_i ‖x_i − μ‖². 1: each family is one point, what
    varies is the family; near (F − 1) / (N − 1) for F families of N values: no more than labels drawn at random.
    None where every value is the same (no spread to share)."""
    values = values.double().flatten(1)
    centred = values - values.mean(dim=0)
    total = float(centred.square().sum())
    if total == 0:
        return None
    between = 0.0
    for family in dict.fromkeys(labels):
        rows = [i for i, label in enumerate(labels) if label == family]
        between += len(rows) * float(centred[rows].mean(dim=0).square().sum())
    return between / total


def family_share_chance(labels: list[str]) -> float:
    """What :func:`family_share` gives, on average, for values with no family in them (independent noise): the
    between-family share of a one-way analysis of variance has mean (F − 1) / (N − 1) for F families of N values."""
    return (len(set(labels)) - 1) / (len(labels) - 1)


def family_figures(runs: dict[str, tuple], world_encoder, fresh, examples: dict[str, list]) -> dict[str, object]:
    """How much of what H reads and of what it generates tells the training families apart, on held-out pairs:
    ``family_share_pair_tokens`` of A′'s tokens minus A's (through the world CLIP; ``_trained_encoder<tag>`` through
    a run's own E), ``family_share_updates<tag>`` of the generated ΔW of each run's H, ``_init`` of the fresh H
    with its U_B made random, and ``family_share_chance``: what random labels give. An H whose updates share less
    than its tokens has not learnt to carry the difference it is given. ``update_dependence<tag>``: the share of
    the generated ΔW that varies with the pair at all (:func:`pair_dependence`; the rest every pair gets alike)."""
    labels = [f for f, items in examples.items() for _ in items]
    token_pairs: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def pair(encoder) -> tuple[torch.Tensor, torch.Tensor]:  # (A tokens, A′ tokens) of every pair, once per encoder
        if id(encoder) not in token_pairs:
            token_pairs[id(encoder)] = tuple(torch.cat(t) for t in zip(*(tokens(encoder, items)
                                                                          for items in examples.values())))
        return token_pairs[id(encoder)]

    def updates(hypernetwork, encoder) -> torch.Tensor:
        with torch.no_grad():
            return generated_updates(hypernetwork(*pair(encoder)))

    def share(values: torch.Tensor) -> float | None:
        value = family_share(values, labels)
        return None if value is None else round(value, 4)

    a, a_prime = pair(world_encoder)
    out: dict[str, object] = {"family_share_chance": round(family_share_chance(labels), 4),
                              "family_share_pair_tokens": share(a_prime - a),
                              "family_share_updates_init": share(updates(fresh, world_encoder))}
    for tag, (hypernetwork, encoder) in runs.items():
        generated = updates(hypernetwork, encoder)
        out[f"family_share_updates{tag}"] = share(generated)
        out[f"update_dependence{tag}"] = round(pair_dependence(generated), 4)
        if encoder is not world_encoder:
            a, a_prime = pair(encoder)
            out[f"family_share_pair_tokens_trained_encoder{tag}"] = share(a_prime - a)
    return out


def with_random_u_b(hypernetwork, seed: int):
    """The fresh H with its zero U_B half replaced by N(0, 1) values (where both exchange scores are defined)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, view in hypernetwork.u_b_parameters():
            view.copy_(torch.randn(view.shape, generator=gen))
    return hypernetwork.eval()


@torch.no_grad()
def hypernetwork_b_primes(backbone, encoder, hypernetwork, examples: dict[str, list], steps: int,
                          seed: int) -> dict[str, torch.Tensor]:
    """Family -> B′ of its examples: the backbone patched with H(A, A′), B as the condition (DDIM, eq. 8)."""
    return {family: edit_images(backbone, hypernetwork(*tokens(encoder, items)), stack(items, "b"), steps, seed)
            for family, items in examples.items()}


def base_b_primes(backbone, examples: dict[str, list], steps: int, seed: int) -> dict[str, torch.Tensor]:
    """Family -> B′ of the same sampler without any LoRA (the row's base)."""
    return {family: edit_images(backbone, None, stack(items, "b"), steps, seed) for family, items in examples.items()}


def row_settings(ctx) -> dict[str, object]:
    """The row's settings on ``ctx``'s world with its overrides (``--row-set``, or a curve's run's sampler settings)."""
    return {**loc_settings(ctx.world.root, ctx.quick), **ctx.row_overrides}


def run_loc(ctx):
    """The ``loc`` method of ``bench.analogy_world``: train (with random exchange, as published; with
    ``ctx.diagnostics`` also without it), then measure."""
    settings = row_settings(ctx)
    steps = int(settings["max_steps"])
    trains_encoder = float(settings.get("image_encoder_learning_rate", 0.0)) > 0
    runs = {"": ctx.folder / "train"}
    if ctx.diagnostics:  # the ablation of the paper's random exchange: same steps and seed
        runs["_no_exchange"] = ctx.folder / "train_no_exchange"
    seconds = {tag: train_loc(ctx.world.root, out, ctx.quick, ctx.seed,
                              {**ctx.row_overrides, "random_exchange": tag == ""}, ctx.resume_runs)
               for tag, out in runs.items()}

    backbone = load_ip2p(ctx.world.spec)
    world_encoder = load_query_encoder(ctx.world.spec)
    # each run's H with the encoder it read: the world CLIP, or the run's own trained E
    finals = {tag: load_run_model(out / HYPERNETWORK_FILE, None, world_encoder, trains_encoder)
              for tag, out in runs.items()}
    hypernetwork, encoder = finals[""]
    sample_steps = int(settings["sample_steps"])
    train_families = [f for f in ctx.examples if world.get_family(f).split == "train"]
    train_items = {f: ctx.examples[f] for f in train_families}

    def b_primes(model, model_encoder) -> dict[str, torch.Tensor]:
        return hypernetwork_b_primes(backbone, model_encoder, model, ctx.examples, sample_steps, ctx.seed)

    def train_tokens(model_encoder) -> list[torch.Tensor]:
        return [torch.cat(t) for t in zip(*(tokens(model_encoder, items) for items in train_items.values()))]

    b_prime = b_primes(hypernetwork, encoder)
    base = base_b_primes(backbone, ctx.examples, sample_steps, ctx.seed)
    extra: dict[str, object] = {"train_steps": steps, "train_seconds": round(seconds[""], 1),
                                "consistency_gap_init": None,
                                "consistency_gap_init_note": "undefined: a fresh H generates an exactly zero LoRA "
                                                             "(eq. 11)", "early_step_fraction": EARLY,
                                "image_encoder_trained": trains_encoder}
    for tag, out in runs.items():
        final, final_encoder = finals[tag]
        with torch.no_grad():
            relative = relative_update_norms(final(*train_tokens(final_encoder)), backbone.unet)
        extra[f"relative_update_median{tag}"] = round(float(relative.median()), 4)
        extra[f"relative_update_max{tag}"] = round(float(relative.max()), 4)
        early, early_encoder = load_run_model(checkpoint_at(out, EARLY), final, world_encoder, trains_encoder)
        extra[f"consistency_gap{tag}"] = mean_gap(final, final_encoder, ctx.examples, train_families)
        extra[f"consistency_gap_early{tag}"] = mean_gap(early, early_encoder, ctx.examples, train_families)
        losses = losses_from_log(out / "train.log")
        if losses:
            extra[f"loss_first_step{tag}"], extra[f"loss_last_step{tag}"] = losses
        extra.update(direction_figures(final, final_encoder, ctx.examples, tag))
        extra.update(direction_figures(early, early_encoder, ctx.examples, f"_early{tag}"))
    fresh = build_hypernetwork(hypernetwork.config, seed=ctx.seed)  # E at initialisation is the world CLIP
    extra["input_dependence_init"] = round(input_dependence(fresh.eval(), *train_tokens(world_encoder)), 4)
    extra["input_dependence"] = round(input_dependence(hypernetwork, *train_tokens(encoder)), 4)
    random_init = with_random_u_b(fresh, ctx.seed)  # where the init figures are defined (a fresh H's LoRA is zero)
    extra.update(direction_figures(random_init, world_encoder, ctx.examples, "_init"))
    extra.update(family_figures(finals, world_encoder, random_init, train_items))
    if "_no_exchange" in finals:
        extra["train_seconds_no_exchange"] = round(seconds["_no_exchange"], 1)
        extra.update(no_exchange_ratios(b_primes(*finals["_no_exchange"]), ctx.examples))
    for split in ("train", "heldout"):
        names = [f for f in ctx.examples if world.get_family(f).split == split]
        reverse, nothing = [], []
        for family in names:
            items = ctx.examples[family]
            b, truth = stack(items, "b"), stack(items, "b_prime")
            factors = hypernetwork(*tokens(encoder, items)).scaled(-1.0)
            reverse.append(float(mae(edit_images(backbone, factors, truth, sample_steps, ctx.seed), b).mean()))
            nothing.append(float(mae(b, truth).mean()))
        extra[f"reverse_error_{split}"] = round(sum(reverse) / len(reverse), 5)
        extra[f"reverse_no_edit_{split}"] = round(sum(nothing) / len(nothing), 5)
    (ctx.folder / "loc_extra.json").write_text(json.dumps(extra, indent=2))
    return MethodOutput(b_prime, base, backbone.reconstruct, extra)


def no_exchange_ratios(b_prime: dict[str, torch.Tensor], examples: dict[str, list]) -> dict[str, float]:
    """``mean_error_over_no_edit_<split>_no_exchange``: the mean over a split's families of the no-exchange run's B′
    error ÷ no edit."""
    out = {}
    for split in ("train", "heldout"):
        ratios = []
        for family in (f for f in examples if world.get_family(f).split == split):
            b, truth = stack(examples[family], "b"), stack(examples[family], "b_prime")
            ratios.append(float(mae(b_prime[family], truth).mean()) / float(mae(b, truth).mean()))
        out[f"mean_error_over_no_edit_{split}_no_exchange"] = round(sum(ratios) / len(ratios), 4)
    return out


# ---------------------------------------------------------------------------------------------------------------------
# the learning curve of a run (bench.row_curve): each hypernetwork export sampled as the row samples its final file


def curve_sampler(ctx, config: dict) -> CurveSampler:
    """The row's sampler for a run's hypernetwork exports; a ceiling's run (a plain LoRA or the UNet itself, no H) is
    refused: it has no hypernetwork to measure."""
    for key in ("plain_lora", "full_finetune"):
        if config.get(key):
            raise RunMismatch(f"the run was trained with {key}=true (a ceiling's run, no hypernetwork); row loc "
                              f"measures a hypernetwork run")
    steps = int(row_settings(ctx)["sample_steps"])  # the run's own, given as an override by bench.row_curve
    trains_encoder = float(config.get("image_encoder_learning_rate", 0.0)) > 0
    backbone = load_ip2p(ctx.world.spec)
    world_encoder = load_query_encoder(ctx.world.spec)

    def b_prime(path: Path) -> dict[str, torch.Tensor]:
        hypernetwork, encoder = load_run_model(path, None, world_encoder, trains_encoder)
        return hypernetwork_b_primes(backbone, encoder, hypernetwork, ctx.examples, steps, ctx.seed)

    return CurveSampler(base_b_primes(backbone, ctx.examples, steps, ctx.seed), b_prime, backbone.reconstruct)


CURVE = Curve(HYPERNETWORK_FILE, lambda config: world_of_spec(config.get("backbone", "")), ("sample_steps",),
              curve_sampler)
