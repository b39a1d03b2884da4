"""``torch_compile`` in the shared trainer skeleton (training/trainer.py) on the toy task: the compile targets are
compiled in place for the training steps (the same losses and weights as an eager run, the same parameter names in
checkpoints and the written file), samples run eager (another batch size and no gradients compile nothing new), and a
resumed compiled run continues exactly. Compiles with inductor, as a user's run does (a few seconds on the toy)."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch._dynamo.utils import counters  # dynamo's own count of compiled graphs (no public equivalent)

from analogy_core.files import read_safetensors
from toy_task import ToyTask
from training import trainer
from training.loc.task import LoCTask


def compiled_graphs() -> int:
    return int(counters["stats"]["unique_graphs"])


class SamplingToyTask(ToyTask):
    """The toy task with samples: the model called on another batch size without gradients, which a compiled module
    would compile anew; records how many graphs were compiled while sampling."""
    graphs_while_sampling: list[int] = []

    def write_samples(self, model, batch, step: int, folder: Path) -> None:
        before = compiled_graphs()
        with torch.no_grad():
            model(torch.randn(3, 4))
        SamplingToyTask.graphs_while_sampling.append(compiled_graphs() - before)


def train(out: Path, *extra: str) -> dict:
    return trainer.run(SamplingToyTask, ["--preset", "default", "--output-dir", str(out), "--set", "sample_every=4",
                                         *extra])


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def test_compiled_steps_train_as_eager_ones_and_samples_run_eager(tmp_path):
    eager = train(tmp_path / "eager")
    assert eager["losses"][-1] < eager["losses"][0], "the toy task must learn for this test to mean anything"
    assert compiled_graphs() == 0
    SamplingToyTask.graphs_while_sampling = []
    compiled = train(tmp_path / "compiled", "--set", "torch_compile=true")
    assert compiled_graphs() > 0, "torch_compile compiled nothing"
    assert SamplingToyTask.graphs_while_sampling == [0, 0], "samples compiled a graph (they must run eager)"
    assert compiled["losses"] == pytest.approx(eager["losses"], rel=1e-5, abs=1e-7)
    eager_file, compiled_file = (read_safetensors(tmp_path / run / "toy.safetensors")[0]
                                 for run in ("eager", "compiled"))
    assert eager_file.keys() == compiled_file.keys() == {"head.weight", "head.bias"}  # no ``_orig_mod.`` prefix
    for key in eager_file:
        torch.testing.assert_close(compiled_file[key], eager_file[key], rtol=1e-5, atol=1e-6)


def test_a_compiled_run_resumes_exactly(tmp_path):
    whole = tmp_path / "whole"
    train(whole, "--set", "torch_compile=true")
    part = tmp_path / "part"
    train(part, "--set", "torch_compile=true", "--max-steps", "4")
    train(part, "--set", "torch_compile=true", "--resume")
    first, second = (read_safetensors(run / "toy.safetensors")[0] for run in (whole, part))
    for key in first:
        assert torch.equal(first[key], second[key]), key


def test_lora_of_change_compiles_its_unet_not_the_hypernetwork():
    unet = torch.nn.Linear(2, 2)
    task = SimpleNamespace(backbone=SimpleNamespace(unet=unet))
    assert LoCTask.compile_targets(task, torch.nn.Linear(3, 3)) == [unet]


def test_the_default_target_is_the_built_module():
    model = torch.nn.Linear(2, 2)
    assert ToyTask.compile_targets(SimpleNamespace(), model) == [model]


def test_a_torch_without_set_stance_is_refused_naming_the_version(monkeypatch, tmp_path):
    monkeypatch.delattr(torch.compiler, "set_stance")
    with pytest.raises(ValueError, match=r"torch_compile needs torch >= 2\.6 .*this is torch"):
        train(tmp_path / "old", "--set", "torch_compile=true")
    assert not (tmp_path / "old").exists()  # refused with the config, before anything loads or is written
