"""Two builders of one world folder at once (two benches, or two test workers, sharing a cache): the model is built
once, the second builder waits and reuses it. And one builder building a world's models side by side (``jobs``)."""

from __future__ import annotations

import threading
import time
from pathlib import Path

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


def _fake_world_models(monkeypatch, fail: str = "", independent: bool = False) -> list:
    """World models ``side_a`` <- ``side_b``, ``side_c`` (both depend on a; none on another if ``independent``),
    each built in 0.3 s, ``side_c`` declared the costliest; ``fail`` fails at once."""
    events, lock, running = [], threading.Lock(), [0]

    def build(ctx):
        with lock:
            running[0] += 1
            events.append(("start", ctx.name, running[0], sorted(ctx.dependencies)))
        time.sleep(0.0 if ctx.name == fail else 0.3)  # a failure ends first
        with lock:
            running[0] -= 1
            events.append(("end", ctx.name, running[0], None))
        if ctx.name == fail:
            raise RuntimeError(f"{ctx.name} broke")
        (ctx.folder / "weights.txt").write_text(ctx.name)
        return {}

    for name, depends in (("side_a", ()), ("side_b", () if independent else ("side_a",)),
                          ("side_c", () if independent else ("side_a",))):
        monkeypatch.setitem(registry.WORLD_MODELS, name, WorldModel(name, build, {"full": {}, "quick": {}},
                                                                    depends=depends, cost=5 if name == "side_c" else 1))
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

    import concurrent.futures

    events, calls, submitted = _fake_world_models(monkeypatch), [], []

    class RecordingPool(concurrent.futures.ThreadPoolExecutor):  # the order the builds are handed to the lanes
        def submit(self, fn, *args, **kwargs):
            submitted.append(args[0])
            return super().submit(fn, *args, **kwargs)

    monkeypatch.setattr(concurrent.futures, "ThreadPoolExecutor", RecordingPool)
    monkeypatch.setattr(launch, "run_module", _in_process_build(calls))
    monkeypatch.setattr(launch, "available_cores", lambda: 4)
    world = build_world(["side_b", "side_c"], quick=True, seed=3, root=tmp_path, jobs=2)
    starts = [e for e in events if e[0] == "start"]
    assert [e[1] for e in starts][0] == "side_a" and {e[1] for e in starts} == {"side_a", "side_b", "side_c"}
    assert len(starts) == 3, "each model built once: the last pass reuses them"
    a_end = next(i for i, e in enumerate(events) if e[:2] == ("end", "side_a"))
    assert all(events.index(e) > a_end for e in starts[1:]), "b and c wait for a"
    assert max(e[2] for e in starts) == 2, "b and c side by side"
    assert submitted == ["side_a", "side_c", "side_b"], "the costliest ready model first"
    assert {(c[1], c[2]) for c in calls} == {("2", "2")}, "half of the 4 cores each, a alone too (no timing)"
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


def test_a_failed_build_keeps_the_ready_ones_from_starting(tmp_path, monkeypatch):
    """Three independent models, two lanes: the costliest (c) and a start, a fails, b never starts."""
    from training.world import launch

    events, calls = _fake_world_models(monkeypatch, fail="side_a", independent=True), []
    monkeypatch.setattr(launch, "run_module", _in_process_build(calls))
    monkeypatch.setattr(launch, "available_cores", lambda: 2)
    try:
        build_world(["side_a", "side_b", "side_c"], quick=True, seed=0, root=tmp_path, jobs=2)
    except RuntimeError as err:
        assert "building world model side_a failed" in str(err)
    else:
        raise AssertionError("the failed build was not raised")
    assert sorted(e[1] for e in events if e[0] == "start") == ["side_a", "side_c"], events


def test_a_forced_build_goes_one_model_after_another_and_a_relative_root_reaches_the_builds_whole(tmp_path,
                                                                                                    monkeypatch):
    from training.world import launch

    events, calls = _fake_world_models(monkeypatch, independent=True), []
    monkeypatch.setattr(launch, "run_module", _in_process_build(calls))
    monkeypatch.chdir(tmp_path)
    build_world(["side_a", "side_b"], quick=True, seed=0, root=Path("worlds"), jobs=2)
    assert {c[0][c[0].index("--root") + 1] for c in calls} == {str(tmp_path / "worlds")}, "absolute"
    assert max(e[2] for e in events if e[0] == "start") == 2
    calls.clear()
    events.clear()
    build_world(["side_a", "side_b"], quick=True, seed=0, root=Path("worlds"), jobs=2, force=True)
    assert calls == [], "in this process"
    assert [e[:3] for e in events if e[0] == "start"] == [("start", "side_a", 1), ("start", "side_b", 1)]


def test_the_world_command_refuses_fewer_than_one_job(capsys):
    from training.world.__main__ import main

    try:
        main(["build", "--quick", "--jobs", "0"])
    except SystemExit as done:
        assert done.code == 2
    else:
        raise AssertionError("--jobs 0 was accepted")
    assert "--jobs must be at least 1, got 0" in capsys.readouterr().err
