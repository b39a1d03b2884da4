"""A tiny TrainingTask (noisy linear regression with a frozen feature layer) that exercises the shared trainer skeleton
in about a second: checkpoints, resume, fallback, clipping — everything every real trainer inherits."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import Dataset

from analogy_core.files import write_safetensors_atomic
from training.config import CommonConfig
from training.data.readers import ItemError
from training.trainer import TrainingTask


@dataclass
class ToyConfig(CommonConfig):
    output_dir: str = "outputs/toy"
    data: str = "toy"
    batch_size: int = 4
    max_steps: int = 8
    learning_rate: float = 0.3
    num_workers: int = 0
    checkpoint_every: int = 2
    sample_every: int = 1000
    keep_checkpoints: int = 10
    report_to: str = "none"
    unreadable: str = ""          # comma-separated item indices that raise ItemError
    length: int = 64
    whole: bool = False           # a "mode" run: writes toy_whole.safetensors instead of toy.safetensors


class ToyData(Dataset):
    def __init__(self, length: int, unreadable: set[int]):
        self.length, self.unreadable = length, unreadable
        gen = torch.Generator().manual_seed(7)
        self.x = torch.randn(length, 4, generator=gen)
        self.y = self.x @ torch.tensor([1.0, -2.0, 0.5, 3.0]) + 0.1

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> dict:
        if index in self.unreadable:
            raise ItemError(f"toy item {index} is unreadable")
        return {"x": self.x[index], "y": self.y[index], "index": torch.tensor(index)}


class ToyModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.frozen = nn.Linear(4, 4).requires_grad_(False)
        with torch.no_grad():
            self.frozen.weight.copy_(torch.eye(4))
            self.frozen.bias.zero_()
        self.head = nn.Linear(4, 1)
        self.dropout = nn.Dropout(0.0)

    def forward(self, x):
        return self.head(self.dropout(self.frozen(x))).squeeze(-1)


class ToyTask(TrainingTask):
    name = "toy"
    artifact = "toy.safetensors"
    mode_artifacts = {"whole": "toy_whole.safetensors"}
    config_cls = ToyConfig
    presets = {"default": {}}
    seen_batches: list[list[int]] = []
    seen_seeds: list[int] = []    # each micro-batch's random stream (its generator's seed)

    def build(self) -> nn.Module:
        torch.manual_seed(self.cfg.seed)
        return ToyModel().to(self.device)

    def dataset(self):
        bad = {int(i) for i in self.cfg.unreadable.split(",") if i.strip()}
        return ToyData(self.cfg.length, bad)

    def loss(self, model, batch, generator):
        ToyTask.seen_batches.append(batch["index"].tolist())
        ToyTask.seen_seeds.append(generator.initial_seed())
        noise = torch.randn(batch["y"].shape, generator=generator) * 0.01
        return ((model(batch["x"]) - batch["y"] - noise) ** 2).mean()

    def export(self, model, path: Path, step: int) -> None:
        write_safetensors_atomic({k: v for k, v in self.trainable_state(model).items()}, path, {"step": str(step)})
