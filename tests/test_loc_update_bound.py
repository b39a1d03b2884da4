"""The LoRA of Change hypernetwork's optional update bound (analogy_core/loc.py, "Update bound"): every generated
projection update softly capped at c·‖W_p‖, checked against a dense re-computation; its file format, validation,
gradients at eq. 11's zero start, and the trainer recording the backbone's weight norms."""

from __future__ import annotations

import json
import math

import pytest
import torch

from analogy_core.loc import (HypernetworkConfig, HypernetworkError, attention_targets, batched_lora,
                              build_hypernetwork, generate_lora, load_hypernetwork, projection_weight_norms,
                              relative_update_norms, save_hypernetwork, soft_bound_factor)
from analogy_core.layouts import layout_of_diffusers_model
from test_loc_core import analogy, config_for, perturb_u_b, run_unet, unet_inputs
from tiny_models import SD_DIFFUSERS, randomize_


@pytest.fixture(scope="module")
def unet():
    from diffusers import UNet2DConditionModel

    model = UNet2DConditionModel(**dict(SD_DIFFUSERS, in_channels=8)).eval()
    randomize_(model, seed=1)
    return model


def bounded_config(model, ratio: float = 0.5, **overrides) -> HypernetworkConfig:
    targets = attention_targets(layout_of_diffusers_model(model))
    return config_for(model, update_bound=ratio, weight_norms=projection_weight_norms(model, targets), **overrides)


def same_weights(config: HypernetworkConfig, seed: int, std: float):
    """An H with ``config`` and random U_B of scale ``std`` (the same values for any bound)."""
    hypernetwork = build_hypernetwork(config, seed=seed)
    perturb_u_b(hypernetwork, seed=seed, std=std)
    return hypernetwork


def dense(factors, path: str, sample: int) -> torch.Tensor:
    down, up = factors.layers[path]
    return (factors.scale[sample] * up[sample] @ down[sample]).detach()


def test_weight_norms_are_the_projections_frobenius_norms(unet):
    targets = attention_targets(layout_of_diffusers_model(unet))
    norms = projection_weight_norms(unet, targets)
    assert len(norms) == 4 * len(targets)
    paths = [p for t in targets for p in t.projection_paths()]
    for path, norm in zip(paths, norms):
        weight = unet.get_submodule(path).weight.detach()
        assert math.isclose(norm, float(torch.sqrt((weight ** 2).sum())), rel_tol=1e-5), path
    assert len({round(n, 6) for n in norms}) > 1, "the projections differ (the check is not of one number)"


def test_the_bound_caps_every_projection_as_the_formula_says(unet):
    ratio, item = 0.5, analogy(batch=2, seed=2)
    tokens = item.patch_tokens["a"], item.patch_tokens["a_prime"]
    free = same_weights(config_for(unet), seed=5, std=2.0)(*tokens)
    config = bounded_config(unet, ratio)
    capped = same_weights(config, seed=5, std=2.0)(*tokens)
    caps = config.update_caps()
    for path, cap in caps.items():  # c·‖W_p‖ of the backbone's own weight, not c alone
        weight = unet.get_submodule(path).weight.detach()
        assert math.isclose(cap, ratio * float(torch.linalg.matrix_norm(weight)), rel_tol=1e-5), path
    assert len({round(c, 6) for c in caps.values()}) > 1, "the caps must differ, or the check is of one number"
    over = 0
    for path in free.layers:
        cap = caps[path]
        for b in range(2):
            raw = dense(free, path, b)
            norm = float(torch.linalg.matrix_norm(raw))
            over += norm > cap
            want = raw * (cap * math.tanh(norm / cap) / norm)           # written out: the same direction, norm
            got = dense(capped, path, b)                                # cap·tanh(n/cap)
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6 * cap)
            assert float(torch.linalg.matrix_norm(got)) < cap * (1 + 1e-5)
            torch.testing.assert_close(capped.layers[path][0], free.layers[path][0])  # U_A untouched (rank r)
    assert over > len(free.layers), "the test needs updates beyond their caps, or it checks nothing"


def test_small_updates_pass_almost_unchanged_and_reverse_stays_the_negation(unet):
    item = analogy(batch=1, seed=3)
    tokens = item.patch_tokens["a"], item.patch_tokens["a_prime"]
    free = same_weights(config_for(unet), seed=6, std=1e-4)(*tokens)
    capped = same_weights(bounded_config(unet, 1.0), seed=6, std=1e-4)(*tokens)
    for path in free.layers:
        raw = dense(free, path, 0)
        assert raw.abs().max() > 0
        torch.testing.assert_close(dense(capped, path, 0), raw, rtol=1e-3, atol=1e-4 * float(raw.abs().max()))
    big = same_weights(bounded_config(unet, 0.2), seed=6, std=3.0)
    forward = generate_lora(big, item, "forward")
    reverse = generate_lora(big, item, "reverse")
    for name, layer in forward.layers.items():
        torch.testing.assert_close(reverse.layers[name].delta_weight(), -layer.delta_weight())


def test_a_fresh_bounded_hypernetwork_is_zero_and_learns_with_finite_gradients(unet):
    hypernetwork = build_hypernetwork(bounded_config(unet, 0.5), seed=0)
    item = analogy(batch=2)
    inputs = unet_inputs(2)
    base = run_unet(unet, inputs)
    factors = hypernetwork(item.patch_tokens["a"], item.patch_tokens["a_prime"])
    assert torch.equal(run_unet(unet, inputs, factors), base), "eq. 11: a fresh H changes nothing"
    with batched_lora(unet, factors):
        out = unet(inputs[0], inputs[1], encoder_hidden_states=inputs[2]).sample
    (out - base.detach()).square().sum().add(out.sum()).backward()
    r = hypernetwork.config.rank
    for target, head in zip(hypernetwork.config.targets, hypernetwork.heads):
        assert torch.isfinite(head.weight.grad).all(), "the zero update's norm gives no NaN gradient"
        assert head.weight.grad[target.down_width(r):].abs().sum() > 0, "U_B learns from the first step"
    hypernetwork.zero_grad()


def test_the_factor_against_its_formula_and_its_gradient_at_zero():
    gen = torch.Generator().manual_seed(0)
    down, up = torch.randn(3, 2, 5, generator=gen), torch.randn(3, 4, 2, generator=gen)
    norms = torch.stack([torch.linalg.matrix_norm(up[b] @ down[b]) for b in range(3)])
    torch.testing.assert_close(soft_bound_factor(down, up, 0.7), 0.7 * torch.tanh(norms / 0.7) / norms)
    zero_up = torch.zeros(3, 4, 2, requires_grad=True)
    factor = soft_bound_factor(down, zero_up, 0.7)
    torch.testing.assert_close(factor, torch.ones(3))
    factor.sum().backward()
    assert torch.isfinite(zero_up.grad).all()


def test_relative_update_norms_against_dense_updates(unet):
    item = analogy(batch=2, seed=4)
    hypernetwork = same_weights(config_for(unet), seed=7, std=0.3)
    factors = hypernetwork(item.patch_tokens["a"], item.patch_tokens["a_prime"]).scaled(-2.0)
    relative = relative_update_norms(factors, unet)
    assert relative.shape == (2, len(factors.layers)) and relative.min() > 0
    for column, path in enumerate(factors.layers):
        weight = torch.linalg.matrix_norm(unet.get_submodule(path).weight.detach())
        for b in range(2):
            want = torch.linalg.matrix_norm(dense(factors, path, b)) / weight
            torch.testing.assert_close(relative[b, column], want, rtol=1e-4, atol=1e-7)


def test_bounded_file_round_trip_and_unbounded_configs_unchanged(unet, tmp_path):
    config = bounded_config(unet, 0.75)
    hypernetwork = same_weights(config, seed=8, std=1.0)
    loaded = load_hypernetwork(save_hypernetwork(hypernetwork, tmp_path / "bounded.safetensors"))
    assert loaded.config == config and loaded.config.update_bound == 0.75
    assert "bounded at 0.75x" in loaded.config.describe()
    item = analogy()
    for name, layer in generate_lora(hypernetwork, item).layers.items():
        torch.testing.assert_close(generate_lora(loaded, item).layers[name].delta_weight(), layer.delta_weight())
    plain = config_for(unet)
    assert "update_bound" not in plain.to_json(), "files without a bound are written exactly as before"
    assert HypernetworkConfig.from_json(plain.to_json()) == plain


@pytest.mark.parametrize("change, message", [
    (dict(weight_norms=None), "go together"),
    (dict(update_bound=None), "go together"),
    (dict(update_bound=0.0), "update_bound must be a number"),
    (dict(update_bound=float("nan")), "update_bound must be a number"),
    (dict(update_bound=True), "update_bound must be a number"),
    (dict(weight_norms=(1.0, 2.0)), "one norm per projection"),
    (dict(weight_norms="neg"), "positive numbers"),
])
def test_bad_bounds_are_refused_by_name(unet, change, message):
    config = bounded_config(unet)
    values = dict(update_bound=config.update_bound, weight_norms=config.weight_norms)
    if change.get("weight_norms") == "neg":
        change = dict(weight_norms=(-1.0,) + config.weight_norms[1:])
    values.update(change)
    with pytest.raises(HypernetworkError, match=message):
        config_for(unet, **values)


def test_a_file_with_a_malformed_bound_is_refused(unet):
    raw = bounded_config(unet).to_json()
    raw["update_bound"] = {"ratio": 0.5}
    with pytest.raises(HypernetworkError, match="update_bound must be"):
        HypernetworkConfig.from_json(json.loads(json.dumps(raw)))
    raw["update_bound"] = {"ratio": 0.5, "weight_norms": [1.0] * 3}
    with pytest.raises(HypernetworkError, match="one norm per projection"):
        HypernetworkConfig.from_json(raw)


def test_the_trainer_records_its_backbones_norms():
    from training.backbone import load_query_encoder
    from training.config import build_config
    from training.loc.config import PRESETS, LoCConfig
    from training.loc.ip2p import tiny_ip2p
    from training.loc.task import hypernetwork_config

    backbone, encoder = tiny_ip2p(seed=0), load_query_encoder("tiny", seed=0)
    cfg = build_config(LoCConfig, PRESETS, "tiny", None, ["update_bound=0.5"])
    config = hypernetwork_config(cfg, backbone, encoder)
    assert config.update_bound == 0.5
    assert config.weight_norms == projection_weight_norms(backbone.unet, config.targets)
    unbounded = hypernetwork_config(build_config(LoCConfig, PRESETS, "tiny", None, []), backbone, encoder)
    assert unbounded.update_bound is None and unbounded.weight_norms is None, "the paper's default: no bound"
    for bad, message in ((["update_bound=-1"], "update_bound must be 0"),
                         (["update_bound=0.5", "plain_lora=true", "lora_reverse=false", "random_exchange=false"],
                          "plain_lora and full_finetune train none")):
        with pytest.raises(ValueError, match=message):
            build_config(LoCConfig, PRESETS, "tiny", None, bad)
