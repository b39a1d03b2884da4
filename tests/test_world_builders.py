"""Every registered world builder runs end to end on a two-step config (dependencies first) and writes what its
loader reads (the backbone builders load their result back with the trainers' loaders to measure copying). The
suite's quick world only builds LoRWeB's models; this keeps the others (InstructPix2Pix-like, FLUX.1-dev-like,
region T5) from rotting between full bench runs. Their quality is the yardstick's business."""

from __future__ import annotations

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
