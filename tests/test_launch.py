"""training.world.launch: a world run forked from the launch server is ``python -m`` as a subprocess runs it."""

from __future__ import annotations

import os
import signal

import pytest

from training.world import launch

PROBE = '''
import atexit, os, signal, sys, threading, time
atexit.register(lambda: print("exit handler ran"))  # as at any interpreter's exit
print("argv", sys.argv[1:], "name", __name__)
print("cwd", os.getcwd(), "value", os.environ.get("PROBE_VALUE"), "test", os.environ.get("PYTEST_CURRENT_TEST"))
print("path0", sys.path[0], "stdin", repr(sys.stdin.read()))
sys.stderr.write("to stderr\\n")
if sys.argv[1:] == ["fail"]:
    raise ValueError("boom")
if sys.argv[1:] == ["exit"]:
    sys.exit(3)
if sys.argv[1:] == ["say"]:
    sys.exit("a message instead of a status")
if sys.argv[1:] == ["kill"]:
    sys.stdout.flush()
    os.kill(os.getpid(), signal.SIGKILL)
threading.Thread(target=lambda: (time.sleep(0.2), print("thread done"))).start()  # not a daemon: waited for
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


def lines(log) -> list[str]:
    return log.read_text().splitlines()


@pytest.mark.skipif(not hasattr(os, "fork"), reason="the launch server forks (POSIX)")
def test_a_forked_run_is_the_subprocess_run_and_a_dead_server_is_replaced(probe, tmp_path, monkeypatch):
    logs = {}
    for mode in ("plain", "fork"):
        log = tmp_path / f"{mode}.log"
        assert run(mode, ["a b", "--x=1"], log, probe, monkeypatch) == 0
        logs[mode] = lines(log)
    # the server had imported the trainers: the fork is not a plain subprocess in disguise
    assert "preloaded True" in logs["fork"] and "preloaded False" in logs["plain"]
    assert [x for x in logs["fork"] if not x.startswith("preloaded")] == \
        [x for x in logs["plain"] if not x.startswith("preloaded")], logs
    fork = logs["fork"]
    assert fork[0] == "argv ['a b', '--x=1'] name __main__" and fork[-1] == "exit handler ran"
    assert fork[1].startswith(f"cwd {probe} value seen test ") and fork[2] == f"path0 {probe} stdin ''"
    assert "to stderr" in fork and "thread done" in fork  # a non-daemon thread finished before the exit handlers

    for mode in ("plain", "fork"):
        log = tmp_path / f"{mode}-fail.log"
        assert run(mode, ["fail"], log, probe, monkeypatch) == 1
        assert "ValueError: boom" in log.read_text()
        assert run(mode, ["exit"], log, probe, monkeypatch, append=True) == 3
        text = log.read_text()
        assert "ValueError: boom" in text and text.count("argv") == 2  # appended, not overwritten
        assert run(mode, ["say"], log, probe, monkeypatch) == 1 and "a message instead of a status" in lines(log)
        assert run(mode, ["kill"], log, probe, monkeypatch) == -signal.SIGKILL

    # one server for the runs of every test: pytest's per-test variable does not start another
    servers = {id(s) for s in launch._servers}
    monkeypatch.setenv("PYTEST_CURRENT_TEST", "another test (call)")
    log = tmp_path / "run.log"
    assert run("fork", ["x"], log, probe, monkeypatch) == 0
    assert {id(s) for s in launch._servers} == servers
    assert lines(log)[1].endswith("test another test (call)")  # the run sees the caller's value

    # a server that died is replaced by the next run
    mine = [s for s in launch._servers if s.alive()][-1]
    mine.process.kill()
    mine.process.wait()
    assert run("fork", ["x"], log, probe, monkeypatch) == 0
    assert "preloaded True" in lines(log)
    assert len([s for s in launch._servers if not s.busy]) <= launch.MAX_SERVERS


def test_a_run_asked_plain_is_a_subprocess_even_where_runs_are_forked(probe, tmp_path, monkeypatch):
    monkeypatch.setenv(launch.PLAIN_SUBPROCESS_ENV, "0")
    log = tmp_path / "plain.log"
    assert launch.run_module("launch_probe", ["x"], log, cwd=probe, plain=True) == 0
    assert "preloaded False" in lines(log) and lines(log)[0] == "argv ['x'] name __main__"


MEET = '''
import pathlib, sys, time
import torch
folder, me, other = pathlib.Path(sys.argv[1]), sys.argv[2], sys.argv[3]
(folder / me).touch()
deadline = time.monotonic() + 60
while not (folder / other).exists():  # the other run must be running at the same time
    if time.monotonic() > deadline:
        sys.exit(5)
    time.sleep(0.05)
print("threads", torch.get_num_threads(), "preloaded", "training.world" in sys.modules)
'''


@pytest.mark.skipif(not hasattr(os, "fork"), reason="the launch server forks (POSIX)")
def test_runs_started_side_by_side_fork_at_the_same_time_with_their_own_threads(probe, tmp_path, monkeypatch):
    """Two runs from two threads (--ceiling-jobs 2) run at once, each forked from a server of its own, and torch in
    each has the threads its environment asks for; afterwards at most MAX_SERVERS idle servers are kept."""
    import threading

    (probe.parent / "probe pkg" / "meet_probe.py").write_text(MEET)
    monkeypatch.setenv(launch.PLAIN_SUBPROCESS_ENV, "0")
    meeting = tmp_path / "meeting"
    meeting.mkdir()
    statuses, logs = {}, {}

    def start(me: str, other: str, threads: str) -> None:
        logs[me] = tmp_path / f"{me}.log"
        env = dict(os.environ, OMP_NUM_THREADS=threads)
        statuses[me] = launch.run_module("meet_probe", [str(meeting), me, other], logs[me], cwd=probe, env=env)

    runs = [threading.Thread(target=start, args=("a", "b", "1")), threading.Thread(target=start, args=("b", "a", "1"))]
    for run_ in runs:
        run_.start()
    for run_ in runs:
        run_.join(timeout=120)
    assert statuses == {"a": 0, "b": 0}, {k: v.read_text()[-2000:] for k, v in logs.items()}
    assert lines(logs["a"]) == lines(logs["b"]) == ["threads 1 preloaded True"]
    start("c", "a", "2")  # another environment: another server, whose torch has two threads
    assert statuses["c"] == 0 and lines(logs["c"]) == ["threads 2 preloaded True"]
    assert len([s for s in launch._servers if not s.busy]) <= launch.MAX_SERVERS
    assert not any(s.busy for s in launch._servers)


def test_a_trainer_run_beside_others_gets_its_share_of_threads(tmp_path, monkeypatch):
    from training.world import presets

    calls = []
    monkeypatch.setattr(presets, "run_module", lambda module, argv, log, **kw: calls.append(kw) or 0)
    presets.run_trainer("training.train_lorweb", {"rank": 4}, tmp_path / "a")
    presets.run_trainer("training.train_lorweb", {"rank": 4}, tmp_path / "b", threads=3)
    alone, beside = calls
    assert not alone.get("plain") and alone["env"].get("OMP_NUM_THREADS") == os.environ.get("OMP_NUM_THREADS")
    assert not beside.get("plain") and beside["env"]["OMP_NUM_THREADS"] == beside["env"]["MKL_NUM_THREADS"] == "3"
    assert beside["env"]["TQDM_DISABLE"] == "1"


def test_runs_fork_by_default_and_only_the_setting_1_asks_for_plain_subprocesses(monkeypatch):
    """Where the OS can fork, a run forks from a launch server unless ANALOGY_TRAINER_SUBPROCESS=1."""
    if not hasattr(os, "fork"):
        pytest.skip("no fork on this OS: every run is a plain subprocess")
    monkeypatch.delenv(launch.PLAIN_SUBPROCESS_ENV, raising=False)
    assert launch.forking()
    for value, forks in (("0", True), ("1", False), ("", True)):
        monkeypatch.setenv(launch.PLAIN_SUBPROCESS_ENV, value)
        assert launch.forking() is forks, value


def test_a_released_server_closes_the_least_recently_used_idle_ones_beyond_the_limit(monkeypatch):
    """Idle servers beyond MAX_SERVERS are closed oldest first (the list runs from least to most recently used);
    busy ones are never closed."""
    class Server:
        def __init__(self, name, busy):
            self.name, self.busy, self.closed = name, busy, False

        def alive(self):
            return not self.closed

        def close(self):
            self.closed = True

    servers = [Server("old", False), Server("busy", True), Server("middle", False), Server("new", False),
               Server("released", True)]
    monkeypatch.setattr(launch, "_servers", list(servers))
    assert launch.MAX_SERVERS == 2
    launch._release(servers[-1])
    assert [s.name for s in servers if s.closed] == ["old", "middle"]
    assert [s.name for s in launch._servers] == ["busy", "new", "released"]
