"""The LoRA of Change objective (eq. 6 + eq. 7) against a plain re-computation with stub models, and gradient flow.

Stub VAE / text encoder / image encoder / UNet make every intermediate value known; the re-computation merges each
sample's generated LoRA into the stub UNet's weights (W ± up·down) instead of using the trainer's hooks, and draws
the random numbers in the trainer's documented order. Flipping the sign of the reverse LoRA, exchanging the B/B′
roles, dropping a term or giving the instruction to the wrong term each make the comparison fail.
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import training.world  # noqa: F401  (the world data source)
from analogy_core.analogy import AnalogyEmbedding, EncoderInfo
from analogy_core.layouts import ModelLayout
from analogy_core.loc import HypernetworkConfig, attention_targets, build_hypernetwork
from training.backbone import HashTokenizer
from training.config import build_config
from training.loc.data import make_pair_dataset
from training.loc.ip2p import IP2PBackbone, schedule
from training.loc.task import (PRESETS, LoCConfig, exchange_pairs, loss_weights, paired_quads, term_prompts,
                                training_loss)

S, C, D, TEXT = 4, 3, 8, 6          # image side, latent channels, UNet width, text width
SCALING = 0.5
ALPHAS = schedule()


def stub_math(linear, sample: torch.Tensor, t: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
    """A tiny UNet-like function: tokens -> self-attention -> cross-attention to text -> channels."""
    b, _, h, w = sample.shape
    hidden = linear("proj_in", sample.flatten(2).transpose(1, 2))
    for attn, context in (("block.attn1", None), ("block.attn2", text)):
        source = hidden if context is None else context
        q, k, v = (linear(f"{attn}.{p}", x) for p, x in (("to_q", hidden), ("to_k", source), ("to_v", source)))
        weights = torch.softmax(q @ k.transpose(1, 2) / math.sqrt(D), dim=-1)
        hidden = hidden + linear(f"{attn}.to_out.0", weights @ v)
    out = linear("proj_out", hidden) + 0.001 * t.view(-1, 1, 1).float()
    return out.transpose(1, 2).reshape(b, C, h, w)


class Attention(nn.Module):
    def __init__(self, context: int):
        super().__init__()
        self.to_q, self.to_k, self.to_v = nn.Linear(D, D), nn.Linear(context, D), nn.Linear(context, D)
        self.to_out = nn.ModuleList([nn.Linear(D, D)])


class StubUNet(nn.Module):
    def __init__(self):
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        self.proj_in, self.proj_out = nn.Linear(2 * C, D), nn.Linear(D, C)
        self.block = nn.Module()
        self.block.attn1, self.block.attn2 = Attention(D), Attention(TEXT)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
        self.requires_grad_(False)

    def forward(self, sample, t, encoder_hidden_states, return_dict=False):
        return (stub_math(lambda name, x: self.get_submodule(name)(x), sample, t, encoder_hidden_states),)


class StubVAE(nn.Module):
    config = SimpleNamespace(scaling_factor=SCALING)

    def __init__(self):
        super().__init__()
        self.anchor = nn.Parameter(torch.zeros(1), requires_grad=False)

    def encode(self, pixels):
        mode = F.avg_pool2d(pixels, 2)
        return SimpleNamespace(latent_dist=SimpleNamespace(mode=lambda: mode))


class StubText(nn.Module):
    def __init__(self):
        super().__init__()
        self.table = nn.Parameter(torch.randn(50, TEXT, generator=torch.Generator().manual_seed(1)),
                                  requires_grad=False)

    def forward(self, ids):
        return (self.table[ids],)


ENCODER = EncoderInfo.describe(3, 3, 224, 14, 2)


class StubEncoder:
    """Patch tokens = the column means of each row (S tokens of width 3): A and A′ reach H, row by row."""

    info = ENCODER

    @staticmethod
    def tokens(images):
        return images.mean(dim=2)

    def encode(self, a, a_prime, b=None):
        embeds = {r: x.mean(dim=(1, 2)) for r, x in (("a", a), ("a_prime", a_prime))}
        return AnalogyEmbedding(ENCODER, embeds, {"a": self.tokens(a), "a_prime": self.tokens(a_prime)})


def stub_backbone() -> IP2PBackbone:
    return IP2PBackbone(StubUNet(), StubVAE(), StubText(), HashTokenizer(50, 4), ALPHAS, "epsilon", tiny=True)


def hypernetwork_for(unet: nn.Module, seed: int = 0):
    shapes = {name: tuple(m.weight.shape) for name, m in unet.named_modules() if isinstance(m, nn.Linear)}
    config = HypernetworkConfig(attention_targets(ModelLayout("sd15", shapes)), token_width=3, encoder=ENCODER,
                                token_count=S, width=16, blocks=1, heads=2, rank=2, ffn=32)
    hypernetwork = build_hypernetwork(config, seed=seed)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for _, view in hypernetwork.u_b_parameters():
            view.copy_(torch.randn(view.shape, generator=gen) * 0.3)
    return hypernetwork


def batch_of(n: int = 3, seed: int = 0) -> dict:
    gen = torch.Generator().manual_seed(seed)
    return {"a": torch.rand(n, S, S, 3, generator=gen), "a_prime": torch.rand(n, S, S, 3, generator=gen),
            "prompt": ["make it red", "add a hat", "zebra"][:n]}


def with_queries(batch: dict, seed: int = 9) -> dict:
    """The batch with its own B, B′ (another image edited: here random, unlike any flip of A, A′)."""
    gen = torch.Generator().manual_seed(seed)
    return batch | {k: torch.rand(batch["a"].shape, generator=gen) for k in ("b", "b_prime")}


def cfg_for(**overrides) -> LoCConfig:
    return build_config(LoCConfig, PRESETS, "tiny", None, [f"{k}={v}" for k, v in overrides.items()])


def expected_loss(hypernetwork, backbone: IP2PBackbone, batch: dict, cfg: LoCConfig, seed: int,
                  reverse_sign: float = -1.0, swap_roles: bool = False, text_to: str = "matching") -> torch.Tensor:
    """Eq. (6) + eq. (7) written out sample by sample, drawing in the trainer's documented order."""
    gen = torch.Generator().manual_seed(seed)
    a, a_prime = batch["a"].clone(), batch["a_prime"].clone()
    n = len(a)
    exchanged = torch.zeros(n, dtype=torch.bool)
    if cfg.random_exchange:
        exchanged = torch.rand(n, generator=gen) < cfg.exchange_probability
        for i in torch.nonzero(exchanged).flatten().tolist():
            a[i], a_prime[i] = batch["a_prime"][i].clone(), batch["a"][i].clone()
    if cfg.query_source == "dataset":  # the batch's own B, B′, exchanged with their pair; no flip draw
        b, b_prime = batch["b"].clone(), batch["b_prime"].clone()
        for i in torch.nonzero(exchanged).flatten().tolist():
            b[i], b_prime[i] = batch["b_prime"][i].clone(), batch["b"][i].clone()
    else:
        flip = torch.rand(n, generator=gen) < cfg.flip_probability
        b = torch.stack([x.flip(1) if f else x for x, f in zip(a, flip)])
        b_prime = torch.stack([x.flip(1) if f else x for x, f in zip(a_prime, flip)])
    keep = torch.rand(2 * n, generator=gen) >= cfg.text_dropout
    forward_text = [not x if text_to == "matching" else True for x in exchanged.tolist()]
    texts = [[p if (forward_text[i] if k == 0 else not forward_text[i]) and keep[k * n + i]
              and cfg.text_conditioning else "" for i, p in enumerate(batch["prompt"])] for k in range(2)]
    factors = hypernetwork(StubEncoder.tokens(a), StubEncoder.tokens(a_prime))
    terms = 2 if cfg.lora_reverse else 1
    t = torch.randint(0, 1000, (terms * n,), generator=gen)
    mode = lambda img: F.avg_pool2d(img.permute(2, 0, 1).unsqueeze(0) * 2 - 1, 2)  # noqa: E731
    noise = torch.randn(terms * n, C, S // 2, S // 2, generator=gen)
    unet, total = backbone.unet, 0.0
    for k in range(terms):
        errors = []
        for i in range(n):
            target, condition = (b_prime[i], b[i]) if (k == 0) != swap_roles else (b[i], b_prime[i])
            sign = 1.0 if k == 0 else reverse_sign
            weights = {name: m.weight for name, m in unet.named_modules() if isinstance(m, nn.Linear)}
            for path, (down, up) in factors.layers.items():
                weights[path] = weights[path] + sign * up[i] @ down[i]

            def linear(name, x):
                return F.linear(x, weights[name], unet.get_submodule(name).bias)

            x0 = mode(target) * SCALING
            ab = ALPHAS[t[k * n + i]].float()
            x_t = ab.sqrt() * x0 + (1 - ab).sqrt() * noise[k * n + i]
            ids = HashTokenizer(50, 4)([texts[k][i]])
            out = stub_math(linear, torch.cat([x_t, mode(condition)], dim=1), t[k * n + i: k * n + i + 1],
                            backbone.text_encoder.table[ids])
            x0_error = ((x_t - (1 - ab).sqrt() * out) / ab.sqrt() - x0) ** 2   # eqs. 6-7 as written
            if cfg.loss_space == "x0":
                errors.append(x0_error)
            elif cfg.loss_space == "x0_clamped":  # x0 error with its weight (1-ᾱ)/ᾱ over ε clamped
                errors.append(x0_error * min(1.0, cfg.x0_weight_max * ab / (1 - ab)))
            else:
                errors.append((out - noise[k * n + i]) ** 2)
        total = total + torch.cat(errors).mean()
    return total


@pytest.mark.parametrize("overrides", [{}, {"loss_space": "x0"}, {"loss_space": "x0_clamped"},
                                       {"random_exchange": False}, {"lora_reverse": False},
                                       {"text_conditioning": True, "text_dropout": 0.5},
                                       {"query_source": "dataset"}])
def test_loss_equals_the_written_out_eqs_6_and_7(overrides):
    cfg = cfg_for(**{"text_dropout": 0.0, **overrides})
    backbone, batch = stub_backbone(), with_queries(batch_of())
    hypernetwork = hypernetwork_for(backbone.unet)
    parts = {}
    got = training_loss(hypernetwork, backbone, StubEncoder(), batch, cfg, torch.Generator().manual_seed(7), "cpu",
                        parts)
    want = expected_loss(hypernetwork, backbone, batch, cfg, seed=7)
    assert got.item() > 0 and torch.allclose(got, want, rtol=1e-5), (got, want)
    assert set(parts) == ({"eq6", "eq7"} if cfg.lora_reverse else {"eq6"})
    torch.testing.assert_close(sum(parts.values()), got.detach())
    if cfg.lora_reverse:  # the comparison is sensitive to exactly the mistakes that matter
        for mutation in (dict(reverse_sign=1.0), dict(swap_roles=True)):
            wrong = expected_loss(hypernetwork, backbone, batch, cfg, seed=7, **mutation)
            assert not torch.allclose(got, wrong, rtol=1e-3), mutation


def test_the_loss_spaces_differ_and_epsilon_is_the_default():
    """The three loss spaces give three different losses on the same draws (so each comparison above is real)."""
    assert LoCConfig().loss_space == "epsilon" and not LoCConfig().text_conditioning
    backbone, batch = stub_backbone(), batch_of()
    hypernetwork = hypernetwork_for(backbone.unet)
    losses = [training_loss(hypernetwork, backbone, StubEncoder(), batch, cfg_for(loss_space=space),
                            torch.Generator().manual_seed(7), "cpu").item()
              for space in ("epsilon", "x0", "x0_clamped")]
    assert len({round(v, 6) for v in losses}) == 3, losses


def test_per_timestep_weights_against_the_written_out_formula():
    """x0: (1 − ᾱ_t)/ᾱ_t with ᾱ from SD's scaled-linear betas written out here (214 at t = 999, t ≥ 500 carrying
    98 % of the weight); x0_clamped: the same clamped at x0_weight_max; epsilon: 1."""
    betas = [(0.00085 ** 0.5 + (0.012 ** 0.5 - 0.00085 ** 0.5) * i / 999) ** 2 for i in range(1000)]
    alpha_bar, product = [], 1.0
    for beta in betas:
        product *= 1 - beta
        alpha_bar.append(product)
    written = [(1 - a) / a for a in alpha_bar]
    assert 210 < written[999] < 218 and sum(written[500:]) / sum(written) > 0.97
    ab = torch.tensor(alpha_bar, dtype=torch.float64)
    torch.testing.assert_close(ALPHAS.double(), ab, rtol=1e-5, atol=1e-7)  # the schedule is float32
    torch.testing.assert_close(loss_weights(ab, "x0"), torch.tensor(written, dtype=torch.float64))
    torch.testing.assert_close(loss_weights(ab, "x0_clamped", 5.0),
                               torch.tensor([min(w, 5.0) for w in written], dtype=torch.float64))
    assert torch.equal(loss_weights(ab, "epsilon"), torch.ones(1000, dtype=torch.float64))
    assert float(loss_weights(ab, "x0_clamped", 5.0).max()) == 5.0


def test_no_text_by_default():
    """Eqs. 6-8 have no text: by default the instruction does not reach the loss; with text_conditioning it does."""
    backbone = stub_backbone()
    hypernetwork = hypernetwork_for(backbone.unet)
    for text, reaches in ((False, False), (True, True)):
        cfg = cfg_for(text_dropout=0.0, random_exchange=False, text_conditioning=text)
        values = [training_loss(hypernetwork, backbone, StubEncoder(), batch_of() | {"prompt": prompts}, cfg,
                                torch.Generator().manual_seed(1), "cpu") for prompts in (["", "", ""], ["x y"] * 3)]
        assert bool(not torch.isclose(*values)) == reaches, (text, values)


def test_the_instruction_goes_to_the_term_of_its_direction():
    cfg = cfg_for(text_dropout=0.0, text_conditioning=True)
    backbone, batch = stub_backbone(), batch_of()
    hypernetwork = hypernetwork_for(backbone.unet)
    gen_seed = 0  # a seed with both exchanged and kept samples
    swap = torch.rand(3, generator=torch.Generator().manual_seed(gen_seed)) < 0.5
    assert 0 < int(swap.sum()) < 3
    got = training_loss(hypernetwork, backbone, StubEncoder(), batch, cfg, torch.Generator().manual_seed(gen_seed),
                        "cpu")
    right = expected_loss(hypernetwork, backbone, batch, cfg, seed=gen_seed)
    wrong = expected_loss(hypernetwork, backbone, batch, cfg, seed=gen_seed, text_to="always_forward")
    assert torch.allclose(got, right, rtol=1e-5) and not torch.allclose(got, wrong, rtol=1e-4)


def test_every_input_reaches_the_loss():
    """A, A′ and the prompt each change the loss (so the comparisons above are not void)."""
    cfg = cfg_for(text_dropout=0.0, random_exchange=False, text_conditioning=True)
    backbone = stub_backbone()
    hypernetwork = hypernetwork_for(backbone.unet)

    def loss(batch):
        return training_loss(hypernetwork, backbone, StubEncoder(), batch, cfg, torch.Generator().manual_seed(1),
                             "cpu")

    base = loss(batch_of())
    for key in ("a", "a_prime", "prompt"):
        batch = batch_of()
        batch[key] = ["other words"] * 3 if key == "prompt" else batch[key].flip(1)
        assert not torch.isclose(loss(batch), base), f"{key} does not reach the loss"


def test_pair_augmentations():
    batch = batch_of(4)
    swapped, mask = exchange_pairs(batch, torch.Generator().manual_seed(0), 1.0)
    assert mask.all() and torch.equal(swapped["a"], batch["a_prime"]) and torch.equal(swapped["a_prime"], batch["a"])
    kept, mask = exchange_pairs(batch, torch.Generator().manual_seed(0), 0.0)
    assert not mask.any() and torch.equal(kept["a"], batch["a"])
    rates = exchange_pairs(batch_of(3) | {"a": torch.rand(4000, 1, 1, 3), "a_prime": torch.rand(4000, 1, 1, 3)},
                           torch.Generator().manual_seed(0), 0.5)[1].float().mean()
    assert 0.45 < rates < 0.55
    quads = paired_quads(batch, torch.Generator().manual_seed(0), 1.0)
    assert torch.equal(quads["b"], batch["a"].flip(2)) and torch.equal(quads["b_prime"], batch["a_prime"].flip(2))
    quads = paired_quads(batch, torch.Generator().manual_seed(0), 0.0)
    assert torch.equal(quads["b"], batch["a"]) and torch.equal(quads["b_prime"], batch["a_prime"])
    flips = paired_quads(batch_of(1) | {"a": torch.rand(400, 2, 2, 3), "a_prime": torch.rand(400, 2, 2, 3)},
                         torch.Generator().manual_seed(1), 0.5)
    same_flip = [torch.equal(b, a.flip(1)) == torch.equal(bp, ap.flip(1))
                 for a, ap, b, bp in zip(*(flips[k] for k in ("a", "a_prime", "b", "b_prime")))]
    assert all(same_flip), "B and B′ take the same flip"
    forward, reverse = term_prompts(["x", "y"], torch.tensor([False, True]), 0.0, torch.Generator())
    assert forward == ["x", ""] and reverse == ["", "y"]
    dropped = term_prompts(["x"] * 2000, torch.zeros(2000, dtype=torch.bool), 0.05, torch.Generator().manual_seed(0))
    assert 60 < dropped[0].count("") < 140 and set(dropped[1]) == {""}


def test_the_two_terms_drop_their_texts_with_their_own_draws():
    """Text dropout draws 2n numbers: the first n decide eq. 6's texts, the last n eq. 7's (written out here), so
    the two terms of one sample are dropped independently."""
    n, dropout = 400, 0.3
    prompts = [f"p{i}" for i in range(n)]
    exchanged = torch.arange(n) % 2 == 1  # half of the instructions go to eq. 7
    forward, reverse = term_prompts(prompts, exchanged, dropout, torch.Generator().manual_seed(3))
    keep = torch.rand(2 * n, generator=torch.Generator().manual_seed(3)) >= dropout
    assert not torch.equal(keep[:n], keep[n:]), "the draws differ, or the check is of one mask"
    for i, prompt in enumerate(prompts):
        to_forward = not bool(exchanged[i])
        assert forward[i] == (prompt if to_forward and keep[i] else ""), i
        assert reverse[i] == (prompt if not to_forward and keep[n + i] else ""), i


@pytest.fixture(scope="module")
def tiny_parts():
    from training.backbone import load_query_encoder
    from training.loc.ip2p import tiny_ip2p
    from training.loc.task import hypernetwork_config

    backbone, encoder = tiny_ip2p(seed=0), load_query_encoder("tiny", seed=0)
    cfg = cfg_for()
    return cfg, backbone, encoder, hypernetwork_config(cfg, backbone, encoder)


def test_gradients_reach_only_the_hypernetwork(tiny_parts):
    cfg, backbone, encoder, config = tiny_parts
    hypernetwork = build_hypernetwork(config, seed=0)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for _, view in hypernetwork.u_b_parameters():
            view.copy_(torch.randn(view.shape, generator=gen) * 0.01)
    data = make_pair_dataset("world", cfg.resolution)
    items = [data[i] for i in range(2)]
    batch = {"a": torch.stack([x["a"] for x in items]), "a_prime": torch.stack([x["a_prime"] for x in items]),
             "prompt": ["", ""]}
    loss = training_loss(hypernetwork, backbone, encoder, batch, cfg, torch.Generator().manual_seed(0), "cpu")
    loss.backward()
    for name, param in hypernetwork.named_parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0, f"no gradient reaches {name}"
    for part, module in (("unet", backbone.unet), ("vae", backbone.vae), ("text", backbone.text_encoder),
                         ("image encoder", encoder.model)):
        for name, param in module.named_parameters():
            assert not param.requires_grad and param.grad is None, f"{part}.{name} is not frozen"


def test_a_fresh_hypernetwork_learns_through_u_b_only_at_first(tiny_parts):
    """At eq. 11's initialisation ΔW = U_B·U_A = 0, so only the U_B outputs receive gradient on the first step."""
    cfg, backbone, encoder, config = tiny_parts
    hypernetwork = build_hypernetwork(config, seed=0)
    batch = {"a": torch.rand(2, 32, 32, 3), "a_prime": torch.rand(2, 32, 32, 3), "prompt": ["", ""]}
    training_loss(hypernetwork, backbone, encoder, batch, cfg, torch.Generator().manual_seed(0), "cpu").backward()
    r = config.rank
    for target, head in zip(config.targets, hypernetwork.heads):
        split = target.down_width(r)
        assert head.weight.grad[split:].abs().sum() > 0 and head.weight.grad[:split].abs().sum() == 0


def test_dataset_queries_reach_the_loss_and_pairs_are_refused(tmp_path):
    """query_source: dataset trains on the data's own B, B′ (each reaches the loss; with flips they do not), and a
    pair-only batch or source is refused by name."""
    backbone = stub_backbone()
    hypernetwork = hypernetwork_for(backbone.unet)
    batch = with_queries(batch_of())

    def loss(cfg, data):
        return training_loss(hypernetwork, backbone, StubEncoder(), data, cfg, torch.Generator().manual_seed(2), "cpu")

    for source, reaches in (("dataset", True), ("flips", False)):
        cfg = cfg_for(text_dropout=0.0, query_source=source)
        base = loss(cfg, batch)
        for key in ("b", "b_prime"):
            changed = loss(cfg, batch | {key: batch[key].flip(1)})
            assert bool(not torch.isclose(changed, base)) == reaches, (source, key)
    with pytest.raises(ValueError, match="needs quad data .* no b, b_prime"):
        loss(cfg_for(query_source="dataset"), batch_of())
    with pytest.raises(ValueError, match="query_source must be one of"):
        cfg_for(query_source="quads")
    (tmp_path / "pairs.jsonl").write_text("")
    with pytest.raises(ValueError, match="'pairs' data gives a, a_prime but loc needs"):
        make_pair_dataset(f"pairs:{tmp_path / 'pairs.jsonl'}", 8, quads=True)
    quads = make_pair_dataset("world", 16, quads=True)
    assert {"a", "a_prime", "b", "b_prime"} <= set(quads[0])


def test_exchange_swaps_both_pairs_of_a_quad():
    batch = with_queries(batch_of(4))
    pairs = (("a", "a_prime"), ("b", "b_prime"))
    swapped, mask = exchange_pairs(batch, torch.Generator().manual_seed(0), 0.5, pairs)
    assert 0 < int(mask.sum()) < 4
    for i, m in enumerate(mask.tolist()):
        for first, second in pairs:
            want = (batch[second][i], batch[first][i]) if m else (batch[first][i], batch[second][i])
            assert torch.equal(swapped[first][i], want[0]) and torch.equal(swapped[second][i], want[1])


# ---------------------------------------------------------------------------------------------------------------------
# added by the mutation sweep: the parametrisations, the DDIM sampler, the configured probabilities and clamp, the
# sample rows and the trainable encoder's tokens, each against a written-out computation


def test_each_prediction_type_gives_back_the_x0_and_noise_it_was_made_from():
    """x_t = √ᾱ·x0 + √(1−ᾱ)·ε; an ε-, v- (v = √ᾱ·ε − √(1−ᾱ)·x0) or x0-predicting UNet's exact output maps back to
    that x0 and that ε."""
    from training.loc.ip2p import add_noise, to_epsilon, to_x0

    gen = torch.Generator().manual_seed(0)
    x0 = torch.randn(4, C, 2, 2, generator=gen, dtype=torch.float64)
    eps = torch.randn(4, C, 2, 2, generator=gen, dtype=torch.float64)
    ab = ALPHAS[torch.tensor([0, 250, 700, 999])].view(-1, 1, 1, 1)
    x_t = ab.sqrt() * x0 + (1 - ab).sqrt() * eps
    torch.testing.assert_close(add_noise(x0, eps, ab), x_t)
    outputs = {"epsilon": eps, "v_prediction": ab.sqrt() * eps - (1 - ab).sqrt() * x0, "sample": x0}
    assert not torch.allclose(outputs["epsilon"], outputs["v_prediction"])  # the three outputs are different tensors
    for kind, out in outputs.items():
        torch.testing.assert_close(to_x0(out, x_t, ab, kind), x0, msg=kind)
        torch.testing.assert_close(to_epsilon(out, x_t, ab, kind), eps, msg=kind)


class VPredictionUNet(StubUNet):
    """The stub UNet re-parametrised: it outputs the v = √ᾱ·ε̂ − √(1−ᾱ)·x̂0 of the ε̂ the stub predicts."""

    def forward(self, sample, t, encoder_hidden_states, return_dict=False):
        eps = super().forward(sample, t, encoder_hidden_states)[0].double()
        ab = ALPHAS[t.long()].view(-1, 1, 1, 1)
        x_t = sample[:, :C].double()
        x0 = (x_t - (1 - ab).sqrt() * eps) / ab.sqrt()
        return ((ab.sqrt() * eps - (1 - ab).sqrt() * x0).float(),)


def test_the_loss_reads_the_backbones_prediction_type():
    """A v-predicting UNet that implies the same noise as the ε-predicting one gives the same loss; read as ε (the
    wrong prediction type) it does not."""
    cfg = cfg_for(text_dropout=0.0)
    batch = batch_of()
    eps_backbone = stub_backbone()
    hypernetwork = hypernetwork_for(eps_backbone.unet)

    def loss(unet, kind):
        backbone = IP2PBackbone(unet, StubVAE(), StubText(), HashTokenizer(50, 4), ALPHAS, kind, tiny=True)
        return training_loss(hypernetwork, backbone, StubEncoder(), batch, cfg, torch.Generator().manual_seed(7),
                             "cpu")

    base = loss(eps_backbone.unet, "epsilon")
    misread = loss(VPredictionUNet(), "epsilon")
    assert not torch.isclose(misread, base, rtol=1e-2), (misread, base)
    torch.testing.assert_close(loss(VPredictionUNet(), "v_prediction"), base, rtol=1e-4, atol=1e-6)


def test_ddim_is_eq_8_from_t_max_down_to_the_last_x0():
    """Eq. (8) written out: timesteps 999 → 0 evenly; x_{prev} = √ᾱ_prev·x̂0 + √(1−ᾱ_prev)·ε̂ with
    ε̂ = (x_t − √ᾱ_t·x̂0)/√(1−ᾱ_t); the last step returns x̂0 (ᾱ_{−1} = 1)."""
    from training.loc.ip2p import ddim_sample, ddim_timesteps

    assert ddim_timesteps(1000, 4) == [999, 666, 333, 0] and ddim_timesteps(1000, 1) == [999]
    seen = []

    def x0_model(x, t):
        seen.append((x.clone(), int(t[0])))
        return 0.6 * x.flip(-1) + 0.001 * t.view(-1, 1, 1, 1).float()

    noise = torch.randn(2, C, 2, 2, generator=torch.Generator().manual_seed(0))
    got = ddim_sample(x0_model, noise, ALPHAS, 4)
    assert [t for _, t in seen] == [999, 666, 333, 0]
    x = noise
    for k, t in enumerate([999, 666, 333, 0]):
        torch.testing.assert_close(seen[k][0], x)
        a_t = float(ALPHAS[t])
        a_prev = float(ALPHAS[[666, 333, 0][k]]) if k < 3 else 1.0
        x0 = 0.6 * x.flip(-1) + 0.001 * t
        eps = (x - a_t ** 0.5 * x0) / (1 - a_t) ** 0.5
        x = a_prev ** 0.5 * x0 + (1 - a_prev) ** 0.5 * eps
    torch.testing.assert_close(got, x)
    torch.testing.assert_close(got, 0.6 * seen[-1][0].flip(-1))   # the last step is the model's x̂0 at t = 0


class RoundTripVAE(StubVAE):
    """The stub VAE with a decoder that inverts it on 2×2-constant images (nearest upsampling of the mode)."""

    def decode(self, latents):
        return SimpleNamespace(sample=F.interpolate(latents, scale_factor=2, mode="nearest"))


def round_trip_backbone() -> IP2PBackbone:
    return IP2PBackbone(StubUNet(), RoundTripVAE(), StubText(), HashTokenizer(50, 4), ALPHAS, "epsilon", tiny=True)


def test_decode_undoes_the_scaling_factor_of_the_denoised_latent():
    """The latent to denoise is mode·scaling_factor, so decoding divides by it: an image the stub VAE represents
    exactly (constant 2×2 blocks) comes back from encode → decode."""
    backbone = round_trip_backbone()
    blocks = torch.rand(2, S // 2, S // 2, 3, generator=torch.Generator().manual_seed(0))
    images = blocks.repeat_interleave(2, dim=1).repeat_interleave(2, dim=2)
    z, condition = backbone.encode_images(images)
    assert not torch.allclose(z, condition)      # the two latents differ by the scaling factor
    torch.testing.assert_close(backbone.decode(z), images)


def test_x0_weight_max_is_the_configured_clamp():
    """x0_clamped: min((1 − ᾱ)/ᾱ, x0_weight_max) with the configured maximum, in loss_weights and in the loss."""
    weights = loss_weights(ALPHAS, "x0_clamped", 2.0)
    written = [min((1 - a) / a, 2.0) for a in ALPHAS.tolist()]
    torch.testing.assert_close(weights, torch.tensor(written, dtype=torch.float64))
    assert float(weights.max()) == 2.0
    backbone, batch = stub_backbone(), batch_of()
    hypernetwork = hypernetwork_for(backbone.unet)
    losses = {}
    for cap in (0.05, 5.0):
        cfg = cfg_for(text_dropout=0.0, loss_space="x0_clamped", x0_weight_max=cap)
        losses[cap] = training_loss(hypernetwork, backbone, StubEncoder(), batch, cfg,
                                    torch.Generator().manual_seed(7), "cpu")
        want = expected_loss(hypernetwork, backbone, batch, cfg, seed=7)
        assert torch.allclose(losses[cap], want, rtol=1e-5), (cap, losses[cap], want)
    assert not torch.isclose(losses[0.05], losses[5.0], rtol=1e-3), losses


@pytest.mark.parametrize("exchange, flip", [(1.0, 1.0), (0.0, 0.0), (0.9, 0.1)])
def test_the_configured_exchange_and_flip_probabilities_are_used(exchange, flip):
    cfg = cfg_for(text_dropout=0.0, exchange_probability=exchange, flip_probability=flip)
    backbone, batch = stub_backbone(), batch_of()
    hypernetwork = hypernetwork_for(backbone.unet)
    got = training_loss(hypernetwork, backbone, StubEncoder(), batch, cfg, torch.Generator().manual_seed(7), "cpu")
    want = expected_loss(hypernetwork, backbone, batch, cfg, seed=7)
    default = expected_loss(hypernetwork, backbone, batch, cfg_for(text_dropout=0.0), seed=7)
    assert not torch.allclose(want, default, rtol=1e-3), "these probabilities must change the draws' outcome"
    assert torch.allclose(got, want, rtol=1e-5), (got, want)


def test_sample_rows_are_a_a_prime_b_plus_h_on_b_and_minus_h_on_a_prime():
    """samples/step_N.png: A | A′ | B (another item's A) | H(A, A′) applied to B | −H(A, A′) applied to A′."""
    from training.loc.task import edit_images, sample_rows

    backbone, batch = round_trip_backbone(), batch_of()
    hypernetwork = hypernetwork_for(backbone.unet)
    rows = sample_rows(hypernetwork, backbone, StubEncoder(), batch, steps=2, seed=3)
    a, a_prime = batch["a"], batch["a_prime"]
    b = torch.stack([a[(i - 1) % 3] for i in range(3)])
    factors = hypernetwork(StubEncoder.tokens(a), StubEncoder.tokens(a_prime))
    plus_on_b = edit_images(backbone, factors, b, 2, 3)
    minus_on_a_prime = edit_images(backbone, factors.scaled(-1.0), a_prime, 2, 3)
    plus_on_a_prime = edit_images(backbone, factors, a_prime, 2, 3)
    assert not torch.allclose(minus_on_a_prime, plus_on_a_prime, atol=1e-4), "the sign of H must show"
    assert not torch.allclose(b, a)
    columns = rows.split(S, dim=2)
    for got, want in zip(columns, (a, a_prime, b, plus_on_b, minus_on_a_prime)):
        torch.testing.assert_close(got, want)


def test_a_trainable_image_encoder_reads_the_same_tokens_as_encode_analogy(tiny_parts):
    """image_encoder_learning_rate > 0: H and E as one module generate, before any step, exactly the LoRA H
    generates from the frozen encoder's tokens (the penultimate hidden states, as Encode Analogy gives them)."""
    from training.loc.task import HypernetworkAndEncoder, encode_pair

    _, _, encoder, config = tiny_parts
    hypernetwork = build_hypernetwork(config, seed=0)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for _, view in hypernetwork.u_b_parameters():
            view.copy_(torch.randn(view.shape, generator=gen) * 0.01)
    a, a_prime = torch.rand(2, 32, 32, 3, generator=gen), torch.rand(2, 32, 32, 3, generator=gen)
    tokens = encode_pair(encoder, a, a_prime, "cpu")
    want = hypernetwork(*tokens)
    last = encoder.model(pixel_values=torch.randn(1, 3, encoder.model.config.image_size,
                                                  encoder.model.config.image_size), output_hidden_states=True)
    assert not torch.allclose(last.hidden_states[-1], last.hidden_states[-2])   # the layer read matters
    with torch.no_grad():
        got = HypernetworkAndEncoder(hypernetwork, encoder.model)(a, a_prime)
    for path, (down, up) in want.layers.items():
        torch.testing.assert_close(got.layers[path][0], down, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(got.layers[path][1], up, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_the_prediction_target_is_diffusers_and_to_x0_inverts_it(prediction_type):
    """``prediction_target`` (the world UNet's pretraining target) against DDPMScheduler's own: ε, get_velocity, x0;
    and the x0 that ``to_x0`` reads from the target at x_t is x0 itself."""
    from diffusers import DDPMScheduler

    from training.loc.ip2p import SD_SCHEDULE, add_noise, prediction_target, to_x0

    scheduler = DDPMScheduler(**SD_SCHEDULE, prediction_type=prediction_type)
    gen = torch.Generator().manual_seed(4)
    x0, noise = torch.randn(3, 4, 2, 2, generator=gen), torch.randn(3, 4, 2, 2, generator=gen)
    t = torch.tensor([10, 500, 990])
    alpha_bar = scheduler.alphas_cumprod[t].view(-1, 1, 1, 1)
    target = prediction_target(x0, noise, alpha_bar, prediction_type)
    want = {"epsilon": noise, "sample": x0, "v_prediction": scheduler.get_velocity(x0, noise, t)}[prediction_type]
    torch.testing.assert_close(target, want, rtol=1e-5, atol=1e-6)
    x_t = add_noise(x0, noise, alpha_bar)
    torch.testing.assert_close(x_t, scheduler.add_noise(x0, noise, t), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(to_x0(target, x_t, alpha_bar, prediction_type), x0, rtol=1e-3, atol=1e-3)
    with pytest.raises(ValueError, match="prediction_type must be one of"):
        prediction_target(x0, noise, alpha_bar, "flow")
