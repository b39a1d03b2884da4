"""The LoRA ceiling of LoRWeB's row (training/world/yardstick/ceiling.py): a one-entry basis is a plain LoRA, the
ceiling's settings and cache key, and (slow) a quick ceiling run on one global family (and, marked ``expensive``,
one local family, and the issue's target on the quick world with a 256-wide backbone: `bash scripts/test.sh -m
expensive tests/test_world_ceiling.py`).

The slow tests train on the session's quick world (tests/world_fixtures.py) and keep the trained ceilings in its
cache (``<world folder>/ceilings``, or ``$ANALOGY_CEILING_CACHE``): a clean clone trains them once (about 4-5 minutes
per family on the 2-core CPU), later runs reuse them and only sample.
"""

from __future__ import annotations

import os
import shutil
import threading
import time
from pathlib import Path

import pytest
import torch
from torch import nn
from world_fixtures import LORWEB_MODELS, SEED, quick_world

from analogy_core.lorweb.layer import LoRWeBLinear
from training.world import evaluate as ev
from training.world import scenes as world_def
from training.world.presets import (LORWEB_CEILING_RATE, LORWEB_CEILING_STEPS, LORWEB_WORLD, LORWEB_WORLD_QUICK,
                                    lorweb_ceiling_settings, lorweb_settings)
from training.world.registry import World
from training.world.yardstick import ceiling, edit_transfer, lorweb
from training.world.yardstick.common import Ceiling, MethodContext

GLOBAL, LOCAL = "invert", "recolour_red_blue"


def test_a_one_entry_basis_is_a_plain_lora_whatever_the_query():
    torch.manual_seed(0)
    layer = LoRWeBLinear(nn.Linear(12, 10), num_entries=1, rank=8, key_dim=4, query_dim=3 * 768)
    with torch.no_grad():
        layer.lora_B.normal_()
    x = torch.randn(2, 5, 12)
    plain = layer.base(x) + x @ layer.lora_A[0] @ layer.lora_B[0]
    outputs = []
    for query in (torch.randn(2, 3 * 768), 100 * torch.randn(2, 3 * 768)):
        layer.query = query
        outputs.append(layer(x))
        torch.testing.assert_close(outputs[-1], plain)
    outputs[-1].square().sum().backward()
    # the keys and the query projection get no gradient: the softmax over one key is 1
    assert layer.lora_keys.grad is None and layer.att_lora_to_q.weight.grad is None
    assert layer.lora_A.grad.abs().max() > 0 and layer.lora_B.grad.abs().max() > 0


def test_a_one_entry_basis_skips_the_mixing_bit_for_bit(monkeypatch):
    """The one-entry layer leaves out the coefficients (all exactly 1) and gives what the mixing path gives, bit for
    bit, forward and backward."""
    torch.manual_seed(0)
    layer = LoRWeBLinear(nn.Linear(24, 40), num_entries=1, rank=16, key_dim=4, query_dim=3 * 8)
    with torch.no_grad():
        layer.lora_B.normal_()
    layer.query = torch.randn(3, 24)
    x = torch.randn(3, 7, 24, requires_grad=True)

    mixings = []
    coefficients = LoRWeBLinear.coefficients
    monkeypatch.setattr(LoRWeBLinear, "coefficients", lambda self, q: mixings.append(q) or coefficients(self, q))

    def run() -> list[torch.Tensor]:
        x.grad, layer.lora_A.grad, layer.lora_B.grad = None, None, None
        out = layer(x)
        out.square().sum().backward()
        return [out, x.grad, layer.lora_A.grad, layer.lora_B.grad]
    skipped = run()
    assert not torch.equal(skipped[0], layer.base(x)), "the LoRA is live"
    assert not mixings and not layer.lora_keys.requires_grad and not layer.att_lora_to_q.weight.requires_grad
    monkeypatch.setattr(LoRWeBLinear, "reads_query", property(lambda self: True))
    mixed = run()
    assert len(mixings) == 1, "the mixing path ran"
    assert all(torch.equal(a, b) for a, b in zip(skipped, mixed))


@pytest.mark.parametrize("quick", [True, False])
def test_ceiling_settings_are_the_preset_with_one_entry_of_its_rank_budget(quick):
    preset = LORWEB_WORLD_QUICK if quick else LORWEB_WORLD
    settings = lorweb_ceiling_settings("/w", "hflip", quick, seed=3)
    assert settings["num_entries"] == 1 and settings["rank"] == preset["num_entries"] * preset["rank"] == 64
    assert settings["data"] == "world:families=hflip" and settings["seed"] == 3
    assert settings["backbone"] == settings["query_encoder"] == "world:/w"
    changed = {"num_entries", "rank", "data", "seed", "max_steps", "checkpoint_every", "sample_every",
               "learning_rate"}
    # the ceilings' generous budget, the same on both worlds (until 2026-12-04: 400 / 1,000 steps at 6e-3)
    assert settings["learning_rate"] == LORWEB_CEILING_RATE == 2e-3
    assert {k: v for k, v in settings.items() if k not in changed | {"backbone", "query_encoder"}} == \
        {k: v for k, v in preset.items() if k not in changed}
    assert settings["max_steps"] == settings["checkpoint_every"] == LORWEB_CEILING_STEPS["quick" if quick else "full"] \
        == 1200


def _world(root: str, flux_key: str = "f") -> World:
    builds = {"autoencoder": {"key": "a"}, "clip": {"key": "c"}, "flux_kontext": {"key": flux_key}}
    return World(Path(root) / "v2-quick-s0", True, 0, builds)


def test_ceiling_cache_key_names_what_was_trained_not_where_the_world_lies():
    def key(world, family="invert", seed=0, **change):
        settings = {**lorweb.CEILING.settings(world, True, family, seed), **change}
        return ceiling.cache_key("lorweb", lorweb.CEILING, world, settings, family, seed)

    here = key(_world("/a"))
    assert key(_world("/b/c")) == here
    assert len({here, key(_world("/a"), "hflip"), key(_world("/a"), seed=1), key(_world("/a", "g")),
                key(_world("/a"), learning_rate=1e-3)}) == 5


def test_a_bumped_ceiling_version_rekeys_its_cached_runs():
    """A ceiling's ``version`` is bumped when what its runs train or write changes: the cache key of every run of it
    changes with it (a stale cached run is never reused), and nothing else about the ceiling does."""
    import dataclasses

    world = _world("/a")
    settings = lorweb.CEILING.settings(world, True, "invert", 0)
    bumped = dataclasses.replace(lorweb.CEILING, version=lorweb.CEILING.version + 1)
    same = dataclasses.replace(lorweb.CEILING)
    here = ceiling.cache_key("lorweb", lorweb.CEILING, world, settings, "invert", 0)
    assert ceiling.cache_key("lorweb", same, world, settings, "invert", 0) == here, "the key is a pure function"
    assert ceiling.cache_key("lorweb", bumped, world, settings, "invert", 0) != here


def test_a_prefixed_ceiling_setting_reaches_one_kind_of_ceiling_only():
    overrides = ceiling.parse_setting_overrides(["learning_rate=2e-3", "full.finetune_scope=attention",
                                                 "lora.weight_decay=0.1"])
    assert ceiling.for_kind(overrides, "full") == {"learning_rate": 2e-3, "finetune_scope": "attention"}
    assert ceiling.for_kind(overrides, "lora") == {"learning_rate": 2e-3, "weight_decay": 0.1}
    assert ceiling.for_kind(None, "full") == {}


def test_a_ceiling_rank_replaces_the_one_loras_rank_and_nothing_else():
    world = _world("/a")
    plain = ceiling.ceiling_settings(lorweb.CEILING, world, "invert", 0)
    ranked = ceiling.ceiling_settings(lorweb.CEILING, world, "invert", 0, rank=8)
    assert plain["rank"] == 64 and ranked == {**plain, "rank": 8}
    assert ceiling.cache_key("lorweb", lorweb.CEILING, world, ranked, "invert", 0) != \
        ceiling.cache_key("lorweb", lorweb.CEILING, world, plain, "invert", 0)
    for bad in (0, -4, 2.5, True):
        with pytest.raises(ValueError, match="positive integer"):
            ceiling.ceiling_settings(lorweb.CEILING, world, "invert", 0, rank=bad)
    # a basis of several entries, or a full fine-tune, has no single LoRA rank to change
    several = Ceiling("x", (), lambda *a: {"rank": 4, "num_entries": 16}, lorweb.CEILING.sample)
    full = Ceiling("x", (), lambda *a: {"rank": 4, "full_finetune": True}, lorweb.CEILING.sample)
    for other in (several, full):
        with pytest.raises(ValueError, match="no rank to change"):
            ceiling.ceiling_settings(other, world, "invert", 0, rank=8)


def test_add_ceilings_fills_the_row_and_trains_each_family_once(tmp_path, monkeypatch):
    """The plumbing, with a stand-in trainer: one run per training family (none for held-out families), written
    atomically, scored like any B′, reused by a second bench run."""
    runs = []

    trained_ranks = []

    def fake_trainer(module, settings, out, threads=None):
        (out / "checkpoints").mkdir(parents=True)
        (out / "train.log").write_text("wrote basis (steps 0..3, loss 1.0 -> 0.5)\n")
        runs.append(settings["data"])
        trained_ranks.append(settings.get("rank"))
        return 1.5

    monkeypatch.setattr(ceiling, "run_trainer", fake_trainer)
    monkeypatch.delenv(ceiling.ENV_ROOT, raising=False)  # the cache in the world folder (tmp_path)
    # the stand-in ceiling draws the truth for invert and B (no edit) for hflip
    fake = Ceiling("fake.trainer", ("autoencoder",),
                   lambda world, quick, family, seed: {"data": family, "max_steps": 3, "backbone": f"world:{world.root}"},
                   lambda world, quick, folder, items, seed: ev.stack(items, "b_prime" if "-invert-" in folder.name
                                                                      else "b"))
    fake_ranked = Ceiling("fake.trainer", fake.world_models, lambda *a: {**fake.settings(*a), "rank": 4}, fake.sample)
    world = World(tmp_path / "v2-quick-s0", True, 0, {"autoencoder": {"key": "a"}})
    examples = {f: ev.examples(f, 2, world_def.REFERENCE_SIZE) for f in ("invert", "hflip", "vflip")}
    ctx = MethodContext(world, 0, True, tmp_path / "row", examples)

    def result():
        return {"families": {f: {"split": world_def.get_family(f).split, "no_edit": 0.5} for f in examples},
                "extra": {}}

    first = result()
    pictures = ceiling.add_ceilings("fake", fake, ctx, first)
    assert runs == ["invert", "hflip"] and set(pictures["lora"]) == {"invert", "hflip"} and pictures["full"] == {}
    families = first["families"]
    assert "ceiling" not in families["vflip"]  # held out: no ceiling
    assert families["invert"]["ceiling"] == {"lora": {"edited_cells": 1.0, "kept_cells": None,
                                                      "kept_background_cells": None, "kept_object_cells": None,
                                                      "error": 0.0, "train_steps": 3, "train_seconds": 1.5,
                                                      "train_threads": None}}
    assert families["hflip"]["ceiling"]["lora"]["edited_cells"] == 0.0
    assert families["hflip"]["ceiling"]["lora"]["kept_cells"] == 1.0
    assert families["hflip"]["ceiling"]["lora"]["kept_background_cells"] == 1.0
    assert first["extra"]["mean_ceiling_lora_edited_cells_train"] == 0.5
    assert first["extra"]["mean_ceiling_lora_kept_cells_train"] == 1.0
    # the mean over families of each ceiling's error over that family's no-edit error (0.5 in this made-up row):
    # invert's ceiling draws the truth (0), hflip's draws B (its no-edit error, reckoned here from the scenes)
    hflip_no_edit = float(ev.mae(ev.stack(examples["hflip"], "b"), ev.stack(examples["hflip"], "b_prime")).mean())
    assert families["hflip"]["ceiling"]["lora"]["error"] == pytest.approx(hflip_no_edit, abs=1e-5)
    assert first["extra"]["mean_ceiling_lora_error_over_no_edit_train"] == pytest.approx(
        (0.0 + hflip_no_edit / 0.5) / 2, abs=1e-4)
    assert first["extra"]["ceiling_train_seconds_this_run"] == 3.0
    cache = tmp_path / "v2-quick-s0" / "ceilings"
    assert len(list(cache.glob("fake-*"))) == 2 and not list(cache.glob(".tmp_*"))
    assert not list(cache.glob("*/checkpoints"))

    second = result()
    ceiling.add_ceilings("fake", fake, ctx, second)
    assert runs == ["invert", "hflip"], "the second run reuses the cache"
    assert second["families"] == first["families"]
    assert second["extra"]["ceiling_train_seconds_this_run"] == 0.0

    # a larger budget (--ceiling-steps) trains apart, records its steps, and is reused in its turn
    longer = result()
    ceiling.add_ceilings("fake", fake, ctx, longer, ["invert"], steps=12)
    assert runs == ["invert", "hflip", "invert"] and longer["families"]["invert"]["ceiling"]["lora"]["train_steps"] == 12
    assert len(list(cache.glob("fake-invert-*"))) == 2
    ceiling.add_ceilings("fake", fake, ctx, result(), ["invert"], steps=12)
    assert runs == ["invert", "hflip", "invert"]
    with pytest.raises(ValueError, match="at least 1"):
        ceiling.add_ceilings("fake", fake, ctx, result(), ["invert"], steps=0)

    # another rank (--ceiling-rank, a probe of the row's rank budget) trains apart and is recorded
    ranked = result()
    ceiling.add_ceilings("fake", fake_ranked, ctx, ranked, ["invert"], rank=16)
    assert ranked["extra"]["ceiling_rank"] == 16 and "ceiling_rank" not in first["extra"]
    assert trained_ranks == [None, None, None, 16] and len(list(cache.glob("fake-invert-*"))) == 3
    ceiling.add_ceilings("fake", fake_ranked, ctx, result(), ["invert"], rank=16)
    assert len(trained_ranks) == 4, "the ranked run is cached under its own key"


def test_ceilings_trained_side_by_side_are_the_ones_trained_in_turn(tmp_path, monkeypatch):
    """--ceiling-jobs 2: the runs the cache lacks (LoRA and full, per family) are trained two at a time, each with
    its share of the cores, and the row gets exactly what one run after another gives; a failed run is raised and
    stops the runs not yet started."""
    lock, running, peak, started, threads_seen = threading.Lock(), [0], [0], [], []

    def fake_trainer(module, settings, out, threads=None):
        with lock:
            running[0] += 1
            peak[0] = max(peak[0], running[0])
            started.append(settings["data"])
            threads_seen.append(threads)
        try:
            if settings["data"] == "hflip" and settings.get("fail") and not settings.get("full_finetune"):
                raise RuntimeError("python -m fake.trainer failed (1)")
            time.sleep(1.0 if settings.get("fail") else 0.2)  # with a failure: time to cancel what has not started
            out.mkdir(parents=True, exist_ok=True)
            (out / "train.log").write_text("")
            return 2.0
        finally:
            with lock:
                running[0] -= 1

    monkeypatch.setattr(ceiling, "run_trainer", fake_trainer)
    monkeypatch.setattr(ceiling, "available_cores", lambda: 5)
    monkeypatch.delenv(ceiling.ENV_ROOT, raising=False)
    full = Ceiling("fake.trainer", ("autoencoder",), lambda w, q, family, s: {"data": family, "full_finetune": True},
                   lambda world, quick, folder, items, seed: ev.stack(items, "b_prime"), shared_as="fake_full")
    fake = Ceiling("fake.trainer", ("autoencoder",), lambda w, q, family, s: {"data": family},
                   lambda world, quick, folder, items, seed: ev.stack(items, "b"), full=full)
    families = ("invert", "hflip", "grayscale")
    examples = {f: ev.examples(f, 2, world_def.REFERENCE_SIZE) for f in families}

    def run(folder: str, jobs: int, overrides: dict | None = None) -> dict:
        world = World(tmp_path / folder, False, 0, {"autoencoder": {"key": "a"}})
        result = {"families": {f: {"split": "train", "no_edit": 0.5} for f in families}, "extra": {}}
        ceiling.add_ceilings("fake", fake, MethodContext(world, 0, False, tmp_path / "row", examples), result,
                             overrides=overrides, jobs=jobs)
        return result

    in_turn = run("v2-full-s0", 1)
    assert peak[0] == 1 and threads_seen == [None] * 6
    peak[0], threads_seen[:] = 0, []
    side_by_side = run("v2-full-s1", 2)
    assert peak[0] == 2 and threads_seen == [2] * 6, "two at a time, each with half of the 5 cores"

    def without_threads(result: dict) -> dict:
        out = {}
        for family, row in result["families"].items():
            kinds = {kind: {n: x for n, x in c.items() if n != "train_threads"} for kind, c in row["ceiling"].items()}
            out[family] = {**row, "ceiling": kinds}
        return out
    assert without_threads(side_by_side) == without_threads(in_turn)
    extra = side_by_side["extra"]
    assert extra.pop("ceiling_jobs") == 2 and extra.pop("ceiling_train_wall_seconds_this_run") > 0
    assert extra == in_turn["extra"] and extra["ceiling_train_seconds_this_run"] == 12.0
    lora = side_by_side["families"]["invert"]["ceiling"]["lora"]
    assert lora.pop("train_threads") == 2 and in_turn["families"]["invert"]["ceiling"]["lora"].pop("train_threads") \
        is None, "the record says how each run was trained"
    names = sorted(p.name.rsplit("-", 1)[0] for p in (tmp_path / "v2-full-s1" / "ceilings").iterdir())
    assert names == sorted(f"{k}-{f}" for k in ("fake", "fake_full") for f in families)
    assert run("v2-full-s1", 2)["extra"]["ceiling_train_seconds_this_run"] == 0.0, "all cached"

    started.clear()
    with pytest.raises(RuntimeError, match="fake.trainer failed"):
        run("v2-full-s2", 2, {"fail": True})
    assert 2 <= len(started) < 6, started
    # one run missing from the cache gets every core, not a lane's share
    threads_seen.clear()
    shutil.rmtree(next((tmp_path / "v2-full-s1" / "ceilings").glob("fake-invert-*")))
    run("v2-full-s1", 2)
    assert threads_seen == [5]


# ---------------------------------------------------------------------------------------------------------------------
# a quick ceiling run (slow)


@pytest.fixture(scope="module")
def quick_ceilings():
    """(family, steps) -> the quick ceiling's row (trained on first use, or read from the cache) and the no-edit error;
    ``steps`` None is the ceilings' own budget (1,200 steps at 2e-3)."""
    world = quick_world()
    panel = world.builds["autoencoder"]["config"]["panel"]
    rows: dict[tuple[str, int | None], dict] = {}

    def row(family: str, steps: int | None = None) -> dict:
        if (family, steps) not in rows:
            items = ev.examples(family, 4, panel)  # the quick yardstick's held-out scenes
            measured = ceiling.family_ceiling("lorweb", lorweb.CEILING, world, family, items, SEED, steps=steps)
            b, truth = ev.stack(items, "b"), ev.stack(items, "b_prime")
            rows[(family, steps)] = {**measured, "no_edit": float(ev.mae(b, truth).mean())}
        return rows[(family, steps)]

    return world, row


# The default suite trains one short ceiling (invert, SHORT_STEPS: about a minute and a half on a clean clone's 2-core
# CPU); the ceilings' own budget (1,200 steps, ~6 minutes per family on one thread) on both families is beyond the
# suite's budget, so it runs with `bash scripts/test.sh -m expensive tests/test_world_ceiling.py`.
SHORT_STEPS = 150
CEILING_STEPS = LORWEB_CEILING_STEPS["quick"]
BUDGETS = [pytest.param(GLOBAL, SHORT_STEPS, id="invert-short"),
           pytest.param(GLOBAL, None, marks=pytest.mark.expensive, id="invert"),
           pytest.param(LOCAL, None, marks=pytest.mark.expensive, id="recolour_red_blue")]


# Measured on the quick world v2, seed 0, its 4 held-out scenes per family (1,200 steps at lr 2e-3, T = 0.10; README,
# "The ceilings"):
#   invert               edited 0.844, kept -,     error 0.038 against no edit 0.617 (0.06x)
#   recolour_red_blue    edited 0.852, kept 0.983, error 0.013 against no edit 0.060 (0.22x)
#   (grayscale 1.000 / 1.000, channel_swap 0.972 / 0.600, hflip 0.850 / 0.981; until 2026-12-04 the ceilings trained
#   400 steps at 6e-3: invert 0.305, recolour 0.037 / 0.908, hflip 0.360 / 0.782)
#   invert at SHORT_STEPS (150, lr 2e-3): edited 0.074, error 0.269 (0.44x; at 6e-3 0.078, 0.210)
# What beats doing nothing on both: the pixel error; on invert also the changed cells (no edit puts none right).


@pytest.mark.slow
@pytest.mark.parametrize(("family", "steps"), BUDGETS)
def test_quick_ceiling_beats_doing_nothing(quick_ceilings, family, steps):
    _, rows = quick_ceilings
    row = rows(family, steps)
    lora = row["lora"]
    assert set(lora) == {"edited_cells", "kept_cells", "kept_background_cells", "kept_object_cells", "error",
                         "train_steps", "train_seconds", "train_threads"}
    if family == GLOBAL:  # invert keeps no cell
        assert lora["kept_background_cells"] is None and lora["kept_object_cells"] is None
    assert lora["train_steps"] == (steps or CEILING_STEPS)
    assert lora["error"] < row["no_edit"], (lora, row["no_edit"])
    if family == GLOBAL:
        assert lora["edited_cells"] > 0.0, lora  # no edit scores 0


@pytest.mark.slow
def test_quick_ceiling_is_cached_and_reused(quick_ceilings):
    world, rows = quick_ceilings
    rows(GLOBAL, SHORT_STEPS)
    folder, record = ceiling.trained("lorweb", lorweb.CEILING, world, GLOBAL, SEED, steps=SHORT_STEPS)
    assert record["cached"] is True and (folder / "lorweb_basis.safetensors").is_file()
    assert not (folder / "checkpoints").exists() and not list(folder.parent.glob(f".tmp_{folder.name}_*"))


@pytest.mark.slow
@pytest.mark.expensive
@pytest.mark.parametrize("family", [GLOBAL, LOCAL])
@pytest.mark.xfail(strict=True, reason="not reached on the quick world v2's 96-wide backbone: measured (seed 0, 1,200 "
                                       "steps at 2e-3) invert edited 0.844 (kept -), recolour_red_blue edited 0.852 "
                                       "kept 0.983, while the floor (the exact autoencoder) scores 1 / 1; the 256-wide "
                                       "backbone reaches it (below)")
def test_quick_ceiling_reaches_the_issue_target(quick_ceilings, family):
    """Issue 20's target for the LoRA ceiling: edited_cells >= 0.95 and kept_cells >= 0.98."""
    lora = quick_ceilings[1](family)["lora"]
    assert lora["edited_cells"] >= 0.95 and (lora["kept_cells"] is None or lora["kept_cells"] >= 0.98), lora


# The same LoRA ceiling on a WIDER quick world: the Kontext-like backbone 256 wide (8 heads of 32, 7.2M parameters,
# `--world-set flux_kontext.heads=8`) instead of 96, taught one family with the ceilings' own budget (1,200 steps at
# learning rate 2e-3). Building that world takes ~13 minutes on the 2-core CPU
# and each ceiling ~18 minutes (one thread), so `expensive`. Measured (seed 0, the quick yardstick's 4 held-out
# scenes per family; docs/analogy_world_measurements.md, "The 256-wide backbone at 1,200 steps"), edited / kept cells:
#   invert 0.984 / -, recolour_red_blue 0.963 / 0.996, hflip 0.930 / 0.981, add_square_top_left 0.875 / 1.000
#   (the 96-wide world, same budget: 0.844 / -, 0.852 / 0.983, 0.850 / 0.981, 0.813 / 1.000); remove_discs 0.633 /
#   0.929 (its full fine-tune 0.733 / 0.951: the backbone itself falls short there).
# The families that miss are strict xfails stating by how much.
WIDE_WORLD = {"flux_kontext": {"heads": 8}}
WIDE_MISSES = {"hflip": "measured 0.930 / 0.981 (seed 0): edited misses 0.95 by 0.02",
               "add_square_top_left": "measured 0.875 / 1.000 (seed 0): 2 changed cells of 16 wrong",
               "remove_discs": "measured 0.633 / 0.929 (seed 0): squares removed as discs, discs left"}
WIDE_FAMILIES = [GLOBAL, LOCAL, *(pytest.param(f, marks=pytest.mark.xfail(strict=True, reason=why))
                                  for f, why in WIDE_MISSES.items())]


@pytest.mark.slow
@pytest.mark.expensive
@pytest.mark.timeout(3600)
@pytest.mark.parametrize("family", WIDE_FAMILIES)
def test_the_wide_quick_worlds_lora_ceiling_reaches_the_issue_target(family):
    from training.world import build_world

    world = build_world(LORWEB_MODELS, quick=True, seed=SEED, overrides=WIDE_WORLD)
    assert world.builds["flux_kontext"]["config"]["heads"] == 8
    items = ev.examples(family, 4, world.builds["autoencoder"]["config"]["panel"])
    lora = ceiling.family_ceiling("lorweb", lorweb.CEILING, world, family, items, SEED)["lora"]
    assert lora["train_steps"] == CEILING_STEPS
    assert lora["edited_cells"] >= 0.95 and (lora["kept_cells"] is None or lora["kept_cells"] >= 0.98), lora


def test_the_full_finetune_ceiling_is_measured_on_the_full_world_and_kept_apart(tmp_path, monkeypatch):
    """A row whose ceiling has a ``full`` one gets ``ceiling.full`` next to ``ceiling.lora`` on the full world (not on
    the quick one unless asked), trained in its own cache entry, with its own means."""
    runs = []

    def fake_trainer(module, settings, out, threads=None):
        (out / "train.log").parent.mkdir(parents=True, exist_ok=True)
        (out / "train.log").write_text("")
        runs.append((settings["data"], settings.get("full_finetune", False)))
        return 2.0

    monkeypatch.setattr(ceiling, "run_trainer", fake_trainer)
    monkeypatch.delenv(ceiling.ENV_ROOT, raising=False)

    def settings(world, quick, family, seed):
        return {"data": family, "max_steps": 3}

    # the LoRA stand-in draws B (no edit), the full fine-tune stand-in the truth
    full = Ceiling("fake.trainer", ("autoencoder",), lambda *a: {**settings(*a), "full_finetune": True},
                   lambda world, quick, folder, items, seed: ev.stack(items, "b_prime"), shared_as="fake_full")
    fake = Ceiling("fake.trainer", ("autoencoder",), settings,
                   lambda world, quick, folder, items, seed: ev.stack(items, "b"), full=full)
    examples = {f: ev.examples(f, 2, world_def.REFERENCE_SIZE) for f in ("invert", "hflip")}

    def run(quick: bool, **kwargs) -> tuple[dict, dict]:
        """(the row's result, the ceilings' B′ per kind and family)"""
        world = World(tmp_path / ("v2-quick-s0" if quick else "v2-full-s0"), quick, 0, {"autoencoder": {"key": "a"}})
        ctx = MethodContext(world, 0, quick, tmp_path / "row", examples)
        result = {"families": {f: {"split": "train", "no_edit": 0.5} for f in examples}, "extra": {}}
        return result, ceiling.add_ceilings("fake", fake, ctx, result, **kwargs)

    full_world, pictures = run(False)
    assert set(pictures["full"]) == {"invert", "hflip"}
    invert = full_world["families"]["invert"]["ceiling"]
    assert invert["lora"]["edited_cells"] == 0.0 and invert["full"]["edited_cells"] == 1.0
    assert invert["full"]["error"] == 0.0 and invert["full"]["train_steps"] == 3
    assert full_world["extra"]["mean_ceiling_full_edited_cells_train"] == 1.0
    assert full_world["extra"]["mean_ceiling_lora_edited_cells_train"] == 0.0
    assert full_world["extra"]["ceiling_train_seconds_this_run"] == 8.0  # two families, two runs each
    assert sorted(runs) == [("hflip", False), ("hflip", True), ("invert", False), ("invert", True)]
    names = sorted(p.name.rsplit("-", 1)[0] for p in (tmp_path / "v2-full-s0" / "ceilings").iterdir())
    assert names == ["fake-hflip", "fake-invert", "fake_full-hflip", "fake_full-invert"]
    quick, _ = run(True)
    assert "full" not in quick["families"]["invert"]["ceiling"] and "mean_ceiling_full_edited_cells_train" not in \
        quick["extra"]
    assert "full" in run(True, full=True)[0]["families"]["invert"]["ceiling"]

    # a prefixed setting (--ceiling-set full.finetune_scope=attention) reaches the full runs only
    runs.clear()
    seen = []
    monkeypatch.setattr(ceiling, "run_trainer",
                        lambda module, settings, out, threads=None: (seen.append(settings),
                                                                    fake_trainer(module, settings, out))[1])
    run(True, families=["invert"], full=True, overrides={"full.finetune_scope": "attention"})
    assert [(s.get("full_finetune", False), s.get("finetune_scope")) for s in seen] == [(True, "attention")]


def test_lorweb_full_finetune_trains_the_whole_transformer_and_no_basis(tmp_path):
    """LoRWeB's full ceiling run (``full_finetune``, 3 tiny steps): no LoRWeB layer, every weight trains with the
    grid objective, the whole transformer is written and loads back (through the yardstick's checked loader)."""
    from analogy_core.files import read_safetensors
    from analogy_core.lorweb.layer import lorweb_layers
    from training.backbone import load_frozen_backbone
    from training.lorweb.task import TRANSFORMER_FILE, main
    from training.world.yardstick.common import load_weights

    out = tmp_path / "full"
    history = main(["--preset", "tiny", "--output-dir", str(out), "--max-steps", "3", "--set", "report_to=none",
                    "--set", "sample_every=1000", "--set", "full_finetune=true", "--set", "learning_rate=1e-2"])
    assert len(history["losses"]) == 3 and not (out / "lorweb_basis.safetensors").exists()
    tensors, meta = read_safetensors(out / TRANSFORMER_FILE)
    assert meta["analogy.kind"] == "lorweb_transformer" and meta["analogy.step"] == "3"
    fresh = load_frozen_backbone("tiny", "no", 0, "cpu").transformer
    reference = {k: v.clone() for k, v in fresh.state_dict().items()}
    assert set(tensors) == set(reference) and not lorweb_layers(fresh)
    moved = [k for k in reference if not torch.equal(tensors[k], reference[k].float())]
    assert len(moved) > len(reference) // 2 and any(k.startswith("x_embedder") for k in moved)
    load_weights(fresh, out / TRANSFORMER_FILE)
    assert all(torch.equal(v.float(), tensors[k]) for k, v in fresh.state_dict().items())
    assert not fresh.training


def test_lorweb_full_ceiling_is_the_same_run_training_every_weight_at_the_pretraining_rate():
    world = World(Path("/w") / "v2-full-s0", False, 0, {"flux_kontext": {"key": "f", "config": {"lr": 0.002}}})
    lora = lorweb.CEILING.settings(world, False, "hflip", 1)
    full = lorweb.CEILING.full.settings(world, False, "hflip", 1)
    assert full == {**lora, "full_finetune": True, "learning_rate": 0.002}
    assert lorweb.CEILING.full.shared_as == "lorweb_full" and lorweb.CEILING.shared_as == ""



def test_every_full_ceiling_continues_its_own_backbones_pretraining_rate():
    """Each row's full fine-tune ceiling trains at the rate its own backbone was pretrained with (the world models'
    rates differ here, so a row reading another's shows): LoRWeB the Kontext-like one's, Edit Transfer (with and
    without text) the FLUX.1-dev-like one's, LoRA of Change the InstructPix2Pix-like UNet's."""
    from training.world.yardstick import loc

    world = World(Path("/w") / "v2-full-s0", False, 0, {"flux_kontext": {"key": "f", "config": {"lr": 0.002}},
                                                       "flux_dev": {"key": "d", "config": {"lr": 0.003}},
                                                       "instruct_pix2pix": {"key": "u", "config": {"lr": 0.001}}})
    rates = {"lorweb": 0.002, "loc": 0.001, **{row: 0.003 for row in edit_transfer.ROWS}}
    ceilings = {"lorweb": lorweb.CEILING, "loc": loc.CEILING,
                **{row: edit_transfer.row_ceiling(row) for row in edit_transfer.ROWS}}
    for row, found in ceilings.items():
        assert found.full.settings(world, False, "hflip", 0)["learning_rate"] == rates[row], row

@pytest.mark.parametrize("quick", [True, False])
def test_no_world_run_compiles(quick):
    """Every row and ceiling run trains eager: compiled, the full world's LoRWeB ceilings saved no time in the
    yardstick's lanes and slowed the rows beside them (training/world/presets.py); ``torch_compile`` left out keeps
    every ceiling's cache key."""
    from training.world.yardstick import loc

    root = Path("/w") / f"v2-{'quick' if quick else 'full'}-s0"
    world = World(root, quick, 0, {"flux_kontext": {"key": "f", "config": {"lr": 0.002}},
                                   "flux_dev": {"key": "d", "config": {"lr": 0.002}},
                                   "instruct_pix2pix": {"key": "u", "config": {"lr": 0.001}}})
    ceilings = [lorweb.CEILING, loc.CEILING, *(edit_transfer.row_ceiling(row) for row in edit_transfer.ROWS)]
    runs = [c.settings(world, quick, "hflip", 0) for found in ceilings for c in (found, found.full)]
    runs += [lorweb_settings(str(root), quick), loc.loc_settings(root, quick),
             *(edit_transfer.et_settings(root, quick, text_free) for text_free in (False, True))]
    assert len(runs) == 14 and not any("torch_compile" in settings for settings in runs)


# The issue's ceiling target reached on the quick world by a FULL fine-tune of Edit Transfer's FLUX.1-dev-like
# backbone (one family alone, 1,000 steps at its pretraining rate; the quick world's flux_dev is built here, ~1-2
# minutes, then ~3-6 minutes per family): beyond the default suite's budget, so `expensive`. Measured (seed 0, the
# quick yardstick's 4 held-out scenes; docs' measurements, "Full fine-tune against LoRA"): invert 1.00 edited —
# the global family reaches it; the local families come close and are marked so: add_square_top_left 0.9375 / 1.000 (one
# changed cell of sixteen wrong), recolour_red_blue 0.852 / 0.987. The LoRA ceilings of the same runs do not reach
# it (invert 0.49, add_square 0.63 / 0.97, recolour 0.81 / 0.96).
FULL_STEPS = 1000


CLOSE = {"add_square_top_left": "measured 0.9375 / 1.000 at 1,000 steps (seed 0): one changed cell of 16 wrong",
         LOCAL: "measured 0.852 / 0.987 at 1,000 steps (seed 0): edited misses 0.95 by 0.10"}


@pytest.mark.expensive
@pytest.mark.parametrize("family", [GLOBAL, *(pytest.param(f, marks=pytest.mark.xfail(strict=True, reason=why))
                                              for f, why in CLOSE.items())])
def test_a_quick_full_finetune_ceiling_reaches_the_issue_target(family):
    from training.world import build_world
    from training.world.yardstick import edit_transfer

    world = build_world(["autoencoder", "flux_dev"], quick=True, seed=SEED)
    items = ev.examples(family, 4, world.builds["autoencoder"]["config"]["panel"])
    full = edit_transfer.row_ceiling("edit_transfer").full
    scores, _, _ = ceiling.scored("edit_transfer_full", full, world, family, items, SEED, None, FULL_STEPS, None)
    assert scores["train_steps"] == FULL_STEPS
    assert scores["edited_cells"] >= 0.95 and (scores["kept_cells"] is None or scores["kept_cells"] >= 0.98), scores


def _fake_rows(monkeypatch, tmp_path, row_seconds: float, events: list) -> None:
    """Two rows whose training is a sleep (``row_seconds``) and whose ceilings are fakes (0.3 s each, and those started
    beside the rows last until they are done; the second row's shared with the first: trained once), on a stub full
    world; ``events`` gets (what, name, time, threads, runs going)."""
    from training.world import presets
    from training.world.yardstick import runner
    from training.world.yardstick.common import Method, MethodOutput

    lock, running, rows_done = threading.Lock(), [0], threading.Event()

    def fake_trainer(module, settings, out, threads=None):
        with lock:
            running[0] += 1
            events.append(("ceiling", settings["data"], time.monotonic(), threads, running[0]))
        rows_done.wait(30)  # a run started beside the rows lasts until they are done: some are left for after
        time.sleep(0.3)
        out.mkdir(parents=True, exist_ok=True)
        (out / "train.log").write_text("")
        with lock:
            running[0] -= 1
        return 2.0

    def row(name: str):
        def run(ctx):
            envs = []  # what a trainer run the row starts is given (presets.run_trainer, as every row's runs)
            monkeypatch.setattr(presets, "run_module", lambda module, argv, log, **kw: envs.append(kw["env"]) or 0)
            presets.run_trainer("fake.row_trainer", {}, tmp_path / "row_run")
            events.append(("row start", name, time.monotonic(), envs[0].get("OMP_NUM_THREADS"),
                           torch.get_num_threads()))
            time.sleep(row_seconds)
            events.append(("row end", name, time.monotonic(), None, None))
            if name == "second":
                rows_done.set()
            stacked = {f: ev.stack(items, "b") for f, items in ctx.examples.items()}
            return MethodOutput(stacked, stacked, lambda images: images)
        return run

    fake = Ceiling("fake.trainer", ("autoencoder",), lambda w, q, family, s: {"data": family},
                   lambda world, quick, folder, items, seed: ev.stack(items, "b_prime"), shared_as="fake")
    world = World(tmp_path / "v2-full-s0", False, 0, {"autoencoder": {"key": "a", "config": {"panel": 64}}})
    monkeypatch.setattr(ceiling, "run_trainer", fake_trainer)
    monkeypatch.setattr(ceiling, "available_cores", lambda: 2)
    monkeypatch.delenv(ceiling.ENV_ROOT, raising=False)
    monkeypatch.setattr(runner, "build_world", lambda *args, **kwargs: world)
    monkeypatch.setattr(runner, "METHODS", {name: Method(name, ("autoencoder",), row(name), ceiling=fake)
                                            for name in ("first", "second")})


@pytest.mark.parametrize("jobs", [None, 1])
def test_the_yardstick_trains_the_ceilings_beside_its_rows(jobs, tmp_path, monkeypatch):
    """By default (lanes = the cores, 2 here) the ceilings train from the start on the lane the rows leave free, the
    rows (one lane: OMP and torch at one thread) then every lane; with --ceiling-jobs 1 each ceiling run comes after
    the rows, one after another, and the rows keep every core. The figures are the same either way."""
    from training.world.yardstick import runner

    events: list = []
    _fake_rows(monkeypatch, tmp_path, 0.4, events)
    threads_before, omp_before = torch.get_num_threads(), os.environ.get("OMP_NUM_THREADS")
    report = runner.main(["--methods", "first,second", "--examples", "1", "--out", str(tmp_path / "out"),
                          *(["--ceiling-jobs", str(jobs)] if jobs else [])])
    assert torch.get_num_threads() == threads_before and os.environ.get("OMP_NUM_THREADS") == omp_before
    rows = [e for e in events if e[0].startswith("row")]
    runs = [e for e in events if e[0] == "ceiling"]
    trained = sorted(f for f in world_def.families("all") if world_def.get_family(f).split == "train")
    assert sorted(e[1] for e in runs) == trained, "each family's run once: the second row shares the first's"
    rows_end = max(e[2] for e in rows if e[0] == "row end")
    if jobs is None:
        assert [e[3:] for e in rows if e[0] == "row start"] == [("1", 1)] * 2, "the rows hold one lane's threads"
        assert {e[3] for e in runs} == {1}
        during = [e for e in runs if e[2] < rows_end]
        assert during and max(e[4] for e in during) == 1, "beside the rows: one ceiling run at a time"
        assert max(e[4] for e in runs) == 2, "after the rows: every lane"
    else:
        assert [e[3:] for e in rows if e[0] == "row start"] == [(omp_before, threads_before)] * 2
        assert all(e[2] > rows_end for e in runs) and {e[3] for e in runs} == {None}
        assert max(e[4] for e in runs) == 1
    first, second = (report["methods"][name] for name in ("first", "second"))
    for family in trained:
        assert first["families"][family]["ceiling"]["lora"]["edited_cells"] == 1.0
        assert second["families"][family]["ceiling"] == first["families"][family]["ceiling"]
    assert first["extra"]["ceiling_train_seconds_this_run"] == 2.0 * len(trained)
    assert second["extra"]["ceiling_train_seconds_this_run"] == 0.0, "trained for the first row"
    if jobs is None:
        assert first["extra"]["ceiling_jobs"] == 2 and first["extra"]["ceiling_train_wall_seconds_this_run"] > 0
        assert report["lanes"] == {"lanes": 2, "threads_per_lane": 1}
        events.clear()  # again: every ceiling cached, so no queue, and the rows keep every core
        again = runner.main(["--methods", "first,second", "--examples", "1", "--out", str(tmp_path / "again")])
        assert not [e for e in events if e[0] == "ceiling"] and "lanes" not in again
        assert [e[3:] for e in events if e[0] == "row start"] == [(omp_before, threads_before)] * 2
        assert again["methods"]["first"]["families"] == first["families"]
        # one run missing, 4 cores, 4 jobs asked: two lanes (the rows' and the run's), two threads each
        shutil.rmtree(next((tmp_path / "v2-full-s0" / "ceilings").glob("fake-invert-*")))
        monkeypatch.setattr(ceiling, "available_cores", lambda: 4)
        events.clear()
        one = runner.main(["--methods", "first,second", "--examples", "1", "--out", str(tmp_path / "one"),
                           "--ceiling-jobs", "4"])
        assert one["lanes"] == {"lanes": 2, "threads_per_lane": 2}
        assert [(e[1], e[3]) for e in events if e[0] == "ceiling"] == [("invert", 2)]
        assert [e[3:] for e in events if e[0] == "row start"] == [("2", 2)] * 2
    else:
        assert "ceiling_jobs" not in first["extra"] and "lanes" not in report


def test_a_failed_ceiling_run_stops_the_queue_and_is_raised_for_every_row_it_kept(tmp_path, monkeypatch):
    """A run of the first row fails: the runs queued after it never start, and waiting for either row raises it."""
    calls = []

    def fake_trainer(module, settings, out, threads=None):
        calls.append(settings["data"])
        time.sleep(0.3)
        if settings["data"] == "invert":
            raise RuntimeError("python -m fake.trainer failed (1)")
        out.mkdir(parents=True, exist_ok=True)
        return 1.0

    monkeypatch.setattr(ceiling, "run_trainer", fake_trainer)
    monkeypatch.setattr(ceiling, "available_cores", lambda: 2)
    world = World(tmp_path / "v2-full-s0", False, 0, {"autoencoder": {"key": "a"}})
    fake = Ceiling("fake.trainer", ("autoencoder",), lambda w, q, family, s: {"data": family},
                   lambda world, quick, folder, items, seed: None)
    other = Ceiling("other.trainer", ("autoencoder",), lambda w, q, family, s: {"data": family},
                    lambda world, quick, folder, items, seed: None)
    queue = ceiling.CeilingQueue(2, tmp_path / "cache")
    with queue.lane():
        assert queue.add("first", fake, world, ["invert", "hflip"], 0) == 2
        assert queue.add("second", other, world, ["grayscale", "channel_swap"], 0) == 2
    for method in ("second", "first"):
        with pytest.raises(RuntimeError, match="fake.trainer failed"):
            queue.wait(method)
    assert calls[0] == "invert" and len(calls) < 4, calls
    queue.close()


def test_edit_transfers_two_rows_share_one_run_and_retrain_when_its_file_is_gone(tmp_path, monkeypatch):
    """``trained_run``: the Edit Transfer rows of one bench process sample one trained LoRA (one training for the
    same world, seed, sampler-independent settings); a run whose LoRA file has gone is trained again, not reused."""
    from types import SimpleNamespace

    from training.edit_transfer.config import LORA_FILE

    calls = []

    def train(world_root, out, quick, seed, text_free, overrides, resume):
        calls.append(out)
        out.mkdir(parents=True, exist_ok=True)
        (out / LORA_FILE).write_bytes(b"lora")
        return 1.0

    monkeypatch.setattr(edit_transfer, "train_edit_transfer", train)
    monkeypatch.setattr(edit_transfer, "_RUNS", {})
    ctx = SimpleNamespace(world=SimpleNamespace(root=tmp_path / "world"), quick=True, seed=0, row_overrides={},
                          folder=tmp_path / "row", resume_runs=False)
    first = edit_transfer.trained_run(ctx, text_free=False)
    assert edit_transfer.trained_run(ctx, text_free=False) == first and len(calls) == 1
    (first[0] / LORA_FILE).unlink()
    edit_transfer.trained_run(ctx, text_free=False)
    assert len(calls) == 2 and (first[0] / LORA_FILE).is_file()
    edit_transfer.trained_run(ctx, text_free=True)
    assert len(calls) == 3, "the text-free row trains its own"
