"""Open workflows in the ComfyUI frontend that a running server serves (headless Chromium) and judge what it shows.

``open_workflows`` runs ``devtools/browser/open_workflows.mjs`` (Node.js + puppeteer-core + the Chromium binary inside
the npm package ``@sparticuz/chromium``; ``scripts/setup_env.sh`` installs them under ``devtools/browser/``) once for
a list of workflows and returns its report: per workflow, the frontend's own node boxes (``node.getBounding()``,
title bar included), slots, widgets, links, missing node types and ``app.graphToPrompt()`` output. The functions
below turn a report into lists of problems (empty = fine); ``tests/test_frontend.py`` asserts them, and
``devtools/make_thumbnails.py`` uses the same driver for screenshots.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any

from .comfy_server import REPO_ROOT
from .workflow import _input_specs, _is_widget

BROWSER_DIR = REPO_ROOT / "devtools" / "browser"
DRIVER = BROWSER_DIR / "open_workflows.mjs"
MIN_NODE = (20, 11)
# Chromium can collect a pending page-side promise mid-call ("Promise was collected"): a protocol race seen on fresh
# CI clones under load, not an answer of the frontend. The driver retries its named steps; when the race hits
# outside them the whole driver (idempotent: it only reads the page and writes its report) runs again.
COLLECTED = "Promise was collected"
DRIVER_ATTEMPTS = 3
log = logging.getLogger(__name__)
MODEL_EXTENSIONS = (".safetensors", ".sft", ".ckpt", ".pt", ".pth", ".bin", ".gguf", ".onnx")
INSTALL_HINT = ("install Node.js >= 20.11 with npm (Debian: apt-get install nodejs npm), then run "
                "`bash scripts/setup_env.sh`, which runs `npm ci` in devtools/browser (puppeteer-core and "
                "@sparticuz/chromium, a Chromium binary inside an npm package)")


class FrontendError(RuntimeError):
    """The browser driver failed (not a finding about a workflow)."""


def browser_unavailable() -> str | None:
    """Why the frontend cannot be opened here (what to install), or None when it can."""
    node = shutil.which("node")
    if node is None:
        return f"Node.js not found: {INSTALL_HINT}"
    found = subprocess.run([node, "--version"], capture_output=True, text=True).stdout.strip()
    match = re.match(r"v(\d+)\.(\d+)", found)
    if not match or (int(match[1]), int(match[2])) < MIN_NODE:
        return f"Node.js {found or '?'} is too old: {INSTALL_HINT}"
    modules = BROWSER_DIR / "node_modules"
    needed = ["puppeteer-core"] + ([] if os.environ.get("CHROMIUM_PATH") else ["@sparticuz/chromium"])
    absent = [name for name in needed if not (modules / name / "package.json").is_file()]
    if absent:
        return f"{', '.join(absent)} not installed under {modules}: {INSTALL_HINT}"
    return None


def open_workflows(url: str, workflows: list[Path], screenshots: Path | None = None, timeout: float = 600,
                   size: tuple[int, int] = (1600, 1000), place_files: list[Path] | None = None,
                   help_nodes: list[str] | None = None) -> dict[str, Any]:
    """Load each workflow through ``app.loadGraphData`` in one browser; return the driver's report.

    ``place_files``: after the first pass the driver creates these (empty) files and loads every workflow again
    (``report["reloaded"]``: the dialogs that opened). ``help_nodes``: node types whose help panel it opens
    (``report["help"]``)."""
    with tempfile.TemporaryDirectory(prefix="frontend-report-") as tmp:
        out = Path(tmp) / "report.json"
        cmd = [shutil.which("node") or "node", str(DRIVER), "--url", url, "--out", str(out),
               "--width", str(size[0]), "--height", str(size[1])]
        if screenshots is not None:
            cmd += ["--screenshots", str(screenshots)]
        if place_files:
            listing = Path(tmp) / "place_files.json"
            listing.write_text(json.dumps([str(p) for p in place_files]))
            cmd += ["--place-files", str(listing)]
        if help_nodes:
            cmd += ["--help-nodes", ",".join(help_nodes)]
        for attempt in range(1, DRIVER_ATTEMPTS + 1):
            done = subprocess.run(cmd + [str(p) for p in workflows], cwd=BROWSER_DIR, capture_output=True,
                                  text=True, timeout=timeout)
            if done.returncode == 0 and out.is_file():
                return json.loads(out.read_text())
            if COLLECTED not in done.stderr:
                break
            if attempt < DRIVER_ATTEMPTS:
                log.warning("browser driver: Chromium collected a pending promise; running the driver again")
        raise FrontendError(f"browser driver exited with {done.returncode} (attempt {attempt}):\n"
                            f"{done.stderr[-4000:]}")


# -- README: the model files a user is told to download ---------------------------------------------------------------
def _tables(text: str) -> list[list[list[str]]]:
    """Markdown tables as rows of cells (header row first, separator row dropped)."""
    tables, rows = [], []
    for line in text.splitlines() + [""]:
        if line.lstrip().startswith("|"):
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            if not all(re.fullmatch(r":?-+:?", c) for c in cells):
                rows.append(cells)
        elif rows:
            tables.append(rows)
            rows = []
    return tables


def _download_tables(text: str) -> dict[str, str]:
    """File name -> folder, from tables whose header starts with ``File | Put it in``."""
    files = {}
    for table in _tables(text):
        header = [cell.lower() for cell in table[0]]
        if len(header) < 2 or header[0] != "file" or not header[1].startswith("put it in"):
            continue
        for row in table[1:]:
            folder = re.findall(r"`([^`]+)`", row[1])
            for name in re.findall(r"`([^`]+)`", row[0]):
                if name.lower().endswith(MODEL_EXTENSIONS):
                    files[name] = folder[0] if folder else ""
    return files


def readme_model_files(readme: str) -> dict[str, str]:
    """Every model file the README's download tables name (file name -> folder)."""
    return _download_tables(readme)


def readme_model_files_for(readme: str, workflow_file: str) -> dict[str, str] | None:
    """The download table of the README section that names ``example_workflows/<workflow_file>``, if it has one."""
    for section in re.split(r"^## ", readme, flags=re.M):
        if f"example_workflows/{workflow_file}" in section:
            files = _download_tables(section)
            if files:
                return files
    return None


# -- the missing-models dialog ----------------------------------------------------------------------------------------
MISSING_MODELS_TITLE = "Missing Models"
_DIALOG_ENTRY = re.compile(r"^(?P<directory>[\w.-]+) / (?P<name>\S+)", re.M)


def missing_models_dialog(dialogs: list[str]) -> str | None:
    """The text of the frontend's missing-models dialog among the open dialogs, or None when it is not open."""
    found = [d for d in dialogs if MISSING_MODELS_TITLE in d]
    return found[0] if found else None


def missing_models_listed(dialog_text: str) -> set[tuple[str, str]]:
    """(directory, file name) of every entry the missing-models dialog lists (its rows read ``directory / name``)."""
    return {(m["directory"], m["name"]) for m in _DIALOG_ENTRY.finditer(dialog_text)}


def offered_downloads(facts: dict) -> set[tuple[str, str]]:
    """(directory, file name) of the missing files the frontend offers to download after a load: the rows of its
    missing-models dialog (frontends up to 1.3x), or the downloadable missing models of its Issues tab's store
    (1.5x, ``missing_model_store``)."""
    store = facts.get("missing_model_store")
    if store is not None:
        return {(c["directory"], c["name"]) for c in store if c["url"] and c["is_missing"] is not False}
    dialog = missing_models_dialog(facts["dialogs"])
    return missing_models_listed(dialog) if dialog else set()


def other_dialogs(dialogs: list[str]) -> list[str]:
    """Open dialogs other than the missing-models dialog."""
    return [d for d in dialogs if MISSING_MODELS_TITLE not in d]


# -- checks on one workflow's facts -----------------------------------------------------------------------------------
def _label(node: dict) -> str:
    return f"#{node['id']} {node['title']!r} ({node['type']})"


def missing_node_types(facts: dict) -> list[str]:
    """Node types the frontend could not create: its own list plus nodes whose type is not registered or that it
    marks as broken (newer frontends also mark a loader whose model file is missing: that is not a missing type)."""
    missing = set(facts.get("missing_node_types") or [])
    model_missing = {c["node_id"] for c in facts.get("missing_model_store") or [] if c.get("node_id")}
    missing |= {n["type"] for n in facts["nodes"]
                if not n["registered"] or (n["has_errors"] and str(n["id"]) not in model_missing)}
    return sorted(missing)


def without_default_titles(prompt: dict, workflow: dict) -> dict:
    """An API prompt without the ``_meta`` of nodes the workflow gives no title: the frontend fills those with its
    own (newer ones: localised) display names, which are not part of what runs."""
    titled = {str(n["id"]) for n in workflow.get("nodes", []) if n.get("title")}
    return {key: node if key in titled else {k: v for k, v in node.items() if k != "_meta"}
            for key, node in prompt.items()}


def overlapping_nodes(facts: dict) -> list[str]:
    """Pairs of nodes whose rendered boxes (title bar included) intersect with positive area."""
    problems = []
    nodes = facts["nodes"]
    for i, first in enumerate(nodes):
        x1, y1, w1, h1 = first["bounding"]
        for second in nodes[i + 1:]:
            x2, y2, w2, h2 = second["bounding"]
            dx = min(x1 + w1, x2 + w2) - max(x1, x2)
            dy = min(y1 + h1, y2 + h2) - max(y1, y2)
            if dx > 0 and dy > 0:
                problems.append(f"{_label(first)} overlaps {_label(second)} by {dx:.0f}x{dy:.0f} px")
    return problems


def link_problems(facts: dict, workflow: dict, object_info: dict) -> list[str]:
    """Links that do not join an existing output to an existing input of a matching type, links of the file the
    frontend dropped, and required non-widget inputs left unconnected."""
    problems = []
    nodes = {n["id"]: n for n in facts["nodes"]}
    links = {link["id"]: link for link in facts["links"]}
    for link in links.values():
        origin, target = nodes.get(link["origin_id"]), nodes.get(link["target_id"])
        name = f"link {link['id']}"
        if origin is None or target is None:
            problems.append(f"{name}: joins missing node {link['origin_id']} -> {link['target_id']}")
            continue
        if not 0 <= link["origin_slot"] < len(origin["outputs"]):
            problems.append(f"{name}: {_label(origin)} has no output {link['origin_slot']}")
            continue
        if not 0 <= link["target_slot"] < len(target["inputs"]):
            problems.append(f"{name}: {_label(target)} has no input {link['target_slot']}")
            continue
        out, inp = origin["outputs"][link["origin_slot"]], target["inputs"][link["target_slot"]]
        if link["id"] not in out["links"] or inp["link"] != link["id"]:
            problems.append(f"{name}: not attached at both ends ({_label(origin)}.{out['name']} -> "
                            f"{_label(target)}.{inp['name']})")
        if not _types_match(out["type"], inp["type"]):
            problems.append(f"{name}: {_label(origin)}.{out['name']} gives {out['type']}, "
                            f"{_label(target)}.{inp['name']} wants {inp['type']}")
    for node in facts["nodes"]:
        for inp in node["inputs"]:
            if inp["link"] is not None and inp["link"] not in links:
                problems.append(f"{_label(node)}.{inp['name']}: link {inp['link']} does not exist")
    for entry in workflow.get("links", []):
        link_id = entry["id"] if isinstance(entry, dict) else entry[0]
        if link_id not in links:
            problems.append(f"link {link_id} of the file was dropped by the frontend")
    for node in facts["nodes"]:
        info = object_info.get(node["type"])
        if info is None or node["mode"] in (2, 4):
            continue
        connected = {inp["name"] for inp in node["inputs"] if inp["link"] is not None}
        for name, spec in info["input"].get("required", {}).items():
            if not _is_widget(spec) and name not in connected:
                problems.append(f"{_label(node)}: required input {name!r} is not connected")
    return problems


def _types_match(given: str, wanted: str) -> bool:
    if "*" in (given, wanted) or given == wanted:
        return True
    return bool(set(str(given).split(",")) & set(str(wanted).split(",")))


def model_file_values(facts: dict) -> dict[str, list[str]]:
    """Model file name -> the widgets (``#id.name``) that hold it."""
    found: dict[str, list[str]] = {}
    for node in facts["nodes"]:
        for widget in node["widgets"]:
            value = widget["value"]
            if isinstance(value, str) and value.lower().endswith(MODEL_EXTENSIONS):
                found.setdefault(value, []).append(f"#{node['id']}.{widget['name']}")
    return found


def widget_problems(facts: dict, object_info: dict, readme_files: set[str]) -> list[str]:
    """Widget values the frontend would not accept: combo values outside the listed choices (model files excepted:
    they must be README-listed), numbers outside [min, max] or fractional for INT, wrong value kinds; and widgets the
    node defines that the frontend did not create."""
    problems = []
    for node in facts["nodes"]:
        info = object_info.get(node["type"])
        specs = dict(_input_specs(info)) if info else {}
        shown = {w["name"] for w in node["widgets"]}
        problems += [f"{_label(node)}: no widget for input {name!r}" for name, spec in specs.items()
                     if _is_widget(spec) and name not in shown]
        for widget in node["widgets"]:
            problem = _widget_problem(widget, specs.get(widget["name"]), readme_files)
            if problem:
                problems.append(f"{_label(node)}.{widget['name']}: {problem}")
    return problems


def _widget_problem(widget: dict, spec: list | None, readme_files: set[str]) -> str | None:
    value, options, kind = widget["value"], widget["options"], widget["type"]
    if options.get("serialize") is False and kind != "combo":
        return None  # buttons and previews: not part of the prompt
    if kind == "combo":
        if isinstance(value, str) and value.lower().endswith(MODEL_EXTENSIONS):
            return None if value in readme_files else (f"model file {value!r} is not one the README tells the user "
                                                        f"to download ({sorted(readme_files)})")
        choices = options.get("values") or []
        return None if value in choices else f"{value!r} is not one of {choices[:12]}"
    if kind == "number":
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return f"{value!r} is not a number"
        low, high = options.get("min", float("-inf")), options.get("max", float("inf"))
        if not low <= value <= high:
            return f"{value} outside [{low}, {high}]"
        if spec and spec[0] == "INT" and value != int(value):
            return f"{value} is not an integer"
        return None
    if kind == "toggle":
        return None if isinstance(value, bool) else f"{value!r} is not true/false"
    if kind in ("text", "customtext", "string"):
        return None if isinstance(value, str) else f"{value!r} is not text"
    return None
