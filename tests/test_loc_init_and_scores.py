"""LoRA of Change: a fresh H whose generated U_A depends on (A, A′), the exchange scores against a written-out
computation, and the trainable image encoder option."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import training.world  # noqa: F401  (the world data source)
from analogy_core.loc import LoRAFactors, build_hypernetwork, exchange_scores, input_dependence
from training.config import build_config
from training.loc.config import PRESETS, LoCConfig
from training.loc.data import make_pair_dataset


@pytest.fixture(scope="module")
def world_tokens():
    """Tokens of 16 world pairs through the tiny CLIP, and H's config for the tiny InstructPix2Pix."""
    from training.backbone import load_query_encoder
    from training.loc.ip2p import tiny_ip2p
    from training.loc.task import hypernetwork_config

    cfg = build_config(LoCConfig, PRESETS, "tiny", None, [])
    backbone, encoder = tiny_ip2p(seed=0), load_query_encoder("tiny", seed=0)
    data = make_pair_dataset("world", cfg.resolution)
    items = [data[i] for i in range(16)]
    embedding = encoder.encode(torch.stack([x["a"] for x in items]), torch.stack([x["a_prime"] for x in items]))
    return hypernetwork_config(cfg, backbone, encoder), embedding.patch_tokens["a"], embedding.patch_tokens["a_prime"]


def previous_init(hypernetwork) -> None:
    """What reset_parameters did before: queries ~ N(0, 1) and torch's default biases in P and D's feed-forwards."""
    torch.manual_seed(0)
    with torch.no_grad():
        nn.init.normal_(hypernetwork.queries)
        feed_forwards = [m for layer in hypernetwork.decoder.layers for m in (layer.linear1, layer.linear2)]
        for module in [hypernetwork.fuse, *feed_forwards]:
            bound = 1 / math.sqrt(module.in_features)
            nn.init.uniform_(module.bias, -bound, bound)


def test_a_fresh_h_generates_u_a_that_depends_on_the_pair(world_tokens):
    config, tokens_a, tokens_a_prime = world_tokens
    fresh = build_hypernetwork(config, seed=0)
    old = build_hypernetwork(config, seed=0)
    previous_init(old)
    now, before = input_dependence(fresh, tokens_a, tokens_a_prime), input_dependence(old, tokens_a, tokens_a_prime)
    assert now != before                                         # the init under test changes the output
    assert before < 0.25 and now > 0.45, (before, now)
    with torch.no_grad():
        downs = [torch.cat([d.flatten(1) for d, _ in fresh(tokens_a, tokens_a_prime).layers.values()], dim=1)]
    rows = downs[0]
    spread = (rows[1:] - rows[:1]).norm(dim=1) / rows[:1].norm()
    assert spread.min() > 0.3, spread                            # every pair's U_A differs from the first's by > 30 %
    for _, view in fresh.u_b_parameters():                        # eq. 11 stays: U_B starts at zero
        assert torch.count_nonzero(view) == 0


class LinearH(nn.Module):
    """A stand-in H: U_A = M·(mean token of A′ ∓ mean token of A), U_B fixed; ``sign`` −1: H(A′, A) = −H(A, A′)."""

    def __init__(self, sign: float):
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        self.sign = sign
        self.mix = torch.randn(2 * 5, 3, generator=gen)
        self.up = torch.randn(4, 2, generator=gen)

    def forward(self, a, a_prime):
        code = a_prime.mean(1) + (-1 if self.sign < 0 else 1) * a.mean(1)
        down = (code @ self.mix.T).view(-1, 2, 5)
        layers = {"x": (down, self.up.expand(len(a), -1, -1)), "y": (down * 2, self.up.expand(len(a), -1, -1))}
        return LoRAFactors(layers, torch.ones(len(a)))


def written_out_scores(h, a, a_prime):
    """The two scores sample by sample, every ΔW materialised and flattened into one vector per LoRA."""
    def vector(factors, i):
        return torch.cat([(u[i] @ d[i]).flatten() for d, u in factors.layers.values()])
    forward, swapped = h(a, a_prime), h(a_prime, a)
    n = len(a)
    mean = torch.stack([vector(f, i) for f in (forward, swapped) for i in range(n)]).mean(0)
    gaps, cosines = [], []
    for i in range(n):
        f, s = vector(forward, i), vector(swapped, i)
        gaps.append(float((f + s).norm() / f.norm()))
        x, y = s - mean, -(f - mean)
        cosines.append(float(x @ y / (x.norm() * y.norm())))
    return torch.tensor(gaps), torch.tensor(cosines)


def test_exchange_scores_against_a_written_out_computation():
    gen = torch.Generator().manual_seed(1)
    a, a_prime = torch.randn(6, 4, 3, generator=gen), torch.randn(6, 4, 3, generator=gen)
    anti, symmetric = exchange_scores(LinearH(-1), a, a_prime), exchange_scores(LinearH(1), a, a_prime)
    assert torch.allclose(anti["gap"], torch.zeros(6), atol=1e-5)         # H(A′, A) = −H(A, A′): gap 0, cosine 1
    assert torch.allclose(anti["cosine"], torch.ones(6), atol=1e-5)
    assert torch.allclose(symmetric["gap"], torch.full((6,), 2.0))         # order ignored: gap 2, cosine −1
    assert torch.allclose(symmetric["cosine"], -torch.ones(6), atol=1e-5)

    class Mixed(LinearH):                                                  # neither: compare with the loop
        def forward(self, a, a_prime):
            one, other = LinearH(-1)(a, a_prime), LinearH(1)(a.flip(1), a_prime)
            return LoRAFactors({k: (one.layers[k][0] + 0.5 * other.layers[k][0] ** 2, one.layers[k][1])
                                for k in one.layers}, one.scale)
    got = exchange_scores(Mixed(1), a, a_prime)
    gaps, cosines = written_out_scores(Mixed(1), a, a_prime)
    torch.testing.assert_close(got["gap"], gaps, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(got["cosine"], cosines, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(got["cosine"], anti["cosine"])


def test_self_inverse_families_are_the_involutions():
    from training.world import scenes
    from training.world.yardstick.loc import SELF_INVERSE

    image = torch.rand(8, 8, 3, generator=torch.Generator().manual_seed(0))
    involutions = {name for name, family in scenes.FAMILIES.items() if family.kind == "global"
                   and torch.allclose(family.image_fn(family.image_fn(image)), image)}
    assert involutions == set(SELF_INVERSE)


def test_the_image_encoder_trains_in_its_own_group_when_asked(tmp_path):
    from types import SimpleNamespace

    from safetensors import safe_open

    from training.loc.config import ENCODER_FILE
    from training.loc.task import HypernetworkAndEncoder, LoCTask

    frozen = LoCTask(build_config(LoCConfig, PRESETS, "tiny", None, []), SimpleNamespace(device=torch.device("cpu")))
    assert LoCConfig().image_encoder_learning_rate == 0 and frozen.optimizer_groups(frozen.build()) is None
    cfg = build_config(LoCConfig, PRESETS, "tiny", None, ["image_encoder_learning_rate=1e-6"])
    task = LoCTask(cfg, SimpleNamespace(device=torch.device("cpu")))
    model = task.build()
    assert isinstance(model, HypernetworkAndEncoder)
    groups = task.optimizer_groups(model)
    assert [g.get("lr") for g in groups] == [None, 1e-6]
    assert sum(p.numel() for g in groups for p in g["params"]) == sum(p.numel() for p in model.parameters())
    with torch.no_grad():                                        # U_B off zero, so gradients reach E
        for _, view in model.hypernetwork.u_b_parameters():
            view.normal_(std=0.01)
    data = make_pair_dataset("world", cfg.resolution)
    batch = {k: torch.stack([data[i][k] for i in range(2)]) for k in ("a", "a_prime")} | {"prompt": ["", ""]}
    task.loss(model, batch, torch.Generator().manual_seed(0)).backward()
    grads = {n: p.grad for n, p in model.encoder.named_parameters()}
    assert float(grads["vision_model.embeddings.patch_embedding.weight"].abs().sum()) > 0   # through E to its input
    assert all(p.requires_grad for p in model.encoder.parameters())
    task.export(model, tmp_path / "loc_hypernetwork.safetensors", 1)
    with safe_open(str(tmp_path / ENCODER_FILE), "pt") as handle:
        assert set(handle.keys()) == set(model.encoder.state_dict())


def test_the_loc_rows_exchange_figures(world_tokens):
    """The yardstick's per-family figures on stand-in examples: self-inverse families are out of the claim, and the
    init figures exist once U_B is random (a fresh H's LoRA is zero)."""
    from types import SimpleNamespace

    from training.backbone import load_query_encoder
    from training.world.yardstick.loc import SELF_INVERSE, direction_figures, with_random_u_b

    config = world_tokens[0]
    encoder = load_query_encoder("tiny", seed=0)
    gen = torch.Generator().manual_seed(0)
    def item():
        return SimpleNamespace(a=torch.rand(32, 32, 3, generator=gen), a_prime=torch.rand(32, 32, 3, generator=gen))
    examples = {f: [item(), item()] for f in ("invert", "grayscale", "recolour_red_blue", "vflip")}
    figures = direction_figures(with_random_u_b(build_hypernetwork(config, seed=0), 0), encoder, examples, "_init")
    gaps = figures["consistency_gap_by_family_init"]
    assert set(gaps) == set(examples) and all(math.isfinite(v) for v in gaps.values())
    claim = [f for f in ("grayscale", "recolour_red_blue") if f not in SELF_INVERSE]
    assert figures["consistency_gap_claim_init"] == pytest.approx(sum(gaps[f] for f in claim) / len(claim), abs=1e-4)
    assert -1 <= figures["direction_cosine_init"] <= 1


def test_the_init_figures_random_u_b_is_standard_normal_and_touches_only_u_b(world_tokens):
    """``with_random_u_b``: every zero-initialised U_B view becomes N(0, 1) draws from the seed (mean ≈ 0, std ≈ 1,
    negatives as often as positives), the same for the same seed; every other weight stays as built."""
    from training.world.yardstick.loc import with_random_u_b

    config = world_tokens[0]
    fresh = build_hypernetwork(config, seed=0)
    before = {name: p.detach().clone() for name, p in fresh.named_parameters()}
    randomised = with_random_u_b(fresh, 7)
    values = torch.cat([view.flatten() for _, view in randomised.u_b_parameters()])
    assert values.numel() > 1000 and not randomised.training
    assert abs(values.mean().item()) < 0.1 and values.std().item() == pytest.approx(1.0, abs=0.1)
    assert (values < 0).float().mean().item() == pytest.approx(0.5, abs=0.05)
    again = torch.cat([view.flatten() for _, view in with_random_u_b(build_hypernetwork(config, seed=0), 7)
                       .u_b_parameters()])
    assert torch.equal(values, again)
    starts = {f"heads.{i}": target.down_width(config.rank) for i, target in enumerate(config.targets)}
    for name, p in randomised.named_parameters():
        keep = starts.get(name.rpartition(".")[0])  # a head keeps its U_A rows; any other weight all of it
        assert torch.equal(p[:keep], before[name][:keep]), name
    assert len(starts) > 1
