"""devtools.frontend.open_workflows runs the browser driver again only when Chromium collected a pending promise
(a protocol race, not an answer of the frontend); any other failure, or the race every time, is an error."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from devtools import frontend

COLLECTED = "ProtocolError: Protocol error (Runtime.callFunctionOn): Promise was collected\n"


def fake_driver(monkeypatch, outcomes: list[tuple[int, str]]) -> list[list[str]]:
    """Each call pops an outcome (return code, stderr); a 0 writes the report where the driver is told to."""
    calls = []

    def run(cmd, **kwargs):
        calls.append(cmd)
        code, stderr = outcomes.pop(0)
        if code == 0:
            Path(cmd[cmd.index("--out") + 1]).write_text(json.dumps({"workflows": {"w": {}}}))
        return subprocess.CompletedProcess(cmd, code, "", stderr)

    monkeypatch.setattr(frontend.subprocess, "run", run)
    return calls


def test_the_driver_runs_again_after_a_collected_promise(monkeypatch):
    calls = fake_driver(monkeypatch, [(1, COLLECTED), (1, COLLECTED), (0, "")])
    assert frontend.open_workflows("http://x", [Path("w.json")]) == {"workflows": {"w": {}}}
    assert len(calls) == 3 and calls[0] == calls[2]


def test_other_failures_are_not_retried(monkeypatch):
    calls = fake_driver(monkeypatch, [(1, "TypeError: app is undefined\n"), (0, "")])
    with pytest.raises(frontend.FrontendError, match="app is undefined"):
        frontend.open_workflows("http://x", [Path("w.json")])
    assert len(calls) == 1


def test_a_race_every_time_is_an_error(monkeypatch):
    calls = fake_driver(monkeypatch, [(1, COLLECTED)] * frontend.DRIVER_ATTEMPTS)
    with pytest.raises(frontend.FrontendError, match=f"attempt {frontend.DRIVER_ATTEMPTS}"):
        frontend.open_workflows("http://x", [Path("w.json")])
    assert len(calls) == frontend.DRIVER_ATTEMPTS
