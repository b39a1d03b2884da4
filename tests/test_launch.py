"""training.world.launch: a world run forked from the launch server is ``python -m`` as a subprocess runs it."""

from __future__ import annotations

import os

import pytest

from training.world import launch

PROBE = '''
import atexit, os, sys
atexit.register(lambda: print("exit handler ran"))  # as at any interpreter's exit
print("argv", sys.argv[1:], "name", __name__)
print("cwd", os.getcwd(), "value", os.environ.get("PROBE_VALUE"))
print("path0", sys.path[0])
sys.stderr.write("to stderr\\n")
if sys.argv[1:] == ["fail"]:
    raise ValueError("boom")
if sys.argv[1:] == ["exit"]:
    sys.exit(3)
print("preloaded", "training.world" in sys.modules)
'''


@pytest.fixture
def probe(tmp_path, monkeypatch):
    package = tmp_path / "probe pkg"
    package.mkdir()
    (package / "launch_probe.py").write_text(PROBE)
    monkeypatch.setenv("PYTHONPATH", str(package))
    monkeypatch.setenv("PROBE_VALUE", "seen")
    work = tmp_path / "work dir"
    work.mkdir()
    return work


def run(mode: str, argv: list[str], log, work, monkeypatch, append: bool = False) -> int:
    monkeypatch.setenv(launch.PLAIN_SUBPROCESS_ENV, "1" if mode == "plain" else "0")
    return launch.run_module("launch_probe", argv, log, append=append, cwd=work)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="the launch server forks (POSIX)")
def test_a_forked_run_is_the_subprocess_run_and_a_dead_server_is_replaced(probe, tmp_path, monkeypatch):
    logs = {}
    for mode in ("plain", "fork"):
        log = tmp_path / f"{mode}.log"
        assert run(mode, ["a b", "--x=1"], log, probe, monkeypatch) == 0
        logs[mode] = log.read_text().splitlines()
    # the server had imported the trainers: the fork is not a plain subprocess in disguise
    assert logs["fork"][-2] == "preloaded True" and logs["plain"][-2] == "preloaded False"
    assert logs["fork"][:-2] + logs["fork"][-1:] == logs["plain"][:-2] + logs["plain"][-1:], logs
    assert logs["fork"][-1] == "exit handler ran"
    assert logs["fork"][0] == "argv ['a b', '--x=1'] name __main__"
    assert logs["fork"][1] == f"cwd {probe} value seen" and logs["fork"][2] == f"path0 {probe}"
    assert "to stderr" in logs["fork"]

    for mode in ("plain", "fork"):
        log = tmp_path / f"{mode}-fail.log"
        assert run(mode, ["fail"], log, probe, monkeypatch) == 1
        assert "ValueError: boom" in log.read_text()
        assert run(mode, ["exit"], log, probe, monkeypatch, append=True) == 3
        text = log.read_text()
        assert "ValueError: boom" in text and text.count("argv") == 2  # appended, not overwritten

    # a server that died is replaced by the next run
    log = tmp_path / "run.log"
    servers = [s for s in launch._servers.values() if s.alive()]
    assert servers
    for server in servers:
        server.process.kill()
        server.process.wait()
    assert run("fork", ["x"], log, probe, monkeypatch) == 0
    assert log.read_text().splitlines()[-2] == "preloaded True"
