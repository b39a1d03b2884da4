"""Learning-rate schedules of the shared trainer (training/lr_schedule.py): the formulas against an independent
closed form, the rates the loop really uses, an exact resume of a decaying schedule, and clear errors."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from analogy_core.files import read_safetensors
from toy_task import ToyTask
from training import lr_schedule, trainer
from training.config import build_config


def closed_form(name: str, warmup: int, total: int, step: int) -> float:
    """The schedules as their definitions read: linear warm-up from 0, then flat, linearly or half-cosine to 0."""
    if step < warmup:
        return step / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return {"constant": 1.0, "constant_with_warmup": 1.0, "linear": max(0.0, 1.0 - progress),
            "cosine": max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))}[name]


@pytest.mark.parametrize("name,warmup", [("constant", 0), ("constant_with_warmup", 3), ("linear", 0), ("linear", 4),
                                         ("cosine", 0), ("cosine", 5)])
def test_multiplier_follows_the_schedules_definition(name, warmup):
    total = 20
    factor = lr_schedule.multiplier(name, warmup, total)
    values = [factor(step) for step in range(total)]
    assert values == pytest.approx([closed_form(name, warmup, total, s) for s in range(total)], abs=1e-12)
    if name != "constant":
        assert min(values) < 1.0, "the schedule under test must change the rate somewhere"


def train(out: Path, *extra: str) -> dict:
    return trainer.run(ToyTask, ["--preset", "default", "--output-dir", str(out), *extra])


def test_the_loop_updates_with_the_scheduled_rate(tmp_path):
    constant = train(tmp_path / "constant")
    cosine = train(tmp_path / "cosine", "--set", "lr_schedule=cosine", "--set", "lr_warmup_steps=2")
    steps = len(cosine["lrs"])
    factor = lr_schedule.multiplier("cosine", 2, steps)
    assert cosine["lrs"] == pytest.approx([0.3 * factor(s) for s in range(steps)])
    assert cosine["lrs"][0] == 0.0 and constant["lrs"] == pytest.approx([0.3] * steps)
    a = read_safetensors(tmp_path / "constant" / "toy.safetensors")[0]
    b = read_safetensors(tmp_path / "cosine" / "toy.safetensors")[0]
    assert any(not torch.allclose(a[k], b[k]) for k in a), "the schedule must change what the run learns"


def test_a_decaying_schedule_resumes_exactly(tmp_path):
    schedule = ("--set", "lr_schedule=linear", "--set", "lr_warmup_steps=1")
    whole = train(tmp_path / "whole", *schedule)
    out = tmp_path / "split"
    first = train(out, *schedule, "--set", "max_steps=8", "--max-steps", "4")
    assert first["lrs"] != whole["lrs"][:4], "the schedule follows max_steps: a 4-step run decays faster"
    out2 = tmp_path / "resumed"
    train(out2, *schedule, "--max-steps", "8")  # writes checkpoints at 2, 4, 6, 8; cut back to step 4 below
    for name in ("step_000006", "step_000008"):
        (out2 / "checkpoints" / name / "trainer_state.json").unlink()
    resumed = train(out2, *schedule, "--resume")
    assert resumed["start_step"] == 4
    assert resumed["lrs"] == pytest.approx(whole["lrs"][4:])
    a = read_safetensors(tmp_path / "whole" / "toy.safetensors")[0]
    b = read_safetensors(out2 / "toy.safetensors")[0]
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("overrides,message", [
    (["lr_schedule=exponential"], "lr_schedule must be one of constant, constant_with_warmup, linear, cosine"),
    (["lr_schedule=cosine", "lr_warmup_steps=-1"], "lr_warmup_steps must be an integer >= 0"),
    (["lr_schedule=cosine", "lr_warmup_steps=8"], "must be below max_steps (8)"),
    (["lr_warmup_steps=2"], "use 'constant_with_warmup'"),
])
def test_impossible_schedules_are_refused_before_anything_loads(overrides, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        build_config(ToyTask.config_cls, ToyTask.presets, "default", None, overrides)


def test_rates_need_one_base_per_parameter_group():
    optimizer = torch.optim.SGD([{"params": [torch.zeros(1, requires_grad=True)], "lr": 1.0},
                                 {"params": [torch.zeros(1, requires_grad=True)], "lr": 0.1}])
    lr_schedule.set_rates(optimizer, [1.0, 0.1], 0.5)
    assert [g["lr"] for g in optimizer.param_groups] == [0.5, 0.05]
    with pytest.raises(ValueError, match="1 base rates for 2 parameter groups"):
        lr_schedule.set_rates(optimizer, [1.0], 0.5)
