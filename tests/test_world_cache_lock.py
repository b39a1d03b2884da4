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
