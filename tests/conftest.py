"""Shared fixtures: a real ComfyUI server (subprocess) with only this pack enabled, under an unusual folder name."""

from __future__ import annotations

import functools
import os
from pathlib import Path

import pytest

from devtools.comfy_server import ComfyServer, comfyui_root

# Spaces, dots, capitals and a hyphen: ComfyUI must still import the pack, and the pack must not care.
PACK_FOLDER = "My Analogy.Pack-v2"


def pytest_configure(config):
    """On a pytest-xdist worker, torch and every process the tests start use one thread each (unless
    OMP_NUM_THREADS says otherwise): two workers with two threads each on two cores run slower than one; measured on
    the 2-core CI machine, a quick-world ceiling trains in 91 s on one thread and 76 s on two."""
    if os.environ.get("PYTEST_XDIST_WORKER"):
        os.environ.setdefault("OMP_NUM_THREADS", "1")
        import torch

        torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


@functools.lru_cache(maxsize=None)
def uses_quick_world(test_file: Path) -> bool:
    """Whether a test module uses the session's quick world (tests/world_fixtures.py)."""
    return test_file.suffix == ".py" and test_file.is_file() and "world_fixtures" in test_file.read_text()


def pytest_xdist_make_scheduler(config, log):
    """The suite runs on two pytest-xdist workers (pyproject's addopts): every test of a module that uses the quick
    world goes to one worker, so the session's LoRWeB run (tests/world_fixtures.py) is trained once, not once per
    worker; every other module is its own unit of work, so its module-scoped fixtures (a trained run, tiny models
    built for it) are made once — split test by test, both workers made them (measured: the tiny LoRWeB run of
    test_training.py twice, 28 s and 22 s). (xdist's own ``loadgroup`` cannot do it on pytest 9.2: it renames the
    tests' ids through an attribute pytest no longer reads.)"""
    from xdist.scheduler import LoadScopeScheduling

    class QuickWorldOnOneWorker(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            module = nodeid.split("::", 1)[0]
            return "quick_world" if uses_quick_world(config.rootpath / module) else module

    return QuickWorldOnOneWorker(config, log)


def pytest_collection_modifyitems(config, items):
    """The quick-world tests come first: they are the longest chain (about 10 minutes on a clean clone), and the other
    worker takes everything else meanwhile."""
    items.sort(key=lambda item: not uses_quick_world(item.path))  # stable: the order within each part stays


@pytest.fixture(scope="session")
def comfy(tmp_path_factory):
    try:
        comfyui_root()
    except Exception as err:  # the suite is meant to run through scripts/test.sh, which installs ComfyUI
        pytest.fail(f"{err}. Run the tests with `bash scripts/test.sh`.")
    test_nodes = Path(__file__).resolve().parent / "comfy_test_nodes"
    server = ComfyServer(tmp_path_factory.mktemp("comfy-base"), pack_name=PACK_FOLDER,
                         extra_nodes={"analogy_test_nodes": test_nodes})
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def object_info(comfy):
    return comfy.object_info()


@pytest.fixture(scope="session")
def comfy_inproc():
    """ComfyUI's Python modules in this process plus the pack imported the way ComfyUI imports it."""
    from comfy_inproc import load_inproc

    return load_inproc()
