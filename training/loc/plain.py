"""A plain LoRA in the hypernetwork's place: one learned LoRA, the same for every pair (``plain_lora: true``).

This is LoRA of Change's **ceiling** on the analogy world (:mod:`training.world.yardstick.ceiling`): trained on one
family alone with eq. (6), it says what a LoRA of the rank H generates (on the same attention projections of the same
frozen InstructPix2Pix) can draw at all when the edit is taught directly, with none of H's difficulties (reading the
pair, generating the factors). It speaks H's interface — (tokens of A, tokens of A′) -> :class:`LoRAFactors` — so the
LoC trainer's loss, sampler and hooks run unchanged; the pair is ignored.

Initialisation as a fresh LoRA (and as a fresh H, eq. 11): ``down`` (U_A) kaiming-uniform(a=√5) — uniform in
±1/√in —, ``up`` (U_B) zero, so the first step starts from the base exactly. The trainer writes it as a standard LoRA
file (``loc_plain_lora.safetensors``, the family's usual key format: ComfyUI's LoraLoader, diffusers and peft read it).
"""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

import torch
from torch import nn

from analogy_core.layouts import ModelLayout
from analogy_core.loc import HypernetworkConfig, LoRAFactors
from analogy_core.lora import LoRA
from analogy_core.lora_io import load_lora_file


class PlainLoRA(nn.Module):
    """One LoRA of ``config.rank`` on every projection of ``config.targets``, returned for every pair."""

    reads_pair = False  # the pair's tokens are ignored: the trainer need not run the frozen image encoder for them

    def __init__(self, config: HypernetworkConfig):
        super().__init__()
        self.config = config
        self.paths = [path for target in config.targets for path in target.projection_paths()]
        shapes = [shape for target in config.targets for shape in target.shapes]
        self.down = nn.ParameterList(nn.Parameter(torch.empty(config.rank, i)) for _, i in shapes)
        self.up = nn.ParameterList(nn.Parameter(torch.zeros(o, config.rank)) for o, _ in shapes)
        for down in self.down:
            nn.init.kaiming_uniform_(down, a=math.sqrt(5))

    def forward(self, tokens_a: torch.Tensor, tokens_a_prime: torch.Tensor) -> LoRAFactors:
        """The same LoRA for each of the batch's pairs (scale 1)."""
        n = tokens_a.shape[0]
        layers = {path: (down.unsqueeze(0).expand(n, -1, -1), up.unsqueeze(0).expand(n, -1, -1))
                  for path, down, up in zip(self.paths, self.down, self.up)}
        return LoRAFactors(layers, torch.ones(n, device=self.up[0].device))

    def lora(self, metadata: dict[str, str] | None = None) -> LoRA:
        """The pack's LoRA type (source "trained"), as the trainer writes it."""
        generated = self(torch.zeros(1, 1, 1), torch.zeros(1, 1, 1)).lora(0, self.config.family, metadata)
        return replace(generated, source="trained")


def load_plain_lora(path: str | Path, layout: ModelLayout) -> LoRAFactors:
    """A plain LoRA file (any key format the pack reads) as one sample's :class:`LoRAFactors` on ``layout``'s module
    paths (each layer's alpha/rank folded into ``up``), for :func:`~analogy_core.loc.batched_lora`."""
    lora = load_lora_file(path, layout).lora
    layers = {p: (layer.down.float()[None], (layer.up.float() * layer.scale)[None]) for p, layer in lora.layers.items()}
    return LoRAFactors(layers, torch.ones(1))
