"""Two builders of one world folder at once (two benches, or two test workers, sharing a cache): the model is built
once, the second builder waits and reuses it."""

from __future__ import annotations

import threading
import time

from training.world import registry
from training.world.registry import WorldModel, build_world


def test_concurrent_builds_of_one_world_build_each_model_once(tmp_path, monkeypatch):
    calls = []

    def build(ctx):
        calls.append(ctx.name)
        time.sleep(0.5)  # long enough for the other builder to arrive while this one builds
        (ctx.folder / "weights.txt").write_text("built")
        return {"calls": len(calls)}

    probe = WorldModel("lock_probe", build, {"full": {"steps": 1}, "quick": {"steps": 1}})
    monkeypatch.setitem(registry.WORLD_MODELS, "lock_probe", probe)
    worlds, errors = [], []

    def builder():
        try:
            worlds.append(build_world(["lock_probe"], quick=True, seed=0, root=tmp_path))
        except Exception as err:  # noqa: BLE001 - reported below
            errors.append(err)

    threads = [threading.Thread(target=builder) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors
    assert calls == ["lock_probe"], calls
    assert len({w.builds["lock_probe"]["key"] for w in worlds}) == 1
    assert (worlds[0].path("lock_probe") / "weights.txt").read_text() == "built"


def _fake_world_models(monkeypatch, fail: str = "") -> list:
    """World models ``side_a`` <- ``side_b``, ``side_c`` (both depend on a), each built in 0.3 s; ``fail`` fails."""
    events, lock, running = [], threading.Lock(), [0]

    def build(ctx):
        with lock:
            running[0] += 1
            events.append(("start", ctx.name, running[0], sorted(ctx.dependencies)))
        time.sleep(0.3)
        with lock:
            running[0] -= 1
            events.append(("end", ctx.name, running[0], None))
        if ctx.name == fail:
            raise RuntimeError(f"{ctx.name} broke")
        (ctx.folder / "weights.txt").write_text(ctx.name)
        return {}

    for name, depends in (("side_a", ()), ("side_b", ("side_a",)), ("side_c", ("side_a",))):
        monkeypatch.setitem(registry.WORLD_MODELS, name, WorldModel(name, build, {"full": {}, "quick": {}},
                                                                    depends=depends))
    return events


def _in_process_build(calls: list):
    """launch.run_module for ``python -m training.world build ...``, run in this process (the fake models are
    registered here only), recording each run's arguments and thread variables."""
    from training.world.__main__ import main

    def run_module(module, argv, log, **kwargs):
        assert module == "training.world"
        calls.append((argv, kwargs["env"]["OMP_NUM_THREADS"], kwargs["env"]["MKL_NUM_THREADS"]))
        try:
            return main(list(argv))
        except Exception:  # noqa: BLE001 - a failed build is a failed run
            return 1
    return run_module


def test_world_models_are_built_two_at_a_time_after_what_they_depend_on(tmp_path, monkeypatch):
    from training.world import launch

    events, calls = _fake_world_models(monkeypatch), []
    monkeypatch.setattr(launch, "run_module", _in_process_build(calls))
    monkeypatch.setattr(launch, "available_cores", lambda: 4)
    world = build_world(["side_b", "side_c"], quick=True, seed=3, root=tmp_path, jobs=2)
    starts = [e for e in events if e[0] == "start"]
    assert [e[1] for e in starts][0] == "side_a" and {e[1] for e in starts} == {"side_a", "side_b", "side_c"}
    assert len(starts) == 3, "each model built once: the last pass reuses them"
    a_end = next(i for i, e in enumerate(events) if e[:2] == ("end", "side_a"))
    assert all(events.index(e) > a_end for e in starts[1:]), "b and c wait for a"
    assert max(e[2] for e in starts) == 2, "b and c side by side"
    threads = {c[0][c[0].index("--models") + 1]: (c[1], c[2]) for c in calls}
    assert threads == {"side_a": ("4", "4"), "side_b": ("2", "2"), "side_c": ("2", "2")}, \
        "alone: every core; side by side: half of the 4 cores each"
    assert all(c[0][c[0].index("--root") + 1] == str(tmp_path) and "--quick" in c[0] and
               c[0][c[0].index("--seed") + 1] == "3" and c[0][c[0].index("--jobs") + 1] == "1" for c in calls)
    assert sorted(world.builds) == ["side_a", "side_b", "side_c"]
    assert all((world.path(n) / "weights.txt").read_text() == n for n in world.builds)
    manifest = registry._read_manifest(world.root)
    assert sorted(manifest["models"]) == ["side_a", "side_b", "side_c"]
    calls.clear()
    build_world(["side_b", "side_c"], quick=True, seed=3, root=tmp_path, jobs=2)
    assert calls == [] and len([e for e in events if e[0] == "start"]) == 3, "all built: nothing runs"


def test_a_failed_side_by_side_build_is_raised_and_starts_nothing_after_it(tmp_path, monkeypatch):
    from training.world import launch

    events, calls = _fake_world_models(monkeypatch, fail="side_a"), []
    monkeypatch.setattr(launch, "run_module", _in_process_build(calls))
    monkeypatch.setattr(launch, "available_cores", lambda: 2)
    try:
        build_world(["side_b", "side_c"], quick=True, seed=0, root=tmp_path, jobs=2)
    except RuntimeError as err:
        assert "building world model side_a failed" in str(err)
    else:
        raise AssertionError("the failed build was not raised")
    assert [e[1] for e in events if e[0] == "start"] == ["side_a"] and len(calls) == 1
