"""Shared fixtures: a real ComfyUI server (subprocess) with only this pack enabled, under an unusual folder name."""

from __future__ import annotations

from pathlib import Path

import pytest

from devtools.comfy_server import ComfyServer, comfyui_root

# Spaces, dots, capitals and a hyphen: ComfyUI must still import the pack, and the pack must not care.
PACK_FOLDER = "My Analogy.Pack-v2"


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
