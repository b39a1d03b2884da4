"""The probe settings of the world's InstructPix2Pix-like UNet (training/world/instruct_pix2pix.py) and the
self-attention entropy its build reports: each setting changes what it says it changes, the defaults build the
version-1 UNet, and the entropy is the attention maps' own (against a reference computed from the maps diffusers
itself produces)."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from diffusers import UNet2DConditionModel
from diffusers.models.attention_processor import AttnProcessor

from training.backbone import HashTokenizer
from training.loc.ip2p import SD_SCHEDULE, schedule
from training.world.instruct_pix2pix import (
    ATTENTION_POSITION_SEED,
    TEXT_TOKENS,
    TEXT_VOCAB,
    add_attention_positions,
    add_position_input,
    attention_position_embedding,
    attention_positions_of,
    position_channels,
    position_frequencies_of,
    pretraining_schedule,
    self_attention_entropy,
    similarity_attention,
    text_encoder,
    unet_config,
)
from training.world.models import IP2P_PROBES
from training.world.registry import WORLD_MODELS

TINY = dict(panel=32, width=16, layers_per_block=1, head_dim=8, groups=8, **IP2P_PROBES)


def tiny_unet(seed: int = 0, **changes) -> UNet2DConditionModel:
    torch.manual_seed(seed)
    return UNet2DConditionModel(**unet_config({**TINY, **changes})).eval()


def inputs(seed: int = 1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    latents = torch.randn(3, 16, 4, 4, generator=gen)
    text = torch.randn(1, TEXT_TOKENS, 32, generator=gen)
    return latents, text, schedule(**SD_SCHEDULE).double()


def mean_cosine(states: torch.Tensor) -> float:
    unit = torch.nn.functional.normalize(states, dim=-1)
    sims = unit @ unit.T
    return float((sims.sum() - sims.diagonal().sum()) / (len(sims) * (len(sims) - 1)))


def test_defaults_are_the_version_1_unet():
    for size in ("full", "quick"):
        config = WORLD_MODELS["instruct_pix2pix"].configs[size]
        assert {k: config[k] for k in IP2P_PROBES} == {"transformer_layers": 1, "prompt_position_std": 0.0,
                                                       "self_attention_gain": 0.0, "position_frequencies": 0,
                                                       "attention_positions": 0}
    default = tiny_unet()
    assert default.config.in_channels == 32 and position_frequencies_of(default) == 0
    assert default.config.transformer_layers_per_block in (1, (1, 1))
    assert not any(torch.equal(m.to_q.weight, m.to_k.weight) for n, m in default.named_modules()
                   if n.endswith(".attn1"))


def test_transformer_layers_double_the_attention_sites():
    def sites(unet):
        return sum(1 for n, _ in unet.named_modules() if n.endswith((".attn1", ".attn2")))
    assert sites(tiny_unet(transformer_layers=2)) == 2 * sites(tiny_unet())


def test_prompt_position_scale_separates_the_neutral_prompts_states():
    ids = HashTokenizer(TEXT_VOCAB, TEXT_TOKENS)([""])
    with torch.no_grad():
        default = text_encoder(31)(ids)[0][0]
        spread = text_encoder(31, position_std=1.0)(ids)[0][0]
        again = text_encoder(31, position_std=1.0)(ids)[0][0]
    assert mean_cosine(default) > 0.95, "CLIP's own initialisation: the empty prompt's states are near copies"
    assert mean_cosine(spread) < 0.5
    assert torch.equal(spread, again)


def test_similarity_attention_sets_query_equal_key_orthogonal_and_sharpens_attention():
    unet = tiny_unet()
    before = {n: m.to_q.weight.clone() for n, m in unet.named_modules() if n.endswith(".attn2")}
    similarity_attention(unet, gain=1.5, seed=3)
    for name, module in unet.named_modules():
        if name.endswith(".attn1"):
            q, k = module.to_q.weight, module.to_k.weight
            assert torch.equal(q, k), name
            assert torch.allclose(q @ q.T, 1.5 ** 2 * torch.eye(len(q)), atol=1e-5), name
        if name.endswith(".attn2"):
            assert torch.equal(module.to_q.weight, before[name]), "cross-attention is left as it was"
    latents, text, alphas = inputs()
    assert self_attention_entropy(unet, latents, text, alphas) < self_attention_entropy(tiny_unet(), latents, text,
                                                                                        alphas) - 0.01


def reference_entropy(unet, latents, text, alphas, timesteps, seed) -> float:
    """The same measure from the attention probabilities diffusers' own processor computes."""
    maps: list[torch.Tensor] = []

    class Recording(AttnProcessor):
        def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kw):
            query = attn.head_to_batch_dim(attn.to_q(hidden_states))
            key = attn.head_to_batch_dim(attn.to_k(hidden_states))
            maps.append(attn.get_attention_scores(query, key, None))
            return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, temb)

    for name, module in unet.named_modules():
        if name.endswith(".attn1"):
            module.set_processor(Recording())
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for step in timesteps:
            t = torch.full((len(latents),), step)
            a = alphas[t].float().view(-1, 1, 1, 1)
            noisy = a.sqrt() * latents + (1 - a).sqrt() * torch.randn(latents.shape, generator=gen)
            unet(torch.cat([noisy, latents], 1), t, encoder_hidden_states=text.expand(len(latents), -1, -1))
    per_map = [float((-(p * p.clamp_min(1e-12).log()).sum(-1) / math.log(p.shape[-1])).mean()) for p in maps]
    return sum(per_map) / len(per_map)


def test_entropy_is_that_of_the_attention_maps():
    latents, text, alphas = inputs()
    unet = tiny_unet()
    similarity_attention(unet, gain=2.0, seed=4)
    measured = self_attention_entropy(unet, latents, text, alphas, timesteps=(100, 900), seed=5)
    assert measured < 0.97, "the case must not be the uniform one every measure agrees on"
    assert math.isclose(measured, reference_entropy(unet, latents, text, alphas, (100, 900), 5), abs_tol=1e-5)
    for name, module in unet.named_modules():
        if name.endswith(".attn1"):
            module.to_q.weight.data.zero_()
    assert math.isclose(self_attention_entropy(unet, latents, text, alphas), 1.0, abs_tol=1e-6), "zero queries: uniform"


def test_position_channels_are_the_fourier_features_of_the_cell_centres():
    features = position_channels(2, 2, 4, like=torch.zeros(1, dtype=torch.float64))
    assert features.shape == (1, 8, 2, 4)
    xs, ys = [-0.75, -0.25, 0.25, 0.75], [-0.5, 0.5]
    for row, y in enumerate(ys):
        for col, x in enumerate(xs):
            expected = []
            for k in (1, 2):
                expected += [math.sin(math.pi * k * x), math.cos(math.pi * k * x),
                             math.sin(math.pi * k * y), math.cos(math.pi * k * y)]
            assert torch.allclose(features[0, :, row, col], torch.tensor(expected, dtype=torch.float64)), (row, col)
    # a column's mirror: every sine of x changes sign, every cosine of x stays
    mirrored = features.flip(-1)
    x_sign = torch.tensor([-1.0, 1.0, 1.0, 1.0] * 2, dtype=torch.float64).view(1, -1, 1, 1)
    assert torch.allclose(mirrored, features * x_sign)
    assert position_channels(1, 3, 3, like=torch.zeros(1, dtype=torch.float16)).dtype == torch.float16


def test_position_input_feeds_the_positions_through_conv_in():
    unet = tiny_unet(position_frequencies=2)
    assert unet.config.in_channels == 32 + 8 and position_frequencies_of(unet) == 2
    latents, text, _ = inputs()
    sample, t = torch.cat([latents, latents], dim=1), torch.tensor([10, 500, 900])
    with torch.no_grad():
        reference = unet(torch.cat([sample, position_channels(2, 4, 4, like=sample).expand(3, -1, -1, -1)], 1), t,
                         encoder_hidden_states=text.expand(3, -1, -1)).sample
        add_position_input(unet, 2)
        positioned = unet(sample, t, encoder_hidden_states=text.expand(3, -1, -1)).sample
        copied = copy.deepcopy(unet)(sample, t, encoder_hidden_states=text.expand(3, -1, -1)).sample
        unet.conv_in.weight[:, 32:] = 0
        blind = unet(sample, t, encoder_hidden_states=text.expand(3, -1, -1)).sample
    assert not torch.allclose(positioned, blind, atol=1e-4), "the position channels must change the output"
    assert torch.allclose(positioned, reference, atol=1e-6), "the hook appends the channels a caller would"
    assert torch.equal(copied, positioned), "a deep copy (the yardstick's per-family copies) keeps the positions"


def save_world_ip2p(folder, unet: UNet2DConditionModel):
    """``unet`` saved as a world InstructPix2Pix folder (``folder/instruct_pix2pix``) beside a world autoencoder."""
    import json

    from diffusers import DDPMScheduler

    from training.world.autoencoder import build_autoencoder, initialise
    from training.world.instruct_pix2pix import TOKENIZER_FILE

    model = folder / "instruct_pix2pix"
    unet.save_pretrained(model / "unet")
    text_encoder(31).save_pretrained(model / "text_encoder")
    DDPMScheduler(**SD_SCHEDULE, prediction_type="v_prediction").save_pretrained(model / "scheduler")
    (model / TOKENIZER_FILE).write_text(json.dumps({"vocab_size": TEXT_VOCAB, "length": TEXT_TOKENS}))
    codec = build_autoencoder()
    initialise(codec, 0)
    codec.save_pretrained(folder / "autoencoder")
    return model


def test_a_saved_unet_with_positions_loads_with_them(tmp_path):
    """``world_ip2p`` (the loader every world run uses) reads the frequencies from the saved ``in_channels``."""
    from training.world.loaders import world_ip2p

    unet = tiny_unet(position_frequencies=3)
    loaded = world_ip2p(str(save_world_ip2p(tmp_path, unet))).unet
    assert loaded.conv_in.position_frequencies == 3
    latents, text, _ = inputs()
    sample, t = torch.cat([latents, latents], dim=1), torch.tensor([10, 500, 900])
    add_position_input(unet, 3)
    with torch.no_grad():
        assert torch.allclose(loaded(sample, t, encoder_hidden_states=text.expand(3, -1, -1)).sample,
                              unet(sample, t, encoder_hidden_states=text.expand(3, -1, -1)).sample, atol=1e-6)


def test_position_input_refuses_a_unet_of_other_channels_or_a_second_install():
    with pytest.raises(ValueError, match="40 input channels"):
        add_position_input(tiny_unet(), 2)
    unet = tiny_unet(position_frequencies=1)
    with pytest.raises(ValueError, match="frequencies >= 1"):
        add_position_input(unet, 0)
    add_position_input(unet, 1)
    with pytest.raises(ValueError, match="already"):
        add_position_input(unet, 1)
    odd = UNet2DConditionModel(**{**unet_config(TINY), "in_channels": 34})
    with pytest.raises(ValueError, match="34"):
        position_frequencies_of(odd)


def test_attention_position_embedding_projects_the_token_grids_fourier_features():
    embedding = attention_position_embedding(2, 9, 5, layer=1, like=torch.zeros(1, dtype=torch.float64))
    assert embedding.shape == (1, 9, 5) and embedding.dtype == torch.float64
    features = position_channels(2, 3, 3, like=torch.zeros(1, dtype=torch.float64))[0]  # [8, row, col]
    # token i is the grid's row i // 3, column i % 3 (the attention's row-major tokens); the projection is linear
    stacked = torch.stack([features[:, i // 3, i % 3] for i in range(9)])
    gen = torch.Generator().manual_seed(ATTENTION_POSITION_SEED + 1)
    projection = torch.randn(8, 5, generator=gen, dtype=torch.float64) / math.sqrt(2 * 2)  # N(0, 1 / (2·frequencies))
    assert torch.allclose(stacked @ projection, embedding[0], atol=1e-10), "the layer's fixed map of the features"
    assert not torch.allclose(embedding, attention_position_embedding(2, 9, 5, layer=2, like=embedding)), \
        "every layer its own projection"
    assert torch.equal(embedding, attention_position_embedding(2, 9, 5, layer=1, like=embedding)), "recomputable"
    wide = attention_position_embedding(4, 256, 4000, layer=0, like=torch.zeros(1, dtype=torch.float64))
    assert abs(float(wide.var(dim=1).mean()) - 1.0) < 0.1, "each channel of about unit variance, as the tokens"
    with pytest.raises(ValueError, match="square token grid"):
        attention_position_embedding(2, 8, 5, layer=0, like=embedding)


def test_attention_positions_reach_the_projections_of_every_self_attention():
    unet = tiny_unet()
    latents, text, _ = inputs()
    sample, t = torch.cat([latents, latents], dim=1), torch.tensor([10, 500, 900])
    seen: dict[str, torch.Tensor] = {}

    def record(name):
        return lambda module, args: seen.__setitem__(name, args[0].detach().clone())

    self_attentions = [(n, m) for n, m in unet.named_modules() if n.endswith(".attn1")]
    assert len(self_attentions) >= 3
    # registered before the positions' hook, the attention's own hook sees its input as the block gives it
    for name, module in self_attentions:
        module.register_forward_pre_hook(record(name))
        for projection in ("to_q", "to_k", "to_v"):
            getattr(module, projection).register_forward_pre_hook(record(f"{name}.{projection}"))
    with torch.no_grad():
        plain = unet(sample, t, encoder_hidden_states=text.expand(3, -1, -1)).sample
        add_attention_positions(unet, 2)
        positioned = unet(sample, t, encoder_hidden_states=text.expand(3, -1, -1)).sample
        copied = copy.deepcopy(unet)(sample, t, encoder_hidden_states=text.expand(3, -1, -1)).sample
    assert not torch.allclose(plain, positioned, atol=1e-4), "the positions must change the output"
    assert torch.equal(copied, positioned), "a deep copy (the yardstick's per-family copies) keeps the positions"
    for index, (name, _) in enumerate(self_attentions):
        given = seen[name]
        expected = given + attention_position_embedding(2, given.shape[1], given.shape[2], index, given)
        for projection in ("to_q", "to_k", "to_v"):
            assert torch.allclose(seen[f"{name}.{projection}"], expected, atol=1e-6), (name, projection)


def test_attention_positions_reach_a_hidden_state_given_by_keyword():
    unet = tiny_unet()
    add_attention_positions(unet, 2)
    attention = next(m for n, m in unet.named_modules() if n.endswith(".attn1"))
    hidden = torch.randn(2, 16, attention.to_q.in_features, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        by_keyword, positional = attention(hidden_states=hidden), attention(hidden)
        attention._forward_pre_hooks.clear()
        blind = attention(hidden)
    assert not torch.allclose(blind, positional, atol=1e-4)
    assert torch.allclose(by_keyword, positional, atol=1e-6)


def test_a_saved_unet_with_attention_positions_loads_with_them(tmp_path):
    from training.world.instruct_pix2pix import write_attention_positions
    from training.world.loaders import world_ip2p

    unet = tiny_unet()
    model = save_world_ip2p(tmp_path, unet)
    assert attention_positions_of(model) == 0
    write_attention_positions(model, 3)
    loaded = world_ip2p(str(model)).unet
    assert attention_positions_of(model) == 3
    latents, text, _ = inputs()
    sample, t = torch.cat([latents, latents], dim=1), torch.tensor([10, 500, 900])
    with torch.no_grad():
        plain = unet(sample, t, encoder_hidden_states=text.expand(3, -1, -1)).sample
        add_attention_positions(unet, 3)
        reference = unet(sample, t, encoder_hidden_states=text.expand(3, -1, -1)).sample
        assert not torch.allclose(plain, reference, atol=1e-4)
        assert torch.allclose(loaded(sample, t, encoder_hidden_states=text.expand(3, -1, -1)).sample, reference,
                              atol=1e-6)


def test_attention_positions_refuse_no_frequency_a_second_install_or_a_bad_record(tmp_path):
    from training.world.instruct_pix2pix import ATTENTION_POSITIONS_FILE

    unet = tiny_unet()
    with pytest.raises(ValueError, match="at least one frequency"):
        add_attention_positions(unet, 0)
    add_attention_positions(unet, 1)
    with pytest.raises(ValueError, match="already"):
        add_attention_positions(unet, 1)
    for bad in ('{"frequencies": 0}', '{"frequencies": "4"}', '{"frequencies": true}', "{}"):
        (tmp_path / ATTENTION_POSITIONS_FILE).write_text(bad)
        with pytest.raises(ValueError, match="frequencies"):
            attention_positions_of(tmp_path)


def test_negative_scales_are_refused_with_the_setting_named():
    with pytest.raises(ValueError, match="prompt_position_std"):
        text_encoder(31, position_std=-1.0)
    with pytest.raises(ValueError, match="self_attention_gain"):
        similarity_attention(tiny_unet(), gain=-0.5, seed=0)


def rates(steps: int, lr: float = 1e-3) -> list[float]:
    optimiser = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=lr)
    schedule_ = pretraining_schedule(optimiser, lr, steps)
    out = []
    for _ in range(steps):
        out.append(optimiser.param_groups[0]["lr"])
        optimiser.step()
        schedule_.step()
    return out


@pytest.mark.parametrize("steps", [1, 2, 3, 20, 39, 40, 400])
def test_the_pretraining_schedule_warms_up_then_decays_at_any_length(steps):
    # a probe build of 20 steps (--world-set instruct_pix2pix.steps=20) once died in OneCycleLR (division by zero)
    lr = rates(steps)
    assert all(math.isfinite(r) and 0 < r <= 1e-3 + 1e-12 for r in lr), lr
    peak = lr.index(max(lr))
    if steps >= 40:  # OneCycleLR: peak at 5 % of the steps, from a 25th of the rate
        assert peak == round(0.05 * steps) - 1 and max(lr) == pytest.approx(1e-3) and lr[0] < 1e-3 / 2, (peak, lr)
    assert all(a <= b for a, b in zip(lr[:peak], lr[1:peak + 1])), "warm-up not increasing"
    assert all(a >= b for a, b in zip(lr[peak:], lr[peak + 1:])), "decay not decreasing"
    if steps >= 3:
        assert lr[-1] < max(lr), "no decay"
