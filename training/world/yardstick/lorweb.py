"""LoRWeB's row of the yardstick: train its world preset, mix the basis per family, sample B′; the routing gap of the
basis coefficients (within- minus across-family centred cosine similarity), after training and at initialisation."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from analogy_core.analogy import AnalogyEmbedding
from analogy_core.lorweb.basis import load_basis
from analogy_core.lorweb.layer import inject_lorweb, set_query
from training.backbone import load_backbone, load_query_encoder
from training.lorweb.task import BASIS_FILE, TRANSFORMER_FILE
from training.world import evaluate as ev
from training.world import scenes as world_def
from training.world.presets import (
    lorweb_ceiling_settings,
    lorweb_settings,
    train_lorweb,
)
from training.world.registry import World
from training.world.yardstick.common import (
    Ceiling,
    Curve,
    CurveSampler,
    MethodContext,
    MethodOutput,
    load_weights,
    losses_from_log,
    pretraining_rate,
    world_of_spec,
)


def centred_cosine(coefficients: torch.Tensor) -> torch.Tensor:
    """[E, E] cosine similarity of per-example coefficient vectors [E, D] after subtracting their mean vector (the
    mix every example shares says nothing about routing)."""
    x = coefficients.double()
    x = x - x.mean(dim=0, keepdim=True)
    x = x / x.norm(dim=1, keepdim=True).clamp_min(1e-12)
    return x @ x.t()


def routing(coefficients: torch.Tensor, labels: list[str]) -> dict[str, float]:
    """Within- and across-family mean centred cosine similarity of per-example coefficient vectors [E, D]."""
    sim = centred_cosine(coefficients)
    same = torch.tensor([[a == b for b in labels] for a in labels])
    off = ~torch.eye(len(labels), dtype=torch.bool)
    within, across = float(sim[same & off].mean()), float(sim[~same].mean())
    return {"within": within, "across": across, "gap": within - across}


def run_lorweb(ctx: MethodContext) -> MethodOutput:
    settings = {**lorweb_settings(str(ctx.world.root), ctx.quick), **ctx.row_overrides}
    steps = int(settings["max_steps"])
    root = str(ctx.world.root)
    # the basis at initialisation: the same run for one step at learning rate 0
    train_lorweb(root, ctx.folder / "init", ctx.quick, ctx.seed, max_steps=1, resume=ctx.resume_runs,
                 overrides={**ctx.row_overrides, "learning_rate": 0.0, "sample_every": 10_000})
    seconds = train_lorweb(root, ctx.folder / "train", ctx.quick, ctx.seed, resume=ctx.resume_runs,
                           overrides=ctx.row_overrides)
    basis = load_basis(ctx.folder / "train" / "lorweb_basis.safetensors")
    init_basis = load_basis(ctx.folder / "init" / "lorweb_basis.safetensors")

    backbone = load_backbone(ctx.world.spec)
    base = base_b_prime(ctx, backbone)
    queries = family_queries(ctx, basis)
    b_prime = basis_b_prime(ctx, basis, queries)

    train_families = [f for f in ctx.examples if world_def.get_family(f).split == "train"]
    extra = {"train_steps": steps, "train_seconds": round(seconds, 1)}
    for tag, source in (("", basis), ("_init", init_basis)):
        for scope, names in (("", train_families), ("_all_families", list(ctx.examples))):
            r = routing(*coefficient_vectors(source, {f: queries[f] for f in names}))
            extra[f"routing_gap{scope}{tag}"] = round(r["gap"], 4)
            if not scope:
                extra[f"routing_within{tag}"], extra[f"routing_across{tag}"] = round(r["within"], 4), \
                    round(r["across"], 4)
    losses = losses_from_log(ctx.folder / "train" / "train.log")
    if losses:
        extra["loss_first_step"], extra["loss_last_step"] = losses
    return MethodOutput(b_prime, base, lambda images: ev.reconstruct(backbone, images), extra)


def sampling(ctx: MethodContext) -> tuple[int, float]:
    """The row's sampler settings: (steps, guidance)."""
    settings = {**lorweb_settings(str(ctx.world.root), ctx.quick), **ctx.row_overrides}
    return int(settings["sample_steps"]), float(settings["guidance"])


def base_b_prime(ctx: MethodContext, backbone) -> dict[str, torch.Tensor]:
    """The base backbone's B′ per family (no basis), sampled as the row samples."""
    steps, guidance = sampling(ctx)
    return {family: bottom(backbone, items, steps, ctx.seed, guidance) for family, items in ctx.examples.items()}


def embed_families(encoder, examples: dict[str, list]) -> dict[str, AnalogyEmbedding]:
    """The query ``encoder``'s embedding of each family's (A, A′, B) (``examples``: family -> world examples)."""
    return {family: encoder.encode(ev.stack(items, "a"), ev.stack(items, "a_prime"), ev.stack(items, "b"))
            for family, items in examples.items()}


def family_embeddings(ctx: MethodContext) -> dict[str, AnalogyEmbedding]:
    """The world query encoder's embedding of each family's examples (what does not depend on the basis)."""
    return embed_families(load_query_encoder(ctx.world.spec), ctx.examples)


def family_queries(ctx: MethodContext, basis, embeddings: dict[str, AnalogyEmbedding] | None = None
                   ) -> dict[str, torch.Tensor]:
    """Each family's mixing queries: its embeddings (:func:`family_embeddings`) projected by ``basis``."""
    embeddings = embeddings if embeddings is not None else family_embeddings(ctx)
    return {family: basis.settings.query(embedding) for family, embedding in embeddings.items()}


def coefficient_vectors(basis, queries: dict[str, torch.Tensor]) -> tuple[torch.Tensor, list[str]]:
    """Every example's mixing weights, all layers joined ([E, layers · entries], the families in ``queries``' order),
    and each row's family: what the routing figures compare."""
    rows = {family: torch.cat(list(basis.coefficients(query).values()), dim=1) for family, query in queries.items()}
    return torch.cat(list(rows.values())), [family for family, row in rows.items() for _ in range(len(row))]


def basis_b_prime(ctx: MethodContext, basis, queries: dict[str, torch.Tensor] | None = None
                  ) -> dict[str, torch.Tensor]:
    """B′ per family with ``basis`` mixed by each example's query, on a fresh copy of the world backbone."""
    queries = queries if queries is not None else family_queries(ctx, basis)
    steps, guidance = sampling(ctx)
    backbone = load_backbone(ctx.world.spec)
    transformer = with_basis(backbone, basis)
    return {family: bottom(backbone, items, steps, ctx.seed, guidance,
                           lambda q=queries[family]: set_query(transformer, q))
            for family, items in ctx.examples.items()}


def with_basis(backbone, basis):
    """The backbone's transformer with the trained basis injected in its targeted layers (in place)."""
    transformer = backbone.transformer
    layers = inject_lorweb(transformer, json.loads(basis.metadata["analogy.targets"]), num_entries=basis.num_entries,
                           rank=basis.rank, key_dim=basis.key_dim, query_dim=basis.query_dim, settings=basis.settings)
    if set(layers) != set(basis.layers):
        raise RuntimeError("the trained basis does not cover the world backbone's targeted layers")
    for name, layer in layers.items():
        layer.load_basis_layer(basis.layers[name])
    return transformer


def ceiling_b_prime(world: World, quick: bool, folder: Path, items: list, seed: int) -> torch.Tensor:
    """B′ of ``items`` with the ceiling LoRA trained in ``folder`` (a one-entry basis), sampled as the row samples."""
    settings = lorweb_settings(str(world.root), quick)
    backbone = load_backbone(world.spec)
    basis = load_basis(folder / BASIS_FILE)
    embedding = load_query_encoder(world.spec).encode(ev.stack(items, "a"), ev.stack(items, "a_prime"),
                                                      ev.stack(items, "b"))
    query = basis.settings.query(embedding)  # irrelevant with one entry (its coefficient is 1), but the layers ask
    transformer = with_basis(backbone, basis)
    return bottom(backbone, items, int(settings["sample_steps"]), seed, float(settings["guidance"]),
                  lambda: set_query(transformer, query))


def full_ceiling_b_prime(world: World, quick: bool, folder: Path, items: list, seed: int) -> torch.Tensor:
    """B′ of ``items`` with the transformer a ``full_finetune`` run wrote in ``folder``, sampled as the row samples."""
    settings = lorweb_settings(str(world.root), quick)
    backbone = load_backbone(world.spec)
    load_weights(backbone.transformer, folder / TRANSFORMER_FILE)
    return bottom(backbone, items, int(settings["sample_steps"]), seed, float(settings["guidance"]))


def full_ceiling_settings(world: World, quick: bool, family: str, seed: int) -> dict:
    """The same run with every transformer weight trained (no basis), at the backbone's own pretraining rate."""
    return {**lorweb_ceiling_settings(str(world.root), family, quick, seed), "full_finetune": True,
            "learning_rate": pretraining_rate(world, "flux_kontext")}


# LoRWeB's ceilings: the trainer with one basis entry of the preset's per-layer rank (presets.lorweb_ceiling_settings),
# and the same trainer fine-tuning the whole transformer
_MODELS = ("autoencoder", "clip", "flux_kontext")
CEILING = Ceiling("training.train_lorweb", _MODELS,
                  lambda world, quick, family, seed: lorweb_ceiling_settings(str(world.root), family, quick, seed),
                  ceiling_b_prime,
                  full=Ceiling("training.train_lorweb", _MODELS, full_ceiling_settings, full_ceiling_b_prime,
                               shared_as="lorweb_full"))


def curve_sampler(ctx: MethodContext, config: dict) -> CurveSampler:
    """The row's sampler for a run's basis exports: the base sampled once, the queries' embeddings encoded once."""
    backbone = load_backbone(ctx.world.spec)
    embeddings = family_embeddings(ctx)

    def b_prime(path: Path) -> dict[str, torch.Tensor]:
        basis = load_basis(path)
        return basis_b_prime(ctx, basis, family_queries(ctx, basis, embeddings))

    return CurveSampler(base_b_prime(ctx, backbone), b_prime, lambda images: ev.reconstruct(backbone, images))


# the learning curve of a run (bench.row_curve): the run's backbone is the world folder, its sampler the row's
CURVE = Curve(BASIS_FILE, lambda config: world_of_spec(config.get("backbone", "")), ("sample_steps", "guidance"),
              curve_sampler)


def bottom(backbone, items, steps: int, seed: int, guidance: float, before_call=None) -> torch.Tensor:
    """B′ of the examples: the bottom-right panel of the sampled grid given the reference grid [A A′; B B]."""
    grids = ev.sample_grids(backbone, ev.reference_grids(items), steps, seed, guidance, before_call)
    return ev.bottom_right(grids)
