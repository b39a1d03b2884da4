"""The one table of model downloads (``devtools/model_downloads.py``) against what it feeds: the example workflows'
``properties.models``, their notes, and the README's download tables. No browser, no server."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from devtools.model_downloads import (ALL_FILES, ALLOWED_SUFFIXES, ALLOWED_URL_PREFIXES, PACK_FOLDERS,
                                      WORKFLOW_FILES, downloadable, models_metadata, readme_workflows, render_readme)

REPO = Path(__file__).resolve().parent.parent
WORKFLOWS = sorted((REPO / "example_workflows").glob("*.json"))
README = (REPO / "README.md").read_text()
COMFY_FOLDERS = {"checkpoints", "diffusion_models", "text_encoders", "vae", "clip_vision", "loras"}
HF_FILE = re.compile(r"^https://huggingface\.co/(?P<repo>[\w.-]+/[\w.-]+)/resolve/main/(?P<path>[\w./-]+)$")


def loaders(workflow: dict) -> list[dict]:
    return [n for n in workflow["nodes"] if n["type"] != "Note"]


def test_every_example_workflow_is_in_the_table():
    assert {p.name for p in WORKFLOWS} == set(WORKFLOW_FILES)


@pytest.mark.parametrize("path", WORKFLOWS, ids=[p.stem for p in WORKFLOWS])
def test_loader_nodes_carry_the_tables_metadata(path):
    """Every node naming a downloadable file carries exactly its entries; together they are the workflow's
    downloadable files, and the model files its widgets name are exactly the table's files for it."""
    workflow = json.loads(path.read_text())
    written = []
    for node in loaders(workflow):
        models = node["properties"].get("models", [])
        assert models == models_metadata(node["widgets_values"]), node["type"]
        written += [(m["directory"], m["name"], m["url"]) for m in models]
    assert sorted(written) == sorted((f.directory, f.name, f.url) for f in downloadable(path.name))
    named = {v for n in loaders(workflow) for v in n["widgets_values"] if isinstance(v, str) and v in ALL_FILES}
    widget_files = {v for n in loaders(workflow) for v in n["widgets_values"]
                    if isinstance(v, str) and v.endswith(".safetensors")}
    assert named == widget_files == {f.name for f in WORKFLOW_FILES[path.name]}


@pytest.mark.parametrize("path", WORKFLOWS, ids=[p.stem for p in WORKFLOWS])
def test_notes_say_how_to_make_the_files_nobody_publishes(path):
    notes = " ".join(n["widgets_values"][0] for n in json.loads(path.read_text())["nodes"] if n["type"] == "Note")
    for trained in (f for f in WORKFLOW_FILES[path.name] if not f.url):
        assert trained.name in notes and "python -m training.train_" in notes, trained.name
    if downloadable(path.name):
        assert "missing-models dialog" in notes


@pytest.mark.parametrize("name", sorted(ALL_FILES))
def test_each_download_is_an_official_file_the_frontend_offers(name):
    """A direct Hugging Face file link the bundled frontend (1.32.9) shows a download button for, into a folder
    ComfyUI or the pack registers, with the place it was confirmed."""
    entry = ALL_FILES[name]
    assert entry.directory in COMFY_FOLDERS | set(PACK_FOLDERS)
    assert entry.source and entry.repository
    if entry.url is None:
        assert entry.repository == "yours" and "python -m training." in entry.how
        return
    match = HF_FILE.match(entry.url)
    assert match, entry.url
    assert entry.url.startswith(ALLOWED_URL_PREFIXES) and entry.name.endswith(ALLOWED_SUFFIXES)
    assert match["repo"] in entry.repository
    if entry.saved_as != Path(entry.name).name:  # the download is saved under another name: say so
        assert entry.saved_as in entry.how and Path(entry.name).name in entry.how


def test_readme_download_tables_come_from_the_table():
    """`python -m devtools.model_downloads` rewrites them; every workflow that needs a file has one."""
    assert render_readme(README) == README, "README download tables are stale: run python -m devtools.model_downloads"
    needing = {name for name, files in WORKFLOW_FILES.items() if files}
    assert set(readme_workflows(README)) == needing
