"""bench.region_forms --clip: the region runs train and are scored with the given CLIP folder instead of the world's
(quick world, a probe CLIP trained 2 steps by bench.clip_flip_probe, one step per run)."""

from __future__ import annotations

import json

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
    with pytest.raises(RunSettingsChanged, match="complete run of 1 steps, asked 2"):
        forms.main(["--clip", str(probe_clip), "--runs", "text", "--steps", "2", "--examples", "1",
                    "--out", str(tmp_path / "runs")])


def test_a_folder_that_is_not_a_clip_is_refused(tmp_path):
    with pytest.raises(SystemExit):
        forms.main(["--clip", str(tmp_path), "--runs", "text", "--steps", "1"])
