"""bench.region_forms --clip: the region runs train and are scored with the given CLIP folder instead of the world's
(quick world, a probe CLIP trained 2 steps by bench.clip_flip_probe, one step per run)."""

from __future__ import annotations

import json
import shutil

import pytest

import bench.clip_flip_probe as clip_probe
import bench.region_forms as forms
from analogy_core.regions import FrozenClip, InstructionEncoder, load_region_predictor
from training.world import build_world
from training.world import scenes as world
from training.world.loaders import T5_FOLDER
from training.world.presets import RunSettingsChanged
from training.world.yardstick.regions import world_region_figures

EXAMPLES = 4


def test_another_clip_trains_and_scores_the_runs(tmp_path):
    probe_clip = tmp_path / "probe_clip"
    clip_probe.main(["--steps", "2", "--examples", "2", "--save", str(probe_clip)])
    report = forms.main(["--clip", str(probe_clip), "--runs", "text", "--steps", "1", "--examples", str(EXAMPLES),
                         "--out", str(tmp_path / "runs"), "--json", str(tmp_path / "forms.json")])
    assert report["clip"] == str(probe_clip.resolve()) and json.loads((tmp_path / "forms.json").read_text()) == report
    settings = json.loads((tmp_path / "runs" / "text" / "config.json").read_text())
    assert settings["clip"] == str(probe_clip.resolve())                   # trained with the probe CLIP

    built = build_world(["clip", T5_FOLDER], quick=True, seed=0)
    encoder = InstructionEncoder.from_folder(built.path(T5_FOLDER))
    model = load_region_predictor(tmp_path / "runs" / "text" / forms.CHECKPOINT)
    local = [f for f in world.families("all") if world.get_family(f).kind == "local"]
    figures = {name: world_region_figures(model, FrozenClip.from_folder(folder), encoder, local, EXAMPLES,
                                          world.REFERENCE_SIZE)
               for name, folder in (("probe", probe_clip), ("world", built.path("clip")))}
    shares = {name: {f: round(v[f]["text"]["marked_share"], 4) for f in local} for name, v in figures.items()}
    assert shares["probe"] != shares["world"]                              # the CLIP changes the region
    assert {f: v["marked_share"] for f, v in report["runs"]["text"]["region_per_family_end"].items()} == shares["probe"]

    again = forms.main(["--clip", str(probe_clip), "--runs", "text", "--steps", "1", "--examples", str(EXAMPLES),
                        "--out", str(tmp_path / "runs")])
    reused = {k: v for k, v in again["runs"]["text"].items() if k != "train_seconds"}
    assert again["runs"]["text"]["train_seconds"] is None                                        # reused ...
    assert reused == {k: v for k, v in report["runs"]["text"].items() if k != "train_seconds"}   # ... as it was
    with pytest.raises(RunSettingsChanged, match="clip"):        # the same folder asked with the world's CLIP
        forms.main(["--runs", "text", "--steps", "1", "--examples", "1", "--out", str(tmp_path / "runs")])
    with pytest.raises(RunSettingsChanged, match="holds a run of 1 steps, asked 2"):
        forms.main(["--clip", str(probe_clip), "--runs", "text", "--steps", "2", "--examples", "1",
                    "--out", str(tmp_path / "runs")])


def test_a_folder_that_is_not_a_clip_is_refused(tmp_path):
    with pytest.raises(SystemExit):
        forms.main(["--clip", str(tmp_path), "--runs", "text", "--steps", "1"])


def test_set_changes_every_runs_trainer_setting_and_a_reused_folder_must_match(tmp_path):
    out = tmp_path / "runs"
    report = forms.main(["--runs", "analogy", "--steps", "1", "--examples", "1", "--set", "hidden=24",
                         "--out", str(out)])
    assert report["settings_changed"] == {"hidden": 24}
    assert json.loads((out / "analogy" / "config.json").read_text())["hidden"] == 24
    assert load_region_predictor(out / "analogy" / forms.CHECKPOINT).spec.mlp_width == 24  # the model has it
    assert report["runs"]["analogy"]["hidden"] == 24  # ... and the report says so
    with pytest.raises(RunSettingsChanged, match="hidden"):  # the same folder asked without the change
        forms.main(["--runs", "analogy", "--steps", "1", "--examples", "1", "--out", str(out)])


@pytest.mark.parametrize("setting", ["mode=text", "seed=3", "mask_weight=1", "clip=x", "max_steps=5", "output_dir=x",
                                     "hiden=128", "hidden"])
def test_set_refuses_what_the_runs_or_the_command_set(setting):
    with pytest.raises(SystemExit):
        forms.main(["--runs", "analogy", "--steps", "1", "--set", setting])


def test_a_run_cut_short_is_continued_not_reported_as_complete(tmp_path):
    out = tmp_path / "runs"
    args = ["--runs", "analogy", "--steps", "2", "--examples", "1", "--set", "checkpoint_every=1",
            "--set", "keep_checkpoints=2", "--out", str(out)]
    whole = forms.main(args)
    shutil.rmtree(out / "analogy" / "checkpoints" / "step_000002")  # killed after step 1: the predictor file is there
    assert (out / "analogy" / forms.CHECKPOINT).is_file()
    continued = forms.main(args)
    assert continued["runs"]["analogy"]["train_seconds"] is not None               # trained again, from step 1
    assert (out / "analogy" / "checkpoints" / "step_000002").is_dir()
    for key in ("iou_per_family_end", "region_per_family_end"):                    # the resume is exact
        assert continued["runs"]["analogy"][key] == whole["runs"]["analogy"][key]
    assert forms.main(args)["runs"]["analogy"]["train_seconds"] is None            # now complete: reused
