"""``bench.loc_rank_probe``: a full fine-tune's change at LoRA of Change's sites, cut to rank r and scored.

The cut is checked against an independent computation (power iteration for the leading singular pair; the
Eckart-Young residual for the rest); the probe's own rows against the yardstick, which scores the same ceiling run
(``fine_tuned`` must equal the full ceiling's figures). The end-to-end tests train two-step ceilings on a quick world
whose InstructPix2Pix-like UNet is pretrained for only 20 steps (``instruct_pix2pix.steps=20``, as
tests/test_row_curve.py): they are about measuring the right weights, not about what the UNet draws.
"""

from __future__ import annotations

import json

import pytest
import torch

from bench import loc_rank_probe as probe
from training.loc.ip2p import load_ip2p
from training.world import evaluate as ev
from training.world.yardstick.ceiling import scored, trained
from training.world.yardstick.common import RunMismatch
from training.world.yardstick.loc import CEILING

FAMILY = "hflip"


def test_low_rank_is_the_best_rank_r_approximation():
    delta = torch.randn(12, 7, generator=torch.Generator().manual_seed(0))
    singular = torch.linalg.svdvals(delta.double())
    one, share = probe.low_rank(delta, 1)
    assert not torch.allclose(one, delta, atol=1e-3)  # the cut changes the matrix
    # leading singular pair by power iteration on deltaᵀdelta (no SVD)
    v = torch.ones(7, dtype=torch.float64)
    for _ in range(500):
        v = delta.double().T @ (delta.double() @ v)
        v = v / v.norm()
    reference = torch.outer(delta.double() @ v, v)
    assert torch.allclose(one.double(), reference, atol=1e-5)
    assert share == pytest.approx(float(singular[0] ** 2 / (singular ** 2).sum()), rel=1e-9)
    for rank in (2, 5):
        cut, share = probe.low_rank(delta, rank)
        assert torch.linalg.matrix_rank(cut, rtol=1e-5) == rank
        residual = float((delta.double() - cut.double()).pow(2).sum())
        assert residual == pytest.approx(float((singular[rank:] ** 2).sum()), rel=1e-6)  # Eckart-Young
        assert share == pytest.approx(1 - residual / float((singular ** 2).sum()), rel=1e-6)
    whole, share = probe.low_rank(delta, 7)
    assert torch.allclose(whole, delta, atol=1e-5) and share == pytest.approx(1.0)
    with pytest.raises(ValueError, match="a matrix and a rank >= 1"):
        probe.low_rank(delta, 0)
    with pytest.raises(ValueError, match="a matrix and a rank >= 1"):
        probe.low_rank(torch.ones(3), 1)


def test_a_variant_keeps_the_change_at_the_sites_only_and_pools_the_kept_share():
    gen = torch.Generator().manual_seed(1)
    base = {name: torch.randn(6, 5, generator=gen) for name in ("site_a", "site_b", "other")}
    base["bias"] = torch.randn(6, generator=gen)
    tuned = {name: value + torch.randn(value.shape, generator=gen) for name, value in base.items()}
    sites = ["site_a", "site_b"]
    state, energy = probe.variant_state(base, tuned, sites, None)
    assert energy == 1.0
    assert torch.equal(state["other"], base["other"]) and torch.equal(state["bias"], base["bias"])
    assert all(torch.allclose(state[s], tuned[s]) for s in sites)
    state, energy = probe.variant_state(base, tuned, sites, 2)
    sizes = {s: float((tuned[s] - base[s]).double().pow(2).sum()) for s in sites}
    shares = {s: probe.low_rank(tuned[s] - base[s], 2)[1] for s in sites}
    assert energy == pytest.approx(sum(shares[s] * sizes[s] for s in sites) / sum(sizes.values()))
    for s in sites:
        assert torch.allclose(state[s], base[s] + probe.low_rank(tuned[s] - base[s], 2)[0])
        assert torch.linalg.matrix_rank(state[s] - base[s], rtol=1e-5) == 2
    assert torch.equal(state["other"], base["other"])


@pytest.fixture(scope="module")
def short_world():
    from training.world import build_world

    return build_world(["autoencoder", "clip", "instruct_pix2pix"], quick=True, seed=0,
                       overrides={"instruct_pix2pix": {"steps": 20}})


def full_ceiling(world, root, **settings):
    """A two-step full fine-tune ceiling on ``FAMILY`` (at a rate at which two steps move the weights)."""
    return trained("loc_full", CEILING.full, world, FAMILY, 0, root, 2, {"learning_rate": 0.01, **settings})[0]


def test_the_site_weights_are_every_attention_projection(short_world):
    unet = load_ip2p(short_world.spec).unet
    keys = probe.site_weights(unet)
    attention = [name for name, _ in unet.named_modules() if name.endswith((".attn1", ".attn2"))]
    assert len(keys) == 4 * len(attention) and len(set(keys)) == len(keys)
    for name in attention:
        for projection in ("to_q", "to_k", "to_v", "to_out.0"):
            assert f"{name}.{projection}.weight" in keys
    assert set(keys) <= set(unet.state_dict())


def test_the_probe_scores_the_fine_tune_as_the_yardstick_does(short_world, tmp_path):
    run = full_ceiling(short_world, tmp_path)
    report = probe.probe(run, [1, 512], count=1)
    items = ev.examples(FAMILY, 1, short_world.builds["autoencoder"]["config"]["panel"])
    reference, _, _ = scored("loc_full", CEILING.full, short_world, FAMILY, items, 0, tmp_path, 2,
                             {"learning_rate": 0.01})
    rows = report["rows"]
    assert rows["fine_tuned"] != rows["base"]  # two steps moved the UNet's samples
    for key in ("edited_cells", "kept_cells", "error"):
        assert rows["fine_tuned"][key] == reference[key]
    assert report["changed_outside_sites"] > 0
    assert report["site_projections"] == len(probe.site_weights(load_ip2p(short_world.spec).unet))
    assert rows["sites_rank_1"]["energy"] < 1 and rows["sites_rank_512"]["energy"] == pytest.approx(1.0)
    # a rank above every projection's keeps the sites' change whole
    assert {k: rows["sites_rank_512"][k] for k in ("edited_cells", "kept_cells")} == {
        k: rows["sites"][k] for k in ("edited_cells", "kept_cells")}
    assert rows["sites_rank_512"]["error"] == pytest.approx(rows["sites"]["error"], abs=1e-4)


def test_an_attention_only_fine_tune_is_whole_at_its_sites(short_world, tmp_path):
    run = full_ceiling(short_world, tmp_path, finetune_scope="attention")
    report = probe.probe(run, [2], count=1)
    assert report["changed_tensors"] > 0 and report["changed_outside_sites"] == 0
    assert report["rows"]["sites"] == {**report["rows"]["fine_tuned"], "energy": 1.0}
    assert report["rows"]["sites_rank_2"]["energy"] < 1


def test_a_run_that_is_no_one_family_full_fine_tune_is_refused(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    with pytest.raises(RunMismatch, match="no readable config.json"):
        probe.run_settings(run)
    (run / "config.json").write_text(json.dumps({"plain_lora": True, "data": "world:families=hflip"}))
    with pytest.raises(RunMismatch, match="not a full fine-tune run"):
        probe.run_settings(run)
    (run / "config.json").write_text(json.dumps({"full_finetune": True, "data": "world:families=hflip+invert"}))
    with pytest.raises(RunMismatch, match="not trained on one world family"):
        probe.run_settings(run)
    (run / "config.json").write_text(json.dumps({"full_finetune": True, "data": "world:families=hflip"}))
    assert probe.run_settings(run)[1] == "hflip"


def test_a_fine_tune_that_changed_nothing_is_refused(short_world, tmp_path):
    import shutil

    from analogy_core.files import write_safetensors_atomic
    from training.loc.config import UNET_FILE

    unchanged = tmp_path / "unchanged"
    shutil.copytree(full_ceiling(short_world, tmp_path), unchanged)
    base = load_ip2p(short_world.spec).unet.state_dict()
    write_safetensors_atomic({k: v.contiguous() for k, v in base.items()}, unchanged / UNET_FILE)
    with pytest.raises(RunMismatch, match="samples exactly as the base; nothing to probe"):
        probe.probe(unchanged, [1], count=1)


@pytest.mark.parametrize("args, message", [
    (["--ranks", "4,x"], "--ranks: comma-separated whole numbers"),
    (["--ranks", "4,0"], "--ranks: every rank is at least 1"),
    (["--examples", "0"], "--examples: at least 1"),
])
def test_bad_command_lines_are_refused_before_any_work(args, message, tmp_path, capsys):
    with pytest.raises(SystemExit):
        probe.main(["--run", str(tmp_path), *args])
    assert message in capsys.readouterr().err
