"""Probes of the world, its rows and its ceilings: ``--world-set model.setting=value`` builds a changed world in a
folder of its own (the default world is never touched), ``--row-set key=value`` changes every selected row's trainer
settings, and ``--ceiling-set key=value`` the ceilings', each with its own cache key (training/world/registry.py,
training/world/yardstick/common.py, training/world/yardstick/ceiling.py)."""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import time
import types
from pathlib import Path

import pytest

from training.world import evaluate as ev
from training.world import registry
from training.world.registry import World, WorldModel, build_world, open_world, parse_overrides
from training.world.scenes import WORLD_VERSION
from training.world.yardstick import ceiling, edit_transfer, loc, lorweb, regions, runner
from training.world.yardstick.common import MethodContext, check_row_overrides, parse_settings


def test_world_overrides_are_parsed_as_the_settings_types():
    parsed = parse_overrides(["flux_kontext.heads=6", "flux_kontext.lr=1e-3", "clip.steps=300",
                              "instruct_pix2pix.prediction=epsilon", "flux_kontext.lr=4"])
    assert parsed == {"flux_kontext": {"heads": 6, "lr": 4.0}, "clip": {"steps": 300},
                      "instruct_pix2pix": {"prediction": "epsilon"}}
    assert isinstance(parsed["flux_kontext"]["lr"], float)  # an int given for a float setting stays a float
    assert parse_overrides(None) == {} and parse_overrides([]) == {}


@pytest.mark.parametrize("item, says", [
    ("flux_kontext.heads", "model.setting=value"),
    ("heads=6", "model.setting=value"),
    ("no_such_model.heads=6", "unknown world model 'no_such_model'"),
    ("flux_kontext.head=6", "has no setting 'head'"),
    ("flux_kontext.heads=6.5", "type int"),
    ("flux_kontext.heads=true", "type int"),
    ("flux_kontext.lr=fast", "type float"),
])
def test_a_bad_world_override_is_refused_by_name(item, says):
    with pytest.raises(ValueError, match=says):
        parse_overrides([item])


def test_an_override_rekeys_its_model_and_what_depends_on_it_only():
    def keys(overrides=None):
        out: dict[str, str] = {}
        for name in registry.build_order(["flux_kontext", "clip"]):
            out[name] = registry.model_key(name, True, 0, out, overrides)
        return out

    plain, wide = keys(), keys({"flux_kontext": {"heads": 6}})
    assert plain == keys({}) and wide["flux_kontext"] != plain["flux_kontext"]
    assert wide["autoencoder"] == plain["autoencoder"] and wide["clip"] == plain["clip"]
    changed_autoencoder = keys({"autoencoder": {"width": 32}})
    assert changed_autoencoder["flux_kontext"] != plain["flux_kontext"]  # through its dependency's key
    # the default world keeps its folder name (caches stay valid); a probe gets its own, stable one
    assert registry.world_folder(True, 0, Path("/w")) == Path(f"/w/v{WORLD_VERSION}-quick-s0")
    probe = registry.world_folder(True, 0, Path("/w"), {"flux_kontext": {"heads": 6}})
    assert probe.name.startswith(f"v{WORLD_VERSION}-quick-s0-x") and probe != registry.world_folder(
        True, 0, Path("/w"), {"flux_kontext": {"heads": 4}})


def test_a_setting_added_late_keeps_the_keys_of_the_builds_made_before_it(tmp_path, monkeypatch):
    """A model's key at a late setting's old value is the key it had before the setting existed (written out by
    hand), so the cached builds stay valid; any other value rekeys it, and the build record keeps every setting."""
    builds: list[dict] = []

    def build(ctx):
        builds.append(dict(ctx.config))
        return {}

    before = WorldModel("late_fake", build, configs={"full": {"width": 8}, "quick": {"width": 4}})
    grown = {"full": {"width": 8, "extra": 0}, "quick": {"width": 4, "extra": 0}}
    after = WorldModel("late_fake", build, configs=grown, late_settings={"extra": 0})
    monkeypatch.setitem(registry.WORLD_MODELS, "late_fake", before)
    old_key = registry.model_key("late_fake", True, 0, {})
    payload = json.dumps({"world": WORLD_VERSION, "model": "late_fake", "version": 1, "seed": 0,
                          "config": {"width": 4}, "depends": {}}, sort_keys=True)
    assert old_key == hashlib.sha256(payload.encode()).hexdigest()[:16]
    build_world(["late_fake"], quick=True, seed=0, root=tmp_path)
    monkeypatch.setitem(registry.WORLD_MODELS, "late_fake", after)
    assert registry.model_key("late_fake", True, 0, {}) == old_key
    assert registry.model_key("late_fake", True, 0, {}, {"late_fake": {"extra": 2}}) != old_key
    build_world(["late_fake"], quick=True, seed=0, root=tmp_path)
    assert builds == [{"width": 4}], "the cached build is reused, not rebuilt"
    build_world(["late_fake"], quick=True, seed=0, root=tmp_path, overrides={"late_fake": {"extra": 2}})
    assert builds[-1] == {"width": 4, "extra": 2}, "a probe of the late setting builds with it"
    monkeypatch.setitem(registry.WORLD_MODELS, "late_fake", WorldModel("late_fake", build, configs=grown))
    assert registry.model_key("late_fake", True, 0, {}) != old_key, "not declared late: the new setting rekeys"


def test_a_bumped_world_model_version_rebuilds_it_instead_of_reusing_the_old_build(tmp_path, monkeypatch):
    """A cached build is reused only under its own key: bumping a model's ``version`` (its builder changed what it
    writes) rekeys it, so the next build_world builds it again, in the same folder, and records the new key."""
    builds: list[int] = []

    def build(ctx):
        builds.append(len(builds))
        (ctx.folder / "weights.txt").write_text(str(len(builds)))
        return {}

    configs = {"full": {"width": 8}, "quick": {"width": 4}}
    monkeypatch.setitem(registry.WORLD_MODELS, "version_fake", WorldModel("version_fake", build, configs=configs))
    first = build_world(["version_fake"], quick=True, seed=0, root=tmp_path)
    build_world(["version_fake"], quick=True, seed=0, root=tmp_path)
    assert builds == [0], "the same key: reused"
    monkeypatch.setitem(registry.WORLD_MODELS, "version_fake",
                        WorldModel("version_fake", build, configs=configs, version=2))
    second = build_world(["version_fake"], quick=True, seed=0, root=tmp_path)
    assert second.root == first.root, "the model's version does not name the world folder"
    assert builds == [0, 1], "a new version is built again, not reused"
    assert second.builds["version_fake"]["key"] != first.builds["version_fake"]["key"]
    assert second.builds["version_fake"]["version"] == 2
    assert (second.path("version_fake") / "weights.txt").read_text() == "2"


def test_the_unets_position_probes_are_late_settings_at_zero():
    model = registry.WORLD_MODELS["instruct_pix2pix"]
    assert model.late_settings == {"position_frequencies": 0, "attention_positions": 0}
    assert all(config[k] == 0 for config in model.configs.values() for k in model.late_settings)


def test_a_probe_world_is_built_apart_with_its_settings(tmp_path, monkeypatch):
    seen: list[dict] = []

    def build(ctx):
        seen.append(dict(ctx.config))
        (ctx.folder / "weights.txt").write_text(str(ctx.config["width"]))
        return {"width": ctx.config["width"]}

    monkeypatch.setitem(registry.WORLD_MODELS, "probe_fake", WorldModel(
        "probe_fake", build, configs={"full": {"width": 8, "rate": 0.5}, "quick": {"width": 4, "rate": 0.5}}))
    plain = build_world(["probe_fake"], quick=True, seed=0, root=tmp_path)
    wide = build_world(["probe_fake"], quick=True, seed=0, root=tmp_path,
                       overrides=parse_overrides(["probe_fake.width=16"]))
    assert [c["width"] for c in seen] == [4, 16] and wide.root != plain.root
    assert (plain.path("probe_fake") / "weights.txt").read_text() == "4"  # the default world is untouched
    assert (wide.path("probe_fake") / "weights.txt").read_text() == "16"
    assert wide.builds["probe_fake"]["config"] == {"width": 16, "rate": 0.5}
    assert json.loads((wide.root / registry.MANIFEST).read_text())["overrides"] == {"probe_fake": {"width": 16}}
    reopened = open_world(wide.root)
    assert reopened.overrides == {"probe_fake": {"width": 16}} and open_world(plain.root).overrides == {}
    build_world(["probe_fake"], quick=True, seed=0, root=tmp_path, overrides={"probe_fake": {"width": 16}})
    assert len(seen) == 2  # reused, not rebuilt


def test_a_probe_world_copies_the_models_its_overrides_leave_alone(tmp_path, monkeypatch):
    """``--world-set dependent.width=16``: the dependency's key is unchanged, so it is built once, in the default
    world, and copied into the probe's; the overridden model is built in the probe's folder reading that copy."""
    built: list[tuple[str, int]] = []

    def build_dependency(ctx):
        built.append(("dependency", 0))
        (ctx.folder / "weights.txt").write_text("dependency")
        return {}

    def build_dependent(ctx):
        built.append(("dependent", ctx.config["width"]))
        assert (ctx.dependency("dependency") / "weights.txt").read_text() == "dependency"
        (ctx.folder / "weights.txt").write_text(str(ctx.config["width"]))
        return {}

    monkeypatch.setitem(registry.WORLD_MODELS, "dependency", WorldModel(
        "dependency", build_dependency, configs={"full": {"steps": 2}, "quick": {"steps": 1}}))
    monkeypatch.setitem(registry.WORLD_MODELS, "dependent", WorldModel(
        "dependent", build_dependent, configs={"full": {"width": 8}, "quick": {"width": 4}}, depends=("dependency",)))
    probe = build_world(["dependent"], quick=True, seed=0, root=tmp_path, overrides={"dependent": {"width": 16}})
    assert built == [("dependency", 0), ("dependent", 16)]
    default = open_world(registry.world_folder(True, 0, tmp_path))
    assert set(default.builds) == {"dependency"}  # built there, where every later world finds it
    assert probe.builds["dependency"] == default.builds["dependency"]
    assert (probe.path("dependency") / "weights.txt").read_text() == "dependency"  # a copy: the folder stands alone
    assert not probe.path("dependency").is_symlink()
    plain = build_world(["dependent"], quick=True, seed=0, root=tmp_path)
    assert built[2:] == [("dependent", 4)] and (plain.path("dependent") / "weights.txt").read_text() == "4"
    build_world(["dependent"], quick=True, seed=0, root=tmp_path, overrides={"dependent": {"width": 16}})
    assert len(built) == 3  # everything reused
    # forcing the probe rebuilds the probe's own model and copies the other again; the default world is not rebuilt
    build_world(["dependent"], quick=True, seed=0, root=tmp_path, overrides={"dependent": {"width": 16}}, force=True)
    assert built[3:] == [("dependent", 16)]


def _world(root: str = "/a") -> World:
    builds = {"autoencoder": {"key": "a"}, "clip": {"key": "c"}, "flux_kontext": {"key": "f"}}
    return World(Path(root) / "v2-quick-s0", True, 0, builds)


def test_ceiling_setting_overrides_change_the_run_and_its_cache_key():
    overrides = ceiling.parse_setting_overrides(["learning_rate=5e-4", "timestep_sampling=uniform"])
    assert overrides == {"learning_rate": 0.0005, "timestep_sampling": "uniform"}
    world = _world()
    plain = ceiling.ceiling_settings(lorweb.CEILING, world, "invert", 0)
    changed = ceiling.ceiling_settings(lorweb.CEILING, world, "invert", 0, overrides=overrides)
    assert plain["learning_rate"] != 0.0005 and plain["timestep_sampling"] != "uniform"
    assert changed == {**plain, **overrides}
    # an override equal to the default is the default run: the same settings, so the same cache entry
    same = ceiling.ceiling_settings(lorweb.CEILING, world, "invert", 0,
                                    overrides={"learning_rate": plain["learning_rate"]})
    assert same == plain
    assert ceiling.ceiling_settings(lorweb.CEILING, world, "invert", 0, steps=9,
                                    overrides=overrides)["max_steps"] == 9

    def key(settings):
        return ceiling.cache_key("lorweb", lorweb.CEILING, world, settings, "invert", 0)

    assert key(changed) != key(plain)


@pytest.mark.parametrize("item", ["rank=8", "num_entries=2", "data=world", "seed=3", "max_steps=9", "full_finetune=true",
                                  "plain_lora=false",
                                  "backbone=world:/x", "learning_rate"])
def test_what_defines_a_ceiling_cannot_be_overridden(item):
    with pytest.raises(ValueError, match="cannot be overridden|key=value"):
        ceiling.parse_setting_overrides([item])
    if "=" in item:
        key, value = item.split("=")
        with pytest.raises(ValueError, match="cannot be overridden"):
            ceiling.ceiling_settings(lorweb.CEILING, _world(), "invert", 0, overrides={key: value})


@pytest.mark.parametrize("args", [["--world-set", "flux_kontext.nope=1"], ["--ceiling-set", "rank=8"]])
def test_the_yardstick_refuses_a_bad_probe_before_building_anything(args, tmp_path, capsys):
    with pytest.raises(SystemExit):
        runner.main(["--quick", "--methods", "lorweb", "--world-root", str(tmp_path), *args])
    err = capsys.readouterr().err
    assert "no setting 'nope'" in err or "cannot be overridden" in err
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("args, says", [
    (["--quick", "--methods", "lorweb", "--ceiling-set", "learning_rate=2e-3"], "--quick turns them off"),
    (["--methods", "lorweb", "--no-ceilings", "--ceiling-steps", "9"], "--no-ceilings"),
    (["--quick", "--methods", "lorweb", "--ceiling-families", "invert"], "add --ceilings"),
    (["--quick", "--methods", "edit_transfer", "--full-ceilings"], "add --ceilings"),
    (["--quick", "--methods", "regions", "--ceilings", "--ceiling-set", "learning_rate=2e-3"], "none of regions"),
    (["--quick", "--methods", "loc", "--ceiling-rank", "16"], "add --ceilings"),
    (["--quick", "--methods", "loc", "--ceilings", "--ceiling-set", "full.finetune_scope=attention"],
     "add --full-ceilings"),
    (["--quick", "--methods", "loc", "--ceilings", "--ceiling-set", "base.learning_rate=1"], "not 'base'"),
    (["--quick", "--methods", "loc", "--ceilings", "--ceiling-set", "full.rank=8"], "cannot be overridden"),
    (["--quick", "--methods", "loc", "--ceilings", "--ceiling-rank", "0"], "at least 1"),
    (["--quick", "--methods", "lorweb", "--ceiling-jobs", "2"], "add --ceilings"),
    (["--quick", "--methods", "lorweb", "--ceilings", "--ceiling-jobs", "0"], "at least 1"),
    (["--quick", "--methods", "lorweb,edit_transfer", "--diagnostics"], "none of lorweb, edit_transfer has any"),
])
def test_a_ceiling_option_without_a_ceiling_is_refused_not_ignored(args, says, tmp_path, capsys):
    with pytest.raises(SystemExit):
        runner.main([*args, "--world-root", str(tmp_path)])
    assert says in capsys.readouterr().err
    assert not list(tmp_path.iterdir())  # refused before any world is built


# ---------------------------------------------------------------------------------------------------------------------
# --row-set: the rows' trainer settings


class _Stop(Exception):
    """Raised by a stand-in trainer once the row has shown what it trains with."""


def _context(tmp_path, overrides: dict, examples: dict | None = None, resume: bool = False,
             diagnostics: bool = False) -> MethodContext:
    return MethodContext(_world(str(tmp_path)), 0, True, tmp_path / "row", examples or {}, overrides, resume,
                         diagnostics)


def test_row_settings_are_parsed_as_json_literals_or_text():
    assert parse_settings(["learning_rate=2e-3", "max_steps=1200", "data=world:families=invert+hflip",
                           "use_8bit_adam=false"], "x=1") == {
        "learning_rate": 0.002, "max_steps": 1200, "data": "world:families=invert+hflip", "use_8bit_adam": False}
    with pytest.raises(ValueError, match="key=value"):
        parse_settings(["learning_rate"], "x=1")


@pytest.mark.parametrize("method", list(runner.METHODS))
def test_every_row_takes_a_setting_of_its_trainer(method):
    check_row_overrides(runner.METHODS[method], {"learning_rate": 2e-3, "max_steps": 7})


@pytest.mark.parametrize("method, overrides, says", [
    ("lorweb", {"seed": 3}, "set by the lorweb row itself"),
    ("lorweb", {"backbone": "world:/x"}, "set by the lorweb row itself"),
    ("lorweb", {"query_encoder": "world:/x"}, "set by the lorweb row itself"),
    ("loc", {"image_encoder": "world:/x"}, "set by the loc row itself"),
    ("loc", {"random_exchange": False}, "set by the loc row itself"),
    ("edit_transfer", {"text_free": True}, "set by the edit_transfer row itself"),
    ("regions", {"mode": "text"}, "set by the regions row itself"),
    ("regions", {"residual": False}, "set by the regions row itself"),
    ("lorweb", {"random_exchange": True}, r"not a setting of the lorweb row's trainer \(LoRWeBConfig\)"),
    ("regions", {"rank": 8}, r"not a setting of the regions row's trainer \(RegionConfig\)"),
    ("lorweb", {"rank": "four"}, "expects int"),
    ("loc", {"learning_rate": "fast"}, "must be a number"),
    ("edit_transfer", {"gradient_checkpointing": 1}, "expects bool"),
    ("lorweb", {"max_steps": 0}, "max_steps must be a positive integer"),
])
def test_a_row_setting_the_row_cannot_take_is_refused_by_name(method, overrides, says):
    with pytest.raises(ValueError, match=says):
        check_row_overrides(runner.METHODS[method], overrides)


@pytest.mark.parametrize("args, says", [
    (["--methods", "lorweb,loc", "--row-set", "random_exchange=false"], "not a setting of the lorweb row"),
    (["--methods", "loc", "--row-set", "random_exchange=false"], "set by the loc row itself"),
    (["--methods", "lorweb", "--row-set", "max_steps"], "key=value"),
])
def test_the_yardstick_refuses_a_bad_row_setting_before_building_anything(args, says, tmp_path, capsys):
    with pytest.raises(SystemExit):
        runner.main(["--quick", "--world-root", str(tmp_path), *args])
    assert says in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


def test_lorweb_row_trains_both_its_runs_with_the_row_settings(tmp_path, monkeypatch):
    runs = []

    def fake_train(root, out, quick, seed, max_steps=None, resume=False, overrides=None):
        runs.append((out.name, max_steps, overrides))
        resumed.append(resume)
        if len(runs) == 2:
            raise _Stop

    monkeypatch.setattr(lorweb, "train_lorweb", fake_train)
    overrides = {"learning_rate": 2e-3, "data": "world:families=invert"}
    for resume in (False, True):  # --resume-runs reaches both runs
        runs, resumed = [], []
        with pytest.raises(_Stop):
            lorweb.run_lorweb(_context(tmp_path, overrides, resume=resume))
        assert resumed == [resume, resume]
    (init_name, init_steps, init), (train_name, train_steps, train) = runs
    assert (init_name, init_steps, train_name, train_steps) == ("init", 1, "train", None)
    assert train == overrides
    # the basis at initialisation: the same run (same data), one step at learning rate 0
    assert init == {**overrides, "learning_rate": 0.0, "sample_every": 10_000}


@pytest.mark.parametrize("diagnostics", [False, True])
def test_loc_row_trains_its_runs_with_the_row_settings_and_its_own_exchange(diagnostics, tmp_path, monkeypatch):
    runs = []

    def fake_train(root, out, quick, seed, overrides=None, resume=False):
        runs.append((out.name, overrides, resume))
        return 0.0

    def stop(spec):  # the row loads its backbone once every run is trained
        raise _Stop

    monkeypatch.setattr(loc, "train_loc", fake_train)
    monkeypatch.setattr(loc, "load_ip2p", stop)
    with pytest.raises(_Stop):
        loc.run_loc(_context(tmp_path, {"learning_rate": 3e-4}, resume=True, diagnostics=diagnostics))
    published = [("train", {"learning_rate": 3e-4, "random_exchange": True}, True)]
    ablation = [("train_no_exchange", {"learning_rate": 3e-4, "random_exchange": False}, True)]
    assert runs == published + (ablation if diagnostics else [])


def test_edit_transfer_rows_share_a_run_only_with_the_same_row_settings(tmp_path, monkeypatch):
    runs = []

    def fake_train(root, out, quick, seed, text_free=False, overrides=None, resume=False):
        runs.append(overrides)
        assert resume is False  # the context's default
        out.mkdir(parents=True, exist_ok=True)
        (out / edit_transfer.LORA_FILE).write_bytes(b"stand-in")
        return 1.0

    monkeypatch.setattr(edit_transfer, "train_edit_transfer", fake_train)
    monkeypatch.setattr(edit_transfer, "_RUNS", {})
    edit_transfer.trained_run(_context(tmp_path, {"rank": 4}), False)
    edit_transfer.trained_run(_context(tmp_path, {"rank": 4}), False)  # the stock-inpaint row: the same run
    edit_transfer.trained_run(_context(tmp_path, {"rank": 8}), False)
    assert runs == [{"rank": 4}, {"rank": 8}]


class _Loaded:
    """A stand-in for the world CLIP and T5 classes: loads nothing."""

    @staticmethod
    def from_folder(folder):
        return None


def _stub_region_row(monkeypatch, fake_train) -> None:
    """The regions row with ``fake_train`` for its trainer and no world CLIP or T5 read."""
    monkeypatch.setattr(regions, "train_region", fake_train)
    monkeypatch.setattr(regions, "FrozenClip", _Loaded)
    monkeypatch.setattr(regions, "InstructionEncoder", _Loaded)


def test_regions_row_trains_with_the_row_settings_and_its_own_mode(tmp_path, monkeypatch):
    runs = []

    def fake_train(settings, out, max_steps, resume=False):
        runs.append((out.name, settings, max_steps, resume))
        raise _Stop

    _stub_region_row(monkeypatch, fake_train)
    examples = {"add_square_top_left": ev.examples("add_square_top_left", 1, 64)}
    ctx = _context(tmp_path, {"learning_rate": 5e-4, "max_steps": 7}, examples, resume=True)
    ctx.world.builds[regions.T5_FOLDER] = {"key": "t"}
    with pytest.raises(_Stop):
        regions.run_bench_row(ctx)
    (name, settings, max_steps, resume), = runs
    assert name == "text_init" and max_steps == 1 and resume is True
    assert settings["mode"] == "text" and settings["seed"] == 0 and settings["learning_rate"] == 0.0
    assert settings["max_steps"] == 7  # the row's own settings, the override in them


@pytest.mark.parametrize("diagnostics", [False, True])
def test_regions_row_trains_its_own_runs_and_the_ablations_only_when_asked(diagnostics, tmp_path, monkeypatch):
    trained: list[str] = []
    loaded = types.SimpleNamespace(spec=types.SimpleNamespace(mlp_width=128))

    def fake_train(settings, out, max_steps, resume=False):
        trained.append(out.name)
        return 0.0

    def stop(*args):  # the row predicts regions once every run is trained and scored
        raise _Stop

    _stub_region_row(monkeypatch, fake_train)
    monkeypatch.setattr(regions, "load_region_predictor", lambda path: loaded)
    monkeypatch.setattr(regions, "world_iou", lambda model, clip, encoder, families, *rest: {
        f: {"text": 0.5, "analogy": 0.5} for f in families})
    monkeypatch.setattr(regions, "losses_from_log", lambda path: None)
    monkeypatch.setattr(regions, "predicted_regions", stop)
    examples = {f: ev.examples(f, 1, 64) for f in ("add_square_top_left", "add_square_bottom_right")}
    ctx = _context(tmp_path, {}, examples, diagnostics=diagnostics)
    ctx.world.builds[regions.T5_FOLDER] = {"key": "t"}
    with pytest.raises(_Stop):
        regions.run_bench_row(ctx, lorweb_output=object())
    names = [name for name, _, _ in regions.RUNS] if diagnostics else ["text", "analogy"]
    assert trained == [run for name in names for run in (f"{name}_init", name)]


@pytest.mark.parametrize("flag", [[], ["--diagnostics"]])
def test_the_yardstick_hands_each_row_the_diagnostics_flag(flag, tmp_path, monkeypatch):
    seen = []

    def capture(ctx):
        seen.append(ctx.diagnostics)
        raise _Stop

    world = _world(str(tmp_path))
    world.builds["autoencoder"]["config"] = {"panel": 64}
    monkeypatch.setattr(runner, "build_world", lambda *args, **kwargs: world)
    monkeypatch.setitem(runner.METHODS, "loc", dataclasses.replace(runner.METHODS["loc"], run=capture))
    with pytest.raises(_Stop):
        runner.main(["--quick", "--methods", "loc", "--examples", "1", "--out", str(tmp_path / "out"), *flag])
    assert seen == [bool(flag)]


def test_the_report_records_the_row_settings_only_when_given(tmp_path):
    args = argparse.Namespace(seed=0, quick=True, json=None, resume_runs=False, diagnostics=False)
    plain = runner.write_report(args, tmp_path / "plain", time.monotonic(), {}, _world())
    probe = runner.write_report(args, tmp_path / "probe", time.monotonic(), {}, _world(), {"learning_rate": 0.002})
    assert "row_overrides" not in plain and probe["row_overrides"] == {"learning_rate": 0.002}
    assert "resumed_runs" not in plain and "resumed_runs" not in probe
    continued = runner.write_report(argparse.Namespace(seed=0, quick=True, json=None, resume_runs=True,
                                                       diagnostics=True),
                                    tmp_path / "continued", time.monotonic(), {}, _world())
    assert continued["resumed_runs"] is True and continued["diagnostics"] is True
    assert "diagnostics" not in plain
    assert json.loads((tmp_path / "probe" / "results.json").read_text())["row_overrides"] == {"learning_rate": 0.002}
