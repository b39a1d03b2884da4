"""Run ``python -m <module> <args>`` with its output in a log file, cheaply when it is run many times.

Every world run of every trainer is a process of its own (Accelerate keeps process-wide state). A fresh interpreter
spends about 8 s importing torch, diffusers, transformers, peft and accelerate before its first step — most of a
short run's time, and the yardstick, the ceilings and the tests start dozens. So on POSIX the runs are forked from a
*launch server*: one ``python`` started (with the caller's environment and working directory) the first time they
are needed, which imports the trainers' modules and then only forks, one child per run. Nothing has run in it — no
Accelerate state, no CUDA, no torch thread pool, no logging handlers, none of the caller's threads or modules — so
each child starts as ``python -m module`` would, minus the imports: it sets its working directory, ``sys.argv`` and
output, and executes the module as ``__main__`` (``runpy``). A run whose environment differs from a server's gets a
server of its own (environment variables are read at import time). ``ANALOGY_TRAINER_SUBPROCESS=1``, and platforms
without ``fork`` (Windows), start a plain ``python -m`` subprocess per run instead.
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
    """Read one JSON request per line on stdin ({module, argv, log, append, cwd}); fork a child that runs it; answer
    {"pid"} when it started and {"status"} when it ended, one JSON line each. Ends at the end of stdin."""
    replies = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # anything else printed here goes to stderr, never into the replies
    for name in PRELOAD:
        try:
            __import__(name)
        except Exception:  # noqa: BLE001 - the child's own import then fails into its log, as python -m would
            pass
    for line in sys.stdin:
        request = json.loads(line)
        pid = os.fork()
        if pid == 0:
            replies.close()
            _run_as_main(**request)
        replies.write(json.dumps({"pid": pid}) + "\n")
        _, status = os.waitpid(pid, 0)
        replies.write(json.dumps({"status": os.waitstatus_to_exitcode(status)}) + "\n")


def _run_as_main(module: str, argv: list[str], log: str, append: bool, cwd: str) -> None:
    """In the forked child: become ``python -m module *argv`` in ``cwd`` writing to ``log``; exit with its status."""
    code = 1
    try:
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        out = os.open(log, os.O_WRONLY | os.O_CREAT | (os.O_APPEND if append else os.O_TRUNC), 0o644)
        os.dup2(out, 1)
        os.dup2(out, 2)
        sys.stdin = open(0, closefd=False)
        sys.stdout = open(1, "w", buffering=1, encoding="utf-8", errors="backslashreplace", closefd=False)
        sys.stderr = open(2, "w", buffering=1, encoding="utf-8", errors="backslashreplace", closefd=False)
        os.chdir(cwd)
        sys.path[0] = cwd  # as python -m: the working directory first
        sys.argv = [module, *argv]
        runpy = __import__("runpy")
        runpy.run_module(module, run_name="__main__", alter_sys=True)
        code = 0
    except SystemExit as done:
        code = done.code if isinstance(done.code, int) else (0 if done.code is None else 1)
        if not isinstance(done.code, (int, type(None))):
            print(done.code, file=sys.stderr)
    except BaseException:  # noqa: BLE001 - reported as python -m reports it: traceback on stderr, status 1
        __import__("traceback").print_exc()
    finally:
        atexit._run_exitfuncs()  # what an interpreter's exit runs (logging.shutdown, trackers' closers, ...)
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except Exception:  # noqa: BLE001 - exiting either way
                pass
        os._exit(code)  # never return into the server's loop


# ---------------------------------------------------------------------------------------------------------------------
# the caller's side


class _Server:
    def __init__(self, env: dict[str, str]):
        self.lock = threading.Lock()
        self.process = subprocess.Popen([sys.executable, "-c", f"from {__name__} import serve; serve()"],
                                        stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env, cwd=REPO, text=True,
                                        bufsize=1)

    def alive(self) -> bool:
        return self.process.poll() is None

    def run(self, request: dict) -> int:
        with self.lock:
            self.process.stdin.write(json.dumps(request) + "\n")
            self.process.stdin.flush()
            pid = json.loads(self._reply())["pid"]
            try:
                return json.loads(self._reply())["status"]
            except BaseException:  # interrupted: stop the run, as a subprocess would be stopped
                os.kill(pid, signal.SIGTERM)
                self.close()
                raise

    def _reply(self) -> str:
        line = self.process.stdout.readline()
        if not line:
            raise RuntimeError(f"the trainer launch server stopped (status {self.process.wait()}); set "
                               f"{PLAIN_SUBPROCESS_ENV}=1 to start each run as a plain subprocess")
        return line

    def close(self) -> None:
        if self.alive():
            self.process.stdin.close()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()


_servers: dict[tuple, _Server] = {}
_servers_lock = threading.Lock()


def _server(env: dict[str, str]) -> _Server:
    key = tuple(sorted(env.items()))
    with _servers_lock:
        server = _servers.get(key)
        if server is None or not server.alive():
            server = _servers[key] = _Server(env)
        return server


@atexit.register
def _close_servers() -> None:
    for server in list(_servers.values()):
        server.close()


def forking() -> bool:
    """Whether runs are forked from a launch server (else: a plain subprocess each)."""
    return hasattr(os, "fork") and os.environ.get(PLAIN_SUBPROCESS_ENV) != "1"


def run_module(module: str, argv: list[str], log: Path, *, append: bool = False, cwd: Path | None = None,
               env: dict[str, str] | None = None) -> int:
    """``python -m module *argv`` in ``cwd`` (default: the repository) with stdout and stderr to ``log`` (appended to
    when ``append``) and environment ``env`` (default: this process's); returns its exit status."""
    env = dict(os.environ if env is None else env)
    cwd = str(Path(cwd or REPO).resolve())
    if not forking():
        with open(log, "a" if append else "w") as handle:
            return subprocess.run([sys.executable, "-m", module, *argv], cwd=cwd, stdout=handle,
                                  stderr=subprocess.STDOUT, env=env).returncode
    request = {"module": module, "argv": [str(a) for a in argv], "log": str(Path(log).resolve()), "append": append,
               "cwd": cwd}
    return _server(env).run(request)
