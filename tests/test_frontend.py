"""Every example workflow as a user meets it: opened in the frontend that the real ComfyUI server serves.

One headless Chromium (``devtools/browser``) loads every ``example_workflows/*.json`` through the frontend's own
``app.loadGraphData`` (what dropping the file or picking it in the template browser does) and reports what the
frontend made of it (``devtools/frontend.py``). The checks: no missing node types; no two nodes overlapping as
rendered (``node.getBounding()``, title bar included); every link attached at both ends with matching types and every
required input connected; every widget value valid, model files excepted, which must be exactly the files the README
tells the user to download; and ``app.graphToPrompt()`` equal to our converter (``devtools/workflow.py``). A workflow
added to the folder is covered without editing this file.

The same browser session then checks what a first-time user meets: with no model files installed, the frontend
offers exactly the workflow's downloadable files (``devtools/model_downloads.py``) with their folders (1.3x: the
missing-models dialog, 1.5x: the Issues tab); with those files in place (and the loaders refreshed), loading every
workflow again offers no download; and the help panel of every pack node renders its page
(``web/docs/<NodeName>.md``: headings, pictures loaded). The server runs the pack under the folder name ``git clone``
gives it: the frontend finds a custom node's help pages under the folder name up to its first dot. Every check runs
in the frontend ComfyUI 0.3.75 pins and in the newest one (see ``FRONTENDS``).
"""

from __future__ import annotations

import copy
import hashlib
import json
import sys
import time
from pathlib import Path

import pytest
from PIL import Image

from devtools.comfy_server import ComfyServer
from devtools.frontend import (browser_unavailable, link_problems, missing_models_dialog, missing_node_types,
                               model_file_values, offered_downloads, open_workflows, other_dialogs,
                               overlapping_nodes, readme_model_files, readme_model_files_for, widget_problems,
                               without_default_titles)
from devtools.model_downloads import downloadable
from devtools.workflow import _input_specs, _is_widget, ui_to_api

pytestmark = pytest.mark.comfy

REPO = Path(__file__).resolve().parent.parent
WORKFLOWS = sorted((REPO / "example_workflows").glob("*.json"))
README = (REPO / "README.md").read_text()
THUMBNAIL_LIMIT = 100 * 1024
LORWEB = "lorweb_kontext_analogy.json"
CLONE_FOLDER = "comfyui-visual-analogy"  # what `git clone` names the pack's folder
DOCS = REPO / "web" / "docs"
# The frontends the tests run in: the one ComfyUI 0.3.75 pins (comfyui-frontend-package 1.32.9, served by default),
# and the newest on PyPI when this was written, which scripts/setup_env.sh installs into .venv/frontend-latest and the
# server serves with --front-end-root.
LATEST_FRONTEND = Path(sys.prefix) / "frontend-latest" / "comfyui_frontend_package" / "static"
FRONTENDS = {"bundled": None, "latest": LATEST_FRONTEND}


def names(paths: list[Path]) -> list[str]:
    return [p.stem for p in paths]


# -- workflows with widgets converted to inputs (built from the LoRWeB example) ----------------------------------------
def _node(workflow: dict, class_type: str) -> dict:
    return next(n for n in workflow["nodes"] if n["type"] == class_type)


def _add_link(workflow: dict, origin: dict, target: dict, slot: int, kind: str) -> int:
    link_id = workflow["last_link_id"] = workflow["last_link_id"] + 1
    workflow["links"].append([link_id, origin["id"], 0, target["id"], slot, kind])
    origin["outputs"][0]["links"].append(link_id)
    return link_id


def _add_node(workflow: dict, node: dict) -> dict:
    node["id"] = workflow["last_node_id"] = workflow["last_node_id"] + 1
    node.setdefault("flags", {})
    node.update(order=len(workflow["nodes"]), mode=0, size=[300, 110])
    workflow["nodes"].append(node)
    return node


def legacy_converted_widgets(example: dict) -> dict:
    """Old frontend form: only converted widgets appear in ``inputs`` (with a ``widget`` entry), fed here by
    frontend-only PrimitiveNodes. KSampler.seed (a widget with a seed-control companion) and the prompt text."""
    workflow = copy.deepcopy(example)
    for target, name, kind, value, pos in ((_node(workflow, "KSampler"), "seed", "INT", [1234, "fixed"], [1850, 20]),
                                           (_node(workflow, "CLIPTextEncode"), "text", "STRING", ["a red hat"],
                                            [560, 20])):
        primitive = _add_node(workflow, {
            "type": "PrimitiveNode", "pos": pos, "inputs": [], "widgets_values": value,
            "outputs": [{"name": kind, "type": kind, "links": [], "widget": {"name": name}}],
            "properties": {"Run widget replace on values": False}})
        target["inputs"].append({"name": name, "type": kind, "link": None, "widget": {"name": name}})
        target["inputs"][-1]["link"] = _add_link(workflow, primitive, target, len(target["inputs"]) - 1, kind)
    return workflow


def newer_converted_widgets(example: dict, object_info: dict) -> dict:
    """Newer frontend form: every widget has an input slot (``link`` null unless fed); KSampler.steps and the
    composite's width are fed by real PrimitiveInt nodes."""
    workflow = copy.deepcopy(example)
    for node in workflow["nodes"]:
        info = object_info.get(node["type"])
        if info is None:
            continue
        for name, spec in _input_specs(info):
            if _is_widget(spec):
                kind = spec[0] if isinstance(spec[0], str) else "COMBO"
                node["inputs"].append({"name": name, "type": kind, "link": None, "widget": {"name": name}})
    for class_type, name, value, pos in (("KSampler", "steps", 12, [1850, 20]),
                                         ("AnalogyFourPanelComposite", "width", 640, [560, 1380])):
        target = _node(workflow, class_type)
        primitive = _add_node(workflow, {
            "type": "PrimitiveInt", "pos": pos, "inputs": [{"name": "value", "type": "INT", "link": None,
                                                           "widget": {"name": "value"}}],
            "outputs": [{"name": "INT", "type": "INT", "links": []}], "widgets_values": [value, "fixed"],
            "properties": {"Node name for S&R": "PrimitiveInt"}})
        slot = next(i for i, inp in enumerate(target["inputs"]) if inp.get("widget", {}).get("name") == name)
        target["inputs"][slot]["link"] = _add_link(workflow, primitive, target, slot, "INT")
    return workflow


# -- the browser run: one server, one browser, all workflows ----------------------------------------------------------
@pytest.fixture(scope="session")
def converted_workflows(object_info, tmp_path_factory) -> list[Path]:
    example = json.loads((REPO / "example_workflows" / LORWEB).read_text())
    folder = tmp_path_factory.mktemp("converted-widgets")
    built = {"_converted_widgets_legacy": legacy_converted_widgets(example),
             "_converted_widgets_newer": newer_converted_widgets(example, object_info)}
    for name, workflow in built.items():
        (folder / f"{name}.json").write_text(json.dumps(workflow))
    return sorted(folder.glob("*.json"))


def pack_node_types(object_info: dict) -> list[str]:
    return sorted(name for name, info in object_info.items() if info["python_module"].startswith("custom_nodes."))


def downloads_in_place(models_dir: Path) -> list[Path]:
    """Where every downloadable file of every example workflow goes under a ComfyUI ``models/`` folder, with the
    companion files a transformers folder needs (the T5 loader lists a folder only once its config.json is there)."""
    files = {f for path in WORKFLOWS for f in downloadable(path.name)}
    places = {models_dir / f.directory / f.name for f in files}
    places |= {models_dir / f.directory / Path(f.name).parent / c for f in files for c in f.companions}
    return sorted(places)


@pytest.fixture(scope="session", params=sorted(FRONTENDS))
def frontend(request, tmp_path_factory) -> dict:
    """The driver's report: every example workflow plus the converted-widget workflows opened with no model files
    installed, every example opened again with its downloadable files in place, and every pack node's help panel."""
    why = browser_unavailable()
    if why:  # before the server starts
        pytest.skip(f"the frontend tests need Node.js and a Chromium: {why}")
    root = FRONTENDS[request.param]
    if root is not None and not (root / "index.html").is_file():
        pytest.skip(f"no {request.param} frontend at {root}: run `bash scripts/setup_env.sh`")
    from devtools.run_example import write_default_inputs

    converted_workflows = request.getfixturevalue("converted_workflows")
    base = tmp_path_factory.mktemp(f"frontend-{request.param}")
    write_default_inputs(base / "input")  # the images the examples load, so LoadImage's list holds them
    with ComfyServer(base, pack_name=CLONE_FOLDER, front_end_root=root) as server:
        started = time.monotonic()
        report = open_workflows(server.url, WORKFLOWS + converted_workflows,
                                place_files=downloads_in_place(base / "models"),
                                help_nodes=pack_node_types(server.object_info()))
        report["model_folders"] = server.get("/models")
    print(f"\n[frontend] {len(report['workflows'])} workflows, {len(report['help'])} help pages in ComfyUI frontend "
          f"{report['frontend_version']}: {time.monotonic() - started:.1f}s wall, driver timings {report['seconds']}")
    return report


def assert_none(problems: list[str], context: str = "") -> None:
    assert not problems, f"{len(problems)} problem(s) {context}:\n  " + "\n  ".join(problems)


def facts_of(frontend: dict, path: Path) -> dict:
    facts = frontend["workflows"][path.stem]
    noise = [e for e in facts["console_errors"] if "api.comfy.org" not in e]  # registry look-ups, blocked offline
    facts["context"] = f"(frontend console errors: {noise[:5]})" if noise else ""
    return facts


@pytest.mark.parametrize("path", WORKFLOWS, ids=names(WORKFLOWS))
def test_no_missing_node_types(frontend, path):
    facts = facts_of(frontend, path)
    assert facts["nodes"], "the frontend shows no nodes"
    assert_none(missing_node_types(facts), f"(missing node types; dialogs: {facts['dialogs']})")
    assert other_dialogs(facts["dialogs"]) == [], "a dialog other than the missing-models one opened while loading"


@pytest.mark.parametrize("path", WORKFLOWS, ids=names(WORKFLOWS))
def test_no_nodes_overlap(frontend, path):
    facts = facts_of(frontend, path)
    assert len(facts["nodes"]) == len(json.loads(path.read_text())["nodes"])
    assert_none(overlapping_nodes(facts), "(nodes overlapping as rendered; fix devtools/make_examples.py)")


@pytest.mark.parametrize("path", WORKFLOWS, ids=names(WORKFLOWS))
def test_every_link_is_connected(frontend, object_info, path):
    facts = facts_of(frontend, path)
    workflow = json.loads(path.read_text())
    assert len(facts["links"]) == len(workflow["links"])
    assert_none(link_problems(facts, workflow, object_info))


@pytest.mark.parametrize("path", WORKFLOWS, ids=names(WORKFLOWS))
def test_widget_values_are_valid(frontend, comfy, path):
    facts = facts_of(frontend, path)
    readme_files = readme_model_files(README)
    assert_none(widget_problems(facts, comfy.object_info(), set(readme_files)), facts["context"])
    listed = readme_model_files_for(README, path.name)
    used = model_file_values(facts)
    if listed is not None:  # the README's table for this workflow: exactly the files it uses
        assert set(used) == set(listed), f"{path.name} uses {sorted(used)}; its README table lists {sorted(listed)}"
    else:
        assert set(used) <= set(readme_files)


@pytest.mark.parametrize("path", WORKFLOWS, ids=names(WORKFLOWS))
def test_graph_to_prompt_equals_our_converter(frontend, object_info, path):
    facts = facts_of(frontend, path)
    workflow = json.loads(path.read_text())
    expected = without_default_titles(facts["prompt"], workflow)
    assert expected, "graphToPrompt gave an empty prompt"
    assert without_default_titles(ui_to_api(workflow, object_info), workflow) == expected
    # The frontend's own serialisations (newer form: every widget has an input slot; and graphToPrompt's compressed
    # form) convert to the same prompt.
    assert without_default_titles(ui_to_api(facts["serialized"], object_info), workflow) == expected
    assert without_default_titles(ui_to_api(facts["prompt_workflow"], object_info), workflow) == expected


@pytest.mark.parametrize("form", ["_converted_widgets_legacy", "_converted_widgets_newer"])
def test_widgets_converted_to_inputs_match_graph_to_prompt(frontend, object_info, converted_workflows, form):
    path = next(p for p in converted_workflows if p.stem == form)
    facts = frontend["workflows"][form]
    assert missing_node_types(facts) == []
    expected = facts["prompt"]
    by_type = {node["class_type"]: node["inputs"] for node in expected.values()}
    if form.endswith("legacy"):  # the frontend itself puts the primitives' values into the prompt
        assert by_type["KSampler"]["seed"] == 1234 and by_type["KSampler"]["steps"] == 28
        assert by_type["CLIPTextEncode"]["text"] == "a red hat"
    else:  # linked to the PrimitiveInt nodes that hold 12 and 640
        steps, width = by_type["KSampler"]["steps"], by_type["AnalogyFourPanelComposite"]["width"]
        assert steps[1] == 0 and expected[steps[0]]["inputs"] == {"value": 12}
        assert width[1] == 0 and expected[width[0]]["inputs"] == {"value": 640}
    workflow = json.loads(path.read_text())
    expected = without_default_titles(expected, workflow)
    assert without_default_titles(ui_to_api(workflow, object_info), workflow) == expected
    assert without_default_titles(ui_to_api(facts["serialized"], object_info), workflow) == expected


# -- a first-time user: missing models, help pages ---------------------------------------------------------------------
@pytest.mark.parametrize("path", WORKFLOWS, ids=names(WORKFLOWS))
def test_missing_models_dialog_lists_the_workflow_downloads(frontend, path):
    """No model installed: the frontend offers exactly the workflow's downloadable files, each in its folder. In
    the dialog of 1.3x each has a download button (it shows an error instead for a folder it does not know, a host
    or suffix it does not allow); 1.5x lists them in its Issues tab."""
    facts = frontend["workflows"][path.stem]
    expected = {(f.directory, f.name) for f in downloadable(path.name)}
    assert offered_downloads(facts) == expected
    dialog = missing_models_dialog(facts["dialogs"])
    if facts["missing_model_store"] is None and expected:  # the dialog of frontends up to 1.3x
        assert dialog.count("Download") == len(expected), dialog
        for refusal in ("Invalid directory", "not allowed", "Only allowed suffixes"):
            assert refusal not in dialog, dialog
    if not expected:
        assert dialog is None, f"{path.name} needs no model, yet the dialog opened:\n{dialog}"


@pytest.mark.parametrize("path", WORKFLOWS, ids=names(WORKFLOWS))
def test_no_download_offered_once_the_files_are_in_place(frontend, path):
    reloaded = frontend["reloaded"][path.stem]
    assert offered_downloads(reloaded) == set()
    assert reloaded["dialogs"] == []


def test_pack_model_folders_are_registered(frontend):
    """The frontend places a download only into a folder the server lists (GET /models)."""
    assert {"lorweb", "loc", "regions"} <= set(frontend["model_folders"])


def test_every_pack_node_has_a_help_page(frontend):
    assert set(frontend["help"]) == {p.stem for p in DOCS.glob("*.md")}


@pytest.mark.parametrize("node_type", sorted(p.stem for p in DOCS.glob("*.md")))
def test_help_panel_renders_the_page(frontend, node_type):
    """The node's help panel shows our page, not the frontend's fallback built from tooltips: its title, its
    sections, and every picture loaded from the pack's web directory."""
    shown = frontend["help"][node_type]
    assert "error" not in shown, shown
    assert not shown["fallback"], f"the help panel fell back to tooltips: {shown['text'][:300]}"
    page = (DOCS / f"{node_type}.md").read_text()
    title = page.splitlines()[0].removeprefix("# ")
    assert shown["headings"][0] == f"h1 {title}"
    assert {"h2 Inputs", "h2 Outputs"} <= set(shown["headings"])
    pictures = page.count("![")
    assert len(shown["images"]) == pictures
    for image in shown["images"]:
        assert image["loaded"], f"picture not loaded: {image['src']}"
        assert image["src"].startswith(f"/extensions/{CLONE_FOLDER}/docs/")


# -- without a browser ------------------------------------------------------------------------------------------------
def test_converter_reads_widgets_converted_to_inputs(object_info):
    """The values after a converted widget keep their places (a converted seed also leaves its control value)."""
    example = json.loads((REPO / "example_workflows" / LORWEB).read_text())
    plain = ui_to_api(example, object_info)
    legacy = ui_to_api(legacy_converted_widgets(example), object_info)
    sampler = next(k for k, v in plain.items() if v["class_type"] == "KSampler")
    text = next(k for k, v in plain.items() if v["class_type"] == "CLIPTextEncode")
    assert plain[sampler]["inputs"]["seed"] == 0 and legacy[sampler]["inputs"]["seed"] == 1234
    assert legacy[text]["inputs"]["text"] == "a red hat"
    for key in ("steps", "cfg", "sampler_name", "scheduler", "denoise"):
        assert legacy[sampler]["inputs"][key] == plain[sampler]["inputs"][key], key

    newer = ui_to_api(newer_converted_widgets(example, object_info), object_info)
    feeds = {v["inputs"]["value"]: k for k, v in newer.items() if v["class_type"] == "PrimitiveInt"}
    assert newer[sampler]["inputs"]["steps"] == [feeds[12], 0]
    composite = next(k for k, v in plain.items() if v["class_type"] == "AnalogyFourPanelComposite")
    assert newer[composite]["inputs"]["width"] == [feeds[640], 0]
    assert newer[composite]["inputs"]["height"] == plain[composite]["inputs"]["height"]
    unchanged = {k: v for k, v in newer.items() if k not in (sampler, composite) and k not in feeds.values()}
    assert unchanged == {k: v for k, v in plain.items() if k not in (sampler, composite)}


def test_converter_keeps_defaults_for_widgets_an_older_file_lacks(object_info):
    """A workflow saved before a node gained a widget: the frontend keeps the widget's default, and so do we."""
    example = json.loads((REPO / "example_workflows" / LORWEB).read_text())
    sampler = _node(example, "KSampler")
    assert object_info["KSampler"]["input"]["required"]["denoise"][1]["default"] == 1.0
    sampler["widgets_values"][-1] = 0.5
    assert ui_to_api(example, object_info)[str(sampler["id"])]["inputs"]["denoise"] == 0.5
    sampler["widgets_values"] = sampler["widgets_values"][:-1]
    assert ui_to_api(example, object_info)[str(sampler["id"])]["inputs"]["denoise"] == 1.0


def test_overlap_check_sees_title_bars():
    """Boxes that only share their title-bar strip overlap; boxes that touch do not."""
    def facts(*boxes):
        return {"nodes": [{"id": i, "title": f"n{i}", "type": "T", "bounding": list(b)} for i, b in enumerate(boxes)]}
    assert overlapping_nodes(facts((0, 0, 100, 100), (0, 100, 100, 50))) == []
    assert len(overlapping_nodes(facts((0, 0, 100, 100), (50, 90, 100, 50)))) == 1
    assert len(overlapping_nodes(facts((0, 0, 100, 100), (10, 10, 20, 20), (200, 0, 10, 10)))) == 1


def test_readme_lists_the_lorweb_files():
    files = readme_model_files_for(README, LORWEB)
    assert files is not None and files["flux1-kontext-dev.safetensors"] == "models/diffusion_models/"
    assert {"clip_l.safetensors", "t5xxl_fp8_e4m3fn_scaled.safetensors", "ae.safetensors",
            "clip-vit-large-patch14.safetensors", "lorweb_model.safetensors"} <= set(files)
    assert set(files) <= set(readme_model_files(README))


@pytest.mark.parametrize("path", WORKFLOWS, ids=names(WORKFLOWS))
def test_thumbnail_is_small_and_current(path):
    """ComfyUI's template browser shows ``<name>.jpg`` beside ``<name>.json``; the JPEG records the hash of the
    workflow it was made from (``devtools/make_thumbnails.py``), so a changed workflow needs a new picture."""
    thumb = path.with_suffix(".jpg")
    assert thumb.is_file(), "no thumbnail: run `.venv/bin/python -m devtools.make_thumbnails`"
    assert thumb.stat().st_size <= THUMBNAIL_LIMIT
    with Image.open(thumb) as image:
        assert image.format == "JPEG" and image.width >= 400
        made_from = image.info.get("comment", b"").decode()
    assert made_from == f"sha256:{hashlib.sha256(path.read_bytes()).hexdigest()}", \
        f"{thumb.name} was made from another version of {path.name}: run `.venv/bin/python -m devtools.make_thumbnails`"


def test_readme_shows_the_lorweb_thumbnail():
    assert f"(example_workflows/{Path(LORWEB).with_suffix('.jpg')})" in README
