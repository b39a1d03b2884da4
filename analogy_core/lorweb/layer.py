"""Trainable LoRWeB layers: a frozen linear plus a LoRA basis mixed per sample by learned keys.

For a batch with per-sample coefficients c [B, N] the update is computed as two batched matmuls of rank N·r:

    h = x @ A_cat            A_cat [in, N·r]   (A_n side by side)
    h = h * repeat(c, r)     per sample, constant over tokens
    Δy = h @ B_cat           B_cat [N·r, out]  (B_n stacked)

which equals Σ_n c_n (x A_n) B_n without a loop over the N entries. The coefficients come from
:func:`~.lorweb_settings.mixing_coefficients` (softmax or tanh, heads, mean or sum), the function the inference
basis uses too. Parameters use the released file's layout (lora_A [N, in, r], lora_B [N, r, out], lora_keys [N, d],
att_lora_to_q [d, Q]), so :meth:`to_basis_layer` is a no-copy view of what gets saved.

Initialisation as the official AttLoRA module: ``kaiming_uniform_(a=√5)`` on the 3-D down tensor [N, in, r] (torch
takes fan-in = in·r, so std = 1/√(3·in·r)), up = 0 (training starts from the unmodified backbone), keys ~ N(0, 1),
query projection with nn.Linear's default initialisation.
"""

from __future__ import annotations

import fnmatch
import math

import torch
from torch import nn

from .basis import BasisLayer, LoRABasis
from .settings import OFFICIAL, LoRWeBSettings


class LoRWeBLinear(nn.Module):
    def __init__(self, base: nn.Linear, num_entries: int = 32, rank: int = 4, key_dim: int = 128,
                 query_dim: int = 3 * 768, settings: LoRWeBSettings = OFFICIAL):
        super().__init__()
        settings.check_shapes(key_dim, query_dim)
        self.base = base
        for p in self.base.parameters():
            p.requires_grad_(False)
        self.num_entries, self.rank, self.key_dim, self.settings = num_entries, rank, key_dim, settings
        in_f, out_f = base.in_features, base.out_features
        self.lora_A = nn.Parameter(torch.empty(num_entries, in_f, rank))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # fan-in in·r: std 1/sqrt(3·in·r), as official
        self.lora_B = nn.Parameter(torch.zeros(num_entries, rank, out_f))
        self.lora_keys = nn.Parameter(torch.randn(num_entries, key_dim))
        self.att_lora_to_q = nn.Linear(query_dim, key_dim, bias=False)  # nn.Linear's own init, as official
        self.query: torch.Tensor | None = None  # [B, Q], set per batch by set_query
        if not self.reads_query:  # a one-entry softmax: keys and projection never touch the output (forward)
            self.lora_keys.requires_grad_(False)
            self.att_lora_to_q.weight.requires_grad_(False)

    def coefficients(self, query: torch.Tensor) -> torch.Tensor:
        """Mixing weights [B, N] from the queries [B, Q], with this layer's settings."""
        q = self.att_lora_to_q(query.to(self.att_lora_to_q.weight.dtype))
        return self.settings.mixing_coefficients(q, self.lora_keys)

    @property
    def reads_query(self) -> bool:
        """Whether the query can change this layer's coefficients. A softmax over one entry gives every head the
        weight 1 (mean or sum, clamped to 1) whatever the query, and a zero gradient to the keys and projection."""
        return self.num_entries > 1 or not self.settings.lora_softmax

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        if self.query is None:
            raise RuntimeError("LoRWeBLinear: call set_query(model, query) before the forward pass")
        if not self.reads_query:  # every coefficient is exactly 1: the plain LoRA without the mixing's ops, the same
            # output and gradients bit for bit (keys and projection, which got zero gradients, are frozen instead)
            return out + (x.to(self.lora_A.dtype) @ self.lora_A[0] @ self.lora_B[0]).to(out.dtype)
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
    """Replace every nn.Linear whose path matches one of the glob ``patterns`` by a LoRWeBLinear (in place).

    ``layer_kwargs``: num_entries, rank, key_dim, query_dim (e.g. ``settings.query_width(encoder.embed_dim)``) and
    settings (a :class:`LoRWeBSettings`; default the released checkpoint's)."""
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


def reads_query(model: nn.Module) -> bool:
    """Whether any LoRWeB layer of ``model`` mixes by the analogy query: not a one-entry softmax basis (the yardstick's
    LoRA ceiling) nor a model without LoRWeB layers (a full fine-tune). A trainer need not encode a query then."""
    return any(layer.reads_query for layer in lorweb_layers(model).values())


def blank_query(model: nn.Module, batch_size: int, device=None) -> torch.Tensor | None:
    """A zero query [batch_size, Q] for a model that does not read one (:func:`reads_query`), which gives exactly the
    coefficients any query gives; None for a model without LoRWeB layers."""
    if reads_query(model):
        raise ValueError("this model's LoRWeB layers mix by the analogy query; it cannot be left blank")
    widths = {layer.att_lora_to_q.in_features for layer in lorweb_layers(model).values()}
    if not widths:
        return None
    if len(widths) > 1:
        raise ValueError(f"the LoRWeB layers read queries of different widths: {sorted(widths)}")
    return torch.zeros(batch_size, widths.pop(), device=device)


def set_query(model: nn.Module, query: torch.Tensor | None) -> None:
    """Give every LoRWeB layer the batch's analogy queries [B, Q] (None to clear)."""
    for layer in lorweb_layers(model).values():
        layer.query = query


def export_basis(model: nn.Module, family: str = "flux", metadata: dict[str, str] | None = None) -> LoRABasis:
    """The trained basis as the pack's LoRABasis (the file the Mix LoRA Basis node loads), its metadata recording the
    layers' settings so the file is mixed as it was trained."""
    modules = lorweb_layers(model)
    settings = {m.settings for m in modules.values()}
    if len(settings) != 1:
        raise ValueError(f"the LoRWeB layers were built with {len(settings)} different settings; one basis file "
                         "records one")
    layers = {name: layer.to_basis_layer() for name, layer in modules.items()}
    return LoRABasis({k: type(v)(*(t.float().cpu() for t in (v.A, v.B, v.keys, v.to_q))) for k, v in layers.items()},
                     family=family, metadata={**settings.pop().to_metadata(), **(metadata or {})})
