"""LoRA of Change with a trained image encoder E (``image_encoder_learning_rate`` > 0, as the paper optimises all of
H): every kept step export keeps the E it was made with, and the yardstick reads a run's H through that run's E —
from the final file, a step export or a checkpoint — never through the frozen world CLIP its tokens no longer match."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

import training.world  # noqa: F401  (the world data source)
from analogy_core.files import read_safetensors
from analogy_core.loc import HypernetworkError
from training import checkpoints as ckpt
from training.backbone import load_query_encoder
from training.loc.config import ENCODER_FILE, HYPERNETWORK_FILE
from training.loc.data import make_pair_dataset
from training.world.yardstick.loc import load_run_model, tokens

STEPS = 3


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """A tiny LoC run that trains E at a rate large enough to move it, a checkpoint and a kept export each step."""
    from training.loc import task

    out = tmp_path_factory.mktemp("loc_e") / "run"
    task.main(["--preset", "tiny", "--output-dir", str(out), "--max-steps", str(STEPS), "--set", "report_to=none",
               "--set", "sample_every=1000", "--set", "checkpoint_every=1", "--set", "keep_exports=true",
               "--set", "learning_rate=1e-2", "--set", "image_encoder_learning_rate=1e-2"])
    return out


@pytest.fixture(scope="module")
def pairs():
    from types import SimpleNamespace

    data = make_pair_dataset("world", 32)
    return [SimpleNamespace(a=data[i]["a"], a_prime=data[i]["a_prime"]) for i in range(4)]


def encoder_state(path: Path) -> dict[str, torch.Tensor]:
    return read_safetensors(path)[0]


def test_each_kept_export_keeps_the_encoder_of_its_step(run):
    exports = dict(ckpt.step_exports(run, HYPERNETWORK_FILE))
    encoders = dict(ckpt.step_exports(run, ENCODER_FILE))
    assert sorted(exports) == sorted(encoders) == list(range(1, STEPS + 1))
    frozen = load_query_encoder("tiny", seed=0).model.state_dict()
    first, last = encoder_state(encoders[1]), encoder_state(encoders[STEPS])
    # step 1's update reaches no E (U_B starts at zero, eq. 11); later steps move it, so the copies differ
    assert all(torch.equal(first[k], frozen[k].float()) for k in frozen)
    assert any(not torch.equal(first[k], last[k]) for k in first)
    final = encoder_state(run / ENCODER_FILE)
    assert all(torch.equal(final[k], last[k]) for k in final)


def test_the_row_reads_h_through_the_runs_own_encoder(run, pairs):
    world_encoder = load_query_encoder("tiny", seed=0)
    frozen_tokens = tokens(world_encoder, pairs)
    h, encoder = load_run_model(run / HYPERNETWORK_FILE, None, world_encoder, trained_encoder=True)
    trained = encoder_state(run / ENCODER_FILE)
    assert all(torch.equal(v.float(), trained[k]) for k, v in encoder.model.state_dict().items())
    assert not torch.allclose(tokens(encoder, pairs)[0], frozen_tokens[0])   # the trained E changes H's input
    assert torch.equal(tokens(world_encoder, pairs)[0], frozen_tokens[0])     # the world encoder is left as it was

    exports = dict(ckpt.step_exports(run, HYPERNETWORK_FILE))
    h2, e2 = load_run_model(exports[2], None, world_encoder, trained_encoder=True)
    step2 = encoder_state(ckpt.companion_path(exports[2], HYPERNETWORK_FILE, ENCODER_FILE))
    assert all(torch.equal(v.float(), step2[k]) for k, v in e2.model.state_dict().items())
    # the checkpoint of step 2 holds H and E as one module: it gives the same pair as the step export
    folder = next(c.path for c in ckpt.list_checkpoints(run / "checkpoints") if c.step == 2)
    h3, e3 = load_run_model(folder, h, world_encoder, trained_encoder=True)
    assert all(torch.equal(v, h2.state_dict()[k]) for k, v in h3.state_dict().items())
    assert all(torch.equal(v, e2.model.state_dict()[k]) for k, v in e3.model.state_dict().items())
    with torch.no_grad():
        first = h3(*tokens(e3, pairs)).layers
        other = h3(*tokens(world_encoder, pairs)).layers
    assert any(not torch.allclose(first[p][1], other[p][1]) for p in first)  # E decides which LoRA H generates


def test_each_export_records_the_fingerprint_of_its_own_encoder(run):
    """Generate LoRA tells a trained E from the stock encoder by the fingerprint the H file records: each step
    export records its step's E, not the frozen encoder nor the last E."""
    from analogy_core.encoders import ImageEncoder
    from analogy_core.files import probe_header
    from analogy_core.fingerprint import recorded_fingerprint
    from analogy_core.loc import load_hypernetwork

    stock = load_query_encoder("tiny", seed=0)
    exports = dict(ckpt.step_exports(run, HYPERNETWORK_FILE))
    prints = {}
    for step, path in exports.items():
        model = copy.deepcopy(stock.model)
        model.load_state_dict(encoder_state(ckpt.companion_path(path, HYPERNETWORK_FILE, ENCODER_FILE)))
        prints[step] = ImageEncoder(model, "transformers").fingerprint()
        assert recorded_fingerprint(probe_header(path).metadata).distance(prints[step]) < 1e-5, step
    assert prints[1].distance(stock.fingerprint()) < 1e-5                  # step 1 has not moved E yet
    assert prints[STEPS].distance(stock.fingerprint()) > 1e-3              # later steps have
    assert load_hypernetwork(run / HYPERNETWORK_FILE).encoder_fingerprint.distance(prints[STEPS]) < 1e-5


def test_the_fingerprint_bench_orders_storage_training_and_another_encoder(run):
    """bench.encoder_fingerprint: fewer stored bits move the fingerprint more, all below the refusal threshold;
    another initialisation lands far above it; a run's kept encoders are read step by step (step 1 is the stock
    encoder: U_B starts at zero, so E gets no gradient)."""
    from analogy_core.fingerprint import SAME_ENCODER_DISTANCE
    from bench.encoder_fingerprint import measure_encoder

    rows = measure_encoder(load_query_encoder("tiny", seed=0), run)
    storage = [rows[f"stored as {name}"]["distance"] for name in ("float16", "bfloat16", "float8_e4m3fn")]
    assert 0 < storage[0] < storage[1] < storage[2] < SAME_ENCODER_DISTANCE
    assert rows["another initialisation"]["distance"] > 5 * SAME_ENCODER_DISTANCE
    first, last = rows["trained E, step 1"], rows[f"trained E, step {STEPS}"]
    assert first["distance"] == 0 and last["distance"] > 0
    # what the check guards against: the last H's LoRA changes when fed the stock encoder's tokens, the first's not
    assert first["update_change"] == 0 and last["update_change"] > 0
    for values in rows.values():  # the distance is the largest part
        assert values["distance"] == pytest.approx(max(values[k] for k in ("embeds", "class_token", "patch_mean")),
                                                   abs=2e-5)


def test_a_run_that_trained_e_without_its_encoder_is_refused(run, tmp_path):
    lone = tmp_path / HYPERNETWORK_FILE
    lone.write_bytes((run / HYPERNETWORK_FILE).read_bytes())
    world_encoder = load_query_encoder("tiny", seed=0)
    with pytest.raises(HypernetworkError, match="frozen world CLIP"):
        load_run_model(lone, None, world_encoder, trained_encoder=True)
    h, encoder = load_run_model(lone, None, world_encoder, trained_encoder=False)
    assert encoder is world_encoder


def test_companion_paths_follow_the_export_they_belong_to(tmp_path):
    final = tmp_path / HYPERNETWORK_FILE
    assert ckpt.companion_path(final, HYPERNETWORK_FILE, ENCODER_FILE) == tmp_path / ENCODER_FILE
    step = tmp_path / ckpt.step_export_name(HYPERNETWORK_FILE, 600)
    expected = "loc_image_encoder.step_000600.safetensors"
    assert ckpt.companion_path(step, HYPERNETWORK_FILE, ENCODER_FILE).name == expected
    with pytest.raises(ValueError, match="neither"):
        ckpt.companion_path(tmp_path / "other.safetensors", HYPERNETWORK_FILE, ENCODER_FILE)


def test_family_share_against_the_within_family_sum_of_squares():
    """R² = 1 − SS_within / SS_total, computed the other way round from the definition the figure uses."""
    from training.world.yardstick.loc import family_share

    gen = torch.Generator().manual_seed(0)
    centres = torch.repeat_interleave(torch.randn(3, 5, generator=gen) * 3, 4, dim=0)
    values = (torch.randn(12, 5, generator=gen) + centres).double()
    labels = [f for f in ("a", "b", "c") for _ in range(4)]
    within = sum(float((values[i:i + 4] - values[i:i + 4].mean(0)).square().sum()) for i in (0, 4, 8))
    total = float((values - values.mean(0)).square().sum())
    share = family_share(values, labels)
    assert share == pytest.approx(1 - within / total, rel=1e-9)
    assert share > 0.7                                                   # the groups were drawn apart
    shuffled = [labels[i] for i in torch.randperm(12, generator=gen)]
    assert family_share(values, shuffled) < share                       # the labels, not the values alone, decide
    assert family_share(values[[0, 0, 4, 4]], ["a", "a", "b", "b"]) == pytest.approx(1.0)
    assert family_share(torch.ones(4, 3), ["a", "a", "b", "b"]) is None   # no spread to share


def test_the_family_shares_chance_level_is_its_mean_on_values_without_families():
    """``family_share_chance``: (F − 1) / (N − 1), the mean share of independent noise (measured here over 400 draws
    of 12 values in 3 families; the naive F / N would be 0.25 against 0.18)."""
    from training.world.yardstick.loc import family_share, family_share_chance

    labels = [f for f in ("a", "b", "c") for _ in range(4)]
    gen = torch.Generator().manual_seed(1)
    shares = [family_share(torch.randn(12, 20, generator=gen), labels) for _ in range(400)]
    assert family_share_chance(labels) == pytest.approx(2 / 11)
    assert sum(shares) / len(shares) == pytest.approx(2 / 11, abs=0.01)


def test_pair_dependence_is_the_varying_share_of_the_second_moment():
    from analogy_core.loc import pair_dependence

    common = torch.tensor([3.0, 4.0])
    values = torch.stack([common + torch.tensor([1.0, 0.0]), common - torch.tensor([1.0, 0.0])])
    assert pair_dependence(values) == pytest.approx(2 / 52)     # rows (4, 4) and (2, 4): spread 1 + 1 of 32 + 20
    assert pair_dependence(torch.stack([common, common])) == 0.0                  # one update for every pair
    assert pair_dependence(torch.tensor([[1.0, 2.0], [-1.0, -2.0]])) == pytest.approx(1.0)  # no common part
    with pytest.raises(ValueError, match="zero"):
        pair_dependence(torch.zeros(2, 3))
