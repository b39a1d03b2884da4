"""The LoRWeB training objective and sampler, each piece against a plain re-computation written here.

Stub VAE / text encoders / query encoder / transformer make every intermediate value known, so a reversed
flow-matching interpolation, a flipped target, a loss over part of the grid, a query without B, captions always
dropped, wrong timestep weights or a sampler stepping the wrong way all fail here.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from analogy_core.analogy import AnalogyEmbedding, EncoderInfo
from analogy_core.lorweb.layer import LoRWeBLinear
from training import flow
from training.lorweb.config import load_config
from training.lorweb.task import drop_captions, reverse_analogies, sample_grid, training_loss
from stub_backbone import StubBackbone, from_tokens, to_tokens

S = 4          # panel side in pixels: the grid is 8 x 8
EMBED = 3      # stub image-embedding width


class StubQueryEncoder:
    info = EncoderInfo.describe(EMBED, 8, 224, 14, 2)
    embed_dim = EMBED

    @staticmethod
    def embed(images):  # mean colour per image: B changes the query, as it must
        return images.mean(dim=(1, 2))

    def encode(self, a, a_prime, b=None):
        embeds = {"a": self.embed(a), "a_prime": self.embed(a_prime), "b": self.embed(b)}
        return AnalogyEmbedding(self.info, embeds)


class StubTransformer(nn.Module):
    """A deterministic function of every input FLUX receives, with one LoRWeB layer so the query matters."""

    def __init__(self):
        super().__init__()
        gen = torch.Generator().manual_seed(3)
        self.proj = LoRWeBLinear(nn.Linear(12, 12), num_entries=4, rank=2, key_dim=4, query_dim=3 * EMBED)
        with torch.no_grad():
            for p in self.proj.parameters():
                p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
        self.calls = []

    def forward(self, hidden_states, encoder_hidden_states, pooled_projections, timestep, img_ids, txt_ids, guidance,
                return_dict=False):
        self.calls.append(dict(hidden=hidden_states.clone(), text=encoder_hidden_states.clone(),
                               timestep=timestep.clone(), img_ids=img_ids.clone(), query=self.proj.query.clone()))
        extra = (encoder_hidden_states.mean(dim=(1, 2)) + pooled_projections.mean(dim=1) + 3 * timestep + guidance)
        return (self.proj(hidden_states) + 0.1 * extra.view(-1, 1, 1),)


def batch_of(n: int = 3, seed: int = 0) -> dict:
    gen = torch.Generator().manual_seed(seed)
    roles = {r: torch.rand(n, S, S, 3, generator=gen) for r in ("a", "a_prime", "b", "b_prime")}
    return {**roles, "prompt": ["make it red", "flip it", "x"][:n]}


def cfg_for(**overrides):
    values = [f"{k}={v}" for k, v in dict(grid_resolution=32, **overrides).items()]
    cfg = load_config("tiny", None, values)
    cfg.grid_resolution = 2 * S  # below the validated minimum on purpose: the stubs work on 8-px grids
    return cfg


def bell_weight(index: int) -> float:
    """ai-toolkit's weight of training timestep ``index`` (of 1000): a bell, minimum shifted to 0, mean 1."""
    values = [math.exp(-2 * ((x - 500) / 1000) ** 2) for x in range(1000)]
    low = min(values)
    return (values[index] - low) / (sum(v - low for v in values) / 1000)


def expected_loss(model: StubTransformer, batch: dict, cfg, seed: int) -> tuple[torch.Tensor, dict]:
    """The LoRWeB objective written out plainly, drawing the random numbers in the trainer's documented order."""
    gen = torch.Generator().manual_seed(seed)
    if cfg.bidirectional_analogy:
        flip = torch.rand(len(batch["a"]), generator=gen) < 0.5
        batch = dict(batch)
        for i in torch.nonzero(flip).flatten().tolist():
            for x, y in (("a", "a_prime"), ("b", "b_prime")):
                batch[x], batch[y] = batch[x].clone(), batch[y].clone()
                batch[x][i], batch[y][i] = batch[y][i].clone(), batch[x][i].clone()
    keep = torch.rand(len(batch["a"]), generator=gen)
    prompts = [p if float(u) >= cfg.caption_dropout else "" for p, u in zip(batch["prompt"], keep)]
    index = torch.randint(0, 999, (len(batch["a"]),), generator=gen)
    t = 1.0 - index.float() / 1000.0
    weight = torch.tensor([bell_weight(int(i)) for i in index])
    # target [a a'; b b'] and reference [a a'; b b], each in latent tokens (stub VAE: pixels * 2 - 1, 2x2 blocks)
    target = torch.cat([torch.cat([batch["a"], batch["a_prime"]], 2), torch.cat([batch["b"], batch["b_prime"]], 2)], 1)
    reference = torch.cat([torch.cat([batch["a"], batch["a_prime"]], 2), torch.cat([batch["b"], batch["b"]], 2)], 1)
    x0, ref = to_tokens(target * 2 - 1), to_tokens(reference * 2 - 1)
    noise = torch.randn(x0.shape, generator=gen)
    x_t = (1 - t.view(-1, 1, 1)) * x0 + t.view(-1, 1, 1) * noise
    query = torch.cat([StubQueryEncoder.embed(batch[r]) for r in ("a", "a_prime", "b")], dim=1)
    model.proj.query = query
    lengths = torch.tensor([float(len(p)) for p in prompts])
    extra = lengths + lengths * 0.5 + 3 * t + cfg.guidance
    pred = (model.proj(torch.cat([x_t, ref], 1)) + 0.1 * extra.view(-1, 1, 1))[:, : x0.shape[1]]
    per_sample = ((pred - (noise - x0)) ** 2).mean(dim=(1, 2))     # all four quadrants of the grid
    return (weight * per_sample).mean(), dict(x_t=x_t, ref=ref, query=query, lengths=lengths, t=t)


@pytest.mark.parametrize("bidirectional", [False, True])
def test_training_loss_equals_the_written_out_objective(bidirectional):
    cfg = cfg_for(bidirectional_analogy=bidirectional, caption_dropout=0.4)
    model, batch = StubTransformer(), batch_of()
    got = training_loss(model, StubBackbone(), StubQueryEncoder(), batch, cfg, torch.Generator().manual_seed(11),
                        "cpu")
    want, parts = expected_loss(model, batch, cfg, seed=11)
    assert got.item() > 0 and torch.allclose(got, want, rtol=1e-5), (got, want)
    call = model.calls[0]
    torch.testing.assert_close(call["hidden"], torch.cat([parts["x_t"], parts["ref"]], 1))
    torch.testing.assert_close(call["query"], parts["query"])
    torch.testing.assert_close(call["timestep"], parts["t"])
    torch.testing.assert_close(call["text"][:, 0, 0], parts["lengths"])
    ids = call["img_ids"]
    assert (ids[: len(ids) // 2, 0] == 0).all() and (ids[len(ids) // 2:, 0] == 1).all(), "reference marked index 1"


def test_the_loss_reads_every_input_it_should():
    """Sanity of the stub set-up: B, B' and the caption each change the loss (else the comparison above is void)."""
    cfg = cfg_for(caption_dropout=0.0)

    def loss(batch):
        return training_loss(StubTransformer(), StubBackbone(), StubQueryEncoder(), batch, cfg,
                             torch.Generator().manual_seed(5), "cpu")

    base = loss(batch_of())
    for change in ("b", "b_prime", "prompt"):
        batch = batch_of()
        batch[change] = ["other words"] * 3 if change == "prompt" else batch[change].flip(1)
        assert not torch.isclose(loss(batch), base), f"{change} does not reach the loss"


def test_caption_dropout_rate():
    prompts = ["caption"] * 4000
    dropped = drop_captions(prompts, 0.05, torch.Generator().manual_seed(0)).count("")
    assert 140 < dropped < 260, dropped  # 200 expected
    assert drop_captions(prompts[:50], 0.0, torch.Generator().manual_seed(0)) == prompts[:50]
    assert set(drop_captions(prompts[:50], 1.0, torch.Generator().manual_seed(0))) == {""}


def test_bidirectional_augmentation_reverses_the_analogy():
    batch = batch_of()
    reversed_all = reverse_analogies(batch, torch.Generator().manual_seed(0), probability=1.0)
    for x, y in (("a", "a_prime"), ("b", "b_prime")):
        assert torch.equal(reversed_all[x], batch[y]) and torch.equal(reversed_all[y], batch[x])
    assert reversed_all["prompt"] == batch["prompt"], "the official loader keeps the caption"
    kept = reverse_analogies(batch, torch.Generator().manual_seed(0), probability=0.0)
    assert all(torch.equal(kept[r], batch[r]) for r in ("a", "a_prime", "b", "b_prime"))


def test_official_timestep_weights_and_grid():
    weights = flow.official_timestep_weights()
    assert weights.shape == (1000,) and weights.mean().item() == pytest.approx(1.0, abs=1e-5)
    for i in (0, 1, 250, 500, 998):
        assert weights[i].item() == pytest.approx(bell_weight(i), rel=1e-4, abs=1e-6)
    t, w = flow.sample_timesteps("official", 5000, torch.Generator().manual_seed(0))
    index = torch.round((1 - t) * 1000).long()
    assert torch.allclose(t, 1 - index.float() / 1000) and index.min() >= 0 and index.max() <= 998
    assert torch.allclose(w, weights[index])
    for kind in ("logit_normal", "uniform"):
        t, w = flow.sample_timesteps(kind, 100, torch.Generator().manual_seed(0))
        assert (t > 0).all() and (t < 1).all() and (w == 1).all()


def test_sampler_integrates_from_noise_at_t1_to_data_at_t0():
    cfg = cfg_for(sample_steps=4)
    model, batch = StubTransformer(), batch_of()
    got = sample_grid(model, StubBackbone(), StubQueryEncoder(), batch, cfg, "cpu", seed=9)
    # plain Euler from t = 1 to t = 0 with the same velocity model
    reference = torch.cat([torch.cat([batch["a"], batch["a_prime"]], 2), torch.cat([batch["b"], batch["b"]], 2)], 1)
    ref = to_tokens(reference * 2 - 1)
    x = torch.randn(ref.shape, generator=torch.Generator().manual_seed(9))
    model.proj.query = torch.cat([StubQueryEncoder.embed(batch[r]) for r in ("a", "a_prime", "b")], dim=1)
    lengths = torch.tensor([float(len(p)) for p in batch["prompt"]])
    for k in range(4):
        t_now, t_next = 1 - k / 4, 1 - (k + 1) / 4
        extra = 1.5 * lengths + 3 * t_now + cfg.guidance
        v = (model.proj(torch.cat([x, ref], 1)) + 0.1 * extra.view(-1, 1, 1))[:, : x.shape[1]]
        x = x + (t_next - t_now) * v
    want = ((from_tokens(x, 2 * S, 2 * S) + 1) / 2)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert [float(c["timestep"][0]) for c in model.calls] == [1.0, 0.75, 0.5, 0.25]


def test_the_configured_guidance_reaches_the_transformer():
    """guidance (FLUX's guidance embedding while training) is the configured value per sample, not the default 1.0."""
    cfg = cfg_for(guidance=3.5, caption_dropout=0.4)
    model, batch = StubTransformer(), batch_of()
    got = training_loss(model, StubBackbone(), StubQueryEncoder(), batch, cfg, torch.Generator().manual_seed(11),
                        "cpu")
    want, _ = expected_loss(model, batch, cfg, seed=11)
    default, _ = expected_loss(model, batch, cfg_for(caption_dropout=0.4), seed=11)
    assert not torch.allclose(want, default, rtol=1e-4), "the guidance must change the loss"
    assert torch.allclose(got, want, rtol=1e-5), (got, want)


def test_the_configured_mixing_is_the_one_the_basis_is_built_and_recorded_with():
    """mixing_settings carries every mixing option of the config (the trainer builds the layers and writes the basis
    header with it): tanh coefficients summed over 2 heads and clamped to [-1, 1], written out here."""
    from training.lorweb.task import mixing_settings

    cfg = cfg_for(lora_softmax=False, mixing_coeffs_type="sum", lora_heads=2, query_mode="ca'-ca+cb")
    settings = mixing_settings(cfg, StubQueryEncoder())
    assert (settings.lora_softmax, settings.mixing_coeffs_type, settings.lora_heads, settings.query_mode) == \
        (False, "sum", 2, "ca'-ca+cb")
    gen = torch.Generator().manual_seed(0)
    projected, keys = torch.randn(3, 4, generator=gen) * 2, torch.randn(5, 4, generator=gen)
    scores = torch.stack([projected[:, 2 * h:2 * h + 2] @ keys[:, 2 * h:2 * h + 2].T / math.sqrt(2) for h in (0, 1)])
    written = torch.tanh(scores).sum(dim=0).clamp(-1.0, 1.0)
    got = settings.mixing_coefficients(projected, keys)
    assert (written < 0).any(), "tanh coefficients can be negative, softmax ones cannot"
    torch.testing.assert_close(got, written)


class DifferenceQueryTransformer(StubTransformer):
    """The stub with a basis that reads a one-embedding-wide query (query modes ca'-ca and ca'-ca+cb)."""

    def __init__(self):
        super().__init__()
        gen = torch.Generator().manual_seed(4)
        self.proj = LoRWeBLinear(nn.Linear(12, 12), num_entries=4, rank=2, key_dim=4, query_dim=EMBED)
        with torch.no_grad():
            for p in self.proj.parameters():
                p.copy_(torch.randn(p.shape, generator=gen) * 0.5)


@pytest.mark.parametrize("mode", ["ca'-ca", "ca'-ca+cb"])
def test_the_loss_queries_with_the_configured_query_mode(mode):
    """query_mode ca'-ca: e_a' − e_a; ca'-ca+cb: e_a' − e_a + e_b (official external queries), written out."""
    cfg = cfg_for(query_mode=mode)
    model, batch = DifferenceQueryTransformer(), batch_of()
    loss = training_loss(model, StubBackbone(), StubQueryEncoder(), batch, cfg, torch.Generator().manual_seed(11),
                         "cpu")
    e = {r: StubQueryEncoder.embed(batch[r]) for r in ("a", "a_prime", "b")}
    want = e["a_prime"] - e["a"] + (e["b"] if mode.endswith("+cb") else 0)
    assert loss.item() > 0
    torch.testing.assert_close(model.calls[0]["query"], want)


class CountingQueryEncoder(StubQueryEncoder):
    def __init__(self):
        self.calls = 0

    def encode(self, a, a_prime, b=None):
        self.calls += 1
        return super().encode(a, a_prime, b)


class OneEntryTransformer(StubTransformer):
    """The stub with a basis of ``entries`` entries mixed by softmax (or tanh)."""

    def __init__(self, entries: int = 1, softmax: bool = True):
        super().__init__()
        from analogy_core.lorweb.settings import LoRWeBSettings

        gen = torch.Generator().manual_seed(5)
        self.proj = LoRWeBLinear(nn.Linear(12, 12), num_entries=entries, rank=2, key_dim=4, query_dim=3 * EMBED,
                                 settings=LoRWeBSettings(lora_softmax=softmax))
        with torch.no_grad():
            for p in self.proj.parameters():
                p.copy_(torch.randn(p.shape, generator=gen) * 0.5)


def query_changes_output(model: StubTransformer) -> bool:
    x = torch.randn(2, 5, 12, generator=torch.Generator().manual_seed(1))
    outs = []
    for seed in (2, 3):
        model.proj.query = torch.randn(2, 3 * EMBED, generator=torch.Generator().manual_seed(seed)) * 3
        outs.append(model.proj(x))
    return not torch.equal(*outs)


def loss_and_grads(model: StubTransformer, encoder, batch: dict, cfg) -> tuple[torch.Tensor, dict]:
    model.zero_grad()
    loss = training_loss(model, StubBackbone(), encoder, batch, cfg, torch.Generator().manual_seed(11), "cpu")
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_a_basis_that_cannot_read_the_query_is_trained_without_running_the_encoder(monkeypatch):
    """A one-entry softmax basis (the yardstick's LoRA ceiling) gets coefficient 1 from any query, so the trainer
    skips the frozen query encoder: the loss and every gradient are exactly those of the encoded query. A basis that
    reads the query (several entries, or tanh) is still given it."""
    from analogy_core.lorweb.layer import blank_query, reads_query

    cfg = cfg_for(caption_dropout=0.0)
    plain = nn.Sequential(nn.Linear(4, 4))  # a full fine-tune's model: no LoRWeB layer, so no query at all
    assert not reads_query(plain) and blank_query(plain, 3) is None
    with pytest.raises(ValueError, match="mix by the analogy query"):
        blank_query(OneEntryTransformer(4), 3)
    for model, reads in ((OneEntryTransformer(), False), (OneEntryTransformer(4), True),
                         (OneEntryTransformer(1, softmax=False), True)):
        assert query_changes_output(model) == reads == reads_query(model), model.proj.num_entries
    model, encoder, batch = OneEntryTransformer(), CountingQueryEncoder(), batch_of()
    loss, grads = loss_and_grads(model, encoder, batch, cfg)
    assert encoder.calls == 0 and torch.equal(model.calls[-1]["query"], torch.zeros(3, 3 * EMBED))
    # the same step with the encoded query, forced through a layer that claims to read it
    with monkeypatch.context() as patch:
        patch.setattr(LoRWeBLinear, "reads_query", property(lambda self: True))
        want_loss, want_grads = loss_and_grads(model, encoder, batch, cfg)
    assert encoder.calls == 1 and not torch.equal(model.calls[-1]["query"], model.calls[0]["query"])
    assert loss.item() > 0 and torch.equal(loss, want_loss)
    assert grads["proj.lora_B"].abs().sum() > 0
    for name, grad in grads.items():
        assert torch.equal(grad, want_grads[name]), name
    # the keys and query projection, which could only get zero gradients, are frozen
    assert grads.keys() == want_grads.keys() and not {"proj.lora_keys", "proj.att_lora_to_q.weight"} & set(grads)
    assert not model.proj.lora_keys.requires_grad and not model.proj.att_lora_to_q.weight.requires_grad
    for model in (OneEntryTransformer(4), OneEntryTransformer(1, softmax=False)):
        encoder = CountingQueryEncoder()
        loss_and_grads(model, encoder, batch, cfg)
        assert encoder.calls == 1


def test_uniform_timesteps_stay_inside_the_open_interval():
    """uniform: t ~ U(0, 1) clamped to [0.001, 0.999] (written out on the same draws, which do fall below 0.001)."""
    t, w = flow.sample_timesteps("uniform", 20000, torch.Generator().manual_seed(0))
    raw = torch.rand(20000, generator=torch.Generator().manual_seed(0))
    assert (raw < 1e-3).any(), "the draws must reach below the clamp for this check to mean anything"
    torch.testing.assert_close(t, raw.clamp(1e-3, 1 - 1e-3))
    assert float(t.min()) == pytest.approx(1e-3) and float(t.max()) == pytest.approx(1 - 1e-3) and (w == 1).all()
