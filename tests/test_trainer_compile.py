"""``torch_compile`` in the shared trainer skeleton (training/trainer.py) on the toy task: the compile targets are
compiled in place for the training steps (the same losses and weights as an eager run, the same parameter names in
checkpoints and the written file), samples run eager (another batch size and no gradients compile nothing new), and a
resumed compiled run continues exactly. Compiles with inductor, as a user's run does (a few seconds on the toy)."""

from __future__ import annotations

import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch._dynamo.utils import counters
from toy_task import ToyTask

from analogy_core.files import read_safetensors
from training import trainer
from training.loc.task import LoCTask

needs_compiler = pytest.mark.skipif(not any(shutil.which(c) for c in ("g++", "c++", "clang++")),
                                    reason="inductor compiles C++ on the CPU: no C++ compiler here")


def compiled_graphs() -> int:
    """Dynamo's own count of the graphs it compiled (no public equivalent)."""
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


@needs_compiler
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


@needs_compiler
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


def test_every_step_runs_compiled_before_and_after_a_sample(tmp_path, monkeypatch):
    """A backend that counts the compiled graph's calls: each of the 8 steps calls it once, the 2 samples (eager)
    never, so the eager stance ends with the sample."""
    calls = []

    def counting(graph, example_inputs):
        def run(*args):
            calls.append(torch.is_grad_enabled())
            return graph.forward(*args)
        return run
    compile_module = torch.nn.Module.compile
    monkeypatch.setattr(torch.nn.Module, "compile", lambda self, **kw: compile_module(self, backend=counting))
    SamplingToyTask.graphs_while_sampling = []
    train(tmp_path / "run", "--set", "torch_compile=true")
    assert len(SamplingToyTask.graphs_while_sampling) == 2  # samples at steps 4 and 8
    assert calls == [True] * 8, calls


@needs_compiler
def test_per_step_lora_hooks_in_a_compiled_module_use_each_steps_factors():
    """LoRA of Change's mechanism under compile: ``batched_lora`` registers forward hooks holding the step's generated
    factors on the compiled UNet's projections, new ones every step. Three optimiser steps of factors that change:
    the compiled losses and gradients are the eager ones, step by step."""
    from analogy_core.loc import LoRAFactors, batched_lora

    def run(compiled: bool) -> list[tuple]:
        torch.manual_seed(0)
        net = torch.nn.Sequential(torch.nn.Linear(6, 6), torch.nn.GELU(), torch.nn.Linear(6, 6))
        down = torch.nn.Parameter(torch.randn(2, 2, 6) * 0.5)
        up = torch.nn.Parameter(torch.randn(2, 6, 2) * 0.5)
        optimiser = torch.optim.SGD([down, up], lr=0.5)
        if compiled:
            net.compile()
        out = []
        for step in range(3):
            x = torch.randn(2, 4, 6, generator=torch.Generator().manual_seed(step))
            factors = LoRAFactors({"0": (down, up), "2": (down * 0.5, up)}, torch.ones(2))
            with batched_lora(net, factors):
                loss = net(x).square().mean()
            optimiser.zero_grad()
            loss.backward()
            out.append((loss.detach().clone(), down.grad.clone(), up.grad.clone()))
            optimiser.step()
        return out

    eager, compiled = run(False), run(True)
    assert compiled_graphs() > 0
    assert not torch.allclose(eager[0][0], eager[2][0]), "the factors must change the loss for this test to mean it"
    for eager_step, compiled_step in zip(eager, compiled):
        for a, b in zip(eager_step, compiled_step):
            torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("case", ["dynamo_backend", "fsdp"])
def test_compiling_twice_or_under_fsdp_is_refused(case):
    from accelerate.utils import DistributedType, DynamoBackend

    backend = DynamoBackend.INDUCTOR if case == "dynamo_backend" else DynamoBackend.NO
    kind = DistributedType.FSDP if case == "fsdp" else DistributedType.NO
    accelerator = SimpleNamespace(state=SimpleNamespace(dynamo_plugin=SimpleNamespace(backend=backend)),
                                  distributed_type=kind)
    with pytest.raises(ValueError, match="dynamo_backend \\(inductor\\) both compile" if case == "dynamo_backend"
                       else "FSDP"):
        trainer.check_compilable(accelerator)
    trainer.check_compilable(SimpleNamespace(state=SimpleNamespace(dynamo_plugin=SimpleNamespace(
        backend=DynamoBackend.NO)), distributed_type=DistributedType.MULTI_GPU))  # DDP with no plugin compile: fine
