"""Every registered world builder runs end to end on a two-step config (dependencies first) and writes what its
loader reads (the backbone builders load their result back with the trainers' loaders to measure copying). The
suite's quick world only builds LoRWeB's models; this keeps the others (InstructPix2Pix-like, FLUX.1-dev-like,
region T5) from rotting between full bench runs. Their quality is the yardstick's business."""

from __future__ import annotations

import itertools
import json
import math

import pytest

from training.world.registry import WORLD_MODELS, BuildContext, build_order

SHRINK = {"steps": 2, "pool": 8, "batch": 4, "batch_copy": 2, "batch_complete": 1, "batch_generate": 1,
          "eval_grids": 2, "eval_images": 2, "eval_steps": 2}


def shrunk(config: dict) -> dict:
    return {k: SHRINK.get(k, v) for k, v in config.items()}


def finite_numbers(value) -> bool:
    if isinstance(value, dict):
        return all(finite_numbers(v) for v in value.values())
    if isinstance(value, float):
        return math.isfinite(value)
    return True


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("world-builders")
    out = {}
    for name in build_order(list(WORLD_MODELS)):
        model = WORLD_MODELS[name]
        folder = root / name
        folder.mkdir()
        metrics = model.build(BuildContext(name, folder, shrunk(model.configs["quick"]), 0, True,
                                           {d: root / d for d in model.depends}))
        out[name] = (folder, metrics)
    return out


@pytest.mark.parametrize("name", sorted(WORLD_MODELS))
def test_builder_runs_and_reports_finite_metrics(built, name):
    folder, metrics = built[name]
    json.dumps(metrics)
    assert finite_numbers(metrics), metrics
    assert any(folder.iterdir()), f"{name} wrote nothing"


def test_world_pretraining_rate_warms_up_linearly_then_decays_to_five_percent():
    """warmup_cosine over 100 steps (5 warm-up steps): the rate factor is (step + 1) / 5 for the first five steps (the
    first step already learns), 1 at the end of the warm-up, then a cosine down to 0.05 (written out here)."""
    import torch

    from training.world.schedule import warmup_cosine

    optimiser = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    schedule = warmup_cosine(optimiser, 100)
    rates = []
    for _ in range(100):
        rates.append(optimiser.param_groups[0]["lr"])
        optimiser.step()
        schedule.step()
    assert rates[:6] == pytest.approx([0.2, 0.4, 0.6, 0.8, 1.0, 1.0])
    assert rates[52] == pytest.approx(0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * 47 / 95)))
    assert rates[-1] == pytest.approx(0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * 94 / 95)))
    assert all(a >= b for a, b in itertools.pairwise(rates[4:])), "no rise after the warm-up"


def test_the_world_autoencoders_model_latents_are_shifted_then_scaled():
    """``CellCodec.model_latents`` gives the latents the world's transformers train on, diffusers' convention:
    (z − shift_factor) · scaling_factor, with a shift and a scale that change them (the order then matters)."""
    import torch

    from training.world.autoencoder import CellCodec, build_autoencoder, initialise

    ae = build_autoencoder()
    initialise(ae, 0)
    ae.register_to_config(shift_factor=0.3, scaling_factor=2.5)
    codec = CellCodec(ae)
    images = torch.rand(2, 32, 32, 3, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        z = ae.encode(images.permute(0, 3, 1, 2) * 2 - 1).latents
    got = codec.model_latents(images)
    assert (got - z).abs().max() > 0.1, "shift and scale must change the latents, or this checks nothing"
    torch.testing.assert_close(got, (z - 0.3) * 2.5, rtol=1e-5, atol=1e-4)


def test_the_kontext_completion_objective_keeps_three_panels_and_draws_the_fourth():
    """``completion_grids``: the target grid is [s1 s2; s3 s4], its reference [s1 s2; s3 s3] (LoRWeB's layout), each
    the grid of those panels (``grid_tokens``), so the two differ in the bottom-right panel only."""
    import torch

    from training.world.flux_kontext import completion_grids, grid_tokens

    panels = torch.randn(5, 4, 2, 2, generator=torch.Generator().manual_seed(0))
    index = torch.tensor([[0, 1, 2, 3], [4, 3, 1, 0]])
    target, reference = completion_grids(panels, index)
    torch.testing.assert_close(target, grid_tokens(panels, index))
    torch.testing.assert_close(reference, grid_tokens(panels, torch.tensor([[0, 1, 2, 2], [4, 3, 1, 1]])))
    assert not torch.equal(target, reference)
    assert torch.equal(index, torch.tensor([[0, 1, 2, 3], [4, 3, 1, 0]])), "the index is not changed in place"


def test_the_world_clips_pictures_are_what_clips_image_processor_gives():
    """``normalise(resized_pool(x))``, the world CLIP's input done in two steps, equals CLIPImageProcessor's whole
    pipeline (resize, crop, rescale, CLIP's mean and std) on the same uint8 pictures."""
    import numpy as np
    import torch
    from transformers import CLIPImageProcessor

    from training.world.clip import normalise, resized_pool

    images = torch.rand(2, 64, 64, 3, generator=torch.Generator().manual_seed(0))
    ours = normalise(resized_pool(images))
    arrays = list((images.clamp(0, 1) * 255).round().to(torch.uint8).numpy())
    processor = CLIPImageProcessor(size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224}, resample=3)
    theirs = processor(images=[np.asarray(a) for a in arrays], return_tensors="pt")["pixel_values"]
    assert ours.shape == theirs.shape == (2, 3, 224, 224)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=0.02)
