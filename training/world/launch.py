"""Run ``python -m <module> <args>`` with its output in a log file, cheaply when it is run many times.

Every world run of every trainer is a process of its own (Accelerate keeps process-wide state). A fresh interpreter
spends about 8 s importing torch, diffusers, transformers, peft and accelerate before its first step — most of a
short run's time, and the yardstick, the ceilings and the tests start dozens. So on POSIX the runs are forked from a
*launch server*: one ``python`` started (with the caller's environment, in the repository) the first time they are
needed, which imports the trainers' modules and then only forks, one child per run. Nothing has run in it — no
Accelerate state, no CUDA, no torch thread pool, no logging handlers, none of the caller's threads or modules — so
each child starts as ``python -m module`` would, minus the imports: it sets its working directory, ``sys.argv``,
environment and output, and executes the module as ``__main__`` (``runpy``). A run whose environment differs from
a server's (apart from pytest's per-test variable) gets a server of its own, since variables are read at import time.
A server runs one run at a time, so runs started side by side (the yardstick's lanes, world models built side by side)
each get a server of their own: an idle server of their environment, or a new one; at most two idle ones are kept.
``ANALOGY_TRAINER_SUBPROCESS=1``, and platforms without ``fork`` (Windows), start a plain ``python -m`` subprocess per
run instead.
"""

from __future__ import annotations

import atexit
import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
# imported once by the server (and, through them, torch, diffusers, transformers, peft, accelerate); the entry modules
# (training.train_*) are left out: runpy executes them afresh as __main__ in each child
PRELOAD = ("training.world", "training.lorweb.task", "training.loc.task", "training.edit_transfer.task",
           "training.regions.task")
PLAIN_SUBPROCESS_ENV = "ANALOGY_TRAINER_SUBPROCESS"


# ---------------------------------------------------------------------------------------------------------------------
# the server (its own process)


def serve() -> None:
    """Read one JSON request per line on stdin ({module, argv, log, append, cwd, env}); fork a child that runs it;
    answer {"pid"} when it started and {"status"} when it ended, one JSON line each. Ends at the end of stdin."""
    replies = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # anything else printed here goes to stderr, never into the replies
    for name in PRELOAD:
        try:
            __import__(name)
        except Exception as err:  # noqa: BLE001 - the child's own import then fails into its log, as python -m would
            print(f"launch server: preloading {name} failed: {err!r}", file=sys.stderr)
    for line in sys.stdin:
        request = json.loads(line)
        pid = os.fork()
        if pid == 0:
            try:
                replies.close()
                _run_as_main(**request)
            finally:
                os._exit(1)  # never return into this loop, whatever happened
        replies.write(json.dumps({"pid": pid}) + "\n")
        _, status = os.waitpid(pid, 0)
        replies.write(json.dumps({"status": os.waitstatus_to_exitcode(status)}) + "\n")


def _redirect(log: str, append: bool) -> None:
    """stdin from /dev/null (never the server's request pipe), stdout and stderr to ``log``."""
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)
    out = os.open(log, os.O_WRONLY | os.O_CREAT | (os.O_APPEND if append else os.O_TRUNC), 0o644)
    os.dup2(out, 1)
    os.dup2(out, 2)
    os.close(out)
    sys.stdin = sys.__stdin__ = open(0, closefd=False)
    sys.stdout = sys.__stdout__ = open(1, "w", buffering=1, encoding="utf-8", errors="backslashreplace",
                                       closefd=False)
    sys.stderr = sys.__stderr__ = open(2, "w", buffering=1, encoding="utf-8", errors="backslashreplace",
                                       closefd=False)


def _run_as_main(module: str, argv: list[str], log: str, append: bool, cwd: str, env: dict[str, str]) -> None:
    """In the forked child: become ``python -m module *argv`` in ``cwd`` with ``env``, writing to ``log``; exit with
    its status (a KeyboardInterrupt ends it by SIGINT, as it ends python)."""
    code, interrupted = 1, False
    try:
        os.environ.clear()
        os.environ.update(env)
        _redirect(log, append)
        os.chdir(cwd)
        sys.path[0] = cwd  # as python -m: the working directory first
        sys.argv = [module, *argv]
        __import__("runpy").run_module(module, run_name="__main__", alter_sys=True)
        code = 0
    except SystemExit as done:
        code = done.code if isinstance(done.code, int) else (0 if done.code is None else 1)
        if not isinstance(done.code, (int, type(None))):
            print(done.code, file=sys.stderr)
    except KeyboardInterrupt:
        __import__("traceback").print_exc()
        interrupted = True
    except BaseException:  # noqa: BLE001 - reported as python -m reports it: traceback on stderr, status 1
        __import__("traceback").print_exc()
    # what an interpreter's exit runs: wait for non-daemon threads (and executors), then the atexit handlers
    threading._shutdown()
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:  # noqa: BLE001 - exiting either way
            pass
    if interrupted:
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGINT)
    os._exit(code)


# ---------------------------------------------------------------------------------------------------------------------
# the caller's side

# read at no import: a server started for one value serves the others (pytest sets this one for every test phase)
VOLATILE_ENV = ("PYTEST_CURRENT_TEST",)
MAX_SERVERS = 2  # idle servers hold ~0.5 GB each: the least recently used idle ones beyond this many are closed


class _Server:
    def __init__(self, env: dict[str, str], key: tuple):
        self.key = key
        self.lock = threading.Lock()
        self.busy = False  # taken by a caller (:func:`_server`) until its run ends
        self.running: int | None = None  # the pid of the run in progress
        self.process = subprocess.Popen([sys.executable, "-c", f"from {__name__} import serve; serve()"],
                                        stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env, cwd=REPO, text=True,
                                        bufsize=1)

    def alive(self) -> bool:
        return self.process.poll() is None

    def run(self, request: dict) -> int:
        with self.lock:
            self.running = None
            try:
                self.process.stdin.write(json.dumps(request) + "\n")
                self.process.stdin.flush()
                self.running = json.loads(self._reply())["pid"]
                return json.loads(self._reply())["status"]
            except BaseException:  # interrupted or broken: stop the run and this server (its replies are unread)
                self.kill()
                raise
            finally:
                _release(self)

    def _reply(self) -> str:
        line = self.process.stdout.readline()
        if not line:
            raise RuntimeError(f"the trainer launch server stopped (status {self.process.wait()}); set "
                               f"{PLAIN_SUBPROCESS_ENV}=1 to start each run as a plain subprocess")
        return line

    def kill(self) -> None:
        """Stop the server, then the run it was waiting for (as a subprocess run is stopped when its caller is)."""
        self.process.kill()
        self.process.wait()
        if self.running is not None:
            try:
                os.kill(self.running, signal.SIGTERM)
            except ProcessLookupError:  # it had ended
                pass

    def close(self) -> None:
        if self.alive():
            self.process.stdin.close()

    def wait(self) -> None:
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


_servers: list[_Server] = []  # least recently used first
_servers_lock = threading.Lock()


def _server(env: dict[str, str]) -> _Server:
    """An idle live server started with ``env`` (a new one if none is), taken for one run."""
    key = tuple(sorted((k, v) for k, v in env.items() if k not in VOLATILE_ENV))
    with _servers_lock:
        _servers[:] = [s for s in _servers if s.busy or s.alive()]
        server = next((s for s in _servers if s.key == key and not s.busy), None)
        if server is None:
            server = _Server(env, key)
        else:
            _servers.remove(server)
        server.busy = True
        _servers.append(server)
        return server


def _release(server: _Server) -> None:
    """``server``'s run ended: it is idle again; close the least recently used idle servers beyond MAX_SERVERS."""
    with _servers_lock:
        server.busy = False
        _servers[:] = [s for s in _servers if s.busy or s.alive()]  # a server killed after an interrupt goes
        idle = [s for s in _servers if not s.busy]
        for oldest in idle[:max(0, len(idle) - MAX_SERVERS)]:
            _servers.remove(oldest)
            oldest.close()


@atexit.register
def _close_servers() -> None:
    servers = list(_servers)
    for server in servers:
        server.close()
    for server in servers:
        server.wait()


def available_cores() -> int:
    """The CPU cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def thread_env(threads: int, env: dict[str, str] | None = None) -> dict[str, str]:
    """``env`` (default: this process's) for a run with ``threads`` torch threads, one of several side by side."""
    return dict(os.environ if env is None else env, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))


def forking() -> bool:
    """Whether runs are forked from a launch server (else: a plain subprocess each)."""
    return hasattr(os, "fork") and os.environ.get(PLAIN_SUBPROCESS_ENV) != "1"


def run_module(module: str, argv: list[str], log: Path, *, append: bool = False, cwd: Path | None = None,
               env: dict[str, str] | None = None, plain: bool = False) -> int:
    """``python -m module *argv`` in ``cwd`` (default: the repository) with stdout and stderr to ``log`` (appended to
    when ``append``) and environment ``env`` (default: this process's); returns its exit status. Safe to call from
    several threads at once: each run forks from a server of its own. ``plain``: a plain subprocess even where runs
    are forked."""
    env = dict(os.environ if env is None else env)
    cwd = str(Path(cwd or REPO).resolve())
    if plain or not forking():
        with open(log, "a" if append else "w") as handle:
            return subprocess.run([sys.executable, "-m", module, *argv], cwd=cwd, stdout=handle,
                                  stderr=subprocess.STDOUT, env=env).returncode
    request = {"module": module, "argv": [str(a) for a in argv], "log": str(Path(log).resolve()), "append": append,
               "cwd": cwd, "env": env}
    return _server(env).run(request)
