"""``bench.analogy_world --resume-runs``: a row continues the training runs already in ``--out`` — extended by a
longer ``max_steps`` it must give the figures of one run of that length (the trainer's resume is exact), and a run
asked to continue with other settings is refused before any training.

The reference is a fresh run of the full length through the same command, on the session's quick world (LoRWeB's
row: two runs, the basis at initialisation and the trained one, both continued).
"""

from __future__ import annotations

import importlib
import json

import pytest
from world_fixtures import SEED, quick_world

from training.config import build_config
from training.world.presets import TRAINER_TASKS, RunSettingsChanged, check_resumable, preset_defaults
from training.world.yardstick.common import losses_from_log
from training.world.yardstick.runner import main as yardstick

FIGURES = ("edited_cells", "kept_cells", "error", "error_over_no_edit")
# a rate at which two steps move the basis (else the extended run would measure as the short one)
TINY = ["--methods", "lorweb", "--quick", "--no-ceilings", "--seed", str(SEED), "--examples", "1",
        "--row-set", "learning_rate=0.05"]


def figures(report: dict) -> dict:
    return {family: {k: row[k] for k in FIGURES} for family, row in report["methods"]["lorweb"]["families"].items()}


# --------------------------------------------------------------------------------------------------------------------
# which settings a run may continue with


def recorded_run(tmp_path, **config) -> object:
    tmp_path.mkdir(parents=True, exist_ok=True)
    (tmp_path / "config.json").write_text(json.dumps({"learning_rate": 0.002, "max_steps": 100, "keep_exports": False,
                                                      "caption_dropout": 0.0, "full_finetune": False,
                                                      "targets": ["a.*", "b.*"], "backbone": "world:/w", **config}))
    return tmp_path


def test_the_same_settings_as_the_trainer_reads_them_pass(tmp_path):
    run = recorded_run(tmp_path)
    # --set text: "2e-3" is the 0.002 the trainer recorded, "false" its False, "0" its 0.0
    check_resumable(run, {"learning_rate": "2e-3", "full_finetune": "false", "caption_dropout": "0",
                          "targets": ["a.*", "b.*"], "backbone": "world:/w"})
    check_resumable(run, {"learning_rate": 0.002, "full_finetune": False})
    # length and bookkeeping may change
    check_resumable(run, {"learning_rate": 0.002, "max_steps": 400, "keep_exports": True, "checkpoint_every": 7})
    # so may compiling (a run recorded before torch_compile existed, continued compiled)
    check_resumable(run, {"learning_rate": 0.002, "torch_compile": True})


def test_a_changed_setting_is_refused_naming_it(tmp_path):
    run = recorded_run(tmp_path)
    with pytest.raises(RunSettingsChanged, match=r"learning_rate: the run has 0.002, asked '1e-3'"):
        check_resumable(run, {"learning_rate": "1e-3", "max_steps": 400})
    with pytest.raises(RunSettingsChanged, match=r"full_finetune: the run has False, asked 'true'"):
        check_resumable(run, {"full_finetune": "true"})
    with pytest.raises(RunSettingsChanged, match=r"targets: .*\['a\.\*'\]"):
        check_resumable(run, {"targets": ["a.*"]})
    with pytest.raises(RunSettingsChanged, match=r"rank: the run has '<not set>'"):
        check_resumable(run, {"rank": 4})


def test_a_run_is_not_continued_to_fewer_steps_than_it_has(tmp_path):
    run = recorded_run(tmp_path)
    (run / "checkpoints" / "step_000300").mkdir(parents=True)
    (run / "checkpoints" / "step_000300.tmp").mkdir()  # not a checkpoint
    check_resumable(run, {"max_steps": 300})
    check_resumable(run, {"max_steps": "600"})
    with pytest.raises(RunSettingsChanged, match="max_steps=200: it already has a checkpoint at step 300"):
        check_resumable(run, {"max_steps": 200})


def test_one_world_reached_by_another_path_is_the_same_setting(tmp_path):
    """A world folder named through a symlink (or a relative path) is the folder the run recorded; another folder,
    or a path that does not exist, is another setting."""
    world, other = tmp_path / "world", tmp_path / "other"
    world.mkdir()
    other.mkdir()
    (tmp_path / "link").symlink_to(world, target_is_directory=True)
    run = recorded_run(tmp_path / "run", backbone=f"world:{world}", image_encoder=f"world:{world}")
    check_resumable(run, {"backbone": f"world:{tmp_path / 'link'}", "image_encoder": f"world:{world}/."})
    for given in (f"world:{other}", f"world:{tmp_path / 'missing'}", str(world)):
        with pytest.raises(RunSettingsChanged, match="backbone: the run has"):
            check_resumable(run, {"backbone": given})


def test_a_folder_without_a_run_passes(tmp_path):
    check_resumable(tmp_path / "nothing-here", {"learning_rate": 1.0})


def test_a_continued_runs_losses_span_its_invocations(tmp_path):
    log = tmp_path / "train.log"
    wrote = "2026-12-04 13:12:54,993 training: wrote /r/basis.safetensors (steps {}, loss {} -> {})\n"
    log.write_text("a line\n" + wrote.format("0..4", 0.5, 0.25))
    assert losses_from_log(log) == (0.5, 0.25)
    log.write_text(log.read_text() + wrote.format("4..8", 0.24, 0.125))
    assert losses_from_log(log) == (0.5, 0.125)
    log.write_text(log.read_text() + wrote.format("8..8", "nan", "nan"))  # finished: nothing left to train
    assert losses_from_log(log) == (0.5, 0.125)
    log.write_text("no loss here\n")
    assert losses_from_log(log) is None


# --------------------------------------------------------------------------------------------------------------------
# through the yardstick's command


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """(2-step report, the same folder continued to 4 steps, a fresh 4-step report, the continued folder)."""
    quick_world()
    continued, fresh = tmp_path_factory.mktemp("continued"), tmp_path_factory.mktemp("fresh")
    short = yardstick([*TINY, "--out", str(continued), "--row-set", "max_steps=2"])
    extended = yardstick([*TINY, "--out", str(continued), "--row-set", "max_steps=4", "--resume-runs"])
    reference = yardstick([*TINY, "--out", str(fresh), "--row-set", "max_steps=4"])
    return short, extended, reference, continued


def test_an_extended_run_measures_as_one_run_of_its_length(runs):
    short, extended, reference, folder = runs
    assert figures(extended) != figures(short)  # the two more steps changed B′ (else equality below proves nothing)
    assert figures(extended) == figures(reference)
    assert extended["resumed_runs"] is True and "resumed_runs" not in reference
    losses = [r["methods"]["lorweb"]["extra"] for r in (short, extended, reference)]
    assert losses[1]["loss_first_step"] == losses[0]["loss_first_step"] == losses[2]["loss_first_step"]
    assert losses[1]["loss_last_step"] == losses[2]["loss_last_step"] != losses[0]["loss_last_step"]
    log = (folder / "lorweb" / "train" / "train.log").read_text()
    assert "resumed from" in log and "step_000002" in log  # continued, not retrained from scratch
    assert json.loads((folder / "lorweb" / "train" / "config.json").read_text())["max_steps"] == 4


def test_a_finished_run_is_measured_as_it_is(runs):
    _, extended, _, folder = runs
    again = yardstick([*TINY, "--out", str(folder), "--row-set", "max_steps=4", "--resume-runs"])
    assert figures(again) == figures(extended)


def test_continuing_with_another_setting_is_refused(runs, capsys):
    _, _, _, folder = runs
    before = (folder / "lorweb" / "train" / "train.log").read_text()
    with pytest.raises(SystemExit):
        yardstick([*TINY[:-1], "learning_rate=0.01", "--out", str(folder), "--row-set", "max_steps=6",
                   "--resume-runs"])
    error = capsys.readouterr().err
    assert "--resume-runs: cannot continue the run in" in error and "learning_rate: the run has 0.05" in error
    assert (folder / "lorweb" / "train" / "train.log").read_text() == before  # nothing trained


def test_a_setting_the_run_was_given_must_be_asked_again(tmp_path):
    defaults = preset_defaults("training.train_region")
    assert defaults["hidden"] == 128 and defaults["data"] == "world"  # the tiny preset over the config's defaults
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text(json.dumps({**defaults, "hidden": 32, "max_steps": 50}))
    check_resumable(run, {"hidden": 32}, "training.train_region")
    check_resumable(run, {}, None)  # without the trainer, only the asked settings are compared
    with pytest.raises(RunSettingsChanged, match=r"hidden: the run has 32, asked 128"):
        check_resumable(run, {}, "training.train_region")
    narrow = tmp_path / "narrow"  # a run of the preset before it widened the token MLP is not one of today's
    narrow.mkdir()
    (narrow / "config.json").write_text(json.dumps({**defaults, "hidden": 0}))
    with pytest.raises(RunSettingsChanged, match=r"hidden: the run has 0, asked 128"):
        check_resumable(narrow, {}, "training.train_region")
    with pytest.raises(ValueError, match="no trainer task is known"):
        preset_defaults("training.train_nothing")
    older = tmp_path / "older"  # written before a setting existed: judged on the settings it recorded
    older.mkdir()
    (older / "config.json").write_text(json.dumps({k: v for k, v in defaults.items() if k != "attention_init"}))
    check_resumable(older, {}, "training.train_region")


@pytest.mark.parametrize("module", sorted(TRAINER_TASKS))
def test_every_trainers_preset_defaults_are_its_tiny_runs_config(module):
    defaults = preset_defaults(module)
    task_module, name = TRAINER_TASKS[module]
    task = getattr(importlib.import_module(task_module), name)
    assert defaults == build_config(task.config_cls, task.presets, "tiny").to_dict()
    assert importlib.import_module(module).main is importlib.import_module(task_module).main  # the module's own task
