"""Trainable LoRWeB layers: a frozen linear plus a LoRA basis mixed per sample by learned keys.

For a batch with per-sample coefficients c [B, N] the update is computed as two batched matmuls of rank N·r:

    h = x @ A_cat            A_cat [in, N·r]   (A_n side by side)
    h = h * repeat(c, r)     per sample, constant over tokens
    Δy = h @ B_cat           B_cat [N·r, out]  (B_n stacked)

which equals Σ_n c_n (x A_n) B_n without a loop over the N entries. Parameters use the released file's layout
(lora_A [N, in, r], lora_B [N, r, out], lora_keys [N, d], att_lora_to_q [d, Q]), so :meth:`to_basis_layer` is a
no-copy view of what gets saved.
"""

from __future__ import annotations

import fnmatch
import math

import torch
from torch import nn

from .basis import BasisLayer, LoRABasis


class LoRWeBLinear(nn.Module):
    def __init__(self, base: nn.Linear, num_entries: int = 32, rank: int = 4, key_dim: int = 128,
                 query_dim: int = 3 * 768):
        super().__init__()
        self.base = base
        for p in self.base.parameters():
            p.requires_grad_(False)
        self.num_entries, self.rank, self.key_dim = num_entries, rank, key_dim
        in_f, out_f = base.in_features, base.out_features
        # Standard LoRA start: A random, B zero, so training starts from the unmodified backbone.
        self.lora_A = nn.Parameter(torch.randn(num_entries, in_f, rank) / math.sqrt(in_f))
        self.lora_B = nn.Parameter(torch.zeros(num_entries, rank, out_f))
        self.lora_keys = nn.Parameter(torch.randn(num_entries, key_dim))
        self.att_lora_to_q = nn.Linear(query_dim, key_dim, bias=False)
        nn.init.normal_(self.att_lora_to_q.weight, std=1.0 / math.sqrt(query_dim))
        self.query: torch.Tensor | None = None  # [B, Q], set per batch by set_query

    def coefficients(self, query: torch.Tensor) -> torch.Tensor:
        """softmax(W_q q · Kᵀ / sqrt(d)) -> [B, N]."""
        q = self.att_lora_to_q(query.to(self.att_lora_to_q.weight.dtype))
        return torch.softmax(q @ self.lora_keys.t() / math.sqrt(self.key_dim), dim=-1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        if self.query is None:
            raise RuntimeError("LoRWeBLinear: call set_query(model, query) before the forward pass")
        c = self.coefficients(self.query)                                   # [B, N]
        n, in_f, r = self.lora_A.shape
        a_cat = self.lora_A.permute(1, 0, 2).reshape(in_f, n * r)           # [in, N·r]
        b_cat = self.lora_B.reshape(n * r, -1)                              # [N·r, out]
        scale = c.repeat_interleave(r, dim=-1)                              # [B, N·r]
        scale = scale.view(scale.shape[0], *([1] * (x.ndim - 2)), n * r)    # broadcast over tokens
        h = (x.to(a_cat.dtype) @ a_cat) * scale.to(a_cat.dtype)
        return out + (h @ b_cat).to(out.dtype)

    def to_basis_layer(self) -> BasisLayer:
        return BasisLayer(self.lora_A.detach(), self.lora_B.detach(), self.lora_keys.detach(),
                          self.att_lora_to_q.weight.detach())

    def load_basis_layer(self, layer: BasisLayer) -> None:
        with torch.no_grad():
            self.lora_A.copy_(layer.A)
            self.lora_B.copy_(layer.B)
            self.lora_keys.copy_(layer.keys)
            self.att_lora_to_q.weight.copy_(layer.to_q)


# Official LoRWeB targets on FLUX: every linear inside the double and single transformer blocks.
DEFAULT_TARGETS = ("transformer_blocks.*", "single_transformer_blocks.*")


def inject_lorweb(model: nn.Module, patterns=DEFAULT_TARGETS, **layer_kwargs) -> dict[str, LoRWeBLinear]:
    """Replace every nn.Linear whose path matches one of the glob ``patterns`` by a LoRWeBLinear (in place)."""
    targets = [name for name, module in model.named_modules()
               if isinstance(module, nn.Linear) and any(fnmatch.fnmatchcase(name, p) for p in patterns)]
    if not targets:
        raise ValueError(f"no nn.Linear matches the target patterns {list(patterns)}")
    layers = {}
    for name in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        base = getattr(parent, child)
        layer = LoRWeBLinear(base, **layer_kwargs).to(device=base.weight.device)
        setattr(parent, child, layer)
        layers[name] = layer
    return layers


def lorweb_layers(model: nn.Module) -> dict[str, LoRWeBLinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRWeBLinear)}


def set_query(model: nn.Module, query: torch.Tensor | None) -> None:
    """Give every LoRWeB layer the batch's analogy queries [B, Q] (None to clear)."""
    for layer in lorweb_layers(model).values():
        layer.query = query


def export_basis(model: nn.Module, family: str = "flux", metadata: dict[str, str] | None = None) -> LoRABasis:
    """The trained basis as the pack's LoRABasis (the file the Mix LoRA Basis node loads)."""
    layers = {name: layer.to_basis_layer() for name, layer in lorweb_layers(model).items()}
    return LoRABasis({k: type(v)(*(t.float().cpu() for t in (v.A, v.B, v.keys, v.to_q))) for k, v in layers.items()},
                     family=family, metadata=dict(metadata or {}))
