"""The shared trainer skeleton (training/trainer.py) on a toy task: exact resume, fallback past damaged checkpoints,
killed writes, foreign folders, clipping, unreadable data. Every real trainer inherits these behaviours."""

from __future__ import annotations

import logging
import random
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from analogy_core.files import read_safetensors
from toy_task import ToyTask
from training import checkpoints as ckpt
from training import trainer
from training.data.readers import DataError


def train(out: Path, *extra: str) -> dict:
    return trainer.run(ToyTask, ["--preset", "default", "--output-dir", str(out), *extra])


def weights(out: Path) -> dict[str, torch.Tensor]:
    return read_safetensors(out / "toy.safetensors")[0]


def assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("reference")
    history = train(out)
    assert history["losses"][-1] < history["losses"][0], "the toy task must learn for these tests to mean anything"
    return weights(out)


def interrupted_run(tmp_path: Path, stop_at: int) -> Path:
    out = tmp_path / "run"
    train(out, "--max-steps", str(stop_at))
    return out


def test_checkpoints_are_safetensors_and_json_only(tmp_path):
    out = interrupted_run(tmp_path, 2)
    files = sorted(p.name for p in (out / "checkpoints" / "step_000002").iterdir())
    assert files == ["optimizer.safetensors", "rng_0.safetensors", "trainable.safetensors", "trainer_state.json"]


def test_resume_continues_exactly(tmp_path, reference, caplog):
    out = interrupted_run(tmp_path, 4)
    with caplog.at_level(logging.INFO):
        history = train(out, "--resume")
    assert "resumed from" in caplog.text and history["start_step"] == 4
    assert_same(weights(out), reference)


def test_resume_with_gradient_accumulation_continues_exactly(tmp_path):
    """Resuming at step s restarts the batch stream at micro-batch s x accumulation: the resumed run reads the
    micro-batches an uninterrupted one reads, and ends with its weights."""
    accumulate = ("--set", "gradient_accumulation_steps=2")
    ToyTask.seen_batches.clear()
    train(tmp_path / "whole", *accumulate)
    uninterrupted = list(ToyTask.seen_batches)
    assert len(uninterrupted) == 16 and len({tuple(b) for b in uninterrupted}) == 16  # a wrong start shows
    ToyTask.seen_batches.clear()
    out = tmp_path / "run"
    train(out, *accumulate, "--max-steps", "4")
    train(out, *accumulate, "--resume")
    assert ToyTask.seen_batches == uninterrupted
    assert_same(weights(out), weights(tmp_path / "whole"))


def test_each_micro_batch_draws_its_own_random_stream_and_each_epoch_its_own_order(tmp_path):
    """With gradient accumulation every micro-batch of a step gets its own random stream (the noise of two
    micro-batches must not repeat), and the data order is shuffled afresh every epoch."""
    ToyTask.seen_batches.clear()
    ToyTask.seen_seeds.clear()
    train(tmp_path / "run", "--set", "gradient_accumulation_steps=2", "--set", "length=8")
    assert len(ToyTask.seen_seeds) == 16 and len(set(ToyTask.seen_seeds)) == 16
    order = [i for batch in ToyTask.seen_batches for i in batch]
    epochs = [order[k:k + 8] for k in range(0, len(order), 8)]
    assert len(epochs) == 8 and all(sorted(epoch) == list(range(8)) for epoch in epochs)
    assert len({tuple(epoch) for epoch in epochs}) > 1, "every epoch in the same order"


def test_stale_temporaries_are_found_where_each_write_leaves_them(tmp_path):
    """``remove_stale_temporaries``: half-written checkpoint folders under checkpoints/, half-written step exports
    and the output file's temporaries beside the output file; names of those kinds elsewhere, and other files, stay
    (the run rewrites none of these, so only the clean-up can remove them)."""
    out = tmp_path / "run"
    (out / "checkpoints" / f"{ckpt.TMP_PREFIX}000009").mkdir(parents=True)
    (out / f"{ckpt.EXPORT_TMP_PREFIX}toy.step_000009.safetensors").write_bytes(b"half")
    (out / ".toy.safetensors.0123456789abcdef.tmp").write_bytes(b"half")
    kept = [out / f"{ckpt.TMP_PREFIX}000009", out / "checkpoints" / f"{ckpt.EXPORT_TMP_PREFIX}x.safetensors",
            out / "notes.txt"]
    kept[0].mkdir()
    for path in kept[1:]:
        path.write_bytes(b"keep")
    removed = ckpt.remove_stale_temporaries(out, ("toy.safetensors",))
    assert sorted(p.relative_to(out).as_posix() for p in removed) == sorted([
        f"checkpoints/{ckpt.TMP_PREFIX}000009", f"{ckpt.EXPORT_TMP_PREFIX}toy.step_000009.safetensors",
        ".toy.safetensors.0123456789abcdef.tmp"])
    assert not any(path.exists() for path in removed) and all(path.exists() for path in kept)


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-5] ^= 0xFF
    path.write_bytes(bytes(data))


DAMAGE = {
    "truncated weights": lambda c: _truncate(c / ckpt.TRAINABLE_FILE),
    "missing weights": lambda c: (c / ckpt.TRAINABLE_FILE).unlink(),
    "missing optimiser": lambda c: (c / ckpt.OPTIMIZER_FILE).unlink(),
    "flipped optimiser byte": lambda c: _flip_byte(c / ckpt.OPTIMIZER_FILE),
    "corrupt trainer state": lambda c: (c / ckpt.STATE_FILE).write_text("{not json"),
    "missing trainer state": lambda c: (c / ckpt.STATE_FILE).unlink(),
}


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_damaged_newest_checkpoint_falls_back_to_an_intact_one(tmp_path, reference, caplog, damage):
    out = interrupted_run(tmp_path, 6)
    DAMAGE[damage](out / "checkpoints" / "step_000006")
    with caplog.at_level(logging.INFO):
        history = train(out, "--resume")
    assert "step_000006 is unusable" in caplog.text
    assert history["start_step"] == 4, "resumed from the older intact checkpoint"
    assert_same(weights(out), reference)


def test_no_intact_checkpoint_is_a_clear_error(tmp_path):
    out = interrupted_run(tmp_path, 4)
    for checkpoint in ckpt.list_checkpoints(out / "checkpoints"):
        (checkpoint.path / ckpt.TRAINABLE_FILE).unlink()
    with pytest.raises(ckpt.CheckpointError, match="none of the 2 checkpoints"):
        train(out, "--resume")


def test_foreign_folders_and_files_are_ignored(tmp_path, reference):
    out = interrupted_run(tmp_path, 4)
    shutil.copytree(out / "checkpoints" / "step_000004", out / "checkpoints" / "step_000006.bak")
    (out / "checkpoints" / "step_abc").mkdir()
    (out / "checkpoints" / "step_000010").write_text("a file, not a folder")
    assert [c.step for c in ckpt.list_checkpoints(out / "checkpoints")] == [4, 2]
    train(out, "--resume")
    assert_same(weights(out), reference)


def test_prune_keeps_exactly_the_newest_keep_checkpoints(tmp_path):
    """prune(folder, keep) leaves the ``keep`` newest step folders (by step, not by name order or age) and nothing
    that is not a checkpoint is touched."""
    for step in (3, 12, 1, 7, 5):
        (tmp_path / ckpt.checkpoint_name(step)).mkdir()
    (tmp_path / "step_abc").mkdir()
    assert [c.step for c in ckpt.list_checkpoints(tmp_path)] == [12, 7, 5, 3, 1]
    ckpt.prune(tmp_path, 2)
    assert [c.step for c in ckpt.list_checkpoints(tmp_path)] == [12, 7]
    assert (tmp_path / "step_abc").is_dir()
    ckpt.prune(tmp_path, 1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_000012", "step_abc"]


def test_a_run_keeps_keep_checkpoints_of_its_checkpoints(tmp_path):
    """The toy run checkpoints every 2 steps up to 8; with keep_checkpoints=2 only steps 8 and 6 remain."""
    out = tmp_path / "run"
    train(out, "--set", "keep_checkpoints=2")
    assert [c.step for c in ckpt.list_checkpoints(out / "checkpoints")] == [8, 6]


def test_killed_checkpoint_write_is_cleaned_up_and_resumed(tmp_path, reference, monkeypatch, caplog):
    out = tmp_path / "run"
    real_finalize = ckpt.finalize

    def killed_at_step_6(tmp, final, state, optional):
        if state["step"] == 6:
            raise KeyboardInterrupt("simulated kill while writing step 6")
        real_finalize(tmp, final, state, optional)

    monkeypatch.setattr(ckpt, "finalize", killed_at_step_6)
    with pytest.raises(KeyboardInterrupt):
        train(out)
    monkeypatch.setattr(ckpt, "finalize", real_finalize)
    assert (out / "checkpoints" / ".tmp_step_000006").is_dir(), "the kill left a half-written folder"
    assert [c.step for c in ckpt.list_checkpoints(out / "checkpoints")] == [4, 2]
    (out / ".toy.safetensors.0123456789abcdef.tmp").write_bytes(b"half")  # a kill during the artifact write
    (out / ".tmpa1b2c3").write_bytes(b"half")  # the safetensors library's own temporary name
    (out / ".my_notes.tmp").write_text("not ours: stays")
    with caplog.at_level(logging.INFO):
        train(out, "--resume")
    assert "left by an interrupted write" in caplog.text
    assert not (out / "checkpoints" / ".tmp_step_000006").exists()
    assert sorted(p.name for p in out.glob(".*tmp*")) == [".my_notes.tmp"]
    assert_same(weights(out), reference)


def test_a_mode_flag_switches_the_written_file_and_its_temporaries_are_cleaned(tmp_path, caplog):
    """``mode_artifacts``: a run with the flag on writes (and logs) the mode's file instead of ``artifact``; a stale
    temporary of either file is cleaned at start."""
    out = tmp_path / "run"
    out.mkdir()
    (out / ".toy_whole.safetensors.0123456789abcdef.tmp").write_bytes(b"half")
    (out / ".toy.safetensors.fedcba9876543210.tmp").write_bytes(b"half")
    assert ToyTask.every_artifact() == ("toy.safetensors", "toy_whole.safetensors")
    with caplog.at_level(logging.INFO):
        train(out, "--max-steps", "2", "--set", "whole=true")
    assert sorted(p.name for p in out.glob("*.safetensors")) == ["toy_whole.safetensors"]
    assert not list(out.glob(".*tmp"))
    assert f"wrote {out / 'toy_whole.safetensors'}" in caplog.text


def test_keep_exports_keeps_each_checkpoints_output_file(tmp_path, reference):
    """``keep_exports``: every checkpoint's output file is kept under its step's name, holding exactly the weights of
    a run stopped at that step; the last one is the final file. Off (the default), no step file is written. A
    half-written copy of a killed run is removed at start."""
    out = tmp_path / "run"
    out.mkdir()
    (out / f"{ckpt.EXPORT_TMP_PREFIX}toy.step_000002.safetensors").write_bytes(b"half")
    train(out, "--set", "keep_exports=true")
    exports = ckpt.step_exports(out, "toy.safetensors")
    assert [step for step, _ in exports] == [2, 4, 6, 8]
    assert [path.name for _, path in exports][1] == "toy.step_000004.safetensors"
    assert not list(out.glob(".tmp*"))
    stopped = interrupted_run(tmp_path / "stopped", 4)
    at_step_4 = read_safetensors(exports[1][1])[0]
    assert not all(torch.equal(at_step_4[k], reference[k]) for k in reference), "step 4 must differ from the end"
    assert_same(at_step_4, weights(stopped))
    assert_same(read_safetensors(exports[-1][1])[0], reference)
    plain = interrupted_run(tmp_path / "plain", 4)
    assert ckpt.step_exports(plain, "toy.safetensors") == []


def test_missing_rng_state_is_reported(tmp_path, reference, caplog):
    out = interrupted_run(tmp_path, 4)
    (out / "checkpoints" / "step_000004" / "rng_0.safetensors").unlink()
    with caplog.at_level(logging.INFO):
        history = train(out, "--resume")
    assert history["start_step"] == 4
    assert "rng_0.safetensors is missing or damaged" in caplog.text and "will differ" in caplog.text
    assert_same(weights(out), reference)  # the toy task has no other global randomness


def test_resume_from_an_explicit_checkpoint(tmp_path, reference):
    out = interrupted_run(tmp_path, 6)
    history = train(out, "--resume", str(out / "checkpoints" / "step_000002"))
    assert history["start_step"] == 2
    assert_same(weights(out), reference)
    with pytest.raises(ckpt.CheckpointError, match="not a checkpoint folder"):
        train(out, "--resume", str(tmp_path))
    with pytest.raises(ckpt.CheckpointError, match="six or more digits"):
        train(out, "--resume", "step_2")


@pytest.mark.parametrize("name", ["step_000002", "checkpoints/step_000002"])
def test_resume_names_a_checkpoint_of_this_run_from_any_directory(tmp_path, reference, monkeypatch, name):
    """``--resume step_000002`` (or ``checkpoints/step_000002``) means that folder of this run's output, wherever
    the command runs from; the run resumes there (start step 2, not the newest, 6) and ends as an uninterrupted one."""
    out = interrupted_run(tmp_path / "run", 6)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    history = train(out, "--resume", name)
    assert history["start_step"] == 2
    assert_same(weights(out), reference)


def test_clipping_bounds_the_update_of_a_huge_loss():
    from accelerate import Accelerator

    accelerator = Accelerator(mixed_precision="no")
    for max_norm, bounded in ((1.0, True), (0.0, False)):
        param = torch.nn.Parameter(torch.ones(10))
        optimizer = torch.optim.SGD([param], lr=1.0)
        before = param.detach().clone()
        loss = 1e6 * (param ** 2).sum()
        norm = trainer.optimizer_step(accelerator, loss, [param], optimizer, max_norm)
        update = (param.detach() - before).norm().item()
        assert norm == pytest.approx(2e6 * 10 ** 0.5, rel=1e-5), "the norm before clipping is reported"
        assert (update <= max_norm + 1e-5) if bounded else update > 1e5


def test_unreadable_items_are_skipped_and_batches_stay_full(tmp_path, caplog):
    ToyTask.seen_batches.clear()
    bad = ",".join(str(i) for i in range(0, 64, 3))  # a third of the items
    with caplog.at_level(logging.WARNING):
        history = train(tmp_path / "run", "--set", f"unreadable={bad}", "--max-steps", "6")
    assert ToyTask.seen_batches and all(len(b) == 4 for b in ToyTask.seen_batches)
    assert not {i for b in ToyTask.seen_batches for i in b} & set(range(0, 64, 3))
    assert history["skipped"] > 0 and "toy item" in caplog.text


def test_mostly_unreadable_data_is_refused_up_front(tmp_path):
    bad = ",".join(str(i) for i in range(64) if i % 8)  # 7 of 8 unreadable
    with pytest.raises(DataError, match="probed items are readable"):
        train(tmp_path / "run", "--set", f"unreadable={bad}")


def test_the_summary_counts_distinct_unreadable_items(tmp_path, caplog):
    """7 bad items met again and again over 3 epochs are 7 skipped items, not one per encounter (issue 19)."""
    bad = [3, 10, 17, 24, 31, 45, 60]
    with caplog.at_level(logging.WARNING):
        history = train(tmp_path / "run", "--set", f"unreadable={','.join(map(str, bad))}", "--max-steps", "48")
    assert history["skipped"] == 7 and history["skip_events"] > 7
    assert "skipped 7 unreadable items and 0 bad index lines" in caplog.text


class DataFirstTask(ToyTask):
    """Records what its model initialisation drew from the global random state, and whether build ran at all."""
    built: list[torch.Tensor] = []
    data_draws = True

    def build(self):
        DataFirstTask.built.append(torch.rand(3))  # no reseeding: the trainer's set_seed is what it starts from
        return super().build()

    def dataset(self):
        if DataFirstTask.data_draws:  # a dataset that consumes the global random state as it is read
            torch.rand(7), np.random.rand(2), random.random()
        return super().dataset()


def test_the_data_is_read_before_any_model_loads_and_leaves_the_seed_alone(tmp_path):
    """run() reads and probes the data first — a data problem costs no backbone load — and the model is
    initialised from the seed exactly as if no data had been read (mutation: drop the preserved state → the
    initialisation differs)."""
    DataFirstTask.built.clear()
    DataFirstTask.data_draws = False
    trainer.run(DataFirstTask, ["--preset", "default", "--output-dir", str(tmp_path / "quiet"), "--max-steps", "1"])
    DataFirstTask.data_draws = True
    trainer.run(DataFirstTask, ["--preset", "default", "--output-dir", str(tmp_path / "noisy"), "--max-steps", "1"])
    quiet, noisy = DataFirstTask.built
    assert torch.equal(quiet, noisy)
    with pytest.raises(DataError, match="probed items are readable"):  # 7 of 8 unreadable: refused, build never ran
        trainer.run(DataFirstTask, ["--preset", "default", "--output-dir", str(tmp_path / "bad"),
                                    "--set", "unreadable=" + ",".join(str(i) for i in range(64) if i % 8)])
    assert len(DataFirstTask.built) == 2


def test_preserved_random_state_restores_every_generator():
    before = (torch.rand(2), np.random.rand(2), random.random())
    torch.manual_seed(5), np.random.seed(5), random.seed(5)
    with trainer.preserved_random_state():
        torch.rand(9), np.random.rand(9), random.random()
    after = (torch.rand(2), np.random.rand(2), random.random())
    torch.manual_seed(5), np.random.seed(5), random.seed(5)
    fresh = (torch.rand(2), np.random.rand(2), random.random())
    assert not torch.equal(before[0], fresh[0])  # the draws depend on the state at all
    assert torch.equal(after[0], fresh[0]) and (after[1] == fresh[1]).all() and after[2] == fresh[2]


def test_a_checkpoints_random_state_file_restores_every_generator(tmp_path):
    """save_rng / load_rng round trip: after loading, Python, NumPy and torch draw what they drew after saving."""
    torch.manual_seed(3), np.random.seed(3), random.seed(3)
    ckpt.save_rng(tmp_path / "rng.safetensors")
    after_save = (torch.rand(3), np.random.rand(3), random.random())
    torch.manual_seed(9), np.random.seed(9), random.seed(9)
    assert not torch.equal(torch.rand(3), after_save[0])  # another state draws otherwise
    ckpt.load_rng(tmp_path / "rng.safetensors")
    after_load = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(after_load[0], after_save[0]) and (after_load[1] == after_save[1]).all()
    assert after_load[2] == after_save[2]
