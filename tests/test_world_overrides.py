"""Probes of the world and its ceilings: ``--world-set model.setting=value`` builds a changed world in a folder of its
own (the default world is never touched) and ``--ceiling-set key=value`` changes the ceilings' trainer settings,
each with its own cache key (training/world/registry.py, training/world/yardstick/ceiling.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from training.world import registry
from training.world.registry import World, WorldModel, build_world, open_world, parse_overrides
from training.world.scenes import WORLD_VERSION
from training.world.yardstick import ceiling, lorweb, runner


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


def _world(root: str = "/a") -> World:
    builds = {"autoencoder": {"key": "a"}, "clip": {"key": "c"}, "flux_kontext": {"key": "f"}}
    return World(Path(root) / "v2-quick-s0", True, 0, builds)


def test_ceiling_setting_overrides_change_the_run_and_its_cache_key():
    overrides = ceiling.parse_setting_overrides(["learning_rate=2e-3", "timestep_sampling=uniform"])
    assert overrides == {"learning_rate": 0.002, "timestep_sampling": "uniform"}
    world = _world()
    plain = ceiling.ceiling_settings(lorweb.CEILING, world, "invert", 0)
    changed = ceiling.ceiling_settings(lorweb.CEILING, world, "invert", 0, overrides=overrides)
    assert plain["learning_rate"] != 0.002 and changed == {**plain, **overrides}
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
])
def test_a_ceiling_option_without_a_ceiling_is_refused_not_ignored(args, says, tmp_path, capsys):
    with pytest.raises(SystemExit):
        runner.main([*args, "--world-root", str(tmp_path)])
    assert says in capsys.readouterr().err
    assert not list(tmp_path.iterdir())  # refused before any world is built
